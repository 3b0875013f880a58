//! Opening a CUDA device: the run-time libraries, the context and stream, cuBLAS, and the kernels.

use std::collections::HashMap;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::{Arc, Mutex};

use cudarc::cublas::CudaBlas;
use cudarc::driver::{CudaContext, CudaFunction, CudaStream, DriverError, LaunchConfig};
use cudarc::nvrtc::{CompileError, CompileOptions, Ptx};
use msa_engine::{Error, Result};

/// The CUDA source of every kernel.
const SOURCE: &str = include_str!("kernels.cu");

/// Every kernel entry point of [`SOURCE`], loaded when a device opens.
pub const KERNELS: &[&str] = &[
    "gather_f32",
    "gather_bf16",
    "gather_f16",
    "matmul_small_f32",
    "matmul_small_bf16",
    "matmul_small_f16",
    "round_bf16",
    "round_f16",
    "rms_norm_f32",
    "rms_norm_bf16",
    "rms_norm_f16",
    "l2_normalize",
    "rope",
    "attention",
    "silu_mul",
    "add",
    "chunk_mean_pool",
    "routing_query",
    "routing_reduce",
    "routing_chunks_f32",
    "routing_chunks_bf16",
    "routing_chunks_f16",
    "routing_documents",
];

/// Which device to open.
#[derive(Clone, Debug, Default)]
pub struct CudaOptions {
    /// The CUDA device ordinal (0 = the first GPU, as `nvidia-smi` numbers them).
    pub ordinal: usize,
}

/// The first missing run-time library, named with what to install, or `None` when the driver, NVRTC
/// and cuBLAS can all be loaded. Checked before any CUDA call, since cudarc panics on a missing library.
pub fn libraries_missing() -> Option<String> {
    // SAFETY: each check only tries to dlopen the library by its usual names.
    let (driver, nvrtc, cublas) = unsafe {
        (
            cudarc::driver::sys::is_culib_present(),
            cudarc::nvrtc::sys::is_culib_present(),
            cudarc::cublas::sys::is_culib_present(),
        )
    };
    if !driver {
        Some("no NVIDIA driver found (libcuda.so could not be loaded)".into())
    } else if !nvrtc {
        Some(
            "CUDA's run-time compiler libnvrtc.so could not be loaded: install the CUDA toolkit (or the \
             nvidia-cuda-nvrtc wheel) and put its lib folder on LD_LIBRARY_PATH"
                .into(),
        )
    } else if !cublas {
        Some(
            "cuBLAS (libcublas.so) could not be loaded: install the CUDA toolkit (or the nvidia-cublas \
             wheel) and put its lib folder on LD_LIBRARY_PATH"
                .into(),
        )
    } else {
        None
    }
}

/// Whether NVRTC alone can be loaded (enough for [`compile_kernels`], no GPU needed).
pub fn nvrtc_present() -> bool {
    // SAFETY: only tries to dlopen the library.
    unsafe { cudarc::nvrtc::sys::is_culib_present() }
}

/// The number of CUDA devices, or why there are none usable.
pub fn device_count() -> Result<usize> {
    if let Some(missing) = libraries_missing() {
        return Err(unavailable(missing));
    }
    let count = guarded(CudaContext::device_count).and_then(|r| {
        r.map_err(|e| unavailable(format!("the CUDA driver failed to start: {e}")))
    })?;
    Ok(count as usize)
}

fn unavailable(message: impl Into<String>) -> Error {
    Error::Device {
        backend: "cuda".into(),
        message: message.into(),
    }
}

/// Runs a CUDA call that cudarc may turn into a panic (a library without an expected symbol).
fn guarded<T>(call: impl FnOnce() -> T) -> Result<T> {
    catch_unwind(AssertUnwindSafe(call)).map_err(|panic| {
        let detail = panic
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| panic.downcast_ref::<&str>().copied())
            .unwrap_or("unknown panic");
        unavailable(format!("a CUDA library call failed: {detail}"))
    })
}

/// Compiles every kernel to PTX for compute capability `major.minor`. Compiled once per process and
/// architecture; NVRTC alone is needed (no GPU), so the kernels can be checked on any machine with it.
pub fn compile_kernels(major: u32, minor: u32) -> Result<String> {
    static CACHE: Mutex<Option<HashMap<(u32, u32), String>>> = Mutex::new(None);
    if !nvrtc_present() {
        return Err(unavailable(
            "CUDA's run-time compiler libnvrtc.so could not be loaded",
        ));
    }
    let mut cache = CACHE
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    let cache = cache.get_or_insert_with(HashMap::new);
    if let Some(ptx) = cache.get(&(major, minor)) {
        return Ok(ptx.clone());
    }
    let started = std::time::Instant::now();
    let options = CompileOptions {
        options: vec![format!("--gpu-architecture=compute_{major}{minor}")],
        name: Some("msa_kernels.cu".into()),
        ..Default::default()
    };
    let ptx = guarded(|| cudarc::nvrtc::compile_ptx_with_opts(SOURCE, options))?
        .map_err(|e| {
            let detail = match e {
                CompileError::CompileError { log, .. } => log.to_string_lossy().into_owned(),
                other => other.to_string(),
            };
            unavailable(format!(
                "NVRTC could not compile the kernels for sm_{major}{minor}: {detail}"
            ))
        })?
        .to_src();
    tracing::debug!(
        "compiled the CUDA kernels for sm_{major}{minor} in {:.2} s",
        started.elapsed().as_secs_f64()
    );
    cache.insert((major, minor), ptx.clone());
    Ok(ptx)
}

/// An open device: one context, one stream every op is queued on, cuBLAS bound to it, the kernels.
pub(crate) struct Device {
    pub(crate) name: String,
    pub(crate) stream: Arc<CudaStream>,
    pub(crate) blas: CudaBlas,
    kernels: HashMap<&'static str, CudaFunction>,
}

impl Device {
    pub(crate) fn open(options: &CudaOptions) -> Result<Device> {
        let count = device_count()?;
        if options.ordinal >= count {
            return Err(unavailable(format!(
                "CUDA device {} asked for, {count} found",
                options.ordinal
            )));
        }
        guarded(|| Device::open_checked(options.ordinal))?
    }

    fn open_checked(ordinal: usize) -> Result<Device> {
        let started = |e: DriverError| unavailable(format!("opening CUDA device {ordinal}: {e}"));
        let ctx = CudaContext::new(ordinal).map_err(started)?;
        // One stream orders every op, so cudarc's per-allocation events are pure overhead.
        // SAFETY: no other stream ever touches this context's allocations.
        unsafe { ctx.disable_event_tracking() };
        let (major, minor) = ctx.compute_capability().map_err(started)?;
        let device_name = ctx.name().map_err(started)?;
        let name = format!("{device_name} (sm_{major}{minor}, CUDA device {ordinal})");
        let ptx = compile_kernels(major as u32, minor as u32)?;
        let module = ctx.load_module(Ptx::from_src(ptx)).map_err(started)?;
        let kernels = KERNELS
            .iter()
            .map(|&kernel| Ok((kernel, module.load_function(kernel).map_err(started)?)))
            .collect::<Result<_>>()?;
        let stream = ctx.default_stream();
        let blas = CudaBlas::new(stream.clone())
            .map_err(|e| unavailable(format!("starting cuBLAS on CUDA device {ordinal}: {e}")))?;
        tracing::info!("opened {name}");
        Ok(Device {
            name,
            stream,
            blas,
            kernels,
        })
    }

    pub(crate) fn kernel(&self, name: &str) -> &CudaFunction {
        &self.kernels[name]
    }

    /// Maps a driver error to the engine's, naming this device.
    pub(crate) fn error(&self, e: impl std::fmt::Display) -> Error {
        let message = e.to_string();
        if message.contains("OUT_OF_MEMORY") {
            Error::OutOfDeviceMemory {
                backend: format!("cuda: {}", self.name),
                detail: message,
            }
        } else {
            Error::Device {
                backend: format!("cuda: {}", self.name),
                message,
            }
        }
    }
}

/// Threads per block of the grid-stride and warp-per-item kernels.
pub(crate) const BLOCK: u32 = 256;

/// Enough blocks for `threads` threads of a grid-stride loop (capped: the loop covers the rest).
pub(crate) fn grid_for_threads(threads: u64) -> LaunchConfig {
    let blocks = threads.div_ceil(u64::from(BLOCK)).clamp(1, 1 << 20) as u32;
    LaunchConfig {
        grid_dim: (blocks, 1, 1),
        block_dim: (BLOCK, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// One warp per item.
pub(crate) fn grid_for_warps(items: u64) -> LaunchConfig {
    grid_for_threads(items * 32)
}
