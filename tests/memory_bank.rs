//! Memories on disk, end to end on the tiny fixture model: a bank answers like the in-process memory it
//! stores, encoding resumes, Memory Parallel selects exactly what one device selects, and a bank from
//! another model or an empty one is refused with a clear error.

mod common;

use std::path::Path;

use common::{BatchInvariance, copy_fixture, fixture_dir, read_tensors, write_tensors};
use msa::core::bank::{Bank, BankTensor, OpenOptions};
use msa::{Backend, BankEncodeOptions, Error, GenerateOptions, Memory, Msa, SourceDocument};

const MSA: &str = "msa-tiny";

fn strings(file: &str) -> Vec<String> {
    let text = std::fs::read_to_string(fixture_dir(MSA).join(file)).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn corpus() -> Vec<SourceDocument> {
    strings("memory.json")
        .into_iter()
        .enumerate()
        .map(|(i, text)| SourceDocument {
            source: format!("memory.json#{i}"),
            text,
        })
        .collect()
}

fn greedy(max_tokens: usize) -> GenerateOptions {
    GenerateOptions {
        max_tokens,
        ..GenerateOptions::default()
    }
}

/// A bank of the whole fixture corpus, committed every `commit_tokens` tokens.
fn encode_bank<B: Backend>(msa: &Msa<B>, dir: &Path, commit_tokens: usize) -> Bank {
    encode_bank_with(
        msa,
        dir,
        BankEncodeOptions {
            commit_tokens,
            ..BankEncodeOptions::default()
        },
    )
}

fn encode_bank_with<B: Backend>(msa: &Msa<B>, dir: &Path, options: BankEncodeOptions) -> Bank {
    let mut bank = msa.create_bank(dir).unwrap();
    let mut reports = Vec::new();
    let report = msa
        .encode_into_bank(&mut bank, &corpus(), options, |p| reports.push(p))
        .unwrap();
    assert_eq!(report.encoded, corpus().len());
    let last = reports.last().unwrap();
    assert_eq!(last.documents_done, last.documents_total);
    assert_eq!(last.tokens_done, last.tokens_total);
    assert_eq!(last.tokens_done, bank.token_count());
    bank
}

fn bank_answers_like_the_memory_it_stores<B: Backend>(backend: B) {
    let msa = Msa::load_on(fixture_dir(MSA), backend).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let bank = encode_bank(&msa, dir.path(), 100);
    assert!(bank.manifest().segments.len() > 1, "several commits");
    let in_process = msa.encode(&strings("memory.json")).unwrap();
    let from_bank = msa.open_bank(dir.path()).unwrap();
    assert_eq!(from_bank.documents(), in_process.documents());
    assert_eq!(from_bank.chunk_count(), in_process.chunk_count());

    // Tiers: routing keys on the device, content in host pages; bf16 rows of kv_heads × head_dim.
    let fp = bank.fingerprint();
    let row = (fp.num_key_value_heads * fp.head_dim * 2) as u64;
    let layers = fp.router_layers.len() as u64;
    let chunks = bank.chunk_count() as u64;
    assert_eq!(from_bank.device_bytes(), chunks * row * layers);
    assert_eq!(from_bank.host_bytes(), 2 * chunks * row * layers);
    assert_eq!(in_process.host_bytes(), 0);

    // The bank stores K̄, V̄ and K̄r in bf16; the in-process memory keeps f32. On this model the rounding
    // changes neither the selections nor the greedy answers.
    for question in strings("queries.json") {
        let expected = msa.ask(&in_process, &question, &greedy(6)).unwrap();
        let actual = msa.ask(&from_bank, &question, &greedy(6)).unwrap();
        assert_eq!(actual.routing.len(), fp.router_layers.len());
        assert_eq!(expected.routing.len(), fp.router_layers.len());
        for (a, e) in actual.routing.iter().zip(&expected.routing) {
            let ids = |r: &msa::LayerRouting| r.documents.iter().map(|d| d.id).collect::<Vec<_>>();
            assert_eq!(
                ids(a),
                ids(e),
                "layer {} selections for {question:?}",
                a.layer
            );
            assert_eq!(a.chunks, e.chunks);
            for (x, y) in a.documents.iter().zip(&e.documents) {
                assert!((x.score - y.score).abs() < 2e-2, "{x:?} vs {y:?}");
            }
        }
        assert_eq!(actual.tokens, expected.tokens, "{question:?}");
    }

    // Per-query stats: the whole routing-key set scanned, only the selected documents' pages fetched.
    let model = msa.model();
    let question = &strings("queries.json")[0];
    let (session, plain_logits) =
        pollster::block_on(model.prefill_question(&from_bank, question)).unwrap();
    assert_eq!(session.route_stats().len(), fp.router_layers.len());
    assert_eq!(session.routing().len(), fp.router_layers.len());
    for (stats, routing) in session.route_stats().iter().zip(session.routing()) {
        assert_eq!(stats.layer, routing.layer);
        assert_eq!(stats.scanned_bytes, chunks * row);
        assert_eq!(stats.fetched_bytes, 2 * routing.chunks as u64 * row);
    }

    // Timing each layer's routing alone (as `msa bench` does) moves when its clock starts, not what
    // is routed or answered.
    let prompt = model
        .require_tokenizer()
        .unwrap()
        .question_prompt(question)
        .unwrap();
    let (timed, timed_logits) =
        pollster::block_on(model.prefill_query_timing_routing(&from_bank, &prompt)).unwrap();
    assert_eq!(timed.routing(), session.routing());
    assert_eq!(timed_logits, plain_logits);
    for (timed, plain) in timed.route_stats().iter().zip(session.route_stats()) {
        assert_eq!(
            (timed.layer, timed.scanned_bytes, timed.fetched_bytes),
            (plain.layer, plain.scanned_bytes, plain.fetched_bytes)
        );
    }
}

/// The two banks store the same rows: bit for bit from a batch-invariant backend; otherwise each bf16
/// element within one unit in the last place (f32 results that differ in their last bits may round to
/// neighbouring bf16 values), plus f32 rounding relative to the tensor's largest value (an element near
/// zero comes from cancellation, so its error scales with the inputs, not with itself).
fn same_rows<B: BatchInvariance>(a: &Bank, b: &Bank) {
    assert_eq!(a.documents(), b.documents());
    let widen = |bytes: &[u8]| -> Vec<f32> {
        bytes
            .chunks_exact(2)
            .map(|h| f32::from_bits(u32::from(u16::from_le_bytes([h[0], h[1]])) << 16))
            .collect()
    };
    for slot in 0..a.fingerprint().router_layers.len() {
        for tensor in [BankTensor::RoutingKeys, BankTensor::K, BankTensor::V] {
            let (mut x, mut y) = (Vec::new(), Vec::new());
            a.read_rows(slot, tensor, 0..a.chunk_count(), &mut x);
            b.read_rows(slot, tensor, 0..b.chunk_count(), &mut y);
            if B::BATCH_INVARIANT {
                assert!(x == y, "slot {slot} {tensor:?} differs");
                continue;
            }
            let (x, y) = (widen(&x), widen(&y));
            assert_eq!(x.len(), y.len(), "slot {slot} {tensor:?}: lengths");
            let scale = x.iter().fold(0.0f32, |m, v| m.max(v.abs()));
            for (i, (u, v)) in x.iter().zip(&y).enumerate() {
                // bf16 keeps 8 significant bits.
                let ulp = u.abs().max(v.abs()) / 128.0 + 1e-5 * scale;
                assert!(
                    (u - v).abs() <= ulp,
                    "slot {slot} {tensor:?} element {i}: {u} vs {v}"
                );
            }
        }
    }
}

/// Packing several documents per forward (block-diagonal attention, document-local positions) computes
/// what one forward per document computes: the stored rows are identical.
fn packed_encoding_equals_one_document_per_forward<B: Backend + BatchInvariance>(backend: B) {
    let msa = Msa::load_on(fixture_dir(MSA), backend).unwrap();
    let lengths: Vec<usize> = msa
        .model()
        .tokenize_documents(&strings("memory.json"), 0)
        .unwrap()
        .iter()
        .map(Vec::len)
        .collect();
    let longest = *lengths.iter().max().unwrap();
    let encode = |pack_tokens| {
        let dir = tempfile::tempdir().unwrap();
        let bank = encode_bank_with(
            &msa,
            dir.path(),
            BankEncodeOptions {
                commit_tokens: 1 << 20,
                pack_tokens,
            },
        );
        (dir, bank)
    };
    let (_a, alone) = encode(1);
    // Blocks of a few documents, the longest alone; and everything in one block.
    let (_b, some) = encode(longest + 1);
    let (_c, all) = encode(1 << 20);
    same_rows::<B>(&alone, &some);
    same_rows::<B>(&alone, &all);
}

fn resumed_encoding_equals_one_pass<B: Backend + BatchInvariance>(backend: B) {
    let msa = Msa::load_on(fixture_dir(MSA), backend).unwrap();
    let (one, two) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let whole = encode_bank(&msa, one.path(), 1 << 20);

    // An "interrupted" run that got through the first three documents, then the full run again.
    let mut resumed = msa.create_bank(two.path()).unwrap();
    let corpus = corpus();
    msa.encode_into_bank(
        &mut resumed,
        &corpus[..3],
        BankEncodeOptions::default(),
        |_| {},
    )
    .unwrap();
    let mut seen = Vec::new();
    let report = msa
        .encode_into_bank(&mut resumed, &corpus, BankEncodeOptions::default(), |p| {
            seen.push(p.documents_done)
        })
        .unwrap();
    assert_eq!(report.skipped, 3);
    assert_eq!(report.encoded, corpus.len() - 3);
    assert!(seen.windows(2).all(|w| w[0] < w[1]), "{seen:?}");
    assert_eq!(seen.last(), Some(&(corpus.len() - 3)));
    // Running it once more has nothing to do.
    let again = msa
        .encode_into_bank(&mut resumed, &corpus, BankEncodeOptions::default(), |_| {})
        .unwrap();
    assert_eq!((again.skipped, again.encoded), (corpus.len(), 0));

    let resumed = Bank::open(two.path(), OpenOptions::default()).unwrap();
    same_rows::<B>(&whole, &resumed);
    assert_eq!(
        resumed.document_text(4).unwrap().as_deref(),
        Some(corpus[4].text.as_str())
    );

    // A source whose text changed is refused, and the bank keeps what it had.
    let mut bank = Bank::open(two.path(), OpenOptions::default()).unwrap();
    let mut changed = corpus.clone();
    changed[1].text.push_str(" (edited)");
    let err = msa
        .encode_into_bank(&mut bank, &changed, BankEncodeOptions::default(), |_| {})
        .unwrap_err();
    assert!(
        err.to_string().contains("memory.json#1") && err.to_string().contains("changed"),
        "{err}"
    );
    assert_eq!(bank.documents().len(), corpus.len());
    // A corpus naming one source twice is refused before anything is encoded.
    let mut twice = corpus.clone();
    twice.push(SourceDocument {
        source: "new".into(),
        text: corpus[0].text.clone(),
    });
    twice.push(SourceDocument {
        source: "new".into(),
        text: corpus[1].text.clone(),
    });
    let err = msa
        .encode_into_bank(&mut bank, &twice, BankEncodeOptions::default(), |_| {})
        .unwrap_err();
    assert!(err.to_string().contains("`new` twice"), "{err}");
    assert_eq!(bank.documents().len(), corpus.len());
}

/// The same answers, selections and scores from one device and from `devices` Memory Parallel shards.
fn memory_parallel_matches_one_device<B: Backend>(msa: &Msa<B>, devices: Vec<B>) {
    let dir = tempfile::tempdir().unwrap();
    encode_bank(msa, dir.path(), 1 << 20);
    let shards = devices.len();
    let one: Memory<B> = msa.open_bank(dir.path()).unwrap();
    let sharded = msa.open_bank_on(dir.path(), devices).unwrap();
    assert_eq!((one.devices(), sharded.devices()), (1, shards));
    assert_eq!(one.device_bytes(), sharded.device_bytes());
    for question in strings("queries.json") {
        let a = msa.ask(&one, &question, &greedy(6)).unwrap();
        let b = msa.ask(&sharded, &question, &greedy(6)).unwrap();
        assert_eq!(a, b, "{question:?}");
    }
    // A k larger than any shard's share still merges to the single-device ranking.
    let model = msa.model();
    let prompt = model
        .require_tokenizer()
        .unwrap()
        .question_prompt(&strings("queries.json")[1])
        .unwrap();
    let mut ta = msa::engine::Trace::default();
    let mut tb = msa::engine::Trace::default();
    pollster::block_on(model.prefill_query(&one, &prompt, Some(&mut ta))).unwrap();
    pollster::block_on(model.prefill_query(&sharded, &prompt, Some(&mut tb))).unwrap();
    for ((la, sa), (lb, sb)) in ta.document_scores.iter().zip(&tb.document_scores) {
        assert_eq!(la, lb);
        let (sa, sb) = (
            pollster::block_on(model.backend.read(sa)).unwrap(),
            pollster::block_on(model.backend.read(sb)).unwrap(),
        );
        assert_eq!(sa, sb, "layer {la}: every document's score");
    }
}

/// Exact ties, NaN, ±0 and -inf scores: a bank of one-chunk-per-row documents whose routing keys are
/// constant bf16 values, so every document's score is that value (times the query's constant dot).
fn ties_and_nan_merge_like_one_device<B: Backend>(b: &B, devices: impl Fn(usize) -> Vec<B>) {
    let fingerprint = msa::MemoryFingerprint {
        num_hidden_layers: 2,
        hidden_size: 8,
        router_layers: vec![1],
        num_key_value_heads: 1,
        head_dim: 4,
        pooling_kernel_size: 2,
        score_mode: msa::ScoreMode::ScaledDot,
        weights_digest: 0,
    };
    let (one, nan, neg_inf, zero, neg_zero) = (0x3f80u16, 0x7fc0, 0xff80, 0x0000, 0x8000);
    let documents = [
        (3, nan),
        (2, one),
        (9, zero),
        (1, one),
        (4, neg_zero),
        (2, neg_inf),
        (5, one),
        (2, nan),
        (7, zero),
        (1, one),
    ];
    let dir = tempfile::tempdir().unwrap();
    let mut bank = Bank::create(
        dir.path(),
        fingerprint,
        1,
        &vec![(vec![0.0; 4], vec![0.0; 4]); 2],
    )
    .unwrap();
    let rows: Vec<u8> = documents
        .iter()
        .flat_map(|&(tokens, bits): &(usize, u16)| {
            std::iter::repeat_n(bits.to_le_bytes(), 4 * tokens.div_ceil(2)).flatten()
        })
        .collect();
    let news = documents
        .iter()
        .enumerate()
        .map(|(i, &(tokens, _))| msa::core::bank::NewDocument {
            source: format!("d{i}"),
            tokens,
            text: None,
            text_digest: 0,
        })
        .collect();
    bank.append(
        news,
        |_| {
            Ok(msa::core::bank::LayerRows {
                routing_keys: rows.clone(),
                k: rows.clone(),
                v: rows.clone(),
            })
        },
        |_| {},
    )
    .unwrap();
    let open = |devices| {
        let bank = Bank::open(dir.path(), OpenOptions::default()).unwrap();
        Memory::from_bank(b, bank, devices).unwrap()
    };
    let select = |memory: &Memory<B>, k| {
        let q = b.upload(&[1.0; 4], &[1, 1, 4]).unwrap();
        let spec = msa::engine::RoutingSpec {
            score_mode: msa::ScoreMode::ScaledDot,
            head_reduce: msa::core::HeadReduce::Mean,
            query_reduce: msa::core::QueryReduce::Max,
            chunk_reduce: msa::core::ChunkReduce::Max,
        };
        let (selection, ()) =
            pollster::block_on(memory.select(b, 0, &q, &[0], k, spec, false, || Ok(()))).unwrap();
        selection
            .documents
            .iter()
            .map(|&(d, score)| (d, score.to_bits()))
            .collect::<Vec<_>>()
    };
    let single = open(Vec::new());
    // Ties go to the lower id; NaN ranks last.
    assert_eq!(
        select(&single, 4)
            .iter()
            .map(|&(d, _)| d)
            .collect::<Vec<_>>(),
        [1, 3, 6, 9]
    );
    for shards in [2, 3, 4, 7, 10] {
        let sharded = open(devices(shards));
        for k in 0..=documents.len() + 2 {
            assert_eq!(
                select(&single, k),
                select(&sharded, k),
                "{shards} shards, k = {k}"
            );
        }
    }
}

#[test]
fn ties_and_nan_merge_like_one_device_on_cpu() {
    ties_and_nan_merge_like_one_device(&msa::CpuBackend::new(), |n| {
        vec![msa::CpuBackend::new(); n]
    });
}

#[test]
fn ties_and_nan_merge_like_one_device_on_wgpu() {
    let Some(gpu) = common::wgpu_backend() else {
        return;
    };
    // Shards share the adapter through clones of one backend (a fresh device per shard is covered by
    // memory_parallel_matches_one_device_on_wgpu).
    ties_and_nan_merge_like_one_device(&gpu, |n| vec![gpu.clone(); n]);
}

#[test]
fn memory_parallel_matches_one_device_on_cpu() {
    let msa = Msa::load(fixture_dir(MSA)).unwrap();
    for shards in [1, 2, 3, 7] {
        memory_parallel_matches_one_device(&msa, vec![msa::CpuBackend::new(); shards]);
    }
}

#[test]
fn memory_parallel_matches_one_device_on_wgpu() {
    let Some(gpu) = common::wgpu_backend() else {
        return;
    };
    let msa = Msa::load_on(fixture_dir(MSA), gpu).unwrap();
    // Three logical devices on the same adapter: each its own wgpu device, queue and buffers.
    let devices = (0..3).map(|_| common::wgpu_backend().unwrap()).collect();
    memory_parallel_matches_one_device(&msa, devices);
}

#[test]
fn memory_parallel_matches_one_device_on_cuda() {
    use msa::cuda::{CudaBackend, CudaOptions};
    let Some(gpu) = CudaBackend::open_or_skip(CudaOptions::default()) else {
        return;
    };
    // Two devices on the first GPU: the router queries reach them through the host.
    let msa = Msa::load_on(fixture_dir(MSA), gpu.clone()).unwrap();
    let second = CudaBackend::new(CudaOptions::default()).unwrap();
    memory_parallel_matches_one_device(&msa, vec![gpu.clone(), second]);
    // One device per GPU in an NCCL clique with the model's own (a clique of one on a machine with one
    // GPU): the router queries go device to device.
    if let Some(missing) = msa::cuda::nccl_missing() {
        assert!(
            std::env::var_os("MSA_REQUIRE_NCCL").is_none(),
            "MSA_REQUIRE_NCCL is set: {missing}"
        );
        eprintln!("skipping the NCCL clique: {missing}");
        return;
    }
    let mut clique = vec![gpu];
    for ordinal in 1..msa::cuda::device_count().unwrap() {
        clique.push(
            CudaBackend::new(CudaOptions {
                ordinal,
                ..CudaOptions::default()
            })
            .unwrap(),
        );
    }
    CudaBackend::join_clique(&mut clique).unwrap();
    // The host path selects the same: make sure this run goes device to device.
    let probe = clique[0].upload(&[1.0], &[1]).unwrap();
    let members: Vec<&CudaBackend> = clique.iter().collect();
    assert!(clique[0].broadcast(&probe, &members).is_some());
    let msa = Msa::load_on(fixture_dir(MSA), clique[0].clone()).unwrap();
    memory_parallel_matches_one_device(&msa, clique);
}

#[test]
fn a_bank_from_another_model_is_refused() {
    let msa = Msa::load(fixture_dir(MSA)).unwrap();
    let dir = tempfile::tempdir().unwrap();
    encode_bank(&msa, dir.path(), 1 << 20);

    // Same shapes, other weights: a fine-tune, say.
    let other = copy_fixture(MSA);
    let weights = other.path().join("model.safetensors");
    let mut tensors = read_tensors(&weights);
    // A fine-tune of layer 0 alone still changes every pooled row above it.
    let k_proj = tensors
        .iter_mut()
        .find(|t| t.name == "model.layers.0.self_attn.k_proj.weight")
        .unwrap();
    k_proj.data[0] ^= 1;
    write_tensors(&weights, &tensors);
    let other = Msa::load(other.path()).unwrap();
    let err = match other.open_bank(dir.path()) {
        Err(e) => e,
        Ok(_) => panic!("a bank of another checkpoint opened"),
    };
    assert!(matches!(err, Error::MemoryMismatch { .. }), "{err:?}");
    assert!(err.to_string().contains("weights_digest"), "{err}");
    let mut bank = Bank::open(dir.path(), OpenOptions::default()).unwrap();
    let err = other
        .encode_into_bank(&mut bank, &corpus(), BankEncodeOptions::default(), |_| {})
        .unwrap_err();
    assert!(matches!(err, Error::MemoryMismatch { .. }), "{err:?}");

    // Another shape: the message lists what differs.
    let reshaped = copy_fixture(MSA);
    let config = reshaped.path().join("config.json");
    let text = std::fs::read_to_string(&config)
        .unwrap()
        .replace("\"pooling_kernel_size\": 16", "\"pooling_kernel_size\": 8");
    std::fs::write(&config, text).unwrap();
    let err = match Msa::load(reshaped.path()).unwrap().open_bank(dir.path()) {
        Err(e) => e,
        Ok(_) => panic!("a bank of another shape opened"),
    };
    assert!(
        err.to_string().contains("pooling_kernel_size: 16 vs 8"),
        "{err}"
    );

    // A dense Qwen3 model has no memory at all.
    let qwen = Msa::load(fixture_dir("qwen3-tiny")).unwrap();
    assert!(matches!(
        qwen.open_bank(dir.path()),
        Err(Error::NotAnMsaModel(_))
    ));
}

#[test]
fn an_empty_bank_answers_no_documents() {
    let msa = Msa::load(fixture_dir(MSA)).unwrap();
    let dir = tempfile::tempdir().unwrap();
    msa.create_bank(dir.path()).unwrap();
    let memory = msa.open_bank(dir.path()).unwrap();
    assert!(memory.is_empty());
    let err = msa
        .ask(&memory, &strings("queries.json")[0], &greedy(2))
        .unwrap_err();
    assert!(matches!(err, Error::NoDocuments), "{err:?}");
    // Creating a bank where one exists is refused and leaves it alone.
    let err = match msa.create_bank(dir.path()) {
        Err(e) => e,
        Ok(_) => panic!("created a bank over a bank"),
    };
    assert!(
        err.to_string().contains("already holds a memory bank"),
        "{err}"
    );
    // Documents cannot be appended to a memory opened from a bank; the bank is the place to append.
    let mut memory = memory;
    let err = msa
        .add_documents(&mut memory, &strings("memory.json")[..1])
        .unwrap_err();
    assert!(err.to_string().contains("encode_into_bank"), "{err}");
}

on_every_backend!(
    bank_answers_like_the_memory_it_stores,
    packed_encoding_equals_one_document_per_forward,
    resumed_encoding_equals_one_pass
);

on_wgpu_with_small_limits!(bank_answers_like_the_memory_it_stores);
