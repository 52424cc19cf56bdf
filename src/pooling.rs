//! Masked means of hidden states: sentence embeddings over attended tokens and word
//! embeddings over token spans, summed over chosen layers.

use candle_core::Tensor;

use crate::encoder::accumulation_dtype;
use crate::encoder::EncoderOutput;
use crate::{Error, Result};

/// Which hidden states to pool, and how.
///
/// The embedding is the sum over the chosen layers of the mean over the chosen tokens. ML-CTL
/// uses layers 1 and 12 of mBERT ([`Pooling::mlctl`]); indices count as in
/// [`EncoderOutput::hidden_states`] (0 is the embedding output) and negative ones from the end
/// (-1 is the last layer), so the default also fits smaller encoders.
///
/// # Shapes
/// - hidden states: `[batch, seq_len, hidden]`; `attention_mask`: `[batch, seq_len]`
/// - output: `[batch, hidden]`, f32 for half-precision inputs, else the input dtype
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pooling {
    layers: Vec<isize>,
}

impl Default for Pooling {
    fn default() -> Self {
        Self::mlctl()
    }
}

/// An inclusive token span `[start, end]` of one sequence of a batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TokenSpan {
    /// First token (0 is `[CLS]`).
    pub start: usize,
    /// Last token, inclusive.
    pub end: usize,
}

impl Pooling {
    /// ML-CTL's pooling: layer 1 plus the last layer (layer 12 of mBERT).
    pub fn mlctl() -> Self {
        Self {
            layers: vec![1, -1],
        }
    }

    /// Pools one layer only, e.g. layer 8 for SimAlign-style word alignment.
    pub fn layer(layer: isize) -> Self {
        Self {
            layers: vec![layer],
        }
    }

    /// Pools the sum of these layers.
    pub fn with_layers(mut self, layers: impl Into<Vec<isize>>) -> Self {
        self.layers = layers.into();
        self
    }

    /// The chosen layers as given (negative counting from the end).
    pub fn layers(&self) -> &[isize] {
        &self.layers
    }

    /// Sum of the chosen hidden states, `[batch, seq_len, hidden]`, in the accumulation dtype.
    fn summed_layers(&self, out: &EncoderOutput) -> Result<Tensor> {
        let n = out.hidden_states.len() as isize;
        if self.layers.is_empty() {
            return Err(Error::InvalidArgument(
                "pooling needs at least one layer".into(),
            ));
        }
        let mut sum: Option<Tensor> = None;
        for &layer in &self.layers {
            let index = if layer < 0 { n + layer } else { layer };
            if !(0..n).contains(&index) {
                return Err(Error::InvalidArgument(format!(
                    "layer {layer} does not exist: the encoder has hidden states 0..={}",
                    n - 1
                )));
            }
            let h = &out.hidden_states[index as usize];
            let h = h.to_dtype(accumulation_dtype(h.dtype()))?;
            sum = Some(match sum {
                None => h,
                Some(s) => (s + h)?,
            });
        }
        Ok(sum.expect("at least one layer"))
    }

    /// Sentence embeddings: the mean over tokens where `attention_mask` is 1 (special tokens
    /// included, as in ML-CTL), summed over the chosen layers.
    pub fn sentence(&self, out: &EncoderOutput, attention_mask: &Tensor) -> Result<Tensor> {
        let hidden = self.summed_layers(out)?;
        masked_mean(&hidden, attention_mask)
    }

    /// Word embeddings: the mean over one inclusive token span per sequence, summed over the
    /// chosen layers.
    pub fn spans(&self, out: &EncoderOutput, spans: &[TokenSpan]) -> Result<Tensor> {
        let hidden = self.summed_layers(out)?;
        let (batch, seq_len, _) = hidden.dims3()?;
        if spans.len() != batch {
            return Err(Error::ShapeMismatch {
                name: "spans".into(),
                expected: vec![batch],
                actual: vec![spans.len()],
            });
        }
        let mut mask = vec![0f32; batch * seq_len];
        for (row, span) in spans.iter().enumerate() {
            if span.start > span.end || span.end >= seq_len {
                return Err(Error::InvalidArgument(format!(
                    "span {}..={} of row {row} is outside the {seq_len} tokens",
                    span.start, span.end
                )));
            }
            mask[row * seq_len + span.start..=row * seq_len + span.end].fill(1.0);
        }
        let mask = Tensor::from_vec(mask, (batch, seq_len), hidden.device())?;
        masked_mean(&hidden, &mask)
    }
}

/// Mean over the sequence axis of `hidden` `[b, l, h]` where `mask` `[b, l]` is non-zero; rows
/// with an empty mask give zeros rather than NaN.
pub fn masked_mean(hidden: &Tensor, mask: &Tensor) -> Result<Tensor> {
    let (batch, seq_len, _) = hidden.dims3()?;
    if mask.dims() != [batch, seq_len] {
        return Err(Error::ShapeMismatch {
            name: "mask".into(),
            expected: vec![batch, seq_len],
            actual: mask.dims().to_vec(),
        });
    }
    let mask = mask.ne(0f64)?.to_dtype(hidden.dtype())?;
    let summed = hidden.broadcast_mul(&mask.unsqueeze(2)?)?.sum(1)?;
    let counts = mask.sum_keepdim(1)?.clamp(1f64, f64::INFINITY)?;
    Ok(summed.broadcast_div(&counts)?)
}

/// Rows scaled to unit L2 length, as `torch.nn.functional.normalize(x, dim=-1)` does:
/// `x / max(‖x‖, 1e-12)`, so zero rows stay zero. Half-precision inputs are normalised in f32.
///
/// # Shapes
/// - `x`: `[..., dim]`; output: the same shape
pub fn l2_normalize(x: &Tensor) -> Result<Tensor> {
    let x = x.to_dtype(accumulation_dtype(x.dtype()))?;
    let norm = x
        .sqr()?
        .sum_keepdim(candle_core::D::Minus1)?
        .sqrt()?
        .clamp(1e-12, f64::INFINITY)?;
    Ok(x.broadcast_div(&norm)?)
}
