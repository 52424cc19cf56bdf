// Device helpers shared by the CUDA kernels of `src/ops/cuda/cz_nce.cu` and `src/ops/cuda/ops.cu`:
// f32 loads of f32/f16/bf16 storage, and warp- and block-wide sums and maxima with a fixed
// reduction tree. Included by both (and by the CPU emulator's checks, through them).
#ifndef MLCTL_CUDA_COMMON_CUH
#define MLCTL_CUDA_COMMON_CUH

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

// Every kernel is launched with at most 1024 threads per block (row kernels take up to 1024).
// Without the bound, ptxas may give a kernel more registers than 1024 threads can have (64 per
// thread on sm_80/sm_90), and the launch fails at run time with "too many resources requested".
#define MLCTL_MAX_THREADS 1024
#define MLCTL_BOUNDS __launch_bounds__(MLCTL_MAX_THREADS)

__device__ __forceinline__ float to_f32(float x) { return x; }
__device__ __forceinline__ float to_f32(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_f32(__nv_bfloat16 x) { return __bfloat162float(x); }

__device__ __forceinline__ float warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// Block-wide sum; every thread gets the result. `shm` holds 32 floats.
__device__ float block_sum(float v, float* shm) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int warps = (blockDim.x + 31) >> 5;
    v = warp_sum(v);
    __syncthreads();  // the previous call's readers of shm[0] are done
    if (lane == 0) shm[warp] = v;
    __syncthreads();
    if (warp == 0) {
        float w = lane < warps ? shm[lane] : 0.0f;
        w = warp_sum(w);
        if (lane == 0) shm[0] = w;
    }
    __syncthreads();
    return shm[0];
}

// Block-wide max; every thread gets the result. `shm` holds 32 floats.
__device__ float block_max(float v, float* shm) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int warps = (blockDim.x + 31) >> 5;
    v = warp_max(v);
    __syncthreads();
    if (lane == 0) shm[warp] = v;
    __syncthreads();
    if (warp == 0) {
        float w = lane < warps ? shm[lane] : -INFINITY;
        w = warp_max(w);
        if (lane == 0) shm[0] = w;
    }
    __syncthreads();
    return shm[0];
}

#endif  // MLCTL_CUDA_COMMON_CUH
