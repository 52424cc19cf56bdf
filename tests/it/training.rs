//! Gradients reach every weight, and dropout is real.

use crate::common;

use candle_core::{DType, Device, Tensor};
use candle_nn::{AdamW, Optimizer, ParamsAdamW};
use common::{assert_gradient_reaches, fixture, forward_golden, golden, max_abs_diff};
use mlctl::encoder::{Dropout, DropoutRng};
use mlctl::pretrained::PretrainedBert;

/// MLM cross-entropy on every attended position of the golden inputs.
fn mlm_loss(bert: &PretrainedBert, train: bool) -> Tensor {
    let g = golden("tiny_bert/golden.safetensors");
    let out = common::forward_golden(bert, train);
    let vocab = bert.config.vocab_size;
    let logits = out.logits.reshape(((), vocab)).unwrap();
    let targets = g["input_ids"]
        .flatten_all()
        .unwrap()
        .to_dtype(DType::U32)
        .unwrap();
    let per_token = candle_nn::ops::log_softmax(&logits, 1)
        .unwrap()
        .gather(&targets.unsqueeze(1).unwrap(), 1)
        .unwrap()
        .squeeze(1)
        .unwrap()
        .neg()
        .unwrap();
    let mask = g["attention_mask"]
        .flatten_all()
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap();
    ((per_token * &mask).unwrap().sum_all().unwrap()
        / mask.sum_all().unwrap().to_scalar::<f32>().unwrap() as f64)
        .unwrap()
}

#[test]
fn one_optimizer_step_changes_every_trainable_tensor() {
    let bert = PretrainedBert::from_dir(&fixture("tiny_bert"), &Device::Cpu, DType::F32).unwrap();
    let vars = bert.params.named_vars();
    // 2 layers x 16 tensors + 5 embedding tensors + 5 MLM head tensors.
    assert_eq!(
        vars.len(),
        2 * 16 + 5 + 5,
        "{:?}",
        vars.keys().collect::<Vec<_>>()
    );
    let initial: Vec<(String, Tensor)> = vars
        .iter()
        .map(|(n, v)| (n.clone(), v.as_tensor().copy().unwrap()))
        .collect();

    // Eval mode keeps the loss deterministic, so the step can be checked to lower it.
    let loss = mlm_loss(&bert, false);
    let grads = loss.backward().unwrap();
    for (name, var) in &vars {
        assert_gradient_reaches(&grads, var.as_tensor(), name);
    }
    let mut opt = AdamW::new(
        bert.params.varmap().all_vars(),
        ParamsAdamW {
            lr: 1e-3,
            ..Default::default()
        },
    )
    .unwrap();
    opt.step(&grads).unwrap();

    let unchanged: Vec<&String> = initial
        .iter()
        .filter(|(name, old)| max_abs_diff(vars[name].as_tensor(), old) == 0.0)
        .map(|(name, _)| name)
        .collect();
    assert!(
        unchanged.is_empty(),
        "weights left unchanged by a step: {unchanged:?}"
    );
    // Named explicitly, so a renamed or untracked LayerNorm cannot slip through.
    for name in [
        "bert.embeddings.LayerNorm.weight",
        "bert.embeddings.LayerNorm.bias",
        "bert.embeddings.word_embeddings.weight",
        "bert.encoder.layer.1.attention.self.query.weight",
        "bert.encoder.layer.1.output.LayerNorm.bias",
        "cls.predictions.transform.LayerNorm.weight",
        "cls.predictions.bias",
    ] {
        assert!(
            vars.contains_key(name),
            "{name} is not a trainable variable"
        );
    }
    let (before, after) = (
        loss.to_scalar::<f32>().unwrap(),
        mlm_loss(&bert, false).to_scalar::<f32>().unwrap(),
    );
    assert!(after < before, "loss {before} -> {after} after one step");
}

#[test]
fn dropout_is_stochastic_in_training_and_off_in_eval() {
    let bert = PretrainedBert::from_dir(&fixture("tiny_bert"), &Device::Cpu, DType::F32).unwrap();
    let run = |train: bool| forward_golden(&bert, train).encoder.last_hidden_state;
    let (eval_a, eval_b) = (run(false), run(false));
    assert_eq!(
        max_abs_diff(&eval_a, &eval_b),
        0.0,
        "eval mode must be deterministic"
    );
    let (train_a, train_b) = (run(true), run(true));
    assert!(
        max_abs_diff(&train_a, &train_b) > 1e-3,
        "two training passes drew the same dropout masks"
    );
    assert!(
        max_abs_diff(&train_a, &eval_a) > 1e-3,
        "training pass equals eval pass: dropout inactive"
    );

    // Reseeding replays the same masks: training on the CPU is reproducible.
    bert.encoder().dropout_rng().reseed(7);
    let seeded_a = run(true);
    bert.encoder().dropout_rng().reseed(7);
    let seeded_b = run(true);
    assert_eq!(max_abs_diff(&seeded_a, &seeded_b), 0.0);
}

#[test]
fn dropout_zeroes_the_requested_fraction_and_keeps_the_mean() {
    let n = 200_000;
    let ones = Tensor::ones(n, DType::F32, &Device::Cpu).unwrap();
    let out = Dropout::new(0.25, DropoutRng::new(3))
        .forward_t(&ones, true)
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    let zeros = out.iter().filter(|&&x| x == 0.0).count() as f64 / n as f64;
    assert!((zeros - 0.25).abs() < 0.01, "zeroed fraction {zeros}");
    let mean = out.iter().map(|&x| x as f64).sum::<f64>() / n as f64;
    assert!(
        (mean - 1.0).abs() < 0.02,
        "mean {mean} (inverted dropout keeps the expectation)"
    );
    assert!(out
        .iter()
        .all(|&x| x == 0.0 || (x - 1.0 / 0.75).abs() < 1e-6));
}
