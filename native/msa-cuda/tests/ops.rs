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
