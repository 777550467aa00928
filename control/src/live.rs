//! The live allocation loop, which `serve` runs ([`run`]). In each `[allocation] interval`:
//!
//! 1. **Meter** (at the interval's start, with `collect`): each component's cgroup counters
//!    ([`Meter`]) become a row of `forestall_usage,component=<name>`: `cpu` (cores), `mem`
//!    (bytes of working set), `disk` (bytes/s) and `net` (bytes/s sent and received in the
//!    component's own network namespaces; none for a component in Forestall's namespace,
//!    whose traffic cannot be told apart).
//! 2. **Usage queries** (a quarter in): the `ALLOCATE` continuous queries deliver their rows
//!    ([`Allocations::offer`]): the built-in usage queries ([`crate::usage`]), and any of the
//!    user's, which may add demands, forecasts and risks from their own signals.
//! 3. **Round** (half way): one [`Controller`] round (forecast, size, allocate) over what
//!    was delivered, applied through the actuator plugins; every decision is a row of
//!    `forestall_allocations`.
//!
//! * **Units**: CPU in cores, memory in bytes, network and disk in bytes per second.
//! * **Dry-run** (`actuate = false`, the default): the engine runs and audits as it would
//!   live, and a [`DryRun`] actuator records what would be applied; nothing is changed.
//! * **Preferences** set over the HTTP API are kept in
//!   `<data_dir>/allocation/preferences.json` (written atomically) and win over the
//!   configuration file's.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use forestall_actuators::alloc::{Action, Component, Engine, PerResource, Resource};
use forestall_actuators::cgroup_v1::CgroupV1;
use forestall_actuators::cgroup_v2::CgroupV2;
use forestall_actuators::sched::Scheduling;
use forestall_actuators::stack::{Stack, Units};
use forestall_actuators::tc::TrafficControl;
use forestall_actuators::webhook::Webhook;
use forestall_actuators::{Actuator, DryRun, Meter, Usage};
use forestall_engine::Store;
use forestall_engine::line_protocol::{FieldValue, Precision, write_point};
use forestall_engine::store::now_nanos;
use forestall_models::risk::Health;
use forestall_query::QueryEngine;
use forestall_query::continuous::HealthStatus;
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::config::*;
use crate::round::{self as control, Controller, Learned, RoundReport};
use crate::usage;

/// How often the learned state is written while the loop runs: a crash loses at most this
/// much learning (about 5.5 KB per component each time with a five-round horizon, most of it
/// the risk tables and the evidence waiting for its outcome).
pub const SAVE_EVERY: Duration = Duration::from_secs(300);

/// The measurement the collector writes usage to.
pub const USAGE_MEASUREMENT: &str = "forestall_usage";
/// The measurement every allocation decision is stored in.
pub const AUDIT_MEASUREMENT: &str = "forestall_allocations";

/// The live loop's state, shared between its task and the HTTP API.
#[derive(Clone)]
pub struct Allocations {
    inner: Arc<Mutex<Live>>,
    /// Rung when an allocation query delivers a demand: the loop raises at once what it
    /// asks for beyond the allocation, without waiting for the next round.
    asked: Arc<tokio::sync::Notify>,
}

impl std::fmt::Debug for Allocations {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Allocations").finish_non_exhaustive()
    }
}

/// What can go wrong for a component, each cleared by its own next success.
#[derive(Debug, Clone, Copy)]
enum Problem {
    Metering = 0,
    Applying = 1,
}

struct Live {
    config: AllocationConfig,
    controller: Controller,
    meter: Option<Box<dyn Meter>>,
    /// The previous meter reading of each component, for rates.
    samples: Vec<Option<(Instant, Usage)>>,
    /// The latest problem per component, of each [`Problem`] kind; cleared by success.
    problems: Vec<[Option<String>; 2]>,
    round: u64,
    /// When the last round ran (ns since the epoch).
    last_round: Option<i64>,
    /// The latest usage each component was seen with.
    usage: Vec<PerResource<f64>>,
    /// Preferences set over the API, by component: persisted here.
    saved: BTreeMap<String, PreferencesConfig>,
    /// Where the learned state is kept.
    state_path: PathBuf,
    /// When it was last written.
    last_saved: Option<Instant>,
    saved_path: PathBuf,
    /// What each allocation query (`ALLOCATE` sink) asked for at its last run, by query.
    signals: BTreeMap<String, Vec<Signal>>,
    /// Whether allocations reach the kernel (the plugins) or only the dry-run recorder.
    actuating: bool,
    /// The actuator not in use: the dry-run recorder while actuating, the plugins otherwise.
    standby: Box<dyn Actuator>,
    /// Where the choice made over the API is kept.
    actuation_path: PathBuf,
    /// Where the components' health comes from (the health-check queries).
    health: Option<forestall_query::continuous::ContinuousQueries>,
}

/// One row of an allocation query, for a known component and resource.
#[derive(Debug, Clone)]
struct Signal {
    component: usize,
    resource: Resource,
    request: forestall_query::continuous::AllocationRequest,
    at: Instant,
}

/// An allocation query's rows count for this long after its last run, whichever is longer:
/// a query that stopped running (failing, say) stops holding resources.
fn signal_ttl(interval: Duration) -> Duration {
    (interval * 5).max(Duration::from_secs(300))
}

impl Live {
    /// Component `c`'s preferences in force: those set over the API, else the file's.
    fn preferences_of(&self, c: usize) -> &PreferencesConfig {
        let comp = &self.config.components[c];
        self.saved.get(&comp.name).unwrap_or(&comp.preferences)
    }

    /// Writes the learned state (see [`Saved`]); a failure is logged, and the loop goes on.
    fn save(&mut self) {
        let saved = Saved {
            round: self.round,
            learned: self.controller.learned(),
        };
        let kept = serde_json::to_vec(&saved)
            .map_err(anyhow::Error::from)
            .and_then(|bytes| write_atomically(&self.state_path, &bytes))
            .and_then(|()| match self.controller.global_checkpoint() {
                Some(weights) => write_atomically(&global_path(&self.state_path), &weights?),
                None => Ok(()),
            });
        match kept {
            Ok(()) => self.last_saved = Some(Instant::now()),
            Err(e) => {
                tracing::warn!(error = %format!("{e:#}"), "could not keep the allocation state")
            }
        }
    }

    /// The allocation queries' rows still in force (stale ones are dropped): the freshest
    /// usage of each component and resource, if delivered within the last two intervals
    /// (a usage query that stopped leaves its usage unknown, NaN, not repeated), and the
    /// demands that go with the round's requests.
    fn signals_in_force(&mut self) -> (Vec<PerResource<f64>>, Vec<control::Demand>) {
        let mut usage = vec![[f64::NAN; 4]; self.config.components.len()];
        let ttl = signal_ttl(self.config.interval);
        let fresh = self.config.interval.max(Duration::from_secs(1)) * 2;
        self.signals
            .retain(|_, rows| rows.iter().any(|s| s.at.elapsed() < ttl));
        let mut demands = Vec::new();
        // Usage: the freshest row for each component and resource, whichever query gave it.
        let mut freshest: BTreeMap<(usize, usize), (Instant, f64)> = BTreeMap::new();
        for (query, s) in self
            .signals
            .iter()
            .flat_map(|(q, rows)| rows.iter().map(move |s| (q, s)))
        {
            if let Some(u) = s.request.usage.filter(|_| s.at.elapsed() < fresh) {
                let slot = freshest
                    .entry((s.component, s.resource.index()))
                    .or_insert((s.at, u));
                if s.at >= slot.0 {
                    *slot = (s.at, u);
                }
            }
            let r = &s.request;
            if r.demand.is_some() || r.forecast.is_some() {
                demands.push(control::Demand {
                    query: query.clone(),
                    component: s.component,
                    resource: s.resource,
                    demand: r.demand,
                    forecast: r.forecast,
                    risk: r.risk,
                });
            }
        }
        for ((c, r), (_, u)) in freshest {
            if let Some(row) = usage.get_mut(c) {
                row[r] = u;
            }
        }
        (usage, demands)
    }

    /// Records component `c`'s latest problem (`None`: it went away), logging each change
    /// once rather than every round.
    fn problem(&mut self, c: usize, kind: Problem, problem: Option<String>) {
        let slot = &mut self.problems[c][kind as usize];
        if *slot == problem {
            return;
        }
        let component = &self.config.components[c].name;
        match &problem {
            Some(p) => tracing::warn!(%component, problem = %p, "allocation problem"),
            None => tracing::info!(%component, ?kind, "allocation problem resolved"),
        }
        *slot = problem;
    }
}

impl Allocations {
    /// Builds the loop from `config`: the plugins and a dry-run recorder (one in use, as
    /// `actuate` says), the engine with its pool, and every component at the limits its
    /// cgroup holds now. Preferences and the actuation switch saved over the API (in
    /// `data_dir`) win over the configuration's.
    pub fn new(config: &AllocationConfig, data_dir: &Path) -> anyhow::Result<Self> {
        config.validate()?;
        let version = config.version();
        let root = &config.cgroup_root;
        let (kernel, meter): (Box<dyn Actuator>, Box<dyn Meter>) = match version {
            CgroupVersion::V2 => (Box::new(CgroupV2::new(root)), Box::new(CgroupV2::new(root))),
            _ => (Box::new(CgroupV1::new(root)), Box::new(CgroupV1::new(root))),
        };
        let sched_root = match version {
            CgroupVersion::V2 => root.clone(),
            _ => root.join("cpu"),
        };
        let mut plugins: Vec<Box<dyn Actuator>> =
            vec![kernel, Box::new(Scheduling::new(sched_root))];
        if let Some(dev) = &config.tc_interface {
            plugins.push(Box::new(TrafficControl::new(dev)));
        }
        if let Some(url) = &config.webhook {
            plugins.push(Box::new(Webhook::new(url)?));
        }
        let plugins: Box<dyn Actuator> = Box::new(Stack::new(plugins));
        let dry_run: Box<dyn Actuator> = Box::new(DryRun::default());
        let actuation_path = data_dir.join("allocation").join("actuation.json");
        let actuating = match std::fs::read(&actuation_path) {
            Ok(bytes) => {
                serde_json::from_slice::<Actuation>(&bytes)
                    .with_context(|| format!("parse {}", actuation_path.display()))?
                    .actuate
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => config.actuate,
            Err(e) => {
                return Err(e).with_context(|| format!("read {}", actuation_path.display()));
            }
        };
        if actuating != config.actuate {
            tracing::warn!(
                actuate = actuating,
                path = %actuation_path.display(),
                "actuation as last set over the API, not as configured"
            );
        }
        let (actuator, standby) = if actuating {
            (plugins, dry_run)
        } else {
            (dry_run, plugins)
        };

        let saved_path = data_dir.join("allocation").join("preferences.json");
        let saved: BTreeMap<String, PreferencesConfig> = match std::fs::read(&saved_path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .with_context(|| format!("parse {}", saved_path.display()))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => BTreeMap::new(),
            Err(e) => return Err(e).with_context(|| format!("read {}", saved_path.display())),
        };
        let mut components = Vec::new();
        let mut targets = Vec::new();
        for c in &config.components {
            let prefs = saved.get(&c.name).unwrap_or(&c.preferences);
            components.push(Component {
                name: c.name.clone(),
                weight: c.weight,
                deferrable: c.deferrable,
                preferences: config.engine_preferences(prefs)?,
            });
            targets.push(target(c)?);
        }
        let (cores, mem) = host_pool();
        let pool = config.pool.per_resource();
        let capacity = [
            Some(pool[0].unwrap_or(cores)),
            Some(pool[1].unwrap_or(mem)).filter(|m| m.is_finite()),
            pool[2],
            pool[3],
        ];
        // Each component starts from what its cgroup holds (read through the plugins also
        // in dry-run, so that what a dry run decides is what actuation would do); an
        // unlimited resource from an equal share of the pool (or its floor when the pool is
        // unlimited). Nothing is applied until a decision changes it.
        let kernel = if actuating { &actuator } else { &standby };
        let n = targets.len().max(1) as f64;
        let initial = targets
            .iter()
            .map(|t| {
                let held = kernel
                    .read_back(t)
                    .map(|l| amounts_of(&l))
                    .unwrap_or([f64::NAN; 4]);
                std::array::from_fn(|r| match (held[r], capacity[r]) {
                    (v, _) if v.is_finite() => v,
                    (_, Some(cap)) => cap / n,
                    (_, None) => f64::NAN,
                })
            })
            .collect();
        let engine = Engine::new(config.engine_config(), components, capacity, initial)?;
        let units = Units {
            disk_device: config.disk_device.as_deref().map(device).transpose()?,
            ..Units::native(config.threshold)
        };
        let n = targets.len();
        let mut controller = config.controller(engine, targets, actuator, units)?;
        // Carry on where the last run stopped. A damaged state only costs what was learned,
        // so the loop starts afresh rather than refusing to start.
        let state_path = data_dir.join("allocation").join("state.json");
        let mut round = 0;
        match std::fs::read(&state_path) {
            Ok(bytes) => match serde_json::from_slice::<Saved>(&bytes) {
                Ok(saved) => {
                    let resumed = controller.resume(&saved.learned);
                    round = saved.round;
                    tracing::info!(resumed, round, "allocation state resumed");
                }
                Err(e) => tracing::warn!(
                    path = %state_path.display(),
                    error = %e,
                    "allocation state unreadable; starting afresh"
                ),
            },
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e).with_context(|| format!("read {}", state_path.display())),
        }
        // The global LSTM's weights: a restart resumes its training instead of starting it
        // over (its series' rows come back with the warm start).
        if config.global_lstm {
            let path = global_path(&state_path);
            match std::fs::read(&path) {
                Ok(bytes) => match controller.resume_global(&bytes) {
                    Ok(()) => tracing::info!(
                        steps = controller.global_stats().map_or(0, |s| s.steps),
                        "global LSTM resumed"
                    ),
                    Err(e) => tracing::warn!(
                        path = %path.display(),
                        error = %format!("{e:#}"),
                        "global LSTM weights unusable; training afresh"
                    ),
                },
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(e).with_context(|| format!("read {}", path.display())),
            }
        }
        Ok(Self {
            inner: Arc::new(Mutex::new(Live {
                config: config.clone(),
                controller,
                meter: config.collect.then_some(meter),
                samples: vec![None; n],
                problems: vec![[None, None]; n],
                round,
                last_round: None,
                usage: vec![[f64::NAN; 4]; n],
                saved,
                saved_path,
                state_path,
                last_saved: None,
                signals: BTreeMap::new(),
                actuating,
                standby,
                actuation_path,
                health: None,
            })),
            asked: Arc::new(tokio::sync::Notify::new()),
        })
    }

    /// Takes the components' health from `queries`' health checks, as the risk models'
    /// health evidence.
    pub fn health_from(&self, queries: forestall_query::continuous::ContinuousQueries) {
        self.live().health = Some(queries);
    }

    /// An allocation query's rows of its latest run, replacing those of its run before (none:
    /// it withdraws them). Rows naming a component or resource the loop does not know are
    /// refused, with their names; the others are kept.
    pub fn offer(
        &self,
        query: &str,
        requests: Vec<forestall_query::continuous::AllocationRequest>,
    ) -> Result<(), String> {
        let mut live = self.live();
        let names: BTreeMap<String, usize> = live
            .config
            .components
            .iter()
            .enumerate()
            .map(|(i, c)| (c.name.clone(), i))
            .collect();
        let at = Instant::now();
        let mut unknown = BTreeSet::new();
        let mut kept = Vec::with_capacity(requests.len());
        for request in requests {
            let resource = Resource::ALL
                .into_iter()
                .find(|r| r.name() == request.resource);
            match (names.get(&request.component), resource) {
                (Some(&component), Some(resource)) => kept.push(Signal {
                    component,
                    resource,
                    request,
                    at,
                }),
                (None, _) => {
                    unknown.insert(format!("component {:?}", request.component));
                }
                (_, None) => {
                    unknown.insert(format!(
                        "resource {:?} (cpu, mem, net or disk)",
                        request.resource
                    ));
                }
            }
        }
        let demands = kept
            .iter()
            .any(|s| s.request.demand.is_some() || s.request.forecast.is_some());
        if kept.is_empty() {
            live.signals.remove(query);
        } else {
            live.signals.insert(query.to_owned(), kept);
        }
        drop(live);
        if demands {
            self.asked.notify_one();
        }
        if unknown.is_empty() {
            Ok(())
        } else {
            let list: Vec<String> = unknown.into_iter().collect();
            Err(format!("the allocation loop has no {}", list.join(", no ")))
        }
    }

    fn live(&self) -> std::sync::MutexGuard<'_, Live> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Teaches the forecasters the usage recorded for the rounds before now (as many as they
    /// keep; see [`crate::usage::recorded`]), so that a restart does not start them cold.
    /// Returns the rounds learned.
    pub async fn warm_up(&self, store: &Store, query: &QueryEngine) -> usize {
        let (names, stride) = {
            let live = self.live();
            let names: Vec<String> = live
                .config
                .components
                .iter()
                .map(|c| c.name.clone())
                .collect();
            (names, live.config.interval.as_nanos() as i64)
        };
        let now = now_nanos();
        let rounds = control::HISTORY_ROUNDS;
        let history = usage::recorded(
            store,
            query,
            &names,
            now - stride * rounds as i64,
            stride,
            rounds,
        )
        .await;
        let known = |b: &Vec<PerResource<f64>>| b.iter().flatten().any(|v| v.is_finite());
        let Some(first) = history.iter().position(known) else {
            return 0;
        };
        // Off the async workers, and a round at a time under the lock: with the global LSTM
        // a round costs a training step, and up to 900 of them must not hold the API up.
        let this = self.clone();
        let learned = tokio::task::spawn_blocking(move || {
            for (k, usage) in history.iter().enumerate().skip(first) {
                let mut live = this.live();
                // Round k's usage is from the bucket that starts `rounds − k` strides ago.
                let at = now - stride * (rounds - k) as i64;
                live.controller.set_clock(at as f64 / 1e9);
                live.controller.learn(usage);
            }
            this.live().last_round = Some(now);
        })
        .await;
        if let Err(e) = learned {
            tracing::warn!(error = %e, "warming the forecasters up failed");
        }
        rounds - first
    }

    /// Meters every component's cgroup into `forestall_usage` (with `collect`; otherwise
    /// nothing).
    pub async fn collect(&self, store: &Arc<Store>) -> anyhow::Result<()> {
        let this = self.clone();
        let store = Arc::clone(store);
        tokio::task::spawn_blocking(move || this.meter(&store, now_nanos())).await?
    }

    /// One round at the current time: the usage and demands the allocation queries
    /// delivered, then decide, apply, audit.
    pub async fn round(&self, store: &Arc<Store>) -> anyhow::Result<()> {
        let this = self.clone();
        let store = Arc::clone(store);
        tokio::task::spawn_blocking(move || this.decide(&store, now_nanos())).await?
    }

    /// Raises now what the allocation queries' demands ask for beyond the allocations (see
    /// [`Controller::raise_now`]), applies and audits it: the path from a write that brought
    /// a signal to the kernel, without waiting for the next round.
    pub async fn raise_now(&self, store: &Arc<Store>) -> anyhow::Result<()> {
        let this = self.clone();
        let store = Arc::clone(store);
        tokio::task::spawn_blocking(move || {
            let mut live = this.live();
            let (_, demands) = live.signals_in_force();
            let round = live.round;
            let report = live.controller.raise_now(round, &demands);
            this.conclude(live, &report, &store, now_nanos())
        })
        .await?
    }

    /// Meters every component's cgroup and writes the rates to `forestall_usage`.
    fn meter(&self, store: &Store, now: i64) -> anyhow::Result<()> {
        let mut guard = self.live();
        let live = &mut *guard;
        let Some(meter) = &live.meter else {
            return Ok(());
        };
        let at = Instant::now();
        let readings: Vec<_> = live
            .controller
            .targets()
            .iter()
            .map(|t| (t.component.clone(), meter.usage(t)))
            .collect();
        let mut lines = String::new();
        for (c, (component, reading)) in readings.into_iter().enumerate() {
            let u = match reading {
                Ok(u) => u,
                Err(e) => {
                    live.problem(c, Problem::Metering, Some(format!("metering: {e}")));
                    live.samples[c] = None;
                    continue;
                }
            };
            // Each resource is metered on its own: what could not be read is reported, the
            // rest is used.
            let problem =
                (!u.problems.is_empty()).then(|| format!("metering: {}", u.problems.join("; ")));
            live.problem(c, Problem::Metering, problem);
            let prev = live.samples[c].replace((at, u.clone()));
            let rate = |now: Option<f64>, before: Option<f64>| -> Option<f64> {
                let (t0, _) = prev.as_ref()?;
                let dt = at.duration_since(*t0).as_secs_f64();
                let d = now? - before?;
                (dt > 0.0 && d >= 0.0).then(|| d / dt)
            };
            let prev_u = prev.as_ref().map(|p| p.1.clone()).unwrap_or_default();
            let fields: Vec<(&str, Option<f64>)> = vec![
                ("cpu", rate(u.cpu_seconds, prev_u.cpu_seconds)),
                ("mem", u.memory_bytes.map(|b| b as f64)),
                (
                    "net",
                    rate(
                        u.net_bytes.map(|b| b as f64),
                        prev_u.net_bytes.map(|b| b as f64),
                    ),
                ),
                (
                    "disk",
                    rate(
                        u.io_bytes.map(|b| b as f64),
                        prev_u.io_bytes.map(|b| b as f64),
                    ),
                ),
            ];
            let fields: Vec<(&str, FieldValue<'_>)> = fields
                .into_iter()
                .filter_map(|(k, v)| Some((k, FieldValue::Float(v?))))
                .collect();
            if !fields.is_empty() {
                write_point(
                    &mut lines,
                    USAGE_MEASUREMENT,
                    [(live.config.component_tag.as_str(), component.as_str())],
                    fields.iter().map(|(k, v)| (*k, v)),
                    now,
                );
                lines.push('\n');
            }
        }
        drop(guard);
        if !lines.is_empty() {
            store
                .write(lines.as_bytes(), Precision::Nanoseconds, now)
                .context("store the metered usage")?;
        }
        Ok(())
    }

    /// Observes the usage the queries delivered, runs the round, stores its audit rows.
    fn decide(&self, store: &Store, now: i64) -> anyhow::Result<()> {
        let mut live = self.live();
        let (usage, demands) = live.signals_in_force();
        if let Some(queries) = &live.health {
            let health = live
                .config
                .components
                .iter()
                .map(|c| {
                    queries.component_health(&c.name).map(|h| match h {
                        HealthStatus::Pass => Health::Pass,
                        HealthStatus::Warn => Health::Warn,
                        HealthStatus::Fail => Health::Fail,
                    })
                })
                .collect();
            live.controller.set_health(health);
        }
        live.controller.observe(&usage);
        for (seen, u) in live.usage.iter_mut().zip(&usage) {
            for (s, v) in seen.iter_mut().zip(u) {
                if v.is_finite() {
                    *s = *v;
                }
            }
        }
        live.round += 1;
        let round = live.round;
        let report = live.controller.round_with(round, &demands);
        live.last_round = Some(now);
        if live.last_saved.is_none_or(|at| at.elapsed() >= SAVE_EVERY) {
            live.save();
        }
        self.conclude(live, &report, store, now)
    }

    /// Records what applying `report` found, logs it, and stores its audit rows.
    fn conclude(
        &self,
        mut live: std::sync::MutexGuard<'_, Live>,
        report: &RoundReport,
        store: &Store,
        now: i64,
    ) -> anyhow::Result<()> {
        let actuate = live.actuating;
        for (c, _, result) in &report.applied {
            let problem = result.as_ref().err().map(|e| format!("applying: {e}"));
            live.problem(*c, Problem::Applying, problem);
        }
        let names: Vec<String> = live
            .controller
            .engine()
            .components()
            .iter()
            .map(|c| c.name.clone())
            .collect();
        drop(live);
        let lines = audit_lines(report, &names, actuate, now);
        for (c, limits, result) in &report.applied {
            match result {
                Ok(()) => {
                    tracing::info!(component = %names[*c], ?limits, actuate, "allocation applied")
                }
                Err(e) => {
                    tracing::warn!(component = %names[*c], error = %e, "allocation not applied; retried next round")
                }
            }
        }
        if !lines.is_empty() {
            store
                .write(lines.as_bytes(), Precision::Nanoseconds, now)
                .context("store the allocation audit")?;
        }
        Ok(())
    }

    /// Writes the learned state now (the server does when it stops).
    pub fn save(&self) {
        self.live().save();
    }

    /// `GET /api/v1/allocations`.
    pub fn status(&self) -> serde_json::Value {
        let live = self.live();
        let engine = live.controller.engine();
        let theta = engine.config().threshold;
        let names: Vec<&str> = engine
            .components()
            .iter()
            .map(|c| c.name.as_str())
            .collect();
        let per = |v: PerResource<f64>| {
            let mut m = serde_json::Map::new();
            for r in Resource::ALL {
                let x = v[r.index()];
                m.insert(
                    r.name().into(),
                    if x.is_finite() { json!(x) } else { json!(null) },
                );
            }
            serde_json::Value::Object(m)
        };
        let components: Vec<_> = engine
            .components()
            .iter()
            .enumerate()
            .map(|(c, comp)| {
                let applied = live
                    .controller
                    .actuator()
                    .read_back(&live.controller.targets()[c]);
                let feedback: serde_json::Map<String, serde_json::Value> = Resource::ALL
                    .iter()
                    .map(|r| {
                        let f = engine.feedback(c, *r);
                        (
                            r.name().to_string(),
                            json!({"headroom": f.headroom, "effectiveness": f.effectiveness, "judged": f.judged}),
                        )
                    })
                    .collect();
                json!({
                    "component": comp.name,
                    "cgroup": live.controller.targets()[c].cgroup,
                    "weight": comp.weight,
                    "deferrable": comp.deferrable,
                    "allocation": per(engine.allocation(c)),
                    "usage": per(live.usage[c]),
                    "applied": match applied {
                        Ok(l) => per(amounts_of(&l)),
                        Err(e) => json!({"error": e.to_string()}),
                    },
                    "pending": live.controller.pending().contains(&c),
                    "problems": live.problems[c].iter().flatten().collect::<Vec<_>>(),
                    "feedback": feedback,
                    "preferences": live.preferences_of(c),
                    "requested_by_queries": live
                        .signals
                        .iter()
                        .flat_map(|(q, rows)| rows.iter().map(move |s| (q, s)))
                        .filter(|(_, s)| s.component == c)
                        .map(|(q, s)| json!({
                            "query": q,
                            "resource": s.resource.name(),
                            "usage": s.request.usage,
                            "demand": s.request.demand,
                            "forecast": s.request.forecast,
                            "risk": s.request.risk,
                            "age_seconds": s.at.elapsed().as_secs_f64(),
                        }))
                        .collect::<Vec<_>>(),
                })
            })
            .collect();
        let deferred: Vec<_> = engine
            .deferred()
            .iter()
            .map(|d| {
                json!({
                    "component": names[d.component],
                    "resource": d.resource.name(),
                    "short": d.short,
                    "since_round": d.since,
                })
            })
            .collect();
        json!({
            "enabled": true,
            "mode": if live.actuating { "actuate" } else { "dry-run" },
            "actuator": live.controller.actuator().name(),
            "round": live.round,
            "last_round_ns": live.last_round,
            "interval": humantime::format_duration(live.config.interval).to_string(),
            "threshold": theta,
            "components": components,
            "deferred": deferred,
        })
    }

    /// `GET /api/v1/forecasts`: per component and resource, the forecast its next request is
    /// sized from (one step per round after the last one, 95% interval, the model that
    /// answered) and that request (amount, need, and its Bayesian risk with the evidence that
    /// moved it most).
    pub fn forecasts(&self) -> serde_json::Value {
        let live = self.live();
        let c = &live.controller;
        let models = c.model_names();
        let stride = live.config.interval.as_nanos() as i64;
        let start = live.last_round.unwrap_or_else(now_nanos);
        let time = |ns: i64| {
            humantime::format_rfc3339_nanos(
                std::time::UNIX_EPOCH + Duration::from_nanos(ns.max(0) as u64),
            )
            .to_string()
        };
        let components: Vec<_> = c
            .engine()
            .components()
            .iter()
            .enumerate()
            .map(|(i, comp)| {
                let risks = c.risk(i).unwrap_or_default();
                let resources: serde_json::Map<String, serde_json::Value> = Resource::ALL
                    .iter()
                    .map(|&r| {
                        let steps = c.forecast(i, r);
                        let risk = risks.get(r.index());
                        let request = c.request(i, r, &steps, risk.map_or(0.5, |k| k.score)).map(
                            |q| {
                                json!({
                                    "amount": q.amount,
                                    "need": q.need,
                                    "risk": q.risk,
                                    "reasons": risk.map(|k| k.reasons.clone()).unwrap_or_default(),
                                })
                            },
                        );
                        let steps: Vec<_> = steps
                            .iter()
                            .enumerate()
                            .map(|(k, s)| {
                                json!({
                                    "time": time(start + stride * (k as i64 + 1)),
                                    "mean": s.mean,
                                    "lower": s.lower,
                                    "upper": s.upper,
                                    "model": models.get(s.model).copied().unwrap_or("?"),
                                })
                            })
                            .collect();
                        (
                            r.name().to_string(),
                            json!({"request": request, "steps": steps}),
                        )
                    })
                    .collect();
                json!({"component": comp.name, "resources": resources})
            })
            .collect();
        json!({
            "interval": humantime::format_duration(live.config.interval).to_string(),
            "level": 0.95,
            "components": components,
        })
    }

    /// `GET /api/v1/models`: the forecast models' accounts. Per component and resource,
    /// which model answers each step ahead of the current forecast and every model's rolling
    /// error there (the answer is the lowest, unless that model has no forecast for the step;
    /// then seasonal naive answers); and the global LSTM's record (`null` when it is off): the
    /// series it serves, rows and rounds seen, training steps, smoothed loss, and its age
    /// (rounds times the interval).
    pub fn models(&self) -> serde_json::Value {
        let live = self.live();
        let c = &live.controller;
        let models = c.model_names();
        let series: Vec<_> = (0..c.engine().components().len())
            .flat_map(|i| Resource::ALL.map(|r| (i, r)))
            .map(|(i, r)| {
                let steps: Vec<_> = c
                    .forecast(i, r)
                    .iter()
                    .enumerate()
                    .map(|(k, s)| {
                        let step = k + 1;
                        let errors = c.rolling_error(i, r, step);
                        let chosen = models.get(s.model).copied();
                        let errors: serde_json::Map<String, serde_json::Value> = models
                            .iter()
                            .zip(&errors)
                            .map(|(name, e)| (name.to_string(), json!(e)))
                            .collect();
                        json!({"step": step, "model": chosen, "rolling_error": errors})
                    })
                    .collect();
                json!({
                    "component": c.engine().components()[i].name,
                    "resource": r.name(),
                    "steps": steps,
                })
            })
            .collect();
        let global = c.global_stats().map(|g| {
            json!({
                "series": g.series,
                "rows": g.rows,
                "rounds": g.rounds,
                "training_steps": g.steps,
                "loss": g.loss,
                "age": humantime::format_duration(
                    live.config.interval * u32::try_from(g.rounds).unwrap_or(u32::MAX)
                ).to_string(),
            })
        });
        json!({
            "models": models,
            "global_lstm": global,
            "series": series,
        })
    }

    /// `GET /api/v1/risks`: per component and resource, the Bayesian risk that utilisation
    /// passes θ within the horizon, with the evidence that moved it most (null before any
    /// usage).
    pub fn risks(&self) -> serde_json::Value {
        let live = self.live();
        let c = &live.controller;
        let components: Vec<_> = c
            .engine()
            .components()
            .iter()
            .enumerate()
            .map(|(i, comp)| {
                let resources: Option<serde_json::Map<String, serde_json::Value>> =
                    c.risk(i).map(|risks| {
                        risks
                            .into_iter()
                            .map(|r| (r.resource, json!({"score": r.score, "reasons": r.reasons})))
                            .collect()
                    });
                json!({"component": comp.name, "resources": resources})
            })
            .collect();
        json!({
            "threshold": c.engine().config().threshold,
            "horizon": humantime::format_duration(live.config.horizon).to_string(),
            "components": components,
        })
    }

    /// Every component's preferences (`GET /api/v1/preferences`).
    pub fn preferences(&self) -> serde_json::Value {
        let live = self.live();
        let all: BTreeMap<&str, &PreferencesConfig> = live
            .config
            .components
            .iter()
            .enumerate()
            .map(|(i, c)| (c.name.as_str(), live.preferences_of(i)))
            .collect();
        json!(all)
    }

    /// `GET /api/v1/actuation`: whether allocations reach the kernel, and through what.
    pub fn actuation(&self) -> serde_json::Value {
        let live = self.live();
        json!({
            "actuate": live.actuating,
            "actuator": live.controller.actuator().name(),
            "configured": live.config.actuate,
        })
    }

    /// Turns actuation on (the plugins apply every allocation from the next round) or off
    /// (allocations are computed, audited and shown, and the kernel keeps the limits it
    /// has), and keeps the choice across restarts. Turned on, every component the engine has
    /// changed is applied at the next round, so the kernel catches up with the engine.
    pub fn set_actuating(&self, on: bool) -> Result<(), SetError> {
        let mut live = self.live();
        if live.actuating == on {
            return Ok(());
        }
        write_atomically(
            &live.actuation_path,
            &serde_json::to_vec(&Actuation { actuate: on })
                .map_err(|e| SetError::Io(e.to_string()))?,
        )
        .map_err(|e| SetError::Io(format!("{e:#}")))?;
        let Live {
            controller,
            standby,
            ..
        } = &mut *live;
        controller.swap_actuator(standby);
        live.actuating = on;
        tracing::warn!(
            actuate = on,
            actuator = live.controller.actuator().name(),
            "actuation switched over the API"
        );
        Ok(())
    }

    /// Replaces a component's preferences from the next round on, and keeps them across
    /// restarts. `Ok(false)` when there is no such component.
    pub fn set_preferences(
        &self,
        component: &str,
        prefs: PreferencesConfig,
    ) -> Result<bool, SetError> {
        let mut live = self.live();
        let engine_prefs = live
            .config
            .engine_preferences(&prefs)
            .map_err(|e| SetError::Invalid(format!("{e:#}")))?;
        let Some(c) = live
            .config
            .components
            .iter()
            .position(|c| c.name == component)
        else {
            return Ok(false);
        };
        let mut saved = live.saved.clone();
        saved.insert(component.to_string(), prefs);
        write_atomically(
            &live.saved_path,
            &serde_json::to_vec_pretty(&saved).map_err(|e| SetError::Io(e.to_string()))?,
        )
        .map_err(|e| SetError::Io(format!("{e:#}")))?;
        live.saved = saved;
        live.controller
            .engine_mut()
            .set_preferences(c, engine_prefs);
        Ok(true)
    }
}

/// What the loop keeps across restarts besides preferences: the round it is at, what the
/// engine and the risk models have learned, and which resources it has changed
/// (`<data_dir>/allocation/state.json`, rewritten atomically after the first round, then at
/// most every [`SAVE_EVERY`], and when the server stops).
#[derive(Debug, Serialize, Deserialize)]
struct Saved {
    round: u64,
    #[serde(flatten)]
    learned: Learned,
}

/// Why preferences were not set.
#[derive(Debug, thiserror::Error)]
pub enum SetError {
    #[error("{0}")]
    Invalid(String),
    #[error("could not save the setting: {0}")]
    Io(String),
}

/// The actuation switch as saved (`allocation/actuation.json`).
#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct Actuation {
    actuate: bool,
}

/// Where the global LSTM's weights are kept, beside the learned state.
fn global_path(state: &Path) -> PathBuf {
    state.with_file_name("global_lstm.ckpt")
}

/// Writes `bytes` to `path` so that a crash leaves the old file or the new one, whole.
fn write_atomically(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    use std::io::Write as _;
    let dir = path.parent().context("a file in a directory")?;
    std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::File::create(&tmp).with_context(|| format!("create {}", tmp.display()))?;
    f.write_all(bytes)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path).with_context(|| format!("rename to {}", path.display()))?;
    std::fs::File::open(dir)?.sync_all()?;
    Ok(())
}

/// The audit rows of one round: one per decision, and one per failed apply.
fn audit_lines(report: &RoundReport, names: &[String], actuate: bool, now: i64) -> String {
    let mut out = String::new();
    let mut row = |component: &str,
                   resource: Option<Resource>,
                   action: &str,
                   fields: Vec<(&'static str, FieldValue<'_>)>| {
        let mut tags = vec![("component", component)];
        if let Some(r) = resource {
            tags.push(("resource", r.name()));
        }
        tags.push(("action", action));
        write_point(
            &mut out,
            AUDIT_MEASUREMENT,
            tags,
            fields.iter().map(|(k, v)| (*k, v)),
            now,
        );
        out.push('\n');
    };
    for d in &report.decisions {
        row(
            &names[d.component],
            Some(d.resource),
            action_name(&d.action),
            vec![
                ("before", FieldValue::Float(d.from)),
                ("after", FieldValue::Float(d.to)),
                ("reason", FieldValue::String(one_line(&d.reason).into())),
                ("applied", FieldValue::Boolean(actuate && !d.dry_run)),
                ("round", FieldValue::Integer(d.round as i64)),
            ],
        );
    }
    for (c, _, result) in &report.applied {
        if let Err(e) = result {
            row(
                &names[*c],
                None,
                "apply_failed",
                vec![
                    ("reason", FieldValue::String(one_line(e).into())),
                    ("applied", FieldValue::Boolean(false)),
                ],
            );
        }
    }
    out
}

/// Line protocol cannot carry a line break inside a value (a command's error output may
/// have several lines).
fn one_line(s: &str) -> String {
    s.replace(['\n', '\r'], " ")
}

fn action_name(a: &Action) -> &'static str {
    match a {
        Action::Raise => "raise",
        Action::Release => "release",
        Action::Preempted { .. } => "preempted",
        Action::Deferred { .. } => "deferred",
        Action::Granted { .. } => "granted",
        Action::Rollback => "rollback",
    }
}

/// Runs the loop until `shutdown` resolves: at each multiple of `interval` the collector
/// meters the cgroups, and half an interval later the round decides from what the usage
/// queries (run a quarter of an interval in, see [`crate::usage`]) delivered. Between rounds,
/// an allocation query's demand is raised as soon as it is delivered. A failed step is
/// logged and the next one runs as usual.
pub async fn run(
    allocations: Allocations,
    store: Arc<Store>,
    query: QueryEngine,
    interval: Duration,
    shutdown: impl std::future::Future<Output = ()>,
) {
    let learned = allocations.warm_up(&store, &query).await;
    tracing::info!(
        rounds = learned,
        "allocation forecasters warmed up from the recorded usage"
    );
    tokio::pin!(shutdown);
    loop {
        let now = now_nanos();
        let to_collect = usage::until_phase(now, interval, usage::PHASE_COLLECT);
        let to_round = usage::until_phase(now, interval, usage::PHASE_ROUND);
        let (wait, collect) = if to_collect <= to_round {
            (to_collect, true)
        } else {
            (to_round, false)
        };
        tokio::select! {
            _ = &mut shutdown => {
                let _ = tokio::task::spawn_blocking(move || allocations.save()).await;
                return;
            }
            _ = allocations.asked.notified() => {
                if let Err(e) = allocations.raise_now(&store).await {
                    tracing::warn!(error = %format!("{e:#}"), "raising on a query's demand failed");
                }
            }
            _ = tokio::time::sleep(wait) => {
                let (step, done) = if collect {
                    ("metering", allocations.collect(&store).await)
                } else {
                    ("round", allocations.round(&store).await)
                };
                if let Err(e) = done {
                    tracing::warn!(error = %format!("{e:#}"), step, "allocation step failed");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests;
