//! The latest row of every series ("last point per host") without scanning history.
//!
//! Each flush already sorts its rows by (series, time), so it hands the last row of every
//! series it wrote to [`merge`], and the merged batch (one row per series, `__series_id`
//! first) is committed to the index with the flush's segments, in the same RocksDB batch.
//! [`Store::last_rows`](crate::Store::last_rows) merges that with the last rows of the
//! buffer, which are computed when asked (the buffer is small). A store written before this
//! existed rebuilds a measurement's entry from its segments the first time it is asked.
//!
//! Rows older than the measurement's retention are left out of answers; a series that no
//! longer has data keeps its entry until then.

use std::collections::HashMap;

use arrow::array::{Array, AsArray, RecordBatch, UInt32Array};
use arrow::compute::{concat_batches, take_record_batch};
use arrow::datatypes::{SchemaRef, TimestampNanosecondType, UInt32Type};
use arrow_ipc::reader::StreamReader;
use arrow_ipc::writer::StreamWriter;

use crate::catalog::{SERIES_ID_COLUMN, TIME_COLUMN};
use crate::flush::{conform, union_schema};
use crate::{Error, Result};

fn arrow_err(source: arrow::error::ArrowError) -> Error {
    Error::Arrow {
        measurement: String::new(),
        source,
    }
}

/// One row per series of `batch` (which has `__series_id` and `time`): the one with the
/// greatest time, the later row on equal times. Rows come out sorted by series id.
pub(crate) fn last_per_series(batch: &RecordBatch) -> Result<RecordBatch> {
    let invalid = |what: &str| Error::InvalidScan(format!("last rows: {what}"));
    let sids = batch
        .column_by_name(SERIES_ID_COLUMN)
        .and_then(|c| c.as_primitive_opt::<UInt32Type>())
        .ok_or_else(|| invalid("no series id column"))?;
    let times = batch
        .column_by_name(TIME_COLUMN)
        .and_then(|c| c.as_primitive_opt::<TimestampNanosecondType>())
        .ok_or_else(|| invalid("no time column"))?;
    let mut best: HashMap<u32, usize> = HashMap::new();
    for row in 0..batch.num_rows() {
        if times.is_null(row) {
            continue;
        }
        best.entry(sids.value(row))
            .and_modify(|b| {
                if times.value(row) >= times.value(*b) {
                    *b = row;
                }
            })
            .or_insert(row);
    }
    let mut rows: Vec<(u32, usize)> = best.into_iter().collect();
    rows.sort_unstable();
    let indices = UInt32Array::from(rows.iter().map(|&(_, r)| r as u32).collect::<Vec<_>>());
    take_record_batch(batch, &indices).map_err(arrow_err)
}

/// The last rows of `old` and `new` together; `new` wins equal times.
pub(crate) fn merge(old: Option<&RecordBatch>, new: &RecordBatch) -> Result<RecordBatch> {
    let Some(old) = old else {
        return last_per_series(new);
    };
    let schema: SchemaRef = union_schema([&old.schema(), &new.schema()]);
    let both = concat_batches(&schema, &[conform(old, &schema)?, conform(new, &schema)?])
        .map_err(arrow_err)?;
    last_per_series(&both)
}

/// Arrow IPC bytes of a batch, for the index.
pub(crate) fn encode(batch: &RecordBatch) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    let mut w = StreamWriter::try_new(&mut out, &batch.schema()).map_err(arrow_err)?;
    w.write(batch).map_err(arrow_err)?;
    w.finish().map_err(arrow_err)?;
    drop(w);
    Ok(out)
}

/// The batch [`encode`] wrote.
pub(crate) fn decode(bytes: &[u8]) -> Result<RecordBatch> {
    let reader = StreamReader::try_new(bytes, None).map_err(arrow_err)?;
    let schema = reader.schema();
    let batches = reader
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(arrow_err)?;
    concat_batches(&schema, &batches).map_err(arrow_err)
}

impl crate::store::Inner {
    /// See [`crate::Store::last_rows`].
    pub(crate) fn last_rows(&self, measurement: &str, now: i64) -> Result<Option<RecordBatch>> {
        let Some(table) = self.catalog.get(measurement) else {
            return Ok(None);
        };
        let pnanos = self.config.partition_nanos();
        // Flushed rows and frozen snapshots under one lock, so a flush finishing meanwhile
        // is seen on one side or the other; then the live buffer.
        let (flushed, mut snaps, segments) = {
            let state = self.state.read();
            let snaps: Vec<_> = state
                .frozen
                .iter()
                .flat_map(|f| f.partitions.iter())
                .filter(|p| p.measurement == measurement)
                .cloned()
                .collect();
            let segments: Vec<_> = match state.last.get(measurement) {
                Some(_) => Vec::new(),
                None => state
                    .segments
                    .values()
                    .filter(|s| s.meta.measurement == measurement)
                    .cloned()
                    .collect(),
            };
            (state.last.get(measurement).cloned(), snaps, segments)
        };
        snaps.extend(self.buffer.lock().snapshot(
            measurement,
            i64::MIN,
            i64::MAX,
            pnanos,
            &|_| true,
        )?);
        let mut acc = flushed;
        if acc.is_none() && !segments.is_empty() {
            // Written before last rows were kept: rebuild from the segments, once.
            let mut columns: Vec<String> = vec![SERIES_ID_COLUMN.to_string()];
            columns.extend(
                table
                    .arrow_schema()
                    .fields()
                    .iter()
                    .map(|f| f.name().clone()),
            );
            for seg in &segments {
                let (batches, _) =
                    seg.read(i64::MIN, i64::MAX, None, Some(&columns), None, None)?;
                for b in batches {
                    acc = Some(merge(acc.as_ref(), &last_per_series(&b)?)?);
                }
            }
            if let Some(rows) = &acc {
                self.state
                    .write()
                    .last
                    .entry(measurement.to_string())
                    .or_insert_with(|| rows.clone());
            }
        }
        {
            let registry = self.series.lock();
            // One id per series across every snapshot, so a series first seen since the last
            // flush and present in both a frozen and the live buffer stays one row.
            let mut ids = crate::scan::BufferIds::new(&registry);
            for snap in &snaps {
                let (b, _) = ids.with_ids(snap)?;
                acc = Some(merge(acc.as_ref(), &last_per_series(&b)?)?);
            }
        }
        let Some(rows) = acc else {
            return Ok(Some(RecordBatch::new_empty(table.arrow_schema())));
        };
        let rows = conform(&rows, &table.arrow_schema())?;
        // Rows past retention are gone from every other answer; leave them out here too.
        match crate::retention::retention_cutoff(Some(table.as_ref()), &self.config, now) {
            Some((cutoff, _)) => {
                let times = rows
                    .column_by_name(TIME_COLUMN)
                    .and_then(|c| c.as_primitive_opt::<TimestampNanosecondType>())
                    .ok_or_else(|| Error::InvalidScan("last rows without time".into()))?;
                let keep: arrow::array::BooleanArray = times
                    .iter()
                    .map(|t| Some(t.is_some_and(|t| t >= cutoff)))
                    .collect();
                Ok(Some(
                    arrow::compute::filter_record_batch(&rows, &keep).map_err(arrow_err)?,
                ))
            }
            None => Ok(Some(rows)),
        }
    }
}
