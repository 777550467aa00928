//! The client commands (`forestall query`, `write`, `status`) against a real server, as a
//! user runs them from a shell.

use std::io::Write;
use std::process::{Command, Output, Stdio};

use crate::harness::{Server, sql};

fn forestall(server: Option<&Server>, args: &[&str], stdin: &[u8]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_forestall"));
    cmd.args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if let Some(s) = server {
        cmd.args(["--host", &s.url("")]);
    }
    let mut child = cmd.spawn().unwrap();
    let mut input = child.stdin.take().unwrap();
    input.write_all(stdin).unwrap();
    drop(input);
    child.wait_with_output().unwrap()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[test]
fn write_then_query_from_the_command_line() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), &[]);
    // From stdin, second timestamps.
    let out = forestall(
        Some(&server),
        &["write", "--precision", "s"],
        b"cpu,host=a usage=1.5 1767225600\ncpu,host=b usage=2.5 1767225600\n",
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stderr).contains("2 lines written, 0 refused"));
    let out = forestall(
        Some(&server),
        &["query", "SELECT host, usage FROM cpu ORDER BY host"],
        b"",
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let table = text(&out.stdout);
    assert!(table.contains("| a    | 1.5   |"), "{table}");
    assert!(table.contains("| b    | 2.5   |"), "{table}");
    let out = forestall(
        Some(&server),
        &[
            "query",
            "--format",
            "csv",
            "SELECT host, time FROM cpu ORDER BY host",
        ],
        b"",
    );
    let csv = text(&out.stdout);
    let lines: Vec<&str> = csv.lines().collect();
    assert_eq!(lines.len(), 3, "{csv}");
    assert_eq!(lines[0], "host,time");
    assert!(lines[1].starts_with("a,2026-01-01T00:00:00"), "{csv}");
    assert!(lines[2].starts_with("b,2026-01-01T00:00:00"), "{csv}");
    // A query the server refuses: its reason, and a failed exit.
    let out = forestall(Some(&server), &["query", "SELECT nope FROM cpu"], b"");
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(err.contains("400") && err.contains("nope"), "{err}");
    // Status shows what is there.
    let out = forestall(Some(&server), &["status"], b"");
    assert!(out.status.success(), "{}", text(&out.stderr));
    let status = text(&out.stdout);
    assert!(status.contains("health               pass"), "{status}");
    assert!(status.contains("measurements         1: cpu"), "{status}");
    assert!(status.contains("none failing"), "{status}");
    assert!(status.contains("allocation loop      off"), "{status}");
}

#[test]
fn a_large_file_is_written_in_batches_and_refused_lines_keep_their_numbers() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), &[]);
    // Over 4 MiB, so at least two batches; bad lines in the first and in the last batch, a
    // comment and a blank line between, and no final newline.
    let n = 120_000;
    let mut body = String::from("# generated\n\n");
    for i in 0..n {
        let line = match i {
            10 => "m,host=h value= 1\n".to_string(),
            110_000 => "m,host=h value=\"a string\" 5\n".to_string(),
            _ => format!(
                "m,host=h{} value={i}i,pad=\"{}\" {i}\n",
                i % 7,
                "x".repeat(20)
            ),
        };
        body.push_str(&line);
    }
    body.pop();
    assert!(body.len() > 5 << 20);
    let file = dir.path().join("points.lp");
    std::fs::write(&file, &body).unwrap();
    let out = forestall(Some(&server), &["write", file.to_str().unwrap()], b"");
    assert!(!out.status.success(), "refused lines fail the command");
    let err = text(&out.stderr);
    // Line numbers in the file: two header lines, then point i on line i + 3.
    assert!(err.contains("line 13: "), "{err}");
    assert!(err.contains("line 110003: "), "{err}");
    assert!(
        err.contains(&format!("{} lines written, 2 refused", n - 2)),
        "{err}"
    );
    let rows = sql(&server, "SELECT count(*) AS n, max(value) AS hi FROM m");
    assert_eq!(rows[0]["n"], n - 2);
    assert_eq!(
        rows[0]["hi"],
        n - 1,
        "the last line, without its newline, is stored"
    );
}

#[test]
fn a_server_that_is_not_there_is_a_clear_error() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let host = format!("http://127.0.0.1:{port}");
    for args in [
        vec!["query", "SELECT 1", "--host", &host],
        vec!["status", "--host", &host],
        vec!["write", "--host", &host],
    ] {
        let out = forestall(None, &args, b"m value=1\n");
        assert!(!out.status.success(), "{args:?}");
        let err = text(&out.stderr);
        assert!(err.contains("cannot reach Forestall"), "{args:?}: {err}");
    }
}
