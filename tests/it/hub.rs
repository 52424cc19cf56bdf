//! Resolving hub ids offline: the local cache first, a clear error when the model is absent.
#![cfg(feature = "hub")]

use crate::common;

use mlctl::pretrained::PretrainedBert;

/// One test, because it sets process-wide environment variables.
#[test]
fn cached_models_resolve_offline_and_missing_ones_are_clear_errors() {
    let home = tempfile::tempdir().unwrap();
    // The Hugging Face cache layout: refs/main names the snapshot holding the files.
    let repo = home.path().join("hub/models--tiny--bert");
    let snapshot = repo.join("snapshots/0123abcd");
    std::fs::create_dir_all(&snapshot).unwrap();
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs/main"), "0123abcd").unwrap();
    for file in ["config.json", "model.safetensors", "tokenizer.json"] {
        std::fs::copy(common::fixture("tiny_bert").join(file), snapshot.join(file)).unwrap();
    }
    let _env = common::hf_env_lock();
    std::env::set_var("HF_HOME", home.path());
    std::env::set_var("HF_HUB_OFFLINE", "1");

    assert_eq!(mlctl::hub::resolve("tiny/bert").unwrap(), snapshot);
    let bert = PretrainedBert::load(
        "tiny/bert",
        &candle_core::Device::Cpu,
        candle_core::DType::F32,
    )
    .unwrap();
    assert_eq!(bert.config.hidden_size, 32);

    match mlctl::hub::resolve("nobody/absent-model") {
        Err(mlctl::Error::Hub { model, reason }) => {
            assert_eq!(model, "nobody/absent-model");
            assert!(
                reason.contains("HF_HUB_OFFLINE") && reason.contains("local directory"),
                "{reason}"
            );
        }
        other => panic!("expected a hub error, got {other:?}"),
    }
    // A path that does not exist is not sent to the hub.
    assert!(matches!(
        PretrainedBert::load(
            "./no/such/dir",
            &candle_core::Device::Cpu,
            candle_core::DType::F32
        ),
        Err(mlctl::Error::Hub { .. })
    ));
}
