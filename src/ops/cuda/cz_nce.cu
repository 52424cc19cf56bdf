// CUDA kernels of the fused CZ-NCE op (the host side is `cuda.rs`; the maths is derived in
// `cpu.rs`). The GEMMs run in cuBLAS; these kernels do everything else in f32:
//
//   cz_load_normalize_*  strided f32/f16/bf16 rows -> x̂ = x / max(‖x‖, ε), 1/max(‖x‖, ε), active
//   cz_row_pass          one direction's rows: max, log-sum-exp, loss, Σ G⊙X and the weights G
//   cz_finish            Σ of the per-row loss (and Σ G⊙X) in a fixed order (deterministic)
//   cz_sym_add           out = A + Aᵀ (+ C + Cᵀ)
//   cz_add_transposed    out += Aᵀ
//   cz_norm_backward     dx = (dx̂ − x̂ ⟨x̂, dx̂⟩) / max(‖x‖, ε), in place
//
// All kernels that reduce use one thread block per row, blockDim.x a multiple of 32 (<= 1024),
// and a fixed reduction tree, so results do not depend on scheduling.

#include "common.cuh"

// Row i of x (any strides, already offset to the first element) -> row i of hat (b x d,
// contiguous f32); inv[i] = 1 / max(‖x_i‖, eps); active[i] = 1 if ‖x_i‖ > eps.
// Without `normalize`, hat = x, inv = 1, active = 0.
template <typename T>
__device__ void load_normalize(const T* x, int64_t row_stride, int64_t col_stride, int d,
                               int normalize, float eps, float* hat, float* inv,
                               float* active) {
    __shared__ float shm[32];
    const int i = blockIdx.x;
    const T* row = x + (int64_t)i * row_stride;
    float* out = hat + (int64_t)i * d;
    float r = 1.0f;
    int act = 0;
    if (normalize) {
        float ss = 0.0f;
        for (int j = threadIdx.x; j < d; j += blockDim.x) {
            const float v = to_f32(row[(int64_t)j * col_stride]);
            ss += v * v;
        }
        ss = block_sum(ss, shm);
        act = ss > eps * eps;
        r = 1.0f / (act ? sqrtf(ss) : eps);
    }
    for (int j = threadIdx.x; j < d; j += blockDim.x) {
        out[j] = to_f32(row[(int64_t)j * col_stride]) * r;
    }
    if (threadIdx.x == 0) {
        inv[i] = r;
        active[i] = act ? 1.0f : 0.0f;
    }
}

#define LOAD_NORMALIZE(NAME, T)                                                              \
    extern "C" __global__ void MLCTL_BOUNDS NAME(const T* x, int64_t row_stride, int64_t col_stride,      \
                                    int d, int normalize, float eps, float* hat, float* inv, \
                                    float* active) {                                         \
        load_normalize<T>(x, row_stride, col_stride, d, normalize, eps, hat, inv, active);  \
    }

LOAD_NORMALIZE(cz_load_normalize_f32, float)
LOAD_NORMALIZE(cz_load_normalize_f16, __half)
LOAD_NORMALIZE(cz_load_normalize_bf16, __nv_bfloat16)

// One direction, one row per thread block. x0 is the cross block (positive on the diagonal),
// x1, x2 the optional same-batch blocks (diagonal masked); nblk in 1..=3 says how many are
// real (unused pointers may be anything valid). All blocks are b x b, row-major, unscaled
// similarities. Writes row_loss[i] = w/B (lse_i - pos_i) and row_gx[i] = Σ_j G_ij X_ij, and
// with want_grad the weights G into g0..g2 (same layout as x0..x2; never aliasing them).
extern "C" __global__ void MLCTL_BOUNDS cz_row_pass(const float* x0, const float* x1, const float* x2,
                                       int nblk, float* g0, float* g1, float* g2,
                                       int want_grad, int b, float scale, int include_positive,
                                       float wb, float* row_loss, float* row_gx) {
    __shared__ float shm[32];
    const int i = blockIdx.x;
    const int64_t off = (int64_t)i * b;
    const float* xs[3] = {x0 + off, x1 + off, x2 + off};
    float* gs[3] = {g0 + off, g1 + off, g2 + off};
    const float pos = xs[0][i] * scale;

    // Pass 1: max over the unmasked entries.
    float m = -INFINITY;
    for (int blk = 0; blk < nblk; ++blk) {
        const bool diag_masked = blk > 0 || !include_positive;
        for (int j = threadIdx.x; j < b; j += blockDim.x) {
            if (!(diag_masked && j == i)) m = fmaxf(m, xs[blk][j] * scale);
        }
    }
    m = block_max(m, shm);

    // Pass 2: Σ e, Σ e·x (x scaled) and Σ e over the non-positive entries, e = exp(x − m).
    float sum = 0.0f, ex = 0.0f, sum_np = 0.0f;
    for (int blk = 0; blk < nblk; ++blk) {
        const bool diag_masked = blk > 0 || !include_positive;
        for (int j = threadIdx.x; j < b; j += blockDim.x) {
            if (diag_masked && j == i) continue;
            const float v = xs[blk][j] * scale;
            const float e = expf(v - m);
            sum += e;
            ex += e * v;
            if (!(blk == 0 && j == i)) sum_np += e;
        }
    }
    sum = block_sum(sum, shm);
    ex = block_sum(ex, shm);
    sum_np = block_sum(sum_np, shm);

    const float c = wb / sum;
    if (threadIdx.x == 0) {
        row_loss[i] = wb * (m + logf(sum) - pos);
        // Σ_j G_ij X_ij = Σ_j softmax_j·w/B·X_ij − w/B·X_pos.
        row_gx[i] = c * ex - wb * pos;
    }
    if (!want_grad) return;

    // Pass 3: G = w/B (softmax − onehot(positive)). The positive gets −Σ_{j≠pos} p_j (equal to
    // p_pos − w/B without the cancellation) with the positive in the partition, −w/B without.
    for (int blk = 0; blk < nblk; ++blk) {
        const bool diag_masked = blk > 0 || !include_positive;
        for (int j = threadIdx.x; j < b; j += blockDim.x) {
            float g;
            if (blk == 0 && j == i) {
                g = include_positive ? -c * sum_np : -wb;
            } else if (diag_masked && j == i) {
                g = 0.0f;
            } else {
                g = c * expf(xs[blk][j] * scale - m);
            }
            gs[blk][j] = g;
        }
    }
}

// One block: loss_out[0] = Σ row_loss[0..n], gx_out[0] = Σ row_gx[0..n].
extern "C" __global__ void MLCTL_BOUNDS cz_finish(const float* row_loss, const float* row_gx, int n,
                                     float* loss_out, float* gx_out) {
    __shared__ float shm[32];
    float l = 0.0f, g = 0.0f;
    for (int i = threadIdx.x; i < n; i += blockDim.x) {
        l += row_loss[i];
        g += row_gx[i];
    }
    l = block_sum(l, shm);
    g = block_sum(g, shm);
    if (threadIdx.x == 0) {
        loss_out[0] = l;
        gx_out[0] = g;
    }
}

// out[i, j] = a[i, j] + a[j, i] (+ c[i, j] + c[j, i] with has_c), b x b row-major.
extern "C" __global__ void MLCTL_BOUNDS cz_sym_add(const float* a, const float* c, int has_c, int b,
                                      float* out) {
    const int64_t n = (int64_t)b * b;
    for (int64_t idx = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; idx < n;
         idx += (int64_t)gridDim.x * blockDim.x) {
        const int64_t i = idx / b, j = idx % b;
        const int64_t t = j * b + i;
        float v = a[idx] + a[t];
        if (has_c) v += c[idx] + c[t];
        out[idx] = v;
    }
}

// out[i, j] += a[j, i], b x b row-major.
extern "C" __global__ void MLCTL_BOUNDS cz_add_transposed(const float* a, int b, float* out) {
    const int64_t n = (int64_t)b * b;
    for (int64_t idx = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; idx < n;
         idx += (int64_t)gridDim.x * blockDim.x) {
        const int64_t i = idx / b, j = idx % b;
        out[idx] += a[j * b + i];
    }
}

// Row i, in place: dx = (dx̂ − x̂ ⟨x̂, dx̂⟩) · inv for active rows, dx̂ · inv otherwise.
extern "C" __global__ void MLCTL_BOUNDS cz_norm_backward(const float* hat, const float* inv,
                                            const float* active, int d, float* dx) {
    __shared__ float shm[32];
    const int i = blockIdx.x;
    const float* h = hat + (int64_t)i * d;
    float* g = dx + (int64_t)i * d;
    const float r = inv[i];
    if (active[i] != 0.0f) {
        float p = 0.0f;
        for (int j = threadIdx.x; j < d; j += blockDim.x) p += h[j] * g[j];
        p = block_sum(p, shm);
        for (int j = threadIdx.x; j < d; j += blockDim.x) g[j] = (g[j] - h[j] * p) * r;
    } else {
        for (int j = threadIdx.x; j < d; j += blockDim.x) g[j] = g[j] * r;
    }
}
