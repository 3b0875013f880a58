//! msa-core: everything about an MSA model that is not arithmetic.
//!
//! - [`config`]: Hugging Face `config.json` for Qwen3 and MSA checkpoints (MSA-SPEC §1).
//! - [`checkpoint`]: memory-mapped safetensors (single file or sharded), checked against the config (§2).
//! - [`tokenizer`]: the `tokenizers` crate plus the exact MSA prompt construction (§4.4).
//! - [`sampling`]: greedy, temperature and top-p sampling, seedable.
//! - [`bank`]: the memory bank on disk: manifest, per-layer safetensors, crash-safe appends.
//!
//! Nothing here knows about a GPU API, and everything compiles for `wasm32-unknown-unknown`.

pub mod bank;
pub mod checkpoint;
pub mod config;
pub mod dtype;
pub mod error;
pub mod interleave;
pub mod sampling;
pub mod tokenizer;

pub use bank::MemoryFingerprint;
pub use checkpoint::{Checkpoint, TensorView};
pub use config::{ChunkReduce, HeadReduce, ModelConfig, MsaConfig, QueryReduce, ScoreMode};
pub use dtype::DType;
pub use error::{Error, Result};
pub use sampling::{Sampler, SamplingParams};
pub use tokenizer::{MsaTokenizer, QueryPrompt, TextStream, TokenRole};
