//! Masked-language-model corruption: 15% of real tokens, replaced 80/10/10.

use candle_core::{Device, Tensor};
use rand::Rng;
use rand_chacha::ChaCha8Rng;

use crate::tokenize::TokenBatch;
use crate::{Error, Result};

/// BERT's masking recipe: each real (non-special, non-padding) token is selected with
/// probability `prob`; a selected token becomes the mask token with probability 0.8, a uniformly
/// random vocabulary id with probability 0.1, and stays itself otherwise. Padding is never
/// selected.
#[derive(Debug, Clone)]
pub struct MlmMasking {
    prob: f64,
    mask_token_id: u32,
    vocab_size: u32,
    special_ids: Vec<u32>,
}

/// A masked copy of a batch and what the MLM loss predicts.
///
/// # Shapes
/// - `input_ids`: `[batch, seq_len]` u32, the corrupted ids
/// - `positions`: `[n_masked]` u32, flat indices (`row * seq_len + col`) of the selected tokens
/// - `targets`: `[n_masked]` u32, their original ids
#[derive(Debug, Clone)]
pub struct MaskedTokens {
    /// Corrupted input ids.
    pub input_ids: Tensor,
    /// Flat positions of the selected tokens, in row-major order.
    pub positions: Tensor,
    /// Original ids at those positions.
    pub targets: Tensor,
}

impl MaskedTokens {
    /// Number of selected tokens.
    pub fn len(&self) -> usize {
        self.targets.dims1().unwrap_or(0)
    }

    /// True when no token was selected (a batch of very short sentences can draw none).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl MlmMasking {
    /// Masking with BERT's defaults (15%); `special_ids` (e.g. `[CLS]`, `[SEP]`, `[PAD]`) are
    /// never selected. [`MlmMasking::for_tokenizer`] finds them all in a tokenizer.
    pub fn new(mask_token_id: u32, vocab_size: usize, special_ids: Vec<u32>) -> Result<Self> {
        if mask_token_id as usize >= vocab_size {
            return Err(Error::InvalidArgument(format!(
                "mask token id {mask_token_id} is outside the vocabulary of {vocab_size}"
            )));
        }
        Ok(Self {
            prob: 0.15,
            mask_token_id,
            vocab_size: vocab_size as u32,
            special_ids,
        })
    }

    /// Masking with the tokenizer's own mask token, never selecting any of its special tokens
    /// ([`SpecialTokens::ids`](crate::tokenize::SpecialTokens::ids)); random replacements are
    /// drawn from its whole vocabulary.
    ///
    /// A tokenizer without a mask token is an [`Error::Checkpoint`] naming the file that should
    /// declare one ([`Tokenizer::mask_token`](crate::tokenize::Tokenizer::mask_token)).
    pub fn for_tokenizer(tokenizer: &crate::tokenize::Tokenizer) -> Result<Self> {
        let mask = tokenizer.mask_token()?.id;
        let special = tokenizer.special_tokens().ids.clone();
        Self::new(mask, tokenizer.vocab_size(), special)
    }

    /// Sets the selection probability (default 0.15).
    pub fn with_prob(mut self, prob: f64) -> Result<Self> {
        if !(0.0..=1.0).contains(&prob) {
            return Err(Error::InvalidArgument(format!(
                "masking probability must be in [0, 1], got {prob}"
            )));
        }
        self.prob = prob;
        Ok(self)
    }

    /// Draws a masked copy of `batch` from `rng`.
    pub fn mask(
        &self,
        batch: &TokenBatch,
        rng: &mut ChaCha8Rng,
        device: &Device,
    ) -> Result<MaskedTokens> {
        let ids = batch.input_ids.to_vec2::<u32>()?;
        let attention = batch.attention_mask.to_vec2::<u32>()?;
        let seq_len = ids.first().map_or(0, Vec::len);
        let mut corrupted = Vec::with_capacity(ids.len() * seq_len);
        let (mut positions, mut targets) = (Vec::new(), Vec::new());
        for (row, (ids, attention)) in ids.iter().zip(&attention).enumerate() {
            for (col, (&id, &attended)) in ids.iter().zip(attention).enumerate() {
                let eligible = attended != 0 && !self.special_ids.contains(&id);
                let mut out = id;
                if eligible && rng.random_bool(self.prob) {
                    positions.push((row * seq_len + col) as u32);
                    targets.push(id);
                    let roll: f64 = rng.random();
                    if roll < 0.8 {
                        out = self.mask_token_id;
                    } else if roll < 0.9 {
                        out = rng.random_range(0..self.vocab_size);
                    }
                }
                corrupted.push(out);
            }
        }
        let n = positions.len();
        Ok(MaskedTokens {
            input_ids: Tensor::from_vec(corrupted, (ids.len(), seq_len), device)?,
            positions: Tensor::from_vec(positions, n, device)?,
            targets: Tensor::from_vec(targets, n, device)?,
        })
    }
}
