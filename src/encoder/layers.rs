//! Building blocks with gradients that flow: LayerNorm, dropout, activations.
//!
//! candle-nn's fused `LayerNorm` and `softmax_last_dim` have no backward pass, so training
//! through them silently leaves weights unchanged; these use [`crate::ops`], whose fused CPU
//! kernels carry their own backward and whose composite twins serve the other devices.

use std::sync::{Arc, Mutex};

use candle_core::{Module, Tensor};
use candle_nn::{Init, VarBuilder};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::config::HiddenAct;
use crate::ops::{self, DropoutKey, GeluForm, Kernels};
use crate::Result;

/// Layer normalisation over the last dimension, `(x - mean) / sqrt(var + eps) * weight + bias`,
/// computed in f32 for half-precision inputs ([`ops::layer_norm`]).
#[derive(Debug, Clone)]
pub struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
    eps: f64,
    kernels: Kernels,
}

impl LayerNorm {
    /// Loads `weight` and `bias` of shape `[size]` from `vb`.
    pub fn load(vb: VarBuilder, size: usize, eps: f64) -> Result<Self> {
        let weight = vb.get_with_hints(size, "weight", Init::Const(1.0))?;
        let bias = vb.get_with_hints(size, "bias", Init::Const(0.0))?;
        Ok(Self {
            weight,
            bias,
            eps,
            kernels: Kernels::default(),
        })
    }

    /// Chooses the fused kernel or the composite twin.
    pub fn with_kernels(self, kernels: Kernels) -> Self {
        Self { kernels, ..self }
    }

    /// The same normalisation with its parameters outside the autograd graph (they share
    /// storage with the originals).
    pub(crate) fn detached(self) -> Self {
        Self {
            weight: self.weight.detach(),
            bias: self.bias.detach(),
            ..self
        }
    }

    /// The scale, `[size]`.
    pub(crate) fn weight(&self) -> &Tensor {
        &self.weight
    }

    /// The shift, `[size]`.
    pub(crate) fn bias(&self) -> &Tensor {
        &self.bias
    }

    /// Normalises `xs` (`[..., size]`).
    pub fn forward_ln(&self, xs: &Tensor) -> Result<Tensor> {
        if self.kernels.fused_on(xs.device()) {
            ops::layer_norm(xs, &self.weight, &self.bias, self.eps)
        } else {
            ops::layer_norm_composite(xs, &self.weight, &self.bias, self.eps)
        }
    }
}

impl Module for LayerNorm {
    fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        self.forward_ln(xs).map_err(ops::to_candle)
    }
}

/// Applies an activation function.
pub(crate) fn activate(act: HiddenAct, xs: &Tensor, kernels: Kernels) -> Result<Tensor> {
    let form = match act {
        HiddenAct::Gelu => GeluForm::Erf,
        HiddenAct::GeluNew | HiddenAct::GeluPytorchTanh => GeluForm::Tanh,
        HiddenAct::Relu => return Ok(xs.relu()?),
    };
    if kernels.fused_on(xs.device()) {
        ops::gelu(xs, form)
    } else {
        ops::gelu_composite(xs, form)
    }
}

#[derive(Debug)]
struct RngState {
    chacha: ChaCha8Rng,
    key: Option<DropoutKey>,
}

/// The source of dropout keys shared by every dropout layer of a model.
///
/// Masks come from Philox ([`ops::dropout`]), a pure function of a [`DropoutKey`], the layer and
/// the position. The key of a training pass is the one set with [`DropoutRng::set_key`], or else
/// a fresh seed drawn from a ChaCha8 generator at each pass, so a run is reproducible from its
/// seed and a checkpoint of [`DropoutRng::state`] resumes it bit for bit. Masks are the same on
/// every device and whatever the thread count.
#[derive(Debug, Clone)]
pub struct DropoutRng(Arc<Mutex<RngState>>);

impl DropoutRng {
    /// A generator started from `seed`.
    pub fn new(seed: u64) -> Self {
        Self(Arc::new(Mutex::new(RngState {
            chacha: ChaCha8Rng::seed_from_u64(seed),
            key: None,
        })))
    }

    /// Restarts the generator from `seed`; every layer sharing it sees the new stream.
    pub fn reseed(&self, seed: u64) {
        self.lock().chacha = ChaCha8Rng::seed_from_u64(seed);
    }

    /// A copy of the generator's state, for a checkpoint.
    pub fn state(&self) -> ChaCha8Rng {
        self.lock().chacha.clone()
    }

    /// Restores a state saved with [`DropoutRng::state`].
    pub fn set_state(&self, state: ChaCha8Rng) {
        self.lock().chacha = state;
    }

    /// Fixes the key of every following training pass (`None`: draw one per pass again).
    ///
    /// With a key, masks depend only on (seed, step, global sample index, layer, position):
    /// set `step` (and the chunk's `sample_offset`) before each pass. Passes that must differ,
    /// such as two views of one batch, need different keys.
    pub fn set_key(&self, key: Option<DropoutKey>) {
        self.lock().key = key;
    }

    /// The key set with [`DropoutRng::set_key`], if any.
    pub fn key(&self) -> Option<DropoutKey> {
        self.lock().key
    }

    /// The key of the next training pass: the one set, or a fresh seed from the generator.
    pub fn next_key(&self) -> DropoutKey {
        let mut state = self.lock();
        match state.key {
            Some(key) => key,
            None => DropoutKey::new(state.chacha.random(), 0),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, RngState> {
        // A panic elsewhere cannot leave the state half-written: recover the guard.
        self.0
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// Inverted dropout: in training, zeroes each entry with probability `p` and scales the rest by
/// `1 / (1 - p)`; outside training, the identity.
#[derive(Debug, Clone)]
pub struct Dropout {
    p: f32,
    rng: DropoutRng,
    site: u32,
    kernels: Kernels,
}

impl Dropout {
    /// Dropout with probability `p` (in `[0, 1)`, checked by [`super::BertConfig::validate`]),
    /// at site 0.
    pub fn new(p: f32, rng: DropoutRng) -> Self {
        Self {
            p,
            rng,
            site: 0,
            kernels: Kernels::default(),
        }
    }

    /// Names this dropout layer: layers drawing with one key need distinct sites.
    pub fn with_site(self, site: u32) -> Self {
        Self { site, ..self }
    }

    /// Chooses the fused kernel or the composite twin.
    pub fn with_kernels(self, kernels: Kernels) -> Self {
        Self { kernels, ..self }
    }

    /// Applies dropout when `train` is true, with the generator's next key.
    pub fn forward_t(&self, xs: &Tensor, train: bool) -> candle_core::Result<Tensor> {
        if !train || self.p == 0.0 {
            return Ok(xs.clone());
        }
        self.forward_keyed(xs, Some(self.rng.next_key()))
            .map_err(ops::to_candle)
    }

    /// Applies dropout keyed by `key` (`None`: the identity, as outside training). Rows of `xs`
    /// (its first dimension) are samples `key.sample_offset`, `key.sample_offset + 1`, ...
    pub fn forward_keyed(&self, xs: &Tensor, key: Option<DropoutKey>) -> Result<Tensor> {
        match key {
            Some(key) if self.p > 0.0 => {
                if self.kernels.fused_on(xs.device()) {
                    ops::dropout(xs, self.p, key, self.site)
                } else {
                    ops::dropout_composite(xs, self.p, key, self.site)
                }
            }
            _ => Ok(xs.clone()),
        }
    }
}

/// How [`linear`] initialises a layer whose tensors the checkpoint lacks.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum LinearInit {
    /// BERT's: normal weights with this standard deviation, zero bias.
    Normal(f64),
    /// PyTorch's `nn.Linear` default: weight and bias uniform in ±1/sqrt(in_dim).
    TorchDefault,
}

/// The crate's one `Linear` loader: the checkpoint's `weight` `[out_dim, in_dim]` and `bias`
/// `[out_dim]` under `vb`, or fresh ones initialised by `init`.
pub(crate) fn linear(
    vb: VarBuilder,
    in_dim: usize,
    out_dim: usize,
    init: LinearInit,
) -> Result<candle_nn::Linear> {
    let (weight_init, bias_init) = match init {
        LinearInit::Normal(stdev) => (Init::Randn { mean: 0.0, stdev }, Init::Const(0.0)),
        LinearInit::TorchDefault => {
            let bound = 1.0 / (in_dim as f64).sqrt();
            let uniform = Init::Uniform {
                lo: -bound,
                up: bound,
            };
            (uniform, uniform)
        }
    };
    let weight = vb.get_with_hints((out_dim, in_dim), "weight", weight_init)?;
    let bias = vb.get_with_hints(out_dim, "bias", bias_init)?;
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
