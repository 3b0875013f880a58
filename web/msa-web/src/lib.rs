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
//! const answer = await msa.ask("a question", { maxTokens: 32 }, (event) => console.log(event));
//! ```
#![cfg(target_arch = "wasm32")]

use std::cell::RefCell;
use std::rc::Rc;

use js_sys::{Function, Promise};
use msa_core::{Checkpoint, ModelConfig, MsaTokenizer, SamplingParams, TextStream};
use msa_engine::{
    Backend, EncodeProgress, FinishReason, GenerateOptions, InterleaveEvent, InterleaveFinish,
    InterleaveOptions, LayerRouting, Memory, Model, Phase, RetrievalEnd, Trace,
};
use msa_wgpu::{DeviceOptions, Variants, WgpuBackend, WgpuError};
use serde_json::{Value, json};
use wasm_bindgen::prelude::*;
use wasm_bindgen_futures::future_to_promise;

/// A model on the browser's GPU and the memory its documents were encoded into.
struct State {
    model: Model<WgpuBackend>,
    memory: RefCell<Option<Memory<WgpuBackend>>>,
}

/// A JavaScript options object as JSON (`null` when absent).
fn options_json(options: &JsValue) -> Result<Value, JsValue> {
    if options.is_undefined() || options.is_null() {
        return Ok(Value::Null);
    }
    let text = js_sys::JSON::stringify(options)?;
    serde_json::from_str(&String::from(text)).map_err(error)
}

/// `load`'s limits (caps below the adapter's own, as WebGPU names them) and adapter (WebGPU's
/// `GPUAdapterInfo` vendor and architecture, which choose the kernel variants).
fn device_options(limits: &JsValue, adapter: &JsValue) -> Result<DeviceOptions, JsValue> {
    let value = options_json(limits)?;
    let adapter = options_json(adapter)?;
    let name = |key: &str| -> Result<&str, JsValue> {
        match &adapter[key] {
            Value::Null => Ok(""),
            Value::String(s) => Ok(s),
            v => Err(error(format!("adapter.{key} must be a string, not {v}"))),
        }
    };
    // Without an adapter description wgpu's adapter type decides (a browser's: unknown, CPU row).
    let variants = if adapter.is_null() {
        None
    } else {
        Some(Variants::for_web_adapter(
            name("vendor")?,
            name("architecture")?,
        ))
    };
    let cap = |key: &str| -> Result<Option<u64>, JsValue> {
        match &value[key] {
            Value::Null => Ok(None),
            v => v.as_u64().filter(|&n| n >= 256).map(Some).ok_or_else(|| {
                error(format!(
                    "limits.{key} must be a whole number ≥ 256, not {v}"
                ))
            }),
        }
    };
    Ok(DeviceOptions {
        max_buffer_bytes: cap("maxBufferSize")?,
        max_binding_bytes: cap("maxStorageBufferBindingSize")?,
        variants,
        ..DeviceOptions::default()
    })
}

/// What `ask` takes from its options object.
struct AskOptions {
    max_tokens: usize,
    sampling: SamplingParams,
    interleave: bool,
    max_rounds: usize,
    force_output: Option<String>,
}

impl AskOptions {
    fn parse(options: &JsValue) -> Result<Self, JsValue> {
        let value = options_json(options)?;
        let number = |key: &str, default: f64| -> Result<f64, JsValue> {
            match &value[key] {
                Value::Null => Ok(default),
                v => v
                    .as_f64()
                    .ok_or_else(|| error(format!("options.{key} must be a number, not {v}"))),
            }
        };
        let count = |key: &str, default: usize| -> Result<usize, JsValue> {
            let n = number(key, default as f64)?;
            if n < 0.0 || n.fract() != 0.0 {
                return Err(error(format!(
                    "options.{key} must be a whole number ≥ 0, not {n}"
                )));
            }
            Ok(n as usize)
        };
        let sampling = SamplingParams {
            temperature: number("temperature", 0.0)? as f32,
            top_p: number("topP", 1.0)? as f32,
            seed: count("seed", 0)? as u64,
        };
        sampling.validate().map_err(error)?;
        Ok(AskOptions {
            max_tokens: count("maxTokens", 256)?,
            sampling,
            interleave: value["interleave"].as_bool().unwrap_or(false),
            max_rounds: count("maxRounds", 4)?,
            force_output: value["forceOutput"].as_str().map(String::from),
        })
    }
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

/// Calls a JavaScript callback with one JSON argument. The engine's work cannot be interrupted: the
/// first exception a callback throws silences it, and the call rejects with that exception once the
/// work is done (documents being added are added all the same).
fn call(callback: &Function, value: &Value) -> Result<(), JsValue> {
    callback.call1(&JsValue::NULL, &to_js(value)?).map(|_| ())
}

/// Per router layer: the selected documents and, when known, every document's score (by memory index).
fn routing_json(routing: &[LayerRouting], scores: &[Vec<f32>]) -> Value {
    routing
        .iter()
        .enumerate()
        .map(|(slot, layer)| {
            let mut value = json!({
                "layer": layer.layer,
                "chunks": layer.chunks,
                "documents": layer.documents.iter()
                    .map(|d| json!({"id": d.id, "score": d.score}))
                    .collect::<Vec<_>>(),
            });
            if let Some(scores) = scores.get(slot) {
                value["scores"] = json!(scores);
            }
            value
        })
        .collect()
}

#[wasm_bindgen]
impl MsaEngine {
    /// Loads a model onto the browser's WebGPU adapter: `config` is the text of `config.json`,
    /// `weights` the bytes of a `.safetensors` file, `tokenizer` the text of `tokenizer.json`.
    /// `limits` (optional): `{maxBufferSize, maxStorageBufferBindingSize}` in bytes, caps below the
    /// adapter's (to run as on a device with WebGPU's default 256 MiB / 128 MiB). Weights larger than
    /// a buffer are split across buffers and bound in windows; a weight row no binding can hold is a
    /// "model exceeds this device's buffer limits" error naming the limit. `adapter` (optional):
    /// `{vendor, architecture}` of the adapter as WebGPU's `GPUAdapterInfo` names it, which chooses
    /// the kernel variants (`Variants::for_web_adapter`: a GPU maker's vendor gets the GPU row).
    pub fn load(
        config: String,
        weights: Vec<u8>,
        tokenizer: String,
        limits: JsValue,
        adapter: JsValue,
    ) -> Promise {
        future_to_promise(async move {
            let options = device_options(&limits, &adapter)?;
            let gpu = WgpuBackend::new(options).await.map_err(|e| match e {
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

    /// Answers a question from the memory. `options`: `{maxTokens = 256, temperature = 0, topP = 1,
    /// seed = 0, interleave = false, maxRounds = 4, forceOutput}`; `maxTokens` bounds each retrieval
    /// round of Memory Interleave as well as the answer. Calls `on_event` with
    /// `{type: "routing", round, layers}` after each prefill and `{type: "token", phase, id, text}` for
    /// every token (`phase` is `"answer"` or the retrieval round); with `interleave`, also
    /// `{type: "round", round, promptTokens, routingTokens}`, `{type: "named", round, ids}`,
    /// `{type: "injected", round, ids, tokens}` and `{type: "retrievalEnded", round, reason}`. Resolves
    /// to `{tokens, text, answer, routing, finishReason, rounds}`.
    #[allow(clippy::await_holding_refcell_ref)] // as in `add_documents`
    pub fn ask(&self, question: String, options: JsValue, on_event: Option<Function>) -> Promise {
        let state = Rc::clone(&self.state);
        future_to_promise(async move {
            let options = AskOptions::parse(&options)?;
            let memory = state
                .memory
                .try_borrow()
                .map_err(|_| error("the memory is being changed by another call"))?;
            let memory = memory
                .as_ref()
                .ok_or_else(|| error("the memory holds no documents; add documents first"))?;
            let mut failed: Option<JsValue> = None;
            let mut emit = |value: Value| {
                if let (Some(callback), None) = (&on_event, &failed) {
                    failed = call(callback, &value).err();
                }
            };
            let result = if options.interleave {
                state
                    .interleaved(memory, &question, &options, &mut emit)
                    .await
            } else {
                state.answer(memory, &question, &options, &mut emit).await
            };
            if let Some(thrown) = failed {
                return Err(thrown);
            }
            to_js(&result.map_err(error)?)
        })
    }

    /// `{documents, chunks, adapter, limits: {maxBufferSize, maxStorageBufferBindingSize}, variants}`:
    /// the limits the engine works within and its kernel variants.
    pub fn stats(&self) -> Result<JsValue, JsValue> {
        let memory = self.state.memory.try_borrow().map_err(error)?;
        let gpu = &self.state.model.backend;
        let caps = gpu.capabilities();
        to_js(&json!({
            "documents": memory.as_ref().map_or(0, |m| m.documents().len()),
            "chunks": memory.as_ref().map_or(0, |m| m.chunk_count()),
            "adapter": gpu.describe(),
            "limits": {
                "maxBufferSize": caps.max_buffer_bytes,
                "maxStorageBufferBindingSize": caps.max_binding_bytes,
            },
            "variants": caps.variants.to_string(),
        }))
    }

    /// Frees the GPU device and everything on it now. The engine is then like one whose device was
    /// lost: every later call rejects with "the GPU device was lost"; load the model again.
    pub fn destroy(&self) {
        self.state.model.backend.destroy();
    }
}

impl State {
    /// One prefill and decoding, reported as events.
    async fn answer(
        &self,
        memory: &Memory<WgpuBackend>,
        question: &str,
        options: &AskOptions,
        emit: &mut impl FnMut(Value),
    ) -> msa_engine::Result<Value> {
        let model = &self.model;
        let generate = GenerateOptions {
            max_tokens: options.max_tokens,
            sampling: options.sampling,
            stop_tokens: None,
        };
        // Every document's score per router layer, for the page's heat map.
        let mut trace = Trace::document_scores_only();
        let (session, logits) = model
            .prefill_question_traced(memory, question, Some(&mut trace))
            .await?;
        let scores = trace.read_document_scores(&model.backend).await?;
        drop(trace);
        let mut generation = model.generation(session, logits, &generate)?;
        let routing = routing_json(generation.routing(), &scores);
        emit(json!({"type": "routing", "round": 1, "layers": routing}));
        let tokenizer = model.require_tokenizer()?;
        let mut stream = TextStream::new(tokenizer);
        let mut tokens = Vec::new();
        while let Some(token) = generation.next_token().await? {
            tokens.push(token);
            let text = stream.push(token)?;
            emit(json!({"type": "token", "phase": "answer", "id": token, "text": text}));
        }
        let finish = match generation.finish_reason() {
            Some(FinishReason::Stop) => "stop",
            Some(FinishReason::Length) => "length",
            _ => "error",
        };
        let text = tokenizer.decode(&tokens)?;
        Ok(json!({
            "tokens": tokens,
            "text": text,
            "answer": text,
            "routing": routing,
            "finishReason": finish,
            "rounds": 1,
        }))
    }

    /// Memory Interleave, reported as events.
    async fn interleaved(
        &self,
        memory: &Memory<WgpuBackend>,
        question: &str,
        options: &AskOptions,
        emit: &mut impl FnMut(Value),
    ) -> msa_engine::Result<Value> {
        let model = &self.model;
        let forced_tokens = match &options.force_output {
            Some(text) => model.require_tokenizer()?.encode(text)?,
            None => Vec::new(),
        };
        let interleave = InterleaveOptions {
            max_rounds: options.max_rounds,
            // A page should not wait for 2048 tokens of a runaway round: maxTokens bounds rounds too.
            max_round_tokens: options.max_tokens,
            max_answer_tokens: options.max_tokens,
            sampling: options.sampling,
            forced_tokens,
            document_scores: true,
            ..InterleaveOptions::default()
        };
        let mut rounds_routing: Vec<Value> = Vec::new();
        let mut answer_text = String::new();
        let outcome = model
            .interleave(memory, question, &interleave, |event| {
                let value = match event {
                    InterleaveEvent::RoundStarted { round, prompt } => json!({
                        "type": "round", "round": round, "promptTokens": prompt.ids.len(),
                        "routingTokens": prompt.routing_positions().len(),
                    }),
                    InterleaveEvent::Routed {
                        round,
                        routing,
                        scores,
                        ..
                    } => {
                        let scores: Vec<Vec<f32>> = scores.into_iter().collect();
                        let layer =
                            routing_json(std::slice::from_ref(&routing), &scores)[0].clone();
                        if rounds_routing.len() < round {
                            rounds_routing.push(json!([]));
                        }
                        rounds_routing[round - 1]
                            .as_array_mut()
                            .expect("an array")
                            .push(layer.clone());
                        json!({"type": "routing", "round": round, "layers": [layer]})
                    }
                    InterleaveEvent::Token { phase, id, text } => {
                        let phase = match phase {
                            Phase::Retrieval(round) => json!(round),
                            Phase::Answer => {
                                answer_text.push_str(&text);
                                json!("answer")
                            }
                        };
                        json!({"type": "token", "phase": phase, "id": id, "text": text})
                    }
                    InterleaveEvent::IdsNamed { round, ids } => {
                        json!({"type": "named", "round": round, "ids": ids})
                    }
                    InterleaveEvent::DocumentsInjected { round, ids, tokens } => {
                        json!({"type": "injected", "round": round, "ids": ids, "tokens": tokens})
                    }
                    InterleaveEvent::RetrievalEnded { round, reason, .. } => json!({
                        "type": "retrievalEnded", "round": round,
                        "reason": match reason {
                            RetrievalEnd::Marker => "marker",
                            RetrievalEnd::CharacterCap => "characterCap",
                        },
                    }),
                };
                emit(value);
            })
            .await?;
        let finish = match outcome.finish {
            InterleaveFinish::Answered => "answered",
            InterleaveFinish::EndOfSequence => "endOfSequence",
            InterleaveFinish::RoundLimit => "roundLimit",
            InterleaveFinish::TokenLimit => "tokenLimit",
        };
        Ok(json!({
            "tokens": outcome.tokens,
            "text": answer_text,
            "answer": outcome.answer,
            "routing": rounds_routing.last().cloned().unwrap_or(json!([])),
            "roundsRouting": rounds_routing,
            "finishReason": finish,
            "rounds": outcome.rounds,
            "transcript": outcome.transcript,
        }))
    }
}
