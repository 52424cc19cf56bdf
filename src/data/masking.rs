//! Masked-language-model corruption: 15% of real tokens, replaced 80/10/10, with masks drawn
//! from a counter-based generator keyed by each sample's global index.

use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};

use crate::ops::philox::sample_words;
use crate::tokenize::TokenBatch;
use crate::{Error, Result};

/// Philox stream of the masks of side 0 (side `s` uses `MASK_STREAM + s`), apart from the small
/// site numbers of the encoder's dropout layers.
const MASK_STREAM: u32 = 0x4D4C_4D00;

/// `p · 2^32`, rounded: a 32-bit word `u` falls below it with probability `p` (up to 2^-33);
/// `p = 1` gives 2^32, above every word.
fn threshold(p: f64) -> u64 {
    (p * 4_294_967_296.0).round() as u64
}

/// What an MLM mask is a function of, besides the token's position in its sentence: the run's
/// seed, the batch (`step`: any counter that differs between the batches of a run), the global
/// index of the sample and the side of the pair it belongs to.
///
/// Row `r` of a masked batch is global sample `sample_offset + r`, so a shard of a batch (the
/// rows a data-parallel rank holds, or any run of rows) masked with the offset of its first row
/// gets exactly the masks of those rows in the whole batch, whoever masks it and however the
/// batch is split. `step` and the sample index enter Philox's counter by their low 32 bits and
/// its key by their high 32 bits, as [`DropoutKey`](crate::ops::DropoutKey)'s do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
pub struct MaskKey {
    /// The run's seed.
    pub seed: u64,
    /// The batch counter (a trainer uses `update · grad_accum + micro-batch`).
    pub step: u64,
    /// Global index of the first row of the batch.
    pub sample_offset: u64,
    /// Which copy of a sample is masked (0: source, 1: target of a pair), so the two sides of a
    /// pair get independent masks.
    pub side: u32,
}

impl MaskKey {
    /// The key of batch `step` in a run seeded by `seed`, side 0, first row global sample 0.
    pub fn new(seed: u64, step: u64) -> Self {
        Self {
            seed,
            step,
            sample_offset: 0,
            side: 0,
        }
    }

    /// The same key for a batch (or shard) whose first row is global sample `offset`.
    pub fn with_sample_offset(self, offset: u64) -> Self {
        Self {
            sample_offset: offset,
            ..self
        }
    }

    /// The same key for another side of the samples.
    pub fn with_side(self, side: u32) -> Self {
        Self { side, ..self }
    }
}

/// BERT's masking recipe: each real (non-special, non-padding) token is selected with
/// probability `prob`; a selected token becomes the mask token with probability 0.8, a uniformly
/// random vocabulary id with probability 0.1, and stays itself otherwise. Padding is never
/// selected.
///
/// The draws of a token are four Philox words of its own, a pure function of the [`MaskKey`],
/// the row's global sample index and the token's position: the masks of a sample do not depend
/// on the other rows of the batch, on its padding, nor on which process masks it.
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

    /// Draws a masked copy of `batch` under `key`: row `r` is global sample
    /// `key.sample_offset + r`.
    pub fn mask(&self, batch: &TokenBatch, key: MaskKey, device: &Device) -> Result<MaskedTokens> {
        let ids = batch.input_ids.to_vec2::<u32>()?;
        let attention = batch.attention_mask.to_vec2::<u32>()?;
        let seq_len = ids.first().map_or(0, Vec::len);
        let mut corrupted = Vec::with_capacity(ids.len() * seq_len);
        let (mut positions, mut targets) = (Vec::new(), Vec::new());
        for (row, (ids, attention)) in ids.iter().zip(&attention).enumerate() {
            let sample = key.sample_offset.wrapping_add(row as u64);
            for (col, (&id, &attended)) in ids.iter().zip(attention).enumerate() {
                let eligible = attended != 0 && !self.special_ids.contains(&id);
                let drawn = if eligible {
                    self.draw(key, sample, col)
                } else {
                    None
                };
                corrupted.push(match drawn {
                    Some(out) => {
                        positions.push((row * seq_len + col) as u32);
                        targets.push(id);
                        out.unwrap_or(id)
                    }
                    None => id,
                });
            }
        }
        let n = positions.len();
        Ok(MaskedTokens {
            input_ids: Tensor::from_vec(corrupted, (ids.len(), seq_len), device)?,
            positions: Tensor::from_vec(positions, n, device)?,
            targets: Tensor::from_vec(targets, n, device)?,
        })
    }

    /// The draw of the eligible token at position `col` of global sample `sample`: `None` when
    /// it is not selected, else its replacement (`Some(None)`: it stays itself). Word 0 selects,
    /// word 1 chooses among mask / random / keep, words 2 and 3 give the random id (a 64-bit
    /// fraction of the vocabulary size, uniform up to `vocab / 2^64`).
    fn draw(&self, key: MaskKey, sample: u64, col: usize) -> Option<Option<u32>> {
        let stream = MASK_STREAM.wrapping_add(key.side);
        let words = sample_words(key.seed, key.step, sample, stream, col as u32);
        if u64::from(words[0]) >= threshold(self.prob) {
            return None;
        }
        let roll = u64::from(words[1]);
        Some(if roll < threshold(0.8) {
            Some(self.mask_token_id)
        } else if roll < threshold(0.9) {
            let fraction = u128::from(words[2]) << 32 | u128::from(words[3]);
            Some(((fraction * u128::from(self.vocab_size)) >> 64) as u32)
        } else {
            None
        })
    }
}
