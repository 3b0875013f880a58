//! Golden parity with Hugging Face `Qwen3ForCausalLM` on `tests/fixtures/qwen3-tiny`: dense prefill
//! (embeddings, every layer's output, final norm, logits at every position), the logits of every
//! KV-cached decode step, the logits of one full forward over prompt + generation, and greedy tokens.

mod common;

use common::{Deviations, Golden, fixture_dir};
use msa::engine::{Backend, Model, Trace};
use msa::{GenerateOptions, SamplingParams};

const FIXTURE: &str = "qwen3-tiny";
const HIDDEN_ATOL: f32 = 1e-4;
const LOGITS_ATOL: f32 = 1e-4;

fn read<B: Backend>(b: &B, t: &B::Tensor) -> Vec<f32> {
    pollster::block_on(b.read(t)).unwrap()
}

fn dense_qwen3_matches_transformers<B: Backend>(backend: B) {
    let model = Model::load(fixture_dir(FIXTURE), backend).expect("qwen3-tiny loads");
    assert!(model.config.msa.is_none() && !model.config.tie_word_embeddings);
    let b = &model.backend;
    let inputs = Golden::open(FIXTURE, "inputs.safetensors");
    let golden = Golden::open(FIXTURE, "golden.safetensors");
    let prompt = inputs.ids("input_ids");
    let mut dev = Deviations::default();

    let mut trace = Trace::default();
    let (session, last) =
        pollster::block_on(model.prefill_dense(&prompt, Some(&mut trace))).unwrap();
    dev.check(
        "hidden_embed",
        &read(b, trace.embeddings.as_ref().unwrap()),
        &golden.f32("hidden_embed").1,
        0.0,
    );
    for layer in 0..4 {
        let name = format!("hidden_layer{layer}");
        dev.check(
            &name,
            &read(b, &trace.hidden[layer]),
            &golden.f32(&name).1,
            HIDDEN_ATOL,
        );
    }
    dev.check(
        "hidden_final_norm",
        &read(b, trace.final_norm.as_ref().unwrap()),
        &golden.f32("hidden_final_norm").1,
        HIDDEN_ATOL,
    );
    dev.check(
        "logits",
        &read(b, trace.logits.as_ref().unwrap()),
        &golden.f32("logits").1,
        LOGITS_ATOL,
    );

    // KV-cached decoding: logits row s picks generated token s.
    let generated = golden.ids("generated_ids");
    let (shape, decode_logits) = golden.f32("logits_decode");
    let vocab = shape[1];
    let options = GenerateOptions {
        max_tokens: generated.len(),
        sampling: SamplingParams::greedy(),
        stop_tokens: None,
    };
    dev.check(
        "logits_decode[0]",
        &last,
        &decode_logits[..vocab],
        LOGITS_ATOL,
    );
    let mut generation = model.generation(session, last, &options).unwrap();
    let tokens = pollster::block_on(generation.collect_tokens()).unwrap();
    assert_eq!(tokens, generated, "greedy tokens");

    let (mut session, _) = pollster::block_on(model.prefill_dense(&prompt, None)).unwrap();
    for (step, &token) in generated.iter().enumerate().take(generated.len() - 1) {
        let logits = pollster::block_on(session.decode(token)).unwrap();
        let s = step + 1;
        dev.check(
            &format!("logits_decode[{s}]"),
            &logits,
            &decode_logits[s * vocab..(s + 1) * vocab],
            LOGITS_ATOL,
        );
    }

    // One uncached forward over the whole sequence agrees too.
    let full: Vec<u32> = prompt.iter().chain(&generated).copied().collect();
    let mut trace = Trace::default();
    pollster::block_on(model.prefill_dense(&full, Some(&mut trace))).unwrap();
    dev.check(
        "logits_full_sequence",
        &read(b, trace.logits.as_ref().unwrap()),
        &golden.f32("logits_full_sequence").1,
        LOGITS_ATOL,
    );
    dev.print(&format!("qwen3-tiny on {}", model.backend.describe()));
}

on_every_backend!(dense_qwen3_matches_transformers);
