//! Encode a model directory's documents into memory and answer its questions, printing the documents
//! each router layer selected and the generated tokens.
//!
//! ```text
//! cargo run --release --example ask -- [MODEL_DIR] [--memory FILE.json] [--queries FILE.json] [--max-tokens N]
//!                                        [--backend cpu|wgpu] [--json FILE]
//! ```
//!
//! `--json FILE` also writes every answer (question, routed document ids per router layer, tokens) as
//! JSON: the browser test compares the page's answers with it.
//!
//! `--backend wgpu` runs every op as a WGSL compute shader on the best GPU adapter (`WGPU_ADAPTER_NAME`
//! and `WGPU_BACKEND` choose another); the default is the CPU reference.
//!
//! `MODEL_DIR` defaults to the bundled tiny model `tests/fixtures/msa-tiny`; `--memory` and `--queries`
//! default to `MODEL_DIR/memory.json` and `MODEL_DIR/queries.json` (JSON lists of strings).

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use msa::{Backend, GenerateOptions, Msa};

struct Args {
    model: PathBuf,
    memory: Option<PathBuf>,
    queries: Option<PathBuf>,
    max_tokens: usize,
    wgpu: bool,
    json: Option<PathBuf>,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        model: PathBuf::from("tests/fixtures/msa-tiny"),
        memory: None,
        queries: None,
        max_tokens: 8,
        wgpu: false,
        json: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut value = |flag: &str| it.next().ok_or(format!("{flag} needs a value"));
        match arg.as_str() {
            "--memory" => args.memory = Some(value("--memory")?.into()),
            "--json" => args.json = Some(value("--json")?.into()),
            "--queries" => args.queries = Some(value("--queries")?.into()),
            "--max-tokens" => {
                args.max_tokens = value("--max-tokens")?
                    .parse()
                    .map_err(|_| "--max-tokens needs a number".to_string())?
            }
            "--backend" => {
                args.wgpu = match value("--backend")?.as_str() {
                    "cpu" => false,
                    "wgpu" => true,
                    other => return Err(format!("--backend is cpu or wgpu, not {other}")),
                }
            }
            "-h" | "--help" => {
                return Err(
                    "usage: ask [MODEL_DIR] [--memory FILE.json] [--queries FILE.json] [--max-tokens N] [--backend cpu|wgpu] [--json FILE]"
                        .into(),
                );
            }
            flag if flag.starts_with('-') => return Err(format!("unknown option {flag}")),
            dir => args.model = dir.into(),
        }
    }
    Ok(args)
}

fn read_strings(path: &Path) -> Result<Vec<String>, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    serde_json::from_str(&text)
        .map_err(|e| format!("{}: expected a JSON list of strings: {e}", path.display()))
}

fn run(args: Args) -> Result<(), Box<dyn std::error::Error>> {
    let started = Instant::now();
    if args.wgpu {
        answer(Msa::load_wgpu(&args.model)?, args, started)
    } else {
        answer(Msa::load(&args.model)?, args, started)
    }
}

fn answer<B: Backend>(
    msa: Msa<B>,
    args: Args,
    started: Instant,
) -> Result<(), Box<dyn std::error::Error>> {
    let config = msa.config();
    let routing = config
        .msa
        .as_ref()
        .ok_or("this example needs an MSA model (config.json has no msa_config)")?;
    println!(
        "model {}: {} layers, router layers {:?}, {} heads / {} kv heads × {}, pooling {}, top-{} documents, {:?} routing; {} parameters; loaded in {:.2?}",
        args.model.display(),
        config.num_hidden_layers,
        routing.router_layers,
        config.num_attention_heads,
        config.num_key_value_heads,
        config.head_dim,
        routing.pooling_kernel_size,
        routing.doc_top_k,
        routing.score_mode,
        config.parameter_count(),
        started.elapsed()
    );

    let documents = read_strings(&args.memory.unwrap_or(args.model.join("memory.json")))?;
    let queries = read_strings(&args.queries.unwrap_or(args.model.join("queries.json")))?;

    let started = Instant::now();
    let memory = msa.encode_with_progress(&documents, |p| {
        eprint!(
            "\rencoding: {}/{} documents, {} tokens",
            p.documents_done, p.documents_total, p.tokens_done
        );
    })?;
    // A GPU backend returns before computing; wait for the memory to exist before reading the clock.
    pollster::block_on(msa.model().backend.synchronize())?;
    eprintln!();
    let tokens: usize = memory.documents().iter().map(|d| d.token_count).sum();
    let seconds = started.elapsed().as_secs_f64();
    println!(
        "memory: {} documents, {tokens} tokens, {} chunks, encoded in {seconds:.3} s ({:.0} tokens/s) on {}",
        memory.documents().len(),
        memory.chunk_count(),
        tokens as f64 / seconds,
        msa.model().backend.describe(),
    );

    let options = GenerateOptions {
        max_tokens: args.max_tokens,
        ..GenerateOptions::default()
    };
    let mut answers = Vec::new();
    for (q, question) in queries.iter().enumerate() {
        println!("\nquery {q}: {question}");
        let started = Instant::now();
        let answer = msa.ask(&memory, question, &options)?;
        for layer in &answer.routing {
            let picked: Vec<String> = layer
                .documents
                .iter()
                .map(|d| format!("[{}] {:.4}", d.id, d.score))
                .collect();
            println!(
                "  layer {:>2} routed to {} ({} chunks)",
                layer.layer,
                picked.join(", "),
                layer.chunks
            );
        }
        println!("  tokens: {:?}", answer.tokens);
        println!("  text:   {:?}", answer.text);
        println!(
            "  {} tokens in {:.2?} ({:?})",
            answer.tokens.len(),
            started.elapsed(),
            answer.finish_reason
        );
        answers.push(serde_json::json!({
            "question": question,
            "routing": answer.routing.iter().map(|layer| serde_json::json!({
                "layer": layer.layer,
                "documents": layer.documents.iter().map(|d| d.id).collect::<Vec<_>>(),
            })).collect::<Vec<_>>(),
            "tokens": answer.tokens,
        }));
    }
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_string_pretty(&answers)?)
            .map_err(|e| format!("{}: {e}", path.display()))?;
    }
    Ok(())
}

fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(args) => args,
        Err(message) => {
            eprintln!("{message}");
            return ExitCode::from(2);
        }
    };
    match run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
