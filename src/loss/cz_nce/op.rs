//! What the fused op computes, whatever the device: its options, the state its forward leaves
//! for the backward, and the backward's chain rule. Where it runs (the custom-op entry points
//! candle calls per device, and the kernels behind them) is [`super::dispatch`].
//!
//! The op is `CustomOp2(q, k)` for a fixed temperature and `CustomOp3(q, k, log_scale)` for a
//! learnable one. Its logit scale is resolved (and clamped) on the host before the op is built
//! ([`LogitScale`]); `log_scale` is an argument only so that autograd routes `∂L/∂θ` to it.
//!
//! # The forward
//!
//! The loss `L`: an f32 scalar (f64 for f64 inputs), computed in f32 from f16/bf16/f32 inputs
//! and in f64 from f64 ones, reading the inputs through their layouts (any strides / offset).
//!
//! # The saved state
//!
//! When the graph will need gradients and the mode is [`BackwardMode::GradInForward`], the
//! kernel computes [`UnitGrads`] in the same pass and the forward hands them to
//! [`CzNceOp::save`]. With [`BackwardMode::Recompute`], or when the inputs tracked no gradient,
//! nothing is saved. Candle builds one op per forward call and runs its `bwd` at most once per
//! backward pass, so [`CzNceOp::backward`] *takes* the saved gradients (freeing them) and, when
//! there are none (recompute mode, or a second backward over the same graph), reruns the kernel
//! on the inputs. Either way the result is the same.
//!
//! # The backward
//!
//! The loss is a scalar, so the chain rule only scales the unit gradients by the upstream
//! gradient; `∂L/∂θ` is zero while the scale is clamped (like `torch.clamp`); and the gradients
//! are cast to the inputs' dtypes, f16 saturating instead of overflowing ([`cast_grad`]).

use super::cpu::Spec;
use super::dispatch;
use super::{BackwardMode, LogitScale};
use candle_core::{DType, Tensor};
use std::sync::Mutex;

/// `∂L/∂q`, `∂L/∂k` (`[B, D]`) and `∂L/∂log s` (`[1]`) for an upstream gradient of 1, in the
/// accumulation dtype (f32, or f64 for f64 inputs), on the inputs' device. `∂L/∂log s` is
/// `s ∂L/∂s` at the scale used, whether or not it is clamped.
pub(super) struct UnitGrads {
    pub dq: Tensor,
    pub dk: Tensor,
    pub dlog_scale: Tensor,
}

pub(crate) struct CzNceOp {
    pub(super) spec: Spec,
    pub(super) scale: LogitScale,
    /// Whether the forward computes the gradients too: the inputs track gradients and the mode
    /// is [`BackwardMode::GradInForward`].
    grad_in_forward: bool,
    saved: Mutex<Option<UnitGrads>>,
}

impl CzNceOp {
    /// `tracks`: whether any input tracks gradients.
    pub(crate) fn new(spec: Spec, scale: LogitScale, tracks: bool, mode: BackwardMode) -> Self {
        Self {
            spec,
            scale,
            grad_in_forward: tracks && mode == BackwardMode::GradInForward,
            saved: Mutex::new(None),
        }
    }

    /// Whether the forward should compute the gradients as well as the loss.
    pub(super) fn grad_in_forward(&self) -> bool {
        self.grad_in_forward
    }

    /// Keeps the forward's gradients for the backward.
    pub(super) fn save(&self, grads: Option<UnitGrads>) {
        if let Some(g) = grads {
            *self.slot() = Some(g);
        }
    }

    /// The slot of the saved gradients. A poisoned lock only means another thread panicked
    /// between two assignments of an `Option`, which leaves it valid.
    fn slot(&self) -> std::sync::MutexGuard<'_, Option<UnitGrads>> {
        self.saved.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// `(∂L/∂q, ∂L/∂k, ∂L/∂θ)` for the upstream gradient `grad_res`: `dq` and `dk` in the
    /// inputs' dtypes, `∂L/∂θ` a one-element tensor in the accumulation dtype.
    pub(super) fn backward(
        &self,
        q: &Tensor,
        k: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<(Tensor, Tensor, Tensor)> {
        let saved = self.slot().take();
        let unit = match saved {
            Some(g) => g,
            None => dispatch::recompute(self, q, k)?,
        };
        let g = grad_res.to_dtype(unit.dq.dtype())?.reshape((1, 1))?;
        let dq = cast_grad(unit.dq.broadcast_mul(&g)?, q.dtype())?;
        let dk = cast_grad(unit.dk.broadcast_mul(&g)?, k.dtype())?;
        let dlog_scale = if self.scale.clamped {
            unit.dlog_scale.zeros_like()?
        } else {
            unit.dlog_scale.broadcast_mul(&g.reshape(1)?)?
        };
        Ok((dq, dk, dlog_scale))
    }
}

/// Casts a gradient to the input dtype. For f16, values beyond its range (e.g. the `1/ε`-sized
/// gradient of an all-zero row) saturate to `±f16::MAX` instead of becoming `±inf`.
fn cast_grad(g: Tensor, dtype: DType) -> candle_core::Result<Tensor> {
    if dtype == DType::F16 {
        let max = half::f16::MAX.to_f64();
        g.clamp(-max, max)?.to_dtype(dtype)
    } else {
        g.to_dtype(dtype)
    }
}
