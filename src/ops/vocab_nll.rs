//! A linear layer, log-softmax and negative log-likelihood over a vocabulary, fused and run in
//! chunks of the vocabulary: the masked-language-model loss without its `[n, vocab]` logits.
//!
//! # Derivation
//!
//! With logits `z = x Wᵀ + b` (`[n, vocab]`), `lse_i = log Σ_j exp(z_ij)` and targets `t_i`,
//! the kernel returns per row `(lse_i, z_{i,t_i})`; the loss is `L = 1/n Σ_i (lse_i − z_{i,t_i})`.
//! For upstream gradients `a_i = ∂L/∂lse_i` and `c_i = ∂L/∂z_{i,t_i}` (`1/n` and `−1/n` for the
//! mean) the logit gradient is
//!
//! ```text
//! G_ij = a_i · exp(z_ij − lse_i) + c_i · [j = t_i]
//! ∂L/∂x = G W,   ∂L/∂W = Gᵀ x,   ∂L/∂b = Σ_i G_i
//! ```
//!
//! `∂L/∂x` is a sum over vocabulary chunks and `∂L/∂W`, `∂L/∂b` are concatenations of per-chunk
//! blocks, so both passes visit the vocabulary `chunk` rows of `W` at a time and hold one
//! `[n, chunk]` block of logits: the forward keeps a running maximum and a running sum of
//! exponentials per row (an online log-sum-exp), the backward recomputes each block's logits from
//! `x`, `W`, `b` and the saved `lse`. The products are GEMMs of the `gemm` crate (the one candle's
//! CPU backend uses), the row passes run over rayon's pool.

use std::borrow::Cow;
use std::sync::Arc;

use candle_core::WithDType;
use candle_core::{CpuStorage, CustomOp3, DType, Device, Layout, Shape, Storage, Tensor, D};
use rayon::prelude::*;

use super::gemm::{Threads, View};
use super::kernel::{check_float, check_same, dispatch, lane_sum, rows_per_task, slice};
use super::num::{accumulation_dtype, Elem, Real};
use crate::{Error, Result};

const OP: &str = "vocab_nll";

/// Vocabulary rows per chunk in [`vocab_nll`]: the `[n, chunk]` block of logits for 1229 rows
/// (15% of a 64 × 128 batch) is 20 MB in f32, and a `[chunk, 768]` block of the weight is 12 MB.
pub const VOCAB_NLL_CHUNK: usize = 4096;

/// Mean negative log-likelihood of `targets` under `log_softmax(xs Wᵀ + b)`: the fused kernel on
/// the CPU (in chunks of [`VOCAB_NLL_CHUNK`] vocabulary rows), the composite elsewhere.
///
/// # Shapes
/// - `xs`: `[n, hidden]`
/// - `weight`: `[vocab, hidden]`, `bias`: `[vocab]`, same dtype and device as `xs`
/// - `targets`: `[n]` u32, each below `vocab`
/// - output: scalar, f32 for half-precision inputs; 0 when `n = 0`
pub fn vocab_nll(xs: &Tensor, weight: &Tensor, bias: &Tensor, targets: &Tensor) -> Result<Tensor> {
    if xs.device().is_cpu() {
        vocab_nll_fused(xs, weight, bias, targets, VOCAB_NLL_CHUNK)
    } else {
        vocab_nll_composite(xs, weight, bias, targets)
    }
}

/// Checks shapes, dtypes, devices and target ids; returns `n` and the targets.
fn check(xs: &Tensor, weight: &Tensor, bias: &Tensor, targets: &Tensor) -> Result<Vec<u32>> {
    check_float(xs, OP)?;
    check_same(xs, weight, OP)?;
    check_same(xs, bias, OP)?;
    let (n, hidden) = xs.dims2()?;
    let vocab = weight.dims().first().copied().unwrap_or(0);
    for (name, t, expected) in [
        ("weight", weight, vec![vocab, hidden]),
        ("bias", bias, vec![vocab]),
        ("targets", targets, vec![n]),
    ] {
        if t.dims() != expected {
            return Err(Error::ShapeMismatch {
                name: format!("{OP} {name}"),
                expected,
                actual: t.dims().to_vec(),
            });
        }
    }
    if vocab == 0 {
        return Err(Error::InvalidArgument(format!("{OP}: empty vocabulary")));
    }
    if targets.dtype() != DType::U32 || !targets.device().same_device(xs.device()) {
        return Err(Error::InvalidArgument(format!(
            "{OP}: targets must be u32 on the device of xs, got {:?} on {:?}",
            targets.dtype(),
            targets.device().location()
        )));
    }
    let ids = targets.to_vec1::<u32>()?;
    if let Some(bad) = ids.iter().find(|&&t| t as usize >= vocab) {
        return Err(Error::InvalidArgument(format!(
            "{OP}: target id {bad} outside the vocabulary of {vocab}"
        )));
    }
    Ok(ids)
}

/// The composite twin: the whole `[n, vocab]` logits as candle ops (the product and bias in the
/// input dtype, log-softmax in f32 for half precision), gathered at the targets and averaged.
/// Differentiable on every device; `n = 0` gives a constant 0.
pub fn vocab_nll_composite(
    xs: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    targets: &Tensor,
) -> Result<Tensor> {
    let n = check(xs, weight, bias, targets)?.len();
    let acc = accumulation_dtype(xs.dtype());
    if n == 0 {
        // candle's max over the rows of an empty `[0, vocab]` is an error: no rows, no graph.
        return Ok(Tensor::zeros((), acc, xs.device())?);
    }
    let logits = xs.matmul(&weight.t()?)?.broadcast_add(bias)?;
    let logits = logits.to_dtype(acc)?;
    let log_probs = candle_nn::ops::log_softmax(&logits, D::Minus1)?;
    let picked = log_probs.gather(&targets.unsqueeze(1)?, 1)?;
    Ok(picked.mean_all()?.neg()?)
}

/// [`vocab_nll`] as one CPU kernel over chunks of `chunk` vocabulary rows, with a fused backward
/// that recomputes each chunk's logits: neither pass holds more than `[n, chunk]` logits. Half
/// precision is widened to f32 chunk by chunk; every product and reduction runs in f32 (f64 for
/// f64).
pub fn vocab_nll_fused(
    xs: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    targets: &Tensor,
    chunk: usize,
) -> Result<Tensor> {
    let targets = check(xs, weight, bias, targets)?;
    if chunk == 0 {
        return Err(Error::InvalidArgument(format!("{OP}: chunk of 0 rows")));
    }
    if !xs.device().is_cpu() {
        return Err(Error::InvalidArgument(format!(
            "{OP}: the fused kernel runs on the CPU; use the composite form on {:?}",
            xs.device().location()
        )));
    }
    let n = targets.len();
    let op = VocabNllOp {
        targets: targets.into(),
        chunk,
    };
    let stats = xs.contiguous()?.apply_op3_arc(
        &weight.contiguous()?,
        &bias.contiguous()?,
        Arc::new(Box::new(op)),
    )?;
    let nll = (stats.narrow(1, 0, 1)? - stats.narrow(1, 1, 1)?)?;
    // Over max(n, 1): no rows give 0 and zero gradients rather than 0 / 0.
    Ok((nll.sum_all()? / n.max(1) as f64)?)
}

/// Per row `(lse_i, z_{i,t_i})` as an `[n, 2]` tensor of the accumulation dtype.
struct VocabNllOp {
    targets: Arc<[u32]>,
    chunk: usize,
}

/// `n`, `hidden` and `vocab`, from the layouts of `xs` and `weight`.
fn dims(xl: &Layout, wl: &Layout) -> candle_core::Result<(usize, usize, usize)> {
    let (n, hidden) = xl.shape().dims2()?;
    let (vocab, _) = wl.shape().dims2()?;
    Ok((n, hidden, vocab))
}

impl CustomOp3 for VocabNllOp {
    fn name(&self) -> &'static str {
        "fused-vocab-nll"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let d = dims(l1, l2)?;
        dispatch!(s1, "fused-vocab-nll", |T| {
            let m = Mats::<T> {
                x: slice(s1, l1)?,
                w: slice(s2, l2)?,
                b: slice(s3, l3)?,
                t: &self.targets,
            };
            let stats = forward(m, d, self.chunk)?;
            Ok((
                <T as Elem>::A::to_cpu_storage_owned(stats),
                Shape::from((d.0, 2)),
            ))
        })
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let want = Want {
            dx: x.track_op(),
            dw: w.track_op(),
            db: b.track_op(),
        };
        if !(want.dx || want.dw || want.db) {
            return Ok((None, None, None));
        }
        let lse = res.narrow(1, 0, 1)?.flatten_all()?;
        let grad = grad.to_dtype(res.dtype())?.contiguous()?;
        let (xs, xl) = x.storage_and_layout();
        let (ws, wl) = w.storage_and_layout();
        let (bs, bl) = b.storage_and_layout();
        let (Storage::Cpu(xs), Storage::Cpu(ws), Storage::Cpu(bs)) = (&*xs, &*ws, &*bs) else {
            candle_core::bail!("{OP}: the fused backward runs on the CPU")
        };
        let d = dims(xl, wl)?;
        dispatch!(xs, "fused-vocab-nll-bwd", |T| {
            let m = Mats::<T> {
                x: slice(xs, xl)?,
                w: slice(ws, wl)?,
                b: slice(bs, bl)?,
                t: &self.targets,
            };
            let lse = lse.to_vec1::<<T as Elem>::A>()?;
            let grad = grad.flatten_all()?.to_vec1::<<T as Elem>::A>()?;
            let up = Upstream {
                lse: &lse,
                grad: &grad,
            };
            let g = backward(m, up, d, self.chunk, want)?;
            let dev = &Device::Cpu;
            Ok((
                g.dx.map(|v| Tensor::from_vec(v, (d.0, d.1), dev))
                    .transpose()?,
                g.dw.map(|v| Tensor::from_vec(v, (d.2, d.1), dev))
                    .transpose()?,
                g.db.map(|v| Tensor::from_vec(v, d.2, dev)).transpose()?,
            ))
        })
    }
}

/// The kernel's inputs: `x` `[n, hidden]`, `w` `[vocab, hidden]`, `b` `[vocab]` (row-major) and
/// the targets.
#[derive(Clone, Copy)]
struct Mats<'a, T> {
    x: &'a [T],
    w: &'a [T],
    b: &'a [T],
    t: &'a [u32],
}

impl<T: Elem> Mats<'_, T> {
    fn check(&self, (n, hidden, vocab): (usize, usize, usize)) -> candle_core::Result<()> {
        if self.x.len() != n * hidden
            || self.w.len() != vocab * hidden
            || self.b.len() != vocab
            || self.t.len() != n
            || self.t.iter().any(|&t| t as usize >= vocab)
        {
            candle_core::bail!("{OP}: inputs do not match n {n}, hidden {hidden}, vocab {vocab}")
        }
        Ok(())
    }
}

/// `s` in the accumulation type: borrowed for f32 and f64, widened for half precision.
fn widen<T: Elem>(s: &[T]) -> Cow<'_, [T::A]> {
    match T::as_acc(s) {
        Some(a) => Cow::Borrowed(a),
        None => Cow::Owned(s.par_iter().map(|&v| v.load()).collect()),
    }
}

/// `dst (m × n, row-major) [+]= lhs · rhs` ([`super::gemm::gemm`], over rayon's pool).
fn gemm<A: Real>(dst: &mut [A], n: usize, lhs: View<'_, A>, rhs: View<'_, A>, accumulate: bool) {
    super::gemm::gemm(dst, n, lhs, rhs, A::ONE, accumulate, Threads::Pool);
}

/// `z = x W_cᵀ + b_c` for one chunk: `x` `[n, hidden]`, `wc` `[c, hidden]`, `z` `[n, c]`.
fn logits<A: Real>(
    z: &mut [A],
    x: &[A],
    wc: &[A],
    bc: &[A],
    (n, hidden): (usize, usize),
) -> candle_core::Result<()> {
    let c = bc.len();
    let (lhs, rhs) = (View::rows(x, n, hidden), View::rows(wc, c, hidden).t());
    gemm(z, c, lhs, rhs, false);
    z.par_chunks_mut(c * rows_per_task(c)).for_each(|rows| {
        for row in rows.chunks_exact_mut(c) {
            row.iter_mut().zip(bc).for_each(|(z, &b)| *z += b);
        }
    });
    Ok(())
}

/// The forward pass: per row `(lse_i, z_{i,t_i})`, interleaved.
fn forward<T: Elem>(
    m: Mats<'_, T>,
    (n, hidden, vocab): (usize, usize, usize),
    chunk: usize,
) -> candle_core::Result<Vec<T::A>> {
    m.check((n, hidden, vocab))?;
    let x = widen(m.x);
    // Per row: running maximum, running sum of exp(z - maximum), the target's logit.
    let mut state = vec![(T::A::NEG_INFINITY, T::A::ZERO, T::A::ZERO); n];
    let mut z = vec![T::A::ZERO; n * chunk.min(vocab)];
    for lo in (0..vocab).step_by(chunk) {
        let c = chunk.min(vocab - lo);
        let wc = widen(&m.w[lo * hidden..(lo + c) * hidden]);
        let z = &mut z[..n * c];
        logits(z, &x, &wc, &widen(&m.b[lo..lo + c]), (n, hidden))?;
        let rpt = rows_per_task(c);
        z.par_chunks(c * rpt)
            .zip(state.par_chunks_mut(rpt))
            .zip(m.t.par_chunks(rpt))
            .for_each(|((z, state), t)| {
                for ((z, (max, sum, picked)), &t) in z.chunks_exact(c).zip(state).zip(t) {
                    let top = z.iter().fold(T::A::NEG_INFINITY, |a, &v| a.max(v));
                    let new_max = max.max(top);
                    // The sum so far rescaled to the new maximum (on the first chunk the old
                    // maximum is -inf and the factor exp(-inf) = 0), plus this chunk's terms.
                    *sum = *sum * (*max - new_max).exp_nonpos()
                        + lane_sum(c, |j| (z[j] - new_max).exp_nonpos());
                    *max = new_max;
                    if let Some(zt) = (t as usize).checked_sub(lo).and_then(|j| z.get(j)) {
                        *picked = *zt;
                    }
                }
            });
    }
    Ok(state
        .into_iter()
        .flat_map(|(max, sum, picked)| [max + sum.ln(), picked])
        .collect())
}

/// Which gradients the backward computes (an untracked input, such as a detached tied weight,
/// gets none, and costs no GEMM).
#[derive(Clone, Copy)]
struct Want {
    dx: bool,
    dw: bool,
    db: bool,
}

/// The forward's saved `lse` (`[n]`) and the upstream gradient of its output (`[n, 2]`,
/// row-major: `∂L/∂lse_i`, `∂L/∂z_{i,t_i}`).
struct Upstream<'a, A> {
    lse: &'a [A],
    grad: &'a [A],
}

struct Grads<T> {
    dx: Option<Vec<T>>,
    dw: Option<Vec<T>>,
    db: Option<Vec<T>>,
}

/// Stores `src` (accumulation type) into `dst` (storage type).
fn store<T: Elem>(dst: &mut [T], src: &[T::A]) {
    dst.par_iter_mut()
        .zip(src.par_iter())
        .for_each(|(d, &s)| *d = T::store(s));
}

/// The backward pass: the gradients [`Want`] asks for, chunk by chunk.
fn backward<T: Elem>(
    m: Mats<'_, T>,
    up: Upstream<'_, T::A>,
    (n, hidden, vocab): (usize, usize, usize),
    chunk: usize,
    want: Want,
) -> candle_core::Result<Grads<T>> {
    m.check((n, hidden, vocab))?;
    if up.lse.len() != n || up.grad.len() != 2 * n {
        candle_core::bail!("{OP}: saved statistics do not match {n} rows")
    }
    let x = widen(m.x);
    let mut dx = want.dx.then(|| vec![T::A::ZERO; n * hidden]);
    let mut dw = want.dw.then(|| vec![T::elem_zero(); vocab * hidden]);
    let mut db = want.db.then(|| vec![T::elem_zero(); vocab]);
    let mut g = vec![T::A::ZERO; n * chunk.min(vocab)];
    for lo in (0..vocab).step_by(chunk) {
        let c = chunk.min(vocab - lo);
        let wc = widen(&m.w[lo * hidden..(lo + c) * hidden]);
        let g = &mut g[..n * c];
        logits(g, &x, &wc, &widen(&m.b[lo..lo + c]), (n, hidden))?;
        logit_grad(g, &up, m.t, (lo, c));
        if let Some(dx) = dx.as_mut() {
            let (lhs, rhs) = (View::rows(g, n, c), View::rows(&wc, c, hidden));
            gemm(dx, hidden, lhs, rhs, true);
        }
        if let Some(dw) = dw.as_mut() {
            let dw = &mut dw[lo * hidden..(lo + c) * hidden];
            let (lhs, rhs) = (View::rows(g, n, c).t(), View::rows(&x, n, hidden));
            match T::as_acc_mut(dw) {
                Some(dw) => gemm(dw, hidden, lhs, rhs, false),
                None => {
                    let mut tmp = vec![T::A::ZERO; c * hidden];
                    gemm(&mut tmp, hidden, lhs, rhs, false);
                    store(dw, &tmp);
                }
            }
        }
        if let Some(db) = db.as_mut() {
            store(&mut db[lo..lo + c], &column_sums(g, c));
        }
    }
    let dx = dx.map(|dx| {
        let mut out = vec![T::elem_zero(); n * hidden];
        store(&mut out, &dx);
        out
    });
    Ok(Grads { dx, dw, db })
}

/// Overwrites one chunk's logits `z` (`[n, c]`, vocabulary rows `lo..lo + c`) with their
/// gradient `G_ij = a_i exp(z_ij − lse_i) + c_i [j = t_i]`.
fn logit_grad<A: Real>(
    z: &mut [A],
    up: &Upstream<'_, A>,
    targets: &[u32],
    (lo, c): (usize, usize),
) {
    let rpt = rows_per_task(c);
    z.par_chunks_mut(c * rpt)
        .zip(up.lse.par_chunks(rpt))
        .zip(up.grad.par_chunks(2 * rpt))
        .zip(targets.par_chunks(rpt))
        .for_each(|(((z, lse), grad), t)| {
            for (((z, &lse), grad), &t) in z.chunks_exact_mut(c).zip(lse).zip(grad.chunks(2)).zip(t)
            {
                let (a, ct) = (grad[0], grad[1]);
                // `z - lse` is at most rounding above 0: `exp` (not `exp_nonpos`) takes it.
                z.iter_mut().for_each(|z| *z = a * (*z - lse).exp());
                if let Some(zt) = (t as usize).checked_sub(lo).and_then(|j| z.get_mut(j)) {
                    *zt += ct;
                }
            }
        });
}

/// Sums of the columns of a row-major matrix with `c` columns, in blocks of columns over rayon
/// (each sum adds its rows in order, so the result does not depend on the thread count).
fn column_sums<A: Real>(g: &[A], c: usize) -> Vec<A> {
    const BLOCK: usize = 256;
    let mut out = vec![A::ZERO; c];
    out.par_chunks_mut(BLOCK).enumerate().for_each(|(k, out)| {
        let j0 = k * BLOCK;
        for row in g.chunks_exact(c) {
            out.iter_mut().zip(&row[j0..]).for_each(|(o, &v)| *o += v);
        }
    });
    out
}
