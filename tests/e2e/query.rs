//! `/api/v3/query_sql` with a real `curl`: every format, large results that stream, and a
//! client that hangs up in the middle of one.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::Command;
use std::time::Duration;

use crate::harness::{Server, post};

/// 2026-01-01T00:00:00Z
const T0: i64 = 1_767_225_600_000_000_000;
const ROWS: usize = 30_000;

fn write_rows(server: &Server) {
    let mut body = String::new();
    for i in 0..ROWS as i64 {
        body.push_str(&format!(
            "cpu,host=h{} usage={} {}\n",
            i % 10,
            i,
            T0 + i * 1_000_000_000
        ));
    }
    let (status, text) = post(&server.url("/api/v2/write?precision=ns"), body.as_bytes());
    assert_eq!(status, 204, "{text}");
}

/// `curl` GET with a URL-encoded query; returns (HTTP status, body).
fn curl(server: &Server, sql: &str, format: &str) -> (u16, Vec<u8>) {
    let out = Command::new("curl")
        .args(["-sS", "-G", "-w", "\n%{http_code}", "--max-time", "60"])
        .arg(server.url("/api/v3/query_sql"))
        .args(["--data-urlencode", &format!("q={sql}")])
        .args(["--data-urlencode", &format!("format={format}")])
        .output()
        .expect("run curl");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut body = out.stdout;
    let split = body.iter().rposition(|&b| b == b'\n').unwrap();
    let status = std::str::from_utf8(&body[split + 1..])
        .unwrap()
        .parse()
        .unwrap();
    body.truncate(split);
    (status, body)
}

#[test]
fn curl_gets_every_format_and_large_results_stream_whole() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), &[]);
    write_rows(&server);
    let all = "SELECT host, usage, time FROM cpu ORDER BY time";

    let (status, body) = curl(&server, all, "json");
    assert_eq!(status, 200);
    let rows: Vec<serde_json::Value> = serde_json::from_slice(&body).unwrap();
    assert_eq!(rows.len(), ROWS);
    assert_eq!(
        rows[ROWS - 1]["usage"],
        serde_json::json!((ROWS - 1) as f64)
    );

    let (status, body) = curl(&server, all, "jsonl");
    assert_eq!(status, 200);
    let text = String::from_utf8(body).unwrap();
    assert_eq!(text.lines().count(), ROWS);
    assert!(
        text.lines()
            .all(|l| serde_json::from_str::<serde_json::Value>(l).is_ok())
    );

    let (status, body) = curl(&server, all, "csv");
    assert_eq!(status, 200);
    let text = String::from_utf8(body).unwrap();
    let mut lines = text.lines();
    assert_eq!(lines.next(), Some("host,usage,time"));
    assert_eq!(lines.count(), ROWS);

    let (status, body) = curl(&server, all, "parquet");
    assert_eq!(status, 200);
    assert!(body.starts_with(b"PAR1") && body.ends_with(b"PAR1"));
    let reader =
        parquet::file::reader::SerializedFileReader::new(bytes::Bytes::from(body)).unwrap();
    use parquet::file::reader::FileReader;
    assert_eq!(reader.metadata().file_metadata().num_rows(), ROWS as i64);

    let (status, body) = curl(&server, all, "arrow");
    assert_eq!(status, 200);
    let reader = arrow_ipc::reader::StreamReader::try_new(body.as_slice(), None).unwrap();
    assert_eq!(reader.schema().field(1).name(), "usage");
    let rows: usize = reader.map(|b| b.unwrap().num_rows()).sum();
    assert_eq!(rows, ROWS);

    let (status, body) = curl(
        &server,
        "SELECT host, count(*) AS n FROM cpu GROUP BY host ORDER BY host LIMIT 2",
        "pretty",
    );
    assert_eq!(status, 200);
    let text = String::from_utf8(body).unwrap();
    assert!(text.contains("| h0   | 3000 |"), "{text}");

    // An empty result is still well-formed.
    let (_, body) = curl(&server, "SELECT * FROM cpu WHERE usage < 0", "json");
    assert_eq!(body, b"[]");
    let (_, body) = curl(
        &server,
        "SELECT host, usage FROM cpu WHERE usage < 0",
        "csv",
    );
    assert_eq!(body, b"host,usage\n");

    // Bad queries are 400s with the message, and an unknown format too.
    let (status, body) = curl(&server, "SELECT nope FROM cpu", "json");
    assert_eq!(status, 400, "{}", String::from_utf8_lossy(&body));
    let (status, _) = curl(&server, "SELECT 1", "xml");
    assert_eq!(status, 400);
}

#[test]
fn a_client_that_hangs_up_mid_stream_does_not_hurt_the_server() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), &[]);
    write_rows(&server);
    for _ in 0..5 {
        let mut conn = TcpStream::connect(&server.addr).unwrap();
        conn.set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        write!(
            conn,
            "GET /api/v3/query_sql?q=SELECT%20*%20FROM%20cpu%20CROSS%20JOIN%20(SELECT%201%20AS%20k)&format=jsonl HTTP/1.1\r\nHost: x\r\n\r\n"
        )
        .unwrap();
        let mut first = [0u8; 4096];
        let n = conn.read(&mut first).unwrap();
        assert!(n > 0 && first.starts_with(b"HTTP/1.1 200"));
        drop(conn);
    }
    let (status, body) = curl(&server, "SELECT count(*) AS n FROM cpu", "csv");
    assert_eq!((status, body), (200, format!("n\n{ROWS}\n").into_bytes()));
}

#[test]
fn a_result_over_the_row_limit_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), &[("FORESTALL__QUERY__MAX_RESULT_ROWS", "100")]);
    write_rows(&server);
    let (status, body) = curl(&server, "SELECT * FROM cpu", "csv");
    assert_eq!(status, 400);
    assert!(String::from_utf8_lossy(&body).contains("more than 100 rows"));
    let (status, _) = curl(&server, "SELECT * FROM cpu LIMIT 100", "csv");
    assert_eq!(status, 200);
}

#[test]
fn model_functions_answer_over_http_and_bad_calls_get_400() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), &[]);
    // Two hosts, a point a minute for a day: a daily-ish cycle of 60 minutes; h1 climbs
    // towards 90 every 100 minutes.
    let mut body = String::new();
    for m in 0..1440i64 {
        let h0 = 50.0 + 10.0 * (m as f64 * std::f64::consts::TAU / 60.0).sin();
        let phase = m % 100;
        let h1 = if phase < 50 {
            20.0 + 1.6 * phase as f64
        } else {
            20.0
        };
        body.push_str(&format!(
            "cpu,host=h0 usage={h0} {}\n",
            T0 + m * 60_000_000_000
        ));
        body.push_str(&format!(
            "cpu,host=h1 usage={h1} {}\n",
            T0 + m * 60_000_000_000
        ));
    }
    let (status, text) = post(&server.url("/api/v2/write?precision=ns"), body.as_bytes());
    assert_eq!(status, 204, "{text}");

    let (status, body) = curl(
        &server,
        "SELECT host, time, mean, lower, upper FROM forecast('cpu', 'usage', 6, 'host = ''h0''') ORDER BY time",
        "csv",
    );
    let text = String::from_utf8(body).unwrap();
    assert_eq!(status, 200, "{text}");
    let rows: Vec<&str> = text.lines().skip(1).collect();
    assert_eq!(rows.len(), 6, "{text}");
    assert!(rows[0].starts_with("h0,2026-01-02T00:00:00"), "{text}");

    let (status, body) = curl(
        &server,
        "SELECT component, resource, score FROM risk('cpu', 'usage > 90 AS cpu') ORDER BY component",
        "json",
    );
    let text = String::from_utf8(body).unwrap();
    assert_eq!(status, 200, "{text}");
    assert!(
        text.contains("\"component\":\"h0\"") && text.contains("\"component\":\"h1\""),
        "{text}"
    );

    let (status, body) = curl(
        &server,
        "SELECT max(s) AS top FROM (SELECT anomaly_score(usage) OVER (PARTITION BY host ORDER BY time) AS s FROM cpu)",
        "csv",
    );
    let text = String::from_utf8(body).unwrap();
    assert_eq!(status, 200, "{text}");
    let top: f64 = text.lines().nth(1).unwrap().parse().unwrap();
    assert!((0.0..=1.0).contains(&top), "{text}");

    for sql in [
        "SELECT * FROM forecast('cpu', 'usage', 0)",
        "SELECT * FROM forecast('cpu', 'nope', 5)",
        "SELECT * FROM forecast('cpu', 'usage', 5, 'host = ')",
        "SELECT * FROM risk('cpu', 'usage >')",
        "SELECT anomaly_score(host) OVER () FROM cpu",
    ] {
        let (status, body) = curl(&server, sql, "json");
        assert_eq!(status, 400, "{sql}: {}", String::from_utf8_lossy(&body));
    }
}
