//! From sentences to word vectors to alignments: the encoder pipeline.

use candle_core::{DType, Device, Tensor};
use rayon::prelude::*;
use tokenizers::Encoding;

use super::methods::{drop_below, AlignMethod, Alignment, ScoredAlignment};
use super::sim::{SimMatrix, Similarity};
use crate::encoder::BertEncoder;
use crate::pooling::{Pooling, TokenSpan};
use crate::tokenize::{TokenBatch, Tokenizer};
use crate::{Error, Result};

/// One line of a parallel file: source and target words.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SentencePair {
    /// Source words.
    pub src: Vec<String>,
    /// Target words.
    pub tgt: Vec<String>,
}

impl SentencePair {
    /// A pair from tokenized source and target text, words separated by ASCII whitespace
    /// (space, tab, CR, LF, FF) only: other Unicode spaces, e.g. the ideographic space U+3000
    /// that the ja-en gold set counts as a word, are words.
    pub fn from_text(src: &str, tgt: &str) -> Self {
        let words = |s: &str| s.split_ascii_whitespace().map(str::to_owned).collect();
        Self {
            src: words(src),
            tgt: words(tgt),
        }
    }

    /// Parses `source words ||| target words`. A blank line is the empty pair; a non-blank line
    /// needs exactly one `|||`.
    pub fn parse(line: &str) -> std::result::Result<Self, String> {
        if line.trim_ascii().is_empty() {
            return Ok(Self::default());
        }
        let mut parts = line.split("|||");
        match (parts.next(), parts.next(), parts.next()) {
            (Some(src), Some(tgt), None) => Ok(Self::from_text(src, tgt)),
            (_, None, _) => Err("no ` ||| ` separator between source and target".into()),
            _ => Err("more than one `|||` separator".into()),
        }
    }

    /// Whether either side has no word.
    pub fn is_empty(&self) -> bool {
        self.src.is_empty() || self.tgt.is_empty()
    }
}

/// SimAlign's layer for mBERT word alignment.
pub const DEFAULT_ALIGN_LAYER: isize = 8;

/// Anything that turns a token batch into hidden states, `L + 1` tensors of
/// `[batch, seq_len, hidden]` with entry 0 the embedding output (as
/// [`crate::encoder::EncoderOutput::hidden_states`]).
pub trait HiddenStates {
    /// Runs the encoder in inference mode.
    fn hidden_states(&self, batch: &TokenBatch) -> Result<Vec<Tensor>>;

    /// The device the token batch must be on.
    fn device(&self) -> Device;

    /// The longest sequence the encoder accepts (BERT: `max_position_embeddings`), if limited.
    fn max_positions(&self) -> Option<usize> {
        None
    }
}

impl HiddenStates for BertEncoder {
    fn hidden_states(&self, batch: &TokenBatch) -> Result<Vec<Tensor>> {
        Ok(self
            .forward_detached(
                &batch.input_ids,
                Some(&batch.token_type_ids),
                Some(&batch.attention_mask),
            )?
            .hidden_states)
    }

    fn device(&self) -> Device {
        self.word_embeddings().device().clone()
    }

    fn max_positions(&self) -> Option<usize> {
        Some(self.config().max_sequence_length())
    }
}

/// The tokens of each word: entry `w` lists the positions whose word id is `w` (in order).
/// A word whose tokens were all truncated away (or that tokenized to nothing) has none.
pub fn word_tokens(word_ids: &[Option<u32>], num_words: usize) -> Vec<Vec<usize>> {
    let mut tokens = vec![Vec::new(); num_words];
    for (pos, id) in word_ids.iter().enumerate() {
        if let Some(list) = id.and_then(|w| tokens.get_mut(w as usize)) {
            list.push(pos);
        }
    }
    tokens
}

/// The inclusive token span of each word (position 0 is `[CLS]`), `None` for a word with no
/// token left (see [`word_tokens`]).
pub fn word_spans(word_ids: &[Option<u32>], num_words: usize) -> Vec<Option<TokenSpan>> {
    word_tokens(word_ids, num_words)
        .into_iter()
        .map(|t| {
            Some(TokenSpan {
                start: *t.first()?,
                end: *t.last()?,
            })
        })
        .collect()
}

/// Word vectors of one sentence: `None` for a word with no token left after truncation.
pub type WordVectors = Vec<Option<Vec<f32>>>;

/// What the extraction methods link, as SimAlign's `token_type`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum TokenType {
    /// Subwords (SimAlign's default, `"bpe"`): every method runs on the matrix of subword
    /// vectors (special tokens excluded), and two words are linked when any of their subwords
    /// are. awesome-align extracts its softmax links this way too.
    #[default]
    Bpe,
    /// Words (`"word"`): a word's vector is the mean of its subword vectors and the methods run
    /// on the word matrix.
    Word,
}

impl std::str::FromStr for TokenType {
    type Err = Error;

    /// `bpe` (alias `subword`) or `word`.
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "bpe" | "subword" => Ok(Self::Bpe),
            "word" => Ok(Self::Word),
            other => Err(Error::InvalidArgument(format!(
                "unknown token type `{other}` (expected bpe or word)"
            ))),
        }
    }
}

/// The vectors of one sentence's alignment units (its subwords or its words, see
/// [`TokenType`]) and the word each unit belongs to.
///
/// # Shapes
/// - `vectors`: row-major `[units, dim]`
/// - `words`: `[units]`, word indices into the sentence, non-decreasing
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SentenceVectors {
    /// One row per unit.
    pub vectors: Vec<f32>,
    /// Length of a vector.
    pub dim: usize,
    /// The word of each unit.
    pub words: Vec<usize>,
}

impl SentenceVectors {
    /// Number of units.
    pub fn len(&self) -> usize {
        self.words.len()
    }

    /// True when the sentence has no unit (empty, or truncated away).
    pub fn is_empty(&self) -> bool {
        self.words.is_empty()
    }

    /// Word vectors (one unit per word) from the per-word form of [`WordAligner::embed_words`].
    pub fn from_words(words: &WordVectors) -> Result<Self> {
        let mut out = Self::default();
        for (w, v) in words.iter().enumerate() {
            let Some(v) = v else { continue };
            if out.words.is_empty() {
                out.dim = v.len();
            } else if v.len() != out.dim {
                return Err(Error::ShapeMismatch {
                    name: "word vector".into(),
                    expected: vec![out.dim],
                    actual: vec![v.len()],
                });
            }
            out.vectors.extend_from_slice(v);
            out.words.push(w);
        }
        Ok(out)
    }
}

/// Sentences per forward pass unless [`WordAligner::with_batch_size`] says otherwise.
pub const DEFAULT_ALIGN_BATCH: usize = 16;

/// Aligns the words of sentence pairs with an encoder and one or more [`AlignMethod`]s.
///
/// Each side is encoded on its own (`[CLS] words [SEP]`, as SimAlign does), in batches of
/// sentences of similar token length (sorted, results in input order). Vectors come from the
/// chosen layer; with several layers (e.g. [`Pooling::mlctl`]: layers 1 and last) from the mean
/// of those layers (for cosine similarities the mean and the sum of layers give the same
/// matrix). Layers count as in [`crate::encoder::EncoderOutput::hidden_states`] (0 = embeddings,
/// negative from the end); a layer the encoder lacks is an [`Error::InvalidArgument`].
///
/// With [`TokenType::Bpe`] (the default, as SimAlign's) the methods link subwords and a word
/// pair is linked when any of its subword pairs is; with [`TokenType::Word`] a word's vector is
/// the mean of its subword vectors and the methods link words. Special tokens are never units.
/// One encoder pass serves every method given to [`WordAligner::align_pairs_multi`], and one
/// similarity matrix per pair every method that compares vectors the same way.
///
/// Words whose subwords were all truncated away (the tokenizer's `max_len`) get no vector and
/// no link; the other words are aligned among themselves and keep their original indices.
pub struct WordAligner<'a, E: HiddenStates + ?Sized> {
    encoder: &'a E,
    tokenizer: Tokenizer,
    layers: Vec<isize>,
    token_type: TokenType,
    batch_size: usize,
    distortion: f32,
    null_threshold: Option<f32>,
}

impl<'a, E: HiddenStates + ?Sized> WordAligner<'a, E> {
    /// An aligner at layer [`DEFAULT_ALIGN_LAYER`] (8), subword units, batches of
    /// [`DEFAULT_ALIGN_BATCH`] sentences, no distortion, no null threshold.
    ///
    /// A tokenizer whose `max_len` exceeds the encoder's position limit
    /// ([`HiddenStates::max_positions`]) is lowered to it, so long sentences are truncated
    /// (their last words get no link) rather than rejected by the encoder.
    pub fn new(encoder: &'a E, tokenizer: Tokenizer) -> Self {
        let tokenizer = match encoder.max_positions() {
            Some(limit) if tokenizer.max_len() > limit => {
                tokenizer.clone().with_max_len(limit).unwrap_or(tokenizer)
            }
            _ => tokenizer,
        };
        Self {
            encoder,
            tokenizer,
            layers: vec![DEFAULT_ALIGN_LAYER],
            token_type: TokenType::default(),
            batch_size: DEFAULT_ALIGN_BATCH,
            distortion: 0.0,
            null_threshold: None,
        }
    }

    /// Uses one hidden layer.
    pub fn with_layer(mut self, layer: isize) -> Self {
        self.layers = vec![layer];
        self
    }

    /// Uses the mean of the pooling's layers (see the type's docs).
    pub fn with_pooling(mut self, pooling: &Pooling) -> Self {
        self.layers = pooling.layers().to_vec();
        self
    }

    /// Links subwords ([`TokenType::Bpe`], the default) or words.
    pub fn with_token_type(mut self, token_type: TokenType) -> Self {
        self.token_type = token_type;
        self
    }

    /// Sentences per forward pass (at least 1).
    pub fn with_batch_size(mut self, sentences: usize) -> Self {
        self.batch_size = sentences.max(1);
        self
    }

    /// Applies SimAlign's distortion prior ([`SimMatrix::with_distortion`]) before extraction;
    /// 0 (the default) turns it off.
    pub fn with_distortion(mut self, ratio: f32) -> Self {
        self.distortion = ratio;
        self
    }

    /// Drops extracted links whose similarity (in the matrix the method saw, after distortion)
    /// is below `threshold` ([`drop_below`]).
    pub fn with_null_threshold(mut self, threshold: Option<f32>) -> Self {
        self.null_threshold = threshold;
        self
    }

    /// The layers whose mean gives the vectors.
    pub fn layers(&self) -> &[isize] {
        &self.layers
    }

    /// What the methods link.
    pub fn token_type(&self) -> TokenType {
        self.token_type
    }

    /// The tokenizer.
    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    /// Word vectors of pre-tokenized sentences: the mean of each word's subword vectors,
    /// whatever the token type. An empty sentence gives an empty list.
    pub fn embed_words<S: AsRef<str> + Sync>(
        &self,
        sentences: &[Vec<S>],
    ) -> Result<Vec<WordVectors>> {
        let units = self.embed_units(sentences, TokenType::Word)?;
        Ok(units
            .into_iter()
            .zip(sentences)
            .map(|(u, words)| {
                let mut out: WordVectors = vec![None; words.len()];
                for (row, &w) in u.vectors.chunks(u.dim.max(1)).zip(&u.words) {
                    out[w] = Some(row.to_vec());
                }
                out
            })
            .collect())
    }

    /// The unit vectors of pre-tokenized sentences for the aligner's token type, in batches of
    /// similar length.
    pub fn embed<S: AsRef<str> + Sync>(
        &self,
        sentences: &[Vec<S>],
    ) -> Result<Vec<SentenceVectors>> {
        self.embed_units(sentences, self.token_type)
    }

    fn embed_units<S: AsRef<str> + Sync>(
        &self,
        sentences: &[Vec<S>],
        token_type: TokenType,
    ) -> Result<Vec<SentenceVectors>> {
        if self.layers.is_empty() {
            return Err(Error::InvalidArgument(
                "word alignment needs at least one layer".into(),
            ));
        }
        let mut out: Vec<SentenceVectors> = vec![SentenceVectors::default(); sentences.len()];
        // Each sentence tokenized alone (truncated, not padded), so batches can be formed by
        // length: padding a short sentence to a long one costs encoder time for nothing.
        let tokenizer = self.tokenizer.inner();
        let encodings: Vec<(usize, Encoding)> = sentences
            .par_iter()
            .enumerate()
            .filter(|(_, s)| !s.is_empty())
            .map(|(k, s)| {
                let words: Vec<&str> = s.iter().map(AsRef::as_ref).collect();
                let enc = crate::tokenize::guard(|| tokenizer.encode(words, true))?;
                Ok((k, enc))
            })
            .collect::<Result<_>>()?;
        let mut order: Vec<usize> = (0..encodings.len()).collect();
        order.sort_by_key(|&e| encodings[e].1.len());
        let mut encodings: Vec<Option<(usize, Encoding)>> =
            encodings.into_iter().map(Some).collect();
        for chunk in order.chunks(self.batch_size) {
            let (index, batch): (Vec<usize>, Vec<Encoding>) = chunk
                .iter()
                .map(|&e| encodings[e].take().expect("each encoding is batched once"))
                .unzip();
            let batch = self.tokenizer.pad_batch(batch, &self.encoder.device())?;
            let hidden = self.layer_mean(&self.encoder.hidden_states(&batch)?)?;
            let (_, seq_len, dim) = hidden.dims3()?;
            let hidden = hidden.flatten_all()?.to_vec1::<f32>()?;
            for (row, &k) in index.iter().enumerate() {
                let tokens = &hidden[row * seq_len * dim..(row + 1) * seq_len * dim];
                out[k] = units(
                    tokens,
                    dim,
                    &batch.word_ids[row],
                    sentences[k].len(),
                    token_type,
                );
            }
        }
        Ok(out)
    }

    /// The mean of the chosen layers, `[batch, seq_len, hidden]`, f32 on the CPU.
    fn layer_mean(&self, hidden: &[Tensor]) -> Result<Tensor> {
        let n = hidden.len() as isize;
        let mut sum: Option<Tensor> = None;
        for &layer in &self.layers {
            let index = if layer < 0 { n + layer } else { layer };
            if !(0..n).contains(&index) {
                return Err(Error::InvalidArgument(format!(
                    "layer {layer} does not exist: the encoder has hidden states 0..={} (0 = embeddings)",
                    n - 1
                )));
            }
            let h = hidden[index as usize]
                .to_device(&Device::Cpu)?
                .to_dtype(DType::F32)?;
            sum = Some(match sum {
                Some(s) => (s + h)?,
                None => h,
            });
        }
        let sum = sum.expect("at least one layer");
        Ok(if self.layers.len() > 1 {
            (sum / self.layers.len() as f64)?
        } else {
            sum
        })
    }

    /// Aligns one pair of word vector lists (from [`WordAligner::embed_words`]).
    pub fn align_vectors(
        &self,
        src: &WordVectors,
        tgt: &WordVectors,
        method: &dyn AlignMethod,
    ) -> Result<Alignment> {
        let (src, tgt) = (
            SentenceVectors::from_words(src)?,
            SentenceVectors::from_words(tgt)?,
        );
        Ok(self.align_units(&src, &tgt, &[method])?.remove(0))
    }

    /// Aligns one pair of unit vectors (from [`WordAligner::embed`]) with each method; the
    /// links are between words. One similarity matrix serves every method of the same
    /// [`AlignMethod::similarity`].
    pub fn align_units(
        &self,
        src: &SentenceVectors,
        tgt: &SentenceVectors,
        methods: &[&dyn AlignMethod],
    ) -> Result<Vec<Alignment>> {
        self.extraction().align(src, tgt, methods)
    }

    fn extraction(&self) -> Extraction {
        Extraction {
            distortion: self.distortion,
            null_threshold: self.null_threshold,
        }
    }

    /// Aligns a batch of pairs with one method. An empty side gives an empty alignment.
    pub fn align_pairs(
        &self,
        pairs: &[SentencePair],
        method: &dyn AlignMethod,
    ) -> Result<Vec<Alignment>> {
        Ok(self.align_pairs_multi(pairs, &[method])?.remove(0))
    }

    /// Aligns pairs with several methods from one encoder pass: entry `m` of the result holds
    /// method `m`'s alignment of every pair, in input order. Pairs are aligned in parallel.
    pub fn align_pairs_multi(
        &self,
        pairs: &[SentencePair],
        methods: &[&dyn AlignMethod],
    ) -> Result<Vec<Vec<Alignment>>> {
        self.per_method(pairs, methods.len(), |x, src, tgt| {
            x.align(src, tgt, methods)
        })
    }

    /// [`WordAligner::align_pairs_multi`] with a score for every link
    /// ([`ScoredAlignment`]): entry `m` of the result holds method `m`'s scored alignment of
    /// every pair, in input order.
    pub fn align_pairs_scored(
        &self,
        pairs: &[SentencePair],
        methods: &[&dyn AlignMethod],
    ) -> Result<Vec<Vec<ScoredAlignment>>> {
        self.per_method(pairs, methods.len(), |x, src, tgt| {
            x.align_scored(src, tgt, methods, true)
        })
    }

    /// Embeds every pair in one encoder pass, runs `align` (one result per each of `methods`
    /// methods) on each pair in parallel, and regroups the results by method: entry `m` holds
    /// method `m`'s result for every pair, in input order.
    fn per_method<T: Send>(
        &self,
        pairs: &[SentencePair],
        methods: usize,
        align: impl Fn(&Extraction, &SentenceVectors, &SentenceVectors) -> Result<Vec<T>> + Sync,
    ) -> Result<Vec<Vec<T>>> {
        let sentences: Vec<Vec<&str>> = pairs
            .iter()
            .flat_map(|p| [&p.src, &p.tgt])
            .map(|s| s.iter().map(String::as_str).collect())
            .collect();
        let vectors = self.embed(&sentences)?;
        let extraction = self.extraction();
        let per_pair: Vec<Vec<T>> = vectors
            .par_chunks(2)
            .map(|pair| align(&extraction, &pair[0], &pair[1]))
            .collect::<Result<_>>()?;
        let mut out: Vec<Vec<T>> = (0..methods)
            .map(|_| Vec::with_capacity(pairs.len()))
            .collect();
        for results in per_pair {
            for (m, r) in results.into_iter().enumerate() {
                out[m].push(r);
            }
        }
        Ok(out)
    }

    /// Aligns two pre-tokenized sentences.
    pub fn align_words<S: AsRef<str>>(
        &self,
        src: &[S],
        tgt: &[S],
        method: &dyn AlignMethod,
    ) -> Result<Alignment> {
        let pair = SentencePair {
            src: src.iter().map(|s| s.as_ref().to_owned()).collect(),
            tgt: tgt.iter().map(|s| s.as_ref().to_owned()).collect(),
        };
        Ok(self.align_pairs(&[pair], method)?.remove(0))
    }

    /// Aligns two raw texts: each is split into the tokenizer's words first
    /// ([`split_words`]); returns the source words, the target words and the links between
    /// them.
    pub fn align_texts(
        &self,
        src: &str,
        tgt: &str,
        method: &dyn AlignMethod,
    ) -> Result<(Vec<String>, Vec<String>, Alignment)> {
        let s: Vec<String> = split_words(&self.tokenizer, src)?
            .into_iter()
            .map(|w| w.text)
            .collect();
        let t: Vec<String> = split_words(&self.tokenizer, tgt)?
            .into_iter()
            .map(|w| w.text)
            .collect();
        let a = self.align_words(&s, &t, method)?;
        Ok((s, t, a))
    }
}

/// What happens between unit vectors and word links: the similarity matrix, the optional
/// distortion prior, each method, the optional null threshold, units mapped to words.
#[derive(Debug, Clone, Copy)]
struct Extraction {
    distortion: f32,
    null_threshold: Option<f32>,
}

impl Extraction {
    fn align(
        self,
        src: &SentenceVectors,
        tgt: &SentenceVectors,
        methods: &[&dyn AlignMethod],
    ) -> Result<Vec<Alignment>> {
        Ok(self
            .align_scored(src, tgt, methods, false)?
            .into_iter()
            .map(|s| s.alignment)
            .collect())
    }

    /// Each method's word links and, with `scored`, a score per link (else no scores).
    fn align_scored(
        self,
        src: &SentenceVectors,
        tgt: &SentenceVectors,
        methods: &[&dyn AlignMethod],
        scored: bool,
    ) -> Result<Vec<ScoredAlignment>> {
        let mut matrices: Vec<(Similarity, SimMatrix)> = Vec::new();
        let mut out = Vec::with_capacity(methods.len());
        for method in methods {
            let kind = method.similarity();
            let k = match matrices.iter().position(|(k, _)| *k == kind) {
                Some(k) => k,
                None => {
                    let dim = src.dim.max(tgt.dim);
                    let mut sim = SimMatrix::from_flat(&src.vectors, &tgt.vectors, dim, kind)?;
                    if self.distortion != 0.0 {
                        sim = sim.with_distortion(self.distortion);
                    }
                    matrices.push((kind, sim));
                    matrices.len() - 1
                }
            };
            let (kind, sim) = &matrices[k];
            let mut links = method.align(sim);
            if let Some(t) = self.null_threshold {
                links = drop_below(&links, sim, t);
            }
            let alignment: Alignment = links
                .links()
                .iter()
                .map(|&(i, j)| (src.words[i], tgt.words[j]))
                .collect();
            let scores = if scored {
                let unit_score = link_scores(*kind, sim);
                // A word link's score is the best of its unit links', as awesome-align takes it.
                let mut best: std::collections::HashMap<(usize, usize), f32> =
                    std::collections::HashMap::new();
                for &(i, j) in links.links() {
                    let score = unit_score(i, j);
                    let entry = best
                        .entry((src.words[i], tgt.words[j]))
                        .or_insert(f32::NEG_INFINITY);
                    *entry = entry.max(score);
                }
                alignment.links().iter().map(|link| best[link]).collect()
            } else {
                Vec::new()
            };
            out.push(ScoredAlignment { alignment, scores });
        }
        Ok(out)
    }
}

/// The score of unit link `(i, j)` for methods on similarity `kind` (see [`ScoredAlignment`]).
fn link_scores(kind: Similarity, sim: &SimMatrix) -> Box<dyn Fn(usize, usize) -> f32 + '_> {
    match kind {
        Similarity::Cosine | Similarity::ScaledCosine => Box::new(move |i, j| sim.get(i, j)),
        Similarity::Dot => {
            // awesome-align's heuristic: the harmonic mean of the row and the column softmax of
            // the dot products, each divided by the square root of the other side's length.
            let (m, n) = (sim.rows(), sim.cols());
            let softmax = |values: Vec<f64>, scale: f64| -> Vec<f64> {
                let values: Vec<f64> = values.into_iter().map(|v| v / scale).collect();
                let max = values.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                let exps: Vec<f64> = values.iter().map(|v| (v - max).exp()).collect();
                let sum: f64 = exps.iter().sum();
                exps.into_iter().map(|e| e / sum).collect()
            };
            let rows: Vec<Vec<f64>> = (0..m)
                .map(|i| {
                    let row = sim.row(i).iter().map(|&v| f64::from(v)).collect();
                    softmax(row, (n as f64).sqrt())
                })
                .collect();
            let cols: Vec<Vec<f64>> = (0..n)
                .map(|j| {
                    let col = (0..m).map(|i| f64::from(sim.get(i, j))).collect();
                    softmax(col, (m as f64).sqrt())
                })
                .collect();
            Box::new(move |i, j| {
                let (p, q) = (rows[i][j], cols[j][i]);
                (2.0 * p * q / (p + q + 1e-9)) as f32
            })
        }
    }
}

/// The alignment units of one encoded sentence: `tokens` is its `[seq_len, dim]` slice of
/// hidden states, `word_ids` its tokenizer word ids (`None` for special tokens and padding).
fn units(
    tokens: &[f32],
    dim: usize,
    word_ids: &[Option<u32>],
    num_words: usize,
    token_type: TokenType,
) -> SentenceVectors {
    let mut out = SentenceVectors {
        dim,
        ..Default::default()
    };
    match token_type {
        TokenType::Bpe => {
            for (pos, id) in word_ids.iter().enumerate() {
                if let Some(w) = id.map(|w| w as usize).filter(|&w| w < num_words) {
                    out.vectors
                        .extend_from_slice(&tokens[pos * dim..(pos + 1) * dim]);
                    out.words.push(w);
                }
            }
        }
        TokenType::Word => {
            for (w, toks) in word_tokens(word_ids, num_words).iter().enumerate() {
                if toks.is_empty() {
                    continue;
                }
                let mut v = vec![0f64; dim];
                for &t in toks {
                    for (acc, &x) in v.iter_mut().zip(&tokens[t * dim..(t + 1) * dim]) {
                        *acc += f64::from(x);
                    }
                }
                let count = toks.len() as f64;
                out.vectors
                    .extend(v.into_iter().map(|x| (x / count) as f32));
                out.words.push(w);
            }
        }
    }
    out
}

/// A word of a raw text as the tokenizer splits it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TextWord {
    /// The word's text, a slice of the input.
    pub text: String,
    /// Its byte range in the input.
    pub bytes: (usize, usize),
}

/// Splits raw text into the words the tokenizer sees (its normalizer and pre-tokenizer: for
/// BERT, whitespace and punctuation splits, and every CJK character a word), with no
/// truncation, so every word is listed. Words are the spans of the tokens sharing a word id.
pub fn split_words(tokenizer: &Tokenizer, text: &str) -> Result<Vec<TextWord>> {
    let mut inner = tokenizer.inner().clone();
    inner
        .with_truncation(None)
        .map_err(Error::Tokenizer)?
        .with_padding(None);
    let enc = crate::tokenize::guard(|| inner.encode(text, false))?;
    let mut words: Vec<TextWord> = Vec::new();
    let mut last: Option<u32> = None;
    for (id, &(start, end)) in enc.get_word_ids().iter().zip(enc.get_offsets()) {
        let Some(id) = *id else { continue };
        if last == Some(id) {
            let w = words.last_mut().expect("a word was started");
            w.bytes.1 = w.bytes.1.max(end);
        } else {
            words.push(TextWord {
                text: String::new(),
                bytes: (start, end),
            });
            last = Some(id);
        }
    }
    for w in &mut words {
        w.text = text
            .get(w.bytes.0..w.bytes.1)
            .unwrap_or_default()
            .to_owned();
    }
    Ok(words)
}
