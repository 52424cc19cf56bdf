//! CUDA checks, ready for a machine with a GPU:
//! `cargo test --release --features cuda --test gpu -- --ignored`.
//!
//! `MLCTL_GPU_TESTS_ON_CPU=1 cargo test --release --test gpu -- --ignored` runs the same checks
//! with the CPU standing in for the GPU (no `cuda` feature needed): a dry run of the test code
//! itself, so that a rare GPU session is not spent on a broken test.

mod common;

use candle_core::{DType, Device, Tensor, Var};
use common::{assert_close, fixture, golden};
use mlctl::loss::BackwardMode;
use mlctl::loss::CzNce;
use mlctl::pretrained::PretrainedBert;

fn cuda() -> Device {
    if std::env::var("MLCTL_GPU_TESTS_ON_CPU").is_ok_and(|v| v == "1") {
        return Device::Cpu;
    }
    Device::new_cuda(0).expect("a CUDA device (build with --features cuda)")
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn encoder_on_cuda_matches_transformers() {
    let device = cuda();
    let bert = PretrainedBert::from_dir(&fixture("tiny_bert"), &device, DType::F32).unwrap();
    let g = golden("tiny_bert/golden.safetensors");
    let on = |t: &Tensor| t.to_device(&device).unwrap();
    let out = bert
        .model
        .forward_t(
            &on(&g["input_ids"]),
            Some(&on(&g["token_type_ids"])),
            Some(&on(&g["attention_mask"])),
            false,
        )
        .unwrap();
    for (i, h) in out.encoder.hidden_states.iter().enumerate() {
        assert_close(
            &format!("cuda hidden_states.{i}"),
            &h.to_device(&Device::Cpu).unwrap(),
            &g[&format!("hidden_states.{i}")],
            1e-4,
        );
    }
    assert_close(
        "cuda mlm_logits",
        &out.logits.to_device(&Device::Cpu).unwrap(),
        &g["mlm_logits"],
        1e-4,
    );
    // Dropout is active in training (Philox masks, the same on every device).
    let a = bert
        .model
        .encoder
        .forward_t(&on(&g["input_ids"]), None, None, true)
        .unwrap()
        .last_hidden_state;
    let b = bert
        .model
        .encoder
        .forward_t(&on(&g["input_ids"]), None, None, true)
        .unwrap()
        .last_hidden_state;
    assert!(
        common::max_abs_diff(
            &a.to_device(&Device::Cpu).unwrap(),
            &b.to_device(&Device::Cpu).unwrap()
        ) > 1e-4
    );
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn cz_nce_on_cuda_matches_the_fused_cpu_op_in_value_and_gradient() {
    let device = cuda();
    let q = Tensor::randn(0f32, 1.0, (64, 96), &Device::Cpu).unwrap();
    let k = Tensor::randn(0f32, 1.0, (64, 96), &Device::Cpu).unwrap();
    for dtype in [DType::F32, DType::BF16, DType::F16] {
        let run = |dev: &Device| {
            let qv =
                candle_core::Var::from_tensor(&q.to_dtype(dtype).unwrap().to_device(dev).unwrap())
                    .unwrap();
            let kv =
                candle_core::Var::from_tensor(&k.to_dtype(dtype).unwrap().to_device(dev).unwrap())
                    .unwrap();
            let loss = CzNce::new()
                .forward(qv.as_tensor(), kv.as_tensor())
                .unwrap();
            let grads = loss.backward().unwrap();
            let cpu = |t: &Tensor| {
                t.to_dtype(DType::F32)
                    .unwrap()
                    .to_device(&Device::Cpu)
                    .unwrap()
            };
            (
                cpu(&loss),
                cpu(grads.get(&qv).unwrap()),
                cpu(grads.get(&kv).unwrap()),
            )
        };
        let (loss_gpu, dq_gpu, dk_gpu) = run(&device);
        let (loss_cpu, dq_cpu, dk_cpu) = run(&Device::Cpu);
        let tol = if dtype == DType::F32 { 1e-4 } else { 2e-2 };
        for (name, got, want) in [
            ("loss", &loss_gpu, &loss_cpu),
            ("dq", &dq_gpu, &dq_cpu),
            ("dk", &dk_gpu, &dk_cpu),
        ] {
            close_each(
                &format!("{dtype:?} {name}"),
                &to_vec(got),
                &to_vec(want),
                tol,
            );
        }
    }
}

/// Loss and gradients as f64 vectors.
struct Eval {
    loss: f64,
    dq: Vec<f64>,
    dk: Vec<f64>,
    dls: Option<f64>,
}

fn to_vec(t: &Tensor) -> Vec<f64> {
    t.to_dtype(DType::F64)
        .unwrap()
        .to_device(&Device::Cpu)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f64>()
        .unwrap()
}

/// Runs `loss` on `dev` (fused or composite), with q transposed and k narrowed out of a wider
/// var when `strided`, and a learnable temperature when `learnable_t` is set.
fn eval_on(
    dev: &Device,
    loss: &CzNce,
    fused: bool,
    (q0, k0): (&Tensor, &Tensor),
    strided: bool,
    learnable_t: Option<f64>,
) -> Eval {
    let (b, d) = q0.dims2().unwrap();
    let on = |t: &Tensor| t.to_device(dev).unwrap();
    let (qv, q) = if strided {
        let v = Var::from_tensor(&on(&q0.t().unwrap().contiguous().unwrap())).unwrap();
        let q = v.as_tensor().t().unwrap();
        (v, q)
    } else {
        let v = Var::from_tensor(&on(q0)).unwrap();
        let q = v.as_tensor().clone();
        (v, q)
    };
    let (kv, k) = if strided {
        let pad = Tensor::zeros((b, 3), k0.dtype(), &Device::Cpu).unwrap();
        let v = Var::from_tensor(&on(&Tensor::cat(&[&pad, k0], 1).unwrap())).unwrap();
        let k = v.as_tensor().narrow(1, 3, d).unwrap();
        (v, k)
    } else {
        let v = Var::from_tensor(&on(k0)).unwrap();
        let k = v.as_tensor().clone();
        (v, k)
    };
    let ls = learnable_t.map(|t| {
        Var::from_tensor(
            &Tensor::new(&[-t.ln()], dev)
                .unwrap()
                .to_dtype(DType::F32)
                .unwrap(),
        )
        .unwrap()
    });
    let loss = match &ls {
        Some(ls) => loss
            .clone()
            .with_learnable_log_scale(ls.as_tensor().clone()),
        None => loss.clone(),
    };
    let out = if fused {
        loss.forward_fused(&q, &k).unwrap()
    } else {
        loss.forward_composite(&q, &k).unwrap()
    };
    let grads = out.backward().unwrap();
    let dq = grads.get(qv.as_tensor()).unwrap();
    let dk = grads.get(kv.as_tensor()).unwrap();
    assert_eq!(dq.dtype(), q0.dtype());
    assert!(dq.device().same_device(dev));
    let (dq, dk) = if strided {
        (dq.t().unwrap(), dk.narrow(1, 3, d).unwrap())
    } else {
        (dq.clone(), dk.clone())
    };
    Eval {
        loss: to_vec(&out)[0],
        dq: to_vec(&dq),
        dk: to_vec(&dk),
        dls: ls.map(|ls| to_vec(grads.get(ls.as_tensor()).unwrap())[0]),
    }
}

/// `max|a − b| ≤ rtol · max(max|b|, 0.01)`. The floor keeps gradients that are exactly zero in
/// theory (D = 1: the normalization's Jacobian projects everything away) from demanding
/// agreement in rounding noise.
fn close(what: &str, a: &[f64], b: &[f64], rtol: f64) {
    assert_eq!(a.len(), b.len(), "{what}: lengths");
    let scale = b.iter().fold(1e-2f64, |m, v| m.max(v.abs()));
    let err = a.iter().zip(b).fold(0f64, |m, (x, y)| m.max((x - y).abs()));
    assert!(
        err <= rtol * scale,
        "{what}: max abs err {err:e} > {rtol:e} * {scale:e}"
    );
}

/// The share of a tensor's largest magnitude below which [`close_each`] holds an element to
/// that floor rather than to its own size.
const FLOOR: f64 = 1.0 / 16.0;

/// Every element within its own size: `|a_i − b_i| ≤ rtol · (|b_i| + FLOOR · max|b|)`, and no
/// NaN on either side. For two computations that work in f32 and round to the storage type
/// once (the fused kernels on either device), not for a composite that rounds every
/// intermediate.
///
/// A bound scaled by the largest element alone (`rtol · max|b|`) passes an all-zero output or
/// gradient whenever every entry is below `rtol · max|b|`: a bf16 softmax over a row of 37
/// (entries near 1/37 < 3e-2) or CZ-NCE's gradients at batch 64. Holding each element to its own
/// size fails such a result at every element that is not tiny. The floor covers entries that
/// cancel to near zero: there both computations round at the size of the terms that cancelled
/// (each a share of the row's largest), not at the size of the result; half precision rounds
/// each stored term to a relative `rtol` at most, so the floor's error is inside
/// `rtol · FLOOR · max|b|` whenever the cancelling terms are below a sixteenth of the largest
/// entry, and an element that large is held to its own size anyway.
fn close_each(what: &str, a: &[f64], b: &[f64], rtol: f64) {
    assert_eq!(a.len(), b.len(), "{what}: lengths");
    let floor = FLOOR * b.iter().fold(0f64, |m, v| m.max(v.abs()));
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        let lim = rtol * (y.abs() + floor);
        assert!(
            (x - y).abs() <= lim,
            "{what}: element {i}: {x:e} vs {y:e} (allowed {lim:e})"
        );
    }
}

fn same(what: &str, a: &Eval, b: &Eval, rtol: f64) {
    close(&format!("{what} loss"), &[a.loss], &[b.loss], rtol);
    close(&format!("{what} dq"), &a.dq, &b.dq, rtol);
    close(&format!("{what} dk"), &a.dk, &b.dk, rtol);
    if let (Some(x), Some(y)) = (a.dls, b.dls) {
        close(&format!("{what} dlog_scale"), &[x], &[y], rtol);
    }
}

/// A seeded standard-normal `[b, d]` f32 tensor on the CPU.
fn randn(b: usize, d: usize, seed: u64) -> Tensor {
    use rand::{Rng, SeedableRng};
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let v: Vec<f32> = (0..b * d)
        .map(|_| rng.sample(rand_distr::StandardNormal))
        .collect();
    Tensor::from_vec(v, (b, d), &Device::Cpu).unwrap()
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn cz_nce_fused_cuda_matches_cpu_and_composite_for_every_option() {
    let gpu = cuda();
    let mut checked = 0;
    for bits in 0u32..32 {
        let loss = CzNce::new()
            .with_temperature(0.1)
            .with_positive_in_denominator(bits & 1 != 0)
            .with_anchor_negatives(bits & 2 != 0)
            .with_target_negatives(bits & 4 != 0)
            .with_symmetric(bits & 8 != 0)
            .with_assume_normalized(bits & 16 != 0);
        for &(b, d) in &[(1usize, 4usize), (2, 1), (3, 5), (33, 70), (130, 257)] {
            if b == 1 && !loss.positive_in_denominator() {
                continue;
            }
            let q = randn(b, d, 7 + b as u64);
            let k = (&q + randn(b, d, 11 + d as u64)).unwrap();
            // Unit rows when the loss assumes them.
            let unit = |x: &Tensor| {
                if bits & 16 != 0 {
                    x.broadcast_div(&x.sqr().unwrap().sum_keepdim(1).unwrap().sqrt().unwrap())
                        .unwrap()
                } else {
                    x.clone()
                }
            };
            let (q, k) = (unit(&q), unit(&k));
            for strided in [false, true] {
                for learnable in [None, Some(0.05)] {
                    let what =
                        format!("bits={bits:05b} B={b} D={d} strided={strided} t={learnable:?}");
                    let gpu_fused = eval_on(&gpu, &loss, true, (&q, &k), strided, learnable);
                    let cpu_fused =
                        eval_on(&Device::Cpu, &loss, true, (&q, &k), strided, learnable);
                    let gpu_comp = eval_on(&gpu, &loss, false, (&q, &k), strided, learnable);
                    same(
                        &format!("{what} cuda fused vs cpu fused"),
                        &gpu_fused,
                        &cpu_fused,
                        1e-4,
                    );
                    same(
                        &format!("{what} cuda fused vs cuda composite"),
                        &gpu_fused,
                        &gpu_comp,
                        1e-4,
                    );
                    checked += 1;
                }
            }
        }
    }
    assert!(checked > 500, "{checked}");
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn cz_nce_cuda_dispatches_to_the_fused_op_and_recompute_matches() {
    let gpu = cuda();
    let q = randn(256, 384, 1).to_device(&gpu).unwrap();
    let k = randn(256, 384, 2).to_device(&gpu).unwrap();
    assert!(CzNce::fused_supported(&q));
    // f64 is fused on the CPU only (the CUDA kernels accumulate in f32).
    assert_eq!(
        CzNce::fused_supported(&q.to_dtype(DType::F64).unwrap()),
        gpu.is_cpu()
    );
    let base = CzNce::new()
        .with_symmetric(true)
        .with_target_negatives(true);
    let a = eval_on(&gpu, &base, true, (&q, &k), false, None);
    let b = eval_on(
        &gpu,
        &base.clone().with_backward_mode(BackwardMode::Recompute),
        true,
        (&q, &k),
        false,
        None,
    );
    same("recompute vs grad-in-forward", &b, &a, 1e-6);
    // forward() on CUDA is the fused op: same numbers as forward_fused.
    let qv = Var::from_tensor(&q).unwrap();
    let kv = Var::from_tensor(&k).unwrap();
    let l = base.forward(qv.as_tensor(), kv.as_tensor()).unwrap();
    close(
        "forward == forward_fused",
        &[to_vec(&l)[0]],
        &[a.loss],
        1e-7,
    );
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn cz_nce_cuda_half_precision_with_huge_logits_stays_finite() {
    // |logit| up to 1e3·(cos ≤ 1) with t = 1e-3, inputs with norms ~1e3 in f16 and bf16: the
    // naive formula overflows in half precision; the fused op accumulates in f32.
    let gpu = cuda();
    let q = (randn(64, 128, 3) * 100.0).unwrap();
    let k = (&q + randn(64, 128, 4)).unwrap();
    let loss = CzNce::new().with_temperature(1e-3);
    let want = eval_on(
        &Device::Cpu,
        &loss,
        true,
        (
            &q.to_dtype(DType::F64).unwrap(),
            &k.to_dtype(DType::F64).unwrap(),
        ),
        false,
        None,
    );
    for dtype in [DType::F16, DType::BF16] {
        let (qh, kh) = (q.to_dtype(dtype).unwrap(), k.to_dtype(dtype).unwrap());
        let got = eval_on(&gpu, &loss, true, (&qh, &kh), false, None);
        assert!(got.loss.is_finite(), "{dtype:?}");
        assert!(
            got.dq.iter().chain(&got.dk).all(|v| v.is_finite()),
            "{dtype:?}"
        );
        // Half-precision inputs change the cosines by ~1e-3 relative, i.e. logits by ~1.
        close(
            &format!("{dtype:?} loss vs f64"),
            &[got.loss],
            &[want.loss],
            0.05,
        );
    }
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn cz_nce_cuda_large_batch_matches_cpu() {
    let gpu = cuda();
    let q = randn(1024, 256, 5);
    let k = (&q + randn(1024, 256, 6)).unwrap();
    let loss = CzNce::new();
    let a = eval_on(&gpu, &loss, true, (&q, &k), false, None);
    let b = eval_on(&Device::Cpu, &loss, true, (&q, &k), false, None);
    same("B=1024 cuda vs cpu", &a, &b, 1e-4);
}

// ---------------------------------------------------------------------------------------------
// The fused encoder ops and AdamW on CUDA (`src/ops/cuda/ops.cu`).

use mlctl::ops::{self, DropoutKey, GeluForm};
use mlctl::train::{AdamW, AdamWConfig, Gradients};

/// A seeded normal tensor of `shape` with standard deviation `std`, f32 on the CPU.
fn randn_shape(shape: &[usize], std: f32, seed: u64) -> Tensor {
    use rand::{Rng, SeedableRng};
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let n = shape.iter().product();
    let v: Vec<f32> = (0..n)
        .map(|_| std * rng.sample::<f32, _>(rand_distr::StandardNormal))
        .collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

/// The three ways an op runs: fused on the GPU, composite on the GPU, fused on the CPU.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Way {
    FusedGpu,
    CompositeGpu,
    FusedCpu,
}

const WAYS: [Way; 3] = [Way::FusedGpu, Way::CompositeGpu, Way::FusedCpu];

/// Runs `f(inputs as vars, fused)` on the way's device, then the backward of `Σ out · r` for a
/// fixed random `r`: the output and the gradient of every input, as f32 CPU tensors.
fn value_and_grads(
    way: Way,
    inputs: &[Tensor],
    dtype: DType,
    f: &dyn Fn(&[Tensor], bool) -> mlctl::Result<Tensor>,
) -> Vec<Tensor> {
    let (dev, fused) = match way {
        Way::FusedGpu => (cuda(), true),
        Way::CompositeGpu => (cuda(), false),
        Way::FusedCpu => (Device::Cpu, true),
    };
    let vars: Vec<Var> = inputs
        .iter()
        .map(|t| Var::from_tensor(&t.to_dtype(dtype).unwrap().to_device(&dev).unwrap()).unwrap())
        .collect();
    let ts: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
    let out = f(&ts, fused).unwrap();
    let r = randn_shape(out.dims(), 1.0, 99)
        .to_dtype(dtype)
        .unwrap()
        .to_device(&dev)
        .unwrap();
    let loss = (out.to_dtype(DType::F32).unwrap() * r.to_dtype(DType::F32).unwrap())
        .unwrap()
        .sum_all()
        .unwrap();
    let grads = loss.backward().unwrap();
    let host = |t: &Tensor| {
        t.to_dtype(DType::F32)
            .unwrap()
            .to_device(&Device::Cpu)
            .unwrap()
    };
    let mut all = vec![host(&out)];
    all.extend(
        vars.iter()
            .map(|v| host(grads.get(v.as_tensor()).expect("a gradient"))),
    );
    all
}

/// Holds the three ways equal on values and gradients: `max |a - b| <= tol * max(1, max |b|)`
/// against the fused CPU op, twice the tolerance for gradients (as `tests/it/ops.rs` holds the CPU
/// twins), and the fused GPU op's every element within its own size ([`close_each`]).
fn check_three_ways(
    what: &str,
    inputs: &[Tensor],
    f: &dyn Fn(&[Tensor], bool) -> mlctl::Result<Tensor>,
) {
    for dtype in [DType::F32, DType::BF16, DType::F16] {
        let runs: Vec<Vec<Tensor>> = WAYS
            .iter()
            .map(|&w| value_and_grads(w, inputs, dtype, f))
            .collect();
        let tol = match dtype {
            DType::F32 => 1e-4,
            DType::F16 => 5e-3,
            _ => 3e-2,
        };
        for (k, name) in ["value"]
            .into_iter()
            .chain(["grad 0", "grad 1", "grad 2"])
            .take(runs[0].len())
            .enumerate()
        {
            let reference = &runs[2][k];
            let scale = reference
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
                .max(1.0) as f64;
            let tol = if k == 0 { tol } else { 2.0 * tol };
            for (i, way) in WAYS.iter().enumerate().take(2) {
                let what = format!("{what} {dtype:?} {name}: {way:?} vs FusedCpu");
                assert_close(&what, &runs[i][k], reference, tol * scale);
                // The fused kernels compute in f32 and round once; the composite rounds every
                // intermediate to the storage type, so it is held to the bound above only.
                if *way == Way::FusedGpu {
                    close_each(&what, &to_vec(&runs[i][k]), &to_vec(reference), tol);
                }
            }
        }
    }
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn fused_layer_norm_on_cuda_matches_composite_and_cpu() {
    for hidden in [1, 37, 300, 1024] {
        let inputs = [
            randn_shape(&[3, 5, hidden], 2.0, 1)
                .affine(1.0, 0.5)
                .unwrap(),
            randn_shape(&[hidden], 1.0, 2),
            randn_shape(&[hidden], 1.0, 3),
        ];
        check_three_ways(
            &format!("layer_norm hidden={hidden}"),
            &inputs,
            &|t, fused| match fused {
                true => ops::layer_norm_fused(&t[0], &t[1], &t[2], 1e-5),
                false => ops::layer_norm_composite(&t[0], &t[1], &t[2], 1e-5),
            },
        );
    }
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn fused_softmax_on_cuda_matches_composite_and_cpu() {
    for keys in [1, 37, 300, 1024] {
        let x = randn_shape(&[2, 3, 4, keys], 3.0, 4);
        // Attention's [batch, 1, 1, keys] with padding, a [queries, keys] mask, and none.
        let pad = Tensor::from_vec(
            (0..2 * keys)
                .map(|i| if i % 7 == 3 { -10_000f32 } else { 0.0 })
                .collect::<Vec<_>>(),
            (2, 1, 1, keys),
            &Device::Cpu,
        )
        .unwrap();
        let per_query = randn_shape(&[4, keys], 1.0, 5);
        for (name, mask) in [
            ("pad", Some(pad)),
            ("per-query", Some(per_query)),
            ("none", None),
        ] {
            let scale = 1.0 / 8f64.sqrt();
            let what = format!("softmax keys={keys} mask={name}");
            match mask {
                Some(m) => check_three_ways(&what, &[x.clone(), m], &|t, fused| match fused {
                    true => ops::softmax_scaled_masked_fused(&t[0], scale, Some(&t[1])),
                    false => ops::softmax_scaled_masked_composite(&t[0], scale, Some(&t[1])),
                }),
                None => {
                    check_three_ways(&what, std::slice::from_ref(&x), &|t, fused| match fused {
                        true => ops::softmax_scaled_masked_fused(&t[0], scale, None),
                        false => ops::softmax_scaled_masked_composite(&t[0], scale, None),
                    })
                }
            }
        }
    }
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn fused_gelu_on_cuda_matches_composite_and_cpu() {
    let x = randn_shape(&[7, 333], 3.0, 6);
    for form in [GeluForm::Erf, GeluForm::Tanh] {
        check_three_ways(
            &format!("gelu {form:?}"),
            std::slice::from_ref(&x),
            &|t, fused| match fused {
                true => ops::gelu_fused(&t[0], form),
                false => ops::gelu_composite(&t[0], form),
            },
        );
    }
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn fused_dropout_on_cuda_matches_composite_and_cpu() {
    let x = randn_shape(&[6, 5, 37], 1.0, 7);
    let key = DropoutKey::new(11, 3).with_sample_offset(5);
    check_three_ways("dropout", &[x], &|t, fused| match fused {
        true => ops::dropout_fused(&t[0], 0.1, key, 4),
        false => ops::dropout_composite(&t[0], 0.1, key, 4),
    });
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn dropout_masks_on_cuda_equal_the_cpu_masks_whole_or_split() {
    let gpu = cuda();
    let keys = [
        DropoutKey::new(0, 0),
        DropoutKey::new(0x1234_5678_9abc_def0, 0xffff_ffff_0000_0007),
        // Samples crossing 2^32: the key's high words change inside the batch.
        DropoutKey::new(42, 9).with_sample_offset(u32::MAX as u64 - 2),
    ];
    for key in keys {
        for (shape, p) in [
            (vec![9, 1], 0.5f32),
            (vec![8, 3, 37], 0.1),
            (vec![5, 1027], 0.25),
        ] {
            // Ones: the output is the mask itself, exact in f32.
            let ones = Tensor::ones(shape.as_slice(), DType::F32, &Device::Cpu).unwrap();
            let cpu = ops::dropout_fused(&ones, p, key, 3).unwrap();
            let whole = ops::dropout_fused(&ones.to_device(&gpu).unwrap(), p, key, 3).unwrap();
            let first = shape[0] / 2;
            let parts = [
                ops::dropout_fused(
                    &ones.narrow(0, 0, first).unwrap().to_device(&gpu).unwrap(),
                    p,
                    key,
                    3,
                )
                .unwrap(),
                ops::dropout_fused(
                    &ones
                        .narrow(0, first, shape[0] - first)
                        .unwrap()
                        .to_device(&gpu)
                        .unwrap(),
                    p,
                    key.advanced(first as u64),
                    3,
                )
                .unwrap(),
            ];
            let split = Tensor::cat(&parts, 0).unwrap();
            let host_mask = ops::dropout_mask(&shape, p, key, 3, DType::F32, &Device::Cpu).unwrap();
            for (name, t) in [("whole", whole), ("split", split)] {
                let diff = common::max_abs_diff(&t.to_device(&Device::Cpu).unwrap(), &cpu);
                assert_eq!(
                    diff, 0.0,
                    "{key:?} {shape:?} {name}: CUDA mask differs from the CPU's"
                );
            }
            assert_eq!(common::max_abs_diff(&cpu, &host_mask), 0.0);
            // Half precision: the same entries dropped.
            for dtype in [DType::BF16, DType::F16] {
                let g = ops::dropout_fused(
                    &ones.to_dtype(dtype).unwrap().to_device(&gpu).unwrap(),
                    p,
                    key,
                    3,
                )
                .unwrap()
                .to_dtype(DType::F32)
                .unwrap()
                .to_device(&Device::Cpu)
                .unwrap();
                let zero_gpu = g.eq(0f32).unwrap();
                let zero_cpu = cpu.eq(0f32).unwrap();
                assert_eq!(
                    zero_gpu
                        .to_dtype(DType::F32)
                        .unwrap()
                        .flatten_all()
                        .unwrap()
                        .to_vec1::<f32>()
                        .unwrap(),
                    zero_cpu
                        .to_dtype(DType::F32)
                        .unwrap()
                        .flatten_all()
                        .unwrap()
                        .to_vec1::<f32>()
                        .unwrap(),
                    "{dtype:?} {key:?} {shape:?}"
                );
            }
        }
    }
}

/// `steps` AdamW updates of the same parameters and gradients on `dev` (fused): the parameters
/// and the state tensors, as f32 CPU tensors by name.
fn adamw_run(dev: &Device, dtype: DType, steps: usize) -> Vec<(String, Tensor)> {
    let shapes: [(&str, &[usize]); 3] = [
        ("layer.weight", &[37, 300]),
        ("layer.bias", &[300]),
        ("LayerNorm.weight", &[1]),
    ];
    let vars: Vec<(String, Var)> = shapes
        .iter()
        .enumerate()
        .map(|(i, (name, shape))| {
            let t = randn_shape(shape, 0.5, 20 + i as u64)
                .to_dtype(dtype)
                .unwrap()
                .to_device(dev)
                .unwrap();
            (name.to_string(), Var::from_tensor(&t).unwrap())
        })
        .collect();
    let mut opt = AdamW::new(vars.clone(), AdamWConfig::default()).unwrap();
    for step in 0..steps {
        let grads: Gradients = shapes
            .iter()
            .enumerate()
            .map(|(i, (name, shape))| {
                let g = randn_shape(shape, 1.0, 100 * step as u64 + i as u64)
                    .to_dtype(dtype)
                    .unwrap()
                    .to_device(dev)
                    .unwrap();
                (name.to_string(), g)
            })
            .collect();
        opt.step(&grads, 1e-3 * (step + 1) as f64).unwrap();
    }
    let host = |t: &Tensor| {
        t.to_dtype(DType::F32)
            .unwrap()
            .to_device(&Device::Cpu)
            .unwrap()
    };
    let mut out: Vec<(String, Tensor)> = vars
        .iter()
        .map(|(n, v)| (n.clone(), host(v.as_tensor())))
        .collect();
    let mut state: Vec<_> = opt.state_tensors().unwrap().into_iter().collect();
    state.sort_by(|a, b| a.0.cmp(&b.0));
    out.extend(state.into_iter().map(|(n, t)| (n, host(&t))));
    out
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn adamw_on_cuda_matches_the_fused_cpu_update() {
    let gpu = cuda();
    for dtype in [DType::F32, DType::BF16, DType::F16] {
        let on_gpu = adamw_run(&gpu, dtype, 5);
        let on_cpu = adamw_run(&Device::Cpu, dtype, 5);
        assert_eq!(on_gpu.len(), on_cpu.len());
        if dtype != DType::F32 {
            assert!(on_gpu.iter().any(|(n, _)| n.starts_with("master.")));
        }
        for ((name, g), (name_cpu, c)) in on_gpu.iter().zip(&on_cpu) {
            assert_eq!(name, name_cpu);
            // The same f32 operations in the same order, with the same roundings: equal bits
            // expected; the tolerance only keeps a report readable if they are not.
            assert_close(&format!("adamw {dtype:?} {name}"), g, c, 1e-6);
        }
    }
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn fused_ops_on_cuda_reject_bad_inputs_with_typed_errors() {
    use mlctl::Error;
    let gpu = cuda();
    let on = |t: Tensor| t.to_device(&gpu).unwrap();
    let x = on(randn_shape(&[4, 24], 1.0, 1));
    let w = on(randn_shape(&[24], 1.0, 2));
    let b = on(randn_shape(&[24], 1.0, 3));
    assert!(matches!(
        ops::layer_norm_fused(&x, &w.narrow(0, 0, 5).unwrap(), &b, 1e-5),
        Err(Error::ShapeMismatch { .. })
    ));
    assert!(matches!(
        ops::layer_norm_fused(&x, &w.to_dtype(DType::BF16).unwrap(), &b, 1e-5),
        Err(Error::Candle(
            candle_core::Error::DTypeMismatchBinaryOp { .. }
        ))
    ));
    let mask = on(Tensor::zeros((4, 5), DType::F32, &Device::Cpu).unwrap());
    assert!(matches!(
        ops::softmax_scaled_masked_fused(&x, 1.0, Some(&mask)),
        Err(Error::ShapeMismatch { .. })
    ));
    assert!(matches!(
        ops::dropout_fused(&x, 1.5, DropoutKey::default(), 0),
        Err(Error::InvalidArgument(_))
    ));
    if gpu.is_cuda() {
        // Inputs on two devices.
        let w_cpu = w.to_device(&Device::Cpu).unwrap();
        assert!(matches!(
            ops::layer_norm_fused(&x, &w_cpu, &b, 1e-5),
            Err(Error::Candle(
                candle_core::Error::DeviceMismatchBinaryOp { .. }
            ))
        ));
        // f64 has no CUDA kernel: a typed error from the fused form, the composite from the
        // plain one.
        let x64 = x.to_dtype(DType::F64).unwrap();
        let (w64, b64) = (
            w.to_dtype(DType::F64).unwrap(),
            b.to_dtype(DType::F64).unwrap(),
        );
        assert!(matches!(
            ops::layer_norm_fused(&x64, &w64, &b64, 1e-5),
            Err(Error::Candle(candle_core::Error::UnsupportedDTypeForOp(..)))
        ));
        assert!(matches!(
            ops::gelu_fused(&x64, GeluForm::Erf),
            Err(Error::Candle(candle_core::Error::UnsupportedDTypeForOp(..)))
        ));
        assert!(matches!(
            ops::softmax_scaled_masked_fused(&x64, 1.0, None),
            Err(Error::Candle(candle_core::Error::UnsupportedDTypeForOp(..)))
        ));
        assert!(matches!(
            ops::dropout_fused(&x64, 0.1, DropoutKey::default(), 0),
            Err(Error::Candle(candle_core::Error::UnsupportedDTypeForOp(..)))
        ));
        let plain = ops::layer_norm(&x64, &w64, &b64, 1e-5).unwrap();
        let composite = ops::layer_norm_composite(&x64, &w64, &b64, 1e-5).unwrap();
        assert_eq!(
            common::max_abs_diff(
                &plain.to_device(&Device::Cpu).unwrap(),
                &composite.to_device(&Device::Cpu).unwrap()
            ),
            0.0
        );
        assert!(ops::softmax_scaled_masked(&x64, 1.0, None).is_ok());
        assert!(ops::gelu(&x64, GeluForm::Tanh).is_ok());
        assert!(ops::dropout(&x64, 0.1, DropoutKey::default(), 0).is_ok());
    }
}
