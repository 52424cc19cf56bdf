//! The training loop: accumulation, clipping, AdamW, schedule, non-finite guard, checkpoints
//! that resume bit-exactly, JSONL metrics and a progress bar.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use super::checkpoint::{
    checkpoint_fingerprint, checkpoint_name, latest_verified_checkpoint, prune_checkpoints,
    write_checkpoint_dir,
};
use super::config::TrainConfig;
use super::loss_scale::LossScaler;
use super::optimizer::{AdamW, Gradients};
use super::update::{BadSteps, UpdateRecord, UpdateRule};
use crate::data::{LoaderCursor, LoaderStats, MaskKey, MlmMasking, PairBatch, PairLoader};
use crate::dist::{
    agree, broadcast_vars, sum_counts, Collective, GradLayout, DEFAULT_BUCKET_BYTES,
};
use crate::encoder::{read_checkpoint_dir, save_tensors, Backward};
use crate::fs::HEAD_WEIGHTS_FILE;
use crate::loss::grads::{accumulate_gradients, add_gradient};
use crate::loss::{CachedLoss, LossTerms, MaskedPair, MultiLevelLoss, RankShard};
use crate::model::{MlCtlModel, HEAD_PREFIX};
use crate::ops::num::accumulation_dtype;
use crate::progress::Progress;
use crate::{Error, Result};

const OPTIMIZER_FILE: &str = "optimizer.safetensors";
/// The word-embedding table among the model's variables.
const WORD_EMBEDDINGS: &str = "bert.embeddings.word_embeddings.weight";
const STATE_FILE: &str = "trainer_state.json";
/// Name of the metrics log in the run directory.
pub const METRICS_FILE: &str = "metrics.jsonl";

/// One line of `metrics.jsonl`. JSON has no NaN or infinity: a non-finite loss or gradient
/// norm (a skipped step) is written as `null` and read back as NaN; a non-finite term of
/// the loss is written as `null` and read back as `None`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepRecord {
    /// 1-based update number.
    pub step: u64,
    /// Total loss (mean over micro-batches).
    #[serde(deserialize_with = "nan_if_null")]
    pub loss: f32,
    /// Sentence-level term.
    pub sentence: Option<f32>,
    /// Word-level term.
    pub word: Option<f32>,
    /// MLM term (unweighted).
    pub mlm: Option<f32>,
    /// Learning rate of the update.
    pub lr: f64,
    /// Global gradient norm before clipping.
    #[serde(deserialize_with = "nan_if_null")]
    pub grad_norm: f64,
    /// Sentence pairs per second.
    pub pairs_per_s: f64,
    /// Tokens (both sides, padding excluded) per second.
    pub tokens_per_s: f64,
    /// True when the update was skipped for a non-finite loss or gradient.
    pub skipped: bool,
}

/// A float that serde_json wrote as `null` (it writes every non-finite float so) comes back
/// as NaN.
fn nan_if_null<'de, D, T>(de: D) -> std::result::Result<T, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de> + From<f32>,
{
    Ok(Option::<T>::deserialize(de)?.unwrap_or_else(|| T::from(f32::NAN)))
}

/// What a finished run reports.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainSummary {
    /// Updates done in total (including before a resume).
    pub steps: u64,
    /// Loss of the first update of this process's run.
    pub first_loss: Option<f32>,
    /// Loss of the last update.
    pub last_loss: Option<f32>,
    /// Updates skipped as non-finite.
    pub skipped_steps: u64,
    /// The data loader's counts.
    pub loader: LoaderStats,
    /// Seconds this process spent training.
    pub seconds: f64,
    /// The last checkpoint written.
    pub checkpoint: Option<PathBuf>,
}

/// What a checkpoint saves besides weights and optimizer moments. The loader's state is its
/// cursor (epoch and position; the epoch's order is a function of the loader's seed and the
/// epoch) and counts, those of the whole global batch and the same on every rank of a
/// data-parallel run. MLM masks are keyed by the step ([`MaskKey`]) and need no state;
/// checkpoints written when they were drawn from a generator carry its state as `mask_rng`,
/// which is ignored.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct TrainerState {
    step: u64,
    cursor: LoaderCursor,
    loader_stats: LoaderStats,
    dropout_rng: ChaCha8Rng,
    skipped_steps: u64,
    consecutive_bad: usize,
    /// AdamW's own update count (skipped steps do not advance it). Absent in checkpoints written
    /// before it was saved; there it equals `step - skipped_steps`.
    #[serde(default)]
    optimizer_step: Option<u64>,
    /// The f16 loss scaler, when the run has one.
    #[serde(default)]
    loss_scaler: Option<LossScaler>,
}

/// Trains an [`MlCtlModel`] with a [`MultiLevelLoss`] on batches from a [`PairLoader`], writing
/// metrics and checkpoints into a run directory.
///
/// On the CPU a run is deterministic given its seeds, and [`Trainer::resume`] restores weights,
/// optimizer moments, schedule position, every random generator and the data cursor, so a run
/// killed (even by `kill -9`) and resumed ends with the same weights as one never stopped.
///
/// [`Trainer::with_collective`] makes it one rank of a data-parallel run.
pub struct Trainer {
    /// The model being trained.
    pub model: MlCtlModel,
    /// The objective.
    pub objective: MultiLevelLoss,
    /// The data.
    pub loader: PairLoader,
    config: TrainConfig,
    masking: Option<MlmMasking>,
    optimizer: AdamW,
    trainable: Vec<(String, candle_core::Var)>,
    run_dir: PathBuf,
    device: Device,
    step: u64,
    skipped_steps: u64,
    consecutive_bad: usize,
    /// Scales the loss of an f16 model ([`Trainer::with_loss_scaler`]).
    loss_scaler: Option<LossScaler>,
    /// The data-parallel group, when this trainer is one of its ranks.
    data_parallel: Option<DataParallel>,
}

/// Counts of a global micro-batch, summed over the ranks.
#[derive(Debug, Clone, Copy)]
struct BatchCounts {
    /// Tokens of both sides, padding excluded.
    tokens: u64,
    /// Masked tokens, source and target.
    masked: (usize, usize),
}

/// A [`Trainer`]'s data-parallel group and the layout of its gradient all-reduce.
struct DataParallel {
    collective: Box<dyn Collective + Send>,
    layout: GradLayout,
}

impl std::fmt::Debug for Trainer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let rank = self
            .data_parallel
            .as_ref()
            .map(|dp| (dp.collective.rank(), dp.collective.world_size()));
        f.debug_struct("Trainer")
            .field("step", &self.step)
            .field("run_dir", &self.run_dir)
            .field("rank_of_world", &rank)
            .finish()
    }
}

/// The AdamW of a run: `trainable`, with the head's own learning rate when `config.head_lr` is
/// set.
fn build_optimizer(
    trainable: &[(String, candle_core::Var)],
    config: &TrainConfig,
) -> Result<AdamW> {
    let mut optimizer = AdamW::new(trainable.to_vec(), config.adamw)?;
    if config.sparse_embeddings {
        optimizer = optimizer.with_sparse_rows(WORD_EMBEDDINGS)?;
    }
    if let Some(head_lr) = config.head_lr {
        let peak = config.schedule.peak_lr;
        if !(peak > 0.0 && head_lr.is_finite() && head_lr >= 0.0) {
            return Err(Error::InvalidArgument(format!(
                "head_lr {head_lr} needs a finite, non-negative value and a positive peak lr \
                 (got {peak})"
            )));
        }
        optimizer = optimizer.with_lr_scale(HEAD_PREFIX, head_lr / peak);
    }
    Ok(optimizer)
}

impl Trainer {
    /// Sets up training; nothing is written until the first step or checkpoint.
    pub fn new(
        model: MlCtlModel,
        objective: MultiLevelLoss,
        loader: PairLoader,
        config: TrainConfig,
        run_dir: &Path,
    ) -> Result<Self> {
        if config.grad_accum == 0 {
            return Err(Error::InvalidArgument(
                "grad_accum must be at least 1".into(),
            ));
        }
        if config.sparse_embeddings && (config.freeze_embeddings || objective.mlm_weight.is_some())
        {
            return Err(Error::InvalidArgument(
                "sparse embedding rows need trained embeddings and the MLM term off (its \
                 decoder, tied to the embeddings, gives every row a gradient)"
                    .into(),
            ));
        }
        let masking = match objective.mlm_weight {
            Some(_) => Some(MlmMasking::for_tokenizer(loader.tokenizer())?),
            None => None,
        };
        let layers = model.bert.config.num_hidden_layers;
        if config.freeze_layers > layers {
            return Err(Error::InvalidArgument(format!(
                "cannot freeze {} of {layers} layers",
                config.freeze_layers
            )));
        }
        let frozen = |name: &str| {
            (config.freeze_embeddings && name.starts_with("bert.embeddings."))
                || (0..config.freeze_layers)
                    .any(|i| name.starts_with(&format!("bert.encoder.layer.{i}.")))
        };
        let trainable: Vec<_> = model
            .named_vars()
            .into_iter()
            .filter(|(n, _)| !frozen(n))
            .collect();
        let optimizer = build_optimizer(&trainable, &config)?;
        let mut model = model;
        if config.freeze_embeddings {
            model.bert.model = model.bert.model.with_frozen_embeddings();
        }
        // The hand-written encoder backward where it runs (CPU, f32 and f64), autograd elsewhere.
        model.bert.model.encoder = model.bert.model.encoder.with_backward(Backward::Explicit);
        let device = model.encoder().word_embeddings().device().clone();
        let loss_scaler = (model.encoder().dtype() == DType::F16).then(LossScaler::default);
        model
            .bert
            .model
            .encoder
            .dropout_rng()
            .reseed(config.seed.wrapping_add(1));
        Ok(Self {
            model,
            objective,
            loader,
            config,
            masking,
            optimizer,
            trainable,
            run_dir: run_dir.to_path_buf(),
            device,
            step: 0,
            skipped_steps: 0,
            consecutive_bad: 0,
            loss_scaler,
            data_parallel: None,
        })
    }

    /// Chooses how the encoder is differentiated: [`Backward::Explicit`] (the default: the
    /// hand-written backward on the CPU for f32 and f64 weights, candle's autograd elsewhere) or
    /// [`Backward::Autograd`] everywhere. Both give the same gradients up to rounding.
    pub fn with_backward(mut self, backward: Backward) -> Self {
        let encoder = &mut self.model.bert.model.encoder;
        *encoder = encoder.clone().with_backward(backward);
        self
    }

    /// Scales the loss with `scaler` before every backward pass and the gradients back before
    /// the update, skipping the updates whose gradients overflow ([`UpdateRule::apply_scaled`]);
    /// `None` turns scaling off. An f16 model gets [`LossScaler::default`] (PyTorch's
    /// `GradScaler` defaults) without this call: f16 gradients below 6e-8 would otherwise
    /// flush to zero. The scaler is saved in checkpoints.
    pub fn with_loss_scaler(mut self, scaler: Option<LossScaler>) -> Self {
        self.loss_scaler = scaler;
        self
    }

    /// The loss scaler, when the run scales its loss.
    pub fn loss_scaler(&self) -> Option<&LossScaler> {
        self.loss_scaler.as_ref()
    }

    /// `loss / accum`, times the loss scale when there is one: the tensor to differentiate.
    fn backward_seed(&self, loss: &Tensor) -> Result<Tensor> {
        let accum = self.config.grad_accum as f64;
        Ok(match &self.loss_scaler {
            None => (loss / accum)?,
            Some(s) => (loss.to_dtype(DType::F32)? * (s.scale() / accum))?,
        })
    }

    /// The cached loss of this trainer's objective, with its loss scale.
    fn cached_loss(&self, mini_batch: usize) -> Result<CachedLoss> {
        let scale = self.loss_scaler.as_ref().map_or(1.0, LossScaler::scale);
        Ok(CachedLoss::new(self.objective.clone(), mini_batch)?.with_loss_scale(scale))
    }

    /// Makes this trainer rank `collective.rank()` of a data-parallel run over
    /// `collective.world_size()` ranks (one process, or thread, per rank; see [`crate::dist`]):
    /// a `NcclCollective` (one process per CUDA device), or a
    /// [`LocalCollective`](crate::dist::LocalCollective) (ranks as threads).
    /// Every rank builds its trainer with the same model, objective, loader and configuration,
    /// calls this (before [`Trainer::resume`] and the first step), then trains as usual.
    ///
    /// - The loader's `batch_size` is the **global** batch `B`. Every rank runs the same seeded
    ///   loader and trains on its shard, rows `r·B/W .. (r+1)·B/W` of the batch one process
    ///   would draw, which it alone reads, tokenizes, masks and moves to the device
    ///   ([`PairLoader::next_shard`]: the ranks exchange only which pairs are usable and their
    ///   lengths).
    /// - MLM masks ([`MaskKey`]) and dropout masks are keyed by each row's global index, so the
    ///   ranks mask exactly what one process masks.
    /// - Every rank computes the contrastive terms over every rank's embeddings (its own rows in
    ///   its graph) and `λ·MLM` over its masked tokens divided by the global batch's count (the
    ///   ranks sum their counts with a small all-reduce per micro-batch), so
    ///   the sum of the ranks' gradients is the gradient of the global batch's loss
    ///   ([`MultiLevelLoss::forward_rank`]). One all-reduce sums them per update, after every
    ///   micro-batch of gradient accumulation; clipping follows the all-reduce; a non-finite
    ///   loss on any rank makes every rank skip the update.
    /// - Rank 0 alone writes the run directory (metrics and checkpoints); every rank resumes
    ///   from the same checkpoint, bit for bit with the same world size. The loader state it
    ///   saves (cursor and counts) is the global batch's, the same on every rank.
    ///
    /// The parameters start from rank 0's (broadcast here). With the same seeds, `W` ranks
    /// follow the single-process run with the same global batch up to the rounding of the sums.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidArgument`] when the global batch is not divisible by the world size, or
    /// when the trainer has already trained or resumed; the collective's errors.
    pub fn with_collective(mut self, collective: Box<dyn Collective + Send>) -> Result<Self> {
        let world = collective.world_size();
        let batch = self.loader.config().batch_size;
        if world == 0 || batch % world != 0 {
            return Err(Error::InvalidArgument(format!(
                "the global batch of {batch} pairs does not split evenly over {world} ranks: \
                 choose a batch_size divisible by the world size"
            )));
        }
        if self.step > 0 || self.optimizer.step_count() > 0 {
            return Err(Error::InvalidArgument(
                "with_collective must come before resume and training".into(),
            ));
        }
        // Before anything else crosses: ranks started differently fail together, by name.
        agree(collective.as_ref(), &self.device, &self.run_fingerprints()?)?;
        broadcast_vars(collective.as_ref(), &self.model.named_vars(), 0)?;
        // AdamW's master copies (below f32) were taken from this rank's initial values.
        self.optimizer = build_optimizer(&self.trainable, &self.config)?;
        let vars = self.trainable.iter().cloned().collect();
        let layout = GradLayout::new(&vars)?.with_max_bucket_bytes(DEFAULT_BUCKET_BYTES);
        self.data_parallel = Some(DataParallel { collective, layout });
        Ok(self)
    }

    /// What every rank of a data-parallel run must share: the trained parameters' names,
    /// shapes and dtypes, the seed, the training configuration (progress bars aside) and the
    /// data order (the loader's configuration and corpus size), hashed where they are not
    /// numbers.
    fn run_fingerprints(&self) -> Result<Vec<(&'static str, u64)>> {
        let hash = |text: &str| -> u64 {
            use sha2::Digest;
            let digest = sha2::Sha256::digest(text.as_bytes());
            u64::from_le_bytes(digest[..8].try_into().unwrap_or([0; 8]))
        };
        let json = |text: serde_json::Result<String>| {
            text.map_err(|e| Error::Distributed(format!("cannot fingerprint the run: {e}")))
        };
        let params: String = self
            .trainable
            .iter()
            .map(|(name, var)| format!("{name}:{:?}:{:?};", var.dims(), var.dtype()))
            .collect();
        let config = TrainConfig {
            progress: false,
            ..self.config.clone()
        };
        let loader = json(serde_json::to_string(self.loader.config()))?;
        let data = format!("{loader}|{}", self.loader.corpus_len());
        Ok(vec![
            (
                "trained parameters (hash of names, shapes, dtypes)",
                hash(&params),
            ),
            ("seed", self.config.seed),
            (
                "training configuration (hash)",
                hash(&json(serde_json::to_string(&config))?),
            ),
            (
                "data order (hash of the loader's configuration and corpus size)",
                hash(&data),
            ),
        ])
    }

    /// This rank's index and the world size; `(0, 1)` without a data-parallel group.
    pub fn rank_and_world(&self) -> (usize, usize) {
        self.data_parallel.as_ref().map_or((0, 1), |dp| {
            (dp.collective.rank(), dp.collective.world_size())
        })
    }

    /// Whether this trainer writes the run directory: rank 0, or a single process.
    fn writes(&self) -> bool {
        self.rank_and_world().0 == 0
    }

    /// Updates done so far.
    pub fn step(&self) -> u64 {
        self.step
    }

    /// The options.
    pub fn config(&self) -> &TrainConfig {
        &self.config
    }

    /// Where checkpoints go.
    pub fn checkpoint_root(&self) -> PathBuf {
        self.run_dir.join("checkpoints")
    }

    /// Names of the parameters the optimizer updates.
    pub fn trainable_names(&self) -> Vec<&str> {
        self.trainable.iter().map(|(n, _)| n.as_str()).collect()
    }

    /// One update: forward and backward over `grad_accum` batches, the non-finite guard,
    /// clipping and the AdamW step. The record is also appended to `metrics.jsonl`.
    pub fn train_step(&mut self) -> Result<StepRecord> {
        let started = Instant::now();
        let accum = self.config.grad_accum;
        let mut grads = Gradients::new();
        let (mut pairs, mut tokens) = (0usize, 0u64);
        let mut mean = LossTerms::<f32>::default();
        for micro in 0..accum {
            let (batch, masked, counts) = self.next_micro_batch(micro)?;
            pairs += self.loader.config().batch_size;
            tokens += counts.tokens;
            let values = self.micro_batch(&batch, masked.as_ref(), counts.masked, &mut grads)?;
            mean.add_mean(&values, accum);
        }
        // The explicit backward's encoder gradients, summed over the micro-batches (the cached
        // loss has already taken its own).
        self.model
            .encoder()
            .take_gradients(&self.trainable, &mut grads)?;
        let verdict = self.reduce_over_ranks(&mut grads, &mut mean)?;
        let UpdateRecord {
            lr,
            grad_norm,
            skipped,
        } = self.update(&mut grads, verdict)?;
        self.step += 1;
        let seconds = started.elapsed().as_secs_f64().max(1e-9);
        let record = StepRecord {
            step: self.step,
            loss: mean.total,
            sentence: mean.sentence,
            word: mean.word,
            mlm: mean.mlm,
            lr,
            grad_norm,
            pairs_per_s: pairs as f64 / seconds,
            tokens_per_s: tokens as f64 / seconds,
            skipped,
        };
        self.append_metrics(&record)?;
        Ok(record)
    }

    /// This rank's rows of the next global micro-batch (the whole batch in one process), loaded,
    /// tokenized and masked here alone, and the global batch's counts. Masks are keyed by
    /// (seed, `step · grad_accum + micro`, global sample index, side, position): the same for a
    /// sample whichever rank holds it.
    fn next_micro_batch(
        &mut self,
        micro: usize,
    ) -> Result<(PairBatch, Option<MaskedPair>, BatchCounts)> {
        let (rank, world) = self.rank_and_world();
        let batch = match &self.data_parallel {
            Some(dp) => self
                .loader
                .next_shard(dp.collective.as_ref(), &self.device)?,
            None => self.loader.next_batch(&self.device)?,
        };
        let offset = self.loader.shard_rows(rank, world)?.start as u64;
        let counter = self.step.wrapping_mul(self.config.grad_accum as u64);
        let key = MaskKey::new(self.config.seed, counter.wrapping_add(micro as u64))
            .with_sample_offset(offset);
        let masked = match &self.masking {
            Some(m) => Some(MaskedPair::draw(m, &batch, key)?),
            None => None,
        };
        let lengths = batch.src.lengths.iter().chain(&batch.tgt.lengths);
        let tokens = lengths.sum::<usize>() as u64;
        let (src, tgt) = masked
            .as_ref()
            .map_or((0, 0), |m| (m.src.len(), m.tgt.len()));
        let local = [tokens, src as u64, tgt as u64];
        let counts = match &self.data_parallel {
            Some(dp) => sum_counts(dp.collective.as_ref(), &self.device, &local)?,
            None => local.to_vec(),
        };
        let [tokens, src, tgt] = counts[..] else {
            return Err(Error::Distributed(format!(
                "summing 3 counts over the ranks gave {}",
                counts.len()
            )));
        };
        let counts = BatchCounts {
            tokens,
            masked: (src as usize, tgt as usize),
        };
        Ok((batch, masked, counts))
    }

    /// Forward and backward of one micro-batch (`masked`: its masked copies; `global_masked`:
    /// the global batch's masked-token counts, source and target), by the trainer's
    /// strategy: plain autograd, the cached loss (`mini_batch`), or this rank's shard of it
    /// (with a collective, either way). Adds the gradients scaled by `1 / grad_accum` to
    /// `grads` and returns the loss values as the strategy reports them.
    fn micro_batch(
        &self,
        batch: &PairBatch,
        masked: Option<&MaskedPair>,
        global_masked: (usize, usize),
        grads: &mut Gradients,
    ) -> Result<LossTerms<f32>> {
        match (&self.data_parallel, self.config.mini_batch) {
            (Some(dp), mini_batch) => {
                let collective = dp.collective.as_ref();
                let (rank, world) = (collective.rank(), collective.world_size());
                let rows = self.loader.shard_rows(rank, world)?;
                if batch.len() != rows.len() {
                    return Err(Error::InvalidArgument(format!(
                        "rank {rank} holds {} pairs instead of its {} rows",
                        batch.len(),
                        rows.len()
                    )));
                }
                let shard = RankShard {
                    collective,
                    sample_offset: rows.start as u64,
                    global_masked,
                };
                self.rank_micro_batch(&shard, batch, masked, mini_batch, grads)
            }
            (None, Some(mini_batch)) => {
                // One key per batch, drawn from the encoder's (checkpointed) generator: both
                // passes over every chunk then draw the same dropout masks.
                let key = self.model.encoder().dropout_rng().next_key();
                let step = self.cached_loss(mini_batch)?.forward_backward(
                    &self.model,
                    batch,
                    masked,
                    &self.trainable,
                    Some(key),
                )?;
                let terms = step.terms();
                add_scaled(grads, step.grads, self.config.grad_accum)?;
                Ok(terms)
            }
            (None, None) => {
                let terms = self.objective.forward(&self.model, batch, masked, true)?;
                self.backward_into(&terms, grads)
            }
        }
    }

    /// Back-propagates `terms.total` (loss-scaled) and accumulates the trainable gradients.
    fn backward_into(&self, terms: &LossTerms, grads: &mut Gradients) -> Result<LossTerms<f32>> {
        let store = self.backward_seed(&terms.total)?.backward()?;
        accumulate_gradients(grads, &store, &self.trainable)?;
        // With the explicit backward, the encoder's share comes from its recorded passes; its
        // buffers sum the micro-batches in place and `train_step` takes them once.
        self.model.encoder().backward_recorded(&store)?;
        terms.values()
    }

    /// With a collective: sums the gradients over the ranks (in place) and the ranks' MLM
    /// parts in `mean`. Returns the value the update rule checks: a non-finite loss on any rank
    /// skips the update everywhere.
    fn reduce_over_ranks(&self, grads: &mut Gradients, mean: &mut LossTerms<f32>) -> Result<f32> {
        let Some(dp) = &self.data_parallel else {
            return Ok(mean.total);
        };
        let collective = dp.collective.as_ref();
        let reduced = dp
            .layout
            .all_reduce(collective, grads, mean.total.is_finite())?;
        *grads = reduced.grads;
        if let (Some(mlm), Some(weight)) = (mean.mlm, self.objective.mlm_weight) {
            // The ranks' MLM parts add up to the global batch's term; the contrastive terms
            // are already the global batch's on every rank.
            let part = Tensor::new(&[mlm], &self.device)?;
            let mlm = collective.all_reduce_sum(&part)?.to_vec1::<f32>()?[0];
            mean.mlm = Some(mlm);
            let word = self.objective.word_weight as f32 * mean.word.unwrap_or(0.0);
            let contrastive = mean.sentence.unwrap_or(0.0) + word;
            mean.total = contrastive + weight as f32 * mlm;
        }
        Ok(if reduced.skip { f32::NAN } else { mean.total })
    }

    /// The update rule on `grads` (loss-scaled when a scaler is set), counting bad steps.
    fn update(&mut self, grads: &mut Gradients, verdict: f32) -> Result<UpdateRecord> {
        let mut bad = BadSteps {
            skipped: self.skipped_steps,
            consecutive: self.consecutive_bad,
        };
        let rule = UpdateRule::from(&self.config);
        let (optimizer, step) = (&mut self.optimizer, self.step);
        let update = match &mut self.loss_scaler {
            Some(scaler) => rule.apply_scaled(optimizer, grads, verdict, step, &mut bad, scaler),
            None => rule.apply(optimizer, grads, verdict, step, &mut bad),
        };
        (self.skipped_steps, self.consecutive_bad) = (bad.skipped, bad.consecutive);
        update
    }

    /// Forward and backward of this rank's rows of one global micro-batch (`local_masked`: their
    /// masked copies), adding its gradients scaled by `1 / grad_accum` to `grads`. Returns the
    /// loss values as [`MultiLevelLoss::forward_rank`] reports them.
    fn rank_micro_batch(
        &self,
        shard: &RankShard<'_>,
        local: &PairBatch,
        local_masked: Option<&MaskedPair>,
        mini_batch: Option<usize>,
        grads: &mut Gradients,
    ) -> Result<LossTerms<f32>> {
        let Some(mini_batch) = mini_batch else {
            let terms =
                self.objective
                    .forward_rank(&self.model, local, local_masked, shard, true)?;
            return self.backward_into(&terms, grads);
        };
        // As in one process: one key per global batch, shifted to this shard's rows.
        let key = self.model.encoder().dropout_rng().next_key();
        let step = self.cached_loss(mini_batch)?.forward_backward_rank(
            &self.model,
            local,
            local_masked,
            &self.trainable,
            Some(key),
            shard,
        )?;
        let terms = step.terms();
        add_scaled(grads, step.grads, self.config.grad_accum)?;
        Ok(terms)
    }

    fn append_metrics(&self, record: &StepRecord) -> Result<()> {
        if !self.writes() {
            return Ok(());
        }
        std::fs::create_dir_all(&self.run_dir).map_err(Error::io(&self.run_dir))?;
        let path = self.run_dir.join(METRICS_FILE);
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(Error::io(&path))?;
        let line = serde_json::to_string(record).expect("records serialise");
        writeln!(file, "{line}").map_err(Error::io(&path))
    }

    /// Trains until `config.steps` updates are done, checkpointing every `checkpoint_every`
    /// updates and at the end.
    pub fn run(&mut self) -> Result<TrainSummary> {
        let started = Instant::now();
        let bar = Progress::new(
            self.config.progress && self.writes(),
            self.config.steps,
            "{bar:30} {pos}/{len} steps  {msg}  [{elapsed_precise} < {eta_precise}]",
        );
        bar.set_position(self.step);
        let (mut first_loss, mut last_loss) = (None, None);
        while self.step < self.config.steps {
            let record = self.train_step()?;
            first_loss.get_or_insert(record.loss);
            last_loss = Some(record.loss);
            bar.inc(1, || {
                Some(format!("loss {:.4}  lr {:.2e}", record.loss, record.lr))
            });
            let every = self.config.checkpoint_every;
            if every > 0 && self.step % every == 0 && self.step < self.config.steps {
                self.save_checkpoint()?;
            }
        }
        bar.finish_and_clear();
        let checkpoint = Some(self.save_checkpoint()?);
        Ok(TrainSummary {
            steps: self.step,
            first_loss,
            last_loss,
            skipped_steps: self.skipped_steps,
            loader: self.loader.stats(),
            seconds: started.elapsed().as_secs_f64(),
            checkpoint,
        })
    }

    /// Writes a complete checkpoint of the current step atomically and prunes old ones.
    ///
    /// In a data-parallel run rank 0 writes it and every rank returns its path once it is
    /// complete; every rank must call this. A rank other than 0 gets [`Error::Distributed`]
    /// when rank 0 could not write it.
    pub fn save_checkpoint(&self) -> Result<PathBuf> {
        let written = if self.writes() {
            self.write_checkpoint()
        } else {
            Ok(self.checkpoint_root().join(checkpoint_name(self.step)))
        };
        if let Some(dp) = &self.data_parallel {
            // A barrier that also tells the other ranks whether rank 0 succeeded.
            let failed = Tensor::new(&[if written.is_err() { 1f32 } else { 0.0 }], &self.device)?;
            let failed = dp.collective.all_reduce_sum(&failed)?.to_vec1::<f32>()?[0] > 0.0;
            if failed && written.is_ok() {
                return Err(Error::Distributed(format!(
                    "rank 0 could not write the checkpoint of step {}",
                    self.step
                )));
            }
        }
        written
    }

    fn write_checkpoint(&self) -> Result<PathBuf> {
        let root = self.checkpoint_root();
        let state = TrainerState {
            step: self.step,
            cursor: self.loader.cursor(),
            loader_stats: self.loader.stats(),
            dropout_rng: self.model.encoder().dropout_rng().state(),
            skipped_steps: self.skipped_steps,
            consecutive_bad: self.consecutive_bad,
            optimizer_step: Some(self.optimizer.step_count()),
            loss_scaler: self.loss_scaler.clone(),
        };
        let path = write_checkpoint_dir(&root, &checkpoint_name(self.step), |dir| {
            self.model.save(dir)?;
            let optimizer = dir.join(OPTIMIZER_FILE);
            let moments: Vec<_> = self.optimizer.state_tensors()?.into_iter().collect();
            save_tensors(&moments, None, &optimizer)?;
            let json = serde_json::to_string_pretty(&state).expect("state serialises");
            std::fs::write(dir.join(STATE_FILE), json).map_err(Error::io(dir.join(STATE_FILE)))
        })?;
        prune_checkpoints(&root, self.config.keep_checkpoints)?;
        Ok(path)
    }

    /// Continues from the newest checkpoint of the run directory whose files match their
    /// checksums, if there is one; returns its step. A newer checkpoint that was damaged
    /// (truncated or changed files) is skipped with a warning
    /// ([`super::latest_verified_checkpoint`]). `metrics.jsonl` is cut back to that step.
    ///
    /// In a data-parallel run every rank calls it: the ranks agree on the checkpoint (its step
    /// and a hash of its checksums) before loading, and on every rank's load having worked
    /// after. Any difference or failure stops every rank with an error (a rank that failed
    /// reports its own); none trains on alone.
    ///
    /// # Errors
    ///
    /// The checkpoint's I/O, format and checksum errors; [`Error::Distributed`] when the
    /// ranks disagree or another rank failed.
    pub fn resume(&mut self) -> Result<Option<u64>> {
        let found = latest_verified_checkpoint(&self.checkpoint_root());
        if let Some(dp) = &self.data_parallel {
            // Every rank must resume from the same step: one that sees no checkpoint (a
            // node-local run directory) would train other weights with the same collectives.
            // The ranks refuse together; the run directory must be shared (or hold the same
            // checkpoints on every node). A rank that cannot read its checkpoints still joins
            // the agreement, which its peers are waiting in, and then reports its own error.
            let fingerprint = match &found {
                Ok(Some((step, dir))) => checkpoint_fingerprint(dir).map(|c| (*step, c)),
                Ok(None) => Ok((0, 0)),
                Err(_) => Ok((u64::MAX, 0)),
            };
            let (step, contents) = *fingerprint.as_ref().unwrap_or(&(u64::MAX, 0));
            // Same step is not enough: a node-local directory may hold another run's checkpoint.
            let fields = [
                ("checkpoint to resume from (its step; 0: none found)", step),
                ("checkpoint contents (a hash of its checksums)", contents),
            ];
            let agreed = agree(dp.collective.as_ref(), &self.device, &fields);
            if found.is_err() {
                return found.map(|_| None);
            }
            fingerprint?;
            agreed?;
        }
        let Some((_, dir)) = found? else {
            return Ok(None);
        };
        let loaded = self.load_checkpoint(&dir);
        if let Some(dp) = &self.data_parallel {
            // A rank that failed to load leaves the run; its peers must not train on alone.
            let fields = [(
                "checkpoint loaded (1: yes, 0: failed)",
                loaded.is_ok() as u64,
            )];
            let agreed = agree(dp.collective.as_ref(), &self.device, &fields);
            let step = loaded?;
            agreed?;
            return Ok(Some(step));
        }
        loaded.map(Some)
    }

    /// Loads the checkpoint `dir` (already verified) into the model, optimizer, loader and
    /// counters; returns its step.
    fn load_checkpoint(&mut self, dir: &Path) -> Result<u64> {
        let state_path = dir.join(STATE_FILE);
        let text = std::fs::read_to_string(&state_path).map_err(Error::io(&state_path))?;
        let state: TrainerState = serde_json::from_str(&text).map_err(|source| Error::Json {
            path: state_path.clone(),
            source,
        })?;

        let mut tensors: HashMap<String, candle_core::Tensor> = read_checkpoint_dir(dir)?.tensors;
        let head_path = dir.join(HEAD_WEIGHTS_FILE);
        let head = candle_core::safetensors::load(&head_path, &Device::Cpu).map_err(|e| {
            Error::Checkpoint {
                path: head_path.clone(),
                reason: e.to_string(),
            }
        })?;
        tensors.extend(
            head.into_iter()
                .map(|(n, t)| (format!("{HEAD_PREFIX}{n}"), t)),
        );
        self.model.set_vars(&tensors)?;

        let optimizer_path = dir.join(OPTIMIZER_FILE);
        let moments =
            candle_core::safetensors::load(&optimizer_path, &Device::Cpu).map_err(|e| {
                Error::Checkpoint {
                    path: optimizer_path.clone(),
                    reason: e.to_string(),
                }
            })?;
        // Bias correction counts AdamW's updates, which skipped steps did not make.
        let optimizer_step = state
            .optimizer_step
            .unwrap_or(state.step.saturating_sub(state.skipped_steps));
        self.optimizer.load_state(&moments, optimizer_step)?;

        self.loader.set_cursor(state.cursor)?;
        self.loader.set_stats(state.loader_stats);
        self.model
            .encoder()
            .dropout_rng()
            .set_state(state.dropout_rng);
        self.step = state.step;
        self.skipped_steps = state.skipped_steps;
        self.consecutive_bad = state.consecutive_bad;
        // The caller's choice stands: a run resumed without scaling stays without it; one
        // with a scaler continues from the saved scale, when the checkpoint has one.
        if let (Some(_), Some(saved)) = (&self.loss_scaler, state.loss_scaler) {
            self.loss_scaler = Some(saved);
        }
        if self.writes() {
            self.truncate_metrics(state.step)?;
        }
        Ok(state.step)
    }

    fn truncate_metrics(&self, step: u64) -> Result<()> {
        let path = self.run_dir.join(METRICS_FILE);
        let Ok(text) = std::fs::read_to_string(&path) else {
            return Ok(());
        };
        let kept: String = text
            .lines()
            .filter(|line| serde_json::from_str::<StepRecord>(line).is_ok_and(|r| r.step <= step))
            .map(|line| format!("{line}\n"))
            .collect();
        crate::fs::write_atomic(&path, kept.as_bytes())
    }
}

/// Adds `new / accum` to `grads`, by name.
fn add_scaled(grads: &mut Gradients, new: Gradients, accum: usize) -> Result<()> {
    for (name, g) in new {
        let g = g.to_dtype(accumulation_dtype(g.dtype()))?;
        add_gradient(grads, &name, &(g / accum as f64)?)?;
    }
    Ok(())
}
