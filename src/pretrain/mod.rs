//! The steps of an ML-CTL pre-training run around the [`Trainer`](crate::train::Trainer), for a
//! program of its own: anchored training data from parallel text, one evaluation suite run
//! before and after training (sentence and anchor-word retrieval on held-apart pairs, word
//! alignment, zero-shot XNLI), the results tables, and the run directory.
//!
//! The `pretrain_xnli` example is a command line over these steps.
//!
//! ```no_run
//! # fn main() -> mlctl::Result<()> {
//! use std::sync::Arc;
//! use mlctl::align::Lexicon;
//! use mlctl::model::MlCtlModel;
//! use mlctl::pretrain::{comparison_markdown, EvalSuite, ParallelSet};
//!
//! use mlctl::tokenize::Tokenizer;
//!
//! let device = candle_core::Device::Cpu;
//! let model = MlCtlModel::load("path/to/model", &device, candle_core::DType::F32, 0)?;
//! let tokenizer = Tokenizer::from_file("path/to/model/tokenizer.json")?;
//! let held_apart = ParallelSet::new(
//!     "fra-eng", "fr", "en",
//!     vec!["Le chat dort.".into(), "Il pleut.".into()],
//!     vec!["The cat sleeps.".into(), "It is raining.".into()],
//! )?;
//! let suite = EvalSuite::new(vec![held_apart], Arc::new(Lexicon::embedded()));
//! let before = suite.evaluate(&model, &tokenizer)?;
//! // ... train `model` with `mlctl::train::Trainer` ...
//! let after = suite.evaluate(&model, &tokenizer)?;
//! println!("{}", comparison_markdown(&before, &after)?);
//! # Ok(()) }
//! ```

mod corpus;
mod metrics;
mod report;
mod run_dir;
mod suite;
mod tasks;
#[cfg(test)]
mod tests;

pub use corpus::{write_anchored_tsv, ParallelSet};
pub use metrics::{Evaluation, Metric, MetricItems};
pub use report::{comparison_markdown, objectives_markdown, seed_differences_markdown};
pub use run_dir::{
    prepare_run_dir, read_evaluations, read_metrics, write_evaluations, write_results,
    RunEvaluations, EVALUATION_FILE, RESULTS_FILE,
};
pub use suite::EvalSuite;
pub use tasks::{AlignmentScores, AlignmentTask, SentencePooling, XnliTask};
