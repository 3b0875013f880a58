//! The error type of msa-engine.

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Core(#[from] msa_core::Error),

    /// An op was called with tensors whose shapes do not fit together.
    #[error("{op}: {detail}")]
    Shape { op: &'static str, detail: String },

    #[error("document {index} is empty; every memory document needs text")]
    EmptyDocument { index: usize },

    #[error("the question is empty")]
    EmptyQuestion,

    #[error("the memory holds no documents; encode at least one before asking")]
    NoDocuments,

    #[error("{0} needs an MSA model (config.json has no msa_config)")]
    NotAnMsaModel(&'static str),

    #[error("token id {id} is outside the vocabulary of {vocab}")]
    TokenOutOfRange { id: u32, vocab: usize },

    /// A memory or bank encoded by another model (or another checkpoint of the same shape).
    #[error(
        "{memory} was encoded by a different model; differences (memory vs this model): {differences}"
    )]
    MemoryMismatch { memory: String, differences: String },

    #[error("the prompt is empty")]
    EmptyPrompt,

    /// The GPU device was lost (driver reset, removal, or a previous fatal error); recreate the backend.
    #[error(
        "{backend}: the GPU device was lost ({reason}); everything on it is gone: open the device \
         and load the model again"
    )]
    DeviceLost { backend: String, reason: String },

    /// The device ran out of memory.
    #[error("{backend}: out of device memory: {detail}")]
    OutOfDeviceMemory { backend: String, detail: String },

    /// A Memory Parallel shard served by another process is unreachable, failed, or does not fit this
    /// memory (another bank, another split).
    #[error("{shard}: {detail}")]
    Shard { shard: String, detail: String },

    /// Any other device-side failure (a validation or internal error of the GPU API, a limit exceeded).
    #[error("{backend}: {message}")]
    Device { backend: String, message: String },
}

impl Error {
    pub fn shape(op: &'static str, detail: impl Into<String>) -> Self {
        Error::Shape {
            op,
            detail: detail.into(),
        }
    }
}
