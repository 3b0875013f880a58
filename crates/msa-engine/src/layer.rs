//! One decoder layer, split into the two halves every stage shares (MSA-SPEC §3.0): projecting the
//! normed input to q, k, v, and attending over a context then running the MLP. Stages differ only in what
//! they put into the context between the halves.

use crate::backend::{AttentionMask, Backend};
use crate::error::Result;
use crate::model::Model;

/// The first half of a layer for a block of tokens.
pub(crate) struct Projected<T> {
    /// `input_layernorm(h)`: `[n, hidden]`; the router projectors read it too.
    pub normed: T,
    /// `RoPE(q_norm(q_proj(x)))`: `[n, heads, head_dim]`.
    pub q: T,
    /// `RoPE(k_norm(k_proj(x)))`: `[n, kv_heads, head_dim]`.
    pub k: T,
    /// `v_proj(x)`: `[n, kv_heads, head_dim]`.
    pub v: T,
}

impl<B: Backend> Model<B> {
    pub(crate) fn rms_eps(&self) -> f32 {
        self.config.rms_norm_eps as f32
    }

    /// `x · Wᵀ` viewed as `[n, heads, head_dim]`.
    pub(crate) fn project_heads(
        &self,
        x: &B::Tensor,
        weight: &B::Weight,
        heads: usize,
    ) -> Result<B::Tensor> {
        let b = &self.backend;
        let y = b.matmul(x, weight)?;
        let n = b.shape(&y)[0];
        b.reshape(&y, &[n, heads, self.config.head_dim])
    }

    pub(crate) fn project(
        &self,
        layer: usize,
        hidden: &B::Tensor,
        positions: &[u32],
    ) -> Result<Projected<B::Tensor>> {
        let normed = self.input_norm(layer, hidden)?;
        self.project_normed(layer, normed, positions)
    }

    /// `input_layernorm(h)`.
    pub(crate) fn input_norm(&self, layer: usize, hidden: &B::Tensor) -> Result<B::Tensor> {
        let w = &self.weights.layers[layer];
        self.backend.rms_norm(hidden, &w.input_norm, self.rms_eps())
    }

    /// q, k and v from the normed input.
    pub(crate) fn project_normed(
        &self,
        layer: usize,
        normed: B::Tensor,
        positions: &[u32],
    ) -> Result<Projected<B::Tensor>> {
        let (b, c, w) = (&self.backend, &self.config, &self.weights.layers[layer]);
        let q = self.project_heads(&normed, &w.q_proj, c.num_attention_heads)?;
        let q = b.rope(
            &b.rms_norm(&q, &w.q_norm, self.rms_eps())?,
            positions,
            c.rope_theta,
        )?;
        let k = self.project_heads(&normed, &w.k_proj, c.num_key_value_heads)?;
        let k = b.rope(
            &b.rms_norm(&k, &w.k_norm, self.rms_eps())?,
            positions,
            c.rope_theta,
        )?;
        let v = self.project_heads(&normed, &w.v_proj, c.num_key_value_heads)?;
        Ok(Projected { normed, q, k, v })
    }

    /// `h + o_proj(attn(q, K, V))`, then `+ MLP(post_attention_layernorm(·))`.
    pub(crate) fn attend_and_mlp(
        &self,
        layer: usize,
        hidden: &B::Tensor,
        q: &B::Tensor,
        context_k: &B::Tensor,
        context_v: &B::Tensor,
        mask: AttentionMask,
    ) -> Result<B::Tensor> {
        let (b, w) = (&self.backend, &self.weights.layers[layer]);
        let attended = b.attention(q, context_k, context_v, mask)?;
        let n = b.shape(&attended)[0];
        let attended = b.reshape(
            &attended,
            &[n, self.config.num_attention_heads * self.config.head_dim],
        )?;
        let hidden = b.add(hidden, &b.matmul(&attended, &w.o_proj)?)?;
        let x = b.rms_norm(&hidden, &w.post_attention_norm, self.rms_eps())?;
        let gated = b.silu_mul(&b.matmul(&x, &w.gate_proj)?, &b.matmul(&x, &w.up_proj)?)?;
        b.add(&hidden, &b.matmul(&gated, &w.down_proj)?)
    }

    /// `model.norm` then the LM head: `[n, hidden]` → `([n, hidden] normed, [n, vocab] logits)`.
    pub(crate) fn logits(&self, hidden: &B::Tensor) -> Result<(B::Tensor, B::Tensor)> {
        let b = &self.backend;
        let normed = b.rms_norm(hidden, &self.weights.norm, self.rms_eps())?;
        let logits = b.matmul(&normed, self.lm_head())?;
        Ok((normed, logits))
    }
}
