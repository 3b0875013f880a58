//! Shard key files: the routing keys of one Memory Parallel shard of a bank, exported into one
//! safetensors file, so that a shard server on another machine holds its share of the routing keys
//! and nothing else (no other shard's keys, no content K̄/V̄: at MSA-4B shapes a shard of 2 holds 288 B
//! per memory token of the bank's 1,728).
//!
//! The file holds, per router layer, `slot.{i}.rk`: the shard's routing keys `[chunks, kv_heads,
//! head_dim]` in bf16 as the bank stores them; `doc_chunk_offsets`: `[0, end of its first document,
//! …]` in u32, local to the shard; and in the safetensors metadata, under `msa_shard_keys`, a
//! [`ShardKeysHeader`]: the shard's place, the bank's content digest and fingerprint (what clients
//! check), and a CRC-32 per tensor.

use std::borrow::Cow;
use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::ops::Range;
use std::path::{Path, PathBuf};

use memmap2::Mmap;
use safetensors::Dtype;
use serde::{Deserialize, Serialize};

use super::store::checked_tensor_range;
use super::{BANK_ELEMENT_BYTES, Bank, BankTensor, MemoryFingerprint, OpenOptions, digest};
use crate::error::{Error, Result};

/// The metadata key of the [`ShardKeysHeader`], as JSON.
const HEADER_KEY: &str = "msa_shard_keys";
/// The metadata key of the header's CRC-32 (of its JSON text).
const HEADER_CRC_KEY: &str = "msa_shard_keys_crc32";
/// The format's name, in the header.
pub const SHARD_KEYS_FORMAT: &str = "msa-shard-keys";
/// The version this build writes and reads.
pub const SHARD_KEYS_VERSION: u32 = 1;
const OFFSETS: &str = "doc_chunk_offsets";

/// What a shard key file says of itself.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ShardKeysHeader {
    pub format: String,
    pub version: u32,
    /// Its rank among `world` shards.
    pub rank: usize,
    pub world: usize,
    /// The global ids of its documents, `[first, end)`.
    pub documents: [usize; 2],
    /// Documents in the whole bank.
    pub bank_documents: usize,
    /// [`super::Manifest::content_digest`] of the bank it was exported from.
    pub bank_digest: u32,
    pub fingerprint: MemoryFingerprint,
    /// CRC-32 of each tensor's bytes, by tensor name.
    pub crc32: BTreeMap<String, u32>,
}

/// An open shard key file, mapped read-only.
pub struct ShardKeysFile {
    path: PathBuf,
    map: Mmap,
    header: ShardKeysHeader,
    doc_chunk_offsets: Vec<u32>,
    /// Per router layer, the byte range of its routing keys in `map`.
    keys: Vec<Range<usize>>,
}

fn slot_name(slot: usize) -> String {
    format!("slot.{slot}.rk")
}

fn file_error(path: &Path, problem: impl Into<String>) -> Error {
    Error::Bank {
        path: path.to_path_buf(),
        problem: format!("shard key file: {}", problem.into()),
    }
}

/// A tensor of the file being written.
enum Tensor<'a> {
    /// The document offsets, little-endian u32.
    Offsets { bytes: Vec<u8>, shape: [usize; 1] },
    /// A router layer's routing keys, read from the bank's mapped rows when the writer reaches them,
    /// so at most one layer's keys are in memory at a time; `written` counts the layers.
    Keys {
        bank: &'a Bank,
        slot: usize,
        chunks: Range<u32>,
        shape: [usize; 3],
        written: &'a RefCell<dyn FnMut() + 'a>,
    },
}

impl safetensors::View for Tensor<'_> {
    fn dtype(&self) -> Dtype {
        match self {
            Tensor::Offsets { .. } => Dtype::U32,
            Tensor::Keys { .. } => Dtype::BF16,
        }
    }
    fn shape(&self) -> &[usize] {
        match self {
            Tensor::Offsets { shape, .. } => shape,
            Tensor::Keys { shape, .. } => shape,
        }
    }
    fn data(&self) -> Cow<'_, [u8]> {
        match self {
            Tensor::Offsets { bytes, .. } => Cow::Borrowed(bytes),
            Tensor::Keys {
                bank,
                slot,
                chunks,
                written,
                ..
            } => {
                let mut bytes = Vec::with_capacity(self.data_len());
                bank.read_rows(*slot, BankTensor::RoutingKeys, chunks.clone(), &mut bytes);
                (written.borrow_mut())();
                Cow::Owned(bytes)
            }
        }
    }
    fn data_len(&self) -> usize {
        match self {
            Tensor::Offsets { bytes, .. } => bytes.len(),
            Tensor::Keys { shape, .. } => shape.iter().product::<usize>() * BANK_ELEMENT_BYTES,
        }
    }
}

impl ShardKeysFile {
    /// Writes the routing keys of `bank`'s documents `documents` (shard `rank` of `world`) to a new
    /// file at `path` (never over an existing file, nor inside the bank), through a temporary file
    /// renamed into place and synced, calling `progress` with the router layers written after each.
    pub fn export(
        bank: &Bank,
        rank: usize,
        world: usize,
        documents: Range<usize>,
        path: &Path,
        mut progress: impl FnMut(usize),
    ) -> Result<()> {
        if path.exists() {
            return Err(file_error(
                path,
                "already exists: remove it first, or export to another name",
            ));
        }
        let parent = path.parent().filter(|p| !p.as_os_str().is_empty());
        let inside = |dir: &Path| {
            let canonical = |p: &Path| p.canonicalize().unwrap_or_else(|_| p.to_path_buf());
            canonical(parent.unwrap_or(Path::new("."))).starts_with(canonical(dir))
        };
        if inside(bank.dir()) {
            return Err(file_error(
                path,
                format!(
                    "lies inside the bank {}: export it elsewhere",
                    bank.dir().display()
                ),
            ));
        }
        let table = bank.documents();
        if rank >= world || documents.start >= documents.end || documents.end > table.len() {
            return Err(file_error(
                path,
                format!(
                    "shard {rank} of {world} with documents {documents:?} does not fit a bank of {} \
                     documents",
                    table.len()
                ),
            ));
        }
        let fp = bank.fingerprint();
        let chunks = bank.chunk_range(documents.clone());
        let offsets: Vec<u8> = bank
            .chunk_offsets(documents.clone())
            .into_iter()
            .flat_map(u32::to_le_bytes)
            .collect();
        let shape = [chunks.len(), fp.num_key_value_heads, fp.head_dim];
        let slots = fp.router_layers.len();
        // The checksums go in the header, which is written first: one pass over the rows for them.
        let mut crc32 = BTreeMap::from([(OFFSETS.to_string(), digest(&offsets))]);
        for slot in 0..slots {
            let mut hasher = crc32fast::Hasher::new();
            for piece in bank.row_slices(slot, BankTensor::RoutingKeys, chunks.clone()) {
                hasher.update(piece);
            }
            crc32.insert(slot_name(slot), hasher.finalize());
        }
        let header = ShardKeysHeader {
            format: SHARD_KEYS_FORMAT.into(),
            version: SHARD_KEYS_VERSION,
            rank,
            world,
            documents: [documents.start, documents.end],
            bank_documents: table.len(),
            bank_digest: bank.manifest().content_digest(),
            fingerprint: fp.clone(),
            crc32,
        };
        let mut done = 0;
        let written = RefCell::new(|| {
            done += 1;
            progress(done);
        });
        let offsets_shape = [offsets.len() / 4];
        let mut tensors = vec![(
            OFFSETS.to_string(),
            Tensor::Offsets {
                bytes: offsets,
                shape: offsets_shape,
            },
        )];
        for slot in 0..slots {
            let keys = Tensor::Keys {
                bank,
                slot,
                chunks: chunks.clone(),
                shape,
                written: &written,
            };
            tensors.push((slot_name(slot), keys));
        }
        let text = serde_json::to_string(&header).expect("the header serialises");
        let metadata = HashMap::from([
            (
                HEADER_CRC_KEY.to_string(),
                digest(text.as_bytes()).to_string(),
            ),
            (HEADER_KEY.to_string(), text),
        ]);
        safetensors::serialize_to_file(tensors, Some(metadata), path)
            .map_err(|e| file_error(path, format!("cannot write: {e}")))?;
        // The writer renames its temporary file into place without syncing: make both durable
        // before saying the file is written (a directory that refuses fsync is left as it is).
        File::open(path)
            .and_then(|f| f.sync_all())
            .map_err(|e| Error::write(path, e))?;
        let _ = File::open(parent.unwrap_or(Path::new("."))).and_then(|d| d.sync_all());
        // The writer's temporary file is private; the file is meant to be copied and served.
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o644))
                .map_err(|e| Error::write(path, e))?;
        }
        Ok(())
    }

    /// Maps a shard key file and checks it: its format, the shapes its header implies, and (with
    /// `options.verify_checksums`) every tensor's CRC-32.
    pub fn open(path: impl AsRef<Path>, options: OpenOptions) -> Result<ShardKeysFile> {
        let path = path.as_ref();
        let file = File::open(path).map_err(|e| Error::io(path, e))?;
        // SAFETY: read-only mapping; the offsets used to slice it are checked against its length.
        let map = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
        let (header_len, metadata) =
            safetensors::SafeTensors::read_metadata(&map).map_err(|e| {
                file_error(
                    path,
                    format!("not a valid safetensors file ({e}): it may be truncated or corrupt"),
                )
            })?;
        let entries = metadata.metadata().as_ref();
        let text = entries.and_then(|m| m.get(HEADER_KEY)).ok_or_else(|| {
            file_error(
                path,
                "no shard header: not a file written by `msa shard --export`",
            )
        })?;
        if options.verify_checksums
            && entries.and_then(|m| m.get(HEADER_CRC_KEY))
                != Some(&digest(text.as_bytes()).to_string())
        {
            return Err(file_error(
                path,
                "checksum mismatch in its header: the file is corrupt",
            ));
        }
        let header: ShardKeysHeader = serde_json::from_str(text)
            .map_err(|e| file_error(path, format!("its header is not valid: {e}")))?;
        if header.format != SHARD_KEYS_FORMAT || header.version != SHARD_KEYS_VERSION {
            return Err(file_error(
                path,
                format!(
                    "format {} version {}, this build reads {SHARD_KEYS_FORMAT} version \
                     {SHARD_KEYS_VERSION}",
                    header.format, header.version
                ),
            ));
        }
        let [first, end] = header.documents;
        let offsets_len = (end.saturating_sub(first)).checked_add(1);
        let Some(offsets_len) = offsets_len
            .filter(|_| header.rank < header.world && first < end && end <= header.bank_documents)
        else {
            return Err(file_error(
                path,
                format!(
                    "shard {} of {} with documents {first}..{end} of {} is not a shard",
                    header.rank, header.world, header.bank_documents
                ),
            ));
        };
        header
            .fingerprint
            .check()
            .map_err(|problem| file_error(path, problem))?;
        let range = |name: &str, dtype: Dtype, shape: &[usize]| -> Result<Range<usize>> {
            let bytes =
                checked_tensor_range((header_len, &metadata), name, dtype, shape, "its header")
                    .map_err(|problem| file_error(path, problem))?;
            if options.verify_checksums {
                let Some(&recorded) = header.crc32.get(name) else {
                    return Err(file_error(
                        path,
                        format!("no checksum recorded for `{name}`"),
                    ));
                };
                if recorded != digest(&map[bytes.clone()]) {
                    return Err(file_error(
                        path,
                        format!("checksum mismatch in `{name}`: the file is corrupt"),
                    ));
                }
            }
            Ok(bytes)
        };
        let offsets_range = range(OFFSETS, Dtype::U32, &[offsets_len])?;
        let doc_chunk_offsets: Vec<u32> = map[offsets_range]
            .chunks_exact(4)
            .map(|b| u32::from_le_bytes(b.try_into().expect("4 bytes")))
            .collect();
        if doc_chunk_offsets.first() != Some(&0)
            || doc_chunk_offsets.windows(2).any(|w| w[0] >= w[1])
        {
            return Err(file_error(
                path,
                "its document offsets do not rise from 0: every document holds a chunk at least",
            ));
        }
        let fp = &header.fingerprint;
        let shape = [
            *doc_chunk_offsets.last().expect("two offsets at least") as usize,
            fp.num_key_value_heads,
            fp.head_dim,
        ];
        let keys = (0..fp.router_layers.len())
            .map(|slot| range(&slot_name(slot), Dtype::BF16, &shape))
            .collect::<Result<Vec<_>>>()?;
        Ok(ShardKeysFile {
            path: path.to_path_buf(),
            map,
            header,
            doc_chunk_offsets,
            keys,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn header(&self) -> &ShardKeysHeader {
        &self.header
    }

    /// `[0, end of its first document, …]`, local to the shard.
    pub fn doc_chunk_offsets(&self) -> &[u32] {
        &self.doc_chunk_offsets
    }

    /// The routing keys of router layer `slot` (its index among the router layers), bf16 as stored.
    /// Panics when there is no such router layer.
    pub fn routing_keys(&self, slot: usize) -> &[u8] {
        &self.map[self.keys[slot].clone()]
    }
}
