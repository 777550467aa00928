//! Immutable Parquet segments and their manifest entries.
//!
//! A segment holds rows of one measurement and one time partition, sorted by series id and
//! then time, with a hidden `__series_id` column in front. Encodings are chosen for metrics:
//! `time`, `__series_id` and integer fields are delta-encoded (regular intervals and slowly
//! moving counters shrink to a few bits), a float column whose values are all short decimals
//! is stored as scaled integers ([`crate::decimal`]) and delta-encoded like one, other floats
//! use byte-stream-split (exponent bytes line up and compress), tags are dictionary-encoded. Fields are ZSTD-compressed, `time` and
//! `__series_id` LZ4-compressed, tags left as they are (see [`SegmentWriter::create`]). Page
//! statistics and the page index are written so readers can skip pages.
//!
//! A file is written to a temporary name, fsynced and renamed; it exists for readers only once
//! its [`SegmentMeta`] is committed to the index.

use std::fs::{self, File};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};

use arrow::array::{Array, AsArray, BooleanArray, RecordBatch};
use arrow::buffer::BooleanBuffer;
use arrow::compute::{SlicesIterator, filter_record_batch};
use arrow::datatypes::{DataType, Int64Type, SchemaRef, UInt32Type};
use croaring::{Bitmap, Portable};
use parquet::arrow::arrow_reader::{
    ArrowReaderMetadata, ArrowReaderOptions, ParquetRecordBatchReaderBuilder, RowSelection,
};
use parquet::arrow::{ArrowWriter, ProjectionMask};
use parquet::basic::{Compression, Encoding, ZstdLevel};
use parquet::file::metadata::{PageIndexPolicy, ParquetMetaData};
use parquet::file::page_index::column_index::ColumnIndexMetaData;
use parquet::file::properties::{EnabledStatistics, WriterProperties};
use parquet::file::statistics::Statistics;
use parquet::schema::types::ColumnPath;
use serde::{Deserialize, Serialize};

use crate::catalog::{SERIES_ID_COLUMN, TIME_COLUMN};
use crate::config::FlushConfig;
use crate::decimal::{self, Scales, Stored};
use crate::{Error, Result};

/// Rows per data page, at most. Rows are sorted by series then time, so a page is a stretch
/// of one or a few series; the page index lets a read skip the pages outside its series and
/// time range. 4 Ki-row pages were measured on TSBS (docs/BENCHMARKS.md): segments 16 %
/// larger and no query faster, so pages stay at 16 Ki rows.
pub const PAGE_ROWS: usize = 16 * 1024;

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
    /// The file's footer and page index, decoded on the first read and kept: a query that
    /// touches many segments would otherwise parse every footer again.
    footer: OnceLock<ArrowReaderMetadata>,
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
            footer: OnceLock::new(),
        }
    }

    /// How this segment stores each of its float columns, for a compaction to choose how
    /// its output stores them ([`Scales::merge`]).
    pub fn stored_floats(&self) -> Result<std::collections::BTreeMap<String, Stored>> {
        let builder = open_file(&self.path, true, Some(&self.footer))?;
        let (schema, meta) = (builder.schema(), builder.metadata());
        let parquet_schema = builder.parquet_schema();
        let mut out = std::collections::BTreeMap::new();
        for (root, field) in schema.fields().iter().enumerate() {
            let stored = if field.data_type() == &DataType::Float64 {
                Stored::Float
            } else if let Some(scale) = decimal::scale_of(field) {
                let leaf = (0..parquet_schema.num_columns())
                    .find(|&i| parquet_schema.get_column_root_idx(i) == root);
                // The largest |m| from each row group's statistics; a row group without
                // them counts as too large to rescale.
                let max_abs = meta
                    .row_groups()
                    .iter()
                    .map(|rg| match leaf.and_then(|l| rg.column(l).statistics()) {
                        Some(Statistics::Int64(s)) => s
                            .min_opt()
                            .into_iter()
                            .chain(s.max_opt())
                            .map(|v| v.unsigned_abs())
                            .max()
                            .unwrap_or(0),
                        _ => u64::MAX,
                    })
                    .max()
                    .unwrap_or(0);
                Stored::Scaled { scale, max_abs }
            } else {
                continue;
            };
            out.insert(field.name().clone(), stored);
        }
        Ok(out)
    }

    /// Marks the file for deletion once no reader holds it.
    pub fn mark_obsolete(&self) {
        self.obsolete.store(true, Ordering::Release);
    }

    /// Reads the rows with `start <= time < end` (and, if given, whose series is in `series`),
    /// projected to `columns` (all when `None`; `time` and `__series_id` are dropped unless
    /// asked for). Row groups whose statistics rule them out are not read.
    ///
    /// `share` `(k, n)` reads only the row groups whose index is `k` modulo `n`, so that `n`
    /// readers can split one file.
    pub fn read(
        &self,
        start: i64,
        end: i64,
        series: Option<&Bitmap>,
        columns: Option<&[String]>,
        share: Option<(usize, usize)>,
        filter: Option<Filter<'_>>,
    ) -> Result<(Vec<RecordBatch>, ReadStats)> {
        read_file(
            &self.path,
            Some(&self.footer),
            Window {
                start,
                end,
                series,
                share,
                filter,
            },
            columns,
        )
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
    /// The float columns stored as scaled integers, and the schema they are stored with.
    scales: Scales,
    stored: SchemaRef,
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
    /// Starts the file `path` with `schema`, storing the float columns in `scales` as scaled
    /// integers (every value written must fit its column's scale).
    pub fn create(
        path: &Path,
        schema: SchemaRef,
        scales: Scales,
        config: &FlushConfig,
    ) -> Result<Self> {
        let stored = scales.stored_schema(&schema);
        let fail = |reason: String| Error::WriteSegment {
            path: path.to_path_buf(),
            reason,
        };
        let level = ZstdLevel::try_new(config.zstd_level).map_err(|e| fail(e.to_string()))?;
        let mut props = WriterProperties::builder()
            .set_compression(Compression::ZSTD(level))
            .set_statistics_enabled(EnabledStatistics::Page)
            .set_max_row_group_row_count(Some(config.row_group_rows))
            .set_data_page_row_count_limit(PAGE_ROWS);
        for field in stored.fields() {
            let col = ColumnPath::from(field.name().as_str());
            // A reader creates a ZSTD context for each ZSTD column chunk it opens, and on this
            // machine creating one executes `CPUID`, a VM exit: with ten tags that was a tenth
            // of a one-host query's time. So only fields use ZSTD (without it they are 10 %
            // larger on TSBS's data). Tags are left uncompressed: sorted by series, a tag
            // column is a small dictionary and long runs of one index, which ZSTD does not
            // shrink. `time` and `__series_id`, which every read decodes, use LZ4: on TSBS's
            // data it shrinks them as much as ZSTD does (24 and 10 times), and its codec needs
            // no context.
            if matches!(field.data_type(), DataType::Dictionary(..)) {
                props = props.set_column_compression(col.clone(), Compression::UNCOMPRESSED);
            } else if field.name() == TIME_COLUMN || field.name() == SERIES_ID_COLUMN {
                props = props.set_column_compression(col.clone(), Compression::LZ4_RAW);
            }
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
        let writer = ArrowWriter::try_new(file, Arc::clone(&stored), Some(props.build()))
            .map_err(|e| fail(e.to_string()))?;
        Ok(Self {
            path: path.to_path_buf(),
            tmp,
            writer,
            rows: 0,
            scales,
            stored,
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
        let batch = self
            .scales
            .encode(batch, &self.stored)
            .map_err(|e| self.fail(e))?;
        self.writer.write(&batch).map_err(|e| self.fail(e))?;
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

/// Opens a segment file and reads its footer (and, with `page_index`, the column and offset
/// indexes), or takes them from `cached` (filling it on first use); errors name the file.
fn open_file(
    path: &Path,
    page_index: bool,
    cached: Option<&OnceLock<ArrowReaderMetadata>>,
) -> Result<ParquetRecordBatchReaderBuilder<File>> {
    let fail = |e: &dyn std::fmt::Display| Error::ReadSegment {
        path: path.to_path_buf(),
        reason: e.to_string(),
    };
    let file = File::open(path).map_err(|e| fail(&e))?;
    let policy = if page_index {
        PageIndexPolicy::Optional
    } else {
        PageIndexPolicy::Skip
    };
    let options = ArrowReaderOptions::new().with_page_index_policy(policy);
    let footer = match cached.and_then(OnceLock::get) {
        Some(f) => f.clone(),
        None => {
            let f = ArrowReaderMetadata::load(&file, options).map_err(|e| fail(&e))?;
            if let Some(c) = cached {
                let _ = c.set(f.clone());
            }
            f
        }
    };
    Ok(ParquetRecordBatchReaderBuilder::new_with_metadata(
        file, footer,
    ))
}

/// The Arrow schema of a segment file's rows as reads return them (scaled float columns as
/// floats).
pub fn file_schema(path: &Path) -> Result<SchemaRef> {
    Ok(decimal::logical_schema(
        open_file(path, false, None)?.schema(),
    ))
}

/// What one segment read skipped and decoded, for `EXPLAIN ANALYZE` and the tests that prove
/// pruning.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReadStats {
    /// Row groups in the file.
    pub row_groups: usize,
    /// Row groups whose statistics could hold a match.
    pub row_groups_read: usize,
    /// Rows in the row groups read.
    pub rows_in_row_groups: usize,
    /// Rows decoded after page pruning (the rest were skipped without decompression).
    pub rows_decoded: usize,
}

impl std::ops::AddAssign for ReadStats {
    fn add_assign(&mut self, o: Self) {
        self.row_groups += o.row_groups;
        self.row_groups_read += o.row_groups_read;
        self.rows_in_row_groups += o.rows_in_row_groups;
        self.rows_decoded += o.rows_decoded;
    }
}

/// Whether an inclusive range of series ids `[lo, hi]` can hold one of `series`.
fn series_in_range(series: Option<&Bitmap>, lo: i32, hi: i32) -> bool {
    series.is_none_or(|b| b.range_cardinality((lo as u32)..=(hi as u32)) > 0)
}

/// Row ranges (within one row group of `rows` rows) of the pages whose `[min, max]`, as
/// given by `keep`, can hold a match. `None` when the column has no page index.
fn page_ranges(
    meta: &ParquetMetaData,
    rg: usize,
    leaf: usize,
    rows: usize,
    keep: impl Fn(usize, &ColumnIndexMetaData) -> bool,
) -> Option<Vec<Range<usize>>> {
    let index = meta.column_index()?.get(rg)?.get(leaf)?;
    let pages = meta.offset_index()?.get(rg)?.get(leaf)?.page_locations();
    let mut out: Vec<Range<usize>> = Vec::new();
    for (i, page) in pages.iter().enumerate() {
        if !keep(i, index) {
            continue;
        }
        let from = page.first_row_index as usize;
        let to = pages
            .get(i + 1)
            .map_or(rows, |p| p.first_row_index as usize);
        match out.last_mut() {
            Some(last) if last.end == from => last.end = to,
            _ => out.push(from..to),
        }
    }
    Some(out)
}

/// Which rows of a file a read wants; see [`Segment::read`].
#[derive(Debug, Clone, Copy)]
pub struct Window<'a> {
    pub start: i64,
    pub end: i64,
    pub series: Option<&'a Bitmap>,
    pub share: Option<(usize, usize)>,
    /// Rows to drop while reading, before the other columns are decoded.
    pub filter: Option<Filter<'a>>,
}

/// A caller's filter on rows, for a read to apply early.
#[derive(Clone, Copy)]
pub struct Filter<'a> {
    pub rows: &'a RowFilter,
    /// Times at which a row passes whatever the filter says (a scan keeps rows that may
    /// have a duplicate in another source: the filter applies to them once merged).
    pub keep_at: &'a dyn Fn(i64) -> bool,
}

impl std::fmt::Debug for Filter<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Filter")
            .field("rows", self.rows)
            .finish_non_exhaustive()
    }
}

/// Which rows a caller will drop, for reads to drop early. See
/// [`crate::ScanRequest::filter`].
#[derive(Clone)]
pub struct RowFilter {
    /// The columns it reads, in the order `keep` takes them. A segment that lacks one of
    /// them is read without the filter.
    pub columns: Vec<String>,
    /// Which rows of a batch of `columns` pass (NULL does not). It must not reject a row
    /// the caller keeps; an error fails the read.
    pub keep: Arc<KeepRows>,
}

/// Which rows of a batch pass, or why that could not be worked out.
pub type KeepRows = dyn Fn(&RecordBatch) -> std::result::Result<BooleanArray, String> + Send + Sync;

impl RowFilter {
    /// Where its columns are in `schema`, if they all are.
    fn indices(&self, schema: &arrow::datatypes::Schema) -> Option<Vec<usize>> {
        self.columns
            .iter()
            .map(|c| schema.index_of(c).ok())
            .collect()
    }
}

impl std::fmt::Debug for RowFilter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RowFilter")
            .field("columns", &self.columns)
            .finish_non_exhaustive()
    }
}

/// See [`Segment::read`].
pub fn read_file(
    path: &Path,
    footer: Option<&OnceLock<ArrowReaderMetadata>>,
    window: Window<'_>,
    columns: Option<&[String]>,
) -> Result<(Vec<RecordBatch>, ReadStats)> {
    let Window {
        start,
        end,
        series,
        share,
        filter,
    } = window;
    let fail = |reason: String| Error::ReadSegment {
        path: path.to_path_buf(),
        reason,
    };
    let mut stats = ReadStats::default();
    if series.is_some_and(|b| b.is_empty()) {
        return Ok((Vec::new(), stats));
    }
    let builder = open_file(path, true, footer)?;
    let schema = Arc::clone(builder.schema());
    let time_idx = schema
        .index_of(TIME_COLUMN)
        .map_err(|_| fail("no time column".into()))?;
    let sid_idx = schema
        .index_of(SERIES_ID_COLUMN)
        .map_err(|_| fail("no series id column".into()))?;

    // Row groups, then pages inside them: keep those whose time and series-id ranges can
    // hold a match. Rows are sorted by (series, time), so one series' hour is a page or two.
    let meta = Arc::clone(builder.metadata());
    let parquet_schema = builder.parquet_schema();
    let leaf_of = |root: usize| {
        (0..parquet_schema.num_columns()).find(|&i| parquet_schema.get_column_root_idx(i) == root)
    };
    let (time_leaf, sid_leaf) = (leaf_of(time_idx), leaf_of(sid_idx));
    stats.row_groups = meta.num_row_groups();
    let mut row_groups = Vec::new();
    let mut selected: Vec<Range<usize>> = Vec::new();
    let mut offset = 0;
    // Whether every row of the row groups read is in the window (no series filter, and
    // their time statistics inside it): the rows to return are then known without reading.
    let mut all_match = series.is_none();
    for rg in 0..meta.num_row_groups() {
        if share.is_some_and(|(k, n)| rg % n != k) {
            continue;
        }
        let rgm = meta.row_group(rg);
        let (time_ok, time_inside) = match time_leaf.and_then(|l| rgm.column(l).statistics()) {
            Some(Statistics::Int64(s)) => match (s.min_opt(), s.max_opt()) {
                (Some(&lo), Some(&hi)) => (hi >= start && lo < end, lo >= start && hi < end),
                _ => (true, false),
            },
            _ => (true, false),
        };
        let sid_ok = match sid_leaf.and_then(|l| rgm.column(l).statistics()) {
            Some(Statistics::Int32(s)) => match (s.min_opt(), s.max_opt()) {
                (Some(&lo), Some(&hi)) => series_in_range(series, lo, hi),
                _ => true,
            },
            _ => true,
        };
        if !(time_ok && sid_ok) {
            continue;
        }
        let rows = rgm.num_rows() as usize;
        let all: Vec<Range<usize>> = std::iter::once(0..rows).collect();
        let by_time = time_leaf
            .and_then(|l| {
                page_ranges(&meta, rg, l, rows, |i, idx| match idx {
                    ColumnIndexMetaData::INT64(ix) => match (ix.min_value(i), ix.max_value(i)) {
                        (Some(&lo), Some(&hi)) => hi >= start && lo < end,
                        _ => true,
                    },
                    _ => true,
                })
            })
            .unwrap_or_else(|| all.clone());
        let by_series = sid_leaf
            .and_then(|l| {
                page_ranges(&meta, rg, l, rows, |i, idx| match idx {
                    ColumnIndexMetaData::INT32(ix) => match (ix.min_value(i), ix.max_value(i)) {
                        (Some(&lo), Some(&hi)) => series_in_range(series, lo, hi),
                        _ => true,
                    },
                    _ => true,
                })
            })
            .unwrap_or(all);
        let ranges = intersect_ranges(&by_time, &by_series);
        if ranges.is_empty() {
            continue;
        }
        all_match &= time_inside;
        stats.row_groups_read += 1;
        stats.rows_in_row_groups += rows;
        stats.rows_decoded += ranges.iter().map(|r| r.len()).sum::<usize>();
        selected.extend(ranges.into_iter().map(|r| r.start + offset..r.end + offset));
        row_groups.push((rg, offset..offset + rows));
        offset += rows;
    }
    if row_groups.is_empty() {
        return Ok((Vec::new(), stats));
    }

    // The columns asked for, in the caller's order.
    let wanted: Vec<usize> = match columns {
        Some(cols) => cols
            .iter()
            .filter_map(|c| schema.index_of(c).ok())
            .collect(),
        None => (0..schema.fields().len())
            .filter(|&i| i != sid_idx)
            .collect(),
    };
    let segment = Rows {
        path,
        footer,
        row_groups: &row_groups,
    };
    let keys = [time_idx.min(sid_idx), time_idx.max(sid_idx)];
    let project = |batch: RecordBatch| {
        // Readers return the file's column order; back to the caller's.
        let bs = batch.schema();
        let indices: Vec<usize> = wanted
            .iter()
            .filter_map(|&i| bs.index_of(schema.field(i).name()).ok())
            .collect();
        batch.project(&indices).map_err(|e| fail(e.to_string()))
    };
    let mut out = Vec::new();
    // The caller's filter, if this segment has every column it reads.
    let filter = filter.and_then(|f| Some((f, f.rows.indices(&schema)?)));

    if filter.is_none() && series.is_none() && !all_match && !wanted.is_empty() {
        // A time window alone cuts every series' stretch once, so most rows of the pages
        // read match: the keys are read with the columns, and the rows outside dropped.
        let mut roots = wanted.clone();
        roots.extend(keys.iter().filter(|k| !wanted.contains(k)));
        roots.sort_unstable();
        segment.read(
            ProjectionMask::roots(parquet_schema, roots),
            &selected,
            |batch| {
                let keep = window_mask(&batch, start, end, None).map_err(fail)?;
                let kept = keep.true_count();
                if kept == 0 {
                    return Ok(());
                }
                let batch = project(batch)?;
                if kept == batch.num_rows() {
                    out.push(batch);
                    return Ok(());
                }
                // The rows kept are a series' stretch of time, so they come in long runs:
                // slices of the decoded batch cost nothing, where a filter copies every
                // column.
                let runs: Vec<(usize, usize)> = SlicesIterator::new(&keep).collect();
                if runs.len() * MIN_SLICE_ROWS <= kept {
                    out.extend(runs.into_iter().map(|(a, b)| batch.slice(a, b - a)));
                } else {
                    out.push(filter_record_batch(&batch, &keep).map_err(|e| fail(e.to_string()))?);
                }
                Ok(())
            },
        )?;
        return Ok((out, stats));
    }

    // Late materialisation: the rows that match are found from `time` and `__series_id`
    // alone, and only those rows of the other columns are decoded. One host's hours are a
    // few thousand rows of a page or two of 16 Ki: decoding every column of those pages and
    // dropping most rows cost more than decoding the two keys twice.
    // A filter on fields is applied here too: high-cpu keeps one row in seven of its host's.
    let matching = if all_match && filter.is_none() {
        selected
    } else {
        let mut roots = keys.to_vec();
        if let Some((_, columns)) = &filter {
            roots.extend(columns.iter().filter(|c| !keys.contains(c)));
        }
        roots.sort_unstable();
        roots.dedup();
        let mut runs = Vec::new();
        let mut seen = 0;
        segment.read(
            ProjectionMask::roots(parquet_schema, roots),
            &selected,
            |batch| {
                let mut keep = window_mask(&batch, start, end, series).map_err(fail)?;
                if let Some((f, _)) = &filter {
                    keep = and_filter(&batch, keep, f).map_err(fail)?;
                }
                runs.extend(SlicesIterator::new(&keep).map(|(a, b)| seen + a..seen + b));
                seen += batch.num_rows();
                Ok(())
            },
        )?;
        within(&selected, runs)
    };
    let rows: usize = matching.iter().map(|r| r.len()).sum();
    if wanted.is_empty() {
        // Only the count of rows is asked for (`count(*)`).
        let empty = Arc::new(arrow::datatypes::Schema::empty());
        let options = |n| arrow::array::RecordBatchOptions::new().with_row_count(Some(n));
        for n in chunks(rows, MAX_BATCH_ROWS) {
            out.push(
                RecordBatch::try_new_with_options(Arc::clone(&empty), Vec::new(), &options(n))
                    .map_err(|e| fail(e.to_string()))?,
            );
        }
        return Ok((out, stats));
    }
    segment.read(
        ProjectionMask::roots(parquet_schema, wanted.iter().copied()),
        &matching,
        |batch| {
            out.push(project(batch)?);
            Ok(())
        },
    )?;
    Ok((out, stats))
}

/// The row groups a read keeps, each with its rows' place among them all (the positions a
/// read's ranges of rows count).
struct Rows<'a> {
    path: &'a Path,
    footer: Option<&'a OnceLock<ArrowReaderMetadata>>,
    row_groups: &'a [(usize, Range<usize>)],
}

impl Rows<'_> {
    /// Decodes `mask`'s columns at `rows` (sorted, disjoint), handing each batch to `each`.
    /// One reader per row group: a batch that spans two row groups spans two tag
    /// dictionaries, and the reader then turns the tags into strings and encodes them again
    /// (a third of an all-host read when batches came unaligned).
    fn read(
        &self,
        mask: ProjectionMask,
        rows: &[Range<usize>],
        mut each: impl FnMut(RecordBatch) -> Result<()>,
    ) -> Result<()> {
        let fail = |e: &dyn std::fmt::Display| Error::ReadSegment {
            path: self.path.to_path_buf(),
            reason: e.to_string(),
        };
        for (rg, span) in self.row_groups {
            let local: Vec<Range<usize>> = intersect_ranges(rows, std::slice::from_ref(span))
                .into_iter()
                .map(|r| r.start - span.start..r.end - span.start)
                .collect();
            if local.is_empty() {
                continue;
            }
            let reader = open_file(self.path, true, self.footer)?
                .with_row_groups(vec![*rg])
                .with_batch_size(batch_rows(&local))
                .with_row_selection(RowSelection::from_consecutive_ranges(
                    local.into_iter(),
                    span.len(),
                ))
                .with_projection(mask.clone())
                .build()
                .map_err(|e| fail(&e))?;
            for batch in reader {
                each(decimal::decode(batch.map_err(|e| fail(&e))?).map_err(|e| fail(&e))?)?;
            }
        }
        Ok(())
    }
}

/// A read returns the rows it kept as slices of the decoded batch (no copy) when they come in
/// runs this long on average, and filters (copies) them otherwise.
const MIN_SLICE_ROWS: usize = 1024;

/// Rows per batch a segment read decodes at most. The reader sizes (and zeroes) its buffers
/// by the batch size before it knows how many rows come, so a read asks for no more than it
/// will get.
const MAX_BATCH_ROWS: usize = 64 * 1024;

fn batch_rows(ranges: &[Range<usize>]) -> usize {
    ranges
        .iter()
        .map(|r| r.len())
        .sum::<usize>()
        .clamp(1, MAX_BATCH_ROWS)
}

/// `total` split into pieces of at most `size`.
fn chunks(total: usize, size: usize) -> impl Iterator<Item = usize> {
    (0..total.div_ceil(size)).map(move |i| size.min(total - i * size))
}

/// Which rows of a batch of `time` and `__series_id` are in the window.
fn window_mask(
    batch: &RecordBatch,
    start: i64,
    end: i64,
    series: Option<&Bitmap>,
) -> std::result::Result<BooleanArray, String> {
    let times = batch
        .column_by_name(TIME_COLUMN)
        .and_then(|c| c.as_primitive_opt::<arrow::datatypes::TimestampNanosecondType>())
        .ok_or("the time column is not a nanosecond timestamp")?;
    let sids = batch
        .column_by_name(SERIES_ID_COLUMN)
        .and_then(|c| c.as_primitive_opt::<UInt32Type>())
        .ok_or("the series id column is not u32")?;
    let (t, s) = (times.values(), sids.values());
    // Rows come sorted by series: ask the bitmap once per series, not once per row.
    let mut last: Option<(u32, bool)> = None;
    let mut wanted_series = |sid: u32| match (series, last) {
        (None, _) => true,
        (_, Some((l, ok))) if l == sid => ok,
        (Some(b), _) => {
            let ok = b.contains(sid);
            last = Some((sid, ok));
            ok
        }
    };
    Ok(BooleanArray::new(
        BooleanBuffer::collect_bool(batch.num_rows(), |i| {
            t[i] >= start && t[i] < end && wanted_series(s[i])
        }),
        None,
    ))
}

/// `keep`, less the rows of `batch` that `filter` rejects (unless their time is one it
/// must keep).
fn and_filter(
    batch: &RecordBatch,
    keep: BooleanArray,
    filter: &Filter<'_>,
) -> std::result::Result<BooleanArray, String> {
    let columns = filter.rows.indices(&batch.schema());
    let input = batch
        .project(&columns.ok_or("a filter column was not read")?)
        .map_err(|e| e.to_string())?;
    let pass = (filter.rows.keep)(&input)?;
    if pass.len() != batch.num_rows() {
        return Err(format!(
            "a row filter answered {} rows for {}",
            pass.len(),
            batch.num_rows()
        ));
    }
    let times = batch
        .column_by_name(TIME_COLUMN)
        .and_then(|c| c.as_primitive_opt::<arrow::datatypes::TimestampNanosecondType>())
        .ok_or("the time column is not a nanosecond timestamp")?
        .values();
    Ok(BooleanArray::new(
        BooleanBuffer::collect_bool(batch.num_rows(), |i| {
            keep.value(i) && ((pass.is_valid(i) && pass.value(i)) || (filter.keep_at)(times[i]))
        }),
        None,
    ))
}

/// The rows `runs` (sorted, disjoint ranges of positions among the rows of `selected`,
/// counted in order) as ranges of the rows `selected` counts from.
fn within(
    selected: &[Range<usize>],
    runs: impl IntoIterator<Item = Range<usize>>,
) -> Vec<Range<usize>> {
    let mut out: Vec<Range<usize>> = Vec::new();
    let mut ranges = selected.iter();
    let (mut current, mut base) = (ranges.next(), 0);
    for run in runs {
        let mut a = run.start;
        while a < run.end {
            let Some(r) = current else { return out };
            if a >= base + r.len() {
                base += r.len();
                current = ranges.next();
                continue;
            }
            let b = run.end.min(base + r.len());
            let rows = r.start + (a - base)..r.start + (b - base);
            match out.last_mut() {
                Some(last) if last.end == rows.start => last.end = rows.end,
                _ => out.push(rows),
            }
            a = b;
        }
    }
    out
}

/// The intersection of two sorted lists of disjoint ranges.
fn intersect_ranges(a: &[Range<usize>], b: &[Range<usize>]) -> Vec<Range<usize>> {
    let (mut i, mut j, mut out) = (0, 0, Vec::new());
    while i < a.len() && j < b.len() {
        let (lo, hi) = (a[i].start.max(b[j].start), a[i].end.min(b[j].end));
        if lo < hi {
            out.push(lo..hi);
        }
        if a[i].end < b[j].end {
            i += 1;
        } else {
            j += 1;
        }
    }
    out
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

    /// Positions among the rows a page index kept become ranges of file rows, split where
    /// the kept ranges are and merged where they touch.
    #[test]
    fn positions_among_selected_rows_map_to_file_rows() {
        let selected = [10..20, 30..35, 40..50];
        assert_eq!(
            within(&selected, [0..3, 8..12, 14..16, 20..25]),
            vec![10..13, 18..20, 30..32, 34..35, 40..41, 45..50]
        );
        assert_eq!(within(&[0..5, 5..10], std::iter::once(3..7)), vec![3..7]);
        assert_eq!(within(&selected, []), Vec::<Range<usize>>::new());
        assert_eq!(within(&selected, std::iter::once(0..25)), selected.to_vec());
    }

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
