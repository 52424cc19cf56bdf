//! ML-CTL's projection head: `Linear(d, d) -> ReLU -> Linear(d, d)` with `d = 2H`.

use candle_core::{Module, Tensor};
use candle_nn::VarBuilder;

use crate::encoder::{linear, LinearInit};

use crate::Result;

/// Two linear layers with a ReLU between them, applied to `concat(sentence, word)` embeddings.
///
/// Parameters: `fc1.{weight,bias}` and `fc2.{weight,bias}` under the [`VarBuilder`]'s prefix,
/// weights initialised like PyTorch's `nn.Linear` (uniform in ±1/sqrt(fan_in)) when absent.
///
/// # Shapes
/// - input: `[batch, in_dim]`; output: `[batch, out_dim]`
#[derive(Debug, Clone)]
pub struct Projection {
    fc1: candle_nn::Linear,
    fc2: candle_nn::Linear,
}

impl Projection {
    /// ML-CTL's shape, `2H -> 2H -> 2H`, for an encoder of hidden size `hidden`.
    pub fn mlctl(vb: VarBuilder, hidden: usize) -> Result<Self> {
        Self::load(vb, 2 * hidden, 2 * hidden, 2 * hidden)
    }

    /// `in_dim -> mid_dim -> out_dim`.
    pub fn load(vb: VarBuilder, in_dim: usize, mid_dim: usize, out_dim: usize) -> Result<Self> {
        Ok(Self {
            fc1: linear(vb.pp("fc1"), in_dim, mid_dim, LinearInit::TorchDefault)?,
            fc2: linear(vb.pp("fc2"), mid_dim, out_dim, LinearInit::TorchDefault)?,
        })
    }
}

impl Module for Projection {
    fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        self.fc2.forward(&self.fc1.forward(xs)?.relu()?)
    }
}
