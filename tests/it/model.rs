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
