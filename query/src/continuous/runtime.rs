//! [`ContinuousQueries`]: the registry of continuous queries, their persistence, the
//! scheduler that runs them, and the write observer that invalidates their buckets.
//!
//! **Where they run.** Every query has one task on the runtime it was started on; a run never
//! overlaps the same query's previous run, and a failing query backs off (its interval, then
//! twice that, … up to five minutes) and shows its error, without holding up any other query
//! or any write. The SQL itself runs on the query engine's runtime, at the queries' priority,
//! and at most one read per core is under way at once (each read copies the part of the live
//! buffer it reads). Queries due together whose scans fold the same rows (rollups of one
//! measurement over the same window) share one read of them: see [`super::pass`].
//!
//! **Watermarks and invalidation (`INTO`).** A query's watermark is the start of the first
//! bucket it has not materialised. A run computes `[watermark, floor(now − lateness))` (at
//! most [`CHUNK_BUCKETS`] buckets or an hour at a time, so a backfill runs in bounded memory,
//! chunk after chunk) plus the buckets marked dirty, writes the rows through the store's write
//! path, and only then moves the watermark and clears the dirty marks, in one durable catalog
//! write. A kill between the two recomputes the same buckets, whose rows overwrite themselves
//! (same series, same time). A write of a point below a watermark marks its bucket dirty, and
//! the mark is durable before the point is appended to the WAL, so no acknowledged late point
//! can be missed; the mark is checked again once the point is visible, for a run that read the
//! bucket in between.
//!
//! **State.** Definitions are kept under `cq/def/<name>` and each query's watermark, dirty
//! buckets, health and notification states under `cq/state/<name>`, in the store's entries.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, Mutex, RwLock, Weak};
use std::time::{Duration, Instant};

use arrow::array::{
    Array, ArrayRef, Float64Array, StringArray, TimestampNanosecondArray, UInt64Array,
};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use arrow::record_batch::RecordBatch;
use datafusion::sql::sqlparser::ast::{
    Expr, FunctionArg, FunctionArgExpr, Query, SetExpr, TableFactor, Value,
};
use forestall_engine::line_protocol::{ParsedLine, Precision};
use forestall_engine::store::now_nanos;
use forestall_engine::{Entries, Store, WriteObserver};
use serde::{Deserialize, Serialize};

use super::health::{self, CheckState, HealthStatus, Observation};
use super::pass::Passes;
use super::plan::{Incremental, parse_select};
use super::sink::{self, Column, Kind};
use super::statement::Statement;
use super::{Definition, DefinitionSpec, Schedule, Sink, backfill_start};
use crate::{Error, QueryEngine, Result};

/// The most buckets one computation covers: a backfill goes a chunk at a time.
pub const CHUNK_BUCKETS: i64 = 60;
/// A chunk covers at least this much time (ns), whatever the bucket.
const CHUNK_MIN: i64 = 3_600_000_000_000;
/// The most dirty buckets recomputed in one run; the rest wait for the next.
const MAX_DIRTY_PER_RUN: usize = 1024;
/// Line protocol is written to the store in requests of about this size.
const WRITE_BYTES: usize = 4 << 20;
/// The longest back-off after failures.
const MAX_BACKOFF: Duration = Duration::from_secs(300);
/// The measurement health checks write.
pub const HEALTH_MEASUREMENT: &str = "forestall_health";
/// The measurement `ALLOCATE` queries' rows are recorded in: one row per component and
/// resource per run, tagged with the query that asked.
pub const REQUESTS_MEASUREMENT: &str = "forestall_allocation_requests";

const DEF_PREFIX: &str = "cq/def/";
const STATE_PREFIX: &str = "cq/state/";

/// Acts on what queries find: the server implements it (queries never act themselves).
#[async_trait::async_trait]
pub trait ActionSink: Send + Sync + std::fmt::Debug {
    /// Tells `url` that a `NOTIFY` query's condition started (`firing`) or stopped
    /// (`resolved`) holding for one key. An error is retried at the next run.
    async fn notify(&self, url: &str, event: &Notification) -> std::result::Result<(), String>;

    /// An `ALLOCATE` query's rows of one run: they replace what the same query delivered
    /// before (an empty delivery withdraws them: the query found nothing, or was dropped).
    async fn allocate(
        &self,
        query: &str,
        requests: Vec<AllocationRequest>,
    ) -> std::result::Result<(), String>;
}

/// One row of an `ALLOCATE` query: what a component needs of a resource.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AllocationRequest {
    pub component: String,
    /// `cpu` (cores), `mem` (bytes), `net` or `disk` (bytes/s).
    pub resource: String,
    /// What it uses now, in the resource's unit: the usage its forecaster learns from.
    pub usage: Option<f64>,
    /// An amount it needs now: the allocation is raised to at least this.
    pub demand: Option<f64>,
    /// A predicted peak over the horizon: the request is sized from it as from the loop's
    /// own forecasts (peak over θ, times learned headroom).
    pub forecast: Option<f64>,
    /// The probability of a bottleneck within the horizon, in [0, 1]: orders requests when
    /// the pool is short.
    pub risk: Option<f64>,
}

/// The columns an `ALLOCATE` query gives its rows' amounts in.
const ALLOCATION_AMOUNTS: [&str; 3] = ["usage", "demand", "forecast"];

/// An [`ActionSink`] to share.
pub type ActionSinkRef = Arc<dyn ActionSink>;

/// A `NOTIFY` query's event, POSTed as JSON.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Notification {
    /// The continuous query's name.
    pub query: String,
    /// `firing` or `resolved`.
    pub status: String,
    /// The row's string columns: what the event is about.
    pub key: BTreeMap<String, String>,
    /// The row's other columns at the last run that saw it.
    pub values: BTreeMap<String, serde_json::Value>,
    /// Since when the condition has held (ns since the epoch).
    pub since: i64,
    /// When this was decided (ns since the epoch).
    pub at: i64,
}

/// What a query has done, as `SHOW CONTINUOUS QUERIES` and `/metrics` show it.
#[derive(Debug, Clone, Default, Serialize)]
pub struct QueryStatus {
    pub runs: u64,
    pub failures: u64,
    pub rows_written: u64,
    /// When the last run started (ns).
    pub last_run: Option<i64>,
    pub last_duration_seconds: Option<f64>,
    pub last_error: Option<String>,
    /// Failures since the last success.
    pub consecutive_failures: u32,
    /// What the last run could not do that is not an error (a measurement not written yet).
    pub note: Option<String>,
}

/// A query's durable state.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct State {
    /// `INTO`: the start of the first bucket not materialised (ns).
    #[serde(default)]
    watermark: Option<i64>,
    /// `INTO`: starts of buckets below the watermark that late writes changed.
    #[serde(default)]
    dirty: BTreeSet<i64>,
    /// Dirty buckets a run is recomputing: still stored as dirty until the run is durable.
    #[serde(skip)]
    in_flight: BTreeSet<i64>,
    /// `HEALTH`: each key's check state.
    #[serde(default)]
    checks: BTreeMap<String, CheckState>,
    /// `NOTIFY`: keys whose condition holds.
    #[serde(default)]
    firing: BTreeMap<String, Firing>,
}

/// A row's string columns (its key) and its other columns.
type KeyedRow = (
    BTreeMap<String, String>,
    BTreeMap<String, serde_json::Value>,
);

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Firing {
    since: i64,
    /// The `firing` event was delivered.
    notified: bool,
    key: BTreeMap<String, String>,
    values: BTreeMap<String, serde_json::Value>,
}

impl State {
    fn encode(&self) -> Vec<u8> {
        let mut stored = self.clone();
        stored.dirty.extend(self.in_flight.iter().copied());
        // Cannot fail: plain maps of strings and numbers.
        serde_json::to_vec(&stored).unwrap_or_default()
    }
}

/// One registered query.
#[derive(Debug)]
struct Cq {
    def: Definition,
    incremental: Option<Incremental>,
    /// Measurements its rows come from (on-write triggers).
    sources: Vec<String>,
    state: Mutex<State>,
    /// The watermark, for the write path's quick check (`i64::MIN`: none).
    watermark: AtomicI64,
    status: Mutex<QueryStatus>,
    wake: tokio::sync::Notify,
    stopped: AtomicBool,
    /// Held for the length of each run: a run never overlaps the same query's previous one,
    /// scheduled or asked for ([`ContinuousQueries::run_now`]).
    running: tokio::sync::Mutex<()>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic while holding one of these leaves plain data, still usable.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn nanos(d: Duration) -> i64 {
    i64::try_from(d.as_nanos()).unwrap_or(i64::MAX)
}

/// The continuous-query runtime of one store. Cheap to clone.
#[derive(Debug, Clone)]
pub struct ContinuousQueries {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    store: Arc<Store>,
    engine: QueryEngine,
    entries: Entries,
    actions: Option<ActionSinkRef>,
    handle: tokio::runtime::Handle,
    queries: RwLock<BTreeMap<String, Arc<Cq>>>,
    /// `INTO` and on-write queries by source measurement, rebuilt on every change.
    by_source: RwLock<Arc<HashMap<String, Vec<Arc<Cq>>>>>,
    /// Create, replace and drop one at a time.
    changes: tokio::sync::Mutex<()>,
    /// Every query task started, to wait for at [`ContinuousQueries::stop`].
    tasks: Mutex<Vec<tokio::task::JoinHandle<()>>>,
    /// Where runs take turns (at most one per core at once) and queries over the same rows
    /// share one read of them.
    passes: Arc<Passes>,
}

/// What a continuous-query statement returns.
#[derive(Debug)]
pub enum Outcome {
    /// `SHOW CONTINUOUS QUERIES`.
    Rows(RecordBatch),
    /// `CREATE` or `DROP`: the command tag, and what happened.
    Done { tag: &'static str, message: String },
}

impl Outcome {
    /// The outcome as one batch (a `result` column for commands).
    pub fn into_batch(self) -> RecordBatch {
        match self {
            Outcome::Rows(b) => b,
            Outcome::Done { message, .. } => {
                let schema = Arc::new(Schema::new(vec![Field::new(
                    "result",
                    DataType::Utf8,
                    false,
                )]));
                let column: ArrayRef = Arc::new(StringArray::from(vec![message]));
                // Cannot fail: one column matching the schema.
                RecordBatch::try_new(schema, vec![column]).expect("one string column")
            }
        }
    }
}

impl ContinuousQueries {
    /// Loads the stored queries of `store`, starts them on the current runtime, and starts
    /// watching writes. `engine` runs their SQL; `actions` receives notifications.
    pub fn start(
        store: Arc<Store>,
        engine: QueryEngine,
        actions: Option<ActionSinkRef>,
    ) -> Result<Self> {
        let entries = store.entries();
        let inner = Arc::new(Inner {
            store: Arc::clone(&store),
            engine,
            entries,
            actions,
            handle: tokio::runtime::Handle::current(),
            queries: RwLock::new(BTreeMap::new()),
            by_source: RwLock::new(Arc::new(HashMap::new())),
            changes: tokio::sync::Mutex::new(()),
            tasks: Mutex::new(Vec::new()),
            passes: Arc::new(Passes::new(
                std::thread::available_parallelism().map_or(2, |n| n.get()),
            )),
        });
        let stored = inner.entries.list(DEF_PREFIX).map_err(engine_error)?;
        let states: HashMap<String, Vec<u8>> = inner
            .entries
            .list(STATE_PREFIX)
            .map_err(engine_error)?
            .into_iter()
            .map(|(k, v)| (k[STATE_PREFIX.len()..].to_owned(), v))
            .collect();
        for (key, bytes) in stored {
            let name = &key[DEF_PREFIX.len()..];
            let loaded = serde_json::from_slice::<DefinitionSpec>(&bytes)
                .map_err(|e| Error::Query(e.to_string()))
                .and_then(|spec| Definition::from_spec(spec, Some(name)))
                .and_then(analyse);
            match loaded {
                Ok(cq) => {
                    if let Some(s) = states.get(name) {
                        match serde_json::from_slice::<State>(s) {
                            Ok(state) => {
                                cq.watermark
                                    .store(state.watermark.unwrap_or(i64::MIN), Ordering::Release);
                                *lock(&cq.state) = state;
                            }
                            Err(e) => {
                                tracing::error!(query = name, error = %e, "stored continuous-query state is unreadable; starting it afresh")
                            }
                        }
                    } else {
                        inner.initialise(&cq, now_nanos());
                    }
                    let cq = Arc::new(cq);
                    inner
                        .queries
                        .write()
                        .unwrap_or_else(|e| e.into_inner())
                        .insert(name.to_owned(), Arc::clone(&cq));
                }
                Err(e) => {
                    tracing::error!(query = name, error = %e, "stored continuous query cannot be loaded; it is not running")
                }
            }
        }
        inner.rebuild_sources();
        let queries: Vec<Arc<Cq>> = inner.read_queries().values().cloned().collect();
        for cq in queries {
            inner.spawn(cq);
        }
        store.observe(Arc::new(Observer(Arc::downgrade(&inner))));
        tracing::info!(
            queries = inner.read_queries().len(),
            "continuous queries running"
        );
        Ok(Self { inner })
    }

    /// Makes the stored queries declared by the config match `specs`: new ones are created,
    /// changed ones replaced, ones no longer declared dropped. Queries made over the API are
    /// left alone.
    pub async fn reconcile(&self, specs: Vec<DefinitionSpec>) -> Result<()> {
        self.reconcile_kind(specs, false).await
    }

    /// The same for the queries Forestall makes itself (`builtin`), except that a built-in
    /// query a user has replaced is theirs from then on and left alone.
    pub async fn reconcile_builtin(&self, specs: Vec<DefinitionSpec>) -> Result<()> {
        self.reconcile_kind(specs, true).await
    }

    async fn reconcile_kind(&self, specs: Vec<DefinitionSpec>, builtin: bool) -> Result<()> {
        let kind = |d: &Definition| if builtin { d.builtin } else { d.from_config };
        let mut declared = BTreeSet::new();
        for mut spec in specs {
            spec.from_config = !builtin;
            spec.builtin = builtin;
            let def = Definition::from_spec(spec, None)?;
            declared.insert(def.name.clone());
            let taken = self
                .inner
                .read_queries()
                .get(&def.name)
                .is_some_and(|cq| builtin && !cq.def.builtin);
            if !taken {
                self.create(def, true, false).await?;
            }
        }
        let stale: Vec<String> = self
            .inner
            .read_queries()
            .values()
            .filter(|cq| kind(&cq.def) && !declared.contains(&cq.def.name))
            .map(|cq| cq.def.name.clone())
            .collect();
        for name in stale {
            self.drop_query(&name, true).await?;
        }
        Ok(())
    }

    /// Runs a continuous-query statement (see [`super::statement`]).
    pub async fn execute(&self, statement: Statement) -> Result<Outcome> {
        match statement {
            Statement::Create {
                definition,
                or_replace,
                if_not_exists,
            } => {
                let name = definition.name.clone();
                let created = self.create(definition, or_replace, if_not_exists).await?;
                Ok(Outcome::Done {
                    tag: "CREATE CONTINUOUS QUERY",
                    message: format!("continuous query {name} {created}"),
                })
            }
            Statement::Drop { name, if_exists } => {
                let dropped = self.drop_query(&name, if_exists).await?;
                Ok(Outcome::Done {
                    tag: "DROP CONTINUOUS QUERY",
                    message: if dropped {
                        format!("continuous query {name} dropped")
                    } else {
                        format!("continuous query {name} does not exist; nothing dropped")
                    },
                })
            }
            Statement::Show => Ok(Outcome::Rows(self.table())),
        }
    }

    /// Creates a query (or replaces it with `or_replace`). Returns what happened: `created`,
    /// `replaced`, `unchanged` (the same definition, state kept) or `exists` (with
    /// `if_not_exists`). A definition that does not check out is refused and nothing is kept.
    pub async fn create(
        &self,
        def: Definition,
        or_replace: bool,
        if_not_exists: bool,
    ) -> Result<&'static str> {
        def.validate()?;
        let cq = analyse(def)?;
        self.inner.check_plan(&cq).await?;
        let _changes = self.inner.changes.lock().await;
        let existing = self.inner.read_queries().get(&cq.def.name).cloned();
        let outcome = match &existing {
            Some(old) if if_not_exists => {
                let _ = old;
                return Ok("exists");
            }
            Some(old) if or_replace => {
                if same(&old.def, &cq.def) {
                    return Ok("unchanged");
                }
                "replaced"
            }
            Some(_) => {
                return Err(Error::Exists(format!(
                    "continuous query {} already exists: use CREATE OR REPLACE, or drop it first",
                    cq.def.name
                )));
            }
            None => "created",
        };
        self.inner.initialise(&cq, now_nanos());
        let name = cq.def.name.clone();
        let spec =
            serde_json::to_vec(&cq.def.to_spec()).map_err(|e| Error::Execution(e.to_string()))?;
        let state = lock(&cq.state).encode();
        self.inner
            .entries
            .put(&[
                (format!("{DEF_PREFIX}{name}"), Some(spec)),
                (format!("{STATE_PREFIX}{name}"), Some(state)),
            ])
            .map_err(engine_error)?;
        if let Some(old) = existing {
            old.stop();
            // Its run in progress, if any, ends before the replacement's first.
            let _run = old.running.lock().await;
        }
        let cq = Arc::new(cq);
        self.inner
            .queries
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(name.clone(), Arc::clone(&cq));
        self.inner.rebuild_sources();
        self.inner.spawn(cq);
        tracing::info!(query = %name, outcome, "continuous query defined");
        Ok(outcome)
    }

    /// Drops a query: it stops, and its definition and state are deleted. `false` when there
    /// was none (an error unless `if_exists`).
    pub async fn drop_query(&self, name: &str, if_exists: bool) -> Result<bool> {
        let _changes = self.inner.changes.lock().await;
        let Some(cq) = self.inner.read_queries().get(name).cloned() else {
            return if if_exists {
                Ok(false)
            } else {
                Err(Error::NotFound(format!(
                    "continuous query {name} does not exist"
                )))
            };
        };
        cq.stop();
        // A run in progress finishes first: what it delivers is withdrawn below, not after.
        let _run = cq.running.lock().await;
        self.inner
            .entries
            .put(&[
                (format!("{DEF_PREFIX}{name}"), None),
                (format!("{STATE_PREFIX}{name}"), None),
            ])
            .map_err(engine_error)?;
        if cq.def.sink == Sink::Allocate
            && let Err(e) = self.inner.deliver(name, Vec::new()).await
        {
            tracing::warn!(query = %name, error = %e, "could not withdraw a dropped query's allocation requests");
        }
        self.inner
            .queries
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .remove(name);
        self.inner.rebuild_sources();
        tracing::info!(query = %name, "continuous query dropped");
        Ok(true)
    }

    /// Every query's definition.
    pub fn definitions(&self) -> Vec<Definition> {
        self.inner
            .read_queries()
            .values()
            .map(|cq| cq.def.clone())
            .collect()
    }

    /// One query's definition, status and watermark as JSON.
    pub fn describe(&self, name: &str) -> Option<serde_json::Value> {
        let cq = self.inner.read_queries().get(name).cloned()?;
        Some(describe(&cq, now_nanos()))
    }

    /// Every query as [`ContinuousQueries::describe`] shows it.
    pub fn describe_all(&self) -> Vec<serde_json::Value> {
        let now = now_nanos();
        self.inner
            .read_queries()
            .values()
            .map(|cq| describe(cq, now))
            .collect()
    }

    /// Runs query `name` now, after its run in progress if any (runs of one query never
    /// overlap), and returns its status afterwards: InfluxDB 3's request trigger, and how
    /// the allocation loop's tests step its usage queries. `None`: no such query.
    pub async fn run_now(&self, name: &str) -> Option<serde_json::Value> {
        let cq = self.inner.read_queries().get(name).cloned()?;
        {
            let _own = cq.running.lock().await;
            if cq.stopped.load(Ordering::Acquire) {
                // Dropped or replaced while it waited: the new definition, if any, answers.
                return self.describe(name);
            }
            let started = now_nanos();
            let clock = Instant::now();
            let result = self.inner.run_once(&cq).await;
            // A failure here leaves the schedule's back-off as it was.
            let mut backoff = None;
            self.inner
                .record(&cq, result, started, clock.elapsed(), &mut backoff);
        }
        self.describe(name)
    }

    /// Every component's health checks, from the `HEALTH` queries.
    pub fn health(&self) -> Vec<CheckState> {
        self.inner
            .read_queries()
            .values()
            .flat_map(|cq| lock(&cq.state).checks.values().cloned().collect::<Vec<_>>())
            .collect()
    }

    /// A component's worst current health, if any check has judged it.
    pub fn component_health(&self, component: &str) -> Option<HealthStatus> {
        self.health()
            .iter()
            .filter(|c| c.component == component)
            .map(|c| c.status)
            .max()
    }

    /// The queries as a table: `SHOW CONTINUOUS QUERIES` and `system.continuous_queries`.
    pub fn table(&self) -> RecordBatch {
        let now = now_nanos();
        let queries: Vec<Arc<Cq>> = self.inner.read_queries().values().cloned().collect();
        let mut name = Vec::new();
        let mut schedule = Vec::new();
        let mut sink_ = Vec::new();
        let mut watermark = Vec::new();
        let mut lag = Vec::new();
        let mut last_run = Vec::new();
        let mut duration = Vec::new();
        let mut runs = Vec::new();
        let mut failures = Vec::new();
        let mut rows = Vec::new();
        let mut dirty = Vec::new();
        let mut error = Vec::new();
        let mut sql = Vec::new();
        for cq in &queries {
            let (status, wm, nd) = cq.figures();
            let nd = nd as u64;
            name.push(cq.def.name.clone());
            schedule.push(schedule_text(&cq.def));
            sink_.push(cq.def.sink.describe());
            watermark.push(wm);
            lag.push(lag_seconds(&cq.def, wm, status.last_run, now));
            last_run.push(status.last_run);
            duration.push(status.last_duration_seconds);
            runs.push(status.runs);
            failures.push(status.failures);
            rows.push(status.rows_written);
            dirty.push(nd);
            error.push(status.last_error.clone());
            sql.push(cq.def.to_sql());
        }
        let schema = status_schema();
        let columns: Vec<ArrayRef> = vec![
            Arc::new(StringArray::from(name)),
            Arc::new(StringArray::from(schedule)),
            Arc::new(StringArray::from(sink_)),
            Arc::new(TimestampNanosecondArray::from(watermark)),
            Arc::new(Float64Array::from(lag)),
            Arc::new(TimestampNanosecondArray::from(last_run)),
            Arc::new(Float64Array::from(duration)),
            Arc::new(UInt64Array::from(runs)),
            Arc::new(UInt64Array::from(failures)),
            Arc::new(UInt64Array::from(rows)),
            Arc::new(UInt64Array::from(dirty)),
            Arc::new(StringArray::from(error)),
            Arc::new(StringArray::from(sql)),
        ];
        // Cannot fail: the columns are built to the schema above.
        RecordBatch::try_new(schema, columns).expect("status columns match their schema")
    }

    /// The queries' counters in Prometheus' text format.
    pub fn prometheus(&self, out: &mut String) {
        let now = now_nanos();
        let queries: Vec<Arc<Cq>> = self.inner.read_queries().values().cloned().collect();
        let metrics: [(&str, &str, &str); 6] = [
            (
                "forestall_cq_runs_total",
                "counter",
                "Runs of each continuous query.",
            ),
            (
                "forestall_cq_failures_total",
                "counter",
                "Failed runs of each continuous query.",
            ),
            (
                "forestall_cq_rows_written_total",
                "counter",
                "Rows each continuous query wrote to its sink.",
            ),
            (
                "forestall_cq_lag_seconds",
                "gauge",
                "Now minus the query's watermark (or its last run).",
            ),
            (
                "forestall_cq_last_duration_seconds",
                "gauge",
                "How long the query's last run took.",
            ),
            (
                "forestall_cq_dirty_buckets",
                "gauge",
                "Buckets late writes invalidated, waiting for a run.",
            ),
        ];
        for (i, (metric, kind, help)) in metrics.iter().enumerate() {
            let _ = writeln!(out, "# HELP {metric} {help}\n# TYPE {metric} {kind}");
            for cq in &queries {
                let (status, wm, dirty) = cq.figures();
                let value = match i {
                    0 => Some(status.runs as f64),
                    1 => Some(status.failures as f64),
                    2 => Some(status.rows_written as f64),
                    3 => lag_seconds(&cq.def, wm, status.last_run, now),
                    4 => status.last_duration_seconds,
                    _ => Some(dirty as f64),
                };
                if let Some(v) = value {
                    let _ = writeln!(out, "{metric}{{query=\"{}\"}} {v}", cq.def.name);
                }
            }
        }
    }

    /// A handle that does not keep the runtime alive (for the status table, which lives in
    /// the session's catalog, which the runtime's own engine shares).
    pub(crate) fn downgrade(&self) -> WeakQueries {
        WeakQueries(Arc::downgrade(&self.inner))
    }

    /// Stops every query's task and waits for them to end (a run under way finishes first).
    /// Writes are no longer watched once the runtime is dropped.
    pub async fn stop(&self) {
        for cq in self.inner.read_queries().values() {
            cq.stop();
        }
        let tasks = std::mem::take(&mut *lock(&self.inner.tasks));
        for t in tasks {
            let _ = t.await;
        }
    }
}

fn same(a: &Definition, b: &Definition) -> bool {
    let mut a = a.clone();
    let mut b = b.clone();
    a.select_at = None;
    b.select_at = None;
    a == b
}

fn engine_error(e: forestall_engine::Error) -> Error {
    Error::Execution(e.to_string())
}

fn schedule_text(def: &Definition) -> String {
    match def.schedule {
        Schedule::Every(d) => format!("EVERY {}", humantime::format_duration(d)),
        Schedule::OnWrite => "ON WRITE".into(),
    }
}

/// Now minus the watermark for `INTO` queries, now minus the last run for others.
fn lag_seconds(
    def: &Definition,
    watermark: Option<i64>,
    last_run: Option<i64>,
    now: i64,
) -> Option<f64> {
    let since = match def.sink {
        Sink::Into { .. } => watermark,
        _ => last_run,
    }?;
    Some((now - since).max(0) as f64 / 1e9)
}

/// The columns of `SHOW CONTINUOUS QUERIES` and `system.continuous_queries`.
pub fn status_schema() -> SchemaRef {
    let ts = || DataType::Timestamp(TimeUnit::Nanosecond, None);
    Arc::new(Schema::new(vec![
        Field::new("name", DataType::Utf8, false),
        Field::new("schedule", DataType::Utf8, false),
        Field::new("sink", DataType::Utf8, false),
        Field::new("watermark", ts(), true),
        Field::new("lag_seconds", DataType::Float64, true),
        Field::new("last_run", ts(), true),
        Field::new("last_duration_seconds", DataType::Float64, true),
        Field::new("runs", DataType::UInt64, false),
        Field::new("failures", DataType::UInt64, false),
        Field::new("rows_written", DataType::UInt64, false),
        Field::new("dirty_buckets", DataType::UInt64, false),
        Field::new("last_error", DataType::Utf8, true),
        Field::new("query", DataType::Utf8, false),
    ]))
}

fn describe(cq: &Cq, now: i64) -> serde_json::Value {
    let (status, wm, dirty) = cq.figures();
    serde_json::json!({
        "name": cq.def.name,
        "definition": cq.def.to_spec(),
        "sql": cq.def.to_sql(),
        "watermark": wm,
        "lag_seconds": lag_seconds(&cq.def, wm, status.last_run, now),
        "dirty_buckets": dirty,
        "status": status,
    })
}

/// Parses and checks a definition's `SELECT` and builds its registry entry (not running).
fn analyse(def: Definition) -> Result<Cq> {
    let query = parse_select(&def.query, def.select_at)?;
    let sources = sources(&query);
    let incremental = match &def.sink {
        Sink::Into { measurement } => {
            let inc = Incremental::new(query)?;
            if &inc.source == measurement {
                return Err(Error::Query(format!(
                    "continuous query {} reads and writes {measurement}: its own rows would feed it",
                    def.name
                )));
            }
            Some(inc)
        }
        _ => None,
    };
    Ok(Cq {
        def,
        incremental,
        sources,
        state: Mutex::new(State::default()),
        watermark: AtomicI64::new(i64::MIN),
        status: Mutex::new(QueryStatus::default()),
        wake: tokio::sync::Notify::new(),
        stopped: AtomicBool::new(false),
        running: tokio::sync::Mutex::new(()),
    })
}

/// The measurements a query reads: its tables, and the first argument of table functions
/// (`forecast('disk', …)`).
fn sources(query: &Query) -> Vec<String> {
    let mut out = Vec::new();
    collect_sources(&query.body, &mut out);
    out.sort();
    out.dedup();
    out
}

fn collect_sources(body: &SetExpr, out: &mut Vec<String>) {
    match body {
        SetExpr::Select(select) => {
            for from in &select.from {
                for relation in
                    std::iter::once(&from.relation).chain(from.joins.iter().map(|j| &j.relation))
                {
                    match relation {
                        TableFactor::Table {
                            name, args: None, ..
                        } => {
                            if let Some(id) = name.0.last().and_then(|p| p.as_ident()) {
                                out.push(id.value.clone());
                            }
                        }
                        TableFactor::Table {
                            args: Some(args), ..
                        } => {
                            if let Some(FunctionArg::Unnamed(FunctionArgExpr::Expr(Expr::Value(v)))) =
                                args.args.first()
                                && let Value::SingleQuotedString(s) = &v.value
                            {
                                out.push(s.clone());
                            }
                        }
                        TableFactor::Derived { subquery, .. } => {
                            collect_sources(&subquery.body, out)
                        }
                        _ => {}
                    }
                }
            }
        }
        SetExpr::Query(q) => collect_sources(&q.body, out),
        SetExpr::SetOperation { left, right, .. } => {
            collect_sources(left, out);
            collect_sources(right, out);
        }
        _ => {}
    }
}

impl Cq {
    /// Its status, watermark and dirty buckets (those being recomputed included).
    fn figures(&self) -> (QueryStatus, Option<i64>, usize) {
        let status = lock(&self.status).clone();
        let st = lock(&self.state);
        (status, st.watermark, st.dirty.len() + st.in_flight.len())
    }

    fn stop(&self) {
        self.stopped.store(true, Ordering::Release);
        self.wake.notify_one();
    }
}

impl Inner {
    fn read_queries(&self) -> std::sync::RwLockReadGuard<'_, BTreeMap<String, Arc<Cq>>> {
        self.queries.read().unwrap_or_else(|e| e.into_inner())
    }

    fn rebuild_sources(&self) {
        let mut map: HashMap<String, Vec<Arc<Cq>>> = HashMap::new();
        for cq in self.read_queries().values() {
            if cq.incremental.is_some() || cq.def.schedule == Schedule::OnWrite {
                for s in &cq.sources {
                    map.entry(s.clone()).or_default().push(Arc::clone(cq));
                }
            }
        }
        *self.by_source.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(map);
    }

    /// A new query's first state: an `INTO` query starts at its backfill start, or at the
    /// bucket of `now − lateness`.
    fn initialise(&self, cq: &Cq, now: i64) {
        let Some(inc) = &cq.incremental else { return };
        let start = match &cq.def.backfill {
            Some(b) => backfill_start(b, now).unwrap_or(now),
            None => now - nanos(cq.def.lateness),
        };
        let wm = inc.bucket.floor(start);
        *lock(&cq.state) = State {
            watermark: Some(wm),
            ..Default::default()
        };
        cq.watermark.store(wm, Ordering::Release);
    }

    /// Plans the query once, so that a definition whose SQL cannot run is refused. A query
    /// over a measurement nobody has written yet cannot be planned; it is accepted, and its
    /// runs say so until the measurement exists.
    async fn check_plan(&self, cq: &Cq) -> Result<()> {
        let sql = self.run_sql(cq, 0, 1);
        let engine = self.engine.clone();
        let planned = self
            .engine
            .run(async move {
                let df = engine.session().sql(&sql).await?;
                Ok::<_, Error>(Arc::new(df.schema().as_arrow().clone()))
            })
            .await?;
        let schema = match planned {
            Ok(s) => s,
            Err(Error::Query(m)) if m.contains("not found") && m.contains("table") => {
                let missing: Vec<&String> = cq
                    .sources
                    .iter()
                    .filter(|s| self.store.table(s).is_none())
                    .collect();
                if missing.is_empty() {
                    return Err(Error::Query(m));
                }
                return Ok(());
            }
            // Queries declared ahead of their data (the config's, Forestall's own) may name a
            // field no write has brought yet: they wait for it. One typed in is refused, as
            // a field that does not exist is most likely a typo.
            Err(Error::Query(m))
                if (cq.def.from_config || cq.def.builtin)
                    && self.missing_field(cq, &m).is_some() =>
            {
                return Ok(());
            }
            Err(e) => return Err(e),
        };
        match &cq.def.sink {
            Sink::Into { .. } => {
                let keys = cq
                    .incremental
                    .as_ref()
                    .map(|i| i.keys.clone())
                    .unwrap_or_default();
                sink::kinds(&schema, &keys)?;
            }
            Sink::Health { .. } => {
                if schema.field_with_name("component").is_err() {
                    return Err(Error::Query(
                        "a HEALTH query names each row's component: SELECT host AS component, …"
                            .into(),
                    ));
                }
                for c in ["__forestall_warn", "__forestall_fail"] {
                    let t = schema.field_with_name(c).map(|f| f.data_type().clone());
                    if !matches!(t, Ok(DataType::Boolean | DataType::Null)) {
                        return Err(Error::Query(
                            "WARN WHEN and FAIL WHEN take conditions (true or false), such as value > 90".into(),
                        ));
                    }
                }
            }
            Sink::Allocate => {
                for c in ["component", "resource"] {
                    if !schema
                        .field_with_name(c)
                        .is_ok_and(|f| sink::is_string(f.data_type()))
                    {
                        return Err(Error::Query(format!(
                            "an ALLOCATE query gives each row's {c} as a string: SELECT host AS component, 'cpu' AS resource, …"
                        )));
                    }
                }
                let numeric = |c: &str| {
                    schema.field_with_name(c).is_ok_and(|f| {
                        f.data_type().is_numeric() || f.data_type() == &DataType::Null
                    })
                };
                if !ALLOCATION_AMOUNTS.iter().any(|c| numeric(c)) {
                    return Err(Error::Query(
                        "an ALLOCATE query gives each row an amount as a number: usage, demand or forecast (with risk)".into(),
                    ));
                }
                for c in ALLOCATION_AMOUNTS.iter().chain(&["risk"]) {
                    if schema.field_with_name(c).is_ok() && !numeric(c) {
                        return Err(Error::Query(format!(
                            "the column {c} of an ALLOCATE query is a number"
                        )));
                    }
                }
            }
            Sink::Notify { .. } => {
                let t = schema
                    .field_with_name("__forestall_when")
                    .map(|f| f.data_type().clone());
                if !matches!(t, Ok(DataType::Boolean | DataType::Null)) {
                    return Err(Error::Query(
                        "NOTIFY … WHEN takes a condition (true or false), such as value > 90"
                            .into(),
                    ));
                }
            }
        }
        Ok(())
    }

    /// The SQL one run executes: the window of an `INTO` query, or the query with its
    /// conditions as extra columns.
    fn run_sql(&self, cq: &Cq, start: i64, end: i64) -> String {
        let cond = |c: &Option<String>| c.clone().unwrap_or_else(|| "false".into());
        match &cq.def.sink {
            Sink::Into { .. } => match &cq.incremental {
                Some(inc) => inc.window_sql(start, end),
                None => cq.def.query.clone(),
            },
            Sink::Health { warn, fail, .. } => format!(
                "SELECT *, ({}) AS \"__forestall_warn\", ({}) AS \"__forestall_fail\" FROM ({}) AS \"__forestall_q\"",
                cond(warn),
                cond(fail),
                cq.def.query
            ),
            Sink::Notify { when, .. } => format!(
                "SELECT *, ({}) AS \"__forestall_when\" FROM ({}) AS \"__forestall_q\"",
                when.clone().unwrap_or_else(|| "true".into()),
                cq.def.query
            ),
            Sink::Allocate => cq.def.query.clone(),
        }
    }

    fn spawn(self: &Arc<Self>, cq: Arc<Cq>) {
        let inner = Arc::clone(self);
        let task = self.handle.spawn(async move { inner.drive(cq).await });
        let mut tasks = lock(&self.tasks);
        tasks.retain(|t| !t.is_finished());
        tasks.push(task);
    }

    /// A query's task: wait for its time (or a write), run, back off after failures.
    async fn drive(self: Arc<Self>, cq: Arc<Cq>) {
        let mut backoff: Option<Duration> = None;
        // A rollup that is behind (a backfill, or a restart after a while) starts at once.
        let mut behind = cq.incremental.as_ref().is_some_and(|inc| {
            let end = inc
                .bucket
                .floor(now_nanos().saturating_sub(nanos(cq.def.lateness)));
            cq.watermark.load(Ordering::Acquire) < end
        });
        loop {
            if cq.stopped.load(Ordering::Acquire) {
                return;
            }
            let wait = match (backoff, cq.def.schedule) {
                _ if std::mem::take(&mut behind) => Some(Duration::ZERO),
                (Some(b), _) => Some(b),
                (None, Schedule::Every(every)) => {
                    Some(until_tick(now_nanos(), every, cq.def.lateness))
                }
                (None, Schedule::OnWrite) => None,
            };
            match wait {
                Some(d) => {
                    tokio::select! {
                        _ = tokio::time::sleep(d) => {}
                        _ = cq.wake.notified() => {}
                    }
                }
                None => cq.wake.notified().await,
            }
            if cq.stopped.load(Ordering::Acquire) {
                return;
            }
            // A backfill goes on chunk after chunk without waiting for the next tick.
            loop {
                let _own = cq.running.lock().await;
                if cq.stopped.load(Ordering::Acquire) {
                    return;
                }
                let started = now_nanos();
                let clock = Instant::now();
                let result = self.run_once(&cq).await;
                let more = self.record(&cq, result, started, clock.elapsed(), &mut backoff);
                if !more || cq.stopped.load(Ordering::Acquire) {
                    break;
                }
                tokio::task::yield_now().await;
            }
        }
    }

    /// Records a run's outcome in the query's status and sets the back-off after a failure.
    /// Returns whether the query has more to catch up at once.
    fn record(
        &self,
        cq: &Cq,
        result: Result<(usize, bool)>,
        started: i64,
        took: Duration,
        backoff: &mut Option<Duration>,
    ) -> bool {
        let mut status = lock(&cq.status);
        status.runs += 1;
        status.last_run = Some(started);
        status.last_duration_seconds = Some(took.as_secs_f64());
        match result {
            Ok((rows, more)) => {
                status.rows_written += rows as u64;
                status.last_error = None;
                status.consecutive_failures = 0;
                *backoff = None;
                more
            }
            Err(e) => {
                status.failures += 1;
                status.consecutive_failures += 1;
                if status.consecutive_failures == 1 {
                    tracing::warn!(query = %cq.def.name, error = %e, "continuous query failed; backing off");
                }
                status.last_error = Some(e.to_string());
                let base = match cq.def.schedule {
                    Schedule::Every(d) => d,
                    Schedule::OnWrite => Duration::from_secs(1),
                };
                let factor = 1u32 << (status.consecutive_failures - 1).min(16);
                *backoff = Some(base.saturating_mul(factor).min(MAX_BACKOFF));
                false
            }
        }
    }

    /// One run. Returns the rows written, and whether an `INTO` query has more to catch up.
    async fn run_once(&self, cq: &Cq) -> Result<(usize, bool)> {
        match &cq.def.sink {
            Sink::Into { measurement } => self.run_into(cq, measurement).await,
            Sink::Health { warn, fail, hold } => self
                .run_health(
                    cq,
                    health::Check {
                        name: &cq.def.name,
                        warn,
                        fail,
                        hold: *hold,
                    },
                )
                .await
                .map(|n| (n, false)),
            Sink::Notify { url, hold, .. } => {
                self.run_notify(cq, url, *hold).await.map(|n| (n, false))
            }
            Sink::Allocate => self.run_allocate(cq).await.map(|n| (n, false)),
        }
    }

    /// Runs one of `cq`'s statements. A measurement it reads that nobody has written yet
    /// gives no rows (noted in its status), not an error: its data has not come yet.
    async fn query(&self, cq: &Cq, sql: String) -> Result<(SchemaRef, Vec<RecordBatch>)> {
        let engine = self.engine.clone();
        let result = match self
            .engine
            .run(async move { engine.plan(&sql).await })
            .await?
        {
            Ok(planned) => {
                let schema = Arc::clone(&planned.schema);
                self.passes
                    .run(&self.engine, &self.store, planned)
                    .await
                    .map(|batches| (schema, batches))
            }
            Err(e) => Err(e),
        };
        let note = match &result {
            // The source the error names, or one still missing: the first write may have
            // created it since the run planned.
            Err(Error::Query(m)) if m.contains("not found") && m.contains("table") => cq
                .sources
                .iter()
                .find(|s| m.contains(&format!(".{s}'")) || self.store.table(s).is_none())
                .map(|s| format!("waiting for data: nothing has been written to {s} yet")),
            Err(Error::Query(m)) if m.contains("No field named") => {
                self.missing_field(cq, m).map(|(field, table)| {
                    format!("waiting for data: no {field} has been written to {table} yet")
                })
            }
            _ => None,
        };
        lock(&cq.status).note = note.clone();
        match (result, note) {
            (Err(_), Some(_)) => Ok((Arc::new(Schema::empty()), Vec::new())),
            (result, _) => result,
        }
    }

    /// The field a "No field named" error names, and the source measurement it is missing
    /// from (a tag or field that no write has brought yet), if that is what happened.
    fn missing_field(&self, cq: &Cq, message: &str) -> Option<(String, String)> {
        let rest = message.split("No field named ").nth(1)?;
        let name: String = rest
            .trim_start_matches('"')
            .chars()
            .take_while(|c| !matches!(c, '"' | '\'' | ',') && !c.is_whitespace())
            .collect();
        let name = name.trim_end_matches('.');
        let field = name.rsplit('.').next().unwrap_or(name).to_owned();
        let table = cq.sources.iter().find(|s| {
            self.store
                .table(s)
                .is_some_and(|t| !t.columns.contains_key(&field))
        })?;
        Some((field, table.clone()))
    }

    /// Writes line protocol through the store's write path, durably.
    async fn write(&self, text: String) -> Result<()> {
        if text.is_empty() {
            return Ok(());
        }
        let store = Arc::clone(&self.store);
        let outcome = tokio::task::spawn_blocking(move || {
            store.write(text.as_bytes(), Precision::Nanoseconds, now_nanos())
        })
        .await
        .map_err(|e| Error::Execution(format!("sink write task failed: {e}")))?
        .map_err(engine_error)?;
        if outcome.rejected_lines > 0 {
            let first = outcome
                .errors
                .first()
                .map(|e| e.reason.clone())
                .unwrap_or_default();
            return Err(Error::Execution(format!(
                "the sink refused {} of its rows: {first}",
                outcome.rejected_lines
            )));
        }
        Ok(())
    }

    async fn run_into(&self, cq: &Cq, measurement: &str) -> Result<(usize, bool)> {
        let Some(inc) = &cq.incremental else {
            return Ok((0, false));
        };
        let width = inc.bucket.width;
        let now = now_nanos();
        let end = inc.bucket.floor(now.saturating_sub(nanos(cq.def.lateness)));
        let (wm, taken) = {
            let mut st = lock(&cq.state);
            let wm = st.watermark.unwrap_or(end);
            let taken: Vec<i64> = st.dirty.iter().copied().take(MAX_DIRTY_PER_RUN).collect();
            for b in &taken {
                st.dirty.remove(b);
                st.in_flight.insert(*b);
            }
            (wm, taken)
        };
        let chunk = (CHUNK_BUCKETS * width).max((CHUNK_MIN + width - 1) / width * width);
        let new_wm = if wm < end {
            end.min(wm.saturating_add(chunk))
        } else {
            wm
        };
        // Buckets to compute: the dirty ones below the watermark, merged into ranges, then the
        // new ones. An on-write query also computes the open buckets up to now, so the sink
        // follows the writes; they are recomputed until they close.
        let mut windows: Vec<(i64, i64)> = Vec::new();
        for b in taken.iter().copied().filter(|b| *b < wm) {
            match windows.last_mut() {
                Some((_, e)) if *e == b => *e = b + width,
                _ => windows.push((b, b + width)),
            }
        }
        let compute_to = match cq.def.schedule {
            Schedule::OnWrite if new_wm == end => inc.bucket.floor(now) + width,
            _ => new_wm,
        };
        if wm < compute_to {
            windows.push((wm, compute_to));
        }
        let result = self.materialise(cq, inc, measurement, &windows).await;
        let mut st = lock(&cq.state);
        let rows = match result {
            Ok(rows) => rows,
            Err(e) => {
                let back: Vec<i64> = std::mem::take(&mut st.in_flight).into_iter().collect();
                st.dirty.extend(back);
                return Err(e);
            }
        };
        forestall_engine::pause_point("cq-before-watermark");
        st.in_flight.clear();
        let previous = st.watermark;
        st.watermark = Some(new_wm);
        if let Err(e) = self
            .entries
            .put(&[(format!("{STATE_PREFIX}{}", cq.def.name), Some(st.encode()))])
        {
            // The rows are durable; the same buckets are computed again next time.
            st.watermark = previous;
            st.dirty.extend(taken);
            return Err(engine_error(e));
        }
        cq.watermark.store(new_wm, Ordering::Release);
        Ok((rows, new_wm < end))
    }

    async fn materialise(
        &self,
        cq: &Cq,
        inc: &Incremental,
        measurement: &str,
        windows: &[(i64, i64)],
    ) -> Result<usize> {
        let mut rows = 0;
        let mut text = String::new();
        for &(start, end) in windows {
            if cq.stopped.load(Ordering::Acquire) {
                return Err(Error::Execution("stopped".into()));
            }
            let (schema, batches) = self.query(cq, self.run_sql(cq, start, end)).await?;
            if batches.is_empty() {
                continue;
            }
            let kinds = sink::kinds(&schema, &inc.keys)?;
            for batch in &batches {
                rows += sink::encode(&mut text, measurement, batch, &kinds)?;
                if text.len() >= WRITE_BYTES {
                    self.write(std::mem::take(&mut text)).await?;
                }
            }
        }
        self.write(text).await?;
        Ok(rows)
    }

    async fn run_health(&self, cq: &Cq, check: health::Check<'_>) -> Result<usize> {
        let (_, batches) = self.query(cq, self.run_sql(cq, 0, 0)).await?;
        let now = now_nanos();
        let mut next: BTreeMap<String, CheckState> = BTreeMap::new();
        let previous = lock(&cq.state).checks.clone();
        let mut text = String::new();
        for batch in &batches {
            let schema = batch.schema();
            let (component_at, warn_at, fail_at, value_at) = health_columns(&schema)?;
            let columns = read_columns(batch)?;
            for row in 0..batch.num_rows() {
                let Some(component) = columns[component_at]
                    .as_ref()
                    .and_then(|(c, _)| text_at(c, row))
                else {
                    continue;
                };
                let labels: Vec<(String, String)> = columns
                    .iter()
                    .enumerate()
                    .filter(|(i, _)| *i != component_at)
                    .filter_map(|(i, c)| {
                        let (c, kind) = c.as_ref()?;
                        (*kind == Kind::Text)
                            .then(|| Some((schema.field(i).name().clone(), text_at(c, row)?)))?
                    })
                    .collect();
                let flag = |at: usize| {
                    columns[at]
                        .as_ref()
                        .and_then(|(c, _)| match c {
                            Column::Bool(b) => b.is_valid(row).then(|| b.value(row)),
                            _ => None,
                        })
                        .unwrap_or(false)
                };
                let seen = Observation {
                    warn: flag(warn_at),
                    fail: flag(fail_at),
                    value: value_at
                        .and_then(|i| columns[i].as_ref())
                        .and_then(|(c, _)| c.number(row)),
                };
                let key = check_key(&component, &labels);
                let state =
                    health::step(&check, previous.get(&key), &component, labels, &seen, now);
                let changed = previous.get(&key).is_none_or(|p| p.status != state.status);
                health_line(&mut text, &state, changed, now);
                next.insert(key, state);
            }
        }
        let rows = next.len();
        self.write(text).await?;
        let mut st = lock(&cq.state);
        st.checks = next;
        self.entries
            .put(&[(format!("{STATE_PREFIX}{}", cq.def.name), Some(st.encode()))])
            .map_err(engine_error)?;
        Ok(rows)
    }

    async fn run_allocate(&self, cq: &Cq) -> Result<usize> {
        let (_, batches) = self.query(cq, self.run_sql(cq, 0, 0)).await?;
        let mut requests = Vec::new();
        for batch in &batches {
            let schema = batch.schema();
            let at = |c: &str| schema.index_of(c).ok();
            let (Some(component_at), Some(resource_at)) = (at("component"), at("resource")) else {
                return Err(Error::Query(
                    "an ALLOCATE query gives each row's component and resource".into(),
                ));
            };
            let [usage_at, demand_at, forecast_at, risk_at] =
                ["usage", "demand", "forecast", "risk"].map(at);
            let columns = read_columns(batch)?;
            let number = |i: Option<usize>, row: usize| {
                i.and_then(|i| columns[i].as_ref())
                    .and_then(|(c, _)| c.number(row))
                    .filter(|v| v.is_finite())
            };
            for row in 0..batch.num_rows() {
                let text = |i: usize| columns[i].as_ref().and_then(|(c, _)| text_at(c, row));
                let named = |i| text(i).filter(|t: &String| !t.is_empty());
                let (Some(component), Some(resource)) = (named(component_at), named(resource_at))
                else {
                    continue;
                };
                let request = AllocationRequest {
                    component,
                    resource,
                    usage: number(usage_at, row),
                    demand: number(demand_at, row),
                    forecast: number(forecast_at, row),
                    risk: number(risk_at, row).map(|r| r.clamp(0.0, 1.0)),
                };
                if request.usage.is_some() || request.demand.is_some() || request.forecast.is_some()
                {
                    requests.push(request);
                }
            }
        }
        let n = requests.len();
        let now = now_nanos();
        let mut record = String::new();
        for r in &requests {
            request_line(&mut record, &cq.def.name, r, now);
        }
        self.write(record).await?;
        self.deliver(&cq.def.name, requests).await?;
        Ok(n)
    }

    async fn deliver(&self, query: &str, requests: Vec<AllocationRequest>) -> Result<()> {
        match &self.actions {
            Some(a) => a
                .allocate(query, requests)
                .await
                .map_err(|e| Error::Execution(format!("allocation requests refused: {e}"))),
            None => Err(Error::Execution(
                "no allocation loop takes requests here".into(),
            )),
        }
    }

    async fn run_notify(&self, cq: &Cq, url: &str, hold: Duration) -> Result<usize> {
        let (_, batches) = self.query(cq, self.run_sql(cq, 0, 0)).await?;
        let now = now_nanos();
        let mut holding: BTreeMap<String, KeyedRow> = BTreeMap::new();
        for batch in &batches {
            let schema = batch.schema();
            let when_at = schema
                .index_of("__forestall_when")
                .map_err(|e| Error::Execution(e.to_string()))?;
            let columns = read_columns(batch)?;
            for row in 0..batch.num_rows() {
                let holds = matches!(&columns[when_at], Some((Column::Bool(b), _)) if b.is_valid(row) && b.value(row));
                if !holds {
                    continue;
                }
                let mut key = BTreeMap::new();
                let mut values = BTreeMap::new();
                for (i, c) in columns.iter().enumerate() {
                    let name = schema.field(i).name();
                    let Some((c, kind)) = c else { continue };
                    if name.starts_with("__forestall") {
                        continue;
                    }
                    if *kind == Kind::Text {
                        if let Some(v) = text_at(c, row) {
                            key.insert(name.clone(), v);
                        }
                    } else {
                        values.insert(name.clone(), c.json(row));
                    }
                }
                let id = serde_json::to_string(&key).unwrap_or_default();
                holding.insert(id, (key, values));
            }
        }
        let mut firing = lock(&cq.state).firing.clone();
        let mut events = Vec::new();
        let hold = nanos(hold);
        for (id, (key, values)) in &holding {
            let f = firing.entry(id.clone()).or_insert_with(|| Firing {
                since: now,
                notified: false,
                key: key.clone(),
                values: BTreeMap::new(),
            });
            f.values = values.clone();
            if !f.notified && now - f.since >= hold {
                events.push((id.clone(), "firing"));
            }
        }
        for (id, f) in &firing {
            if !holding.contains_key(id) {
                events.push((id.clone(), if f.notified { "resolved" } else { "" }));
            }
        }
        let mut sent = 0;
        let mut failed = None;
        for (id, status) in events {
            if status.is_empty() {
                firing.remove(&id);
                continue;
            }
            let Some(f) = firing.get(&id) else { continue };
            let event = Notification {
                query: cq.def.name.clone(),
                status: status.into(),
                key: f.key.clone(),
                values: f.values.clone(),
                since: f.since,
                at: now,
            };
            let delivered = match &self.actions {
                Some(a) => a.notify(url, &event).await,
                None => Err("no notifier is configured".into()),
            };
            match delivered {
                Ok(()) => {
                    sent += 1;
                    if status == "resolved" {
                        firing.remove(&id);
                    } else if let Some(f) = firing.get_mut(&id) {
                        f.notified = true;
                    }
                }
                Err(e) => failed = Some(e),
            }
        }
        let mut st = lock(&cq.state);
        st.firing = firing;
        self.entries
            .put(&[(format!("{STATE_PREFIX}{}", cq.def.name), Some(st.encode()))])
            .map_err(engine_error)?;
        match failed {
            Some(e) => Err(Error::Execution(format!("notify {url}: {e}"))),
            None => Ok(sent),
        }
    }

    /// Marks the buckets that `lines` change below their queries' watermarks as dirty, and
    /// stores the marks when any is new.
    fn invalidate(&self, lines: &[ParsedLine<'_>]) -> std::result::Result<(), String> {
        let map = Arc::clone(&self.by_source.read().unwrap_or_else(|e| e.into_inner()));
        if map.is_empty() {
            return Ok(());
        }
        let mut late: HashMap<&str, (Arc<Cq>, BTreeSet<i64>)> = HashMap::new();
        // The measurement of the previous line, its queries, and the latest of their
        // watermarks: a line at or after it is late for none of them, which is one comparison
        // for in-order ingestion however many rollups read the measurement.
        let mut last: Option<(&str, &[Arc<Cq>], i64)> = None;
        for line in lines {
            let m = line.measurement.as_ref();
            let (cqs, newest) = match last {
                Some((lm, cqs, newest)) if lm == m => (cqs, newest),
                _ => {
                    let cqs = map.get(m).map_or(&[][..], Vec::as_slice);
                    let newest = cqs
                        .iter()
                        .filter(|cq| cq.incremental.is_some())
                        .map(|cq| cq.watermark.load(Ordering::Acquire))
                        .max()
                        .unwrap_or(i64::MIN);
                    last = Some((m, cqs, newest));
                    (cqs, newest)
                }
            };
            if line.timestamp >= newest {
                continue;
            }
            for cq in cqs {
                let Some(inc) = &cq.incremental else { continue };
                if line.timestamp < cq.watermark.load(Ordering::Acquire) {
                    late.entry(cq.def.name.as_str())
                        .or_insert_with(|| (Arc::clone(cq), BTreeSet::new()))
                        .1
                        .insert(inc.bucket.floor(line.timestamp));
                }
            }
        }
        for (cq, buckets) in late.into_values() {
            let mut st = lock(&cq.state);
            let wm = st.watermark.unwrap_or(i64::MIN);
            let mut added = false;
            for b in buckets {
                if b < wm && st.dirty.insert(b) {
                    added = true;
                }
            }
            if added {
                self.entries
                    .put(&[(format!("{STATE_PREFIX}{}", cq.def.name), Some(st.encode()))])
                    .map_err(|e| {
                        format!("record late data for continuous query {}: {e}", cq.def.name)
                    })?;
            }
        }
        Ok(())
    }

    /// Wakes the on-write queries that read what `lines` wrote.
    fn trigger(&self, lines: &[ParsedLine<'_>]) {
        let map = Arc::clone(&self.by_source.read().unwrap_or_else(|e| e.into_inner()));
        if map.is_empty() {
            return;
        }
        let mut seen: Option<&str> = None;
        for line in lines {
            let m = line.measurement.as_ref();
            if seen == Some(m) {
                continue;
            }
            seen = Some(m);
            for cq in map.get(m).into_iter().flatten() {
                if cq.def.schedule == Schedule::OnWrite {
                    cq.wake.notify_one();
                }
            }
        }
    }
}

/// How long until the next run of a query scheduled every `every`: runs fall on multiples of
/// `every` (since the epoch) plus the lateness, when a bucket of that width has just closed.
fn until_tick(now: i64, every: Duration, lateness: Duration) -> Duration {
    let e = nanos(every).max(1);
    let l = nanos(lateness);
    let next = (now - l)
        .div_euclid(e)
        .saturating_add(1)
        .saturating_mul(e)
        .saturating_add(l);
    Duration::from_nanos((next - now).max(0) as u64)
}

/// Where a `HEALTH` query's batch has its component, its two conditions and its value (the
/// `value` column, else the first number).
fn health_columns(schema: &Schema) -> Result<(usize, usize, usize, Option<usize>)> {
    let component = schema.index_of("component").map_err(|_| {
        Error::Query(
            "a HEALTH query names each row's component: SELECT host AS component, …".into(),
        )
    })?;
    let internal = |c: &str| {
        schema
            .index_of(c)
            .map_err(|e| Error::Execution(e.to_string()))
    };
    let value = schema.index_of("value").ok().or_else(|| {
        schema
            .fields()
            .iter()
            .position(|f| f.data_type().is_numeric() && !f.name().starts_with("__forestall"))
    });
    Ok((
        component,
        internal("__forestall_warn")?,
        internal("__forestall_fail")?,
        value,
    ))
}

/// The key a check's state is kept under: its component and labels.
fn check_key(component: &str, labels: &[(String, String)]) -> String {
    let mut key = component.to_owned();
    for (k, v) in labels {
        key.push('\u{1f}');
        key.push_str(k);
        key.push('=');
        key.push_str(v);
    }
    key
}

/// A `forestall_health` row.
fn health_line(out: &mut String, state: &CheckState, changed: bool, now: i64) {
    sink::escape_measurement(out, HEALTH_MEASUREMENT);
    out.push_str(",check=");
    sink::escape_key(out, &state.check);
    out.push_str(",component=");
    sink::escape_key(out, &state.component);
    for (k, v) in &state.labels {
        if !v.is_empty() && k != "check" && k != "component" {
            out.push(',');
            sink::escape_key(out, k);
            out.push('=');
            sink::escape_key(out, v);
        }
    }
    let level = match state.status {
        HealthStatus::Pass => 0,
        HealthStatus::Warn => 1,
        HealthStatus::Fail => 2,
    };
    let _ = write!(
        out,
        " status=\"{}\",level={level}i,changed={changed},reason=\"",
        state.status.as_str()
    );
    sink::escape_string(out, &state.reason);
    out.push('"');
    if let Some(v) = state.value.filter(|v| v.is_finite()) {
        let _ = write!(out, ",value={v:?}");
    }
    let _ = writeln!(out, " {now}");
}

/// A `forestall_allocation_requests` row.
fn request_line(out: &mut String, query: &str, r: &AllocationRequest, now: i64) {
    sink::escape_measurement(out, REQUESTS_MEASUREMENT);
    for (k, v) in [
        ("component", r.component.as_str()),
        ("query", query),
        ("resource", r.resource.as_str()),
    ] {
        out.push(',');
        out.push_str(k);
        out.push('=');
        sink::escape_key(out, v);
    }
    let mut sep = ' ';
    for (k, v) in [
        ("usage", r.usage),
        ("demand", r.demand),
        ("forecast", r.forecast),
        ("risk", r.risk),
    ] {
        if let Some(v) = v.filter(|v| v.is_finite()) {
            let _ = write!(out, "{sep}{k}={v:?}");
            sep = ',';
        }
    }
    let _ = writeln!(out, " {now}");
}

/// Every column of `batch` readable as a row value, with its kind (`None`: a type that is
/// not read).
fn read_columns(batch: &RecordBatch) -> Result<Vec<Option<(Column, Kind)>>> {
    batch
        .columns()
        .iter()
        .map(|a| {
            let kind = match a.data_type() {
                t if sink::is_string(t) => Kind::Text,
                DataType::Boolean => Kind::Bool,
                DataType::Int8 | DataType::Int16 | DataType::Int32 | DataType::Int64 => Kind::Int,
                DataType::UInt8 | DataType::UInt16 | DataType::UInt32 | DataType::UInt64 => {
                    Kind::UInt
                }
                t if t.is_numeric() => Kind::Float,
                DataType::Timestamp(..) => Kind::Time,
                _ => return Ok(None),
            };
            Ok(Some((sink::column(a, kind)?, kind)))
        })
        .collect()
}

fn text_at(c: &Column, row: usize) -> Option<String> {
    match c {
        Column::Text(a) if a.is_valid(row) => Some(a.value(row).to_owned()),
        _ => None,
    }
}

/// A [`ContinuousQueries`] that may be gone.
#[derive(Debug, Clone)]
pub(crate) struct WeakQueries(Weak<Inner>);

impl WeakQueries {
    pub(crate) fn upgrade(&self) -> Option<ContinuousQueries> {
        self.0.upgrade().map(|inner| ContinuousQueries { inner })
    }
}

/// Hears the store's writes for the runtime; does nothing once the runtime is gone.
#[derive(Debug)]
struct Observer(Weak<Inner>);

impl WriteObserver for Observer {
    fn admitted(&self, lines: &[ParsedLine<'_>]) -> std::result::Result<(), String> {
        match self.0.upgrade() {
            Some(inner) => inner.invalidate(lines),
            None => Ok(()),
        }
    }

    fn committed(&self, lines: &[ParsedLine<'_>]) {
        let Some(inner) = self.0.upgrade() else {
            return;
        };
        // A run that took a bucket's dirty mark, or moved the watermark past a point, while
        // this write was on its way to the buffer may not have seen it: mark it again.
        if let Err(e) = inner.invalidate(lines) {
            tracing::error!(error = %e, "could not record late data after a write");
        }
        inner.trigger(lines);
    }
}
