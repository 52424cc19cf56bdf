//! Training data: parallel corpora (ML-CTL's TSV, `src ||| tgt`, line-aligned files), a seeded
//! resumable loader that batches and checks anchor spans, and MLM masking; evaluation data:
//! XNLI and MultiNLI in their official formats ([`xnli`]).

mod anchors;
mod loader;
mod masking;
mod parallel;
pub mod xnli;

pub use anchors::LexiconAnchors;
pub use loader::{AnchorFinder, LoaderConfig, LoaderCursor, LoaderStats, PairBatch, PairLoader};
pub use masking::{MaskedTokens, MlmMasking};
pub use parallel::{AnchorWord, CorpusFormat, ParallelCorpus, RawPair};
pub use xnli::{
    read_nli_jsonl, read_nli_tsv, NliData, NliExample, NliFile, NliFormat, NliLabel,
    NliReadOptions, NliReadStats, XnliDir,
};
