//! AdamW with decoupled weight decay and two parameter groups.

use std::collections::{BTreeMap, HashMap};

use candle_core::{DType, Tensor, Var};

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

struct Slot {
    var: Var,
    m: Tensor,
    v: Tensor,
    decay: bool,
}

/// AdamW (Loshchilov & Hutter) as PyTorch implements it: `p -= lr * wd * p` for the decay group,
/// then the bias-corrected Adam update. Moments are kept in f32 whatever the parameter dtype.
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
                let m = Tensor::zeros(var.shape(), DType::F32, var.device())?;
                let v = m.clone();
                let decay = !is_no_decay(&name);
                Ok((name, Slot { var, m, v, decay }))
            })
            .collect::<Result<_>>()?;
        Ok(Self {
            slots,
            config,
            step: 0,
        })
    }

    /// Number of updates applied so far.
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

    /// Applies one update with learning rate `lr`. Parameters without a gradient are left alone
    /// (their moments do not advance).
    pub fn step(&mut self, grads: &Gradients, lr: f64) -> Result<()> {
        self.step += 1;
        let AdamWConfig {
            beta1,
            beta2,
            eps,
            weight_decay,
        } = self.config;
        let correction1 = 1.0 - beta1.powi(self.step as i32);
        let correction2 = 1.0 - beta2.powi(self.step as i32);
        for (name, slot) in self.slots.iter_mut() {
            let Some(grad) = grads.get(name) else {
                continue;
            };
            let grad = grad.to_dtype(DType::F32)?;
            slot.m = ((&slot.m * beta1)? + (&grad * (1.0 - beta1))?)?;
            slot.v = ((&slot.v * beta2)? + (grad.sqr()? * (1.0 - beta2))?)?;
            let mut param = slot.var.as_tensor().to_dtype(DType::F32)?;
            if slot.decay && weight_decay != 0.0 {
                param = (&param * (1.0 - lr * weight_decay))?;
            }
            let denom = ((&slot.v / correction2)?.sqrt()? + eps)?;
            let update = ((&slot.m / correction1)? / denom)?;
            let param = (param - (update * lr)?)?;
            slot.var.set(&param.to_dtype(slot.var.dtype())?)?;
        }
        Ok(())
    }

    /// The moments as tensors named `m.<param>` and `v.<param>`, for a checkpoint.
    pub fn state_tensors(&self) -> HashMap<String, Tensor> {
        self.slots
            .iter()
            .flat_map(|(name, s)| {
                [
                    (format!("m.{name}"), s.m.clone()),
                    (format!("v.{name}"), s.v.clone()),
                ]
            })
            .collect()
    }

    /// Restores the moments and the step count saved by [`AdamW::state_tensors`].
    pub fn load_state(&mut self, tensors: &HashMap<String, Tensor>, step: u64) -> Result<()> {
        for (name, slot) in self.slots.iter_mut() {
            for (kind, target) in [("m", &mut slot.m), ("v", &mut slot.v)] {
                let key = format!("{kind}.{name}");
                let t = tensors.get(&key).ok_or_else(|| Error::MissingTensors {
                    names: vec![key.clone()],
                })?;
                if t.dims() != target.dims() {
                    return Err(Error::ShapeMismatch {
                        name: key,
                        expected: target.dims().to_vec(),
                        actual: t.dims().to_vec(),
                    });
                }
                *target = t.to_dtype(DType::F32)?.to_device(target.device())?;
            }
        }
        self.step = step;
        Ok(())
    }
}

/// Scales `grads` in place so that their global L2 norm is at most `max_norm`; returns the norm
/// before clipping (computed in f32), as `torch.nn.utils.clip_grad_norm_` does.
pub fn clip_grad_norm(grads: &mut Gradients, max_norm: f64) -> Result<f64> {
    let mut total = 0f64;
    for g in grads.values() {
        total += g
            .to_dtype(DType::F32)?
            .sqr()?
            .sum_all()?
            .to_scalar::<f32>()? as f64;
    }
    let norm = total.sqrt();
    if norm.is_finite() && norm > max_norm {
        let scale = max_norm / (norm + 1e-6);
        for g in grads.values_mut() {
            *g = (&*g * scale)?;
        }
    }
    Ok(norm)
}
