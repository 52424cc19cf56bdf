//! Tests of the CZ-NCE loss: fused vs composite, finite differences, PyTorch golden values,
//! extreme inputs and input validation.

use candle_core::{DType, Device, Tensor, Var};
use mlctl::loss::{BackwardMode, CzNce};
use mlctl::Error;

type R<T> = std::result::Result<T, Box<dyn std::error::Error>>;

/// Deterministic pseudo-random normal-ish values (sum of uniforms), no RNG crate needed.
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

fn tensor(seed: u64, b: usize, d: usize, dtype: DType) -> R<Tensor> {
    Ok(Tensor::from_vec(randn(seed, b * d), (b, d), &Device::Cpu)?.to_dtype(dtype)?)
}

fn to_f64(t: &Tensor) -> R<Vec<f64>> {
    Ok(t.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?)
}

fn scalar(t: &Tensor) -> R<f64> {
    let v = to_f64(t)?;
    assert_eq!(v.len(), 1);
    Ok(v[0])
}

/// `max|a - b| <= rtol * max(max|b|, floor)`.
fn assert_close(what: &str, a: &[f64], b: &[f64], rtol: f64, floor: f64) {
    assert_eq!(a.len(), b.len(), "{what}: lengths");
    let scale = b.iter().fold(floor, |m, v| m.max(v.abs()));
    // NaN-aware: `f64::max` would drop a NaN difference.
    let err = a.iter().zip(b).fold(0f64, |m, (x, y)| {
        let e = (x - y).abs();
        if e.is_nan() || m.is_nan() {
            f64::NAN
        } else {
            m.max(e)
        }
    });
    assert!(
        err <= rtol * scale,
        "{what}: max abs err {err:e} > {rtol:e} * {scale:e}\n  got  {a:?}\n  want {b:?}"
    );
}

fn assert_finite(what: &str, v: &[f64]) {
    assert!(v.iter().all(|x| x.is_finite()), "{what}: non-finite {v:?}");
}

/// Loss and gradients (q, k, and log-scale when learnable) of one path.
struct Eval {
    loss: f64,
    dq: Vec<f64>,
    dk: Vec<f64>,
    dls: Option<f64>,
}

/// The tolerances of a twin comparison: relative (`loss_rtol` for the loss, whose floor is
/// 1e-3; `rtol` for the gradients) with the absolute floors of `dq`, `dk` (`floor`) and of
/// `∂L/∂log s` (`scale_floor`).
#[derive(Clone, Copy)]
struct Tol {
    loss_rtol: f64,
    rtol: f64,
    floor: f64,
    scale_floor: f64,
}

/// f64 twins at the larger shapes: exact to ~1e-12; the loss compared at 1e-10, the gradients
/// at 1e-9.
const F64_TOL: Tol = Tol {
    loss_rtol: 1e-10,
    rtol: 1e-9,
    floor: 1e-6,
    scale_floor: 1e-6,
};

/// Runs `cfg` by `fused` and by its twin `composite` on the same inputs and asserts that loss
/// and gradients agree within `tol`; returns the fused path's result.
#[allow(clippy::too_many_arguments)]
fn twins_agree(
    what: &str,
    cfg: &CzNce,
    (fused, composite): (Path, Path),
    (q, k): (&Tensor, &Tensor),
    layout: u8,
    learnable: Option<f64>,
    tol: Tol,
) -> R<Eval> {
    let f = eval(cfg, fused, q, k, layout, learnable)?;
    let c = eval(cfg, composite, q, k, layout, learnable)?;
    let Tol {
        loss_rtol,
        rtol,
        floor,
        scale_floor,
    } = tol;
    assert_close(
        &format!("{what} loss"),
        &[f.loss],
        &[c.loss],
        loss_rtol,
        1e-3,
    );
    assert_close(&format!("{what} dq"), &f.dq, &c.dq, rtol, floor);
    assert_close(&format!("{what} dk"), &f.dk, &c.dk, rtol, floor);
    if let (Some(a), Some(b_)) = (f.dls, c.dls) {
        assert_close(
            &format!("{what} dlog_scale"),
            &[a],
            &[b_],
            rtol,
            scale_floor,
        );
    }
    Ok(f)
}

#[derive(Clone, Copy, PartialEq)]
enum Path {
    Fused,
    Composite,
    /// `forward_rows_fused` over rows `start..start + len`.
    FusedRows(usize, usize),
    /// `forward_rows_composite` over rows `start..start + len`.
    CompositeRows(usize, usize),
}

impl Path {
    /// `loss` on `q`, `k` by this path.
    fn run(self, loss: &CzNce, q: &Tensor, k: &Tensor) -> mlctl::Result<Tensor> {
        match self {
            Path::Fused => loss.forward_fused(q, k),
            Path::Composite => loss.forward_composite(q, k),
            Path::FusedRows(start, len) => loss.forward_rows_fused(q, k, start..start + len),
            Path::CompositeRows(start, len) => {
                loss.forward_rows_composite(q, k, start..start + len)
            }
        }
    }
}

/// Evaluates `loss` with q, k given as views of Vars: `layout` 0 = contiguous, 1 = q transposed
/// from a `[D, B]` var and k narrowed from a `[B, D + 3]` var, 2 = both rows `2..B + 2` of a
/// `[B + 3, D]` var (contiguous, but starting past the storage's first element).
fn eval(
    loss: &CzNce,
    path: Path,
    q0: &Tensor,
    k0: &Tensor,
    layout: u8,
    learnable_t: Option<f64>,
) -> R<Eval> {
    let (b, d) = q0.dims2()?;
    // Rows 2..B + 2 of a var padded with one row above and two below (different values).
    let offset_view = |x: &Tensor| -> R<(Var, Tensor)> {
        let above = Tensor::ones((2, d), x.dtype(), x.device())?;
        let below = (Tensor::ones((1, d), x.dtype(), x.device())? * 3.0)?;
        let v = Var::from_tensor(&Tensor::cat(&[&above, x, &below], 0)?)?;
        let t = v.as_tensor().narrow(0, 2, b)?;
        assert!(t.is_contiguous() && t.layout().start_offset() == 2 * d);
        Ok((v, t))
    };
    let (qv, q) = if layout == 1 {
        let v = Var::from_tensor(&q0.t()?.contiguous()?)?;
        let q = v.as_tensor().t()?;
        assert!(b == 1 || d == 1 || !q.is_contiguous());
        (v, q)
    } else if layout == 2 {
        offset_view(q0)?
    } else {
        let v = Var::from_tensor(q0)?;
        let q = v.as_tensor().clone();
        (v, q)
    };
    let (kv, k) = if layout == 1 {
        let pad = Tensor::zeros((b, 3), k0.dtype(), k0.device())?;
        let v = Var::from_tensor(&Tensor::cat(&[&pad, k0], 1)?)?;
        let k = v.as_tensor().narrow(1, 3, d)?;
        assert!(b == 1 || !k.is_contiguous());
        (v, k)
    } else if layout == 2 {
        offset_view(k0)?
    } else {
        let v = Var::from_tensor(k0)?;
        let k = v.as_tensor().clone();
        (v, k)
    };
    let ls = match learnable_t {
        Some(t) => Some(Var::from_tensor(
            &Tensor::new(&[-t.ln()], &Device::Cpu)?.to_dtype(q0.dtype())?,
        )?),
        None => None,
    };
    let loss = match &ls {
        Some(ls) => loss
            .clone()
            .with_learnable_log_scale(ls.as_tensor().clone()),
        None => loss.clone(),
    };
    let out = path.run(&loss, &q, &k)?;
    assert_eq!(out.dims(), &[] as &[usize]);
    let grads = out.backward()?;
    let dq = grads.get(qv.as_tensor()).ok_or("no dq")?;
    let dk = grads.get(kv.as_tensor()).ok_or("no dk")?;
    assert_eq!(dq.dtype(), q0.dtype());
    let (dq, dk) = if layout == 1 {
        (dq.t()?, dk.narrow(1, 3, d)?)
    } else if layout == 2 {
        (dq.narrow(0, 2, b)?, dk.narrow(0, 2, b)?)
    } else {
        (dq.clone(), dk.clone())
    };
    let dls = match &ls {
        Some(ls) => Some(scalar(grads.get(ls.as_tensor()).ok_or("no dlog_scale")?)?),
        None => None,
    };
    Ok(Eval {
        loss: scalar(&out)?,
        dq: to_f64(&dq)?,
        dk: to_f64(&dk)?,
        dls,
    })
}

/// Every option combination of the builder.
fn all_configs() -> Vec<(String, CzNce)> {
    let mut v = vec![];
    for bits in 0..32u32 {
        let f = |i: u32| bits & (1 << i) != 0;
        let c = CzNce::new()
            .with_temperature(if f(4) { 0.5 } else { 0.07 })
            .with_positive_in_denominator(f(0))
            .with_anchor_negatives(f(1))
            .with_target_negatives(f(2))
            .with_symmetric(f(3))
            .with_assume_normalized(bits % 7 == 3);
        v.push((format!("{c:?}"), c));
    }
    v
}

#[test]
fn fused_matches_composite_f32_all_options() -> R<()> {
    fused_matches_composite(DType::F32, 1e-5, 1.0)
}

/// The same in f64, where both paths are exact to ~1e-12: a tight check of every option.
#[test]
fn fused_matches_composite_f64_all_options() -> R<()> {
    fused_matches_composite(DType::F64, 1e-10, 1e-3)
}

fn fused_matches_composite(dtype: DType, rtol: f64, grad_floor: f64) -> R<()> {
    let shapes = [(1usize, 5usize), (2, 3), (5, 1), (6, 16)];
    let mut n = 0;
    for (ci, (name, cfg)) in all_configs().into_iter().enumerate() {
        for (si, &(b, d)) in shapes.iter().enumerate() {
            if b == 1 && !cfg.positive_in_denominator() {
                continue; // CZ-NCE needs B >= 2 (tested in bad_inputs).
            }
            let seed = (ci * 10 + si) as u64;
            let q = tensor(seed, b, d, dtype)?;
            let k = ((&q * 0.5)? + tensor(seed + 1000, b, d, dtype)?)?;
            let layout = (ci + si) as u8 % 3;
            let learnable = (ci % 3 == 0).then_some(0.2);
            let what = format!("{name} B={b} D={d} layout={layout}");
            // In f32, rounding of logits of size 1/t leaves ~1e-6 absolute noise in the
            // composite's gradients (exactly-zero ones for D = 1, saturated softmax rows): the
            // floor turns the relative tolerance into an absolute one for tiny gradients. For
            // D = 1 the exact gradient is 0 and both paths get it by cancelling O(1/t) terms in
            // the normalization Jacobian, hence a 10x larger floor.
            let floor = if d == 1 {
                10.0 * grad_floor
            } else {
                grad_floor
            };
            let paths = (Path::Fused, Path::Composite);
            let tol = Tol {
                loss_rtol: rtol,
                rtol,
                floor,
                scale_floor: grad_floor,
            };
            let f = twins_agree(&what, &cfg, paths, (&q, &k), layout, learnable, tol)?;
            assert_finite(&what, &f.dq);
            n += 1;
        }
    }
    assert!(n > 100);
    Ok(())
}

#[test]
fn recompute_mode_matches_grad_in_forward() -> R<()> {
    let q = tensor(1, 7, 9, DType::F32)?;
    let k = tensor(2, 7, 9, DType::F32)?;
    for cfg in [CzNce::new(), CzNce::info_nce().with_symmetric(true)] {
        let a = eval(&cfg, Path::Fused, &q, &k, 0, Some(0.1))?;
        let cfg = cfg.with_backward_mode(BackwardMode::Recompute);
        let b = eval(&cfg, Path::Fused, &q, &k, 1, Some(0.1))?;
        assert_close("loss", &[a.loss], &[b.loss], 1e-6, 1e-3);
        assert_close("dq", &a.dq, &b.dq, 1e-6, 1e-6);
        assert_close("dk", &a.dk, &b.dk, 1e-6, 1e-6);
        assert_close("dls", &[a.dls.unwrap()], &[b.dls.unwrap()], 1e-6, 1e-6);
    }
    Ok(())
}

#[test]
fn half_precision_inputs_match_composite_and_keep_dtype() -> R<()> {
    for dtype in [DType::F16, DType::BF16] {
        let q = tensor(3, 6, 8, dtype)?;
        let k = tensor(4, 6, 8, dtype)?;
        let cfg = CzNce::new()
            .with_target_negatives(true)
            .with_symmetric(true);
        let f = eval(&cfg, Path::Fused, &q, &k, 1, None)?;
        let c = eval(&cfg, Path::Composite, &q, &k, 0, None)?;
        // Both compute in f32 from the same values; the gradients are rounded to `dtype`.
        assert_close("loss", &[f.loss], &[c.loss], 1e-5, 1e-3);
        assert_close("dq", &f.dq, &c.dq, 1e-2, 1e-6);
        assert_close("dk", &f.dk, &c.dk, 1e-2, 1e-6);
        let out = cfg.forward(&q, &k)?;
        assert_eq!(out.dtype(), DType::F32);
    }
    Ok(())
}

#[test]
fn forward_dispatches_to_fused_on_cpu() -> R<()> {
    let q = tensor(5, 4, 6, DType::F32)?;
    let k = tensor(6, 4, 6, DType::F32)?;
    let cfg = CzNce::new();
    assert!(CzNce::fused_supported(&q));
    let a = scalar(&cfg.forward(&q, &k)?)?;
    let b = scalar(&cfg.forward_fused(&q, &k)?)?;
    assert_eq!(a, b);
    Ok(())
}

/// Central finite differences in f64 of `loss(q, k, log_scale)`.
fn finite_differences(cfg: &CzNce, path: Path, b: usize, d: usize, t: f64) -> R<()> {
    let q = tensor(11, b, d, DType::F64)?;
    let k = tensor(12, b, d, DType::F64)?;
    let ev = eval(cfg, path, &q, &k, 0, Some(t))?;
    let f = |q: &Tensor, k: &Tensor, ls: f64| -> R<f64> {
        let c = cfg
            .clone()
            .with_learnable_log_scale(Tensor::new(&[ls], &Device::Cpu)?);
        let out = path.run(&c, q, k)?;
        assert_eq!(out.dtype(), DType::F64);
        scalar(&out)
    };
    let h = 1e-6;
    let ls0 = -t.ln();
    let qv = to_f64(&q)?;
    let kv = to_f64(&k)?;
    let bump = |v: &[f64], i: usize, dx: f64| -> R<Tensor> {
        let mut v = v.to_vec();
        v[i] += dx;
        Ok(Tensor::from_vec(v, (b, d), &Device::Cpu)?)
    };
    let mut num_dq = vec![];
    let mut num_dk = vec![];
    for i in 0..b * d {
        num_dq.push((f(&bump(&qv, i, h)?, &k, ls0)? - f(&bump(&qv, i, -h)?, &k, ls0)?) / (2.0 * h));
        num_dk.push((f(&q, &bump(&kv, i, h)?, ls0)? - f(&q, &bump(&kv, i, -h)?, ls0)?) / (2.0 * h));
    }
    let num_dls = (f(&q, &k, ls0 + h)? - f(&q, &k, ls0 - h)?) / (2.0 * h);
    assert_close("fd dq", &ev.dq, &num_dq, 1e-6, 1e-3);
    assert_close("fd dk", &ev.dk, &num_dk, 1e-6, 1e-3);
    assert_close("fd dls", &[ev.dls.unwrap()], &[num_dls], 1e-6, 1e-3);
    Ok(())
}

#[test]
fn gradients_match_finite_differences_f64() -> R<()> {
    let cfgs = [
        CzNce::new(),
        CzNce::info_nce(),
        CzNce::new()
            .with_target_negatives(true)
            .with_symmetric(true),
        CzNce::info_nce()
            .with_anchor_negatives(true)
            .with_symmetric(true),
    ];
    for cfg in &cfgs {
        let paths = [
            Path::Fused,
            Path::Composite,
            Path::FusedRows(1, 2),
            Path::CompositeRows(1, 2),
        ];
        for path in paths {
            finite_differences(cfg, path, 4, 3, 0.3)?;
        }
    }
    Ok(())
}

// ---------------------------------------------------------------- PyTorch golden values

fn golden() -> R<std::collections::HashMap<String, Tensor>> {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/cz_nce/golden.safetensors"
    );
    Ok(candle_core::safetensors::load(path, &Device::Cpu)?)
}

#[test]
fn matches_pytorch_golden() -> R<()> {
    let g = golden()?;
    let get = |n: &str| g.get(n).ok_or_else(|| format!("golden lacks {n}"));
    let cases: [(&str, CzNce); 8] = [
        ("cz", CzNce::new()),
        ("cz_t05", CzNce::new()),
        ("cz_keyneg", CzNce::new().with_target_negatives(true)),
        ("cz_sym", CzNce::new().with_symmetric(true)),
        ("infonce", CzNce::info_nce()),
        ("infonce_sym", CzNce::info_nce().with_symmetric(true)),
        ("cz_learnable", CzNce::new()),
        ("cz_b2", CzNce::new()),
    ];
    for (name, cfg) in cases {
        let q = get(&format!("{name}/q"))?;
        let k = get(&format!("{name}/k"))?;
        let t = to_f64(get(&format!("{name}/t"))?)?[0];
        let cfg = cfg.with_temperature(t);
        let learnable = g.contains_key(&format!("{name}/log_scale")).then_some(t);
        let want_loss = to_f64(get(&format!("{name}/loss"))?)?;
        let want_dq = to_f64(get(&format!("{name}/dq"))?)?;
        let want_dk = to_f64(get(&format!("{name}/dk"))?)?;
        for dtype in [DType::F32, DType::F64] {
            for path in [Path::Fused, Path::Composite] {
                let (q, k) = (q.to_dtype(dtype)?, k.to_dtype(dtype)?);
                let e = eval(&cfg, path, &q, &k, 0, learnable)?;
                let tol = if dtype == DType::F64 { 1e-10 } else { 1e-5 };
                let what = format!("{name} {dtype:?}");
                assert_close(&format!("{what} loss"), &[e.loss], &want_loss, tol, 1e-3);
                assert_close(&format!("{what} dq"), &e.dq, &want_dq, tol, 1e-6);
                assert_close(&format!("{what} dk"), &e.dk, &want_dk, tol, 1e-6);
                if learnable.is_some() {
                    let want = to_f64(get(&format!("{name}/dlog_scale"))?)?;
                    assert_close(&format!("{what} dls"), &[e.dls.unwrap()], &want, tol, 1e-6);
                }
            }
        }
    }
    Ok(())
}

/// `t = 1e-4`: the logits reach ±1e4. The naive PyTorch f16 computation overflows (stored as
/// `naive_f16_loss`); ours, fed the same f16 inputs, matches the f64 reference to 1e-3
/// relative (the f32 rounding of logits of size 1e4 is ~1e-3 absolute).
#[test]
fn f16_large_logits_stay_finite_where_naive_overflows() -> R<()> {
    let g = golden()?;
    let q = &g["f16_overflow/q"];
    let k = &g["f16_overflow/k"];
    assert_eq!(q.dtype(), DType::F16);
    let naive = to_f64(&g["f16_overflow/naive_f16_loss"])?[0];
    assert!(
        !naive.is_finite(),
        "the naive f16 computation should overflow"
    );
    let t = to_f64(&g["f16_overflow/t"])?[0];
    let want = to_f64(&g["f16_overflow/loss"])?;
    let cfg = CzNce::new().with_temperature(t);
    for path in [Path::Fused, Path::Composite] {
        let e = eval(&cfg, path, q, k, 0, None)?;
        assert_close("f16 loss", &[e.loss], &want, 1e-3, 1.0);
        assert_finite("f16 dq", &e.dq);
        assert_finite("f16 dk", &e.dk);
    }
    Ok(())
}

// ---------------------------------------------------------------- extreme inputs

#[test]
fn extreme_inputs_give_finite_loss_and_grads() -> R<()> {
    let (b, d) = (5, 4);
    let row = randn(77, d);
    let identical: Vec<f64> = (0..b).flat_map(|_| row.clone()).collect();
    let all_equal = vec![0.3; b * d];
    let huge: Vec<f64> = randn(78, b * d).into_iter().map(|v| v * 1e4).collect();
    let mut with_zero_row = randn(79, b * d);
    with_zero_row[..d].iter_mut().for_each(|v| *v = 0.0);
    let zeros = vec![0.0; b * d];
    let inputs = [
        ("identical rows", identical.clone(), identical),
        ("all-equal rows", all_equal.clone(), all_equal),
        (
            "huge norms",
            huge.clone(),
            randn(80, b * d).into_iter().map(|v| v * 1e4).collect(),
        ),
        ("zero row", with_zero_row, randn(81, b * d)),
        ("all zero", zeros.clone(), zeros),
    ];
    for (what, qv, kv) in inputs {
        for dtype in [DType::F32, DType::F16, DType::BF16] {
            let q = Tensor::from_vec(qv.clone(), (b, d), &Device::Cpu)?.to_dtype(dtype)?;
            let k = Tensor::from_vec(kv.clone(), (b, d), &Device::Cpu)?.to_dtype(dtype)?;
            for t in [1e-3, 0.07] {
                for cfg in [
                    CzNce::new(),
                    CzNce::info_nce(),
                    CzNce::new()
                        .with_target_negatives(true)
                        .with_symmetric(true),
                ] {
                    let cfg = cfg.with_temperature(t);
                    for path in [Path::Fused, Path::Composite] {
                        if dtype == DType::F16 && what == "zero row" && path == Path::Composite {
                            // The exact gradient of a zero row is ∂L/∂q̂ / ε (~1e8): beyond
                            // f16's range. The composite's autograd casts it to ±inf; the fused
                            // op saturates it to ±f16::MAX (documented).
                            continue;
                        }
                        let e = eval(&cfg, path, &q, &k, 0, None)?;
                        let w = format!("{what} {dtype:?} t={t}");
                        assert!(e.loss.is_finite(), "{w}: loss {}", e.loss);
                        assert_finite(&w, &e.dq);
                        assert_finite(&w, &e.dk);
                    }
                }
            }
        }
    }
    Ok(())
}

#[test]
fn info_nce_batch_of_one_is_zero() -> R<()> {
    let q = tensor(90, 1, 4, DType::F32)?;
    let k = tensor(91, 1, 4, DType::F32)?;
    for path in [Path::Fused, Path::Composite] {
        let e = eval(&CzNce::info_nce(), path, &q, &k, 0, None)?;
        assert_eq!(e.loss, 0.0);
        assert!(e.dq.iter().all(|v| v.abs() < 1e-7));
    }
    Ok(())
}

// ---------------------------------------------------------------- validation

#[test]
fn bad_inputs_give_typed_errors() -> R<()> {
    let dev = Device::Cpu;
    let q = tensor(1, 4, 3, DType::F32)?;
    let cz = CzNce::new();
    type Fwd = fn(&CzNce, &Tensor, &Tensor) -> mlctl::Result<Tensor>;
    let paths: [Fwd; 3] = [
        CzNce::forward,
        CzNce::forward_fused,
        CzNce::forward_composite,
    ];
    for f in paths {
        // Mismatched B, mismatched D.
        for k in [tensor(2, 5, 3, DType::F32)?, tensor(2, 4, 2, DType::F32)?] {
            match f(&cz, &q, &k) {
                Err(Error::ShapeMismatch {
                    expected, actual, ..
                }) => {
                    assert_eq!(expected, vec![4, 3]);
                    assert_eq!(actual, k.dims().to_vec());
                }
                other => panic!("expected ShapeMismatch, got {other:?}"),
            }
        }
        // Rank != 2.
        let r3 = Tensor::zeros((2, 2, 3), DType::F32, &dev)?;
        assert!(matches!(f(&cz, &r3, &r3), Err(Error::InvalidArgument(_))));
        let r1 = Tensor::zeros(3, DType::F32, &dev)?;
        assert!(matches!(f(&cz, &r1, &r1), Err(Error::InvalidArgument(_))));
        // Empty batch.
        let e = Tensor::zeros((0, 3), DType::F32, &dev)?;
        assert!(matches!(f(&cz, &e, &e), Err(Error::InvalidArgument(_))));
        // Bad temperatures.
        for t in [0.0, -0.1, f64::NAN, f64::INFINITY] {
            let c = CzNce::new().with_temperature(t);
            assert!(matches!(f(&c, &q, &q), Err(Error::InvalidArgument(_))));
        }
        let c = CzNce::new().with_learnable_log_scale(Tensor::new(&[f32::NAN], &dev)?);
        assert!(matches!(f(&c, &q, &q), Err(Error::InvalidArgument(_))));
        // CZ-NCE with B = 1 has no negatives.
        let one = tensor(3, 1, 3, DType::F32)?;
        assert!(matches!(f(&cz, &one, &one), Err(Error::InvalidArgument(_))));
        // Mixed dtypes.
        let qh = q.to_dtype(DType::F16)?;
        assert!(matches!(f(&cz, &q, &qh), Err(Error::InvalidArgument(_))));
    }
    Ok(())
}

/// The fused band of rows against its composite twin, for every option, layout and dtype, on
/// bands at the start, middle and end of the batch: values and the gradients of every row.
#[test]
fn fused_rows_match_composite_rows_f32_all_options() -> R<()> {
    fused_rows_match_composite_rows(DType::F32, 1e-5, 1.0)
}

/// The same in f64 (both paths exact to ~1e-12).
#[test]
fn fused_rows_match_composite_rows_f64_all_options() -> R<()> {
    fused_rows_match_composite_rows(DType::F64, 1e-10, 1e-3)
}

fn fused_rows_match_composite_rows(dtype: DType, rtol: f64, grad_floor: f64) -> R<()> {
    let cases = [
        (2usize, 3usize, (1usize, 1usize)),
        (5, 4, (0, 2)),
        (6, 16, (2, 3)),
    ];
    let mut n = 0;
    for (ci, (name, cfg)) in all_configs().into_iter().enumerate() {
        for (si, &(b, d, (start, len))) in cases.iter().enumerate() {
            let seed = (ci * 10 + si) as u64;
            let q = tensor(seed, b, d, dtype)?;
            let k = ((&q * 0.5)? + tensor(seed + 1000, b, d, dtype)?)?;
            let layout = (ci + si) as u8 % 3;
            let learnable = (ci % 3 == 0).then_some(0.2);
            let what = format!("{name} B={b} D={d} rows {start}+{len} layout={layout}");
            // Tolerances as in `fused_matches_composite`: the same arithmetic on fewer rows.
            let paths = (Path::FusedRows(start, len), Path::CompositeRows(start, len));
            let tol = Tol {
                loss_rtol: rtol,
                rtol,
                floor: grad_floor,
                scale_floor: grad_floor,
            };
            let f = twins_agree(&what, &cfg, paths, (&q, &k), layout, learnable, tol)?;
            assert_finite(&what, &f.dq);
            n += 1;
        }
    }
    assert!(n >= 96);
    Ok(())
}

/// The band on the calling thread and on the rayon pool (`n·B·(D + 32)` below or above 2²³):
/// both against the composite twin, every row's gradient.
#[test]
fn fused_rows_serial_and_pooled_match_composite_rows_f64() -> R<()> {
    let configs = [
        CzNce::new(),
        CzNce::new()
            .with_target_negatives(true)
            .with_symmetric(true),
        CzNce::info_nce().with_symmetric(true),
    ];
    for (b, d, start, len) in [(40, 64, 10, 20), (256, 288, 64, 160)] {
        let q = tensor(120, b, d, DType::F64)?;
        let k = ((&q * 0.5)? + tensor(121, b, d, DType::F64)?)?;
        for (ci, cfg) in configs.iter().enumerate() {
            let learnable = (ci != 1).then_some(0.1);
            let what = format!("{cfg:?} B={b} D={d} rows {start}+{len}");
            let paths = (Path::FusedRows(start, len), Path::CompositeRows(start, len));
            let layout = ci as u8 % 3;
            twins_agree(&what, cfg, paths, (&q, &k), layout, learnable, F64_TOL)?;
        }
    }
    Ok(())
}

/// B 600 runs on the rayon pool with several bands of the lower-half products `q̂q̂ᵀ` and
/// `k̂k̂ᵀ`, which both directions read: against the composite twin.
#[test]
fn large_batch_matches_composite_f64() -> R<()> {
    let (b, d) = (600, 3);
    let q = tensor(100, b, d, DType::F64)?;
    let k = tensor(101, b, d, DType::F64)?;
    let cfg = CzNce::new()
        .with_target_negatives(true)
        .with_symmetric(true);
    let paths = (Path::Fused, Path::Composite);
    let f = twins_agree("B=600", &cfg, paths, (&q, &k), 0, Some(0.1), F64_TOL)?;
    assert!(f.dls.is_some());
    Ok(())
}

/// The CPU kernel runs small problems on the calling thread and larger ones on the rayon pool
/// (`B²·(D + 32)` below or above 2²³; a unit test in `ops::cz_nce::cpu` keeps these shapes on
/// their sides): both against the composite twin, on values and gradients.
#[test]
fn serial_and_pooled_kernels_match_composite_f64() -> R<()> {
    let configs = [
        CzNce::new(),
        CzNce::new()
            .with_target_negatives(true)
            .with_symmetric(true),
        CzNce::info_nce().with_symmetric(true),
    ];
    for (b, d) in [(40, 64), (160, 320)] {
        let q = tensor(110, b, d, DType::F64)?;
        let k = ((&q * 0.5)? + tensor(111, b, d, DType::F64)?)?;
        for (ci, cfg) in configs.iter().enumerate() {
            let learnable = (ci != 1).then_some(0.1);
            let what = format!("{cfg:?} B={b} D={d}");
            let paths = (Path::Fused, Path::Composite);
            twins_agree(
                &what,
                cfg,
                paths,
                (&q, &k),
                ci as u8 % 3,
                learnable,
                F64_TOL,
            )?;
        }
    }
    Ok(())
}

// ---------------------------------------------------------------- bounded learnable scale

/// Trains `q`, `k` and the log-scale `θ` of CZ-NCE on pairs whose positives already beat
/// every negative, with the optimizer `make_opt` builds, for `steps` steps; returns `θ` after
/// each step. Stops early if `θ` leaves `[-1e3, stop_above]` (the unbounded control run
/// diverges).
fn train_log_scale<O: candle_nn::optim::Optimizer>(
    make_opt: impl FnOnce(Vec<Var>) -> candle_core::Result<O>,
    path: Path,
    max: f64,
    steps: usize,
    stop_above: f64,
) -> R<Vec<f64>> {
    let (b, d) = (8, 16);
    let q = Var::from_tensor(&tensor(200, b, d, DType::F32)?)?;
    let k = Var::from_tensor(&(q.as_tensor() + (tensor(201, b, d, DType::F32)? * 0.1)?)?)?;
    let theta = Var::from_tensor(&Tensor::new(&[(1.0f32 / 0.07).ln()], &Device::Cpu)?)?;
    let cfg = CzNce::new()
        .with_learnable_log_scale(theta.as_tensor().clone())
        .with_max_logit_scale(max);
    let mut opt = make_opt(vec![q.clone(), k.clone(), theta.clone()])?;
    let mut trace = vec![];
    for _ in 0..steps {
        let loss = path.run(&cfg, q.as_tensor(), k.as_tensor())?;
        opt.step(&loss.backward()?)?;
        let t = scalar(theta.as_tensor())?;
        trace.push(t);
        if !(t.is_finite() && t.abs() < 1e3 && t <= stop_above) {
            break;
        }
    }
    Ok(trace)
}

/// CZ-NCE keeps pulling a learnable scale up once positives win (the positive is not in the
/// denominator). With the default bound (100) `θ` reaches `ln 100` and stays within a step or
/// two of it for the whole run, under SGD and AdamW, on both paths; without the bound the same
/// run leaves that range (the control, so this test can fail).
#[test]
fn learnable_scale_stays_bounded_when_positives_dominate() -> R<()> {
    use candle_nn::optim::{AdamW, Optimizer, ParamsAdamW, SGD};
    let max = CzNce::DEFAULT_MAX_LOGIT_SCALE;
    let bound = max.ln() + 0.5;
    let steps = 300;
    for path in [Path::Fused, Path::Composite] {
        let sgd = |vars| SGD::new(vars, 0.005);
        let adamw = |vars| {
            AdamW::new(
                vars,
                ParamsAdamW {
                    lr: 0.02,
                    ..Default::default()
                },
            )
        };
        let runs = [
            (
                "sgd",
                train_log_scale(sgd, path, max, steps, f64::INFINITY)?,
            ),
            (
                "adamw",
                train_log_scale(adamw, path, max, steps, f64::INFINITY)?,
            ),
        ];
        for (name, trace) in runs {
            let on = if path == Path::Fused {
                "fused"
            } else {
                "composite"
            };
            let what = format!("{name} {on}");
            assert_eq!(trace.len(), steps, "{what}: stopped early: {trace:?}");
            let top = trace.iter().cloned().fold(f64::MIN, f64::max);
            assert!(top <= bound, "{what}: θ reached {top} > ln(max) + 0.5");
            // The run does cross the bound (otherwise it would test nothing) and ends near it.
            let last = *trace.last().unwrap();
            assert!(top > max.ln(), "{what}: θ never reached ln(max): {top}");
            assert!(last >= max.ln() - 0.5, "{what}: θ ends at {last}");
            eprintln!(
                "{what}: θ max {top:.4}, last {last:.4} (ln max = {:.4})",
                max.ln()
            );
        }
        let control = [
            train_log_scale(sgd, path, f64::INFINITY, steps, bound)?,
            train_log_scale(adamw, path, f64::INFINITY, steps, bound)?,
        ];
        for trace in control {
            let last = *trace.last().unwrap();
            assert!(
                last.is_nan() || last > bound,
                "unbounded control stayed at θ = {last} after {} steps",
                trace.len()
            );
            eprintln!("unbounded: θ = {last:.4} after {} steps", trace.len());
        }
    }
    Ok(())
}

/// Fused and composite agree on the loss and every gradient below the bound, exactly at it
/// (`exp(θ) = max`: the gradient still flows, as with `torch.clamp`) and above it (`∂L/∂θ = 0`
/// and the loss is that of the fixed temperature `1/max`); f64 finite differences confirm the
/// clamped gradients.
#[test]
fn clamped_scale_fused_matches_composite_at_and_away_from_the_bound() -> R<()> {
    let t = 0.2; // exp(θ) = 5
    let (b, d) = (5, 6);
    let cfgs = [
        CzNce::new(),
        CzNce::info_nce().with_symmetric(true),
        CzNce::new()
            .with_target_negatives(true)
            .with_symmetric(true),
    ];
    for dtype in [DType::F32, DType::F64] {
        let (rtol, floor) = if dtype == DType::F64 {
            (1e-10, 1e-3)
        } else {
            (1e-5, 1.0)
        };
        let q = tensor(300, b, d, dtype)?;
        let k = ((&q * 0.5)? + tensor(301, b, d, dtype)?)?;
        // exp(θ) for θ as stored in `dtype`, the value the clamp compares.
        let at = scalar(&Tensor::new(&[-f64::ln(t)], &Device::Cpu)?.to_dtype(dtype)?)?.exp();
        for cfg in &cfgs {
            let unclamped = eval(
                &cfg.clone().with_max_logit_scale(f64::INFINITY),
                Path::Fused,
                &q,
                &k,
                0,
                Some(t),
            )?;
            for (case, max) in [("below", 100.0), ("at", at), ("above", 3.0)] {
                let cfg = cfg.clone().with_max_logit_scale(max);
                let what = format!("{cfg:?} {dtype:?} {case}");
                let f = eval(&cfg, Path::Fused, &q, &k, 1, Some(t))?;
                let c = eval(&cfg, Path::Composite, &q, &k, 2, Some(t))?;
                assert_close(&format!("{what} loss"), &[f.loss], &[c.loss], rtol, 1e-3);
                assert_close(&format!("{what} dq"), &f.dq, &c.dq, rtol, floor * 1e-3);
                assert_close(&format!("{what} dk"), &f.dk, &c.dk, rtol, floor * 1e-3);
                let (fd, cd) = (f.dls.unwrap(), c.dls.unwrap());
                assert_close(&format!("{what} dls"), &[fd], &[cd], rtol, floor * 1e-3);
                if case == "above" {
                    assert_eq!((fd, cd), (0.0, 0.0), "{what}: clamped θ gets no gradient");
                    let fixed = cfg.clone().with_temperature(1.0 / max);
                    let want = eval(&fixed, Path::Fused, &q, &k, 0, None)?;
                    assert_close(&format!("{what} loss"), &[f.loss], &[want.loss], rtol, 1e-3);
                    assert_close(&format!("{what} dq"), &f.dq, &want.dq, rtol, floor * 1e-3);
                } else {
                    let u = &unclamped;
                    assert!(fd.abs() > 1e-3, "{what}: dls {fd}");
                    assert_close(&format!("{what} loss"), &[f.loss], &[u.loss], rtol, 1e-3);
                    assert_close(&format!("{what} dls"), &[fd], &[u.dls.unwrap()], rtol, 1e-6);
                }
            }
        }
    }
    for cfg in &cfgs {
        for path in [Path::Fused, Path::Composite] {
            finite_differences(&cfg.clone().with_max_logit_scale(3.0), path, 4, 3, t)?;
        }
    }
    Ok(())
}

#[test]
fn bad_max_logit_scale_gives_typed_errors() -> R<()> {
    let q = tensor(1, 4, 3, DType::F32)?;
    let ls = |v: f32| Tensor::new(&[v], &Device::Cpu);
    type Fwd = fn(&CzNce, &Tensor, &Tensor) -> mlctl::Result<Tensor>;
    let paths: [Fwd; 3] = [
        CzNce::forward,
        CzNce::forward_fused,
        CzNce::forward_composite,
    ];
    for f in paths {
        for max in [0.0, -1.0, f64::NAN] {
            let c = CzNce::new()
                .with_learnable_log_scale(ls(1.0)?)
                .with_max_logit_scale(max);
            assert!(matches!(f(&c, &q, &q), Err(Error::InvalidArgument(_))));
        }
        // Unbounded, exp(θ) overflows; bounded, the same θ is clamped.
        let c = CzNce::new().with_learnable_log_scale(ls(1e3)?);
        assert!(f(&c, &q, &q)?.to_scalar::<f32>()?.is_finite());
        let c = c.with_max_logit_scale(f64::INFINITY);
        assert!(matches!(f(&c, &q, &q), Err(Error::InvalidArgument(_))));
    }
    Ok(())
}

/// The parts of a partition of the rows add up to the whole loss, in value and in the
/// gradients of `q`, `k` and a learnable temperature (the fused op is the reference: an
/// independent implementation), for CZ-NCE, its symmetric form and InfoNCE. In f64 both sides
/// agree to rounding: a few ulps of the O(1) values, far inside 1e-12.
#[test]
fn cz_nce_rows_of_a_partition_add_up_to_the_whole_loss() -> R<()> {
    let (b, d) = (7, 5);
    let q = Var::from_tensor(&tensor(1, b, d, DType::F64)?)?;
    let k = Var::from_tensor(&tensor(2, b, d, DType::F64)?)?;
    let theta = Var::from_tensor(&Tensor::new(&[2.3f64], &Device::Cpu)?)?;
    let losses = [
        CzNce::new(),
        CzNce::new().with_symmetric(true),
        CzNce::info_nce(),
        CzNce::new().with_learnable_log_scale(theta.as_tensor().clone()),
    ];
    let part = |fused: bool, l: &CzNce, rows: std::ops::Range<usize>| {
        let path = match fused {
            true => Path::FusedRows(rows.start, rows.len()),
            false => Path::CompositeRows(rows.start, rows.len()),
        };
        path.run(l, q.as_tensor(), k.as_tensor())
    };
    for (loss, fused) in losses.iter().flat_map(|l| [(l, true), (l, false)]) {
        let whole = loss.forward_fused(q.as_tensor(), k.as_tensor())?;
        let parts = [0..3, 3..4, 4..7]
            .into_iter()
            .map(|rows| part(fused, loss, rows))
            .collect::<Result<Vec<_>, _>>()?;
        let sum = parts
            .iter()
            .skip(1)
            .try_fold(parts[0].clone(), |a, p| a + p)?;
        assert!((scalar(&sum)? - scalar(&whole)?).abs() < 1e-12, "{loss:?}");
        let (gw, gs) = (whole.backward()?, sum.backward()?);
        for v in [&q, &k, &theta] {
            let (a, b) = match (gw.get(v), gs.get(v)) {
                (None, None) => continue, // a fixed temperature: no θ in the graph
                (a, b) => (to_f64(a.unwrap())?, to_f64(b.unwrap())?),
            };
            assert_close(&format!("{loss:?} gradient"), &a, &b, 1e-12, 1.0);
        }
    }
    for fused in [true, false] {
        let bad = part(fused, &CzNce::new(), 5..9);
        assert!(matches!(bad, Err(Error::InvalidArgument(_))));
        let empty = part(fused, &CzNce::new(), 2..2);
        assert!(matches!(empty, Err(Error::InvalidArgument(_))));
    }
    Ok(())
}
