//! The front door for embeddings: [`encode`] texts into one vector each, the way
//! sentence-transformers' `model.encode(sentences, batch_size, normalize_embeddings)` does.
//!
//! Everything that turns many texts into vectors goes through here: the `embed` example, the
//! retrieval evaluation and the word aligner. [`encode_batches`] is the loop underneath for
//! callers that need the hidden states themselves (the aligner needs every token's).
//!
//! ```no_run
//! # fn main() -> mlctl::Result<()> {
//! use mlctl::encode::{encode, EncodeOptions};
//! # let bert = mlctl::pretrained::PretrainedBert::load("model", &candle_core::Device::Cpu, candle_core::DType::F32)?;
//! # let tokenizer = bert.tokenizer()?;
//! let options = EncodeOptions::default().with_batch_size(64).with_normalize(true);
//! let vectors = encode(bert.encoder(), tokenizer, &["The cat sleeps.", "Le chat dort."], &options)?;
//! assert_eq!(vectors.dims()[0], 2);
//! # Ok(()) }
//! ```

use candle_core::{DType, Device, Tensor};
use tokenizers::Encoding;

use crate::encoder::{BertEncoder, EncoderOutput};
use crate::pooling::{l2_normalize, Pooling, TokenSpan};
use crate::pretrained::PretrainedBert;
use crate::progress::Progress;
use crate::sentence_transformers::{ModuleKind, SentenceTransformerConfig};
use crate::tokenize::{TokenBatch, Tokenizer};
use crate::{Error, Result};

/// How [`encode`] batches, pools and post-processes.
///
/// # Defaults, in one place
///
/// Every setting left at `None` falls back to the model's own, then to the plain default:
///
/// | setting | sentence-transformers directory (`modules.json`) | plain transformers directory, or [`encode`] with a bare encoder |
/// |---|---|---|
/// | [`pooling`](Self::pooling) | `1_Pooling/config.json`'s modes over the last layer | [`Pooling::mlctl`]: the mean over tokens of layer 1 plus that of layer L (a sum, not an average) |
/// | [`normalize`](Self::normalize) | where `modules.json` has a `Normalize` | no |
/// | [`max_len`](Self::max_len) | `sentence_bert_config.json`'s `max_seq_length` | the tokenizer's limit (128 tokens unless set with [`Tokenizer::with_max_len`]) |
/// | [`lowercase`](Self::lowercase) | `do_lower_case` | no (the tokenizer's own normalizer still applies) |
/// | prompt ([`prefix`](Self::prefix), [`prompt_name`](Self::prompt_name)) | `default_prompt_name`'s prompt, if any | none |
/// | [`include_prompt`](Self::include_prompt) | `1_Pooling/config.json`'s `include_prompt` | yes |
/// | [`dense`](Self::dense) | the `Dense` modules, in order | none to apply |
///
/// An [`MlCtlModel`](crate::model::MlCtlModel) directory is a transformers directory with
/// ML-CTL's head beside it: when it also has `modules.json` (a model fine-tuned from a
/// sentence-transformers model), [`PretrainedBert::encode`] follows `modules.json`, the vectors
/// `SentenceTransformer(dir).encode` gives; ML-CTL's pooling in `mlctl.json` is what
/// [`MlCtlModel::embed`](crate::model::MlCtlModel::embed) (training, the projection) uses.
/// Without `modules.json` the plain defaults apply, and ML-CTL's layers 1 and L are also
/// `mlctl.json`'s default.
#[derive(Debug, Clone, PartialEq)]
pub struct EncodeOptions {
    /// Texts per forward pass.
    pub batch_size: usize,
    /// Which hidden states to pool and how: ML-CTL's layers 1 and L ([`Pooling::mlctl`]) or a
    /// model's own, e.g. the mean of the last layer ([`Pooling::layer`]`(-1)`). `None`: the
    /// model's (see the table above).
    pub pooling: Option<Pooling>,
    /// Scale every vector to unit length (so dot products are cosines). `None`: the model's.
    pub normalize: Option<bool>,
    /// Truncate inputs to this many tokens, special tokens included. `None`: the tokenizer's
    /// limit, which loading a sentence-transformers directory sets to its `max_seq_length`.
    pub max_len: Option<usize>,
    /// Lower-case texts (and prompt) before tokenization. `None`: the model's `do_lower_case`.
    pub lowercase: Option<bool>,
    /// Prepended to every text before tokenization, e.g. `"query: "` for the e5 models
    /// (sentence-transformers' `prompt=`); wins over [`EncodeOptions::prompt_name`]. `Some("")`
    /// switches a model's default prompt off.
    pub prefix: Option<String>,
    /// The name of one of the model's prompts (`config_sentence_transformers.json`), e.g.
    /// `"query"` (sentence-transformers' `prompt_name=`). A name the model does not have is an
    /// [`Error::InvalidArgument`].
    pub prompt_name: Option<String>,
    /// Whether the prompt's tokens count in the pooling. `None`: the model's `include_prompt`
    /// (true for a plain directory).
    pub include_prompt: Option<bool>,
    /// Apply the model's `Dense` modules. `None` or `Some(true)`: yes, when it has any.
    pub dense: Option<bool>,
    /// Batch texts of similar token length together (less padding, same results up to
    /// floating-point rounding); the output keeps the input order either way.
    pub sort_by_length: bool,
    /// Show a progress bar on standard error.
    pub progress: bool,
}

impl Default for EncodeOptions {
    /// Batches of 32, sorted by length, quiet; everything else the model's (see the table in
    /// [`EncodeOptions`]).
    fn default() -> Self {
        Self {
            batch_size: 32,
            pooling: None,
            normalize: None,
            max_len: None,
            lowercase: None,
            prefix: None,
            prompt_name: None,
            include_prompt: None,
            dense: None,
            sort_by_length: true,
            progress: false,
        }
    }
}

impl EncodeOptions {
    /// Sets [`EncodeOptions::batch_size`].
    pub fn with_batch_size(mut self, batch_size: usize) -> Self {
        self.batch_size = batch_size;
        self
    }

    /// Sets [`EncodeOptions::pooling`].
    pub fn with_pooling(mut self, pooling: Pooling) -> Self {
        self.pooling = Some(pooling);
        self
    }

    /// Sets [`EncodeOptions::normalize`].
    pub fn with_normalize(mut self, normalize: bool) -> Self {
        self.normalize = Some(normalize);
        self
    }

    /// Sets [`EncodeOptions::max_len`].
    pub fn with_max_len(mut self, max_len: usize) -> Self {
        self.max_len = Some(max_len);
        self
    }

    /// Sets [`EncodeOptions::lowercase`].
    pub fn with_lowercase(mut self, lowercase: bool) -> Self {
        self.lowercase = Some(lowercase);
        self
    }

    /// Sets [`EncodeOptions::sort_by_length`].
    pub fn with_sort_by_length(mut self, sort: bool) -> Self {
        self.sort_by_length = sort;
        self
    }

    /// Sets [`EncodeOptions::prefix`].
    pub fn with_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = Some(prefix.into());
        self
    }

    /// Sets [`EncodeOptions::prompt_name`].
    pub fn with_prompt_name(mut self, name: impl Into<String>) -> Self {
        self.prompt_name = Some(name.into());
        self
    }

    /// Sets [`EncodeOptions::include_prompt`].
    pub fn with_include_prompt(mut self, include: bool) -> Self {
        self.include_prompt = Some(include);
        self
    }

    /// Sets [`EncodeOptions::dense`].
    pub fn with_dense(mut self, dense: bool) -> Self {
        self.dense = Some(dense);
        self
    }

    /// Sets [`EncodeOptions::progress`].
    pub fn with_progress(mut self, progress: bool) -> Self {
        self.progress = progress;
        self
    }

    fn check(&self) -> Result<()> {
        if self.batch_size == 0 {
            return Err(Error::InvalidArgument(
                "batch size must be at least 1".into(),
            ));
        }
        if self.max_len.is_some_and(|n| n < 2) {
            return Err(Error::InvalidArgument(
                "max_len must leave room for the special tokens (at least 2)".into(),
            ));
        }
        Ok(())
    }

    /// The prompt text: the prefix, else the named prompt, else the model's default one.
    fn prompt(&self, model: Option<&SentenceTransformerConfig>) -> Result<Option<String>> {
        if let Some(prefix) = &self.prefix {
            return Ok(Some(prefix.clone()).filter(|p| !p.is_empty()));
        }
        let name = match (&self.prompt_name, model) {
            (Some(name), _) => name,
            (None, Some(model)) => match &model.default_prompt_name {
                Some(name) => name,
                None => return Ok(None),
            },
            (None, None) => return Ok(None),
        };
        let prompts = model.map(|m| &m.prompts);
        match prompts.and_then(|p| p.get(name)) {
            Some(text) => Ok(Some(text.clone()).filter(|p| !p.is_empty())),
            None => Err(Error::InvalidArgument(format!(
                "the model has no prompt named {name:?} (its prompts: {})",
                prompts
                    .map(|p| p.keys().cloned().collect::<Vec<_>>().join(", "))
                    .filter(|s| !s.is_empty())
                    .unwrap_or_else(|| "none".into())
            ))),
        }
    }
}

/// One vector per text, `[texts, hidden]`, f32 on the CPU, in eval mode (no dropout), with
/// the plain defaults for what `options` leave open (see [`EncodeOptions`]); for a model
/// directory's own settings use [`PretrainedBert::encode`] or [`encode_with_config`].
///
/// # Shapes
/// - output: `[texts.len(), hidden]`, row `i` for `texts[i]`
pub fn encode<S: AsRef<str>>(
    encoder: &BertEncoder,
    tokenizer: &Tokenizer,
    texts: &[S],
    options: &EncodeOptions,
) -> Result<Tensor> {
    encode_with_config(encoder, tokenizer, None, texts, options)
}

/// [`encode`] following a sentence-transformers configuration where `options` leave a setting
/// open (`None`: the plain defaults): prompt, lower-casing, truncation, pooling modes (with
/// the prompt's tokens left out when `include_prompt` is false), `Dense` and `Normalize`
/// modules in `modules.json`'s order.
///
/// # Shapes
/// - output: `[texts.len(), d]`, `d` the hidden size, times the number of pooling modes, or
///   the last `Dense` module's `out_features`
pub fn encode_with_config<S: AsRef<str>>(
    encoder: &BertEncoder,
    tokenizer: &Tokenizer,
    model: Option<&SentenceTransformerConfig>,
    texts: &[S],
    options: &EncodeOptions,
) -> Result<Tensor> {
    options.check()?;
    let prompt = options.prompt(model)?;
    let lowercase = options
        .lowercase
        .unwrap_or(model.is_some_and(|m| m.do_lower_case));
    let truncated;
    let tokenizer = match options.max_len {
        Some(n) if n != tokenizer.max_len() => {
            truncated = tokenizer.clone().with_max_len(n)?;
            &truncated
        }
        _ => tokenizer,
    };
    let prepared: Vec<String> = texts
        .iter()
        .map(|t| {
            let text = match &prompt {
                Some(p) => format!("{p}{}", t.as_ref()),
                None => t.as_ref().to_string(),
            };
            if lowercase {
                text.to_lowercase()
            } else {
                text
            }
        })
        .collect();
    let encodings = tokenizer.encode_each(&prepared)?;
    let include_prompt = options
        .include_prompt
        .unwrap_or(model.is_none_or(|m| m.include_prompt));
    // As sentence-transformers: the prompt's tokens with special tokens, less a closing special
    // token (the separator), are left out of the pooling from the start of each sequence.
    let skip = match (&prompt, include_prompt) {
        (Some(p), false) => {
            let p = if lowercase {
                p.to_lowercase()
            } else {
                p.clone()
            };
            let encoded = tokenizer.encode_each(&[p])?.remove(0);
            let closing = encoded.get_special_tokens_mask().last() == Some(&1);
            encoded.get_ids().len() - usize::from(closing)
        }
        _ => 0,
    };
    let pooling = options
        .pooling
        .clone()
        .or_else(|| model.map(|m| m.pooling.clone()))
        .unwrap_or_else(Pooling::mlctl);
    let post = PostProcess {
        model,
        normalize: options.normalize,
        dense: options.dense.unwrap_or(true),
    };
    pooled(
        encoder,
        tokenizer,
        encodings,
        options,
        &pooling,
        Pooled::Sentences { skip },
        &post,
    )
}

/// What follows the pooling: a model's `Dense` and `Normalize` modules, or plain normalisation.
struct PostProcess<'a> {
    model: Option<&'a SentenceTransformerConfig>,
    normalize: Option<bool>,
    dense: bool,
}

impl PostProcess<'_> {
    fn apply(&self, mut vectors: Tensor) -> Result<Tensor> {
        let mut normalized = false;
        if let Some(model) = self.model {
            for module in &model.modules {
                match &module.kind {
                    ModuleKind::Dense(dense) if self.dense => {
                        vectors = dense.forward(&vectors)?;
                        normalized = false;
                    }
                    ModuleKind::Normalize if self.normalize != Some(false) => {
                        vectors = l2_normalize(&vectors)?;
                        normalized = true;
                    }
                    _ => {}
                }
            }
        }
        if self.normalize == Some(true) && !normalized {
            vectors = l2_normalize(&vectors)?;
        }
        Ok(vectors)
    }
}

enum Pooled<'a> {
    /// Whole sentences, leaving out the first `skip` tokens (a prompt) from the pooling.
    Sentences { skip: usize },
    /// One token span per text.
    Spans(&'a [TokenSpan]),
}

/// One vector per text over one inclusive token span of it (an anchor word), `[texts, hidden]`,
/// f32 on the CPU. The spans index the tokens `tokenizer` gives each text, so a
/// [`EncodeOptions::prefix`] (which would shift them) is refused.
///
/// # Shapes
/// - `spans`: `texts.len()` spans; output: `[texts.len(), hidden]`
pub fn encode_spans<S: AsRef<str>>(
    encoder: &BertEncoder,
    tokenizer: &Tokenizer,
    texts: &[S],
    spans: &[TokenSpan],
    options: &EncodeOptions,
) -> Result<Tensor> {
    options.check()?;
    if spans.len() != texts.len() {
        return Err(Error::ShapeMismatch {
            name: "spans".into(),
            expected: vec![texts.len()],
            actual: vec![spans.len()],
        });
    }
    if options.prefix.is_some() {
        return Err(Error::InvalidArgument(
            "a text prefix would shift the anchor spans; encode spans without one".into(),
        ));
    }
    let encodings = tokenizer.encode_each(texts)?;
    let pooling = options.pooling.clone().unwrap_or_else(Pooling::mlctl);
    let post = PostProcess {
        model: None,
        normalize: options.normalize,
        dense: false,
    };
    pooled(
        encoder,
        tokenizer,
        encodings,
        options,
        &pooling,
        Pooled::Spans(spans),
        &post,
    )
}

fn pooled(
    encoder: &BertEncoder,
    tokenizer: &Tokenizer,
    encodings: Vec<Encoding>,
    options: &EncodeOptions,
    pooling: &Pooling,
    what: Pooled<'_>,
    post: &PostProcess<'_>,
) -> Result<Tensor> {
    let n = encodings.len();
    if n == 0 {
        return Err(Error::InvalidArgument("nothing to encode".into()));
    }
    let mut rows: Vec<Option<Tensor>> = vec![None; n];
    let progress = Progress::new(
        options.progress,
        n as u64,
        "{bar:40} {pos}/{len} texts, {per_sec}, eta {eta}",
    );
    encode_batches(
        encoder,
        tokenizer,
        encodings,
        options.batch_size,
        options.sort_by_length,
        |indices, batch, out| {
            let vectors = match what {
                Pooled::Sentences { skip: 0 } => pooling.sentence(out, &batch.attention_mask)?,
                Pooled::Sentences { skip } => {
                    let mask = &batch.attention_mask;
                    let (rows, len) = mask.dims2()?;
                    let skip = skip.min(len);
                    let kept = Tensor::cat(
                        &[
                            mask.narrow(1, 0, skip)?.zeros_like()?,
                            mask.narrow(1, skip, len - skip)?,
                        ],
                        1,
                    )?;
                    debug_assert_eq!(kept.dims(), [rows, len]);
                    pooling.sentence(out, &kept)?
                }
                Pooled::Spans(spans) => {
                    let chunk: Vec<TokenSpan> = indices.iter().map(|&i| spans[i]).collect();
                    pooling.spans(out, &chunk)?
                }
            };
            let vectors = vectors.to_dtype(DType::F32)?.to_device(&Device::Cpu)?;
            let vectors = post.apply(vectors)?;
            for (row, &i) in indices.iter().enumerate() {
                rows[i] = Some(vectors.get(row)?);
            }
            progress.inc(indices.len() as u64, || None);
            Ok(())
        },
    )?;
    progress.finish_and_clear();
    let rows: Vec<Tensor> = rows
        .into_iter()
        .map(|r| r.expect("encode_batches visits every row once"))
        .collect();
    Ok(Tensor::stack(&rows, 0)?)
}

/// Runs the encoder (inference: no dropout, no graph, [`BertEncoder::forward_detached`]) over
/// `encodings` in batches of `batch_size` and hands each
/// batch to `visit` with the input indices of its rows.
///
/// With `sort_by_length` the batches hold encodings of similar length (longest first, so a
/// batch too large for memory fails at once); `visit` sees every index exactly once either way.
/// This is the loop under [`encode`]; the word aligner uses it for token-level vectors.
pub fn encode_batches<F>(
    encoder: &BertEncoder,
    tokenizer: &Tokenizer,
    encodings: Vec<Encoding>,
    batch_size: usize,
    sort_by_length: bool,
    mut visit: F,
) -> Result<()>
where
    F: FnMut(&[usize], &TokenBatch, &EncoderOutput) -> Result<()>,
{
    if batch_size == 0 {
        return Err(Error::InvalidArgument(
            "batch size must be at least 1".into(),
        ));
    }
    let mut order: Vec<usize> = (0..encodings.len()).collect();
    if sort_by_length {
        // Stable, so equal lengths keep their input order and runs are reproducible.
        order.sort_by_key(|&i| std::cmp::Reverse(encodings[i].get_ids().len()));
    }
    let mut slots: Vec<Option<Encoding>> = encodings.into_iter().map(Some).collect();
    let device = encoder.word_embeddings().device().clone();
    for indices in order.chunks(batch_size) {
        let chunk: Vec<Encoding> = indices
            .iter()
            .map(|&i| slots[i].take().expect("each index once"))
            .collect();
        let batch = tokenizer.pad_batch(chunk, &device)?;
        let out = encoder.forward_detached(
            &batch.input_ids,
            Some(&batch.token_type_ids),
            Some(&batch.attention_mask),
        )?;
        visit(indices, &batch, &out)?;
    }
    Ok(())
}

impl PretrainedBert {
    /// [`encode`] with this model's encoder and tokenizer, following its sentence-transformers
    /// files when the directory has them ([`PretrainedBert::sentence_transformer`]; see
    /// [`EncodeOptions`] for every default): one vector per text, f32 on the CPU.
    ///
    /// ```no_run
    /// # fn main() -> mlctl::Result<()> {
    /// use mlctl::encode::{cosine_similarity, EncodeOptions};
    /// let bert = mlctl::pretrained::PretrainedBert::load("bert-base-multilingual-cased", &candle_core::Device::Cpu, candle_core::DType::F32)?;
    /// let v = bert.encode(&["The cat sleeps.", "Le chat dort."], &EncodeOptions::default())?;
    /// let sim = cosine_similarity(&v, &v)?; // [2, 2]
    /// # Ok(()) }
    /// ```
    pub fn encode<S: AsRef<str>>(&self, texts: &[S], options: &EncodeOptions) -> Result<Tensor> {
        encode_with_config(
            &self.model.encoder,
            self.tokenizer()?,
            self.sentence_transformer.as_ref(),
            texts,
            options,
        )
    }
}

/// Cosine similarity of every row of `a` with every row of `b`, computed in f32.
///
/// # Shapes
/// - `a`: `[n, d]`, `b`: `[m, d]`; output: `[n, m]`
pub fn cosine_similarity(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let (_, d) = a.dims2()?;
    let (_, d_b) = b.dims2()?;
    if d != d_b {
        return Err(Error::ShapeMismatch {
            name: "second embeddings".into(),
            expected: vec![b.dims()[0], d],
            actual: b.dims().to_vec(),
        });
    }
    let a = l2_normalize(&a.to_dtype(DType::F32)?)?;
    let b = l2_normalize(&b.to_dtype(DType::F32)?)?;
    Ok(a.matmul(&b.t()?)?)
}
