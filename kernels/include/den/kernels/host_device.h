// DEN_HOST_DEVICE marks small inline functions shared by host code and CUDA kernels (so the
// CPU reference and the kernel compute the very same thing); plain inline for g++.
#pragma once

#if defined(__CUDACC__)
#define DEN_HOST_DEVICE __host__ __device__
#else
#define DEN_HOST_DEVICE
#endif
