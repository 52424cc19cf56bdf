//! AdamW, the schedules, clipping and loss scaling against values computed by hand in plain
//! f64; the fused AdamW against its composite twin; mixed precision.

use candle_core::{DType, Device, Tensor, Var};
use mlctl::train::{
    clip_grad_norm, global_grad_norm, is_no_decay, AdamW, AdamWConfig, Decay, Gradients,
    LossScaler, LrSchedule,
};

/// PyTorch's AdamW update for one scalar parameter, written out.
fn reference_adamw(mut p: f64, grads: &[f64], lr: f64, cfg: AdamWConfig, decay: bool) -> f64 {
    let (mut m, mut v) = (0.0, 0.0);
    for (t, &g) in grads.iter().enumerate() {
        let t = (t + 1) as i32;
        if decay {
            p *= 1.0 - lr * cfg.weight_decay;
        }
        m = cfg.beta1 * m + (1.0 - cfg.beta1) * g;
        v = cfg.beta2 * v + (1.0 - cfg.beta2) * g * g;
        let m_hat = m / (1.0 - cfg.beta1.powi(t));
        let v_hat = v / (1.0 - cfg.beta2.powi(t));
        p -= lr * m_hat / (v_hat.sqrt() + cfg.eps);
    }
    p
}

#[test]
fn adamw_matches_the_written_out_update_and_skips_decay_for_biases_and_layer_norms() {
    let cfg = AdamWConfig {
        weight_decay: 0.1,
        ..Default::default()
    };
    let start = [0.5f64, -1.5, 2.0];
    let steps = [[0.3f64, -0.2, 1.0], [-0.1, 0.4, 0.05], [0.2, 0.2, -0.7]];
    let var = |name: &str| {
        (
            name.to_string(),
            Var::new(&start.map(|x| x as f32), &Device::Cpu).unwrap(),
        )
    };
    let vars = [
        var("layer.dense.weight"),
        var("layer.dense.bias"),
        var("layer.LayerNorm.weight"),
    ];
    let mut opt = AdamW::new(vars.clone(), cfg).unwrap();
    let (decay, no_decay) = opt.groups();
    assert_eq!(decay, ["layer.dense.weight"]);
    assert_eq!(no_decay, ["layer.LayerNorm.weight", "layer.dense.bias"]);
    let lr = 0.01;
    for g in &steps {
        let grads: Gradients = vars
            .iter()
            .map(|(n, _)| {
                (
                    n.clone(),
                    Tensor::new(&g.map(|x| x as f32), &Device::Cpu).unwrap(),
                )
            })
            .collect();
        opt.step(&grads, lr).unwrap();
    }
    assert_eq!(opt.step_count(), 3);
    for (name, v) in &vars {
        let got = v.as_tensor().to_vec1::<f32>().unwrap();
        for (k, &x) in got.iter().enumerate() {
            let grads: Vec<f64> = steps.iter().map(|g| g[k]).collect();
            let want = reference_adamw(start[k], &grads, lr, cfg, !is_no_decay(name));
            assert!((x as f64 - want).abs() < 1e-6, "{name}[{k}]: {x} vs {want}");
        }
    }
}

/// A parameter without a gradient in some steps counts only its own updates for the bias
/// correction, as PyTorch's optimizers do (they keep a step per parameter); the counts survive
/// a save and load, and a state without them (older checkpoints) takes the global count.
#[test]
fn each_parameter_counts_its_own_steps_for_bias_correction() {
    let cfg = AdamWConfig {
        weight_decay: 0.0,
        ..Default::default()
    };
    let vars = [
        (
            "every.weight".to_string(),
            Var::new(&[0.5f32], &Device::Cpu).unwrap(),
        ),
        (
            "some.weight".to_string(),
            Var::new(&[0.5f32], &Device::Cpu).unwrap(),
        ),
    ];
    let grads = |names: &[&str], g: f32| -> Gradients {
        names
            .iter()
            .map(|n| (n.to_string(), Tensor::new(&[g], &Device::Cpu).unwrap()))
            .collect()
    };
    let (lr, every, some) = (0.01, [0.3, -0.1, 0.2], [0.3, 0.2]);
    let mut opt = AdamW::new(vars.clone(), cfg).unwrap();
    opt.step(&grads(&["every.weight", "some.weight"], 0.3), lr)
        .unwrap();
    opt.step(&grads(&["every.weight"], -0.1), lr).unwrap();
    // A second optimizer resumes from the saved state, a third from the state of an older
    // checkpoint (no per-parameter counts: every parameter takes the global count of 2).
    let saved = opt.state_tensors().unwrap();
    let legacy: std::collections::HashMap<_, _> = saved
        .iter()
        .filter(|(k, _)| !k.starts_with("step."))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let restart = |state: &std::collections::HashMap<String, Tensor>| {
        let vars: Vec<(String, Var)> = vars
            .iter()
            .map(|(n, v)| {
                (
                    n.clone(),
                    Var::from_tensor(&v.as_tensor().copy().unwrap()).unwrap(),
                )
            })
            .collect();
        let mut o = AdamW::new(vars.clone(), cfg).unwrap();
        o.load_state(state, 2).unwrap();
        (o, vars)
    };
    let (mut resumed, resumed_vars) = restart(&saved);
    let (mut old, old_vars) = restart(&legacy);
    let last = grads(&["every.weight", "some.weight"], 0.2);
    opt.step(&last, lr).unwrap();
    resumed.step(&last, lr).unwrap();
    old.step(&last, lr).unwrap();
    let value = |v: &Var| v.as_tensor().to_vec1::<f32>().unwrap()[0] as f64;
    let want_every = reference_adamw(0.5, &every, lr, cfg, false);
    // Two updates of its own: the second bias-corrected as t = 2, not 3.
    let want_some = reference_adamw(0.5, &some, lr, cfg, false);
    for (what, vars) in [("live", &vars[..]), ("resumed", &resumed_vars[..])] {
        assert!(
            (value(&vars[0].1) - want_every).abs() < 1e-6,
            "{what}: every"
        );
        assert!((value(&vars[1].1) - want_some).abs() < 1e-6, "{what}: some");
    }
    // The older state corrects "some" as t = 3: a different value, by more than rounding.
    assert!((value(&old_vars[1].1) - want_some).abs() > 1e-4);
    assert!((value(&old_vars[0].1) - want_every).abs() < 1e-6);
}

#[test]
fn schedules_warm_up_then_decay_to_zero() {
    let s = |decay| LrSchedule {
        peak_lr: 1.0,
        warmup_steps: 4,
        total_steps: 14,
        decay,
    };
    let lrs = |decay| (0..15).map(|t| s(decay).lr(t)).collect::<Vec<_>>();
    let linear = lrs(Decay::Linear);
    assert_eq!(&linear[..4], &[0.25, 0.5, 0.75, 1.0]);
    assert_eq!(linear[4], 1.0);
    assert!((linear[9] - 0.5).abs() < 1e-12);
    assert_eq!(linear[14], 0.0);
    let cosine = lrs(Decay::Cosine);
    assert!((cosine[9] - 0.5).abs() < 1e-12, "half-way down the cosine");
    assert!((cosine[6] - 0.5 * (1.0 + (std::f64::consts::PI * 0.2).cos())).abs() < 1e-12);
    assert!(cosine[14].abs() < 1e-12);
    assert!(lrs(Decay::Constant)[4..].iter().all(|&x| x == 1.0));
}

#[test]
fn clipping_scales_to_the_global_norm_and_leaves_small_gradients_alone() {
    let mut grads = Gradients::new();
    grads.insert("a".into(), Tensor::new(&[3f32, 0.0], &Device::Cpu).unwrap());
    grads.insert("b".into(), Tensor::new(&[4f32], &Device::Cpu).unwrap());
    let norm = clip_grad_norm(&mut grads, 1.0).unwrap();
    assert!((norm - 5.0).abs() < 1e-9);
    let a = grads["a"].to_vec1::<f32>().unwrap();
    let b = grads["b"].to_vec1::<f32>().unwrap();
    assert!(
        (a[0] - 0.6).abs() < 1e-5 && (b[0] - 0.8).abs() < 1e-5,
        "{a:?} {b:?}"
    );
    let before = grads["a"].to_vec1::<f32>().unwrap();
    assert!((clip_grad_norm(&mut grads, 10.0).unwrap() - 1.0).abs() < 1e-5);
    assert_eq!(grads["a"].to_vec1::<f32>().unwrap(), before);
}

#[test]
fn the_reference_schedule_drops_tenfold_at_two_four_and_five_sixths() {
    // The reference: MultiStepLR(milestones=[2 * per, 4 * per, 5 * per], gamma=0.1) with
    // per = total // 6; 400 steps give milestones 132, 264 and 330.
    let s = LrSchedule {
        peak_lr: 2e-6,
        warmup_steps: 0,
        total_steps: 400,
        decay: Decay::MultiStep,
    };
    let want = |step: u64| match step {
        0..132 => 2e-6,
        132..264 => 2e-7,
        264..330 => 2e-8,
        _ => 2e-9,
    };
    for step in [0, 131, 132, 263, 264, 329, 330, 399, 400] {
        let (got, want) = (s.lr(step), want(step));
        assert!(
            (got - want).abs() <= 1e-12 * want,
            "step {step}: {got} vs {want}"
        );
    }
    // After a warm-up the milestones count from its end: 4 + [2, 4, 5] for a span of 6.
    let warm = LrSchedule {
        peak_lr: 1.0,
        warmup_steps: 4,
        total_steps: 10,
        decay: Decay::MultiStep,
    };
    let lrs: Vec<f64> = (0..10).map(|t| warm.lr(t)).collect();
    let want = [0.25, 0.5, 0.75, 1.0, 1.0, 1.0, 0.1, 0.1, 0.01, 0.001];
    for (t, (g, w)) in lrs.iter().zip(want).enumerate() {
        assert!((g - w).abs() < 1e-15, "step {t}: {g} vs {w}");
    }
}

#[test]
fn a_learning_rate_scale_applies_to_its_prefix_only() {
    let cfg = AdamWConfig {
        weight_decay: 0.0,
        ..Default::default()
    };
    let start = [0.5f64, -1.5];
    let steps = [[0.3f64, -0.2], [-0.1, 0.4], [0.2, 0.2]];
    let vars: Vec<(String, Var)> = ["mlctl.projection.fc1.weight", "bert.pooler.dense.weight"]
        .iter()
        .map(|n| {
            (
                n.to_string(),
                Var::new(&start.map(|x| x as f32), &Device::Cpu).unwrap(),
            )
        })
        .collect();
    let mut opt = AdamW::new(vars.clone(), cfg)
        .unwrap()
        .with_lr_scale("mlctl.", 50.0);
    // A decaying schedule: the scaled rate follows it.
    let lrs = [1e-3, 5e-4, 1e-4];
    for (g, lr) in steps.iter().zip(lrs) {
        let grads: Gradients = vars
            .iter()
            .map(|(n, _)| {
                (
                    n.clone(),
                    Tensor::new(&g.map(|x| x as f32), &Device::Cpu).unwrap(),
                )
            })
            .collect();
        opt.step(&grads, lr).unwrap();
    }
    for ((name, v), scale) in vars.iter().zip([50.0, 1.0]) {
        let got = v.as_tensor().to_vec1::<f32>().unwrap();
        for (k, &x) in got.iter().enumerate() {
            // Written out: the same update with each step's rate times the scale.
            let (mut p, mut m, mut v2) = (start[k], 0.0, 0.0);
            for (t, (g, lr)) in steps.iter().zip(lrs).enumerate() {
                let t = (t + 1) as i32;
                m = cfg.beta1 * m + (1.0 - cfg.beta1) * g[k];
                v2 = cfg.beta2 * v2 + (1.0 - cfg.beta2) * g[k] * g[k];
                let m_hat = m / (1.0 - cfg.beta1.powi(t));
                let v_hat = v2 / (1.0 - cfg.beta2.powi(t));
                p -= lr * scale * m_hat / (v_hat.sqrt() + cfg.eps);
            }
            assert!((x as f64 - p).abs() < 1e-6, "{name}[{k}]: {x} vs {p}");
        }
    }
}

/// Named variables of assorted shapes and dtypes, decay and no-decay, with deterministic values.
fn params(dtype: DType, seed: u64) -> Vec<(String, Var)> {
    use rand::{Rng, SeedableRng};
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    [
        ("enc.dense.weight", vec![37, 29]),
        ("enc.dense.bias", vec![29]),
        ("enc.LayerNorm.weight", vec![70_001]),
        ("mlctl.projection.fc1.weight", vec![3, 5, 7]),
    ]
    .into_iter()
    .map(|(name, shape)| {
        let n: usize = shape.iter().product();
        let data: Vec<f32> = (0..n).map(|_| rng.random_range(-1.0..1.0)).collect();
        let t = Tensor::from_vec(data, shape, &Device::Cpu)
            .unwrap()
            .to_dtype(dtype)
            .unwrap();
        (name.to_string(), Var::from_tensor(&t).unwrap())
    })
    .collect()
}

fn random_grads(vars: &[(String, Var)], dtype: DType, seed: u64) -> Gradients {
    use rand::{Rng, SeedableRng};
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    vars.iter()
        .map(|(n, v)| {
            let data: Vec<f32> = (0..v.elem_count())
                .map(|i| match i % 97 {
                    0 => 0.0, // exact zeros: the sign of zero must agree too
                    _ => rng.random_range(-2.0..2.0),
                })
                .collect();
            let g = Tensor::from_vec(data, v.shape(), &Device::Cpu)
                .unwrap()
                .to_dtype(dtype)
                .unwrap();
            (n.clone(), g)
        })
        .collect()
}

fn bits(t: &Tensor) -> Vec<u64> {
    let t = t.flatten_all().unwrap();
    match t.dtype() {
        DType::F32 => t
            .to_vec1::<f32>()
            .unwrap()
            .iter()
            .map(|x| x.to_bits() as u64)
            .collect(),
        DType::F64 => t
            .to_vec1::<f64>()
            .unwrap()
            .iter()
            .map(|x| x.to_bits())
            .collect(),
        DType::BF16 => t
            .to_vec1::<half::bf16>()
            .unwrap()
            .iter()
            .map(|x| x.to_bits() as u64)
            .collect(),
        DType::F16 => t
            .to_vec1::<half::f16>()
            .unwrap()
            .iter()
            .map(|x| x.to_bits() as u64)
            .collect(),
        // Step counts.
        DType::I64 => t
            .to_vec1::<i64>()
            .unwrap()
            .iter()
            .map(|&x| x as u64)
            .collect(),
        other => panic!("{other:?}"),
    }
}

#[test]
fn the_fused_adamw_equals_its_composite_twin_bit_for_bit() {
    let cfg = AdamWConfig {
        weight_decay: 0.1,
        ..Default::default()
    };
    for dtype in [DType::F32, DType::BF16, DType::F16, DType::F64] {
        let (fused_vars, composite_vars) = (params(dtype, 1), params(dtype, 1));
        let mut fused = AdamW::new(fused_vars.clone(), cfg)
            .unwrap()
            .with_lr_scale("mlctl.", 3.0);
        let mut composite = AdamW::new(composite_vars.clone(), cfg)
            .unwrap()
            .with_fused(false)
            .unwrap()
            .with_lr_scale("mlctl.", 3.0);
        for step in 0..4 {
            // Gradients in the parameters' dtype, and in f32 (as after loss unscaling).
            let gdtype = if step % 2 == 0 { dtype } else { DType::F32 };
            let mut grads = random_grads(&fused_vars, gdtype, 10 + step);
            if step == 2 {
                grads.remove("enc.dense.bias"); // a parameter without a gradient stays put
            }
            fused.step(&grads, 1e-2 / (step + 1) as f64).unwrap();
            composite.step(&grads, 1e-2 / (step + 1) as f64).unwrap();
        }
        for ((name, a), (_, b)) in fused_vars.iter().zip(&composite_vars) {
            assert_eq!(bits(a.as_tensor()), bits(b.as_tensor()), "{dtype:?} {name}");
        }
        let (sa, sb) = (
            fused.state_tensors().unwrap(),
            composite.state_tensors().unwrap(),
        );
        assert_eq!(sa.len(), sb.len());
        let masters = sa.keys().filter(|k| k.starts_with("master.")).count();
        let expected = if matches!(dtype, DType::BF16 | DType::F16) {
            4
        } else {
            0
        };
        assert_eq!(masters, expected, "{dtype:?} master copies");
        for (key, t) in &sa {
            assert_eq!(bits(t), bits(&sb[key]), "{dtype:?} {key}");
        }
    }
}

#[test]
fn a_bf16_model_moves_as_an_f32_one_over_1000_small_steps() {
    // At lr 2e-6 each update is far below bf16's resolution (2^-8 relative): without f32
    // master weights every one is rounded away and the bf16 model never moves.
    let cfg = AdamWConfig {
        weight_decay: 0.01,
        ..Default::default()
    };
    let init: Vec<f32> = (0..512).map(|i| 0.05 + 0.15 * (i as f32 / 512.0)).collect();
    let target: Vec<f32> = init.iter().map(|x| -x).collect();
    let train = |dtype: DType| -> Vec<f32> {
        let t = Tensor::new(init.as_slice(), &Device::Cpu)
            .unwrap()
            .to_dtype(dtype)
            .unwrap();
        let var = Var::from_tensor(&t).unwrap();
        let target = Tensor::new(target.as_slice(), &Device::Cpu)
            .unwrap()
            .to_dtype(dtype)
            .unwrap();
        let name = "layer.dense.weight".to_string();
        let mut opt = AdamW::new([(name.clone(), var.clone())], cfg).unwrap();
        for _ in 0..1000 {
            // A loss computed in the model's dtype, as a bf16 model would.
            let loss = (var.as_tensor() - &target)
                .unwrap()
                .sqr()
                .unwrap()
                .sum_all()
                .unwrap();
            let grad = loss.backward().unwrap().remove(var.as_tensor()).unwrap();
            opt.step(&Gradients::from([(name.clone(), grad)]), 2e-6)
                .unwrap();
        }
        var.as_tensor()
            .to_dtype(DType::F32)
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
    };
    let (full, half) = (train(DType::F32), train(DType::BF16));
    let mut moved = 0;
    for (i, ((&f, &h), &x0)) in full.iter().zip(&half).zip(&init).enumerate() {
        let start = half::bf16::from_f32(x0).to_f32();
        // One unit in the last place of bf16 (8 significant bits) at the larger of the two.
        let ulp = 2f32.powi(f.abs().max(h.abs()).log2().floor() as i32 - 7);
        // Within bf16 rounding of where the f32 model went.
        assert!(
            (h - f).abs() <= ulp,
            "[{i}] bf16 {h} vs f32 {f} (ulp {ulp})"
        );
        assert!(f < x0 - 1.5e-3, "[{i}] the f32 model moved {}", x0 - f);
        if h != start {
            moved += 1;
        }
    }
    assert!(moved > 500, "only {moved} of 512 bf16 weights moved");
}

#[test]
fn master_weights_survive_a_checkpoint_and_older_checkpoints_still_load() {
    let cfg = AdamWConfig::default();
    let run = |steps: std::ops::Range<u64>, opt: &mut AdamW, vars: &[(String, Var)]| {
        for s in steps {
            opt.step(&random_grads(vars, DType::BF16, s), 1e-4).unwrap();
        }
    };
    let straight_vars = params(DType::BF16, 2);
    let mut straight = AdamW::new(straight_vars.clone(), cfg).unwrap();
    run(0..6, &mut straight, &straight_vars);

    let vars = params(DType::BF16, 2);
    let mut first = AdamW::new(vars.clone(), cfg).unwrap();
    run(0..3, &mut first, &vars);
    let saved = first.state_tensors().unwrap();
    let snapshot: Vec<Tensor> = vars
        .iter()
        .map(|(_, v)| v.as_tensor().copy().unwrap())
        .collect();
    // A fresh optimizer over freshly initialised variables, restored as the trainer does:
    // the weights first, then the optimizer state.
    let fresh = params(DType::BF16, 99);
    for ((_, v), t) in fresh.iter().zip(&snapshot) {
        v.set(t).unwrap();
    }
    let mut resumed = AdamW::new(fresh.clone(), cfg).unwrap();
    resumed.load_state(&saved, first.step_count()).unwrap();
    run(3..6, &mut resumed, &fresh);
    for ((name, a), (_, b)) in straight_vars.iter().zip(&fresh) {
        assert_eq!(bits(a.as_tensor()), bits(b.as_tensor()), "{name}");
    }

    // Without master copies (an older checkpoint) they are taken from the bf16 weights.
    let legacy: std::collections::HashMap<String, Tensor> = saved
        .into_iter()
        .filter(|(k, _)| !k.starts_with("master."))
        .collect();
    // The weights are restored after the optimizer was built, as the trainer does: load_state
    // must read them then.
    let old_vars = params(DType::BF16, 3);
    let mut old = AdamW::new(old_vars.clone(), cfg).unwrap();
    for ((_, v), t) in old_vars.iter().zip(&snapshot) {
        v.set(t).unwrap();
    }
    old.load_state(&legacy, 3).unwrap();
    let restored = old.state_tensors().unwrap();
    for ((name, _), t) in vars.iter().zip(&snapshot) {
        assert_eq!(
            bits(&restored[&format!("master.{name}")]),
            bits(&t.to_dtype(DType::F32).unwrap()),
        );
    }
}

#[test]
fn the_global_norm_is_one_f64_reduction_over_every_gradient() {
    let vars = params(DType::F32, 4);
    let mut grads = random_grads(&vars, DType::F32, 5);
    grads.insert(
        "half".into(),
        Tensor::new(&[3f32, -4.0], &Device::Cpu)
            .unwrap()
            .to_dtype(DType::BF16)
            .unwrap(),
    );
    let want: f64 = grads
        .values()
        .flat_map(|g| {
            g.to_dtype(DType::F64)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f64>()
                .unwrap()
        })
        .map(|x| x * x)
        .sum::<f64>()
        .sqrt();
    let got = global_grad_norm(&grads).unwrap();
    assert!((got - want).abs() <= 1e-12 * want, "{got} vs {want}");
    // A non-contiguous gradient is read in its logical order.
    let t = Tensor::new(&[[1f32, 2.0], [3.0, 4.0]], &Device::Cpu).unwrap();
    let transposed = Gradients::from([("t".to_string(), t.t().unwrap())]);
    assert!((global_grad_norm(&transposed).unwrap() - 30f64.sqrt()).abs() < 1e-12);
    // One non-finite element makes the norm non-finite (the step is then skipped).
    grads.insert(
        "bad".into(),
        Tensor::new(&[1f32, f32::NAN], &Device::Cpu).unwrap(),
    );
    assert!(!global_grad_norm(&grads).unwrap().is_finite());
}

#[test]
fn the_loss_scaler_backs_off_on_overflow_and_grows_after_an_interval() {
    let mut s = LossScaler::new(1024.0).unwrap();
    s.growth_interval = 3;
    let mut seen = vec![];
    for finite in [true, true, false, true, true, true, true, false, false] {
        s.update(finite);
        seen.push(s.scale());
    }
    assert_eq!(
        seen,
        [1024.0, 1024.0, 512.0, 512.0, 512.0, 1024.0, 1024.0, 512.0, 256.0]
    );
    assert!(LossScaler::new(0.0).is_err() && LossScaler::new(f64::NAN).is_err());
}

#[test]
fn loss_scaling_keeps_small_f16_gradients_from_underflowing() {
    // d/dw of sum(w * x) * 1e-4 is 1e-4 * x: with x ~ 1e-4 these gradients (~1e-8) are below
    // f16's smallest subnormal (6e-8) and vanish unless the loss is scaled. The model's part is
    // f16, the loss's reduction f32 (as mlctl's losses are).
    let x: Vec<f32> = (1..=64).map(|i| 1e-4 * i as f32 / 64.0).collect();
    let w = Var::from_tensor(&Tensor::ones(64, DType::F16, &Device::Cpu).unwrap()).unwrap();
    let xs = Tensor::new(x.as_slice(), &Device::Cpu)
        .unwrap()
        .to_dtype(DType::F16)
        .unwrap();
    let loss = ((w.as_tensor() * &xs).unwrap().to_dtype(DType::F32).unwrap() * 1e-4)
        .unwrap()
        .sum_all()
        .unwrap();
    let want: Vec<f64> = xs
        .to_dtype(DType::F64)
        .unwrap()
        .to_vec1::<f64>()
        .unwrap()
        .iter()
        .map(|x| x * 1e-4)
        .collect();
    let grads_of = |scaler: Option<&LossScaler>| -> Vec<f64> {
        let loss = match scaler {
            Some(s) => s.scale_loss(&loss).unwrap(),
            None => loss.clone(),
        };
        let g = loss.backward().unwrap().remove(w.as_tensor()).unwrap();
        assert_eq!(g.dtype(), DType::F16);
        let mut grads = Gradients::from([("w".to_string(), g)]);
        if let Some(s) = scaler {
            s.unscale(&mut grads).unwrap();
            assert_eq!(grads["w"].dtype(), DType::F32);
        }
        grads["w"]
            .to_dtype(DType::F64)
            .unwrap()
            .to_vec1::<f64>()
            .unwrap()
    };
    let unscaled = grads_of(None);
    let lost = unscaled.iter().filter(|&&g| g == 0.0).count();
    assert!(lost > 32, "only {lost} of 64 f16 gradients underflowed");
    let scaler = LossScaler::default();
    // Within f16 rounding: 2^-11 relative per op, and one step of f16's subnormals (2^-24)
    // where the scaled gradient is that small, divided by the scale.
    let subnormal = 2f64.powi(-24) / scaler.scale();
    for (i, (g, w)) in grads_of(Some(&scaler)).iter().zip(&want).enumerate() {
        assert!((g - w).abs() <= 2e-3 * w + subnormal, "[{i}] {g} vs {w}");
    }
}

/// Step time of AdamW at multilingual-e5-small's shape (a 250037 x 384 word-embedding table and
/// the ~21M parameters of 12 layers), fused and composite, and of the global norm. Prints
/// times; run by hand in release:
/// `cargo test --release --test it optimizer::adamw_step_time -- --ignored --nocapture`.
#[test]
#[ignore]
fn adamw_step_time_at_the_e5_small_shape() {
    let h = 384;
    let mut shapes: Vec<(String, Vec<usize>)> = vec![
        ("embeddings.word_embeddings.weight".into(), vec![250_037, h]),
        ("embeddings.position_embeddings.weight".into(), vec![512, h]),
    ];
    for l in 0..12 {
        for (n, s) in [
            ("q.weight", vec![h, h]),
            ("k.weight", vec![h, h]),
            ("v.weight", vec![h, h]),
            ("o.weight", vec![h, h]),
            ("up.weight", vec![4 * h, h]),
            ("down.weight", vec![h, 4 * h]),
            ("up.bias", vec![4 * h]),
            ("o.bias", vec![h]),
            ("LayerNorm.weight", vec![h]),
        ] {
            shapes.push((format!("layer.{l}.{n}"), s));
        }
    }
    let total: usize = shapes
        .iter()
        .map(|(_, s)| s.iter().product::<usize>())
        .sum();
    eprintln!(
        "{} tensors, {:.1}M parameters",
        shapes.len(),
        total as f64 / 1e6
    );
    let make = |dtype: DType| -> (Vec<(String, Var)>, Gradients) {
        let vars: Vec<(String, Var)> = shapes
            .iter()
            .map(|(n, s)| {
                let t = Tensor::randn(0f32, 0.02, s.as_slice(), &Device::Cpu)
                    .unwrap()
                    .to_dtype(dtype)
                    .unwrap();
                (n.clone(), Var::from_tensor(&t).unwrap())
            })
            .collect();
        let grads = vars
            .iter()
            .map(|(n, v)| {
                let g = Tensor::randn(0f32, 1e-3, v.shape(), &Device::Cpu)
                    .unwrap()
                    .to_dtype(dtype)
                    .unwrap();
                (n.clone(), g)
            })
            .collect();
        (vars, grads)
    };
    let time = |label: &str, f: &mut dyn FnMut()| {
        f(); // warm-up: first touch of the state
        let reps = 3;
        let start = std::time::Instant::now();
        for _ in 0..reps {
            f();
        }
        let s = start.elapsed().as_secs_f64() / reps as f64;
        eprintln!("{label:<40} {s:.3} s");
        s
    };
    for dtype in [DType::F32, DType::BF16] {
        let (vars, grads) = make(dtype);
        let mut fused = AdamW::new(vars.clone(), AdamWConfig::default()).unwrap();
        let f = time(&format!("AdamW step, fused, {dtype:?}"), &mut || {
            fused.step(&grads, 1e-5).unwrap()
        });
        drop(fused);
        let mut composite = AdamW::new(vars.clone(), AdamWConfig::default())
            .unwrap()
            .with_fused(false)
            .unwrap();
        let c = time(&format!("AdamW step, composite, {dtype:?}"), &mut || {
            composite.step(&grads, 1e-5).unwrap()
        });
        eprintln!("composite / fused: {:.1}x", c / f);
        drop(composite);
        if dtype == DType::F32 {
            let n = time("global norm (one reduction)", &mut || {
                global_grad_norm(&grads).unwrap();
            });
            // The per-tensor loop clipping used before: one reduction and host read each.
            let p = time("global norm (per-tensor reads)", &mut || {
                let mut total = 0f64;
                for g in grads.values() {
                    total += g
                        .sqr()
                        .unwrap()
                        .sum_all()
                        .unwrap()
                        .to_scalar::<f32>()
                        .unwrap() as f64;
                }
                assert!(total > 0.0);
            });
            eprintln!("per-tensor / one reduction: {:.1}x", p / n);
        }
    }
}

/// The lazy (sparse-row) AdamW of one matrix, written out in f64: a row whose gradient is all
/// zero is skipped entirely; the others get AdamW with the global step's bias correction.
fn reference_lazy_adamw(
    start: &[Vec<f64>],
    grads: &[Vec<Vec<f64>>],
    lr: f64,
    cfg: AdamWConfig,
) -> Vec<Vec<f64>> {
    let mut p = start.to_vec();
    let mut m = vec![vec![0.0; start[0].len()]; start.len()];
    let mut v = m.clone();
    for (t, g) in grads.iter().enumerate() {
        let t = (t + 1) as i32;
        for r in 0..p.len() {
            if g[r].iter().all(|&x| x == 0.0) {
                continue;
            }
            for j in 0..p[r].len() {
                p[r][j] *= 1.0 - lr * cfg.weight_decay;
                m[r][j] = cfg.beta1 * m[r][j] + (1.0 - cfg.beta1) * g[r][j];
                v[r][j] = cfg.beta2 * v[r][j] + (1.0 - cfg.beta2) * g[r][j] * g[r][j];
                let m_hat = m[r][j] / (1.0 - cfg.beta1.powi(t));
                let v_hat = v[r][j] / (1.0 - cfg.beta2.powi(t));
                p[r][j] -= lr * m_hat / (v_hat.sqrt() + cfg.eps);
            }
        }
    }
    p
}

/// Five steps on a 6 x 3 table; rows 1 and 4 are absent from every batch, row 2 from some.
fn sparse_steps() -> (Vec<Vec<f64>>, Vec<Vec<Vec<f64>>>) {
    let start: Vec<Vec<f64>> = (0..6)
        .map(|r| {
            (0..3)
                .map(|j| 0.25 * r as f64 - 0.5 + 0.125 * j as f64)
                .collect()
        })
        .collect();
    let grads = (0..5)
        .map(|t| {
            (0..6)
                .map(|r| {
                    let absent = r == 1 || r == 4 || (r == 2 && t % 2 == 1);
                    (0..3)
                        .map(|j| match absent {
                            true => 0.0,
                            false => ((t * 7 + r * 3 + j) % 11) as f64 / 8.0 - 0.6,
                        })
                        .collect()
                })
                .collect()
        })
        .collect();
    (start, grads)
}

fn matrix(rows: &[Vec<f64>], dtype: DType) -> Tensor {
    let flat: Vec<f32> = rows.iter().flatten().map(|&x| x as f32).collect();
    Tensor::from_vec(flat, (rows.len(), rows[0].len()), &Device::Cpu)
        .unwrap()
        .to_dtype(dtype)
        .unwrap()
}

#[test]
fn sparse_rows_follow_the_lazy_rule_and_leave_absent_rows_alone() {
    let cfg = AdamWConfig {
        weight_decay: 0.1,
        ..Default::default()
    };
    let lr = 0.05;
    let (start, grads) = sparse_steps();
    let want = reference_lazy_adamw(&start, &grads, lr, cfg);
    for fused in [true, false] {
        let table = Var::from_tensor(&matrix(&start, DType::F32)).unwrap();
        let name = "embeddings.word_embeddings.weight".to_string();
        let mut opt = AdamW::new([(name.clone(), table.clone())], cfg)
            .unwrap()
            .with_fused(fused)
            .unwrap()
            .with_sparse_rows(&name)
            .unwrap();
        for g in &grads {
            let grads: Gradients = [(name.clone(), matrix(g, DType::F32))].into();
            opt.step(&grads, lr).unwrap();
        }
        let got: Vec<Vec<f32>> = table.as_tensor().to_vec2().unwrap();
        for (r, (got, want)) in got.iter().zip(&want).enumerate() {
            for (g, w) in got.iter().zip(want) {
                assert!(
                    (*g as f64 - w).abs() < 1e-6,
                    "fused={fused} row {r}: {g} vs {w}"
                );
            }
        }
        // Rows 1 and 4 never had a gradient: bit for bit where they started, zero moments.
        let start32: Vec<Vec<f32>> = matrix(&start, DType::F32).to_vec2().unwrap();
        assert_eq!(got[1], start32[1]);
        assert_eq!(got[4], start32[4]);
        let state = opt.state_tensors().unwrap();
        let m: Vec<Vec<f32>> = state[&format!("m.{name}")].to_vec2().unwrap();
        assert_eq!(m[1], [0.0; 3]);
        assert_ne!(m[0], [0.0; 3]);
    }
}

#[test]
fn sparse_rows_agree_with_dense_adamw_where_the_rules_coincide_and_fused_equals_composite() {
    let cfg = AdamWConfig {
        weight_decay: 0.1,
        ..Default::default()
    };
    let (start, grads) = sparse_steps();
    let name = "w".to_string();
    let run = |dtype: DType, fused: bool, sparse: bool| -> Vec<u64> {
        let table = Var::from_tensor(&matrix(&start, dtype)).unwrap();
        let mut opt = AdamW::new([(name.clone(), table.clone())], cfg)
            .unwrap()
            .with_fused(fused)
            .unwrap();
        if sparse {
            opt = opt.with_sparse_rows(&name).unwrap();
        }
        for g in &grads {
            let grads: Gradients = [(name.clone(), matrix(g, dtype))].into();
            opt.step(&grads, 0.05).unwrap();
        }
        bits(table.as_tensor())
    };
    for dtype in [DType::F32, DType::BF16, DType::F16] {
        let sparse = run(dtype, true, true);
        assert_eq!(
            sparse,
            run(dtype, false, true),
            "{dtype:?}: fused vs composite"
        );
        let dense = run(dtype, true, false);
        // Rows 0, 3 and 5 have a gradient at every step: the two rules agree to the bit. Rows 1,
        // 2 and 4 differ (the dense rule decays and moves them without a gradient).
        for r in [0, 3, 5] {
            assert_eq!(
                sparse[3 * r..3 * r + 3],
                dense[3 * r..3 * r + 3],
                "{dtype:?} row {r}"
            );
        }
        for r in [1, 2, 4] {
            assert_ne!(
                sparse[3 * r..3 * r + 3],
                dense[3 * r..3 * r + 3],
                "{dtype:?} row {r}"
            );
        }
    }
}

#[test]
fn sparse_rows_need_a_known_matrix() {
    let v = Var::new(&[1f32, 2.0], &Device::Cpu).unwrap();
    let opt = || AdamW::new([("bias".to_string(), v.clone())], AdamWConfig::default()).unwrap();
    for name in ["bias", "nope"] {
        match opt().with_sparse_rows(name) {
            Err(mlctl::Error::InvalidArgument(msg)) => assert!(msg.contains(name), "{msg}"),
            other => panic!("expected InvalidArgument, got {other:?}"),
        }
    }
}
