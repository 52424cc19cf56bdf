//! CUDA checks, ready for a machine with a GPU:
//! `cargo test --release --features cuda --test gpu -- --ignored`.
//!
//! `MLCTL_GPU_TESTS_ON_CPU=1 cargo test --release --test gpu -- --ignored` runs the same checks
//! with the CPU standing in for the GPU (no `cuda` feature needed): a dry run of the test code
//! itself, so that a rare GPU session is not spent on a broken test.

mod common;

use candle_core::{DType, Device, Tensor, Var};
use common::{assert_close, fixture, golden};
use mlctl::encoder::PretrainedBert;
use mlctl::loss::cz_nce::BackwardMode;
use mlctl::loss::CzNce;

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
        assert_close(&format!("{dtype:?} loss"), &loss_gpu, &loss_cpu, tol);
        assert_close(&format!("{dtype:?} dq"), &dq_gpu, &dq_cpu, tol);
        assert_close(&format!("{dtype:?} dk"), &dk_gpu, &dk_cpu, tol);
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
