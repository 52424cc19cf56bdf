//! Training: AdamW with parameter groups, learning-rate schedules, gradient clipping.

mod optimizer;
mod schedule;

pub use optimizer::{clip_grad_norm, is_no_decay, AdamW, AdamWConfig, Gradients};
pub use schedule::{Decay, LrSchedule};
