//! `msa shard`: one Memory Parallel shard of a bank's routing keys, served over TCP to the processes
//! that answer questions (`msa ask/chat/serve --shards`), from a copy of the bank or from a shard key
//! file holding that shard's keys alone (`--export`, then `--keys`).

use std::io::Write;
use std::net::TcpListener;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use msa_core::bank::{Bank, OpenOptions, ShardKeysFile};
use msa_shard::ShardServer;

use crate::backend::{self, BackendArgs, Device, Job};
use crate::units;

/// Serve shard RANK of N of a bank's routing keys on this machine's device, for `msa ask`, `chat` and
/// `serve --shards` elsewhere. The asking process scores rank 0 (ranks 0..D-1 with --devices D) and
/// lists the servers of the following ranks, in order, in --shards; N counts every rank. Prints one
/// line with the address once ready, then serves until stopped. On CUDA, clients on CUDA with the same
/// NCCL send their router queries GPU to GPU over an NCCL link; each server on a machine of several
/// GPUs takes its own (CUDA_VISIBLE_DEVICES). With --export, writes the shard's routing keys to a file
/// instead, so that the serving machine needs that file alone (--keys).
#[derive(Args)]
pub struct ShardArgs {
    /// The bank: a copy of the asking process's, byte for byte (checked when a client connects).
    #[arg(long, value_name = "BANK", required_unless_present = "keys")]
    bank: Option<PathBuf>,
    /// This shard's rank.
    #[arg(long, required_unless_present = "keys")]
    rank: Option<usize>,
    /// Shards in all, local and remote.
    #[arg(
        long = "of",
        value_name = "N",
        value_parser = clap::value_parser!(u64).range(2..),
        required_unless_present = "keys"
    )]
    world: Option<u64>,
    /// Serve a shard key file written by --export (it records its rank, shard count and bank)
    /// instead of a bank.
    #[arg(long, value_name = "FILE", conflicts_with_all = ["bank", "rank", "world"])]
    keys: Option<PathBuf>,
    /// Write this shard's routing keys to FILE (a new shard key file, for `msa shard --keys FILE` on
    /// a machine without the bank) and exit; nothing is served and no device is opened. The bank is
    /// always verified first, since its rows get fresh checksums.
    #[arg(
        long,
        value_name = "FILE",
        requires = "bank",
        conflicts_with_all = ["no_verify", "listen", "backend", "devices"]
    )]
    export: Option<PathBuf>,
    /// Address to listen on (port 0 picks a free one).
    #[arg(long, default_value = "127.0.0.1:7070", value_name = "HOST:PORT")]
    listen: String,
    /// Skip reading every bank file (or the shard key file) to check its CRC-32 when opening.
    #[arg(long)]
    no_verify: bool,
    #[command(flatten)]
    backend: BackendArgs,
}

/// Where the shard's keys come from.
enum Source {
    Bank {
        bank: Bank,
        rank: usize,
        world: usize,
    },
    Keys(ShardKeysFile),
}

struct ShardJob {
    source: Source,
    listen: String,
}

/// A bar over the router layers, for uploading or writing keys.
fn layer_bar(layers: usize, what: &str) -> ProgressBar {
    ProgressBar::new(layers as u64).with_style(
        ProgressStyle::with_template(&format!("{what} {{bar:30}} {{pos}}/{{len}} router layers"))
            .expect("a valid template"),
    )
}

impl Job for ShardJob {
    type Output = ();

    fn run<B: Device>(self, device: B, shards: Vec<B>) -> Result<()> {
        if !shards.is_empty() {
            bail!(
                "one `msa shard` serves one device: run one per device, each with its own --rank"
            );
        }
        let (server, bank_documents) = match &self.source {
            Source::Bank { bank, rank, world } => {
                let bar = layer_bar(
                    bank.fingerprint().router_layers.len(),
                    "uploading routing keys",
                );
                let server = ShardServer::open(device, bank, *rank, *world, |done| {
                    bar.set_position(done as u64)
                })?;
                bar.finish_and_clear();
                (server, bank.documents().len())
            }
            Source::Keys(file) => {
                let header = file.header();
                let bar = layer_bar(
                    header.fingerprint.router_layers.len(),
                    "uploading routing keys",
                );
                let server =
                    ShardServer::from_file(device, file, |done| bar.set_position(done as u64))?;
                bar.finish_and_clear();
                (server, header.bank_documents)
            }
        };
        let listener = TcpListener::bind(&self.listen)
            .with_context(|| format!("listening on {}", self.listen))?;
        let welcome = server.welcome();
        let [first, end] = welcome.documents;
        println!(
            "shard {} of {}: documents {first}..{end} of {bank_documents}, {} of routing keys per router layer, on {}; listening on {}",
            welcome.rank,
            welcome.world,
            units::bytes(welcome.key_bytes),
            welcome.backend,
            listener.local_addr()?,
        );
        std::io::stdout().flush()?;
        Ok(server.serve(listener)?)
    }
}

fn rank_of_server(rank: usize) -> Result<()> {
    if rank == 0 {
        bail!("rank 0 is scored by the asking process itself: shard servers take ranks 1 and up");
    }
    Ok(())
}

/// `--export`: the shard's keys into a file, with a line saying what it holds.
fn export(bank: &Bank, rank: usize, world: usize, path: &Path) -> Result<()> {
    let bar = layer_bar(
        bank.fingerprint().router_layers.len(),
        "writing routing keys",
    );
    let documents = msa_shard::export(bank, rank, world, path, |done| {
        bar.set_position(done as u64)
    })?;
    bar.finish_and_clear();
    let (first, end) = (documents.start, documents.end);
    let bytes = std::fs::metadata(path)?.len();
    println!(
        "shard {rank} of {world}: documents {first}..{end} of {}, written to {} ({}); serve it with \
         `msa shard --keys {}`",
        bank.documents().len(),
        path.display(),
        units::bytes(bytes),
        path.display()
    );
    Ok(())
}

pub fn shard(args: ShardArgs) -> Result<()> {
    let options = OpenOptions {
        verify_checksums: !args.no_verify,
    };
    let source = match (&args.keys, &args.bank, args.rank, args.world) {
        (Some(path), ..) => {
            let file = ShardKeysFile::open(path, options)
                .with_context(|| format!("opening shard key file {}", path.display()))?;
            rank_of_server(file.header().rank)?;
            Source::Keys(file)
        }
        (None, Some(path), Some(rank), Some(world)) => {
            rank_of_server(rank)?;
            let bank = Bank::open(path, options)
                .with_context(|| format!("opening bank {}", path.display()))?;
            let world = world as usize;
            if let Some(file) = &args.export {
                return export(&bank, rank, world, file);
            }
            Source::Bank { bank, rank, world }
        }
        _ => unreachable!("clap requires --bank, --rank and --of without --keys"),
    };
    let job = ShardJob {
        source,
        listen: args.listen,
    };
    backend::run(&args.backend, job)
}
