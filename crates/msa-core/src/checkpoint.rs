//! Checkpoint weights: `model.safetensors` or a sharded `model.safetensors.index.json`, memory-mapped.
//!
//! Opening a checkpoint parses every header and checks that each file is complete; [`Checkpoint::validate`]
//! then checks every tensor the config implies (MSA-SPEC §2) by name and shape. Tensor bytes stay in the
//! mapped files until a backend uploads them in their stored dtype.

use std::collections::HashMap;
use std::ops::Range;
#[cfg(not(target_arch = "wasm32"))]
use std::path::Path;
use std::path::PathBuf;

use crate::config::ModelConfig;
use crate::dtype::DType;
use crate::error::{Error, Result};

pub const SINGLE_FILE: &str = "model.safetensors";
pub const INDEX_FILE: &str = "model.safetensors.index.json";

/// Bytes of one checkpoint file.
enum FileBytes {
    #[cfg(not(target_arch = "wasm32"))]
    Mapped(memmap2::Mmap),
    Owned(Vec<u8>),
}

impl std::ops::Deref for FileBytes {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            #[cfg(not(target_arch = "wasm32"))]
            FileBytes::Mapped(m) => m,
            FileBytes::Owned(v) => v,
        }
    }
}

struct ShardFile {
    path: PathBuf,
    bytes: FileBytes,
}

struct TensorEntry {
    file: usize,
    /// The stored dtype, or its name when this runtime cannot use it (an error only if the tensor is used).
    dtype: std::result::Result<DType, String>,
    shape: Vec<usize>,
    bytes: Range<usize>,
}

/// One tensor of a checkpoint, borrowed from its file.
#[derive(Clone, Copy, Debug)]
pub struct TensorView<'a> {
    pub name: &'a str,
    pub dtype: DType,
    pub shape: &'a [usize],
    /// Little-endian elements, row-major; not necessarily aligned.
    pub bytes: &'a [u8],
}

impl TensorView<'_> {
    pub fn element_count(&self) -> usize {
        self.shape.iter().product()
    }

    pub fn to_f32_vec(&self) -> Vec<f32> {
        self.dtype.to_f32_vec(self.bytes)
    }
}

/// The weights of a model: one or more safetensors files.
pub struct Checkpoint {
    files: Vec<ShardFile>,
    tensors: HashMap<String, TensorEntry>,
}

impl Checkpoint {
    /// Opens `dir/model.safetensors`, or every shard named by `dir/model.safetensors.index.json`.
    #[cfg(not(target_arch = "wasm32"))]
    pub fn open(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref();
        let index = dir.join(INDEX_FILE);
        let single = dir.join(SINGLE_FILE);
        if index.is_file() {
            let text = std::fs::read_to_string(&index).map_err(|e| Error::io(&index, e))?;
            let weight_map = read_weight_map(&text, &index)?;
            let mut shards: Vec<&str> = weight_map.iter().map(|(_, file)| file.as_str()).collect();
            shards.sort_unstable();
            shards.dedup();
            let files = shards
                .iter()
                .map(|name| map_file(&dir.join(name)))
                .collect::<Result<Vec<_>>>()?;
            let checkpoint = Self::from_files(files)?;
            checkpoint.check_index(&weight_map, &index)?;
            Ok(checkpoint)
        } else if single.is_file() {
            Self::from_files(vec![map_file(&single)?])
        } else {
            Err(Error::NoWeights {
                dir: dir.to_path_buf(),
            })
        }
    }

    /// Builds a checkpoint from files already in memory (a browser `fetch`, a test), named for errors.
    pub fn from_bytes(files: Vec<(String, Vec<u8>)>) -> Result<Self> {
        Self::from_files(
            files
                .into_iter()
                .map(|(name, bytes)| ShardFile {
                    path: PathBuf::from(name),
                    bytes: FileBytes::Owned(bytes),
                })
                .collect(),
        )
    }

    fn from_files(files: Vec<ShardFile>) -> Result<Self> {
        let mut tensors = HashMap::new();
        for (file_index, file) in files.iter().enumerate() {
            let (header_len, metadata) = safetensors::SafeTensors::read_metadata(&file.bytes)
                .map_err(|e| Error::Safetensors {
                    path: file.path.clone(),
                    detail: e.to_string(),
                })?;
            let data_start = 8 + header_len;
            for (name, info) in metadata.tensors() {
                let (start, end) = info.data_offsets;
                tensors.insert(
                    name,
                    TensorEntry {
                        file: file_index,
                        dtype: DType::from_safetensors(info.dtype)
                            .ok_or_else(|| format!("{:?}", info.dtype)),
                        shape: info.shape.clone(),
                        bytes: data_start + start..data_start + end,
                    },
                );
            }
        }
        Ok(Checkpoint { files, tensors })
    }

    /// Every tensor the index lists must be in the shard it names.
    #[cfg(not(target_arch = "wasm32"))]
    fn check_index(&self, weight_map: &[(String, String)], index: &Path) -> Result<()> {
        for (name, file) in weight_map {
            match self.tensors.get(name) {
                Some(e) if self.files[e.file].path.ends_with(file) => {}
                _ => {
                    return Err(Error::MissingTensor {
                        name: name.clone(),
                        files: format!("{file} (as listed in {})", index.display()),
                    });
                }
            }
        }
        Ok(())
    }

    fn file_list(&self) -> String {
        self.files
            .iter()
            .map(|f| f.path.display().to_string())
            .collect::<Vec<_>>()
            .join(", ")
    }

    pub fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    pub fn tensor_names(&self) -> impl Iterator<Item = &str> {
        self.tensors.keys().map(String::as_str)
    }

    /// The tensor called `name`, or an error naming it and the files searched.
    pub fn tensor(&self, name: &str) -> Result<TensorView<'_>> {
        let (key, entry) =
            self.tensors
                .get_key_value(name)
                .ok_or_else(|| Error::MissingTensor {
                    name: name.to_string(),
                    files: self.file_list(),
                })?;
        let dtype = entry
            .dtype
            .clone()
            .map_err(|dtype| Error::UnsupportedDType {
                path: self.files[entry.file].path.clone(),
                name: name.to_string(),
                dtype,
            })?;
        Ok(TensorView {
            name: key,
            dtype,
            shape: &entry.shape,
            bytes: &self.files[entry.file].bytes[entry.bytes.clone()],
        })
    }

    /// The tensor called `name`, checked against the shape the config implies.
    pub fn tensor_with_shape(&self, name: &str, expected: &[usize]) -> Result<TensorView<'_>> {
        let view = self.tensor(name)?;
        if view.shape != expected {
            let entry = &self.tensors[name];
            return Err(Error::ShapeMismatch {
                path: self.files[entry.file].path.clone(),
                name: name.to_string(),
                expected: expected.to_vec(),
                actual: view.shape.to_vec(),
            });
        }
        Ok(view)
    }

    /// Name of the output projection: `lm_head.weight`, or the embedding when tied or absent.
    pub fn lm_head_name(&self, config: &ModelConfig) -> &'static str {
        if config.tie_word_embeddings || !self.contains("lm_head.weight") {
            "model.embed_tokens.weight"
        } else {
            "lm_head.weight"
        }
    }

    /// Checks every tensor the config implies, by name and shape.
    pub fn validate(&self, config: &ModelConfig) -> Result<()> {
        for (name, shape) in expected_tensors(config) {
            self.tensor_with_shape(&name, &shape)?;
        }
        let head = self.lm_head_name(config);
        self.tensor_with_shape(head, &[config.vocab_size, config.hidden_size])?;
        Ok(())
    }
}

/// Every tensor a model with this config needs, with its shape (`[out, in]` for projections).
pub fn expected_tensors(c: &ModelConfig) -> Vec<(String, Vec<usize>)> {
    let (h, q, kv, ffn) = (
        c.hidden_size,
        c.num_attention_heads * c.head_dim,
        c.num_key_value_heads * c.head_dim,
        c.intermediate_size,
    );
    let mut out = vec![
        (
            "model.embed_tokens.weight".to_string(),
            vec![c.vocab_size, h],
        ),
        ("model.norm.weight".to_string(), vec![h]),
    ];
    for layer in 0..c.num_hidden_layers {
        let p = format!("model.layers.{layer}");
        out.extend([
            (format!("{p}.input_layernorm.weight"), vec![h]),
            (format!("{p}.post_attention_layernorm.weight"), vec![h]),
            (format!("{p}.self_attn.q_proj.weight"), vec![q, h]),
            (format!("{p}.self_attn.k_proj.weight"), vec![kv, h]),
            (format!("{p}.self_attn.v_proj.weight"), vec![kv, h]),
            (format!("{p}.self_attn.o_proj.weight"), vec![h, q]),
            (format!("{p}.self_attn.q_norm.weight"), vec![c.head_dim]),
            (format!("{p}.self_attn.k_norm.weight"), vec![c.head_dim]),
            (format!("{p}.mlp.gate_proj.weight"), vec![ffn, h]),
            (format!("{p}.mlp.up_proj.weight"), vec![ffn, h]),
            (format!("{p}.mlp.down_proj.weight"), vec![h, ffn]),
        ]);
        if c.is_router_layer(layer) {
            out.extend([
                (format!("{p}.self_attn.router_q_proj.0.weight"), vec![q, h]),
                (format!("{p}.self_attn.router_k_proj.0.weight"), vec![kv, h]),
            ]);
        }
    }
    out
}

#[cfg(not(target_arch = "wasm32"))]
fn map_file(path: &Path) -> Result<ShardFile> {
    let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    // SAFETY: the mapping is read-only; checkpoints are not modified while a model is loaded (the same
    // assumption every mmap-based loader makes). A concurrent writer could change tensor values, never
    // memory safety of the header parsing, which validates offsets against the mapped length.
    let map = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
    Ok(ShardFile {
        path: path.to_path_buf(),
        bytes: FileBytes::Mapped(map),
    })
}

/// The `(tensor, shard file)` pairs of a sharded checkpoint's index, each file checked to be a plain name
/// beside the index.
#[cfg(not(target_arch = "wasm32"))]
fn read_weight_map(text: &str, index: &Path) -> Result<Vec<(String, String)>> {
    let value: serde_json::Value = serde_json::from_str(text).map_err(|source| Error::Json {
        path: index.to_path_buf(),
        source,
    })?;
    let map = value
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| Error::Safetensors {
            path: index.to_path_buf(),
            detail: "the index has no `weight_map` object".into(),
        })?;
    if map.is_empty() {
        return Err(Error::Safetensors {
            path: index.to_path_buf(),
            detail: "the index's `weight_map` names no file".into(),
        });
    }
    map.iter()
        .map(|(tensor, file)| {
            let bad = |why: &str| Error::Safetensors {
                path: index.to_path_buf(),
                detail: format!("`weight_map` entry for `{tensor}` {why}"),
            };
            let file = file.as_str().ok_or_else(|| bad("is not a file name"))?;
            // Shards live beside the index: refuse paths that would leave the model directory.
            let plain = Path::new(file)
                .components()
                .all(|c| matches!(c, std::path::Component::Normal(_)));
            if file.is_empty() || !plain {
                return Err(bad(&format!(
                    "names `{file}`, not a file in the model directory"
                )));
            }
            Ok((tensor.clone(), file.to_string()))
        })
        .collect()
}
