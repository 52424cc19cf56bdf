//! Fused, differentiable kernels for the encoder (CPU, and CUDA with the `cuda` feature), each
//! beside its composite twin.
//!
//! Every op here comes in three forms:
//! - `*_fused`: one candle custom op with an exact backward (itself a fused op). On the CPU, one
//!   pass over contiguous memory, rows spread over rayon's pool; on CUDA (`cuda` feature), the
//!   kernels of `ops.cu`: one thread block per row for LayerNorm and softmax, elementwise
//!   kernels for GELU and dropout, for f32, f16 and bf16 (f64 has no CUDA kernel: a typed
//!   error). Other devices get an error.
//! - `*_composite`: the same function as a chain of candle ops, differentiable on every device.
//! - the plain name (`layer_norm`, `softmax_scaled_masked`, `gelu`, `dropout`): the fused op
//!   where it runs (the CPU; CUDA for f32, f16 and bf16) and the composite one elsewhere.
//!
//! `vocab_nll` (a linear layer, log-softmax and negative log-likelihood over a vocabulary, the
//! MLM loss) is fused on the CPU only, where it runs in chunks of the vocabulary and never holds
//! the `[n, vocab]` logits; elsewhere it is its composite twin.
//!
//! `bias_add` is fused on the CPU only, where candle's gradient of a broadcast is a slow
//! single-threaded reduction; elsewhere `bias_add` is candle's `broadcast_add`.
//!
//! Half-precision inputs (`bf16`, `f16`) are read into f32 and every reduction accumulates in
//! f32; `f64` runs in f64 on the CPU (it serves the finite-difference tests). The fused and
//! composite forms agree to rounding: tests hold them equal on values and gradients in every
//! dtype. The CUDA kernels reduce in a fixed order (no atomics), so they are deterministic too;
//! the LayerNorm weight and bias gradients are per-block partial sums added in block order.
//!
//! Dropout draws from Philox4x32-10, a counter-based generator: each mask entry is a pure
//! function of a [`DropoutKey`] (seed, step, the global index of the sample), a site id naming
//! the dropout layer and the entry's position in its sample. Masks are therefore the same
//! whatever the thread count, and a batch split in chunks (data-parallel ranks, cached-loss
//! chunks) gets exactly the masks of the whole batch when each chunk passes its sample offset.

pub(crate) mod adamw;
mod bias;
#[cfg(feature = "cuda")]
pub(crate) mod cuda;
pub(crate) mod cz_nce;
pub(crate) mod dropout;
pub(crate) mod gelu;
pub(crate) mod gemm;
pub(crate) mod kernel;
mod layer_norm;
pub(crate) mod num;
pub(crate) mod philox;
pub(crate) mod softmax;
pub(crate) mod transformer;
pub(crate) mod transpose;
mod vocab_nll;

pub use bias::{bias_add, bias_add_composite, bias_add_fused};
pub use dropout::{dropout, dropout_composite, dropout_fused, dropout_mask, DropoutKey};
pub use gelu::{gelu, gelu_composite, gelu_fused, GeluForm};
pub use layer_norm::{layer_norm, layer_norm_composite, layer_norm_fused};
pub use softmax::{
    softmax_scaled_masked, softmax_scaled_masked_composite, softmax_scaled_masked_fused,
};
pub use vocab_nll::{vocab_nll, vocab_nll_composite, vocab_nll_fused, VOCAB_NLL_CHUNK};

/// Which implementation a module runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Kernels {
    /// The fused kernels on the CPU and on CUDA (with the `cuda` feature), the composite twins
    /// on other devices.
    #[default]
    Auto,
    /// The composite twins everywhere (the reference the fused kernels are tested against).
    Composite,
}

impl Kernels {
    /// Whether the fused kernels run on `device` (on CUDA for f32, f16 and bf16: the plain
    /// functions take the composite for f64).
    pub fn fused_on(self, device: &candle_core::Device) -> bool {
        self == Kernels::Auto && (device.is_cpu() || (cfg!(feature = "cuda") && device.is_cuda()))
    }
}

/// A crate error as a candle error, for `candle_nn::Module` implementations: candle's own
/// errors pass through unchanged.
pub(crate) fn to_candle(e: crate::Error) -> candle_core::Error {
    match e {
        crate::Error::Candle(e) => e,
        other => candle_core::Error::wrap(other),
    }
}
