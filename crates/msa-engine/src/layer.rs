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
        self.heads(self.backend.matmul(x, weight)?, heads)
    }

    /// `[n, heads × head_dim]` viewed as `[n, heads, head_dim]`.
    fn heads(&self, y: B::Tensor, heads: usize) -> Result<B::Tensor> {
        let b = &self.backend;
        let n = b.shape(&y)[0];
        b.reshape(&y, &[n, heads, self.config.head_dim])
    }

    /// q, k and v of a block whose normed input nothing else reads (layers without routing): the
    /// input norm is fused into the projections.
    pub(crate) fn project(
        &self,
        layer: usize,
        hidden: &B::Tensor,
        positions: &[u32],
    ) -> Result<(B::Tensor, B::Tensor, B::Tensor)> {
        let (b, w) = (&self.backend, &self.weights.layers[layer]);
        self.qkv(layer, positions, |weight| {
            b.norm_matmul(hidden, &w.input_norm, self.rms_eps(), weight)
        })
    }

    /// `input_layernorm(h)`.
    pub(crate) fn input_norm(&self, layer: usize, hidden: &B::Tensor) -> Result<B::Tensor> {
        let w = &self.weights.layers[layer];
        self.backend.rms_norm(hidden, &w.input_norm, self.rms_eps())
    }

    /// q, k and v from the normed input, which the caller also needs (the router projectors read it).
    pub(crate) fn project_normed(
        &self,
        layer: usize,
        normed: B::Tensor,
        positions: &[u32],
    ) -> Result<Projected<B::Tensor>> {
        let (q, k, v) = self.qkv(layer, positions, |weight| {
            self.backend.matmul(&normed, weight)
        })?;
        Ok(Projected { normed, q, k, v })
    }

    /// `RoPE(q_norm(q_proj(x)))`, `RoPE(k_norm(k_proj(x)))` and `v_proj(x)`, where `project(W)` is
    /// `x · Wᵀ`.
    fn qkv(
        &self,
        layer: usize,
        positions: &[u32],
        project: impl Fn(&B::Weight) -> Result<B::Tensor>,
    ) -> Result<(B::Tensor, B::Tensor, B::Tensor)> {
        let (b, c, w) = (&self.backend, &self.config, &self.weights.layers[layer]);
        let (eps, theta) = (self.rms_eps(), c.rope_theta);
        let q = self.heads(project(&w.q_proj)?, c.num_attention_heads)?;
        let q = b.norm_rope(&q, &w.q_norm, eps, positions, theta)?;
        let k = self.heads(project(&w.k_proj)?, c.num_key_value_heads)?;
        let k = b.norm_rope(&k, &w.k_norm, eps, positions, theta)?;
        let v = self.heads(project(&w.v_proj)?, c.num_key_value_heads)?;
        Ok((q, k, v))
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
        let hidden = b.matmul_add(&attended, &w.o_proj, hidden)?;
        let gated = b.norm_swiglu(
            &hidden,
            &w.post_attention_norm,
            self.rms_eps(),
            &w.gate_proj,
            &w.up_proj,
        )?;
        b.matmul_add(&gated, &w.down_proj, &hidden)
    }

    /// `model.norm` then the LM head: `[n, hidden]` → `([n, hidden] normed, [n, vocab] logits)`.
    pub(crate) fn logits(&self, hidden: &B::Tensor) -> Result<(B::Tensor, B::Tensor)> {
        let b = &self.backend;
        let normed = b.rms_norm(hidden, &self.weights.norm, self.rms_eps())?;
        let logits = b.matmul(&normed, self.lm_head())?;
        Ok((normed, logits))
    }
}
