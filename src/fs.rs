//! The model directory's file names, and writing files so that a crash never leaves a
//! truncated one behind.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use crate::{Error, Result};

/// Single-file weights.
pub const WEIGHTS_FILE: &str = "model.safetensors";
/// Index of sharded weights.
pub const WEIGHTS_INDEX_FILE: &str = "model.safetensors.index.json";
/// Model configuration.
pub const CONFIG_FILE: &str = "config.json";
/// Tokenizer in the `tokenizers` format.
pub const TOKENIZER_FILE: &str = "tokenizer.json";
/// transformers' tokenizer settings (special tokens, lower-casing, maximum length).
pub const TOKENIZER_CONFIG_FILE: &str = "tokenizer_config.json";
/// sentence-transformers' list of modules (a directory with it is a sentence-transformers model).
pub const MODULES_FILE: &str = "modules.json";
/// sentence-transformers' tokenizer settings (`max_seq_length`, `do_lower_case`).
pub const SENTENCE_BERT_CONFIG_FILE: &str = "sentence_bert_config.json";
/// sentence-transformers' model settings (prompts, similarity function).
pub const SENTENCE_TRANSFORMERS_CONFIG_FILE: &str = "config_sentence_transformers.json";
/// The ML-CTL projection head's weights, beside the encoder's.
pub const HEAD_WEIGHTS_FILE: &str = "mlctl_head.safetensors";
/// The ML-CTL head's configuration.
pub const HEAD_CONFIG_FILE: &str = "mlctl.json";

/// The shard file names listed in a `model.safetensors.index.json`, sorted and deduplicated.
pub(crate) fn shard_names(index: &Path) -> Result<Vec<String>> {
    #[derive(serde::Deserialize)]
    struct Index {
        weight_map: BTreeMap<String, String>,
    }
    let text = std::fs::read_to_string(index).map_err(Error::io(index))?;
    let parsed: Index = serde_json::from_str(&text).map_err(|source| Error::Json {
        path: index.to_path_buf(),
        source,
    })?;
    let mut files: Vec<String> = parsed.weight_map.into_values().collect();
    files.sort();
    files.dedup();
    Ok(files)
}

/// The module folders `modules.json` names (not the transformer's, which is the directory
/// itself); none when the file cannot be read (loading reports that).
#[cfg(feature = "hub")]
pub(crate) fn module_folders(modules_json: &Path) -> Vec<String> {
    let text = std::fs::read_to_string(modules_json).unwrap_or_default();
    let Ok(serde_json::Value::Array(entries)) = serde_json::from_str(&text) else {
        return Vec::new();
    };
    entries
        .iter()
        .filter_map(|e| e.get("path").and_then(serde_json::Value::as_str))
        .filter(|p| !p.is_empty())
        .map(str::to_string)
        .collect()
}

/// Writes `bytes` to `path` through a synced temporary file and a rename, so that `path` is
/// either its old content or the complete new one, never a truncated file.
pub(crate) fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    write_atomic_with(path, |tmp| {
        let mut file = std::fs::File::create(tmp).map_err(Error::io(tmp))?;
        file.write_all(bytes).map_err(Error::io(tmp))
    })
}

/// Lets `write` create the file at a temporary path beside `path`, then syncs it and renames it
/// into place: `path` is either its old content or the complete new one.
pub(crate) fn write_atomic_with(
    path: &Path,
    write: impl FnOnce(&Path) -> Result<()>,
) -> Result<()> {
    let tmp = temp_path(path);
    write(&tmp)?;
    sync_and_rename(&tmp, path)
}

fn temp_path(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(format!(".tmp-{}", std::process::id()));
    path.with_file_name(name)
}

fn sync_and_rename(tmp: &Path, path: &Path) -> Result<()> {
    std::fs::File::open(tmp)
        .and_then(|f| f.sync_all())
        .map_err(Error::io(tmp))?;
    std::fs::rename(tmp, path).map_err(Error::io(path))
}
