//! [`PretrainedBert`]: a BERT with its MLM head, parameters, tokenizer and (for a
//! sentence-transformers directory) its modules, loaded from or saved to a Hugging Face model
//! directory.

use std::fmt;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device};

use crate::encoder::{
    checkpoint_name, read_checkpoint_dir, save_params_as, BertConfig, BertForMaskedLm, ParamStore,
};
use crate::fs::{write_atomic, CONFIG_FILE, TOKENIZER_FILE, WEIGHTS_FILE};
use crate::sentence_transformers::SentenceTransformerConfig;
use crate::tokenize::Tokenizer;
use crate::{Error, Result};

/// What loading a checkpoint did beyond the one-to-one copy of tensors.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LoadReport {
    /// Parameters the checkpoint lacked, freshly initialised (only the MLM head may be: a
    /// `BertModel` checkpoint has none).
    pub initialized: Vec<String>,
    /// Checkpoint tensors that are known not to be needed (pooler, next-sentence head,
    /// position-id buffer, the decoder copy of the tied word embeddings).
    pub ignored: Vec<String>,
    /// Checkpoint tensors the model has no use for and that are not known extras: a sign the
    /// checkpoint is not a BERT, or uses names this crate does not know.
    pub unexpected: Vec<String>,
}

impl fmt::Display for LoadReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let list = |names: &[String]| {
            if names.is_empty() {
                "none".to_string()
            } else {
                names.join(", ")
            }
        };
        writeln!(
            f,
            "initialized (not in checkpoint): {}",
            list(&self.initialized)
        )?;
        writeln!(f, "ignored: {}", list(&self.ignored))?;
        write!(f, "unexpected: {}", list(&self.unexpected))
    }
}

/// A BERT (or XLM-RoBERTa) with its MLM head, its trainable parameters and (when the directory
/// has one) its tokenizer: what a Hugging Face model directory holds.
///
/// ```no_run
/// # fn main() -> mlctl::Result<()> {
/// use mlctl::pretrained::PretrainedBert;
/// let bert = PretrainedBert::load("bert-base-multilingual-cased", &candle_core::Device::Cpu, candle_core::DType::F32)?;
/// let batch = bert.tokenizer()?.encode_batch(&["Hello world"], bert.encoder().device())?;
/// let out = bert.encoder().forward_batch(&batch, false)?;
/// assert_eq!(out.hidden_states.len(), 13);
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct PretrainedBert {
    /// The configuration (`config.json`).
    pub config: BertConfig,
    /// Encoder and MLM head.
    pub model: BertForMaskedLm,
    /// Every trainable parameter by transformers name: give `params.varmap().all_vars()` to an
    /// optimizer.
    pub params: ParamStore,
    /// The tokenizer, when the directory has a `tokenizer.json`: see [`PretrainedBert::tokenizer`].
    tokenizer: Option<Tokenizer>,
    /// How the checkpoint's tensors were mapped.
    pub report: LoadReport,
    /// The directory's sentence-transformers modules, when it has a `modules.json`: what
    /// [`PretrainedBert::encode`] follows by default and [`PretrainedBert::save`] writes back.
    pub sentence_transformer: Option<SentenceTransformerConfig>,
    /// The `tokenizer.json` the model directory lacked, named by [`PretrainedBert::tokenizer`].
    missing_tokenizer: Option<PathBuf>,
}

impl PretrainedBert {
    /// Loads from a local directory or, with the `hub` feature, a Hugging Face model id found in
    /// the local cache (or downloaded when the network allows).
    pub fn load(model: &str, device: &Device, dtype: DType) -> Result<Self> {
        let path = Path::new(model);
        if path.is_dir() {
            return Self::from_dir(path, device, dtype);
        }
        let looks_like_path = path.is_absolute()
            || model.starts_with('.')
            || path.exists()
            || model.matches('/').count() > 1;
        if looks_like_path {
            return Err(Error::Hub {
                model: model.to_string(),
                reason: "no such model directory".into(),
            });
        }
        #[cfg(feature = "hub")]
        {
            Self::from_dir(&crate::hub::resolve(model)?, device, dtype)
        }
        #[cfg(not(feature = "hub"))]
        Err(Error::Hub {
            model: model.to_string(),
            reason: "not a directory, and this build has no `hub` feature to look it up".into(),
        })
    }

    /// Loads `config.json`, the safetensors weights (single file or sharded) and, if present,
    /// the tokenizer ([`Tokenizer::from_dir`]: `tokenizer.json` with the special tokens of
    /// `tokenizer_config.json`) from `dir`, converting weights to `dtype` on `device`.
    ///
    /// Every encoder tensor must be present ([`Error::MissingTensors`] names all that are not)
    /// with the right shape ([`Error::ShapeMismatch`]); a missing MLM head is initialised and
    /// listed in [`LoadReport::initialized`]. A tokenizer whose vocabulary is larger than the
    /// word-embedding table is an [`Error::Checkpoint`] naming `tokenizer.json` (a smaller one is
    /// fine: some rows are never used).
    ///
    /// A directory with `modules.json` (saved by sentence-transformers) also has its modules
    /// read into [`PretrainedBert::sentence_transformer`], and the tokenizer truncates at its
    /// `max_seq_length`.
    pub fn from_dir(dir: &Path, device: &Device, dtype: DType) -> Result<Self> {
        let config = BertConfig::from_file(dir.join(CONFIG_FILE))?;
        let checkpoint = read_checkpoint_dir(dir)?;
        let original_names = checkpoint.original_names;
        let params = ParamStore::with_checkpoint(checkpoint.tensors, 0);
        let model = BertForMaskedLm::load(params.var_builder(dtype, device), &config)?;
        let log = params.log().clone();
        if let Some((name, expected, actual)) = log.mismatched.into_iter().next() {
            return Err(Error::ShapeMismatch {
                name,
                expected,
                actual,
            });
        }
        let missing: Vec<String> = log
            .initialized
            .iter()
            .filter(|n| !n.starts_with("cls."))
            .cloned()
            .collect();
        if !missing.is_empty() {
            return Err(Error::MissingTensors { names: missing });
        }
        // After the weights: a config that disagrees with them is reported as such first.
        let sentence_transformer =
            SentenceTransformerConfig::from_dir(dir, config.max_sequence_length())?;
        let tokenizer_missing = !dir.join(TOKENIZER_FILE).is_file();
        let tokenizer = if !tokenizer_missing {
            let mut tokenizer = Tokenizer::from_dir(dir)?;
            if let Some(n) = sentence_transformer.as_ref().and_then(|m| m.max_seq_length) {
                tokenizer = tokenizer.with_max_len(n)?;
            }
            check_vocab(&tokenizer, &config, Some(&dir.join(TOKENIZER_FILE)))?;
            Some(tokenizer)
        } else {
            None
        };
        let report = LoadReport {
            initialized: log.initialized,
            ignored: checkpoint.ignored,
            unexpected: params
                .unused_checkpoint_names()
                .into_iter()
                .map(|name| original_names.get(&name).cloned().unwrap_or(name))
                .collect(),
        };
        Ok(Self {
            config,
            model,
            params,
            tokenizer,
            report,
            sentence_transformer,
            missing_tokenizer: tokenizer_missing.then(|| dir.join(TOKENIZER_FILE)),
        })
    }

    /// A model with freshly initialised weights (normal with `initializer_range`, LayerNorm at
    /// one and zero, biases zero, as transformers does), reproducible from `seed`. A tokenizer
    /// larger than `config.vocab_size` is an [`Error::InvalidArgument`].
    pub fn from_config(
        config: BertConfig,
        tokenizer: Option<Tokenizer>,
        device: &Device,
        dtype: DType,
        seed: u64,
    ) -> Result<Self> {
        config.validate()?;
        if let Some(tokenizer) = &tokenizer {
            check_vocab(tokenizer, &config, None)?;
        }
        let params = ParamStore::new(seed);
        let model = BertForMaskedLm::load(params.var_builder(dtype, device), &config)?;
        let report = LoadReport {
            initialized: params.log().initialized.clone(),
            ..Default::default()
        };
        Ok(Self {
            config,
            model,
            params,
            tokenizer,
            report,
            sentence_transformer: None,
            missing_tokenizer: None,
        })
    }

    /// The encoder (the BERT body under the MLM head).
    pub fn encoder(&self) -> &crate::encoder::BertEncoder {
        &self.model.encoder
    }

    /// The tokenizer, or an [`Error::Checkpoint`] naming the `tokenizer.json` the model
    /// directory lacks (a model built or set without one gives [`Error::InvalidArgument`]).
    pub fn tokenizer(&self) -> Result<&Tokenizer> {
        self.tokenizer
            .as_ref()
            .ok_or_else(|| match &self.missing_tokenizer {
                Some(path) => Error::Checkpoint {
                    path: path.clone(),
                    reason: "no such file: this model has no tokenizer to encode text with".into(),
                },
                None => Error::InvalidArgument("this model has no tokenizer".into()),
            })
    }

    /// Replaces the tokenizer (`None` removes it). A tokenizer whose vocabulary is larger than
    /// the word-embedding table is an [`Error::InvalidArgument`].
    pub fn with_tokenizer(mut self, tokenizer: Option<Tokenizer>) -> Result<Self> {
        if let Some(tokenizer) = &tokenizer {
            check_vocab(tokenizer, &self.config, None)?;
        }
        self.tokenizer = tokenizer;
        self.missing_tokenizer = None;
        Ok(self)
    }

    /// Writes `model.safetensors`, `config.json` and (when the model has one) `tokenizer.json`
    /// and `tokenizer_config.json` ([`Tokenizer::save_pretrained`]) to `dir`, creating it. Tensors keep transformers' names for the model type: the result
    /// loads with `transformers.BertForMaskedLM.from_pretrained(dir)`, or
    /// `XLMRobertaForMaskedLM` for an XLM-R. Each file is written atomically.
    ///
    /// A model loaded from a sentence-transformers directory also gets its modules written back
    /// ([`SentenceTransformerConfig::save`]): the saved directory loads in
    /// `SentenceTransformer(dir)`, which then gives the vectors [`PretrainedBert::encode`] gives
    /// with the (fine-tuned) weights.
    pub fn save(&self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(Error::io(dir))?;
        let roberta = self.config.is_roberta();
        save_params_as(&self.params, &dir.join(WEIGHTS_FILE), |name| {
            checkpoint_name(name, roberta)
        })?;
        write_atomic(
            &dir.join(CONFIG_FILE),
            self.config.to_json_string().as_bytes(),
        )?;
        if let Some(tokenizer) = &self.tokenizer {
            tokenizer.save_pretrained(dir)?;
        }
        if let Some(modules) = &self.sentence_transformer {
            modules.save(dir)?;
        }
        Ok(())
    }
}

/// A tokenizer may have fewer entries than the embedding table (unused rows), never more: an id
/// past the table would fail at the first forward pass instead of at load.
fn check_vocab(tokenizer: &Tokenizer, config: &BertConfig, path: Option<&Path>) -> Result<()> {
    let size = tokenizer.vocab_size();
    if size <= config.vocab_size {
        return Ok(());
    }
    let reason = format!(
        "the tokenizer has {size} entries but the model's word-embedding table only {} rows \
         (config.json vocab_size): ids past it have no embedding",
        config.vocab_size
    );
    Err(match path {
        Some(path) => Error::Checkpoint {
            path: path.to_path_buf(),
            reason,
        },
        None => Error::InvalidArgument(reason),
    })
}
