//! `msa ask` and `msa chat`: questions answered from a bank, streamed token by token.

use std::collections::HashMap;
use std::io::{BufRead, IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::Args;
use msa_core::bank::{Bank, OpenOptions};
use msa_core::{SamplingParams, TextStream};
use msa_engine::{
    FinishReason, GenerateOptions, LayerRouting, Memory, Model, RemoteShard, RouteStats,
};
use msa_shard::{ConnectOptions, ShardClient};
use serde_json::json;

use crate::backend::{self, BackendArgs, Device, Job};
use crate::interleave::{self, InterleaveArgs};
use crate::units;

/// The model, the bank and how to answer: shared by `ask`, `chat` and `serve`.
#[derive(Args, Clone, Debug)]
pub struct AnswerArgs {
    /// The model directory.
    #[arg(long, value_name = "DIR")]
    pub model: PathBuf,
    /// The bank to answer from (see `msa encode`).
    #[arg(long, value_name = "BANK")]
    pub bank: PathBuf,
    /// Skip reading every bank file to check its CRC-32 when opening (sizes and headers are always
    /// checked); saves a full read of a large bank.
    #[arg(long)]
    pub no_verify: bool,
    /// Memory Parallel across machines: shard servers (`msa shard`) scoring the ranks after this
    /// process's own (one, or N with --devices), in this order. Each serves a copy of the same bank.
    #[arg(long, value_delimiter = ',', value_name = "HOST:PORT")]
    pub shards: Vec<String>,
    #[command(flatten)]
    pub sampling: SamplingArgs,
    #[command(flatten)]
    pub backend: BackendArgs,
}

impl AnswerArgs {
    /// The generation options, the model on `device` and the bank as its memory over `shards`.
    fn load<B: Device>(
        &self,
        device: B,
        shards: Vec<B>,
    ) -> Result<(GenerateOptions, Model<B>, Memory<B>)> {
        let options = self.sampling.options()?;
        let model = backend::load_model(&self.model, device)?;
        let memory = open_memory(&model, &self.bank, !self.no_verify, shards, &self.shards)?;
        Ok((options, model, memory))
    }
}

/// How tokens are chosen.
#[derive(Args, Clone, Debug)]
pub struct SamplingArgs {
    /// Most tokens to generate.
    #[arg(long, default_value_t = 256, value_name = "N")]
    pub max_tokens: usize,
    /// Softmax temperature; 0 is greedy (always the most likely token).
    #[arg(long, default_value_t = 0.0, value_name = "T")]
    pub temperature: f32,
    /// Nucleus sampling: keep the smallest set of tokens whose probability reaches P.
    #[arg(long, default_value_t = 1.0, value_name = "P")]
    pub top_p: f32,
    /// Seed of the sampler (same seed, same answer).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

impl SamplingArgs {
    pub fn options(&self) -> Result<GenerateOptions> {
        let sampling = SamplingParams {
            temperature: self.temperature,
            top_p: self.top_p,
            seed: self.seed,
        };
        sampling.validate()?;
        Ok(GenerateOptions {
            max_tokens: self.max_tokens,
            sampling,
            stop_tokens: None,
        })
    }
}

/// Answer a question from a bank, streaming the answer as it is generated.
#[derive(Args)]
pub struct AskArgs {
    /// The question.
    question: String,
    #[command(flatten)]
    answer: AnswerArgs,
    /// Print, per router layer, the selected documents with their scores and sources, and what routing
    /// cost (bytes scanned on the device, fetched from the host).
    #[arg(long)]
    show_routing: bool,
    /// Print one JSON object (answer, tokens, routing, timings) instead of text.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    interleave: InterleaveArgs,
}

/// Ask questions from a bank interactively: one question per line; `/routing` toggles the routing
/// view, `/quit` (or end of input) leaves. Each question is answered on its own: MSA's prompt holds one
/// question, so earlier turns are not carried over.
#[derive(Args)]
pub struct ChatArgs {
    #[command(flatten)]
    answer: AnswerArgs,
    /// Start with the routing view on.
    #[arg(long)]
    show_routing: bool,
    #[command(flatten)]
    interleave: InterleaveArgs,
}

/// Opens a bank as the model's memory (routing keys on the device(s) and the shard servers at
/// `remotes`, content in host pages).
pub fn open_memory<B: Device>(
    model: &Model<B>,
    bank_dir: &Path,
    verify: bool,
    shards: Vec<B>,
    remotes: &[String],
) -> Result<Memory<B>> {
    if !bank_dir.join("bank.json").is_file() {
        anyhow::bail!(
            "{} is not a bank (no bank.json); create one with `msa encode`",
            bank_dir.display()
        );
    }
    let bank = Bank::open(
        bank_dir,
        OpenOptions {
            verify_checksums: verify,
        },
    )?;
    model
        .open_memory_with(bank, shards, connect_shards(remotes, &model.backend)?)
        .with_context(|| format!("opening bank {}", bank_dir.display()))
}

/// Connects to the shard servers (`msa shard`) at `addresses`, in rank order. Where `backend` and a
/// server's backend make the same kind of device link (NCCL, between GPUs of two machines too), the
/// router queries go over one; otherwise, or when joining one fails, through the host.
pub fn connect_shards<B: Device>(
    addresses: &[String],
    backend: &B,
) -> Result<Vec<Box<dyn RemoteShard<B>>>> {
    addresses
        .iter()
        .map(|address| {
            let client = ShardClient::connect(address, ConnectOptions::default())?;
            let described = client.describe();
            match (backend.link_kind(), client.server_link_kind()) {
                (Some(_), Some(_)) => match client.link(backend) {
                    Ok(link) => tracing::info!("{described}: router queries go over {link}"),
                    Err(e) => tracing::warn!("router queries go through the host: {e}"),
                },
                _ => tracing::info!(
                    "{described}: router queries go through the host (no device link between {} \
                     and its backend)",
                    backend.describe()
                ),
            }
            Ok(Box::new(client) as Box<dyn RemoteShard<B>>)
        })
        .collect()
}

/// One answered question.
pub struct Answered {
    pub tokens: Vec<u32>,
    pub text: String,
    pub finish_reason: FinishReason,
    pub routing: Vec<LayerRouting>,
    pub route_stats: Vec<RouteStats>,
    pub prompt_tokens: usize,
    pub prefill: Duration,
    pub decode: Duration,
}

/// Answers `question`, calling `on_routing` once after the prefill and `on_piece` with each token's
/// text (empty while a character is incomplete). The tokens include the stop token that ended the
/// answer, if one did; the text does not.
pub fn answer<B: Device>(
    model: &Model<B>,
    memory: &Memory<B>,
    question: &str,
    options: &GenerateOptions,
    mut on_routing: impl FnMut(&[LayerRouting], &[RouteStats]),
    mut on_piece: impl FnMut(u32, &str) -> Result<()>,
) -> Result<Answered> {
    let tokenizer = model.require_tokenizer()?;
    pollster::block_on(async {
        let started = Instant::now();
        let mut generation = model.ask(memory, question, options).await?;
        let prefill = started.elapsed();
        let prompt_tokens = generation.session().context_len();
        on_routing(generation.routing(), generation.session().route_stats());
        let mut stream = TextStream::new(tokenizer);
        let mut tokens = Vec::new();
        let started = Instant::now();
        while let Some(token) = generation.next_token().await? {
            tokens.push(token);
            if generation.finish_reason() == Some(FinishReason::Stop) {
                break; // the stop token (`<|im_end|>`) ends the answer and is not part of its text
            }
            on_piece(token, &stream.push(token)?)?;
        }
        let rest = stream.finish()?;
        if let (false, Some(&last)) = (rest.is_empty(), tokens.last()) {
            on_piece(last, &rest)?;
        }
        let finish_reason = generation
            .finish_reason()
            .expect("a drained generation has finished");
        let text_tokens = match finish_reason {
            FinishReason::Stop => &tokens[..tokens.len() - 1],
            _ => &tokens[..],
        };
        Ok(Answered {
            text: tokenizer.decode(text_tokens)?,
            finish_reason,
            routing: generation.routing().to_vec(),
            route_stats: generation.session().route_stats().to_vec(),
            prompt_tokens,
            prefill,
            decode: started.elapsed(),
            tokens,
        })
    })
}

/// What identifies a routed document to a person: its source in the bank and the first words of its
/// text (when the bank stores texts), looked up once per document.
pub struct Titles(HashMap<usize, (String, Option<String>)>);

impl Titles {
    /// Characters of a document's text shown after its source.
    const PREVIEW_CHARS: usize = 32;

    pub fn of<B: Device>(memory: &Memory<B>, routing: &[LayerRouting]) -> Titles {
        let Some(bank) = memory.bank() else {
            return Titles(HashMap::new());
        };
        let mut ids: Vec<usize> = routing
            .iter()
            .flat_map(|l| &l.documents)
            .map(|d| d.id)
            .collect();
        ids.sort_unstable();
        ids.dedup();
        // Texts that cannot be read leave the previews out; answering does not need them.
        let texts = bank
            .document_texts(&ids)
            .unwrap_or_else(|_| vec![None; ids.len()]);
        let titles = ids
            .into_iter()
            .zip(texts)
            .map(|(id, text)| {
                let source = bank
                    .documents()
                    .get(id)
                    .map_or_else(String::new, |d| d.source.clone());
                let preview = text.map(|text| {
                    let line = text.lines().find(|l| !l.trim().is_empty()).unwrap_or("");
                    let mut preview: String =
                        line.trim().chars().take(Self::PREVIEW_CHARS).collect();
                    if preview.len() < line.trim().len() {
                        preview.push('…');
                    }
                    preview
                });
                (id, (source, preview))
            })
            .collect();
        Titles(titles)
    }

    fn source(&self, id: usize) -> &str {
        self.0.get(&id).map_or("", |(s, _)| s.as_str())
    }

    fn preview(&self, id: usize) -> Option<&str> {
        self.0.get(&id).and_then(|(_, p)| p.as_deref())
    }
}

pub(crate) fn print_routing<B: Device>(
    memory: &Memory<B>,
    routing: &[LayerRouting],
    stats: &[RouteStats],
) {
    let titles = Titles::of(memory, routing);
    for (layer, stat) in routing.iter().zip(stats) {
        println!(
            "layer {:>2}: {} chunks; {} of routing keys scored in {:.1} ms, {} fetched in {:.1} ms",
            layer.layer,
            layer.chunks,
            units::bytes(stat.scanned_bytes),
            stat.routing_time.as_secs_f64() * 1e3,
            units::bytes(stat.fetched_bytes),
            stat.fetch_time.as_secs_f64() * 1e3,
        );
        for doc in &layer.documents {
            match titles.preview(doc.id) {
                Some(preview) => println!(
                    "    [{}] {:>8.4}  {}  {preview}",
                    doc.id,
                    doc.score,
                    titles.source(doc.id)
                ),
                None => println!(
                    "    [{}] {:>8.4}  {}",
                    doc.id,
                    doc.score,
                    titles.source(doc.id)
                ),
            }
        }
    }
}

pub fn routing_json<B: Device>(
    memory: &Memory<B>,
    routing: &[LayerRouting],
    stats: &[RouteStats],
) -> serde_json::Value {
    let titles = Titles::of(memory, routing);
    routing
        .iter()
        .zip(stats)
        .map(|(layer, stat)| {
            json!({
                "layer": layer.layer,
                "chunks": layer.chunks,
                "documents": layer.documents.iter().map(|d| json!({
                    "id": d.id,
                    "score": d.score,
                    "source": titles.source(d.id),
                    "preview": titles.preview(d.id),
                })).collect::<Vec<_>>(),
                "scanned_bytes": stat.scanned_bytes,
                "fetched_bytes": stat.fetched_bytes,
                "routing_ms": stat.routing_time.as_secs_f64() * 1e3,
                "fetch_ms": stat.fetch_time.as_secs_f64() * 1e3,
            })
        })
        .collect()
}

pub fn finish_reason_name(reason: FinishReason) -> &'static str {
    match reason {
        FinishReason::Stop => "stop",
        FinishReason::Length => "length",
        FinishReason::Error => "error",
    }
}

pub(crate) fn stdout_piece(piece: &str) -> Result<()> {
    let mut out = std::io::stdout().lock();
    out.write_all(piece.as_bytes())?;
    out.flush()?;
    Ok(())
}

/// Prints one answer: routing first (when asked), then the streamed text.
fn ask_and_print<B: Device>(
    model: &Model<B>,
    memory: &Memory<B>,
    question: &str,
    options: &GenerateOptions,
    show_routing: bool,
) -> Result<()> {
    let answered = answer(
        model,
        memory,
        question,
        options,
        |routing, stats| {
            if show_routing {
                print_routing(memory, routing, stats);
            }
        },
        |_, piece| stdout_piece(piece),
    )?;
    println!();
    let decoded = answered.tokens.len();
    tracing::info!(
        "{} prompt tokens prefilled in {:.1} ms; {decoded} tokens in {:.1} ms ({:.1} tokens/s); finished: {}",
        answered.prompt_tokens,
        answered.prefill.as_secs_f64() * 1e3,
        answered.decode.as_secs_f64() * 1e3,
        decoded as f64 / answered.decode.as_secs_f64().max(1e-9),
        finish_reason_name(answered.finish_reason),
    );
    Ok(())
}

struct AskJob {
    args: AskArgs,
}

impl Job for AskJob {
    type Output = ();

    fn run<B: Device>(self, device: B, shards: Vec<B>) -> Result<()> {
        let args = self.args;
        let (options, model, memory) = args.answer.load(device, shards)?;
        if args.interleave.interleave {
            let question = &args.question;
            if args.json {
                let report =
                    interleave::ask_json(&model, &memory, question, &args.interleave, &options)?;
                println!("{}", serde_json::to_string_pretty(&report)?);
                return Ok(());
            }
            return interleave::ask_and_print(
                &model,
                &memory,
                question,
                &args.interleave,
                &options,
                args.show_routing,
            );
        }
        if !args.json {
            return ask_and_print(&model, &memory, &args.question, &options, args.show_routing);
        }
        let answered = answer(
            &model,
            &memory,
            &args.question,
            &options,
            |_, _| {},
            |_, _| Ok(()),
        )?;
        let report = json!({
            "question": args.question,
            "answer": answered.text,
            "tokens": answered.tokens,
            "finish_reason": finish_reason_name(answered.finish_reason),
            "routing": routing_json(&memory, &answered.routing, &answered.route_stats),
            "prompt_tokens": answered.prompt_tokens,
            "prefill_ms": answered.prefill.as_secs_f64() * 1e3,
            "decode_ms": answered.decode.as_secs_f64() * 1e3,
            "backend": model.backend.describe(),
        });
        println!("{}", serde_json::to_string_pretty(&report)?);
        Ok(())
    }
}

pub fn ask(args: AskArgs) -> Result<()> {
    // Checked before loading anything: a bad flag should not cost a model load.
    args.answer.sampling.options()?;
    backend::run(&args.answer.backend.clone(), AskJob { args })
}

struct ChatJob {
    args: ChatArgs,
}

impl Job for ChatJob {
    type Output = ();

    fn run<B: Device>(self, device: B, shards: Vec<B>) -> Result<()> {
        let args = self.args;
        let (options, model, memory) = args.answer.load(device, shards)?;
        let interactive = std::io::stdin().is_terminal();
        let mut show_routing = args.show_routing;
        if interactive {
            eprintln!(
                "{} documents in memory. One question per line; /routing toggles the routing view, /quit leaves.",
                memory.documents().len()
            );
        }
        let stdin = std::io::stdin();
        let mut lines = stdin.lock().lines();
        loop {
            if interactive {
                eprint!("> ");
                std::io::stderr().flush()?;
            }
            let Some(line) = lines.next() else { break };
            let line = line.context("reading stdin")?;
            match line.trim() {
                "" => continue,
                "/quit" | "/exit" => break,
                "/routing" => {
                    show_routing = !show_routing;
                    eprintln!("routing view {}", if show_routing { "on" } else { "off" });
                }
                question => {
                    let answered = if args.interleave.interleave {
                        interleave::ask_and_print(
                            &model,
                            &memory,
                            question,
                            &args.interleave,
                            &options,
                            show_routing,
                        )
                    } else {
                        ask_and_print(&model, &memory, question, &options, show_routing)
                    };
                    // A bad question is reported and the loop goes on.
                    if let Err(e) = answered {
                        eprintln!("error: {e:#}");
                    }
                }
            }
        }
        Ok(())
    }
}

pub fn chat(args: ChatArgs) -> Result<()> {
    args.answer.sampling.options()?;
    backend::run(&args.answer.backend.clone(), ChatJob { args })
}
