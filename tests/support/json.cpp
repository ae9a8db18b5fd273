// Boost.JSON compiled into the test support library (header-only mode, one translation unit).
#include <boost/json/src.hpp>
