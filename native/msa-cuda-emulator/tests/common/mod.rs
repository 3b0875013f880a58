//! Helpers of the emulator's tests: a current device, memory on it, and reading it back.

use cudarc::driver::sys::{CUdevice, CUdeviceptr, CUresult, CUstream};
use msa_cuda_emulator as cuda;

/// Makes `device`'s primary context current on this thread, where allocations, streams and cuBLAS
/// handles go.
pub fn make_current(device: CUdevice) {
    let mut ctx = std::ptr::null_mut();
    // SAFETY: an out-pointer, then the context it returned.
    unsafe {
        assert_eq!(
            cuda::cuDevicePrimaryCtxRetain(&mut ctx, device),
            CUresult::CUDA_SUCCESS
        );
        assert_eq!(cuda::cuCtxSetCurrent(ctx), CUresult::CUDA_SUCCESS);
    }
}

/// Memory of the current device holding `data`.
pub fn device<T: Copy>(data: &[T]) -> CUdeviceptr {
    let bytes = std::mem::size_of_val(data);
    let mut ptr: CUdeviceptr = 0;
    // SAFETY: an out-pointer, then `bytes` copied into the new allocation of that size.
    unsafe {
        assert_eq!(cuda::cuMemAlloc_v2(&mut ptr, bytes), CUresult::CUDA_SUCCESS);
        let copied =
            cuda::cuMemcpyHtoDAsync_v2(ptr, data.as_ptr().cast(), bytes, std::ptr::null_mut());
        assert_eq!(copied, CUresult::CUDA_SUCCESS);
    }
    ptr
}

pub fn read<T: Copy + Default>(ptr: CUdeviceptr, len: usize) -> Vec<T> {
    let mut out = vec![T::default(); len];
    // SAFETY: `len` elements read from an allocation at least that long (checked by the stand-in).
    let copied = unsafe {
        cuda::cuMemcpyDtoHAsync_v2(
            out.as_mut_ptr().cast(),
            ptr,
            std::mem::size_of_val(out.as_slice()),
            std::ptr::null_mut(),
        )
    };
    assert_eq!(copied, CUresult::CUDA_SUCCESS);
    out
}

/// A stream of the current device.
pub fn stream() -> CUstream {
    let mut stream = std::ptr::null_mut();
    // SAFETY: an out-pointer.
    assert_eq!(
        unsafe { cuda::cuStreamCreate(&mut stream, 0) },
        CUresult::CUDA_SUCCESS
    );
    stream
}
