# Third-party libraries, all from Debian packages (scripts/setup installs them).
# With DEN_STATIC_DEPS the archives (.a) are linked so that one binary built here runs on
# a machine without these packages (the GPU machine); cuBLAS and the CUDA runtime stay dynamic.
find_package(Threads REQUIRED)
find_package(PkgConfig REQUIRED)
find_package(doctest CONFIG QUIET)
find_package(CLI11 CONFIG REQUIRED)
find_package(fmt CONFIG REQUIRED)

if(DEN_STATIC_DEPS)
  set(_den_libsuffix .a)
else()
  set(_den_libsuffix .so)
endif()

# den_find_system_library(<target> <pkg-config module> <library file stem>)
function(den_find_system_library target module stem)
  string(MAKE_C_IDENTIFIER ${target} var)
  pkg_check_modules(${var} REQUIRED QUIET ${module})
  find_library(${var}_lib NAMES ${stem}${_den_libsuffix} ${stem}
               HINTS ${${var}_LIBRARY_DIRS} REQUIRED NO_CACHE)
  add_library(${target} INTERFACE IMPORTED GLOBAL)
  target_include_directories(${target} SYSTEM INTERFACE ${${var}_INCLUDE_DIRS})
  target_link_libraries(${target} INTERFACE ${${var}_lib})
endfunction()

den_find_system_library(den::pcre2 libpcre2-8 libpcre2-8)
den_find_system_library(den::xxhash libxxhash libxxhash)
den_find_system_library(den::sqlite3 sqlite3 libsqlite3)
den_find_system_library(den::lua lua5.4-c++ liblua5.4-c++)
den_find_system_library(den::yamlcpp yaml-cpp libyaml-cpp)
target_compile_definitions(den::pcre2 INTERFACE PCRE2_CODE_UNIT_WIDTH=8 $<$<BOOL:${DEN_STATIC_DEPS}>:PCRE2_STATIC>)

if(DEN_STATIC_DEPS)
  target_link_libraries(den::sqlite3 INTERFACE ${CMAKE_DL_LIBS} Threads::Threads m)
  add_link_options(-static-libstdc++ -static-libgcc)
endif()

# fmt header-only: Debian ships no static libfmt, and the GPU machine has no libfmt.so.
add_library(den::fmt ALIAS fmt::fmt-header-only)
