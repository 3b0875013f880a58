//! Choosing a backend and its devices, and running a command's work on it once, generically.

use std::path::Path;

use anyhow::{Context, Result, bail};
use clap::{Args, ValueEnum};
use msa_engine::{Backend, CpuBackend, Model};
use msa_wgpu::{DeviceOptions, ExecutionStats, WgpuBackend, wgpu};

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum BackendKind {
    /// wgpu on a GPU when one is found (a software adapter such as lavapipe does not count), else cpu.
    Auto,
    /// The CPU reference engine (f32 arithmetic, all cores).
    Cpu,
    /// Every op as a WGSL compute shader through wgpu (Vulkan, Metal, DX12, GL).
    Wgpu,
}

/// Where the model runs.
#[derive(Args, Clone, Debug)]
pub struct BackendArgs {
    /// Backend to run on.
    #[arg(long, value_enum, default_value_t = BackendKind::Auto)]
    pub backend: BackendKind,
    /// wgpu: a case-insensitive part of the adapter's name (see `msa devices`).
    #[arg(long, env = "WGPU_ADAPTER_NAME", value_name = "NAME")]
    pub adapter: Option<String>,
    /// Memory Parallel: shard the bank's routing keys over N devices (one per GPU where there are N
    /// GPUs; otherwise several devices on one adapter, or N CPU shards).
    #[arg(long, default_value_t = 1, value_name = "N", value_parser = clap::value_parser!(u16).range(1..))]
    pub devices: u16,
}

/// What the CLI needs from a backend beyond the engine's trait.
pub trait Device: Backend + Clone {
    /// Dispatch and submit counters, where the backend counts them.
    fn execution_stats(&self) -> Option<ExecutionStats>;
}

impl Device for CpuBackend {
    fn execution_stats(&self) -> Option<ExecutionStats> {
        None
    }
}

impl Device for WgpuBackend {
    fn execution_stats(&self) -> Option<ExecutionStats> {
        Some(self.stats())
    }
}

/// A command's work, written once for every backend.
pub trait Job {
    type Output;
    /// `shards` holds the Memory Parallel devices (empty for one device: the model's own).
    fn run<B: Device>(self, backend: B, shards: Vec<B>) -> Result<Self::Output>;
}

/// Opens the chosen backend (and its shards) and runs `job` on it.
pub fn run<J: Job>(args: &BackendArgs, job: J) -> Result<J::Output> {
    let devices = usize::from(args.devices);
    match resolve(args) {
        BackendKind::Cpu => {
            let cpu = CpuBackend::new();
            let shards = if devices > 1 {
                vec![cpu; devices]
            } else {
                Vec::new()
            };
            job.run(cpu, shards)
        }
        BackendKind::Wgpu => {
            let (primary, shards) = open_wgpu(args.adapter.clone(), devices)?;
            job.run(primary, shards)
        }
        BackendKind::Auto => unreachable!("resolved above"),
    }
}

/// The backend `args` asks for, with `auto` decided: never [`BackendKind::Auto`].
pub fn resolve(args: &BackendArgs) -> BackendKind {
    match args.backend {
        BackendKind::Auto => auto(args),
        kind => kind,
    }
}

/// `auto`: wgpu on a real GPU, else the CPU reference (which beats a software adapter).
fn auto(args: &BackendArgs) -> BackendKind {
    let adapters = pollster::block_on(msa_wgpu::matching_adapters(args.adapter.as_deref()));
    let gpu = adapters
        .iter()
        .map(|a| a.get_info())
        .find(|info| info.device_type != wgpu::DeviceType::Cpu);
    match gpu {
        Some(info) => {
            tracing::info!(adapter = %info.name, "backend auto: wgpu");
            BackendKind::Wgpu
        }
        None => {
            tracing::info!("backend auto: no GPU adapter, using the CPU reference");
            BackendKind::Cpu
        }
    }
}

/// The primary device and, for Memory Parallel, one device per shard: shard i on the i-th adapter of
/// the primary's kind (same API and device type: the other GPUs of a multi-GPU machine, never the GL
/// view of the same GPU), cycling when there are fewer such adapters than shards. Shard 0 is the
/// primary device itself.
pub fn open_wgpu(
    adapter: Option<String>,
    devices: usize,
) -> Result<(WgpuBackend, Vec<WgpuBackend>)> {
    let open = |index: usize| {
        pollster::block_on(WgpuBackend::new(DeviceOptions {
            adapter: adapter.clone(),
            index: Some(index),
            ..DeviceOptions::default()
        }))
        .context("opening a wgpu device")
    };
    let primary = open(0)?;
    if devices == 1 {
        return Ok((primary, Vec::new()));
    }
    // Indices as `DeviceOptions::index` counts them.
    let kind = primary.adapter_info();
    let peers: Vec<usize> = pollster::block_on(msa_wgpu::matching_adapters(adapter.as_deref()))
        .iter()
        .map(|a| a.get_info())
        .enumerate()
        .filter(|(_, info)| info.backend == kind.backend && info.device_type == kind.device_type)
        .map(|(index, _)| index)
        .collect();
    if peers.len() < devices {
        tracing::warn!(
            "{devices} devices asked for, {} adapter(s) like {} found: several shards share an adapter",
            peers.len(),
            kind.name
        );
    }
    let mut shards = vec![primary.clone()];
    for shard in 1..devices {
        shards.push(open(peers[shard % peers.len()])?);
    }
    Ok((primary, shards))
}

/// Loads a model directory onto `backend`, naming the directory in errors.
pub fn load_model<B: Backend>(dir: &Path, backend: B) -> Result<Model<B>> {
    if !dir.is_dir() {
        bail!("model directory {} does not exist", dir.display());
    }
    let started = std::time::Instant::now();
    let model =
        Model::load(dir, backend).with_context(|| format!("loading model {}", dir.display()))?;
    tracing::info!(
        "loaded {} in {:.2} s on {}",
        dir.display(),
        started.elapsed().as_secs_f64(),
        model.backend.describe()
    );
    Ok(model)
}
