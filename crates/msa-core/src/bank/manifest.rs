//! `bank.json`: the manifest of a memory bank, and the consistency rules every loaded one must meet.

use serde::{Deserialize, Serialize};

use crate::config::{ModelConfig, ScoreMode};

/// The bank format this build writes, and the newest it reads.
pub const FORMAT_VERSION: u32 = 1;
/// The `format` field of every manifest.
#[cfg_attr(target_arch = "wasm32", allow(dead_code))] // read and written by the native store
pub const FORMAT_NAME: &str = "msa-memory-bank";

/// The model properties a memory depends on: a memory only serves a model with the same ones.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryFingerprint {
    pub num_hidden_layers: usize,
    pub hidden_size: usize,
    pub router_layers: Vec<usize>,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub pooling_kernel_size: usize,
    pub score_mode: ScoreMode,
    /// CRC-32 of the first router layer's `router_k_proj` weight as stored: tells apart two checkpoints
    /// of the same shape (a fine-tune, a random-weight test model).
    pub weights_digest: u32,
}

impl MemoryFingerprint {
    /// Checks that the shapes describe a memory: router layers that increase and lie below the
    /// layer count, and no zero sizes.
    pub fn check(&self) -> Result<(), String> {
        if self.router_layers.is_empty()
            || self.pooling_kernel_size == 0
            || self.num_key_value_heads == 0
            || self.head_dim == 0
        {
            return Err(format!("the fingerprint describes no memory: {self:?}"));
        }
        if !self.router_layers.windows(2).all(|w| w[0] < w[1])
            || self.router_layers.last() >= Some(&self.num_hidden_layers)
        {
            return Err(format!(
                "router layers {:?} must increase and lie below {} layers",
                self.router_layers, self.num_hidden_layers
            ));
        }
        Ok(())
    }

    /// The memory shapes of a model with this config and memory-weights digest; `None` for a model
    /// without `msa_config` (it has no memory).
    pub fn of(config: &ModelConfig, weights_digest: u32) -> Option<Self> {
        let msa = config.msa.as_ref()?;
        Some(MemoryFingerprint {
            num_hidden_layers: config.num_hidden_layers,
            hidden_size: config.hidden_size,
            router_layers: msa.router_layers.clone(),
            num_key_value_heads: config.num_key_value_heads,
            head_dim: config.head_dim,
            pooling_kernel_size: msa.pooling_kernel_size,
            score_mode: msa.score_mode,
            weights_digest,
        })
    }

    /// The fields on which `self` and `other` differ, as `name: ours vs theirs`.
    pub fn differences(&self, other: &Self) -> Vec<String> {
        type Field = fn(&MemoryFingerprint) -> String;
        let fields: [(&str, Field); 8] = [
            ("num_hidden_layers", |f| f.num_hidden_layers.to_string()),
            ("hidden_size", |f| f.hidden_size.to_string()),
            ("router_layers", |f| format!("{:?}", f.router_layers)),
            ("num_key_value_heads", |f| f.num_key_value_heads.to_string()),
            ("head_dim", |f| f.head_dim.to_string()),
            ("pooling_kernel_size", |f| f.pooling_kernel_size.to_string()),
            ("score_mode", |f| format!("{:?}", f.score_mode)),
            ("weights_digest", |f| format!("{:08x}", f.weights_digest)),
        ];
        fields
            .iter()
            .filter_map(|(name, get)| {
                let (ours, theirs) = (get(self), get(other));
                (ours != theirs).then(|| format!("{name}: {ours} vs {theirs}"))
            })
            .collect()
    }

    /// Chunks of a document of `tokens` tokens.
    pub fn chunks_of(&self, tokens: usize) -> u64 {
        tokens.div_ceil(self.pooling_kernel_size) as u64
    }

    /// Bytes of one pooled row `[kv_heads, head_dim]` in bf16.
    pub fn row_bytes(&self) -> usize {
        self.num_key_value_heads * self.head_dim * super::BANK_ELEMENT_BYTES
    }
}

/// One document of a bank.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BankDocument {
    /// Global id: the number inside `[id]`, equal to the document's position in the table.
    pub id: usize,
    /// Where it came from (a file path, a JSONL id): what a resumed encoding matches on.
    pub source: String,
    /// Tokens of the wrapped document.
    pub tokens: usize,
    /// Its chunk range `[start, end)` in every router layer.
    pub chunks: [u32; 2],
    /// CRC-32 of the document's text, so a resumed encoding notices a changed source.
    pub text_digest: u32,
}

impl BankDocument {
    pub fn chunk_range(&self) -> std::ops::Range<u32> {
        self.chunks[0]..self.chunks[1]
    }
}

/// A data file of the bank.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileEntry {
    /// File name inside the bank directory.
    pub file: String,
    pub bytes: u64,
    pub crc32: u32,
}

/// What one append wrote.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Segment {
    pub index: u32,
    /// Document ids `[start, end)`.
    pub documents: [usize; 2],
    /// Chunks `[start, end)`.
    pub chunks: [u32; 2],
    /// One file per router layer, in router-layer order.
    pub layers: Vec<FileEntry>,
    /// The documents' original text, a JSON array of strings, when known.
    pub texts: Option<FileEntry>,
}

/// `bank.json`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    pub format: String,
    pub version: u32,
    pub fingerprint: MemoryFingerprint,
    /// Tokens of the template head stored in `template`.
    pub template_tokens: usize,
    pub template: FileEntry,
    pub segments: Vec<Segment>,
    pub documents: Vec<BankDocument>,
}

impl Manifest {
    /// Checks the manifest's own consistency: ids are positions, documents tile the chunks in order,
    /// segments tile the documents. Returns the first problem found.
    pub fn check(&self) -> Result<(), String> {
        let fp = &self.fingerprint;
        fp.check()?;
        let mut chunk = 0u64;
        let mut sources = std::collections::HashSet::with_capacity(self.documents.len());
        for (i, doc) in self.documents.iter().enumerate() {
            if doc.id != i {
                return Err(format!("document {i} has id {}", doc.id));
            }
            if !sources.insert(doc.source.as_str()) {
                return Err(format!("document {i} repeats the source `{}`", doc.source));
            }
            let expected = chunk..chunk + fp.chunks_of(doc.tokens);
            let actual = u64::from(doc.chunks[0])..u64::from(doc.chunks[1]);
            if doc.tokens == 0 || actual != expected {
                return Err(format!(
                    "document {i} ({} tokens) has chunks {actual:?}, expected {expected:?}",
                    doc.tokens,
                ));
            }
            chunk = expected.end;
        }
        let (mut document, mut chunk) = (0usize, 0u32);
        if let Some(w) = self.segments.windows(2).find(|w| w[0].index >= w[1].index) {
            return Err(format!(
                "segment numbers must increase: {} comes after {}",
                w[1].index, w[0].index
            ));
        }
        for segment in &self.segments {
            let [first, end] = segment.documents;
            if first != document || end <= first || end > self.documents.len() {
                return Err(format!(
                    "segment {} holds documents {first}..{end}, expected to start at {document}",
                    segment.index
                ));
            }
            let chunks = self.documents[first].chunks[0]..self.documents[end - 1].chunks[1];
            if segment.chunks != [chunks.start, chunks.end] || chunks.start != chunk {
                return Err(format!(
                    "segment {} holds chunks {:?}, its documents span {chunks:?}",
                    segment.index, segment.chunks
                ));
            }
            if segment.layers.len() != fp.router_layers.len() {
                return Err(format!(
                    "segment {} has {} layer files for {} router layers",
                    segment.index,
                    segment.layers.len(),
                    fp.router_layers.len()
                ));
            }
            (document, chunk) = (end, chunks.end);
        }
        if document != self.documents.len() {
            return Err(format!(
                "segments hold {document} documents, the table lists {}",
                self.documents.len()
            ));
        }
        Ok(())
    }

    pub fn chunk_count(&self) -> u32 {
        self.documents.last().map_or(0, |d| d.chunks[1])
    }

    /// CRC-32 of the document table and every data file's checksum: two copies of a bank (on two
    /// machines serving Memory Parallel shards) agree on it exactly when they hold the same documents
    /// and rows. Streamed, so a table of millions of documents is never held as one string.
    pub fn content_digest(&self) -> u32 {
        struct Crc(crc32fast::Hasher);
        impl std::io::Write for Crc {
            fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
                self.0.update(bytes);
                Ok(bytes.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let mut crc = Crc(crc32fast::Hasher::new());
        serde_json::to_writer(&mut crc, &(&self.documents, &self.segments, &self.template))
            .expect("a manifest serialises");
        crc.0.finalize()
    }
}
