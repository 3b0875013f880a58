//! `msa bench`: the whole pipeline at a chosen model shape and memory size, stage by stage, on the
//! chosen backend and devices. The model is a preset with random weights (generated once into the cache
//! folder) or a real checkpoint; the memory is a synthetic bank with the model's exact memory shapes
//! (random rows, the real format) or a real bank.

use std::borrow::Cow;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::{Args, ValueEnum};
use msa_core::bank::synthetic::{self, SyntheticSpec};
use msa_core::bank::{Bank, MemoryFingerprint, OpenOptions};
use msa_core::checkpoint::expected_tensors;
use msa_core::{ModelConfig, QueryPrompt, TokenRole};
use msa_cuda::KernelTimes;
use msa_engine::{GenerateOptions, Model};
use msa_wgpu::{DeviceOptions, WgpuBackend};
use rand::{Rng, SeedableRng, rngs::StdRng};
use rayon::prelude::*;
use serde_json::json;

use crate::backend::{self, BackendArgs, BackendKind, Device, Job, WorkCounts};
use crate::info::tier_bytes;
use crate::kernels;
use crate::units;

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Preset {
    /// The shape of the bundled test model: 4 layers (2 routed), hidden 64, vocabulary 512.
    Tiny,
    /// MSA-4B: Qwen3-4B (36 layers, hidden 2560, 32/8 heads of 128, FFN 9728, vocabulary 151936) with
    /// router layers 18..=35 and 64-token chunks.
    #[value(name = "msa-4b")]
    Msa4b,
}

impl Preset {
    /// The name on the command line.
    fn name(self) -> &'static str {
        match self {
            Preset::Tiny => "tiny",
            Preset::Msa4b => "msa-4b",
        }
    }
}

/// Benchmark the pipeline stage by stage: stage-1 encoding, routing over a memory of a given size
/// (Memory Parallel with --devices), fetching the selected pages, prefill and decoding. Prints a table
/// (and JSON with --json) naming the adapter. When the requested size cannot fit this machine, says
/// what it would need instead.
#[derive(Args)]
pub struct BenchArgs {
    /// Model shape, with random bf16 weights generated once into the cache folder.
    #[arg(long, value_enum, default_value_t = Preset::Tiny, conflicts_with = "model")]
    preset: Preset,
    /// A real model directory instead of a preset.
    #[arg(long, value_name = "DIR")]
    model: Option<PathBuf>,
    /// Memory size: a synthetic bank of this many tokens with the model's memory shapes (1M, 10M,
    /// 100M, 250K, …), generated once into the cache folder.
    #[arg(long, default_value = "1M", value_parser = parse_count, value_name = "N")]
    memory_tokens: u64,
    /// A real bank instead of a synthetic one (it must belong to the model).
    #[arg(long, value_name = "BANK", conflicts_with = "memory_tokens")]
    bank: Option<PathBuf>,
    /// Shard servers (`msa shard`, serving --bank) scoring the ranks after this process's own, as for
    /// `msa ask --shards`.
    #[arg(
        long,
        value_delimiter = ',',
        value_name = "HOST:PORT",
        requires = "bank"
    )]
    shards: Vec<String>,
    /// Tokens per synthetic document.
    #[arg(long, default_value = "1024", value_parser = parse_count, value_name = "N")]
    document_tokens: u64,
    /// Tokens encoded to measure stage 1 (random documents of --document-tokens).
    #[arg(long, default_value = "2048", value_parser = parse_count, value_name = "N")]
    encode_tokens: u64,
    /// Questions asked (each routes every router layer, prefills and decodes).
    #[arg(long, default_value_t = 3, value_name = "N")]
    queries: usize,
    /// Routing-query tokens per question.
    #[arg(long, default_value_t = 16, value_name = "N")]
    query_tokens: usize,
    /// Tokens generated per question (at least 2: the first comes from the prefill, the rest are timed
    /// as decoding).
    #[arg(long, default_value_t = 16, value_name = "N", value_parser = clap::value_parser!(u32).range(2..))]
    decode_tokens: u32,
    /// Also write the report as JSON to this file.
    #[arg(long, value_name = "FILE")]
    json: Option<PathBuf>,
    /// Where generated models and banks are kept [default: $XDG_CACHE_HOME/msa/bench or
    /// ~/.cache/msa/bench].
    #[arg(long, value_name = "DIR")]
    cache_dir: Option<PathBuf>,
    /// Seed of the random weights, documents and questions.
    #[arg(long, default_value_t = 7)]
    seed: u64,
    /// Only measure the wgpu adapter's roofline: buffer-copy and kernel read bandwidth, f32 FMA rate
    /// (and, with CUDA, the GPU's device-to-device and pinned host-to-device copy rates).
    #[arg(long, conflicts_with_all = ["model", "bank", "kernels"])]
    probe: bool,
    /// Compare every performance-critical kernel at the preset's shapes (routing scan over
    /// --memory-tokens with 1 and --query-tokens query tokens, top-k, decode GEMV, prefill GEMM, the
    /// fused MLP halves beside their unfused ops, decode attention): wgpu against the CPU reference on
    /// the same inputs, each wgpu figure as a fraction of the roofline measured in the same run, with
    /// its target. With `--backend cuda` (or `auto` on an NVIDIA machine) each kernel also runs on
    /// CUDA, as a fraction of the GPU's device-to-device copy rate.
    #[arg(long, conflicts_with_all = ["model", "bank"])]
    kernels: bool,
    /// With --kernels: only the kernels whose name contains TEXT (case-insensitive), e.g. `attention`.
    #[arg(long, value_name = "TEXT", requires = "kernels")]
    only: Option<String>,
    #[command(flatten)]
    backend: BackendArgs,
}

/// `1M`, `10M`, `250K`, `100000`, `1G`.
fn parse_count(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let (digits, scale) = match text.chars().last() {
        Some('K' | 'k') => (&text[..text.len() - 1], 1_000),
        Some('M' | 'm') => (&text[..text.len() - 1], 1_000_000),
        Some('G' | 'g') => (&text[..text.len() - 1], 1_000_000_000),
        _ => (text, 1),
    };
    match digits.parse::<u64>() {
        Ok(n) if n > 0 => n
            .checked_mul(scale)
            .ok_or_else(|| format!("{text} is too large")),
        _ => Err(format!(
            "`{text}` is not a positive count (examples: 4096, 250K, 10M)"
        )),
    }
}

fn cache_dir(args: &BenchArgs) -> PathBuf {
    if let Some(dir) = &args.cache_dir {
        return dir.clone();
    }
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(std::env::temp_dir);
    base.join("msa").join("bench")
}

/// The config.json of a preset (tied embeddings, bf16, MSA-SPEC §1 for MSA-4B).
fn preset_config(preset: Preset) -> serde_json::Value {
    let (hidden, layers, heads, kv, head_dim, ffn, vocab, routers, pooling, top_k) = match preset {
        Preset::Tiny => (64, 4, 4, 2, 16, 128, 512, "2,3", 16, 3),
        Preset::Msa4b => (
            2560,
            36,
            32,
            8,
            128,
            9728,
            151936,
            "18,19,20,21,22,23,24,25,26,27,28,29,30,31,32,33,34,35",
            64,
            16,
        ),
    };
    json!({
        "architectures": ["MSAForCausalLM"],
        "model_type": "msa",
        "hidden_size": hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv,
        "head_dim": head_dim,
        "intermediate_size": ffn,
        "vocab_size": vocab,
        "hidden_act": "silu",
        "rms_norm_eps": 1e-6,
        "rope_theta": 5000000.0,
        "rope_scaling": null,
        "tie_word_embeddings": true,
        "attention_bias": false,
        "torch_dtype": "bfloat16",
        "bos_token_id": vocab - 3,
        "eos_token_id": vocab - 1,
        "max_position_embeddings": 262144,
        "msa_config": {
            "router_layer_idx": routers,
            "pooling_kernel_size": pooling,
            "doc_top_k": top_k,
            "top_k_docs": top_k,
            "decouple_router": true,
            "aux_loss_method": "INFONCE_DECOUPLE",
            "head_reduce_method": "mean",
            "query_reduce_method": "max",
            "chunk_reduce_method": "max",
        }
    })
}

/// A tensor of random bf16 values, generated when the safetensors writer asks for its bytes, so that
/// writing a 4B-parameter model holds one tensor in memory at a time.
struct RandomTensor {
    shape: Vec<usize>,
    seed: u64,
    /// Norm weights are ones; other values are uniform in ±scale.
    scale: Option<f32>,
}

impl safetensors::View for &RandomTensor {
    fn dtype(&self) -> safetensors::Dtype {
        safetensors::Dtype::BF16
    }

    fn shape(&self) -> &[usize] {
        &self.shape
    }

    fn data(&self) -> Cow<'_, [u8]> {
        // Blocks with their own seeds: the same bytes on any number of threads.
        const BLOCK: usize = 1 << 20;
        let mut bytes = vec![0u8; self.data_len()];
        bytes
            .par_chunks_mut(2 * BLOCK)
            .enumerate()
            .for_each(|(block, out)| {
                let mut rng = StdRng::seed_from_u64(
                    self.seed ^ (block as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15),
                );
                for pair in out.chunks_exact_mut(2) {
                    let value = match self.scale {
                        Some(s) => rng.random_range(-s..s),
                        None => 1.0,
                    };
                    pair.copy_from_slice(&half::bf16::from_f32(value).to_le_bytes());
                }
            });
        Cow::Owned(bytes)
    }

    fn data_len(&self) -> usize {
        self.shape.iter().product::<usize>() * 2
    }
}

/// Writes a preset with random weights into `dir` (once: reused while its config matches).
fn random_model(dir: &Path, preset: Preset, seed: u64) -> Result<()> {
    let config_text = serde_json::to_string_pretty(&preset_config(preset))?;
    let config_path = dir.join("config.json");
    let weights = dir.join("model.safetensors");
    if weights.is_file()
        && std::fs::read_to_string(&config_path).ok().as_deref() == Some(&config_text)
    {
        return Ok(());
    }
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let config = ModelConfig::from_json_str(&config_text, &config_path)?;
    let tensors: Vec<(String, RandomTensor)> = expected_tensors(&config)
        .into_iter()
        .enumerate()
        .map(|(i, (name, shape))| {
            // Projections are [out, in]: ±1/√in keeps activations in range; the embedding gets ±1/√h.
            let scale = (shape.len() == 2).then(|| 1.0 / (shape[1] as f32).sqrt());
            let tensor = RandomTensor {
                shape,
                seed: seed.wrapping_mul(1_000_003).wrapping_add(i as u64),
                scale,
            };
            (name, tensor)
        })
        .collect();
    eprintln!(
        "generating {} with random weights ({}) ...",
        dir.display(),
        units::bytes(config.parameter_count() as u64 * 2)
    );
    let partial = dir.join("model.safetensors.partial");
    safetensors::serialize_to_file(tensors.iter().map(|(n, t)| (n.as_str(), t)), None, &partial)
        .with_context(|| format!("writing {}", partial.display()))?;
    std::fs::rename(&partial, &weights)?;
    std::fs::write(&config_path, config_text)?;
    Ok(())
}

/// Free bytes on the file system holding `path` (or its nearest existing ancestor).
fn free_disk(path: &Path) -> Option<u64> {
    path.ancestors()
        .find(|p| p.exists())
        .and_then(|p| fs4::available_space(p).ok())
}

/// `MemAvailable` of Linux, in bytes.
fn free_ram() -> Option<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = meminfo.lines().find(|l| l.starts_with("MemAvailable:"))?;
    Some(line.split_whitespace().nth(1)?.parse::<u64>().ok()? * 1024)
}

/// Peak resident set size of this process (Linux `VmHWM`), in bytes.
fn peak_rss() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    Some(line.split_whitespace().nth(1)?.parse::<u64>().ok()? * 1024)
}

fn gb(bytes: u64) -> f64 {
    bytes as f64 / 1e9
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// What a run needs, checked before anything big is written or allocated.
struct Needs {
    disk: u64,
    ram: u64,
    /// Routing keys of one router layer on one device: one buffer each.
    layer_keys_per_device: u64,
    device_keys: u64,
}

fn check_fits(args: &BenchArgs, needs: &Needs, cache: &Path, kind: BackendKind) -> Result<()> {
    let devices = u64::from(args.backend.devices);
    let mut problems = Vec::new();
    if let Some(free) = free_disk(cache)
        && needs.disk > free
    {
        problems.push(format!(
            "{:.1} GB of disk in {} for the generated model and bank ({:.1} GB free)",
            gb(needs.disk),
            cache.display(),
            gb(free)
        ));
    }
    if let Some(free) = free_ram()
        && needs.ram > free
    {
        problems.push(format!(
            "{:.1} GB of RAM ({:.1} GB available)",
            gb(needs.ram),
            gb(free)
        ));
    }
    if kind == BackendKind::Wgpu {
        let adapters =
            pollster::block_on(msa_wgpu::matching_adapters(args.backend.adapter.as_deref()));
        if let Some(adapter) = adapters.first() {
            let largest = adapter.limits().max_buffer_size;
            if needs.layer_keys_per_device > largest {
                let devices_needed = needs.layer_keys_per_device * devices / largest + 1;
                problems.push(format!(
                    "{:.2} GB of routing keys per router layer on each of {devices} device(s), but {}'s largest buffer is {:.2} GB: use --devices {devices_needed} or more",
                    gb(needs.layer_keys_per_device),
                    adapter.get_info().name,
                    gb(largest)
                ));
            }
        }
    }
    if problems.is_empty() {
        return Ok(());
    }
    bail!(
        "this run does not fit this machine ({} memory tokens): it needs {}. In all, the memory's routing keys take {:.1} GB of device memory ({:.1} GB per device with --devices {devices}) and its content {:.1} GB of host pages.",
        units::count(args.memory_tokens),
        problems.join("; and "),
        gb(needs.device_keys),
        gb(needs.device_keys / devices),
        gb(needs.device_keys * 2),
    )
}

pub fn bench(args: BenchArgs) -> Result<()> {
    if args.probe || args.kernels {
        return kernel_bench(&args);
    }
    anyhow::ensure!(
        args.queries > 0 && args.query_tokens > 0,
        "--queries and --query-tokens must be positive"
    );
    anyhow::ensure!(
        args.bank.is_some() || args.memory_tokens >= args.document_tokens,
        "--memory-tokens ({}) is less than one document of --document-tokens ({})",
        args.memory_tokens,
        args.document_tokens
    );
    let cache = cache_dir(&args);
    let (model_dir, config) = match &args.model {
        Some(dir) => (
            dir.clone(),
            ModelConfig::from_file(dir.join("config.json"))?,
        ),
        None => {
            let text = serde_json::to_string(&preset_config(args.preset))?;
            let name = args.preset.name();
            let dir = cache
                .join("models")
                .join(format!("{name}-random-{}", args.seed));
            (dir.clone(), ModelConfig::from_json_str(&text, dir)?)
        }
    };
    let kind = backend::resolve(&args.backend);
    // The weights once more in RAM on the CPU backend (mapped file plus the backend's copy).
    let weight_bytes = config.parameter_count() as u64 * 2;
    // The digest is known once the model loads; the shapes are enough to size the run.
    let fp_shape = MemoryFingerprint::of(&config, 0)
        .context("the bench needs an MSA model (config.json has no msa_config)")?;
    let (bank_bytes, device_keys, layer_keys) = match &args.bank {
        Some(_) => (0, 0, 0),
        None => {
            let cached = bank_cached(&args, &cache);
            let documents = args.memory_tokens / args.document_tokens;
            let chunks = documents * fp_shape.chunks_of(args.document_tokens as usize);
            let (device, host) = tier_bytes(&fp_shape, chunks);
            let per_layer = device / fp_shape.router_layers.len() as u64;
            (
                if cached { 0 } else { device + host },
                device,
                per_layer.div_ceil(u64::from(args.backend.devices)),
            )
        }
    };
    let needs = Needs {
        disk: if args.model.is_none() && !model_dir.join("model.safetensors").exists() {
            weight_bytes
        } else {
            0
        } + bank_bytes,
        ram: if kind == BackendKind::Cpu {
            weight_bytes + device_keys
        } else {
            0
        },
        layer_keys_per_device: layer_keys,
        device_keys,
    };
    check_fits(&args, &needs, &cache, kind)?;
    if args.model.is_none() {
        random_model(&model_dir, args.preset, args.seed)?;
    }
    backend::run(
        &args.backend.clone(),
        BenchJob {
            args,
            model_dir,
            cache,
        },
    )
}

/// `--probe` and `--kernels`: always on wgpu (the CPU reference is the comparison), and on the same
/// machine's first CUDA GPU too with `--backend cuda` (required) or `auto` (where it opens).
fn kernel_bench(args: &BenchArgs) -> Result<()> {
    anyhow::ensure!(
        args.backend.backend != BackendKind::Cpu && args.backend.devices == 1,
        "--probe and --kernels measure one GPU: use --backend wgpu, cuda or auto, and no --devices"
    );
    let (gpu, _) = backend::open_wgpu(args.backend.adapter.clone(), 1)?;
    let cuda = match args.backend.backend {
        BackendKind::Cuda => Some(backend::open_cuda(1)?.0),
        BackendKind::Auto => backend::open_cuda(1)
            .inspect_err(|e| tracing::info!("no CUDA figures: {e:#}"))
            .ok()
            .map(|(cuda, _)| cuda),
        BackendKind::Wgpu | BackendKind::Cpu => None,
    };
    let report = if args.probe {
        let roofline = kernels::roofline_json(&kernels::probe(&gpu)?);
        let cuda = match &cuda {
            Some(cuda) => Some(kernels::cuda_roofline_json(
                cuda,
                &kernels::probe_cuda(cuda)?,
            )),
            None => None,
        };
        json!({
            "adapter": msa_engine::Backend::describe(&gpu),
            "roofline": roofline,
            "cuda": cuda,
        })
    } else {
        let text = serde_json::to_string(&preset_config(args.preset))?;
        let config = ModelConfig::from_json_str(&text, "preset")?;
        let shapes = kernels::Shapes::new(
            &config,
            args.memory_tokens,
            args.document_tokens,
            args.query_tokens,
        )?;
        // Both backends hold one copy of the routing keys per router layer, and the host one more.
        let key_bytes = shapes.routing_key_bytes();
        let ram = key_bytes * (2 * shapes.router_layers as u64 + 1);
        if let Some(free) = free_ram()
            && ram > free
        {
            bail!(
                "--kernels over {} memory tokens needs {:.1} GB of RAM for the routing keys of {} \
                 router layers on both backends ({:.1} GB available): use fewer --memory-tokens",
                units::count(shapes.memory_tokens),
                gb(ram),
                shapes.router_layers,
                gb(free)
            );
        }
        // The same adapter with the projection variant its table does not choose, for comparison.
        let other = pollster::block_on(WgpuBackend::new(DeviceOptions {
            adapter: args.backend.adapter.clone(),
            variants: Some(gpu.capabilities().variants.other()),
            ..DeviceOptions::default()
        }))
        .context("opening the adapter a second time, with the other kernel variants")?;
        kernels::compare(
            &gpu,
            &other,
            cuda.as_ref(),
            &shapes,
            args.only.as_deref(),
            args.seed,
        )?
    };
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_string_pretty(&report)? + "\n")
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

struct BenchJob {
    args: BenchArgs,
    model_dir: PathBuf,
    cache: PathBuf,
}

/// The end of a synthetic bank's folder name: its size (the start is the model's weights digest).
fn bank_suffix(args: &BenchArgs) -> String {
    format!(
        "{}-tokens-{}-per-doc",
        args.memory_tokens, args.document_tokens
    )
}

/// Whether a synthetic bank of this size was generated before (for some model).
fn bank_cached(args: &BenchArgs, cache: &Path) -> bool {
    let suffix = bank_suffix(args);
    std::fs::read_dir(cache.join("banks")).is_ok_and(|entries| {
        entries
            .flatten()
            .any(|e| e.file_name().to_string_lossy().ends_with(&suffix))
    })
}

/// Opens the real bank, or the synthetic bank for this model and size (generating it once).
fn bank_for(job: &BenchJob, fingerprint: &MemoryFingerprint) -> Result<Bank> {
    let args = &job.args;
    if let Some(dir) = &args.bank {
        return Bank::open(dir, OpenOptions::default())
            .with_context(|| format!("opening bank {}", dir.display()));
    }
    let dir = job.cache.join("banks").join(format!(
        "{:08x}-{}",
        fingerprint.weights_digest,
        bank_suffix(args)
    ));
    // A run interrupted while generating leaves a smaller bank: never measure that one.
    let expected_tokens = args.memory_tokens / args.document_tokens * args.document_tokens;
    let fast = OpenOptions {
        // Generated here and checksummed when written; re-reading every byte would dominate.
        verify_checksums: false,
    };
    if dir.join("bank.json").is_file() {
        match Bank::open(&dir, fast) {
            Ok(bank)
                if bank.fingerprint() == fingerprint
                    && bank.token_count() as u64 == expected_tokens =>
            {
                return Ok(bank);
            }
            _ => {
                tracing::warn!("regenerating {}", dir.display());
                std::fs::remove_dir_all(&dir)?;
            }
        }
    }
    let spec = SyntheticSpec {
        fingerprint: fingerprint.clone(),
        memory_tokens: args.memory_tokens,
        document_tokens: args.document_tokens as usize,
        documents_per_segment: ((1 << 22) / args.document_tokens as usize).max(1),
        seed: args.seed,
    };
    let started = Instant::now();
    let bar = indicatif::ProgressBar::new(0);
    let mut written = 0;
    let result = synthetic::create(&dir, &spec, |p| {
        written += p.bytes;
        bar.set_message(format!(
            "generating the synthetic bank: {:.2} GB written",
            gb(written)
        ));
        bar.tick();
    });
    bar.finish_and_clear();
    if result.is_err() {
        // A half-written synthetic bank is only a cache entry: start over next time.
        let _ = std::fs::remove_dir_all(&dir);
    }
    let bank = result.with_context(|| format!("generating {}", dir.display()))?;
    tracing::info!(
        "generated {} ({:.2} GB) in {:.1} s",
        dir.display(),
        gb(written),
        started.elapsed().as_secs_f64()
    );
    Ok(bank)
}

fn random_ids(rng: &mut StdRng, count: usize, vocab: usize) -> Vec<u32> {
    (0..count)
        .map(|_| rng.random_range(0..vocab as u32))
        .collect()
}

/// Per-stage measurements of one run.
#[derive(Default)]
struct Totals {
    prefill: Duration,
    routing: Duration,
    fetch: Duration,
    scanned: u64,
    fetched: u64,
    decode: Duration,
    decoded: u64,
    /// Over the decode steps, where the backend counts its work.
    work: Option<WorkCounts>,
    /// Over the decode steps, where the backend times its kernels.
    kernels: Option<KernelTimes>,
}

impl Job for BenchJob {
    type Output = ();

    fn run<B: Device>(self, device: B, shards: Vec<B>) -> Result<()> {
        let args = &self.args;
        // Measured first, while the device's memory is free; without them the fractions are left out.
        let bandwidths = device.bandwidths().unwrap_or_else(|e| {
            tracing::warn!("could not measure the device's copy bandwidths: {e:#}");
            None
        });
        let started = Instant::now();
        let model = backend::load_model(&self.model_dir, device)?;
        pollster::block_on(model.backend.synchronize())?;
        let load_time = started.elapsed();
        let config = &model.config;
        let vocab = config.vocab_size;
        let mut rng = StdRng::seed_from_u64(args.seed);

        // Stage 1 on random documents.
        let template = random_ids(&mut rng, 3, vocab);
        let doc_tokens = (args.document_tokens.min(args.encode_tokens) as usize).max(1);
        let documents: Vec<Vec<u32>> = (0..(args.encode_tokens as usize / doc_tokens).max(1))
            .map(|_| random_ids(&mut rng, doc_tokens, vocab))
            .collect();
        let encoded_tokens: usize = documents.iter().map(Vec::len).sum();
        let started = Instant::now();
        let encoded =
            pollster::block_on(model.encode_token_documents(&template, &documents, |_| {}))?;
        pollster::block_on(model.backend.synchronize())?;
        let encode_time = started.elapsed();
        drop(encoded);

        // The memory: routing keys to the device(s), content in host pages.
        let fingerprint = model.memory_fingerprint()?;
        let bank = bank_for(&self, &fingerprint)?;
        let started = Instant::now();
        let remotes = crate::ask::connect_shards(&args.shards, &model.backend)?;
        let memory = model.open_memory_with(bank, shards, remotes)?;
        pollster::block_on(model.backend.synchronize())?;
        let open_time = started.elapsed();
        let memory_tokens = memory.bank().map_or(0, |b| b.token_count()) as u64;

        // Questions: routing-query tokens, then the template tail and response head roles.
        let mut totals = Totals::default();
        let options = GenerateOptions {
            max_tokens: args.decode_tokens as usize,
            stop_tokens: Some(Vec::new()), // random weights: decode the full count
            ..GenerateOptions::default()
        };
        for query in 0..args.queries {
            let ids = random_ids(&mut rng, args.query_tokens + 3, vocab);
            let mut roles = vec![TokenRole::Routing; args.query_tokens];
            roles.extend([TokenRole::Template, TokenRole::Template, TokenRole::Context]);
            let prompt = QueryPrompt { ids, roles };
            let started = Instant::now();
            let (session, logits) =
                pollster::block_on(model.prefill_query(&memory, &prompt, None))?;
            let prefill = started.elapsed();
            // Fetch from the plain prefill: a second one would find the pages warm.
            for stat in session.route_stats() {
                totals.fetch += stat.fetch_time;
                totals.fetched += stat.fetched_bytes;
            }
            let mut generation = model.generation(session, logits, &options)?;
            // The first token comes from the prefill's logits; time the ones that run the decode path.
            pollster::block_on(generation.next_token())?;
            // Kernel times first: reading them waits for the device, outside the counted window.
            let kernels_before = model.backend.kernel_times()?;
            let before = model.backend.work_counts();
            // Only the decode steps, for a profiler attached with its collection off (see
            // xtask/gpu-checks.sh).
            model.backend.profile_region(true);
            let started = Instant::now();
            let mut decoded = 0;
            while pollster::block_on(generation.next_token())?.is_some() {
                decoded += 1;
            }
            let decode = started.elapsed();
            model.backend.profile_region(false);
            if let (Some(before), Some(after)) = (before, model.backend.work_counts()) {
                let d = after.since(before);
                totals.work = Some(totals.work.map_or(d, |w| w.plus(d)));
            }
            if let (Some(before), Some(after)) = (kernels_before, model.backend.kernel_times()?) {
                let d = after.since(&before);
                totals.kernels = Some(totals.kernels.take().unwrap_or_default().plus(&d));
            }
            totals.prefill += prefill;
            totals.decode += decode;
            totals.decoded += decoded;
            // Routing and fetch from a second prefill of the question that times each layer's
            // routing alone (from an idle device), so the routing-key rate is the routing's own and
            // not the earlier layers' too; the plain prefill above is not slowed by those waits.
            drop(generation);
            let (timed, _) =
                pollster::block_on(model.prefill_query_timing_routing(&memory, &prompt))?;
            for stat in timed.route_stats() {
                totals.routing += stat.routing_time;
                totals.scanned += stat.scanned_bytes;
            }
            tracing::info!(
                "query {query}: prefill {:.1} ms, {decoded} tokens decoded in {:.1} ms",
                ms(prefill),
                ms(decode)
            );
        }
        let report = report(
            &self,
            &model,
            &memory,
            memory_tokens,
            Measured {
                bandwidths,
                load_time,
                encoded_tokens,
                encode_time,
                open_time,
                totals,
            },
        );
        print_report(&report);
        if let Some(path) = &args.json {
            std::fs::write(path, serde_json::to_string_pretty(&report)? + "\n")
                .with_context(|| format!("writing {}", path.display()))?;
            println!("JSON report written to {}", path.display());
        }
        Ok(())
    }
}

struct Measured {
    bandwidths: Option<backend::Bandwidths>,
    load_time: Duration,
    encoded_tokens: usize,
    encode_time: Duration,
    open_time: Duration,
    totals: Totals,
}

fn report<B: Device>(
    job: &BenchJob,
    model: &Model<B>,
    memory: &msa_engine::Memory<B>,
    memory_tokens: u64,
    m: Measured,
) -> serde_json::Value {
    let args = &job.args;
    let t = &m.totals;
    let queries = args.queries as f64;
    let router_layers = memory.fingerprint().router_layers.len();
    let layers = router_layers as f64;
    let per_token = |bytes: u64| bytes as f64 / memory_tokens.max(1) as f64;
    let per_decoded = |count: u64| (t.decoded > 0).then(|| count as f64 / t.decoded as f64);
    let work = t.work;
    // Decoding reads about every weight once per token (all but the embedding rows it does not look
    // up, when the embedding is not tied): the limit is the copy bandwidth over the checkpoint's bytes.
    let checkpoint_bytes = checkpoint_bytes(&job.model_dir);
    let routing_rate = gb(t.scanned) / t.routing.as_secs_f64().max(1e-9);
    let fetch_rate = gb(t.fetched) / t.fetch.as_secs_f64().max(1e-9);
    let decode_rate = t.decoded as f64 / t.decode.as_secs_f64().max(1e-9);
    let copy = m.bandwidths.map(|b| b.device_copy / 1e9);
    let host_to_device = m.bandwidths.and_then(|b| b.host_to_device).map(|b| b / 1e9);
    let decode_limit = copy
        .filter(|_| checkpoint_bytes > 0)
        .map(|c| c * 1e9 / checkpoint_bytes as f64);
    json!({
        "backend": model.backend.describe(),
        "devices": memory.devices(),
        "remote_shards": args.shards.len(),
        "model": {
            "source": match &args.model {
                Some(dir) => dir.display().to_string(),
                None => format!("preset {} (random bf16 weights)", args.preset.name()),
            },
            "parameters": model.config.parameter_count(),
            "load_s": m.load_time.as_secs_f64(),
        },
        "memory": {
            "source": match &args.bank {
                Some(dir) => dir.display().to_string(),
                None => "synthetic bank (random rows, the model's memory shapes)".to_string(),
            },
            "tokens": memory_tokens,
            "documents": memory.documents().len(),
            "chunks": memory.chunk_count(),
            "device_bytes": memory.device_bytes(),
            "host_bytes": memory.host_bytes(),
            "device_bytes_per_token": per_token(memory.device_bytes()),
            "host_bytes_per_token": per_token(memory.host_bytes()),
            "open_s": m.open_time.as_secs_f64(),
        },
        "stage1": {
            "tokens": m.encoded_tokens,
            "seconds": m.encode_time.as_secs_f64(),
            "tokens_per_second": m.encoded_tokens as f64 / m.encode_time.as_secs_f64().max(1e-9),
        },
        "routing": {
            "queries": args.queries,
            "query_tokens": args.query_tokens,
            "router_layers": router_layers,
            "ms_per_query": ms(t.routing) / queries,
            "ms_per_layer": ms(t.routing) / queries / layers,
            "gb_per_second": routing_rate,
            "of_device_copy": copy.map(|c| routing_rate / c),
            "timed": "alone: from an idle device (router projection done) to the top k on the host",
        },
        "fetch": {
            "mb_per_query": t.fetched as f64 / 1e6 / queries,
            "ms_per_query": ms(t.fetch) / queries,
            "gb_per_second": fetch_rate,
            "of_host_to_device": host_to_device.map(|h| fetch_rate / h),
        },
        "prefill": {
            "prompt_tokens": args.query_tokens + 3,
            "ms_per_query": ms(t.prefill) / queries,
        },
        "decode": {
            "tokens": t.decoded,
            "tokens_per_second": decode_rate,
            "checkpoint_bytes": checkpoint_bytes,
            "weight_streaming_limit_tokens_per_second": decode_limit,
            "of_weight_streaming_limit": decode_limit.map(|l| decode_rate / l),
            "dispatches_per_token": work.and_then(|w| per_decoded(w.dispatches)),
            "submits_per_token": work.and_then(|w| w.submits).and_then(per_decoded),
            "host_waits_per_token": work.and_then(|w| w.host_waits).and_then(|(n, _)| per_decoded(n)),
            "copies_per_token": work.and_then(|w| w.device_copies).and_then(|(n, _)| per_decoded(n)),
            "copied_bytes_per_token": work.and_then(|w| w.device_copies).and_then(|(_, b)| per_decoded(b)),
            "host_wait_ms_per_token": work
                .and_then(|w| w.host_waits)
                .and_then(|(_, time)| (t.decoded > 0).then(|| ms(time) / t.decoded as f64)),
            "kernels": t.kernels.as_ref().filter(|_| t.decoded > 0).map(|k| kernel_rows(k, t.decoded, decode_rate)),
        },
        "bandwidths": {
            "device_copy_gb_per_second": copy,
            "host_to_device_gb_per_second": host_to_device,
        },
        "peak_rss_bytes": peak_rss(),
    })
}

/// Bytes of the safetensors files of a model directory.
fn checkpoint_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.path().extension().is_some_and(|x| x == "safetensors"))
        .filter_map(|e| e.metadata().ok())
        .map(|m| m.len())
        .sum()
}

/// ` (0.42 of X)` when the fraction is known.
fn fraction(value: &serde_json::Value, of: &str) -> String {
    value
        .as_f64()
        .map(|v| format!(" ({v:.2} of {of})"))
        .unwrap_or_default()
}

/// Each timed kernel's launches and device time per decoded token, and its share of the token's
/// wall time, longest first.
fn kernel_rows(
    kernels: &KernelTimes,
    decoded: u64,
    tokens_per_second: f64,
) -> Vec<serde_json::Value> {
    let mut rows: Vec<_> = kernels.0.iter().collect();
    rows.sort_by(|a, b| b.1.time.cmp(&a.1.time).then(a.0.cmp(b.0)));
    let per_token = |x: f64| x / decoded as f64;
    rows.into_iter()
        .map(|(kernel, time)| {
            let seconds = per_token(time.time.as_secs_f64());
            json!({
                "kernel": kernel,
                "launches_per_token": per_token(time.launches as f64),
                "us_per_token": seconds * 1e6,
                "of_token": seconds * tokens_per_second,
            })
        })
        .collect()
}

/// The decode line's work counts: dispatches, and submits (wgpu) or the host's waits for the device
/// against the token's time (CUDA: a host that waits most of a token has queued its work faster
/// than the device runs it).
fn work_per_token(decode: &serde_json::Value) -> String {
    let Some(dispatches) = decode["dispatches_per_token"].as_f64() else {
        return "dispatches not counted on this backend".into();
    };
    let mut line = format!("{dispatches:.1} dispatches");
    if let Some(submits) = decode["submits_per_token"].as_f64() {
        line += &format!(", {submits:.1} submits");
    }
    if let (Some(waits), Some(wait_ms)) = (
        decode["host_waits_per_token"].as_f64(),
        decode["host_wait_ms_per_token"].as_f64(),
    ) {
        let token_ms = 1e3 / decode["tokens_per_second"].as_f64().unwrap_or(f64::NAN);
        line +=
            &format!(", {waits:.1} host waits ({wait_ms:.2} ms of the token's {token_ms:.2} ms)");
    }
    if let (Some(copies), Some(bytes)) = (
        decode["copies_per_token"].as_f64(),
        decode["copied_bytes_per_token"].as_f64(),
    ) {
        line += &format!(", {copies:.1} device copies ({:.1} KB)", bytes / 1e3);
    }
    line + " per token"
}

fn print_report(r: &serde_json::Value) {
    let f = |v: &serde_json::Value| v.as_f64().unwrap_or(f64::NAN);
    let memory = &r["memory"];
    let rows = [
        (
            "backend",
            match r["remote_shards"].as_u64().unwrap_or(0) {
                0 => format!(
                    "{} ({} device(s))",
                    r["backend"].as_str().unwrap_or(""),
                    r["devices"]
                ),
                remote => format!(
                    "{} ({} shard(s): {} here, {remote} on shard servers)",
                    r["backend"].as_str().unwrap_or(""),
                    r["devices"],
                    r["devices"].as_u64().unwrap_or(0).saturating_sub(remote)
                ),
            },
        ),
        (
            "model",
            format!(
                "{}, {} parameters, loaded in {:.2} s",
                r["model"]["source"].as_str().unwrap_or(""),
                units::count(f(&r["model"]["parameters"]) as u64),
                f(&r["model"]["load_s"])
            ),
        ),
        (
            "memory",
            format!(
                "{} tokens, {} documents, {} chunks, opened in {:.2} s",
                memory["tokens"],
                memory["documents"],
                memory["chunks"],
                f(&memory["open_s"])
            ),
        ),
        (
            "bytes per tier",
            format!(
                "device {} ({:.1} B/token), host {} ({:.1} B/token)",
                units::bytes(f(&memory["device_bytes"]) as u64),
                f(&memory["device_bytes_per_token"]),
                units::bytes(f(&memory["host_bytes"]) as u64),
                f(&memory["host_bytes_per_token"])
            ),
        ),
        (
            "stage 1",
            format!(
                "{:.0} tokens/s ({} tokens in {:.2} s)",
                f(&r["stage1"]["tokens_per_second"]),
                r["stage1"]["tokens"],
                f(&r["stage1"]["seconds"])
            ),
        ),
        (
            "routing",
            format!(
                "{:.2} ms per query, {:.3} ms per router layer, {:.2} GB/s of routing keys{} ({} query tokens; timed alone, from an idle device to the top k on the host)",
                f(&r["routing"]["ms_per_query"]),
                f(&r["routing"]["ms_per_layer"]),
                f(&r["routing"]["gb_per_second"]),
                fraction(&r["routing"]["of_device_copy"], "the device copy"),
                r["routing"]["query_tokens"]
            ),
        ),
        (
            "fetch",
            format!(
                "{} per query in {:.2} ms, {:.2} GB/s{}",
                units::bytes((f(&r["fetch"]["mb_per_query"]) * 1e6) as u64),
                f(&r["fetch"]["ms_per_query"]),
                f(&r["fetch"]["gb_per_second"]),
                fraction(
                    &r["fetch"]["of_host_to_device"],
                    "a pinned host-to-device copy"
                )
            ),
        ),
        (
            "prefill",
            format!(
                "{:.1} ms per query ({} prompt tokens, routing and fetch included)",
                f(&r["prefill"]["ms_per_query"]),
                r["prefill"]["prompt_tokens"]
            ),
        ),
        (
            "decode",
            format!(
                "{:.2} tokens/s over {} tokens{}; {}",
                f(&r["decode"]["tokens_per_second"]),
                r["decode"]["tokens"],
                fraction(
                    &r["decode"]["of_weight_streaming_limit"],
                    "streaming the weights at the copy bandwidth"
                ),
                work_per_token(&r["decode"])
            ),
        ),
        (
            "bandwidths",
            match r["bandwidths"]["device_copy_gb_per_second"].as_f64() {
                Some(copy) => format!(
                    "device copy {copy:.1} GB/s (read + written){}",
                    r["bandwidths"]["host_to_device_gb_per_second"]
                        .as_f64()
                        .map(|h| format!(", pinned host to device {h:.1} GB/s"))
                        .unwrap_or_default()
                ),
                None => "not measured on this backend".into(),
            },
        ),
        (
            "peak memory",
            match r["peak_rss_bytes"].as_f64() {
                Some(b) => format!("{:.2} GB resident", b / 1e9),
                None => "unknown".into(),
            },
        ),
    ];
    for (name, value) in rows {
        println!("{name:>15}  {value}");
    }
    if let Some(kernels) = r["decode"]["kernels"].as_array() {
        let total = |field: &str| kernels.iter().map(|k| f(&k[field])).sum::<f64>();
        println!(
            "decode kernels  {:.1} us of device time per token ({:.1}% of the token; the rest: uploads \
             and read-backs, which are not timed, and gaps between kernels), longest first (MSA_CUDA_TIME_KERNELS):",
            total("us_per_token"),
            100.0 * total("of_token")
        );
        for k in kernels {
            let kernel = k["kernel"].as_str().unwrap_or("");
            let unit = if kernel == msa_cuda::COPY_KERNEL {
                "copies  "
            } else {
                "launches"
            };
            println!(
                "{:>15}  {:>9.1} us {:>5.1}%  {:>5.1} {unit}  {kernel}",
                "",
                f(&k["us_per_token"]),
                100.0 * f(&k["of_token"]),
                f(&k["launches_per_token"]),
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_take_suffixes_and_refuse_nonsense() {
        assert_eq!(parse_count("1M"), Ok(1_000_000));
        assert_eq!(parse_count("250k"), Ok(250_000));
        assert_eq!(parse_count("4096"), Ok(4096));
        assert!(parse_count("0").is_err());
        assert!(parse_count("1.5M").is_err());
        assert!(parse_count("M").is_err());
        assert!(parse_count("99999999999G").is_err());
    }

    #[test]
    fn the_msa_4b_preset_has_the_published_parameter_count() {
        let text = preset_config(Preset::Msa4b).to_string();
        let config = ModelConfig::from_json_str(&text, "msa-4b").unwrap();
        // MSA-SPEC §1: the Qwen3-4B backbone has 4,022,468,096 parameters; the 18 router layers add
        // their router_q_proj (4096×2560) and router_k_proj (1024×2560).
        assert_eq!(
            config.parameter_count(),
            4_022_468_096 + 18 * (4096 * 2560 + 1024 * 2560)
        );
        let fp = MemoryFingerprint::of(&config, 0).unwrap();
        assert_eq!(fp, synthetic::msa_4b_fingerprint());
    }
}
