//! The scan API the query layer reads through.
//!
//! A [`ScanRequest`] names a measurement, a half-open time range, an optional
//! [`TagPredicate`] and an optional projection. The result is a [`ScanStream`] of Arrow
//! batches in the table's schema (projected): first the in-memory rows (active and frozen
//! buffers), then each segment that survives pruning, one at a time. Segments are pruned by
//! their manifest time range and by intersecting their series bitmap with the predicate's
//! bitmap from the posting lists; inside a file, row groups are pruned by statistics.
//!
//! A point written more than once is returned once, its fields merged (see [`ScanStream`]).
//!
//! A segment that cannot be read yields one `Err` naming its file, and the stream goes on
//! with the rest: the caller decides whether a partial answer is acceptable.

use std::collections::VecDeque;
use std::sync::Arc;

use arrow::array::{ArrayRef, AsArray, BooleanArray, RecordBatch, UInt32Array};
use arrow::compute::filter_record_batch;
use arrow::datatypes::{DataType, Field, Schema, SchemaRef, UInt32Type};
use croaring::Bitmap;
use regex::Regex;

use crate::buffer::{PartitionSnapshot, SeriesEntry};
use crate::catalog::{SERIES_ID_COLUMN, TIME_COLUMN};
use crate::flush::{SortPlan, conform};
use crate::index::Index;
use crate::metrics::Metrics;
use crate::segment::{Filter, ReadStats, RowFilter, SegmentRef, time_values};
use crate::store::{Inner, SeriesRegistry};
use crate::{Error, Result, SeriesId};

/// A condition on a series' tags.
///
/// `Eq`, `In` and `Regex` match series whose tag has a matching value; `NotEq` and
/// `NotRegex` match series that *have* the tag with a non-matching value (SQL semantics: a
/// missing tag is NULL and matches neither); `Not` is the complement within the measurement.
#[derive(Debug, Clone)]
pub enum TagPredicate {
    Eq(String, String),
    NotEq(String, String),
    In(String, Vec<String>),
    /// Unanchored, as in InfluxQL's `=~`; anchor the pattern to match whole values.
    Regex(String, Regex),
    NotRegex(String, Regex),
    /// The series has the tag (any value).
    Exists(String),
    And(Vec<TagPredicate>),
    Or(Vec<TagPredicate>),
    Not(Box<TagPredicate>),
}

impl TagPredicate {
    /// Whether a series matches.
    pub fn matches(&self, series: &SeriesEntry) -> bool {
        match self {
            TagPredicate::Eq(k, v) => series.tag(k) == Some(v.as_str()),
            TagPredicate::NotEq(k, v) => series.tag(k).is_some_and(|x| x != v),
            TagPredicate::In(k, vs) => series.tag(k).is_some_and(|x| vs.iter().any(|v| v == x)),
            TagPredicate::Regex(k, r) => series.tag(k).is_some_and(|x| r.is_match(x)),
            TagPredicate::NotRegex(k, r) => series.tag(k).is_some_and(|x| !r.is_match(x)),
            TagPredicate::Exists(k) => series.tag(k).is_some(),
            TagPredicate::And(ps) => ps.iter().all(|p| p.matches(series)),
            TagPredicate::Or(ps) => ps.iter().any(|p| p.matches(series)),
            TagPredicate::Not(p) => !p.matches(series),
        }
    }

    /// The matching series of `measurement`, from the posting lists. `universe` is every
    /// series of the measurement.
    pub fn evaluate(&self, index: &Index, measurement: &str, universe: &Bitmap) -> Result<Bitmap> {
        let values_where = |k: &str, keep: &dyn Fn(&str) -> bool| -> Result<Bitmap> {
            let mut acc = Bitmap::new();
            for (v, b) in index.tag_values(measurement, k)? {
                if keep(&v) {
                    acc.or_inplace(&b);
                }
            }
            Ok(acc)
        };
        Ok(match self {
            TagPredicate::Eq(k, v) => index.posting(measurement, k, v)?,
            TagPredicate::NotEq(k, v) => values_where(k, &|x| x != v)?,
            TagPredicate::In(k, vs) => {
                let mut acc = Bitmap::new();
                for v in vs {
                    acc.or_inplace(&index.posting(measurement, k, v)?);
                }
                acc
            }
            TagPredicate::Regex(k, r) => values_where(k, &|x| r.is_match(x))?,
            TagPredicate::NotRegex(k, r) => values_where(k, &|x| !r.is_match(x))?,
            TagPredicate::Exists(k) => values_where(k, &|_| true)?,
            TagPredicate::And(ps) => {
                let mut acc = universe.clone();
                for p in ps {
                    if acc.is_empty() {
                        break;
                    }
                    acc.and_inplace(&p.evaluate(index, measurement, universe)?);
                }
                acc
            }
            TagPredicate::Or(ps) => {
                let mut acc = Bitmap::new();
                for p in ps {
                    acc.or_inplace(&p.evaluate(index, measurement, universe)?);
                }
                acc
            }
            TagPredicate::Not(p) => {
                let mut acc = universe.clone();
                acc.andnot_inplace(&p.evaluate(index, measurement, universe)?);
                acc
            }
        })
    }
}

/// What to read.
#[derive(Debug, Clone)]
pub struct ScanRequest {
    pub measurement: String,
    /// Inclusive start (ns).
    pub start: i64,
    /// Exclusive end (ns).
    pub end: i64,
    pub predicate: Option<TagPredicate>,
    /// Column names, in output order; `None` is every column. `__series_id` may be named too:
    /// each row's series (the same id for the same series in every source of one scan).
    pub projection: Option<Vec<String>>,
    /// Rows the caller drops anyway, which segment reads may drop before they decode the
    /// other columns. Rows that may have a duplicate in another source are kept (the filter
    /// must see them merged), so the caller still applies its filter to what comes back.
    pub filter: Option<RowFilter>,
}

impl ScanRequest {
    /// Every row of a measurement.
    pub fn all(measurement: impl Into<String>) -> Self {
        Self {
            measurement: measurement.into(),
            start: i64::MIN,
            end: i64::MAX,
            predicate: None,
            projection: None,
            filter: None,
        }
    }
}

/// Inclusive time intervals in which two sources (or one buffer partition that received
/// points out of order) may hold the same (series, time). Sorted and disjoint.
#[derive(Debug, Default)]
struct Overlaps(Vec<(i64, i64)>);

impl Overlaps {
    fn new(mut v: Vec<(i64, i64)>) -> Self {
        v.sort_unstable();
        let mut out: Vec<(i64, i64)> = Vec::with_capacity(v.len());
        for (lo, hi) in v {
            match out.last_mut() {
                Some(last) if lo <= last.1.saturating_add(1) => last.1 = last.1.max(hi),
                _ => out.push((lo, hi)),
            }
        }
        Self(out)
    }

    fn contains(&self, t: i64) -> bool {
        let i = self.0.partition_point(|&(lo, _)| lo <= t);
        i > 0 && t <= self.0[i - 1].1
    }
}

/// A source's extent, for finding overlaps.
struct Extent<'a> {
    min: i64,
    max: i64,
    series: &'a Bitmap,
    unordered: bool,
}

fn overlaps(extents: &[Extent<'_>], start: i64, end: i64) -> Overlaps {
    let mut v = Vec::new();
    let clamp = |lo: i64, hi: i64| (lo.max(start), hi.min(end.saturating_sub(1)));
    for (i, a) in extents.iter().enumerate() {
        if a.unordered {
            v.push(clamp(a.min, a.max));
        }
        for b in &extents[i + 1..] {
            let (lo, hi) = (a.min.max(b.min), a.max.min(b.max));
            if lo <= hi && a.series.intersect(b.series) {
                v.push(clamp(lo, hi));
            }
        }
    }
    v.retain(|(lo, hi)| lo <= hi);
    Overlaps::new(v)
}

/// A segment to read, whole or a share `(k, n)` of its row groups.
type Part = (SegmentRef, Option<(usize, usize)>);

/// Batches of a scan. See the module docs for the order and the error contract.
///
/// Duplicates. A point written twice (a client's retry, a backfill) is one row: where two
/// sources can hold the same series at the same time, their rows in that time range are held
/// back, merged field by field (the newer source wins: later segments, then the frozen
/// buffers, then the live buffer), and returned after everything else. Elsewhere rows stream
/// straight through, so in-order ingestion costs nothing.
#[derive(Debug)]
pub struct ScanStream {
    schema: SchemaRef,
    /// `__series_id`, `time`, then the columns of `schema` not already there.
    wide: SchemaRef,
    /// Where each column of `schema` is in `wide`.
    out: Vec<usize>,
    ready: VecDeque<RecordBatch>,
    /// Segments to read, each whole or a share of its row groups (see `Segment::read`).
    segments: VecDeque<Part>,
    series: Option<Bitmap>,
    start: i64,
    end: i64,
    /// The columns read from segments: `wide`'s.
    columns: Vec<String>,
    metrics: Arc<Metrics>,
    overlaps: Overlaps,
    /// See [`ScanRequest::filter`].
    filter: Option<RowFilter>,
    /// Rows held back for merging, with the age of their source (newer is larger).
    pending: Vec<(u64, RecordBatch)>,
    /// Segments of the measurement in the manifest.
    pub segments_total: usize,
    /// Segments skipped by manifest pruning (time range or series bitmap).
    pub segments_pruned: usize,
    /// Row groups and rows skipped and read so far, over the segments opened.
    pub read: ReadStats,
    /// Rows merged away as duplicates.
    pub duplicates_merged: usize,
}

impl ScanStream {
    /// The schema of every batch.
    pub fn schema(&self) -> SchemaRef {
        Arc::clone(&self.schema)
    }

    /// Segments that will be opened.
    pub fn segments_to_read(&self) -> usize {
        self.segments.len()
    }

    /// Splits the scan into up to `n` streams that can be read in parallel: the segments
    /// are dealt out in turn (or, when there are fewer segments than streams, each segment's
    /// row groups are), the buffered rows go to the first. A scan that has rows to merge (see
    /// the type's docs) stays whole, since merging needs them in one place. Counts of
    /// segments are reported by the first stream only.
    pub fn split(mut self, n: usize) -> Vec<ScanStream> {
        if n <= 1 || !self.overlaps.0.is_empty() || self.segments.is_empty() {
            return vec![self];
        }
        let mut parts: Vec<VecDeque<Part>> = vec![VecDeque::new(); n];
        if self.segments.len() >= n {
            for (i, seg) in self.segments.drain(..).enumerate() {
                parts[i % n].push_back(seg);
            }
        } else {
            for (seg, _) in self.segments.drain(..) {
                for (k, part) in parts.iter_mut().enumerate() {
                    part.push_back((Arc::clone(&seg), Some((k, n))));
                }
            }
        }
        let mut out = Vec::with_capacity(n);
        for (i, segments) in parts.into_iter().enumerate() {
            out.push(ScanStream {
                schema: Arc::clone(&self.schema),
                wide: Arc::clone(&self.wide),
                out: self.out.clone(),
                ready: if i == 0 {
                    std::mem::take(&mut self.ready)
                } else {
                    VecDeque::new()
                },
                segments,
                series: self.series.clone(),
                start: self.start,
                end: self.end,
                columns: self.columns.clone(),
                metrics: Arc::clone(&self.metrics),
                overlaps: Overlaps::default(),
                filter: self.filter.clone(),
                pending: Vec::new(),
                segments_total: if i == 0 { self.segments_total } else { 0 },
                segments_pruned: if i == 0 { self.segments_pruned } else { 0 },
                read: ReadStats::default(),
                duplicates_merged: 0,
            });
        }
        out
    }

    fn arrow_err(source: arrow::error::ArrowError) -> Error {
        Error::Arrow {
            measurement: String::new(),
            source,
        }
    }

    /// The output columns of a wide batch.
    fn narrow(&self, wide: &RecordBatch) -> Result<RecordBatch> {
        let b = wide.project(&self.out).map_err(Self::arrow_err)?;
        conform(&b, &self.schema)
    }

    /// Takes a source's rows (with `__series_id` and `time`): rows where another source may
    /// hold the same point are held back; the rest are ready.
    fn accept(&mut self, batch: &RecordBatch, age: u64) -> Result<()> {
        let wide = conform(batch, &self.wide)?;
        if wide.num_rows() == 0 {
            return Ok(());
        }
        if self.overlaps.0.is_empty() {
            let b = self.narrow(&wide)?;
            self.ready.push_back(b);
            return Ok(());
        }
        let times =
            time_values(&wide).ok_or_else(|| Error::InvalidScan("rows without time".into()))?;
        let held: BooleanArray = times
            .iter()
            .map(|&t| Some(self.overlaps.contains(t)))
            .collect();
        let n = held.true_count();
        if n == 0 {
            let b = self.narrow(&wide)?;
            self.ready.push_back(b);
        } else if n == wide.num_rows() {
            self.pending.push((age, wide));
        } else {
            let pass = arrow::compute::not(&held).map_err(Self::arrow_err)?;
            let b = filter_record_batch(&wide, &pass).map_err(Self::arrow_err)?;
            let b = self.narrow(&b)?;
            self.ready.push_back(b);
            let kept = filter_record_batch(&wide, &held).map_err(Self::arrow_err)?;
            self.pending.push((age, kept));
        }
        Ok(())
    }

    /// Merges the held-back rows into one batch per point.
    fn merge_pending(&mut self) -> Result<()> {
        let mut pending = std::mem::take(&mut self.pending);
        if pending.is_empty() {
            return Ok(());
        }
        // Oldest first: the merge lets the last value of each field win.
        pending.sort_by_key(|(age, _)| *age);
        let batches: Vec<RecordBatch> = pending.into_iter().map(|(_, b)| b).collect();
        let all = arrow::compute::concat_batches(&self.wide, &batches).map_err(Self::arrow_err)?;
        let sids: Vec<SeriesId> = all
            .column(0)
            .as_primitive_opt::<UInt32Type>()
            .ok_or_else(|| Error::InvalidScan("series id column".into()))?
            .values()
            .to_vec();
        let times =
            time_values(&all).ok_or_else(|| Error::InvalidScan("rows without time".into()))?;
        let plan = SortPlan::new(&all, &sids, times);
        self.duplicates_merged += all.num_rows() - plan.len();
        let chunk = 64 * 1024;
        let mut from = 0;
        while from < plan.len() {
            let to = (from + chunk).min(plan.len());
            // `take` puts another `__series_id` in front.
            let merged = plan.take(&all, from..to)?;
            let cols: Vec<usize> = self.out.iter().map(|&i| i + 1).collect();
            let b = merged.project(&cols).map_err(Self::arrow_err)?;
            self.ready.push_back(conform(&b, &self.schema)?);
            from = to;
        }
        Ok(())
    }
}

impl Iterator for ScanStream {
    type Item = Result<RecordBatch>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            if let Some(b) = self.ready.pop_front() {
                return Some(Ok(b));
            }
            let Some((seg, share)) = self.segments.pop_front() else {
                if self.pending.is_empty() {
                    return None;
                }
                if let Err(e) = self.merge_pending() {
                    return Some(Err(e));
                }
                continue;
            };
            let overlaps = &self.overlaps;
            let keep_at = |t: i64| overlaps.contains(t);
            let filter = self.filter.as_ref().map(|rows| Filter {
                rows,
                keep_at: &keep_at,
            });
            match seg.read(
                self.start,
                self.end,
                self.series.as_ref(),
                Some(&self.columns),
                share,
                filter,
            ) {
                Ok((batches, stats)) => {
                    self.read += stats;
                    for b in batches {
                        if let Err(e) = self.accept(&b, seg.meta.id) {
                            return Some(Err(e));
                        }
                    }
                }
                Err(e) => {
                    Metrics::add(&self.metrics.segment_read_errors_total, 1);
                    tracing::error!(error = %e, "segment read failed");
                    return Some(Err(e));
                }
            }
        }
    }
}

/// Which rows of a buffer snapshot pass the time range and predicate; `None` if none do.
fn snapshot_rows(
    snap: &PartitionSnapshot,
    start: i64,
    end: i64,
    predicate: Option<&TagPredicate>,
) -> Result<Option<BooleanArray>> {
    let series_ok: Option<Vec<bool>> =
        predicate.map(|p| snap.series.iter().map(|s| p.matches(s)).collect());
    if series_ok.as_ref().is_some_and(|ok| !ok.contains(&true)) {
        return Ok(None);
    }
    let times =
        time_values(&snap.batch).ok_or_else(|| Error::InvalidScan("buffer without time".into()))?;
    let keep: BooleanArray = times
        .iter()
        .zip(&snap.row_series)
        .map(|(&t, &s)| {
            Some(t >= start && t < end && series_ok.as_ref().is_none_or(|ok| ok[s as usize]))
        })
        .collect();
    Ok((keep.true_count() > 0).then_some(keep))
}

/// Series ids for buffered rows: the registered id, or one past every registered id for a
/// series first seen since the last flush, the same one in every snapshot of one read.
pub(crate) struct BufferIds<'a> {
    registry: &'a SeriesRegistry,
    fresh: std::collections::HashMap<Box<str>, SeriesId>,
    next: SeriesId,
}

impl<'a> BufferIds<'a> {
    pub(crate) fn new(registry: &'a SeriesRegistry) -> Self {
        Self {
            registry,
            fresh: Default::default(),
            next: registry.next,
        }
    }

    /// The snapshot's rows with `__series_id` in front, and the ids it holds.
    pub(crate) fn with_ids(&mut self, snap: &PartitionSnapshot) -> Result<(RecordBatch, Bitmap)> {
        let local: Vec<SeriesId> = snap
            .series
            .iter()
            .map(|s| match self.registry.by_key.get(&s.key) {
                Some(&id) => id,
                None => *self.fresh.entry(s.key.clone()).or_insert_with(|| {
                    self.next += 1;
                    self.next
                }),
            })
            .collect();
        let sids = UInt32Array::from(
            snap.row_series
                .iter()
                .map(|&l| local[l as usize])
                .collect::<Vec<_>>(),
        );
        let mut fields = vec![Arc::new(Field::new(
            SERIES_ID_COLUMN,
            DataType::UInt32,
            false,
        ))];
        fields.extend(snap.batch.schema().fields().iter().cloned());
        let mut cols: Vec<ArrayRef> = vec![Arc::new(sids)];
        cols.extend(snap.batch.columns().iter().cloned());
        let batch =
            RecordBatch::try_new(Arc::new(Schema::new(fields)), cols).map_err(|source| {
                Error::Arrow {
                    measurement: snap.measurement.clone(),
                    source,
                }
            })?;
        Ok((batch, local.into_iter().collect()))
    }
}

/// Age of a frozen buffer (`Some(i)`, oldest first) or of the live one (`None`), above every
/// segment id.
fn buffer_age(frozen: Option<usize>) -> u64 {
    match frozen {
        Some(i) => (1 << 62) + i as u64,
        None => 1 << 63,
    }
}

impl Inner {
    pub(crate) fn scan(&self, req: &ScanRequest) -> Result<ScanStream> {
        if req.start >= req.end {
            return Err(Error::InvalidScan(format!(
                "empty time range [{}, {})",
                req.start, req.end
            )));
        }
        let table = self
            .catalog
            .get(&req.measurement)
            .ok_or_else(|| Error::UnknownMeasurement(req.measurement.clone()))?;
        let arrow_err = |source| Error::Arrow {
            measurement: req.measurement.clone(),
            source,
        };
        let full = table.arrow_schema();
        let series_id = Arc::new(Field::new(SERIES_ID_COLUMN, DataType::UInt32, false));
        let schema = match &req.projection {
            None => full.clone(),
            Some(cols) => {
                let fields = cols
                    .iter()
                    .map(|c| {
                        if c == SERIES_ID_COLUMN {
                            return Ok(Arc::clone(&series_id));
                        }
                        full.field_with_name(c)
                            .map(|f| Arc::new(f.clone()))
                            .map_err(|_| {
                                Error::InvalidScan(format!(
                                    "no column {c:?} in {:?}",
                                    req.measurement
                                ))
                            })
                    })
                    .collect::<Result<Vec<_>>>()?;
                Arc::new(Schema::new_with_metadata(fields, full.metadata().clone()))
            }
        };
        // The wide schema: series id and time, which merging needs, then the projection.
        let mut wide_fields = vec![
            series_id,
            Arc::new(
                full.field_with_name(TIME_COLUMN)
                    .map_err(arrow_err)?
                    .clone(),
            ),
        ];
        let out: Vec<usize> = schema
            .fields()
            .iter()
            .map(
                |f| match wide_fields.iter().position(|w| w.name() == f.name()) {
                    Some(i) => i,
                    None => {
                        wide_fields.push(Arc::clone(f));
                        wide_fields.len() - 1
                    }
                },
            )
            .collect();
        let wide = Arc::new(Schema::new(wide_fields));
        let columns: Vec<String> = wide.fields().iter().map(|f| f.name().clone()).collect();

        // Buffers: take the snapshots under the locks, work on them outside.
        let pnanos = self.config.partition_nanos();
        let (snaps, segments) = {
            let state = self.state.read();
            let mut snaps: Vec<(u64, PartitionSnapshot)> = Vec::new();
            for (i, f) in state.frozen.iter().enumerate() {
                for p in &f.partitions {
                    if p.measurement == req.measurement
                        && p.max_time >= req.start
                        && p.min_time < req.end
                    {
                        snaps.push((buffer_age(Some(i)), p.clone()));
                    }
                }
            }
            let wanted = |field: &str| columns.iter().any(|c| c == field);
            let live = self.buffer.lock().snapshot(
                &req.measurement,
                req.start,
                req.end,
                pnanos,
                &wanted,
            )?;
            snaps.extend(live.into_iter().map(|p| (buffer_age(None), p)));
            let segments: Vec<SegmentRef> = state
                .segments
                .values()
                .filter(|s| s.meta.measurement == req.measurement)
                .cloned()
                .collect();
            (snaps, segments)
        };

        let series = match &req.predicate {
            None => None,
            Some(p) => {
                let universe = self.index.measurement_series(&req.measurement)?;
                Some(p.evaluate(&self.index, &req.measurement, &universe)?)
            }
        };
        let total = segments.len();
        let segments: Vec<SegmentRef> = segments
            .into_iter()
            .filter(|s| s.meta.max_time >= req.start && s.meta.min_time < req.end)
            .filter(|s| series.as_ref().is_none_or(|b| s.meta.series.intersect(b)))
            .collect();

        let mut snap_rows = Vec::new();
        {
            let registry = self.series.lock();
            let mut ids = BufferIds::new(&registry);
            for (age, snap) in &snaps {
                let Some(keep) = snapshot_rows(snap, req.start, req.end, req.predicate.as_ref())?
                else {
                    continue;
                };
                let (with_ids, ids) = ids.with_ids(snap)?;
                let rows = filter_record_batch(&with_ids, &keep).map_err(arrow_err)?;
                snap_rows.push((
                    *age,
                    rows,
                    ids,
                    snap.min_time,
                    snap.max_time,
                    snap.unordered,
                ));
            }
        }
        let mut extents: Vec<Extent<'_>> = segments
            .iter()
            .map(|s| Extent {
                min: s.meta.min_time,
                max: s.meta.max_time,
                series: &s.meta.series,
                unordered: false,
            })
            .collect();
        extents.extend(
            snap_rows
                .iter()
                .map(|(_, _, ids, min, max, unordered)| Extent {
                    min: *min,
                    max: *max,
                    series: ids,
                    unordered: *unordered,
                }),
        );
        let overlaps = overlaps(&extents, req.start, req.end);
        drop(extents);

        let mut stream = ScanStream {
            schema,
            wide,
            out,
            ready: VecDeque::new(),
            segments_total: total,
            segments_pruned: total - segments.len(),
            read: ReadStats::default(),
            segments: segments.into_iter().map(|s| (s, None)).collect(),
            series,
            start: req.start,
            end: req.end,
            columns,
            metrics: Arc::clone(&self.metrics),
            overlaps,
            filter: req.filter.clone(),
            pending: Vec::new(),
            duplicates_merged: 0,
        };
        for (age, rows, ..) in snap_rows {
            stream.accept(&rows, age)?;
        }
        Ok(stream)
    }
}
