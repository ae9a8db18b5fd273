// Boost.JSON compiled into the runtime library (header-only mode, this one translation unit).
#include <boost/json/src.hpp>
