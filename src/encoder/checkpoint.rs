//! Hugging Face checkpoints on disk: reading safetensors (single or sharded) with the key
//! variants real checkpoints use, and writing them back under transformers' names.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};

use super::params::ParamStore;
use crate::fs::{shard_names, write_atomic_with, WEIGHTS_FILE, WEIGHTS_INDEX_FILE};
use crate::{Error, Result};

/// How a checkpoint's tensor name maps onto this crate's parameters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyMapping {
    /// The tensor is the parameter with this canonical (transformers `BertForMaskedLM`) name.
    Param(String),
    /// A tensor real checkpoints carry that the model does not use (pooler, next-sentence head,
    /// position-id buffer, the decoder copy of the tied word embeddings).
    Ignored,
}

/// Maps a checkpoint key to its canonical name.
///
/// Accepted variants: with or without the `bert.` prefix (`BertModel` checkpoints such as
/// sentence-transformers models have none), TF-era `LayerNorm.gamma`/`LayerNorm.beta` for
/// `weight`/`bias`, `cls.predictions.decoder.bias` for `cls.predictions.bias`, and the
/// RoBERTa family's names (`roberta.*` for `bert.*`; `lm_head.dense`, `lm_head.layer_norm`,
/// `lm_head.bias` and `lm_head.decoder.bias` for the `cls.predictions` head).
pub fn map_key(key: &str) -> KeyMapping {
    let key = key
        .replace("LayerNorm.gamma", "LayerNorm.weight")
        .replace("LayerNorm.beta", "LayerNorm.bias");
    let key = if let Some(rest) = key.strip_prefix("roberta.") {
        format!("bert.{rest}")
    } else if let Some(rest) = key.strip_prefix("lm_head.") {
        let rest = rest
            .replace("dense.", "transform.dense.")
            .replace("layer_norm.", "transform.LayerNorm.");
        format!("cls.predictions.{rest}")
    } else if key.starts_with("bert.") || key.starts_with("cls.") {
        key
    } else {
        format!("bert.{key}")
    };
    let ignored = key.starts_with("bert.pooler.")
        || key.starts_with("cls.seq_relationship.")
        || key == "bert.embeddings.position_ids"
        || key == "bert.embeddings.token_type_ids"
        || key == "cls.predictions.decoder.weight";
    if ignored {
        KeyMapping::Ignored
    } else if key == "cls.predictions.decoder.bias" {
        KeyMapping::Param("cls.predictions.bias".into())
    } else {
        KeyMapping::Param(key)
    }
}

/// The name a canonical parameter has in a checkpoint of `model_type`: itself for BERT; for the
/// RoBERTa family (`xlm-roberta`, `roberta`) the names transformers' `XLMRobertaForMaskedLM` uses
/// (`roberta.*`, `lm_head.dense.*`, `lm_head.layer_norm.*`, `lm_head.bias`).
pub(crate) fn checkpoint_name(canonical: &str, roberta: bool) -> String {
    if !roberta {
        return canonical.to_string();
    }
    if let Some(rest) = canonical.strip_prefix("bert.") {
        return format!("roberta.{rest}");
    }
    if let Some(rest) = canonical.strip_prefix("cls.predictions.") {
        let rest = rest
            .replace("transform.dense.", "dense.")
            .replace("transform.LayerNorm.", "layer_norm.");
        return format!("lm_head.{rest}");
    }
    canonical.to_string()
}

/// True for the names of the MLM decoder's bias, an alias of the head's `bias`.
fn is_decoder_bias(key: &str) -> bool {
    matches!(key, "cls.predictions.decoder.bias" | "lm_head.decoder.bias")
}

/// Tensors read from a checkpoint, by canonical name, with the names that were set aside.
#[derive(Debug, Default)]
pub struct CheckpointTensors {
    /// Tensors by canonical name, on the CPU in the checkpoint's dtype.
    pub tensors: HashMap<String, Tensor>,
    /// Original names of tensors the model does not use (pooler, next-sentence head and the like).
    pub ignored: Vec<String>,
    /// The name each tensor has in the checkpoint file, by canonical name.
    pub original_names: HashMap<String, String>,
}

/// Reads every weight file of a checkpoint directory (`model.safetensors`, or the shards listed
/// in `model.safetensors.index.json`) onto the CPU.
///
/// `pytorch_model.bin` is a Python pickle and is not read: convert it once with
/// `python -c "from transformers import AutoModelForMaskedLM as M; M.from_pretrained('DIR').save_pretrained('DIR', safe_serialization=True)"`.
pub fn read_checkpoint_dir(dir: &Path) -> Result<CheckpointTensors> {
    let mut out = CheckpointTensors::default();
    let mut decoder_bias = None;
    for file in weight_files(dir)? {
        let tensors =
            candle_core::safetensors::load(&file, &Device::Cpu).map_err(|e| Error::Checkpoint {
                path: file.clone(),
                reason: format!("not a readable safetensors file ({e})"),
            })?;
        for (key, tensor) in tensors {
            match map_key(&key) {
                KeyMapping::Ignored => out.ignored.push(key),
                // `decoder.bias` is an alias: used only where `cls.predictions.bias` is absent.
                KeyMapping::Param(_) if is_decoder_bias(&key) => decoder_bias = Some((key, tensor)),
                KeyMapping::Param(name) => {
                    out.original_names.insert(name.clone(), key);
                    out.tensors.insert(name, tensor);
                }
            }
        }
    }
    if let Some((key, tensor)) = decoder_bias {
        if out.tensors.contains_key("cls.predictions.bias") {
            out.ignored.push(key);
        } else {
            out.original_names
                .insert("cls.predictions.bias".into(), key);
            out.tensors.insert("cls.predictions.bias".into(), tensor);
        }
    }
    out.ignored.sort();
    Ok(out)
}

fn weight_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let single = dir.join(WEIGHTS_FILE);
    if single.is_file() {
        return Ok(vec![single]);
    }
    let index = dir.join(WEIGHTS_INDEX_FILE);
    if index.is_file() {
        return Ok(shard_names(&index)?
            .into_iter()
            .map(|f| dir.join(f))
            .collect());
    }
    let reason = if dir.join("pytorch_model.bin").is_file() {
        "holds only pytorch_model.bin, a Python pickle this crate does not load; convert it once with \
         `python -c \"from transformers import AutoModelForMaskedLM as M; M.from_pretrained('DIR').save_pretrained('DIR', safe_serialization=True)\"`"
            .to_string()
    } else {
        format!("has neither {WEIGHTS_FILE} nor {WEIGHTS_INDEX_FILE}")
    };
    Err(Error::Checkpoint {
        path: dir.to_path_buf(),
        reason,
    })
}

/// Writes every parameter of `params` to a safetensors file under its canonical name, with the
/// `{"format": "pt"}` metadata transformers expects.
///
/// The file is written under a temporary name, synced and renamed into place, so an
/// interrupted save never leaves a truncated `path` behind.
pub fn save_params(params: &ParamStore, path: &Path) -> Result<()> {
    save_params_as(params, path, str::to_string)
}

/// [`save_params`] with each canonical name replaced by `rename(name)`.
pub(crate) fn save_params_as(
    params: &ParamStore,
    path: &Path,
    rename: impl Fn(&str) -> String,
) -> Result<()> {
    let tensors: Vec<(String, Tensor)> = params
        .named_vars()
        .into_iter()
        .map(|(name, var)| Ok((rename(&name), var.as_tensor().contiguous()?)))
        .collect::<Result<_>>()?;
    let metadata = HashMap::from([("format".to_string(), "pt".to_string())]);
    write_atomic_with(path, |tmp| {
        safetensors::serialize_to_file(tensors, Some(metadata), tmp).map_err(|e| {
            Error::Checkpoint {
                path: tmp.to_path_buf(),
                reason: format!("could not write safetensors: {e}"),
            }
        })
    })
}
