//! Evaluation of a (pre-trained or ML-CTL-trained) encoder.
//!
//! Retrieval ([`retrieval_accuracy`], [`embed_sentences`], [`embed_spans`]): Tatoeba-style sentence and anchor-word retrieval (acc@1, both directions).
//! [`bootstrap`]: intervals for those scores and for differences between models.
//! [`plots`]: SVG plots of a run.
//!
//! XNLI zero-shot transfer: [`nli`](crate::nli) (its fine-tuning and evaluation are
//! re-exported here).

pub mod bootstrap;
#[cfg(feature = "plots")]
pub mod plots;
mod retrieval;

pub use retrieval::{embed_sentences, embed_spans, retrieval_accuracy, RetrievalScores};
