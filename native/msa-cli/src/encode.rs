//! `msa encode`: a corpus into a bank, with a progress bar; appends and resumes.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use msa_core::bank::{Bank, OpenOptions};
use msa_engine::{BankEncodeOptions, SourceDocument};

use crate::backend::{self, BackendArgs, Device, Job};
use crate::corpus;

/// Encode a corpus into a bank (stage 1). A new bank is created; an existing one gets the documents it
/// does not hold yet, so re-running an interrupted encoding resumes it.
///
/// Corpus paths are JSONL files (one `{"id": …, "text": …}` per line; the id names the document; other
/// fields are ignored), JSON files (a list of such objects, or of strings named `FILE#INDEX`), text
/// files (the path names the document), or folders: their .jsonl, .json, .txt, .md and .text files,
/// recursively.
#[derive(Args)]
pub struct EncodeArgs {
    /// The model directory.
    #[arg(long, value_name = "DIR")]
    model: PathBuf,
    /// The bank directory (created when missing).
    #[arg(long, value_name = "BANK")]
    out: PathBuf,
    /// JSONL, JSON or text files, or folders of them.
    #[arg(value_name = "CORPUS", required = true)]
    corpus: Vec<PathBuf>,
    /// Tokens encoded between commits (at most this much work is lost to an interruption).
    #[arg(long, default_value_t = BankEncodeOptions::default().commit_tokens, value_name = "N")]
    commit_tokens: usize,
    /// Tokens per stage-1 forward (documents are packed together up to this length).
    #[arg(long, default_value_t = BankEncodeOptions::default().pack_tokens, value_name = "N")]
    pack_tokens: usize,
    #[command(flatten)]
    backend: BackendArgs,
}

pub fn encode(args: EncodeArgs) -> Result<()> {
    anyhow::ensure!(
        args.commit_tokens > 0 && args.pack_tokens > 0,
        "--commit-tokens and --pack-tokens must be positive"
    );
    let corpus = corpus::read(&args.corpus)?;
    if args.backend.devices > 1 {
        tracing::warn!("--devices shards routing keys when asking; encoding runs on one device");
    }
    backend::run(&args.backend.clone(), EncodeJob { args, corpus })
}

struct EncodeJob {
    args: EncodeArgs,
    corpus: Vec<SourceDocument>,
}

impl Job for EncodeJob {
    type Output = ();

    fn run<B: Device>(self, device: B, _shards: Vec<B>) -> Result<()> {
        let EncodeJob { args, corpus } = self;
        let model = backend::load_model(&args.model, device)?;
        let mut bank = if args.out.join("bank.json").exists() {
            Bank::open(&args.out, OpenOptions::default())
                .with_context(|| format!("opening bank {}", args.out.display()))?
        } else {
            pollster::block_on(model.create_bank(&args.out))
                .with_context(|| format!("creating bank {}", args.out.display()))?
        };
        let bar = ProgressBar::new(0);
        bar.set_style(
            ProgressStyle::with_template(
                "{spinner} [{elapsed_precise}] {wide_bar} {pos}/{len} tokens, {msg}, ETA {eta}",
            )
            .expect("a valid template"),
        );
        let started = Instant::now();
        let options = BankEncodeOptions {
            commit_tokens: args.commit_tokens,
            pack_tokens: args.pack_tokens,
        };
        let report = pollster::block_on(model.encode_into_bank(&mut bank, &corpus, options, |p| {
            bar.set_length(p.tokens_total as u64);
            bar.set_position(p.tokens_done as u64);
            bar.set_message(format!(
                "{}/{} documents, {:.0} tokens/s",
                p.documents_done,
                p.documents_total,
                p.tokens_per_second()
            ));
        }));
        bar.finish_and_clear();
        let report = report.with_context(|| format!("encoding into {}", args.out.display()))?;
        let seconds = started.elapsed().as_secs_f64();
        println!(
            "encoded {} documents ({} tokens) in {:.2} s ({:.0} tokens/s) on {}; {} already in the bank",
            report.encoded,
            report.tokens,
            seconds,
            report.tokens as f64 / seconds.max(1e-9),
            model.backend.describe(),
            report.skipped
        );
        println!(
            "bank {}: {} documents, {} tokens, {} chunks",
            args.out.display(),
            bank.documents().len(),
            bank.token_count(),
            bank.chunk_count()
        );
        Ok(())
    }
}
