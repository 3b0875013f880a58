//! Every CUDA op against the CPU reference, through the conformance checks every backend passes (odd
//! sizes, every weight dtype, GQA groups, every mask and routing reduction). Skips on a machine without
//! an NVIDIA GPU unless `MSA_REQUIRE_CUDA` is set.

use msa_cuda::{CudaBackend, CudaOptions};
use msa_engine::Backend;
use msa_engine::conformance::{self, Tolerances};

/// f32 ops as the CPU reference computes them, in another order; projections of bf16 and f16 weights
/// over more than 8 rows run on tensor cores with the activations rounded to the weight's dtype
/// (8 significant bits for bf16), so they get a bf16-sized relative tolerance.
const CUDA: Tolerances = Tolerances {
    f32_math: 2e-5,
    reduced_precision_gemm: 1e-2,
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
    match msa_cuda::libraries_missing() {
        Some(missing) => {
            let error = CudaBackend::new(CudaOptions::default())
                .err()
                .expect("no CUDA libraries, yet the backend opened")
                .to_string();
            assert!(error.contains(&missing), "{error}");
        }
        None => {
            let count = msa_cuda::device_count().unwrap();
            let error = CudaBackend::new(CudaOptions { ordinal: count })
                .err()
                .expect("a device past the last one opened")
                .to_string();
            assert!(
                error.contains(&format!("CUDA device {count} asked for, {count} found")),
                "{error}"
            );
        }
    }
}
