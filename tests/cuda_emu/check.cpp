// Runs every kernel of src/ops/cuda/cz_nce.cu in the CPU emulator (emu.h) against plain
// double-precision references written from the formulas in src/ops/cz_nce/cpu.rs.
// Built and run by tests/it/cuda_kernels_emulated.rs; by hand:
//   c++ -std=c++20 -O1 -Itests/cuda_emu/include tests/cuda_emu/check.cpp -o /tmp/check
//   /tmp/check
#include "emu.h"
// The kernels under test, compiled for the host.
#include "../../src/ops/cuda/cz_nce.cu"

#include <algorithm>
#include <cstdio>
#include <random>
#include <string>

static int failures = 0;
static long checks = 0;

// |got − want| ≤ tol · max(|want|, floor)
static void close(const std::string& what, double got, double want, double tol,
                  double floor = 1.0) {
    ++checks;
    const double lim = tol * std::max(std::fabs(want), floor);
    if (!(std::fabs(got - want) <= lim)) {
        if (failures < 25) std::printf("FAIL %s: got %.9g want %.9g\n", what.c_str(), got, want);
        ++failures;
    }
}

static std::mt19937_64 rng(20261125);
// Multiples of 1/64 in [-4, 4]: exact in f32, f16 and bf16.
static float grid_value() { return (float)std::uniform_int_distribution<int>(-256, 256)(rng) / 64.0f; }
static float uniform(float lo, float hi) { return std::uniform_real_distribution<float>(lo, hi)(rng); }

// Exact conversions for values with at most 8 significant bits (see grid_value).
static __half to_half(float f) {
    uint32_t u;
    std::memcpy(&u, &f, 4);
    const uint16_t sign = (u >> 16) & 0x8000u;
    if ((u & 0x7fffffffu) == 0) return __half{sign};
    const int exp = (int)((u >> 23) & 0xffu) - 127 + 15;
    return __half{(uint16_t)(sign | (exp << 10) | ((u >> 13) & 0x3ffu))};
}
static __nv_bfloat16 to_bf16(float f) {
    uint32_t u;
    std::memcpy(&u, &f, 4);
    return __nv_bfloat16{(uint16_t)(u >> 16)};
}

template <typename T, typename Kernel>
static void check_load_normalize(const char* name, Kernel kernel, T (*conv)(float)) {
    for (int d : {1, 37, 300}) {
        for (int normalize : {0, 1}) {
            const int b = 5, off = 3;
            // Stored transposed (D x B) after `off` padding: row i is x[off + i + j·B].
            std::vector<float> logical(b * d);
            for (auto& v : logical) v = grid_value();
            for (int j = 0; j < d; ++j) logical[2 * d + j] = 0.0f;  // a zero row
            std::vector<T> storage(off + b * d);
            for (int i = 0; i < b; ++i)
                for (int j = 0; j < d; ++j) storage[off + i + (int64_t)j * b] = conv(logical[i * d + j]);
            std::vector<float> hat(b * d, NAN), inv(b, NAN), active(b, NAN);
            const float eps = 1e-8f;
            emu::launch(b, 64, [&] {
                kernel(storage.data() + off, 1, b, d, normalize, eps, hat.data(), inv.data(),
                       active.data());
            });
            for (int i = 0; i < b; ++i) {
                double ss = 0;
                for (int j = 0; j < d; ++j) ss += (double)logical[i * d + j] * logical[i * d + j];
                const bool act = normalize && ss > (double)eps * eps;
                const double r = normalize ? 1.0 / (act ? std::sqrt(ss) : (double)eps) : 1.0;
                const std::string w = std::string(name) + " d=" + std::to_string(d) +
                                      " norm=" + std::to_string(normalize) + " row " + std::to_string(i);
                close(w + " inv", inv[i], r, 1e-6);
                close(w + " active", active[i], act ? 1.0 : 0.0, 0.0);
                for (int j = 0; j < d; ++j)
                    close(w + " hat", hat[i * d + j], logical[i * d + j] * r, 1e-6, 1e-30);
            }
        }
    }
}

static void check_row_pass() {
    const float scale = 1.0f / 0.07f;
    int cases = 0;
    for (int b : {1, 2, 5, 70, 150}) {
        for (int nblk = 1; nblk <= 3; ++nblk) {
            for (int inc = 0; inc <= 1; ++inc) {
                if (b == 1 && !inc) continue;  // no negatives: rejected before the kernel
                for (int want_grad = 0; want_grad <= 1; ++want_grad) {
                    const unsigned threads = (cases % 5 == 0) ? 256 : (cases % 3 == 0 ? 32 : 64);
                    ++cases;
                    const float wb = (nblk == 2 ? 0.5f : 1.0f) / b;
                    std::vector<std::vector<float>> x(3, std::vector<float>(b * b));
                    for (auto& blk : x)
                        for (auto& v : blk) v = uniform(-1.0f, 1.0f);
                    // Same-batch blocks have a large diagonal (cos(x, x) = 1): it must be masked.
                    for (int blk = 1; blk < 3; ++blk)
                        for (int i = 0; i < b; ++i) x[blk][i * b + i] = 1.0f;
                    const std::vector<float> x0_before = x[0];
                    std::vector<std::vector<float>> g(3, std::vector<float>(b * b, NAN));
                    std::vector<float> loss(b, NAN), gx(b, NAN);
                    // Unused slots get x0, as the host code passes them.
                    float* gp[3] = {g[0].data(), nblk > 1 ? g[1].data() : x[0].data(),
                                    nblk > 2 ? g[2].data() : x[0].data()};
                    emu::launch(b, threads, [&] {
                        cz_row_pass(x[0].data(), x[1].data(), x[2].data(), nblk, gp[0], gp[1], gp[2],
                                    want_grad, b, scale, inc, wb, loss.data(), gx.data());
                    });
                    const std::string w = "row_pass b=" + std::to_string(b) + " nblk=" +
                                          std::to_string(nblk) + " inc=" + std::to_string(inc) +
                                          " grad=" + std::to_string(want_grad) + " threads=" +
                                          std::to_string(threads);
                    close(w + " x0 untouched", x[0] == x0_before ? 1 : 0, 1, 0);
                    for (int i = 0; i < b; ++i) {
                        auto masked = [&](int blk, int j) { return j == i && (blk > 0 || !inc); };
                        double m = -INFINITY;
                        for (int blk = 0; blk < nblk; ++blk)
                            for (int j = 0; j < b; ++j)
                                if (!masked(blk, j)) m = std::max(m, (double)x[blk][i * b + j] * scale);
                        double sum = 0;
                        for (int blk = 0; blk < nblk; ++blk)
                            for (int j = 0; j < b; ++j)
                                if (!masked(blk, j)) sum += std::exp((double)x[blk][i * b + j] * scale - m);
                        const double pos = (double)x[0][i * b + i] * scale;
                        const double row_loss = wb * (m + std::log(sum) - pos);
                        double row_gx = 0;
                        for (int blk = 0; blk < nblk; ++blk) {
                            for (int j = 0; j < b; ++j) {
                                const double v = (double)x[blk][i * b + j] * scale;
                                double want = masked(blk, j) ? 0.0 : wb * std::exp(v - m) / sum;
                                if (blk == 0 && j == i) want -= wb;
                                row_gx += want * v;
                                if (want_grad)
                                    close(w + " G[" + std::to_string(blk) + "][" + std::to_string(i) +
                                              "," + std::to_string(j) + "]",
                                          g[blk][i * b + j], want, 1e-5, wb);
                            }
                        }
                        close(w + " loss row " + std::to_string(i), loss[i], row_loss, 2e-6);
                        close(w + " gx row " + std::to_string(i), gx[i], row_gx, 2e-5, wb * scale);
                    }
                }
            }
        }
    }
}

static void check_finish() {
    for (int n : {1, 5, 3000}) {
        std::vector<float> l(n), g(n);
        double sl = 0, sg = 0;
        for (int i = 0; i < n; ++i) {
            l[i] = uniform(0.0f, 1.0f);
            g[i] = uniform(-1.0f, 1.0f);
            sl += l[i];
            sg += g[i];
        }
        float loss = NAN, gx = NAN;
        emu::launch(1, 1024, [&] { cz_finish(l.data(), g.data(), n, &loss, &gx); });
        close("finish loss n=" + std::to_string(n), loss, sl, 1e-5);
        close("finish gx n=" + std::to_string(n), gx, sg, 1e-5);
    }
}

static void check_elementwise() {
    for (int b : {1, 7, 50}) {
        std::vector<float> a(b * b), c(b * b), out(b * b, NAN);
        for (auto& v : a) v = uniform(-1, 1);
        for (auto& v : c) v = uniform(-1, 1);
        for (int has_c = 0; has_c <= 1; ++has_c) {
            // 3 blocks of 64 threads: fewer than b² for b = 50, so the grid-stride loop runs.
            emu::launch(3, 64, [&] { cz_sym_add(a.data(), c.data(), has_c, b, out.data()); });
            for (int i = 0; i < b; ++i)
                for (int j = 0; j < b; ++j) {
                    double want = (double)a[i * b + j] + a[j * b + i];
                    if (has_c) want += (double)c[i * b + j] + c[j * b + i];
                    close("sym_add b=" + std::to_string(b), out[i * b + j], want, 1e-6);
                }
        }
        std::vector<float> acc = c;
        emu::launch(3, 64, [&] { cz_add_transposed(a.data(), b, acc.data()); });
        for (int i = 0; i < b; ++i)
            for (int j = 0; j < b; ++j)
                close("add_transposed b=" + std::to_string(b), acc[i * b + j],
                      (double)c[i * b + j] + a[j * b + i], 1e-6);
    }
}

static void check_norm_backward() {
    for (int d : {5, 300}) {
        const int b = 4;
        std::vector<float> hat(b * d), inv(b), active(b), dx(b * d);
        for (int i = 0; i < b; ++i) {
            double n = 0;
            for (int j = 0; j < d; ++j) {
                hat[i * d + j] = uniform(-1, 1);
                n += (double)hat[i * d + j] * hat[i * d + j];
            }
            for (int j = 0; j < d; ++j) hat[i * d + j] /= (float)std::sqrt(n);
            inv[i] = uniform(0.1f, 3.0f);
            active[i] = (i % 2 == 0) ? 1.0f : 0.0f;
        }
        for (auto& v : dx) v = uniform(-1, 1);
        const std::vector<float> g = dx;
        emu::launch(b, 64, [&] { cz_norm_backward(hat.data(), inv.data(), active.data(), d, dx.data()); });
        for (int i = 0; i < b; ++i) {
            double p = 0;
            for (int j = 0; j < d; ++j) p += (double)hat[i * d + j] * g[i * d + j];
            for (int j = 0; j < d; ++j) {
                const double want = active[i] != 0.0f
                                        ? ((double)g[i * d + j] - hat[i * d + j] * p) * inv[i]
                                        : (double)g[i * d + j] * inv[i];
                close("norm_backward d=" + std::to_string(d) + " row " + std::to_string(i),
                      dx[i * d + j], want, 1e-5);
            }
        }
    }
}

int main() {
    check_load_normalize<float>("load_normalize_f32", cz_load_normalize_f32, [](float f) { return f; });
    check_load_normalize<__half>("load_normalize_f16", cz_load_normalize_f16, to_half);
    check_load_normalize<__nv_bfloat16>("load_normalize_bf16", cz_load_normalize_bf16, to_bf16);
    check_row_pass();
    check_finish();
    check_elementwise();
    check_norm_backward();
    std::printf("%ld checks, %d failures\n", checks, failures);
    return failures == 0 ? 0 : 1;
}
