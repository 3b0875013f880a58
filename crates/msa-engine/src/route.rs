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
use crate::error::{Error, Result};
use crate::memory::{Content, Memory};
use crate::shard::RoutingShard;
#[cfg(not(target_arch = "wasm32"))]
use crate::shard::{RemoteShard, RouterQueries, ShardAnswer, ShardRequest, Tickets};

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
        // Shards on other devices of this process get the router queries device to device where the
        // backend can (`Backend::broadcast`), else through the host; remote shards over their device
        // link where they have one (`Backend::join_link`), else through the host too.
        let shape = b.shape(queries);
        let on_model_backend =
            |shard: &RoutingShard<B>| matches!(shard, RoutingShard::Local { device: None, .. });
        let peers: Vec<&B> = self
            .shards
            .iter()
            .filter_map(|shard| match shard {
                RoutingShard::Local { device, .. } => device.as_ref(),
                #[cfg(not(target_arch = "wasm32"))]
                RoutingShard::Remote(_) => None,
            })
            .collect();
        let broadcast = match peers.as_slice() {
            [] => None,
            peers => match b.broadcast(queries, peers).transpose()? {
                Some(copies) if copies.len() != peers.len() => {
                    let detail = format!("{} copies for {} devices", copies.len(), peers.len());
                    return Err(Error::shape("broadcast", detail));
                }
                copies => copies,
            },
        };
        // Each remote shard, and whether it takes the router queries on the device (over its device
        // link; asked once, as a link may go with its connection): the others take them on the host.
        #[cfg(not(target_arch = "wasm32"))]
        let remotes: Vec<(&dyn RemoteShard<B>, bool)> = (self.shards.iter())
            .filter_map(|shard| match shard {
                RoutingShard::Remote(remote) => {
                    Some((remote.as_ref(), remote.takes_device_queries()))
                }
                RoutingShard::Local { .. } => None,
            })
            .collect();
        #[cfg(not(target_arch = "wasm32"))]
        let remote = remotes.iter().any(|&(_, on_device)| !on_device);
        #[cfg(target_arch = "wasm32")]
        let remote = false;
        let host_queries = if remote || (broadcast.is_none() && !peers.is_empty()) {
            Some(b.read(queries).await?)
        } else {
            None
        };
        // Each local device's router queries, in shard order.
        let mut peer_queries = match (broadcast, &host_queries) {
            (Some(copies), _) => copies,
            (None, Some(host)) => (peers.iter())
                .map(|device| device.upload(host, &shape))
                .collect::<Result<_>>()?,
            (None, None) => Vec::new(),
        }
        .into_iter();
        // Remote shards are asked first, so they score while this process records its own work. Each
        // ticket is collected below whatever fails in between, so no answer is left unread.
        #[cfg(not(target_arch = "wasm32"))]
        let (tickets, submitted) = Self::submit_remote(
            &remotes,
            b,
            (queries, host_queries.as_deref()),
            &shape,
            slot,
            rows,
            top_k,
            spec,
            keep_scores,
        );
        #[cfg(target_arch = "wasm32")]
        let submitted: Result<()> = Ok(());
        let local = async {
            submitted?;
            let mut scored = Vec::with_capacity(self.shards.len());
            #[allow(irrefutable_let_patterns)] // a browser build has no remote shards
            for shard in &self.shards {
                if let RoutingShard::Local { device, keys } = shard {
                    let on = device.as_ref().unwrap_or(b);
                    let q = match device {
                        None => queries.clone(),
                        Some(_) => peer_queries.next().expect("queries for every local device"),
                    };
                    scored.push((keys, on, keys.score(on, slot, &q, rows, spec)?));
                }
            }
            // Every shard submits its selection before any is awaited, so the devices work at once.
            let pending: Vec<_> = scored
                .iter()
                .map(|(_, on, scores)| on.top_k(scores, top_k))
                .collect();
            let meanwhile = meanwhile()?;
            b.flush();
            let mut candidates: Vec<(usize, f32)> = Vec::new();
            for ((keys, _, _), top) in scored.iter().zip(pending) {
                candidates.extend(
                    top.await?
                        .into_iter()
                        .map(|s| (keys.first_document + s.index as usize, s.score)),
                );
            }
            Ok::<_, Error>((scored, candidates, meanwhile))
        }
        .await;
        #[cfg(not(target_arch = "wasm32"))]
        let answers: Vec<Result<ShardAnswer>> = tickets
            .collect()
            .into_iter()
            .map(|(remote, answer)| checked_answer(remote, answer?, top_k, keep_scores))
            .collect();
        let (scored, mut candidates, meanwhile) = local?;
        #[cfg_attr(target_arch = "wasm32", allow(unused_mut))]
        let mut remote_scores: Vec<Vec<f32>> = Vec::new();
        #[cfg(not(target_arch = "wasm32"))]
        for answer in answers {
            let answer = answer?;
            candidates.extend(answer.top);
            remote_scores.extend(answer.scores);
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
            (true, [(_, _, scores)]) if self.shards.iter().all(on_model_backend) => {
                Some(scores.clone())
            }
            (true, _) => {
                // Local shards hold the first documents, remote ones the rest, each in rank order.
                let mut all = Vec::with_capacity(self.documents().len());
                for (_, on, scores) in &scored {
                    all.extend(on.read(scores).await?);
                }
                all.extend(remote_scores.into_iter().flatten());
                Some(b.upload(&all, &[all.len()])?)
            }
        };
        Ok((
            Selection {
                documents,
                scores,
                scanned_bytes: self.shards.iter().map(RoutingShard::key_bytes).sum(),
            },
            meanwhile,
        ))
    }

    /// Sends router layer `slot`'s request to every remote shard: the routing rows of the router
    /// queries `[n, heads, d]` only (16 KB per routing token at MSA-4B), renumbered from 0, from the
    /// device to shards with a device link, else from the host's copy. The tickets of the requests
    /// sent come back even when one fails.
    #[cfg(not(target_arch = "wasm32"))]
    #[allow(clippy::too_many_arguments)]
    fn submit_remote<'a>(
        remotes: &[(&'a dyn RemoteShard<B>, bool)],
        b: &B,
        (queries, host): (&B::Tensor, Option<&[f32]>),
        shape: &[usize],
        slot: usize,
        rows: &[u32],
        top_k: usize,
        spec: RoutingSpec,
        keep_scores: bool,
    ) -> (Tickets<'a, B>, Result<()>) {
        let mut tickets = Tickets::new();
        if remotes.is_empty() {
            return (tickets, Ok(()));
        }
        let &[n, heads, d] = shape else {
            let detail = format!("router queries {shape:?} are not [n, heads, d]");
            return (tickets, Err(Error::shape("routing_scores", detail)));
        };
        if let Some(row) = rows.iter().find(|&&row| row as usize >= n) {
            let detail = format!("routing row {row} of {n} query rows");
            return (tickets, Err(Error::shape("routing_scores", detail)));
        }
        let every_row = rows.len() == n && rows.iter().enumerate().all(|(i, &r)| i == r as usize);
        let on_device = match remotes.iter().any(|&(_, on_device)| on_device) {
            false => None,
            true if every_row => Some(queries.clone()),
            true => match b.gather_rows(queries, rows) {
                Ok(routed) => Some(routed),
                Err(e) => return (tickets, Err(e)),
            },
        };
        let on_host: Vec<f32> = (host.into_iter())
            .flat_map(|host| {
                let width = heads * d;
                rows.iter()
                    .flat_map(move |&row| &host[row as usize * width..(row as usize + 1) * width])
            })
            .copied()
            .collect();
        let renumbered: Vec<u32> = (0..rows.len() as u32).collect();
        for &(remote, takes_device) in remotes {
            let queries = match (&on_device, takes_device) {
                (Some(device), true) => RouterQueries::Device(device),
                _ => RouterQueries::Host(&on_host),
            };
            let request = ShardRequest {
                slot,
                queries,
                shape: [rows.len(), heads, d],
                rows: &renumbered,
                top_k,
                spec,
                keep_scores,
            };
            match remote.submit(&request) {
                Ok(ticket) => tickets.push(remote, ticket),
                Err(e) => return (tickets, Err(e)),
            }
        }
        (tickets, Ok(()))
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
    fn fetch_pages<'m>(
        &self,
        b: &B,
        bank: &'m Bank,
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
        let mut gather = |sink: &mut dyn FnMut(&'m [u8])| {
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

/// A remote shard's answer, checked against what was asked: at most `top_k` documents of its own, and
/// one score per document when scores were asked for.
#[cfg(not(target_arch = "wasm32"))]
fn checked_answer<B: Backend>(
    remote: &dyn RemoteShard<B>,
    answer: ShardAnswer,
    top_k: usize,
    keep_scores: bool,
) -> Result<ShardAnswer> {
    let documents = &remote.placement().documents;
    let problem = if answer.top.len() > top_k.min(documents.len()) {
        Some(format!(
            "{} documents selected of {top_k}",
            answer.top.len()
        ))
    } else if let Some(&(id, _)) = answer.top.iter().find(|(id, _)| !documents.contains(id)) {
        Some(format!("document {id} selected, outside its {documents:?}"))
    } else if answer
        .top
        .iter()
        .enumerate()
        .any(|(i, (id, _))| answer.top[..i].iter().any(|(other, _)| other == id))
    {
        Some("a document selected twice".to_string())
    } else if keep_scores && answer.scores.as_ref().map(Vec::len) != Some(documents.len()) {
        Some(format!(
            "{} scores for its {} documents",
            answer.scores.as_ref().map_or(0, Vec::len),
            documents.len()
        ))
    } else {
        None
    };
    match problem {
        Some(detail) => Err(Error::Shard {
            shard: remote.describe(),
            detail: format!("answered with {detail}"),
        }),
        None => Ok(answer),
    }
}
