//! The wgpu execution model on the msa-tiny fixture: ops record into one command encoder and are submitted
//! only when the host needs a value or has host work to overlap: a question's prefill submits twice per
//! router layer (the routing with its top-k readback, then the layer's projections, which run while the
//! host merges the selection and fetches pages) plus once for the first token's logits, and each greedy
//! decode step submits once, reads back one id and copies nothing but each layer's new k and v rows.

mod common;

use common::{fixture_dir, wgpu_backend};
use msa::engine::{Backend, Model};
use msa::{GenerateOptions, SamplingParams};

#[test]
fn prefill_submits_once_per_router_layer_and_decode_once_per_token() {
    let Some(gpu) = wgpu_backend() else { return };
    let model = Model::load(fixture_dir("msa-tiny"), gpu.clone()).unwrap();
    let read_json = |file: &str| -> Vec<String> {
        let text = std::fs::read_to_string(fixture_dir("msa-tiny").join(file)).unwrap();
        serde_json::from_str(&text).unwrap()
    };
    let (documents, questions) = (read_json("memory.json"), read_json("queries.json"));
    let memory = pollster::block_on(model.encode_documents(&documents, |_| {})).unwrap();
    let router_layers = model.config.msa.as_ref().unwrap().router_layers.len() as u64;

    let before = gpu.stats();
    let (session, logits) =
        pollster::block_on(model.prefill_question(&memory, &questions[0])).unwrap();
    let prefill = gpu.stats() - before;
    assert_eq!(prefill.submits, 2 * router_layers + 1, "{prefill:?}");
    assert_eq!(prefill.readbacks, router_layers + 1, "{prefill:?}");

    let options = GenerateOptions {
        max_tokens: 6,
        sampling: SamplingParams::greedy(),
        stop_tokens: Some(Vec::new()),
    };
    let mut generation = model.generation(session, logits, &options).unwrap();
    let before = gpu.stats();
    let tokens = pollster::block_on(generation.collect_tokens()).unwrap();
    let decode = gpu.stats() - before;
    let steps = tokens.len() as u64 - 1; // the first token comes from the prefill's logits
    assert_eq!(tokens.len(), 6);
    assert_eq!(
        (decode.submits, decode.readbacks),
        (steps, steps),
        "{decode:?}"
    );
    assert_eq!(
        decode.readback_bytes,
        steps * 8,
        "one (logit, id) pair per token"
    );
    // Each layer's new key and value row go into its context's spare rows: nothing else is copied.
    let layers = model.config.num_hidden_layers as u64;
    let row_bytes = (model.config.num_key_value_heads * model.config.head_dim * 4) as u64;
    assert_eq!(
        (decode.copies, decode.copied_bytes),
        (steps * 2 * layers, steps * 2 * layers * row_bytes),
        "{decode:?}"
    );
    let per_token = decode.dispatches / steps;
    // Per layer: q, k and v projections with the input norm fused in, per-head norm + RoPE for q and k,
    // attention, o_proj + residual, norm + gate/up + SwiGLU, down_proj + residual; then the embedding,
    // the final norm, the LM head and the argmax. Attention over more than one tile of keys (64) is
    // split, and its splits merged by one more dispatch: at most one per layer.
    assert!(
        (steps * (9 * layers + 4)..=steps * (10 * layers + 4)).contains(&decode.dispatches),
        "{decode:?}"
    );
    eprintln!(
        "{}: {per_token} dispatches, 1 submit, 8 bytes read back, {} device copies per decoded token",
        gpu.describe(),
        2 * layers
    );

    // The same tokens as the CPU reference.
    let cpu = Model::load(fixture_dir("msa-tiny"), msa::CpuBackend::new()).unwrap();
    let cpu_memory = pollster::block_on(cpu.encode_documents(&documents, |_| {})).unwrap();
    let cpu_tokens = pollster::block_on(async {
        let mut g = cpu.ask(&cpu_memory, &questions[0], &options).await?;
        g.collect_tokens().await
    })
    .unwrap();
    assert_eq!(tokens, cpu_tokens);
}
