//! Continuous queries: named SQL queries that Forestall runs on a schedule (`EVERY`) or after
//! the writes that bring them new rows (`ON WRITE`), with their results going to a sink:
//!
//! * `INTO <measurement>`: rollups and recording rules. The query is grouped by a time bucket
//!   (`date_bin(…) AS time` or `date_trunc(…) AS time`) and runs **incrementally**: each run
//!   computes only the buckets between its watermark and `now − lateness`, plus the buckets
//!   that late writes have invalidated since ([`runtime`]), and writes them through the normal
//!   write path, keyed by their tags and bucket time, so recomputing a bucket overwrites it.
//! * `HEALTH`: threshold checks per component, written to `forestall_health` with their
//!   transitions, and kept as the components' current health ([`health`]).
//! * `NOTIFY '<url>'`: a webhook when a condition starts or stops holding, with a `FOR`
//!   duration, told once per transition.
//! * `ALLOCATE`: rows of `component`, `resource` and a demand (`demand`, an amount; or
//!   `forecast`, a predicted peak, with an optional `risk`; or `usage`, what it uses) for the
//!   allocation loop, which the server runs: a user drives allocation from any signal.
//!
//! Definitions come from SQL ([`statement`]), from the HTTP API and from the TOML config, as
//! one model ([`Definition`]), and are kept in the store's run-time catalog
//! ([`forestall_engine::Entries`]) with each query's watermark.

pub mod health;
mod pass;
mod plan;
pub mod runtime;
mod sink;
pub mod statement;
pub(crate) mod system;

use std::time::Duration;

use serde::{Deserialize, Serialize};

pub use health::{CheckState, HealthStatus};
pub use runtime::{
    ActionSink, ActionSinkRef, AllocationRequest, ContinuousQueries, HEALTH_MEASUREMENT,
    Notification, Outcome, QueryStatus, REQUESTS_MEASUREMENT,
};
pub use statement::Statement;

use crate::{Error, Result};

/// Lateness when a definition gives none: a point may arrive this late and still be in the
/// first computation of its bucket. Later points invalidate the bucket, which is recomputed.
pub const DEFAULT_LATENESS: Duration = Duration::from_secs(10);
/// Schedule when a definition gives none.
pub const DEFAULT_EVERY: Duration = Duration::from_secs(60);
/// The shortest `EVERY`.
pub const MIN_EVERY: Duration = Duration::from_secs(1);

/// When a continuous query runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Schedule {
    /// At every multiple of the interval (since the Unix epoch), plus the lateness.
    Every(Duration),
    /// After each write that brought rows for its source measurement (writes that arrive
    /// while it runs are served by one more run).
    OnWrite,
}

impl Default for Schedule {
    fn default() -> Self {
        Schedule::Every(DEFAULT_EVERY)
    }
}

/// Where a continuous query's rows go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Sink {
    /// Written into a measurement: string grouping columns become tags, the rest fields,
    /// `time` the bucket.
    Into { measurement: String },
    /// A health check per component: `warn` and `fail` are conditions over the query's
    /// columns; a level counts once its condition has held for `hold`.
    Health {
        warn: Option<String>,
        fail: Option<String>,
        hold: Duration,
    },
    /// A webhook POST when `when` (every row, when absent) starts or stops holding for a row's
    /// key, once it has held for `hold`.
    Notify {
        url: String,
        when: Option<String>,
        hold: Duration,
    },
    /// Allocation requests for the allocation loop (see [`AllocationRequest`]).
    Allocate,
}

impl Sink {
    /// The sink's kind, as `SHOW CONTINUOUS QUERIES` lists it.
    pub fn describe(&self) -> String {
        match self {
            Sink::Into { measurement } => format!("INTO {measurement}"),
            Sink::Health { .. } => "HEALTH".into(),
            Sink::Notify { url, .. } => format!("NOTIFY {url}"),
            Sink::Allocate => "ALLOCATE".into(),
        }
    }
}

/// A continuous query as the user defined it.
#[derive(Debug, Clone, PartialEq)]
pub struct Definition {
    pub name: String,
    pub schedule: Schedule,
    pub lateness: Duration,
    /// Where an `INTO` query starts: a duration before its creation (`7d`) or an RFC 3339
    /// time. Without it, it starts at its creation.
    pub backfill: Option<String>,
    pub sink: Sink,
    /// The `SELECT`.
    pub query: String,
    /// Where the `SELECT` starts in the statement it was given in (line, column), so that its
    /// errors point into that statement.
    pub select_at: Option<(u64, u64)>,
    /// Declared in the TOML config: reconciled with it at every start.
    pub from_config: bool,
    /// Made by Forestall itself (the allocation loop's usage queries): reconciled at every
    /// start until a user replaces it.
    pub builtin: bool,
}

/// The JSON and TOML form of a [`Definition`] (`PUT /api/v1/continuous_queries/{name}`,
/// `[[continuous_queries]]`), also the form it is stored in.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DefinitionSpec {
    /// Required in TOML; over HTTP the path names the query.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// `"1m"`, `"30s"`…; default one minute. Not with `on_write`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub every: Option<String>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub on_write: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lateness: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backfill: Option<String>,
    /// The sink: exactly one of `into`, `health`, `notify`, `allocate`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub into: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health: Option<HealthSpec>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub notify: Option<NotifySpec>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub allocate: bool,
    /// The `SELECT`.
    pub query: String,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub from_config: bool,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub builtin: bool,
}

/// `health = { warn = "value > 80", fail = "value > 95", for = "2m" }`
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub warn: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fail: Option<String>,
    #[serde(default, rename = "for", skip_serializing_if = "Option::is_none")]
    pub hold: Option<String>,
}

/// `notify = { url = "http://…", when = "value > 0", for = "5m" }`
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NotifySpec {
    pub url: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub when: Option<String>,
    #[serde(default, rename = "for", skip_serializing_if = "Option::is_none")]
    pub hold: Option<String>,
}

fn text(d: Duration) -> String {
    humantime::format_duration(d).to_string()
}

fn optional_duration(text: Option<&str>) -> Result<Duration> {
    text.map_or(Ok(Duration::ZERO), parse_duration)
}

impl Definition {
    /// The definition of a spec, with `name` when the spec names none.
    pub fn from_spec(spec: DefinitionSpec, name: Option<&str>) -> Result<Self> {
        let name = match (spec.name, name) {
            (Some(a), Some(b)) if a != b => {
                return Err(Error::Query(format!(
                    "the body names the query {a:?} but the path {b:?}"
                )));
            }
            (Some(n), _) => n,
            (None, Some(n)) => n.to_owned(),
            (None, None) => return Err(Error::Query("a continuous query needs a name".into())),
        };
        check_name(&name, "the continuous query's name")?;
        let schedule = match (spec.every.as_deref(), spec.on_write) {
            (Some(_), true) => {
                return Err(Error::Query(
                    "give either every or on_write, not both".into(),
                ));
            }
            (None, true) => Schedule::OnWrite,
            (Some(e), false) => Schedule::Every(parse_duration(e)?),
            (None, false) => Schedule::default(),
        };
        let sink = match (spec.into, spec.health, spec.notify) {
            (None, None, None) if spec.allocate => Sink::Allocate,
            _ if spec.allocate => {
                return Err(Error::Query(
                    "a continuous query has one sink: into, health, notify or allocate".into(),
                ));
            }
            (Some(measurement), None, None) => {
                check_name(&measurement, "the measurement to write into")?;
                Sink::Into { measurement }
            }
            (None, Some(h), None) => Sink::Health {
                hold: optional_duration(h.hold.as_deref())?,
                warn: h.warn,
                fail: h.fail,
            },
            (None, None, Some(n)) => Sink::Notify {
                hold: optional_duration(n.hold.as_deref())?,
                url: n.url,
                when: n.when,
            },
            (None, None, None) => {
                return Err(Error::Query(
                    "a continuous query needs a sink: into, health, notify or allocate".into(),
                ));
            }
            _ => {
                return Err(Error::Query(
                    "a continuous query has one sink: into, health, notify or allocate".into(),
                ));
            }
        };
        Ok(Definition {
            name,
            schedule,
            lateness: match spec.lateness.as_deref() {
                Some(l) => parse_duration(l)?,
                None => DEFAULT_LATENESS,
            },
            backfill: spec.backfill,
            sink,
            query: spec.query,
            select_at: None,
            from_config: spec.from_config,
            builtin: spec.builtin,
        })
    }

    /// The spec this definition is stored and shown as.
    pub fn to_spec(&self) -> DefinitionSpec {
        let mut spec = DefinitionSpec {
            name: Some(self.name.clone()),
            lateness: Some(text(self.lateness)),
            backfill: self.backfill.clone(),
            query: self.query.clone(),
            from_config: self.from_config,
            builtin: self.builtin,
            ..Default::default()
        };
        match self.schedule {
            Schedule::Every(d) => spec.every = Some(text(d)),
            Schedule::OnWrite => spec.on_write = true,
        }
        let hold = |d: Duration| (!d.is_zero()).then(|| text(d));
        match &self.sink {
            Sink::Into { measurement } => spec.into = Some(measurement.clone()),
            Sink::Health {
                warn,
                fail,
                hold: h,
            } => {
                spec.health = Some(HealthSpec {
                    warn: warn.clone(),
                    fail: fail.clone(),
                    hold: hold(*h),
                })
            }
            Sink::Notify { url, when, hold: h } => {
                spec.notify = Some(NotifySpec {
                    url: url.clone(),
                    when: when.clone(),
                    hold: hold(*h),
                })
            }
            Sink::Allocate => spec.allocate = true,
        }
        spec
    }

    /// The definition as a `CREATE CONTINUOUS QUERY` statement.
    pub fn to_sql(&self) -> String {
        let mut out = format!("CREATE CONTINUOUS QUERY {}", self.name);
        match self.schedule {
            Schedule::Every(d) => out.push_str(&format!(" EVERY '{}'", text(d))),
            Schedule::OnWrite => out.push_str(" ON WRITE"),
        }
        out.push_str(&format!(" LATENESS '{}'", text(self.lateness)));
        if let Some(b) = &self.backfill {
            if parse_duration(b).is_ok() {
                out.push_str(&format!(" BACKFILL '{b}'"));
            } else {
                out.push_str(&format!(" BACKFILL FROM '{b}'"));
            }
        }
        let hold = |d: Duration| {
            if d.is_zero() {
                String::new()
            } else {
                format!(" FOR '{}'", text(d))
            }
        };
        match &self.sink {
            Sink::Into { measurement } => out.push_str(&format!(" INTO {measurement}")),
            Sink::Health {
                warn,
                fail,
                hold: h,
            } => {
                out.push_str(" HEALTH");
                if let Some(w) = warn {
                    out.push_str(&format!(" WARN WHEN {w}"));
                }
                if let Some(f) = fail {
                    out.push_str(&format!(" FAIL WHEN {f}"));
                }
                out.push_str(&hold(*h));
            }
            Sink::Notify { url, when, hold: h } => {
                out.push_str(&format!(" NOTIFY '{}'", url.replace('\'', "''")));
                if let Some(w) = when {
                    out.push_str(&format!(" WHEN {w}"));
                }
                out.push_str(&hold(*h));
            }
            Sink::Allocate => out.push_str(" ALLOCATE"),
        }
        out.push_str(" AS ");
        out.push_str(&self.query);
        out
    }

    /// Checks what can be checked without the store: the schedule, the durations, the sink.
    /// The `SELECT` is checked by [`ContinuousQueries`], which plans it.
    pub(crate) fn validate(&self) -> Result<()> {
        if let Schedule::Every(every) = self.schedule
            && every < MIN_EVERY
        {
            return Err(Error::Query(format!(
                "EVERY {} is too short: continuous queries run at most once a second",
                text(every)
            )));
        }
        if let Some(b) = &self.backfill {
            backfill_start(b, 0)?;
        }
        match &self.sink {
            Sink::Into { measurement } => {
                if measurement.starts_with("forestall_") {
                    return Err(Error::Query(format!(
                        "INTO {measurement}: measurements named forestall_… are Forestall's own"
                    )));
                }
            }
            Sink::Health { warn, fail, .. } => {
                if warn.is_none() && fail.is_none() {
                    return Err(Error::Query(
                        "a health check needs a warn condition, a fail condition or both".into(),
                    ));
                }
            }
            Sink::Notify { url, .. } => {
                if !url.starts_with("http://") || url.len() <= "http://".len() {
                    return Err(Error::Query(format!(
                        "NOTIFY {url:?}: the webhook must be an http:// URL"
                    )));
                }
            }
            Sink::Allocate => {}
        }
        if !matches!(self.sink, Sink::Into { .. }) && self.backfill.is_some() {
            return Err(Error::Query(
                "BACKFILL applies to INTO queries, which materialise history".into(),
            ));
        }
        Ok(())
    }
}

/// Parses a duration: `5m`, `90s`, `1h 30m`, or SQL's `1 minute`, `2 hours`.
pub fn parse_duration(text: &str) -> Result<Duration> {
    let t = text.trim();
    if let Ok(d) = humantime::parse_duration(t) {
        return Ok(d);
    }
    match arrow::compute::kernels::cast_utils::parse_interval_month_day_nano(t) {
        Ok(i) if i.months == 0 && i.days >= 0 && i.nanoseconds >= 0 => Ok(Duration::from_nanos(
            (i.days as u64) * 86_400_000_000_000 + i.nanoseconds as u64,
        )),
        Ok(_) => Err(Error::Query(format!(
            "duration {text:?}: months and negative durations are not fixed lengths of time"
        ))),
        Err(_) => Err(Error::Query(format!(
            "invalid duration {text:?}: write it as '1 minute', '90 seconds' or '5m'"
        ))),
    }
}

/// Where a backfill starts, in ns: `text` is a duration before `now` or an RFC 3339 time.
pub(crate) fn backfill_start(text: &str, now: i64) -> Result<i64> {
    if let Ok(d) = parse_duration(text) {
        return Ok(now.saturating_sub(i64::try_from(d.as_nanos()).unwrap_or(i64::MAX)));
    }
    arrow::compute::kernels::cast_utils::string_to_timestamp_nanos(text).map_err(|_| {
        Error::Query(format!(
            "BACKFILL {text:?}: give a duration ('7 days') or an RFC 3339 time ('2026-01-01T00:00:00Z')"
        ))
    })
}

/// Names of queries and measurements: letters, digits and `_`, starting with a letter or `_`.
pub(crate) fn check_name(name: &str, what: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 128
        && name
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
    if ok {
        Ok(())
    } else {
        Err(Error::Query(format!(
            "{what} {name:?} is not a valid name: use letters, digits and _ (at most 128), starting with a letter"
        )))
    }
}

#[cfg(test)]
mod tests;
