//! The live allocation loop: every `[allocation] interval`, `serve` meters each component's
//! cgroup into the store, reads each resource's usage back with SQL, runs one [`Controller`]
//! round (forecast, size, allocate) and applies what changed through the actuator plugins.
//! Every decision is stored as a row of the `forestall_allocations` measurement.
//!
//! * **Usage** comes from the store, so any agent can feed it: per resource, a measurement
//!   and field ([`UsageSource`]), averaged (or maxed) over the round, grouped by the
//!   component tag. By default the built-in collector provides it: it reads each component's
//!   cgroup counters ([`Meter`]) and writes `forestall_usage,component=<name>` with fields
//!   `cpu` (cores), `mem` (bytes of working set), `disk` (bytes/s) and `net` (bytes/s sent
//!   and received in the component's own network namespaces; none for a component in
//!   Forestall's namespace, whose traffic cannot be told apart: point `usage.net` elsewhere).
//! * **Units**: CPU in cores, memory in bytes, network and disk in bytes per second.
//! * **Dry-run** (`actuate = false`, the default): the engine runs and audits as it would
//!   live, and a [`DryRun`] actuator records what would be applied; nothing is changed.
//! * **Preferences** set over the HTTP API are kept in
//!   `<data_dir>/allocation/preferences.json` (written atomically) and win over the
//!   configuration file's.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use arrow::array::{Array, AsArray};
use arrow::datatypes::{DataType, Float64Type, Int64Type};
use forestall_actuators::alloc::{Action, Component, Engine, PerResource, Preferences, Resource};
use forestall_actuators::cgroup_v1::CgroupV1;
use forestall_actuators::cgroup_v2::CgroupV2;
use forestall_actuators::sched::Scheduling;
use forestall_actuators::stack::{Stack, Units};
use forestall_actuators::tc::TrafficControl;
use forestall_actuators::webhook::Webhook;
use forestall_actuators::{Actuator, CpuSet, DryRun, Flow, Limits, Meter, Target, Usage};
use forestall_engine::Store;
use forestall_engine::line_protocol::{FieldValue, ParsedLine, Precision};
use forestall_engine::store::now_nanos;
use forestall_models::risk::Health;
use forestall_query::QueryEngine;
use forestall_query::continuous::HealthStatus;
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::control::{self, Controller, Learned, RoundReport, Timing};

/// How often the learned state is written while the loop runs: a crash loses at most this
/// much learning (about 5.5 KB per component each time with a five-round horizon, most of it
/// the risk tables and the evidence waiting for its outcome).
pub const SAVE_EVERY: Duration = Duration::from_secs(300);

/// The measurement the collector writes usage to.
pub const USAGE_MEASUREMENT: &str = "forestall_usage";
/// The measurement every allocation decision is stored in.
pub const AUDIT_MEASUREMENT: &str = "forestall_allocations";

/// `[allocation]`: the live loop.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AllocationConfig {
    /// Run the loop. Default false.
    pub enabled: bool,
    /// Apply allocations to the kernel. Default false: dry-run (computed, audited, shown,
    /// nothing changed).
    pub actuate: bool,
    /// One round per interval; also the forecast step. Default 1 minute.
    #[serde(with = "humantime_serde")]
    pub interval: Duration,
    /// Requests cover the forecast's peak over this. Default 1 hour.
    #[serde(with = "humantime_serde")]
    pub horizon: Duration,
    /// A release waits until every request of this long sits well below the allocation.
    /// Default 4 hours.
    #[serde(with = "humantime_serde")]
    pub release_after: Duration,
    /// A raise is judged this long after, and rolled back if usage never needed it.
    /// Default 8 hours.
    #[serde(with = "humantime_serde")]
    pub judge_after: Duration,
    /// A request deferred this long is served before other non-critical ones. Default 6 hours.
    #[serde(with = "humantime_serde")]
    pub age_after: Duration,
    /// Keep usage under this share of the allocation (θ). Default 0.8.
    pub threshold: f64,
    /// Run an LSTM beside each component's other forecasters, one training step every this
    /// many rounds (its CPU budget: about 0.2 ms per series per round at 32). Default 0: none.
    pub lstm_train_every: usize,
    /// The tag that names a component in usage measurements. Default `component`.
    pub component_tag: String,
    /// Where cgroup controllers are mounted. Default `/sys/fs/cgroup`.
    pub cgroup_root: PathBuf,
    /// `v1`, `v2` or `auto` (v2 when the root is a unified mount). Default `auto`.
    pub cgroup_version: CgroupVersion,
    /// Meter each component's cgroup into `forestall_usage` every round. Default true.
    pub collect: bool,
    /// The block device (`major:minor`) disk allocations throttle; unset leaves disk alone.
    pub disk_device: Option<String>,
    /// Network interface whose egress HTB classes reserve bandwidth; unset: no tc plugin.
    pub tc_interface: Option<String>,
    /// URL every applied allocation is POSTed to (for an orchestrator); unset: no webhook.
    pub webhook: Option<String>,
    /// The pool shared by all components. Unset CPU and memory default to the host's cores
    /// and memory; unset network and disk are unlimited.
    pub pool: Amounts,
    /// The smallest allocation of each resource. Default 0.1 core and 64 MiB.
    pub min: Amounts,
    /// Where each resource's usage is read from.
    pub usage: UsageSources,
    pub components: Vec<ComponentConfig>,
}

impl Default for AllocationConfig {
    fn default() -> Self {
        let timing = Timing::measured(Duration::from_secs(60));
        Self {
            enabled: false,
            actuate: false,
            interval: timing.interval,
            horizon: timing.horizon,
            release_after: timing.release_after,
            judge_after: timing.judge_after,
            age_after: timing.age_after,
            threshold: 0.8,
            lstm_train_every: 0,
            component_tag: "component".into(),
            cgroup_root: PathBuf::from("/sys/fs/cgroup"),
            cgroup_version: CgroupVersion::Auto,
            collect: true,
            disk_device: None,
            tc_interface: None,
            webhook: None,
            pool: Amounts::default(),
            min: Amounts {
                cpu: Some(0.1),
                mem: Some(64.0 * 1048576.0),
                net: None,
                disk: None,
            },
            usage: UsageSources::default(),
            components: Vec::new(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CgroupVersion {
    V1,
    V2,
    Auto,
}

/// An amount per resource: cores, bytes, bytes/s, bytes/s.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Amounts {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cpu: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mem: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub net: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub disk: Option<f64>,
}

impl Amounts {
    fn per_resource(&self) -> PerResource<Option<f64>> {
        [self.cpu, self.mem, self.net, self.disk]
    }

    fn check(&self, what: &str) -> anyhow::Result<()> {
        for (r, v) in Resource::ALL.iter().zip(self.per_resource()) {
            if let Some(v) = v {
                ensure!(
                    v.is_finite() && v >= 0.0,
                    "{what}.{r} must be a finite, non-negative number, not {v}"
                );
            }
        }
        Ok(())
    }
}

/// `[allocation.usage]`: the source of each resource's usage.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct UsageSources {
    pub cpu: UsageSource,
    pub mem: UsageSource,
    pub net: UsageSource,
    pub disk: UsageSource,
}

impl Default for UsageSources {
    fn default() -> Self {
        let collected = |field: &str| UsageSource {
            measurement: USAGE_MEASUREMENT.into(),
            field: field.into(),
            scale: 1.0,
            aggregate: Aggregate::Avg,
        };
        Self {
            cpu: collected("cpu"),
            mem: collected("mem"),
            net: collected("net"),
            disk: collected("disk"),
        }
    }
}

impl UsageSources {
    fn get(&self, r: Resource) -> &UsageSource {
        match r {
            Resource::Cpu => &self.cpu,
            Resource::Mem => &self.mem,
            Resource::Net => &self.net,
            Resource::Disk => &self.disk,
        }
    }
}

/// A resource's usage: `aggregate(field) × scale` over the round, per component tag value.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UsageSource {
    pub measurement: String,
    pub field: String,
    /// Multiplies the field into the resource's unit (e.g. 0.01 for a CPU percentage of one
    /// core, 1048576 for MiB). Default 1.
    #[serde(default = "one")]
    pub scale: f64,
    #[serde(default)]
    pub aggregate: Aggregate,
}

fn one() -> f64 {
    1.0
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Aggregate {
    #[default]
    Avg,
    Max,
}

/// `[[allocation.components]]`: a component that receives resources.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ComponentConfig {
    /// Its name: the component tag's value in usage measurements.
    pub name: String,
    /// Its cgroup, relative to each controller's root. Default `forestall/<name>`.
    #[serde(default)]
    pub cgroup: Option<String>,
    /// Criticality: higher is served first; 10 and above preempts lower weights when the pool
    /// is short. Default 1.
    #[serde(default = "one")]
    pub weight: f64,
    /// Its CPU, network and disk requests may wait when the pool is short (batch work).
    #[serde(default)]
    pub deferrable: bool,
    /// IPv4 flows that are its traffic, for the tc plugin.
    #[serde(default)]
    pub flows: Vec<FlowConfig>,
    #[serde(default)]
    pub preferences: PreferencesConfig,
}

/// A component's IPv4 traffic: every given field must match.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FlowConfig {
    /// `a.b.c.d/len` or `a.b.c.d`.
    pub src: Option<String>,
    pub dst: Option<String>,
    pub sport: Option<u16>,
    pub dport: Option<u16>,
}

impl FlowConfig {
    fn flow(&self) -> anyhow::Result<Flow> {
        fn net(s: &Option<String>) -> anyhow::Result<Option<(Ipv4Addr, u8)>> {
            let Some(s) = s else { return Ok(None) };
            let (addr, len) = s.split_once('/').unwrap_or((s, "32"));
            let addr: Ipv4Addr = addr
                .parse()
                .with_context(|| format!("flow network {s:?}: not an IPv4 address"))?;
            let len: u8 = len
                .parse()
                .ok()
                .filter(|l| *l <= 32)
                .with_context(|| format!("flow network {s:?}: prefix length must be 0..=32"))?;
            Ok(Some((addr, len)))
        }
        Ok(Flow {
            src: net(&self.src)?,
            dst: net(&self.dst)?,
            sport: self.sport,
            dport: self.dport,
        })
    }
}

/// What operators and platform software set: these always win over the engine. The same
/// shape in the configuration file (`preferences = {…}`) and in `PUT /api/v1/preferences/…`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PreferencesConfig {
    /// Never allocate more than this.
    pub cap: Amounts,
    /// Never allocate less than this.
    pub floor: Amounts,
    /// Leave the component alone entirely.
    pub opt_out: bool,
    /// Resources someone else manages: never raised, released, preempted or applied.
    pub unmanaged: Vec<ResourceName>,
    /// CPUs its threads are pinned to.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pinned_cpus: Option<Vec<usize>>,
}

impl PreferencesConfig {
    /// The engine's preferences, checked: amounts finite and non-negative, each floor at or
    /// below its cap, pinned CPUs a valid set.
    pub fn preferences(&self) -> anyhow::Result<Preferences> {
        self.cap.check("cap")?;
        self.floor.check("floor")?;
        let (cap, floor) = (self.cap.per_resource(), self.floor.per_resource());
        for r in Resource::ALL {
            if let (Some(f), Some(c)) = (floor[r.index()], cap[r.index()]) {
                ensure!(f <= c, "the {r} floor {f} is above its cap {c}");
            }
        }
        let mut unmanaged = [false; 4];
        for r in &self.unmanaged {
            unmanaged[r.resource().index()] = true;
        }
        let pinned_cpus = match &self.pinned_cpus {
            Some(cpus) => {
                let set = CpuSet::new(cpus.iter().copied())?;
                ensure!(
                    !set.is_empty(),
                    "pinned_cpus is empty: leave it out instead"
                );
                Some(set)
            }
            None => None,
        };
        Ok(Preferences {
            cap,
            floor,
            opt_out: self.opt_out,
            unmanaged,
            pinned_cpus,
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ResourceName {
    Cpu,
    Mem,
    Net,
    Disk,
}

impl ResourceName {
    fn resource(self) -> Resource {
        match self {
            ResourceName::Cpu => Resource::Cpu,
            ResourceName::Mem => Resource::Mem,
            ResourceName::Net => Resource::Net,
            ResourceName::Disk => Resource::Disk,
        }
    }
}

/// A name that is safe as a tag value, a cgroup directory and inside SQL.
fn plain_name(what: &str, s: &str) -> anyhow::Result<()> {
    ensure!(
        !s.is_empty()
            && s.len() <= 128
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || "_-.:".contains(c)),
        "{what} {s:?} must be 1 to 128 characters of letters, digits, `_`, `-`, `.`, `:`"
    );
    Ok(())
}

impl AllocationConfig {
    /// Checks everything that can be checked without touching the machine.
    pub fn validate(&self) -> anyhow::Result<()> {
        ensure!(
            self.threshold > 0.0 && self.threshold <= 1.0,
            "allocation.threshold must be in (0, 1]"
        );
        ensure!(
            self.interval >= Duration::from_millis(100),
            "allocation.interval must be at least 100ms"
        );
        ensure!(
            self.horizon >= self.interval,
            "allocation.horizon must be at least one interval"
        );
        ensure!(
            self.lstm_train_every <= 1_000_000,
            "allocation.lstm_train_every must be at most 1000000 (0: no LSTM)"
        );
        self.pool.check("allocation.pool")?;
        self.min.check("allocation.min")?;
        plain_name("allocation.component_tag", &self.component_tag)?;
        for r in Resource::ALL {
            let s = self.usage.get(r);
            plain_name("a usage measurement", &s.measurement)?;
            plain_name("a usage field", &s.field)?;
            ensure!(
                s.scale.is_finite() && s.scale > 0.0,
                "allocation.usage.{r}.scale must be positive"
            );
        }
        if let Some(d) = &self.disk_device {
            device(d)?;
        }
        if let Some(url) = &self.webhook {
            Webhook::new(url)?;
        }
        let mut seen = std::collections::HashSet::new();
        for c in &self.components {
            plain_name("component name", &c.name)?;
            ensure!(
                seen.insert(&c.name),
                "component {:?} is listed twice",
                c.name
            );
            ensure!(
                c.weight.is_finite() && c.weight > 0.0,
                "component {:?}: weight must be positive",
                c.name
            );
            target(c).with_context(|| format!("component {:?}", c.name))?;
            c.preferences
                .preferences()
                .with_context(|| format!("component {:?}: preferences", c.name))?;
        }
        ensure!(
            !self.enabled || !self.components.is_empty(),
            "allocation is enabled but no [[allocation.components]] is configured"
        );
        Ok(())
    }

    /// The engine's preferences for a component: `p`, with the resources no plugin here can
    /// apply left unmanaged (disk bandwidth without a `disk_device`, network without a
    /// `tc_interface`, unless a webhook takes them), so they are neither allocated nor
    /// audited: before, the audit filled with raises of disk bandwidth from 0 to 8e-9 bytes/s
    /// that nothing could apply.
    fn engine_preferences(&self, p: &PreferencesConfig) -> anyhow::Result<Preferences> {
        let mut prefs = p.preferences()?;
        let webhook = self.webhook.is_some();
        prefs.unmanaged[Resource::Disk.index()] |= self.disk_device.is_none() && !webhook;
        prefs.unmanaged[Resource::Net.index()] |= self.tc_interface.is_none() && !webhook;
        Ok(prefs)
    }

    fn timing(&self) -> Timing {
        Timing {
            interval: self.interval,
            horizon: self.horizon,
            release_after: self.release_after,
            judge_after: self.judge_after,
            age_after: self.age_after,
        }
    }

    fn version(&self) -> CgroupVersion {
        match self.cgroup_version {
            CgroupVersion::Auto if self.cgroup_root.join("cgroup.controllers").exists() => {
                CgroupVersion::V2
            }
            CgroupVersion::Auto => CgroupVersion::V1,
            v => v,
        }
    }
}

fn device(s: &str) -> anyhow::Result<(u32, u32)> {
    let parsed = s
        .split_once(':')
        .and_then(|(a, b)| Some((a.parse().ok()?, b.parse().ok()?)));
    parsed.with_context(|| format!("allocation.disk_device {s:?} must be major:minor, e.g. 8:0"))
}

fn target(c: &ComponentConfig) -> anyhow::Result<Target> {
    let cgroup = c
        .cgroup
        .clone()
        .unwrap_or_else(|| format!("forestall/{}", c.name));
    let mut t = Target::new(&c.name, cgroup)?;
    for f in &c.flows {
        t = t.with_flow(f.flow()?);
    }
    Ok(t)
}

/// The host's cores and memory (the default pool).
fn host_pool() -> (f64, f64) {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
    let mem = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|t| {
            let line = t.lines().find(|l| l.starts_with("MemTotal:"))?;
            let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
            Some(kb * 1024.0)
        })
        .unwrap_or(f64::INFINITY);
    (cores, mem)
}

/// The limits an actuator reports, in the loop's units (what a component starts from).
fn amounts_of(l: &Limits) -> PerResource<f64> {
    [
        l.cpu_millicores.map_or(f64::NAN, |m| m as f64 / 1000.0),
        l.memory_max_bytes.map_or(f64::NAN, |b| b as f64),
        l.net.map_or(f64::NAN, |n| n.rate_bytes as f64),
        l.io.and_then(|io| io.read_bps.or(io.write_bps))
            .map_or(f64::NAN, |b| b as f64),
    ]
}

/// The live loop's state, shared between its task and the HTTP API.
#[derive(Clone)]
pub struct Allocations {
    inner: Arc<Mutex<Live>>,
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
    reader: UsageReader,
    /// Where the learned state is kept.
    state_path: PathBuf,
    /// When it was last written.
    last_saved: Option<Instant>,
    saved_path: PathBuf,
    /// What each allocation query (`ALLOCATE` sink) asked for at its last run, by query.
    signals: BTreeMap<String, Vec<Signal>>,
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
            .and_then(|bytes| write_atomically(&self.state_path, &bytes));
        match kept {
            Ok(()) => self.last_saved = Some(Instant::now()),
            Err(e) => {
                tracing::warn!(error = %format!("{e:#}"), "could not keep the allocation state")
            }
        }
    }

    /// The allocation queries' rows still in force (stale ones are dropped): their usage
    /// replaces what was read for the round, and their demands go with the round's requests.
    fn signals_in_force(&mut self, usage: &mut [PerResource<f64>]) -> Vec<control::Demand> {
        let ttl = signal_ttl(self.config.interval);
        self.signals
            .retain(|_, rows| rows.iter().any(|s| s.at.elapsed() < ttl));
        let mut demands = Vec::new();
        for s in self.signals.values().flatten() {
            if let (Some(u), Some(row)) = (s.request.usage, usage.get_mut(s.component)) {
                row[s.resource.index()] = u;
            }
            let r = &s.request;
            if r.demand.is_some() || r.forecast.is_some() {
                demands.push(control::Demand {
                    component: s.component,
                    resource: s.resource,
                    demand: r.demand,
                    forecast: r.forecast,
                    risk: r.risk,
                });
            }
        }
        demands
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
    /// Builds the loop from `config`: the plugins (or a dry-run recorder), the engine with
    /// its pool, and every component at the limits its cgroup holds now. Preferences saved
    /// over the API (in `data_dir`) win over the configuration's.
    pub fn new(config: &AllocationConfig, data_dir: &Path) -> anyhow::Result<Self> {
        config.validate()?;
        let version = config.version();
        let root = &config.cgroup_root;
        let (kernel, meter): (Box<dyn Actuator>, Box<dyn Meter>) = match version {
            CgroupVersion::V2 => (Box::new(CgroupV2::new(root)), Box::new(CgroupV2::new(root))),
            _ => (Box::new(CgroupV1::new(root)), Box::new(CgroupV1::new(root))),
        };
        let actuator: Box<dyn Actuator> = if config.actuate {
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
            Box::new(Stack::new(plugins))
        } else {
            Box::new(DryRun::default())
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
        // Each component starts from what its cgroup holds; an unlimited resource from an
        // equal share of the pool (or its floor when the pool is unlimited). Nothing is
        // applied until a decision changes it.
        let n = targets.len().max(1) as f64;
        let initial = targets
            .iter()
            .map(|t| {
                let held = actuator
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
        let timing = config.timing();
        let min = config.min.per_resource().map(|m| m.unwrap_or(0.0));
        let engine = Engine::new(
            control::tuned(config.threshold, min, &timing),
            components,
            capacity,
            initial,
        )?;
        let units = Units {
            cpu_per_core: 1.0,
            mem_bytes: 1.0,
            net_bytes_per_sec: 1.0,
            disk_bytes_per_sec: 1.0,
            disk_device: config.disk_device.as_deref().map(device).transpose()?,
            memory_high_share: config.threshold,
        };
        let n = targets.len();
        let mut controller = Controller::new(
            engine,
            targets,
            actuator,
            units,
            forestall_models::forecast::ForecastConfig {
                lstm_train_every: config.lstm_train_every,
                ..timing.forecast()
            },
        )?;
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
                reader: UsageReader {
                    sources: config.usage.clone(),
                    tag: config.component_tag.clone(),
                    names: config.components.iter().map(|c| c.name.clone()).collect(),
                },
                state_path,
                last_saved: None,
                signals: BTreeMap::new(),
                health: None,
            })),
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
        if kept.is_empty() {
            live.signals.remove(query);
        } else {
            live.signals.insert(query.to_owned(), kept);
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

    /// Teaches the forecasters the usage stored for the rounds before now (as many as they
    /// keep), so that a restart does not start them cold. Returns the rounds learned.
    pub async fn warm_up(&self, store: &Store, query: &QueryEngine) -> usize {
        let (reader, stride) = {
            let live = self.live();
            (live.reader.clone(), live.config.interval.as_nanos() as i64)
        };
        let now = now_nanos();
        let rounds = control::HISTORY_ROUNDS;
        let history = reader
            .read(store, query, now - stride * rounds as i64, stride, rounds)
            .await;
        let known = |b: &Vec<PerResource<f64>>| b.iter().flatten().any(|v| v.is_finite());
        let Some(first) = history.iter().position(known) else {
            return 0;
        };
        let mut live = self.live();
        for usage in &history[first..] {
            live.controller.learn(usage);
        }
        live.last_round = Some(now);
        rounds - first
    }

    /// One round at the current time: meter, read usage since the last round, decide, apply,
    /// audit.
    pub async fn tick(&self, store: &Arc<Store>, query: &QueryEngine) -> anyhow::Result<()> {
        let now = now_nanos();
        let (since, reader) = {
            let live = self.live();
            let since = live
                .last_round
                .unwrap_or(now - live.config.interval.as_nanos() as i64);
            (since, live.reader.clone())
        };
        {
            let this = self.clone();
            let store = Arc::clone(store);
            tokio::task::spawn_blocking(move || this.collect(&store, now)).await??;
        }
        let usage = reader
            .read(store, query, since, now - since, 1)
            .await
            .pop()
            .unwrap_or_default();
        let this = self.clone();
        let store = Arc::clone(store);
        tokio::task::spawn_blocking(move || this.decide(&store, usage, now)).await?
    }

    /// Meters every component's cgroup and writes the rates to `forestall_usage`.
    fn collect(&self, store: &Store, now: i64) -> anyhow::Result<()> {
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
            let line = ParsedLine {
                line_number: 0,
                raw: "",
                series_raw: "",
                measurement: USAGE_MEASUREMENT.into(),
                tags: vec![(
                    live.config.component_tag.as_str().into(),
                    component.as_str().into(),
                )],
                fields: fields
                    .into_iter()
                    .filter_map(|(k, v)| Some((k.into(), FieldValue::Float(v?))))
                    .collect(),
                timestamp: now,
            };
            if !line.fields.is_empty() {
                line.write_to(&mut lines);
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

    /// Observes `usage`, runs the round, stores its audit rows.
    fn decide(
        &self,
        store: &Store,
        mut usage: Vec<PerResource<f64>>,
        now: i64,
    ) -> anyhow::Result<()> {
        let mut live = self.live();
        let demands = live.signals_in_force(&mut usage);
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
        let actuate = live.config.actuate;
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
        if live.last_saved.is_none_or(|at| at.elapsed() >= SAVE_EVERY) {
            live.save();
        }
        drop(live);
        let lines = audit_lines(&report, &names, actuate, now);
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
            "mode": if live.config.actuate { "actuate" } else { "dry-run" },
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
    #[error("could not save preferences: {0}")]
    Io(String),
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

/// Where usage is read from, and for which components.
#[derive(Debug, Clone)]
struct UsageReader {
    sources: UsageSources,
    tag: String,
    names: Vec<String>,
}

impl UsageReader {
    /// Usage of each component over `(from, from + bins × stride]`, in `bins` rounds of
    /// `stride` ns each: `[bin][component][resource]`, NaN where no row.
    async fn read(
        &self,
        store: &Store,
        query: &QueryEngine,
        from: i64,
        stride: i64,
        bins: usize,
    ) -> Vec<Vec<PerResource<f64>>> {
        let mut out = vec![vec![[f64::NAN; 4]; self.names.len()]; bins];
        let index: BTreeMap<&str, usize> = self
            .names
            .iter()
            .enumerate()
            .map(|(i, n)| (n.as_str(), i))
            .collect();
        let (tag, stride) = (&self.tag, stride.max(1));
        let to = from + stride * bins as i64;
        for r in Resource::ALL {
            let s = self.sources.get(r);
            // Nothing written yet (or not this field, or not this tag): no usage, no error.
            let Some(table) = store.table(&s.measurement) else {
                continue;
            };
            if !table.columns.contains_key(&s.field) || !table.columns.contains_key(tag) {
                continue;
            }
            let agg = match s.aggregate {
                Aggregate::Avg => "avg",
                Aggregate::Max => "max",
            };
            // Row time t falls in round (t − from − 1) / stride: rounds are (start, end].
            let sql = format!(
                "SELECT CAST(\"{tag}\" AS VARCHAR) AS c, \
                 CAST((CAST(time AS BIGINT) - {from} - 1) / {stride} AS BIGINT) AS b, \
                 CAST({agg}(CAST(\"{f}\" AS DOUBLE)) AS DOUBLE) AS v \
                 FROM \"{m}\" WHERE time > to_timestamp_nanos({from}) AND time <= to_timestamp_nanos({to}) \
                 AND \"{tag}\" IS NOT NULL GROUP BY 1, 2",
                f = s.field,
                m = s.measurement,
            );
            let batches = match query.sql(&sql).await {
                Ok((_, b)) => b,
                Err(e) => {
                    tracing::warn!(resource = %r, error = %e, "could not read usage");
                    continue;
                }
            };
            for b in batches {
                // VARCHAR may plan as Utf8View; one string type to read.
                let Ok(names) = arrow::compute::cast(b.column(0), &DataType::Utf8) else {
                    continue;
                };
                let (Some(c), Some(k), Some(v)) = (
                    names.as_string_opt::<i32>(),
                    b.column(1).as_primitive_opt::<Int64Type>(),
                    b.column(2).as_primitive_opt::<Float64Type>(),
                ) else {
                    continue;
                };
                for i in 0..b.num_rows() {
                    if c.is_null(i) || k.is_null(i) || v.is_null(i) {
                        continue;
                    }
                    let bin = usize::try_from(k.value(i)).ok().filter(|&k| k < bins);
                    if let (Some(bin), Some(&comp)) = (bin, index.get(c.value(i))) {
                        out[bin][comp][r.index()] = v.value(i) * s.scale;
                    }
                }
            }
        }
        out
    }
}

/// The audit rows of one round: one per decision, and one per failed apply.
fn audit_lines(report: &RoundReport, names: &[String], actuate: bool, now: i64) -> String {
    let mut out = String::new();
    let mut row = |component: &str,
                   resource: Option<Resource>,
                   action: &str,
                   fields: Vec<(&'static str, FieldValue<'_>)>| {
        let mut tags = vec![("component".into(), component.into())];
        if let Some(r) = resource {
            tags.push(("resource".into(), r.name().into()));
        }
        tags.push(("action".into(), action.into()));
        ParsedLine {
            line_number: 0,
            raw: "",
            series_raw: "",
            measurement: AUDIT_MEASUREMENT.into(),
            tags,
            fields: fields.into_iter().map(|(k, v)| (k.into(), v)).collect(),
            timestamp: now,
        }
        .write_to(&mut out);
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

/// Runs a round every `interval` until `shutdown` resolves. A failed round is logged and the
/// next one runs as usual.
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
        "allocation forecasters warmed up from stored usage"
    );
    let mut ticks = tokio::time::interval(interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => {
                let _ = tokio::task::spawn_blocking(move || allocations.save()).await;
                return;
            }
            _ = ticks.tick() => {
                if let Err(e) = allocations.tick(&store, &query).await {
                    tracing::warn!(error = %format!("{e:#}"), "allocation round failed");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests;
