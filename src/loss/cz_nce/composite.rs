//! The composite reference twin: the same loss from plain candle ops, differentiable through
//! candle's autograd on every device.
//!
//! - Inputs are cast to f32 (f64 stays f64).
//! - Normalization: `x / sqrt(max(Σx², ε²))` with `ε = 1e-8`, i.e. `x / max(‖x‖, ε)`; taking the
//!   max *before* the square root keeps the backward finite for zero rows (the gradient of
//!   `sqrt` at 0 would be infinite).
//! - Masked logits get `-inf` added; every row keeps at least one finite entry (the caller
//!   rejects CZ-NCE with `B = 1`), so the row max is finite, `exp(-inf - max) = 0` and no NaN
//!   appears forwards or backwards.
//! - Log-sum-exp is `m + log Σ exp(x - m)` with the row max `m` detached (its gradient cancels
//!   exactly), built from `max_keepdim`, `exp`, `sum_keepdim`, `log`: ops that all have a
//!   backward in candle (no `softmax_last_dim` fast path).

use crate::ops::cz_nce::{LogitScale, Spec, NORM_EPS};
use candle_core::{DType, Tensor, D};

fn normalize(x: &Tensor) -> candle_core::Result<Tensor> {
    let n = x
        .sqr()?
        .sum_keepdim(D::Minus1)?
        .maximum(NORM_EPS * NORM_EPS)?
        .sqrt()?;
    x.broadcast_div(&n)
}

/// `[B, B]` matrix with `-inf` on the diagonal and 0 elsewhere (built in f32: Metal has no f64).
fn diag_mask(b: usize, dtype: DType, dev: &candle_core::Device) -> candle_core::Result<Tensor> {
    let v: Vec<f32> = (0..b * b)
        .map(|i| {
            if i % (b + 1) == 0 {
                f32::NEG_INFINITY
            } else {
                0.0
            }
        })
        .collect();
    Tensor::from_vec(v, (b, b), dev)?.to_dtype(dtype)
}

/// Mean row loss of one direction: `blocks[0]` is the cross block (positive on the diagonal),
/// the other blocks have their diagonal masked.
fn direction(blocks: &[Tensor], include_positive: bool) -> candle_core::Result<Tensor> {
    let cross = &blocks[0];
    let (b, _) = cross.dims2()?;
    let (dtype, dev) = (cross.dtype(), cross.device());
    let mask = diag_mask(b, dtype, dev)?;
    let eye = Tensor::eye(b, dtype, dev)?;
    let pos = (cross * &eye)?.sum(1)?;
    let mut parts = Vec::with_capacity(blocks.len());
    for (i, blk) in blocks.iter().enumerate() {
        if i == 0 && include_positive {
            parts.push(blk.clone());
        } else {
            parts.push((blk + &mask)?);
        }
    }
    let row = Tensor::cat(&parts, 1)?;
    let m = row.max_keepdim(1)?.detach();
    let lse = (row.broadcast_sub(&m)?.exp()?.sum_keepdim(1)?.log()? + m)?.squeeze(1)?;
    (lse - pos)?.mean_all()
}

/// The composite loss. `log_scale` is the learnable `θ` (`None` for a fixed temperature), whose
/// resolved and clamped value is `scale`.
pub(crate) fn forward(
    q: &Tensor,
    k: &Tensor,
    spec: Spec,
    scale: LogitScale,
    log_scale: Option<&Tensor>,
) -> candle_core::Result<Tensor> {
    let dtype = if q.dtype() == DType::F64 {
        DType::F64
    } else {
        DType::F32
    };
    let q = q.to_dtype(dtype)?;
    let k = k.to_dtype(dtype)?;
    let (qh, kh) = if spec.normalize {
        (normalize(&q)?, normalize(&k)?)
    } else {
        (q, k)
    };
    let s = match log_scale {
        None => None,
        Some(ls) => {
            let ls = ls.to_dtype(dtype)?.flatten_all()?;
            let s = if scale.clamped {
                // `θ·0 + max`: torch.clamp's value and zero gradient. θ must stay in the graph
                // (the fused op returns a zero gradient, not none), and candle drops the
                // argument of `affine(0, ·)` from it, hence the product with a zero tensor.
                ((&ls * ls.zeros_like()?)? + scale.value)?
            } else {
                ls.exp()?
            };
            Some(s.reshape(())?)
        }
    };
    let apply_scale = |x: Tensor| -> candle_core::Result<Tensor> {
        match &s {
            Some(s) => x.broadcast_mul(s),
            None => x * scale.value,
        }
    };
    let need_in = spec.anchor_negatives || (spec.symmetric && spec.target_negatives);
    let need_kk = spec.target_negatives || (spec.symmetric && spec.anchor_negatives);
    let s_out = apply_scale(qh.matmul(&kh.t()?)?)?;
    let s_in = if need_in {
        Some(apply_scale(qh.matmul(&qh.t()?)?)?)
    } else {
        None
    };
    let s_kk = if need_kk {
        Some(apply_scale(kh.matmul(&kh.t()?)?)?)
    } else {
        None
    };
    let pick = |x: &Option<Tensor>| x.clone().expect("block computed");

    let mut blocks = vec![s_out.clone()];
    if spec.anchor_negatives {
        blocks.push(pick(&s_in));
    }
    if spec.target_negatives {
        blocks.push(pick(&s_kk));
    }
    let forward_loss = direction(&blocks, spec.include_positive)?;
    if !spec.symmetric {
        return Ok(forward_loss);
    }
    let mut blocks = vec![s_out.t()?];
    if spec.anchor_negatives {
        blocks.push(pick(&s_kk));
    }
    if spec.target_negatives {
        blocks.push(pick(&s_in));
    }
    let backward_loss = direction(&blocks, spec.include_positive)?;
    (forward_loss + backward_loss)? * 0.5
}
