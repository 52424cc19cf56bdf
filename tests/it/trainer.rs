//! The trainer: a real learning signal, bit-exact resume, atomic checkpoints, the non-finite guard.

use crate::common;

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use common::{max_abs_diff, synthetic_tsv, tiny_model, tsv_loader};
use mlctl::loss::MultiLevelLoss;
use mlctl::model::MlCtlModel;
use mlctl::train::{
    latest_checkpoint, write_checkpoint_dir, Decay, LossScaler, LrSchedule, StepRecord,
    TrainConfig, Trainer,
};

fn config(steps: u64, lr: f64) -> TrainConfig {
    TrainConfig {
        schedule: LrSchedule {
            peak_lr: lr,
            warmup_steps: 2,
            total_steps: steps,
            decay: Decay::Linear,
        },
        progress: false,
        ..TrainConfig::adam_linear_clipped(steps)
    }
}

fn corpus(dir: &Path, n: usize) -> std::path::PathBuf {
    let path = dir.join("train.tsv");
    std::fs::write(&path, synthetic_tsv(n, 11)).unwrap();
    path
}

/// In-batch retrieval accuracy of source -> target by cosine of the pooled sentence embeddings.
fn retrieval_accuracy(model: &MlCtlModel, data: &Path, n: usize) -> f32 {
    let mut loader = tsv_loader(data, n, 16, 0);
    let batch = loader.next_batch(&Device::Cpu).unwrap();
    let normalize = |t: Tensor| {
        t.broadcast_div(&t.sqr().unwrap().sum_keepdim(1).unwrap().sqrt().unwrap())
            .unwrap()
    };
    let sentences = |tokens: &mlctl::tokenize::TokenBatch| {
        let out = model
            .bert
            .model
            .encoder
            .forward(
                &tokens.input_ids,
                Some(&tokens.token_type_ids),
                Some(&tokens.attention_mask),
            )
            .unwrap();
        normalize(
            model
                .pooling
                .sentence(&out, &tokens.attention_mask)
                .unwrap(),
        )
    };
    let (src, tgt) = (sentences(&batch.src), sentences(&batch.tgt));
    let best = src
        .matmul(&tgt.t().unwrap())
        .unwrap()
        .argmax(1)
        .unwrap()
        .to_vec1::<u32>()
        .unwrap();
    best.iter()
        .enumerate()
        .filter(|(i, &j)| *i as u32 == j)
        .count() as f32
        / n as f32
}

/// `n` pairs drawn like the training corpus but sharing no source sentence with it.
fn held_apart(dir: &Path, train: &Path, n: usize) -> std::path::PathBuf {
    let seen: std::collections::HashSet<String> = std::fs::read_to_string(train)
        .unwrap()
        .lines()
        .map(|l| l.split('\t').next().unwrap().to_string())
        .collect();
    let lines: String = synthetic_tsv(4 * n, 12)
        .lines()
        .filter(|l| !seen.contains(l.split('\t').next().unwrap()))
        .take(n)
        .map(|l| format!("{l}\n"))
        .collect();
    assert_eq!(lines.lines().count(), n);
    let path = dir.join("held_apart.tsv");
    std::fs::write(&path, lines).unwrap();
    path
}

/// What 100 steps on 32 pairs teach the tiny model: it memorises the training pairs (acc@1
/// about 0.7 on them) but barely generalises (held-apart acc@1 went from 0.125 to 0.19; with 64
/// training pairs to 0.25, with 256 or 1024 pairs not at all in 100 steps). So the retrieval
/// asserted here is on the training pairs, and the held-apart figure is printed beside it; a
/// test of generalisation needs a longer run than CI affords.
#[test]
fn training_lowers_the_contrastive_loss_and_memorises_the_training_pairs() {
    let dir = tempfile::tempdir().unwrap();
    let data = corpus(dir.path(), 32);
    let test = held_apart(dir.path(), &data, 32);
    let model = tiny_model(1);
    let (before, before_apart) = (
        retrieval_accuracy(&model, &data, 32),
        retrieval_accuracy(&model, &test, 32),
    );
    let objective = MultiLevelLoss::mlctl();
    let mut trainer = Trainer::new(
        model,
        objective,
        tsv_loader(&data, 16, 16, 5),
        config(100, 1e-2),
        &dir.path().join("run"),
    )
    .unwrap();
    let summary = trainer.run().unwrap();
    let log = std::fs::read_to_string(dir.path().join("run/metrics.jsonl")).unwrap();
    let records: Vec<StepRecord> = log
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(records.len(), 100);
    let mean =
        |r: &[StepRecord]| r.iter().map(|r| r.sentence.unwrap()).sum::<f32>() / r.len() as f32;
    let (early, late) = (mean(&records[..5]), mean(&records[95..]));
    assert!(late < early - 0.5, "sentence loss {early} -> {late}");
    assert!(records
        .iter()
        .all(|r| r.mlm.is_some() && r.lr > 0.0 && r.grad_norm > 0.0 && !r.skipped));
    let after = retrieval_accuracy(&trainer.model, &data, 32);
    let after_apart = retrieval_accuracy(&trainer.model, &test, 32);
    eprintln!(
        "retrieval acc@1, training pairs {before} -> {after}, held apart {before_apart} -> \
         {after_apart}"
    );
    assert!(
        after >= before + 0.25 && after >= 0.4,
        "retrieval acc@1 {before} -> {after} (chance 1/32)"
    );
    assert_eq!(summary.steps, 100);
    assert!(summary
        .checkpoint
        .unwrap()
        .join("model.safetensors")
        .is_file());
}

fn trainer_in(run: &Path, data: &Path, steps: u64, checkpoint_every: u64) -> Trainer {
    let cfg = TrainConfig {
        checkpoint_every,
        grad_accum: 2,
        ..config(steps, 1e-3)
    };
    Trainer::new(
        tiny_model(4),
        MultiLevelLoss::mlctl(),
        tsv_loader(data, 4, 16, 9),
        cfg,
        run,
    )
    .unwrap()
}

#[test]
fn a_stopped_and_resumed_run_ends_with_the_same_weights() {
    let dir = tempfile::tempdir().unwrap();
    let data = corpus(dir.path(), 10);
    let mut straight = trainer_in(&dir.path().join("straight"), &data, 8, 0);
    straight.run().unwrap();

    // Stop after 4 steps (the checkpoint at step 4 is all that survives a kill), then resume in
    // a fresh process-like trainer with a differently initialised model.
    let run = dir.path().join("interrupted");
    let mut first = trainer_in(&run, &data, 8, 4);
    for _ in 0..4 {
        first.train_step().unwrap();
    }
    first.save_checkpoint().unwrap();
    first.train_step().unwrap(); // step 5 runs past the checkpoint and is lost with the process
    drop(first);
    let mut resumed = Trainer::new(
        tiny_model(99),
        MultiLevelLoss::mlctl(),
        tsv_loader(&data, 4, 16, 9),
        TrainConfig {
            checkpoint_every: 4,
            grad_accum: 2,
            ..config(8, 1e-3)
        },
        &run,
    )
    .unwrap();
    assert_eq!(resumed.resume().unwrap(), Some(4));
    resumed.run().unwrap();

    let (a, b) = (straight.model.named_vars(), resumed.model.named_vars());
    assert_eq!(a.len(), b.len());
    for (name, var) in &a {
        assert_eq!(
            max_abs_diff(var.as_tensor(), b[name].as_tensor()),
            0.0,
            "{name} differs after resume"
        );
    }
    // The log was cut back to the checkpoint and continued: one record per step.
    let steps: Vec<u64> = std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<StepRecord>(l).unwrap().step)
        .collect();
    assert_eq!(steps, (1..=8).collect::<Vec<_>>());
}

#[test]
fn resume_skips_a_damaged_newest_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let data = corpus(dir.path(), 8);
    let run = dir.path().join("run");
    // Checkpoints at steps 1 and 2; the weights at step 1 are what a resume must restore.
    let mut trainer = trainer_in(&run, &data, 2, 0);
    trainer.train_step().unwrap();
    trainer.save_checkpoint().unwrap();
    let at_1: Vec<(String, Tensor)> = trainer
        .model
        .named_vars()
        .into_iter()
        .map(|(n, v)| (n, v.as_tensor().copy().unwrap()))
        .collect();
    trainer.train_step().unwrap();
    let newest = trainer.save_checkpoint().unwrap();
    let pristine = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(&newest).unwrap() {
        let path = entry.unwrap().path();
        std::fs::copy(&path, pristine.path().join(path.file_name().unwrap())).unwrap();
    }
    for damaged in [
        "model.safetensors",
        "optimizer.safetensors",
        "trainer_state.json",
    ] {
        let path = newest.join(damaged);
        let bytes = std::fs::read(pristine.path().join(damaged)).unwrap();
        std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
        let mut resumed = trainer_in(&run, &data, 2, 0);
        assert_eq!(resumed.resume().unwrap(), Some(1), "{damaged} truncated");
        let now = resumed.model.named_vars();
        for (name, want) in &at_1 {
            assert_eq!(
                max_abs_diff(now[name].as_tensor(), want),
                0.0,
                "{damaged}: {name}"
            );
        }
        std::fs::write(&path, &bytes).unwrap();
    }
    // Whole again: the newest checkpoint verifies and is the one resumed.
    let mut resumed = trainer_in(&run, &data, 2, 0);
    assert_eq!(resumed.resume().unwrap(), Some(2));
    // A damaged file with its size kept is caught by its SHA-256.
    let path = newest.join("model.safetensors");
    let mut bytes = std::fs::read(&path).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    std::fs::write(&path, &bytes).unwrap();
    let err = mlctl::train::verify_checkpoint(&newest).unwrap_err();
    assert!(err.to_string().contains("SHA-256"), "{err}");
}

/// One update of `trainer` whose loss is made non-finite (a NaN projection bias for the step,
/// restored afterwards), so the non-finite guard skips it.
fn skipped_step(trainer: &mut Trainer) {
    let bias = trainer.model.named_vars()["mlctl.projection.fc2.bias"].clone();
    let saved = bias.as_tensor().copy().unwrap();
    bias.set(&(&saved * f64::NAN).unwrap()).unwrap();
    assert!(trainer.train_step().unwrap().skipped);
    bias.set(&saved).unwrap();
}

#[test]
fn a_run_with_a_skipped_step_resumes_with_the_same_weights() {
    // Step 2 is skipped, so at the checkpoint (step 4) AdamW has made 3 updates: its bias
    // correction must continue from 3, not from the trainer's step count.
    let dir = tempfile::tempdir().unwrap();
    let data = corpus(dir.path(), 10);
    let drive = |trainer: &mut Trainer, steps: std::ops::Range<u64>| {
        for step in steps {
            if step == 2 {
                skipped_step(trainer);
            } else {
                trainer.train_step().unwrap();
            }
        }
    };
    let mut straight = trainer_in(&dir.path().join("straight"), &data, 8, 0);
    drive(&mut straight, 1..9);

    let run = dir.path().join("interrupted");
    let mut first = trainer_in(&run, &data, 8, 0);
    drive(&mut first, 1..5);
    first.save_checkpoint().unwrap();
    drop(first);
    // A checkpoint written before the optimizer's own step was saved (and before checksums
    // were, and while MLM masks came from a generator whose state it carries) resumes the same
    // way.
    let legacy = dir.path().join("legacy");
    let checkpoint = legacy.join("checkpoints/step-00000004");
    std::fs::create_dir_all(&checkpoint).unwrap();
    for entry in std::fs::read_dir(run.join("checkpoints/step-00000004")).unwrap() {
        let path = entry.unwrap().path();
        if path.file_name().unwrap() != mlctl::train::CHECKSUMS_FILE {
            std::fs::copy(&path, checkpoint.join(path.file_name().unwrap())).unwrap();
        }
    }
    let state_path = checkpoint.join("trainer_state.json");
    let mut state: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&state_path).unwrap()).unwrap();
    assert!(state
        .as_object_mut()
        .unwrap()
        .remove("optimizer_step")
        .is_some());
    let mask_rng = <rand_chacha::ChaCha8Rng as rand::SeedableRng>::seed_from_u64(0);
    state["mask_rng"] = serde_json::to_value(mask_rng).unwrap();
    std::fs::write(&state_path, state.to_string()).unwrap();

    for run in [run, legacy] {
        let mut resumed = trainer_in(&run, &data, 8, 0);
        assert_eq!(resumed.resume().unwrap(), Some(4));
        drive(&mut resumed, 5..9);
        let (a, b) = (straight.model.named_vars(), resumed.model.named_vars());
        for (name, var) in &a {
            assert_eq!(
                max_abs_diff(var.as_tensor(), b[name].as_tensor()),
                0.0,
                "{name} differs after resuming {}",
                run.display()
            );
        }
    }
}

#[test]
fn an_interrupted_checkpoint_write_leaves_the_previous_one_loadable() {
    let dir = tempfile::tempdir().unwrap();
    let data = corpus(dir.path(), 8);
    let run = dir.path().join("run");
    let mut trainer = trainer_in(&run, &data, 4, 0);
    trainer.train_step().unwrap();
    let good = trainer.save_checkpoint().unwrap();
    trainer.train_step().unwrap();
    // Fail between writing the files and the rename.
    let failed = write_checkpoint_dir(&trainer.checkpoint_root(), "step-00000002", |tmp| {
        trainer.model.save(tmp)?;
        Err(mlctl::Error::InvalidArgument(
            "simulated crash before rename".into(),
        ))
    });
    assert!(failed.is_err());
    // A crash leaves a partial directory behind: it must be ignored too.
    std::fs::create_dir_all(trainer.checkpoint_root().join("step-00000003.partial-1")).unwrap();
    assert_eq!(
        latest_checkpoint(&trainer.checkpoint_root()).unwrap(),
        Some((1, good.clone()))
    );
    let loaded = MlCtlModel::load(
        good.to_str().unwrap(),
        &Device::Cpu,
        candle_core::DType::F32,
        0,
    )
    .unwrap();
    assert_eq!(loaded.named_vars().len(), trainer.model.named_vars().len());
    let mut fresh = trainer_in(&run, &data, 4, 0);
    assert_eq!(fresh.resume().unwrap(), Some(1));
}

#[test]
fn non_finite_steps_are_skipped_counted_and_stop_the_run() {
    let dir = tempfile::tempdir().unwrap();
    let data = corpus(dir.path(), 8);
    let mut trainer = trainer_in(&dir.path().join("run"), &data, 10, 0);
    let vars = trainer.model.named_vars();
    let poisoned = &vars["mlctl.projection.fc2.bias"];
    poisoned
        .set(&(poisoned.as_tensor() * f64::NAN).unwrap())
        .unwrap();
    let probe = vars["bert.encoder.layer.0.attention.self.query.weight"]
        .as_tensor()
        .copy()
        .unwrap();
    let record = trainer.train_step().unwrap();
    assert!(record.skipped);
    assert_eq!(
        max_abs_diff(
            &probe,
            vars["bert.encoder.layer.0.attention.self.query.weight"].as_tensor()
        ),
        0.0
    );
    trainer.train_step().unwrap();
    trainer.train_step().unwrap();
    trainer.train_step().unwrap();
    match trainer.train_step() {
        Err(mlctl::Error::Diverged { step, consecutive }) => {
            assert_eq!((step, consecutive), (5, 5))
        }
        other => panic!("expected Diverged, got {other:?}"),
    }
    // The skipped steps' lines read back (JSON writes their NaN loss as null), and a resume
    // keeps them.
    let run = dir.path().join("run");
    let skipped = |records: Vec<StepRecord>| {
        assert!(records
            .iter()
            .all(|r| r.skipped && r.loss.is_nan() && r.grad_norm.is_nan()));
        records.len()
    };
    assert_eq!(skipped(mlctl::pretrain::read_metrics(&run).unwrap()), 4);
    trainer.save_checkpoint().unwrap();
    let mut resumed = trainer_in(&run, &data, 10, 0);
    assert_eq!(resumed.resume().unwrap(), Some(4));
    assert_eq!(skipped(mlctl::pretrain::read_metrics(&run).unwrap()), 4);
}

#[test]
fn frozen_layers_do_not_move() {
    let dir = tempfile::tempdir().unwrap();
    let data = corpus(dir.path(), 8);
    let cfg = TrainConfig {
        freeze_embeddings: true,
        freeze_layers: 1,
        ..config(2, 1e-2)
    };
    let mut trainer = Trainer::new(
        tiny_model(4),
        MultiLevelLoss::mlctl(),
        tsv_loader(&data, 4, 16, 9),
        cfg,
        &dir.path().join("run"),
    )
    .unwrap();
    let before: Vec<(String, Tensor)> = trainer
        .model
        .named_vars()
        .into_iter()
        .map(|(n, v)| (n, v.as_tensor().copy().unwrap()))
        .collect();
    trainer.train_step().unwrap();
    let after = trainer.model.named_vars();
    for (name, old) in &before {
        let moved = max_abs_diff(old, after[name].as_tensor()) > 0.0;
        let frozen =
            name.starts_with("bert.embeddings.") || name.starts_with("bert.encoder.layer.0.");
        assert_eq!(moved, !frozen, "{name}: moved = {moved}");
    }
}

#[test]
fn the_reference_recipe_is_adam_at_2e_6_with_tenfold_drops_and_no_clipping() {
    let cfg = TrainConfig::reference(600);
    assert_eq!(cfg.adamw.weight_decay, 0.0);
    assert_eq!(
        (cfg.adamw.beta1, cfg.adamw.beta2, cfg.adamw.eps),
        (0.9, 0.999, 1e-8)
    );
    assert_eq!(cfg.max_grad_norm, None);
    assert_eq!(cfg.head_lr, None);
    let lr = |step| cfg.schedule.lr(step);
    for (step, want) in [
        (0, 2e-6),
        (199, 2e-6),
        (200, 2e-7),
        (400, 2e-8),
        (500, 2e-9),
        (599, 2e-9),
    ] {
        assert!(
            (lr(step) - want).abs() < 1e-12 * want,
            "step {step}: {}",
            lr(step)
        );
    }
    let other = TrainConfig::adam_linear_clipped(600);
    assert_eq!(other.max_grad_norm, Some(1.0));
    assert_eq!(other.schedule.decay, Decay::Linear);
}

#[test]
fn the_head_gets_its_own_learning_rate() {
    let dir = tempfile::tempdir().unwrap();
    let data = corpus(dir.path(), 8);
    let cfg = |head_lr, peak_lr| TrainConfig {
        head_lr,
        schedule: LrSchedule {
            peak_lr,
            warmup_steps: 0,
            total_steps: 4,
            decay: Decay::Constant,
        },
        progress: false,
        ..TrainConfig::reference(4)
    };
    let mut trainer = Trainer::new(
        tiny_model(4),
        MultiLevelLoss::mlctl(),
        tsv_loader(&data, 4, 16, 9),
        cfg(Some(1e-2), 1e-4),
        &dir.path().join("run"),
    )
    .unwrap();
    let before: Vec<(String, Tensor)> = trainer
        .model
        .named_vars()
        .into_iter()
        .map(|(n, v)| (n, v.as_tensor().copy().unwrap()))
        .collect();
    trainer.train_step().unwrap();
    // Adam's first update moves a weight by its learning rate times g / (|g| + eps): the
    // largest move of each tensor is its learning rate.
    let after = trainer.model.named_vars();
    let (mut head_max, mut rest_max, mut heads) = (0f64, 0f64, 0);
    for (name, old) in &before {
        let moved = max_abs_diff(old, after[name].as_tensor());
        let (lr, max) = match name.starts_with("mlctl.") {
            true => (1e-2, &mut head_max),
            false => (1e-4, &mut rest_max),
        };
        heads += name.starts_with("mlctl.") as usize;
        assert!(moved <= 1.01 * lr, "{name} moved by {moved}, lr {lr}");
        *max = max.max(moved);
    }
    assert_eq!(heads, 4, "the projection's four tensors");
    assert!(
        (head_max - 1e-2).abs() < 1e-4,
        "the head moved by {head_max}"
    );
    assert!(
        (rest_max - 1e-4).abs() < 1e-6,
        "the encoder moved by {rest_max}"
    );
    let bad = Trainer::new(
        tiny_model(4),
        MultiLevelLoss::mlctl(),
        tsv_loader(&data, 4, 16, 9),
        cfg(Some(1e-2), 0.0),
        &dir.path().join("bad"),
    );
    assert!(matches!(bad, Err(mlctl::Error::InvalidArgument(_))));
}

/// Freezing takes the embedding layer out of the graph: backward computes no gradient for its
/// tables (nor for the MLM decoder tied to them) and exactly the same gradients for everything
/// else as with the layer in the graph.
#[test]
fn frozen_embeddings_get_no_gradient_and_change_no_other() {
    let model = tiny_model(5);
    let ids = Tensor::new(&[[2u32, 7, 9, 11, 3], [2, 5, 6, 3, 0]], &Device::Cpu).unwrap();
    let loss = |m: &mlctl::encoder::BertForMaskedLm| {
        let out = m.forward_t(&ids, None, None, false).unwrap();
        let hidden = out
            .encoder
            .last_hidden_state
            .sqr()
            .unwrap()
            .mean_all()
            .unwrap();
        let logits = out.logits.sqr().unwrap().mean_all().unwrap();
        (hidden + logits).unwrap().backward().unwrap()
    };
    let full = loss(&model.bert.model);
    let frozen = loss(&model.bert.model.clone().with_frozen_embeddings());
    for (name, var) in model.named_vars() {
        let (a, b) = (full.get(var.as_tensor()), frozen.get(var.as_tensor()));
        if name.starts_with("bert.embeddings.") {
            assert!(a.is_some(), "{name}: no gradient without freezing");
            assert!(b.is_none(), "{name}: a gradient although frozen");
        } else if let (Some(a), Some(b)) = (a, b) {
            assert_eq!(max_abs_diff(a, b), 0.0, "{name}");
        } else {
            assert_eq!(a.is_some(), b.is_some(), "{name}");
        }
    }
}

/// Rows of the word-embedding table that differ between two copies.
fn moved_rows(before: &Tensor, after: &Tensor) -> usize {
    let diff: Vec<f32> = (after - before)
        .unwrap()
        .abs()
        .unwrap()
        .max_keepdim(1)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    diff.iter().filter(|&&d| d > 0.0).count()
}

#[test]
fn sparse_embeddings_update_only_the_rows_of_tokens_in_the_batches() {
    let dir = tempfile::tempdir().unwrap();
    let data = corpus(dir.path(), 8);
    let objective = MultiLevelLoss::mlctl().with_mlm_weight(None);
    let run = |sparse: bool, run: &str| {
        let mut cfg = TrainConfig {
            sparse_embeddings: sparse,
            ..config(3, 1e-2)
        };
        cfg.adamw.weight_decay = 0.1;
        let mut trainer = Trainer::new(
            tiny_model(4),
            objective.clone(),
            tsv_loader(&data, 4, 16, 9),
            cfg,
            &dir.path().join(run),
        )
        .unwrap();
        let table = "bert.embeddings.word_embeddings.weight";
        let before = trainer.model.named_vars()[table]
            .as_tensor()
            .copy()
            .unwrap();
        for _ in 0..3 {
            trainer.train_step().unwrap();
        }
        let after = trainer.model.named_vars()[table]
            .as_tensor()
            .copy()
            .unwrap();
        (moved_rows(&before, &after), before.dim(0).unwrap())
    };
    let (sparse, vocab) = run(true, "sparse");
    let (dense, _) = run(false, "dense");
    // Dense AdamW decays every row; the lazy rule touches the few rows of the batches' tokens.
    assert_eq!(dense, vocab);
    assert!(
        sparse > 0 && sparse < vocab / 2,
        "{sparse} of {vocab} rows moved"
    );

    // With the MLM term on, the tied decoder gives every row a gradient: refused.
    let cfg = TrainConfig {
        sparse_embeddings: true,
        ..config(3, 1e-2)
    };
    match Trainer::new(
        tiny_model(4),
        MultiLevelLoss::mlctl(),
        tsv_loader(&data, 4, 16, 9),
        cfg,
        &dir.path().join("mlm"),
    ) {
        Err(mlctl::Error::InvalidArgument(msg)) => assert!(msg.contains("MLM"), "{msg}"),
        other => panic!("expected InvalidArgument, got {:?}", other.map(|_| ())),
    }
}

/// The tiny model in f16.
fn tiny_model_f16(seed: u64) -> MlCtlModel {
    use mlctl::encoder::BertConfig;
    use mlctl::pretrained::PretrainedBert;
    let fixture = |name: &str| common::fixture(&format!("tiny_bert/{name}"));
    let cfg = BertConfig::from_file(fixture("config.json")).unwrap();
    let tok = mlctl::tokenize::Tokenizer::from_file(fixture("tokenizer.json")).unwrap();
    let bert = PretrainedBert::from_config(cfg, Some(tok), &Device::Cpu, DType::F16, seed).unwrap();
    MlCtlModel::new(bert, Default::default(), seed).unwrap()
}

#[test]
fn an_f16_run_scales_its_loss_skips_overflows_without_diverging_and_resumes_its_scale() {
    let dir = tempfile::tempdir().unwrap();
    let data = corpus(dir.path(), 8);
    let new_trainer = |run: &str| {
        Trainer::new(
            tiny_model_f16(4),
            MultiLevelLoss::mlctl(),
            tsv_loader(&data, 4, 16, 9),
            config(40, 1e-3),
            &dir.path().join(run),
        )
        .unwrap()
    };
    // An f16 model gets PyTorch's GradScaler defaults.
    assert_eq!(
        new_trainer("default").loss_scaler().map(LossScaler::scale),
        Some(65536.0)
    );
    // 2^40 times the loss overflows f16 gradients: steps are skipped, each halving the scale,
    // more of them in a row than `max_consecutive_bad_steps` (5) allows for a diverging loss.
    let start = 2f64.powi(40);
    let mut trainer = new_trainer("scaled").with_loss_scaler(Some(LossScaler::new(start).unwrap()));
    let table = "bert.encoder.layer.0.attention.self.query.weight";
    let before = trainer.model.named_vars()[table]
        .as_tensor()
        .copy()
        .unwrap();
    let mut skipped = 0;
    while trainer.train_step().unwrap().skipped {
        skipped += 1;
        assert!(skipped < 40, "the scale never came down");
    }
    assert!(skipped > 5, "only {skipped} overflows");
    let scale = trainer.loss_scaler().unwrap().scale();
    assert_eq!(scale, start / 2f64.powi(skipped));
    let after = trainer.model.named_vars()[table]
        .as_tensor()
        .copy()
        .unwrap();
    assert!(max_abs_diff(&before, &after) > 0.0);
    // The loss was finite throughout: the unscaled gradient norm of the real step is too.
    trainer.save_checkpoint().unwrap();
    let mut resumed = new_trainer("scaled");
    resumed.resume().unwrap();
    assert_eq!(resumed.loss_scaler().unwrap().scale(), scale);
    // A caller who turned scaling off keeps it off through a resume.
    let mut off = new_trainer("scaled").with_loss_scaler(None);
    off.resume().unwrap();
    assert!(
        off.loss_scaler().is_none(),
        "resume turned loss scaling back on"
    );
}

/// An f16 run with loss scaling moves its weights as an f32 run does, on the plain and the
/// cached path: the scaled gradients are divided by the scale exactly once.
///
/// The update is made linear in the gradient (AdamW with `eps` far above every gradient
/// element is SGD with momentum at rate `lr/eps`; no clipping, no decay), so a missing or a
/// doubled unscale moves the weights 2^10 times too far or too little. f16 keeps 11 significant
/// bits (`u = 2⁻¹¹ ≈ 4.9e-4`): inputs, weights and every stored activation round at that
/// relative size, which a forward and backward through two layers compound to some percent of
/// a gradient; a tenth of the largest movement leaves room for that and none for the scale.
#[test]
fn an_f16_run_with_loss_scaling_moves_as_an_f32_run() {
    use std::collections::HashMap;
    const EPS: f64 = 1e3;
    let dir = tempfile::tempdir().unwrap();
    let data = corpus(dir.path(), 8);
    let sgd = |mini_batch: Option<usize>| TrainConfig {
        schedule: LrSchedule {
            peak_lr: 0.1 * EPS,
            warmup_steps: 0,
            total_steps: 3,
            decay: Decay::Linear,
        },
        adamw: mlctl::train::AdamWConfig {
            eps: EPS,
            weight_decay: 0.0,
            ..Default::default()
        },
        max_grad_norm: None,
        mini_batch,
        progress: false,
        ..TrainConfig::adam_linear_clipped(3)
    };
    let weights = |model: &MlCtlModel| -> HashMap<String, Tensor> {
        model
            .named_vars()
            .into_iter()
            .map(|(n, v)| {
                (
                    n,
                    v.as_tensor().to_dtype(DType::F32).unwrap().copy().unwrap(),
                )
            })
            .collect()
    };
    for mini_batch in [None, Some(2)] {
        let run = |model: MlCtlModel, scaler: Option<LossScaler>, name: &str| {
            let before = weights(&model);
            let mut trainer = Trainer::new(
                model,
                MultiLevelLoss::mlctl(),
                tsv_loader(&data, 4, 16, 9),
                sgd(mini_batch),
                &dir.path().join(format!("{name}-{mini_batch:?}")),
            )
            .unwrap()
            .with_loss_scaler(scaler);
            for _ in 0..3 {
                assert!(!trainer.train_step().unwrap().skipped);
            }
            let after = weights(&trainer.model);
            let moved: HashMap<String, Tensor> = after
                .iter()
                .map(|(n, t)| (n.clone(), (t - &before[n]).unwrap()))
                .collect();
            moved
        };
        let half = tiny_model_f16(4);
        let full = common::tiny_model(4);
        full.set_vars(&weights(&half)).unwrap();
        // A fixed scale of 2^10: no growth, and no overflow at this size.
        let mut scaler = LossScaler::new(1024.0).unwrap();
        scaler.growth_interval = u64::MAX;
        let want = run(full, None, "f32");
        let got = run(half, Some(scaler), "f16");
        let largest = want
            .values()
            .map(|t| max_abs_diff(t, &t.zeros_like().unwrap()))
            .fold(0f64, common::nan_max);
        assert!(largest > 1e-2, "the weights barely moved: {largest:e}");
        let mut worst = 0f64;
        for (name, w) in &want {
            let diff = max_abs_diff(&got[name], w);
            worst = common::nan_max(worst, diff);
            assert!(
                diff <= 0.1 * largest,
                "{mini_batch:?} {name}: f16 movement off by {diff:e}, largest movement {largest:e}"
            );
        }
        eprintln!(
            "{mini_batch:?}: f16 off by {:.2e} of the largest movement",
            worst / largest
        );
    }
}

#[test]
fn the_loss_scale_has_a_floor_and_persistent_overflow_is_divergence() {
    let mut scaler = LossScaler::new(8.0).unwrap();
    scaler.min_scale = 2.0;
    for want in [4.0, 2.0, 2.0, 2.0] {
        scaler.update(false);
        assert_eq!(scaler.scale(), want);
    }
    assert_eq!(scaler.overflows_in_a_row(), 4);
    scaler.update(true);
    assert_eq!(scaler.overflows_in_a_row(), 0);

    // A floor of 2^40 overflows f16 gradients on every step: the third overflow in a row ends
    // the run, where a scale without floor or limit would skip every step in silence.
    let dir = tempfile::tempdir().unwrap();
    let data = corpus(dir.path(), 8);
    let mut scaler = LossScaler::new(2f64.powi(40)).unwrap();
    scaler.min_scale = 2f64.powi(40);
    scaler.max_overflows_in_a_row = 3;
    let mut trainer = Trainer::new(
        tiny_model_f16(4),
        MultiLevelLoss::mlctl(),
        tsv_loader(&data, 4, 16, 9),
        config(40, 1e-3),
        &dir.path().join("run"),
    )
    .unwrap()
    .with_loss_scaler(Some(scaler));
    assert!(trainer.train_step().unwrap().skipped);
    assert!(trainer.train_step().unwrap().skipped);
    match trainer.train_step() {
        Err(mlctl::Error::Diverged { consecutive, .. }) => assert_eq!(consecutive, 3),
        other => panic!("expected Diverged, got {other:?}"),
    }
}
