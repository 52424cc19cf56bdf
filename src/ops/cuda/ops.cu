// CUDA kernels of the fused encoder ops of `src/ops` and of the fused AdamW update (the host side
// is `src/ops/cuda.rs`; the formulas are those of the CPU kernels beside it). Storage is f32, f16
// or bf16; every computation runs in f32.
//
//   ln_fwd_*           LayerNorm, one block per row: y, mean, 1/std
//   ln_bwd_*           its backward, one block per chunk of rows: dx, and the chunk's partial sums
//                      of dweight and dbias
//   ln_bwd_reduce_*    dweight, dbias: the partial sums added in chunk order (deterministic)
//   softmax_fwd_*      softmax(scale * x + mask) over rows, the mask broadcast by strides
//   softmax_bwd_*      dx = scale * y * (dy - sum(dy * y))
//   gelu_fwd_*, gelu_bwd_*     erf and tanh forms
//   dropout_*          inverted dropout with the CPU's Philox4x32-10 masks, bit for bit
//   adamw_*            one AdamW step of one parameter, bit for bit the CPU's fused pass
//
// Row kernels use one thread block per row (or chunk of rows), blockDim.x a multiple of 32
// (<= 1024), and a fixed reduction tree, so results do not depend on scheduling. No atomics.

#include "common.cuh"

namespace mlctl {

// Round-to-nearest-even conversions, as the `half` crate's `from_f32` on the CPU.
template <typename T>
__device__ __forceinline__ T from_f32(float x);
template <>
__device__ __forceinline__ float from_f32<float>(float x) { return x; }
template <>
__device__ __forceinline__ __half from_f32<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float x) {
    return __float2bfloat16_rn(x);
}

// ---------------------------------------------------------------------------------------------
// LayerNorm

template <typename T>
__device__ void ln_fwd(const T* x, const T* w, const T* b, int hidden, float eps, T* y,
                       float* mean, float* rstd) {
    __shared__ float shm[32];
    const int64_t row = blockIdx.x;
    const T* xr = x + row * hidden;
    T* yr = y + row * hidden;
    const float inv_n = 1.0f / (float)hidden;
    float s = 0.0f;
    for (int i = threadIdx.x; i < hidden; i += blockDim.x) s += to_f32(xr[i]);
    const float mu = block_sum(s, shm) * inv_n;
    float ss = 0.0f;
    for (int i = threadIdx.x; i < hidden; i += blockDim.x) {
        const float c = to_f32(xr[i]) - mu;
        ss += c * c;
    }
    const float var = block_sum(ss, shm) * inv_n;
    const float rs = 1.0f / sqrtf(var + eps);
    for (int i = threadIdx.x; i < hidden; i += blockDim.x)
        yr[i] = from_f32<T>((to_f32(xr[i]) - mu) * rs * to_f32(w[i]) + to_f32(b[i]));
    if (threadIdx.x == 0) {
        mean[row] = mu;
        rstd[row] = rs;
    }
}

// Rows [blockIdx.x * rows_per_block, ...) of the backward: dx, and into
// partial[blockIdx.x * 2 * hidden ..] the chunk's sums of dy * x̂ (dweight) then of dy (dbias).
// Column i's partial sums are owned by the thread with i % blockDim.x == threadIdx.x.
template <typename T>
__device__ void ln_bwd(const T* x, const T* w, const T* g, const float* mean, const float* rstd,
                       int rows, int rows_per_block, int hidden, T* dx, float* partial) {
    __shared__ float shm[32];
    float* pw = partial + (int64_t)blockIdx.x * 2 * hidden;
    float* pb = pw + hidden;
    for (int i = threadIdx.x; i < hidden; i += blockDim.x) {
        pw[i] = 0.0f;
        pb[i] = 0.0f;
    }
    const float inv_n = 1.0f / (float)hidden;
    const int first = blockIdx.x * rows_per_block;
    const int last = min(rows, first + rows_per_block);
    for (int row = first; row < last; ++row) {
        const int64_t off = (int64_t)row * hidden;
        const T* xr = x + off;
        const T* gr = g + off;
        T* dxr = dx + off;
        const float mu = mean[row], rs = rstd[row];
        float sa = 0.0f, sc = 0.0f;
        for (int i = threadIdx.x; i < hidden; i += blockDim.x) {
            const float gw = to_f32(gr[i]) * to_f32(w[i]);
            sa += gw;
            sc += gw * ((to_f32(xr[i]) - mu) * rs);
        }
        const float a = block_sum(sa, shm) * inv_n;
        const float c = block_sum(sc, shm) * inv_n;
        for (int i = threadIdx.x; i < hidden; i += blockDim.x) {
            const float gi = to_f32(gr[i]);
            const float xh = (to_f32(xr[i]) - mu) * rs;
            dxr[i] = from_f32<T>(rs * (gi * to_f32(w[i]) - a - xh * c));
            pw[i] += gi * xh;
            pb[i] += gi;
        }
    }
}

// dweight[i], dbias[i] = the sums over `blocks` partials, in block order. A grid-stride loop over
// the 2 * hidden columns.
template <typename T>
__device__ void ln_bwd_reduce(const float* partial, int blocks, int hidden, T* dw, T* db) {
    const int64_t n = 2 * (int64_t)hidden;
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (int64_t)gridDim.x * blockDim.x) {
        float s = 0.0f;
        for (int k = 0; k < blocks; ++k) s += partial[(int64_t)k * n + i];
        if (i < hidden) {
            dw[i] = from_f32<T>(s);
        } else {
            db[i - hidden] = from_f32<T>(s);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Softmax over rows of n: y = softmax(scale * x + mask). The row index decomposes over up to
// four leading dimensions d0..d3 (d3 fastest); the mask offset of a row is the sum of its
// coordinates times the mask's strides s0..s3 (0 where the mask broadcasts), and column j of
// the mask row is at j * col_stride.

__device__ __forceinline__ int64_t mask_offset(int64_t row, const int64_t* d, const int64_t* s) {
    int64_t off = 0;
    for (int k = 3; k >= 0; --k) {
        off += (row % d[k]) * s[k];
        row /= d[k];
    }
    return off;
}

template <typename T>
__device__ void softmax_fwd(const T* x, const T* mask, int has_mask, int n, int64_t col_stride,
                            int64_t d0, int64_t d1, int64_t d2, int64_t d3, int64_t s0,
                            int64_t s1, int64_t s2, int64_t s3, float scale, T* y) {
    __shared__ float shm[32];
    const int64_t row = blockIdx.x;
    const T* xr = x + row * n;
    T* yr = y + row * n;
    const int64_t d[4] = {d0, d1, d2, d3};
    const int64_t s[4] = {s0, s1, s2, s3};
    const T* mr = has_mask ? mask + mask_offset(row, d, s) : nullptr;
    // z_j, recomputed in each pass rather than stored (rows can be longer than the block).
#define Z(j) (has_mask ? scale * to_f32(xr[j]) + to_f32(mr[(int64_t)(j) * col_stride]) \
                       : scale * to_f32(xr[j]))
    float m = -INFINITY;
    for (int j = threadIdx.x; j < n; j += blockDim.x) m = fmaxf(m, Z(j));
    m = block_max(m, shm);
    if (m == -INFINITY) {
        // Every entry masked with -inf: zeros, as the CPU kernel (m is the same in every
        // thread, so the whole block returns here, before any barrier).
        for (int j = threadIdx.x; j < n; j += blockDim.x) yr[j] = from_f32<T>(0.0f);
        return;
    }
    float sum = 0.0f;
    for (int j = threadIdx.x; j < n; j += blockDim.x) sum += expf(Z(j) - m);
    const float inv = 1.0f / block_sum(sum, shm);
    for (int j = threadIdx.x; j < n; j += blockDim.x) yr[j] = from_f32<T>(expf(Z(j) - m) * inv);
#undef Z
}

template <typename T>
__device__ void softmax_bwd(const T* y, const T* g, int n, float scale, T* dx) {
    __shared__ float shm[32];
    const int64_t off = (int64_t)blockIdx.x * n;
    const T* yr = y + off;
    const T* gr = g + off;
    T* dr = dx + off;
    float dot = 0.0f;
    for (int j = threadIdx.x; j < n; j += blockDim.x) dot += to_f32(gr[j]) * to_f32(yr[j]);
    dot = block_sum(dot, shm);
    for (int j = threadIdx.x; j < n; j += blockDim.x)
        dr[j] = from_f32<T>(scale * to_f32(yr[j]) * (to_f32(gr[j]) - dot));
}

// ---------------------------------------------------------------------------------------------
// GELU: form 0 = erf, 1 = tanh.

#define SQRT_2_OVER_PI 0.7978845608028654f
#define FRAC_1_SQRT_2 0.7071067811865476f
#define FRAC_1_SQRT_2PI 0.3989422804014327f
#define TANH_C 0.044715f

__device__ __forceinline__ float gelu_value(float x, int form) {
    if (form == 0) return x * (0.5f * (1.0f + erff(x * FRAC_1_SQRT_2)));
    const float t = tanhf(SQRT_2_OVER_PI * (x + TANH_C * x * x * x));
    return 0.5f * x * (1.0f + t);
}

__device__ __forceinline__ float gelu_slope(float x, int form) {
    if (form == 0) {
        const float cdf = 0.5f * (1.0f + erff(x * FRAC_1_SQRT_2));
        const float pdf = FRAC_1_SQRT_2PI * expf(-0.5f * x * x);
        return cdf + x * pdf;
    }
    const float t = tanhf(SQRT_2_OVER_PI * (x + TANH_C * x * x * x));
    const float du = SQRT_2_OVER_PI * (1.0f + 3.0f * TANH_C * x * x);
    return 0.5f * (1.0f + t) + 0.5f * x * (1.0f - t * t) * du;
}

template <typename T>
__device__ void gelu_fwd(const T* x, int64_t n, int form, T* y) {
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (int64_t)gridDim.x * blockDim.x)
        y[i] = from_f32<T>(gelu_value(to_f32(x[i]), form));
}

template <typename T>
__device__ void gelu_bwd(const T* x, const T* g, int64_t n, int form, T* dx) {
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (int64_t)gridDim.x * blockDim.x)
        dx[i] = from_f32<T>(to_f32(g[i]) * gelu_slope(to_f32(x[i]), form));
}

// ---------------------------------------------------------------------------------------------
// Dropout. Philox4x32-10 (Random123's constants), and the CPU's layout (`for_each_keep` in
// dropout.rs): entry j of row r (global sample s = sample_offset + r) is kept when word j % 4 of
// philox([j / 4, site, lo(s), lo(step)], [lo(seed) ^ hi(s), hi(seed) ^ hi(step)]) is at least
// `threshold`. One thread per group of four entries (one Philox call).

struct Philox4 {
    uint32_t w[4];
};

__device__ __forceinline__ Philox4 philox4x32_10(uint32_t c0, uint32_t c1, uint32_t c2,
                                                 uint32_t c3, uint32_t k0, uint32_t k1) {
    const uint32_t M0 = 0xD2511F53u, M1 = 0xCD9E8D57u, W0 = 0x9E3779B9u, W1 = 0xBB67AE85u;
    for (int round = 0; round < 10; ++round) {
        if (round > 0) {
            k0 += W0;
            k1 += W1;
        }
        const uint32_t hi0 = __umulhi(M0, c0), lo0 = M0 * c0;
        const uint32_t hi1 = __umulhi(M1, c2), lo1 = M1 * c2;
        const uint32_t n0 = hi1 ^ c1 ^ k0, n2 = hi0 ^ c3 ^ k1;
        c0 = n0;
        c1 = lo1;
        c2 = n2;
        c3 = lo0;
    }
    return Philox4{{c0, c1, c2, c3}};
}

// y = keep ? x * scale : 0 over `rows` rows of `row_len` (also the backward, with x = dy).
template <typename T>
__device__ void dropout(const T* x, int64_t rows, int64_t row_len, uint64_t seed, uint64_t step,
                        uint64_t sample_offset, uint32_t site, uint32_t threshold, float scale,
                        T* y) {
    const int64_t quads = (row_len + 3) / 4;
    const int64_t total = rows * quads;
    for (int64_t t = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; t < total;
         t += (int64_t)gridDim.x * blockDim.x) {
        const int64_t r = t / quads, q = t % quads;
        const uint64_t sample = sample_offset + (uint64_t)r;
        const Philox4 p = philox4x32_10((uint32_t)q, site, (uint32_t)sample, (uint32_t)step,
                                        (uint32_t)seed ^ (uint32_t)(sample >> 32),
                                        (uint32_t)(seed >> 32) ^ (uint32_t)(step >> 32));
        const int64_t base = r * row_len + 4 * q;
        const int64_t count = min((int64_t)4, row_len - 4 * q);
        for (int k = 0; k < count; ++k)
            y[base + k] = p.w[k] >= threshold ? from_f32<T>(to_f32(x[base + k]) * scale)
                                              : from_f32<T>(0.0f);
    }
}

// ---------------------------------------------------------------------------------------------
// AdamW: the CPU's `Coefficients::apply`, op by op in the same order. The explicit `_rn`
// intrinsics keep nvcc from contracting products and sums into FMAs, which would round
// differently; the `+ 0.0f` of candle's `affine` turns -0 into +0 as on the CPU.

template <typename P>
__device__ void adamw(P* p, const P* g, float* m, float* v, float* master, int has_master,
                      int64_t n, float beta1, float one_minus_beta1, float beta2,
                      float one_minus_beta2, float eps, float inv_correction1,
                      float inv_correction2, float lr, float decay, int has_decay) {
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (int64_t)gridDim.x * blockDim.x) {
        const float gi = to_f32(g[i]);
        const float nm = __fadd_rn(__fadd_rn(__fmul_rn(m[i], beta1), 0.0f),
                                   __fadd_rn(__fmul_rn(gi, one_minus_beta1), 0.0f));
        const float nv = __fadd_rn(__fadd_rn(__fmul_rn(v[i], beta2), 0.0f),
                                   __fadd_rn(__fmul_rn(__fmul_rn(gi, gi), one_minus_beta2), 0.0f));
        float w = has_master ? master[i] : to_f32(p[i]);
        if (has_decay) w = __fadd_rn(__fmul_rn(w, decay), 0.0f);
        const float denom =
            __fadd_rn(__fsqrt_rn(__fadd_rn(__fmul_rn(nv, inv_correction2), 0.0f)), eps);
        const float update = __fdiv_rn(__fadd_rn(__fmul_rn(nm, inv_correction1), 0.0f), denom);
        const float nw = __fsub_rn(w, __fadd_rn(__fmul_rn(update, lr), 0.0f));
        m[i] = nm;
        v[i] = nv;
        if (has_master) master[i] = nw;
        p[i] = from_f32<P>(nw);
    }
}

}  // namespace mlctl

// ---------------------------------------------------------------------------------------------
// Entry points, one per storage type.

#define MLCTL_OPS_FOR_TYPE(SUFFIX, T)                                                             \
    extern "C" __global__ void MLCTL_BOUNDS ln_fwd_##SUFFIX(const T* x, const T* w, const T* b, int hidden,  \
                                               float eps, T* y, float* mean, float* rstd) {     \
        mlctl::ln_fwd<T>(x, w, b, hidden, eps, y, mean, rstd);                                  \
    }                                                                                           \
    extern "C" __global__ void MLCTL_BOUNDS ln_bwd_##SUFFIX(const T* x, const T* w, const T* g,              \
                                               const float* mean, const float* rstd, int rows,  \
                                               int rows_per_block, int hidden, T* dx,           \
                                               float* partial) {                                \
        mlctl::ln_bwd<T>(x, w, g, mean, rstd, rows, rows_per_block, hidden, dx, partial);       \
    }                                                                                           \
    extern "C" __global__ void MLCTL_BOUNDS ln_bwd_reduce_##SUFFIX(const float* partial, int blocks,         \
                                                      int hidden, T* dw, T* db) {               \
        mlctl::ln_bwd_reduce<T>(partial, blocks, hidden, dw, db);                               \
    }                                                                                           \
    extern "C" __global__ void MLCTL_BOUNDS softmax_fwd_##SUFFIX(                                            \
        const T* x, const T* mask, int has_mask, int n, int64_t col_stride, int64_t d0,         \
        int64_t d1, int64_t d2, int64_t d3, int64_t s0, int64_t s1, int64_t s2, int64_t s3,     \
        float scale, T* y) {                                                                    \
        mlctl::softmax_fwd<T>(x, mask, has_mask, n, col_stride, d0, d1, d2, d3, s0, s1, s2, s3, \
                              scale, y);                                                        \
    }                                                                                           \
    extern "C" __global__ void MLCTL_BOUNDS softmax_bwd_##SUFFIX(const T* y, const T* g, int n, float scale, \
                                                    T* dx) {                                    \
        mlctl::softmax_bwd<T>(y, g, n, scale, dx);                                              \
    }                                                                                           \
    extern "C" __global__ void MLCTL_BOUNDS gelu_fwd_##SUFFIX(const T* x, int64_t n, int form, T* y) {       \
        mlctl::gelu_fwd<T>(x, n, form, y);                                                      \
    }                                                                                           \
    extern "C" __global__ void MLCTL_BOUNDS gelu_bwd_##SUFFIX(const T* x, const T* g, int64_t n, int form,   \
                                                 T* dx) {                                       \
        mlctl::gelu_bwd<T>(x, g, n, form, dx);                                                  \
    }                                                                                           \
    extern "C" __global__ void MLCTL_BOUNDS dropout_##SUFFIX(const T* x, int64_t rows, int64_t row_len,      \
                                                uint64_t seed, uint64_t step,                   \
                                                uint64_t sample_offset, uint32_t site,          \
                                                uint32_t threshold, float scale, T* y) {        \
        mlctl::dropout<T>(x, rows, row_len, seed, step, sample_offset, site, threshold, scale,  \
                          y);                                                                   \
    }                                                                                           \
    extern "C" __global__ void MLCTL_BOUNDS adamw_##SUFFIX(                                                  \
        T* p, const T* g, float* m, float* v, float* master, int has_master, int64_t n,         \
        float beta1, float one_minus_beta1, float beta2, float one_minus_beta2, float eps,      \
        float inv_correction1, float inv_correction2, float lr, float decay, int has_decay) {   \
        mlctl::adamw<T>(p, g, m, v, master, has_master, n, beta1, one_minus_beta1, beta2,       \
                        one_minus_beta2, eps, inv_correction1, inv_correction2, lr, decay,      \
                        has_decay);                                                             \
    }

MLCTL_OPS_FOR_TYPE(f32, float)
MLCTL_OPS_FOR_TYPE(f16, __half)
MLCTL_OPS_FOR_TYPE(bf16, __nv_bfloat16)
