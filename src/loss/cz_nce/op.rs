//! The candle custom op wrapping the fused kernels ([`super::cpu`], and [`super::cuda`] with
//! the `cuda` feature).
//!
//! `CustomOp2(q, k)` for a fixed temperature, `CustomOp3(q, k, log_scale)` for a learnable one.
//! The forward reads the inputs through their layouts (any strides / offset), converts f16 / bf16
//! to f32 (f64 stays f64 on the CPU), and runs the kernel. When the graph will need gradients and the
//! [`BackwardMode`] is [`BackwardMode::GradInForward`], the kernel also computes the exact
//! gradients right away and the op keeps them (`O(B·D)`); `bwd` then only scales them by the
//! upstream gradient. With [`BackwardMode::Recompute`] nothing is kept and `bwd` reruns the kernel.

use super::cpu::{self, Real, Spec};
use super::BackwardMode;
use candle_core::{
    backend::BackendStorage, CpuStorage, CustomOp2, CustomOp3, DType, Device, Layout, Shape, Tensor,
};
use rayon::prelude::*;
use std::borrow::Cow;
use std::sync::Mutex;

/// Gradients saved by the forward, in the accumulation dtype, for an upstream gradient of 1.
enum Saved {
    Host {
        dq: Tensor,
        dk: Tensor,
        dlog_scale: f64,
    },
    /// `[∂L/∂q | ∂L/∂k | ∂L/∂log s]`, f32, on the GPU (see [`super::cuda`]).
    #[cfg(feature = "cuda")]
    Packed(candle_core::CudaStorage),
}

pub(crate) struct CzNceOp {
    pub spec: Spec,
    /// `1 / t` for a fixed temperature; `None` when the scale is the op's third argument.
    pub fixed_scale: Option<f64>,
    /// Whether to compute gradients in the forward (inputs track gradients and the mode is
    /// [`BackwardMode::GradInForward`]).
    pub grad_in_forward: bool,
    pub mode: BackwardMode,
    saved: Mutex<Option<Saved>>,
}

impl CzNceOp {
    pub(crate) fn new(
        spec: Spec,
        fixed_scale: Option<f64>,
        grad_in_forward: bool,
        mode: BackwardMode,
    ) -> Self {
        Self {
            spec,
            fixed_scale,
            grad_in_forward,
            mode,
            saved: Mutex::new(None),
        }
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
        CpuStorage::F64(v) => read(v, g, |x| T::from_f64(x)),
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

fn scalar_of(s: &CpuStorage, l: &Layout) -> candle_core::Result<f64> {
    if l.shape().elem_count() != 1 {
        candle_core::bail!("cz_nce fused: log_scale must hold one element");
    }
    let i = l.start_offset();
    Ok(match s {
        CpuStorage::F32(v) => v[i] as f64,
        CpuStorage::F64(v) => v[i],
        CpuStorage::F16(v) => v[i].to_f64(),
        CpuStorage::BF16(v) => v[i].to_f64(),
        other => candle_core::bail!(
            "cz_nce fused: unsupported log_scale dtype {:?}",
            other.dtype()
        ),
    })
}

impl CzNceOp {
    /// `1 / t` of the fixed-temperature op (the `CustomOp2` form).
    fn fixed_scale(&self) -> candle_core::Result<f64> {
        self.fixed_scale
            .ok_or_else(|| candle_core::Error::Msg("cz_nce: no fixed scale".into()))
    }

    fn run<T: Real>(
        &self,
        q: &[T],
        k: &[T],
        b: usize,
        d: usize,
        scale: f64,
        want_grad: bool,
    ) -> candle_core::Result<(f64, Option<Saved>)> {
        let out = cpu::cz_nce(q, k, b, d, T::from_f64(scale), self.spec, want_grad);
        let saved = match out.grads {
            None => None,
            Some(g) => Some(Saved::Host {
                dq: T::into_tensor(g.dq, b, d)?,
                dk: T::into_tensor(g.dk, b, d)?,
                dlog_scale: g.dlog_scale.to_f64(),
            }),
        };
        Ok((out.loss.to_f64(), saved))
    }

    /// The shared forward: returns the f32 (f64 for f64 inputs) scalar loss.
    fn fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        scale: f64,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let want_grad = self.grad_in_forward && self.mode == BackwardMode::GradInForward;
        let (loss, saved) = if s1.dtype() == DType::F64 {
            let (q, b, d) = gather::<f64>(s1, l1)?;
            let (k, _, _) = gather::<f64>(s2, l2)?;
            let (l, s) = self.run(&q, &k, b, d, scale, want_grad)?;
            (CpuStorage::F64(vec![l]), s)
        } else {
            let (q, b, d) = gather_f32(s1, l1)?;
            let (k, _, _) = gather_f32(s2, l2)?;
            let (l, s) = self.run(&q, &k, b, d, scale, want_grad)?;
            (CpuStorage::F32(vec![l as f32]), s)
        };
        if let Some(s) = saved {
            *self.saved.lock().expect("cz_nce: poisoned lock") = Some(s);
        }
        Ok((loss, Shape::from(())))
    }

    /// The shared backward: `(dq, dk, dlog_scale)` for the upstream gradient `grad_res`;
    /// `dlog_scale` is a one-element f32 (f64) tensor on the inputs' device.
    fn bwd_impl(
        &self,
        q: &Tensor,
        k: &Tensor,
        scale: f64,
        grad_res: &Tensor,
    ) -> candle_core::Result<(Tensor, Tensor, Tensor)> {
        #[cfg(feature = "cuda")]
        if q.device().is_cuda() {
            return self.cuda_bwd(q, k, scale, grad_res);
        }
        let g = grad_res.to_dtype(DType::F64)?.to_scalar::<f64>()?;
        let saved = self.saved.lock().expect("cz_nce: poisoned lock").take();
        let saved = match saved {
            Some(s) => Some(s),
            None => {
                let (b, d) = q.dims2()?;
                if q.dtype() == DType::F64 {
                    let qv = q.flatten_all()?.to_vec1::<f64>()?;
                    let kv = k.flatten_all()?.to_vec1::<f64>()?;
                    self.run(&qv, &kv, b, d, scale, true)?.1
                } else {
                    let qv = q.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
                    let kv = k.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
                    self.run(&qv, &kv, b, d, scale, true)?.1
                }
            }
        };
        let Some(Saved::Host {
            dq,
            dk,
            dlog_scale: dls,
        }) = saved
        else {
            candle_core::bail!("cz_nce: the kernel returned no gradients");
        };
        let dq = cast_grad((dq * g)?, q.dtype())?;
        let dk = cast_grad((dk * g)?, k.dtype())?;
        Ok((dq, dk, Tensor::new(&[dls * g], &Device::Cpu)?))
    }

    /// The backward on CUDA: the packed gradients (saved by the forward, or recomputed by
    /// [`PackedGrads`]) are split and scaled on the device.
    #[cfg(feature = "cuda")]
    fn cuda_bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        scale: f64,
        grad_res: &Tensor,
    ) -> candle_core::Result<(Tensor, Tensor, Tensor)> {
        let (b, d) = q.dims2()?;
        let packed = q.apply_op2_no_bwd(k, &PackedGrads { op: self, scale })?;
        let g = grad_res.to_dtype(DType::F32)?.reshape((1, 1))?;
        let part = |i: usize| -> candle_core::Result<Tensor> {
            packed
                .narrow(0, i * b * d, b * d)?
                .reshape((b, d))?
                .broadcast_mul(&g)
        };
        let dq = cast_grad(part(0)?, q.dtype())?;
        let dk = cast_grad(part(1)?, k.dtype())?;
        let dls = packed
            .narrow(0, 2 * b * d, 1)?
            .broadcast_mul(&g.reshape(1)?)?;
        Ok((dq, dk, dls))
    }

    #[cfg(feature = "cuda")]
    fn cuda_forward(
        &self,
        q: (&candle_core::CudaStorage, &Layout),
        k: (&candle_core::CudaStorage, &Layout),
        scale: f64,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let want_grad = self.grad_in_forward && self.mode == BackwardMode::GradInForward;
        let (loss, packed) = super::cuda::cz_nce(q, k, scale as f32, self.spec, want_grad)?;
        if let Some(p) = packed {
            *self.saved.lock().expect("cz_nce: poisoned lock") = Some(Saved::Packed(p));
        }
        Ok((loss, Shape::from(())))
    }
}

/// The gradients of a [`CzNceOp`] as one f32 tensor `[2·B·D + 1]` (see [`super::cuda`]):
/// those its forward saved, or recomputed. Used by the CUDA backward only.
#[cfg(feature = "cuda")]
struct PackedGrads<'a> {
    op: &'a CzNceOp,
    scale: f64,
}

#[cfg(feature = "cuda")]
impl CustomOp2 for PackedGrads<'_> {
    fn name(&self) -> &'static str {
        "cz-nce-grads"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        candle_core::bail!("cz_nce: packed gradients are a CUDA-only path")
    }

    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let (b, d) = l1.shape().dims2()?;
        let shape = Shape::from(2 * b * d + 1);
        let saved = self.op.saved.lock().expect("cz_nce: poisoned lock").take();
        if let Some(Saved::Packed(p)) = saved {
            return Ok((p, shape));
        }
        let (_, packed) =
            super::cuda::cz_nce((s1, l1), (s2, l2), self.scale as f32, self.op.spec, true)?;
        match packed {
            Some(p) => Ok((p, shape)),
            None => candle_core::bail!("cz_nce: the kernel returned no gradients"),
        }
    }
}

/// Reads the one element of a scalar tensor's CUDA storage (the learnable log-scale).
#[cfg(feature = "cuda")]
fn cuda_scalar(s: &candle_core::CudaStorage, l: &Layout) -> candle_core::Result<f64> {
    use candle_core::cuda_backend::CudaStorageSlice;
    if l.shape().elem_count() != 1 {
        candle_core::bail!("cz_nce fused: log_scale must hold one element");
    }
    let i = l.start_offset();
    let dev = &s.device;
    Ok(match &s.slice {
        CudaStorageSlice::F32(v) => dev.clone_dtoh(&v.slice(i..i + 1))?[0] as f64,
        CudaStorageSlice::F64(v) => dev.clone_dtoh(&v.slice(i..i + 1))?[0],
        CudaStorageSlice::F16(v) => dev.clone_dtoh(&v.slice(i..i + 1))?[0].to_f64(),
        CudaStorageSlice::BF16(v) => dev.clone_dtoh(&v.slice(i..i + 1))?[0].to_f64(),
        _ => candle_core::bail!("cz_nce fused: unsupported log_scale dtype {:?}", s.dtype()),
    })
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
        let scale = self.fixed_scale()?;
        self.fwd(s1, l1, s2, l2, scale)
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let scale = self.fixed_scale()?;
        self.cuda_forward((s1, l1), (s2, l2), scale)
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let scale = self.fixed_scale()?;
        let (dq, dk, _) = self.bwd_impl(q, k, scale, grad_res)?;
        Ok((Some(dq), Some(dk)))
    }
}

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
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let scale = scalar_of(s3, l3)?.exp();
        self.fwd(s1, l1, s2, l2, scale)
    }

    #[cfg(feature = "cuda")]
    #[allow(clippy::too_many_arguments)]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let scale = cuda_scalar(s3, l3)?.exp();
        self.cuda_forward((s1, l1), (s2, l2), scale)
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        log_scale: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let scale = log_scale
            .to_dtype(DType::F64)?
            .flatten_all()?
            .to_vec1::<f64>()?[0]
            .exp();
        let (dq, dk, dls) = self.bwd_impl(q, k, scale, grad_res)?;
        let dls = dls
            .reshape(log_scale.shape())?
            .to_dtype(log_scale.dtype())?;
        Ok((Some(dq), Some(dk), Some(dls)))
    }
}
