//! The CUDA kernels compile with NVRTC for the architectures msa targets. Needs only NVRTC, no GPU: CI
//! installs it from the `nvidia-cuda-nvrtc-cu12` wheel and sets `MSA_REQUIRE_NVRTC`, so a missing NVRTC
//! fails there instead of skipping.

#[test]
fn every_kernel_compiles_for_ampere_and_hopper() {
    if !msa_cuda::nvrtc_present() {
        let required = ["MSA_REQUIRE_NVRTC", "MSA_REQUIRE_CUDA"]
            .iter()
            .any(|v| std::env::var_os(v).is_some());
        assert!(
            !required,
            "NVRTC is required and libnvrtc.so could not be loaded (LD_LIBRARY_PATH?)"
        );
        eprintln!("skipping: libnvrtc.so could not be loaded");
        return;
    }
    for (major, minor) in [(8, 0), (9, 0)] {
        let ptx = msa_cuda::compile_kernels(major, minor).unwrap();
        assert!(
            ptx.contains(&format!(".target sm_{major}{minor}")),
            "PTX for the wrong target"
        );
        for kernel in msa_cuda::KERNELS {
            assert!(
                ptx.contains(&format!(".entry {kernel}(")),
                "sm_{major}{minor}: kernel {kernel} missing from the PTX"
            );
        }
    }
}
