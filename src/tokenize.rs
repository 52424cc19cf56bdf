//! Batch tokenization with padding, truncation and offsets, through the `tokenizers` crate, and
//! the model's special tokens as transformers finds them.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{Device, Tensor};
use tokenizers::{EncodeInput, Encoding, PaddingParams, PaddingStrategy, TruncationParams};

use crate::fs::{write_atomic, CONFIG_FILE, TOKENIZER_CONFIG_FILE, TOKENIZER_FILE};
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
    /// Shared between clones: a 250k-piece SentencePiece model takes tens of megabytes, and the
    /// trainer, the data loader and every evaluation hold a copy. Only
    /// [`Tokenizer::with_max_len`] changes it, copying it first when it is shared.
    inner: Arc<tokenizers::Tokenizer>,
    max_len: usize,
    special: SpecialTokens,
    /// One past the largest id (see `Tokenizer::vocab_size`).
    vocab_size: usize,
    /// The file that declares the special tokens (`tokenizer_config.json` when the model has one,
    /// else `tokenizer.json`), named in errors; `None` for a tokenizer built in memory.
    source: Option<PathBuf>,
    /// The model's `tokenizer_config.json`, written back by [`Tokenizer::save_pretrained`].
    config: serde_json::Map<String, serde_json::Value>,
}

/// A special token: its text and its id in the vocabulary.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpecialToken {
    /// The token's text, e.g. `[MASK]` or `<mask>`.
    pub token: String,
    /// Its id.
    pub id: u32,
}

/// The special tokens of a model's tokenizer.
///
/// [`Tokenizer::from_dir`] looks for each the way transformers does: `tokenizer_config.json`
/// (`mask_token`, `pad_token`, `cls_token`, `sep_token`, `unk_token`), then
/// `special_tokens_map.json`, then `config.json` (`pad_token_id`), then the `tokenizer.json`
/// itself: its padding section (pad) and its post-processor (the tokens it puts before and after
/// a sentence: cls and sep). A bare `tokenizer.json` declares no mask token; there, and for
/// tokens still not found, an added token flagged special and spelled as BERT (`[MASK]`,
/// `[PAD]`, `[UNK]`) or SentencePiece models (`<mask>`, `<pad>`, `<unk>`) spell it is taken.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SpecialTokens {
    /// The token masked positions are replaced with.
    pub mask: Option<SpecialToken>,
    /// The token batches are padded with.
    pub pad: Option<SpecialToken>,
    /// The token the post-processor puts first (`[CLS]`, `<s>`).
    pub cls: Option<SpecialToken>,
    /// The token the post-processor puts after each sentence (`[SEP]`, `</s>`).
    pub sep: Option<SpecialToken>,
    /// The unknown-word token.
    pub unk: Option<SpecialToken>,
    /// Every special id, sorted: the tokens above and every added token flagged special. Masking
    /// never selects them.
    pub ids: Vec<u32>,
}

/// Key of each special token in `tokenizer_config.json` / `special_tokens_map.json`, with the
/// spellings accepted as a last resort.
const SPECIAL_KEYS: [(&str, [&str; 2]); 5] = [
    ("mask_token", ["[MASK]", "<mask>"]),
    ("pad_token", ["[PAD]", "<pad>"]),
    ("cls_token", ["[CLS]", "<s>"]),
    ("sep_token", ["[SEP]", "</s>"]),
    ("unk_token", ["[UNK]", "<unk>"]),
];

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
    /// 1 where the token is a special token the post-processor added (`[CLS]`, `</s>`) or
    /// padding, 0 on tokens of the text: transformers' `special_tokens_mask`.
    pub special_tokens_mask: Vec<Vec<u32>>,
    /// Number of non-padding tokens of each row.
    pub lengths: Vec<usize>,
}

impl Tokenizer {
    /// Loads a `tokenizer.json` alone, with a maximum length of [`DEFAULT_MAX_LEN`]. Its special
    /// tokens come from the file itself (see [`SpecialTokens`]); use [`Tokenizer::from_dir`] for
    /// a model directory, whose other files may declare them.
    ///
    /// A file that is not a readable `tokenizer.json`, or whose model vocabulary gives one id to
    /// two tokens, is an [`Error::Checkpoint`] naming it (also from [`Tokenizer::from_dir`]).
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let inner = read_tokenizer_json(path)?;
        let special = find_special_tokens(&inner, &Declared::default(), path)?;
        Self::with_special(inner, special, Some(path.to_path_buf()))
    }

    /// Loads the tokenizer of a Hugging Face model directory: `tokenizer.json`, with the special
    /// tokens declared by `tokenizer_config.json`, `special_tokens_map.json` and `config.json`
    /// when present (see [`SpecialTokens`]).
    ///
    /// A token those files name that the vocabulary lacks is an [`Error::Checkpoint`] naming the
    /// file.
    pub fn from_dir(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref();
        let json_path = dir.join(TOKENIZER_FILE);
        let inner = read_tokenizer_json(&json_path)?;
        let mut declared = Declared::default();
        let mut source = json_path.clone();
        let mut tokenizer_config = serde_json::Map::new();
        for file in ["special_tokens_map.json", TOKENIZER_CONFIG_FILE] {
            let path = dir.join(file);
            if let Some(map) = read_json_object(&path)? {
                for (key, _) in SPECIAL_KEYS {
                    if let Some(token) = map.get(key).and_then(token_text) {
                        // tokenizer_config.json, read last, wins (transformers reads it first).
                        declared.tokens.insert(key, (token, path.clone()));
                    }
                }
                source = path;
                tokenizer_config = map;
            }
        }
        let config = dir.join(CONFIG_FILE);
        if let Some(map) = read_json_object(&config)? {
            declared.pad_id = map
                .get("pad_token_id")
                .and_then(serde_json::Value::as_u64)
                .and_then(|id| u32::try_from(id).ok())
                .map(|id| (id, config.clone()));
        }
        let special = find_special_tokens(&inner, &declared, &json_path)?;
        let mut tokenizer = Self::with_special(inner, special, Some(source))?;
        tokenizer.config = tokenizer_config;
        Ok(tokenizer)
    }

    /// Wraps a `tokenizers` tokenizer; its own padding and truncation settings are replaced.
    /// Special tokens come from the tokenizer alone, as for [`Tokenizer::from_file`].
    ///
    /// A model vocabulary that gives one id to two tokens is an [`Error::InvalidArgument`].
    pub fn new(inner: tokenizers::Tokenizer) -> Result<Self> {
        check_vocab_ids(&inner).map_err(Error::InvalidArgument)?;
        let special = find_special_tokens(&inner, &Declared::default(), Path::new("tokenizer"))?;
        Self::with_special(inner, special, None)
    }

    fn with_special(
        inner: tokenizers::Tokenizer,
        special: SpecialTokens,
        source: Option<PathBuf>,
    ) -> Result<Self> {
        let vocab_size = inner
            .get_vocab(true)
            .values()
            .max()
            .map_or(0, |&id| id as usize + 1);
        Self {
            inner: Arc::new(inner),
            max_len: DEFAULT_MAX_LEN,
            special,
            vocab_size,
            source,
            config: serde_json::Map::new(),
        }
        .with_max_len(DEFAULT_MAX_LEN)
    }

    /// Sets the maximum length of an encoded sequence, special tokens included.
    ///
    /// `max_len` must leave room for at least one token of text after the special tokens the
    /// post-processor adds to a sentence pair (3 for BERT, 4 for XLM-R): a shorter one is an
    /// [`Error::InvalidArgument`].
    pub fn with_max_len(mut self, max_len: usize) -> Result<Self> {
        // `tokenizers` subtracts the number of added special tokens from the maximum length
        // unchecked (in `with_truncation`, and for pairs again when encoding): a shorter
        // maximum panics there in a debug build and wraps to a huge length in a release one.
        let added = self.inner.get_post_processor().map_or(0, |p| {
            tokenizers::PostProcessor::added_tokens(p, false)
                .max(tokenizers::PostProcessor::added_tokens(p, true))
        });
        if max_len <= added {
            return Err(Error::InvalidArgument(format!(
                "max_len {max_len} leaves no room for text: the tokenizer adds {added} special \
                 tokens to a sentence pair"
            )));
        }
        // Without a pad token nothing is padded: a batch that needs padding is an error then
        // (see `Tokenizer::pad_token`), never padding with whatever id 0 is.
        let padding = self.special.pad.as_ref().map(|pad| PaddingParams {
            strategy: PaddingStrategy::BatchLongest,
            pad_id: pad.id,
            pad_token: pad.token.clone(),
            ..Default::default()
        });
        let inner = Arc::make_mut(&mut self.inner);
        guard(|| {
            inner
                .with_truncation(Some(TruncationParams {
                    max_length: max_len,
                    ..Default::default()
                }))
                .map(|inner| {
                    inner.with_padding(padding);
                })
        })?;
        self.max_len = max_len;
        Ok(self)
    }

    /// The special tokens (see [`SpecialTokens`] for where they are looked for).
    pub fn special_tokens(&self) -> &SpecialTokens {
        &self.special
    }

    /// The mask token, or an [`Error::Checkpoint`] naming the file that should declare it.
    pub fn mask_token(&self) -> Result<&SpecialToken> {
        self.special
            .mask
            .as_ref()
            .ok_or_else(|| self.missing("mask", "masking tokens for the MLM objective"))
    }

    /// The padding token, or an [`Error::Checkpoint`] naming the file that should declare it.
    pub fn pad_token(&self) -> Result<&SpecialToken> {
        self.special
            .pad
            .as_ref()
            .ok_or_else(|| self.missing("pad", "padding a batch of sentences of unequal length"))
    }

    fn missing(&self, what: &str, purpose: &str) -> Error {
        let reason = format!(
            "the tokenizer has no {what} token ({purpose} needs one); declare `{what}_token` in \
             tokenizer_config.json"
        );
        match &self.source {
            Some(path) => Error::Checkpoint {
                path: path.clone(),
                reason,
            },
            None => Error::InvalidArgument(reason),
        }
    }

    /// The maximum encoded length, special tokens included.
    pub fn max_len(&self) -> usize {
        self.max_len
    }

    /// The underlying `tokenizers` tokenizer.
    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }

    /// Size of the id space: one past the largest id, added tokens included (the rows of
    /// the word-embedding table it needs).
    pub fn vocab_size(&self) -> usize {
        self.vocab_size
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
            .map(|t| guard(|| self.inner.encode(t.as_ref(), true)))
            .collect()
    }

    /// Pads encodings to the longest one and stacks them into a batch.
    pub fn pad_batch(&self, mut encodings: Vec<Encoding>, device: &Device) -> Result<TokenBatch> {
        if encodings.is_empty() {
            return Err(Error::InvalidArgument("cannot pad an empty batch".into()));
        }
        if let Some(params) = self.inner.get_padding() {
            guard(|| tokenizers::pad_encodings(&mut encodings, params))?;
        }
        self.stack(&encodings, device)
    }

    /// Pads `encodings`, rows of a larger batch whose encodings are `lengths` tokens long (all
    /// of them, these rows' included), as [`Tokenizer::pad_batch`] pads them in that whole
    /// batch: to its longest (rounded as the padding settings say), and with the missing
    /// pad-token error when its lengths differ.
    pub(crate) fn pad_rows_of(
        &self,
        mut encodings: Vec<Encoding>,
        lengths: impl Iterator<Item = usize> + Clone,
        device: &Device,
    ) -> Result<TokenBatch> {
        if encodings.is_empty() {
            return Err(Error::InvalidArgument("cannot pad an empty batch".into()));
        }
        let longest = lengths.clone().max().unwrap_or(0);
        if lengths.clone().any(|n| n != longest) {
            self.pad_token()?;
        }
        if let Some(params) = self.inner.get_padding() {
            let mut params = params.clone();
            if matches!(params.strategy, PaddingStrategy::BatchLongest) {
                params.strategy = PaddingStrategy::Fixed(longest);
            }
            guard(|| tokenizers::pad_encodings(&mut encodings, &params))?;
        }
        self.stack(&encodings, device)
    }

    /// Stacks encodings, with the missing-pad-token error when their lengths differ.
    fn stack(&self, encodings: &[Encoding], device: &Device) -> Result<TokenBatch> {
        let first = encodings.first().map_or(0, Encoding::len);
        if encodings.iter().any(|e| e.len() != first) {
            self.pad_token()?;
        }
        TokenBatch::from_encodings(encodings, device)
    }

    fn encode_inputs(&self, inputs: Vec<EncodeInput>, device: &Device) -> Result<TokenBatch> {
        if inputs.is_empty() {
            return Err(Error::InvalidArgument(
                "cannot encode an empty batch".into(),
            ));
        }
        let encodings = guard(|| self.inner.encode_batch(inputs, true))?;
        self.stack(&encodings, device)
    }

    /// Writes the tokenizer as `tokenizer.json`.
    pub fn save(&self, path: impl AsRef<Path>) -> Result<()> {
        let path = path.as_ref();
        let json = self.inner.to_string(true).map_err(Error::Tokenizer)?;
        write_atomic(path, json.as_bytes())
    }

    /// Writes `tokenizer.json` and `tokenizer_config.json` to `dir`: the model's own
    /// `tokenizer_config.json` (when it was loaded with [`Tokenizer::from_dir`]) with the special
    /// tokens set to the ones this tokenizer uses, so that [`Tokenizer::from_dir`] and
    /// transformers' `AutoTokenizer` find the same ones again. Each file is written atomically.
    pub fn save_pretrained(&self, dir: impl AsRef<Path>) -> Result<()> {
        let dir = dir.as_ref();
        self.save(dir.join(TOKENIZER_FILE))?;
        let mut config = self.config.clone();
        config
            .entry("tokenizer_class")
            .or_insert_with(|| "PreTrainedTokenizerFast".into());
        let s = &self.special;
        for ((key, _), token) in SPECIAL_KEYS
            .iter()
            .zip([&s.mask, &s.pad, &s.cls, &s.sep, &s.unk])
        {
            if let Some(token) = token {
                config.insert((*key).to_string(), token.token.clone().into());
            }
        }
        // Serialising a JSON map cannot fail.
        let json = serde_json::to_string_pretty(&config).expect("JSON map serialises");
        write_atomic(&dir.join(TOKENIZER_CONFIG_FILE), json.as_bytes())
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
            special_tokens_mask: encodings
                .iter()
                .map(|e| e.get_special_tokens_mask().to_vec())
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

fn read_tokenizer_json(path: &Path) -> Result<tokenizers::Tokenizer> {
    if !path.is_file() {
        return Err(Error::Checkpoint {
            path: path.to_path_buf(),
            reason: "no such file: the model directory has no tokenizer".into(),
        });
    }
    let inner =
        guard(|| tokenizers::Tokenizer::from_file(path)).map_err(|e| Error::Checkpoint {
            path: path.to_path_buf(),
            reason: format!("not a readable tokenizer.json ({e})"),
        })?;
    check_vocab_ids(&inner).map_err(|reason| Error::Checkpoint {
        path: path.to_path_buf(),
        reason,
    })?;
    Ok(inner)
}

/// Refuses a model vocabulary that gives one id to two tokens: `tokenizers` loads it, but the
/// id means either token, and writing it back keeps only one of them, so the saved tokenizer is
/// not the one that was loaded (and may lack its own special tokens).
fn check_vocab_ids(inner: &tokenizers::Tokenizer) -> std::result::Result<(), String> {
    let vocab = tokenizers::Model::get_vocab(inner.get_model());
    let mut by_id: std::collections::HashMap<u32, &str> =
        std::collections::HashMap::with_capacity(vocab.len());
    for (token, &id) in &vocab {
        if let Some(other) = by_id.insert(id, token) {
            let (a, b) = if other < token.as_str() {
                (other, token.as_str())
            } else {
                (token.as_str(), other)
            };
            return Err(format!(
                "the model's vocabulary gives id {id} to both `{a}` and `{b}`"
            ));
        }
    }
    Ok(())
}

/// Runs a call into the `tokenizers` crate, turning a panic inside it into an
/// [`Error::Tokenizer`]: a bad file must never abort the caller, and some make the crate panic
/// instead of returning an error. Upstream bugs found by fuzzing (`tokenizers` 0.22.2): parsing
/// a `tokenizer.json` whose `decoder` object is malformed or cut off panics (an `expect` in
/// `decoders/mod.rs`); a `TemplateProcessing` whose template names a special token missing from
/// its `special_tokens` table loads, then panics on every encode (an unchecked map index in
/// `processors/template.rs`); `with_truncation` subtracts the number of added special tokens
/// from the maximum length unchecked (`Tokenizer::with_max_len` refuses such lengths first).
pub(crate) fn guard<T>(f: impl FnOnce() -> tokenizers::Result<T>) -> Result<T> {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
        Ok(result) => result.map_err(Error::Tokenizer),
        Err(payload) => {
            let message = payload
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| payload.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "no message".into());
            Err(Error::Tokenizer(
                format!("the tokenizers crate panicked: {message}").into(),
            ))
        }
    }
}

/// The JSON object in `path`, `None` when the file does not exist.
fn read_json_object(path: &Path) -> Result<Option<serde_json::Map<String, serde_json::Value>>> {
    if !path.is_file() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(path).map_err(Error::io(path))?;
    match serde_json::from_str(&text).map_err(|source| Error::Json {
        path: path.to_path_buf(),
        source,
    })? {
        serde_json::Value::Object(map) => Ok(Some(map)),
        _ => Err(Error::Checkpoint {
            path: path.to_path_buf(),
            reason: "expected a JSON object".into(),
        }),
    }
}

/// A special token as transformers writes it: a string, or an `AddedToken` object with `content`.
fn token_text(value: &serde_json::Value) -> Option<String> {
    match value {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Object(o) => o.get("content")?.as_str().map(str::to_owned),
        _ => None,
    }
}

/// Special tokens declared outside `tokenizer.json`, with the file that declared each.
#[derive(Default)]
struct Declared {
    tokens: std::collections::HashMap<&'static str, (String, PathBuf)>,
    pad_id: Option<(u32, PathBuf)>,
}

fn find_special_tokens(
    inner: &tokenizers::Tokenizer,
    declared: &Declared,
    json_path: &Path,
) -> Result<SpecialTokens> {
    let added: Vec<(u32, tokenizers::AddedToken)> =
        inner.get_added_tokens_decoder().into_iter().collect();
    let lookup = |token: &str, path: &Path, key: &str| -> Result<SpecialToken> {
        let id = inner.token_to_id(token).ok_or_else(|| Error::Checkpoint {
            path: path.to_path_buf(),
            reason: format!("{key} `{token}` is not in the tokenizer's vocabulary"),
        })?;
        Ok(SpecialToken {
            token: token.to_owned(),
            id,
        })
    };
    let by_id = |id: u32, path: &Path, key: &str| -> Result<SpecialToken> {
        let token = inner.id_to_token(id).ok_or_else(|| Error::Checkpoint {
            path: path.to_path_buf(),
            reason: format!("{key} {id} is not in the tokenizer's vocabulary"),
        })?;
        Ok(SpecialToken { token, id })
    };
    let spelled = |spellings: &[&str; 2]| {
        let mut hits: Vec<&(u32, tokenizers::AddedToken)> = added
            .iter()
            .filter(|(_, t)| t.special && spellings.contains(&t.content.as_str()))
            .collect();
        hits.sort_by_key(|(id, _)| *id);
        hits.first().map(|(id, t)| SpecialToken {
            token: t.content.clone(),
            id: *id,
        })
    };
    let (template_cls, template_sep) = template_specials(inner)?;
    let mut found: Vec<Option<SpecialToken>> = Vec::with_capacity(SPECIAL_KEYS.len());
    for (key, spellings) in SPECIAL_KEYS {
        let mut token = match declared.tokens.get(key) {
            Some((text, path)) => Some(lookup(text, path, key)?),
            None => None,
        };
        if token.is_none() && key == "pad_token" {
            if let Some((id, path)) = &declared.pad_id {
                token = Some(by_id(*id, path, "pad_token_id")?);
            }
            if token.is_none() {
                if let Some(p) = inner.get_padding() {
                    token = Some(by_id(p.pad_id, json_path, "padding.pad_id")?);
                }
            }
        }
        if token.is_none() && key == "cls_token" {
            token = template_cls.clone();
        }
        if token.is_none() && key == "sep_token" {
            token = template_sep.clone();
        }
        found.push(token.or_else(|| spelled(&spellings)));
    }
    let mut ids: Vec<u32> = added
        .iter()
        .filter(|(_, t)| t.special)
        .map(|(id, _)| *id)
        .chain(found.iter().flatten().map(|t| t.id))
        .collect();
    ids.sort_unstable();
    ids.dedup();
    let mut found = found.into_iter();
    let mut next = || found.next().flatten();
    Ok(SpecialTokens {
        mask: next(),
        pad: next(),
        cls: next(),
        sep: next(),
        unk: next(),
        ids,
    })
}

/// The tokens the post-processor puts before a single sentence (cls) and right after it (sep),
/// read from its serialised form (`TemplateProcessing`, `BertProcessing`, `RobertaProcessing`, or
/// a `Sequence` holding one of them).
fn template_specials(
    inner: &tokenizers::Tokenizer,
) -> Result<(Option<SpecialToken>, Option<SpecialToken>)> {
    use serde_json::Value;
    let Some(pp) = inner.get_post_processor() else {
        return Ok((None, None));
    };
    let value = serde_json::to_value(pp).map_err(|e| {
        Error::InvalidArgument(format!("cannot read the tokenizer's post-processor: {e}"))
    })?;
    let token = |text: Option<&str>| -> Option<SpecialToken> {
        let text = text?;
        Some(SpecialToken {
            token: text.to_owned(),
            id: inner.token_to_id(text)?,
        })
    };
    fn walk(v: &Value) -> Option<(Option<String>, Option<String>)> {
        match v.get("type")?.as_str()? {
            "BertProcessing" | "RobertaProcessing" => {
                let name = |k: &str| v.get(k)?.get(0)?.as_str().map(str::to_owned);
                Some((name("cls"), name("sep")))
            }
            "TemplateProcessing" => {
                let single = v.get("single")?.as_array()?;
                let special = |p: &Value| {
                    p.get("SpecialToken")?
                        .get("id")?
                        .as_str()
                        .map(str::to_owned)
                };
                let seq = single.iter().position(|p| p.get("Sequence").is_some())?;
                let cls = single[..seq].first().and_then(special);
                let sep = single.get(seq + 1).and_then(special);
                Some((cls, sep))
            }
            "Sequence" => v.get("processors")?.as_array()?.iter().find_map(walk),
            _ => None,
        }
    }
    let (cls, sep) = walk(&value).unwrap_or((None, None));
    Ok((token(cls.as_deref()), token(sep.as_deref())))
}
