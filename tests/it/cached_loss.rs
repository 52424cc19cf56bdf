//! GradCache: the cached multi-level loss gives the uncached full batch's loss and gradients.

use crate::common;

use std::collections::BTreeMap;

use candle_core::{Device, Tensor, Var};
use common::{max_abs_diff, synthetic_tsv, tiny_model, tsv_loader};
use mlctl::data::{MaskKey, MlmMasking, PairBatch};
use mlctl::loss::{CachedLoss, CzNce, MaskedPair, MultiLevelLoss};
use mlctl::model::MlCtlModel;
use mlctl::ops::DropoutKey;

fn batch_of(n: usize) -> (PairBatch, MaskedPair) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("train.tsv");
    std::fs::write(&path, synthetic_tsv(n, 5)).unwrap();
    let mut loader = tsv_loader(&path, n, 16, 0);
    let batch = loader.next_batch(&Device::Cpu).unwrap();
    assert_eq!(batch.len(), n);
    let masking = MlmMasking::for_tokenizer(loader.tokenizer())
        .unwrap()
        .with_prob(0.3)
        .unwrap();
    let masked = MaskedPair::draw(&masking, &batch, MaskKey::new(1, 0)).unwrap();
    (batch, masked)
}

/// The reference: the whole batch in one graph.
fn uncached(
    objective: &MultiLevelLoss,
    model: &MlCtlModel,
    batch: &PairBatch,
    masked: &MaskedPair,
    vars: &[(String, Var)],
    key: Option<DropoutKey>,
) -> (f32, BTreeMap<String, Tensor>) {
    let terms = match key {
        Some(key) => objective.forward_keyed(model, batch, Some(masked), key),
        None => objective.forward(model, batch, Some(masked), false),
    }
    .unwrap();
    let store = terms.total.backward().unwrap();
    let grads = vars
        .iter()
        .filter_map(|(n, v)| store.get(v).map(|g| (n.clone(), g.clone())))
        .collect();
    (terms.total.to_scalar::<f32>().unwrap(), grads)
}

fn check(n: usize, mini_batch: usize, objective: MultiLevelLoss, key: Option<DropoutKey>) {
    let (batch, masked) = batch_of(n);
    let model = tiny_model(7);
    let vars: Vec<(String, Var)> = model.named_vars().into_iter().collect();
    let (want_loss, want) = uncached(&objective, &model, &batch, &masked, &vars, key);
    if key.is_some() {
        // Dropout must be on: the keyed loss differs from the deterministic one.
        let (eval_loss, _) = uncached(&objective, &model, &batch, &masked, &vars, None);
        assert!(
            (eval_loss - want_loss).abs() > 1e-4,
            "dropout changed nothing"
        );
    }
    let cached = CachedLoss::new(objective, mini_batch).unwrap();
    let got = cached
        .forward_backward(&model, &batch, Some(&masked), &vars, key)
        .unwrap();
    assert!(
        (got.total - want_loss).abs() < 1e-5 * want_loss.abs().max(1.0),
        "loss {} vs {want_loss}",
        got.total
    );
    assert_eq!(
        got.grads.keys().collect::<Vec<_>>(),
        want.keys().collect::<Vec<_>>(),
        "the same parameters get gradients"
    );
    // Both sum the same per-token f32 contributions, in chunks or at once. A sum of n terms
    // is off by at most n·u·Σ|terms| (u = 2⁻²⁴); rounding errors of many terms add like a
    // random walk, about √n·u. Each gradient element here sums at most 64 pairs × 16 tokens
    // × 2 sides = 2048 contributions (√n·u ≈ 2.7e-6), through a few layers: the two orders
    // differ by some 1e-5 of the terms' scale at most, for which the largest gradient element
    // stands. 2e-5 of it holds on any CPU's summation order; a chunk counted twice or dropped
    // is off by an eighth of it.
    let scale = want
        .values()
        .map(|g| max_abs_diff(g, &g.zeros_like().unwrap()))
        .fold(0f64, common::nan_max);
    let mut worst = 0f64;
    for (name, g) in &want {
        let diff = max_abs_diff(&got.grads[name], g);
        worst = worst.max(diff);
        assert!(
            diff <= 2e-5 * scale,
            "{name}: max abs diff {diff:e}, largest gradient element {scale:e}"
        );
    }
    eprintln!(
        "B={n}, chunks of {mini_batch}: worst gradient difference {worst:.2e} = {:.1e} of the \
         largest element {scale:.2e}",
        worst / scale
    );
}

#[test]
fn cached_loss_equals_the_uncached_batch_in_chunks_of_8() {
    check(64, 8, MultiLevelLoss::mlctl(), None);
}

#[test]
fn cached_loss_with_dropout_equals_the_uncached_batch_with_the_same_masks() {
    let key = DropoutKey::new(11, 3);
    check(64, 8, MultiLevelLoss::mlctl(), Some(key));
    let objective = MultiLevelLoss::mlctl().with_word(Some(CzNce::new().with_temperature(0.1)));
    check(20, 8, objective, Some(key));
}

#[test]
fn cached_loss_handles_a_smaller_last_chunk_and_every_term() {
    let objective = MultiLevelLoss::mlctl().with_word(Some(CzNce::new().with_temperature(0.1)));
    check(20, 8, objective.clone(), None);
    check(20, 1, MultiLevelLoss::mlctl().with_mlm_weight(None), None);
    // A weighted word term, in chunks as in one graph.
    check(20, 8, objective.with_word_weight(0.25), None);
}

#[test]
fn cached_loss_rejects_a_zero_mini_batch() {
    assert!(matches!(
        CachedLoss::new(MultiLevelLoss::mlctl(), 0),
        Err(mlctl::Error::InvalidArgument(_))
    ));
}

fn cached_trainer(
    run: &std::path::Path,
    data: &std::path::Path,
    model_seed: u64,
) -> mlctl::train::Trainer {
    use mlctl::train::{TrainConfig, Trainer};
    let config = TrainConfig {
        mini_batch: Some(3),
        checkpoint_every: 2,
        progress: false,
        ..TrainConfig::adam_linear_clipped(4)
    };
    let config = TrainConfig {
        schedule: mlctl::train::LrSchedule {
            peak_lr: 1e-3,
            ..config.schedule
        },
        ..config
    };
    Trainer::new(
        tiny_model(model_seed),
        MultiLevelLoss::mlctl(),
        tsv_loader(data, 8, 16, 9),
        config,
        run,
    )
    .unwrap()
}

#[test]
fn cached_loss_training_resumes_bit_identically() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("train.tsv");
    std::fs::write(&data, synthetic_tsv(20, 11)).unwrap();
    let mut straight = cached_trainer(&dir.path().join("straight"), &data, 4);
    straight.run().unwrap();

    let run = dir.path().join("interrupted");
    let mut first = cached_trainer(&run, &data, 4);
    for _ in 0..2 {
        first.train_step().unwrap();
    }
    first.save_checkpoint().unwrap();
    first.train_step().unwrap(); // lost with the process
    drop(first);
    let mut resumed = cached_trainer(&run, &data, 99);
    assert_eq!(resumed.resume().unwrap(), Some(2));
    resumed.run().unwrap();
    let (a, b) = (straight.model.named_vars(), resumed.model.named_vars());
    for (name, var) in &a {
        assert_eq!(
            max_abs_diff(var.as_tensor(), b[name].as_tensor()),
            0.0,
            "{name} differs after resume"
        );
    }
}

#[test]
fn keyed_passes_restore_the_dropout_key_the_caller_had_set() {
    let (batch, masked) = batch_of(4);
    let model = tiny_model(7);
    let vars: Vec<(String, Var)> = model.named_vars().into_iter().collect();
    let rng = model.encoder().dropout_rng().clone();
    let callers = DropoutKey::new(9, 3).with_sample_offset(5);
    let key = DropoutKey::new(1, 2);
    let objective = MultiLevelLoss::mlctl();
    for previous in [None, Some(callers)] {
        rng.set_key(previous);
        objective
            .forward_keyed(&model, &batch, Some(&masked), key)
            .unwrap();
        assert_eq!(rng.key(), previous, "forward_keyed");
        CachedLoss::new(objective.clone(), 2)
            .unwrap()
            .forward_backward(&model, &batch, Some(&masked), &vars, Some(key))
            .unwrap();
        assert_eq!(rng.key(), previous, "cached");
    }
}
