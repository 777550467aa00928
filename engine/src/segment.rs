//! Immutable Parquet segments and their manifest entries.
//!
//! A segment holds rows of one measurement and one time partition, sorted by series id and
//! then time, with a hidden `__series_id` column in front. Encodings are chosen for metrics:
//! `time`, `__series_id` and integer fields are delta-encoded (regular intervals and slowly
//! moving counters shrink to a few bits), floats use byte-stream-split (exponent bytes line
//! up and compress), tags are dictionary-encoded, and everything is ZSTD-compressed. Page
//! statistics and the page index are written so readers can skip pages.
//!
//! A file is written to a temporary name, fsynced and renamed; it exists for readers only once
//! its [`SegmentMeta`] is committed to the index.

use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use arrow::array::{Array, AsArray, BooleanArray, RecordBatch};
use arrow::compute::filter_record_batch;
use arrow::datatypes::{DataType, Int64Type, SchemaRef, UInt32Type};
use croaring::{Bitmap, Portable};
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use parquet::arrow::{ArrowWriter, ProjectionMask};
use parquet::basic::{Compression, Encoding, ZstdLevel};
use parquet::file::properties::{EnabledStatistics, WriterProperties};
use parquet::file::statistics::Statistics;
use parquet::schema::types::ColumnPath;
use serde::{Deserialize, Serialize};

use crate::catalog::{SERIES_ID_COLUMN, TIME_COLUMN};
use crate::config::FlushConfig;
use crate::{Error, Result};

/// A segment's entry in the manifest.
#[derive(Debug, Clone, PartialEq)]
pub struct SegmentMeta {
    pub id: u64,
    pub measurement: String,
    /// Start of the partition (ns).
    pub partition: i64,
    pub min_time: i64,
    pub max_time: i64,
    pub rows: u64,
    pub bytes: u64,
    /// 0 for a flush, one more than its inputs' highest for a compaction.
    pub level: u32,
    /// The series the segment holds.
    pub series: Bitmap,
}

#[derive(Serialize, Deserialize)]
struct MetaHeader {
    id: u64,
    measurement: String,
    partition: i64,
    min_time: i64,
    max_time: i64,
    rows: u64,
    bytes: u64,
    level: u32,
}

impl SegmentMeta {
    /// File name of the segment inside `segments/`.
    pub fn file_name(id: u64) -> String {
        format!("{id:020}.parquet")
    }

    /// Encodes as `[json length: u32 LE][json][portable Roaring bitmap]`.
    pub fn encode(&self) -> Vec<u8> {
        let header = MetaHeader {
            id: self.id,
            measurement: self.measurement.clone(),
            partition: self.partition,
            min_time: self.min_time,
            max_time: self.max_time,
            rows: self.rows,
            bytes: self.bytes,
            level: self.level,
        };
        // Serializing a struct of strings and integers cannot fail.
        let json = serde_json::to_vec(&header).unwrap_or_default();
        let mut out = Vec::with_capacity(4 + json.len() + 64);
        out.extend_from_slice(&(json.len() as u32).to_le_bytes());
        out.extend_from_slice(&json);
        out.extend_from_slice(&self.series.serialize::<Portable>());
        out
    }

    /// Inverse of [`SegmentMeta::encode`].
    pub fn decode(bytes: &[u8]) -> Result<Self> {
        let bad = |reason: String| Error::DecodeIndex {
            what: "segment meta",
            reason,
        };
        let len = bytes.get(..4).ok_or_else(|| bad("truncated".into()))?;
        let len = u32::from_le_bytes([len[0], len[1], len[2], len[3]]) as usize;
        let json = bytes
            .get(4..4 + len)
            .ok_or_else(|| bad("truncated header".into()))?;
        let h: MetaHeader = serde_json::from_slice(json).map_err(|e| bad(e.to_string()))?;
        let series = Bitmap::try_deserialize::<Portable>(&bytes[4 + len..])
            .ok_or_else(|| bad("bad series bitmap".into()))?;
        Ok(Self {
            id: h.id,
            measurement: h.measurement,
            partition: h.partition,
            min_time: h.min_time,
            max_time: h.max_time,
            rows: h.rows,
            bytes: h.bytes,
            level: h.level,
            series,
        })
    }
}

/// A segment in the live manifest. When the manifest drops it (compaction, retention) it is
/// marked obsolete, and its file is deleted when the last reader lets go of it.
#[derive(Debug)]
pub struct Segment {
    pub meta: SegmentMeta,
    pub path: PathBuf,
    obsolete: AtomicBool,
}

/// Shared handle to a live segment.
pub type SegmentRef = Arc<Segment>;

impl Segment {
    pub fn new(meta: SegmentMeta, dir: &Path) -> Self {
        let path = dir.join(SegmentMeta::file_name(meta.id));
        Self {
            meta,
            path,
            obsolete: AtomicBool::new(false),
        }
    }

    /// Marks the file for deletion once no reader holds it.
    pub fn mark_obsolete(&self) {
        self.obsolete.store(true, Ordering::Release);
    }

    /// Reads the rows with `start <= time < end` (and, if given, whose series is in `series`),
    /// projected to `columns` (all when `None`; `time` and `__series_id` are dropped unless
    /// asked for). Row groups whose statistics rule them out are not read.
    pub fn read(
        &self,
        start: i64,
        end: i64,
        series: Option<&Bitmap>,
        columns: Option<&[String]>,
    ) -> Result<Vec<RecordBatch>> {
        read_file(&self.path, start, end, series, columns)
    }
}

impl Drop for Segment {
    fn drop(&mut self) {
        if self.obsolete.load(Ordering::Acquire)
            && let Err(e) = fs::remove_file(&self.path)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            tracing::warn!(path = %self.path.display(), error = %e, "could not delete obsolete segment");
        }
    }
}

/// Writes a segment file from sorted batches (`__series_id` first), durably: to a temporary
/// name, fsynced, then renamed into place.
pub struct SegmentWriter {
    path: PathBuf,
    tmp: PathBuf,
    writer: ArrowWriter<File>,
    rows: u64,
}

impl std::fmt::Debug for SegmentWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SegmentWriter")
            .field("path", &self.path)
            .field("rows", &self.rows)
            .finish()
    }
}

impl SegmentWriter {
    /// Starts the file `path` with `schema`.
    pub fn create(path: &Path, schema: SchemaRef, config: &FlushConfig) -> Result<Self> {
        let fail = |reason: String| Error::WriteSegment {
            path: path.to_path_buf(),
            reason,
        };
        let level = ZstdLevel::try_new(config.zstd_level).map_err(|e| fail(e.to_string()))?;
        let mut props = WriterProperties::builder()
            .set_compression(Compression::ZSTD(level))
            .set_statistics_enabled(EnabledStatistics::Page)
            .set_max_row_group_row_count(Some(config.row_group_rows))
            .set_data_page_row_count_limit(16 * 1024);
        for field in schema.fields() {
            let col = ColumnPath::from(field.name().as_str());
            props = match field.data_type() {
                DataType::Timestamp(..) | DataType::Int64 | DataType::UInt64 | DataType::UInt32 => {
                    props
                        .set_column_dictionary_enabled(col.clone(), false)
                        .set_column_encoding(col, Encoding::DELTA_BINARY_PACKED)
                }
                DataType::Float64 => props
                    .set_column_dictionary_enabled(col.clone(), false)
                    .set_column_encoding(col, Encoding::BYTE_STREAM_SPLIT),
                _ => props,
            };
        }
        let tmp = path.with_extension("parquet.tmp");
        let file = File::create(&tmp).map_err(|e| fail(e.to_string()))?;
        let writer = ArrowWriter::try_new(file, schema, Some(props.build()))
            .map_err(|e| fail(e.to_string()))?;
        Ok(Self {
            path: path.to_path_buf(),
            tmp,
            writer,
            rows: 0,
        })
    }

    fn fail(&self, reason: impl ToString) -> Error {
        Error::WriteSegment {
            path: self.path.clone(),
            reason: reason.to_string(),
        }
    }

    /// Appends sorted rows.
    pub fn write(&mut self, batch: &RecordBatch) -> Result<()> {
        self.writer.write(batch).map_err(|e| self.fail(e))?;
        self.rows += batch.num_rows() as u64;
        Ok(())
    }

    /// Gives up on the file: removes the partial temporary file.
    pub fn abandon(self) {
        drop(self.writer);
        let _ = fs::remove_file(&self.tmp);
    }

    /// Rows written so far.
    pub fn rows(&self) -> u64 {
        self.rows
    }

    /// Closes, syncs and renames the file into place; returns its size.
    pub fn finish(self) -> Result<u64> {
        let fail = |reason: String| Error::WriteSegment {
            path: self.path.clone(),
            reason,
        };
        let file = self.writer.into_inner().map_err(|e| fail(e.to_string()))?;
        file.sync_all().map_err(|e| fail(e.to_string()))?;
        let bytes = file.metadata().map_err(|e| fail(e.to_string()))?.len();
        drop(file);
        fs::rename(&self.tmp, &self.path).map_err(|e| fail(e.to_string()))?;
        if let Some(dir) = self.path.parent() {
            File::open(dir)
                .and_then(|d| d.sync_all())
                .map_err(|e| fail(e.to_string()))?;
        }
        Ok(bytes)
    }
}

/// Opens a segment file and reads its footer; errors name the file.
fn open_file(path: &Path) -> Result<ParquetRecordBatchReaderBuilder<File>> {
    let fail = |e: &dyn std::fmt::Display| Error::ReadSegment {
        path: path.to_path_buf(),
        reason: e.to_string(),
    };
    let file = File::open(path).map_err(|e| fail(&e))?;
    ParquetRecordBatchReaderBuilder::try_new(file).map_err(|e| fail(&e))
}

/// The Arrow schema stored in a segment file.
pub fn file_schema(path: &Path) -> Result<SchemaRef> {
    Ok(Arc::clone(open_file(path)?.schema()))
}

/// See [`Segment::read`].
pub fn read_file(
    path: &Path,
    start: i64,
    end: i64,
    series: Option<&Bitmap>,
    columns: Option<&[String]>,
) -> Result<Vec<RecordBatch>> {
    let fail = |reason: String| Error::ReadSegment {
        path: path.to_path_buf(),
        reason,
    };
    let builder = open_file(path)?;
    let schema = Arc::clone(builder.schema());
    let time_idx = schema
        .index_of(TIME_COLUMN)
        .map_err(|_| fail("no time column".into()))?;
    let sid_idx = schema
        .index_of(SERIES_ID_COLUMN)
        .map_err(|_| fail("no series id column".into()))?;

    // Row groups: keep those whose time and series-id ranges can hold a match.
    let (series_min, series_max) = match series {
        Some(b) if b.is_empty() => return Ok(Vec::new()),
        Some(b) => (b.minimum().unwrap_or(0), b.maximum().unwrap_or(u32::MAX)),
        None => (0, u32::MAX),
    };
    let meta = builder.metadata();
    let parquet_schema = builder.parquet_schema();
    let leaf_of = |root: usize| {
        (0..parquet_schema.num_columns()).find(|&i| parquet_schema.get_column_root_idx(i) == root)
    };
    let (time_leaf, sid_leaf) = (leaf_of(time_idx), leaf_of(sid_idx));
    let row_groups: Vec<usize> = (0..meta.num_row_groups())
        .filter(|&rg| {
            let rg = meta.row_group(rg);
            let time_ok = match time_leaf.and_then(|l| rg.column(l).statistics()) {
                Some(Statistics::Int64(s)) => match (s.min_opt(), s.max_opt()) {
                    (Some(&lo), Some(&hi)) => hi >= start && lo < end,
                    _ => true,
                },
                _ => true,
            };
            let sid_ok = match sid_leaf.and_then(|l| rg.column(l).statistics()) {
                Some(Statistics::Int32(s)) => match (s.min_opt(), s.max_opt()) {
                    (Some(&lo), Some(&hi)) => {
                        (hi as u32) >= series_min && (lo as u32) <= series_max
                    }
                    _ => true,
                },
                _ => true,
            };
            time_ok && sid_ok
        })
        .collect();
    if row_groups.is_empty() {
        return Ok(Vec::new());
    }

    // Projection: what was asked for, plus the columns the row filter needs.
    let wanted: Vec<usize> = match columns {
        Some(cols) => cols
            .iter()
            .filter_map(|c| schema.index_of(c).ok())
            .collect(),
        None => (0..schema.fields().len())
            .filter(|&i| i != sid_idx)
            .collect(),
    };
    let mut read_roots = wanted.clone();
    for extra in [time_idx, sid_idx] {
        if !read_roots.contains(&extra) {
            read_roots.push(extra);
        }
    }
    read_roots.sort_unstable();
    let mask = ProjectionMask::roots(parquet_schema, read_roots.iter().copied());
    let reader = builder
        .with_row_groups(row_groups)
        .with_projection(mask)
        .with_batch_size(64 * 1024)
        .build()
        .map_err(|e| fail(e.to_string()))?;

    let mut out = Vec::new();
    for batch in reader {
        let batch = batch.map_err(|e| fail(e.to_string()))?;
        let bs = batch.schema();
        let times = batch
            .column(bs.index_of(TIME_COLUMN).map_err(|e| fail(e.to_string()))?)
            .as_primitive_opt::<arrow::datatypes::TimestampNanosecondType>()
            .ok_or_else(|| fail("time column is not a nanosecond timestamp".into()))?;
        let sids = batch
            .column(
                bs.index_of(SERIES_ID_COLUMN)
                    .map_err(|e| fail(e.to_string()))?,
            )
            .as_primitive_opt::<UInt32Type>()
            .ok_or_else(|| fail("series id column is not u32".into()))?;
        let keep: BooleanArray = times
            .values()
            .iter()
            .zip(sids.values().iter())
            .map(|(&t, &s)| Some(t >= start && t < end && series.is_none_or(|b| b.contains(s))))
            .collect();
        let filtered = if keep.true_count() == batch.num_rows() {
            batch
        } else {
            filter_record_batch(&batch, &keep).map_err(|e| fail(e.to_string()))?
        };
        if filtered.num_rows() == 0 {
            continue;
        }
        // Back to the caller's projection, in its order.
        let fs = filtered.schema();
        let indices: Vec<usize> = wanted
            .iter()
            .filter_map(|&i| fs.index_of(schema.field(i).name()).ok())
            .collect();
        out.push(
            filtered
                .project(&indices)
                .map_err(|e| fail(e.to_string()))?,
        );
    }
    Ok(out)
}

/// The `time` column of a batch as i64 values.
pub fn time_values(batch: &RecordBatch) -> Option<&[i64]> {
    let col = batch.column_by_name(TIME_COLUMN)?;
    match col.data_type() {
        DataType::Timestamp(..) => Some(
            col.as_primitive::<arrow::datatypes::TimestampNanosecondType>()
                .values(),
        ),
        DataType::Int64 => Some(col.as_primitive::<Int64Type>().values()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn meta_round_trips() {
        let meta = SegmentMeta {
            id: 9,
            measurement: "cpu \"quoted\"".into(),
            partition: -86_400,
            min_time: -5,
            max_time: 7,
            rows: 3,
            bytes: 1234,
            level: 2,
            series: Bitmap::of(&[1, 5, 1_000_000]),
        };
        assert_eq!(SegmentMeta::decode(&meta.encode()).unwrap(), meta);
        assert!(SegmentMeta::decode(&meta.encode()[..10]).is_err());
        assert!(SegmentMeta::decode(b"").is_err());
    }
}
