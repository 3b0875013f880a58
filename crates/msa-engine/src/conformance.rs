//! The conformance suite: the checks every [`Backend`] must pass against the CPU reference
//! ([`CpuBackend`]), op by op, on odd sizes (1, 7, 63, 65, 1000 rows; head dims 16 and 128; GQA groups
//! 1, 2, 4), every stored weight dtype, and seeded random inputs.
//!
//! Each `check_*` function runs the same inputs through the backend under test and through a
//! [`CpuBackend`], compares the two results within [`Tolerances`] (or bit for bit, for data movement
//! and selection), and panics naming the op, the shape and the deviation on a mismatch. [`check_all`]
//! runs every check.
//!
//! Compiled only with the `conformance` feature. A backend crate enables it for its tests and calls
//! one check per `#[test]`, so a failure names the op:
//!
//! ```toml
//! [dev-dependencies]
//! msa-engine = { workspace = true, features = ["conformance"] }
//! ```
//!
//! ```no_run
//! use msa_engine::CpuBackend;
//! use msa_engine::conformance::{self, Tolerances};
//!
//! // In a backend crate's tests, `CpuBackend::new()` is that crate's backend (skipping the test when no
//! // device is present).
//! let backend = CpuBackend::new();
//! conformance::check_matmul(&backend, &Tolerances::EXACT_F32);
//! ```

use half::{bf16, f16};
use msa_core::{ChunkReduce, DType, HeadReduce, QueryReduce, ScoreMode, TensorView};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::cpu::{CpuTensor, CpuWeight};
use crate::{AttentionMask, Backend, CpuBackend, Result, RoutingSpec, Scored};

/// How far a backend's results may stray from the CPU reference's. Each tolerance is relative to the
/// magnitude of the values compared: the largest absolute deviation must not exceed the tolerance times
/// max(1, the largest |reference value|) (see [`assert_close`]).
///
/// Data movement (embedding, `gather_rows`, `rows`, `concat_rows`) and selection (`top_k`) are checked
/// bit for bit whatever the tolerances; `rope`, an elementwise rotation by the same table, is held to a
/// twentieth of `f32_math`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Tolerances {
    /// f32 arithmetic in another order (sums, dot products, softmax, norms, pooling, routing scores):
    /// every check not named below.
    pub f32_math: f32,
    /// Matmul-like ops (`matmul`, `norm_matmul`, `matmul_add`, `norm_swiglu`) whose weight is bf16 or f16
    /// and whose input has more than 8 rows: a backend may round the activations to the weight's dtype
    /// there to use tensor cores. Every other projection uses `f32_math`.
    pub reduced_precision_gemm: f32,
    /// Routing scores against bf16 or f16 keys: a backend may carry the routing query in reduced
    /// precision there to use tensor cores (the keys are exact in their dtype either way).
    pub half_key_routing: f32,
}

impl Tolerances {
    /// f32 arithmetic throughout, as the wgpu backend does.
    pub const EXACT_F32: Tolerances = Tolerances {
        f32_math: 2e-5,
        reduced_precision_gemm: 2e-5,
        half_key_routing: 2e-5,
    };

    /// The tolerance of a matmul-like op with a `weight` of that dtype on an input of `rows` rows:
    /// `reduced_precision_gemm` for a bf16 or f16 weight on more than 8 rows, else `f32_math`.
    pub fn gemm(&self, weight: DType, rows: usize) -> f32 {
        if weight != DType::F32 && rows > 8 {
            self.reduced_precision_gemm
        } else {
            self.f32_math
        }
    }

    /// The tolerance of routing scores against keys of that dtype: `half_key_routing` for bf16 or f16
    /// keys, else `f32_math`.
    pub fn routing(&self, keys: DType) -> f32 {
        if keys == DType::F32 {
            self.f32_math
        } else {
            self.half_key_routing
        }
    }

    fn rope(&self) -> f32 {
        self.f32_math / 20.0
    }
}

/// Every stored weight dtype.
pub const DTYPES: [DType; 3] = [DType::F32, DType::BF16, DType::F16];

/// `n` values drawn uniformly from [-1, 1).
pub fn random(rng: &mut StdRng, n: usize) -> Vec<f32> {
    (0..n).map(|_| rng.random_range(-1.0..1.0)).collect()
}

/// Panics unless `actual` matches `reference`: the largest |a - b| must not exceed `tol` × max(1, largest
/// |reference|), and NaNs must sit at the same elements. A tolerance of 0 means bit-identical.
pub fn assert_close(what: &str, actual: &[f32], reference: &[f32], tol: f32) {
    assert_eq!(actual.len(), reference.len(), "{what}: lengths");
    if tol == 0.0 {
        if let Some(i) = (0..actual.len()).find(|&i| actual[i].to_bits() != reference[i].to_bits())
        {
            panic!(
                "{what}: element {i} is {:e}, the reference {:e}",
                actual[i], reference[i]
            );
        }
        return;
    }
    if let Some(i) = (0..actual.len()).find(|&i| actual[i].is_nan() != reference[i].is_nan()) {
        panic!(
            "{what}: element {i} is {}, the reference {}",
            actual[i], reference[i]
        );
    }
    let scale = reference.iter().fold(1.0f32, |m, v| m.max(v.abs()));
    let worst = actual
        .iter()
        .zip(reference)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, f32::max);
    assert!(
        worst <= tol * scale,
        "{what}: max deviation {worst:e} exceeds {tol:e} × {scale}"
    );
}

/// Weight bytes of `values` stored as `dtype` (rounded to the dtype).
pub fn weight_bytes(values: &[f32], dtype: DType) -> Vec<u8> {
    match dtype {
        DType::F32 => bytemuck::cast_slice(values).to_vec(),
        DType::BF16 => values
            .iter()
            .flat_map(|&v| bf16::from_f32(v).to_le_bytes())
            .collect(),
        DType::F16 => values
            .iter()
            .flat_map(|&v| f16::from_f32(v).to_le_bytes())
            .collect(),
    }
}

/// `values` stored as a `dtype` weight of `shape` on `backend` and on `cpu`.
pub fn weights_of<B: Backend>(
    backend: &B,
    cpu: &CpuBackend,
    values: &[f32],
    shape: &[usize],
    dtype: DType,
) -> (B::Weight, CpuWeight) {
    let bytes = weight_bytes(values, dtype);
    let view = TensorView {
        name: "weight",
        dtype,
        shape,
        bytes: &bytes,
    };
    (
        backend.upload_weight(view).unwrap(),
        cpu.upload_weight(view).unwrap(),
    )
}

/// A random weight of `shape` stored as `dtype` on `backend` and on `cpu`.
pub fn weight_pair<B: Backend>(
    backend: &B,
    cpu: &CpuBackend,
    rng: &mut StdRng,
    shape: &[usize],
    dtype: DType,
) -> (B::Weight, CpuWeight) {
    weights_of(
        backend,
        cpu,
        &random(rng, shape.iter().product()),
        shape,
        dtype,
    )
}

/// Routing keys `values` of `shape` as a weight on `backend` and on `cpu`: f32 through
/// `tensor_to_weight` (the path the memory takes), bf16 and f16 uploaded as stored weights.
pub fn key_weights<B: Backend>(
    backend: &B,
    cpu: &CpuBackend,
    values: &[f32],
    shape: &[usize],
    dtype: DType,
) -> (B::Weight, CpuWeight) {
    if dtype == DType::F32 {
        return (
            backend
                .tensor_to_weight(&backend.upload(values, shape).unwrap())
                .unwrap(),
            cpu.tensor_to_weight(&cpu.upload(values, shape).unwrap())
                .unwrap(),
        );
    }
    weights_of(backend, cpu, values, shape, dtype)
}

/// Chunk offsets of `documents` documents of 1 to `max_chunks` chunks each, starting at 0.
pub fn random_offsets(rng: &mut StdRng, documents: usize, max_chunks: u32) -> Vec<u32> {
    let mut offsets = vec![0u32];
    for _ in 0..documents {
        let last = *offsets.last().unwrap();
        offsets.push(last + rng.random_range(1..=max_chunks));
    }
    offsets
}

/// The error of `result`, as text; panics when it succeeded.
fn refused<T>(what: &str, result: Result<T>) -> String {
    match result {
        Ok(_) => panic!("{what}: expected an error, the op succeeded"),
        Err(e) => e.to_string(),
    }
}

/// The backend under test and the reference.
struct Pair<'a, B> {
    backend: &'a B,
    cpu: CpuBackend,
}

impl<'a, B: Backend> Pair<'a, B> {
    fn new(backend: &'a B) -> Self {
        Pair {
            backend,
            cpu: CpuBackend::new(),
        }
    }

    fn tensors(&self, data: &[f32], shape: &[usize]) -> (B::Tensor, CpuTensor) {
        (
            self.backend.upload(data, shape).unwrap(),
            self.cpu.upload(data, shape).unwrap(),
        )
    }

    fn read(&self, tensor: &B::Tensor) -> Vec<f32> {
        pollster::block_on(self.backend.read(tensor)).unwrap()
    }

    fn read_cpu(&self, tensor: &CpuTensor) -> Vec<f32> {
        pollster::block_on(self.cpu.read(tensor)).unwrap()
    }

    fn compare(&self, what: &str, actual: &B::Tensor, reference: &CpuTensor, tol: f32) {
        assert_eq!(
            self.backend.shape(actual),
            self.cpu.shape(reference),
            "{what}: shapes"
        );
        assert_close(what, &self.read(actual), &self.read_cpu(reference), tol);
    }
}

/// Every check below, in order.
pub fn check_all<B: Backend>(backend: &B, tol: &Tolerances) {
    check_embedding_and_gather_rows(backend, tol);
    check_weights_from_pieces(backend, tol);
    check_matmul(backend, tol);
    check_fused_ops(backend, tol);
    check_norms(backend, tol);
    check_rope(backend, tol);
    check_attention(backend, tol);
    check_elementwise_rows_and_pooling(backend, tol);
    check_append_rows(backend, tol);
    check_routing_scores(backend, tol);
    check_top_k(backend, tol);
    check_broadcast(backend, tol);
    check_malformed_inputs(backend, tol);
}

/// A writer handing `bytes` over in uneven pieces, as a document's rows arrive from a bank's segments.
fn uneven_pieces<'p>(bytes: &'p [u8]) -> impl FnMut(&mut dyn FnMut(&'p [u8])) + 'p {
    move |sink| bytes.chunks(1237).for_each(sink)
}

/// `upload_weight_from` (how fetched memory pages arrive, in pieces of any size) holds what
/// `upload_weight` of the same bytes holds, read back through `embedding`, for every dtype: small
/// weights and ones past 1 MiB, and other values uploaded right after, while other work that
/// allocates and frees is still queued (a GPU backend may gather into pinned memory and copy on a
/// stream of its own: the second gather must not overwrite what the first copy has yet to read).
/// Pieces that fall short of the weight's size, or run past it, are refused as the reference refuses
/// them.
pub fn check_weights_from_pieces<B: Backend>(backend: &B, _tol: &Tolerances) {
    let p = Pair::new(backend);
    let mut rng = StdRng::seed_from_u64(13);
    for dtype in DTYPES {
        for (rows, width) in [(3, 5), (4100, 130)] {
            let values = random(&mut rng, rows * width);
            let bytes = weight_bytes(&values, dtype);
            let shape = [rows, width];
            let mut pieces = uneven_pieces(&bytes);
            let b = p
                .backend
                .upload_weight_from("pieces", dtype, &shape, &mut pieces)
                .unwrap();
            // Other values next, behind work that allocates and frees as it goes.
            let busy = busy_work(p.backend);
            let next_values = random(&mut rng, rows * width);
            let next_bytes = weight_bytes(&next_values, dtype);
            let behind = p
                .backend
                .upload_weight_from("pieces", dtype, &shape, &mut uneven_pieces(&next_bytes))
                .unwrap();
            let ids: Vec<u32> = (0..rows as u32).collect();
            for (weight, values, when) in [
                (&b, &values, "first"),
                (&behind, &next_values, "next, behind other work"),
            ] {
                let (_, c) = weights_of(p.backend, &p.cpu, values, &shape, dtype);
                p.compare(
                    &format!("upload_weight_from {dtype} {rows}x{width}, {when}"),
                    &p.backend.embedding(weight, &ids).unwrap(),
                    &p.cpu.embedding(&c, &ids).unwrap(),
                    0.0,
                );
            }
            check_busy_work(&p, &busy);
            // Two bytes short, and two past the end in the same uneven pieces (one straddles it).
            let mut long = bytes.clone();
            long.extend([0, 0]);
            for wrong in [&bytes[..bytes.len() - 2], &long[..]] {
                let len = wrong.len();
                let mut short_or_long = uneven_pieces(wrong);
                let be = refused(
                    "pieces of the wrong size",
                    p.backend
                        .upload_weight_from("pieces", dtype, &shape, &mut short_or_long),
                );
                let ce = refused(
                    "the reference's pieces of the wrong size",
                    p.cpu
                        .upload_weight_from("pieces", dtype, &shape, &mut short_or_long),
                );
                assert_eq!(be, ce);
                assert!(be.contains(&format!("{len} bytes for shape")), "{be}");
            }
        }
    }
}

/// `embedding` of every dtype (with subnormals, extremes, signed zero and infinities) and `gather_rows`,
/// bit for bit; an id past the vocabulary is refused.
pub fn check_embedding_and_gather_rows<B: Backend>(backend: &B, _tol: &Tolerances) {
    let p = Pair::new(backend);
    let mut rng = StdRng::seed_from_u64(1);
    for dtype in DTYPES {
        for (vocab, hidden) in [(1, 1), (7, 7), (65, 63), (300, 130)] {
            let mut values = random(&mut rng, vocab * hidden);
            // Subnormals, extremes, signed zero and infinities of every dtype widen exactly too.
            let specials = [
                1e-6,
                -3e-7,
                6e-8,
                65504.0,
                -0.0,
                1e30,
                f32::INFINITY,
                -1e-40,
            ];
            values.iter_mut().zip(specials).for_each(|(v, s)| *v = s);
            let shape = [vocab, hidden];
            let (bw, cw) = weights_of(p.backend, &p.cpu, &values, &shape, dtype);
            let ids: Vec<u32> = (0..vocab.min(9) * 3)
                .map(|i| {
                    if i == 0 {
                        0
                    } else {
                        rng.random_range(0..vocab as u32)
                    }
                })
                .collect();
            let what = format!("embedding {dtype} {vocab}x{hidden}");
            // Widening is exact: no tolerance.
            p.compare(
                &what,
                &p.backend.embedding(&bw, &ids).unwrap(),
                &p.cpu.embedding(&cw, &ids).unwrap(),
                0.0,
            );
            let (bt, ct) = p.tensors(&values, &shape);
            p.compare(
                &format!("gather_rows {vocab}x{hidden}"),
                &p.backend.gather_rows(&bt, &ids).unwrap(),
                &p.cpu.gather_rows(&ct, &ids).unwrap(),
                0.0,
            );
            let err = refused(
                &format!("{what} of id {vocab}"),
                p.backend.embedding(&bw, &[vocab as u32]),
            );
            assert!(err.contains("outside the vocabulary"), "{err}");
        }
    }
}

/// `matmul` for every weight dtype on odd sizes, including one inner element and no rows.
pub fn check_matmul<B: Backend>(backend: &B, tol: &Tolerances) {
    let p = Pair::new(backend);
    let mut rng = StdRng::seed_from_u64(2);
    for dtype in DTYPES {
        // (3, 520, 5): a decode-sized batch whose rows span several 16-byte vectors per lane, with a
        // remainder, for kernels that load weights in vectors.
        for (n, inner, out) in [
            (1, 16, 7),
            (7, 63, 65),
            (3, 520, 5),
            (65, 130, 9),
            (63, 1, 3),
            (0, 8, 4),
            // Several blocks of 32 rows and columns (with remainders) over an inner dimension of
            // whole 32-element steps, for kernels that tile the GEMM.
            (37, 96, 45),
            (70, 256, 33),
        ] {
            let (bw, cw) = weight_pair(p.backend, &p.cpu, &mut rng, &[out, inner], dtype);
            let x = random(&mut rng, n * inner);
            let (bx, cx) = p.tensors(&x, &[n, inner]);
            p.compare(
                &format!("matmul {dtype} {n}x{inner}x{out}"),
                &p.backend.matmul(&bx, &bw).unwrap(),
                &p.cpu.matmul(&cx, &cw).unwrap(),
                tol.gemm(dtype, n),
            );
        }
    }
}

/// The fused ops against the CPU reference's unfused ops: [`check_fused_projections`], then per-head
/// RMSNorm + RoPE (`norm_rope`) at document-local and large global positions, odd head counts.
pub fn check_fused_ops<B: Backend>(backend: &B, tol: &Tolerances) {
    let p = Pair::new(backend);
    let mut rng = StdRng::seed_from_u64(12);
    fused_projections(&p, &mut rng, tol);
    for dtype in DTYPES {
        for (n, heads, d) in [(1, 3, 16), (5, 4, 130), (2, 1, 2)] {
            let x = random(&mut rng, n * heads * d);
            let (bx, cx) = p.tensors(&x, &[n, heads, d]);
            let (bn, cn) = weight_pair(p.backend, &p.cpu, &mut rng, &[d], dtype);
            let positions: Vec<u32> = (0..n as u32).map(|i| i * 997 + 3).collect();
            let b = p
                .backend
                .norm_rope(&bx, &bn, 1e-6, &positions, 1e6)
                .unwrap();
            let c = p
                .cpu
                .rope(&p.cpu.rms_norm(&cx, &cn, 1e-6).unwrap(), &positions, 1e6)
                .unwrap();
            p.compare(
                &format!("norm_rope {dtype} {n}x{heads}x{d}"),
                &b,
                &c,
                tol.f32_math,
            );
        }
    }
}

/// The fused projections against the CPU reference's unfused ops: `matmul_add` (matmul + residual add),
/// `norm_matmul` (RMSNorm + matmul) and `norm_swiglu` (RMSNorm + gate/up + SwiGLU), every weight dtype,
/// small activations (at most 1,200 bytes a tensor, so they also run on a device with small bindings).
pub fn check_fused_projections<B: Backend>(backend: &B, tol: &Tolerances) {
    let p = Pair::new(backend);
    let mut rng = StdRng::seed_from_u64(12);
    fused_projections(&p, &mut rng, tol);
}

fn fused_projections<B: Backend>(p: &Pair<'_, B>, rng: &mut StdRng, tol: &Tolerances) {
    for dtype in DTYPES {
        for (n, inner, out) in [
            (1, 45, 37),
            (3, 64, 33),
            (6, 1, 5),
            (1, 300, 129),
            (16, 64, 40),
        ] {
            let tol = tol.gemm(dtype, n);
            let x = random(rng, n * inner);
            let (bx, cx) = p.tensors(&x, &[n, inner]);
            let what = format!("{dtype} {n}x{inner}x{out}");
            let residual = random(rng, n * out);
            let (br, cr) = p.tensors(&residual, &[n, out]);
            let (bw, cw) = weight_pair(p.backend, &p.cpu, rng, &[out, inner], dtype);
            let b = p.backend.matmul_add(&bx, &bw, &br).unwrap();
            let c = p.cpu.add(&cr, &p.cpu.matmul(&cx, &cw).unwrap()).unwrap();
            p.compare(&format!("matmul_add {what}"), &b, &c, tol);
            norm_projections(p, rng, dtype, (&bx, &cx), out, tol, &what);
        }
        // Heads flattened into the projection ([n, heads, d] against a [out, heads·d] weight): the
        // norm is per head, not over the projection's whole row.
        let (n, heads, d) = (2, 3, 8);
        let x = random(rng, n * heads * d);
        let (bx, cx) = p.tensors(&x, &[n, heads, d]);
        let what = format!("{dtype} {n}x{heads}x{d} per head");
        norm_projections(p, rng, dtype, (&bx, &cx), 5, tol.gemm(dtype, n), &what);
    }
}

/// `norm_matmul` and `norm_swiglu` of `x` (normed over its last dimension, projected over all but
/// its first) to `out` features, against the reference's unfused ops.
fn norm_projections<B: Backend>(
    p: &Pair<'_, B>,
    rng: &mut StdRng,
    dtype: DType,
    (bx, cx): (&B::Tensor, &CpuTensor),
    out: usize,
    tol: f32,
    what: &str,
) {
    let shape = p.backend.shape(bx);
    let (width, inner) = (shape[shape.len() - 1], shape[1..].iter().product());
    let (bn, cn) = weight_pair(p.backend, &p.cpu, rng, &[width], dtype);
    let (bw, cw) = weight_pair(p.backend, &p.cpu, rng, &[out, inner], dtype);
    let (bu, cu) = weight_pair(p.backend, &p.cpu, rng, &[out, inner], dtype);
    let normed = p.cpu.rms_norm(cx, &cn, 1e-6).unwrap();
    let b = p.backend.norm_matmul(bx, &bn, 1e-6, &bw).unwrap();
    let c = p.cpu.matmul(&normed, &cw).unwrap();
    p.compare(&format!("norm_matmul {what}"), &b, &c, tol);
    let b = p.backend.norm_swiglu(bx, &bn, 1e-6, &bw, &bu).unwrap();
    let c = p
        .cpu
        .silu_mul(
            &p.cpu.matmul(&normed, &cw).unwrap(),
            &p.cpu.matmul(&normed, &cu).unwrap(),
        )
        .unwrap();
    p.compare(&format!("norm_swiglu {what}"), &b, &c, tol);
}

/// `rms_norm` per head (`[rows, 1, width]`, like q_norm / k_norm) with every weight dtype, and
/// `l2_normalize`.
pub fn check_norms<B: Backend>(backend: &B, tol: &Tolerances) {
    let p = Pair::new(backend);
    let mut rng = StdRng::seed_from_u64(3);
    for dtype in DTYPES {
        for (rows, width) in [(1, 64), (7, 16), (1000, 16), (65, 130), (3, 1)] {
            let (bw, cw) = weight_pair(p.backend, &p.cpu, &mut rng, &[width], dtype);
            let x = random(&mut rng, rows * width);
            // Per head: [rows, heads, head_dim] normalised over head_dim, like q_norm / k_norm.
            let (bx, cx) = p.tensors(&x, &[rows, 1, width]);
            p.compare(
                &format!("rms_norm {dtype} {rows}x{width}"),
                &p.backend.rms_norm(&bx, &bw, 1e-6).unwrap(),
                &p.cpu.rms_norm(&cx, &cw, 1e-6).unwrap(),
                tol.f32_math,
            );
            p.compare(
                &format!("l2_normalize {rows}x{width}"),
                &p.backend.l2_normalize(&bx).unwrap(),
                &p.cpu.l2_normalize(&cx).unwrap(),
                tol.f32_math,
            );
        }
    }
}

/// `rope` at document-local and large global positions, head dims 16 and 128.
pub fn check_rope<B: Backend>(backend: &B, tol: &Tolerances) {
    let p = Pair::new(backend);
    let mut rng = StdRng::seed_from_u64(4);
    for (n, heads, d) in [(1, 1, 16), (7, 3, 16), (63, 2, 128), (65, 4, 128)] {
        let x = random(&mut rng, n * heads * d);
        let (bx, cx) = p.tensors(&x, &[n, heads, d]);
        let local: Vec<u32> = (0..n as u32).map(|i| i % 17).collect();
        let global: Vec<u32> = (0..n).map(|_| rng.random_range(0..100_000)).collect();
        for positions in [local, global] {
            p.compare(
                &format!("rope {n}x{heads}x{d}"),
                &p.backend.rope(&bx, &positions, 1e6).unwrap(),
                &p.cpu.rope(&cx, &positions, 1e6).unwrap(),
                tol.rope(),
            );
        }
    }
}

/// `attention` with causal, full and packed masks: prefill, a KV prefix and long decodes, GQA groups 1
/// (MHA), 2, 4, 6 and 8, head dims 6, 16, 18, 20, 40, 72, 128 and 256.
pub fn check_attention<B: Backend>(backend: &B, tol: &Tolerances) {
    let p = Pair::new(backend);
    let mut rng = StdRng::seed_from_u64(5);
    // (queries, keys, heads, kv_heads, head_dim): groups 1, 2, 4; one key; a KV prefix; long decode.
    let cases = [
        (1, 1, 2, 2, 16),
        (7, 7, 4, 2, 16),
        (70, 70, 4, 2, 16),
        (7, 70, 4, 1, 16),
        (63, 65, 2, 2, 128),
        (65, 1000, 4, 1, 16),
        (1, 1000, 4, 2, 128),
        (1, 4099, 8, 2, 16),
        // Several query rows over a long KV (where a backend splits the keys): early rows' last keys are
        // all masked.
        (3, 1000, 4, 2, 16),
        // The largest head dim.
        (2, 513, 8, 8, 256),
        // Groups 8 and 6 (a backend may take part of a group per workgroup), odd head dims.
        (5, 300, 16, 2, 40),
        (3, 200, 6, 1, 72),
        // An odd count of 4-element words (a backend may hold two per thread), head dims that are
        // no multiple of 4 (rows off 16-byte words), a head dim under 8.
        (4, 150, 4, 1, 20),
        (2, 333, 4, 1, 18),
        (3, 90, 4, 1, 6),
    ];
    for (nq, nk, heads, kv_heads, d) in cases {
        let q = random(&mut rng, nq * heads * d);
        let k = random(&mut rng, nk * kv_heads * d);
        let v = random(&mut rng, nk * kv_heads * d);
        let (bq, cq) = p.tensors(&q, &[nq, heads, d]);
        let (bk, ck) = p.tensors(&k, &[nk, kv_heads, d]);
        let (bv, cv) = p.tensors(&v, &[nk, kv_heads, d]);
        // Packed: sequences of uneven lengths, the last one running to the end.
        let starts: Vec<u32> = (0..nq as u32)
            .step_by(5)
            .chain([2, 3])
            .filter(|&s| (s as usize) < nq)
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .collect();
        let packed = (nq == nk).then_some(AttentionMask::Packed(&starts));
        for mask in [AttentionMask::Causal, AttentionMask::Full]
            .into_iter()
            .chain(packed)
        {
            p.compare(
                &format!("attention {mask:?} q{nq} k{nk} h{heads}/{kv_heads} d{d}"),
                &p.backend.attention(&bq, &bk, &bv, mask).unwrap(),
                &p.cpu.attention(&cq, &ck, &cv, mask).unwrap(),
                tol.f32_math,
            );
        }
    }
}

/// `add`, `silu_mul`, `concat_rows` and `rows` (bit for bit), and `chunk_mean_pool` with chunks of 1,
/// 16 and 64.
pub fn check_elementwise_rows_and_pooling<B: Backend>(backend: &B, tol: &Tolerances) {
    let p = Pair::new(backend);
    let mut rng = StdRng::seed_from_u64(6);
    for (rows, width) in [(1, 1), (7, 3), (63, 32), (1000, 32)] {
        let a = random(&mut rng, rows * width);
        let b = random(&mut rng, rows * width);
        let (ba, ca) = p.tensors(&a, &[rows, width]);
        let (bb, cb) = p.tensors(&b, &[rows, width]);
        p.compare(
            &format!("add {rows}x{width}"),
            &p.backend.add(&ba, &bb).unwrap(),
            &p.cpu.add(&ca, &cb).unwrap(),
            tol.f32_math,
        );
        p.compare(
            &format!("silu_mul {rows}x{width}"),
            &p.backend.silu_mul(&ba, &bb).unwrap(),
            &p.cpu.silu_mul(&ca, &cb).unwrap(),
            tol.f32_math,
        );
        p.compare(
            &format!("concat_rows {rows}x{width}"),
            &p.backend.concat_rows(&[&ba, &bb, &ba]).unwrap(),
            &p.cpu.concat_rows(&[&ca, &cb, &ca]).unwrap(),
            0.0,
        );
        let range = rows / 3..rows;
        p.compare(
            &format!("rows {range:?} of {rows}x{width}"),
            &p.backend.rows(&ba, range.clone()).unwrap(),
            &p.cpu.rows(&ca, range).unwrap(),
            0.0,
        );
        for chunk in [1, 16, 64] {
            p.compare(
                &format!("chunk_mean_pool {rows}/{chunk}"),
                &p.backend.chunk_mean_pool(&ba, chunk).unwrap(),
                &p.cpu.chunk_mean_pool(&ca, chunk).unwrap(),
                tol.f32_math,
            );
        }
    }
}

/// `append_rows` (bit for bit against `concat_rows` on the CPU) as a decoding context grows: into a
/// tensor shared with another view (which must stay as it was), twice from one base (two sessions
/// from one template), a row at a time past the spare rows a backend leaves, several parts at once
/// with an empty one, and from a clone of a grown context once the original has moved on; then
/// attention over a grown context, whose storage may be longer than its rows. A part that does not
/// stack is refused.
pub fn check_append_rows<B: Backend>(backend: &B, tol: &Tolerances) {
    let p = Pair::new(backend);
    let mut rng = StdRng::seed_from_u64(11);
    let (kv_heads, d) = (2, 16);
    let width = kv_heads * d;
    let mut rows_of = |n: usize| {
        let data = random(&mut rng, n * width);
        p.tensors(&data, &[n, kv_heads, d])
    };
    let (base, base_cpu) = rows_of(7);
    let (empty, empty_cpu) = rows_of(0);
    // A base with spare rows, which two appends onto its clones must not both take.
    let base = p.backend.append_rows(base, &[&empty]).unwrap();
    let (first, first_cpu) = rows_of(3);
    let (second, second_cpu) = rows_of(1);
    let grown = p.backend.append_rows(base.clone(), &[&first]).unwrap();
    let forked = p.backend.append_rows(base.clone(), &[&second]).unwrap();
    p.compare("append_rows: the shared base", &base, &base_cpu, 0.0);
    let mut reference = p.cpu.concat_rows(&[&base_cpu, &first_cpu]).unwrap();
    p.compare("append_rows onto a shared base", &grown, &reference, 0.0);
    let forked_cpu = p.cpu.concat_rows(&[&base_cpu, &second_cpu]).unwrap();
    p.compare(
        "append_rows: a second append onto that base",
        &forked,
        &forked_cpu,
        0.0,
    );

    // Decoding: a row at a time, past the spare rows of any allocation so far.
    let mut context = grown;
    for _ in 0..crate::shapes::SPARE_ROWS + 9 {
        let (row, row_cpu) = rows_of(1);
        context = p.backend.append_rows(context, &[&row]).unwrap();
        reference = p.cpu.concat_rows(&[&reference, &row_cpu]).unwrap();
    }
    p.compare("append_rows a row at a time", &context, &reference, 0.0);

    let (block, block_cpu) = rows_of(5);
    let kept = context.clone();
    let kept_cpu = reference.clone();
    let context = p.backend.append_rows(context, &[&empty, &block]).unwrap();
    reference = p
        .cpu
        .concat_rows(&[&reference, &empty_cpu, &block_cpu])
        .unwrap();
    p.compare(
        "append_rows of an empty part and a block",
        &context,
        &reference,
        0.0,
    );
    // The clone kept from before that append is the only holder of its storage now.
    let (other, other_cpu) = rows_of(2);
    let from_kept = p.backend.append_rows(kept, &[&other]).unwrap();
    let from_kept_cpu = p.cpu.concat_rows(&[&kept_cpu, &other_cpu]).unwrap();
    p.compare(
        "append_rows onto a kept clone",
        &from_kept,
        &from_kept_cpu,
        0.0,
    );
    p.compare(
        "append_rows: the context after that",
        &context,
        &reference,
        0.0,
    );

    let (heads, nk) = (4, p.cpu.shape(&reference)[0]);
    let q = random(&mut rng, 2 * heads * d);
    let (bq, cq) = p.tensors(&q, &[2, heads, d]);
    p.compare(
        &format!("attention over a grown context of {nk} rows"),
        &(p.backend)
            .attention(&bq, &context, &context, AttentionMask::Causal)
            .unwrap(),
        &p.cpu
            .attention(&cq, &reference, &reference, AttentionMask::Causal)
            .unwrap(),
        tol.f32_math,
    );

    let wide = p.backend.upload(&[0.0; 2 * 33], &[2, 33]).unwrap();
    let message = refused(
        "append_rows of rows of another width",
        p.backend.append_rows(context, &[&wide]),
    );
    assert!(
        message.contains("append_rows") && message.contains("does not stack"),
        "append_rows: {message}"
    );
}

/// What [`Backend::append_rows`] copies, by the backend's own count of the bytes it copied between
/// device buffers (`copied_bytes`): a shared context is copied once with the new rows, into storage
/// with exactly the room the trait asks for ([`crate::shapes::grown_rows`]); a context held alone
/// takes rows into that room with nothing but the new rows copied; a full one is copied once more.
/// (Rows of 24 bytes: no backend pads them into more rows.)
pub fn check_append_copies<B: Backend>(backend: &B, copied_bytes: impl Fn() -> u64) {
    let (shape, width) = ([2, 3], 6);
    let upload = |rows: usize| {
        let data = vec![0.5; rows * width];
        backend.upload(&data, &[rows, shape[0], shape[1]]).unwrap()
    };
    let (row, base) = (upload(1), upload(5));
    let rows_bytes = |rows: usize| (rows * width * 4) as u64;
    let before = copied_bytes();
    let mut context = backend.append_rows(base.clone(), &[&row]).unwrap();
    assert_eq!(
        copied_bytes() - before,
        rows_bytes(6),
        "append_rows onto a shared context: bytes copied"
    );
    let room = crate::shapes::grown_rows(6);
    let before = copied_bytes();
    for _ in 6..room {
        context = backend.append_rows(context, &[&row]).unwrap();
    }
    assert_eq!(
        copied_bytes() - before,
        rows_bytes(room - 6),
        "append_rows of a row at a time onto a context held alone, up to its room of {room} rows: \
         bytes copied"
    );
    let before = copied_bytes();
    context = backend.append_rows(context, &[&row]).unwrap();
    assert_eq!(
        copied_bytes() - before,
        rows_bytes(room + 1),
        "append_rows onto a context with no room left: bytes copied"
    );
    let kept = context.clone();
    let before = copied_bytes();
    let forked = backend.append_rows(context, &[&row]).unwrap();
    assert_eq!(
        copied_bytes() - before,
        rows_bytes(room + 2),
        "append_rows onto a context another view holds: bytes copied"
    );
    assert_eq!(backend.shape(&kept)[0], room + 1);
    assert_eq!(backend.shape(&forked)[0], room + 2);
}

/// `routing_scores` for every score mode and head, query and chunk reduction, with keys in every stored
/// dtype (f32 through `tensor_to_weight`) and odd shapes that put packed key rows at odd elements.
pub fn check_routing_scores<B: Backend>(backend: &B, tol: &Tolerances) {
    let p = Pair::new(backend);
    let mut rng = StdRng::seed_from_u64(7);
    // Keys in every stored dtype; the odd shapes (d 7 and 33 with one KV head) put chunk and head rows
    // of packed keys at odd elements; 23,000 documents (about 69,000 chunks) with two KV heads span
    // more than 65,536 chunks, a batch size at which a backend may tile the scan; 33 routing rows
    // (of 50) pass 32, and 8 (of 12) fill 8 exactly, numbers of tokens at which a backend may tile
    // the query.
    for (dtype, (n, heads, kv_heads, d, documents)) in [
        (DType::F32, (1, 2, 2, 16, 1)),
        (DType::F32, (9, 4, 2, 16, 37)),
        (DType::F32, (5, 8, 2, 128, 300)),
        (DType::F32, (3, 3, 1, 7, 11)),
        (DType::BF16, (9, 4, 2, 16, 37)),
        (DType::BF16, (5, 8, 2, 128, 300)),
        (DType::BF16, (3, 3, 1, 7, 11)),
        (DType::BF16, (7, 6, 3, 10, 13)),
        (DType::BF16, (9, 4, 2, 16, 23_000)),
        (DType::BF16, (50, 4, 2, 16, 5)),
        (DType::F16, (12, 2, 1, 32, 9)),
        (DType::F16, (9, 4, 2, 16, 37)),
        (DType::F16, (3, 3, 1, 7, 11)),
        (DType::F16, (4, 2, 1, 33, 20)),
    ] {
        let offsets = random_offsets(&mut rng, documents, 5);
        let chunks = *offsets.last().unwrap() as usize;
        let q = random(&mut rng, n * heads * d);
        let k = random(&mut rng, chunks * kv_heads * d);
        let (bq, cq) = p.tensors(&q, &[n, heads, d]);
        let (bk, ck) = key_weights(p.backend, &p.cpu, &k, &[chunks, kv_heads, d], dtype);
        let rows: Vec<u32> = (0..n as u32).filter(|r| r % 3 != 1).collect();
        for score_mode in [ScoreMode::Cosine, ScoreMode::ScaledDot] {
            for head_reduce in [HeadReduce::Mean, HeadReduce::Max] {
                for query_reduce in [QueryReduce::Max, QueryReduce::Mean, QueryReduce::Last] {
                    for chunk_reduce in [ChunkReduce::Max, ChunkReduce::Mean] {
                        let spec = RoutingSpec {
                            score_mode,
                            head_reduce,
                            query_reduce,
                            chunk_reduce,
                        };
                        p.compare(
                            &format!(
                                "routing {dtype} keys {spec:?} n{n} h{heads}/{kv_heads} d{d} docs{documents}"
                            ),
                            &p.backend
                                .routing_scores(&bq, &rows, &bk, &offsets, spec)
                                .unwrap(),
                            &p.cpu
                                .routing_scores(&cq, &rows, &ck, &offsets, spec)
                                .unwrap(),
                            tol.routing(dtype),
                        );
                    }
                }
            }
        }
    }
}

/// `broadcast` to the backend itself, where the backend offers it (without, the caller copies through
/// the host and there is nothing to check): the copy holds, bit for bit and with its shape, a tensor
/// whose op was only just recorded, and ops recorded on the copy read it.
pub fn check_broadcast<B: Backend>(backend: &B, _tol: &Tolerances) {
    let p = Pair::new(backend);
    let mut rng = StdRng::seed_from_u64(14);
    for shape in [[1, 1], [3, 5], [37, 130]] {
        let values = random(&mut rng, shape[0] * shape[1]);
        let (b, c) = p.tensors(&values, &shape);
        let (b, c) = (backend.add(&b, &b).unwrap(), p.cpu.add(&c, &c).unwrap());
        let Some(copies) = backend.broadcast(&b, &[backend]) else {
            return;
        };
        let copies = copies.unwrap();
        assert_eq!(copies.len(), 1, "broadcast to one peer: copies");
        p.compare(&format!("broadcast {shape:?}"), &copies[0], &c, 0.0);
        let doubled = backend.add(&copies[0], &copies[0]).unwrap();
        p.compare(
            &format!("an op on a broadcast {shape:?}"),
            &doubled,
            &p.cpu.add(&c, &c).unwrap(),
            0.0,
        );
    }
}

/// `top_k` selects the same indices with bit-identical scores, with ties everywhere, NaN, infinities and
/// both zeros, for k from 1 to past n.
pub fn check_top_k<B: Backend>(backend: &B, _tol: &Tolerances) {
    let p = Pair::new(backend);
    let mut rng = StdRng::seed_from_u64(8);
    // 200 and 4,200 leave a GPU's last block fewer candidates than k.
    for n in [1usize, 7, 200, 1000, 4200, 5000, 70_000] {
        // Few distinct values, so ties are everywhere; plus NaN, infinities and both zeros.
        let mut scores: Vec<f32> = (0..n)
            .map(|_| rng.random_range(-4..4) as f32 / 2.0)
            .collect();
        for (i, special) in [f32::NAN, -0.0, 0.0, f32::INFINITY, f32::NEG_INFINITY]
            .into_iter()
            .enumerate()
        {
            if i * 3 < n {
                scores[i * 3] = special;
            }
        }
        let (bs, cs) = p.tensors(&scores, &[n]);
        // Small and large k (a GPU backend may select small k on the device and large k on the host).
        for k in [1, 3, 16, 17, 255, 256, 300, n, n + 5] {
            let b = pollster::block_on(p.backend.top_k(&bs, k)).unwrap();
            let c = pollster::block_on(p.cpu.top_k(&cs, k)).unwrap();
            let ids = |v: &[Scored]| v.iter().map(|s| s.index).collect::<Vec<_>>();
            assert_eq!(ids(&b), ids(&c), "top-{k} of {n}");
            for (a, r) in b.iter().zip(&c) {
                assert_eq!(
                    a.score.to_bits(),
                    r.score.to_bits(),
                    "top-{k} of {n}: score of {}",
                    a.index
                );
            }
        }
    }
    // Selections in flight together, as shards and a layer's projections queue them: all queued
    // before any is awaited, more work recorded behind them, one dropped unawaited and one queued
    // after that, the rest awaited last first.
    let cases: Vec<(Vec<f32>, usize)> = [
        (70_000, 16),
        (5000, 3),
        (1000, 300),
        (200, 200),
        (4200, 256),
        (9, 4),
    ]
    .into_iter()
    .map(|(n, k)| {
        let scores = (0..n).map(|_| rng.random_range(-999..999) as f32).collect();
        (scores, k)
    })
    .collect();
    let tensors: Vec<_> = cases
        .iter()
        .map(|(s, _)| p.tensors(s, &[s.len()]))
        .collect();
    let queue = |i: usize| (i, p.backend.top_k(&tensors[i].0, cases[i].1));
    let mut pending: Vec<_> = (0..cases.len() - 1).map(queue).collect();
    // Long work, with temporaries, between the last selections queued and the one queued last.
    let later = busy_work(p.backend);
    drop(pending.remove(1));
    pending.push(queue(cases.len() - 1));
    for (i, selection) in pending.into_iter().rev() {
        let b = pollster::block_on(selection).unwrap();
        let c = pollster::block_on(p.cpu.top_k(&tensors[i].1, cases[i].1)).unwrap();
        let pairs = |v: &[Scored]| v.iter().map(|s| (s.index, s.score)).collect::<Vec<_>>();
        assert_eq!(pairs(&b), pairs(&c), "selection {i} of several in flight");
    }
    check_busy_work(&p, &later);
}

/// Elements of [`busy_work`]'s tensor.
const BUSY_ELEMENTS: usize = 1 << 20;

/// Steps of [`busy_work`].
const BUSY_STEPS: usize = 48;

/// Queues a chain of adds over a tensor of [`BUSY_ELEMENTS`] (each step's input freed as it goes):
/// work a GPU is still running when the next ops are recorded. See [`check_busy_work`].
fn busy_work<B: Backend>(backend: &B) -> B::Tensor {
    let filled = |value: f32| {
        backend
            .upload(&vec![value; BUSY_ELEMENTS], &[BUSY_ELEMENTS])
            .unwrap()
    };
    let (one, mut x) = (filled(1.0), filled(0.5));
    for _ in 0..BUSY_STEPS {
        x = backend.add(&x, &one).unwrap();
    }
    x
}

/// [`busy_work`]'s result holds 0.5 + [`BUSY_STEPS`] everywhere (exact in f32).
fn check_busy_work<B: Backend>(p: &Pair<'_, B>, busy: &B::Tensor) {
    let expected = 0.5 + BUSY_STEPS as f32;
    let values = p.read(busy);
    assert_eq!(values.len(), BUSY_ELEMENTS);
    if let Some((i, v)) = values.iter().enumerate().find(|&(_, &v)| v != expected) {
        panic!("the work queued between: element {i} is {v}, not {expected}");
    }
}

/// The backend refuses the same malformed inputs as the reference, with the same message: a norm over an
/// empty last dimension, an embedding table that is not `[vocab, hidden]`.
pub fn check_malformed_inputs<B: Backend>(backend: &B, _tol: &Tolerances) {
    let p = Pair::new(backend);
    // A norm over an empty last dimension.
    let (b, c) = p.tensors(&[], &[0]);
    let (be, ce) = (
        refused("l2_normalize of [0]", p.backend.l2_normalize(&b)),
        refused(
            "the reference's l2_normalize of [0]",
            p.cpu.l2_normalize(&c),
        ),
    );
    assert_eq!(be, ce);
    assert!(be.contains("must not be empty"), "{be}");
    // An embedding table that is not [vocab, hidden].
    let (bw, cw) = weights_of(p.backend, &p.cpu, &[0.0; 4], &[4], DType::F32);
    let (be, ce) = (
        refused("embedding from a [4] table", p.backend.embedding(&bw, &[0])),
        refused(
            "the reference's embedding from a [4] table",
            p.cpu.embedding(&cw, &[0]),
        ),
    );
    assert_eq!(be, ce);
    assert!(be.contains("[vocab, hidden]"), "{be}");
}
