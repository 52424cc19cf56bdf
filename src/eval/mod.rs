//! Evaluation of a (pre-trained or ML-CTL-trained) encoder.
//!
//! [`retrieval`]: Tatoeba-style sentence and anchor-word retrieval (acc@1, both directions).
//! [`plots`]: SVG plots of a run.
//!
//! [`xnli`]: XNLI zero-shot cross-lingual transfer. The protocol of the ML-CTL paper (and of
//! mBERT, XLM, XTREME): fine-tune the encoder with a 3-way classification head on **English**
//! NLI training data only (MultiNLI, or XNLI-MT's English file), then evaluate that one
//! classifier on the XNLI dev/test sets of **every** language, which it never saw labelled
//! data of. Accuracy per language and its average over languages measure how well the
//! encoder's representations transfer across languages:
//!
//! ```no_run
//! # fn main() -> mlctl::Result<()> {
//! use candle_core::{DType, Device};
//! use mlctl::data::{NliReadOptions, XnliDir};
//! use mlctl::encoder::PretrainedBert;
//! use mlctl::eval::{evaluate_nli, finetune_nli, NliFinetuneConfig};
//!
//! let bert = PretrainedBert::load("bert-base-multilingual-cased", &Device::Cpu, DType::F32)?;
//! let xnli = XnliDir::discover("data/xnli")?;
//! let train = xnli.read_train(&NliReadOptions::default())?;
//! let classifier = finetune_nli(&bert, &train.examples, &NliFinetuneConfig::default())?;
//! let test = xnli.read_test(&NliReadOptions::default())?;
//! let report = evaluate_nli(&classifier, &test.examples)?;
//! println!("{report}");
//! # Ok(()) }
//! ```

#[cfg(feature = "plots")]
pub mod plots;
pub mod retrieval;
pub mod xnli;

pub use retrieval::{embed_sentences, embed_spans, retrieval_accuracy, RetrievalScores};

pub use xnli::{
    copy_pretrained, evaluate_nli, finetune_nli, LanguageCounts, NliClassifier, NliFinetuneConfig,
    NliFinetuneSummary, NliPooling, NliPredictor, NliReport,
};
