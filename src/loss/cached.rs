//! Large contrastive batches in the memory of small ones: [`CachedLoss`], GradCache (Gao et
//! al., 2021) for [`MultiLevelLoss`], as sentence-transformers'
//! `CachedMultipleNegativesRankingLoss` does it for InfoNCE.
//!
//! 1. Embed every mini-batch, keeping only the embeddings (no graph survives a chunk).
//! 2. Compute the contrastive terms on the whole batch and their gradients with respect to the
//!    embeddings (cheap: the embeddings are `[B, 2H]`).
//! 3. Embed every mini-batch again, this time with the graph and the same dropout masks, and
//!    back-propagate `Σ embedding ⊙ cached gradient` through the encoder, together with the
//!    chunk's share of the MLM term.
//!
//! The gradients are those of the uncached loss (up to floating-point rounding) at the cost of
//! a second forward pass of the contrastive side. The MLM term needs no caching: it is a sum
//! over masked tokens, computed chunk by chunk from masks drawn once for the whole batch and
//! normalised by the whole batch's masked-token count.

use std::collections::BTreeMap;

use candle_core::{DType, Tensor, Var};

use super::masked_lm_loss;
use super::multi_level::{pass_key, MaskedPair, MultiLevelLoss, Pass, RankShard};
use crate::data::{MaskedTokens, PairBatch};
use crate::encoder::DropoutRng;
use crate::model::{MlCtlModel, SideEmbeddings};
use crate::ops::DropoutKey;
use crate::tokenize::TokenBatch;
use crate::{Error, Result};

/// The values of a [`CachedLoss`] evaluation (f32, for logging) and the parameter gradients.
#[derive(Debug, Clone)]
pub struct CachedStep {
    /// Total loss, as [`LossTerms::total`](super::LossTerms::total) would give it for the whole
    /// batch.
    pub total: f32,
    /// Sentence-level term.
    pub sentence: Option<f32>,
    /// Word-level term.
    pub word: Option<f32>,
    /// MLM term (unweighted).
    pub mlm: Option<f32>,
    /// Gradient of the total loss for each variable that received one, by the name it was
    /// given in.
    pub grads: BTreeMap<String, Tensor>,
}

/// [`MultiLevelLoss`] evaluated in mini-batches of `mini_batch` pairs with cached embedding
/// gradients (GradCache): the gradients of a batch of any size in the memory of a mini-batch.
#[derive(Debug, Clone)]
pub struct CachedLoss {
    /// The objective.
    pub objective: MultiLevelLoss,
    /// Pairs per encoder pass.
    pub mini_batch: usize,
    /// Multiplies the loss before every backward pass ([`CachedLoss::with_loss_scale`]).
    loss_scale: f64,
}

/// The whole batch's loss gradients with respect to the embeddings (step 2's result).
struct EmbeddingGrads {
    q: Tensor,
    k: Tensor,
    words: Option<(Tensor, Tensor)>,
}

/// Embeddings of one side of one chunk that step 2 differentiates.
struct Cached {
    projected: Var,
    word: Option<Var>,
}

impl CachedLoss {
    /// Caches `objective` in mini-batches of `mini_batch` pairs.
    pub fn new(objective: MultiLevelLoss, mini_batch: usize) -> Result<Self> {
        if mini_batch == 0 {
            return Err(Error::InvalidArgument(
                "the mini-batch size must be at least 1".into(),
            ));
        }
        Ok(Self {
            objective,
            mini_batch,
            loss_scale: 1.0,
        })
    }

    /// Differentiates `scale` times the loss (a [`LossScaler`](crate::train::LossScaler)'s
    /// scale, for f16): the returned gradients are scaled by it, the reported loss values are
    /// not.
    pub fn with_loss_scale(self, scale: f64) -> Self {
        Self {
            loss_scale: scale,
            ..self
        }
    }

    /// Evaluates the objective on `batch` and returns its value and the gradients of `vars`.
    ///
    /// `masked` (required when the MLM term is on) holds masked copies of the whole batch, drawn
    /// once; each chunk uses its rows. With a dropout `key` (training), every pass over a chunk
    /// starting at row `r` uses [`pass_key`]`(key, pass)` advanced by `r`: both passes over a
    /// chunk draw the same masks, and they are the masks [`MultiLevelLoss::forward_keyed`] draws
    /// for the whole batch. `None` evaluates without dropout.
    pub fn forward_backward(
        &self,
        model: &MlCtlModel,
        batch: &PairBatch,
        masked: Option<&MaskedPair>,
        vars: &[(String, Var)],
        key: Option<DropoutKey>,
    ) -> Result<CachedStep> {
        let rng = model.bert.model.encoder.dropout_rng().clone();
        // A key the caller had set is restored afterwards.
        let previous = rng.key();
        let result = self.run(model, batch, masked, vars, key, &rng, None);
        rng.set_key(previous);
        result
    }

    /// This rank's part of a data-parallel evaluation of a global batch, chunk by chunk:
    /// [`CachedLoss::forward_backward`] on the shard `batch` (with `masked`, its rows' masked
    /// copies) as [`MultiLevelLoss::forward_rank`] evaluates it. The contrastive terms are
    /// computed on every rank's embeddings (all-gathered after step 1, without graph), and this
    /// rank back-propagates the rows of their gradient that are its own; the MLM sums are
    /// divided by the global batch's masked-token counts. Summed over the ranks, the gradients
    /// are those of the whole global batch. The dropout `key` is taken at the shard's
    /// `sample_offset` (its own offset is ignored), so chunk `r` of the shard draws the masks
    /// of its rows in the global batch.
    ///
    /// `total`, `sentence`, `word` and `mlm` are reported as by
    /// [`MultiLevelLoss::forward_rank`]: the contrastive terms are the global batch's, `mlm`
    /// is this rank's part. Every rank must make this call, with shards of equal size.
    pub fn forward_backward_rank(
        &self,
        model: &MlCtlModel,
        batch: &PairBatch,
        masked: Option<&MaskedPair>,
        vars: &[(String, Var)],
        key: Option<DropoutKey>,
        shard: &RankShard<'_>,
    ) -> Result<CachedStep> {
        let key = key.map(|k| k.with_sample_offset(shard.sample_offset));
        let rng = model.bert.model.encoder.dropout_rng().clone();
        // A key the caller had set is restored afterwards.
        let previous = rng.key();
        let result = self.run(model, batch, masked, vars, key, &rng, Some(shard));
        rng.set_key(previous);
        result
    }

    #[allow(clippy::too_many_arguments)]
    fn run(
        &self,
        model: &MlCtlModel,
        batch: &PairBatch,
        masked: Option<&MaskedPair>,
        vars: &[(String, Var)],
        key: Option<DropoutKey>,
        rng: &DropoutRng,
        shard: Option<&RankShard<'_>>,
    ) -> Result<CachedStep> {
        let train = key.is_some();
        let before_pass = |pass: Pass, start: usize| {
            if let Some(key) = key {
                rng.set_key(Some(pass_key(key, pass).advanced(start as u64)));
            }
        };
        let n = batch.len();
        if n == 0 {
            return Err(Error::InvalidArgument("an empty batch has no loss".into()));
        }
        let chunks: Vec<(usize, usize)> = (0..n)
            .step_by(self.mini_batch)
            .map(|start| (start, self.mini_batch.min(n - start)))
            .collect();
        let contrastive = self.objective.sentence.is_some() || self.objective.word.is_some();
        let mut grads: BTreeMap<String, Tensor> = BTreeMap::new();
        let mut add_grads = |store: &candle_core::backprop::GradStore| -> Result<()> {
            for (name, var) in vars {
                if let Some(g) = store.get(var) {
                    let g = match grads.remove(name) {
                        Some(acc) => (acc + g)?,
                        None => g.clone(),
                    };
                    grads.insert(name.clone(), g);
                }
            }
            Ok(())
        };

        // Steps 1 and 2: embeddings without graph, the contrastive terms on the whole batch.
        let (mut sentence, mut word) = (None, None);
        let mut total = 0f32;
        let mut cached_grads: Option<EmbeddingGrads> = None;
        if contrastive {
            let (mut src, mut tgt) = (Vec::new(), Vec::new());
            for &(start, len) in &chunks {
                let chunk = pair_rows(batch, start, len)?;
                before_pass(Pass::Source, start);
                src.push(detached(model.embed(
                    &chunk.src,
                    chunk.src_spans().as_deref(),
                    train,
                )?)?);
                before_pass(Pass::Target, start);
                tgt.push(detached(model.embed(
                    &chunk.tgt,
                    chunk.tgt_spans().as_deref(),
                    train,
                )?)?);
            }
            // Over a shard: every rank's rows, of which this rank differentiates its own.
            let all = |t: Tensor| -> Result<Var> {
                Ok(Var::from_tensor(&match shard {
                    Some(s) => s.collective.all_gather(&t)?,
                    None => t,
                })?)
            };
            let on_rank = |loss: &super::CzNce| -> Result<super::CzNce> {
                match shard {
                    Some(s) => s.per_rank(loss),
                    None => Ok(loss.clone()),
                }
            };
            let q = all(cat(src.iter().map(|s| s.projected.as_tensor()))?)?;
            let k = all(cat(tgt.iter().map(|s| s.projected.as_tensor()))?)?;
            let words = match (
                src.iter()
                    .map(|s| s.word.as_ref())
                    .collect::<Option<Vec<_>>>(),
                tgt.iter()
                    .map(|s| s.word.as_ref())
                    .collect::<Option<Vec<_>>>(),
            ) {
                (Some(sw), Some(tw)) if self.objective.word.is_some() => Some((
                    all(cat(sw.iter().map(|v| v.as_tensor()))?)?,
                    all(cat(tw.iter().map(|v| v.as_tensor()))?)?,
                )),
                _ => None,
            };
            let mut loss: Option<Tensor> = None;
            if let Some(l) = &self.objective.sentence {
                let value = on_rank(l)?.forward(q.as_tensor(), k.as_tensor())?;
                sentence = Some(scalar(&value)?);
                loss = Some(value);
            }
            if let Some(l) = &self.objective.word {
                let Some((wq, wk)) = &words else {
                    return Err(Error::InvalidArgument(
                        "the word-level term needs anchor spans in the batch".into(),
                    ));
                };
                let value = on_rank(l)?.forward(wq.as_tensor(), wk.as_tensor())?;
                word = Some(scalar(&value)?);
                loss = Some(match loss {
                    Some(s) => (s + value)?,
                    None => value,
                });
            }
            let loss = loss.expect("a contrastive term is on");
            total += scalar(&loss)?;
            let store = match self.loss_scale {
                1.0 => loss.backward()?,
                scale => (loss.to_dtype(candle_core::DType::F32)? * scale)?.backward()?,
            };
            // The loss's own parameters (a learnable temperature) get their gradient here.
            add_grads(&store)?;
            // This rank's rows of the gathered embeddings' gradient.
            let rows = shard.map(|s| (s.collective.rank() * n, n));
            let grad_of = |v: &Var| -> Result<Tensor> {
                let g = match store.get(v) {
                    Some(g) => g.clone(),
                    None => v.as_tensor().zeros_like()?,
                };
                Ok(match rows {
                    Some((start, len)) => g.narrow(0, start, len)?,
                    None => g,
                })
            };
            cached_grads = Some(EmbeddingGrads {
                q: grad_of(&q)?,
                k: grad_of(&k)?,
                words: match &words {
                    Some((wq, wk)) => Some((grad_of(wq)?, grad_of(wk)?)),
                    None => None,
                },
            });
        }

        // Step 3: each chunk again with its graph; its share of the MLM term rides along.
        let mlm_counts = match (self.objective.mlm_weight, masked) {
            (Some(_), Some(m)) => Some(match shard {
                Some(s) => s.global_masked,
                None => (m.src.len(), m.tgt.len()),
            }),
            (Some(_), None) => {
                return Err(Error::InvalidArgument(
                    "the MLM term needs masked copies of the batch".into(),
                ))
            }
            (None, _) => None,
        };
        let mut mlm_sum = 0f32;
        for &(start, len) in &chunks {
            let chunk = pair_rows(batch, start, len)?;
            let mut surrogate: Option<Tensor> = None;
            let mut add = |t: Tensor| -> Result<()> {
                surrogate = Some(match surrogate.take() {
                    Some(s) => (s + t)?,
                    None => t,
                });
                Ok(())
            };
            if let Some(EmbeddingGrads {
                q: dq,
                k: dk,
                words: dw,
            }) = &cached_grads
            {
                before_pass(Pass::Source, start);
                let src = model.embed(&chunk.src, chunk.src_spans().as_deref(), train)?;
                before_pass(Pass::Target, start);
                let tgt = model.embed(&chunk.tgt, chunk.tgt_spans().as_deref(), train)?;
                add(dot(&src.projected, &dq.narrow(0, start, len)?)?)?;
                add(dot(&tgt.projected, &dk.narrow(0, start, len)?)?)?;
                if let (Some((dwq, dwk)), Some(sw), Some(tw)) = (dw, &src.word, &tgt.word) {
                    add(dot(sw, &dwq.narrow(0, start, len)?)?)?;
                    add(dot(tw, &dwk.narrow(0, start, len)?)?)?;
                }
            }
            if let (Some(weight), Some(masked), Some((n_src, n_tgt))) =
                (self.objective.mlm_weight, masked, mlm_counts)
            {
                let mut term: Option<Tensor> = None;
                for (tokens, side, n_side, pass) in [
                    (&chunk.src, &masked.src, n_src, Pass::MaskedSource),
                    (&chunk.tgt, &masked.tgt, n_tgt, Pass::MaskedTarget),
                ] {
                    let part = masked_rows(side, &tokens.input_ids, start, len)?;
                    if part.is_empty() || n_side == 0 {
                        continue;
                    }
                    before_pass(pass, start);
                    // mean over the chunk's tokens × their share = sum / whole-batch count (the
                    // global batch's, over a shard).
                    let share = part.len() as f64 / n_side as f64 / 2.0;
                    let out = model.bert.model.encoder.forward_t(
                        &part.input_ids,
                        Some(&tokens.token_type_ids),
                        Some(&tokens.attention_mask),
                        train,
                    )?;
                    let side_loss = (masked_lm_loss(
                        &model.bert.model.mlm_head,
                        &out.last_hidden_state,
                        &part,
                    )? * share)?;
                    term = Some(match term {
                        Some(t) => (t + side_loss)?,
                        None => side_loss,
                    });
                }
                if let Some(term) = term {
                    mlm_sum += scalar(&term)?;
                    add((term * (weight * self.loss_scale))?)?;
                }
            }
            if let Some(s) = surrogate {
                add_grads(&s.backward()?)?;
            }
        }
        let mlm = self.objective.mlm_weight.map(|_| mlm_sum);
        if let (Some(weight), Some(m)) = (self.objective.mlm_weight, mlm) {
            total += weight as f32 * m;
        }
        if !contrastive && mlm.is_none() {
            return Err(Error::InvalidArgument(
                "every term of the objective is off".into(),
            ));
        }
        Ok(CachedStep {
            total,
            sentence,
            word,
            mlm,
            grads,
        })
    }
}

/// The value of a scalar tensor as f32.
fn scalar(t: &Tensor) -> Result<f32> {
    Ok(t.to_dtype(DType::F32)?.to_scalar::<f32>()?)
}

/// `Σ a ⊙ b` (products in the dtype of `a`, the scalar in f32 so that it adds to the f32 MLM
/// term of a half-precision model), whose backward sends `b` to `a`.
fn dot(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    Ok((a * b.to_dtype(a.dtype())?)?
        .sum_all()?
        .to_dtype(DType::F32)?)
}

fn cat<'a>(parts: impl Iterator<Item = &'a Tensor>) -> Result<Tensor> {
    let parts: Vec<&Tensor> = parts.collect();
    Ok(Tensor::cat(&parts, 0)?)
}

/// Drops the graph behind a side's embeddings, keeping the values.
fn detached(side: SideEmbeddings) -> Result<Cached> {
    Ok(Cached {
        projected: Var::from_tensor(&side.projected.detach())?,
        word: side
            .word
            .map(|w| Var::from_tensor(&w.detach()))
            .transpose()?,
    })
}

/// Rows `start..start + len` of a token batch.
fn token_rows(tokens: &TokenBatch, start: usize, len: usize) -> Result<TokenBatch> {
    Ok(TokenBatch {
        input_ids: tokens.input_ids.narrow(0, start, len)?,
        token_type_ids: tokens.token_type_ids.narrow(0, start, len)?,
        attention_mask: tokens.attention_mask.narrow(0, start, len)?,
        offsets: tokens.offsets[start..start + len].to_vec(),
        word_ids: tokens.word_ids[start..start + len].to_vec(),
        lengths: tokens.lengths[start..start + len].to_vec(),
        special_tokens_mask: tokens.special_tokens_mask[start..start + len].to_vec(),
    })
}

/// Rows `start..start + len` of a pair batch.
pub(crate) fn pair_rows(batch: &PairBatch, start: usize, len: usize) -> Result<PairBatch> {
    Ok(PairBatch {
        src: token_rows(&batch.src, start, len)?,
        tgt: token_rows(&batch.tgt, start, len)?,
        anchors: batch
            .anchors
            .as_ref()
            .map(|a| a[start..start + len].to_vec()),
    })
}

/// The masked tokens of rows `start..start + len`, with positions relative to those rows.
/// `ids` gives the batch's sequence length.
pub(crate) fn masked_rows(
    masked: &MaskedTokens,
    ids: &Tensor,
    start: usize,
    len: usize,
) -> Result<MaskedTokens> {
    let (_, seq_len) = ids.dims2()?;
    let device = masked.input_ids.device();
    let input_ids = masked.input_ids.narrow(0, start, len)?;
    let (lo, hi) = ((start * seq_len) as u32, ((start + len) * seq_len) as u32);
    let (positions, targets): (Vec<u32>, Vec<u32>) = if masked.is_empty() {
        (Vec::new(), Vec::new())
    } else {
        let positions: Vec<u32> = masked.positions.to_dtype(DType::U32)?.to_vec1()?;
        let targets: Vec<u32> = masked.targets.to_dtype(DType::U32)?.to_vec1()?;
        positions
            .into_iter()
            .zip(targets)
            .filter(|(p, _)| (lo..hi).contains(p))
            .map(|(p, t)| (p - lo, t))
            .unzip()
    };
    let n = positions.len();
    Ok(MaskedTokens {
        input_ids,
        positions: Tensor::from_vec(positions, n, device)?.to_dtype(masked.positions.dtype())?,
        targets: Tensor::from_vec(targets, n, device)?.to_dtype(masked.targets.dtype())?,
    })
}
