//! The memory bank on disk: lifecycle, crash safety, a full disk, and every kind of damaged bank.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};

use msa_core::bank::{
    Bank, BankTensor, LayerRows, MemoryFingerprint, NewDocument, OpenOptions, digest,
};
use msa_core::{Error, ScoreMode};

fn fingerprint() -> MemoryFingerprint {
    MemoryFingerprint {
        num_hidden_layers: 3,
        hidden_size: 16,
        router_layers: vec![1, 2],
        num_key_value_heads: 2,
        head_dim: 4,
        pooling_kernel_size: 4,
        score_mode: ScoreMode::Cosine,
        weights_digest: 0xfeed,
    }
}

const ROW: usize = 2 * 4 * 2;

fn create(dir: &Path) -> Bank {
    let template: Vec<_> = (0..3)
        .map(|l| {
            let k: Vec<f32> = (0..2 * 8).map(|i| (l * 100 + i) as f32).collect();
            (k.clone(), k.iter().map(|x| -x).collect())
        })
        .collect();
    Bank::create(dir, fingerprint(), 2, &template).unwrap()
}

/// The distinct byte pattern of (slot, tensor, global chunk, byte in row).
fn pattern(slot: usize, tensor: usize, chunk: u32) -> Vec<u8> {
    (0..ROW)
        .map(|i| (slot * 61 + tensor * 17 + chunk as usize * 7 + i) as u8)
        .collect()
}

fn documents(sources: &[(&str, usize)]) -> Vec<NewDocument> {
    sources
        .iter()
        .map(|&(source, tokens)| NewDocument {
            source: source.into(),
            tokens,
            text: Some(format!("text of {source}")),
            text_digest: digest(source.as_bytes()),
        })
        .collect()
}

/// Appends documents whose rows follow [`pattern`], starting at the bank's current chunk count.
fn append(bank: &mut Bank, sources: &[(&str, usize)]) -> msa_core::Result<()> {
    let first = bank.chunk_count();
    let chunks: u32 = sources.iter().map(|&(_, t)| t.div_ceil(4) as u32).sum();
    let rows = |slot: usize, tensor: usize| -> Vec<u8> {
        (first..first + chunks)
            .flat_map(|c| pattern(slot, tensor, c))
            .collect()
    };
    bank.append(
        documents(sources),
        |slot| {
            Ok(LayerRows {
                routing_keys: rows(slot, 0),
                k: rows(slot, 1),
                v: rows(slot, 2),
            })
        },
        |_| {},
    )
}

fn check_rows(bank: &Bank) {
    let chunks = bank.chunk_count();
    for slot in 0..2 {
        for (t, tensor) in [BankTensor::RoutingKeys, BankTensor::K, BankTensor::V]
            .into_iter()
            .enumerate()
        {
            let mut all = Vec::new();
            bank.read_rows(slot, tensor, 0..chunks, &mut all);
            let expected: Vec<u8> = (0..chunks).flat_map(|c| pattern(slot, t, c)).collect();
            assert_eq!(all, expected, "slot {slot} tensor {tensor:?}");
        }
    }
}

#[test]
fn create_append_reopen_and_read() {
    let dir = tempfile::tempdir().unwrap();
    let mut bank = create(dir.path());
    assert!(bank.is_empty());
    append(&mut bank, &[("a", 5), ("b", 4)]).unwrap();
    append(&mut bank, &[("c", 9)]).unwrap();
    assert_eq!(bank.chunk_count(), 2 + 1 + 3);
    assert_eq!(bank.token_count(), 18);
    let reopened = Bank::open(dir.path(), OpenOptions::default()).unwrap();
    assert_eq!(reopened.manifest(), bank.manifest());
    let docs = reopened.documents();
    assert_eq!(
        docs.iter().map(|d| (d.id, d.chunks)).collect::<Vec<_>>(),
        [(0, [0, 2]), (1, [2, 3]), (2, [3, 6])]
    );
    assert_eq!(docs[2].source, "c");
    check_rows(&reopened);
    // A range across the segment boundary.
    let mut rows = Vec::new();
    reopened.read_rows(1, BankTensor::V, 2..4, &mut rows);
    assert_eq!(rows, [pattern(1, 2, 2), pattern(1, 2, 3)].concat());
    assert_eq!(
        reopened.document_text(1).unwrap().as_deref(),
        Some("text of b")
    );
    assert_eq!(
        reopened.document_text(2).unwrap().as_deref(),
        Some("text of c")
    );
    // Several at once, across segments, in the order asked; unknown ids have none.
    assert_eq!(
        reopened.document_texts(&[2, 9, 0, 2]).unwrap(),
        [
            Some("text of c"),
            None,
            Some("text of a"),
            Some("text of c")
        ]
        .map(|t| t.map(String::from))
    );
    let (k, v) = reopened.template(2);
    let k: Vec<f32> = bytemuck::pod_collect_to_vec(k);
    let v: Vec<f32> = bytemuck::pod_collect_to_vec(v);
    assert_eq!(k[3], 203.0);
    assert_eq!(v[3], -203.0);
    reopened.verify().unwrap();
}

#[test]
fn the_content_digest_tells_copies_from_other_banks() {
    let (one, two, copy) = (
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
    );
    let mut first = create(one.path());
    let mut second = create(two.path());
    let empty = first.manifest().content_digest();
    assert_eq!(second.manifest().content_digest(), empty);
    append(&mut first, &[("a", 5), ("b", 4)]).unwrap();
    append(&mut second, &[("a", 5), ("b", 8)]).unwrap();
    let digest = first.manifest().content_digest();
    assert_ne!(digest, empty);
    assert_ne!(second.manifest().content_digest(), digest);
    // A copy of the directory elsewhere has the same digest; an append changes it.
    for entry in std::fs::read_dir(one.path()).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), copy.path().join(entry.file_name())).unwrap();
    }
    let mut copied = Bank::open(copy.path(), OpenOptions::default()).unwrap();
    assert_eq!(copied.manifest().content_digest(), digest);
    append(&mut copied, &[("c", 1)]).unwrap();
    assert_ne!(copied.manifest().content_digest(), digest);
}

#[test]
fn creating_over_an_existing_bank_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let mut bank = create(dir.path());
    append(&mut bank, &[("a", 5)]).unwrap();
    let template = vec![(vec![0.0; 16], vec![0.0; 16]); 3];
    let err = Bank::create(dir.path(), fingerprint(), 2, &template).unwrap_err();
    assert!(
        err.to_string().contains("already holds a memory bank"),
        "{err}"
    );
    assert_eq!(
        Bank::open(dir.path(), OpenOptions::default())
            .unwrap()
            .documents()
            .len(),
        1
    );
}

#[test]
fn a_bad_append_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let mut bank = create(dir.path());
    append(&mut bank, &[("a", 5)]).unwrap();
    let files_before = std::fs::read_dir(dir.path()).unwrap().count();
    // Rows of the wrong length for the second router layer: the first layer's file was already written.
    let err = bank
        .append(
            documents(&[("b", 4)]),
            |slot| {
                let n = if slot == 0 { ROW } else { ROW - 2 };
                Ok(LayerRows {
                    routing_keys: vec![0; n],
                    k: vec![0; n],
                    v: vec![0; n],
                })
            },
            |_| {},
        )
        .unwrap_err();
    assert!(err.to_string().contains("bank is unchanged"), "{err}");
    assert_eq!(bank.documents().len(), 1);
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), files_before);
    let reopened = Bank::open(dir.path(), OpenOptions::default()).unwrap();
    assert_eq!(reopened.documents().len(), 1);
    check_rows(&reopened);
    // An empty document; a source the bank holds, or one repeated within the append.
    let err = append(&mut bank, &[("empty", 0)]).unwrap_err();
    assert!(err.to_string().contains("is empty"), "{err}");
    for sources in [&[("a", 4)][..], &[("new", 4), ("new", 3)]] {
        let err = append(&mut bank, sources).unwrap_err();
        assert!(err.to_string().contains("already in the bank"), "{err}");
    }
    assert_eq!(bank.documents().len(), 1);
}

fn open_err(dir: &Path) -> String {
    Bank::open(dir, OpenOptions::default())
        .unwrap_err()
        .to_string()
}

/// A bank with two segments, and the name of its second segment's first layer file.
fn two_segment_bank() -> (tempfile::TempDir, String) {
    let dir = tempfile::tempdir().unwrap();
    let mut bank = create(dir.path());
    append(&mut bank, &[("a", 5)]).unwrap();
    append(&mut bank, &[("b", 7)]).unwrap();
    let file = bank.manifest().segments[1].layers[0].file.clone();
    (dir, file)
}

#[test]
fn a_truncated_file_is_named() {
    let (dir, file) = two_segment_bank();
    let path = dir.path().join(&file);
    let len = std::fs::metadata(&path).unwrap().len();
    std::fs::File::options()
        .write(true)
        .open(&path)
        .unwrap()
        .set_len(len - 3)
        .unwrap();
    let err = open_err(dir.path());
    assert!(err.contains(&file) && err.contains("truncated"), "{err}");
}

#[test]
fn a_flipped_bit_is_caught_by_the_checksum() {
    let (dir, file) = two_segment_bank();
    let path = dir.path().join(&file);
    let mut bytes = std::fs::read(&path).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0x10;
    std::fs::write(&path, bytes).unwrap();
    let err = open_err(dir.path());
    assert!(
        err.contains(&file) && err.contains("checksum mismatch"),
        "{err}"
    );
    // Without checksums the bank opens; an explicit verify still finds it.
    let bank = Bank::open(
        dir.path(),
        OpenOptions {
            verify_checksums: false,
        },
    )
    .unwrap();
    let err = bank.verify().unwrap_err().to_string();
    assert!(err.contains("checksum mismatch"), "{err}");
}

#[test]
fn a_missing_layer_file_is_named() {
    let (dir, file) = two_segment_bank();
    std::fs::remove_file(dir.path().join(&file)).unwrap();
    let err = open_err(dir.path());
    assert!(err.contains(&file) && err.contains("missing"), "{err}");
}

#[test]
fn a_manifest_from_the_future_is_refused() {
    let (dir, _) = two_segment_bank();
    let path = dir.path().join("bank.json");
    let mut manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    manifest["version"] = 7.into();
    manifest["some_new_field"] = "x".into();
    std::fs::write(&path, serde_json::to_vec(&manifest).unwrap()).unwrap();
    let err = open_err(dir.path());
    assert!(
        err.contains("version 7") && err.contains("newer msa"),
        "{err}"
    );
}

#[test]
fn not_a_bank_and_an_inconsistent_manifest() {
    let dir = tempfile::tempdir().unwrap();
    assert!(open_err(dir.path()).contains("not a memory bank"));
    let (dir, _) = two_segment_bank();
    let path = dir.path().join("bank.json");
    let mut manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    manifest["documents"][1]["tokens"] = 70.into();
    std::fs::write(&path, serde_json::to_vec(&manifest).unwrap()).unwrap();
    let err = open_err(dir.path());
    assert!(err.contains("document 1 (70 tokens)"), "{err}");
    std::fs::write(&path, b"{\"format\": \"msa-memory-bank\", \"version\": 1").unwrap();
    assert!(matches!(
        Bank::open(dir.path(), OpenOptions::default()),
        Err(Error::Json { .. })
    ));
}

/// Appends one document whose every row byte is `fill`.
fn append_filled(bank: &mut Bank, source: &str, tokens: usize, fill: u8) -> msa_core::Result<()> {
    append_filled_reporting(bank, source, tokens, fill, |_| {})
}

/// [`append_filled`], hearing of every file written.
fn append_filled_reporting(
    bank: &mut Bank,
    source: &str,
    tokens: usize,
    fill: u8,
    progress: impl FnMut(msa_core::bank::WriteProgress),
) -> msa_core::Result<()> {
    let n = tokens.div_ceil(4) * ROW;
    bank.append(
        documents(&[(source, tokens)]),
        |_| {
            Ok(LayerRows {
                routing_keys: vec![fill; n],
                k: vec![fill; n],
                v: vec![fill; n],
            })
        },
        progress,
    )
}

#[test]
fn two_handles_append_in_turn_and_lose_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let mut a = create(dir.path());
    let mut b = Bank::open(dir.path(), OpenOptions::default()).unwrap();
    append_filled(&mut a, "from a", 5, 1).unwrap();
    // `b` opened before `a` appended: its append goes after a's, not over it.
    append_filled(&mut b, "from b", 9, 2).unwrap();
    append_filled(&mut a, "a again", 3, 3).unwrap();
    let check = |expected: &[(&str, u8)]| {
        let bank = Bank::open(dir.path(), OpenOptions::default()).unwrap();
        assert_eq!(bank.documents().len(), expected.len());
        for (doc, &(source, fill)) in bank.documents().iter().zip(expected) {
            assert_eq!(doc.source, source);
            let mut rows = Vec::new();
            bank.read_rows(1, BankTensor::V, doc.chunk_range(), &mut rows);
            assert!(rows.iter().all(|&x| x == fill), "{source}");
        }
    };
    check(&[("from a", 1), ("from b", 2), ("a again", 3)]);
    // While one writer holds the lock, another append is refused and changes nothing.
    let lock = std::fs::File::options()
        .write(true)
        .open(dir.path().join("bank.lock"))
        .unwrap();
    lock.lock().unwrap();
    let err = append_filled(&mut b, "blocked", 4, 4).unwrap_err();
    assert!(err.to_string().contains("another writer"), "{err}");
    check(&[("from a", 1), ("from b", 2), ("a again", 3)]);
    drop(lock);
    append_filled(&mut b, "after", 4, 5).unwrap();
    check(&[("from a", 1), ("from b", 2), ("a again", 3), ("after", 5)]);
}

#[test]
fn a_failed_manifest_swap_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let mut bank = create(dir.path());
    append(&mut bank, &[("a", 5)]).unwrap();
    let files_before = std::fs::read_dir(dir.path()).unwrap().count();
    // The temporary manifest cannot be written: a directory has its name.
    std::fs::create_dir(dir.path().join("bank.json.tmp")).unwrap();
    let err = append(&mut bank, &[("b", 4)]).unwrap_err();
    assert!(err.to_string().contains("bank is unchanged"), "{err}");
    std::fs::remove_dir(dir.path().join("bank.json.tmp")).unwrap();
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), files_before);
    let reopened = Bank::open(dir.path(), OpenOptions::default()).unwrap();
    assert_eq!(reopened.documents().len(), 1);
    // The same handle appends fine afterwards.
    append(&mut bank, &[("b", 4)]).unwrap();
    check_rows(&Bank::open(dir.path(), OpenOptions::default()).unwrap());
}

#[test]
fn a_corrupt_template_or_text_file_is_caught() {
    let (dir, _) = two_segment_bank();
    let flip = |name: &str| {
        let path = dir.path().join(name);
        let mut bytes = std::fs::read(&path).unwrap();
        let at = bytes.len() / 2;
        bytes[at] ^= 1;
        std::fs::write(&path, bytes).unwrap();
    };
    flip("seg000002-texts.json");
    let err = open_err(dir.path());
    assert!(
        err.contains("seg000002-texts.json") && err.contains("checksum"),
        "{err}"
    );
    let bank = Bank::open(
        dir.path(),
        OpenOptions {
            verify_checksums: false,
        },
    )
    .unwrap();
    let err = bank.document_text(1).unwrap_err().to_string();
    assert!(err.contains("checksum"), "{err}");
    flip("seg000002-texts.json");
    flip("template.safetensors");
    let err = open_err(dir.path());
    assert!(
        err.contains("template.safetensors") && err.contains("checksum"),
        "{err}"
    );
}

#[test]
fn manifests_that_would_overflow_or_reuse_segments_are_refused() {
    let edit = |change: &dyn Fn(&mut serde_json::Value)| {
        let (dir, _) = two_segment_bank();
        let path = dir.path().join("bank.json");
        let mut manifest: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        change(&mut manifest);
        std::fs::write(&path, serde_json::to_vec(&manifest).unwrap()).unwrap();
        open_err(dir.path())
    };
    // A token count whose chunk count does not fit the format: no panic, no wrap-around.
    let err = edit(&|m| m["documents"][1]["tokens"] = (4u64 << 32).into());
    assert!(err.contains("document 1"), "{err}");
    let err = edit(&|m| m["documents"][1]["source"] = "a".into());
    assert!(err.contains("repeats the source `a`"), "{err}");
    let err = edit(&|m| m["segments"][1]["index"] = 1.into());
    assert!(err.contains("segment numbers must increase"), "{err}");
    // A fingerprint that could never be opened is refused before anything is written.
    let dir = tempfile::tempdir().unwrap();
    let mut bad = fingerprint();
    bad.router_layers = vec![2, 1];
    let template = vec![(vec![0.0; 16], vec![0.0; 16]); 3];
    let err = Bank::create(dir.path(), bad, 2, &template)
        .unwrap_err()
        .to_string();
    assert!(err.contains("router layers"), "{err}");
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
}

/// Set in a child process of this test binary: the role it plays.
const CHILD_ROLE: &str = "MSA_BANK_TEST_CHILD";

/// Re-runs this test binary on one test with `CHILD_ROLE` set, wrapped by `shell` (a `sh -c` prefix).
fn child(test: &str, dir: &Path, shell_prefix: &str) -> std::process::Child {
    let exe = std::env::current_exe().unwrap();
    Command::new("sh")
        .arg("-c")
        .arg(format!("{shell_prefix} exec \"$0\" \"$@\""))
        .arg(exe)
        .args([test, "--exact", "--nocapture", "--test-threads=1"])
        .env(CHILD_ROLE, dir)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap()
}

#[test]
fn a_writer_killed_mid_append_leaves_the_bank_whole() {
    if let Ok(dir) = std::env::var(CHILD_ROLE) {
        // Child: append, announce when the first new file is on disk, then wait to be killed.
        let mut bank = Bank::open(&dir, OpenOptions::default()).unwrap();
        let _ = append_filled_reporting(&mut bank, "killed", 4 * 4096, 1, |_| {
            println!("WROTE");
            std::thread::sleep(std::time::Duration::from_secs(600));
        });
        panic!("the parent kills this process before the append finishes");
    }
    let dir = tempfile::tempdir().unwrap();
    let mut bank = create(dir.path());
    append(&mut bank, &[("a", 5), ("b", 3)]).unwrap();
    let mut writer = child(
        "a_writer_killed_mid_append_leaves_the_bank_whole",
        dir.path(),
        "",
    );
    // The harness prints its own lines first; wait for the child's signal.
    let wrote = BufReader::new(writer.stdout.take().unwrap())
        .lines()
        .map_while(Result::ok)
        .any(|line| line.contains("WROTE"));
    assert!(wrote, "the child ended without writing a file");
    writer.kill().unwrap(); // SIGKILL: no destructor, no cleanup
    writer.wait().unwrap();
    // The orphaned segment file is there, unreferenced; the bank opens with every earlier document.
    assert!(dir.path().join("seg000002-layer01.safetensors").exists());
    let mut bank = Bank::open(dir.path(), OpenOptions::default()).unwrap();
    assert_eq!(bank.documents().len(), 2);
    check_rows(&bank);
    // The next append replaces the orphan.
    append(&mut bank, &[("c", 6)]).unwrap();
    let bank = Bank::open(dir.path(), OpenOptions::default()).unwrap();
    assert_eq!(bank.documents().len(), 3);
    check_rows(&bank);
}

#[test]
fn a_full_disk_during_append_loses_nothing() {
    if let Ok(dir) = std::env::var(CHILD_ROLE) {
        // Child, under a file-size limit: the append's large file cannot be written.
        let mut bank = Bank::open(&dir, OpenOptions::default()).unwrap();
        let err = append_filled(&mut bank, "too big", 4 * 40_000, 1).unwrap_err();
        println!("\nERROR {err}");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut bank = create(dir.path());
    append(&mut bank, &[("a", 5), ("b", 3)]).unwrap();
    // `ulimit -f` in 512-byte blocks: 1 MiB, far below the 3 × 640 KB layer file. SIGXFSZ is ignored so
    // the write fails with EFBIG, as a full disk fails with ENOSPC.
    let writer = child(
        "a_full_disk_during_append_loses_nothing",
        dir.path(),
        "trap '' XFSZ; ulimit -f 2048;",
    );
    let output = writer.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{stdout}");
    let error = stdout
        .lines()
        .find_map(|l| l.split_once("ERROR ").map(|(_, e)| e))
        .unwrap_or_else(|| panic!("no error from the child: {stdout}"));
    assert!(
        error.contains("cannot write") && error.contains("bank is unchanged"),
        "{error}"
    );
    let names: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert!(
        !names.iter().any(|n| n.starts_with("seg000002")),
        "{names:?}"
    );
    let bank = Bank::open(dir.path(), OpenOptions::default()).unwrap();
    assert_eq!(bank.documents().len(), 2);
    check_rows(&bank);
}
