//! Dynamic loss scaling for f16 training, as PyTorch's `GradScaler` does it.

use candle_core::{DType, Tensor};
use serde::{Deserialize, Serialize};

use super::optimizer::Gradients;
use crate::{Error, Result};

/// Keeps f16 gradients above f16's underflow by multiplying the loss by a large scale before
/// the backward pass and dividing the gradients by it (in f32) afterwards.
///
/// The scale is halved whenever a step's gradients overflow (that step must be skipped) and
/// doubled after `growth_interval` finite steps in a row, so it stays near the largest value
/// that does not overflow. Use per update:
///
/// 1. `scaler.scale_loss(&loss)?.backward()` instead of `loss.backward()`;
/// 2. [`LossScaler::unscale`] on the gradients (they become f32);
/// 3. the global norm ([`super::clip_grad_norm`]) tells whether they are finite: step the
///    optimizer only when they are;
/// 4. [`LossScaler::update`] with whether they were finite.
///
/// Unlike `GradScaler`, the scale never falls below `min_scale`, and overflow has a limit:
/// gradients that overflow `max_overflows_in_a_row` times in a row are not the scale's fault,
/// and [`super::UpdateRule::apply_scaled`] stops the run with [`Error::Diverged`] (without a
/// floor and a limit, persistent overflow drives the scale to zero and skips every remaining
/// step without a word).
///
/// The scaler is serialisable, to be saved with a checkpoint (checkpoints written before the
/// floor and the limit existed load with their defaults).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LossScaler {
    scale: f64,
    /// Multiplies the scale after `growth_interval` finite steps.
    pub growth_factor: f64,
    /// Multiplies the scale after a non-finite step.
    pub backoff_factor: f64,
    /// Finite steps in a row before the scale grows.
    pub growth_interval: u64,
    /// The scale's floor: backing off stops here.
    #[serde(default = "default_min_scale")]
    pub min_scale: f64,
    /// Overflowing steps in a row after which the run has diverged.
    #[serde(default = "default_max_overflows")]
    pub max_overflows_in_a_row: u64,
    finite_in_a_row: u64,
    #[serde(default)]
    overflows_in_a_row: u64,
}

/// 1: below it, scaling only shrinks gradients towards f16's underflow.
fn default_min_scale() -> f64 {
    1.0
}

/// 64 halvings take any starting scale up to 2^64 down to the floor of 1; overflow past that
/// happens at a scale that cannot be the cause.
fn default_max_overflows() -> u64 {
    64
}

impl Default for LossScaler {
    /// PyTorch's defaults (scale 2^16, ×2 every 2000 finite steps, ×0.5 on overflow), a floor
    /// of 1 and at most 64 overflows in a row.
    fn default() -> Self {
        Self {
            scale: 65536.0,
            growth_factor: 2.0,
            backoff_factor: 0.5,
            growth_interval: 2000,
            min_scale: default_min_scale(),
            max_overflows_in_a_row: default_max_overflows(),
            finite_in_a_row: 0,
            overflows_in_a_row: 0,
        }
    }
}

impl LossScaler {
    /// A scaler starting at `scale` with PyTorch's other defaults.
    pub fn new(scale: f64) -> Result<Self> {
        if !(scale.is_finite() && scale > 0.0) {
            return Err(Error::InvalidArgument(format!(
                "a loss scale must be positive and finite, got {scale}"
            )));
        }
        Ok(Self {
            scale,
            ..Default::default()
        })
    }

    /// The current scale.
    pub fn scale(&self) -> f64 {
        self.scale
    }

    /// `loss * scale` in f32 (the default scale is above f16's largest value), the tensor to
    /// differentiate: the gradients reaching f16 tensors are scaled there. The loss's own
    /// reduction should be in f32 too, as mlctl's losses are: the gradient entering the first
    /// f16 tensor is the scale times its weight in the loss.
    pub fn scale_loss(&self, loss: &Tensor) -> Result<Tensor> {
        Ok((loss.to_dtype(DType::F32)? * self.scale)?)
    }

    /// Divides every gradient by the scale, in f32 (dividing in f16 would underflow again).
    pub fn unscale(&self, grads: &mut Gradients) -> Result<()> {
        let inv = 1.0 / self.scale;
        for g in grads.values_mut() {
            *g = (g.to_dtype(DType::F32)? * inv)?;
        }
        Ok(())
    }

    /// Adapts the scale after a step whose unscaled gradients were (`true`) or were not finite
    /// (backing off no lower than `min_scale`).
    pub fn update(&mut self, finite: bool) {
        if finite {
            self.overflows_in_a_row = 0;
            self.finite_in_a_row += 1;
            if self.finite_in_a_row >= self.growth_interval {
                self.scale *= self.growth_factor;
                self.finite_in_a_row = 0;
            }
        } else {
            self.overflows_in_a_row += 1;
            self.scale = (self.scale * self.backoff_factor).max(self.min_scale);
            self.finite_in_a_row = 0;
        }
    }

    /// Steps in a row whose gradients overflowed, up to the last [`LossScaler::update`].
    pub fn overflows_in_a_row(&self) -> u64 {
        self.overflows_in_a_row
    }
}
