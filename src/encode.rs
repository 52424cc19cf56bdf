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
//! # let bert = mlctl::encoder::PretrainedBert::load("model", &candle_core::Device::Cpu, candle_core::DType::F32)?;
//! # let tokenizer = bert.tokenizer()?;
//! let options = EncodeOptions::default().with_batch_size(64).with_normalize(true);
//! let vectors = encode(&bert.model.encoder, tokenizer, &["The cat sleeps.", "Le chat dort."], &options)?;
//! assert_eq!(vectors.dims()[0], 2);
//! # Ok(()) }
//! ```

use candle_core::{DType, Device, Tensor};
use tokenizers::Encoding;

use crate::encoder::{BertEncoder, EncoderOutput, PretrainedBert};
use crate::pooling::{l2_normalize, Pooling, TokenSpan};
use crate::progress::Progress;
use crate::tokenize::{TokenBatch, Tokenizer};
use crate::{Error, Result};

/// How [`encode`] batches, pools and post-processes.
#[derive(Debug, Clone, PartialEq)]
pub struct EncodeOptions {
    /// Texts per forward pass.
    pub batch_size: usize,
    /// Which hidden states to average: ML-CTL's layers 1 and L ([`Pooling::mlctl`], the
    /// default) or a model's own, e.g. the mean of the last layer ([`Pooling::layer`]`(-1)`).
    pub pooling: Pooling,
    /// Scale every vector to unit length (so dot products are cosines).
    pub normalize: bool,
    /// Batch texts of similar token length together (less padding, same results up to
    /// floating-point rounding); the output keeps the input order either way.
    pub sort_by_length: bool,
    /// Prepended to every text before tokenization, e.g. `"query: "` for the e5 models.
    pub prefix: Option<String>,
    /// Show a progress bar on standard error.
    pub progress: bool,
}

impl Default for EncodeOptions {
    /// Batches of 32, ML-CTL's pooling, no normalisation, sorted by length, no prefix, quiet.
    fn default() -> Self {
        Self {
            batch_size: 32,
            pooling: Pooling::mlctl(),
            normalize: false,
            sort_by_length: true,
            prefix: None,
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
        self.pooling = pooling;
        self
    }

    /// Sets [`EncodeOptions::normalize`].
    pub fn with_normalize(mut self, normalize: bool) -> Self {
        self.normalize = normalize;
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
        Ok(())
    }
}

/// One vector per text, `[texts, hidden]`, f32 on the CPU, in eval mode (no dropout).
///
/// # Shapes
/// - output: `[texts.len(), hidden]`, row `i` for `texts[i]`
pub fn encode<S: AsRef<str>>(
    encoder: &BertEncoder,
    tokenizer: &Tokenizer,
    texts: &[S],
    options: &EncodeOptions,
) -> Result<Tensor> {
    options.check()?;
    let encodings = match &options.prefix {
        Some(prefix) => {
            let prefixed: Vec<String> = texts
                .iter()
                .map(|t| format!("{prefix}{}", t.as_ref()))
                .collect();
            tokenizer.encode_each(&prefixed)?
        }
        None => tokenizer.encode_each(texts)?,
    };
    pooled(encoder, tokenizer, encodings, options, None)
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
    pooled(encoder, tokenizer, encodings, options, Some(spans))
}

fn pooled(
    encoder: &BertEncoder,
    tokenizer: &Tokenizer,
    encodings: Vec<Encoding>,
    options: &EncodeOptions,
    spans: Option<&[TokenSpan]>,
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
            let mut vectors = match spans {
                None => options.pooling.sentence(out, &batch.attention_mask)?,
                Some(spans) => {
                    let chunk: Vec<TokenSpan> = indices.iter().map(|&i| spans[i]).collect();
                    options.pooling.spans(out, &chunk)?
                }
            };
            if options.normalize {
                vectors = l2_normalize(&vectors)?;
            }
            let vectors = vectors.to_dtype(DType::F32)?.to_device(&Device::Cpu)?;
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
    /// [`encode`] with this model's encoder and tokenizer: one vector per text, `[texts, hidden]`,
    /// f32 on the CPU.
    ///
    /// ```no_run
    /// # fn main() -> mlctl::Result<()> {
    /// use mlctl::encode::{cosine_similarity, EncodeOptions};
    /// let bert = mlctl::encoder::PretrainedBert::load("bert-base-multilingual-cased", &candle_core::Device::Cpu, candle_core::DType::F32)?;
    /// let v = bert.encode(&["The cat sleeps.", "Le chat dort."], &EncodeOptions::default())?;
    /// let sim = cosine_similarity(&v, &v)?; // [2, 2]
    /// # Ok(()) }
    /// ```
    pub fn encode<S: AsRef<str>>(&self, texts: &[S], options: &EncodeOptions) -> Result<Tensor> {
        encode(&self.model.encoder, self.tokenizer()?, texts, options)
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
