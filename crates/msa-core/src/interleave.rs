//! Memory Interleave's text protocol (MSA-SPEC §4.5): what a retrieval round's generated text asks for,
//! the text injected in reply, the prompt of the next round with its routing regions, and the answer.
//!
//! A round decodes document ids (`[4][7]`) until `<|object_ref_end|>`; the named documents' texts are
//! injected and the whole conversation is prefilled again, routing on the question and the newest
//! injection. `<End-of-Retrieve>` ends retrieval: the question is injected once more and the model
//! answers `The answer to the question is: …<|im_end|>`. This module is text only; the engine runs the
//! rounds.

use crate::error::{Error, Result};
use crate::tokenizer::{MsaTokenizer, QUESTION_PREFIX, QUESTION_SUFFIX, QueryPrompt, TokenRole};

/// Ends a retrieval round, both in the model's output and after every injection.
pub const ROUND_END: &str = "<|object_ref_end|>";
/// Ends retrieval: the model is ready to answer.
pub const END_OF_RETRIEVE: &str = "<End-of-Retrieve>";
/// What the model writes before its answer.
pub const ANSWER_LEAD: &str = "The answer to the question is:";
/// The end-of-turn token's text, which ends the answer.
pub const END_OF_TURN: &str = "<|im_end|>";
/// The reference ends retrieval when a round has produced more than this many characters without
/// ending (`generate.py` L304–306).
pub const CHARACTER_CAP: usize = 1000;

/// What a round's generated text asks for so far.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RoundSignal {
    /// Keep decoding.
    Continue,
    /// `<|object_ref_end|>`: inject the documents the round named, then start a new round.
    RoundEnd,
    /// `<End-of-Retrieve>`, or the character cap: inject the question and answer.
    RetrievalEnd,
}

/// Collects one round's generated text and tells when the round is over. Markers may arrive split
/// across tokens (`<End-` `of-Re` `trieve>`): the whole text is searched after every piece.
#[derive(Clone, Debug, Default)]
pub struct RoundScanner {
    text: String,
    chars: usize,
}

impl RoundScanner {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds the text of one generated token.
    pub fn push(&mut self, piece: &str) -> RoundSignal {
        self.text.push_str(piece);
        self.chars += piece.chars().count();
        if self.text.contains(END_OF_RETRIEVE) || self.chars > CHARACTER_CAP {
            RoundSignal::RetrievalEnd
        } else if self.text.contains(ROUND_END) {
            RoundSignal::RoundEnd
        } else {
            RoundSignal::Continue
        }
    }

    /// The round's text so far.
    pub fn text(&self) -> &str {
        &self.text
    }
}

/// Every `[n]` in `text`, ascending and without repeats.
pub fn referenced_ids(text: &str) -> Vec<usize> {
    let mut ids: Vec<usize> = text
        .split('[')
        .skip(1)
        .filter_map(|rest| {
            let (digits, _) = rest.split_once(']')?;
            if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
                return None;
            }
            digits.parse().ok()
        })
        .collect();
    ids.sort_unstable();
    ids.dedup();
    ids
}

/// The reply to a round that named `ids`: `[n]. {text}\n` for every id `text_of` knows (ids it does not
/// know are skipped), then `<|object_ref_end|>`. Returns the text and the ids injected.
pub fn document_injection(
    ids: &[usize],
    mut text_of: impl FnMut(usize) -> Option<String>,
) -> (String, Vec<usize>) {
    let mut text = String::new();
    let mut injected = Vec::new();
    for &id in ids {
        if let Some(document) = text_of(id) {
            text.push_str(&format!("[{id}]. {document}\n"));
            injected.push(id);
        }
    }
    text.push_str(ROUND_END);
    (text, injected)
}

/// The reply to the end of retrieval: the question once more (`generate.py` L212–219).
pub fn question_injection(question: &str) -> String {
    format!("<|im_start|>The user's question is: {question}\n{ROUND_END}")
}

/// The text of the first round's prompt (question part, template tail, response head), the start of
/// every later round's conversation.
pub fn first_round_text(question: &str) -> String {
    format!(
        "{QUESTION_PREFIX}{question}{QUESTION_SUFFIX}{}{}",
        crate::tokenizer::TEMPLATE_TAIL,
        crate::tokenizer::RESPONSE_HEAD
    )
}

/// The prompt of a later round (`MSAEngine._apply_template_regenerate`): the whole conversation so far,
/// tokenized as one text with nothing appended. Two regions route: (a) every token up to the end of
/// the question part's closing line, "Please return all documents related to the question"; (b) the
/// most recent injection's documents, from the `[` of the last `]<|object_ref_end|>[` up to the next
/// `<|object_ref_end|>`. An injection of no documents (every id unknown) has no such `[`, so the one
/// before it routes again. Every other token is context.
pub fn next_round_prompt(tokenizer: &MsaTokenizer, conversation: &str) -> Result<QueryPrompt> {
    let closing = QUESTION_SUFFIX.trim();
    let question_end = conversation
        .find(closing)
        .map(|at| at + closing.len())
        .ok_or_else(|| Error::Interleave(format!("the conversation lacks `{closing}`")))?;
    let marker = format!("]{ROUND_END}[");
    let injected = conversation.rfind(&marker).and_then(|at| {
        let start = at + marker.len() - 1; // the `[` that opens the injection
        let end = start + conversation[start..].find(ROUND_END)?;
        Some(start..end)
    });
    let (ids, roles) = tokenizer
        .encode_with_starts(conversation)?
        .into_iter()
        .map(|(id, start)| {
            let routes =
                start < question_end || injected.as_ref().is_some_and(|r| r.contains(&start));
            let role = if routes {
                TokenRole::Routing
            } else {
                TokenRole::Context
            };
            (id, role)
        })
        .unzip();
    Ok(QueryPrompt { ids, roles })
}

/// The answer in a finished response: the text after the last `The answer to the question is:` up to
/// `<|im_end|>`, trimmed; `None` when the model never wrote the lead-in.
pub fn parse_answer(text: &str) -> Option<&str> {
    let (_, after) = text.rsplit_once(ANSWER_LEAD)?;
    Some(after.split(END_OF_TURN).next().unwrap_or("").trim())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scan(pieces: &[&str]) -> Vec<RoundSignal> {
        let mut scanner = RoundScanner::new();
        pieces.iter().map(|p| scanner.push(p)).collect()
    }

    #[test]
    fn a_round_ends_at_the_marker_even_split_across_tokens() {
        use RoundSignal::*;
        assert_eq!(
            scan(&["[3]", "[1]", "<|object_ref_end|>"]),
            [Continue, Continue, RoundEnd]
        );
        assert_eq!(
            scan(&["[2]", "<End-", "of-Re", "trieve>"]),
            [Continue, Continue, Continue, RetrievalEnd]
        );
        // End of retrieval wins over a round end in the same text.
        assert_eq!(
            scan(&["<End-of-Retrieve><|object_ref_end|>"]),
            [RetrievalEnd]
        );
    }

    #[test]
    fn a_round_past_the_character_cap_ends_retrieval() {
        let mut scanner = RoundScanner::new();
        // 1000 characters (multi-byte ones count once) are allowed; the 1001st ends retrieval.
        assert_eq!(
            scanner.push(&"é".repeat(CHARACTER_CAP)),
            RoundSignal::Continue
        );
        assert_eq!(scanner.push("x"), RoundSignal::RetrievalEnd);
    }

    #[test]
    fn ids_are_sorted_deduplicated_and_well_formed() {
        assert_eq!(referenced_ids("[12][3] and [3], [x] [] [-1] [4"), [3, 12]);
        assert!(referenced_ids("no ids").is_empty());
    }

    #[test]
    fn injections_skip_unknown_ids() {
        let texts = ["zero", "one", "two"];
        let (text, ids) = document_injection(&[0, 2, 9], |id| texts.get(id).map(|t| t.to_string()));
        assert_eq!(text, "[0]. zero\n[2]. two\n<|object_ref_end|>");
        assert_eq!(ids, [0, 2]);
        assert_eq!(document_injection(&[9], |_| None).0, ROUND_END);
        assert_eq!(
            question_injection("Who?"),
            "<|im_start|>The user's question is: Who?\n<|object_ref_end|>"
        );
    }

    #[test]
    fn answers_are_read_after_the_last_lead_in() {
        assert_eq!(
            parse_answer("x The answer to the question is: May 5, 1939<|im_end|>"),
            Some("May 5, 1939")
        );
        assert_eq!(
            parse_answer("The answer to the question is: a The answer to the question is: b"),
            Some("b")
        );
        assert_eq!(parse_answer("no answer"), None);
    }
}
