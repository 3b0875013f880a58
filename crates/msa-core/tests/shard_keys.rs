//! Shard key files: one shard's routing keys exported from a bank hold exactly the bank's rows and
//! document offsets for that range; a corrupt, truncated, foreign or misdescribed file is a clear error.

use msa_core::bank::synthetic::{SyntheticSpec, create};
use msa_core::bank::{Bank, BankTensor, OpenOptions, ShardKeysFile};
use msa_core::{MemoryFingerprint, ScoreMode};

fn fingerprint() -> MemoryFingerprint {
    MemoryFingerprint {
        num_hidden_layers: 4,
        hidden_size: 16,
        router_layers: vec![1, 3],
        num_key_value_heads: 2,
        head_dim: 4,
        pooling_kernel_size: 2,
        score_mode: ScoreMode::ScaledDot,
        weights_digest: 11,
    }
}

/// 13 documents of 5 tokens (3 chunks each) in segments of 4, so a shard spans segments.
fn bank(dir: &std::path::Path) -> Bank {
    let spec = SyntheticSpec {
        fingerprint: fingerprint(),
        memory_tokens: 65,
        document_tokens: 5,
        documents_per_segment: 4,
        seed: 3,
    };
    create(dir, &spec, |_| {}).unwrap()
}

fn refused(path: &std::path::Path, options: OpenOptions) -> String {
    match ShardKeysFile::open(path, options) {
        Ok(_) => panic!("{} opened", path.display()),
        Err(e) => e.to_string(),
    }
}

#[test]
fn an_exported_shard_holds_the_banks_rows_for_its_documents() {
    let dir = tempfile::tempdir().unwrap();
    let bank = bank(&dir.path().join("bank"));
    let path = dir.path().join("shard.keys");
    let mut layers = Vec::new();
    ShardKeysFile::export(&bank, 1, 3, 3..9, &path, |done| layers.push(done)).unwrap();
    assert_eq!(layers, [1, 2]);
    let file = ShardKeysFile::open(&path, OpenOptions::default()).unwrap();
    let header = file.header();
    assert_eq!(
        (header.rank, header.world, header.documents),
        (1, 3, [3, 9])
    );
    assert_eq!(header.bank_documents, 13);
    assert_eq!(header.bank_digest, bank.manifest().content_digest());
    assert_eq!(header.fingerprint, *bank.fingerprint());
    let table = bank.documents();
    let first_chunk = table[3].chunks[0];
    let offsets: Vec<u32> = std::iter::once(0)
        .chain(table[3..9].iter().map(|d| d.chunks[1] - first_chunk))
        .collect();
    assert_eq!(file.doc_chunk_offsets(), offsets);
    for slot in 0..2 {
        let mut rows = Vec::new();
        let chunks = first_chunk..table[8].chunks[1];
        bank.read_rows(slot, BankTensor::RoutingKeys, chunks, &mut rows);
        assert_eq!(file.routing_keys(slot), rows, "router layer {slot}");
    }
    // Never over an existing file, nor into the bank.
    for (existing, problem) in [
        (path.clone(), "already exists"),
        (dir.path().join("bank/shard.keys"), "lies inside the bank"),
    ] {
        let error = ShardKeysFile::export(&bank, 1, 3, 3..9, &existing, |_| {})
            .err()
            .unwrap()
            .to_string();
        assert!(error.contains(problem), "{error}");
    }
    assert!(!dir.path().join("bank/shard.keys").exists());
    // A shard that does not fit the bank is refused before anything is written.
    let other = dir.path().join("other.keys");
    for (rank, world, documents) in [(3, 3, 0..2), (0, 2, 5..5), (1, 2, 10..14)] {
        let error = ShardKeysFile::export(&bank, rank, world, documents, &other, |_| {})
            .err()
            .unwrap()
            .to_string();
        assert!(error.contains("does not fit a bank of 13"), "{error}");
        assert!(!other.exists());
    }
}

#[test]
fn corrupt_truncated_and_foreign_files_are_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let bank = bank(&dir.path().join("bank"));
    let path = dir.path().join("shard.keys");
    ShardKeysFile::export(&bank, 2, 3, 9..13, &path, |_| {}).unwrap();
    let good = std::fs::read(&path).unwrap();

    // One flipped bit in the last router layer's keys: the checksum says so, unless not verified.
    let mut flipped = good.clone();
    *flipped.last_mut().unwrap() ^= 1;
    std::fs::write(&path, &flipped).unwrap();
    let error = refused(&path, OpenOptions::default());
    assert!(
        error.contains("checksum mismatch in `slot.1.rk`") && error.contains("shard.keys"),
        "{error}"
    );
    let unverified = OpenOptions {
        verify_checksums: false,
    };
    assert!(ShardKeysFile::open(&path, unverified).is_ok());

    // Cut short.
    std::fs::write(&path, &good[..good.len() - 10]).unwrap();
    let error = refused(&path, unverified);
    assert!(
        error.contains("shard.keys: shard key file: not a valid safetensors file"),
        "{error}"
    );

    // A safetensors file that is not a shard key file: the bank's template.
    let template = dir.path().join("bank/template.safetensors");
    let error = refused(&template, OpenOptions::default());
    assert!(
        error.contains("not a file written by `msa shard --export`"),
        "{error}"
    );

    // Edits of the header (the same length, so the layout holds): its checksum says so; unverified,
    // a newer version and a fingerprint without router layers are refused for what they are.
    let edited = |from: &[u8], to: &[u8]| {
        assert_eq!(from.len(), to.len());
        let at = good
            .windows(from.len())
            .position(|w| w == from)
            .expect("the header holds the text");
        let mut bytes = good.clone();
        bytes[at..at + to.len()].copy_from_slice(to);
        std::fs::write(&path, &bytes).unwrap();
    };
    edited(br#"\"version\":1"#, br#"\"version\":7"#);
    let error = refused(&path, OpenOptions::default());
    assert!(error.contains("checksum mismatch in its header"), "{error}");
    let error = refused(&path, unverified);
    assert!(error.contains("version 7, this build reads"), "{error}");
    edited(br#"\"router_layers\":[1,3]"#, br#"\"router_layers\":[]   "#);
    let error = refused(&path, unverified);
    assert!(error.contains("describes no memory"), "{error}");

    // Not there at all.
    let error = refused(&dir.path().join("missing.keys"), OpenOptions::default());
    assert!(error.contains("missing.keys"), "{error}");
}
