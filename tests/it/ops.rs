//! The fused CPU ops against their composite twins (values and gradients, in f32, bf16 and f16),
//! against finite differences in f64, Philox against its published known answers, and dropout
//! masks against thread count and batch splits.

use candle_core::{DType, Device, Tensor, Var};
use mlctl::encoder::{BertConfig, BertEncoder, ParamStore};
use mlctl::ops::{self, DropoutKey, GeluForm, Kernels};
use mlctl::Error;

const DEV: Device = Device::Cpu;

/// Seeded normal tensor in f64 (candle's CPU generator is seeded per call through the values).
fn randn(shape: &[usize], seed: u64) -> Tensor {
    // A small LCG keeps the inputs fixed across runs without touching global state.
    let n: usize = shape.iter().product();
    let mut state = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    let mut next = || {
        state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((state >> 11) as f64) / ((1u64 << 53) as f64)
    };
    let v: Vec<f64> = (0..n)
        .map(|_| {
            // Box-Muller.
            let (u1, u2) = (next().max(1e-12), next());
            (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
        })
        .collect();
    Tensor::from_vec(v, shape, &DEV).unwrap()
}

fn max_abs(t: &Tensor) -> f64 {
    t.to_dtype(DType::F64)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f64>()
        .unwrap()
}

/// `max |a - b| <= tol * max(1, max |b|)`.
fn assert_close(a: &Tensor, b: &Tensor, tol: f64, what: &str) {
    assert_eq!(a.dims(), b.dims(), "{what}: shapes");
    let diff =
        max_abs(&(a.to_dtype(DType::F64).unwrap() - b.to_dtype(DType::F64).unwrap()).unwrap());
    let scale = max_abs(b).max(1.0);
    assert!(
        diff <= tol * scale,
        "{what}: max difference {diff:e} above {:e}",
        tol * scale
    );
}

/// Tolerance of a comparison in `dtype` (half precision rounds each composite step).
fn tol(dtype: DType) -> f64 {
    match dtype {
        DType::F64 => 1e-12,
        DType::F32 => 1e-5,
        DType::F16 => 4e-3,
        _ => 3e-2,
    }
}

/// Outputs and gradients (w.r.t. every input) of `loss = sum(f(inputs) * r)`.
fn value_and_grads(
    inputs: &[Tensor],
    r_seed: u64,
    f: &dyn Fn(&[Tensor]) -> mlctl::Result<Tensor>,
) -> (Tensor, Vec<Tensor>) {
    let vars: Vec<Var> = inputs
        .iter()
        .map(|t| Var::from_tensor(t).unwrap())
        .collect();
    let ts: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
    let out = f(&ts).unwrap();
    let r = randn(out.dims(), r_seed).to_dtype(out.dtype()).unwrap();
    let loss = (out.to_dtype(DType::F64).unwrap() * r.to_dtype(DType::F64).unwrap())
        .unwrap()
        .sum_all()
        .unwrap();
    let grads = loss.backward().unwrap();
    let gs = ts.iter().map(|t| grads.get(t).unwrap().clone()).collect();
    (out, gs)
}

/// Holds `fused` equal to `composite` on values and gradients in f32, bf16 and f16.
fn check_twins(
    name: &str,
    inputs: &[Tensor],
    fused: &dyn Fn(&[Tensor]) -> mlctl::Result<Tensor>,
    composite: &dyn Fn(&[Tensor]) -> mlctl::Result<Tensor>,
) {
    for dtype in [DType::F32, DType::BF16, DType::F16] {
        let xs: Vec<Tensor> = inputs.iter().map(|t| t.to_dtype(dtype).unwrap()).collect();
        let (yf, gf) = value_and_grads(&xs, 99, fused);
        let (yc, gc) = value_and_grads(&xs, 99, composite);
        assert_eq!(yf.dtype(), dtype, "{name}: output dtype");
        assert_close(&yf, &yc, tol(dtype), &format!("{name} {dtype:?} values"));
        for (i, (a, b)) in gf.iter().zip(&gc).enumerate() {
            assert_eq!(a.dtype(), dtype, "{name}: gradient dtype");
            assert_close(
                a,
                b,
                2.0 * tol(dtype),
                &format!("{name} {dtype:?} grad {i}"),
            );
        }
    }
}

/// Holds the fused op's gradient equal to central finite differences in f64, every entry.
fn check_finite_differences(
    name: &str,
    inputs: &[Tensor],
    f: &dyn Fn(&[Tensor]) -> mlctl::Result<Tensor>,
) {
    let (out, grads) = value_and_grads(inputs, 7, f);
    let r = randn(out.dims(), 7);
    let loss = |xs: &[Tensor]| -> f64 {
        (f(xs).unwrap() * &r)
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f64>()
            .unwrap()
    };
    let h = 1e-6;
    for (i, (x, g)) in inputs.iter().zip(&grads).enumerate() {
        let flat: Vec<f64> = x.flatten_all().unwrap().to_vec1().unwrap();
        let g: Vec<f64> = g.flatten_all().unwrap().to_vec1().unwrap();
        for j in 0..flat.len() {
            let at = |delta: f64| {
                let mut v = flat.clone();
                v[j] += delta;
                let mut xs = inputs.to_vec();
                xs[i] = Tensor::from_vec(v, x.dims(), &DEV).unwrap();
                loss(&xs)
            };
            let numeric = (at(h) - at(-h)) / (2.0 * h);
            assert!(
                (numeric - g[j]).abs() <= 1e-6 * numeric.abs().max(1.0),
                "{name}: input {i} entry {j}: backward {} vs finite difference {numeric}",
                g[j]
            );
        }
    }
}
fn ln_inputs() -> Vec<Tensor> {
    let x = randn(&[3, 5, 24], 1).affine(2.0, 0.5).unwrap();
    let w = randn(&[24], 2).affine(0.3, 1.0).unwrap();
    let b = randn(&[24], 3);
    vec![x, w, b]
}

#[test]
fn fused_layer_norm_equals_its_composite_twin() {
    check_twins(
        "layer_norm",
        &ln_inputs(),
        &|t| ops::layer_norm_fused(&t[0], &t[1], &t[2], 1e-5),
        &|t| ops::layer_norm_composite(&t[0], &t[1], &t[2], 1e-5),
    );
}

#[test]
fn fused_layer_norm_matches_finite_differences() {
    let small: Vec<Tensor> = ln_inputs()
        .into_iter()
        .enumerate()
        .map(|(i, t)| {
            if i == 0 {
                t.narrow(0, 0, 1).unwrap().narrow(1, 0, 2).unwrap()
            } else {
                t
            }
        })
        .collect();
    check_finite_differences("layer_norm", &small, &|t| {
        ops::layer_norm_fused(&t[0], &t[1], &t[2], 1e-5)
    });
}

/// Attention-shaped scores and a `[batch, 1, 1, keys]` additive mask with padded keys.
fn softmax_inputs(keys: usize) -> (Tensor, Tensor) {
    let x = (randn(&[2, 3, 4, keys], 4) * 3.0).unwrap();
    let mut m = vec![0f64; 2 * keys];
    for v in &mut m[keys + keys / 2..] {
        *v = -1e4;
    }
    (x, Tensor::from_vec(m, (2, 1, 1, keys), &DEV).unwrap())
}

#[test]
fn fused_softmax_equals_its_composite_twin() {
    let (x, m) = softmax_inputs(37);
    let scale = 0.125;
    check_twins(
        "softmax",
        &[x.clone(), m],
        &|t| ops::softmax_scaled_masked_fused(&t[0], scale, Some(&t[1])),
        &|t| ops::softmax_scaled_masked_composite(&t[0], scale, Some(&t[1])),
    );
    check_twins(
        "softmax without mask",
        &[x],
        &|t| ops::softmax_scaled_masked_fused(&t[0], scale, None),
        &|t| ops::softmax_scaled_masked_composite(&t[0], scale, None),
    );
}

#[test]
fn fused_softmax_matches_finite_differences() {
    let (x, m) = softmax_inputs(6);
    // A mask that broadcasts over queries only: its gradient is summed over them.
    let m = (m + randn(&[2, 1, 1, 6], 5)).unwrap();
    check_finite_differences("softmax", &[x.clone(), m.clone()], &|t| {
        ops::softmax_scaled_masked_fused(&t[0], 0.7, Some(&t[1]))
    });
    // A constant mask (the encoder's) and no mask take the other backward paths.
    check_finite_differences("softmax, constant mask", std::slice::from_ref(&x), &|t| {
        ops::softmax_scaled_masked_fused(&t[0], 0.7, Some(&m))
    });
    check_finite_differences("softmax without mask", &[x], &|t| {
        ops::softmax_scaled_masked_fused(&t[0], 0.7, None)
    });
}

#[test]
fn fused_gelu_equals_its_composite_twin() {
    let x = (randn(&[4, 300], 6) * 3.0).unwrap();
    for form in [GeluForm::Erf, GeluForm::Tanh] {
        check_twins(
            &format!("gelu {form:?}"),
            std::slice::from_ref(&x),
            &|t| ops::gelu_fused(&t[0], form),
            &|t| ops::gelu_composite(&t[0], form),
        );
    }
}

#[test]
fn fused_gelu_matches_finite_differences() {
    let x = (randn(&[2, 20], 8) * 3.0).unwrap();
    for form in [GeluForm::Erf, GeluForm::Tanh] {
        check_finite_differences(&format!("gelu {form:?}"), std::slice::from_ref(&x), &|t| {
            ops::gelu_fused(&t[0], form)
        });
    }
}

#[test]
fn fused_dropout_equals_its_composite_twin() {
    let x = randn(&[3, 7, 11], 9);
    let key = DropoutKey::new(5, 12).with_sample_offset(40);
    check_twins(
        "dropout",
        std::slice::from_ref(&x),
        &|t| ops::dropout_fused(&t[0], 0.3, key, 4),
        &|t| ops::dropout_composite(&t[0], 0.3, key, 4),
    );
    check_finite_differences("dropout", &[x], &|t| ops::dropout_fused(&t[0], 0.3, key, 4));
}

fn in_pool<T: Send>(threads: usize, f: impl FnOnce() -> T + Send) -> T {
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .unwrap()
        .install(f)
}

#[test]
fn dropout_masks_ignore_thread_count_and_batch_split() {
    // Rows longer than one parallel chunk, so that two threads really split them.
    let x = Tensor::ones((5, 3, 7000), DType::F32, &DEV).unwrap();
    let key = DropoutKey::new(11, 3);
    let one = in_pool(1, || ops::dropout_fused(&x, 0.1, key, 2).unwrap());
    let two = in_pool(2, || ops::dropout_fused(&x, 0.1, key, 2).unwrap());
    assert_close(&one, &two, 0.0, "1 vs 2 threads");
    let head = ops::dropout_fused(&x.narrow(0, 0, 2).unwrap(), 0.1, key, 2).unwrap();
    let tail = ops::dropout_fused(&x.narrow(0, 2, 3).unwrap(), 0.1, key.advanced(2), 2).unwrap();
    let split = Tensor::cat(&[head, tail], 0).unwrap();
    assert_close(&one, &split, 0.0, "whole batch vs two chunks");
    let zeros = one
        .eq(0f32)
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap()
        .mean_all()
        .unwrap();
    let zeros = zeros.to_scalar::<f64>().unwrap();
    assert!((zeros - 0.1).abs() < 0.005, "dropped fraction {zeros}");
    // Each of site, step and seed changes the mask.
    for other in [
        ops::dropout_fused(&x, 0.1, key, 3).unwrap(),
        ops::dropout_fused(&x, 0.1, DropoutKey::new(11, 4), 2).unwrap(),
        ops::dropout_fused(&x, 0.1, DropoutKey::new(12, 3), 2).unwrap(),
    ] {
        assert!(max_abs(&(&one - other).unwrap()) > 0.0, "masks repeat");
    }
}

/// A 2-layer encoder config of width `hidden` (feed-forward twice as wide), vocabulary 50.
fn tiny_config(hidden: usize, heads: usize) -> BertConfig {
    BertConfig {
        vocab_size: 50,
        hidden_size: hidden,
        num_hidden_layers: 2,
        num_attention_heads: heads,
        intermediate_size: 2 * hidden,
        max_position_embeddings: 20,
        ..BertConfig::default()
    }
}

fn tiny_encoder() -> BertEncoder {
    BertEncoder::load(
        ParamStore::new(3).var_builder(DType::F32, &DEV),
        &tiny_config(16, 2),
    )
    .unwrap()
}

fn batch() -> (Tensor, Tensor) {
    let ids = Tensor::new(
        &[
            [2u32, 7, 9, 4, 3, 0],
            [2, 8, 8, 1, 0, 0],
            [2, 5, 6, 7, 11, 3],
        ],
        &DEV,
    )
    .unwrap();
    let mask = ids.ne(0u32).unwrap().to_dtype(DType::F32).unwrap();
    (ids, mask)
}

#[test]
fn a_batch_run_in_chunks_gets_the_whole_batch_dropout() {
    let enc = tiny_encoder();
    let (ids, mask) = batch();
    let key = DropoutKey::new(1, 9);
    let whole = enc
        .forward_keyed(&ids, None, Some(&mask), Some(key))
        .unwrap();
    let head = enc
        .forward_keyed(
            &ids.narrow(0, 0, 1).unwrap(),
            None,
            Some(&mask.narrow(0, 0, 1).unwrap()),
            Some(key),
        )
        .unwrap();
    let tail = enc
        .forward_keyed(
            &ids.narrow(0, 1, 2).unwrap(),
            None,
            Some(&mask.narrow(0, 1, 2).unwrap()),
            Some(key.advanced(1)),
        )
        .unwrap();
    let eval = enc.forward(&ids, None, Some(&mask)).unwrap();
    for (i, w) in whole.hidden_states.iter().enumerate() {
        let split = Tensor::cat(&[&head.hidden_states[i], &tail.hidden_states[i]], 0).unwrap();
        assert_close(w, &split, 1e-6, &format!("hidden state {i}"));
    }
    assert!(
        max_abs(&(&whole.last_hidden_state - &eval.last_hidden_state).unwrap()) > 1e-3,
        "keyed training pass equals the eval pass: dropout inactive"
    );
}

#[test]
fn fused_encoder_equals_its_composite_twin() {
    let params = ParamStore::new(4);
    let fused =
        BertEncoder::load(params.var_builder(DType::F32, &DEV), &tiny_config(16, 2)).unwrap();
    let composite = fused.clone().with_kernels(Kernels::Composite);
    let (ids, mask) = batch();
    let key = Some(DropoutKey::new(2, 1));
    let run = |enc: &BertEncoder| {
        let out = enc.forward_keyed(&ids, None, Some(&mask), key).unwrap();
        let h = &out.hidden_states;
        let loss =
            (h[1].mean_all().unwrap() + h[h.len() - 1].sqr().unwrap().mean_all().unwrap()).unwrap();
        let grads = loss.backward().unwrap();
        let g: Vec<(String, Tensor)> = params
            .named_vars()
            .into_iter()
            .map(|(n, v)| (n, grads.get(v.as_tensor()).unwrap().clone()))
            .collect();
        (out.last_hidden_state, g)
    };
    let (yf, gf) = run(&fused);
    let (yc, gc) = run(&composite);
    assert_close(&yf, &yc, 1e-5, "last hidden state");
    for ((name, a), (_, b)) in gf.iter().zip(&gc) {
        assert_close(a, b, 1e-5, name);
    }
}

#[test]
fn bad_inputs_get_typed_errors() {
    let [x, w, b] = <[Tensor; 3]>::try_from(ln_inputs()).unwrap();
    let x32 = x.to_dtype(DType::F32).unwrap();
    let short = w.narrow(0, 0, 5).unwrap();
    assert!(matches!(
        ops::layer_norm_fused(&x, &short, &b, 1e-5),
        Err(Error::ShapeMismatch { .. })
    ));
    assert!(matches!(
        ops::layer_norm_fused(&x32, &w, &b, 1e-5),
        Err(Error::Candle(
            candle_core::Error::DTypeMismatchBinaryOp { .. }
        ))
    ));
    let ints = Tensor::zeros((2, 24), DType::U32, &DEV).unwrap();
    assert!(matches!(
        ops::layer_norm_fused(&ints, &w, &b, 1e-5),
        Err(Error::Candle(candle_core::Error::UnsupportedDTypeForOp(..)))
    ));
    let (s, m) = softmax_inputs(8);
    assert!(matches!(
        ops::softmax_scaled_masked_fused(&s, 1.0, Some(&m.narrow(3, 0, 4).unwrap())),
        Err(Error::ShapeMismatch { .. })
    ));
    assert!(matches!(
        ops::softmax_scaled_masked_fused(&s, 1.0, Some(&m.to_dtype(DType::F32).unwrap())),
        Err(Error::Candle(
            candle_core::Error::DTypeMismatchBinaryOp { .. }
        ))
    ));
    assert!(matches!(
        ops::gelu_fused(&ints, GeluForm::Erf),
        Err(Error::Candle(candle_core::Error::UnsupportedDTypeForOp(..)))
    ));
    let key = DropoutKey::default();
    for p in [1.1, -0.1, f32::NAN] {
        assert!(matches!(
            ops::dropout_fused(&x, p, key, 0),
            Err(Error::InvalidArgument(_))
        ));
    }
    assert!(matches!(
        ops::dropout_fused(&Tensor::new(1f32, &DEV).unwrap(), 0.1, key, 0),
        Err(Error::InvalidArgument(_))
    ));
}

/// Rows of 3 x 300 (more than one block of rows per task) and a bias.
fn bias_inputs() -> Vec<Tensor> {
    vec![randn(&[3, 300, 40], 11), randn(&[40], 12)]
}

#[test]
fn fused_bias_add_equals_its_composite_twin() {
    check_twins(
        "bias_add",
        &bias_inputs(),
        &|t| ops::bias_add_fused(&t[0], &t[1]),
        &|t| ops::bias_add_composite(&t[0], &t[1]),
    );
}

#[test]
fn fused_bias_add_matches_finite_differences_and_sums_the_bias_gradient_exactly() {
    let small = vec![randn(&[2, 3, 5], 13), randn(&[5], 14)];
    check_finite_differences("bias_add", &small, &|t| ops::bias_add_fused(&t[0], &t[1]));
    // The bias gradient of sum(y * r) is r summed over the rows: integers add exactly, so the
    // blocked column sum must give them to the bit, over many blocks of rows.
    let x = Var::from_tensor(&Tensor::zeros((5000, 7), DType::F32, &DEV).unwrap()).unwrap();
    let b = Var::from_tensor(&Tensor::zeros(7, DType::F32, &DEV).unwrap()).unwrap();
    let r: Vec<f32> = (0..35_000)
        .map(|i| ((i * 7919) % 13) as f32 - 6.0)
        .collect();
    let want: Vec<f32> = (0..7).map(|j| r.iter().skip(j).step_by(7).sum()).collect();
    let r = Tensor::from_vec(r, (5000, 7), &DEV).unwrap();
    let y = ops::bias_add_fused(x.as_tensor(), b.as_tensor()).unwrap();
    let grads = (y * r).unwrap().sum_all().unwrap().backward().unwrap();
    let db: Vec<f32> = grads.get(b.as_tensor()).unwrap().to_vec1().unwrap();
    assert_eq!(db, want);
}

#[test]
fn bias_add_rejects_a_wrong_bias() {
    let [x, b] = <[Tensor; 2]>::try_from(bias_inputs()).unwrap();
    assert!(matches!(
        ops::bias_add_fused(&x, &b.narrow(0, 0, 39).unwrap()),
        Err(Error::ShapeMismatch { .. })
    ));
    assert!(matches!(
        ops::bias_add_fused(&x.to_dtype(DType::F32).unwrap(), &b),
        Err(Error::Candle(
            candle_core::Error::DTypeMismatchBinaryOp { .. }
        ))
    ));
    let ints = Tensor::zeros((2, 40), DType::U32, &DEV).unwrap();
    assert!(matches!(
        ops::bias_add_fused(&ints, &b),
        Err(Error::Candle(candle_core::Error::UnsupportedDTypeForOp(..)))
    ));
}

/// Scores `[2, 2, 3, 5]` and a mask `[2, 1, 1, 5]`: batch 0 masked with -inf everywhere (no key
/// to attend to), batch 1 at keys 1 and 3 only.
fn fully_masked_inputs() -> (Tensor, Tensor) {
    let inf = f64::NEG_INFINITY;
    let mask = Tensor::new(
        &[[[[inf, inf, inf, inf, inf]]], [[[0.0, inf, 0.0, inf, 0.0]]]],
        &DEV,
    )
    .unwrap();
    (randn(&[2, 2, 3, 5], 21), mask)
}

#[test]
fn fully_masked_softmax_rows_are_zeros_with_a_zero_gradient() {
    let (x, mask) = fully_masked_inputs();
    type Softmax = fn(&Tensor, f64, Option<&Tensor>) -> mlctl::Result<Tensor>;
    let versions: [(&str, Softmax); 3] = [
        ("front door", ops::softmax_scaled_masked),
        ("fused", ops::softmax_scaled_masked_fused),
        ("composite", ops::softmax_scaled_masked_composite),
    ];
    for dtype in [DType::F64, DType::F32, DType::BF16, DType::F16] {
        let (x, mask) = (x.to_dtype(dtype).unwrap(), mask.to_dtype(dtype).unwrap());
        let x64: Vec<f64> = x
            .to_dtype(DType::F64)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        for (name, f) in versions {
            let what = format!("{name} {dtype:?}");
            let (y, grads) =
                value_and_grads(std::slice::from_ref(&x), 5, &|t| f(&t[0], 0.5, Some(&mask)));
            let y: Vec<f64> = y
                .to_dtype(DType::F64)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            let g: Vec<f64> = grads[0]
                .to_dtype(DType::F64)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            assert!(g.iter().all(|v| v.is_finite()), "{what}: gradient {g:?}");
            // Batch 0: 6 rows of 5, all masked.
            assert!(
                y[..30].iter().chain(&g[..30]).all(|&v| v == 0.0),
                "{what}: {y:?} {g:?}"
            );
            // Batch 1: a softmax over keys 0, 2 and 4 (written out in f64), 0 at keys 1 and 3.
            for row in y[30..].chunks(5).zip(x64[30..].chunks(5)) {
                let (y, x) = row;
                let live = [0, 2, 4];
                let max = live.iter().map(|&j| 0.5 * x[j]).fold(f64::MIN, f64::max);
                let sum: f64 = live.iter().map(|&j| (0.5 * x[j] - max).exp()).sum();
                for j in 0..5 {
                    let want = if live.contains(&j) {
                        (0.5 * x[j] - max).exp() / sum
                    } else {
                        0.0
                    };
                    assert!(
                        (y[j] - want).abs() <= tol(dtype),
                        "{what}: {} vs {want}",
                        y[j]
                    );
                }
            }
        }
    }
}

#[test]
fn dropout_with_p_one_drops_everything_as_pytorch_does() {
    let x = randn(&[3, 4], 31).to_dtype(DType::F32).unwrap();
    let key = DropoutKey::new(5, 2);
    type Dropout = fn(&Tensor, f32, DropoutKey, u32) -> mlctl::Result<Tensor>;
    let versions: [(&str, Dropout); 3] = [
        ("front door", ops::dropout),
        ("fused", ops::dropout_fused),
        ("composite", ops::dropout_composite),
    ];
    for (name, f) in versions {
        let (y, grads) = value_and_grads(std::slice::from_ref(&x), 3, &|t| f(&t[0], 1.0, key, 1));
        assert_eq!(max_abs(&y), 0.0, "{name}: output");
        assert_eq!(max_abs(&grads[0]), 0.0, "{name}: gradient");
    }
    let mask = ops::dropout_mask(&[3, 4], 1.0, key, 1, DType::F32, &DEV).unwrap();
    assert_eq!(max_abs(&mask), 0.0, "mask");
}

#[test]
fn layer_norm_refuses_hidden_size_zero() {
    let x = Tensor::zeros((2, 0), DType::F32, &DEV).unwrap();
    let w = Tensor::zeros(0, DType::F32, &DEV).unwrap();
    type Ln = fn(&Tensor, &Tensor, &Tensor, f64) -> mlctl::Result<Tensor>;
    let versions: [(&str, Ln); 3] = [
        ("front door", ops::layer_norm),
        ("fused", ops::layer_norm_fused),
        ("composite", ops::layer_norm_composite),
    ];
    for (name, f) in versions {
        assert!(
            matches!(f(&x, &w, &w, 1e-12), Err(Error::InvalidArgument(_))),
            "{name}"
        );
    }
}

/// The fused ops promise the same bits whatever the thread count (row tasks and blocked
/// reductions added in a fixed order): an encoder's training pass and its parameter gradients
/// on 1, 2 and 3 threads.
#[test]
fn the_encoder_gives_the_same_bits_on_any_thread_count() {
    let run = |threads: usize| {
        in_pool(threads, || {
            let params = ParamStore::new(6);
            let enc = BertEncoder::load(params.var_builder(DType::F32, &DEV), &tiny_config(64, 4))
                .unwrap();
            let (ids, mask) = batch();
            let out = enc
                .forward_keyed(&ids, None, Some(&mask), Some(DropoutKey::new(3, 1)))
                .unwrap();
            let h = &out.hidden_states;
            let loss = (h[1].sum_all().unwrap() + h[2].sqr().unwrap().sum_all().unwrap()).unwrap();
            let grads = loss.backward().unwrap();
            let mut flat = vec![out.last_hidden_state.flatten_all().unwrap()];
            for (_, v) in params.named_vars() {
                flat.push(grads.get(v.as_tensor()).unwrap().flatten_all().unwrap());
            }
            Tensor::cat(&flat, 0).unwrap().to_vec1::<f32>().unwrap()
        })
    };
    let one = run(1);
    for threads in [2, 3] {
        let other = run(threads);
        let differ = one
            .iter()
            .zip(&other)
            .filter(|(a, b)| a.to_bits() != b.to_bits())
            .count();
        assert_eq!(
            differ,
            0,
            "{threads} threads: {differ} of {} values differ from 1 thread",
            one.len()
        );
    }
}
