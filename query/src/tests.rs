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
    batches_and_table(engine, sql).await.1
}

/// The result of `sql`, and the same as a printed table (for assertion messages).
async fn batches_and_table(engine: &QueryEngine, sql: &str) -> (Vec<RecordBatch>, String) {
    let (_, batches) = engine
        .sql(sql)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"));
    let text = pretty_format_batches(&batches).unwrap().to_string();
    (batches, text)
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

/// Runs `sql` and returns the scan's metrics by name, after checking that `EXPLAIN ANALYZE`
/// prints them too.
async fn scan_metrics(engine: &QueryEngine, sql: &str) -> std::collections::HashMap<String, usize> {
    let text = table(engine, &format!("EXPLAIN ANALYZE {sql}")).await;
    assert!(text.contains("segments_pruned="), "{text}");
    let df = engine.session().sql(sql).await.unwrap();
    let ctx = df.task_ctx();
    let plan = df.create_physical_plan().await.unwrap();
    datafusion::physical_plan::collect(Arc::clone(&plan), Arc::new(ctx))
        .await
        .unwrap();
    fn find(
        plan: &Arc<dyn datafusion::physical_plan::ExecutionPlan>,
    ) -> Option<Arc<dyn datafusion::physical_plan::ExecutionPlan>> {
        if plan.name() == "ForestallScanExec" {
            return Some(Arc::clone(plan));
        }
        plan.children().into_iter().find_map(find)
    }
    let scan = find(&plan).expect("a scan in the plan");
    let metrics = scan.metrics().unwrap().aggregate_by_name();
    metrics
        .iter()
        .map(|m| (m.value().name().to_string(), m.value().as_usize()))
        .collect()
}

#[tokio::test]
async fn explain_analyze_shows_one_host_one_hour_opens_only_what_can_hold_it() {
    let (_dir, store) = store();
    let engine = QueryEngine::new(Arc::clone(&store));
    // Four segments: two days (two partitions), each flushed in two halves of hosts.
    let step = 10 * 1_000_000_000;
    for day in 0..2 {
        for half in 0..2 {
            let mut body = String::new();
            for h in (half * 20)..(half * 20 + 20) {
                for i in 0..(6 * 360) {
                    let t = T0 + day * 86_400_000_000_000 + i * step;
                    body.push_str(&format!("cpu,host=h{h} usage={i} {t}\n"));
                }
            }
            write(&store, &body);
            store.flush().unwrap();
        }
    }
    let sql = "SELECT max(usage) FROM cpu WHERE host = 'h7' \
               AND time >= '2026-01-01T02:00:00Z' AND time < '2026-01-01T03:00:00Z'";
    assert_eq!(scalar(&engine, sql).await, "1079.0");
    let m = scan_metrics(&engine, sql).await;
    assert_eq!(m["segments_total"], 4, "{m:?}");
    // Only day 0's first half of hosts can hold h7.
    assert_eq!(m["segments_pruned"], 3, "{m:?}");
    assert_eq!(m["rows_scanned"], 360, "{m:?}");
    // The scan folds the max itself: one partial state comes out.
    assert_eq!(m["output_rows"], 1, "{m:?}");
    // 20 hosts x 2160 rows in the one segment opened; the page index skips most of them.
    assert!(
        m["rows_decoded"] <= 2 * forestall_engine::segment::PAGE_ROWS,
        "{m:?}"
    );
    assert_eq!(
        m["rows_decoded"] + m["rows_skipped_by_page_index"],
        20 * 2160,
        "{m:?}"
    );
    // A whole-table count opens every segment and decodes every row.
    let m = scan_metrics(&engine, "SELECT count(usage) FROM cpu").await;
    assert_eq!(
        (m["segments_pruned"], m["rows_decoded"]),
        (0, 4 * 20 * 2160)
    );
}

#[tokio::test]
async fn a_filter_on_fields_drops_rows_in_the_scan_and_never_one_that_passes() {
    let (_dir, store) = store();
    // Hosts a and b, 100 points each (usage = i, temp = i mod 50), and 5 points of b with
    // no usage; over two segments and the buffer.
    let line =
        |h: &str, i: i64| format!("cpu,host={h} usage={i},temp={}i {}", i % 50, T0 + i * MIN);
    for range in [0..50, 50..80] {
        let body: Vec<String> = range.flat_map(|i| [line("a", i), line("b", i)]).collect();
        write(&store, &body.join("\n"));
        store.flush().unwrap();
    }
    let body: Vec<String> = (80..100)
        .flat_map(|i| [line("a", i), line("b", i)])
        .collect();
    write(&store, &body.join("\n"));
    // b's last points have no usage, and a field no segment has (read there as NULL).
    let nulls: Vec<String> = (100..105)
        .map(|i| format!("cpu,host=b temp=7i,extra=1 {}", T0 + i * MIN))
        .collect();
    write(&store, &nulls.join("\n"));
    let engine = QueryEngine::new(Arc::clone(&store));
    // (filter, rows that pass, whether the scan applies it)
    for (filter, passing, in_scan) in [
        ("usage > 89", 20, true),
        ("usage > 49 AND temp < 10", 20, true),
        ("usage + CAST(temp AS DOUBLE) >= 147", 2, true),
        ("usage IS NULL", 5, true),
        ("NOT (usage < 98)", 4, true),
        ("time >= '2026-01-01T01:00:00Z' AND usage < 70", 20, true),
        ("extra IS NULL", 200, true),
        ("extra > 0", 5, true),
        // A tag in the expression: the filter stays above the scan.
        ("usage > 97 OR host = 'a'", 102, false),
    ] {
        let sql = format!("SELECT host, usage, temp FROM cpu WHERE {filter}");
        let (_, batches) = engine.sql(&sql).await.unwrap();
        let rows: usize = batches.iter().map(|b| b.num_rows()).sum();
        assert_eq!(rows, passing, "{filter}");
        let m = scan_metrics(&engine, &sql).await;
        if in_scan {
            assert_eq!(m["output_rows"], passing, "{filter}: {m:?}");
            assert!(m["rows_scanned"] > passing, "{filter}: {m:?}");
        } else {
            assert_eq!(m["output_rows"], m["rows_scanned"], "{filter}: {m:?}");
        }
        let plan = table(&engine, &format!("EXPLAIN {sql}")).await;
        assert_eq!(plan.contains(", filter="), in_scan, "{filter}: {plan}");
    }
}

/// Segment reads drop the rows a filter on fields rejects before they decode the other
/// columns, but never a row whose duplicate in a newer source decides whether it passes.
#[tokio::test]
async fn segment_reads_drop_filtered_rows_early_but_not_rows_with_duplicates() {
    let (_dir, store) = store();
    let point = |i: i64, usage: i64| format!("cpu,host=a usage={usage},temp=1i {}", T0 + i * MIN);
    let others = |i: i64| format!("cpu,host=b usage=99,temp=1i {}", T0 + i * MIN);
    let body: Vec<String> = (0..60).flat_map(|i| [point(i, i), others(i)]).collect();
    write(&store, &body.join("\n"));
    store.flush().unwrap();
    let engine = QueryEngine::new(Arc::clone(&store));
    let sql = "SELECT time, usage, temp FROM cpu WHERE host = 'a' AND usage >= 50";
    let (_, batches) = engine.sql(sql).await.unwrap();
    assert_eq!(batches.iter().map(|b| b.num_rows()).sum::<usize>(), 10);
    // Only the rows that pass came out of the segment read.
    assert_eq!(scan_metrics(&engine, sql).await["rows_scanned"], 10);

    // Newer points: minute 55 falls to 1 and minute 10 rises to 99 (a second segment), and
    // minute 20 rises to 80 (the buffer).
    write(&store, &[point(55, 1), point(10, 99)].join("\n"));
    store.flush().unwrap();
    write(&store, &point(20, 80));
    let (_, batches) = engine.sql(&format!("{sql} ORDER BY time")).await.unwrap();
    let got: Vec<f64> = batches
        .iter()
        .flat_map(|b| {
            b.column(1)
                .as_any()
                .downcast_ref::<arrow::array::Float64Array>()
                .unwrap()
                .values()
                .to_vec()
        })
        .collect();
    let mut want = vec![99.0, 80.0];
    want.extend((50..60).filter(|&i| i != 55).map(|i| i as f64));
    assert_eq!(got, want);
}

#[tokio::test]
async fn a_limit_stops_the_scan_early() {
    let (_dir, store) = store();
    fill(&store);
    store.flush().unwrap();
    let engine = QueryEngine::new(Arc::clone(&store));
    let (_, batches) = engine.sql("SELECT * FROM cpu LIMIT 5").await.unwrap();
    assert_eq!(batches.iter().map(|b| b.num_rows()).sum::<usize>(), 5);
    // Streaming: the first batch arrives without collecting the rest.
    let (schema, mut stream) = engine.start("SELECT host, usage FROM cpu").await.unwrap();
    assert_eq!(schema.fields().len(), 2);
    use futures::StreamExt;
    let first = stream.next().await.unwrap().unwrap();
    assert!(first.num_rows() > 0);
    drop(stream);
}

#[tokio::test]
async fn selectors_return_the_value_at_the_first_and_last_time() {
    let (_dir, store) = store();
    fill(&store);
    // A later point for h0 with an older timestamp must not win selector_last.
    write(
        &store,
        &format!("cpu,host=h0,region=eu usage=-1 {}", T0 - MIN),
    );
    store.flush().unwrap();
    write(
        &store,
        &format!("cpu,host=h1,region=eu usage=500 {}", T0 + 90 * MIN),
    );
    let engine = QueryEngine::new(Arc::clone(&store));
    let out = table(
        &engine,
        "SELECT host, selector_last(usage, time)['value'] AS last, \
                selector_last(usage, time)['time'] AS last_time, \
                selector_first(usage, time)['value'] AS first \
         FROM cpu GROUP BY host ORDER BY host",
    )
    .await;
    let want = "\
+------+-------+---------------------+-------+
| host | last  | last_time           | first |
+------+-------+---------------------+-------+
| h0   | 59.0  | 2026-01-01T00:59:00 | -1.0  |
| h1   | 500.0 | 2026-01-01T01:30:00 | 1.0   |
| h2   | 61.0  | 2026-01-01T00:59:00 | 2.0   |
+------+-------+---------------------+-------+";
    assert_eq!(out, want);
    let err = engine
        .sql("SELECT selector_last(usage, host) FROM cpu")
        .await
        .unwrap_err();
    assert!(err.to_string().contains("must be a timestamp"), "{err}");
}

#[tokio::test]
async fn gap_filling_fills_every_bucket_of_the_range() {
    let (_dir, store) = store();
    // h0 at minutes 1 and 4 (values 10, 40); h1 at minute 2 only.
    write(
        &store,
        &format!(
            "cpu,host=h0 usage=10 {}\ncpu,host=h0 usage=40 {}\ncpu,host=h1 usage=7 {}",
            T0 + MIN,
            T0 + 4 * MIN,
            T0 + 2 * MIN
        ),
    );
    let engine = QueryEngine::new(Arc::clone(&store));
    let sql = "SELECT date_bin_gapfill(INTERVAL '1 minute', time) AS minute, host, \
               avg(usage) AS plain, locf(avg(usage)) AS carried, interpolate(avg(usage)) AS linear \
               FROM cpu WHERE time >= '2026-01-01T00:00:00Z' AND time < '2026-01-01T00:06:00Z' \
               GROUP BY 1, host ORDER BY host, minute";
    let want = "\
+---------------------+------+-------+---------+--------+
| minute              | host | plain | carried | linear |
+---------------------+------+-------+---------+--------+
| 2026-01-01T00:00:00 | h0   |       |         |        |
| 2026-01-01T00:01:00 | h0   | 10.0  | 10.0    | 10.0   |
| 2026-01-01T00:02:00 | h0   |       | 10.0    | 20.0   |
| 2026-01-01T00:03:00 | h0   |       | 10.0    | 30.0   |
| 2026-01-01T00:04:00 | h0   | 40.0  | 40.0    | 40.0   |
| 2026-01-01T00:05:00 | h0   |       | 40.0    |        |
| 2026-01-01T00:00:00 | h1   |       |         |        |
| 2026-01-01T00:01:00 | h1   |       |         |        |
| 2026-01-01T00:02:00 | h1   | 7.0   | 7.0     | 7.0    |
| 2026-01-01T00:03:00 | h1   |       | 7.0     |        |
| 2026-01-01T00:04:00 | h1   |       | 7.0     |        |
| 2026-01-01T00:05:00 | h1   |       | 7.0     |        |
+---------------------+------+-------+---------+--------+";
    assert_eq!(table(&engine, sql).await, want);
    // Without a bounded range there is nothing to fill: a clear error.
    let err = engine
        .sql("SELECT date_bin_gapfill(INTERVAL '1 minute', time), avg(usage) FROM cpu GROUP BY 1")
        .await
        .unwrap_err();
    assert!(err.to_string().contains("bounded on both sides"), "{err}");
}

#[tokio::test]
async fn last_rows_is_the_latest_row_of_every_series() {
    let (_dir, store) = store();
    fill(&store);
    store.flush().unwrap();
    write(
        &store,
        &format!("cpu,host=h1,region=eu usage=99 {}", T0 + 70 * MIN),
    );
    let engine = QueryEngine::new(Arc::clone(&store));
    let out = table(
        &engine,
        "SELECT host, time, usage FROM last_rows('cpu') WHERE region = 'eu' ORDER BY host",
    )
    .await;
    let want = "\
+------+---------------------+-------+
| host | time                | usage |
+------+---------------------+-------+
| h0   | 2026-01-01T00:59:00 | 59.0  |
| h1   | 2026-01-01T01:10:00 | 99.0  |
+------+---------------------+-------+";
    assert_eq!(out, want);
    // The same answer as the scan that reads history.
    let scanned = table(
        &engine,
        "SELECT host, selector_last(usage, time)['time'] AS time, selector_last(usage, time)['value'] AS usage \
         FROM cpu WHERE region = 'eu' GROUP BY host ORDER BY host",
    )
    .await;
    assert_eq!(scanned, want);
    let err = engine
        .sql("SELECT * FROM last_rows('nope')")
        .await
        .unwrap_err();
    assert!(err.to_string().contains("not found"), "{err}");
    let err = engine.sql("SELECT * FROM last_rows(1)").await.unwrap_err();
    assert!(err.to_string().contains("measurement's name"), "{err}");
}

/// Two hosts, a point a minute for `n` minutes: h0 a sine of period 60 around 50 with a spike
/// of +40 at minute 1500; h1 a sawtooth that climbs from 20 by 1.6 a minute for 50 minutes of
/// every 100 (crossing 90 near the top) and idles at 20 otherwise.
fn fill_models(store: &Store, n: i64) {
    let mut body = String::new();
    for m in 0..n {
        let sine = 50.0 + 10.0 * (m as f64 * std::f64::consts::TAU / 60.0).sin();
        let h0 = if m == 1500 { sine + 40.0 } else { sine };
        let phase = m % 100;
        let h1 = if phase < 50 {
            20.0 + 1.6 * phase as f64
        } else {
            20.0
        };
        body.push_str(&format!("cpu,host=h0 usage={h0} {}\n", T0 + m * MIN));
        body.push_str(&format!("cpu,host=h1 usage={h1} {}\n", T0 + m * MIN));
        if m % 500 == 499 {
            write(store, &std::mem::take(&mut body));
        }
    }
    write(store, &body);
}

/// `column` of every batch, cast to `to`.
fn column_as(
    batches: &[RecordBatch],
    column: &str,
    to: &arrow::datatypes::DataType,
) -> Vec<arrow::array::ArrayRef> {
    batches
        .iter()
        .map(|b| arrow::compute::cast(b.column_by_name(column).unwrap(), to).unwrap())
        .collect()
}

fn strings(batches: &[RecordBatch], column: &str) -> Vec<String> {
    let arrays = column_as(batches, column, &arrow::datatypes::DataType::Utf8);
    arrays
        .iter()
        .flat_map(|c| arrow::array::AsArray::as_string::<i32>(c).iter())
        .map(|v| v.unwrap_or_default().to_owned())
        .collect()
}

fn floats(batches: &[RecordBatch], column: &str) -> Vec<f64> {
    let arrays = column_as(batches, column, &arrow::datatypes::DataType::Float64);
    arrays
        .iter()
        .flat_map(|c| {
            arrow::array::AsArray::as_primitive::<arrow::datatypes::Float64Type>(c).iter()
        })
        .map(|v| v.unwrap_or(f64::NAN))
        .collect()
}

#[tokio::test]
async fn anomaly_score_is_a_window_function_that_finds_the_spike_without_look_ahead() {
    let (_dir, store) = store();
    fill_models(&store, 2000);
    store.flush().unwrap();
    let engine = QueryEngine::new(Arc::clone(&store));
    let sql = "SELECT anomaly_score(usage) OVER (PARTITION BY host ORDER BY time) AS s \
               FROM cpu WHERE host = 'h0' ORDER BY time";
    let (_, batches) = engine.sql(sql).await.unwrap();
    let scores = floats(&batches, "s");
    assert_eq!(scores.len(), 2000);
    assert!(scores.iter().all(|s| (0.0..=1.0).contains(s)));
    let top = scores
        .iter()
        .enumerate()
        .max_by(|a, b| a.1.total_cmp(b.1))
        .unwrap()
        .0;
    // The likelihood averages a few rows of surprise, so the top may trail the spike a little.
    assert!(
        (1500..1505).contains(&top),
        "the spike has the highest score, not row {top}"
    );
    // The same rows cut before the end get the same scores.
    let cut = "SELECT anomaly_score(usage) OVER (PARTITION BY host ORDER BY time) AS s FROM cpu \
               WHERE host = 'h0' AND time < '2026-01-01T20:00:00Z' ORDER BY time";
    let (_, batches) = engine.sql(cut).await.unwrap();
    let prefix = floats(&batches, "s");
    assert_eq!(prefix.len(), 1200);
    assert_eq!(prefix, scores[..1200]);
    // A string argument is a type error.
    let err = engine
        .sql("SELECT anomaly_score(host) OVER (ORDER BY time) FROM cpu")
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Query(_)), "{err}");
}

#[tokio::test]
async fn forecast_returns_the_next_steps_of_every_matching_series() {
    let (_dir, store) = store();
    fill_models(&store, 2000);
    let engine = QueryEngine::new(Arc::clone(&store));
    let (batches, text) = batches_and_table(&engine, "SELECT host, time, mean, lower, upper, model FROM forecast('cpu', 'usage', 12, 'host = ''h0''') ORDER BY time").await;
    let mean = floats(&batches, "mean");
    let (lower, upper) = (floats(&batches, "lower"), floats(&batches, "upper"));
    assert_eq!(mean.len(), 12, "{text}");
    for k in 0..12 {
        let m = 2000 + k as i64;
        let truth = 50.0 + 10.0 * (m as f64 * std::f64::consts::TAU / 60.0).sin();
        assert!(
            (mean[k] - truth).abs() < 1.0,
            "step {k}: {} vs {truth}\n{text}",
            mean[k]
        );
        assert!(lower[k] <= mean[k] && mean[k] <= upper[k]);
    }
    // Steps are a minute apart after the last row (2026-01-02T09:19:00Z).
    assert!(
        text.contains("2026-01-02T09:20:00Z") && text.contains("2026-01-02T09:31:00Z"),
        "{text}"
    );
    assert!(text.contains("| h0 "), "{text}");
    // Without a predicate: every series.
    assert_eq!(
        scalar(&engine, "SELECT count(*) FROM forecast('cpu', 'usage', 5)").await,
        "10"
    );
    assert_eq!(
        scalar(
            &engine,
            "SELECT count(DISTINCT host) FROM forecast('cpu', 'usage', 5)"
        )
        .await,
        "2"
    );
    for (sql, needle) in [
        ("SELECT * FROM forecast('nope', 'usage', 5)", "not found"),
        ("SELECT * FROM forecast('cpu', 'nope', 5)", "no field"),
        ("SELECT * FROM forecast('cpu', 'host', 5)", "is a tag"),
        ("SELECT * FROM forecast('cpu', 'usage', 0)", "horizon"),
        ("SELECT * FROM forecast('cpu', 'usage', 100000)", "horizon"),
        ("SELECT * FROM forecast('cpu')", "forecast takes"),
        ("SELECT * FROM forecast('cpu', 'usage', 5, 'host = ')", ""),
        (
            "SELECT * FROM forecast('cpu', 'usage', 5, 'nope = 1')",
            "nope",
        ),
    ] {
        let err = engine.sql(sql).await.unwrap_err();
        assert!(matches!(err, Error::Query(_)), "{sql}: {err:?}");
        assert!(err.to_string().contains(needle), "{sql}: {err}");
    }
}

#[tokio::test]
async fn forecast_models_accounts_for_every_step_that_forecast_answers() {
    use arrow::array::AsArray;
    use arrow::datatypes::{DataType, Float64Type, Int64Type};
    let (_dir, store) = store();
    fill_models(&store, 2000);
    let engine = QueryEngine::new(Arc::clone(&store));
    let (batches, text) = batches_and_table(
        &engine,
        "SELECT host, step, model, rolling_error, answers FROM forecast_models('cpu', 'usage', 12, 'host = ''h0''') ORDER BY step, model",
    )
    .await;
    let models = strings(&batches, "model");
    let steps: Vec<i64> = column_as(&batches, "step", &DataType::Int64)
        .iter()
        .flat_map(|a| a.as_primitive::<Int64Type>().values().to_vec())
        .collect();
    let errors: Vec<Option<f64>> = column_as(&batches, "rolling_error", &DataType::Float64)
        .iter()
        .flat_map(|a| a.as_primitive::<Float64Type>().iter().collect::<Vec<_>>())
        .collect();
    let answers: Vec<bool> = column_as(&batches, "answers", &DataType::Boolean)
        .iter()
        .flat_map(|a| {
            a.as_boolean()
                .iter()
                .map(|b| b == Some(true))
                .collect::<Vec<_>>()
        })
        .collect();
    let per_step = models.len() / 12;
    assert!(per_step >= 2 && models.len() == 12 * per_step, "{text}");
    // What forecast() says answered each step is what forecast_models() says answers it.
    let (fb, ftext) = batches_and_table(
        &engine,
        "SELECT model FROM forecast('cpu', 'usage', 12, 'host = ''h0''') ORDER BY time",
    )
    .await;
    let answered = strings(&fb, "model");
    for step in 1..=12i64 {
        let rows: Vec<usize> = (0..steps.len()).filter(|&i| steps[i] == step).collect();
        assert_eq!(rows.len(), per_step, "{text}");
        let answering: Vec<usize> = rows.iter().copied().filter(|&i| answers[i]).collect();
        assert_eq!(answering.len(), 1, "step {step}\n{text}");
        let a = answering[0];
        assert_eq!(
            models[a],
            answered[step as usize - 1],
            "step {step}\n{text}\n{ftext}"
        );
        // It answers because its rolling error there is the lowest.
        let best = rows
            .iter()
            .filter_map(|&i| errors[i])
            .fold(f64::INFINITY, f64::min);
        assert_eq!(errors[a], Some(best), "step {step}\n{text}");
    }
    // A clean 60-minute sine after 2,000 rows: some model has learnt it.
    assert!(errors.iter().flatten().any(|&e| e < 0.5), "{text}");
    // The shipped global network competes: scored at the 12 steps ahead it forecasts, not
    // beyond them; and not at all in an engine without it.
    let scored = "SELECT count(*) FROM forecast_models('cpu', 'usage', 24, 'host = ''h0''') WHERE model = 'global_lstm' AND rolling_error IS NOT NULL";
    assert_eq!(scalar(&engine, scored).await, "12");
    let plain = QueryEngine::without_global_forecasts(Arc::clone(&store));
    assert_eq!(scalar(&plain, scored).await, "0");
    assert_eq!(
        scalar(
            &plain,
            "SELECT count(DISTINCT model) FROM forecast_models('cpu', 'usage', 3, 'host = ''h0''')"
        )
        .await,
        (per_step - 1).to_string()
    );
    // Every series, and the same argument checks as forecast().
    assert_eq!(
        scalar(
            &engine,
            "SELECT count(DISTINCT host) FROM forecast_models('cpu', 'usage', 3) WHERE answers"
        )
        .await,
        "2"
    );
    for (sql, needle) in [
        (
            "SELECT * FROM forecast_models('cpu')",
            "forecast_models takes",
        ),
        (
            "SELECT * FROM forecast_models('cpu', 'usage', 0)",
            "forecast_models horizon",
        ),
        (
            "SELECT * FROM forecast_models('cpu', 'host', 5)",
            "is a tag",
        ),
        (
            "SELECT * FROM forecast_models('nope', 'usage', 5)",
            "not found",
        ),
    ] {
        let err = engine.sql(sql).await.unwrap_err();
        assert!(matches!(err, Error::Query(_)), "{sql}: {err:?}");
        assert!(err.to_string().contains(needle), "{sql}: {err}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forecasts_of_many_series_each_follow_their_own_series() {
    // More series than cores: the series are forecast in shares on several threads, and
    // each forecast must come back beside its own series' tags.
    let (_dir, store) = store();
    let mut body = String::new();
    for m in 0..300i64 {
        for k in 0..9 {
            let v = 100.0 * k as f64 + (m as f64 * std::f64::consts::TAU / 30.0).sin();
            body.push_str(&format!("cpu,host=h{k} usage={v} {}\n", T0 + m * MIN));
        }
    }
    write(&store, &body);
    let engine = QueryEngine::new(Arc::clone(&store));
    let (batches, text) = batches_and_table(
        &engine,
        "SELECT host, mean FROM forecast('cpu', 'usage', 2)",
    )
    .await;
    let mean = floats(&batches, "mean");
    assert_eq!(mean.len(), 18, "{text}");
    for (host, m) in strings(&batches, "host").iter().zip(&mean) {
        let k: f64 = host[1..].parse().unwrap();
        assert!((m - 100.0 * k).abs() < 2.0, "{host}: {m}\n{text}");
    }
}

#[tokio::test]
async fn risk_scores_each_component_with_reasons() {
    let (_dir, store) = store();
    // End mid-climb: h1 is at 20 + 1.6 × 35 = 76 and rising, 9 minutes from 90.
    fill_models(&store, 1936);
    let engine = QueryEngine::new(Arc::clone(&store));
    let (batches, text) = batches_and_table(&engine, "SELECT component, resource, score, reasons FROM risk('cpu', 'usage > 90 AS cpu') ORDER BY component").await;
    let score = floats(&batches, "score");
    assert_eq!(score.len(), 2, "{text}");
    assert!(score[0] < 0.1, "h0 never nears 90\n{text}");
    assert!(score[1] > 0.6, "h1 is climbing towards 90\n{text}");
    assert!(text.contains("| h1 ") && text.contains("| cpu "), "{text}");
    assert!(
        text.contains("level:usage=near") || text.contains("trend:usage=rising"),
        "{text}"
    );
    for (sql, needle) in [
        ("SELECT * FROM risk('cpu', 'usage')", "field > threshold"),
        (
            "SELECT * FROM risk('cpu', 'usage > 90', '', 'region')",
            "no tag 'region'",
        ),
        ("SELECT * FROM risk('cpu')", "risk takes"),
    ] {
        let err = engine.sql(sql).await.unwrap_err();
        assert!(err.to_string().contains(needle), "{sql}: {err}");
    }
}

#[tokio::test]
async fn planning_scans_and_what_callers_forward_run_on_the_query_runtime() {
    let (_dir, store) = store();
    fill(&store);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("test-query")
        .enable_all()
        .build()
        .unwrap();
    let engine = QueryEngine::new(store).on_runtime(runtime.handle().clone());
    let thread = || std::thread::current().name().map(str::to_string);
    assert_eq!(
        engine
            .run(async move { thread() })
            .await
            .unwrap()
            .as_deref(),
        Some("test-query")
    );
    // Planning, the scan and a caller's per-item work (encoding a result) run there when
    // the caller forwards them, item by item.
    let (planner, sql) = (engine.clone(), "SELECT host, usage FROM cpu ORDER BY host");
    let planned = futures::stream::once(async move {
        let on = thread();
        (planner.start(sql).await.unwrap().1, on)
    });
    let encoded: Vec<(usize, Option<String>)> = engine
        .forward(planned.flat_map(move |(batches, planned_on)| {
            futures::stream::once(async move { (0, planned_on) })
                .chain(batches.map(move |b| (b.map_or(0, |b| b.num_rows()), thread())))
        }))
        .collect()
        .await;
    assert_eq!(encoded.iter().map(|(n, _)| n).sum::<usize>(), 180);
    assert!(
        encoded
            .iter()
            .all(|(_, name)| name.as_deref() == Some("test-query")),
        "{encoded:?}"
    );
    // Errors found while planning come back from `start`.
    assert!(matches!(
        engine.start("SELECT nope FROM cpu").await,
        Err(Error::Query(_))
    ));
    drop(engine);
    runtime.shutdown_background();
}

/// Aggregates folded in the scan (`pushdown`) answer exactly what DataFusion's own plan
/// answers, over rows spread across two segments and the buffer, with duplicates, points out
/// of order, missing tags and null fields.
#[tokio::test]
async fn aggregates_folded_in_the_scan_match_datafusions_own() {
    let (_dir, store) = store();
    // Values are multiples of 1/4, so sums are exact whatever the order of addition.
    let line = |h: i64, m: i64, v: f64| {
        let region = match h {
            0 | 1 => ",region=eu",
            2 => ",region=us",
            _ => "", // h3 has no region
        };
        let temp = if m % 3 == 0 {
            String::new()
        } else {
            format!(",temp={}", (m as f64) / 4.0)
        };
        let state = if m % 5 == 0 { ",state=\"ok\"" } else { "" };
        format!(
            "cpu,host=h{h}{region} usage={v},bytes={}i{temp}{state} {}\n",
            (m * 1000 + h) * if m % 7 == 0 { -1 } else { 1 },
            T0 + m * MIN
        )
    };
    let batch = |hosts: std::ops::Range<i64>, minutes: std::ops::Range<i64>, shift: f64| {
        let mut body = String::new();
        for m in minutes {
            for h in hosts.clone() {
                body.push_str(&line(h, m, (m + h) as f64 / 4.0 + shift));
            }
        }
        body
    };
    write(&store, &batch(0..4, 0..40, 0.0));
    store.flush().unwrap();
    // A second segment overlapping the first: minutes 30..39 are rewritten with new values.
    write(&store, &batch(0..4, 30..70, 0.5));
    store.flush().unwrap();
    // The buffer: newer points, points out of order, and rewrites of segment rows.
    write(&store, &batch(0..4, 70..90, 0.0));
    write(&store, &batch(1..3, 5..12, 100.25));
    write(&store, &batch(2..5, 65..75, -3.0));

    let pushed = QueryEngine::new(Arc::clone(&store));
    let plain = QueryEngine::without_pushdown(Arc::clone(&store));
    let folded = [
        "SELECT date_bin(INTERVAL '10 minutes', time) AS b, host, avg(usage), max(usage), \
         min(usage), sum(usage), count(*), count(temp), avg(temp), max(temp) \
         FROM cpu GROUP BY 1, 2 ORDER BY 1, 2",
        "SELECT date_bin(INTERVAL '1 minute', time) AS minute, max(usage) FROM cpu \
         WHERE host = 'h1' AND time >= '2026-01-01T00:03:00Z' AND time < '2026-01-01T01:03:00Z' \
         GROUP BY 1 ORDER BY 1",
        "SELECT region, sum(bytes), min(bytes), max(bytes), avg(bytes), count(state), count(time) \
         FROM cpu GROUP BY region ORDER BY region",
        "SELECT count(*), max(usage), sum(bytes), avg(temp) FROM cpu WHERE host = 'nope'",
        "SELECT count(*), sum(usage) FROM cpu \
         WHERE time >= '2026-01-01T00:20:00Z' AND time <= '2026-01-01T00:45:00Z'",
        "SELECT date_bin(INTERVAL '7 minutes', time, TIMESTAMP '2026-01-01T00:03:00Z') AS b, \
         region, host, min(temp), count(*) FROM cpu WHERE host IN ('h0', 'h3', 'h4') \
         GROUP BY 1, 2, 3 ORDER BY 1, 2, 3",
        "SELECT host, avg(usage) AS a FROM cpu GROUP BY host HAVING avg(usage) > 10 \
         ORDER BY a DESC",
        "SELECT DISTINCT region FROM cpu ORDER BY region",
        "SELECT date_trunc('minute', time) AS m, host, max(usage) FROM cpu \
         WHERE host = 'h2' GROUP BY 1, 2 ORDER BY 1, 2",
        "SELECT date_trunc('week', time) AS w, count(*), sum(usage) FROM cpu GROUP BY 1",
        "SELECT date_trunc('HOUR', time) AS h, region, count(*) FROM cpu GROUP BY 1, 2 \
         ORDER BY 1, 2",
        // DataFusion turns this into a GROUP BY host, which is folded.
        "SELECT count(DISTINCT host) FROM cpu",
        "SELECT date_bin(INTERVAL '1 hour', time) AS h, max(usage) FROM cpu \
         WHERE host ~ '^h[12]$' AND region != 'us' AND time BETWEEN '2026-01-01T00:10:00Z' AND '2026-01-01T01:10:00Z' \
         GROUP BY 1 ORDER BY 1",
        "SELECT date_bin_gapfill(INTERVAL '5 minutes', time) AS b, locf(avg(usage)) FROM cpu \
         WHERE host = 'h4' AND time >= '2026-01-01T00:50:00Z' AND time < '2026-01-01T01:30:00Z' \
         GROUP BY 1 ORDER BY 1",
    ];
    // Not folded: a filter on a field, DISTINCT of a field, a function the scan does not know.
    let not_folded = [
        "SELECT host, count(*) FROM cpu WHERE usage > 5 GROUP BY host ORDER BY host",
        "SELECT count(DISTINCT usage) FROM cpu",
        "SELECT host, median(usage) FROM cpu GROUP BY host ORDER BY host",
        "SELECT date_trunc('month', time) AS m, avg(usage) FROM cpu GROUP BY 1 ORDER BY 1",
    ];
    for (sql, expect_folded) in folded
        .iter()
        .map(|q| (q, true))
        .chain(not_folded.iter().map(|q| (q, false)))
    {
        let plan = table(&pushed, &format!("EXPLAIN {sql}")).await;
        assert_eq!(
            plan.contains("partial_aggregate"),
            expect_folded,
            "{sql}\n{plan}"
        );
        assert!(
            !table(&plain, &format!("EXPLAIN {sql}"))
                .await
                .contains("partial_aggregate")
        );
        let (want, got) = (table(&plain, sql).await, table(&pushed, sql).await);
        assert_eq!(got, want, "{sql}");
        assert!(want.lines().count() > 4, "{sql} returned nothing:\n{want}");
    }
}
