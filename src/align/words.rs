//! From sentences to word vectors to alignments: the encoder pipeline.

use candle_core::{DType, Device, Tensor};

use super::io::SentencePair;
use super::methods::{drop_below, AlignMethod, Alignment};
use super::sim::SimMatrix;
use crate::encoder::BertEncoder;
use crate::pooling::{Pooling, TokenSpan};
use crate::tokenize::{TokenBatch, Tokenizer};
use crate::{Error, Result};

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
            .forward(
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

/// Aligns the words of sentence pairs with an encoder and an [`AlignMethod`].
///
/// Each side is encoded on its own (`[CLS] words [SEP]`, as SimAlign does). A word's vector is
/// the mean of its subword vectors at the chosen layer; with several layers (e.g.
/// [`Pooling::mlctl`]: layers 1 and last) it is the mean over those layers of that (for cosine
/// similarities the mean and the sum of layers give the same matrix). Layers count as in
/// [`crate::encoder::EncoderOutput::hidden_states`] (0 = embeddings, negative from the end); a
/// layer the encoder lacks is an [`Error::InvalidArgument`].
///
/// Words whose subwords were all truncated away (the tokenizer's `max_len`) get no vector and
/// no link; the other words are aligned among themselves and keep their original indices.
pub struct WordAligner<'a, E: HiddenStates + ?Sized> {
    encoder: &'a E,
    tokenizer: Tokenizer,
    layers: Vec<isize>,
    distortion: f32,
    null_threshold: Option<f32>,
}

impl<'a, E: HiddenStates + ?Sized> WordAligner<'a, E> {
    /// An aligner at layer [`DEFAULT_ALIGN_LAYER`] (8), no distortion, no null threshold.
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

    /// The layers whose mean gives word vectors.
    pub fn layers(&self) -> &[isize] {
        &self.layers
    }

    /// The tokenizer.
    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    /// Word vectors of pre-tokenized sentences (one forward pass for all of them). An empty
    /// sentence gives an empty list.
    pub fn embed_words<S: AsRef<str>>(&self, sentences: &[Vec<S>]) -> Result<Vec<WordVectors>> {
        if self.layers.is_empty() {
            return Err(Error::InvalidArgument(
                "word alignment needs at least one layer".into(),
            ));
        }
        let mut out: Vec<WordVectors> = sentences.iter().map(|_| Vec::new()).collect();
        let present: Vec<usize> = (0..sentences.len())
            .filter(|&k| !sentences[k].is_empty())
            .collect();
        if present.is_empty() {
            return Ok(out);
        }
        let words: Vec<Vec<&str>> = present
            .iter()
            .map(|&k| sentences[k].iter().map(AsRef::as_ref).collect())
            .collect();
        let batch = self
            .tokenizer
            .encode_pretokenized_batch(&words, &self.encoder.device())?;
        let hidden = self.encoder.hidden_states(&batch)?;
        let n = hidden.len() as isize;
        let mut layers: Vec<Vec<Vec<Vec<f32>>>> = Vec::with_capacity(self.layers.len());
        for &layer in &self.layers {
            let index = if layer < 0 { n + layer } else { layer };
            if !(0..n).contains(&index) {
                return Err(Error::InvalidArgument(format!(
                    "layer {layer} does not exist: the encoder has hidden states 0..={} (0 = embeddings)",
                    n - 1
                )));
            }
            let h = hidden[index as usize]
                .to_dtype(DType::F32)?
                .to_device(&Device::Cpu)?;
            layers.push(h.to_vec3::<f32>()?);
        }
        for (row, &k) in present.iter().enumerate() {
            let tokens = word_tokens(&batch.word_ids[row], sentences[k].len());
            out[k] = tokens
                .iter()
                .map(|toks| {
                    if toks.is_empty() {
                        return None;
                    }
                    let dim = layers[0][row][0].len();
                    let mut v = vec![0f64; dim];
                    for layer in &layers {
                        for &t in toks {
                            for (acc, &x) in v.iter_mut().zip(&layer[row][t]) {
                                *acc += f64::from(x);
                            }
                        }
                    }
                    let count = (toks.len() * layers.len()) as f64;
                    Some(v.into_iter().map(|x| (x / count) as f32).collect())
                })
                .collect();
        }
        Ok(out)
    }

    /// Aligns one pair of word vector lists (from [`WordAligner::embed_words`]).
    pub fn align_vectors(
        &self,
        src: &WordVectors,
        tgt: &WordVectors,
        method: &dyn AlignMethod,
    ) -> Result<Alignment> {
        let (src_idx, src_vecs): (Vec<usize>, Vec<Vec<f32>>) = src
            .iter()
            .enumerate()
            .filter_map(|(k, v)| Some((k, v.clone()?)))
            .unzip();
        let (tgt_idx, tgt_vecs): (Vec<usize>, Vec<Vec<f32>>) = tgt
            .iter()
            .enumerate()
            .filter_map(|(k, v)| Some((k, v.clone()?)))
            .unzip();
        let mut sim = SimMatrix::compute(&src_vecs, &tgt_vecs, method.similarity())?;
        if self.distortion != 0.0 {
            sim = sim.with_distortion(self.distortion);
        }
        let mut links = method.align(&sim);
        if let Some(t) = self.null_threshold {
            links = drop_below(&links, &sim, t);
        }
        Ok(links
            .links()
            .iter()
            .map(|&(i, j)| (src_idx[i], tgt_idx[j]))
            .collect())
    }

    /// Aligns a batch of pairs with one forward pass over all their sentences. An empty side
    /// gives an empty alignment.
    pub fn align_pairs(
        &self,
        pairs: &[SentencePair],
        method: &dyn AlignMethod,
    ) -> Result<Vec<Alignment>> {
        let mut sentences: Vec<&[String]> = Vec::with_capacity(2 * pairs.len());
        for p in pairs {
            sentences.push(&p.src);
            sentences.push(&p.tgt);
        }
        let sentences: Vec<Vec<&str>> = sentences
            .iter()
            .map(|s| s.iter().map(String::as_str).collect())
            .collect();
        let vectors = self.embed_words(&sentences)?;
        vectors
            .chunks(2)
            .map(|pair| self.align_vectors(&pair[0], &pair[1], method))
            .collect()
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
    let enc = inner.encode(text, false).map_err(Error::Tokenizer)?;
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
