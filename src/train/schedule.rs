//! Learning-rate schedules: linear warm-up, then constant, linear, cosine or step decay.

use serde::{Deserialize, Serialize};

/// How the learning rate falls after warm-up.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Decay {
    /// Stays at the peak.
    Constant,
    /// Falls linearly to zero at the last step.
    #[default]
    Linear,
    /// Follows half a cosine to zero at the last step.
    Cosine,
    /// Multiplied by 0.1 at 2/6, 4/6 and 5/6 of the steps after warm-up: ML-CTL's reference
    /// recipe, PyTorch's `MultiStepLR(milestones=[2 * per, 4 * per, 5 * per], gamma=0.1)` with
    /// `per = span / 6` rounded down as the reference computes it (so a span under 6 steps
    /// starts at a thousandth of the peak).
    MultiStep,
}

/// Linear warm-up to `peak_lr` over `warmup_steps`, then [`Decay`] until `total_steps`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct LrSchedule {
    /// Learning rate at the end of warm-up.
    pub peak_lr: f64,
    /// Number of warm-up updates.
    pub warmup_steps: u64,
    /// Total number of updates of the run.
    pub total_steps: u64,
    /// Shape of the decay.
    pub decay: Decay,
}

impl LrSchedule {
    /// Learning rate of update `step` (0-based). Warm-up reaches `peak_lr * (step + 1) /
    /// warmup_steps`, so the first update already moves the weights (transformers' schedule
    /// spends it at zero).
    pub fn lr(&self, step: u64) -> f64 {
        if step < self.warmup_steps {
            return self.peak_lr * (step + 1) as f64 / self.warmup_steps as f64;
        }
        let span = self.total_steps.saturating_sub(self.warmup_steps).max(1) as f64;
        let progress = ((step - self.warmup_steps) as f64 / span).min(1.0);
        match self.decay {
            Decay::Constant => self.peak_lr,
            Decay::Linear => self.peak_lr * (1.0 - progress),
            Decay::Cosine => self.peak_lr * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos()),
            Decay::MultiStep => {
                let per = self.total_steps.saturating_sub(self.warmup_steps) / 6;
                let passed = [2 * per, 4 * per, 5 * per]
                    .iter()
                    .filter(|&&m| step - self.warmup_steps >= m)
                    .count();
                self.peak_lr * 0.1f64.powi(passed as i32)
            }
        }
    }
}
