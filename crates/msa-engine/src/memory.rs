//! Stage 1, global memory encoding (MSA-SPEC §3.2, §3.5): every document runs through the layers on its
//! own with document-local positions; router layers keep the chunk-mean pooled K, V and routing keys.
//! The template head `<|im_start|>user\n` is encoded once and kept for every layer.

use std::ops::Range;
use std::time::Duration;

pub use msa_core::MemoryFingerprint;
#[cfg(not(target_arch = "wasm32"))]
use msa_core::bank::Bank;
use msa_core::{MsaConfig, MsaTokenizer, ScoreMode};

use crate::backend::{AttentionMask, Backend};
use crate::error::{Error, Result};
use crate::model::Model;
use crate::shard::{RoutingShard, ShardKeys};

/// One encoded document.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MemoryDocument {
    /// Global document id: its index in the corpus, the number inside `[id]`.
    pub id: usize,
    /// Tokens of the wrapped document.
    pub token_count: usize,
    /// Its chunks in every router layer's pooled tensors.
    pub chunks: Range<u32>,
}

/// Pooled memory of one router layer; every tensor is chunk-major `[chunks, kv_heads, head_dim]`.
pub struct LayerMemory<T> {
    pub layer: usize,
    /// Chunk means of the post-norm, post-RoPE keys (document-local positions).
    pub k: T,
    /// Chunk means of the values.
    pub v: T,
    /// Chunk means of `router_k_proj(x)`; L2-normalised in cosine score mode.
    pub routing_keys: T,
}

/// Where the content K̄/V̄ of the memory lives.
pub(crate) enum Content<B: Backend> {
    /// On the model's backend, f32: a memory encoded in this process.
    Device(Vec<LayerMemory<B::Tensor>>),
    /// In the bank's memory-mapped host pages, bf16: fetched per query for the selected documents.
    #[cfg(not(target_arch = "wasm32"))]
    Host(Box<Bank>),
}

/// A memory: what stage 2 needs to route and attend. Built by encoding documents in this process
/// ([`Model::encode_documents`]) or by opening a bank ([`Model::open_memory`]).
pub struct Memory<B: Backend> {
    pub(crate) fingerprint: MemoryFingerprint,
    pub(crate) documents: Vec<MemoryDocument>,
    /// `[0, end of doc 0, end of doc 1, …]`, kept with `documents` so routing never rebuilds it.
    pub(crate) doc_chunk_offsets: Vec<u32>,
    /// Template-head K and V of every layer: `[template_len, kv_heads, head_dim]`.
    pub(crate) template: Vec<(B::Tensor, B::Tensor)>,
    pub(crate) shards: Vec<RoutingShard<B>>,
    pub(crate) content: Content<B>,
    /// Per document of a memory encoded in this process, its original text when encoded from text
    /// (a bank keeps its own).
    pub(crate) texts: Vec<Option<String>>,
}

impl<B: Backend> Memory<B> {
    pub fn documents(&self) -> &[MemoryDocument] {
        &self.documents
    }

    pub fn is_empty(&self) -> bool {
        self.documents.is_empty()
    }

    /// The pooled tensors of a memory encoded in this process, per router layer; empty for a memory
    /// opened from a bank (its content stays on disk, see [`Memory::bank`]).
    pub fn layers(&self) -> &[LayerMemory<B::Tensor>] {
        match &self.content {
            Content::Device(layers) => layers,
            #[cfg(not(target_arch = "wasm32"))]
            Content::Host(_) => &[],
        }
    }

    /// The pooled memory of router layer `layer`, for a memory encoded in this process.
    pub fn layer(&self, layer: usize) -> Option<&LayerMemory<B::Tensor>> {
        self.layers().iter().find(|m| m.layer == layer)
    }

    /// The bank a memory was opened from.
    #[cfg(not(target_arch = "wasm32"))]
    pub fn bank(&self) -> Option<&Bank> {
        match &self.content {
            Content::Device(_) => None,
            Content::Host(bank) => Some(bank),
        }
    }

    /// Shards the routing keys are split over (Memory Parallel): devices of this process and shard
    /// servers.
    pub fn devices(&self) -> usize {
        self.shards.len()
    }

    /// Bytes the routing keys occupy on the device(s), all router layers.
    pub fn device_bytes(&self) -> u64 {
        let layers = self.fingerprint.router_layers.len() as u64;
        self.shards.iter().map(|s| s.key_bytes() * layers).sum()
    }

    /// Bytes of content K̄/V̄ kept in host pages (0 when the content is on the device).
    pub fn host_bytes(&self) -> u64 {
        match &self.content {
            Content::Device(_) => 0,
            #[cfg(not(target_arch = "wasm32"))]
            Content::Host(bank) => {
                2 * bank.tensor_bytes() * self.fingerprint.router_layers.len() as u64
            }
        }
    }

    /// The original texts of the documents with global ids `ids`, in that order, which Memory
    /// Interleave injects when the model names them: kept for documents encoded from text in this
    /// process, read from the bank (each segment's texts file once) for a memory opened from one. `None`
    /// for an unknown id or a document encoded from token ids alone.
    pub fn document_texts(&self, ids: &[usize]) -> Result<Vec<Option<String>>> {
        match &self.content {
            Content::Device(_) => Ok(ids
                .iter()
                .map(|&id| self.texts.get(id).cloned().flatten())
                .collect()),
            #[cfg(not(target_arch = "wasm32"))]
            Content::Host(bank) => Ok(bank.document_texts(ids)?),
        }
    }

    pub fn template(&self, layer: usize) -> &(B::Tensor, B::Tensor) {
        &self.template[layer]
    }

    pub fn score_mode(&self) -> ScoreMode {
        self.fingerprint.score_mode
    }

    pub fn fingerprint(&self) -> &MemoryFingerprint {
        &self.fingerprint
    }

    pub fn chunk_count(&self) -> usize {
        *self.doc_chunk_offsets.last().expect("starts with 0") as usize
    }

    /// `[0, end of doc 0, end of doc 1, …]`: the chunk ranges in the form the routing op takes.
    pub fn doc_chunk_offsets(&self) -> &[u32] {
        &self.doc_chunk_offsets
    }
}

/// A summary: the tensors themselves live on the backend.
impl<B: Backend> std::fmt::Debug for Memory<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Memory")
            .field("documents", &self.documents.len())
            .field(
                "tokens",
                &self.documents.iter().map(|d| d.token_count).sum::<usize>(),
            )
            .field("chunks", &self.chunk_count())
            .field("devices", &self.devices())
            .field("fingerprint", &self.fingerprint)
            .finish()
    }
}

/// Tokens per stage-1 forward: documents are packed up to this many (a block's activations must fit
/// one storage binding: at MSA-4B's MLP width, 2,048 rows are 80 MB, under a browser's 128 MiB).
pub const PACK_TOKENS: usize = 2048;

/// Progress of a stage-1 encoding run, reported after every packed block of documents.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EncodeProgress {
    pub documents_done: usize,
    pub documents_total: usize,
    pub tokens_done: usize,
    pub tokens_total: usize,
    /// Since the run started (zero where the platform has no clock, as in a browser's wasm).
    pub elapsed: Duration,
}

impl EncodeProgress {
    pub fn tokens_per_second(&self) -> f64 {
        self.tokens_done as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    /// Time left at the rate so far; `None` before any rate is known.
    pub fn eta(&self) -> Option<Duration> {
        let rate = self.tokens_per_second();
        (self.tokens_done > 0 && !self.elapsed.is_zero())
            .then(|| Duration::from_secs_f64((self.tokens_total - self.tokens_done) as f64 / rate))
    }
}

/// Wall-clock time since a start, where the platform has a clock (`std::time::Instant` panics on
/// wasm32-unknown-unknown, so there it reads zero).
pub(crate) struct Stopwatch(#[cfg(not(target_arch = "wasm32"))] std::time::Instant);

impl Stopwatch {
    pub(crate) fn start() -> Self {
        Stopwatch(
            #[cfg(not(target_arch = "wasm32"))]
            std::time::Instant::now(),
        )
    }

    pub(crate) fn elapsed(&self) -> Duration {
        #[cfg(not(target_arch = "wasm32"))]
        return self.0.elapsed();
        #[cfg(target_arch = "wasm32")]
        Duration::ZERO
    }
}

impl<B: Backend> Model<B> {
    pub(crate) fn msa_config(&self, what: &'static str) -> Result<&MsaConfig> {
        self.config.msa.as_ref().ok_or(Error::NotAnMsaModel(what))
    }

    /// What a memory encoded by this model records about it.
    pub fn memory_fingerprint(&self) -> Result<MemoryFingerprint> {
        MemoryFingerprint::of(&self.config, self.weights_digest)
            .ok_or(Error::NotAnMsaModel("memory encoding"))
    }

    /// Refuses a memory encoded by a model of another shape.
    pub(crate) fn check_memory(&self, memory: &Memory<B>) -> Result<()> {
        let ours = self.memory_fingerprint()?;
        let differences = memory.fingerprint.differences(&ours);
        if !differences.is_empty() {
            return Err(Error::MemoryMismatch {
                memory: "this memory".into(),
                differences: differences.join(", "),
            });
        }
        Ok(())
    }

    /// Tokenizes and wraps documents as `<|im_start|>[id]. {text}[id]<|im_end|>`, with ids continuing
    /// after `first_id`.
    pub fn tokenize_documents(
        &self,
        texts: &[impl AsRef<str>],
        first_id: usize,
    ) -> Result<Vec<Vec<u32>>> {
        let tokenizer = self.require_tokenizer()?;
        texts
            .iter()
            .enumerate()
            .map(|(i, text)| {
                if text.as_ref().trim().is_empty() {
                    return Err(Error::EmptyDocument {
                        index: first_id + i,
                    });
                }
                Ok(tokenizer.document_ids(first_id + i, text.as_ref())?)
            })
            .collect()
    }

    /// The tokenizer, or an error saying text input needs one.
    pub fn require_tokenizer(&self) -> Result<&MsaTokenizer> {
        self.tokenizer.as_ref().ok_or_else(|| {
            Error::Core(msa_core::Error::Tokenizer {
                path: "tokenizer.json".into(),
                detail: "this model was loaded without a tokenizer; text input needs one".into(),
            })
        })
    }

    /// Encodes text documents into a new memory (stage 1).
    pub async fn encode_documents(
        &self,
        texts: &[impl AsRef<str>],
        progress: impl FnMut(EncodeProgress),
    ) -> Result<Memory<B>> {
        let documents = self.tokenize_documents(texts, 0)?;
        let template = self.require_tokenizer()?.template_head_ids()?;
        let texts = texts.iter().map(|t| Some(t.as_ref().to_string())).collect();
        self.encode_new(&template, &documents, texts, progress)
            .await
    }

    /// Encodes already-tokenized, already-wrapped documents (stage 1). `template_ids` is the tokenized
    /// template head `<|im_start|>user\n`.
    pub async fn encode_token_documents(
        &self,
        template_ids: &[u32],
        documents: &[Vec<u32>],
        progress: impl FnMut(EncodeProgress),
    ) -> Result<Memory<B>> {
        self.encode_new(
            template_ids,
            documents,
            vec![None; documents.len()],
            progress,
        )
        .await
    }

    async fn encode_new(
        &self,
        template_ids: &[u32],
        documents: &[Vec<u32>],
        texts: Vec<Option<String>>,
        progress: impl FnMut(EncodeProgress),
    ) -> Result<Memory<B>> {
        let fingerprint = self.memory_fingerprint()?;
        if template_ids.is_empty() {
            return Err(Error::EmptyPrompt);
        }
        let template = self.encode_template(template_ids)?;
        let mut memory = Memory {
            fingerprint,
            documents: Vec::new(),
            doc_chunk_offsets: vec![0],
            template,
            shards: Vec::new(),
            content: Content::Device(Vec::new()),
            texts: Vec::new(),
        };
        self.append_token_documents(&mut memory, documents, texts, progress)
            .await?;
        Ok(memory)
    }

    /// Appends text documents to a memory; their ids continue after the existing ones.
    pub async fn add_documents(
        &self,
        memory: &mut Memory<B>,
        texts: &[impl AsRef<str>],
        progress: impl FnMut(EncodeProgress),
    ) -> Result<()> {
        self.check_memory(memory)?;
        let documents = self.tokenize_documents(texts, memory.documents.len())?;
        let texts = texts.iter().map(|t| Some(t.as_ref().to_string())).collect();
        self.append_token_documents(memory, &documents, texts, progress)
            .await
    }

    async fn append_token_documents(
        &self,
        memory: &mut Memory<B>,
        documents: &[Vec<u32>],
        texts: Vec<Option<String>>,
        mut progress: impl FnMut(EncodeProgress),
    ) -> Result<()> {
        let msa = self.msa_config("memory encoding")?;
        if documents.is_empty() {
            return Ok(());
        }
        if let Some(index) = documents.iter().position(Vec::is_empty) {
            return Err(Error::EmptyDocument {
                index: memory.documents.len() + index,
            });
        }
        // Encode everything first so a failure leaves the memory as it was.
        let (mut documents_done, mut tokens_done) = (0, 0);
        let tokens_total = documents.iter().map(Vec::len).sum();
        let clock = Stopwatch::start();
        let blocks = self.encode_packed(documents, PACK_TOKENS, |docs, tokens| {
            documents_done += docs;
            tokens_done += tokens;
            progress(EncodeProgress {
                documents_done,
                documents_total: documents.len(),
                tokens_done,
                tokens_total,
                elapsed: clock.elapsed(),
            });
        })?;
        let b = &self.backend;
        #[allow(irrefutable_let_patterns)] // a browser build has no bank-backed memories
        let Content::Device(old_layers) = &memory.content else {
            return Err(Error::shape(
                "add_documents",
                "this memory was opened from a bank; append to the bank with encode_into_bank",
            ));
        };
        let stack = |existing: Option<&B::Tensor>,
                     pick: &dyn Fn(&LayerMemory<B::Tensor>) -> &B::Tensor,
                     slot: usize| {
            let parts: Vec<&B::Tensor> = existing
                .into_iter()
                .chain(blocks.iter().map(|block| pick(&block[slot])))
                .collect();
            b.concat_rows(&parts)
        };
        let mut layers = Vec::with_capacity(msa.router_layers.len());
        for (slot, &layer) in msa.router_layers.iter().enumerate() {
            let old = old_layers.get(slot);
            layers.push(LayerMemory {
                layer,
                k: stack(old.map(|m| &m.k), &|m| &m.k, slot)?,
                v: stack(old.map(|m| &m.v), &|m| &m.v, slot)?,
                routing_keys: stack(old.map(|m| &m.routing_keys), &|m| &m.routing_keys, slot)?,
            });
        }
        let keys = layers
            .iter()
            .map(|m| b.tensor_to_weight(&m.routing_keys))
            .collect::<Result<Vec<_>>>()?;
        // Only now, with every tensor built, does the memory change.
        memory.content = Content::Device(layers);
        memory.texts.extend(texts);
        for ids in documents {
            let start = memory.chunk_count() as u32;
            let end = start + ids.len().div_ceil(msa.pooling_kernel_size) as u32;
            memory.documents.push(MemoryDocument {
                id: memory.documents.len(),
                token_count: ids.len(),
                chunks: start..end,
            });
            memory.doc_chunk_offsets.push(end);
        }
        // One shard on the model's backend: the f32 keys, shared with the tensors above on a GPU.
        let row_bytes = self.config.num_key_value_heads * self.config.head_dim * 4;
        memory.shards = vec![RoutingShard::Local {
            device: None,
            keys: ShardKeys {
                first_document: 0,
                doc_chunk_offsets: memory.doc_chunk_offsets.clone(),
                keys,
                key_bytes: (memory.chunk_count() * row_bytes) as u64,
            },
        }];
        Ok(())
    }

    /// K and V of the template head at positions `0..len` for every layer. The template attends only to
    /// itself in the reference, so encoding it alone is exact.
    pub(crate) fn encode_template(&self, ids: &[u32]) -> Result<Vec<(B::Tensor, B::Tensor)>> {
        let b = &self.backend;
        let positions: Vec<u32> = (0..ids.len() as u32).collect();
        let mut hidden = b.embedding(&self.weights.embed_tokens, ids)?;
        let last = self.config.num_hidden_layers - 1;
        let mut out = Vec::with_capacity(last + 1);
        for layer in 0..=last {
            let (q, k, v) = self.project(layer, &hidden, &positions)?;
            if layer < last {
                hidden = self.attend_and_mlp(layer, &hidden, &q, &k, &v, AttentionMask::Causal)?;
            }
            out.push((k, v));
        }
        Ok(out)
    }

    /// Stage 1 over `documents`, many per forward: documents are packed into blocks of up to
    /// `pack_tokens` tokens (a longer document is a block alone) with document-local positions and
    /// block-diagonal attention, which computes exactly what one forward per document computes. Returns
    /// per block the pooled rows of its documents, in order; `done(documents, tokens)` hears after every
    /// block.
    pub(crate) fn encode_packed(
        &self,
        documents: &[Vec<u32>],
        pack_tokens: usize,
        mut done: impl FnMut(usize, usize),
    ) -> Result<Vec<Vec<LayerMemory<B::Tensor>>>> {
        // The widest activation row of a block (the MLP, the query heads or the hidden state) times
        // the rows must fit the device's largest tensor; a longer document still goes alone.
        let c = &self.config;
        let widest_row = 4 * c
            .intermediate_size
            .max(c.num_attention_heads * c.head_dim)
            .max(c.hidden_size) as u64;
        let pack_tokens = match self.backend.max_tensor_bytes() {
            Some(limit) => pack_tokens.min((limit / widest_row).max(1) as usize),
            None => pack_tokens,
        };
        let mut blocks = Vec::new();
        let mut start = 0;
        while start < documents.len() {
            let mut end = start + 1;
            let mut tokens = documents[start].len();
            while end < documents.len() && tokens + documents[end].len() <= pack_tokens {
                tokens += documents[end].len();
                end += 1;
            }
            blocks.push(self.encode_block(&documents[start..end])?);
            done(end - start, tokens);
            start = end;
        }
        Ok(blocks)
    }

    /// One packed block through the layers up to the last router layer, pooling every document's chunks
    /// on its own. Layers after the last router layer, and that layer's attention output and MLP, cannot
    /// affect the memory and are skipped.
    fn encode_block(&self, documents: &[Vec<u32>]) -> Result<Vec<LayerMemory<B::Tensor>>> {
        let msa = self.msa_config("memory encoding")?;
        let b = &self.backend;
        let ids = documents.concat();
        let positions: Vec<u32> = documents.iter().flat_map(|d| 0..d.len() as u32).collect();
        let mut ranges = Vec::with_capacity(documents.len());
        for d in documents {
            let start = ranges.last().map_or(0, |r: &Range<usize>| r.end);
            ranges.push(start..start + d.len());
        }
        let starts: Vec<u32> = ranges.iter().map(|r| r.start as u32).collect();
        let mask = match documents {
            [_] => AttentionMask::Causal,
            _ => AttentionMask::Packed(&starts),
        };
        // Chunk means per document (documents are not aligned to chunks), stacked in document order.
        let pool = |x: &B::Tensor| -> Result<B::Tensor> {
            let pooled = ranges
                .iter()
                .map(|r| b.chunk_mean_pool(&b.rows(x, r.clone())?, msa.pooling_kernel_size))
                .collect::<Result<Vec<_>>>()?;
            b.concat_rows(&pooled.iter().collect::<Vec<_>>())
        };
        let mut hidden = b.embedding(&self.weights.embed_tokens, &ids)?;
        let last_router = *msa
            .router_layers
            .last()
            .expect("config guarantees router layers");
        let mut pooled = Vec::with_capacity(msa.router_layers.len());
        for layer in 0..=last_router {
            let (q, k, v) = match &self.weights.layers[layer].router {
                // The router projector reads the normed input too.
                Some((_, router_k)) => {
                    let normed = self.input_norm(layer, &hidden)?;
                    let p = self.project_normed(layer, normed, &positions)?;
                    let routing =
                        self.project_heads(&p.normed, router_k, self.config.num_key_value_heads)?;
                    let mut routing_keys = pool(&routing)?;
                    if msa.score_mode == ScoreMode::Cosine {
                        routing_keys = b.l2_normalize(&routing_keys)?;
                    }
                    pooled.push(LayerMemory {
                        layer,
                        k: pool(&p.k)?,
                        v: pool(&p.v)?,
                        routing_keys,
                    });
                    (p.q, p.k, p.v)
                }
                None => self.project(layer, &hidden, &positions)?,
            };
            if layer < last_router {
                hidden = self.attend_and_mlp(layer, &hidden, &q, &k, &v, mask)?;
            }
        }
        Ok(pooled)
    }
}
