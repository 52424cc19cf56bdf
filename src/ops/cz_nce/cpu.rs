//! The fused CPU kernel: loss and exact gradients of CZ-NCE / InfoNCE in one pass.
//!
//! # Derivation
//!
//! Write `q̂_i = q_i / n_i` with `n_i = max(‖q_i‖, ε)` (likewise `k̂`), `s = 1 / t` and the three
//! similarity blocks `Ŝ_out = q̂ k̂ᵀ`, `Ŝ_in = q̂ q̂ᵀ`, `Ŝ_kk = k̂ k̂ᵀ`. A *direction* (q→k, or
//! k→q when symmetric) has one row per anchor, built from the blocks
//! `X = s · [Ŝ_AT | Ŝ_AA | Ŝ_TT]` (cross block, then the optional anchor-side and target-side
//! blocks; for q→k that is `[Ŝ_out | Ŝ_in | Ŝ_kk]`, for k→q `[Ŝ_outᵀ | Ŝ_kk | Ŝ_in]`). With `N_i`
//! the unmasked entries of row `i`, the row loss is `ℓ_i = lse_{j∈N_i}(X_ij) − X_AT[i,i]` and the
//! direction loss is `w/B Σ_i ℓ_i` (`w = 1`, or `½` per direction when symmetric). Hence
//!
//! ```text
//! G_ij := ∂L/∂X_ij = w/B · ( softmax_{N_i}(X_i)_j · [j ∈ N_i]  −  [j is the positive of row i] )
//! ```
//!
//! (in CZ-NCE mode the positive is not in `N_i` but still receives `−w/B`). Summing the
//! directions' `G` blocks into `G_out` (the k→q cross block enters transposed), `G_in` and `G_kk`:
//!
//! ```text
//! ∂L/∂q̂ = s · ( G_out k̂  + (G_in + G_inᵀ) q̂ )
//! ∂L/∂k̂ = s · ( G_outᵀ q̂ + (G_kk + G_kkᵀ) k̂ )
//! ∂L/∂log s = Σ G ⊙ X                       (s = exp(log s), so ∂L/∂log s = s ∂L/∂s)
//! ```
//!
//! and the normalization Jacobian, for a row with `‖q_i‖ > ε`,
//! `∂L/∂q_i = (∂L/∂q̂_i − q̂_i ⟨q̂_i, ∂L/∂q̂_i⟩) / n_i`; for a row with `‖q_i‖ ≤ ε` the divisor is
//! the constant `ε` and `∂L/∂q_i = ∂L/∂q̂_i / ε` (this is exactly what autograd gives for
//! `x / sqrt(max(Σx², ε²))`, the composite twin's formula).
//!
//! Cost: the forward is two GEMMs (`Ŝ_out`, and `Ŝ_in`, of which only the bands on and below the
//! diagonal are multiplied: a little over half a GEMM) for plain CZ-NCE plus one row-wise pass over
//! the `B × 2B` logits (max, log-sum-exp and the softmax weights `G`, parallel over rows with
//! rayon, vectorized exponentials); the gradient is three more GEMMs (`G_out k̂`, `G_in,sym q̂`,
//! `G_outᵀ q̂`) and an `O(B·D)` Jacobian pass. The row pass writes `G` over the similarity
//! blocks in place and `G_in + G_inᵀ` is formed in place, so the default loss holds two `B × B`
//! buffers; they are freed before the kernel returns: what outlives it is the `O(B·D)` gradient
//! (see [`super::BackwardMode`]).
//!
//! Small problems (see [`runs_serial`]) run every step on the calling thread with single-threaded
//! GEMMs: there the pool's hand-offs, not the arithmetic, would dominate.

use super::spec::{Spec, NORM_EPS};
use crate::ops::gemm::{gemm, Threads, View};
use crate::ops::num::Real;
use crate::ops::transpose::transposed;
use rayon::prelude::*;
use std::mem::MaybeUninit;

/// Below this much work (`B²·(D + 32)`: the similarity GEMMs plus the `O(B²)` row passes) the
/// kernel runs on the calling thread. There the whole loss takes a fraction of a millisecond,
/// and each of the kernel's dozen parallel regions (rayon tasks, threaded GEMMs) would cost a
/// hand-off to the pool and a wait for its slowest worker, which on a busy machine is a
/// scheduler time slice.
const SERIAL_WORK: usize = 1 << 23;

/// Whether a `b × d` problem runs on the calling thread (see [`SERIAL_WORK`]).
pub(crate) fn runs_serial(b: usize, d: usize) -> bool {
    band_runs_serial(b, b, d)
}

/// Whether `rows` rows of a `b × d` problem run on the calling thread (see [`SERIAL_WORK`]).
pub(super) fn band_runs_serial(rows: usize, b: usize, d: usize) -> bool {
    rows.saturating_mul(b).saturating_mul(d.saturating_add(32)) <= SERIAL_WORK
        || rayon::current_num_threads() <= 1
}

/// Gradients of the loss (for an upstream gradient of 1).
pub(crate) struct Grads<T> {
    pub dq: Vec<T>,
    pub dk: Vec<T>,
    pub dlog_scale: T,
}

/// Loss and, when asked for, its gradients.
pub(crate) struct Output<T> {
    pub loss: T,
    pub grads: Option<Grads<T>>,
}

/// `⟨a, b⟩` with 8 independent accumulators (lets the compiler vectorize the reduction).
fn dot<T: Real>(a: &[T], b: &[T]) -> T {
    let mut acc = [T::ZERO; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for l in 0..8 {
            acc[l] += x[l] * y[l];
        }
    }
    let mut s = T::ZERO;
    for (&x, &y) in ra.iter().zip(rb) {
        s += x * y;
    }
    for v in acc {
        s += v;
    }
    s
}

pub(super) struct Normed<T> {
    pub(super) hat: Vec<T>,
    /// `1 / max(‖x‖, ε)` per row (1 when not normalizing).
    inv: Vec<T>,
    /// Whether `‖x‖ > ε` (the projection term of the Jacobian applies).
    active: Vec<bool>,
}

/// Row norms and `x̂`. Every row of `x̂` is written once, so it is allocated without the
/// zero-fill (a `B × D` write, comparable to the pass itself at small batch).
pub(super) fn normalize<T: Real>(
    x: &[T],
    b: usize,
    d: usize,
    normalize: bool,
    par: bool,
) -> Normed<T> {
    if !normalize {
        return Normed {
            hat: x.to_vec(),
            inv: vec![T::ONE; b],
            active: vec![false; b],
        };
    }
    let eps2 = T::lit(NORM_EPS * NORM_EPS);
    let mut hat = Vec::with_capacity(b * d);
    let out = &mut hat.spare_capacity_mut()[..b * d];
    let row = |(x, h): (&[T], &mut [MaybeUninit<T>])| -> (T, bool) {
        let ss = dot(x, x);
        let active = ss > eps2;
        let r = T::ONE / if active { ss.sqrt() } else { eps2.sqrt() };
        for (h, &v) in h.iter_mut().zip(x) {
            h.write(v * r);
        }
        (r, active)
    };
    let x = &x[..b * d];
    let stats: Vec<(T, bool)> = if par {
        x.par_chunks(d)
            .zip(out.par_chunks_mut(d))
            .map(row)
            .collect()
    } else {
        x.chunks(d).zip(out.chunks_mut(d)).map(row).collect()
    };
    assert_eq!(stats.len(), b);
    // SAFETY: the `b` rows of `d` elements, i.e. all of the first `b·d` elements, were
    // written above (`stats` has one entry per written row).
    unsafe { hat.set_len(b * d) };
    let (inv, active) = stats.into_iter().unzip();
    Normed { hat, inv, active }
}

/// `dst (m × n, row-major) = [dst +] beta · lhs · rhs` ([`gemm`]), spread over rayon's pool
/// when `par`.
pub(super) fn gemm_into<T: Real>(
    dst: &mut [T],
    lhs: View<'_, T>,
    rhs: View<'_, T>,
    beta: T,
    accumulate: bool,
    par: bool,
) {
    assert_eq!(dst.len(), lhs.rows * rhs.cols);
    let threads = if par { Threads::Pool } else { Threads::One };
    gemm(dst, rhs.cols, lhs, rhs, beta, accumulate, threads);
}

/// `a b_ᵀ` for row-major `rows × d` sides. `b_` is transposed first: the `gemm` crate packs a
/// transposed right-hand side (`d`-strided columns) at up to half its speed when `rows` is small
/// beside `d` (B 256 × D 1536), and the `O(rows · d)` copy is cheap beside the `rows² · d` product.
fn gram<T: Real>(a: &[T], b_: &[T], rows: usize, d: usize, par: bool) -> Vec<T> {
    gram_rect(a, (b_, rows), rows, d, par)
}

/// `a b_ᵀ` for a row-major `a_rows × d` left side and a row-major `b_rows × d` right side
/// (`[a_rows, b_rows]`), through the transposed right side (see [`gram`]).
pub(super) fn gram_rect<T: Real>(
    a: &[T],
    (b_, b_rows): (&[T], usize),
    a_rows: usize,
    d: usize,
    par: bool,
) -> Vec<T> {
    let mut out = vec![T::ZERO; a_rows * b_rows];
    let b_t = transposed(&b_[..b_rows * d], b_rows, d, par);
    let va = View::rows(a, a_rows, d);
    gemm_into(
        &mut out,
        va,
        View::rows(&b_t, d, b_rows),
        T::ONE,
        false,
        par,
    );
    out
}

/// `a aᵀ` for a row-major `b × d` matrix, multiplying only the blocks on and below the
/// diagonal (each band of rows against the columns up to the band's end: about half the work
/// of [`gram`] for many bands) and mirroring the rest, so the result is exactly symmetric.
fn gram_sym<T: Real>(a: &[T], b: usize, d: usize, par: bool) -> Vec<T> {
    let mut out = vec![T::ZERO; b * b];
    if b == 0 {
        return out;
    }
    let a_t = transposed(&a[..b * d], b, d, par);
    // Enough bands for each thread to get several, none so thin that a product is mostly
    // overhead.
    let band = b.div_ceil(4 * rayon::current_num_threads()).max(32);
    let run = |(i, rows): (usize, &mut [T])| {
        let (r0, r1) = (i * band, (i * band + rows.len() / b));
        let lhs = View::block(&a[r0 * d..], r1 - r0, d, d);
        let rhs = View::block(&a_t, d, r1, b);
        gemm(rows, b, lhs, rhs, T::ONE, false, Threads::One);
    };
    let mut bands: Vec<(usize, &mut [T])> = out.chunks_mut(band * b).enumerate().collect();
    if par {
        // Band i costs about i + 1 units: the order 0, n−1, 1, n−2, … puts equal work in each
        // half of every split rayon makes.
        let n = bands.len();
        bands.sort_by_key(|&(i, _)| {
            if 2 * i < n {
                2 * i
            } else {
                2 * (n - 1 - i) + 1
            }
        });
        bands.into_par_iter().with_max_len(1).for_each(run);
    } else {
        bands.into_iter().for_each(run);
    }
    mirror_lower(&mut out, b, par);
    out
}

/// Copies the strict lower triangle of a row-major `b × b` matrix onto the upper one, in place.
fn mirror_lower<T: Real>(g: &mut [T], b: usize, par: bool) {
    combine_pairs_in_place(g, b, par, |lower, _| lower);
}

/// The transpose of a row-major `b × b` matrix.
fn transpose<T: Real>(x: &[T], b: usize, par: bool) -> Vec<T> {
    transposed(x, b, b, par)
}

/// `max(init, max(x))`, kept in 8 lanes so that the compiler vectorizes it (like [`dot`]:
/// float reductions are not reassociated on their own).
fn row_max<T: Real>(x: &[T], init: T) -> T {
    let mut acc = [init; 8];
    let chunks = x.chunks_exact(8);
    let rest = chunks.remainder();
    for c in chunks {
        for l in 0..8 {
            acc[l] = if c[l] > acc[l] { c[l] } else { acc[l] };
        }
    }
    let mut m = init;
    for &v in acc.iter().chain(rest) {
        m = if v > m { v } else { m };
    }
    m
}

/// In place `x ← exp(x·s − m)`; returns `(Σ eˣ, Σ eˣ·x)` over the old `x`.
fn exp_row<T: Real>(x: &mut [T], scale: T, m: T) -> (T, T) {
    // Σ e·x first, then the exponentials as a plain map (which vectorizes), then Σ e.
    let mut ex = [T::ZERO; 8];
    let mut sum = [T::ZERO; 8];
    for c in x.chunks_mut(8) {
        let mut e = [T::ZERO; 8];
        for (e, &v) in e.iter_mut().zip(c.iter()) {
            *e = (v * scale - m).exp_nonpos();
        }
        for l in 0..c.len() {
            ex[l] += e[l] * c[l];
            sum[l] += e[l];
        }
        c.copy_from_slice(&e[..c.len()]);
    }
    let (mut s, mut w) = (T::ZERO, T::ZERO);
    for l in 0..8 {
        s += sum[l];
        w += ex[l];
    }
    (s, w)
}

/// In place `x ← x·c`; returns `Σ x·c`.
fn scale_row<T: Real>(x: &mut [T], c: T) -> T {
    let mut acc = [T::ZERO; 8];
    let mut chunks = x.chunks_exact_mut(8);
    for ch in &mut chunks {
        for l in 0..8 {
            ch[l] *= c;
            acc[l] += ch[l];
        }
    }
    let mut s = T::ZERO;
    for v in chunks.into_remainder() {
        *v *= c;
        s += *v;
    }
    for a in acc {
        s += a;
    }
    s
}

/// One direction's row-wise pass, **in place**, over rows `r0..` of the batch: each block holds
/// those rows (`[n, b]`, row-major) of a `[b, b]` similarity matrix, unscaled; `blocks[0]` is the
/// cross block (row `i`'s positive in column `r0 + i`), the others are same-batch blocks whose
/// entry in that column is masked. Returns `(Σ_i w/B·ℓ_i, Σ G⊙X)` over the rows. With
/// `want_grad`, every block is overwritten with its part of `G`; without, with the unnormalized
/// exponentials.
pub(super) fn direction_pass<T: Real>(
    blocks: &mut [Vec<T>],
    (b, r0): (usize, usize),
    scale: T,
    include_positive: bool,
    weight: T,
    (want_grad, par): (bool, bool),
) -> (T, T) {
    let nb = blocks.len();
    let wb = weight / T::lit(b as f64);
    let row_fn = |i: usize, mut r: Vec<&mut [T]>| -> (T, T) {
        let i = r0 + i;
        let pos = r[0][i] * scale;
        for (blk, row) in r.iter_mut().enumerate() {
            if blk > 0 || !include_positive {
                row[i] = T::MASKED;
            }
        }
        // Pass 1: row max (masked entries are the most negative finite value; every row keeps
        // at least one unmasked entry). `scale > 0`, so the max of `x·s` is `max(x)·s`.
        let m = r.iter().fold(T::NEG_INFINITY, |m, row| row_max(row, m)) * scale;
        // Pass 2: e = exp(x·s − m) in place, Σe and Σe·x.
        let (mut sum, mut ex) = (T::ZERO, T::ZERO);
        for row in r.iter_mut() {
            let (s, w) = exp_row(row, scale, m);
            sum += s;
            ex += w;
        }
        let lse = m + sum.ln();
        let row_loss = wb * (lse - pos);
        // Σ_j G_ij X_ij = w/B (Σ_j softmax_j X_ij − X_pos).
        let c = wb / sum;
        let gx = c * scale * ex - wb * pos;
        if want_grad {
            // Pass 3: G = w/B (softmax − onehot(positive)). The positive's weight is written
            // last: with the positive in the partition its `p − 1` is computed as
            // `−Σ_{j≠pos} p_j`, which does not cancel when the softmax saturates.
            r[0][i] = T::ZERO;
            let others = r
                .iter_mut()
                .fold(T::ZERO, |acc, row| acc + scale_row(row, c));
            r[0][i] = if include_positive { -others } else { -wb };
        }
        (row_loss, gx)
    };
    // Hand row i of every block to task i.
    let n = blocks[0].len() / b;
    let mut rows: Vec<Vec<&mut [T]>> = (0..n).map(|_| Vec::with_capacity(nb)).collect();
    for blk in blocks.iter_mut() {
        for (i, r) in blk.chunks_mut(b).enumerate() {
            rows[i].push(r);
        }
    }
    let add = |a: (T, T), b: (T, T)| (a.0 + b.0, a.1 + b.1);
    if par {
        rows.into_par_iter()
            .enumerate()
            .map(|(i, r)| row_fn(i, r))
            .reduce(|| (T::ZERO, T::ZERO), add)
    } else {
        rows.into_iter()
            .enumerate()
            .map(|(i, r)| row_fn(i, r))
            .fold((T::ZERO, T::ZERO), add)
    }
}

/// Runs the fused CZ-NCE kernel on row-major contiguous `q`, `k` (`b × d` each).
///
/// `scale` is `1 / t`. `want_grad` also computes the exact gradients (for an upstream gradient
/// of 1). Requires `b ≥ 2` when `!spec.include_positive` (checked by the caller).
pub(crate) fn cz_nce<T: Real>(
    q: &[T],
    k: &[T],
    b: usize,
    d: usize,
    scale: T,
    spec: Spec,
    want_grad: bool,
) -> Output<T> {
    let par = !runs_serial(b, d);
    let qn = normalize(q, b, d, spec.normalize, par);
    let kn = normalize(k, b, d, spec.normalize, par);
    let s_out = gram(&qn.hat, &kn.hat, b, d, par);
    let mut s_in = spec.needs_in().then(|| gram_sym(&qn.hat, b, d, par));
    let mut s_kk = spec.needs_kk().then(|| gram_sym(&kn.hat, b, d, par));
    let take = |slot: &mut Option<Vec<T>>| first_read(slot, spec);
    let s_out_t = spec.symmetric.then(|| transpose(&s_out, b, par));
    let mut acc = Accumulators::new(b, scale, spec, (want_grad, par));

    // Direction q→k: [S_out | S_in | S_kk].
    let mut blocks = vec![(Block::Out, s_out)];
    if spec.anchor_negatives {
        blocks.push((Block::In, take(&mut s_in)));
    }
    if spec.target_negatives {
        blocks.push((Block::Kk, take(&mut s_kk)));
    }
    acc.direction(blocks);
    // Direction k→q: [S_outᵀ | S_kk | S_in].
    if let Some(s_out_t) = s_out_t {
        let mut blocks = vec![(Block::OutT, s_out_t)];
        if spec.anchor_negatives {
            blocks.push((Block::Kk, s_kk.take().expect("s_kk")));
        }
        if spec.target_negatives {
            blocks.push((Block::In, s_in.take().expect("s_in")));
        }
        acc.direction(blocks);
    }
    drop((s_in, s_kk));
    let loss = acc.loss;
    let grads = acc.input_grads(&qn, &kn, d);
    Output { loss, grads }
}

/// A same-batch block for the first direction that reads it. The row pass turns its blocks into
/// gradient blocks in place, so a block that both directions read
/// ([`Spec::blocks_read_twice`]) is copied for the first; otherwise it is taken.
pub(super) fn first_read<T: Clone>(slot: &mut Option<Vec<T>>, spec: Spec) -> Vec<T> {
    let v = slot.as_ref().expect("block computed");
    if spec.blocks_read_twice() {
        v.clone()
    } else {
        slot.take().expect("block computed")
    }
}

/// Which gradient accumulator a block of a direction's row pass feeds.
#[derive(Clone, Copy)]
enum Block {
    /// `S_out` (q→k).
    Out,
    /// `S_outᵀ` (k→q): its gradient is transposed back.
    OutT,
    /// `S_in` (q·q).
    In,
    /// `S_kk` (k·k).
    Kk,
}

/// The loss, `∂L/∂log s` and the gradients w.r.t. the scaled logits of each block, summed
/// over the directions.
struct Accumulators<T> {
    b: usize,
    scale: T,
    spec: Spec,
    /// 1/2 for a symmetric loss (the mean of the two directions), else 1.
    weight: T,
    want_grad: bool,
    /// Whether to use the rayon pool (see [`runs_serial`]).
    par: bool,
    loss: T,
    dlog_scale: T,
    g_out: Option<Vec<T>>,
    g_in: Option<Vec<T>>,
    g_kk: Option<Vec<T>>,
}

impl<T: Real> Accumulators<T> {
    fn new(b: usize, scale: T, spec: Spec, (want_grad, par): (bool, bool)) -> Self {
        let weight = if spec.symmetric { T::lit(0.5) } else { T::ONE };
        Self {
            b,
            scale,
            spec,
            weight,
            want_grad,
            par,
            loss: T::ZERO,
            dlog_scale: T::ZERO,
            g_out: None,
            g_in: None,
            g_kk: None,
        }
    }

    /// One direction's row pass over `blocks` (its positives' block first), added in.
    fn direction(&mut self, blocks: Vec<(Block, Vec<T>)>) {
        let (kinds, mut mats): (Vec<Block>, Vec<Vec<T>>) = blocks.into_iter().unzip();
        let (b, positive, par) = (self.b, self.spec.include_positive, self.par);
        let (l, gx) = direction_pass(
            &mut mats,
            (b, 0),
            self.scale,
            positive,
            self.weight,
            (self.want_grad, par),
        );
        self.loss += l;
        self.dlog_scale += gx;
        if self.want_grad {
            for (kind, g) in kinds.into_iter().zip(mats) {
                match kind {
                    Block::Out => accumulate(&mut self.g_out, g, par),
                    Block::OutT => accumulate(&mut self.g_out, transpose(&g, b, par), par),
                    Block::In => accumulate(&mut self.g_in, g, par),
                    Block::Kk => accumulate(&mut self.g_kk, g, par),
                }
            }
        }
    }

    /// `∂L/∂q` and `∂L/∂k` from the logit gradients (none unless `want_grad`).
    fn input_grads(self, qn: &Normed<T>, kn: &Normed<T>, d: usize) -> Option<Grads<T>> {
        let (b, scale, dlog_scale, par) = (self.b, self.scale, self.dlog_scale, self.par);
        let g_out = self.g_out?;
        // ∂L/∂q̂ = s (G_out k̂ + (G_in + G_inᵀ) q̂), ∂L/∂k̂ = s (G_outᵀ q̂ + (G_kk + G_kkᵀ) k̂).
        let vq = View::rows(&qn.hat, b, d);
        let vk = View::rows(&kn.hat, b, d);
        let vg = View::rows(&g_out, b, b);
        let mut dq = vec![T::ZERO; b * d];
        let mut dk = vec![T::ZERO; b * d];
        gemm_into(&mut dq, vg, vk, scale, false, par);
        gemm_into(&mut dk, vg.t(), vq, scale, false, par);
        if let Some(mut g) = self.g_in {
            symmetrize_in_place(&mut g, b, par);
            gemm_into(&mut dq, View::rows(&g, b, b), vq, scale, true, par);
        }
        if let Some(mut g) = self.g_kk {
            symmetrize_in_place(&mut g, b, par);
            gemm_into(&mut dk, View::rows(&g, b, b), vk, scale, true, par);
        }
        norm_backward(&mut dq, qn, d, par);
        norm_backward(&mut dk, kn, d, par);
        Some(Grads { dq, dk, dlog_scale })
    }
}

/// `slot += v`, or `slot = v` when empty.
pub(super) fn accumulate<T: Real>(slot: &mut Option<Vec<T>>, v: Vec<T>, par: bool) {
    match slot {
        Some(dst) if par => dst
            .par_iter_mut()
            .zip(v.par_iter())
            .for_each(|(d, &s)| *d += s),
        Some(dst) => dst.iter_mut().zip(&v).for_each(|(d, &s)| *d += s),
        None => *slot = Some(v),
    }
}

/// A raw pointer that rayon tasks may share; see [`combine_pairs_in_place`] for why that is
/// sound.
#[derive(Clone, Copy)]
struct SharedMut<T>(*mut T);
unsafe impl<T: Send> Send for SharedMut<T> {}
unsafe impl<T: Send> Sync for SharedMut<T> {}

/// In place `G ← G + Gᵀ` for a row-major `b × b` matrix.
fn symmetrize_in_place<T: Real>(g: &mut [T], b: usize, par: bool) {
    combine_pairs_in_place(g, b, par, |lower, upper| lower + upper);
}

/// In place, for every `j ≤ i` of a row-major `b × b` matrix: `g[i, j]` and `g[j, i]` both
/// become `f(g[i, j], g[j, i])`. Each pair of `16 × 16` tiles goes through two local buffers,
/// so that reads and writes are runs of contiguous values (see [`transposed`]).
fn combine_pairs_in_place<T: Real>(g: &mut [T], b: usize, par: bool, f: impl Fn(T, T) -> T + Sync) {
    const TILE: usize = 16;
    assert_eq!(g.len(), b * b);
    let ptr = SharedMut(g.as_mut_ptr());
    // Task `ti` owns row block `ti` left of and on the diagonal and column block `ti` above it.
    let block = |ti: usize| {
        let p = ptr;
        let (i0, h) = (ti * TILE, TILE.min(b - ti * TILE));
        // lo[r][c] = g[i0 + r, j0 + c] (lower tile), up[c][r] = g[j0 + c, i0 + r] (its mirror).
        let mut lo = [[T::ZERO; TILE]; TILE];
        let mut up = [[T::ZERO; TILE]; TILE];
        for j0 in (0..=i0).step_by(TILE) {
            let w = TILE.min(b - j0);
            // SAFETY: every index is below b·b. Task `ti` touches only entries (i, j) with i in
            // block ti and j before the end of its diagonal tile, and their mirrors (j, i):
            // another task's entries have their larger-block index in its own block, so no
            // entry is touched by two tasks. On the diagonal tile (j0 = i0) both buffers hold
            // the same entries; `up` is written back only strictly above the diagonal, after
            // `lo`, so each entry ends as f of its pair.
            unsafe {
                for (r, row) in lo.iter_mut().enumerate().take(h) {
                    let src = p.0.add((i0 + r) * b + j0);
                    row[..w].copy_from_slice(std::slice::from_raw_parts(src, w));
                }
                for (c, col) in up.iter_mut().enumerate().take(w) {
                    let src = p.0.add((j0 + c) * b + i0);
                    col[..h].copy_from_slice(std::slice::from_raw_parts(src, h));
                }
                for r in 0..h {
                    for c in 0..w.min(i0 + r + 1 - j0) {
                        let v = f(lo[r][c], up[c][r]);
                        lo[r][c] = v;
                        up[c][r] = v;
                    }
                }
                for (r, row) in lo.iter().enumerate().take(h) {
                    let dst = p.0.add((i0 + r) * b + j0);
                    std::slice::from_raw_parts_mut(dst, w).copy_from_slice(&row[..w]);
                }
                for (c, col) in up.iter().enumerate().take(w) {
                    let dst = p.0.add((j0 + c) * b + i0);
                    for r in (0..h).filter(|&r| j0 + c < i0 + r) {
                        *dst.add(r) = col[r];
                    }
                }
            }
        }
    };
    let blocks = b.div_ceil(TILE);
    if par {
        (0..blocks).into_par_iter().for_each(block);
    } else {
        (0..blocks).for_each(block);
    }
}

/// In place: `dx_i = (dx̂_i − x̂_i ⟨x̂_i, dx̂_i⟩) · inv_i` (projection only for active rows).
pub(super) fn norm_backward<T: Real>(dx: &mut [T], n: &Normed<T>, d: usize, par: bool) {
    let row = |(i, g): (usize, &mut [T])| {
        let h = &n.hat[i * d..(i + 1) * d];
        let r = n.inv[i];
        if n.active[i] {
            let p = dot(h, g);
            for (g, &a) in g.iter_mut().zip(h) {
                *g = (*g - a * p) * r;
            }
        } else {
            for g in g.iter_mut() {
                *g *= r;
            }
        }
    };
    if par {
        dx.par_chunks_mut(d).enumerate().for_each(row);
    } else {
        dx.chunks_mut(d).enumerate().for_each(row);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::num::exp_nonpos_f32;

    /// Plain O(B²D) loop reference in f64, straight from the definition (CZ-NCE, q→k only).
    fn naive_cz(q: &[f64], k: &[f64], b: usize, d: usize, t: f64) -> f64 {
        let norm = |x: &[f64]| x.iter().map(|v| v * v).sum::<f64>().sqrt().max(NORM_EPS);
        let cos = |x: &[f64], y: &[f64]| {
            x.iter().zip(y).map(|(a, b)| a * b).sum::<f64>() / (norm(x) * norm(y))
        };
        let row = |i: usize| &q[i * d..(i + 1) * d];
        let krow = |i: usize| &k[i * d..(i + 1) * d];
        let mut total = 0.0;
        for i in 0..b {
            let mut negs = vec![];
            for j in 0..b {
                if j != i {
                    negs.push(cos(row(i), krow(j)) / t);
                    negs.push(cos(row(i), row(j)) / t);
                }
            }
            let lse = negs.iter().map(|v| v.exp()).sum::<f64>().ln();
            total += lse - cos(row(i), krow(i)) / t;
        }
        total / b as f64
    }

    #[test]
    fn matches_naive_loop() {
        let (b, d) = (5, 3);
        let q: Vec<f64> = (0..b * d)
            .map(|i| ((i * 7 % 11) as f64 - 5.0) / 3.0)
            .collect();
        let k: Vec<f64> = (0..b * d)
            .map(|i| ((i * 5 % 13) as f64 - 6.0) / 4.0)
            .collect();
        let spec = Spec {
            include_positive: false,
            anchor_negatives: true,
            target_negatives: false,
            symmetric: false,
            normalize: true,
        };
        let out = cz_nce(&q, &k, b, d, 1.0 / 0.5, spec, false);
        let want = naive_cz(&q, &k, b, d, 0.5);
        assert!((out.loss - want).abs() < 1e-12, "{} vs {want}", out.loss);
    }

    #[test]
    fn symmetrize_matches_definition() {
        for b in [1usize, 5, 64, 65, 130] {
            let g: Vec<f64> = (0..b * b).map(|i| ((i * 37 % 101) as f64) - 50.0).collect();
            let mut got = g.clone();
            symmetrize_in_place(&mut got, b, b % 2 == 0);
            for i in 0..b {
                for j in 0..b {
                    assert_eq!(
                        got[i * b + j],
                        g[i * b + j] + g[j * b + i],
                        "b={b} ({i},{j})"
                    );
                }
            }
        }
    }

    /// Every entry of `gram_sym` is the dot product of its two rows (to `d` roundings of a sum
    /// of at most `d` in magnitude), and the result is exactly symmetric: with a pool of
    /// three threads the bands are uneven and the last one short.
    #[test]
    fn symmetric_gram_is_the_product_of_its_rows() {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(3)
            .build()
            .unwrap();
        for (b, d) in [(1, 4), (7, 3), (9, 50), (37, 20), (130, 33)] {
            let a: Vec<f64> = (0..b * d)
                .map(|i| ((i * 37 % 101) as f64 - 50.0) / 50.0)
                .collect();
            for par in [false, true] {
                let g = pool.install(|| gram_sym(&a, b, d, par));
                for (i, j) in (0..b).flat_map(|i| (0..b).map(move |j| (i, j))) {
                    let want: f64 = (0..d).map(|p| a[i * d + p] * a[j * d + p]).sum();
                    let tol = (d * d) as f64 * f64::EPSILON;
                    assert!((g[i * b + j] - want).abs() <= tol, "b={b} ({i},{j})");
                    assert_eq!(g[i * b + j], g[j * b + i], "b={b} ({i},{j})");
                }
            }
        }
    }

    #[test]
    fn fast_exp_is_accurate() {
        let mut worst = 0f64;
        let n = 200_000;
        for i in 0..=n {
            let x = -87.0f32 * i as f32 / n as f32;
            let want = (x as f64).exp();
            let got = exp_nonpos_f32(x) as f64;
            worst = worst.max((got - want).abs() / want);
        }
        assert!(worst < 2.5e-7, "max relative error {worst}");
        assert_eq!(exp_nonpos_f32(0.0), 1.0);
        assert_eq!(exp_nonpos_f32(-90.0), 0.0);
        assert_eq!(exp_nonpos_f32(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp_nonpos_f32(f32::MIN), 0.0);
    }

    /// The shapes `tests/it/cz_nce.rs` runs to cover both regimes stay on their sides.
    #[test]
    fn serial_threshold_splits_the_tested_shapes() {
        assert!(runs_serial(40, 64));
        assert!(runs_serial(64, 1536));
        if rayon::current_num_threads() > 1 {
            assert!(!runs_serial(160, 320));
            assert!(!runs_serial(256, 768));
        }
        // `fused_rows_serial_and_pooled_match_composite_rows_f64`'s bands.
        assert!(band_runs_serial(20, 40, 64));
        if rayon::current_num_threads() > 1 {
            assert!(!band_runs_serial(160, 256, 288));
        }
    }

    #[test]
    fn strided_gemm() {
        // [[1,2],[3,4]] · [[5,6],[7,8]]ᵀ
        let a = [1.0f64, 2.0, 3.0, 4.0];
        let b_ = [5.0f64, 6.0, 7.0, 8.0];
        let out = gram(&a, &b_, 2, 2, false);
        assert_eq!(out, vec![17.0, 23.0, 39.0, 53.0]);
    }
}
