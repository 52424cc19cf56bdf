//! Training objectives.

pub mod cz_nce;
mod mlm;

pub use cz_nce::CzNce;
pub use mlm::masked_lm_loss;
