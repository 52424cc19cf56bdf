//! Pooling hidden states into one vector: sentence embeddings over attended tokens (a masked
//! mean, or sentence-transformers' other modes) and word embeddings over token spans, summed
//! over chosen layers.

use candle_core::Tensor;

use crate::encoder::EncoderOutput;
use crate::ops::num::accumulation_dtype;
use crate::{Error, Result};

/// Which hidden states to pool, and how.
///
/// The embedding is the sum over the chosen layers of the mean over the chosen tokens (ML-CTL's
/// "layers 1 and L" is this sum, not an average of the two layers: twice the scale of either,
/// with the same cosines). Other [`PoolingMode`]s (CLS token, max, last token, ...) apply to the
/// same summed hidden states, as sentence-transformers' `Pooling` module applies them to the
/// last layer. ML-CTL
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
    modes: Vec<PoolingMode>,
}

/// How the tokens of a sentence become one vector, as in sentence-transformers'
/// `1_Pooling/config.json` (`pooling_mode`, or the older `pooling_mode_*` flags). Several modes
/// concatenate their vectors in the order given.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum PoolingMode {
    /// The first attended token's vector: `[CLS]` / `<s>`, or the first token after a prompt
    /// left out of the pooling (as sentence-transformers 6 picks it).
    Cls,
    /// The element-wise maximum over attended tokens.
    Max,
    /// The mean over attended tokens (ML-CTL's and most sentence-transformers models').
    Mean,
    /// The sum over attended tokens divided by the square root of their number.
    MeanSqrtLen,
    /// The mean over attended tokens weighted by position (1, 2, 3, ...).
    WeightedMean,
    /// The last attended token's vector.
    LastToken,
}

impl PoolingMode {
    /// The `1_Pooling/config.json` key that switches this mode on.
    pub fn config_key(self) -> &'static str {
        match self {
            PoolingMode::Cls => "pooling_mode_cls_token",
            PoolingMode::Max => "pooling_mode_max_tokens",
            PoolingMode::Mean => "pooling_mode_mean_tokens",
            PoolingMode::MeanSqrtLen => "pooling_mode_mean_sqrt_len_tokens",
            PoolingMode::WeightedMean => "pooling_mode_weightedmean_tokens",
            PoolingMode::LastToken => "pooling_mode_lasttoken",
        }
    }

    /// The mode's name in `pooling_mode` (`"cls"`, `"max"`, `"mean"`, `"mean_sqrt_len_tokens"`,
    /// `"weightedmean"`, `"lasttoken"`).
    pub fn name(self) -> &'static str {
        match self {
            PoolingMode::Cls => "cls",
            PoolingMode::Max => "max",
            PoolingMode::Mean => "mean",
            PoolingMode::MeanSqrtLen => "mean_sqrt_len_tokens",
            PoolingMode::WeightedMean => "weightedmean",
            PoolingMode::LastToken => "lasttoken",
        }
    }

    /// The mode a `pooling_mode` name stands for.
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|m| m.name() == name)
    }

    /// Every mode, in the order of the `pooling_mode_*` flags.
    pub const ALL: [PoolingMode; 6] = [
        PoolingMode::Cls,
        PoolingMode::Max,
        PoolingMode::Mean,
        PoolingMode::MeanSqrtLen,
        PoolingMode::WeightedMean,
        PoolingMode::LastToken,
    ];
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
            modes: vec![PoolingMode::Mean],
        }
    }

    /// Pools one layer only, e.g. layer 8 for SimAlign-style word alignment.
    pub fn layer(layer: isize) -> Self {
        Self {
            layers: vec![layer],
            modes: vec![PoolingMode::Mean],
        }
    }

    /// Pools the sum of these layers.
    pub fn with_layers(mut self, layers: impl Into<Vec<isize>>) -> Self {
        self.layers = layers.into();
        self
    }

    /// Pools with these modes (their vectors concatenated in this order when several; a
    /// repeated mode counts once), instead of the mean.
    pub fn with_modes(mut self, modes: impl Into<Vec<PoolingMode>>) -> Self {
        let mut unique = Vec::new();
        for mode in modes.into() {
            if !unique.contains(&mode) {
                unique.push(mode);
            }
        }
        self.modes = unique;
        self
    }

    /// The chosen layers as given (negative counting from the end).
    pub fn layers(&self) -> &[isize] {
        &self.layers
    }

    /// The pooling modes, in concatenation order.
    pub fn modes(&self) -> &[PoolingMode] {
        &self.modes
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
    /// included, as in ML-CTL), summed over the chosen layers; or the other [`PoolingMode`]s
    /// over the same tokens, concatenated.
    ///
    /// # Shapes
    /// - output: `[batch, hidden * modes]`
    pub fn sentence(&self, out: &EncoderOutput, attention_mask: &Tensor) -> Result<Tensor> {
        let hidden = self.summed_layers(out)?;
        if self.modes.is_empty() {
            return Err(Error::InvalidArgument(
                "pooling needs at least one mode".into(),
            ));
        }
        let vectors = self
            .modes
            .iter()
            .map(|&mode| pool_mode(mode, &hidden, attention_mask))
            .collect::<Result<Vec<_>>>()?;
        if vectors.len() == 1 {
            return Ok(vectors.into_iter().next().expect("one mode"));
        }
        Ok(Tensor::cat(&vectors, 1)?)
    }

    /// Word embeddings: the mean over one inclusive token span per sequence, summed over the
    /// chosen layers. Only the mean applies to spans: other modes are an
    /// [`Error::InvalidArgument`].
    pub fn spans(&self, out: &EncoderOutput, spans: &[TokenSpan]) -> Result<Tensor> {
        if self.modes != [PoolingMode::Mean] {
            return Err(Error::InvalidArgument(format!(
                "word spans are mean-pooled; this pooling's modes are {:?}",
                self.modes
            )));
        }
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

/// One mode over `hidden` `[b, l, h]` with `mask` `[b, l]`, as sentence-transformers' `Pooling`
/// computes it.
fn pool_mode(mode: PoolingMode, hidden: &Tensor, mask: &Tensor) -> Result<Tensor> {
    check_mask(hidden, mask)?;
    let seq_len = mask.dim(1)?;
    let on = mask.ne(0f64)?.to_dtype(hidden.dtype())?;
    Ok(match mode {
        PoolingMode::Mean => masked_mean(hidden, mask)?,
        PoolingMode::Cls => {
            let first = attended(&on, |row| row.iter().position(|&m| m != 0.0))?;
            gather_rows(hidden, &first)?
        }
        PoolingMode::Max => {
            // Masked positions at -1e9, as sentence-transformers sets them.
            let off = ((on.ones_like()? - &on)? * -1e9)?;
            hidden
                .broadcast_mul(&on.unsqueeze(2)?)?
                .broadcast_add(&off.unsqueeze(2)?)?
                .max(1)?
        }
        PoolingMode::MeanSqrtLen => {
            let summed = hidden.broadcast_mul(&on.unsqueeze(2)?)?.sum(1)?;
            let counts = on.sum_keepdim(1)?.clamp(1e-9, f64::INFINITY)?.sqrt()?;
            summed.broadcast_div(&counts)?
        }
        PoolingMode::WeightedMean => {
            let positions =
                Tensor::arange(1u32, seq_len as u32 + 1, hidden.device())?.to_dtype(on.dtype())?;
            let weights = on.broadcast_mul(&positions.unsqueeze(0)?)?;
            let summed = hidden.broadcast_mul(&weights.unsqueeze(2)?)?.sum(1)?;
            let total = weights.sum_keepdim(1)?.clamp(1e-9, f64::INFINITY)?;
            summed.broadcast_div(&total)?
        }
        PoolingMode::LastToken => {
            // A row with no attended token gives zeros, as in sentence-transformers.
            let last = attended(&on, |row| row.iter().rposition(|&m| m != 0.0))?;
            gather_rows(&hidden.broadcast_mul(&on.unsqueeze(2)?)?, &last)?
        }
    })
}

/// For each row of the 0/1 `mask` `[b, l]`, the token `pick` chooses (0 when none).
fn attended(mask: &Tensor, pick: impl Fn(&[f32]) -> Option<usize>) -> Result<Vec<u32>> {
    let mask: Vec<Vec<f32>> = mask.to_dtype(candle_core::DType::F32)?.to_vec2()?;
    Ok(mask
        .iter()
        .map(|row| pick(row).unwrap_or(0) as u32)
        .collect())
}

/// Row `b` of the output is `hidden[b, index[b]]`: `[b, l, h]` to `[b, h]`.
fn gather_rows(hidden: &Tensor, index: &[u32]) -> Result<Tensor> {
    let rows: Vec<Tensor> = index
        .iter()
        .enumerate()
        .map(|(b, &i)| hidden.get(b)?.get(i as usize))
        .collect::<candle_core::Result<_>>()?;
    Ok(Tensor::stack(&rows, 0)?)
}

/// `hidden` is `[b, l, h]` and `mask` `[b, l]`.
fn check_mask(hidden: &Tensor, mask: &Tensor) -> Result<()> {
    let (batch, seq_len, _) = hidden.dims3()?;
    if mask.dims() != [batch, seq_len] {
        return Err(Error::ShapeMismatch {
            name: "mask".into(),
            expected: vec![batch, seq_len],
            actual: mask.dims().to_vec(),
        });
    }
    Ok(())
}

/// Mean over the sequence axis of `hidden` `[b, l, h]` where `mask` `[b, l]` is non-zero; rows
/// with an empty mask give zeros rather than NaN.
pub fn masked_mean(hidden: &Tensor, mask: &Tensor) -> Result<Tensor> {
    check_mask(hidden, mask)?;
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
