//! The masked-language-model loss.

use candle_core::{Module, Tensor, D};

use crate::data::MaskedTokens;
use crate::encoder::MlmHead;
use crate::ops::num::accumulation_dtype;
use crate::Result;

/// Mean cross-entropy of the MLM head's predictions at the masked positions.
///
/// Only the masked positions go through the vocabulary projection, so the logits are
/// `[n_masked, vocab]` rather than `[batch, seq_len, vocab]` (for mBERT at batch 64 and length
/// 128 that is ~0.6 GB instead of ~3.9 GB). A batch with no masked token gives a loss of zero.
///
/// # Shapes
/// - `hidden`: last hidden state `[batch, seq_len, hidden]` of the encoder run on
///   `masked.input_ids`
/// - output: scalar, f32 for half-precision inputs
pub fn masked_lm_loss(head: &MlmHead, hidden: &Tensor, masked: &MaskedTokens) -> Result<Tensor> {
    let (batch, seq_len, width) = hidden.dims3()?;
    if masked.is_empty() {
        return Ok(Tensor::zeros(
            (),
            accumulation_dtype(hidden.dtype()),
            hidden.device(),
        )?);
    }
    let selected = hidden
        .reshape((batch * seq_len, width))?
        .index_select(&masked.positions, 0)?;
    let logits = head.forward(&selected)?;
    let logits = logits.to_dtype(accumulation_dtype(logits.dtype()))?;
    // candle-nn's log_softmax is composed of differentiable ops.
    let log_probs = candle_nn::ops::log_softmax(&logits, D::Minus1)?;
    let picked = log_probs.gather(&masked.targets.unsqueeze(1)?, 1)?;
    Ok(picked.mean_all()?.neg()?)
}
