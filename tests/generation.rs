//! Generation semantics through the public facade: streaming, stop tokens, token limits, seeded sampling,
//! appending documents, and the cosine routing mode.

mod common;

use common::{copy_fixture, fixture_dir};
use msa::engine::{Backend, CpuBackend, Model};
use msa::{FinishReason, GenerateOptions, Msa, SamplingParams, ScoreMode};

fn strings(file: &str) -> Vec<String> {
    let text = std::fs::read_to_string(fixture_dir("msa-tiny").join(file)).unwrap();
    serde_json::from_str(&text).unwrap()
}

/// A copy of msa-tiny whose config.json has `from` replaced by `to`.
fn tiny_with_config_edit(from: &str, to: &str) -> tempfile::TempDir {
    let dir = copy_fixture("msa-tiny");
    let path = dir.path().join("config.json");
    let config = std::fs::read_to_string(&path).unwrap();
    assert!(config.contains(from), "config.json has no {from}");
    std::fs::write(&path, config.replace(from, to)).unwrap();
    dir
}

fn greedy(max_tokens: usize) -> GenerateOptions {
    GenerateOptions {
        max_tokens,
        ..GenerateOptions::default()
    }
}

#[test]
fn streamed_text_matches_the_reference_service_output() {
    let msa = Msa::load(fixture_dir("msa-tiny")).unwrap();
    let memory = msa.encode(&strings("memory.json")).unwrap();
    let question = &strings("queries.json")[0];
    let mut streamed = String::new();
    let mut ids = Vec::new();
    let answer = msa
        .ask_streaming(&memory, question, &greedy(8), |id, piece| {
            ids.push(id);
            streamed.push_str(piece);
        })
        .unwrap();
    // The reference service returned the prompt text followed by this generation (manifest.json, q0).
    assert_eq!(answer.text, "111乻乻乻71亰亥亥");
    assert_eq!(streamed, answer.text);
    assert_eq!(ids, answer.tokens);
    assert_eq!(answer.finish_reason, FinishReason::Length);
    assert_eq!(answer.routing.len(), 2);
}

#[test]
fn stop_tokens_and_limits_end_the_stream() {
    let msa = Msa::load(fixture_dir("msa-tiny")).unwrap();
    let memory = msa.encode(&strings("memory.json")).unwrap();
    let question = &strings("queries.json")[0];
    // Greedy q0 continues 134, 274, ...: stopping on 274 keeps it as the last token.
    let stop = GenerateOptions {
        stop_tokens: Some(vec![274]),
        ..greedy(8)
    };
    let answer = msa.ask(&memory, question, &stop).unwrap();
    assert_eq!(answer.tokens, [134, 274]);
    assert_eq!(answer.finish_reason, FinishReason::Stop);

    let none = msa.ask(&memory, question, &greedy(0)).unwrap();
    assert!(none.tokens.is_empty());
    assert_eq!(none.finish_reason, FinishReason::Length);
}

#[test]
fn seeded_sampling_is_reproducible() {
    let msa = Msa::load(fixture_dir("msa-tiny")).unwrap();
    let memory = msa.encode(&strings("memory.json")).unwrap();
    let question = &strings("queries.json")[1];
    let sampled = |seed| {
        let options = GenerateOptions {
            max_tokens: 12,
            sampling: SamplingParams {
                temperature: 1.5,
                top_p: 0.95,
                seed,
            },
            stop_tokens: Some(vec![]),
        };
        msa.ask(&memory, question, &options).unwrap().tokens
    };
    assert_eq!(sampled(1), sampled(1));
    let greedy_tokens = msa.ask(&memory, question, &greedy(12)).unwrap().tokens;
    assert!(
        (0..4).map(sampled).any(|t| t != greedy_tokens),
        "hot sampling never left the greedy path"
    );
}

#[test]
fn appended_documents_equal_encoding_them_together() {
    let msa = Msa::load(fixture_dir("msa-tiny")).unwrap();
    let docs = strings("memory.json");
    let together = msa.encode(&docs).unwrap();
    let mut appended = msa.encode(&docs[..5]).unwrap();
    msa.add_documents(&mut appended, &docs[5..]).unwrap();
    assert_eq!(appended.documents(), together.documents());
    let b = &msa.model().backend;
    for (x, y) in appended.layers().iter().zip(together.layers()) {
        for (p, q) in [
            (&x.k, &y.k),
            (&x.v, &y.v),
            (&x.routing_keys, &y.routing_keys),
        ] {
            assert_eq!(
                pollster::block_on(b.read(p)).unwrap(),
                pollster::block_on(b.read(q)).unwrap()
            );
        }
    }
    let question = &strings("queries.json")[0];
    assert_eq!(
        msa.ask(&appended, question, &greedy(8)).unwrap(),
        msa.ask(&together, question, &greedy(8)).unwrap()
    );
}

/// `aux_loss_method: "INFONCE"` selects cosine routing: stored routing keys are unit vectors and every
/// document score is a mean of cosines, so it lies in [-1, 1].
#[test]
fn cosine_mode_normalises_routing_keys_and_bounds_scores() {
    let dir = tiny_with_config_edit("\"INFONCE_DECOUPLE\"", "\"INFONCE\"");
    let model = Model::load(dir.path(), CpuBackend::new()).unwrap();
    assert_eq!(
        model.config.msa.as_ref().unwrap().score_mode,
        ScoreMode::Cosine
    );
    let memory =
        pollster::block_on(model.encode_documents(&strings("memory.json"), |_| {})).unwrap();
    assert_eq!(memory.score_mode(), ScoreMode::Cosine);
    let b = &model.backend;
    let d = model.config.head_dim;
    for layer in memory.layers() {
        let keys = pollster::block_on(b.read(&layer.routing_keys)).unwrap();
        for (i, key) in keys.chunks_exact(d).enumerate() {
            let norm = key.iter().map(|x| x * x).sum::<f32>().sqrt();
            assert!(
                (norm - 1.0).abs() < 1e-5,
                "layer {} key {i}: norm {norm}",
                layer.layer
            );
        }
    }
    let question = &strings("queries.json")[0];
    let (session, _) = pollster::block_on(model.prefill_question(&memory, question)).unwrap();
    for routing in session.routing() {
        assert_eq!(routing.documents.len(), 3);
        for doc in &routing.documents {
            assert!(doc.score.abs() <= 1.0 + 1e-5, "{routing:?}");
        }
    }
}

#[test]
fn a_memory_from_another_model_is_refused() {
    let msa = Msa::load(fixture_dir("msa-tiny")).unwrap();
    let memory = msa.encode(&strings("memory.json")).unwrap();

    // The same weights with a different pooling size make a model whose memories are incompatible.
    let dir = tiny_with_config_edit("\"pooling_kernel_size\": 16", "\"pooling_kernel_size\": 8");
    let other = Msa::load(dir.path()).unwrap();
    let question = &strings("queries.json")[0];
    let err = other.ask(&memory, question, &greedy(4)).unwrap_err();
    assert!(matches!(err, msa::Error::MemoryMismatch { .. }), "{err}");
    assert!(err.to_string().contains("pooling_kernel_size: 16"), "{err}");
    let mut memory = memory;
    let err = other.add_documents(&mut memory, &["更多"]).unwrap_err();
    assert!(matches!(err, msa::Error::MemoryMismatch { .. }), "{err}");
    assert_eq!(memory.documents().len(), 8);
}

/// Dense generation through the facade equals the engine's dense prefill + greedy decode, and matches the
/// transformers greedy tokens when the prompt text tokenizes to the qwen3-tiny fixture's prompt ids.
#[test]
fn dense_generation_from_text_matches_transformers() {
    // qwen3-tiny ships no tokenizer; msa-tiny's toy tokenizer has the same 512-token vocabulary.
    let dir = copy_fixture("qwen3-tiny");
    std::fs::copy(
        fixture_dir("msa-tiny").join("tokenizer.json"),
        dir.path().join("tokenizer.json"),
    )
    .unwrap();
    let msa = Msa::load(dir.path()).unwrap();
    let golden = common::Golden::open("qwen3-tiny", "golden.safetensors");
    let inputs = common::Golden::open("qwen3-tiny", "inputs.safetensors");
    let tokenizer = msa.model().tokenizer.as_ref().unwrap();
    let prompt = tokenizer.decode(&inputs.ids("input_ids")).unwrap();
    assert_eq!(tokenizer.encode(&prompt).unwrap(), inputs.ids("input_ids"));

    let mut streamed = String::new();
    let answer = msa
        .generate_streaming(&prompt, &greedy(8), |_, piece| streamed.push_str(piece))
        .unwrap();
    assert_eq!(answer.tokens, golden.ids("generated_ids"));
    assert_eq!(streamed, answer.text);
    assert!(answer.routing.is_empty());

    // A dense model cannot build a memory, and says so.
    let memory_err = msa.encode(&["丽"]).unwrap_err();
    assert!(
        matches!(memory_err, msa::Error::NotAnMsaModel(_)),
        "{memory_err}"
    );
}
