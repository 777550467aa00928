//! Retention: whole partitions are dropped once they are older than their measurement's
//! period (the catalog's per-measurement value, else `engine.retention.default_period`).
//!
//! A partition `[start, start + width)` goes once `start + width <= now - period`. Writes older
//! than `now - period` are rejected at the door, so dropped data does not come back.

use std::time::Duration;

use crate::Result;
use crate::catalog::TableSchema;
use crate::config::EngineConfig;
use crate::metrics::Metrics;
use crate::store::Inner;

/// The oldest timestamp a measurement keeps at time `now` (ns), with its period, if it has
/// one: the catalog's value for the measurement, else the engine default.
pub fn retention_cutoff(
    schema: Option<&TableSchema>,
    config: &EngineConfig,
    now: i64,
) -> Option<(i64, Duration)> {
    let period: Duration = schema
        .and_then(|s| s.retention)
        .or(config.retention.default_period)?;
    let nanos = i64::try_from(period.as_nanos()).unwrap_or(i64::MAX);
    Some((now.saturating_sub(nanos), period))
}

impl Inner {
    /// Drops every partition past its retention at time `now`; returns segments dropped.
    pub(crate) fn enforce_retention(&self, now: i64) -> Result<usize> {
        let _maintenance = self.maintenance.lock();
        let pnanos = self.config.partition_nanos();
        let mut dropped_segments = 0;
        for schema in self.catalog.all() {
            let Some((cutoff, _)) = retention_cutoff(Some(&schema), &self.config, now) else {
                continue;
            };
            let expired: Vec<u64> = self
                .state
                .read()
                .segments
                .values()
                .filter(|s| {
                    s.meta.measurement == schema.name
                        && s.meta.partition.saturating_add(pnanos) <= cutoff
                })
                .map(|s| s.meta.id)
                .collect();
            if !expired.is_empty() {
                let mut batch = self.index.batch();
                for &id in &expired {
                    self.index.remove_segment(&mut batch, id);
                }
                self.index.commit(batch)?;
                let mut state = self.state.write();
                for id in &expired {
                    if let Some(seg) = state.segments.remove(id) {
                        seg.mark_obsolete();
                    }
                }
                dropped_segments += expired.len();
                Metrics::add(
                    &self.metrics.retention_segments_dropped_total,
                    expired.len() as u64,
                );
            }
            let rows = self.buffer.lock().drop_before(&schema.name, cutoff, pnanos);
            if rows > 0 || !expired.is_empty() {
                tracing::info!(measurement = %schema.name, segments = expired.len(), buffered_rows = rows, "retention dropped old partitions");
            }
        }
        self.update_gauges();
        Ok(dropped_segments)
    }
}
