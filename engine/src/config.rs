//! Engine configuration: every knob with its documented default.

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// When a write is acknowledged relative to its WAL record reaching the disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum SyncPolicy {
    /// fsync before acknowledging (default). Group commit makes one fsync serve every request
    /// that arrived while the previous one ran.
    #[default]
    Always,
    /// Acknowledge after the write(2); fsync every `wal.sync_interval`. A machine crash can
    /// lose up to that interval; a process crash loses nothing.
    Interval,
    /// Never fsync explicitly; the kernel decides. For benchmarks and throwaway data.
    Never,
}

/// Configuration of the storage engine (`[engine]` in the config file).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EngineConfig {
    /// Root of all on-disk state: `wal/`, `segments/`, `index/`. Default `./forestall-data`.
    pub data_dir: PathBuf,
    /// Width of a time partition, the unit of flush, compaction and retention. Default 1 day.
    #[serde(with = "humantime_serde")]
    pub partition_duration: Duration,
    pub wal: WalConfig,
    pub flush: FlushConfig,
    pub compaction: CompactionConfig,
    pub retention: RetentionConfig,
    /// Writes (points, index entries, segment commits) are refused with "disk full" while
    /// the disk holding `data_dir` has less than this free, so that the store never runs
    /// it to the last byte and recovers on its own once space is freed (see
    /// [`crate::disk`]). 0 turns the guard off. Default 64 MiB.
    pub min_free_disk_bytes: u64,
}

/// `[engine.wal]`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct WalConfig {
    /// Default `always`.
    pub sync: SyncPolicy,
    /// fsync period for `sync = "interval"`. Default 100 ms.
    #[serde(with = "humantime_serde")]
    pub sync_interval: Duration,
    /// A WAL file is closed and a new one started past this size. Default 64 MiB.
    pub max_file_bytes: u64,
}

/// `[engine.flush]`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FlushConfig {
    /// The buffer is flushed at least this often. Default 10 minutes.
    #[serde(with = "humantime_serde")]
    pub interval: Duration,
    /// The buffer is flushed as soon as it holds about this many bytes. Default 128 MiB.
    pub max_buffer_bytes: u64,
    /// Rows per Parquet row group. Default 262144.
    pub row_group_rows: usize,
    /// ZSTD level of segment files' field columns. Default 3.
    pub zstd_level: i32,
    /// When the buffer reaches twice `max_buffer_bytes` (flushing cannot keep up), writes wait
    /// for a flush; after this long they fail with "overloaded" (HTTP 503) instead of growing
    /// memory without bound. Default 30 s.
    #[serde(with = "humantime_serde")]
    pub write_stall_timeout: Duration,
}

/// `[engine.compaction]`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CompactionConfig {
    /// How often the compactor looks for work. Default 1 minute.
    #[serde(with = "humantime_serde")]
    pub interval: Duration,
    /// A partition is compacted once it has this many segments smaller than
    /// `target_segment_bytes`. Default 4.
    pub min_segments: usize,
    /// Segments at least this large are left alone. Default 256 MiB.
    pub target_segment_bytes: u64,
}

/// `[engine.retention]`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RetentionConfig {
    /// Data older than this is dropped, a whole partition at a time, and writes older than it
    /// are rejected. `None` (the default) keeps everything. Per-measurement periods are set in
    /// the catalog ([`crate::Store::set_retention`]) and take precedence.
    #[serde(with = "humantime_serde")]
    pub default_period: Option<Duration>,
    /// How often retention is enforced. Default 1 hour.
    #[serde(with = "humantime_serde")]
    pub interval: Duration,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            data_dir: PathBuf::from("./forestall-data"),
            partition_duration: Duration::from_secs(24 * 3600),
            wal: WalConfig::default(),
            flush: FlushConfig::default(),
            compaction: CompactionConfig::default(),
            retention: RetentionConfig::default(),
            min_free_disk_bytes: 64 << 20,
        }
    }
}

impl Default for WalConfig {
    fn default() -> Self {
        Self {
            sync: SyncPolicy::Always,
            sync_interval: Duration::from_millis(100),
            max_file_bytes: 64 << 20,
        }
    }
}

impl Default for FlushConfig {
    fn default() -> Self {
        Self {
            interval: Duration::from_secs(600),
            max_buffer_bytes: 128 << 20,
            row_group_rows: 256 * 1024,
            zstd_level: 3,
            write_stall_timeout: Duration::from_secs(30),
        }
    }
}

impl Default for CompactionConfig {
    fn default() -> Self {
        Self {
            interval: Duration::from_secs(60),
            min_segments: 4,
            target_segment_bytes: 256 << 20,
        }
    }
}

impl Default for RetentionConfig {
    fn default() -> Self {
        Self {
            default_period: None,
            interval: Duration::from_secs(3600),
        }
    }
}

impl EngineConfig {
    /// Checks values that would make the engine misbehave rather than fail loudly.
    pub fn validate(&self) -> Result<()> {
        let fail = |m: &str| Err(Error::Config(m.to_string()));
        if self.partition_duration < Duration::from_secs(60) {
            return fail("engine.partition_duration must be at least 1 minute");
        }
        if self.wal.max_file_bytes < 4096 {
            return fail("engine.wal.max_file_bytes must be at least 4096");
        }
        if self.wal.sync == SyncPolicy::Interval && self.wal.sync_interval.is_zero() {
            return fail("engine.wal.sync_interval must be positive");
        }
        if self.flush.interval.is_zero() {
            return fail("engine.flush.interval must be positive");
        }
        if self.flush.max_buffer_bytes < 1 << 20 {
            return fail("engine.flush.max_buffer_bytes must be at least 1 MiB");
        }
        if self.flush.row_group_rows < 1024 {
            return fail("engine.flush.row_group_rows must be at least 1024");
        }
        if !(1..=22).contains(&self.flush.zstd_level) {
            return fail("engine.flush.zstd_level must be between 1 and 22");
        }
        if self.compaction.min_segments < 2 {
            return fail("engine.compaction.min_segments must be at least 2");
        }
        if self.compaction.interval.is_zero() || self.retention.interval.is_zero() {
            return fail(
                "engine.compaction.interval and engine.retention.interval must be positive",
            );
        }
        if self
            .retention
            .default_period
            .is_some_and(|p| p < self.partition_duration)
        {
            return fail("engine.retention.default_period must be at least one partition_duration");
        }
        Ok(())
    }

    /// Partition width in nanoseconds.
    pub fn partition_nanos(&self) -> i64 {
        i64::try_from(self.partition_duration.as_nanos()).unwrap_or(i64::MAX)
    }
}
