//! Batch tokenization with padding, truncation and offsets, through the `tokenizers` crate.

use std::path::Path;

use candle_core::{Device, Tensor};
use tokenizers::{EncodeInput, Encoding, PaddingParams, PaddingStrategy, TruncationParams};

use crate::{Error, Result};

/// Default maximum sequence length, special tokens included (the ML-CTL setting).
pub const DEFAULT_MAX_LEN: usize = 128;

/// A `tokenizer.json` tokenizer that encodes batches padded to their longest member and
/// truncated to a maximum length (special tokens included).
///
/// ```no_run
/// # fn main() -> mlctl::Result<()> {
/// let tok = mlctl::tokenize::Tokenizer::from_file("model/tokenizer.json")?.with_max_len(64)?;
/// let batch = tok.encode_batch(&["Hello world", "Bonjour"], &candle_core::Device::Cpu)?;
/// assert_eq!(batch.input_ids.dims()[0], 2);
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    max_len: usize,
}

/// A tokenized batch, padded on the right to its longest member.
///
/// # Shapes
/// - `input_ids`, `token_type_ids`, `attention_mask`: `[batch, seq_len]`, u32;
///   `attention_mask` is 1 on tokens and 0 on padding
/// - `offsets`, `word_ids`: `batch` rows of `seq_len` entries
#[derive(Debug, Clone)]
pub struct TokenBatch {
    /// Token ids.
    pub input_ids: Tensor,
    /// Segment ids (0 for single sentences).
    pub token_type_ids: Tensor,
    /// 1 for real tokens, 0 for padding.
    pub attention_mask: Tensor,
    /// Byte span of each token in its input text (for pre-tokenized input: in its word);
    /// `(0, 0)` for special tokens and padding.
    pub offsets: Vec<Vec<(usize, usize)>>,
    /// Index of the input word each token comes from; `None` for special tokens and padding.
    pub word_ids: Vec<Vec<Option<u32>>>,
    /// Number of non-padding tokens of each row.
    pub lengths: Vec<usize>,
}

impl Tokenizer {
    /// Loads a `tokenizer.json` with a maximum length of [`DEFAULT_MAX_LEN`].
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let inner = tokenizers::Tokenizer::from_file(path).map_err(|e| Error::Checkpoint {
            path: path.to_path_buf(),
            reason: format!("not a readable tokenizer.json ({e})"),
        })?;
        Self::new(inner)
    }

    /// Wraps a `tokenizers` tokenizer; its own padding and truncation settings are replaced.
    pub fn new(inner: tokenizers::Tokenizer) -> Result<Self> {
        Self {
            inner,
            max_len: DEFAULT_MAX_LEN,
        }
        .with_max_len(DEFAULT_MAX_LEN)
    }

    /// Sets the maximum length of an encoded sequence, special tokens included.
    pub fn with_max_len(mut self, max_len: usize) -> Result<Self> {
        let pad_id = self
            .inner
            .get_padding()
            .map(|p| p.pad_id)
            .or_else(|| self.inner.token_to_id("[PAD]"))
            .unwrap_or(0);
        let pad_token = self
            .inner
            .id_to_token(pad_id)
            .unwrap_or_else(|| "[PAD]".into());
        self.inner
            .with_truncation(Some(TruncationParams {
                max_length: max_len,
                ..Default::default()
            }))
            .map_err(Error::Tokenizer)?
            .with_padding(Some(PaddingParams {
                strategy: PaddingStrategy::BatchLongest,
                pad_id,
                pad_token,
                ..Default::default()
            }));
        self.max_len = max_len;
        Ok(self)
    }

    /// The maximum encoded length, special tokens included.
    pub fn max_len(&self) -> usize {
        self.max_len
    }

    /// The underlying `tokenizers` tokenizer.
    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }

    /// Size of the vocabulary, added tokens included.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// Id of a token, if it is in the vocabulary.
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// Encodes raw texts with special tokens (`[CLS] ... [SEP]` for BERT).
    pub fn encode_batch<S: AsRef<str>>(&self, texts: &[S], device: &Device) -> Result<TokenBatch> {
        let inputs: Vec<EncodeInput> = texts.iter().map(|t| t.as_ref().into()).collect();
        self.encode_inputs(inputs, device)
    }

    /// Encodes sentence pairs (`[CLS] first [SEP] second [SEP]` for BERT, with
    /// `token_type_ids` 0 on the first segment and 1 on the second). A pair longer than
    /// `max_len` is truncated longest-first: tokens come off the end of whichever segment is
    /// longer at the time.
    ///
    /// `first` and `second` must have the same, non-zero length ([`Error::ShapeMismatch`]
    /// otherwise).
    pub fn encode_pair_batch<S: AsRef<str>>(
        &self,
        first: &[S],
        second: &[S],
        device: &Device,
    ) -> Result<TokenBatch> {
        if first.len() != second.len() {
            return Err(Error::ShapeMismatch {
                name: "second sentences of the pairs".into(),
                expected: vec![first.len()],
                actual: vec![second.len()],
            });
        }
        let inputs: Vec<EncodeInput> = first
            .iter()
            .zip(second)
            .map(|(a, b)| EncodeInput::Dual(a.as_ref().into(), b.as_ref().into()))
            .collect();
        self.encode_inputs(inputs, device)
    }

    /// Encodes texts already split into words; `word_ids` then index those words.
    pub fn encode_pretokenized_batch<S: AsRef<str>>(
        &self,
        words: &[Vec<S>],
        device: &Device,
    ) -> Result<TokenBatch> {
        let inputs: Vec<EncodeInput> = words
            .iter()
            .map(|ws| {
                let ws: Vec<&str> = ws.iter().map(AsRef::as_ref).collect();
                ws.into()
            })
            .collect();
        self.encode_inputs(inputs, device)
    }

    /// Encodes each text on its own, truncated to `max_len` but not padded, so a caller can
    /// inspect or drop sequences before [`Tokenizer::pad_batch`].
    pub fn encode_each<S: AsRef<str>>(&self, texts: &[S]) -> Result<Vec<Encoding>> {
        texts
            .iter()
            .map(|t| {
                self.inner
                    .encode(t.as_ref(), true)
                    .map_err(Error::Tokenizer)
            })
            .collect()
    }

    /// Pads encodings to the longest one and stacks them into a batch.
    pub fn pad_batch(&self, mut encodings: Vec<Encoding>, device: &Device) -> Result<TokenBatch> {
        if encodings.is_empty() {
            return Err(Error::InvalidArgument("cannot pad an empty batch".into()));
        }
        if let Some(params) = self.inner.get_padding() {
            tokenizers::pad_encodings(&mut encodings, params).map_err(Error::Tokenizer)?;
        }
        TokenBatch::from_encodings(&encodings, device)
    }

    fn encode_inputs(&self, inputs: Vec<EncodeInput>, device: &Device) -> Result<TokenBatch> {
        if inputs.is_empty() {
            return Err(Error::InvalidArgument(
                "cannot encode an empty batch".into(),
            ));
        }
        let encodings = self
            .inner
            .encode_batch(inputs, true)
            .map_err(Error::Tokenizer)?;
        TokenBatch::from_encodings(&encodings, device)
    }

    /// Writes the tokenizer as `tokenizer.json`.
    pub fn save(&self, path: impl AsRef<Path>) -> Result<()> {
        let path = path.as_ref();
        let json = self.inner.to_string(true).map_err(Error::Tokenizer)?;
        crate::encoder::write_atomic(path, json.as_bytes())
    }
}

/// Special tokens of a BERT WordPiece vocabulary, in the order [`train_wordpiece`] gives them
/// ids 0 to 4.
pub const BERT_SPECIAL_TOKENS: [&str; 5] = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"];

/// Trains a cased BERT-style WordPiece tokenizer (BERT normalizer without lower-casing, CJK
/// characters split, `[CLS] A [SEP]` / `[CLS] A [SEP] B [SEP]` templates) on `texts`, with at
/// most `vocab_size` entries. The special tokens get ids 0-4 ([`BERT_SPECIAL_TOKENS`]).
///
/// The `tokenizers` trainer breaks ties between equally frequent merges by hash order, so two
/// runs can give slightly different vocabularies: save the result ([`Tokenizer::save`]) and reuse
/// it where runs must be reproducible.
pub fn train_wordpiece<S: AsRef<str> + Send>(
    texts: impl Iterator<Item = S> + Send,
    vocab_size: usize,
) -> Result<Tokenizer> {
    use tokenizers::models::wordpiece::{WordPiece, WordPieceTrainer};
    use tokenizers::models::TrainerWrapper;
    use tokenizers::normalizers::BertNormalizer;
    use tokenizers::pre_tokenizers::bert::BertPreTokenizer;
    use tokenizers::processors::template::TemplateProcessing;
    use tokenizers::AddedToken;

    let specials: Vec<AddedToken> = BERT_SPECIAL_TOKENS
        .iter()
        .map(|t| AddedToken::from(*t, true))
        .collect();
    let mut trainer: TrainerWrapper = WordPieceTrainer::builder()
        .vocab_size(vocab_size)
        .special_tokens(specials)
        .show_progress(false)
        .build()
        .into();
    let mut inner = tokenizers::Tokenizer::new(
        WordPiece::builder()
            .unk_token("[UNK]".into())
            .build()
            .map_err(Error::Tokenizer)?,
    );
    inner
        .with_normalizer(Some(BertNormalizer::new(true, true, None, false)))
        .with_pre_tokenizer(Some(BertPreTokenizer))
        .with_decoder(Some(tokenizers::decoders::wordpiece::WordPiece::default()));
    inner.train(&mut trainer, texts).map_err(Error::Tokenizer)?;
    let id = |t: &str| {
        inner
            .token_to_id(t)
            .ok_or_else(|| Error::InvalidArgument(format!("trained vocabulary lacks {t}")))
    };
    let (cls, sep) = (id("[CLS]")?, id("[SEP]")?);
    let template = TemplateProcessing::builder()
        .try_single("[CLS] $A [SEP]")
        .and_then(|b| b.try_pair("[CLS] $A [SEP] $B:1 [SEP]:1"))
        .map_err(|e| Error::InvalidArgument(format!("template: {e}")))?
        .special_tokens(vec![("[CLS]", cls), ("[SEP]", sep)])
        .build()
        .map_err(|e| Error::InvalidArgument(format!("template: {e}")))?;
    inner.with_post_processor(Some(template));
    Tokenizer::new(inner)
}

impl TokenBatch {
    /// Stacks encodings of equal length (padded) into a batch.
    pub fn from_encodings(encodings: &[Encoding], device: &Device) -> Result<Self> {
        let batch = encodings.len();
        let seq_len = encodings.first().map_or(0, |e| e.len());
        if let Some(e) = encodings.iter().find(|e| e.len() != seq_len) {
            return Err(Error::ShapeMismatch {
                name: "encoding length".into(),
                expected: vec![seq_len],
                actual: vec![e.len()],
            });
        }
        let stack = |f: fn(&Encoding) -> &[u32]| -> Result<Tensor> {
            let flat: Vec<u32> = encodings
                .iter()
                .flat_map(|e| f(e).iter().copied())
                .collect();
            Ok(Tensor::from_vec(flat, (batch, seq_len), device)?)
        };
        Ok(Self {
            input_ids: stack(Encoding::get_ids)?,
            token_type_ids: stack(Encoding::get_type_ids)?,
            attention_mask: stack(Encoding::get_attention_mask)?,
            offsets: encodings.iter().map(|e| e.get_offsets().to_vec()).collect(),
            word_ids: encodings
                .iter()
                .map(|e| e.get_word_ids().to_vec())
                .collect(),
            lengths: encodings
                .iter()
                .map(|e| e.get_attention_mask().iter().filter(|&&m| m == 1).count())
                .collect(),
        })
    }

    /// Number of sequences.
    pub fn batch_size(&self) -> usize {
        self.lengths.len()
    }
}
