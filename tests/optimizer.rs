//! AdamW, the schedules and clipping against values computed by hand in plain f64.

use candle_core::{Device, Tensor, Var};
use mlctl::train::{clip_grad_norm, is_no_decay, AdamW, AdamWConfig, Decay, Gradients, LrSchedule};

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
