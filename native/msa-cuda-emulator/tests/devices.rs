//! Several emulated devices: contexts, cuBLAS handles on their own device, NCCL cliques with their
//! broadcasts, and NCCL ranks joined through a unique id with their sends and receives; each
//! device's own memory. The only test of its binary, since it sets how many devices the emulator
//! reports and their memory.

#![cfg(all(target_os = "linux", target_arch = "x86_64"))]

use std::ffi::{CStr, c_void};

use cudarc::cublas::sys::{cublasOperation_t, cublasStatus_t};
use cudarc::driver::sys::{CUdevice, CUdeviceptr, CUresult, CUstream};
use cudarc::nccl::sys::{ncclComm_t, ncclDataType_t, ncclResult_t, ncclUniqueId};
use msa_cuda_emulator as cuda;
use msa_cuda_emulator::{nccl, nccl_ranks};

mod common;
use common::{device, make_current, read, stream};

use ncclResult_t::{ncclInvalidArgument, ncclInvalidUsage, ncclSuccess, ncclUnhandledCudaError};

fn current() -> CUdevice {
    let mut device = -1;
    // SAFETY: an out-pointer.
    assert_eq!(
        unsafe { cuda::cuCtxGetDevice(&mut device) },
        CUresult::CUDA_SUCCESS
    );
    device
}

fn last_error() -> String {
    // SAFETY: a NUL-terminated message owned by the stand-in.
    unsafe { CStr::from_ptr(nccl::ncclGetLastError(std::ptr::null_mut())) }
        .to_string_lossy()
        .into_owned()
}

#[test]
fn devices_own_their_memory_handles_and_cliques() {
    // SAFETY: the only test of this binary sets the variables before any thread reads the
    // environment.
    unsafe {
        std::env::set_var("MSA_CUDA_EMULATOR_DEVICES", "3");
        std::env::set_var("MSA_CUDA_EMULATOR_MEMORY", MEMORY.to_string());
    }
    no_context_no_work();
    each_device_has_its_own_memory();
    blas_runs_on_its_own_device();
    nccl_broadcasts_across_a_clique();
    nccl_refuses_what_would_hang_or_fault();
    nccl_ranks_meet_through_a_unique_id();
}

/// As the driver: without a current context there is nowhere to allocate or queue.
fn no_context_no_work() {
    let mut ptr: CUdeviceptr = 0;
    let mut stream = std::ptr::null_mut();
    let mut handle = std::ptr::null_mut();
    // SAFETY: out-pointers.
    unsafe {
        assert_eq!(
            cuda::cuMemAlloc_v2(&mut ptr, 16),
            CUresult::CUDA_ERROR_INVALID_CONTEXT
        );
        assert_eq!(
            cuda::cuStreamCreate(&mut stream, 0),
            CUresult::CUDA_ERROR_INVALID_CONTEXT
        );
        assert_eq!(
            cuda::cublasCreate_v2(&mut handle),
            cublasStatus_t::CUBLAS_STATUS_NOT_INITIALIZED
        );
    }
}

/// Bytes of memory each device has here (`MSA_CUDA_EMULATOR_MEMORY`).
const MEMORY: usize = 1 << 20;

/// Each device has `MEMORY` bytes of its own: an allocation past what is free fails as on a full
/// GPU, a free gives the bytes back, page-locked memory counts on none, and `cuMemGetInfo` reports
/// the current device's (with none current, nothing).
fn each_device_has_its_own_memory() {
    let info = || {
        let (mut free, mut total) = (0, 0);
        // SAFETY: out-pointers.
        let status = unsafe { cuda::cuMemGetInfo_v2(&mut free, &mut total) };
        (status, free, total)
    };
    assert_eq!(info().0, CUresult::CUDA_ERROR_INVALID_CONTEXT);
    let (mut most, mut past, mut other): (CUdeviceptr, CUdeviceptr, CUdeviceptr) = (0, 0, 0);
    let mut pinned = std::ptr::null_mut();
    // SAFETY: out-pointers, then frees of what they returned.
    unsafe {
        make_current(1);
        assert_eq!(info(), (CUresult::CUDA_SUCCESS, MEMORY, MEMORY));
        let taken = cuda::cuMemAlloc_v2(&mut most, MEMORY - 256);
        assert_eq!(taken, CUresult::CUDA_SUCCESS);
        let pinned_taken = cuda::cuMemHostAlloc(&mut pinned, 4096, 0);
        assert_eq!(pinned_taken, CUresult::CUDA_SUCCESS);
        assert_eq!(info(), (CUresult::CUDA_SUCCESS, 256, MEMORY));
        let refused = cuda::cuMemAlloc_v2(&mut past, 512);
        assert_eq!(refused, CUresult::CUDA_ERROR_OUT_OF_MEMORY);
        make_current(2);
        assert_eq!(info(), (CUresult::CUDA_SUCCESS, MEMORY, MEMORY));
        assert_eq!(cuda::cuMemAlloc_v2(&mut other, 512), CUresult::CUDA_SUCCESS);
        assert_eq!(cuda::cuMemFree_v2(other), CUresult::CUDA_SUCCESS);
        make_current(1);
        assert_eq!(cuda::cuMemFree_v2(most), CUresult::CUDA_SUCCESS);
        assert_eq!(info(), (CUresult::CUDA_SUCCESS, MEMORY, MEMORY));
        assert_eq!(cuda::cuMemFreeHost(pinned), CUresult::CUDA_SUCCESS);
    }
}

/// C = Aᵀ · B for 1 × 1 operands, on `handle`.
fn sgemm(handle: *mut c_void, a: CUdeviceptr, b: CUdeviceptr, c: CUdeviceptr) -> cublasStatus_t {
    let (alpha, beta) = (1.0f32, 0.0f32);
    // SAFETY: host scalars, operands the stand-in checks.
    unsafe {
        cuda::cublasSgemm_v2(
            handle.cast(),
            cublasOperation_t::CUBLAS_OP_T as u32,
            cublasOperation_t::CUBLAS_OP_N as u32,
            1,
            1,
            1,
            &alpha,
            a as usize as *const f32,
            1,
            b as usize as *const f32,
            1,
            &beta,
            c as usize as *mut f32,
            1,
        )
    }
}

/// A cuBLAS handle works on the device current when it was made, on that device's memory.
fn blas_runs_on_its_own_device() {
    make_current(1);
    let other = device(&[5.0f32]);
    make_current(0);
    let mut handle = std::ptr::null_mut();
    // SAFETY: an out-pointer.
    let created = unsafe { cuda::cublasCreate_v2(&mut handle) };
    assert_eq!(created, cublasStatus_t::CUBLAS_STATUS_SUCCESS);
    let (a, b, c) = (device(&[2.0f32]), device(&[3.0f32]), device(&[0.0f32]));
    assert_eq!(
        sgemm(handle.cast(), a, b, c),
        cublasStatus_t::CUBLAS_STATUS_SUCCESS
    );
    assert_eq!(read::<f32>(c, 1), [6.0]);
    // An operand of another device, then the right operands while another device is current.
    assert_eq!(
        sgemm(handle.cast(), a, other, c),
        cublasStatus_t::CUBLAS_STATUS_INVALID_VALUE
    );
    make_current(1);
    assert_eq!(
        sgemm(handle.cast(), a, b, c),
        cublasStatus_t::CUBLAS_STATUS_EXECUTION_FAILED
    );
    make_current(0);
    // SAFETY: the handle and allocations made above, each released once.
    unsafe {
        assert_eq!(
            cuda::cublasDestroy_v2(handle),
            cublasStatus_t::CUBLAS_STATUS_SUCCESS
        );
        for ptr in [a, b, c, other] {
            assert_eq!(cuda::cuMemFree_v2(ptr), CUresult::CUDA_SUCCESS);
        }
    }
}

/// A clique of every device, in the order `devices`.
fn clique(devices: &[CUdevice]) -> Vec<ncclComm_t> {
    let mut comms = vec![std::ptr::null_mut(); devices.len()];
    // SAFETY: room for one communicator per device.
    let made = unsafe {
        nccl::ncclCommInitAll(comms.as_mut_ptr(), devices.len() as i32, devices.as_ptr())
    };
    assert_eq!(made, ncclSuccess);
    comms
}

fn destroy(comms: Vec<ncclComm_t>) {
    for comm in comms {
        // SAFETY: communicators from ncclCommInitAll, each destroyed once.
        assert_eq!(unsafe { nccl::ncclCommAbort(comm) }, ncclSuccess);
    }
}

/// One rank's part of a broadcast of `count` f32 from `root`.
fn broadcast(
    comm: ncclComm_t,
    (send, receive): (CUdeviceptr, CUdeviceptr),
    count: usize,
    root: i32,
    stream: CUstream,
) -> ncclResult_t {
    // SAFETY: a communicator from ncclCommInitAll; buffers the stand-in checks.
    unsafe {
        nccl::ncclBroadcast(
            send as usize as *const c_void,
            receive as usize as *mut c_void,
            count,
            ncclDataType_t::ncclFloat32 as u32,
            root,
            comm,
            stream.cast(),
        )
    }
}

/// Devices 2, 0, 1 as ranks 0, 1, 2; rank 1 (device 0) broadcasts out of place to every rank,
/// itself included, in one group recorded by this thread.
fn nccl_broadcasts_across_a_clique() {
    let devices = [2, 0, 1];
    let comms = clique(&devices);
    let data = [1.5f32, -2.0, 0.25, 7.0, -0.5];
    let mut buffers = Vec::new();
    for &ordinal in &devices {
        make_current(ordinal);
        let send = if ordinal == 0 { device(&data) } else { 0 };
        buffers.push((send, device(&[f32::NAN; 5]), stream()));
    }
    assert_eq!(nccl::ncclGroupStart(), ncclSuccess);
    for (comm, &(send, receive, stream)) in comms.iter().zip(&buffers) {
        assert_eq!(broadcast(*comm, (send, receive), 5, 1, stream), ncclSuccess);
    }
    assert_eq!(nccl::ncclGroupEnd(), ncclSuccess);
    // The last part's device stays current, as NCCL may leave it.
    assert_eq!(current(), 1);
    // The parts are queued on the ranks' streams: nothing has run until one of them is waited for,
    // and then the whole broadcast has.
    assert!(read::<f32>(buffers[0].1, 5)[0].is_nan());
    // SAFETY: a stream made above.
    let synchronized = unsafe { cuda::cuStreamSynchronize(buffers[2].2) };
    assert_eq!(synchronized, CUresult::CUDA_SUCCESS);
    for &(_, receive, _) in &buffers {
        assert_eq!(read::<f32>(receive, 5), data);
    }
    destroy(comms);
}

fn nccl_refuses_what_would_hang_or_fault() {
    let mut comms = vec![std::ptr::null_mut(); 2];
    // SAFETY: room for two communicators.
    unsafe {
        for (list, expected) in [([0, 0], ncclInvalidUsage), ([1, 3], ncclUnhandledCudaError)] {
            let made = nccl::ncclCommInitAll(comms.as_mut_ptr(), 2, list.as_ptr());
            assert_eq!(made, expected, "{list:?}");
        }
    }
    assert!(last_error().contains("device 3"), "{}", last_error());
    assert_eq!(nccl::ncclGroupEnd(), ncclInvalidUsage);

    let comms = clique(&[0, 1]);
    make_current(0);
    let (send, stream0) = (device(&[1.0f32, 2.0]), stream());
    make_current(1);
    let (receive, stream1) = (device(&[0.0f32, 0.0]), stream());
    // One rank outside a group would wait for the other forever.
    assert_eq!(
        broadcast(comms[0], (send, send), 2, 0, stream0),
        ncclInvalidUsage
    );
    assert!(
        last_error().contains("every rank's part"),
        "{}",
        last_error()
    );
    // Ranks that disagree on the count.
    assert_eq!(nccl::ncclGroupStart(), ncclSuccess);
    assert_eq!(
        broadcast(comms[0], (send, send), 2, 0, stream0),
        ncclSuccess
    );
    assert_eq!(
        broadcast(comms[1], (0, receive), 1, 0, stream1),
        ncclSuccess
    );
    assert_eq!(nccl::ncclGroupEnd(), ncclInvalidUsage);
    assert!(
        last_error().contains("rank 1 asks for 4 bytes"),
        "{}",
        last_error()
    );
    // What a GPU could not run: a root outside the clique, a buffer or a stream of another device,
    // a count past the buffer's end; and the null stream, which the emulator does not take.
    let null = std::ptr::null_mut();
    let refused = [
        (comms[1], (0, receive), 2, 2, stream1, ncclInvalidArgument),
        (comms[1], (0, send), 2, 0, stream1, ncclUnhandledCudaError),
        (
            comms[1],
            (0, receive),
            2,
            0,
            stream0,
            ncclUnhandledCudaError,
        ),
        (
            comms[0],
            (send, send),
            3,
            0,
            stream0,
            ncclUnhandledCudaError,
        ),
        (comms[0], (send, send), 2, 0, null, ncclInvalidArgument),
    ];
    for (comm, buffers, count, root, stream, expected) in refused {
        assert_eq!(nccl::ncclGroupStart(), ncclSuccess);
        assert_eq!(broadcast(comm, buffers, count, root, stream), expected);
        assert_eq!(nccl::ncclGroupEnd(), ncclSuccess, "an empty group");
    }
    make_current(1);
    assert_eq!(read::<f32>(receive, 2), [0.0, 0.0], "nothing was copied");
    destroy(comms);
}

/// Rank `rank` of `world` of `id`'s communicator, on `device`, joined on a thread of its own (as in a
/// process of its own): the communicator (as an address) or the error code and message.
fn join_rank(
    id: ncclUniqueId,
    world: i32,
    rank: i32,
    device: CUdevice,
) -> std::thread::JoinHandle<Result<usize, (ncclResult_t, String)>> {
    std::thread::spawn(move || {
        make_current(device);
        let mut comm = std::ptr::null_mut();
        // SAFETY: an out-pointer.
        match unsafe { nccl_ranks::ncclCommInitRank(&mut comm, world, id, rank) } {
            ncclSuccess => Ok(comm as usize),
            code => Err((code, last_error())),
        }
    })
}

fn unique_id() -> ncclUniqueId {
    let mut id = ncclUniqueId { internal: [0; 128] };
    // SAFETY: an out-pointer.
    assert_eq!(unsafe { nccl_ranks::ncclGetUniqueId(&mut id) }, ncclSuccess);
    id
}

/// Ranks joined through a unique id send and receive point to point; a receive of another size than
/// its send fails its stream, and set-ups NCCL refuses are refused by both sides.
fn nccl_ranks_meet_through_a_unique_id() {
    let id = unique_id();
    let (first, second) = (join_rank(id, 2, 0, 2), join_rank(id, 2, 1, 1));
    let comms = [
        first.join().unwrap().unwrap(),
        second.join().unwrap().unwrap(),
    ];
    // The id was used: rank 0 cannot join it again.
    let again = join_rank(id, 2, 0, 2).join().unwrap().unwrap_err();
    assert_eq!(again.0, ncclInvalidUsage);
    assert!(again.1.contains("used already"), "{}", again.1);

    let data = [4.0f32, -1.5, 0.5];
    let transfer = |rank: usize, ordinal: CUdevice, count: usize, values: &[f32]| {
        make_current(ordinal);
        let (buffer, stream) = (device(values), stream());
        let comm = comms[rank] as ncclComm_t;
        let float = ncclDataType_t::ncclFloat32 as u32;
        // SAFETY: a communicator made above, buffers and streams of its device.
        let queued = unsafe {
            match rank {
                0 => nccl_ranks::ncclSend(buffer as *const _, count, float, 1, comm, stream.cast()),
                _ => nccl_ranks::ncclRecv(buffer as *mut _, count, float, 0, comm, stream.cast()),
            }
        };
        assert_eq!(queued, ncclSuccess);
        (buffer, stream)
    };
    transfer(0, 2, 3, &data);
    let (received, stream1) = transfer(1, 1, 3, &[f32::NAN; 3]);
    // SAFETY: a stream made above.
    assert_eq!(
        unsafe { cuda::cuStreamSynchronize(stream1) },
        CUresult::CUDA_SUCCESS
    );
    assert_eq!(read::<f32>(received, 3), data);
    // A send of 3 floats met by a receive of 2 would hang or corrupt a GPU: the receive fails.
    transfer(0, 2, 3, &data);
    let (_, stream1) = transfer(1, 1, 2, &[0.0; 2]);
    // SAFETY: a stream made above.
    let synchronized = unsafe { cuda::cuStreamSynchronize(stream1) };
    assert_eq!(synchronized, CUresult::CUDA_ERROR_LAUNCH_FAILED);
    for comm in comms {
        // SAFETY: communicators made above, each destroyed once.
        assert_eq!(
            unsafe { nccl::ncclCommAbort(comm as ncclComm_t) },
            ncclSuccess
        );
    }

    // Ranks that disagree on the world size, and two ranks on one device, are refused on both sides.
    for (worlds, devices, why) in [
        ([2, 3], [0, 1], "world of 3"),
        ([2, 2], [1, 1], "duplicate GPU"),
    ] {
        let id = unique_id();
        let first = join_rank(id, worlds[0], 0, devices[0]);
        let second = join_rank(id, worlds[1], 1, devices[1]);
        for joined in [first.join().unwrap(), second.join().unwrap()] {
            let (code, message) = joined.unwrap_err();
            assert_eq!(code, ncclInvalidUsage);
            assert!(message.contains(why), "{message}");
        }
    }
}
