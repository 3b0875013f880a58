//! The emulator itself: its scheduler (barriers, shuffles, block indices), its refusal of launches a GPU
//! would get wrong, and its GEMM against hand-computed products. msa-cuda's own tests run on it from
//! `cargo xtask test` (see the README).

#![cfg(all(target_os = "linux", target_arch = "x86_64"))]

use std::ffi::{CStr, c_void};

use cudarc::cublas::sys::{
    cublasComputeType_t, cublasGemmAlgo_t, cublasOperation_t, cublasStatus_t, cudaDataType,
};
use cudarc::driver::sys::{CUdeviceptr, CUfunction, CUresult, CUstream};
use msa_cuda_emulator as cuda;

mod common;
use common::{device, make_current, read, stream};

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

/// Warps run ahead of each other between barriers: a read that lacks its barrier sees the write in
/// some warps and not in others.
#[test]
fn a_missing_barrier_shows() {
    let mut out = vec![u32::MAX; 8 * 128];
    assert_eq!(
        launch(c"self_test_missing_barrier", 8, 128, &[ptr(&mut out)]),
        CUresult::CUDA_SUCCESS
    );
    assert!(out.contains(&0) && out.contains(&1), "{out:?}");
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

/// One warp's mma (16 × 8 × 16) adds A · B to D for bf16 and f16 operands, with each lane's fragments
/// built from PTX's formulas by the test kernel: small integers, so every product and sum is exact.
#[test]
fn mma_adds_the_product_of_its_fragments() {
    for f16 in [0u32, 1] {
        let value = |i: usize, salt: usize| ((i * 7 + salt * 13) % 9) as f32 - 4.0;
        let bits = |x: f32| {
            if f16 == 1 {
                half::f16::from_f32(x).to_bits()
            } else {
                half::bf16::from_f32(x).to_bits()
            }
        };
        let a: Vec<f32> = (0..16 * 16).map(|i| value(i, 1)).collect();
        let b: Vec<f32> = (0..16 * 8).map(|i| value(i, 2)).collect();
        let d: Vec<f32> = (0..16 * 8).map(|i| value(i, 3) * 0.5).collect();
        let mut expected = d.clone();
        for r in 0..16 {
            for c in 0..8 {
                expected[r * 8 + c] += (0..16).map(|k| a[r * 16 + k] * b[k * 8 + c]).sum::<f32>();
            }
        }
        let mut a_bits: Vec<u16> = a.iter().map(|&x| bits(x)).collect();
        let mut b_bits: Vec<u16> = b.iter().map(|&x| bits(x)).collect();
        let mut out = d;
        let args = [
            ptr(&mut a_bits),
            ptr(&mut b_bits),
            ptr(&mut out),
            Arg::U32(f16),
        ];
        assert_eq!(
            launch(c"self_test_mma", 1, 32, &args),
            CUresult::CUDA_SUCCESS
        );
        assert_eq!(out, expected, "f16 {f16}");
    }
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
fn device_memory_starts_poisoned_and_is_checked() {
    make_current(0);
    let mut ptr: CUdeviceptr = 0;
    // SAFETY: an out-pointer; reads and copies within (or refused outside) the 16 bytes; freed once.
    unsafe {
        assert_eq!(
            cuda::cuMemAlloc_v2(&mut ptr, 0),
            CUresult::CUDA_ERROR_INVALID_VALUE
        );
        assert_eq!(cuda::cuMemAlloc_v2(&mut ptr, 16), CUresult::CUDA_SUCCESS);
        assert_eq!(ptr % 256, 0);
        let words: Vec<u32> = read(ptr, 4);
        assert!(words.iter().all(|&w| w == u32::MAX));
        assert!(f32::from_bits(words[0]).is_nan());
        let mut five = [0u32; 5];
        let past_the_end =
            cuda::cuMemcpyDtoHAsync_v2(five.as_mut_ptr().cast(), ptr, 20, std::ptr::null_mut());
        assert_eq!(past_the_end, CUresult::CUDA_ERROR_INVALID_VALUE);
        assert_eq!(
            cuda::cuMemsetD8Async(ptr + 8, 0, 9, std::ptr::null_mut()),
            CUresult::CUDA_ERROR_INVALID_VALUE
        );
        // Device memory is not freed as page-locked memory, nor twice.
        assert_eq!(
            cuda::cuMemFreeHost(ptr as usize as *mut c_void),
            CUresult::CUDA_ERROR_INVALID_VALUE
        );
        assert_eq!(cuda::cuMemFree_v2(ptr), CUresult::CUDA_SUCCESS);
        assert_eq!(cuda::cuMemFree_v2(ptr), CUresult::CUDA_ERROR_INVALID_VALUE);
    }
}

/// The arguments of one cublasGemmStridedBatchedEx call (f32 scalars, f32 C, f32 compute).
struct Gemm {
    transa: cublasOperation_t,
    m: i32,
    n: i32,
    k: i32,
    a: (CUdeviceptr, i32, i64),
    b: (CUdeviceptr, i32, i64),
    c: (CUdeviceptr, i32, i64),
    dtype: cudaDataType,
    batch: i32,
}

fn gemm(g: &Gemm) -> cublasStatus_t {
    let mut handle = std::ptr::null_mut();
    let (alpha, beta) = (1.0f32, 0.0f32);
    // SAFETY: an out-pointer, host scalars, and operands the stand-in checks against their
    // allocations; the handle is destroyed once.
    unsafe {
        assert_eq!(
            cuda::cublasCreate_v2(&mut handle),
            cublasStatus_t::CUBLAS_STATUS_SUCCESS
        );
        let status = cuda::cublasGemmStridedBatchedEx(
            handle,
            g.transa as u32,
            cublasOperation_t::CUBLAS_OP_N as u32,
            g.m,
            g.n,
            g.k,
            (&alpha as *const f32).cast(),
            g.a.0 as usize as *const c_void,
            g.dtype as u32,
            g.a.1,
            g.a.2,
            g.b.0 as usize as *const c_void,
            g.dtype as u32,
            g.b.1,
            g.b.2,
            (&beta as *const f32).cast(),
            g.c.0 as usize as *mut c_void,
            cudaDataType::CUDA_R_32F as u32,
            g.c.1,
            g.c.2,
            g.batch,
            cublasComputeType_t::CUBLAS_COMPUTE_32F as u32,
            cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT as i32,
        );
        assert_eq!(
            cuda::cublasDestroy_v2(handle),
            cublasStatus_t::CUBLAS_STATUS_SUCCESS
        );
        status
    }
}

/// Half-precision bits of small integers (exact in both).
fn half_bits(values: &[f32], dtype: cudaDataType) -> Vec<u16> {
    values
        .iter()
        .map(|&x| match dtype {
            cudaDataType::CUDA_R_16BF => (x.to_bits() >> 16) as u16,
            _ => half::f16::from_f32(x).to_bits(),
        })
        .collect()
}

/// cuBLAS's column-major contract on products worked by hand, as msa-cuda calls it (C = Aᵀ · B):
/// - one GEMM: A is 3 × 2 with columns [1, 2, 3] and [4, 5, 6], so Aᵀ = [[1, 2, 3], [4, 5, 6]]; B is
///   3 × 2 with columns [1, 0, 1] and [0, 1, 0]; Aᵀ · B = [[4, 2], [10, 5]]. C's leading dimension 3
///   leaves a row of padding that must keep its value.
/// - a strided batch of two: Aᵀ₀ = [1, 2] and Aᵀ₁ = [3, 4] (m = 1, stride 2); B₀ the 2 × 2 identity and
///   B₁ with columns [1, 1] and [2, 0] (stride 4); C₀ = [1, 2], C₁ = [7, 6] (stride 2).
#[test]
fn gemm_follows_the_column_major_contract() {
    make_current(0);
    let dtypes = [
        cudaDataType::CUDA_R_32F,
        cudaDataType::CUDA_R_16BF,
        cudaDataType::CUDA_R_16F,
    ];
    let upload = |values: &[f32], dtype| match dtype {
        cudaDataType::CUDA_R_32F => device(values),
        _ => device(&half_bits(values, dtype)),
    };
    for dtype in dtypes {
        let a = upload(&[1.0, 2.0, 3.0, 4.0, 5.0, 6.0], dtype);
        let b = upload(&[1.0, 0.0, 1.0, 0.0, 1.0, 0.0], dtype);
        let c = device(&[-1.0f32; 6]);
        let one = Gemm {
            transa: cublasOperation_t::CUBLAS_OP_T,
            m: 2,
            n: 2,
            k: 3,
            a: (a, 3, 0),
            b: (b, 3, 0),
            c: (c, 3, 0),
            dtype,
            batch: 1,
        };
        assert_eq!(gemm(&one), cublasStatus_t::CUBLAS_STATUS_SUCCESS);
        let got: Vec<f32> = read(c, 6);
        assert_eq!(got, [4.0, 10.0, -1.0, 2.0, 5.0, -1.0], "{dtype:?}");
        // A leading dimension that reaches past A's allocation is refused, as is one shorter than
        // a column.
        for lda in [4, 2] {
            let status = gemm(&Gemm {
                a: (a, lda, 0),
                ..one
            });
            assert_eq!(
                status,
                cublasStatus_t::CUBLAS_STATUS_INVALID_VALUE,
                "lda {lda}"
            );
        }
        for ptr in [a, b, c] {
            assert_eq!(cuda::cuMemFree_v2(ptr), CUresult::CUDA_SUCCESS);
        }

        let a = upload(&[1.0, 2.0, 3.0, 4.0], dtype);
        let b = upload(&[1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 2.0, 0.0], dtype);
        let c = device(&[-1.0f32; 4]);
        let batched = Gemm {
            transa: cublasOperation_t::CUBLAS_OP_T,
            m: 1,
            n: 2,
            k: 2,
            a: (a, 2, 2),
            b: (b, 2, 4),
            c: (c, 1, 2),
            dtype,
            batch: 2,
        };
        assert_eq!(gemm(&batched), cublasStatus_t::CUBLAS_STATUS_SUCCESS);
        let got: Vec<f32> = read(c, 4);
        assert_eq!(got, [1.0, 2.0, 7.0, 6.0], "{dtype:?}");
        // A third GEMM of the batch would read past B.
        let status = gemm(&Gemm {
            batch: 3,
            ..batched
        });
        assert_eq!(status, cublasStatus_t::CUBLAS_STATUS_INVALID_VALUE);
        for ptr in [a, b, c] {
            assert_eq!(cuda::cuMemFree_v2(ptr), CUresult::CUDA_SUCCESS);
        }
    }
}

/// Work runs in its stream's order when something waits for it, so what a program forgot to wait for
/// has not run: page-locked memory is read when its copy runs, pageable memory when the copy is
/// queued; a stream runs another's work up to an event it waits for; a kernel that fails when it runs
/// fails its stream's synchronisation.
#[test]
fn work_runs_when_waited_for() {
    make_current(0);
    let (a, b) = (stream(), stream());
    let mut pinned: *mut c_void = std::ptr::null_mut();
    let (first, second, copied) = (device(&[0u32; 2]), device(&[0u32; 2]), device(&[0u32; 2]));
    let mut event = std::ptr::null_mut();
    // SAFETY: out-pointers; copies within the allocations made here, each freed once.
    unsafe {
        assert_eq!(
            cuda::cuMemHostAlloc(&mut pinned, 8, 0),
            CUresult::CUDA_SUCCESS
        );
        let host = std::slice::from_raw_parts_mut(pinned.cast::<u32>(), 2);
        host.copy_from_slice(&[1, 2]);
        assert_eq!(
            cuda::cuMemcpyHtoDAsync_v2(first, pinned, 8, a),
            CUresult::CUDA_SUCCESS
        );
        let mut pageable = [5u32, 6];
        let queued = cuda::cuMemcpyHtoDAsync_v2(second, pageable.as_ptr().cast(), 8, a);
        assert_eq!(queued, CUresult::CUDA_SUCCESS);
        // Rewritten before the copies ran: the page-locked copy sees the new bytes, the pageable
        // one took its bytes when queued.
        host.copy_from_slice(&[3, 4]);
        pageable.copy_from_slice(&[7, 8]);
        assert_eq!(cuda::cuEventCreate(&mut event, 0), CUresult::CUDA_SUCCESS);
        assert_eq!(cuda::cuEventRecord(event, a), CUresult::CUDA_SUCCESS);
        assert_eq!(cuda::cuStreamWaitEvent(b, event, 0), CUresult::CUDA_SUCCESS);
        let on_b = cuda::cuMemcpyDtoDAsync_v2(copied, first, 8, b);
        assert_eq!(on_b, CUresult::CUDA_SUCCESS);
        // Nothing waited for either stream yet (a read into pageable memory runs at once).
        assert_eq!(read::<u32>(copied, 2), [0; 2]);
        assert_eq!(cuda::cuStreamSynchronize(b), CUresult::CUDA_SUCCESS);
        assert_eq!(read::<u32>(copied, 2), [3, 4]);
        assert_eq!(read::<u32>(second, 2), [5, 6]);

        // A copy back into page-locked memory lands when its stream is waited for.
        assert_eq!(
            cuda::cuMemcpyDtoHAsync_v2(pinned, second, 8, a),
            CUresult::CUDA_SUCCESS
        );
        assert_eq!(host, [3, 4]);
        assert_eq!(cuda::cuEventRecord(event, a), CUresult::CUDA_SUCCESS);
        // A poll finds the record not run yet and starts the work; the next finds it done. So does a
        // poll of the stream.
        assert_eq!(cuda::cuEventQuery(event), CUresult::CUDA_ERROR_NOT_READY);
        assert_eq!(host, [5, 6]);
        assert_eq!(cuda::cuEventQuery(event), CUresult::CUDA_SUCCESS);
        assert_eq!(cuda::cuStreamQuery(a), CUresult::CUDA_SUCCESS);
        assert_eq!(
            cuda::cuMemcpyDtoHAsync_v2(pinned, first, 8, a),
            CUresult::CUDA_SUCCESS
        );
        assert_eq!(cuda::cuStreamQuery(a), CUresult::CUDA_ERROR_NOT_READY);
        assert_eq!(host, [3, 4]);
        assert_eq!(cuda::cuStreamQuery(a), CUresult::CUDA_SUCCESS);
        assert_eq!(cuda::cuEventSynchronize(event), CUresult::CUDA_SUCCESS);
        let mut unrecorded = std::ptr::null_mut();
        assert_eq!(
            cuda::cuEventCreate(&mut unrecorded, 0),
            CUresult::CUDA_SUCCESS
        );
        assert_eq!(cuda::cuEventQuery(unrecorded), CUresult::CUDA_SUCCESS);
        assert_eq!(cuda::cuEventDestroy_v2(unrecorded), CUresult::CUDA_SUCCESS);

        assert_eq!(cuda::cuEventDestroy_v2(event), CUresult::CUDA_SUCCESS);
        for ptr in [first, second, copied] {
            assert_eq!(cuda::cuMemFree_v2(ptr), CUresult::CUDA_SUCCESS);
        }
        assert_eq!(
            cuda::cuMemFree_v2(pinned as CUdeviceptr),
            CUresult::CUDA_ERROR_INVALID_VALUE
        );
        assert_eq!(cuda::cuMemFreeHost(pinned), CUresult::CUDA_SUCCESS);
    }

    // A shuffle without its whole warp, queued: the launch is accepted, the stream fails.
    let mut out = vec![0u32; 48];
    let mut function: CUfunction = std::ptr::null_mut();
    let mut params: Vec<*mut c_void> = vec![
        &mut out.as_mut_ptr() as *mut *mut u32 as *mut c_void,
        &mut 1u32 as *mut u32 as *mut c_void,
    ];
    // SAFETY: as in `launch`, on stream `a`, which is then waited for before `out` goes.
    unsafe {
        let name = c"self_test_exchange";
        let found = cuda::cuModuleGetFunction(&mut function, std::ptr::null_mut(), name.as_ptr());
        assert_eq!(found, CUresult::CUDA_SUCCESS);
        let launched = cuda::cuLaunchKernel(
            function,
            1,
            1,
            1,
            48,
            1,
            1,
            0,
            a,
            params.as_mut_ptr(),
            std::ptr::null_mut(),
        );
        assert_eq!(launched, CUresult::CUDA_SUCCESS);
        assert_eq!(
            cuda::cuStreamSynchronize(a),
            CUresult::CUDA_ERROR_LAUNCH_FAILED
        );
        for stream in [a, b] {
            assert_ne!(
                cuda::cuStreamDestroy_v2(stream),
                CUresult::CUDA_ERROR_INVALID_VALUE
            );
        }
    }
}

/// Two streams that wait for each other, synchronised from two threads at once: a runs a long kernel,
/// then waits for b's second item; b waits for a's kernel first. The thread on b waits while the
/// thread on a runs the kernel, then the thread on a runs or waits for b's items: neither may hold a
/// stream while it waits for the other (which deadlocked an earlier version of the emulator here).
#[test]
fn streams_waiting_on_each_other_synchronise_from_two_threads() {
    make_current(0);
    let (a, b) = (stream(), stream());
    let (blocks, n) = (3000, 1000);
    let x = device(&vec![1.0f32; blocks * n]);
    let sums = device(&vec![0.0f32; blocks]);
    let flag = device(&[0u32]);
    let mut events = [std::ptr::null_mut(); 2];
    let mut function: CUfunction = std::ptr::null_mut();
    let (mut x_arg, mut sums_arg, mut n_arg) = (x, sums, n as u32);
    let mut params: Vec<*mut c_void> = vec![
        (&mut x_arg as *mut CUdeviceptr).cast(),
        (&mut sums_arg as *mut CUdeviceptr).cast(),
        (&mut n_arg as *mut u32).cast(),
    ];
    // SAFETY: out-pointers; a launch whose arguments are read when queued; a memset inside `flag`;
    // each handle released once, after both streams are synchronised.
    unsafe {
        for event in &mut events {
            assert_eq!(cuda::cuEventCreate(event, 0), CUresult::CUDA_SUCCESS);
        }
        let name = c"self_test_block_sum";
        let found = cuda::cuModuleGetFunction(&mut function, std::ptr::null_mut(), name.as_ptr());
        assert_eq!(found, CUresult::CUDA_SUCCESS);
        // a: [kernel, record 0]; b: [wait 0, memset, record 1]; a: [wait 1].
        let launched = cuda::cuLaunchKernel(
            function,
            blocks as u32,
            1,
            1,
            96,
            1,
            1,
            0,
            a,
            params.as_mut_ptr(),
            std::ptr::null_mut(),
        );
        assert_eq!(launched, CUresult::CUDA_SUCCESS);
        assert_eq!(cuda::cuEventRecord(events[0], a), CUresult::CUDA_SUCCESS);
        assert_eq!(
            cuda::cuStreamWaitEvent(b, events[0], 0),
            CUresult::CUDA_SUCCESS
        );
        assert_eq!(cuda::cuMemsetD8Async(flag, 7, 4, b), CUresult::CUDA_SUCCESS);
        assert_eq!(cuda::cuEventRecord(events[1], b), CUresult::CUDA_SUCCESS);
        assert_eq!(
            cuda::cuStreamWaitEvent(a, events[1], 0),
            CUresult::CUDA_SUCCESS
        );
        let a_addr = a as usize;
        let on_a = std::thread::spawn(move || cuda::cuStreamSynchronize(a_addr as CUstream));
        // Give the thread on a time to start the kernel.
        std::thread::sleep(std::time::Duration::from_millis(20));
        assert_eq!(cuda::cuStreamSynchronize(b), CUresult::CUDA_SUCCESS);
        assert_eq!(on_a.join().unwrap(), CUresult::CUDA_SUCCESS);
        assert_eq!(read::<f32>(sums, blocks), vec![n as f32; blocks]);
        assert_eq!(read::<u32>(flag, 1), [0x0707_0707]);
        for event in events {
            assert_eq!(cuda::cuEventDestroy_v2(event), CUresult::CUDA_SUCCESS);
        }
        for stream in [a, b] {
            assert_eq!(cuda::cuStreamDestroy_v2(stream), CUresult::CUDA_SUCCESS);
        }
        for ptr in [x, sums, flag] {
            assert_eq!(cuda::cuMemFree_v2(ptr), CUresult::CUDA_SUCCESS);
        }
    }
}

/// A GPU's 16-byte load needs a 16-byte aligned address; so does the emulator's, though a CPU's would
/// not: kernels.cu's bf16 loader reads at a multiple of 8 elements, and fails the launch elsewhere.
#[test]
fn a_misaligned_load_fails_the_launch() {
    let mut x: Vec<u16> = (0..24)
        .map(|i| half::bf16::from_f32(i as f32).to_bits())
        .collect();
    // Vec<u16> is only 2-byte aligned: start the kernel's view at a 16-byte boundary.
    let skip = x.as_ptr().align_offset(16);
    assert!(skip < 8, "no 16-byte boundary in the vector");
    let view = &mut x[skip..];
    for offset in [0u32, 8] {
        let mut out = vec![f32::NAN; 8];
        let args = [ptr(view), Arg::U32(offset), ptr(&mut out)];
        assert_eq!(
            launch(c"self_test_vector_load", 1, 1, &args),
            CUresult::CUDA_SUCCESS
        );
        let expected: Vec<f32> = (0..8)
            .map(|i| (skip + offset as usize + i) as f32)
            .collect();
        assert_eq!(out, expected, "offset {offset}");
    }
    for offset in [1u32, 4, 7] {
        let mut out = vec![f32::NAN; 8];
        let args = [ptr(view), Arg::U32(offset), ptr(&mut out)];
        assert_eq!(
            launch(c"self_test_vector_load", 1, 1, &args),
            CUresult::CUDA_ERROR_LAUNCH_FAILED,
            "offset {offset}"
        );
        assert!(out.iter().all(|v| v.is_nan()), "offset {offset}: {out:?}");
    }
}

/// A kernel reading past the end of its allocation (rounded up to 256 bytes, as the driver rounds)
/// faults there, where a GPU would fail the launch or read another allocation: the process ends,
/// naming the kernel, its block and thread. The fault runs in a child process of this test.
#[test]
fn a_read_past_an_allocation_faults_naming_the_kernel() {
    use std::os::unix::process::ExitStatusExt;
    const SIGSEGV: i32 = 11; // on Linux
    const CHILD: &str = "MSA_EMULATOR_TEST_READ_PAST";
    make_current(0);
    // 256 bytes: the 65th float is past the end.
    let x = device(&[7.0f32; 64]);
    let mut out = [0.0f32];
    let past_the_end = std::env::var_os(CHILD).is_some();
    let index = if past_the_end { 64 } else { 63 };
    let args = [Arg::Ptr(x), Arg::U32(index), ptr(&mut out)];
    assert_eq!(
        launch(c"self_test_read", 1, 1, &args),
        CUresult::CUDA_SUCCESS
    );
    assert!(!past_the_end, "reading past the end did not fault");
    assert_eq!(out, [7.0]);

    // This test again, alone, without a core dump.
    let this_test = "a_read_past_an_allocation_faults_naming_the_kernel";
    let child = std::process::Command::new("sh")
        .args(["-c", "ulimit -c 0; exec \"$0\" \"$@\""])
        .arg(std::env::current_exe().unwrap())
        .args([this_test, "--exact", "--nocapture"])
        .env(CHILD, "1")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&child.stderr);
    assert_eq!(child.status.signal(), Some(SIGSEGV), "{stderr}");
    assert!(
        stderr.contains("kernel self_test_read, block (0, 0, 0), thread (0, 0, 0): an access at"),
        "{stderr}"
    );
}

/// An index past an array (here shared memory, 32 floats) fails the launch, where a GPU would read
/// another variable's bytes.
#[test]
fn an_index_past_an_array_fails_the_launch() {
    for (index, expected) in [
        (31, CUresult::CUDA_SUCCESS),
        (32, CUresult::CUDA_ERROR_LAUNCH_FAILED),
    ] {
        let mut out = [f32::NAN];
        let args = [Arg::U32(index), ptr(&mut out)];
        assert_eq!(
            launch(c"self_test_shared_index", 1, 32, &args),
            expected,
            "index {index}"
        );
        if expected == CUresult::CUDA_SUCCESS {
            assert_eq!(out, [31.0]);
        }
    }
}
