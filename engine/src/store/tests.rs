use super::*;
use crate::scan::TagPredicate;
use arrow::array::{Array, ArrayAccessor, AsArray, RecordBatch};
use arrow::compute::concat_batches;
use arrow::datatypes::{Float64Type, Int32Type, Int64Type, TimestampNanosecondType};
use std::collections::BTreeSet;

const DAY: i64 = 86_400_000_000_000;
/// 2026-01-01T00:00:00Z, a partition boundary.
const T0: i64 = 1_767_225_600_000_000_000;

fn config(dir: &std::path::Path) -> EngineConfig {
    EngineConfig {
        data_dir: dir.to_path_buf(),
        // Nothing runs in the background unless a test asks for it.
        flush: crate::config::FlushConfig {
            interval: Duration::from_secs(3600),
            ..Default::default()
        },
        compaction: crate::config::CompactionConfig {
            interval: Duration::from_secs(3600),
            ..Default::default()
        },
        ..Default::default()
    }
}

fn open(dir: &std::path::Path) -> Store {
    Store::open(config(dir)).unwrap()
}

/// A store whose flushes write row groups of `rows` rows.
fn open_with_row_groups(dir: &std::path::Path, rows: usize) -> Store {
    let mut cfg = config(dir);
    cfg.flush.row_group_rows = rows;
    Store::open(cfg).unwrap()
}

fn write(store: &Store, body: &str) -> WriteOutcome {
    store
        .write(body.as_bytes(), Precision::Nanoseconds, T0)
        .unwrap()
}

fn collect(store: &Store, req: &ScanRequest) -> RecordBatch {
    let stream = store.scan(req).unwrap();
    let schema = stream.schema();
    let batches: Vec<_> = stream.map(|b| b.unwrap()).collect();
    concat_batches(&schema, &batches).unwrap()
}

/// Rows as (host, time, usage) sorted, for order-independent comparison.
fn rows(batch: &RecordBatch) -> Vec<(Option<String>, i64, Option<f64>)> {
    let times = batch
        .column_by_name("time")
        .unwrap()
        .as_primitive::<TimestampNanosecondType>();
    let host = batch.column_by_name("host").map(|c| {
        c.as_dictionary::<Int32Type>()
            .downcast_dict::<arrow::array::StringArray>()
            .unwrap()
    });
    let usage = batch
        .column_by_name("usage")
        .map(|c| c.as_primitive::<Float64Type>().clone());
    let mut out: Vec<_> = (0..batch.num_rows())
        .map(|i| {
            let h = host
                .as_ref()
                .and_then(|h| h.is_valid(i).then(|| h.value(i).to_string()));
            let u = usage
                .as_ref()
                .and_then(|u| u.is_valid(i).then(|| u.value(i)));
            (h, times.value(i), u)
        })
        .collect();
    out.sort_by(|a, b| a.partial_cmp(b).unwrap());
    out
}

fn body(hosts: usize, points: usize, start: i64) -> String {
    let mut s = String::new();
    for p in 0..points {
        for h in 0..hosts {
            s.push_str(&format!(
                "cpu,host=h{h},region=r{} usage={}.5 {}\n",
                h % 3,
                p,
                start + p as i64 * 10_000_000_000
            ));
        }
    }
    s
}

#[test]
fn writes_are_visible_at_once_and_after_flush_and_restart() {
    let dir = tempfile::tempdir().unwrap();
    let expected;
    {
        let store = open(dir.path());
        let o = write(&store, &body(5, 20, T0));
        assert_eq!(
            (o.accepted_lines, o.accepted_values, o.rejected_lines),
            (100, 100, 0)
        );
        let before = rows(&collect(&store, &ScanRequest::all("cpu")));
        assert_eq!(before.len(), 100);
        store.flush().unwrap();
        assert_eq!(store.segments().len(), 1);
        assert_eq!(rows(&collect(&store, &ScanRequest::all("cpu"))), before);
        // More data after the flush: served from buffer and segment together.
        write(&store, &body(5, 1, T0 + 3_600_000_000_000));
        expected = rows(&collect(&store, &ScanRequest::all("cpu")));
        assert_eq!(expected.len(), 105);
        store.shutdown().unwrap();
    }
    let (store, report) = Store::open_with_report(config(dir.path())).unwrap();
    assert_eq!(report.segments, 2);
    assert_eq!(report.replayed_lines, 0, "shutdown flushed everything");
    assert_eq!(rows(&collect(&store, &ScanRequest::all("cpu"))), expected);
    let schema = store.table("cpu").unwrap();
    assert_eq!(schema.columns.len(), 3);
    assert_eq!(store.metrics().series.load(Ordering::Relaxed), 5);
}

#[test]
fn unflushed_writes_are_replayed_from_the_wal() {
    let dir = tempfile::tempdir().unwrap();
    {
        let store = open(dir.path());
        write(&store, &body(3, 4, T0));
        store.flush().unwrap();
        write(&store, &body(3, 2, T0 + DAY));
        // Dropped without shutdown: the second write lives only in the WAL.
    }
    let (store, report) = Store::open_with_report(config(dir.path())).unwrap();
    assert_eq!(report.replayed_lines, 6);
    assert_eq!(rows(&collect(&store, &ScanRequest::all("cpu"))).len(), 18);
    // Flushing and reopening neither loses nor doubles anything.
    store.flush().unwrap();
    drop(store);
    let (store, report) = Store::open_with_report(config(dir.path())).unwrap();
    assert_eq!(report.replayed_lines, 0);
    assert_eq!(rows(&collect(&store, &ScanRequest::all("cpu"))).len(), 18);
}

#[test]
fn series_ids_are_stable_across_restarts() {
    let dir = tempfile::tempdir().unwrap();
    let first: Vec<(String, u32)>;
    {
        let store = open(dir.path());
        write(&store, &body(4, 1, T0));
        store.flush().unwrap();
        first = store
            .inner
            .series
            .lock()
            .by_key
            .iter()
            .map(|(k, v)| (k.to_string(), *v))
            .collect();
        store.shutdown().unwrap();
    }
    let store = open(dir.path());
    write(
        &store,
        &format!("{}cpu,host=new,region=x usage=1 {T0}\n", body(4, 1, T0 + 1)),
    );
    store.flush().unwrap();
    let reg = store.inner.series.lock();
    for (k, id) in &first {
        assert_eq!(reg.by_key.get(k.as_str()), Some(id), "{k}");
    }
    let new_id = reg.by_key["cpu,host=new,region=x"];
    assert!(first.iter().all(|(_, id)| *id < new_id));
}

#[test]
fn partial_writes_keep_valid_lines_and_explain_the_rest() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    write(&store, &format!("m,host=a v=1,n=1i {T0}"));
    let o = write(
        &store,
        &format!(
            "m,host=a v=2 {}\nm,host=a v=\"text\" {}\nm,v=x n=1 {}\nbroken line\nm,host=b v=3,n=2i {}",
            T0 + 1,
            T0 + 2,
            T0 + 3,
            T0 + 4
        ),
    );
    assert_eq!(o.accepted_lines, 2);
    assert_eq!(o.rejected_lines, 3);
    let reasons: Vec<_> = o
        .errors
        .iter()
        .map(|e| (e.line, e.reason.clone()))
        .collect();
    assert_eq!(reasons[0].0, 2);
    assert!(
        reasons[0]
            .1
            .contains("field \"v\" of \"m\" is float, got string"),
        "{reasons:?}"
    );
    assert_eq!(reasons[1].0, 3);
    assert!(
        reasons[1].1.contains("\"v\" is a float field"),
        "{reasons:?}"
    );
    assert_eq!(reasons[2].0, 4);
    assert_eq!(
        store.metrics().lines_rejected_total.load(Ordering::Relaxed),
        3
    );
    // Only accepted lines reach the WAL: a replay sees exactly the same rows.
    drop(store);
    let store = open(dir.path());
    let b = collect(&store, &ScanRequest::all("m"));
    assert_eq!(b.num_rows(), 3);
    assert_eq!(store.table("m").unwrap().columns.len(), 3);
}

#[test]
fn schema_evolution_reads_null_for_old_rows() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    write(&store, &format!("cpu,host=a usage=1 {T0}"));
    store.flush().unwrap();
    write(
        &store,
        &format!("cpu,host=a,dc=x usage=2,temp=30i {}", T0 + 1),
    );
    let b = collect(&store, &ScanRequest::all("cpu"));
    let names: Vec<_> = b
        .schema()
        .fields()
        .iter()
        .map(|f| f.name().clone())
        .collect();
    assert_eq!(names, ["time", "dc", "host", "temp", "usage"]);
    let temp = b
        .column_by_name("temp")
        .unwrap()
        .as_primitive::<Int64Type>();
    let times = b
        .column_by_name("time")
        .unwrap()
        .as_primitive::<TimestampNanosecondType>();
    for i in 0..2 {
        if times.value(i) == T0 {
            assert!(temp.is_null(i) && b.column_by_name("dc").unwrap().is_null(i));
        } else {
            assert_eq!(temp.value(i), 30);
        }
    }
}

#[test]
fn time_range_predicate_and_projection() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    write(&store, &body(6, 10, T0));
    store.flush().unwrap();
    write(&store, &body(6, 10, T0 + 100_000_000_000));
    let req = ScanRequest {
        measurement: "cpu".into(),
        start: T0 + 50_000_000_000,
        end: T0 + 150_000_000_000,
        predicate: Some(TagPredicate::Eq("host".into(), "h1".into())),
        projection: Some(vec!["usage".into(), "host".into(), "time".into()]),
        filter: None,
    };
    let b = collect(&store, &req);
    let names: Vec<_> = b
        .schema()
        .fields()
        .iter()
        .map(|f| f.name().clone())
        .collect();
    assert_eq!(names, ["usage", "host", "time"]);
    let r = rows(&b);
    assert_eq!(r.len(), 10);
    assert!(
        r.iter()
            .all(|(h, t, _)| h.as_deref() == Some("h1") && *t >= req.start && *t < req.end)
    );
    // An empty projection still counts rows (SQL's count(*)).
    let count = ScanRequest {
        projection: Some(vec![]),
        ..req.clone()
    };
    let n: usize = store
        .scan(&count)
        .unwrap()
        .map(|b| b.unwrap().num_rows())
        .sum();
    assert_eq!(n, 10);
    // Unknown measurement and column are errors, not empty results.
    assert!(matches!(
        store.scan(&ScanRequest::all("nope")),
        Err(Error::UnknownMeasurement(_))
    ));
    let bad = ScanRequest {
        projection: Some(vec!["nope".into()]),
        ..ScanRequest::all("cpu")
    };
    assert!(
        store
            .scan(&bad)
            .unwrap_err()
            .to_string()
            .contains("no column \"nope\"")
    );
}

#[test]
fn segments_are_pruned_by_time_and_series_bitmap() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    // Three segments: hosts a/b in hour 0, host c in hour 0, hosts a/b in hour 5.
    write(
        &store,
        &format!("cpu,host=a usage=1 {T0}\ncpu,host=b usage=1 {T0}"),
    );
    store.flush().unwrap();
    write(&store, &format!("cpu,host=c usage=1 {T0}"));
    store.flush().unwrap();
    write(
        &store,
        &format!(
            "cpu,host=a usage=2 {}\ncpu,host=b usage=2 {}",
            T0 + 5 * 3_600_000_000_000,
            T0 + 5 * 3_600_000_000_000
        ),
    );
    store.flush().unwrap();
    let req = ScanRequest {
        predicate: Some(TagPredicate::Eq("host".into(), "c".into())),
        ..ScanRequest::all("cpu")
    };
    let stream = store.scan(&req).unwrap();
    assert_eq!((stream.segments_to_read(), stream.segments_pruned), (1, 2));
    let req = ScanRequest {
        start: T0 + 3_600_000_000_000,
        ..ScanRequest::all("cpu")
    };
    let stream = store.scan(&req).unwrap();
    assert_eq!((stream.segments_to_read(), stream.segments_pruned), (1, 2));
}

#[test]
fn one_series_for_one_hour_decodes_only_its_pages() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    // 50 hosts x 12 h at 10 s: 216,000 rows in one segment, sorted by (series, time).
    let step = 10_000_000_000;
    let hour = 3_600_000_000_000;
    let mut body = String::new();
    for h in 0..50 {
        for i in 0..(12 * 360) {
            body.push_str(&format!("cpu,host=h{h} usage={i} {}\n", T0 + i * step));
        }
    }
    write(&store, &body);
    store.flush().unwrap();
    let req = ScanRequest {
        start: T0 + 5 * hour,
        end: T0 + 6 * hour,
        predicate: Some(TagPredicate::Eq("host".into(), "h17".into())),
        ..ScanRequest::all("cpu")
    };
    let mut stream = store.scan(&req).unwrap();
    let batches: Vec<_> = stream.by_ref().map(|b| b.unwrap()).collect();
    let got: usize = batches.iter().map(|b| b.num_rows()).sum();
    assert_eq!(got, 360, "one hour of one host");
    let read = stream.read;
    assert_eq!(read.rows_in_row_groups, 50 * 12 * 360);
    // The hour sits in one or two pages.
    assert!(
        read.rows_decoded <= 2 * crate::segment::PAGE_ROWS,
        "decoded {} of {} rows",
        read.rows_decoded,
        read.rows_in_row_groups
    );
    // A host that does not exist opens no page, and the whole range decodes every row.
    let none = ScanRequest {
        predicate: Some(TagPredicate::Eq("host".into(), "nope".into())),
        ..req.clone()
    };
    assert_eq!(collect(&store, &none).num_rows(), 0);
    let mut all = store.scan(&ScanRequest::all("cpu")).unwrap();
    assert_eq!(
        all.by_ref().map(|b| b.unwrap().num_rows()).sum::<usize>(),
        216_000
    );
    assert_eq!(all.read.rows_decoded, 216_000);
}

/// A read decodes the columns asked for only at the rows that match. Its answer is exact
/// when the rows it keeps cross row groups (so tag dictionaries), when the window cuts pages,
/// and when no column is asked for at all (`count(*)`).
#[test]
fn reads_return_exactly_the_matching_rows_across_row_groups() {
    let dir = tempfile::tempdir().unwrap();
    let store = open_with_row_groups(dir.path(), 4096);
    // 8 hosts x 2,000 points: four row groups, each host crossing a row-group boundary.
    let step = 10_000_000_000;
    let mut body = String::new();
    for h in 0..8 {
        for i in 0..2000 {
            body.push_str(&format!("cpu,host=h{h} usage={i} {}\n", T0 + i * step));
        }
    }
    write(&store, &body);
    store.flush().unwrap();
    let (lo, hi) = (300, 1700);
    let hosts = ["h1", "h2", "h6"];
    let req = ScanRequest {
        start: T0 + lo * step,
        end: T0 + hi * step,
        predicate: Some(TagPredicate::Or(
            hosts
                .iter()
                .map(|h| TagPredicate::Eq("host".into(), h.to_string()))
                .collect(),
        )),
        ..ScanRequest::all("cpu")
    };
    let mut expected: Vec<_> = hosts
        .iter()
        .flat_map(|h| (lo..hi).map(move |i| (Some(h.to_string()), T0 + i * step, Some(i as f64))))
        .collect();
    expected.sort_by(|a, b| a.partial_cmp(b).unwrap());
    assert_eq!(rows(&collect(&store, &req)), expected);
    // No column: only the number of rows.
    let count = ScanRequest {
        projection: Some(Vec::new()),
        ..req.clone()
    };
    let batch = collect(&store, &count);
    assert_eq!((batch.num_columns(), batch.num_rows()), (0, expected.len()));
    // One column, not the keys: the values of the matching rows.
    let usage = ScanRequest {
        projection: Some(vec!["usage".into()]),
        ..req
    };
    let batch = collect(&store, &usage);
    assert_eq!(batch.num_columns(), 1);
    let mut got: Vec<f64> = batch
        .column(0)
        .as_primitive::<Float64Type>()
        .values()
        .to_vec();
    got.sort_by(f64::total_cmp);
    let mut want: Vec<f64> = expected.iter().map(|r| r.2.unwrap()).collect();
    want.sort_by(f64::total_cmp);
    assert_eq!(got, want);
}

#[test]
fn index_and_buffer_evaluate_predicates_identically() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let mut text = String::new();
    for i in 0..40 {
        let dc = if i % 5 == 0 {
            String::new()
        } else {
            format!(",dc=d{}", i % 4)
        };
        text.push_str(&format!(
            "cpu,host=h{i}{dc},team=t{} usage={i} {}\n",
            i % 3,
            T0 + i
        ));
    }
    write(&store, &text);
    let preds = vec![
        TagPredicate::Eq("dc".into(), "d1".into()),
        TagPredicate::NotEq("dc".into(), "d1".into()),
        TagPredicate::In("team".into(), vec!["t0".into(), "t2".into(), "zz".into()]),
        TagPredicate::Regex("host".into(), regex::Regex::new("^h1[0-9]$").unwrap()),
        TagPredicate::NotRegex("host".into(), regex::Regex::new("3").unwrap()),
        TagPredicate::Exists("dc".into()),
        TagPredicate::Not(Box::new(TagPredicate::Exists("dc".into()))),
        TagPredicate::And(vec![
            TagPredicate::Eq("team".into(), "t1".into()),
            TagPredicate::NotEq("dc".into(), "d3".into()),
        ]),
        TagPredicate::Or(vec![
            TagPredicate::Eq("host".into(), "h7".into()),
            TagPredicate::Eq("dc".into(), "d2".into()),
        ]),
        TagPredicate::Eq("missing".into(), "x".into()),
    ];
    let hosts = |store: &Store, p: &TagPredicate| -> BTreeSet<String> {
        let b = collect(
            store,
            &ScanRequest {
                predicate: Some(p.clone()),
                ..ScanRequest::all("cpu")
            },
        );
        rows(&b).into_iter().filter_map(|(h, _, _)| h).collect()
    };
    let in_buffer: Vec<_> = preds.iter().map(|p| hosts(&store, p)).collect();
    store.flush().unwrap();
    for (p, expected) in preds.iter().zip(&in_buffer) {
        assert_eq!(&hosts(&store, p), expected, "{p:?}");
    }
    assert_eq!(in_buffer[0].len(), 8);
    assert_eq!(in_buffer[5].len(), 32);
    assert_eq!(in_buffer[6].len(), 8);
    assert!(in_buffer[9].is_empty());
}

#[test]
fn duplicate_points_merge_on_flush_and_compaction() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    write(
        &store,
        &format!("cpu,host=a usage=1,x=1i {T0}\ncpu,host=a usage=2 {T0}"),
    );
    store.flush().unwrap();
    let b = collect(&store, &ScanRequest::all("cpu"));
    assert_eq!(rows(&b), vec![(Some("a".into()), T0, Some(2.0))]);
    assert_eq!(
        b.column_by_name("x")
            .unwrap()
            .as_primitive::<Int64Type>()
            .value(0),
        1
    );
    // A later segment overrides usage; compaction merges the two.
    for i in 0..3 {
        write(&store, &format!("cpu,host=a usage={} {T0}", 10 + i));
        store.flush().unwrap();
    }
    assert_eq!(store.compact().unwrap(), 1);
    let b = collect(&store, &ScanRequest::all("cpu"));
    assert_eq!(rows(&b), vec![(Some("a".into()), T0, Some(12.0))]);
    assert_eq!(
        b.column_by_name("x")
            .unwrap()
            .as_primitive::<Int64Type>()
            .value(0),
        1
    );
}

#[test]
fn compaction_merges_small_segments_and_deletes_inputs() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    for i in 0..5 {
        write(&store, &body(20, 30, T0 + i * 1_000_000_000_000));
        store.flush().unwrap();
    }
    let before = rows(&collect(&store, &ScanRequest::all("cpu")));
    let old: Vec<_> = store.segments().iter().map(|s| s.path.clone()).collect();
    assert_eq!(old.len(), 5);
    assert_eq!(store.compact().unwrap(), 1);
    let segs = store.segments();
    assert_eq!(segs.len(), 1);
    assert_eq!(segs[0].meta.level, 1);
    assert_eq!(segs[0].meta.rows, 3000);
    assert_eq!(segs[0].meta.series.cardinality(), 20);
    assert!(old.iter().all(|p| !p.exists()), "inputs deleted");
    assert_eq!(rows(&collect(&store, &ScanRequest::all("cpu"))), before);
    drop(store);
    let store = open(dir.path());
    assert_eq!(rows(&collect(&store, &ScanRequest::all("cpu"))), before);
}

#[test]
fn retention_drops_old_partitions_and_rejects_old_writes() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    write(
        &store,
        &format!(
            "cpu,host=a usage=1 {}\ncpu,host=a usage=2 {}",
            T0 - 3 * DAY,
            T0
        ),
    );
    store.flush().unwrap();
    write(&store, &format!("cpu,host=a usage=3 {}", T0 - 3 * DAY + 1));
    assert_eq!(store.segments().len(), 2);
    assert!(
        store
            .set_retention("cpu", Some(Duration::from_secs(2 * 86_400)))
            .unwrap()
    );
    assert!(!store.set_retention("nope", None).unwrap());
    assert_eq!(store.enforce_retention(T0).unwrap(), 1);
    let r = rows(&collect(&store, &ScanRequest::all("cpu")));
    assert_eq!(r, vec![(Some("a".into()), T0, Some(2.0))]);
    // The second line has the first one's shape: the shortcut must still check its time.
    let o = write(
        &store,
        &format!(
            "cpu,host=a usage=4 {T0}\ncpu,host=a usage=5 {}",
            T0 - 3 * DAY
        ),
    );
    assert_eq!((o.accepted_lines, o.rejected_lines), (1, 1));
    assert_eq!(o.errors[0].line, 2);
    assert!(
        o.errors[0]
            .reason
            .contains("older than the retention period"),
        "{:?}",
        o.errors
    );
    // The period is in the catalog: it survives a restart.
    drop(store);
    let store = open(dir.path());
    assert_eq!(
        store.table("cpu").unwrap().retention,
        Some(Duration::from_secs(2 * 86_400))
    );
}

#[test]
fn corrupt_or_missing_segment_names_the_file_and_the_rest_is_served() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    write(&store, &format!("cpu,host=a usage=1 {T0}"));
    store.flush().unwrap();
    write(&store, &format!("cpu,host=b usage=2 {T0}"));
    store.flush().unwrap();
    write(&store, &format!("cpu,host=c usage=3 {T0}"));
    store.flush().unwrap();
    let segs = store.segments();
    std::fs::write(&segs[0].path, b"PAR1 this is not parquet").unwrap();
    std::fs::remove_file(&segs[1].path).unwrap();
    let results: Vec<_> = store.scan(&ScanRequest::all("cpu")).unwrap().collect();
    let errors: Vec<String> = results
        .iter()
        .filter_map(|r| r.as_ref().err())
        .map(|e| e.to_string())
        .collect();
    assert_eq!(errors.len(), 2, "{errors:?}");
    assert!(
        errors[0].contains(&segs[0].path.display().to_string()),
        "{}",
        errors[0]
    );
    assert!(
        errors[1].contains(&segs[1].path.display().to_string()),
        "{}",
        errors[1]
    );
    let good: Vec<_> = results.into_iter().filter_map(|r| r.ok()).collect();
    assert_eq!(good.iter().map(|b| b.num_rows()).sum::<usize>(), 1);
    assert_eq!(
        store
            .metrics()
            .segment_read_errors_total
            .load(Ordering::Relaxed),
        2
    );
    drop(store);
    let (_store, report) = Store::open_with_report(config(dir.path())).unwrap();
    assert_eq!(report.missing_segments, vec![segs[1].path.clone()]);
}

#[test]
fn orphan_files_from_an_interrupted_flush_are_removed() {
    let dir = tempfile::tempdir().unwrap();
    {
        let store = open(dir.path());
        write(&store, &format!("cpu,host=a usage=1 {T0}"));
        store.shutdown().unwrap();
    }
    let segs = dir.path().join("segments");
    std::fs::write(segs.join("00000000000000099999.parquet"), b"partial").unwrap();
    std::fs::write(segs.join("00000000000000099998.parquet.tmp"), b"partial").unwrap();
    let (store, report) = Store::open_with_report(config(dir.path())).unwrap();
    assert_eq!(report.orphans_removed, 2);
    assert_eq!(collect(&store, &ScanRequest::all("cpu")).num_rows(), 1);
}

#[test]
fn buffer_size_triggers_a_background_flush() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path());
    cfg.flush.max_buffer_bytes = 1 << 20;
    let store = Store::open(cfg).unwrap();
    let mut i = 0;
    while store.metrics().flushes_total.load(Ordering::Relaxed) == 0 && i < 2000 {
        write(&store, &body(50, 10, T0 + i * 1_000_000_000_000));
        i += 1;
        if i % 20 == 0 {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    // Wait (bounded) for the background flush to finish.
    for _ in 0..500 {
        if !store.segments().is_empty() {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(
        !store.segments().is_empty(),
        "a flush ran without being called"
    );
    assert_eq!(
        collect(&store, &ScanRequest::all("cpu")).num_rows(),
        i as usize * 500
    );
}

#[test]
fn writes_after_shutdown_fail_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    store.shutdown().unwrap();
    store.shutdown().unwrap();
    assert!(matches!(
        store.write(b"m v=1", Precision::Nanoseconds, T0),
        Err(Error::ShuttingDown)
    ));
}

/// 50 hosts × 360 points, 10 s apart, of 10 integer fields in a random walk within 0–100:
/// `each(host, time, values)`.
fn random_walk(mut each: impl FnMut(usize, i64, &[i64; 10])) {
    let mut state = [50i64; 10];
    let mut seed = 7u64;
    for p in 0..360 {
        for h in 0..50 {
            for v in state.iter_mut() {
                seed = seed
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                *v = (*v + (seed >> 61) as i64 - 3).clamp(0, 100);
            }
            each(h, T0 + p * 10_000_000_000, &state);
        }
    }
}

#[test]
fn segment_files_are_small_for_regular_metrics() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let mut text = String::new();
    random_walk(|h, t, values| {
        text.push_str(&format!("cpu,hostname=host_{h},region=eu,rack={} ", h % 7));
        for (f, v) in values.iter().enumerate() {
            text.push_str(&format!("{}usage_{f}={v}i", if f == 0 { "" } else { "," }));
        }
        text.push_str(&format!(" {t}\n"));
    });
    write(&store, &text);
    store.flush().unwrap();
    let bytes: u64 = store.segments().iter().map(|s| s.meta.bytes).sum();
    let values = 50 * 360 * 10;
    let per_value = bytes as f64 / values as f64;
    // Raw values are 8 bytes; the encodings must do far better (the footer is included).
    assert!(per_value < 1.0, "{per_value:.3} bytes per value");
    // Only field chunks need a ZSTD context (whose creation is costly) to be read: the keys
    // every read decodes are LZ4, the tags uncompressed.
    use parquet::basic::Compression;
    use parquet::file::reader::FileReader;
    let file = std::fs::File::open(&store.segments()[0].path).unwrap();
    let reader = parquet::file::reader::SerializedFileReader::new(file).unwrap();
    for column in reader.metadata().row_group(0).columns() {
        let name = column.column_path().string();
        let expected = match name.as_str() {
            "time" | "__series_id" => "LZ4_RAW",
            "hostname" | "region" | "rack" => "UNCOMPRESSED",
            _ => "ZSTD",
        };
        let codec = match column.compression() {
            Compression::ZSTD(_) => "ZSTD".to_string(),
            other => other.to_string(),
        };
        assert_eq!(codec, expected, "{name}");
    }
}

#[test]
fn flush_writes_many_row_groups_without_losing_or_reordering_rows() {
    let dir = tempfile::tempdir().unwrap();
    let store = open_with_row_groups(dir.path(), 1024);
    write(&store, &body(7, 700, T0));
    // Duplicates of some points, to take the merging path too.
    write(&store, &body(2, 100, T0));
    let before = rows(&collect(&store, &ScanRequest::all("cpu")));
    store.flush().unwrap();
    let seg = &store.segments()[0];
    assert_eq!(seg.meta.rows, 4900);
    let file = std::fs::File::open(&seg.path).unwrap();
    let reader = parquet::file::reader::SerializedFileReader::new(file).unwrap();
    use parquet::file::reader::FileReader;
    assert_eq!(reader.metadata().num_row_groups(), 5);
    let mut after = rows(&collect(&store, &ScanRequest::all("cpu")));
    let mut expected = before;
    expected.dedup_by(|a, b| a.0 == b.0 && a.1 == b.1);
    after.dedup();
    assert_eq!(after, expected);
    // Within the file, rows are in (series, time) order.
    let stream = store.scan(&ScanRequest::all("cpu")).unwrap();
    let mut last: Option<(String, i64)> = None;
    for b in stream {
        for (h, t, _) in rows_in_order(&b.unwrap()) {
            let key = (h.unwrap(), t);
            if let Some(prev) = &last {
                assert!(prev.0 != key.0 || prev.1 < key.1, "{prev:?} then {key:?}");
            }
            last = Some(key);
        }
    }
}

fn rows_in_order(batch: &RecordBatch) -> Vec<(Option<String>, i64, Option<f64>)> {
    let times = batch
        .column_by_name("time")
        .unwrap()
        .as_primitive::<TimestampNanosecondType>();
    let host = batch
        .column_by_name("host")
        .unwrap()
        .as_dictionary::<Int32Type>();
    let host = host.downcast_dict::<arrow::array::StringArray>().unwrap();
    (0..batch.num_rows())
        .map(|i| (Some(host.value(i).to_string()), times.value(i), None))
        .collect()
}

#[test]
fn writes_wait_for_a_stuck_flush_and_then_fail_as_overloaded() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path());
    cfg.flush.max_buffer_bytes = 1 << 20;
    cfg.flush.write_stall_timeout = Duration::from_millis(300);
    let store = Store::open(cfg).unwrap();
    // A flush that cannot make progress: hold the maintenance lock.
    let stuck = store.inner.maintenance.lock();
    let mut result = Ok(WriteOutcome::default());
    for i in 0..1000 {
        result = store.write(
            body(50, 10, T0 + i * 1_000_000_000_000).as_bytes(),
            Precision::Nanoseconds,
            T0,
        );
        if result.is_err() {
            break;
        }
    }
    let err = result.unwrap_err();
    assert!(matches!(err, Error::Overloaded(_)), "{err}");
    assert!(
        store.inner.buffer.lock().bytes() < 3 << 20,
        "memory stayed bounded"
    );
    let rows_before = collect(&store, &ScanRequest::all("cpu")).num_rows();
    // Once flushing resumes, writes are accepted again and nothing acknowledged was lost.
    drop(stuck);
    store
        .write(
            body(50, 10, T0 - 1_000_000_000_000).as_bytes(),
            Precision::Nanoseconds,
            T0,
        )
        .unwrap();
    assert_eq!(
        collect(&store, &ScanRequest::all("cpu")).num_rows(),
        rows_before + 500
    );
}

/// (host, time, usage) of last_rows, sorted by host.
fn last(store: &Store) -> Vec<(Option<String>, i64, Option<f64>)> {
    rows(&store.last_rows("cpu").unwrap().unwrap())
}

#[test]
fn last_rows_merge_segments_and_buffer_and_survive_restarts() {
    let dir = tempfile::tempdir().unwrap();
    let m = 60_000_000_000;
    let store = open(dir.path());
    assert!(store.last_rows("cpu").unwrap().is_none());
    write(
        &store,
        &format!(
            "cpu,host=a usage=1 {T0}\ncpu,host=a usage=2 {}\ncpu,host=b usage=3 {T0}",
            T0 + m
        ),
    );
    store.flush().unwrap();
    // Newer for a, older for b (must not win), and a series the index has not seen yet.
    write(
        &store,
        &format!(
            "cpu,host=a usage=4 {}\ncpu,host=b usage=5 {}\ncpu,host=c usage=6 {T0}",
            T0 + 2 * m,
            T0 - m
        ),
    );
    let want = vec![
        (Some("a".to_string()), T0 + 2 * m, Some(4.0)),
        (Some("b".to_string()), T0, Some(3.0)),
        (Some("c".to_string()), T0, Some(6.0)),
    ];
    assert_eq!(last(&store), want);
    // After a restart: the flushed part from the index, the rest replayed from the WAL.
    store.shutdown().unwrap();
    drop(store);
    let store = open(dir.path());
    assert_eq!(last(&store), want);
    store.flush().unwrap();
    assert_eq!(last(&store), want);
    drop(store);
    let store = open(dir.path());
    assert_eq!(last(&store), want);
    // A store that has segments but no stored last rows rebuilds them from the segments.
    store.inner.state.write().last.clear();
    assert_eq!(last(&store), want);
    // A field added later reads NULL in series that never had it.
    write(&store, &format!("cpu,host=c usage=7,temp=1i {}", T0 + m));
    let b = store.last_rows("cpu").unwrap().unwrap();
    assert_eq!(b.num_rows(), 3);
    assert_eq!(b.column_by_name("temp").unwrap().null_count(), 2);
}

#[test]
fn a_point_written_twice_is_read_once_wherever_its_copies_are() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let m = 60_000_000_000;
    let count = |s: &Store| {
        let mut st = s.scan(&ScanRequest::all("cpu")).unwrap();
        let n: usize = st.by_ref().map(|b| b.unwrap().num_rows()).sum();
        (n, st.duplicates_merged)
    };
    // A retry inside the buffer; the second write carries another field, which merges in.
    write(
        &store,
        &format!("cpu,host=a usage=1 {T0}\ncpu,host=b usage=2 {T0}"),
    );
    write(&store, &format!("cpu,host=a usage=1,temp=9i {T0}"));
    assert_eq!(count(&store), (2, 1));
    let b = collect(&store, &ScanRequest::all("cpu"));
    let temp = b.column_by_name("temp").unwrap();
    assert_eq!(
        temp.null_count(),
        1,
        "a's row has temp from the retry, b's has none"
    );
    // Flushed, then the same point again with a new value: the newer write wins.
    store.flush().unwrap();
    write(&store, &format!("cpu,host=a usage=5 {T0}"));
    assert_eq!(count(&store), (2, 1));
    let got = rows(&collect(&store, &ScanRequest::all("cpu")));
    assert_eq!(got[0], (Some("a".into()), T0, Some(5.0)));
    // Two segments with the same point (no compaction in between).
    store.flush().unwrap();
    assert_eq!(store.segments().len(), 2);
    assert_eq!(count(&store), (2, 1));
    assert_eq!(
        rows(&collect(&store, &ScanRequest::all("cpu")))[0],
        (Some("a".into()), T0, Some(5.0))
    );
    // In-order data in later flushes is not held back and nothing is merged.
    write(&store, &format!("cpu,host=a usage=6 {}", T0 + m));
    store.flush().unwrap();
    write(&store, &format!("cpu,host=a usage=7 {}", T0 + 2 * m));
    let mut st = store
        .scan(&ScanRequest {
            start: T0 + m,
            ..ScanRequest::all("cpu")
        })
        .unwrap();
    assert_eq!(st.by_ref().map(|b| b.unwrap().num_rows()).sum::<usize>(), 2);
    assert_eq!(st.duplicates_merged, 0);
    // A projection without time and a predicate still see each point once.
    let req = ScanRequest {
        projection: Some(vec!["usage".into()]),
        predicate: Some(TagPredicate::Eq("host".into(), "a".into())),
        ..ScanRequest::all("cpu")
    };
    assert_eq!(collect(&store, &req).num_rows(), 3);
}

#[test]
fn a_scan_splits_across_segments_unless_it_must_merge() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let m = 60_000_000_000;
    for i in 0..3 {
        write(&store, &format!("cpu,host=a usage={i} {}", T0 + i * m));
        store.flush().unwrap();
    }
    write(&store, &format!("cpu,host=a usage=9 {}", T0 + 9 * m));
    let parts = store.scan(&ScanRequest::all("cpu")).unwrap().split(2);
    assert_eq!(parts.len(), 2);
    assert_eq!(parts[0].segments_total + parts[1].segments_total, 3);
    let mut all: Vec<_> = parts
        .into_iter()
        .flat_map(|p| p.map(|b| b.unwrap()).collect::<Vec<_>>())
        .flat_map(|b| rows(&b))
        .collect();
    all.sort_by_key(|r| r.1);
    assert_eq!(all.len(), 4);
    assert_eq!(all[3].2, Some(9.0));
    // A point in two segments must be merged in one place: the scan stays whole.
    write(&store, &format!("cpu,host=a usage=5 {T0}"));
    store.flush().unwrap();
    assert_eq!(
        store.scan(&ScanRequest::all("cpu")).unwrap().split(2).len(),
        1
    );
}

#[test]
fn one_segment_splits_by_row_groups() {
    let dir = tempfile::tempdir().unwrap();
    let store = open_with_row_groups(dir.path(), 1024);
    let body: String = (0..5000)
        .map(|i| format!("cpu,host=h{} usage={i} {}\n", i % 7, T0 + i * 1_000_000_000))
        .collect();
    write(&store, &body);
    store.flush().unwrap();
    assert_eq!(store.segments().len(), 1);
    let parts = store.scan(&ScanRequest::all("cpu")).unwrap().split(2);
    assert_eq!(parts.len(), 2);
    let mut usage: Vec<f64> = Vec::new();
    for mut p in parts {
        let n: Vec<_> = p.by_ref().map(|b| b.unwrap()).collect();
        assert!(
            p.read.row_groups_read > 0,
            "each share reads some row groups"
        );
        usage.extend(n.iter().flat_map(rows).filter_map(|r| r.2));
    }
    usage.sort_by(f64::total_cmp);
    assert_eq!(usage, (0..5000).map(f64::from).collect::<Vec<_>>());
}

/// How each segment of `measurement` stores `field`, in segment order.
fn stored(store: &Store, measurement: &str, field: &str) -> Vec<crate::decimal::Stored> {
    let mut segs = store.segments();
    segs.retain(|s| s.meta.measurement == measurement);
    segs.sort_by_key(|s| (s.meta.partition, s.meta.id));
    segs.iter()
        .map(|s| s.stored_floats().unwrap()[field])
        .collect()
}

#[test]
fn decimal_floats_are_stored_as_scaled_integers_and_read_back_exactly() {
    use crate::decimal::Scale;
    use crate::decimal::Stored::{Float, Scaled};
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let line = |host: &str, usage: &str, t: i64| format!("cpu,host={host} usage={usage} {t}\n");
    // Day one: a flush of tenths, then one of hundredths.
    write(&store, &(line("a", "12.5", T0) + &line("b", "-3", T0 + 1)));
    store.flush().unwrap();
    write(
        &store,
        &(line("a", "0.25", T0 + 2) + &line("b", "99.99", T0 + 3)),
    );
    store.flush().unwrap();
    // Day two: a flush of integers, then one with a value no short decimal holds.
    write(
        &store,
        &(line("a", "7", T0 + DAY) + &line("b", "1e3", T0 + DAY + 1)),
    );
    store.flush().unwrap();
    write(&store, &line("a", "0.3333333333333333", T0 + DAY + 2));
    store.flush().unwrap();
    let scaled = |exp, max_abs| Scaled {
        scale: Scale::div(exp),
        max_abs,
    };
    assert_eq!(
        stored(&store, "cpu", "usage"),
        [scaled(1, 125), scaled(2, 9999), scaled(0, 1000), Float]
    );
    let expected: [(i64, f64); 7] = [
        (T0, 12.5),
        (T0 + 1, -3.0),
        (T0 + 2, 0.25),
        (T0 + 3, 99.99),
        (T0 + DAY, 7.0),
        (T0 + DAY + 1, 1000.0),
        (T0 + DAY + 2, 1.0 / 3.0),
    ];
    let read = |store: &Store| -> Vec<(i64, u64)> {
        let mut r: Vec<_> = rows(&collect(store, &ScanRequest::all("cpu")))
            .into_iter()
            .map(|(_, t, u)| (t, u.unwrap().to_bits()))
            .collect();
        r.sort();
        r
    };
    let bits: Vec<(i64, u64)> = expected.iter().map(|&(t, v)| (t, v.to_bits())).collect();
    assert_eq!(read(&store), bits);
    // Compaction keeps day one scaled, at the larger scale, and day two as floats.
    assert_eq!(store.compact_all().unwrap(), 2);
    assert_eq!(stored(&store, "cpu", "usage"), [scaled(2, 9999), Float]);
    assert_eq!(read(&store), bits);
    drop(store);
    let store = open(dir.path());
    assert_eq!(read(&store), bits);
    // A row filter on the field sees the floats.
    let mut req = ScanRequest::all("cpu");
    req.filter = Some(crate::RowFilter {
        columns: vec!["usage".into()],
        keep: Arc::new(|b: &RecordBatch| {
            let u = b.column(0).as_primitive::<Float64Type>();
            Ok(u.iter().map(|v| v.map(|v| v > 12.0 && v < 100.0)).collect())
        }),
    });
    // (Segments that overlap nothing drop the rows the filter refuses.)
    let kept: Vec<f64> = rows(&collect(&store, &req))
        .into_iter()
        .filter_map(|r| r.2)
        .collect();
    assert_eq!(kept, [12.5, 99.99]);
}

#[test]
fn integer_valued_floats_take_no_more_room_than_integers() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    // The same random walk as integers and as floats (as Prometheus sends every sample).
    let mut text = String::new();
    random_walk(|h, t, values| {
        let (mut ints, mut floats) = (String::new(), String::new());
        for (f, v) in values.iter().enumerate() {
            let sep = if f == 0 { "" } else { "," };
            ints.push_str(&format!("{sep}usage_{f}={v}i"));
            floats.push_str(&format!("{sep}usage_{f}={v}"));
        }
        text.push_str(&format!("ints,hostname=host_{h} {ints} {t}\n"));
        text.push_str(&format!("floats,hostname=host_{h} {floats} {t}\n"));
    });
    write(&store, &text);
    store.flush().unwrap();
    let bytes = |m: &str| -> u64 {
        store
            .segments()
            .iter()
            .filter(|s| s.meta.measurement == m)
            .map(|s| s.meta.bytes)
            .sum()
    };
    let (ints, floats) = (bytes("ints"), bytes("floats"));
    // The scale in each column's metadata is all that is added.
    assert!(
        floats as f64 <= ints as f64 * 1.02,
        "floats {floats} B, integers {ints} B"
    );
    assert!(stored(&store, "floats", "usage_3")[0] != crate::decimal::Stored::Float);
}
