// What kernels ask of the current device when they size their grids. Private to kernels/cuda.
#pragma once

namespace den::kernels {

// The current device's SM count, asked once per thread and device.
int sm_count();

}  // namespace den::kernels
