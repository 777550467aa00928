//! `forestall replay --trace DIR --out FILE`: the allocation backtest.
//!
//! Implements the replay contract of `shared/data/alloc-dev/README.md`. A trace directory holds
//! `usage.csv` (`step,timestamp,component,cpu,mem,net,disk`), `components.csv`
//! (`component,tier,weight,deferrable,…`) and `meta.json` (step length, warm-up, threshold θ,
//! floors, the contended pool). Every allocator is driven step by step: the allocation for
//! step `t` is decided from the usage of steps before `t` only, which [`run`] enforces by
//! handing each allocator one step of usage at a time, after it has decided.
//!
//! Forestall's allocator is the live code path with simulated time: one
//! [`AutoForecaster`] per component and resource, requests sized by the allocation
//! [`Engine`] from the forecast's peak over the next hour ([`AutoForecaster::peak`]), and the
//! engine's round (preemption, deferral, hysteresis, rollback, feedback). Beside it run the
//! README's baselines: static, reactive (HPA-like), VPA-like and Autopilot-like.
//!
//! The report gives, per allocator, every figure the README lists: soft and hard violation
//! shares, the share of components with a hard violation, slack, churn, surge lead, and the
//! contended-pool figures (per-tier violations, deferred work's wait).

// Usage and allocations are parallel `[step][component][resource]` arrays; indexing them by
// the same counters reads more plainly than zipped iterators.
#![allow(clippy::needless_range_loop)]

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use forestall_actuators::alloc::{
    Action, Component, Decision, Engine, PerResource, Preferences, Resource,
};
use forestall_actuators::stack::Units;
use forestall_actuators::{DryRun, Target};

use crate::config::{AllocationConfig, Amounts};
use crate::round::{Controller, Timing};

/// Steps of forecast a request covers (an hour of 5-minute steps).
const HORIZON: usize = 12;

/// A trace, loaded.
#[derive(Debug, Clone)]
pub struct Trace {
    pub components: Vec<TraceComponent>,
    /// `usage[t][c][r]`, NaN where missing; only the visible steps.
    pub usage: Vec<Vec<PerResource<f64>>>,
    /// Steps to decide: the visible ones plus one (the contract's look-ahead check).
    pub steps: usize,
    pub warmup: usize,
    pub threshold: f64,
    pub step_seconds: f64,
    /// Unix time of step 0 (usage.csv's timestamp column; 0 when it has none that parse).
    pub start: f64,
    pub floors: PerResource<f64>,
    /// The contended case's pool capacity.
    pub capacity: Option<PerResource<f64>>,
}

#[derive(Debug, Clone)]
pub struct TraceComponent {
    pub name: String,
    pub tier: String,
    pub weight: f64,
    pub deferrable: bool,
}

/// Reads a trace directory.
pub fn load(dir: &Path) -> anyhow::Result<Trace> {
    let meta: serde_json::Value = serde_json::from_slice(
        &std::fs::read(dir.join("meta.json"))
            .with_context(|| format!("read {}/meta.json", dir.display()))?,
    )
    .context("parse meta.json")?;
    let num = |v: &serde_json::Value, what: &str| {
        v.as_f64()
            .with_context(|| format!("meta.json: {what} is missing or not a number"))
    };
    let n_steps = num(&meta["n_steps"], "n_steps")? as usize;
    let visible = match meta.get("n_steps_visible") {
        Some(v) => num(v, "n_steps_visible")? as usize,
        None => n_steps,
    };
    let mut floors = [0.0; 4];
    for r in Resource::ALL {
        floors[r.index()] = num(&meta["resources"][r.name()]["floor"], "a resource floor")?;
    }
    let capacity = match meta.get("contended").and_then(|c| c.get("capacity")) {
        Some(c) => {
            let mut cap = [0.0; 4];
            for r in Resource::ALL {
                cap[r.index()] = num(&c[r.name()], "a contended capacity")?;
            }
            Some(cap)
        }
        None => None,
    };

    let text =
        std::fs::read_to_string(dir.join("components.csv")).context("read components.csv")?;
    let mut lines = text.lines();
    let header: Vec<&str> = lines
        .next()
        .context("components.csv is empty")?
        .split(',')
        .collect();
    let col = |name: &str| {
        header
            .iter()
            .position(|h| *h == name)
            .with_context(|| format!("components.csv has no {name} column"))
    };
    let (ci, ti, wi, di) = (
        col("component")?,
        col("tier")?,
        col("weight")?,
        col("deferrable")?,
    );
    let mut components = Vec::new();
    for (n, line) in lines.enumerate().filter(|(_, l)| !l.trim().is_empty()) {
        let f: Vec<&str> = line.split(',').collect();
        let get = |i: usize| {
            f.get(i)
                .copied()
                .with_context(|| format!("components.csv line {}: too few fields", n + 2))
        };
        components.push(TraceComponent {
            name: get(ci)?.to_owned(),
            tier: get(ti)?.to_owned(),
            weight: get(wi)?
                .parse()
                .with_context(|| format!("components.csv line {}: weight", n + 2))?,
            deferrable: get(di)? == "1" || get(di)?.eq_ignore_ascii_case("true"),
        });
    }
    ensure!(!components.is_empty(), "components.csv lists no component");
    let index: BTreeMap<&str, usize> = components
        .iter()
        .enumerate()
        .map(|(i, c)| (c.name.as_str(), i))
        .collect();

    let text = std::fs::read_to_string(dir.join("usage.csv")).context("read usage.csv")?;
    let mut usage = vec![vec![[f64::NAN; 4]; components.len()]; visible];
    let mut start = None;
    for (n, line) in text
        .lines()
        .enumerate()
        .skip(1)
        .filter(|(_, l)| !l.trim().is_empty())
    {
        let f: Vec<&str> = line.split(',').collect();
        if f.len() < 7 {
            bail!("usage.csv line {}: expected 7 fields", n + 1);
        }
        let step: usize = f[0]
            .parse()
            .with_context(|| format!("usage.csv line {}: step", n + 1))?;
        let Some(&c) = index.get(f[2]) else {
            bail!("usage.csv line {}: unknown component {}", n + 1, f[2]);
        };
        if step >= visible {
            continue;
        }
        if start.is_none()
            && let Ok(t) = f[1].parse::<f64>()
        {
            start = Some(t - step as f64 * num(&meta["step_seconds"], "step_seconds")?);
        }
        for r in 0..4 {
            usage[step][c][r] = f[3 + r]
                .parse()
                .with_context(|| format!("usage.csv line {}: value {}", n + 1, f[3 + r]))?;
        }
    }
    Ok(Trace {
        components,
        usage,
        steps: (visible + 1).min(n_steps.max(visible)),
        warmup: num(&meta["warmup_steps"], "warmup_steps")? as usize,
        threshold: num(&meta["threshold"], "threshold")?,
        step_seconds: num(&meta["step_seconds"], "step_seconds")?,
        start: start.unwrap_or(0.0),
        floors,
        capacity,
    })
}

/// An allocator under replay: told each step's usage only after deciding that step.
pub trait Allocator {
    fn name(&self) -> String;
    /// The allocation of every component for step `t`; `last` is the usage of step `t − 1`
    /// (`None` at the first step).
    fn decide(&mut self, t: usize, last: Option<&[PerResource<f64>]>) -> Vec<PerResource<f64>>;
}

/// Drives `a` over the trace: `alloc[t][c][r]` for every step to decide.
pub fn run(a: &mut dyn Allocator, trace: &Trace) -> Vec<Vec<PerResource<f64>>> {
    (0..trace.steps)
        .map(|t| {
            let last = t
                .checked_sub(1)
                .and_then(|s| trace.usage.get(s))
                .map(Vec::as_slice);
            a.decide(t, last)
        })
        .collect()
}

/// Per-component, per-resource history kept by the baselines.
struct Histories {
    values: Vec<[Vec<f64>; 4]>,
}

impl Histories {
    fn new(n: usize) -> Self {
        Self {
            values: (0..n).map(|_| Default::default()).collect(),
        }
    }

    fn push(&mut self, last: Option<&[PerResource<f64>]>) {
        if let Some(last) = last {
            for (h, u) in self.values.iter_mut().zip(last) {
                for r in 0..4 {
                    // A missing value repeats the last known one.
                    let v = if u[r].is_finite() {
                        u[r]
                    } else {
                        h[r].last().copied().unwrap_or(0.0)
                    };
                    h[r].push(v);
                }
            }
        }
    }
}

fn quantile(mut v: Vec<f64>, q: f64) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    let k = ((v.len() - 1) as f64 * q).round() as usize;
    *v.select_nth_unstable_by(k, f64::total_cmp).1
}

/// Static: 1.1 × the warm-up peak (the running peak during warm-up).
struct Static {
    h: Histories,
    warmup: usize,
    floors: PerResource<f64>,
}

impl Allocator for Static {
    fn name(&self) -> String {
        "static (1.1 × warm-up peak)".into()
    }

    fn decide(&mut self, _t: usize, last: Option<&[PerResource<f64>]>) -> Vec<PerResource<f64>> {
        self.h.push(last);
        let floors = self.floors;
        let warmup = self.warmup;
        self.h
            .values
            .iter()
            .map(|h| {
                std::array::from_fn(|r| {
                    let seen = &h[r][..h[r].len().min(warmup)];
                    (1.1 * seen.iter().copied().fold(0.0, f64::max)).max(floors[r])
                })
            })
            .collect()
    }
}

/// Reactive, HPA-like: target 70% utilisation, 10% tolerance, 30-minute down-scale hold.
struct Reactive {
    alloc: Vec<PerResource<f64>>,
    desired: Vec<[Vec<f64>; 4]>,
    floors: PerResource<f64>,
    hold: usize,
}

impl Allocator for Reactive {
    fn name(&self) -> String {
        "reactive, HPA-like (70%, ±10%, 30-min hold)".into()
    }

    fn decide(&mut self, _t: usize, last: Option<&[PerResource<f64>]>) -> Vec<PerResource<f64>> {
        let Some(last) = last else {
            return self.alloc.clone();
        };
        for (c, u) in last.iter().enumerate() {
            for r in 0..4 {
                if !u[r].is_finite() {
                    continue;
                }
                let a = self.alloc[c][r];
                let desired = (u[r] / 0.7).max(self.floors[r]);
                let d = &mut self.desired[c][r];
                d.push(desired);
                if d.len() > self.hold {
                    d.remove(0);
                }
                if (u[r] / a / 0.7 - 1.0).abs() <= 0.1 {
                    continue;
                }
                if desired > a {
                    self.alloc[c][r] = desired;
                } else {
                    // Scale down only to the highest recommendation of the hold window.
                    self.alloc[c][r] = d.iter().copied().fold(0.0, f64::max);
                }
            }
        }
        self.alloc.clone()
    }
}

/// VPA-like: P90 of a histogram decaying with a 24-hour half-life, × 1.15; applied when the
/// current allocation is more than 10% away from it.
struct Vpa {
    h: Histories,
    alloc: Vec<PerResource<f64>>,
    half_life: f64,
    floors: PerResource<f64>,
}

impl Allocator for Vpa {
    fn name(&self) -> String {
        "VPA-like (P90, 24-h decay, × 1.15)".into()
    }

    fn decide(&mut self, _t: usize, last: Option<&[PerResource<f64>]>) -> Vec<PerResource<f64>> {
        self.h.push(last);
        for (c, h) in self.h.values.iter().enumerate() {
            for r in 0..4 {
                let v = &h[r];
                if v.is_empty() {
                    continue;
                }
                let n = v.len();
                let mut w: Vec<(f64, f64)> = v
                    .iter()
                    .enumerate()
                    .map(|(i, &x)| (x, 0.5f64.powf((n - 1 - i) as f64 / self.half_life)))
                    .collect();
                w.sort_by(|a, b| a.0.total_cmp(&b.0));
                let total: f64 = w.iter().map(|x| x.1).sum();
                let mut acc = 0.0;
                let p90 = w
                    .iter()
                    .find(|x| {
                        acc += x.1;
                        acc >= 0.9 * total
                    })
                    .map_or(0.0, |x| x.0);
                let target = (1.15 * p90).max(self.floors[r]);
                let a = &mut self.alloc[c][r];
                if (target - *a).abs() > 0.1 * *a {
                    *a = target;
                }
            }
        }
        self.alloc.clone()
    }
}

/// Autopilot-like: max(P95 of the last day, last-hour peak) × 1.15; memory: 48-hour peak
/// × 1.15.
struct Autopilot {
    h: Histories,
    day: usize,
    floors: PerResource<f64>,
}

impl Allocator for Autopilot {
    fn name(&self) -> String {
        "Autopilot-like (max(P95, 1-h peak) × 1.15)".into()
    }

    fn decide(&mut self, _t: usize, last: Option<&[PerResource<f64>]>) -> Vec<PerResource<f64>> {
        self.h.push(last);
        let (day, floors) = (self.day, self.floors);
        self.h
            .values
            .iter()
            .map(|h| {
                std::array::from_fn(|r| {
                    let v = &h[r];
                    let tail = |n: usize| &v[v.len().saturating_sub(n)..];
                    let target = if r == Resource::Mem.index() {
                        tail(2 * day).iter().copied().fold(0.0, f64::max)
                    } else {
                        let p95 = quantile(tail(day).to_vec(), 0.95);
                        p95.max(tail(HORIZON).iter().copied().fold(0.0, f64::max))
                    };
                    (1.15 * target).max(floors[r])
                })
            })
            .collect()
    }
}

/// How the replay runs Forestall (the defaults are the product's).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Options {
    /// Run the LSTM beside the other forecasters, one training step every this many rounds
    /// (0: none).
    pub lstm_train_every: usize,
    /// Run the global LSTM (`allocation.global_lstm`).
    pub global_lstm: bool,
    /// Price headroom per component ([`crate::headroom`]) over [`HEADROOM_WINDOW`]
    /// (0: the engine's feedback sets it).
    ///
    /// [`HEADROOM_WINDOW`]: crate::config::HEADROOM_WINDOW
    pub headroom_price: f64,
    /// A release waits until every request of this long sits well below the allocation
    /// (`allocation.release_after`).
    pub release_after: Duration,
    /// Memory is held at its peak usage of this long (`allocation.memory_hold`; zero: not).
    pub memory_hold: Duration,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            lstm_train_every: 0,
            global_lstm: AllocationConfig::default().global_lstm,
            headroom_price: AllocationConfig::default().headroom_price,
            release_after: Timing::measured(Duration::from_secs(60)).release_after,
            memory_hold: Timing::measured(Duration::from_secs(60)).memory_hold,
        }
    }
}

/// Forestall: the live allocation step ([`Controller`]) with simulated time, driving a
/// recording actuator.
#[derive(Debug)]
pub struct Forestall {
    controller: Controller,
    /// What live would apply, recorded: every round's changed components go through
    /// `Engine::limits` to this actuator, as they would to a plugin stack.
    actuator: Arc<DryRun>,
    /// The trace's clock: step t's usage is from `start + t × step_seconds`.
    start: f64,
    step_seconds: f64,
}

/// The trace's units as kernel terms: MHz counted as thousandths of a 1 GHz core, MB, KB/s
/// (disk on device 8:0). The replay only records what it would apply.
pub const TRACE_UNITS: Units = Units {
    cpu_per_core: 1000.0,
    mem_bytes: 1_048_576.0,
    net_bytes_per_sec: 1024.0,
    disk_bytes_per_sec: 1024.0,
    disk_device: Some((8, 0)),
    memory_high_share: 0.9,
};

impl Forestall {
    /// Forestall on `trace`, with the contended pool or without, with `options`.
    pub fn new(trace: &Trace, contended: bool, options: &Options) -> anyhow::Result<Self> {
        // The live defaults at the trace's step (a request covers the next hour), derived as
        // the server derives them.
        let step = Duration::from_secs_f64(trace.step_seconds);
        let config = AllocationConfig {
            interval: step,
            horizon: step * HORIZON as u32,
            release_after: options.release_after,
            memory_hold: options.memory_hold,
            threshold: trace.threshold,
            min: Amounts {
                cpu: Some(trace.floors[0]),
                mem: Some(trace.floors[1]),
                net: Some(trace.floors[2]),
                disk: Some(trace.floors[3]),
            },
            headroom_price: options.headroom_price,
            lstm_train_every: options.lstm_train_every,
            global_lstm: options.global_lstm,
            ..AllocationConfig::default()
        };
        let components: Vec<Component> = trace
            .components
            .iter()
            .map(|c| Component {
                name: c.name.clone(),
                weight: c.weight,
                deferrable: c.deferrable,
                preferences: Preferences::default(),
            })
            .collect();
        let capacity = match (contended, trace.capacity) {
            (true, Some(c)) => c.map(Some),
            _ => [None; 4],
        };
        let initial = vec![trace.floors; components.len()];
        let engine = Engine::new(config.engine_config(), components, capacity, initial)?;
        let targets = trace
            .components
            .iter()
            .map(|c| Target::new(&c.name, format!("forestall/{}", c.name)))
            .collect::<Result<_, _>>()?;
        let actuator = Arc::new(DryRun::default());
        let controller = config.controller(
            engine,
            targets,
            Box::new(Arc::clone(&actuator)),
            TRACE_UNITS,
        )?;
        Ok(Self {
            controller,
            actuator,
            start: trace.start,
            step_seconds: trace.step_seconds,
        })
    }

    /// The recording actuator and the target of each component.
    pub fn recorded(&self) -> (&DryRun, &[Target]) {
        (&self.actuator, self.controller.targets())
    }

    pub fn engine(&self) -> &Engine {
        self.controller.engine()
    }
}

impl Allocator for Forestall {
    fn name(&self) -> String {
        "forestall (forecast + allocation engine)".into()
    }

    fn decide(&mut self, t: usize, last: Option<&[PerResource<f64>]>) -> Vec<PerResource<f64>> {
        if let Some(last) = last {
            // `last` is step t − 1's usage.
            let time = self.start + (t as f64 - 1.0) * self.step_seconds;
            self.controller.set_clock(time);
            self.controller.observe(last);
        }
        let report = self.controller.round(t as u64);
        if let Some((c, _, Err(e))) = report.applied.iter().find(|a| a.2.is_err()) {
            panic!("the recording actuator refused component {c}: {e}");
        }
        let engine = self.controller.engine();
        (0..engine.components().len())
            .map(|c| engine.allocation(c))
            .collect()
    }
}

/// The README's figures for one allocator on one run.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Figures {
    pub soft: f64,
    pub hard: f64,
    pub components_with_hard: f64,
    pub slack: f64,
    pub churn_per_day: f64,
    pub surges: usize,
    pub proactive: f64,
    pub headroom: f64,
    pub missed: f64,
    pub mean_lag_steps: f64,
    /// Soft violation share per tier (contended runs).
    pub per_tier: BTreeMap<String, f64>,
}

/// Scores allocations against the usage over the scored steps (after warm-up).
pub fn figures(trace: &Trace, alloc: &[Vec<PerResource<f64>>]) -> Figures {
    let theta = trace.threshold;
    let n = trace.usage.len().min(alloc.len());
    let comps = trace.components.len();
    let (mut soft, mut hard, mut cells) = (0usize, 0usize, 0usize);
    let mut hard_comp = vec![false; comps];
    let mut tier: BTreeMap<String, (usize, usize)> = BTreeMap::new();
    let (mut over, mut used) = ([0.0; 4], [0.0; 4]);
    let mut changes = 0usize;
    for t in trace.warmup..n {
        for c in 0..comps {
            let e = tier.entry(trace.components[c].tier.clone()).or_default();
            for r in 0..4 {
                let (u, a) = (trace.usage[t][c][r], alloc[t][c][r]);
                if t > 0 && (a - alloc[t - 1][c][r]).abs() > 0.01 * alloc[t - 1][c][r] {
                    changes += 1;
                }
                if !u.is_finite() {
                    continue;
                }
                cells += 1;
                e.1 += 1;
                if u > theta * a {
                    soft += 1;
                    e.0 += 1;
                }
                if u > a {
                    hard += 1;
                    hard_comp[c] = true;
                }
                over[r] += (a - u).max(0.0);
                used[r] += u;
            }
        }
    }
    let days = (n.saturating_sub(trace.warmup)) as f64 * trace.step_seconds / 86_400.0;
    let slack = (0..4)
        .map(|r| {
            if used[r] > 0.0 {
                over[r] / used[r]
            } else {
                0.0
            }
        })
        .sum::<f64>()
        / 4.0;

    // Surges: a value at least 1.5 × the previous hour's median and above its maximum, and
    // well above the resource's floor; one per hour per component and resource.
    let (mut proactive, mut standing, mut missed, mut lag_sum, mut lagged) =
        (0, 0, 0, 0usize, 0usize);
    for c in 0..comps {
        for r in 0..4 {
            let mut last_surge: Option<usize> = None;
            for t in trace.warmup.max(HORIZON)..n {
                let u = trace.usage[t][c][r];
                let prev: Vec<f64> = (t - HORIZON..t)
                    .map(|s| trace.usage[s][c][r])
                    .filter(|v| v.is_finite())
                    .collect();
                if !u.is_finite() || prev.len() < HORIZON / 2 || u < 2.0 * trace.floors[r] {
                    continue;
                }
                let median = quantile(prev.clone(), 0.5);
                let max = prev.iter().copied().fold(0.0, f64::max);
                if !(u >= 1.5 * median && u > max) || last_surge.is_some_and(|s| t < s + HORIZON) {
                    continue;
                }
                last_surge = Some(t);
                let need = u / theta;
                if alloc[t][c][r] >= need {
                    if alloc[t - HORIZON][c][r] >= need {
                        standing += 1;
                    } else {
                        proactive += 1;
                    }
                } else {
                    missed += 1;
                    if let Some(k) = (t..n).find(|&s| alloc[s][c][r] >= need) {
                        lag_sum += k - t;
                        lagged += 1;
                    }
                }
            }
        }
    }
    let surges = proactive + standing + missed;
    let share = |k: usize| {
        if surges == 0 {
            0.0
        } else {
            k as f64 / surges as f64
        }
    };
    Figures {
        soft: soft as f64 / cells.max(1) as f64,
        hard: hard as f64 / cells.max(1) as f64,
        components_with_hard: hard_comp.iter().filter(|&&h| h).count() as f64 / comps.max(1) as f64,
        slack,
        churn_per_day: changes as f64 / comps.max(1) as f64 / days.max(1e-9),
        surges,
        proactive: share(proactive),
        headroom: share(standing),
        missed: share(missed),
        mean_lag_steps: if lagged == 0 {
            0.0
        } else {
            lag_sum as f64 / lagged as f64
        },
        per_tier: tier
            .into_iter()
            .map(|(k, (v, n))| (k, v as f64 / n.max(1) as f64))
            .collect(),
    }
}

/// Scales every allocation down in proportion when a resource's total exceeds the pool: how
/// the baselines, which know nothing of each other, meet a short pool.
fn squeeze(alloc: &mut [Vec<PerResource<f64>>], capacity: PerResource<f64>) {
    for step in alloc.iter_mut() {
        for r in 0..4 {
            let total: f64 = step.iter().map(|a| a[r]).sum();
            if total > capacity[r] {
                for a in step.iter_mut() {
                    a[r] *= capacity[r] / total;
                }
            }
        }
    }
}

fn baselines(trace: &Trace) -> Vec<Box<dyn Allocator>> {
    let n = trace.components.len();
    let day = (86_400.0 / trace.step_seconds).round() as usize;
    vec![
        Box::new(Static {
            h: Histories::new(n),
            warmup: trace.warmup,
            floors: trace.floors,
        }),
        Box::new(Reactive {
            alloc: vec![trace.floors; n],
            desired: (0..n).map(|_| Default::default()).collect(),
            floors: trace.floors,
            hold: (1800.0 / trace.step_seconds).round().max(1.0) as usize,
        }),
        Box::new(Vpa {
            h: Histories::new(n),
            alloc: vec![trace.floors; n],
            half_life: day as f64,
            floors: trace.floors,
        }),
        Box::new(Autopilot {
            h: Histories::new(n),
            day,
            floors: trace.floors,
        }),
    ]
}

/// Runs Forestall and the baselines on a trace, writes Forestall's allocations to `out`
/// (`component,resource,step,allocation`, rows where the value changes) and returns the
/// report. With `contended`, the allocations written are those of the run within the pool
/// of `meta.json` (so that an outside scorer judges the priority handling itself), and a
/// trace without a pool is an error.
pub fn replay(
    dir: &Path,
    out: &Path,
    options: &Options,
    contended: bool,
) -> anyhow::Result<String> {
    let trace = load(dir)?;
    ensure!(
        !contended || trace.capacity.is_some(),
        "--contended needs a pool: {} has no contended.capacity in meta.json",
        dir.display()
    );
    let started = Instant::now();
    let mut forestall = Forestall::new(&trace, false, options)?;
    let ours = run(&mut forestall, &trace);
    let elapsed = started.elapsed();
    if !contended {
        write_allocations(&trace, &ours, out)?;
    }

    let mut report = format!(
        "replay: {} components, {} steps ({} scored), θ = {}; forestall's {} steps took {:.2} s\n\n",
        trace.components.len(),
        trace.steps,
        trace.usage.len().saturating_sub(trace.warmup),
        trace.threshold,
        trace.steps,
        elapsed.as_secs_f64()
    );
    writeln!(
        report,
        "{:<46} {:>7} {:>7} {:>9} {:>6} {:>9} {:>7} {:>9} {:>8} {:>7} {:>8}",
        "allocator",
        "soft%",
        "hard%",
        "hardcomp%",
        "slack",
        "chg/c/d",
        "surges",
        "proactive",
        "headroom",
        "missed",
        "lag(min)"
    )?;
    let count =
        |f: &dyn Fn(&Action) -> bool| forestall.engine().audit().filter(|d| f(&d.action)).count();
    let decisions = format!(
        "forestall's decisions: {} raises, {} releases, {} rollbacks\n",
        count(&|a| *a == Action::Raise),
        count(&|a| *a == Action::Release),
        count(&|a| *a == Action::Rollback)
    );
    let mut results = vec![(forestall.name(), ours)];
    for mut b in baselines(&trace) {
        let a = run(b.as_mut(), &trace);
        results.push((b.name(), a));
    }
    for (name, a) in &results {
        let f = figures(&trace, a);
        writeln!(
            report,
            "{name:<46} {:>6.2}% {:>6.2}% {:>8.1}% {:>6.2} {:>9.2} {:>7} {:>8.1}% {:>7.1}% {:>6.1}% {:>8.1}",
            100.0 * f.soft,
            100.0 * f.hard,
            100.0 * f.components_with_hard,
            f.slack,
            f.churn_per_day,
            f.surges,
            100.0 * f.proactive,
            100.0 * f.headroom,
            100.0 * f.missed,
            f.mean_lag_steps * trace.step_seconds / 60.0
        )?;
    }
    report.push_str(&decisions);
    writeln!(
        report,
        "forestall applied {} changes through the recording actuator",
        forestall.recorded().0.requests().len()
    )?;

    if let Some(capacity) = trace.capacity {
        writeln!(
            report,
            "\ncontended pool (capacity {capacity:?}): soft violation share per tier"
        )?;
        let mut within = Forestall::new(&trace, true, options)?;
        let ours = run(&mut within, &trace);
        if contended {
            write_allocations(&trace, &ours, out)?;
        }
        let mut rows = vec![(within.name(), ours)];
        for mut b in baselines(&trace) {
            let mut a = run(b.as_mut(), &trace);
            squeeze(&mut a, capacity);
            rows.push((format!("{} (scaled to the pool)", b.name()), a));
        }
        for (name, a) in &rows {
            let f = figures(&trace, a);
            let tiers: Vec<String> = f
                .per_tier
                .iter()
                .map(|(k, v)| format!("{k} {:.2}%", 100.0 * v))
                .collect();
            writeln!(
                report,
                "{name:<70} {}  (all {:.2}%, slack {:.2})",
                tiers.join("  "),
                100.0 * f.soft,
                f.slack
            )?;
        }
        let audit: Vec<&Decision> = within.engine().audit().collect();
        let deferred = audit
            .iter()
            .filter(|d| matches!(d.action, Action::Deferred { .. }))
            .count();
        let waits: Vec<u64> = audit
            .iter()
            .filter_map(|d| match d.action {
                Action::Granted { waited } => Some(waited),
                _ => None,
            })
            .collect();
        // Memory is not deferrable work: it waits only for memory to come free.
        let longest_work = audit
            .iter()
            .filter_map(|d| match d.action {
                Action::Granted { waited } if d.resource != Resource::Mem => Some(waited),
                _ => None,
            })
            .max()
            .unwrap_or(0);
        let preempted = audit
            .iter()
            .filter(|d| matches!(d.action, Action::Preempted { .. }))
            .count();
        let minutes = |steps: u64| steps as f64 * trace.step_seconds / 60.0;
        let waiting = within.engine().deferred();
        let last_round = trace.steps.saturating_sub(1) as u64;
        let oldest = waiting
            .iter()
            .map(|d| last_round.saturating_sub(d.since))
            .max()
            .unwrap_or(0);
        writeln!(
            report,
            "forestall: {deferred} requests deferred, {} met later (mean wait {:.1} min, longest {:.0} min; for CPU, network and disk {:.0} min), {} still waiting at the end (the oldest for {:.0} min); {preempted} preemptions",
            waits.len(),
            minutes(waits.iter().sum::<u64>()) / waits.len().max(1) as f64,
            minutes(waits.iter().copied().max().unwrap_or(0)),
            minutes(longest_work),
            waiting.len(),
            minutes(oldest)
        )?;
    }
    Ok(report)
}

fn write_allocations(
    trace: &Trace,
    alloc: &[Vec<PerResource<f64>>],
    out: &Path,
) -> anyhow::Result<()> {
    use std::io::Write as _;
    if let Some(dir) = out.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    }
    let mut w = std::io::BufWriter::new(
        std::fs::File::create(out).with_context(|| format!("create {}", out.display()))?,
    );
    writeln!(w, "component,resource,step,allocation")?;
    for (c, comp) in trace.components.iter().enumerate() {
        for r in Resource::ALL {
            let mut last = f64::NAN;
            for (t, step) in alloc.iter().enumerate() {
                let a = step[c][r.index()];
                if a != last {
                    writeln!(w, "{},{},{t},{a}", comp.name, r.name())?;
                    last = a;
                }
            }
        }
    }
    w.flush()?;
    Ok(())
}

#[cfg(test)]
#[path = "replay/tests.rs"]
mod tests;
