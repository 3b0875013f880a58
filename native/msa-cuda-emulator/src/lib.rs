//! A stand-in for the CUDA driver (`libcuda.so`), cuBLAS (`libcublas.so`) and NCCL (`libnccl.so`)
//! that runs msa-cuda on the CPU, so its tests run on machines without an NVIDIA GPU (CI). cudarc loads
//! these libraries at run time by name; `cargo xtask test` links this library under those names in a
//! folder on `LD_LIBRARY_PATH` and runs msa-cuda's GPU tests against it.
//!
//! What runs is msa-cuda itself: its Rust code, its launches, cuBLAS and NCCL calls, and its kernels —
//! kernels.cu compiled by the host C++ compiler (emulator.cpp), each block's threads run as fibers,
//! one warp running ahead of the others from barrier to barrier. NVRTC is the real one: the kernels
//! are also compiled for the GPU, and the module it makes is accepted and ignored. What is emulated,
//! and checked:
//! - device memory is host memory, filled with 0xff bytes when allocated (f32 NaN, u32 `!0`), so a
//!   kernel or copy that reads global memory nothing wrote shows up in the results (shared memory is
//!   not poisoned);
//! - every allocation is registered with its device: copies, memsets and GEMM operands outside one are
//!   refused, as are frees of anything else and empty allocations; GEMM operands and NCCL buffers must
//!   be memory of the device they run on;
//! - a kernel's own accesses: each is checked for its type's alignment (a misaligned one fails the
//!   launch, as on a GPU), each subscript of an array variable or member for its bounds (one past
//!   them fails the launch), and each allocation ends, rounded up to 256 bytes (the rounding poisoned
//!   too), before a page that is never mapped, and is unmapped when freed, so a read or write past its
//!   end or after its free faults and ends the process with the kernel, block and thread named
//!   (emulator.cpp);
//! - contexts: allocations, streams and cuBLAS handles belong to the device current when they are
//!   made, and a cuBLAS call on a handle of another device than the current one is refused;
//! - launches beyond a GPU's grid and block limits are refused, and so are warp shuffles without
//!   their whole warp and barriers that would hang (emulator.cpp);
//! - work queued on a stream runs in the stream's order when something waits for it (streams.rs), so
//!   a missing event or stream wait, or page-locked memory read or rewritten before its copy was
//!   waited for, changes the results; a missing `__syncthreads` between warps shows too;
//! - cuBLAS GEMMs follow its documented column-major contract, summing in f64 (more exactly than
//!   tensor cores);
//! - NCCL cliques of this process's devices and their broadcasts ([`nccl`]), and communicators of
//!   ranks in several processes of this machine, joined through a unique id, with their sends and
//!   receives ([`nccl_ranks`]);
//! - events time only when created to (cuEventElapsedTime refuses others, as the driver does).
//!
//! `MSA_CUDA_EMULATOR_DEVICES` sets how many devices the machine has (1 by default), and
//! `CUDA_VISIBLE_DEVICES` picks those a process sees, as with the driver. `MSA_CUDA_EMULATOR_MEMORY`
//! sets each device's memory in bytes (8 GiB by default): an allocation past it fails with
//! `CUDA_ERROR_OUT_OF_MEMORY`, as on a full GPU. Each reports itself as
//! an sm_90 GPU with memory pools and an H100's 132 multiprocessors, so msa-cuda takes the paths it
//! takes there.
//!
//! It is built for x86-64 Linux only (elsewhere the crate is empty), the platform of the NVRTC wheel
//! `cargo xtask test` fetches.

#![cfg(all(target_os = "linux", target_arch = "x86_64"))]
#![allow(non_snake_case)]
#![allow(clippy::missing_safety_doc)]

use std::collections::BTreeMap;
use std::ffi::{CStr, c_char, c_int, c_longlong, c_uint, c_void};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::Instant;

// Enumerations arrive as plain integers (`as u32` below): a value outside a Rust enum would be
// undefined behaviour.
use cudarc::cublas::sys::{
    cublasComputeType_t, cublasHandle_t, cublasOperation_t, cublasStatus_t, cudaDataType,
};
use cudarc::driver::sys::{
    CUcontext, CUdevice, CUdevice_attribute, CUdeviceptr, CUevent, CUevent_flags, CUfunction,
    CUmemoryPool, CUmodule, CUresult, CUstream,
};

unsafe extern "C" {
    fn msa_emulator_kernel(name: *const c_char) -> *const c_void;
    fn msa_emulator_bind(kernel: *const c_void, params: *mut *mut c_void) -> *mut c_void;
    fn msa_emulator_unbind(kernel: *const c_void, args: *mut c_void);
    fn msa_emulator_map(rounded: usize) -> *mut c_void;
    fn msa_emulator_unmap(ptr: *mut c_void, rounded: usize);
    #[allow(clippy::too_many_arguments)]
    fn msa_emulator_launch(
        kernel: *const c_void,
        gx: c_uint,
        gy: c_uint,
        gz: c_uint,
        bx: c_uint,
        by: c_uint,
        bz: c_uint,
        args: *mut c_void,
        error: *mut c_char,
        error_len: usize,
    ) -> c_int;
}

use CUresult::{
    CUDA_ERROR_INVALID_CONTEXT, CUDA_ERROR_INVALID_DEVICE, CUDA_ERROR_INVALID_HANDLE,
    CUDA_ERROR_INVALID_VALUE, CUDA_ERROR_LAUNCH_FAILED, CUDA_ERROR_NOT_FOUND, CUDA_ERROR_NOT_READY,
    CUDA_ERROR_NOT_SUPPORTED, CUDA_ERROR_OUT_OF_MEMORY, CUDA_SUCCESS,
};

/// The machine's devices this process sees, in ordinal order: `MSA_CUDA_EMULATOR_DEVICES` of them,
/// or those `CUDA_VISIBLE_DEVICES` lists (read as the driver reads it: up to the first entry that is
/// not one of them).
fn visible_devices() -> &'static [c_int] {
    static VISIBLE: OnceLock<Vec<c_int>> = OnceLock::new();
    VISIBLE.get_or_init(|| {
        let machine: c_int = std::env::var("MSA_CUDA_EMULATOR_DEVICES")
            .ok()
            .and_then(|n| n.parse().ok())
            .unwrap_or(1);
        match std::env::var("CUDA_VISIBLE_DEVICES") {
            Err(_) => (0..machine).collect(),
            Ok(list) => list
                .split(',')
                .map_while(|d| d.trim().parse().ok().filter(|d| (0..machine).contains(d)))
                .collect(),
        }
    })
}

/// How many devices it reports.
fn device_count() -> c_int {
    visible_devices().len() as c_int
}

/// Which of the machine's devices this process's device `dev` (a checked ordinal) is: NCCL tells
/// ranks of several processes apart by it.
pub(crate) fn machine_device(dev: CUdevice) -> c_int {
    visible_devices()[dev as usize]
}

fn check_device(dev: CUdevice) -> Result<(), CUresult> {
    if (0..device_count()).contains(&dev) {
        Ok(())
    } else {
        Err(CUDA_ERROR_INVALID_DEVICE)
    }
}

/// Runs `body`, turning an early `Err` into its code.
fn status(body: impl FnOnce() -> Result<(), CUresult>) -> CUresult {
    body().err().unwrap_or(CUDA_SUCCESS)
}

/// Writes through an out-pointer, refusing a null one.
unsafe fn put<T>(out: *mut T, value: T) -> Result<(), CUresult> {
    if out.is_null() {
        return Err(CUDA_ERROR_INVALID_VALUE);
    }
    unsafe { out.write(value) };
    Ok(())
}

/// Hands `value` out behind a handle (streams, events, cuBLAS handles).
unsafe fn hand_out<T, H>(out: *mut *mut H, value: T) -> Result<(), CUresult> {
    unsafe { put(out, Box::into_raw(Box::new(value)).cast()) }
}

/// Takes back a handle made by [`hand_out`] with a `T`; false for a null one.
unsafe fn take_back<T, H>(handle: *mut H) -> bool {
    if handle.is_null() {
        return false;
    }
    // SAFETY: the caller passes a handle made by `hand_out::<T, _>`, not yet taken back.
    drop(unsafe { Box::from_raw(handle.cast::<T>()) });
    true
}

/// A handle that is a non-null pointer and nothing else (contexts, pools, modules, streams).
fn token(n: usize) -> *mut c_void {
    ((n + 1) * 64) as *mut c_void
}

pub mod nccl;
pub mod nccl_ranks;
mod streams;

use streams::{Event, Stream};

// ---- Memory: host allocations, registered so that frees, copies and GEMM operands are checked -----

/// Allocations are rounded up to this many bytes, and start on such a boundary, as the driver's.
const ALIGN: usize = 256;

/// Where an allocation lives, as far as its users can tell: on one device, or page-locked host memory.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) enum Home {
    Device(CUdevice),
    Host,
}

/// Every live allocation (device memory and page-locked host memory): start address → bytes, home.
static ALLOCATIONS: Mutex<BTreeMap<usize, (usize, Home)>> = Mutex::new(BTreeMap::new());

fn allocations() -> MutexGuard<'static, BTreeMap<usize, (usize, Home)>> {
    ALLOCATIONS
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Bytes of memory each device has (`MSA_CUDA_EMULATOR_MEMORY`, 8 GiB by default). Memory freed on
/// a stream counts until the free runs (when something waits for the stream), where a GPU's pool
/// could hand it to later allocations on that stream sooner.
fn device_memory() -> usize {
    static MEMORY: OnceLock<usize> = OnceLock::new();
    *MEMORY.get_or_init(|| match std::env::var("MSA_CUDA_EMULATOR_MEMORY") {
        Err(_) => 8 << 30,
        Ok(bytes) => bytes.parse().unwrap_or_else(|_| {
            eprintln!(
                "msa-cuda-emulator: MSA_CUDA_EMULATOR_MEMORY={bytes:?} is no number of bytes"
            );
            std::process::abort()
        }),
    })
}

/// Bytes allocated on `device` and not freed yet.
fn device_bytes_in_use(allocations: &BTreeMap<usize, (usize, Home)>, device: CUdevice) -> usize {
    let on_device = allocations
        .values()
        .filter(|(_, home)| *home == Home::Device(device));
    on_device.map(|(bytes, _)| bytes).sum()
}

/// `bytes` rounded up to a multiple of [`ALIGN`].
fn rounded(bytes: usize) -> Result<usize, CUresult> {
    bytes
        .checked_next_multiple_of(ALIGN)
        .ok_or(CUDA_ERROR_OUT_OF_MEMORY)
}

fn allocate(bytes: usize, home: Home) -> Result<*mut u8, CUresult> {
    // As the driver: no empty allocations.
    if bytes == 0 {
        return Err(CUDA_ERROR_INVALID_VALUE);
    }
    // Counted and registered under one lock, so two threads cannot both take the last bytes.
    let mut allocations = allocations();
    if let Home::Device(device) = home {
        let in_use = device_bytes_in_use(&allocations, device);
        if bytes > device_memory().saturating_sub(in_use) {
            return Err(CUDA_ERROR_OUT_OF_MEMORY);
        }
    }
    let rounded = rounded(bytes)?;
    // SAFETY: a multiple of ALIGN; null when it cannot be had.
    let ptr = unsafe { msa_emulator_map(rounded) }.cast::<u8>();
    if ptr.is_null() {
        return Err(CUDA_ERROR_OUT_OF_MEMORY);
    }
    allocations.insert(ptr as usize, (bytes, home));
    drop(allocations);
    // The rounding too, so that a kernel reading past `bytes` reads poison.
    // SAFETY: `rounded` bytes were just mapped, and not handed out yet.
    unsafe { std::ptr::write_bytes(ptr, 0xff, rounded) };
    Ok(ptr)
}

/// Frees an allocation of device memory (`host` false) or page-locked memory (`host` true); an address
/// that is not one (freed already, never allocated, or of the other kind) is refused.
fn release(ptr: *mut u8, host: bool) -> Result<(), CUresult> {
    let mut allocations = allocations();
    let (bytes, home) = *allocations
        .get(&(ptr as usize))
        .ok_or(CUDA_ERROR_INVALID_VALUE)?;
    if (home == Home::Host) != host {
        eprintln!(
            "msa-cuda-emulator: a free of {home:?} memory at {ptr:?} by the other kind's call"
        );
        return Err(CUDA_ERROR_INVALID_VALUE);
    }
    allocations.remove(&(ptr as usize));
    drop(allocations);
    // SAFETY: mapped by `allocate` with this size, and no longer registered.
    unsafe { msa_emulator_unmap(ptr.cast(), rounded(bytes)?) };
    Ok(())
}

/// The home of the one live allocation holding `bytes` at `ptr`; refused when none does. No bytes
/// lie anywhere (`None`).
pub(crate) fn check_range(ptr: usize, bytes: usize) -> Result<Option<Home>, CUresult> {
    if bytes == 0 {
        return Ok(None);
    }
    match allocations().range(..=ptr).next_back() {
        Some((&start, &(len, home)))
            if ptr.checked_add(bytes).is_some_and(|end| end <= start + len) =>
        {
            Ok(Some(home))
        }
        _ => {
            eprintln!("msa-cuda-emulator: {bytes} bytes at {ptr:#x} are not inside one allocation");
            Err(CUDA_ERROR_INVALID_VALUE)
        }
    }
}

/// As [`check_range`], and the allocation must be memory of `device`: a GPU reaches another's memory
/// only through peer access, which msa-cuda does not enable.
pub(crate) fn check_on(ptr: usize, bytes: usize, device: CUdevice) -> Result<(), CUresult> {
    match check_range(ptr, bytes)? {
        None => Ok(()),
        Some(Home::Device(home)) if home == device => Ok(()),
        Some(home) => {
            eprintln!(
                "msa-cuda-emulator: {bytes} bytes at {ptr:#x} are memory of {home:?}, used on device \
                 {device}"
            );
            Err(CUDA_ERROR_INVALID_VALUE)
        }
    }
}

fn device_ptr(ptr: CUdeviceptr) -> *mut u8 {
    ptr as usize as *mut u8
}

// ---- Driver: initialisation, devices, contexts --------------------------------------------------------

#[unsafe(no_mangle)]
pub extern "C" fn cuInit(_flags: c_uint) -> CUresult {
    CUDA_SUCCESS
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuDriverGetVersion(version: *mut c_int) -> CUresult {
    status(|| unsafe { put(version, 12080) })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuDeviceGetCount(count: *mut c_int) -> CUresult {
    status(|| unsafe { put(count, device_count()) })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuDeviceGet(device: *mut CUdevice, ordinal: c_int) -> CUresult {
    status(|| {
        check_device(ordinal)?;
        unsafe { put(device, ordinal) }
    })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuDeviceGetName(name: *mut c_char, len: c_int, dev: CUdevice) -> CUresult {
    status(|| {
        check_device(dev)?;
        let text = b"msa-cuda-emulator (CPU)\0";
        if name.is_null() || (len as usize) < text.len() {
            return Err(CUDA_ERROR_INVALID_VALUE);
        }
        // SAFETY: the caller's buffer holds `len` bytes.
        unsafe { std::ptr::copy_nonoverlapping(text.as_ptr().cast(), name, text.len()) };
        Ok(())
    })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuDeviceGetAttribute(
    value: *mut c_int,
    attribute: u32,
    dev: CUdevice,
) -> CUresult {
    use CUdevice_attribute::*;
    let answers = [
        (CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR, 9),
        (CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR, 0),
        // An H100's: msa-cuda sizes some launches by it (split-KV attention when decoding).
        (CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT, 132),
        (CU_DEVICE_ATTRIBUTE_MEMORY_POOLS_SUPPORTED, 1),
        (CU_DEVICE_ATTRIBUTE_WARP_SIZE, 32),
        (CU_DEVICE_ATTRIBUTE_MAX_THREADS_PER_BLOCK, 1024),
    ];
    status(|| {
        check_device(dev)?;
        let Some(&(_, answer)) = answers.iter().find(|(a, _)| *a as u32 == attribute) else {
            eprintln!("msa-cuda-emulator: device attribute {attribute} is not emulated");
            return Err(CUDA_ERROR_NOT_SUPPORTED);
        };
        unsafe { put(value, answer) }
    })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuDeviceTotalMem_v2(bytes: *mut usize, dev: CUdevice) -> CUresult {
    status(|| {
        check_device(dev)?;
        unsafe { put(bytes, device_memory()) }
    })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuMemGetInfo_v2(free: *mut usize, total: *mut usize) -> CUresult {
    status(|| {
        let in_use = device_bytes_in_use(&allocations(), current_device()?);
        unsafe {
            put(free, device_memory().saturating_sub(in_use))?;
            put(total, device_memory())
        }
    })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuDevicePrimaryCtxRetain(ctx: *mut CUcontext, dev: CUdevice) -> CUresult {
    status(|| {
        check_device(dev)?;
        unsafe { put(ctx, token(dev as usize).cast()) }
    })
}

#[unsafe(no_mangle)]
pub extern "C" fn cuDevicePrimaryCtxRelease_v2(dev: CUdevice) -> CUresult {
    status(|| check_device(dev))
}

thread_local! {
    static CURRENT: std::cell::Cell<CUcontext> = const { std::cell::Cell::new(std::ptr::null_mut()) };
}

#[unsafe(no_mangle)]
pub extern "C" fn cuCtxSetCurrent(ctx: CUcontext) -> CUresult {
    CURRENT.set(ctx);
    CUDA_SUCCESS
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuCtxGetCurrent(ctx: *mut CUcontext) -> CUresult {
    status(|| unsafe { put(ctx, CURRENT.get()) })
}

/// The device of this thread's current context; none is an error, as in the driver.
pub(crate) fn current_device() -> Result<CUdevice, CUresult> {
    match CURRENT.get() as usize {
        0 => Err(CUDA_ERROR_INVALID_CONTEXT),
        ctx => Ok((ctx / 64 - 1) as CUdevice),
    }
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuCtxGetDevice(device: *mut CUdevice) -> CUresult {
    status(|| unsafe { put(device, current_device()?) })
}

#[unsafe(no_mangle)]
pub extern "C" fn cuCtxSynchronize() -> CUresult {
    status(|| streams::synchronize_device(current_device()?))
}

// ---- Streams and events: work runs when waited for (streams.rs) ---------------------------------------

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuStreamCreate(stream: *mut CUstream, _flags: c_uint) -> CUresult {
    // A stream belongs to the device current when it is made.
    status(|| unsafe { hand_out(stream, Stream::new(current_device()?)) })
}

/// The device of a stream from cuStreamCreate; the current one for the null stream.
unsafe fn stream_device(stream: CUstream) -> Result<CUdevice, CUresult> {
    match unsafe { streams::stream(stream) } {
        Some(stream) => Ok(stream.device),
        None => current_device(),
    }
}

/// As the driver: work still queued on the stream runs first.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuStreamDestroy_v2(stream: CUstream) -> CUresult {
    let Some(queued) = (unsafe { streams::stream(stream) }) else {
        return CUDA_ERROR_INVALID_VALUE;
    };
    let drained = queued.synchronize();
    unsafe { take_back::<Arc<Stream>, _>(stream) };
    status(|| drained)
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuStreamSynchronize(stream: CUstream) -> CUresult {
    status(|| unsafe { streams::stream(stream) }.map_or(Ok(()), |s| s.synchronize()))
}

/// As the driver for a caller that polls: work not yet run (`done` false) is not ready
/// (`CUDA_ERROR_NOT_READY`), and the poll runs it (`run`), so a later poll finds it done, as it
/// eventually would on a GPU. A failure of the work is reported either way.
fn poll(done: bool, run: impl FnOnce() -> Result<(), CUresult>) -> CUresult {
    status(|| {
        run()?;
        if done {
            Ok(())
        } else {
            Err(CUDA_ERROR_NOT_READY)
        }
    })
}

/// A poll ([`poll`]) of the stream's work.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuStreamQuery(stream: CUstream) -> CUresult {
    match unsafe { streams::stream(stream) } {
        Some(stream) => poll(stream.idle(), || stream.synchronize()),
        None => CUDA_SUCCESS,
    }
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuStreamWaitEvent(
    stream: CUstream,
    handle: CUevent,
    _flags: c_uint,
) -> CUresult {
    status(|| unsafe { event(handle)?.wait_on(stream) })
}

/// Nanoseconds since the first call, plus one.
fn now() -> u64 {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    EPOCH.get_or_init(Instant::now).elapsed().as_nanos() as u64 + 1
}

/// The event behind a handle made by cuEventCreate.
unsafe fn event<'a>(handle: CUevent) -> Result<&'a Arc<Event>, CUresult> {
    // SAFETY: the caller passes a handle from cuEventCreate, not yet destroyed.
    unsafe { handle.cast::<Arc<Event>>().as_ref() }.ok_or(CUDA_ERROR_INVALID_HANDLE)
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuEventCreate(handle: *mut CUevent, flags: c_uint) -> CUresult {
    let timing = flags & CUevent_flags::CU_EVENT_DISABLE_TIMING as c_uint == 0;
    status(|| unsafe { hand_out(handle, Event::new(timing)) })
}

/// As the driver: a record still queued runs when its stream gets there.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuEventDestroy_v2(handle: CUevent) -> CUresult {
    match unsafe { take_back::<Arc<Event>, _>(handle) } {
        true => CUDA_SUCCESS,
        false => CUDA_ERROR_INVALID_HANDLE,
    }
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuEventRecord(handle: CUevent, stream: CUstream) -> CUresult {
    status(|| {
        unsafe { event(handle)?.record(stream) };
        Ok(())
    })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuEventSynchronize(handle: CUevent) -> CUresult {
    status(|| unsafe { event(handle) }?.synchronize())
}

/// A poll ([`poll`]) of the work before the event's latest record (an event never recorded is
/// ready).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuEventQuery(handle: CUevent) -> CUresult {
    match unsafe { event(handle) } {
        Ok(event) => poll(event.fired(), || event.synchronize()),
        Err(invalid) => invalid,
    }
}

/// As the driver: both events must time, and both records must have run.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuEventElapsedTime(
    ms: *mut f32,
    start: CUevent,
    end: CUevent,
) -> CUresult {
    status(|| {
        let (start, end) = unsafe { (event(start)?, event(end)?) };
        if !start.timing || !end.timing {
            return Err(CUDA_ERROR_INVALID_HANDLE);
        }
        let (Some(start), Some(end)) = (start.recorded_at(), end.recorded_at()) else {
            return Err(CUDA_ERROR_NOT_READY);
        };
        unsafe { put(ms, end.saturating_sub(start) as f32 / 1e6) }
    })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuEventElapsedTime_v2(
    ms: *mut f32,
    start: CUevent,
    end: CUevent,
) -> CUresult {
    unsafe { cuEventElapsedTime(ms, start, end) }
}

// ---- Memory -------------------------------------------------------------------------------------------

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuMemAlloc_v2(ptr: *mut CUdeviceptr, bytes: usize) -> CUresult {
    status(|| unsafe {
        put(
            ptr,
            allocate(bytes, Home::Device(current_device()?))? as CUdeviceptr,
        )
    })
}

/// Memory of the stream's device, usable at once (the driver's is usable by work queued after it).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuMemAllocAsync(
    ptr: *mut CUdeviceptr,
    bytes: usize,
    stream: CUstream,
) -> CUresult {
    status(|| unsafe {
        let home = Home::Device(stream_device(stream)?);
        put(ptr, allocate(bytes, home)? as CUdeviceptr)
    })
}

/// As the driver: a free that is not stream-ordered first waits for the work queued on the device.
#[unsafe(no_mangle)]
pub extern "C" fn cuMemFree_v2(ptr: CUdeviceptr) -> CUresult {
    let device = match allocations().get(&(ptr as usize)) {
        Some(&(_, Home::Device(device))) => Some(device),
        _ => None,
    };
    // An error of the device's work is reported by the synchronisations with it.
    if let Some(device) = device {
        let _ = streams::synchronize_device(device);
    }
    status(|| release(device_ptr(ptr), false))
}

/// Frees when the stream gets there: work queued after it on other streams, unless ordered after it,
/// may run first.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuMemFreeAsync(ptr: CUdeviceptr, stream: CUstream) -> CUresult {
    if !allocations().contains_key(&(ptr as usize)) {
        return CUDA_ERROR_INVALID_VALUE;
    }
    let free = move || release(device_ptr(ptr), false);
    status(|| unsafe { streams::queue(stream, Box::new(free)) }.map(drop))
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuMemHostAlloc(
    ptr: *mut *mut c_void,
    bytes: usize,
    _flags: c_uint,
) -> CUresult {
    status(|| unsafe { put(ptr, allocate(bytes, Home::Host)?.cast()) })
}

/// As the driver, which synchronises: the work queued on the current device runs first, copies from
/// or to the memory among it.
#[unsafe(no_mangle)]
pub extern "C" fn cuMemFreeHost(ptr: *mut c_void) -> CUresult {
    if let Ok(device) = current_device() {
        let _ = streams::synchronize_device(device);
    }
    status(|| release(ptr.cast(), true))
}

/// Accepted, but the memory is not treated as page-locked: copies from it are taken when queued, as
/// from pageable memory, and copies to it are waited for (msa-cuda registers none).
#[unsafe(no_mangle)]
pub extern "C" fn cuMemHostRegister_v2(
    ptr: *mut c_void,
    _bytes: usize,
    _flags: c_uint,
) -> CUresult {
    if ptr.is_null() {
        CUDA_ERROR_INVALID_VALUE
    } else {
        CUDA_SUCCESS
    }
}

#[unsafe(no_mangle)]
pub extern "C" fn cuMemHostUnregister(_ptr: *mut c_void) -> CUresult {
    CUDA_SUCCESS
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuMemsetD8Async(
    dst: CUdeviceptr,
    value: u8,
    bytes: usize,
    stream: CUstream,
) -> CUresult {
    let set = move || {
        check_range(dst as usize, bytes)?;
        // SAFETY: inside one allocation.
        unsafe { std::ptr::write_bytes(device_ptr(dst), value, bytes) };
        Ok(())
    };
    status(|| {
        check_range(dst as usize, bytes)?;
        unsafe { streams::queue(stream, Box::new(set)) }.map(drop)
    })
}

/// Which ends of a copy are device memory (checked against the allocations; host memory cannot be).
#[derive(Clone, Copy)]
enum Direction {
    HostToDevice,
    DeviceToHost,
    DeviceToDevice,
}

/// Whether `bytes` at `ptr` lie in page-locked memory from cuMemHostAlloc.
fn page_locked(ptr: usize, bytes: usize) -> bool {
    matches!(
        allocations().range(..=ptr).next_back(),
        Some((&start, &(len, Home::Host))) if ptr.saturating_add(bytes) <= start + len
    )
}

/// The device ends of a copy, against the allocations.
fn check_ends(dst: usize, src: usize, bytes: usize, direction: Direction) -> Result<(), CUresult> {
    use Direction::*;
    if matches!(direction, HostToDevice | DeviceToDevice) {
        check_range(dst, bytes)?;
    }
    if matches!(direction, DeviceToHost | DeviceToDevice) {
        check_range(src, bytes)?;
    }
    Ok(())
}

/// Queues a copy (all memory is host memory here). As the driver: a copy from pageable memory takes
/// its bytes when queued, and one to pageable memory returns once it has run; page-locked memory is
/// read and written when the copy runs, so the host must wait for it. The device ends are checked
/// when the copy is queued and again when it runs.
unsafe fn copy(
    dst: usize,
    src: usize,
    bytes: usize,
    direction: Direction,
    stream: CUstream,
) -> CUresult {
    status(|| {
        if bytes == 0 {
            return Ok(());
        }
        if dst == 0 || src == 0 {
            return Err(CUDA_ERROR_INVALID_VALUE);
        }
        check_ends(dst, src, bytes, direction)?;
        let to_host = matches!(direction, Direction::DeviceToHost);
        // SAFETY: the caller passes a host source of `bytes`.
        let taken = (matches!(direction, Direction::HostToDevice) && !page_locked(src, bytes))
            .then(|| unsafe { std::slice::from_raw_parts(src as *const u8, bytes) }.to_vec());
        let work = move || {
            check_ends(dst, src, bytes, direction)?;
            let from = taken
                .as_ref()
                .map_or(src as *const u8, |bytes| bytes.as_ptr());
            // SAFETY: the device ends lie inside allocations; the host ends are the caller's, alive
            // until the copy has run.
            unsafe { std::ptr::copy(from, dst as *mut u8, bytes) };
            Ok(())
        };
        if to_host && !page_locked(dst, bytes) {
            unsafe { streams::queue_and_wait(stream, Box::new(work)) }
        } else {
            unsafe { streams::queue(stream, Box::new(work)) }.map(drop)
        }
    })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuMemcpyHtoDAsync_v2(
    dst: CUdeviceptr,
    src: *const c_void,
    bytes: usize,
    stream: CUstream,
) -> CUresult {
    unsafe {
        copy(
            dst as usize,
            src as usize,
            bytes,
            Direction::HostToDevice,
            stream,
        )
    }
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuMemcpyDtoHAsync_v2(
    dst: *mut c_void,
    src: CUdeviceptr,
    bytes: usize,
    stream: CUstream,
) -> CUresult {
    unsafe {
        copy(
            dst as usize,
            src as usize,
            bytes,
            Direction::DeviceToHost,
            stream,
        )
    }
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuMemcpyDtoDAsync_v2(
    dst: CUdeviceptr,
    src: CUdeviceptr,
    bytes: usize,
    stream: CUstream,
) -> CUresult {
    unsafe {
        copy(
            dst as usize,
            src as usize,
            bytes,
            Direction::DeviceToDevice,
            stream,
        )
    }
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuDeviceGetMemPool(pool: *mut CUmemoryPool, dev: CUdevice) -> CUresult {
    status(|| {
        check_device(dev)?;
        unsafe { put(pool, token(dev as usize).cast()) }
    })
}

#[unsafe(no_mangle)]
pub extern "C" fn cuMemPoolSetAttribute(
    pool: CUmemoryPool,
    _attribute: u32,
    value: *mut c_void,
) -> CUresult {
    if pool.is_null() || value.is_null() {
        CUDA_ERROR_INVALID_VALUE
    } else {
        CUDA_SUCCESS
    }
}

// ---- Modules and launches -------------------------------------------------------------------------------

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuModuleLoadData(module: *mut CUmodule, image: *const c_void) -> CUresult {
    if image.is_null() {
        return CUDA_ERROR_INVALID_VALUE;
    }
    // The image (NVRTC's) is not run: every kernel is already compiled for the CPU.
    status(|| unsafe { put(module, token(0).cast()) })
}

#[unsafe(no_mangle)]
pub extern "C" fn cuModuleUnload(_module: CUmodule) -> CUresult {
    CUDA_SUCCESS
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuModuleGetFunction(
    function: *mut CUfunction,
    _module: CUmodule,
    name: *const c_char,
) -> CUresult {
    if name.is_null() {
        return CUDA_ERROR_INVALID_VALUE;
    }
    // SAFETY: a NUL-terminated name; the table entry lives as long as the library.
    let kernel = unsafe { msa_emulator_kernel(name) };
    if kernel.is_null() {
        return CUDA_ERROR_NOT_FOUND;
    }
    status(|| unsafe { put(function, kernel as CUfunction) })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuLaunchKernel(
    function: CUfunction,
    gx: c_uint,
    gy: c_uint,
    gz: c_uint,
    bx: c_uint,
    by: c_uint,
    bz: c_uint,
    shared_bytes: c_uint,
    stream: CUstream,
    params: *mut *mut c_void,
    extra: *mut *mut c_void,
) -> CUresult {
    if function.is_null() || params.is_null() || !extra.is_null() {
        return CUDA_ERROR_INVALID_VALUE;
    }
    // The limits of every GPU since compute capability 3.0; kernels.cu declares its shared memory
    // statically.
    let threads = u64::from(bx) * u64::from(by) * u64::from(bz);
    if shared_bytes != 0
        || [gx, gy, gz, bx, by, bz].contains(&0)
        || threads > 1024
        || bx > 1024
        || by > 1024
        || bz > 64
        || gx > i32::MAX as u32
        || gy > 65535
        || gz > 65535
    {
        eprintln!(
            "msa-cuda-emulator: a launch of grid ({gx}, {gy}, {gz}), block ({bx}, {by}, {bz}), \
             {shared_bytes} bytes of dynamic shared memory is beyond a GPU's limits"
        );
        return CUDA_ERROR_INVALID_VALUE;
    }
    // SAFETY: `function` came from cuModuleGetFunction; `params` holds one pointer per argument,
    // read now, as the driver does.
    let launch = Launch {
        kernel: function as usize,
        args: unsafe { msa_emulator_bind(function.cast(), params) } as usize,
        grid: [gx, gy, gz],
        block: [bx, by, bz],
    };
    status(|| unsafe { streams::queue(stream, Box::new(move || launch.run())) }.map(drop))
}

/// A queued launch: the kernel and a copy of its arguments.
struct Launch {
    kernel: usize,
    args: usize,
    grid: [c_uint; 3],
    block: [c_uint; 3],
}

impl Launch {
    fn run(&self) -> Result<(), CUresult> {
        let mut error = [0 as c_char; 512];
        let ([gx, gy, gz], [bx, by, bz]) = (self.grid, self.block);
        // SAFETY: a kernel of the table and its bound arguments.
        let failed = unsafe {
            msa_emulator_launch(
                self.kernel as *const c_void,
                gx,
                gy,
                gz,
                bx,
                by,
                bz,
                self.args as *mut c_void,
                error.as_mut_ptr(),
                error.len(),
            )
        };
        if failed != 0 {
            // SAFETY: snprintf wrote a NUL-terminated message.
            let message = unsafe { CStr::from_ptr(error.as_ptr()) };
            eprintln!(
                "msa-cuda-emulator: launch failed: {}",
                message.to_string_lossy()
            );
            return Err(CUDA_ERROR_LAUNCH_FAILED);
        }
        Ok(())
    }
}

impl Drop for Launch {
    fn drop(&mut self) {
        // SAFETY: arguments bound for this kernel, freed once.
        unsafe { msa_emulator_unbind(self.kernel as *const c_void, self.args as *mut c_void) };
    }
}

/// `msa bench` marks its decode steps for a profiler; there is none here.
#[unsafe(no_mangle)]
pub extern "C" fn cuProfilerStart() -> CUresult {
    CUDA_SUCCESS
}

#[unsafe(no_mangle)]
pub extern "C" fn cuProfilerStop() -> CUresult {
    CUDA_SUCCESS
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuGetErrorString(error: u32, text: *mut *const c_char) -> CUresult {
    unsafe { cuGetErrorName(error, text) }
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuGetErrorName(error: u32, text: *mut *const c_char) -> CUresult {
    let names: [(CUresult, &'static CStr); 9] = [
        (CUDA_SUCCESS, c"CUDA_SUCCESS"),
        (
            CUDA_ERROR_INVALID_VALUE,
            c"CUDA_ERROR_INVALID_VALUE (msa-cuda-emulator printed why)",
        ),
        (CUDA_ERROR_OUT_OF_MEMORY, c"CUDA_ERROR_OUT_OF_MEMORY"),
        (CUDA_ERROR_INVALID_DEVICE, c"CUDA_ERROR_INVALID_DEVICE"),
        (CUDA_ERROR_INVALID_CONTEXT, c"CUDA_ERROR_INVALID_CONTEXT"),
        (CUDA_ERROR_INVALID_HANDLE, c"CUDA_ERROR_INVALID_HANDLE"),
        (CUDA_ERROR_NOT_FOUND, c"CUDA_ERROR_NOT_FOUND"),
        (CUDA_ERROR_NOT_SUPPORTED, c"CUDA_ERROR_NOT_SUPPORTED"),
        (
            CUDA_ERROR_LAUNCH_FAILED,
            c"CUDA_ERROR_LAUNCH_FAILED (msa-cuda-emulator printed why)",
        ),
    ];
    let name = names
        .iter()
        .find(|(code, _)| *code as u32 == error)
        .map_or(c"an error msa-cuda-emulator does not name", |(_, name)| {
            name
        });
    status(|| unsafe { put(text, name.as_ptr()) })
}

// ---- cuBLAS: the GEMMs msa-cuda calls, by the documented column-major contract --------------------------

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cublasCreate_v2(handle: *mut cublasHandle_t) -> cublasStatus_t {
    // A handle belongs to the device current when it is made.
    let Ok(device) = current_device() else {
        return cublasStatus_t::CUBLAS_STATUS_NOT_INITIALIZED;
    };
    let blas = Blas {
        device,
        stream: AtomicUsize::new(0),
    };
    match unsafe { hand_out(handle, blas) } {
        Ok(()) => cublasStatus_t::CUBLAS_STATUS_SUCCESS,
        Err(_) => cublasStatus_t::CUBLAS_STATUS_INVALID_VALUE,
    }
}

/// A cuBLAS handle: its device, and the stream its GEMMs are queued on (null at first).
struct Blas {
    device: CUdevice,
    stream: AtomicUsize,
}

/// The handle made by cublasCreate_v2, whose device must be the current one: cuBLAS runs its kernels
/// in the current context.
unsafe fn blas<'a>(handle: cublasHandle_t) -> Result<&'a Blas, cublasStatus_t> {
    // SAFETY: the caller passes a handle from cublasCreate_v2, not yet destroyed.
    let blas = unsafe { handle.cast::<Blas>().as_ref() }
        .ok_or(cublasStatus_t::CUBLAS_STATUS_NOT_INITIALIZED)?;
    let device = blas.device;
    match current_device() {
        Ok(current) if current == device => Ok(blas),
        current => {
            eprintln!(
                "msa-cuda-emulator: a cuBLAS call on device {device}'s handle while the current \
                 device is {current:?}"
            );
            Err(cublasStatus_t::CUBLAS_STATUS_EXECUTION_FAILED)
        }
    }
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cublasDestroy_v2(handle: cublasHandle_t) -> cublasStatus_t {
    match unsafe { take_back::<Blas, _>(handle) } {
        true => cublasStatus_t::CUBLAS_STATUS_SUCCESS,
        false => cublasStatus_t::CUBLAS_STATUS_NOT_INITIALIZED,
    }
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cublasSetStream_v2(
    handle: cublasHandle_t,
    stream: CUstream,
) -> cublasStatus_t {
    // SAFETY: the caller passes a handle from cublasCreate_v2, not yet destroyed.
    match unsafe { handle.cast::<Blas>().as_ref() } {
        Some(blas) => {
            blas.stream.store(stream as usize, Ordering::Relaxed);
            cublasStatus_t::CUBLAS_STATUS_SUCCESS
        }
        None => cublasStatus_t::CUBLAS_STATUS_NOT_INITIALIZED,
    }
}

/// The element types msa-cuda's GEMMs read.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Element {
    F32,
    Bf16,
    F16,
}

impl Element {
    fn from_raw(raw: u32) -> Option<Element> {
        [
            (cudaDataType::CUDA_R_32F, Element::F32),
            (cudaDataType::CUDA_R_16BF, Element::Bf16),
            (cudaDataType::CUDA_R_16F, Element::F16),
        ]
        .into_iter()
        .find(|(t, _)| *t as u32 == raw)
        .map(|(_, e)| e)
    }

    fn size(self) -> usize {
        if self == Element::F32 { 4 } else { 2 }
    }

    /// Element `index` of `data`.
    unsafe fn load(self, data: *const u8, index: usize) -> f64 {
        // SAFETY: the caller keeps `index` inside the operand, checked against its allocation.
        unsafe {
            let at = data.wrapping_add(index * self.size());
            match self {
                Element::F32 => f64::from(at.cast::<f32>().read_unaligned()),
                Element::Bf16 => f64::from(f32::from_bits(
                    u32::from(at.cast::<u16>().read_unaligned()) << 16,
                )),
                Element::F16 => {
                    f64::from(half::f16::from_bits(at.cast::<u16>().read_unaligned()).to_f32())
                }
            }
        }
    }
}

/// One operand of a GEMM as stored: `rows × cols` column-major with leading dimension `ld`, `batch`
/// of them `stride` elements apart.
#[derive(Clone, Copy)]
struct Operand {
    data: *const u8,
    element: Element,
    rows: i64,
    cols: i64,
    ld: i64,
    stride: i64,
}

impl Operand {
    /// cuBLAS's checks, then the operand's bytes against its allocation, on `device`.
    fn check(&self, batch: i64, device: CUdevice) -> Result<(), cublasStatus_t> {
        let invalid = cublasStatus_t::CUBLAS_STATUS_INVALID_VALUE;
        if self.ld < self.rows.max(1) {
            return Err(invalid);
        }
        if self.rows == 0 || self.cols == 0 || batch == 0 {
            return Ok(());
        }
        let last = (self.rows - 1) + (self.cols - 1) * self.ld + (batch - 1) * self.stride;
        let bytes = usize::try_from(last + 1).map_err(|_| invalid)? * self.element.size();
        check_on(self.data as usize, bytes, device).map_err(|_| invalid)
    }

    /// Stored element (row, col) of GEMM `g` of the batch.
    unsafe fn at(&self, g: i64, row: i64, col: i64) -> f64 {
        // SAFETY: inside the operand, which `check` found inside its allocation.
        unsafe {
            self.element
                .load(self.data, (g * self.stride + row + col * self.ld) as usize)
        }
    }
}

/// `batch` GEMMs C = alpha · op(A) · op(B) + beta · C, column-major, C of f32 (the only output
/// msa-cuda asks for), summed in f64, on the device of `handle`: checked now, queued on the handle's
/// stream.
#[allow(clippy::too_many_arguments)]
unsafe fn gemm(
    handle: cublasHandle_t,
    (transa, transb): (u32, u32),
    (m, n, k): (c_int, c_int, c_int),
    (alpha, beta): (f32, f32),
    a: (*const u8, Element, c_int, i64),
    b: (*const u8, Element, c_int, i64),
    c: (*mut f32, c_int, i64),
    batch: c_int,
) -> cublasStatus_t {
    let transposed = |op: u32| match op {
        op if op == cublasOperation_t::CUBLAS_OP_N as u32 => Some(false),
        op if op == cublasOperation_t::CUBLAS_OP_T as u32 => Some(true),
        _ => None,
    };
    let (Some(ta), Some(tb)) = (transposed(transa), transposed(transb)) else {
        return cublasStatus_t::CUBLAS_STATUS_NOT_SUPPORTED;
    };
    if m < 0 || n < 0 || k < 0 || batch < 0 {
        return cublasStatus_t::CUBLAS_STATUS_INVALID_VALUE;
    }
    let blas = match unsafe { blas(handle) } {
        Ok(blas) => blas,
        Err(status) => return status,
    };
    let (m, n, k, batch) = (i64::from(m), i64::from(n), i64::from(k), i64::from(batch));
    // Stored shapes: op(A) is m × k, so A is k × m when transposed; op(B) is k × n.
    let operand = |(data, element, ld, stride): (*const u8, Element, c_int, i64), t, rows, cols| {
        let (rows, cols) = if t { (cols, rows) } else { (rows, cols) };
        Operand {
            data,
            element,
            rows,
            cols,
            ld: i64::from(ld),
            stride,
        }
    };
    let (a, b) = (operand(a, ta, m, k), operand(b, tb, k, n));
    let c_operand = Operand {
        data: c.0.cast(),
        element: Element::F32,
        rows: m,
        cols: n,
        ld: i64::from(c.1),
        stride: c.2,
    };
    for (operand, name) in [(a, "A"), (b, "B"), (c_operand, "C")] {
        if let Err(status) = operand.check(batch, blas.device) {
            eprintln!(
                "msa-cuda-emulator: a GEMM's {name} is malformed, or not inside one allocation of \
                 its device"
            );
            return status;
        }
    }
    let product = Product {
        device: blas.device,
        transposed: (ta, tb),
        mnk: (m, n, k),
        scalars: (alpha, beta),
        a,
        b,
        c: c_operand,
        batch,
    };
    let stream = blas.stream.load(Ordering::Relaxed) as CUstream;
    match unsafe { streams::queue(stream, Box::new(move || product.run())) } {
        Ok(_) => cublasStatus_t::CUBLAS_STATUS_SUCCESS,
        Err(_) => cublasStatus_t::CUBLAS_STATUS_EXECUTION_FAILED,
    }
}

/// A checked GEMM, queued.
struct Product {
    device: CUdevice,
    transposed: (bool, bool),
    mnk: (i64, i64, i64),
    scalars: (f32, f32),
    a: Operand,
    b: Operand,
    c: Operand,
    batch: i64,
}

// SAFETY: the operands are device memory, which any thread may touch: the stream runs the product
// once, in order.
unsafe impl Send for Product {}

impl Product {
    fn run(&self) -> Result<(), CUresult> {
        // Memory freed since the GEMM was queued is refused, not touched.
        for operand in [&self.a, &self.b, &self.c] {
            operand
                .check(self.batch, self.device)
                .map_err(|_| CUDA_ERROR_INVALID_VALUE)?;
        }
        let Product {
            device: _,
            transposed: (ta, tb),
            mnk: (m, n, k),
            scalars: (alpha, beta),
            a,
            b,
            c,
            batch,
        } = *self;
        let out = c.data.cast_mut().cast::<f32>();
        for g in 0..batch {
            for col in 0..n {
                for row in 0..m {
                    let mut sum = 0.0f64;
                    for l in 0..k {
                        // SAFETY: op(A) (m × k) and op(B) (k × n) were checked above.
                        let (x, y) = unsafe {
                            (
                                if ta { a.at(g, l, row) } else { a.at(g, row, l) },
                                if tb { b.at(g, col, l) } else { b.at(g, l, col) },
                            )
                        };
                        sum += x * y;
                    }
                    let index = (g * c.stride + row + col * c.ld) as usize;
                    // SAFETY: inside C, checked when queued; f32 allocations are aligned.
                    let out = unsafe { &mut *out.wrapping_add(index) };
                    // beta == 0 ignores C's old value (it may be NaN), as cuBLAS does.
                    let old = if beta == 0.0 {
                        0.0
                    } else {
                        f64::from(beta) * f64::from(*out)
                    };
                    *out = (f64::from(alpha) * sum + old) as f32;
                }
            }
        }
        Ok(())
    }
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cublasSgemm_v2(
    handle: cublasHandle_t,
    transa: u32,
    transb: u32,
    m: c_int,
    n: c_int,
    k: c_int,
    alpha: *const f32,
    a: *const f32,
    lda: c_int,
    b: *const f32,
    ldb: c_int,
    beta: *const f32,
    c: *mut f32,
    ldc: c_int,
) -> cublasStatus_t {
    if alpha.is_null() || beta.is_null() {
        return cublasStatus_t::CUBLAS_STATUS_INVALID_VALUE;
    }
    // SAFETY: host scalars; the operands are checked against their allocations.
    unsafe {
        gemm(
            handle,
            (transa, transb),
            (m, n, k),
            (*alpha, *beta),
            (a.cast(), Element::F32, lda, 0),
            (b.cast(), Element::F32, ldb, 0),
            (c, ldc, 0),
            1,
        )
    }
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cublasGemmEx(
    handle: cublasHandle_t,
    transa: u32,
    transb: u32,
    m: c_int,
    n: c_int,
    k: c_int,
    alpha: *const c_void,
    a: *const c_void,
    a_type: u32,
    lda: c_int,
    b: *const c_void,
    b_type: u32,
    ldb: c_int,
    beta: *const c_void,
    c: *mut c_void,
    c_type: u32,
    ldc: c_int,
    compute: u32,
    algo: c_int,
) -> cublasStatus_t {
    unsafe {
        cublasGemmStridedBatchedEx(
            handle, transa, transb, m, n, k, alpha, a, a_type, lda, 0, b, b_type, ldb, 0, beta, c,
            c_type, ldc, 0, 1, compute, algo,
        )
    }
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cublasGemmStridedBatchedEx(
    handle: cublasHandle_t,
    transa: u32,
    transb: u32,
    m: c_int,
    n: c_int,
    k: c_int,
    alpha: *const c_void,
    a: *const c_void,
    a_type: u32,
    lda: c_int,
    stride_a: c_longlong,
    b: *const c_void,
    b_type: u32,
    ldb: c_int,
    stride_b: c_longlong,
    beta: *const c_void,
    c: *mut c_void,
    c_type: u32,
    ldc: c_int,
    stride_c: c_longlong,
    batch: c_int,
    compute: u32,
    _algo: c_int,
) -> cublasStatus_t {
    if alpha.is_null() || beta.is_null() {
        return cublasStatus_t::CUBLAS_STATUS_INVALID_VALUE;
    }
    // msa-cuda computes in f32 (scalars f32) into f32 outputs, A and B of one type.
    let (Some(a_element), Some(b_element)) = (Element::from_raw(a_type), Element::from_raw(b_type))
    else {
        return cublasStatus_t::CUBLAS_STATUS_NOT_SUPPORTED;
    };
    if compute != cublasComputeType_t::CUBLAS_COMPUTE_32F as u32
        || c_type != cudaDataType::CUDA_R_32F as u32
        || a_element != b_element
    {
        return cublasStatus_t::CUBLAS_STATUS_NOT_SUPPORTED;
    }
    // SAFETY: host scalars of f32 (CUBLAS_COMPUTE_32F); the operands are checked against their
    // allocations.
    unsafe {
        gemm(
            handle,
            (transa, transb),
            (m, n, k),
            (*alpha.cast::<f32>(), *beta.cast::<f32>()),
            (a.cast(), a_element, lda, stride_a),
            (b.cast(), b_element, ldb, stride_b),
            (c.cast(), ldc, stride_c),
            batch,
        )
    }
}
