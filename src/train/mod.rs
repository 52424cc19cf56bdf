//! Training: AdamW with parameter groups, learning-rate schedules, gradient clipping and
//! accumulation, atomic checkpoints and a trainer that resumes bit-exactly.

mod checkpoint;
mod optimizer;
mod schedule;
mod trainer;
mod update;

pub use checkpoint::{
    checkpoint_name, latest_checkpoint, list_checkpoints, prune_checkpoints, write_checkpoint_dir,
};
pub use optimizer::{clip_grad_norm, is_no_decay, AdamW, AdamWConfig, Gradients};
pub use schedule::{Decay, LrSchedule};
pub use trainer::{StepRecord, TrainConfig, TrainSummary, Trainer, METRICS_FILE};
pub use update::{accumulate_gradients, BadSteps, UpdateRecord, UpdateRule};
