//! Continuous queries through the real binary: a rollup killed with SIGKILL mid-run and between
//! its result write and its watermark commit equals a recomputation from scratch afterwards;
//! definitions over HTTP, SQL, psql and the config file; bad ones refused with nothing kept.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::harness::{Server, delete, eventually, get_json, post, psql, put, sql};

const S: i64 = 1_000_000_000;
const MIN: i64 = 60 * S;

fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos() as i64
}

fn write(server: &Server, body: &str) {
    let (status, text) = post(&server.url("/api/v2/write"), body.as_bytes());
    assert_eq!(status, 204, "{text}");
}

/// Twenty minutes of points every 10 s for four hosts, ending about a minute ago.
fn history(server: &Server) -> i64 {
    let start = (now() - 21 * MIN) / MIN * MIN;
    let mut body = String::new();
    for i in 0..120 {
        for h in 0..4 {
            body.push_str(&format!(
                "cpu,host=h{h},dc=eu usage={},n={}i {}\n",
                (i * 7 + h * 13) % 100,
                i,
                start + i * 10 * S
            ));
        }
    }
    write(server, &body);
    start
}

const ROLLUP: &str = "CREATE CONTINUOUS QUERY cpu_1m EVERY '1s' LATENESS '0s' BACKFILL '1 hour' INTO cpu_1m AS \
    SELECT date_bin(INTERVAL '1 minute', time) AS time, host, dc, avg(usage) AS usage, max(n) AS n, count(*) AS points \
    FROM cpu GROUP BY 1, host, dc";

/// The sink and a from-scratch computation of the same buckets, both sorted.
fn sink_and_recomputation(
    server: &Server,
    end: i64,
) -> (Vec<serde_json::Value>, Vec<serde_json::Value>) {
    let sink = sql(
        server,
        &format!(
            "SELECT CAST(time AS BIGINT) AS t, host, dc, usage, n, points FROM cpu_1m \
             WHERE time < to_timestamp_nanos({end}) ORDER BY t, host"
        ),
    );
    let direct = sql(
        server,
        &format!(
            "SELECT CAST(date_bin(INTERVAL '1 minute', time) AS BIGINT) AS t, host, dc, avg(usage) AS usage, \
             max(n) AS n, count(*) AS points FROM cpu WHERE time < to_timestamp_nanos({end}) GROUP BY 1, host, dc ORDER BY t, host"
        ),
    );
    (sink, direct)
}

fn status(server: &Server, name: &str) -> serde_json::Value {
    let (code, body) = get_json(&server.url(&format!("/api/v1/continuous_queries/{name}")));
    assert_eq!(code, 200, "{body}");
    body
}

/// Waits until the rollup has caught up with now and has no dirty bucket left.
fn caught_up(server: &Server) {
    eventually("the rollup to catch up", Duration::from_secs(60), || {
        let s = status(server, "cpu_1m");
        s["watermark"].as_i64().unwrap_or(0) >= (now() - 2 * S) / MIN * MIN
            && s["dirty_buckets"] == 0
    });
}

#[test]
fn a_rollup_killed_mid_run_and_before_its_watermark_commit_matches_a_recomputation() {
    let dir = tempfile::tempdir().unwrap();
    // 1. Killed between writing its results and committing its watermark.
    let server = Server::start(dir.path(), &[("FORESTALL_PAUSE_AT", "cq-before-watermark")]);
    let start = history(&server);
    sql(&server, ROLLUP);
    server.wait_for_log(
        "pause point cq-before-watermark reached",
        Duration::from_secs(60),
    );
    server.kill();

    // 2. Restarted: the same buckets are computed again and overwrite themselves. Late points
    //    arrive (an old bucket, a new series in an old bucket), and it is killed at once.
    let server = Server::start(dir.path(), &[]);
    caught_up(&server);
    let end = start + 20 * MIN;
    let (sink, direct) = sink_and_recomputation(&server, end);
    assert_eq!(sink, direct);
    assert_eq!(sink.len(), 80, "20 minutes × 4 hosts");
    write(
        &server,
        &format!(
            "cpu,host=h0,dc=eu usage=500,n=900i {}\ncpu,host=h7,dc=us usage=1,n=1i {}",
            start + 3 * MIN + 5 * S,
            start + 4 * MIN
        ),
    );
    server.kill();

    // 3. After a restart the late points are in their buckets, exactly once.
    let server = Server::start(dir.path(), &[]);
    caught_up(&server);
    let (sink, direct) = sink_and_recomputation(&server, end);
    assert_eq!(sink, direct);
    assert_eq!(sink.len(), 81);
    assert!(
        sink.iter().any(|r| r["n"] == 900),
        "the late point is in its bucket"
    );
    assert!(server.terminate().success());
}

#[test]
fn definitions_come_from_http_sql_psql_and_the_config_and_bad_ones_leave_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("forestall.toml");
    let declared = |every: &str| {
        format!(
            "[[continuous_queries]]\nname = \"declared\"\nevery = \"{every}\"\ninto = \"mem_5m\"\n\
             query = \"SELECT date_bin(INTERVAL '5 minutes', time) AS time, host, max(used) AS used FROM mem GROUP BY 1, host\"\n"
        )
    };
    std::fs::write(&config, declared("1m")).unwrap();
    let config_env = config.to_str().unwrap().to_owned();
    let data = dir.path().join("data");
    let start =
        |data: &std::path::Path| Server::start(data, &[("FORESTALL_CONFIG", config_env.as_str())]);
    let server = start(&data);
    history(&server);
    let list = |server: &Server| -> Vec<String> {
        let (code, body) = get_json(&server.url("/api/v1/continuous_queries"));
        assert_eq!(code, 200);
        body["continuous_queries"]
            .as_array()
            .unwrap()
            .iter()
            .map(|q| q["name"].as_str().unwrap().to_owned())
            .collect()
    };
    assert_eq!(list(&server), vec!["declared"]);

    // Over HTTP: created, the same again unchanged, then replaced.
    let url = server.url("/api/v1/continuous_queries/cpu_5m");
    let body = r#"{"every": "10s", "into": "cpu_5m", "query": "SELECT date_bin(INTERVAL '5 minutes', time) AS time, host, avg(usage) AS usage FROM cpu GROUP BY 1, host"}"#;
    let (code, answer) = put(&url, body.as_bytes());
    assert_eq!(code, 201, "{answer}");
    assert_eq!(put(&url, body.as_bytes()).1["outcome"], "unchanged");
    let (code, answer) = put(&url, body.replace("10s", "20s").as_bytes());
    assert_eq!((code, answer["outcome"].as_str()), (200, Some("replaced")));
    assert_eq!(get_json(&url).1["definition"]["every"], "20s");
    // A run on request answers with the status after it; an unknown query is a 404.
    let (code, ran) = crate::harness::post(&format!("{url}/run"), b"");
    assert_eq!(code, 200, "{ran}");
    let ran: serde_json::Value = serde_json::from_str(&ran).unwrap();
    assert!(ran["status"]["runs"].as_u64() >= Some(1), "{ran}");
    assert_eq!(
        ran["status"]["last_error"],
        serde_json::Value::Null,
        "{ran}"
    );
    let (code, _) = crate::harness::post(
        &server.url("/api/v1/continuous_queries/nonexistent/run"),
        b"",
    );
    assert_eq!(code, 404);
    // Only the server sets which queries are its own.
    let (code, answer) = put(
        &server.url("/api/v1/continuous_queries/bad"),
        br#"{"builtin": true, "allocate": true, "query": "SELECT 'a' AS component, 'cpu' AS resource, 1 AS usage"}"#,
    );
    assert_eq!(code, 400, "{answer}");

    // Bad definitions: a clear 400 (or 404, 409, 413), and nothing is stored.
    for (body, code, expected) in [
        ("{", 400, "expected a definition"),
        (
            r#"{"into": "x", "query": "SELECT 1", "color": "red"}"#,
            400,
            "unknown field",
        ),
        (
            r#"{"every": "100ms", "into": "x", "query": "SELECT date_bin(INTERVAL '1 minute', time) AS time, avg(usage) AS u FROM cpu GROUP BY 1"}"#,
            400,
            "too short",
        ),
        (
            r#"{"into": "x", "query": "SELECT host, avg(usage) AS u FROM cpu GROUP BY host"}"#,
            400,
            "time bucket",
        ),
        (
            r#"{"into": "x", "health": {"warn": "u > 1"}, "query": "SELECT 1"}"#,
            400,
            "one sink",
        ),
        (
            r#"{"into": "x", "query": "SELEKT 1"}"#,
            400,
            "does not parse",
        ),
    ] {
        let (got, answer) = put(
            &server.url("/api/v1/continuous_queries/bad"),
            body.as_bytes(),
        );
        assert_eq!(got, code, "{body}: {answer}");
        assert!(
            answer["error"].as_str().unwrap().contains(expected),
            "{body}: {answer}"
        );
    }
    let huge = format!(r#"{{"into": "x", "query": "{}"}}"#, " ".repeat(100_000));
    assert_eq!(
        put(
            &server.url("/api/v1/continuous_queries/bad"),
            huge.as_bytes()
        )
        .0,
        413
    );
    assert_eq!(list(&server), vec!["cpu_5m", "declared"]);

    // SQL over HTTP: an error names its position in the statement.
    let (code, text) = post(
        &server.url("/api/v3/query_sql"),
        br#"{"q": "CREATE CONTINUOUS QUERY q EVERY '1m' TO kafka AS SELECT 1"}"#,
    );
    assert_eq!(code, 400, "{text}");
    assert!(text.contains("line 1, column 38"), "{text}");
    let (code, text) = post(
        &server.url("/api/v3/query_sql"),
        br#"{"q": "CREATE CONTINUOUS QUERY cpu_5m INTO y AS SELECT date_bin(INTERVAL '1 minute', time) AS time, avg(usage) AS u FROM cpu GROUP BY 1"}"#,
    );
    assert_eq!(code, 409, "{text}");

    // psql: command tags, rows, and SQLSTATEs.
    let (ok, out, err) = psql(
        &server,
        "CREATE CONTINUOUS QUERY hot ON WRITE HEALTH WARN WHEN value > 50 AS SELECT host AS component, max(usage) AS value FROM cpu GROUP BY host",
    );
    assert!(ok, "{err}");
    assert!(out.contains("CREATE CONTINUOUS QUERY"), "{out}");
    let (ok, out, err) = psql(&server, "SHOW CONTINUOUS QUERIES");
    assert!(ok, "{err}");
    assert!(out.contains("hot,ON WRITE,HEALTH"), "{out}");
    let (ok, _, err) = psql(
        &server,
        "CREATE CONTINUOUS QUERY hot ON WRITE HEALTH WARN WHEN value > 50 AS SELECT host AS component, max(usage) AS value FROM cpu GROUP BY host",
    );
    assert!(!ok && err.contains("42710"), "{err}");
    let (ok, _, err) = psql(&server, "CREATE CONTINUOUS QUERY q EVERY '1m' INTO x");
    assert!(!ok && err.contains("42601"), "{err}");
    let (ok, _, err) = psql(&server, "DROP CONTINUOUS QUERY nosuch");
    assert!(!ok && err.contains("42704"), "{err}");
    let (ok, out, err) = psql(
        &server,
        "SELECT name, schedule FROM system.continuous_queries ORDER BY name",
    );
    assert!(ok, "{err}");
    assert_eq!(
        out.trim(),
        "cpu_5m,EVERY 20s\ndeclared,EVERY 1m\nhot,ON WRITE"
    );

    // The health check ran on the write that created its data; its figures are on /metrics.
    write(
        &server,
        &format!("cpu,host=h0,dc=eu usage=99,n=0i {}", now()),
    );
    eventually("a health verdict for h0", Duration::from_secs(30), || {
        let (_, health) = get_json(&server.url("/api/v1/health"));
        health["components"]["h0"]["status"] == "warn"
    });
    let (_, metrics) = crate::harness::get_text(&server.url("/metrics"));
    assert!(
        metrics.contains("forestall_cq_runs_total{query=\"hot\"}"),
        "{metrics}"
    );
    assert_eq!(delete(&url), 204);
    assert_eq!(delete(&url), 404);
    assert!(server.terminate().success());

    // The config changed: the declared query is replaced; one made over SQL is kept.
    std::fs::write(&config, declared("2m")).unwrap();
    let server = start(&data);
    assert_eq!(list(&server), vec!["declared", "hot"]);
    let (_, declared_now) = get_json(&server.url("/api/v1/continuous_queries/declared"));
    assert_eq!(declared_now["definition"]["every"], "2m");
    assert!(server.terminate().success());
    // No longer declared: dropped.
    std::fs::write(&config, "").unwrap();
    let server = start(&data);
    assert_eq!(list(&server), vec!["hot"]);
    assert!(server.terminate().success());
}
