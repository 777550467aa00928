//! `[allocation]`: the loop's configuration, checked by [`AllocationConfig::validate`] without
//! touching the machine, and the settings each part of the loop takes from it.

use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, ensure};
use forestall_actuators::alloc::{AllocConfig, PerResource, Preferences, Resource};
use forestall_actuators::webhook::Webhook;
use forestall_actuators::{CpuSet, Flow, Limits, Target};
use serde::{Deserialize, Serialize};

use crate::live::USAGE_MEASUREMENT;
use crate::round::{Controller, Timing};
use forestall_actuators::Actuator;
use forestall_actuators::alloc::Engine;
use forestall_actuators::stack::Units;
use forestall_models::forecast::ForecastConfig;

/// The headroom price by default: on the dev trace, under half of every baseline's
/// violations at its own slack, at slack 4.7 (docs/BENCHMARKS.md, "headroom priced per
/// component").
pub const HEADROOM_PRICE: f64 = 0.1;

/// What a priced headroom is judged on by default: two days of requests and usage.
pub const HEADROOM_WINDOW: Duration = Duration::from_secs(2 * 24 * 3600);

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
    /// Default 1 hour.
    #[serde(with = "humantime_serde")]
    pub release_after: Duration,
    /// A raise is judged this long after, and rolled back if usage never needed it.
    /// Default 8 hours.
    #[serde(with = "humantime_serde")]
    pub judge_after: Duration,
    /// A request deferred this long is served before other non-critical ones. Default 6 hours.
    #[serde(with = "humantime_serde")]
    pub age_after: Duration,
    /// Memory is kept at or above the component's peak memory usage over this long: no
    /// release goes below it, and a round that used more raises it at once (memory is not
    /// compressible; over `memory.max` is an OOM kill). Zero: not held. Default 24 hours.
    #[serde(with = "humantime_serde")]
    pub memory_hold: Duration,
    /// Keep usage under this share of the allocation (θ). Default 0.8.
    pub threshold: f64,
    /// The share of rounds in which a component's usage may pass θ × its allocation: the
    /// learned headroom grows 5 % each time it does and, above 0, shrinks a little each
    /// round it does not, settling where that share holds. Default 0: the headroom only
    /// grows (and shrinks when a raise is rolled back), which on noisy usage ratchets it
    /// up to 2×.
    pub violation_share: f64,
    /// Price headroom per component ([`crate::headroom`]): each component's headroom for
    /// each resource is the one that minimises its share of rounds over θ plus this price ×
    /// its unused allocation over the fleet's usage of that resource, judged on the last
    /// `headroom_window` of its requests and usage, so headroom goes where it prevents most
    /// violations (small components get more, large ones less). It then replaces
    /// `violation_share`'s feedback. Higher holds less; 0 turns it off. Default
    /// [`HEADROOM_PRICE`].
    pub headroom_price: f64,
    /// The rounds a priced headroom is judged on. Default 2 days.
    #[serde(with = "humantime_serde")]
    pub headroom_window: Duration,
    /// Run an LSTM beside each component's other forecasters, one training step every this
    /// many rounds (its CPU budget: about 0.2 ms per series per round at 32). Default 0: none.
    pub lstm_train_every: usize,
    /// Run one global LSTM ([`forestall_models::global`]) for every component and resource,
    /// trained a batch per round, beside each one's forecasters: it answers where its rolling
    /// error is lowest. Default true.
    pub global_lstm: bool,
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
            memory_hold: timing.memory_hold,
            threshold: 0.8,
            violation_share: 0.0,
            headroom_price: HEADROOM_PRICE,
            headroom_window: HEADROOM_WINDOW,
            lstm_train_every: 0,
            global_lstm: true,
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
    pub(crate) fn per_resource(&self) -> PerResource<Option<f64>> {
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
    pub(crate) fn get(&self, r: Resource) -> &UsageSource {
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
            (0.0..0.5).contains(&self.violation_share),
            "allocation.violation_share must be in [0, 0.5)"
        );
        ensure!(
            self.headroom_price.is_finite() && self.headroom_price >= 0.0,
            "allocation.headroom_price must be a finite number of at least 0"
        );
        ensure!(
            self.headroom_window >= self.interval,
            "allocation.headroom_window must be at least one interval"
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
    pub(crate) fn engine_preferences(&self, p: &PreferencesConfig) -> anyhow::Result<Preferences> {
        let mut prefs = p.preferences()?;
        let webhook = self.webhook.is_some();
        prefs.unmanaged[Resource::Disk.index()] |= self.disk_device.is_none() && !webhook;
        prefs.unmanaged[Resource::Net.index()] |= self.tc_interface.is_none() && !webhook;
        Ok(prefs)
    }

    /// The allocation engine's settings: the tuned ones ([`crate::round::tuned`]) at this
    /// config's threshold, floors and timings, with its violation share.
    pub fn engine_config(&self) -> AllocConfig {
        let min = self.min.per_resource().map(|m| m.unwrap_or(0.0));
        AllocConfig {
            violation_share: self.violation_share,
            ..crate::round::tuned(self.threshold, min, &self.timing())
        }
    }

    /// The loop's controller over `engine` (built from [`engine_config`](Self::engine_config)):
    /// its forecasts at this config's timings, with the LSTM and the priced headroom this
    /// config asks for. `serve` and `prevent replay` both build it here.
    pub fn controller(
        &self,
        engine: Engine,
        targets: Vec<Target>,
        actuator: Box<dyn Actuator>,
        units: Units,
    ) -> anyhow::Result<Controller> {
        let timing = self.timing();
        let mut controller = Controller::new(
            engine,
            targets,
            actuator,
            units,
            ForecastConfig {
                lstm_train_every: self.lstm_train_every,
                global: self.global_lstm,
                ..timing.forecast()
            },
        )?;
        if self.headroom_price > 0.0 {
            let window = timing.rounds(self.headroom_window) as usize;
            controller.price_headroom(self.headroom_price, window)?;
        }
        Ok(controller)
    }

    /// The loop's timings.
    pub fn timing(&self) -> Timing {
        Timing {
            interval: self.interval,
            horizon: self.horizon,
            release_after: self.release_after,
            judge_after: self.judge_after,
            age_after: self.age_after,
            memory_hold: self.memory_hold,
        }
    }

    pub(crate) fn version(&self) -> CgroupVersion {
        match self.cgroup_version {
            CgroupVersion::Auto if self.cgroup_root.join("cgroup.controllers").exists() => {
                CgroupVersion::V2
            }
            CgroupVersion::Auto => CgroupVersion::V1,
            v => v,
        }
    }
}

pub(crate) fn device(s: &str) -> anyhow::Result<(u32, u32)> {
    let parsed = s
        .split_once(':')
        .and_then(|(a, b)| Some((a.parse().ok()?, b.parse().ok()?)));
    parsed.with_context(|| format!("allocation.disk_device {s:?} must be major:minor, e.g. 8:0"))
}

pub(crate) fn target(c: &ComponentConfig) -> anyhow::Result<Target> {
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
pub(crate) fn host_pool() -> (f64, f64) {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
    let mem = host_memory().map_or(f64::INFINITY, |b| b as f64);
    (cores, mem)
}

/// The host's memory in bytes (`MemTotal` of /proc/meminfo).
pub fn host_memory() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// The limits an actuator reports, in the loop's units (what a component starts from).
pub(crate) fn amounts_of(l: &Limits) -> PerResource<f64> {
    [
        l.cpu_millicores.map_or(f64::NAN, |m| m as f64 / 1000.0),
        l.memory_max_bytes.map_or(f64::NAN, |b| b as f64),
        l.net.map_or(f64::NAN, |n| n.rate_bytes as f64),
        l.io.and_then(|io| io.read_bps.or(io.write_bps))
            .map_or(f64::NAN, |b| b as f64),
    ]
}
