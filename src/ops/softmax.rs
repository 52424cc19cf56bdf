//! The attention softmax: `softmax(scale * x + mask)` over the last dimension.

use std::sync::Arc;

use candle_core::WithDType;
use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Shape, Tensor, D};
use rayon::prelude::*;

use super::kernel::{
    check_device, check_float, check_same, dispatch, fused_supported, lane_sum, rows_per_task,
    slice,
};
use super::num::{Elem, Real};
use crate::{Error, Result};

/// `softmax(scale * x + mask)` over the last dimension: the fused kernel where it runs (the CPU;
/// CUDA for f32, f16 and bf16 and masks whose broadcast leading dimensions merge into four),
/// the composite elsewhere.
///
/// # Shapes
/// - `x`: `[..., n]`, for attention `[batch, heads, queries, keys]`
/// - `mask`: additive, broadcastable to `x` (each dimension 1 or equal, missing leading
///   dimensions count as 1), for attention `[batch, 1, 1, keys]`; same dtype and device as `x`
/// - output: the shape of `x`
///
/// A row whose every entry is masked with `-inf` (a query with no key to attend to) gives
/// zeros, and passes a zero gradient back, in the fused kernels (CPU and CUDA) and the
/// composite alike. PyTorch's `softmax` gives NaN there; fused attention kernels such as
/// FlashAttention give zeros. A finite mask (BERT's -10000) leaves such a row uniform.
pub fn softmax_scaled_masked(x: &Tensor, scale: f64, mask: Option<&Tensor>) -> Result<Tensor> {
    let cuda_indexable =
        || check(x, mask).is_ok_and(|strides| lead_index(x.dims(), &strides).is_some());
    if x.device().is_cpu() || (fused_supported(x) && cuda_indexable()) {
        softmax_scaled_masked_fused(x, scale, mask)
    } else {
        softmax_scaled_masked_composite(x, scale, mask)
    }
}

/// `z = softmax(z)` for one row of scaled and masked logits: the row's maximum subtracted,
/// exponentiated, divided by the sum (one reciprocal). A row whose every entry is `-inf` (fully
/// masked) becomes zeros, not 0/0.
#[inline(always)]
pub(crate) fn exp_normalise<A: Real>(z: &mut [A]) {
    let max = z.iter().fold(z[0], |a, &b| Real::max(a, b));
    if max == A::NEG_INFINITY {
        z.fill(A::ZERO);
        return;
    }
    for v in z.iter_mut() {
        *v = (*v - max).exp();
    }
    let inv = A::ONE / lane_sum(z.len(), |j| z[j]);
    for v in z.iter_mut() {
        *v *= inv;
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

/// The leading dimensions of `dims` (all but the last) as exactly four, with the mask's stride
/// along each (the CUDA kernel's row indexing): size-1 dimensions dropped, neighbours merged
/// where the mask's strides allow (both broadcast, or contiguous), padded with size-1 dimensions
/// in front. `None` when more than four remain.
pub(crate) fn lead_index(dims: &[usize], mask_strides: &[usize]) -> Option<([i64; 4], [i64; 4])> {
    let lead = dims.len().saturating_sub(1);
    // (size, stride) groups, fastest first.
    let mut groups: Vec<(usize, usize)> = Vec::new();
    for d in (0..lead).rev() {
        let (size, stride) = (dims[d], mask_strides[d]);
        if size == 1 {
            continue;
        }
        match groups.last_mut() {
            Some((gs, gt)) if stride == *gt * *gs => *gs *= size,
            _ => groups.push((size, stride)),
        }
    }
    if groups.len() > 4 {
        return None;
    }
    let (mut d, mut s) = ([1i64; 4], [0i64; 4]);
    for (k, (size, stride)) in groups.into_iter().enumerate() {
        d[3 - k] = size as i64;
        s[3 - k] = stride as i64;
    }
    Some((d, s))
}

/// The composite twin: scale, mask and softmax as candle ops, in f32 for half precision.
pub fn softmax_scaled_masked_composite(
    x: &Tensor,
    scale: f64,
    mask: Option<&Tensor>,
) -> Result<Tensor> {
    check(x, mask)?;
    let dtype = x.dtype();
    let acc = super::num::accumulation_dtype(dtype);
    let mut z = (x.to_dtype(acc)? * scale)?;
    if let Some(mask) = mask {
        z = z.broadcast_add(&mask.to_dtype(acc)?)?;
    }
    // exp(z - max) / sum, as candle's softmax, except where a row's max is -inf (every entry
    // masked with -inf): there the shift is 0 and the divisor 1, so the row is exp(-inf) = 0.
    let max = z.max_keepdim(D::Minus1)?.detach();
    let live = max.ne(f64::NEG_INFINITY)?;
    let shift = live.where_cond(&max, &max.zeros_like()?)?;
    let e = z.broadcast_sub(&shift)?.exp()?;
    let sum = e.sum_keepdim(D::Minus1)?;
    let sum = live.where_cond(&sum, &sum.ones_like()?)?;
    Ok(e.broadcast_div(&sum)?.to_dtype(dtype)?)
}

/// The attention softmax as one kernel per row (scale, mask, max, exponentials, sum and
/// normalisation in one pass over the row; on CUDA one thread block per row), with a fused
/// backward. On CUDA: f32, f16 and bf16, and a mask whose broadcast leading dimensions merge
/// into four (any attention mask does).
pub fn softmax_scaled_masked_fused(
    x: &Tensor,
    scale: f64,
    mask: Option<&Tensor>,
) -> Result<Tensor> {
    let mask_strides = check(x, mask)?;
    check_device(x, "softmax_scaled_masked")?;
    if !x.device().is_cpu() && lead_index(x.dims(), &mask_strides).is_none() {
        return Err(Error::InvalidArgument(format!(
            "softmax_scaled_masked: the CUDA kernel indexes the mask over at most four leading \
             dimensions; the mask's strides {mask_strides:?} over {:?} need more",
            x.dims()
        )));
    }
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

    /// The CUDA forward, with or without a mask.
    #[cfg(feature = "cuda")]
    fn cuda_forward(
        &self,
        x: (&candle_core::CudaStorage, &Layout),
        mask: Option<(&candle_core::CudaStorage, &Layout)>,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let Some(lead) = lead_index(&self.dims, &self.mask_strides) else {
            candle_core::bail!("fused-softmax: mask strides need more than four leading dims");
        };
        let col_stride = self.mask_strides.last().copied().unwrap_or(0);
        let y = super::cuda::softmax_fwd(x, mask, (lead, col_stride), self.scale)?;
        Ok((y, x.1.shape().clone()))
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
                    exp_normalise(&mut z);
                    for j in 0..n {
                        y[j] = T::store(z[j]);
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

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        self.cuda_forward((s, l), None)
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

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        self.cuda_forward((s1, l1), Some((s2, l2)))
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

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let dx = super::cuda::softmax_bwd((s1, l1), (s2, l2), self.scale)?;
        Ok((dx, l1.shape().clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::lead_index;

    #[test]
    fn leading_dimensions_merge_into_four() {
        // Attention: x [b, h, q, k], mask [b, 1, 1, k] (strides [k, 0, 0, 1]): heads and queries
        // merge (both broadcast).
        assert_eq!(
            lead_index(&[2, 12, 7, 5], &[5, 0, 0, 1]),
            Some(([1, 1, 2, 84], [0, 0, 5, 0]))
        );
        // A contiguous mask of x's own shape merges into one dimension.
        assert_eq!(
            lead_index(&[2, 3, 4, 5], &[60, 20, 5, 1]),
            Some(([1, 1, 1, 24], [0, 0, 0, 5]))
        );
        // Size-1 dimensions drop out; no mask at all is one broadcast dimension.
        assert_eq!(
            lead_index(&[1, 3, 1, 5], &[0, 0, 0, 0]),
            Some(([1, 1, 1, 3], [0, 0, 0, 0]))
        );
        assert_eq!(lead_index(&[5], &[1]), Some(([1; 4], [0; 4])));
        // Alternating broadcast and strided dimensions do not merge: five need more than four.
        assert_eq!(lead_index(&[2, 2, 2, 2, 2, 3], &[4, 0, 2, 0, 1, 0]), None);
        assert_eq!(
            lead_index(&[2, 2, 2, 2, 3], &[4, 0, 2, 0, 1]),
            Some(([2, 2, 2, 2], [4, 0, 2, 0]))
        );
    }
}
