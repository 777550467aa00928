//! Differential SQL: `scripts/differential-sql.py` writes seeded random rows to a real
//! `forestall serve` (one batch compacted, one flushed, one left in the write buffer, with
//! overwrites across them), loads the same rows into DuckDB (the Python package, which
//! scripts/setup.sh installs), and compares the answers to a few hundred random queries over
//! filters, aggregates, `date_bin`, gap filling, subqueries and joins. Any difference fails
//! the test and is printed with both queries and both answers. Longer runs are reported in
//! docs/BENCHMARKS.md.

use std::process::Command;

use crate::harness::Server;

fn differential(seed: u32, cases: u32) {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), &[]);
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../scripts/differential-sql.py"
    );
    let out = Command::new("python3")
        .args([script, "--url", &format!("http://{}", server.addr)])
        .args(["--seed", &seed.to_string(), "--cases", &cases.to_string()])
        .output()
        .expect("run python3 (scripts/setup.sh installs duckdb)");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains(&format!("{cases} cases over 1 seeds, 0 differences")),
        "{stdout}"
    );
    server.terminate();
}

#[test]
fn forestall_answers_random_queries_as_duckdb_does_on_the_same_rows() {
    differential(1, 300);
}
