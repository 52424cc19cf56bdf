//! Training objectives.

mod cached;
mod cz_nce;
pub(crate) mod grads;
mod mlm;
mod multi_level;

pub use cached::{CachedLoss, CachedStep};
pub use cz_nce::{BackwardMode, CzNce, Temperature};
pub use mlm::masked_lm_loss;
pub use multi_level::{LossTerms, MaskedPair, MultiLevelLoss, RankShard};
