//! Training objectives.

pub mod cz_nce;
mod mlm;
mod multi_level;

pub use cz_nce::CzNce;
pub use mlm::masked_lm_loss;
pub use multi_level::{LossTerms, MaskedPair, MultiLevelLoss};
