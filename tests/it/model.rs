//! `MlCtlModel` on disk: what `save` writes is what `load` reads, from a directory or the hub's
//! cache, and a head that is announced but absent is an error, never a random head.

use crate::common;

use std::collections::BTreeMap;
use std::path::Path;

use candle_core::{DType, Device};
use mlctl::fs::{HEAD_CONFIG_FILE, HEAD_WEIGHTS_FILE};
use mlctl::model::MlCtlModel;
use mlctl::pooling::Pooling;
use mlctl::Error;

fn load(model: &str, seed: u64) -> mlctl::Result<MlCtlModel> {
    MlCtlModel::load(model, &Device::Cpu, DType::F32, seed)
}

fn head_values(model: &MlCtlModel) -> BTreeMap<String, Vec<f32>> {
    model
        .head_params
        .named_vars()
        .into_iter()
        .map(|(name, var)| (name, var.flatten_all().unwrap().to_vec1().unwrap()))
        .collect()
}

/// A saved tiny model whose head (seed 7) differs from any head a load would initialise.
fn saved_model(dir: &Path) -> MlCtlModel {
    let model = common::tiny_model(7);
    model.save(dir).unwrap();
    model
}

#[test]
fn a_changed_pooling_is_what_gets_saved() {
    let dir = tempfile::tempdir().unwrap();
    let mut model = common::tiny_model(0);
    model.pooling = Pooling::layer(1);
    model.save(dir.path()).unwrap();
    let reloaded = load(dir.path().to_str().unwrap(), 0).unwrap();
    assert_eq!(reloaded.pooling.layers(), [1]);
    assert_eq!(reloaded.head_config().pooling_layers, [1]);
}

#[test]
fn a_head_with_one_of_its_two_files_missing_is_an_error() {
    for (kept, removed) in [
        (HEAD_CONFIG_FILE, HEAD_WEIGHTS_FILE),
        (HEAD_WEIGHTS_FILE, HEAD_CONFIG_FILE),
    ] {
        let dir = tempfile::tempdir().unwrap();
        saved_model(dir.path());
        std::fs::remove_file(dir.path().join(removed)).unwrap();
        match load(dir.path().to_str().unwrap(), 0) {
            Err(Error::Checkpoint { path, reason }) => {
                assert_eq!(path, dir.path().join(removed));
                assert!(reason.contains(kept), "{reason}");
            }
            Ok(_) => panic!("{removed} removed: the model loaded with a new head"),
            Err(e) => panic!("{removed} removed: expected a checkpoint error, got {e}"),
        }
    }
    // Without either file it is a plain encoder checkpoint: a new head.
    let dir = tempfile::tempdir().unwrap();
    saved_model(dir.path());
    for file in [HEAD_CONFIG_FILE, HEAD_WEIGHTS_FILE] {
        std::fs::remove_file(dir.path().join(file)).unwrap();
    }
    let fresh = load(dir.path().to_str().unwrap(), 3).unwrap();
    assert_eq!(head_values(&fresh), head_values(&common::tiny_model(3)));
}

/// Puts the files of `dir` in a Hugging Face cache under `home` as the snapshot of `id`.
fn cache_model(home: &Path, id: &str, dir: &Path, skip: &[&str]) {
    let repo = home.join(format!("hub/models--{}", id.replace('/', "--")));
    let snapshot = repo.join("snapshots/0123abcd");
    std::fs::create_dir_all(&snapshot).unwrap();
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs/main"), "0123abcd").unwrap();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_str().unwrap();
        if !skip.contains(&name) {
            std::fs::copy(&path, snapshot.join(name)).unwrap();
        }
    }
}

/// The only test of this file that sets process-wide environment variables (the others read
/// local directories only).
#[test]
fn a_hub_id_loads_the_head_from_the_hub_cache() {
    let home = tempfile::tempdir().unwrap();
    let saved = tempfile::tempdir().unwrap();
    let model = saved_model(saved.path());
    cache_model(home.path(), "tiny/mlctl", saved.path(), &[]);
    cache_model(
        home.path(),
        "tiny/no-head",
        saved.path(),
        &[HEAD_CONFIG_FILE, HEAD_WEIGHTS_FILE],
    );
    cache_model(
        home.path(),
        "tiny/half-head",
        saved.path(),
        &[HEAD_WEIGHTS_FILE],
    );
    let _env = common::hf_env_lock();
    std::env::set_var("HF_HOME", home.path());
    std::env::set_var("HF_HUB_OFFLINE", "1");

    let loaded = load("tiny/mlctl", 0).unwrap();
    assert_eq!(head_values(&loaded), head_values(&model));
    let fresh = load("tiny/no-head", 3).unwrap();
    assert_eq!(head_values(&fresh), head_values(&common::tiny_model(3)));
    assert!(matches!(
        load("tiny/half-head", 0),
        Err(Error::Checkpoint { path, .. }) if path.ends_with(HEAD_WEIGHTS_FILE)
    ));
}

#[test]
fn anchor_words_are_pooled_over_their_own_layers_and_saved_with_them() {
    use candle_core::IndexOp;
    use mlctl::model::HeadConfig;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("train.tsv");
    std::fs::write(&path, common::synthetic_tsv(6, 4)).unwrap();
    let batch = common::tsv_loader(&path, 6, 16, 0)
        .next_batch(&Device::Cpu)
        .unwrap();
    let spans = batch.src_spans().unwrap();
    let config = HeadConfig {
        word_layers: Some(vec![1]),
        ..HeadConfig::default()
    };
    let model = MlCtlModel::new(common::tiny_model(4).bert, config, 4).unwrap();
    let side = model.embed(&batch.src, Some(&spans), false).unwrap();

    // The reference, by hand: hidden state 1 averaged over each anchor's tokens.
    let out = model
        .encoder()
        .forward(
            &batch.src.input_ids,
            Some(&batch.src.token_type_ids),
            Some(&batch.src.attention_mask),
        )
        .unwrap();
    for (row, span) in spans.iter().enumerate() {
        let tokens = out.hidden_states[1]
            .i((row, span.start..span.end + 1))
            .unwrap();
        let want = tokens.mean(0).unwrap();
        let got = side.word.as_ref().unwrap().i(row).unwrap();
        assert!(common::max_abs_diff(&got, &want) < 1e-6, "row {row}");
    }
    // Sentences keep layers 1 + L: the same as a default head on the same encoder.
    let default = common::tiny_model(4);
    let sentence = default.embed(&batch.src, Some(&spans), false).unwrap();
    assert_eq!(
        common::max_abs_diff(&side.sentence, &sentence.sentence),
        0.0
    );
    assert!(common::max_abs_diff(&side.word.unwrap(), &sentence.word.unwrap()) > 1e-3);

    // Saved and loaded with the head; a default head's file has no such key.
    model.save(dir.path()).unwrap();
    let json = std::fs::read_to_string(dir.path().join(HEAD_CONFIG_FILE)).unwrap();
    assert!(json.contains("\"word_layers\""), "{json}");
    let reloaded = load(dir.path().to_str().unwrap(), 0).unwrap();
    assert_eq!(reloaded.head_config().word_layers, Some(vec![1]));
    assert_eq!(reloaded.word_pooling().layers(), [1]);
    let plain = tempfile::tempdir().unwrap();
    default.save(plain.path()).unwrap();
    let json = std::fs::read_to_string(plain.path().join(HEAD_CONFIG_FILE)).unwrap();
    assert!(!json.contains("word_layers"), "{json}");

    // A layer the encoder does not have fails when the head is made, not at the first batch.
    for layers in [vec![3], vec![-4], vec![]] {
        let config = HeadConfig {
            word_layers: Some(layers.clone()),
            ..HeadConfig::default()
        };
        match MlCtlModel::new(common::tiny_model(4).bert, config, 4) {
            Err(Error::InvalidArgument(m)) => assert!(m.contains("layer"), "{m}"),
            Ok(_) => panic!("word layers {layers:?} accepted by a 2-layer encoder"),
            Err(e) => panic!("word layers {layers:?}: {e}"),
        }
    }
}
