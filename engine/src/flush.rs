//! Flush: frozen buffers become Parquet segments.
//!
//! 1. Under the write gate (no write is between its WAL append and its buffer insert), the
//!    WAL is rotated and the buffer drained into a [`Frozen`] set that remembers the id of the
//!    first WAL file it does *not* cover. Frozen sets stay visible to scans.
//! 2. Each partition is given global series ids, sorted by (series id, time), de-duplicated
//!    (a later write of the same series and time replaces earlier values field by field) and
//!    written as a segment file.
//! 3. One synced index batch records the new series and postings, the segments and the WAL
//!    checkpoint. Only then do the segments replace the frozen set in the read state, and the
//!    covered WAL files are deleted.
//!
//! A crash before step 3 leaves orphan files (deleted at the next open) and the WAL intact; a
//! crash after it leaves WAL files that replay skips. Either way nothing is lost or doubled.

use std::collections::HashMap;
use std::ops::Range;
use std::sync::Arc;

use arrow::array::{Array, ArrayRef, RecordBatch, RecordBatchOptions, UInt32Array, new_null_array};
use arrow::compute::take;
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};

use crate::buffer::PartitionSnapshot;
use crate::catalog::{SERIES_ID_COLUMN, TIME_COLUMN};
use crate::decimal::Scales;
use crate::metrics::Metrics;
use crate::segment::{Segment, SegmentMeta, SegmentWriter};
use crate::store::Inner;
use crate::{Error, Result, SeriesId};

/// Buffered data taken out of the write path, waiting to become segments.
#[derive(Debug)]
pub struct Frozen {
    /// First WAL file whose records are not in this set (nor in anything older).
    pub wal_next: u64,
    pub partitions: Vec<PartitionSnapshot>,
}

/// How to turn a batch into its sorted, de-duplicated form, as row indices, so the result can
/// be materialised a slice at a time (a flush writes one row group at a time instead of
/// copying the whole buffer).
///
/// Rows are ordered by (series id, time). Rows with the same series and time merge into one:
/// for each column, the value of the last row (in input order) that has one wins.
#[derive(Debug)]
pub struct SortPlan {
    /// Series id of each output row.
    sids: Vec<SeriesId>,
    /// Input row of each output row, the same for every column (no duplicates)...
    shared: Option<Vec<u32>>,
    /// ...or per column, when duplicates were merged field by field.
    per_column: Vec<Vec<u32>>,
}

impl SortPlan {
    /// Plans the sort of `batch`, whose rows have the given series ids and times.
    pub fn new(batch: &RecordBatch, sids: &[SeriesId], times: &[i64]) -> Self {
        let mut order: Vec<u32> = (0..batch.num_rows() as u32).collect();
        // Stable on input order within equal keys, which the merge below relies on.
        order.sort_by_key(|&i| (sids[i as usize], times[i as usize]));
        let same = |a: u32, b: u32| {
            sids[a as usize] == sids[b as usize] && times[a as usize] == times[b as usize]
        };
        if !order.windows(2).any(|w| same(w[0], w[1])) {
            return Self {
                sids: order.iter().map(|&i| sids[i as usize]).collect(),
                shared: Some(order),
                per_column: Vec::new(),
            };
        }
        // Runs of equal keys; each output row is one run.
        let mut run_ends = Vec::new();
        for i in 1..=order.len() {
            if i == order.len() || !same(order[i - 1], order[i]) {
                run_ends.push(i);
            }
        }
        let per_column = batch
            .columns()
            .iter()
            .map(|col| {
                let mut start = 0;
                run_ends
                    .iter()
                    .map(|&end| {
                        let run = &order[start..end];
                        start = end;
                        *run.iter()
                            .rev()
                            .find(|&&r| col.is_valid(r as usize))
                            .unwrap_or(&run[run.len() - 1])
                    })
                    .collect()
            })
            .collect();
        Self {
            sids: run_ends
                .iter()
                .map(|&e| sids[order[e - 1] as usize])
                .collect(),
            shared: None,
            per_column,
        }
    }

    /// Output rows.
    pub fn len(&self) -> usize {
        self.sids.len()
    }

    /// Whether there are no output rows.
    pub fn is_empty(&self) -> bool {
        self.sids.is_empty()
    }

    /// Output rows `range` of `batch` (the batch the plan was made for), with
    /// `__series_id` as the first column.
    pub fn take(&self, batch: &RecordBatch, range: Range<usize>) -> Result<RecordBatch> {
        self.take_rows(batch, &range.collect::<Vec<_>>())
    }

    /// The last output row of every series (its latest time), as [`SortPlan::take`] gives it.
    pub fn last_rows(&self, batch: &RecordBatch) -> Result<RecordBatch> {
        let rows: Vec<usize> = (0..self.sids.len())
            .filter(|&i| i + 1 == self.sids.len() || self.sids[i] != self.sids[i + 1])
            .collect();
        self.take_rows(batch, &rows)
    }

    /// Output rows `rows` of `batch`.
    fn take_rows(&self, batch: &RecordBatch, rows: &[usize]) -> Result<RecordBatch> {
        let arrow_err = |source| Error::Arrow {
            measurement: String::new(),
            source,
        };
        let pick =
            |all: &[u32]| UInt32Array::from(rows.iter().map(|&r| all[r]).collect::<Vec<_>>());
        let mut columns: Vec<ArrayRef> = Vec::with_capacity(batch.num_columns() + 1);
        columns.push(Arc::new(pick(&self.sids)));
        let shared = self.shared.as_deref().map(pick);
        for (i, col) in batch.columns().iter().enumerate() {
            let taken = match &shared {
                Some(idx) => take(col, idx, None),
                None => take(col, &pick(&self.per_column[i]), None),
            };
            columns.push(taken.map_err(arrow_err)?);
        }
        let mut fields = vec![Arc::new(Field::new(
            SERIES_ID_COLUMN,
            DataType::UInt32,
            false,
        ))];
        fields.extend(batch.schema().fields().iter().cloned());
        RecordBatch::try_new(Arc::new(Schema::new(fields)), columns).map_err(arrow_err)
    }
}

/// [`SortPlan`] applied to the whole batch at once.
pub fn sort_and_dedupe(
    batch: &RecordBatch,
    sids: &[SeriesId],
    times: &[i64],
) -> Result<RecordBatch> {
    let plan = SortPlan::new(batch, sids, times);
    plan.take(batch, 0..plan.len())
}

/// The union of several schemas: `__series_id` and `time` first (when present), then the other
/// columns by name. A column's type is taken from the first schema that has it.
pub fn union_schema<'a>(schemas: impl IntoIterator<Item = &'a SchemaRef>) -> SchemaRef {
    let mut by_name: std::collections::BTreeMap<String, Arc<Field>> = Default::default();
    for s in schemas {
        for f in s.fields() {
            by_name
                .entry(f.name().clone())
                .or_insert_with(|| Arc::clone(f));
        }
    }
    let mut fields = Vec::new();
    for first in [SERIES_ID_COLUMN, TIME_COLUMN] {
        if let Some(f) = by_name.remove(first) {
            fields.push(f);
        }
    }
    fields.extend(by_name.into_values());
    Arc::new(Schema::new(fields))
}

/// Rearranges `batch` to `schema`: columns by name, missing ones as nulls.
pub fn conform(batch: &RecordBatch, schema: &SchemaRef) -> Result<RecordBatch> {
    let cols: Vec<ArrayRef> = schema
        .fields()
        .iter()
        .map(|f| match batch.column_by_name(f.name()) {
            Some(c) if c.data_type() == f.data_type() => Ok(Arc::clone(c)),
            Some(c) => arrow::compute::cast(c, f.data_type()),
            None => Ok(new_null_array(f.data_type(), batch.num_rows())),
        })
        .collect::<std::result::Result<_, _>>()
        .map_err(|source| Error::Arrow {
            measurement: String::new(),
            source,
        })?;
    // The row count is explicit so that an empty projection (`count(*)`) still says how
    // many rows there are.
    let options = RecordBatchOptions::new().with_row_count(Some(batch.num_rows()));
    RecordBatch::try_new_with_options(Arc::clone(schema), cols, &options).map_err(|source| {
        Error::Arrow {
            measurement: String::new(),
            source,
        }
    })
}

impl Inner {
    /// Freezes the buffer (if it holds anything) and turns every frozen set into segments.
    pub(crate) fn flush(&self) -> Result<()> {
        let _maintenance = self.maintenance.lock();
        // Segments would be written only for their commit to be refused.
        self.disk.check()?;
        {
            let _gate = self.gate.write();
            let empty = self.buffer.lock().is_empty();
            if !empty {
                let wal_next = self.wal.rotate()?;
                let partitions = self.buffer.lock().drain()?;
                self.state.write().frozen.push(Arc::new(Frozen {
                    wal_next,
                    partitions,
                }));
                // The buffer is empty again: writers waiting for room can go on.
                self.notify_flushed();
            }
        }
        loop {
            let Some(frozen) = self.state.read().frozen.first().cloned() else {
                break;
            };
            self.flush_frozen(&frozen)?;
        }
        self.update_gauges();
        Ok(())
    }

    fn flush_frozen(&self, frozen: &Arc<Frozen>) -> Result<()> {
        let mut batch = self.index.batch();
        let mut registry = self.series.lock();
        let mut pending: HashMap<Box<str>, SeriesId> = HashMap::new();
        let mut metas = Vec::new();
        let mut paths = Vec::new();
        // The last rows of each measurement flushed, merged with what the index has.
        let mut last: HashMap<String, RecordBatch> = HashMap::new();
        for part in &frozen.partitions {
            if part.batch.num_rows() == 0 {
                continue;
            }
            let local_ids: Vec<SeriesId> = part
                .series
                .iter()
                .map(|s| {
                    if let Some(&id) = registry.by_key.get(&s.key).or_else(|| pending.get(&s.key)) {
                        return id;
                    }
                    let id = registry.next;
                    registry.next += 1;
                    self.index
                        .add_series(&mut batch, id, &s.key, &part.measurement, &s.tags);
                    pending.insert(s.key.clone(), id);
                    id
                })
                .collect();
            let sids: Vec<SeriesId> = part
                .row_series
                .iter()
                .map(|&l| local_ids[l as usize])
                .collect();
            let times = crate::segment::time_values(&part.batch)
                .ok_or_else(|| Error::InvalidScan("buffer without time".into()))?;
            // Sorted and written one row group at a time: the frozen buffer stays readable
            // until the commit, so a full sorted copy beside it would double the memory.
            let plan = SortPlan::new(&part.batch, &sids, times);
            let part_last = plan.last_rows(&part.batch)?;
            let known = match last.remove(&part.measurement) {
                Some(b) => Some(b),
                None => self.state.read().last.get(&part.measurement).cloned(),
            };
            last.insert(
                part.measurement.clone(),
                crate::last::merge(known.as_ref(), &part_last)?,
            );
            let id = self
                .next_segment
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let path = self.segment_dir.join(SegmentMeta::file_name(id));
            let chunk = self.config.flush.row_group_rows;
            let first = plan.take(&part.batch, 0..chunk.min(plan.len()))?;
            // The float columns' scales, fitted to all of the part's values at once.
            let scales = Scales::fit(&part.batch);
            let mut writer =
                SegmentWriter::create(&path, first.schema(), scales, &self.config.flush)?;
            let mut written = writer.write(&first);
            drop(first);
            let mut start = chunk;
            while written.is_ok() && start < plan.len() {
                let end = (start + chunk).min(plan.len());
                written = plan
                    .take(&part.batch, start..end)
                    .and_then(|b| writer.write(&b));
                start = end;
            }
            if let Err(e) = written {
                writer.abandon();
                return Err(e);
            }
            let rows = writer.rows();
            let bytes = writer.finish()?;
            paths.push(path);
            let mut series = croaring::Bitmap::of(&local_ids);
            series.run_optimize();
            let meta = SegmentMeta {
                id,
                measurement: part.measurement.clone(),
                partition: part.partition,
                min_time: part.min_time,
                max_time: part.max_time,
                rows,
                bytes,
                level: 0,
                series,
            };
            self.index.add_segment(&mut batch, &meta);
            Metrics::add(&self.metrics.segments_written_total, 1);
            Metrics::add(&self.metrics.segment_bytes_written_total, bytes);
            metas.push(meta);
        }
        self.index.set_next_series_id(&mut batch, registry.next);
        self.index.set_next_segment_id(
            &mut batch,
            self.next_segment.load(std::sync::atomic::Ordering::Relaxed),
        );
        self.index.set_wal_checkpoint(&mut batch, frozen.wal_next);
        for (measurement, rows) in &last {
            self.index
                .set_last_rows(&mut batch, measurement, &crate::last::encode(rows)?);
        }
        crate::pause_point("flush-before-commit");
        if let Err(e) = self.index.commit(batch) {
            for p in paths {
                let _ = std::fs::remove_file(p);
            }
            return Err(e);
        }
        registry.by_key.extend(pending);
        drop(registry);
        {
            let mut state = self.state.write();
            for meta in metas {
                let seg = Arc::new(Segment::new(meta, &self.segment_dir));
                state.segments.insert(seg.meta.id, seg);
            }
            state.frozen.retain(|f| !Arc::ptr_eq(f, frozen));
            state.last.extend(last);
        }
        crate::pause_point("flush-after-commit");
        crate::wal::remove_before(&self.wal_dir, frozen.wal_next)?;
        Metrics::add(&self.metrics.flushes_total, 1);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::{AsArray, Float64Array, Int64Array, TimestampNanosecondArray};
    use arrow::datatypes::{Float64Type, Int64Type, TimeUnit, UInt32Type};

    fn batch(times: Vec<i64>, a: Vec<Option<f64>>, b: Vec<Option<i64>>) -> RecordBatch {
        let schema = Arc::new(Schema::new(vec![
            Field::new(
                "time",
                DataType::Timestamp(TimeUnit::Nanosecond, None),
                false,
            ),
            Field::new("a", DataType::Float64, true),
            Field::new("b", DataType::Int64, true),
        ]));
        RecordBatch::try_new(
            schema,
            vec![
                Arc::new(TimestampNanosecondArray::from(times)),
                Arc::new(Float64Array::from(a)),
                Arc::new(Int64Array::from(b)),
            ],
        )
        .unwrap()
    }

    #[test]
    fn sorts_by_series_then_time() {
        let b = batch(
            vec![30, 10, 20, 5],
            vec![Some(3.0), Some(1.0), Some(2.0), Some(0.5)],
            vec![None; 4],
        );
        let sorted = sort_and_dedupe(&b, &[2, 2, 1, 2], &[30, 10, 20, 5]).unwrap();
        assert_eq!(
            sorted.column(0).as_primitive::<UInt32Type>().values(),
            &[1, 2, 2, 2]
        );
        assert_eq!(
            sorted.column(2).as_primitive::<Float64Type>().values(),
            &[2.0, 0.5, 1.0, 3.0]
        );
    }

    #[test]
    fn duplicates_merge_field_by_field_with_the_last_write_winning() {
        let b = batch(
            vec![10, 10, 10, 20],
            vec![Some(1.0), None, Some(3.0), Some(9.0)],
            vec![Some(100), Some(200), None, None],
        );
        let sorted = sort_and_dedupe(&b, &[1, 1, 1, 1], &[10, 10, 10, 20]).unwrap();
        assert_eq!(sorted.num_rows(), 2);
        assert_eq!(
            sorted.column(2).as_primitive::<Float64Type>().values(),
            &[3.0, 9.0]
        );
        let ints = sorted.column(3).as_primitive::<Int64Type>();
        assert_eq!((ints.value(0), ints.is_null(1)), (200, true));
    }

    #[test]
    fn conform_adds_missing_columns_as_nulls() {
        let b = batch(vec![1], vec![Some(1.0)], vec![Some(1)]);
        let extra = Arc::new(Schema::new(vec![Field::new("z", DataType::Utf8, true)]));
        let schema = union_schema([&b.schema(), &extra]);
        let names: Vec<_> = schema.fields().iter().map(|f| f.name().as_str()).collect();
        assert_eq!(names, ["time", "a", "b", "z"]);
        let c = conform(&b, &schema).unwrap();
        assert_eq!(c.num_columns(), 4);
        assert!(c.column(3).is_null(0));
    }
}
