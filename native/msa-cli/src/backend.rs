//! Choosing a backend and its devices, and running a command's work on it once, generically.

use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::{Args, ValueEnum};
use msa_cuda::{CudaBackend, CudaOptions, KernelTimes};
use msa_engine::{Backend, CpuBackend, Model};
use msa_wgpu::{DeviceOptions, WgpuBackend, wgpu};

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum BackendKind {
    /// cuda on an NVIDIA GPU with the CUDA libraries, else wgpu on a GPU (a software adapter such as
    /// lavapipe does not count), else cpu.
    Auto,
    /// The CPU reference engine (f32 arithmetic, all cores).
    Cpu,
    /// Every op as a WGSL compute shader through wgpu (Vulkan, Metal, DX12, GL).
    Wgpu,
    /// NVIDIA GPUs through CUDA (driver, NVRTC and cuBLAS loaded at run time): cuBLAS GEMMs on tensor
    /// cores, NVRTC kernels for the rest.
    Cuda,
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
    /// GPUs; otherwise several devices on one GPU, or N CPU shards).
    #[arg(long, default_value_t = 1, value_name = "N", value_parser = clap::value_parser!(u16).range(1..))]
    pub devices: u16,
}

/// What a device can move, measured in the same run as a benchmark: the denominators of its fractions.
#[derive(Clone, Copy, Debug)]
pub struct Bandwidths {
    /// A device-to-device copy, counting the bytes read and written, in bytes/s.
    pub device_copy: f64,
    /// A copy from pinned host memory to the device, in bytes/s, where the backend measures it.
    pub host_to_device: Option<f64>,
}

/// Device work a backend counts since it opened, for figures per decoded token.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct WorkCounts {
    /// Compute dispatches (wgpu), or kernel launches and cuBLAS calls (CUDA).
    pub dispatches: u64,
    /// Queue submissions (wgpu).
    pub submits: Option<u64>,
    /// The host's waits for the device, and the time it spent in them (CUDA).
    pub host_waits: Option<(u64, Duration)>,
    /// Copies between device buffers, and the bytes they wrote (wgpu and CUDA).
    pub device_copies: Option<(u64, u64)>,
}

impl WorkCounts {
    /// The work between an `earlier` reading and this one.
    pub fn since(self, earlier: WorkCounts) -> WorkCounts {
        WorkCounts {
            dispatches: self.dispatches - earlier.dispatches,
            submits: self.submits.zip(earlier.submits).map(|(a, b)| a - b),
            host_waits: (self.host_waits.zip(earlier.host_waits))
                .map(|((n, t), (m, u))| (n - m, t.saturating_sub(u))),
            device_copies: (self.device_copies.zip(earlier.device_copies))
                .map(|((n, b), (m, c))| (n - m, b - c)),
        }
    }

    /// These counts and `other`'s (of the same backend) together.
    pub fn plus(self, other: WorkCounts) -> WorkCounts {
        WorkCounts {
            dispatches: self.dispatches + other.dispatches,
            submits: self.submits.zip(other.submits).map(|(a, b)| a + b),
            host_waits: (self.host_waits.zip(other.host_waits))
                .map(|((n, t), (m, u))| (n + m, t + u)),
            device_copies: (self.device_copies.zip(other.device_copies))
                .map(|((n, b), (m, c))| (n + m, b + c)),
        }
    }
}

/// What the CLI needs from a backend beyond the engine's trait.
pub trait Device: Backend + Clone + Send + 'static {
    /// The backend's work counts, where it keeps them.
    fn work_counts(&self) -> Option<WorkCounts>;
    /// Measures the device's [`Bandwidths`] (a GPU backend; `None` for the CPU reference).
    fn bandwidths(&self) -> Result<Option<Bandwidths>>;
    /// Starts (`true`) or stops the region an attached profiler records, where the backend has one
    /// (CUDA: `ncu --profile-from-start off`); a no-op elsewhere. A failure only warns: it changes
    /// nothing but what a profiler sees.
    fn profile_region(&self, _on: bool) {}
    /// Each kernel's launches and device time so far, where the backend times them (CUDA with
    /// `MSA_CUDA_TIME_KERNELS=1`).
    fn kernel_times(&self) -> Result<Option<KernelTimes>> {
        Ok(None)
    }
}

impl Device for CpuBackend {
    fn work_counts(&self) -> Option<WorkCounts> {
        None
    }

    fn bandwidths(&self) -> Result<Option<Bandwidths>> {
        Ok(None)
    }
}

impl Device for WgpuBackend {
    fn work_counts(&self) -> Option<WorkCounts> {
        let stats = self.stats();
        Some(WorkCounts {
            dispatches: stats.dispatches,
            submits: Some(stats.submits),
            host_waits: None,
            device_copies: Some((stats.copies, stats.copied_bytes)),
        })
    }

    fn bandwidths(&self) -> Result<Option<Bandwidths>> {
        use msa_wgpu::probe::{Probe, RooflineProbe};
        let probe = RooflineProbe::new(self)?;
        let seconds = pollster::block_on(probe.seconds(Probe::Copy))?;
        Ok(Some(Bandwidths {
            device_copy: probe.work(Probe::Copy) / seconds,
            host_to_device: None,
        }))
    }
}

impl Device for CudaBackend {
    fn work_counts(&self) -> Option<WorkCounts> {
        let counts = self.execution_counts();
        Some(WorkCounts {
            dispatches: counts.launches,
            submits: None,
            host_waits: Some((counts.host_waits, counts.host_wait)),
            device_copies: Some((counts.copies, counts.copied_bytes)),
        })
    }

    fn bandwidths(&self) -> Result<Option<Bandwidths>> {
        let roofline = self.measure_roofline()?;
        Ok(Some(Bandwidths {
            device_copy: roofline.device_copy_bytes_per_s,
            host_to_device: Some(roofline.host_to_device_bytes_per_s),
        }))
    }

    fn profile_region(&self, on: bool) {
        if let Err(e) = CudaBackend::profile_region(self, on) {
            tracing::warn!("could not mark the region a profiler records: {e:#}");
        }
    }

    fn kernel_times(&self) -> Result<Option<KernelTimes>> {
        Ok(CudaBackend::kernel_times(self)?)
    }
}

/// A command's work, written once for every backend.
pub trait Job {
    type Output;
    /// `shards` holds the Memory Parallel devices (empty for one device: the model's own).
    fn run<B: Device>(self, backend: B, shards: Vec<B>) -> Result<Self::Output>;
}

/// Opens the chosen backend (and its shards) and runs `job` on it. `auto` tries CUDA first, opening
/// it (kernels compiled, cuBLAS started) once: the device it opened is the one the job runs on.
pub fn run<J: Job>(args: &BackendArgs, job: J) -> Result<J::Output> {
    let devices = usize::from(args.devices);
    let kind = match args.backend {
        // The first GPU decides; once it has opened, a shard that fails to is an error.
        BackendKind::Auto => match open_cuda_primary() {
            Ok(primary) => {
                tracing::info!("backend auto: {}", primary.describe());
                let (primary, shards) = cuda_shards(primary, devices)?;
                return job.run(primary, shards);
            }
            Err(e) => {
                // A device the driver reports but that fails to open is worth a warning: the run
                // was sized for it (see `resolve`).
                if msa_cuda::device_count().is_ok_and(|gpus| gpus > 0) {
                    tracing::warn!(
                        "backend auto: the CUDA device failed to open ({e:#}); not using CUDA"
                    );
                } else {
                    tracing::info!("backend auto: no CUDA ({e:#})");
                }
                auto_without_cuda(args)
            }
        },
        kind => kind,
    };
    match kind {
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
        BackendKind::Cuda => {
            let (primary, shards) = open_cuda(devices)?;
            job.run(primary, shards)
        }
        BackendKind::Auto => unreachable!("resolved above"),
    }
}

/// The backend `args` asks for, with `auto` decided without opening anything (to size a run before
/// it starts): CUDA where the driver reports a device. Never [`BackendKind::Auto`]; [`run`] decides
/// `auto` the same way unless the CUDA device then fails to open.
pub fn resolve(args: &BackendArgs) -> BackendKind {
    match args.backend {
        BackendKind::Auto => match msa_cuda::device_count() {
            Ok(gpus) if gpus > 0 => BackendKind::Cuda,
            _ => auto_without_cuda(args),
        },
        kind => kind,
    }
}

/// `auto` where CUDA is not available: wgpu on a real GPU, else the CPU reference (which beats a
/// software adapter).
fn auto_without_cuda(args: &BackendArgs) -> BackendKind {
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

/// The primary CUDA device and, for Memory Parallel, one per shard: shard i on GPU i, cycling when
/// there are fewer GPUs than shards. Shard 0 is the primary device itself.
pub fn open_cuda(devices: usize) -> Result<(CudaBackend, Vec<CudaBackend>)> {
    cuda_shards(open_cuda_primary()?, devices)
}

fn open_cuda_device(ordinal: usize) -> Result<CudaBackend> {
    let options = CudaOptions {
        ordinal,
        trim_pool: env_flag("MSA_CUDA_TRIM_POOL"),
        cublas_routing: env_flag("MSA_CUDA_ROUTING_CUBLAS"),
        time_kernels: env_flag("MSA_CUDA_TIME_KERNELS"),
    };
    CudaBackend::new(options).context("opening a CUDA device")
}

/// Whether an environment variable is set to something other than empty or `0`.
fn env_flag(name: &str) -> bool {
    std::env::var_os(name).is_some_and(|v| !v.is_empty() && v != "0")
}

/// GPU 0, the primary device.
fn open_cuda_primary() -> Result<CudaBackend> {
    let gpus = msa_cuda::device_count().context("opening a CUDA device")?;
    anyhow::ensure!(gpus > 0, "the CUDA driver reports no device");
    open_cuda_device(0)
}

/// `primary` and the Memory Parallel shards beside it (shard 0 is the primary itself), cycling over
/// the GPUs; none for one device. Shards on GPUs of their own join an NCCL clique where NCCL loads,
/// so the router queries reach them device to device; otherwise through the host.
fn cuda_shards(primary: CudaBackend, devices: usize) -> Result<(CudaBackend, Vec<CudaBackend>)> {
    if devices == 1 {
        return Ok((primary, Vec::new()));
    }
    let gpus = msa_cuda::device_count().context("opening a CUDA device")?;
    let mut shards = vec![primary];
    for shard in 1..devices {
        shards.push(open_cuda_device(shard % gpus)?);
    }
    if gpus < devices {
        tracing::warn!(
            "{devices} devices asked for, {gpus} CUDA GPU(s) found: several shards share a GPU, and \
             the router queries reach them through the host (NCCL takes one device per GPU)"
        );
    } else if let Some(missing) = msa_cuda::nccl_missing() {
        tracing::info!("router queries reach the shards through the host: {missing}");
    } else if let Err(e) = CudaBackend::join_clique(&mut shards) {
        tracing::warn!("router queries reach the shards through the host: {e:#}");
    } else {
        tracing::info!("router queries reach the {devices} shards over NCCL");
    }
    Ok((shards[0].clone(), shards))
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
