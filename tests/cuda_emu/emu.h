// A tiny CUDA execution emulator for *testing* the kernels of src/ops/cuda/cz_nce.cu and
// src/ops/cuda/ops.cu on a machine without a GPU. Every CUDA thread of a block is a coroutine (ucontext) on one OS
// thread; a round-robin scheduler runs them until each finishes or waits at a barrier:
// `__syncthreads` (all live threads of the block) or the two halves of `__shfl_xor_sync` (the
// 32 lanes of a warp). A barrier that can never be released (divergent `__syncthreads`,
// a partial warp in a shuffle) aborts with a message. `__shared__` variables are
// function-local statics (blocks run one after another). Deterministic.
//
// It checks the kernels' logic (indexing, masking, reductions, barriers) - not performance,
// not the PTX that nvcc emits, and not the host code (cuda.rs files).
#pragma once
#if defined(__APPLE__) && !defined(_XOPEN_SOURCE)
#define _XOPEN_SOURCE 700  // macOS hides ucontext without it
#endif
#include <ucontext.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <utility>
#include <vector>

struct dim3 {
    unsigned x = 1, y = 1, z = 1;
};

// One OS thread runs all coroutines, so plain globals do: the scheduler sets them on switch.
inline dim3 threadIdx;
inline dim3 blockIdx;
inline dim3 blockDim;
inline dim3 gridDim;

#define __global__
#define __launch_bounds__(...)
#define __device__
#define __forceinline__ inline
#define __shared__ static

namespace emu {
enum Wait { RUNNABLE, BLOCK_BARRIER, WARP_BARRIER, DONE };

struct Coroutine {
    ucontext_t ctx;
    std::vector<char> stack;
    Wait state = RUNNABLE;
};

inline ucontext_t scheduler;
inline std::vector<Coroutine> threads;
inline unsigned current = 0;
inline const std::function<void()>* body = nullptr;
inline float warp_buf[32][32];
inline uint64_t schedule_seed = 1;

inline void wait(Wait why) {
    threads[current].state = why;
    swapcontext(&threads[current].ctx, &scheduler);
}

inline void trampoline() {
    (*body)();
    threads[current].state = DONE;  // uc_link returns to the scheduler
}

// Runs `kernel_call` (which calls the kernel) as `grid` blocks of `block` threads.
inline void launch(unsigned grid, unsigned block, const std::function<void()>& kernel_call) {
    if (block % 32 != 0 || block > 1024) std::abort();
    blockDim = dim3{block, 1, 1};
    gridDim = dim3{grid, 1, 1};
    body = &kernel_call;
    threads.assign(block, Coroutine{});
    for (auto& t : threads) t.stack.resize(1 << 16);
    for (unsigned b = 0; b < grid; ++b) {
        blockIdx = dim3{b, 0, 0};
        for (auto& t : threads) {
            t.state = RUNNABLE;
            getcontext(&t.ctx);
            t.ctx.uc_stack.ss_sp = t.stack.data();
            t.ctx.uc_stack.ss_size = t.stack.size();
            t.ctx.uc_link = &scheduler;
            makecontext(&t.ctx, trampoline, 0);
        }
        const unsigned warps = block / 32;
        for (;;) {
            // Warps run independently until a block barrier, one warp at a time, in a
            // pseudo-random order each pass: a warp that races ahead of the others (e.g. reuses
            // shared memory they have not read yet) gets caught.
            bool progressed = false;
            std::vector<unsigned> order(warps);
            for (unsigned k = 0; k < warps; ++k) order[k] = k;
            for (unsigned k = warps; k > 1; --k) {
                schedule_seed = schedule_seed * 6364136223846793005ull + 1442695040888963407ull;
                std::swap(order[k - 1], order[(schedule_seed >> 33) % k]);
            }
            for (const unsigned w : order) {
                for (;;) {
                    for (unsigned l = 0; l < 32; ++l) {
                        const unsigned i = w * 32 + l;
                        if (threads[i].state != RUNNABLE) continue;
                        current = i;
                        threadIdx = dim3{i, 0, 0};
                        swapcontext(&scheduler, &threads[i].ctx);
                        progressed = true;
                    }
                    bool warp_ready = true;
                    for (unsigned l = 0; l < 32; ++l) warp_ready &= threads[w * 32 + l].state == WARP_BARRIER;
                    if (!warp_ready) break;
                    for (unsigned l = 0; l < 32; ++l) threads[w * 32 + l].state = RUNNABLE;
                }
            }
            bool all_done = true, block_ready = true, any_waiting = false;
            for (auto& t : threads) {
                all_done &= t.state == DONE;
                if (t.state == BLOCK_BARRIER) {
                    any_waiting = true;
                } else if (t.state != DONE) {
                    block_ready = false;
                }
            }
            if (all_done) break;
            if (block_ready && any_waiting) {
                for (auto& t : threads)
                    if (t.state == BLOCK_BARRIER) t.state = RUNNABLE;
            } else if (!progressed) {
                std::fprintf(stderr, "emu: deadlock in block %u (divergent barrier)\n", b);
                std::abort();
            }
        }
    }
}
}  // namespace emu

inline void __syncthreads() { emu::wait(emu::BLOCK_BARRIER); }

inline float __shfl_xor_sync(unsigned /*mask*/, float v, int lane_mask) {
    const unsigned lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    emu::warp_buf[warp][lane] = v;
    emu::wait(emu::WARP_BARRIER);
    const float r = emu::warp_buf[warp][lane ^ lane_mask];
    emu::wait(emu::WARP_BARRIER);
    return r;
}

// Device intrinsics the kernels use, with their CUDA semantics on the host: the `_rn` forms are
// single IEEE operations in round-to-nearest (C++ in ISO mode does not contract them into FMAs).
inline unsigned __umulhi(unsigned a, unsigned b) {
    return (unsigned)(((uint64_t)a * (uint64_t)b) >> 32);
}
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __fsqrt_rn(float a) { return std::sqrt(a); }
inline int min(int a, int b) { return a < b ? a : b; }
inline int64_t min(int64_t a, int64_t b) { return a < b ? a : b; }
