//! Batches of tokenized sentence pairs with anchor spans, in a seeded order that can be resumed.

use std::sync::Arc;

use candle_core::Device;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use tokenizers::Encoding;

use super::parallel::{AnchorWord, ParallelCorpus, RawPair};
use crate::align::anchors::span_of;
use crate::pooling::TokenSpan;
use crate::tokenize::{TokenBatch, Tokenizer};
use crate::{Error, Result};

/// Finds the anchor word pair of a sentence pair from its text and tokenization, for formats
/// that do not carry anchors (plain parallel text). Spans are inclusive, `[CLS]` at 0.
pub trait AnchorFinder: Send + Sync {
    /// The spans of one anchor word pair, or `None` if the pair has none.
    fn find(
        &self,
        src: &str,
        src_tokens: &Encoding,
        tgt: &str,
        tgt_tokens: &Encoding,
    ) -> Option<(TokenSpan, TokenSpan)>;
}

/// Options of a [`PairLoader`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LoaderConfig {
    /// Pairs per batch.
    pub batch_size: usize,
    /// Seed of the order of pairs (a new permutation every epoch).
    pub seed: u64,
    /// Shuffle pairs (otherwise file order).
    pub shuffle: bool,
    /// Skip and count malformed lines instead of failing on the first.
    pub skip_bad_lines: bool,
    /// Keep only pairs with an anchor word pair (needed by the word level of ML-CTL).
    pub require_anchors: bool,
}

impl Default for LoaderConfig {
    fn default() -> Self {
        Self {
            batch_size: 64,
            seed: 0,
            shuffle: true,
            skip_bad_lines: false,
            require_anchors: true,
        }
    }
}

/// Where a loader is in its stream: epoch and position in that epoch's permutation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct LoaderCursor {
    /// 0-based epoch.
    pub epoch: u64,
    /// Pairs of this epoch already consumed (used or skipped).
    pub position: usize,
}

/// Counts of pairs used and set aside.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct LoaderStats {
    /// Pairs put into batches.
    pub used: u64,
    /// Malformed lines skipped (`skip_bad_lines`).
    pub bad_lines: u64,
    /// Pairs dropped because truncation to `max_len` cut their anchor.
    pub anchor_truncated: u64,
    /// Pairs dropped because no anchor was found (`require_anchors`).
    pub no_anchor: u64,
}

/// A batch of sentence pairs.
///
/// # Shapes
/// - `src`, `tgt`: [`TokenBatch`]es of `[batch, seq_len]` (each padded to its own longest)
/// - `anchors`: `batch` span pairs (source, target) when the loader requires anchors
#[derive(Debug, Clone)]
pub struct PairBatch {
    /// Source sentences.
    pub src: TokenBatch,
    /// Target sentences.
    pub tgt: TokenBatch,
    /// Inclusive token spans of the anchor words, source then target.
    pub anchors: Option<Vec<(TokenSpan, TokenSpan)>>,
}

impl PairBatch {
    /// Number of pairs.
    pub fn len(&self) -> usize {
        self.src.batch_size()
    }

    /// True for a batch without pairs (never produced by a loader).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Source spans of the anchors.
    pub fn src_spans(&self) -> Option<Vec<TokenSpan>> {
        self.anchors
            .as_ref()
            .map(|a| a.iter().map(|p| p.0).collect())
    }

    /// Target spans of the anchors.
    pub fn tgt_spans(&self) -> Option<Vec<TokenSpan>> {
        self.anchors
            .as_ref()
            .map(|a| a.iter().map(|p| p.1).collect())
    }
}

/// Reads a [`ParallelCorpus`] in batches, endlessly (epoch after epoch), tokenizing, checking
/// anchor spans and dropping pairs whose anchor truncation cut.
///
/// The order is a seeded permutation per epoch; [`PairLoader::cursor`] and
/// [`PairLoader::set_cursor`] save and restore the position exactly, so a resumed run reads the
/// same batches as an uninterrupted one.
pub struct PairLoader {
    corpus: ParallelCorpus,
    tokenizer: Tokenizer,
    config: LoaderConfig,
    anchor_finder: Option<Arc<dyn AnchorFinder>>,
    cursor: LoaderCursor,
    order: Vec<u32>,
    stats: LoaderStats,
}

impl std::fmt::Debug for PairLoader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PairLoader")
            .field("pairs", &self.corpus.len())
            .field("config", &self.config)
            .field("cursor", &self.cursor)
            .field("stats", &self.stats)
            .finish()
    }
}

enum Verdict {
    Use(Box<(Encoding, Encoding)>, Option<(TokenSpan, TokenSpan)>),
    Truncated,
    NoAnchor,
}

impl PairLoader {
    /// A loader over `corpus`, tokenizing with `tokenizer` (its `max_len` truncates).
    pub fn new(corpus: ParallelCorpus, tokenizer: Tokenizer, config: LoaderConfig) -> Result<Self> {
        if config.batch_size == 0 {
            return Err(Error::InvalidArgument(
                "batch size must be at least 1".into(),
            ));
        }
        if corpus.is_empty() {
            return Err(Error::InvalidArgument(format!(
                "the corpus {:?} has no lines",
                corpus.format()
            )));
        }
        let mut loader = Self {
            corpus,
            tokenizer,
            config,
            anchor_finder: None,
            cursor: LoaderCursor::default(),
            order: Vec::new(),
            stats: LoaderStats::default(),
        };
        loader.order = loader.permutation(0);
        Ok(loader)
    }

    /// Finds anchors with `finder` for pairs whose format carries none.
    pub fn with_anchor_finder(mut self, finder: Arc<dyn AnchorFinder>) -> Self {
        self.anchor_finder = Some(finder);
        self
    }

    /// The position in the stream.
    pub fn cursor(&self) -> LoaderCursor {
        self.cursor
    }

    /// Moves to a saved position.
    pub fn set_cursor(&mut self, cursor: LoaderCursor) -> Result<()> {
        if cursor.position > self.corpus.len() {
            return Err(Error::InvalidArgument(format!(
                "cursor position {} beyond a corpus of {} pairs",
                cursor.position,
                self.corpus.len()
            )));
        }
        self.order = self.permutation(cursor.epoch);
        self.cursor = cursor;
        Ok(())
    }

    /// Counts so far.
    pub fn stats(&self) -> LoaderStats {
        self.stats
    }

    /// Restores counts saved with a cursor.
    pub fn set_stats(&mut self, stats: LoaderStats) {
        self.stats = stats;
    }

    /// The options.
    pub fn config(&self) -> &LoaderConfig {
        &self.config
    }

    /// The tokenizer.
    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    /// Number of lines in the corpus.
    pub fn corpus_len(&self) -> usize {
        self.corpus.len()
    }

    fn permutation(&self, epoch: u64) -> Vec<u32> {
        let mut order: Vec<u32> = (0..self.corpus.len() as u32).collect();
        if self.config.shuffle {
            let mut rng = ChaCha8Rng::seed_from_u64(
                self.config
                    .seed
                    .wrapping_add(epoch.wrapping_mul(0x9E37_79B9_7F4A_7C15)),
            );
            order.shuffle(&mut rng);
        }
        order
    }

    /// The next batch of `batch_size` usable pairs, wrapping to a new epoch at the end of the
    /// corpus. Fails if a whole epoch passes without a usable pair.
    pub fn next_batch(&mut self, device: &Device) -> Result<PairBatch> {
        let (mut src, mut tgt, mut anchors) = (Vec::new(), Vec::new(), Vec::new());
        let mut since_last_use = 0usize;
        while src.len() < self.config.batch_size {
            if self.cursor.position == self.order.len() {
                self.cursor = LoaderCursor {
                    epoch: self.cursor.epoch + 1,
                    position: 0,
                };
                self.order = self.permutation(self.cursor.epoch);
            }
            if since_last_use > self.corpus.len() {
                return Err(Error::InvalidArgument(format!(
                    "no usable pair in a whole epoch ({:?}): check the anchors, max_len and the data",
                    self.stats
                )));
            }
            let index = self.order[self.cursor.position] as usize;
            self.cursor.position += 1;
            since_last_use += 1;
            let verdict = self.corpus.get(index).and_then(|pair| self.examine(&pair));
            match verdict {
                Ok(Verdict::Use(encodings, a)) => {
                    let (s, t) = *encodings;
                    src.push(s);
                    tgt.push(t);
                    anchors.push(a);
                    self.stats.used += 1;
                    since_last_use = 0;
                }
                Ok(Verdict::Truncated) => self.stats.anchor_truncated += 1,
                Ok(Verdict::NoAnchor) => self.stats.no_anchor += 1,
                Err(Error::Data { .. }) if self.config.skip_bad_lines => self.stats.bad_lines += 1,
                Err(e) => return Err(e),
            }
        }
        let anchors = if self.config.require_anchors {
            Some(
                anchors
                    .into_iter()
                    .map(|a| a.expect("required anchors are present"))
                    .collect(),
            )
        } else {
            None
        };
        Ok(PairBatch {
            src: self.tokenizer.pad_batch(src, device)?,
            tgt: self.tokenizer.pad_batch(tgt, device)?,
            anchors,
        })
    }

    fn examine(&self, pair: &RawPair) -> Result<Verdict> {
        let bad = |reason: String| Error::Data {
            path: pair.origin.0.clone(),
            line: pair.origin.1,
            reason,
        };
        if pair.src.is_empty() || pair.tgt.is_empty() {
            return Err(bad("empty sentence".into()));
        }
        let mut encodings = self.tokenizer.encode_each(&[&pair.src, &pair.tgt])?;
        let (tgt_enc, src_enc) = (encodings.pop().expect("two"), encodings.pop().expect("two"));
        if !self.config.require_anchors {
            return Ok(Verdict::Use(Box::new((src_enc, tgt_enc)), None));
        }
        let spans = match &pair.anchors {
            Some((s, t)) => Some((s.span, t.span)),
            None => match &self.anchor_finder {
                Some(finder) => finder.find(&pair.src, &src_enc, &pair.tgt, &tgt_enc),
                None => {
                    return Err(bad(
                        "the format has no anchors and the loader has no anchor finder".into(),
                    ))
                }
            },
        };
        let Some((s, t)) = spans else {
            return Ok(Verdict::NoAnchor);
        };
        // The last position holds [SEP]: a span must end before it.
        for (span, enc, side) in [(s, &src_enc, "source"), (t, &tgt_enc, "target")] {
            if span.end + 1 >= enc.len() {
                if !enc.get_overflowing().is_empty() {
                    return Ok(Verdict::Truncated);
                }
                return Err(bad(format!(
                    "{side} anchor span {}..={} is outside the sentence's {} tokens",
                    span.start,
                    span.end,
                    enc.len()
                )));
            }
        }
        // Spans read from a file are only right for the tokenizer that made them.
        if let Some((src_word, tgt_word)) = &pair.anchors {
            for (anchor, text, enc, side) in [
                (src_word, &pair.src, &src_enc, "source"),
                (tgt_word, &pair.tgt, &tgt_enc, "target"),
            ] {
                check_span(anchor, text, enc).map_err(|reason| bad(format!("{side} {reason}")))?;
            }
        }
        Ok(Verdict::Use(Box::new((src_enc, tgt_enc)), Some((s, t))))
    }
}

/// Checks that `anchor.span` holds exactly the tokens this tokenization gives an occurrence of
/// `anchor.word` in `text` (case-insensitively); otherwise says where the word is.
fn check_span(anchor: &AnchorWord, text: &str, enc: &Encoding) -> std::result::Result<(), String> {
    let word = anchor.word.trim().to_lowercase();
    let span = anchor.span;
    let found: Vec<TokenSpan> = occurrences(text, &word)
        .filter_map(|bytes| span_of(enc.get_offsets(), enc.get_word_ids(), bytes))
        .collect();
    if found.contains(&span) {
        return Ok(());
    }
    let at = match found.as_slice() {
        [] => "does not occur in the sentence".to_string(),
        spans => format!(
            "is at tokens {} under this tokenizer",
            spans
                .iter()
                .map(|s| format!("{}..={}", s.start, s.end))
                .collect::<Vec<_>>()
                .join(", ")
        ),
    };
    Err(format!(
        "anchor `{}` is given at tokens {}..={} but {at}: were the spans made with another \
         tokenizer?",
        anchor.word, span.start, span.end
    ))
}

/// Byte ranges of the case-insensitive occurrences of `lowercase_word` in `text`.
fn occurrences<'a>(
    text: &'a str,
    lowercase_word: &'a str,
) -> impl Iterator<Item = (usize, usize)> + 'a {
    let len = lowercase_word.len();
    text.char_indices().filter_map(move |(start, _)| {
        let candidate = text.get(start..start + len)?;
        (len > 0 && candidate.to_lowercase() == lowercase_word).then_some((start, start + len))
    })
}
