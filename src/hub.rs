//! Resolving a model id to a local directory, offline first (feature `hub`).

use std::path::PathBuf;

use crate::fs::{
    module_folders, shard_names, CONFIG_FILE, MODULES_FILE, SENTENCE_BERT_CONFIG_FILE,
    SENTENCE_TRANSFORMERS_CONFIG_FILE, TOKENIZER_FILE, WEIGHTS_FILE, WEIGHTS_INDEX_FILE,
};
use crate::{Error, Result};

/// Finds the files of a Hugging Face model, `model_id` (`org/name`, optionally `@revision`),
/// and returns the directory that holds them.
///
/// The local cache (`HF_HOME`, default `~/.cache/huggingface`) is searched first, so a model
/// downloaded once is used with no network. Otherwise, unless `HF_HUB_OFFLINE=1` is set, the
/// files are downloaded into that cache. Failing both, the error says which.
pub fn resolve(model_id: &str) -> Result<PathBuf> {
    let repo = hub_repo(model_id);
    let cache = hf_hub::Cache::from_env();
    let cached = cache.repo(repo.clone());
    if let Some(config) = cached.get(CONFIG_FILE) {
        let has_weights =
            cached.get(WEIGHTS_FILE).is_some() || cached.get(WEIGHTS_INDEX_FILE).is_some();
        if has_weights {
            return parent(model_id, config);
        }
    }
    let hub_error = |reason: String| Error::Hub {
        model: model_id.to_string(),
        reason,
    };
    if offline() {
        return Err(hub_error(format!(
            "not in the local cache {} and HF_HUB_OFFLINE is set; download it on a connected \
             machine or pass a local directory",
            cache.path().display()
        )));
    }
    let api = hf_hub::api::sync::ApiBuilder::from_env()
        .with_progress(true)
        .build()
        .map_err(|e| hub_error(e.to_string()))?;
    let remote = api.repo(repo);
    let fetch = |file: &str| {
        remote.get(file).map_err(|e| {
            hub_error(format!(
                "not in the local cache {} and `{file}` could not be downloaded ({e}); on a machine \
                 without network, pass a local directory holding config.json and model.safetensors",
                cache.path().display()
            ))
        })
    };
    let config = fetch(CONFIG_FILE)?;
    if fetch(WEIGHTS_FILE).is_err() {
        let index = fetch(WEIGHTS_INDEX_FILE)?;
        let shards = shard_names(&index)?;
        for shard in &shards {
            fetch(shard)?;
        }
    }
    // A model without tokenizer.json still loads; the caller then brings its own tokenizer.
    // tokenizer_config.json names its special tokens (mask, pad) when it has one.
    let _ = remote.get(TOKENIZER_FILE);
    let _ = remote.get("tokenizer_config.json");
    // A sentence-transformers model: its modules' files, so that `encode` follows them.
    if let Ok(modules) = remote.get(MODULES_FILE) {
        let _ = remote.get(SENTENCE_BERT_CONFIG_FILE);
        let _ = remote.get(SENTENCE_TRANSFORMERS_CONFIG_FILE);
        for folder in module_folders(&modules) {
            let _ = remote.get(&format!("{folder}/config.json"));
            let _ = remote.get(&format!("{folder}/model.safetensors"));
        }
    }
    parent(model_id, config)
}

fn parent(model_id: &str, file: PathBuf) -> Result<PathBuf> {
    file.parent().map(PathBuf::from).ok_or_else(|| Error::Hub {
        model: model_id.to_string(),
        reason: format!("cached file {} has no parent directory", file.display()),
    })
}

/// Finds optional files of a Hugging Face model that [`resolve`] found, such as an ML-CTL head
/// beside the encoder: for each of `files`, its path in the local cache, else (unless
/// `HF_HUB_OFFLINE=1`) downloaded when the repository lists it, else `None`.
///
/// Offline, a file absent from the cache counts as absent from the repository.
pub fn resolve_optional(model_id: &str, files: &[&str]) -> Result<Vec<Option<PathBuf>>> {
    let repo = hub_repo(model_id);
    let cached = hf_hub::Cache::from_env().repo(repo.clone());
    let mut found: Vec<Option<PathBuf>> = files.iter().map(|f| cached.get(f)).collect();
    if found.iter().all(Option::is_some) || offline() {
        return Ok(found);
    }
    let hub_error = |reason: String| Error::Hub {
        model: model_id.to_string(),
        reason,
    };
    let api = hf_hub::api::sync::ApiBuilder::from_env()
        .with_progress(true)
        .build()
        .map_err(|e| hub_error(e.to_string()))?;
    let remote = api.repo(repo);
    let listed = remote.info().map_err(|e| {
        hub_error(format!(
            "could not list the repository's files to look for {files:?} ({e}); set \
                 HF_HUB_OFFLINE=1 to use only the files in the local cache"
        ))
    })?;
    for (file, path) in files.iter().zip(&mut found) {
        if path.is_none() && listed.siblings.iter().any(|s| s.rfilename == *file) {
            let fetched = remote
                .get(file)
                .map_err(|e| hub_error(format!("downloading `{file}`: {e}")))?;
            *path = Some(fetched);
        }
    }
    Ok(found)
}

/// `org/name[@revision]` as a hub repository (revision `main` when absent).
fn hub_repo(model_id: &str) -> hf_hub::Repo {
    let (id, revision) = match model_id.split_once('@') {
        Some((id, rev)) => (id.to_string(), rev.to_string()),
        None => (model_id.to_string(), "main".to_string()),
    };
    hf_hub::Repo::with_revision(id, hf_hub::RepoType::Model, revision)
}

/// `HF_HUB_OFFLINE` is `1` or `true`.
fn offline() -> bool {
    std::env::var("HF_HUB_OFFLINE").is_ok_and(|v| v == "1" || v.eq_ignore_ascii_case("true"))
}
