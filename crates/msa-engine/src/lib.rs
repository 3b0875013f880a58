//! msa-engine: the MSA pipeline written once over a [`Backend`] trait.
//!
//! - [`backend`]: the op-level interface (embedding, matmul, RMSNorm, RoPE, attention, pooling, routing…).
//! - [`cpu`]: the CPU reference backend every other backend is tested against.
//! - [`model`]: weights uploaded to a backend in their stored dtype.
//! - [`memory`]: stage 1, memory encoding into pooled per-router-layer K, V and routing keys.
//! - [`bank`]: memories on disk: create, encode into (resumable), open sharded over devices.
//! - [`session`]: stage 2 (routing + context assembly + prefill) and stage 3 (decoding).
//! - [`interleave`]: Memory Interleave, multi-round generative retrieval over stages 2 and 3.
//! - `conformance` (feature `conformance`): the checks every backend must pass against the CPU reference.

pub mod backend;
#[cfg(not(target_arch = "wasm32"))]
pub mod bank;
#[cfg(feature = "conformance")]
pub mod conformance;
pub mod cpu;
pub mod error;
pub mod interleave;
mod layer;
pub mod memory;
pub mod model;
pub mod route;
pub mod session;
pub mod shapes;
pub mod shard;

pub use backend::{AttentionMask, Backend, DeviceLink, RoutingSpec, Scored};
#[cfg(not(target_arch = "wasm32"))]
pub use bank::{BankEncodeOptions, BankEncodeReport, SourceDocument};
pub use cpu::{CpuBackend, CpuTensor, RopeTableCache, rope_table, select_top_k};
pub use error::{Error, Result};
pub use interleave::{
    InterleaveEvent, InterleaveFinish, InterleaveOptions, InterleaveOutcome, Phase, RetrievalEnd,
};
pub use memory::{
    EncodeProgress, LayerMemory, Memory, MemoryDocument, MemoryFingerprint, PACK_TOKENS,
};
pub use model::Model;
pub use route::{Fetched, Selection};
pub use session::{
    BlockAttention, FinishReason, GenerateOptions, Generation, LayerRouting, RouteStats,
    RoutedDocument, Session, Trace,
};
pub use shard::{
    RemoteShard, RouterQueries, ShardAnswer, ShardKeys, ShardPlacement, ShardRequest, shard_ranges,
};
