//! Inverted dropout with masks from Philox4x32-10, keyed by position instead of by a stream.

use std::sync::Arc;

use candle_core::WithDType;
use candle_core::{CpuStorage, CustomOp1, DType, Device, Layout, Shape, Tensor};
use rayon::prelude::*;

use super::kernel::{
    check_device, check_float, dispatch, fused_supported, slice, vectorized, Vectorized,
};
use super::num::{Elem, Real};
use super::philox::{philox4x32_10, philox4x32_10_lanes, sample_key};
use crate::{Error, Result};

/// What a dropout mask is a function of, besides the dropout layer (its site id) and the entry's
/// position within its sample.
///
/// Row `r` of a batch (its first dimension) is global sample `sample_offset + r`. A batch cut in
/// chunks gets the masks of the whole batch when each chunk passes the offset of its first row;
/// the masks do not depend on the thread count either.
///
/// `step` and the sample index enter Philox's counter by their low 32 bits and its key by their
/// high 32 bits: distinct values give independent masks up to 2^32 steps and samples, and beyond
/// only an unlucky collision of `seed` with the high bits could repeat one.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, Default, serde::Serialize, serde::Deserialize,
)]
pub struct DropoutKey {
    /// The run's seed.
    pub seed: u64,
    /// The optimizer step (or any counter that changes between forward passes).
    pub step: u64,
    /// Global index of the first row of the batch.
    pub sample_offset: u64,
}

impl DropoutKey {
    /// The key of `step` in a run seeded by `seed`, for a batch starting at global sample 0.
    pub fn new(seed: u64, step: u64) -> Self {
        Self {
            seed,
            step,
            sample_offset: 0,
        }
    }

    /// The same key for a batch (or chunk) whose first row is global sample `offset`.
    pub fn with_sample_offset(self, offset: u64) -> Self {
        Self {
            sample_offset: offset,
            ..self
        }
    }

    /// The key of the chunk starting `rows` rows further into the batch.
    pub fn advanced(self, rows: u64) -> Self {
        self.with_sample_offset(self.sample_offset.wrapping_add(rows))
    }
}

/// Entries per task: a multiple of 4 (one Philox call serves four entries).
const CHUNK: usize = 8192;

/// Entry `j` is kept when its Philox word is at least this: `u >= p * 2^32`, so
/// `P(keep) = 1 - p` up to 2^-32.
fn keep_threshold(p: f32) -> u32 {
    (f64::from(p) * 4_294_967_296.0)
        .round()
        .min(u32::MAX as f64) as u32
}

/// Calls `f(flat_index, keep, out_entry)` for every entry of `out`, viewed as rows of
/// `row_len` (one row per sample), in parallel.
fn for_each_keep<T: Send>(
    out: &mut [T],
    row_len: usize,
    p: f32,
    key: DropoutKey,
    site: u32,
    f: impl Fn(usize, bool, &mut T) + Sync,
) {
    if out.is_empty() || row_len == 0 {
        return;
    }
    let threshold = keep_threshold(p);
    out.par_chunks_mut(row_len)
        .enumerate()
        .for_each(|(r, row)| {
            let sample = key.sample_offset.wrapping_add(r as u64);
            let k = sample_key(key.seed, key.step, sample);
            row.par_chunks_mut(CHUNK)
                .enumerate()
                .for_each(|(c, chunk)| {
                    vectorized(KeepChunk {
                        chunk,
                        base: c * CHUNK,
                        offset: r * row_len,
                        counter: [site, sample as u32, key.step as u32],
                        key: k,
                        threshold,
                        f: &f,
                    })
                });
        });
}

/// One task of [`for_each_keep`]: `chunk` starts at entry `base` of its sample, entry
/// `offset + base` of the buffer.
struct KeepChunk<'a, T, F> {
    chunk: &'a mut [T],
    base: usize,
    offset: usize,
    /// Philox counter words 1–3: site, sample, step.
    counter: [u32; 3],
    key: [u32; 2],
    threshold: u32,
    f: &'a F,
}

impl<T, F: Fn(usize, bool, &mut T)> Vectorized for KeepChunk<'_, T, F> {
    type Output = ();

    #[inline(always)]
    fn run(self) {
        // Sixteen Philox calls at a time, lane by lane (they differ only in the quad index),
        // then the tail one call at a time: the same words either way.
        const LANES: usize = 16;
        let [site, sample, step] = self.counter;
        let mut blocks = self.chunk.chunks_exact_mut(4 * LANES);
        let mut j = self.base;
        for block in &mut blocks {
            let first = std::array::from_fn(|lane| (j / 4 + lane) as u32);
            let words = philox4x32_10_lanes::<LANES>(first, self.counter, self.key);
            for (q, quad) in block.chunks_exact_mut(4).enumerate() {
                for (i, v) in quad.iter_mut().enumerate() {
                    let keep = words[i][q] >= self.threshold;
                    (self.f)(self.offset + j + 4 * q + i, keep, v);
                }
            }
            j += 4 * LANES;
        }
        for (q, quad) in blocks.into_remainder().chunks_mut(4).enumerate() {
            let jq = j + 4 * q;
            let words = philox4x32_10([(jq / 4) as u32, site, sample, step], self.key);
            for (i, v) in quad.iter_mut().enumerate() {
                (self.f)(self.offset + jq + i, words[i] >= self.threshold, v);
            }
        }
    }
}

/// `data *= mask` in place, with the masks [`dropout_fused`] draws: `data` holds samples of
/// `row_len` entries, the first being sample `key.sample_offset`. Dropout is linear, so the same
/// call is also its backward. `p = 0` leaves `data` alone; `p = 1` zeroes it.
pub(crate) fn dropout_in_place<T: Real>(
    data: &mut [T],
    row_len: usize,
    p: f32,
    key: DropoutKey,
    site: u32,
) {
    if p == 0.0 {
        return;
    }
    if p >= 1.0 {
        data.fill(T::ZERO);
        return;
    }
    // The fused kernel's scale, rounded the same way.
    let scale = T::lit(1.0 / (1.0 - f64::from(p)));
    for_each_keep(data, row_len, p, key, site, |_, keep, v| {
        *v = if keep { *v * scale } else { T::ZERO };
    });
}

fn check(x: &Tensor, p: f32) -> Result<usize> {
    check_float(x, "dropout")?;
    if !(0.0..=1.0).contains(&p) {
        return Err(Error::InvalidArgument(format!(
            "dropout probability {p} is outside [0, 1]"
        )));
    }
    match x.dims().first() {
        Some(&rows) => Ok(rows),
        None => Err(Error::InvalidArgument(
            "dropout needs a batch dimension: got a scalar".into(),
        )),
    }
}

/// The mask of [`dropout`]: `0` or `1 / (1 - p)` per entry, for a tensor of `shape` whose first
/// dimension is the batch. Computed on the host and moved to `device`.
pub fn dropout_mask(
    shape: &[usize],
    p: f32,
    key: DropoutKey,
    site: u32,
    dtype: DType,
    device: &Device,
) -> Result<Tensor> {
    let like = Tensor::zeros(shape, dtype, &Device::Cpu)?;
    check(&like, p)?;
    if p == 1.0 {
        // Everything dropped; the scale 1 / (1 - p) would be infinite.
        return Ok(like.to_device(device)?);
    }
    let n: usize = shape.iter().product();
    let row_len = n.checked_div(shape[0]).unwrap_or(0);
    let scale = (1.0 / (1.0 - f64::from(p))) as f32;
    let mut mask = vec![0f32; n];
    for_each_keep(&mut mask, row_len, p, key, site, |_, keep, m| {
        *m = if keep { scale } else { 0.0 };
    });
    Ok(Tensor::from_vec(mask, shape, device)?.to_dtype(dtype)?)
}

/// Inverted dropout: each entry zeroed with probability `p` (`0 <= p <= 1`; at `p = 1` the
/// output is `x · 0`, as PyTorch's), the others scaled by `1 / (1 - p)`; the fused kernel where it runs (the CPU; CUDA for f32, f16 and bf16), the
/// composite elsewhere. `site` names the dropout
/// layer (each layer of a model needs its own).
///
/// # Shapes
/// - `x`: `[batch, ...]`; output: the shape of `x`
pub fn dropout(x: &Tensor, p: f32, key: DropoutKey, site: u32) -> Result<Tensor> {
    if fused_supported(x) {
        dropout_fused(x, p, key, site)
    } else {
        dropout_composite(x, p, key, site)
    }
}

/// `x * dropout_mask(..)` as candle ops (the product in f32 for half precision); works on every
/// device.
pub fn dropout_composite(x: &Tensor, p: f32, key: DropoutKey, site: u32) -> Result<Tensor> {
    check(x, p)?;
    if p == 1.0 {
        return drop_all(x);
    }
    let dtype = x.dtype();
    let acc = super::num::accumulation_dtype(dtype);
    let mask = dropout_mask(x.dims(), p, key, site, acc, x.device())?;
    Ok((x.to_dtype(acc)? * mask)?.to_dtype(dtype)?)
}

/// Dropout as one pass (CPU, or CUDA for f32, f16 and bf16) that draws the mask as it goes;
/// its backward applies the same mask to the gradient (regenerated from the key, never stored).
/// The CUDA kernel computes the CPU's masks bit for bit.
pub fn dropout_fused(x: &Tensor, p: f32, key: DropoutKey, site: u32) -> Result<Tensor> {
    check(x, p)?;
    if p == 1.0 {
        return drop_all(x);
    }
    check_device(x, "dropout")?;
    Ok(x.contiguous()?
        .apply_op1_arc(Arc::new(Box::new(DropoutOp { p, key, site })))?)
}

/// Dropout with `p = 1`, as PyTorch's: `x · 0` (zeros, NaN where `x` is NaN), with a zero
/// gradient.
fn drop_all(x: &Tensor) -> Result<Tensor> {
    // A product with zeros, not `affine(0, 0)`: candle's autograd stops at a zero affine, and
    // the input would get no gradient at all instead of a zero one.
    Ok((x * x.zeros_like()?)?)
}

#[derive(Clone)]
struct DropoutOp {
    p: f32,
    key: DropoutKey,
    site: u32,
}

impl CustomOp1 for DropoutOp {
    fn name(&self) -> &'static str {
        "fused-dropout"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let rows = l.dims().first().copied().unwrap_or(1);
        dispatch!(s, "fused-dropout", |T| {
            let x = slice::<T>(s, l)?;
            let row_len = x.len().checked_div(rows).unwrap_or(0);
            let scale = <T as Elem>::A::lit(1.0 / (1.0 - f64::from(self.p)));
            let mut out = vec![T::elem_zero(); x.len()];
            for_each_keep(
                &mut out,
                row_len,
                self.p,
                self.key,
                self.site,
                |i, keep, y| {
                    *y = if keep {
                        T::store(Elem::load(x[i]) * scale)
                    } else {
                        T::elem_zero()
                    };
                },
            );
            Ok((T::to_cpu_storage_owned(out), l.shape().clone()))
        })
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let rows = l.dims().first().copied().unwrap_or(1);
        let args = super::cuda::DropoutArgs {
            seed: self.key.seed,
            step: self.key.step,
            sample_offset: self.key.sample_offset,
            site: self.site,
            threshold: keep_threshold(self.p),
            // As the CPU's f32 scale (`Real::lit` of the f64 quotient).
            scale: (1.0 / (1.0 - f64::from(self.p))) as f32,
        };
        Ok((
            super::cuda::dropout((s, l), rows, &args)?,
            l.shape().clone(),
        ))
    }

    fn bwd(&self, _x: &Tensor, _y: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        // Dropout is linear: its backward is the same masked scaling of the gradient.
        Ok(Some(grad.contiguous()?.apply_op1_no_bwd(self)?))
    }
}
