//! `msa info` (a model or a bank) and `msa devices` (the wgpu adapters).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use clap::Args;
use msa_core::bank::{Bank, OpenOptions};
use msa_core::{Checkpoint, MemoryFingerprint, ModelConfig};
use serde_json::json;

use crate::units;

/// Summarise a model directory (config, parameters, dtype) or a bank (documents, tokens, bytes per
/// tier, the model it belongs to).
#[derive(Args)]
pub struct InfoArgs {
    /// A model directory (config.json, safetensors weights) or a bank directory (bank.json).
    #[arg(value_name = "MODEL_DIR|BANK_DIR")]
    path: PathBuf,
    /// Banks: also read every data file and check its CRC-32 (slow for large banks).
    #[arg(long)]
    verify: bool,
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
}

/// List the GPU adapters wgpu finds, with their backend, type, limits and features, then the CUDA devices
/// (or why CUDA is not available).
#[derive(Args)]
pub struct DevicesArgs {
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
}

pub fn info(args: InfoArgs) -> Result<()> {
    let path = &args.path;
    let report = if path.join("bank.json").is_file() {
        bank_report(path, args.verify)?
    } else if path.join("config.json").is_file() {
        model_report(path)?
    } else if path.exists() {
        bail!(
            "{} is neither a model directory (no config.json) nor a bank (no bank.json)",
            path.display()
        );
    } else {
        bail!("{} does not exist", path.display());
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_text(&report, 0);
    }
    Ok(())
}

/// Prints a JSON object as indented `key: value` lines.
fn print_text(value: &serde_json::Value, indent: usize) {
    let Some(map) = value.as_object() else { return };
    for (key, value) in map {
        let pad = " ".repeat(indent);
        match value {
            serde_json::Value::Object(_) => {
                println!("{pad}{key}:");
                print_text(value, indent + 2);
            }
            serde_json::Value::String(s) => println!("{pad}{key}: {s}"),
            other => println!("{pad}{key}: {other}"),
        }
    }
}

fn model_report(dir: &Path) -> Result<serde_json::Value> {
    let config = ModelConfig::from_file(dir.join("config.json"))?;
    let checkpoint = Checkpoint::open(dir)
        .with_context(|| format!("opening the weights in {}", dir.display()))?;
    checkpoint.validate(&config)?;
    // Stored dtypes with their parameter counts: "bf16" for a released checkpoint.
    let mut dtypes: BTreeMap<String, usize> = BTreeMap::new();
    let mut stored = 0usize;
    for name in checkpoint.tensor_names() {
        let tensor = checkpoint.tensor(name)?;
        *dtypes
            .entry(format!("{:?}", tensor.dtype).to_lowercase())
            .or_default() += tensor.element_count();
        stored += tensor.bytes.len();
    }
    let msa = config.msa.as_ref().map(|m| {
        json!({
            "router layers": format!("{} of {} ({})", m.router_layers.len(), config.num_hidden_layers, ranges(&m.router_layers)),
            "pooling kernel": m.pooling_kernel_size,
            "documents per query (doc_top_k)": m.doc_top_k,
            "score mode": format!("{:?}", m.score_mode),
            "reductions (head, query, chunk)": format!("{:?}, {:?}, {:?}", m.head_reduce, m.query_reduce, m.chunk_reduce),
            "decoupled router": m.decouple_router,
        })
    });
    let tokenizer = dir.join("tokenizer.json");
    Ok(json!({
        "model": dir.display().to_string(),
        "type": config.model_type,
        "layers": config.num_hidden_layers,
        "hidden size": config.hidden_size,
        "heads (query / key-value)": format!("{} / {} of {}", config.num_attention_heads, config.num_key_value_heads, config.head_dim),
        "intermediate size": config.intermediate_size,
        "vocabulary": config.vocab_size,
        "parameters": format!("{} ({})", config.parameter_count(), units::count(config.parameter_count() as u64)),
        "dtype": dtypes.keys().cloned().collect::<Vec<_>>().join(", "),
        "weights": units::bytes(stored as u64),
        "tied embeddings": config.tie_word_embeddings,
        "rope theta": config.rope_theta,
        "tokenizer": if tokenizer.is_file() { "tokenizer.json" } else { "none (token ids only)" },
        "msa": msa.unwrap_or_else(|| json!("none: a dense Qwen3 model (no memory)")),
    }))
}

/// `2..=3, 7` style.
fn ranges(values: &[usize]) -> String {
    let mut parts = Vec::new();
    let mut i = 0;
    while i < values.len() {
        let mut j = i;
        while j + 1 < values.len() && values[j + 1] == values[j] + 1 {
            j += 1;
        }
        parts.push(if i == j {
            values[i].to_string()
        } else {
            format!("{}..={}", values[i], values[j])
        });
        i = j + 1;
    }
    parts.join(", ")
}

/// Bytes of one tier of a bank: routing keys (device) or content K̄/V̄ (host).
pub fn tier_bytes(fingerprint: &MemoryFingerprint, chunks: u64) -> (u64, u64) {
    let per_layer = chunks * fingerprint.row_bytes() as u64;
    let layers = fingerprint.router_layers.len() as u64;
    (per_layer * layers, 2 * per_layer * layers)
}

fn bank_report(dir: &Path, verify: bool) -> Result<serde_json::Value> {
    let bank = Bank::open(
        dir,
        OpenOptions {
            verify_checksums: verify,
        },
    )?;
    let fp = bank.fingerprint();
    let tokens = bank.token_count() as u64;
    let (device, host) = tier_bytes(fp, u64::from(bank.chunk_count()));
    let tier = |bytes: u64| match tokens {
        0 => units::bytes(bytes),
        t => format!(
            "{}, {:.1} B per token",
            units::bytes(bytes),
            bytes as f64 / t as f64
        ),
    };
    Ok(json!({
        "bank": dir.display().to_string(),
        "documents": bank.documents().len(),
        "tokens": tokens,
        "chunks": bank.chunk_count(),
        "segments": bank.manifest().segments.len(),
        // What shard servers and their clients compare: equal on two copies of the same bank.
        "content digest": format!("{:08x}", bank.manifest().content_digest()),
        "device tier (routing keys)": tier(device),
        "host tier (content K/V)": tier(host),
        "checksums": if verify { "verified" } else { "not read (--verify reads every file)" },
        "model": {
            "layers": fp.num_hidden_layers,
            "hidden size": fp.hidden_size,
            "router layers": ranges(&fp.router_layers),
            "key-value heads": format!("{} of {}", fp.num_key_value_heads, fp.head_dim),
            "pooling kernel": fp.pooling_kernel_size,
            "score mode": format!("{:?}", fp.score_mode),
            "weights digest": format!("{:08x}", fp.weights_digest),
        },
    }))
}

pub fn devices(args: DevicesArgs) -> Result<()> {
    let adapters = pollster::block_on(msa_wgpu::list_adapters());
    let reports: Vec<serde_json::Value> = adapters
        .iter()
        .enumerate()
        .map(|(index, adapter)| {
            let info = adapter.get_info();
            let limits = adapter.limits();
            let features = adapter.features();
            let has = |f| features.contains(f);
            use msa_wgpu::wgpu::Features;
            json!({
                "index": index,
                "name": info.name,
                "backend": format!("{:?}", info.backend),
                "type": format!("{:?}", info.device_type),
                "driver": format!("{} {}", info.driver, info.driver_info).trim().to_string(),
                "max storage binding MiB": limits.max_storage_buffer_binding_size >> 20,
                "max buffer MiB": limits.max_buffer_size >> 20,
                "max workgroup invocations": limits.max_compute_invocations_per_workgroup,
                "workgroup memory KiB": limits.max_compute_workgroup_storage_size >> 10,
                "shader-f16": has(Features::SHADER_F16),
                "subgroups": if has(Features::SUBGROUP) {
                    json!(format!("{}..={}", info.subgroup_min_size, info.subgroup_max_size))
                } else {
                    json!(false)
                },
                "timestamps": has(Features::TIMESTAMP_QUERY),
            })
        })
        .collect();
    // CUDA devices follow the wgpu adapters, with "backend": "CUDA"; none where CUDA is unavailable.
    let wgpu_adapters = reports.len();
    let cuda = msa_cuda::devices();
    let mut reports = reports;
    // NCCL carries Memory Parallel's router queries between the GPUs of one process.
    let nccl = match (msa_cuda::nccl_version(), msa_cuda::nccl_missing()) {
        (Ok(version), _) => version,
        (Err(_), Some(_)) => "not found (libnccl.so)".into(),
        (Err(e), None) => e.to_string(),
    };
    for device in cuda.iter().flatten() {
        let (major, minor) = device.compute_capability;
        reports.push(json!({
            "index": device.ordinal,
            "name": device.name,
            "backend": "CUDA",
            "compute capability": format!("{major}.{minor}"),
            "memory MiB": device.memory_bytes >> 20,
            "NCCL": nccl,
        }));
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&reports)?);
        return Ok(());
    }
    if wgpu_adapters == 0 {
        println!(
            "no wgpu adapters found: install your GPU's Vulkan/Metal/DX12 driver, or Mesa's lavapipe \
             (Debian: apt-get install mesa-vulkan-drivers libvulkan1) for a software adapter; \
             `--backend cpu` runs without one"
        );
    }
    for report in &reports {
        let map = report.as_object().expect("an object");
        println!("[{}] {}", map["index"], map["name"].as_str().unwrap_or(""));
        for (key, value) in map.iter().filter(|(k, _)| *k != "index" && *k != "name") {
            match value {
                serde_json::Value::String(s) => println!("    {key}: {s}"),
                other => println!("    {key}: {other}"),
            }
        }
    }
    if let Err(e) = &cuda {
        println!("{e}");
    }
    Ok(())
}
