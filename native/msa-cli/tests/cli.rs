//! The real `msa` binary on the bundled tiny model: every subcommand, its output, and its error paths.

use std::ffi::OsStr;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};

use assert_cmd::Command;
use msa_core::bank::{Bank, OpenOptions};
use msa_engine::{CpuBackend, GenerateOptions, Model};
use predicates::prelude::*;
use predicates::str::contains;
use serde_json::Value;

#[path = "../../../tests/support/interleave_model.rs"]
mod interleave_model;

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/msa-tiny")
}

fn msa() -> Command {
    let mut command = Command::cargo_bin("msa").expect("the msa binary is built");
    // Each test gets its own logs quiet; Mesa wants a runtime dir for the wgpu runs.
    command.env_remove("RUST_LOG");
    command
}

fn strings(file: &str) -> Vec<String> {
    serde_json::from_str(&std::fs::read_to_string(fixture().join(file)).unwrap()).unwrap()
}

/// The fixture's documents as a JSONL corpus with ids `doc-0` … `doc-7`.
fn write_corpus(dir: &Path) -> PathBuf {
    let path = dir.join("corpus.jsonl");
    let lines: Vec<String> = strings("memory.json")
        .iter()
        .enumerate()
        .map(|(i, text)| serde_json::json!({"id": format!("doc-{i}"), "text": text}).to_string())
        .collect();
    std::fs::write(&path, lines.join("\n") + "\n").unwrap();
    path
}

/// A bank of the fixture corpus, encoded by the binary.
fn encoded_bank(dir: &Path) -> PathBuf {
    let bank = dir.join("bank");
    let corpus = write_corpus(dir);
    encode(fixture(), &bank)
        .arg(&corpus)
        .assert()
        .success()
        .stdout(contains("encoded 8 documents"));
    bank
}

/// `msa encode` on the CPU of `model` into `bank`; corpus paths follow.
fn encode(model: impl AsRef<Path>, bank: impl AsRef<Path>) -> Command {
    let mut command = msa();
    command
        .args(["encode", "--backend", "cpu", "--model"])
        .arg(model.as_ref())
        .arg("--out")
        .arg(bank.as_ref());
    command
}

fn documents_in(bank: &Path) -> usize {
    Bank::open(bank, OpenOptions::default())
        .unwrap()
        .documents()
        .len()
}

fn json_of(output: &[u8]) -> Value {
    serde_json::from_slice(output)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(output)))
}

/// `msa ask --json` with the fixture model.
fn ask_json(bank: &Path, question: &str, extra: &[&str]) -> Value {
    ask_json_with(&fixture(), bank, question, extra)
}

/// `msa ask --json --max-tokens 6`.
fn ask_json_with(model: &Path, bank: &Path, question: &str, extra: &[&str]) -> Value {
    let output = msa()
        .args(["ask", "--json", "--max-tokens", "6", "--model"])
        .arg(model)
        .arg("--bank")
        .arg(bank)
        .args(extra)
        .arg(question)
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    json_of(&output.stdout)
}

fn routed_ids(answer: &Value) -> Vec<Vec<u64>> {
    answer["routing"]
        .as_array()
        .unwrap()
        .iter()
        .map(|layer| {
            layer["documents"]
                .as_array()
                .unwrap()
                .iter()
                .map(|d| d["id"].as_u64().unwrap())
                .collect()
        })
        .collect()
}

/// Whether wgpu runs are expected here: an adapter exists, or CI demands one (then a missing adapter
/// fails the test instead of skipping it).
fn wgpu_expected() -> bool {
    let required = ["CI", "MSA_REQUIRE_GPU"]
        .iter()
        .any(|v| std::env::var_os(v).is_some());
    let found = !pollster::block_on(msa_wgpu::list_adapters()).is_empty();
    if !found && !required {
        eprintln!("skipping the wgpu run: no adapter");
    }
    found || required
}

#[test]
fn help_lists_every_command_and_each_command_documents_its_flags() {
    let top = msa().arg("--help").assert().success();
    let text = String::from_utf8(top.get_output().stdout.clone()).unwrap();
    for command in [
        "info", "devices", "encode", "ask", "chat", "bench", "serve", "shard",
    ] {
        assert!(text.contains(command), "--help lacks {command}:\n{text}");
    }
    let flags: [(&str, &[&str]); 8] = [
        ("info", &["--verify", "--json"]),
        ("devices", &["--json"]),
        (
            "encode",
            &["--model", "--out", "--commit-tokens", "--backend", "JSONL"],
        ),
        (
            "ask",
            &[
                "--show-routing",
                "--json",
                "--temperature",
                "--top-p",
                "--seed",
                "--max-tokens",
                "--devices",
                "--shards",
            ],
        ),
        ("chat", &["/routing", "--bank"]),
        (
            "shard",
            &["--bank", "--rank", "--of", "--listen", "--backend"],
        ),
        (
            "bench",
            &[
                "--preset",
                "msa-4b",
                "--memory-tokens",
                "--devices",
                "--json",
                "--bank",
            ],
        ),
        (
            "serve",
            &[
                "--listen",
                "--max-request-bytes",
                "--max-concurrent",
                "/v1/chat/completions",
            ],
        ),
    ];
    for (command, wanted) in flags {
        let out = msa().args([command, "--help"]).assert().success();
        let text = String::from_utf8(out.get_output().stdout.clone()).unwrap();
        for flag in wanted {
            assert!(
                text.contains(flag),
                "msa {command} --help lacks {flag}:\n{text}"
            );
        }
    }
    msa().arg("frobnicate").assert().failure().code(2);
}

#[test]
fn info_summarises_a_model_and_a_bank_and_names_bad_paths() {
    msa()
        .arg("info")
        .arg(fixture())
        .assert()
        .success()
        .stdout(contains("router layers: 2 of 4 (2..=3)"))
        .stdout(contains("parameters: 193216"))
        .stdout(contains("dtype: f32"));
    let dir = tempfile::tempdir().unwrap();
    let bank = encoded_bank(dir.path());
    let out = msa()
        .args(["info", "--json", "--verify"])
        .arg(&bank)
        .assert()
        .success();
    let report = json_of(&out.get_output().stdout);
    assert_eq!(report["documents"], 8);
    assert_eq!(report["tokens"], 1049);
    assert_eq!(report["checksums"], "verified");
    msa()
        .args(["info", "/no/such/dir"])
        .assert()
        .failure()
        .stderr(contains("/no/such/dir does not exist"));
    msa()
        .arg("info")
        .arg(dir.path())
        .assert()
        .failure()
        .stderr(contains("neither a model directory"));
}

#[test]
fn devices_lists_adapters_as_text_and_json() {
    let out = msa().args(["devices", "--json"]).assert().success();
    let adapters = json_of(&out.get_output().stdout);
    let list = adapters.as_array().expect("a JSON list");
    if wgpu_expected() {
        assert!(!list.is_empty(), "no adapter listed");
        assert!(list[0]["max buffer MiB"].as_u64().unwrap() > 0);
        let name = list[0]["name"].as_str().unwrap().to_string();
        msa()
            .arg("devices")
            .assert()
            .success()
            .stdout(contains(name));
    }
    // Then the CUDA devices, or why there are none.
    let text = msa().arg("devices").assert().success();
    let stdout = String::from_utf8_lossy(&text.get_output().stdout).into_owned();
    assert!(
        stdout.contains("backend: CUDA") || stdout.contains("cuda: "),
        "{stdout}"
    );
}

#[test]
fn encode_appends_resumes_and_reports_bad_input_by_line() {
    let dir = tempfile::tempdir().unwrap();
    let bank = encoded_bank(dir.path());
    let corpus = dir.path().join("corpus.jsonl");
    // Re-running is a no-op; a grown corpus appends only the new document.
    let extra = dir.path().join("notes.txt");
    // The toy tokenizer knows only the fixture's vocabulary: a new document made of its words.
    let memory = strings("memory.json");
    std::fs::write(&extra, format!("{}{}", memory[1], memory[0])).unwrap();
    encode(fixture(), &bank)
        .arg(&corpus)
        .arg(&extra)
        .assert()
        .success()
        .stdout(contains("encoded 1 documents"))
        .stdout(contains("8 already in the bank"))
        .stdout(contains("9 documents"));
    // A folder is read recursively; a bad JSONL line is named with its line number.
    let folder = dir.path().join("folder");
    std::fs::create_dir_all(folder.join("sub")).unwrap();
    std::fs::write(
        folder.join("sub/bad.jsonl"),
        "{\"id\": \"x\", \"text\": \"fine\"}\n\n{\"id\": \"y\", \"txt\": \"typo\"}\n",
    )
    .unwrap();
    encode(fixture(), &bank)
        .arg(&folder)
        .assert()
        .failure()
        .stderr(contains("bad.jsonl:3:"));
    // Nothing was lost: the bank still opens with its 9 documents.
    assert_eq!(documents_in(&bank), 9);
    msa()
        .args(["encode", "--model", "/no/model", "--out"])
        .arg(&bank)
        .arg(&corpus)
        .assert()
        .failure()
        .stderr(contains("model directory /no/model does not exist"));
    encode(fixture(), &bank)
        .arg(dir.path().join("missing.jsonl"))
        .assert()
        .failure()
        .stderr(contains("missing.jsonl"));
}

#[test]
fn ask_answers_like_the_engine_and_shows_routing() {
    let dir = tempfile::tempdir().unwrap();
    let bank = encoded_bank(dir.path());
    let question = &strings("queries.json")[0];
    let answer = ask_json(&bank, question, &["--backend", "cpu"]);
    // The same question through the engine API on the same bank.
    let model = Model::load(fixture(), CpuBackend::new()).unwrap();
    let memory = model
        .open_memory(
            Bank::open(&bank, OpenOptions::default()).unwrap(),
            Vec::new(),
        )
        .unwrap();
    let options = GenerateOptions {
        max_tokens: 6,
        ..GenerateOptions::default()
    };
    let (tokens, routing) = pollster::block_on(async {
        let mut generation = model.ask(&memory, question, &options).await.unwrap();
        let tokens = generation.collect_tokens().await.unwrap();
        (tokens, generation.routing().to_vec())
    });
    assert_eq!(token_ids(&answer), tokens);
    let engine_ids: Vec<Vec<u64>> = routing
        .iter()
        .map(|l| l.documents.iter().map(|d| d.id as u64).collect())
        .collect();
    assert_eq!(routed_ids(&answer), engine_ids);
    assert_eq!(
        answer["routing"][0]["documents"][0]["source"],
        format!("doc-{}", engine_ids[0][0])
    );
    assert_eq!(
        answer["answer"].as_str().unwrap(),
        model.require_tokenizer().unwrap().decode(&tokens).unwrap()
    );
    // Memory Parallel over three CPU shards answers identically.
    let sharded = ask_json(&bank, question, &["--backend", "cpu", "--devices", "3"]);
    assert_eq!(sharded["tokens"], answer["tokens"]);
    assert_eq!(routed_ids(&sharded), routed_ids(&answer));
    // The text view: routing per layer with scores and sources, then the answer.
    msa()
        .args([
            "ask",
            "--backend",
            "cpu",
            "--show-routing",
            "--max-tokens",
            "6",
            "--model",
        ])
        .arg(fixture())
        .arg("--bank")
        .arg(&bank)
        .arg(question)
        .assert()
        .success()
        .stdout(contains("layer  2:"))
        .stdout(contains("layer  3:"))
        .stdout(contains(format!("[{}]", engine_ids[1][0])))
        .stdout(contains(answer["answer"].as_str().unwrap()));
    // Seeded sampling repeats itself.
    let sampled = [
        "--backend",
        "cpu",
        "--temperature",
        "0.9",
        "--top-p",
        "0.8",
        "--seed",
        "5",
    ];
    assert_eq!(
        ask_json(&bank, question, &sampled)["tokens"],
        ask_json(&bank, question, &sampled)["tokens"]
    );
}

#[test]
fn ask_leaves_the_stop_token_out_of_the_text() {
    let dir = tempfile::tempdir().unwrap();
    let bank = encoded_bank(dir.path());
    let question = &strings("queries.json")[0];
    let free = token_ids(&ask_json(&bank, question, &["--backend", "cpu"]));
    // The first token after the first that did not come before: the same model with it as its
    // end-of-sequence token stops right there.
    let stop = (1..free.len())
        .find(|&i| !free[..i].contains(&free[i]))
        .expect("the answer has two distinct tokens");
    let model = dir.path().join("model");
    std::fs::create_dir(&model).unwrap();
    for entry in std::fs::read_dir(fixture()).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), model.join(entry.file_name())).unwrap();
    }
    let mut config: Value =
        serde_json::from_str(&std::fs::read_to_string(model.join("config.json")).unwrap()).unwrap();
    config["eos_token_id"] = free[stop].into();
    std::fs::write(model.join("config.json"), config.to_string()).unwrap();
    let stopped = ask_json_with(&model, &bank, question, &["--backend", "cpu"]);
    assert_eq!(stopped["finish_reason"], "stop");
    assert_eq!(token_ids(&stopped), free[..=stop]);
    let tokenizer = msa_core::MsaTokenizer::from_file(fixture().join("tokenizer.json")).unwrap();
    assert_eq!(stopped["answer"], tokenizer.decode(&free[..stop]).unwrap());
}

fn token_ids(answer: &Value) -> Vec<u32> {
    answer["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_u64().unwrap() as u32)
        .collect()
}

#[test]
fn ask_on_wgpu_routes_like_the_cpu() {
    if !wgpu_expected() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let bank = encoded_bank(dir.path());
    for question in strings("queries.json") {
        let cpu = ask_json(&bank, &question, &["--backend", "cpu"]);
        let gpu = ask_json(&bank, &question, &["--backend", "wgpu", "--devices", "2"]);
        assert_eq!(routed_ids(&gpu), routed_ids(&cpu), "{question}");
        assert!(gpu["backend"].as_str().unwrap().starts_with("wgpu"));
    }
}

/// `msa -v ask` on CUDA with `extra` options (Memory Parallel shards), which must answer as the CPU does
/// and log `path` (how the router queries reach the shards).
fn ask_on_cuda_like_the_cpu(bank: &Path, extra: &[&str], path: &str) {
    let question = &strings("queries.json")[0];
    let cpu = ask_json(bank, question, &["--backend", "cpu"]);
    let output = msa()
        .env_remove("RUST_LOG")
        .args([
            "-v",
            "ask",
            "--json",
            "--max-tokens",
            "6",
            "--backend",
            "cuda",
        ])
        .args(extra)
        .arg("--model")
        .arg(fixture())
        .arg("--bank")
        .arg(bank)
        .arg(question)
        .output()
        .unwrap();
    let log = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{log}");
    assert!(log.contains(path), "expected {path:?} in:\n{log}");
    let answer = json_of(&output.stdout);
    assert!(answer["backend"].as_str().unwrap().starts_with("cuda"));
    assert_eq!(routed_ids(&answer), routed_ids(&cpu));
    assert_eq!(answer["tokens"], cpu["tokens"]);
}

/// `ask` on CUDA with a Memory Parallel shard per GPU answers as the CPU does. With several GPUs and
/// NCCL the shards join a clique and the router queries go GPU to GPU; with one GPU two shards share
/// it, through the host. Skips without a CUDA device unless `MSA_REQUIRE_CUDA` is set.
#[test]
fn ask_on_cuda_shards_answers_like_the_cpu() {
    if msa_cuda::CudaBackend::open_or_skip(msa_cuda::CudaOptions::default()).is_none() {
        return;
    }
    let gpus = msa_cuda::device_count().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let devices = gpus.max(2).to_string();
    let path = match (gpus, msa_cuda::nccl_missing()) {
        (2.., None) => format!("router queries reach the {devices} shards over NCCL"),
        _ => "through the host".into(),
    };
    ask_on_cuda_like_the_cpu(&encoded_bank(dir.path()), &["--devices", &devices], &path);
}

/// `bench` on CUDA counts each decoded token's launches and the host's waits for the device (the
/// greedy token's read-back at least), within the token's time, and with `MSA_CUDA_TIME_KERNELS`
/// times every launch by kernel. Skips without a CUDA device unless `MSA_REQUIRE_CUDA` is set.
#[test]
fn bench_on_cuda_counts_launches_and_host_waits_per_token() {
    if msa_cuda::CudaBackend::open_or_skip(msa_cuda::CudaOptions::default()).is_none() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (report, stdout) = two_question_bench(
        dir.path(),
        &[
            "--backend",
            "cuda",
            "--memory-tokens",
            "2K",
            "--encode-tokens",
            "64",
        ],
        Some(("MSA_CUDA_TIME_KERNELS", "1")),
    );
    assert!(
        stdout.contains("host waits") && stdout.contains("decode kernels"),
        "{stdout}"
    );
    let decode = &report["decode"];
    assert_eq!(decode["tokens"], 6, "{report:#}");
    // A decode step runs every layer's kernels: more launches than the tiny preset's 4 layers.
    assert!(
        decode["dispatches_per_token"].as_f64().unwrap() > 4.0,
        "{report:#}"
    );
    assert!(decode["submits_per_token"].is_null(), "{report:#}");
    assert!(
        decode["host_waits_per_token"].as_f64().unwrap() >= 1.0,
        "{report:#}"
    );
    let wait_ms = decode["host_wait_ms_per_token"].as_f64().unwrap();
    let token_ms = 1e3 / decode["tokens_per_second"].as_f64().unwrap();
    assert!(wait_ms > 0.0 && wait_ms <= token_ms, "{report:#}");
    // A decode step copies each layer's new key and value row into its context (4 layers × 2 KV
    // heads × 16 dims in f32), not the context.
    assert_eq!(decode["copies_per_token"], 8.0, "{report:#}");
    assert_eq!(decode["copied_bytes_per_token"], 1024.0, "{report:#}");
    // Every launch and copy is timed under its kernel: the timed launches add up to the counted ones.
    let kernels = decode["kernels"].as_array().unwrap();
    let timed: f64 = kernels
        .iter()
        .map(|k| k["launches_per_token"].as_f64().unwrap())
        .sum();
    let counted = decode["dispatches_per_token"].as_f64().unwrap()
        + decode["copies_per_token"].as_f64().unwrap();
    assert!((timed - counted).abs() < 1e-9, "{report:#}");
    assert!(
        kernels.iter().any(|k| k["kernel"] == "attention"),
        "{report:#}"
    );
}

/// `ask` on CUDA with its second shard on a shard server (another process, on the second GPU) sends the
/// router queries over an NCCL device link and answers as the CPU does. Where no link can be made (one
/// GPU: NCCL refuses two ends on it; no NCCL) they go through the host, with the same answer. Skips
/// without a CUDA device unless `MSA_REQUIRE_CUDA` is set.
#[test]
fn ask_on_cuda_with_a_shard_server_links_the_gpus_over_nccl() {
    if msa_cuda::CudaBackend::open_or_skip(msa_cuda::CudaOptions::default()).is_none() {
        return;
    }
    let gpus = msa_cuda::device_count().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let bank = encoded_bank(dir.path());
    // The server on the second GPU this process sees (its only one), where there is one.
    let seen: Vec<String> = match std::env::var("CUDA_VISIBLE_DEVICES") {
        Ok(list) => list.split(',').map(str::to_string).collect(),
        Err(_) => (0..gpus).map(|gpu| gpu.to_string()).collect(),
    };
    let log = dir.path().join("shard.log");
    let server = start_shard_with(
        &["--backend", "cuda"],
        |command| {
            command
                .env("CUDA_VISIBLE_DEVICES", &seen[gpus.min(2) - 1])
                .env("RUST_LOG", "msa_shard=info")
                .stderr(std::fs::File::create(&log).unwrap());
        },
        &[OsStr::new("--bank"), bank.as_os_str()],
        &["--rank", "1", "--of", "2"],
        1,
        2,
    );
    let linked = gpus > 1 && msa_cuda::nccl_missing().is_none();
    let path = match linked {
        true => "router queries go over NCCL",
        false => "router queries go through the host",
    };
    ask_on_cuda_like_the_cpu(&bank, &["--shards", &server.address], path);
    if linked {
        // The server says what the link carried once the client has gone: the router queries of
        // its requests, which did not go through the host.
        let carried = |log: &str| -> Option<usize> {
            let (_, rest) = log.split_once("carried the router queries of ")?;
            rest.split_once(" requests")?.0.parse().ok()
        };
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        let requests = loop {
            let text = std::fs::read_to_string(&log).unwrap();
            match carried(&text) {
                Some(requests) => break requests,
                None if std::time::Instant::now() < deadline => {
                    std::thread::sleep(std::time::Duration::from_millis(50))
                }
                None => panic!("the shard server never said what its link carried:\n{text}"),
            }
        };
        assert!(requests > 0, "{requests}");
    }
}

#[test]
fn ask_refuses_bad_input_with_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let bank = encoded_bank(dir.path());
    let ask = |extra: &[&str]| {
        let mut command = msa();
        command
            .args(["ask", "--backend", "cpu", "--model"])
            .arg(fixture())
            .arg("--bank")
            .arg(&bank)
            .args(extra);
        command
    };
    ask(&["--top-p", "0", "q"])
        .assert()
        .failure()
        .stderr(contains("top_p"));
    ask(&["   "])
        .assert()
        .failure()
        .stderr(contains("question is empty"));
    msa()
        .args(["ask", "--backend", "cpu", "--model"])
        .arg(fixture())
        .arg("--bank")
        .arg(dir.path())
        .arg("q")
        .assert()
        .failure()
        .stderr(contains("is not a bank"));
    // A bank from another model: the tiny shape with other (random) weights.
    let other = random_tiny_model(dir.path());
    msa()
        .args(["ask", "--backend", "cpu", "--model"])
        .arg(&other)
        .arg("--bank")
        .arg(&bank)
        .arg("q")
        .assert()
        .failure()
        .stderr(contains("was encoded by a different model"))
        .stderr(contains("weights_digest"));
    // Nor does that model append to it.
    encode(&other, &bank)
        .arg(dir.path().join("corpus.jsonl"))
        .assert()
        .failure()
        .stderr(contains("different model"));
    assert_eq!(documents_in(&bank), 8);
}

/// The bench's random tiny model, with the fixture's tokenizer so it can take text.
fn random_tiny_model(dir: &Path) -> PathBuf {
    let cache = dir.join("cache");
    msa()
        .args([
            "bench",
            "--backend",
            "cpu",
            "--memory-tokens",
            "2K",
            "--encode-tokens",
            "64",
            "--queries",
            "1",
            "--decode-tokens",
            "2",
            "--cache-dir",
        ])
        .arg(&cache)
        .assert()
        .success();
    let model = cache.join("models/tiny-random-7");
    std::fs::copy(
        fixture().join("tokenizer.json"),
        model.join("tokenizer.json"),
    )
    .unwrap();
    model
}

#[test]
fn chat_answers_each_line_and_keeps_going_after_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let bank = encoded_bank(dir.path());
    let queries = strings("queries.json");
    // The middle line has words outside the toy vocabulary: an error, then the next question.
    let input = format!(
        "{}\nwords the toy tokenizer lacks\n/routing\n{}\n/quit\nnever asked\n",
        queries[0], queries[1]
    );
    let out = msa()
        .args(["chat", "--backend", "cpu", "--max-tokens", "4", "--model"])
        .arg(fixture())
        .arg("--bank")
        .arg(&bank)
        .write_stdin(input)
        .assert()
        .success();
    let stdout = String::from_utf8(out.get_output().stdout.clone()).unwrap();
    let stderr = String::from_utf8(out.get_output().stderr.clone()).unwrap();
    assert_eq!(
        stderr.lines().filter(|l| l.starts_with("error:")).count(),
        1,
        "{stderr}"
    );
    // Routing is shown only for the second question, after /routing turned it on.
    assert_eq!(stdout.matches("layer  2:").count(), 1, "{stdout}");
    assert_eq!(
        stdout
            .lines()
            .filter(|l| !l.starts_with(' ') && !l.starts_with("layer"))
            .count(),
        2,
        "{stdout}"
    );
}

/// `msa bench` with `args`, 2 questions and 4 decoded tokens each, its cache under `dir`, with `env`
/// set: the JSON report and what it printed.
fn two_question_bench(dir: &Path, args: &[&str], env: Option<(&str, &str)>) -> (Value, String) {
    let json = dir.join("report.json");
    let mut command = msa();
    command
        .arg("bench")
        .args(args)
        .args(["--queries", "2", "--decode-tokens", "4", "--cache-dir"])
        .arg(dir.join("cache"))
        .arg("--json")
        .arg(&json);
    if let Some((name, value)) = env {
        command.env(name, value);
    }
    let out = command.assert().success();
    let stdout = String::from_utf8(out.get_output().stdout.clone()).unwrap();
    let report = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    (report, stdout)
}

#[test]
fn bench_reports_every_stage_as_a_table_and_json() {
    let dir = tempfile::tempdir().unwrap();
    let (report, stdout) = two_question_bench(
        dir.path(),
        &[
            "--backend",
            "cpu",
            "--memory-tokens",
            "20K",
            "--document-tokens",
            "400",
            "--devices",
            "2",
        ],
        None,
    );
    for line in ["stage 1", "routing", "decode", "cpu reference"] {
        assert!(stdout.contains(line), "{stdout}");
    }
    assert_eq!(report["memory"]["tokens"], 20_000);
    assert_eq!(report["memory"]["documents"], 50);
    assert_eq!(report["devices"], 2);
    // The tiny shape: 2 router layers × 2 KV heads × 16 dims in bf16 per 16-token chunk (400-token
    // documents fill 25 chunks exactly).
    assert_eq!(report["memory"]["device_bytes_per_token"], 8.0);
    assert_eq!(report["memory"]["host_bytes_per_token"], 16.0);
    assert_eq!(report["decode"]["tokens"], 6); // the first token of each comes from the prefill
    assert!(
        report["routing"]["timed"]
            .as_str()
            .unwrap()
            .starts_with("alone"),
        "{report:#}"
    );
    for field in [
        &report["stage1"]["tokens_per_second"],
        &report["routing"]["gb_per_second"],
        &report["prefill"]["ms_per_query"],
        &report["decode"]["tokens_per_second"],
    ] {
        assert!(field.as_f64().unwrap() > 0.0, "{report:#}");
    }
    // 100 billion tokens cannot fit: the bench says what it would need and writes nothing.
    msa()
        .args([
            "bench",
            "--backend",
            "cpu",
            "--memory-tokens",
            "100G",
            "--cache-dir",
        ])
        .arg(dir.path().join("big"))
        .assert()
        .failure()
        .stderr(contains("does not fit this machine"))
        .stderr(contains("GB of disk"));
    assert!(!dir.path().join("big/banks").exists());
}

#[test]
fn bench_probes_the_adapter_and_compares_kernels_with_the_cpu_reference() {
    if !wgpu_expected() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("probe.json");
    msa()
        .args(["bench", "--probe", "--json"])
        .arg(&json)
        .assert()
        .success()
        .stdout(contains("read kernel"))
        .stdout(contains("GFLOP/s"));
    let report: Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert!(report["adapter"].as_str().unwrap().starts_with("wgpu"));
    for probe in ["copy_bytes_per_s", "read_bytes_per_s", "f32_flops_per_s"] {
        assert!(
            report["roofline"][probe].as_f64().unwrap() > 0.0,
            "{report:#}"
        );
    }
    // The f16 rate where the adapter has shader-f16 (lavapipe does), null where it has not.
    let f16 = &report["roofline"]["f16_flops_per_s"];
    assert!(f16.is_null() || f16.as_f64().unwrap() > 0.0, "{report:#}");

    // Every kernel at the tiny shape over a small memory (31 whole documents): wgpu and the CPU
    // reference agree.
    let json = dir.path().join("kernels.json");
    msa()
        .args([
            "bench",
            "--kernels",
            "--memory-tokens",
            "8K",
            "--document-tokens",
            "256",
            "--json",
        ])
        .arg(&json)
        .assert()
        .success()
        .stdout(contains("of roof"))
        .stdout(contains(
            "routing scan, 7936 tokens, 1-token query, 1 layer",
        ));
    let report: Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let kernels = report["kernels"].as_array().unwrap();
    assert_eq!(kernels.len(), 9, "{report:#}");
    for kernel in kernels {
        let diff = kernel["max_abs_diff"].as_f64().unwrap();
        assert!(
            diff < 1e-3,
            "{}: wgpu and CPU differ by {diff}",
            kernel["kernel"]
        );
        assert!(kernel["fraction_of_roofline"].as_f64().unwrap() > 0.0);
    }
    // Without CUDA (CI's machines) the report says so, rather than leaving figures out silently.
    if msa_cuda::device_count().unwrap_or(0) == 0 {
        assert!(report["cuda"].is_null(), "{report:#}");
        assert!(kernels[0]["cuda_seconds"].is_null(), "{report:#}");
        msa()
            .args(["bench", "--probe", "--backend", "cuda"])
            .assert()
            .failure()
            .stderr(contains("opening a CUDA device").or(contains("reports no device")));
    } else {
        // On an NVIDIA machine `auto` adds the CUDA column: every kernel ran there too.
        assert!(report["cuda"]["device_copy_bytes_per_s"].as_f64().unwrap() > 0.0);
        for kernel in kernels {
            assert!(kernel["cuda_seconds"].as_f64().unwrap() > 0.0, "{kernel:#}");
            assert!(
                kernel["cuda_max_abs_diff"].as_f64().unwrap().is_finite(),
                "{kernel:#}"
            );
        }
    }
    // A CPU run has nothing to probe.
    msa()
        .args(["bench", "--probe", "--backend", "cpu"])
        .assert()
        .failure()
        .stderr(contains("measure one GPU"));
}

/// A running `msa serve`, killed on drop.
struct Server {
    child: Child,
    address: String,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `msa serve` on the CPU on a free loopback port; the model directory follows.
const SERVE: [&str; 6] = [
    "serve",
    "--backend",
    "cpu",
    "--listen",
    "127.0.0.1:0",
    "--model",
];

fn start_server(bank: &Path, extra: &[&str]) -> Server {
    start_server_with(&fixture(), bank, extra)
}

/// Starts `command` with its stdout piped and returns it with the first line it printed.
fn spawn_and_read_a_line(command: &mut std::process::Command) -> (Child, String) {
    let mut child = command.stdout(Stdio::piped()).spawn().unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    (child, line)
}

fn start_server_with(model: &Path, bank: &Path, extra: &[&str]) -> Server {
    let mut command = std::process::Command::new(assert_cmd::cargo::cargo_bin("msa"));
    command
        .args(SERVE)
        .arg(model)
        .arg("--bank")
        .arg(bank)
        .args(extra);
    let (child, line) = spawn_and_read_a_line(&mut command);
    let address = line
        .trim()
        .strip_prefix("listening on http://")
        .unwrap_or_else(|| panic!("unexpected first line: {line:?}"))
        .to_string();
    Server { child, address }
}

/// `msa shard` on the CPU on a free loopback port, serving rank `rank` of `of` of `bank`.
fn start_shard(bank: &Path, rank: usize, of: usize) -> Server {
    let place = ["--rank", &rank.to_string(), "--of", &of.to_string()];
    start_shard_of(&[OsStr::new("--bank"), bank.as_os_str()], &place, rank, of)
}

/// `msa shard` on the CPU serving from `source` (`--bank B --rank R --of N`, or `--keys FILE` of rank R
/// of N).
fn start_shard_of(source: &[&OsStr], place: &[&str], rank: usize, of: usize) -> Server {
    start_shard_with(&["--backend", "cpu"], |_| {}, source, place, rank, of)
}

/// `msa shard` with `backend` options on a free loopback port, its command `configure`d (environment,
/// stderr).
fn start_shard_with(
    backend: &[&str],
    configure: impl FnOnce(&mut std::process::Command),
    source: &[&OsStr],
    place: &[&str],
    rank: usize,
    of: usize,
) -> Server {
    let mut command = std::process::Command::new(assert_cmd::cargo::cargo_bin("msa"));
    command
        .args(["shard", "--listen", "127.0.0.1:0"])
        .args(backend)
        .args(source)
        .args(place);
    configure(&mut command);
    let (child, line) = spawn_and_read_a_line(&mut command);
    let (head, address) = line
        .trim()
        .rsplit_once("; listening on ")
        .unwrap_or_else(|| panic!("unexpected first line: {line:?}"));
    assert!(
        head.starts_with(&format!("shard {rank} of {of}: documents ")),
        "{line}"
    );
    Server {
        child,
        address: address.to_string(),
    }
}

#[test]
fn a_shard_exported_to_a_file_is_served_without_the_bank() {
    let dir = tempfile::tempdir().unwrap();
    let bank = encoded_bank(dir.path());
    let question = &strings("queries.json")[0];
    let local = ask_json(&bank, question, &["--backend", "cpu", "--devices", "2"]);
    let keys = dir.path().join("rank1.keys");
    let export = |rank: &str| {
        msa()
            .args(["shard", "--rank", rank, "--of", "2", "--bank"])
            .arg(&bank)
            .arg("--export")
            .arg(&keys)
            .assert()
    };
    export("0")
        .failure()
        .stderr(contains("rank 0 is scored by the asking process itself"));
    assert!(!keys.exists());
    export("1")
        .success()
        .stdout(contains("shard 1 of 2: documents ").and(contains("msa shard --keys")));
    // The file alone, moved away from the bank: the same answer as two local shards.
    let moved = tempfile::tempdir().unwrap();
    let file = moved.path().join("rank1.keys");
    std::fs::rename(&keys, &file).unwrap();
    let server = start_shard_of(&[OsStr::new("--keys"), file.as_os_str()], &[], 1, 2);
    let remote = ask_json(
        &bank,
        question,
        &["--backend", "cpu", "--shards", &server.address],
    );
    assert_eq!(token_ids(&remote), token_ids(&local));
    let documents = |answer: &Value| -> Vec<Value> {
        let layers = answer["routing"].as_array().unwrap();
        layers.iter().map(|l| l["documents"].clone()).collect()
    };
    assert_eq!(documents(&remote), documents(&local));
    // A damaged file is refused before anything is served.
    let mut bytes = std::fs::read(&file).unwrap();
    *bytes.last_mut().unwrap() ^= 1;
    std::fs::write(&file, bytes).unwrap();
    msa()
        .args(["shard", "--backend", "cpu", "--keys"])
        .arg(&file)
        .assert()
        .failure()
        .stderr(contains("checksum mismatch"));
}

#[test]
fn ask_routes_through_shard_servers_like_local_devices() {
    let dir = tempfile::tempdir().unwrap();
    let bank = encoded_bank(dir.path());
    let question = &strings("queries.json")[0];
    let local = ask_json(&bank, question, &["--backend", "cpu", "--devices", "3"]);
    let servers = [start_shard(&bank, 1, 3), start_shard(&bank, 2, 3)];
    let list = |order: [usize; 2]| {
        format!(
            "{},{}",
            servers[order[0]].address, servers[order[1]].address
        )
    };
    let remote = ask_json(
        &bank,
        question,
        &["--backend", "cpu", "--shards", &list([0, 1])],
    );
    assert_eq!(token_ids(&remote), token_ids(&local));
    let routing = |answer: &Value| -> Vec<(Value, Value, Value)> {
        answer["routing"]
            .as_array()
            .unwrap()
            .iter()
            .map(|l| {
                (
                    l["documents"].clone(),
                    l["chunks"].clone(),
                    l["scanned_bytes"].clone(),
                )
            })
            .collect()
    };
    assert_eq!(routing(&remote), routing(&local));
    // Listed out of rank order, or against a run of another size, the servers are refused by name.
    let refused = |extra: &[&str]| {
        let output = msa()
            .args(["ask", "--backend", "cpu", "--model"])
            .arg(fixture())
            .arg("--bank")
            .arg(&bank)
            .args(extra)
            .arg(question)
            .output()
            .unwrap();
        assert!(!output.status.success());
        String::from_utf8(output.stderr).unwrap()
    };
    let error = refused(&["--shards", &list([1, 0])]);
    assert!(
        error.contains("serves shard 2 of 3, but this run needs shard 1 of 3"),
        "{error}"
    );
    let error = refused(&["--devices", "2", "--shards", &list([0, 1])]);
    assert!(error.contains("needs shard 2 of 4"), "{error}");
    // `msa bench` on the same bank counts them apart from the local shard.
    let json = dir.path().join("bench.json");
    msa()
        .args([
            "bench",
            "--backend",
            "cpu",
            "--queries",
            "1",
            "--decode-tokens",
            "2",
        ])
        .args(["--encode-tokens", "16", "--model"])
        .arg(fixture())
        .arg("--bank")
        .arg(&bank)
        .args(["--shards", &list([0, 1]), "--json"])
        .arg(&json)
        .assert()
        .success()
        .stdout(contains("(3 shard(s): 1 here, 2 on shard servers)"));
    let report: Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!(
        (&report["devices"], &report["remote_shards"]),
        (&3.into(), &2.into())
    );
    // `msa serve` answers through them too, and refuses appends the servers could not follow.
    let server = start_server(&bank, &["--shards", &list([0, 1])]);
    let chat = serde_json::json!({
        "messages": [{"role": "user", "content": question}],
        "max_tokens": 6,
    });
    let (status, body) = http(&server, "POST", "/v1/chat/completions", &chat.to_string());
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        json_of(body.as_bytes())["choices"][0]["message"]["content"],
        local["answer"]
    );
    let add = serde_json::json!({"documents": [{"id": "new", "text": "丳仞丐亦"}]});
    let (status, body) = http(&server, "POST", "/v1/memory/documents", &add.to_string());
    assert_eq!(status, 409, "{body}");
    assert!(body.contains("routes through shard servers"), "{body}");
    assert_eq!(documents_in(&bank), 8);
    let output = msa()
        .args([
            "shard",
            "--backend",
            "cpu",
            "--rank",
            "0",
            "--of",
            "2",
            "--bank",
        ])
        .arg(&bank)
        .output()
        .unwrap();
    assert!(!output.status.success());
    let error = String::from_utf8(output.stderr).unwrap();
    assert!(
        error.contains("rank 0 is scored by the asking process"),
        "{error}"
    );
}

/// One HTTP/1.1 request; returns the status and the (de-chunked) body.
fn http(server: &Server, method: &str, path: &str, body: &str) -> (u16, String) {
    let mut stream = TcpStream::connect(&server.address).unwrap();
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).unwrap();
    let mut response = Vec::new();
    stream.read_to_end(&mut response).unwrap();
    let response = String::from_utf8(response).unwrap();
    let (head, body) = response.split_once("\r\n\r\n").unwrap();
    let status = head.split_whitespace().nth(1).unwrap().parse().unwrap();
    let body = if head.to_lowercase().contains("transfer-encoding: chunked") {
        dechunk(body)
    } else {
        body.to_string()
    };
    (status, body)
}

fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = body.split_once("\r\n") {
        let size = usize::from_str_radix(size.trim(), 16).unwrap();
        if size == 0 {
            break;
        }
        out.push_str(&rest[..size]);
        body = &rest[size + 2..];
    }
    out
}

#[test]
fn serve_answers_openai_requests_appends_documents_and_bounds_requests() {
    let dir = tempfile::tempdir().unwrap();
    let bank = dir.path().join("served");
    let server = start_server(&bank, &["--max-request-bytes", "4096", "--max-tokens", "3"]);
    // The bank was created empty: asking is a conflict until documents arrive.
    let question = &strings("queries.json")[0];
    let chat = |stream: bool| {
        serde_json::json!({
            "model": "msa-tiny",
            "messages": [{"role": "system", "content": "ignored"}, {"role": "user", "content": question}],
            "max_tokens": 6,
            "stream": stream,
        })
        .to_string()
    };
    for stream in [false, true] {
        let (status, body) = http(&server, "POST", "/v1/chat/completions", &chat(stream));
        assert_eq!(status, 409, "{body}");
        assert!(body.contains("holds no documents"), "{body}");
    }
    let documents: Vec<Value> = strings("memory.json")
        .iter()
        .enumerate()
        .map(|(i, text)| serde_json::json!({"id": format!("doc-{i}"), "text": text}))
        .collect();
    let (status, body) = http(
        &server,
        "POST",
        "/v1/memory/documents",
        &serde_json::json!({"documents": documents[..4]}).to_string(),
    );
    assert_eq!(status, 200, "{body}");
    assert_eq!(json_of(body.as_bytes())["added"], 4);
    let (status, body) = http(
        &server,
        "POST",
        "/v1/memory/documents",
        &serde_json::json!({"documents": documents}).to_string(),
    );
    assert_eq!(status, 200, "{body}");
    let added = json_of(body.as_bytes());
    assert_eq!(
        (
            added["added"].clone(),
            added["already_present"].clone(),
            added["documents"].clone()
        ),
        (4.into(), 4.into(), 8.into())
    );
    let (status, body) = http(&server, "GET", "/v1/memory", "");
    assert_eq!(status, 200);
    assert_eq!(json_of(body.as_bytes())["tokens"], 1049);

    // A full answer, then the same streamed: the deltas add up to the same text.
    let (status, body) = http(&server, "POST", "/v1/chat/completions", &chat(false));
    assert_eq!(status, 200, "{body}");
    let completion = json_of(body.as_bytes());
    let text = completion["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(completion["usage"]["completion_tokens"], 6);
    assert_eq!(completion["msa"]["routing"].as_array().unwrap().len(), 2);
    let reference = ask_json(&encoded_bank(dir.path()), question, &["--backend", "cpu"]);
    assert_eq!(text, reference["answer"].as_str().unwrap());
    // Content as a list of parts, and the server's --max-tokens when the request names none.
    let parts = serde_json::json!({
        "messages": [{"role": "user", "content": [{"type": "text", "text": question}]}],
    });
    let (status, body) = http(&server, "POST", "/v1/chat/completions", &parts.to_string());
    assert_eq!(status, 200, "{body}");
    let short = json_of(body.as_bytes());
    assert_eq!(short["usage"]["completion_tokens"], 3);
    assert!(text.starts_with(short["choices"][0]["message"]["content"].as_str().unwrap()));
    let (status, body) = http(&server, "POST", "/v1/chat/completions", &chat(true));
    assert_eq!(status, 200, "{body}");
    assert!(body.trim_end().ends_with("data: [DONE]"), "{body}");
    let streamed: String = body
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .filter(|d| *d != "[DONE]")
        .map(|d| {
            json_of(d.as_bytes())["choices"][0]["delta"]["content"]
                .as_str()
                .unwrap_or("")
                .to_string()
        })
        .collect();
    assert_eq!(streamed, text);

    // Bad requests: too large, not JSON, no user message, too many tokens, an empty document.
    let big = format!(
        "{{\"messages\": [{{\"role\": \"user\", \"content\": \"{}\"}}]}}",
        "x".repeat(8000)
    );
    assert_eq!(http(&server, "POST", "/v1/chat/completions", &big).0, 413);
    assert_eq!(
        http(&server, "POST", "/v1/chat/completions", "{not json").0,
        400
    );
    let (status, body) = http(
        &server,
        "POST",
        "/v1/chat/completions",
        r#"{"messages": [{"role": "system", "content": "x"}]}"#,
    );
    assert_eq!(status, 400);
    assert!(body.contains("no user message"), "{body}");
    let (status, body) = http(
        &server,
        "POST",
        "/v1/chat/completions",
        r#"{"messages": [{"role": "user", "content": "x"}], "max_tokens": 100000}"#,
    );
    assert_eq!(status, 400);
    assert!(body.contains("limit"), "{body}");
    let (status, body) = http(
        &server,
        "POST",
        "/v1/memory/documents",
        r#"{"documents": [{"id": "e", "text": " "}]}"#,
    );
    assert_eq!(status, 400);
    assert!(body.contains("empty text"), "{body}");
}

#[test]
fn serve_refuses_a_bank_of_another_model_before_listening() {
    let dir = tempfile::tempdir().unwrap();
    let bank = encoded_bank(dir.path());
    let other = random_tiny_model(dir.path());
    msa()
        .args(SERVE)
        .arg(&other)
        .arg("--bank")
        .arg(&bank)
        .assert()
        .failure()
        .stdout(predicate::str::is_empty())
        .stderr(contains("different model"));
}

/// The tiny model with a tokenizer that spells Memory Interleave's markers, and a bank of the fixture
/// corpus encoded by it.
fn interleave_bank(dir: &Path) -> (PathBuf, PathBuf) {
    let model = interleave_model::write_interleave_model(&fixture(), dir);
    let bank = dir.join("bank");
    encode(&model, &bank)
        .arg(write_corpus(dir))
        .assert()
        .success();
    (model, bank)
}

/// `msa ask` or `msa chat` with Memory Interleave on the CPU, answers up to 16 tokens.
fn interleave_command(subcommand: &str, model: &Path, bank: &Path) -> Command {
    let mut command = msa();
    command
        .args([
            subcommand,
            "--backend",
            "cpu",
            "--interleave",
            "--max-tokens",
            "16",
        ])
        .arg("--model")
        .arg(model)
        .arg("--bank")
        .arg(bank);
    command
}

/// Two retrieval rounds (a repeated id, an unknown one), the end of retrieval and an answer.
const FORCED_CHAIN: &str = "[3][1][3]<|object_ref_end|>[7][42]<|object_ref_end|><End-of-Retrieve>\
                            The answer to the question is: 丽丽<|im_end|>";

/// `msa ask --interleave` on a bank, driven by forced tokens: the retrieval chain reads the documents'
/// text from the bank, equals the engine API's run, and prints round by round.
#[test]
fn ask_interleave_reads_named_documents_from_the_bank_round_by_round() {
    let dir = tempfile::tempdir().unwrap();
    let (model, bank) = interleave_bank(dir.path());
    let question = &strings("queries.json")[0];
    let forced = FORCED_CHAIN;
    let ask = |extra: &[&str]| {
        let mut command = interleave_command("ask", &model, &bank);
        command.args(extra).arg(question);
        command
    };

    let output = ask(&["--json", "--force-output", forced]).output().unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let report = json_of(&output.stdout);
    assert_eq!(report["answer"], "丽丽");
    assert_eq!(report["finish_reason"], "answered");
    let rounds = report["rounds"].as_array().unwrap();
    assert_eq!(rounds.len(), 3);
    assert_eq!(rounds[0]["named"], serde_json::json!([1, 3]));
    assert_eq!(rounds[0]["injected"], serde_json::json!([1, 3]));
    assert_eq!(rounds[1]["named"], serde_json::json!([7, 42]));
    assert_eq!(rounds[1]["injected"], serde_json::json!([7]));
    assert_eq!(rounds[2]["text"], "<End-of-Retrieve>");
    assert_eq!(report["retrieval_end"]["reason"], "marker");
    // The injections carry the documents' text as stored in the bank.
    let texts = strings("memory.json");
    let transcript = report["transcript"].as_str().unwrap();
    for id in [1, 3, 7] {
        assert!(
            transcript.contains(&format!("[{id}]. {}\n", texts[id])),
            "document {id}"
        );
    }
    assert!(!transcript.contains("[42]. "));

    // The same run through the engine API.
    let engine = Model::load(&model, CpuBackend::new()).unwrap();
    let memory = engine
        .open_memory(
            Bank::open(&bank, OpenOptions::default()).unwrap(),
            Vec::new(),
        )
        .unwrap();
    let options = msa_engine::InterleaveOptions {
        max_answer_tokens: 16,
        forced_tokens: engine.tokenizer.as_ref().unwrap().encode(forced).unwrap(),
        ..Default::default()
    };
    let mut routed = Vec::new();
    let outcome = pollster::block_on(engine.interleave(&memory, question, &options, |e| {
        if let msa_engine::InterleaveEvent::Routed { routing, .. } = e {
            routed.push(
                routing
                    .documents
                    .iter()
                    .map(|d| d.id as u64)
                    .collect::<Vec<_>>(),
            );
        }
    }))
    .unwrap();
    assert_eq!(outcome.transcript, transcript);
    let cli_routed: Vec<Vec<u64>> = rounds.iter().flat_map(routed_ids).collect();
    assert_eq!(cli_routed, routed);
    assert_eq!(routed.len(), 6);

    // As text: the chain, round by round, then the answer.
    ask(&["--force-output", forced])
        .assert()
        .success()
        .stdout(contains("round 1: 42 prompt tokens, 39 of them routing"))
        .stdout(contains(
            "  wrote: [3][1][3]<|object_ref_end|>\n  read [1] [3] (",
        ))
        .stdout(contains(
            "read [7] (57 tokens); no text in the memory for [42]",
        ))
        .stdout(contains(
            "retrieval ended: the model wrote <End-of-Retrieve>",
        ))
        .stdout(contains("answer: 丽丽"));
    // The round limit, the reference's attention for the question, and flags that need --interleave.
    let output = ask(&[
        "--json",
        "--max-rounds",
        "1",
        "--force-output",
        "[2]<|object_ref_end|>",
    ])
    .output()
    .unwrap();
    let report = json_of(&output.stdout);
    assert_eq!(report["finish_reason"], "round_limit");
    assert_eq!(report["answer"], Value::Null);
    // Retrieval forced, the answer sampled: the question's attention changes what follows it.
    let answer_text = |attention: &str| {
        let output = ask(&[
            "--json",
            "--question-attention",
            attention,
            "--temperature",
            "1",
            "--seed",
            "7",
            "--force-output",
            "<End-of-Retrieve>",
        ])
        .output()
        .unwrap();
        let report = json_of(&output.stdout);
        assert_eq!(report["tokens"].as_array().unwrap().len(), 7 + 16);
        report["answer_text"].as_str().unwrap().to_string()
    };
    assert_ne!(answer_text("causal"), answer_text("bidirectional"));
    msa()
        .args([
            "ask",
            "--model",
            "m",
            "--bank",
            "b",
            "--max-rounds",
            "2",
            "q",
        ])
        .assert()
        .code(2)
        .stderr(contains("--interleave"));
    // `msa chat --interleave` runs every question this way.
    interleave_command("chat", &model, &bank)
        .args(["--force-output", forced])
        .write_stdin(format!("{question}\n"))
        .assert()
        .success()
        .stdout(contains("read [7] (57 tokens)"))
        .stdout(contains("answer: 丽丽"));
}

/// `"interleave": true` runs Memory Interleave behind the OpenAI endpoint: the answer is the content,
/// the retrieval chain comes in the `msa` extension, streamed or not.
#[test]
fn serve_runs_memory_interleave_on_request() {
    let dir = tempfile::tempdir().unwrap();
    let (model, bank) = interleave_bank(dir.path());
    let server = start_server_with(&model, &bank, &[]);
    let question = &strings("queries.json")[0];
    let forced = FORCED_CHAIN;
    let chat = |stream: bool| {
        serde_json::json!({
            "messages": [{"role": "user", "content": question}],
            "max_tokens": 16,
            "stream": stream,
            "interleave": true,
            "force_output": forced,
        })
        .to_string()
    };
    let (status, body) = http(&server, "POST", "/v1/chat/completions", &chat(false));
    assert_eq!(status, 200, "{body}");
    let response: Value = serde_json::from_str(&body).unwrap();
    let content = "The answer to the question is: 丽丽";
    assert_eq!(response["choices"][0]["message"]["content"], content);
    assert_eq!(response["choices"][0]["finish_reason"], "stop");
    let interleave = &response["msa"]["interleave"];
    assert_eq!(interleave["answer"], "丽丽");
    assert_eq!(interleave["finish"], "answered");
    assert_eq!(interleave["rounds"], 3);
    let steps = interleave["retrieval"].as_array().unwrap();
    let find = |key: &str| -> Vec<(u64, Value)> {
        steps
            .iter()
            .filter(|s| !s[key].is_null())
            .map(|s| (s["round"].as_u64().unwrap(), s[key].clone()))
            .collect()
    };
    assert_eq!(
        find("named"),
        [
            (1, serde_json::json!([1, 3])),
            (2, serde_json::json!([7, 42]))
        ]
    );
    assert_eq!(
        find("read"),
        [(1, serde_json::json!([1, 3])), (2, serde_json::json!([7]))]
    );
    assert_eq!(find("routing").len(), 3);
    let round_text = |round: u64| -> String {
        find("text")
            .iter()
            .filter(|(r, _)| *r == round)
            .map(|(_, t)| t.as_str().unwrap().to_string())
            .collect()
    };
    assert_eq!(round_text(1), "[3][1][3]<|object_ref_end|>");
    assert_eq!(round_text(3), "<End-of-Retrieve>");

    // Streamed: the same content in deltas, retrieval steps as msa chunks, then [DONE].
    let (status, body) = http(&server, "POST", "/v1/chat/completions", &chat(true));
    assert_eq!(status, 200, "{body}");
    let data: Vec<&str> = body
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .collect();
    assert_eq!(data.last(), Some(&"[DONE]"));
    let chunks: Vec<Value> = data[..data.len() - 1]
        .iter()
        .map(|d| serde_json::from_str(d).unwrap())
        .collect();
    let streamed: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(streamed, content);
    assert!(
        chunks
            .iter()
            .any(|c| c["msa"]["retrieval"]["named"] == serde_json::json!([1, 3]))
    );
    assert_eq!(
        chunks.last().unwrap()["msa"]["interleave"]["answer"],
        "丽丽"
    );

    // Interleave options without `interleave`, and no rounds at all, are refused.
    let bad = serde_json::json!({
        "messages": [{"role": "user", "content": question}], "force_output": "[1]",
    });
    assert_eq!(
        http(&server, "POST", "/v1/chat/completions", &bad.to_string()).0,
        400
    );
    let bad = serde_json::json!({
        "messages": [{"role": "user", "content": question}], "interleave": true, "max_rounds": 0,
    });
    assert_eq!(
        http(&server, "POST", "/v1/chat/completions", &bad.to_string()).0,
        400
    );
}
