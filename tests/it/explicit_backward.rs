//! The explicit encoder backward against its composite twin, candle's autograd through the same
//! encoder: every parameter's gradient, with dropout (the same keys), padding, token types,
//! frozen embeddings, odd lengths, batch 1, passes split in chunks and summed passes.

use std::collections::BTreeMap;

use candle_core::{DType, Device, Tensor, Var};
use mlctl::encoder::{Backward, BertConfig, BertEncoder, EncoderOutput, HiddenAct, ParamStore};
use mlctl::ops::DropoutKey;

const DEV: Device = Device::Cpu;

fn config(hidden: usize, heads: usize, layers: usize, act: HiddenAct) -> BertConfig {
    BertConfig {
        vocab_size: 40,
        hidden_size: hidden,
        num_hidden_layers: layers,
        num_attention_heads: heads,
        intermediate_size: 3 * hidden,
        max_position_embeddings: 24,
        type_vocab_size: 2,
        hidden_act: act,
        hidden_dropout_prob: 0.1,
        attention_probs_dropout_prob: 0.2,
        ..BertConfig::default()
    }
}

/// A batch of `lengths.len()` sequences padded to the longest, token types switching halfway.
fn batch(lengths: &[usize], seed: u32) -> (Tensor, Tensor, Tensor) {
    let seq = *lengths.iter().max().unwrap();
    let (mut ids, mut types, mut mask) = (vec![], vec![], vec![]);
    for (b, &len) in lengths.iter().enumerate() {
        for i in 0..seq {
            let real = i < len;
            ids.push(if real {
                1 + (seed + 7 * b as u32 + 13 * i as u32) % 39
            } else {
                0
            });
            types.push(u32::from(real && i >= len / 2));
            mask.push(if real { 1f32 } else { 0.0 });
        }
    }
    let shape = (lengths.len(), seq);
    (
        Tensor::from_vec(ids, shape, &DEV).unwrap(),
        Tensor::from_vec(types, shape, &DEV).unwrap(),
        Tensor::from_vec(mask, shape, &DEV).unwrap(),
    )
}

/// `Σ_i <h_i, r_i>` over the hidden states in `used`, with fixed pseudo-random `r_i` (a sine of
/// the position): every entry of those states gets its own gradient.
fn loss(hidden: &[Tensor], used: &[usize]) -> Tensor {
    let mut total: Option<Tensor> = None;
    for &i in used {
        let h = &hidden[i];
        // Deterministic weights: a smooth function of the position, not an RNG draw.
        let n = h.elem_count();
        let w: Vec<f64> = (0..n)
            .map(|j| ((j * 7 + i * 3) as f64 * 0.37).sin())
            .collect();
        let w = Tensor::from_vec(w, h.dims(), &DEV)
            .unwrap()
            .to_dtype(h.dtype())
            .unwrap();
        let term = (h * w).unwrap().sum_all().unwrap();
        total = Some(match total {
            Some(t) => (t + term).unwrap(),
            None => term,
        });
    }
    total.unwrap()
}

type Grads = BTreeMap<String, Tensor>;

struct Case<'a> {
    cfg: BertConfig,
    dtype: DType,
    lengths: &'a [usize],
    used: &'a [usize],
    frozen: bool,
}

/// Every parameter's gradient of the case's loss, by the autograd path and by the explicit one.
fn both(case: &Case<'_>) -> (Grads, Grads) {
    let params = ParamStore::new(5);
    let mut enc = BertEncoder::load(params.var_builder(case.dtype, &DEV), &case.cfg).unwrap();
    if case.frozen {
        enc = enc.with_frozen_embeddings();
    }
    let vars: Vec<(String, Var)> = params.named_vars().into_iter().collect();
    let (ids, types, mask) = batch(case.lengths, 3);
    let key = Some(DropoutKey::new(17, 4).with_sample_offset(5));
    let autograd = {
        let out = enc
            .forward_keyed(&ids, Some(&types), Some(&mask), key)
            .unwrap();
        let store = loss(&out.hidden_states, case.used).backward().unwrap();
        vars.iter()
            .filter_map(|(n, v)| store.get(v.as_tensor()).map(|g| (n.clone(), g.clone())))
            .collect()
    };
    let explicit_enc = enc.with_backward(Backward::Explicit);
    let out = explicit_enc
        .forward_keyed(&ids, Some(&types), Some(&mask), key)
        .unwrap();
    let store = loss(&out.hidden_states, case.used).backward().unwrap();
    explicit_enc.backward_recorded(&store).unwrap();
    let mut explicit = Grads::new();
    explicit_enc.take_gradients(&vars, &mut explicit).unwrap();
    (autograd, explicit)
}

/// Largest `|a - b|` over a tensor, relative to its largest `|b|` or to `floor`, whichever is
/// larger: some gradients are exactly zero in exact arithmetic (a key bias shifts every score
/// of a query by the same amount, which the softmax ignores), and both paths give rounding
/// noise there.
fn rel_diff(a: &Tensor, b: &Tensor, floor: f64) -> f64 {
    let flat = |t: &Tensor| {
        t.to_dtype(DType::F64)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f64>()
            .unwrap()
    };
    let (a, b) = (flat(a), flat(b));
    let scale = b
        .iter()
        .fold(0f64, |m, x| m.max(x.abs()))
        .max(floor)
        .max(1e-300);
    a.iter().zip(&b).fold(0f64, |m, (x, y)| {
        // NaN anywhere is a failure, not a difference `f64::max` would skip.
        let d = (x - y).abs();
        if d.is_nan() {
            f64::INFINITY
        } else {
            m.max(d)
        }
    }) / scale
}

/// The largest gradient entry of all.
fn largest(grads: &Grads) -> f64 {
    grads.values().fold(0f64, |m, g| {
        let g = g
            .to_dtype(DType::F64)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap();
        m.max(g.to_scalar::<f64>().unwrap())
    })
}

fn assert_same(case: &Case<'_>, tol: f64) {
    let (autograd, explicit) = both(case);
    let names = |g: &Grads| g.keys().cloned().collect::<Vec<_>>();
    assert_eq!(
        names(&explicit),
        names(&autograd),
        "parameters with a gradient"
    );
    assert!(!autograd.is_empty());
    let floor = 1e-2 * largest(&autograd);
    let mut worst = (0f64, String::new());
    for (name, a) in &autograd {
        let d = rel_diff(&explicit[name], a, floor);
        assert!(d <= tol, "{name}: relative difference {d:e} > {tol:e}");
        if d > worst.0 {
            worst = (d, name.clone());
        }
    }
    eprintln!("worst relative difference {:.2e} ({})", worst.0, worst.1);
}

#[test]
fn f64_gradients_equal_autograd_at_three_shapes() {
    // f64 rounding (1e-16) through a few layers stays far below 1e-10.
    let cases = [
        (
            config(16, 2, 2, HiddenAct::Gelu),
            &[5usize, 3, 7][..],
            &[1usize, 2][..],
        ),
        (config(24, 3, 3, HiddenAct::GeluNew), &[9, 9], &[0, 1, 3]),
        (config(8, 1, 1, HiddenAct::Relu), &[4], &[1]),
    ];
    for (cfg, lengths, used) in cases {
        let case = Case {
            cfg,
            dtype: DType::F64,
            lengths,
            used,
            frozen: false,
        };
        eprintln!("case {lengths:?} {used:?}");
        assert_same(&case, 1e-10);
    }
}

#[test]
fn frozen_embeddings_get_no_gradient_and_the_rest_is_unchanged() {
    let case = Case {
        cfg: config(16, 2, 2, HiddenAct::Gelu),
        dtype: DType::F64,
        lengths: &[6, 2],
        used: &[2],
        frozen: true,
    };
    let (autograd, explicit) = both(&case);
    assert!(explicit.keys().all(|k| !k.starts_with("embeddings.")));
    assert_same(&case, 1e-10);
    assert_eq!(autograd.len(), explicit.len());
}

#[test]
fn f32_gradients_equal_autograd_within_rounding() {
    // Both paths round every product and sum to f32 (ε = 6e-8) in different orders; the
    // longest sums here have ~100 terms and the chain two layers deep, so relative
    // differences up to ~100 ε (6e-6) are rounding (3e-7 seen), and a wrong term is O(1e-3)
    // or more (a dropped LayerNorm mean term: 4e-3; an ignored attention mask: 5e-2).
    let case = Case {
        cfg: config(16, 2, 2, HiddenAct::Gelu),
        dtype: DType::F32,
        lengths: &[5, 3, 7],
        used: &[1, 2],
        frozen: false,
    };
    assert_same(&case, 1e-5);
}

#[test]
fn passes_in_chunks_and_summed_passes_give_the_whole_batch_gradient() {
    let params = ParamStore::new(6);
    let cfg = config(16, 2, 2, HiddenAct::Gelu);
    let enc = BertEncoder::load(params.var_builder(DType::F64, &DEV), &cfg)
        .unwrap()
        .with_backward(Backward::Explicit);
    let vars: Vec<(String, Var)> = params.named_vars().into_iter().collect();
    let (ids, types, mask) = batch(&[5, 3, 7], 1);
    let key = DropoutKey::new(3, 2);
    let whole = {
        let out = enc
            .forward_keyed(&ids, Some(&types), Some(&mask), Some(key))
            .unwrap();
        enc.backward_recorded(&loss(&out.hidden_states, &[2]).backward().unwrap())
            .unwrap();
        let mut g = Grads::new();
        enc.take_gradients(&vars, &mut g).unwrap();
        g
    };
    // Rows 0 and 1..3 as two passes (keys offset to their rows), two backward calls, one sum.
    for (start, len) in [(0, 1), (1, 2)] {
        let rows = |t: &Tensor| t.narrow(0, start, len).unwrap();
        let out = enc
            .forward_keyed(
                &rows(&ids),
                Some(&rows(&types)),
                Some(&rows(&mask)),
                Some(key.advanced(start as u64)),
            )
            .unwrap();
        // The loss weights of the whole batch's rows.
        let h = &out.hidden_states[2];
        let n = 3 * ids.dim(1).unwrap() * 16;
        let w: Vec<f64> = (0..n)
            .map(|j| ((j * 7 + 2 * 3) as f64 * 0.37).sin())
            .collect();
        let w = Tensor::from_vec(w, (3, ids.dim(1).unwrap(), 16), &DEV).unwrap();
        let l = (h * rows(&w)).unwrap().sum_all().unwrap();
        enc.backward_recorded(&l.backward().unwrap()).unwrap();
    }
    let mut chunked = Grads::new();
    enc.take_gradients(&vars, &mut chunked).unwrap();
    assert_eq!(whole.len(), chunked.len());
    let floor = 1e-2 * largest(&whole);
    for (name, g) in &whole {
        let d = rel_diff(&chunked[name], g, floor);
        assert!(
            d <= 1e-10,
            "{name}: chunks differ from the whole batch by {d:e}"
        );
    }
}

#[test]
fn sampled_entries_equal_finite_differences() {
    // An independent reference: central differences of the f64 loss (error O(step²) ≈ 1e-10).
    let case = Case {
        cfg: config(16, 2, 2, HiddenAct::Gelu),
        dtype: DType::F64,
        lengths: &[5, 3, 7],
        used: &[1, 2],
        frozen: false,
    };
    let (_, explicit) = both(&case);
    let params = ParamStore::new(5);
    let enc = BertEncoder::load(params.var_builder(DType::F64, &DEV), &case.cfg).unwrap();
    let vars = params.named_vars();
    let (ids, types, mask) = batch(case.lengths, 3);
    let key = Some(DropoutKey::new(17, 4).with_sample_offset(5));
    let f = || {
        let out = enc
            .forward_keyed(&ids, Some(&types), Some(&mask), key)
            .unwrap();
        loss(&out.hidden_states, case.used)
            .to_scalar::<f64>()
            .unwrap()
    };
    for (name, index) in [
        ("embeddings.word_embeddings.weight", 11 * 16 + 3),
        ("embeddings.word_embeddings.weight", 0),
        ("embeddings.LayerNorm.weight", 5),
        ("encoder.layer.0.attention.self.query.weight", 37),
        ("encoder.layer.1.attention.output.dense.bias", 2),
        ("encoder.layer.1.intermediate.dense.weight", 100),
        ("encoder.layer.0.output.LayerNorm.bias", 9),
    ] {
        let var = &vars[name];
        let orig = var
            .as_tensor()
            .flatten_all()
            .unwrap()
            .to_vec1::<f64>()
            .unwrap();
        let at = |delta: f64| {
            let mut v = orig.clone();
            v[index] += delta;
            var.set(&Tensor::from_vec(v, var.shape(), &DEV).unwrap())
                .unwrap();
            f()
        };
        let fd = (at(1e-5) - at(-1e-5)) / 2e-5;
        var.set(&Tensor::from_vec(orig, var.shape(), &DEV).unwrap())
            .unwrap();
        let got = explicit[name]
            .flatten_all()
            .unwrap()
            .to_vec1::<f64>()
            .unwrap()[index];
        assert!(
            (got - fd).abs() <= 1e-6 * fd.abs().max(1.0),
            "{name}[{index}]: explicit {got} vs finite difference {fd}"
        );
    }
}

/// Three trainer steps with each backward: the plain step with gradient accumulation, and the
/// cached loss in chunks of two pairs, both with the MLM term; the losses and the weights after
/// the steps agree to f32 rounding. The learning rate is 1e-3, so a wrong gradient moves a
/// weight by up to ~1e-3, far outside the 1e-5 allowed. Adam's `eps` is 1e-3 rather than 1e-8:
/// some gradients are zero in exact arithmetic (a key bias shifts every score of a query alike)
/// and both paths give rounding noise there (~1e-9), which Adam with a tiny `eps` would scale up
/// to a ±lr step of either sign; with `eps` 1e-3 such noise moves a weight by ~1e-9.
#[test]
fn trainer_steps_agree_between_the_two_backwards() {
    use crate::common::{synthetic_tsv, tiny_model, tsv_loader};
    use mlctl::loss::MultiLevelLoss;
    use mlctl::train::{TrainConfig, Trainer};
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("train.tsv");
    std::fs::write(&data, synthetic_tsv(12, 5)).unwrap();
    for (grad_accum, mini_batch) in [(2, None), (1, Some(2))] {
        let run = |backward: Backward, name: &str| {
            let base = TrainConfig::adam_linear_clipped(3);
            let config = TrainConfig {
                grad_accum,
                mini_batch,
                progress: false,
                schedule: mlctl::train::LrSchedule {
                    peak_lr: 1e-3,
                    ..base.schedule
                },
                adamw: mlctl::train::AdamWConfig {
                    eps: 1e-3,
                    ..base.adamw
                },
                ..base
            };
            let mut trainer = Trainer::new(
                tiny_model(7),
                MultiLevelLoss::mlctl(),
                tsv_loader(&data, 4, 16, 3),
                config,
                &dir.path().join(name),
            )
            .unwrap()
            .with_backward(backward);
            let losses: Vec<f32> = (0..3).map(|_| trainer.train_step().unwrap().loss).collect();
            (losses, trainer.model.named_vars())
        };
        let (la, wa) = run(Backward::Autograd, &format!("a{grad_accum}"));
        let (le, we) = run(Backward::Explicit, &format!("e{grad_accum}"));
        for (a, e) in la.iter().zip(&le) {
            assert!(
                (a - e).abs() <= 1e-4 * a.abs().max(1.0),
                "losses {la:?} vs {le:?}"
            );
        }
        let mut worst = 0f64;
        for (name, a) in &wa {
            let d = crate::common::max_abs_diff(a.as_tensor(), we[name].as_tensor());
            assert!(
                d <= 1e-5,
                "{name}: weights differ by {d:e} after three steps"
            );
            worst = worst.max(d);
        }
        eprintln!(
            "accum {grad_accum}, mini-batch {mini_batch:?}: largest weight difference {worst:.2e}"
        );
    }
}

/// Every hidden state of `got` within `tol` (relative) of `want`'s.
fn assert_hidden_states_close(what: &str, got: &EncoderOutput, want: &EncoderOutput, tol: f64) {
    assert_eq!(got.hidden_states.len(), want.hidden_states.len(), "{what}");
    for (i, (h, g)) in got
        .hidden_states
        .iter()
        .zip(&want.hidden_states)
        .enumerate()
    {
        let d = rel_diff(h, g, 0.0);
        assert!(d <= tol, "{what}: hidden state {i} differs by {d:e}");
    }
}

/// Inference splits a batch into one group of sequences per thread, each group's whole forward on
/// its own thread: on pools of 1 to 4 threads (batches of 5 and 2 split unevenly or not at all,
/// a batch of 1 never) every hidden state equals the graph path's, f64 to 1e-12, with padding
/// and token types, and f32 to 1e-5 (as the whole-batch comparison above).
#[test]
fn inference_split_by_sequence_over_threads_equals_the_graph_forward() {
    for (dtype, tol) in [(DType::F64, 1e-12), (DType::F32, 1e-5)] {
        let cfg = config(16, 2, 2, HiddenAct::Gelu);
        let params = ParamStore::new(9);
        let enc = BertEncoder::load(params.var_builder(dtype, &DEV), &cfg).unwrap();
        for lengths in [&[5, 3, 7, 1, 6][..], &[4, 7], &[6]] {
            let (ids, types, mask) = batch(lengths, 3);
            let graph = enc.forward(&ids, Some(&types), Some(&mask)).unwrap();
            for threads in 1..=4 {
                let pool = rayon::ThreadPoolBuilder::new()
                    .num_threads(threads)
                    .build()
                    .unwrap();
                let host = pool
                    .install(|| enc.forward_detached(&ids, Some(&types), Some(&mask)))
                    .unwrap();
                let what = format!("{dtype:?}, batch {lengths:?}, {threads} threads");
                assert_hidden_states_close(&what, &host, &graph, tol);
            }
        }
    }
}

/// `forward_detached` runs on host slices with the same kernels: every hidden state equals the
/// graph path's (f64 to 1e-12; f32 to rounding), with padding, token types, and RoBERTa-style
/// position ids.
#[test]
fn inference_on_host_slices_equals_the_graph_forward() {
    for (dtype, tol, roberta) in [
        (DType::F64, 1e-12, false),
        (DType::F32, 1e-5, false),
        (DType::F64, 1e-12, true),
    ] {
        let mut cfg = config(16, 2, 2, HiddenAct::Gelu);
        if roberta {
            cfg.extra.insert("model_type".into(), "xlm-roberta".into());
            cfg.pad_token_id = Some(0);
            cfg.max_position_embeddings = 24;
        }
        let params = ParamStore::new(8);
        let enc = BertEncoder::load(params.var_builder(dtype, &DEV), &cfg).unwrap();
        let (ids, types, mask) = batch(&[5, 3, 7], 2);
        let graph = enc.forward(&ids, Some(&types), Some(&mask)).unwrap();
        let host = enc
            .forward_detached(&ids, Some(&types), Some(&mask))
            .unwrap();
        let what = format!("{dtype:?} roberta={roberta}");
        assert_hidden_states_close(&what, &host, &graph, tol);
    }
}
