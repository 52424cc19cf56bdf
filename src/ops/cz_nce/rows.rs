//! The fused CPU kernel over a band of rows: the part of the loss that rows `r0..r0 + n` of a
//! batch of `b` contribute, and its exact gradients, building only `[n, b]` blocks of logits.
//!
//! This is the whole-batch kernel's arithmetic ([`super::cpu`], whose derivation applies) with
//! every similarity block cut to the band's rows. The parts of a partition of `0..b` add up to
//! the whole loss, since each row's loss reads only its own row of every block. What changes
//! is the chain rule: a whole block's gradient `G` enters `∂q̂` as `(G + Gᵀ) q̂`, but a band
//! holds `n` rows of `G` only, so each band block `X = s · Â_band B̂ᵀ` (`Â`, `B̂` one of `q̂`,
//! `k̂`) sends its gradient to both operands:
//!
//! ```text
//! ∂L/∂Â_band += s · G B̂          ∂L/∂B̂ += s · Gᵀ Â_band
//! ```
//!
//! The k→q direction's cross block is computed as `k̂_band q̂ᵀ` instead of transposing
//! `Ŝ_out`, which the band does not hold.
//!
//! Memory: the `2·b·d` normalized inputs and the `2·b·d` gradients (every row of both sides
//! receives one), plus one `[n, b]` block per kind of logits, where the whole-batch kernel
//! holds `[b, b]` blocks.

use super::cpu::{
    accumulate, band_runs_serial, direction_pass, first_read, gemm_into, gram_rect, norm_backward,
    normalize, Grads, Normed, Output,
};
use super::spec::Spec;
use crate::ops::gemm::View;
use crate::ops::num::Real;

/// Which operands a band block multiplies: `[q̂ or k̂]_band · [q̂ or k̂]ᵀ`.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Side {
    Q,
    K,
}

/// The four kinds of band blocks, as (band side, full side).
const OUT: (Side, Side) = (Side::Q, Side::K);
const KQ: (Side, Side) = (Side::K, Side::Q);
const IN: (Side, Side) = (Side::Q, Side::Q);
const KK: (Side, Side) = (Side::K, Side::K);
const KINDS: [(Side, Side); 4] = [OUT, KQ, IN, KK];

/// Runs the fused CZ-NCE kernel on rows `r0..r0 + n` of row-major contiguous `q`, `k`
/// (`b × d` each): their part of the loss (divided by the whole batch's `b`) and, with
/// `want_grad`, its exact gradients with respect to every row of `q` and `k`.
///
/// `scale` is `1 / t`. Requires `n ≥ 1`, `r0 + n ≤ b` and `b ≥ 2` when
/// `!spec.include_positive` (checked by the caller).
pub(crate) fn cz_nce_rows<T: Real>(
    (q, k): (&[T], &[T]),
    (b, d): (usize, usize),
    (r0, n): (usize, usize),
    scale: T,
    spec: Spec,
    want_grad: bool,
) -> Output<T> {
    let par = !band_runs_serial(n, b, d);
    let qn = normalize(q, b, d, spec.normalize, par);
    let kn = normalize(k, b, d, spec.normalize, par);
    let band = Band {
        qn: &qn,
        kn: &kn,
        b,
        d,
        r0,
        n,
        par,
    };
    let mut acc = BandGrads {
        b,
        r0,
        scale,
        include_positive: spec.include_positive,
        weight: if spec.symmetric { T::lit(0.5) } else { T::ONE },
        want_grad,
        par,
        loss: T::ZERO,
        dlog_scale: T::ZERO,
        g: [None, None, None, None],
    };
    band.directions(spec, &mut acc);
    let loss = acc.loss;
    let grads = want_grad.then(|| band.input_grads(acc, scale));
    Output { loss, grads }
}

/// The band's operands.
struct Band<'a, T> {
    qn: &'a Normed<T>,
    kn: &'a Normed<T>,
    b: usize,
    d: usize,
    r0: usize,
    n: usize,
    par: bool,
}

impl<T: Real> Band<'_, T> {
    /// Both directions' row passes (q→k, then k→q when symmetric), added into `acc`.
    fn directions(&self, spec: Spec, acc: &mut BandGrads<T>) {
        let mut s_in = spec.needs_in().then(|| self.gram(IN));
        let mut s_kk = spec.needs_kk().then(|| self.gram(KK));
        let take = |slot: &mut Option<Vec<T>>| first_read(slot, spec);
        // Direction q→k: [S_out | S_in | S_kk].
        let mut blocks = vec![(OUT, self.gram(OUT))];
        if spec.anchor_negatives {
            blocks.push((IN, take(&mut s_in)));
        }
        if spec.target_negatives {
            blocks.push((KK, take(&mut s_kk)));
        }
        acc.direction(blocks);
        // Direction k→q: [S_kq | S_kk | S_in].
        if spec.symmetric {
            let mut blocks = vec![(KQ, self.gram(KQ))];
            if spec.anchor_negatives {
                blocks.push((KK, s_kk.take().expect("s_kk")));
            }
            if spec.target_negatives {
                blocks.push((IN, s_in.take().expect("s_in")));
            }
            acc.direction(blocks);
        }
        drop((s_in, s_kk));
    }

    /// All `b` rows of `x̂` for one side.
    fn full(&self, side: Side) -> &[T] {
        match side {
            Side::Q => &self.qn.hat,
            Side::K => &self.kn.hat,
        }
    }

    /// The band's `n` rows of `x̂` for one side.
    fn rows(&self, side: Side) -> &[T] {
        &self.full(side)[self.r0 * self.d..(self.r0 + self.n) * self.d]
    }

    /// The unscaled band block `Â_band B̂ᵀ` (`[n, b]`).
    fn gram(&self, (a, b_): (Side, Side)) -> Vec<T> {
        gram_rect(
            self.rows(a),
            (self.full(b_), self.b),
            self.n,
            self.d,
            self.par,
        )
    }

    /// `∂L/∂q` and `∂L/∂k` from the band blocks' logit gradients.
    fn input_grads(&self, acc: BandGrads<T>, scale: T) -> Grads<T> {
        let (b, d, n, r0, par) = (self.b, self.d, self.n, self.r0, self.par);
        let mut dq = vec![T::ZERO; b * d];
        let mut dk = vec![T::ZERO; b * d];
        for ((a, b_), g) in KINDS.into_iter().zip(acc.g) {
            let Some(g) = g else { continue };
            let vg = View::rows(&g, n, b);
            // ∂Â_band += s G B̂, then ∂B̂ += s Gᵀ Â_band.
            let da = match a {
                Side::Q => &mut dq,
                Side::K => &mut dk,
            };
            let da_band = &mut da[r0 * d..(r0 + n) * d];
            let vb = View::rows(self.full(b_), b, d);
            gemm_into(da_band, vg, vb, scale, true, par);
            let db = match b_ {
                Side::Q => &mut dq,
                Side::K => &mut dk,
            };
            let va = View::rows(self.rows(a), n, d);
            gemm_into(db, vg.t(), va, scale, true, par);
        }
        norm_backward(&mut dq, self.qn, d, par);
        norm_backward(&mut dk, self.kn, d, par);
        Grads {
            dq,
            dk,
            dlog_scale: acc.dlog_scale,
        }
    }
}

/// The loss, `∂L/∂log s` and each kind of block's logit gradient (in [`KINDS`]' order),
/// summed over the directions, with what each direction's row pass needs.
struct BandGrads<T> {
    /// The whole batch's size and the band's first row.
    b: usize,
    r0: usize,
    scale: T,
    include_positive: bool,
    /// 1/2 for a symmetric loss (the mean of the two directions), else 1.
    weight: T,
    want_grad: bool,
    par: bool,
    loss: T,
    dlog_scale: T,
    g: [Option<Vec<T>>; 4],
}

impl<T: Real> BandGrads<T> {
    /// One direction's row pass over `blocks` (its positives' block first), added in.
    fn direction(&mut self, blocks: Vec<((Side, Side), Vec<T>)>) {
        let (kinds, mut mats): (Vec<(Side, Side)>, Vec<Vec<T>>) = blocks.into_iter().unzip();
        let (l, gx) = direction_pass(
            &mut mats,
            (self.b, self.r0),
            self.scale,
            self.include_positive,
            self.weight,
            (self.want_grad, self.par),
        );
        self.loss += l;
        self.dlog_scale += gx;
        if self.want_grad {
            for (kind, g) in kinds.into_iter().zip(mats) {
                let slot = KINDS.iter().position(|&k| k == kind).expect("a known kind");
                accumulate(&mut self.g[slot], g, self.par);
            }
        }
    }
}
