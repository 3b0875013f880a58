//! Creating, opening, verifying and appending to a bank directory.

use std::collections::HashSet;
use std::fs::File;
use std::io::Write;
use std::ops::Range;
use std::path::{Path, PathBuf};

use memmap2::Mmap;

use super::manifest::{FORMAT_NAME, FORMAT_VERSION};
use super::{BankDocument, FileEntry, Manifest, MemoryFingerprint, Segment, digest};
use crate::error::{Error, Result};

const MANIFEST: &str = "bank.json";
const MANIFEST_TMP: &str = "bank.json.tmp";
const LOCK: &str = "bank.lock";
/// How long an append waits for another writer's lock before giving up.
const LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(2);
const TEMPLATE: &str = "template.safetensors";

/// How [`Bank::open`] checks the files.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OpenOptions {
    /// Checks every file's CRC-32 (reads the whole bank once). Sizes and headers are always checked;
    /// turn this off only for a bank verified before, when opening time matters.
    pub verify_checksums: bool,
}

impl Default for OpenOptions {
    fn default() -> Self {
        OpenOptions {
            verify_checksums: true,
        }
    }
}

/// The three pooled tensors of a router layer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BankTensor {
    /// Routing keys K̄r: what the router scores, kept on the device.
    RoutingKeys,
    /// Content keys K̄: fetched for selected documents.
    K,
    /// Content values V̄: fetched for selected documents.
    V,
}

impl BankTensor {
    const ALL: [BankTensor; 3] = [BankTensor::RoutingKeys, BankTensor::K, BankTensor::V];

    fn name(self) -> &'static str {
        match self {
            BankTensor::RoutingKeys => "rk",
            BankTensor::K => "k",
            BankTensor::V => "v",
        }
    }
}

/// One router layer's rows of an append: little-endian bf16 bytes, each `[chunks, kv_heads, head_dim]`.
pub struct LayerRows {
    pub routing_keys: Vec<u8>,
    pub k: Vec<u8>,
    pub v: Vec<u8>,
}

/// A document to append.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NewDocument {
    /// Where it came from; what a resumed encoding matches on.
    pub source: String,
    /// Tokens of the wrapped document.
    pub tokens: usize,
    /// The original text, stored for Memory Interleave's document injection when given.
    pub text: Option<String>,
    /// [`digest`](super::digest) of the text (of the token ids' bytes when there is no text).
    pub text_digest: u32,
}

/// Reported after every file an append writes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WriteProgress {
    pub file: String,
    pub bytes: u64,
    pub files_done: usize,
    pub files_total: usize,
}

/// A router layer's file of one segment, mapped, with the byte ranges of `rk`, `k` and `v` in it.
struct MappedLayer {
    map: Mmap,
    tensors: [Range<usize>; 3],
}

/// An open bank: the manifest plus every data file memory-mapped. Reading never copies more than the
/// rows asked for; the OS pages the rest in and out.
pub struct Bank {
    dir: PathBuf,
    manifest: Manifest,
    /// `[segment][router layer slot]`.
    segments: Vec<Vec<MappedLayer>>,
    /// `template.safetensors` and the byte ranges of every layer's `(k, v)` in it.
    template: (Mmap, Vec<[Range<usize>; 2]>),
}

impl std::fmt::Debug for Bank {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Bank")
            .field("dir", &self.dir)
            .field("documents", &self.manifest.documents.len())
            .field("chunks", &self.manifest.chunk_count())
            .field("segments", &self.manifest.segments.len())
            .finish()
    }
}

fn bank_error(path: &Path, problem: impl Into<String>) -> Error {
    Error::Bank {
        path: path.to_path_buf(),
        problem: problem.into(),
    }
}

impl Bank {
    /// Creates an empty bank in `dir` (created if missing; refused if it already holds a bank) for the
    /// model described by `fingerprint`, storing its template-head K and V: per layer, f32
    /// `[template_tokens, kv_heads, head_dim]`.
    pub fn create(
        dir: impl AsRef<Path>,
        fingerprint: MemoryFingerprint,
        template_tokens: usize,
        template: &[(Vec<f32>, Vec<f32>)],
    ) -> Result<Bank> {
        let dir = dir.as_ref();
        if dir.join(MANIFEST).exists() {
            return Err(bank_error(
                dir,
                "already holds a memory bank; open it to append documents",
            ));
        }
        let row = fingerprint.num_key_value_heads * fingerprint.head_dim;
        if template_tokens == 0
            || template.len() != fingerprint.num_hidden_layers
            || template
                .iter()
                .any(|(k, v)| k.len() != template_tokens * row || v.len() != template_tokens * row)
        {
            return Err(bank_error(
                dir,
                format!(
                    "the template must hold K and V of {template_tokens} tokens for each of {} layers",
                    fingerprint.num_hidden_layers
                ),
            ));
        }
        let mut manifest = Manifest {
            format: FORMAT_NAME.into(),
            version: FORMAT_VERSION,
            fingerprint,
            template_tokens,
            template: FileEntry {
                file: TEMPLATE.into(),
                bytes: 0,
                crc32: 0,
            },
            segments: Vec::new(),
            documents: Vec::new(),
        };
        // Nothing is written for a fingerprint that could never be opened.
        manifest
            .check()
            .map_err(|problem| bank_error(dir, problem))?;
        let fingerprint = &manifest.fingerprint;
        std::fs::create_dir_all(dir).map_err(|e| Error::write(dir, e))?;
        // Without a manifest, a template file is what an interrupted create left.
        let stale = dir.join(TEMPLATE);
        if stale.is_file() {
            std::fs::remove_file(&stale).map_err(|e| Error::write(&stale, e))?;
        }
        let shape = vec![
            template_tokens,
            fingerprint.num_key_value_heads,
            fingerprint.head_dim,
        ];
        let tensors: Vec<(String, &[u8])> = template
            .iter()
            .enumerate()
            .flat_map(|(layer, (k, v))| {
                [
                    (format!("layer.{layer}.k"), bytemuck::cast_slice(k)),
                    (format!("layer.{layer}.v"), bytemuck::cast_slice(v)),
                ]
            })
            .collect();
        let bytes = serialize(
            tensors
                .iter()
                .map(|(name, data)| (name.as_str(), safetensors::Dtype::F32, &shape, *data)),
            &dir.join(TEMPLATE),
        )?;
        manifest.template = write_file(dir, TEMPLATE, &bytes)?;
        write_manifest(dir, &manifest)?;
        Bank::open(dir, OpenOptions::default())
    }

    /// Opens a bank read-only: checks the manifest, every file's size and header, and (by default) every
    /// checksum. A bank from a newer format version, a truncated or corrupt file or a missing one is an
    /// error naming it.
    pub fn open(dir: impl AsRef<Path>, options: OpenOptions) -> Result<Bank> {
        let dir = dir.as_ref();
        let manifest = read_manifest(dir)?;
        let fp = &manifest.fingerprint;
        let template_map = map_entry(dir, &manifest.template, options)?;
        let template_shape = [
            manifest.template_tokens,
            fp.num_key_value_heads,
            fp.head_dim,
        ];
        let template_ranges = (0..fp.num_hidden_layers)
            .map(|layer| {
                let find = |t: &str| {
                    tensor_range(
                        &dir.join(&manifest.template.file),
                        &template_map,
                        &format!("layer.{layer}.{t}"),
                        safetensors::Dtype::F32,
                        &template_shape,
                    )
                };
                Ok([find("k")?, find("v")?])
            })
            .collect::<Result<Vec<_>>>()?;
        let segments = manifest
            .segments
            .iter()
            .map(|segment| map_segment(dir, fp, segment, options))
            .collect::<Result<Vec<_>>>()?;
        Ok(Bank {
            dir: dir.to_path_buf(),
            manifest,
            segments,
            template: (template_map, template_ranges),
        })
    }

    /// Recomputes every file's CRC-32 against the manifest.
    pub fn verify(&self) -> Result<()> {
        let entries = std::iter::once(&self.manifest.template).chain(
            self.manifest
                .segments
                .iter()
                .flat_map(|s| s.layers.iter().chain(&s.texts)),
        );
        for entry in entries {
            map_entry(
                &self.dir,
                entry,
                OpenOptions {
                    verify_checksums: true,
                },
            )?;
        }
        Ok(())
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    pub fn fingerprint(&self) -> &MemoryFingerprint {
        &self.manifest.fingerprint
    }

    pub fn documents(&self) -> &[BankDocument] {
        &self.manifest.documents
    }

    pub fn is_empty(&self) -> bool {
        self.manifest.documents.is_empty()
    }

    pub fn chunk_count(&self) -> u32 {
        self.manifest.chunk_count()
    }

    /// The chunks of documents `documents` (a range of the table; empty where it is).
    pub fn chunk_range(&self, documents: Range<usize>) -> Range<u32> {
        let table = &self.manifest.documents[documents];
        match (table.first(), table.last()) {
            (Some(first), Some(last)) => first.chunks[0]..last.chunks[1],
            _ => 0..0,
        }
    }

    /// `[0, end of the first document, …]` of documents `documents`, counted from their first chunk:
    /// what routing reduces chunk scores to document scores by.
    pub fn chunk_offsets(&self, documents: Range<usize>) -> Vec<u32> {
        let start = self.chunk_range(documents.clone()).start;
        std::iter::once(0)
            .chain(
                self.manifest.documents[documents]
                    .iter()
                    .map(|d| d.chunks[1] - start),
            )
            .collect()
    }

    pub fn token_count(&self) -> usize {
        self.manifest.documents.iter().map(|d| d.tokens).sum()
    }

    /// Bytes of one tensor of one router layer across the whole bank (`chunks × kv_heads × head_dim × 2`).
    pub fn tensor_bytes(&self) -> u64 {
        self.chunk_count() as u64 * self.manifest.fingerprint.row_bytes() as u64
    }

    pub fn template_tokens(&self) -> usize {
        self.manifest.template_tokens
    }

    /// Template-head `(K, V)` of `layer` as little-endian f32 bytes `[template_tokens, kv_heads, head_dim]`.
    pub fn template(&self, layer: usize) -> (&[u8], &[u8]) {
        let [k, v] = &self.template.1[layer];
        (&self.template.0[k.clone()], &self.template.0[v.clone()])
    }

    /// The exclusive advisory lock on `bank.lock` an append holds (readers never lock: they see the old
    /// or the new manifest, both complete). A lock still held after [`LOCK_WAIT`] is another writer's
    /// append, an error; shorter waits cover a lock released a moment late, as when a process forks
    /// (the child holds a copy of every descriptor until it execs).
    fn lock_for_append(&self) -> Result<File> {
        let path = self.dir.join(LOCK);
        let file = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(|e| Error::write(&path, e))?;
        let started = std::time::Instant::now();
        loop {
            match file.try_lock() {
                Ok(()) => return Ok(file),
                Err(std::fs::TryLockError::WouldBlock) if started.elapsed() < LOCK_WAIT => {
                    std::thread::sleep(std::time::Duration::from_millis(10));
                }
                Err(std::fs::TryLockError::WouldBlock) => {
                    return Err(bank_error(
                        &self.dir,
                        "another writer is appending to this bank; try again when it has finished",
                    ));
                }
                Err(std::fs::TryLockError::Error(e)) => return Err(Error::write(&path, e)),
            }
        }
    }

    /// Appends rows `chunks` of `tensor` of the router layer in `slot` (its index in
    /// `fingerprint().router_layers`) to `out`, as stored: bf16 bytes, one `[kv_heads, head_dim]` row per
    /// chunk.
    pub fn read_rows(
        &self,
        slot: usize,
        tensor: BankTensor,
        chunks: Range<u32>,
        out: &mut Vec<u8>,
    ) {
        for piece in self.row_slices(slot, tensor, chunks) {
            out.extend_from_slice(piece);
        }
    }

    /// The bytes [`Bank::read_rows`] appends, in order, as slices of the mapped segments (one per
    /// segment the rows span), for a caller that copies them somewhere else.
    pub fn row_slices(
        &self,
        slot: usize,
        tensor: BankTensor,
        chunks: Range<u32>,
    ) -> impl Iterator<Item = &[u8]> + '_ {
        let row = self.manifest.fingerprint.row_bytes();
        let segments = &self.manifest.segments;
        let first = segments.partition_point(|s| s.chunks[1] <= chunks.start);
        segments[first..]
            .iter()
            .zip(&self.segments[first..])
            .take_while(move |(segment, _)| segment.chunks[0] < chunks.end)
            .map(move |(segment, mapped)| {
                let [start, end] = segment.chunks;
                let (lo, hi) = (chunks.start.max(start), chunks.end.min(end));
                let layer = &mapped[slot];
                let base = layer.tensors[tensor as usize].start;
                &layer.map[base + (lo - start) as usize * row..base + (hi - start) as usize * row]
            })
    }

    /// The original text of document `id`, when the bank stores it.
    pub fn document_text(&self, id: usize) -> Result<Option<String>> {
        Ok(self.document_texts(&[id])?.pop().flatten())
    }

    /// The original texts of documents `ids` (in that order; `None` for an unknown id or a document
    /// stored without text), reading each segment's texts file once.
    pub fn document_texts(&self, ids: &[usize]) -> Result<Vec<Option<String>>> {
        let mut texts = vec![None; ids.len()];
        for segment in &self.manifest.segments {
            let range = segment.documents[0]..segment.documents[1];
            let wanted: Vec<usize> = (0..ids.len())
                .filter(|&i| range.contains(&ids[i]))
                .collect();
            let (Some(entry), false) = (&segment.texts, wanted.is_empty()) else {
                continue;
            };
            let path = self.dir.join(&entry.file);
            let bytes = std::fs::read(&path).map_err(|e| Error::io(&path, e))?;
            if bytes.len() as u64 != entry.bytes || digest(&bytes) != entry.crc32 {
                return Err(bank_error(
                    &path,
                    "checksum mismatch: the file is corrupt (its contents changed since it was written)",
                ));
            }
            let stored: Vec<Option<String>> =
                serde_json::from_slice(&bytes).map_err(|source| Error::Json { path, source })?;
            for i in wanted {
                texts[i] = stored.get(ids[i] - range.start).cloned().flatten();
            }
        }
        Ok(texts)
    }

    /// Appends documents as one new segment. `layer_rows(slot)` produces the rows of router layer `slot`
    /// (called once per layer, in order, so only one layer is in memory at a time); `progress` hears of
    /// every file written. New files are written and fsynced, then the manifest is swapped atomically:
    /// on any error (a full disk, a failing producer) the new files are removed and the bank, on disk
    /// and in `self`, is unchanged.
    pub fn append(
        &mut self,
        documents: Vec<NewDocument>,
        mut layer_rows: impl FnMut(usize) -> Result<LayerRows>,
        mut progress: impl FnMut(WriteProgress),
    ) -> Result<()> {
        if documents.is_empty() {
            return Ok(());
        }
        // Writers take turns; a handle that is behind (another one appended since it opened) catches up
        // first, so its segment goes after the other's instead of over it.
        let _lock = self.lock_for_append()?;
        if read_manifest(&self.dir)? != self.manifest {
            *self = Bank::open(
                &self.dir,
                OpenOptions {
                    verify_checksums: false,
                },
            )?;
        }
        let fp = self.manifest.fingerprint.clone();
        let first_id = self.manifest.documents.len();
        let first_chunk = self.chunk_count();
        let mut table = Vec::with_capacity(documents.len());
        let mut chunk = u64::from(first_chunk);
        // Sources name documents (a resumed encoding matches on them): unique within the bank.
        let mut sources: HashSet<&str> = self
            .manifest
            .documents
            .iter()
            .map(|d| d.source.as_str())
            .collect();
        for (i, doc) in documents.iter().enumerate() {
            if !sources.insert(&doc.source) {
                return Err(bank_error(
                    &self.dir,
                    format!("document source `{}` is already in the bank", doc.source),
                ));
            }
            if doc.tokens == 0 {
                return Err(bank_error(
                    &self.dir,
                    format!("document {} ({}) is empty", first_id + i, doc.source),
                ));
            }
            let end = chunk + fp.chunks_of(doc.tokens);
            let end = u32::try_from(end).map_err(|_| {
                bank_error(
                    &self.dir,
                    format!(
                        "document {} would end at chunk {end}, past the format's 2^32 chunks",
                        first_id + i
                    ),
                )
            })?;
            table.push(BankDocument {
                id: first_id + i,
                source: doc.source.clone(),
                tokens: doc.tokens,
                chunks: [chunk as u32, end],
                text_digest: doc.text_digest,
            });
            chunk = u64::from(end);
        }
        let chunk = chunk as u32;
        let index = match self.manifest.segments.last() {
            None => 1,
            Some(last) => last
                .index
                .checked_add(1)
                .ok_or_else(|| bank_error(&self.dir, "no segment numbers left"))?,
        };
        // Files of this number can only be left by an append that never committed.
        remove_files_of_segment(&self.dir, index)?;
        let has_texts = documents.iter().any(|d| d.text.is_some());
        let files_total = fp.router_layers.len() + usize::from(has_texts);
        let mut written: Vec<PathBuf> = Vec::with_capacity(files_total);
        let dir = self.dir.clone();
        // Writes one new file of the append, remembering it for the cleanup, and reports it.
        let mut write_new = |written: &mut Vec<PathBuf>, name: String, bytes: &[u8]| {
            written.push(dir.join(&name));
            let entry = write_file(&dir, &name, bytes)?;
            progress(WriteProgress {
                file: name,
                bytes: entry.bytes,
                files_done: written.len(),
                files_total,
            });
            Ok::<_, Error>(entry)
        };
        let result = (|| {
            let rows = (chunk - first_chunk) as usize;
            let shape = vec![rows, fp.num_key_value_heads, fp.head_dim];
            let expected_bytes = rows * fp.row_bytes();
            let mut layers = Vec::with_capacity(fp.router_layers.len());
            for (slot, &layer) in fp.router_layers.iter().enumerate() {
                let data = layer_rows(slot)?;
                let name = format!("seg{index:06}-layer{layer:02}.safetensors");
                let path = self.dir.join(&name);
                for (tensor, bytes) in
                    BankTensor::ALL
                        .iter()
                        .zip([&data.routing_keys, &data.k, &data.v])
                {
                    if bytes.len() != expected_bytes {
                        return Err(bank_error(
                            &path,
                            format!(
                                "layer {layer} `{}` has {} bytes; {rows} chunks need {expected_bytes}",
                                tensor.name(),
                                bytes.len()
                            ),
                        ));
                    }
                }
                let tensors = BankTensor::ALL
                    .iter()
                    .zip([&data.routing_keys, &data.k, &data.v])
                    .map(|(t, bytes)| {
                        (t.name(), safetensors::Dtype::BF16, &shape, bytes.as_slice())
                    });
                let bytes = serialize(tensors, &path)?;
                drop(data);
                layers.push(write_new(&mut written, name, &bytes)?);
            }
            let texts = if has_texts {
                let name = format!("seg{index:06}-texts.json");
                let texts: Vec<Option<&str>> =
                    documents.iter().map(|d| d.text.as_deref()).collect();
                let bytes = serde_json::to_vec(&texts).expect("strings serialize");
                Some(write_new(&mut written, name, &bytes)?)
            } else {
                None
            };
            let mut manifest = self.manifest.clone();
            manifest.segments.push(Segment {
                index,
                documents: [first_id, first_id + documents.len()],
                chunks: [first_chunk, chunk],
                layers,
                texts,
            });
            manifest.documents.extend(table);
            write_manifest(&self.dir, &manifest)?;
            Ok(manifest)
        })();
        match result {
            Ok(manifest) => {
                // Committed. Map only the new segment's files (checksummed as they were written).
                let segment = manifest.segments.last().expect("just appended");
                let mapped = map_segment(
                    &self.dir,
                    &manifest.fingerprint,
                    segment,
                    OpenOptions {
                        verify_checksums: false,
                    },
                )
                .map_err(|e| {
                    bank_error(
                        &self.dir,
                        format!("the append committed, but mapping its files failed ({e}); open the bank again"),
                    )
                })?;
                self.segments.push(mapped);
                self.manifest = manifest;
                Ok(())
            }
            Err(e) => {
                for path in written {
                    let _ = std::fs::remove_file(path);
                }
                let _ = std::fs::remove_file(self.dir.join(MANIFEST_TMP));
                Err(match e {
                    Error::Bank { path, problem } => Error::Bank {
                        path,
                        problem: format!(
                            "{problem}; the append was abandoned and the bank is unchanged"
                        ),
                    },
                    other => bank_error(
                        &self.dir,
                        format!("append failed, the bank is unchanged: {other}"),
                    ),
                })
            }
        }
    }
}

/// Maps the layer files of one segment (and checks its texts file), each checked for size, header and,
/// when asked, checksum.
fn map_segment(
    dir: &Path,
    fp: &MemoryFingerprint,
    segment: &Segment,
    options: OpenOptions,
) -> Result<Vec<MappedLayer>> {
    let chunks = (segment.chunks[1] - segment.chunks[0]) as usize;
    let shape = [chunks, fp.num_key_value_heads, fp.head_dim];
    if let Some(texts) = &segment.texts {
        map_entry(dir, texts, options)?;
    }
    segment
        .layers
        .iter()
        .map(|entry| {
            let map = map_entry(dir, entry, options)?;
            let path = dir.join(&entry.file);
            let range = |t: BankTensor| {
                tensor_range(&path, &map, t.name(), safetensors::Dtype::BF16, &shape)
            };
            let tensors = [
                range(BankTensor::RoutingKeys)?,
                range(BankTensor::K)?,
                range(BankTensor::V)?,
            ];
            Ok(MappedLayer { map, tensors })
        })
        .collect()
}

/// Removes files of segment `index`: called under the append lock for a number the manifest does not
/// use, so they are leftovers of an append that never committed.
fn remove_files_of_segment(dir: &Path, index: u32) -> Result<()> {
    let prefix = format!("seg{index:06}-");
    let entries = std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))?;
    for entry in entries {
        let entry = entry.map_err(|e| Error::io(dir, e))?;
        if entry.file_name().to_string_lossy().starts_with(&prefix) {
            std::fs::remove_file(entry.path()).map_err(|e| Error::write(entry.path(), e))?;
        }
    }
    Ok(())
}

/// Reads and checks `bank.json`: the format name, a version this build reads, internal consistency.
fn read_manifest(dir: &Path) -> Result<Manifest> {
    let path = dir.join(MANIFEST);
    if !path.is_file() {
        return Err(bank_error(
            dir,
            "no bank.json: not a memory bank (or not created yet)",
        ));
    }
    let bytes = std::fs::read(&path).map_err(|e| Error::io(&path, e))?;
    // Format and version first, so a manifest from a newer build is named as such, not as bad JSON.
    let value: serde_json::Value =
        serde_json::from_slice(&bytes).map_err(|source| Error::Json {
            path: path.clone(),
            source,
        })?;
    if value.get("format").and_then(|f| f.as_str()) != Some(FORMAT_NAME) {
        return Err(bank_error(
            &path,
            format!("not a memory bank manifest (its `format` is not \"{FORMAT_NAME}\")"),
        ));
    }
    match value.get("version").and_then(|v| v.as_u64()) {
        Some(v) if v == u64::from(FORMAT_VERSION) => {}
        Some(v) if v > u64::from(FORMAT_VERSION) => {
            return Err(bank_error(
                &path,
                format!(
                    "bank format version {v} was written by a newer msa; this build reads version {FORMAT_VERSION}"
                ),
            ));
        }
        other => {
            return Err(bank_error(
                &path,
                format!(
                    "unsupported bank format version {other:?}; this build reads version {FORMAT_VERSION}"
                ),
            ));
        }
    }
    let manifest: Manifest = serde_json::from_value(value).map_err(|source| Error::Json {
        path: path.clone(),
        source,
    })?;
    manifest
        .check()
        .map_err(|problem| bank_error(&path, problem))?;
    Ok(manifest)
}

/// Maps a data file after checking its size (and checksum when asked).
fn map_entry(dir: &Path, entry: &FileEntry, options: OpenOptions) -> Result<Mmap> {
    let path = dir.join(&entry.file);
    if entry.file.contains(['/', '\\']) || entry.file.starts_with('.') {
        return Err(bank_error(
            &path,
            "the manifest names a file outside the bank",
        ));
    }
    let file = File::open(&path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            bank_error(
                &path,
                "missing: the manifest lists it but it is not in the bank",
            )
        } else {
            Error::io(&path, e)
        }
    })?;
    let len = file.metadata().map_err(|e| Error::io(&path, e))?.len();
    if len != entry.bytes {
        return Err(bank_error(
            &path,
            format!(
                "{len} bytes, the manifest records {}: the file is truncated or was changed",
                entry.bytes
            ),
        ));
    }
    // SAFETY: read-only mapping of a file the bank never rewrites (appends create new files); a
    // concurrent outside writer could change values, never the validated offsets used to slice it.
    let map = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(&path, e))?;
    if options.verify_checksums && digest(&map) != entry.crc32 {
        return Err(bank_error(
            &path,
            "checksum mismatch: the file is corrupt (its contents changed since it was written)",
        ));
    }
    Ok(map)
}

/// The byte range of tensor `name` in a mapped safetensors file, checked for dtype and shape.
fn tensor_range(
    path: &Path,
    map: &[u8],
    name: &str,
    dtype: safetensors::Dtype,
    shape: &[usize],
) -> Result<Range<usize>> {
    let (header_len, metadata) =
        safetensors::SafeTensors::read_metadata(map).map_err(|e| Error::Safetensors {
            path: path.to_path_buf(),
            detail: e.to_string(),
        })?;
    checked_tensor_range((header_len, &metadata), name, dtype, shape, "the manifest")
        .map_err(|problem| bank_error(path, problem))
}

/// The byte range of tensor `name` in a safetensors file (from the start of the file, whose header
/// is `header_len` bytes of `metadata`), or why it is missing or not the `dtype` and `shape` that
/// `implied_by` (the manifest, a header) implies.
pub(super) fn checked_tensor_range(
    (header_len, metadata): (usize, &safetensors::tensor::Metadata),
    name: &str,
    dtype: safetensors::Dtype,
    shape: &[usize],
    implied_by: &str,
) -> std::result::Result<Range<usize>, String> {
    let info = metadata
        .info(name)
        .ok_or_else(|| format!("has no tensor `{name}`"))?;
    if info.dtype != dtype || info.shape != shape {
        return Err(format!(
            "tensor `{name}` is {:?} {:?}, {implied_by} implies {dtype:?} {shape:?}",
            info.dtype, info.shape
        ));
    }
    Ok(8 + header_len + info.data_offsets.0..8 + header_len + info.data_offsets.1)
}

/// A safetensors file of `(name, dtype, shape, bytes)` tensors, in memory.
fn serialize<'a>(
    tensors: impl Iterator<Item = (&'a str, safetensors::Dtype, &'a Vec<usize>, &'a [u8])>,
    path: &Path,
) -> Result<Vec<u8>> {
    let views = tensors
        .map(|(name, dtype, shape, bytes)| {
            safetensors::tensor::TensorView::new(dtype, shape.clone(), bytes).map(|v| (name, v))
        })
        .collect::<std::result::Result<Vec<_>, _>>()
        .and_then(|views| safetensors::serialize(views, None));
    views.map_err(|e| bank_error(path, format!("cannot serialize: {e}")))
}

/// Writes a new file (never over an existing one) and fsyncs it; returns its manifest entry.
fn write_file(dir: &Path, name: &str, bytes: &[u8]) -> Result<FileEntry> {
    let path = dir.join(name);
    let mut file = File::options()
        .write(true)
        .create_new(true)
        .open(&path)
        .map_err(|e| Error::write(&path, e))?;
    file.write_all(bytes)
        .and_then(|()| file.sync_all())
        .map_err(|e| Error::write(&path, e))?;
    Ok(FileEntry {
        file: name.into(),
        bytes: bytes.len() as u64,
        crc32: digest(bytes),
    })
}

/// The atomic manifest swap: write a temporary file, fsync it, rename it over `bank.json`, then fsync the
/// directory so the rename itself is durable. An error means the old manifest is still in place.
fn write_manifest(dir: &Path, manifest: &Manifest) -> Result<()> {
    let bytes = serde_json::to_vec_pretty(manifest).expect("the manifest serializes");
    let (tmp, path) = (dir.join(MANIFEST_TMP), dir.join(MANIFEST));
    // A temporary manifest can only be left by a writer that died before its rename.
    if tmp.is_file() {
        std::fs::remove_file(&tmp).map_err(|e| Error::write(&tmp, e))?;
    }
    write_file(dir, MANIFEST_TMP, &bytes)?;
    // The new files' directory entries are durable before the manifest names them, and the rename is
    // durable after. Some file systems refuse fsync on a directory; the order of operations stands anyway.
    let sync_dir = || File::open(dir).and_then(|d| d.sync_all());
    let _ = sync_dir();
    std::fs::rename(&tmp, &path).map_err(|e| Error::write(&path, e))?;
    let _ = sync_dir();
    Ok(())
}
