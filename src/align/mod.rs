//! Word alignment: from encoder hidden states to links between the words of two sentences,
//! scored against gold alignments; and ML-CTL's dictionary anchors.
//!
//! The pieces, usable on their own:
//! - [`WordAligner`]: subword → word mapping from the tokenizer's word ids, vectors at a chosen
//!   layer (default 8, as SimAlign for mBERT) or the mean of several layers
//!   ([`crate::pooling::Pooling::mlctl`]); methods link subwords (SimAlign's default
//!   [`TokenType::Bpe`], a word pair linked when any of its subwords are) or words (the mean of
//!   their subwords, [`TokenType::Word`]); length-sorted batches, and one encoder pass and one
//!   [`SimMatrix`] (an f32 matrix product) per pair for several methods
//!   ([`WordAligner::align_pairs_multi`]).
//! - [`AlignMethod`] and its implementations: SimAlign's [`ArgMax`], [`IterMax`] and
//!   [`MaxWeightMatch`], awesome-align's [`SoftmaxAlign`] (and its sparse variant
//!   [`SparsemaxAlign`]); [`SimMatrix::with_distortion`] and
//!   [`drop_below`] as optional extensions.
//! - [`io`]: `src ||| tgt` parallel files, Pharaoh (`i-j`, 0-based) files, gold files
//!   (`i-j` sure, `ipj` possible, 1- or 0-based), and awesome-align's extra outputs: the
//!   aligned word pairs ([`io::write_word_pairs`]) and a score per link ([`io::write_scores`],
//!   from [`WordAligner::align_pairs_scored`], see [`ScoredAlignment`]).
//! - [`AlignmentCounts`]: corpus-level precision, recall, F1 and AER.
//! - [`Lexicon`] and [`find_anchor_spans`]: dictionary entries found exactly once on each side of
//!   a pair, with token spans, written as the ML-CTL reference's TSV ([`Anchor::to_tsv`]).
//!
//! ```no_run
//! # fn main() -> mlctl::Result<()> {
//! use candle_core::{DType, Device};
//! use mlctl::align::{IterMax, WordAligner};
//! use mlctl::pretrained::PretrainedBert;
//!
//! let bert = PretrainedBert::load("bert-base-multilingual-cased", &Device::Cpu, DType::F32)?;
//! let tok = bert.tokenizer()?.clone();
//! let aligner = WordAligner::new(bert.encoder(), tok).with_layer(8);
//! let links = aligner.align_words(&["the", "cat", "sleeps"], &["le", "chat", "dort"], &IterMax::default())?;
//! println!("{links}"); // e.g. 0-0 1-1 2-2
//! # Ok(()) }
//! ```

pub(crate) mod anchors;
pub mod io;
mod methods;
mod metrics;
mod sim;
mod words;

pub use anchors::{
    find_anchor_spans, script_kind, token_span, Anchor, AnchorMatch, Lexicon, ScriptKind,
    LEXICON_LANGS,
};
pub use methods::{
    drop_below, method_by_name, AlignMethod, Alignment, ArgMax, IterMax, MaxWeightMatch,
    ScoredAlignment, SoftmaxAlign, SparsemaxAlign, METHOD_NAMES,
};
pub use metrics::{AlignmentCounts, GoldAlignment};
pub use sim::{l2_normalize_rows, SimMatrix, Similarity};
pub use words::{
    split_words, word_spans, word_tokens, HiddenStates, SentencePair, SentenceVectors, TextWord,
    TokenType, WordAligner, WordVectors, DEFAULT_ALIGN_BATCH, DEFAULT_ALIGN_LAYER,
};
