//! The CZ-NCE loss ([`CzNce`]): the builder, its checks and the composite twin; the fused op is
//! `ops::cz_nce`.

mod composite;

use crate::ops::cz_nce::{CzNceOp, LogitScale, Spec};
use crate::{Error, Result};
use candle_core::{DType, Tensor};

pub use crate::ops::cz_nce::BackwardMode;

/// The temperature of the loss.
#[derive(Clone, Debug)]
pub enum Temperature {
    /// A fixed temperature `t` (the logits are `cos / t`).
    Fixed(f64),
    /// A learnable scalar log-scale `θ` with `1/t = min(exp(θ), max)` (shape `[]` or `[1]`;
    /// `max` from [`CzNce::with_max_logit_scale`]), typically a `Var` initialised to `-ln t`.
    LearnableLogScale(Tensor),
}

/// CZ-NCE: ML-CTL's contrastive loss, numerically stable, with an exact fused backward on the CPU
/// and on CUDA.
///
/// # Definition
///
/// For queries `q` (source side) and keys `k` (target side), both `[B, D]`, and a temperature
/// `t` (default 0.07):
///
/// - `sim_out[i,j] = cos(q_i, k_j) / t`, `sim_in[i,j] = cos(q_i, q_j) / t`,
///   `sim_kk[i,j] = cos(k_i, k_j) / t`;
/// - row `i` of the logits is `[sim_out[i,:] | sim_in[i,:]]` (`2B` entries);
/// - the positive is `p_i = sim_out[i,i]`; the negatives are all entries of row `i` except
///   `sim_out[i,i]` and `sim_in[i,i]`;
/// - `loss = mean_i ( logsumexp(negatives_i) − p_i )`: the positive is **not** in the
///   denominator (this is what distinguishes CZ-NCE from InfoNCE).
///
/// # Options (builder methods of [`CzNce`])
///
/// Modelled on sentence-transformers' `MultipleNegativesRankingLoss`: which directions, whether
/// the positive is in the partition, which in-batch negatives, and the scale `1/t`.
///
/// - [`CzNce::with_positive_in_denominator`]: `true` gives InfoNCE-style rows
///   `logsumexp(positive ∪ negatives) − p_i`. [`CzNce::info_nce`] is the standard InfoNCE:
///   positive in the denominator, `sim_out` only (cross-entropy over `sim_out` rows with the
///   diagonal as labels).
/// - [`CzNce::with_anchor_negatives`] (default on): `sim_in` (the anchor's own side, diagonal
///   masked) joins row `i`. Off, with the positive excluded, the loss is the "decoupled" loss
///   over `sim_out` off-diagonals only.
/// - [`CzNce::with_target_negatives`] (default off): key-side in-batch negatives. Row `i` (the
///   row whose positive key is `k_i`) also gets `sim_kk[i,:]` with `sim_kk[i,i]` masked, i.e.
///   the other keys `k_j` scored against the positive `k_i` (as in GTE's "improved contrastive
///   loss"). Row `i` is then `[sim_out[i,:] | sim_in[i,:] | sim_kk[i,:]]`.
/// - [`CzNce::with_symmetric`]: `loss = ½ (L(q→k) + L(k→q))`. The k→q direction swaps the
///   roles: anchors are keys, its cross block is `sim_outᵀ`, its anchor-side block is `sim_kk`
///   and its target-side block is `sim_in` (so "anchor"/"target" negatives always mean "the
///   anchor's side"/"the other side").
/// - Temperature: fixed ([`CzNce::with_temperature`], must be finite and `> 0`) or learnable
///   ([`CzNce::with_learnable_log_scale`]): a scalar tensor `θ` (typically a `Var`) with
///   `1/t = min(exp(θ), max)`; its gradient flows through both paths (the fused op returns it
///   too).
/// - [`CzNce::with_max_logit_scale`]: the bound `max` on a learnable scale (default 100, as in
///   CLIP). Without it CZ-NCE drives `θ` up for ever: the positive is not in the denominator,
///   so once every positive beats its negatives `∂L/∂θ = exp(θ)·(E_softmax[negative] − p) < 0`
///   and grows with the scale (InfoNCE's loss saturates at 0 instead). The clamp acts like
///   `torch.clamp(θ.exp(), max=max)`: while `exp(θ) > max` the logits use `max` and `∂L/∂θ`
///   is 0 (at `exp(θ) = max` exactly the gradient still flows). An optimizer with weight decay
///   or an explicit clamp of the `Var` brings `θ` back below the bound; plain SGD leaves it
///   there.
/// - [`CzNce::with_assume_normalized`]: skip the L2 normalization and use raw dot products
///   `q_i·k_j / t` (correct only for unit-norm inputs).
///
/// # Edge cases
///
/// - CZ-NCE (positive excluded) with `B = 1` has no negatives: [`CzNce::forward`] returns
///   [`Error::InvalidArgument`] rather than `-inf`/NaN. InfoNCE with `B = 1` is defined and
///   equals 0 (the row is just the positive).
/// - Zero rows: normalization is `x / max(‖x‖, 1e-8)`, so a zero row has cosine 0 with
///   everything; the loss is finite and so is the gradient, which is the exact one of that
///   formula: `∂L/∂q̂_i / ε`, i.e. large (up to ~1e8 · 2/(B t)). In f16 it exceeds the dtype's
///   range: the fused op saturates it (see *Dtypes*), the composite path's autograd gives ±inf.
/// - Masked entries never produce NaN; every row is max-subtracted; f16/bf16 inputs are
///   converted to f32 before anything else, so `|logit|` up to 1e4 is fine.
///
/// # Paths
///
/// [`CzNce::forward`] uses the fused op ([`CzNce::forward_fused`]) where
/// [`CzNce::fused_supported`] says so, and the composite twin ([`CzNce::forward_composite`],
/// plain candle ops) otherwise:
///
/// - CPU, f32/f16/bf16/f64: fused (GEMMs through the `gemm` crate, rayon-parallel row pass).
/// - CUDA (`cuda` feature), f32/f16/bf16: fused (cuBLAS GEMMs in f32, no TF32, plus the CUDA
///   kernels in `cz_nce.cu` for the normalization, the row pass, the reductions and the
///   normalization backward). f64 on CUDA takes the composite path.
/// - Metal (`metal` feature): the composite path, i.e. candle's Metal kernels.
///
/// Timings and a cost analysis are in `benches/README.md`.
///
/// # Dtypes
///
/// The loss is an f32 scalar for f32/f16/bf16 inputs (accumulation in f32) and an f64 scalar
/// for f64 inputs (everything in f64, useful for finite-difference checks). Gradients come back
/// in each input's dtype; the fused op saturates f16 gradients beyond the f16 range (only an
/// all-zero row, whose exact gradient is `∂L/∂q̂ / ε`, gets there) to `±f16::MAX`.
///
/// # Memory (fused backward)
///
/// [`BackwardMode::GradInForward`] (default): when the inputs track gradients, the fused forward
/// already computes the exact gradients (the loss is a scalar, so the backward only rescales
/// them) and keeps `2·B·D` values; the `B × 2B` logits and softmax weights are transient.
/// [`BackwardMode::Recompute`]: nothing is kept; the backward reruns the whole kernel (forward
/// GEMMs included), costing ~2 extra `B²D` GEMMs. While it runs, the CPU kernel holds the
/// similarity blocks (two `B × B` f32 matrices for the default CZ-NCE), which the row pass
/// overwrites with the softmax weights in place; the CUDA kernel keeps the weights in separate
/// buffers (four `B × B` f32 matrices at its peak for the default loss). Both free them before
/// returning. The composite path keeps a dozen `B × 2B` intermediates alive for autograd.
/// Note that with `GradInForward`, a forward
/// on inputs that track gradients pays for the gradient even if `backward` is never called:
/// detach the inputs for evaluation-only losses.
///
/// On the CPU, the first call makes the C allocator keep freed memory for reuse
/// ([`crate::device::retain_freed_cpu_memory`]), as loading an encoder does.
///
/// # Shapes
///
/// - `q`: `[B, D]`, the anchors (source side), any float dtype, any strides.
/// - `k`: `[B, D]`, the positives (target side), same dtype and device as `q`; `k_i` is the
///   positive of `q_i`.
/// - output: `[]`, an f32 scalar (f64 for f64 inputs).
///
/// # Example
///
/// ```
/// use candle_core::{Device, Tensor};
/// use mlctl::loss::CzNce;
///
/// # fn main() -> mlctl::Result<()> {
/// let dev = Device::Cpu;
/// let q = Tensor::new(&[[1f32, 0.0], [0.0, 1.0], [1.0, 1.0]], &dev)?;
/// let k = Tensor::new(&[[0.9f32, 0.1], [0.1, 0.9], [1.0, 0.8]], &dev)?;
/// let loss = CzNce::new().with_temperature(0.1).forward(&q, &k)?;
/// assert!(loss.to_scalar::<f32>()?.is_finite());
///
/// // Standard InfoNCE, symmetric (CLIP-style):
/// let clip = CzNce::info_nce().with_symmetric(true).forward(&q, &k)?;
/// assert_eq!(clip.dims(), &[] as &[usize]);
/// # Ok(())
/// # }
/// ```
#[derive(Clone, Debug)]
pub struct CzNce {
    temperature: Temperature,
    include_positive: bool,
    anchor_negatives: bool,
    target_negatives: bool,
    symmetric: bool,
    assume_normalized: bool,
    backward_mode: BackwardMode,
    max_logit_scale: f64,
}

impl Default for CzNce {
    fn default() -> Self {
        Self::new()
    }
}

impl CzNce {
    /// The default temperature, 0.07.
    pub const DEFAULT_TEMPERATURE: f64 = 0.07;
    /// The epsilon of the row normalization `x / max(‖x‖, ε)`.
    pub const NORM_EPS: f64 = crate::ops::cz_nce::NORM_EPS;
    /// The default bound on a learnable logit scale `1/t`, 100 (CLIP's).
    pub const DEFAULT_MAX_LOGIT_SCALE: f64 = 100.0;

    /// CZ-NCE as in ML-CTL: `t = 0.07`, positive excluded from the denominator, `sim_in`
    /// negatives on, no key-side negatives, one direction (q→k), inputs normalized.
    pub fn new() -> Self {
        Self {
            temperature: Temperature::Fixed(Self::DEFAULT_TEMPERATURE),
            include_positive: false,
            anchor_negatives: true,
            target_negatives: false,
            symmetric: false,
            assume_normalized: false,
            backward_mode: BackwardMode::GradInForward,
            max_logit_scale: Self::DEFAULT_MAX_LOGIT_SCALE,
        }
    }

    /// Standard InfoNCE (`t = 0.07`): positive in the denominator, `sim_out` only, q→k.
    pub fn info_nce() -> Self {
        Self::new()
            .with_positive_in_denominator(true)
            .with_anchor_negatives(false)
    }

    /// Sets a fixed temperature `t` (validated in `forward`: finite and `> 0`).
    pub fn with_temperature(mut self, t: f64) -> Self {
        self.temperature = Temperature::Fixed(t);
        self
    }

    /// Makes the temperature learnable: `log_scale` is a scalar tensor `θ` with
    /// `1/t = min(exp(θ), max)` (e.g. a `Var` created with `-t0.ln()`; `max` is
    /// [`CzNce::with_max_logit_scale`], 100 by default). Must be finite, on the inputs' device.
    pub fn with_learnable_log_scale(mut self, log_scale: Tensor) -> Self {
        self.temperature = Temperature::LearnableLogScale(log_scale);
        self
    }

    /// Bounds a learnable logit scale: `1/t = min(exp(θ), max)`, with `∂L/∂θ = 0` while the
    /// clamp is active (default [`CzNce::DEFAULT_MAX_LOGIT_SCALE`]; `f64::INFINITY` turns the
    /// bound off). A fixed temperature is used as given. Validated in `forward`: `> 0`.
    pub fn with_max_logit_scale(mut self, max: f64) -> Self {
        self.max_logit_scale = max;
        self
    }

    /// `true`: InfoNCE-style rows (positive in the partition function); `false` (default):
    /// CZ-NCE (positive excluded).
    pub fn with_positive_in_denominator(mut self, yes: bool) -> Self {
        self.include_positive = yes;
        self
    }

    /// Whether same-side in-batch negatives (`sim_in` for q→k) join each row (default `true`).
    pub fn with_anchor_negatives(mut self, yes: bool) -> Self {
        self.anchor_negatives = yes;
        self
    }

    /// Whether other-side in-batch negatives (`sim_kk[i,:]` for q→k, diagonal masked) join
    /// row `i` (default `false`).
    pub fn with_target_negatives(mut self, yes: bool) -> Self {
        self.target_negatives = yes;
        self
    }

    /// Whether to average the q→k and k→q directions (default `false`).
    pub fn with_symmetric(mut self, yes: bool) -> Self {
        self.symmetric = yes;
        self
    }

    /// Skip the L2 normalization (inputs assumed unit-norm; default `false`).
    pub fn with_assume_normalized(mut self, yes: bool) -> Self {
        self.assume_normalized = yes;
        self
    }

    /// The fused op's backward strategy (default [`BackwardMode::GradInForward`]).
    pub fn with_backward_mode(mut self, mode: BackwardMode) -> Self {
        self.backward_mode = mode;
        self
    }

    /// The temperature setting.
    pub fn temperature(&self) -> &Temperature {
        &self.temperature
    }

    /// The bound on a learnable logit scale (see [`CzNce::with_max_logit_scale`]).
    pub fn max_logit_scale(&self) -> f64 {
        self.max_logit_scale
    }

    /// Whether the positive is in the denominator (InfoNCE) or not (CZ-NCE).
    pub fn positive_in_denominator(&self) -> bool {
        self.include_positive
    }

    /// Whether the loss is symmetric.
    pub fn symmetric(&self) -> bool {
        self.symmetric
    }

    /// The learnable log-scale `θ`, `None` for a fixed temperature.
    fn log_scale(&self) -> Option<&Tensor> {
        match &self.temperature {
            Temperature::Fixed(_) => None,
            Temperature::LearnableLogScale(ls) => Some(ls),
        }
    }

    fn spec(&self) -> Spec {
        Spec {
            include_positive: self.include_positive,
            anchor_negatives: self.anchor_negatives,
            target_negatives: self.target_negatives,
            symmetric: self.symmetric,
            normalize: !self.assume_normalized,
        }
    }

    /// Whether [`CzNce::forward`] would take the fused path for this input: CPU tensors of
    /// dtype f32, f16, bf16 or f64, and (with the `cuda` feature) CUDA tensors of dtype f32,
    /// f16 or bf16.
    pub fn fused_supported(q: &Tensor) -> bool {
        let dtype = q.dtype();
        let half_or_single = matches!(dtype, DType::F32 | DType::F16 | DType::BF16);
        (q.device().is_cpu() && (half_or_single || dtype == DType::F64))
            || (cfg!(feature = "cuda") && q.device().is_cuda() && half_or_single)
    }

    /// Validates the inputs and the temperature; returns the logit scale to use.
    fn validate(&self, q: &Tensor, k: &Tensor) -> Result<LogitScale> {
        check_inputs(q, k)?;
        if q.device().is_cpu() {
            // Each call allocates and frees its [B, D] and [B, 2B] buffers; glibc would hand
            // them back to the kernel and fault them in again next time (a third of the time
            // at B 64, D 1536).
            crate::device::retain_freed_cpu_memory();
        }
        if q.dims()[0] == 1 && !self.include_positive {
            return Err(Error::InvalidArgument(
                "cz_nce: CZ-NCE with B = 1 has no negatives (use B >= 2 or InfoNCE mode)".into(),
            ));
        }
        match &self.temperature {
            Temperature::Fixed(t) => {
                if !(t.is_finite() && *t > 0.0) {
                    return Err(Error::InvalidArgument(format!(
                        "cz_nce: temperature must be finite and > 0, got {t}"
                    )));
                }
                Ok(LogitScale {
                    value: 1.0 / t,
                    clamped: false,
                })
            }
            Temperature::LearnableLogScale(ls) => learnable_scale(ls, self.max_logit_scale, q),
        }
    }

    /// Computes the loss, with the fused op where supported (CPU, float dtypes) and the
    /// composite path otherwise.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidArgument`] for a rank other than 2, an empty batch (`B = 0` or `D = 0`),
    /// CZ-NCE with `B = 1`, a non-finite or non-positive temperature (for a learnable one: a
    /// non-finite `θ`, a `max_logit_scale` that is not `> 0`, or a scale `min(exp(θ), max)`
    /// that is not finite and `> 0`), dtype or device mismatch;
    /// [`Error::ShapeMismatch`] when `k`'s shape differs from `q`'s.
    pub fn forward(&self, q: &Tensor, k: &Tensor) -> Result<Tensor> {
        if Self::fused_supported(q) {
            self.forward_fused(q, k)
        } else {
            self.forward_composite(q, k)
        }
    }

    /// The composite path: plain candle ops, on any device, differentiable through candle's
    /// autograd. Same errors as [`CzNce::forward`].
    pub fn forward_composite(&self, q: &Tensor, k: &Tensor) -> Result<Tensor> {
        let scale = self.validate(q, k)?;
        Ok(composite::forward(
            q,
            k,
            self.spec(),
            scale,
            self.log_scale(),
        )?)
    }

    /// The loss's part of rows `rows` of the batch, divided by the whole batch's size `B`:
    /// the parts of a partition of `0..B` add up to [`CzNce::forward`] (up to rounding), in
    /// values and gradients. Each row still sees every other row as a negative, but only
    /// `[rows.len(), B]` blocks of logits are built, so a data-parallel rank that holds every
    /// rank's embeddings computes only its own rows (OpenCLIP's "local loss"). The gradient
    /// reaches every row of `q` and `k`, not only `rows`. The fused op on CPU tensors (f32,
    /// f16, bf16, f64), the composite path elsewhere.
    ///
    /// # Shapes
    ///
    /// - `q`, `k`: `[B, D]`, as for [`CzNce::forward`]; output: `[]`.
    ///
    /// # Errors
    ///
    /// Those of [`CzNce::forward`], and [`Error::InvalidArgument`] for rows outside `0..B` or
    /// none.
    pub fn forward_rows(
        &self,
        q: &Tensor,
        k: &Tensor,
        rows: std::ops::Range<usize>,
    ) -> Result<Tensor> {
        if q.device().is_cpu() && Self::fused_supported(q) {
            self.forward_rows_fused(q, k, rows)
        } else {
            self.forward_rows_composite(q, k, rows)
        }
    }

    /// [`CzNce::forward_rows`] with composite ops, on any device (the fused band's twin). Same
    /// errors.
    pub fn forward_rows_composite(
        &self,
        q: &Tensor,
        k: &Tensor,
        rows: std::ops::Range<usize>,
    ) -> Result<Tensor> {
        let scale = self.validate(q, k)?;
        let part = check_rows(q, rows)?;
        let spec = self.spec();
        Ok(composite::forward_rows(
            q,
            k,
            part,
            spec,
            (scale, self.log_scale()),
        )?)
    }

    /// [`CzNce::forward_rows`] with the fused op (exact hand-written backward), CPU tensors
    /// only. Same errors, plus [`Error::InvalidArgument`] for other inputs.
    pub fn forward_rows_fused(
        &self,
        q: &Tensor,
        k: &Tensor,
        rows: std::ops::Range<usize>,
    ) -> Result<Tensor> {
        let scale = self.validate(q, k)?;
        let part = check_rows(q, rows)?;
        if !(q.device().is_cpu() && Self::fused_supported(q)) {
            return Err(Error::InvalidArgument(format!(
                "cz_nce: the fused band of rows runs on the CPU (f32/f16/bf16/f64); got {:?} on {:?}",
                q.dtype(),
                q.device().location()
            )));
        }
        self.apply_fused(q, k, scale, Some(part))
    }

    /// The fused op (exact hand-written backward). Same errors as [`CzNce::forward`], plus
    /// [`Error::InvalidArgument`] when [`CzNce::fused_supported`] says no.
    pub fn forward_fused(&self, q: &Tensor, k: &Tensor) -> Result<Tensor> {
        let scale = self.validate(q, k)?;
        if !Self::fused_supported(q) {
            return Err(Error::InvalidArgument(format!(
                "cz_nce: the fused op runs on the CPU (f32/f16/bf16/f64) and, with the `cuda` feature, on CUDA (f32/f16/bf16); got {:?} on {:?}",
                q.dtype(),
                q.device().location()
            )));
        }
        self.apply_fused(q, k, scale, None)
    }

    /// Builds and applies the fused op, over the whole batch or the band `rows`.
    fn apply_fused(
        &self,
        q: &Tensor,
        k: &Tensor,
        scale: LogitScale,
        rows: Option<(usize, usize)>,
    ) -> Result<Tensor> {
        let spec = self.spec();
        let op = |tracks: bool| {
            let op = CzNceOp::new(spec, scale, tracks, self.backward_mode);
            match rows {
                Some(r) => op.with_rows(r),
                None => op,
            }
        };
        Ok(match &self.temperature {
            Temperature::Fixed(_) => {
                let tracks = q.track_op() || k.track_op();
                if tracks {
                    q.apply_op2(k, op(true))?
                } else {
                    q.apply_op2_no_bwd(k, &op(false))?
                }
            }
            // `log_scale` is an argument so that autograd routes `∂L/∂θ` to it; its value is
            // already in `scale`.
            Temperature::LearnableLogScale(ls) => {
                let tracks = q.track_op() || k.track_op() || ls.track_op();
                if tracks {
                    q.apply_op3(k, ls, op(true))?
                } else {
                    q.apply_op3_no_bwd(k, ls, &op(false))?
                }
            }
        })
    }
}

/// Checks that `rows` is a non-empty range of `q`'s rows; returns `(start, len)`.
fn check_rows(q: &Tensor, rows: std::ops::Range<usize>) -> Result<(usize, usize)> {
    let b = q.dims()[0];
    if rows.is_empty() || rows.end > b {
        return Err(Error::InvalidArgument(format!(
            "cz_nce: rows {rows:?} of a batch of {b}"
        )));
    }
    Ok((rows.start, rows.len()))
}

/// Checks that `q` and `k` are non-empty float matrices of one shape, dtype and device.
fn check_inputs(q: &Tensor, k: &Tensor) -> Result<()> {
    for (name, x) in [("q", q), ("k", k)] {
        if x.rank() != 2 {
            return Err(Error::InvalidArgument(format!(
                "cz_nce: {name} must be rank 2 [B, D], got shape {:?}",
                x.dims()
            )));
        }
        if !x.dtype().is_float() {
            return Err(Error::InvalidArgument(format!(
                "cz_nce: {name} must be a float tensor, got {:?}",
                x.dtype()
            )));
        }
    }
    if q.dims() != k.dims() {
        return Err(Error::ShapeMismatch {
            name: "k".into(),
            expected: q.dims().to_vec(),
            actual: k.dims().to_vec(),
        });
    }
    if q.dims().contains(&0) {
        return Err(Error::InvalidArgument(format!(
            "cz_nce: empty batch, q has shape {:?}",
            q.dims()
        )));
    }
    if q.dtype() != k.dtype() {
        return Err(Error::InvalidArgument(format!(
            "cz_nce: q and k dtypes differ ({:?} vs {:?})",
            q.dtype(),
            k.dtype()
        )));
    }
    if !q.device().same_device(k.device()) {
        return Err(Error::InvalidArgument(
            "cz_nce: q and k are on different devices".into(),
        ));
    }
    Ok(())
}

/// The clamped scale `min(exp(θ), max)` of a learnable log-scale `ls`, checked.
fn learnable_scale(ls: &Tensor, max: f64, q: &Tensor) -> Result<LogitScale> {
    if max.is_nan() || max <= 0.0 {
        return Err(Error::InvalidArgument(format!(
            "cz_nce: max_logit_scale must be > 0, got {max}"
        )));
    }
    if ls.elem_count() != 1 || ls.rank() > 1 || !ls.dtype().is_float() {
        return Err(Error::InvalidArgument(format!(
            "cz_nce: log_scale must be a float scalar, got {:?} {:?}",
            ls.dtype(),
            ls.dims()
        )));
    }
    if !ls.device().same_device(q.device()) {
        return Err(Error::InvalidArgument(
            "cz_nce: log_scale is on another device than q".into(),
        ));
    }
    // Read on the host: Metal has no f64.
    let v = ls
        .to_device(&candle_core::Device::Cpu)?
        .to_dtype(DType::F64)?
        .flatten_all()?
        .to_vec1::<f64>()?[0];
    let scale = LogitScale::learnable(v, max);
    if !(v.is_finite() && scale.value.is_finite() && scale.value > 0.0) {
        return Err(Error::InvalidArgument(format!(
            "cz_nce: log_scale must give a finite, positive 1/t, got log_scale = {v}"
        )));
    }
    Ok(scale)
}
