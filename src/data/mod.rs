//! Training data: parallel corpora (ML-CTL's TSV, `src ||| tgt`, line-aligned files), a seeded
//! resumable loader that batches and checks anchor spans, and MLM masking. The XNLI and
//! MultiNLI readers live in [`nli`](crate::nli).

mod anchors;
mod loader;
mod masking;
mod parallel;

pub use anchors::LexiconAnchors;
pub use loader::{AnchorFinder, LoaderConfig, LoaderCursor, LoaderStats, PairBatch, PairLoader};
pub use masking::{MaskKey, MaskedTokens, MlmMasking};
pub use parallel::{AnchorWord, CorpusFormat, ParallelCorpus, RawPair};
