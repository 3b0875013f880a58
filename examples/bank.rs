//! Build a memory bank on disk from a model directory's documents, then answer its questions from the
//! bank: the selected documents per router layer, the bytes each tier moved, and the same answer again
//! with the routing keys sharded over two devices, then over this process and a shard server reached
//! through loopback TCP (Memory Parallel).
//!
//! ```text
//! cargo run --release --example bank -- [MODEL_DIR] [--bank DIR] [--backend cpu|wgpu]
//! ```
//!
//! `MODEL_DIR` defaults to the bundled tiny model `tests/fixtures/msa-tiny` (documents from its
//! `memory.json`, questions from `queries.json`); `--bank` defaults to `target/example-bank`. Run it twice:
//! the second run finds every document already in the bank and encodes nothing.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use msa::{Backend, Bank, BankEncodeOptions, GenerateOptions, Msa, OpenOptions, SourceDocument};

fn strings(path: &Path) -> Result<Vec<String>, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    serde_json::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))
}

fn run<B: Backend + Clone + 'static>(
    msa: Msa<B>,
    second_device: B,
    model: &Path,
    bank_dir: &Path,
) -> Result<(), String> {
    let err = |e: msa::Error| e.to_string();
    let corpus: Vec<SourceDocument> = strings(&model.join("memory.json"))?
        .into_iter()
        .enumerate()
        .map(|(i, text)| SourceDocument {
            source: format!("memory.json#{i}"),
            text,
        })
        .collect();
    let mut bank = if bank_dir.join("bank.json").exists() {
        Bank::open(bank_dir, OpenOptions::default()).map_err(|e| e.to_string())?
    } else {
        msa.create_bank(bank_dir).map_err(err)?
    };
    let report = msa
        .encode_into_bank(&mut bank, &corpus, BankEncodeOptions::default(), |p| {
            eprintln!(
                "  encoded {}/{} documents, {} tokens, {:.0} tokens/s",
                p.documents_done,
                p.documents_total,
                p.tokens_done,
                p.tokens_per_second()
            )
        })
        .map_err(err)?;
    println!(
        "bank {}: {} documents ({} encoded now, {} already there), {} tokens, {} chunks",
        bank_dir.display(),
        bank.documents().len(),
        report.encoded,
        report.skipped,
        bank.token_count(),
        bank.chunk_count()
    );
    drop(bank);

    let memory = msa.open_bank(bank_dir).map_err(err)?;
    println!(
        "opened on {}: {} bytes of routing keys on the device, {} bytes of content in host pages",
        msa.model().backend.describe(),
        memory.device_bytes(),
        memory.host_bytes()
    );
    let sharded = msa
        .open_bank_on(bank_dir, vec![msa.model().backend.clone(), second_device])
        .map_err(err)?;
    // A shard server, as `msa shard` runs it on another machine: here on a thread, over loopback TCP,
    // scoring the second half of the documents (rank 1 of 2) on the CPU reference.
    let shard = msa::shard::ShardServer::open(
        msa::CpuBackend::new(),
        &Bank::open(bank_dir, OpenOptions::default()).map_err(|e| e.to_string())?,
        1,
        2,
        |_| {},
    )
    .map_err(err)?;
    let listener = std::net::TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
    let address = listener
        .local_addr()
        .map_err(|e| e.to_string())?
        .to_string();
    std::thread::spawn(move || shard.serve(listener));
    let client = msa::shard::ShardClient::connect(&address, Default::default()).map_err(err)?;
    let remote = msa
        .open_bank_with(bank_dir, Vec::new(), vec![Box::new(client)])
        .map_err(err)?;
    let options = GenerateOptions {
        max_tokens: 8,
        ..GenerateOptions::default()
    };
    for (i, question) in strings(&model.join("queries.json"))?.iter().enumerate() {
        let answer = msa.ask(&memory, question, &options).map_err(err)?;
        println!("\nquery {i}: {}", answer.text);
        let (session, _) =
            pollster::block_on(msa.model().prefill_question(&memory, question)).map_err(err)?;
        for (routing, stats) in answer.routing.iter().zip(session.route_stats()) {
            let picked: Vec<String> = routing
                .documents
                .iter()
                .map(|d| format!("[{}] {:.4}", d.id, d.score))
                .collect();
            println!(
                "  layer {:>2} routed to {} ({} chunks; scanned {} B, fetched {} B in {:.2} ms)",
                routing.layer,
                picked.join(", "),
                routing.chunks,
                stats.scanned_bytes,
                stats.fetched_bytes,
                stats.fetch_time.as_secs_f64() * 1e3
            );
        }
        for (how, memory) in [("two devices", &sharded), ("a shard server", &remote)] {
            let parallel = msa.ask(memory, question, &options).map_err(err)?;
            println!(
                "  {how}: {}",
                if parallel == answer {
                    "the same selections, scores and tokens"
                } else {
                    "DIFFERENT (a bug: please report it)"
                }
            );
        }
    }
    Ok(())
}

fn main() -> ExitCode {
    let mut model = PathBuf::from("tests/fixtures/msa-tiny");
    let mut bank = PathBuf::from("target/example-bank");
    let mut wgpu = false;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--bank" => bank = args.next().unwrap_or_default().into(),
            "--backend" => wgpu = args.next().as_deref() == Some("wgpu"),
            "-h" | "--help" => {
                eprintln!("usage: bank [MODEL_DIR] [--bank DIR] [--backend cpu|wgpu]");
                return ExitCode::SUCCESS;
            }
            other => model = other.into(),
        }
    }
    let result = if wgpu {
        let open = || {
            pollster::block_on(msa::wgpu::WgpuBackend::new(
                msa::wgpu::DeviceOptions::from_env(),
            ))
            .map_err(|e| e.to_string())
        };
        open().and_then(|gpu| {
            let msa = Msa::load_on(&model, gpu).map_err(|e| e.to_string())?;
            run(msa, open()?, &model, &bank)
        })
    } else {
        Msa::load(&model)
            .map_err(|e| e.to_string())
            .and_then(|msa| run(msa, msa::CpuBackend::new(), &model, &bank))
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
