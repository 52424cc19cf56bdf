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
    save_tensors(&tensors, Some(metadata), path)
}

/// Writes `tensors` to a safetensors file at `path` through a synced temporary file and a
/// rename. Contiguous CPU tensors are written from their own memory: candle's `View` for
/// `Tensor` copies each tensor into a fresh byte vector first, which at a 250k-row vocabulary
/// is a 384 MB spike in every checkpoint. Other tensors are copied one at a time.
pub(crate) fn save_tensors(
    tensors: &[(String, Tensor)],
    metadata: Option<HashMap<String, String>>,
    path: &Path,
) -> Result<()> {
    let views = tensors
        .iter()
        .map(|(name, t)| (name.as_str(), TensorBytes::new(t)));
    write_atomic_with(path, |tmp| {
        safetensors::serialize_to_file(views, metadata, tmp).map_err(|e| Error::Checkpoint {
            path: tmp.to_path_buf(),
            reason: format!("could not write safetensors: {e}"),
        })
    })
}

/// A tensor as safetensors reads it: its storage held for reading while the file is written.
struct TensorBytes<'a> {
    tensor: &'a Tensor,
    storage: candle_core::StorageRef<'a>,
}

impl<'a> TensorBytes<'a> {
    fn new(tensor: &'a Tensor) -> Self {
        let (storage, _) = tensor.storage_and_layout();
        Self { tensor, storage }
    }

    /// The bytes of the tensor's elements, when they lie contiguously in CPU memory.
    fn host_bytes(&self) -> Option<&[u8]> {
        use candle_core::{CpuStorage as C, Storage};
        let Storage::Cpu(cpu) = &*self.storage else {
            return None;
        };
        let (start, end) = self.tensor.layout().contiguous_offsets()?;
        let size = self.tensor.dtype().size_in_bytes();
        let all: &[u8] = match cpu {
            C::F32(v) => as_bytes(v),
            C::F64(v) => as_bytes(v),
            C::F16(v) => as_bytes(v),
            C::BF16(v) => as_bytes(v),
            C::U32(v) => as_bytes(v),
            C::I64(v) => as_bytes(v),
            C::U8(v) => v,
            _ => return None,
        };
        all.get(start * size..end * size)
    }
}

/// A slice of plain numbers as its bytes, in the machine's order (little-endian on every target
/// candle supports, which is safetensors' order).
fn as_bytes<T: candle_core::WithDType>(v: &[T]) -> &[u8] {
    // SAFETY: `T` is one of candle's element types (integers and IEEE floats): no padding, no
    // invalid bit patterns for `u8`, and the byte slice covers exactly `v`'s memory.
    unsafe { std::slice::from_raw_parts(v.as_ptr().cast::<u8>(), std::mem::size_of_val(v)) }
}

impl safetensors::View for TensorBytes<'_> {
    fn dtype(&self) -> safetensors::Dtype {
        safetensors::View::dtype(&self.tensor)
    }

    fn shape(&self) -> &[usize] {
        self.tensor.dims()
    }

    fn data(&self) -> std::borrow::Cow<'_, [u8]> {
        match self.host_bytes() {
            Some(bytes) => std::borrow::Cow::Borrowed(bytes),
            None => safetensors::View::data(&self.tensor),
        }
    }

    fn data_len(&self) -> usize {
        safetensors::View::data_len(&self.tensor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::DType;

    /// The borrowed-bytes writer must produce the file candle's copying `View` produces, for
    /// every element type and for a tensor that starts inside its storage (a narrowed view).
    #[test]
    fn borrowed_tensor_bytes_write_the_same_file_as_candle() {
        let dev = Device::Cpu;
        let base = Tensor::arange(0f32, 24.0, &dev)
            .unwrap()
            .reshape((6, 4))
            .unwrap();
        let tensors: Vec<(String, Tensor)> = vec![
            ("a.f32".into(), base.clone()),
            ("b.rows".into(), base.narrow(0, 2, 3).unwrap()),
            ("c.f16".into(), base.to_dtype(DType::F16).unwrap()),
            ("d.bf16".into(), base.to_dtype(DType::BF16).unwrap()),
            ("e.f64".into(), base.to_dtype(DType::F64).unwrap()),
            ("f.u32".into(), base.to_dtype(DType::U32).unwrap()),
            ("g.t".into(), base.t().unwrap()),
        ];
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.safetensors");
        save_tensors(&tensors, None, &path).unwrap();
        let want = safetensors::serialize(tensors.iter().map(|(n, t)| (n, t)), None).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), want);
    }
}
