//! The NLI classifier: a BERT encoder with a 3-way head. It reads a pair as BERT does,
//! `[CLS] premise [SEP] hypothesis [SEP]` with segment ids 0 and 1, pools the last layer (the
//! `[CLS]` vector or the mean over tokens, [`NliPooling`]), applies dropout and one
//! `Linear(hidden, 3)`.

use std::collections::{BTreeMap, HashMap};
use std::fmt;

use candle_core::{DType, Device, IndexOp, Tensor, Var};
use candle_nn::{Init, Linear, Module};

use super::data::{NliExample, NliLabel};
use super::evaluate::NliPredictor;
use crate::encoder::{BertForMaskedLm, Dropout, DropoutRng, ParamStore};
use crate::pooling::masked_mean;
use crate::pretrained::PretrainedBert;
use crate::tokenize::{TokenBatch, Tokenizer};
use crate::{Error, Result};

/// What [`finetune_nli`](super::finetune_nli) did.
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

/// A BERT encoder with a 3-way NLI classification head.
///
/// The classifier owns its encoder: [`finetune_nli`](super::finetune_nli) gives it a copy of the caller's model
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
    /// Set by [`finetune_nli`](super::finetune_nli).
    pub(super) summary: Option<NliFinetuneSummary>,
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
        .set_state(bert.encoder().dropout_rng().state());
    let mut copy = bert.clone();
    copy.model = model;
    copy.params = params;
    Ok(copy)
}

pub(super) fn model_dtype_device(bert: &PretrainedBert) -> (DType, Device) {
    let embeddings = bert.encoder().word_embeddings();
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

    /// The encoder (fine-tuned, after [`finetune_nli`](super::finetune_nli)).
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

    /// What fine-tuning did, for a classifier made by [`finetune_nli`](super::finetune_nli).
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
        let out = self.bert.encoder().forward_t(
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
