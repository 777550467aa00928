//! [`Store`]: one data directory with its index, WAL, buffer and segments, and the background
//! thread that flushes, compacts and enforces retention.
//!
//! **Durability contract.** [`Store::write`] returns `Ok` only after the accepted lines are in
//! the WAL (fsynced, with the default [`SyncPolicy::Always`](crate::SyncPolicy)) and in the
//! buffer, so they are visible to the next [`Store::scan`] and survive a crash. Rejected lines
//! never reach the WAL.
//!
//! **Thread safety.** Every method takes `&self`; share a `Store` with `Arc`. Writes run
//! concurrently (their WAL records share fsyncs); flush, compaction and retention run one at a
//! time in the background or when called.

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use arrow::array::RecordBatch;
use parking_lot::{Condvar, Mutex, RwLock};

use crate::buffer::Buffer;
use crate::catalog::{Catalog, TableSchema};
use crate::config::EngineConfig;
use crate::disk::DiskGuard;
use crate::flush::Frozen;
use crate::index::Index;
use crate::line_protocol::{LineError, ParsedLine, Precision, parse_lines};
use crate::metrics::Metrics;
use crate::retention::retention_cutoff;
use crate::scan::{ScanRequest, ScanStream};
use crate::segment::{Segment, SegmentRef};
use crate::wal::{self, Wal};
use crate::{Error, Result, SeriesId};

/// At most this many rejected lines are listed in a [`WriteOutcome`]; the rest are counted.
pub const MAX_LISTED_ERRORS: usize = 100;

const RECORD_WRITE: u8 = 1;

/// The result of a write that reached the store.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WriteOutcome {
    /// Lines accepted and durable.
    pub accepted_lines: usize,
    /// Field values accepted.
    pub accepted_values: usize,
    /// Lines rejected in all.
    pub rejected_lines: usize,
    /// The first [`MAX_LISTED_ERRORS`] rejections, in line order.
    pub errors: Vec<LineError>,
}

/// Hears about every write, inside the write path. The layers above use it to invalidate
/// what they derived from data that has just changed (continuous queries' materialised time
/// buckets) and to react to new data (queries that run on write).
///
/// Both calls run on the writing thread, so an observer must be quick in the common case.
pub trait WriteObserver: Send + Sync + std::fmt::Debug {
    /// The admitted lines of a write, before they are appended to the WAL: nothing of them is
    /// durable or visible yet, so a durable note made here is in place before any reader can
    /// see the data and before the write is acknowledged. An error fails the write with
    /// [`Error::Observer`] and nothing of it is stored.
    fn admitted(&self, lines: &[ParsedLine<'_>]) -> std::result::Result<(), String>;

    /// The same lines once they are durable and visible to scans, before the write is
    /// acknowledged.
    fn committed(&self, lines: &[ParsedLine<'_>]);
}

/// The store's run-time catalog entries (the index's `entries` column family): a durable,
/// ordered key-value map that layers above keep their own objects in (continuous queries and
/// their watermarks). A handle is cheap to clone and does not keep the rest of the store open.
#[derive(Debug, Clone)]
pub struct Entries(Arc<Index>);

impl Entries {
    /// The entries of the store in `data_dir`, opened without the rest of it, for offline
    /// tools (`forestall token create --data-dir`). Fails while a server has the store open
    /// (RocksDB's lock), and when `data_dir` holds no store.
    pub fn open_offline(data_dir: &Path) -> Result<Self> {
        let path = data_dir.join("index");
        if !path.join("CURRENT").exists() {
            return Err(Error::Config(format!(
                "{} holds no Forestall store (no index/)",
                data_dir.display()
            )));
        }
        Ok(Self(Arc::new(Index::open(&path)?)))
    }

    /// Applies every change (a value to put, `None` to delete) atomically and durably.
    pub fn put(&self, changes: &[(String, Option<Vec<u8>>)]) -> Result<()> {
        self.0.put_entries(changes)
    }

    /// Every entry whose key starts with `prefix`, in key order.
    pub fn list(&self, prefix: &str) -> Result<Vec<(String, Vec<u8>)>> {
        self.0.entries(prefix)
    }
}

/// Nanoseconds since the Unix epoch, now.
pub fn now_nanos() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

#[derive(Debug, Default)]
pub(crate) struct ReadState {
    /// Buffers being flushed, oldest first; still visible to scans.
    pub frozen: Vec<Arc<Frozen>>,
    /// The manifest, by segment id.
    pub segments: BTreeMap<u64, SegmentRef>,
    /// The last row of every flushed series, by measurement (see `last.rs`).
    pub last: HashMap<String, RecordBatch>,
}

#[derive(Debug, Default)]
pub(crate) struct SeriesRegistry {
    pub by_key: HashMap<Box<str>, SeriesId>,
    pub next: SeriesId,
}

#[derive(Debug, Default)]
struct Wake {
    flush_requested: bool,
    shutdown: bool,
}

#[derive(Debug)]
pub(crate) struct Inner {
    pub config: EngineConfig,
    pub wal_dir: PathBuf,
    pub segment_dir: PathBuf,
    pub index: Arc<Index>,
    pub catalog: Catalog,
    pub wal: Wal,
    pub metrics: Arc<Metrics>,
    /// Writes hold it shared from WAL append to buffer insert; freezing the buffer holds it
    /// exclusively, so a frozen set and the WAL files before its rotation match exactly.
    pub gate: RwLock<()>,
    pub buffer: Mutex<Buffer>,
    pub state: RwLock<ReadState>,
    pub series: Mutex<SeriesRegistry>,
    pub next_segment: AtomicU64,
    /// Flush, compaction and retention run one at a time.
    pub maintenance: Mutex<()>,
    /// Refuses writes while the disk is nearly full (see [`crate::disk`]).
    pub disk: DiskGuard,
    wake: Mutex<Wake>,
    wake_cv: Condvar,
    /// Signalled when a flush has emptied the buffer (see `wait_for_buffer_room`).
    flushed_cv: Condvar,
    closed: AtomicBool,
    /// Shared as one slice, so that a write takes them with one reference count.
    observers: RwLock<Arc<[Arc<dyn WriteObserver>]>>,
}

/// A Forestall storage engine instance.
#[derive(Debug)]
pub struct Store {
    inner: Arc<Inner>,
    background: Mutex<Option<JoinHandle<()>>>,
}

/// What [`Store::open`] found on disk.
#[derive(Debug, Clone, Default)]
pub struct OpenReport {
    pub segments: usize,
    pub missing_segments: Vec<PathBuf>,
    pub orphans_removed: usize,
    pub wal: wal::ReplayReport,
    pub replayed_lines: usize,
}

fn encode_record(precision: Precision, default_time: i64, body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(10 + body.len());
    out.push(RECORD_WRITE);
    out.push(precision.code());
    out.extend_from_slice(&default_time.to_le_bytes());
    out.extend_from_slice(body);
    out
}

fn decode_record(payload: &[u8]) -> Option<(Precision, i64, &[u8])> {
    if payload.len() < 10 || payload[0] != RECORD_WRITE {
        return None;
    }
    let precision = Precision::from_code(payload[1])?;
    let default_time = i64::from_le_bytes(payload[2..10].try_into().ok()?);
    Some((precision, default_time, &payload[10..]))
}

impl Store {
    /// Opens (or creates) the store in `config.data_dir`: loads the index and manifest,
    /// removes files a crash left behind, replays the WAL and starts the background thread.
    pub fn open(config: EngineConfig) -> Result<Self> {
        Self::open_with_report(config).map(|(s, _)| s)
    }

    /// [`Store::open`], also saying what was found.
    pub fn open_with_report(config: EngineConfig) -> Result<(Self, OpenReport)> {
        config.validate()?;
        let data = config.data_dir.clone();
        let wal_dir = data.join("wal");
        let segment_dir = data.join("segments");
        for dir in [&data, &wal_dir, &segment_dir] {
            fs::create_dir_all(dir).map_err(|source| Error::CreateDir {
                path: dir.clone(),
                source,
            })?;
        }
        let guard = |fresh| DiskGuard::new(&data, config.min_free_disk_bytes, fresh);
        let index = Arc::new(Index::open(&data.join("index"))?.guarded_by(guard(Duration::ZERO)));
        let catalog = Catalog::load(Arc::clone(&index))?;
        let metrics = Arc::new(Metrics::default());
        let mut report = OpenReport::default();

        let mut registry = SeriesRegistry {
            next: index.next_series_id()?,
            ..Default::default()
        };
        for (id, key) in index.load_series()? {
            registry.next = registry.next.max(id + 1);
            registry.by_key.insert(key.into_boxed_str(), id);
        }

        let mut state = ReadState::default();
        let mut next_segment = index.next_segment_id()?;
        for meta in index.load_segments()? {
            next_segment = next_segment.max(meta.id + 1);
            let seg = Segment::new(meta, &segment_dir);
            if !seg.path.exists() {
                tracing::error!(path = %seg.path.display(), "segment in the manifest is missing; its data cannot be served");
                report.missing_segments.push(seg.path.clone());
            }
            state.segments.insert(seg.meta.id, Arc::new(seg));
        }
        report.segments = state.segments.len();
        for (measurement, ipc) in index.load_last_rows()? {
            match crate::last::decode(&ipc) {
                Ok(rows) => {
                    state.last.insert(measurement, rows);
                }
                // Rebuilt from the segments when first asked.
                Err(e) => tracing::warn!(%measurement, error = %e, "stored last rows unreadable"),
            }
        }
        report.orphans_removed = remove_orphans(&segment_dir, &state)?;

        let pnanos = config.partition_nanos();
        let mut buffer = Buffer::default();
        let now = now_nanos();
        let checkpoint = index.wal_checkpoint()?;
        // Replay goes through the same admission as a live write, minus the WAL append.
        let wal_report = wal::replay(&wal_dir, checkpoint, |payload| {
            let Some((precision, default_time, body)) = decode_record(payload) else {
                tracing::warn!("skipping WAL record of unknown kind");
                return Ok(());
            };
            let lines = admit_all(
                &catalog,
                &config,
                parse_lines(body, precision, default_time),
                now,
                |e| tracing::warn!(error = %e, "WAL line no longer admissible; skipped"),
            )?;
            report.replayed_lines += lines.len();
            buffer.insert(&lines, pnanos);
            Ok(())
        })?;
        Metrics::add(&metrics.wal_torn_tails_total, wal_report.torn.len() as u64);
        report.wal = wal_report;
        let wal = Wal::start(
            &wal_dir,
            report.wal.next_file,
            config.wal.clone(),
            Arc::clone(&metrics),
        )?;

        let disk = guard(Duration::from_millis(100));
        let inner = Arc::new(Inner {
            config,
            disk,
            wal_dir,
            segment_dir,
            index,
            catalog,
            wal,
            metrics,
            gate: RwLock::new(()),
            buffer: Mutex::new(buffer),
            state: RwLock::new(state),
            series: Mutex::new(registry),
            next_segment: AtomicU64::new(next_segment),
            maintenance: Mutex::new(()),
            wake: Mutex::new(Wake::default()),
            wake_cv: Condvar::new(),
            flushed_cv: Condvar::new(),
            closed: AtomicBool::new(false),
            observers: RwLock::new(Arc::from(Vec::new())),
        });
        inner.update_gauges();
        let bg = Arc::clone(&inner);
        let background = std::thread::Builder::new()
            .name("forestall-maintenance".into())
            .spawn(move || bg.background())
            .map_err(|source| Error::CreateDir {
                path: inner.segment_dir.clone(),
                source,
            })?;
        tracing::info!(
            segments = report.segments,
            wal_files = report.wal.files,
            replayed_lines = report.replayed_lines,
            torn_tails = report.wal.torn.len(),
            "store opened"
        );
        Ok((
            Self {
                inner,
                background: Mutex::new(Some(background)),
            },
            report,
        ))
    }

    /// Parses, validates and durably stores a line protocol body. Lines without a timestamp
    /// get `now` (ns). Valid lines are stored even when others are rejected (InfluxDB's
    /// partial write); the outcome lists the rejections.
    pub fn write(&self, body: &[u8], precision: Precision, now: i64) -> Result<WriteOutcome> {
        self.write_parsed(body, parse_lines(body, precision, now), precision, now)
    }

    /// [`Store::write`] of lines already parsed from `body`: `lines` must be what
    /// [`parse_lines`]`(body, precision, now)` gives (each line's `raw` a line of `body`),
    /// as a converter that wrote `body` itself can hand over without the text being read
    /// back. `body` is what the WAL keeps.
    pub fn write_parsed<'a>(
        &self,
        body: &'a [u8],
        lines: impl Iterator<Item = std::result::Result<ParsedLine<'a>, LineError>>,
        precision: Precision,
        now: i64,
    ) -> Result<WriteOutcome> {
        let inner = &self.inner;
        if inner.closed.load(Ordering::Acquire) {
            return Err(Error::ShuttingDown);
        }
        inner.disk.check()?;
        let mut outcome = WriteOutcome::default();
        let accepted = admit_all(&inner.catalog, &inner.config, lines, now, |e| {
            outcome.rejected_lines += 1;
            if outcome.errors.len() < MAX_LISTED_ERRORS {
                outcome.errors.push(e);
            }
        })?;
        Metrics::add(
            &inner.metrics.lines_rejected_total,
            outcome.rejected_lines as u64,
        );
        if accepted.is_empty() {
            return Ok(outcome);
        }
        let observers = Arc::clone(&inner.observers.read());
        for o in observers.iter() {
            o.admitted(&accepted).map_err(Error::Observer)?;
        }
        let payload = if outcome.rejected_lines == 0 {
            encode_record(precision, now, body)
        } else {
            let mut text = Vec::with_capacity(body.len());
            for l in &accepted {
                text.extend_from_slice(l.raw.as_bytes());
                text.push(b'\n');
            }
            encode_record(precision, now, &text)
        };
        inner.wait_for_buffer_room()?;
        let bytes: usize = accepted.iter().map(|l| l.raw.len() + 1).sum();
        outcome.accepted_lines = accepted.len();
        outcome.accepted_values = accepted.iter().map(|l| l.fields.len()).sum();
        let buffered = {
            let _gate = inner.gate.read();
            inner.wal.append(payload)?;
            let mut buffer = inner.buffer.lock();
            buffer.insert(&accepted, inner.config.partition_nanos());
            Metrics::set(&inner.metrics.buffer_rows, buffer.rows() as u64);
            Metrics::set(&inner.metrics.buffer_bytes, buffer.bytes() as u64);
            buffer.bytes() as u64
        };
        Metrics::add(
            &inner.metrics.points_written_total,
            outcome.accepted_lines as u64,
        );
        Metrics::add(
            &inner.metrics.values_written_total,
            outcome.accepted_values as u64,
        );
        Metrics::add(&inner.metrics.bytes_written_total, bytes as u64);
        for o in observers.iter() {
            o.committed(&accepted);
        }
        if buffered >= inner.config.flush.max_buffer_bytes {
            inner.request_flush();
        }
        Ok(outcome)
    }

    /// Adds an observer that hears about every later write (see [`WriteObserver`]).
    pub fn observe(&self, observer: Arc<dyn WriteObserver>) {
        let mut all = self.inner.observers.write();
        let mut next: Vec<_> = all.iter().cloned().collect();
        next.push(observer);
        *all = next.into();
    }

    /// The run-time catalog entries (see [`Entries`]).
    pub fn entries(&self) -> Entries {
        Entries(Arc::clone(&self.inner.index))
    }

    /// Reads rows; see [`crate::scan`].
    pub fn scan(&self, req: &ScanRequest) -> Result<ScanStream> {
        Metrics::add(&self.inner.metrics.scans_total, 1);
        self.inner.scan(req)
    }

    /// The latest row of every series of `measurement` (one row per series, the table's
    /// columns), without scanning history; `None` for an unknown measurement. See `last.rs`.
    pub fn last_rows(&self, measurement: &str) -> Result<Option<RecordBatch>> {
        self.inner.last_rows(measurement, now_nanos())
    }

    /// Flushes the buffer to segments now.
    pub fn flush(&self) -> Result<()> {
        self.inner.flush()
    }

    /// Runs compaction now, as the background would; returns how many partitions were
    /// compacted.
    pub fn compact(&self) -> Result<usize> {
        self.inner
            .compact(self.inner.config.compaction.min_segments)
    }

    /// Compacts every partition that has at least two small segments, whatever
    /// `min_segments` says (an operator's "compact now").
    pub fn compact_all(&self) -> Result<usize> {
        self.inner.compact(2)
    }

    /// Enforces retention as of `now` (ns); returns how many segments were dropped.
    pub fn enforce_retention(&self, now: i64) -> Result<usize> {
        self.inner.enforce_retention(now)
    }

    /// Sets a measurement's retention period (`None`: the engine default). Returns false if
    /// the measurement does not exist.
    pub fn set_retention(&self, measurement: &str, period: Option<Duration>) -> Result<bool> {
        self.inner.catalog.set_retention(measurement, period)
    }

    /// A measurement's schema.
    pub fn table(&self, measurement: &str) -> Option<Arc<TableSchema>> {
        self.inner.catalog.get(measurement)
    }

    /// Every measurement's schema, by name.
    pub fn tables(&self) -> Vec<Arc<TableSchema>> {
        self.inner.catalog.all()
    }

    /// The store's counters and gauges.
    pub fn metrics(&self) -> &Metrics {
        &self.inner.metrics
    }

    /// The configuration the store runs with.
    pub fn config(&self) -> &EngineConfig {
        &self.inner.config
    }

    /// The segments in the manifest, by id.
    pub fn segments(&self) -> Vec<SegmentRef> {
        self.inner.state.read().segments.values().cloned().collect()
    }

    /// Stops the background thread, flushes the buffer and closes the WAL. Later writes fail
    /// with [`Error::ShuttingDown`]. Idempotent.
    pub fn shutdown(&self) -> Result<()> {
        if self.inner.closed.swap(true, Ordering::AcqRel) {
            return Ok(());
        }
        self.stop_background();
        let result = self.inner.flush();
        self.inner.wal.close();
        result
    }

    fn stop_background(&self) {
        {
            let mut wake = self.inner.wake.lock();
            wake.shutdown = true;
            self.inner.wake_cv.notify_all();
        }
        if let Some(t) = self.background.lock().take() {
            let _ = t.join();
        }
    }
}

impl Drop for Store {
    fn drop(&mut self) {
        // Without shutdown(): the buffer is not flushed, but every acknowledged write is in the
        // WAL and is replayed at the next open.
        self.inner.closed.store(true, Ordering::Release);
        self.stop_background();
        self.inner.wal.close();
    }
}

/// Admits lines against retention and the catalog, in order, and returns the accepted ones;
/// `reject` hears about every other line. Live writes and WAL replay both come through here.
///
/// Lines of one request nearly always share one shape (measurement, tag keys, field keys and
/// types). Schemas only grow and never change a column's kind, so a line shaped like the
/// previous accepted one is admitted without asking the catalog again.
fn admit_all<'a>(
    catalog: &Catalog,
    config: &EngineConfig,
    lines: impl Iterator<Item = Result<ParsedLine<'a>, LineError>>,
    now: i64,
    mut reject: impl FnMut(LineError),
) -> Result<Vec<ParsedLine<'a>>> {
    let mut accepted: Vec<ParsedLine<'a>> = Vec::new();
    // Retention cutoff of the last accepted line's measurement.
    let mut cutoff: Option<(i64, Duration)> = None;
    for item in lines {
        let line = match item {
            Ok(line) => line,
            Err(e) => {
                reject(e);
                continue;
            }
        };
        let fast = accepted.last().is_some_and(|prev| same_shape(prev, &line))
            && cutoff.is_none_or(|(c, _)| line.timestamp >= c);
        if fast {
            accepted.push(line);
            continue;
        }
        let schema = catalog.get(&line.measurement);
        let line_cutoff = retention_cutoff(schema.as_deref(), config, now);
        if let Some((c, period)) = line_cutoff
            && line.timestamp < c
        {
            reject(LineError {
                line: line.line_number,
                reason: format!(
                    "point is older than the retention period of {:?} ({})",
                    line.measurement.as_ref(),
                    humantime::format_duration(period)
                ),
            });
            continue;
        }
        match catalog.admit(&line)? {
            Ok(()) => {
                cutoff = line_cutoff;
                accepted.push(line);
            }
            Err(reason) => reject(LineError {
                line: line.line_number,
                reason,
            }),
        }
    }
    Ok(accepted)
}

/// Whether two lines have the same measurement, tag keys, and field keys and types, in order.
fn same_shape(a: &ParsedLine<'_>, b: &ParsedLine<'_>) -> bool {
    a.measurement == b.measurement
        && a.tags.len() == b.tags.len()
        && a.fields.len() == b.fields.len()
        && a.tags.iter().zip(&b.tags).all(|(x, y)| x.0 == y.0)
        && a.fields
            .iter()
            .zip(&b.fields)
            .all(|(x, y)| x.0 == y.0 && x.1.field_type() == y.1.field_type())
}

fn remove_orphans(dir: &std::path::Path, state: &ReadState) -> Result<usize> {
    let mut removed = 0;
    let entries = fs::read_dir(dir).map_err(|source| Error::CreateDir {
        path: dir.to_path_buf(),
        source,
    })?;
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        let orphan = if name.ends_with(".tmp") {
            true
        } else if let Some(id) = name
            .strip_suffix(".parquet")
            .and_then(|n| n.parse::<u64>().ok())
        {
            !state.segments.contains_key(&id)
        } else {
            false
        };
        if orphan {
            if let Err(e) = fs::remove_file(entry.path()) {
                tracing::warn!(path = %entry.path().display(), error = %e, "could not remove orphan file");
            } else {
                tracing::info!(path = %entry.path().display(), "removed a file left by an interrupted flush or compaction");
                removed += 1;
            }
        }
    }
    Ok(removed)
}

impl Inner {
    /// Backpressure: while the buffer holds twice its flush threshold (a flush is running
    /// and cannot keep up), writers wait for flushes, up to `write_stall_timeout`.
    fn wait_for_buffer_room(&self) -> Result<()> {
        let limit = self.config.flush.max_buffer_bytes.saturating_mul(2);
        if (self.buffer.lock().bytes() as u64) < limit {
            return Ok(());
        }
        let timeout = self.config.flush.write_stall_timeout;
        let deadline = Instant::now() + timeout;
        let mut wake = self.wake.lock();
        loop {
            if (self.buffer.lock().bytes() as u64) < limit {
                return Ok(());
            }
            if wake.shutdown || Instant::now() >= deadline {
                return Err(Error::Overloaded(timeout));
            }
            // Flushes wait for disk space too: say so now rather than after the timeout.
            self.disk.check()?;
            if !wake.flush_requested {
                wake.flush_requested = true;
                self.wake_cv.notify_all();
            }
            self.flushed_cv.wait_until(
                &mut wake,
                deadline.min(Instant::now() + Duration::from_millis(100)),
            );
        }
    }

    /// Wakes writers waiting for buffer room.
    pub(crate) fn notify_flushed(&self) {
        let _wake = self.wake.lock();
        self.flushed_cv.notify_all();
    }

    fn request_flush(&self) {
        let mut wake = self.wake.lock();
        if !wake.flush_requested {
            wake.flush_requested = true;
            self.wake_cv.notify_all();
        }
    }

    pub(crate) fn update_gauges(&self) {
        let (segments, bytes, frozen_rows, frozen_bytes) = {
            let state = self.state.read();
            let frozen = state.frozen.iter().flat_map(|f| f.partitions.iter());
            let (rows, bytes) = frozen.fold((0u64, 0u64), |(r, b), p| {
                (r + p.batch.num_rows() as u64, b + p.bytes as u64)
            });
            (
                state.segments.len() as u64,
                state.segments.values().map(|s| s.meta.bytes).sum::<u64>(),
                rows,
                bytes,
            )
        };
        let (rows, buf_bytes) = {
            let b = self.buffer.lock();
            (b.rows() as u64, b.bytes() as u64)
        };
        Metrics::set(&self.metrics.segments, segments);
        Metrics::set(&self.metrics.segment_bytes, bytes);
        Metrics::set(&self.metrics.buffer_rows, rows + frozen_rows);
        Metrics::set(&self.metrics.buffer_bytes, buf_bytes + frozen_bytes);
        Metrics::set(&self.metrics.series, self.series.lock().by_key.len() as u64);
    }

    fn background(&self) {
        let cfg = &self.config;
        let start = Instant::now();
        let (mut next_flush, mut next_compact, mut next_retention) = (
            start + cfg.flush.interval,
            start + cfg.compaction.interval,
            start + Duration::from_secs(5),
        );
        loop {
            let requested = {
                let mut wake = self.wake.lock();
                let deadline = next_flush.min(next_compact).min(next_retention);
                if !wake.flush_requested && !wake.shutdown {
                    self.wake_cv.wait_until(&mut wake, deadline);
                }
                if wake.shutdown {
                    return;
                }
                std::mem::take(&mut wake.flush_requested)
            };
            let now = Instant::now();
            if requested || now >= next_flush {
                if let Err(e) = self.flush() {
                    tracing::error!(error = %e, "flush failed; the data stays in the WAL and the buffer, retrying later");
                }
                next_flush = Instant::now() + cfg.flush.interval;
            }
            if now >= next_compact {
                if let Err(e) = self.compact(self.config.compaction.min_segments) {
                    tracing::error!(error = %e, "compaction failed");
                }
                next_compact = Instant::now() + cfg.compaction.interval;
            }
            if now >= next_retention {
                if let Err(e) = self.enforce_retention(now_nanos()) {
                    tracing::error!(error = %e, "retention failed");
                }
                next_retention = Instant::now() + cfg.retention.interval;
            }
        }
    }
}

#[cfg(test)]
mod tests;
