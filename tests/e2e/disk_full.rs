//! A full disk (issue 23): the data directory on a small tmpfs, filled while a server takes
//! writes and flushes every second. Writes must be refused with 507 naming the cause, never
//! acknowledged without being stored; queries keep working; freeing space is enough to take
//! writes again; and after a kill -9 every acknowledged point is there, once.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::harness::{Server, eventually, post, read_back, sql};

const T0: i64 = 1_767_225_600_000_000_000;
const LINES: u64 = 200;

/// A tmpfs mounted for the test (we run as root), unmounted when dropped.
struct Mount(PathBuf);

impl Mount {
    fn tmpfs(at: &Path, size: &str) -> Mount {
        std::fs::create_dir_all(at).unwrap();
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(at)
            .output()
            .expect("run mount");
        assert!(
            out.status.success(),
            "mount a tmpfs (the test needs root): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Mount(at.to_path_buf())
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// `LINES` points from `seq` on, of the series `w=<series>`.
fn batch(series: &str, seq: u64) -> Vec<u8> {
    (seq..seq + LINES)
        .map(|s| format!("disk,w={series} seq={s}i {}\n", T0 + s as i64 * 1_000))
        .collect::<String>()
        .into_bytes()
}

/// Grows the file at `path` until its filesystem has at most `leave` bytes free.
fn fill(path: &Path, leave: u64) {
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .unwrap();
    let chunk = vec![0x5au8; 64 << 10];
    let free = || {
        let out = Command::new("df")
            .args(["--output=avail", "-B1"])
            .arg(path.parent().unwrap())
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .nth(1)
            .and_then(|l| l.trim().parse::<u64>().ok())
            .unwrap()
    };
    while free() > leave + chunk.len() as u64 {
        if f.write_all(&chunk).is_err() {
            break;
        }
    }
    // The rest page by page, to the last one when `leave` is 0.
    while free() > leave {
        if f.write_all(&chunk[..4096]).is_err() {
            break;
        }
    }
    let _ = f.sync_all();
}

#[test]
fn a_full_disk_gets_507_keeps_queries_and_recovers_without_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let mnt = dir.path().join("fs");
    let _mount = Mount::tmpfs(&mnt, "64m");
    let data = mnt.join("data");
    let busy = [
        // The default reserve (64 MiB) is the whole of this disk.
        ("FORESTALL__ENGINE__MIN_FREE_DISK_BYTES", "4194304"),
        ("FORESTALL__ENGINE__FLUSH__MAX_BUFFER_BYTES", "1048576"),
        ("FORESTALL__ENGINE__FLUSH__INTERVAL", "1s"),
        ("FORESTALL__ENGINE__COMPACTION__INTERVAL", "1s"),
    ];
    let server = Server::start(&data, &busy);
    let url = server.url("/api/v2/write?precision=ns");
    let mut acked: Vec<u64> = Vec::new();
    let mut seq = 0;
    // Most batches go to one series; every fifth starts a new one, which the index
    // (RocksDB) must take too.
    let mut send = |acked: &mut Vec<u64>| {
        let series = match (seq / LINES) % 5 {
            0 => format!("s{seq}"),
            _ => "a".to_string(),
        };
        let (status, body) = post(&url, &batch(&series, seq));
        if status == 204 {
            acked.extend(seq..seq + LINES);
        }
        seq += LINES;
        (status, body)
    };
    for _ in 0..20 {
        assert_eq!(send(&mut acked).0, 204);
    }
    // Forestall fills the disk itself: another file leaves it 12 MiB, the writes take them
    // down to the reserve (4 MiB), and are then refused.
    let filler = mnt.join("filler");
    fill(&filler, 12 << 20);
    let mut refused = Vec::new();
    let log = &server.stderr;
    let check = |answer: (u16, String), refused: &mut Vec<String>| match answer {
        (204, _) => {}
        (507 | 503, body) => refused.push(body),
        (status, body) => panic!(
            "a write on a full disk got {status}: {body}\n{}",
            log.try_iter().collect::<Vec<_>>().join("\n")
        ),
    };
    while refused.is_empty() {
        check(send(&mut acked), &mut refused);
    }
    // Then something else takes the disk's last bytes, while Forestall refuses writes; for a
    // few seconds, so that flushes (every second) meet the full disk too.
    std::thread::sleep(Duration::from_millis(1500));
    fill(&filler, 0);
    let full_since = std::time::Instant::now();
    while full_since.elapsed() < Duration::from_secs(4) {
        check(send(&mut acked), &mut refused);
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(!refused.is_empty(), "no write was refused on a full disk");
    assert!(
        refused.iter().any(|b| b.contains("disk is full")),
        "{refused:?}"
    );
    // Queries still answer, with exactly what was acknowledged.
    let rows = sql(&server, "SELECT count(*) AS n FROM disk");
    assert_eq!(rows[0]["n"], acked.len(), "rows stored vs acknowledged");
    // Space is freed: writes are taken again, without a restart.
    std::fs::remove_file(&filler).unwrap();
    eventually("writes taken again", Duration::from_secs(60), || {
        send(&mut acked).0 == 204
    });
    for _ in 0..10 {
        let (status, body) = send(&mut acked);
        assert_eq!(status, 204, "{body}");
    }
    let rows = sql(&server, "SELECT count(*) AS n FROM disk");
    assert_eq!(rows[0]["n"], acked.len());
    // Flushes work again too (the buffer would otherwise fill and stall every write).
    let flushed = ureq::post(&server.url("/api/v1/admin/flush"))
        .timeout(Duration::from_secs(60))
        .call();
    assert!(
        flushed.as_ref().is_ok_and(|r| r.status() == 200),
        "flush after the disk was freed: {flushed:?}\n{}",
        server.stderr.try_iter().collect::<Vec<_>>().join("\n")
    );
    // kill -9, then a clean restart: every acknowledged point is there, once.
    server.kill();
    let server = Server::start(&data, &busy);
    assert!(server.terminate().success(), "clean exit after SIGTERM");
    let mut counts: HashMap<i64, usize> = HashMap::new();
    for (_, time, seq) in read_back(&data, "disk", "w", "seq") {
        assert_eq!(time, T0 + seq * 1_000, "time and value belong together");
        *counts.entry(seq).or_default() += 1;
    }
    assert!(counts.values().all(|&c| c == 1), "a point stored twice");
    let lost = acked
        .iter()
        .filter(|s| !counts.contains_key(&(**s as i64)))
        .count();
    assert_eq!(lost, 0, "acknowledged points lost");
    assert_eq!(
        counts.len(),
        acked.len(),
        "points stored but never acknowledged"
    );
}
