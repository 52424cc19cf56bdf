//! `MlCtlModel`: the encoder with its MLM head plus ML-CTL's projection, saved as one directory.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Module, Tensor, Var};
use serde::{Deserialize, Serialize};

use crate::encoder::{save_params, ParamStore};
use crate::fs::{write_atomic, HEAD_CONFIG_FILE, HEAD_WEIGHTS_FILE};
use crate::pooling::{Pooling, TokenSpan};
use crate::pretrained::PretrainedBert;
use crate::projection::Projection;
use crate::tokenize::TokenBatch;
use crate::{Error, Result};

/// Prefix of the head's parameter names in [`MlCtlModel::named_vars`].
pub const HEAD_PREFIX: &str = "mlctl.";

/// What `mlctl.json` holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeadConfig {
    /// Hidden layers pooled and summed for sentence embeddings, and for anchor-word
    /// embeddings unless `word_layers` says otherwise.
    pub pooling_layers: Vec<isize>,
    /// Whether the projection's input is `concat(sentence, word)` (2H, ML-CTL) or the sentence
    /// embedding alone (H).
    pub concat_word: bool,
    /// Hidden layers pooled and summed over an anchor word's span, when they differ from
    /// `pooling_layers` (for example the alignment layer 8 alone). Absent from `mlctl.json`
    /// when `None`, so files written before it load unchanged.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub word_layers: Option<Vec<isize>>,
}

impl Default for HeadConfig {
    fn default() -> Self {
        Self {
            pooling_layers: Pooling::mlctl().layers().to_vec(),
            concat_word: true,
            word_layers: None,
        }
    }
}

/// Sentence and word embeddings of one side of a batch, and their projection.
///
/// # Shapes
/// - `sentence`, `word`: `[batch, hidden]`
/// - `projected`: `[batch, d]` with `d = 2H` when the word is concatenated, else `H`
#[derive(Debug, Clone)]
pub struct SideEmbeddings {
    /// Pooled sentence embedding.
    pub sentence: Tensor,
    /// Pooled anchor-word embedding, when spans were given.
    pub word: Option<Tensor>,
    /// The projection of `concat(sentence, word)` (or of `sentence`).
    pub projected: Tensor,
}

/// ML-CTL's model: a BERT encoder with its MLM head ([`PretrainedBert`]), the pooling, and the
/// `Linear -> ReLU -> Linear` projection.
///
/// On disk it is a transformers model directory (`model.safetensors`, `config.json`,
/// `tokenizer.json`: the encoder loads in transformers unchanged) plus `mlctl_head.safetensors`
/// (`projection.fc1.*`, `projection.fc2.*`) and `mlctl.json` ([`HeadConfig`]).
#[derive(Debug, Clone)]
pub struct MlCtlModel {
    /// Encoder, MLM head, their parameters and the tokenizer.
    pub bert: PretrainedBert,
    /// The projection head.
    pub projection: Projection,
    /// The projection's parameters.
    pub head_params: ParamStore,
    /// How sentence and word embeddings are pooled; [`MlCtlModel::save`] writes its layers to
    /// `mlctl.json`.
    pub pooling: Pooling,
    /// How anchor words are pooled when not as sentences are ([`HeadConfig::word_layers`]);
    /// `None` follows [`MlCtlModel::pooling`].
    pub word_pooling: Option<Pooling>,
    /// Whether the projection reads `concat(sentence, word)`: fixed by the projection's shape.
    concat_word: bool,
}

impl MlCtlModel {
    /// The encoder (the BERT body under the MLM head).
    pub fn encoder(&self) -> &crate::encoder::BertEncoder {
        self.bert.encoder()
    }

    /// Adds a freshly initialised head (from `seed`) to an encoder.
    pub fn new(bert: PretrainedBert, config: HeadConfig, seed: u64) -> Result<Self> {
        Self::with_head_params(bert, config, ParamStore::new(seed))
    }

    fn with_head_params(
        bert: PretrainedBert,
        config: HeadConfig,
        head_params: ParamStore,
    ) -> Result<Self> {
        let device = bert.encoder().word_embeddings().device().clone();
        let dtype = bert.encoder().word_embeddings().dtype();
        let h = bert.config.hidden_size;
        let d = if config.concat_word { 2 * h } else { h };
        let projection = Projection::load(
            head_params.var_builder(dtype, &device).pp("projection"),
            d,
            d,
            d,
        )?;
        let log = head_params.log().clone();
        if let Some((name, expected, actual)) = log.mismatched.into_iter().next() {
            return Err(Error::ShapeMismatch {
                name,
                expected,
                actual,
            });
        }
        let layers = bert.config.num_hidden_layers;
        let check = |layers_of: &[isize]| check_layers(layers_of, layers);
        check(&config.pooling_layers)?;
        if let Some(word) = &config.word_layers {
            check(word)?;
        }
        let pooling = Pooling::mlctl().with_layers(config.pooling_layers.clone());
        let word_pooling = config
            .word_layers
            .map(|layers| Pooling::mlctl().with_layers(layers));
        Ok(Self {
            bert,
            projection,
            head_params,
            pooling,
            word_pooling,
            concat_word: config.concat_word,
        })
    }

    /// Loads a model directory or, with the `hub` feature, a Hugging Face model id (see
    /// [`PretrainedBert::load`]). With `mlctl.json` the model has an ML-CTL head, which is read
    /// from `mlctl_head.safetensors`; without it (a plain transformers checkpoint such as mBERT)
    /// a head is initialised from `seed` with [`HeadConfig::default`].
    ///
    /// A checkpoint with one of the two head files but not the other is an
    /// [`Error::Checkpoint`] naming the missing file, never a silently random head.
    pub fn load(model: &str, device: &Device, dtype: DType, seed: u64) -> Result<Self> {
        Self::load_or_new(model, device, dtype, HeadConfig::default(), seed)
    }

    /// [`MlCtlModel::load`], with `new_head` deciding the shape of the head initialised when
    /// the checkpoint has none. A head on disk keeps its own configuration.
    pub fn load_or_new(
        model: &str,
        device: &Device,
        dtype: DType,
        new_head: HeadConfig,
        seed: u64,
    ) -> Result<Self> {
        let bert = PretrainedBert::load(model, device, dtype)?;
        let dir = Path::new(model);
        // `PretrainedBert::load` took anything that is not a directory to the hub, and found it.
        let (config_path, weights_path) = if dir.is_dir() {
            let local = |file: &str| Some(dir.join(file)).filter(|p| p.is_file());
            (local(HEAD_CONFIG_FILE), local(HEAD_WEIGHTS_FILE))
        } else {
            hub_head_files(model)?
        };
        let missing = |present: &Path, absent: &str| Error::Checkpoint {
            path: present.with_file_name(absent),
            reason: format!(
                "missing, but {} is there: the ML-CTL head needs both files",
                present.display()
            ),
        };
        let (config_path, head_file) = match (config_path, weights_path) {
            (None, None) => return Self::new(bert, new_head, seed),
            (Some(config), Some(weights)) => (config, weights),
            (Some(config), None) => return Err(missing(&config, HEAD_WEIGHTS_FILE)),
            (None, Some(weights)) => return Err(missing(&weights, HEAD_CONFIG_FILE)),
        };
        let text = std::fs::read_to_string(&config_path).map_err(Error::io(&config_path))?;
        let config: HeadConfig = serde_json::from_str(&text).map_err(|source| Error::Json {
            path: config_path.clone(),
            source,
        })?;
        let tensors = candle_core::safetensors::load(&head_file, &Device::Cpu).map_err(|e| {
            Error::Checkpoint {
                path: head_file.clone(),
                reason: format!("not a readable safetensors file ({e})"),
            }
        })?;
        let params = ParamStore::with_checkpoint(tensors, seed);
        let model = Self::with_head_params(bert, config, params)?;
        let missing = model.head_params.log().initialized.clone();
        if !missing.is_empty() {
            return Err(Error::MissingTensors { names: missing });
        }
        Ok(model)
    }

    /// Writes the model directory (see the type's docs); every file atomically.
    pub fn save(&self, dir: &Path) -> Result<()> {
        self.bert.save(dir)?;
        save_params(&self.head_params, &dir.join(HEAD_WEIGHTS_FILE))?;
        let json =
            serde_json::to_string_pretty(&self.head_config()).expect("head config serialises");
        write_atomic(&dir.join(HEAD_CONFIG_FILE), json.as_bytes())
    }

    /// The head's configuration, as [`MlCtlModel::save`] writes it: the layers of the current
    /// [`MlCtlModel::pooling`].
    pub fn head_config(&self) -> HeadConfig {
        HeadConfig {
            pooling_layers: self.pooling.layers().to_vec(),
            concat_word: self.concat_word,
            word_layers: self.word_pooling.as_ref().map(|p| p.layers().to_vec()),
        }
    }

    /// How anchor words are pooled: [`MlCtlModel::word_pooling`] if set, else
    /// [`MlCtlModel::pooling`].
    pub fn word_pooling(&self) -> &Pooling {
        self.word_pooling.as_ref().unwrap_or(&self.pooling)
    }

    /// Every trainable variable: the encoder's and MLM head's under transformers names, the
    /// projection's under `mlctl.projection.*`.
    pub fn named_vars(&self) -> BTreeMap<String, Var> {
        let mut vars = self.bert.params.named_vars();
        vars.extend(
            self.head_params
                .named_vars()
                .into_iter()
                .map(|(n, v)| (format!("{HEAD_PREFIX}{n}"), v)),
        );
        vars
    }

    /// Replaces every variable's value with the tensor of the same name (as in
    /// [`MlCtlModel::named_vars`]); used to restore checkpoints in place.
    pub fn set_vars(&self, tensors: &HashMap<String, Tensor>) -> Result<()> {
        for (name, var) in self.named_vars() {
            let t = tensors.get(&name).ok_or_else(|| Error::MissingTensors {
                names: vec![name.clone()],
            })?;
            if t.dims() != var.dims() {
                return Err(Error::ShapeMismatch {
                    name,
                    expected: var.dims().to_vec(),
                    actual: t.dims().to_vec(),
                });
            }
            var.set(&t.to_dtype(var.dtype())?.to_device(var.device())?)?;
        }
        Ok(())
    }

    /// Encodes one side of a batch: pooled sentence embeddings, anchor-word embeddings over
    /// `spans` (required when the head concatenates words) and their projection.
    pub fn embed(
        &self,
        tokens: &TokenBatch,
        spans: Option<&[TokenSpan]>,
        train: bool,
    ) -> Result<SideEmbeddings> {
        let out = self.bert.encoder().forward_t(
            &tokens.input_ids,
            Some(&tokens.token_type_ids),
            Some(&tokens.attention_mask),
            train,
        )?;
        let sentence = self.pooling.sentence(&out, &tokens.attention_mask)?;
        let word = spans
            .map(|s| self.word_pooling().spans(&out, s))
            .transpose()?;
        let input = match (&word, self.concat_word) {
            (Some(word), true) => Tensor::cat(&[&sentence, word], 1)?,
            (None, true) => {
                return Err(Error::InvalidArgument(
                    "this head concatenates anchor words: give their spans".into(),
                ))
            }
            (_, false) => sentence.clone(),
        };
        let projected = self
            .projection
            .forward(&input.to_dtype(self.head_dtype())?)?;
        Ok(SideEmbeddings {
            sentence,
            word,
            projected,
        })
    }

    fn head_dtype(&self) -> DType {
        self.bert.encoder().word_embeddings().dtype()
    }
}

/// Every layer of a head's pooling names one of the encoder's `layers + 1` hidden states
/// (negative: counted from the last), so a bad `mlctl.json` fails at load, not at the first
/// batch.
fn check_layers(chosen: &[isize], layers: usize) -> Result<()> {
    let n = layers as isize + 1;
    if chosen.is_empty() {
        return Err(Error::InvalidArgument(
            "a head pools at least one layer".into(),
        ));
    }
    match chosen.iter().find(|&&l| !(-n..n).contains(&l)) {
        Some(l) => Err(Error::InvalidArgument(format!(
            "the head pools layer {l}, but the encoder has hidden states 0..={}",
            n - 1
        ))),
        None => Ok(()),
    }
}

/// The head files of a hub model, `(mlctl.json, mlctl_head.safetensors)`, each `None` when the
/// repository (or, offline, the local cache) does not have it.
#[cfg(feature = "hub")]
fn hub_head_files(model: &str) -> Result<(Option<PathBuf>, Option<PathBuf>)> {
    let mut found = crate::hub::resolve_optional(model, &[HEAD_CONFIG_FILE, HEAD_WEIGHTS_FILE])?;
    let weights = found.pop().flatten();
    Ok((found.pop().flatten(), weights))
}

#[cfg(not(feature = "hub"))]
fn hub_head_files(model: &str) -> Result<(Option<PathBuf>, Option<PathBuf>)> {
    Err(Error::Hub {
        model: model.to_string(),
        reason: "not a directory, and this build has no `hub` feature to look it up".into(),
    })
}
