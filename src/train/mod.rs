//! Training: AdamW with parameter groups and f32 master weights, learning-rate schedules,
//! gradient clipping and accumulation, dynamic loss scaling for f16, atomic checkpoints and a
//! trainer that resumes bit-exactly.

mod checkpoint;
mod config;
mod loss_scale;
mod optimizer;
mod schedule;
mod trainer;
mod update;

pub use crate::loss::grads::accumulate_gradients;
pub use checkpoint::{
    checkpoint_name, latest_checkpoint, latest_verified_checkpoint, list_checkpoints,
    prune_checkpoints, verify_checkpoint, write_checkpoint_dir, CHECKSUMS_FILE,
};
pub use config::TrainConfig;
pub use loss_scale::LossScaler;
pub use optimizer::{clip_grad_norm, global_grad_norm, is_no_decay, AdamW, AdamWConfig, Gradients};
pub use schedule::{Decay, LrSchedule};
pub use trainer::{StepRecord, TrainSummary, Trainer, METRICS_FILE};
pub use update::{BadSteps, UpdateRecord, UpdateRule};
