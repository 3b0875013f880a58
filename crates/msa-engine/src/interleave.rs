//! Memory Interleave (MSA-SPEC §4.5): multi-round generative retrieval, run as the reference runs it.
//!
//! Each retrieval round prefills the conversation against the memory (routing again in every router
//! layer) and decodes document ids until `<|object_ref_end|>`; the named documents' texts are then
//! appended and the next round prefills the whole conversation anew. `<End-of-Retrieve>` ends retrieval:
//! the question is fed once more through the decode path and the model answers. The text protocol lives
//! in [`msa_core::interleave`]; this module runs it on a model and reports every step as an
//! [`InterleaveEvent`].

use std::collections::VecDeque;

use msa_core::interleave::{
    END_OF_RETRIEVE, RoundScanner, RoundSignal, document_injection, first_round_text,
    next_round_prompt, parse_answer, question_injection, referenced_ids,
};
use msa_core::{MsaTokenizer, QueryPrompt, Sampler, SamplingParams, TextStream};

use crate::backend::Backend;
use crate::error::{Error, Result};
use crate::memory::Memory;
use crate::model::Model;
use crate::session::{BlockAttention, LayerRouting, RouteStats, Session, Trace};

/// Settings of a Memory Interleave run.
#[derive(Clone, Debug, PartialEq)]
pub struct InterleaveOptions {
    /// Retrieval rounds at most; each one prefills the whole conversation again.
    pub max_rounds: usize,
    /// Tokens one retrieval round may generate. The default, 2048, is the reference's limit per call:
    /// a round that runs away passes the 1000-character cap first, which ends retrieval.
    pub max_round_tokens: usize,
    /// Tokens the answer may take after retrieval ends (default 2048, as in the reference).
    pub max_answer_tokens: usize,
    pub sampling: SamplingParams,
    /// How the injected question's tokens attend to each other.
    pub question_attention: BlockAttention,
    /// Tokens taken as generated before any is sampled, in order across rounds and the answer: replays
    /// a transcript, or drives the protocol without a trained model.
    pub forced_tokens: Vec<u32>,
    /// Tokens that end generation; `None` uses the config's `eos_token_id`.
    pub stop_tokens: Option<Vec<u32>>,
    /// Report every document's score in [`InterleaveEvent::Routed`] (one readback of a score per
    /// document per router layer and round), for views such as the browser demo's heat map.
    pub document_scores: bool,
}

impl Default for InterleaveOptions {
    fn default() -> Self {
        InterleaveOptions {
            max_rounds: 4,
            max_round_tokens: 2048,
            max_answer_tokens: 2048,
            sampling: SamplingParams::greedy(),
            question_attention: BlockAttention::Causal,
            forced_tokens: Vec::new(),
            stop_tokens: None,
            document_scores: false,
        }
    }
}

/// Which part of the conversation a generated token belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// Retrieval round `n` (from 1): the model names documents.
    Retrieval(usize),
    /// After retrieval: the answer.
    Answer,
}

/// Why retrieval ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RetrievalEnd {
    /// The model wrote `<End-of-Retrieve>`.
    Marker,
    /// A round passed the reference's character cap without ending.
    CharacterCap,
}

/// Why a Memory Interleave run stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InterleaveFinish {
    /// A stop token ended generation after `The answer to the question is:` (normally in the answer,
    /// or in a retrieval round that answered without `<End-of-Retrieve>`).
    Answered,
    /// A stop token came without an answer lead-in before it.
    EndOfSequence,
    /// Every allowed round ended by naming documents; the model never ended retrieval.
    RoundLimit,
    /// A round or the answer reached its token limit.
    TokenLimit,
}

/// One step of a Memory Interleave run, in order.
#[derive(Clone, Debug, PartialEq)]
pub enum InterleaveEvent {
    /// A retrieval round prefilled its prompt: round 1 the question prompt, later rounds the whole
    /// conversation (MSA-SPEC §4.5 step 4).
    RoundStarted { round: usize, prompt: QueryPrompt },
    /// One router layer's selection in this round's prefill, with what it cost.
    Routed {
        round: usize,
        routing: LayerRouting,
        stats: RouteStats,
        /// Every document's score, by memory index, with [`InterleaveOptions::document_scores`].
        scores: Option<Vec<f32>>,
    },
    /// A generated token and the text it completed (empty while a character is unfinished).
    Token { phase: Phase, id: u32, text: String },
    /// The round ended naming these ids (sorted, deduplicated, known or not).
    IdsNamed { round: usize, ids: Vec<usize> },
    /// The named documents the memory holds were appended as `[id]. text` lines; `tokens` is the
    /// injection's length.
    DocumentsInjected {
        round: usize,
        ids: Vec<usize>,
        tokens: usize,
    },
    /// Retrieval ended in `round`; the question was fed again as `fed` and the answer follows.
    RetrievalEnded {
        round: usize,
        reason: RetrievalEnd,
        fed: Vec<u32>,
    },
}

/// The result of a Memory Interleave run.
#[derive(Clone, Debug, PartialEq)]
pub struct InterleaveOutcome {
    pub finish: InterleaveFinish,
    /// The text after `The answer to the question is:`, up to the end of turn.
    pub answer: Option<String>,
    /// Every generated token, rounds and answer (injections not included).
    pub tokens: Vec<u32>,
    /// Retrieval rounds run.
    pub rounds: usize,
    /// The whole conversation: the first round's prompt, then every round's output and the injection
    /// that followed it, the question injection and the answer (as far as the run got).
    pub transcript: String,
}

impl<B: Backend> Model<B> {
    /// Answers `question` from `memory` with Memory Interleave, calling `on_event` at every step.
    pub async fn interleave(
        &self,
        memory: &Memory<B>,
        question: &str,
        options: &InterleaveOptions,
        mut on_event: impl FnMut(InterleaveEvent),
    ) -> Result<InterleaveOutcome> {
        if question.trim().is_empty() {
            return Err(Error::EmptyQuestion);
        }
        if options.max_rounds == 0 {
            return Err(msa_core::Error::Interleave("max_rounds must be at least 1".into()).into());
        }
        if !options.forced_tokens.is_empty() {
            self.check_ids(&options.forced_tokens)?;
        }
        let tokenizer = self.require_tokenizer()?;
        let mut run = Run {
            tokenizer,
            forced: options.forced_tokens.iter().copied().collect(),
            sampler: Sampler::new(options.sampling)?,
            stop_tokens: options
                .stop_tokens
                .clone()
                .unwrap_or_else(|| self.config.eos_token_ids.clone()),
            tokens: Vec::new(),
            transcript: first_round_text(question),
        };
        let mut prompt = tokenizer.question_prompt(question)?;
        for round in 1..=options.max_rounds {
            on_event(InterleaveEvent::RoundStarted {
                round,
                prompt: prompt.clone(),
            });
            let mut trace = options.document_scores.then(Trace::document_scores_only);
            let (mut session, logits) = self.prefill_query(memory, &prompt, trace.as_mut()).await?;
            let mut scores = match &trace {
                Some(trace) => trace.read_document_scores(&self.backend).await?,
                None => Vec::new(),
            }
            .into_iter();
            for (routing, stats) in session.routing().iter().zip(session.route_stats()) {
                on_event(InterleaveEvent::Routed {
                    round,
                    routing: routing.clone(),
                    stats: *stats,
                    scores: scores.next(),
                });
            }
            let mut scanner = RoundScanner::new();
            let phase = Phase::Retrieval(round);
            let (signal, last) = match run
                .decode(
                    &mut session,
                    logits,
                    phase,
                    options.max_round_tokens,
                    Some(&mut scanner),
                    &mut on_event,
                )
                .await?
            {
                Decoded::Finished(finish) => {
                    // An answer written without `<End-of-Retrieve>` still counts, as the reference
                    // parses whatever the last call produced.
                    let answer = parse_answer(scanner.text()).map(str::to_string);
                    return Ok(run.finished(finish, round, answer));
                }
                Decoded::RoundOver(signal, last) => (signal, last),
            };
            if signal == RoundSignal::RetrievalEnd {
                let reason = if scanner.text().contains(END_OF_RETRIEVE) {
                    RetrievalEnd::Marker
                } else {
                    RetrievalEnd::CharacterCap
                };
                // The reference runs the round's last token through the model and discards what it
                // predicts, then feeds the question again through the decode path.
                session.feed(&[last], BlockAttention::Causal, None).await?;
                let injection = question_injection(question);
                let ids = tokenizer.encode(&injection)?;
                let logits = session
                    .extend(&ids, options.question_attention, None)
                    .await?;
                run.transcript.push_str(&injection);
                on_event(InterleaveEvent::RetrievalEnded {
                    round,
                    reason,
                    fed: ids,
                });
                let answer_start = run.transcript.len();
                let finish = match run
                    .decode(
                        &mut session,
                        logits,
                        Phase::Answer,
                        options.max_answer_tokens,
                        None,
                        &mut on_event,
                    )
                    .await?
                {
                    Decoded::Finished(finish) => finish,
                    Decoded::RoundOver(..) => unreachable!("the answer has no rounds"),
                };
                let answer = parse_answer(&run.transcript[answer_start..]).map(str::to_string);
                return Ok(run.finished(finish, round, answer));
            }
            let ids = referenced_ids(scanner.text());
            on_event(InterleaveEvent::IdsNamed {
                round,
                ids: ids.clone(),
            });
            if round == options.max_rounds {
                return Ok(run.finished(InterleaveFinish::RoundLimit, round, None));
            }
            let mut texts = memory.document_texts(&ids)?;
            let (injection, injected) = document_injection(&ids, |id| {
                let at = ids.binary_search(&id).expect("asked for the named ids");
                texts[at].take()
            });
            run.transcript.push_str(&injection);
            on_event(InterleaveEvent::DocumentsInjected {
                round,
                ids: injected,
                tokens: tokenizer.encode(&injection)?.len(),
            });
            // No context crosses rounds: the reference prefills the whole conversation again.
            prompt = next_round_prompt(tokenizer, &run.transcript)?;
        }
        unreachable!("the last round returns")
    }
}

/// How a stretch of decoding ended.
enum Decoded {
    /// The round's text ended the round after this token (not fed yet).
    RoundOver(RoundSignal, u32),
    /// A stop token or the token limit.
    Finished(InterleaveFinish),
}

/// The state of one run across its rounds.
struct Run<'t> {
    tokenizer: &'t MsaTokenizer,
    /// Tokens taken as generated before the sampler's.
    forced: VecDeque<u32>,
    sampler: Sampler,
    stop_tokens: Vec<u32>,
    tokens: Vec<u32>,
    transcript: String,
}

impl Run<'_> {
    /// Decodes from a block's `logits` until a stop token, `limit` tokens, or, given a `scanner`, the end
    /// of the round. Every token's text joins the transcript.
    async fn decode<B: Backend>(
        &mut self,
        session: &mut Session<'_, B>,
        logits: Vec<f32>,
        phase: Phase,
        limit: usize,
        mut scanner: Option<&mut RoundScanner>,
        on_event: &mut impl FnMut(InterleaveEvent),
    ) -> Result<Decoded> {
        let mut text = TextStream::new(self.tokenizer);
        let mut previous: Option<u32> = None;
        for _ in 0..limit {
            // A forced token is taken as is: nothing is sampled, so the sampler's random stream serves
            // only the tokens it chooses.
            let token = match (self.forced.pop_front(), previous) {
                (Some(forced), None) => forced,
                (Some(forced), Some(previous)) => {
                    session
                        .feed(&[previous], BlockAttention::Causal, None)
                        .await?;
                    forced
                }
                (None, None) => self.sampler.sample(&logits)?,
                (None, Some(previous)) => {
                    session
                        .next_token(&[previous], BlockAttention::Causal, &mut self.sampler)
                        .await?
                }
            };
            self.tokens.push(token);
            let stop = self.stop_tokens.contains(&token);
            let mut piece = text.push(token)?;
            if stop {
                piece.push_str(&text.finish()?);
            }
            let signal = scanner
                .as_deref_mut()
                .map_or(RoundSignal::Continue, |s| s.push(&piece));
            self.transcript.push_str(&piece);
            on_event(InterleaveEvent::Token {
                phase,
                id: token,
                text: piece,
            });
            if stop {
                return Ok(Decoded::Finished(InterleaveFinish::EndOfSequence));
            }
            if signal != RoundSignal::Continue {
                self.transcript.push_str(&text.finish()?);
                return Ok(Decoded::RoundOver(signal, token));
            }
            previous = Some(token);
        }
        self.transcript.push_str(&text.finish()?);
        Ok(Decoded::Finished(InterleaveFinish::TokenLimit))
    }

    /// The outcome; a stop token after the answer's lead-in is an answer.
    fn finished(
        self,
        finish: InterleaveFinish,
        rounds: usize,
        answer: Option<String>,
    ) -> InterleaveOutcome {
        let finish = match finish {
            InterleaveFinish::EndOfSequence if answer.is_some() => InterleaveFinish::Answered,
            finish => finish,
        };
        InterleaveOutcome {
            finish,
            answer,
            tokens: self.tokens,
            rounds,
            transcript: self.transcript,
        }
    }
}
