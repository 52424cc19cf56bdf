//! Saving and loading checkpoints, and the typed errors for broken ones.

use crate::common;

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use common::{fixture, golden, max_abs_diff};
use mlctl::encoder::BertConfig;
use mlctl::pretrained::PretrainedBert;
use mlctl::Error;

fn copy_fixture(name: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(fixture(name)).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), dir.path().join(entry.file_name())).unwrap();
    }
    dir
}

fn load(dir: &Path) -> mlctl::Result<PretrainedBert> {
    PretrainedBert::from_dir(dir, &Device::Cpu, DType::F32)
}

fn outputs(bert: &PretrainedBert) -> Vec<Tensor> {
    let out = common::forward_golden(bert, false);
    let mut all = out.encoder.hidden_states;
    all.push(out.logits);
    all
}

fn perturb(bert: &PretrainedBert) {
    for var in bert.params.varmap().all_vars() {
        let noise = var.as_tensor().randn_like(0.0, 0.05).unwrap();
        var.set(&(var.as_tensor() + noise).unwrap()).unwrap();
    }
}

#[test]
fn save_then_load_gives_identical_outputs() {
    let bert = load(&fixture("tiny_bert")).unwrap();
    perturb(&bert); // so the round trip is not vacuously the fixture itself
    let dir = tempfile::tempdir().unwrap();
    bert.save(dir.path()).unwrap();
    let reloaded = load(dir.path()).unwrap();
    assert!(
        reloaded.report.initialized.is_empty() && reloaded.report.unexpected.is_empty(),
        "{}",
        reloaded.report
    );
    assert_eq!(reloaded.config, bert.config);
    for (a, b) in outputs(&bert).iter().zip(outputs(&reloaded).iter()) {
        assert_eq!(max_abs_diff(a, b), 0.0);
    }
    assert!(reloaded.tokenizer().is_ok());
    // Nothing but the four files: no temporary left behind.
    let mut names: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(
        names,
        [
            "config.json",
            "model.safetensors",
            "tokenizer.json",
            "tokenizer_config.json"
        ]
    );
}

#[test]
fn saved_file_uses_transformers_names_and_metadata() {
    let bert = load(&fixture("tiny_bert_legacy")).unwrap();
    let dir = tempfile::tempdir().unwrap();
    bert.save(dir.path()).unwrap();
    let bytes = std::fs::read(dir.path().join("model.safetensors")).unwrap();
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    assert_eq!(
        meta.metadata()
            .as_ref()
            .and_then(|m| m.get("format"))
            .map(String::as_str),
        Some("pt")
    );
    let mut saved: Vec<String> = meta.tensors().keys().cloned().collect();
    saved.sort();
    let reference = std::fs::read(fixture("tiny_bert/model.safetensors")).unwrap();
    let (_, reference) = safetensors::SafeTensors::read_metadata(&reference).unwrap();
    let mut expected: Vec<String> = reference.tensors().keys().cloned().collect();
    expected.sort();
    assert_eq!(
        saved, expected,
        "names differ from what transformers' save_pretrained writes"
    );
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("config.json")).unwrap())
            .unwrap();
    assert_eq!(config["architectures"][0], "BertForMaskedLM");
    assert_eq!(config["model_type"], "bert");
    assert_eq!(
        config["transformers_version"], "5.24.0",
        "unknown fields must survive a round trip"
    );
}

#[test]
fn model_from_config_is_reproducible_from_its_seed() {
    let cfg = BertConfig::from_file(fixture("tiny_bert/config.json")).unwrap();
    let a = PretrainedBert::from_config(cfg.clone(), None, &Device::Cpu, DType::F32, 5).unwrap();
    let b = PretrainedBert::from_config(cfg.clone(), None, &Device::Cpu, DType::F32, 5).unwrap();
    let c = PretrainedBert::from_config(cfg, None, &Device::Cpu, DType::F32, 6).unwrap();
    let (a, b, c) = (outputs(&a), outputs(&b), outputs(&c));
    assert_eq!(max_abs_diff(&a[2], &b[2]), 0.0);
    assert!(max_abs_diff(&a[2], &c[2]) > 1e-3);
}

#[test]
fn truncated_or_corrupt_weights_are_typed_errors() {
    let dir = copy_fixture("tiny_bert");
    let weights = dir.path().join("model.safetensors");
    let bytes = std::fs::read(&weights).unwrap();
    std::fs::write(&weights, &bytes[..bytes.len() / 2]).unwrap();
    assert!(
        matches!(load(dir.path()), Err(Error::Checkpoint { .. })),
        "truncated file"
    );
    std::fs::write(&weights, b"\xff\xff\xff\xff\xff\xff\xff\x7fgarbage").unwrap();
    assert!(
        matches!(load(dir.path()), Err(Error::Checkpoint { .. })),
        "corrupt header"
    );
    std::fs::write(&weights, b"").unwrap();
    assert!(
        matches!(load(dir.path()), Err(Error::Checkpoint { .. })),
        "empty file"
    );
}

#[test]
fn pytorch_pickle_is_refused_with_the_conversion_command() {
    let dir = copy_fixture("tiny_bert");
    std::fs::remove_file(dir.path().join("model.safetensors")).unwrap();
    std::fs::write(dir.path().join("pytorch_model.bin"), b"PK\x03\x04").unwrap();
    match load(dir.path()) {
        Err(Error::Checkpoint { reason, .. }) => {
            assert!(
                reason.contains("pytorch_model.bin") && reason.contains("safe_serialization=True"),
                "{reason}"
            )
        }
        other => panic!("expected a checkpoint error, got {other:?}"),
    }
    std::fs::remove_file(dir.path().join("pytorch_model.bin")).unwrap();
    assert!(
        matches!(load(dir.path()), Err(Error::Checkpoint { .. })),
        "no weights at all"
    );
}

#[test]
fn every_missing_encoder_tensor_is_named() {
    let dir = copy_fixture("tiny_bert");
    let weights = dir.path().join("model.safetensors");
    let mut tensors = candle_core::safetensors::load(&weights, &Device::Cpu).unwrap();
    tensors
        .remove("bert.encoder.layer.1.attention.self.key.bias")
        .unwrap();
    tensors.remove("bert.embeddings.LayerNorm.weight").unwrap();
    candle_core::safetensors::save(&tensors, &weights).unwrap();
    match load(dir.path()) {
        Err(Error::MissingTensors { mut names }) => {
            names.sort();
            assert_eq!(
                names,
                [
                    "bert.embeddings.LayerNorm.weight",
                    "bert.encoder.layer.1.attention.self.key.bias"
                ]
            );
        }
        other => panic!("expected MissingTensors, got {other:?}"),
    }
}

#[test]
fn unexpected_tensors_are_reported_by_their_checkpoint_name() {
    let dir = copy_fixture("tiny_bert");
    let weights = dir.path().join("model.safetensors");
    let mut tensors = candle_core::safetensors::load(&weights, &Device::Cpu).unwrap();
    tensors.insert(
        "classifier.weight".into(),
        Tensor::zeros((3, 32), DType::F32, &Device::Cpu).unwrap(),
    );
    candle_core::safetensors::save(&tensors, &weights).unwrap();
    let bert = load(dir.path()).unwrap();
    assert_eq!(bert.report.unexpected, ["classifier.weight"]);
}

#[test]
fn config_problems_are_typed_errors() {
    let dir = copy_fixture("tiny_bert");
    let config_path = dir.path().join("config.json");
    let original = std::fs::read_to_string(&config_path).unwrap();

    std::fs::write(
        &config_path,
        original.replace("\"vocab_size\": 113", "\"vocab_size\": 100"),
    )
    .unwrap();
    match load(dir.path()) {
        Err(Error::ShapeMismatch {
            name,
            expected,
            actual,
        }) => {
            assert_eq!(name, "bert.embeddings.word_embeddings.weight");
            assert_eq!((expected, actual), (vec![100, 32], vec![113, 32]));
        }
        other => panic!("expected ShapeMismatch, got {other:?}"),
    }
    std::fs::write(
        &config_path,
        original.replace("\"num_attention_heads\": 4", "\"num_attention_heads\": 5"),
    )
    .unwrap();
    assert!(matches!(load(dir.path()), Err(Error::Config(_))));
    std::fs::write(&config_path, original.replace("\"gelu\"", "\"swish\"")).unwrap();
    assert!(matches!(load(dir.path()), Err(Error::Json { .. })));
    std::fs::remove_file(&config_path).unwrap();
    assert!(matches!(load(dir.path()), Err(Error::Io { .. })));
}

#[test]
fn inputs_longer_than_the_position_table_are_refused() {
    let bert = load(&fixture("tiny_bert")).unwrap();
    let ids = Tensor::zeros((1, 65), DType::U32, &Device::Cpu).unwrap();
    assert!(matches!(
        bert.encoder().forward(&ids, None, None),
        Err(Error::InvalidArgument(_))
    ));
    let mask = Tensor::ones((1, 3), DType::U32, &Device::Cpu).unwrap();
    let ids = Tensor::zeros((1, 4), DType::U32, &Device::Cpu).unwrap();
    assert!(matches!(
        bert.encoder().forward(&ids, None, Some(&mask)),
        Err(Error::ShapeMismatch { .. })
    ));
}

/// A checkpoint we write loads in `transformers.BertForMaskedLM.from_pretrained` with no missing
/// or unexpected keys and reproduces our outputs. Set `MLCTL_PYTHON` to a Python with torch and
/// transformers.
#[test]
#[ignore = "needs MLCTL_PYTHON with torch and transformers"]
fn saved_checkpoint_loads_in_transformers() {
    let python = std::env::var("MLCTL_PYTHON").expect("set MLCTL_PYTHON");
    let bert = load(&fixture("tiny_bert_legacy")).unwrap();
    perturb(&bert);
    let dir = tempfile::tempdir().unwrap();
    bert.save(dir.path()).unwrap();
    let g = golden("tiny_bert/golden.safetensors");
    let outs = outputs(&bert);
    let mut ours = std::collections::HashMap::new();
    for name in ["input_ids", "token_type_ids", "attention_mask"] {
        ours.insert(name.to_string(), g[name].clone());
    }
    let (logits, hidden) = outs.split_last().unwrap();
    for (i, h) in hidden.iter().enumerate() {
        ours.insert(format!("hidden_states.{i}"), h.clone());
    }
    ours.insert("mlm_logits".into(), logits.clone());
    let golden_path = dir.path().join("ours.safetensors");
    candle_core::safetensors::save(&ours, &golden_path).unwrap();
    let status = std::process::Command::new(python)
        .arg(fixture("check_transformers_load.py"))
        .arg(dir.path())
        .arg(&golden_path)
        .status()
        .unwrap();
    assert!(
        status.success(),
        "transformers could not load our checkpoint or disagreed with it"
    );
}
