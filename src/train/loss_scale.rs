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
/// The scaler is serialisable, to be saved with a checkpoint.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LossScaler {
    scale: f64,
    /// Multiplies the scale after `growth_interval` finite steps.
    pub growth_factor: f64,
    /// Multiplies the scale after a non-finite step.
    pub backoff_factor: f64,
    /// Finite steps in a row before the scale grows.
    pub growth_interval: u64,
    finite_in_a_row: u64,
}

impl Default for LossScaler {
    /// PyTorch's defaults: scale 2^16, ×2 every 2000 finite steps, ×0.5 on overflow.
    fn default() -> Self {
        Self {
            scale: 65536.0,
            growth_factor: 2.0,
            backoff_factor: 0.5,
            growth_interval: 2000,
            finite_in_a_row: 0,
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

    /// Adapts the scale after a step whose unscaled gradients were (`true`) or were not finite.
    pub fn update(&mut self, finite: bool) {
        if finite {
            self.finite_in_a_row += 1;
            if self.finite_in_a_row >= self.growth_interval {
                self.scale *= self.growth_factor;
                self.finite_in_a_row = 0;
            }
        } else {
            self.scale *= self.backoff_factor;
            self.finite_in_a_row = 0;
        }
    }
}
