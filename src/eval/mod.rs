//! Evaluation of a (pre-trained or ML-CTL-trained) encoder.
//!
//! Retrieval ([`retrieval_accuracy`], [`embed_sentences`], [`embed_spans`]): Tatoeba-style sentence and anchor-word retrieval (acc@1, both directions).
//! [`tatoeba`]: XTREME's Tatoeba task (36 languages, XTREME's pooling and direction).
//! [`bootstrap`]: intervals for those scores and for differences between models.
//! [`seeds`]: mean ± standard deviation over runs that differ only in their training seed.
//! [`plots`]: SVG plots of a run.
//!
//! XNLI zero-shot transfer: [`nli`](crate::nli) (its fine-tuning and evaluation are
//! re-exported here).

pub mod bootstrap;
#[cfg(feature = "plots")]
pub mod plots;
mod retrieval;
pub mod seeds;
pub mod tatoeba;

pub use retrieval::{embed_sentences, embed_spans, retrieval_accuracy, RetrievalScores};
