//! Slice-level kernels of a BERT layer, forward and backward, for the explicit encoder backward
//! (`crate::encoder`'s `Backward::Explicit`): attention fused into one pass per sequence, bias
//! and activation fused, residual, dropout and LayerNorm fused. Every function works on host
//! slices of f32 or f64 and spreads rows over rayon's pool; gradients of parameters are written
//! into (or added onto) the caller's buffers, never allocated.
//!
//! The arithmetic is that of the fused candle ops ([`super::layer_norm_fused`],
//! [`super::softmax_scaled_masked_fused`], [`super::gelu_fused`], [`super::dropout_fused`]),
//! which the autograd path runs, so the two paths agree to rounding; dropout masks are drawn by
//! the same keyed Philox function and are identical.

mod attention;
mod norm;

pub(crate) use attention::{attention_backward, attention_forward, AttentionSaved, AttentionShape};
pub(crate) use norm::{layer_norm_backward, residual_layer_norm, NormGrads, NormSaved};

use rayon::prelude::*;

use super::gelu::value_and_slope;
use super::kernel::{rows_per_task, vectorized, Vectorized};
use super::num::Real;
use super::GeluForm;

/// The activation of a feed-forward layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Activation {
    /// GELU in one of its forms.
    Gelu(GeluForm),
    /// `max(x, 0)`.
    Relu,
}

/// `rows += bias` for every row of `data` (`[n, bias.len()]`).
pub(crate) fn add_bias<T: Real>(data: &mut [T], bias: &[T]) {
    let width = bias.len().max(1);
    data.par_chunks_mut(width * rows_per_task(width))
        .for_each(|rows| vectorized(BiasRows { rows, bias }));
}

struct BiasRows<'a, T> {
    rows: &'a mut [T],
    bias: &'a [T],
}

impl<T: Real> Vectorized for BiasRows<'_, T> {
    type Output = ();

    #[inline(always)]
    fn run(self) {
        for row in self.rows.chunks_exact_mut(self.bias.len()) {
            for (v, b) in row.iter_mut().zip(self.bias) {
                *v += *b;
            }
        }
    }
}

/// `u += bias; g = act(u)` row by row: `u` keeps the pre-activation the backward needs.
pub(crate) fn bias_activation<T: Real>(u: &mut [T], g: &mut [T], bias: &[T], act: Activation) {
    let width = bias.len().max(1);
    let rows = width * rows_per_task(width);
    u.par_chunks_mut(rows)
        .zip(g.par_chunks_mut(rows))
        .for_each(|(u, g)| {
            vectorized(BiasRows { rows: u, bias });
            apply::<_, false>(u, g, act);
        });
}

/// `g = act(u)`: the activation again from its saved input, for a backward that did not keep it
/// (the same function on the same input, so the same bits as the forward's).
pub(crate) fn activation_forward<T: Real>(u: &[T], g: &mut [T], act: Activation) {
    g.par_chunks_mut(16_384)
        .zip(u.par_chunks(16_384))
        .for_each(|(g, u)| apply::<_, false>(u, g, act));
}

/// `dg *= act'(u)`, in place.
pub(crate) fn activation_backward<T: Real>(dg: &mut [T], u: &[T], act: Activation) {
    dg.par_chunks_mut(16_384)
        .zip(u.par_chunks(16_384))
        .for_each(|(dg, u)| apply::<_, true>(u, dg, act));
}

/// `g = act(u)`, or with `SLOPE` `g *= act'(u)`, on one task's entries: one loop per
/// activation, so that each is a straight loop that vectorises.
fn apply<T: Real, const SLOPE: bool>(u: &[T], g: &mut [T], act: Activation) {
    match act {
        Activation::Gelu(GeluForm::Erf) => vectorized(Gelu::<_, SLOPE, true>(u, g)),
        Activation::Gelu(GeluForm::Tanh) => vectorized(Gelu::<_, SLOPE, false>(u, g)),
        Activation::Relu => vectorized(Relu::<_, SLOPE>(u, g)),
    }
}

/// GELU of `.0` into `.1` (`SLOPE`: `.1 *= gelu'(.0)` instead), erf form or tanh form.
struct Gelu<'a, T, const SLOPE: bool, const ERF: bool>(&'a [T], &'a mut [T]);

impl<T: Real, const SLOPE: bool, const ERF: bool> Vectorized for Gelu<'_, T, SLOPE, ERF> {
    type Output = ();

    #[inline(always)]
    fn run(self) {
        let form = if ERF { GeluForm::Erf } else { GeluForm::Tanh };
        for (y, &x) in self.1.iter_mut().zip(self.0) {
            let (value, slope) = value_and_slope(x, form);
            *y = if SLOPE { *y * slope } else { value };
        }
    }
}

/// ReLU of `.0` into `.1` (`SLOPE`: `.1 *= [.0 > 0]` instead).
struct Relu<'a, T, const SLOPE: bool>(&'a [T], &'a mut [T]);

impl<T: Real, const SLOPE: bool> Vectorized for Relu<'_, T, SLOPE> {
    type Output = ();

    #[inline(always)]
    fn run(self) {
        for (y, &x) in self.1.iter_mut().zip(self.0) {
            let on = x > T::ZERO;
            *y = match (SLOPE, on) {
                (true, true) => *y,
                (false, true) => x,
                _ => T::ZERO,
            };
        }
    }
}

/// `dst [+]= Σ_rows g` for `g` of `[n, dst.len()]`: one partial sum per block of rows, rows
/// added in order (a straight vector add), the blocks' sums added in block order, so the result
/// does not depend on the thread count.
pub(crate) fn column_sum<T: Real>(dst: &mut [T], g: &[T], accumulate: bool) {
    let width = dst.len();
    if width == 0 {
        return;
    }
    let rpt = rows_per_task(width).max(64);
    let partials: Vec<Vec<T>> = g
        .par_chunks(width * rpt)
        .map(|rows| vectorized(RowSum { rows, width }))
        .collect();
    if !accumulate {
        dst.fill(T::ZERO);
    }
    for part in partials {
        for (d, p) in dst.iter_mut().zip(part) {
            *d += p;
        }
    }
}

struct RowSum<'a, T> {
    rows: &'a [T],
    width: usize,
}

impl<T: Real> Vectorized for RowSum<'_, T> {
    type Output = Vec<T>;

    #[inline(always)]
    fn run(self) -> Vec<T> {
        let mut part = vec![T::ZERO; self.width];
        for row in self.rows.chunks_exact(self.width) {
            for (p, v) in part.iter_mut().zip(row) {
                *p += *v;
            }
        }
        part
    }
}

/// `dst[ids[r]] += rows[r]` for every row (a gather's backward): rows grouped by id, each
/// destination row summed by one task in row order, so the result does not depend on the
/// thread count. Every id must be below `dst.len() / width`.
pub(crate) fn scatter_add_rows<T: Real>(dst: &mut [T], width: usize, ids: &[u32], rows: &[T]) {
    let mut order: Vec<usize> = (0..ids.len()).collect();
    order.sort_by_key(|&r| ids[r]);
    let mut targets: Vec<(&mut [T], &[usize])> = Vec::new();
    let (mut rest, mut first_row) = (dst, 0usize);
    for group in order.chunk_by(|&a, &b| ids[a] == ids[b]) {
        let id = ids[group[0]] as usize;
        let tail = std::mem::take(&mut rest);
        let (row, tail) = tail[(id - first_row) * width..].split_at_mut(width);
        targets.push((row, group));
        (rest, first_row) = (tail, id + 1);
    }
    targets.into_par_iter().for_each(|(row, group)| {
        for &r in group {
            for (d, s) in row.iter_mut().zip(&rows[r * width..(r + 1) * width]) {
                *d += *s;
            }
        }
    });
}
