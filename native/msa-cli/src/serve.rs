//! `msa serve`: an OpenAI-compatible HTTP API answering from a bank.
//!
//! One worker thread owns the model and the memory and runs requests one at a time (a device runs one
//! pipeline at a time anyway); the HTTP side is async, bounded in request size and in requests admitted
//! at once, and streams answers as server-sent events.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc as std_mpsc;
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use axum::extract::{DefaultBodyLimit, State};
use axum::http::StatusCode;
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use clap::Args;
use msa_core::bank::{Bank, OpenOptions};
use msa_engine::{
    BankEncodeOptions, GenerateOptions, InterleaveEvent, InterleaveFinish, InterleaveOptions,
    LayerRouting, Memory, Model, Phase, RouteStats, SourceDocument,
};
use serde::Deserialize;
use serde_json::json;
use tokio::sync::{Semaphore, mpsc, oneshot};
use tokio_stream::StreamExt;
use tokio_stream::wrappers::UnboundedReceiverStream;

use crate::ask::{AnswerArgs, SamplingArgs, answer, finish_reason_name, open_memory, routing_json};
use crate::backend::{self, Device, Job};
use crate::corpus::JsonlRecord;
use crate::interleave;

/// Serve a bank over HTTP: an OpenAI-compatible `POST /v1/chat/completions` (streaming with
/// `"stream": true`), `POST /v1/memory/documents` to add documents, `GET /v1/memory` for bank stats.
/// The bank is created when missing.
///
/// The question is the last user message; earlier messages are not part of MSA's prompt.
#[derive(Args)]
pub struct ServeArgs {
    #[command(flatten)]
    answer: AnswerArgs,
    /// Address to listen on; the default accepts connections from this machine only.
    #[arg(long, default_value = "127.0.0.1:8080", value_name = "ADDR")]
    listen: SocketAddr,
    /// Largest request body accepted, in bytes (larger requests get 413).
    #[arg(long, default_value_t = 4 << 20, value_name = "BYTES")]
    max_request_bytes: usize,
    /// Requests admitted at once, running or waiting for the model (more get 503).
    #[arg(long, default_value_t = 8, value_name = "N")]
    max_concurrent: usize,
    /// Largest `max_tokens` a request may ask for.
    #[arg(long, default_value_t = 4096, value_name = "N")]
    max_tokens_limit: usize,
}

/// Work for the model thread.
enum Work {
    Ask {
        question: String,
        options: GenerateOptions,
        /// Memory Interleave instead of one prefill: rounds at most, and text to force as output.
        interleave: Option<(usize, Option<String>)>,
        events: mpsc::UnboundedSender<AnswerEvent>,
    },
    AddDocuments {
        documents: Vec<SourceDocument>,
        reply: oneshot::Sender<Result<serde_json::Value, ApiError>>,
    },
    Stats {
        reply: oneshot::Sender<serde_json::Value>,
    },
}

enum AnswerEvent {
    Routing(serde_json::Value),
    /// A step of Memory Interleave's retrieval chain (a round's routing, text, named and read ids).
    Retrieval(serde_json::Value),
    Piece(String),
    Done {
        finish_reason: &'static str,
        prompt_tokens: usize,
        completion_tokens: usize,
        /// With Memory Interleave: the parsed answer, why the run stopped, and its rounds.
        interleave: Option<serde_json::Value>,
    },
    Failed(ApiError),
}

/// An error with its HTTP status, answered in OpenAI's error shape.
#[derive(Debug)]
struct ApiError {
    status: StatusCode,
    message: String,
}

impl ApiError {
    fn new(status: StatusCode, message: impl Into<String>) -> Self {
        ApiError {
            status,
            message: message.into(),
        }
    }

    /// Errors of the request's content are the client's (4xx); the rest are the server's.
    fn from_engine(error: &anyhow::Error) -> Self {
        use msa_engine::Error as E;
        let status = match error.downcast_ref::<E>() {
            Some(E::NoDocuments) => StatusCode::CONFLICT,
            Some(
                E::EmptyQuestion
                | E::EmptyDocument { .. }
                | E::EmptyPrompt
                | E::TokenOutOfRange { .. },
            ) => StatusCode::BAD_REQUEST,
            // A changed or duplicate document, another writer holding the bank.
            Some(E::Core(msa_core::Error::Bank { .. })) => StatusCode::CONFLICT,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        ApiError::new(status, format!("{error:#}"))
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let kind = if self.status.is_client_error() {
            "invalid_request_error"
        } else {
            "server_error"
        };
        let body = json!({"error": {"message": self.message, "type": kind}});
        (self.status, Json(body)).into_response()
    }
}

struct AppState {
    work: std_mpsc::Sender<Work>,
    admitted: Arc<Semaphore>,
    model_name: String,
    max_tokens_limit: usize,
    /// The command line's sampling flags: what a request leaves out.
    defaults: SamplingArgs,
    /// Numbers the completion ids.
    completions: AtomicU64,
}

pub fn serve(args: ServeArgs) -> Result<()> {
    args.answer.sampling.options()?;
    anyhow::ensure!(args.max_concurrent > 0, "--max-concurrent must be positive");
    if !args.listen.ip().is_loopback() {
        tracing::warn!(
            "listening on {}: reachable from other machines, with no authentication",
            args.listen
        );
    }
    let (work_tx, work_rx) = std_mpsc::channel();
    let (ready_tx, ready_rx) = std_mpsc::channel();
    let answer_args = args.answer.clone();
    let worker = std::thread::Builder::new()
        .name("msa-model".into())
        .spawn(move || {
            let job = Worker {
                args: answer_args.clone(),
                work: work_rx,
                ready: ready_tx.clone(),
            };
            if let Err(e) = backend::run(&answer_args.backend, job) {
                // Before readiness this is the load error; after it the worker only stops on errors.
                let _ = ready_tx.send(Err(e));
            }
        })?;
    // Load the model and open the bank before accepting connections.
    match ready_rx.recv() {
        Ok(Ok(())) => {}
        Ok(Err(e)) => return Err(e),
        Err(_) => anyhow::bail!("the model thread stopped while loading"),
    }
    let model_name = args
        .answer
        .model
        .file_name()
        .map_or("msa".into(), |n| n.to_string_lossy().into_owned());
    let state = Arc::new(AppState {
        work: work_tx,
        admitted: Arc::new(Semaphore::new(args.max_concurrent)),
        model_name,
        max_tokens_limit: args.max_tokens_limit,
        defaults: args.answer.sampling.clone(),
        completions: AtomicU64::new(0),
    });
    let app = Router::new()
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/memory/documents", post(add_documents))
        .route("/v1/memory", get(memory_stats))
        .route("/v1/models", get(models))
        .layer(DefaultBodyLimit::max(args.max_request_bytes))
        .with_state(state);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let listener = tokio::net::TcpListener::bind(args.listen)
            .await
            .with_context(|| format!("listening on {}", args.listen))?;
        // The bound address (a port of 0 picks a free one): scripts and tests read this line.
        println!("listening on http://{}", listener.local_addr()?);
        use std::io::Write;
        std::io::stdout().flush()?;
        axum::serve(listener, app)
            .with_graceful_shutdown(async {
                let _ = tokio::signal::ctrl_c().await;
            })
            .await
            .context("serving")
    })?;
    drop(worker);
    Ok(())
}

struct Worker {
    args: AnswerArgs,
    work: std_mpsc::Receiver<Work>,
    ready: std_mpsc::Sender<Result<()>>,
}

impl Job for Worker {
    type Output = ();

    fn run<B: Device>(self, device: B, shards: Vec<B>) -> Result<()> {
        let args = &self.args;
        let model = backend::load_model(&args.model, device)?;
        if !args.bank.join("bank.json").is_file() {
            pollster::block_on(model.create_bank(&args.bank))
                .with_context(|| format!("creating bank {}", args.bank.display()))?;
            tracing::info!("created the empty bank {}", args.bank.display());
        }
        let verify = !args.no_verify;
        let mut memory = open_memory(&model, &args.bank, verify, shards.clone(), &args.shards)?;
        let _ = self.ready.send(Ok(()));
        while let Ok(work) = self.work.recv() {
            match work {
                Work::Ask {
                    question,
                    options,
                    interleave: Some((max_rounds, force_output)),
                    events,
                } => {
                    let result = interleaved(
                        &model,
                        &memory,
                        &question,
                        &options,
                        max_rounds,
                        force_output,
                        &events,
                    );
                    if let Err(e) = result {
                        let _ = events.send(AnswerEvent::Failed(ApiError::from_engine(&e)));
                    }
                }
                Work::Ask {
                    question,
                    options,
                    interleave: None,
                    events,
                } => {
                    let result = answer(
                        &model,
                        &memory,
                        &question,
                        &options,
                        |routing, stats| {
                            let _ = events
                                .send(AnswerEvent::Routing(routing_json(&memory, routing, stats)));
                        },
                        |_, piece| {
                            if !piece.is_empty() {
                                // A closed stream (client gone) stops the generation.
                                events
                                    .send(AnswerEvent::Piece(piece.to_string()))
                                    .map_err(|_| anyhow::anyhow!("client disconnected"))?;
                            }
                            Ok(())
                        },
                    );
                    let _ = events.send(match result {
                        Ok(done) => AnswerEvent::Done {
                            finish_reason: finish_reason_name(done.finish_reason),
                            prompt_tokens: done.prompt_tokens,
                            completion_tokens: done.tokens.len(),
                            interleave: None,
                        },
                        Err(e) => AnswerEvent::Failed(ApiError::from_engine(&e)),
                    });
                }
                Work::AddDocuments { documents, reply } => {
                    let _ = reply.send(add(&model, &mut memory, args, &documents, &shards));
                }
                Work::Stats { reply } => {
                    let _ = reply.send(json!({
                        "bank": args.bank.display().to_string(),
                        "documents": memory.documents().len(),
                        "tokens": memory.bank().map_or(0, |b| b.token_count()),
                        "chunks": memory.chunk_count(),
                        "device_bytes": memory.device_bytes(),
                        "host_bytes": memory.host_bytes(),
                        "devices": memory.devices(),
                        "backend": model.backend.describe(),
                    }));
                }
            }
        }
        Ok(())
    }
}

/// One request answered with Memory Interleave. Round 1's routing goes out first (it settles the
/// status), then every retrieval step as an `msa.retrieval` chunk, and the answer's tokens as content.
/// `max_tokens` bounds each round as well as the answer, so a request cannot hold the model for the
/// reference's 2048 tokens per round.
fn interleaved<B: Device>(
    model: &Model<B>,
    memory: &Memory<B>,
    question: &str,
    options: &GenerateOptions,
    max_rounds: usize,
    force_output: Option<String>,
    events: &mpsc::UnboundedSender<AnswerEvent>,
) -> Result<()> {
    let forced_tokens = match force_output {
        Some(text) => model.require_tokenizer()?.encode(&text)?,
        None => Vec::new(),
    };
    let run = InterleaveOptions {
        max_rounds,
        max_round_tokens: options.max_tokens,
        max_answer_tokens: options.max_tokens,
        sampling: options.sampling,
        forced_tokens,
        ..InterleaveOptions::default()
    };
    // A client that hung up no longer listens; the run goes on to its (bounded) end.
    let send = |event| {
        let _ = events.send(event);
    };
    let stops = &model.config.eos_token_ids;
    // A round is announced once its prefill has routed every router layer.
    let mut round: Option<(usize, usize, usize)> = None;
    let (mut routing, mut stats) = (Vec::new(), Vec::new());
    let mut prompt_tokens = 0;
    let announce = |round: &mut Option<(usize, usize, usize)>,
                    routing: &mut Vec<LayerRouting>,
                    stats: &mut Vec<RouteStats>| {
        if let Some((n, prompt, routes)) = round.take() {
            let layers = routing_json(memory, routing, stats);
            if n == 1 {
                send(AnswerEvent::Routing(layers.clone()));
            }
            send(AnswerEvent::Retrieval(json!({
                "round": n, "prompt_tokens": prompt, "routing_tokens": routes, "routing": layers,
            })));
            routing.clear();
            stats.clear();
        }
    };
    let outcome = pollster::block_on(model.interleave(memory, question, &run, |event| {
        if !matches!(event, InterleaveEvent::Routed { .. }) {
            announce(&mut round, &mut routing, &mut stats);
        }
        match event {
            InterleaveEvent::RoundStarted { round: n, prompt } => {
                prompt_tokens = prompt.ids.len();
                round = Some((n, prompt.ids.len(), prompt.routing_positions().len()));
            }
            InterleaveEvent::Routed {
                routing: r,
                stats: s,
                ..
            } => {
                routing.push(r);
                stats.push(s);
            }
            InterleaveEvent::Token { phase, id, text } => match phase {
                Phase::Retrieval(n) if !text.is_empty() => {
                    send(AnswerEvent::Retrieval(json!({"round": n, "text": text})));
                }
                // The stop token ends the answer and is not part of its text.
                Phase::Answer if !text.is_empty() && !stops.contains(&id) => {
                    send(AnswerEvent::Piece(text));
                }
                _ => {}
            },
            InterleaveEvent::IdsNamed { round: n, ids } => {
                send(AnswerEvent::Retrieval(json!({"round": n, "named": ids})));
            }
            InterleaveEvent::DocumentsInjected {
                round: n,
                ids,
                tokens,
            } => send(AnswerEvent::Retrieval(
                json!({"round": n, "read": ids, "tokens": tokens}),
            )),
            InterleaveEvent::RetrievalEnded { round: n, fed, .. } => send(AnswerEvent::Retrieval(
                json!({"round": n, "retrieval_ended": true, "question_tokens": fed.len()}),
            )),
        }
    }))?;
    announce(&mut round, &mut routing, &mut stats);
    let finish_reason = match outcome.finish {
        InterleaveFinish::Answered | InterleaveFinish::EndOfSequence => "stop",
        InterleaveFinish::RoundLimit | InterleaveFinish::TokenLimit => "length",
    };
    send(AnswerEvent::Done {
        finish_reason,
        prompt_tokens,
        completion_tokens: outcome.tokens.len(),
        interleave: Some(json!({
            "answer": outcome.answer,
            "finish": interleave::finish_name(outcome.finish),
            "rounds": outcome.rounds,
        })),
    });
    Ok(())
}

/// Appends documents to the bank and, when any were new, reopens the memory over it. On any error the
/// memory in use stays as it was.
fn add<B: Device>(
    model: &msa_engine::Model<B>,
    memory: &mut msa_engine::Memory<B>,
    args: &AnswerArgs,
    documents: &[SourceDocument],
    shards: &[B],
) -> Result<serde_json::Value, ApiError> {
    let fail = |e: anyhow::Error| ApiError::from_engine(&e);
    if !args.shards.is_empty() {
        // The shard servers hold the bank as it was when they started: they would refuse the new one.
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "this server routes through shard servers (--shards), which serve the bank as it is; \
             append with `msa encode`, then restart them and this server",
        ));
    }
    // The existing files were checked when the memory opened; an append only writes new ones.
    let unchecked = OpenOptions {
        verify_checksums: false,
    };
    let mut bank = Bank::open(&args.bank, unchecked).map_err(|e| fail(e.into()))?;
    let report = pollster::block_on(model.encode_into_bank(
        &mut bank,
        documents,
        BankEncodeOptions::default(),
        |_| {},
    ))
    .map_err(|e| fail(e.into()))?;
    if report.encoded > 0 {
        // The new documents' routing keys join the devices.
        *memory = open_memory(model, &args.bank, false, shards.to_vec(), &[]).map_err(fail)?;
    }
    Ok(json!({
        "added": report.encoded,
        "already_present": report.skipped,
        "tokens": report.tokens,
        "documents": memory.documents().len(),
    }))
}

#[derive(Deserialize)]
struct ChatMessage {
    role: String,
    /// A string, a list of content parts (`{"type": "text", "text": …}`; other parts are skipped), or
    /// null.
    #[serde(default)]
    content: serde_json::Value,
}

impl ChatMessage {
    fn text(&self) -> String {
        match &self.content {
            serde_json::Value::String(text) => text.clone(),
            serde_json::Value::Array(parts) => parts
                .iter()
                .filter(|p| p["type"] == "text")
                .filter_map(|p| p["text"].as_str())
                .collect::<Vec<_>>()
                .join("\n"),
            _ => String::new(),
        }
    }
}

#[derive(Deserialize)]
struct ChatRequest {
    #[serde(default)]
    model: Option<String>,
    messages: Vec<ChatMessage>,
    #[serde(default)]
    stream: bool,
    #[serde(default, alias = "max_completion_tokens")]
    max_tokens: Option<usize>,
    #[serde(default)]
    temperature: Option<f32>,
    #[serde(default)]
    top_p: Option<f32>,
    #[serde(default)]
    seed: Option<u64>,
    /// Memory Interleave: retrieval rounds before the answer (an extension; see `msa ask --interleave`).
    #[serde(default)]
    interleave: bool,
    #[serde(default)]
    max_rounds: Option<usize>,
    /// Text taken as the model's first generated tokens (replays and tests; needs `interleave`).
    #[serde(default)]
    force_output: Option<String>,
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Admits a request, or refuses it while `--max-concurrent` are in flight; the permit is held until
/// the response (or its stream) is dropped.
fn admit(state: &AppState) -> Result<tokio::sync::OwnedSemaphorePermit, ApiError> {
    Arc::clone(&state.admitted)
        .try_acquire_owned()
        .map_err(|_| {
            ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "the server is busy (--max-concurrent requests in flight); retry later",
            )
        })
}

fn submit(state: &AppState, work: Work) -> Result<(), ApiError> {
    state.work.send(work).map_err(|_| stopped())
}

async fn chat_completions(
    State(state): State<Arc<AppState>>,
    body: Result<Json<ChatRequest>, axum::extract::rejection::JsonRejection>,
) -> Result<Response, ApiError> {
    let Json(request) = body.map_err(|e| ApiError::new(e.status(), e.body_text()))?;
    let question = request
        .messages
        .iter()
        .rev()
        .find(|m| m.role == "user")
        .map(ChatMessage::text)
        .ok_or_else(|| ApiError::new(StatusCode::BAD_REQUEST, "no user message in `messages`"))?;
    let max_tokens = request.max_tokens.unwrap_or(state.defaults.max_tokens);
    if max_tokens > state.max_tokens_limit {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            format!(
                "max_tokens {max_tokens} is above this server's limit of {}",
                state.max_tokens_limit
            ),
        ));
    }
    let sampling = msa_core::SamplingParams {
        temperature: request.temperature.unwrap_or(state.defaults.temperature),
        top_p: request.top_p.unwrap_or(state.defaults.top_p),
        seed: request.seed.unwrap_or(state.defaults.seed),
    };
    sampling
        .validate()
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, e.to_string()))?;
    if !request.interleave && (request.max_rounds.is_some() || request.force_output.is_some()) {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "`max_rounds` and `force_output` need `\"interleave\": true`",
        ));
    }
    let interleave = match request.max_rounds {
        Some(0) => {
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                "max_rounds must be at least 1",
            ));
        }
        rounds => request
            .interleave
            .then(|| (rounds.unwrap_or(4), request.force_output.clone())),
    };
    let permit = admit(&state)?;
    let (events, mut receiver) = mpsc::unbounded_channel();
    submit(
        &state,
        Work::Ask {
            question,
            options: GenerateOptions {
                max_tokens,
                sampling,
                stop_tokens: None,
            },
            interleave,
            events,
        },
    )?;
    let id = format!(
        "chatcmpl-{}-{}",
        now(),
        state.completions.fetch_add(1, Ordering::Relaxed)
    );
    let model = request.model.unwrap_or_else(|| state.model_name.clone());
    let created = now();
    // The first event settles the status: routing means the prefill worked, a failure is the error.
    let first = match receiver.recv().await {
        Some(AnswerEvent::Failed(e)) => return Err(e),
        Some(event) => event,
        None => return Err(stopped()),
    };
    if request.stream {
        let chunk = move |delta: serde_json::Value,
                          finish: Option<&str>,
                          extra: Option<serde_json::Value>| {
            let mut value = json!({
                "id": id, "object": "chat.completion.chunk", "created": created, "model": model,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
            });
            if let Some(extra) = extra {
                value["msa"] = extra;
            }
            Event::default().data(value.to_string())
        };
        let events = tokio_stream::once(first).chain(UnboundedReceiverStream::new(receiver));
        let stream = events.map(move |event| {
            let _admitted = &permit;
            Ok::<_, Infallible>(match event {
                AnswerEvent::Routing(routing) => chunk(
                    json!({"role": "assistant", "content": ""}),
                    None,
                    Some(json!({"routing": routing})),
                ),
                AnswerEvent::Retrieval(step) => {
                    chunk(json!({}), None, Some(json!({"retrieval": step})))
                }
                AnswerEvent::Piece(text) => chunk(json!({"content": text}), None, None),
                AnswerEvent::Done {
                    finish_reason,
                    interleave,
                    ..
                } => chunk(
                    json!({}),
                    Some(finish_reason),
                    interleave.map(|i| json!({"interleave": i})),
                ),
                // A failure mid-answer (after the 200 went out): an error event ends the stream.
                AnswerEvent::Failed(e) => Event::default()
                    .event("error")
                    .data(json!({"error": {"message": e.message}}).to_string()),
            })
        });
        let done = tokio_stream::once(Ok(Event::default().data("[DONE]")));
        return Ok(Sse::new(stream.chain(done)).into_response());
    }
    let mut text = String::new();
    let mut routing = json!([]);
    let mut retrieval = Vec::new();
    let mut next = Some(first);
    while let Some(event) = match next.take() {
        Some(event) => Some(event),
        None => receiver.recv().await,
    } {
        match event {
            AnswerEvent::Routing(r) => routing = r,
            AnswerEvent::Retrieval(step) => retrieval.push(step),
            AnswerEvent::Piece(piece) => text.push_str(&piece),
            AnswerEvent::Done {
                finish_reason,
                prompt_tokens,
                completion_tokens,
                interleave,
            } => {
                drop(permit);
                let mut msa = json!({"routing": routing});
                if let Some(mut interleave) = interleave {
                    interleave["retrieval"] = json!(retrieval);
                    msa["interleave"] = interleave;
                }
                return Ok(Json(json!({
                    "id": id, "object": "chat.completion", "created": created, "model": model,
                    "choices": [{
                        "index": 0,
                        "message": {"role": "assistant", "content": text},
                        "finish_reason": finish_reason,
                    }],
                    "usage": {
                        "prompt_tokens": prompt_tokens,
                        "completion_tokens": completion_tokens,
                        "total_tokens": prompt_tokens + completion_tokens,
                    },
                    "msa": msa,
                }))
                .into_response());
            }
            AnswerEvent::Failed(e) => return Err(e),
        }
    }
    Err(stopped())
}

fn stopped() -> ApiError {
    ApiError::new(
        StatusCode::INTERNAL_SERVER_ERROR,
        "the model thread has stopped",
    )
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AddDocumentsRequest {
    documents: Vec<JsonlRecord>,
}

async fn add_documents(
    State(state): State<Arc<AppState>>,
    body: Result<Json<AddDocumentsRequest>, axum::extract::rejection::JsonRejection>,
) -> Result<Response, ApiError> {
    let Json(request) = body.map_err(|e| ApiError::new(e.status(), e.body_text()))?;
    if request.documents.is_empty() {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "`documents` is empty",
        ));
    }
    let documents = request
        .documents
        .into_iter()
        .enumerate()
        .map(|(i, record)| record.into_document(&format!("documents[{i}]")))
        .collect::<Result<Vec<_>>>()
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, format!("{e:#}")))?;
    let _permit = admit(&state)?;
    let (reply, answer) = oneshot::channel();
    submit(&state, Work::AddDocuments { documents, reply })?;
    let value = answer.await.map_err(|_| {
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "the model thread stopped",
        )
    })??;
    Ok(Json(value).into_response())
}

async fn memory_stats(State(state): State<Arc<AppState>>) -> Result<Response, ApiError> {
    let (reply, answer) = oneshot::channel();
    submit(&state, Work::Stats { reply })?;
    let value = answer.await.map_err(|_| {
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "the model thread stopped",
        )
    })?;
    Ok(Json(value).into_response())
}

async fn models(State(state): State<Arc<AppState>>) -> Json<serde_json::Value> {
    Json(json!({
        "object": "list",
        "data": [{"id": state.model_name, "object": "model", "owned_by": "msa"}],
    }))
}
