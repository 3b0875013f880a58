//! The CUDA kernels compile with NVRTC: to machine code for the architectures msa targets, and to PTX
//! for a GPU newer than this NVRTC knows. Needs only NVRTC, no GPU: CI installs it from the
//! `nvidia-cuda-nvrtc-cu12` wheel and sets `MSA_REQUIRE_NVRTC`, so a missing NVRTC fails there instead of
//! skipping.

use msa_cuda::CompiledKernels;

fn nvrtc_or_skip() -> bool {
    if msa_cuda::nvrtc_present() {
        return true;
    }
    let required = ["MSA_REQUIRE_NVRTC", "MSA_REQUIRE_CUDA"]
        .iter()
        .any(|v| std::env::var_os(v).is_some());
    assert!(
        !required,
        "NVRTC is required and libnvrtc.so could not be loaded (LD_LIBRARY_PATH?)"
    );
    eprintln!("skipping: libnvrtc.so could not be loaded");
    false
}

fn assert_every_kernel(compiled: &CompiledKernels, what: &str) {
    for kernel in msa_cuda::KERNELS {
        assert!(compiled.defines(kernel), "{what}: kernel {kernel} missing");
    }
    assert!(
        !compiled.defines("no_such_kernel"),
        "{what}: defines() always says yes"
    );
}

#[test]
fn every_kernel_compiles_to_machine_code_for_ampere_and_hopper() {
    if !nvrtc_or_skip() {
        return;
    }
    for (major, minor) in [(8, 0), (9, 0)] {
        let compiled = msa_cuda::compile_kernels(major, minor).unwrap();
        assert!(
            matches!(compiled, CompiledKernels::Cubin(_)),
            "sm_{major}{minor}: expected machine code"
        );
        assert_every_kernel(&compiled, &format!("sm_{major}{minor}"));
    }
}

#[test]
fn a_gpu_newer_than_nvrtc_gets_ptx_for_the_newest_architecture_it_knows() {
    if !nvrtc_or_skip() {
        return;
    }
    let compiled = msa_cuda::compile_kernels(99, 9).unwrap();
    let CompiledKernels::Ptx(ptx) = &compiled else {
        panic!("expected PTX for sm_999");
    };
    assert!(
        ptx.contains(".target sm_"),
        "not PTX: {}",
        &ptx[..200.min(ptx.len())]
    );
    assert_every_kernel(&compiled, "sm_999");
}
