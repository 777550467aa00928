//! Compaction: a partition's small segments are merged into one.
//!
//! A partition qualifies once it has `min_segments` segments smaller than
//! `target_segment_bytes`. The inputs are merged a range of series ids at a time, so memory is
//! bounded by the chunk size, not by the partition: for each range, the rows of every input
//! (older first) are read, sorted and de-duplicated exactly as a flush does, and appended to
//! the output file. One synced index batch then adds the new segment and removes the inputs;
//! input files are deleted once no scan holds them.

use std::collections::BTreeMap;
use std::sync::Arc;

use arrow::compute::concat_batches;
use croaring::Bitmap;

use crate::catalog::{SERIES_ID_COLUMN, TIME_COLUMN};
use crate::decimal::Scales;
use crate::flush::{conform, sort_and_dedupe, union_schema};
use crate::metrics::Metrics;
use crate::segment::{Segment, SegmentMeta, SegmentRef, SegmentWriter, file_schema, time_values};
use crate::store::Inner;
use crate::{Error, Result};

/// Rows merged in memory at a time.
const CHUNK_ROWS: u64 = 256 * 1024;
/// At most this many segments are merged in one compaction.
const MAX_INPUTS: usize = 32;

impl Inner {
    /// Compacts every partition with at least `min_segments` small segments; returns how many
    /// compactions ran.
    pub(crate) fn compact(&self, min_segments: usize) -> Result<usize> {
        // A merged segment takes as much room as its inputs until they are removed.
        self.disk.check()?;
        let _maintenance = self.maintenance.lock();
        let mut groups: BTreeMap<(String, i64), Vec<SegmentRef>> = BTreeMap::new();
        for seg in self.state.read().segments.values() {
            if seg.meta.bytes < self.config.compaction.target_segment_bytes {
                groups
                    .entry((seg.meta.measurement.clone(), seg.meta.partition))
                    .or_default()
                    .push(Arc::clone(seg));
            }
        }
        let mut ran = 0;
        for (_, mut inputs) in groups {
            if inputs.len() < min_segments.max(2) {
                continue;
            }
            inputs.sort_by_key(|s| s.meta.id);
            inputs.truncate(MAX_INPUTS);
            self.compact_group(&inputs)?;
            ran += 1;
        }
        if ran > 0 {
            self.update_gauges();
        }
        Ok(ran)
    }

    fn compact_group(&self, inputs: &[SegmentRef]) -> Result<()> {
        let schemas = inputs
            .iter()
            .map(|s| file_schema(&s.path))
            .collect::<Result<Vec<_>>>()?;
        let schema = union_schema(&schemas);
        let columns: Vec<String> = schema.fields().iter().map(|f| f.name().clone()).collect();
        let data_idx: Vec<usize> = (0..schema.fields().len())
            .filter(|&i| schema.field(i).name() != SERIES_ID_COLUMN)
            .collect();

        let mut series = Bitmap::new();
        for s in inputs {
            series.or_inplace(&s.meta.series);
        }
        let ids = series.to_vec();
        let total_rows: u64 = inputs.iter().map(|s| s.meta.rows).sum();
        let chunks = total_rows.div_ceil(CHUNK_ROWS).max(1) as usize;
        let per_chunk = ids.len().div_ceil(chunks).max(1);

        let id = self
            .next_segment
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let path = self.segment_dir.join(SegmentMeta::file_name(id));
        // Scaled float columns stay scaled (at the inputs' largest scale) when that keeps
        // every value exact; read from the footers, not the values.
        let stored = inputs
            .iter()
            .map(|s| s.stored_floats())
            .collect::<Result<Vec<_>>>()?;
        let scales = Scales::merge(&stored);
        let mut writer =
            SegmentWriter::create(&path, Arc::clone(&schema), scales, &self.config.flush)?;
        for range in ids.chunks(per_chunk) {
            let range = Bitmap::from_range(range[0]..=range[range.len() - 1]);
            if let Err(e) = merge_range(inputs, &schema, &columns, &data_idx, &range, &mut writer) {
                writer.abandon();
                return Err(e);
            }
        }
        let rows = writer.rows();
        let bytes = writer.finish()?;
        let mut series = series;
        series.run_optimize();
        let meta = SegmentMeta {
            id,
            measurement: inputs[0].meta.measurement.clone(),
            partition: inputs[0].meta.partition,
            min_time: inputs.iter().map(|s| s.meta.min_time).min().unwrap_or(0),
            max_time: inputs.iter().map(|s| s.meta.max_time).max().unwrap_or(0),
            rows,
            bytes,
            level: inputs.iter().map(|s| s.meta.level).max().unwrap_or(0) + 1,
            series,
        };
        let mut batch = self.index.batch();
        self.index.add_segment(&mut batch, &meta);
        for s in inputs {
            self.index.remove_segment(&mut batch, s.meta.id);
        }
        self.index.set_next_segment_id(
            &mut batch,
            self.next_segment.load(std::sync::atomic::Ordering::Relaxed),
        );
        crate::pause_point("compaction-before-commit");
        if let Err(e) = self.index.commit(batch) {
            let _ = std::fs::remove_file(&path);
            return Err(e);
        }
        {
            let mut state = self.state.write();
            for s in inputs {
                if let Some(old) = state.segments.remove(&s.meta.id) {
                    old.mark_obsolete();
                }
            }
            state
                .segments
                .insert(id, Arc::new(Segment::new(meta, &self.segment_dir)));
        }
        crate::pause_point("compaction-after-commit");
        Metrics::add(&self.metrics.compactions_total, 1);
        Metrics::add(&self.metrics.segments_written_total, 1);
        Metrics::add(&self.metrics.segment_bytes_written_total, bytes);
        tracing::info!(
            inputs = inputs.len(),
            rows,
            bytes,
            segment = id,
            "compacted"
        );
        Ok(())
    }
}

/// Merges the rows of `inputs` whose series ids are in `range` and appends them to `writer`.
fn merge_range(
    inputs: &[SegmentRef],
    schema: &arrow::datatypes::SchemaRef,
    columns: &[String],
    data_idx: &[usize],
    range: &Bitmap,
    writer: &mut SegmentWriter,
) -> Result<()> {
    let mut parts = Vec::new();
    for seg in inputs {
        for b in seg
            .read(i64::MIN, i64::MAX, Some(range), Some(columns), None, None)?
            .0
        {
            parts.push(conform(&b, schema)?);
        }
    }
    if parts.is_empty() {
        return Ok(());
    }
    let arrow_err = |source| Error::Arrow {
        measurement: inputs[0].meta.measurement.clone(),
        source,
    };
    let merged = concat_batches(schema, &parts).map_err(arrow_err)?;
    drop(parts);
    let bad = |reason: String| Error::ReadSegment {
        path: inputs[0].path.clone(),
        reason,
    };
    let sids = merged
        .column_by_name(SERIES_ID_COLUMN)
        .and_then(|c| c.as_any().downcast_ref::<arrow::array::UInt32Array>())
        .ok_or_else(|| bad("series id column is not u32".into()))?
        .values()
        .to_vec();
    let data = merged.project(data_idx).map_err(arrow_err)?;
    let times = time_values(&data).ok_or_else(|| bad(format!("no {TIME_COLUMN} column")))?;
    let sorted = sort_and_dedupe(&data, &sids, times)?;
    writer.write(&conform(&sorted, schema)?)
}
