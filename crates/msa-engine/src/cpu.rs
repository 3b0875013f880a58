//! The CPU reference backend: f32 arithmetic written to be obviously right, threaded with rayon.
//!
//! Every other backend is tested against this one, and this one against the original implementation's
//! golden outputs (`tests/fixtures`). Clarity wins over speed here; loops follow the math of MSA-SPEC §3.

use std::future::{Future, ready};
use std::ops::Range;
use std::sync::Arc;

use half::{bf16, f16};
use msa_core::{ChunkReduce, DType, HeadReduce, QueryReduce, ScoreMode, TensorView};
use rayon::prelude::*;

use crate::backend::{AttentionMask, Backend, RoutingSpec, Scored};
use crate::error::Result;
use crate::shapes;

/// A host f32 tensor; clones share the data.
#[derive(Clone, Debug)]
pub struct CpuTensor {
    data: Arc<Vec<f32>>,
    shape: Vec<usize>,
}

impl CpuTensor {
    fn new(data: Vec<f32>, shape: Vec<usize>) -> Self {
        debug_assert_eq!(data.len(), shape.iter().product::<usize>());
        CpuTensor {
            data: Arc::new(data),
            shape,
        }
    }

    pub fn data(&self) -> &[f32] {
        &self.data
    }

    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    fn rows(&self) -> usize {
        self.shape.first().copied().unwrap_or(1)
    }

    /// Elements per leading-dimension row.
    fn row_width(&self) -> usize {
        self.shape.iter().skip(1).product()
    }
}

/// Weight elements as stored in the checkpoint.
enum Stored {
    F32(Vec<f32>),
    BF16(Vec<bf16>),
    F16(Vec<f16>),
}

/// A weight kept in its stored dtype; rows are widened to f32 when used.
pub struct CpuWeight {
    shape: Vec<usize>,
    values: Stored,
}

impl CpuWeight {
    fn len(&self) -> usize {
        self.shape.iter().product()
    }

    /// Widens elements `start..start + out.len()` into `out`.
    fn widen(&self, start: usize, out: &mut [f32]) {
        let end = start + out.len();
        match &self.values {
            Stored::F32(v) => out.copy_from_slice(&v[start..end]),
            Stored::BF16(v) => out
                .iter_mut()
                .zip(&v[start..end])
                .for_each(|(o, x)| *o = x.to_f32()),
            Stored::F16(v) => out
                .iter_mut()
                .zip(&v[start..end])
                .for_each(|(o, x)| *o = x.to_f32()),
        }
    }

    /// Elements `start..start + scratch.len()` as f32: borrowed when stored as f32, else widened into
    /// `scratch`.
    fn widened_slice<'a>(&'a self, start: usize, scratch: &'a mut [f32]) -> &'a [f32] {
        match &self.values {
            Stored::F32(v) => &v[start..start + scratch.len()],
            _ => {
                self.widen(start, scratch);
                scratch
            }
        }
    }

    fn widened(&self) -> Vec<f32> {
        let mut out = vec![0.0; self.len()];
        self.widen(0, &mut out);
        out
    }
}

/// The CPU reference backend.
#[derive(Clone, Copy, Debug, Default)]
pub struct CpuBackend;

impl CpuBackend {
    pub fn new() -> Self {
        CpuBackend
    }
}

fn dot(a: &[f32], b: &[f32]) -> f32 {
    // Eight independent accumulators let the compiler vectorise without reassociating one long chain.
    let mut acc = [0.0f32; 8];
    let (a8, a_rest) = a.split_at(a.len() - a.len() % 8);
    let (b8, b_rest) = b.split_at(a8.len());
    for (x, y) in a8.chunks_exact(8).zip(b8.chunks_exact(8)) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    let tail: f32 = a_rest.iter().zip(b_rest).map(|(x, y)| x * y).sum();
    acc.iter().sum::<f32>() + tail
}

impl Backend for CpuBackend {
    type Tensor = CpuTensor;
    type Weight = CpuWeight;

    fn describe(&self) -> String {
        format!(
            "cpu reference (f32, {} threads)",
            rayon::current_num_threads()
        )
    }

    fn upload(&self, data: &[f32], shape: &[usize]) -> Result<CpuTensor> {
        shapes::check_fill("upload", data.len(), &[data.len()], shape)?;
        Ok(CpuTensor::new(data.to_vec(), shape.to_vec()))
    }

    fn upload_weight(&self, view: TensorView<'_>) -> Result<CpuWeight> {
        shapes::check_weight_bytes(&view)?;
        // Tensor data inside a safetensors file need not be aligned: collect, never cast in place.
        let values = match view.dtype {
            DType::F32 => Stored::F32(bytemuck::pod_collect_to_vec(view.bytes)),
            DType::BF16 => Stored::BF16(bytemuck::pod_collect_to_vec(view.bytes)),
            DType::F16 => Stored::F16(bytemuck::pod_collect_to_vec(view.bytes)),
        };
        Ok(CpuWeight {
            shape: view.shape.to_vec(),
            values,
        })
    }

    fn tensor_to_weight(&self, tensor: &CpuTensor) -> Result<CpuWeight> {
        Ok(CpuWeight {
            shape: tensor.shape.clone(),
            values: Stored::F32(tensor.data.to_vec()),
        })
    }

    fn broadcast(&self, tensor: &CpuTensor, peers: &[&Self]) -> Option<Result<Vec<CpuTensor>>> {
        Some(Ok(vec![tensor.clone(); peers.len()]))
    }

    fn read(&self, tensor: &CpuTensor) -> impl Future<Output = Result<Vec<f32>>> {
        ready(Ok(tensor.data.to_vec()))
    }

    fn synchronize(&self) -> impl Future<Output = Result<()>> {
        ready(Ok(())) // every op has run when it returns
    }

    fn shape(&self, tensor: &CpuTensor) -> Vec<usize> {
        tensor.shape.clone()
    }

    fn reshape(&self, tensor: &CpuTensor, shape: &[usize]) -> Result<CpuTensor> {
        shapes::check_fill("reshape", tensor.data.len(), &tensor.shape, shape)?;
        Ok(CpuTensor {
            data: tensor.data.clone(),
            shape: shape.to_vec(),
        })
    }

    fn embedding(&self, table: &CpuWeight, ids: &[u32]) -> Result<CpuTensor> {
        let (_, hidden) = shapes::embedding_dims(&table.shape, ids)?;
        let mut out = vec![0.0; ids.len() * hidden];
        for (row, &id) in out.chunks_exact_mut(hidden).zip(ids) {
            table.widen(id as usize * hidden, row);
        }
        Ok(CpuTensor::new(out, vec![ids.len(), hidden]))
    }

    fn matmul(&self, x: &CpuTensor, weight: &CpuWeight) -> Result<CpuTensor> {
        let (n, inner, out_features) = shapes::matmul_dims(&x.shape, &weight.shape)?;
        if n == 0 {
            return Ok(CpuTensor::new(Vec::new(), vec![0, out_features]));
        }
        // Computed as [out, n] so each thread widens one weight row once and reuses it for every token.
        let mut transposed = vec![0.0f32; out_features * n];
        transposed.par_chunks_mut(n).enumerate().for_each_init(
            || vec![0.0f32; inner],
            |w_row, (o, column)| {
                weight.widen(o * inner, w_row);
                for (i, value) in column.iter_mut().enumerate() {
                    *value = dot(&x.data[i * inner..(i + 1) * inner], w_row);
                }
            },
        );
        let mut out = vec![0.0f32; n * out_features];
        for o in 0..out_features {
            for i in 0..n {
                out[i * out_features + o] = transposed[o * n + i];
            }
        }
        Ok(CpuTensor::new(out, vec![n, out_features]))
    }

    fn rms_norm(&self, x: &CpuTensor, weight: &CpuWeight, eps: f32) -> Result<CpuTensor> {
        let width = shapes::rms_norm_width(&x.shape, &weight.shape)?;
        let w = weight.widened();
        let mut out = x.data.to_vec();
        out.par_chunks_mut(width).for_each(|row| {
            let mean_square = row.iter().map(|v| v * v).sum::<f32>() / width as f32;
            let inv = 1.0 / (mean_square + eps).sqrt();
            row.iter_mut()
                .zip(&w)
                .for_each(|(v, w)| *v = w * (*v * inv));
        });
        Ok(CpuTensor::new(out, x.shape.clone()))
    }

    fn rope(&self, x: &CpuTensor, positions: &[u32], theta: f64) -> Result<CpuTensor> {
        let (_, heads, d) = shapes::rope_dims(&x.shape, positions.len())?;
        let half = d / 2;
        let table = rope_table(positions, theta, d);
        let mut out = x.data.to_vec();
        out.par_chunks_mut(heads * d)
            .zip(table.par_chunks(half))
            .for_each(|(token, cos_sin)| {
                for head in token.chunks_exact_mut(d) {
                    for (j, &[cos, sin]) in cos_sin.iter().enumerate() {
                        let (a, b) = (head[j], head[j + half]);
                        head[j] = a * cos - b * sin;
                        head[j + half] = b * cos + a * sin;
                    }
                }
            });
        Ok(CpuTensor::new(out, x.shape.clone()))
    }

    fn attention(
        &self,
        q: &CpuTensor,
        k: &CpuTensor,
        v: &CpuTensor,
        mask: AttentionMask<'_>,
    ) -> Result<CpuTensor> {
        let shapes::AttentionDims {
            nq,
            heads,
            d,
            nk,
            kv_heads,
        } = shapes::attention_dims(&q.shape, &k.shape, &v.shape)?;
        shapes::attention_mask(&mask, nq, nk)?;
        let group = heads / kv_heads;
        let scale = 1.0 / (d as f32).sqrt();
        let mut out = vec![0.0f32; nq * heads * d];
        out.par_chunks_mut(d).enumerate().for_each(|(row, o)| {
            let (i, h) = (row / heads, row % heads);
            let g = h / group;
            let visible = mask.visible_keys(i, nq, nk);
            let qv = &q.data[(i * heads + h) * d..][..d];
            let scores: Vec<f32> = visible
                .clone()
                .map(|j| dot(qv, &k.data[(j * kv_heads + g) * d..][..d]) * scale)
                .collect();
            let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let weights: Vec<f32> = scores.iter().map(|s| (s - max).exp()).collect();
            let total: f32 = weights.iter().sum();
            for (j, w) in visible.zip(&weights) {
                let vv = &v.data[(j * kv_heads + g) * d..][..d];
                for (acc, x) in o.iter_mut().zip(vv) {
                    *acc += w / total * x;
                }
            }
        });
        Ok(CpuTensor::new(out, vec![nq, heads, d]))
    }

    fn silu_mul(&self, gate: &CpuTensor, up: &CpuTensor) -> Result<CpuTensor> {
        shapes::same_shape("silu_mul", &gate.shape, &up.shape)?;
        let out = gate
            .data
            .iter()
            .zip(up.data.iter())
            .map(|(g, u)| g / (1.0 + (-g).exp()) * u)
            .collect();
        Ok(CpuTensor::new(out, gate.shape.clone()))
    }

    fn add(&self, a: &CpuTensor, b: &CpuTensor) -> Result<CpuTensor> {
        shapes::same_shape("add", &a.shape, &b.shape)?;
        let out = a
            .data
            .iter()
            .zip(b.data.iter())
            .map(|(x, y)| x + y)
            .collect();
        Ok(CpuTensor::new(out, a.shape.clone()))
    }

    fn concat_rows(&self, parts: &[&CpuTensor]) -> Result<CpuTensor> {
        let part_shapes: Vec<&[usize]> = parts.iter().map(|p| &p.shape[..]).collect();
        let shape = shapes::concat_shape(&part_shapes)?;
        let data = parts.iter().flat_map(|p| p.data.iter().copied()).collect();
        Ok(CpuTensor::new(data, shape))
    }

    fn append_rows(&self, held: CpuTensor, parts: &[&CpuTensor]) -> Result<CpuTensor> {
        let part_shapes: Vec<&[usize]> = parts.iter().map(|p| &p.shape[..]).collect();
        let shape = shapes::append_shape(&held.shape, &part_shapes)?;
        let (rows, width) = shapes::rows_and_width(&shape);
        // A vector only this tensor holds grows in place (its spare capacity past `held`'s rows);
        // a shared one is copied, with room for more.
        let mut data = Arc::try_unwrap(held.data).unwrap_or_else(|shared| {
            let mut data = Vec::with_capacity(shapes::grown_rows(rows) * width);
            data.extend_from_slice(&shared);
            data
        });
        if data.capacity() < rows * width {
            data.reserve_exact(shapes::grown_rows(rows) * width - data.len());
        }
        parts.iter().for_each(|p| data.extend_from_slice(&p.data));
        Ok(CpuTensor::new(data, shape))
    }

    fn rows(&self, tensor: &CpuTensor, range: Range<usize>) -> Result<CpuTensor> {
        let shape = shapes::rows_shape(&tensor.shape, &range)?;
        let width = tensor.row_width();
        let data = tensor.data[range.start * width..range.end * width].to_vec();
        Ok(CpuTensor::new(data, shape))
    }

    fn gather_rows(&self, tensor: &CpuTensor, indices: &[u32]) -> Result<CpuTensor> {
        let shape = shapes::gather_shape(&tensor.shape, indices)?;
        let width = tensor.row_width();
        let data = indices
            .iter()
            .flat_map(|&i| tensor.data[i as usize * width..][..width].iter().copied())
            .collect();
        Ok(CpuTensor::new(data, shape))
    }

    fn chunk_mean_pool(&self, x: &CpuTensor, chunk: usize) -> Result<CpuTensor> {
        let shape = shapes::pool_shape(&x.shape, chunk)?;
        let (n, width) = (x.rows(), x.row_width());
        let chunks = shape[0];
        let mut out = vec![0.0f32; chunks * width];
        for (c, pooled) in out.chunks_exact_mut(width).enumerate() {
            let members = c * chunk..((c + 1) * chunk).min(n);
            let count = members.len() as f32;
            for row in members {
                for (acc, v) in pooled.iter_mut().zip(&x.data[row * width..][..width]) {
                    *acc += v;
                }
            }
            pooled.iter_mut().for_each(|v| *v /= count);
        }
        Ok(CpuTensor::new(out, shape))
    }

    fn l2_normalize(&self, x: &CpuTensor) -> Result<CpuTensor> {
        let width = shapes::norm_width("l2_normalize", &x.shape)?;
        let mut out = x.data.to_vec();
        out.chunks_exact_mut(width).for_each(|row| {
            let norm = row.iter().map(|v| v * v).sum::<f32>().sqrt().max(1e-12);
            row.iter_mut().for_each(|v| *v /= norm);
        });
        Ok(CpuTensor::new(out, x.shape.clone()))
    }

    fn routing_scores(
        &self,
        queries: &CpuTensor,
        routing_rows: &[u32],
        keys: &CpuWeight,
        doc_chunk_offsets: &[u32],
        spec: RoutingSpec,
    ) -> Result<CpuTensor> {
        let shapes::RoutingDims {
            heads,
            d,
            chunks,
            kv_heads,
            ..
        } = shapes::routing_dims(&queries.shape, routing_rows, &keys.shape, doc_chunk_offsets)?;
        let group = heads / kv_heads;
        // The routing query: selected rows, normalised per head for cosine, scaled for scaled-dot.
        let scale = match spec.score_mode {
            ScoreMode::Cosine => 1.0,
            ScoreMode::ScaledDot => 1.0 / (d as f32).sqrt(),
        };
        let query: Vec<Vec<f32>> = routing_rows
            .iter()
            .flat_map(|&r| (0..heads).map(move |h| (r as usize * heads + h) * d))
            .map(|start| {
                let v = &queries.data[start..start + d];
                let norm = match spec.score_mode {
                    ScoreMode::Cosine => v.iter().map(|x| x * x).sum::<f32>().sqrt().max(1e-12),
                    ScoreMode::ScaledDot => 1.0,
                };
                v.iter().map(|x| x / norm * scale).collect()
            })
            .collect();
        let tokens = routing_rows.len();
        // The head mean is linear: (1/H) Σ_h <q_h, k_{h/group}> = (1/H) Σ_g <Σ_{h in g} q_h, k_g>, so the
        // query heads sharing a KV head are summed once and each key is read with one dot per group.
        let sum_group = |tg: usize| -> Vec<f32> {
            let (t, g) = (tg / kv_heads, tg % kv_heads);
            (0..d)
                .map(|i| {
                    (0..group)
                        .map(|j| query[t * heads + g * group + j][i])
                        .sum()
                })
                .collect()
        };
        let group_queries: Vec<Vec<f32>> = match spec.head_reduce {
            HeadReduce::Mean => (0..tokens * kv_heads).map(sum_group).collect(),
            HeadReduce::Max => Vec::new(),
        };
        // Keys are widened one chunk row at a time (a bank's keys may be large and stored in bf16).
        let row = kv_heads * d;
        let chunk_scores: Vec<f32> = (0..chunks)
            .into_par_iter()
            .map_init(
                || vec![0.0f32; row],
                |scratch, c| {
                    let chunk_keys = keys.widened_slice(c * row, scratch);
                    let key = |g: usize| &chunk_keys[g * d..][..d];
                    let mut token_scores = (0..tokens).map(|t| match spec.head_reduce {
                        HeadReduce::Mean => {
                            (0..kv_heads)
                                .map(|g| dot(&group_queries[t * kv_heads + g], key(g)))
                                .sum::<f32>()
                                / heads as f32
                        }
                        HeadReduce::Max => (0..heads)
                            .map(|h| dot(&query[t * heads + h], key(h / group)))
                            .fold(f32::NEG_INFINITY, f32::max),
                    });
                    match spec.query_reduce {
                        QueryReduce::Max => token_scores.fold(f32::NEG_INFINITY, f32::max),
                        QueryReduce::Mean => token_scores.sum::<f32>() / tokens as f32,
                        QueryReduce::Last => token_scores.next_back().unwrap_or(f32::NEG_INFINITY),
                    }
                },
            )
            .collect();
        let doc_scores = doc_chunk_offsets
            .windows(2)
            .map(|w| {
                let members = &chunk_scores[w[0] as usize..w[1] as usize];
                match spec.chunk_reduce {
                    ChunkReduce::Max => members.iter().copied().fold(f32::NEG_INFINITY, f32::max),
                    ChunkReduce::Mean => members.iter().sum::<f32>() / members.len() as f32,
                }
            })
            .collect::<Vec<_>>();
        let documents = doc_scores.len();
        Ok(CpuTensor::new(doc_scores, vec![documents]))
    }

    fn top_k(&self, scores: &CpuTensor, k: usize) -> impl Future<Output = Result<Vec<Scored>>> {
        ready(shapes::check_scores(&scores.shape).map(|()| select_top_k(&scores.data, k)))
    }
}

/// The reference selection rule shared by every backend: highest score first, lower index on ties.
/// NaN ranks below every number and `-0.0` equals `0.0`, so the order is the same on any backend.
pub fn select_top_k(scores: &[f32], k: usize) -> Vec<Scored> {
    let key = |i: u32| {
        let s = scores[i as usize];
        if s.is_nan() { f32::NEG_INFINITY } else { s }
    };
    let order_of = |a: &u32, b: &u32| {
        key(*b)
            .partial_cmp(&key(*a))
            .expect("NaN was mapped away")
            .then(a.cmp(b))
    };
    let mut order: Vec<u32> = (0..scores.len() as u32).collect();
    // A selection, then a sort of the k survivors: O(n) for the small k of routing and greedy decoding.
    if k > 0 && k < order.len() {
        order.select_nth_unstable_by(k - 1, order_of);
    }
    order.truncate(k);
    order.sort_by(order_of);
    order
        .into_iter()
        .map(|index| Scored {
            index,
            score: scores[index as usize],
        })
        .collect()
}

/// `[cos, sin]` of every (position, frequency) pair of NeoX RoPE, `[positions, d / 2]`. Like the reference,
/// inverse frequencies and angles are f32; cos/sin of the f32 angle are taken in f64 so every backend
/// rotates by the same values whatever its own sin/cos precision at large angles.
pub fn rope_table(positions: &[u32], theta: f64, d: usize) -> Vec<[f32; 2]> {
    let half = d / 2;
    let inv_freq: Vec<f32> = (0..half)
        .map(|j| (1.0 / theta.powf(2.0 * j as f64 / d as f64)) as f32)
        .collect();
    positions
        .iter()
        .flat_map(|&pos| {
            inv_freq.iter().map(move |&f| {
                let angle = (pos as f32 * f) as f64;
                [angle.cos() as f32, angle.sin() as f32]
            })
        })
        .collect()
}

/// The last [`rope_table`] a device backend uploaded, kept under what it was computed from: a decode
/// step rotates q and k of every layer at the same positions, so one upload serves the whole step.
pub struct RopeTableCache<T> {
    last: std::sync::Mutex<Option<(RopeKey, T)>>,
}

/// What a [`rope_table`] is computed from.
#[derive(PartialEq)]
struct RopeKey {
    positions: Vec<u32>,
    theta: u64,
    d: usize,
}

impl<T> Default for RopeTableCache<T> {
    fn default() -> Self {
        RopeTableCache {
            last: std::sync::Mutex::new(None),
        }
    }
}

impl<T: Clone> RopeTableCache<T> {
    /// The table of (`positions`, `theta`, `d`): the cached one when it matches, else `upload`ed now
    /// (from the `[positions, d / 2]` cos/sin pairs) and cached instead.
    pub fn get(
        &self,
        positions: &[u32],
        theta: f64,
        d: usize,
        upload: impl FnOnce(&[[f32; 2]]) -> Result<T>,
    ) -> Result<T> {
        let key = RopeKey {
            positions: positions.to_vec(),
            theta: theta.to_bits(),
            d,
        };
        let mut last = self
            .last
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some((cached, table)) = last.as_ref()
            && *cached == key
        {
            return Ok(table.clone());
        }
        let table = upload(&rope_table(positions, theta, d))?;
        *last = Some((key, table.clone()));
        Ok(table)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A context held by one tensor takes appended rows into its spare capacity; one shared with
    /// another view is copied (the conformance suite checks the values).
    #[test]
    fn a_context_held_alone_grows_in_place() {
        let b = CpuBackend::new();
        let row = b.upload(&[1.0, 2.0], &[1, 2]).unwrap();
        let mut context = b.append_rows(row.clone(), &[&row]).unwrap();
        let storage = context.data().as_ptr();
        for _ in 0..shapes::SPARE_ROWS {
            context = b.append_rows(context, &[&row]).unwrap();
        }
        assert_eq!(context.shape(), [2 + shapes::SPARE_ROWS, 2]);
        assert_eq!(context.data().as_ptr(), storage, "grown in place");
        let shared = context.clone();
        let copied = b.append_rows(context, &[&row]).unwrap();
        assert_ne!(
            copied.data().as_ptr(),
            storage,
            "a shared context is copied"
        );
        assert_eq!(shared.shape(), [2 + shapes::SPARE_ROWS, 2]);
    }

    /// One upload per (positions, theta, d) in a row; any change uploads the new table.
    #[test]
    fn rope_table_cache_uploads_once_per_position_list() {
        let cache = RopeTableCache::default();
        let uploads = std::cell::Cell::new(0);
        let get = |positions: &[u32], theta: f64, d: usize| {
            cache
                .get(positions, theta, d, |table| {
                    uploads.set(uploads.get() + 1);
                    Ok(table.to_vec())
                })
                .unwrap()
        };
        let first = get(&[7], 1e6, 8);
        assert_eq!(first, rope_table(&[7], 1e6, 8));
        assert_eq!(get(&[7], 1e6, 8), first);
        assert_eq!(uploads.get(), 1);
        for (positions, theta, d) in [(&[8][..], 1e6, 8), (&[8], 1e4, 8), (&[8], 1e4, 16)] {
            assert_eq!(get(positions, theta, d), rope_table(positions, theta, d));
        }
        assert_eq!(uploads.get(), 4);
    }
}
