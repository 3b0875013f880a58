//! The conformance suite against the CPU reference itself: every check runs, and the reference passes
//! its own checks bit for bit.
#![cfg(feature = "conformance")]

use msa_engine::CpuBackend;
use msa_engine::conformance::{self, Tolerances};

#[test]
fn the_cpu_reference_passes_every_check_exactly() {
    let exact = Tolerances {
        f32_math: 0.0,
        reduced_precision_gemm: 0.0,
        half_key_routing: 0.0,
    };
    conformance::check_all(&CpuBackend::new(), &exact);
}
