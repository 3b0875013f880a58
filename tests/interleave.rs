//! Memory Interleave on the tiny model, driven by forced tokens (no trained model needed): the round
//! state machine, the exact tokens fed to every round and to the answer, the limits, and the two ways
//! the injected question can attend. Expected prompts are built token by token from MSA-SPEC §3.3 and
//! §4.5, not by the code under test.

mod common;
#[path = "support/interleave_model.rs"]
mod interleave_model;

use msa::core::TokenRole::{self, Context, Routing, Template};
use msa::core::{QueryPrompt, SamplingParams};
use msa::engine::{
    Backend, BlockAttention, CpuBackend, Error, GenerateOptions, InterleaveEvent, InterleaveFinish,
    InterleaveOptions, InterleaveOutcome, Memory, Model, Phase, RetrievalEnd, Trace,
};

use common::fixture_dir;

struct Fixture {
    _dir: tempfile::TempDir,
    model: Model<CpuBackend>,
    documents: Vec<String>,
    question: String,
}

impl Fixture {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let path = interleave_model::write_interleave_model(&fixture_dir("msa-tiny"), dir.path());
        let model = Model::load(&path, CpuBackend::new()).unwrap();
        let strings = |file: &str| -> Vec<String> {
            let text = std::fs::read_to_string(fixture_dir("msa-tiny").join(file)).unwrap();
            serde_json::from_str(&text).unwrap()
        };
        // Eight short documents (ids 0..7) keep every round's prompt small.
        let documents = strings("memory.json")
            .iter()
            .take(8)
            .map(|d| d.chars().take(24).collect())
            .collect();
        let question = strings("queries.json")[0].clone();
        Fixture {
            _dir: dir,
            model,
            documents,
            question,
        }
    }

    fn memory(&self) -> Memory<CpuBackend> {
        pollster::block_on(self.model.encode_documents(&self.documents, |_| {})).unwrap()
    }

    /// Tokens spelled out one by one: each string is one vocabulary entry.
    fn literal(&self, tokens: &[&str]) -> Vec<u32> {
        let tokenizer = self.model.tokenizer.as_ref().unwrap();
        tokens
            .iter()
            .map(|t| {
                tokenizer
                    .token_id(t)
                    .unwrap_or_else(|| panic!("{t:?} is not one token"))
            })
            .collect()
    }

    /// CJK text, one token per character.
    fn characters(&self, text: &str) -> Vec<u32> {
        let pieces: Vec<String> = text.chars().map(String::from).collect();
        self.literal(&pieces.iter().map(String::as_str).collect::<Vec<_>>())
    }

    /// Text as the model would generate it (tokenized).
    fn encode(&self, text: &str) -> Vec<u32> {
        self.model.tokenizer.as_ref().unwrap().encode(text).unwrap()
    }

    /// `\nPlease answer … information\n\n{question}\nPlease return all documents related to the
    /// question` (MSA-SPEC §3.3), without the closing newline.
    fn question_part(&self) -> Vec<u32> {
        let mut ids = self.literal(&[
            "\n",
            "Please",
            " answer",
            " the",
            " question",
            " based",
            " on",
            " the",
            " above",
            " historical",
            " document",
            " information",
            "\n",
            "\n",
        ]);
        ids.extend(self.characters(&self.question));
        ids.extend(self.literal(&[
            "\n",
            "Please",
            " return",
            " all",
            " documents",
            " related",
            " to",
            " the",
            " question",
        ]));
        ids
    }

    /// `[id]. {text}\n` for each id, as injected.
    fn injected(&self, ids: &[usize]) -> Vec<u32> {
        let mut out = Vec::new();
        for &id in ids {
            out.extend(self.literal(&["[", &id.to_string(), "]", ".", " "]));
            out.extend(self.characters(&self.documents[id]));
            out.extend(self.literal(&["\n"]));
        }
        out
    }

    fn run(&self, memory: &Memory<CpuBackend>, options: &InterleaveOptions) -> Run {
        let mut events = Vec::new();
        let outcome =
            pollster::block_on(
                self.model
                    .interleave(memory, &self.question, options, |e| events.push(e)),
            )
            .unwrap();
        Run { events, outcome }
    }
}

fn forcing(tokens: Vec<u32>) -> InterleaveOptions {
    InterleaveOptions {
        forced_tokens: tokens,
        ..InterleaveOptions::default()
    }
}

/// A prompt from `(tokens, role)` segments.
fn prompt(segments: &[(Vec<u32>, TokenRole)]) -> QueryPrompt {
    let mut p = QueryPrompt {
        ids: Vec::new(),
        roles: Vec::new(),
    };
    for (ids, role) in segments {
        p.ids.extend(ids);
        p.roles.extend(std::iter::repeat_n(*role, ids.len()));
    }
    p
}

struct Run {
    events: Vec<InterleaveEvent>,
    outcome: InterleaveOutcome,
}

impl Run {
    fn prompts(&self) -> Vec<&QueryPrompt> {
        self.events
            .iter()
            .filter_map(|e| match e {
                InterleaveEvent::RoundStarted { prompt, .. } => Some(prompt),
                _ => None,
            })
            .collect()
    }

    fn named(&self) -> Vec<(usize, Vec<usize>)> {
        self.events
            .iter()
            .filter_map(|e| match e {
                InterleaveEvent::IdsNamed { round, ids } => Some((*round, ids.clone())),
                _ => None,
            })
            .collect()
    }

    fn injected(&self) -> Vec<(usize, Vec<usize>)> {
        self.events
            .iter()
            .filter_map(|e| match e {
                InterleaveEvent::DocumentsInjected { round, ids, .. } => {
                    Some((*round, ids.clone()))
                }
                _ => None,
            })
            .collect()
    }

    fn retrieval_end(&self) -> Option<(usize, RetrievalEnd, Vec<u32>)> {
        self.events.iter().find_map(|e| match e {
            InterleaveEvent::RetrievalEnded { round, reason, fed } => {
                Some((*round, *reason, fed.clone()))
            }
            _ => None,
        })
    }

    fn tokens_of(&self, phase: Phase) -> Vec<u32> {
        self.events
            .iter()
            .filter_map(|e| match e {
                InterleaveEvent::Token { phase: p, id, .. } if *p == phase => Some(*id),
                _ => None,
            })
            .collect()
    }
}

#[test]
fn rounds_name_documents_inject_them_and_reroute_until_the_answer() {
    let f = Fixture::new();
    let memory = f.memory();
    let round_1 = "[3][1][3]<|object_ref_end|>"; // a repeated id
    let round_2 = "[7][42]<|object_ref_end|>"; // 42 is not in the memory
    let round_3 = "<End-of-Retrieve>"; // seven tokens
    let answer = format!(
        "The answer to the question is: {}<|im_end|>",
        &f.documents[7][..6]
    );
    let forced = [round_1, round_2, round_3, &answer].map(|t| f.encode(t));
    assert_eq!(forced[2].len(), 7, "<End-of-Retrieve> spans tokens");
    let run = f.run(&memory, &forcing(forced.concat()));

    assert_eq!(run.outcome.finish, InterleaveFinish::Answered);
    assert_eq!(run.outcome.answer.as_deref(), Some(&f.documents[7][..6]));
    assert_eq!(run.outcome.rounds, 3);
    assert_eq!(run.outcome.tokens, forced.concat());
    assert_eq!(run.named(), [(1, vec![1, 3]), (2, vec![7, 42])]);
    assert_eq!(run.injected(), [(1, vec![1, 3]), (2, vec![7])]);
    for (round, tokens) in forced.iter().take(3).enumerate() {
        assert_eq!(&run.tokens_of(Phase::Retrieval(round + 1)), tokens);
    }
    assert_eq!(run.tokens_of(Phase::Answer), forced[3]);

    // Every round routes in both router layers and selects the top 3 of 8 (scores of every document
    // only when asked for).
    let routed: Vec<(usize, usize, usize)> = run
        .events
        .iter()
        .filter_map(|e| match e {
            InterleaveEvent::Routed {
                round,
                routing,
                scores: None,
                ..
            } => Some((*round, routing.layer, routing.documents.len())),
            _ => None,
        })
        .collect();
    assert_eq!(
        routed,
        [
            (1, 2, 3),
            (1, 3, 3),
            (2, 2, 3),
            (2, 3, 3),
            (3, 2, 3),
            (3, 3, 3)
        ]
    );

    // Round 1: the question prompt; the question part routes, its closing newline included.
    let tail = f.literal(&["\n", "<|im_end|>", "\n", "<|im_start|>"]);
    let prompts = run.prompts();
    assert_eq!(
        *prompts[0],
        prompt(&[
            ([f.question_part(), f.literal(&["\n"])].concat(), Routing),
            (f.literal(&["<|im_end|>", "\n"]), Template),
            (f.literal(&["<|im_start|>"]), Context),
        ])
    );
    // Round 2: the whole conversation; the question part and the newest injection route.
    let round_end = f.literal(&["<|object_ref_end|>"]);
    let expected_2 = [
        (f.question_part(), Routing),
        ([tail.clone(), forced[0].clone()].concat(), Context),
        (f.injected(&[1, 3]), Routing),
        (round_end.clone(), Context),
    ];
    assert_eq!(*prompts[1], prompt(&expected_2));
    // Round 3: the earlier injection no longer routes.
    let mut expected_3 = expected_2.to_vec();
    expected_3[2].1 = Context;
    expected_3.extend([
        (forced[1].clone(), Context),
        (f.injected(&[7]), Routing),
        (round_end.clone(), Context),
    ]);
    assert_eq!(*prompts[2], prompt(&expected_3));

    // The end of retrieval feeds the question once more.
    let (round, reason, fed) = run.retrieval_end().unwrap();
    assert_eq!((round, reason), (3, RetrievalEnd::Marker));
    let mut question = f.literal(&[
        "<|im_start|>",
        "The",
        " user",
        "'",
        "s",
        " question",
        " is",
        ":",
        " ",
    ]);
    question.extend(f.characters(&f.question));
    question.extend(f.literal(&["\n", "<|object_ref_end|>"]));
    assert_eq!(fed, question);

    let transcript = format!(
        "\nPlease answer the question based on the above historical document information\n\n{q}\
         \nPlease return all documents related to the question\n<|im_end|>\n<|im_start|>\
         {round_1}[1]. {d1}\n[3]. {d3}\n<|object_ref_end|>{round_2}[7]. {d7}\n<|object_ref_end|>\
         {round_3}<|im_start|>The user's question is: {q}\n<|object_ref_end|>{answer}",
        q = f.question,
        d1 = f.documents[1],
        d3 = f.documents[3],
        d7 = f.documents[7],
    );
    assert_eq!(run.outcome.transcript, transcript);
}

#[test]
fn a_round_can_end_retrieval_at_once() {
    let f = Fixture::new();
    let memory = f.memory();
    let forced = f.encode("<End-of-Retrieve>The answer to the question is: 丽<|im_end|>");
    let run = f.run(&memory, &forcing(forced));
    assert_eq!(run.outcome.finish, InterleaveFinish::Answered);
    assert_eq!(run.outcome.rounds, 1);
    assert!(run.named().is_empty() && run.injected().is_empty());
    assert_eq!(run.retrieval_end().unwrap().0, 1);
    assert_eq!(run.outcome.answer.as_deref(), Some("丽"));
}

/// Round 2 computes exactly what a fresh stage-2 prefill of the hand-built conversation computes:
/// nothing is carried over from round 1, and positions restart at 3 + k.
#[test]
fn a_later_round_is_a_fresh_prefill_of_the_whole_conversation() {
    let f = Fixture::new();
    let memory = f.memory();
    let round_1 = f.encode("[5][2]<|object_ref_end|>");
    // Round 1 is forced (7 tokens); round 2 samples up to the same limit (seeded sampling follows the
    // logits closely; the tiny model's greedy choice hardly depends on the context).
    let options = InterleaveOptions {
        max_round_tokens: round_1.len(),
        sampling: SAMPLING,
        document_scores: true,
        ..forcing(round_1.clone())
    };
    let run = f.run(&memory, &options);
    let sampled = run.tokens_of(Phase::Retrieval(2));

    let expected = prompt(&[
        (f.question_part(), Routing),
        (
            [
                f.literal(&["\n", "<|im_end|>", "\n", "<|im_start|>"]),
                round_1.clone(),
            ]
            .concat(),
            Context,
        ),
        (f.injected(&[2, 5]), Routing),
        (f.literal(&["<|object_ref_end|>"]), Context),
    ]);
    let mut trace = Trace::default();
    let (session, logits) =
        pollster::block_on(f.model.prefill_query(&memory, &expected, Some(&mut trace))).unwrap();
    let routing = session.routing().to_vec();
    let scores = pollster::block_on(trace.read_document_scores(&f.model.backend)).unwrap();
    let mut generation = f
        .model
        .generation(
            session,
            logits,
            &GenerateOptions {
                max_tokens: round_1.len(),
                sampling: SAMPLING,
                ..GenerateOptions::default()
            },
        )
        .unwrap();
    let direct = pollster::block_on(generation.collect_tokens()).unwrap();
    assert_eq!(sampled.len(), round_1.len());
    assert_eq!(sampled, direct);
    let (round_2_routing, round_2_scores): (Vec<_>, Vec<_>) = run
        .events
        .iter()
        .filter_map(|e| match e {
            InterleaveEvent::Routed {
                round: 2,
                routing,
                scores,
                ..
            } => Some((
                routing.clone(),
                scores.clone().expect("scores were asked for"),
            )),
            _ => None,
        })
        .unzip();
    assert_eq!(round_2_routing, routing);
    // Every document's score, as the hand-built prefill's trace has them.
    assert_eq!(round_2_scores, scores);
    assert!(scores.iter().all(|layer| layer.len() == f.documents.len()));
}

/// The answer after `<End-of-Retrieve>` computed by hand: prefill, every retrieval token fed one at a
/// time (the last one too: the reference runs it and discards its prediction), then the question
/// injection, fed as `question` says, then seeded sampling. The bidirectional case feeds the block the
/// way the engine does, so it checks the wiring; what bidirectional means is checked on its own below.
fn answer_by_hand(f: &Fixture, memory: &Memory<CpuBackend>, question: Question) -> Vec<u32> {
    let prompt = f
        .model
        .tokenizer
        .as_ref()
        .unwrap()
        .question_prompt(&f.question)
        .unwrap();
    let (mut session, _) =
        pollster::block_on(f.model.prefill_query(memory, &prompt, None)).unwrap();
    for token in f.encode("<End-of-Retrieve>") {
        pollster::block_on(session.decode(token)).unwrap();
    }
    let injection = f.encode(&format!(
        "<|im_start|>The user's question is: {}\n<|object_ref_end|>",
        f.question
    ));
    let logits = match question {
        Question::OneByOne => {
            let mut logits = Vec::new();
            for &token in &injection {
                logits = pollster::block_on(session.decode(token)).unwrap();
            }
            logits
        }
        Question::Bidirectional => {
            pollster::block_on(session.extend(&injection, BlockAttention::Bidirectional, None))
                .unwrap()
        }
    };
    let options = GenerateOptions {
        max_tokens: 6,
        sampling: SAMPLING,
        stop_tokens: Some(Vec::new()),
    };
    let mut generation = f.model.generation(session, logits, &options).unwrap();
    pollster::block_on(generation.collect_tokens()).unwrap()
}

/// Sampled, not greedy: the tiny random model's greedy answer repeats one token whatever the context,
/// while a seeded sample follows small differences in the logits.
const SAMPLING: SamplingParams = SamplingParams {
    temperature: 1.0,
    top_p: 1.0,
    seed: 7,
};

#[derive(Clone, Copy)]
enum Question {
    OneByOne,
    Bidirectional,
}

fn answer_in_mode(f: &Fixture, memory: &Memory<CpuBackend>, mode: BlockAttention) -> Vec<u32> {
    let options = InterleaveOptions {
        max_answer_tokens: 6,
        sampling: SAMPLING,
        question_attention: mode,
        stop_tokens: Some(Vec::new()),
        ..forcing(f.encode("<End-of-Retrieve>"))
    };
    let run = f.run(memory, &options);
    assert_eq!(run.outcome.finish, InterleaveFinish::TokenLimit);
    run.tokens_of(Phase::Answer)
}

#[test]
fn the_causal_default_feeds_the_question_as_if_token_by_token() {
    let f = Fixture::new();
    let memory = f.memory();
    assert_eq!(
        InterleaveOptions::default().question_attention,
        BlockAttention::Causal
    );
    assert_eq!(
        answer_in_mode(&f, &memory, BlockAttention::Causal),
        answer_by_hand(&f, &memory, Question::OneByOne)
    );
}

#[test]
fn the_parity_mode_lets_the_injected_question_attend_both_ways() {
    let f = Fixture::new();
    let memory = f.memory();
    let parity = answer_in_mode(&f, &memory, BlockAttention::Bidirectional);
    assert_eq!(parity, answer_by_hand(&f, &memory, Question::Bidirectional));
    assert_ne!(
        parity,
        answer_by_hand(&f, &memory, Question::OneByOne),
        "the two modes should answer differently on this input"
    );

    // What the mode means: with bidirectional attention the block's first token sees its last one.
    let first_row_after = |mode: BlockAttention, last: u32| -> Vec<f32> {
        let (mut session, _) =
            pollster::block_on(f.model.prefill_dense(&[10, 11, 12], None)).unwrap();
        let mut trace = Trace::default();
        pollster::block_on(session.extend(&[20, 21, last], mode, Some(&mut trace))).unwrap();
        let hidden = trace.hidden.last().unwrap();
        pollster::block_on(f.model.backend.read(hidden)).unwrap()[..f.model.config.hidden_size]
            .to_vec()
    };
    for (mode, sees_ahead) in [
        (BlockAttention::Causal, false),
        (BlockAttention::Bidirectional, true),
    ] {
        let a = first_row_after(mode, 30);
        let b = first_row_after(mode, 31);
        assert_eq!(a != b, sees_ahead, "{mode:?}");
    }
}

#[test]
fn a_round_naming_only_unknown_ids_routes_on_the_previous_injection() {
    let f = Fixture::new();
    let memory = f.memory();
    let forced = [
        f.encode("[1]<|object_ref_end|>"),
        f.encode("[42]<|object_ref_end|>"),
    ];
    let options = InterleaveOptions {
        max_rounds: 3,
        max_round_tokens: 4,
        ..forcing(forced.concat())
    };
    let run = f.run(&memory, &options);
    assert_eq!(run.injected(), [(1, vec![1]), (2, vec![])]);
    let round_end = f.literal(&["<|object_ref_end|>"]);
    assert_eq!(
        *run.prompts()[2],
        prompt(&[
            (f.question_part(), Routing),
            (
                [
                    f.literal(&["\n", "<|im_end|>", "\n", "<|im_start|>"]),
                    forced[0].clone()
                ]
                .concat(),
                Context
            ),
            (f.injected(&[1]), Routing),
            (
                [round_end.clone(), forced[1].clone(), round_end].concat(),
                Context
            ),
        ])
    );
}

#[test]
fn an_answer_without_end_of_retrieve_still_counts() {
    let f = Fixture::new();
    let memory = f.memory();
    let run = f.run(
        &memory,
        &forcing(f.encode("The answer to the question is: 丽<|im_end|>")),
    );
    assert_eq!(run.outcome.finish, InterleaveFinish::Answered);
    assert_eq!(run.outcome.answer.as_deref(), Some("丽"));
    assert_eq!(run.outcome.rounds, 1);
    assert!(run.retrieval_end().is_none());
}

#[test]
fn a_round_past_the_character_cap_ends_retrieval() {
    let f = Fixture::new();
    let memory = f.memory();
    // 91 × " historical" is 1001 characters: one past the reference's cap, with no marker.
    let mut forced = f.literal(&[" historical"]).repeat(91);
    forced.extend(f.encode("The answer to the question is: 丽<|im_end|>"));
    let run = f.run(&memory, &forcing(forced));
    let (round, reason, _) = run.retrieval_end().unwrap();
    assert_eq!((round, reason), (1, RetrievalEnd::CharacterCap));
    assert_eq!(run.tokens_of(Phase::Retrieval(1)).len(), 91);
    assert_eq!(run.outcome.finish, InterleaveFinish::Answered);
}

#[test]
fn limits_and_stop_tokens_end_a_run_with_their_reason() {
    let f = Fixture::new();
    let memory = f.memory();
    let with = |forced: &str, edit: fn(&mut InterleaveOptions)| {
        let mut options = forcing(f.encode(forced));
        edit(&mut options);
        f.run(&memory, &options)
    };

    let run = with("[1]<|object_ref_end|>[2]<|object_ref_end|>", |o| {
        o.max_rounds = 2
    });
    assert_eq!(run.outcome.finish, InterleaveFinish::RoundLimit);
    assert_eq!(run.outcome.rounds, 2);
    assert_eq!(run.named(), [(1, vec![1]), (2, vec![2])]);
    assert_eq!(
        run.injected(),
        [(1, vec![1])],
        "nothing is injected after the last round"
    );

    let run = with("[1][2][3]<|object_ref_end|>", |o| o.max_round_tokens = 4);
    assert_eq!(run.outcome.finish, InterleaveFinish::TokenLimit);
    assert_eq!(run.outcome.tokens.len(), 4);

    let run = with("<End-of-Retrieve>The answer to the question is: 丽", |o| {
        o.max_answer_tokens = 3
    });
    assert_eq!(run.outcome.finish, InterleaveFinish::TokenLimit);
    assert_eq!(run.outcome.answer, None, "the lead-in was cut off");

    let run = with("[1]<|im_end|>", |_| {});
    assert_eq!(run.outcome.finish, InterleaveFinish::EndOfSequence);
    assert_eq!((run.outcome.rounds, run.outcome.tokens.len()), (1, 4));

    let run = with("<End-of-Retrieve>丽<|im_end|>", |_| {});
    assert_eq!(run.outcome.finish, InterleaveFinish::EndOfSequence);
    assert_eq!(run.outcome.answer, None, "no lead-in, no answer");
}

#[test]
fn bad_requests_are_refused() {
    let f = Fixture::new();
    let memory = f.memory();
    let ask = |question: &str, options: InterleaveOptions| {
        pollster::block_on(f.model.interleave(&memory, question, &options, |_| {})).unwrap_err()
    };
    assert!(matches!(
        ask(" ", InterleaveOptions::default()),
        Error::EmptyQuestion
    ));
    let error = ask(
        &f.question,
        InterleaveOptions {
            max_rounds: 0,
            ..InterleaveOptions::default()
        },
    );
    assert!(error.to_string().contains("max_rounds"), "{error}");
    assert!(matches!(
        ask(&f.question, forcing(vec![1, 512])),
        Error::TokenOutOfRange { id: 512, .. }
    ));
    let error = ask(
        &f.question,
        InterleaveOptions {
            sampling: SamplingParams {
                top_p: 2.0,
                ..SamplingParams::greedy()
            },
            ..InterleaveOptions::default()
        },
    );
    assert!(error.to_string().contains("top_p"), "{error}");
}

/// The protocol is backend-generic: on wgpu, the same forced run names, injects and routes alike.
#[test]
fn interleave_on_wgpu_routes_like_the_cpu() {
    let Some(gpu) = common::wgpu_backend() else {
        return;
    };
    let f = Fixture::new();
    let forced = f.encode("[3][1]<|object_ref_end|>[6]<|object_ref_end|><End-of-Retrieve>");
    let options = InterleaveOptions {
        max_answer_tokens: 3,
        ..forcing(forced)
    };
    let routed = |events: &[InterleaveEvent]| -> Vec<(usize, usize, Vec<usize>)> {
        events
            .iter()
            .filter_map(|e| match e {
                InterleaveEvent::Routed { round, routing, .. } => Some((
                    *round,
                    routing.layer,
                    routing.documents.iter().map(|d| d.id).collect(),
                )),
                _ => None,
            })
            .collect()
    };
    let cpu = f.run(&f.memory(), &options);

    let dir = tempfile::tempdir().unwrap();
    let path = interleave_model::write_interleave_model(&fixture_dir("msa-tiny"), dir.path());
    let model = Model::load(&path, gpu).unwrap();
    let memory = pollster::block_on(model.encode_documents(&f.documents, |_| {})).unwrap();
    let mut events = Vec::new();
    let outcome =
        pollster::block_on(model.interleave(&memory, &f.question, &options, |e| events.push(e)))
            .unwrap();
    assert_eq!(outcome.rounds, 3);
    assert_eq!(routed(&events), routed(&cpu.events));
    assert_eq!(routed(&events).len(), 6);
    assert_eq!(outcome.tokens, cpu.outcome.tokens, "greedy answer tokens");
}
