use super::*;
use axum::http::Request;
use forestall_engine::{EngineConfig, ScanRequest};
use std::io::Write;
use tower::ServiceExt;

struct Fixture {
    _dir: tempfile::TempDir,
    store: Arc<Store>,
    app: Router,
}

fn fixture(max_body_bytes: u64) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let config = crate::config::ServerConfig {
        engine: EngineConfig {
            data_dir: dir.path().to_path_buf(),
            ..Default::default()
        },
        http: crate::config::HttpConfig {
            max_body_bytes,
            ..Default::default()
        },
        query: crate::config::QueryConfig {
            max_result_rows: 1000,
            ..Default::default()
        },
        ..Default::default()
    };
    let store = Arc::new(Store::open(config.engine.clone()).unwrap());
    let app = router(AppState::new(Arc::clone(&store), &config));
    Fixture {
        _dir: dir,
        store,
        app,
    }
}

async fn send(app: &Router, req: Request<Body>) -> (StatusCode, serde_json::Value) {
    let resp = app.clone().oneshot(req).await.unwrap();
    let status = resp.status();
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    let json = if bytes.is_empty() {
        serde_json::Value::Null
    } else {
        serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::String(
            String::from_utf8_lossy(&bytes).into(),
        ))
    };
    (status, json)
}

fn post(uri: &str, body: impl Into<Body>) -> Request<Body> {
    Request::post(uri).body(body.into()).unwrap()
}

fn rows(store: &Store, measurement: &str) -> usize {
    match store.scan(&ScanRequest::all(measurement)) {
        Ok(s) => s.map(|b| b.unwrap().num_rows()).sum(),
        Err(_) => 0,
    }
}

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    e.write_all(data).unwrap();
    e.finish().unwrap()
}

#[tokio::test]
async fn v2_and_v1_writes_store_points() {
    let f = fixture(1 << 20);
    let (s, body) = send(
        &f.app,
        post(
            "/api/v2/write?org=o&bucket=b&precision=s",
            "cpu,host=a usage=1 1700000000\n",
        ),
    )
    .await;
    assert_eq!(s, StatusCode::NO_CONTENT, "{body}");
    let (s, _) = send(
        &f.app,
        post(
            "/write?db=x&precision=ms",
            "cpu,host=b usage=2 1700000000000",
        ),
    )
    .await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    let (s, _) = send(
        &f.app,
        post("/write?db=x&precision=h", "cpu,host=c usage=3 472222"),
    )
    .await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    assert_eq!(rows(&f.store, "cpu"), 3);
}

#[tokio::test]
async fn partial_write_stores_valid_lines_and_lists_the_rest() {
    let f = fixture(1 << 20);
    let body = "m,host=a v=1 1\nm,host=a v=oops 2\n\n# comment\nm v=\"s\" 3\nm,host=b v=4 4\n";
    let (s, json) = send(&f.app, post("/api/v2/write", body)).await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert_eq!(json["code"], "invalid");
    assert_eq!(json["accepted_lines"], 2);
    assert_eq!(json["rejected_lines"], 2);
    assert_eq!(json["line_errors"][0]["line"], 2);
    assert!(
        json["line_errors"][0]["error"]
            .as_str()
            .unwrap()
            .contains("invalid number"),
        "{json}"
    );
    assert_eq!(json["line_errors"][1]["line"], 5);
    assert!(
        json["line_errors"][1]["error"]
            .as_str()
            .unwrap()
            .contains("is float, got string"),
        "{json}"
    );
    assert!(
        json["error"]
            .as_str()
            .unwrap()
            .contains("2 of 4 lines rejected"),
        "{json}"
    );
    assert_eq!(rows(&f.store, "m"), 2);
}

#[tokio::test]
async fn many_bad_lines_are_counted_and_the_list_is_capped() {
    let f = fixture(1 << 20);
    let body: String = (0..500).map(|i| format!("bad{i}\n")).collect();
    let (s, json) = send(&f.app, post("/write", body)).await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert_eq!(json["rejected_lines"], 500);
    assert_eq!(
        json["line_errors"].as_array().unwrap().len(),
        forestall_engine::store::MAX_LISTED_ERRORS
    );
    assert!(json["error"].as_str().unwrap().contains("first 100 listed"));
}

#[tokio::test]
async fn bad_precision_is_rejected_before_anything_is_stored() {
    let f = fixture(1 << 20);
    let (s, json) = send(&f.app, post("/api/v2/write?precision=h", "m v=1 1")).await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert!(
        json["error"]
            .as_str()
            .unwrap()
            .contains("invalid precision \"h\"")
    );
    let (s, _) = send(&f.app, post("/write?precision=fortnight", "m v=1 1")).await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert_eq!(rows(&f.store, "m"), 0);
}

#[tokio::test]
async fn gzip_bodies_are_decoded_and_bad_gzip_is_a_400() {
    let f = fixture(1 << 20);
    let req = Request::post("/api/v2/write")
        .header("content-encoding", "gzip")
        .body(Body::from(gzip(b"m v=1 1\nm v=2 2")))
        .unwrap();
    let (s, _) = send(&f.app, req).await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    assert_eq!(rows(&f.store, "m"), 2);

    let req = Request::post("/api/v2/write")
        .header("content-encoding", "gzip")
        .body(Body::from("not gzip at all"))
        .unwrap();
    let (s, json) = send(&f.app, req).await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert!(
        json["error"].as_str().unwrap().contains("invalid gzip"),
        "{json}"
    );

    let mut truncated = gzip(b"m v=3 3\nm v=4 4\nm v=5 5");
    truncated.truncate(truncated.len() - 6);
    let req = Request::post("/api/v2/write")
        .header("content-encoding", "gzip")
        .body(Body::from(truncated))
        .unwrap();
    let (s, json) = send(&f.app, req).await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{json}");
    assert_eq!(
        rows(&f.store, "m"),
        2,
        "nothing from a truncated gzip body is stored"
    );

    let req = Request::post("/api/v2/write")
        .header("content-encoding", "br")
        .body(Body::from("m v=1"))
        .unwrap();
    let (s, json) = send(&f.app, req).await;
    assert_eq!(s, StatusCode::UNSUPPORTED_MEDIA_TYPE);
    assert_eq!(json["code"], "unsupported media type");
}

#[tokio::test]
async fn oversized_bodies_and_gzip_bombs_get_413() {
    let f = fixture(4096);
    let big = "m v=1 1\n".repeat(1000);
    let (s, json) = send(&f.app, post("/write", big.clone())).await;
    assert_eq!(s, StatusCode::PAYLOAD_TOO_LARGE);
    assert!(json["error"].as_str().unwrap().contains("4096"));
    // Small when compressed, too big once decompressed.
    let bomb = gzip(big.as_bytes());
    assert!(bomb.len() < 4096);
    let req = Request::post("/write")
        .header("content-encoding", "gzip")
        .body(Body::from(bomb))
        .unwrap();
    let (s, _) = send(&f.app, req).await;
    assert_eq!(s, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(rows(&f.store, "m"), 0);
}

#[tokio::test]
async fn hostile_bodies_never_break_the_server() {
    let f = fixture(1 << 20);
    let bodies: Vec<Vec<u8>> = vec![
        vec![0xff; 100],
        b"\0\0\0".to_vec(),
        "m,".repeat(10_000).into_bytes(),
        format!("m {}=1", "k".repeat(50_000)).into_bytes(),
        b"m v=\"unterminated".to_vec(),
        b"\r\n\r\n\r\n".to_vec(),
        (0..=255u8).collect(),
    ];
    for b in bodies {
        let (s, json) = send(&f.app, post("/api/v2/write", b)).await;
        assert!(
            s == StatusCode::BAD_REQUEST || s == StatusCode::NO_CONTENT,
            "{s} {json}"
        );
        if s == StatusCode::BAD_REQUEST {
            assert_eq!(json["code"], "invalid");
        }
    }
    let (s, json) = send(&f.app, Request::get("/health").body(Body::empty()).unwrap()).await;
    assert_eq!((s, json["status"].as_str()), (StatusCode::OK, Some("pass")));
}

#[tokio::test]
async fn unknown_routes_and_methods_answer_json() {
    let f = fixture(1 << 20);
    let (s, json) = send(&f.app, Request::get("/nope").body(Body::empty()).unwrap()).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    assert_eq!(json["code"], "not found");
    let (s, json) = send(
        &f.app,
        Request::get("/api/v2/write").body(Body::empty()).unwrap(),
    )
    .await;
    assert_eq!(s, StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(json["code"], "method not allowed");
}

#[tokio::test]
async fn metrics_count_what_happened() {
    let f = fixture(1 << 20);
    send(&f.app, post("/write", "m,host=a v=1,w=2 1\nbad\n")).await;
    f.store.flush().unwrap();
    let resp = f
        .app
        .clone()
        .oneshot(Request::get("/metrics").body(Body::empty()).unwrap())
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert!(
        resp.headers()[header::CONTENT_TYPE]
            .to_str()
            .unwrap()
            .starts_with("text/plain")
    );
    let text = String::from_utf8(
        resp.into_body()
            .collect()
            .await
            .unwrap()
            .to_bytes()
            .to_vec(),
    )
    .unwrap();
    for expected in [
        "forestall_points_written_total 1",
        "forestall_values_written_total 2",
        "forestall_lines_rejected_total 1",
        "forestall_flushes_total 1",
        "forestall_segments 1",
        "# TYPE forestall_wal_syncs_total counter",
        "# TYPE forestall_segments gauge",
    ] {
        assert!(
            text.lines().any(|l| l == expected),
            "missing {expected:?} in\n{text}"
        );
    }
}

#[tokio::test]
async fn writes_after_shutdown_get_503() {
    let f = fixture(1 << 20);
    f.store.shutdown().unwrap();
    let (s, json) = send(&f.app, post("/write", "m v=1")).await;
    assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(json["code"], "unavailable");
}

#[tokio::test]
async fn admin_flush_and_compact() {
    let f = fixture(1 << 20);
    // The segments of `m` (the audit trail's own points are flushed beside them).
    let segments = |store: &Store| {
        store
            .segments()
            .iter()
            .filter(|s| s.meta.measurement == "m")
            .count()
    };
    for i in 0..3 {
        send(&f.app, post("/write", format!("m,host=a v={i} {i}"))).await;
        let (s, json) = send(&f.app, post("/api/v1/admin/flush", "")).await;
        assert_eq!(s, StatusCode::OK);
        assert!(json["segments"].as_u64() >= Some(i as u64 + 1), "{json}");
        assert_eq!(segments(&f.store), i + 1);
    }
    let (s, json) = send(&f.app, post("/api/v1/admin/compact", "")).await;
    assert_eq!(s, StatusCode::OK, "{json}");
    assert!(json["compacted_partitions"].as_u64() >= Some(1), "{json}");
    assert_eq!(segments(&f.store), 1);
    assert_eq!(rows(&f.store, "m"), 3);
    // Each of the four is in the audit trail.
    assert_eq!(rows(&f.store, forestall_engine::audit::MEASUREMENT), 4);
}

#[tokio::test]
async fn retention_is_set_per_measurement_and_validated() {
    let f = fixture(1 << 20);
    send(&f.app, post("/write", "cpu v=1 1\nmem v=1 1")).await;
    let put = |uri: &str, body: &'static str| Request::put(uri).body(Body::from(body)).unwrap();
    let (s, json) = send(&f.app, put("/api/v1/retention/cpu", r#"{"period": "30d"}"#)).await;
    assert_eq!(s, StatusCode::OK, "{json}");
    let cpu = json["measurements"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["measurement"] == "cpu")
        .unwrap();
    assert_eq!(cpu["period"], "30days");
    assert_eq!(
        f.store.table("cpu").unwrap().retention,
        Some(std::time::Duration::from_secs(30 * 86_400))
    );
    assert_eq!(f.store.table("mem").unwrap().retention, None);

    let (s, json) = send(&f.app, put("/api/v1/retention/cpu", r#"{"period": null}"#)).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(f.store.table("cpu").unwrap().retention, None);
    assert!(json["default"].is_null());

    for (body, needle) in [
        (r#"{"period": "soon"}"#, "invalid period"),
        (r#"{"period": "1h"}"#, "shorter than one partition"),
        (r#"{"perod": "30d"}"#, "expected"),
        ("not json", "expected"),
    ] {
        let (s, json) = send(&f.app, put("/api/v1/retention/cpu", body)).await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{body}");
        assert!(
            json["error"].as_str().unwrap().contains(needle),
            "{body}: {json}"
        );
    }
    let (s, _) = send(
        &f.app,
        put("/api/v1/retention/nope", r#"{"period": "30d"}"#),
    )
    .await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    let (s, json) = send(
        &f.app,
        Request::get("/api/v1/retention")
            .body(Body::empty())
            .unwrap(),
    )
    .await;
    assert_eq!(s, StatusCode::OK);
    // cpu, mem, and the audit trail of the changes above (whose retention is set the same way).
    let names: Vec<&str> = json["measurements"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|m| m["measurement"].as_str())
        .collect();
    assert_eq!(names.len(), 3, "{json}");
    assert!(
        names.contains(&forestall_engine::audit::MEASUREMENT),
        "{json}"
    );
}

async fn get_text(app: &Router, uri: &str) -> (StatusCode, String, String) {
    let resp = app
        .clone()
        .oneshot(Request::get(uri).body(Body::empty()).unwrap())
        .await
        .unwrap();
    let status = resp.status();
    let ct = resp
        .headers()
        .get(header::CONTENT_TYPE)
        .map(|v| v.to_str().unwrap().to_string())
        .unwrap_or_default();
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    (status, ct, String::from_utf8_lossy(&bytes).into_owned())
}

fn q(sql: &str, format: &str) -> String {
    let mut enc = String::new();
    for b in sql.bytes() {
        if b.is_ascii_alphanumeric() {
            enc.push(b as char);
        } else {
            enc.push_str(&format!("%{b:02X}"));
        }
    }
    format!("/api/v3/query_sql?q={enc}&format={format}")
}

#[tokio::test]
async fn sql_results_in_every_format() {
    let f = fixture(1 << 20);
    send(
        &f.app,
        post(
            "/write",
            "cpu,host=a usage=1.5 1767225600000000000\ncpu,host=b usage=2.5 1767225660000000000",
        ),
    )
    .await;
    let sql = "SELECT host, usage FROM cpu ORDER BY host";
    let (s, ct, body) = get_text(&f.app, &q(sql, "json")).await;
    assert_eq!((s, ct.as_str()), (StatusCode::OK, "application/json"));
    let json: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        json,
        serde_json::json!([{"host": "a", "usage": 1.5}, {"host": "b", "usage": 2.5}])
    );
    let (_, _, body) = get_text(&f.app, &q(sql, "jsonl")).await;
    assert_eq!(
        body,
        "{\"host\":\"a\",\"usage\":1.5}\n{\"host\":\"b\",\"usage\":2.5}\n"
    );
    let (_, ct, body) = get_text(&f.app, &q(sql, "csv")).await;
    assert!(ct.starts_with("text/csv"));
    assert_eq!(body, "host,usage\na,1.5\nb,2.5\n");
    let (_, _, body) = get_text(&f.app, &q(sql, "pretty")).await;
    assert!(body.contains("| a    | 1.5   |"), "{body}");
    let (s, ct, body) = get_text(&f.app, &q(sql, "parquet")).await;
    assert_eq!(
        (s, ct.as_str()),
        (StatusCode::OK, "application/vnd.apache.parquet")
    );
    assert!(body.starts_with("PAR1"));
    // POST with a JSON body; an empty result is still valid JSON.
    let req = Request::post("/api/v3/query_sql")
        .body(Body::from(
            r#"{"q": "SELECT * FROM cpu WHERE host = 'zz'", "format": "json", "db": "x"}"#,
        ))
        .unwrap();
    let (s, json) = send(&f.app, req).await;
    assert_eq!((s, json), (StatusCode::OK, serde_json::json!([])));
}

#[tokio::test]
async fn bad_sql_gets_400_with_the_reason() {
    let f = fixture(1 << 20);
    send(&f.app, post("/write", "cpu,host=a usage=1 1")).await;
    for (sql, needle) in [
        ("SELEC 1", "Expected"),
        ("SELECT * FROM nope", "nope"),
        ("SELECT nope FROM cpu", "nope"),
    ] {
        let (s, _, body) = get_text(&f.app, &q(sql, "json")).await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{sql}: {body}");
        let json: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(json["code"], "invalid");
        assert!(
            json["error"].as_str().unwrap().contains(needle),
            "{sql}: {body}"
        );
    }
    let (s, _, body) = get_text(&f.app, &q("SELECT 1", "xml")).await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert!(body.contains("unknown format"));
    let (s, _, _) = get_text(&f.app, "/api/v3/query_sql").await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    let (s, json) = send(
        &f.app,
        Request::post("/api/v3/query_sql")
            .body(Body::from("SELECT 1"))
            .unwrap(),
    )
    .await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{json}");
}

#[tokio::test]
async fn huge_results_are_refused_not_sent() {
    let f = fixture(1 << 20);
    let body: String = (0..1500).map(|i| format!("m v={i} {i}\n")).collect();
    send(&f.app, post("/write", body)).await;
    let (s, _, body) = get_text(&f.app, &q("SELECT * FROM m", "json")).await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert!(body.contains("more than 1000 rows"), "{body}");
    let (s, _, _) = get_text(&f.app, &q("SELECT * FROM m LIMIT 10", "json")).await;
    assert_eq!(s, StatusCode::OK);
}

fn remote_write(body: Vec<u8>) -> Request<Body> {
    Request::post("/api/v1/write")
        .header(header::CONTENT_TYPE, "application/x-protobuf")
        .header(header::CONTENT_ENCODING, "snappy")
        .header("X-Prometheus-Remote-Write-Version", "0.1.0")
        .body(Body::from(body))
        .unwrap()
}

fn snappy(pb: &[u8]) -> Vec<u8> {
    snap::raw::Encoder::new().compress_vec(pb).unwrap()
}

#[tokio::test]
async fn prometheus_remote_write_stores_samples_that_sql_reads_back() {
    use forestall_engine::prometheus::{STALE_NAN_BITS, encode};
    let f = fixture(1 << 20);
    let pb = encode(&[
        (
            vec![
                ("__name__", "node_load1"),
                ("instance", "h:9100"),
                ("job", "node"),
            ],
            // Out of order; a stale marker and a NaN are dropped and counted.
            vec![
                (0.5, 1_700_000_060_000),
                (0.25, 1_700_000_000_000),
                (f64::from_bits(STALE_NAN_BITS), 1_700_000_120_000),
                (f64::NAN, 1_700_000_180_000),
            ],
        ),
        (
            vec![("__name__", "up"), ("job", "node")],
            vec![(1.0, 1_700_000_000_000)],
        ),
    ]);
    let (s, body) = send(&f.app, remote_write(snappy(&pb))).await;
    assert_eq!(s, StatusCode::NO_CONTENT, "{body}");
    assert_eq!(rows(&f.store, "node_load1"), 2);
    assert_eq!(rows(&f.store, "up"), 1);
    let (s, _, text) = get_text(
        &f.app,
        &q(
            "SELECT time, instance, job, value FROM node_load1 ORDER BY time",
            "csv",
        ),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{text}");
    assert_eq!(
        text,
        "time,instance,job,value\n2023-11-14T22:13:20,h:9100,node,0.25\n\
         2023-11-14T22:14:20,h:9100,node,0.5\n"
    );
    let (_, _, metrics) = get_text(&f.app, "/metrics").await;
    for line in [
        "forestall_remote_write_samples_total 3",
        "forestall_remote_write_stale_markers_total 1",
        "forestall_remote_write_non_finite_total 1",
    ] {
        assert!(metrics.contains(line), "{line} in {metrics}");
    }
}

#[tokio::test]
async fn remote_write_keeps_good_series_and_rejects_bad_input_whole() {
    use forestall_engine::prometheus::encode;
    let f = fixture(1 << 16);
    // A series without a name is listed; the other is stored.
    let pb = encode(&[
        (vec![("job", "x")], vec![(1.0, 1_700_000_000_000)]),
        (vec![("__name__", "ok")], vec![(2.0, 1_700_000_000_000)]),
    ]);
    let (s, body) = send(&f.app, remote_write(snappy(&pb))).await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert_eq!(body["stored_samples"], 1, "{body}");
    assert!(
        body["rejected_series"][0]
            .as_str()
            .unwrap()
            .contains("without a metric name"),
        "{body}"
    );
    assert_eq!(rows(&f.store, "ok"), 1);
    // A sample whose column already holds another type is rejected by the store.
    let (s, _) = send(&f.app, post("/api/v2/write", "typed value=1i 1\n")).await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    let pb = encode(&[(vec![("__name__", "typed")], vec![(2.5, 1_700_000_000_000)])]);
    let (s, body) = send(&f.app, remote_write(snappy(&pb))).await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert_eq!(body["stored_samples"], 0, "{body}");
    assert!(body["sample_errors"][0].is_string(), "{body}");
    // Not snappy, truncated snappy, snappy of a broken message, remote write 2.0, another
    // encoding, and a snappy block that claims more than the limit: nothing stored.
    let good = snappy(&encode(&[(vec![("__name__", "never")], vec![(1.0, 1)])]));
    let mut claims_huge = vec![0xff, 0xff, 0xff, 0x7f];
    claims_huge.extend_from_slice(&[0; 8]);
    let cases: Vec<(Request<Body>, StatusCode)> = vec![
        (
            remote_write(b"not snappy at all".to_vec()),
            StatusCode::BAD_REQUEST,
        ),
        (
            remote_write(good[..good.len() - 3].to_vec()),
            StatusCode::BAD_REQUEST,
        ),
        (
            remote_write(snappy(&[0x0a, 0x05, 0x01])),
            StatusCode::BAD_REQUEST,
        ),
        (remote_write(Vec::new()), StatusCode::BAD_REQUEST),
        (remote_write(claims_huge), StatusCode::PAYLOAD_TOO_LARGE),
        (
            remote_write(vec![0; 1 << 17]),
            StatusCode::PAYLOAD_TOO_LARGE,
        ),
        (
            Request::post("/api/v1/write")
                .header(
                    header::CONTENT_TYPE,
                    "application/x-protobuf;proto=io.prometheus.write.v2.Request",
                )
                .header(header::CONTENT_ENCODING, "snappy")
                .body(Body::from(good.clone()))
                .unwrap(),
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
        ),
        (
            Request::post("/api/v1/write")
                .header(header::CONTENT_ENCODING, "gzip")
                .body(Body::from(gzip(&good)))
                .unwrap(),
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
        ),
    ];
    for (i, (req, want)) in cases.into_iter().enumerate() {
        let (s, body) = send(&f.app, req).await;
        assert_eq!(s, want, "case {i}: {body}");
        assert!(body["error"].is_string(), "case {i}: {body}");
    }
    assert_eq!(rows(&f.store, "never"), 0);
    // The server still takes a good request after all that.
    let (s, _) = send(&f.app, remote_write(good)).await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    assert_eq!(rows(&f.store, "never"), 1);
}

/// A fixture whose every request needs a token, with one token per permission.
struct Guarded {
    fixture: Fixture,
    tokens: crate::auth::Tokens,
}

fn guarded() -> Guarded {
    let fixture = fixture(1 << 20);
    let tokens = crate::auth::Tokens::load(fixture.store.entries()).unwrap();
    let config = crate::config::ServerConfig::default();
    let mut state = AppState::new(Arc::clone(&fixture.store), &config);
    state.tokens = Some(tokens.clone());
    state.auth_required = true;
    Guarded {
        fixture: Fixture {
            app: router(state),
            ..fixture
        },
        tokens,
    }
}

impl Guarded {
    fn token(&self, name: &str, permissions: &[&str]) -> String {
        let spec = crate::auth::TokenSpec {
            name: name.into(),
            permissions: permissions.iter().map(|p| p.to_string()).collect(),
            expires: None,
        };
        self.tokens.create(&spec, false).unwrap().0
    }

    async fn call(&self, method: &str, uri: &str, token: Option<&str>, body: &str) -> StatusCode {
        let mut req = Request::builder().method(method).uri(uri);
        if let Some(t) = token {
            req = req.header("Authorization", format!("Bearer {t}"));
        }
        let req = req.body(Body::from(body.to_string())).unwrap();
        let resp = self.fixture.app.clone().oneshot(req).await.unwrap();
        if resp.status() == StatusCode::UNAUTHORIZED {
            assert!(
                resp.headers().contains_key(header::WWW_AUTHENTICATE),
                "{method} {uri}"
            );
        }
        resp.status()
    }
}

#[tokio::test]
async fn with_auth_on_every_endpoint_but_health_checks_the_token_and_its_permission() {
    let g = guarded();
    let root = g.token("root", &["*"]);
    let write = g.token("w", &["write"]);
    let query = g.token("q", &["query"]);
    let admin = g.token("a", &["admin"]);
    let actuate = g.token("act", &["actuate"]);
    let revoked = g.token("gone", &["*"]);
    g.tokens.revoke("gone").unwrap();
    let sql = r#"{"q": "SELECT 1"}"#;
    // (method, path, body, the one scoped token that may)
    let routes: &[(&str, &str, &str, &str)] = &[
        ("POST", "/api/v2/write", "m f=1", &write),
        ("POST", "/write", "m f=1", &write),
        ("POST", "/api/v1/write", "", &write),
        ("GET", "/api/v3/query_sql?q=SELECT%201", "", &query),
        ("POST", "/api/v3/query_sql", sql, &query),
        ("GET", "/metrics", "", &query),
        ("GET", "/api/v1/retention", "", &query),
        ("GET", "/api/v1/continuous_queries", "", &query),
        ("GET", "/api/v1/health", "", &query),
        ("GET", "/api/v1/targets", "", &query),
        ("GET", "/api/v1/risks", "", &query),
        ("GET", "/api/v1/preferences", "", &query),
        ("POST", "/api/v1/admin/flush", "", &admin),
        ("POST", "/api/v1/admin/compact", "", &admin),
        ("PUT", "/api/v1/retention/m", r#"{"period": null}"#, &admin),
        ("PUT", "/api/v1/continuous_queries/x", "{}", &admin),
        ("DELETE", "/api/v1/continuous_queries/x", "", &admin),
        ("POST", "/api/v1/continuous_queries/x/run", "", &admin),
        ("PUT", "/api/v1/preferences/web", "{}", &actuate),
        ("GET", "/api/v1/tokens", "", &root),
        ("POST", "/api/v1/tokens", "{}", &root),
        ("DELETE", "/api/v1/tokens/nobody", "", &root),
    ];
    let scoped = [write.as_str(), &query, &admin, &actuate];
    for &(method, path, body, allowed) in routes {
        let what = format!("{method} {path}");
        assert_eq!(
            g.call(method, path, None, body).await,
            StatusCode::UNAUTHORIZED,
            "{what}"
        );
        assert_eq!(
            g.call(method, path, Some("fst_not_a_token"), body).await,
            StatusCode::UNAUTHORIZED,
            "{what}"
        );
        assert_eq!(
            g.call(method, path, Some(&revoked), body).await,
            StatusCode::UNAUTHORIZED,
            "{what}"
        );
        for token in scoped.iter().filter(|t| **t != allowed) {
            assert_eq!(
                g.call(method, path, Some(token), body).await,
                StatusCode::FORBIDDEN,
                "{what} with another scope"
            );
        }
        for token in [allowed, root.as_str()] {
            let status = g.call(method, path, Some(token), body).await;
            assert!(
                status != StatusCode::UNAUTHORIZED && status != StatusCode::FORBIDDEN,
                "{what}: {status}"
            );
        }
    }
    // /health and the console's files need nothing.
    for path in ["/health", "/", "/console/app.js", "/console/app.css"] {
        assert_eq!(
            g.call("GET", path, None, "").await,
            StatusCode::OK,
            "{path}"
        );
    }
    // Without a loopback peer (this test has none), even the first token needs a token.
    let g = guarded();
    let body = r#"{"name": "root", "permissions": ["*"]}"#;
    assert_eq!(
        g.call("POST", "/api/v1/tokens", None, body).await,
        StatusCode::UNAUTHORIZED
    );
}

#[tokio::test]
async fn a_write_token_for_some_measurements_writes_those_and_nothing_else() {
    let g = guarded();
    let cpu = g.token("cpu-only", &["write:cpu", "write:disk io"]);
    let write = |body: &'static str| {
        let g = &g;
        let cpu = cpu.clone();
        async move { g.call("POST", "/api/v2/write", Some(&cpu), body).await }
    };
    assert_eq!(
        write("cpu u=1 1\ndisk\\ io r=2 1").await,
        StatusCode::NO_CONTENT
    );
    assert_eq!(rows(&g.fixture.store, "cpu"), 1);
    assert_eq!(rows(&g.fixture.store, "disk io"), 1);
    // One line of another measurement refuses the whole body: nothing of it is stored.
    assert_eq!(
        write("cpu u=2 2\nmem used=1 2").await,
        StatusCode::FORBIDDEN
    );
    assert_eq!(rows(&g.fixture.store, "cpu"), 1);
    assert_eq!(rows(&g.fixture.store, "mem"), 0);
    // Escapes are read as the store reads them: `cp\u` is not `cpu`.
    assert_eq!(write("cp\\u u=3 3").await, StatusCode::FORBIDDEN);
    // A malformed line is the usual partial write, not a permission question.
    assert_eq!(write("cpu u=4 4\ncpu").await, StatusCode::BAD_REQUEST);
    assert_eq!(rows(&g.fixture.store, "cpu"), 2);
}

#[tokio::test]
async fn a_query_token_cannot_create_continuous_queries_in_sql_nor_ddl_or_copy_anyone() {
    let g = guarded();
    let query = g.token("q", &["query"]);
    let root = g.token("root", &["*"]);
    let create = r#"{"q": "CREATE CONTINUOUS QUERY x EVERY '1m' INTO y AS SELECT date_bin(INTERVAL '1 minute', time) AS time, avg(u) AS u FROM cpu GROUP BY 1"}"#;
    assert_eq!(
        g.call("POST", "/api/v3/query_sql", Some(&query), create)
            .await,
        StatusCode::FORBIDDEN
    );
    // DataFusion's own DDL and DML are refused for every caller: they would read and write
    // files on the server.
    let dir = tempfile::tempdir().unwrap();
    let target = dir.path().join("out.csv");
    for sql in [
        format!(
            "COPY (SELECT 1 AS a) TO '{}' STORED AS CSV",
            target.display()
        ),
        "CREATE EXTERNAL TABLE p STORED AS CSV LOCATION '/etc/passwd'".to_string(),
        "CREATE TABLE t AS SELECT 1".to_string(),
    ] {
        let body = serde_json::json!({ "q": sql }).to_string();
        for token in [&query, &root] {
            assert_eq!(
                g.call("POST", "/api/v3/query_sql", Some(token), &body)
                    .await,
                StatusCode::BAD_REQUEST,
                "{sql}"
            );
        }
    }
    assert!(!target.exists());
}

#[tokio::test]
async fn a_query_beyond_the_concurrent_limit_waits_its_turn_then_gets_503_with_retry_after() {
    let dir = tempfile::tempdir().unwrap();
    let config = crate::config::ServerConfig {
        engine: EngineConfig {
            data_dir: dir.path().to_path_buf(),
            ..Default::default()
        },
        query: crate::config::QueryConfig {
            max_concurrent: Some(1),
            queue_timeout: std::time::Duration::from_millis(200),
            ..Default::default()
        },
        ..Default::default()
    };
    let store = Arc::new(Store::open(config.engine.clone()).unwrap());
    let app = router(AppState::new(Arc::clone(&store), &config));
    // More rows than the response buffers, so the first query's result streams and the
    // query keeps its slot while its client has not read it.
    let body: String = (0..20_000)
        .map(|i| format!("cpu,host=h{} v={i} {}\n", i % 10, 1_700_000_000 + i))
        .collect();
    let (s, _) = send(&app, post("/api/v2/write?precision=s", body)).await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    let query = || {
        Request::get("/api/v3/query_sql?format=csv&q=SELECT%20*%20FROM%20cpu")
            .body(Body::empty())
            .unwrap()
    };
    let streaming = app.clone().oneshot(query()).await.unwrap();
    assert_eq!(streaming.status(), StatusCode::OK);
    // The one slot is taken: the next query waits 200 ms for it, then is refused.
    let refused = app.clone().oneshot(query()).await.unwrap();
    assert_eq!(refused.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(refused.headers()[header::RETRY_AFTER], "1");
    let error = refused.into_body().collect().await.unwrap().to_bytes();
    let error = String::from_utf8_lossy(&error);
    assert!(
        error.contains("query.max_concurrent") && error.contains("try again"),
        "{error}"
    );
    // Other endpoints do not queue behind queries.
    let (s, _) = send(&app, Request::get("/health").body(Body::empty()).unwrap()).await;
    assert_eq!(s, StatusCode::OK);
    // Reading the whole result frees the slot; so does a client that goes away.
    let all = streaming.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(all.iter().filter(|&&b| b == b'\n').count(), 20_001);
    let unread = app.clone().oneshot(query()).await.unwrap();
    assert_eq!(unread.status(), StatusCode::OK);
    drop(unread);
    let (s, _) = send(&app, query()).await;
    assert_eq!(s, StatusCode::OK);
}

/// Remote-write bodies fuzzed with proptest: valid requests whose protobuf or whose snappy
/// block has bytes changed, cut out or put in. Each gets 204, 400 or 413 (never a 5xx, never
/// a panic), a refusal says why, and a 400 that stored part of a request says how much.
#[test]
fn mutated_remote_write_bodies_get_a_clear_answer() {
    use forestall_engine::prometheus::encode;
    use proptest::prelude::*;
    use proptest::test_runner::{Config, TestRunner};

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let f = fixture(1 << 16);
    let mutations = proptest::collection::vec(
        prop_oneof![
            (any::<usize>(), any::<u8>()).prop_map(|(at, b)| (at, 0usize, vec![b])),
            (any::<usize>(), 1usize..6).prop_map(|(at, n)| (at, n, Vec::new())),
            (any::<usize>(), proptest::collection::vec(any::<u8>(), 1..6))
                .prop_map(|(at, b)| (at, 0, b)),
        ],
        1..4,
    );
    let mut runner = TestRunner::new(Config {
        cases: 512,
        failure_persistence: None,
        ..Config::default()
    });
    let counter = std::sync::atomic::AtomicU64::new(0);
    runner
        .run(&(mutations, any::<bool>()), |(mutations, in_snappy)| {
            let i = counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed) as i64;
            let name = format!("fuzz_{}", i % 7);
            let pb = encode(&[
                (
                    vec![("__name__", name.as_str()), ("job", "node"), ("i", "x")],
                    vec![
                        (i as f64, 1_700_000_000_000 + i),
                        (0.5, 1_700_000_000_001 + i),
                    ],
                ),
                (
                    vec![("__name__", "fuzz_up")],
                    vec![(1.0, 1_700_000_000_000 + i)],
                ),
            ]);
            let mut bytes = if in_snappy { snappy(&pb) } else { pb };
            for (at, remove, insert) in &mutations {
                // (Replace `remove` bytes, or one when there is something to put in, by
                // `insert`.)
                let at = at % (bytes.len() + 1);
                let end = (at + remove.max(&usize::from(!insert.is_empty()))).min(bytes.len());
                bytes.splice(at..end, insert.iter().copied());
            }
            let body = if in_snappy { bytes } else { snappy(&bytes) };
            let (status, json) = rt.block_on(send(&f.app, remote_write(body)));
            prop_assert!(
                [
                    StatusCode::NO_CONTENT,
                    StatusCode::BAD_REQUEST,
                    StatusCode::PAYLOAD_TOO_LARGE
                ]
                .contains(&status),
                "{status}: {json}"
            );
            if status != StatusCode::NO_CONTENT {
                prop_assert!(
                    json["error"].as_str().is_some_and(|e| !e.is_empty()),
                    "{json}"
                );
            }
            if status == StatusCode::BAD_REQUEST && json.get("stored_samples").is_some() {
                prop_assert!(json["stored_samples"].as_u64().is_some(), "{json}");
            }
            Ok(())
        })
        .unwrap();
    // The server still takes a good request.
    let pb = encode(&[(vec![("__name__", "after")], vec![(1.0, 1_700_000_000_000)])]);
    let (status, _) = rt.block_on(send(&f.app, remote_write(snappy(&pb))));
    assert_eq!(status, StatusCode::NO_CONTENT);
    assert_eq!(rows(&f.store, "after"), 1);
}

/// `params` in `/api/v3/query_sql`, as InfluxDB 3 takes them: named and positional
/// placeholders, each value cast to its place's type (an integer for a float column, a string
/// for a time), values that stay values (no SQL gets in through them), and clear refusals.
#[tokio::test]
async fn query_params_bind_placeholders_by_name_and_position() {
    let f = fixture(1 << 20);
    let (s, _) = send(
        &f.app,
        post(
            "/api/v2/write?precision=s",
            "m,host=a usage=1.5,n=1i 1767225600\nm,host=a usage=7.5,n=2i 1767225660\n\
             m,host=b usage=9.5,n=3i 1767225720\nm,host=a'\\ OR\\ '1'\\='1 usage=1,n=4i 1767225780\n",
        ),
    )
    .await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    let ask = |body: serde_json::Value| post("/api/v3/query_sql", body.to_string());

    for body in [
        // Named, a float column compared with an integer, a time given as a string.
        serde_json::json!({
            "q": "SELECT count(*) AS c FROM m WHERE host = $host AND usage > $min AND time >= $from",
            "params": {"host": "a", "$min": 5, "from": "2026-01-01T00:01:00Z"},
        }),
        // Positional, with a boolean and a null.
        serde_json::json!({
            "q": "SELECT count(*) AS c FROM m WHERE n >= $1 AND (usage > $2) = $3 AND $4 IS NULL",
            "params": {"1": 2, "2": 8.0, "3": true, "4": null},
        }),
        // A value is a value: the quote inside it is data, matching the one host named so.
        serde_json::json!({
            "q": "SELECT count(*) AS c FROM m WHERE host = $h",
            "params": {"h": "a' OR '1'='1"},
        }),
    ] {
        let (s, json) = send(&f.app, ask(body.clone())).await;
        assert_eq!(s, StatusCode::OK, "{body}: {json}");
        assert_eq!(json[0]["c"].as_i64(), Some(1), "{body}: {json}");
    }
    // GET takes them as URL-encoded JSON.
    let uri = format!(
        "{}&params=%7B%22host%22%3A%22b%22%7D",
        q("SELECT count(*) AS c FROM m WHERE host = $host", "json")
    );
    let (s, _, text) = get_text(&f.app, &uri).await;
    assert_eq!(s, StatusCode::OK, "{text}");
    assert_eq!(text, r#"[{"c":1}]"#);

    // Refused, each with the reason.
    for (body, why) in [
        (
            serde_json::json!({"q": "SELECT * FROM m WHERE host = $host"}),
            "no value for the parameter $host",
        ),
        (
            serde_json::json!({"q": "SELECT * FROM m", "params": {"host": "a"}}),
            "$host is not in the statement",
        ),
        (
            serde_json::json!({"q": "SELECT * FROM m WHERE usage > $min", "params": {"min": "lots"}}),
            "parameter $min",
        ),
        (
            serde_json::json!({"q": "SELECT * FROM m WHERE host = $h", "params": {"h": ["a"]}}),
            "must be a string, number, boolean or null",
        ),
        (
            serde_json::json!({"q": "SELECT * FROM m WHERE host = $h", "params": {"h-x": "a"}}),
            "not a parameter name",
        ),
        (
            serde_json::json!({"q": "SELECT * FROM m", "params": ["a"]}),
            "expected a JSON body",
        ),
    ] {
        let (s, json) = send(&f.app, ask(body.clone())).await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{body}: {json}");
        assert!(
            json["error"].as_str().unwrap().contains(why),
            "{body}: {json}"
        );
    }
    let (s, _, text) = get_text(&f.app, &format!("{}&params=%5B1%5D", q("SELECT 1", "json"))).await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{text}");
    assert!(text.contains("params must be a JSON object"), "{text}");
}
