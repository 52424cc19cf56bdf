//! Evaluation of a (pre-trained or ML-CTL-trained) encoder.
//!
//! [`retrieval`]: Tatoeba-style sentence and anchor-word retrieval (acc@1, both directions).
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
pub mod retrieval;
pub mod seeds;
pub mod tatoeba;

pub use bootstrap::Interval;
pub use retrieval::{embed_sentences, embed_spans, retrieval_accuracy, RetrievalScores};

pub use crate::nli::{
    copy_pretrained, evaluate_nli, finetune_nli, LanguageCounts, NliClassifier, NliFinetuneConfig,
    NliFinetuneSummary, NliPooling, NliPredictor, NliReport,
};
