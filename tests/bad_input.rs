//! Bad input gets a typed error that names the problem and the file, field or tensor at fault: broken
//! checkpoints, configs and tokenizers, empty documents and questions, empty memories, foreign models,
//! out-of-vocabulary ids and invalid sampling settings. Nothing here may panic.
//!
//! Broken model directories are built in temporary directories from the fixtures, which are never modified.

mod common;

use std::path::{Path, PathBuf};

use common::{Tensor, copy_fixture, fixture_dir, fixture_tensors, write_tensors};
use msa::core::checkpoint::{INDEX_FILE, SINGLE_FILE};
use msa::core::{QueryPrompt, TokenRole};
use msa::engine::{CpuBackend, Model};
use msa::{Error, GenerateOptions, Msa, SamplingParams};
use safetensors::Dtype;

type CoreError = msa::core::Error;

const MSA: &str = "msa-tiny";
const QWEN3: &str = "qwen3-tiny";

// ---------------------------------------------------------------------------------------------------------
// Helpers

/// The error of a call that must fail (the Ok types need not be `Debug`).
fn expect_err<T>(result: msa::Result<T>, what: &str) -> Error {
    match result {
        Ok(_) => panic!("{what}: expected an error, got Ok"),
        Err(e) => e,
    }
}

fn load_err(dir: &Path) -> Error {
    expect_err(Msa::load(dir), &format!("loading {}", dir.display()))
}

/// Asserts that an error's message mentions every needle.
fn assert_mentions(error: &Error, needles: &[&str]) {
    let message = error.to_string();
    for needle in needles {
        assert!(
            message.contains(needle),
            "the message `{message}` does not mention `{needle}` ({error:?})"
        );
    }
}

fn strings(file: &str) -> Vec<String> {
    let text = std::fs::read_to_string(fixture_dir(MSA).join(file)).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn greedy(max_tokens: usize) -> GenerateOptions {
    GenerateOptions {
        max_tokens,
        ..GenerateOptions::default()
    }
}

/// A copy of a fixture's model files (config, tokenizer if any, weights).
/// msa-tiny with its weights rewritten by `edit`.
fn msa_with_tensors(edit: impl FnOnce(&mut Vec<Tensor>)) -> tempfile::TempDir {
    let dir = copy_fixture(MSA);
    let mut tensors = fixture_tensors(MSA);
    edit(&mut tensors);
    write_tensors(&dir.path().join(SINGLE_FILE), &tensors);
    dir
}

/// msa-tiny with its config.json replaced by `text`.
fn msa_with_config_text(text: &str) -> tempfile::TempDir {
    let dir = copy_fixture(MSA);
    std::fs::write(dir.path().join("config.json"), text).unwrap();
    dir
}

fn msa_config_json() -> serde_json::Value {
    let text = std::fs::read_to_string(fixture_dir(MSA).join("config.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn path_text(path: &Path) -> String {
    path.display().to_string()
}

// ---------------------------------------------------------------------------------------------------------
// Broken safetensors files

fn assert_safetensors_error(dir: &Path, what: &str) {
    let weights = dir.join(SINGLE_FILE);
    let error = load_err(dir);
    match &error {
        Error::Core(CoreError::Safetensors { path, .. }) => {
            assert_eq!(path, &weights, "{what}: the error names the file")
        }
        other => panic!("{what}: expected a Safetensors error, got {other:?}"),
    }
    assert_mentions(&error, &[&path_text(&weights), "truncated or corrupt"]);
}

#[test]
fn truncated_safetensors_is_a_safetensors_error() {
    let dir = copy_fixture(MSA);
    let weights = dir.path().join(SINGLE_FILE);
    let bytes = std::fs::read(&weights).unwrap();
    for keep in [bytes.len() / 2, bytes.len() - 1, 100, 7] {
        std::fs::write(&weights, &bytes[..keep]).unwrap();
        assert_safetensors_error(dir.path(), &format!("cut to {keep} bytes"));
    }
}

#[test]
fn empty_safetensors_file_is_a_safetensors_error() {
    let dir = copy_fixture(MSA);
    std::fs::write(dir.path().join(SINGLE_FILE), b"").unwrap();
    assert_safetensors_error(dir.path(), "an empty file");
}

#[test]
fn corrupt_safetensors_is_a_safetensors_error() {
    let original = std::fs::read(fixture_dir(MSA).join(SINGLE_FILE)).unwrap();
    let header_len = u64::from_le_bytes(original[..8].try_into().unwrap()) as usize;
    let file_len = original.len() as u64;

    let mut cases: Vec<(&str, Vec<u8>)> = Vec::new();
    // Garbage header bytes: not UTF-8.
    let mut garbage = original.clone();
    garbage[8..8 + header_len].fill(0xff);
    cases.push(("a header of 0xff bytes", garbage));
    // Garbage header bytes: UTF-8 but not JSON.
    let mut not_json = original.clone();
    not_json[8..8 + header_len].fill(b'#');
    cases.push(("a header that is not JSON", not_json));
    // JSON, but not a safetensors header.
    let mut wrong_json = original.clone();
    wrong_json[8..8 + header_len].fill(b' ');
    wrong_json[8..8 + 6].copy_from_slice(b"[1, 2]");
    cases.push(("a header that is a JSON list", wrong_json));
    // Header lengths that do not fit the file.
    for (what, len) in [
        ("a header length larger than the file", file_len + 1000),
        ("a header length one past the file", file_len - 7),
        ("a header length near u64::MAX", u64::MAX - 3),
    ] {
        let mut bytes = original.clone();
        bytes[..8].copy_from_slice(&len.to_le_bytes());
        cases.push((what, bytes));
    }
    // Random bytes throughout.
    let mut state = 0x2545_f491_4f6c_dd1du64;
    let noise: Vec<u8> = (0..4096)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect();
    cases.push(("random bytes", noise));
    // Trailing bytes after the last tensor.
    let mut trailing = original.clone();
    trailing.extend_from_slice(&[0u8; 16]);
    cases.push(("trailing bytes after the data", trailing));

    for (what, bytes) in cases {
        let dir = copy_fixture(MSA);
        std::fs::write(dir.path().join(SINGLE_FILE), bytes).unwrap();
        assert_safetensors_error(dir.path(), what);
    }
}

// ---------------------------------------------------------------------------------------------------------
// Missing, misshapen and mistyped tensors

fn assert_missing_tensor(dir: &Path, tensor: &str) {
    let error = load_err(dir);
    match &error {
        Error::Core(CoreError::MissingTensor { name, .. }) => assert_eq!(name, tensor),
        other => panic!("expected MissingTensor({tensor}), got {other:?}"),
    }
    assert_mentions(&error, &[tensor, "missing", SINGLE_FILE]);
}

#[test]
fn missing_tensors_are_named() {
    for tensor in [
        "model.layers.1.mlp.up_proj.weight",
        // Router projectors of router layers 2 and 3.
        "model.layers.2.self_attn.router_q_proj.0.weight",
        "model.layers.3.self_attn.router_k_proj.0.weight",
        // msa-tiny ties its LM head to the embedding, so this is the only output projection.
        "model.embed_tokens.weight",
    ] {
        let dir = msa_with_tensors(|t| t.retain(|t| t.name != tensor));
        assert_missing_tensor(dir.path(), tensor);
    }
}

#[test]
fn wrong_shape_names_tensor_and_both_shapes() {
    let tensor = "model.layers.1.self_attn.k_proj.weight";
    // k_proj is [kv_heads * head_dim, hidden] = [32, 64].
    for shape in [vec![16usize, 64], vec![64, 32], vec![32, 64, 1], vec![2048]] {
        let dir = msa_with_tensors(|tensors| {
            let t = tensors.iter_mut().find(|t| t.name == tensor).unwrap();
            let elements: usize = shape.iter().product();
            t.data.truncate(elements * 4);
            t.shape = shape.clone();
        });
        let weights = dir.path().join(SINGLE_FILE);
        let error = load_err(dir.path());
        match &error {
            Error::Core(CoreError::ShapeMismatch {
                path,
                name,
                expected,
                actual,
            }) => {
                assert_eq!(path, &weights);
                assert_eq!(name, tensor);
                assert_eq!(expected, &[32, 64]);
                assert_eq!(actual, &shape);
            }
            other => panic!("{shape:?}: expected ShapeMismatch, got {other:?}"),
        }
        assert_mentions(
            &error,
            &[
                tensor,
                &format!("{shape:?}"),
                "[32, 64]",
                &path_text(&weights),
            ],
        );
    }
}

#[test]
fn unsupported_dtype_is_named() {
    let tensor = "model.layers.0.self_attn.v_proj.weight";
    for (dtype, label) in [(Dtype::I32, "I32"), (Dtype::F64, "F64"), (Dtype::U8, "U8")] {
        let dir = msa_with_tensors(|tensors| {
            let t = tensors.iter_mut().find(|t| t.name == tensor).unwrap();
            let values = t
                .data
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes(b.try_into().unwrap()));
            t.data = match dtype {
                Dtype::I32 => values.flat_map(|v| (v as i32).to_le_bytes()).collect(),
                Dtype::F64 => values.flat_map(|v| f64::from(v).to_le_bytes()).collect(),
                _ => values.map(|v| v as u8).collect(),
            };
            t.dtype = dtype;
        });
        let weights = dir.path().join(SINGLE_FILE);
        let error = load_err(dir.path());
        match &error {
            Error::Core(CoreError::UnsupportedDType { path, name, .. }) => {
                assert_eq!(path, &weights);
                assert_eq!(name, tensor);
            }
            other => panic!("{label}: expected UnsupportedDType, got {other:?}"),
        }
        assert_mentions(&error, &[tensor, label, &path_text(&weights)]);
    }
}

#[test]
fn unused_scalar_of_another_dtype_is_tolerated() {
    // Training-only scalars (a step counter) are not an error as long as nothing uses them.
    let dir = msa_with_tensors(|tensors| {
        tensors.push(Tensor {
            name: "training_step".into(),
            dtype: Dtype::I64,
            shape: vec![],
            data: 1234i64.to_le_bytes().to_vec(),
        })
    });
    Msa::load(dir.path()).expect("an unused I64 scalar does not stop loading");
}

#[test]
fn unused_tensor_of_another_dtype_is_tolerated() {
    // An integer buffer the model never reads (e.g. saved position ids) does not stop loading.
    let dir = msa_with_tensors(|tensors| {
        tensors.push(Tensor {
            name: "model.position_ids".into(),
            dtype: Dtype::I64,
            shape: vec![1, 4],
            data: [0i64, 1, 2, 3]
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect(),
        })
    });
    Msa::load(dir.path()).expect("an unused I64 tensor does not stop loading");
}

#[test]
fn config_with_absurd_epsilon_is_named() {
    for eps in [1e300, 0.0, -1e-6] {
        let mut config = msa_config_json();
        config["rms_norm_eps"] = eps.into();
        let dir = msa_with_config_text(&config.to_string());
        let error = load_err(dir.path());
        assert!(
            matches!(&error, Error::Core(CoreError::Config { .. })),
            "{eps}: {error:?}"
        );
        assert_mentions(&error, &["rms_norm_eps", "config.json"]);
    }
}

#[test]
fn no_weights_file_is_no_weights() {
    let dir = copy_fixture(MSA);
    std::fs::remove_file(dir.path().join(SINGLE_FILE)).unwrap();
    // A file of another format does not count.
    std::fs::write(dir.path().join("pytorch_model.bin"), b"not ours").unwrap();
    let error = load_err(dir.path());
    match &error {
        Error::Core(CoreError::NoWeights { dir: named }) => assert_eq!(named, dir.path()),
        other => panic!("expected NoWeights, got {other:?}"),
    }
    assert_mentions(&error, &[&path_text(dir.path()), SINGLE_FILE, INDEX_FILE]);
}

// ---------------------------------------------------------------------------------------------------------
// config.json

#[test]
fn config_missing_a_required_field_is_named() {
    for field in [
        "hidden_size",
        "vocab_size",
        "num_hidden_layers",
        "rms_norm_eps",
    ] {
        let mut config = msa_config_json();
        config.as_object_mut().unwrap().remove(field);
        let dir = msa_with_config_text(&config.to_string());
        let error = load_err(dir.path());
        match &error {
            Error::Core(CoreError::Config { path, problem }) => {
                assert_eq!(path, &dir.path().join("config.json"));
                assert!(problem.contains(field), "{problem}");
            }
            other => panic!("{field}: expected a Config error, got {other:?}"),
        }
        assert_mentions(&error, &[field, "missing", "config.json"]);
    }
}

#[test]
fn config_with_router_layer_out_of_range_is_named() {
    let mut config = msa_config_json();
    config["msa_config"]["router_layer_idx"] = "2,7".into();
    let dir = msa_with_config_text(&config.to_string());
    let error = load_err(dir.path());
    assert!(
        matches!(&error, Error::Core(CoreError::Config { .. })),
        "{error:?}"
    );
    assert_mentions(&error, &["layer 7", "out of range", "config.json"]);
}

#[test]
fn config_with_wrong_types_is_named() {
    for (field, value) in [
        ("hidden_size", serde_json::json!("sixty-four")),
        ("num_attention_heads", serde_json::json!(-4)),
        ("tie_word_embeddings", serde_json::json!("yes")),
    ] {
        let mut config = msa_config_json();
        config[field] = value;
        let dir = msa_with_config_text(&config.to_string());
        let error = load_err(dir.path());
        assert!(
            matches!(&error, Error::Core(CoreError::Config { .. })),
            "{field}: {error:?}"
        );
        assert_mentions(&error, &[field, "config.json"]);
    }
}

#[test]
fn config_with_overflowing_dimensions_is_a_typed_error() {
    // num_attention_heads * head_dim does not fit a usize: the loader must say so, not overflow.
    for (field, value) in [
        ("head_dim", 1u64 << 62),
        ("num_attention_heads", 1u64 << 62),
    ] {
        let mut config = msa_config_json();
        config[field] = value.into();
        let dir = msa_with_config_text(&config.to_string());
        let error = load_err(dir.path());
        assert!(
            matches!(
                &error,
                Error::Core(CoreError::Config { .. } | CoreError::ShapeMismatch { .. })
            ),
            "{field} = {value}: {error:?}"
        );
        assert_mentions(&error, &[field]);
    }
}

#[test]
fn doc_top_k_beyond_the_position_range_is_refused() {
    // Stage-2 positions start at template_len + doc_top_k and are u32: a k that does not fit must be
    // refused (by the config, naming doc_top_k, or when asking), never overflow or be truncated.
    let question = &strings("queries.json")[0];
    for k in [u64::from(u32::MAX), (1u64 << 32) + 1, 1u64 << 40] {
        let mut config = msa_config_json();
        config["msa_config"]["doc_top_k"] = k.into();
        let dir = msa_with_config_text(&config.to_string());
        let outcome = Msa::load(dir.path()).and_then(|msa| {
            let memory = msa.encode(&strings("memory.json")[..3])?;
            msa.ask(&memory, question, &greedy(2))
        });
        let error = expect_err(outcome, &format!("doc_top_k = {k}"));
        if let Error::Core(CoreError::Config { .. }) = &error {
            assert_mentions(&error, &["doc_top_k", "config.json"]);
        }
    }
}

#[test]
fn invalid_config_json_is_a_json_error() {
    for text in ["{", "", "{\"hidden_size\": 64,}", "not json at all"] {
        let dir = msa_with_config_text(text);
        let error = load_err(dir.path());
        match &error {
            Error::Core(CoreError::Json { path, .. }) => {
                assert_eq!(path, &dir.path().join("config.json"))
            }
            other => panic!("{text:?}: expected a Json error, got {other:?}"),
        }
        assert_mentions(&error, &["config.json", "invalid JSON"]);
    }
}

#[test]
fn missing_config_is_an_io_error() {
    let dir = copy_fixture(MSA);
    std::fs::remove_file(dir.path().join("config.json")).unwrap();
    let error = load_err(dir.path());
    match &error {
        Error::Core(CoreError::Io { path, .. }) => {
            assert_eq!(path, &dir.path().join("config.json"))
        }
        other => panic!("expected an Io error, got {other:?}"),
    }
    assert_mentions(&error, &["config.json"]);
}

// ---------------------------------------------------------------------------------------------------------
// Sharded checkpoints

/// msa-tiny as two shards plus an index; returns the directory and the shard names.
fn sharded_msa() -> (tempfile::TempDir, [String; 2]) {
    let dir = copy_fixture(MSA);
    std::fs::remove_file(dir.path().join(SINGLE_FILE)).unwrap();
    let tensors = fixture_tensors(MSA);
    let names = [
        "model-00001-of-00002.safetensors".to_string(),
        "model-00002-of-00002.safetensors".to_string(),
    ];
    let (first, second) = tensors.split_at(tensors.len() / 2);
    write_tensors(&dir.path().join(&names[0]), first);
    write_tensors(&dir.path().join(&names[1]), second);
    let weight_map: serde_json::Map<String, serde_json::Value> = first
        .iter()
        .map(|t| (t.name.clone(), names[0].clone().into()))
        .chain(
            second
                .iter()
                .map(|t| (t.name.clone(), names[1].clone().into())),
        )
        .collect();
    let index = serde_json::json!({"metadata": {"total_size": 0}, "weight_map": weight_map});
    std::fs::write(dir.path().join(INDEX_FILE), index.to_string()).unwrap();
    (dir, names)
}

#[test]
fn sharded_fixture_loads() {
    let (dir, _) = sharded_msa();
    Msa::load(dir.path()).expect("the well-formed sharded checkpoint loads");
}

#[test]
fn index_naming_a_missing_shard_is_an_io_error() {
    let (dir, names) = sharded_msa();
    std::fs::remove_file(dir.path().join(&names[1])).unwrap();
    let missing: PathBuf = dir.path().join(&names[1]);
    let error = load_err(dir.path());
    match &error {
        Error::Core(CoreError::Io { path, source }) => {
            assert_eq!(path, &missing);
            assert_eq!(source.kind(), std::io::ErrorKind::NotFound);
        }
        other => panic!("expected an Io error, got {other:?}"),
    }
    assert_mentions(&error, &[&path_text(&missing)]);
}

#[test]
fn truncated_shard_is_a_safetensors_error_naming_the_shard() {
    let (dir, names) = sharded_msa();
    let shard = dir.path().join(&names[0]);
    let bytes = std::fs::read(&shard).unwrap();
    std::fs::write(&shard, &bytes[..bytes.len() / 2]).unwrap();
    let error = load_err(dir.path());
    match &error {
        Error::Core(CoreError::Safetensors { path, .. }) => assert_eq!(path, &shard),
        other => panic!("expected a Safetensors error, got {other:?}"),
    }
    assert_mentions(&error, &[&path_text(&shard), "truncated or corrupt"]);
}

#[test]
fn index_listing_a_tensor_its_shard_lacks_is_a_missing_tensor() {
    let (dir, names) = sharded_msa();
    let index_path = dir.path().join(INDEX_FILE);
    let mut index: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&index_path).unwrap()).unwrap();
    index["weight_map"]["model.layers.9.mlp.up_proj.weight"] = names[0].clone().into();
    std::fs::write(&index_path, index.to_string()).unwrap();
    let error = load_err(dir.path());
    match &error {
        Error::Core(CoreError::MissingTensor { name, .. }) => {
            assert_eq!(name, "model.layers.9.mlp.up_proj.weight")
        }
        other => panic!("expected MissingTensor, got {other:?}"),
    }
    assert_mentions(
        &error,
        &["model.layers.9.mlp.up_proj.weight", &names[0], INDEX_FILE],
    );
}

#[test]
fn broken_index_is_a_typed_error() {
    let (dir, _) = sharded_msa();
    let index_path = dir.path().join(INDEX_FILE);

    std::fs::write(&index_path, "{\"weight_map\": ").unwrap();
    let error = load_err(dir.path());
    assert!(
        matches!(&error, Error::Core(CoreError::Json { path, .. }) if path == &index_path),
        "{error:?}"
    );
    assert_mentions(&error, &[INDEX_FILE]);

    for text in ["{\"metadata\": {}}", "{\"weight_map\": {}}"] {
        std::fs::write(&index_path, text).unwrap();
        let error = load_err(dir.path());
        assert!(
            matches!(&error, Error::Core(CoreError::Safetensors { path, .. }) if path == &index_path),
            "{text}: {error:?}"
        );
        assert_mentions(&error, &[INDEX_FILE, "weight_map"]);
    }
}

#[test]
fn index_entries_must_name_files_in_the_model_directory() {
    let (dir, names) = sharded_msa();
    let index_path = dir.path().join(INDEX_FILE);
    let original: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&index_path).unwrap()).unwrap();
    let bad_values = [
        serde_json::json!(7),
        serde_json::json!(""),
        serde_json::json!(format!("../{}", names[0])),
        serde_json::json!(format!("/tmp/{}", names[0])),
    ];
    for value in bad_values {
        let mut index = original.clone();
        index["weight_map"]["model.norm.weight"] = value.clone();
        std::fs::write(&index_path, index.to_string()).unwrap();
        let error = load_err(dir.path());
        assert!(
            matches!(&error, Error::Core(CoreError::Safetensors { path, .. }) if path == &index_path),
            "{value}: {error:?}"
        );
        assert_mentions(&error, &["model.norm.weight", INDEX_FILE]);
    }
}

// ---------------------------------------------------------------------------------------------------------
// Tokenizer

#[test]
fn missing_tokenizer_loads_but_text_input_is_refused() {
    let dir = copy_fixture(MSA);
    std::fs::remove_file(dir.path().join("tokenizer.json")).unwrap();
    let msa = Msa::load(dir.path()).expect("the tokenizer is optional");
    assert!(msa.model().tokenizer.is_none());

    let error = expect_err(msa.encode(&["text"]), "encoding text without a tokenizer");
    assert!(
        matches!(&error, Error::Core(CoreError::Tokenizer { .. })),
        "{error:?}"
    );
    assert_mentions(&error, &["tokenizer"]);

    // Token-level encoding still works; asking a text question does not.
    let memory = pollster::block_on(msa.model().encode_token_documents(
        &[1, 2, 3],
        &[vec![10, 11, 12, 13], vec![20, 21]],
        |_| {},
    ))
    .expect("token documents encode without a tokenizer");
    assert_eq!(memory.documents().len(), 2);
    let error = expect_err(
        msa.ask(&memory, "a question", &greedy(2)),
        "asking without a tokenizer",
    );
    assert!(
        matches!(&error, Error::Core(CoreError::Tokenizer { .. })),
        "{error:?}"
    );
    assert_mentions(&error, &["tokenizer"]);
}

#[test]
fn garbage_tokenizer_is_a_tokenizer_error_at_load() {
    for text in ["this is not a tokenizer", "", "{\"model\": 3}"] {
        let dir = copy_fixture(MSA);
        let tokenizer = dir.path().join("tokenizer.json");
        std::fs::write(&tokenizer, text).unwrap();
        let error = load_err(dir.path());
        match &error {
            Error::Core(CoreError::Tokenizer { path, .. }) => assert_eq!(path, &tokenizer),
            other => panic!("{text:?}: expected a Tokenizer error, got {other:?}"),
        }
        assert_mentions(&error, &[&path_text(&tokenizer)]);
    }
}

// ---------------------------------------------------------------------------------------------------------
// Documents, questions and memories

#[test]
fn empty_documents_are_refused_with_their_index() {
    let msa = Msa::load(fixture_dir(MSA)).unwrap();
    let texts = strings("memory.json");
    let (a, b) = (texts[0].as_str(), texts[1].as_str());
    for (documents, index) in [
        (vec![a, "", b], 1),
        (vec![a, b, "   "], 2),
        (vec!["\n\t ", b], 0),
        (vec![""], 0),
    ] {
        let error = expect_err(msa.encode(&documents), &format!("{documents:?}"));
        assert!(
            matches!(error, Error::EmptyDocument { index: i } if i == index),
            "{documents:?}: {error:?}"
        );
        assert_mentions(&error, &[&format!("document {index}"), "empty"]);
    }

    // Token-level documents: an empty token list.
    let error = expect_err(
        pollster::block_on(msa.model().encode_token_documents(
            &[1, 2, 3],
            &[vec![5, 6], vec![]],
            |_| {},
        )),
        "an empty token document",
    );
    assert!(
        matches!(error, Error::EmptyDocument { index: 1 }),
        "{error:?}"
    );
}

#[test]
fn failed_append_leaves_the_memory_unchanged() {
    let msa = Msa::load(fixture_dir(MSA)).unwrap();
    let documents = strings("memory.json");
    let question = &strings("queries.json")[0];
    let mut memory = msa.encode(&documents).unwrap();
    let before = msa.ask(&memory, question, &greedy(6)).unwrap();
    let (count, chunks) = (memory.documents().len(), memory.chunk_count());
    let listed = memory.documents().to_vec();

    let (a, b) = (&documents[0][..12], &documents[1][..12]);
    for bad in [vec![a, "  "], vec![""], vec![a, b, "\n"]] {
        let error = expect_err(msa.add_documents(&mut memory, &bad), "appending");
        let index = count + bad.iter().position(|d| d.trim().is_empty()).unwrap();
        assert!(
            matches!(error, Error::EmptyDocument { index: i } if i == index),
            "{bad:?}: {error:?}"
        );
        assert_eq!(memory.documents().len(), count);
        assert_eq!(memory.chunk_count(), chunks);
        assert_eq!(memory.documents(), listed.as_slice());
    }
    let after = msa.ask(&memory, question, &greedy(6)).unwrap();
    assert_eq!(
        after, before,
        "the answer is unchanged after failed appends"
    );
}

#[test]
fn empty_questions_are_refused() {
    let msa = Msa::load(fixture_dir(MSA)).unwrap();
    let memory = msa.encode(&strings("memory.json")[..2]).unwrap();
    for question in ["", "  ", "\n\t"] {
        let error = expect_err(msa.ask(&memory, question, &greedy(2)), question);
        assert!(matches!(error, Error::EmptyQuestion), "{error:?}");
        assert_mentions(&error, &["question", "empty"]);
    }

    // A token-level prompt without routing-query tokens has no question either.
    let prompt = QueryPrompt {
        ids: vec![1, 2, 3],
        roles: vec![TokenRole::Template, TokenRole::Template, TokenRole::Context],
    };
    let error = expect_err(
        pollster::block_on(msa.model().prefill_query(&memory, &prompt, None)),
        "a prompt without routing tokens",
    );
    assert!(matches!(error, Error::EmptyQuestion), "{error:?}");
}

#[test]
fn asking_an_empty_memory_is_no_documents() {
    let msa = Msa::load(fixture_dir(MSA)).unwrap();
    let mut memory = msa
        .encode(&[] as &[&str])
        .expect("encoding no documents gives an empty memory");
    assert!(memory.is_empty());
    assert_eq!(memory.documents().len(), 0);
    assert_eq!(memory.chunk_count(), 0);

    let question = &strings("queries.json")[0];
    let error = expect_err(msa.ask(&memory, question, &greedy(2)), "empty memory");
    assert!(matches!(error, Error::NoDocuments), "{error:?}");
    assert_mentions(&error, &["no documents"]);

    // Appending nothing keeps it empty; appending documents makes it usable, with the same answer as
    // encoding them directly.
    msa.add_documents(&mut memory, &[] as &[&str]).unwrap();
    assert!(memory.is_empty());
    let documents = &strings("memory.json")[..3];
    msa.add_documents(&mut memory, documents).unwrap();
    assert_eq!(memory.documents().len(), 3);
    let direct = msa.encode(documents).unwrap();
    assert_eq!(
        msa.ask(&memory, question, &greedy(4)).unwrap(),
        msa.ask(&direct, question, &greedy(4)).unwrap()
    );
}

#[test]
fn fewer_documents_than_k_selects_all_of_them() {
    let msa = Msa::load(fixture_dir(MSA)).unwrap();
    let k = msa.config().msa.as_ref().unwrap().doc_top_k;
    assert_eq!(k, 3);
    let documents = strings("memory.json");
    for question in strings("queries.json") {
        for n in [1, 2, 3] {
            let memory = msa.encode(&documents[..n]).unwrap();
            let answer = msa.ask(&memory, &question, &greedy(4)).unwrap();
            let layers: Vec<usize> = answer.routing.iter().map(|r| r.layer).collect();
            assert_eq!(layers, [2, 3], "one routing entry per router layer");
            for routing in &answer.routing {
                let mut ids: Vec<usize> = routing.documents.iter().map(|d| d.id).collect();
                assert_eq!(ids.len(), k.min(n), "n = {n}, layer {}", routing.layer);
                assert!(ids.iter().all(|&id| id < n), "{ids:?} with n = {n}");
                assert!(routing.documents.iter().all(|d| d.score.is_finite()));
                ids.sort_unstable();
                ids.dedup();
                assert_eq!(ids.len(), k.min(n), "distinct documents");
                let chunks: usize = ids
                    .iter()
                    .map(|&id| memory.documents()[id].chunks.len())
                    .sum();
                assert_eq!(routing.chunks, chunks);
            }
            assert!(
                !answer.tokens.is_empty(),
                "n = {n}: generation produces tokens"
            );
        }
    }
}

// ---------------------------------------------------------------------------------------------------------
// Plain Qwen3 models, token ids and sampling settings

#[test]
fn qwen3_cannot_encode_or_query_memories() {
    let qwen3 = Model::load(fixture_dir(QWEN3), CpuBackend::new()).unwrap();
    assert!(qwen3.config.msa.is_none());
    let error = expect_err(
        pollster::block_on(qwen3.encode_token_documents(&[1, 2, 3], &[vec![4, 5, 6]], |_| {})),
        "qwen3 encoding token documents",
    );
    assert!(matches!(error, Error::NotAnMsaModel(_)), "{error:?}");
    assert_mentions(&error, &["msa_config"]);

    // With a tokenizer, text encoding is refused for the same reason.
    let dir = copy_fixture(QWEN3);
    std::fs::copy(
        fixture_dir(MSA).join("tokenizer.json"),
        dir.path().join("tokenizer.json"),
    )
    .unwrap();
    let qwen3 = Msa::load(dir.path()).unwrap();
    let error = expect_err(
        qwen3.encode(&strings("memory.json")[..1]),
        "qwen3 encoding text",
    );
    assert!(matches!(error, Error::NotAnMsaModel(_)), "{error:?}");

    // A memory from an MSA model cannot be queried or extended by it either.
    let msa = Msa::load(fixture_dir(MSA)).unwrap();
    let mut memory = msa.encode(&strings("memory.json")[..2]).unwrap();
    let question = &strings("queries.json")[0];
    let error = expect_err(qwen3.ask(&memory, question, &greedy(2)), "qwen3 asking");
    assert!(matches!(error, Error::NotAnMsaModel(_)), "{error:?}");
    let error = expect_err(
        qwen3.add_documents(&mut memory, &strings("memory.json")[2..3]),
        "qwen3 appending",
    );
    assert!(matches!(error, Error::NotAnMsaModel(_)), "{error:?}");
    assert_eq!(memory.documents().len(), 2);
}

#[test]
fn out_of_vocabulary_ids_and_empty_prompts_are_refused() {
    let model = Model::load(fixture_dir(QWEN3), CpuBackend::new()).unwrap();
    let vocab = model.config.vocab_size;
    assert_eq!(vocab, 512);
    for (ids, bad) in [
        (vec![1, 512], 512),
        (vec![u32::MAX], u32::MAX),
        (vec![7, 9999, 3], 9999),
    ] {
        let error = expect_err(
            pollster::block_on(model.prefill_dense(&ids, None)),
            &format!("{ids:?}"),
        );
        assert!(
            matches!(error, Error::TokenOutOfRange { id, vocab: 512 } if id == bad),
            "{ids:?}: {error:?}"
        );
        assert_mentions(&error, &[&bad.to_string(), "512"]);
    }
    let error = expect_err(pollster::block_on(model.prefill_dense(&[], None)), "[]");
    assert!(matches!(error, Error::EmptyPrompt), "{error:?}");

    // Decoding an out-of-vocabulary token after a good prefill.
    let (mut session, _) = pollster::block_on(model.prefill_dense(&[1, 2, 3], None)).unwrap();
    let error = expect_err(pollster::block_on(session.decode(512)), "decode 512");
    assert!(
        matches!(
            error,
            Error::TokenOutOfRange {
                id: 512,
                vocab: 512
            }
        ),
        "{error:?}"
    );

    // MSA stage 1 and stage 2 with token ids.
    let msa = Msa::load(fixture_dir(MSA)).unwrap();
    let model = msa.model();
    let error = expect_err(
        pollster::block_on(model.encode_token_documents(&[1, 2, 3], &[vec![4, 600]], |_| {})),
        "a document token out of range",
    );
    assert!(
        matches!(error, Error::TokenOutOfRange { id: 600, .. }),
        "{error:?}"
    );
    let error = expect_err(
        pollster::block_on(model.encode_token_documents(&[1, 700], &[vec![4, 5]], |_| {})),
        "a template token out of range",
    );
    assert!(
        matches!(error, Error::TokenOutOfRange { id: 700, .. }),
        "{error:?}"
    );
    let error = expect_err(
        pollster::block_on(model.encode_token_documents(&[], &[vec![4, 5]], |_| {})),
        "an empty template",
    );
    assert!(matches!(error, Error::EmptyPrompt), "{error:?}");

    let memory = msa.encode(&strings("memory.json")[..2]).unwrap();
    let prompt = QueryPrompt {
        ids: vec![5, 800, 6],
        roles: vec![TokenRole::Routing; 3],
    };
    let error = expect_err(
        pollster::block_on(model.prefill_query(&memory, &prompt, None)),
        "a prompt token out of range",
    );
    assert!(
        matches!(error, Error::TokenOutOfRange { id: 800, .. }),
        "{error:?}"
    );
    let empty = QueryPrompt {
        ids: vec![],
        roles: vec![],
    };
    let error = expect_err(
        pollster::block_on(model.prefill_query(&memory, &empty, None)),
        "an empty prompt",
    );
    assert!(matches!(error, Error::EmptyPrompt), "{error:?}");
}

#[test]
fn invalid_sampling_settings_are_refused() {
    let msa = Msa::load(fixture_dir(MSA)).unwrap();
    let memory = msa.encode(&strings("memory.json")[..2]).unwrap();
    let question = &strings("queries.json")[0];
    for (temperature, top_p, field) in [
        (-1.0, 1.0, "temperature"),
        (f32::NAN, 1.0, "temperature"),
        (f32::INFINITY, 1.0, "temperature"),
        (0.7, 0.0, "top_p"),
        (0.7, -0.5, "top_p"),
        (0.7, 1.5, "top_p"),
        (0.7, f32::NAN, "top_p"),
        // Greedy decoding still validates top_p.
        (0.0, 0.0, "top_p"),
    ] {
        let options = GenerateOptions {
            sampling: SamplingParams {
                temperature,
                top_p,
                seed: 1,
            },
            ..greedy(4)
        };
        let error = expect_err(
            msa.ask(&memory, question, &options),
            &format!("temperature {temperature}, top_p {top_p}"),
        );
        assert!(
            matches!(error, Error::Core(CoreError::Sampling(_))),
            "temperature {temperature}, top_p {top_p}: {error:?}"
        );
        assert_mentions(&error, &["sampling", field]);
    }

    // Extreme but valid settings still sample sensibly: a temperature so small that 1/t overflows f32
    // is greedy decoding.
    let greedy_answer = msa.ask(&memory, question, &greedy(4)).unwrap();
    for temperature in [1e-40f32, f32::MIN_POSITIVE, 1e-30] {
        let options = GenerateOptions {
            sampling: SamplingParams {
                temperature,
                top_p: 1.0,
                seed: 3,
            },
            ..greedy(4)
        };
        let answer = msa.ask(&memory, question, &options).unwrap();
        assert_eq!(
            answer.tokens, greedy_answer.tokens,
            "temperature {temperature}"
        );
    }
}
