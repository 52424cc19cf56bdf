//! [`TrainConfig`]: the options of a training run, which a checkpoint records and a resumed run
//! must match.

use serde::{Deserialize, Serialize};

use super::optimizer::AdamWConfig;
use super::schedule::{Decay, LrSchedule};

/// Options of a [`Trainer`](super::Trainer).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainConfig {
    /// Number of optimizer updates.
    pub steps: u64,
    /// Learning-rate schedule (its `total_steps` should equal `steps`).
    pub schedule: LrSchedule,
    /// AdamW's moments and weight decay.
    pub adamw: AdamWConfig,
    /// Clip the global gradient norm to this value (`None`: no clipping).
    pub max_grad_norm: Option<f64>,
    /// Peak learning rate of the ML-CTL head (the projection, parameters under
    /// [`crate::model::HEAD_PREFIX`]), which starts from random weights; the schedule scales
    /// it as it scales `schedule.peak_lr`. `None`: the head uses `schedule.peak_lr` too.
    #[serde(default)]
    pub head_lr: Option<f64>,
    /// Micro-batches whose gradients are summed (each scaled by `1 / grad_accum`) per update.
    pub grad_accum: usize,
    /// Pairs per encoder pass with the cached loss ([`CachedLoss`](crate::loss::CachedLoss), GradCache): the gradients of
    /// the whole batch in the memory of this many pairs. `None`: the whole batch in one graph.
    #[serde(default)]
    pub mini_batch: Option<usize>,
    /// Keep the embeddings fixed.
    pub freeze_embeddings: bool,
    /// Update the word-embedding table row by row, leaving the rows of tokens absent from the
    /// batch alone ([`AdamW::with_sparse_rows`](super::AdamW::with_sparse_rows), the rule of PyTorch's `SparseAdam`). Needs the
    /// MLM term off (its decoder, tied to the table, gives every row a gradient) and the
    /// embeddings trained.
    #[serde(default)]
    pub sparse_embeddings: bool,
    /// Keep the first this-many transformer layers fixed.
    pub freeze_layers: usize,
    /// Stop with [`Error::Diverged`](crate::Error::Diverged) after this many non-finite steps in a row (each is skipped).
    pub max_consecutive_bad_steps: usize,
    /// Save a checkpoint every this-many updates (0: only at the end).
    pub checkpoint_every: u64,
    /// Complete checkpoints to keep.
    pub keep_checkpoints: usize,
    /// Seed of the MLM masks ([`MaskKey::seed`](crate::data::MaskKey::seed)); the trainer
    /// starts the dropout generator from `seed + 1`, and the loader's order has its own seed.
    pub seed: u64,
    /// Show a progress bar on standard error.
    pub progress: bool,
}

impl TrainConfig {
    /// ML-CTL's reference recipe for `steps` updates: Adam (no weight decay) at lr 2e-6,
    /// multiplied by 0.1 at 2/6, 4/6 and 5/6 of the run ([`Decay::MultiStep`]), no warm-up, no
    /// clipping, one learning rate for every parameter.
    pub fn reference(steps: u64) -> Self {
        Self {
            steps,
            schedule: LrSchedule {
                peak_lr: 2e-6,
                warmup_steps: 0,
                total_steps: steps,
                decay: Decay::MultiStep,
            },
            adamw: AdamWConfig {
                weight_decay: 0.0,
                ..Default::default()
            },
            max_grad_norm: None,
            head_lr: None,
            grad_accum: 1,
            mini_batch: None,
            freeze_embeddings: false,
            sparse_embeddings: false,
            freeze_layers: 0,
            max_consecutive_bad_steps: 5,
            checkpoint_every: 0,
            keep_checkpoints: 2,
            seed: 0,
            progress: true,
        }
    }

    /// Adam (no weight decay) at lr 2e-6 for `steps` updates with a linear decay to zero, no
    /// warm-up, and the global gradient norm clipped at 1.0: the reference's optimiser with a
    /// smoother schedule and a guard against gradient spikes.
    pub fn adam_linear_clipped(steps: u64) -> Self {
        Self {
            schedule: LrSchedule {
                decay: Decay::Linear,
                ..Self::reference(steps).schedule
            },
            max_grad_norm: Some(1.0),
            ..Self::reference(steps)
        }
    }
}
