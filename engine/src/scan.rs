//! The scan API the query layer reads through.
//!
//! A [`ScanRequest`] names a measurement, a half-open time range, an optional
//! [`TagPredicate`] and an optional projection. The result is a [`ScanStream`] of Arrow
//! batches in the table's schema (projected): first the in-memory rows (active and frozen
//! buffers), then each segment that survives pruning, one at a time. Segments are pruned by
//! their manifest time range and by intersecting their series bitmap with the predicate's
//! bitmap from the posting lists; inside a file, row groups are pruned by statistics.
//!
//! A segment that cannot be read yields one `Err` naming its file, and the stream goes on
//! with the rest: the caller decides whether a partial answer is acceptable.

use std::collections::VecDeque;
use std::sync::Arc;

use arrow::array::{BooleanArray, RecordBatch};
use arrow::compute::filter_record_batch;
use arrow::datatypes::SchemaRef;
use croaring::Bitmap;
use regex::Regex;

use crate::buffer::{PartitionSnapshot, SeriesEntry};
use crate::flush::conform;
use crate::index::Index;
use crate::metrics::Metrics;
use crate::segment::{ReadStats, SegmentRef, time_values};
use crate::store::Inner;
use crate::{Error, Result};

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
    /// Column names, in output order; `None` is every column.
    pub projection: Option<Vec<String>>,
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
        }
    }
}

/// Batches of a scan. See the module docs for the order and the error contract.
#[derive(Debug)]
pub struct ScanStream {
    schema: SchemaRef,
    ready: VecDeque<RecordBatch>,
    segments: VecDeque<SegmentRef>,
    series: Option<Bitmap>,
    start: i64,
    end: i64,
    columns: Vec<String>,
    metrics: Arc<Metrics>,
    /// Segments of the measurement in the manifest.
    pub segments_total: usize,
    /// Segments skipped by manifest pruning (time range or series bitmap).
    pub segments_pruned: usize,
    /// Row groups and rows skipped and read so far, over the segments opened.
    pub read: ReadStats,
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
}

impl Iterator for ScanStream {
    type Item = Result<RecordBatch>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            if let Some(b) = self.ready.pop_front() {
                return Some(Ok(b));
            }
            let seg = self.segments.pop_front()?;
            match seg.read(
                self.start,
                self.end,
                self.series.as_ref(),
                Some(&self.columns),
            ) {
                Ok((batches, stats)) => {
                    self.read += stats;
                    for b in batches {
                        match conform(&b, &self.schema) {
                            Ok(b) => self.ready.push_back(b),
                            Err(e) => return Some(Err(e)),
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

/// Rows of a buffer snapshot that pass the time range and predicate.
fn filter_snapshot(
    snap: &PartitionSnapshot,
    start: i64,
    end: i64,
    predicate: Option<&TagPredicate>,
) -> Result<Option<RecordBatch>> {
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
    if keep.true_count() == 0 {
        return Ok(None);
    }
    let batch = if keep.true_count() == snap.batch.num_rows() {
        snap.batch.clone()
    } else {
        filter_record_batch(&snap.batch, &keep).map_err(|source| Error::Arrow {
            measurement: snap.measurement.clone(),
            source,
        })?
    };
    Ok(Some(batch))
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
        let full = table.arrow_schema();
        let schema = match &req.projection {
            None => full,
            Some(cols) => {
                let idx = cols
                    .iter()
                    .map(|c| {
                        full.index_of(c).map_err(|_| {
                            Error::InvalidScan(format!("no column {c:?} in {:?}", req.measurement))
                        })
                    })
                    .collect::<Result<Vec<_>>>()?;
                Arc::new(full.project(&idx).map_err(|source| Error::Arrow {
                    measurement: req.measurement.clone(),
                    source,
                })?)
            }
        };
        let columns: Vec<String> = schema.fields().iter().map(|f| f.name().clone()).collect();

        // Buffer first: take the snapshots under the locks, filter outside them.
        let pnanos = self.config.partition_nanos();
        let (mut snaps, segments) = {
            let state = self.state.read();
            let mut snaps: Vec<PartitionSnapshot> = state
                .frozen
                .iter()
                .flat_map(|f| f.partitions.iter())
                .filter(|p| {
                    p.measurement == req.measurement
                        && p.max_time >= req.start
                        && p.min_time < req.end
                })
                .cloned()
                .collect();
            snaps.extend(self.buffer.lock().snapshot(
                &req.measurement,
                req.start,
                req.end,
                pnanos,
            )?);
            let segments: Vec<SegmentRef> = state
                .segments
                .values()
                .filter(|s| s.meta.measurement == req.measurement)
                .cloned()
                .collect();
            (snaps, segments)
        };
        let mut ready = VecDeque::new();
        for snap in snaps.drain(..) {
            if let Some(b) = filter_snapshot(&snap, req.start, req.end, req.predicate.as_ref())? {
                ready.push_back(conform(&b, &schema)?);
            }
        }

        let series = match &req.predicate {
            None => None,
            Some(p) => {
                let universe = self.index.measurement_series(&req.measurement)?;
                Some(p.evaluate(&self.index, &req.measurement, &universe)?)
            }
        };
        let total = segments.len();
        let segments: VecDeque<SegmentRef> = segments
            .into_iter()
            .filter(|s| s.meta.max_time >= req.start && s.meta.min_time < req.end)
            .filter(|s| series.as_ref().is_none_or(|b| s.meta.series.intersect(b)))
            .collect();
        Ok(ScanStream {
            schema,
            ready,
            segments_total: total,
            segments_pruned: total - segments.len(),
            read: ReadStats::default(),
            segments,
            series,
            start: req.start,
            end: req.end,
            columns,
            metrics: Arc::clone(&self.metrics),
        })
    }
}
