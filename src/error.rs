//! The crate's one error type.

use std::path::PathBuf;

/// Every fallible function in `mlctl` returns this error.
///
/// Variants carry what a user needs to fix the problem: the file and line of bad input, the
/// names of missing tensors, the expected and actual shapes.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// An error raised by a candle tensor operation.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),

    /// An error raised by the `tokenizers` crate.
    #[error("tokenizer: {0}")]
    Tokenizer(#[source] tokenizers::Error),

    /// Reading or writing a file failed.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file or directory involved.
        path: PathBuf,
        /// The underlying I/O error.
        #[source]
        source: std::io::Error,
    },

    /// A JSON file (config, metadata) could not be parsed or written.
    #[error("{}: invalid JSON: {source}", path.display())]
    Json {
        /// The JSON file.
        path: PathBuf,
        /// The underlying parse error.
        #[source]
        source: serde_json::Error,
    },

    /// A checkpoint file is truncated, corrupt or in a format this crate does not read.
    #[error("{}: {reason}", path.display())]
    Checkpoint {
        /// The checkpoint file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },

    /// A model configuration is inconsistent or unsupported.
    #[error("bad config: {0}")]
    Config(String),

    /// Tensors the model needs are absent from the checkpoint.
    #[error("checkpoint lacks {} tensor(s): {}", names.len(), names.join(", "))]
    MissingTensors {
        /// Canonical (transformers) names of the missing tensors.
        names: Vec<String>,
    },

    /// A tensor has a shape other than the one the model expects.
    #[error("{name}: expected shape {expected:?}, got {actual:?}")]
    ShapeMismatch {
        /// The tensor or argument name.
        name: String,
        /// The shape the model expects.
        expected: Vec<usize>,
        /// The shape that was found.
        actual: Vec<usize>,
    },

    /// A line of an input data file is malformed.
    #[error("{}:{line}: {reason}", path.display())]
    Data {
        /// The data file.
        path: PathBuf,
        /// 1-based line number.
        line: usize,
        /// What is wrong with the line.
        reason: String,
    },

    /// A model could not be found locally and could not be fetched from the Hugging Face hub.
    #[error("model `{model}`: {reason}")]
    Hub {
        /// The model id or path the user gave.
        model: String,
        /// Why it could not be resolved.
        reason: String,
    },

    /// Training produced non-finite losses or gradients too many steps in a row.
    #[error(
        "training diverged: {consecutive} consecutive steps with a non-finite loss or gradient \
         (the last at step {step}); lower the learning rate or check the data"
    )]
    Diverged {
        /// The step of the last non-finite update.
        step: u64,
        /// How many steps in a row were skipped.
        consecutive: usize,
    },

    /// A function argument is out of its valid range.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),

    /// Distributed training failed: a bad launch environment (`RANK`, `WORLD_SIZE`, ...), a
    /// rendezvous that timed out or was refused, ranks that called different collectives, or a
    /// rank that failed or left while the others waited for it.
    #[error("distributed: {0}")]
    Distributed(String),
}

impl Error {
    /// Wraps an I/O error with the path it happened on.
    pub(crate) fn io(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> Error {
        let path = path.into();
        move |source| Error::Io { path, source }
    }
}

/// `Result` with the crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
