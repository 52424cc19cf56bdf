//! AdamW's fused CPU pass: one pass per parameter over contiguous memory, chunks spread over
//! rayon's pool, moments in f32 and f32 master weights for half-precision parameters.
//! [`Coefficients::apply`] is the update's one formula. `train::AdamW` owns the optimizer state,
//! the composite twin and the CUDA dispatch (`cuda/ops.cu`'s `adamw` kernel).

use std::cell::RefCell;

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, InplaceOp2, Layout};
use rayon::prelude::*;

use super::num::Elem;

/// The numbers of one AdamW update, rounded to f32 as candle's CPU scalar ops round them (the
/// composite update, `train::AdamW`'s reference twin, passes them to candle in f64).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Coefficients {
    pub(crate) beta1: f32,
    pub(crate) one_minus_beta1: f32,
    pub(crate) beta2: f32,
    pub(crate) one_minus_beta2: f32,
    pub(crate) eps: f32,
    pub(crate) inv_correction1: f32,
    pub(crate) inv_correction2: f32,
    pub(crate) lr: f32,
    /// `1 - lr * weight_decay` for the decay group.
    pub(crate) decay: Option<f32>,
}

impl Coefficients {
    /// From the update's numbers in f64: `decay` is `1 - lr * weight_decay` for the decay group.
    pub(crate) fn new(
        beta1: f64,
        beta2: f64,
        eps: f64,
        inv_corrections: [f64; 2],
        lr: f64,
        decay: Option<f64>,
    ) -> Self {
        Self {
            beta1: beta1 as f32,
            one_minus_beta1: (1.0 - beta1) as f32,
            beta2: beta2 as f32,
            one_minus_beta2: (1.0 - beta2) as f32,
            eps: eps as f32,
            inv_correction1: inv_corrections[0] as f32,
            inv_correction2: inv_corrections[1] as f32,
            lr: lr as f32,
            decay: decay.map(|d| d as f32),
        }
    }

    /// One element: returns the new `(param, m, v)`. This is the update's one formula: the
    /// CPU pass runs it, `cuda/ops.cu`'s `adamw` kernel is its line-by-line transcription, and
    /// each line is one op of the composite update in `train::AdamW`, in its order. The `+ 0.0`
    /// of candle's `affine` is kept because it turns `-0.0` into `0.0`, so the fused and
    /// composite updates agree to the bit.
    #[inline(always)]
    pub(crate) fn apply(&self, p: f32, g: f32, m: f32, v: f32) -> (f32, f32, f32) {
        let m = (m * self.beta1 + 0.0) + (g * self.one_minus_beta1 + 0.0);
        let v = (v * self.beta2 + 0.0) + ((g * g) * self.one_minus_beta2 + 0.0);
        let p = match self.decay {
            Some(d) => p * d + 0.0,
            None => p,
        };
        let denom = (v * self.inv_correction2 + 0.0).sqrt() + self.eps;
        let update = (m * self.inv_correction1 + 0.0) / denom;
        (p - (update * self.lr + 0.0), m, v)
    }
}

/// Elements per rayon task: large enough to amortise the scheduling, small enough to balance.
const CHUNK: usize = 1 << 14;

/// The lazy row update (`train::AdamW::with_sparse_rows`): [`fused_pass`] over the rows of
/// `row_len` elements whose gradient has a non-zero entry; the other rows are not touched.
fn fused_rows_pass<P: Elem, G: Elem>(
    p: &mut [P],
    g: &[G],
    m: &mut [f32],
    v: &mut [f32],
    master: Option<&mut [f32]>,
    k: &Coefficients,
    row_len: usize,
) {
    let touched = |g: &[G]| g.iter().any(|x| x.get() != 0.0);
    let rows = p
        .par_chunks_mut(row_len)
        .zip(g.par_chunks(row_len))
        .zip(m.par_chunks_mut(row_len).zip(v.par_chunks_mut(row_len)));
    match master {
        None => rows
            .filter(|((_, g), _)| touched(g))
            .for_each(|((p, g), (m, v))| update_elements(p, g, m, v, k)),
        Some(w) => rows
            .zip(w.par_chunks_mut(row_len))
            .filter(|(((_, g), _), _)| touched(g))
            .for_each(|(((p, g), (m, v)), w)| update_elements_master(p, g, m, v, w, k)),
    }
}

#[inline(always)]
fn update_elements<P: Elem, G: Elem>(
    p: &mut [P],
    g: &[G],
    m: &mut [f32],
    v: &mut [f32],
    k: &Coefficients,
) {
    for i in 0..p.len() {
        let (np, nm, nv) = k.apply(p[i].get(), g[i].get(), m[i], v[i]);
        (p[i], m[i], v[i]) = (P::put(np), nm, nv);
    }
}

#[inline(always)]
fn update_elements_master<P: Elem, G: Elem>(
    p: &mut [P],
    g: &[G],
    m: &mut [f32],
    v: &mut [f32],
    w: &mut [f32],
    k: &Coefficients,
) {
    for i in 0..p.len() {
        let (nw, nm, nv) = k.apply(w[i], g[i].get(), m[i], v[i]);
        (p[i], w[i], m[i], v[i]) = (P::put(nw), nw, nm, nv);
    }
}

fn fused_pass<P: Elem, G: Elem>(
    p: &mut [P],
    g: &[G],
    m: &mut [f32],
    v: &mut [f32],
    master: Option<&mut [f32]>,
    k: &Coefficients,
) {
    let moments = p
        .par_chunks_mut(CHUNK)
        .zip(g.par_chunks(CHUNK))
        .zip(m.par_chunks_mut(CHUNK).zip(v.par_chunks_mut(CHUNK)));
    match master {
        None => moments.for_each(|((p, g), (m, v))| update_elements(p, g, m, v, k)),
        Some(w) => moments
            .zip(w.par_chunks_mut(CHUNK))
            .for_each(|(((p, g), (m, v)), w)| update_elements_master(p, g, m, v, w, k)),
    }
}

/// The moments and (for half-precision parameters) f32 master weights of one parameter.
pub(crate) type HostBuffers<'a> = (&'a mut Vec<f32>, &'a mut Vec<f32>, Option<&'a mut [f32]>);

/// The fused update as an in-place op on the parameter, reading the gradient.
pub(crate) struct FusedAdamW<'a> {
    /// The parameter's state, updated in place.
    pub(crate) buffers: RefCell<HostBuffers<'a>>,
    /// The update's numbers.
    pub(crate) k: Coefficients,
    /// `Some(row length)` for the lazy row update: rows whose gradient is all zero keep their
    /// parameter, moments and master copy.
    pub(crate) row_len: Option<usize>,
}

fn slice<'s, T>(data: &'s [T], layout: &Layout) -> candle_core::Result<&'s [T]> {
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(&data[start..end]),
        None => candle_core::bail!("fused adamw: a non-contiguous gradient"),
    }
}

fn with_grad<P: Elem>(
    p: &mut [P],
    g: &CpuStorage,
    gl: &Layout,
    (m, v, master): &mut HostBuffers<'_>,
    k: &Coefficients,
    row_len: Option<usize>,
) -> candle_core::Result<()> {
    fn pass<P: Elem, G: Elem>(
        p: &mut [P],
        g: &[G],
        (m, v, master): (&mut [f32], &mut [f32], Option<&mut [f32]>),
        k: &Coefficients,
        row_len: Option<usize>,
    ) {
        match row_len {
            Some(n) if n > 0 => fused_rows_pass(p, g, m, v, master, k, n),
            _ => fused_pass(p, g, m, v, master, k),
        }
    }
    let state = (m.as_mut_slice(), v.as_mut_slice(), master.as_deref_mut());
    match g {
        CpuStorage::F32(g) => pass(p, slice(g, gl)?, state, k, row_len),
        CpuStorage::F64(g) => pass(p, slice(g, gl)?, state, k, row_len),
        CpuStorage::BF16(g) => pass(p, slice(g, gl)?, state, k, row_len),
        CpuStorage::F16(g) => pass(p, slice(g, gl)?, state, k, row_len),
        other => candle_core::bail!("fused adamw: a {:?} gradient", other.dtype()),
    }
    Ok(())
}

impl InplaceOp2 for FusedAdamW<'_> {
    fn name(&self) -> &'static str {
        "fused-adamw"
    }

    fn cpu_fwd(
        &self,
        p: &mut CpuStorage,
        pl: &Layout,
        g: &CpuStorage,
        gl: &Layout,
    ) -> candle_core::Result<()> {
        let Some((start, end)) = pl.contiguous_offsets() else {
            candle_core::bail!("fused adamw: a non-contiguous parameter")
        };
        let buffers = &mut *self.buffers.borrow_mut();
        let (k, rows) = (&self.k, self.row_len);
        match p {
            CpuStorage::F32(p) => with_grad(&mut p[start..end], g, gl, buffers, k, rows),
            CpuStorage::F64(p) => with_grad(&mut p[start..end], g, gl, buffers, k, rows),
            CpuStorage::BF16(p) => with_grad(&mut p[start..end], g, gl, buffers, k, rows),
            CpuStorage::F16(p) => with_grad(&mut p[start..end], g, gl, buffers, k, rows),
            other => candle_core::bail!("fused adamw: a {:?} parameter", other.dtype()),
        }
    }
}
