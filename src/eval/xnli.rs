//! XNLI zero-shot evaluation: an NLI classifier on top of the encoder, its fine-tuning on
//! English data and its per-language evaluation.
//!
//! The zero-shot protocol (see the [module overview](super)): [`finetune_nli`] on the English
//! training set, then [`evaluate_nli`] on every language of the XNLI dev/test sets. The
//! classifier reads a pair as BERT does, `[CLS] premise [SEP] hypothesis [SEP]` with segment
//! ids 0 and 1, pools the last layer (the `[CLS]` vector or the mean over tokens,
//! [`NliPooling`]), applies dropout and one `Linear(hidden, 3)`.
//!
//! On the CPU everything is seeded (head initialisation, dropout masks, example order) and a
//! run is reproducible bit for bit.

use std::collections::{BTreeMap, HashMap};
use std::fmt;

use candle_core::{DType, Device, IndexOp, Tensor, Var};
use candle_nn::{Init, Linear, Module};
use indicatif::{ProgressBar, ProgressStyle};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use crate::data::{NliExample, NliLabel};
use crate::encoder::{BertForMaskedLm, Dropout, DropoutRng, ParamStore, PretrainedBert};
use crate::pooling::masked_mean;
use crate::tokenize::{TokenBatch, Tokenizer};
use crate::train::{clip_grad_norm, AdamW, AdamWConfig, Decay, Gradients, LrSchedule};
use crate::{Error, Result};

/// Number of NLI classes.
const NUM_LABELS: usize = 3;

/// Name prefix of the classification head's parameters (as transformers'
/// `BertForSequenceClassification` names them).
const HEAD_PREFIX: &str = "classifier";

/// How the classifier turns the last layer into one vector per pair.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum NliPooling {
    /// The last layer's vector at `[CLS]` (position 0), without BERT's pooler (which MLM
    /// checkpoints do not train).
    #[default]
    Cls,
    /// The mean of the last layer over the attended tokens (special tokens included).
    Mean,
}

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
    /// Show a progress bar on stderr.
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

/// What [`finetune_nli`] did.
#[derive(Debug, Clone, PartialEq)]
pub struct NliFinetuneSummary {
    /// Training examples used (after `max_examples`).
    pub examples: usize,
    /// Updates made.
    pub steps: u64,
    /// Mean cross-entropy of the first epoch.
    pub first_epoch_loss: f32,
    /// Mean cross-entropy of the last epoch.
    pub last_epoch_loss: f32,
}

/// Anything that predicts NLI labels: what [`evaluate_nli`] evaluates.
pub trait NliPredictor {
    /// One label per example, in order.
    fn predict(&self, examples: &[NliExample]) -> Result<Vec<NliLabel>>;
}

/// A BERT encoder with a 3-way NLI classification head.
///
/// The classifier owns its encoder: [`finetune_nli`] gives it a copy of the caller's model
/// ([`copy_pretrained`]), so fine-tuning never changes the caller's weights.
///
/// # Shapes
/// - input: pairs of texts, encoded as [`TokenBatch`] `[batch, seq_len]` by
///   [`NliClassifier::encode`]
/// - pooled: `[batch, hidden]`; head weight `[3, hidden]`, bias `[3]`
/// - output: logits `[batch, 3]`, f32, classes in [`NliLabel::index`] order
pub struct NliClassifier {
    bert: PretrainedBert,
    tokenizer: Tokenizer,
    head: Linear,
    head_params: ParamStore,
    dropout: Dropout,
    pooling: NliPooling,
    eval_batch_size: usize,
    summary: Option<NliFinetuneSummary>,
}

impl fmt::Debug for NliClassifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NliClassifier")
            .field("hidden_size", &self.bert.config.hidden_size)
            .field("layers", &self.bert.config.num_hidden_layers)
            .field("pooling", &self.pooling)
            .field("max_len", &self.tokenizer.max_len())
            .field("eval_batch_size", &self.eval_batch_size)
            .finish()
    }
}

/// An independent copy of `bert`: new variables holding the same values (same dtype and
/// device), the same configuration, tokenizer and load report. Training the copy leaves
/// `bert` unchanged.
pub fn copy_pretrained(bert: &PretrainedBert) -> Result<PretrainedBert> {
    let vars = bert.params.named_vars();
    let (dtype, device) = model_dtype_device(bert);
    let tensors = vars
        .iter()
        .map(|(name, var)| Ok((name.clone(), var.as_tensor().copy()?)))
        .collect::<Result<HashMap<_, _>>>()?;
    let params = ParamStore::with_checkpoint(tensors, 0);
    let model = BertForMaskedLm::load(params.var_builder(dtype, &device), &bert.config)?;
    let initialized = params.log().initialized.clone();
    if !initialized.is_empty() {
        return Err(Error::MissingTensors { names: initialized });
    }
    model
        .encoder
        .dropout_rng()
        .set_state(bert.model.encoder.dropout_rng().state());
    let mut copy = bert.clone();
    copy.model = model;
    copy.params = params;
    Ok(copy)
}

fn model_dtype_device(bert: &PretrainedBert) -> (DType, Device) {
    let embeddings = bert.model.encoder.word_embeddings();
    (embeddings.dtype(), embeddings.device().clone())
}

impl NliClassifier {
    /// A classifier over `bert` (taken as it is: pass a [`copy_pretrained`] copy to keep the
    /// original) with a fresh head drawn from `seed` (normal weights with the model's
    /// `initializer_range`, zero bias, as transformers initialises it) and dropout
    /// `hidden_dropout_prob`. Pairs are truncated to `max_len` tokens; the model must carry a
    /// tokenizer.
    pub fn new(
        bert: PretrainedBert,
        pooling: NliPooling,
        max_len: usize,
        seed: u64,
    ) -> Result<Self> {
        let tokenizer = bert.tokenizer()?.clone();
        if max_len < 4 || max_len > bert.config.max_position_embeddings {
            return Err(Error::InvalidArgument(format!(
                "max_len {max_len} must be in 4..={} (the model's max_position_embeddings)",
                bert.config.max_position_embeddings
            )));
        }
        let tokenizer = tokenizer.with_max_len(max_len)?;
        let (dtype, device) = model_dtype_device(&bert);
        let hidden = bert.config.hidden_size;
        let head_params = ParamStore::new(seed);
        let vb = head_params.var_builder(dtype, &device).pp(HEAD_PREFIX);
        let weight = vb.get_with_hints(
            (NUM_LABELS, hidden),
            "weight",
            Init::Randn {
                mean: 0.0,
                stdev: bert.config.initializer_range,
            },
        )?;
        let bias = vb.get_with_hints(NUM_LABELS, "bias", Init::Const(0.0))?;
        let dropout_rng = DropoutRng::new(seed ^ 0x9e37_79b9_7f4a_7c15);
        Ok(Self {
            dropout: Dropout::new(bert.config.hidden_dropout_prob, dropout_rng),
            head: Linear::new(weight, Some(bias)),
            head_params,
            tokenizer,
            pooling,
            eval_batch_size: 64,
            summary: None,
            bert,
        })
    }

    /// Sets how many pairs [`NliClassifier::logits`] and [`NliPredictor::predict`] run at once
    /// (default 64; at least 1).
    pub fn with_eval_batch_size(mut self, batch_size: usize) -> Self {
        self.eval_batch_size = batch_size.max(1);
        self
    }

    /// The encoder (fine-tuned, after [`finetune_nli`]).
    pub fn bert(&self) -> &PretrainedBert {
        &self.bert
    }

    /// The head's parameters, `classifier.weight` `[3, hidden]` and `classifier.bias` `[3]`.
    pub fn head_params(&self) -> &ParamStore {
        &self.head_params
    }

    /// The tokenizer, with the classifier's maximum length.
    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    /// How the last layer is pooled.
    pub fn pooling(&self) -> NliPooling {
        self.pooling
    }

    /// What fine-tuning did, for a classifier made by [`finetune_nli`].
    pub fn summary(&self) -> Option<&NliFinetuneSummary> {
        self.summary.as_ref()
    }

    /// The trainable variables by name: the encoder's (`bert.*`) and the head's
    /// (`classifier.*`). The MLM head (`cls.*`) is not used and not listed.
    pub fn named_vars(&self) -> BTreeMap<String, Var> {
        let mut vars: BTreeMap<String, Var> = self
            .bert
            .params
            .named_vars()
            .into_iter()
            .filter(|(name, _)| !name.starts_with("cls."))
            .collect();
        vars.extend(self.head_params.named_vars());
        vars
    }

    /// Tokenizes pairs: `[CLS] premise [SEP] hypothesis [SEP]`, padded to the longest,
    /// truncated to the classifier's `max_len`.
    pub fn encode<S: AsRef<str>>(&self, premises: &[S], hypotheses: &[S]) -> Result<TokenBatch> {
        let (_, device) = model_dtype_device(&self.bert);
        self.tokenizer
            .encode_pair_batch(premises, hypotheses, &device)
    }

    /// Logits of an encoded batch; dropout (encoder and head) is active when `train` is true.
    ///
    /// # Shapes
    /// - `batch`: [`TokenBatch`] with `input_ids`, `token_type_ids`, `attention_mask` of
    ///   `[batch, seq_len]`
    /// - output: `[batch, 3]`, f32
    pub fn forward_t(&self, batch: &TokenBatch, train: bool) -> Result<Tensor> {
        let out = self.bert.model.encoder.forward_t(
            &batch.input_ids,
            Some(&batch.token_type_ids),
            Some(&batch.attention_mask),
            train,
        )?;
        let hidden = &out.last_hidden_state;
        let pooled = match self.pooling {
            NliPooling::Cls => hidden.i((.., 0, ..))?.contiguous()?,
            NliPooling::Mean => {
                masked_mean(hidden, &batch.attention_mask)?.to_dtype(hidden.dtype())?
            }
        };
        let pooled = self.dropout.forward_t(&pooled, train)?;
        Ok(self.head.forward(&pooled)?.to_dtype(DType::F32)?)
    }

    /// Inference logits of examples, computed in batches of the eval batch size.
    ///
    /// # Shapes
    /// - output: `[examples.len(), 3]`, f32 (`[0, 3]` for no examples)
    pub fn logits(&self, examples: &[NliExample]) -> Result<Tensor> {
        let (_, device) = model_dtype_device(&self.bert);
        if examples.is_empty() {
            return Ok(Tensor::zeros((0, NUM_LABELS), DType::F32, &device)?);
        }
        let mut parts = Vec::new();
        for chunk in examples.chunks(self.eval_batch_size) {
            let premises: Vec<&str> = chunk.iter().map(|e| e.premise.as_str()).collect();
            let hypotheses: Vec<&str> = chunk.iter().map(|e| e.hypothesis.as_str()).collect();
            let batch = self.encode(&premises, &hypotheses)?;
            parts.push(self.forward_t(&batch, false)?.detach());
        }
        Ok(Tensor::cat(&parts, 0)?)
    }
}

impl NliPredictor for NliClassifier {
    /// The arg-max class of [`NliClassifier::logits`].
    fn predict(&self, examples: &[NliExample]) -> Result<Vec<NliLabel>> {
        if examples.is_empty() {
            return Ok(Vec::new());
        }
        let classes = self.logits(examples)?.argmax(1)?.to_vec1::<u32>()?;
        Ok(classes
            .into_iter()
            .map(|c| NliLabel::from_index(c as usize).expect("argmax over 3 classes"))
            .collect())
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
/// without tokenizer; [`Error::Diverged`] when a loss is not finite.
pub fn finetune_nli(
    bert: &PretrainedBert,
    train: &[NliExample],
    config: &NliFinetuneConfig,
) -> Result<NliClassifier> {
    validate(config, train)?;
    let mut rng = ChaCha8Rng::seed_from_u64(config.seed);
    let mut order: Vec<usize> = (0..train.len()).collect();
    if let Some(max) = config.max_examples {
        if max < order.len() {
            order.shuffle(&mut rng);
            order.truncate(max);
            order.sort_unstable();
        }
    }
    let copy = copy_pretrained(bert)?;
    copy.model
        .encoder
        .dropout_rng()
        .reseed(config.seed.wrapping_add(1));
    let mut classifier = NliClassifier::new(copy, config.pooling, config.max_len, config.seed)?;
    let (_, device) = model_dtype_device(&classifier.bert);
    let vars = classifier.named_vars();
    let mut optimizer = AdamW::new(vars.clone(), AdamWConfig::default())?;
    let steps_per_epoch = order.len().div_ceil(config.batch_size) as u64;
    let total_steps = steps_per_epoch * config.epochs as u64;
    let schedule = LrSchedule {
        peak_lr: config.lr,
        warmup_steps: total_steps / 10,
        total_steps,
        decay: Decay::Linear,
    };
    let bar = if config.progress {
        ProgressBar::new(total_steps)
    } else {
        ProgressBar::hidden()
    };
    bar.set_style(
        ProgressStyle::with_template(
            "NLI fine-tuning {bar:30} {pos}/{len} steps  {msg}  [{elapsed_precise} < {eta_precise}]",
        )
        .expect("valid template"),
    );
    let mut step = 0u64;
    let (mut first_epoch_loss, mut last_epoch_loss) = (0f32, 0f32);
    for epoch in 0..config.epochs {
        order.shuffle(&mut rng);
        let mut loss_sum = 0f64;
        for chunk in order.chunks(config.batch_size) {
            let premises: Vec<&str> = chunk.iter().map(|&i| train[i].premise.as_str()).collect();
            let hypotheses: Vec<&str> = chunk
                .iter()
                .map(|&i| train[i].hypothesis.as_str())
                .collect();
            let labels: Vec<u32> = chunk
                .iter()
                .map(|&i| train[i].label.index() as u32)
                .collect();
            let batch = classifier.encode(&premises, &hypotheses)?;
            let labels = Tensor::from_vec(labels, chunk.len(), &device)?;
            let logits = classifier.forward_t(&batch, true)?;
            let loss = candle_nn::loss::cross_entropy(&logits, &labels)?;
            let value = loss.to_scalar::<f32>()?;
            if !value.is_finite() {
                bar.abandon();
                return Err(Error::Diverged {
                    step: step + 1,
                    consecutive: 1,
                });
            }
            let store = loss.backward()?;
            let mut grads = Gradients::new();
            for (name, var) in &vars {
                if let Some(g) = store.get(var) {
                    grads.insert(name.clone(), g.clone());
                }
            }
            clip_grad_norm(&mut grads, 1.0)?;
            let lr = schedule.lr(step);
            optimizer.step(&grads, lr)?;
            step += 1;
            loss_sum += value as f64 * chunk.len() as f64;
            bar.set_message(format!("epoch {}  loss {value:.4}  lr {lr:.2e}", epoch + 1));
            bar.inc(1);
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

/// Correct predictions and examples of one language.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LanguageCounts {
    /// Examples predicted right.
    pub correct: usize,
    /// Examples.
    pub total: usize,
}

/// Accuracy per language, as XNLI results are reported.
#[derive(Debug, Clone, PartialEq)]
pub struct NliReport {
    /// Accuracy (`correct / total`, in `[0, 1]`) of each language.
    pub accuracy_by_language: BTreeMap<String, f32>,
    /// The counts behind each accuracy.
    pub counts: BTreeMap<String, LanguageCounts>,
    /// Accuracy over all examples, whatever their language.
    pub overall: f32,
    /// Mean of the per-language accuracies: the "avg" column of XNLI tables. On the official
    /// sets, where every language has the same examples, it equals `overall`.
    pub average: f32,
    /// Confusion matrix over all examples: `confusion[gold][predicted]`, classes in
    /// [`NliLabel::index`] order.
    pub confusion: [[usize; 3]; 3],
}

impl NliReport {
    /// The report for `predictions` of `examples` (one per example, in order).
    pub fn from_predictions(examples: &[NliExample], predictions: &[NliLabel]) -> Result<Self> {
        if examples.is_empty() {
            return Err(Error::InvalidArgument("no NLI examples to evaluate".into()));
        }
        if predictions.len() != examples.len() {
            return Err(Error::ShapeMismatch {
                name: "NLI predictions".into(),
                expected: vec![examples.len()],
                actual: vec![predictions.len()],
            });
        }
        let mut counts: BTreeMap<String, LanguageCounts> = BTreeMap::new();
        let mut confusion = [[0usize; 3]; 3];
        let mut correct = 0usize;
        for (example, &predicted) in examples.iter().zip(predictions) {
            let entry = counts.entry(example.language.clone()).or_default();
            entry.total += 1;
            if predicted == example.label {
                entry.correct += 1;
                correct += 1;
            }
            confusion[example.label.index()][predicted.index()] += 1;
        }
        let accuracy_by_language: BTreeMap<String, f32> = counts
            .iter()
            .map(|(l, c)| (l.clone(), (c.correct as f64 / c.total as f64) as f32))
            .collect();
        let average = (accuracy_by_language
            .values()
            .map(|&a| a as f64)
            .sum::<f64>()
            / accuracy_by_language.len() as f64) as f32;
        Ok(Self {
            accuracy_by_language,
            counts,
            overall: (correct as f64 / examples.len() as f64) as f32,
            average,
            confusion,
        })
    }
}

impl fmt::Display for NliReport {
    /// One line per language (`fr  74.20%  (3717/5010)`), then the average and overall
    /// accuracy.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (language, accuracy) in &self.accuracy_by_language {
            let c = self.counts[language];
            writeln!(
                f,
                "{language:<8} {:6.2}%  ({}/{})",
                accuracy * 100.0,
                c.correct,
                c.total
            )?;
        }
        writeln!(f, "{:<8} {:6.2}%", "average", self.average * 100.0)?;
        write!(f, "{:<8} {:6.2}%", "overall", self.overall * 100.0)
    }
}

/// Predicts every example with `predictor` and reports the accuracy per language.
///
/// Errors: [`Error::InvalidArgument`] for no examples, [`Error::ShapeMismatch`] when the
/// predictor returns another number of labels, and the predictor's own errors.
pub fn evaluate_nli<P: NliPredictor + ?Sized>(
    predictor: &P,
    examples: &[NliExample],
) -> Result<NliReport> {
    if examples.is_empty() {
        return Err(Error::InvalidArgument("no NLI examples to evaluate".into()));
    }
    let predictions = predictor.predict(examples)?;
    NliReport::from_predictions(examples, &predictions)
}
