//! The browser: `cargo xtask web` builds the WASM package and the demo site; [`test`] runs the browser
//! tests in headless Chromium (part of `cargo xtask test`).

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::{
    WASM_TARGET, apt_install, available, cargo, ensure_npm, ensure_wasm_target, root, run, step,
};

/// npm packages the browser build and test use, installed into `.cache/web-tools`: wasm-opt (Debian's
/// binaryen 108 emits wasm that breaks at run time) and a Chromium driver that uses the system browser.
const WEB_TOOLS: [&str; 2] = ["binaryen@132.0.0", "playwright-core@1.65.1"];
/// The bundled model files the demo serves.
const TINY_FILES: [&str; 5] = [
    "config.json",
    "model.safetensors",
    "tokenizer.json",
    "memory.json",
    "queries.json",
];

fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| root().join("target"), PathBuf::from)
}

fn size(path: &Path) -> u64 {
    std::fs::metadata(path).map_or(0, |m| m.len())
}

fn copy(from: &Path, to: &Path) -> Result<(), String> {
    std::fs::copy(from, to)
        .map(|_| ())
        .map_err(|e| format!("copying {} to {}: {e}", from.display(), to.display()))
}

/// `cargo SUBCOMMAND` of msa-web for the browser, with the size-tuned `wasm` profile the site ships.
fn cargo_wasm(subcommand: &str) -> Command {
    let mut command = cargo();
    command.args([
        subcommand,
        "--profile",
        "wasm",
        "--target",
        WASM_TARGET,
        "-p",
        "msa-web",
    ]);
    command
}

/// Builds `web/demo/pkg` (the optimised wasm, its wasm-bindgen glue, the JS API and a package.json:
/// an npm package) and
/// `web/demo/models/msa-tiny`: `web/demo` is then a static site.
pub fn build() -> Result<(), String> {
    ensure_wasm_target()?;
    ensure_wasm_bindgen_cli()?;
    build_site()
}

/// [`build`] once its tools are known to be there (but for the npm ones, checked here).
fn build_site() -> Result<(), String> {
    let tools = ensure_web_tools()?;
    step("cargo build --profile wasm --target wasm32-unknown-unknown -p msa-web");
    run(&mut cargo_wasm("build"))?;
    let raw = target_dir().join(format!("{WASM_TARGET}/wasm/msa_web.wasm"));
    let demo = root().join("web/demo");
    let pkg = demo.join("pkg");
    step("wasm-bindgen --target web → web/demo/pkg");
    run(Command::new("wasm-bindgen")
        .args(["--target", "web", "--out-dir"])
        .arg(&pkg)
        .arg(&raw))?;
    let wasm = pkg.join("msa_web_bg.wasm");
    let bound = size(&wasm);
    step("wasm-opt -O3 (npm binaryen)");
    run(Command::new(tools.join("node_modules/.bin/wasm-opt"))
        .arg("-O3")
        .arg(&wasm)
        .arg("-o")
        .arg(&wasm))?;
    for file in ["msa.js", "msa.d.ts"] {
        copy(&root().join("web/msa-web/js").join(file), &pkg.join(file))?;
    }
    // An npm package of the API (wasm-bindgen writes none for --target web).
    let package = serde_json::json!({
        "name": "msa-web",
        "version": env!("CARGO_PKG_VERSION"),
        "description": "Memory Sparse Attention in the browser: the msa engine on WebAssembly and WebGPU",
        "license": "Apache-2.0",
        "type": "module",
        "main": "msa.js",
        "types": "msa.d.ts",
        "files": ["msa.js", "msa.d.ts", "msa_web.js", "msa_web.d.ts", "msa_web_bg.wasm"],
    });
    std::fs::write(
        pkg.join("package.json"),
        serde_json::to_string_pretty(&package).expect("JSON") + "\n",
    )
    .map_err(|e| format!("{}: {e}", pkg.display()))?;
    let models = demo.join("models/msa-tiny");
    std::fs::create_dir_all(&models).map_err(|e| format!("{}: {e}", models.display()))?;
    for file in TINY_FILES {
        copy(
            &root().join("tests/fixtures/msa-tiny").join(file),
            &models.join(file),
        )?;
    }
    step(&format!(
        "msa_web_bg.wasm: {} bytes from cargo (profile wasm), {bound} after wasm-bindgen, {} after wasm-opt ({} gzipped)",
        size(&raw),
        size(&wasm),
        gzipped(&wasm).map_or_else(|| "?".into(), |n| n.to_string()),
    ));
    step("web/demo is ready: serve it statically, e.g. `python3 -m http.server -d web/demo`");
    Ok(())
}

/// Bytes of `gzip -9` of a file, when gzip is there.
fn gzipped(path: &Path) -> Option<usize> {
    let output = Command::new("gzip").arg("-9c").arg(path).output().ok()?;
    output.status.success().then_some(output.stdout.len())
}

/// The browser tests.
/// - msa-web's wasm test binary (the JS API against the reference's goldens) runs in headless Chromium
///   through `wasm-bindgen-test-runner` and chromedriver (flags in `web/msa-web/webdriver.json`).
/// - The demo page, built by [`build`], is driven through playwright-core: its answers must equal the
///   native engine's (`examples/ask.rs --json`), and a launch without WebGPU must say so. Screenshots
///   land in `target/web-demo/`.
pub fn test() -> Result<(), String> {
    ensure_browser()?;
    ensure_wasm_bindgen_cli()?;
    step(
        "cargo test --profile wasm --target wasm32-unknown-unknown -p msa-web (headless Chromium, WebGPU)",
    );
    // The shipped profile: the demo build below reuses every dependency compiled here.
    run(cargo_wasm("test")
        .env("CHROMEDRIVER", "chromedriver")
        // SwiftShader compiles every pipeline on the CPU: the default 20 s per test is too short.
        .env("WASM_BINDGEN_TEST_TIMEOUT", "600"))?;
    build_site()?;
    let out = target_dir().join("web-demo");
    std::fs::create_dir_all(&out).map_err(|e| format!("{}: {e}", out.display()))?;
    let native = out.join("native-answers.json");
    step("the native engine's answers (cargo run --example ask -- --json)");
    run(cargo()
        .args(["run", "--quiet", "--example", "ask", "--", "--json"])
        .arg(&native))?;
    step("the demo page in headless Chromium (playwright-core)");
    run(Command::new("node")
        .arg(root().join("web/demo/e2e.cjs"))
        .arg(root().join("web/demo"))
        .arg(&native)
        .arg(&out)
        .env("MSA_WEB_TOOLS", root().join(".cache/web-tools")))
}

/// A CJK font, so the screenshots of the tiny model's CJK text show characters, not boxes.
const CJK_FONT: &str = "/usr/share/fonts/truetype/wqy/wqy-microhei.ttc";

/// Debian's Chromium, its chromedriver and a CJK font; installed when missing.
fn ensure_browser() -> Result<(), String> {
    if available(Command::new("chromedriver"))
        && Path::new("/usr/bin/chromium").exists()
        && Path::new(CJK_FONT).exists()
    {
        return Ok(());
    }
    if !available(Command::new("apt-get")) {
        return Err(
            "the browser tests need Chromium at /usr/bin/chromium and chromedriver \
                    (Debian: apt-get install chromium chromium-driver)"
                .into(),
        );
    }
    step("installing Chromium and chromedriver for the browser tests (apt-get)");
    apt_install(&["chromium", "chromium-driver"])
}

/// wasm-bindgen and its test runner at the wasm-bindgen version in Cargo.lock; installed when missing.
fn ensure_wasm_bindgen_cli() -> Result<(), String> {
    let lock = std::fs::read_to_string(root().join("Cargo.lock"))
        .map_err(|e| format!("Cargo.lock: {e}"))?;
    let version = lock
        .split("[[package]]")
        .find_map(|p| {
            p.contains("\nname = \"wasm-bindgen\"\n")
                .then(|| p.split("version = \"").nth(1)?.split('"').next())
                .flatten()
        })
        .ok_or("Cargo.lock has no wasm-bindgen package")?
        .to_string();
    let installed = ["wasm-bindgen", "wasm-bindgen-test-runner"]
        .iter()
        .all(|tool| {
            Command::new(tool).arg("--version").output().is_ok_and(|o| {
                String::from_utf8_lossy(&o.stdout)
                    .split_whitespace()
                    .any(|w| w == version)
            })
        });
    if installed {
        return Ok(());
    }
    step(&format!(
        "installing wasm-bindgen-cli {version} (cargo install; a few minutes)"
    ));
    // Not --locked: the CLI's own lock file pins a webpki-roots release that is no longer published.
    run(cargo().args(["install", "wasm-bindgen-cli", "--version", &version]))
}

/// [`WEB_TOOLS`] in `.cache/web-tools`; returns that folder.
fn ensure_web_tools() -> Result<PathBuf, String> {
    let dir = root().join(".cache/web-tools");
    let have = |package: &str| {
        let (name, version) = package.rsplit_once('@').expect("name@version");
        let manifest = dir.join("node_modules").join(name).join("package.json");
        std::fs::read_to_string(manifest)
            .is_ok_and(|text| text.contains(&format!("\"version\": \"{version}\"")))
    };
    if WEB_TOOLS.iter().all(|p| have(p)) {
        return Ok(dir);
    }
    ensure_npm()?;
    step(&format!(
        "npm install {} into .cache/web-tools",
        WEB_TOOLS.join(" ")
    ));
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    run(Command::new("npm")
        .args([
            "install",
            "--no-save",
            "--no-audit",
            "--no-fund",
            "--prefix",
        ])
        .arg(&dir)
        .args(WEB_TOOLS)
        .env("npm_config_update_notifier", "false"))?;
    Ok(dir)
}
