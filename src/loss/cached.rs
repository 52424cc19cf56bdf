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

use super::grads::accumulate_gradients;
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
    /// given in; summed over the chunks in f32 for f16 and bf16 variables.
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

impl CachedStep {
    /// The loss values, as [`LossTerms::values`](super::LossTerms::values) reports them.
    pub fn terms(&self) -> super::LossTerms<f32> {
        super::LossTerms {
            total: self.total,
            sentence: self.sentence,
            word: self.word,
            mlm: self.mlm,
        }
    }
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
    /// starting at row `r` uses that pass's key (`key` with a stream of its own per pass)
    /// advanced by `r`: both passes over a chunk draw the same masks, and they are the masks
    /// [`MultiLevelLoss::forward_keyed`] draws for the whole batch. `None` evaluates without
    /// dropout.
    pub fn forward_backward(
        &self,
        model: &MlCtlModel,
        batch: &PairBatch,
        masked: Option<&MaskedPair>,
        vars: &[(String, Var)],
        key: Option<DropoutKey>,
    ) -> Result<CachedStep> {
        self.run_restoring_key(model, batch, masked, vars, key, None)
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
        self.run_restoring_key(model, batch, masked, vars, key, Some(shard))
    }

    /// [`CachedLoss::run`] with the encoder's dropout key restored afterwards (a key the
    /// caller had set).
    fn run_restoring_key(
        &self,
        model: &MlCtlModel,
        batch: &PairBatch,
        masked: Option<&MaskedPair>,
        vars: &[(String, Var)],
        key: Option<DropoutKey>,
        shard: Option<&RankShard<'_>>,
    ) -> Result<CachedStep> {
        let rng = model.encoder().dropout_rng().clone();
        let previous = rng.key();
        let mut run = Run {
            model,
            batch,
            masked,
            vars,
            key,
            rng: &rng,
            shard,
            mini_batch: self.mini_batch,
            grads: BTreeMap::new(),
        };
        let result = self.run(&mut run);
        rng.set_key(previous);
        result
    }

    /// The three steps of the module docs.
    fn run(&self, run: &mut Run<'_>) -> Result<CachedStep> {
        if run.batch.is_empty() {
            return Err(Error::InvalidArgument("an empty batch has no loss".into()));
        }
        let contrastive = self.objective.sentence.is_some() || self.objective.word.is_some();
        let mlm_counts = self.mlm_counts(run)?;
        if !contrastive && mlm_counts.is_none() {
            return Err(Error::InvalidArgument(
                "every term of the objective is off".into(),
            ));
        }
        // Steps 1 and 2: embeddings without graph, the contrastive terms on the whole batch.
        let mut values = Values::default();
        let cached = match contrastive {
            true => {
                let (src, tgt) = run.embed_detached()?;
                Some(self.contrastive_grads(run, &src, &tgt, &mut values)?)
            }
            false => None,
        };
        // Step 3: each chunk again with its graph; its share of the MLM term rides along.
        let mut mlm_sum = 0f32;
        for (start, len) in run.chunks() {
            mlm_sum += self.chunk_backward(run, (start, len), cached.as_ref(), mlm_counts)?;
        }
        run.take_encoder_grads()?;
        let mlm = self.objective.mlm_weight.map(|_| mlm_sum);
        if let (Some(weight), Some(m)) = (self.objective.mlm_weight, mlm) {
            values.total += weight as f32 * m;
        }
        Ok(CachedStep {
            total: values.total,
            sentence: values.sentence,
            word: values.word,
            mlm,
            grads: std::mem::take(&mut run.grads),
        })
    }

    /// The masked-token counts the MLM sums are divided by (the global batch's, over a
    /// shard); `None` when the term is off.
    fn mlm_counts(&self, run: &Run<'_>) -> Result<Option<(usize, usize)>> {
        match (self.objective.mlm_weight, run.masked) {
            (Some(_), Some(m)) => Ok(Some(match run.shard {
                Some(s) => s.global_masked,
                None => (m.src.len(), m.tgt.len()),
            })),
            (Some(_), None) => Err(Error::InvalidArgument(
                "the MLM term needs masked copies of the batch".into(),
            )),
            (None, _) => Ok(None),
        }
    }

    /// Step 2: the contrastive terms on the whole batch (every rank's rows, over a shard) from
    /// the detached embeddings, their values into `values`, the gradients of the loss's own
    /// parameters into `run`; returns the gradient of each of this rank's embeddings.
    fn contrastive_grads(
        &self,
        run: &mut Run<'_>,
        src: &[Cached],
        tgt: &[Cached],
        values: &mut Values,
    ) -> Result<EmbeddingGrads> {
        let q = run.gathered(src.iter().map(|s| s.projected.as_tensor()))?;
        let k = run.gathered(tgt.iter().map(|s| s.projected.as_tensor()))?;
        let words = match (words_of(src), words_of(tgt)) {
            (Some(sw), Some(tw)) if self.objective.word.is_some() => {
                Some((run.gathered(sw.into_iter())?, run.gathered(tw.into_iter())?))
            }
            _ => None,
        };
        let mut loss: Option<Tensor> = None;
        if let Some(l) = &self.objective.sentence {
            let value = run.term(l, &q, &k)?;
            values.sentence = Some(run.summed_over_ranks(&value)?);
            loss = Some(value);
        }
        if let Some(l) = &self.objective.word {
            let Some((wq, wk)) = &words else {
                return Err(Error::InvalidArgument(
                    "the word-level term needs anchor spans in the batch".into(),
                ));
            };
            let value = run.term(l, wq, wk)?;
            values.word = Some(run.summed_over_ranks(&value)?);
            let value = self.objective.weighted_word(&value)?;
            loss = Some(match loss {
                Some(s) => (s + value)?,
                None => value,
            });
        }
        let loss = loss.ok_or_else(|| Error::InvalidArgument("no contrastive term".into()))?;
        values.total += match run.shard {
            None => scalar(&loss)?,
            Some(_) => {
                let word = self.objective.word_weight as f32 * values.word.unwrap_or(0.0);
                values.sentence.unwrap_or(0.0) + word
            }
        };
        let store = match self.loss_scale {
            1.0 => loss.backward()?,
            scale => (loss.to_dtype(DType::F32)? * scale)?.backward()?,
        };
        // The loss's own parameters (a learnable temperature) get their gradient here.
        run.add_grads(&store)?;
        let grad_of = |v: &Var| run.own_rows_of_grad(&store, v);
        Ok(EmbeddingGrads {
            q: grad_of(&q)?,
            k: grad_of(&k)?,
            words: match &words {
                Some((wq, wk)) => Some((grad_of(wq)?, grad_of(wk)?)),
                None => None,
            },
        })
    }

    /// Step 3 for the chunk of rows `start..start + len`: its embeddings again, with graph,
    /// dotted with their cached gradients, plus its share of the MLM term; back-propagates
    /// their sum into `run` and returns the chunk's (unweighted) MLM share.
    fn chunk_backward(
        &self,
        run: &mut Run<'_>,
        (start, len): (usize, usize),
        cached: Option<&EmbeddingGrads>,
        mlm_counts: Option<(usize, usize)>,
    ) -> Result<f32> {
        let chunk = pair_rows(run.batch, start, len)?;
        let mut surrogate = Sum::default();
        if let Some(EmbeddingGrads { q, k, words }) = cached {
            let (src, tgt) = run.embed(&chunk, start)?;
            surrogate.add(dot(&src.projected, &q.narrow(0, start, len)?)?)?;
            surrogate.add(dot(&tgt.projected, &k.narrow(0, start, len)?)?)?;
            if let (Some((dwq, dwk)), Some(sw), Some(tw)) = (words, &src.word, &tgt.word) {
                surrogate.add(dot(sw, &dwq.narrow(0, start, len)?)?)?;
                surrogate.add(dot(tw, &dwk.narrow(0, start, len)?)?)?;
            }
        }
        let mut mlm = 0f32;
        if let (Some(weight), Some(counts)) = (self.objective.mlm_weight, mlm_counts) {
            if let Some(term) = run.mlm_share(&chunk, (start, len), counts)? {
                mlm = scalar(&term)?;
                surrogate.add((term * (weight * self.loss_scale))?)?;
            }
        }
        if let Some(s) = surrogate.0 {
            run.add_grads(&s.backward()?)?;
        }
        Ok(mlm)
    }
}

/// The reported values of the contrastive terms (step 2) and the running total.
#[derive(Default)]
struct Values {
    total: f32,
    sentence: Option<f32>,
    word: Option<f32>,
}

/// A sum of tensors, empty until the first one.
#[derive(Default)]
struct Sum(Option<Tensor>);

impl Sum {
    fn add(&mut self, t: Tensor) -> Result<()> {
        self.0 = Some(match self.0.take() {
            Some(s) => (s + t)?,
            None => t,
        });
        Ok(())
    }
}

/// One evaluation's inputs and the gradients it has summed so far.
struct Run<'a> {
    model: &'a MlCtlModel,
    batch: &'a PairBatch,
    masked: Option<&'a MaskedPair>,
    vars: &'a [(String, Var)],
    key: Option<DropoutKey>,
    rng: &'a DropoutRng,
    shard: Option<&'a RankShard<'a>>,
    mini_batch: usize,
    grads: BTreeMap<String, Tensor>,
}

impl Run<'_> {
    fn train(&self) -> bool {
        self.key.is_some()
    }

    /// The chunks of the batch: `(start row, rows)`.
    fn chunks(&self) -> Vec<(usize, usize)> {
        let n = self.batch.len();
        (0..n)
            .step_by(self.mini_batch)
            .map(|start| (start, self.mini_batch.min(n - start)))
            .collect()
    }

    /// Sets the dropout key of `pass` over the chunk starting at row `start`.
    fn before_pass(&self, pass: Pass, start: usize) {
        if let Some(key) = self.key {
            self.rng
                .set_key(Some(pass_key(key, pass).advanced(start as u64)));
        }
    }

    /// Adds the gradients of the variables in `store` to those summed so far.
    /// With the explicit encoder backward, the recorded passes are differentiated here and
    /// their sums handed over at the end of the evaluation ([`Run::take_encoder_grads`]).
    fn add_grads(&mut self, store: &candle_core::backprop::GradStore) -> Result<()> {
        accumulate_gradients(&mut self.grads, store, self.vars)?;
        self.model.encoder().backward_recorded(store)
    }

    /// Moves the explicit backward's encoder gradients into the evaluation's sums.
    fn take_encoder_grads(&mut self) -> Result<()> {
        self.model
            .encoder()
            .take_gradients(self.vars, &mut self.grads)
    }

    /// Both sides of `chunk` (rows from `start`), with graph.
    fn embed(&self, chunk: &PairBatch, start: usize) -> Result<(SideEmbeddings, SideEmbeddings)> {
        self.before_pass(Pass::Source, start);
        let src = self
            .model
            .embed(&chunk.src, chunk.src_spans().as_deref(), self.train())?;
        self.before_pass(Pass::Target, start);
        let tgt = self
            .model
            .embed(&chunk.tgt, chunk.tgt_spans().as_deref(), self.train())?;
        Ok((src, tgt))
    }

    /// Step 1: every chunk's embeddings of both sides, without graph.
    fn embed_detached(&self) -> Result<(Vec<Cached>, Vec<Cached>)> {
        let (mut src, mut tgt) = (Vec::new(), Vec::new());
        for (start, len) in self.chunks() {
            let (s, t) = self.embed(&pair_rows(self.batch, start, len)?, start)?;
            // Only values are kept: a recorded explicit pass would hold the chunk's activations.
            self.model.encoder().discard_recorded();
            src.push(detached(s)?);
            tgt.push(detached(t)?);
        }
        Ok((src, tgt))
    }

    /// The chunks' embeddings as one leaf variable: every rank's rows over a shard (of which
    /// this rank differentiates its own).
    fn gathered<'t>(&self, parts: impl Iterator<Item = &'t Tensor>) -> Result<Var> {
        let t = cat(parts)?;
        Ok(Var::from_tensor(&match self.shard {
            Some(s) => s.collective.all_gather(&t)?,
            None => t,
        })?)
    }

    /// `loss` on the embeddings `q` and `k`: the whole batch's in one process; over a shard,
    /// where they hold every rank's rows, only this rank's rows of the loss (its part, of
    /// which the sum over the ranks is the global batch's loss): `[n, W·n]` logits per rank
    /// instead of `[W·n, W·n]` (the fused band of rows on the CPU).
    fn term(&self, loss: &super::CzNce, q: &Var, k: &Var) -> Result<Tensor> {
        let (q, k) = (q.as_tensor(), k.as_tensor());
        match self.shard {
            // One rank is the whole batch: the fused op, as without a collective.
            Some(s) if s.collective.world_size() > 1 => {
                let (rank, n) = (s.collective.rank(), self.batch.len());
                loss.forward_rows(q, k, rank * n..(rank + 1) * n)
            }
            _ => loss.forward(q, k),
        }
    }

    /// The value of a term: over a shard, the sum of every rank's part.
    fn summed_over_ranks(&self, value: &Tensor) -> Result<f32> {
        match self.shard {
            Some(s) => {
                let part = value.to_dtype(DType::F32)?.reshape(1)?;
                Ok(s.collective.all_reduce_sum(&part)?.to_vec1::<f32>()?[0])
            }
            None => scalar(value),
        }
    }

    /// This rank's rows of the gradient of `v` (zeros when it got none): over a shard, of
    /// the sum of every rank's gradient, since each rank's rows of the loss reach every row
    /// of the gathered embeddings.
    fn own_rows_of_grad(
        &self,
        store: &candle_core::backprop::GradStore,
        v: &Var,
    ) -> Result<Tensor> {
        let g = match store.get(v) {
            Some(g) => g.clone(),
            None => v.as_tensor().zeros_like()?,
        };
        let n = self.batch.len();
        Ok(match self.shard {
            Some(s) => {
                let g = s.collective.all_reduce_sum(&g.contiguous()?)?;
                g.narrow(0, s.collective.rank() * n, n)?
            }
            None => g,
        })
    }

    /// The chunk's share of the MLM term: per side, the mean over its masked tokens times
    /// their share of the whole batch's `counts` (the global batch's, over a shard), that is
    /// their sum divided by the whole-batch count; `None` when the chunk has no masked token.
    fn mlm_share(
        &self,
        chunk: &PairBatch,
        (start, len): (usize, usize),
        (n_src, n_tgt): (usize, usize),
    ) -> Result<Option<Tensor>> {
        let masked = self
            .masked
            .ok_or_else(|| Error::InvalidArgument("the MLM term needs masked copies".into()))?;
        let mut term = Sum::default();
        for (tokens, side, n_side, pass) in [
            (&chunk.src, &masked.src, n_src, Pass::MaskedSource),
            (&chunk.tgt, &masked.tgt, n_tgt, Pass::MaskedTarget),
        ] {
            let part = masked_rows(side, &tokens.input_ids, start, len)?;
            if part.is_empty() || n_side == 0 {
                continue;
            }
            self.before_pass(pass, start);
            let share = part.len() as f64 / n_side as f64 / 2.0;
            let bert = &self.model.bert.model;
            let out = bert.encoder.forward_t(
                &part.input_ids,
                Some(&tokens.token_type_ids),
                Some(&tokens.attention_mask),
                self.train(),
            )?;
            let side_loss = masked_lm_loss(&bert.mlm_head, &out.last_hidden_state, &part)?;
            term.add((side_loss * share)?)?;
        }
        Ok(term.0)
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

/// The anchor-word embeddings of every chunk of a side, if every chunk has them.
fn words_of(side: &[Cached]) -> Option<Vec<&Tensor>> {
    side.iter()
        .map(|s| s.word.as_ref().map(Var::as_tensor))
        .collect()
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
