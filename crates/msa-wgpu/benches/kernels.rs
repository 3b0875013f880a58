//! Every wgpu kernel at MSA-4B shapes (hidden 2560, 32 query / 8 KV heads × 128, FFN 9728, vocab 151,936,
//! 1M memory tokens = 15,625 pooled chunks for one router layer), next to the adapter's roofline probes
//! (buffer copy, read kernel, f32 FMA) measured in the same run. The summary prints, per kernel: time,
//! effective GB/s (bytes the kernel must read and write) and that figure as a fraction of the read
//! kernel's bandwidth, so numbers from lavapipe, a browser or a real GPU read the same way.
//! `msa bench --kernels` gives the same kernels side by side with the CPU reference.
//!
//! `cargo bench -p msa-wgpu --bench kernels` (`WGPU_ADAPTER_NAME`, `WGPU_BACKEND` pick the adapter).
//! Each sample records `iters` ops into one submit and waits for the device, so submission cost is
//! amortised and the figure is device time.

use std::cell::RefCell;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput};
use half::bf16;
use msa_core::{ChunkReduce, DType, HeadReduce, QueryReduce, ScoreMode, TensorView};
use msa_engine::{AttentionMask, Backend, RoutingSpec};
use msa_wgpu::probe::{Probe, RooflineProbe};
use msa_wgpu::{DeviceOptions, WgpuBackend, WgpuTensor, WgpuWeight};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const HEADS: usize = 32;
const KV_HEADS: usize = 8;
const HEAD_DIM: usize = 128;
const HIDDEN: usize = 2560;
const FFN: usize = 9728;
const VOCAB: usize = 151_936;
const CHUNKS_1M: usize = 15_625;

struct Bench {
    gpu: WgpuBackend,
    rng: StdRng,
}

impl Bench {
    fn tensor(&mut self, shape: &[usize]) -> WgpuTensor {
        let data: Vec<f32> = (0..shape.iter().product())
            .map(|_| self.rng.random_range(-1.0f32..1.0))
            .collect();
        self.gpu.upload(&data, shape).unwrap()
    }

    fn bf16_weight(&mut self, shape: &[usize]) -> WgpuWeight {
        let bytes: Vec<u8> = (0..shape.iter().product::<usize>())
            .flat_map(|_| bf16::from_f32(self.rng.random_range(-0.05f32..0.05)).to_le_bytes())
            .collect();
        self.gpu
            .upload_weight(TensorView {
                name: "weight",
                dtype: DType::BF16,
                shape,
                bytes: &bytes,
            })
            .unwrap()
    }
}

/// One measured kernel: criterion id and the bytes it must move per call.
struct Measured {
    id: &'static str,
    bytes: u64,
}

/// Times `iters` calls of `op` recorded back to back, then one wait for the device.
fn device_time(gpu: &WgpuBackend, iters: u64, mut op: impl FnMut()) -> Duration {
    let start = Instant::now();
    for _ in 0..iters {
        op();
    }
    pollster::block_on(gpu.synchronize()).unwrap();
    start.elapsed()
}

fn output_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../target"))
        .join("criterion")
}

/// Mean time of a benchmark from criterion's saved estimates.
fn mean_ns(group: &str, id: &str) -> Option<f64> {
    let path = output_dir().join(group).join(id).join("new/estimates.json");
    let text = std::fs::read_to_string(path).ok()?;
    let json: serde_json::Value = serde_json::from_str(&text).ok()?;
    json["mean"]["point_estimate"].as_f64()
}

const GROUP: &str = "wgpu_kernels";

const PROBES: [(&str, Probe); 4] = [
    ("probe_copy", Probe::Copy),
    ("probe_read", Probe::Read),
    ("probe_f32_fma", Probe::FmaF32),
    ("probe_f16_fma", Probe::FmaF16),
];

fn main() {
    let gpu = match pollster::block_on(WgpuBackend::new(DeviceOptions::from_env())) {
        Ok(gpu) => gpu,
        Err(e) => {
            eprintln!("no adapter: {e}");
            std::process::exit(1);
        }
    };
    let adapter = gpu.describe();
    let mut b = Bench {
        gpu: gpu.clone(),
        rng: StdRng::seed_from_u64(7),
    };
    let mut criterion = Criterion::default()
        .output_directory(&output_dir())
        .sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(3))
        .configure_from_args();
    let mut measured = Vec::new();
    // Benchmarks that ran in this invocation (a name filter skips the others; their saved estimates are
    // from an earlier run and must not be printed as if measured now).
    let ran: RefCell<Vec<&'static str>> = RefCell::default();
    let mut group = criterion.benchmark_group(GROUP);

    // The roofline probes (msa_wgpu::probe): buffer copy, a bandwidth-bound read kernel, f32 FMA rate
    // (and f16 where the device has shader-f16).
    let probe = RooflineProbe::new(&gpu).unwrap();
    for (id, kind) in PROBES.into_iter().filter(|&(_, kind)| probe.supports(kind)) {
        group.throughput(Throughput::Bytes(probe.work(kind) as u64));
        group.bench_function(id, |bench| {
            ran.borrow_mut().push(id);
            bench.iter_custom(|iters| device_time(&gpu, iters, || probe.record(kind).unwrap()))
        });
    }

    let mut run = |group: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>,
                   id: &'static str,
                   bytes: u64,
                   op: &mut dyn FnMut()| {
        group.throughput(Throughput::Bytes(bytes));
        group.bench_function(id, |bench| {
            ran.borrow_mut().push(id);
            bench.iter_custom(|iters| device_time(&gpu, iters, &mut *op))
        });
        measured.push(Measured { id, bytes });
    };

    // Embedding: 128 token rows out of the 778 MB bf16 table (bound in windows of the binding limit).
    let table = b.bf16_weight(&[VOCAB, HIDDEN]);
    let ids: Vec<u32> = (0..128).map(|i| i * 1187).collect();
    run(
        &mut group,
        "embedding_128_tokens",
        128 * HIDDEN as u64 * (2 + 4),
        &mut || {
            b.gpu.embedding(&table, &ids).unwrap();
        },
    );
    drop(table);

    // Decode GEMV: one token through gate_proj (2560 → 9728, bf16), and prefill GEMM for 8 tokens.
    let gate = b.bf16_weight(&[FFN, HIDDEN]);
    let weight_bytes = (FFN * HIDDEN * 2) as u64;
    let x1 = b.tensor(&[1, HIDDEN]);
    run(
        &mut group,
        "gemv_decode_gate_proj",
        weight_bytes,
        &mut || {
            b.gpu.matmul(&x1, &gate).unwrap();
        },
    );
    let x8 = b.tensor(&[8, HIDDEN]);
    run(
        &mut group,
        "gemm_8_tokens_gate_proj",
        weight_bytes,
        &mut || {
            b.gpu.matmul(&x8, &gate).unwrap();
        },
    );

    // Bandwidth-bound row ops over a 128-token block.
    let hidden = b.tensor(&[128, HIDDEN]);
    let norm_w = b.bf16_weight(&[HIDDEN]);
    run(
        &mut group,
        "rms_norm_128x2560",
        2 * 128 * HIDDEN as u64 * 4,
        &mut || {
            b.gpu.rms_norm(&hidden, &norm_w, 1e-6).unwrap();
        },
    );
    let q = b.tensor(&[128, HEADS, HEAD_DIM]);
    let positions: Vec<u32> = (1000..1128).collect();
    run(
        &mut group,
        "rope_q_128_tokens",
        2 * (128 * HEADS * HEAD_DIM * 4) as u64,
        &mut || {
            b.gpu.rope(&q, &positions, 1e6).unwrap();
        },
    );
    let ffn_a = b.tensor(&[128, FFN]);
    let ffn_b = b.tensor(&[128, FFN]);
    run(
        &mut group,
        "silu_mul_128x9728",
        3 * (128 * FFN * 4) as u64,
        &mut || {
            b.gpu.silu_mul(&ffn_a, &ffn_b).unwrap();
        },
    );

    // Attention: decode over 4,096 keys (split-KV) and a 64-token prefill over a 16-document context.
    let q1 = b.tensor(&[1, HEADS, HEAD_DIM]);
    let k4096 = b.tensor(&[4096, KV_HEADS, HEAD_DIM]);
    let v4096 = b.tensor(&[4096, KV_HEADS, HEAD_DIM]);
    run(
        &mut group,
        "attention_decode_4096_keys",
        2 * (4096 * KV_HEADS * HEAD_DIM * 4) as u64,
        &mut || {
            b.gpu
                .attention(&q1, &k4096, &v4096, AttentionMask::Causal)
                .unwrap();
        },
    );
    let q64 = b.tensor(&[64, HEADS, HEAD_DIM]);
    let k_ctx = b.gpu.rows(&k4096, 0..1088).unwrap();
    let v_ctx = b.gpu.rows(&v4096, 0..1088).unwrap();
    run(
        &mut group,
        "attention_prefill_64_over_1088",
        2 * (1088 * KV_HEADS * HEAD_DIM * 4) as u64,
        &mut || {
            b.gpu
                .attention(&q64, &k_ctx, &v_ctx, AttentionMask::Causal)
                .unwrap();
        },
    );

    // Stage-1 pooling of a 4,096-token document's K (64-token chunks).
    run(
        &mut group,
        "chunk_mean_pool_4096_tokens",
        (4096 + 64) * (KV_HEADS * HEAD_DIM * 4) as u64,
        &mut || {
            b.gpu.chunk_mean_pool(&k4096, 64).unwrap();
        },
    );

    // Routing scan over 1M memory tokens (one router layer, f32 then bf16 keys), 1-token query; then
    // top-16.
    let keys_tensor = b.tensor(&[CHUNKS_1M, KV_HEADS, HEAD_DIM]);
    let keys = b.gpu.tensor_to_weight(&keys_tensor).unwrap();
    let bf16_keys = b.bf16_weight(&[CHUNKS_1M, KV_HEADS, HEAD_DIM]);
    let offsets: Vec<u32> = (0..CHUNKS_1M as u32)
        .step_by(16)
        .chain([CHUNKS_1M as u32])
        .collect();
    let spec = RoutingSpec {
        score_mode: ScoreMode::ScaledDot,
        head_reduce: HeadReduce::Mean,
        query_reduce: QueryReduce::Max,
        chunk_reduce: ChunkReduce::Max,
    };
    let key_bytes = (CHUNKS_1M * KV_HEADS * HEAD_DIM * 4) as u64;
    run(&mut group, "routing_scan_1M_tokens", key_bytes, &mut || {
        b.gpu
            .routing_scores(&q1, &[0], &keys, &offsets, spec)
            .unwrap();
    });
    run(
        &mut group,
        "routing_scan_1M_tokens_bf16",
        key_bytes / 2,
        &mut || {
            b.gpu
                .routing_scores(&q1, &[0], &bf16_keys, &offsets, spec)
                .unwrap();
        },
    );
    let scores = b
        .gpu
        .routing_scores(&q1, &[0], &keys, &offsets, spec)
        .unwrap();
    run(
        &mut group,
        "top16_of_977_documents",
        (offsets.len() * 4) as u64,
        &mut || {
            drop(b.gpu.top_k(&scores, 16));
        },
    );
    let logits = b.tensor(&[VOCAB]);
    run(
        &mut group,
        "argmax_151936_logits",
        (VOCAB * 4) as u64,
        &mut || {
            drop(b.gpu.top_k(&logits, 1));
        },
    );
    group.finish();
    criterion.final_summary();

    // Time, GB/s and the fraction of this adapter's read-kernel bandwidth, measured in this run (the
    // FMA probe's rate is printed for the compute-bound kernels; `msa bench --kernels` applies both).
    println!("\n{adapter}");
    let ran = ran.into_inner();
    let measured_now = |id: &str| mean_ns(GROUP, id).filter(|_| ran.contains(&id));
    for (id, kind) in PROBES {
        if let Some(ns) = measured_now(id) {
            println!("{id:<34} {:>9.2} G/s", probe.work(kind) / ns);
        }
    }
    let read = measured_now("probe_read").map(|ns| probe.work(Probe::Read) / ns);
    println!(
        "{:<34} {:>12} {:>10} {:>9}",
        "kernel", "time", "GB/s", "of read"
    );
    for m in measured.iter().filter(|m| ran.contains(&m.id)) {
        let Some(ns) = measured_now(m.id) else {
            continue;
        };
        let gbps = m.bytes as f64 / ns;
        let fraction = read.map_or("-".to_string(), |r| format!("{:.2}", gbps / r));
        println!(
            "{:<34} {:>9.3} ms {:>10.2} {:>9}",
            m.id,
            ns / 1e6,
            gbps,
            fraction
        );
    }
}
