//! `cargo xtask gpu-pack`: what `xtask/gpu-checks.sh` runs on an NVIDIA machine without Rust, built
//! here into `.gpu/` (x86-64 Linux binaries, about 50 MB once stripped).

use std::path::Path;
use std::process::Command;

use crate::{available, cargo, cargo_artifacts, root, run, step};

/// The test executables with CUDA checks, and the host-side benchmark of fetched pages' gather (the
/// GPU machine's cores, not this machine's): (cargo command and arguments selecting it, its name in
/// `.gpu/bin`).
const TESTS: &[(&[&str], &str)] = &[
    (&["test", "-p", "msa-cuda", "--test", "ops"], "cuda-ops"),
    (&["test", "-p", "msa", "--test", "golden_msa"], "golden_msa"),
    (
        &["test", "-p", "msa", "--test", "golden_qwen3"],
        "golden_qwen3",
    ),
    (
        &["test", "-p", "msa", "--test", "memory_bank"],
        "memory_bank",
    ),
    (
        &["bench", "-p", "msa-engine", "--bench", "page_gather"],
        "page_gather",
    ),
];

pub(crate) fn pack() -> Result<(), String> {
    let pack = root().join(".gpu");
    let bin = pack.join("bin");
    std::fs::create_dir_all(&bin).map_err(|e| format!("{}: {e}", bin.display()))?;
    step("cargo build --release -p msa-cli (the msa binary)");
    run(cargo().args(["build", "--release", "-p", "msa-cli"]))?;
    copy(&root().join("target/release/msa"), &bin.join("msa"))?;
    for (selection, name) in TESTS {
        step(&format!("building the executable {name} (release)"));
        let (&command, selection) = selection.split_first().expect("a cargo command");
        let mut build = cargo();
        build.arg(command);
        if command == "test" {
            build.arg("--release"); // benches build in release already
        }
        build.args(selection);
        let artifacts = cargo_artifacts(&mut build)?;
        copy(&test_executable(&artifacts, name)?, &bin.join(name))?;
    }
    // The tests find their fixtures under the checkout they were built in; the script links it there.
    let built_in = pack.join("built-in");
    std::fs::write(&built_in, root().display().to_string())
        .map_err(|e| format!("{}: {e}", built_in.display()))?;
    let mut bytes = 0;
    for entry in std::fs::read_dir(&bin).map_err(|e| format!("{}: {e}", bin.display()))? {
        bytes += entry.and_then(|e| e.metadata()).map_or(0, |m| m.len());
    }
    eprintln!(
        "packed {} ({:.1} MB): on the GPU machine, in this checkout, run `bash xtask/gpu-checks.sh`",
        bin.display(),
        bytes as f64 / 1e6
    );
    Ok(())
}

/// The executable cargo reported building for the test or bench target of `selection`.
fn test_executable(
    artifacts: &[serde_json::Value],
    name: &str,
) -> Result<std::path::PathBuf, String> {
    artifacts
        .iter()
        .filter(|m| {
            m["target"]["kind"]
                .as_array()
                .is_some_and(|kinds| kinds.iter().any(|k| k == "test" || k == "bench"))
        })
        .find_map(|m| m["executable"].as_str().map(Into::into))
        .ok_or_else(|| format!("cargo reported no test or bench executable for {name}"))
}

/// Copies an executable, without its symbol table where `strip` is installed (a quarter of its size).
fn copy(from: &Path, to: &Path) -> Result<(), String> {
    std::fs::copy(from, to)
        .map_err(|e| format!("copying {} to {}: {e}", from.display(), to.display()))?;
    let mut probe = Command::new("strip");
    probe.arg("--version");
    if available(probe) {
        run(Command::new("strip").arg(to))?;
    }
    Ok(())
}
