//! The shard server: one range of a bank's routing keys on one backend, scored for any number of
//! clients. Connections are read on their own threads; the scoring runs on the thread that called
//! [`ShardServer::serve`], which owns the backend, one request at a time.

use std::io::{self, BufReader};
use std::net::{TcpListener, TcpStream};
use std::ops::Range;
use std::path::Path;
use std::sync::{Arc, mpsc};

use msa_core::MemoryFingerprint;
use msa_core::bank::{Bank, ShardKeysFile};
use msa_engine::{Backend, Error, Result, ShardKeys, shard_ranges};

use crate::protocol::{PROTOCOL, Reply, Request, Score, VERSION, Welcome, read_frame, write_frame};

/// Rank `rank` of `world` Memory Parallel shards of a bank, loaded on a backend.
pub struct ShardServer<B: Backend> {
    backend: B,
    keys: ShardKeys<B>,
    welcome: Welcome,
}

/// The documents of shard `rank` of `world` of `bank`: the split every client computes
/// ([`shard_ranges`]).
pub fn shard_documents(bank: &Bank, rank: usize, world: usize) -> Result<Range<usize>> {
    let ranges = shard_ranges(&bank.chunk_offsets(0..bank.documents().len()), world);
    ranges.get(rank).cloned().ok_or_else(|| Error::Shard {
        shard: format!("shard {rank} of {world}"),
        detail: if rank >= world {
            "the rank must be below the number of shards".into()
        } else {
            format!(
                "the bank's {} documents make only {} non-empty shards",
                bank.documents().len(),
                ranges.len()
            )
        },
    })
}

/// Writes the routing keys of shard `rank` of `world` of `bank` to a shard key file at `path`, for
/// [`ShardServer::from_file`] on a machine without the bank, calling `progress` with the router layers
/// written after each. Returns the shard's documents.
pub fn export(
    bank: &Bank,
    rank: usize,
    world: usize,
    path: &Path,
    progress: impl FnMut(usize),
) -> Result<Range<usize>> {
    let documents = shard_documents(bank, rank, world)?;
    ShardKeysFile::export(bank, rank, world, documents.clone(), path, progress)?;
    Ok(documents)
}

/// One scoring request handed from a connection's thread to the scoring thread.
struct Job {
    request: Score,
    queries: Vec<f32>,
    answer: mpsc::Sender<ScoreReply>,
}

/// The selected global ids and the reply's blob, or why the request was refused.
type ScoreReply = std::result::Result<(Vec<usize>, Vec<f32>), String>;

impl<B: Backend> ShardServer<B> {
    /// Uploads the routing keys of shard `rank` of `world` (the split every client computes:
    /// [`shard_ranges`]) to `backend`, calling `progress` with the router layers done after each.
    pub fn open(
        backend: B,
        bank: &Bank,
        rank: usize,
        world: usize,
        progress: impl FnMut(usize),
    ) -> Result<Self> {
        let documents = shard_documents(bank, rank, world)?;
        let keys = ShardKeys::load(&backend, bank, documents, progress)?;
        let placement = (rank, world, bank.manifest().content_digest());
        Ok(Self::serving(backend, keys, placement, bank.fingerprint()))
    }

    /// Uploads the routing keys of a shard key file (`msa shard --export`: one shard's keys, without
    /// the rest of the bank) to `backend`, calling `progress` with the router layers done after each.
    /// Clients see the same server as one opened on the bank it was exported from.
    pub fn from_file(
        backend: B,
        file: &ShardKeysFile,
        progress: impl FnMut(usize),
    ) -> Result<Self> {
        let keys = ShardKeys::from_file(&backend, file, progress)?;
        let h = file.header();
        let placement = (h.rank, h.world, h.bank_digest);
        Ok(Self::serving(backend, keys, placement, &h.fingerprint))
    }

    /// A server of `keys` at `(rank, world, bank digest)`.
    fn serving(
        backend: B,
        keys: ShardKeys<B>,
        (rank, world, bank_digest): (usize, usize, u32),
        fingerprint: &MemoryFingerprint,
    ) -> Self {
        let documents = keys.documents();
        let welcome = Welcome {
            protocol: PROTOCOL.into(),
            version: VERSION,
            rank,
            world,
            documents: [documents.start, documents.end],
            key_bytes: keys.key_bytes(),
            bank_digest,
            fingerprint: fingerprint.clone(),
            backend: backend.describe(),
        };
        ShardServer {
            backend,
            keys,
            welcome,
        }
    }

    /// What clients are told when they connect.
    pub fn welcome(&self) -> &Welcome {
        &self.welcome
    }

    /// Serves clients from `listener` for as long as the process runs; scoring runs on this thread.
    /// Returns only if the thread accepting connections dies.
    pub fn serve(&self, listener: TcpListener) -> io::Result<()> {
        let (jobs, queue) = mpsc::channel::<Job>();
        let welcome = Arc::new(self.welcome.clone());
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                // A connection that failed before it was accepted, or a full file table: the
                // listener itself is fine, so keep accepting.
                let stream = match stream {
                    Ok(stream) => stream,
                    Err(e) => {
                        tracing::warn!("accepting a connection: {e}");
                        std::thread::sleep(std::time::Duration::from_millis(100));
                        continue;
                    }
                };
                let (jobs, welcome) = (jobs.clone(), welcome.clone());
                std::thread::spawn(move || {
                    let peer = stream
                        .peer_addr()
                        .map_or_else(|_| "a client".into(), |a| a.to_string());
                    tracing::info!("{peer} connected");
                    match connection(stream, &welcome, &jobs) {
                        Ok(()) => tracing::info!("{peer} disconnected"),
                        Err(e) => tracing::warn!("{peer}: {e}"),
                    }
                });
            }
        });
        for job in queue {
            // A request no check foresaw must not take the server down with it.
            let scored =
                std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.score(&job)));
            let answer = match scored {
                Ok(answer) => answer.map_err(|e| e.to_string()),
                Err(_) => Err("the request made the scoring panic".to_string()),
            };
            // A client that hung up no longer waits for its answer.
            let _ = job.answer.send(answer);
        }
        // Every sender is gone: the accepting thread, which holds the first, has stopped.
        Err(io::Error::other("the thread accepting connections stopped"))
    }

    /// The shard's top k for one request as global ids, with their scores, then every score if asked.
    fn score(&self, job: &Job) -> Result<(Vec<usize>, Vec<f32>)> {
        let (b, request) = (&self.backend, &job.request);
        let layers = self.welcome.fingerprint.router_layers.len();
        if request.slot >= layers {
            return Err(Error::shape(
                "shard scoring",
                format!("router layer slot {} of {layers}", request.slot),
            ));
        }
        let fp = &self.welcome.fingerprint;
        let [_, heads, d] = request.shape;
        if d != fp.head_dim || heads == 0 || heads % fp.num_key_value_heads != 0 {
            return Err(Error::shape(
                "shard scoring",
                format!(
                    "router queries {:?} against keys of {} heads of {}",
                    request.shape, fp.num_key_value_heads, fp.head_dim
                ),
            ));
        }
        let queries = b.upload(&job.queries, &request.shape)?;
        let scores = self.keys.score(
            b,
            request.slot,
            &queries,
            &request.rows,
            request.spec.into(),
        )?;
        let top = pollster::block_on(b.top_k(&scores, request.top_k))?;
        let first = self.keys.documents().start;
        let ids = top.iter().map(|s| first + s.index as usize).collect();
        let mut blob: Vec<f32> = top.iter().map(|s| s.score).collect();
        if request.keep_scores {
            blob.extend(pollster::block_on(b.read(&scores))?);
        }
        Ok((ids, blob))
    }
}

/// A reply on its way to a client, in request order.
enum Outgoing {
    Ready(Reply),
    /// A score request's answer, once the scoring thread has it.
    Scoring(mpsc::Receiver<ScoreReply>),
}

/// Serves one client: the handshake, then its requests in order. Requests are read on this thread and
/// replies written on another, in the same order, so a client that writes its next request while a
/// large reply is on its way never stalls both sides.
fn connection(stream: TcpStream, welcome: &Welcome, jobs: &mpsc::Sender<Job>) -> io::Result<()> {
    stream.set_nodelay(true)?;
    let to_client = stream.try_clone()?;
    let (replies, outgoing) = mpsc::channel();
    let writer = std::thread::spawn(move || write_replies(to_client, outgoing));
    let read = read_requests(stream, welcome, jobs, &replies);
    drop(replies);
    let written = writer.join().expect("the reply writer does not panic");
    read.and(written)
}

fn read_requests(
    stream: TcpStream,
    welcome: &Welcome,
    jobs: &mpsc::Sender<Job>,
    replies: &mpsc::Sender<Outgoing>,
) -> io::Result<()> {
    let mut reader = BufReader::new(stream);
    let writer_stopped = |_| io::Error::other("the reply writer stopped");
    while let Some((request, queries)) = read_frame::<Request>(&mut reader)? {
        let reply = match request {
            Request::Hello { protocol, version } if protocol == PROTOCOL && version == VERSION => {
                Outgoing::Ready(Reply::Welcome(Box::new(welcome.clone())))
            }
            Request::Hello { protocol, version } => {
                let reason = format!(
                    "this server speaks {PROTOCOL} version {VERSION}, the client {protocol} \
                     version {version}: run the same msa release on both"
                );
                replies
                    .send(Outgoing::Ready(Reply::Refused { reason }))
                    .map_err(writer_stopped)?;
                return Ok(());
            }
            Request::Score(request) => {
                let (answer, answered) = mpsc::channel();
                let job = Job {
                    request,
                    queries,
                    answer,
                };
                jobs.send(job)
                    .map_err(|_| io::Error::other("the scoring thread stopped"))?;
                Outgoing::Scoring(answered)
            }
        };
        replies.send(reply).map_err(writer_stopped)?;
    }
    Ok(())
}

fn write_replies(mut stream: TcpStream, outgoing: mpsc::Receiver<Outgoing>) -> io::Result<()> {
    for reply in outgoing {
        match reply {
            Outgoing::Ready(reply) => write_frame(&mut stream, &reply, &[])?,
            Outgoing::Scoring(answered) => match answered.recv() {
                Ok(Ok((top, scores))) => write_frame(&mut stream, &Reply::Scored { top }, &scores)?,
                Ok(Err(reason)) => write_frame(&mut stream, &Reply::Refused { reason }, &[])?,
                Err(_) => return Err(io::Error::other("the scoring thread stopped")),
            },
        }
    }
    Ok(())
}
