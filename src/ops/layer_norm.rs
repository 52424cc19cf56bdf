//! LayerNorm over the last dimension: `(x - mean) / sqrt(var + eps) * weight + bias`.

use std::sync::{Arc, OnceLock};

use candle_core::WithDType;
use candle_core::{CpuStorage, CustomOp3, Layout, Shape, Tensor, D};
use rayon::prelude::*;

use super::kernel::{
    check_device, check_float, check_same, dispatch, fused_supported, lane_sum, rows_per_task,
    slice,
};
use super::num::{Elem, Real};
use crate::{Error, Result};

/// LayerNorm over the last dimension: the fused kernel where it runs (the CPU; CUDA for f32,
/// f16 and bf16), the composite elsewhere.
///
/// # Shapes
/// - `x`: `[..., hidden]`; `weight`, `bias`: `[hidden]`, same dtype and device as `x`
/// - output: the shape of `x`
pub fn layer_norm(x: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64) -> Result<Tensor> {
    if fused_supported(x) {
        layer_norm_fused(x, weight, bias, eps)
    } else {
        layer_norm_composite(x, weight, bias, eps)
    }
}

fn check(x: &Tensor, weight: &Tensor, bias: &Tensor, op: &'static str) -> Result<usize> {
    check_float(x, op)?;
    let hidden = x.dim(D::Minus1)?;
    if hidden == 0 {
        // The mean of no entries is undefined (and the CPU kernel would split rows of 0).
        return Err(Error::InvalidArgument(format!(
            "{op}: hidden size 0 (input shape {:?})",
            x.dims()
        )));
    }
    for (name, t) in [("weight", weight), ("bias", bias)] {
        check_same(x, t, op)?;
        if t.dims() != [hidden] {
            return Err(Error::ShapeMismatch {
                name: format!("{op} {name}"),
                expected: vec![hidden],
                actual: t.dims().to_vec(),
            });
        }
    }
    Ok(hidden)
}

/// LayerNorm as a chain of candle ops (statistics in f32 for half precision, the affine part in
/// the input dtype). Differentiable on every device.
pub fn layer_norm_composite(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    eps: f64,
) -> Result<Tensor> {
    check(x, weight, bias, "layer_norm")?;
    let dtype = x.dtype();
    let xs = x.to_dtype(super::num::accumulation_dtype(dtype))?;
    let mean = xs.mean_keepdim(D::Minus1)?;
    let centered = xs.broadcast_sub(&mean)?;
    let var = centered.sqr()?.mean_keepdim(D::Minus1)?;
    let normed = centered.broadcast_div(&(var + eps)?.sqrt()?)?;
    Ok(normed
        .to_dtype(dtype)?
        .broadcast_mul(weight)?
        .broadcast_add(bias)?)
}

/// LayerNorm as one kernel (CPU, or CUDA for f32, f16 and bf16) that saves each row's mean and
/// reciprocal standard deviation for its fused backward. Statistics and the affine part run in
/// f32 for half precision (one rounding at the end).
pub fn layer_norm_fused(x: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64) -> Result<Tensor> {
    check(x, weight, bias, "layer_norm")?;
    check_device(x, "layer_norm")?;
    let op = LayerNormOp {
        eps,
        stats: Arc::new(OnceLock::new()),
    };
    Ok(x.contiguous()?.apply_op3_arc(
        &weight.contiguous()?,
        &bias.contiguous()?,
        Arc::new(Box::new(op)),
    )?)
}

/// Per-row mean and reciprocal standard deviation, in the accumulation type, where the forward
/// ran.
enum Stats {
    Cpu {
        mean: CpuStorage,
        rstd: CpuStorage,
    },
    #[cfg(feature = "cuda")]
    Cuda {
        mean: candle_core::cuda_backend::cudarc::driver::CudaSlice<f32>,
        rstd: candle_core::cuda_backend::cudarc::driver::CudaSlice<f32>,
    },
}

struct LayerNormOp {
    eps: f64,
    stats: Arc<OnceLock<Stats>>,
}

fn forward<T: Elem>(
    x: &[T],
    w: &[T],
    b: &[T],
    hidden: usize,
    eps: f64,
) -> (Vec<T>, Vec<T::A>, Vec<T::A>) {
    let rows = x.len() / hidden;
    let mut out = vec![T::elem_zero(); x.len()];
    let mut mean = vec![T::A::ZERO; rows];
    let mut rstd = vec![T::A::ZERO; rows];
    let rpt = rows_per_task(hidden);
    let inv_n = T::A::ONE / T::A::lit(hidden as f64);
    let eps = T::A::lit(eps);
    out.par_chunks_mut(hidden * rpt)
        .zip(x.par_chunks(hidden * rpt))
        .zip(mean.par_chunks_mut(rpt))
        .zip(rstd.par_chunks_mut(rpt))
        .for_each(|(((out, x), mean), rstd)| {
            for (((y, x), m), r) in out
                .chunks_exact_mut(hidden)
                .zip(x.chunks_exact(hidden))
                .zip(mean.iter_mut())
                .zip(rstd.iter_mut())
            {
                let mu = lane_sum(hidden, |i| Elem::load(x[i])) * inv_n;
                let var = lane_sum(hidden, |i| {
                    let c = Elem::load(x[i]) - mu;
                    c * c
                }) * inv_n;
                let rs = T::A::ONE / (var + eps).sqrt();
                for i in 0..hidden {
                    y[i] = T::store(
                        (Elem::load(x[i]) - mu) * rs * Elem::load(w[i]) + Elem::load(b[i]),
                    );
                }
                *m = mu;
                *r = rs;
            }
        });
    (out, mean, rstd)
}

impl CustomOp3 for LayerNormOp {
    fn name(&self) -> &'static str {
        "fused-layer-norm"
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
        let hidden = l1.dims().last().copied().unwrap_or(1);
        dispatch!(s1, "fused-layer-norm", |T| {
            let (out, mean, rstd) = forward::<T>(
                slice(s1, l1)?,
                slice(s2, l2)?,
                slice(s3, l3)?,
                hidden,
                self.eps,
            );
            // A second forward through the same op value would only recompute the same stats.
            let _ = self.stats.set(Stats::Cpu {
                mean: <T as Elem>::A::to_cpu_storage_owned(mean),
                rstd: <T as Elem>::A::to_cpu_storage_owned(rstd),
            });
            Ok((T::to_cpu_storage_owned(out), l1.shape().clone()))
        })
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let (y, mean, rstd) = super::cuda::layer_norm_fwd((s1, l1), (s2, l2), (s3, l3), self.eps)?;
        let _ = self.stats.set(Stats::Cuda { mean, rstd });
        Ok((y, l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        weight: &Tensor,
        bias: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let hidden = x.dim(D::Minus1)?;
        let n = x.elem_count();
        let packed = x.apply_op3_no_bwd(
            weight,
            &grad.contiguous()?,
            &LayerNormBwd {
                stats: self.stats.clone(),
            },
        )?;
        let dx = packed.narrow(0, 0, n)?.reshape(x.shape())?;
        let dw = packed.narrow(0, n, hidden)?;
        let db = packed.narrow(0, n + hidden, hidden)?;
        Ok((
            x.track_op().then_some(dx),
            weight.track_op().then_some(dw),
            bias.track_op().then_some(db),
        ))
    }
}

/// The backward of [`LayerNormOp`]: `[dx (flattened), dweight, dbias]` in one buffer, from `x`,
/// `weight`, the output gradient and the saved statistics.
struct LayerNormBwd {
    stats: Arc<OnceLock<Stats>>,
}

fn backward<T: Elem>(
    x: &[T],
    w: &[T],
    g: &[T],
    mean: &[T::A],
    rstd: &[T::A],
    hidden: usize,
) -> Vec<T> {
    let n = x.len();
    let mut out = vec![T::elem_zero(); n + 2 * hidden];
    let (dx, tail) = out.split_at_mut(n);
    let rpt = rows_per_task(hidden);
    let inv_n = T::A::ONE / T::A::lit(hidden as f64);
    // Weight and bias gradients: one partial sum per block of `rpt` rows, added in block order,
    // so the result does not depend on the number of threads.
    let partials: Vec<Vec<T::A>> = dx
        .par_chunks_mut(hidden * rpt)
        .zip(x.par_chunks(hidden * rpt))
        .zip(g.par_chunks(hidden * rpt))
        .zip(mean.par_chunks(rpt))
        .zip(rstd.par_chunks(rpt))
        .map(|((((dx, x), g), mean), rstd)| {
            let mut part = vec![T::A::ZERO; 2 * hidden];
            let (pw, pb) = part.split_at_mut(hidden);
            for ((((dx, x), g), &mu), &rs) in dx
                .chunks_exact_mut(hidden)
                .zip(x.chunks_exact(hidden))
                .zip(g.chunks_exact(hidden))
                .zip(mean)
                .zip(rstd)
            {
                let xhat = |i: usize| (Elem::load(x[i]) - mu) * rs;
                let a = lane_sum(hidden, |i| Elem::load(g[i]) * Elem::load(w[i])) * inv_n;
                let c = lane_sum(hidden, |i| Elem::load(g[i]) * Elem::load(w[i]) * xhat(i)) * inv_n;
                for i in 0..hidden {
                    let gi = Elem::load(g[i]);
                    let xh = xhat(i);
                    dx[i] = T::store(rs * (gi * Elem::load(w[i]) - a - xh * c));
                    pw[i] += gi * xh;
                    pb[i] += gi;
                }
            }
            part
        })
        .collect();
    let mut total = vec![T::A::ZERO; 2 * hidden];
    for part in &partials {
        for (t, p) in total.iter_mut().zip(part) {
            *t += *p;
        }
    }
    for (t, s) in tail.iter_mut().zip(total) {
        *t = T::store(s);
    }
    out
}

impl CustomOp3 for LayerNormBwd {
    fn name(&self) -> &'static str {
        "fused-layer-norm-bwd"
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
        let hidden = l1.dims().last().copied().unwrap_or(1);
        let Some(Stats::Cpu { mean, rstd }) = self.stats.get() else {
            candle_core::bail!("fused-layer-norm: backward before a CPU forward");
        };
        dispatch!(s1, "fused-layer-norm-bwd", |T| {
            let mean = <T as Elem>::A::cpu_storage_as_slice(mean)?;
            let rstd = <T as Elem>::A::cpu_storage_as_slice(rstd)?;
            let out = backward::<T>(
                slice(s1, l1)?,
                slice(s2, l2)?,
                slice(s3, l3)?,
                mean,
                rstd,
                hidden,
            );
            let len = out.len();
            Ok((T::to_cpu_storage_owned(out), Shape::from(len)))
        })
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let Some(Stats::Cuda { mean, rstd }) = self.stats.get() else {
            candle_core::bail!("fused-layer-norm: backward before a CUDA forward");
        };
        let hidden = l1.dims().last().copied().unwrap_or(1);
        let packed = super::cuda::layer_norm_bwd((s1, l1), (s2, l2), (s3, l3), mean, rstd)?;
        Ok((packed, Shape::from(l1.shape().elem_count() + 2 * hidden)))
    }
}
