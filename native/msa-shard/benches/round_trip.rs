//! What a remote shard costs over scoring the same shard in process: one router layer's request and
//! answer through loopback TCP against `ShardKeys::score` and `top_k` on the same CPU backend, on a
//! small shard, so the difference is the protocol's round trip (framing, two syscalls each way, the
//! server's hand-off to its scoring thread).
//!
//! `cargo bench -p msa-shard`

use std::net::TcpListener;

use criterion::{Criterion, criterion_group, criterion_main};
use msa_core::bank::{Bank, LayerRows, NewDocument, OpenOptions};
use msa_core::{ChunkReduce, HeadReduce, MemoryFingerprint, QueryReduce, ScoreMode};
use msa_engine::{
    Backend, CpuBackend, RemoteShard, RouterQueries, RoutingSpec, ShardKeys, ShardRequest,
};
use msa_shard::{ConnectOptions, ShardClient, ShardServer};

/// MSA-4B's routing shapes (8 KV heads of 128, 32 query heads), 64 documents of 2 chunks.
fn bank(dir: &std::path::Path) -> Bank {
    let fp = MemoryFingerprint {
        num_hidden_layers: 2,
        hidden_size: 64,
        router_layers: vec![1],
        num_key_value_heads: 8,
        head_dim: 128,
        pooling_kernel_size: 64,
        score_mode: ScoreMode::ScaledDot,
        weights_digest: 1,
    };
    let row = 8 * 128;
    let mut bank = Bank::create(dir, fp, 1, &vec![(vec![0.0; row], vec![0.0; row]); 2]).unwrap();
    let documents = (0..64)
        .map(|i| NewDocument {
            source: format!("d{i}"),
            tokens: 128,
            text: None,
            text_digest: 0,
        })
        .collect();
    let rows = |seed: usize| -> Vec<u8> {
        (0..64 * 2 * row)
            .flat_map(|i| {
                half::bf16::from_f32(((i * 7 + seed) % 13) as f32 / 13.0 - 0.5).to_le_bytes()
            })
            .collect()
    };
    bank.append(
        documents,
        |_| {
            Ok(LayerRows {
                routing_keys: rows(1),
                k: rows(2),
                v: rows(3),
            })
        },
        |_| {},
    )
    .unwrap();
    bank
}

fn round_trip(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    drop(bank(dir.path()));
    let bank = Bank::open(dir.path(), OpenOptions::default()).unwrap();
    let cpu = CpuBackend::new();
    let spec = RoutingSpec {
        score_mode: ScoreMode::ScaledDot,
        head_reduce: HeadReduce::Mean,
        query_reduce: QueryReduce::Max,
        chunk_reduce: ChunkReduce::Max,
    };
    let queries: Vec<f32> = (0..32 * 128).map(|i| (i % 11) as f32 / 11.0).collect();
    let local = ShardKeys::load(&cpu, &bank, 0..64, |_| {}).unwrap();
    let server = ShardServer::open(CpuBackend::new(), &bank, 0, 1, |_| {}).unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let address = listener.local_addr().unwrap().to_string();
    std::thread::spawn(move || server.serve(listener));
    let remote: ShardClient<CpuBackend> =
        ShardClient::connect(&address, ConnectOptions::default()).unwrap();

    let mut group = c.benchmark_group("one router layer, 64 documents, 1 routing token");
    group.bench_function("in process", |bench| {
        bench.iter(|| {
            let q = cpu.upload(&queries, &[1, 32, 128]).unwrap();
            let scores = local.score(&cpu, 0, &q, &[0], spec).unwrap();
            pollster::block_on(cpu.top_k(&scores, 16)).unwrap()
        })
    });
    group.bench_function("shard server over loopback TCP", |bench| {
        bench.iter(|| {
            let request = ShardRequest {
                slot: 0,
                queries: RouterQueries::Host(&queries),
                shape: [1, 32, 128],
                rows: &[0],
                top_k: 16,
                spec,
                keep_scores: false,
            };
            remote.collect(remote.submit(&request).unwrap()).unwrap()
        })
    });
    group.finish();
}

criterion_group!(benches, round_trip);
criterion_main!(benches);
