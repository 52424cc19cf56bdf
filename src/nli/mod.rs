//! Natural language inference and the XNLI zero-shot protocol, in one place: reading the
//! official files ([`XnliDir`], [`read_nli_tsv`], [`read_nli_jsonl`]), the classifier
//! ([`NliClassifier`]), its fine-tuning ([`finetune_nli`], through the same update step as
//! pre-training, [`UpdateRule`](crate::train::UpdateRule)) and its evaluation per language
//! ([`evaluate_nli`]).
//!
//! The protocol of the ML-CTL paper (and of mBERT, XLM, XTREME): fine-tune the encoder with a
//! 3-way classification head on **English** NLI training data only (MultiNLI, or XNLI-MT's
//! English file), then evaluate that one classifier on the XNLI test set (or dev set) of
//! **every** language, which it never saw labelled data of. Accuracy per language and its
//! average over languages measure how well the encoder's representations transfer across
//! languages:
//!
//! ```no_run
//! # fn main() -> mlctl::Result<()> {
//! use candle_core::{DType, Device};
//! use mlctl::pretrained::PretrainedBert;
//! use mlctl::nli::{evaluate_nli, finetune_nli, NliFinetuneConfig, NliReadOptions, XnliDir};
//!
//! let bert = PretrainedBert::load("bert-base-multilingual-cased", &Device::Cpu, DType::F32)?;
//! let xnli = XnliDir::discover("data/xnli")?;
//! let train = xnli.read_train(&NliReadOptions::default())?;
//! let classifier = finetune_nli(&bert, &train.examples, &NliFinetuneConfig::default())?;
//! // The test split; the dev split only when the directory has no test file.
//! let eval = xnli.read_eval(&NliReadOptions::default())?;
//! let report = evaluate_nli(&classifier, &eval.data.examples)?;
//! println!("{}\n{report}", eval.split_note());
//! # Ok(()) }
//! ```
//!
//! On the CPU everything is seeded (head initialisation, dropout masks, example order) and a
//! fine-tuning run is reproducible bit for bit.

mod classifier;
mod data;
mod evaluate;
mod finetune;

pub use classifier::{copy_pretrained, NliClassifier, NliFinetuneSummary, NliPooling};
pub use data::{
    read_nli_jsonl, read_nli_tsv, NliData, NliExample, NliFile, NliFormat, NliLabel,
    NliReadOptions, NliReadStats, XnliDir, XnliEval, XnliSplit,
};
pub use evaluate::{evaluate_nli, LanguageCounts, NliPredictor, NliReport};
pub use finetune::{finetune_nli, NliFinetuneConfig};
