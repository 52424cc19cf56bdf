//! The attention softmax: `softmax(scale * x + mask)` over the last dimension.

use std::sync::Arc;

use candle_core::WithDType;
use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Shape, Tensor, D};
use rayon::prelude::*;

use super::kernel::{
    check_cpu, check_float, check_same, dispatch, lane_sum, rows_per_task, slice, Elem, Real,
};
use crate::{Error, Result};

/// `softmax(scale * x + mask)` over the last dimension: the fused kernel on the CPU, the
/// composite elsewhere.
///
/// # Shapes
/// - `x`: `[..., n]`, for attention `[batch, heads, queries, keys]`
/// - `mask`: additive, broadcastable to `x` (each dimension 1 or equal, missing leading
///   dimensions count as 1), for attention `[batch, 1, 1, keys]`; same dtype and device as `x`
/// - output: the shape of `x`
pub fn softmax_scaled_masked(x: &Tensor, scale: f64, mask: Option<&Tensor>) -> Result<Tensor> {
    if x.device().is_cpu() {
        softmax_scaled_masked_fused(x, scale, mask)
    } else {
        softmax_scaled_masked_composite(x, scale, mask)
    }
}

/// Checks the mask and returns, for each dimension of `x`, the mask's stride along it (0 where
/// the mask broadcasts).
fn check(x: &Tensor, mask: Option<&Tensor>) -> Result<Vec<usize>> {
    const OP: &str = "softmax_scaled_masked";
    check_float(x, OP)?;
    let Some(mask) = mask else {
        return Ok(vec![0; x.rank()]);
    };
    check_same(x, mask, OP)?;
    let (xd, md) = (x.dims(), mask.dims());
    let lead = xd.len().checked_sub(md.len());
    let fits = lead.is_some_and(|lead| md.iter().zip(&xd[lead..]).all(|(&m, &n)| m == 1 || m == n));
    let Some(lead) = lead.filter(|_| fits) else {
        return Err(Error::ShapeMismatch {
            name: format!("{OP} mask (broadcast to {xd:?})"),
            expected: xd.to_vec(),
            actual: md.to_vec(),
        });
    };
    let mut strides = vec![0; xd.len()];
    let mut stride = 1;
    for (d, &m) in md.iter().enumerate().rev() {
        if m != 1 {
            strides[lead + d] = stride;
        }
        stride *= m;
    }
    Ok(strides)
}

/// The composite twin: scale, mask and softmax as candle ops, in f32 for half precision.
pub fn softmax_scaled_masked_composite(
    x: &Tensor,
    scale: f64,
    mask: Option<&Tensor>,
) -> Result<Tensor> {
    check(x, mask)?;
    let dtype = x.dtype();
    let acc = crate::encoder::accumulation_dtype(dtype);
    let mut z = (x.to_dtype(acc)? * scale)?;
    if let Some(mask) = mask {
        z = z.broadcast_add(&mask.to_dtype(acc)?)?;
    }
    Ok(candle_nn::ops::softmax(&z, D::Minus1)?.to_dtype(dtype)?)
}

/// The attention softmax as one CPU kernel per row (scale, mask, max, exponentials, sum and
/// normalisation in one pass over the row), with a fused backward.
pub fn softmax_scaled_masked_fused(
    x: &Tensor,
    scale: f64,
    mask: Option<&Tensor>,
) -> Result<Tensor> {
    let mask_strides = check(x, mask)?;
    check_cpu(x, "softmax_scaled_masked")?;
    let op = SoftmaxOp {
        scale,
        dims: x.dims().to_vec(),
        mask_strides,
    };
    let x = x.contiguous()?;
    Ok(match mask {
        Some(mask) => x.apply_op2_arc(&mask.contiguous()?, Arc::new(Box::new(op)))?,
        None => x.apply_op1_arc(Arc::new(Box::new(op)))?,
    })
}

struct SoftmaxOp {
    scale: f64,
    dims: Vec<usize>,
    mask_strides: Vec<usize>,
}

impl SoftmaxOp {
    /// Offset of row `row`'s mask in the mask buffer.
    fn mask_offset(&self, mut row: usize) -> usize {
        let lead = self.dims.len() - 1;
        let mut offset = 0;
        for d in (0..lead).rev() {
            offset += (row % self.dims[d]) * self.mask_strides[d];
            row /= self.dims[d];
        }
        offset
    }

    fn forward<T: Elem>(&self, x: &[T], mask: Option<&[T]>) -> Vec<T> {
        let n = self.dims.last().copied().unwrap_or(1).max(1);
        let col_stride = self.mask_strides.last().copied().unwrap_or(0);
        let scale = T::A::lit(self.scale);
        let rpt = rows_per_task(n);
        let mut out = vec![T::elem_zero(); x.len()];
        out.par_chunks_mut(n * rpt)
            .zip(x.par_chunks(n * rpt))
            .enumerate()
            .for_each(|(task, (out, x))| {
                let mut z = vec![T::A::ZERO; n];
                for (r, (y, x)) in out.chunks_exact_mut(n).zip(x.chunks_exact(n)).enumerate() {
                    let row = task * rpt + r;
                    match mask {
                        Some(mask) => {
                            let m = &mask[self.mask_offset(row)..];
                            for j in 0..n {
                                z[j] = scale * Elem::load(x[j]) + m[j * col_stride].load();
                            }
                        }
                        None => {
                            for j in 0..n {
                                z[j] = scale * Elem::load(x[j]);
                            }
                        }
                    }
                    let max = z.iter().fold(z[0], |a, &b| a.max(b));
                    for v in z.iter_mut() {
                        *v = (*v - max).exp();
                    }
                    let inv = T::A::ONE / lane_sum(n, |j| z[j]);
                    for j in 0..n {
                        y[j] = T::store(z[j] * inv);
                    }
                }
            });
        out
    }
}

impl CustomOp1 for SoftmaxOp {
    fn name(&self) -> &'static str {
        "fused-softmax"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        dispatch!(s, "fused-softmax", |T| {
            let out = self.forward::<T>(slice(s, l)?, None);
            Ok((T::to_cpu_storage_owned(out), l.shape().clone()))
        })
    }

    fn bwd(&self, _x: &Tensor, y: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(y.apply_op2_no_bwd(
            &grad.contiguous()?,
            &SoftmaxBwd { scale: self.scale },
        )?))
    }
}

impl CustomOp2 for SoftmaxOp {
    fn name(&self) -> &'static str {
        "fused-softmax-masked"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        dispatch!(s1, "fused-softmax-masked", |T| {
            let out = self.forward::<T>(slice(s1, l1)?, Some(slice(s2, l2)?));
            Ok((T::to_cpu_storage_owned(out), l1.shape().clone()))
        })
    }

    fn bwd(
        &self,
        x: &Tensor,
        mask: &Tensor,
        y: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let grad = grad.contiguous()?;
        if !mask.track_op() {
            let dx = y.apply_op2_no_bwd(&grad, &SoftmaxBwd { scale: self.scale })?;
            return Ok((Some(dx), None));
        }
        // A trained mask: its gradient is the pre-scale one summed over the broadcast dims.
        let dz = y.apply_op2_no_bwd(&grad, &SoftmaxBwd { scale: 1.0 })?;
        let mut dmask = dz.clone();
        let lead = x.rank() - mask.rank();
        for (d, &m) in mask.dims().iter().enumerate() {
            if m == 1 && x.dim(lead + d)? != 1 {
                dmask = dmask.sum_keepdim(lead + d)?;
            }
        }
        for _ in 0..lead {
            dmask = dmask.sum(0)?;
        }
        let dx = x.track_op().then(|| dz * self.scale).transpose()?;
        Ok((dx, Some(dmask.reshape(mask.shape())?)))
    }
}

/// The softmax backward: `scale * y * (g - sum(g * y))` per row, from the output `y` and its
/// gradient `g`.
struct SoftmaxBwd {
    scale: f64,
}

fn backward<T: Elem>(y: &[T], g: &[T], n: usize, scale: f64) -> Vec<T> {
    let scale = T::A::lit(scale);
    let rpt = rows_per_task(n);
    let mut out = vec![T::elem_zero(); y.len()];
    out.par_chunks_mut(n * rpt)
        .zip(y.par_chunks(n * rpt))
        .zip(g.par_chunks(n * rpt))
        .for_each(|((out, y), g)| {
            for ((dx, y), g) in out
                .chunks_exact_mut(n)
                .zip(y.chunks_exact(n))
                .zip(g.chunks_exact(n))
            {
                let dot = lane_sum(n, |j| Elem::load(g[j]) * Elem::load(y[j]));
                for j in 0..n {
                    dx[j] = T::store(scale * Elem::load(y[j]) * (Elem::load(g[j]) - dot));
                }
            }
        });
    out
}

impl CustomOp2 for SoftmaxBwd {
    fn name(&self) -> &'static str {
        "fused-softmax-bwd"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let n = l1.dims().last().copied().unwrap_or(1).max(1);
        dispatch!(s1, "fused-softmax-bwd", |T| {
            let out = backward::<T>(slice(s1, l1)?, slice(s2, l2)?, n, self.scale);
            Ok((T::to_cpu_storage_owned(out), l1.shape().clone()))
        })
    }
}
