//! `msa bench --probe` and `msa bench --kernels`: the adapter's roofline, and every performance-critical
//! kernel at the preset's shapes, on wgpu and on the CPU reference with the same inputs in the same run
//! (and on CUDA where it opens). Each wgpu figure is printed as a fraction of the roofline measured in
//! that run, so the table reads the same on lavapipe, a browser's adapter or an H100; each CUDA figure as
//! a fraction of the GPU's device-to-device copy rate.

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use half::bf16;
use msa_core::{ChunkReduce, DType, HeadReduce, ModelConfig, QueryReduce, ScoreMode, TensorView};
use msa_cuda::{CudaBackend, CudaRoofline};
use msa_engine::{AttentionMask, Backend, CpuBackend, RoutingSpec};
use msa_wgpu::WgpuBackend;
use msa_wgpu::probe::{Probe, Roofline, RooflineProbe};
use rand::{Rng, SeedableRng, rngs::StdRng};
use serde_json::{Value, json};

use crate::units;

/// A timing lasts at least this long: short kernels are repeated, recorded back to back.
const MIN_TIMING: Duration = Duration::from_millis(100);

/// The shapes of the run: the preset's model and the memory of `--memory-tokens`.
pub struct Shapes {
    pub hidden: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub ffn: usize,
    pub router_layers: usize,
    pub top_k: usize,
    pub chunks: usize,
    pub documents: usize,
    pub chunks_per_document: usize,
    pub memory_tokens: u64,
    pub query_tokens: usize,
}

impl Shapes {
    /// Bytes of one router layer's routing keys (bf16).
    pub fn routing_key_bytes(&self) -> u64 {
        (self.chunks * self.kv_heads * self.head_dim * 2) as u64
    }

    pub fn new(
        config: &ModelConfig,
        memory_tokens: u64,
        document_tokens: u64,
        query_tokens: usize,
    ) -> Result<Self> {
        let msa = config
            .msa
            .as_ref()
            .context("--kernels needs an MSA preset (config.json has no msa_config)")?;
        let chunks_per_document = (document_tokens as usize).div_ceil(msa.pooling_kernel_size);
        let documents = (memory_tokens / document_tokens).max(1) as usize;
        Ok(Shapes {
            hidden: config.hidden_size,
            heads: config.num_attention_heads,
            kv_heads: config.num_key_value_heads,
            head_dim: config.head_dim,
            ffn: config.intermediate_size,
            router_layers: msa.router_layers.len(),
            top_k: msa.doc_top_k,
            chunks: documents * chunks_per_document,
            documents,
            chunks_per_document,
            memory_tokens: documents as u64 * document_tokens,
            query_tokens,
        })
    }
}

/// What a kernel is held to.
#[derive(Clone, Copy)]
enum Target {
    /// At least this fraction of the roofline (bandwidth or FMA bound, whichever is slower).
    OfRoofline(f64),
    /// At most this fraction of the time of the named case.
    OfTime(&'static str, f64),
}

/// One kernel call at the run's shapes.
#[derive(Clone, Copy)]
enum Op {
    /// Routing scores of every document for `tokens` query tokens, over `layers` router layers.
    RoutingScan { tokens: usize, layers: usize },
    /// Top-k documents of one layer's scores (includes the readback of the k winners).
    TopK,
    /// `tokens` rows through gate_proj (bf16 weights).
    GateProj { tokens: usize },
    /// One decode step's attention over the prompt and `top_k` documents' pooled chunks.
    DecodeAttention,
    /// The MLP's first half for `tokens` rows: post-attention RMSNorm, gate_proj, up_proj, SwiGLU.
    MlpIn { tokens: usize },
    /// down_proj with the residual add, for `tokens` rows.
    DownResidual { tokens: usize },
}

impl Op {
    /// Whether the backend fuses this op; its naive version is then the unfused ops, timed beside it.
    fn fused(self) -> bool {
        matches!(self, Op::MlpIn { .. } | Op::DownResidual { .. })
    }

    /// Whether the adapter table chooses the op's kernel variant (projections, the routing scan);
    /// the other variant is then timed beside it.
    fn has_variants(self) -> bool {
        matches!(
            self,
            Op::RoutingScan { .. }
                | Op::GateProj { .. }
                | Op::MlpIn { .. }
                | Op::DownResidual { .. }
                | Op::DecodeAttention
        )
    }
}

struct Case {
    name: String,
    op: Op,
    /// Bytes the kernel must read or write at least, and FLOPs it must do.
    bytes: f64,
    flops: f64,
    target: Target,
}

/// The decode context: the template head, the selected documents' chunks and a 64-token prompt.
fn decode_context(s: &Shapes) -> usize {
    4 + s.top_k * s.chunks_per_document + 64
}

fn cases(s: &Shapes) -> Vec<Case> {
    let key_bytes = s.routing_key_bytes() as f64;
    // The head mean sums each GQA group's query heads first: one dot per KV head, token and chunk.
    let scan_flops = |tokens: usize| (2 * tokens * s.kv_heads * s.head_dim * s.chunks) as f64;
    let weight_bytes = (s.ffn * s.hidden * 2) as f64;
    let context = decode_context(s);
    let memory = units::count(s.memory_tokens);
    let scan_name = |tokens, layers| {
        format!(
            "routing scan, {memory} tokens, {tokens}-token query, {layers} layer{}",
            if layers == 1 { "" } else { "s" }
        )
    };
    let long = s.query_tokens.max(2);
    vec![
        Case {
            name: scan_name(1, 1),
            op: Op::RoutingScan {
                tokens: 1,
                layers: 1,
            },
            bytes: key_bytes,
            flops: scan_flops(1),
            target: Target::OfRoofline(0.7),
        },
        Case {
            name: scan_name(1, s.router_layers),
            op: Op::RoutingScan {
                tokens: 1,
                layers: s.router_layers,
            },
            bytes: key_bytes * s.router_layers as f64,
            flops: scan_flops(1) * s.router_layers as f64,
            target: Target::OfRoofline(0.7),
        },
        Case {
            name: scan_name(long, 1),
            op: Op::RoutingScan {
                tokens: long,
                layers: 1,
            },
            bytes: key_bytes,
            flops: scan_flops(long),
            target: Target::OfRoofline(0.7),
        },
        Case {
            name: format!("top-{} of {} documents", s.top_k, s.documents),
            op: Op::TopK,
            bytes: (s.documents * 4) as f64,
            flops: 0.0,
            target: Target::OfTime("routing scan", 0.05),
        },
        Case {
            name: format!("decode GEMV, gate_proj {}x{} bf16", s.ffn, s.hidden),
            op: Op::GateProj { tokens: 1 },
            bytes: weight_bytes,
            flops: (2 * s.ffn * s.hidden) as f64,
            target: Target::OfRoofline(0.6),
        },
        Case {
            name: format!(
                "prefill GEMM, 128 tokens x gate_proj {}x{}",
                s.ffn, s.hidden
            ),
            op: Op::GateProj { tokens: 128 },
            bytes: weight_bytes + (128 * (s.hidden + s.ffn) * 4) as f64,
            flops: (2 * 128 * s.ffn * s.hidden) as f64,
            target: Target::OfRoofline(0.3),
        },
        Case {
            name: format!(
                "decode MLP in: RMSNorm + gate/up {}x{} + SwiGLU",
                s.ffn, s.hidden
            ),
            op: Op::MlpIn { tokens: 1 },
            bytes: 2.0 * weight_bytes,
            flops: (4 * s.ffn * s.hidden) as f64,
            target: Target::OfRoofline(0.6),
        },
        Case {
            name: format!(
                "decode MLP out: down_proj {}x{} + residual",
                s.hidden, s.ffn
            ),
            op: Op::DownResidual { tokens: 1 },
            bytes: weight_bytes,
            flops: (2 * s.ffn * s.hidden) as f64,
            target: Target::OfRoofline(0.6),
        },
        Case {
            name: format!("decode attention, {} documents ({context} keys)", s.top_k),
            op: Op::DecodeAttention,
            bytes: (2 * context * s.kv_heads * s.head_dim * 4) as f64,
            flops: (4 * s.heads * context * s.head_dim) as f64,
            target: Target::OfRoofline(0.5),
        },
    ]
}

/// The same random inputs for both backends.
struct Inputs {
    query: Vec<f32>,
    keys: Vec<u8>,
    offsets: Vec<u32>,
    x: Vec<f32>,
    gate: Vec<u8>,
    up: Vec<u8>,
    norm: Vec<u8>,
    mlp_hidden: Vec<f32>,
    q1: Vec<f32>,
    kv: Vec<f32>,
}

fn random_bf16(rng: &mut StdRng, n: usize, scale: f32) -> Vec<u8> {
    (0..n)
        .flat_map(|_| bf16::from_f32(rng.random_range(-scale..scale)).to_le_bytes())
        .collect()
}

fn random_f32(rng: &mut StdRng, n: usize) -> Vec<f32> {
    (0..n).map(|_| rng.random_range(-1.0f32..1.0)).collect()
}

impl Inputs {
    fn new(s: &Shapes, seed: u64) -> Self {
        let mut rng = StdRng::seed_from_u64(seed);
        let long = s.query_tokens.max(2);
        Inputs {
            query: random_f32(&mut rng, long * s.heads * s.head_dim),
            keys: random_bf16(&mut rng, s.chunks * s.kv_heads * s.head_dim, 1.0),
            offsets: (0..=s.documents)
                .map(|d| (d * s.chunks_per_document) as u32)
                .collect(),
            x: random_f32(&mut rng, 128 * s.hidden),
            gate: random_bf16(&mut rng, s.ffn * s.hidden, 0.05),
            up: random_bf16(&mut rng, s.ffn * s.hidden, 0.05),
            norm: random_bf16(&mut rng, s.hidden, 1.0),
            mlp_hidden: random_f32(&mut rng, s.ffn),
            q1: random_f32(&mut rng, s.heads * s.head_dim),
            kv: random_f32(&mut rng, 2 * decode_context(s) * s.kv_heads * s.head_dim),
        }
    }
}

const SPEC: RoutingSpec = RoutingSpec {
    score_mode: ScoreMode::ScaledDot,
    head_reduce: HeadReduce::Mean,
    query_reduce: QueryReduce::Max,
    chunk_reduce: ChunkReduce::Max,
};

/// Seconds per call of `op` on `b` (calls recorded back to back, then one wait), and its last output.
fn time<B: Backend, T>(b: &B, mut op: impl FnMut() -> Result<T>) -> Result<(f64, T)> {
    let mut timed = |runs: u32| -> Result<(Duration, T)> {
        let start = Instant::now();
        let mut out = op()?;
        for _ in 1..runs {
            out = op()?;
        }
        pollster::block_on(b.synchronize())?;
        Ok((start.elapsed(), out))
    };
    // The first call warms up (pipeline compilation, first touch); when it is long, the second is
    // the measurement.
    let (first, _) = timed(1)?;
    if first >= 4 * MIN_TIMING {
        let (second, out) = timed(1)?;
        return Ok((second.as_secs_f64(), out));
    }
    let mut runs = 1;
    loop {
        let (elapsed, out) = timed(runs)?;
        if elapsed >= MIN_TIMING || runs >= 1 << 12 {
            return Ok((elapsed.as_secs_f64() / f64::from(runs), out));
        }
        runs *= 4;
    }
}

/// [`time`] of an op whose output is a tensor, read back once timed.
fn time_tensor<B: Backend>(
    b: &B,
    mut op: impl FnMut() -> msa_engine::Result<B::Tensor>,
) -> Result<(f64, Vec<f32>)> {
    let (seconds, out) = time(b, || op().map_err(anyhow::Error::from))?;
    Ok((seconds, pollster::block_on(b.read(&out))?))
}

/// Runs `op` on `b` with `inputs` (a fused op as its unfused ops when `naive`): seconds per call and
/// the output the backends must agree on.
fn run_op<B: Backend>(
    b: &B,
    s: &Shapes,
    inputs: &Inputs,
    op: Op,
    naive: bool,
) -> Result<(f64, Vec<f32>)> {
    let (kv, d) = (s.kv_heads, s.head_dim);
    let weight = |name, shape: &[usize], bytes: &[u8]| {
        b.upload_weight(TensorView {
            name,
            dtype: DType::BF16,
            shape,
            bytes,
        })
    };
    match op {
        Op::RoutingScan { tokens, layers } => {
            let q = b.upload(&inputs.query[..tokens * s.heads * d], &[tokens, s.heads, d])?;
            let rows: Vec<u32> = (0..tokens as u32).collect();
            // One key buffer per layer, as a bank keeps them: no layer reads another's from a cache.
            let keys = (0..layers)
                .map(|_| weight("routing keys", &[s.chunks, kv, d], &inputs.keys))
                .collect::<msa_engine::Result<Vec<_>>>()?;
            time_tensor(b, || {
                let mut scores = None;
                for layer_keys in &keys {
                    scores =
                        Some(b.routing_scores(&q, &rows, layer_keys, &inputs.offsets, SPEC)?);
                }
                Ok(scores.expect("one layer at least"))
            })
        }
        Op::TopK => {
            let q = b.upload(&inputs.query[..s.heads * d], &[1, s.heads, d])?;
            let keys = weight("routing keys", &[s.chunks, kv, d], &inputs.keys)?;
            let scores = b.routing_scores(&q, &[0], &keys, &inputs.offsets, SPEC)?;
            pollster::block_on(b.synchronize())?;
            time(b, || {
                let top = pollster::block_on(b.top_k(&scores, s.top_k))?;
                Ok(top.iter().map(|t| t.index as f32).collect())
            })
        }
        Op::GateProj { tokens } => {
            let x = b.upload(&inputs.x[..tokens * s.hidden], &[tokens, s.hidden])?;
            let gate = weight("gate_proj", &[s.ffn, s.hidden], &inputs.gate)?;
            time_tensor(b, || b.matmul(&x, &gate))
        }
        Op::MlpIn { tokens } => {
            let x = b.upload(&inputs.x[..tokens * s.hidden], &[tokens, s.hidden])?;
            let norm = weight("norm", &[s.hidden], &inputs.norm)?;
            let gate = weight("gate_proj", &[s.ffn, s.hidden], &inputs.gate)?;
            let up = weight("up_proj", &[s.ffn, s.hidden], &inputs.up)?;
            time_tensor(b, || {
                if naive {
                    let normed = b.rms_norm(&x, &norm, 1e-6)?;
                    b.silu_mul(&b.matmul(&normed, &gate)?, &b.matmul(&normed, &up)?)
                } else {
                    b.norm_swiglu(&x, &norm, 1e-6, &gate, &up)
                }
            })
        }
        Op::DownResidual { tokens } => {
            // down_proj has gate_proj's transposed shape: the gate bytes serve as its weights.
            let x = b.upload(&inputs.mlp_hidden[..tokens * s.ffn], &[tokens, s.ffn])?;
            let residual = b.upload(&inputs.x[..tokens * s.hidden], &[tokens, s.hidden])?;
            let down = weight("down_proj", &[s.hidden, s.ffn], &inputs.gate)?;
            time_tensor(b, || {
                if naive {
                    b.add(&residual, &b.matmul(&x, &down)?)
                } else {
                    b.matmul_add(&x, &down, &residual)
                }
            })
        }
        Op::DecodeAttention => {
            let context = decode_context(s);
            let half = context * kv * d;
            let q = b.upload(&inputs.q1, &[1, s.heads, d])?;
            let k = b.upload(&inputs.kv[..half], &[context, kv, d])?;
            let v = b.upload(&inputs.kv[half..], &[context, kv, d])?;
            time_tensor(b, || b.attention(&q, &k, &v, AttentionMask::Causal))
        }
    }
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    if a.len() != b.len() {
        return f32::INFINITY;
    }
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// `12.3 GB/s`, `45.6 GFLOP/s`.
fn rate(per_second: f64, unit: &str) -> String {
    format!("{:.2} G{unit}/s", per_second / 1e9)
}

/// Measures and prints the roofline of `gpu`.
pub fn probe(gpu: &WgpuBackend) -> Result<Roofline> {
    let roofline = pollster::block_on(RooflineProbe::new(gpu)?.measure())?;
    println!("roofline of {}", gpu.describe());
    for (probe, figure) in [
        (
            Probe::Copy,
            rate(roofline.copy_bytes_per_s, "B") + " (read + write)",
        ),
        (Probe::Read, rate(roofline.read_bytes_per_s, "B")),
        (Probe::FmaF32, rate(roofline.f32_flops_per_s, "FLOP")),
        (
            Probe::FmaF16,
            roofline.f16_flops_per_s.map_or_else(
                || "- (no shader-f16 on this adapter)".to_string(),
                |f16| rate(f16, "FLOP"),
            ),
        ),
    ] {
        println!("  {:<12} {figure}", probe.name());
    }
    Ok(roofline)
}

pub fn roofline_json(r: &Roofline) -> Value {
    json!({
        "copy_bytes_per_s": r.copy_bytes_per_s,
        "read_bytes_per_s": r.read_bytes_per_s,
        "f32_flops_per_s": r.f32_flops_per_s,
        "f16_flops_per_s": r.f16_flops_per_s,
    })
}

/// Measures and prints what a CUDA device can move: the denominator of its kernels' fractions.
pub fn probe_cuda(cuda: &CudaBackend) -> Result<CudaRoofline> {
    let roofline = cuda.measure_roofline()?;
    println!("roofline of {}", cuda.describe());
    println!(
        "  {:<12} {} (read + write)",
        "device copy",
        rate(roofline.device_copy_bytes_per_s, "B")
    );
    println!(
        "  {:<12} {}",
        "pinned H2D",
        rate(roofline.host_to_device_bytes_per_s, "B")
    );
    Ok(roofline)
}

pub fn cuda_roofline_json(cuda: &CudaBackend, r: &CudaRoofline) -> Value {
    json!({
        "device": cuda.describe(),
        "device_copy_bytes_per_s": r.device_copy_bytes_per_s,
        "host_to_device_bytes_per_s": r.host_to_device_bytes_per_s,
    })
}

/// Every case (or those whose name contains `only`) on wgpu and on the CPU reference, side by side;
/// projections also on `other`, the same adapter with the kernel variants the table would not choose;
/// and on `cuda` where given (the same GPU through CUDA). Returns the report as JSON.
pub fn compare(
    gpu: &WgpuBackend,
    other: &WgpuBackend,
    cuda: Option<&CudaBackend>,
    shapes: &Shapes,
    only: Option<&str>,
    seed: u64,
) -> Result<Value> {
    let mut cases = cases(shapes);
    if let Some(only) = only {
        let only = only.to_lowercase();
        cases.retain(|case| case.name.to_lowercase().contains(&only));
        anyhow::ensure!(
            !cases.is_empty(),
            "--only {only:?} matches no kernel; the kernels are: {}",
            self::cases(shapes)
                .iter()
                .map(|case| case.name.as_str())
                .collect::<Vec<_>>()
                .join("; ")
        );
    }
    let roofline = probe(gpu)?;
    let cuda = match cuda {
        Some(cuda) => Some((cuda, probe_cuda(cuda)?)),
        None => None,
    };
    let cpu = CpuBackend::new();
    let inputs = Inputs::new(shapes, seed);
    let (variants, other_variants) = (gpu.capabilities().variants, other.capabilities().variants);
    println!("\nwgpu: {variants} (this adapter's table); other variant: {other_variants}");
    print!(
        "\n{:<58} {:>10} {:>10} {:>10} {:>10} {:>8} {:>15} {:>8} {:>8} {:>9}",
        "kernel",
        "CPU ref",
        "naive",
        "other var",
        "wgpu",
        "vs CPU",
        "wgpu rate",
        "of roof",
        "target",
        "max diff"
    );
    if cuda.is_some() {
        print!(" {:>10} {:>8} {:>9}", "cuda", "of HBM", "cuda diff");
    }
    println!();
    let mut rows = Vec::new();
    let mut times: Vec<(&str, f64)> = Vec::new();
    for case in &cases {
        let (cpu_s, cpu_out) = run_op(&cpu, shapes, &inputs, case.op, false)?;
        let (gpu_s, gpu_out) = run_op(gpu, shapes, &inputs, case.op, false)?;
        // CUDA: seconds, the bytes it moved per second over a device-to-device copy's, and its
        // largest difference from the CPU reference.
        let on_cuda = match &cuda {
            Some((cuda, roofline)) => {
                let (seconds, out) = run_op(*cuda, shapes, &inputs, case.op, false)?;
                let of_copy = case.bytes / seconds / roofline.device_copy_bytes_per_s;
                Some((seconds, of_copy, max_abs_diff(&out, &cpu_out)))
            }
            None => None,
        };
        let naive_s = if case.op.fused() {
            Some(run_op(gpu, shapes, &inputs, case.op, true)?.0)
        } else {
            None
        };
        let other_s = if case.op.has_variants() {
            Some(run_op(other, shapes, &inputs, case.op, false)?.0)
        } else {
            None
        };
        times.push((&case.name, gpu_s));
        // The roofline time: bandwidth-bound or compute-bound, whichever takes longer.
        let roof_s =
            (case.bytes / roofline.read_bytes_per_s).max(case.flops / roofline.f32_flops_per_s);
        let of_roof = roof_s / gpu_s;
        let compute_bound =
            case.flops / roofline.f32_flops_per_s > case.bytes / roofline.read_bytes_per_s;
        let (target, met) = match case.target {
            Target::OfRoofline(fraction) => (format!(">= {fraction:.2}"), of_roof >= fraction),
            Target::OfTime(prefix, fraction) => {
                // Without its reference case (filtered out by --only) the target cannot be judged.
                let reference = times
                    .iter()
                    .find(|(name, _)| name.starts_with(prefix))
                    .map(|&(_, t)| t);
                (
                    format!("<= {:.0}% scan", fraction * 100.0),
                    reference.is_some_and(|reference| gpu_s <= fraction * reference),
                )
            }
        };
        let wgpu_rate = if compute_bound {
            rate(case.flops / gpu_s, "FLOP")
        } else {
            rate(case.bytes / gpu_s, "B")
        };
        let diff = max_abs_diff(&gpu_out, &cpu_out);
        let ms = |t: Option<f64>| t.map_or("-".to_string(), |t| format!("{:.3} ms", t * 1e3));
        let (naive, other_variant) = (ms(naive_s), ms(other_s));
        print!(
            "{:<58} {:>7.3} ms {naive:>10} {other_variant:>10} {:>7.3} ms {:>7.2}x {:>15} {:>8.2} {:>6} {} {:>9.2e}",
            case.name,
            cpu_s * 1e3,
            gpu_s * 1e3,
            cpu_s / gpu_s,
            wgpu_rate,
            of_roof,
            target,
            if met { "ok" } else { "--" },
            diff,
        );
        if let Some((seconds, of_copy, diff)) = on_cuda {
            print!(" {:>7.3} ms {of_copy:>8.2} {diff:>9.2e}", seconds * 1e3);
        }
        println!();
        rows.push(json!({
            "kernel": case.name,
            "cpu_seconds": cpu_s,
            "wgpu_naive_seconds": naive_s,
            "wgpu_other_variant_seconds": other_s,
            "wgpu_seconds": gpu_s,
            "bytes": case.bytes,
            "flops": case.flops,
            "bound": if compute_bound { "compute" } else { "bandwidth" },
            "fraction_of_roofline": of_roof,
            "target": target,
            "target_met": met,
            "max_abs_diff": diff,
            "cuda_seconds": on_cuda.map(|c| c.0),
            "cuda_fraction_of_device_copy": on_cuda.map(|c| c.1),
            "cuda_max_abs_diff": on_cuda.map(|c| c.2),
        }));
    }
    println!(
        "\nnaive: a fused op run as its separate ops on wgpu; other var: the op with the kernel \
         variants this adapter's table does not choose; vs CPU: CPU time over wgpu time; of roof: \
         the roofline time (bytes / read bandwidth or FLOPs / FMA rate, whichever is longer) over the \
         measured time; max diff: largest |wgpu - CPU| of the outputs."
    );
    if cuda.is_some() {
        println!(
            "cuda: the op on the CUDA backend; of HBM: its bytes per \
             second over a device-to-device copy's (bytes read + written) measured in the same run; \
             cuda diff: largest |cuda - CPU| (projections of many rows round activations to bf16 for \
             tensor cores)."
        );
    }
    Ok(json!({
        "adapter": gpu.describe(),
        "variants": variants.to_string(),
        "other_variants": other_variants.to_string(),
        "roofline": roofline_json(&roofline),
        "cuda": cuda.map(|(cuda, r)| cuda_roofline_json(cuda, &r)),
        "kernels": rows,
    }))
}
