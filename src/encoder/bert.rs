//! The BERT encoder and its masked-language-model head.

use candle_core::{DType, Module, Tensor};
use candle_nn::VarBuilder;

use super::config::BertConfig;
use super::layers::{activate, embedding, linear, Dropout, DropoutRng, LayerNorm, LinearInit};
use crate::ops::{self, DropoutKey, Kernels};
use crate::tokenize::TokenBatch;
use crate::{Error, Result};

mod explicit;

pub use explicit::Backward;
use explicit::{site, Explicit, Recorder, LAYER_TENSORS};

/// `xs @ weight^T + bias` with `xs` flattened to rows: one GEMM forward and one per gradient
/// backward. (candle-nn's `Linear` broadcasts the weight over the batch instead, so its weight
/// gradient is one GEMM per sequence followed by a sum.) With the fused kernels the bias is
/// added by [`ops::bias_add`], whose CPU bias gradient is a parallel column sum.
fn dense(lin: &candle_nn::Linear, xs: &Tensor, kernels: Kernels) -> Result<Tensor> {
    let in_dim = xs.dim(candle_core::D::Minus1)?;
    let rows = xs.elem_count() / in_dim.max(1);
    let mut ys = xs.reshape((rows, in_dim))?.matmul(&lin.weight().t()?)?;
    if let Some(bias) = lin.bias() {
        ys = match kernels.fused_on(ys.device()) {
            true => ops::bias_add(&ys, bias)?,
            false => ops::bias_add_composite(&ys, bias)?,
        };
    }
    let mut dims = xs.dims().to_vec();
    if let Some(last) = dims.last_mut() {
        *last = ys.dim(1)?;
    }
    Ok(ys.reshape(dims)?)
}

/// Every hidden state of a forward pass.
///
/// # Shapes
/// - `last_hidden_state`: `[batch, seq_len, hidden]`
/// - `hidden_states`: `num_hidden_layers + 1` tensors of `[batch, seq_len, hidden]`; entry 0 is
///   the embedding output and entry `i` the output of layer `i`, exactly as transformers returns
///   them with `output_hidden_states=True`.
#[derive(Debug, Clone)]
pub struct EncoderOutput {
    /// Output of the last layer (the same tensor as the last entry of `hidden_states`).
    pub last_hidden_state: Tensor,
    /// Embedding output followed by the output of every layer.
    pub hidden_states: Vec<Tensor>,
}

#[derive(Debug, Clone)]
struct Embeddings {
    word: candle_nn::Embedding,
    position: candle_nn::Embedding,
    token_type: candle_nn::Embedding,
    layer_norm: LayerNorm,
    dropout: Dropout,
    /// RoBERTa-family position ids (see `BertConfig::position_padding_idx`).
    padding_idx: Option<u32>,
}

impl Embeddings {
    fn load(vb: VarBuilder, cfg: &BertConfig, rng: &DropoutRng) -> Result<Self> {
        let std = cfg.initializer_range;
        Ok(Self {
            word: embedding(
                vb.pp("word_embeddings"),
                cfg.vocab_size,
                cfg.hidden_size,
                std,
            )?,
            position: embedding(
                vb.pp("position_embeddings"),
                cfg.max_position_embeddings,
                cfg.hidden_size,
                std,
            )?,
            token_type: embedding(
                vb.pp("token_type_embeddings"),
                cfg.type_vocab_size,
                cfg.hidden_size,
                std,
            )?,
            layer_norm: LayerNorm::load(vb.pp("LayerNorm"), cfg.hidden_size, cfg.layer_norm_eps)?,
            dropout: Dropout::new(cfg.hidden_dropout_prob, rng.clone()),
            padding_idx: cfg.position_padding_idx(),
        })
    }

    /// `[1, seq_len]` for BERT; `[batch, seq_len]` for RoBERTa, where non-padding tokens count
    /// from `padding_idx + 1` and padding tokens sit at `padding_idx`.
    fn position_ids(&self, input_ids: &Tensor) -> Result<Tensor> {
        let (_, seq_len) = input_ids.dims2()?;
        let Some(pad) = self.padding_idx else {
            return Ok(Tensor::arange(0u32, seq_len as u32, input_ids.device())?.unsqueeze(0)?);
        };
        // Counted in f32, exact far beyond any position table.
        let real = input_ids.ne(pad)?.to_dtype(DType::F32)?;
        let count = real.cumsum(1)?;
        Ok(((count * &real)? + f64::from(pad))?.to_dtype(DType::U32)?)
    }

    fn forward_t(
        &self,
        input_ids: &Tensor,
        token_type_ids: &Tensor,
        key: Option<DropoutKey>,
    ) -> Result<Tensor> {
        let positions = self.position_ids(input_ids)?;
        let xs = self
            .word
            .forward(input_ids)?
            .broadcast_add(&self.position.forward(&positions)?)?
            .add(&self.token_type.forward(token_type_ids)?)?;
        let xs = self.layer_norm.forward_ln(&xs)?;
        self.dropout.forward_keyed(&xs, key)
    }

    fn with_kernels(self, kernels: Kernels) -> Self {
        Self {
            layer_norm: self.layer_norm.with_kernels(kernels),
            dropout: self.dropout.with_kernels(kernels),
            ..self
        }
    }

    fn detached(self) -> Self {
        let detach = |e: candle_nn::Embedding| {
            let (_, hidden) = e.embeddings().dims2().expect("embedding tables are 2-D");
            candle_nn::Embedding::new(e.embeddings().detach(), hidden)
        };
        Self {
            word: detach(self.word),
            position: detach(self.position),
            token_type: detach(self.token_type),
            layer_norm: self.layer_norm.detached(),
            ..self
        }
    }
}

#[derive(Debug, Clone)]
struct SelfAttention {
    query: candle_nn::Linear,
    key: candle_nn::Linear,
    value: candle_nn::Linear,
    output: candle_nn::Linear,
    layer_norm: LayerNorm,
    probs_dropout: Dropout,
    output_dropout: Dropout,
    num_heads: usize,
    head_size: usize,
    kernels: Kernels,
}

impl SelfAttention {
    fn load(vb: VarBuilder, cfg: &BertConfig, rng: &DropoutRng, index: usize) -> Result<Self> {
        let (h, std) = (cfg.hidden_size, cfg.initializer_range);
        let attn = vb.pp("self");
        let out = vb.pp("output");
        Ok(Self {
            query: linear(attn.pp("query"), h, h, LinearInit::Normal(std))?,
            key: linear(attn.pp("key"), h, h, LinearInit::Normal(std))?,
            value: linear(attn.pp("value"), h, h, LinearInit::Normal(std))?,
            output: linear(out.pp("dense"), h, h, LinearInit::Normal(std))?,
            layer_norm: LayerNorm::load(out.pp("LayerNorm"), h, cfg.layer_norm_eps)?,
            probs_dropout: Dropout::new(cfg.attention_probs_dropout_prob, rng.clone())
                .with_site(site(index, 0)),
            output_dropout: Dropout::new(cfg.hidden_dropout_prob, rng.clone())
                .with_site(site(index, 1)),
            num_heads: cfg.num_attention_heads,
            head_size: cfg.head_size(),
            kernels: Kernels::default(),
        })
    }

    fn with_kernels(self, kernels: Kernels) -> Self {
        Self {
            layer_norm: self.layer_norm.with_kernels(kernels),
            probs_dropout: self.probs_dropout.with_kernels(kernels),
            output_dropout: self.output_dropout.with_kernels(kernels),
            kernels,
            ..self
        }
    }

    /// Queries, keys and values, each `[b, heads, l, head_size]`, from one GEMM against the
    /// three weights stacked at forward time (the variables keep transformers' three names).
    fn qkv(&self, xs: &Tensor) -> Result<(Tensor, Tensor, Tensor)> {
        let (b, l, h) = xs.dims3()?;
        let weight = Tensor::cat(
            &[self.query.weight(), self.key.weight(), self.value.weight()],
            0,
        )?;
        let bias = match (self.query.bias(), self.key.bias(), self.value.bias()) {
            (Some(q), Some(k), Some(v)) => Some(Tensor::cat(&[q, k, v], 0)?),
            _ => None,
        };
        let qkv = dense(&candle_nn::Linear::new(weight, bias), xs, self.kernels)?
            .reshape((b, l, 3, self.num_heads, self.head_size))?
            .permute((2, 0, 3, 1, 4))?
            .contiguous()?;
        debug_assert_eq!(h, self.num_heads * self.head_size);
        Ok((qkv.get(0)?, qkv.get(1)?, qkv.get(2)?))
    }

    fn forward_t(
        &self,
        xs: &Tensor,
        additive_mask: &Tensor,
        key: Option<DropoutKey>,
    ) -> Result<Tensor> {
        let (b, l, h) = xs.dims3()?;
        let (q, k, v) = self.qkv(xs)?;
        let scores = q.matmul(&k.t()?)?;
        // softmax(scores / sqrt(d) + mask), in f32 for half precision.
        let scale = 1.0 / (self.head_size as f64).sqrt();
        let probs = if self.kernels.fused_on(xs.device()) {
            ops::softmax_scaled_masked(&scores, scale, Some(additive_mask))?
        } else {
            ops::softmax_scaled_masked_composite(&scores, scale, Some(additive_mask))?
        };
        let probs = self.probs_dropout.forward_keyed(&probs, key)?;
        let context = probs.matmul(&v)?.transpose(1, 2)?.reshape((b, l, h))?;
        let out = self
            .output_dropout
            .forward_keyed(&dense(&self.output, &context, self.kernels)?, key)?;
        self.layer_norm.forward_ln(&(out + xs)?)
    }
}

#[derive(Debug, Clone)]
struct FeedForward {
    intermediate: candle_nn::Linear,
    output: candle_nn::Linear,
    layer_norm: LayerNorm,
    dropout: Dropout,
    act: super::HiddenAct,
    kernels: Kernels,
}

impl FeedForward {
    fn load(vb: VarBuilder, cfg: &BertConfig, rng: &DropoutRng, index: usize) -> Result<Self> {
        let (h, i, std) = (
            cfg.hidden_size,
            cfg.intermediate_size,
            cfg.initializer_range,
        );
        Ok(Self {
            intermediate: linear(
                vb.pp("intermediate").pp("dense"),
                h,
                i,
                LinearInit::Normal(std),
            )?,
            output: linear(vb.pp("output").pp("dense"), i, h, LinearInit::Normal(std))?,
            layer_norm: LayerNorm::load(vb.pp("output").pp("LayerNorm"), h, cfg.layer_norm_eps)?,
            dropout: Dropout::new(cfg.hidden_dropout_prob, rng.clone()).with_site(site(index, 2)),
            act: cfg.hidden_act,
            kernels: Kernels::default(),
        })
    }

    fn with_kernels(self, kernels: Kernels) -> Self {
        Self {
            layer_norm: self.layer_norm.with_kernels(kernels),
            dropout: self.dropout.with_kernels(kernels),
            kernels,
            ..self
        }
    }

    fn forward_t(&self, xs: &Tensor, key: Option<DropoutKey>) -> Result<Tensor> {
        let inner = activate(
            self.act,
            &dense(&self.intermediate, xs, self.kernels)?,
            self.kernels,
        )?;
        let out = self
            .dropout
            .forward_keyed(&dense(&self.output, &inner, self.kernels)?, key)?;
        self.layer_norm.forward_ln(&(out + xs)?)
    }
}

#[derive(Debug, Clone)]
struct Layer {
    attention: SelfAttention,
    feed_forward: FeedForward,
}

impl Layer {
    /// Q, K, V weight and bias, output weight and bias, LayerNorm weight and bias, then the
    /// feed-forward's intermediate and output weights and biases and its LayerNorm's.
    fn tensors<'a>(&'a self) -> Result<[&'a Tensor; LAYER_TENSORS]> {
        let (a, f) = (&self.attention, &self.feed_forward);
        let b = |l: &'a candle_nn::Linear| -> Result<&'a Tensor> {
            l.bias().ok_or_else(|| {
                Error::InvalidArgument("the explicit backward needs biased linear layers".into())
            })
        };
        Ok([
            a.query.weight(),
            b(&a.query)?,
            a.key.weight(),
            b(&a.key)?,
            a.value.weight(),
            b(&a.value)?,
            a.output.weight(),
            b(&a.output)?,
            a.layer_norm.weight(),
            a.layer_norm.bias(),
            f.intermediate.weight(),
            b(&f.intermediate)?,
            f.output.weight(),
            b(&f.output)?,
            f.layer_norm.weight(),
            f.layer_norm.bias(),
        ])
    }
}

impl Embeddings {
    fn tensors(&self) -> [&Tensor; 5] {
        [
            self.word.embeddings(),
            self.position.embeddings(),
            self.token_type.embeddings(),
            self.layer_norm.weight(),
            self.layer_norm.bias(),
        ]
    }
}

/// A BERT encoder (embeddings and transformer layers) that returns every hidden state and trains.
///
/// Parameter names are transformers' `BertModel` names (`embeddings.word_embeddings.weight`,
/// `encoder.layer.0.attention.self.query.weight`, ...), relative to the [`VarBuilder`] it is
/// loaded from. Dropout is real and active only in [`BertEncoder::forward_t`] with `train = true`;
/// on the CPU its masks come from a seeded generator ([`BertEncoder::dropout_rng`]).
///
/// # Shapes
/// - `input_ids`, `token_type_ids`: `[batch, seq_len]`, any integer dtype
/// - `attention_mask`: `[batch, seq_len]`, 1 for tokens to attend to and 0 for padding
/// - output: [`EncoderOutput`], hidden states of `[batch, seq_len, hidden]`
#[derive(Debug, Clone)]
pub struct BertEncoder {
    embeddings: Embeddings,
    layers: Vec<Layer>,
    dropout_rng: DropoutRng,
    config: BertConfig,
    backward: Backward,
    recorder: Recorder,
}

impl BertEncoder {
    /// Builds the encoder from `vb` (rooted where `embeddings.*` and `encoder.*` live).
    ///
    /// Dropout masks start from seed 0; change it with [`BertEncoder::with_dropout_seed`].
    ///
    /// On the CPU this also calls [`crate::device::retain_freed_cpu_memory`] (once per
    /// process): the step's buffers are then reused instead of being faulted in afresh; and
    /// [`crate::device::single_cpu_thread_pool`], which takes effect only if the process still
    /// has a single thread (call it at the start of `main` to be sure).
    pub fn load(vb: VarBuilder, cfg: &BertConfig) -> Result<Self> {
        cfg.validate()?;
        if vb.device().is_cpu() {
            crate::device::retain_freed_cpu_memory();
            crate::device::single_cpu_thread_pool();
        }
        let rng = DropoutRng::new(0);
        let embeddings = Embeddings::load(vb.pp("embeddings"), cfg, &rng)?;
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| {
                let vb = vb.pp("encoder").pp("layer").pp(i);
                Ok(Layer {
                    attention: SelfAttention::load(vb.pp("attention"), cfg, &rng, i)?,
                    feed_forward: FeedForward::load(vb.clone(), cfg, &rng, i)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            embeddings,
            layers,
            dropout_rng: rng,
            config: cfg.clone(),
            backward: Backward::default(),
            recorder: Recorder::default(),
        })
    }

    /// Restarts the dropout generator from `seed`.
    pub fn with_dropout_seed(self, seed: u64) -> Self {
        self.dropout_rng.reseed(seed);
        self
    }

    /// Takes the embedding layer (word, position and token-type tables and their LayerNorm)
    /// out of the autograd graph, so that backward computes no gradient for it: for a frozen
    /// embedding layer this skips a dense `[vocab, hidden]` gradient per pass. The tensors share
    /// storage with the variables, so checkpoints and the [`ParamStore`](super::ParamStore)
    /// are unchanged.
    pub fn with_frozen_embeddings(self) -> Self {
        Self {
            embeddings: self.embeddings.detached(),
            ..self
        }
    }

    /// Chooses the fused CPU kernels ([`Kernels::Auto`], the default) or their composite twins
    /// for every LayerNorm, softmax, GELU and dropout of the encoder.
    pub fn with_kernels(self, kernels: Kernels) -> Self {
        Self {
            embeddings: self.embeddings.with_kernels(kernels),
            layers: self
                .layers
                .into_iter()
                .map(|layer| Layer {
                    attention: layer.attention.with_kernels(kernels),
                    feed_forward: layer.feed_forward.with_kernels(kernels),
                })
                .collect(),
            ..self
        }
    }

    /// Chooses how training passes are differentiated: candle's autograd (the default) or the
    /// explicit backward ([`Backward::Explicit`]), whose passes are differentiated by
    /// [`BertEncoder::backward_recorded`] after the loss's `backward`. Clones share the
    /// recorded passes and their gradient sums.
    pub fn with_backward(self, backward: Backward) -> Self {
        Self {
            backward,
            recorder: Recorder::default(),
            ..self
        }
    }

    /// How training passes are differentiated ([`BertEncoder::with_backward`]).
    pub fn backward_mode(&self) -> Backward {
        self.backward
    }

    /// Whether a training pass takes the explicit path: chosen, on the CPU, f32 or f64 weights.
    fn records(&self) -> bool {
        self.backward == Backward::Explicit
            && self.device().is_cpu()
            && matches!(self.dtype(), DType::F32 | DType::F64)
    }

    /// Whether [`BertEncoder::forward_detached`] runs on host slices: the CPU, f32 or f64
    /// weights, and the fused kernels (the composite twins run through candle's ops).
    fn host_forward(&self) -> bool {
        self.device().is_cpu()
            && matches!(self.dtype(), DType::F32 | DType::F64)
            && self
                .layers
                .first()
                .is_none_or(|l| l.attention.kernels == Kernels::Auto)
    }

    /// The explicit path's view of the encoder.
    fn explicit(&self) -> Result<Explicit<'_>> {
        Ok(Explicit {
            config: &self.config,
            embeddings: self.embeddings.tensors(),
            padding_idx: self.embeddings.padding_idx,
            layers: self
                .layers
                .iter()
                .map(Layer::tensors)
                .collect::<Result<_>>()?,
            recorder: &self.recorder,
            device: self.device(),
            dtype: self.dtype(),
        })
    }

    /// Differentiates every training pass recorded since the last call (with
    /// [`Backward::Explicit`]), given the store of the loss's `backward`: the gradients of the
    /// hidden states it holds flow back through the encoder, and every trainable encoder
    /// parameter's gradient is added to the sums [`BertEncoder::take_gradients`] hands over.
    /// A pass whose hidden states got no gradient is dropped. Without recorded passes (the
    /// autograd path), nothing happens.
    pub fn backward_recorded(&self, store: &candle_core::backprop::GradStore) -> Result<()> {
        self.explicit()?.backward_recorded(store)
    }

    /// Drops the passes recorded since the last [`BertEncoder::backward_recorded`] (a forward
    /// whose outputs are only read).
    pub fn discard_recorded(&self) {
        self.recorder.discard();
    }

    /// Moves the encoder gradients summed by [`BertEncoder::backward_recorded`] into `grads`,
    /// under the names of `vars` (added to a gradient already there, such as the MLM decoder's
    /// share of the tied word embeddings), and starts the next sums from zero. Gradients of
    /// parameters not in `vars` are dropped. Each gradient is handed over without a copy.
    pub fn take_gradients(
        &self,
        vars: &[(String, candle_core::Var)],
        grads: &mut std::collections::BTreeMap<String, Tensor>,
    ) -> Result<()> {
        self.recorder.take_gradients(vars, grads)
    }

    /// The generator every dropout layer of this encoder draws from.
    pub fn dropout_rng(&self) -> &DropoutRng {
        &self.dropout_rng
    }

    /// The configuration the encoder was built with.
    pub fn config(&self) -> &BertConfig {
        &self.config
    }

    /// The word-embedding matrix `[vocab_size, hidden]`, shared with the MLM decoder.
    pub fn word_embeddings(&self) -> &Tensor {
        self.embeddings.word.embeddings()
    }

    /// The device the weights live on.
    pub fn device(&self) -> &candle_core::Device {
        self.word_embeddings().device()
    }

    /// The dtype of the weights.
    pub fn dtype(&self) -> DType {
        self.word_embeddings().dtype()
    }

    /// Forward pass over a tokenized batch (moved to the encoder's device if it is elsewhere);
    /// dropout is applied when `train` is true. See [`BertEncoder::forward_t`].
    pub fn forward_batch(&self, batch: &TokenBatch, train: bool) -> Result<EncoderOutput> {
        let device = self.device();
        self.forward_t(
            &batch.input_ids.to_device(device)?,
            Some(&batch.token_type_ids.to_device(device)?),
            Some(&batch.attention_mask.to_device(device)?),
            train,
        )
    }

    /// Inference forward pass (no dropout). See [`BertEncoder::forward_t`].
    pub fn forward(
        &self,
        input_ids: &Tensor,
        token_type_ids: Option<&Tensor>,
        attention_mask: Option<&Tensor>,
    ) -> Result<EncoderOutput> {
        self.forward_t(input_ids, token_type_ids, attention_mask, false)
    }

    /// Forward pass; dropout is applied when `train` is true, keyed by
    /// [`DropoutRng::next_key`] of [`BertEncoder::dropout_rng`].
    ///
    /// Missing `token_type_ids` mean all zeros and a missing `attention_mask` means every token
    /// is attended to. Masked keys get the most negative value of the compute dtype added to
    /// their attention scores, as transformers does.
    pub fn forward_t(
        &self,
        input_ids: &Tensor,
        token_type_ids: Option<&Tensor>,
        attention_mask: Option<&Tensor>,
        train: bool,
    ) -> Result<EncoderOutput> {
        let key = train.then(|| self.dropout_rng.next_key());
        self.forward_keyed(input_ids, token_type_ids, attention_mask, key)
    }

    /// Forward pass with dropout keyed by `key` (`None`: no dropout, as in inference).
    ///
    /// Row `r` of the batch is global sample `key.sample_offset + r`: its masks depend only on
    /// the key's seed and step, that index, the layer and the position, so a batch run in chunks
    /// (each with its own offset) gets the masks of the whole batch. Arguments otherwise as
    /// [`BertEncoder::forward_t`].
    pub fn forward_keyed(
        &self,
        input_ids: &Tensor,
        token_type_ids: Option<&Tensor>,
        attention_mask: Option<&Tensor>,
        key: Option<DropoutKey>,
    ) -> Result<EncoderOutput> {
        self.run(input_ids, token_type_ids, attention_mask, key, false)
    }

    /// Inference without autograd: [`BertEncoder::forward`], with each layer's output cut from
    /// the graph as soon as it is computed. The weights are variables, so a plain forward keeps
    /// every intermediate (attention scores included) alive for a backward pass until its
    /// outputs are dropped; this one holds one layer's intermediates at a time, which is what
    /// embedding and alignment need. No gradient flows back through the outputs.
    ///
    /// On the CPU (f32 or f64) it runs on host slices; with at least one sequence per thread of
    /// rayon's pool, each thread takes a group of the batch's sequences through the whole
    /// encoder, its matrix products included, so the threads never wait for each other. The
    /// results are the whole batch's up to the rounding of products blocked differently.
    pub fn forward_detached(
        &self,
        input_ids: &Tensor,
        token_type_ids: Option<&Tensor>,
        attention_mask: Option<&Tensor>,
    ) -> Result<EncoderOutput> {
        self.run(input_ids, token_type_ids, attention_mask, None, true)
    }

    fn run(
        &self,
        input_ids: &Tensor,
        token_type_ids: Option<&Tensor>,
        attention_mask: Option<&Tensor>,
        key: Option<DropoutKey>,
        detach: bool,
    ) -> Result<EncoderOutput> {
        let cut = |t: Tensor| if detach { t.detach() } else { t };
        let (batch, seq_len) = input_ids.dims2()?;
        if seq_len > self.config.max_sequence_length() {
            return Err(Error::InvalidArgument(format!(
                "sequence length {seq_len} exceeds the model's maximum {} (max_position_embeddings)",
                self.config.max_sequence_length()
            )));
        }
        for (name, t) in [
            ("token_type_ids", token_type_ids),
            ("attention_mask", attention_mask),
        ] {
            if let Some(t) = t {
                if t.dims() != [batch, seq_len] {
                    return Err(Error::ShapeMismatch {
                        name: name.into(),
                        expected: vec![batch, seq_len],
                        actual: t.dims().to_vec(),
                    });
                }
            }
        }
        let zeros;
        let token_type_ids = match token_type_ids {
            Some(t) => t,
            None => {
                zeros = input_ids.zeros_like()?;
                &zeros
            }
        };
        if detach && self.host_forward() {
            let hidden_states =
                self.explicit()?
                    .forward_host(input_ids, token_type_ids, attention_mask, None)?;
            return Ok(EncoderOutput {
                last_hidden_state: hidden_states[hidden_states.len() - 1].clone(),
                hidden_states,
            });
        }
        if let (Some(key), false, true) = (key, detach, self.records()) {
            let hidden_states = self.explicit()?.forward_recorded(
                input_ids,
                token_type_ids,
                attention_mask,
                key,
            )?;
            return Ok(EncoderOutput {
                last_hidden_state: hidden_states[hidden_states.len() - 1].clone(),
                hidden_states,
            });
        }
        let mut xs = cut(self.embeddings.forward_t(input_ids, token_type_ids, key)?);
        let additive_mask = self.additive_mask(attention_mask, batch, seq_len, xs.dtype())?;
        let mut hidden_states = Vec::with_capacity(self.layers.len() + 1);
        hidden_states.push(xs.clone());
        for layer in &self.layers {
            xs = layer.attention.forward_t(&xs, &additive_mask, key)?;
            xs = cut(layer.feed_forward.forward_t(&xs, key)?);
            hidden_states.push(xs.clone());
        }
        Ok(EncoderOutput {
            last_hidden_state: xs,
            hidden_states,
        })
    }

    /// `(1 - mask) * dtype::MIN`, shaped `[batch, 1, 1, seq_len]` to broadcast over heads and queries.
    fn additive_mask(
        &self,
        mask: Option<&Tensor>,
        batch: usize,
        seq_len: usize,
        dtype: DType,
    ) -> Result<Tensor> {
        let device = self.word_embeddings().device();
        // f64's most negative value is -inf in f32, and 0 · -inf is NaN: build the mask in f64
        // for f64 weights.
        let acc = match dtype {
            DType::F64 => DType::F64,
            _ => DType::F32,
        };
        let mask = match mask {
            Some(m) => m.to_dtype(acc)?,
            None => Tensor::ones((batch, seq_len), acc, device)?,
        };
        let min = match dtype {
            DType::F16 => f64::from(half::f16::MIN),
            DType::BF16 => f64::from(half::bf16::MIN),
            DType::F64 => f64::MIN,
            _ => f64::from(f32::MIN),
        };
        let additive = ((1.0 - mask)? * min)?;
        Ok(additive.to_dtype(dtype)?.reshape((batch, 1, 1, seq_len))?)
    }
}

/// The masked-language-model head: dense, activation, LayerNorm, then a decoder tied to the
/// word embeddings plus a bias.
///
/// Loaded from transformers' `cls.predictions` names: `transform.dense.*`,
/// `transform.LayerNorm.*` and `bias`.
///
/// # Shapes
/// - input: hidden states `[batch, seq_len, hidden]`
/// - output: logits `[batch, seq_len, vocab_size]`
#[derive(Debug, Clone)]
pub struct MlmHead {
    dense: candle_nn::Linear,
    layer_norm: LayerNorm,
    decoder_weight: Tensor,
    bias: Tensor,
    act: super::HiddenAct,
}

impl MlmHead {
    /// Builds the head from `vb` (rooted at `cls.predictions`) with its decoder tied to
    /// `word_embeddings` (`[vocab_size, hidden]`).
    pub fn load(vb: VarBuilder, cfg: &BertConfig, word_embeddings: &Tensor) -> Result<Self> {
        let h = cfg.hidden_size;
        let transform = vb.pp("transform");
        Ok(Self {
            dense: linear(
                transform.pp("dense"),
                h,
                h,
                LinearInit::Normal(cfg.initializer_range),
            )?,
            layer_norm: LayerNorm::load(transform.pp("LayerNorm"), h, cfg.layer_norm_eps)?,
            decoder_weight: word_embeddings.clone(),
            bias: vb.get_with_hints(cfg.vocab_size, "bias", candle_nn::Init::Const(0.0))?,
            act: cfg.hidden_act,
        })
    }

    /// The head's transform (dense, activation, LayerNorm): the rows the decoder projects onto
    /// the vocabulary.
    pub(crate) fn transform(&self, hidden: &Tensor) -> Result<Tensor> {
        let xs = activate(self.act, &self.dense.forward(hidden)?, Kernels::Auto)?;
        Ok(self.layer_norm.forward(&xs)?)
    }

    /// The decoder's weight `[vocab, hidden]` (the word-embedding tensor itself, so that its
    /// gradient reaches the embeddings) and bias `[vocab]`.
    pub(crate) fn decoder(&self) -> (&Tensor, &Tensor) {
        (&self.decoder_weight, &self.bias)
    }
}

impl Module for MlmHead {
    fn forward(&self, hidden: &Tensor) -> candle_core::Result<Tensor> {
        let xs = self.transform(hidden).map_err(ops::to_candle)?;
        // One GEMM over all rows (the decoder's gradient is one product, not one per sequence)
        // and the fused bias add.
        let decoder = candle_nn::Linear::new(self.decoder_weight.clone(), Some(self.bias.clone()));
        dense(&decoder, &xs, Kernels::Auto).map_err(ops::to_candle)
    }
}

/// A BERT encoder with its MLM head, named as transformers' `BertForMaskedLM`
/// (`bert.*` and `cls.predictions.*`).
#[derive(Debug, Clone)]
pub struct BertForMaskedLm {
    /// The encoder (`bert.*`).
    pub encoder: BertEncoder,
    /// The MLM head (`cls.predictions.*`), its decoder tied to the encoder's word embeddings.
    pub mlm_head: MlmHead,
}

impl BertForMaskedLm {
    /// Builds encoder and head from `vb` rooted at the checkpoint's top level.
    pub fn load(vb: VarBuilder, cfg: &BertConfig) -> Result<Self> {
        let encoder = BertEncoder::load(vb.pp("bert"), cfg)?;
        let mlm_head = MlmHead::load(
            vb.pp("cls").pp("predictions"),
            cfg,
            encoder.word_embeddings(),
        )?;
        Ok(Self { encoder, mlm_head })
    }

    /// Freezes the embedding layer ([`BertEncoder::with_frozen_embeddings`]) and with it the
    /// head's decoder, which is tied to the word embeddings.
    pub fn with_frozen_embeddings(self) -> Self {
        Self {
            encoder: self.encoder.with_frozen_embeddings(),
            mlm_head: MlmHead {
                decoder_weight: self.mlm_head.decoder_weight.detach(),
                ..self.mlm_head
            },
        }
    }

    /// MLM logits for the input, with every hidden state. Arguments as
    /// [`BertEncoder::forward_t`].
    pub fn forward_t(
        &self,
        input_ids: &Tensor,
        token_type_ids: Option<&Tensor>,
        attention_mask: Option<&Tensor>,
        train: bool,
    ) -> Result<MaskedLmOutput> {
        let encoder = self
            .encoder
            .forward_t(input_ids, token_type_ids, attention_mask, train)?;
        let logits = self.mlm_head.forward(&encoder.last_hidden_state)?;
        Ok(MaskedLmOutput { logits, encoder })
    }
}

/// Output of [`BertForMaskedLm::forward_t`].
///
/// # Shapes
/// - `logits`: `[batch, seq_len, vocab_size]`
/// - `encoder`: see [`EncoderOutput`]
#[derive(Debug, Clone)]
pub struct MaskedLmOutput {
    /// MLM logits over the vocabulary.
    pub logits: Tensor,
    /// Every hidden state of the encoder.
    pub encoder: EncoderOutput,
}
