// Turns a small runtime count (1..8) into a compile-time constant, so kernels can keep per-count
// arrays in registers. Private to kernels/cuda.
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>
#include <type_traits>

namespace den::kernels {

// Calls f(std::integral_constant<int, n>{}); throws std::invalid_argument naming `what` when n
// is outside 1..8.
template <typename F>
void dispatch_count_1_to_8(int32_t n, const char* what, F&& f) {
  switch (n) {
    case 1: return f(std::integral_constant<int, 1>{});
    case 2: return f(std::integral_constant<int, 2>{});
    case 3: return f(std::integral_constant<int, 3>{});
    case 4: return f(std::integral_constant<int, 4>{});
    case 5: return f(std::integral_constant<int, 5>{});
    case 6: return f(std::integral_constant<int, 6>{});
    case 7: return f(std::integral_constant<int, 7>{});
    case 8: return f(std::integral_constant<int, 8>{});
    default: throw std::invalid_argument(std::string(what) + ": 1 to 8 are supported, got " + std::to_string(n));
  }
}

}  // namespace den::kernels
