//! The WASM build in a real browser (headless Chromium, WebGPU on SwiftShader): the bundled tiny model,
//! loaded through the JavaScript API from bytes, routes and generates exactly what the original
//! implementation recorded in the fixture's goldens (which the native engines match too).
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

fn golden_ids(name: &str) -> Vec<u64> {
    let golden = SafeTensors::deserialize(GOLDEN).unwrap();
    let tensor = golden.tensor(name).unwrap();
    assert_eq!(tensor.dtype(), Dtype::I64, "{name}");
    tensor
        .data()
        .chunks_exact(8)
        .map(|b| i64::from_le_bytes(b.try_into().unwrap()) as u64)
        .collect()
}

async fn resolve(promise: js_sys::Promise) -> JsValue {
    match JsFuture::from(promise).await {
        Ok(value) => value,
        Err(e) => panic!("{e:?}"),
    }
}

fn json(value: &JsValue) -> Value {
    let text = js_sys::JSON::stringify(value).unwrap();
    serde_json::from_str(&String::from(text)).unwrap()
}

#[wasm_bindgen_test]
async fn the_tiny_model_routes_and_generates_like_the_reference() {
    let engine = resolve(MsaEngine::load(
        CONFIG.into(),
        WEIGHTS.to_vec(),
        TOKENIZER.into(),
    ))
    .await;
    let engine: MsaEngine = wasm_bindgen::convert::TryFromJsValue::try_from_js_value(engine)
        .unwrap_or_else(|_| panic!("load resolves to an engine"));
    let documents: Vec<String> = serde_json::from_str(MEMORY).unwrap();
    let count = resolve(engine.add_documents(documents, None)).await;
    assert_eq!(count.as_f64(), Some(8.0));

    let queries: Vec<String> = serde_json::from_str(QUERIES).unwrap();
    for (q, question) in queries.iter().enumerate() {
        let options = js_sys::JSON::parse(r#"{"maxTokens": 8}"#).unwrap();
        let answer = json(&resolve(engine.ask(question.clone(), options, None)).await);
        for (slot, layer) in [2, 3].into_iter().enumerate() {
            let routed: Vec<u64> = answer["routing"][slot]["documents"]
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
    let stats = json(&engine.stats().unwrap());
    assert_eq!(stats["documents"], 8);
}
