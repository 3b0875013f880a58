//! The op-level interface every engine backend implements.
//!
//! Ops are functional: they take tensors and return new ones, so a GPU backend can record each op into a
//! command encoder and submit later ("record, then submit"). Only [`Backend::read`] and
//! [`Backend::top_k`] return futures: they are the host decisions that force a readback. Tensors are f32
//! activations; weights stay in their stored dtype and are widened inside the ops.

use std::future::Future;
use std::ops::Range;

use msa_core::{ChunkReduce, DType, HeadReduce, QueryReduce, ScoreMode, TensorView};

use rayon::prelude::*;

use crate::error::{Error, Result};
use crate::shapes::check_weight_len;

/// Which keys a query may attend to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttentionMask<'a> {
    /// Bottom-right aligned causal mask: with `nq` queries and `nk` keys, query `i` sees keys
    /// `0..=nk - nq + i`, i.e. the whole prefix plus the query block up to itself (flash-attn semantics).
    Causal,
    /// Every query sees every key.
    Full,
    /// Several sequences packed into one block (stage 1 encodes many documents per forward):
    /// block-diagonal causal. The queries are the keys (`nq == nk`); `starts` holds each sequence's first
    /// row, ascending from 0, and query `i` sees keys from its sequence's start up to itself.
    Packed(&'a [u32]),
}

impl AttentionMask<'_> {
    /// The keys query `i` of `nq` sees among `nk` (shapes already checked by
    /// [`crate::shapes::attention_mask`]).
    pub fn visible_keys(&self, i: usize, nq: usize, nk: usize) -> Range<usize> {
        match self {
            AttentionMask::Causal => 0..nk - nq + i + 1,
            AttentionMask::Full => 0..nk,
            AttentionMask::Packed(starts) => {
                let sequence = starts.partition_point(|&s| s as usize <= i) - 1;
                starts[sequence] as usize..i + 1
            }
        }
    }
}

/// How router queries are scored against pooled routing keys (MSA-SPEC §3.3 a, §3.6).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RoutingSpec {
    pub score_mode: ScoreMode,
    pub head_reduce: HeadReduce,
    pub query_reduce: QueryReduce,
    pub chunk_reduce: ChunkReduce,
}

/// Produces a weight's bytes in order, handing each piece to the sink it is given (see
/// [`Backend::upload_weight_from`]). The pieces outlive the writer (they are slices of a bank's
/// mapped segments), so a backend may hold them all and copy them at once with [`gather_pieces`].
pub type PieceWriter<'w, 'p> = dyn FnMut(&mut dyn FnMut(&'p [u8])) + 'w;

/// Gathers below this many bytes are copied by the calling thread alone.
const PARALLEL_GATHER_MIN: usize = 256 << 10;
/// The most bytes one thread copies as one task: long pieces are split so every thread gets work.
const GATHER_TASK_BYTES: usize = 64 << 10;

/// Copies the pieces `write` hands over, in order, into `dst`, and returns how many bytes it handed
/// over. When that is not `dst.len()`, nothing is copied (the caller refuses the weight). Large
/// gathers are spread over rayon's threads: copying fetched pages out of a bank's mapped segments
/// runs at one core's copy and page-mapping rate (about 3 GB/s on a 2-core VM), far below the
/// memory's. Called from a rayon worker, the caller may run other rayon tasks while it waits (work
/// stealing), so it should hold no lock such a task could take.
pub fn gather_pieces<'p>(write: &mut PieceWriter<'_, 'p>, dst: &mut [u8]) -> usize {
    let mut pieces: Vec<&'p [u8]> = Vec::new();
    let mut handed = 0;
    write(&mut |piece| {
        handed += piece.len();
        pieces.push(piece);
    });
    if handed != dst.len() {
        return handed;
    }
    let mut rest = dst;
    let copies = pieces.into_iter().map(move |piece| {
        let (to, tail) = std::mem::take(&mut rest).split_at_mut(piece.len());
        rest = tail;
        (piece, to)
    });
    if handed < PARALLEL_GATHER_MIN {
        copies.for_each(|(piece, to)| to.copy_from_slice(piece));
    } else {
        let tasks: Vec<(&[u8], &mut [u8])> = copies
            .flat_map(|(piece, to)| {
                piece
                    .chunks(GATHER_TASK_BYTES)
                    .zip(to.chunks_mut(GATHER_TASK_BYTES))
            })
            .collect();
        tasks
            .into_par_iter()
            .for_each(|(piece, to)| to.copy_from_slice(piece));
    }
    handed
}

/// [`Backend::upload_weight_from`] through one host buffer and [`Backend::upload_weight`]: the default,
/// and a GPU backend's way for weights its direct path does not take.
pub fn upload_through_host<B: Backend + ?Sized>(
    b: &B,
    name: &str,
    dtype: DType,
    shape: &[usize],
    write: &mut PieceWriter<'_, '_>,
) -> Result<B::Weight> {
    let mut bytes = vec![0; shape.iter().product::<usize>() * dtype.size_in_bytes()];
    let handed = gather_pieces(write, &mut bytes);
    check_weight_len(name, dtype, shape, handed)?;
    b.upload_weight(TensorView {
        name,
        dtype,
        shape,
        bytes: &bytes,
    })
}

/// A document picked by [`Backend::top_k`]: its index in the scored list and its score.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Scored {
    pub index: u32,
    pub score: f32,
}

impl Scored {
    /// Marks an empty slot in a GPU top-k's (raw score bits, index) pairs.
    pub const NO_INDEX: u32 = u32::MAX;

    /// The selection a GPU top-k leaves as (raw score bits, index) pairs, in rank order, empty slots
    /// ([`Scored::NO_INDEX`]) dropped.
    pub fn from_device_pairs(words: &[u32]) -> Vec<Scored> {
        words
            .chunks_exact(2)
            .filter(|pair| pair[1] != Self::NO_INDEX)
            .map(|pair| Scored {
                index: pair[1],
                score: f32::from_bits(pair[0]),
            })
            .collect()
    }
}

/// One end of a device-to-device channel between a backend here and one in another process or on
/// another machine ([`Backend::join_link`]; NCCL between two GPUs), which carries a remote shard's
/// router queries without the host. Transfers run in the order each end records them, after the ops
/// recorded before them: every send must be met by one receive of the same shape at the other end, in
/// the same order.
pub trait DeviceLink<B: Backend>: Send + Sync {
    /// Names the link, for logs (`"NCCL 2.26.0 from CUDA device 0 (end 0 of the link)"`).
    fn describe(&self) -> String;
    /// Records sending `tensor` to the other end.
    fn send(&self, tensor: &B::Tensor) -> Result<()>;
    /// Records receiving a tensor of `shape` from the other end.
    fn receive(&self, shape: &[usize]) -> Result<B::Tensor>;
    /// Ends the link now, from any thread: transfers of this end not yet done stop (a receive leaves
    /// its tensor undefined) and later ones fail. For an end whose other end went away, so that
    /// nothing waits for it for ever. Dropping the link ends it too, once nothing uses it.
    fn abort(&self);
}

fn no_links(b: &(impl Backend + ?Sized)) -> Error {
    Error::Device {
        backend: b.describe(),
        message: "this backend makes no device links to other processes".into(),
    }
}

/// An engine backend: the CPU reference, wgpu, CUDA.
///
/// Shapes are row-major; "rows" are the leading dimension. `[n, heads, d]` tensors hold one row per token.
pub trait Backend {
    /// An f32 tensor living wherever the backend computes.
    type Tensor: Clone;
    /// A weight in its stored dtype (bf16, f16 or f32).
    type Weight;

    /// Names the backend and its device, for logs and benchmark reports.
    fn describe(&self) -> String;

    /// The largest tensor the backend holds in one piece (a GPU's buffer or binding limit), or `None`
    /// when only host memory bounds it. Stage 1 packs fewer tokens per forward to stay under it.
    fn max_tensor_bytes(&self) -> Option<u64> {
        None
    }

    fn upload(&self, data: &[f32], shape: &[usize]) -> Result<Self::Tensor>;
    fn upload_weight(&self, view: TensorView<'_>) -> Result<Self::Weight>;
    /// A weight of `dtype` and `shape` whose bytes `write` produces in order, handing each piece to
    /// the sink it is given (memory pages fetched from a bank, gathered from its mapped segments). A
    /// GPU backend may land the pieces in memory the device copies from directly (pinned, or a mapped
    /// staging buffer), sparing the host buffer [`Backend::upload_weight`] needs; by default it is
    /// that buffer. Pieces that do not add up to the weight's size are an error.
    fn upload_weight_from(
        &self,
        name: &str,
        dtype: DType,
        shape: &[usize],
        write: &mut PieceWriter<'_, '_>,
    ) -> Result<Self::Weight> {
        upload_through_host(self, name, dtype, shape, write)
    }
    /// An f32 weight holding the same elements, with the same shape, as `tensor` (for ops that take
    /// weights, such as the routing keys of [`Backend::routing_scores`]). Cheap: a GPU backend shares
    /// the tensor's buffer without copying; the CPU backend copies.
    fn tensor_to_weight(&self, tensor: &Self::Tensor) -> Result<Self::Weight>;
    /// Copies `tensor` from this backend's device to each of `peers` (devices of the same backend kind;
    /// one copy per peer, in order) without the host, where the devices reach each other directly: the
    /// CPU backend's "devices" share host memory, and CUDA devices joined into one NCCL clique broadcast.
    /// `None` where they cannot, and the caller copies through the host. Each copy runs after the ops
    /// recorded on this backend before it, and before those recorded on its peer after it.
    fn broadcast(
        &self,
        tensor: &Self::Tensor,
        peers: &[&Self],
    ) -> Option<Result<Vec<Self::Tensor>>> {
        let _ = (tensor, peers);
        None
    }
    /// The kind of device link ([`DeviceLink`]) this backend makes to a backend of another process or
    /// machine, such as `"NCCL 2.26.0"`; two ends link only when they name the same kind. `None` where
    /// it makes none, and router queries reach remote shards through the host.
    fn link_kind(&self) -> Option<String> {
        None
    }
    /// A rendezvous for a new device link, made by the end that joins it as end 0 and handed to the
    /// other end over a connection the caller has (an NCCL unique id).
    fn link_rendezvous(&self) -> Result<Vec<u8>> {
        Err(no_links(self))
    }
    /// Joins the device link of `rendezvous` as `end` (0: the end that made the rendezvous, 1: the
    /// other). Returns once both ends have joined: each must call it, at about the same time.
    fn join_link(&self, rendezvous: &[u8], end: usize) -> Result<Box<dyn DeviceLink<Self>>>
    where
        Self: Sized,
    {
        let _ = (rendezvous, end);
        Err(no_links(self))
    }
    /// Copies a tensor back to the host.
    fn read(&self, tensor: &Self::Tensor) -> impl Future<Output = Result<Vec<f32>>>;
    /// Resolves once every op recorded so far has run. Results never need it (reads wait for the ops
    /// they depend on); timings do, since a GPU backend returns from ops before computing them.
    fn synchronize(&self) -> impl Future<Output = Result<()>>;
    /// Hands the ops recorded so far to the device without waiting, so it computes them while the host
    /// goes on (a GPU backend submits its command buffer). A no-op where ops run as they are called.
    fn flush(&self) {}

    fn shape(&self, tensor: &Self::Tensor) -> Vec<usize>;
    /// Reinterprets the same elements with another shape.
    fn reshape(&self, tensor: &Self::Tensor, shape: &[usize]) -> Result<Self::Tensor>;

    /// Rows `ids` of an embedding table `[vocab, hidden]`, widened: `[ids.len(), hidden]`.
    fn embedding(&self, table: &Self::Weight, ids: &[u32]) -> Result<Self::Tensor>;
    /// `x · Wᵀ` for `x [n, in]` and a PyTorch-layout weight `[out, in]`: `[n, out]`.
    fn matmul(&self, x: &Self::Tensor, weight: &Self::Weight) -> Result<Self::Tensor>;
    /// RMSNorm over the last dimension, `w * x / sqrt(mean(x²) + eps)`; `weight` has the last dim's length.
    fn rms_norm(&self, x: &Self::Tensor, weight: &Self::Weight, eps: f32) -> Result<Self::Tensor>;
    /// NeoX rotate-half RoPE on `x [n, heads, d]` with one position per row.
    fn rope(&self, x: &Self::Tensor, positions: &[u32], theta: f64) -> Result<Self::Tensor>;
    /// Softmax attention with GQA (query head `h` reads KV head `h / (heads / kv_heads)`), scale `1/√d`:
    /// `q [nq, heads, d]`, `k, v [nk, kv_heads, d]` → `[nq, heads, d]`.
    fn attention(
        &self,
        q: &Self::Tensor,
        k: &Self::Tensor,
        v: &Self::Tensor,
        mask: AttentionMask<'_>,
    ) -> Result<Self::Tensor>;
    /// `silu(gate) * up`, elementwise.
    fn silu_mul(&self, gate: &Self::Tensor, up: &Self::Tensor) -> Result<Self::Tensor>;
    /// `a + b`, elementwise.
    fn add(&self, a: &Self::Tensor, b: &Self::Tensor) -> Result<Self::Tensor>;

    /// `rms_norm(x, norm, eps) · Wᵀ`: a projection of the normed input when nothing else reads the
    /// normed input. A GPU backend fuses the norm into the projection; by default it is the two ops.
    fn norm_matmul(
        &self,
        x: &Self::Tensor,
        norm: &Self::Weight,
        eps: f32,
        weight: &Self::Weight,
    ) -> Result<Self::Tensor> {
        self.matmul(&self.rms_norm(x, norm, eps)?, weight)
    }

    /// `rope(rms_norm(x, weight, eps), positions, theta)` on `x [n, heads, d]` (per-head q_norm or
    /// k_norm, then the rotation). A GPU backend fuses it into one pass; by default it is the two ops.
    fn norm_rope(
        &self,
        x: &Self::Tensor,
        weight: &Self::Weight,
        eps: f32,
        positions: &[u32],
        theta: f64,
    ) -> Result<Self::Tensor> {
        self.rope(&self.rms_norm(x, weight, eps)?, positions, theta)
    }

    /// `residual + x · Wᵀ`: a projection with its residual add (o_proj, down_proj). A GPU backend
    /// fuses it into one pass; by default it is the two ops.
    fn matmul_add(
        &self,
        x: &Self::Tensor,
        weight: &Self::Weight,
        residual: &Self::Tensor,
    ) -> Result<Self::Tensor> {
        self.add(residual, &self.matmul(x, weight)?)
    }

    /// `silu(n · Gᵀ) ⊙ (n · Uᵀ)` with `n = rms_norm(x, norm, eps)`: the first half of a SwiGLU MLP
    /// (post-attention norm, gate_proj, up_proj). A GPU backend fuses it into one pass over the two
    /// weights; by default it is the four ops.
    fn norm_swiglu(
        &self,
        x: &Self::Tensor,
        norm: &Self::Weight,
        eps: f32,
        gate: &Self::Weight,
        up: &Self::Weight,
    ) -> Result<Self::Tensor> {
        let normed = self.rms_norm(x, norm, eps)?;
        self.silu_mul(&self.matmul(&normed, gate)?, &self.matmul(&normed, up)?)
    }

    /// Concatenation along the leading dimension; the other dimensions must agree.
    fn concat_rows(&self, parts: &[&Self::Tensor]) -> Result<Self::Tensor>;
    /// `concat_rows([held, parts…])` for a context that grows (a layer's keys or values, a decoded
    /// token at a time). The rows `held` has are never written, so every other view of them stays as
    /// it is. Where the backend holds the only reference to `held`'s storage and that has room, the
    /// parts go into the rows after `held`'s, and nothing `held` had is copied; where it allocates,
    /// it leaves room for more ([`crate::shapes::grown_rows`]), or less where it can tell that the
    /// room would not fit in the device's memory. Decoding then copies each token's rows once
    /// instead of the whole context per token (but the whole context each time the room is used
    /// up, and at every token where there is none). On an error, `held` is dropped.
    fn append_rows(&self, held: Self::Tensor, parts: &[&Self::Tensor]) -> Result<Self::Tensor>;
    /// Rows `range` of a tensor.
    fn rows(&self, tensor: &Self::Tensor, range: Range<usize>) -> Result<Self::Tensor>;
    /// Rows `indices` of a tensor, in that order.
    fn gather_rows(&self, tensor: &Self::Tensor, indices: &[u32]) -> Result<Self::Tensor>;

    /// Mean of every `chunk` consecutive rows (the last group may be shorter): `[ceil(n / chunk), ...]`.
    fn chunk_mean_pool(&self, x: &Self::Tensor, chunk: usize) -> Result<Self::Tensor>;
    /// `x / max(‖x‖₂, 1e-12)` over the last dimension.
    fn l2_normalize(&self, x: &Self::Tensor) -> Result<Self::Tensor>;

    /// Document scores of one routing query (MSA-SPEC §3.3 a): router queries `queries [n, heads, d]`
    /// (only rows `routing_rows` take part) against pooled routing keys `keys [chunks, kv_heads, d]`,
    /// reduced over heads, routing tokens and the chunks of each document. Documents own contiguous chunk
    /// ranges `doc_chunk_offsets[i]..doc_chunk_offsets[i + 1]`. Returns `[documents]`.
    ///
    /// The keys are a weight in their stored dtype (f32, bf16 or f16; a bank may keep them in bf16),
    /// widened exactly inside the op; the arithmetic is f32 either way.
    ///
    /// In [`ScoreMode::Cosine`] the queries are L2-normalised here and the keys are expected normalised
    /// already (the memory stores them so); in [`ScoreMode::ScaledDot`] scores are multiplied by `1/√d`.
    fn routing_scores(
        &self,
        queries: &Self::Tensor,
        routing_rows: &[u32],
        keys: &Self::Weight,
        doc_chunk_offsets: &[u32],
        spec: RoutingSpec,
    ) -> Result<Self::Tensor>;

    /// The `min(k, n)` highest scores of a 1-D tensor, highest first; ties go to the lower index.
    fn top_k(&self, scores: &Self::Tensor, k: usize) -> impl Future<Output = Result<Vec<Scored>>>;
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `len` bytes whose values do not repeat at any short period, so a piece copied to the wrong
    /// place shows.
    fn pattern(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i ^ (i >> 8) ^ (i >> 16)) as u8).collect()
    }

    /// A writer handing `source` over in pieces of `sizes`, then whatever is left in pieces of 1,237.
    fn pieces<'p>(
        source: &'p [u8],
        sizes: &'p [usize],
    ) -> impl FnMut(&mut dyn FnMut(&'p [u8])) + 'p {
        move |sink| {
            let mut rest = source;
            for &len in sizes {
                let (piece, tail) = rest.split_at(len);
                sink(piece);
                rest = tail;
            }
            rest.chunks(1237).for_each(&mut *sink);
        }
    }

    #[test]
    fn gathered_pieces_land_in_order_small_or_large() {
        // Below the parallel threshold, and past it with pieces longer than one task, empty ones and
        // single bytes among them.
        for (total, sizes) in [
            (10_000, &[0, 1, 4_999, 0, 5_000][..]),
            (600_000, &[1, 199_999, 0, 70_000, 3, 329_997][..]),
        ] {
            assert_eq!(sizes.iter().sum::<usize>(), total);
            let source = pattern(total);
            let mut write = pieces(&source, sizes);
            let mut dst = vec![0xAA; total];
            assert_eq!(gather_pieces(&mut write, &mut dst), total);
            assert!(dst == source, "{total} bytes gathered out of order");
        }
    }

    #[test]
    fn pieces_of_the_wrong_size_are_counted_and_not_copied() {
        let source = pattern(400_000);
        for handed in [399_999, 400_001] {
            let handed_over = pattern(handed);
            let mut write = pieces(&handed_over, &[]);
            let mut dst = vec![0xAA; source.len()];
            assert_eq!(gather_pieces(&mut write, &mut dst), handed);
            assert!(dst.iter().all(|&b| b == 0xAA), "a refused gather wrote");
        }
    }
}
