//! Golden parity with the original MSA implementation on `tests/fixtures/msa-tiny` (MSA-SPEC §8):
//! prompt token ids, the stage-1 memory (pooled K̄, V̄, K̄r and the template prefix), per-router-layer
//! routing (router queries, document scores, selected documents as sets), the assembled attention
//! context, hidden states and logits of the stage-2 prefill, every decode step, and greedy tokens.

mod common;

use common::{Deviations, Golden, fixture_dir, swap_leading};
use msa::engine::{Backend, CpuBackend, Memory, Model, Trace};
use msa::{GenerateOptions, SamplingParams};

const FIXTURE: &str = "msa-tiny";
// Tolerances from the fixture notes: pooled tensors ~1e-4, logits ~1e-3; ids exact.
const POOLED_ATOL: f32 = 1e-4;
const HIDDEN_ATOL: f32 = 1e-4;
// The fixture notes allow ~1e-3; measured deviations are ~5e-6, so hold the engine 10x tighter.
const LOGITS_ATOL: f32 = 1e-4;

fn read<B: Backend>(b: &B, t: &B::Tensor) -> Vec<f32> {
    pollster::block_on(b.read(t)).unwrap()
}

fn load<B: Backend>(backend: B) -> Model<B> {
    Model::load(fixture_dir(FIXTURE), backend).expect("msa-tiny loads")
}

fn documents() -> Vec<String> {
    let text = std::fs::read_to_string(fixture_dir(FIXTURE).join("memory.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn queries() -> Vec<String> {
    let text = std::fs::read_to_string(fixture_dir(FIXTURE).join("queries.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn encode<B: Backend>(model: &Model<B>) -> Memory<B> {
    pollster::block_on(model.encode_documents(&documents(), |_| {})).expect("memory encodes")
}

#[test]
fn prompt_construction_matches_reference_token_ids() {
    let model = load(CpuBackend::new());
    let tokenizer = model.tokenizer.as_ref().unwrap();
    let inputs = Golden::open(FIXTURE, "inputs.safetensors");

    let doc_ids = inputs.ids("doc_token_ids");
    let offsets = inputs.ids("doc_token_offsets");
    for (i, text) in documents().iter().enumerate() {
        let ours = tokenizer.document_ids(i, text).unwrap();
        let golden = &doc_ids[offsets[i] as usize..offsets[i + 1] as usize];
        assert_eq!(ours, golden, "document {i}");
    }
    let stage1 = inputs.ids("stage1_block0_input_ids");
    assert_eq!(tokenizer.template_head_ids().unwrap(), stage1[..3]);

    let golden = Golden::open(FIXTURE, "golden.safetensors");
    for (q, question) in queries().iter().enumerate() {
        let prompt = tokenizer.question_prompt(question).unwrap();
        assert_eq!(
            prompt.ids,
            inputs.ids(&format!("q{q}_input_ids")),
            "query {q}"
        );
        let mask: Vec<u32> = golden.ids(&format!("q{q}_router_query_mask_layer2"));
        let ours: Vec<u32> = (0..prompt.ids.len() as u32)
            .map(|i| prompt.routing_positions().contains(&i) as u32)
            .collect();
        assert_eq!(ours, mask, "routing mask of query {q}");
    }
}

fn stage1_memory_matches_reference<B: Backend>(backend: B) {
    let model = load(backend);
    let memory = encode(&model);
    let b = &model.backend;
    let golden = Golden::open(FIXTURE, "golden.safetensors");
    let mut dev = Deviations::default();

    // Chunk → document table.
    let chunk_doc = golden.ids("mem_chunk_doc");
    let ours: Vec<u32> = memory
        .documents()
        .iter()
        .flat_map(|d| d.chunks.clone().map(move |_| d.id as u32))
        .collect();
    assert_eq!(ours, chunk_doc, "chunk → document table");
    let inputs = Golden::open(FIXTURE, "inputs.safetensors");
    let chunks_per_doc: Vec<u32> = memory
        .documents()
        .iter()
        .map(|d| d.chunks.len() as u32)
        .collect();
    assert_eq!(chunks_per_doc, inputs.ids("doc_num_chunks"));

    for layer in [2, 3] {
        let pooled = memory.layer(layer).expect("router layer");
        for (name, tensor) in [
            ("k", &pooled.k),
            ("v", &pooled.v),
            ("rk", &pooled.routing_keys),
        ] {
            let (shape, values) = golden.f32(&format!("mem_{name}_layer{layer}"));
            let expected = swap_leading(&values, shape[0], shape[1], shape[2]);
            assert_eq!(b.shape(tensor), [shape[1], shape[0], shape[2]]);
            dev.check(
                &format!("mem_{name}_layer{layer}"),
                &read(b, tensor),
                &expected,
                POOLED_ATOL,
            );
        }
    }
    for layer in 0..4 {
        let (k, v) = memory.template(layer);
        for (name, tensor) in [("k", k), ("v", v)] {
            let (shape, values) = golden.f32(&format!("template_{name}_layer{layer}"));
            let expected = swap_leading(&values, shape[0], shape[1], shape[2]);
            dev.check(
                &format!("template_{name}_layer{layer}"),
                &read(b, tensor),
                &expected,
                POOLED_ATOL,
            );
        }
    }
    dev.print(&format!("msa-tiny stage 1 on {}", model.backend.describe()));
}

/// In the packed stage-1 block every document (and the template head) attends only to itself at positions
/// 0..n, so each segment's hidden states equal a plain causal forward over that segment alone.
fn stage1_hidden_states_match_reference<B: Backend>(backend: B) {
    let model = load(backend);
    let b = &model.backend;
    let inputs = Golden::open(FIXTURE, "inputs.safetensors");
    let golden = Golden::open(FIXTURE, "golden.safetensors");
    let ids = inputs.ids("stage1_block0_input_ids");
    let doc_ids = inputs.ids("stage1_block0_doc_ids");
    let positions = inputs.ids("stage1_block0_position_ids");
    let hidden = model.config.hidden_size;
    let mut dev = Deviations::default();

    // Segments of the packed block: runs of equal doc id, each starting at position 0.
    let mut segments = Vec::new();
    let mut start = 0;
    for i in 1..=ids.len() {
        if i == ids.len() || doc_ids[i] != doc_ids[start] {
            assert_eq!(positions[start], 0, "segment at {start} restarts positions");
            segments.push(start..i);
            start = i;
        }
    }
    assert_eq!(
        segments.len(),
        1 + documents().len(),
        "template + documents"
    );

    let mut per_layer = vec![Vec::new(); model.config.num_hidden_layers];
    for segment in &segments {
        let mut trace = Trace::default();
        pollster::block_on(model.prefill_dense(&ids[segment.clone()], Some(&mut trace))).unwrap();
        for (layer, out) in per_layer.iter_mut().enumerate() {
            out.extend(read(b, &trace.hidden[layer]));
        }
    }
    for (layer, ours) in per_layer.iter().enumerate() {
        let name = format!("stage1_hidden_layer{layer}");
        let (shape, want) = golden.f32(&name);
        assert_eq!(shape, [ids.len(), hidden]);
        dev.check(&name, ours, &want, HIDDEN_ATOL);
    }
    dev.print(&format!(
        "msa-tiny stage 1 hidden states on {}",
        model.backend.describe()
    ));
}

fn stage2_routing_context_and_logits_match_reference<B: Backend>(backend: B) {
    let model = load(backend);
    let memory = encode(&model);
    let b = &model.backend;
    let tokenizer = model.tokenizer.as_ref().unwrap();
    let golden = Golden::open(FIXTURE, "golden.safetensors");
    let (heads, d) = (model.config.num_attention_heads, model.config.head_dim);
    let mut dev = Deviations::default();

    for (q, question) in queries().iter().enumerate() {
        let prompt = tokenizer.question_prompt(question).unwrap();
        let n = prompt.ids.len();
        let mut trace = Trace::default();
        let (session, last_logits) =
            pollster::block_on(model.prefill_query(&memory, &prompt, Some(&mut trace))).unwrap();

        // Routing: the selected set of every router layer, scores, and chunk counts.
        for (slot, layer) in [2usize, 3].into_iter().enumerate() {
            let routed = &session.routing()[slot];
            assert_eq!(routed.layer, layer);
            let mut ours: Vec<u32> = routed.documents.iter().map(|d| d.id as u32).collect();
            let mut want = golden.ids(&format!("q{q}_router_topk_doc_ids_layer{layer}"));
            assert_eq!(ours, want, "query {q} layer {layer}: selection order");
            ours.sort_unstable();
            want.sort_unstable();
            assert_eq!(ours, want, "query {q} layer {layer}: selected set");
            let chunks = golden.ids(&format!("q{q}_router_num_selected_chunks_layer{layer}"));
            assert_eq!(
                routed.chunks as u32, chunks[0],
                "query {q} layer {layer}: chunks"
            );

            let (_, scores) = golden.f32(&format!("q{q}_router_topk_scores_layer{layer}"));
            let ours: Vec<f32> = routed.documents.iter().map(|d| d.score).collect();
            dev.check(
                &format!("q{q}_router_topk_scores_layer{layer}"),
                &ours,
                &scores,
                HIDDEN_ATOL,
            );

            let (l, doc_scores) = &trace.document_scores[slot];
            assert_eq!(*l, layer);
            let (_, want) = golden.f32(&format!("q{q}_router_doc_scores_layer{layer}"));
            dev.check(
                &format!("q{q}_router_doc_scores_layer{layer}"),
                &read(b, doc_scores),
                &want,
                HIDDEN_ATOL,
            );

            let (_, queries) = &trace.router_queries[slot];
            let (_, want) = golden.f32(&format!("q{q}_router_query_layer{layer}"));
            let want = swap_leading(&want, heads, n, d);
            dev.check(
                &format!("q{q}_router_query_layer{layer}"),
                &read(b, queries),
                &want,
                HIDDEN_ATOL,
            );
        }

        // The selected chunks inside the router layers' context: [template(3) | chunks | prompt].
        for (slot, layer) in [2usize, 3].into_iter().enumerate() {
            let chunks = session.routing()[slot].chunks;
            let (k, v) = &trace.context[layer];
            for (name, tensor) in [("k", k), ("v", v)] {
                let (shape, values) = golden.f32(&format!("q{q}_selected_{name}_layer{layer}"));
                assert_eq!(shape[1], chunks);
                let expected = swap_leading(&values, shape[0], shape[1], shape[2]);
                let ours = read(b, &b.rows(tensor, 3..3 + chunks).unwrap());
                dev.check(
                    &format!("q{q}_selected_{name}_layer{layer}"),
                    &ours,
                    &expected,
                    POOLED_ATOL,
                );
            }
        }

        // The assembled context [template | selected chunks | prompt] of every layer.
        for layer in 0..4 {
            let (k, v) = &trace.context[layer];
            for (name, tensor) in [("k", k), ("v", v)] {
                let (shape, values) = golden.f32(&format!("q{q}_context_{name}_layer{layer}"));
                let expected = swap_leading(&values, shape[1], shape[2], shape[3]);
                dev.check(
                    &format!("q{q}_context_{name}_layer{layer}"),
                    &read(b, tensor),
                    &expected,
                    HIDDEN_ATOL,
                );
            }
        }

        let embed = trace.embeddings.as_ref().unwrap();
        dev.check(
            &format!("q{q}_hidden_embed"),
            &read(b, embed),
            &golden.f32(&format!("q{q}_hidden_embed")).1,
            0.0,
        );
        for layer in 0..4 {
            let name = format!("q{q}_hidden_layer{layer}");
            dev.check(
                &name,
                &read(b, &trace.hidden[layer]),
                &golden.f32(&name).1,
                HIDDEN_ATOL,
            );
        }
        let name = format!("q{q}_hidden_final_norm");
        dev.check(
            &name,
            &read(b, trace.final_norm.as_ref().unwrap()),
            &golden.f32(&name).1,
            HIDDEN_ATOL,
        );
        let name = format!("q{q}_logits_prefill");
        dev.check(
            &name,
            &read(b, trace.logits.as_ref().unwrap()),
            &golden.f32(&name).1,
            LOGITS_ATOL,
        );
        let name = format!("q{q}_logits_last");
        dev.check(&name, &last_logits, &golden.f32(&name).1, LOGITS_ATOL);
    }
    dev.print(&format!("msa-tiny stage 2 on {}", model.backend.describe()));
}

fn stage3_decode_logits_positions_and_greedy_tokens_match_reference<B: Backend>(backend: B) {
    let model = load(backend);
    let memory = encode(&model);
    let golden = Golden::open(FIXTURE, "golden.safetensors");
    let mut dev = Deviations::default();

    for (q, question) in queries().iter().enumerate() {
        // Decode path, fed the reference's tokens: logits and positions of every call.
        let (mut session, _) =
            pollster::block_on(model.prefill_question(&memory, question)).unwrap();
        let inputs = golden.ids(&format!("q{q}_decode_input_ids"));
        let positions = golden.ids(&format!("q{q}_decode_position_ids"));
        let (shape, logits) = golden.f32(&format!("q{q}_logits_decode"));
        let vocab = shape[2];
        for (step, (&token, &position)) in inputs.iter().zip(&positions).enumerate() {
            assert_eq!(
                session.next_position(),
                position,
                "query {q} decode step {step}: position"
            );
            let ours = pollster::block_on(session.decode(token)).unwrap();
            dev.check(
                &format!("q{q}_logits_decode[{step}]"),
                &ours,
                &logits[step * vocab..(step + 1) * vocab],
                LOGITS_ATOL,
            );
        }

        // Greedy generation end to end from the question text.
        let options = GenerateOptions {
            max_tokens: 8,
            sampling: SamplingParams::greedy(),
            stop_tokens: None,
        };
        let tokens = pollster::block_on(async {
            let mut generation = model.ask(&memory, question, &options).await?;
            generation.collect_tokens().await
        })
        .unwrap();
        assert_eq!(
            tokens,
            golden.ids(&format!("q{q}_generated_ids")),
            "query {q}: greedy tokens"
        );
        let prompt = model
            .tokenizer
            .as_ref()
            .unwrap()
            .question_prompt(question)
            .unwrap();
        let sequence: Vec<u32> = prompt.ids.iter().chain(&tokens).copied().collect();
        assert_eq!(
            sequence,
            golden.ids(&format!("q{q}_returned_sequence")),
            "query {q}: prompt + generation"
        );
    }
    dev.print(&format!("msa-tiny stage 3 on {}", model.backend.describe()));
}

on_every_backend!(
    stage1_memory_matches_reference,
    stage1_hidden_states_match_reference,
    stage2_routing_context_and_logits_match_reference,
    stage3_decode_logits_positions_and_greedy_tokens_match_reference,
);

// Traces of whole documents hold every position's logits, past the small limits: not run there.
on_wgpu_with_small_limits!(
    stage1_memory_matches_reference,
    stage2_routing_context_and_logits_match_reference,
    stage3_decode_logits_positions_and_greedy_tokens_match_reference,
);
