# Compile options shared by every Den target. Warnings are errors for our code only;
# third-party headers come in as SYSTEM includes.
add_library(den_options INTERFACE)
target_compile_options(den_options INTERFACE
  $<$<COMPILE_LANGUAGE:CXX>:-Wall -Wextra -Wpedantic -Werror -Wshadow=local -Wno-missing-field-initializers>
  $<$<COMPILE_LANGUAGE:CXX>:-march=${DEN_CPU_ARCH}>
  $<$<COMPILE_LANGUAGE:CUDA>:-Xcompiler=-Wall,-Werror,-march=${DEN_CPU_ARCH}>
  $<$<COMPILE_LANGUAGE:CUDA>:--Werror=all-warnings>)
target_compile_definitions(den_options INTERFACE DEN_VERSION="${PROJECT_VERSION}")
# GCC 12 reports -Wrestrict false positives inside std::string concatenation at -O3
# (GCC bug 105651, fixed in 13).
if(CMAKE_CXX_COMPILER_ID STREQUAL "GNU" AND CMAKE_CXX_COMPILER_VERSION VERSION_LESS 13)
  target_compile_options(den_options INTERFACE $<$<COMPILE_LANGUAGE:CXX>:-Wno-restrict>)
endif()

if(DEN_SANITIZE)
  add_compile_options($<$<COMPILE_LANGUAGE:C,CXX>:-fsanitize=address,undefined>
                      $<$<COMPILE_LANGUAGE:C,CXX>:-fno-omit-frame-pointer>
                      $<$<COMPILE_LANGUAGE:C,CXX>:-fno-sanitize-recover=undefined>)
  add_link_options(-fsanitize=address,undefined)
endif()

# Helper: one library per layer, public headers under <layer>/include/den/<layer>/.
function(den_layer_library name)
  cmake_parse_arguments(ARG "" "" "SOURCES;PUBLIC_DEPS;PRIVATE_DEPS" ${ARGN})
  add_library(${name} STATIC ${ARG_SOURCES})
  target_include_directories(${name} PUBLIC ${CMAKE_CURRENT_SOURCE_DIR}/include
                                     PRIVATE ${CMAKE_CURRENT_SOURCE_DIR}/src)
  target_link_libraries(${name} PUBLIC ${ARG_PUBLIC_DEPS} PRIVATE den_options ${ARG_PRIVATE_DEPS})
endfunction()
