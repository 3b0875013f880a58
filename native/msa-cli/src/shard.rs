//! `msa shard`: one Memory Parallel shard of a bank's routing keys, served over TCP to the processes
//! that answer questions (`msa ask/chat/serve --shards`).

use std::io::Write;
use std::net::TcpListener;
use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use msa_core::bank::{Bank, OpenOptions};
use msa_shard::ShardServer;

use crate::backend::{self, BackendArgs, Device, Job};
use crate::units;

/// Serve shard RANK of N of a bank's routing keys on this machine's device, for `msa ask`, `chat` and
/// `serve --shards` elsewhere. The asking process scores rank 0 (ranks 0..D-1 with --devices D) and
/// lists the servers of the following ranks, in order, in --shards; N counts every rank. Prints one
/// line with the address once ready, then serves until stopped.
#[derive(Args)]
pub struct ShardArgs {
    /// The bank: a copy of the asking process's, byte for byte (checked when a client connects).
    #[arg(long, value_name = "BANK")]
    bank: PathBuf,
    /// This shard's rank.
    #[arg(long)]
    rank: usize,
    /// Shards in all, local and remote.
    #[arg(long = "of", value_name = "N", value_parser = clap::value_parser!(u64).range(2..))]
    world: u64,
    /// Address to listen on (port 0 picks a free one).
    #[arg(long, default_value = "127.0.0.1:7070", value_name = "HOST:PORT")]
    listen: String,
    /// Skip reading every bank file to check its CRC-32 when opening.
    #[arg(long)]
    no_verify: bool,
    #[command(flatten)]
    backend: BackendArgs,
}

struct ShardJob {
    args: ShardArgs,
}

impl Job for ShardJob {
    type Output = ();

    fn run<B: Device>(self, device: B, shards: Vec<B>) -> Result<()> {
        let args = self.args;
        if args.rank == 0 {
            bail!(
                "rank 0 is scored by the asking process itself: shard servers take ranks 1 and up"
            );
        }
        if !shards.is_empty() {
            bail!(
                "one `msa shard` serves one device: run one per device, each with its own --rank"
            );
        }
        let bank = Bank::open(
            &args.bank,
            OpenOptions {
                verify_checksums: !args.no_verify,
            },
        )
        .with_context(|| format!("opening bank {}", args.bank.display()))?;
        let layers = bank.fingerprint().router_layers.len();
        let bar = ProgressBar::new(layers as u64).with_style(
            ProgressStyle::with_template(
                "uploading routing keys {bar:30} {pos}/{len} router layers",
            )
            .expect("a valid template"),
        );
        let server = ShardServer::open(device, &bank, args.rank, args.world as usize, |done| {
            bar.set_position(done as u64)
        })?;
        bar.finish_and_clear();
        let listener = TcpListener::bind(&args.listen)
            .with_context(|| format!("listening on {}", args.listen))?;
        let welcome = server.welcome();
        let [first, end] = welcome.documents;
        println!(
            "shard {} of {}: documents {first}..{end} of {}, {} of routing keys per router layer, on {}; listening on {}",
            welcome.rank,
            welcome.world,
            bank.documents().len(),
            units::bytes(welcome.key_bytes),
            welcome.backend,
            listener.local_addr()?,
        );
        std::io::stdout().flush()?;
        Ok(server.serve(listener)?)
    }
}

pub fn shard(args: ShardArgs) -> Result<()> {
    backend::run(&args.backend.clone(), ShardJob { args })
}
