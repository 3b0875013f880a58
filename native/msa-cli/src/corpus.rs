//! Reading a corpus: JSONL files (`{"id": …, "text": …}` per line), JSON files (a list of such objects
//! or of strings), plain text files, and folders of them. Every document gets a source that is unique
//! in the bank: its id, `FILE#INDEX` for a JSON list of strings, or the text file's path.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use msa_engine::SourceDocument;
use serde::Deserialize;

/// File extensions read from a folder; other files are skipped.
const TEXT_EXTENSIONS: [&str; 3] = ["txt", "md", "text"];

/// One document of a JSONL or JSON corpus (and of `msa serve`'s document requests). Other fields (a
/// title, metadata) are allowed and ignored.
#[derive(Deserialize)]
pub struct JsonlRecord {
    id: serde_json::Value,
    text: String,
}

/// Reads every path in order: a `.jsonl` file's records, a `.json` file's list, a text file whole, a
/// folder's `.jsonl`, `.json`, `.txt`, `.md` and `.text` files (recursively, sorted by path). Sources
/// must be unique across the corpus (the encoder refuses a repeated one).
pub fn read(paths: &[PathBuf]) -> Result<Vec<SourceDocument>> {
    let mut documents = Vec::new();
    for path in paths {
        read_path(path, &mut documents)?;
    }
    Ok(documents)
}

fn read_path(path: &Path, out: &mut Vec<SourceDocument>) -> Result<()> {
    let meta = std::fs::metadata(path).with_context(|| format!("corpus {}", path.display()))?;
    if meta.is_dir() {
        let mut files = Vec::new();
        collect_files(path, &mut files)?;
        files.sort();
        if files.is_empty() {
            bail!(
                "corpus folder {} holds no .jsonl, .json, .txt, .md or .text files",
                path.display()
            );
        }
        for file in files {
            read_file(&file, out)?;
        }
        Ok(())
    } else {
        read_file(path, out)
    }
}

fn collect_files(dir: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    for entry in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let path = entry
            .with_context(|| format!("reading {}", dir.display()))?
            .path();
        if path.is_dir() {
            collect_files(&path, out)?;
        } else if path
            .extension()
            .and_then(|e| e.to_str())
            .is_some_and(|e| e == "jsonl" || e == "json" || TEXT_EXTENSIONS.contains(&e))
        {
            out.push(path);
        }
    }
    Ok(())
}

fn read_file(path: &Path, out: &mut Vec<SourceDocument>) -> Result<()> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading corpus file {}", path.display()))?;
    if path.extension().is_some_and(|e| e == "jsonl") {
        return read_jsonl(path, &text, out);
    }
    if path.extension().is_some_and(|e| e == "json") {
        return read_json(path, &text, out);
    }
    if text.trim().is_empty() {
        bail!(
            "{}: the file is empty; every document needs text",
            path.display()
        );
    }
    out.push(SourceDocument {
        source: source_name(path),
        text,
    });
    Ok(())
}

impl JsonlRecord {
    /// The document, or an error naming `where_` (a file and line or list index).
    pub fn into_document(self, where_: &str) -> Result<SourceDocument> {
        let source = match self.id {
            serde_json::Value::String(s) if !s.trim().is_empty() => s,
            serde_json::Value::Number(n) => n.to_string(),
            other => bail!("{where_}: `id` must be a non-empty string or a number, not {other}"),
        };
        if self.text.trim().is_empty() {
            bail!("{where_}: document `{source}` has empty text");
        }
        Ok(SourceDocument {
            source,
            text: self.text,
        })
    }
}

/// An entry of a `.json` corpus: a record, or a bare string named by its index.
#[derive(Deserialize)]
#[serde(untagged)]
enum JsonEntry {
    Text(String),
    Record(JsonlRecord),
}

fn read_json(path: &Path, text: &str, out: &mut Vec<SourceDocument>) -> Result<()> {
    let entries: Vec<JsonEntry> = serde_json::from_str(text).with_context(|| {
        format!(
            "{}: expected a JSON list of strings or of {{\"id\": …, \"text\": …}} objects",
            path.display()
        )
    })?;
    if entries.is_empty() {
        bail!("{}: the list is empty", path.display());
    }
    for (index, entry) in entries.into_iter().enumerate() {
        let where_ = format!("{}[{index}]", path.display());
        out.push(match entry {
            JsonEntry::Text(text) if text.trim().is_empty() => {
                bail!("{where_}: the document has empty text")
            }
            JsonEntry::Text(text) => SourceDocument {
                source: format!("{}#{index}", source_name(path)),
                text,
            },
            JsonEntry::Record(record) => record.into_document(&where_)?,
        });
    }
    Ok(())
}

/// A file's source: its path as given, without `.` components, so that `./docs/a.txt` and
/// `docs/a.txt` name the same document when an encoding is resumed.
fn source_name(path: &Path) -> String {
    path.components()
        .filter(|c| *c != std::path::Component::CurDir)
        .collect::<PathBuf>()
        .display()
        .to_string()
}

fn read_jsonl(path: &Path, text: &str, out: &mut Vec<SourceDocument>) -> Result<()> {
    let before = out.len();
    for (index, line) in text.lines().enumerate() {
        let line_number = index + 1;
        if line.trim().is_empty() {
            continue;
        }
        let where_ = format!("{}:{line_number}", path.display());
        let record: JsonlRecord = serde_json::from_str(line).with_context(|| {
            format!("{where_}: expected a JSON object {{\"id\": …, \"text\": …}}")
        })?;
        out.push(record.into_document(&where_)?);
    }
    if out.len() == before {
        bail!("{}: no documents in this JSONL file", path.display());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn jsonl(text: &str) -> Result<Vec<SourceDocument>> {
        let mut out = Vec::new();
        read_jsonl(Path::new("c.jsonl"), text, &mut out)?;
        Ok(out)
    }

    #[test]
    fn jsonl_ids_become_sources_and_blank_lines_are_skipped() {
        // Other fields (a title) are allowed and ignored.
        let docs = jsonl(
            "{\"id\": \"a\", \"title\": \"t\", \"text\": \"x\"}\n\n{\"id\": 7, \"text\": \"y\"}\n",
        )
        .unwrap();
        let sources: Vec<_> = docs.iter().map(|d| d.source.as_str()).collect();
        assert_eq!(sources, ["a", "7"]);
        assert_eq!(docs[1].text, "y");
    }

    #[test]
    fn json_lists_hold_strings_or_records() {
        let mut out = Vec::new();
        read_json(
            Path::new("m.json"),
            r#"["a", {"id": "x", "text": "b"}]"#,
            &mut out,
        )
        .unwrap();
        let sources: Vec<_> = out.iter().map(|d| d.source.as_str()).collect();
        assert_eq!(sources, ["m.json#0", "x"]);
        for (text, wanted) in [
            ("[]", "the list is empty"),
            ("[\"a\", \" \"]", "m.json[1]: the document has empty text"),
            ("{\"id\": 1}", "expected a JSON list"),
        ] {
            let error = format!(
                "{:#}",
                read_json(Path::new("m.json"), text, &mut out).unwrap_err()
            );
            assert!(error.contains(wanted), "{text}: {error}");
        }
    }

    #[test]
    fn file_sources_ignore_dot_components() {
        assert_eq!(source_name(Path::new("./docs/./a.txt")), "docs/a.txt");
        assert_eq!(source_name(Path::new("/abs/a.txt")), "/abs/a.txt");
    }

    #[test]
    fn jsonl_errors_name_the_line() {
        let cases = [
            ("{\"id\": \"a\", \"text\": \"x\"}\nnot json\n", "c.jsonl:2:"),
            ("{\"id\": \"a\"}\n", "c.jsonl:1:"),
            ("{\"id\": null, \"text\": \"x\"}\n", "c.jsonl:1: `id`"),
            (
                "\n\n{\"id\": \"b\", \"text\": \"  \"}\n",
                "c.jsonl:3: document `b` has empty text",
            ),
            ("\n", "no documents"),
        ];
        for (text, wanted) in cases {
            let error = format!("{:#}", jsonl(text).unwrap_err());
            assert!(error.contains(wanted), "{text:?}: {error}");
        }
    }
}
