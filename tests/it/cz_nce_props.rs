//! Property tests of CZ-NCE over random shapes, options, temperatures and inputs: invariance to
//! permuting the pairs, the symmetric variants, finiteness at extreme temperatures and logits in
//! f16 and bf16, and the fused path against the composite one (values and gradients).
//!
//! # Tolerances
//!
//! Every tolerance is a bound on the rounding error of the arithmetic, in units of the compute
//! dtype's unit roundoff `u` (2^-24 for f32, and for f16/bf16 inputs, which are computed in f32;
//! 2^-53 for f64), so it holds for any correct evaluation order: another GEMM kernel (AVX2,
//! AVX-512), blocking or thread count. With `s = 1/t`, `D` the row length and `B` the batch,
//! and rows of norm in `[0.5, 2]` (so the normalization is well conditioned):
//!
//! - a normalized row has a relative error `<= (D + 2) u` (a `D`-term sum, a square root and a
//!   division), so a cosine (a `D`-term dot product of such rows) is off by at most
//!   `3 (D + 2) u` and a logit by `3 (D + 2) u s`;
//! - a max-subtracted log-sum-exp over `n <= 3B` entries adds `(n + 2) u` (the exponentials,
//!   the sum of positive terms, the logarithm); the mean over the rows and the symmetric
//!   average add `(B + 1) u |L|`. That is the bound `e` of one path, [`loss_error`]; two
//!   evaluations differ by at most `2e`;
//! - a softmax weight inherits twice the logit error `d` relatively; the gradient with respect
//!   to a normalized row sums weights times rows scaled by `s / B` over the row's own softmax
//!   rows and over the columns it occupies in the others' (at most 3 blocks, 2 directions), so
//!   its error is at most `12 s d`; the normalization's backward multiplies it by
//!   `1 / |x| <= 2` and rounds the result relatively by `(D + 4) u`. That is
//!   [`grad_error`], again doubled for two evaluations.
//!
//! Every bound is multiplied by a slack of 4 for the constant number of operations counted
//! once (the scaling by `s`, conversions, the final division by `B`), which the derivation
//! treats as exact: the tolerances stay first-order in `u`, far below what a wrong result
//! (a missing term, a transposed block, a zero gradient) moves.

use candle_core::{DType, Device, Tensor, Var};
use mlctl::loss::CzNce;
use proptest::prelude::*;

type R<T> = std::result::Result<T, Box<dyn std::error::Error>>;

/// Slack over the first-order rounding bounds (see the module docs).
const SLACK: f64 = 4.0;

/// The unit roundoff of the dtype the loss is computed in.
fn unit_roundoff(dtype: DType) -> f64 {
    match dtype {
        DType::F64 => f64::EPSILON / 2.0,
        // f32, and f16/bf16 inputs, which both paths convert to f32 first.
        _ => f64::from(f32::EPSILON) / 2.0,
    }
}

/// The logit error `d` of one evaluation: `3 (D + 2) u s` from the cosines and
/// `(3B + 2) u` from the log-sum-exp.
fn logit_error(u: f64, b: usize, d: usize, s: f64) -> f64 {
    u * (3.0 * (d as f64 + 2.0) * s + 3.0 * b as f64 + 2.0)
}

/// Bound on the difference of the loss between two evaluations (see the module docs).
fn loss_error(u: f64, b: usize, d: usize, s: f64, loss: f64) -> f64 {
    let one = logit_error(u, b, d, s) + u * (b as f64 + 1.0) * loss.abs();
    SLACK * 2.0 * one
}

/// Bound on the difference of a gradient element between two evaluations, `g_max` the largest
/// gradient magnitude (see the module docs).
fn grad_error(u: f64, b: usize, d: usize, s: f64, g_max: f64) -> f64 {
    let one = 2.0 * 12.0 * s * logit_error(u, b, d, s) + (d as f64 + 4.0) * u * g_max;
    SLACK * 2.0 * one
}

/// Deterministic pseudo-random normal-ish values (sum of uniforms).
fn randn(seed: u64, n: usize) -> Vec<f64> {
    let mut s = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    let mut next = || {
        s = s
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((s >> 11) as f64) / ((1u64 << 53) as f64)
    };
    (0..n)
        .map(|_| (0..4).map(|_| next()).sum::<f64>() - 2.0)
        .collect()
}

/// `b` random rows of length `d`, each rescaled to a norm in `[norm_lo, norm_hi]`.
fn rows(seed: u64, b: usize, d: usize, norm_lo: f64, norm_hi: f64) -> Vec<f64> {
    let mut v = randn(seed, b * d);
    let norms = randn(seed ^ 0x5EED, b);
    for (i, row) in v.chunks_mut(d).enumerate() {
        let n = row.iter().map(|x| x * x).sum::<f64>().sqrt();
        if n < 1e-3 {
            row.iter_mut().for_each(|x| *x = 0.0);
            row[0] = 1.0;
        } else {
            row.iter_mut().for_each(|x| *x /= n);
        }
        // `norms` is in [-2, 2]: map it onto [norm_lo, norm_hi].
        let target = norm_lo + (norm_hi - norm_lo) * (norms[i] + 2.0) / 4.0;
        row.iter_mut().for_each(|x| *x *= target);
    }
    v
}

fn tensor(v: &[f64], b: usize, d: usize, dtype: DType) -> R<Tensor> {
    Ok(Tensor::from_slice(v, (b, d), &Device::Cpu)?.to_dtype(dtype)?)
}

fn to_f64(t: &Tensor) -> R<Vec<f64>> {
    Ok(t.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?)
}

/// A configuration from four option bits.
fn config(bits: u8, t: f64) -> CzNce {
    CzNce::new()
        .with_temperature(t)
        .with_positive_in_denominator(bits & 1 != 0)
        .with_anchor_negatives(bits & 2 != 0)
        .with_target_negatives(bits & 4 != 0)
        .with_symmetric(bits & 8 != 0)
}

/// Loss, `dq` and `dk` of one path.
fn eval(cfg: &CzNce, fused: bool, q: &Tensor, k: &Tensor) -> R<(f64, Vec<f64>, Vec<f64>)> {
    let (qv, kv) = (Var::from_tensor(q)?, Var::from_tensor(k)?);
    let loss = if fused {
        cfg.forward_fused(qv.as_tensor(), kv.as_tensor())?
    } else {
        cfg.forward_composite(qv.as_tensor(), kv.as_tensor())?
    };
    let grads = loss.backward()?;
    let dq = grads.get(qv.as_tensor()).ok_or("no dq")?;
    let dk = grads.get(kv.as_tensor()).ok_or("no dk")?;
    Ok((to_f64(&loss)?[0], to_f64(dq)?, to_f64(dk)?))
}

fn max_abs(v: &[f64]) -> f64 {
    v.iter().fold(0.0, |m, x| m.max(x.abs()))
}

fn max_diff(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).fold(0.0, |m, (x, y)| m.max((x - y).abs()))
}

/// Batch, row length, seed, option bits and temperature of one case; CZ-NCE proper (the
/// positive excluded) needs `B >= 2`, so the batch starts at 2.
fn case() -> impl Strategy<Value = (usize, usize, u64, u8, f64)> {
    (2usize..=8, 1usize..=16, any::<u64>(), 0u8..16, -3.0f64..0.7)
        .prop_map(|(b, d, seed, bits, log_t)| (b, d, seed, bits, log_t.exp()))
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// Permuting the pairs (the same permutation of the rows of `q` and `k`) leaves the loss
    /// unchanged and permutes the gradients' rows the same way.
    #[test]
    fn loss_is_invariant_to_permuting_the_pairs(
        (b, d, seed, bits, t) in case(),
        perm_seed in any::<u64>(),
    ) {
        let cfg = config(bits, t);
        let (qv, kv) = (rows(seed, b, d, 0.5, 2.0), rows(seed + 1, b, d, 0.5, 2.0));
        // A permutation of 0..B from sorting by random keys.
        let keys = randn(perm_seed, b);
        let mut perm: Vec<usize> = (0..b).collect();
        perm.sort_by(|&i, &j| keys[i].total_cmp(&keys[j]));
        let permute = |v: &[f64]| -> Vec<f64> {
            perm.iter().flat_map(|&i| v[i * d..(i + 1) * d].to_vec()).collect()
        };
        let dtype = DType::F32;
        let run = |q: &[f64], k: &[f64]| {
            eval(&cfg, true, &tensor(q, b, d, dtype).unwrap(), &tensor(k, b, d, dtype).unwrap())
                .unwrap()
        };
        let (l0, dq0, dk0) = run(&qv, &kv);
        let (l1, dq1, dk1) = run(&permute(&qv), &permute(&kv));
        let u = unit_roundoff(dtype);
        let s = 1.0 / t;
        prop_assert!((l0 - l1).abs() <= loss_error(u, b, d, s, l0), "loss {l0} vs {l1}");
        let tol = grad_error(u, b, d, s, max_abs(&dq0).max(max_abs(&dk0)));
        let (pq, pk) = (permute(&dq0), permute(&dk0));
        prop_assert!(max_diff(&pq, &dq1) <= tol, "dq off by {} > {tol}", max_diff(&pq, &dq1));
        prop_assert!(max_diff(&pk, &dk1) <= tol, "dk off by {} > {tol}", max_diff(&pk, &dk1));
    }

    /// The symmetric loss is the mean of the q→k loss and the k→q loss (the same options with
    /// `q` and `k` swapped), and so does not change when `q` and `k` are swapped.
    #[test]
    fn symmetric_loss_is_the_mean_of_both_directions(
        (b, d, seed, bits, t) in case(),
        fused in any::<bool>(),
    ) {
        let one_way = config(bits & 7, t);
        let both = one_way.clone().with_symmetric(true);
        let dtype = DType::F32;
        let q = tensor(&rows(seed, b, d, 0.5, 2.0), b, d, dtype).unwrap();
        let k = tensor(&rows(seed + 1, b, d, 0.5, 2.0), b, d, dtype).unwrap();
        let loss = |cfg: &CzNce, a: &Tensor, b_: &Tensor| eval(cfg, fused, a, b_).unwrap();
        let (sym, dq, dk) = loss(&both, &q, &k);
        let (qk, dq_qk, dk_qk) = loss(&one_way, &q, &k);
        let (kq, dk_kq, dq_kq) = loss(&one_way, &k, &q);
        let (swapped, dk_s, dq_s) = loss(&both, &k, &q);
        let u = unit_roundoff(dtype);
        let s = 1.0 / t;
        // The mean of two evaluations, each within its own bound.
        let tol = loss_error(u, b, d, s, qk.abs().max(kq.abs()));
        prop_assert!((sym - 0.5 * (qk + kq)).abs() <= tol, "{sym} vs ({qk} + {kq}) / 2");
        prop_assert!((sym - swapped).abs() <= tol, "{sym} vs swapped {swapped}");
        let g_max = max_abs(&dq).max(max_abs(&dk));
        let gtol = grad_error(u, b, d, s, g_max);
        let half_sum = |a: &[f64], b_: &[f64]| -> Vec<f64> {
            a.iter().zip(b_).map(|(x, y)| 0.5 * (x + y)).collect()
        };
        prop_assert!(max_diff(&dq, &half_sum(&dq_qk, &dq_kq)) <= gtol);
        prop_assert!(max_diff(&dk, &half_sum(&dk_qk, &dk_kq)) <= gtol);
        prop_assert!(max_diff(&dq, &dq_s) <= gtol && max_diff(&dk, &dk_s) <= gtol);
    }

    /// The fused op and the composite twin agree on the loss and both gradients, in f32 and
    /// f64, within the rounding bounds of the module docs.
    #[test]
    fn fused_matches_composite_over_random_shapes(
        (b, d, seed, bits, t) in case(),
        f64_ in any::<bool>(),
    ) {
        let cfg = config(bits, t);
        let dtype = if f64_ { DType::F64 } else { DType::F32 };
        let q = tensor(&rows(seed, b, d, 0.5, 2.0), b, d, dtype).unwrap();
        let k = tensor(&rows(seed + 1, b, d, 0.5, 2.0), b, d, dtype).unwrap();
        let (lf, dqf, dkf) = eval(&cfg, true, &q, &k).unwrap();
        let (lc, dqc, dkc) = eval(&cfg, false, &q, &k).unwrap();
        let u = unit_roundoff(dtype);
        let s = 1.0 / t;
        prop_assert!((lf - lc).abs() <= loss_error(u, b, d, s, lc), "loss {lf} vs {lc}");
        let tol = grad_error(u, b, d, s, max_abs(&dqc).max(max_abs(&dkc)));
        prop_assert!(max_diff(&dqf, &dqc) <= tol, "dq off by {} > {tol}", max_diff(&dqf, &dqc));
        prop_assert!(max_diff(&dkf, &dkc) <= tol, "dk off by {} > {tol}", max_diff(&dkf, &dkc));
    }

    /// In f16 and bf16, at temperatures from 1e-4 to 1e4 (logits up to 1e4 in magnitude) and
    /// inputs from 1e-3 to near the dtype's largest value, the loss of both paths and the
    /// gradients of `forward` (the fused op on the CPU, which saturates f16 gradients past the
    /// f16 range) are finite.
    #[test]
    fn half_precision_stays_finite_at_extreme_temperatures_and_logits(
        (b, d, seed, bits) in (2usize..=8, 1usize..=16, any::<u64>(), 0u8..32),
        log10_t in -4.0f64..4.0,
        log10_scale in -3.0f64..1.0,
        bf16 in any::<bool>(),
    ) {
        let (dtype, max_log10) = if bf16 { (DType::BF16, 30.0) } else { (DType::F16, 4.0) };
        let t = 10f64.powf(log10_t);
        // Unit rows for `assume_normalized` (its contract); otherwise rows of norm up to
        // 10^max_log10 times the scale (the normalization must cope with any magnitude).
        let normalized = bits & 16 != 0;
        let scale = if normalized {
            1.0
        } else {
            // log10_scale in [-3, 1) maps onto [-3, max_log10).
            10f64.powf(-3.0 + (log10_scale + 3.0) / 4.0 * (max_log10 + 3.0))
        };
        let cfg = config(bits & 15, t).with_assume_normalized(normalized);
        let q = tensor(&rows(seed, b, d, scale, scale), b, d, dtype).unwrap();
        let k = tensor(&rows(seed + 1, b, d, scale, scale), b, d, dtype).unwrap();
        let (qv, kv) = (Var::from_tensor(&q).unwrap(), Var::from_tensor(&k).unwrap());
        let loss = cfg.forward(qv.as_tensor(), kv.as_tensor()).unwrap();
        let value = to_f64(&loss).unwrap()[0];
        prop_assert!(value.is_finite(), "loss {value}");
        let grads = loss.backward().unwrap();
        for (name, v) in [("dq", &qv), ("dk", &kv)] {
            let g = grads.get(v.as_tensor()).unwrap();
            prop_assert_eq!(g.dtype(), dtype);
            let g = to_f64(g).unwrap();
            prop_assert!(g.iter().all(|x| x.is_finite()), "{} not finite: {:?}", name, g);
        }
        let composite = to_f64(&cfg.forward_composite(&q, &k).unwrap()).unwrap()[0];
        prop_assert!(composite.is_finite(), "composite loss {composite}");
    }
}
