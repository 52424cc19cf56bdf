//! # mlctl
//!
//! Multi-level contrastive learning (ML-CTL: B. Chen, W. Guo, B. Gu, Q. Liu, Y. Wang, *Multi-Level
//! Contrastive Learning for Cross-Lingual Alignment*, ICASSP 2022, arXiv 2202.13083) for
//! cross-lingual sentence and word alignment, in pure Rust on [candle](https://github.com/huggingface/candle).
//!
//! The crate is a library first. Its building blocks:
//! - [`encoder`]: a trainable BERT/mBERT encoder ([`encoder::BertEncoder`]) that returns every
//!   hidden state, applies real dropout in training and carries the MLM head.
//! - [`pretrained`]: a Hugging Face model directory loaded and saved
//!   ([`pretrained::PretrainedBert`]).
//! - [`fs`]: a model directory's file names; atomic writes.
//! - [`tokenize`]: batch tokenization with padding, truncation and offsets.
//! - [`pooling`]: sentence and word embeddings as masked means over chosen layers (or
//!   sentence-transformers' other pooling modes).
//! - [`sentence_transformers`]: sentence-transformers model directories (`modules.json`),
//!   followed by [`pretrained::PretrainedBert::encode`] and written back by `save`.
//! - [`device`]: choosing CPU, CUDA or Metal.
//! - [`dist`]: data-parallel building blocks: collectives (NCCL or in-process), gradient
//!   buckets, the torchrun-style rendezvous.
//! - [`ops`]: every kernel (CPU, and CUDA with the `cuda` feature), each beside its composite
//!   twin: LayerNorm, attention softmax, GELU, bias, counter-based dropout, AdamW's update, the
//!   CZ-NCE op.
//! - [`loss`]: the contrastive objectives, among them the fused, numerically stable CZ-NCE op.
//! - [`align`]: word alignment (SimAlign / awesome-align extraction, AER) and ML-CTL's
//!   dictionary anchors.
//! - [`eval`]: evaluation: sentence and anchor-word retrieval, bootstrap intervals, plots.
//! - [`nli`]: NLI data, classifier, fine-tuning and the XNLI zero-shot evaluation.
//! - [`pretrain`]: the steps of a pre-training run around the trainer: anchored training data,
//!   one evaluation suite before and after, the results tables.
#![warn(missing_docs)]

pub mod align;
pub mod data;
pub mod device;
pub mod dist;
pub mod encode;
pub mod encoder;
mod error;
pub mod eval;
pub mod fs;
#[cfg(feature = "hub")]
pub mod hub;
pub mod loss;
pub mod model;
pub mod nli;
pub mod ops;
pub mod pooling;
pub mod pretrain;
pub mod pretrained;
mod progress;
pub mod projection;
pub mod sentence_transformers;
pub mod tokenize;
pub mod train;

pub use error::{Error, Result};

/// The candle crates whose types mlctl's public API takes and returns, re-exported at the exact
/// versions mlctl is built with, so a program needs no candle dependency of its own:
/// `mlctl::candle::{Device, DType, Tensor}` for the common types, `mlctl::candle::core` and
/// `mlctl::candle::nn` for the rest (`VarMap` and `VarBuilder` from [`encoder::ParamStore`],
/// candle's optimizers).
///
/// ```no_run
/// use mlctl::candle::{DType, Device};
/// # fn main() -> mlctl::Result<()> {
/// let bert = mlctl::pretrained::PretrainedBert::load("model", &Device::Cpu, DType::F32)?;
/// let vars: Vec<mlctl::candle::core::Var> = bert.params.varmap().all_vars();
/// # let _ = vars; Ok(()) }
/// ```
pub mod candle {
    pub use candle_core as core;
    pub use candle_core::{DType, Device, Module, Tensor, Var, D};
    pub use candle_nn as nn;
}

/// The `tokenizers` crate, whose `Tokenizer` and `Encoding` [`tokenize::Tokenizer::new`],
/// [`tokenize::Tokenizer::inner`] and [`encode::encode_batches`] use, at the version mlctl is
/// built with.
pub use tokenizers;

// Compiles the README's Rust example as a doctest, so the documented API cannot drift.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;
