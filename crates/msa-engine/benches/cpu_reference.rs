//! The CPU reference backend at MSA-4B shapes (hidden 2560, 32 query / 8 KV heads × 128, FFN 9728):
//! the routing scan over 1M memory tokens for one router layer, a decode-step projection against bf16
//! weights, and decode attention over a long context. These are the baselines the GPU backends are
//! compared with (DESIGN: the original scans 1M tokens in ~200 ms per router layer on a 2-core CPU).
//!
//! `cargo bench -p msa-engine --bench cpu_reference`

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use half::bf16;
use msa_core::{ChunkReduce, DType, HeadReduce, QueryReduce, ScoreMode, TensorView};
use msa_engine::{AttentionMask, Backend, CpuBackend, RoutingSpec};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const HEADS: usize = 32;
const KV_HEADS: usize = 8;
const HEAD_DIM: usize = 128;
const HIDDEN: usize = 2560;
const FFN: usize = 9728;

fn random(rng: &mut StdRng, n: usize) -> Vec<f32> {
    (0..n).map(|_| rng.random_range(-1.0f32..1.0)).collect()
}

fn random_tensor(b: &CpuBackend, rng: &mut StdRng, shape: &[usize]) -> msa_engine::CpuTensor {
    b.upload(&random(rng, shape.iter().product()), shape)
        .unwrap()
}

fn routing_scan(c: &mut Criterion) {
    let b = CpuBackend::new();
    let mut rng = StdRng::seed_from_u64(1);
    // 1M memory tokens = 15,625 chunks of 64; documents of 2 chunks; a 50-token routing query.
    let (chunks, tokens) = (15_625, 50);
    let keys = b
        .tensor_to_weight(&random_tensor(&b, &mut rng, &[chunks, KV_HEADS, HEAD_DIM]))
        .unwrap();
    let queries = random_tensor(&b, &mut rng, &[tokens, HEADS, HEAD_DIM]);
    let rows: Vec<u32> = (0..tokens as u32).collect();
    let offsets: Vec<u32> = (0..chunks as u32)
        .step_by(2)
        .chain([chunks as u32])
        .collect();
    let spec = RoutingSpec {
        score_mode: ScoreMode::ScaledDot,
        head_reduce: HeadReduce::Mean,
        query_reduce: QueryReduce::Max,
        chunk_reduce: ChunkReduce::Max,
    };
    let mut group = c.benchmark_group("routing_scan_1M_tokens");
    group.sample_size(10);
    // Bytes of routing keys read (f32 here; bf16 on the device would be half).
    group.throughput(Throughput::Bytes((chunks * KV_HEADS * HEAD_DIM * 4) as u64));
    group.bench_function("scores_and_top16", |bench| {
        bench.iter(|| {
            let scores = b
                .routing_scores(&queries, &rows, &keys, &offsets, spec)
                .unwrap();
            pollster::block_on(b.top_k(&scores, 16)).unwrap()
        })
    });
    group.finish();
}

fn decode_projection(c: &mut Criterion) {
    let b = CpuBackend::new();
    let mut rng = StdRng::seed_from_u64(2);
    let bytes: Vec<u8> = random(&mut rng, FFN * HIDDEN)
        .into_iter()
        .flat_map(|v| bf16::from_f32(v).to_le_bytes())
        .collect();
    let shape = [FFN, HIDDEN];
    let weight = b
        .upload_weight(TensorView {
            name: "mlp.gate_proj.weight",
            dtype: DType::BF16,
            shape: &shape,
            bytes: &bytes,
        })
        .unwrap();
    let x = random_tensor(&b, &mut rng, &[1, HIDDEN]);
    let mut group = c.benchmark_group("decode_projection");
    group.sample_size(20);
    group.throughput(Throughput::Bytes(bytes.len() as u64));
    group.bench_function("gate_proj_bf16_1_token", |bench| {
        bench.iter(|| b.matmul(&x, &weight).unwrap())
    });
    group.finish();
}

fn decode_attention(c: &mut Criterion) {
    let b = CpuBackend::new();
    let mut rng = StdRng::seed_from_u64(3);
    // Template + 16 documents of 2 chunks + a 60-token prompt + generated tokens ≈ 100; use 4096 as well.
    let mut group = c.benchmark_group("decode_attention");
    group.sample_size(20);
    for context in [128usize, 4096] {
        let k = random_tensor(&b, &mut rng, &[context, KV_HEADS, HEAD_DIM]);
        let v = random_tensor(&b, &mut rng, &[context, KV_HEADS, HEAD_DIM]);
        let q = random_tensor(&b, &mut rng, &[1, HEADS, HEAD_DIM]);
        group.bench_function(format!("context_{context}"), |bench| {
            bench.iter(|| b.attention(&q, &k, &v, AttentionMask::Causal).unwrap())
        });
    }
    group.finish();
}

criterion_group!(benches, routing_scan, decode_projection, decode_attention);
criterion_main!(benches);
