//! Shape rules of the [`Backend`](crate::Backend) ops, shared by every backend so they accept and refuse
//! exactly the same inputs with the same errors.

use std::ops::Range;

use crate::backend::AttentionMask;
use crate::error::{Error, Result};

/// Tensors have at least one dimension, and every dimension after the first is non-zero (a tensor may
/// have zero rows, never zero-width rows), so ops can split data into rows without special cases.
pub fn check_dims(op: &'static str, shape: &[usize]) -> Result<()> {
    if shape.is_empty() || shape[1..].contains(&0) {
        return Err(Error::shape(
            op,
            format!("shape {shape:?}: tensors need a leading dimension and non-empty rows"),
        ));
    }
    Ok(())
}

/// `values` elements fill `shape` exactly (upload, reshape).
pub fn check_fill(op: &'static str, values: usize, from: &[usize], shape: &[usize]) -> Result<()> {
    check_dims(op, shape)?;
    // Checked: a shape can come from the network (a shard server's request).
    let fills = shape.iter().try_fold(1usize, |n, &d| n.checked_mul(d));
    if fills != Some(values) {
        return Err(Error::shape(
            op,
            format!("{values} values ({from:?}) do not fill shape {shape:?}"),
        ));
    }
    Ok(())
}

pub fn same_shape(op: &'static str, a: &[usize], b: &[usize]) -> Result<()> {
    if a != b {
        return Err(Error::shape(op, format!("shapes {a:?} and {b:?} differ")));
    }
    Ok(())
}

/// `[rows, heads, head_dim]`.
pub fn rank3(op: &'static str, name: &str, shape: &[usize]) -> Result<(usize, usize, usize)> {
    match shape[..] {
        [n, heads, d] => Ok((n, heads, d)),
        _ => Err(Error::shape(
            op,
            format!("{name} must be [rows, heads, head_dim], got {shape:?}"),
        )),
    }
}

/// Rows (leading dimension) and elements per row.
pub fn rows_and_width(shape: &[usize]) -> (usize, usize) {
    (
        shape.first().copied().unwrap_or(1),
        shape.iter().skip(1).product(),
    )
}

/// `(vocab, hidden)` of an embedding table, after checking every id against the vocabulary.
pub fn embedding_dims(table: &[usize], ids: &[u32]) -> Result<(usize, usize)> {
    let [vocab, hidden] = table[..] else {
        return Err(Error::shape(
            "embedding",
            format!("the table must be [vocab, hidden], got {table:?}"),
        ));
    };
    match ids.iter().find(|&&id| id as usize >= vocab) {
        Some(&id) => Err(Error::TokenOutOfRange { id, vocab }),
        None => Ok((vocab, hidden)),
    }
}

/// The width a norm reduces over: the last dimension, which must not be empty.
pub fn norm_width(op: &'static str, x: &[usize]) -> Result<usize> {
    check_dims(op, x)?;
    match x.last() {
        Some(&width) if width > 0 => Ok(width),
        _ => Err(Error::shape(
            op,
            format!("{x:?}: the last dimension is normalised and must not be empty"),
        )),
    }
}

/// The bytes of a weight fill its shape in its dtype.
pub fn check_weight_bytes(view: &msa_core::TensorView<'_>) -> Result<()> {
    check_weight_len(view.name, view.dtype, view.shape, view.bytes.len())
}

/// That `len` bytes are exactly a weight `name` of `shape` in `dtype`.
pub fn check_weight_len(
    name: &str,
    dtype: msa_core::DType,
    shape: &[usize],
    len: usize,
) -> Result<()> {
    if len != shape.iter().product::<usize>() * dtype.size_in_bytes() {
        return Err(Error::shape(
            "upload_weight",
            format!("`{name}`: {len} bytes for shape {shape:?} of {dtype}"),
        ));
    }
    Ok(())
}

/// `(n, inner, out_features)` of `x [n, inner] · Wᵀ` with `W [out, inner]`.
pub fn matmul_dims(x: &[usize], weight: &[usize]) -> Result<(usize, usize, usize)> {
    let (n, inner) = rows_and_width(x);
    if weight.len() != 2 || weight[1] != inner {
        return Err(Error::shape(
            "matmul",
            format!("x {x:?} against weight {weight:?}"),
        ));
    }
    Ok((n, inner, weight[0]))
}

/// The width of an RMSNorm, whose weight has one value per element of the last dimension.
pub fn rms_norm_width(x: &[usize], weight: &[usize]) -> Result<usize> {
    let width = norm_width("rms_norm", x)?;
    if weight.iter().product::<usize>() != width {
        return Err(Error::shape(
            "rms_norm",
            format!("x {x:?} with weight {weight:?}"),
        ));
    }
    Ok(width)
}

/// `(n, heads, d)` of a RoPE input with one position per row and an even head dim.
pub fn rope_dims(x: &[usize], positions: usize) -> Result<(usize, usize, usize)> {
    let (n, heads, d) = rank3("rope", "x", x)?;
    if positions != n || d % 2 != 0 {
        return Err(Error::shape(
            "rope",
            format!("x {x:?} with {positions} positions"),
        ));
    }
    Ok((n, heads, d))
}

/// Dimensions of an attention call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AttentionDims {
    pub nq: usize,
    pub heads: usize,
    pub d: usize,
    pub nk: usize,
    pub kv_heads: usize,
}

pub fn attention_dims(q: &[usize], k: &[usize], v: &[usize]) -> Result<AttentionDims> {
    let (nq, heads, d) = rank3("attention", "q", q)?;
    let (nk, kv_heads, dk) = rank3("attention", "k", k)?;
    same_shape("attention", k, v)?;
    if dk != d || kv_heads == 0 || heads % kv_heads != 0 || nk < nq {
        return Err(Error::shape(
            "attention",
            format!(
                "q {q:?}, k/v {k:?}: head dims must match, heads divide, and keys include the queries"
            ),
        ));
    }
    Ok(AttentionDims {
        nq,
        heads,
        d,
        nk,
        kv_heads,
    })
}

/// Checks a mask against the attention's query and key counts.
pub fn attention_mask(mask: &AttentionMask<'_>, nq: usize, nk: usize) -> Result<()> {
    let AttentionMask::Packed(starts) = mask else {
        return Ok(());
    };
    let ascending = starts.windows(2).all(|w| w[0] < w[1]);
    if nq != nk
        || starts.first() != Some(&0)
        || !ascending
        || starts.iter().any(|&s| s as usize >= nq.max(1))
    {
        return Err(Error::shape(
            "attention",
            format!(
                "a packed mask needs as many keys as queries ({nq} vs {nk}) and sequence starts ascending from 0 below {nq}, got {starts:?}"
            ),
        ));
    }
    Ok(())
}

/// The shape of `parts` stacked along the leading dimension.
pub fn concat_shape(parts: &[&[usize]]) -> Result<Vec<usize>> {
    stacked_shape("concat_rows", parts)
}

/// The shape of `held` with `parts` stacked after it ([`crate::Backend::append_rows`]).
pub fn append_shape(held: &[usize], parts: &[&[usize]]) -> Result<Vec<usize>> {
    let all: Vec<&[usize]> = std::iter::once(held).chain(parts.iter().copied()).collect();
    stacked_shape("append_rows", &all)
}

/// The shape of `parts` stacked along the leading dimension by `op`.
fn stacked_shape(op: &'static str, parts: &[&[usize]]) -> Result<Vec<usize>> {
    let first = parts
        .first()
        .ok_or_else(|| Error::shape(op, "nothing to concatenate"))?;
    let tail = &first[1..];
    if let Some(bad) = parts.iter().find(|p| p.get(1..) != Some(tail)) {
        return Err(Error::shape(
            op,
            format!("{bad:?} does not stack onto {first:?}"),
        ));
    }
    let mut shape = first.to_vec();
    shape[0] = parts.iter().map(|p| p[0]).sum();
    Ok(shape)
}

/// The fewest spare rows a backend leaves when it allocates a growing context
/// ([`crate::Backend::append_rows`]).
pub const SPARE_ROWS: usize = 64;

/// Rows to allocate for a growing context of `rows` rows: an eighth more, and at least
/// [`SPARE_ROWS`] more, so a context grown a row at a time is copied whole once per 64 rows while
/// small, and its memory grows by at most an eighth once large.
pub fn grown_rows(rows: usize) -> usize {
    rows + (rows / 8).max(SPARE_ROWS)
}

/// The shape of rows `range` of a tensor.
pub fn rows_shape(shape: &[usize], range: &Range<usize>) -> Result<Vec<usize>> {
    if shape.is_empty() || range.start > range.end || range.end > shape[0] {
        return Err(Error::shape("rows", format!("rows {range:?} of {shape:?}")));
    }
    let mut out = shape.to_vec();
    out[0] = range.len();
    Ok(out)
}

/// The shape of rows `indices` of a tensor.
pub fn gather_shape(shape: &[usize], indices: &[u32]) -> Result<Vec<usize>> {
    let (rows, _) = rows_and_width(shape);
    if let Some(&bad) = indices.iter().find(|&&i| i as usize >= rows) {
        return Err(Error::shape(
            "gather_rows",
            format!("row {bad} of {shape:?}"),
        ));
    }
    let mut out = shape.to_vec();
    out[0] = indices.len();
    Ok(out)
}

/// The shape of a chunk-mean pooling.
pub fn pool_shape(shape: &[usize], chunk: usize) -> Result<Vec<usize>> {
    if chunk == 0 || shape.is_empty() {
        return Err(Error::shape(
            "chunk_mean_pool",
            format!("chunk {chunk} over {shape:?}"),
        ));
    }
    let mut out = shape.to_vec();
    out[0] = shape[0].div_ceil(chunk);
    Ok(out)
}

/// Dimensions of a routing-score call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RoutingDims {
    pub heads: usize,
    pub d: usize,
    pub chunks: usize,
    pub kv_heads: usize,
    pub documents: usize,
}

pub fn routing_dims(
    queries: &[usize],
    routing_rows: &[u32],
    keys: &[usize],
    doc_chunk_offsets: &[u32],
) -> Result<RoutingDims> {
    let (n, heads, d) = rank3("routing_scores", "queries", queries)?;
    let (chunks, kv_heads, dk) = rank3("routing_scores", "keys", keys)?;
    if dk != d || kv_heads == 0 || heads % kv_heads != 0 {
        return Err(Error::shape(
            "routing_scores",
            format!("queries {queries:?} against keys {keys:?}"),
        ));
    }
    if routing_rows.is_empty() || routing_rows.iter().any(|&r| r as usize >= n) {
        return Err(Error::shape(
            "routing_scores",
            format!("routing rows {routing_rows:?} of {n} query rows"),
        ));
    }
    let offsets_ok = doc_chunk_offsets.len() >= 2
        && doc_chunk_offsets[0] == 0
        && doc_chunk_offsets.windows(2).all(|w| w[0] < w[1])
        && doc_chunk_offsets.last().map(|&c| c as usize) == Some(chunks);
    if !offsets_ok {
        return Err(Error::shape(
            "routing_scores",
            format!(
                "document chunk offsets must rise strictly from 0 to {chunks}, got {doc_chunk_offsets:?}"
            ),
        ));
    }
    Ok(RoutingDims {
        heads,
        d,
        chunks,
        kv_heads,
        documents: doc_chunk_offsets.len() - 1,
    })
}

/// Scores must be 1-D for top-k.
pub fn check_scores(shape: &[usize]) -> Result<()> {
    if shape.len() != 1 {
        return Err(Error::shape(
            "top_k",
            format!("scores must be 1-D, got {shape:?}"),
        ));
    }
    Ok(())
}
