//! Compiles msa-cuda's kernels.cu for the CPU, with the definitions and the kernel list msa-cuda
//! itself uses (its kernel_abi.rs, included here).

use std::fmt::Write;
use std::path::Path;

include!("../msa-cuda/src/kernel_abi.rs");

fn main() {
    // The fiber switch is x86-64 assembly, and the libraries it stands in for are Linux's.
    let target_os = std::env::var("CARGO_CFG_TARGET_OS").unwrap_or_default();
    let target_arch = std::env::var("CARGO_CFG_TARGET_ARCH").unwrap_or_default();
    if (target_os.as_str(), target_arch.as_str()) != ("linux", "x86_64") {
        return;
    }
    let msa_cuda = Path::new("../msa-cuda/src");
    let out = std::env::var("OUT_DIR").expect("cargo sets OUT_DIR");
    let mut table = String::new();
    for kernel in KERNELS {
        writeln!(table, "KERNEL({kernel})").expect("writing to a String");
    }
    std::fs::write(Path::new(&out).join("kernel_table.inc"), table)
        .expect("writing the kernel table");

    let mut build = cc::Build::new();
    build
        .cpp(true)
        .std("c++17")
        .file("src/emulator.cpp")
        .include(msa_cuda)
        .include("src")
        .include(&out)
        .opt_level(2)
        // kernels.cu's `#pragma unroll` is for NVRTC (GCC ignores it, Clang may fail to follow it).
        .flag_if_supported("-Wno-unknown-pragmas")
        .flag_if_supported("-Wno-pass-failed");
    // Every access checked for its type's alignment, as a GPU checks it, and every subscript of an
    // array for its bounds; emulator.cpp handles what fails (no UBSan runtime is linked). Clang's
    // `bounds` would add `local-bounds`, which has no handler before Clang 20.
    let checks = if build.get_compiler().is_like_clang() {
        "alignment,array-bounds"
    } else {
        "alignment,bounds"
    };
    build
        .flag(format!("-fsanitize={checks}"))
        .flag(format!("-fsanitize-recover={checks}"));
    for (name, value) in kernel_defines() {
        build.define(name, value.to_string().as_str());
    }
    build.compile("msa_cuda_emulator_kernels");
    for file in [
        "src/emulator.cpp",
        "src/cuda_host.h",
        "src/self_test.cu",
        "../msa-cuda/src/kernels.cu",
        "../msa-cuda/src/kernel_abi.rs",
    ] {
        println!("cargo:rerun-if-changed={file}");
    }
}
