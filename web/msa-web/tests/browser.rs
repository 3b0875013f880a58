//! The WASM build in a real browser (headless Chromium, WebGPU on SwiftShader): the bundled tiny model,
//! loaded through the JavaScript API from bytes, routes, scores and generates what the original
//! implementation recorded in the fixture's goldens (which the native engines match too), with the
//! adapter's limits and with limits cut so that weights are split across buffers; limits too small
//! for the model and a lost device are clear errors.
//!
//! Run by `cargo xtask test` (`xtask/src/web.rs`), or alone with `CHROMEDRIVER=chromedriver cargo test
//! --profile wasm --target wasm32-unknown-unknown -p msa-web`: `wasm-bindgen-test-runner` drives
//! Chromium through chromedriver with the flags in `webdriver.json`.
#![cfg(target_arch = "wasm32")]

use msa_web::MsaEngine;
use safetensors::{Dtype, SafeTensors};
use serde_json::Value;
use wasm_bindgen::JsValue;
use wasm_bindgen_futures::JsFuture;
use wasm_bindgen_test::{wasm_bindgen_test, wasm_bindgen_test_configure};

wasm_bindgen_test_configure!(run_in_browser);

const CONFIG: &str = include_str!("../../../tests/fixtures/msa-tiny/config.json");
const TOKENIZER: &str = include_str!("../../../tests/fixtures/msa-tiny/tokenizer.json");
const WEIGHTS: &[u8] = include_bytes!("../../../tests/fixtures/msa-tiny/model.safetensors");
const GOLDEN: &[u8] = include_bytes!("../../../tests/fixtures/msa-tiny/golden.safetensors");
const MEMORY: &str = include_str!("../../../tests/fixtures/msa-tiny/memory.json");
const QUERIES: &str = include_str!("../../../tests/fixtures/msa-tiny/queries.json");

fn golden(name: &str) -> (Dtype, Vec<u8>) {
    let golden = SafeTensors::deserialize(GOLDEN).unwrap();
    let tensor = golden.tensor(name).unwrap();
    (tensor.dtype(), tensor.data().to_vec())
}

fn golden_ids(name: &str) -> Vec<u64> {
    let (dtype, data) = golden(name);
    assert_eq!(dtype, Dtype::I64, "{name}");
    data.chunks_exact(8)
        .map(|b| i64::from_le_bytes(b.try_into().unwrap()) as u64)
        .collect()
}

fn golden_f32(name: &str) -> Vec<f32> {
    let (dtype, data) = golden(name);
    assert_eq!(dtype, Dtype::F32, "{name}");
    data.chunks_exact(4)
        .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
        .collect()
}

/// The golden parity tests' tolerance for routing scores.
const SCORE_ATOL: f64 = 1e-4;

async fn resolve(promise: js_sys::Promise) -> JsValue {
    match JsFuture::from(promise).await {
        Ok(value) => value,
        Err(e) => panic!("{e:?}"),
    }
}

/// The message a promise rejects with (it must reject).
async fn rejection(promise: js_sys::Promise) -> String {
    match JsFuture::from(promise).await {
        Ok(value) => panic!("expected a rejection, got {value:?}"),
        Err(e) => js_sys::Error::from(e).message().into(),
    }
}

fn json(value: &JsValue) -> Value {
    let text = js_sys::JSON::stringify(value).unwrap();
    serde_json::from_str(&String::from(text)).unwrap()
}

fn js(text: &str) -> JsValue {
    js_sys::JSON::parse(text).unwrap()
}

async fn load(limits: JsValue) -> MsaEngine {
    load_on(limits, JsValue::UNDEFINED).await
}

/// Loads with `adapter` as WebGPU's `GPUAdapterInfo` would name it.
async fn load_on(limits: JsValue, adapter: JsValue) -> MsaEngine {
    let engine = resolve(MsaEngine::load(
        CONFIG.into(),
        WEIGHTS.to_vec(),
        TOKENIZER.into(),
        limits,
        adapter,
    ))
    .await;
    wasm_bindgen::convert::TryFromJsValue::try_from_js_value(engine)
        .unwrap_or_else(|_| panic!("load resolves to an engine"))
}

async fn add_fixture_documents(engine: &MsaEngine) {
    let documents: Vec<String> = serde_json::from_str(MEMORY).unwrap();
    let count = resolve(engine.add_documents(documents, None)).await;
    assert_eq!(count.as_f64(), Some(8.0));
}

fn numbers(value: &Value) -> Vec<f64> {
    value
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap())
        .collect()
}

/// Both fixture queries: routed documents in order, every document's score and the greedy tokens.
async fn assert_answers_like_the_reference(engine: &MsaEngine) {
    let queries: Vec<String> = serde_json::from_str(QUERIES).unwrap();
    for (q, question) in queries.iter().enumerate() {
        let answer =
            json(&resolve(engine.ask(question.clone(), js(r#"{"maxTokens": 8}"#), None)).await);
        for (slot, layer) in [2, 3].into_iter().enumerate() {
            let routing = &answer["routing"][slot];
            let routed: Vec<u64> = routing["documents"]
                .as_array()
                .unwrap()
                .iter()
                .map(|d| d["id"].as_u64().unwrap())
                .collect();
            assert_eq!(
                routed,
                golden_ids(&format!("q{q}_router_topk_doc_ids_layer{layer}")),
                "query {q} layer {layer}"
            );
            let scores = numbers(&routing["scores"]);
            let want = golden_f32(&format!("q{q}_router_doc_scores_layer{layer}"));
            assert_eq!(scores.len(), want.len(), "query {q} layer {layer}: scores");
            for (id, (ours, want)) in scores.iter().zip(&want).enumerate() {
                assert!(
                    (ours - f64::from(*want)).abs() <= SCORE_ATOL,
                    "query {q} layer {layer} document {id}: score {ours}, reference {want}"
                );
            }
        }
        let tokens: Vec<u64> = answer["tokens"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t.as_u64().unwrap())
            .collect();
        assert_eq!(
            tokens,
            golden_ids(&format!("q{q}_generated_ids")),
            "query {q}"
        );
    }
}

#[wasm_bindgen_test]
async fn the_tiny_model_routes_and_generates_like_the_reference() {
    let engine = load(JsValue::UNDEFINED).await;
    add_fixture_documents(&engine).await;
    assert_answers_like_the_reference(&engine).await;
    let stats = json(&engine.stats().unwrap());
    assert_eq!(stats["documents"], 8);
}

#[wasm_bindgen_test]
async fn a_gpu_vendors_kernel_variants_answer_the_same() {
    // What a browser on an NVIDIA GPU would report; SwiftShader then runs the GPU variants (projection
    // tiles split 64 ways, the tiled GEMM, one routing chunk per invocation).
    let engine = load_on(
        JsValue::UNDEFINED,
        js(r#"{"vendor": "nvidia", "architecture": "ampere"}"#),
    )
    .await;
    let stats = json(&engine.stats().unwrap());
    let variants = stats["variants"].as_str().unwrap();
    assert!(variants.contains("split 64, tiled GEMM"), "{variants}");
    add_fixture_documents(&engine).await;
    assert_answers_like_the_reference(&engine).await;
    // Without a vendor the adapter type decides: SwiftShader is a CPU.
    let engine = load(JsValue::UNDEFINED).await;
    let variants = json(&engine.stats().unwrap())["variants"].clone();
    assert!(
        variants.as_str().unwrap().contains("split 1,"),
        "{variants}"
    );
}

#[wasm_bindgen_test]
async fn weights_past_the_buffer_limit_are_split_and_answer_the_same() {
    // The tiny model's 128 KiB embedding against 112 KiB buffers and 104 KiB bindings, as MSA-4B's
    // 778 MB embedding against WebGPU's default 256 MiB / 128 MiB.
    let engine = load(js(
        r#"{"maxBufferSize": 114688, "maxStorageBufferBindingSize": 106496}"#,
    ))
    .await;
    let stats = json(&engine.stats().unwrap());
    assert_eq!(stats["limits"]["maxBufferSize"], 114688);
    assert_eq!(stats["limits"]["maxStorageBufferBindingSize"], 106496);
    add_fixture_documents(&engine).await;
    assert_answers_like_the_reference(&engine).await;
}

#[wasm_bindgen_test]
async fn a_model_past_the_device_limits_is_refused_naming_the_limit() {
    // A 64-element f32 embedding row is 256 bytes; a 256-byte binding cannot hold it past alignment.
    let message = rejection(MsaEngine::load(
        CONFIG.into(),
        WEIGHTS.to_vec(),
        TOKENIZER.into(),
        js(r#"{"maxStorageBufferBindingSize": 256}"#),
        JsValue::UNDEFINED,
    ))
    .await;
    for part in [
        "exceeds this device's buffer limits",
        "maxStorageBufferBindingSize 256",
    ] {
        assert!(message.contains(part), "{part:?} missing from: {message}");
    }
}

#[wasm_bindgen_test]
async fn a_lost_device_fails_every_later_call_clearly() {
    let engine = load(JsValue::UNDEFINED).await;
    add_fixture_documents(&engine).await;
    engine.destroy();
    // The tiny tokenizer knows only the fixture's words.
    let queries: Vec<String> = serde_json::from_str(QUERIES).unwrap();
    let documents: Vec<String> = serde_json::from_str(MEMORY).unwrap();
    let message = rejection(engine.ask(queries[0].clone(), js(r#"{"maxTokens": 2}"#), None)).await;
    assert!(message.contains("device was lost"), "{message}");
    let message = rejection(engine.add_documents(documents[..1].to_vec(), None)).await;
    assert!(message.contains("device was lost"), "{message}");
}
