//! The bundled tiny MSA model with a tokenizer that can spell Memory Interleave's protocol.
//!
//! The fixture's toy tokenizer (512 ids: CJK characters, digits, the prompt's words) lacks
//! `<|object_ref_end|>`, `<End-of-Retrieve>` and the words of `The user's question is:`. Twelve ids
//! that no test uses (the numbers 116 to 127) are renamed to those words; `<End-of-Retrieve>` stays
//! several tokens, as in Qwen3's vocabulary, so its detection across tokens is exercised. The weights
//! and config are the fixture's, so the model computes exactly what the fixture model computes, and a
//! bank of the fixture model fits it. Shared (`#[path]`-included) by the engine's and the CLI's tests
//! and by `cargo xtask demo`.

use std::path::{Path, PathBuf};

/// The renamed vocabulary entries: (number the fixture had, new token).
const RENAMED: [(&str, &str); 12] = [
    ("116", "The"),
    ("117", " is"),
    ("118", " user"),
    ("119", "'"),
    ("120", "s"),
    ("121", "<"),
    ("122", "End"),
    ("123", "-"),
    ("124", "of"),
    ("125", "Retrieve"),
    ("126", ">"),
    ("127", "<|object_ref_end|>"),
];

/// Writes the model into `dir/model` from the fixture directory `fixture` (`tests/fixtures/msa-tiny`)
/// and returns its path.
pub fn write_interleave_model(fixture: &Path, dir: &Path) -> PathBuf {
    let model = dir.join("model");
    std::fs::create_dir_all(&model).unwrap();
    for file in ["config.json", "generation_config.json", "model.safetensors"] {
        std::fs::copy(fixture.join(file), model.join(file)).unwrap();
    }
    let text = std::fs::read_to_string(fixture.join("tokenizer.json")).unwrap();
    let mut tokenizer: serde_json::Value = serde_json::from_str(&text).unwrap();
    let vocab = tokenizer["model"]["vocab"].as_object_mut().unwrap();
    let mut special = Vec::new();
    for (old, new) in RENAMED {
        let id = vocab
            .remove(old)
            .expect("the fixture vocabulary has the number");
        vocab.insert(new.to_string(), id.clone());
        if new.starts_with("<|") {
            special.push(serde_json::json!({
                "id": id, "content": new, "single_word": false, "lstrip": false,
                "rstrip": false, "normalized": false, "special": true
            }));
        }
    }
    tokenizer["added_tokens"]
        .as_array_mut()
        .unwrap()
        .extend(special);
    std::fs::write(
        model.join("tokenizer.json"),
        serde_json::to_vec(&tokenizer).unwrap(),
    )
    .unwrap();
    model
}
