//! The masked-language-model loss.

use candle_core::Tensor;

use crate::data::MaskedTokens;
use crate::encoder::MlmHead;
use crate::ops::num::accumulation_dtype;
use crate::ops::vocab_nll;
use crate::Result;

/// Mean cross-entropy of the MLM head's predictions at the masked positions.
///
/// Only the masked positions go through the head, and on the CPU the vocabulary projection,
/// log-softmax and cross-entropy run as one kernel over chunks of the vocabulary
/// ([`vocab_nll`](crate::ops::vocab_nll)), so the `[n_masked, vocab]` logits are never held
/// whole (for mBERT at batch 64 and length 128 they would be ~0.6 GB in f32, with as much again
/// for each of their log-softmax and gradients). Other devices build those logits. The decoder
/// is the word-embedding tensor itself, so its gradient reaches the embeddings unless they are
/// frozen. A batch with no masked token gives a loss of zero.
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
    let (weight, bias) = head.decoder();
    vocab_nll(&head.transform(&selected)?, weight, bias, &masked.targets)
}
