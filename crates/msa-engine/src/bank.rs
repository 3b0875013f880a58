//! Memories on disk: creating a bank for a model, encoding a corpus into it (resumable, appendable), and
//! opening it as a [`Memory`] whose routing keys live on one or several devices (Memory Parallel) and
//! whose content K̄/V̄ stay in the bank's memory-mapped host pages until a query selects them.

use std::collections::HashMap;
use std::ops::Range;
use std::path::Path;

use half::bf16;
use msa_core::bank::{Bank, BankTensor, LayerRows, NewDocument, digest};

use crate::backend::Backend;
use crate::error::{Error, Result};
use crate::memory::{Content, EncodeProgress, Memory, MemoryDocument, PACK_TOKENS, Stopwatch};
use crate::model::Model;
use crate::shard::{RemoteShard, RoutingShard, ShardKeys, shard_ranges};

/// A document of a corpus: where it came from and its text.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SourceDocument {
    /// A file path, a JSONL id: unique within a bank; what a resumed encoding matches on.
    pub source: String,
    pub text: String,
}

/// Settings of [`Model::encode_into_bank`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BankEncodeOptions {
    /// Tokens encoded between commits: each commit is one crash-safe append, so at most this much work
    /// is lost by an interruption.
    pub commit_tokens: usize,
    /// Tokens per stage-1 forward (documents packed with block-diagonal attention).
    pub pack_tokens: usize,
}

impl Default for BankEncodeOptions {
    fn default() -> Self {
        BankEncodeOptions {
            commit_tokens: 1 << 16,
            pack_tokens: PACK_TOKENS,
        }
    }
}

/// What [`Model::encode_into_bank`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BankEncodeReport {
    /// Corpus documents already in the bank (same source, same text), left alone.
    pub skipped: usize,
    pub encoded: usize,
    pub tokens: usize,
}

fn bank_error(bank: &Bank, problem: String) -> Error {
    msa_core::Error::Bank {
        path: bank.dir().to_path_buf(),
        problem,
    }
    .into()
}

fn to_bf16_bytes(values: &[f32]) -> Vec<u8> {
    values
        .iter()
        .flat_map(|&x| bf16::from_f32(x).to_le_bytes())
        .collect()
}

impl<B: Backend> Model<B> {
    fn check_bank(&self, bank: &Bank) -> Result<()> {
        let ours = self.memory_fingerprint()?;
        let differences = bank.fingerprint().differences(&ours);
        if differences.is_empty() {
            return Ok(());
        }
        Err(Error::MemoryMismatch {
            memory: format!("bank {}", bank.dir().display()),
            differences: differences.join(", "),
        })
    }

    /// Creates an empty bank for this model in `dir`, storing the template head's K and V.
    pub async fn create_bank(&self, dir: impl AsRef<Path>) -> Result<Bank> {
        let fingerprint = self.memory_fingerprint()?;
        let ids = self.require_tokenizer()?.template_head_ids()?;
        let b = &self.backend;
        let mut template = Vec::with_capacity(self.config.num_hidden_layers);
        for (k, v) in self.encode_template(&ids)? {
            template.push((b.read(&k).await?, b.read(&v).await?));
        }
        Ok(Bank::create(dir, fingerprint, ids.len(), &template)?)
    }

    /// Encodes the documents of `corpus` that the bank does not hold yet (stage 1) and appends them,
    /// committing every [`BankEncodeOptions::commit_tokens`] tokens. Documents whose source the bank
    /// holds with the same text are skipped, so re-running an interrupted encoding resumes it and
    /// running a grown corpus appends the new documents; a source whose text changed is an error.
    pub async fn encode_into_bank(
        &self,
        bank: &mut Bank,
        corpus: &[SourceDocument],
        options: BankEncodeOptions,
        mut progress: impl FnMut(EncodeProgress),
    ) -> Result<BankEncodeReport> {
        self.check_bank(bank)?;
        let known: HashMap<&str, u32> = bank
            .documents()
            .iter()
            .map(|d| (d.source.as_str(), d.text_digest))
            .collect();
        let mut todo = Vec::new();
        let mut skipped = 0;
        let mut sources = std::collections::HashSet::with_capacity(corpus.len());
        if let Some(doc) = corpus.iter().find(|d| !sources.insert(d.source.as_str())) {
            return Err(bank_error(
                bank,
                format!(
                    "the corpus lists source `{}` twice; sources name documents and must be unique",
                    doc.source
                ),
            ));
        }
        for doc in corpus {
            let text_digest = digest(doc.text.as_bytes());
            match known.get(doc.source.as_str()) {
                Some(&d) if d == text_digest => skipped += 1,
                Some(_) => {
                    return Err(bank_error(
                        bank,
                        format!(
                            "document `{}` changed since it was encoded; encode it under a new source name or into a new bank",
                            doc.source
                        ),
                    ));
                }
                None => todo.push((doc, text_digest)),
            }
        }
        drop(known);
        let first_id = bank.documents().len();
        let texts: Vec<&str> = todo.iter().map(|(d, _)| d.text.as_str()).collect();
        let ids = self.tokenize_documents(&texts, first_id)?;
        let tokens_total: usize = ids.iter().map(Vec::len).sum();
        let clock = Stopwatch::start();
        let mut report = BankEncodeReport {
            skipped,
            encoded: 0,
            tokens: 0,
        };
        let mut start = 0;
        while start < todo.len() {
            // One commit: documents until the token budget is reached (at least one).
            let mut end = start;
            let mut tokens = 0;
            while end < todo.len() && (end == start || tokens < options.commit_tokens) {
                tokens += ids[end].len();
                end += 1;
            }
            let blocks =
                self.encode_packed(&ids[start..end], options.pack_tokens, |docs, tokens| {
                    report.encoded += docs;
                    report.tokens += tokens;
                    progress(EncodeProgress {
                        documents_done: report.encoded,
                        documents_total: todo.len(),
                        tokens_done: report.tokens,
                        tokens_total,
                        elapsed: clock.elapsed(),
                    });
                })?;
            let b = &self.backend;
            let mut rows = Vec::with_capacity(blocks.first().map_or(0, Vec::len));
            for slot in 0..blocks.first().map_or(0, Vec::len) {
                let mut read = Vec::with_capacity(3);
                for tensor in [BankTensor::RoutingKeys, BankTensor::K, BankTensor::V] {
                    let parts: Vec<&B::Tensor> = blocks
                        .iter()
                        .map(|block| match tensor {
                            BankTensor::RoutingKeys => &block[slot].routing_keys,
                            BankTensor::K => &block[slot].k,
                            BankTensor::V => &block[slot].v,
                        })
                        .collect();
                    read.push(to_bf16_bytes(&b.read(&b.concat_rows(&parts)?).await?));
                }
                let [routing_keys, k, v]: [Vec<u8>; 3] =
                    read.try_into().expect("one read per tensor");
                rows.push(LayerRows { routing_keys, k, v });
            }
            drop(blocks);
            let documents = todo[start..end]
                .iter()
                .zip(&ids[start..end])
                .map(|((doc, text_digest), ids)| NewDocument {
                    source: doc.source.clone(),
                    tokens: ids.len(),
                    text: Some(doc.text.clone()),
                    text_digest: *text_digest,
                })
                .collect();
            let mut rows = rows.into_iter();
            bank.append(
                documents,
                |_| Ok(rows.next().expect("one set of rows per router layer")),
                |_| {},
            )?;
            start = end;
        }
        Ok(report)
    }

    /// A memory over a bank: the routing keys are uploaded once, sharded by document across `devices`
    /// balanced by chunk count (Memory Parallel; with no devices, all on the model's backend), and the
    /// content stays in the bank's host pages until a query selects it.
    pub fn open_memory(&self, bank: Bank, devices: Vec<B>) -> Result<Memory<B>> {
        self.open_memory_with(bank, devices, Vec::new())
    }

    /// [`Model::open_memory`] with shards in other processes too: the local devices (or the model's
    /// backend) take the first ranks, `remotes` the following ones in order. Each remote must serve
    /// this bank's rank it is given, of this many shards.
    pub fn open_memory_with(
        &self,
        bank: Bank,
        devices: Vec<B>,
        remotes: Vec<Box<dyn RemoteShard<B>>>,
    ) -> Result<Memory<B>> {
        self.check_bank(&bank)?;
        Memory::from_bank_with(&self.backend, bank, devices, remotes)
    }
}

impl<B: Backend> Memory<B> {
    /// A memory over a bank without a model (benchmarks, tools): template and routing keys uploaded to
    /// `b` (or sharded over `devices`), content left in the bank's host pages. [`Model::open_memory`] is
    /// the checked way for a model to open one.
    pub fn from_bank(b: &B, bank: Bank, devices: Vec<B>) -> Result<Memory<B>> {
        Self::from_bank_with(b, bank, devices, Vec::new())
    }

    /// [`Memory::from_bank`] with shards in other processes after the local ones (see
    /// [`Model::open_memory_with`]).
    pub fn from_bank_with(
        b: &B,
        bank: Bank,
        devices: Vec<B>,
        remotes: Vec<Box<dyn RemoteShard<B>>>,
    ) -> Result<Memory<B>> {
        let fp = bank.fingerprint().clone();
        let shape = [bank.template_tokens(), fp.num_key_value_heads, fp.head_dim];
        let template = (0..fp.num_hidden_layers)
            .map(|layer| {
                let (k, v) = bank.template(layer);
                Ok((
                    b.upload(&bytemuck::pod_collect_to_vec(k), &shape)?,
                    b.upload(&bytemuck::pod_collect_to_vec(v), &shape)?,
                ))
            })
            .collect::<Result<Vec<_>>>()?;
        let documents: Vec<MemoryDocument> = bank
            .documents()
            .iter()
            .map(|d| MemoryDocument {
                id: d.id,
                token_count: d.tokens,
                chunks: d.chunk_range(),
            })
            .collect();
        let doc_chunk_offsets = bank.chunk_offsets(0..documents.len());
        let local = devices.len().max(1);
        let world = local + remotes.len();
        let ranges = shard_ranges(&doc_chunk_offsets, world);
        if !remotes.is_empty() {
            check_remotes(&bank, &remotes, &ranges, local, world)?;
        }
        let mut devices = devices.into_iter().map(Some).collect::<Vec<_>>();
        if devices.is_empty() {
            devices.push(None);
        }
        let mut shards = Vec::with_capacity(world);
        for (range, device) in ranges.iter().cloned().zip(devices) {
            let keys = ShardKeys::load(device.as_ref().unwrap_or(b), &bank, range, |_| {})?;
            shards.push(RoutingShard::Local { device, keys });
        }
        shards.extend(remotes.into_iter().map(RoutingShard::Remote));
        Ok(Memory {
            fingerprint: fp,
            documents,
            doc_chunk_offsets,
            template,
            shards,
            content: Content::Host(Box::new(bank)),
            texts: Vec::new(),
        })
    }
}

/// Checks that every remote shard serves this bank's documents of its rank, of `world` shards.
fn check_remotes<B: Backend>(
    bank: &Bank,
    remotes: &[Box<dyn RemoteShard<B>>],
    ranges: &[Range<usize>],
    local: usize,
    world: usize,
) -> Result<()> {
    if ranges.len() < world {
        return Err(Error::Shard {
            shard: format!("{world} shards ({local} here, {} remote)", remotes.len()),
            detail: format!(
                "the bank's {} documents cannot be split into that many non-empty shards",
                bank.documents().len()
            ),
        });
    }
    let digest = bank.manifest().content_digest();
    for (offset, remote) in remotes.iter().enumerate() {
        let rank = local + offset;
        let placed = remote.placement();
        let fail = |detail: String| Error::Shard {
            shard: remote.describe(),
            detail,
        };
        let differences = placed.fingerprint.differences(bank.fingerprint());
        if !differences.is_empty() {
            return Err(fail(format!(
                "its bank was encoded by a different model (shard vs this bank: {})",
                differences.join(", ")
            )));
        }
        if placed.bank_digest != digest {
            return Err(fail(format!(
                "it serves another bank, or another version of this one (content digest {:08x}, \
                 this bank's is {digest:08x}, {} documents): serve the same bank, and restart \
                 the shard servers after appending to it",
                placed.bank_digest,
                bank.documents().len()
            )));
        }
        if (placed.rank, placed.world) != (rank, world) {
            return Err(fail(format!(
                "it serves shard {} of {}, but this run needs shard {rank} of {world} here \
                 ({local} local shard(s), then the remote ones in order)",
                placed.rank, placed.world
            )));
        }
        let expected = &ranges[rank];
        let key_bytes =
            bank.chunk_range(expected.clone()).len() as u64 * bank.fingerprint().row_bytes() as u64;
        if placed.documents != *expected || placed.key_bytes != key_bytes {
            return Err(fail(format!(
                "it serves documents {:?} ({} key bytes per layer); shard {rank} of {world} is \
                 documents {expected:?} ({key_bytes})",
                placed.documents, placed.key_bytes
            )));
        }
    }
    Ok(())
}
