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
mod pretrained;

pub use bert::{BertEncoder, BertForMaskedLm, EncoderOutput, MaskedLmOutput, MlmHead};
#[cfg(feature = "hub")]
pub(crate) use checkpoint::shard_names;
pub(crate) use checkpoint::{read_checkpoint_dir, save_params, write_atomic};
pub use checkpoint::{
    CheckpointTensors, CONFIG_FILE, TOKENIZER_FILE, WEIGHTS_FILE, WEIGHTS_INDEX_FILE,
};
pub use config::{BertConfig, HiddenAct};
pub(crate) use layers::{accumulation_dtype, linear, LinearInit};
pub use layers::{Dropout, DropoutRng, LayerNorm};
pub use params::ParamStore;
pub use pretrained::{LoadReport, PretrainedBert};
