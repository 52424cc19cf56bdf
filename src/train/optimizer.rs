//! AdamW with decoupled weight decay, two parameter groups, per-prefix learning-rate scales and
//! f32 master weights for bf16/f16 parameters; global-norm gradient clipping.
//!
//! On the CPU the update is one fused pass per parameter over contiguous memory (rayon), on CUDA
//! (with the `cuda` feature, f32/bf16/f16 parameters) one kernel per parameter (`src/ops/cuda/ops.cu`);
//! on other devices, and on request, it is the composite of tensor ops below, which the fused CPU
//! pass reproduces bit for bit (the CUDA kernel runs the same f32 operations in the same order).

use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap};

use candle_core::{CpuStorage, DType, Device, Storage, Tensor, Var};
use rayon::prelude::*;

use crate::ops::adamw::{Coefficients, FusedAdamW};
use crate::ops::num::Elem;
use crate::{Error, Result};

/// Gradients by parameter name.
pub type Gradients = BTreeMap<String, Tensor>;

/// Hyper-parameters of [`AdamW`] (the learning rate comes from the schedule at each step).
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct AdamWConfig {
    /// Decay rate of the first moment.
    pub beta1: f64,
    /// Decay rate of the second moment.
    pub beta2: f64,
    /// Added to the root of the second moment.
    pub eps: f64,
    /// Decoupled weight decay, applied to the decay group only.
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    /// PyTorch's `AdamW` defaults.
    fn default() -> Self {
        Self {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.01,
        }
    }
}

/// Whether a parameter belongs to the no-decay group: biases and LayerNorm weights, as BERT
/// fine-tuning recipes do.
pub fn is_no_decay(name: &str) -> bool {
    name.ends_with(".bias") || name.contains("LayerNorm") || name.contains("layer_norm")
}

/// Whether a parameter of this dtype gets an f32 master copy: below f32, an update smaller than
/// half a unit in the last place is rounded away, and at BERT learning rates most are.
fn needs_master(dtype: DType) -> bool {
    matches!(dtype, DType::BF16 | DType::F16)
}

/// Moments (and master weights) of one parameter, all f32 and of the parameter's size.
enum State {
    /// Host buffers that the fused CPU pass updates in place.
    Host {
        m: Vec<f32>,
        v: Vec<f32>,
        master: Option<Vec<f32>>,
    },
    /// Tensors on the parameter's device, updated by the composite.
    Tensors {
        m: Tensor,
        v: Tensor,
        master: Option<Tensor>,
    },
    /// Buffers on the parameter's CUDA device that the fused kernel updates in place.
    #[cfg(feature = "cuda")]
    Cuda(crate::ops::cuda::adamw::AdamState),
}

/// The fused CUDA state, for a contiguous f32/bf16/f16 parameter on a CUDA device.
#[cfg(feature = "cuda")]
fn cuda_state(var: &Var, fused: bool, master: bool) -> Result<Option<State>> {
    use crate::ops::cuda::adamw::AdamState;
    use crate::ops::kernel::cuda_supports as supports;
    if !(fused && var.device().is_cuda() && var.is_contiguous() && supports(var.dtype())) {
        return Ok(None);
    }
    Ok(Some(State::Cuda(AdamState::new(var.as_tensor(), master)?)))
}

#[cfg(not(feature = "cuda"))]
fn cuda_state(_: &Var, _: bool, _: bool) -> Result<Option<State>> {
    Ok(None)
}

struct Slot {
    var: Var,
    decay: bool,
    lr_scale: f64,
    /// Lazy row update ([`AdamW::with_sparse_rows`]): rows of a matrix whose gradient is all
    /// zero are left alone.
    sparse_rows: bool,
    /// Updates this parameter has had (its bias correction's step, as PyTorch counts it per
    /// parameter: a step without its gradient does not count).
    step: u64,
    state: State,
}

fn f32_values(t: &Tensor) -> Result<Vec<f32>> {
    Ok(t.to_device(&Device::Cpu)?
        .to_dtype(DType::F32)?
        .flatten_all()?
        .to_vec1::<f32>()?)
}

impl Slot {
    fn new(var: Var, decay: bool, fused: bool) -> Result<Self> {
        let master = needs_master(var.dtype());
        // The fused pass writes the parameter's storage in place, so it needs it contiguous.
        let state = if fused && var.device().is_cpu() && var.is_contiguous() {
            let n = var.elem_count();
            State::Host {
                m: vec![0.0; n],
                v: vec![0.0; n],
                master: master.then(|| f32_values(var.as_tensor())).transpose()?,
            }
        } else if let Some(state) = cuda_state(&var, fused, master)? {
            state
        } else {
            let m = Tensor::zeros(var.shape(), DType::F32, var.device())?;
            State::Tensors {
                v: m.clone(),
                m,
                master: master.then(|| var.to_dtype(DType::F32)).transpose()?,
            }
        };
        Ok(Self {
            var,
            decay,
            lr_scale: 1.0,
            sparse_rows: false,
            step: 0,
            state,
        })
    }

    /// The same parameter with its state moved to the fused (`true`) or composite update.
    /// Sparse rows off the CPU always take the composite (the CUDA kernel has no row mode).
    fn rebuild(&mut self, fused: bool) -> Result<()> {
        let (m, v, master) = self.tensors()?;
        let fused = fused && (self.var.device().is_cpu() || !self.sparse_rows);
        let mut fresh = Slot::new(self.var.clone(), self.decay, fused)?;
        fresh.set_tensors(m, v, master)?;
        fresh.lr_scale = self.lr_scale;
        fresh.sparse_rows = self.sparse_rows;
        fresh.step = self.step;
        *self = fresh;
        Ok(())
    }

    fn tensor(&self, values: &[f32]) -> Result<Tensor> {
        Ok(Tensor::from_slice(values, self.var.shape(), &Device::Cpu)?)
    }

    /// `(m, v, master)` as tensors.
    fn tensors(&self) -> Result<(Tensor, Tensor, Option<Tensor>)> {
        Ok(match &self.state {
            State::Host { m, v, master } => (
                self.tensor(m)?,
                self.tensor(v)?,
                master.as_deref().map(|w| self.tensor(w)).transpose()?,
            ),
            State::Tensors { m, v, master } => (m.clone(), v.clone(), master.clone()),
            #[cfg(feature = "cuda")]
            State::Cuda(state) => state.tensors(self.var.shape())?,
        })
    }

    fn set_tensors(&mut self, m: Tensor, v: Tensor, master: Option<Tensor>) -> Result<()> {
        self.state = match self.state {
            State::Host { .. } => State::Host {
                m: f32_values(&m)?,
                v: f32_values(&v)?,
                master: master.as_ref().map(f32_values).transpose()?,
            },
            State::Tensors { .. } => {
                let device = self.var.device();
                let on = |t: &Tensor| -> Result<Tensor> {
                    Ok(t.to_dtype(DType::F32)?.to_device(device)?)
                };
                State::Tensors {
                    m: on(&m)?,
                    v: on(&v)?,
                    master: master.as_ref().map(on).transpose()?,
                }
            }
            #[cfg(feature = "cuda")]
            State::Cuda(_) => State::Cuda(crate::ops::cuda::adamw::AdamState::from_tensors(
                self.var.as_tensor(),
                &m,
                &v,
                master.as_ref(),
            )?),
        };
        Ok(())
    }

    fn update(&mut self, grad: &Tensor, h: &Hyper) -> Result<()> {
        if grad.dims() != self.var.dims() {
            return Err(Error::ShapeMismatch {
                name: "gradient".into(),
                expected: self.var.dims().to_vec(),
                actual: grad.dims().to_vec(),
            });
        }
        match &mut self.state {
            State::Host { m, v, master } => {
                let grad = grad.to_device(&Device::Cpu)?.contiguous()?;
                let op = FusedAdamW {
                    buffers: RefCell::new((m, v, master.as_deref_mut())),
                    k: h.coefficients(),
                    row_len: self.sparse_rows.then(|| self.var.dims()[1]),
                };
                self.var.as_tensor().inplace_op2(&grad, &op)?;
            }
            State::Tensors { m, v, master } => {
                composite_update(&self.var, m, v, master, grad, h, self.sparse_rows)?
            }
            #[cfg(feature = "cuda")]
            State::Cuda(state) => state.update(self.var.as_tensor(), grad, &h.coefficients())?,
        }
        Ok(())
    }
}

/// The numbers of one update of one parameter, in f64 as the composite passes them to candle's
/// scalar ops (which round them to f32).
#[derive(Debug, Clone, Copy)]
struct Hyper {
    beta1: f64,
    beta2: f64,
    eps: f64,
    inv_correction1: f64,
    inv_correction2: f64,
    lr: f64,
    /// `1 - lr * weight_decay` for the decay group.
    decay: Option<f64>,
}

impl Hyper {
    /// These numbers rounded to f32, as the fused updates use them.
    fn coefficients(&self) -> Coefficients {
        let inv = [self.inv_correction1, self.inv_correction2];
        Coefficients::new(self.beta1, self.beta2, self.eps, inv, self.lr, self.decay)
    }
}

/// The composite update: about a dozen tensor ops, each a pass over memory, one per line of
/// the fused pass's formula (`ops::adamw`). It is the reference the fused pass is held to, and the update on devices without a fused kernel. With
/// `sparse_rows`, the rows of a matrix whose gradient is all zero keep their parameter, moments
/// and master copy.
fn composite_update(
    var: &Var,
    m: &mut Tensor,
    v: &mut Tensor,
    master: &mut Option<Tensor>,
    grad: &Tensor,
    h: &Hyper,
    sparse_rows: bool,
) -> Result<()> {
    let grad = grad.to_dtype(DType::F32)?;
    let new_m = ((&*m * h.beta1)? + (&grad * (1.0 - h.beta1))?)?;
    let new_v = ((&*v * h.beta2)? + (grad.sqr()? * (1.0 - h.beta2))?)?;
    let mut param = match master {
        Some(w) => w.clone(),
        None => var.as_tensor().to_dtype(DType::F32)?,
    };
    if let Some(d) = h.decay {
        param = (&param * d)?;
    }
    let denom = ((&new_v * h.inv_correction2)?.sqrt()? + h.eps)?;
    let update = ((&new_m * h.inv_correction1)? / denom)?;
    let mut param = (param - (update * h.lr)?)?;
    let mut stored = param.to_dtype(var.dtype())?;
    if sparse_rows {
        // 1 for rows with a non-zero (or NaN) gradient entry, as the fused pass decides.
        let touched = grad
            .ne(0f64)?
            .max_keepdim(1)?
            .broadcast_as(grad.shape())?
            .contiguous()?;
        *m = touched.where_cond(&new_m, m)?;
        *v = touched.where_cond(&new_v, v)?;
        stored = touched.where_cond(&stored, var.as_tensor())?;
        if let Some(w) = master.as_ref() {
            param = touched.where_cond(&param, w)?;
        }
    } else {
        (*m, *v) = (new_m, new_v);
    }
    var.set(&stored)?;
    if let Some(w) = master {
        *w = param;
    }
    Ok(())
}

/// AdamW (Loshchilov & Hutter) as PyTorch implements it: `p -= lr * wd * p` for the decay group,
/// then the bias-corrected Adam update.
///
/// Moments are kept in f32 whatever the parameter dtype, and bf16/f16 parameters get an f32
/// master copy that the update is applied to (the parameter is its rounding), so updates below
/// the parameter's precision accumulate instead of being lost; the master copies are taken when
/// the optimizer is built or its state loaded.
///
/// On the CPU each step is one fused pass per parameter (rayon), on CUDA (`cuda` feature;
/// f32/bf16/f16 parameters) one kernel per parameter, with no copy to the host; elsewhere, or
/// after [`AdamW::with_fused`]`(false)`, it is a composite of tensor ops. The CPU's fused pass and
/// the composite give the same bits; the CUDA kernel runs the same f32 operations.
pub struct AdamW {
    slots: BTreeMap<String, Slot>,
    config: AdamWConfig,
    step: u64,
}

impl std::fmt::Debug for AdamW {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdamW")
            .field("params", &self.slots.len())
            .field("step", &self.step)
            .finish()
    }
}

impl AdamW {
    /// An optimizer over the named variables; names decide the group ([`is_no_decay`]).
    pub fn new(vars: impl IntoIterator<Item = (String, Var)>, config: AdamWConfig) -> Result<Self> {
        let slots = vars
            .into_iter()
            .map(|(name, var)| {
                let decay = !is_no_decay(&name);
                Ok((name, Slot::new(var, decay, true)?))
            })
            .collect::<Result<_>>()?;
        Ok(Self {
            slots,
            config,
            step: 0,
        })
    }

    /// Uses the fused update (`true`, the default: the CPU pass, the CUDA kernel) or the
    /// composite of tensor ops (`false`); other devices, and f64 parameters on CUDA, always use
    /// the composite. The state moves with the choice.
    pub fn with_fused(mut self, fused: bool) -> Result<Self> {
        for slot in self.slots.values_mut() {
            slot.rebuild(fused)?;
        }
        Ok(self)
    }

    /// Multiplies the learning rate of every parameter whose name starts with `prefix` by
    /// `scale` (for example a larger rate for a randomly initialised head); the schedule
    /// still scales both rates alike.
    pub fn with_lr_scale(mut self, prefix: &str, scale: f64) -> Self {
        for (_, slot) in self.slots.iter_mut().filter(|(n, _)| n.starts_with(prefix)) {
            slot.lr_scale = scale;
        }
        self
    }

    /// Updates the matrix `name` (an embedding table) lazily, row by row: a row whose gradient
    /// is entirely zero (a token absent from the batch) keeps its weights, both moments and its
    /// master copy, and gets no weight decay; the other rows get the dense update, bias
    /// correction included (with the matrix's step count). This is the rule of
    /// PyTorch's `SparseAdam` and of TensorFlow's `LazyAdam`, with AdamW's decoupled weight
    /// decay on the rows present.
    ///
    /// Against PyTorch's dense `AdamW` (and this optimizer without the option): the dense rule
    /// decays every row's moments at every step and keeps moving a row whose token is absent by
    /// its remaining momentum, and decays its weights. Both rules give the same result for rows
    /// present in every step, and for every row at the first step without weight decay. The
    /// gradient must really be sparse: with the MLM head tied to the embeddings every row gets
    /// a gradient and the option changes nothing.
    ///
    /// Errors: [`Error::InvalidArgument`] when no parameter is called `name` or it is not a
    /// matrix.
    pub fn with_sparse_rows(mut self, name: &str) -> Result<Self> {
        let Some(slot) = self.slots.get_mut(name) else {
            return Err(Error::InvalidArgument(format!(
                "sparse rows: the optimizer has no parameter `{name}`"
            )));
        };
        if slot.var.rank() != 2 {
            return Err(Error::InvalidArgument(format!(
                "sparse rows: `{name}` has shape {:?}, not a matrix",
                slot.var.dims()
            )));
        }
        slot.sparse_rows = true;
        if !slot.var.device().is_cpu() {
            // The fused CUDA update has no row mode: the composite update has.
            slot.rebuild(false)?;
        }
        Ok(self)
    }

    /// Number of updates applied so far (each parameter also counts its own: the updates it
    /// had a gradient in, which its bias correction uses, as PyTorch's optimizers do).
    pub fn step_count(&self) -> u64 {
        self.step
    }

    /// Names of the parameters in each group: `(decay, no_decay)`.
    pub fn groups(&self) -> (Vec<&str>, Vec<&str>) {
        let (decay, no_decay): (Vec<_>, Vec<_>) = self.slots.iter().partition(|(_, s)| s.decay);
        (
            decay.into_iter().map(|(n, _)| n.as_str()).collect(),
            no_decay.into_iter().map(|(n, _)| n.as_str()).collect(),
        )
    }

    /// Applies one update with learning rate `lr` (times each parameter's scale). Parameters
    /// without a gradient are left alone (their moments and their step count do not advance).
    pub fn step(&mut self, grads: &Gradients, lr: f64) -> Result<()> {
        self.step += 1;
        let AdamWConfig {
            beta1,
            beta2,
            eps,
            weight_decay,
        } = self.config;
        for (name, slot) in self.slots.iter_mut() {
            let Some(grad) = grads.get(name) else {
                continue;
            };
            slot.step += 1;
            let t = i32::try_from(slot.step).unwrap_or(i32::MAX);
            let inv_correction1 = 1.0 / (1.0 - beta1.powi(t));
            let inv_correction2 = 1.0 / (1.0 - beta2.powi(t));
            let lr = lr * slot.lr_scale;
            let h = Hyper {
                beta1,
                beta2,
                eps,
                inv_correction1,
                inv_correction2,
                lr,
                decay: (slot.decay && weight_decay != 0.0).then_some(1.0 - lr * weight_decay),
            };
            slot.update(grad, &h).map_err(|e| match e {
                Error::ShapeMismatch {
                    expected, actual, ..
                } => Error::ShapeMismatch {
                    name: format!("gradient of {name}"),
                    expected,
                    actual,
                },
                e => e,
            })?;
        }
        Ok(())
    }

    /// The state as tensors named `m.<param>` and `v.<param>`, plus `master.<param>` for the
    /// f32 master copies of bf16/f16 parameters and `step.<param>` (an i64 scalar) for each
    /// parameter's step count, for a checkpoint.
    ///
    /// # Errors
    ///
    /// A failed copy of device-side state (CUDA).
    pub fn state_tensors(&self) -> Result<HashMap<String, Tensor>> {
        let mut out = HashMap::new();
        for (name, slot) in &self.slots {
            let (m, v, master) = slot.tensors()?;
            out.insert(format!("m.{name}"), m);
            out.insert(format!("v.{name}"), v);
            let step = i64::try_from(slot.step).unwrap_or(i64::MAX);
            out.insert(format!("step.{name}"), Tensor::new(step, &Device::Cpu)?);
            if let Some(w) = master {
                out.insert(format!("master.{name}"), w);
            }
        }
        Ok(out)
    }

    /// Restores the state saved by [`AdamW::state_tensors`] and the step count. Master copies
    /// absent from `tensors` (older checkpoints) are taken from the variables' current values;
    /// a parameter's step count absent from them (checkpoints written before parameters
    /// counted their own) is `step`, the count every parameter's bias correction used then.
    pub fn load_state(&mut self, tensors: &HashMap<String, Tensor>, step: u64) -> Result<()> {
        for (name, slot) in self.slots.iter_mut() {
            let get = |kind: &str| -> Result<Option<Tensor>> {
                let key = format!("{kind}.{name}");
                let Some(t) = tensors.get(&key) else {
                    return Ok(None);
                };
                if t.dims() != slot.var.dims() {
                    return Err(Error::ShapeMismatch {
                        name: key,
                        expected: slot.var.dims().to_vec(),
                        actual: t.dims().to_vec(),
                    });
                }
                Ok(Some(t.clone()))
            };
            let required = |kind: &str| -> Result<Tensor> {
                get(kind)?.ok_or_else(|| Error::MissingTensors {
                    names: vec![format!("{kind}.{name}")],
                })
            };
            let (m, v) = (required("m")?, required("v")?);
            let master = match needs_master(slot.var.dtype()) {
                true => Some(match get("master")? {
                    Some(w) => w,
                    None => slot.var.to_dtype(DType::F32)?,
                }),
                false => None,
            };
            slot.set_tensors(m, v, master)?;
            slot.step = match tensors.get(&format!("step.{name}")) {
                Some(t) => saved_step(t, &format!("step.{name}"))?,
                None => step,
            };
        }
        self.step = step;
        Ok(())
    }
}

/// A step count saved as a scalar tensor (any integer or float dtype).
fn saved_step(t: &Tensor, name: &str) -> Result<u64> {
    let value = t.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?;
    match value[..] {
        [v] if v >= 0.0 && v.fract() == 0.0 => Ok(v as u64),
        _ => Err(Error::InvalidArgument(format!(
            "optimizer state `{name}`: expected one non-negative whole number, got {value:?}"
        ))),
    }
}

/// Elements per rayon task of the norm: large enough to amortise the scheduling.
const CHUNK: usize = 1 << 14;

/// Sum of the squares of every element of the CPU gradients, accumulated in f64: one rayon
/// reduction over fixed chunks of all of them, summed in a fixed order, so the result does not
/// depend on the thread count.
fn host_sum_squares(grads: &[&Tensor]) -> Result<f64> {
    let guards: Vec<_> = grads.iter().map(|g| g.storage_and_layout()).collect();
    let mut chunks = Vec::new();
    for (i, (storage, layout)) in guards.iter().enumerate() {
        let Storage::Cpu(_) = &**storage else {
            return Err(Error::InvalidArgument("a non-CPU gradient".into()));
        };
        let Some((start, end)) = layout.contiguous_offsets() else {
            return Err(Error::InvalidArgument("a non-contiguous gradient".into()));
        };
        chunks.extend(
            (start..end)
                .step_by(CHUNK)
                .map(|s| (i, s, (s + CHUNK).min(end))),
        );
    }
    fn squares<T: Elem>(data: &[T]) -> f64 {
        data.iter().map(|x| (x.get() as f64).powi(2)).sum()
    }
    let partial: Vec<f64> = chunks
        .par_iter()
        .map(|&(i, s, e)| match &*guards[i].0 {
            Storage::Cpu(CpuStorage::F32(d)) => Ok(squares(&d[s..e])),
            Storage::Cpu(CpuStorage::F64(d)) => Ok(d[s..e].iter().map(|x| x * x).sum::<f64>()),
            Storage::Cpu(CpuStorage::BF16(d)) => Ok(squares(&d[s..e])),
            Storage::Cpu(CpuStorage::F16(d)) => Ok(squares(&d[s..e])),
            other => Err(Error::InvalidArgument(format!(
                "a {:?} gradient",
                other.dtype()
            ))),
        })
        .collect::<Result<_>>()?;
    Ok(partial.iter().sum())
}

/// Sum of squares of gradients on one device, in f32 there, with a single read to the host.
fn device_sum_squares(grads: &[&Tensor]) -> Result<f64> {
    let per_tensor = grads
        .iter()
        .map(|g| Ok(g.to_dtype(DType::F32)?.sqr()?.sum_all()?))
        .collect::<Result<Vec<_>>>()?;
    Ok(Tensor::stack(&per_tensor, 0)?
        .sum_all()?
        .to_scalar::<f32>()? as f64)
}

/// The global L2 norm of `grads`: one reduction over all of them and one read to the host
/// per device (accumulated in f64 on the CPU, in f32 on other devices). Non-finite when any
/// gradient element is.
pub fn global_grad_norm(grads: &Gradients) -> Result<f64> {
    let mut by_device: Vec<(Device, Vec<&Tensor>)> = Vec::new();
    for g in grads.values() {
        match by_device
            .iter_mut()
            .find(|(d, _)| d.same_device(g.device()))
        {
            Some((_, list)) => list.push(g),
            None => by_device.push((g.device().clone(), vec![g])),
        }
    }
    let mut total = 0.0;
    for (device, list) in by_device {
        let contiguous: Vec<Tensor> = list
            .iter()
            .map(|g| g.contiguous())
            .collect::<candle_core::Result<_>>()?;
        let refs: Vec<&Tensor> = contiguous.iter().collect();
        total += match device.is_cpu() {
            true => host_sum_squares(&refs)?,
            false => device_sum_squares(&refs)?,
        };
    }
    Ok(total.sqrt())
}

/// Scales `grads` in place so that their global L2 norm is at most `max_norm`; returns the norm
/// before clipping ([`global_grad_norm`]), as `torch.nn.utils.clip_grad_norm_` does. Non-finite
/// gradients are left as they are (the caller skips the step).
pub fn clip_grad_norm(grads: &mut Gradients, max_norm: f64) -> Result<f64> {
    let norm = global_grad_norm(grads)?;
    if norm.is_finite() && norm > max_norm {
        let scale = max_norm / (norm + 1e-6);
        for g in grads.values_mut() {
            *g = (&*g * scale)?;
        }
    }
    Ok(norm)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_host_and_device_sums_of_squares_agree() {
        let a = Tensor::randn(0f32, 1.0, (300, 70), &Device::Cpu).unwrap();
        let b = Tensor::randn(0f32, 3.0, 40_000, &Device::Cpu)
            .unwrap()
            .to_dtype(DType::BF16)
            .unwrap();
        let (host, device) = (
            host_sum_squares(&[&a, &b]).unwrap(),
            device_sum_squares(&[&a, &b]).unwrap(),
        );
        assert!((host - device).abs() < 1e-5 * host, "{host} vs {device}");
    }
}
