//! `msa ask --interleave`: Memory Interleave's retrieval chain, printed round by round as it happens.

use std::time::Instant;

use anyhow::Result;
use clap::{Args, ValueEnum};
use msa_engine::{
    BlockAttention, GenerateOptions, InterleaveEvent, InterleaveFinish, InterleaveOptions,
    InterleaveOutcome, LayerRouting, Memory, Model, Phase, RetrievalEnd, RouteStats,
};
use serde_json::{Value, json};

use crate::ask;
use crate::backend::Device;

/// How `msa ask` runs Memory Interleave.
#[derive(Args, Clone, Debug)]
pub struct InterleaveArgs {
    /// Answer with Memory Interleave, as MSA was trained to: rounds of naming documents (`[4]`),
    /// reading their text and routing again, until the model writes `<End-of-Retrieve>` and answers.
    /// `--max-tokens` bounds the answer.
    #[arg(long)]
    pub interleave: bool,
    /// Retrieval rounds at most; each one prefills the whole conversation again.
    #[arg(long, default_value_t = 4, value_name = "N", requires = "interleave")]
    pub max_rounds: usize,
    /// Tokens one retrieval round may generate (the reference's 2048: a runaway round passes the
    /// 1000-character cap first, which ends retrieval).
    #[arg(
        long,
        default_value_t = 2048,
        value_name = "N",
        requires = "interleave"
    )]
    pub max_round_tokens: usize,
    /// How the question, fed again once retrieval ends, attends to itself: `causal`, as in training,
    /// or `bidirectional`, as the reference's decode path does (for exact parity with it).
    #[arg(long, value_enum, default_value_t = QuestionAttention::Causal, requires = "interleave")]
    pub question_attention: QuestionAttention,
    /// Take TEXT, tokenized, as the model's first generated tokens (across rounds and the answer)
    /// before sampling: replays a transcript, or drives the protocol with a model that was not trained
    /// for it.
    #[arg(long, value_name = "TEXT", requires = "interleave")]
    pub force_output: Option<String>,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum QuestionAttention {
    Causal,
    Bidirectional,
}

impl InterleaveArgs {
    fn options<B: Device>(
        &self,
        model: &Model<B>,
        generate: &GenerateOptions,
    ) -> Result<InterleaveOptions> {
        let forced_tokens = match &self.force_output {
            Some(text) => model.require_tokenizer()?.encode(text)?,
            None => Vec::new(),
        };
        Ok(InterleaveOptions {
            max_rounds: self.max_rounds,
            max_round_tokens: self.max_round_tokens,
            max_answer_tokens: generate.max_tokens,
            sampling: generate.sampling,
            question_attention: match self.question_attention {
                QuestionAttention::Causal => BlockAttention::Causal,
                QuestionAttention::Bidirectional => BlockAttention::Bidirectional,
            },
            forced_tokens,
            stop_tokens: generate.stop_tokens.clone(),
            document_scores: false,
        })
    }
}

/// One retrieval round as a front end shows it.
#[derive(Default)]
struct Round {
    prompt_tokens: usize,
    routing_tokens: usize,
    routing: Vec<LayerRouting>,
    stats: Vec<RouteStats>,
    text: String,
    named: Vec<usize>,
    injected: Vec<usize>,
    injected_tokens: usize,
}

/// The retrieval chain, gathered from the events.
#[derive(Default)]
struct Chain {
    rounds: Vec<Round>,
    retrieval_end: Option<(RetrievalEnd, usize)>,
    answer_text: String,
}

impl Chain {
    fn record(&mut self, event: &InterleaveEvent) {
        match event {
            InterleaveEvent::RoundStarted { prompt, .. } => self.rounds.push(Round {
                prompt_tokens: prompt.ids.len(),
                routing_tokens: prompt.routing_positions().len(),
                ..Round::default()
            }),
            InterleaveEvent::Routed { routing, stats, .. } => {
                let round = self.current();
                round.routing.push(routing.clone());
                round.stats.push(*stats);
            }
            InterleaveEvent::Token { phase, text, .. } => match phase {
                Phase::Retrieval(_) => self.current().text.push_str(text),
                Phase::Answer => self.answer_text.push_str(text),
            },
            InterleaveEvent::IdsNamed { ids, .. } => self.current().named = ids.clone(),
            InterleaveEvent::DocumentsInjected { ids, tokens, .. } => {
                let round = self.current();
                round.injected = ids.clone();
                round.injected_tokens = *tokens;
            }
            InterleaveEvent::RetrievalEnded { reason, fed, .. } => {
                self.retrieval_end = Some((*reason, fed.len()));
            }
        }
    }

    fn current(&mut self) -> &mut Round {
        self.rounds.last_mut().expect("a round starts first")
    }
}

pub fn finish_name(finish: InterleaveFinish) -> &'static str {
    match finish {
        InterleaveFinish::Answered => "answered",
        InterleaveFinish::EndOfSequence => "end_of_sequence",
        InterleaveFinish::RoundLimit => "round_limit",
        InterleaveFinish::TokenLimit => "token_limit",
    }
}

/// Why a run that gave no answer stopped, naming the flag that bounds it.
fn finish_text(finish: InterleaveFinish, options: &InterleaveOptions) -> String {
    match finish {
        InterleaveFinish::Answered => "the model answered".into(),
        InterleaveFinish::EndOfSequence => {
            "the model ended its turn without `The answer to the question is:`".into()
        }
        InterleaveFinish::RoundLimit => format!(
            "retrieval did not end within --max-rounds {}",
            options.max_rounds
        ),
        InterleaveFinish::TokenLimit => format!(
            "a round reached --max-round-tokens {} or the answer --max-tokens {}",
            options.max_round_tokens, options.max_answer_tokens
        ),
    }
}

fn reason_text(reason: RetrievalEnd) -> &'static str {
    match reason {
        RetrievalEnd::Marker => "the model wrote <End-of-Retrieve>",
        RetrievalEnd::CharacterCap => "the round passed 1000 characters",
    }
}

/// Runs Memory Interleave and prints the chain as it happens: per round the routing (when asked),
/// what the model wrote and which documents it then read; then the answer as it streams.
pub fn ask_and_print<B: Device>(
    model: &Model<B>,
    memory: &Memory<B>,
    question: &str,
    args: &InterleaveArgs,
    generate: &GenerateOptions,
    show_routing: bool,
) -> Result<()> {
    let options = args.options(model, generate)?;
    let mut printer = Printer {
        memory,
        show_routing,
        streaming: None,
        named: Vec::new(),
    };
    let mut failure = None;
    let started = Instant::now();
    let outcome = pollster::block_on(model.interleave(memory, question, &options, |event| {
        if failure.is_none() {
            failure = printer.print(&event).err();
        }
    }))?;
    if let Some(e) = failure {
        return Err(e);
    }
    printer.end_line();
    match (&outcome.answer, outcome.finish) {
        (Some(answer), InterleaveFinish::Answered) => println!("answer: {answer}"),
        (Some(answer), _) => println!("answer (cut off by --max-tokens): {answer}"),
        (None, finish) => println!("no answer: {}", finish_text(finish, &options)),
    }
    tracing::info!(
        "{} rounds, {} tokens in {:.1} ms; finished: {}",
        outcome.rounds,
        outcome.tokens.len(),
        started.elapsed().as_secs_f64() * 1e3,
        finish_name(outcome.finish)
    );
    Ok(())
}

/// Prints events as text.
struct Printer<'a, B: Device> {
    memory: &'a Memory<B>,
    show_routing: bool,
    /// The phase whose tokens are being printed on the current line.
    streaming: Option<Phase>,
    /// The ids the current round named.
    named: Vec<usize>,
}

impl<B: Device> Printer<'_, B> {
    fn print(&mut self, event: &InterleaveEvent) -> Result<()> {
        match event {
            InterleaveEvent::RoundStarted { round, prompt } => {
                self.end_line();
                println!(
                    "round {round}: {} prompt tokens, {} of them routing",
                    prompt.ids.len(),
                    prompt.routing_positions().len()
                );
            }
            InterleaveEvent::Routed { routing, stats, .. } => {
                if self.show_routing {
                    ask::print_routing(
                        self.memory,
                        std::slice::from_ref(routing),
                        std::slice::from_ref(stats),
                    );
                }
            }
            InterleaveEvent::Token { phase, text, .. } => {
                if self.streaming != Some(*phase) {
                    print!(
                        "{}",
                        if *phase == Phase::Answer {
                            ""
                        } else {
                            "  wrote: "
                        }
                    );
                    self.streaming = Some(*phase);
                }
                ask::stdout_piece(text)?;
            }
            InterleaveEvent::IdsNamed { ids, .. } => {
                self.end_line();
                self.named = ids.clone();
                if ids.is_empty() {
                    println!("  named no documents");
                }
            }
            InterleaveEvent::DocumentsInjected { ids, tokens, .. } => {
                let list = |ids: &mut dyn Iterator<Item = &usize>| {
                    ids.map(|id| format!("[{id}]"))
                        .collect::<Vec<_>>()
                        .join(" ")
                };
                print!("  read {} ({tokens} tokens)", list(&mut ids.iter()));
                let unknown = list(&mut self.named.iter().filter(|id| !ids.contains(id)));
                if !unknown.is_empty() {
                    print!("; no text in the memory for {unknown}");
                }
                println!();
            }
            InterleaveEvent::RetrievalEnded { reason, fed, .. } => {
                self.end_line();
                println!(
                    "retrieval ended: {}; the question is fed again ({} tokens)",
                    reason_text(*reason),
                    fed.len()
                );
            }
        }
        Ok(())
    }

    /// Ends a line of streamed tokens.
    fn end_line(&mut self) {
        if self.streaming.take().is_some() {
            println!();
        }
    }
}

/// Runs Memory Interleave and describes the whole chain as JSON.
pub fn ask_json<B: Device>(
    model: &Model<B>,
    memory: &Memory<B>,
    question: &str,
    args: &InterleaveArgs,
    generate: &GenerateOptions,
) -> Result<Value> {
    let options = args.options(model, generate)?;
    let mut chain = Chain::default();
    let started = Instant::now();
    let outcome: InterleaveOutcome =
        pollster::block_on(model.interleave(memory, question, &options, |e| chain.record(&e)))?;
    let rounds: Vec<Value> = chain
        .rounds
        .iter()
        .enumerate()
        .map(|(i, r)| {
            json!({
                "round": i + 1,
                "prompt_tokens": r.prompt_tokens,
                "routing_tokens": r.routing_tokens,
                "routing": ask::routing_json(memory, &r.routing, &r.stats),
                "text": r.text,
                "named": r.named,
                "injected": r.injected,
                "injected_tokens": r.injected_tokens,
            })
        })
        .collect();
    Ok(json!({
        "question": question,
        "answer": outcome.answer,
        "finish_reason": finish_name(outcome.finish),
        "rounds": rounds,
        "retrieval_end": chain.retrieval_end.map(|(reason, tokens)| json!({
            "reason": match reason {
                RetrievalEnd::Marker => "marker",
                RetrievalEnd::CharacterCap => "character_cap",
            },
            "question_tokens": tokens,
        })),
        "answer_text": chain.answer_text,
        "tokens": outcome.tokens,
        "transcript": outcome.transcript,
        "elapsed_ms": started.elapsed().as_secs_f64() * 1e3,
        "backend": model.backend.describe(),
    }))
}
