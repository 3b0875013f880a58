//! The memory bank on disk (DESIGN "Memory bank on disk"): what stage 1 produced for a corpus, kept so
//! that a question never re-encodes a document.
//!
//! A bank is a directory:
//!
//! - `bank.json`, the manifest: format version, the [`MemoryFingerprint`] of the model that encoded it,
//!   the document table (id, source, token count, chunk range, text digest) and every data file with its
//!   size and CRC-32.
//! - `template.safetensors`: K and V of the template head `<|im_start|>user\n` for every layer, f32.
//! - Per append ("segment") and router layer, `seg000001-layer18.safetensors` with chunk-major `rk`
//!   (routing keys), `k` and `v`, each `[chunks, kv_heads, head_dim]` in bf16; and `seg000001-texts.json`,
//!   the documents' original text when it is known.
//!
//! A shard key file ([`ShardKeysFile`]) is not part of a bank: it holds one Memory Parallel shard's
//! routing keys, exported for a shard server that needs nothing else.
//!
//! Appends only create new files, then swap the manifest atomically (write `bank.json.tmp`, fsync,
//! rename, fsync the directory): a crash or a full disk mid-append leaves the bank as it was. Files of
//! an append that never committed are not referenced and are replaced by the next append.

mod manifest;
#[cfg(not(target_arch = "wasm32"))]
mod shard_keys;
#[cfg(not(target_arch = "wasm32"))]
mod store;
#[cfg(not(target_arch = "wasm32"))]
pub mod synthetic;

pub use manifest::{BankDocument, FORMAT_VERSION, FileEntry, Manifest, MemoryFingerprint, Segment};
#[cfg(not(target_arch = "wasm32"))]
pub use shard_keys::{SHARD_KEYS_FORMAT, SHARD_KEYS_VERSION, ShardKeysFile, ShardKeysHeader};
#[cfg(not(target_arch = "wasm32"))]
pub use store::{Bank, BankTensor, LayerRows, NewDocument, OpenOptions, WriteProgress};

/// Bytes of one bf16 element as the bank stores it.
pub const BANK_ELEMENT_BYTES: usize = 2;

/// CRC-32 of a byte string: the bank's file checksums and text digests.
pub fn digest(bytes: &[u8]) -> u32 {
    crc32fast::hash(bytes)
}
