//! ML-CTL's multi-level objective: sentence-level contrast on `concat(sentence, word)`
//! projections, an optional word-level contrast, and the auxiliary MLM loss.

use candle_core::Tensor;

use super::cz_nce::Temperature;
use super::{masked_lm_loss, CzNce};
use crate::data::{MaskKey, MaskedTokens, MlmMasking, PairBatch};
use crate::dist::{gather_with_local_grad, Collective};
use crate::model::MlCtlModel;
use crate::ops::DropoutKey;
use crate::tokenize::TokenBatch;
use crate::{Error, Result};

/// The terms of one evaluation of [`MultiLevelLoss`], each reported separately: tensors to
/// differentiate (`LossTerms<Tensor>`, the default) or their values (`LossTerms<f32>`, see
/// [`LossTerms::values`]).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LossTerms<T = Tensor> {
    /// `sentence + word_weight * word + mlm_weight * mlm`, the tensor to differentiate.
    pub total: T,
    /// Sentence-level contrastive loss (on the projections).
    pub sentence: Option<T>,
    /// Word-level contrastive loss (on the anchor-word embeddings), unweighted.
    pub word: Option<T>,
    /// MLM loss, the mean over the source and target masked copies (unweighted).
    pub mlm: Option<T>,
}

impl LossTerms<Tensor> {
    /// The terms' values, in f32.
    pub fn values(&self) -> Result<LossTerms<f32>> {
        let value = |t: &Tensor| -> Result<f32> {
            Ok(t.to_dtype(candle_core::DType::F32)?.to_scalar::<f32>()?)
        };
        Ok(LossTerms {
            total: value(&self.total)?,
            sentence: self.sentence.as_ref().map(value).transpose()?,
            word: self.word.as_ref().map(value).transpose()?,
            mlm: self.mlm.as_ref().map(value).transpose()?,
        })
    }
}

impl LossTerms<f32> {
    /// Adds `other / n` term by term (a term absent here starts from 0): the mean over `n`
    /// evaluations, summed one at a time.
    pub fn add_mean(&mut self, other: &LossTerms<f32>, n: usize) {
        let n = n as f32;
        self.total += other.total / n;
        for (mine, theirs) in [
            (&mut self.sentence, other.sentence),
            (&mut self.word, other.word),
            (&mut self.mlm, other.mlm),
        ] {
            if let Some(v) = theirs {
                *mine = Some(mine.unwrap_or(0.0) + v / n);
            }
        }
    }
}

/// One rank's part of a data-parallel evaluation: what it needs so that the gradients of its
/// shard's loss, summed over ranks, equal the gradient of the global batch's loss (see the
/// [`dist`](crate::dist) module's gradient rule).
///
/// Rank `r` of `W` holds rows `r·B/W .. (r+1)·B/W` of a global batch of `B` pairs.
#[derive(Clone, Copy)]
pub struct RankShard<'a> {
    /// The group. The contrastive terms are computed over every rank's embeddings, gathered
    /// with [`gather_with_local_grad`]: only this rank's rows are in its graph.
    pub collective: &'a dyn Collective,
    /// Global index of this shard's first row, `r·B/W`: dropout masks are keyed by each row's
    /// global index, so the ranks draw the masks one process draws for the whole batch.
    pub sample_offset: u64,
    /// Masked tokens of the whole global batch, `(source, target)`: this rank's MLM sums are
    /// divided by these counts instead of its own, so the ranks' MLM terms add up to the
    /// global batch's means.
    pub global_masked: (usize, usize),
}

impl std::fmt::Debug for RankShard<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RankShard")
            .field("rank", &self.collective.rank())
            .field("world_size", &self.collective.world_size())
            .field("sample_offset", &self.sample_offset)
            .field("global_masked", &self.global_masked)
            .finish()
    }
}

impl RankShard<'_> {
    /// The weight of a local MLM mean over `local` of `global` masked tokens (0 when the global
    /// batch has none: the local mean is then 0 too).
    pub(crate) fn mlm_share(local: usize, global: usize) -> f64 {
        if global == 0 {
            0.0
        } else {
            local as f64 / global as f64
        }
    }

    /// `loss` as this rank evaluates it: a learnable temperature `θ` is replaced by
    /// `detach(θ) + (θ − detach(θ)) / W`, the same value with `1/W` of the gradient. Every rank
    /// computes the whole global loss, so each would otherwise contribute `θ`'s full gradient
    /// and the all-reduce would count it `W` times.
    pub(crate) fn per_rank(&self, loss: &CzNce) -> Result<CzNce> {
        let world = self.collective.world_size();
        match loss.temperature() {
            Temperature::LearnableLogScale(theta) if world > 1 => {
                let fixed = theta.detach();
                let scaled = (&fixed + ((theta - &fixed)? / world as f64)?)?;
                Ok(loss.clone().with_learnable_log_scale(scaled))
            }
            _ => Ok(loss.clone()),
        }
    }
}

/// Masked copies of both sides of a batch.
#[derive(Debug, Clone)]
pub struct MaskedPair {
    /// The masked source side.
    pub src: MaskedTokens,
    /// The masked target side.
    pub tgt: MaskedTokens,
}

impl MaskedPair {
    /// Draws masked copies of both sides under `key`: the source as side 0, the target as
    /// side 1 (`key.side` is ignored). Row `r` is global sample `key.sample_offset + r`, so a
    /// data-parallel rank masking its rows with their offset draws the masks one process draws
    /// for them in the whole batch.
    pub fn draw(masking: &MlmMasking, batch: &PairBatch, key: MaskKey) -> Result<Self> {
        let device = batch.src.input_ids.device();
        Ok(Self {
            src: masking.mask(&batch.src, key.with_side(0), device)?,
            tgt: masking.mask(&batch.tgt, key.with_side(1), device)?,
        })
    }
}

/// ML-CTL's objective as composable terms.
///
/// - sentence level: a contrastive loss (CZ-NCE by default) between the source and target
///   projections of `concat(sentence, word)` embeddings (or of sentences alone, when the
///   model's head does not concatenate words);
/// - word level (off by default, as in the reference): a contrastive loss between the pooled
///   anchor-word embeddings of the two sides, with weight `word_weight` (1 by default);
/// - MLM: the masked-language-model loss on separately masked copies of both sides, averaged,
///   with weight `mlm_weight` (0.1 in ML-CTL).
///
/// Any term can be used alone: set the others to `None`.
#[derive(Debug, Clone)]
pub struct MultiLevelLoss {
    /// Sentence-level contrastive loss.
    pub sentence: Option<CzNce>,
    /// Word-level contrastive loss.
    pub word: Option<CzNce>,
    /// Weight of the word-level term in the total (finite, at least 0).
    pub word_weight: f64,
    /// Weight of the MLM term; `None` turns it off.
    pub mlm_weight: Option<f64>,
}

impl Default for MultiLevelLoss {
    fn default() -> Self {
        Self::mlctl()
    }
}

impl MultiLevelLoss {
    /// The paper's setting: sentence-level CZ-NCE (t = 0.07) and MLM with weight 0.1.
    pub fn mlctl() -> Self {
        Self {
            sentence: Some(CzNce::new()),
            word: None,
            word_weight: 1.0,
            mlm_weight: Some(0.1),
        }
    }

    /// Sets the sentence-level term.
    pub fn with_sentence(mut self, loss: Option<CzNce>) -> Self {
        self.sentence = loss;
        self
    }

    /// Sets the word-level term.
    pub fn with_word(mut self, loss: Option<CzNce>) -> Self {
        self.word = loss;
        self
    }

    /// Sets the weight of the word-level term (it must be finite and at least 0; a loss
    /// evaluated with another is an [`Error::InvalidArgument`]).
    pub fn with_word_weight(mut self, weight: f64) -> Self {
        self.word_weight = weight;
        self
    }

    /// `value` times the word-level weight, checked.
    pub(crate) fn weighted_word(&self, value: &Tensor) -> Result<Tensor> {
        match self.word_weight {
            1.0 => Ok(value.clone()),
            w if w.is_finite() && w >= 0.0 => Ok((value * w)?),
            w => Err(Error::InvalidArgument(format!(
                "the word-level weight must be finite and at least 0, not {w}"
            ))),
        }
    }

    /// Sets the MLM weight (`None` turns the term off).
    pub fn with_mlm_weight(mut self, weight: Option<f64>) -> Self {
        self.mlm_weight = weight;
        self
    }

    /// Evaluates every active term on a batch. `masked` is required when the MLM term is on.
    /// With `train`, each encoder pass draws its own dropout key from the encoder's generator.
    pub fn forward(
        &self,
        model: &MlCtlModel,
        batch: &PairBatch,
        masked: Option<&MaskedPair>,
        train: bool,
    ) -> Result<LossTerms> {
        self.forward_passes(model, batch, masked, train, &mut |_| Ok(()))
    }

    /// [`MultiLevelLoss::forward`] in training mode with dropout keyed by `key`: the pass over
    /// each side (and each masked copy) gets `key` with a stream of its own, so its masks depend
    /// only on the key, the pass and each row's global sample index. [`CachedLoss`](super::CachedLoss)
    /// given the same key draws the same masks chunk by chunk.
    pub fn forward_keyed(
        &self,
        model: &MlCtlModel,
        batch: &PairBatch,
        masked: Option<&MaskedPair>,
        key: DropoutKey,
    ) -> Result<LossTerms> {
        let rng = model.encoder().dropout_rng().clone();
        // A key the caller had set is restored afterwards.
        let previous = rng.key();
        let result = self.forward_passes(model, batch, masked, true, &mut |pass| {
            rng.set_key(Some(pass_key(key, pass)));
            Ok(())
        });
        rng.set_key(previous);
        result
    }

    /// This rank's part of a data-parallel evaluation of the global batch whose rows `batch`
    /// holds (`masked`: the masked copies of those rows), such that the gradients of the
    /// returned `total`, summed over the ranks, are the gradient of [`MultiLevelLoss::forward`]
    /// on the whole global batch:
    ///
    /// - the contrastive terms are evaluated on every rank's embeddings
    ///   ([`gather_with_local_grad`]); `sentence` and `word` are the global batch's values,
    ///   the same on every rank;
    /// - each side's MLM mean is weighted by this rank's share of the global masked tokens;
    ///   `mlm` is this rank's part, and the ranks' parts sum to the global batch's MLM term.
    ///
    /// With `train`, each encoder pass draws its dropout key from the encoder's generator as
    /// [`MultiLevelLoss::forward`] does, shifted to the shard's `sample_offset`: ranks whose
    /// generators are in the same state draw the masks of one process over the whole batch.
    /// Every rank must make this call (it runs collectives), with shards of equal size.
    pub fn forward_rank(
        &self,
        model: &MlCtlModel,
        batch: &PairBatch,
        masked: Option<&MaskedPair>,
        shard: &RankShard<'_>,
        train: bool,
    ) -> Result<LossTerms> {
        let rng = model.encoder().dropout_rng().clone();
        // A key the caller had set is restored afterwards.
        let previous = rng.key();
        let result = self.forward_passes_on(model, batch, masked, train, Some(shard), &mut |_| {
            if train {
                rng.set_key(None);
                let key = rng.next_key().with_sample_offset(shard.sample_offset);
                rng.set_key(Some(key));
            }
            Ok(())
        });
        rng.set_key(previous);
        result
    }

    fn forward_passes(
        &self,
        model: &MlCtlModel,
        batch: &PairBatch,
        masked: Option<&MaskedPair>,
        train: bool,
        before_pass: &mut dyn FnMut(Pass) -> Result<()>,
    ) -> Result<LossTerms> {
        self.forward_passes_on(model, batch, masked, train, None, before_pass)
    }

    fn forward_passes_on(
        &self,
        model: &MlCtlModel,
        batch: &PairBatch,
        masked: Option<&MaskedPair>,
        train: bool,
        shard: Option<&RankShard<'_>>,
        before_pass: &mut dyn FnMut(Pass) -> Result<()>,
    ) -> Result<LossTerms> {
        // Over a shard, the contrastive terms see every rank's rows (only the local ones in
        // the graph) and the loss's own parameters get their 1/W share.
        let gather = |t: &Tensor| -> Result<Tensor> {
            match shard {
                Some(s) => gather_with_local_grad(s.collective, t),
                None => Ok(t.clone()),
            }
        };
        let on_rank = |loss: &CzNce| -> Result<CzNce> {
            match shard {
                Some(s) => s.per_rank(loss),
                None => Ok(loss.clone()),
            }
        };
        let mut total: Option<Tensor> = None;
        let mut add = |t: &Tensor| -> Result<()> {
            total = Some(match total.take() {
                None => t.clone(),
                Some(sum) => (sum + t)?,
            });
            Ok(())
        };
        let (mut sentence, mut word) = (None, None);
        if self.sentence.is_some() || self.word.is_some() {
            let (src_spans, tgt_spans) = (batch.src_spans(), batch.tgt_spans());
            before_pass(Pass::Source)?;
            let src = model.embed(&batch.src, src_spans.as_deref(), train)?;
            before_pass(Pass::Target)?;
            let tgt = model.embed(&batch.tgt, tgt_spans.as_deref(), train)?;
            if let Some(loss) = &self.sentence {
                let value =
                    on_rank(loss)?.forward(&gather(&src.projected)?, &gather(&tgt.projected)?)?;
                add(&value)?;
                sentence = Some(value);
            }
            if let Some(loss) = &self.word {
                let (Some(q), Some(k)) = (&src.word, &tgt.word) else {
                    return Err(Error::InvalidArgument(
                        "the word-level term needs anchor spans in the batch".into(),
                    ));
                };
                let value = on_rank(loss)?.forward(&gather(q)?, &gather(k)?)?;
                add(&self.weighted_word(&value)?)?;
                word = Some(value);
            }
        }
        let mut mlm = None;
        if let Some(weight) = self.mlm_weight {
            let masked = masked.ok_or_else(|| {
                Error::InvalidArgument("the MLM term needs masked copies of the batch".into())
            })?;
            let value = mlm_term(model, batch, masked, train, shard, before_pass)?;
            add(&(&value * weight)?)?;
            mlm = Some(value);
        }
        let total = total
            .ok_or_else(|| Error::InvalidArgument("every term of the objective is off".into()))?;
        Ok(LossTerms {
            total,
            sentence,
            word,
            mlm,
        })
    }
}

/// The MLM term: the mean of both sides' losses (over a shard, this rank's share of it).
fn mlm_term(
    model: &MlCtlModel,
    batch: &PairBatch,
    masked: &MaskedPair,
    train: bool,
    shard: Option<&RankShard<'_>>,
    before_pass: &mut dyn FnMut(Pass) -> Result<()>,
) -> Result<Tensor> {
    before_pass(Pass::MaskedSource)?;
    let src = mlm_side(model, &batch.src, &masked.src, train)?;
    before_pass(Pass::MaskedTarget)?;
    let tgt = mlm_side(model, &batch.tgt, &masked.tgt, train)?;
    Ok(match shard {
        None => ((src + tgt)? / 2.0)?,
        // mean over local tokens × local / global count = local sum / global count.
        Some(s) => {
            let src_share = RankShard::mlm_share(masked.src.len(), s.global_masked.0);
            let tgt_share = RankShard::mlm_share(masked.tgt.len(), s.global_masked.1);
            (((src * src_share)? + (tgt * tgt_share)?)? / 2.0)?
        }
    })
}

/// The four encoder passes of one evaluation, each with its own dropout masks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Pass {
    /// The source sentences.
    Source = 0,
    /// The target sentences.
    Target = 1,
    /// The masked copy of the source side (MLM).
    MaskedSource = 2,
    /// The masked copy of the target side (MLM).
    MaskedTarget = 3,
}

/// The dropout key of `pass` in an evaluation keyed by `key`: distinct passes get distinct
/// steps (`4 * step + pass`), so the two sides of a pair never share a mask.
pub(crate) fn pass_key(key: DropoutKey, pass: Pass) -> DropoutKey {
    DropoutKey {
        step: key.step.wrapping_mul(4).wrapping_add(pass as u64),
        ..key
    }
}

/// MLM loss of one side: the encoder runs on the masked ids with the original mask and types.
fn mlm_side(
    model: &MlCtlModel,
    tokens: &TokenBatch,
    masked: &MaskedTokens,
    train: bool,
) -> Result<Tensor> {
    let out = model.encoder().forward_t(
        &masked.input_ids,
        Some(&tokens.token_type_ids),
        Some(&tokens.attention_mask),
        train,
    )?;
    masked_lm_loss(&model.bert.model.mlm_head, &out.last_hidden_state, masked)
}
