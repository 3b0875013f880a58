//! Every CUDA op against the CPU reference, through the conformance checks every backend passes (odd
//! sizes, every weight dtype, GQA groups, every mask and routing reduction). Skips on a machine without
//! an NVIDIA GPU unless `MSA_REQUIRE_CUDA` is set.

use msa_core::{DType, TensorView};
use msa_cuda::{COPY_KERNEL, CudaBackend, CudaOptions};
use msa_engine::conformance::{self, Tolerances};
use msa_engine::{Backend, DeviceLink};

/// f32 ops as the CPU reference computes them, in another order; projections of bf16 and f16 weights
/// over more than 8 rows run on tensor cores with the activations rounded to the weight's dtype
/// (8 significant bits for bf16), so they get a bf16-sized relative tolerance; routing against half
/// keys runs on tensor cores with the query split into two bf16 parts (16 significant bits).
const CUDA: Tolerances = Tolerances {
    f32_math: 2e-5,
    reduced_precision_gemm: 1e-2,
    half_key_routing: 2e-4,
};

fn gpu() -> Option<CudaBackend> {
    CudaBackend::open_or_skip(CudaOptions::default())
}

#[test]
fn every_op_matches_the_cpu_reference() {
    if let Some(gpu) = gpu() {
        eprintln!("{}", gpu.describe());
        conformance::check_all(&gpu, &CUDA);
    }
}

/// A context held alone grows by copying its new rows only (by the backend's copy count).
#[test]
fn appended_rows_on_cuda_copy_only_what_they_must() {
    if let Some(gpu) = gpu() {
        conformance::check_append_copies(&gpu, || gpu.execution_counts().copied_bytes);
    }
}

/// A head mean's routing scored by cuBLAS and a reduction kernel, as `cublas_routing` asks (the path
/// a head max always takes), instead of the fused `routing_mma`: both stay checked.
#[test]
fn cublas_routing_on_cuda_matches_the_cpu_reference() {
    if let Some(gpu) = CudaBackend::open_or_skip(CudaOptions {
        cublas_routing: true,
        ..CudaOptions::default()
    }) {
        conformance::check_routing_scores(&gpu, &CUDA);
    }
}

/// With `time_kernels`, every launch is counted and timed under its kernel's name, cuBLAS calls under
/// theirs and device copies as `COPY_KERNEL`, and the launch and copy counts agree with
/// `execution_counts`; without it there are no times. Enough launches that the timer adds up the
/// finished ones (every 256) while others are pending (on the emulator, the first poll finds an
/// event not ready), and records their events again.
#[test]
fn kernel_times_on_cuda_count_every_launch() {
    let Some(gpu) = CudaBackend::open_or_skip(CudaOptions {
        time_kernels: true,
        ..CudaOptions::default()
    }) else {
        return;
    };
    let values: Vec<f32> = (0..9 * 20).map(|i| (i % 7) as f32 - 3.0).collect();
    let bytes: Vec<u8> = (0..20 * 12)
        // Quarters are exact in bf16: the top half of the f32.
        .flat_map(|i| (((i % 5) as f32 * 0.25).to_bits() >> 16).to_le_bytes()[..2].to_vec())
        .collect();
    let weight = gpu
        .upload_weight(TensorView {
            name: "w",
            dtype: DType::BF16,
            shape: &[12, 20],
            bytes: &bytes,
        })
        .unwrap();
    let x = gpu.upload(&values, &[9, 20]).unwrap();
    let before = (gpu.execution_counts(), gpu.kernel_times().unwrap().unwrap());
    const ADDS: u64 = 600;
    let mut sum = gpu.add(&x, &x).unwrap();
    for _ in 1..ADDS {
        sum = gpu.add(&sum, &x).unwrap();
    }
    // 18 rows: a cuBLAS GEMM on tensor cores, after a kernel rounds the activations to bf16.
    let stacked = gpu.concat_rows(&[&sum, &x]).unwrap();
    let y = gpu.matmul(&stacked, &weight).unwrap();
    pollster::block_on(gpu.read(&y)).unwrap();
    let (counts, times) = (gpu.execution_counts(), gpu.kernel_times().unwrap().unwrap());
    let mut between = times.since(&before.1);
    let copies = between.0.remove(COPY_KERNEL).unwrap_or_default();
    assert_eq!(copies.launches, 2, "{between:?}");
    assert_eq!(counts.copies - before.0.copies, 2);
    assert_eq!(counts.copied_bytes - before.0.copied_bytes, 2 * 9 * 20 * 4);
    assert!(copies.time > std::time::Duration::ZERO);
    let launches = counts.launches - before.0.launches;
    assert_eq!(
        between.0.values().map(|t| t.launches).sum::<u64>(),
        launches,
        "{between:?}"
    );
    assert_eq!(
        between.0.get("add").map(|t| t.launches),
        Some(ADDS),
        "{between:?}"
    );
    let gemm = between.0.get("cuBLAS GemmEx").copied().unwrap_or_default();
    assert_eq!(gemm.launches, 1, "{between:?}");
    assert!(
        between
            .0
            .values()
            .all(|t| t.time > std::time::Duration::ZERO),
        "{between:?}"
    );
    // The read waited for the device at least once.
    assert!(counts.host_waits > before.0.host_waits);
    let plain = CudaBackend::new(CudaOptions::default()).unwrap();
    assert!(plain.kernel_times().unwrap().is_none());
}

/// NCCL's version where its library loads (no GPU needed), else the reason it does not.
#[test]
fn nccl_reports_its_version_or_why_it_is_missing() {
    match (msa_cuda::nccl_missing(), msa_cuda::nccl_version()) {
        (None, Ok(version)) => {
            let parts: Vec<u32> = version.split('.').map(|p| p.parse().unwrap()).collect();
            assert!(parts.len() == 3 && parts[0] >= 2, "{version}");
        }
        (Some(missing), Err(e)) => assert!(e.to_string().contains(&missing), "{e}"),
        (missing, version) => panic!("{missing:?} yet {version:?}"),
    }
}

/// Broadcasts go through NCCL between members of one clique, and nowhere else. A clique of one (all
/// a one-GPU machine allows: NCCL takes one device per GPU) runs the conformance check; a clique of
/// every GPU, where there are several, copies from the first to all. Skips where NCCL is missing
/// unless `MSA_REQUIRE_NCCL` is set.
#[test]
fn clique_members_broadcast_through_nccl() {
    let Some(gpu) = gpu() else {
        return;
    };
    let x = gpu.upload(&[1.0, -2.0, 3.5], &[1, 3]).unwrap();
    assert!(gpu.broadcast(&x, &[&gpu]).is_none(), "not in a clique");
    let error = CudaBackend::join_clique(&mut [gpu.clone(), gpu.clone()]).unwrap_err();
    assert!(error.to_string().contains("one device per GPU"), "{error}");
    if let Some(missing) = msa_cuda::nccl_missing() {
        assert!(
            std::env::var_os("MSA_REQUIRE_NCCL").is_none(),
            "MSA_REQUIRE_NCCL is set: {missing}"
        );
        eprintln!("skipping the NCCL run: {missing}");
        return;
    }
    let mut one = [gpu.clone()];
    CudaBackend::join_clique(&mut one).unwrap();
    assert!(
        one[0].broadcast(&x, &[&one[0]]).is_some(),
        "a clique of one"
    );
    assert!(
        one[0].broadcast(&x, &[&gpu]).is_none(),
        "a peer outside the clique"
    );
    conformance::check_broadcast(&one[0], &CUDA);

    let gpus = msa_cuda::device_count().unwrap();
    if gpus < 2 {
        eprintln!("one GPU: no clique of several to test");
        return;
    }
    let mut all: Vec<CudaBackend> = (0..gpus)
        .map(|ordinal| {
            CudaBackend::new(CudaOptions {
                ordinal,
                ..CudaOptions::default()
            })
            .unwrap()
        })
        .collect();
    CudaBackend::join_clique(&mut all).unwrap();
    let x = all[0].upload(&[1.0, -2.0, 3.5], &[1, 3]).unwrap();
    let peers: Vec<&CudaBackend> = all.iter().collect();
    assert!(
        all[0].broadcast(&x, &peers[2..]).is_none(),
        "not every member"
    );
    // The root outside the peers, then among them with the peers in reverse rank order.
    let reversed: Vec<&CudaBackend> = peers.iter().rev().copied().collect();
    for peers in [&peers[1..], &reversed[..]] {
        let copies = all[0].broadcast(&x, peers).unwrap().unwrap();
        assert_eq!(copies.len(), peers.len());
        for (peer, copy) in peers.iter().zip(&copies) {
            assert_eq!(
                pollster::block_on(peer.read(copy)).unwrap(),
                [1.0, -2.0, 3.5]
            );
            assert_eq!(peer.shape(copy), [1, 3]);
        }
    }
}

/// Both ends of a device link join at once, each on its own thread (as in two processes).
fn link(ends: [&CudaBackend; 2]) -> msa_engine::Result<[Box<dyn DeviceLink<CudaBackend>>; 2]> {
    let rendezvous = ends[0].link_rendezvous()?;
    std::thread::scope(|scope| {
        let other = scope.spawn(|| ends[1].join_link(&rendezvous, 1));
        let first = ends[0].join_link(&rendezvous, 0);
        Ok([first?, other.join().unwrap()?])
    })
}

/// Device links (NCCL communicators of two ranks, joined through a unique id as processes on two
/// machines do) carry tensors both ways, in the order sent. NCCL refuses two ends on one GPU, so a
/// one-GPU machine checks that refusal only. Skips where NCCL is missing unless `MSA_REQUIRE_NCCL`
/// is set.
#[test]
fn nccl_device_links_carry_tensors_between_gpus() {
    let Some(gpu) = gpu() else {
        return;
    };
    if let Some(missing) = msa_cuda::nccl_missing() {
        assert!(
            std::env::var_os("MSA_REQUIRE_NCCL").is_none(),
            "MSA_REQUIRE_NCCL is set: {missing}"
        );
        assert!(gpu.link_kind().is_none());
        return;
    }
    let kind = gpu.link_kind().unwrap();
    assert!(kind.starts_with("NCCL 2."), "{kind}");
    let error = gpu.join_link(&[1, 2, 3], 0).err().unwrap().to_string();
    assert!(error.contains("unique id of 128 bytes"), "{error}");
    let error = link([&gpu, &gpu]).err().unwrap().to_string();
    assert!(error.contains("NCCL set-up of the link"), "{error}");
    if msa_cuda::device_count().unwrap() < 2 {
        eprintln!("one GPU: no link between two to test");
        return;
    }
    let other = CudaBackend::new(CudaOptions {
        ordinal: 1,
        ..CudaOptions::default()
    })
    .unwrap();
    let [here, there] = link([&gpu, &other]).unwrap();
    assert!(
        here.describe().contains("CUDA device 0"),
        "{}",
        here.describe()
    );
    let values: Vec<f32> = (0..3 * 7 * 5).map(|i| i as f32 * 0.5 - 3.0).collect();
    let x = gpu.upload(&values, &[3, 7, 5]).unwrap();
    // A row range of a tensor, then the whole, then an answer the other way.
    here.send(&gpu.rows(&x, 1..3).unwrap()).unwrap();
    here.send(&x).unwrap();
    let rows = there.receive(&[2, 7, 5]).unwrap();
    let whole = there.receive(&[3, 7, 5]).unwrap();
    let read = |b: &CudaBackend, t| pollster::block_on(b.read(t)).unwrap();
    assert_eq!(read(&other, &rows), values[35..]);
    assert_eq!(read(&other, &whole), values);
    assert_eq!(other.shape(&whole), [3, 7, 5]);
    let doubled = other.add(&whole, &whole).unwrap();
    there.send(&doubled).unwrap();
    let back = here.receive(&[3, 7, 5]).unwrap();
    let expected: Vec<f32> = values.iter().map(|v| v * 2.0).collect();
    assert_eq!(read(&gpu, &back), expected);
    // An end whose other end went away is aborted from another thread: its waiting receive ends
    // (its tensor undefined), and later transfers fail.
    let pending = there.receive(&[4]).unwrap();
    let aborted = std::thread::spawn(move || {
        std::thread::sleep(std::time::Duration::from_millis(50));
        there.abort();
        there
    });
    read(&other, &pending);
    let error = aborted.join().unwrap().receive(&[4]).err().unwrap();
    assert!(error.to_string().contains("aborted"), "{error}");
}

#[test]
fn a_missing_driver_or_device_is_a_clear_error() {
    let opened = |ordinal| {
        CudaBackend::new(CudaOptions {
            ordinal,
            ..CudaOptions::default()
        })
        .err()
        .map(|e| e.to_string())
    };
    match msa_cuda::device_count() {
        // No library, or a driver that reports no device: opening and listing fail with the same
        // message.
        Err(e) => {
            let error = opened(0).expect("no usable CUDA device, yet the backend opened");
            assert_eq!(error, e.to_string());
            let listed = msa_cuda::devices().expect_err("no usable CUDA device, yet some listed");
            assert_eq!(listed.to_string(), error);
            if let Some(missing) = msa_cuda::libraries_missing() {
                assert!(error.contains(&missing), "{error}");
            }
        }
        Ok(count) => {
            let listed = msa_cuda::devices().unwrap();
            assert_eq!(listed.len(), count);
            assert!(
                listed
                    .iter()
                    .all(|d| !d.name.is_empty() && d.memory_bytes > 0)
            );
            let error = opened(count).expect("a device past the last one opened");
            assert!(
                error.contains(&format!("CUDA device {count} asked for, {count} found")),
                "{error}"
            );
        }
    }
}
