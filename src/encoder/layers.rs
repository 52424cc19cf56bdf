//! Building blocks with gradients that flow: LayerNorm, dropout, activations.
//!
//! candle-nn's fused `LayerNorm` and `softmax_last_dim` have no backward pass, so training
//! through them silently leaves weights unchanged; these are composed of differentiable ops.

use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, Module, Tensor, D};
use candle_nn::{Init, VarBuilder};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::config::HiddenAct;
use crate::Result;

/// The dtype reductions run in: f16 and bf16 are widened to f32.
pub(crate) fn accumulation_dtype(dtype: DType) -> DType {
    match dtype {
        DType::F16 | DType::BF16 => DType::F32,
        other => other,
    }
}

/// Layer normalisation over the last dimension, `(x - mean) / sqrt(var + eps) * weight + bias`,
/// computed in f32 for half-precision inputs.
#[derive(Debug, Clone)]
pub struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
    eps: f64,
}

impl LayerNorm {
    /// Loads `weight` and `bias` of shape `[size]` from `vb`.
    pub fn load(vb: VarBuilder, size: usize, eps: f64) -> Result<Self> {
        let weight = vb.get_with_hints(size, "weight", Init::Const(1.0))?;
        let bias = vb.get_with_hints(size, "bias", Init::Const(0.0))?;
        Ok(Self { weight, bias, eps })
    }
}

impl Module for LayerNorm {
    fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        let dtype = xs.dtype();
        let xs = xs.to_dtype(accumulation_dtype(dtype))?;
        let mean = xs.mean_keepdim(D::Minus1)?;
        let centered = xs.broadcast_sub(&mean)?;
        let var = centered.sqr()?.mean_keepdim(D::Minus1)?;
        let normed = centered.broadcast_div(&(var + self.eps)?.sqrt()?)?;
        normed
            .to_dtype(dtype)?
            .broadcast_mul(&self.weight)?
            .broadcast_add(&self.bias)
    }
}

/// Applies an activation function.
pub(crate) fn activate(act: HiddenAct, xs: &Tensor) -> candle_core::Result<Tensor> {
    match act {
        HiddenAct::Gelu => xs.gelu_erf(),
        HiddenAct::GeluNew | HiddenAct::GeluPytorchTanh => xs.gelu(),
        HiddenAct::Relu => xs.relu(),
    }
}

/// A seeded random source shared by every dropout layer of a model.
///
/// On the CPU the masks come from this ChaCha8 generator, so a training run is reproducible
/// from its seed. On CUDA and Metal they come from the device's own generator (seed it with
/// `Device::set_seed`), which avoids copying masks from the host.
#[derive(Debug, Clone)]
pub struct DropoutRng(Arc<Mutex<ChaCha8Rng>>);

impl DropoutRng {
    /// A generator started from `seed`.
    pub fn new(seed: u64) -> Self {
        Self(Arc::new(Mutex::new(ChaCha8Rng::seed_from_u64(seed))))
    }

    /// Restarts the generator from `seed`; every layer sharing it sees the new stream.
    pub fn reseed(&self, seed: u64) {
        *self.lock() = ChaCha8Rng::seed_from_u64(seed);
    }

    /// A copy of the generator's state, for a checkpoint.
    pub fn state(&self) -> ChaCha8Rng {
        self.lock().clone()
    }

    /// Restores a state saved with [`DropoutRng::state`].
    pub fn set_state(&self, state: ChaCha8Rng) {
        *self.lock() = state;
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, ChaCha8Rng> {
        // A panic elsewhere cannot leave a ChaCha state half-written: recover the guard.
        self.0
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// A mask of `0` and `1 / (1 - p)` entries, each zero with probability `p`.
    fn mask(&self, p: f32, like: &Tensor) -> candle_core::Result<Tensor> {
        let scale = 1.0 / (1.0 - p as f64);
        match like.device() {
            Device::Cpu => {
                let n = like.elem_count();
                let mut rng = self.lock();
                let keep: Vec<f32> = (0..n)
                    .map(|_| {
                        if rng.random::<f32>() >= p {
                            scale as f32
                        } else {
                            0.0
                        }
                    })
                    .collect();
                Tensor::from_vec(keep, like.shape(), &Device::Cpu)?.to_dtype(like.dtype())
            }
            device => {
                let uniform = Tensor::rand(0f32, 1f32, like.shape(), device)?;
                uniform.ge(p as f64)?.to_dtype(like.dtype())? * scale
            }
        }
    }
}

/// Inverted dropout: in training, zeroes each entry with probability `p` and scales the rest by
/// `1 / (1 - p)`; outside training, the identity.
#[derive(Debug, Clone)]
pub struct Dropout {
    p: f32,
    rng: DropoutRng,
}

impl Dropout {
    /// Dropout with probability `p` (in `[0, 1)`, checked by [`super::BertConfig::validate`]).
    pub fn new(p: f32, rng: DropoutRng) -> Self {
        Self { p, rng }
    }

    /// Applies dropout when `train` is true.
    pub fn forward_t(&self, xs: &Tensor, train: bool) -> candle_core::Result<Tensor> {
        if !train || self.p == 0.0 {
            return Ok(xs.clone());
        }
        xs * self.rng.mask(self.p, xs)?
    }
}

/// Loads a `Linear` with BERT's initialisation (normal weights, zero bias) for missing tensors.
pub(crate) fn linear(
    vb: VarBuilder,
    in_dim: usize,
    out_dim: usize,
    init_std: f64,
) -> Result<candle_nn::Linear> {
    let weight = vb.get_with_hints(
        (out_dim, in_dim),
        "weight",
        Init::Randn {
            mean: 0.0,
            stdev: init_std,
        },
    )?;
    let bias = vb.get_with_hints(out_dim, "bias", Init::Const(0.0))?;
    Ok(candle_nn::Linear::new(weight, Some(bias)))
}

/// Loads an embedding table `[rows, dim]` with BERT's normal initialisation.
pub(crate) fn embedding(
    vb: VarBuilder,
    rows: usize,
    dim: usize,
    init_std: f64,
) -> Result<candle_nn::Embedding> {
    let table = vb.get_with_hints(
        (rows, dim),
        "weight",
        Init::Randn {
            mean: 0.0,
            stdev: init_std,
        },
    )?;
    Ok(candle_nn::Embedding::new(table, dim))
}
