//! The checkpoint formats the loader accepts give the same model: a sharded checkpoint (index + shards),
//! bf16 and f16 weights (widened exactly, so they must match an f32 checkpoint holding the same rounded
//! values bit for bit), and an explicit `lm_head.weight` equal to the embedding instead of tying.
//!
//! Every variant is built in a temporary directory from the fixtures, which are never modified.

mod common;

use std::path::Path;

use common::{Tensor, fixture_dir, fixture_tensors, write_tensors};
use msa::core::ModelConfig;
use msa::core::checkpoint::{Checkpoint, INDEX_FILE, SINGLE_FILE, expected_tensors};
use msa::engine::{CpuBackend, Model};
use safetensors::Dtype;

const MSA: &str = "msa-tiny";
const QWEN3: &str = "qwen3-tiny";

// ---------------------------------------------------------------------------------------------------------
// Checkpoint files

impl Tensor {
    fn f32_values(&self) -> Vec<f32> {
        assert_eq!(self.dtype, Dtype::F32, "{}", self.name);
        self.data
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
            .collect()
    }

    fn with_f32(&self, values: &[f32]) -> Tensor {
        Tensor {
            dtype: Dtype::F32,
            data: values.iter().flat_map(|v| v.to_le_bytes()).collect(),
            ..self.clone()
        }
    }

    fn with_halves(&self, dtype: Dtype, bits: &[u16]) -> Tensor {
        Tensor {
            dtype,
            data: bits.iter().flat_map(|v| v.to_le_bytes()).collect(),
            ..self.clone()
        }
    }
}

fn fixture_config(fixture: &str) -> serde_json::Value {
    let text = std::fs::read_to_string(fixture_dir(fixture).join("config.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

/// A model directory with the fixture's config (possibly edited) and tokenizer, and no weights yet.
fn model_dir(fixture: &str, config: &serde_json::Value) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("config.json"),
        serde_json::to_string_pretty(config).unwrap(),
    )
    .unwrap();
    let tokenizer = fixture_dir(fixture).join("tokenizer.json");
    if tokenizer.is_file() {
        std::fs::copy(tokenizer, dir.path().join("tokenizer.json")).unwrap();
    }
    dir
}

/// A single-file model directory holding `tensors`.
fn single_file_dir(fixture: &str, tensors: &[Tensor]) -> tempfile::TempDir {
    let dir = model_dir(fixture, &fixture_config(fixture));
    write_tensors(&dir.path().join(SINGLE_FILE), tensors);
    dir
}

// ---------------------------------------------------------------------------------------------------------
// Half-precision conversion by hand (the root package has no `half` dev-dependency)

/// f32 → bf16 bits with round-to-nearest-even: bf16 is the upper 16 bits of an f32, so add half an ulp of
/// the kept part (0x7fff, plus 1 when the kept part is odd, which breaks ties towards even) and truncate.
/// NaN keeps its sign and becomes a quiet NaN (no weight here is NaN).
fn f32_to_bf16_bits(x: f32) -> u16 {
    let bits = x.to_bits();
    if x.is_nan() {
        return ((bits >> 16) as u16) | 0x0040;
    }
    let lsb = (bits >> 16) & 1;
    (bits.wrapping_add(0x7fff + lsb) >> 16) as u16
}

/// bf16 bits → f32 (exact: the bits are the upper half of the f32).
fn bf16_bits_to_f32(h: u16) -> f32 {
    f32::from_bits(u32::from(h) << 16)
}

/// f32 → IEEE binary16 bits with round-to-nearest-even, including subnormal results, overflow to
/// infinity and NaN/infinity passthrough.
fn f32_to_f16_bits(x: f32) -> u16 {
    let bits = x.to_bits();
    let sign = ((bits >> 16) & 0x8000) as u16;
    let exp = ((bits >> 23) & 0xff) as i32;
    let man = bits & 0x007f_ffff;
    if exp == 0xff {
        let nan = if man != 0 { 0x0200 } else { 0 };
        return sign | 0x7c00 | nan;
    }
    // Rounds `value >> shift` to nearest, ties to even.
    let round = |value: u32, shift: u32| -> u32 {
        let kept = value >> shift;
        let rest = value & ((1 << shift) - 1);
        let halfway = 1 << (shift - 1);
        kept + u32::from(rest > halfway || (rest == halfway && kept & 1 == 1))
    };
    let e = exp - 127 + 15; // the f16 biased exponent
    if e >= 0x1f {
        return sign | 0x7c00; // too large: infinity
    }
    if e <= 0 {
        // A subnormal f16 (or zero): units of 2^-24. The f32 value is (man | 1<<23) * 2^(exp - 150).
        if e < -10 {
            return sign; // below half the smallest subnormal: rounds to zero
        }
        let full = man | 0x0080_0000;
        return sign | round(full, (14 - e) as u32) as u16;
    }
    // A normal f16; a mantissa carry correctly bumps the exponent (up to infinity).
    sign | round(((e as u32) << 23) | man, 13) as u16
}

/// IEEE binary16 bits → f32 (exact).
fn f16_bits_to_f32(h: u16) -> f32 {
    let sign = u32::from(h & 0x8000) << 16;
    let exp = u32::from((h >> 10) & 0x1f);
    let man = u32::from(h & 0x03ff);
    let magnitude = match exp {
        0 => (man as f32 * 2f32.powi(-24)).to_bits(), // subnormal (exact: man < 2^10)
        0x1f => 0x7f80_0000 | (man << 13),            // infinity / NaN
        _ => ((exp + 112) << 23) | (man << 13),
    };
    f32::from_bits(sign | magnitude)
}

#[test]
fn half_conversion_helpers_round_to_nearest_even() {
    // Known values.
    assert_eq!(f32_to_bf16_bits(1.0), 0x3f80);
    assert_eq!(f32_to_bf16_bits(-2.0), 0xc000);
    assert_eq!(f32_to_f16_bits(1.0), 0x3c00);
    assert_eq!(f32_to_f16_bits(-2.0), 0xc000);
    assert_eq!(f32_to_f16_bits(65504.0), 0x7bff);
    assert_eq!(f32_to_f16_bits(65520.0), 0x7c00, "rounds up to infinity");
    assert_eq!(
        f32_to_f16_bits(2f32.powi(-24)),
        0x0001,
        "smallest subnormal"
    );
    assert_eq!(
        f32_to_f16_bits(2f32.powi(-25)),
        0x0000,
        "tie rounds to even zero"
    );
    assert_eq!(f32_to_f16_bits(1.5 * 2f32.powi(-24)), 0x0002, "tie to even");
    assert_eq!(f32_to_f16_bits(2f32.powi(-14)), 0x0400, "smallest normal");
    // bf16: 1 + 2^-8 is halfway between 1 and 1 + 2^-7 → even (1); 1 + 3*2^-8 → up.
    assert_eq!(f32_to_bf16_bits(1.0 + 2f32.powi(-8)), 0x3f80);
    assert_eq!(f32_to_bf16_bits(1.0 + 3.0 * 2f32.powi(-8)), 0x3f82);
    // f16: 1 + 2^-11 is halfway between 1 and 1 + 2^-10 → even (1); 1 + 3*2^-11 → up.
    assert_eq!(f32_to_f16_bits(1.0 + 2f32.powi(-11)), 0x3c00);
    assert_eq!(f32_to_f16_bits(1.0 + 3.0 * 2f32.powi(-11)), 0x3c02);

    // Every finite result is the nearest representable value (ties even), over a sweep of magnitudes,
    // and widening agrees with the engine's own widening.
    let mut x = 1.0e-9f32;
    while x < 7.0e4 {
        for v in [x, -x, x * 1.000_123, -x * 0.999_87] {
            for (name, bits, widen, engine) in [
                (
                    "f16",
                    f32_to_f16_bits(v),
                    f16_bits_to_f32 as fn(u16) -> f32,
                    msa::core::DType::F16,
                ),
                (
                    "bf16",
                    f32_to_bf16_bits(v),
                    bf16_bits_to_f32,
                    msa::core::DType::BF16,
                ),
            ] {
                let w = widen(bits);
                assert_eq!(
                    engine.to_f32_vec(&bits.to_le_bytes()),
                    vec![w],
                    "{name} {v}"
                );
                if w.is_infinite() {
                    continue;
                }
                let d = (f64::from(v) - f64::from(w)).abs();
                for neighbour in [bits.wrapping_add(1), bits.wrapping_sub(1)] {
                    let n = widen(neighbour);
                    if n.is_nan() {
                        continue;
                    }
                    let dn = (f64::from(v) - f64::from(n)).abs();
                    assert!(
                        d < dn || (d == dn && bits & 1 == 0),
                        "{name}: {v} → {w} but {n} is nearer"
                    );
                }
            }
        }
        x *= 1.37;
    }
}

// ---------------------------------------------------------------------------------------------------------
// Running a model

/// One router layer's decision: `(layer, [(document id, score bits)])`.
type LayerDecision = (usize, Vec<(usize, u32)>);

/// Bits of the f32 logits and routing decisions of a run, compared exactly.
#[derive(Debug, PartialEq)]
struct Outcome {
    /// Last-position prefill logits of every query, as bits.
    logits: Vec<Vec<u32>>,
    /// Per query, the decision of every router layer.
    routing: Vec<Vec<LayerDecision>>,
}

fn bits(values: &[f32]) -> Vec<u32> {
    values.iter().map(|v| v.to_bits()).collect()
}

fn strings(fixture: &str, file: &str) -> Vec<String> {
    let text = std::fs::read_to_string(fixture_dir(fixture).join(file)).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn load(dir: &Path) -> Model<CpuBackend> {
    Model::load(dir, CpuBackend::new()).unwrap_or_else(|e| panic!("{} loads: {e}", dir.display()))
}

/// Encodes msa-tiny's memory and prefills both fixture questions.
fn run_msa(dir: &Path) -> Outcome {
    let model = load(dir);
    let memory = pollster::block_on(model.encode_documents(&strings(MSA, "memory.json"), |_| {}))
        .expect("memory encodes");
    let tokenizer = model.tokenizer.as_ref().expect("msa-tiny has a tokenizer");
    let mut outcome = Outcome {
        logits: Vec::new(),
        routing: Vec::new(),
    };
    for question in strings(MSA, "queries.json") {
        let prompt = tokenizer.question_prompt(&question).unwrap();
        let (session, logits) =
            pollster::block_on(model.prefill_query(&memory, &prompt, None)).unwrap();
        assert_eq!(logits.len(), model.config.vocab_size);
        assert!(logits.iter().all(|l| l.is_finite()));
        outcome.logits.push(bits(&logits));
        outcome.routing.push(
            session
                .routing()
                .iter()
                .map(|r| {
                    let docs = r.documents.iter().map(|d| (d.id, d.score.to_bits()));
                    (r.layer, docs.collect())
                })
                .collect(),
        );
    }
    assert_eq!(outcome.routing[0].len(), 2, "router layers 2 and 3");
    outcome
}

/// Dense prefill of a fixed prompt on qwen3-tiny (no tokenizer: token ids).
fn run_dense(dir: &Path) -> Vec<u32> {
    let model = load(dir);
    let ids: Vec<u32> = (0..24).map(|i| (i * 37 + 5) % 509).collect();
    let (_, logits) = pollster::block_on(model.prefill_dense(&ids, None)).unwrap();
    assert_eq!(logits.len(), model.config.vocab_size);
    bits(&logits)
}

/// Asserts bitwise equality, naming the first differing logit.
fn assert_same(actual: &Outcome, expected: &Outcome, what: &str) {
    for (q, (a, e)) in actual.logits.iter().zip(&expected.logits).enumerate() {
        if let Some(i) = a.iter().zip(e).position(|(x, y)| x != y) {
            panic!(
                "{what}: query {q} logit {i} is {} instead of {}",
                f32::from_bits(a[i]),
                f32::from_bits(e[i])
            );
        }
    }
    assert_eq!(actual, expected, "{what}: routing or logit counts differ");
}

// ---------------------------------------------------------------------------------------------------------
// 1. Sharded checkpoints

/// Writes `tensors` as `shards` files (round robin by sorted name, so every shard holds parts of several
/// layers) plus `model.safetensors.index.json`.
fn write_sharded(dir: &Path, tensors: &[Tensor], shards: usize) -> Vec<String> {
    let names: Vec<String> = (1..=shards)
        .map(|i| format!("model-{i:05}-of-{shards:05}.safetensors"))
        .collect();
    let mut weight_map = serde_json::Map::new();
    for (s, name) in names.iter().enumerate() {
        let part: Vec<Tensor> = tensors
            .iter()
            .enumerate()
            .filter(|(i, _)| i % shards == s)
            .map(|(_, t)| t.clone())
            .collect();
        assert!(!part.is_empty());
        for t in &part {
            weight_map.insert(t.name.clone(), name.clone().into());
        }
        write_tensors(&dir.join(name), &part);
    }
    let total: usize = tensors.iter().map(|t| t.data.len()).sum();
    let index = serde_json::json!({"metadata": {"total_size": total}, "weight_map": weight_map});
    std::fs::write(dir.join(INDEX_FILE), index.to_string()).unwrap();
    names
}

#[test]
fn sharded_checkpoint_gives_bitwise_identical_logits() {
    let tensors = fixture_tensors(MSA);
    let single = run_msa(&fixture_dir(MSA));
    for shards in [2, 3] {
        let dir = model_dir(MSA, &fixture_config(MSA));
        let files = write_sharded(dir.path(), &tensors, shards);
        assert!(!dir.path().join(SINGLE_FILE).exists());

        let checkpoint = Checkpoint::open(dir.path()).expect("sharded checkpoint opens");
        let mut names: Vec<&str> = checkpoint.tensor_names().collect();
        names.sort_unstable();
        let expected: Vec<&str> = tensors.iter().map(|t| t.name.as_str()).collect();
        assert_eq!(names, expected, "{shards} shards hold every tensor once");
        // Tensors really come from different files, byte for byte.
        for t in &tensors {
            let view = checkpoint.tensor(&t.name).unwrap();
            assert_eq!(view.bytes, t.data.as_slice(), "{}", t.name);
            assert_eq!(view.shape, t.shape.as_slice(), "{}", t.name);
        }
        assert_eq!(files.len(), shards);

        assert_same(
            &run_msa(dir.path()),
            &single,
            &format!("{shards}-shard checkpoint"),
        );
    }
}

// ---------------------------------------------------------------------------------------------------------
// 2. bf16 and f16 checkpoints

/// The fixture's weights rounded to `dtype`: the half checkpoint, and an f32 checkpoint holding exactly
/// the widened rounded values. Also returns how many values rounding changed.
fn rounded_pair(fixture: &str, dtype: Dtype) -> (Vec<Tensor>, Vec<Tensor>, usize) {
    type Narrow = fn(f32) -> u16;
    type Widen = fn(u16) -> f32;
    let (narrow, widen): (Narrow, Widen) = match dtype {
        Dtype::BF16 => (f32_to_bf16_bits, bf16_bits_to_f32),
        Dtype::F16 => (f32_to_f16_bits, f16_bits_to_f32),
        other => panic!("not a half type: {other:?}"),
    };
    let mut changed = 0;
    let (mut halves, mut widened) = (Vec::new(), Vec::new());
    for t in fixture_tensors(fixture) {
        let values = t.f32_values();
        let h: Vec<u16> = values.iter().map(|&v| narrow(v)).collect();
        let w: Vec<f32> = h.iter().map(|&b| widen(b)).collect();
        assert!(
            w.iter().all(|v| v.is_finite()),
            "{}: weights fit {dtype:?}",
            t.name
        );
        changed += values.iter().zip(&w).filter(|(a, b)| a != b).count();
        halves.push(t.with_halves(dtype, &h));
        widened.push(t.with_f32(&w));
    }
    (halves, widened, changed)
}

fn check_half_checkpoint_matches_widened_f32(dtype: Dtype, engine_dtype: msa::core::DType) {
    let (halves, widened, changed) = rounded_pair(MSA, dtype);
    assert!(
        changed > 1000,
        "{dtype:?} rounding changed only {changed} values"
    );
    let half_dir = single_file_dir(MSA, &halves);
    let f32_dir = single_file_dir(MSA, &widened);

    let checkpoint = Checkpoint::open(half_dir.path()).unwrap();
    for t in &halves {
        assert_eq!(checkpoint.tensor(&t.name).unwrap().dtype, engine_dtype);
    }
    let half = run_msa(half_dir.path());
    assert_same(
        &half,
        &run_msa(f32_dir.path()),
        &format!("{dtype:?} checkpoint vs f32 checkpoint of the same values"),
    );
    // Not vacuous: the rounded model is a different model from the original.
    assert_ne!(half.logits, run_msa(&fixture_dir(MSA)).logits);

    // The untied dense model too.
    let (halves, widened, _) = rounded_pair(QWEN3, dtype);
    let half_dir = single_file_dir(QWEN3, &halves);
    let f32_dir = single_file_dir(QWEN3, &widened);
    assert_eq!(
        run_dense(half_dir.path()),
        run_dense(f32_dir.path()),
        "qwen3-tiny {dtype:?} vs f32 of the same values"
    );
}

#[test]
fn bf16_checkpoint_matches_f32_checkpoint_of_the_same_values() {
    check_half_checkpoint_matches_widened_f32(Dtype::BF16, msa::core::DType::BF16);
}

#[test]
fn f16_checkpoint_matches_f32_checkpoint_of_the_same_values() {
    check_half_checkpoint_matches_widened_f32(Dtype::F16, msa::core::DType::F16);
}

#[test]
fn mixed_dtype_checkpoint_matches_too() {
    // Real checkpoints mix dtypes (f32 norms, bf16 projections): alternate bf16, f16 and f32 per tensor.
    let mut mixed = Vec::new();
    let mut widened = Vec::new();
    for (i, t) in fixture_tensors(MSA).into_iter().enumerate() {
        let values = t.f32_values();
        match i % 3 {
            0 => {
                let h: Vec<u16> = values.iter().map(|&v| f32_to_bf16_bits(v)).collect();
                let w: Vec<f32> = h.iter().map(|&b| bf16_bits_to_f32(b)).collect();
                mixed.push(t.with_halves(Dtype::BF16, &h));
                widened.push(t.with_f32(&w));
            }
            1 => {
                let h: Vec<u16> = values.iter().map(|&v| f32_to_f16_bits(v)).collect();
                let w: Vec<f32> = h.iter().map(|&b| f16_bits_to_f32(b)).collect();
                mixed.push(t.with_halves(Dtype::F16, &h));
                widened.push(t.with_f32(&w));
            }
            _ => {
                mixed.push(t.clone());
                widened.push(t);
            }
        }
    }
    let mixed_dir = single_file_dir(MSA, &mixed);
    let f32_dir = single_file_dir(MSA, &widened);
    assert_same(
        &run_msa(mixed_dir.path()),
        &run_msa(f32_dir.path()),
        "mixed bf16/f16/f32 checkpoint",
    );
}

// ---------------------------------------------------------------------------------------------------------
// 3. Tied and untied output projections

#[test]
fn explicit_lm_head_equal_to_the_embedding_matches_tying() {
    let mut tensors = fixture_tensors(MSA);
    assert!(
        tensors.iter().all(|t| t.name != "lm_head.weight"),
        "msa-tiny ties its embeddings"
    );
    let embedding = tensors
        .iter()
        .find(|t| t.name == "model.embed_tokens.weight")
        .unwrap()
        .clone();
    tensors.push(Tensor {
        name: "lm_head.weight".into(),
        ..embedding
    });
    let mut config = fixture_config(MSA);
    assert_eq!(config["tie_word_embeddings"], true);
    config["tie_word_embeddings"] = false.into();
    let dir = model_dir(MSA, &config);
    write_tensors(&dir.path().join(SINGLE_FILE), &tensors);

    let parsed = ModelConfig::from_file(dir.path().join("config.json")).unwrap();
    let checkpoint = Checkpoint::open(dir.path()).unwrap();
    assert_eq!(checkpoint.lm_head_name(&parsed), "lm_head.weight");
    assert!(load(dir.path()).weights.lm_head.is_some(), "untied head");
    assert!(
        load(&fixture_dir(MSA)).weights.lm_head.is_none(),
        "tied head"
    );

    assert_same(
        &run_msa(dir.path()),
        &run_msa(&fixture_dir(MSA)),
        "untied lm_head equal to the embedding",
    );
}

#[test]
fn qwen3_untied_lm_head_is_used() -> Result<(), msa::core::Error> {
    let dir = fixture_dir(QWEN3);
    let mut config = ModelConfig::from_file(dir.join("config.json"))?;
    assert!(!config.tie_word_embeddings);
    let checkpoint = Checkpoint::open(&dir)?;
    assert_eq!(checkpoint.lm_head_name(&config), "lm_head.weight");
    // When the config ties, the embedding is the head even if an lm_head tensor exists.
    config.tie_word_embeddings = true;
    assert_eq!(
        checkpoint.lm_head_name(&config),
        "model.embed_tokens.weight"
    );

    let model = load(&dir);
    assert!(model.weights.lm_head.is_some());
    assert!(model.tokenizer.is_none(), "qwen3-tiny ships no tokenizer");

    // The head matters: replacing lm_head with the embedding changes the logits.
    let mut tensors = fixture_tensors(QWEN3);
    let embedding = tensors
        .iter()
        .find(|t| t.name == "model.embed_tokens.weight")
        .unwrap()
        .clone();
    let head = tensors
        .iter_mut()
        .find(|t| t.name == "lm_head.weight")
        .unwrap();
    assert_ne!(head.data, embedding.data);
    head.data = embedding.data.clone();
    let swapped = single_file_dir(QWEN3, &tensors);
    assert_ne!(run_dense(swapped.path()), run_dense(&dir));
    Ok(())
}

// ---------------------------------------------------------------------------------------------------------
// 4. Validation of the fixtures

#[test]
fn fixtures_validate() -> Result<(), msa::core::Error> {
    for fixture in [MSA, QWEN3] {
        let dir = fixture_dir(fixture);
        let config = ModelConfig::from_file(dir.join("config.json"))?;
        let checkpoint = Checkpoint::open(&dir)?;
        checkpoint.validate(&config)?;

        // Every expected tensor is there with its shape; the only extras are the head and msa-tiny's
        // training-only `temperature` scalar.
        let expected = expected_tensors(&config);
        for (name, shape) in &expected {
            assert_eq!(
                checkpoint.tensor(name)?.shape,
                shape.as_slice(),
                "{fixture}: {name}"
            );
        }
        let mut extras: Vec<&str> = checkpoint
            .tensor_names()
            .filter(|n| expected.iter().all(|(e, _)| e != n))
            .collect();
        extras.sort_unstable();
        let want: &[&str] = if fixture == MSA {
            &["temperature"]
        } else {
            &["lm_head.weight"]
        };
        assert_eq!(extras, want, "{fixture}");
    }
    Ok(())
}

#[test]
fn converted_checkpoints_validate() -> Result<(), msa::core::Error> {
    let config = ModelConfig::from_file(fixture_dir(MSA).join("config.json"))?;
    for dtype in [Dtype::BF16, Dtype::F16] {
        let (halves, _, _) = rounded_pair(MSA, dtype);
        let dir = single_file_dir(MSA, &halves);
        Checkpoint::open(dir.path())?.validate(&config)?;
    }
    let dir = model_dir(MSA, &fixture_config(MSA));
    write_sharded(dir.path(), &fixture_tensors(MSA), 3);
    Checkpoint::open(dir.path())?.validate(&config)?;
    Ok(())
}
