//! The real binary over real HTTP: writes, gzip, errors, metrics, graceful shutdown, restart.

use std::io::Write;
use std::time::Duration;

use crate::harness::{Server, post, read_back};

#[test]
fn write_query_state_survives_sigterm_and_restart() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), &[]);
    let health: serde_json::Value = serde_json::from_str(
        &ureq::get(&server.url("/health"))
            .call()
            .unwrap()
            .into_string()
            .unwrap(),
    )
    .unwrap();
    assert_eq!(health["status"], "pass");

    let (code, _) = post(
        &server.url("/write?db=x&precision=s"),
        b"m,host=a v=1i 1700000000\nm,host=b v=2i 1700000001\n",
    );
    assert_eq!(code, 204);
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(b"m,host=c v=3i 1700000002000000000").unwrap();
    let resp = ureq::post(&server.url("/api/v2/write?org=o&bucket=b"))
        .set("Content-Encoding", "gzip")
        .send_bytes(&gz.finish().unwrap())
        .unwrap();
    assert_eq!(resp.status(), 204);
    let (code, text) = post(
        &server.url("/api/v2/write"),
        b"m,host=d v=1.5 1700000003000000000\n",
    );
    assert_eq!(code, 400);
    assert!(text.contains("is integer, got float"), "{text}");

    let metrics = ureq::get(&server.url("/metrics"))
        .call()
        .unwrap()
        .into_string()
        .unwrap();
    assert!(
        metrics
            .lines()
            .any(|l| l == "forestall_points_written_total 3"),
        "{metrics}"
    );
    assert!(
        metrics
            .lines()
            .any(|l| l == "forestall_lines_rejected_total 1"),
        "{metrics}"
    );

    // SIGTERM flushes: the restart has nothing to replay, and segments hold the rows.
    assert!(server.terminate().success());
    let wal_files = std::fs::read_dir(dir.path().join("wal")).unwrap().count();
    assert!(
        wal_files <= 1,
        "covered WAL files are removed ({wal_files} left)"
    );
    let server = Server::start(dir.path(), &[]);
    let log = server.wait_for_log("store opened", Duration::from_secs(60));
    assert!(
        log.iter()
            .any(|l| l.contains("replayed_lines=0") && l.contains("segments=1")),
        "{}",
        log.join("\n")
    );
    assert!(server.terminate().success());
    let mut rows = read_back(dir.path(), "m", "host", "v");
    rows.sort();
    assert_eq!(
        rows,
        vec![
            ("a".into(), 1_700_000_000_000_000_000, 1),
            ("b".into(), 1_700_000_001_000_000_000, 2),
            ("c".into(), 1_700_000_002_000_000_000, 3)
        ]
    );
}

#[test]
fn bad_configuration_fails_fast_with_a_clear_message() {
    let dir = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_forestall"))
        .args(["serve", "--http-addr", "127.0.0.1:0", "--data-dir"])
        .arg(dir.path())
        .env("FORESTALL__ENGINE__WAL__SYNC", "sometimes")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("FORESTALL__ENGINE__WAL__SYNC") || err.contains("sometimes"),
        "{err}"
    );
}

#[test]
fn a_second_server_on_the_same_data_dir_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let first = Server::start(dir.path(), &[]);
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_forestall"))
        .args(["serve", "--http-addr", "127.0.0.1:0", "--data-dir"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("lock") || err.contains("index"), "{err}");
    assert!(first.terminate().success());
}
