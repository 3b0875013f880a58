//! A stand-in for the CUDA driver (`libcuda.so`) and cuBLAS (`libcublas.so`) that runs msa-cuda on the
//! CPU, so its tests run on machines without an NVIDIA GPU (CI). cudarc loads both libraries at run
//! time by name; `cargo xtask test` links this library under those names in a folder on
//! `LD_LIBRARY_PATH` and runs msa-cuda's GPU tests against it.
//!
//! What runs is msa-cuda itself: its Rust code, its launches and cuBLAS calls, and its kernels —
//! kernels.cu compiled by the host C++ compiler (emulator.cpp), each block's threads run as fibers.
//! NVRTC is the real one: the kernels are also compiled for the GPU, and the module it makes is
//! accepted and ignored. What is emulated:
//! - device memory is host memory, filled with 0xff bytes when allocated (f32 NaN, u32 `!0`), so a
//!   kernel or copy that reads memory nothing wrote shows up in the results;
//! - every operation runs when it is queued, in queue order across streams; that is one valid order of
//!   any correctly synchronised program, so results are right but missing synchronisation goes
//!   unnoticed;
//! - cuBLAS GEMMs follow its documented column-major contract, accumulating in f64.
//!
//! `MSA_CUDA_EMULATOR_DEVICES` sets how many devices it reports (1 by default); each reports itself as
//! an sm_90 GPU with memory pools and an H100's 132 multiprocessors, so msa-cuda takes the paths it
//! takes there.

//!
//! It is built for x86-64 Linux only (elsewhere the crate is empty), the platform of the NVRTC wheel
//! `cargo xtask test` fetches.

#![cfg(all(target_os = "linux", target_arch = "x86_64"))]
#![allow(non_snake_case)]
#![allow(clippy::missing_safety_doc)]

use std::ffi::{CStr, c_char, c_int, c_longlong, c_uint, c_void};
use std::time::Instant;

use cudarc::cublas::sys::{
    cublasComputeType_t, cublasGemmAlgo_t, cublasHandle_t, cublasOperation_t, cublasStatus_t,
    cudaDataType,
};
use cudarc::driver::sys::{
    CUcontext, CUdevice, CUdevice_attribute, CUdeviceptr, CUevent, CUfunction, CUmemPool_attribute,
    CUmemoryPool, CUmodule, CUresult, CUstream,
};

unsafe extern "C" {
    fn msa_emulator_kernel(name: *const c_char) -> *const c_void;
    #[allow(clippy::too_many_arguments)]
    fn msa_emulator_launch(
        kernel: *const c_void,
        gx: c_uint,
        gy: c_uint,
        gz: c_uint,
        bx: c_uint,
        by: c_uint,
        bz: c_uint,
        params: *mut *mut c_void,
        error: *mut c_char,
        error_len: usize,
    ) -> c_int;
}

use CUresult::{
    CUDA_ERROR_INVALID_DEVICE, CUDA_ERROR_INVALID_VALUE, CUDA_ERROR_LAUNCH_FAILED,
    CUDA_ERROR_NOT_FOUND, CUDA_ERROR_NOT_SUPPORTED, CUDA_ERROR_OUT_OF_MEMORY, CUDA_SUCCESS,
};

/// How many devices it reports.
fn device_count() -> c_int {
    std::env::var("MSA_CUDA_EMULATOR_DEVICES")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(1)
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

/// A handle that is a non-null pointer and nothing else (contexts, pools, modules, streams).
fn token(n: usize) -> *mut c_void {
    ((n + 1) * 64) as *mut c_void
}

// ---- Memory: host allocations with their size in a header, aligned as cudaMalloc's -----------------

const ALIGN: usize = 256;

fn allocate(bytes: usize) -> Result<*mut u8, CUresult> {
    let layout = std::alloc::Layout::from_size_align(bytes + ALIGN, ALIGN)
        .map_err(|_| CUDA_ERROR_OUT_OF_MEMORY)?;
    // SAFETY: the layout has a non-zero size.
    let base = unsafe { std::alloc::alloc(layout) };
    if base.is_null() {
        return Err(CUDA_ERROR_OUT_OF_MEMORY);
    }
    // SAFETY: the header and the `bytes` after it lie inside the allocation.
    unsafe {
        base.cast::<usize>().write(bytes);
        std::ptr::write_bytes(base.add(ALIGN), 0xff, bytes);
        Ok(base.add(ALIGN))
    }
}

unsafe fn release(ptr: *mut u8) -> Result<(), CUresult> {
    if ptr.is_null() {
        return Err(CUDA_ERROR_INVALID_VALUE);
    }
    // SAFETY: `ptr` came from `allocate`, which put the size in the header before it.
    unsafe {
        let base = ptr.sub(ALIGN);
        let bytes = base.cast::<usize>().read();
        std::alloc::dealloc(
            base,
            std::alloc::Layout::from_size_align_unchecked(bytes + ALIGN, ALIGN),
        );
    }
    Ok(())
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
    attribute: CUdevice_attribute,
    dev: CUdevice,
) -> CUresult {
    use CUdevice_attribute::*;
    status(|| {
        check_device(dev)?;
        let answer = match attribute {
            CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR => 9,
            CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR => 0,
            // An H100's: msa-cuda sizes some launches by it (split-KV attention when decoding).
            CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT => 132,
            CU_DEVICE_ATTRIBUTE_MEMORY_POOLS_SUPPORTED => 1,
            CU_DEVICE_ATTRIBUTE_WARP_SIZE => 32,
            CU_DEVICE_ATTRIBUTE_MAX_THREADS_PER_BLOCK => 1024,
            other => {
                eprintln!("msa-cuda-emulator: device attribute {other:?} is not emulated");
                return Err(CUDA_ERROR_NOT_SUPPORTED);
            }
        };
        unsafe { put(value, answer) }
    })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuDeviceTotalMem_v2(bytes: *mut usize, dev: CUdevice) -> CUresult {
    status(|| {
        check_device(dev)?;
        unsafe { put(bytes, 8 << 30) }
    })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuMemGetInfo_v2(free: *mut usize, total: *mut usize) -> CUresult {
    status(|| unsafe {
        put(free, 8 << 30)?;
        put(total, 8 << 30)
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

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuCtxGetDevice(device: *mut CUdevice) -> CUresult {
    let ctx = CURRENT.get() as usize;
    status(|| unsafe { put(device, (ctx / 64).saturating_sub(1) as CUdevice) })
}

#[unsafe(no_mangle)]
pub extern "C" fn cuCtxSynchronize() -> CUresult {
    CUDA_SUCCESS
}

// ---- Streams and events: work runs when queued, so they only order and time ---------------------------

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuStreamCreate(stream: *mut CUstream, _flags: c_uint) -> CUresult {
    status(|| unsafe { put(stream, Box::into_raw(Box::new(0u8)).cast()) })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuStreamDestroy_v2(stream: CUstream) -> CUresult {
    if stream.is_null() {
        return CUDA_ERROR_INVALID_VALUE;
    }
    // SAFETY: made by cuStreamCreate.
    drop(unsafe { Box::from_raw(stream.cast::<u8>()) });
    CUDA_SUCCESS
}

#[unsafe(no_mangle)]
pub extern "C" fn cuStreamSynchronize(_stream: CUstream) -> CUresult {
    CUDA_SUCCESS
}

#[unsafe(no_mangle)]
pub extern "C" fn cuStreamQuery(_stream: CUstream) -> CUresult {
    CUDA_SUCCESS
}

#[unsafe(no_mangle)]
pub extern "C" fn cuStreamWaitEvent(
    _stream: CUstream,
    _event: CUevent,
    _flags: c_uint,
) -> CUresult {
    CUDA_SUCCESS
}

/// An event: when it was last recorded.
struct Event(Option<Instant>);

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuEventCreate(event: *mut CUevent, _flags: c_uint) -> CUresult {
    status(|| unsafe { put(event, Box::into_raw(Box::new(Event(None))).cast()) })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuEventDestroy_v2(event: CUevent) -> CUresult {
    if event.is_null() {
        return CUDA_ERROR_INVALID_VALUE;
    }
    // SAFETY: made by cuEventCreate.
    drop(unsafe { Box::from_raw(event.cast::<Event>()) });
    CUDA_SUCCESS
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuEventRecord(event: CUevent, _stream: CUstream) -> CUresult {
    if event.is_null() {
        return CUDA_ERROR_INVALID_VALUE;
    }
    // SAFETY: made by cuEventCreate; the caller does not record it from two threads at once.
    unsafe { (*event.cast::<Event>()).0 = Some(Instant::now()) };
    CUDA_SUCCESS
}

#[unsafe(no_mangle)]
pub extern "C" fn cuEventSynchronize(_event: CUevent) -> CUresult {
    CUDA_SUCCESS
}

#[unsafe(no_mangle)]
pub extern "C" fn cuEventQuery(_event: CUevent) -> CUresult {
    CUDA_SUCCESS
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuEventElapsedTime(
    ms: *mut f32,
    start: CUevent,
    end: CUevent,
) -> CUresult {
    if start.is_null() || end.is_null() {
        return CUDA_ERROR_INVALID_VALUE;
    }
    // SAFETY: made by cuEventCreate.
    let (start, end) = unsafe { ((*start.cast::<Event>()).0, (*end.cast::<Event>()).0) };
    match (start, end) {
        (Some(start), Some(end)) => {
            status(|| unsafe { put(ms, end.saturating_duration_since(start).as_secs_f32() * 1e3) })
        }
        _ => CUresult::CUDA_ERROR_NOT_READY,
    }
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
    status(|| unsafe { put(ptr, allocate(bytes)? as CUdeviceptr) })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuMemAllocAsync(
    ptr: *mut CUdeviceptr,
    bytes: usize,
    _stream: CUstream,
) -> CUresult {
    unsafe { cuMemAlloc_v2(ptr, bytes) }
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuMemFree_v2(ptr: CUdeviceptr) -> CUresult {
    status(|| unsafe { release(device_ptr(ptr)) })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuMemFreeAsync(ptr: CUdeviceptr, _stream: CUstream) -> CUresult {
    unsafe { cuMemFree_v2(ptr) }
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuMemHostAlloc(
    ptr: *mut *mut c_void,
    bytes: usize,
    _flags: c_uint,
) -> CUresult {
    status(|| unsafe { put(ptr, allocate(bytes)?.cast()) })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuMemFreeHost(ptr: *mut c_void) -> CUresult {
    status(|| unsafe { release(ptr.cast()) })
}

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
    _stream: CUstream,
) -> CUresult {
    // SAFETY: the caller passes memory it allocated, at least `bytes` long.
    unsafe { std::ptr::write_bytes(device_ptr(dst), value, bytes) };
    CUDA_SUCCESS
}

/// Copies between two of its allocations or host memory: all are host memory here.
unsafe fn copy(dst: *mut u8, src: *const u8, bytes: usize) -> CUresult {
    if bytes > 0 && (dst.is_null() || src.is_null()) {
        return CUDA_ERROR_INVALID_VALUE;
    }
    // SAFETY: the caller passes `bytes` readable at `src` and writable at `dst`; copies may overlap.
    unsafe { std::ptr::copy(src, dst, bytes) };
    CUDA_SUCCESS
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuMemcpyHtoDAsync_v2(
    dst: CUdeviceptr,
    src: *const c_void,
    bytes: usize,
    _stream: CUstream,
) -> CUresult {
    unsafe { copy(device_ptr(dst), src.cast(), bytes) }
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuMemcpyDtoHAsync_v2(
    dst: *mut c_void,
    src: CUdeviceptr,
    bytes: usize,
    _stream: CUstream,
) -> CUresult {
    unsafe { copy(dst.cast(), device_ptr(src), bytes) }
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuMemcpyDtoDAsync_v2(
    dst: CUdeviceptr,
    src: CUdeviceptr,
    bytes: usize,
    _stream: CUstream,
) -> CUresult {
    unsafe { copy(device_ptr(dst), device_ptr(src), bytes) }
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
    _attribute: CUmemPool_attribute,
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
    _stream: CUstream,
    params: *mut *mut c_void,
    extra: *mut *mut c_void,
) -> CUresult {
    if function.is_null() || params.is_null() || !extra.is_null() {
        return CUDA_ERROR_INVALID_VALUE;
    }
    // kernels.cu declares its shared memory statically.
    if shared_bytes != 0 || [gx, gy, gz, bx, by, bz].contains(&0) || bx * by * bz > 1024 {
        return CUDA_ERROR_INVALID_VALUE;
    }
    let mut error = [0 as c_char; 512];
    // SAFETY: `function` came from cuModuleGetFunction; `params` holds one pointer per argument.
    let failed = unsafe {
        msa_emulator_launch(
            function.cast(),
            gx,
            gy,
            gz,
            bx,
            by,
            bz,
            params,
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
        return CUDA_ERROR_LAUNCH_FAILED;
    }
    CUDA_SUCCESS
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuGetErrorString(error: CUresult, text: *mut *const c_char) -> CUresult {
    unsafe { cuGetErrorName(error, text) }
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuGetErrorName(error: CUresult, text: *mut *const c_char) -> CUresult {
    let name: &'static CStr = match error {
        CUDA_SUCCESS => c"CUDA_SUCCESS",
        CUDA_ERROR_INVALID_VALUE => c"CUDA_ERROR_INVALID_VALUE",
        CUDA_ERROR_OUT_OF_MEMORY => c"CUDA_ERROR_OUT_OF_MEMORY",
        CUDA_ERROR_INVALID_DEVICE => c"CUDA_ERROR_INVALID_DEVICE",
        CUDA_ERROR_NOT_FOUND => c"CUDA_ERROR_NOT_FOUND",
        CUDA_ERROR_NOT_SUPPORTED => c"CUDA_ERROR_NOT_SUPPORTED",
        CUDA_ERROR_LAUNCH_FAILED => {
            c"CUDA_ERROR_LAUNCH_FAILED (msa-cuda-emulator printed why to stderr)"
        }
        _ => c"an error msa-cuda-emulator does not name",
    };
    status(|| unsafe { put(text, name.as_ptr()) })
}

// ---- cuBLAS: the GEMMs msa-cuda calls, by the documented column-major contract --------------------------

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cublasCreate_v2(handle: *mut cublasHandle_t) -> cublasStatus_t {
    if handle.is_null() {
        return cublasStatus_t::CUBLAS_STATUS_INVALID_VALUE;
    }
    // SAFETY: checked non-null.
    unsafe { handle.write(Box::into_raw(Box::new(0u8)).cast()) };
    cublasStatus_t::CUBLAS_STATUS_SUCCESS
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cublasDestroy_v2(handle: cublasHandle_t) -> cublasStatus_t {
    if handle.is_null() {
        return cublasStatus_t::CUBLAS_STATUS_NOT_INITIALIZED;
    }
    // SAFETY: made by cublasCreate_v2.
    drop(unsafe { Box::from_raw(handle.cast::<u8>()) });
    cublasStatus_t::CUBLAS_STATUS_SUCCESS
}

#[unsafe(no_mangle)]
pub extern "C" fn cublasSetStream_v2(handle: cublasHandle_t, _stream: CUstream) -> cublasStatus_t {
    if handle.is_null() {
        cublasStatus_t::CUBLAS_STATUS_NOT_INITIALIZED
    } else {
        cublasStatus_t::CUBLAS_STATUS_SUCCESS
    }
}

/// One operand of a GEMM: its elements, type, leading dimension and whether it is transposed.
struct Operand {
    data: *const u8,
    dtype: cudaDataType,
    ld: i64,
    transposed: bool,
}

impl Operand {
    /// Element (row, col) of op(X).
    unsafe fn at(&self, row: i64, col: i64) -> f64 {
        let (r, c) = if self.transposed {
            (col, row)
        } else {
            (row, col)
        };
        let index = (r + c * self.ld) as usize;
        // SAFETY: the caller's dimensions keep (r, c) inside the operand.
        unsafe { load(self.data, self.dtype, index) }
    }
}

unsafe fn load(data: *const u8, dtype: cudaDataType, index: usize) -> f64 {
    // SAFETY: the caller keeps `index` inside the buffer of `dtype` elements.
    unsafe {
        match dtype {
            cudaDataType::CUDA_R_32F => f64::from(data.cast::<f32>().add(index).read_unaligned()),
            cudaDataType::CUDA_R_16BF => f64::from(f32::from_bits(
                u32::from(data.cast::<u16>().add(index).read_unaligned()) << 16,
            )),
            _ => f64::from(
                half::f16::from_bits(data.cast::<u16>().add(index).read_unaligned()).to_f32(),
            ),
        }
    }
}

fn supported(dtype: cudaDataType) -> bool {
    matches!(
        dtype,
        cudaDataType::CUDA_R_32F | cudaDataType::CUDA_R_16BF | cudaDataType::CUDA_R_16F
    )
}

/// C = alpha · op(A) · op(B) + beta · C, column-major, C of f32 (the only output msa-cuda asks for).
#[allow(clippy::too_many_arguments)]
unsafe fn gemm(
    transa: cublasOperation_t,
    transb: cublasOperation_t,
    (m, n, k): (c_int, c_int, c_int),
    alpha: f32,
    a: Operand,
    b: Operand,
    beta: f32,
    c: *mut f32,
    ldc: c_int,
) -> cublasStatus_t {
    let transposed = |op| match op {
        cublasOperation_t::CUBLAS_OP_N => Some(false),
        cublasOperation_t::CUBLAS_OP_T => Some(true),
        _ => None,
    };
    let (Some(ta), Some(tb)) = (transposed(transa), transposed(transb)) else {
        return cublasStatus_t::CUBLAS_STATUS_NOT_SUPPORTED;
    };
    let (a, b) = (
        Operand {
            transposed: ta,
            ..a
        },
        Operand {
            transposed: tb,
            ..b
        },
    );
    // cuBLAS's own argument checks: a leading dimension shorter than its column is refused.
    let rows = |t: bool, rows: c_int, cols: c_int| if t { cols } else { rows };
    if m < 0
        || n < 0
        || k < 0
        || a.ld < i64::from(rows(ta, m, k).max(1))
        || b.ld < i64::from(rows(tb, k, n).max(1))
        || ldc < m.max(1)
    {
        return cublasStatus_t::CUBLAS_STATUS_INVALID_VALUE;
    }
    let (m, n, k) = (i64::from(m), i64::from(n), i64::from(k));
    for col in 0..n {
        for row in 0..m {
            let mut sum = 0.0f64;
            for l in 0..k {
                // SAFETY: inside op(A) (m × k) and op(B) (k × n) by the checks above.
                sum += unsafe { a.at(row, l) * b.at(l, col) };
            }
            // SAFETY: C holds ldc × n elements.
            let out = unsafe { &mut *c.add((row + col * i64::from(ldc)) as usize) };
            // beta == 0 ignores C's old value (it may be NaN), as cuBLAS does.
            let old = if beta == 0.0 {
                0.0
            } else {
                f64::from(beta) * f64::from(*out)
            };
            *out = (f64::from(alpha) * sum + old) as f32;
        }
    }
    cublasStatus_t::CUBLAS_STATUS_SUCCESS
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cublasSgemm_v2(
    handle: cublasHandle_t,
    transa: cublasOperation_t,
    transb: cublasOperation_t,
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
    if handle.is_null() || alpha.is_null() || beta.is_null() {
        return cublasStatus_t::CUBLAS_STATUS_INVALID_VALUE;
    }
    let operand = |data: *const f32, ld: c_int| Operand {
        data: data.cast(),
        dtype: cudaDataType::CUDA_R_32F,
        ld: i64::from(ld),
        transposed: false,
    };
    // SAFETY: the caller's pointers hold the operands of the shapes given.
    unsafe {
        gemm(
            transa,
            transb,
            (m, n, k),
            *alpha,
            operand(a, lda),
            operand(b, ldb),
            *beta,
            c,
            ldc,
        )
    }
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cublasGemmEx(
    handle: cublasHandle_t,
    transa: cublasOperation_t,
    transb: cublasOperation_t,
    m: c_int,
    n: c_int,
    k: c_int,
    alpha: *const c_void,
    a: *const c_void,
    a_type: cudaDataType,
    lda: c_int,
    b: *const c_void,
    b_type: cudaDataType,
    ldb: c_int,
    beta: *const c_void,
    c: *mut c_void,
    c_type: cudaDataType,
    ldc: c_int,
    compute: cublasComputeType_t,
    algo: cublasGemmAlgo_t,
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
    transa: cublasOperation_t,
    transb: cublasOperation_t,
    m: c_int,
    n: c_int,
    k: c_int,
    alpha: *const c_void,
    a: *const c_void,
    a_type: cudaDataType,
    lda: c_int,
    stride_a: c_longlong,
    b: *const c_void,
    b_type: cudaDataType,
    ldb: c_int,
    stride_b: c_longlong,
    beta: *const c_void,
    c: *mut c_void,
    c_type: cudaDataType,
    ldc: c_int,
    stride_c: c_longlong,
    batch: c_int,
    compute: cublasComputeType_t,
    _algo: cublasGemmAlgo_t,
) -> cublasStatus_t {
    if handle.is_null() || alpha.is_null() || beta.is_null() || batch < 0 {
        return cublasStatus_t::CUBLAS_STATUS_INVALID_VALUE;
    }
    // msa-cuda computes in f32 (scalars f32) into f32 outputs.
    if compute != cublasComputeType_t::CUBLAS_COMPUTE_32F
        || c_type != cudaDataType::CUDA_R_32F
        || !supported(a_type)
        || !supported(b_type)
    {
        return cublasStatus_t::CUBLAS_STATUS_NOT_SUPPORTED;
    }
    let size = |dtype| {
        if dtype == cudaDataType::CUDA_R_32F {
            4
        } else {
            2
        }
    };
    for g in 0..i64::from(batch) {
        // SAFETY: the caller's pointers hold `batch` operands `stride` elements apart.
        let status = unsafe {
            gemm(
                transa,
                transb,
                (m, n, k),
                *alpha.cast::<f32>(),
                Operand {
                    data: a
                        .cast::<u8>()
                        .offset((g * stride_a * size(a_type)) as isize),
                    dtype: a_type,
                    ld: i64::from(lda),
                    transposed: false,
                },
                Operand {
                    data: b
                        .cast::<u8>()
                        .offset((g * stride_b * size(b_type)) as isize),
                    dtype: b_type,
                    ld: i64::from(ldb),
                    transposed: false,
                },
                *beta.cast::<f32>(),
                c.cast::<f32>().offset((g * stride_c) as isize),
                ldc,
            )
        };
        if status != cublasStatus_t::CUBLAS_STATUS_SUCCESS {
            return status;
        }
    }
    cublasStatus_t::CUBLAS_STATUS_SUCCESS
}
