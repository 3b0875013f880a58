//! Gathering one router layer's fetched pages out of a memory-mapped bank segment, as
//! `Memory::fetch` hands them to a backend: at MSA-4B, 16 documents of 16 chunks, K then V rows of
//! 2 KiB each (1 MiB), from a 512 MiB file in the page cache, mapped afresh (untimed) per gather so
//! every page is mapped on first touch, as in a long-lived bank's map of rarely fetched documents. By one thread
//! and by rayon's pool, through the same `gather_pieces`.
//!
//! `cargo bench -p msa-engine --bench page_gather`

use std::io::Write;

use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use memmap2::Mmap;
use msa_engine::backend::{PieceWriter, gather_pieces};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const FILE_BYTES: usize = 512 << 20;
const ROW_BYTES: usize = 2048;
const CHUNKS_PER_DOCUMENT: usize = 16;
const DOCUMENTS: usize = 16;

fn page_gather(c: &mut Criterion) {
    let mut file = tempfile::tempfile().expect("a temporary file");
    let mut rng = StdRng::seed_from_u64(5);
    let mut block = vec![0u8; 1 << 20];
    for _ in 0..FILE_BYTES / block.len() {
        rng.fill(&mut block[..]);
        file.write_all(&block).expect("writing the temporary file");
    }
    let piece = CHUNKS_PER_DOCUMENT * ROW_BYTES;
    let total = 2 * DOCUMENTS * piece;
    let mut dst = vec![0u8; total];
    let pool = |threads| {
        rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .expect("a thread pool")
    };
    let mut group = c.benchmark_group("page_gather_1MiB");
    group.sample_size(50);
    group.throughput(Throughput::Bytes(total as u64));
    for threads in [pool(1), pool(0)] {
        let name = format!("{}_threads", threads.current_num_threads());
        group.bench_function(name, |bench| {
            // Mapping, choosing the documents and unmapping are left out of the time.
            bench.iter_batched(
                || {
                    // SAFETY: the temporary file is this process's alone, not written while mapped.
                    let map = unsafe { Mmap::map(&file) }.expect("mapping the temporary file");
                    let offsets: Vec<usize> = (0..2 * DOCUMENTS)
                        .map(|_| rng.random_range(0..FILE_BYTES / piece) * piece)
                        .collect();
                    (map, offsets)
                },
                |(map, offsets)| {
                    threads.install(|| {
                        let write: &mut PieceWriter<'_, '_> =
                            &mut |sink| offsets.iter().for_each(|&at| sink(&map[at..at + piece]));
                        assert_eq!(gather_pieces(write, &mut dst), total);
                    });
                    map
                },
                BatchSize::PerIteration,
            )
        });
    }
    group.finish();
}

criterion_group!(benches, page_gather);
criterion_main!(benches);
