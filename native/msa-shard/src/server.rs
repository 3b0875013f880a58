//! The shard server: one range of a bank's routing keys on one backend, scored for any number of
//! clients. Connections are read on their own threads; the scoring runs on the thread that called
//! [`ShardServer::serve`], which owns the backend, one request at a time.

use std::collections::HashMap;
use std::io::{self, BufReader};
use std::net::{TcpListener, TcpStream};
use std::ops::Range;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard, mpsc};

use msa_core::MemoryFingerprint;
use msa_core::bank::{Bank, ShardKeysFile};
use msa_engine::{Backend, DeviceLink, Error, Result, ShardKeys, shard_ranges};

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

/// Work handed from a connection's thread to the scoring thread, which owns the backend.
enum Job<B: Backend> {
    /// A scoring request, answered on `answer`.
    Score {
        connection: u64,
        request: Score,
        queries: Vec<f32>,
        answer: mpsc::Sender<Answer>,
    },
    /// Join a device link for the connection, on a thread that reports to `jobs` when joined.
    Link {
        connection: u64,
        rendezvous: Vec<u8>,
        aborter: Aborter,
        answer: mpsc::Sender<Answer>,
        jobs: mpsc::Sender<Job<B>>,
    },
    /// A device link joined (or not) for the connection: kept, with a way to abort it in `aborter`.
    Joined {
        connection: u64,
        joined: Result<Box<dyn DeviceLink<B>>>,
        aborter: Aborter,
        answer: mpsc::Sender<Answer>,
    },
    /// The connection closed: its device link, if any, goes.
    Closed { connection: u64 },
}

/// A reply from the scoring thread, its blob, and whether the connection closes after it.
type Answer = (Reply, Vec<f32>, bool);

/// Aborts a connection's device link: its thread calls it when the client goes, since the scoring
/// thread may then be waiting on the GPU for router queries that will never come.
type Aborter = Arc<Mutex<LinkSlot>>;

#[derive(Default)]
struct LinkSlot {
    /// The client went: a link joined after is aborted at once.
    closed: bool,
    abort: Option<Box<dyn FnOnce() + Send>>,
}

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
            link: backend.link_kind(),
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
    pub fn serve(&self, listener: TcpListener) -> io::Result<()>
    where
        B: Clone + Send + 'static,
    {
        let (jobs, queue) = mpsc::channel::<Job<B>>();
        let welcome = Arc::new(self.welcome.clone());
        std::thread::spawn(move || {
            for (connection, stream) in (0u64..).zip(listener.incoming()) {
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
                    let aborter = Aborter::default();
                    match serve_connection(stream, connection, &welcome, &jobs, &aborter) {
                        Ok(()) => tracing::info!("{peer} disconnected"),
                        Err(e) => tracing::warn!("{peer}: {e}"),
                    }
                    let _ = jobs.send(Job::Closed { connection });
                });
            }
        });
        // Each connection's device link, once joined.
        // Each connection's device link, once joined, and the requests whose queries it carried.
        let mut links: HashMap<u64, (Arc<dyn DeviceLink<B>>, usize)> = HashMap::new();
        for job in queue {
            match job {
                Job::Score {
                    connection,
                    request,
                    queries,
                    answer,
                } => {
                    // Router queries over the link are received before anything is checked, so
                    // the link stays in step with the client. A receive that fails (or queries for
                    // a link this connection lacks) leaves a send unmatched: the link is aborted and
                    // the connection closed, so the client drops its end too.
                    let received = match (request.over_link, links.get_mut(&connection)) {
                        (false, _) => Ok(None),
                        (true, Some((link, carried))) => {
                            match catch_unwind(AssertUnwindSafe(|| link.receive(&request.shape))) {
                                Ok(Ok(received)) => {
                                    *carried += 1;
                                    Ok(Some(received))
                                }
                                Ok(Err(e)) => Err(e.to_string()),
                                Err(_) => Err("the receive panicked".into()),
                            }
                        }
                        (true, None) => Err("this connection has no device link".into()),
                    };
                    let reply = match received {
                        Err(why) => {
                            if let Some((link, _)) = links.remove(&connection) {
                                link.abort();
                            }
                            let reason = format!(
                                "receiving the router queries over the device link: {why}; the \
                                 connection closes"
                            );
                            (refused(reason), Vec::new(), true)
                        }
                        // A request no check foresaw must not take the server down with it.
                        Ok(received) => match catch_unwind(AssertUnwindSafe(|| {
                            self.score(&request, queries, received)
                        })) {
                            Ok(Ok((top, blob))) => (Reply::Scored { top }, blob, false),
                            Ok(Err(e)) => (refused(e.to_string()), Vec::new(), false),
                            Err(_) => {
                                let reason = "the request made the scoring panic".into();
                                (refused(reason), Vec::new(), false)
                            }
                        },
                    };
                    // A client that hung up no longer waits for its answer.
                    let _ = answer.send(reply);
                }
                Job::Link {
                    connection,
                    rendezvous,
                    aborter,
                    answer,
                    jobs,
                } => {
                    if links.contains_key(&connection) {
                        let reply = refused("this connection has a device link already".into());
                        let _ = answer.send((reply, Vec::new(), false));
                        continue;
                    }
                    // On a thread of its own: a client that never joins its end leaves that thread
                    // waiting, not the scoring of every other client.
                    let backend = self.backend.clone();
                    std::thread::spawn(move || {
                        let joined = backend.join_link(&rendezvous, 1);
                        let _ = jobs.send(Job::Joined {
                            connection,
                            joined,
                            aborter,
                            answer,
                        });
                    });
                }
                Job::Joined {
                    connection,
                    joined,
                    aborter,
                    answer,
                } => {
                    let reply = match joined {
                        Ok(link) => {
                            let link: Arc<dyn DeviceLink<B>> = Arc::from(link);
                            let mut slot = lock(&aborter);
                            if slot.closed {
                                link.abort();
                                refused("the client went while the device link was joined".into())
                            } else {
                                let described = link.describe();
                                tracing::info!("joined a device link: {described}");
                                let abort = link.clone();
                                slot.abort = Some(Box::new(move || abort.abort()));
                                links.insert(connection, (link, 0));
                                Reply::Linked { link: described }
                            }
                        }
                        Err(e) => refused(format!("joining the device link: {e}")),
                    };
                    let _ = answer.send((reply, Vec::new(), false));
                }
                Job::Closed { connection } => {
                    if let Some((link, carried)) = links.remove(&connection) {
                        tracing::info!(
                            "a client left: its device link ({}) carried the router queries of \
                             {carried} requests",
                            link.describe()
                        );
                    }
                }
            }
        }
        // Every sender is gone: the accepting thread, which holds the first, has stopped.
        Err(io::Error::other("the thread accepting connections stopped"))
    }

    /// The shard's top k for one request as global ids, with their scores, then every score if asked:
    /// for the router queries `received` over the device link, or else those in `host_queries`.
    fn score(
        &self,
        request: &Score,
        host_queries: Vec<f32>,
        received: Option<B::Tensor>,
    ) -> Result<(Vec<usize>, Vec<f32>)> {
        let b = &self.backend;
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
        let queries = match received {
            Some(received) => received,
            None => b.upload(&host_queries, &request.shape)?,
        };
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

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn refused(reason: String) -> Reply {
    Reply::Refused { reason }
}

/// A reply on its way to a client, in request order.
enum Outgoing {
    Ready(Reply),
    /// The scoring thread's answer, once it has it.
    Pending(mpsc::Receiver<Answer>),
}

/// Serves one client: the handshake, then its requests in order. Requests are read on this thread and
/// replies written on another, in the same order, so a client that writes its next request while a
/// large reply is on its way never stalls both sides.
fn serve_connection<B: Backend>(
    stream: TcpStream,
    connection: u64,
    welcome: &Welcome,
    jobs: &mpsc::Sender<Job<B>>,
    aborter: &Aborter,
) -> io::Result<()> {
    stream.set_nodelay(true)?;
    let to_client = stream.try_clone()?;
    let (replies, outgoing) = mpsc::channel();
    let writer = std::thread::spawn(move || write_replies(to_client, outgoing));
    let read = read_requests(stream, connection, welcome, jobs, aborter, &replies);
    // The client is gone: nothing more comes over its link.
    let abort = {
        let mut slot = lock(aborter);
        slot.closed = true;
        slot.abort.take()
    };
    if let Some(abort) = abort {
        abort();
    }
    drop(replies);
    let written = writer.join().expect("the reply writer does not panic");
    read.and(written)
}

fn read_requests<B: Backend>(
    stream: TcpStream,
    connection: u64,
    welcome: &Welcome,
    jobs: &mpsc::Sender<Job<B>>,
    aborter: &Aborter,
    replies: &mpsc::Sender<Outgoing>,
) -> io::Result<()> {
    let mut reader = BufReader::new(stream);
    let writer_stopped = |_| io::Error::other("the reply writer stopped");
    while let Some((request, queries)) = read_frame::<Request>(&mut reader)? {
        let (answer, answered) = mpsc::channel();
        let job = match request {
            Request::Hello { protocol, version } if protocol == PROTOCOL && version == VERSION => {
                let welcome = Reply::Welcome(Box::new(welcome.clone()));
                replies
                    .send(Outgoing::Ready(welcome))
                    .map_err(writer_stopped)?;
                continue;
            }
            Request::Hello { protocol, version } => {
                let reason = format!(
                    "this server speaks {PROTOCOL} version {VERSION}, the client {protocol} \
                     version {version}: run the same msa release on both"
                );
                replies
                    .send(Outgoing::Ready(refused(reason)))
                    .map_err(writer_stopped)?;
                return Ok(());
            }
            Request::Score(request) => Job::Score {
                connection,
                request,
                queries,
                answer,
            },
            Request::Link { rendezvous } => Job::Link {
                connection,
                rendezvous,
                aborter: aborter.clone(),
                answer,
                jobs: jobs.clone(),
            },
        };
        jobs.send(job)
            .map_err(|_| io::Error::other("the scoring thread stopped"))?;
        replies
            .send(Outgoing::Pending(answered))
            .map_err(writer_stopped)?;
    }
    Ok(())
}

fn write_replies(mut stream: TcpStream, outgoing: mpsc::Receiver<Outgoing>) -> io::Result<()> {
    for reply in outgoing {
        match reply {
            Outgoing::Ready(reply) => write_frame(&mut stream, &reply, &[])?,
            Outgoing::Pending(answered) => match answered.recv() {
                Ok((reply, blob, close)) => {
                    write_frame(&mut stream, &reply, &blob)?;
                    if close {
                        // Ends the reading side too.
                        return stream.shutdown(std::net::Shutdown::Both);
                    }
                }
                Err(_) => return Err(io::Error::other("the scoring thread stopped")),
            },
        }
    }
    Ok(())
}
