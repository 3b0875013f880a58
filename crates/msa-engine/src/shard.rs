//! Memory Parallel shards (MSA-SPEC §5): the routing keys of a bank split by document into contiguous
//! ranges of about equal chunk counts. Each shard is scored where its keys live (a device of this
//! process, or a shard server in another process or on another machine) and selects its local top k;
//! the host merges the candidates into exactly the single-device selection.

use std::ops::Range;

#[cfg(not(target_arch = "wasm32"))]
use std::borrow::Cow;

#[cfg(not(target_arch = "wasm32"))]
use msa_core::bank::{Bank, BankTensor, ShardKeysFile};
#[cfg(not(target_arch = "wasm32"))]
use msa_core::{DType, MemoryFingerprint};

use crate::backend::{Backend, RoutingSpec};
#[cfg(not(target_arch = "wasm32"))]
use crate::error::Error;
use crate::error::Result;

/// The routing keys of one contiguous range of documents, on one backend.
pub struct ShardKeys<B: Backend> {
    pub(crate) first_document: usize,
    /// `[0, end of its first document, …]`, local to the shard.
    pub(crate) doc_chunk_offsets: Vec<u32>,
    /// Per router layer, `[chunks, kv_heads, head_dim]` in the stored dtype.
    pub(crate) keys: Vec<B::Weight>,
    /// Bytes of one router layer's keys.
    pub(crate) key_bytes: u64,
}

impl<B: Backend> ShardKeys<B> {
    /// Uploads the routing keys of `bank`'s documents `documents` (every router layer) to `b`, calling
    /// `progress` with the number of router layers done after each.
    #[cfg(not(target_arch = "wasm32"))]
    pub fn load(
        b: &B,
        bank: &Bank,
        documents: Range<usize>,
        progress: impl FnMut(usize),
    ) -> Result<Self> {
        let fp = bank.fingerprint();
        let table = bank.documents();
        if documents.start >= documents.end || documents.end > table.len() {
            return Err(Error::shape(
                "shard keys",
                format!(
                    "documents {documents:?} are not a non-empty range of the bank's {}",
                    table.len()
                ),
            ));
        }
        let chunks = bank.chunk_range(documents.clone());
        Self::upload(
            b,
            fp,
            documents.start,
            bank.chunk_offsets(documents.clone()),
            |slot| {
                let mut bytes = Vec::with_capacity(chunks.len() * fp.row_bytes());
                bank.read_rows(slot, BankTensor::RoutingKeys, chunks.clone(), &mut bytes);
                Cow::Owned(bytes)
            },
            progress,
        )
    }

    /// Uploads the routing keys a shard key file holds (`msa shard --export`) to `b`, calling
    /// `progress` with the number of router layers done after each.
    #[cfg(not(target_arch = "wasm32"))]
    pub fn from_file(b: &B, file: &ShardKeysFile, progress: impl FnMut(usize)) -> Result<Self> {
        let header = file.header();
        Self::upload(
            b,
            &header.fingerprint,
            header.documents[0],
            file.doc_chunk_offsets().to_vec(),
            |slot| Cow::Borrowed(file.routing_keys(slot)),
            progress,
        )
    }

    /// Uploads every router layer's keys, `keys(slot)`, bf16 `[chunks, kv_heads, head_dim]`.
    #[cfg(not(target_arch = "wasm32"))]
    fn upload<'k>(
        b: &B,
        fp: &MemoryFingerprint,
        first_document: usize,
        doc_chunk_offsets: Vec<u32>,
        keys: impl Fn(usize) -> Cow<'k, [u8]>,
        mut progress: impl FnMut(usize),
    ) -> Result<Self> {
        let chunks = *doc_chunk_offsets.last().expect("one document at least") as usize;
        let keys = (0..fp.router_layers.len())
            .map(|slot| {
                let keys = b.upload_weight(msa_core::TensorView {
                    name: "routing keys",
                    dtype: DType::BF16,
                    shape: &[chunks, fp.num_key_value_heads, fp.head_dim],
                    bytes: &keys(slot),
                });
                progress(slot + 1);
                keys
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(ShardKeys {
            first_document,
            doc_chunk_offsets,
            keys,
            key_bytes: chunks as u64 * fp.row_bytes() as u64,
        })
    }

    /// The global ids of the shard's documents.
    pub fn documents(&self) -> Range<usize> {
        self.first_document..self.first_document + self.doc_chunk_offsets.len() - 1
    }

    /// Bytes of one router layer's keys: what one scoring pass reads.
    pub fn key_bytes(&self) -> u64 {
        self.key_bytes
    }

    /// Records the scoring of every document of the shard with router queries `[n, heads, d]` on `b`
    /// (rows `rows` take part) for router layer `slot`: one score per document, in document order.
    pub fn score(
        &self,
        b: &B,
        slot: usize,
        queries: &B::Tensor,
        rows: &[u32],
        spec: RoutingSpec,
    ) -> Result<B::Tensor> {
        b.routing_scores(
            queries,
            rows,
            &self.keys[slot],
            &self.doc_chunk_offsets,
            spec,
        )
    }
}

/// Splits documents (`offsets` = `[0, end of doc 0, …]`) into at most `parts` non-empty contiguous
/// ranges of about equal chunk counts: shard `r` of `parts` serves range `r`. Every process of a Memory
/// Parallel run computes the same split from the same bank.
pub fn shard_ranges(offsets: &[u32], parts: usize) -> Vec<Range<usize>> {
    let documents = offsets.len() - 1;
    let total = u64::from(offsets[documents]);
    let mut ranges = Vec::with_capacity(parts);
    let mut start = 0;
    for part in 1..=parts {
        if start == documents {
            break;
        }
        // The first document end at or past this part's share of the chunks (at least one document).
        let target = total * part as u64 / parts as u64;
        let mut end = start + 1;
        while end < documents && u64::from(offsets[end]) < target {
            end += 1;
        }
        if part == parts {
            end = documents;
        }
        ranges.push(start..end);
        start = end;
    }
    ranges
}

/// Where a remote shard sits in the Memory Parallel run, as its server reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ShardPlacement {
    /// Its position among the shards (the local devices come first).
    pub rank: usize,
    /// How many shards the run splits the documents into.
    pub world: usize,
    /// The global ids of the documents it scores.
    pub documents: Range<usize>,
    /// Bytes of one router layer's keys.
    pub key_bytes: u64,
    /// [`msa_core::bank::Manifest::content_digest`] of the bank it serves.
    pub bank_digest: u32,
    /// The model shapes of that bank.
    pub fingerprint: msa_core::MemoryFingerprint,
}

/// One router layer's scoring, as sent to a remote shard.
pub struct ShardRequest<'a, B: Backend> {
    pub slot: usize,
    /// Router queries `[n, heads, d]`.
    pub queries: RouterQueries<'a, B>,
    pub shape: [usize; 3],
    pub rows: &'a [u32],
    pub top_k: usize,
    pub spec: RoutingSpec,
    /// Also return every document's score (tracing).
    pub keep_scores: bool,
}

/// Where a [`ShardRequest`]'s router queries are.
pub enum RouterQueries<'a, B: Backend> {
    /// On the host, row-major.
    Host(&'a [f32]),
    /// On the asking process's device, for a shard that takes them over its device link
    /// ([`RemoteShard::takes_device_queries`]).
    Device(&'a B::Tensor),
}

/// A remote shard's answer to a [`ShardRequest`].
#[derive(Clone, Debug, PartialEq)]
pub struct ShardAnswer {
    /// Its local top k as `(global document id, score)`, highest first, ties to the lower id.
    pub top: Vec<(usize, f32)>,
    /// Every document's score in document order, when asked for.
    pub scores: Option<Vec<f32>>,
}

/// A shard scored by another process (`msa shard`, reached over TCP by the `msa-shard` crate), for a
/// memory on backend `B`. [`RemoteShard::submit`] returns a ticket once the request is sent, so every
/// shard works at once; [`RemoteShard::collect`] waits for that ticket's answer. Every ticket is either
/// collected (the engine does, even when the query fails) or abandoned (when the query is dropped or
/// unwinds before), so a shard keeps no answer for nobody. Several threads may use one shard at once.
pub trait RemoteShard<B: Backend>: Send + Sync {
    /// Names the shard and where it runs, for errors and logs.
    fn describe(&self) -> String;
    fn placement(&self) -> &ShardPlacement;
    /// Whether requests may hand the router queries on the device ([`RouterQueries::Device`]): the
    /// shard has a device link from `B`'s device to its own. Otherwise they come on the host.
    fn takes_device_queries(&self) -> bool {
        false
    }
    fn submit(&self, request: &ShardRequest<'_, B>) -> Result<u64>;
    fn collect(&self, ticket: u64) -> Result<ShardAnswer>;
    /// Says that `ticket` will never be collected: its answer, come or to come, is dropped.
    fn abandon(&self, ticket: u64);
}

/// Tickets of requests sent to remote shards: collected together, or abandoned when dropped before
/// (a query future dropped mid-way, a panic unwinding through it).
#[cfg(not(target_arch = "wasm32"))]
pub(crate) struct Tickets<'a, B: Backend>(Vec<(&'a dyn RemoteShard<B>, u64)>);

#[cfg(not(target_arch = "wasm32"))]
impl<'a, B: Backend> Tickets<'a, B> {
    pub(crate) fn new() -> Self {
        Tickets(Vec::new())
    }

    pub(crate) fn push(&mut self, remote: &'a dyn RemoteShard<B>, ticket: u64) {
        self.0.push((remote, ticket));
    }

    /// Each ticket's answer, in the order sent, with the shard that gave it. Tickets are taken one
    /// at a time, so a panicking collect leaves the rest to be abandoned.
    pub(crate) fn collect(mut self) -> Vec<(&'a dyn RemoteShard<B>, Result<ShardAnswer>)> {
        let mut answers = Vec::with_capacity(self.0.len());
        while !self.0.is_empty() {
            let (remote, ticket) = self.0.remove(0);
            answers.push((remote, remote.collect(ticket)));
        }
        answers
    }
}

#[cfg(not(target_arch = "wasm32"))]
impl<B: Backend> Drop for Tickets<'_, B> {
    /// May wait for a shard's lock, which another thread holds while it reads a reply.
    fn drop(&mut self) {
        for (remote, ticket) in self.0.drain(..) {
            remote.abandon(ticket);
        }
    }
}

/// One shard of a memory's routing keys and where it is scored.
pub(crate) enum RoutingShard<B: Backend> {
    /// On a device of this process; `device: None` is the model's backend.
    Local {
        device: Option<B>,
        keys: ShardKeys<B>,
    },
    /// In another process.
    #[cfg(not(target_arch = "wasm32"))]
    Remote(Box<dyn RemoteShard<B>>),
}

impl<B: Backend> RoutingShard<B> {
    pub(crate) fn key_bytes(&self) -> u64 {
        match self {
            RoutingShard::Local { keys, .. } => keys.key_bytes,
            #[cfg(not(target_arch = "wasm32"))]
            RoutingShard::Remote(remote) => remote.placement().key_bytes,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::shard_ranges;

    #[test]
    fn shards_balance_chunks_and_cover_every_document() {
        assert_eq!(shard_ranges(&[0, 4, 8, 12, 16], 2), [0..2, 2..4]);
        assert_eq!(shard_ranges(&[0, 10, 11, 12, 13], 2), [0..1, 1..4]);
        assert_eq!(shard_ranges(&[0, 3], 3), vec![0..1]);
        assert_eq!(shard_ranges(&[0, 1, 2, 3, 4, 5], 3), [0..1, 1..3, 3..5]);
        assert!(shard_ranges(&[0], 2).is_empty());
    }
}
