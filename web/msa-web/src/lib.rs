//! msa-web: the MSA engine compiled to WebAssembly. Every op runs as a WGSL compute shader on the
//! browser's WebGPU adapter through wgpu, the same kernels as the native build. Nothing blocks and no
//! thread or file system is needed: the model comes in as bytes (from `fetch` or a picked file), and
//! every call returns a Promise.
//!
//! ```js
//! import init, { MsaEngine } from "./pkg/msa_web.js";
//! await init();
//! const msa = await MsaEngine.load(configText, new Uint8Array(weights), tokenizerText);
//! await msa.addDocuments(["first document", "second document"], (p) => console.log(p));
//! const answer = await msa.ask("a question", 32, (event) => console.log(event));
//! ```
#![cfg(target_arch = "wasm32")]

use std::cell::RefCell;
use std::rc::Rc;

use js_sys::{Function, Promise};
use msa_core::{Checkpoint, ModelConfig, MsaTokenizer, SamplingParams, TextStream};
use msa_engine::{EncodeProgress, FinishReason, GenerateOptions, LayerRouting, Memory, Model};
use msa_wgpu::{DeviceOptions, WgpuBackend, WgpuError};
use serde_json::{Value, json};
use wasm_bindgen::prelude::*;
use wasm_bindgen_futures::future_to_promise;

/// A model on the browser's GPU and the memory its documents were encoded into.
struct State {
    model: Model<WgpuBackend>,
    memory: RefCell<Option<Memory<WgpuBackend>>>,
}

/// The engine, as JavaScript sees it.
#[wasm_bindgen]
pub struct MsaEngine {
    state: Rc<State>,
}

fn error(e: impl std::fmt::Display) -> JsValue {
    JsError::new(&e.to_string()).into()
}

/// A JSON value as a JavaScript object.
fn to_js(value: &Value) -> Result<JsValue, JsValue> {
    js_sys::JSON::parse(&value.to_string())
}

/// Calls a JavaScript callback with one JSON argument; a callback that throws stops the work.
fn call(callback: &Function, value: &Value) -> Result<(), JsValue> {
    callback.call1(&JsValue::NULL, &to_js(value)?).map(|_| ())
}

fn routing_json(routing: &[LayerRouting]) -> Value {
    routing
        .iter()
        .map(|layer| {
            json!({
                "layer": layer.layer,
                "chunks": layer.chunks,
                "documents": layer.documents.iter()
                    .map(|d| json!({"id": d.id, "score": d.score}))
                    .collect::<Vec<_>>(),
            })
        })
        .collect()
}

#[wasm_bindgen]
impl MsaEngine {
    /// Loads a model onto the browser's WebGPU adapter: `config` is the text of `config.json`,
    /// `weights` the bytes of a `.safetensors` file, `tokenizer` the text of `tokenizer.json`.
    pub fn load(config: String, weights: Vec<u8>, tokenizer: String) -> Promise {
        future_to_promise(async move {
            let gpu = WgpuBackend::new(DeviceOptions::default())
                .await
                .map_err(|e| match e {
                    WgpuError::NoAdapter { .. } => error(
                        "WebGPU unavailable: this browser offers no WebGPU adapter. Use a browser \
                         with WebGPU (a recent Chrome, Edge, Firefox or Safari) on a secure (https \
                         or localhost) page.",
                    ),
                    e => error(format!("WebGPU unavailable: {e}")),
                })?;
            let config = ModelConfig::from_json_str(&config, "config.json").map_err(error)?;
            let checkpoint = Checkpoint::from_bytes(vec![("model.safetensors".into(), weights)])
                .map_err(error)?;
            let tokenizer =
                MsaTokenizer::from_bytes(tokenizer.as_bytes(), "tokenizer.json").map_err(error)?;
            let model =
                Model::from_parts(config, &checkpoint, Some(tokenizer), gpu).map_err(error)?;
            let state = Rc::new(State {
                model,
                memory: RefCell::new(None),
            });
            Ok(MsaEngine { state }.into())
        })
    }

    /// Encodes documents into the memory (ids continue after the ones already there), calling
    /// `on_progress({documentsDone, documentsTotal, tokensDone, tokensTotal})` as it goes.
    #[wasm_bindgen(js_name = addDocuments)]
    // The memory stays borrowed across the encoding's awaits on purpose: a concurrent call finds it
    // taken and gets an error instead of seeing a half-updated memory.
    #[allow(clippy::await_holding_refcell_ref)]
    pub fn add_documents(&self, texts: Vec<String>, on_progress: Option<Function>) -> Promise {
        let state = Rc::clone(&self.state);
        future_to_promise(async move {
            let mut memory = state
                .memory
                .try_borrow_mut()
                .map_err(|_| error("the memory is in use by another call"))?;
            let mut failed = None;
            let progress = |p: EncodeProgress| {
                if let (Some(callback), None) = (&on_progress, &failed) {
                    let value = json!({
                        "documentsDone": p.documents_done,
                        "documentsTotal": p.documents_total,
                        "tokensDone": p.tokens_done,
                        "tokensTotal": p.tokens_total,
                    });
                    failed = call(callback, &value).err();
                }
            };
            let model = &state.model;
            match memory.as_mut() {
                Some(memory) => model.add_documents(memory, &texts, progress).await,
                None => model
                    .encode_documents(&texts, progress)
                    .await
                    .map(|m| *memory = Some(m)),
            }
            .map_err(error)?;
            if let Some(thrown) = failed {
                return Err(thrown);
            }
            let documents = memory.as_ref().map_or(0, |m| m.documents().len());
            Ok(JsValue::from(documents as u32))
        })
    }

    /// Answers a question from the memory with greedy decoding of up to `max_tokens` tokens. Calls
    /// `on_event` with `{type: "routing", layers}` after the prefill and `{type: "token", id, text}`
    /// for every token; resolves to `{tokens, text, routing, finishReason}`.
    #[allow(clippy::await_holding_refcell_ref)] // as in `add_documents`
    pub fn ask(&self, question: String, max_tokens: u32, on_event: Option<Function>) -> Promise {
        let state = Rc::clone(&self.state);
        future_to_promise(async move {
            let memory = state
                .memory
                .try_borrow()
                .map_err(|_| error("the memory is being changed by another call"))?;
            let memory = memory
                .as_ref()
                .ok_or_else(|| error("the memory holds no documents; add documents first"))?;
            let emit = |value: Value| match &on_event {
                Some(callback) => call(callback, &value),
                None => Ok(()),
            };
            let model = &state.model;
            let options = GenerateOptions {
                max_tokens: max_tokens as usize,
                sampling: SamplingParams::greedy(),
                stop_tokens: None,
            };
            let mut generation = model
                .ask(memory, &question, &options)
                .await
                .map_err(error)?;
            let routing = routing_json(generation.routing());
            emit(json!({"type": "routing", "layers": routing}))?;
            let tokenizer = model.require_tokenizer().map_err(error)?;
            let mut stream = TextStream::new(tokenizer);
            let mut tokens = Vec::new();
            while let Some(token) = generation.next_token().await.map_err(error)? {
                tokens.push(token);
                let text = stream.push(token).map_err(error)?;
                emit(json!({"type": "token", "id": token, "text": text}))?;
            }
            let finish = match generation.finish_reason() {
                Some(FinishReason::Stop) => "stop",
                Some(FinishReason::Length) => "length",
                _ => "error",
            };
            to_js(&json!({
                "tokens": tokens,
                "text": tokenizer.decode(&tokens).map_err(error)?,
                "routing": routing,
                "finishReason": finish,
            }))
        })
    }

    /// `{documents, chunks, adapter}`.
    pub fn stats(&self) -> Result<JsValue, JsValue> {
        let memory = self.state.memory.try_borrow().map_err(error)?;
        to_js(&json!({
            "documents": memory.as_ref().map_or(0, |m| m.documents().len()),
            "chunks": memory.as_ref().map_or(0, |m| m.chunk_count()),
            "adapter": msa_engine::Backend::describe(&self.state.model.backend),
        }))
    }
}
