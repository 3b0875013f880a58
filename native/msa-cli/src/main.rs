//! `msa`: inspect models and banks, encode corpora into banks, ask and chat over them, benchmark the
//! pipeline at any memory size, and serve an OpenAI-compatible API.

mod ask;
mod backend;
mod bench;
mod corpus;
mod encode;
mod info;
mod interleave;
mod kernels;
mod serve;
mod shard;
mod units;

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use tracing_subscriber::EnvFilter;

/// Memory Sparse Attention: encode documents once, then ask questions over up to millions of tokens of
/// memory. Every router layer scores all documents and attends only to the top k.
///
/// Logs go to stderr (`-v`, `-vv`, or `RUST_LOG=msa=debug`); answers and reports go to stdout.
#[derive(Parser)]
#[command(name = "msa", version, max_term_width = 100)]
struct Cli {
    /// More log output (-v info, -vv debug, -vvv trace); RUST_LOG overrides it.
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    verbose: u8,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    Info(info::InfoArgs),
    Devices(info::DevicesArgs),
    Encode(encode::EncodeArgs),
    Ask(ask::AskArgs),
    Chat(ask::ChatArgs),
    Bench(bench::BenchArgs),
    Serve(serve::ServeArgs),
    Shard(shard::ShardArgs),
}

fn init_logging(verbose: u8) {
    let level = match verbose {
        0 => "warn",
        1 => "info",
        2 => "debug",
        _ => "trace",
    };
    // wgpu's GL backend logs an error for every machine without a GL driver while adapters are
    // listed; that is not a failure of ours.
    let default = if verbose < 2 {
        format!("{level},wgpu_hal=off")
    } else {
        level.to_string()
    };
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .init();
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.verbose);
    #[cfg(unix)]
    if !matches!(cli.command, Command::Serve(_) | Command::Shard(_)) {
        // Rust ignores SIGPIPE, so `msa ask … | head -1` would panic on its next print; a command
        // whose reader has gone should end quietly, as Unix tools do. The server keeps ignoring it:
        // a client hanging up must not stop it.
        // SAFETY: setting a signal's disposition to the default before any thread is started.
        unsafe {
            libc::signal(libc::SIGPIPE, libc::SIG_DFL);
        }
    }
    let result = match cli.command {
        Command::Info(args) => info::info(args),
        Command::Devices(args) => info::devices(args),
        Command::Encode(args) => encode::encode(args),
        Command::Ask(args) => ask::ask(args),
        Command::Chat(args) => ask::chat(args),
        Command::Bench(args) => bench::bench(args),
        Command::Serve(args) => serve::serve(args),
        Command::Shard(args) => shard::shard(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            // `{:#}` prints the whole chain: "opening bank x: bank.json: ...".
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}
