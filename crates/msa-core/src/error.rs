//! The error type of msa-core: every variant names the file, field or tensor at fault.

use std::path::PathBuf;

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("{path}: invalid JSON: {source}")]
    Json {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },

    #[error("config {path}: {problem}")]
    Config { path: PathBuf, problem: String },

    #[error(
        "checkpoint {path}: not a valid safetensors file ({detail}); the file may be truncated or corrupt"
    )]
    Safetensors { path: PathBuf, detail: String },

    #[error("checkpoint in {dir}: no model.safetensors or model.safetensors.index.json")]
    NoWeights { dir: PathBuf },

    #[error("checkpoint: tensor `{name}` is missing (looked in {files})")]
    MissingTensor { name: String, files: String },

    #[error(
        "checkpoint {path}: tensor `{name}` has shape {actual:?}, the config implies {expected:?}"
    )]
    ShapeMismatch {
        path: PathBuf,
        name: String,
        expected: Vec<usize>,
        actual: Vec<usize>,
    },

    #[error("checkpoint {path}: tensor `{name}` has dtype {dtype}, expected one of F32, F16, BF16")]
    UnsupportedDType {
        path: PathBuf,
        name: String,
        dtype: String,
    },

    #[error("tokenizer {path}: {detail}")]
    Tokenizer { path: PathBuf, detail: String },

    #[error("sampling: {0}")]
    Sampling(String),

    /// A Memory Interleave conversation that does not follow the protocol.
    #[error("memory interleave: {0}")]
    Interleave(String),

    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("memory bank {path}: {problem}")]
    Bank { path: PathBuf, problem: String },
}

impl Error {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }

    #[cfg_attr(target_arch = "wasm32", allow(dead_code))] // the bank store writes files natively
    pub(crate) fn write(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Write {
            path: path.into(),
            source,
        }
    }

    pub(crate) fn config(path: impl Into<PathBuf>, problem: impl Into<String>) -> Self {
        Error::Config {
            path: path.into(),
            problem: problem.into(),
        }
    }
}
