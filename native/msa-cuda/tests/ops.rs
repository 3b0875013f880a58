//! Every CUDA op against the CPU reference, through the conformance checks every backend passes (odd
//! sizes, every weight dtype, GQA groups, every mask and routing reduction). Skips on a machine without
//! an NVIDIA GPU unless `MSA_REQUIRE_CUDA` is set.

use msa_cuda::{CudaBackend, CudaOptions};
use msa_engine::Backend;
use msa_engine::conformance::{self, Tolerances};

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
