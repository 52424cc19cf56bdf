//! Training objectives.

mod mlm;

pub use mlm::masked_lm_loss;
