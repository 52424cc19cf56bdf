//! The integration tests, one module per area, linked into one test binary (`cargo test`
//! links it once instead of once per file). Run one area with
//! `cargo test --test it <area>::`, e.g. `cargo test --test it cz_nce::`.

#[path = "../common/mod.rs"]
mod common;

mod align_anchors;
mod align_example;
mod align_io;
mod align_methods;
mod align_outputs;
mod align_pipeline;
mod align_reference;
mod align_simalign;
mod cached_loss;
mod checkpoint;
mod compare_runs;
mod cuda_kernels_emulated;
mod cz_nce;
mod cz_nce_props;
mod data;
mod data_parallel;
mod dist_failures;
mod e5;
mod encode;
mod encoder_parity;
mod explicit_backward;
mod fuzz_regressions;
mod hub;
mod masking;
mod mlm_loss;
mod model;
mod objective;
mod ops;
mod optimizer;
mod pooling;
mod pretrain_xnli;
mod retrieval;
mod sentence_transformers;
mod special_tokens;
mod tatoeba;
mod tokenize;
mod trainer;
mod training;
mod xlmr;
mod xnli;
