//! Multi-head self-attention on host slices: `softmax(scale · q kᵀ + mask)`, dropout, `· v`,
//! one sequence per task, every product written into place.

use std::borrow::Cow;

use rayon::prelude::*;

use super::super::dropout::dropout_in_place;
use super::super::gemm::{gemm, Threads, View};
use super::super::kernel::{lane_sum, vectorized, Vectorized};
use super::super::num::Real;
use super::super::softmax::exp_normalise;
use super::super::DropoutKey;

/// The sizes of an attention call. Queries, keys and values sit side by side in one
/// `[batch · seq, 3 · heads · head_size]` buffer (the fused Q/K/V product's output), head `h`'s
/// columns at `h · head_size` within each third.
#[derive(Debug, Clone, Copy)]
pub(crate) struct AttentionShape {
    /// Sequences.
    pub batch: usize,
    /// Tokens per sequence.
    pub seq: usize,
    /// Heads.
    pub heads: usize,
    /// Width of one head.
    pub head_size: usize,
}

impl AttentionShape {
    fn hidden(&self) -> usize {
        self.heads * self.head_size
    }

    /// Entries of one sequence's probabilities, `heads · seq · seq`.
    fn probs_per_seq(&self) -> usize {
        self.heads * self.seq * self.seq
    }
}

/// The attention-probability dropout: probability, key and site.
pub(crate) type ProbsDropout = Option<(f32, DropoutKey, u32)>;

/// What the backward needs of the forward: the probabilities before dropout. The dropout masks
/// are not kept: they are a function of their key and position, and the backward draws them again.
#[derive(Debug, Default)]
pub(crate) struct AttentionSaved<T> {
    /// Probabilities before dropout, `[batch, heads, seq, seq]`.
    pub probs: Vec<T>,
}

/// Sequence `b`'s probabilities after dropout: `probs` itself without dropout, else a copy with
/// the masks of sample `b` (the same masks as one call over the whole batch).
fn dropped<'a, T: Real>(probs: &'a [T], dropout: ProbsDropout, b: usize) -> Cow<'a, [T]> {
    match dropout {
        None => Cow::Borrowed(probs),
        Some((p, key, site)) => {
            let mut kept = probs.to_vec();
            dropout_in_place(&mut kept, probs.len(), p, key.advanced(b as u64), site);
            Cow::Owned(kept)
        }
    }
}

/// `ctx = dropout(softmax(scale · q kᵀ + mask)) · v` per sequence and head, written into
/// `ctx` (`[batch · seq, hidden]`, heads side by side as transformers lays them out).
/// `mask` is additive, `[batch, seq]`, over keys. The softmax is
/// [`crate::ops::softmax_scaled_masked_fused`]'s. One task per sequence runs all of it, so a
/// sequence's probabilities are still in cache when they meet the values.
pub(crate) fn attention_forward<T: Real>(
    qkv: &[T],
    mask: &[T],
    shape: AttentionShape,
    scale: T,
    dropout: ProbsDropout,
    ctx: &mut [T],
) -> AttentionSaved<T> {
    let AttentionShape {
        seq: l,
        heads,
        head_size: d,
        ..
    } = shape;
    let h = shape.hidden();
    let mut probs = vec![T::ZERO; shape.batch * shape.probs_per_seq()];
    probs
        .par_chunks_mut(shape.probs_per_seq().max(1))
        .zip(ctx.par_chunks_mut((l * h).max(1)))
        .enumerate()
        .for_each(|(b, (probs, ctx))| {
            let rows = &qkv[b * l * 3 * h..];
            for head in 0..heads {
                let q = View::block(&rows[head * d..], l, d, 3 * h);
                let k = View::block(&rows[h + head * d..], l, d, 3 * h);
                let block = &mut probs[head * l * l..(head + 1) * l * l];
                gemm(block, l, q, k.t(), scale, false, Threads::One);
                vectorized(SoftmaxRows {
                    block,
                    mask: &mask[b * l..(b + 1) * l],
                });
            }
            let used = dropped(probs, dropout, b);
            for head in 0..heads {
                let p = View::rows(&used[head * l * l..], l, l);
                let v = View::block(&rows[2 * h + head * d..], l, d, 3 * h);
                gemm(&mut ctx[head * d..], h, p, v, T::ONE, false, Threads::One);
            }
        });
    AttentionSaved { probs }
}

/// `row = softmax(row + mask)` for every row of `block` (already scaled).
struct SoftmaxRows<'a, T> {
    block: &'a mut [T],
    mask: &'a [T],
}

impl<T: Real> Vectorized for SoftmaxRows<'_, T> {
    type Output = ();

    #[inline(always)]
    fn run(self) {
        for row in self.block.chunks_exact_mut(self.mask.len()) {
            for (x, m) in row.iter_mut().zip(self.mask) {
                *x += *m;
            }
            exp_normalise(row);
        }
    }
}

/// `ds = p ⊙ (ds − rowsum(ds ⊙ p))` row by row (rows of `l`): the softmax's backward.
struct SoftmaxBackRows<'a, T> {
    ds: &'a mut [T],
    probs: &'a [T],
    l: usize,
}

impl<T: Real> Vectorized for SoftmaxBackRows<'_, T> {
    type Output = ();

    #[inline(always)]
    fn run(self) {
        let l = self.l;
        for (ds, p) in self.ds.chunks_exact_mut(l).zip(self.probs.chunks_exact(l)) {
            let dot = lane_sum(l, |j| ds[j] * p[j]);
            for (g, &y) in ds.iter_mut().zip(p) {
                *g = y * (*g - dot);
            }
        }
    }
}

/// The backward of [`attention_forward`]: from `dctx` (`[batch · seq, hidden]`), writes the
/// gradients of queries, keys and values into `dqkv` (laid out as `qkv`, overwritten). One task
/// per sequence, with that sequence's dropout masks drawn again and its probability gradients
/// in a scratch buffer of its own.
pub(crate) fn attention_backward<T: Real>(
    dctx: &[T],
    qkv: &[T],
    saved: &AttentionSaved<T>,
    shape: AttentionShape,
    scale: T,
    dropout: ProbsDropout,
    dqkv: &mut [T],
) {
    let AttentionShape {
        seq: l,
        heads,
        head_size: d,
        ..
    } = shape;
    let h = shape.hidden();
    let per_seq = shape.probs_per_seq().max(1);
    dqkv.par_chunks_mut((l * 3 * h).max(1))
        .zip(saved.probs.par_chunks(per_seq))
        .enumerate()
        .for_each(|(b, (dqkv, probs))| {
            let rows = &qkv[b * l * 3 * h..];
            let dctx = &dctx[b * l * h..];
            let used = dropped(probs, dropout, b);
            // dV = Pdᵀ · dctx and dPd = dctx · vᵀ, then dP = dropout's backward of dPd.
            let mut ds = vec![T::ZERO; per_seq];
            for head in 0..heads {
                let dc = View::block(&dctx[head * d..], l, d, h);
                let v = View::block(&rows[2 * h + head * d..], l, d, 3 * h);
                let block = &mut ds[head * l * l..(head + 1) * l * l];
                gemm(block, l, dc, v.t(), T::ONE, false, Threads::One);
                let p = View::rows(&used[head * l * l..], l, l);
                let dv = &mut dqkv[2 * h + head * d..];
                gemm(dv, 3 * h, p.t(), dc, T::ONE, false, Threads::One);
            }
            if let Some((p, key, site)) = dropout {
                dropout_in_place(&mut ds, per_seq, p, key.advanced(b as u64), site);
            }
            // dS = P ⊙ (dP − rowsum(dP ⊙ P)); dQ = scale · dS · k; dK = scale · dSᵀ · q.
            vectorized(SoftmaxBackRows {
                ds: &mut ds,
                probs,
                l,
            });
            for head in 0..heads {
                let s = View::rows(&ds[head * l * l..], l, l);
                let q = View::block(&rows[head * d..], l, d, 3 * h);
                let k = View::block(&rows[h + head * d..], l, d, 3 * h);
                let dq = &mut dqkv[head * d..];
                gemm(dq, 3 * h, s, k, scale, false, Threads::One);
                let dk = &mut dqkv[h + head * d..];
                gemm(dk, 3 * h, s.t(), q, scale, false, Threads::One);
            }
        });
}
