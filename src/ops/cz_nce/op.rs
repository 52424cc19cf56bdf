//! What the fused op computes, whatever the device: its options, the state its forward leaves
//! for the backward, and the backward's chain rule. Where it runs (the custom-op entry points
//! candle calls per device, and the kernels behind them) is further down this file.
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

use super::spec::{BackwardMode, LogitScale, Spec};
use super::{cpu, rows};
use crate::ops::num::Real;
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp2, CustomOp3, DType, Layout, Shape, Storage, Tensor};
use rayon::prelude::*;
use std::borrow::Cow;
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
    pub(crate) spec: Spec,
    pub(crate) scale: LogitScale,
    /// Whether the forward computes the gradients too: the inputs track gradients and the mode
    /// is [`BackwardMode::GradInForward`].
    grad_in_forward: bool,
    /// `(first row, number of rows)`: the op computes only that band's part of the loss
    /// ([`super::rows`]); `None` for the whole batch.
    rows: Option<(usize, usize)>,
    saved: Mutex<Option<UnitGrads>>,
}

impl CzNceOp {
    /// `tracks`: whether any input tracks gradients.
    pub(crate) fn new(spec: Spec, scale: LogitScale, tracks: bool, mode: BackwardMode) -> Self {
        Self {
            spec,
            scale,
            grad_in_forward: tracks && mode == BackwardMode::GradInForward,
            rows: None,
            saved: Mutex::new(None),
        }
    }

    /// The op over rows `start..start + len` of the batch only (their part of the loss,
    /// divided by the whole batch's size). CPU only: the CUDA kernel takes whole batches.
    pub(crate) fn with_rows(mut self, (start, len): (usize, usize)) -> Self {
        self.rows = Some((start, len));
        self
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
            None => recompute(self, q, k)?,
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

// ---------------------------------------------------------------- where the op runs
//
// The custom-op entry points candle calls for the inputs' device, each reading the storages
// through their layouts and calling that device's kernel (`cpu`; `ops::cuda::cz_nce` with the
// `cuda` feature). Metal has no fused kernel: `loss::CzNce::forward` sends Metal inputs to the
// composite twin (candle's Metal kernels), and `forward_fused` rejects them before an op is built.

impl CustomOp2 for CzNceOp {
    fn name(&self) -> &'static str {
        "cz-nce"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (loss, grads) = on_cpu(self, (s1, l1), (s2, l2), self.grad_in_forward())?;
        self.save(grads);
        Ok((loss, Shape::from(())))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let (loss, grads) = on_cuda(self, (s1, l1), (s2, l2), self.grad_in_forward())?;
        self.save(grads);
        Ok((loss, Shape::from(())))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let (dq, dk, _) = self.backward(q, k, grad_res)?;
        Ok((Some(dq), Some(dk)))
    }
}

/// The learnable-temperature form: the third argument, `log_scale`, only receives the gradient
/// (the op already holds its clamped value).
impl CustomOp3 for CzNceOp {
    fn name(&self) -> &'static str {
        "cz-nce-learnable-t"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        CustomOp2::cpu_fwd(self, s1, l1, s2, l2)
    }

    #[cfg(feature = "cuda")]
    #[allow(clippy::too_many_arguments)]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        _: &candle_core::CudaStorage,
        _: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        CustomOp2::cuda_fwd(self, s1, l1, s2, l2)
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        log_scale: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (dq, dk, dls) = self.backward(q, k, grad_res)?;
        let dls = dls
            .reshape(log_scale.shape())?
            .to_dtype(log_scale.dtype())?;
        Ok((Some(dq), Some(dk), Some(dls)))
    }
}

/// Reruns the forward kernel of the inputs' device for their gradients (the backward when the
/// forward saved none).
pub(super) fn recompute(op: &CzNceOp, q: &Tensor, k: &Tensor) -> candle_core::Result<UnitGrads> {
    let (qs, ql) = q.storage_and_layout();
    let (ks, kl) = k.storage_and_layout();
    let grads = match (&*qs, &*ks) {
        (Storage::Cpu(a), Storage::Cpu(b)) => on_cpu(op, (a, ql), (b, kl), true)?.1,
        #[cfg(feature = "cuda")]
        (Storage::Cuda(a), Storage::Cuda(b)) => on_cuda(op, (a, ql), (b, kl), true)?.1,
        _ => candle_core::bail!(
            "cz_nce: no fused backward for {:?} on {:?}",
            q.dtype(),
            q.device().location()
        ),
    };
    grads.ok_or_else(|| candle_core::Error::Msg("cz_nce: the kernel returned no gradients".into()))
}

// ---------------------------------------------------------------- CPU

/// The CPU kernel on two storages: the loss (f32, or f64 for f64 inputs) and, if `want_grad`,
/// the unit gradients in the same dtype.
fn on_cpu(
    op: &CzNceOp,
    (s1, l1): (&CpuStorage, &Layout),
    (s2, l2): (&CpuStorage, &Layout),
    want_grad: bool,
) -> candle_core::Result<(CpuStorage, Option<UnitGrads>)> {
    fn run<T: Real>(
        op: &CzNceOp,
        (q, k): (&[T], &[T]),
        (b, d): (usize, usize),
        want_grad: bool,
    ) -> candle_core::Result<(T, Option<UnitGrads>)> {
        let scale = T::lit(op.scale.value);
        let out = match op.rows {
            None => cpu::cz_nce(q, k, b, d, scale, op.spec, want_grad),
            Some(rows) => rows::cz_nce_rows((q, k), (b, d), rows, scale, op.spec, want_grad),
        };
        let grads = match out.grads {
            None => None,
            Some(g) => Some(UnitGrads {
                dq: T::into_tensor(g.dq, b, d)?,
                dk: T::into_tensor(g.dk, b, d)?,
                dlog_scale: T::into_tensor(vec![g.dlog_scale], 1, 1)?.reshape(1)?,
            }),
        };
        Ok((out.loss, grads))
    }
    if s1.dtype() == DType::F64 {
        let (q, b, d) = gather::<f64>(s1, l1)?;
        let (k, _, _) = gather::<f64>(s2, l2)?;
        let (loss, grads) = run(op, (&q, &k), (b, d), want_grad)?;
        Ok((CpuStorage::F64(vec![loss]), grads))
    } else {
        let (q, b, d) = gather_f32(s1, l1)?;
        let (k, _, _) = gather_f32(s2, l2)?;
        let (loss, grads) = run(op, (&q, &k), (b, d), want_grad)?;
        Ok((CpuStorage::F32(vec![loss]), grads))
    }
}

/// Reads a rank-2 CPU storage through its layout into a row-major `Vec` of `T`.
fn gather<T: Real>(s: &CpuStorage, l: &Layout) -> candle_core::Result<(Vec<T>, usize, usize)> {
    let (b, d) = l.shape().dims2()?;
    let st = l.stride();
    let (s0, s1, off) = (st[0], st[1], l.start_offset());
    fn read<S: Copy + Sync, T: Real>(
        v: &[S],
        (b, d, s0, s1, off): (usize, usize, usize, usize, usize),
        f: impl Fn(S) -> T + Sync,
    ) -> Vec<T> {
        let mut out = vec![T::ZERO; b * d];
        out.par_chunks_mut(d).enumerate().for_each(|(i, row)| {
            let base = off + i * s0;
            if s1 == 1 {
                for (o, &x) in row.iter_mut().zip(&v[base..base + d]) {
                    *o = f(x);
                }
            } else {
                for (j, o) in row.iter_mut().enumerate() {
                    *o = f(v[base + j * s1]);
                }
            }
        });
        out
    }
    let g = (b, d, s0, s1, off);
    let out = match s {
        CpuStorage::F32(v) => read(v, g, |x| T::from_f32(x)),
        CpuStorage::F64(v) => read(v, g, |x| T::lit(x)),
        CpuStorage::F16(v) => read(v, g, |x| T::from_f32(x.to_f32())),
        CpuStorage::BF16(v) => read(v, g, |x| T::from_f32(x.to_f32())),
        other => candle_core::bail!(
            "cz_nce fused: unsupported dtype {:?} (use f32, f16, bf16 or f64)",
            other.dtype()
        ),
    };
    Ok((out, b, d))
}

/// [`gather`] into f32, borrowing instead of copying when the input already is contiguous f32.
fn gather_f32<'a>(
    s: &'a CpuStorage,
    l: &Layout,
) -> candle_core::Result<(Cow<'a, [f32]>, usize, usize)> {
    if let (CpuStorage::F32(v), Some((start, end))) = (s, l.contiguous_offsets()) {
        let (b, d) = l.shape().dims2()?;
        return Ok((Cow::Borrowed(&v[start..end]), b, d));
    }
    let (v, b, d) = gather::<f32>(s, l)?;
    Ok((Cow::Owned(v), b, d))
}

// ---------------------------------------------------------------- CUDA

/// The CUDA kernel on two storages: the f32 loss and, if `want_grad`, the unit gradients
/// (views into the one packed f32 buffer `[∂L/∂q | ∂L/∂k | ∂L/∂log s]` the kernel writes).
#[cfg(feature = "cuda")]
fn on_cuda(
    op: &CzNceOp,
    q: (&candle_core::CudaStorage, &Layout),
    k: (&candle_core::CudaStorage, &Layout),
    want_grad: bool,
) -> candle_core::Result<(candle_core::CudaStorage, Option<UnitGrads>)> {
    if op.rows.is_some() {
        candle_core::bail!("cz_nce: the CUDA kernel takes whole batches, not bands of rows");
    }
    let (b, d) = q.1.shape().dims2()?;
    let (loss, packed) =
        crate::ops::cuda::cz_nce::cz_nce(q, k, op.scale.value as f32, op.spec, want_grad)?;
    let grads = match packed {
        None => None,
        Some(p) => {
            let packed = Tensor::from_storage(
                Storage::Cuda(p),
                2 * b * d + 1,
                candle_core::op::BackpropOp::none(),
                false,
            );
            let part = |i: usize| packed.narrow(0, i * b * d, b * d)?.reshape((b, d));
            Some(UnitGrads {
                dq: part(0)?,
                dk: part(1)?,
                dlog_scale: packed.narrow(0, 2 * b * d, 1)?,
            })
        }
    };
    Ok((loss, grads))
}
