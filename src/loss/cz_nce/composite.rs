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

/// `[len, n]` matrix with `-inf` at `(i, start + i)` (each row's own column) and 0 elsewhere
/// (built in f32: Metal has no f64).
fn diag_mask(
    (start, len): (usize, usize),
    n: usize,
    dtype: DType,
    dev: &candle_core::Device,
) -> candle_core::Result<Tensor> {
    let mut v = vec![0f32; len * n];
    for i in 0..len {
        v[i * n + start + i] = f32::NEG_INFINITY;
    }
    Tensor::from_vec(v, (len, n), dev)?.to_dtype(dtype)
}

/// Summed row losses of one direction over rows `start..start + len`, divided by `n` (the whole
/// batch): `blocks[0]` is the cross block (the positive of row `i` in column `start + i`), the
/// other blocks have that column masked.
fn direction(
    blocks: &[Tensor],
    rows: (usize, usize),
    include_positive: bool,
) -> candle_core::Result<Tensor> {
    let cross = &blocks[0];
    let (_, n) = cross.dims2()?;
    let (dtype, dev) = (cross.dtype(), cross.device());
    let mask = diag_mask(rows, n, dtype, dev)?;
    let pos = cross.narrow(1, rows.0, rows.1)?;
    let pos = (pos * Tensor::eye(rows.1, dtype, dev)?)?.sum(1)?;
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
    (lse - pos)?.sum_all()? / n as f64
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
    let n = q.dim(0)?;
    forward_rows(q, k, (0, n), spec, (scale, log_scale))
}

/// The composite loss's part of rows `start..start + len` (of both directions when
/// symmetric), divided by the whole batch's size: the parts of a partition of the rows add up
/// to [`forward`]. Only `[len, n]` blocks of logits are built.
pub(crate) fn forward_rows(
    q: &Tensor,
    k: &Tensor,
    rows: (usize, usize),
    spec: Spec,
    (scale, log_scale): (LogitScale, Option<&Tensor>),
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
    let s = scale_tensor(scale, log_scale, dtype)?;
    let apply_scale = |x: Tensor| -> candle_core::Result<Tensor> {
        match &s {
            Some(s) => x.broadcast_mul(s),
            None => x * scale.value,
        }
    };
    let (q_rows, k_rows) = (qh.narrow(0, rows.0, rows.1)?, kh.narrow(0, rows.0, rows.1)?);
    let gram = |a: &Tensor, b: &Tensor| apply_scale(a.matmul(&b.t()?)?);
    let s_out = gram(&q_rows, &kh)?;
    let s_in = spec.needs_in().then(|| gram(&q_rows, &qh)).transpose()?;
    let s_kk = spec.needs_kk().then(|| gram(&k_rows, &kh)).transpose()?;
    let pick = |x: &Option<Tensor>| x.clone().expect("block computed");

    let mut blocks = vec![s_out];
    if spec.anchor_negatives {
        blocks.push(pick(&s_in));
    }
    if spec.target_negatives {
        blocks.push(pick(&s_kk));
    }
    let forward_loss = direction(&blocks, rows, spec.include_positive)?;
    if !spec.symmetric {
        return Ok(forward_loss);
    }
    // k→q rows: [k̂ q̂ᵀ | Ŝ_kk | Ŝ_in], the same rows.
    let mut blocks = vec![gram(&k_rows, &qh)?];
    if spec.anchor_negatives {
        blocks.push(pick(&s_kk));
    }
    if spec.target_negatives {
        blocks.push(pick(&s_in));
    }
    let backward_loss = direction(&blocks, rows, spec.include_positive)?;
    (forward_loss + backward_loss)? * 0.5
}

/// The learnable scale `s = exp(θ)` as a tensor in the graph (`None` for a fixed temperature).
fn scale_tensor(
    scale: LogitScale,
    log_scale: Option<&Tensor>,
    dtype: DType,
) -> candle_core::Result<Option<Tensor>> {
    let Some(ls) = log_scale else {
        return Ok(None);
    };
    let ls = ls.to_dtype(dtype)?.flatten_all()?;
    let s = if scale.clamped {
        // `θ·0 + max`: torch.clamp's value and zero gradient. θ must stay in the graph (the
        // fused op returns a zero gradient, not none), and candle drops the argument of
        // `affine(0, ·)` from it, hence the product with a zero tensor.
        ((&ls * ls.zeros_like()?)? + scale.value)?
    } else {
        ls.exp()?
    };
    Ok(Some(s.reshape(())?))
}
