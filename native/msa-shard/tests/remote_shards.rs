//! Memory Parallel over TCP on the CPU reference: shard servers on threads of this process, reached
//! through 127.0.0.1, select exactly what one device selects; misplaced, foreign and failing servers are
//! clear errors.

use std::io::Write;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;

use msa_core::bank::{Bank, LayerRows, NewDocument, OpenOptions, ShardKeysFile};
use msa_core::{ChunkReduce, HeadReduce, MemoryFingerprint, QueryReduce, ScoreMode};
use msa_engine::{
    Backend, CpuBackend, Memory, RemoteShard, RouterQueries, RoutingSpec, Selection, ShardRequest,
};
use msa_shard::protocol::{Reply, Request, Score, read_frame, write_frame};
use msa_shard::{ConnectOptions, ShardClient, ShardServer};
use rand::{Rng, SeedableRng, rngs::StdRng};

const KV_HEADS: usize = 2;
const HEAD_DIM: usize = 4;
/// Query heads: two per KV head.
const HEADS: usize = 4;

fn fingerprint(head_dim: usize) -> MemoryFingerprint {
    MemoryFingerprint {
        num_hidden_layers: 3,
        hidden_size: 16,
        router_layers: vec![1, 2],
        num_key_value_heads: KV_HEADS,
        head_dim,
        pooling_kernel_size: 2,
        score_mode: ScoreMode::ScaledDot,
        weights_digest: 7,
    }
}

/// A bank of 23 documents of 1–9 tokens with random rows, where every fourth document repeats one
/// constant row (ties across shards) and two hold NaN.
fn make_bank(dir: &Path, seed: u64, head_dim: usize) -> Bank {
    let fp = fingerprint(head_dim);
    let row = KV_HEADS * head_dim;
    let template = vec![(vec![0.0; row], vec![0.0; row]); fp.num_hidden_layers];
    let mut bank = Bank::create(dir, fp, 1, &template).unwrap();
    let mut rng = StdRng::seed_from_u64(seed);
    let tokens: Vec<usize> = (0..23).map(|_| rng.random_range(1..10)).collect();
    let layer = |rng: &mut StdRng| -> Vec<u8> {
        let mut bytes = Vec::new();
        for (doc, &t) in tokens.iter().enumerate() {
            for _ in 0..t.div_ceil(2) * row {
                let value = match doc {
                    3 | 17 => f32::NAN,
                    d if d % 4 == 0 => 0.5,
                    _ => rng.random_range(-1.0..1.0),
                };
                bytes.extend_from_slice(&half::bf16::from_f32(value).to_le_bytes());
            }
        }
        bytes
    };
    let documents = tokens
        .iter()
        .enumerate()
        .map(|(i, &tokens)| NewDocument {
            source: format!("doc{i}"),
            tokens,
            text: None,
            text_digest: 0,
        })
        .collect();
    bank.append(
        documents,
        |_| {
            Ok(LayerRows {
                routing_keys: layer(&mut rng),
                k: layer(&mut rng),
                v: layer(&mut rng),
            })
        },
        |_| {},
    )
    .unwrap();
    bank
}

fn reopen(dir: &Path) -> Bank {
    Bank::open(dir, OpenOptions::default()).unwrap()
}

/// Starts a shard server of the bank at `dir` on a thread and returns its address.
fn serve(dir: &Path, rank: usize, world: usize) -> SocketAddr {
    let bank = reopen(dir);
    listen(ShardServer::open(CpuBackend::new(), &bank, rank, world, |_| {}).unwrap())
}

/// Serves `server` on 127.0.0.1 from a thread (for the rest of the test process); its address.
fn listen(server: ShardServer<CpuBackend>) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let address = listener.local_addr().unwrap();
    std::thread::spawn(move || server.serve(listener));
    address
}

fn connect(address: impl ToString) -> msa_engine::Result<Box<dyn RemoteShard<CpuBackend>>> {
    let client = ShardClient::connect(&address.to_string(), ConnectOptions::default())?;
    Ok(Box::new(client))
}

/// The bank at `dir` with shard 0 of 2 on this process's CPU and shard 1 at `remote`.
fn with_remote(dir: &Path, remote: impl ToString) -> Memory<CpuBackend> {
    let remotes = vec![connect(remote).unwrap()];
    Memory::from_bank_with(&CpuBackend::new(), reopen(dir), Vec::new(), remotes).unwrap()
}

/// The bank at `dir` on one CPU device.
fn on_one_device(dir: &Path) -> Memory<CpuBackend> {
    Memory::from_bank(&CpuBackend::new(), reopen(dir), Vec::new()).unwrap()
}

fn spec(head_reduce: HeadReduce, query_reduce: QueryReduce) -> RoutingSpec {
    RoutingSpec {
        score_mode: ScoreMode::ScaledDot,
        head_reduce,
        query_reduce,
        chunk_reduce: ChunkReduce::Max,
    }
}

fn select(
    memory: &Memory<CpuBackend>,
    slot: usize,
    queries: &[f32],
    k: usize,
    spec: RoutingSpec,
) -> msa_engine::Result<Selection<<CpuBackend as Backend>::Tensor>> {
    select_with(memory, slot, queries, k, spec, true, || Ok(()))
}

fn select_with(
    memory: &Memory<CpuBackend>,
    slot: usize,
    queries: &[f32],
    k: usize,
    spec: RoutingSpec,
    keep_scores: bool,
    meanwhile: impl FnOnce() -> msa_engine::Result<()>,
) -> msa_engine::Result<Selection<<CpuBackend as Backend>::Tensor>> {
    let b = CpuBackend::new();
    let q = b.upload(
        queries,
        &[queries.len() / (HEADS * HEAD_DIM), HEADS, HEAD_DIM],
    )?;
    let (selection, ()) =
        pollster::block_on(memory.select(&b, slot, &q, &[0, 2], k, spec, keep_scores, meanwhile))?;
    Ok(selection)
}

/// `(document, score bits)` and every score's bits: what must match exactly.
fn bits(selection: &Selection<<CpuBackend as Backend>::Tensor>) -> (Vec<(usize, u32)>, Vec<u32>) {
    let scores = pollster::block_on(CpuBackend::new().read(selection.scores.as_ref().unwrap()));
    (
        selection
            .documents
            .iter()
            .map(|&(d, s)| (d, s.to_bits()))
            .collect(),
        scores.unwrap().iter().map(|s| s.to_bits()).collect(),
    )
}

#[test]
fn remote_shards_select_like_one_device() {
    let dir = tempfile::tempdir().unwrap();
    drop(make_bank(dir.path(), 1, HEAD_DIM));
    let cpu = CpuBackend::new();
    let single = on_one_device(dir.path());
    let mut rng = StdRng::seed_from_u64(9);
    let queries: Vec<f32> = (0..3 * HEADS * HEAD_DIM)
        .map(|_| rng.random_range(-1.0..1.0))
        .collect();
    // (local devices, remote shards): the model's backend alone, and several local devices, first.
    for (local, remote) in [(0, 1), (2, 2), (1, 4)] {
        let world = local.max(1) + remote;
        let remotes = (0..remote)
            .map(|i| connect(serve(dir.path(), local.max(1) + i, world)).unwrap())
            .collect();
        let sharded =
            Memory::from_bank_with(&cpu, reopen(dir.path()), vec![cpu; local], remotes).unwrap();
        assert_eq!(sharded.devices(), world);
        assert_eq!(sharded.device_bytes(), single.device_bytes());
        for slot in 0..2 {
            for spec in [
                spec(HeadReduce::Mean, QueryReduce::Max),
                spec(HeadReduce::Max, QueryReduce::Last),
            ] {
                for k in [0, 1, 3, 7, 23, 30] {
                    let one = select(&single, slot, &queries, k, spec).unwrap();
                    let many = select(&sharded, slot, &queries, k, spec).unwrap();
                    assert_eq!(bits(&one), bits(&many), "{local}+{remote} shards, k = {k}");
                    assert_eq!(one.scanned_bytes, many.scanned_bytes);
                    let lean =
                        select_with(&sharded, slot, &queries, k, spec, false, || Ok(())).unwrap();
                    assert_eq!(lean.documents, one.documents);
                    assert!(lean.scores.is_none());
                }
            }
        }
    }
}

#[test]
fn misplaced_or_foreign_servers_are_refused_by_name() {
    let (dir, other, wider) = (
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
    );
    drop(make_bank(dir.path(), 1, HEAD_DIM));
    drop(make_bank(other.path(), 2, HEAD_DIM));
    drop(make_bank(wider.path(), 1, 2 * HEAD_DIM));
    let cpu = CpuBackend::new();
    let open = |remote: SocketAddr| {
        let remotes = vec![connect(remote).unwrap()];
        Memory::from_bank_with(&cpu, reopen(dir.path()), Vec::new(), remotes)
            .expect_err("refused")
            .to_string()
    };
    let error = open(serve(dir.path(), 1, 3));
    assert!(
        error.contains("serves shard 1 of 3") && error.contains("needs shard 1 of 2"),
        "{error}"
    );
    let error = open(serve(other.path(), 1, 2));
    assert!(error.contains("another bank"), "{error}");
    let error = open(serve(wider.path(), 1, 2));
    assert!(
        error.contains("different model") && error.contains("head_dim"),
        "{error}"
    );
    // A shard of a bank too small for the split, and a rank past the world, refuse to start.
    let bank = reopen(dir.path());
    let error = ShardServer::open(CpuBackend::new(), &bank, 30, 40, |_| {})
        .err()
        .unwrap()
        .to_string();
    assert!(error.contains("make only 23 non-empty shards"), "{error}");
    let error = ShardServer::open(CpuBackend::new(), &bank, 2, 2, |_| {})
        .err()
        .unwrap()
        .to_string();
    assert!(error.contains("below the number of shards"), "{error}");
}

#[test]
fn unreachable_and_strange_servers_are_clear_errors() {
    // Nothing listening: bind a port, then free it.
    let closed = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let error = connect(closed).err().unwrap().to_string();
    assert!(
        error.contains("cannot connect") && error.contains(&closed.to_string()),
        "{error}"
    );
    let error = connect("no-such-host.invalid:1").err().unwrap().to_string();
    assert!(error.contains("cannot resolve the address"), "{error}");
    // A web server where a shard server should be.
    let http = TcpListener::bind("127.0.0.1:0").unwrap();
    let address = http.local_addr().unwrap();
    std::thread::spawn(move || {
        let (mut stream, _) = http.accept().unwrap();
        stream
            .write_all(b"HTTP/1.1 400 Bad Request\r\n\r\n")
            .unwrap();
    });
    let error = connect(address).err().unwrap().to_string();
    assert!(error.contains("no msa-shard greeting"), "{error}");
}

/// A proxy to `upstream` whose first connection passes the greeting, then hangs up on the first
/// request: a server lost mid-query. With `restarts`, later connections are forwarded whole (the server
/// back after a restart); without, the proxy stops listening.
fn proxy(upstream: SocketAddr, restarts: bool) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let address = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for (round, client) in listener.incoming().enumerate() {
            let mut client = client.unwrap();
            let mut server = TcpStream::connect(upstream).unwrap();
            if round > 0 {
                let (mut from_server, mut to_client) =
                    (server.try_clone().unwrap(), client.try_clone().unwrap());
                std::thread::spawn(move || std::io::copy(&mut client, &mut server));
                std::thread::spawn(move || std::io::copy(&mut from_server, &mut to_client));
                continue;
            }
            let (hello, _): (Request, _) = read_frame(&mut client).unwrap().unwrap();
            write_frame(&mut server, &hello, &[]).unwrap();
            let (welcome, _): (Reply, _) = read_frame(&mut server).unwrap().unwrap();
            write_frame(&mut client, &welcome, &[]).unwrap();
            let _ = read_frame::<Request>(&mut client);
            if !restarts {
                return;
            }
        }
    });
    address
}

#[test]
fn a_server_lost_mid_session_fails_the_query_and_says_so_after() {
    let dir = tempfile::tempdir().unwrap();
    drop(make_bank(dir.path(), 1, HEAD_DIM));
    let proxy = proxy(serve(dir.path(), 1, 2), false);
    let memory = with_remote(dir.path(), proxy);
    let queries = vec![0.25; 3 * HEADS * HEAD_DIM];
    let spec = spec(HeadReduce::Mean, QueryReduce::Max);
    let error = select(&memory, 0, &queries, 4, spec)
        .err()
        .unwrap()
        .to_string();
    assert!(
        error.contains(&format!("shard 1 of 2 at {proxy}"))
            && error.contains("closed the connection"),
        "{error}"
    );
    // The next query connects again; the proxy is gone, so nothing listens there now.
    let error = select(&memory, 1, &queries, 4, spec)
        .err()
        .unwrap()
        .to_string();
    assert!(
        error.contains(
            "the connection was lost (the server closed the connection) and cannot reopen"
        ),
        "{error}"
    );
}

#[test]
fn a_restarted_server_is_reconnected_if_it_serves_the_same_shard() {
    let dir = tempfile::tempdir().unwrap();
    drop(make_bank(dir.path(), 1, HEAD_DIM));
    let proxy = proxy(serve(dir.path(), 1, 2), true);
    let memory = with_remote(dir.path(), proxy);
    let single = on_one_device(dir.path());
    let queries = vec![0.25; 3 * HEADS * HEAD_DIM];
    let spec = spec(HeadReduce::Mean, QueryReduce::Max);
    let error = select(&memory, 0, &queries, 4, spec)
        .err()
        .unwrap()
        .to_string();
    assert!(error.contains("closed the connection"), "{error}");
    assert_eq!(
        bits(&select(&memory, 0, &queries, 4, spec).unwrap()),
        bits(&select(&single, 0, &queries, 4, spec).unwrap())
    );
}

#[test]
fn a_refused_request_leaves_the_connection_usable() {
    let dir = tempfile::tempdir().unwrap();
    drop(make_bank(dir.path(), 1, HEAD_DIM));
    let client = connect(serve(dir.path(), 0, 1)).unwrap();
    let queries = vec![0.5; 2 * HEADS * HEAD_DIM];
    let request = |slot, shape| ShardRequest {
        slot,
        queries: RouterQueries::Host(&queries),
        shape,
        rows: &[1],
        top_k: 5,
        spec: spec(HeadReduce::Mean, QueryReduce::Mean),
        keep_scores: false,
    };
    for (slot, shape, problem) in [
        (2, [2, HEADS, HEAD_DIM], "slot 2 of 2"),
        (0, [3, HEADS, HEAD_DIM], "do not fill shape"),
        (0, [2, HEADS, HEAD_DIM + 1], "against keys of 2 heads of 4"),
        // Dimensions whose product overflows: refused, not a crashed server.
        (0, [1 << 31, 1 << 31, HEAD_DIM], "do not fill shape"),
    ] {
        let ticket = client.submit(&request(slot, shape)).unwrap();
        let error = client.collect(ticket).err().unwrap().to_string();
        assert!(
            error.contains("refused") && error.contains(problem),
            "{error}"
        );
    }
    let ticket = client.submit(&request(1, [2, HEADS, HEAD_DIM])).unwrap();
    let answer = client.collect(ticket).unwrap();
    assert_eq!(answer.top.len(), 5);
    // Answers are matched to their requests whatever order they are collected in.
    let first = client
        .submit(&ShardRequest {
            top_k: 3,
            ..request(1, [2, HEADS, HEAD_DIM])
        })
        .unwrap();
    let second = client.submit(&request(1, [2, HEADS, HEAD_DIM])).unwrap();
    assert_eq!(client.collect(second).unwrap(), answer);
    assert_eq!(client.collect(first).unwrap().top, answer.top[..3]);
    let error = client.collect(99).err().unwrap().to_string();
    assert!(error.contains("no request 99 was sent"), "{error}");
}

#[test]
fn hostile_frames_do_not_stop_the_server() {
    let dir = tempfile::tempdir().unwrap();
    drop(make_bank(dir.path(), 1, HEAD_DIM));
    let address = serve(dir.path(), 1, 2);
    // A length prefix claiming 4 GB, a frame cut short, and a request before any greeting.
    let mut huge = TcpStream::connect(address).unwrap();
    huge.write_all(&[0, 0, 0, 0]).unwrap();
    huge.write_all(&(4u64 << 30).to_le_bytes()).unwrap();
    let mut cut = TcpStream::connect(address).unwrap();
    cut.write_all(&[200, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, b'{'])
        .unwrap();
    drop(cut);
    let mut rude = TcpStream::connect(address).unwrap();
    let score = Request::Score(Score {
        slot: 0,
        shape: [1 << 40, 1 << 40, HEAD_DIM],
        rows: vec![0],
        top_k: 3,
        spec: spec(HeadReduce::Mean, QueryReduce::Max).into(),
        keep_scores: true,
        over_link: false,
    });
    write_frame(&mut rude, &score, &[1.0; 4]).unwrap();
    let (reply, _): (Reply, Vec<f32>) = read_frame(&mut rude).unwrap().unwrap();
    assert!(
        matches!(&reply, Reply::Refused { reason } if reason.contains("do not fill shape")),
        "{reply:?}"
    );
    // A device link the CPU backend cannot join, and router queries over a link never joined.
    let link = Request::Link {
        rendezvous: vec![7; 128],
    };
    write_frame(&mut rude, &link, &[]).unwrap();
    let (reply, _): (Reply, Vec<f32>) = read_frame(&mut rude).unwrap().unwrap();
    assert!(
        matches!(&reply, Reply::Refused { reason } if reason.contains("makes no device links")),
        "{reply:?}"
    );
    let over_link = Request::Score(Score {
        slot: 0,
        shape: [1, HEADS, HEAD_DIM],
        rows: vec![0],
        top_k: 3,
        spec: spec(HeadReduce::Mean, QueryReduce::Max).into(),
        keep_scores: false,
        over_link: true,
    });
    write_frame(&mut rude, &over_link, &[]).unwrap();
    let (reply, _): (Reply, Vec<f32>) = read_frame(&mut rude).unwrap().unwrap();
    assert!(
        matches!(&reply, Reply::Refused { reason } if reason.contains("no device link")),
        "{reply:?}"
    );
    // A send the server cannot meet would leave the client's GPU waiting: it closes the connection.
    assert!(matches!(read_frame::<Reply>(&mut rude), Ok(None) | Err(_)));
    // A client on a backend without device links says so, and sends through the host.
    let client: ShardClient<CpuBackend> =
        ShardClient::connect(&address.to_string(), ConnectOptions::default()).unwrap();
    let error = client.link(&CpuBackend::new()).unwrap_err().to_string();
    assert!(error.contains("makes no device links"), "{error}");
    assert!(!client.takes_device_queries());
    // Still serving: a new client routes exactly as one device does.
    let memory = with_remote(dir.path(), address);
    let single = on_one_device(dir.path());
    let queries = vec![0.5; 3 * HEADS * HEAD_DIM];
    let spec = spec(HeadReduce::Mean, QueryReduce::Max);
    assert_eq!(
        bits(&select(&memory, 0, &queries, 5, spec).unwrap()),
        bits(&select(&single, 0, &queries, 5, spec).unwrap())
    );
    drop(huge);
}

#[test]
fn a_failed_query_and_concurrent_queries_keep_answers_matched() {
    let dir = tempfile::tempdir().unwrap();
    drop(make_bank(dir.path(), 1, HEAD_DIM));
    let cpu = CpuBackend::new();
    let remotes = vec![
        connect(serve(dir.path(), 1, 3)).unwrap(),
        connect(serve(dir.path(), 2, 3)).unwrap(),
    ];
    let sharded = Memory::from_bank_with(&cpu, reopen(dir.path()), Vec::new(), remotes).unwrap();
    let single = on_one_device(dir.path());
    let spec = spec(HeadReduce::Max, QueryReduce::Mean);
    let queries = |seed: u64| -> Vec<f32> {
        let mut rng = StdRng::seed_from_u64(seed);
        (0..3 * HEADS * HEAD_DIM)
            .map(|_| rng.random_range(-1.0..1.0))
            .collect()
    };
    // The local work fails after the remote requests went out; the next query is still exact.
    let error = select_with(&sharded, 0, &queries(1), 4, spec, true, || {
        Err(msa_engine::Error::EmptyPrompt)
    })
    .err()
    .unwrap();
    assert!(matches!(error, msa_engine::Error::EmptyPrompt), "{error}");
    assert_eq!(
        bits(&select(&sharded, 1, &queries(2), 4, spec).unwrap()),
        bits(&select(&single, 1, &queries(2), 4, spec).unwrap())
    );
    // Four threads query one memory at once, each with its own queries and layers.
    std::thread::scope(|scope| {
        for thread in 0..4u64 {
            let (sharded, single) = (&sharded, &single);
            scope.spawn(move || {
                for round in 0..10 {
                    let (q, slot) = (queries(10 * thread + round), (thread + round) as usize % 2);
                    assert_eq!(
                        bits(&select(sharded, slot, &q, 6, spec).unwrap()),
                        bits(&select(single, slot, &q, 6, spec).unwrap()),
                        "thread {thread} round {round}"
                    );
                }
            });
        }
    });
}

/// A remote shard that records the tickets the engine abandons.
struct Recording {
    inner: Box<dyn RemoteShard<CpuBackend>>,
    abandoned: std::sync::Arc<std::sync::Mutex<Vec<u64>>>,
}

impl RemoteShard<CpuBackend> for Recording {
    fn describe(&self) -> String {
        self.inner.describe()
    }
    fn placement(&self) -> &msa_engine::ShardPlacement {
        self.inner.placement()
    }
    fn submit(&self, request: &ShardRequest<'_, CpuBackend>) -> msa_engine::Result<u64> {
        self.inner.submit(request)
    }
    fn collect(&self, ticket: u64) -> msa_engine::Result<msa_engine::ShardAnswer> {
        self.inner.collect(ticket)
    }
    fn abandon(&self, ticket: u64) {
        self.abandoned.lock().unwrap().push(ticket);
        self.inner.abandon(ticket);
    }
}

#[test]
fn abandoned_requests_leave_no_answer_behind() {
    let dir = tempfile::tempdir().unwrap();
    drop(make_bank(dir.path(), 1, HEAD_DIM));
    let address = serve(dir.path(), 1, 2);
    // On the client: an abandoned request's reply is dropped, whether it came before or after.
    let client = connect(address).unwrap();
    let queries = vec![0.25; 2 * HEADS * HEAD_DIM];
    let request = ShardRequest {
        slot: 1,
        queries: RouterQueries::Host(&queries),
        shape: [2, HEADS, HEAD_DIM],
        rows: &[0, 1],
        top_k: 4,
        spec: spec(HeadReduce::Mean, QueryReduce::Max),
        keep_scores: true,
    };
    let tickets: Vec<u64> = (0..4).map(|_| client.submit(&request).unwrap()).collect();
    client.abandon(tickets[1]); // not answered yet
    let answer = client.collect(tickets[2]).unwrap(); // reads 0 (kept) and 1 (dropped)
    assert_eq!(client.collect(tickets[0]).unwrap(), answer);
    let _ = client.collect(tickets[3]).unwrap();
    let next = client.submit(&request).unwrap();
    let last = client.submit(&request).unwrap();
    assert_eq!(client.collect(last).unwrap(), answer);
    client.abandon(next); // answered and kept, until now
    for ticket in [tickets[1], next] {
        let error = client.collect(ticket).err().unwrap().to_string();
        assert!(error.contains("collected or abandoned already"), "{error}");
    }
    // In the engine: a query unwinding after its requests went out abandons them, and the memory
    // still selects exactly what one device selects.
    let abandoned = std::sync::Arc::default();
    let remote = Recording {
        inner: connect(address).unwrap(),
        abandoned: std::sync::Arc::clone(&abandoned),
    };
    let memory = Memory::from_bank_with(
        &CpuBackend::new(),
        reopen(dir.path()),
        Vec::new(),
        vec![Box::new(remote)],
    )
    .unwrap();
    let single = on_one_device(dir.path());
    let queries = vec![0.5; 3 * HEADS * HEAD_DIM];
    let spec = spec(HeadReduce::Max, QueryReduce::Mean);
    let unwound = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        select_with(&memory, 0, &queries, 3, spec, true, || panic!("cancelled"))
    }));
    assert!(unwound.is_err());
    assert_eq!(*abandoned.lock().unwrap(), [0]);
    assert_eq!(
        bits(&select(&memory, 0, &queries, 3, spec).unwrap()),
        bits(&select(&single, 0, &queries, 3, spec).unwrap())
    );
    assert_eq!(abandoned.lock().unwrap().len(), 1);
}

/// Starts a shard server of a shard key file on a thread and returns its address.
fn serve_file(file: &ShardKeysFile) -> SocketAddr {
    listen(ShardServer::from_file(CpuBackend::new(), file, |_| {}).unwrap())
}

#[test]
fn a_server_of_an_exported_shard_answers_like_one_of_the_whole_bank() {
    let (dir, other, files) = (
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
    );
    drop(make_bank(dir.path(), 1, HEAD_DIM));
    drop(make_bank(other.path(), 2, HEAD_DIM));
    let cpu = CpuBackend::new();
    let single = on_one_device(dir.path());
    // Ranks 1 and 2 of 3 from their files, rank 0 here: the same answers as one device.
    let open = |bank: &Path, rank: usize| {
        let name = bank.file_name().unwrap().to_string_lossy();
        let path = files.path().join(format!("{name}-rank{rank}.keys"));
        msa_shard::export(&reopen(bank), rank, 3, &path, |_| {}).unwrap();
        ShardKeysFile::open(&path, OpenOptions::default()).unwrap()
    };
    let keys = [open(dir.path(), 1), open(dir.path(), 2)];
    let from_bank = ShardServer::open(cpu, &reopen(dir.path()), 1, 3, |_| {}).unwrap();
    let from_file = ShardServer::from_file(cpu, &keys[0], |_| {}).unwrap();
    assert_eq!(from_file.welcome(), from_bank.welcome());
    let remotes = keys
        .iter()
        .map(|file| connect(serve_file(file)).unwrap())
        .collect();
    let sharded = Memory::from_bank_with(&cpu, reopen(dir.path()), Vec::new(), remotes).unwrap();
    let mut rng = StdRng::seed_from_u64(4);
    let queries: Vec<f32> = (0..3 * HEADS * HEAD_DIM)
        .map(|_| rng.random_range(-1.0..1.0))
        .collect();
    for slot in 0..2 {
        let spec = spec(HeadReduce::Mean, QueryReduce::Max);
        assert_eq!(
            bits(&select(&single, slot, &queries, 6, spec).unwrap()),
            bits(&select(&sharded, slot, &queries, 6, spec).unwrap()),
            "router layer {slot}"
        );
    }
    // The file of another bank's shard is refused like that bank's server.
    let foreign = open(other.path(), 1);
    let remotes = vec![connect(serve_file(&foreign)).unwrap()];
    let wrong_world = vec![connect(serve_file(&keys[0])).unwrap()];
    for (remotes, problem) in [
        (remotes, "another bank"),
        (wrong_world, "serves shard 1 of 3"),
    ] {
        let error = Memory::from_bank_with(&cpu, reopen(dir.path()), Vec::new(), remotes)
            .expect_err("refused")
            .to_string();
        assert!(error.contains(problem), "{error}");
    }
}
