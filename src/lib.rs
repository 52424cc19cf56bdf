//! # mlctl
//!
//! Multi-level contrastive learning (ML-CTL: B. Chen, W. Guo, B. Gu, Q. Liu, Y. Wang, *Multi-Level
//! Contrastive Learning for Cross-Lingual Alignment*, ICASSP 2022, arXiv 2202.13083) for
//! cross-lingual sentence and word alignment, in pure Rust on [candle](https://github.com/huggingface/candle).
//!
//! The crate is a library first. Its building blocks:
//! - [`encoder`]: a trainable BERT/mBERT encoder ([`encoder::BertEncoder`]) that returns every
//!   hidden state, applies real dropout in training, carries the MLM head and loads and saves
//!   Hugging Face checkpoints ([`encoder::PretrainedBert`]).
//! - [`tokenize`]: batch tokenization with padding, truncation and offsets.
//! - [`pooling`]: sentence and word embeddings as masked means over chosen layers.
//! - [`device`]: choosing CPU, CUDA or Metal.
//! - [`dist`]: data-parallel building blocks: collectives (NCCL or in-process), gradient
//!   buckets, the torchrun-style rendezvous.
//! - [`ops`]: fused CPU kernels with exact backward (LayerNorm, attention softmax, GELU,
//!   counter-based dropout), each beside its composite twin.
//! - [`loss`]: the contrastive objectives, among them the fused, numerically stable CZ-NCE op.
//! - [`align`]: word alignment (SimAlign / awesome-align extraction, AER) and ML-CTL's
//!   dictionary anchors.
//! - [`eval`]: evaluation: sentence and anchor-word retrieval, XNLI zero-shot transfer, plots.
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
#[cfg(feature = "hub")]
pub mod hub;
pub mod loss;
pub mod model;
pub mod nli;
pub mod ops;
pub mod pooling;
pub mod pretrain;
mod progress;
pub mod projection;
pub mod tokenize;
pub mod train;

pub use error::{Error, Result};

// Compiles the README's Rust example as a doctest, so the documented API cannot drift.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;
