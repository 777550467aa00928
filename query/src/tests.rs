use super::*;
use arrow::util::pretty::pretty_format_batches;
use forestall_engine::{EngineConfig, Precision};

/// 2026-01-01T00:00:00Z
const T0: i64 = 1_767_225_600_000_000_000;
const MIN: i64 = 60_000_000_000;

fn store() -> (tempfile::TempDir, Arc<Store>) {
    let dir = tempfile::tempdir().unwrap();
    let config = EngineConfig {
        data_dir: dir.path().to_path_buf(),
        ..Default::default()
    };
    (dir, Arc::new(Store::open(config).unwrap()))
}

fn write(store: &Store, body: &str) {
    let o = store
        .write(body.as_bytes(), Precision::Nanoseconds, T0)
        .unwrap();
    assert_eq!(o.rejected_lines, 0, "{:?}", o.errors);
}

/// Three hosts, one point a minute for an hour; usage = minute + host number.
fn fill(store: &Store) {
    let mut body = String::new();
    for m in 0..60 {
        for h in 0..3 {
            body.push_str(&format!(
                "cpu,host=h{h},region={} usage={} {}\n",
                if h == 2 { "us" } else { "eu" },
                m + h,
                T0 + m * MIN
            ));
        }
    }
    write(store, &body);
}

async fn table(engine: &QueryEngine, sql: &str) -> String {
    let (_, batches) = engine
        .sql(sql)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"));
    pretty_format_batches(&batches).unwrap().to_string()
}

async fn scalar(engine: &QueryEngine, sql: &str) -> String {
    let (_, batches) = engine
        .sql(sql)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"));
    let b = &batches[0];
    arrow::util::display::array_value_to_string(b.column(0), 0).unwrap()
}

#[tokio::test]
async fn filters_aggregates_and_time_buckets_over_buffer_and_segments() {
    let (_dir, store) = store();
    fill(&store);
    let engine = QueryEngine::new(Arc::clone(&store));
    assert_eq!(scalar(&engine, "SELECT count(*) FROM cpu").await, "180");
    store.flush().unwrap();
    // Half of the data in a segment, the rest in the buffer.
    write(
        &store,
        &format!("cpu,host=h0,region=eu usage=1000 {}", T0 + 60 * MIN),
    );
    assert_eq!(scalar(&engine, "SELECT count(*) FROM cpu").await, "181");
    assert_eq!(
        scalar(&engine, "SELECT max(usage) FROM cpu WHERE host = 'h0'").await,
        "1000.0"
    );
    assert_eq!(
        scalar(
            &engine,
            "SELECT count(*) FROM cpu WHERE host IN ('h1', 'h2') AND time >= '2026-01-01T00:30:00Z'"
        )
        .await,
        "60"
    );
    assert_eq!(
        scalar(&engine, "SELECT count(*) FROM cpu WHERE region != 'eu'").await,
        "60"
    );
    assert_eq!(
        scalar(
            &engine,
            "SELECT count(*) FROM cpu WHERE host LIKE 'h_' AND host ~ '^h[01]$'"
        )
        .await,
        "121"
    );
    assert_eq!(
        scalar(&engine, "SELECT count(*) FROM cpu WHERE host NOT IN ('h0')").await,
        "120"
    );
    assert_eq!(
        scalar(&engine, "SELECT count(*) FROM cpu WHERE time BETWEEN '2026-01-01T00:10:00Z' AND '2026-01-01T00:19:00Z'").await,
        "30"
    );
    let buckets = table(
        &engine,
        "SELECT date_bin(INTERVAL '20 minutes', time) AS bucket, avg(usage) AS avg \
         FROM cpu WHERE host = 'h1' AND time < '2026-01-01T01:00:00Z' GROUP BY bucket ORDER BY bucket",
    )
    .await;
    assert_eq!(
        buckets.trim(),
        "+---------------------+------+\n\
         | bucket              | avg  |\n\
         +---------------------+------+\n\
         | 2026-01-01T00:00:00 | 10.5 |\n\
         | 2026-01-01T00:20:00 | 30.5 |\n\
         | 2026-01-01T00:40:00 | 50.5 |\n\
         +---------------------+------+"
    );
}

#[tokio::test]
async fn relative_time_filters_and_empty_ranges() {
    let (_dir, store) = store();
    let now = forestall_engine::store::now_nanos();
    write(
        &store,
        &format!(
            "m,host=a v=1 {}\nm,host=a v=2 {}",
            now - 2 * 3_600_000_000_000,
            now - MIN
        ),
    );
    let engine = QueryEngine::new(Arc::clone(&store));
    assert_eq!(
        scalar(
            &engine,
            "SELECT count(*) FROM m WHERE time > now() - INTERVAL '1 hour'"
        )
        .await,
        "1"
    );
    assert_eq!(
        scalar(
            &engine,
            "SELECT count(*) FROM m WHERE time > now() AND time < now() - INTERVAL '1 hour'"
        )
        .await,
        "0"
    );
}

#[tokio::test]
async fn schema_evolution_and_information_schema() {
    let (_dir, store) = store();
    write(&store, &format!("cpu,host=a usage=1 {T0}"));
    store.flush().unwrap();
    write(
        &store,
        &format!("cpu,host=a,dc=x usage=2,temp=30i {}", T0 + MIN),
    );
    let engine = QueryEngine::new(Arc::clone(&store));
    let t = table(&engine, "SELECT time, dc, temp FROM cpu ORDER BY time").await;
    assert!(t.contains("| 2026-01-01T00:00:00 |    |      |"), "{t}");
    assert!(t.contains("| 2026-01-01T00:01:00 | x  | 30   |"), "{t}");
    let tables = table(&engine, "SHOW TABLES").await;
    assert!(
        tables.contains("| forestall     | public             | cpu"),
        "{tables}"
    );
    let cols = table(&engine, "SHOW COLUMNS FROM cpu").await;
    for c in ["time", "host", "dc", "usage", "temp"] {
        assert!(cols.contains(&format!("| {c} ")), "{c} in {cols}");
    }
    // A table created after the session's schema provider was made is still found.
    write(&store, &format!("later v=1 {T0}"));
    assert_eq!(scalar(&engine, "SELECT count(*) FROM later").await, "1");
}

#[tokio::test]
async fn bad_queries_are_query_errors() {
    let (_dir, store) = store();
    fill(&store);
    let engine = QueryEngine::new(store);
    for (sql, needle) in [
        ("SELEC 1", "Expected"),
        ("SELECT * FROM nope", "nope"),
        ("SELECT nope FROM cpu", "nope"),
        ("SELECT usage + 'x' FROM cpu", ""),
    ] {
        match engine.sql(sql).await {
            Err(Error::Query(m)) => assert!(m.contains(needle), "{sql}: {m}"),
            Err(other) => panic!("{sql}: expected a query error, got {other}"),
            Ok(_) => {
                // DataFusion may coerce some of these; it must not crash.
            }
        }
    }
}
