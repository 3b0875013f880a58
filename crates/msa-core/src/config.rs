//! Model configuration from a Hugging Face `config.json` (MSA-SPEC §1).
//!
//! A Qwen3 checkpoint has the backbone fields only; an MSA checkpoint adds `msa_config`. Unknown fields are
//! ignored. Every value the engine relies on is checked here, so later stages can assume a consistent shape.

use std::path::{Path, PathBuf};

use serde_json::{Map, Value};

use crate::error::{Error, Result};

/// Largest accepted dimension or k: ids and RoPE positions are u32 with room to spare.
const MAX_DIMENSION: usize = i32::MAX as usize;
/// Largest accepted element count of one weight tensor (2^40, ~2 TB in bf16).
const MAX_ELEMENTS: u64 = 1 << 40;

/// How routing scores compare router queries with pooled routing keys (MSA-SPEC §3.6).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ScoreMode {
    /// L2-normalised router queries and routing keys, no scale: the paper's cosine similarity.
    Cosine,
    /// Raw dot product times `head_dim^-0.5`: what the reference inference code computes for every
    /// `aux_loss_method` other than the exact string `"INFONCE"`.
    ScaledDot,
}

/// Reduction over query heads of the per-head routing scores.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HeadReduce {
    Mean,
    Max,
}

/// Reduction over the routing-query tokens.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum QueryReduce {
    Max,
    Mean,
    /// The last routing-query token only.
    Last,
}

/// Reduction from chunk scores to a document score.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ChunkReduce {
    Max,
    Mean,
}

/// The `msa_config` block of an MSA checkpoint.
#[derive(Clone, Debug, PartialEq)]
pub struct MsaConfig {
    /// Layers with router projectors and memory attention, ascending.
    pub router_layers: Vec<usize>,
    /// Chunk length P of the mean pooling.
    pub pooling_kernel_size: usize,
    /// Documents selected per router layer at inference. The reference reads `doc_top_k` (default 16) and
    /// also uses it for the query position offset `3 + k` (MSA-SPEC §1.3 pitfalls 1 and 2).
    pub doc_top_k: usize,
    /// The training-time k written by the conversion script; informational only.
    pub top_k_docs: Option<usize>,
    /// Separate router projectors (`router_q_proj` / `router_k_proj`) exist.
    pub decouple_router: bool,
    pub aux_loss_method: String,
    pub head_reduce: HeadReduce,
    pub query_reduce: QueryReduce,
    pub chunk_reduce: ChunkReduce,
    /// Routing score mode derived from `aux_loss_method` exactly as the reference does; overridable.
    pub score_mode: ScoreMode,
}

/// A Qwen3 backbone, optionally with MSA memory layers.
#[derive(Clone, Debug, PartialEq)]
pub struct ModelConfig {
    pub model_type: String,
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub intermediate_size: usize,
    pub vocab_size: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub tie_word_embeddings: bool,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
    pub torch_dtype: Option<String>,
    pub msa: Option<MsaConfig>,
}

impl ModelConfig {
    /// Reads and validates `config.json`.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        Self::from_json_str(&text, path)
    }

    /// Parses and validates config JSON; `origin` names the source in errors.
    pub fn from_json_str(text: &str, origin: impl AsRef<Path>) -> Result<Self> {
        let origin = origin.as_ref();
        let value: Value = serde_json::from_str(text).map_err(|source| Error::Json {
            path: origin.to_path_buf(),
            source,
        })?;
        let Value::Object(map) = value else {
            return Err(Error::config(origin, "the top level is not a JSON object"));
        };
        let fields = Fields {
            map: &map,
            origin: origin.to_path_buf(),
            prefix: "",
        };
        let config = Self::parse(&fields)?;
        config.validate(origin)?;
        Ok(config)
    }

    fn parse(f: &Fields) -> Result<Self> {
        let hidden_size = f.usize("hidden_size")?;
        let num_attention_heads = f.usize("num_attention_heads")?;
        let num_hidden_layers = f.usize("num_hidden_layers")?;
        // Like transformers: heads without an explicit head_dim split the hidden size evenly.
        let head_dim = match f.opt("head_dim") {
            Some(_) => f.usize("head_dim")?,
            None => {
                if num_attention_heads == 0 || hidden_size % num_attention_heads != 0 {
                    return Err(f.problem(format!(
                        "head_dim is absent and hidden_size {hidden_size} is not divisible by num_attention_heads {num_attention_heads}"
                    )));
                }
                hidden_size / num_attention_heads
            }
        };
        let num_key_value_heads = match f.opt("num_key_value_heads") {
            Some(_) => f.usize("num_key_value_heads")?,
            None => num_attention_heads,
        };
        let msa = match f.opt("msa_config") {
            None | Some(Value::Null) => None,
            Some(Value::Object(inner)) => Some(MsaConfig::parse(
                &Fields {
                    map: inner,
                    origin: f.origin.clone(),
                    prefix: "msa_config.",
                },
                num_hidden_layers,
            )?),
            Some(_) => return Err(f.problem("msa_config is not a JSON object")),
        };
        Self::refuse_unsupported(f)?;
        Ok(ModelConfig {
            model_type: f.opt_str("model_type")?.unwrap_or_default(),
            hidden_size,
            num_hidden_layers,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            intermediate_size: f.usize("intermediate_size")?,
            vocab_size: f.usize("vocab_size")?,
            rms_norm_eps: f.f64("rms_norm_eps")?,
            rope_theta: match f.opt("rope_theta") {
                Some(_) => f.f64("rope_theta")?,
                None => 10_000.0,
            },
            tie_word_embeddings: f.opt_bool("tie_word_embeddings")?.unwrap_or(false),
            bos_token_id: f.opt_u32("bos_token_id")?,
            eos_token_ids: f.token_ids("eos_token_id")?,
            torch_dtype: f.opt_str("torch_dtype")?,
            msa,
        })
    }

    /// Backbone features this runtime does not implement are errors, not silently wrong numbers.
    fn refuse_unsupported(f: &Fields) -> Result<()> {
        if let Some(act) = f.opt_str("hidden_act")?
            && act != "silu"
        {
            return Err(f.problem(format!(
                "hidden_act `{act}` is not supported (Qwen3 and MSA use silu)"
            )));
        }
        if f.opt_bool("attention_bias")? == Some(true) {
            return Err(f.problem(
                "attention_bias = true is not supported (Qwen3 projections have no bias)",
            ));
        }
        if !matches!(f.opt("rope_scaling"), None | Some(Value::Null)) {
            return Err(f.problem(
                "rope_scaling is not supported; this runtime implements plain RoPE (rope_scaling: null)",
            ));
        }
        if f.opt_bool("use_sliding_window")? == Some(true) {
            return Err(f.problem("use_sliding_window = true is not supported"));
        }
        Ok(())
    }

    fn validate(&self, origin: &Path) -> Result<()> {
        let problem = |msg: String| Err(Error::config(origin, msg));
        for (name, value) in [
            ("hidden_size", self.hidden_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("num_key_value_heads", self.num_key_value_heads),
            ("head_dim", self.head_dim),
            ("intermediate_size", self.intermediate_size),
            ("vocab_size", self.vocab_size),
        ] {
            if value == 0 {
                return problem(format!("{name} must be positive"));
            }
            // Token ids and positions are u32; bounding every dimension also keeps shape products
            // (heads × head_dim, vocab × hidden) from overflowing.
            if value > MAX_DIMENSION {
                return problem(format!(
                    "{name} {value} is too large (at most {MAX_DIMENSION})"
                ));
            }
        }
        for (what, a, b) in [
            (
                "num_attention_heads × head_dim",
                self.num_attention_heads,
                self.head_dim,
            ),
            (
                "vocab_size × hidden_size",
                self.vocab_size,
                self.hidden_size,
            ),
            (
                "intermediate_size × hidden_size",
                self.intermediate_size,
                self.hidden_size,
            ),
        ] {
            if a.checked_mul(b).is_none_or(|n| n as u64 > MAX_ELEMENTS) {
                return problem(format!("{what} = {a} × {b} is too large for one tensor"));
            }
        }
        if !self
            .num_attention_heads
            .is_multiple_of(self.num_key_value_heads)
        {
            return problem(format!(
                "num_attention_heads {} is not a multiple of num_key_value_heads {}",
                self.num_attention_heads, self.num_key_value_heads
            ));
        }
        if !self.head_dim.is_multiple_of(2) {
            return problem(format!(
                "head_dim {} must be even for rotary embeddings",
                self.head_dim
            ));
        }
        // Written to reject NaN as well as out-of-range values.
        if !(self.rms_norm_eps > 0.0 && self.rms_norm_eps < 1.0) {
            return problem(format!(
                "rms_norm_eps must be in (0, 1), got {}",
                self.rms_norm_eps
            ));
        }
        if !(self.rope_theta > 0.0 && self.rope_theta.is_finite()) {
            return problem(format!(
                "rope_theta must be a positive number, got {}",
                self.rope_theta
            ));
        }
        if let Some(&bad) = self
            .eos_token_ids
            .iter()
            .find(|&&id| id as usize >= self.vocab_size)
        {
            return problem(format!(
                "eos_token_id {bad} is outside the vocabulary of {}",
                self.vocab_size
            ));
        }
        Ok(())
    }

    /// Query heads per key/value head (GQA group size).
    pub fn gqa_group(&self) -> usize {
        self.num_attention_heads / self.num_key_value_heads
    }

    pub fn is_router_layer(&self, layer: usize) -> bool {
        self.msa
            .as_ref()
            .is_some_and(|m| m.router_layers.binary_search(&layer).is_ok())
    }

    /// Parameter count implied by the config (embedding, layers, final norm, untied head, router projectors).
    pub fn parameter_count(&self) -> usize {
        let (h, q, kv, ffn) = (
            self.hidden_size,
            self.num_attention_heads * self.head_dim,
            self.num_key_value_heads * self.head_dim,
            self.intermediate_size,
        );
        let per_layer = 2 * h + q * h + 2 * kv * h + h * q + 2 * self.head_dim + 3 * h * ffn;
        let router = self.msa.as_ref().map_or(0, |m| {
            if m.decouple_router {
                m.router_layers.len() * (q * h + kv * h)
            } else {
                0
            }
        });
        let head = if self.tie_word_embeddings {
            0
        } else {
            self.vocab_size * h
        };
        self.vocab_size * h + self.num_hidden_layers * per_layer + h + head + router
    }
}

impl MsaConfig {
    fn parse(f: &Fields, num_layers: usize) -> Result<Self> {
        let router_layers = match f.opt("router_layer_idx") {
            None | Some(Value::Null) => (0..num_layers).collect(),
            Some(Value::String(s)) if s.trim() == "all" => (0..num_layers).collect(),
            Some(Value::String(s)) => s
                .split(',')
                .map(|part| {
                    part.trim().parse::<usize>().map_err(|_| {
                        f.problem(format!(
                            "router_layer_idx: `{}` is not a layer index (expected \"all\" or a comma-separated list)",
                            part.trim()
                        ))
                    })
                })
                .collect::<Result<Vec<_>>>()?,
            Some(Value::Array(items)) => items
                .iter()
                .map(|v| {
                    v.as_u64().map(|n| n as usize).ok_or_else(|| {
                        f.problem(format!("router_layer_idx: {v} is not a layer index"))
                    })
                })
                .collect::<Result<Vec<_>>>()?,
            Some(other) => {
                return Err(f.problem(format!(
                    "router_layer_idx: expected \"all\", a comma-separated string or a list, found {other}"
                )));
            }
        };
        let mut router_layers = router_layers;
        router_layers.sort_unstable();
        router_layers.dedup();
        if let Some(&bad) = router_layers.iter().find(|&&l| l >= num_layers) {
            return Err(f.problem(format!(
                "router_layer_idx: layer {bad} is out of range (the model has {num_layers} layers)"
            )));
        }
        if router_layers.is_empty() {
            return Err(f.problem("router_layer_idx selects no layer"));
        }

        let pooling_kernel_size = f.usize("pooling_kernel_size")?;
        if pooling_kernel_size == 0 {
            return Err(f.problem("pooling_kernel_size must be positive"));
        }
        let top_k_docs = match f.opt("top_k_docs") {
            Some(_) => Some(f.usize("top_k_docs")?),
            None => None,
        };
        let doc_top_k = match f.opt("doc_top_k") {
            Some(_) => f.usize("doc_top_k")?,
            None => 16,
        };
        if doc_top_k == 0 || doc_top_k > MAX_DIMENSION {
            return Err(f.problem(format!(
                "msa_config.doc_top_k must be in 1..={MAX_DIMENSION} (prompt positions start at 3 + k), got {doc_top_k}"
            )));
        }
        let aux_loss_method = f.opt_str("aux_loss_method")?.unwrap_or_default();
        // The reference inference path tests the exact string (MSA-SPEC §3.6).
        let score_mode = if aux_loss_method == "INFONCE" {
            ScoreMode::Cosine
        } else {
            ScoreMode::ScaledDot
        };
        let decouple_router = f.opt_bool("decouple_router")?.unwrap_or(false);
        if !decouple_router {
            // Without separate router projectors the reference routes with the attention Q against the
            // pooled content K; no released checkpoint uses that mode and no fixture covers it.
            return Err(f.problem(
                "decouple_router = false (routing with the attention Q and pooled K) is not supported; \
                 MSA checkpoints ship router_q_proj / router_k_proj with decouple_router = true",
            ));
        }
        Ok(MsaConfig {
            router_layers,
            pooling_kernel_size,
            doc_top_k,
            top_k_docs,
            decouple_router,
            aux_loss_method,
            head_reduce: f.choice(
                "head_reduce_method",
                "max",
                &[("mean", HeadReduce::Mean), ("max", HeadReduce::Max)],
            )?,
            query_reduce: f.choice(
                "query_reduce_method",
                "max",
                &[
                    ("max", QueryReduce::Max),
                    ("mean", QueryReduce::Mean),
                    ("last", QueryReduce::Last),
                ],
            )?,
            chunk_reduce: f.choice(
                "chunk_reduce_method",
                "max",
                &[("max", ChunkReduce::Max), ("mean", ChunkReduce::Mean)],
            )?,
            score_mode,
        })
    }
}

/// Typed access to one JSON object, with errors that name the file and the field.
struct Fields<'a> {
    map: &'a Map<String, Value>,
    origin: PathBuf,
    prefix: &'static str,
}

impl Fields<'_> {
    fn problem(&self, msg: impl Into<String>) -> Error {
        Error::config(&self.origin, msg)
    }

    fn opt(&self, key: &str) -> Option<&Value> {
        self.map.get(key)
    }

    fn required(&self, key: &str) -> Result<&Value> {
        match self.map.get(key) {
            Some(Value::Null) | None => {
                Err(self.problem(format!("required field `{}{key}` is missing", self.prefix)))
            }
            Some(v) => Ok(v),
        }
    }

    fn wrong_type(&self, key: &str, expected: &str, found: &Value) -> Error {
        self.problem(format!(
            "field `{}{key}` should be {expected}, found {found}",
            self.prefix
        ))
    }

    fn usize(&self, key: &str) -> Result<usize> {
        let v = self.required(key)?;
        v.as_u64()
            .map(|n| n as usize)
            .ok_or_else(|| self.wrong_type(key, "a non-negative integer", v))
    }

    fn f64(&self, key: &str) -> Result<f64> {
        let v = self.required(key)?;
        v.as_f64()
            .ok_or_else(|| self.wrong_type(key, "a number", v))
    }

    fn opt_u32(&self, key: &str) -> Result<Option<u32>> {
        match self.map.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => v
                .as_u64()
                .and_then(|n| u32::try_from(n).ok())
                .map(Some)
                .ok_or_else(|| self.wrong_type(key, "a token id", v)),
        }
    }

    fn opt_bool(&self, key: &str) -> Result<Option<bool>> {
        match self.map.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(v) => Err(self.wrong_type(key, "true or false", v)),
        }
    }

    fn opt_str(&self, key: &str) -> Result<Option<String>> {
        match self.map.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(v) => Err(self.wrong_type(key, "a string", v)),
        }
    }

    /// `eos_token_id` may be one id or a list of ids.
    fn token_ids(&self, key: &str) -> Result<Vec<u32>> {
        match self.map.get(key) {
            None | Some(Value::Null) => Ok(Vec::new()),
            Some(Value::Array(items)) => items
                .iter()
                .map(|v| {
                    v.as_u64()
                        .and_then(|n| u32::try_from(n).ok())
                        .ok_or_else(|| self.wrong_type(key, "a list of token ids", v))
                })
                .collect(),
            Some(_) => Ok(self.opt_u32(key)?.into_iter().collect()),
        }
    }

    fn choice<T: Copy>(&self, key: &str, default: &str, options: &[(&str, T)]) -> Result<T> {
        let name = self.opt_str(key)?.unwrap_or_else(|| default.to_string());
        options
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| *v)
            .ok_or_else(|| {
                let names: Vec<_> = options.iter().map(|(n, _)| *n).collect();
                self.problem(format!(
                    "field `{}{key}` is `{name}`; supported: {}",
                    self.prefix,
                    names.join(", ")
                ))
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const QWEN3: &str = r#"{"model_type":"qwen3","hidden_size":64,"num_hidden_layers":4,"num_attention_heads":4,
        "num_key_value_heads":2,"head_dim":16,"intermediate_size":128,"vocab_size":512,"rms_norm_eps":1e-6,
        "rope_theta":1000000.0,"tie_word_embeddings":false,"eos_token_id":511,"some_unknown_field":[1,2]}"#;

    fn with(base: &str, edit: impl FnOnce(&mut Map<String, Value>)) -> String {
        let mut v: Value = serde_json::from_str(base).unwrap();
        edit(v.as_object_mut().unwrap());
        v.to_string()
    }

    fn msa(msa_config: Value) -> String {
        with(QWEN3, |m| {
            m.insert("msa_config".into(), msa_config);
        })
    }

    fn err(text: &str) -> String {
        ModelConfig::from_json_str(text, "config.json")
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn parses_qwen3_and_ignores_unknown_fields() {
        let c = ModelConfig::from_json_str(QWEN3, "config.json").unwrap();
        assert_eq!((c.hidden_size, c.head_dim, c.gqa_group()), (64, 16, 2));
        assert_eq!(c.eos_token_ids, vec![511]);
        assert!(c.msa.is_none());
        assert!(!c.is_router_layer(0));
    }

    #[test]
    fn parses_msa_config_variants() {
        let c = ModelConfig::from_json_str(
            &msa(serde_json::json!({"router_layer_idx":"3, 2","pooling_kernel_size":16,"doc_top_k":3,
                "top_k_docs":3,"decouple_router":true,"aux_loss_method":"INFONCE_DECOUPLE","head_reduce_method":"mean"})),
            "config.json",
        )
        .unwrap();
        let m = c.msa.as_ref().unwrap();
        assert_eq!(m.router_layers, vec![2, 3]);
        assert_eq!(m.score_mode, ScoreMode::ScaledDot);
        assert_eq!(m.head_reduce, HeadReduce::Mean);
        assert_eq!(m.query_reduce, QueryReduce::Max);
        assert!(c.is_router_layer(3) && !c.is_router_layer(1));

        let all = ModelConfig::from_json_str(
            &msa(
                serde_json::json!({"router_layer_idx":"all","pooling_kernel_size":4,
                "decouple_router":true,"aux_loss_method":"INFONCE"}),
            ),
            "config.json",
        )
        .unwrap();
        let m = all.msa.unwrap();
        assert_eq!(m.router_layers, vec![0, 1, 2, 3]);
        assert_eq!(m.score_mode, ScoreMode::Cosine);
        assert_eq!(
            m.doc_top_k, 16,
            "the reference default when doc_top_k is absent"
        );

        let list = ModelConfig::from_json_str(
            &msa(serde_json::json!({"router_layer_idx":[1],"pooling_kernel_size":4,"decouple_router":true})),
            "config.json",
        )
        .unwrap();
        assert_eq!(list.msa.unwrap().router_layers, vec![1]);
    }

    #[test]
    fn eos_may_be_a_list() {
        let c = ModelConfig::from_json_str(
            &with(QWEN3, |m| {
                m.insert("eos_token_id".into(), serde_json::json!([509, 511]));
            }),
            "c",
        )
        .unwrap();
        assert_eq!(c.eos_token_ids, vec![509, 511]);
    }

    #[test]
    fn clear_errors_for_bad_configs() {
        let missing = err(&with(QWEN3, |m| {
            m.remove("hidden_size");
        }));
        assert!(
            missing.contains("`hidden_size` is missing") && missing.contains("config.json"),
            "{missing}"
        );

        let heads = err(&with(QWEN3, |m| {
            m.insert("num_key_value_heads".into(), 3.into());
        }));
        assert!(heads.contains("not a multiple"), "{heads}");

        let range = err(&msa(
            serde_json::json!({"router_layer_idx":"2,4","pooling_kernel_size":16,"decouple_router":true}),
        ));
        assert!(range.contains("layer 4 is out of range"), "{range}");

        let pooling = err(&msa(
            serde_json::json!({"router_layer_idx":"2","pooling_kernel_size":0,"decouple_router":true}),
        ));
        assert!(
            pooling.contains("pooling_kernel_size must be positive"),
            "{pooling}"
        );

        let nopool = err(&msa(serde_json::json!({"router_layer_idx":"2"})));
        assert!(
            nopool.contains("msa_config.pooling_kernel_size"),
            "{nopool}"
        );

        let coupled = err(&msa(
            serde_json::json!({"pooling_kernel_size":2,"decouple_router":false}),
        ));
        assert!(coupled.contains("decouple_router = false"), "{coupled}");

        let reduce = err(&msa(
            serde_json::json!({"pooling_kernel_size":2,"head_reduce_method":"median","decouple_router":true}),
        ));
        assert!(reduce.contains("median"), "{reduce}");

        let typed = err(&with(QWEN3, |m| {
            m.insert("vocab_size".into(), "big".into());
        }));
        assert!(typed.contains("non-negative integer"), "{typed}");

        for (field, value, says) in [
            ("hidden_act", serde_json::json!("gelu"), "hidden_act `gelu`"),
            ("attention_bias", serde_json::json!(true), "attention_bias"),
            (
                "rope_scaling",
                serde_json::json!({"rope_type": "yarn", "factor": 4.0}),
                "rope_scaling",
            ),
            (
                "use_sliding_window",
                serde_json::json!(true),
                "use_sliding_window",
            ),
        ] {
            let e = err(&with(QWEN3, |m| {
                m.insert(field.into(), value);
            }));
            assert!(e.contains(says) && e.contains("not supported"), "{e}");
        }
        // The values Qwen3 configs actually carry are accepted.
        ModelConfig::from_json_str(
            &with(QWEN3, |m| {
                m.insert("hidden_act".into(), "silu".into());
                m.insert("attention_bias".into(), false.into());
                m.insert("rope_scaling".into(), Value::Null);
                m.insert("use_sliding_window".into(), false.into());
                m.insert("sliding_window".into(), 4096.into());
            }),
            "c",
        )
        .unwrap();

        assert!(err("[1]").contains("not a JSON object"));
        assert!(err("{").contains("invalid JSON"));
    }

    #[test]
    fn parameter_count_of_qwen3_4b() {
        // MSA-SPEC §2: the Qwen3-4B backbone has 4,022,468,096 parameters; the router adds 235,929,600.
        let text = r#"{"hidden_size":2560,"num_hidden_layers":36,"num_attention_heads":32,"num_key_value_heads":8,
            "head_dim":128,"intermediate_size":9728,"vocab_size":151936,"rms_norm_eps":1e-6,"rope_theta":5000000,
            "tie_word_embeddings":true}"#;
        let c = ModelConfig::from_json_str(text, "c").unwrap();
        assert_eq!(c.parameter_count(), 4_022_468_096);
        let m = with(text, |m| {
            m.insert(
                "msa_config".into(),
                serde_json::json!({"router_layer_idx":"18,19,20,21,22,23,24,25,26,27,28,29,30,31,32,33,34,35",
                    "pooling_kernel_size":64,"decouple_router":true,"aux_loss_method":"INFONCE_DECOUPLE"}),
            );
        });
        let c = ModelConfig::from_json_str(&m, "c").unwrap();
        assert_eq!(c.parameter_count(), 4_022_468_096 + 235_929_600);
    }
}
