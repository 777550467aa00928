//! The write-ahead log.
//!
//! **Contract.** [`Wal::append`] returns once its record is in the current WAL file and, with
//! [`SyncPolicy::Always`], once that file has been fsynced. Records are durable in the order
//! they were appended. One writer thread owns the file: every request that arrives while it is
//! writing or syncing is written with the next group and served by the next single fsync
//! (group commit), so many concurrent writers cost one fsync per round, not one each.
//!
//! **Files.** `wal/<id:020>.wal`: an 8-byte magic, then records
//! `[len: u32 LE][crc32c of payload: u32 LE][payload]`. A new file is started past
//! `max_file_bytes` and at every [`Wal::rotate`]; ids only grow. A flush rotates, writes the
//! segments covering every older file, commits them together with the checkpoint (the id of
//! the first file still needed) and then calls [`remove_before`].
//!
//! **Replay.** [`replay`] reads every file from the checkpoint on, in order. A record that is
//! cut short or fails its checksum ends that file: the file is truncated there and the loss is
//! reported (it can only hold writes that were never acknowledged, unless the disk itself lost
//! data). The writer always starts a fresh file after replay.

use std::fs::{self, File, OpenOptions};
use std::io::{ErrorKind, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender, SyncSender};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use crate::config::{SyncPolicy, WalConfig};
use crate::metrics::Metrics;
use crate::{Error, Result};

const MAGIC: &[u8; 8] = b"FSTLWAL1";
const HEADER: usize = 8;
/// A record larger than this is treated as corruption during replay.
pub const MAX_RECORD_BYTES: usize = 1 << 30;

/// Path of WAL file `id` in `dir`.
pub fn file_path(dir: &Path, id: u64) -> PathBuf {
    dir.join(format!("{id:020}.wal"))
}

/// The ids of the WAL files in `dir`, ascending.
pub fn list_files(dir: &Path) -> Result<Vec<u64>> {
    let entries = fs::read_dir(dir).map_err(|source| Error::OpenWal {
        path: dir.to_path_buf(),
        source,
    })?;
    let mut ids: Vec<u64> = entries
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name();
            let name = name.to_str()?;
            name.strip_suffix(".wal")?.parse().ok()
        })
        .collect();
    ids.sort_unstable();
    Ok(ids)
}

/// Deletes the WAL files whose ids are below `first_needed`. Returns how many were removed.
pub fn remove_before(dir: &Path, first_needed: u64) -> Result<usize> {
    let mut removed = 0;
    for id in list_files(dir)? {
        if id >= first_needed {
            break;
        }
        let path = file_path(dir, id);
        fs::remove_file(&path).map_err(|source| Error::OpenWal { path, source })?;
        removed += 1;
    }
    Ok(removed)
}

/// What replay found.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ReplayReport {
    pub files: usize,
    pub records: usize,
    /// Files whose tail was cut off: (path, offset of the first bad byte, bytes dropped).
    pub torn: Vec<(PathBuf, u64, u64)>,
    /// The id the writer should use for its first file.
    pub next_file: u64,
}

/// Replays every record of the files with id `>= from`, in order, calling `apply` with each
/// payload. Files below `from` are covered by segments and are deleted. Torn tails are cut off
/// and reported.
pub fn replay(
    dir: &Path,
    from: u64,
    mut apply: impl FnMut(&[u8]) -> Result<()>,
) -> Result<ReplayReport> {
    fs::create_dir_all(dir).map_err(|source| Error::CreateDir {
        path: dir.to_path_buf(),
        source,
    })?;
    remove_before(dir, from)?;
    let mut report = ReplayReport {
        next_file: from.max(1),
        ..Default::default()
    };
    for id in list_files(dir)? {
        report.next_file = report.next_file.max(id + 1);
        let path = file_path(dir, id);
        let data = fs::read(&path).map_err(|source| Error::OpenWal {
            path: path.clone(),
            source,
        })?;
        report.files += 1;
        let mut pos = if data.len() >= HEADER && &data[..HEADER] == MAGIC {
            HEADER
        } else if data.len() < HEADER && MAGIC.starts_with(&data) {
            // Crashed while writing the header: an empty file.
            data.len()
        } else {
            return Err(Error::ReplayWal {
                path,
                reason: "not a Forestall WAL file (bad magic)".into(),
            });
        };
        while pos < data.len() {
            match next_record(&data[pos..]) {
                Some(payload) => {
                    apply(payload)?;
                    report.records += 1;
                    pos += 8 + payload.len();
                }
                None => {
                    let dropped = (data.len() - pos) as u64;
                    tracing::warn!(path = %path.display(), offset = pos, dropped, "WAL tail is torn or corrupt; cutting it off");
                    let f = OpenOptions::new()
                        .write(true)
                        .open(&path)
                        .map_err(|source| Error::OpenWal {
                            path: path.clone(),
                            source,
                        })?;
                    f.set_len(pos as u64)
                        .and_then(|_| f.sync_all())
                        .map_err(|source| Error::AppendWal {
                            path: path.clone(),
                            source,
                        })?;
                    report.torn.push((path.clone(), pos as u64, dropped));
                    break;
                }
            }
        }
    }
    Ok(report)
}

/// The payload of the record at the start of `data`, if it is whole and its checksum holds.
fn next_record(data: &[u8]) -> Option<&[u8]> {
    let len = u32::from_le_bytes(data.get(0..4)?.try_into().ok()?) as usize;
    let crc = u32::from_le_bytes(data.get(4..8)?.try_into().ok()?);
    if len > MAX_RECORD_BYTES {
        return None;
    }
    let payload = data.get(8..8 + len)?;
    (crc32fast::hash(payload) == crc).then_some(payload)
}

enum Request {
    Append {
        payload: Vec<u8>,
        done: SyncSender<Result<()>>,
    },
    Rotate {
        done: SyncSender<Result<u64>>,
    },
}

/// The WAL writer. Cheap to share: every method takes `&self`.
#[derive(Debug)]
pub struct Wal {
    tx: Mutex<Option<Sender<Request>>>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl Wal {
    /// Starts the writer on a new file `first_file` in `dir` (use [`ReplayReport::next_file`]).
    pub fn start(
        dir: &Path,
        first_file: u64,
        config: WalConfig,
        metrics: Arc<Metrics>,
    ) -> Result<Self> {
        let file = WalFile::create(dir, first_file)?;
        let (tx, rx) = mpsc::channel();
        let mut writer = Writer {
            dir: dir.to_path_buf(),
            file,
            config,
            metrics,
            dirty: false,
            damaged: false,
        };
        let thread = std::thread::Builder::new()
            .name("forestall-wal".into())
            .spawn(move || writer.run(rx))
            .map_err(|source| Error::OpenWal {
                path: dir.to_path_buf(),
                source,
            })?;
        Ok(Self {
            tx: Mutex::new(Some(tx)),
            thread: Mutex::new(Some(thread)),
        })
    }

    fn send(&self, req: Request) -> Result<()> {
        let tx = self.tx.lock();
        tx.as_ref()
            .ok_or(Error::WalClosed)?
            .send(req)
            .map_err(|_| Error::WalClosed)
    }

    /// Appends one record and waits until it is written (and synced, with `sync = always`).
    pub fn append(&self, payload: Vec<u8>) -> Result<()> {
        let (done, wait) = mpsc::sync_channel(1);
        self.send(Request::Append { payload, done })?;
        wait.recv().map_err(|_| Error::WalClosed)?
    }

    /// Syncs and closes the current file and starts a new one; returns the new file's id.
    /// Every record appended before the call is in a file with a smaller id.
    pub fn rotate(&self) -> Result<u64> {
        let (done, wait) = mpsc::sync_channel(1);
        self.send(Request::Rotate { done })?;
        wait.recv().map_err(|_| Error::WalClosed)?
    }

    /// Syncs the current file and stops the writer. Later appends fail with
    /// [`Error::WalClosed`].
    pub fn close(&self) {
        drop(self.tx.lock().take());
        if let Some(t) = self.thread.lock().take() {
            // The writer only panics on a bug; there is nothing more to do at shutdown.
            let _ = t.join();
        }
    }
}

impl Drop for Wal {
    fn drop(&mut self) {
        self.close();
    }
}

struct WalFile {
    id: u64,
    path: PathBuf,
    file: File,
    len: u64,
}

impl WalFile {
    fn create(dir: &Path, id: u64) -> Result<Self> {
        let path = file_path(dir, id);
        // A file left by a creation that failed (a full disk) holds at most part of the
        // header and no record: it is taken over, or the WAL could never rotate again.
        let leftover = fs::metadata(&path).is_ok_and(|m| m.len() <= HEADER as u64);
        let mut options = OpenOptions::new();
        match leftover {
            true => options.write(true).truncate(true),
            false => options.write(true).create_new(true),
        };
        let mut file = options.open(&path).map_err(|source| Error::OpenWal {
            path: path.clone(),
            source,
        })?;
        if let Err(source) = file.write_all(MAGIC).and_then(|_| file.sync_all()) {
            let _ = fs::remove_file(&path);
            return Err(Error::AppendWal { path, source });
        }
        // Make the new directory entry durable too.
        File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(|source| Error::OpenWal {
                path: dir.to_path_buf(),
                source,
            })?;
        Ok(Self {
            id,
            path,
            file,
            len: HEADER as u64,
        })
    }
}

struct Writer {
    dir: PathBuf,
    file: WalFile,
    config: WalConfig,
    metrics: Arc<Metrics>,
    dirty: bool,
    /// A write could not be cut back, or an fsync failed (the kernel may then have dropped
    /// pages it could not write, leaving a hole): the next record goes to a new file, so
    /// that replay, which stops a file at its first bad record, never hides records written
    /// after the failure. Until a new file can be made, appends fail.
    damaged: bool,
}

impl Writer {
    fn run(&mut self, rx: Receiver<Request>) {
        let mut last_sync = Instant::now();
        loop {
            let first = match self.config.sync {
                SyncPolicy::Interval if self.dirty => {
                    let wait = self
                        .config
                        .sync_interval
                        .saturating_sub(last_sync.elapsed());
                    match rx.recv_timeout(wait.max(Duration::from_millis(1))) {
                        Ok(r) => Some(r),
                        Err(RecvTimeoutError::Timeout) => None,
                        Err(RecvTimeoutError::Disconnected) => break,
                    }
                }
                _ => match rx.recv() {
                    Ok(r) => Some(r),
                    Err(_) => break,
                },
            };
            if let Some(first) = first {
                // Group commit: take everything that queued up while we were busy.
                let mut group = vec![first];
                group.extend(rx.try_iter().take(4096));
                self.serve(group);
            }
            if self.config.sync == SyncPolicy::Interval
                && self.dirty
                && last_sync.elapsed() >= self.config.sync_interval
            {
                if let Err(e) = self.sync() {
                    tracing::error!(error = %e, "periodic WAL sync failed");
                }
                last_sync = Instant::now();
            }
        }
        if let Err(e) = self.sync() {
            tracing::error!(error = %e, "final WAL sync failed");
        }
    }

    fn serve(&mut self, group: Vec<Request>) {
        let mut waiting: Vec<SyncSender<Result<()>>> = Vec::new();
        let mut failed: Option<Failure> = None;
        for req in group {
            match req {
                Request::Append { payload, done } => {
                    if failed.is_none()
                        && let Err(e) = self.write(&payload)
                    {
                        failed = Some(Failure::of(&e));
                    }
                    waiting.push(done);
                }
                Request::Rotate { done } => {
                    // Everything before the rotation must be durable before it is answered,
                    // and the appends before it are answered first.
                    let synced = self.finish_group(&mut waiting, &mut failed);
                    let result = synced.and_then(|_| self.rotate());
                    let _ = done.send(result);
                }
            }
        }
        let _ = self.finish_group(&mut waiting, &mut failed);
    }

    /// Syncs (per policy) and answers the waiting appends.
    fn finish_group(
        &mut self,
        waiting: &mut Vec<SyncSender<Result<()>>>,
        failed: &mut Option<Failure>,
    ) -> Result<()> {
        if failed.is_none()
            && self.config.sync == SyncPolicy::Always
            && self.dirty
            && let Err(e) = self.sync()
        {
            *failed = Some(Failure::of(&e));
        }
        for done in waiting.drain(..) {
            let r = match failed {
                Some(f) => Err(f.error(&self.file.path)),
                None => Ok(()),
            };
            // The requester may have given up (its connection closed); nothing to do then.
            let _ = done.send(r);
        }
        match failed.take() {
            Some(f) => Err(f.error(&self.file.path)),
            None => Ok(()),
        }
    }

    fn write(&mut self, payload: &[u8]) -> Result<()> {
        if self.damaged
            || (self.file.len + 8 + payload.len() as u64 > self.config.max_file_bytes
                && self.file.len > HEADER as u64)
        {
            self.rotate()?;
        }
        let mut head = [0u8; 8];
        head[..4].copy_from_slice(&(payload.len() as u32).to_le_bytes());
        head[4..].copy_from_slice(&crc32fast::hash(payload).to_le_bytes());
        let written = self
            .file
            .file
            .write_all(&head)
            .and_then(|_| self.file.file.write_all(payload));
        if let Err(source) = written {
            // Part of the record may be in the file (a full disk takes what fits): cut it
            // off, or a later record would follow a torn one and be lost at replay.
            let len = self.file.len;
            let cut = self
                .file
                .file
                .set_len(len)
                .and_then(|_| self.file.file.seek(SeekFrom::Start(len)));
            if let Err(e) = cut {
                tracing::error!(path = %self.file.path.display(), error = %e, "could not cut a failed WAL write back; the next record starts a new file");
                self.damaged = true;
            }
            return Err(Error::AppendWal {
                path: self.file.path.clone(),
                source,
            });
        }
        self.file.len += 8 + payload.len() as u64;
        self.dirty = true;
        Metrics::add(&self.metrics.wal_records_total, 1);
        Metrics::add(&self.metrics.wal_bytes_total, 8 + payload.len() as u64);
        Ok(())
    }

    fn sync(&mut self) -> Result<()> {
        if !self.dirty {
            return Ok(());
        }
        if let Err(source) = self.file.file.sync_data() {
            // Linux may have dropped the pages it failed to write and will not report it
            // again: this file can no longer be trusted past its last good sync.
            self.damaged = true;
            return Err(Error::AppendWal {
                path: self.file.path.clone(),
                source,
            });
        }
        self.dirty = false;
        Metrics::add(&self.metrics.wal_syncs_total, 1);
        Ok(())
    }

    /// Starts the next file. A damaged file is left as it is: the appends it failed were
    /// answered with errors, and what replay finds of them is at most extra, never a gap.
    fn rotate(&mut self) -> Result<u64> {
        if !self.damaged {
            self.sync()?;
        }
        let next = WalFile::create(&self.dir, self.file.id + 1)?;
        self.file = next;
        self.dirty = false;
        self.damaged = false;
        Ok(self.file.id)
    }
}

/// Why a group's appends failed, kept to answer each of them with the same error kind (a
/// full disk stays a full disk for the caller).
struct Failure {
    kind: ErrorKind,
    reason: String,
}

impl Failure {
    fn of(e: &Error) -> Self {
        match e {
            Error::AppendWal { source, .. } | Error::OpenWal { source, .. } => Self {
                kind: source.kind(),
                reason: source.to_string(),
            },
            other => Self {
                kind: ErrorKind::Other,
                reason: other.to_string(),
            },
        }
    }

    fn error(&self, path: &Path) -> Error {
        Error::AppendWal {
            path: path.to_path_buf(),
            source: std::io::Error::new(self.kind, self.reason.clone()),
        }
    }
}

#[cfg(test)]
mod tests;
