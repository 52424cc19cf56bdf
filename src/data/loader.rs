//! Batches of tokenized sentence pairs with anchor spans, in a seeded order that can be resumed.

use std::collections::HashMap;
use std::ops::Range;
use std::sync::Arc;

use candle_core::Device;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use tokenizers::Encoding;

use super::parallel::{AnchorWord, ParallelCorpus, RawPair};
use crate::align::anchors::span_of;
use crate::dist::{sum_counts, Collective};
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

/// A usable pair's encodings (source, target) and anchor spans.
type Usable = (Box<(Encoding, Encoding)>, Option<(TokenSpan, TokenSpan)>);

/// Words per pair in the verdicts ranks exchange: the verdict code, then the source and target
/// lengths of a usable pair.
const VERDICT_WORDS: usize = 3;
/// Verdict codes (0: not examined by this rank).
const USED: u64 = 1;
const TRUNCATED: u64 = 2;
const NO_ANCHOR: u64 = 3;
const BAD_LINE: u64 = 4;
const FAILED: u64 = 5;

/// One pair of the stream taken for a batch: its index in the corpus and the cursor after it.
#[derive(Debug, Clone, Copy)]
struct Candidate {
    index: usize,
    after: LoaderCursor,
}

/// What the ranks know of a global batch being gathered.
#[derive(Default)]
struct Scan {
    /// The usable pairs so far, in order: index in the corpus, source and target lengths.
    usable: Vec<(usize, (usize, usize))>,
    /// Those this rank examined, by position in `usable`.
    mine: HashMap<usize, Usable>,
    /// Pairs consumed since the last usable one.
    since_last_use: usize,
}

/// Block `part` of `n` items cut in `parts`: `⌊part·n/parts⌋ .. ⌊(part+1)·n/parts⌋`.
fn block(n: usize, part: usize, parts: usize) -> Range<usize> {
    let at = |p: usize| (p as u128 * n as u128 / parts as u128) as usize;
    at(part)..at(part + 1)
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
        self.next_rows(None, device)
    }

    /// This rank's rows of the next global batch of `batch_size` pairs, rows
    /// [`PairLoader::shard_rows`]`(rank, world_size)` of the batch [`PairLoader::next_batch`]
    /// returns in one process, as the same tensors (padded to the whole batch's longest) and
    /// anchors. The cursor and the counts advance by the whole batch, the same on every rank.
    ///
    /// Every rank of `collective` makes this call in step, with a loader built the same way
    /// (corpus, tokenizer, configuration, cursor). A rank reads and tokenizes only about its
    /// share of the pairs: the pairs a batch needs are taken in windows, rank `r` examines block
    /// `r` of each window, and one all-reduce per window gives every rank every pair's verdict
    /// (usable or why not, and its lengths). When pairs are dropped, rows move to the next
    /// rank's block: a rank then reads the few of its rows another rank examined a second time.
    /// `device` holds the batch and the collective's tensors.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidArgument`] when the global batch leaves a rank without rows; the
    /// errors of [`PairLoader::next_batch`], on every rank; the collective's errors.
    pub fn next_shard(
        &mut self,
        collective: &dyn Collective,
        device: &Device,
    ) -> Result<PairBatch> {
        self.next_rows(Some(collective), device)
    }

    /// The rows of the global batch rank `rank` of `world_size` holds:
    /// `⌊rank·B/W⌋ .. ⌊(rank+1)·B/W⌋` for a `batch_size` of `B`. [`Error::InvalidArgument`]
    /// for a rank outside the world, or one the batch leaves without rows (`B < W`).
    pub fn shard_rows(&self, rank: usize, world_size: usize) -> Result<Range<usize>> {
        let batch = self.config.batch_size;
        if rank >= world_size {
            return Err(Error::InvalidArgument(format!(
                "rank {rank} is outside a world of {world_size}"
            )));
        }
        let rows = block(batch, rank, world_size);
        if rows.is_empty() {
            return Err(Error::InvalidArgument(format!(
                "a global batch of {batch} pairs leaves rank {rank} of {world_size} without rows"
            )));
        }
        Ok(rows)
    }

    /// The rows `group`'s rank holds of the next global batch (all of them without a group).
    fn next_rows(&mut self, group: Option<&dyn Collective>, device: &Device) -> Result<PairBatch> {
        let (rank, world) = group.map_or((0, 1), |c| (c.rank(), c.world_size()));
        let rows = self.shard_rows(rank, world)?;
        let batch = self.config.batch_size;
        let mut scan = Scan::default();
        while scan.usable.len() < batch {
            let start = self.cursor;
            let candidates = self.take_candidates(batch - scan.usable.len());
            let mine = block(candidates.len(), rank, world);
            let (local, examined) = self.examine_block(&candidates, mine);
            let verdicts = match group {
                Some(c) => sum_counts(c, device, &local)?,
                None => local,
            };
            self.apply_verdicts(start, &candidates, &verdicts, examined, &mut scan)?;
        }
        self.assemble(scan, rows, device)
    }

    /// The next `n` pairs of the stream, wrapping to a new epoch at the end of the corpus; the
    /// cursor moves past them.
    fn take_candidates(&mut self, n: usize) -> Vec<Candidate> {
        (0..n)
            .map(|_| {
                if self.cursor.position >= self.order.len() {
                    self.cursor = LoaderCursor {
                        epoch: self.cursor.epoch + 1,
                        position: 0,
                    };
                    self.order = self.permutation(self.cursor.epoch);
                }
                let index = self.order[self.cursor.position] as usize;
                self.cursor.position += 1;
                Candidate {
                    index,
                    after: self.cursor,
                }
            })
            .collect()
    }

    /// Moves back to `cursor` (a position already passed, after an error).
    fn rewind(&mut self, cursor: LoaderCursor) {
        if cursor.epoch != self.cursor.epoch {
            self.order = self.permutation(cursor.epoch);
        }
        self.cursor = cursor;
    }

    /// Examines the candidates `mine` of a window: their verdicts, [`VERDICT_WORDS`] words per
    /// candidate of the whole window (zeros outside `mine`), and the usable pairs among them by
    /// position in the window.
    fn examine_block(
        &mut self,
        candidates: &[Candidate],
        mine: Range<usize>,
    ) -> (Vec<u64>, HashMap<usize, Usable>) {
        let mut words = vec![0u64; VERDICT_WORDS * candidates.len()];
        let mut usable = HashMap::new();
        for k in mine {
            let verdict = self.examine_index(candidates[k].index);
            let word = &mut words[VERDICT_WORDS * k..VERDICT_WORDS * (k + 1)];
            match verdict {
                Ok(Verdict::Use(encodings, spans)) => {
                    let (s, t) = (encodings.0.len() as u64, encodings.1.len() as u64);
                    word.copy_from_slice(&[USED, s, t]);
                    usable.insert(k, (encodings, spans));
                }
                Ok(Verdict::Truncated) => word[0] = TRUNCATED,
                Ok(Verdict::NoAnchor) => word[0] = NO_ANCHOR,
                Err(Error::Data { .. }) if self.config.skip_bad_lines => word[0] = BAD_LINE,
                Err(_) => word[0] = FAILED,
            }
        }
        (words, usable)
    }

    fn examine_index(&mut self, index: usize) -> Result<Verdict> {
        let pair = self.corpus.get(index)?;
        self.examine(&pair)
    }

    /// Goes through a window's verdicts in stream order as one loader reading the pairs one by
    /// one would: counts, the usable pairs (with the ones this rank examined), and the first
    /// failure (the cursor then stays just past the pair that failed).
    fn apply_verdicts(
        &mut self,
        start: LoaderCursor,
        candidates: &[Candidate],
        verdicts: &[u64],
        mut examined: HashMap<usize, Usable>,
        scan: &mut Scan,
    ) -> Result<()> {
        for (k, (candidate, verdict)) in candidates
            .iter()
            .zip(verdicts.chunks(VERDICT_WORDS))
            .enumerate()
        {
            if scan.since_last_use > self.corpus.len() {
                self.rewind(k.checked_sub(1).map_or(start, |p| candidates[p].after));
                return Err(Error::InvalidArgument(format!(
                    "no usable pair in a whole epoch ({:?}): check the anchors, max_len and the data",
                    self.stats
                )));
            }
            scan.since_last_use += 1;
            match verdict[0] {
                USED => {
                    if let Some(pair) = examined.remove(&k) {
                        scan.mine.insert(scan.usable.len(), pair);
                    }
                    let lengths = (verdict[1] as usize, verdict[2] as usize);
                    scan.usable.push((candidate.index, lengths));
                    self.stats.used += 1;
                    scan.since_last_use = 0;
                }
                TRUNCATED => self.stats.anchor_truncated += 1,
                NO_ANCHOR => self.stats.no_anchor += 1,
                BAD_LINE => self.stats.bad_lines += 1,
                code => {
                    self.rewind(candidate.after);
                    return Err(self.failure(candidate.index, code));
                }
            }
        }
        Ok(())
    }

    /// The error of the pair at corpus `index`, which a rank reported as failing (`code`): the
    /// examination is repeated here, so every rank returns the same error.
    fn failure(&mut self, index: usize, code: u64) -> Error {
        match (code, self.examine_index(index)) {
            (FAILED, Err(e)) => e,
            _ => Error::Distributed(format!(
                "the ranks disagree about pair {index} of the corpus (verdict {code}): do they \
                 read the same corpus with the same tokenizer and loader configuration?"
            )),
        }
    }

    /// Pads rows `rows` of a scanned global batch, reading again those another rank examined.
    fn assemble(
        &mut self,
        mut scan: Scan,
        rows: Range<usize>,
        device: &Device,
    ) -> Result<PairBatch> {
        let (mut src, mut tgt, mut anchors) = (Vec::new(), Vec::new(), Vec::new());
        for row in rows {
            let (encodings, spans) = match scan.mine.remove(&row) {
                Some(pair) => pair,
                None => match self.examine_index(scan.usable[row].0)? {
                    Verdict::Use(encodings, spans) => (encodings, spans),
                    _ => return Err(self.failure(scan.usable[row].0, USED)),
                },
            };
            let (s, t) = *encodings;
            src.push(s);
            tgt.push(t);
            anchors.push(spans);
        }
        let anchors = if self.config.require_anchors {
            let all = anchors.into_iter().collect::<Option<Vec<_>>>();
            Some(all.ok_or_else(|| {
                Error::InvalidArgument("a usable pair lacks the anchors the loader requires".into())
            })?)
        } else {
            None
        };
        let lengths = |side: fn(&(usize, (usize, usize))) -> usize| scan.usable.iter().map(side);
        Ok(PairBatch {
            src: self
                .tokenizer
                .pad_rows_of(src, lengths(|u| u.1 .0), device)?,
            tgt: self
                .tokenizer
                .pad_rows_of(tgt, lengths(|u| u.1 .1), device)?,
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
