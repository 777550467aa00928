//! Health checks: a `HEALTH` query's rows, judged by its `warn` and `fail` conditions, give
//! each component a status per check. A level counts once its condition has held for the
//! check's `FOR` duration (Prometheus' pending alerts); a condition that stops holding ends
//! its level at once. Every run writes one `forestall_health` row per component and check,
//! with its status, the value that decided it and whether it changed.

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// A component's health, worst last.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HealthStatus {
    Pass,
    Warn,
    Fail,
}

impl HealthStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            HealthStatus::Pass => "pass",
            HealthStatus::Warn => "warn",
            HealthStatus::Fail => "fail",
        }
    }
}

/// One check's state for one component (and the query's other key columns).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CheckState {
    /// The component the row named.
    pub component: String,
    /// The check: the continuous query's name.
    pub check: String,
    /// Other string columns of the row (a disk's device, say), which also key the state.
    #[serde(default)]
    pub labels: Vec<(String, String)>,
    pub status: HealthStatus,
    /// The value that decided it (the `value` column, or the first numeric one).
    pub value: Option<f64>,
    pub reason: String,
    /// When `status` began (ns).
    pub since: i64,
    /// When the warn condition (or the fail one) began to hold without a break (ns).
    #[serde(default)]
    pub warn_since: Option<i64>,
    /// When the fail condition began to hold without a break (ns).
    #[serde(default)]
    pub fail_since: Option<i64>,
    /// The last run that judged it (ns).
    pub updated: i64,
}

/// What one row of a run says.
#[derive(Debug, Clone)]
pub(crate) struct Observation {
    pub warn: bool,
    pub fail: bool,
    pub value: Option<f64>,
}

/// A check as its query defines it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Check<'a> {
    /// The continuous query's name.
    pub name: &'a str,
    pub warn: &'a Option<String>,
    pub fail: &'a Option<String>,
    /// How long a condition must hold before its level counts.
    pub hold: Duration,
}

/// The check's next state for one component from the previous one and this run's
/// observation.
pub(crate) fn step(
    check: &Check<'_>,
    previous: Option<&CheckState>,
    component: &str,
    labels: Vec<(String, String)>,
    seen: &Observation,
    now: i64,
) -> CheckState {
    let (warn, fail) = (check.warn, check.fail);
    let hold = i64::try_from(check.hold.as_nanos()).unwrap_or(i64::MAX);
    let keep = |held: bool, since: Option<Option<i64>>| -> Option<i64> {
        held.then(|| since.flatten().unwrap_or(now))
    };
    let fail_since = keep(seen.fail, previous.map(|p| p.fail_since));
    let warn_since = keep(seen.warn || seen.fail, previous.map(|p| p.warn_since));
    let reached = |since: Option<i64>| since.is_some_and(|s| now.saturating_sub(s) >= hold);
    let status = if reached(fail_since) {
        HealthStatus::Fail
    } else if warn.is_some() && reached(warn_since) {
        // A failing value is a warning too: a fail condition still pending shows as warn.
        HealthStatus::Warn
    } else {
        HealthStatus::Pass
    };
    let value = match seen.value {
        Some(v) => format!("{v}"),
        None => "no value".into(),
    };
    let reason = match status {
        HealthStatus::Fail => format!(
            "fail: {} holds (value {value})",
            fail.as_deref().unwrap_or("")
        ),
        HealthStatus::Warn if seen.fail => format!(
            "warn: {} holds (value {value}) but not yet for {}",
            fail.as_deref().unwrap_or(""),
            humantime::format_duration(Duration::from_nanos(hold as u64))
        ),
        HealthStatus::Warn => format!(
            "warn: {} holds (value {value})",
            warn.as_deref().unwrap_or("")
        ),
        HealthStatus::Pass if seen.warn || seen.fail => format!(
            "pass: a condition holds (value {value}) but not yet for {}",
            humantime::format_duration(Duration::from_nanos(hold as u64))
        ),
        HealthStatus::Pass => format!("pass (value {value})"),
    };
    let since = match previous {
        Some(p) if p.status == status => p.since,
        _ => now,
    };
    CheckState {
        component: component.to_owned(),
        check: check.name.to_owned(),
        labels,
        status,
        value: seen.value,
        reason,
        since,
        warn_since,
        fail_since,
        updated: now,
    }
}
