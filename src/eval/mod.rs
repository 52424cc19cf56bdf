//! Evaluation: sentence and anchor-word retrieval, and plots of a run.

pub mod plots;
pub mod retrieval;

pub use retrieval::{embed_sentences, embed_spans, retrieval_accuracy, RetrievalScores};
