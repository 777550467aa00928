//! Runs the sqllogictest files in `tests/slt/` against a real store in a temporary directory,
//! one fresh store per file.
//!
//! The records are sqllogictest's, with results in DataFusion's style (one row per line,
//! values separated by a space, `NULL` for nulls, `(empty)` for an empty string):
//!
//! * `statement ok` / `statement error <regex>` and a SQL statement;
//! * `query <types> [rowsort]` / `query error <regex>`, the SQL, `----`, the expected rows;
//!
//! plus three records of Forestall's own, so a file can put data where it wants it:
//!
//! * `write`, then line protocol (timestamps in ns) up to a blank line: written to the store;
//! * `flush`: the buffer becomes segments;
//! * `restart`: the store is closed and opened again on the same directory.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow::array::RecordBatch;
use arrow::util::display::array_value_to_string;
use forestall_engine::{EngineConfig, Precision, Store};
use forestall_query::QueryEngine;

fn open(dir: &Path) -> Arc<Store> {
    Arc::new(
        Store::open(EngineConfig {
            data_dir: dir.to_path_buf(),
            ..Default::default()
        })
        .unwrap(),
    )
}

fn rows(batches: &[RecordBatch]) -> Vec<String> {
    let mut out = Vec::new();
    for b in batches {
        for r in 0..b.num_rows() {
            let values: Vec<String> = b
                .columns()
                .iter()
                .map(|c| {
                    if c.is_null(r) {
                        "NULL".to_string()
                    } else {
                        match array_value_to_string(c, r).unwrap() {
                            s if s.is_empty() => "(empty)".to_string(),
                            s => s,
                        }
                    }
                })
                .collect();
            out.push(values.join(" ").trim_end().to_string());
        }
    }
    out
}

/// A failure, with the file and line of the record.
fn fail(file: &Path, line: usize, what: String) -> ! {
    panic!("{}:{line}: {what}", file.display())
}

async fn run_file(file: &Path) {
    let text = std::fs::read_to_string(file).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    let dir = tempfile::tempdir().unwrap();
    let mut store = open(dir.path());
    let mut engine = QueryEngine::new(Arc::clone(&store));
    let mut i = 0;
    while i < lines.len() {
        let line = lines[i].trim_end();
        let at = i + 1;
        i += 1;
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        // The block after the header: up to a blank line (or `----` for queries).
        let mut block = Vec::new();
        while i < lines.len() && !lines[i].trim().is_empty() && lines[i].trim() != "----" {
            block.push(lines[i]);
            i += 1;
        }
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            ["write"] => {
                let body = block.join("\n");
                let o = store
                    .write(body.as_bytes(), Precision::Nanoseconds, 0)
                    .unwrap_or_else(|e| fail(file, at, e.to_string()));
                if o.rejected_lines > 0 {
                    fail(file, at, format!("rejected lines: {:?}", o.errors));
                }
            }
            ["flush"] => {
                store
                    .flush()
                    .unwrap_or_else(|e| fail(file, at, e.to_string()));
            }
            ["restart"] => {
                drop(engine);
                let s = Arc::into_inner(store).expect("no other handle to the store");
                s.shutdown().unwrap();
                drop(s);
                store = open(dir.path());
                engine = QueryEngine::new(Arc::clone(&store));
            }
            ["statement", "ok"] => {
                if let Err(e) = engine.sql(&block.join("\n")).await {
                    fail(file, at, format!("expected ok, got {e}"));
                }
            }
            ["statement" | "query", "error", pattern @ ..] => {
                let sql = block.join("\n");
                // A query error record may carry an (empty) expected block.
                if i < lines.len() && lines[i].trim() == "----" {
                    i += 1;
                }
                match engine.sql(&sql).await {
                    Ok(_) => fail(
                        file,
                        at,
                        format!("expected an error, the query succeeded: {sql}"),
                    ),
                    Err(e) => {
                        let re = regex::Regex::new(&pattern.join(" ")).unwrap();
                        if !re.is_match(&e.to_string()) {
                            fail(file, at, format!("error {e:?} does not match {re}"));
                        }
                    }
                }
            }
            ["query", _types, options @ ..] => {
                let sql = block.join("\n");
                if i >= lines.len() || lines[i].trim() != "----" {
                    fail(file, at, "a query needs ---- and its expected rows".into());
                }
                i += 1;
                let mut expected = Vec::new();
                while i < lines.len() && !lines[i].trim().is_empty() {
                    expected.push(lines[i].trim_end().to_string());
                    i += 1;
                }
                let (_, batches) = engine
                    .sql(&sql)
                    .await
                    .unwrap_or_else(|e| fail(file, at, format!("{sql}\n{e}")));
                let mut got = rows(&batches);
                if options.contains(&"rowsort") {
                    got.sort();
                    expected.sort();
                }
                if got != expected {
                    fail(
                        file,
                        at,
                        format!(
                            "{sql}\nexpected:\n{}\ngot:\n{}",
                            expected.join("\n"),
                            got.join("\n")
                        ),
                    );
                }
            }
            _ => fail(file, at, format!("unknown record {line:?}")),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqllogictest_files() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/slt");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "slt"))
        .collect();
    files.sort();
    assert!(files.len() >= 4, "slt files missing in {}", dir.display());
    for file in files {
        run_file(&file).await;
    }
}
