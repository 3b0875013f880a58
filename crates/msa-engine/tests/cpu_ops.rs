//! Every `CpuBackend` op held to an independent f64 reference written here from the math of `backend.rs`
//! and MSA-SPEC §3.0 / §3.3, on odd sizes and seeded random inputs.
//!
//! The references are deliberately naive (nested loops over indices, f64 throughout) and share no code with
//! `cpu.rs`. Weights are rounded to their stored dtype *before* the reference sees them, so the tolerances
//! measure only f32 arithmetic, not storage rounding. All tolerances live in the `tol` module below.

use std::ops::Range;

use half::{bf16, f16};
use msa_core::{ChunkReduce, DType, HeadReduce, QueryReduce, ScoreMode, TensorView};
use msa_engine::cpu::CpuWeight;
use msa_engine::{AttentionMask, Backend, CpuBackend, CpuTensor, Error, RoutingSpec, Scored};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

// ---------------------------------------------------------------------------------------------------------
// Tolerances and the comparison helper
// ---------------------------------------------------------------------------------------------------------

/// `(atol, rtol)` pairs: an element passes when `|actual - expected| <= atol + rtol * |expected|`.
mod tol {
    /// Pure data movement (embedding rows, rows, gather, concat, reshape): bit-exact.
    pub const COPY: (f64, f64) = (0.0, 0.0);
    /// One f32 rounding per element (add): half an ulp.
    pub const ADD: (f64, f64) = (0.0, 1.0e-7);
    /// A few f32 transcendental ops per element (silu_mul).
    pub const ELEMENTWISE: (f64, f64) = (1.0e-7, 1.0e-6);
    /// f32 sums / dot products of up to ~40 terms of magnitude <= 1 (matmul, rms_norm, pooling, l2,
    /// attention, routing scores).
    pub const REDUCTION: (f64, f64) = (1.0e-5, 1.0e-5);
    /// RoPE: the op computes the angle `pos * inv_freq` in f32 (MSA-SPEC §3.0 "computed in fp32"), so the
    /// angle carries up to ~2^-23 relative error; the output error is bounded by that angle error times the
    /// pair's magnitude. Per row: `atol = ROPE_BASE + ROPE_PER_POS * pos * max|x|`.
    pub const ROPE_BASE: f64 = 1.0e-6;
    pub const ROPE_PER_POS: f64 = 4.0 / (1u64 << 23) as f64;
    pub const ROPE_RTOL: f64 = 1.0e-6;
    /// Attention with large logits (|score| up to ~100): exp amplifies the f32 score rounding.
    pub const SHARP_ATTENTION: (f64, f64) = (1.0e-4, 1.0e-4);
}

/// Panics naming the op, the first bad index, both values and the tolerance.
fn assert_close(name: &str, actual: &[f32], expected: &[f64], (atol, rtol): (f64, f64)) {
    assert_eq!(
        actual.len(),
        expected.len(),
        "{name}: {} values, expected {}",
        actual.len(),
        expected.len()
    );
    for (i, (&a, &e)) in actual.iter().zip(expected).enumerate() {
        let a = a as f64;
        let allowed = atol + rtol * e.abs();
        let ok = if e.is_nan() {
            a.is_nan()
        } else {
            a.is_finite() == e.is_finite() && (a == e || (a - e).abs() <= allowed)
        };
        assert!(
            ok,
            "{name}: index {i}: actual {a:e}, expected {e:e}, |diff| {:e} > allowed {allowed:e} \
             (atol {atol:e}, rtol {rtol:e})",
            (a - e).abs()
        );
    }
}

/// The op must fail with a shape error that names it (not panic, not succeed).
fn expect_shape_error<T: std::fmt::Debug>(result: Result<T, Error>, op: &str) {
    match result {
        Err(err @ Error::Shape { .. }) => {
            let message = err.to_string();
            assert!(
                message.starts_with(&format!("{op}:")),
                "error for {op} does not name it: {message}"
            );
        }
        Err(other) => panic!("{op}: expected a shape error, got {other:?}"),
        Ok(value) => panic!("{op}: expected an error, got Ok({value:?})"),
    }
}

// ---------------------------------------------------------------------------------------------------------
// Small helpers
// ---------------------------------------------------------------------------------------------------------

fn rng(seed: u64) -> StdRng {
    StdRng::seed_from_u64(seed)
}

fn random(rng: &mut StdRng, len: usize, range: Range<f32>) -> Vec<f32> {
    (0..len).map(|_| rng.random_range(range.clone())).collect()
}

fn wide(values: &[f32]) -> Vec<f64> {
    values.iter().map(|&v| v as f64).collect()
}

fn upload(be: &CpuBackend, data: &[f32], shape: &[usize]) -> CpuTensor {
    be.upload(data, shape).expect("upload")
}

fn read(be: &CpuBackend, t: &CpuTensor) -> Vec<f32> {
    pollster::block_on(be.read(t)).expect("read")
}

/// Little-endian bytes of `values` stored as `dtype`, and the stored (rounded) values widened to f64.
fn encode(values: &[f32], dtype: DType) -> (Vec<u8>, Vec<f64>) {
    let mut bytes = Vec::new();
    let mut rounded = Vec::new();
    for &v in values {
        match dtype {
            DType::F32 => {
                bytes.extend_from_slice(&v.to_le_bytes());
                rounded.push(v as f64);
            }
            DType::BF16 => {
                let h = bf16::from_f32(v);
                bytes.extend_from_slice(&h.to_le_bytes());
                rounded.push(h.to_f64());
            }
            DType::F16 => {
                let h = f16::from_f32(v);
                bytes.extend_from_slice(&h.to_le_bytes());
                rounded.push(h.to_f64());
            }
        }
    }
    (bytes, rounded)
}

/// Uploads `values` as a weight of `dtype`; when `misalign` the bytes start at an odd offset of a larger
/// buffer. Returns the weight and the rounded values the reference must use.
fn upload_weight(
    be: &CpuBackend,
    values: &[f32],
    shape: &[usize],
    dtype: DType,
    misalign: bool,
) -> (CpuWeight, Vec<f64>) {
    let (bytes, rounded) = encode(values, dtype);
    let lead = if misalign { 3 } else { 0 };
    let mut buffer = vec![0xAAu8; lead];
    buffer.extend_from_slice(&bytes);
    buffer.extend_from_slice(&[0x55, 0x55, 0x55]);
    let stored = &buffer[lead..lead + bytes.len()];
    if misalign {
        // An odd address cannot be 2- or 4-aligned: proves the upload does not cast in place.
        assert_eq!(
            stored.as_ptr() as usize % 2,
            1,
            "test setup: bytes are not misaligned"
        );
    }
    let view = TensorView {
        name: "test.weight",
        dtype,
        shape,
        bytes: stored,
    };
    (be.upload_weight(view).expect("upload_weight"), rounded)
}

// ---------------------------------------------------------------------------------------------------------
// Naive f64 references
// ---------------------------------------------------------------------------------------------------------

/// `y[i][o] = Σ_k x[i][k] · w[o][k]`.
fn naive_matmul(x: &[f64], n: usize, inner: usize, w: &[f64], out: usize) -> Vec<f64> {
    let mut y = vec![0.0; n * out];
    for i in 0..n {
        for o in 0..out {
            let mut s = 0.0;
            for k in 0..inner {
                s += x[i * inner + k] * w[o * inner + k];
            }
            y[i * out + o] = s;
        }
    }
    y
}

/// `w * x / sqrt(mean(x²) + eps)` over rows of `width`.
fn naive_rms_norm(x: &[f64], width: usize, w: &[f64], eps: f64) -> Vec<f64> {
    let mut y = vec![0.0; x.len()];
    for r in 0..x.len() / width {
        let mut ss = 0.0;
        for j in 0..width {
            ss += x[r * width + j] * x[r * width + j];
        }
        let denom = (ss / width as f64 + eps).sqrt();
        for j in 0..width {
            y[r * width + j] = w[j] * x[r * width + j] / denom;
        }
    }
    y
}

/// Rotate-half RoPE: for `j < d/2`, with `a = p · θ^(-2j/d)`,
/// `x'[j] = x[j] cos a − x[j+d/2] sin a`, `x'[j+d/2] = x[j+d/2] cos a + x[j] sin a`.
fn naive_rope(x: &[f64], heads: usize, d: usize, positions: &[u32], theta: f64) -> Vec<f64> {
    let half = d / 2;
    let mut y = x.to_vec();
    for (i, &p) in positions.iter().enumerate() {
        for h in 0..heads {
            let base = (i * heads + h) * d;
            for j in 0..half {
                let angle = p as f64 * theta.powf(-2.0 * j as f64 / d as f64);
                let (a, b) = (x[base + j], x[base + j + half]);
                y[base + j] = a * angle.cos() - b * angle.sin();
                y[base + j + half] = b * angle.cos() + a * angle.sin();
            }
        }
    }
    y
}

#[derive(Clone, Copy)]
struct AttnDims {
    nq: usize,
    nk: usize,
    heads: usize,
    kv_heads: usize,
    d: usize,
}

/// Softmax attention with an explicit visibility predicate `visible(query, key)`; query head `h` reads KV
/// head `h / (heads / kv_heads)`; scale `1/√d`.
fn naive_attention(
    q: &[f64],
    k: &[f64],
    v: &[f64],
    dims: &AttnDims,
    visible: &dyn Fn(usize, usize) -> bool,
) -> Vec<f64> {
    let AttnDims {
        nq,
        nk,
        heads,
        kv_heads,
        d,
    } = *dims;
    let group = heads / kv_heads;
    let scale = 1.0 / (d as f64).sqrt();
    let mut out = vec![0.0; nq * heads * d];
    for i in 0..nq {
        for h in 0..heads {
            let g = h / group;
            let mut logits = Vec::new();
            for j in 0..nk {
                if visible(i, j) {
                    let mut s = 0.0;
                    for c in 0..d {
                        s += q[(i * heads + h) * d + c] * k[(j * kv_heads + g) * d + c];
                    }
                    logits.push((j, s * scale));
                }
            }
            let max = logits.iter().map(|l| l.1).fold(f64::NEG_INFINITY, f64::max);
            let total: f64 = logits.iter().map(|l| (l.1 - max).exp()).sum();
            for &(j, s) in &logits {
                let p = (s - max).exp() / total;
                for c in 0..d {
                    out[(i * heads + h) * d + c] += p * v[(j * kv_heads + g) * d + c];
                }
            }
        }
    }
    out
}

/// Mean of rows `c*chunk .. min((c+1)*chunk, n)` for every chunk.
fn naive_chunk_mean_pool(x: &[f64], n: usize, width: usize, chunk: usize) -> Vec<f64> {
    let mut out = Vec::new();
    let mut start = 0;
    while start < n {
        let end = (start + chunk).min(n);
        for c in 0..width {
            let mut s = 0.0;
            for r in start..end {
                s += x[r * width + c];
            }
            out.push(s / (end - start) as f64);
        }
        start = end;
    }
    out
}

fn naive_l2_normalize(x: &[f64], width: usize) -> Vec<f64> {
    let mut y = vec![0.0; x.len()];
    for r in 0..x.len() / width {
        let mut ss = 0.0;
        for j in 0..width {
            ss += x[r * width + j] * x[r * width + j];
        }
        let norm = ss.sqrt().max(1e-12);
        for j in 0..width {
            y[r * width + j] = x[r * width + j] / norm;
        }
    }
    y
}

struct RoutingCase {
    /// `[n, heads, d]`
    queries: Vec<f32>,
    n: usize,
    heads: usize,
    d: usize,
    routing_rows: Vec<u32>,
    /// `[chunks, kv_heads, d]`
    keys: Vec<f32>,
    chunks: usize,
    kv_heads: usize,
    offsets: Vec<u32>,
}

/// MSA-SPEC §3.3 (a), in its order: per-head score (cosine: normalised query · key; scaled-dot: dot / √d),
/// reduce over heads, reduce over routing tokens, reduce over the chunks of each document.
fn naive_routing_scores(case: &RoutingCase, spec: RoutingSpec) -> Vec<f64> {
    let (heads, d, kv_heads) = (case.heads, case.d, case.kv_heads);
    let group = heads / kv_heads;
    let per_head = |row: usize, h: usize, c: usize| -> f64 {
        let q: Vec<f64> = (0..d)
            .map(|j| case.queries[(row * heads + h) * d + j] as f64)
            .collect();
        let key: Vec<f64> = (0..d)
            .map(|j| case.keys[(c * kv_heads + h / group) * d + j] as f64)
            .collect();
        let mut dot = 0.0;
        for j in 0..d {
            dot += q[j] * key[j];
        }
        match spec.score_mode {
            ScoreMode::ScaledDot => dot / (d as f64).sqrt(),
            ScoreMode::Cosine => {
                let norm = q.iter().map(|v| v * v).sum::<f64>().sqrt().max(1e-12);
                dot / norm
            }
        }
    };
    let chunk_score = |c: usize| -> f64 {
        let mut token_scores = Vec::new();
        for &row in &case.routing_rows {
            let scores: Vec<f64> = (0..heads).map(|h| per_head(row as usize, h, c)).collect();
            token_scores.push(match spec.head_reduce {
                HeadReduce::Mean => scores.iter().sum::<f64>() / heads as f64,
                HeadReduce::Max => scores.iter().copied().fold(f64::NEG_INFINITY, f64::max),
            });
        }
        match spec.query_reduce {
            QueryReduce::Max => token_scores
                .iter()
                .copied()
                .fold(f64::NEG_INFINITY, f64::max),
            QueryReduce::Mean => token_scores.iter().sum::<f64>() / token_scores.len() as f64,
            QueryReduce::Last => *token_scores.last().unwrap(),
        }
    };
    let mut docs = Vec::new();
    for w in case.offsets.windows(2) {
        let members: Vec<f64> = (w[0] as usize..w[1] as usize).map(chunk_score).collect();
        docs.push(match spec.chunk_reduce {
            ChunkReduce::Max => members.iter().copied().fold(f64::NEG_INFINITY, f64::max),
            ChunkReduce::Mean => members.iter().sum::<f64>() / members.len() as f64,
        });
    }
    docs
}

/// Top-k by repeated selection: the highest remaining score, the lowest index among equals.
fn naive_top_k(scores: &[f32], k: usize) -> Vec<Scored> {
    let mut taken = vec![false; scores.len()];
    let mut out = Vec::new();
    for _ in 0..k.min(scores.len()) {
        let mut best: Option<usize> = None;
        for i in 0..scores.len() {
            if !taken[i] && best.is_none_or(|b| scores[i] > scores[b]) {
                best = Some(i);
            }
        }
        let b = best.unwrap();
        taken[b] = true;
        out.push(Scored {
            index: b as u32,
            score: scores[b],
        });
    }
    out
}

// ---------------------------------------------------------------------------------------------------------
// upload / reshape / weights
// ---------------------------------------------------------------------------------------------------------

#[test]
fn upload_read_and_reshape() {
    let be = CpuBackend::new();
    let data = random(&mut rng(1), 7 * 6 * 10, -1.0..1.0);
    let t = upload(&be, &data, &[7, 6, 10]);
    assert_eq!(be.shape(&t), vec![7, 6, 10]);
    assert_close("read", &read(&be, &t), &wide(&data), tol::COPY);

    let r = be.reshape(&t, &[7, 60]).unwrap();
    assert_eq!(be.shape(&r), vec![7, 60]);
    assert_close("reshape", &read(&be, &r), &wide(&data), tol::COPY);
    // The original is untouched.
    assert_eq!(be.shape(&t), vec![7, 6, 10]);

    expect_shape_error(be.reshape(&t, &[7, 59]), "reshape");
    expect_shape_error(be.reshape(&t, &[421]), "reshape");
    expect_shape_error(be.upload(&data, &[7, 6, 11]), "upload");
}

#[test]
fn upload_weight_rejects_wrong_byte_count() {
    let be = CpuBackend::new();
    let (bytes, _) = encode(&[1.0; 12], DType::BF16);
    for (shape, bytes) in [(&[3usize, 5][..], &bytes[..]), (&[3, 4][..], &bytes[..23])] {
        let view = TensorView {
            name: "bad",
            dtype: DType::BF16,
            shape,
            bytes,
        };
        match be.upload_weight(view) {
            Err(Error::Shape { op, .. }) => assert_eq!(op, "upload_weight"),
            Err(other) => panic!("expected a shape error, got {other:?}"),
            Ok(_) => panic!("upload_weight accepted {} bytes for {shape:?}", bytes.len()),
        }
    }
}

// ---------------------------------------------------------------------------------------------------------
// matmul
// ---------------------------------------------------------------------------------------------------------

fn check_matmul(dtype: DType, misalign: bool, seed: u64) {
    let be = CpuBackend::new();
    let mut r = rng(seed);
    let (n, inner, out) = (7, 37, 13);
    let x = random(&mut r, n * inner, -1.0..1.0);
    let w = random(&mut r, out * inner, -1.0..1.0);
    let (weight, w_rounded) = upload_weight(&be, &w, &[out, inner], dtype, misalign);
    let xt = upload(&be, &x, &[n, inner]);
    let y = be.matmul(&xt, &weight).unwrap();
    assert_eq!(be.shape(&y), vec![n, out]);
    let expected = naive_matmul(&wide(&x), n, inner, &w_rounded, out);
    let name = format!("matmul {dtype} misaligned={misalign}");
    assert_close(&name, &read(&be, &y), &expected, tol::REDUCTION);
}

#[test]
fn matmul_f32_weights() {
    check_matmul(DType::F32, false, 10);
}

#[test]
fn matmul_bf16_weights() {
    check_matmul(DType::BF16, false, 11);
}

#[test]
fn matmul_f16_weights() {
    check_matmul(DType::F16, false, 12);
}

#[test]
fn matmul_unaligned_weight_bytes() {
    for (i, dtype) in [DType::F32, DType::BF16, DType::F16]
        .into_iter()
        .enumerate()
    {
        check_matmul(dtype, true, 20 + i as u64);
    }
}

#[test]
fn matmul_flattens_trailing_dims_of_x() {
    // x [n, heads, d] is read as [n, heads*d] (how o_proj consumes attention output).
    let be = CpuBackend::new();
    let mut r = rng(13);
    let (n, heads, d, out) = (5, 3, 6, 11);
    let x = random(&mut r, n * heads * d, -1.0..1.0);
    let w = random(&mut r, out * heads * d, -1.0..1.0);
    let (weight, w_rounded) = upload_weight(&be, &w, &[out, heads * d], DType::BF16, false);
    let y = be
        .matmul(&upload(&be, &x, &[n, heads, d]), &weight)
        .unwrap();
    assert_eq!(be.shape(&y), vec![n, out]);
    let expected = naive_matmul(&wide(&x), n, heads * d, &w_rounded, out);
    assert_close("matmul [n,h,d]", &read(&be, &y), &expected, tol::REDUCTION);
}

#[test]
fn matmul_shape_mismatch_is_an_error() {
    let be = CpuBackend::new();
    let x = upload(&be, &[0.5; 7 * 37], &[7, 37]);
    let (w_wrong_inner, _) = upload_weight(&be, &[0.25; 13 * 36], &[13, 36], DType::BF16, false);
    expect_shape_error(be.matmul(&x, &w_wrong_inner), "matmul");
    let (w_1d, _) = upload_weight(&be, &[0.25; 37], &[37], DType::F32, false);
    expect_shape_error(be.matmul(&x, &w_1d), "matmul");
    let (w_3d, _) = upload_weight(&be, &[0.25; 2 * 3 * 37], &[2, 3, 37], DType::F16, false);
    expect_shape_error(be.matmul(&x, &w_3d), "matmul");
}

// ---------------------------------------------------------------------------------------------------------
// embedding
// ---------------------------------------------------------------------------------------------------------

#[test]
fn embedding_widens_bf16_rows() {
    let be = CpuBackend::new();
    let (vocab, hidden) = (11, 6);
    let table = random(&mut rng(30), vocab * hidden, -2.0..2.0);
    let (w, rounded) = upload_weight(&be, &table, &[vocab, hidden], DType::BF16, true);
    let ids = [3u32, 0, 10, 3, 7];
    let e = be.embedding(&w, &ids).unwrap();
    assert_eq!(be.shape(&e), vec![ids.len(), hidden]);
    let mut expected = Vec::new();
    for &id in &ids {
        for j in 0..hidden {
            expected.push(rounded[id as usize * hidden + j]);
        }
    }
    assert_close("embedding", &read(&be, &e), &expected, tol::COPY);

    let empty = be.embedding(&w, &[]).unwrap();
    assert_eq!(be.shape(&empty), vec![0, hidden]);
}

#[test]
fn embedding_out_of_range_id_is_an_error() {
    let be = CpuBackend::new();
    let (w, _) = upload_weight(&be, &[1.0; 11 * 6], &[11, 6], DType::BF16, false);
    match be.embedding(&w, &[2, 11, 0]) {
        Err(Error::TokenOutOfRange { id, vocab }) => assert_eq!((id, vocab), (11, 11)),
        Err(other) => panic!("expected TokenOutOfRange, got {other:?}"),
        Ok(t) => panic!("embedding accepted id 11 of vocab 11: {t:?}"),
    }
    assert!(be.embedding(&w, &[u32::MAX]).is_err());
}

// ---------------------------------------------------------------------------------------------------------
// rms_norm
// ---------------------------------------------------------------------------------------------------------

#[test]
fn rms_norm_per_row() {
    let be = CpuBackend::new();
    let mut r = rng(40);
    let (n, width, eps) = (7, 37, 1e-6f32);
    let x = random(&mut r, n * width, -3.0..3.0);
    let w = random(&mut r, width, 0.5..1.5);
    let (weight, w_rounded) = upload_weight(&be, &w, &[width], DType::BF16, false);
    let y = be
        .rms_norm(&upload(&be, &x, &[n, width]), &weight, eps)
        .unwrap();
    assert_eq!(be.shape(&y), vec![n, width]);
    let expected = naive_rms_norm(&wide(&x), width, &w_rounded, eps as f64);
    assert_close("rms_norm rows", &read(&be, &y), &expected, tol::REDUCTION);
}

#[test]
fn rms_norm_per_head() {
    // q_norm / k_norm: [n, heads, d] normalised per head with one [d] weight.
    let be = CpuBackend::new();
    let mut r = rng(41);
    let (n, heads, d, eps) = (7, 3, 10, 1e-6f32);
    let x = random(&mut r, n * heads * d, -2.0..2.0);
    let w = random(&mut r, d, -1.5..1.5);
    let (weight, w_rounded) = upload_weight(&be, &w, &[d], DType::F16, true);
    let y = be
        .rms_norm(&upload(&be, &x, &[n, heads, d]), &weight, eps)
        .unwrap();
    assert_eq!(be.shape(&y), vec![n, heads, d]);
    let expected = naive_rms_norm(&wide(&x), d, &w_rounded, eps as f64);
    assert_close("rms_norm heads", &read(&be, &y), &expected, tol::REDUCTION);

    // eps matters for tiny rows: an all-zero row stays zero, a tiny row is damped by eps.
    let mut tiny = vec![0.0f32; 2 * d];
    tiny[d..].iter_mut().for_each(|v| *v = 1e-4);
    let y = be
        .rms_norm(&upload(&be, &tiny, &[2, d]), &weight, eps)
        .unwrap();
    let expected = naive_rms_norm(&wide(&tiny), d, &w_rounded, eps as f64);
    assert_close("rms_norm eps", &read(&be, &y), &expected, tol::REDUCTION);

    let (wrong, _) = upload_weight(&be, &[1.0; 9], &[9], DType::BF16, false);
    expect_shape_error(
        be.rms_norm(&upload(&be, &x, &[n, heads, d]), &wrong, eps),
        "rms_norm",
    );
}

// ---------------------------------------------------------------------------------------------------------
// rope
// ---------------------------------------------------------------------------------------------------------

fn check_rope(theta: f64, d: usize, seed: u64) {
    let be = CpuBackend::new();
    let positions = [0u32, 5, 2, 19, 1000, 3, 7];
    let (n, heads) = (positions.len(), 3);
    let x = random(&mut rng(seed), n * heads * d, -1.0..1.0);
    let y = be
        .rope(&upload(&be, &x, &[n, heads, d]), &positions, theta)
        .unwrap();
    assert_eq!(be.shape(&y), vec![n, heads, d]);
    let actual = read(&be, &y);
    let expected = naive_rope(&wide(&x), heads, d, &positions, theta);
    let row = heads * d;
    for (i, &p) in positions.iter().enumerate() {
        let span = i * row..(i + 1) * row;
        let max_abs = x[span.clone()]
            .iter()
            .fold(0.0f64, |m, v| m.max(v.abs() as f64));
        let atol = tol::ROPE_BASE + tol::ROPE_PER_POS * p as f64 * max_abs;
        let name = format!("rope theta={theta} d={d} row {i} (pos {p})");
        assert_close(
            &name,
            &actual[span.clone()],
            &expected[span],
            (atol, tol::ROPE_RTOL),
        );
    }
    // Position 0 is the identity, exactly.
    assert_close("rope pos 0", &actual[..row], &wide(&x[..row]), tol::COPY);
}

#[test]
fn rope_theta_5e6_head_dim_10() {
    check_rope(5.0e6, 10, 50);
}

#[test]
fn rope_theta_1e4_head_dim_6() {
    check_rope(1.0e4, 6, 51);
}

#[test]
fn rope_theta_1e4_head_dim_10() {
    check_rope(1.0e4, 10, 52);
}

#[test]
fn rope_bad_inputs_are_errors() {
    let be = CpuBackend::new();
    let x = upload(&be, &[0.5; 7 * 3 * 6], &[7, 3, 6]);
    expect_shape_error(be.rope(&x, &[0, 1, 2], 1e4), "rope");
    let odd = upload(&be, &[0.5; 7 * 3 * 5], &[7, 3, 5]);
    expect_shape_error(be.rope(&odd, &[0, 1, 2, 3, 4, 5, 6], 1e4), "rope");
    let flat = upload(&be, &[0.5; 7 * 18], &[7, 18]);
    expect_shape_error(be.rope(&flat, &[0, 1, 2, 3, 4, 5, 6], 1e4), "rope");
}

// ---------------------------------------------------------------------------------------------------------
// attention
// ---------------------------------------------------------------------------------------------------------

struct AttnInputs {
    dims: AttnDims,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
}

fn attn_inputs(dims: AttnDims, seed: u64, q_scale: f32) -> AttnInputs {
    let mut r = rng(seed);
    let q = random(&mut r, dims.nq * dims.heads * dims.d, -1.0..1.0)
        .into_iter()
        .map(|v| v * q_scale)
        .collect();
    let k = random(&mut r, dims.nk * dims.kv_heads * dims.d, -1.0..1.0);
    let v = random(&mut r, dims.nk * dims.kv_heads * dims.d, -1.0..1.0);
    AttnInputs { dims, q, k, v }
}

fn run_attention(be: &CpuBackend, a: &AttnInputs, mask: AttentionMask) -> Vec<f32> {
    let AttnDims {
        nq,
        nk,
        heads,
        kv_heads,
        d,
    } = a.dims;
    let q = upload(be, &a.q, &[nq, heads, d]);
    let k = upload(be, &a.k, &[nk, kv_heads, d]);
    let v = upload(be, &a.v, &[nk, kv_heads, d]);
    let out = be.attention(&q, &k, &v, mask).unwrap();
    assert_eq!(be.shape(&out), vec![nq, heads, d]);
    read(be, &out)
}

#[test]
fn attention_causal_with_prefix_gqa() {
    let be = CpuBackend::new();
    for (seed, kv_heads, d) in [(60, 2, 6), (61, 3, 10), (62, 6, 6), (63, 1, 10)] {
        let dims = AttnDims {
            nq: 7,
            nk: 12,
            heads: 6,
            kv_heads,
            d,
        };
        let a = attn_inputs(dims, seed, 1.0);
        let (nq, nk) = (a.dims.nq, a.dims.nk);
        let expected = naive_attention(&wide(&a.q), &wide(&a.k), &wide(&a.v), &a.dims, &|i, j| {
            j <= nk - nq + i
        });
        let name = format!("attention causal prefix kv_heads={kv_heads} d={d}");
        assert_close(
            &name,
            &run_attention(&be, &a, AttentionMask::Causal),
            &expected,
            tol::REDUCTION,
        );
    }
}

#[test]
fn attention_full_gqa() {
    let be = CpuBackend::new();
    for (seed, nq, nk, kv_heads, d) in [(64, 7, 12, 2, 6), (65, 5, 5, 3, 10), (66, 1, 13, 2, 10)] {
        let dims = AttnDims {
            nq,
            nk,
            heads: 6,
            kv_heads,
            d,
        };
        let a = attn_inputs(dims, seed, 1.0);
        let expected =
            naive_attention(&wide(&a.q), &wide(&a.k), &wide(&a.v), &a.dims, &|_, _| true);
        let name = format!("attention full nq={nq} nk={nk} kv_heads={kv_heads}");
        assert_close(
            &name,
            &run_attention(&be, &a, AttentionMask::Full),
            &expected,
            tol::REDUCTION,
        );
    }
}

#[test]
fn attention_packed_is_block_diagonal_causal() {
    let be = CpuBackend::new();
    // Sequences of 3, 1, 5 and 4 rows packed into 13; GQA groups of 3.
    let starts = [0u32, 3, 4, 9];
    let sequence_of = |i: usize| starts.partition_point(|&s| s as usize <= i) - 1;
    for (seed, kv_heads, d) in [(70, 2, 6), (71, 1, 10)] {
        let dims = AttnDims {
            nq: 13,
            nk: 13,
            heads: 6,
            kv_heads,
            d,
        };
        let a = attn_inputs(dims, seed, 1.0);
        let expected = naive_attention(&wide(&a.q), &wide(&a.k), &wide(&a.v), &a.dims, &|i, j| {
            j <= i && sequence_of(j) == sequence_of(i)
        });
        assert_close(
            &format!("attention packed kv_heads={kv_heads} d={d}"),
            &run_attention(&be, &a, AttentionMask::Packed(&starts)),
            &expected,
            tol::REDUCTION,
        );
    }
    // One sequence is plain causal.
    let a = attn_inputs(
        AttnDims {
            nq: 5,
            nk: 5,
            heads: 2,
            kv_heads: 1,
            d: 4,
        },
        72,
        1.0,
    );
    assert_eq!(
        run_attention(&be, &a, AttentionMask::Packed(&[0])),
        run_attention(&be, &a, AttentionMask::Causal)
    );
}

#[test]
fn attention_packed_rejects_bad_starts() {
    let be = CpuBackend::new();
    let q = upload(&be, &[0.0; 5 * 2 * 4], &[5, 2, 4]);
    let kv = upload(&be, &[0.0; 6 * 4], &[6, 1, 4]);
    let kv5 = upload(&be, &[0.0; 5 * 4], &[5, 1, 4]);
    // Keys beyond the queries, a first start that is not 0, starts out of order or past the rows.
    expect_shape_error(
        be.attention(&q, &kv, &kv, AttentionMask::Packed(&[0])),
        "attention",
    );
    for starts in [&[1u32][..], &[0, 3, 2], &[0, 5], &[0, 2, 2], &[]] {
        expect_shape_error(
            be.attention(&q, &kv5, &kv5, AttentionMask::Packed(starts)),
            "attention",
        );
    }
}

#[test]
fn attention_causal_square_is_standard_causal() {
    let be = CpuBackend::new();
    let dims = AttnDims {
        nq: 7,
        nk: 7,
        heads: 6,
        kv_heads: 2,
        d: 10,
    };
    let a = attn_inputs(dims, 67, 1.0);
    let expected = naive_attention(&wide(&a.q), &wide(&a.k), &wide(&a.v), &a.dims, &|i, j| {
        j <= i
    });
    let actual = run_attention(&be, &a, AttentionMask::Causal);
    assert_close(
        "attention causal nq == nk",
        &actual,
        &expected,
        tol::REDUCTION,
    );
    // The first query sees only the first key: its output is exactly that key's value row.
    let (heads, d, group) = (6, 10, 3);
    for h in 0..heads {
        let g = h / group;
        assert_close(
            "attention causal row 0",
            &actual[h * d..(h + 1) * d],
            &wide(&a.v[g * d..(g + 1) * d]),
            tol::REDUCTION,
        );
    }
}

#[test]
fn attention_decode_single_query_sees_everything() {
    // nq = 1 under Causal sees all nk keys, same as Full.
    let be = CpuBackend::new();
    let dims = AttnDims {
        nq: 1,
        nk: 13,
        heads: 6,
        kv_heads: 3,
        d: 6,
    };
    let a = attn_inputs(dims, 68, 1.0);
    let causal = run_attention(&be, &a, AttentionMask::Causal);
    let full = run_attention(&be, &a, AttentionMask::Full);
    let expected = naive_attention(&wide(&a.q), &wide(&a.k), &wide(&a.v), &a.dims, &|_, _| true);
    assert_close(
        "attention decode causal",
        &causal,
        &expected,
        tol::REDUCTION,
    );
    assert_close("attention decode full", &full, &expected, tol::REDUCTION);
}

#[test]
fn attention_invisible_keys_do_not_influence_output() {
    let be = CpuBackend::new();
    let dims = AttnDims {
        nq: 7,
        nk: 11,
        heads: 6,
        kv_heads: 2,
        d: 6,
    };
    let base = attn_inputs(dims, 69, 1.0);
    let (nq, nk, heads, kv_heads, d) = (7, 11, 6, 2, 6);
    let prefix = nk - nq;
    let reference = run_attention(&be, &base, AttentionMask::Causal);
    // Perturb key/value row j = prefix + m: queries i < m cannot see it (bit-identical output),
    // queries i >= m can (their output must change).
    for m in 0..nq {
        let j = prefix + m;
        let mut perturbed = AttnInputs {
            dims: base.dims,
            q: base.q.clone(),
            k: base.k.clone(),
            v: base.v.clone(),
        };
        for x in &mut perturbed.k[j * kv_heads * d..(j + 1) * kv_heads * d] {
            *x = *x * 7.0 + 3.0;
        }
        for x in &mut perturbed.v[j * kv_heads * d..(j + 1) * kv_heads * d] {
            *x = -*x * 5.0 + 100.0;
        }
        let out = run_attention(&be, &perturbed, AttentionMask::Causal);
        let row = heads * d;
        for i in 0..nq {
            let (got, before) = (
                &out[i * row..(i + 1) * row],
                &reference[i * row..(i + 1) * row],
            );
            if i < m {
                assert_eq!(
                    got, before,
                    "attention: query {i} changed when invisible key {j} was perturbed"
                );
            } else {
                assert_ne!(got, before, "attention: query {i} ignored visible key {j}");
            }
        }
    }
    // Under Full every query sees the last key.
    let mut perturbed = AttnInputs {
        dims: base.dims,
        q: base.q.clone(),
        k: base.k.clone(),
        v: base.v.clone(),
    };
    for x in &mut perturbed.v[(nk - 1) * kv_heads * d..] {
        *x += 50.0;
    }
    let full_before = run_attention(&be, &base, AttentionMask::Full);
    let full_after = run_attention(&be, &perturbed, AttentionMask::Full);
    let row = heads * d;
    for i in 0..nq {
        assert_ne!(
            &full_after[i * row..(i + 1) * row],
            &full_before[i * row..(i + 1) * row],
            "attention full: query {i} ignored the last key"
        );
    }
}

#[test]
fn attention_gqa_head_mapping_is_h_over_group() {
    // Perturbing KV head g may only change query heads g*group .. (g+1)*group.
    let be = CpuBackend::new();
    let (nq, nk, heads, kv_heads, d) = (3, 5, 6, 3, 6);
    let group = heads / kv_heads;
    let dims = AttnDims {
        nq,
        nk,
        heads,
        kv_heads,
        d,
    };
    let base = attn_inputs(dims, 70, 1.0);
    let before = run_attention(&be, &base, AttentionMask::Full);
    for g in 0..kv_heads {
        let mut v = base.v.clone();
        for j in 0..nk {
            for c in 0..d {
                v[(j * kv_heads + g) * d + c] += 10.0;
            }
        }
        let perturbed = AttnInputs {
            dims: base.dims,
            q: base.q.clone(),
            k: base.k.clone(),
            v,
        };
        let after = run_attention(&be, &perturbed, AttentionMask::Full);
        for i in 0..nq {
            for h in 0..heads {
                let span = (i * heads + h) * d..(i * heads + h + 1) * d;
                let changed = after[span.clone()] != before[span];
                assert_eq!(
                    changed,
                    h / group == g,
                    "attention: query head {h} {} when KV head {g} changed",
                    if changed { "changed" } else { "did not change" }
                );
            }
        }
    }
}

#[test]
fn attention_is_stable_for_large_logits() {
    // Logits up to ~|60|: a softmax without max subtraction would overflow exp in f32.
    let be = CpuBackend::new();
    let dims = AttnDims {
        nq: 7,
        nk: 9,
        heads: 6,
        kv_heads: 2,
        d: 10,
    };
    let a = attn_inputs(dims, 71, 40.0);
    let (nq, nk) = (7, 9);
    let expected = naive_attention(&wide(&a.q), &wide(&a.k), &wide(&a.v), &a.dims, &|i, j| {
        j <= nk - nq + i
    });
    assert_close(
        "attention large logits",
        &run_attention(&be, &a, AttentionMask::Causal),
        &expected,
        tol::SHARP_ATTENTION,
    );
}

#[test]
fn attention_shape_mismatch_is_an_error() {
    let be = CpuBackend::new();
    let t = |shape: &[usize]| upload(&be, &vec![0.1; shape.iter().product()], shape);
    let q = t(&[7, 6, 6]);
    let k = t(&[9, 2, 6]);
    let v = t(&[9, 2, 6]);
    let mask = AttentionMask::Causal;
    // Head dims differ.
    expect_shape_error(
        be.attention(&q, &t(&[9, 2, 10]), &t(&[9, 2, 10]), mask),
        "attention",
    );
    // kv_heads does not divide heads.
    expect_shape_error(
        be.attention(&q, &t(&[9, 4, 6]), &t(&[9, 4, 6]), mask),
        "attention",
    );
    // k and v disagree.
    expect_shape_error(be.attention(&q, &k, &t(&[8, 2, 6]), mask), "attention");
    // Fewer keys than queries.
    expect_shape_error(
        be.attention(&q, &t(&[5, 2, 6]), &t(&[5, 2, 6]), mask),
        "attention",
    );
    // Not rank 3.
    expect_shape_error(be.attention(&t(&[7, 36]), &k, &v, mask), "attention");
    // The valid call works.
    assert!(be.attention(&q, &k, &v, mask).is_ok());
}

// ---------------------------------------------------------------------------------------------------------
// silu_mul, add
// ---------------------------------------------------------------------------------------------------------

#[test]
fn silu_mul_matches_formula() {
    let be = CpuBackend::new();
    let mut r = rng(80);
    let (n, width) = (7, 13);
    let mut gate = random(&mut r, n * width, -8.0..8.0);
    gate[..6].copy_from_slice(&[-100.0, -20.0, 0.0, 20.0, 100.0, -1e-3]);
    let up = random(&mut r, n * width, -3.0..3.0);
    let y = be
        .silu_mul(
            &upload(&be, &gate, &[n, width]),
            &upload(&be, &up, &[n, width]),
        )
        .unwrap();
    assert_eq!(be.shape(&y), vec![n, width]);
    let expected: Vec<f64> = (0..n * width)
        .map(|i| {
            let g = gate[i] as f64;
            g / (1.0 + (-g).exp()) * up[i] as f64
        })
        .collect();
    assert_close("silu_mul", &read(&be, &y), &expected, tol::ELEMENTWISE);

    expect_shape_error(
        be.silu_mul(
            &upload(&be, &gate, &[n, width]),
            &upload(&be, &up, &[width, n]),
        ),
        "silu_mul",
    );
}

#[test]
fn add_matches_formula() {
    let be = CpuBackend::new();
    let mut r = rng(81);
    let shape = [7, 3, 5];
    let a = random(&mut r, 105, -10.0..10.0);
    let b = random(&mut r, 105, -10.0..10.0);
    let y = be
        .add(&upload(&be, &a, &shape), &upload(&be, &b, &shape))
        .unwrap();
    assert_eq!(be.shape(&y), shape.to_vec());
    let expected: Vec<f64> = (0..105).map(|i| a[i] as f64 + b[i] as f64).collect();
    assert_close("add", &read(&be, &y), &expected, tol::ADD);

    expect_shape_error(
        be.add(&upload(&be, &a, &shape), &upload(&be, &b, &[7, 15])),
        "add",
    );
    expect_shape_error(
        be.add(
            &upload(&be, &a, &shape),
            &upload(&be, &b[..100], &[4, 5, 5]),
        ),
        "add",
    );
}

// ---------------------------------------------------------------------------------------------------------
// concat_rows, rows, gather_rows
// ---------------------------------------------------------------------------------------------------------

#[test]
fn concat_rows_stacks_leading_dim() {
    let be = CpuBackend::new();
    let mut r = rng(90);
    let parts: Vec<Vec<f32>> = [2usize, 4, 1, 0]
        .iter()
        .map(|&n| random(&mut r, n * 15, -1.0..1.0))
        .collect();
    let tensors: Vec<CpuTensor> = parts
        .iter()
        .map(|p| upload(&be, p, &[p.len() / 15, 3, 5]))
        .collect();
    let refs: Vec<&CpuTensor> = tensors.iter().collect();
    let y = be.concat_rows(&refs).unwrap();
    assert_eq!(be.shape(&y), vec![7, 3, 5]);
    let expected: Vec<f64> = parts.iter().flat_map(|p| wide(p)).collect();
    assert_close("concat_rows", &read(&be, &y), &expected, tol::COPY);

    let bad = upload(&be, &parts[0], &[2, 5, 3]);
    expect_shape_error(be.concat_rows(&[&tensors[0], &bad]), "concat_rows");
    let flat = upload(&be, &parts[0], &[2, 15]);
    expect_shape_error(be.concat_rows(&[&tensors[0], &flat]), "concat_rows");
    expect_shape_error(be.concat_rows(&[]), "concat_rows");
}

#[test]
fn rows_slices_leading_dim() {
    let be = CpuBackend::new();
    let data = random(&mut rng(91), 7 * 15, -1.0..1.0);
    let t = upload(&be, &data, &[7, 3, 5]);
    let y = be.rows(&t, 2..6).unwrap();
    assert_eq!(be.shape(&y), vec![4, 3, 5]);
    assert_close("rows 2..6", &read(&be, &y), &wide(&data[30..90]), tol::COPY);
    let all = be.rows(&t, 0..7).unwrap();
    assert_close("rows 0..7", &read(&be, &all), &wide(&data), tol::COPY);
    let empty = be.rows(&t, 3..3).unwrap();
    assert_eq!(be.shape(&empty), vec![0, 3, 5]);

    expect_shape_error(be.rows(&t, 5..8), "rows");
    expect_shape_error(be.rows(&t, Range { start: 5, end: 3 }), "rows");
}

#[test]
fn gather_rows_with_repeats() {
    let be = CpuBackend::new();
    let (n, width) = (7, 6);
    let data = random(&mut rng(92), n * width, -1.0..1.0);
    let t = upload(&be, &data, &[n, 2, 3]);
    let indices = [6u32, 0, 6, 3, 3, 1];
    let y = be.gather_rows(&t, &indices).unwrap();
    assert_eq!(be.shape(&y), vec![indices.len(), 2, 3]);
    let mut expected = Vec::new();
    for &i in &indices {
        for c in 0..width {
            expected.push(data[i as usize * width + c] as f64);
        }
    }
    assert_close("gather_rows", &read(&be, &y), &expected, tol::COPY);

    let none = be.gather_rows(&t, &[]).unwrap();
    assert_eq!(be.shape(&none), vec![0, 2, 3]);
    expect_shape_error(be.gather_rows(&t, &[1, 7]), "gather_rows");
}

// ---------------------------------------------------------------------------------------------------------
// chunk_mean_pool, l2_normalize
// ---------------------------------------------------------------------------------------------------------

#[test]
fn chunk_mean_pool_partial_last_chunk() {
    let be = CpuBackend::new();
    let (n, kv_heads, d) = (23, 2, 3);
    let width = kv_heads * d;
    let data = random(&mut rng(100), n * width, -2.0..2.0);
    let t = upload(&be, &data, &[n, kv_heads, d]);
    for chunk in [5usize, 1, 7, 23, 64] {
        let y = be.chunk_mean_pool(&t, chunk).unwrap();
        let chunks = n.div_ceil(chunk);
        assert_eq!(be.shape(&y), vec![chunks, kv_heads, d], "chunk {chunk}");
        let expected = naive_chunk_mean_pool(&wide(&data), n, width, chunk);
        assert_eq!(expected.len(), chunks * width);
        let name = format!("chunk_mean_pool chunk={chunk}");
        assert_close(&name, &read(&be, &y), &expected, tol::REDUCTION);
    }
    // The partial last chunk (rows 20..23) is a mean over 3 rows, not 5.
    let y = read(&be, &be.chunk_mean_pool(&t, 5).unwrap());
    let last: Vec<f64> = (0..width)
        .map(|c| (20..23).map(|r| data[r * width + c] as f64).sum::<f64>() / 3.0)
        .collect();
    assert_close(
        "chunk_mean_pool last",
        &y[4 * width..],
        &last,
        tol::REDUCTION,
    );

    expect_shape_error(be.chunk_mean_pool(&t, 0), "chunk_mean_pool");
}

#[test]
fn l2_normalize_unit_norms_and_zero_floor() {
    let be = CpuBackend::new();
    let (n, heads, d) = (7, 3, 10);
    let mut data = random(&mut rng(110), n * heads * d, -3.0..3.0);
    // Row-head 4 all zero: stays zero. Row-head 5 tiny: divided by the 1e-12 floor, not its norm.
    data[4 * d..5 * d].iter_mut().for_each(|v| *v = 0.0);
    data[5 * d..6 * d].iter_mut().for_each(|v| *v = 1e-13);
    let y = read(
        &be,
        &be.l2_normalize(&upload(&be, &data, &[n, heads, d]))
            .unwrap(),
    );
    let expected = naive_l2_normalize(&wide(&data), d);
    assert_close("l2_normalize", &y, &expected, tol::REDUCTION);
    for r in 0..n * heads {
        let norm = y[r * d..(r + 1) * d]
            .iter()
            .map(|&v| (v as f64).powi(2))
            .sum::<f64>()
            .sqrt();
        let want = match r {
            4 => 0.0,
            5 => (d as f64).sqrt() * 1e-13 / 1e-12,
            _ => 1.0,
        };
        assert!(
            (norm - want).abs() <= 1e-5 * want,
            "l2_normalize: row {r} has norm {norm}, expected {want}"
        );
    }
    assert!(y[4 * d..5 * d].iter().all(|&v| v == 0.0));
}

// ---------------------------------------------------------------------------------------------------------
// routing_scores
// ---------------------------------------------------------------------------------------------------------

const NON_ROUTING_ROWS: [usize; 3] = [0, 3, 5];

/// 7 query rows of 6 heads over 2 or 3 KV heads, 13 chunks in documents of 3, 1, 5 and 4 chunks.
/// Rows 0, 3 and 5 are not routing rows and hold huge multiples of chunk 4's keys (document 2), so that they
/// would dominate every reduction, in both score modes, if they were read.
fn routing_case(seed: u64, kv_heads: usize, d: usize, mode: ScoreMode) -> RoutingCase {
    let mut r = rng(seed);
    let (n, heads, chunks) = (7, 6, 13);
    let group = heads / kv_heads;
    let mut queries = random(&mut r, n * heads * d, -1.0..1.0);
    let mut keys = random(&mut r, chunks * kv_heads * d, -1.0..1.0);
    if mode == ScoreMode::Cosine {
        // The memory stores routing keys normalised; normalise in f64 and store the f32 result.
        let normalised = naive_l2_normalize(&wide(&keys), d);
        keys = normalised.iter().map(|&v| v as f32).collect();
    }
    let trap_chunk = 4;
    for &row in &NON_ROUTING_ROWS {
        for h in 0..heads {
            for j in 0..d {
                queries[(row * heads + h) * d + j] =
                    1.0e6 * keys[(trap_chunk * kv_heads + h / group) * d + j];
            }
        }
    }
    RoutingCase {
        queries,
        n,
        heads,
        d,
        routing_rows: vec![1, 2, 4, 6],
        keys,
        chunks,
        kv_heads,
        offsets: vec![0, 3, 4, 9, 13],
    }
}

/// f32 routing keys as the weight `routing_scores` takes, through `tensor_to_weight`.
fn key_weight(be: &CpuBackend, keys: &[f32], shape: &[usize]) -> CpuWeight {
    be.tensor_to_weight(&upload(be, keys, shape))
        .expect("tensor_to_weight")
}

fn run_routing(be: &CpuBackend, case: &RoutingCase, spec: RoutingSpec) -> Result<Vec<f32>, Error> {
    let k = key_weight(be, &case.keys, &[case.chunks, case.kv_heads, case.d]);
    run_routing_with(be, case, &k, spec)
}

fn run_routing_with(
    be: &CpuBackend,
    case: &RoutingCase,
    k: &CpuWeight,
    spec: RoutingSpec,
) -> Result<Vec<f32>, Error> {
    let q = upload(be, &case.queries, &[case.n, case.heads, case.d]);
    let scores = be.routing_scores(&q, &case.routing_rows, k, &case.offsets, spec)?;
    assert_eq!(be.shape(&scores), vec![case.offsets.len() - 1]);
    Ok(read(be, &scores))
}

fn all_specs(score_mode: ScoreMode) -> Vec<RoutingSpec> {
    let mut specs = Vec::new();
    for head_reduce in [HeadReduce::Mean, HeadReduce::Max] {
        for query_reduce in [QueryReduce::Max, QueryReduce::Mean, QueryReduce::Last] {
            for chunk_reduce in [ChunkReduce::Max, ChunkReduce::Mean] {
                specs.push(RoutingSpec {
                    score_mode,
                    head_reduce,
                    query_reduce,
                    chunk_reduce,
                });
            }
        }
    }
    specs
}

fn check_routing_all_specs(mode: ScoreMode, seed: u64) {
    let be = CpuBackend::new();
    for (kv_heads, d) in [(2, 6), (3, 10)] {
        let case = routing_case(seed + kv_heads as u64, kv_heads, d, mode);
        for spec in all_specs(mode) {
            let actual = run_routing(&be, &case, spec).unwrap();
            let expected = naive_routing_scores(&case, spec);
            let name = format!("routing_scores kv_heads={kv_heads} d={d} {spec:?}");
            assert_close(&name, &actual, &expected, tol::REDUCTION);
            // Sanity of the trap: the non-routing rows would have produced a far larger document-2 score.
            assert!(
                actual[2] < 10.0,
                "{name}: document 2 scored {} (non-routing rows leaked in)",
                actual[2]
            );
        }
    }
}

#[test]
fn routing_scores_scaled_dot_all_reductions() {
    check_routing_all_specs(ScoreMode::ScaledDot, 120);
}

#[test]
fn routing_scores_cosine_all_reductions() {
    check_routing_all_specs(ScoreMode::Cosine, 130);
}

#[test]
fn routing_scores_widen_bf16_and_f16_keys() {
    // Keys stored as bf16 / f16 (at an odd byte address too) score exactly like f32 keys holding the
    // rounded values, and match the f64 reference on those values.
    let be = CpuBackend::new();
    for (i, dtype) in [DType::BF16, DType::F16].into_iter().enumerate() {
        for mode in [ScoreMode::ScaledDot, ScoreMode::Cosine] {
            for (kv_heads, d, misalign) in [(2, 6, false), (3, 10, true)] {
                let mut case = routing_case(190 + i as u64, kv_heads, d, mode);
                let shape = [case.chunks, kv_heads, d];
                let (stored, rounded) = upload_weight(&be, &case.keys, &shape, dtype, misalign);
                case.keys = rounded.iter().map(|&v| v as f32).collect();
                let f32_keys = key_weight(&be, &case.keys, &shape);
                for spec in all_specs(mode) {
                    let name =
                        format!("routing_scores {dtype} keys kv_heads={kv_heads} d={d} {spec:?}");
                    let actual = run_routing_with(&be, &case, &stored, spec).unwrap();
                    let widened = run_routing_with(&be, &case, &f32_keys, spec).unwrap();
                    assert_eq!(actual, widened, "{name}: differs from f32 keys");
                    let expected = naive_routing_scores(&case, spec);
                    assert_close(&name, &actual, &expected, tol::REDUCTION);
                }
            }
        }
    }
}

#[test]
fn routing_scores_ignore_non_routing_rows() {
    // Changing non-routing rows arbitrarily leaves every score bit-identical.
    let be = CpuBackend::new();
    for mode in [ScoreMode::ScaledDot, ScoreMode::Cosine] {
        let case = routing_case(140, 2, 6, mode);
        let mut other = routing_case(140, 2, 6, mode);
        let row_len = other.heads * other.d;
        for &row in &NON_ROUTING_ROWS {
            for (j, v) in other.queries[row * row_len..(row + 1) * row_len]
                .iter_mut()
                .enumerate()
            {
                *v = if j % 2 == 0 { -3.0e7 } else { 12.5 };
            }
        }
        for spec in all_specs(mode) {
            let a = run_routing(&be, &case, spec).unwrap();
            let b = run_routing(&be, &other, spec).unwrap();
            assert_eq!(
                a, b,
                "routing_scores {spec:?}: non-routing rows changed the scores"
            );
        }
    }
}

#[test]
fn routing_scores_cosine_is_scale_invariant_in_queries() {
    // Cosine normalises each query token per head inside the op: scaling one routing row's head changes
    // nothing (up to rounding); scaled-dot scales linearly.
    let be = CpuBackend::new();
    let spec = RoutingSpec {
        score_mode: ScoreMode::Cosine,
        head_reduce: HeadReduce::Mean,
        query_reduce: QueryReduce::Mean,
        chunk_reduce: ChunkReduce::Mean,
    };
    let case = routing_case(150, 3, 10, ScoreMode::Cosine);
    let mut scaled = routing_case(150, 3, 10, ScoreMode::Cosine);
    let (heads, d) = (scaled.heads, scaled.d);
    for (h, factor) in [(0usize, 250.0f32), (4, 0.003)] {
        let start = (2 * heads + h) * d;
        scaled.queries[start..start + d]
            .iter_mut()
            .for_each(|v| *v *= factor);
    }
    let a = run_routing(&be, &case, spec).unwrap();
    let b = run_routing(&be, &scaled, spec).unwrap();
    assert_close(
        "routing cosine scale invariance",
        &b,
        &wide(&a),
        tol::REDUCTION,
    );
    // Cosine scores are bounded by 1 in magnitude.
    assert!(a.iter().all(|s| s.abs() <= 1.0 + 1e-6), "{a:?}");
}

#[test]
fn routing_scores_last_uses_the_last_routing_row() {
    // QueryReduce::Last with routing rows [1, 2, 4, 6]: only row 6 counts; a single routing row [6] with
    // any query reduce gives the same scores.
    let be = CpuBackend::new();
    let case = routing_case(160, 2, 6, ScoreMode::ScaledDot);
    let mut single = routing_case(160, 2, 6, ScoreMode::ScaledDot);
    single.routing_rows = vec![6];
    for head_reduce in [HeadReduce::Mean, HeadReduce::Max] {
        for chunk_reduce in [ChunkReduce::Max, ChunkReduce::Mean] {
            let last = RoutingSpec {
                score_mode: ScoreMode::ScaledDot,
                head_reduce,
                query_reduce: QueryReduce::Last,
                chunk_reduce,
            };
            let a = run_routing(&be, &case, last).unwrap();
            for query_reduce in [QueryReduce::Max, QueryReduce::Mean, QueryReduce::Last] {
                let b = run_routing(
                    &be,
                    &single,
                    RoutingSpec {
                        query_reduce,
                        ..last
                    },
                )
                .unwrap();
                assert_close("routing Last vs single row", &b, &wide(&a), tol::REDUCTION);
            }
        }
    }
}

#[test]
fn routing_scores_single_chunk_documents() {
    // Every document one chunk: chunk reduce is irrelevant and each score is that chunk's score.
    let be = CpuBackend::new();
    let mut case = routing_case(170, 3, 6, ScoreMode::ScaledDot);
    case.offsets = (0..=13).collect();
    for spec in all_specs(ScoreMode::ScaledDot) {
        let actual = run_routing(&be, &case, spec).unwrap();
        let expected = naive_routing_scores(&case, spec);
        assert_eq!(actual.len(), 13);
        assert_close(
            "routing one chunk per doc",
            &actual,
            &expected,
            tol::REDUCTION,
        );
    }
}

#[test]
fn routing_scores_bad_inputs_are_errors() {
    let be = CpuBackend::new();
    let case = routing_case(180, 2, 6, ScoreMode::ScaledDot);
    let spec = RoutingSpec {
        score_mode: ScoreMode::ScaledDot,
        head_reduce: HeadReduce::Mean,
        query_reduce: QueryReduce::Max,
        chunk_reduce: ChunkReduce::Max,
    };
    let q = upload(&be, &case.queries, &[7, 6, 6]);
    let k = key_weight(&be, &case.keys, &[13, 2, 6]);
    let bad_offsets: [&[u32]; 7] = [
        &[1, 3, 4, 9, 13], // does not start at 0
        &[0, 3, 4, 9, 12], // does not end at the chunk count
        &[0, 3, 4, 9, 14], // ends past the chunk count
        &[0, 3, 3, 9, 13], // empty document
        &[0, 4, 3, 9, 13], // decreasing
        &[0],              // no document
        &[],               // nothing
    ];
    for offsets in bad_offsets {
        expect_shape_error(
            be.routing_scores(&q, &[1, 2], &k, offsets, spec),
            "routing_scores",
        );
    }
    let offsets = [0, 3, 4, 9, 13];
    // Empty routing rows, and a routing row past the query rows.
    expect_shape_error(
        be.routing_scores(&q, &[], &k, &offsets, spec),
        "routing_scores",
    );
    expect_shape_error(
        be.routing_scores(&q, &[1, 7], &k, &offsets, spec),
        "routing_scores",
    );
    // Head dims differ; KV heads do not divide query heads; keys not rank 3.
    let k10 = key_weight(&be, &vec![0.1; 13 * 2 * 10], &[13, 2, 10]);
    expect_shape_error(
        be.routing_scores(&q, &[1], &k10, &offsets, spec),
        "routing_scores",
    );
    let k4 = key_weight(&be, &vec![0.1; 13 * 4 * 6], &[13, 4, 6]);
    expect_shape_error(
        be.routing_scores(&q, &[1], &k4, &offsets, spec),
        "routing_scores",
    );
    let k2d = key_weight(&be, &case.keys, &[13, 12]);
    expect_shape_error(
        be.routing_scores(&q, &[1], &k2d, &offsets, spec),
        "routing_scores",
    );
    // The valid call works.
    assert!(be.routing_scores(&q, &[1], &k, &offsets, spec).is_ok());
}

// ---------------------------------------------------------------------------------------------------------
// top_k
// ---------------------------------------------------------------------------------------------------------

fn top_k(be: &CpuBackend, scores: &[f32], k: usize) -> Vec<Scored> {
    let t = upload(be, scores, &[scores.len()]);
    pollster::block_on(be.top_k(&t, k)).expect("top_k")
}

#[test]
fn top_k_descending_with_ties_to_lower_index() {
    let be = CpuBackend::new();
    let scores = [
        0.5f32,
        0.9,
        0.5,
        0.9,
        -1.0,
        0.1,
        0.9,
        f32::NEG_INFINITY,
        -3.5,
    ];
    let got = top_k(&be, &scores, 5);
    let indices: Vec<u32> = got.iter().map(|s| s.index).collect();
    assert_eq!(indices, vec![1, 3, 6, 0, 2]);
    for s in &got {
        assert_eq!(s.score, scores[s.index as usize]);
    }
    assert_eq!(got, naive_top_k(&scores, 5));
    assert!(top_k(&be, &scores, 0).is_empty());
}

#[test]
fn top_k_larger_than_n_returns_all() {
    let be = CpuBackend::new();
    let scores = [0.25f32, -2.0, 7.0, 0.25, 1e-3, -1e-3, 3.0];
    let got = top_k(&be, &scores, 100);
    assert_eq!(got.len(), scores.len());
    let indices: Vec<u32> = got.iter().map(|s| s.index).collect();
    assert_eq!(indices, vec![2, 6, 0, 3, 4, 5, 1]);
    assert!(top_k(&be, &[], 3).is_empty());
}

#[test]
fn top_k_random_against_selection() {
    let be = CpuBackend::new();
    let mut r = rng(190);
    for n in [1usize, 7, 13, 101] {
        // Few distinct values: many ties.
        let scores: Vec<f32> = (0..n)
            .map(|_| r.random_range(0..5) as f32 * 0.5 - 1.0)
            .collect();
        for k in [1usize, 3, 16, n] {
            assert_eq!(
                top_k(&be, &scores, k),
                naive_top_k(&scores, k),
                "top_k n={n} k={k} scores {scores:?}"
            );
        }
    }
}

#[test]
fn top_k_rejects_non_1d() {
    let be = CpuBackend::new();
    let t = upload(&be, &[0.0; 6], &[2, 3]);
    expect_shape_error(pollster::block_on(be.top_k(&t, 2)), "top_k");
}

#[test]
fn degenerate_shapes_are_errors_not_panics() {
    let b = CpuBackend::new();
    expect_shape_error(b.upload(&[1.0], &[]), "upload");
    expect_shape_error(b.upload(&[], &[5, 0]), "upload");
    let t = b.upload(&[1.0, 2.0], &[2, 1]).unwrap();
    expect_shape_error(b.reshape(&t, &[]), "reshape");
    expect_shape_error(b.reshape(&t, &[2, 0, 1]), "reshape");
    // Zero rows are fine.
    let empty = b.upload(&[], &[0, 3]).unwrap();
    assert_eq!(
        pollster::block_on(b.read(&empty)).unwrap(),
        Vec::<f32>::new()
    );
}

#[test]
fn top_k_orders_nan_last_and_signed_zeros_by_index() {
    let b = CpuBackend::new();
    let scores = b
        .upload(&[f32::NAN, -0.0, 0.0, 1.0, f32::NAN], &[5])
        .unwrap();
    let top = pollster::block_on(b.top_k(&scores, 5)).unwrap();
    let order: Vec<u32> = top.iter().map(|s| s.index).collect();
    assert_eq!(order, [3, 1, 2, 0, 4]);
}
