//! Crash safety with a real process: concurrent writers, SIGKILL at chosen moments, restart,
//! and every acknowledged point is present exactly once.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use crate::harness::{Server, post, read_back};

const T0: i64 = 1_767_225_600_000_000_000;
const WRITERS: u64 = 4;
const LINES_PER_REQUEST: u64 = 400;

/// Small buffers and eager compaction, so flushes and compactions happen during a short test.
const BUSY: &[(&str, &str)] = &[
    ("FORESTALL__ENGINE__FLUSH__MAX_BUFFER_BYTES", "1048576"),
    ("FORESTALL__ENGINE__FLUSH__INTERVAL", "1s"),
    ("FORESTALL__ENGINE__COMPACTION__INTERVAL", "1s"),
    ("FORESTALL__ENGINE__COMPACTION__MIN_SEGMENTS", "2"),
];

struct Load {
    stop: Arc<AtomicBool>,
    acked: Arc<Mutex<Vec<(u64, u64)>>>,
    threads: Vec<JoinHandle<()>>,
}

/// Starts writers that send batches of unique points until told to stop or the server goes
/// away. `round` keeps sequence numbers of later rounds apart from earlier ones.
fn start_load(server: &Server, round: u64) -> Load {
    let stop = Arc::new(AtomicBool::new(false));
    let acked = Arc::new(Mutex::new(Vec::new()));
    let threads = (0..WRITERS)
        .map(|w| {
            let (url, stop, acked) = (
                server.url("/api/v2/write?bucket=crash"),
                Arc::clone(&stop),
                Arc::clone(&acked),
            );
            std::thread::spawn(move || {
                let mut seq = round * 1_000_000_000;
                while !stop.load(Ordering::Relaxed) {
                    let mut body = String::new();
                    for s in seq..seq + LINES_PER_REQUEST {
                        body.push_str(&format!(
                            "load,writer=w{w} seq={s}i {}\n",
                            T0 + (s as i64) * 1_000 + w as i64
                        ));
                    }
                    match post(&url, body.as_bytes()) {
                        (204, _) => acked
                            .lock()
                            .unwrap()
                            .extend((seq..seq + LINES_PER_REQUEST).map(|s| (w, s))),
                        (0, _) => break,
                        (code, text) => panic!("unexpected answer {code}: {text}"),
                    }
                    seq += LINES_PER_REQUEST;
                }
            })
        })
        .collect();
    Load {
        stop,
        acked,
        threads,
    }
}

impl Load {
    fn finish(self) -> Vec<(u64, u64)> {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads {
            t.join().expect("writer thread");
        }
        Arc::try_unwrap(self.acked)
            .expect("writers done")
            .into_inner()
            .unwrap()
    }

    fn wait_for_acks(&self, n: usize) {
        for _ in 0..3000 {
            if self.acked.lock().unwrap().len() >= n {
                return;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        panic!("writers were not acknowledged");
    }
}

/// Restarts the server cleanly once (replaying whatever the crash left), stops it, and checks
/// that every acknowledged point is there exactly once and nothing is there twice.
fn verify(dir: &std::path::Path, acked: &[(u64, u64)]) {
    let server = Server::start(dir, &[]);
    assert!(server.terminate().success(), "clean exit after SIGTERM");
    let rows = read_back(dir, "load", "writer", "seq");
    let mut counts: HashMap<(u64, u64), usize> = HashMap::new();
    for (writer, time, seq) in &rows {
        let w: u64 = writer.trim_start_matches('w').parse().unwrap();
        assert_eq!(
            *time,
            T0 + seq * 1_000 + w as i64,
            "time and value belong together"
        );
        *counts.entry((w, *seq as u64)).or_default() += 1;
    }
    let doubled: Vec<_> = counts.iter().filter(|(_, c)| **c > 1).take(5).collect();
    assert!(doubled.is_empty(), "points stored twice: {doubled:?}");
    let lost: Vec<_> = acked
        .iter()
        .filter(|k| !counts.contains_key(k))
        .take(5)
        .collect();
    assert!(
        lost.is_empty(),
        "{} acknowledged points lost, e.g. {lost:?}",
        acked.iter().filter(|k| !counts.contains_key(k)).count()
    );
    assert!(
        acked.len() >= LINES_PER_REQUEST as usize,
        "the test wrote something"
    );
}

#[test]
fn sigkill_mid_ingest_twice_loses_nothing_acknowledged() {
    let dir = tempfile::tempdir().unwrap();
    let mut acked = Vec::new();
    for round in 0..2 {
        let server = Server::start(dir.path(), BUSY);
        let load = start_load(&server, round);
        load.wait_for_acks(20_000);
        server.kill();
        acked.extend(load.finish());
    }
    verify(dir.path(), &acked);
}

fn kill_at_pause_point(point: &str) {
    let dir = tempfile::tempdir().unwrap();
    // Some data on disk first, so that compaction has inputs.
    let server = Server::start(dir.path(), BUSY);
    let load = start_load(&server, 0);
    load.wait_for_acks(8_000);
    let mut acked = load.finish();
    assert!(server.terminate().success());

    let mut env = BUSY.to_vec();
    env.push(("FORESTALL_PAUSE_AT", point));
    let server = Server::start(dir.path(), &env);
    let load = start_load(&server, 1);
    server.wait_for_log(
        &format!("pause point {point} reached"),
        Duration::from_secs(60),
    );
    // Writes still go on while the flush or compaction is stuck; some more get acknowledged.
    let before = load.acked.lock().unwrap().len();
    load.wait_for_acks(before + 2_000);
    server.kill();
    acked.extend(load.finish());
    verify(dir.path(), &acked);
}

#[test]
fn sigkill_between_segment_write_and_manifest_commit() {
    kill_at_pause_point("flush-before-commit");
}

#[test]
fn sigkill_after_manifest_commit_before_wal_cleanup_does_not_double() {
    kill_at_pause_point("flush-after-commit");
}

#[test]
fn sigkill_during_compaction() {
    kill_at_pause_point("compaction-before-commit");
}

#[test]
fn sigkill_after_compaction_commit() {
    kill_at_pause_point("compaction-after-commit");
}

#[test]
fn torn_last_wal_record_is_cut_off_and_reported() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), &[]);
    let load = start_load(&server, 0);
    load.wait_for_acks(4_000);
    server.kill();
    let acked = load.finish();
    // A record whose header promises more bytes than follow: a write cut short by the crash.
    let wal = dir.path().join("wal");
    let mut files: Vec<_> = std::fs::read_dir(&wal)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    let last = files.last().expect("a WAL file");
    let mut bytes = std::fs::read(last).unwrap();
    bytes.extend_from_slice(&1000u32.to_le_bytes());
    bytes.extend_from_slice(&0xdead_beefu32.to_le_bytes());
    bytes.extend_from_slice(b"load,writer=w9 seq=1i");
    std::fs::write(last, bytes).unwrap();

    let server = Server::start(dir.path(), &[]);
    let log = server.wait_for_log("store opened", Duration::from_secs(60));
    assert!(
        log.iter().any(|l| l.contains("torn or corrupt")),
        "the cut is reported:\n{}",
        log.join("\n")
    );
    assert!(
        log.iter().any(|l| l.contains("torn_tails=1")),
        "{}",
        log.join("\n")
    );
    assert!(server.terminate().success());
    verify(dir.path(), &acked);
}
