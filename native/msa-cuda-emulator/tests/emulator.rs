//! The emulator itself: its scheduler (barriers, shuffles, block indices), its refusal of launches a GPU
//! would get wrong, and its GEMM against hand-computed products. msa-cuda's own tests run on it from
//! `cargo xtask test` (see the README).

#![cfg(all(target_os = "linux", target_arch = "x86_64"))]

use std::ffi::{CStr, c_void};

use cudarc::cublas::sys::{
    cublasComputeType_t, cublasGemmAlgo_t, cublasOperation_t, cublasStatus_t, cudaDataType,
};
use cudarc::driver::sys::{CUdeviceptr, CUfunction, CUresult};
use msa_cuda_emulator as cuda;

/// One argument of a launch, as cuLaunchKernel takes them: a pointer to its value.
enum Arg {
    Ptr(CUdeviceptr),
    U32(u32),
}

fn launch(kernel: &CStr, grid: u32, block: u32, args: &[Arg]) -> CUresult {
    let mut function: CUfunction = std::ptr::null_mut();
    // SAFETY: a NUL-terminated name and an out-pointer.
    let found =
        unsafe { cuda::cuModuleGetFunction(&mut function, std::ptr::null_mut(), kernel.as_ptr()) };
    assert_eq!(found, CUresult::CUDA_SUCCESS, "{kernel:?}");
    let mut params: Vec<*mut c_void> = args
        .iter()
        .map(|arg| match arg {
            Arg::Ptr(p) => p as *const CUdeviceptr as *mut c_void,
            Arg::U32(v) => v as *const u32 as *mut c_void,
        })
        .collect();
    // SAFETY: the kernel's arguments, each pointing at a value that outlives the call; the buffers
    // are host memory the kernel may read and write.
    unsafe {
        cuda::cuLaunchKernel(
            function,
            grid,
            1,
            1,
            block,
            1,
            1,
            0,
            std::ptr::null_mut(),
            params.as_mut_ptr(),
            std::ptr::null_mut(),
        )
    }
}

fn ptr<T>(data: &mut [T]) -> Arg {
    Arg::Ptr(data.as_mut_ptr() as CUdeviceptr)
}

#[test]
fn barriers_and_shuffles_sum_every_block() {
    // 3 warps a block: warp 0 reads the other warps' sums after the barrier.
    let (blocks, n) = (5, 1000);
    let mut x: Vec<f32> = (0..blocks * n).map(|i| (i % 7) as f32 - 3.0).collect();
    let expected: Vec<f32> = x.chunks(n).map(|row| row.iter().sum()).collect();
    let mut out = vec![f32::NAN; blocks];
    let args = [ptr(&mut x), ptr(&mut out), Arg::U32(n as u32)];
    assert_eq!(
        launch(c"self_test_block_sum", blocks as u32, 96, &args),
        CUresult::CUDA_SUCCESS
    );
    assert_eq!(out, expected);
}

#[test]
fn a_shuffle_exchanges_within_each_warp() {
    for mask in [1u32, 5, 16, 31] {
        let mut out = vec![u32::MAX; 128];
        let args = [ptr(&mut out), Arg::U32(mask)];
        assert_eq!(
            launch(c"self_test_exchange", 2, 64, &args),
            CUresult::CUDA_SUCCESS
        );
        let expected: Vec<u32> = (0..128).map(|t| t ^ mask).collect();
        assert_eq!(out, expected, "mask {mask}");
    }
}

#[test]
fn launches_a_gpu_would_get_wrong_fail() {
    let mut out = vec![0.0f32; 64];
    for kernel in [c"self_test_partial_warp", c"self_test_divergent_barrier"] {
        assert_eq!(
            launch(kernel, 1, 64, &[ptr(&mut out)]),
            CUresult::CUDA_ERROR_LAUNCH_FAILED,
            "{kernel:?}"
        );
    }
    // A shuffle in a block of 48 threads: its second warp has 16 lanes.
    let mut out = vec![0u32; 48];
    assert_eq!(
        launch(c"self_test_exchange", 1, 48, &[ptr(&mut out), Arg::U32(1)]),
        CUresult::CUDA_ERROR_LAUNCH_FAILED
    );
}

#[test]
fn unknown_kernels_are_not_found() {
    let mut function: CUfunction = std::ptr::null_mut();
    // SAFETY: as in `launch`.
    let found = unsafe {
        cuda::cuModuleGetFunction(
            &mut function,
            std::ptr::null_mut(),
            c"no_such_kernel".as_ptr(),
        )
    };
    assert_eq!(found, CUresult::CUDA_ERROR_NOT_FOUND);
}

#[test]
fn device_memory_starts_poisoned() {
    let mut ptr: CUdeviceptr = 0;
    // SAFETY: an out-pointer; the 16 bytes are read, then freed once.
    unsafe {
        assert_eq!(cuda::cuMemAlloc_v2(&mut ptr, 16), CUresult::CUDA_SUCCESS);
        assert_eq!(ptr % 256, 0);
        let words = std::slice::from_raw_parts(ptr as usize as *const u32, 4);
        assert!(words.iter().all(|&w| w == u32::MAX));
        assert!(f32::from_bits(words[0]).is_nan());
        assert_eq!(cuda::cuMemFree_v2(ptr), CUresult::CUDA_SUCCESS);
    }
}

/// cublasGemmEx as msa-cuda calls it (C = Aᵀ · B, column-major) on numbers worked by hand: A is 3 × 2
/// with columns [1, 2, 3] and [4, 5, 6], so Aᵀ = [[1, 2, 3], [4, 5, 6]]; B is 3 × 2 with columns
/// [1, 0, 1] and [0, 1, 0]; Aᵀ · B = [[4, 2], [10, 5]]. C's leading dimension 3 leaves a row of padding
/// that the GEMM must not touch.
#[test]
fn gemm_follows_the_column_major_contract() {
    let a = [1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0];
    let b = [1.0f32, 0.0, 1.0, 0.0, 1.0, 0.0];
    let bf16 = |v: &[f32]| -> Vec<u16> { v.iter().map(|x| (x.to_bits() >> 16) as u16).collect() };
    let (a_half, b_half) = (bf16(&a), bf16(&b));
    let cases: [(*const c_void, *const c_void, cudaDataType); 2] = [
        (
            a.as_ptr().cast(),
            b.as_ptr().cast(),
            cudaDataType::CUDA_R_32F,
        ),
        (
            a_half.as_ptr().cast(),
            b_half.as_ptr().cast(),
            cudaDataType::CUDA_R_16BF,
        ),
    ];
    let mut handle = std::ptr::null_mut();
    // SAFETY: an out-pointer.
    assert_eq!(
        unsafe { cuda::cublasCreate_v2(&mut handle) },
        cublasStatus_t::CUBLAS_STATUS_SUCCESS
    );
    for (a, b, dtype) in cases {
        let mut c = [-1.0f32; 6];
        let (alpha, beta) = (1.0f32, 0.0f32);
        // SAFETY: A and B hold 3 × 2 elements of `dtype`, C 3 × 2 f32.
        let status = unsafe {
            cuda::cublasGemmEx(
                handle,
                cublasOperation_t::CUBLAS_OP_T,
                cublasOperation_t::CUBLAS_OP_N,
                2,
                2,
                3,
                (&alpha as *const f32).cast(),
                a,
                dtype,
                3,
                b,
                dtype,
                3,
                (&beta as *const f32).cast(),
                c.as_mut_ptr().cast(),
                cudaDataType::CUDA_R_32F,
                3,
                cublasComputeType_t::CUBLAS_COMPUTE_32F,
                cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )
        };
        assert_eq!(status, cublasStatus_t::CUBLAS_STATUS_SUCCESS);
        assert_eq!(c, [4.0, 10.0, -1.0, 2.0, 5.0, -1.0], "{dtype:?}");
    }
    // SAFETY: made above, destroyed once.
    assert_eq!(
        unsafe { cuda::cublasDestroy_v2(handle) },
        cublasStatus_t::CUBLAS_STATUS_SUCCESS
    );
}
