//! Fine-tuning an [`NliClassifier`] on English NLI data, through the same update step as
//! pre-training ([`UpdateRule`]: clipping, the non-finite guard, the scheduled AdamW step).

use candle_core::{Tensor, Var};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use super::classifier::{
    copy_pretrained, model_dtype_device, NliClassifier, NliFinetuneSummary, NliPooling,
};
use super::data::NliExample;
use crate::pretrained::PretrainedBert;
use crate::progress::Progress;
use crate::train::{
    accumulate_gradients, AdamW, AdamWConfig, BadSteps, Decay, Gradients, LrSchedule, UpdateRule,
};
use crate::{Error, Result};

/// Settings of [`finetune_nli`].
#[derive(Debug, Clone, PartialEq)]
pub struct NliFinetuneConfig {
    /// Passes over the training examples.
    pub epochs: usize,
    /// Pairs per update.
    pub batch_size: usize,
    /// Peak learning rate (linear warm-up over the first 10% of updates, then linear decay to
    /// zero), for encoder and head alike.
    pub lr: f64,
    /// Maximum pair length in tokens, special tokens included (longest-first truncation).
    pub max_len: usize,
    /// How the last layer is pooled.
    pub pooling: NliPooling,
    /// Seeds the head's initialisation, the dropout masks and the example order.
    pub seed: u64,
    /// Train on at most this many examples, a seeded random sample of `train`.
    pub max_examples: Option<usize>,
    /// Show a progress bar on stderr (with the `progress` feature).
    pub progress: bool,
}

impl Default for NliFinetuneConfig {
    /// The usual mBERT recipe for XNLI: 2 epochs, batch 32, learning rate 2e-5, 128 tokens,
    /// `[CLS]` pooling.
    fn default() -> Self {
        Self {
            epochs: 2,
            batch_size: 32,
            lr: 2e-5,
            max_len: 128,
            pooling: NliPooling::Cls,
            seed: 42,
            max_examples: None,
            progress: false,
        }
    }
}

fn validate(config: &NliFinetuneConfig, train: &[NliExample]) -> Result<()> {
    let bad = |what: String| Err(Error::InvalidArgument(what));
    if train.is_empty() {
        return bad("no NLI training examples".into());
    }
    if config.epochs == 0 {
        return bad("epochs must be at least 1".into());
    }
    if config.batch_size == 0 {
        return bad("batch_size must be at least 1".into());
    }
    if !(config.lr.is_finite() && config.lr > 0.0) {
        return bad(format!("lr must be positive and finite, got {}", config.lr));
    }
    if config.max_examples == Some(0) {
        return bad("max_examples must be at least 1".into());
    }
    Ok(())
}

/// Fine-tunes a copy of `bert` (every encoder weight) and a fresh classification head on
/// `train` with cross-entropy: AdamW (PyTorch defaults, weight decay 0.01 except biases and
/// LayerNorms), linear warm-up over the first 10% of updates and linear decay to zero,
/// gradients clipped to norm 1, each epoch in a new seeded order, the last batch of an epoch
/// possibly smaller.
///
/// `bert` itself is left untouched: its variables are copied first ([`copy_pretrained`]).
/// In the zero-shot protocol `train` holds English examples only.
///
/// Errors: [`Error::InvalidArgument`] for an empty `train`, zero epochs, batch size or
/// `max_examples`, a non-positive learning rate, a `max_len` the model cannot take or a model
/// without tokenizer; [`Error::Diverged`] when a loss or gradient is not finite.
pub fn finetune_nli(
    bert: &PretrainedBert,
    train: &[NliExample],
    config: &NliFinetuneConfig,
) -> Result<NliClassifier> {
    validate(config, train)?;
    let mut rng = ChaCha8Rng::seed_from_u64(config.seed);
    let mut order = chosen_examples(train.len(), config.max_examples, &mut rng);
    let copy = copy_pretrained(bert)?;
    copy.model
        .encoder
        .dropout_rng()
        .reseed(config.seed.wrapping_add(1));
    let mut classifier = NliClassifier::new(copy, config.pooling, config.max_len, config.seed)?;
    let (_, device) = model_dtype_device(classifier.bert());
    let vars: Vec<(String, Var)> = classifier.named_vars().into_iter().collect();
    let mut optimizer = AdamW::new(vars.clone(), AdamWConfig::default())?;
    let steps_per_epoch = order.len().div_ceil(config.batch_size) as u64;
    let total_steps = steps_per_epoch * config.epochs as u64;
    let rule = update_rule(config.lr, total_steps);
    let mut bad = BadSteps::default();
    let bar = Progress::new(
        config.progress,
        total_steps,
        "NLI fine-tuning {bar:30} {pos}/{len} steps  {msg}  [{elapsed_precise} < {eta_precise}]",
    );
    let mut step = 0u64;
    let (mut first_epoch_loss, mut last_epoch_loss) = (0f32, 0f32);
    for epoch in 0..config.epochs {
        order.shuffle(&mut rng);
        let mut loss_sum = 0f64;
        for chunk in order.chunks(config.batch_size) {
            let examples: Vec<&NliExample> = chunk.iter().map(|&i| &train[i]).collect();
            let loss = batch_loss(&classifier, &examples, &device)?;
            let value = loss.to_scalar::<f32>()?;
            let mut grads = Gradients::new();
            accumulate_gradients(&mut grads, &loss.backward()?, &vars)?;
            let lr = match rule.apply(&mut optimizer, &mut grads, value, step, &mut bad) {
                Ok(update) => update.lr,
                Err(e) => {
                    bar.abandon();
                    return Err(e);
                }
            };
            step += 1;
            loss_sum += value as f64 * chunk.len() as f64;
            bar.inc(1, || {
                Some(format!("epoch {}  loss {value:.4}  lr {lr:.2e}", epoch + 1))
            });
        }
        let mean = (loss_sum / order.len() as f64) as f32;
        if epoch == 0 {
            first_epoch_loss = mean;
        }
        last_epoch_loss = mean;
    }
    bar.finish();
    classifier.summary = Some(NliFinetuneSummary {
        examples: order.len(),
        steps: step,
        first_epoch_loss,
        last_epoch_loss,
    });
    Ok(classifier)
}

/// The indices of the examples to train on: all, or `max` of them drawn at random (in order).
fn chosen_examples(len: usize, max: Option<usize>, rng: &mut ChaCha8Rng) -> Vec<usize> {
    let mut order: Vec<usize> = (0..len).collect();
    if let Some(max) = max {
        if max < order.len() {
            order.shuffle(rng);
            order.truncate(max);
            order.sort_unstable();
        }
    }
    order
}

/// The update rule: linear decay after 10% warm-up, clipping at 1.
fn update_rule(peak_lr: f64, total_steps: u64) -> UpdateRule {
    UpdateRule {
        schedule: LrSchedule {
            peak_lr,
            warmup_steps: total_steps / 10,
            total_steps,
            decay: Decay::Linear,
        },
        max_grad_norm: Some(1.0),
        // An evaluation must follow its protocol: a skipped update would silently make this
        // run differ from the one reported, so the first non-finite update is an error.
        max_consecutive_bad_steps: 1,
    }
}

/// The mean cross-entropy of `classifier` (in training mode) on `examples`.
fn batch_loss(
    classifier: &NliClassifier,
    examples: &[&NliExample],
    device: &candle_core::Device,
) -> Result<Tensor> {
    let premises: Vec<&str> = examples.iter().map(|e| e.premise.as_str()).collect();
    let hypotheses: Vec<&str> = examples.iter().map(|e| e.hypothesis.as_str()).collect();
    let labels: Vec<u32> = examples.iter().map(|e| e.label.index() as u32).collect();
    let batch = classifier.encode(&premises, &hypotheses)?;
    let labels = Tensor::from_vec(labels, examples.len(), device)?;
    let logits = classifier.forward_t(&batch, true)?;
    Ok(candle_nn::loss::cross_entropy(&logits, &labels)?)
}
