//! The MLM loss over chunks of the vocabulary: `ops::vocab_nll_fused` against its composite
//! twin (values and the gradients of `xs`, `weight` and `bias`) in every dtype and chunking,
//! against finite differences in f64, and `masked_lm_loss` against the formula it replaced.

use candle_core::{DType, Device, Module, Tensor, Var, D};
use mlctl::data::MaskedTokens;
use mlctl::encoder::{BertConfig, BertForMaskedLm, ParamStore};
use mlctl::loss::masked_lm_loss;
use mlctl::ops;
use mlctl::Error;

const DEV: Device = Device::Cpu;

/// Seeded standard normal tensor in f64 (a small LCG and Box-Muller: fixed across runs).
fn randn(shape: &[usize], seed: u64) -> Tensor {
    let n: usize = shape.iter().product();
    let mut state = seed.wrapping_mul(6364136223846793005) ^ 0x9e37_79b9_7f4a_7c15;
    let mut next = || {
        state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((state >> 11) as f64) / ((1u64 << 53) as f64)
    };
    let v: Vec<f64> = (0..n)
        .map(|_| {
            let (u1, u2) = (next().max(1e-12), next());
            (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
        })
        .collect();
    Tensor::from_vec(v, shape, &DEV).unwrap()
}

fn max_abs(t: &Tensor) -> f64 {
    let v = t.to_dtype(DType::F64).unwrap().flatten_all().unwrap();
    v.to_vec1::<f64>()
        .unwrap()
        .into_iter()
        .fold(0.0, |m, x| m.max(x.abs()))
}

/// `max |a - b| <= tol * max |b|`: relative to the largest entry (gradient entries are of order
/// `1 / n`, so a floor at 1 would make any tolerance loose).
fn assert_close(a: &Tensor, b: &Tensor, tol: f64, what: &str) {
    assert_eq!(a.dims(), b.dims(), "{what}: shapes");
    let diff =
        max_abs(&(a.to_dtype(DType::F64).unwrap() - b.to_dtype(DType::F64).unwrap()).unwrap());
    let scale = max_abs(b).max(f64::MIN_POSITIVE);
    assert!(
        diff <= tol * scale,
        "{what}: max difference {diff:e} above {:e}",
        tol * scale
    );
}

/// Inputs of a case: `xs` `[n, hidden]`, `weight` `[vocab, hidden]`, `bias` `[vocab]` in f64
/// (logits of a few units, like a trained head's) and targets with repeats.
fn case(n: usize, hidden: usize, vocab: usize, seed: u64) -> (Vec<Tensor>, Tensor) {
    let xs = randn(&[n, hidden], seed);
    let w = (randn(&[vocab, hidden], seed + 1) * (2.0 / (hidden as f64).sqrt())).unwrap();
    let b = (randn(&[vocab], seed + 2) * 0.5).unwrap();
    // Every fourth row asks for id 3, the others spread over the vocabulary.
    let t: Vec<u32> = (0..n)
        .map(|i| match i % 4 {
            0 => 3,
            _ => ((i * 7919 + 11) % vocab) as u32,
        })
        .collect();
    (vec![xs, w, b], Tensor::new(t, &DEV).unwrap())
}

type Loss<'a> = &'a dyn Fn(&[Tensor], &Tensor) -> mlctl::Result<Tensor>;

/// The loss and the gradients of `xs`, `weight` and `bias` (zeros where autograd gives none).
fn value_and_grads(inputs: &[Tensor], targets: &Tensor, f: Loss) -> (f64, Vec<Tensor>) {
    let vars: Vec<Var> = inputs
        .iter()
        .map(|t| Var::from_tensor(t).unwrap())
        .collect();
    let ts: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
    let loss = f(&ts, targets).unwrap();
    assert_eq!(loss.rank(), 0, "the loss is a scalar");
    let grads = loss.backward().unwrap();
    let gs = ts
        .iter()
        .map(|t| match grads.get(t) {
            Some(g) => {
                assert_eq!(g.dtype(), t.dtype(), "gradient dtype");
                g.clone()
            }
            None => t.zeros_like().unwrap(),
        })
        .collect();
    let value = loss
        .to_dtype(DType::F64)
        .unwrap()
        .to_scalar::<f64>()
        .unwrap();
    (value, gs)
}

fn fused(chunk: usize) -> impl Fn(&[Tensor], &Tensor) -> mlctl::Result<Tensor> {
    move |x, t| ops::vocab_nll_fused(&x[0], &x[1], &x[2], t, chunk)
}

fn composite(x: &[Tensor], t: &Tensor) -> mlctl::Result<Tensor> {
    ops::vocab_nll_composite(&x[0], &x[1], &x[2], t)
}

/// Holds fused and composite equal in `dtype` on the loss and the three gradients.
fn check_twins(inputs: &[Tensor], targets: &Tensor, dtype: DType, chunk: usize, tol: f64) {
    let xs: Vec<Tensor> = inputs.iter().map(|t| t.to_dtype(dtype).unwrap()).collect();
    let (lf, gf) = value_and_grads(&xs, targets, &fused(chunk));
    let (lc, gc) = value_and_grads(&xs, targets, &composite);
    let what = format!("{dtype:?}, chunk {chunk}");
    assert!(
        (lf - lc).abs() <= tol * lc.abs().max(1.0),
        "{what}: loss {lf} vs {lc}"
    );
    for (name, (a, b)) in ["xs", "weight", "bias"].iter().zip(gf.iter().zip(&gc)) {
        assert_close(a, b, tol, &format!("{what}: grad of {name}"));
    }
}

#[test]
fn mlm_fused_equals_composite_in_f64_and_f32_for_every_chunking() {
    let (n, hidden, vocab) = (37, 24, 1000);
    let (inputs, targets) = case(n, hidden, vocab, 1);
    // 384 leaves a last chunk of 232 rows; 1000 is one exact chunk; 4096 exceeds the vocabulary.
    for chunk in [1, 384, 1000, 4096] {
        check_twins(&inputs, &targets, DType::F64, chunk, 1e-12);
        // f32: a logit is a dot product of `hidden` = 24 terms and a log-sum-exp a sum of `vocab`
        // = 1000 exponentials, each accumulated in a different order by the two forms (and the
        // gradient GEMMs sum over 37 rows or 1000 vocabulary entries). Rounding errors of order
        // ε = 6e-8 that all had the same sign would reach (24 + 1000) ε ≈ 6e-5 (relative to the
        // loss and to the largest gradient entry); random-sign ones grow like the square root,
        // √1024 ε ≈ 2e-6 (seen: below 1e-6). 1e-5 sits between: it holds the forms to their
        // arithmetic without depending on a summation order, and a wrong term (a dropped bias,
        // a missing −1 at the target) is off by percents.
        check_twins(&inputs, &targets, DType::F32, chunk, 1e-5);
    }
}

#[test]
fn mlm_fused_half_precision_matches_an_f32_reference() {
    let (inputs, targets) = case(29, 16, 700, 5);
    for (dtype, eps) in [(DType::BF16, 2f64.powi(-8)), (DType::F16, 2f64.powi(-11))] {
        // The reference sees the same (rounded) inputs, in f32.
        let half: Vec<Tensor> = inputs.iter().map(|t| t.to_dtype(dtype).unwrap()).collect();
        let wide: Vec<Tensor> = half
            .iter()
            .map(|t| t.to_dtype(DType::F32).unwrap())
            .collect();
        let (lr, gr) = value_and_grads(&wide, &targets, &composite);
        let (lf, gf) = value_and_grads(&half, &targets, &fused(256));
        // The fused kernel computes in f32 from the half inputs: the loss (f32) agrees to f32
        // arithmetic, the gradients to their final rounding to half precision (the unit
        // roundoff, 2^-8 for bf16 and 2^-11 for f16, relative to the largest entry, plus the
        // f32 tolerance; seen: 2.1e-3 and 3.1e-4).
        assert!(
            (lf - lr).abs() <= 1e-5 * lr.abs(),
            "{dtype:?}: loss {lf} vs {lr}"
        );
        for (name, (a, b)) in ["xs", "weight", "bias"].iter().zip(gf.iter().zip(&gr)) {
            assert_eq!(a.dtype(), dtype);
            assert_close(a, b, eps + 1e-5, &format!("{dtype:?}: grad of {name}"));
        }
    }
}

#[test]
fn mlm_half_precision_loss_is_f32() {
    let (inputs, targets) = case(5, 8, 40, 2);
    for dtype in [DType::BF16, DType::F16] {
        let x: Vec<Tensor> = inputs.iter().map(|t| t.to_dtype(dtype).unwrap()).collect();
        for loss in [
            ops::vocab_nll(&x[0], &x[1], &x[2], &targets).unwrap(),
            composite(&x, &targets).unwrap(),
        ] {
            assert_eq!(loss.dtype(), DType::F32);
        }
    }
}

#[test]
fn mlm_no_rows_give_zero_loss_and_zero_gradients() {
    let (inputs, _) = case(0, 8, 50, 3);
    let targets = Tensor::zeros(0, DType::U32, &DEV).unwrap();
    for dtype in [DType::F64, DType::F32, DType::BF16] {
        let x: Vec<Tensor> = inputs.iter().map(|t| t.to_dtype(dtype).unwrap()).collect();
        for (form, f) in [("fused", &fused(16) as Loss), ("composite", &composite)] {
            let (loss, grads) = value_and_grads(&x, &targets, f);
            assert_eq!(loss, 0.0, "{form} {dtype:?}");
            for (g, t) in grads.iter().zip(&x) {
                assert_eq!(g.dims(), t.dims());
                assert_eq!(max_abs(g), 0.0, "{form} {dtype:?}");
            }
        }
    }
}

#[test]
fn mlm_fused_gradient_equals_finite_differences() {
    let (n, hidden, vocab) = (3, 4, 7);
    let (inputs, _) = case(n, hidden, vocab, 9);
    // Rows 0 and 2 share a target; chunks of 3 split the vocabulary 3 + 3 + 1.
    let targets = Tensor::new(&[3u32, 6, 3][..], &DEV).unwrap();
    let f = fused(3);
    let (_, grads) = value_and_grads(&inputs, &targets, &f);
    let loss = |x: &[Tensor]| f(x, &targets).unwrap().to_scalar::<f64>().unwrap();
    let h = 1e-6;
    for (k, input) in inputs.iter().enumerate() {
        let base = input.flatten_all().unwrap().to_vec1::<f64>().unwrap();
        let grad = grads[k].flatten_all().unwrap().to_vec1::<f64>().unwrap();
        for i in 0..base.len() {
            let at = |d: f64| {
                let mut v = base.clone();
                v[i] += d;
                let mut x = inputs.clone();
                x[k] = Tensor::from_vec(v, input.shape(), &DEV).unwrap();
                loss(&x)
            };
            let numeric = (at(h) - at(-h)) / (2.0 * h);
            assert!(
                (numeric - grad[i]).abs() < 1e-8,
                "input {k}, entry {i}: analytic {} vs numeric {numeric}",
                grad[i]
            );
        }
    }
}

#[test]
fn mlm_bad_arguments_are_typed_errors() {
    let (x, targets) = case(4, 8, 30, 4);
    let out_of_range = Tensor::new(&[0u32, 1, 30, 2][..], &DEV).unwrap();
    let wrong_len = Tensor::new(&[0u32, 1][..], &DEV).unwrap();
    let as_i64 = targets.to_dtype(DType::I64).unwrap();
    for (t, chunk) in [
        (&out_of_range, 8),
        (&wrong_len, 8),
        (&as_i64, 8),
        (&targets, 0),
    ] {
        let err = ops::vocab_nll_fused(&x[0], &x[1], &x[2], t, chunk).unwrap_err();
        assert!(
            matches!(err, Error::InvalidArgument(_) | Error::ShapeMismatch { .. }),
            "{err}"
        );
    }
    for t in [&out_of_range, &wrong_len] {
        assert!(ops::vocab_nll_composite(&x[0], &x[1], &x[2], t).is_err());
    }
    let narrow_w = x[1].narrow(1, 0, 7).unwrap();
    assert!(matches!(
        ops::vocab_nll(&x[0], &narrow_w, &x[2], &targets),
        Err(Error::ShapeMismatch { .. })
    ));
    let f32_bias = x[2].to_dtype(DType::F32).unwrap();
    assert!(ops::vocab_nll(&x[0], &x[1], &f32_bias, &targets).is_err());
}

// ---------------------------------------------------------------- masked_lm_loss

/// The formula `masked_lm_loss` computed before the fused op: the head's logits for the masked
/// rows, log-softmax in the accumulation dtype, gathered at the targets, averaged.
fn old_masked_lm_loss(model: &BertForMaskedLm, hidden: &Tensor, m: &MaskedTokens) -> Tensor {
    let (b, l, w) = hidden.dims3().unwrap();
    let selected = hidden
        .reshape((b * l, w))
        .unwrap()
        .index_select(&m.positions, 0)
        .unwrap();
    let logits = model.mlm_head.forward(&selected).unwrap();
    let log_probs = candle_nn::ops::log_softmax(&logits, D::Minus1).unwrap();
    let picked = log_probs
        .gather(&m.targets.unsqueeze(1).unwrap(), 1)
        .unwrap();
    picked.mean_all().unwrap().neg().unwrap()
}

/// `masked_lm_loss` and the old formula on a small random `BertForMaskedLm`: same value, same
/// gradients for every parameter of the head and the (tied) word embeddings, and for the
/// hidden state.
fn check_masked_lm(dtype: DType, frozen: bool, tol: f64) {
    let cfg = BertConfig {
        vocab_size: 300,
        hidden_size: 16,
        num_hidden_layers: 1,
        num_attention_heads: 2,
        intermediate_size: 32,
        max_position_embeddings: 20,
        ..BertConfig::default()
    };
    let params = ParamStore::new(17);
    let mut model = BertForMaskedLm::load(params.var_builder(dtype, &DEV), &cfg).unwrap();
    if frozen {
        model = model.with_frozen_embeddings();
    }
    // The head's bias starts at zero; give it values so that it takes part.
    let bias = &params.named_vars()["cls.predictions.bias"];
    bias.set(&(randn(&[300], 31) * 0.5).unwrap().to_dtype(dtype).unwrap())
        .unwrap();
    let hidden = Var::from_tensor(&randn(&[2, 6, 16], 23).to_dtype(dtype).unwrap()).unwrap();
    let masked = MaskedTokens {
        input_ids: Tensor::zeros((2, 6), DType::U32, &DEV).unwrap(),
        positions: Tensor::new(&[0u32, 3, 4, 7, 11][..], &DEV).unwrap(),
        targets: Tensor::new(&[5u32, 299, 5, 0, 123][..], &DEV).unwrap(),
    };
    let new = masked_lm_loss(&model.mlm_head, hidden.as_tensor(), &masked).unwrap();
    let old = old_masked_lm_loss(&model, hidden.as_tensor(), &masked);
    let value = |t: &Tensor| t.to_dtype(DType::F64).unwrap().to_scalar::<f64>().unwrap();
    assert!(
        (value(&new) - value(&old)).abs() <= tol * value(&old),
        "{dtype:?} loss"
    );
    let (gn, go) = (new.backward().unwrap(), old.backward().unwrap());
    let mut vars = params.named_vars();
    vars.insert("hidden".into(), hidden);
    let embeddings = "bert.embeddings.word_embeddings.weight";
    assert!(vars.contains_key(embeddings));
    for (name, var) in &vars {
        let (a, b) = (gn.get(var.as_tensor()), go.get(var.as_tensor()));
        let what = format!("{dtype:?} frozen {frozen}: {name}");
        match (a, b) {
            (Some(a), Some(b)) => assert_close(a, b, tol, &what),
            (None, None) => assert!(
                !name.starts_with("cls") && name != "hidden" && (frozen || name != embeddings),
                "{what}: no gradient"
            ),
            _ => panic!("{what}: a gradient in one form only"),
        }
    }
    assert_eq!(gn.get(vars[embeddings].as_tensor()).is_some(), !frozen);
}

#[test]
fn mlm_masked_lm_loss_is_unchanged_in_value_and_gradients() {
    for frozen in [false, true] {
        check_masked_lm(DType::F64, frozen, 1e-12);
        // As the twins' f32 tolerance (hidden 16, vocabulary 300).
        check_masked_lm(DType::F32, frozen, 1e-5);
    }
}
