//! Gradient buckets: named gradients as dense f32 buffers in a fixed order.

use std::collections::BTreeMap;

use candle_core::{DType, Device, Shape, Tensor, Var};

use super::Collective;
use crate::{Error, Result};

/// Gradients by parameter name (the trainer's type).
type Gradients = BTreeMap<String, Tensor>;

/// The default cap on one gradient bucket, in bytes of its f32 buffer: PyTorch DDP's
/// `bucket_cap_mb` (25 MiB). Buckets bound the size of one transfer and of the temporary
/// buffers; smaller ones cost more collectives.
pub const DEFAULT_BUCKET_BYTES: usize = 25 * 1024 * 1024;

/// The fixed order and sizes in which every rank lays its gradients out for the all-reduce.
///
/// Parameters are taken in name order (a `BTreeMap` iterates sorted), so ranks that hold the
/// same parameters agree on the layout without talking. Gradients are concatenated as f32 into
/// one buffer, or into several of at most [`GradLayout::with_max_bucket_len`] elements each
/// (split at parameter boundaries; a larger parameter gets a bucket of its own). f32 is the
/// accumulation dtype whatever the gradients' own (f16 and bf16 included): the sum stays in
/// it, so that a sum of scaled half-precision gradients that exceeds their range does not
/// overflow, and the loss scale is divided out before anything is cast back. The last
/// bucket ends with a trailer of one element per parameter (whether this rank has its
/// gradient) and one flag (whether this rank's loss is non-finite), so the presence counts and
/// the non-finite agreement ride on the same all-reduce as the gradients.
///
/// # Example
///
/// ```
/// use std::collections::BTreeMap;
/// use candle_core::{Device, Tensor, Var};
/// use mlctl::dist::{GradLayout, LocalCollective};
///
/// # fn main() -> mlctl::Result<()> {
/// let dev = Device::Cpu;
/// let w = Var::zeros((2, 3), candle_core::DType::F32, &dev)?;
/// let layout = GradLayout::new(&BTreeMap::from([("w".to_string(), w)]))?;
/// let c = LocalCollective::group(1)?.remove(0);
/// let grads = BTreeMap::from([("w".to_string(), Tensor::ones((2, 3), candle_core::DType::F32, &dev)?)]);
/// let reduced = layout.all_reduce(&c, &grads, true)?;
/// assert!(!reduced.skip);
/// assert_eq!(reduced.grads["w"].sum_all()?.to_scalar::<f32>()?, 6.0);
/// # Ok(())
/// # }
/// ```
#[derive(Debug, Clone)]
pub struct GradLayout {
    entries: Vec<Entry>,
    /// `bucket_ends[i]`: one past the last entry of bucket `i`.
    bucket_ends: Vec<usize>,
    device: Device,
}

#[derive(Debug, Clone)]
struct Entry {
    name: String,
    shape: Shape,
}

/// The result of [`GradLayout::all_reduce`].
#[derive(Debug, Clone)]
pub struct ReducedGrads {
    /// The gradients summed over ranks, in f32 whatever the parameters' dtype (the caller
    /// unscales and clips them there; the optimizer casts as it needs); a parameter appears
    /// only if at least one rank had its gradient (as a single process would have it).
    pub grads: Gradients,
    /// How many ranks reported a non-finite loss.
    pub non_finite_ranks: usize,
    /// `true` when any rank's loss was non-finite: every rank then skips the step.
    pub skip: bool,
}

impl GradLayout {
    /// A one-bucket layout for these parameters (all on one device).
    ///
    /// # Errors
    ///
    /// [`Error::InvalidArgument`] when `vars` is empty or spans several devices.
    pub fn new(vars: &BTreeMap<String, Var>) -> Result<Self> {
        let Some(first) = vars.values().next() else {
            return Err(Error::InvalidArgument("GradLayout: no parameters".into()));
        };
        let device = first.device().clone();
        let mut entries = Vec::with_capacity(vars.len());
        for (name, v) in vars {
            if !v.device().same_device(&device) {
                return Err(Error::InvalidArgument(format!(
                    "GradLayout: {name} is on another device than the other parameters"
                )));
            }
            entries.push(Entry {
                name: name.clone(),
                shape: v.shape().clone(),
            });
        }
        let bucket_ends = vec![entries.len()];
        Ok(Self {
            entries,
            bucket_ends,
            device,
        })
    }

    /// Splits the buffer into buckets of at most `max_len` elements (at parameter boundaries),
    /// e.g. to bound the size of a single transfer. One bucket (the default) means one
    /// all-reduce per update.
    pub fn with_max_bucket_len(mut self, max_len: usize) -> Self {
        let mut ends = Vec::new();
        let mut len = 0;
        for (i, e) in self.entries.iter().enumerate() {
            let n = e.shape.elem_count();
            if len > 0 && len + n > max_len {
                ends.push(i);
                len = 0;
            }
            len += n;
        }
        ends.push(self.entries.len());
        self.bucket_ends = ends;
        self
    }

    /// [`GradLayout::with_max_bucket_len`] for buckets of at most `max_bytes` bytes (of f32:
    /// four bytes an element), e.g. [`DEFAULT_BUCKET_BYTES`].
    pub fn with_max_bucket_bytes(self, max_bytes: usize) -> Self {
        self.with_max_bucket_len((max_bytes / DType::F32.size_in_bytes()).max(1))
    }

    /// The element count of each bucket, trailer included.
    pub fn bucket_lens(&self) -> Vec<usize> {
        let mut start = 0;
        let last = self.bucket_ends.len() - 1;
        self.bucket_ends
            .iter()
            .enumerate()
            .map(|(b, &end)| {
                let n: usize = self.entries[start..end]
                    .iter()
                    .map(|e| e.shape.elem_count())
                    .sum();
                start = end;
                n + if b == last { self.trailer_len() } else { 0 }
            })
            .collect()
    }

    fn trailer_len(&self) -> usize {
        self.entries.len() + 1
    }

    /// This rank's gradients as f32 buffers (see [`GradLayout::bucket_lens`]), with the
    /// trailer: `1` per parameter that has a gradient, `0` (and zeros in its place) for one
    /// that has none, and the flag `1` when `loss_finite` is `false`.
    ///
    /// # Shapes
    ///
    /// - `grads[name]`: the parameter's shape.
    /// - output: one `[len]` f32 tensor per bucket.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidArgument`] for a gradient of an unknown parameter (it would be silently
    /// lost); [`Error::ShapeMismatch`] for a gradient of the wrong shape.
    pub fn flatten(&self, grads: &Gradients, loss_finite: bool) -> Result<Vec<Tensor>> {
        self.flat_buckets(grads, loss_finite)?.collect()
    }

    /// The buckets of [`GradLayout::flatten`], each built only when the iterator reaches it.
    fn flat_buckets<'a>(
        &'a self,
        grads: &'a Gradients,
        loss_finite: bool,
    ) -> Result<impl Iterator<Item = Result<Tensor>> + 'a> {
        if let Some(name) = grads
            .keys()
            .find(|n| self.entries.binary_search_by(|e| e.name.cmp(n)).is_err())
        {
            return Err(Error::InvalidArgument(format!(
                "GradLayout: gradient for unknown parameter {name}"
            )));
        }
        let mut presence = Vec::with_capacity(self.trailer_len());
        Ok((0..self.bucket_ends.len())
            .map(move |b| self.flatten_bucket(b, grads, loss_finite, &mut presence)))
    }

    /// Bucket `b` of [`GradLayout::flatten`]; `presence` collects the trailer across the
    /// buckets, in order, and the last bucket carries it.
    fn flatten_bucket(
        &self,
        b: usize,
        grads: &Gradients,
        loss_finite: bool,
        presence: &mut Vec<f32>,
    ) -> Result<Tensor> {
        let start = if b == 0 { 0 } else { self.bucket_ends[b - 1] };
        let mut parts = Vec::with_capacity(self.bucket_ends[b] - start + 1);
        for e in &self.entries[start..self.bucket_ends[b]] {
            let part = match grads.get(&e.name) {
                Some(g) => {
                    if g.dims() != e.shape.dims() {
                        return Err(Error::ShapeMismatch {
                            name: e.name.clone(),
                            expected: e.shape.dims().to_vec(),
                            actual: g.dims().to_vec(),
                        });
                    }
                    presence.push(1f32);
                    g.to_device(&self.device)?
                        .to_dtype(DType::F32)?
                        .flatten_all()?
                }
                None => {
                    presence.push(0f32);
                    Tensor::zeros(e.shape.elem_count(), DType::F32, &self.device)?
                }
            };
            parts.push(part);
        }
        if b + 1 == self.bucket_ends.len() {
            presence.push(if loss_finite { 0.0 } else { 1.0 });
            parts.push(Tensor::new(presence.as_slice(), &self.device)?);
        }
        Ok(Tensor::cat(&parts, 0)?)
    }

    /// Splits (summed) buffers back into named f32 gradients; reads the
    /// trailer to leave out parameters no rank had a gradient for and to count the ranks
    /// whose loss was non-finite.
    ///
    /// # Errors
    ///
    /// [`Error::ShapeMismatch`] when the buffers do not match [`GradLayout::bucket_lens`].
    pub fn unflatten(&self, buckets: &[Tensor]) -> Result<ReducedGrads> {
        let lens = self.bucket_lens();
        let actual: Vec<usize> = buckets.iter().map(Tensor::elem_count).collect();
        if actual != lens || buckets.iter().any(|b| b.rank() != 1) {
            return Err(Error::ShapeMismatch {
                name: "gradient buckets (lengths)".into(),
                expected: lens,
                actual,
            });
        }
        let last = buckets.len() - 1;
        let trailer_start = lens[last] - self.trailer_len();
        // One small device-to-host copy: the presence counts and the non-finite flag.
        let trailer = buckets[last]
            .narrow(0, trailer_start, self.trailer_len())?
            .to_dtype(DType::F32)?
            .to_vec1::<f32>()?;
        let mut grads = Gradients::new();
        let mut start = 0;
        let mut i = 0;
        for (b, &end) in self.bucket_ends.iter().enumerate() {
            let mut offset = 0;
            for e in &self.entries[start..end] {
                let n = e.shape.elem_count();
                if trailer[i] > 0.0 {
                    // Not cast back to the parameter's dtype: see the type's docs.
                    let g = buckets[b]
                        .narrow(0, offset, n)?
                        .reshape(e.shape.clone())?
                        .to_dtype(DType::F32)?;
                    grads.insert(e.name.clone(), g);
                }
                offset += n;
                i += 1;
            }
            start = end;
        }
        let non_finite_ranks = trailer[self.entries.len()].round() as usize;
        Ok(ReducedGrads {
            grads,
            non_finite_ranks,
            skip: non_finite_ranks > 0,
        })
    }

    /// Sums the gradients of all ranks: each bucket of [`GradLayout::flatten`]'s layout is
    /// built, summed by one all-reduce and dropped before the next is built, then
    /// [`GradLayout::unflatten`] splits the sums. Beyond the caller's gradients the call holds
    /// the summed buckets (the returned gradients are views of them, not copies) and one
    /// flattened bucket. `loss_finite` is this rank's verdict on its loss; the result's `skip`
    /// is the same on every rank.
    ///
    /// A gradient that is itself non-finite makes the sum non-finite on every rank alike, so a
    /// finiteness check after this call agrees across ranks too.
    ///
    /// # Errors
    ///
    /// Those of [`GradLayout::flatten`] and of the collective.
    pub fn all_reduce(
        &self,
        c: &dyn Collective,
        grads: &Gradients,
        loss_finite: bool,
    ) -> Result<ReducedGrads> {
        // One bucket at a time, each flattened copy dropped once it is summed: besides the
        // caller's gradients, the step holds the summed buckets (which the returned gradients
        // are views of) and one flattened bucket.
        let summed = self
            .flat_buckets(grads, loss_finite)?
            .map(|flat| c.all_reduce_sum(&flat?))
            .collect::<Result<Vec<_>>>()?;
        self.unflatten(&summed)
    }
}

/// Whether any rank's loss is non-finite (one all-reduce of a flag), for a caller that wants
/// to skip the backward pass on every rank. [`GradLayout::all_reduce`] carries the same flag
/// for free.
///
/// # Errors
///
/// The collective's.
pub fn any_rank_non_finite(c: &dyn Collective, loss_finite: bool, device: &Device) -> Result<bool> {
    let flag = Tensor::new(&[if loss_finite { 0f32 } else { 1.0 }], device)?;
    Ok(c.all_reduce_sum(&flag)?.to_vec1::<f32>()?[0] > 0.0)
}

/// Sets every parameter to rank `root`'s value (one broadcast per parameter, in name order,
/// dtype kept), so that all ranks start from the same weights.
///
/// # Errors
///
/// The collective's; [`Error::Candle`] if a value cannot be set.
pub fn broadcast_vars(c: &dyn Collective, vars: &BTreeMap<String, Var>, root: usize) -> Result<()> {
    for v in vars.values() {
        let value = c.broadcast(v.as_tensor(), root)?;
        v.set(&value)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::alloc::{GlobalAlloc, Layout, System};
    use std::cell::Cell;

    use super::*;

    /// One rank whose sum is a fresh buffer, as a real all-reduce's output is.
    struct CopyingRank;

    impl Collective for CopyingRank {
        fn rank(&self) -> usize {
            0
        }
        fn world_size(&self) -> usize {
            1
        }
        fn all_reduce_sum(&self, x: &Tensor) -> Result<Tensor> {
            Ok(x.copy()?)
        }
        fn all_gather(&self, x: &Tensor) -> Result<Tensor> {
            Ok(x.copy()?)
        }
        fn broadcast(&self, x: &Tensor, _root: usize) -> Result<Tensor> {
            Ok(x.copy()?)
        }
    }

    /// The system allocator, counting the bytes the current thread holds and their peak.
    struct PerThread;

    thread_local! {
        static HELD: Cell<isize> = const { Cell::new(0) };
        static PEAK: Cell<isize> = const { Cell::new(0) };
    }

    // SAFETY: every call goes to `System` unchanged; the counters are thread-local cells with
    // constant initialisers and no destructors, so counting never allocates.
    unsafe impl GlobalAlloc for PerThread {
        unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
            let held = HELD.with(|h| {
                h.set(h.get() + layout.size() as isize);
                h.get()
            });
            PEAK.with(|p| p.set(p.get().max(held)));
            System.alloc(layout)
        }

        unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
            HELD.with(|h| h.set(h.get() - layout.size() as isize));
            System.dealloc(ptr, layout)
        }
    }

    #[global_allocator]
    static COUNTING: PerThread = PerThread;

    /// Bytes the current thread allocated at its peak during `f`, above what it held before.
    fn peak_during<R>(f: impl FnOnce() -> R) -> (R, isize) {
        let before = HELD.with(Cell::get);
        PEAK.with(|p| p.set(before));
        let out = f();
        (out, PEAK.with(Cell::get) - before)
    }

    /// The all-reduce holds the summed buckets and one flattened bucket at a time, never every
    /// flattened bucket at once: with 4 MiB of gradients in four buckets, the peak above the
    /// caller's gradients stays under the summed 4 MiB plus one bucket plus slack (flattening
    /// all buckets first would need 8 MiB).
    #[test]
    fn all_reduce_holds_one_flattened_bucket_at_a_time() -> Result<()> {
        let dev = Device::Cpu;
        let n = 1 << 18; // 1 MiB of f32
        let mut vars = BTreeMap::new();
        let mut grads = Gradients::new();
        // Two parameters per bucket, so that flattening copies (one alone would be its own
        // bucket, and `cat` of one tensor is that tensor).
        for i in 0..8 {
            vars.insert(format!("p{i}"), Var::zeros(n / 2, DType::F32, &dev)?);
            grads.insert(format!("p{i}"), Tensor::ones(n / 2, DType::F32, &dev)?);
        }
        let layout = GradLayout::new(&vars)?.with_max_bucket_len(n);
        assert_eq!(layout.bucket_lens().len(), 4);
        let (reduced, peak) = peak_during(|| layout.all_reduce(&CopyingRank, &grads, true));
        let reduced = reduced?;
        assert_eq!(reduced.grads.len(), 8);
        let mib = 1 << 20;
        assert!(
            peak < 4 * mib + mib + mib / 2,
            "peak {peak} bytes for 4 MiB of gradients"
        );
        Ok(())
    }
}
