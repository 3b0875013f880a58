//! Every wgpu kernel against the CPU reference on odd sizes (1, 7, 63, 65, 1000 rows; head dims 16 and 128;
//! GQA groups 1, 2, 4), with explicit tolerances. Runs on whatever adapter the environment offers
//! (lavapipe in CI); with `CI` set, a missing adapter fails the test instead of skipping it.

use half::{bf16, f16};
use msa_core::{ChunkReduce, DType, HeadReduce, QueryReduce, ScoreMode, TensorView};
use msa_engine::{AttentionMask, Backend, CpuBackend, RoutingSpec};
use msa_wgpu::{DeviceOptions, WgpuBackend};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// f32 arithmetic in another order: relative to the magnitude of the values compared.
const TOL: f32 = 2e-5;

fn gpu_with(options: DeviceOptions) -> Option<WgpuBackend> {
    pollster::block_on(WgpuBackend::open_or_skip(options))
}

fn gpu() -> Option<WgpuBackend> {
    gpu_with(DeviceOptions::from_env())
}

fn random(rng: &mut StdRng, n: usize) -> Vec<f32> {
    (0..n).map(|_| rng.random_range(-1.0..1.0)).collect()
}

/// Largest |a - b| relative to max(1, largest |b|); a tolerance of 0 means bit-identical.
fn assert_close(what: &str, gpu: &[f32], cpu: &[f32], tol: f32) {
    assert_eq!(gpu.len(), cpu.len(), "{what}: lengths");
    if tol == 0.0 {
        if let Some(i) = (0..gpu.len()).find(|&i| gpu[i].to_bits() != cpu[i].to_bits()) {
            panic!(
                "{what}: element {i} is {:e}, the reference {:e}",
                gpu[i], cpu[i]
            );
        }
        return;
    }
    if let Some(i) = (0..gpu.len()).find(|&i| gpu[i].is_nan() != cpu[i].is_nan()) {
        panic!(
            "{what}: element {i} is {}, the reference {}",
            gpu[i], cpu[i]
        );
    }
    let scale = cpu.iter().fold(1.0f32, |m, v| m.max(v.abs()));
    let worst = gpu
        .iter()
        .zip(cpu)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, f32::max);
    assert!(
        worst <= tol * scale,
        "{what}: max deviation {worst:e} exceeds {tol:e} × {scale}"
    );
}

struct Pair {
    gpu: WgpuBackend,
    cpu: CpuBackend,
}

impl Pair {
    fn new() -> Option<Self> {
        gpu().map(|gpu| Pair {
            gpu,
            cpu: CpuBackend::new(),
        })
    }

    fn tensors(
        &self,
        data: &[f32],
        shape: &[usize],
    ) -> (msa_wgpu::WgpuTensor, msa_engine::CpuTensor) {
        (
            self.gpu.upload(data, shape).unwrap(),
            self.cpu.upload(data, shape).unwrap(),
        )
    }

    fn compare(&self, what: &str, g: &msa_wgpu::WgpuTensor, c: &msa_engine::CpuTensor, tol: f32) {
        assert_eq!(self.gpu.shape(g), self.cpu.shape(c), "{what}: shapes");
        let gv = pollster::block_on(self.gpu.read(g)).unwrap();
        let cv = pollster::block_on(self.cpu.read(c)).unwrap();
        assert_close(what, &gv, &cv, tol);
    }
}

/// Routing keys `values` of `shape` as a weight on both backends: f32 through `tensor_to_weight` (the path
/// the memory takes), bf16 and f16 uploaded as stored weights.
fn key_weights(
    gpu: &WgpuBackend,
    cpu: &CpuBackend,
    values: &[f32],
    shape: &[usize],
    dtype: DType,
) -> (msa_wgpu::WgpuWeight, msa_engine::cpu::CpuWeight) {
    if dtype == DType::F32 {
        return (
            gpu.tensor_to_weight(&gpu.upload(values, shape).unwrap())
                .unwrap(),
            cpu.tensor_to_weight(&cpu.upload(values, shape).unwrap())
                .unwrap(),
        );
    }
    weights_of(gpu, cpu, values, shape, dtype)
}

/// `values` stored as a `dtype` weight of `shape` on both backends.
fn weights_of(
    gpu: &WgpuBackend,
    cpu: &CpuBackend,
    values: &[f32],
    shape: &[usize],
    dtype: DType,
) -> (msa_wgpu::WgpuWeight, msa_engine::cpu::CpuWeight) {
    let bytes = weight_bytes(values, dtype);
    let view = TensorView {
        name: "weight",
        dtype,
        shape,
        bytes: &bytes,
    };
    (
        gpu.upload_weight(view).unwrap(),
        cpu.upload_weight(view).unwrap(),
    )
}

/// Weight bytes of `values` stored as `dtype` (values are rounded to the dtype first by the caller's use).
fn weight_bytes(values: &[f32], dtype: DType) -> Vec<u8> {
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

const DTYPES: [DType; 3] = [DType::F32, DType::BF16, DType::F16];

#[test]
fn embedding_and_gather_rows_match() {
    let Some(p) = Pair::new() else { return };
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
            let bytes = weight_bytes(&values, dtype);
            let shape = [vocab, hidden];
            let view = TensorView {
                name: "table",
                dtype,
                shape: &shape,
                bytes: &bytes,
            };
            let (gw, cw) = (
                p.gpu.upload_weight(view).unwrap(),
                p.cpu.upload_weight(view).unwrap(),
            );
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
                &p.gpu.embedding(&gw, &ids).unwrap(),
                &p.cpu.embedding(&cw, &ids).unwrap(),
                0.0,
            );
            let (gt, ct) = p.tensors(&values, &shape);
            p.compare(
                &format!("gather_rows {vocab}x{hidden}"),
                &p.gpu.gather_rows(&gt, &ids).unwrap(),
                &p.cpu.gather_rows(&ct, &ids).unwrap(),
                0.0,
            );
            let err = p
                .gpu
                .embedding(&gw, &[vocab as u32])
                .unwrap_err()
                .to_string();
            assert!(err.contains("outside the vocabulary"), "{err}");
        }
    }
}

#[test]
fn matmul_matches_for_every_dtype_and_odd_sizes() {
    let Some(p) = Pair::new() else { return };
    let mut rng = StdRng::seed_from_u64(2);
    for dtype in DTYPES {
        for (n, inner, out) in [(1, 16, 7), (7, 63, 65), (65, 130, 9), (63, 1, 3), (0, 8, 4)] {
            let w = random(&mut rng, out * inner);
            let bytes = weight_bytes(&w, dtype);
            let shape = [out, inner];
            let view = TensorView {
                name: "w",
                dtype,
                shape: &shape,
                bytes: &bytes,
            };
            let x = random(&mut rng, n * inner);
            let (gx, cx) = p.tensors(&x, &[n, inner]);
            let g = p
                .gpu
                .matmul(&gx, &p.gpu.upload_weight(view).unwrap())
                .unwrap();
            let c = p
                .cpu
                .matmul(&cx, &p.cpu.upload_weight(view).unwrap())
                .unwrap();
            p.compare(&format!("matmul {dtype} {n}x{inner}x{out}"), &g, &c, TOL);
        }
    }
}

/// A random weight of `shape` stored as `dtype` on both backends.
fn weight_pair(
    gpu: &WgpuBackend,
    cpu: &CpuBackend,
    rng: &mut StdRng,
    shape: &[usize],
    dtype: DType,
) -> (msa_wgpu::WgpuWeight, msa_engine::cpu::CpuWeight) {
    weights_of(gpu, cpu, &random(rng, shape.iter().product()), shape, dtype)
}

/// The fused ops (matmul + residual add; RMSNorm + matmul; RMSNorm + gate/up + SwiGLU; per-head
/// RMSNorm + RoPE) against
/// the CPU reference's unfused ops; the projections also on a device whose limits split the weights
/// into buffers and windows.
#[test]
fn fused_ops_match_the_unfused_reference() {
    let Some(p) = Pair::new() else { return };
    let small = gpu_with(DeviceOptions {
        max_binding_bytes: Some(4096),
        max_buffer_bytes: Some(8192),
        ..DeviceOptions::from_env()
    })
    .expect("the adapter opened once");
    let mut rng = StdRng::seed_from_u64(12);
    for gpu in [&p.gpu, &small] {
        for dtype in DTYPES {
            for (n, inner, out) in [(1, 45, 37), (3, 64, 33), (6, 1, 5), (1, 300, 129)] {
                let x = random(&mut rng, n * inner);
                let (gx, cx) = (
                    gpu.upload(&x, &[n, inner]).unwrap(),
                    p.cpu.upload(&x, &[n, inner]).unwrap(),
                );
                let what = format!("{dtype} {n}x{inner}x{out}");
                let residual = random(&mut rng, n * out);
                let (gr, cr) = (
                    gpu.upload(&residual, &[n, out]).unwrap(),
                    p.cpu.upload(&residual, &[n, out]).unwrap(),
                );
                let (gw, cw) = weight_pair(gpu, &p.cpu, &mut rng, &[out, inner], dtype);
                let g = pollster::block_on(gpu.read(&gpu.matmul_add(&gx, &gw, &gr).unwrap()));
                let c = p.cpu.add(&cr, &p.cpu.matmul(&cx, &cw).unwrap()).unwrap();
                let c = pollster::block_on(p.cpu.read(&c)).unwrap();
                assert_close(&format!("matmul_add {what}"), &g.unwrap(), &c, TOL);

                let (gn, cn) = weight_pair(gpu, &p.cpu, &mut rng, &[inner], dtype);
                let g = gpu.norm_matmul(&gx, &gn, 1e-6, &gw).unwrap();
                let c = p
                    .cpu
                    .matmul(&p.cpu.rms_norm(&cx, &cn, 1e-6).unwrap(), &cw)
                    .unwrap();
                assert_close(
                    &format!("norm_matmul {what}"),
                    &pollster::block_on(gpu.read(&g)).unwrap(),
                    &pollster::block_on(p.cpu.read(&c)).unwrap(),
                    TOL,
                );
                let (gu, cu) = weight_pair(gpu, &p.cpu, &mut rng, &[out, inner], dtype);
                let g = gpu.norm_swiglu(&gx, &gn, 1e-6, &gw, &gu).unwrap();
                let normed = p.cpu.rms_norm(&cx, &cn, 1e-6).unwrap();
                let c = p
                    .cpu
                    .silu_mul(
                        &p.cpu.matmul(&normed, &cw).unwrap(),
                        &p.cpu.matmul(&normed, &cu).unwrap(),
                    )
                    .unwrap();
                assert_close(
                    &format!("norm_swiglu {what}"),
                    &pollster::block_on(gpu.read(&g)).unwrap(),
                    &pollster::block_on(p.cpu.read(&c)).unwrap(),
                    TOL,
                );
            }
        }
    }
    // Per-head RMSNorm then RoPE, at document-local and large global positions, odd head counts.
    for dtype in DTYPES {
        for (n, heads, d) in [(1, 3, 16), (5, 4, 130), (2, 1, 2)] {
            let x = random(&mut rng, n * heads * d);
            let (gx, cx) = p.tensors(&x, &[n, heads, d]);
            let (gn, cn) = weight_pair(&p.gpu, &p.cpu, &mut rng, &[d], dtype);
            let positions: Vec<u32> = (0..n as u32).map(|i| i * 997 + 3).collect();
            let g = p.gpu.norm_rope(&gx, &gn, 1e-6, &positions, 1e6).unwrap();
            let c = p
                .cpu
                .rope(&p.cpu.rms_norm(&cx, &cn, 1e-6).unwrap(), &positions, 1e6)
                .unwrap();
            p.compare(&format!("norm_rope {dtype} {n}x{heads}x{d}"), &g, &c, TOL);
        }
    }
    // Each fused op is one dispatch (on the full device, where nothing is windowed).
    let x = p.gpu.upload(&random(&mut rng, 2 * 45), &[2, 45]).unwrap();
    let (gw, _) = weight_pair(&p.gpu, &p.cpu, &mut rng, &[37, 45], DType::BF16);
    let (gu, _) = weight_pair(&p.gpu, &p.cpu, &mut rng, &[37, 45], DType::BF16);
    let (gn, _) = weight_pair(&p.gpu, &p.cpu, &mut rng, &[45], DType::BF16);
    let residual = p.gpu.upload(&random(&mut rng, 2 * 37), &[2, 37]).unwrap();
    let before = p.gpu.stats();
    p.gpu.matmul_add(&x, &gw, &residual).unwrap();
    p.gpu.norm_swiglu(&x, &gn, 1e-6, &gw, &gu).unwrap();
    let heads = p
        .gpu
        .upload(&random(&mut rng, 2 * 3 * 16), &[2, 3, 16])
        .unwrap();
    let (gq, _) = weight_pair(&p.gpu, &p.cpu, &mut rng, &[16], DType::BF16);
    p.gpu.norm_rope(&heads, &gq, 1e-6, &[4, 9], 1e6).unwrap();
    p.gpu.norm_matmul(&x, &gn, 1e-6, &gw).unwrap();
    assert_eq!((p.gpu.stats() - before).dispatches, 4);
}

#[test]
fn rms_norm_per_row_and_per_head_and_l2_normalize_match() {
    let Some(p) = Pair::new() else { return };
    let mut rng = StdRng::seed_from_u64(3);
    for dtype in DTYPES {
        for (rows, width) in [(1, 64), (7, 16), (1000, 16), (65, 130), (3, 1)] {
            let w = random(&mut rng, width);
            let bytes = weight_bytes(&w, dtype);
            let shape = [width];
            let view = TensorView {
                name: "norm",
                dtype,
                shape: &shape,
                bytes: &bytes,
            };
            let x = random(&mut rng, rows * width);
            // Per head: [rows, heads, head_dim] normalised over head_dim, like q_norm / k_norm.
            let (gx, cx) = p.tensors(&x, &[rows, 1, width]);
            let g = p
                .gpu
                .rms_norm(&gx, &p.gpu.upload_weight(view).unwrap(), 1e-6)
                .unwrap();
            let c = p
                .cpu
                .rms_norm(&cx, &p.cpu.upload_weight(view).unwrap(), 1e-6)
                .unwrap();
            p.compare(&format!("rms_norm {dtype} {rows}x{width}"), &g, &c, TOL);
            p.compare(
                &format!("l2_normalize {rows}x{width}"),
                &p.gpu.l2_normalize(&gx).unwrap(),
                &p.cpu.l2_normalize(&cx).unwrap(),
                TOL,
            );
        }
    }
}

#[test]
fn rope_matches_with_document_local_and_global_positions() {
    let Some(p) = Pair::new() else { return };
    let mut rng = StdRng::seed_from_u64(4);
    for (n, heads, d) in [(1, 1, 16), (7, 3, 16), (63, 2, 128), (65, 4, 128)] {
        let x = random(&mut rng, n * heads * d);
        let (gx, cx) = p.tensors(&x, &[n, heads, d]);
        let local: Vec<u32> = (0..n as u32).map(|i| i % 17).collect();
        let global: Vec<u32> = (0..n).map(|_| rng.random_range(0..100_000)).collect();
        for positions in [local, global] {
            p.compare(
                &format!("rope {n}x{heads}x{d}"),
                &p.gpu.rope(&gx, &positions, 1e6).unwrap(),
                &p.cpu.rope(&cx, &positions, 1e6).unwrap(),
                1e-6,
            );
        }
    }
}

#[test]
fn attention_prefill_and_split_kv_decode_match() {
    let Some(p) = Pair::new() else { return };
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
        // Several splits with several query rows: early rows' last splits are fully masked.
        (3, 1000, 4, 2, 16),
        // The largest head dim: every output slot of an invocation in use.
        (2, 513, 8, 8, 256),
    ];
    for (nq, nk, heads, kv_heads, d) in cases {
        let q = random(&mut rng, nq * heads * d);
        let k = random(&mut rng, nk * kv_heads * d);
        let v = random(&mut rng, nk * kv_heads * d);
        let (gq, cq) = p.tensors(&q, &[nq, heads, d]);
        let (gk, ck) = p.tensors(&k, &[nk, kv_heads, d]);
        let (gv, cv) = p.tensors(&v, &[nk, kv_heads, d]);
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
                &p.gpu.attention(&gq, &gk, &gv, mask).unwrap(),
                &p.cpu.attention(&cq, &ck, &cv, mask).unwrap(),
                TOL,
            );
        }
    }
}

#[test]
fn elementwise_rows_and_pooling_match() {
    let Some(p) = Pair::new() else { return };
    let mut rng = StdRng::seed_from_u64(6);
    for (rows, width) in [(1, 1), (7, 3), (63, 32), (1000, 32)] {
        let a = random(&mut rng, rows * width);
        let b = random(&mut rng, rows * width);
        let (ga, ca) = p.tensors(&a, &[rows, width]);
        let (gb, cb) = p.tensors(&b, &[rows, width]);
        p.compare(
            "add",
            &p.gpu.add(&ga, &gb).unwrap(),
            &p.cpu.add(&ca, &cb).unwrap(),
            TOL,
        );
        p.compare(
            "silu_mul",
            &p.gpu.silu_mul(&ga, &gb).unwrap(),
            &p.cpu.silu_mul(&ca, &cb).unwrap(),
            TOL,
        );
        p.compare(
            "concat_rows",
            &p.gpu.concat_rows(&[&ga, &gb, &ga]).unwrap(),
            &p.cpu.concat_rows(&[&ca, &cb, &ca]).unwrap(),
            0.0,
        );
        let range = rows / 3..rows;
        p.compare(
            "rows",
            &p.gpu.rows(&ga, range.clone()).unwrap(),
            &p.cpu.rows(&ca, range).unwrap(),
            0.0,
        );
        for chunk in [1, 16, 64] {
            p.compare(
                &format!("chunk_mean_pool {rows}/{chunk}"),
                &p.gpu.chunk_mean_pool(&ga, chunk).unwrap(),
                &p.cpu.chunk_mean_pool(&ca, chunk).unwrap(),
                TOL,
            );
        }
    }
}

fn random_offsets(rng: &mut StdRng, documents: usize, max_chunks: u32) -> Vec<u32> {
    let mut offsets = vec![0u32];
    for _ in 0..documents {
        let last = *offsets.last().unwrap();
        offsets.push(last + rng.random_range(1..=max_chunks));
    }
    offsets
}

#[test]
fn routing_scores_match_for_every_reduction_and_score_mode() {
    let Some(p) = Pair::new() else { return };
    let mut rng = StdRng::seed_from_u64(7);
    // Keys in every stored dtype; the odd shapes (d 7 and 33 with one KV head) put chunk and head rows
    // of packed keys at odd elements.
    for (dtype, (n, heads, kv_heads, d, documents)) in [
        (DType::F32, (1, 2, 2, 16, 1)),
        (DType::F32, (9, 4, 2, 16, 37)),
        (DType::F32, (5, 8, 2, 128, 300)),
        (DType::F32, (3, 3, 1, 7, 11)),
        (DType::BF16, (9, 4, 2, 16, 37)),
        (DType::BF16, (5, 8, 2, 128, 300)),
        (DType::BF16, (3, 3, 1, 7, 11)),
        (DType::BF16, (7, 6, 3, 10, 13)),
        (DType::F16, (9, 4, 2, 16, 37)),
        (DType::F16, (3, 3, 1, 7, 11)),
        (DType::F16, (4, 2, 1, 33, 20)),
    ] {
        let offsets = random_offsets(&mut rng, documents, 5);
        let chunks = *offsets.last().unwrap() as usize;
        let q = random(&mut rng, n * heads * d);
        let k = random(&mut rng, chunks * kv_heads * d);
        let (gq, cq) = p.tensors(&q, &[n, heads, d]);
        let (gk, ck) = key_weights(&p.gpu, &p.cpu, &k, &[chunks, kv_heads, d], dtype);
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
                            &p.gpu
                                .routing_scores(&gq, &rows, &gk, &offsets, spec)
                                .unwrap(),
                            &p.cpu
                                .routing_scores(&cq, &rows, &ck, &offsets, spec)
                                .unwrap(),
                            TOL,
                        );
                    }
                }
            }
        }
    }
}

#[test]
fn top_k_selects_like_the_reference_with_ties_nan_and_signed_zero() {
    let Some(p) = Pair::new() else { return };
    let mut rng = StdRng::seed_from_u64(8);
    for n in [1usize, 7, 1000, 5000, 70_000] {
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
        let (gs, cs) = p.tensors(&scores, &[n]);
        // Up to 256 the selection runs on the device; 300 and n + 5 (past 256) take the host path.
        for k in [1, 3, 16, 17, 255, 256, 300, n + 5] {
            let g = pollster::block_on(p.gpu.top_k(&gs, k)).unwrap();
            let c = pollster::block_on(p.cpu.top_k(&cs, k)).unwrap();
            let ids = |v: &[msa_engine::Scored]| v.iter().map(|s| s.index).collect::<Vec<_>>();
            assert_eq!(ids(&g), ids(&c), "top-{k} of {n}");
            for (a, b) in g.iter().zip(&c) {
                assert_eq!(a.score.to_bits(), b.score.to_bits(), "score of {}", a.index);
            }
        }
    }
}

#[test]
fn tensors_larger_than_the_binding_and_buffer_limits_are_split() {
    // A 4 KiB binding cap makes every weight below span several windows; an 8 KiB buffer cap splits
    // the weights into several buffers of whole rows.
    let Some(small) = gpu_with(DeviceOptions {
        max_binding_bytes: Some(4096),
        max_buffer_bytes: Some(8192),
        ..DeviceOptions::from_env()
    }) else {
        return;
    };
    assert_eq!(small.capabilities().max_binding_bytes, 4096);
    assert_eq!(small.capabilities().max_buffer_bytes, 8192);
    let cpu = CpuBackend::new();
    let mut rng = StdRng::seed_from_u64(9);
    for dtype in DTYPES {
        let (rows, width) = (301, 45);
        let values = random(&mut rng, rows * width);
        let bytes = weight_bytes(&values, dtype);
        let shape = [rows, width];
        let view = TensorView {
            name: "big",
            dtype,
            shape: &shape,
            bytes: &bytes,
        };
        let (gw, cw) = (
            small.upload_weight(view).unwrap(),
            cpu.upload_weight(view).unwrap(),
        );
        assert!(
            gw.buffers() >= bytes.len() / 8192,
            "{dtype}: {} buffers",
            gw.buffers()
        );
        let ids: Vec<u32> = (0..20).map(|_| rng.random_range(0..rows as u32)).collect();
        let g = pollster::block_on(small.read(&small.embedding(&gw, &ids).unwrap())).unwrap();
        let c = pollster::block_on(cpu.read(&cpu.embedding(&cw, &ids).unwrap())).unwrap();
        assert_close(&format!("windowed embedding {dtype}"), &g, &c, 0.0);
        let x = random(&mut rng, 3 * width);
        let g = small
            .matmul(&small.upload(&x, &[3, width]).unwrap(), &gw)
            .unwrap();
        let c = cpu
            .matmul(&cpu.upload(&x, &[3, width]).unwrap(), &cw)
            .unwrap();
        let g = pollster::block_on(small.read(&g)).unwrap();
        let c = pollster::block_on(cpu.read(&c)).unwrap();
        assert_close(&format!("windowed matmul {dtype}"), &g, &c, TOL);
    }
    // Routing keys of ~150 chunks × 2 heads × 16 dims (19 KiB as f32) against a 4 KiB binding, in every
    // stored dtype; with one KV head of 33 dims, packed windows start at odd elements. Stored bf16/f16
    // keys (a bank's) are split into buffers too; f32 keys are a memory's own tensor, which must fit
    // one buffer, so they run with the binding cap alone.
    let windowed = gpu_with(DeviceOptions {
        max_binding_bytes: Some(4096),
        ..DeviceOptions::from_env()
    })
    .expect("the adapter opened once");
    let spec = RoutingSpec {
        score_mode: ScoreMode::ScaledDot,
        head_reduce: HeadReduce::Mean,
        query_reduce: QueryReduce::Max,
        chunk_reduce: ChunkReduce::Max,
    };
    for dtype in DTYPES {
        for (heads, kv_heads, d) in [(4, 2, 16), (2, 1, 33)] {
            let offsets = random_offsets(&mut rng, 40, 7);
            let chunks = *offsets.last().unwrap() as usize;
            let k = random(&mut rng, chunks * kv_heads * d);
            let q = random(&mut rng, 2 * heads * d);
            let gpu = if dtype == DType::F32 {
                &windowed
            } else {
                &small
            };
            let (gk, ck) = key_weights(gpu, &cpu, &k, &[chunks, kv_heads, d], dtype);
            let g = gpu
                .routing_scores(
                    &gpu.upload(&q, &[2, heads, d]).unwrap(),
                    &[0, 1],
                    &gk,
                    &offsets,
                    spec,
                )
                .unwrap();
            let c = cpu
                .routing_scores(
                    &cpu.upload(&q, &[2, heads, d]).unwrap(),
                    &[0, 1],
                    &ck,
                    &offsets,
                    spec,
                )
                .unwrap();
            assert_close(
                &format!("windowed routing {dtype} keys h{heads}/{kv_heads} d{d}"),
                &pollster::block_on(gpu.read(&g)).unwrap(),
                &pollster::block_on(cpu.read(&c)).unwrap(),
                TOL,
            );
        }
    }
    // Activations are bound whole: one larger than the cap is a clear error, not a wrong answer, and
    // the device stays usable (nothing reached wgpu's validation).
    let big = small.upload(&vec![1.0; 2048], &[2048]).unwrap();
    let err = small.add(&big, &big).unwrap_err().to_string();
    assert!(err.contains("storage binding limit"), "{err}");
    let rows = small.upload(&vec![1.0; 64], &[4, 16]).unwrap();
    let err = small.gather_rows(&rows, &[0; 80]).unwrap_err().to_string();
    assert!(err.contains("storage binding limit"), "{err}");
    let sum = small.add(&rows, &rows).unwrap();
    assert_eq!(pollster::block_on(small.read(&sum)).unwrap(), vec![2.0; 64]);
}

#[test]
fn a_weight_whose_row_cannot_be_bound_is_refused_naming_the_limit() {
    let Some(small) = gpu_with(DeviceOptions {
        max_binding_bytes: Some(4096),
        ..DeviceOptions::from_env()
    }) else {
        return;
    };
    // 2,000 f32 per row: 8,000 bytes, past a 4 KiB binding.
    let bytes = vec![0u8; 3 * 2000 * 4];
    let shape = [3, 2000];
    let err = small
        .upload_weight(TensorView {
            name: "model.embed_tokens.weight",
            dtype: DType::F32,
            shape: &shape,
            bytes: &bytes,
        })
        .unwrap_err()
        .to_string();
    for part in [
        "exceeds this device's buffer limits",
        "model.embed_tokens.weight",
        "8000 bytes",
        "maxStorageBufferBindingSize 4096",
    ] {
        assert!(err.contains(part), "{part:?} missing from: {err}");
    }
}

#[test]
fn grids_past_65535_workgroups_are_tiled() {
    let Some(gpu) = gpu() else { return };
    // 70,000 workgroups of 64 invocations.
    let n = 70_000 * 64 + 5;
    let a: Vec<f32> = (0..n).map(|i| (i % 1000) as f32).collect();
    let t = gpu.upload(&a, &[n]).unwrap();
    let sum = pollster::block_on(gpu.read(&gpu.add(&t, &t).unwrap())).unwrap();
    assert!(sum.iter().zip(&a).all(|(s, a)| *s == 2.0 * a));
}

#[test]
fn ops_record_into_one_submit_until_a_readback() {
    let Some(gpu) = gpu() else { return };
    let x = gpu.upload(&[1.0; 64], &[4, 16]).unwrap();
    let before = gpu.stats();
    let mut y = x.clone();
    for _ in 0..10 {
        y = gpu.add(&y, &x).unwrap();
    }
    let after_ops = gpu.stats() - before;
    assert_eq!((after_ops.dispatches, after_ops.submits), (10, 0));
    let values = pollster::block_on(gpu.read(&y)).unwrap();
    assert_eq!(values, vec![11.0; 64]);
    let after_read = gpu.stats() - before;
    assert_eq!((after_read.submits, after_read.readbacks), (1, 1));
}

#[test]
fn an_unknown_adapter_name_lists_the_adapters_found() {
    let Some(gpu) = gpu() else { return };
    let options = DeviceOptions {
        adapter: Some("no-such-gpu-anywhere".into()),
        ..DeviceOptions::default()
    };
    let error = match pollster::block_on(WgpuBackend::new(options)) {
        Ok(_) => panic!("matched a made-up adapter name"),
        Err(e) => e.to_string(),
    };
    assert!(error.contains("no-such-gpu-anywhere"), "{error}");
    assert!(error.contains(&gpu.adapter_info().name), "{error}");
    // Picking by part of the real name, in any case, opens that adapter.
    let part: String = gpu.adapter_info().name.chars().take(4).collect();
    let named = gpu_with(DeviceOptions {
        adapter: Some(part.to_uppercase()),
        ..DeviceOptions::default()
    })
    .expect("the named adapter opens");
    assert_eq!(named.adapter_info().name, gpu.adapter_info().name);
    // So does the first adapter by index, and an index past the last one is refused with the list.
    let first = gpu_with(DeviceOptions {
        index: Some(0),
        ..DeviceOptions::default()
    })
    .expect("adapter #0 opens");
    assert_eq!(first.adapter_info().name, gpu.adapter_info().name);
    let error = match pollster::block_on(WgpuBackend::new(DeviceOptions {
        index: Some(99),
        ..DeviceOptions::default()
    })) {
        Ok(_) => panic!("opened adapter #99"),
        Err(e) => e.to_string(),
    };
    assert!(error.contains("adapter #99"), "{error}");
    assert!(error.contains(&gpu.adapter_info().name), "{error}");
}

#[test]
fn a_tensor_past_the_largest_buffer_is_refused_before_allocation() {
    let Some(gpu) = gpu() else { return };
    // Concatenating one 1 MiB tensor with itself until the result passes the adapter's buffer limit.
    let part = gpu.upload(&vec![0.5; 1 << 18], &[1 << 18]).unwrap();
    let copies = (gpu.capabilities().max_buffer_bytes >> 20) as usize + 1;
    let err = gpu
        .concat_rows(&vec![&part; copies])
        .unwrap_err()
        .to_string();
    assert!(err.contains("exceed the largest buffer"), "{err}");
    // The device is still usable afterwards.
    assert_eq!(
        pollster::block_on(gpu.read(&gpu.add(&part, &part).unwrap())).unwrap()[0],
        1.0
    );
}

#[test]
fn both_backends_refuse_the_same_malformed_inputs() {
    let Some(p) = Pair::new() else { return };
    // A norm over an empty last dimension.
    let (g, c) = p.tensors(&[], &[0]);
    let (ge, ce) = (
        p.gpu.l2_normalize(&g).unwrap_err().to_string(),
        p.cpu.l2_normalize(&c).unwrap_err().to_string(),
    );
    assert_eq!(ge, ce);
    assert!(ge.contains("must not be empty"), "{ge}");
    // An embedding table that is not [vocab, hidden].
    let bytes = [0u8; 16];
    let view = TensorView {
        name: "flat",
        dtype: DType::F32,
        shape: &[4],
        bytes: &bytes,
    };
    let (ge, ce) = (
        p.gpu
            .embedding(&p.gpu.upload_weight(view).unwrap(), &[0])
            .unwrap_err()
            .to_string(),
        p.cpu
            .embedding(&p.cpu.upload_weight(view).unwrap(), &[0])
            .unwrap_err()
            .to_string(),
    );
    assert_eq!(ge, ce);
    assert!(ge.contains("[vocab, hidden]"), "{ge}");
}

#[test]
fn a_destroyed_device_is_reported_lost_by_every_later_op() {
    let Some(gpu) = gpu() else { return };
    let x = gpu.upload(&[1.0; 64], &[4, 16]).unwrap();
    let sum = gpu.add(&x, &x).unwrap();
    let pending = gpu.read(&sum);
    gpu.destroy();
    // Work recorded before the loss fails rather than returning garbage or hanging.
    let lost = |result: msa_engine::Result<Vec<f32>>| match result {
        Err(e @ msa_engine::Error::DeviceLost { .. }) => e.to_string(),
        other => panic!("expected DeviceLost, got {other:?}"),
    };
    let before = lost(pollster::block_on(pending));
    assert!(before.contains("device was lost"), "{before}");
    // So does every later op, with wgpu's reason (the device was destroyed).
    let after = match gpu.add(&x, &x) {
        Ok(y) => lost(pollster::block_on(gpu.read(&y))),
        Err(e) => e.to_string(),
    };
    assert!(after.contains("device was lost"), "{after}");
    assert!(after.to_lowercase().contains("destroy"), "{after}");
}
