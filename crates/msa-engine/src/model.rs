//! A loaded model: config, tokenizer and weights uploaded to a backend in their stored dtype.

#[cfg(not(target_arch = "wasm32"))]
use std::path::Path;

use msa_core::{Checkpoint, ModelConfig, MsaTokenizer};

use crate::backend::Backend;
use crate::error::Result;

/// One decoder layer's weights (MSA-SPEC §2).
pub struct LayerWeights<B: Backend> {
    pub input_norm: B::Weight,
    pub post_attention_norm: B::Weight,
    pub q_proj: B::Weight,
    pub k_proj: B::Weight,
    pub v_proj: B::Weight,
    pub o_proj: B::Weight,
    pub q_norm: B::Weight,
    pub k_norm: B::Weight,
    pub gate_proj: B::Weight,
    pub up_proj: B::Weight,
    pub down_proj: B::Weight,
    /// Router projectors `(router_q_proj, router_k_proj)`, on router layers only.
    pub router: Option<(B::Weight, B::Weight)>,
}

pub struct Weights<B: Backend> {
    pub embed_tokens: B::Weight,
    pub layers: Vec<LayerWeights<B>>,
    pub norm: B::Weight,
    /// The untied output projection; `None` when it is the embedding.
    pub lm_head: Option<B::Weight>,
}

/// A model ready to run on backend `B`.
pub struct Model<B: Backend> {
    pub config: ModelConfig,
    pub tokenizer: Option<MsaTokenizer>,
    pub backend: B,
    pub weights: Weights<B>,
    /// CRC-32 of the weights that shape the memory, as stored (see [`memory_weights_digest`]): what tells
    /// a memory encoded by this checkpoint from one encoded by another of the same shape.
    pub weights_digest: u32,
}

impl<B: Backend> Model<B> {
    /// Loads `config.json`, the checkpoint and `tokenizer.json` (optional: a model without one runs on
    /// token ids only) from a model directory.
    #[cfg(not(target_arch = "wasm32"))]
    pub fn load(dir: impl AsRef<Path>, backend: B) -> Result<Self> {
        let dir = dir.as_ref();
        let config = ModelConfig::from_file(dir.join("config.json"))?;
        let checkpoint = Checkpoint::open(dir)?;
        let tokenizer_path = dir.join("tokenizer.json");
        let tokenizer = if tokenizer_path.exists() {
            Some(MsaTokenizer::from_file(&tokenizer_path)?)
        } else {
            None
        };
        Self::from_parts(config, &checkpoint, tokenizer, backend)
    }

    /// Uploads the weights of a validated checkpoint.
    pub fn from_parts(
        config: ModelConfig,
        checkpoint: &Checkpoint,
        tokenizer: Option<MsaTokenizer>,
        backend: B,
    ) -> Result<Self> {
        checkpoint.validate(&config)?;
        let weights = upload_weights(&config, checkpoint, &backend)?;
        let weights_digest = memory_weights_digest(&config, checkpoint)?;
        Ok(Model {
            config,
            tokenizer,
            backend,
            weights,
            weights_digest,
        })
    }

    pub fn lm_head(&self) -> &B::Weight {
        self.weights
            .lm_head
            .as_ref()
            .unwrap_or(&self.weights.embed_tokens)
    }
}

/// CRC-32 over the stored bytes of every layer's `k_proj`, `v_proj` and `k_norm` and every router
/// layer's `router_k_proj`, up to the last router layer: the weights the pooled K̄, V̄, K̄r come straight
/// from (any fine-tune of the layers below changes them too). 0 for a model without router layers. At
/// MSA-4B's sizes this reads about 280 MB once per load.
pub fn memory_weights_digest(config: &ModelConfig, checkpoint: &Checkpoint) -> Result<u32> {
    let Some(last) = config.msa.as_ref().and_then(|m| m.router_layers.last()) else {
        return Ok(0);
    };
    let mut hasher = crc32fast::Hasher::new();
    for layer in 0..=*last {
        let p = format!("model.layers.{layer}.self_attn");
        for name in ["k_proj.weight", "v_proj.weight", "k_norm.weight"] {
            hasher.update(checkpoint.tensor(&format!("{p}.{name}"))?.bytes);
        }
        if config.is_router_layer(layer) {
            hasher.update(
                checkpoint
                    .tensor(&format!("{p}.router_k_proj.0.weight"))?
                    .bytes,
            );
        }
    }
    Ok(hasher.finalize())
}

fn upload_weights<B: Backend>(
    config: &ModelConfig,
    checkpoint: &Checkpoint,
    backend: &B,
) -> Result<Weights<B>> {
    let get = |name: &str| -> Result<B::Weight> { backend.upload_weight(checkpoint.tensor(name)?) };
    let layers = (0..config.num_hidden_layers)
        .map(|i| {
            let p = format!("model.layers.{i}");
            let w = |suffix: &str| get(&format!("{p}.{suffix}"));
            Ok(LayerWeights {
                input_norm: w("input_layernorm.weight")?,
                post_attention_norm: w("post_attention_layernorm.weight")?,
                q_proj: w("self_attn.q_proj.weight")?,
                k_proj: w("self_attn.k_proj.weight")?,
                v_proj: w("self_attn.v_proj.weight")?,
                o_proj: w("self_attn.o_proj.weight")?,
                q_norm: w("self_attn.q_norm.weight")?,
                k_norm: w("self_attn.k_norm.weight")?,
                gate_proj: w("mlp.gate_proj.weight")?,
                up_proj: w("mlp.up_proj.weight")?,
                down_proj: w("mlp.down_proj.weight")?,
                router: if config.is_router_layer(i) {
                    Some((
                        w("self_attn.router_q_proj.0.weight")?,
                        w("self_attn.router_k_proj.0.weight")?,
                    ))
                } else {
                    None
                },
            })
        })
        .collect::<Result<Vec<_>>>()?;
    let head = checkpoint.lm_head_name(config);
    Ok(Weights {
        embed_tokens: get("model.embed_tokens.weight")?,
        layers,
        norm: get("model.norm.weight")?,
        lm_head: if head == "lm_head.weight" {
            Some(get(head)?)
        } else {
            None
        },
    })
}
