//! Opening a CUDA device: the run-time libraries, the context and stream, cuBLAS, and the kernels.

use std::collections::HashMap;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::{Arc, Mutex};

use cudarc::cublas::CudaBlas;
use cudarc::driver::sys::{CUdevice_attribute, CUevent_flags};
use cudarc::driver::{
    CudaContext, CudaEvent, CudaFunction, CudaSlice, CudaStream, DevicePtr, DevicePtrMut,
    DeviceRepr, DriverError, LaunchConfig, PinnedHostSlice, ValidAsZeroBits,
};
use cudarc::nvrtc::{Ptx, result as nvrtc, sys as nvrtc_sys};
use msa_engine::backend::{PieceWriter, gather_pieces};
use msa_engine::{Error, Result};

use crate::counts::{Counters, KernelTimer, KernelTimes};

pub use crate::kernel_abi::KERNELS;
pub(crate) use crate::kernel_abi::{
    ATTENTION_WARPS, MAX_PER_LANE, ROUTING_MMA_WARPS, SMALL_ROWS, TOP_K_ITEMS, TOP_K_THREADS,
    kernel_defines,
};

/// The CUDA source of every kernel.
const SOURCE: &str = include_str!("kernels.cu");

/// Which device to open, and how.
#[derive(Clone, Debug, Default)]
pub struct CudaOptions {
    /// The CUDA device ordinal (0 = the first GPU, in the CUDA driver's
    /// order: `nvidia-smi`'s where `CUDA_DEVICE_ORDER=PCI_BUS_ID`).
    pub ordinal: usize,
    /// Hand the memory pool's unused memory back to the driver at every synchronisation (CUDA's
    /// default), for a GPU shared with other processes. By default the pool keeps it: every decode
    /// step and router layer synchronises once, and regrowing the pool after each costs driver calls
    /// that map memory again.
    pub trim_pool: bool,
    /// Score a head mean's routing with cuBLAS and a reduction kernel (the path a head max takes)
    /// instead of the fused tensor-core kernel `routing_mma`: for comparison, as `msa` does with
    /// `MSA_CUDA_ROUTING_CUBLAS=1`.
    pub cublas_routing: bool,
    /// Time every kernel launch, cuBLAS call and device copy with a pair of CUDA events, per kernel
    /// ([`CudaBackend::kernel_times`](crate::CudaBackend::kernel_times)): a profile without a
    /// profiler, as `msa bench` prints with `MSA_CUDA_TIME_KERNELS=1`. Each launch then records two
    /// events more, and when 4,096 of them have not been added up the host waits for them.
    pub time_kernels: bool,
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

/// One CUDA device as the driver reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CudaDeviceInfo {
    pub ordinal: usize,
    pub name: String,
    /// (major, minor), e.g. (9, 0) for Hopper.
    pub compute_capability: (i32, i32),
    pub memory_bytes: usize,
}

/// Every CUDA device, or why there are none usable (`msa devices` lists them).
pub fn devices() -> Result<Vec<CudaDeviceInfo>> {
    let count = device_count()?;
    let describe = |ordinal: usize| -> std::result::Result<CudaDeviceInfo, DriverError> {
        let ctx = CudaContext::new(ordinal)?;
        Ok(CudaDeviceInfo {
            ordinal,
            name: ctx.name()?,
            compute_capability: ctx.compute_capability()?,
            memory_bytes: ctx.total_mem()?,
        })
    };
    guarded(|| {
        (0..count)
            .map(describe)
            .collect::<std::result::Result<Vec<_>, _>>()
    })?
    .map_err(|e| unavailable(format!("reading the CUDA devices' properties: {e}")))
}

pub(crate) fn unavailable(message: impl Into<String>) -> Error {
    Error::Device {
        backend: "cuda".into(),
        message: message.into(),
    }
}

/// Runs a CUDA call that cudarc may turn into a panic (a library without an expected symbol).
pub(crate) fn guarded<T>(call: impl FnOnce() -> T) -> Result<T> {
    catch_unwind(AssertUnwindSafe(call)).map_err(|panic| {
        let detail = panic
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| panic.downcast_ref::<&str>().copied())
            .unwrap_or("unknown panic");
        unavailable(format!("a CUDA library call failed: {detail}"))
    })
}

/// Threads of a warp (every NVIDIA GPU).
pub(crate) const WARP: u32 = 32;

/// The name device-to-device copies take among the kernel times.
pub const COPY_KERNEL: &str = "device copy";

/// The kernels compiled for one architecture: machine code (CUBIN) where NVRTC knows the architecture,
/// which loads on any driver of NVRTC's CUDA major version; else PTX for the newest architecture NVRTC
/// knows, which the driver compiles (and which needs a driver at least as new as NVRTC).
#[derive(Clone, Debug)]
pub enum CompiledKernels {
    Cubin(Vec<u8>),
    Ptx(String),
}

impl CompiledKernels {
    /// Whether the compiled code defines the kernel `entry` (its name is in the PTX or the CUBIN's
    /// symbol table).
    pub fn defines(&self, entry: &str) -> bool {
        match self {
            CompiledKernels::Cubin(bytes) => {
                let name = format!("{entry}\0");
                bytes.windows(name.len()).any(|w| w == name.as_bytes())
            }
            CompiledKernels::Ptx(text) => text.contains(&format!(".entry {entry}(")),
        }
    }

    fn module(self) -> Ptx {
        match self {
            CompiledKernels::Cubin(bytes) => Ptx::from_binary(bytes),
            CompiledKernels::Ptx(text) => Ptx::from_src(text),
        }
    }
}

/// Compiles every kernel for compute capability `major.minor`, once per process and architecture.
/// NVRTC alone is needed (no GPU), so the kernels can be checked on any machine with it.
pub fn compile_kernels(major: u32, minor: u32) -> Result<CompiledKernels> {
    static CACHE: Mutex<Option<HashMap<(u32, u32), CompiledKernels>>> = Mutex::new(None);
    if !nvrtc_present() {
        return Err(unavailable(
            "CUDA's run-time compiler libnvrtc.so could not be loaded",
        ));
    }
    let mut cache = CACHE
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    let cache = cache.get_or_insert_with(HashMap::new);
    if let Some(compiled) = cache.get(&(major, minor)) {
        return Ok(compiled.clone());
    }
    let started = std::time::Instant::now();
    let arch = (major * 10 + minor) as i32;
    let supported = guarded(supported_architectures)??;
    let (target, cubin) = if supported.contains(&arch) {
        (format!("sm_{arch}"), true)
    } else {
        let newest = supported
            .iter()
            .copied()
            .filter(|&a| a <= arch)
            .max()
            .ok_or_else(|| {
                unavailable(format!(
                    "this NVRTC compiles for sm_{:?}, none of them sm_{arch} or older",
                    supported
                ))
            })?;
        (format!("compute_{newest}"), false)
    };
    let mut options = vec![format!("--gpu-architecture={target}")];
    options.extend(
        kernel_defines()
            .iter()
            .map(|(name, value)| format!("-D{name}={value}")),
    );
    let compiled = guarded(|| compile(&options, cubin))?.map_err(|detail| {
        unavailable(format!(
            "NVRTC could not compile the kernels for {target}: {detail}"
        ))
    })?;
    tracing::debug!(
        "compiled the CUDA kernels for {target} in {:.2} s",
        started.elapsed().as_secs_f64()
    );
    cache.insert((major, minor), compiled.clone());
    Ok(compiled)
}

/// The architectures this NVRTC compiles for, as 10 × major + minor.
fn supported_architectures() -> Result<Vec<i32>> {
    let error =
        |e: nvrtc::NvrtcError| unavailable(format!("asking NVRTC for its architectures: {e}"));
    let mut count = 0;
    // SAFETY: NVRTC writes one count, then that many architectures into a buffer of that size.
    unsafe { nvrtc_sys::nvrtcGetNumSupportedArchs(&mut count) }
        .result()
        .map_err(error)?;
    let mut architectures = vec![0; count.max(0) as usize];
    unsafe { nvrtc_sys::nvrtcGetSupportedArchs(architectures.as_mut_ptr()) }
        .result()
        .map_err(error)?;
    Ok(architectures)
}

/// One NVRTC compilation of [`SOURCE`]: CUBIN or PTX, or the compiler's log.
fn compile(options: &[String], cubin: bool) -> std::result::Result<CompiledKernels, String> {
    let text = |chars: Vec<std::ffi::c_char>| -> String {
        let bytes: Vec<u8> = chars
            .iter()
            .map(|&c| c as u8)
            .take_while(|&b| b != 0)
            .collect();
        String::from_utf8_lossy(&bytes).into_owned()
    };
    let source = std::ffi::CString::new(SOURCE).expect("the kernel source has no NUL");
    let name = std::ffi::CString::new("msa_kernels.cu").expect("no NUL");
    let program = nvrtc::create_program(&source, Some(&name)).map_err(|e| e.to_string())?;
    // SAFETY: `program` lives until destroy_program; the buffers are sized by NVRTC's own answers.
    let compiled = unsafe {
        match nvrtc::compile_program(program, options) {
            Err(e) => Err(match nvrtc::get_program_log(program) {
                Ok(log) => format!("{e}: {}", text(log)),
                Err(_) => e.to_string(),
            }),
            Ok(()) if cubin => {
                let mut size = 0;
                nvrtc_sys::nvrtcGetCUBINSize(program, &mut size)
                    .result()
                    .map_err(|e| e.to_string())
                    .and_then(|()| {
                        let mut bytes = vec![0u8; size];
                        nvrtc_sys::nvrtcGetCUBIN(program, bytes.as_mut_ptr().cast())
                            .result()
                            .map(|()| CompiledKernels::Cubin(bytes))
                            .map_err(|e| e.to_string())
                    })
            }
            Ok(()) => nvrtc::get_ptx(program)
                .map(|ptx| CompiledKernels::Ptx(text(ptx)))
                .map_err(|e| e.to_string()),
        }
    };
    // SAFETY: created above and destroyed once.
    let _ = unsafe { nvrtc::destroy_program(program) };
    compiled
}

/// Bytes of the pinned ring small host-to-device copies pass through (see [`Device::copy_staged`]).
const STAGING_BYTES: usize = 4 << 20;
/// Host-to-device copies of at most this many bytes go through the ring.
pub(crate) const STAGED_MAX: usize = 1 << 20;

/// Page-locked memory that small host-to-device copies pass through.
struct Staging {
    /// Owns the page-locked memory `base` points into.
    _ring: PinnedHostSlice<u8>,
    base: *mut u8,
    /// Where the next copy's bytes go: copies queued since the ring last wrapped read below it.
    next: usize,
}

// SAFETY: `base` points into `_ring`, which the struct owns, and is only used under the device's lock.
unsafe impl Send for Staging {}

impl Drop for Device {
    /// Copies out of the staging ring and the page buffer may still be queued: they must run before
    /// the page-locked memory is freed.
    fn drop(&mut self) {
        for stream in [&self.stream, &self.copies] {
            if let Err(e) = stream.synchronize() {
                tracing::warn!("closing {}: {e}", self.name);
            }
        }
    }
}

/// An open device: one context, one stream every op is queued on, cuBLAS bound to it, the kernels,
/// and a second stream for uploads gathered from host pages.
pub(crate) struct Device {
    pub(crate) name: String,
    /// Streaming multiprocessors: how many blocks the GPU runs side by side, in units.
    pub(crate) multiprocessors: usize,
    pub(crate) stream: Arc<CudaStream>,
    /// Copies of gathered pages (see [`Device::upload_gathered`]): the main stream waits for each by
    /// an event, never the host.
    copies: Arc<CudaStream>,
    pub(crate) blas: CudaBlas,
    /// Routing of a head mean over key rows of whole 32-element steps runs on `routing_mma`
    /// (mma.sync, sm_80 and newer), unless [`CudaOptions::cublas_routing`] asks for cuBLAS.
    pub(crate) fused_routing: bool,
    kernels: HashMap<&'static str, CudaFunction>,
    staging: Mutex<Staging>,
    /// Page-locked memory uploads gathered piece by piece land in (grown to the largest), and the
    /// event after the last copy out of it.
    pages: Mutex<Option<(PinnedHostSlice<u8>, CudaEvent)>>,
    /// Page-locked words small results are read back into, free for the next read.
    readbacks: Arc<Mutex<Vec<Landing>>>,
    /// Launches, device copies and host waits, for benchmarks.
    pub(crate) counters: Arc<Counters>,
    /// Each kernel's device time, where [`CudaOptions::time_kernels`] asks for it.
    timer: Option<Mutex<KernelTimer>>,
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
        guarded(|| Device::open_checked(options))?
    }

    fn open_checked(options: &CudaOptions) -> Result<Device> {
        let ordinal = options.ordinal;
        let started = |e: DriverError| unavailable(format!("opening CUDA device {ordinal}: {e}"));
        let ctx = CudaContext::new(ordinal).map_err(started)?;
        // The main stream orders every op, so cudarc's per-allocation events are pure overhead.
        // SAFETY: the one other stream (copies) only writes memory it allocated itself, and hands
        // it over to the main stream by an event (`upload_gathered`).
        unsafe { ctx.disable_event_tracking() };
        let (major, minor) = ctx.compute_capability().map_err(started)?;
        let device_name = ctx.name().map_err(started)?;
        let multiprocessors = ctx
            .attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
            .map_err(started)? as usize;
        let name = format!("{device_name} (sm_{major}{minor}, CUDA device {ordinal})");
        let compiled = compile_kernels(major as u32, minor as u32)?;
        let module = ctx.load_module(compiled.module()).map_err(|e| {
            unavailable(format!(
                "loading the CUDA kernels on device {ordinal}: {e} (kernels compiled to PTX need a \
                 driver at least as new as NVRTC)"
            ))
        })?;
        let kernels = KERNELS
            .iter()
            .map(|&kernel| Ok((kernel, module.load_function(kernel).map_err(started)?)))
            .collect::<Result<_>>()?;
        // A stream of its own: with one context per GPU (Memory Parallel), no op or free can land on
        // another GPU's legacy default stream.
        let stream = ctx.new_stream().map_err(started)?;
        let copies = ctx.new_stream().map_err(started)?;
        if ctx
            .attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MEMORY_POOLS_SUPPORTED)
            .map_err(started)?
            > 0
        {
            configure_pool(&ctx, options.trim_pool).map_err(started)?;
        }
        let blas = CudaBlas::new(stream.clone())
            .map_err(|e| unavailable(format!("starting cuBLAS on CUDA device {ordinal}: {e}")))?;
        // SAFETY: the ring's bytes are written before any copy reads them.
        let mut ring = unsafe { ctx.alloc_pinned::<u8>(STAGING_BYTES) }.map_err(started)?;
        let base = ring.as_mut_ptr().map_err(started)?;
        tracing::info!("opened {name}");
        Ok(Device {
            name,
            multiprocessors,
            stream,
            copies,
            blas,
            fused_routing: major >= 8 && !options.cublas_routing,
            kernels,
            staging: Mutex::new(Staging {
                _ring: ring,
                base,
                next: 0,
            }),
            pages: Mutex::new(None),
            readbacks: Arc::default(),
            counters: Arc::default(),
            timer: options.time_kernels.then(Mutex::default),
        })
    }

    /// Uploads the `total` bytes `write` hands over in pieces (fetched memory pages) into new device
    /// memory, gathered into page-locked memory (by several threads, [`gather_pieces`]) and copied on
    /// the copy stream: the copy can run beside the kernels queued before it (a layer's projections
    /// while its memory is fetched), and the main stream waits for it, by an event, before anything
    /// queued after. Returns how many bytes `write` handed over, and the memory when that was `total`
    /// (else nothing is copied, and the caller refuses the weight). No bytes give one zero element,
    /// as every allocation.
    pub(crate) fn upload_gathered<T: DeviceRepr + ValidAsZeroBits>(
        &self,
        total: usize,
        write: &mut PieceWriter<'_, '_>,
    ) -> Result<(Option<CudaSlice<T>>, usize)> {
        let len = total / std::mem::size_of::<T>();
        assert_eq!(len * std::mem::size_of::<T>(), total);
        let ctx = self.stream.context();
        ctx.bind_to_thread().map_err(|e| self.error(e))?;
        // A panic in `write` queued nothing: the buffer and its event stay good.
        let mut pages = self
            .pages
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        // The last copy out of the buffer must have run before it is refilled or freed.
        if let Some((_, copied)) = &*pages {
            (self.counters)
                .wait(|| copied.synchronize())
                .map_err(|e| self.error(e))?;
        }
        if pages
            .as_ref()
            .is_none_or(|(buffer, _)| buffer.len() < total)
        {
            // SAFETY: the buffer's bytes are written below before the copy reads them.
            let buffer = unsafe { ctx.alloc_pinned::<u8>(total.max(1).next_power_of_two()) }
                .map_err(|e| self.error(e))?;
            let copied = ctx.new_event(None).map_err(|e| self.error(e))?;
            *pages = Some((buffer, copied));
        }
        let (buffer, copied) = pages.as_mut().expect("allocated above");
        let base = buffer.as_mut_ptr().map_err(|e| self.error(e))?;
        // SAFETY: the first `total` bytes lie inside the buffer (total <= its length), which no copy
        // reads any more (the event above), and nothing else refers to them while `dst` lives.
        let dst = unsafe { std::slice::from_raw_parts_mut(base, total) };
        // The engine fetches from its own threads, never from a rayon task, so no task that rayon
        // runs here while the gather waits can come back for `pages`.
        let written = gather_pieces(write, dst);
        if written != total {
            return Ok((None, written));
        }
        // Allocated in the copy stream's order: the pool hands it memory whose free on the main stream
        // has run (see `configure_pool`).
        let mut dst = if len == 0 {
            self.copies.alloc_zeros::<T>(1)
        } else {
            // SAFETY: the copy below writes all `total` bytes before anything reads them.
            unsafe { self.copies.alloc::<T>(len) }
        }
        .map_err(|e| self.error(e))?;
        // SAFETY: the buffer holds `total` initialised bytes; it is left alone until `copied` fires.
        let bytes = unsafe { std::slice::from_raw_parts(base, total) };
        unsafe { self.queue_pinned_copy(&self.copies, bytes, &mut dst) }?;
        let ordered = copied
            .record(&self.copies)
            .and_then(|()| self.stream.wait(copied));
        if let Err(e) = ordered {
            // Without the event and the wait on it, only the whole copy stream says when the buffer
            // is free again.
            let _ = self.copies.synchronize();
            return Err(self.error(e));
        }
        // The main stream, which waits for the copy above, orders every later use and the free.
        let ptr = dst.leak();
        // SAFETY: `ptr` holds `len.max(1)` elements of `T`, and nothing else owns it any more.
        Ok((
            Some(unsafe { self.stream.upgrade_device_ptr(ptr, len.max(1)) }),
            written,
        ))
    }

    /// Queues a copy of `bytes` (at most [`STAGED_MAX`]) into `dst` on the stream, through the pinned
    /// ring: a copy from page-locked memory is queued like a kernel, where for one from pageable
    /// memory the driver may first wait for everything queued before it (CUDA's "API synchronization
    /// behavior"): the host would stall once per upload, for the attention ranges of every layer while
    /// decoding and routing's rows and offsets.
    pub(crate) fn copy_staged<T>(&self, bytes: &[u8], dst: &mut CudaSlice<T>) -> Result<()> {
        assert!(bytes.len() <= STAGED_MAX && bytes.len() <= dst.num_bytes());
        // The raw copy below does not make the context current itself.
        self.stream
            .context()
            .bind_to_thread()
            .map_err(|e| self.error(e))?;
        let mut staging = self.staging.lock().expect("staging lock");
        let mut start = staging.next.next_multiple_of(16);
        if start + bytes.len() > STAGING_BYTES {
            // The copies queued since the last wrap read the bytes about to be overwritten.
            (self.counters)
                .wait(|| self.stream.synchronize())
                .map_err(|e| self.error(e))?;
            start = 0;
        }
        // SAFETY: [start, start + len) lies inside the ring (STAGED_MAX < STAGING_BYTES), and no
        // queued copy reads it: those queued since the last wrap read below `start`.
        let region =
            unsafe { std::slice::from_raw_parts_mut(staging.base.add(start), bytes.len()) };
        region.copy_from_slice(bytes);
        // SAFETY: the region is left alone until the copy has run (above).
        unsafe { self.queue_pinned_copy(&self.stream, region, dst) }?;
        staging.next = start + bytes.len();
        Ok(())
    }

    /// Queues a copy of page-locked `bytes` into `dst` (at least as long) on `stream`.
    ///
    /// # Safety
    /// `bytes` must stay allocated and unchanged until the copy has run.
    unsafe fn queue_pinned_copy<T>(
        &self,
        stream: &CudaStream,
        bytes: &[u8],
        dst: &mut CudaSlice<T>,
    ) -> Result<()> {
        assert!(bytes.len() <= dst.num_bytes());
        if bytes.is_empty() {
            return Ok(());
        }
        let (ptr, _record) = dst.device_ptr_mut(stream);
        // SAFETY: `dst` holds `bytes.len()` bytes at least; the caller keeps `bytes` as they are.
        unsafe { cudarc::driver::result::memcpy_htod_async(ptr, bytes, stream.cu_stream()) }
            .map_err(|e| self.error(e))
    }

    /// Queues a copy of `src`'s first `words` words (at most [`READBACK_WORDS`]) to page-locked
    /// memory on the stream: the host reads them once the ops before have run, and records more work
    /// in the meantime.
    pub(crate) fn read_back(&self, src: &CudaSlice<u32>, words: usize) -> Result<Readback> {
        assert!(words <= READBACK_WORDS && words <= src.len());
        let free = self
            .readbacks
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .pop();
        let mut landing = match free {
            Some(landing) => landing,
            None => {
                let ctx = self.stream.context();
                // Cached, not write-combined: the host reads these words.
                // SAFETY: the copy below writes the words the host reads.
                let words = unsafe { ctx.alloc_pinned_with_flags::<u32>(READBACK_WORDS, 0) };
                Landing {
                    words: words.map_err(|e| self.error(e))?,
                    copied: ctx.new_event(None).map_err(|e| self.error(e))?,
                }
            }
        };
        // Only `words` words: cudarc's memcpy_dtoh copies as many as its destination holds, which
        // read past the end of `src` (found by msa-cuda-emulator). With event tracking off, cudarc
        // records no event of its own for the page-locked memory.
        let queued = landing
            .words
            .as_mut_ptr()
            .and_then(|dst| {
                let (src, _record) = src.device_ptr(&self.stream);
                // SAFETY: `words` fit both the landing and `src` (asserted above); the host reads
                // the landing only after `copied`, recorded behind the copy.
                let dst = unsafe { std::slice::from_raw_parts_mut(dst, words) };
                unsafe {
                    cudarc::driver::result::memcpy_dtoh_async(dst, src, self.stream.cu_stream())
                }
            })
            .and_then(|()| landing.copied.record(&self.stream))
            .map_err(|e| self.error(e));
        let readback = Readback {
            landing: Some(landing),
            words,
            free: self.readbacks.clone(),
            counters: self.counters.clone(),
        };
        queued.map(|()| readback)
    }

    /// A kernel of kernels.cu, with its name as the table holds it.
    pub(crate) fn kernel(&self, name: &str) -> (&'static str, &CudaFunction) {
        let (&name, function) = self
            .kernels
            .get_key_value(name)
            .expect("a kernel of KERNELS");
        (name, function)
    }

    /// Queues `launch`, the launch of one kernel or cuBLAS call on the stream, counting it and,
    /// where kernels are timed, recording an event on each side of it.
    pub(crate) fn launch<T>(
        &self,
        kernel: &'static str,
        launch: impl FnOnce() -> Result<T>,
    ) -> Result<T> {
        self.counters.launched();
        self.timed(kernel, launch)
    }

    /// Queues `copy`, a copy of `bytes` between device allocations on the stream, counting it and
    /// timing it as [`COPY_KERNEL`] where kernels are timed.
    pub(crate) fn device_copy<T>(
        &self,
        bytes: usize,
        copy: impl FnOnce() -> Result<T>,
    ) -> Result<T> {
        self.counters.copied(bytes);
        self.timed(COPY_KERNEL, copy)
    }

    /// Runs `queue`, which queues work on the stream, between two recorded events where kernels are
    /// timed, and takes it as a launch of `kernel`.
    fn timed<T>(&self, kernel: &'static str, queue: impl FnOnce() -> Result<T>) -> Result<T> {
        let Some(timer) = &self.timer else {
            return queue();
        };
        let lock = || {
            timer
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner())
        };
        let event = || {
            let event = lock()
                .event(|| (self.stream.context()).new_event(Some(CUevent_flags::CU_EVENT_DEFAULT)));
            event
                .and_then(|event| event.record(&self.stream).map(|()| event))
                .map_err(|e| self.error(e))
        };
        let start = event()?;
        let queued = queue()?;
        let end = event()?;
        (lock().record(kernel, start, end, &self.counters)).map_err(|e| self.error(e))?;
        Ok(queued)
    }

    /// Each kernel's device time so far, once every launch queued has run; `None` unless kernels are
    /// timed.
    pub(crate) fn kernel_times(&self) -> Result<Option<KernelTimes>> {
        let Some(timer) = &self.timer else {
            return Ok(None);
        };
        let mut timer = timer
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        timer.read().map(Some).map_err(|e| self.error(e))
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

/// Words one [`Readback`] holds: a top k's (score, index) pairs.
pub(crate) const READBACK_WORDS: usize = 2 * crate::backend::MAX_DEVICE_K;

/// Page-locked words and the event after the last copy into them.
struct Landing {
    words: PinnedHostSlice<u32>,
    copied: CudaEvent,
}

/// Words on their way to the host (see [`Device::read_back`]); the memory is reused once dropped.
pub(crate) struct Readback {
    landing: Option<Landing>,
    words: usize,
    free: Arc<Mutex<Vec<Landing>>>,
    counters: Arc<Counters>,
}

impl Readback {
    /// Waits for the copy (its event, not the whole stream) and returns the words. The wait spins,
    /// as a stream synchronisation does by default: the words are awaited for a router layer's
    /// selection, on the path of every decoded token.
    pub(crate) fn words(&self) -> std::result::Result<&[u32], DriverError> {
        let landing = self.landing.as_ref().expect("held until dropped");
        self.counters.wait(|| landing.copied.synchronize())?;
        Ok(&landing.words.as_slice()?[..self.words])
    }
}

impl Drop for Readback {
    /// A later copy into the same memory is queued behind this one on the stream, and its read waits
    /// for its own event.
    fn drop(&mut self) {
        if let Some(landing) = self.landing.take() {
            self.free
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner())
                .push(landing);
        }
    }
}

/// Sets up the device's default memory pool, which every allocation uses (`cuMemAllocAsync`):
/// - no reuse "by internal dependencies": with it, an allocation on the copy stream may take memory
///   the main stream freed while kernels queued before the free still run, and the driver would then
///   make the copy wait for them, serialising it again. Memory whose free has run is still reused,
///   and the main stream's own reuse is unaffected;
/// - unless `trim`, no release threshold: the pool keeps the memory it has grown to instead of
///   handing it back at each synchronisation (see [`CudaOptions::trim_pool`]).
fn configure_pool(ctx: &CudaContext, trim: bool) -> std::result::Result<(), DriverError> {
    use cudarc::driver::sys::{self, CUmemPool_attribute as Attribute};
    let mut pool: sys::CUmemoryPool = std::ptr::null_mut();
    let mut allow: i32 = 0;
    let mut threshold: u64 = if trim { 0 } else { u64::MAX };
    // SAFETY: the pool handle is written by the driver before it is used; each attribute has the
    // type the driver reads for it (an int, a cuuint64_t).
    unsafe {
        sys::cuDeviceGetMemPool(&mut pool, ctx.cu_device()).result()?;
        sys::cuMemPoolSetAttribute(
            pool,
            Attribute::CU_MEMPOOL_ATTR_REUSE_ALLOW_INTERNAL_DEPENDENCIES,
            (&mut allow as *mut i32).cast(),
        )
        .result()?;
        sys::cuMemPoolSetAttribute(
            pool,
            Attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
            (&mut threshold as *mut u64).cast(),
        )
        .result()
    }
}

/// Threads per block of the grid-stride and warp-per-item kernels.
const BLOCK: u32 = 256;

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
    grid_for_threads(items * u64::from(WARP))
}
