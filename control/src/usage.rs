//! Where the loop's usage comes from: continuous queries.
//!
//! Every round's usage is what `ALLOCATE` queries delivered (their `usage` column). For each
//! resource the loop makes one **built-in** query from `[allocation.usage]` (by default over
//! `forestall_usage`, which the collector in [`crate::live`] writes from the components'
//! cgroups):
//!
//! ```sql
//! CREATE CONTINUOUS QUERY forestall_usage_cpu EVERY '5s' LATENESS '1.25s' ALLOCATE AS
//! SELECT CAST("component" AS VARCHAR) AS component, 'cpu' AS resource,
//!        CAST(avg(CAST("cpu" AS DOUBLE)) AS DOUBLE) * 1 AS usage
//! FROM "forestall_usage" WHERE time > now() - INTERVAL '5000 milliseconds'
//!   AND "component" IS NOT NULL GROUP BY 1
//! ```
//!
//! They are listed with every other query and can be replaced (`CREATE OR REPLACE`): a
//! replaced one is the user's from then on, and the loop leaves it alone at its next start.
//!
//! **Phases of one interval.** The collector meters at each multiple of the interval, the
//! usage queries run a quarter of an interval later (their `LATENESS`) over the interval
//! that just ended, and the round decides at half an interval: each round sees the usage of
//! the interval before it.
//!
//! **Warm-up.** `ALLOCATE` rows are recorded in `forestall_allocation_requests`; at start the
//! forecasters learn the usage recorded there for the rounds they keep.

use std::collections::BTreeMap;
use std::time::Duration;

use arrow::array::{Array, AsArray};
use arrow::datatypes::{DataType, Float64Type, Int64Type};
use forestall_actuators::alloc::{PerResource, Resource};
use forestall_engine::Store;
use forestall_query::QueryEngine;
use forestall_query::continuous::{DefinitionSpec, REQUESTS_MEASUREMENT};

use crate::config::{Aggregate, AllocationConfig};

/// Built-in usage queries are named this, then the resource (`forestall_usage_cpu`).
pub const BUILTIN_PREFIX: &str = "forestall_usage_";

/// The shortest schedule a continuous query may have.
const MIN_EVERY: Duration = Duration::from_secs(1);

/// When, within each interval, the collector, the usage queries and the round run (as a
/// share of the interval).
pub const PHASE_COLLECT: f64 = 0.0;
pub const PHASE_USAGE: f64 = 0.25;
pub const PHASE_ROUND: f64 = 0.5;

/// The built-in usage queries for `config`: one per resource.
pub fn builtin_queries(config: &AllocationConfig) -> Vec<DefinitionSpec> {
    let every = config.interval.max(MIN_EVERY);
    let window = every.as_millis();
    let tag = &config.component_tag;
    Resource::ALL
        .into_iter()
        .map(|r| {
            let s = config.usage.get(r);
            let agg = match s.aggregate {
                Aggregate::Avg => "avg",
                Aggregate::Max => "max",
            };
            let query = format!(
                "SELECT CAST(\"{tag}\" AS VARCHAR) AS component, '{r}' AS resource, \
                 CAST({agg}(CAST(\"{f}\" AS DOUBLE)) AS DOUBLE) * {scale:?} AS usage \
                 FROM \"{m}\" WHERE time > now() - INTERVAL '{window} milliseconds' \
                 AND \"{tag}\" IS NOT NULL GROUP BY 1",
                f = s.field,
                m = s.measurement,
                scale = s.scale,
            );
            DefinitionSpec {
                name: Some(format!("{BUILTIN_PREFIX}{r}")),
                every: Some(humantime::format_duration(every).to_string()),
                lateness: Some(humantime::format_duration(every.mul_f64(PHASE_USAGE)).to_string()),
                allocate: true,
                query,
                ..Default::default()
            }
        })
        .collect()
}

/// The usage recorded for `names` over `(from, from + bins × stride]`, in `bins` rounds of
/// `stride` ns each: `[bin][component][resource]`, NaN where none was delivered.
pub async fn recorded(
    store: &Store,
    query: &QueryEngine,
    names: &[String],
    from: i64,
    stride: i64,
    bins: usize,
) -> Vec<Vec<PerResource<f64>>> {
    let mut out = vec![vec![[f64::NAN; 4]; names.len()]; bins];
    let Some(table) = store.table(REQUESTS_MEASUREMENT) else {
        return out;
    };
    if !table.columns.contains_key("usage") {
        return out;
    }
    let index: BTreeMap<&str, usize> = names
        .iter()
        .enumerate()
        .map(|(i, n)| (n.as_str(), i))
        .collect();
    let stride = stride.max(1);
    let to = from + stride * bins as i64;
    // Row time t falls in round (t − from − 1) / stride: rounds are (start, end].
    let sql = format!(
        "SELECT CAST(component AS VARCHAR) AS c, CAST(resource AS VARCHAR) AS r, \
         CAST((CAST(time AS BIGINT) - {from} - 1) / {stride} AS BIGINT) AS b, \
         CAST(avg(usage) AS DOUBLE) AS v \
         FROM \"{REQUESTS_MEASUREMENT}\" WHERE time > to_timestamp_nanos({from}) \
         AND time <= to_timestamp_nanos({to}) AND usage IS NOT NULL GROUP BY 1, 2, 3"
    );
    let batches = match query.sql(&sql).await {
        Ok((_, b)) => b,
        Err(e) => {
            tracing::warn!(error = %e, "could not read the recorded usage");
            return out;
        }
    };
    for b in batches {
        // VARCHAR may plan as Utf8View; one string type to read.
        let (Ok(c), Ok(r)) = (
            arrow::compute::cast(b.column(0), &DataType::Utf8),
            arrow::compute::cast(b.column(1), &DataType::Utf8),
        ) else {
            continue;
        };
        let (Some(c), Some(r), Some(k), Some(v)) = (
            c.as_string_opt::<i32>(),
            r.as_string_opt::<i32>(),
            b.column(2).as_primitive_opt::<Int64Type>(),
            b.column(3).as_primitive_opt::<Float64Type>(),
        ) else {
            continue;
        };
        for i in 0..b.num_rows() {
            if c.is_null(i) || r.is_null(i) || k.is_null(i) || v.is_null(i) {
                continue;
            }
            let bin = usize::try_from(k.value(i)).ok().filter(|&k| k < bins);
            let resource = Resource::ALL.into_iter().find(|x| x.name() == r.value(i));
            if let (Some(bin), Some(&comp), Some(res)) = (bin, index.get(c.value(i)), resource) {
                out[bin][comp][res.index()] = v.value(i);
            }
        }
    }
    out
}

/// How long from `now` (ns since the epoch) to the next point `phase` of the way into an
/// interval (intervals start at multiples of `interval` since the epoch).
pub fn until_phase(now: i64, interval: Duration, phase: f64) -> Duration {
    let step = (interval.as_nanos() as i64).max(1);
    let offset = (step as f64 * phase) as i64;
    let next = (now - offset).div_euclid(step) * step + step + offset;
    Duration::from_nanos((next - now).max(0) as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn phases_fall_at_their_share_of_each_interval() {
        let s = Duration::from_secs(4);
        // 10 s after the epoch: intervals start at 8 and 12; their quarter at 9 and 13.
        let now = 10_000_000_000;
        assert_eq!(until_phase(now, s, 0.0), Duration::from_secs(2));
        assert_eq!(until_phase(now, s, 0.25), Duration::from_secs(3));
        assert_eq!(until_phase(now, s, 0.5), Duration::from_secs(4));
        // Exactly on a phase: the next one, a whole interval on.
        assert_eq!(until_phase(12_000_000_000, s, 0.0), s);
    }

    #[test]
    fn a_builtin_query_per_resource_follows_the_config() {
        let mut config = AllocationConfig {
            interval: Duration::from_secs(5),
            ..Default::default()
        };
        config.usage.cpu.measurement = "node".into();
        config.usage.cpu.field = "cpu_pct".into();
        config.usage.cpu.scale = 0.01;
        config.usage.mem.aggregate = Aggregate::Max;
        let specs = builtin_queries(&config);
        let names: Vec<_> = specs.iter().filter_map(|s| s.name.clone()).collect();
        assert_eq!(
            names,
            [
                "forestall_usage_cpu",
                "forestall_usage_mem",
                "forestall_usage_net",
                "forestall_usage_disk"
            ]
        );
        let cpu = &specs[0];
        assert!(cpu.allocate);
        assert_eq!(cpu.every.as_deref(), Some("5s"));
        assert_eq!(cpu.lateness.as_deref(), Some("1s 250ms"));
        assert!(cpu.query.contains("avg(CAST(\"cpu_pct\" AS DOUBLE))"));
        assert!(cpu.query.contains("* 0.01 AS usage"));
        assert!(cpu.query.contains("FROM \"node\""));
        assert!(specs[1].query.contains("max(CAST(\"mem\" AS DOUBLE))"));
        // Under a second, the queries run every second (their shortest schedule).
        config.interval = Duration::from_millis(200);
        assert_eq!(builtin_queries(&config)[0].every.as_deref(), Some("1s"));
    }
}
