//! Tokenizer (`tokenizer.json` through the `tokenizers` crate) and the exact MSA prompt construction.
//!
//! The reference tokenizes prompt pieces separately and concatenates the ids (MSA-SPEC §4.4); BPE merges
//! across piece boundaries could otherwise differ, so this module does the same.

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// Stage-1 template head, run once per memory bank at positions 0..2 (MSA-SPEC §3.2).
pub const TEMPLATE_HEAD: &str = "<|im_start|>user\n";
/// Stage-2 template tail after the question (`doc_ids = -2`).
pub const TEMPLATE_TAIL: &str = "<|im_end|>\n";
/// The response head that ends every stage-2 prompt (`doc_ids = -1`); no `assistant\n` follows.
pub const RESPONSE_HEAD: &str = "<|im_start|>";
pub const QUESTION_PREFIX: &str =
    "\nPlease answer the question based on the above historical document information\n\n";
pub const QUESTION_SUFFIX: &str = "\nPlease return all documents related to the question\n";

/// What a prompt token is for; mirrors the reference's `doc_ids` tensor (MSA-SPEC §3.1).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TokenRole {
    /// `doc_ids == 0`: the routing query (question text).
    Routing,
    /// `doc_ids == -2`: template tokens.
    Template,
    /// `doc_ids == -1`: other context (the response head, generated tokens).
    Context,
}

/// A stage-2 prompt: ids and the role of every id.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct QueryPrompt {
    pub ids: Vec<u32>,
    pub roles: Vec<TokenRole>,
}

impl QueryPrompt {
    /// Indices of the routing-query tokens.
    pub fn routing_positions(&self) -> Vec<u32> {
        self.roles
            .iter()
            .enumerate()
            .filter(|(_, r)| **r == TokenRole::Routing)
            .map(|(i, _)| i as u32)
            .collect()
    }
}

/// A Hugging Face tokenizer plus the MSA prompt format.
pub struct MsaTokenizer {
    inner: tokenizers::Tokenizer,
    origin: PathBuf,
}

impl MsaTokenizer {
    #[cfg(not(target_arch = "wasm32"))]
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        if !path.is_file() {
            return Err(Error::Tokenizer {
                path: path.to_path_buf(),
                detail: "file not found; a model directory needs its tokenizer.json".into(),
            });
        }
        let inner = tokenizers::Tokenizer::from_file(path).map_err(|e| Error::Tokenizer {
            path: path.to_path_buf(),
            detail: e.to_string(),
        })?;
        Ok(MsaTokenizer {
            inner,
            origin: path.to_path_buf(),
        })
    }

    /// Parses `tokenizer.json` content already in memory; `origin` names it in errors.
    pub fn from_bytes(bytes: &[u8], origin: impl AsRef<Path>) -> Result<Self> {
        let origin = origin.as_ref().to_path_buf();
        let inner = tokenizers::Tokenizer::from_bytes(bytes).map_err(|e| Error::Tokenizer {
            path: origin.clone(),
            detail: e.to_string(),
        })?;
        Ok(MsaTokenizer { inner, origin })
    }

    fn error(&self, detail: impl Into<String>) -> Error {
        Error::Tokenizer {
            path: self.origin.clone(),
            detail: detail.into(),
        }
    }

    /// Tokenizes like the reference's `tokenizer(text)` (special tokens are parsed, none are added
    /// by Qwen's post-processor).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let encoding = self
            .inner
            .encode(text, true)
            .map_err(|e| self.error(format!("cannot encode text: {e}")))?;
        Ok(encoding.get_ids().to_vec())
    }

    /// [`MsaTokenizer::encode`], pairing each id with the byte offset in `text` where its token starts.
    pub fn encode_with_starts(&self, text: &str) -> Result<Vec<(u32, usize)>> {
        let encoding = self
            .inner
            .encode(text, true)
            .map_err(|e| self.error(format!("cannot encode text: {e}")))?;
        Ok(encoding
            .get_ids()
            .iter()
            .zip(encoding.get_offsets())
            .map(|(&id, &(start, _))| (id, start))
            .collect())
    }

    /// Decodes ids to text, keeping special tokens (the interleave protocol reads them).
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner
            .decode(ids, false)
            .map_err(|e| self.error(format!("cannot decode {ids:?}: {e}")))
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// Ids of the stage-1 template head `<|im_start|>user\n`.
    pub fn template_head_ids(&self) -> Result<Vec<u32>> {
        self.encode(TEMPLATE_HEAD)
    }

    /// The wrapped text of memory document `global_id`: `<|im_start|>[id]. {text}[id]<|im_end|>`.
    pub fn document_text(global_id: usize, text: &str) -> String {
        format!("<|im_start|>[{global_id}]. {text}[{global_id}]<|im_end|>")
    }

    /// Token ids of memory document `global_id` as stage 1 consumes them.
    pub fn document_ids(&self, global_id: usize, text: &str) -> Result<Vec<u32>> {
        self.encode(&Self::document_text(global_id, text))
    }

    /// The stage-2 prompt of a question: `tok(prefix + question + suffix) ++ tok(tail) ++ tok(head)`.
    pub fn question_prompt(&self, question: &str) -> Result<QueryPrompt> {
        let query = self.encode(&format!("{QUESTION_PREFIX}{question}{QUESTION_SUFFIX}"))?;
        let tail = self.encode(TEMPLATE_TAIL)?;
        let head = self.encode(RESPONSE_HEAD)?;
        let mut roles = vec![TokenRole::Routing; query.len()];
        roles.extend(std::iter::repeat_n(TokenRole::Template, tail.len()));
        roles.extend(std::iter::repeat_n(TokenRole::Context, head.len()));
        let ids = [query, tail, head].concat();
        Ok(QueryPrompt { ids, roles })
    }
}

/// The `tokenizers` incremental decoder for a `tokenizer.json` tokenizer.
type DecodeStream<'t> = tokenizers::DecodeStream<
    't,
    tokenizers::ModelWrapper,
    tokenizers::NormalizerWrapper,
    tokenizers::PreTokenizerWrapper,
    tokenizers::PostProcessorWrapper,
    tokenizers::DecoderWrapper,
>;

/// Turns a stream of token ids into text pieces. With byte-level BPE one character may span several
/// tokens, so a piece is released only once it is complete (the `tokenizers` decode stream, which decodes a
/// short window, not the whole answer); concatenating every piece plus [`TextStream::finish`] gives the
/// full decode.
pub struct TextStream<'t> {
    tokenizer: &'t MsaTokenizer,
    stream: DecodeStream<'t>,
    ids: Vec<u32>,
    /// Bytes of text released so far.
    released: usize,
}

impl<'t> TextStream<'t> {
    pub fn new(tokenizer: &'t MsaTokenizer) -> Self {
        TextStream {
            tokenizer,
            stream: tokenizer.inner.decode_stream(false),
            ids: Vec::new(),
            released: 0,
        }
    }

    /// Adds a token; returns the text that became complete (possibly empty).
    pub fn push(&mut self, id: u32) -> Result<String> {
        self.ids.push(id);
        let piece = self
            .stream
            .step(id)
            .map_err(|e| {
                self.tokenizer
                    .error(format!("cannot decode token {id}: {e}"))
            })?
            .unwrap_or_default();
        self.released += piece.len();
        Ok(piece)
    }

    /// Whatever is still held back, e.g. a character cut off by the end of generation.
    pub fn finish(&mut self) -> Result<String> {
        let text = self.tokenizer.decode(&self.ids)?;
        let rest = text.get(self.released..).unwrap_or_default().to_string();
        self.released = text.len();
        Ok(rest)
    }
}
