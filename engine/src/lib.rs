//! # forestall-engine
//!
//! Forestall's storage engine. The write path, in the order a point travels:
//!
//! 1. [`line_protocol`] parses a request body and says why each bad line was rejected;
//! 2. [`catalog`] checks every line against the measurement's schema (a field's type is fixed
//!    by its first write) and records new tags and fields;
//! 3. [`wal`] appends the valid lines as one checksummed record; one fsync serves many
//!    concurrent requests (group commit) and a write is acknowledged once it is durable;
//! 4. [`buffer`] holds the points as Arrow-ready columns per measurement and time partition,
//!    queryable at once;
//! 5. [`flush`] turns frozen buffers into immutable Parquet [`segment`]s, sorted by series then
//!    time, and records them in the [`index`]'s manifest in one atomic RocksDB batch, after
//!    which the WAL files they cover are deleted;
//! 6. [`compaction`] merges a partition's small segments and [`retention`] drops partitions
//!    that have aged out.
//!
//! The read path is [`scan`]: (measurement, time range, tag predicate, projection) → Arrow
//! record batches from the buffer and the segments, pruned by the manifest's time ranges and
//! the index's series bitmaps.
//!
//! [`Store`] ties these together. This crate depends on no other Forestall crate.

pub mod audit;
pub mod buffer;
pub mod catalog;
pub mod compaction;
pub mod config;
pub mod decimal;
pub mod disk;
pub mod flush;
pub mod index;
mod last;
pub mod line_protocol;
pub mod metrics;
pub mod prometheus;
pub mod retention;
pub mod scan;
pub mod segment;
pub mod store;
pub mod wal;

use std::path::PathBuf;

pub use catalog::{ColumnKind, TableSchema};
pub use config::{EngineConfig, SyncPolicy};
pub use line_protocol::{FieldType, Precision};
pub use metrics::Metrics;
pub use scan::{ScanRequest, ScanStream, TagPredicate};
pub use segment::{ReadStats, RowFilter};
pub use store::{Entries, Store, WriteObserver, WriteOutcome};

/// Identifies a series (a measurement plus its sorted tag set) for the life of the store.
pub type SeriesId = u32;

/// Errors of the storage engine.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid configuration: {0}")]
    Config(String),

    #[error("create directory {path}: {source}")]
    CreateDir {
        path: PathBuf,
        source: std::io::Error,
    },

    #[error("open index at {path}: {source}")]
    OpenIndex {
        path: PathBuf,
        source: rocksdb::Error,
    },

    #[error("index {op}: {source}")]
    Index {
        op: &'static str,
        source: rocksdb::Error,
    },

    #[error("decode {what} from the index: {reason}")]
    DecodeIndex { what: &'static str, reason: String },

    #[error("open WAL file {path}: {source}")]
    OpenWal {
        path: PathBuf,
        source: std::io::Error,
    },

    #[error("append to WAL file {path}: {source}")]
    AppendWal {
        path: PathBuf,
        source: std::io::Error,
    },

    #[error("replay WAL file {path}: {reason}")]
    ReplayWal { path: PathBuf, reason: String },

    #[error("the WAL is closed")]
    WalClosed,

    #[error("write segment {path}: {reason}")]
    WriteSegment { path: PathBuf, reason: String },

    #[error("read segment {path}: {reason}")]
    ReadSegment { path: PathBuf, reason: String },

    #[error("build record batch for {measurement}: {source}")]
    Arrow {
        measurement: String,
        source: arrow::error::ArrowError,
    },

    #[error("unknown measurement {0:?}")]
    UnknownMeasurement(String),

    #[error("invalid scan: {0}")]
    InvalidScan(String),

    #[error("a write observer refused the write: {0}")]
    Observer(String),

    #[error(
        "the disk holding {} has {free} bytes free, less than [engine] min_free_disk_bytes \
         ({min_free}): writes are refused until space is freed",
        path.display()
    )]
    LowDiskSpace {
        path: PathBuf,
        free: u64,
        min_free: u64,
    },

    #[error("the store is shutting down")]
    ShuttingDown,

    #[error("write buffer full: flushing has not kept up for {0:?}; retry later")]
    Overloaded(std::time::Duration),
}

impl Error {
    /// Whether the disk (or the user's quota) is full: the write was not stored, and will
    /// be once space is freed.
    pub fn is_storage_full(&self) -> bool {
        match self {
            Error::AppendWal { source, .. }
            | Error::OpenWal { source, .. }
            | Error::CreateDir { source, .. } => matches!(
                source.kind(),
                std::io::ErrorKind::StorageFull | std::io::ErrorKind::QuotaExceeded
            ),
            // RocksDB reports ENOSPC as an IO error with the OS's message.
            Error::Index { source, .. } => source.to_string().contains("No space left"),
            Error::LowDiskSpace { .. } => true,
            _ => false,
        }
    }
}

/// The engine's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Crash-test hook. When the environment variable `FORESTALL_PAUSE_AT` names `point`, writes
/// `pause point <point> reached` to stderr and blocks for a minute, so that a test can kill
/// the process at a known moment (between writing segment files and committing them, say).
/// The variable is read once; with it unset this is one atomic load.
#[doc(hidden)]
pub fn pause_point(point: &str) {
    static TARGET: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
    let target = TARGET.get_or_init(|| std::env::var("FORESTALL_PAUSE_AT").ok());
    if target.as_deref() == Some(point) {
        eprintln!("pause point {point} reached");
        std::thread::sleep(std::time::Duration::from_secs(60));
    }
}
