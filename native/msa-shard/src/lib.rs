//! Memory Parallel across processes and machines (MSA-SPEC §5): `msa shard` serves one range of a
//! bank's routing keys on its own backend ([`ShardServer`]); a process answering questions connects to
//! each ([`ShardClient`]) and hands the connections to [`msa_engine::Model::open_memory_with`]. Per
//! router layer the routing rows of the router queries go out (16 KB per routing token at MSA-4B),
//! every shard scores its documents and returns its local top k, and the host merges them into the
//! single-device selection (exactly, where the shards compute on the same backend). The content K̄/V̄
//! stays with the asking process's copy of the bank. A server needs a copy of the bank, or only its
//! shard's routing keys: [`export`] writes them to a shard key file that [`ShardServer::from_file`]
//! serves. Where both backends make the same kind of device link (CUDA with NCCL),
//! [`ShardClient::link`] joins one and the router queries go device to device instead.
//!
//! ```no_run
//! use msa_core::bank::{Bank, OpenOptions};
//! use msa_engine::CpuBackend;
//! use msa_shard::{ConnectOptions, ShardClient, ShardServer};
//!
//! // On the machine holding shard 1 of 2:
//! let bank = Bank::open("corpus.bank", OpenOptions::default())?;
//! let server = ShardServer::open(CpuBackend::new(), &bank, 1, 2, |_| {})?;
//! std::thread::spawn(move || server.serve(std::net::TcpListener::bind("0.0.0.0:7070")?));
//!
//! // On the asking machine, which scores shard 0 itself:
//! let remote = ShardClient::connect("shard-host:7070", ConnectOptions::default())?;
//! # let model: msa_engine::Model<CpuBackend> = unimplemented!();
//! let memory = model.open_memory_with(
//!     Bank::open("corpus.bank", OpenOptions::default())?,
//!     Vec::new(),
//!     vec![Box::new(remote)],
//! )?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

mod client;
pub mod protocol;
mod server;

pub use client::{ConnectOptions, ShardClient};
pub use server::{ShardServer, export, shard_documents};
