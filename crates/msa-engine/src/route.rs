//! Stage 2's memory side, for one router layer: selecting the global top k over every Memory Parallel
//! shard, and fetching the selected documents' K̄/V̄ from wherever the memory keeps them.

#[cfg(not(target_arch = "wasm32"))]
use std::ops::Range;

#[cfg(not(target_arch = "wasm32"))]
use msa_core::DType;
#[cfg(not(target_arch = "wasm32"))]
use msa_core::bank::{Bank, BankTensor};

use crate::backend::{Backend, RoutingSpec};
use crate::cpu::select_top_k;
use crate::error::Result;
use crate::memory::{Content, Memory};

/// The documents one router layer selected.
pub struct Selection<T> {
    /// `(document, score)`, highest score first; ties go to the lower document.
    pub documents: Vec<(usize, f32)>,
    /// Every document's score on the caller's backend, when asked for (tracing).
    pub scores: Option<T>,
    /// Routing-key bytes the scoring read, over every shard.
    pub scanned_bytes: u64,
}

/// The selected documents' pooled rows, ready for the attention context.
pub struct Fetched<T> {
    /// `[chunks, kv_heads, head_dim]`, f32.
    pub k: T,
    pub v: T,
    pub chunks: usize,
    /// Bytes read from the bank's host pages and uploaded (0 for a memory held on the device).
    pub host_bytes: u64,
}

impl<B: Backend> Memory<B> {
    /// Scores every document of router layer `slot` (its index among the router layers) with the router
    /// queries `[n, heads, d]` on `b` (rows `rows` take part) and selects the top k. Each shard scores its
    /// documents on its own device and selects its local top k; the host merges them with the
    /// single-device rule, so the selection equals one device's exactly.
    ///
    /// `meanwhile` (which records more work on `b`) runs after every shard's selection has been
    /// submitted and before any is awaited: its work is submitted behind the routing and runs while the
    /// host merges the selection and fetches pages. Its result is returned beside the selection.
    #[allow(clippy::too_many_arguments)]
    pub async fn select<T>(
        &self,
        b: &B,
        slot: usize,
        queries: &B::Tensor,
        rows: &[u32],
        top_k: usize,
        spec: RoutingSpec,
        keep_scores: bool,
        meanwhile: impl FnOnce() -> Result<T>,
    ) -> Result<(Selection<B::Tensor>, T)> {
        // Shards on other devices get the router queries through the host (a few KB).
        let host_queries = if self.shards.iter().any(|s| s.backend.is_some()) {
            Some(b.read(queries).await?)
        } else {
            None
        };
        let mut scored = Vec::with_capacity(self.shards.len());
        for shard in &self.shards {
            let on = shard.backend.as_ref().unwrap_or(b);
            let q = match (&shard.backend, &host_queries) {
                (Some(device), Some(host)) => device.upload(host, &b.shape(queries))?,
                _ => queries.clone(),
            };
            let scores =
                on.routing_scores(&q, rows, &shard.keys[slot], &shard.doc_chunk_offsets, spec)?;
            scored.push((shard, on, scores));
        }
        // Every shard submits its selection before any is awaited, so the devices work concurrently.
        let pending: Vec<_> = scored
            .iter()
            .map(|(_, on, scores)| on.top_k(scores, top_k))
            .collect();
        let meanwhile = meanwhile()?;
        b.flush();
        let mut candidates: Vec<(usize, f32)> = Vec::new();
        for ((shard, _, _), top) in scored.iter().zip(pending) {
            candidates.extend(
                top.await?
                    .into_iter()
                    .map(|s| (shard.first_document + s.index as usize, s.score)),
            );
        }
        // The same selection rule over the candidates in document order: ties go to the lower id.
        candidates.sort_unstable_by_key(|&(id, _)| id);
        let merged = select_top_k(
            &candidates.iter().map(|&(_, s)| s).collect::<Vec<_>>(),
            top_k,
        );
        let documents = merged
            .iter()
            .map(|s| (candidates[s.index as usize].0, s.score))
            .collect();
        let scores = match (keep_scores, scored.as_slice()) {
            (false, _) => None,
            (true, [(shard, _, scores)]) if shard.backend.is_none() => Some(scores.clone()),
            (true, _) => {
                let mut all = Vec::with_capacity(self.documents().len());
                for (_, on, scores) in &scored {
                    all.extend(on.read(scores).await?);
                }
                Some(b.upload(&all, &[all.len()])?)
            }
        };
        Ok((
            Selection {
                documents,
                scores,
                scanned_bytes: self.shards.iter().map(|s| s.key_bytes).sum(),
            },
            meanwhile,
        ))
    }

    /// The chunks of `selected` documents (ascending ids) in router layer `slot`, on `b`.
    pub fn fetch(&self, b: &B, slot: usize, selected: &[usize]) -> Result<Fetched<B::Tensor>> {
        match &self.content {
            Content::Device(layers) => {
                let chunks: Vec<u32> = selected
                    .iter()
                    .flat_map(|&d| self.documents()[d].chunks.clone())
                    .collect();
                let pooled = &layers[slot];
                Ok(Fetched {
                    k: b.gather_rows(&pooled.k, &chunks)?,
                    v: b.gather_rows(&pooled.v, &chunks)?,
                    chunks: chunks.len(),
                    host_bytes: 0,
                })
            }
            #[cfg(not(target_arch = "wasm32"))]
            Content::Host(bank) => self.fetch_pages(b, bank, slot, selected),
        }
    }

    #[cfg(not(target_arch = "wasm32"))]
    /// Gathers the selected documents' K̄ then V̄ rows from the bank's host pages into one contiguous bf16
    /// upload `[2 × chunks, kv_heads × head_dim]`, widened on the device into the f32 `(K, V)`.
    fn fetch_pages(
        &self,
        b: &B,
        bank: &Bank,
        slot: usize,
        selected: &[usize],
    ) -> Result<Fetched<B::Tensor>> {
        let fp = bank.fingerprint();
        let ranges: Vec<Range<u32>> = selected
            .iter()
            .map(|&d| self.documents()[d].chunks.clone())
            .collect();
        let chunks: usize = ranges.iter().map(|r| r.len()).sum();
        // The selected rows, K then V, handed to the backend piece by piece from the mapped segments.
        let mut gather = |sink: &mut dyn FnMut(&[u8])| {
            for tensor in [BankTensor::K, BankTensor::V] {
                for range in &ranges {
                    bank.row_slices(slot, tensor, range.clone())
                        .for_each(&mut *sink);
                }
            }
        };
        let pages = b.upload_weight_from(
            "fetched memory pages",
            DType::BF16,
            &[2 * chunks, fp.num_key_value_heads * fp.head_dim],
            &mut gather,
        )?;
        let shape = [chunks, fp.num_key_value_heads, fp.head_dim];
        let rows = |range: Range<u32>| -> Result<B::Tensor> {
            b.reshape(&b.embedding(&pages, &range.collect::<Vec<_>>())?, &shape)
        };
        let n = chunks as u32;
        Ok(Fetched {
            k: rows(0..n)?,
            v: rows(n..2 * n)?,
            chunks,
            host_bytes: (2 * chunks * fp.row_bytes()) as u64,
        })
    }
}
