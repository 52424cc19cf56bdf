//! A trainable BERT / mBERT encoder that returns every hidden state, its MLM head, and Hugging
//! Face checkpoint loading and saving.
//!
//! candle-transformers' BERT returns only the last layer and its dropout does nothing, and
//! candle-nn's fused LayerNorm has no backward pass; this encoder is built from differentiable
//! ops so that every weight trains.

mod bert;
mod checkpoint;
mod config;
mod layers;
mod params;

pub use bert::{Backward, BertEncoder, BertForMaskedLm, EncoderOutput, MaskedLmOutput, MlmHead};
pub use checkpoint::CheckpointTensors;
pub(crate) use checkpoint::{
    checkpoint_name, read_checkpoint_dir, save_params, save_params_as, save_tensors,
};
pub use config::{BertConfig, HiddenAct};
pub(crate) use layers::{linear, LinearInit};
pub use layers::{Dropout, DropoutRng, LayerNorm};
pub use params::ParamStore;
