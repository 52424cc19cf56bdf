//! Residual add and LayerNorm, forward and backward, on host slices.

use rayon::prelude::*;

use super::super::kernel::{lane_sum, rows_per_task, vectorized, Vectorized};
use super::super::num::Real;

/// What the LayerNorm backward needs of its forward: the normalised rows and their inverse
/// standard deviations.
#[derive(Debug, Default)]
pub(crate) struct NormSaved<T> {
    /// `(z - mean) / sqrt(var + eps)`, `[n, width]`.
    pub xhat: Vec<T>,
    /// `1 / sqrt(var + eps)` per row.
    pub rstd: Vec<T>,
}

/// `out = LayerNorm(z + residual) · gamma + beta`, row by row; `z` is consumed (it becomes the
/// saved `xhat`). The arithmetic is [`crate::ops::layer_norm_fused`]'s.
pub(crate) fn residual_layer_norm<T: Real>(
    mut z: Vec<T>,
    residual: Option<&[T]>,
    gamma: &[T],
    beta: &[T],
    eps: f64,
    out: &mut [T],
) -> NormSaved<T> {
    let width = gamma.len();
    let rows = z.len() / width.max(1);
    let mut rstd = vec![T::ZERO; rows];
    let rpt = rows_per_task(width);
    let empty: &[T] = &[];
    let residual_chunks: Vec<&[T]> = match residual {
        Some(r) => r.chunks(width * rpt).collect(),
        None => vec![empty; rows.div_ceil(rpt)],
    };
    z.par_chunks_mut(width * rpt)
        .zip(out.par_chunks_mut(width * rpt))
        .zip(rstd.par_chunks_mut(rpt))
        .zip(residual_chunks.into_par_iter())
        .for_each(|(((z, out), rstd), residual)| {
            vectorized(NormRows {
                z,
                out,
                rstd,
                residual,
                gamma,
                beta,
                eps: T::lit(eps),
            })
        });
    NormSaved { xhat: z, rstd }
}

/// [`residual_layer_norm`] over a block of rows (`residual` empty: none).
struct NormRows<'a, T> {
    z: &'a mut [T],
    out: &'a mut [T],
    rstd: &'a mut [T],
    residual: &'a [T],
    gamma: &'a [T],
    beta: &'a [T],
    eps: T,
}

impl<T: Real> Vectorized for NormRows<'_, T> {
    type Output = ();

    #[inline(always)]
    fn run(self) {
        let width = self.gamma.len();
        let inv_n = T::ONE / T::lit(width as f64);
        let rows = self
            .z
            .chunks_exact_mut(width)
            .zip(self.out.chunks_exact_mut(width))
            .zip(self.rstd.iter_mut());
        for (r, ((x, y), rs)) in rows.enumerate() {
            if !self.residual.is_empty() {
                let res = &self.residual[r * width..(r + 1) * width];
                for (x, r) in x.iter_mut().zip(res) {
                    *x += *r;
                }
            }
            let mu = lane_sum(width, |i| x[i]) * inv_n;
            let var = lane_sum(width, |i| (x[i] - mu) * (x[i] - mu)) * inv_n;
            *rs = T::ONE / (var + self.eps).sqrt();
            for i in 0..width {
                x[i] = (x[i] - mu) * *rs;
                y[i] = x[i] * self.gamma[i] + self.beta[i];
            }
        }
    }
}

/// The parameter gradients of a LayerNorm, when it trains, and whether to add onto them.
pub(crate) struct NormGrads<'a, T> {
    /// `dL/dgamma`.
    pub gamma: &'a mut [T],
    /// `dL/dbeta`.
    pub beta: &'a mut [T],
    /// Add onto the buffers instead of overwriting them.
    pub accumulate: bool,
}

/// The backward of [`residual_layer_norm`]: `g` (`dL/dout`) becomes `dL/dz` in place (which is
/// also `dL/dresidual`); the parameter gradients go to `grads`. The arithmetic is that of
/// [`crate::ops::layer_norm_fused`]'s backward, partial sums per block of rows added in block
/// order.
pub(crate) fn layer_norm_backward<T: Real>(
    g: &mut [T],
    saved: &NormSaved<T>,
    gamma: &[T],
    grads: Option<NormGrads<'_, T>>,
) {
    let width = gamma.len();
    let rpt = rows_per_task(width);
    let partials: Vec<Vec<T>> = g
        .par_chunks_mut(width * rpt)
        .zip(saved.xhat.par_chunks(width * rpt))
        .zip(saved.rstd.par_chunks(rpt))
        .map(|((g, xhat), rstd)| {
            vectorized(NormBackRows {
                g,
                xhat,
                rstd,
                gamma,
            })
        })
        .collect();
    let Some(grads) = grads else {
        return;
    };
    if !grads.accumulate {
        grads.gamma.fill(T::ZERO);
        grads.beta.fill(T::ZERO);
    }
    for part in partials {
        let (pw, pb) = part.split_at(width);
        for (d, p) in grads.gamma.iter_mut().zip(pw) {
            *d += *p;
        }
        for (d, p) in grads.beta.iter_mut().zip(pb) {
            *d += *p;
        }
    }
}

/// [`layer_norm_backward`] over a block of rows: returns the block's `[dgamma | dbeta]` sums.
struct NormBackRows<'a, T> {
    g: &'a mut [T],
    xhat: &'a [T],
    rstd: &'a [T],
    gamma: &'a [T],
}

impl<T: Real> Vectorized for NormBackRows<'_, T> {
    type Output = Vec<T>;

    #[inline(always)]
    fn run(self) -> Vec<T> {
        let (width, gamma) = (self.gamma.len(), self.gamma);
        let inv_n = T::ONE / T::lit(width as f64);
        let mut part = vec![T::ZERO; 2 * width];
        let (pw, pb) = part.split_at_mut(width);
        let rows = self
            .g
            .chunks_exact_mut(width)
            .zip(self.xhat.chunks_exact(width))
            .zip(self.rstd);
        for ((g, xh), &rs) in rows {
            let a = lane_sum(width, |i| g[i] * gamma[i]) * inv_n;
            let c = lane_sum(width, |i| g[i] * gamma[i] * xh[i]) * inv_n;
            for i in 0..width {
                pw[i] += g[i] * xh[i];
                pb[i] += g[i];
                g[i] = rs * (g[i] * gamma[i] - a - xh[i] * c);
            }
        }
        part
    }
}
