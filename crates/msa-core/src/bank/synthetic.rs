//! Synthetic banks: random pooled rows with a real model's shapes, written in the real format, so that
//! routing and fetching can be measured at any memory size without encoding a corpus.

use std::path::Path;

use rand::{RngCore, SeedableRng, rngs::StdRng};

use super::{Bank, LayerRows, MemoryFingerprint, NewDocument, WriteProgress};
use crate::config::ScoreMode;
use crate::error::Result;

/// The memory shapes of MSA-4B (MSA-SPEC §1): 36 layers, router layers 18..=35, 8 KV heads of 128,
/// 64-token chunks, scaled-dot scores (`aux_loss_method = "INFONCE_DECOUPLE"`).
pub fn msa_4b_fingerprint() -> MemoryFingerprint {
    MemoryFingerprint {
        num_hidden_layers: 36,
        hidden_size: 2560,
        router_layers: (18..36).collect(),
        num_key_value_heads: 8,
        head_dim: 128,
        pooling_kernel_size: 64,
        score_mode: ScoreMode::ScaledDot,
        weights_digest: 0,
    }
}

/// What to generate.
#[derive(Clone, Debug)]
pub struct SyntheticSpec {
    pub fingerprint: MemoryFingerprint,
    /// Memory tokens in all (rounded down to whole documents).
    pub memory_tokens: u64,
    /// Tokens per document.
    pub document_tokens: usize,
    /// Documents per append (bounds the memory the generator needs: one layer of one segment).
    pub documents_per_segment: usize,
    pub seed: u64,
}

/// Fills `bytes` with random bf16 values of magnitude in [2⁻⁴, 1) and random sign: finite, and spread
/// like real pooled keys after normalisation.
fn random_bf16(rng: &mut StdRng, bytes: &mut [u8]) {
    rng.fill_bytes(bytes);
    for pair in bytes.chunks_exact_mut(2) {
        let r = u16::from_le_bytes([pair[0], pair[1]]);
        let exponent = 123 + ((r >> 7) & 3);
        let bits = (r & 0x807f) | (exponent << 7);
        pair.copy_from_slice(&bits.to_le_bytes());
    }
}

/// Creates a synthetic bank in `dir` (template rows are zero).
pub fn create(
    dir: impl AsRef<Path>,
    spec: &SyntheticSpec,
    mut progress: impl FnMut(WriteProgress),
) -> Result<Bank> {
    let fp = &spec.fingerprint;
    let template_len = 3;
    let row = fp.num_key_value_heads * fp.head_dim;
    let template =
        vec![(vec![0.0; template_len * row], vec![0.0; template_len * row]); fp.num_hidden_layers];
    let mut bank = Bank::create(dir, fp.clone(), template_len, &template)?;
    let documents = (spec.memory_tokens / spec.document_tokens as u64) as usize;
    let mut rng = StdRng::seed_from_u64(spec.seed);
    let mut done = 0;
    while done < documents {
        let count = spec.documents_per_segment.min(documents - done);
        let docs = (done..done + count)
            .map(|i| NewDocument {
                source: format!("synthetic-{i}"),
                tokens: spec.document_tokens,
                text: None,
                text_digest: 0,
            })
            .collect();
        let bytes = count * fp.chunks_of(spec.document_tokens) as usize * fp.row_bytes();
        bank.append(
            docs,
            |_| {
                let mut rows = || {
                    let mut b = vec![0u8; bytes];
                    random_bf16(&mut rng, &mut b);
                    b
                };
                Ok(LayerRows {
                    routing_keys: rows(),
                    k: rows(),
                    v: rows(),
                })
            },
            &mut progress,
        )?;
        done += count;
    }
    Ok(bank)
}
