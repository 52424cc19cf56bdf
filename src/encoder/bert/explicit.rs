//! The encoder's explicit backward: a training forward on host slices that keeps what its
//! backward needs (a tape), and a backward that computes every parameter's gradient from the
//! gradients of the hidden states the loss used, each gradient written once into a buffer the
//! step's gradient map then owns.
//!
//! candle's autograd stays on the loss side. A recorded pass returns its hidden states as leaf
//! variables; after the loss's `backward`, `BertEncoder::backward_recorded` reads their
//! gradients from the loss's store and runs the tapes backward, and
//! `BertEncoder::take_gradients` hands the sums to the optimizer's gradient map. Without a
//! dropout key the same forward serves inference (`BertEncoder::forward_detached`).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Layout, Storage, StorageRef, Tensor, TensorId, Var};

use crate::encoder::{BertConfig, HiddenAct};
use crate::ops::dropout::dropout_in_place;
use crate::ops::gemm::{gemm, on_calling_thread, Threads, View};
use crate::ops::num::Real;
use crate::ops::transformer::{
    activation_backward, activation_forward, add_bias, attention_backward, attention_forward,
    bias_activation, column_sum, layer_norm_backward, residual_layer_norm, scatter_add_rows,
    Activation, AttentionSaved, AttentionShape, NormGrads, NormSaved,
};
use crate::ops::{DropoutKey, GeluForm};
use crate::{Error, Result};
use rayon::prelude::*;

/// How the encoder's training passes are differentiated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Backward {
    /// candle's autograd through every op of the encoder (the composite twin of
    /// [`Backward::Explicit`], and what every device and dtype supports).
    #[default]
    Autograd,
    /// The hand-written backward on the CPU for f32 and f64 weights: training passes are
    /// recorded, [`BertEncoder::backward_recorded`] differentiates them and
    /// [`BertEncoder::take_gradients`] hands over the gradients. Other devices and dtypes fall
    /// back to [`Backward::Autograd`].
    ///
    /// [`BertEncoder::backward_recorded`]: crate::encoder::BertEncoder::backward_recorded
    /// [`BertEncoder::take_gradients`]: crate::encoder::BertEncoder::take_gradients
    Explicit,
}

/// Recorded passes and the gradients summed so far, shared by the clones of an encoder.
#[derive(Debug, Default, Clone)]
pub(super) struct Recorder(Arc<Mutex<RecorderState>>);

#[derive(Debug, Default)]
struct RecorderState {
    tapes: Vec<AnyTape>,
    grads: HashMap<TensorId, HostGrad>,
}

#[derive(Debug)]
enum AnyTape {
    F32(Tape<f32>),
    F64(Tape<f64>),
}

#[derive(Debug)]
enum HostGrad {
    F32(Vec<f32>),
    F64(Vec<f64>),
}

/// The element types the explicit path runs in, with their place in the type-erased tapes and
/// gradient buffers.
trait Host: Real + crate::ops::num::Elem {
    fn wrap_tape(tape: Tape<Self>) -> AnyTape;
    fn wrap_grad(grad: Vec<Self>) -> HostGrad;
    fn unwrap_grad(grad: HostGrad) -> Option<Vec<Self>>;
}

macro_rules! host {
    ($t:ty, $v:ident) => {
        impl Host for $t {
            fn wrap_tape(tape: Tape<Self>) -> AnyTape {
                AnyTape::$v(tape)
            }
            fn wrap_grad(grad: Vec<Self>) -> HostGrad {
                HostGrad::$v(grad)
            }
            fn unwrap_grad(grad: HostGrad) -> Option<Vec<Self>> {
                match grad {
                    HostGrad::$v(g) => Some(g),
                    _ => None,
                }
            }
        }
    };
}
host!(f32, F32);
host!(f64, F64);

impl Recorder {
    fn lock(&self) -> std::sync::MutexGuard<'_, RecorderState> {
        self.0
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// One training pass: its inputs, what each layer's backward needs, and the hidden states it
/// returned (leaf variables whose gradients the loss's store holds).
#[derive(Debug)]
struct Tape<T> {
    hidden: Vec<Tensor>,
    ids: Vec<u32>,
    positions: Vec<u32>,
    token_types: Vec<u32>,
    key: DropoutKey,
    batch: usize,
    seq: usize,
    embedding_norm: NormSaved<T>,
    layers: Vec<LayerTape<T>>,
}

#[derive(Debug)]
struct LayerTape<T> {
    qkv: Vec<T>,
    attention: AttentionSaved<T>,
    context: Vec<T>,
    norm1: NormSaved<T>,
    x1: Vec<T>,
    /// The feed-forward's pre-activation; the activation itself is computed again in the
    /// backward (one GELU pass) instead of kept: `[tokens, intermediate]` per layer and pass.
    pre_activation: Vec<T>,
    norm2: NormSaved<T>,
}

/// A tensor's storage held for reading, as a host slice.
struct Held<'t>(StorageRef<'t>, &'t Layout);

impl<'t> Held<'t> {
    fn new(t: &'t Tensor) -> Self {
        let (guard, layout) = t.storage_and_layout();
        Held(guard, layout)
    }

    fn slice<T: Host>(&self) -> Result<&[T]> {
        let Storage::Cpu(cpu) = &*self.0 else {
            return Err(Error::InvalidArgument(
                "the explicit backward runs on the CPU".into(),
            ));
        };
        Ok(crate::ops::kernel::slice::<T>(cpu, self.1)?)
    }
}

/// A tensor's values on the host, as `T`.
fn host_values<T: candle_core::WithDType>(t: &Tensor) -> Result<Vec<T>> {
    Ok(t.to_dtype(T::DTYPE)?.flatten_all()?.to_vec1::<T>()?)
}

/// The order of a layer's parameters: Q, K, V weight and bias, the attention output's weight and
/// bias and LayerNorm weight and bias, then the feed-forward's intermediate and output weights
/// and biases and its LayerNorm's.
pub(super) const LAYER_TENSORS: usize = 16;
const WQ: usize = 0;
const WO: usize = 6;
const BO: usize = 7;
const G1: usize = 8;
const WI: usize = 10;
const BI: usize = 11;
const WO2: usize = 12;
const BO2: usize = 13;
const G2: usize = 14;

fn activation(act: HiddenAct) -> Activation {
    match act {
        HiddenAct::Gelu => Activation::Gelu(GeluForm::Erf),
        HiddenAct::GeluNew | HiddenAct::GeluPytorchTanh => Activation::Gelu(GeluForm::Tanh),
        HiddenAct::Relu => Activation::Relu,
    }
}

/// Dropout site ids: the embeddings' is 0, layer `i`'s are `1 + 3 i` (attention probabilities),
/// `2 + 3 i` (attention output) and `3 + 3 i` (feed-forward output).
pub(super) fn site(layer: usize, which: u32) -> u32 {
    1 + 3 * layer as u32 + which
}

/// What the explicit path sees of an encoder: its configuration, its parameters (embedding
/// tables and LayerNorm, then each layer's in [`LAYER_TENSORS`] order) and its recorder.
pub(super) struct Explicit<'a> {
    pub config: &'a BertConfig,
    /// Word, position and token-type tables, LayerNorm weight and bias.
    pub embeddings: [&'a Tensor; 5],
    /// RoBERTa-family position ids (see `BertConfig::position_padding_idx`).
    pub padding_idx: Option<u32>,
    pub layers: Vec<[&'a Tensor; 16]>,
    pub recorder: &'a Recorder,
    pub device: &'a Device,
    pub dtype: DType,
}

/// The batch's inputs on the host.
struct Inputs {
    ids: Vec<u32>,
    token_types: Vec<u32>,
    attention: Vec<f32>,
    batch: usize,
    seq: usize,
}

impl Inputs {
    /// Sequences `rows` of the batch.
    fn sequences(&self, rows: std::ops::Range<usize>) -> Inputs {
        let tokens = rows.start * self.seq..rows.end * self.seq;
        Inputs {
            ids: self.ids[tokens.clone()].to_vec(),
            token_types: self.token_types[tokens.clone()].to_vec(),
            attention: self.attention[tokens].to_vec(),
            batch: rows.len(),
            seq: self.seq,
        }
    }
}

/// transformers' additive attention mask, `(1 - mask) · MIN` per key.
fn additive_mask<T: Host>(attention: &[f32]) -> Vec<T> {
    let min = if T::DTYPE == DType::F64 {
        f64::MIN
    } else {
        f64::from(f32::MIN)
    };
    attention
        .iter()
        .map(|&m| T::lit((1.0 - f64::from(m)) * min))
        .collect()
}

impl Explicit<'_> {
    /// The training forward of the explicit path: records the pass and returns its hidden
    /// states as leaf variables.
    pub fn forward_recorded(
        &self,
        input_ids: &Tensor,
        token_type_ids: &Tensor,
        attention_mask: Option<&Tensor>,
        key: DropoutKey,
    ) -> Result<Vec<Tensor>> {
        self.forward_host(input_ids, token_type_ids, attention_mask, Some(key))
    }

    /// The forward on host slices: with a `key`, a recorded training pass (hidden states as
    /// leaf variables); without, inference (no dropout, nothing kept, plain tensors).
    pub fn forward_host(
        &self,
        input_ids: &Tensor,
        token_type_ids: &Tensor,
        attention_mask: Option<&Tensor>,
        key: Option<DropoutKey>,
    ) -> Result<Vec<Tensor>> {
        let (batch, seq) = input_ids.dims2()?;
        let inputs = Inputs {
            ids: host_values::<u32>(input_ids)?,
            token_types: host_values::<u32>(token_type_ids)?,
            attention: match attention_mask {
                Some(m) => host_values::<f32>(m)?,
                None => vec![1.0; batch * seq],
            },
            batch,
            seq,
        };
        match self.dtype {
            DType::F64 => self.run_host::<f64>(inputs, key),
            _ => self.run_host::<f32>(inputs, key),
        }
    }

    fn run_host<T: Host>(&self, inputs: Inputs, key: Option<DropoutKey>) -> Result<Vec<Tensor>> {
        let Some(key) = key else {
            return self.infer_host::<T>(&inputs);
        };
        let (batch, seq, h) = (inputs.batch, inputs.seq, self.config.hidden_size);
        let mask = additive_mask::<T>(&inputs.attention);
        let (positions, embedded, embedding_norm) = self.embed_host::<T>(&inputs, Some(key))?;
        let device = self.device.clone();
        // Training outputs are leaves the loss's autograd can differentiate.
        let wrap = |v: Vec<T>| -> Result<Tensor> {
            Ok(Var::from_vec(v, (batch, seq, h), &device)?.into_inner())
        };
        let mut hidden = vec![wrap(embedded)?];
        let mut layers = Vec::with_capacity(self.layers.len());
        for i in 0..self.layers.len() {
            let input = Held::new(hidden.last().expect("the embeddings are in"));
            let (out, tape) =
                self.layer_forward::<T>(i, input.slice()?, &mask, Some(key), (batch, seq))?;
            drop(input);
            hidden.push(wrap(out)?);
            layers.push(tape);
        }
        let tape = Tape {
            hidden: hidden.clone(),
            ids: inputs.ids,
            positions,
            token_types: inputs.token_types,
            key,
            batch,
            seq,
            embedding_norm,
            layers,
        };
        self.recorder.lock().tapes.push(T::wrap_tape(tape));
        Ok(hidden)
    }

    /// Inference: every hidden state, as plain tensors.
    ///
    /// With at least one sequence per thread of rayon's pool, the sequences are split into one
    /// group per thread and each group's whole forward runs on its own thread, its products
    /// included. Sequences are independent without a backward, so the threads never wait for
    /// each other between passes, and every product runs at one thread's full speed; a product
    /// spread over the threads pays a meeting and a share of packing for each of the ~7 products
    /// and ~10 passes of a layer. The results are the whole batch's up to the rounding of
    /// products blocked differently (bit for bit in the tests' small shapes).
    fn infer_host<T: Host>(&self, inputs: &Inputs) -> Result<Vec<Tensor>> {
        let (batch, seq, h) = (inputs.batch, inputs.seq, self.config.hidden_size);
        let threads = rayon::current_num_threads();
        let mut parts = match threads > 1 && batch >= threads {
            false => vec![self.hidden_host::<T>(inputs)?],
            true => (0..threads)
                .into_par_iter()
                .map(|g| {
                    let part = inputs.sequences(g * batch / threads..(g + 1) * batch / threads);
                    on_calling_thread(|| self.hidden_host::<T>(&part))
                })
                .collect::<Result<Vec<_>>>()?,
        };
        (0..=self.layers.len())
            .map(|layer| {
                let mut all = Vec::with_capacity(batch * seq * h);
                for part in &mut parts {
                    all.extend_from_slice(&std::mem::take(&mut part[layer]));
                }
                Ok(Tensor::from_vec(all, (batch, seq, h), self.device)?)
            })
            .collect()
    }

    /// The inference forward of `inputs`' sequences on host vectors: every hidden state, the
    /// embeddings' first.
    fn hidden_host<T: Host>(&self, inputs: &Inputs) -> Result<Vec<Vec<T>>> {
        let mask = additive_mask::<T>(&inputs.attention);
        let (_, embedded, _) = self.embed_host::<T>(inputs, None)?;
        let mut hidden = vec![embedded];
        for i in 0..self.layers.len() {
            let x = hidden.last().expect("the embeddings are in");
            let (out, _) =
                self.layer_forward::<T>(i, x, &mask, None, (inputs.batch, inputs.seq))?;
            hidden.push(out);
        }
        Ok(hidden)
    }

    /// Position ids as [`Embeddings::position_ids`] computes them, on the host.
    fn positions_host(&self, inputs: &Inputs) -> Vec<u32> {
        let seq = inputs.seq;
        match self.padding_idx {
            None => (0..inputs.batch * seq).map(|r| (r % seq) as u32).collect(),
            Some(pad) => inputs
                .ids
                .chunks(seq.max(1))
                .flat_map(|row| {
                    let mut count = 0u32;
                    row.iter()
                        .map(move |&id| match id == pad {
                            true => pad,
                            false => {
                                count += 1;
                                count + pad
                            }
                        })
                        .collect::<Vec<_>>()
                })
                .collect(),
        }
    }

    /// The embedding layer's forward: positions, output and the LayerNorm's saved values.
    fn embed_host<T: Host>(
        &self,
        inputs: &Inputs,
        key: Option<DropoutKey>,
    ) -> Result<(Vec<u32>, Vec<T>, NormSaved<T>)> {
        let h = self.config.hidden_size;
        let positions = self.positions_host(inputs);
        let held = self.embeddings.map(Held::new);
        let [word, pos, types, gamma, beta] = [0, 1, 2, 3, 4].map(|i| held[i].slice::<T>());
        let (word, pos, types) = (word?, pos?, types?);
        let rows = inputs.ids.len();
        let mut sum = vec![T::ZERO; rows * h];
        for (r, out) in sum.chunks_exact_mut(h).enumerate() {
            let (id, p, t) = (
                inputs.ids[r] as usize,
                positions[r] as usize,
                inputs.token_types[r] as usize,
            );
            let row = |table: &[T], index: usize, name: &str| -> Result<std::ops::Range<usize>> {
                match (index + 1) * h <= table.len() {
                    true => Ok(index * h..(index + 1) * h),
                    false => Err(Error::InvalidArgument(format!(
                        "{name} {index} is outside the embedding table"
                    ))),
                }
            };
            let (w, pp, tt) = (
                row(word, id, "token id")?,
                row(pos, p, "position")?,
                row(types, t, "token type")?,
            );
            for (i, o) in out.iter_mut().enumerate() {
                *o = word[w.start + i] + pos[pp.start + i] + types[tt.start + i];
            }
        }
        let mut out = vec![T::ZERO; rows * h];
        let saved = residual_layer_norm(
            sum,
            None,
            gamma?,
            beta?,
            self.config.layer_norm_eps,
            &mut out,
        );
        if let Some(key) = key {
            let p = self.config.hidden_dropout_prob;
            dropout_in_place(&mut out, inputs.seq * h, p, key, 0);
        }
        Ok((positions, out, saved))
    }

    /// Layer `index`'s training forward on `x` (`[batch · seq, hidden]`).
    fn layer_forward<T: Host>(
        &self,
        index: usize,
        x: &[T],
        mask: &[T],
        key: Option<DropoutKey>,
        (batch, seq): (usize, usize),
    ) -> Result<(Vec<T>, LayerTape<T>)> {
        let cfg = &self.config;
        let (h, n) = (cfg.hidden_size, batch * seq);
        let held = self.layers[index].map(Held::new);
        let w = slices::<T>(&held)?;
        let hidden_drop = |data: &mut [T], which: u32| {
            if let Some(key) = key {
                let p = cfg.hidden_dropout_prob;
                dropout_in_place(data, seq * h, p, key, site(index, which))
            }
        };
        let qkv = qkv_forward(x, &w, n, h);
        let shape = self.attention_shape(batch, seq);
        let mut context = vec![T::ZERO; n * h];
        let (scale, probs_dropout) = self.attention_scale_and_dropout::<T>(index, key);
        let attention = attention_forward(&qkv, mask, shape, scale, probs_dropout, &mut context);
        let mut attended = dense(&context, w[WO], w[BO], n, h, h);
        hidden_drop(&mut attended, 1);
        let mut x1 = vec![T::ZERO; n * h];
        let eps = cfg.layer_norm_eps;
        let norm1 = residual_layer_norm(attended, Some(x), w[G1], w[G1 + 1], eps, &mut x1);
        let inter = cfg.intermediate_size;
        let mut pre_activation = dense_unbiased(&x1, w[WI], n, h, inter);
        let mut activation_out = vec![T::ZERO; n * inter];
        let act = activation(cfg.hidden_act);
        bias_activation(&mut pre_activation, &mut activation_out, w[BI], act);
        let mut out2 = dense(&activation_out, w[WO2], w[BO2], n, inter, h);
        hidden_drop(&mut out2, 2);
        let mut out = vec![T::ZERO; n * h];
        let norm2 = residual_layer_norm(out2, Some(&x1), w[G2], w[G2 + 1], eps, &mut out);
        let tape = LayerTape {
            qkv,
            attention,
            context,
            norm1,
            x1,
            pre_activation,
            norm2,
        };
        Ok((out, tape))
    }

    fn attention_shape(&self, batch: usize, seq: usize) -> AttentionShape {
        AttentionShape {
            batch,
            seq,
            heads: self.config.num_attention_heads,
            head_size: self.config.head_size(),
        }
    }

    /// The score scale `1 / sqrt(head_size)` and layer `index`'s probability dropout.
    fn attention_scale_and_dropout<T: Host>(
        &self,
        index: usize,
        key: Option<DropoutKey>,
    ) -> (T, Option<(f32, DropoutKey, u32)>) {
        let p = self.config.attention_probs_dropout_prob;
        (
            T::lit(1.0 / (self.config.head_size() as f64).sqrt()),
            key.filter(|_| p > 0.0).map(|key| (p, key, site(index, 0))),
        )
    }
}

/// The host slices of a layer's held parameters, in [`LAYER_TENSORS`] order.
fn slices<'a, T: Host>(held: &'a [Held<'_>; LAYER_TENSORS]) -> Result<[&'a [T]; LAYER_TENSORS]> {
    let mut w: [&[T]; LAYER_TENSORS] = [&[]; LAYER_TENSORS];
    for (slot, held) in w.iter_mut().zip(held) {
        *slot = held.slice::<T>()?;
    }
    Ok(w)
}

/// Q, K and V as one `[n, 3h]` buffer, each third written by its own product with its own
/// weight (the variables keep transformers' three names; nothing is concatenated).
fn qkv_forward<T: Real>(x: &[T], w: &[&[T]; LAYER_TENSORS], n: usize, h: usize) -> Vec<T> {
    let mut qkv = vec![T::ZERO; n * 3 * h];
    for t in 0..3 {
        let weight = View::rows(w[WQ + 2 * t], h, h).t();
        let x = View::rows(x, n, h);
        gemm(
            &mut qkv[t * h..],
            3 * h,
            x,
            weight,
            T::ONE,
            false,
            Threads::Pool,
        );
    }
    let bias: Vec<T> = (0..3)
        .flat_map(|t| w[WQ + 2 * t + 1].iter().copied())
        .collect();
    add_bias(&mut qkv, &bias);
    qkv
}

/// `x @ weightᵀ` for `x` `[n, in_dim]` and `weight` `[out_dim, in_dim]`.
fn dense_unbiased<T: Real>(
    x: &[T],
    weight: &[T],
    n: usize,
    in_dim: usize,
    out_dim: usize,
) -> Vec<T> {
    let mut y = vec![T::ZERO; n * out_dim];
    let w = View::rows(weight, out_dim, in_dim).t();
    gemm(
        &mut y,
        out_dim,
        View::rows(x, n, in_dim),
        w,
        T::ONE,
        false,
        Threads::Pool,
    );
    y
}

/// `x @ weightᵀ + bias`.
fn dense<T: Real>(
    x: &[T],
    weight: &[T],
    bias: &[T],
    n: usize,
    in_dim: usize,
    out_dim: usize,
) -> Vec<T> {
    let mut y = dense_unbiased(x, weight, n, in_dim, out_dim);
    add_bias(&mut y, bias);
    y
}

type GradMap = HashMap<TensorId, HostGrad>;

/// Takes the gradient buffer of `param` out of `map` (a fresh zeroed one the first time in a
/// step) with whether it already holds a sum to add onto; `None` for a parameter outside the
/// graph (frozen).
fn take_grad<T: Host>(map: &mut GradMap, param: &Tensor) -> Result<Option<(Vec<T>, bool)>> {
    if !param.is_variable() {
        return Ok(None);
    }
    Ok(Some(match map.remove(&param.id()) {
        Some(g) => match T::unwrap_grad(g) {
            Some(g) => (g, true),
            None => {
                return Err(Error::InvalidArgument(
                    "the encoder's dtype changed between recorded passes".into(),
                ))
            }
        },
        None => (vec![T::ZERO; param.elem_count()], false),
    }))
}

/// Runs `f` on the gradient buffer of `param` ([`take_grad`]) and puts it back.
fn with_grad<T: Host>(
    map: &mut GradMap,
    param: &Tensor,
    f: impl FnOnce(&mut [T], bool),
) -> Result<()> {
    if let Some((mut buffer, accumulate)) = take_grad::<T>(map, param)? {
        f(&mut buffer, accumulate);
        map.insert(param.id(), T::wrap_grad(buffer));
    }
    Ok(())
}

/// A LayerNorm's backward with its parameter gradients (when they train).
fn norm_backward<T: Host>(
    map: &mut GradMap,
    dx: &mut [T],
    saved: &NormSaved<T>,
    (gamma, beta): (&Tensor, &Tensor),
    gamma_values: &[T],
) -> Result<()> {
    match (take_grad::<T>(map, gamma)?, take_grad::<T>(map, beta)?) {
        (Some((mut dg, acc)), Some((mut db, acc_b))) => {
            let grads = NormGrads {
                gamma: &mut dg,
                beta: &mut db,
                accumulate: acc && acc_b,
            };
            layer_norm_backward(dx, saved, gamma_values, Some(grads));
            map.insert(gamma.id(), T::wrap_grad(dg));
            map.insert(beta.id(), T::wrap_grad(db));
        }
        _ => layer_norm_backward(dx, saved, gamma_values, None),
    }
    Ok(())
}

/// The gradients of `y = x · weightᵀ + bias` (`x` `[n, in_dim]`): the parameters' into their
/// buffers, the input's into `dx` (added onto it when `onto`).
struct Linear<'a, T> {
    weight: (&'a Tensor, &'a [T]),
    bias: &'a Tensor,
    in_dim: usize,
    out_dim: usize,
}

impl<T: Host> Linear<'_, T> {
    fn backward(
        &self,
        map: &mut GradMap,
        dy: &[T],
        x: &[T],
        dx: &mut [T],
        onto: bool,
    ) -> Result<()> {
        let (n, i, o) = (x.len() / self.in_dim.max(1), self.in_dim, self.out_dim);
        with_grad::<T>(map, self.bias, |db, acc| column_sum(db, dy, acc))?;
        with_grad::<T>(map, self.weight.0, |dw, acc| {
            let (dy, x) = (View::rows(dy, n, o).t(), View::rows(x, n, i));
            gemm(dw, i, dy, x, T::ONE, acc, Threads::Pool)
        })?;
        let w = View::rows(self.weight.1, o, i);
        gemm(dx, i, View::rows(dy, n, o), w, T::ONE, onto, Threads::Pool);
        Ok(())
    }
}

impl Recorder {
    /// Drops the recorded passes.
    pub fn discard(&self) {
        self.lock().tapes.clear();
    }

    /// See `BertEncoder::take_gradients`.
    pub fn take_gradients(
        &self,
        vars: &[(String, Var)],
        grads: &mut std::collections::BTreeMap<String, Tensor>,
    ) -> Result<()> {
        let mut state = self.lock();
        for (name, var) in vars {
            let Some(buffer) = state.grads.remove(&var.id()) else {
                continue;
            };
            let grad = match buffer {
                HostGrad::F32(v) => Tensor::from_vec(v, var.shape(), var.device())?,
                HostGrad::F64(v) => Tensor::from_vec(v, var.shape(), var.device())?,
            };
            let grad = match grads.remove(name) {
                Some(g) => (g + grad)?,
                None => grad,
            };
            grads.insert(name.clone(), grad);
        }
        state.grads.clear();
        Ok(())
    }
}

impl Explicit<'_> {
    /// See `BertEncoder::backward_recorded`.
    pub fn backward_recorded(&self, store: &GradStore) -> Result<()> {
        let tapes = std::mem::take(&mut self.recorder.lock().tapes);
        for tape in tapes {
            match tape {
                AnyTape::F32(t) => self.tape_backward(t, store)?,
                AnyTape::F64(t) => self.tape_backward(t, store)?,
            }
        }
        Ok(())
    }

    fn tape_backward<T: Host>(&self, tape: Tape<T>, store: &GradStore) -> Result<()> {
        let grad_of = |i: usize| -> Result<Option<Vec<T>>> {
            store.get(&tape.hidden[i]).map(host_values::<T>).transpose()
        };
        if tape.hidden.iter().all(|h| store.get(h).is_none()) {
            return Ok(());
        }
        let n = tape.batch * tape.seq * self.config.hidden_size;
        let top = tape.layers.len();
        let mut dx = grad_of(top)?.unwrap_or_else(|| vec![T::ZERO; n]);
        let mut state = self.recorder.lock();
        for i in (0..top).rev() {
            let input = Held::new(&tape.hidden[i]);
            self.layer_backward(i, &tape, input.slice()?, &mut dx, &mut state.grads)?;
            if let Some(g) = grad_of(i)? {
                for (d, g) in dx.iter_mut().zip(g) {
                    *d += g;
                }
            }
        }
        self.embed_backward(&tape, dx, &mut state.grads)
    }

    fn embed_backward<T: Host>(
        &self,
        tape: &Tape<T>,
        mut dx: Vec<T>,
        map: &mut GradMap,
    ) -> Result<()> {
        let tensors = self.embeddings;
        if tensors.iter().all(|t| !t.is_variable()) {
            return Ok(());
        }
        let h = self.config.hidden_size;
        let key = tape.key;
        dropout_in_place(
            &mut dx,
            tape.seq * h,
            self.config.hidden_dropout_prob,
            key,
            0,
        );
        let gamma = Held::new(tensors[3]);
        norm_backward(
            map,
            &mut dx,
            &tape.embedding_norm,
            (tensors[3], tensors[4]),
            gamma.slice()?,
        )?;
        for (table, ids) in tensors[..3]
            .iter()
            .zip([&tape.ids, &tape.positions, &tape.token_types])
        {
            with_grad::<T>(map, table, |buf, _| scatter_add_rows(buf, h, ids, &dx))?;
        }
        Ok(())
    }

    /// Layer `index`'s backward: `dx` holds the gradient of its output and leaves with that of
    /// its input `x`.
    fn layer_backward<T: Host>(
        &self,
        index: usize,
        tape: &Tape<T>,
        x: &[T],
        dx: &mut [T],
        map: &mut GradMap,
    ) -> Result<()> {
        let cfg = &self.config;
        let lt = &tape.layers[index];
        let (h, inter, n) = (
            cfg.hidden_size,
            cfg.intermediate_size,
            tape.batch * tape.seq,
        );
        let tensors = self.layers[index];
        let held = tensors.map(Held::new);
        let w = slices::<T>(&held)?;
        let linear = |k: usize, in_dim: usize, out_dim: usize| Linear {
            weight: (tensors[k], w[k]),
            bias: tensors[k + 1],
            in_dim,
            out_dim,
        };
        let drop = |data: &mut [T], which: u32| {
            dropout_in_place(
                data,
                tape.seq * h,
                cfg.hidden_dropout_prob,
                tape.key,
                site(index, which),
            )
        };
        // Output LayerNorm, then the feed-forward block; the residual keeps dx.
        norm_backward(map, dx, &lt.norm2, (tensors[G2], tensors[G2 + 1]), w[G2])?;
        let mut dout = dx.to_vec();
        drop(&mut dout, 2);
        let mut dact = vec![T::ZERO; n * inter];
        let act = activation(cfg.hidden_act);
        let mut activation_out = vec![T::ZERO; n * inter];
        activation_forward(&lt.pre_activation, &mut activation_out, act);
        linear(WO2, inter, h).backward(map, &dout, &activation_out, &mut dact, false)?;
        std::mem::drop(activation_out);
        activation_backward(&mut dact, &lt.pre_activation, act);
        linear(WI, h, inter).backward(map, &dact, &lt.x1, dx, true)?;
        // Attention block.
        norm_backward(map, dx, &lt.norm1, (tensors[G1], tensors[G1 + 1]), w[G1])?;
        let mut dattn = dx.to_vec();
        drop(&mut dattn, 1);
        let mut dctx = vec![T::ZERO; n * h];
        linear(WO, h, h).backward(map, &dattn, &lt.context, &mut dctx, false)?;
        self.qkv_backward(index, tape, x, &dctx, dx, map, (&tensors, &w))
    }

    /// The attention and the fused Q/K/V product's backward: adds the input's gradient to `dx`.
    #[allow(clippy::too_many_arguments)]
    fn qkv_backward<T: Host>(
        &self,
        index: usize,
        tape: &Tape<T>,
        x: &[T],
        dctx: &[T],
        dx: &mut [T],
        map: &mut GradMap,
        (tensors, w): (&[&Tensor; LAYER_TENSORS], &[&[T]; LAYER_TENSORS]),
    ) -> Result<()> {
        let cfg = &self.config;
        let (h, n) = (cfg.hidden_size, tape.batch * tape.seq);
        let shape = self.attention_shape(tape.batch, tape.seq);
        let (scale, probs_dropout) = self.attention_scale_and_dropout::<T>(index, Some(tape.key));
        let lt = &tape.layers[index];
        let mut dqkv = vec![T::ZERO; n * 3 * h];
        attention_backward(
            dctx,
            &lt.qkv,
            &lt.attention,
            shape,
            scale,
            probs_dropout,
            &mut dqkv,
        );
        let mut bias_sums = vec![T::ZERO; 3 * h];
        column_sum(&mut bias_sums, &dqkv, false);
        for t in 0..3 {
            let (wt, bt) = (tensors[WQ + 2 * t], tensors[WQ + 2 * t + 1]);
            let part = &bias_sums[t * h..(t + 1) * h];
            with_grad::<T>(map, bt, |db, acc| {
                for (d, s) in db.iter_mut().zip(part) {
                    *d = if acc { *d + *s } else { *s };
                }
            })?;
            let dy = View::block(&dqkv[t * h..], n, h, 3 * h);
            with_grad::<T>(map, wt, |dw, acc| {
                gemm(
                    dw,
                    h,
                    dy.t(),
                    View::rows(x, n, h),
                    T::ONE,
                    acc,
                    Threads::Pool,
                )
            })?;
            gemm(
                dx,
                h,
                dy,
                View::rows(w[WQ + 2 * t], h, h),
                T::ONE,
                true,
                Threads::Pool,
            );
        }
        Ok(())
    }
}
