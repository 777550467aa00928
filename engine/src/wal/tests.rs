use super::*;
use std::io::Seek;

fn start(dir: &Path, first: u64, max_file_bytes: u64) -> (Wal, Arc<Metrics>) {
    let metrics = Arc::new(Metrics::default());
    let config = WalConfig {
        max_file_bytes,
        ..WalConfig::default()
    };
    (
        Wal::start(dir, first, config, Arc::clone(&metrics)).unwrap(),
        metrics,
    )
}

fn replay_all(dir: &Path, from: u64) -> (Vec<Vec<u8>>, ReplayReport) {
    let mut seen = Vec::new();
    let report = replay(dir, from, |p| {
        seen.push(p.to_vec());
        Ok(())
    })
    .unwrap();
    (seen, report)
}

#[test]
fn appended_records_replay_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let (wal, _) = start(dir.path(), 1, 64 << 20);
    for i in 0..100u32 {
        wal.append(i.to_le_bytes().repeat(i as usize % 7 + 1))
            .unwrap();
    }
    wal.close();
    let (seen, report) = replay_all(dir.path(), 0);
    assert_eq!(seen.len(), 100);
    for (i, p) in seen.iter().enumerate() {
        assert_eq!(p, &(i as u32).to_le_bytes().repeat(i % 7 + 1));
    }
    assert!(report.torn.is_empty());
    assert_eq!(report.next_file, 2);
}

#[test]
fn concurrent_appends_share_fsyncs() {
    let dir = tempfile::tempdir().unwrap();
    let (wal, metrics) = start(dir.path(), 1, 64 << 20);
    let wal = Arc::new(wal);
    let threads: Vec<_> = (0..16)
        .map(|t| {
            let wal = Arc::clone(&wal);
            std::thread::spawn(move || {
                for i in 0..50u32 {
                    wal.append(format!("{t}:{i}").into_bytes()).unwrap();
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    wal.close();
    let records = metrics
        .wal_records_total
        .load(std::sync::atomic::Ordering::Relaxed);
    let syncs = metrics
        .wal_syncs_total
        .load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!(records, 800);
    // Every append was acknowledged after a sync, and syncs never exceed records.
    assert!(syncs >= 1 && syncs <= records, "syncs {syncs}");
    let (seen, _) = replay_all(dir.path(), 0);
    assert_eq!(seen.len(), 800);
    // Per writer, order is preserved.
    for t in 0..16 {
        let mine: Vec<_> = seen
            .iter()
            .map(|p| String::from_utf8(p.clone()).unwrap())
            .filter(|s| s.starts_with(&format!("{t}:")))
            .collect();
        let expected: Vec<_> = (0..50).map(|i| format!("{t}:{i}")).collect();
        assert_eq!(mine, expected);
    }
}

#[test]
fn rotation_and_size_limit_make_new_files_and_checkpoint_removes_old_ones() {
    let dir = tempfile::tempdir().unwrap();
    let (wal, _) = start(dir.path(), 5, 4096);
    for _ in 0..10 {
        wal.append(vec![7u8; 1000]).unwrap();
    }
    let files = list_files(dir.path()).unwrap();
    assert!(files.len() >= 3, "{files:?}");
    let next = wal.rotate().unwrap();
    assert_eq!(next, files.last().unwrap() + 1);
    wal.append(b"after".to_vec()).unwrap();
    wal.close();
    // Everything before `next` is covered: only the record after rotation replays.
    let (seen, report) = replay_all(dir.path(), next);
    assert_eq!(seen, vec![b"after".to_vec()]);
    assert_eq!(list_files(dir.path()).unwrap(), vec![next]);
    assert_eq!(report.next_file, next + 1);
}

#[test]
fn torn_tail_is_cut_off_and_reported() {
    let dir = tempfile::tempdir().unwrap();
    let (wal, _) = start(dir.path(), 1, 64 << 20);
    wal.append(b"first".to_vec()).unwrap();
    wal.append(b"second".to_vec()).unwrap();
    wal.close();
    let path = file_path(dir.path(), 1);
    let full = fs::metadata(&path).unwrap().len();
    // Half of the last record made it to disk.
    let f = OpenOptions::new().write(true).open(&path).unwrap();
    f.set_len(full - 3).unwrap();
    drop(f);
    let (seen, report) = replay_all(dir.path(), 0);
    assert_eq!(seen, vec![b"first".to_vec()]);
    assert_eq!(report.torn.len(), 1);
    let (torn_path, offset, dropped) = &report.torn[0];
    assert_eq!(torn_path, &path);
    assert_eq!(*offset, (HEADER + 8 + 5) as u64);
    assert_eq!(*dropped, 8 + 6 - 3);
    // The file was truncated: a second replay is clean.
    let (seen, report) = replay_all(dir.path(), 0);
    assert_eq!(seen.len(), 1);
    assert!(report.torn.is_empty());
}

#[test]
fn flipped_bit_fails_the_checksum() {
    let dir = tempfile::tempdir().unwrap();
    let (wal, _) = start(dir.path(), 1, 64 << 20);
    wal.append(b"good".to_vec()).unwrap();
    wal.append(b"will be damaged".to_vec()).unwrap();
    wal.append(b"after the damage".to_vec()).unwrap();
    wal.close();
    let path = file_path(dir.path(), 1);
    let mut f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .unwrap();
    f.seek(std::io::SeekFrom::Start((HEADER + 8 + 4 + 8 + 2) as u64))
        .unwrap();
    f.write_all(b"X").unwrap();
    drop(f);
    let (seen, report) = replay_all(dir.path(), 0);
    assert_eq!(seen, vec![b"good".to_vec()]);
    assert_eq!(report.torn.len(), 1);
}

#[test]
fn header_only_and_foreign_files() {
    let dir = tempfile::tempdir().unwrap();
    fs::write(file_path(dir.path(), 3), &MAGIC[..5]).unwrap();
    let (seen, report) = replay_all(dir.path(), 0);
    assert!(seen.is_empty());
    assert_eq!(report.next_file, 4);
    fs::write(file_path(dir.path(), 4), b"garbage!garbage").unwrap();
    let err = replay(dir.path(), 0, |_| Ok(())).unwrap_err().to_string();
    assert!(
        err.contains("00000000000000000004.wal") && err.contains("bad magic"),
        "{err}"
    );
}

#[test]
fn closed_wal_refuses_appends() {
    let dir = tempfile::tempdir().unwrap();
    let (wal, _) = start(dir.path(), 1, 64 << 20);
    wal.close();
    assert!(matches!(wal.append(b"x".to_vec()), Err(Error::WalClosed)));
}
