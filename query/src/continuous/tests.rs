use std::sync::Arc;
use std::time::Duration;

use arrow::util::pretty::pretty_format_batches;
use forestall_engine::store::now_nanos;
use forestall_engine::{EngineConfig, Precision, Store};

use super::statement::{Statement, parse};
use super::*;
use crate::QueryEngine;

const S: i64 = 1_000_000_000;
const MIN: i64 = 60 * S;

fn create(sql: &str) -> Definition {
    match parse(sql) {
        Some(Ok(Statement::Create { definition, .. })) => definition,
        other => panic!("{sql}: {other:?}"),
    }
}

fn parse_error(sql: &str) -> String {
    match parse(sql) {
        Some(Err(e)) => e.to_string(),
        other => panic!("expected an error for {sql}: {other:?}"),
    }
}

#[test]
fn the_statement_gives_every_clause_and_round_trips_through_its_sql() {
    let d = create(
        "create or replace continuous query cpu_1m every '30 seconds' lateness 5m \
         backfill '7 days' into cpu_1m as select date_bin(interval '1 minute', time) as time, \
         host, avg(usage) as usage from cpu group by 1, host;",
    );
    assert_eq!(d.name, "cpu_1m");
    assert_eq!(d.schedule, Schedule::Every(Duration::from_secs(30)));
    assert_eq!(d.lateness, Duration::from_secs(300));
    assert_eq!(d.backfill.as_deref(), Some("7 days"));
    assert_eq!(
        d.sink,
        Sink::Into {
            measurement: "cpu_1m".into()
        }
    );
    assert!(d.query.starts_with("select date_bin") && d.query.ends_with("group by 1, host"));
    let again = create(&d.to_sql());
    assert_eq!(
        Definition {
            select_at: None,
            ..again
        },
        Definition {
            select_at: None,
            ..d.clone()
        }
    );
    // The JSON form is the same model.
    let spec: DefinitionSpec =
        serde_json::from_str(&serde_json::to_string(&d.to_spec()).unwrap()).unwrap();
    let from_json = Definition::from_spec(spec, None).unwrap();
    assert_eq!(
        from_json,
        Definition {
            select_at: None,
            ..d
        }
    );
}

#[test]
fn health_and_notify_sinks_keep_their_conditions() {
    let d = create(
        "CREATE CONTINUOUS QUERY disk_full ON WRITE HEALTH WARN WHEN value > 80 \
         FAIL WHEN (value > 95 AND free < 1) FOR INTERVAL '2 minutes' \
         AS SELECT host AS component, max(used) AS value, min(free) AS free FROM disk GROUP BY host",
    );
    assert_eq!(d.schedule, Schedule::OnWrite);
    assert_eq!(
        d.sink,
        Sink::Health {
            warn: Some("value > 80".into()),
            fail: Some("(value > 95 AND free < 1)".into()),
            hold: Duration::from_secs(120),
        }
    );
    let n = create(
        "CREATE CONTINUOUS QUERY slow NOTIFY 'http://127.0.0.1:9/hook' WHEN p99 > 0.2 FOR 1m \
         AS SELECT service, max(p99) AS p99 FROM latency GROUP BY service",
    );
    assert_eq!(
        n.sink,
        Sink::Notify {
            url: "http://127.0.0.1:9/hook".into(),
            when: Some("p99 > 0.2".into()),
            hold: Duration::from_secs(60),
        }
    );
    assert!(matches!(
        parse("drop continuous query if exists slow;"),
        Some(Ok(Statement::Drop { ref name, if_exists: true })) if name == "slow"
    ));
    assert!(matches!(
        parse("SHOW CONTINUOUS QUERIES"),
        Some(Ok(Statement::Show))
    ));
}

#[test]
fn other_statements_are_left_to_datafusion() {
    for sql in [
        "SELECT 1",
        "CREATE TABLE t (a int)",
        "DROP TABLE t",
        "SHOW TABLES",
        "CREATE OR REPLACE VIEW v AS SELECT 1",
        "",
    ] {
        assert!(parse(sql).is_none(), "{sql}");
    }
}

#[test]
fn malformed_statements_say_what_is_wrong_and_where() {
    let e = parse_error("CREATE CONTINUOUS QUERY q SINK TO kafka AS SELECT 1");
    assert!(
        e.contains("expected EVERY") && e.contains("line 1, column 27"),
        "{e}"
    );
    let e = parse_error("CREATE CONTINUOUS QUERY q EVERY '1m' INTO x");
    assert!(e.contains("query is missing"), "{e}");
    let e = parse_error("CREATE CONTINUOUS QUERY q EVERY 'often' INTO x AS SELECT 1");
    assert!(
        e.contains("invalid duration") && e.contains("column 33"),
        "{e}"
    );
    let e = parse_error("CREATE CONTINUOUS QUERY q EVERY '1m' EVERY '2m' INTO x AS SELECT 1");
    assert!(e.contains("given twice"), "{e}");
    let e = parse_error("CREATE CONTINUOUS QUERY q AS SELECT 1");
    assert!(e.contains("no sink"), "{e}");
    let e = parse_error("CREATE CONTINUOUS QUERY \"bad name\" INTO x AS SELECT 1");
    assert!(e.contains("not a valid name"), "{e}");
    let e = parse_error("CREATE CONTINUOUS QUERY q HEALTH WARN WHEN > 3 AS SELECT 1");
    assert!(
        e.contains("does not parse") && e.contains("column 44"),
        "{e}"
    );
    let e = parse_error("CREATE CONTINUOUS QUERY q HEALTH FOR '1m' AS SELECT 1");
    assert!(e.contains("WARN WHEN"), "{e}");
    let e = parse_error("DROP CONTINUOUS QUERY q extra");
    assert!(e.contains("unexpected text"), "{e}");
    // An error in the SELECT points into the statement as written.
    let sql = "CREATE CONTINUOUS QUERY q INTO x AS\n  SELECT date_bin(INTERVAL '1 minute', time) AS time, FROM cpu GROUP BY 1";
    let d = create(sql);
    let e = plan::parse_select(&d.query, d.select_at)
        .unwrap_err()
        .to_string();
    assert!(e.contains("Line: 2"), "{e}");
}

#[test]
fn an_into_query_must_be_bucketed_over_one_measurement() {
    let ok = |q: &str| plan::Incremental::new(plan::parse_select(q, None).unwrap());
    let inc = ok("SELECT date_bin(INTERVAL '5 minutes', time, '2026-01-01T00:02:00Z') AS time, host, max(usage) AS peak FROM cpu c WHERE region = 'eu' GROUP BY 1, host").unwrap();
    assert_eq!(inc.source, "cpu");
    assert_eq!(inc.bucket.width, 5 * MIN);
    assert_eq!(inc.bucket.origin.rem_euclid(5 * MIN), 2 * MIN);
    assert_eq!(inc.keys, vec!["time".to_string(), "host".to_string()]);
    let sql = inc.window_sql(10, 20);
    assert!(
        sql.contains("(region = 'eu') AND \"c\".\"time\" >= to_timestamp_nanos(10) AND \"c\".\"time\" < to_timestamp_nanos(20)"),
        "{sql}"
    );
    let trunc =
        ok("SELECT date_trunc('hour', time) AS time, avg(usage) AS usage FROM cpu GROUP BY time")
            .unwrap();
    assert_eq!(trunc.bucket.width, 60 * MIN);
    for (q, expected) in [
        (
            "SELECT host, avg(usage) AS u FROM cpu GROUP BY host",
            "grouped by a time bucket",
        ),
        (
            "SELECT date_bin(INTERVAL '1 minute', time) AS t, avg(usage) FROM cpu GROUP BY 1",
            "name the time bucket time",
        ),
        (
            "SELECT date_bin(INTERVAL '1 minute', time) AS time, avg(usage) FROM cpu",
            "add it to GROUP BY",
        ),
        (
            "SELECT date_bin(INTERVAL '1 minute', a.time) AS time, avg(a.usage) FROM cpu a JOIN mem b ON a.host = b.host GROUP BY 1",
            "joins",
        ),
        (
            "SELECT date_bin(INTERVAL '1 minute', time) AS time, avg(u) FROM (SELECT * FROM cpu) GROUP BY 1",
            "not a subquery",
        ),
        (
            "SELECT date_trunc('month', time) AS time, avg(usage) FROM cpu GROUP BY 1",
            "fixed length",
        ),
        ("SELECT * FROM cpu", "names its columns"),
    ] {
        let e = ok(q).unwrap_err().to_string();
        assert!(e.contains(expected), "{q}: {e}");
    }
}

#[test]
fn health_levels_count_once_they_have_held_for_the_duration() {
    let warn = Some("value > 80".to_string());
    let fail = Some("value > 95".to_string());
    let hold = Duration::from_secs(60);
    let seen = |v: f64| health::Observation {
        warn: v > 80.0,
        fail: v > 95.0,
        value: Some(v),
    };
    let mut state: Option<CheckState> = None;
    let mut statuses = Vec::new();
    // Every 30 s: calm, hot (pending), hot (warn), failing (warn while fail pends), failing
    // for a minute (fail), calm again (pass at once).
    for (i, v) in [50.0, 85.0, 85.0, 99.0, 99.0, 99.0, 50.0]
        .iter()
        .enumerate()
    {
        let check = health::Check {
            name: "cpu_hot",
            warn: &warn,
            fail: &fail,
            hold,
        };
        let next = health::step(
            &check,
            state.as_ref(),
            "web",
            vec![],
            &seen(*v),
            i as i64 * 30 * S,
        );
        statuses.push(next.status);
        state = Some(next);
    }
    use HealthStatus::*;
    assert_eq!(statuses, vec![Pass, Pass, Pass, Warn, Warn, Fail, Pass]);
    // Warn held from 30 s: it was reached at 90 s (the fourth step), not at 60 s.
    let s = state.unwrap();
    assert_eq!(s.since, 6 * 30 * S);
    assert!(s.reason.starts_with("pass"), "{}", s.reason);
}

// ---- the runtime, over a real store ----

fn open(dir: &std::path::Path) -> Arc<Store> {
    Arc::new(
        Store::open(EngineConfig {
            data_dir: dir.to_path_buf(),
            ..Default::default()
        })
        .unwrap(),
    )
}

/// A store in `dir` with continuous queries running over it, acting through `actions`: the
/// store, an engine that answers their statements, and the runtime.
fn started(
    dir: &std::path::Path,
    actions: Option<ActionSinkRef>,
) -> (Arc<Store>, QueryEngine, ContinuousQueries) {
    let store = open(dir);
    let engine = QueryEngine::new(Arc::clone(&store));
    let cqs = ContinuousQueries::start(Arc::clone(&store), engine.clone(), actions).unwrap();
    let engine = engine.with_continuous(cqs.clone());
    (store, engine, cqs)
}

fn write(store: &Store, body: &str) {
    let o = store
        .write(body.as_bytes(), Precision::Nanoseconds, now_nanos())
        .unwrap();
    assert_eq!(o.rejected_lines, 0, "{:?}", o.errors);
}

async fn rows(engine: &QueryEngine, sql: &str) -> String {
    let (_, batches) = engine
        .sql(sql)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"));
    pretty_format_batches(&batches).unwrap().to_string()
}

/// Waits until `check` holds, for at most 20 s.
async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    for _ in 0..400 {
        if check().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("timed out waiting for {what}");
}

fn watermark(cqs: &ContinuousQueries, name: &str) -> Option<i64> {
    cqs.describe(name)?.get("watermark")?.as_i64()
}

/// Ten minutes of data for three hosts every 10 s, ending a minute ago.
fn history(store: &Store, now: i64) -> i64 {
    let start = (now - 11 * MIN) / MIN * MIN;
    let mut body = String::new();
    for i in 0..60 {
        for h in 0..3 {
            body.push_str(&format!(
                "cpu,host=h{h} usage={},n={}i {}\n",
                i * 10 + h,
                i,
                start + i * 10 * S
            ));
        }
    }
    write(store, &body);
    start
}

const ROLLUP: &str = "CREATE CONTINUOUS QUERY cpu_1m EVERY '1s' LATENESS '0s' BACKFILL '1 hour' INTO cpu_1m AS \
    SELECT date_bin(INTERVAL '1 minute', time) AS time, host, avg(usage) AS usage, max(n) AS n, count(*) AS points \
    FROM cpu GROUP BY 1, host";

const DIRECT: &str = "SELECT date_bin(INTERVAL '1 minute', time) AS time, host, avg(usage) AS usage, max(n) AS n, count(*) AS points \
    FROM cpu WHERE time < to_timestamp_nanos({end}) GROUP BY 1, host ORDER BY 1, host";

const SINK: &str = "SELECT time, host, usage, n, points FROM cpu_1m WHERE time < to_timestamp_nanos({end}) ORDER BY 1, host";

async fn assert_sink_is_recomputation(engine: &QueryEngine, end: i64) {
    let direct = rows(engine, &DIRECT.replace("{end}", &end.to_string())).await;
    let sink = rows(engine, &SINK.replace("{end}", &end.to_string())).await;
    assert_eq!(sink, direct);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rollup_materialises_history_then_follows_late_writes_and_restarts() {
    let dir = tempfile::tempdir().unwrap();
    let (store, engine, cqs) = started(dir.path(), None);
    let start = history(&store, now_nanos());
    let out = rows(&engine, ROLLUP).await;
    assert!(out.contains("continuous query cpu_1m created"), "{out}");
    let caught_up = |cqs: ContinuousQueries| async move {
        watermark(&cqs, "cpu_1m").is_some_and(|w| w >= (now_nanos() / MIN) * MIN)
    };
    eventually("the backfill", || caught_up(cqs.clone())).await;
    assert_sink_is_recomputation(&engine, start + 10 * MIN).await;

    // A late point in an old bucket, and one in a new bucket of a new series.
    write(
        &store,
        &format!(
            "cpu,host=h0 usage=1000,n=999i {}\ncpu,host=h9 usage=7,n=1i {}",
            start + 5,
            start + 3 * MIN
        ),
    );
    let fixed = |engine: QueryEngine| async move {
        rows(
            &engine,
            &format!(
                "SELECT n FROM cpu_1m WHERE host = 'h0' AND time = to_timestamp_nanos({start})"
            ),
        )
        .await
        .contains("| 999 |")
    };
    eventually("the late bucket's recomputation", || fixed(engine.clone())).await;
    eventually("the dirty bucket's mark to clear", || {
        let cqs = cqs.clone();
        async move { cqs.describe("cpu_1m").unwrap()["dirty_buckets"] == 0 }
    })
    .await;
    assert_sink_is_recomputation(&engine, start + 10 * MIN).await;
    let shown = rows(&engine, "SHOW CONTINUOUS QUERIES").await;
    assert!(
        shown.contains("cpu_1m") && shown.contains("EVERY 1s"),
        "{shown}"
    );
    let table = rows(
        &engine,
        "SELECT name, runs > 0 AS ran, last_error FROM system.continuous_queries",
    )
    .await;
    assert!(table.contains("| cpu_1m | true |"), "{table}");

    // A restart: the watermark and the sink carry on, with no bucket written twice.
    cqs.stop().await;
    drop(engine);
    drop(cqs);
    store.shutdown().unwrap();
    drop(store);
    let (store, engine, cqs) = started(dir.path(), None);
    assert!(watermark(&cqs, "cpu_1m").is_some());
    write(
        &store,
        &format!("cpu,host=h1 usage=5000,n=500i {}", start + 2 * MIN + 5 * S),
    );
    eventually("the late bucket after a restart", || {
        let engine = engine.clone();
        async move {
            rows(
                &engine,
                &format!(
                    "SELECT n FROM cpu_1m WHERE host = 'h1' AND time = to_timestamp_nanos({})",
                    start + 2 * MIN
                ),
            )
            .await
            .contains("| 500 |")
        }
    })
    .await;
    eventually("the dirty bucket's mark to clear", || {
        let cqs = cqs.clone();
        async move { cqs.describe("cpu_1m").unwrap()["dirty_buckets"] == 0 }
    })
    .await;
    assert_sink_is_recomputation(&engine, start + 10 * MIN).await;
    let out = rows(&engine, "DROP CONTINUOUS QUERY cpu_1m").await;
    assert!(out.contains("dropped"), "{out}");
    assert!(store.entries().list("cq/").unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_week_of_backfill_goes_an_hour_at_a_time() {
    // A point every 10 minutes for two hosts over the last 7 days: the backfill computes
    // at most an hour per run (so a run's memory is an hour's rows, whatever the backfill),
    // chunk after chunk without waiting for its schedule, and ends equal to a recomputation.
    let dir = tempfile::tempdir().unwrap();
    let (store, engine, cqs) = started(dir.path(), None);
    let now = now_nanos();
    let start = (now - 7 * 24 * 60 * MIN) / MIN * MIN;
    let mut body = String::new();
    let mut t = start;
    while t < now - MIN {
        for h in 0..2 {
            body.push_str(&format!("cpu,host=h{h} usage={} {t}\n", (t / MIN) % 97 + h));
        }
        t += 10 * MIN;
    }
    write(&store, &body);
    engine
        .sql("CREATE CONTINUOUS QUERY week EVERY '1 hour' LATENESS '0s' BACKFILL '7 days' INTO cpu_1h AS \
              SELECT date_bin(INTERVAL '1 minute', time) AS time, host, max(usage) AS usage FROM cpu GROUP BY 1, host")
        .await
        .unwrap();
    eventually("the week's backfill", || {
        let cqs = cqs.clone();
        async move { watermark(&cqs, "week").is_some_and(|w| w >= (now - MIN) / MIN * MIN) }
    })
    .await;
    let runs = cqs.describe("week").unwrap()["status"]["runs"]
        .as_u64()
        .unwrap();
    assert!(runs >= 7 * 24, "{runs} runs for 7 days of hour-long chunks");
    let end = (now - MIN) / MIN * MIN;
    let sink = rows(
        &engine,
        &format!("SELECT time, host, usage FROM cpu_1h WHERE time < to_timestamp_nanos({end}) ORDER BY 1, 2"),
    )
    .await;
    let direct = rows(
        &engine,
        &format!(
            "SELECT date_bin(INTERVAL '1 minute', time) AS time, host, max(usage) AS usage FROM cpu \
             WHERE time < to_timestamp_nanos({end}) GROUP BY 1, host ORDER BY 1, 2"
        ),
    )
    .await;
    assert_eq!(sink, direct);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_definitions_are_refused_and_nothing_is_stored() {
    let dir = tempfile::tempdir().unwrap();
    let (store, engine, cqs) = started(dir.path(), None);
    history(&store, now_nanos());
    for (sql, expected) in [
        (
            "CREATE CONTINUOUS QUERY q EVERY '500ms' INTO x AS SELECT date_bin(INTERVAL '1 minute', time) AS time, avg(usage) AS u FROM cpu GROUP BY 1",
            "too short",
        ),
        (
            "CREATE CONTINUOUS QUERY q INTO x AS SELECT host, avg(usage) AS u FROM cpu GROUP BY host",
            "time bucket",
        ),
        (
            "CREATE CONTINUOUS QUERY q INTO x AS SELECT date_bin(INTERVAL '1 minute', time) AS time, avg(nosuch) AS u FROM cpu GROUP BY 1",
            "nosuch",
        ),
        (
            "CREATE CONTINUOUS QUERY q INTO cpu AS SELECT date_bin(INTERVAL '1 minute', time) AS time, avg(usage) AS usage FROM cpu GROUP BY 1",
            "reads and writes",
        ),
        (
            "CREATE CONTINUOUS QUERY q INTO forestall_x AS SELECT date_bin(INTERVAL '1 minute', time) AS time, avg(usage) AS u FROM cpu GROUP BY 1",
            "Forestall's own",
        ),
        (
            "CREATE CONTINUOUS QUERY q HEALTH WARN WHEN v > 1 AS SELECT host, max(usage) AS v FROM cpu GROUP BY host",
            "component",
        ),
        (
            "CREATE CONTINUOUS QUERY q HEALTH WARN WHEN v + 1 AS SELECT host AS component, max(usage) AS v FROM cpu GROUP BY host",
            "conditions",
        ),
        (
            "CREATE CONTINUOUS QUERY q NOTIFY 'ftp://x' AS SELECT host FROM cpu",
            "http://",
        ),
        (
            "CREATE CONTINUOUS QUERY q INTO x AS SELECT date_bin(INTERVAL '1 minute', time) AS time, avg(usage) AS u FROM cpu GROUP BY 1; DROP TABLE y",
            "one SELECT",
        ),
        ("DROP CONTINUOUS QUERY nosuch", "does not exist"),
    ] {
        let e = engine.sql(sql).await.unwrap_err().to_string();
        assert!(e.contains(expected), "{sql}: {e}");
    }
    assert!(store.entries().list("cq/").unwrap().is_empty());
    assert!(cqs.definitions().is_empty());
    // A query over a measurement not written yet is accepted: it starts when data comes.
    engine
        .sql("CREATE CONTINUOUS QUERY later INTO later_1m AS SELECT date_bin(INTERVAL '1 minute', time) AS time, avg(x) AS x FROM not_yet GROUP BY 1")
        .await
        .unwrap();
    let e = engine
        .sql("CREATE CONTINUOUS QUERY later INTO other AS SELECT date_bin(INTERVAL '1 minute', time) AS time, avg(x) AS x FROM not_yet GROUP BY 1")
        .await
        .unwrap_err();
    assert!(matches!(e, crate::Error::Exists(_)), "{e}");
    let again = engine
        .sql("CREATE CONTINUOUS QUERY IF NOT EXISTS later INTO other AS SELECT date_bin(INTERVAL '1 minute', time) AS time, avg(x) AS x FROM not_yet GROUP BY 1")
        .await
        .unwrap();
    assert!(format!("{:?}", again.1).contains("exists"));
    assert_eq!(store.entries().list("cq/def/").unwrap().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_on_write_query_fires_after_the_write_that_brought_its_rows() {
    let dir = tempfile::tempdir().unwrap();
    let (store, engine, cqs) = started(dir.path(), None);
    write(&store, &format!("lat,service=web p99=0.1 {}", now_nanos()));
    engine
        .sql("CREATE CONTINUOUS QUERY lat_10s ON WRITE LATENESS '1 hour' INTO lat_10s AS \
              SELECT date_bin(INTERVAL '10 seconds', time) AS time, service, max(p99) AS p99 FROM lat GROUP BY 1, service")
        .await
        .unwrap();
    // A lateness of an hour: a scheduled query would not show this bucket for an hour.
    let t = now_nanos();
    write(&store, &format!("lat,service=web p99=0.75 {t}"));
    eventually("the on-write run", || {
        let engine = engine.clone();
        async move {
            engine
                .sql("SELECT max(p99) AS m FROM lat_10s")
                .await
                .is_ok_and(|(_, b)| {
                    pretty_format_batches(&b)
                        .unwrap()
                        .to_string()
                        .contains("0.75")
                })
        }
    })
    .await;
    let runs = cqs.describe("lat_10s").unwrap()["status"]["runs"]
        .as_u64()
        .unwrap();
    assert!(runs >= 1);
    tokio::time::sleep(Duration::from_millis(300)).await;
    // No write, no run.
    assert_eq!(
        cqs.describe("lat_10s").unwrap()["status"]["runs"]
            .as_u64()
            .unwrap(),
        runs
    );
}

/// Records what queries ask for (the server's side of the seam is tested end to end).
#[derive(Debug, Default)]
struct Recorder(
    std::sync::Mutex<Vec<(String, Notification)>>,
    std::sync::Mutex<Vec<(String, Vec<AllocationRequest>)>>,
);

#[async_trait::async_trait]
impl ActionSink for Recorder {
    async fn notify(&self, url: &str, event: &Notification) -> std::result::Result<(), String> {
        self.0.lock().unwrap().push((url.to_owned(), event.clone()));
        Ok(())
    }

    async fn allocate(
        &self,
        query: &str,
        requests: Vec<AllocationRequest>,
    ) -> std::result::Result<(), String> {
        self.1.lock().unwrap().push((query.to_owned(), requests));
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allocation_queries_deliver_their_rows_and_withdraw_them_when_dropped() {
    let dir = tempfile::tempdir().unwrap();
    let recorder = Arc::new(Recorder::default());
    let (store, engine, cqs) = started(dir.path(), Some(recorder.clone() as ActionSinkRef));
    write(
        &store,
        &format!("latency,service=web p99=0.1 {}", now_nanos()),
    );
    for (sql, expected) in [
        (
            "CREATE CONTINUOUS QUERY a ALLOCATE AS SELECT service AS component, max(p99) AS demand FROM latency GROUP BY service",
            "resource",
        ),
        (
            "CREATE CONTINUOUS QUERY a ALLOCATE AS SELECT service AS component, 'cpu' AS resource FROM latency GROUP BY service",
            "amount",
        ),
        (
            "CREATE CONTINUOUS QUERY a ALLOCATE AS SELECT service AS component, 'cpu' AS resource, 'x' AS demand FROM latency GROUP BY service",
            "a number",
        ),
    ] {
        let e = engine.sql(sql).await.unwrap_err().to_string();
        assert!(e.contains(expected), "{sql}: {e}");
    }
    engine
        .sql(
            "CREATE CONTINUOUS QUERY web_cpu ON WRITE ALLOCATE AS \
              SELECT service AS component, 'cpu' AS resource, \
                     CASE WHEN max(p99) > 0.2 THEN max(p99) * 4 END AS demand, 0.9 AS risk \
              FROM latency WHERE time > now() - INTERVAL '1 minute' GROUP BY service",
        )
        .await
        .unwrap();
    write(
        &store,
        &format!("latency,service=web p99=0.5 {}", now_nanos()),
    );
    let delivered = |want: Option<f64>| {
        let r = recorder.clone();
        async move {
            let deliveries = r.1.lock().unwrap();
            let last = deliveries.iter().rev().find(|(q, _)| q == "web_cpu");
            last.is_some_and(|(_, rows)| {
                rows.len() == usize::from(want.is_some())
                    && rows
                        .iter()
                        .all(|x| x.demand == want && x.risk == Some(0.9) && x.resource == "cpu")
            })
        }
    };
    eventually("a demand of 2 cores", || delivered(Some(2.0))).await;
    // A query over a measurement nobody has written is waiting, not failing.
    engine
        .sql("CREATE CONTINUOUS QUERY idle EVERY '1s' ALLOCATE AS SELECT host AS component, 'mem' AS resource, max(rss) AS usage FROM not_written GROUP BY host")
        .await
        .unwrap();
    eventually("a run of the waiting query", || {
        let cqs = cqs.clone();
        async move { cqs.describe("idle").unwrap()["status"]["runs"].as_u64() >= Some(1) }
    })
    .await;
    let status = &cqs.describe("idle").unwrap()["status"];
    assert_eq!(status["failures"], 0, "{status}");
    assert!(
        status["note"].as_str().unwrap().contains("not_written"),
        "{status}"
    );
    assert!(engine.sql("DROP CONTINUOUS QUERY web_cpu").await.is_ok());
    // Dropping it withdraws what it asked for.
    assert!(delivered(None).await);
}

/// A built-in `ALLOCATE` query reading `field` of `usage`.
fn builtin(name: &str, field: &str) -> DefinitionSpec {
    DefinitionSpec {
        name: Some(name.into()),
        every: Some("1h".into()),
        allocate: true,
        query: format!(
            "SELECT CAST(host AS VARCHAR) AS component, 'cpu' AS resource, avg({field}) AS usage \
             FROM usage GROUP BY 1"
        ),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn builtin_queries_wait_for_their_fields_run_on_request_and_yield_to_a_user() {
    let dir = tempfile::tempdir().unwrap();
    let recorder = Arc::new(Recorder::default());
    let (store, engine, cqs) = started(dir.path(), Some(recorder.clone() as ActionSinkRef));
    write(&store, &format!("usage,host=a mem=1 {}", now_nanos()));
    // Typed in, a field nobody has written is refused as the typo it most likely is.
    let e = engine
        .sql("CREATE CONTINUOUS QUERY typo EVERY '1h' ALLOCATE AS SELECT host AS component, 'cpu' AS resource, avg(cpuu) AS usage FROM usage GROUP BY 1")
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("cpuu"), "{e}");
    // Declared by Forestall, it waits for its field.
    cqs.reconcile_builtin(vec![builtin("u_cpu", "cpu"), builtin("u_mem", "mem")])
        .await
        .unwrap();
    let status = cqs.run_now("u_cpu").await.unwrap();
    assert_eq!(status["status"]["failures"], 0, "{status}");
    assert!(
        status["status"]["note"]
            .as_str()
            .is_some_and(|n| n.contains("no cpu has been written to usage")),
        "{status}"
    );
    assert_eq!(status["definition"]["builtin"], true, "{status}");
    assert!(cqs.run_now("nonexistent").await.is_none());
    // Once the field comes, a run asked for delivers it, and records it with its query.
    write(&store, &format!("usage,host=a cpu=0.5 {}", now_nanos()));
    let status = cqs.run_now("u_cpu").await.unwrap();
    assert_eq!(
        status["status"]["note"],
        serde_json::Value::Null,
        "{status}"
    );
    let last = recorder.1.lock().unwrap().last().cloned().unwrap();
    assert_eq!(last.0, "u_cpu");
    assert_eq!(last.1[0].usage, Some(0.5));
    assert_eq!(
        rows(
            &engine,
            "SELECT query, component, resource, usage FROM forestall_allocation_requests WHERE query = 'u_cpu'"
        )
        .await,
        "+-------+-----------+----------+-------+\n\
         | query | component | resource | usage |\n\
         +-------+-----------+----------+-------+\n\
         | u_cpu | a         | cpu      | 0.5   |\n\
         +-------+-----------+----------+-------+"
    );
    // A user's replacement is theirs: the next reconciliation leaves it, and drops the
    // built-in no longer declared.
    engine
        .sql("CREATE OR REPLACE CONTINUOUS QUERY u_cpu EVERY '1h' ALLOCATE AS SELECT host AS component, 'cpu' AS resource, max(cpu) AS usage FROM usage GROUP BY 1")
        .await
        .unwrap();
    cqs.reconcile_builtin(vec![builtin("u_cpu", "cpu")])
        .await
        .unwrap();
    let names: Vec<String> = cqs.definitions().into_iter().map(|d| d.name).collect();
    assert_eq!(names, ["u_cpu"]);
    let def = &cqs.describe("u_cpu").unwrap()["definition"];
    assert!(def["query"].as_str().unwrap().contains("max(cpu)"), "{def}");
    assert_eq!(def.get("builtin"), None, "{def}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_checks_and_notifications_follow_their_conditions() {
    let dir = tempfile::tempdir().unwrap();
    let recorder = Arc::new(Recorder::default());
    let (store, engine, cqs) = started(dir.path(), Some(recorder.clone() as ActionSinkRef));
    let level = |v: f64| {
        write(&store, &format!("disk,host=db used={v} {}", now_nanos()));
    };
    level(50.0);
    engine
        .sql("CREATE CONTINUOUS QUERY disk ON WRITE HEALTH WARN WHEN value > 80 FAIL WHEN value > 95 \
              AS SELECT host AS component, last_value(used ORDER BY time) AS value FROM disk GROUP BY host")
        .await
        .unwrap();
    engine
        .sql("CREATE CONTINUOUS QUERY disk_alert ON WRITE NOTIFY 'http://127.0.0.1:1/hook' WHEN value > 95 \
              AS SELECT host, last_value(used ORDER BY time) AS value FROM disk GROUP BY host")
        .await
        .unwrap();
    let status_is = |want: HealthStatus| {
        let cqs = cqs.clone();
        async move { cqs.component_health("db") == Some(want) }
    };
    for (v, want) in [
        (50.0, HealthStatus::Pass),
        (90.0, HealthStatus::Warn),
        (99.0, HealthStatus::Fail),
        (40.0, HealthStatus::Pass),
    ] {
        level(v);
        eventually(&format!("{want:?} at {v}"), || status_is(want)).await;
    }
    let history = rows(
        &engine,
        "SELECT status, changed FROM forestall_health WHERE component = 'db' AND changed ORDER BY time",
    )
    .await;
    for s in ["pass", "warn", "fail"] {
        assert!(history.contains(s), "{history}");
    }
    eventually("the resolved notification", || {
        let r = recorder.clone();
        async move {
            r.0.lock()
                .unwrap()
                .iter()
                .any(|(_, n)| n.status == "resolved")
        }
    })
    .await;
    let events: Vec<String> = recorder
        .0
        .lock()
        .unwrap()
        .iter()
        .map(|(_, n)| format!("{} {}", n.status, n.key["host"]))
        .collect();
    assert_eq!(events, vec!["firing db", "resolved db"]);
}
