// Runs every kernel of src/ops/cuda/ops.cu (LayerNorm, scaled masked softmax, GELU, dropout, AdamW) in
// the CPU emulator (emu.h) against double-precision references written from the formulas of the
// CPU kernels in src/ops/*.rs and src/train/optimizer.rs, and the dropout masks against a host
// Philox4x32-10 in the CPU kernel's counter/key layout. Built and run by
// tests/it/cuda_kernels_emulated.rs; by hand:
//   c++ -std=c++20 -O1 -Itests/cuda_emu/include tests/cuda_emu/check_ops.cpp -o /tmp/check_ops
//   /tmp/check_ops
#include "emu.h"
// The kernels under test, compiled for the host.
#include "../../src/ops/cuda/ops.cu"

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
        if (failures < 25 || getenv("EMU_ALL")) std::printf("FAIL %s: got %.9g want %.9g\n", what.c_str(), got, want);
        ++failures;
    }
}

static void expect(const std::string& what, bool ok) {
    ++checks;
    if (!ok) {
        if (failures < 25 || getenv("EMU_ALL")) std::printf("FAIL %s\n", what.c_str());
        ++failures;
    }
}

static std::mt19937_64 rng(20261201);
// Multiples of 1/64 in [-4, 4]: exact in f32, f16 and bf16.
static float grid_value() { return (float)std::uniform_int_distribution<int>(-256, 256)(rng) / 64.0f; }
static float uniform(float lo, float hi) { return std::uniform_real_distribution<float>(lo, hi)(rng); }

// The storage types, with the tolerance of one rounding to them (relative) and the absolute
// error of a rounding to a subnormal (f16 only: bf16 has f32's exponent range).
struct F32 {
    using T = float;
    static constexpr const char* name = "f32";
    static constexpr double tol = 2e-5;
    static constexpr double quantum = 0.0;
    static T from(float f) { return f; }
};
struct F16 {
    using T = __half;
    static constexpr const char* name = "f16";
    static constexpr double tol = 2e-3;
    static constexpr double quantum = 5.96e-8;  // 2^-24
    static T from(float f) { return __float2half_rn(f); }
};
struct BF16 {
    using T = __nv_bfloat16;
    static constexpr const char* name = "bf16";
    static constexpr double tol = 1.6e-2;
    static constexpr double quantum = 0.0;
    static T from(float f) { return __float2bfloat16_rn(f); }
};

static float as_f32(float x) { return x; }
static float as_f32(__half x) { return __half2float(x); }
static float as_f32(__nv_bfloat16 x) { return __bfloat162float(x); }

// The kernels of one storage type, by name.
#define KERNELS(SUFFIX)                                                  \
    struct K_##SUFFIX {                                                  \
        static constexpr auto ln_fwd = ln_fwd_##SUFFIX;                  \
        static constexpr auto ln_bwd = ln_bwd_##SUFFIX;                  \
        static constexpr auto ln_bwd_reduce = ln_bwd_reduce_##SUFFIX;    \
        static constexpr auto softmax_fwd = softmax_fwd_##SUFFIX;        \
        static constexpr auto softmax_bwd = softmax_bwd_##SUFFIX;        \
        static constexpr auto gelu_fwd = gelu_fwd_##SUFFIX;              \
        static constexpr auto gelu_bwd = gelu_bwd_##SUFFIX;              \
        static constexpr auto dropout = dropout_##SUFFIX;                \
        static constexpr auto adamw = adamw_##SUFFIX;                    \
    };
KERNELS(f32)
KERNELS(f16)
KERNELS(bf16)

template <typename S>
static std::vector<typename S::T> store(const std::vector<float>& v) {
    std::vector<typename S::T> out(v.size());
    for (size_t i = 0; i < v.size(); ++i) out[i] = S::from(v[i]);
    return out;
}

template <typename T>
static std::vector<double> load(const std::vector<T>& v) {
    std::vector<double> out(v.size());
    for (size_t i = 0; i < v.size(); ++i) out[i] = as_f32(v[i]);
    return out;
}

// ---------------------------------------------------------------------------------------------

template <typename S, typename K>
static void check_layer_norm() {
    using T = typename S::T;
    int cases = 0;
    for (int hidden : {1, 37, 300, 1024}) {
        for (unsigned threads : {32u, 128u, 1024u}) {
            if (threads == 1024 && hidden < 1024) continue;
            const int rows = 7;
            const float eps = 1e-5f;
            std::vector<float> xf(rows * hidden), wf(hidden), bf(hidden), gf(rows * hidden);
            for (auto& v : xf) v = grid_value();
            for (auto& v : wf) v = grid_value();
            for (auto& v : bf) v = grid_value();
            for (auto& v : gf) v = grid_value();
            // A constant row: variance 0, x̂ = 0.
            for (int i = 0; i < hidden; ++i) xf[3 * hidden + i] = 1.5f;
            auto x = store<S>(xf), w = store<S>(wf), b = store<S>(bf), g = store<S>(gf);
            std::vector<T> y(rows * hidden);
            std::vector<float> mean(rows, NAN), rstd(rows, NAN);
            emu::launch(rows, threads, [&] {
                K::ln_fwd(x.data(), w.data(), b.data(), hidden, eps, y.data(), mean.data(),
                          rstd.data());
            });
            const std::string what = std::string("layer_norm ") + S::name + " hidden=" +
                                     std::to_string(hidden) + " threads=" + std::to_string(threads);
            // Double references.
            std::vector<double> mu(rows), rs(rows);
            for (int r = 0; r < rows; ++r) {
                double s = 0, ss = 0;
                for (int i = 0; i < hidden; ++i) s += xf[r * hidden + i];
                mu[r] = s / hidden;
                for (int i = 0; i < hidden; ++i) ss += std::pow(xf[r * hidden + i] - mu[r], 2);
                rs[r] = 1.0 / std::sqrt(ss / hidden + eps);
                close(what + " mean", mean[r], mu[r], 1e-6);
                close(what + " rstd", rstd[r], rs[r], 1e-5);
                for (int i = 0; i < hidden; ++i) {
                    const double want = (xf[r * hidden + i] - mu[r]) * rs[r] * wf[i] + bf[i];
                    close(what + " y", as_f32(y[r * hidden + i]), want, S::tol, 4.0);
                }
            }
            // Backward, from the kernel's own statistics, with chunks of 1, 3 and 7 rows.
            const int rpb = cases % 3 == 0 ? 1 : (cases % 3 == 1 ? 3 : 7);
            ++cases;
            const int blocks = (rows + rpb - 1) / rpb;
            std::vector<T> packed(rows * hidden + 2 * hidden);
            std::vector<float> partial(blocks * 2 * hidden, NAN);
            emu::launch(blocks, threads, [&] {
                K::ln_bwd(x.data(), w.data(), g.data(), mean.data(), rstd.data(), rows, rpb,
                          hidden, packed.data(), partial.data());
            });
            // Fewer threads than columns for hidden = 1024: the grid-stride loop runs.
            emu::launch(2, 256, [&] {
                K::ln_bwd_reduce(partial.data(), blocks, hidden, packed.data() + rows * hidden,
                                 packed.data() + rows * hidden + hidden);
            });
            std::vector<double> dw(hidden, 0.0), db(hidden, 0.0);
            const std::string bw = what + " rows_per_block=" + std::to_string(rpb);
            for (int r = 0; r < rows; ++r) {
                double a = 0, c = 0, mag = 0;
                auto xhat = [&](int i) { return (xf[r * hidden + i] - mu[r]) * rs[r]; };
                for (int i = 0; i < hidden; ++i) {
                    a += (double)gf[r * hidden + i] * wf[i];
                    c += (double)gf[r * hidden + i] * wf[i] * xhat(i);
                }
                a /= hidden;
                c /= hidden;
                for (int i = 0; i < hidden; ++i) {
                    const double gi = gf[r * hidden + i];
                    const double want = rs[r] * (gi * wf[i] - a - xhat(i) * c);
                    mag = std::max(mag, std::fabs(rs[r] * gi * wf[i]));
                    dw[i] += gi * xhat(i);
                    db[i] += gi;
                    close(bw + " dx", as_f32(packed[r * hidden + i]), want, S::tol,
                          std::max(mag, 16.0));
                }
            }
            for (int i = 0; i < hidden; ++i) {
                close(bw + " dweight", as_f32(packed[rows * hidden + i]), dw[i], S::tol, 16.0);
                close(bw + " dbias", as_f32(packed[rows * hidden + hidden + i]), db[i], S::tol, 16.0);
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------

// x: [2, 3, 2, 2, n] (four leading dims); masks of every broadcast pattern below.
struct MaskCase {
    const char* name;
    std::vector<int> dims;  // the mask's shape, aligned right against x's
};

template <typename S, typename K>
static void check_softmax() {
    using T = typename S::T;
    const std::vector<int> lead = {2, 3, 2, 2};
    const std::vector<MaskCase> masks = {
        {"none", {}},
        {"[2,1,1,1,n]", {2, 1, 1, 1, 0}},
        {"[n]", {0}},
        {"[2,2,n]", {2, 2, 0}},
        {"[2,3,2,2,1]", {2, 3, 2, 2, 1}},
        {"[3,1,n]", {3, 1, 0}},
    };
    int cases = 0;
    for (int n : {1, 37, 300, 1024}) {
        for (const auto& mc : masks) {
            // 1024 threads once per type (the emulator's cost grows with threads x barriers).
            const bool full = n == 1024 && mc.dims.size() == 5 && mc.dims[0] == 2;
            const unsigned threads = full ? 1024 : (cases % 2 == 0 ? 32 : 256);
            ++cases;
            const int rows = 2 * 3 * 2 * 2;
            const float scale = cases % 2 ? 0.125f : 1.0f / std::sqrt(37.0f);
            std::vector<int> md = mc.dims;
            for (auto& d : md)
                if (d == 0) d = n;
            const bool has_mask = !md.empty();
            // Mask strides along x's 5 dims (0 where broadcast), as `check` in softmax.rs.
            const int rank = 5, mlead = rank - (int)md.size();
            std::vector<int64_t> strides(rank, 0);
            int64_t stride = 1, mlen = 1;
            for (int d = (int)md.size() - 1; d >= 0; --d) {
                if (md[d] != 1) strides[mlead + d] = stride;
                stride *= md[d];
            }
            mlen = has_mask ? stride : 1;
            std::vector<float> xf(rows * n), mf(mlen), gf(rows * n);
            for (auto& v : xf) v = grid_value() * 2.0f;
            for (auto& v : gf) v = grid_value();
            for (size_t i = 0; i < mf.size(); ++i)
                mf[i] = (i % 5 == 1) ? -10000.0f : grid_value();  // BERT's padding value too
            auto x = store<S>(xf), m = store<S>(mf), g = store<S>(gf);
            const T* mp = has_mask ? m.data() : x.data();
            std::vector<T> y(rows * n);
            emu::launch(rows, threads, [&] {
                K::softmax_fwd(x.data(), mp, has_mask, n, strides[4], lead[0], lead[1], lead[2],
                               lead[3], strides[0], strides[1], strides[2], strides[3], scale,
                               y.data());
            });
            const std::string what = std::string("softmax ") + S::name + " n=" + std::to_string(n) +
                                     " mask=" + mc.name + " threads=" + std::to_string(threads);
            const auto mq = load(m);  // the mask as the kernel reads it
            std::vector<double> yref(rows * n);
            for (int r = 0; r < rows; ++r) {
                int64_t off = 0, rem = r;
                for (int k = 3; k >= 0; --k) {
                    off += (rem % lead[k]) * strides[k];
                    rem /= lead[k];
                }
                std::vector<double> z(n);
                double mx = -INFINITY;
                for (int j = 0; j < n; ++j) {
                    z[j] = (double)scale * as_f32(x[r * n + j]) + (has_mask ? mq[off + j * strides[4]] : 0.0);
                    mx = std::max(mx, z[j]);
                }
                double sum = 0;
                for (int j = 0; j < n; ++j) sum += std::exp(z[j] - mx);
                for (int j = 0; j < n; ++j) {
                    yref[r * n + j] = std::exp(z[j] - mx) / sum;
                    close(what + " y", as_f32(y[r * n + j]), yref[r * n + j], S::tol,
                          std::max(1e-4, S::quantum / S::tol));
                }
            }
            // Backward from the kernel's y.
            std::vector<T> dx(rows * n);
            emu::launch(rows, threads, [&] { K::softmax_bwd(y.data(), g.data(), n, scale, dx.data()); });
            for (int r = 0; r < rows; ++r) {
                double dot = 0, mag = 0;
                for (int j = 0; j < n; ++j) {
                    dot += (double)as_f32(g[r * n + j]) * as_f32(y[r * n + j]);
                    mag += std::fabs((double)as_f32(g[r * n + j]) * as_f32(y[r * n + j]));
                }
                for (int j = 0; j < n; ++j) {
                    const double yj = as_f32(y[r * n + j]), gj = as_f32(g[r * n + j]);
                    const double want = scale * yj * (gj - dot);
                    // The error of the float dot product, carried by y_j.
                    const double floor =
                        std::max(scale * yj * (std::fabs(gj) + mag), S::quantum / S::tol) + 1e-30;
                    close(what + " dx", as_f32(dx[r * n + j]), want, S::tol, floor);
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------

template <typename S, typename K>
static void check_gelu() {
    using T = typename S::T;
    std::vector<float> xf;
    for (int i = -640; i <= 640; ++i) xf.push_back(i / 64.0f);  // [-10, 10]
    for (int i = 0; i < 500; ++i) xf.push_back(uniform(-6.0f, 6.0f));
    std::vector<float> gf(xf.size());
    for (auto& v : gf) v = grid_value();
    auto x = store<S>(xf), g = store<S>(gf);
    const int64_t n = (int64_t)x.size();
    for (int form : {0, 1}) {
        std::vector<T> y(n), dx(n);
        // 3 blocks of 64 threads: fewer than n, so the grid-stride loop runs.
        emu::launch(3, 64, [&] { K::gelu_fwd(x.data(), n, form, y.data()); });
        emu::launch(3, 64, [&] { K::gelu_bwd(x.data(), g.data(), n, form, dx.data()); });
        const std::string what = std::string("gelu ") + S::name + (form ? " tanh" : " erf");
        for (int64_t i = 0; i < n; ++i) {
            const double v = as_f32(x[i]), gi = as_f32(g[i]);
            double val, slope;
            if (form == 0) {
                const double cdf = 0.5 * (1.0 + std::erf(v / std::sqrt(2.0)));
                const double pdf = std::exp(-0.5 * v * v) / std::sqrt(2.0 * M_PI);
                val = v * cdf;
                slope = cdf + v * pdf;
            } else {
                const double k = std::sqrt(2.0 / M_PI), c = 0.044715;
                const double t = std::tanh(k * (v + c * v * v * v));
                val = 0.5 * v * (1.0 + t);
                slope = 0.5 * (1.0 + t) + 0.5 * v * (1.0 - t * t) * k * (1.0 + 3.0 * c * v * v);
            }
            // Absolute near 0: 1 + erf(x) cancels for very negative x (in f32 as on the CPU).
            close(what + " y at " + std::to_string(v), as_f32(y[i]), val, S::tol, 0.1);
            close(what + " dx at " + std::to_string(v), as_f32(dx[i]), gi * slope, S::tol,
                  std::max(0.1, std::fabs(gi)));
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Host Philox4x32-10, written from the paper (64-bit products), and the CPU kernel's layout.

static void philox_ref(uint32_t ctr[4], uint32_t key[2], uint32_t out[4]) {
    uint32_t c[4] = {ctr[0], ctr[1], ctr[2], ctr[3]}, k0 = key[0], k1 = key[1];
    for (int round = 0; round < 10; ++round) {
        const uint64_t p0 = (uint64_t)0xD2511F53u * c[0], p1 = (uint64_t)0xCD9E8D57u * c[2];
        const uint32_t n0 = (uint32_t)(p1 >> 32) ^ c[1] ^ k0, n1 = (uint32_t)p1;
        const uint32_t n2 = (uint32_t)(p0 >> 32) ^ c[3] ^ k1, n3 = (uint32_t)p0;
        c[0] = n0, c[1] = n1, c[2] = n2, c[3] = n3;
        k0 += 0x9E3779B9u;
        k1 += 0xBB67AE85u;
    }
    for (int i = 0; i < 4; ++i) out[i] = c[i];
}

// Whether entry j of global sample `sample` survives (dropout.rs, `for_each_keep`).
static bool keep_ref(uint64_t seed, uint64_t step, uint64_t sample, uint32_t site, int64_t j,
                     uint32_t threshold) {
    uint32_t ctr[4] = {(uint32_t)(j / 4), site, (uint32_t)sample, (uint32_t)step};
    uint32_t key[2] = {(uint32_t)seed ^ (uint32_t)(sample >> 32),
                       (uint32_t)(seed >> 32) ^ (uint32_t)(step >> 32)};
    uint32_t out[4];
    philox_ref(ctr, key, out);
    return out[j % 4] >= threshold;
}

static void check_philox_known_answers() {
    // Random123's known-answer vectors (kat_vectors, philox4x32_10), as in tests/it/ops.rs.
    const uint32_t cases[3][10] = {
        {0, 0, 0, 0, 0, 0, 0x6627e8d5, 0xe169c58d, 0xbc57ac4c, 0x9b00dbd8},
        {~0u, ~0u, ~0u, ~0u, ~0u, ~0u, 0x408f276d, 0x41c83b0e, 0xa20bc7c6, 0x6d5451fd},
        {0x243f6a88, 0x85a308d3, 0x13198a2e, 0x03707344, 0xa4093822, 0x299f31d0, 0xd16cfe09,
         0x94fdcceb, 0x5001e420, 0x24126ea1},
    };
    for (int c = 0; c < 3; ++c) {
        const auto* v = cases[c];
        const mlctl::Philox4 dev = mlctl::philox4x32_10(v[0], v[1], v[2], v[3], v[4], v[5]);
        uint32_t ctr[4] = {v[0], v[1], v[2], v[3]}, key[2] = {v[4], v[5]}, host[4];
        philox_ref(ctr, key, host);
        for (int i = 0; i < 4; ++i) {
            expect("philox kernel known answer " + std::to_string(c), dev.w[i] == v[6 + i]);
            expect("philox reference known answer " + std::to_string(c), host[i] == v[6 + i]);
        }
    }
}

template <typename S, typename K>
static void check_dropout() {
    using T = typename S::T;
    struct Case {
        int rows, row_len;
        float p;
        uint64_t seed, step, offset;
        uint32_t site;
    };
    const Case cases[] = {
        {3, 1, 0.1f, 7, 0, 0, 0},
        {4, 37, 0.1f, 42, 3, 0, 5},
        {2, 300, 0.5f, 0x123456789abcdefull, 0xfedcba9876543210ull, 5, 11},
        {2, 1024, 0.25f, 1, 1, 0xffffffffull, 2},  // samples cross 2^32: the key's high words
        {5, 6, 0.0f, 9, 9, 9, 9},
    };
    for (const auto& c : cases) {
        const int64_t n = (int64_t)c.rows * c.row_len;
        std::vector<float> xf(n);
        for (auto& v : xf) {
            do v = grid_value();
            while (v == 0.0f);  // nonzero inputs: a zero output means dropped
        }
        auto x = store<S>(xf);
        const uint32_t threshold =
            (uint32_t)std::min(std::round((double)c.p * 4294967296.0), 4294967295.0);
        const float scale = (float)(1.0 / (1.0 - (double)c.p));
        std::vector<T> y(n);
        emu::launch(2, 64, [&] {
            K::dropout(x.data(), c.rows, c.row_len, c.seed, c.step, c.offset, c.site, threshold,
                       scale, y.data());
        });
        const std::string what = std::string("dropout ") + S::name + " row_len=" +
                                 std::to_string(c.row_len) + " p=" + std::to_string(c.p);
        int64_t kept = 0, mismatched = 0;
        for (int r = 0; r < c.rows; ++r) {
            for (int j = 0; j < c.row_len; ++j) {
                const bool keep = keep_ref(c.seed, c.step, c.offset + r, c.site, j, threshold);
                const double got = as_f32(y[r * c.row_len + j]);
                kept += keep;
                mismatched += keep != (got != 0.0);
                if (keep)
                    close(what + " kept value", got, (double)xf[r * c.row_len + j] * scale, S::tol);
            }
        }
        expect(what + " mask equals the host Philox reference (" + std::to_string(mismatched) +
                   " mismatches)",
               mismatched == 0);
        if (n >= 600) {
            const double rate = 1.0 - (double)kept / n;
            close(what + " drop rate", rate, c.p, 0.1 / std::max(c.p, 0.1f), c.p);
        }
        // A batch split in two chunks with their sample offsets gives the same output.
        if (c.rows >= 2) {
            std::vector<T> y2(n);
            const int first = c.rows / 2;
            emu::launch(1, 32, [&] {
                K::dropout(x.data(), first, c.row_len, c.seed, c.step, c.offset, c.site,
                           threshold, scale, y2.data());
            });
            emu::launch(3, 32, [&] {
                K::dropout(x.data() + (int64_t)first * c.row_len, c.rows - first, c.row_len,
                           c.seed, c.step, c.offset + first, c.site, threshold, scale,
                           y2.data() + (int64_t)first * c.row_len);
            });
            bool same = true;
            for (int64_t i = 0; i < n; ++i) same &= as_f32(y[i]) == as_f32(y2[i]);
            expect(what + " chunked batch equals the whole batch", same);
        }
    }
}

// ---------------------------------------------------------------------------------------------

template <typename S, typename K>
static void check_adamw() {
    using T = typename S::T;
    const bool half = !std::is_same_v<T, float>;
    for (int with_master : {0, 1}) {
        if (with_master && !half) continue;  // f32 parameters have no master copy
        for (int has_decay : {0, 1}) {
            const int64_t n = 1000;
            std::vector<float> pf(n), m(n, 0.0f), v(n, 0.0f);
            for (auto& x : pf) x = uniform(-1.0f, 1.0f);
            auto p = store<S>(pf);
            std::vector<float> master(n);
            for (int64_t i = 0; i < n; ++i) master[i] = as_f32(p[i]);
            const std::vector<float> master0 = master;
            std::vector<double> wref(master.begin(), master.end()), mref(n, 0.0), vref(n, 0.0);
            const double beta1 = 0.9, beta2 = 0.999, eps = 1e-3, wd = 0.01;
            const std::string what = std::string("adamw ") + S::name + " master=" +
                                     std::to_string(with_master) + " decay=" +
                                     std::to_string(has_decay);
            for (int step = 1; step <= 4; ++step) {
                const double lr = 1e-2 * step;
                const double ic1 = 1.0 / (1.0 - std::pow(beta1, step));
                const double ic2 = 1.0 / (1.0 - std::pow(beta2, step));
                std::vector<float> gf(n);
                for (auto& x : gf) x = uniform(-2.0f, 2.0f);
                gf[0] = 0.0f;
                auto g = store<S>(gf);
                // Without a master copy the parameter itself is the starting point.
                if (!with_master)
                    for (int64_t i = 0; i < n; ++i) wref[i] = as_f32(p[i]);
                const double decay = 1.0 - lr * wd;
                emu::launch(3, 64, [&] {
                    K::adamw(p.data(), g.data(), m.data(), v.data(), master.data(), with_master, n,
                             (float)beta1, (float)(1.0 - beta1), (float)beta2,
                             (float)(1.0 - beta2), (float)eps, (float)ic1, (float)ic2, (float)lr,
                             (float)decay, has_decay);
                });
                for (int64_t i = 0; i < n; ++i) {
                    const double gi = as_f32(g[i]);
                    const double m_old = mref[i], v_old = vref[i];
                    mref[i] = beta1 * mref[i] + (1.0 - beta1) * gi;
                    vref[i] = beta2 * vref[i] + (1.0 - beta2) * gi * gi;
                    double w = wref[i];
                    if (has_decay) w *= decay;
                    w -= lr * (mref[i] * ic1) / (std::sqrt(vref[i] * ic2) + eps);
                    wref[i] = w;
                    const std::string at = what + " step " + std::to_string(step);
                    // Relative to the terms' size: the two terms of m can cancel.
                    close(at + " m", m[i], mref[i], 1e-6, std::fabs(m_old * beta1) + std::fabs(gi));
                    close(at + " v", v[i], vref[i], 1e-6, v_old + gi * gi);
                    close(at + " param", as_f32(p[i]), w, S::tol, 1.0);
                    if (with_master) close(at + " master", master[i], w, 2e-6, 1.0);
                    // Go on from the kernel's moments: each step is checked on its own.
                    mref[i] = m[i], vref[i] = v[i];
                }
            }
            if (!with_master) {
                // The master buffer must be left alone when there is none.
                expect(what + " master buffer untouched", master == master0);
            }
        }
    }
}

// Rows masked with -inf everywhere give zeros and a zero gradient (the CPU kernels' rule); the
// other rows of the same launch (partly -inf) stay a softmax over their live entries.
template <typename S, typename K>
static void check_softmax_fully_masked() {
    using T = typename S::T;
    const int n = 40, rows = 4;
    for (unsigned threads : {32u, 64u}) {
        std::vector<float> xf(rows * n), mf(rows * n), gf(rows * n);
        for (auto& v : xf) v = grid_value();
        for (auto& v : gf) v = grid_value();
        for (int r = 0; r < rows; ++r)
            for (int j = 0; j < n; ++j)
                mf[r * n + j] = (r % 2 == 0 || j % 3 == 0) ? -INFINITY : 0.0f;
        auto x = store<S>(xf), m = store<S>(mf), g = store<S>(gf);
        std::vector<T> y(rows * n), dx(rows * n);
        // Mask [rows, n]: row r's mask at r * n (d3 = rows, s3 = n), columns contiguous.
        emu::launch(rows, threads, [&] {
            K::softmax_fwd(x.data(), m.data(), 1, n, 1, 1, 1, 1, rows, 0, 0, 0, n, 1.0f, y.data());
        });
        emu::launch(rows, threads, [&] { K::softmax_bwd(y.data(), g.data(), n, 1.0f, dx.data()); });
        const std::string what = std::string("softmax fully masked ") + S::name;
        for (int r = 0; r < rows; ++r) {
            double sum = 0;
            bool zeros = true;
            for (int j = 0; j < n; ++j) {
                const double yj = as_f32(y[r * n + j]), dj = as_f32(dx[r * n + j]);
                sum += yj;
                if (r % 2 == 0 || j % 3 == 0) zeros = zeros && yj == 0.0;
                if (r % 2 == 0) zeros = zeros && dj == 0.0;
            }
            expect(what + " row " + std::to_string(r) + " zeros where masked", zeros);
            if (r % 2 == 1) close(what + " row " + std::to_string(r) + " sum", sum, 1.0, S::tol * n);
        }
    }
}

template <typename S, typename K>
static void check_type() {
    check_layer_norm<S, K>();
    check_softmax<S, K>();
    check_softmax_fully_masked<S, K>();
    check_gelu<S, K>();
    check_dropout<S, K>();
    check_adamw<S, K>();
}

int main() {
    check_philox_known_answers();
    check_type<F32, K_f32>();
    check_type<F16, K_f16>();
    check_type<BF16, K_bf16>();
    std::printf("%ld checks, %d failures\n", checks, failures);
    return failures == 0 ? 0 : 1;
}
