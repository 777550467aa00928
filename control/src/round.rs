//! One allocation round, from usage to the kernel: the step `serve` runs every interval and
//! `replay` runs every trace step, the same code in both.
//!
//! A [`Controller`] keeps one [`AutoForecaster`] per component and resource, and a Bayesian
//! risk model per component. Each round it is told the usage of the round just past
//! ([`Controller::observe`]: forecasters learn it, the risk model gets its evidence and counts
//! the outcomes now known); then [`Controller::round`] forecasts the horizon, sizes one
//! [`Request`] per component and resource (the forecast's peak, [`AutoForecaster::peak`], over
//! θ, times learned headroom; the need is the mean's peak over θ; the risk is the Bayesian
//! one), runs the
//! engine's round, and applies every changed component's [`Engine::limits`] through its
//! actuator: only the resources the engine has changed, so a resource still at its starting
//! allocation keeps whatever the kernel has. A component whose apply failed stays pending and
//! is applied again every round until the actuator takes it, so the kernel catches up with
//! the engine after a transient failure.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use forestall_actuators::alloc::{
    Action, AllocConfig, Decision, Engine, EngineState, PerResource, Request, Resource,
};
use forestall_actuators::stack::Units;
use forestall_actuators::{Actuator, Limits, Target};
use std::collections::VecDeque;

use crate::headroom::PricedHeadroom;
use forestall_models::forecast::{AutoForecaster, ForecastConfig, Step};
use forestall_models::global::{GlobalConfig, GlobalLstm, GlobalStats, SeriesId, kind_of};
use forestall_models::risk::{
    self as bayes_risk, MetricObs, MetricSpec, Observation, RiskConfig, RiskModel,
};

/// Rounds of usage each forecaster keeps (three of its longest seasonal period): what a warm
/// start reads back.
pub const HISTORY_ROUNDS: usize = 900;

/// The most steps ahead the global LSTM forecasts (a head of twice this many outputs).
const GLOBAL_HORIZON: usize = 96;

/// How long the engine waits before acting, as durations; [`tuned`] turns them into rounds.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Timing {
    /// A round's length (the forecast step).
    pub interval: Duration,
    /// The forecast horizon a request covers.
    pub horizon: Duration,
    /// A release waits until every request of this long is well below the allocation.
    pub release_after: Duration,
    /// A raise is judged (and rolled back if it did not help) this long after.
    pub judge_after: Duration,
    /// A request deferred this long goes before every other non-critical request.
    pub age_after: Duration,
    /// Memory is kept at or above its peak usage of this long (zero: not held).
    pub memory_hold: Duration,
}

impl Timing {
    /// The settings measured on the dev trace (docs/BENCHMARKS.md), at a round of `interval`.
    pub fn measured(interval: Duration) -> Self {
        Self {
            interval,
            horizon: Duration::from_secs(3600),
            release_after: Duration::from_secs(3600),
            judge_after: Duration::from_secs(8 * 3600),
            age_after: Duration::from_secs(6 * 3600),
            memory_hold: Duration::from_secs(24 * 3600),
        }
    }

    /// Forecasts of one step per round over the horizon (no LSTM).
    pub fn forecast(&self) -> ForecastConfig {
        ForecastConfig {
            horizon: self.rounds(self.horizon) as usize,
            ..ForecastConfig::default()
        }
    }

    /// `d` in whole rounds, at least one.
    pub fn rounds(&self, d: Duration) -> u64 {
        (d.as_secs_f64() / self.interval.as_secs_f64().max(1e-3))
            .round()
            .max(1.0) as u64
    }
}

/// The engine settings measured on the dev trace: a 10% raise band with a 30% overshoot,
/// releases only when every request of `release_after` sits 40% below the allocation (up to
/// 90% at once, so a release is one change, not three), raises judged after `judge_after`,
/// memory held at its peak usage of `memory_hold`. That held churn under 12 changes per
/// component per day (docs/BENCHMARKS.md).
pub fn tuned(threshold: f64, min: PerResource<f64>, timing: &Timing) -> AllocConfig {
    AllocConfig {
        threshold,
        min,
        up_band: 0.1,
        overshoot: 0.3,
        down_band: 0.4,
        cooldown: timing.rounds(timing.release_after),
        max_step_down: 0.9,
        rollback_after: timing.rounds(timing.judge_after),
        age_after: timing.rounds(timing.age_after),
        hold_peak: [
            0,
            if timing.memory_hold.is_zero() {
                0
            } else {
                timing.rounds(timing.memory_hold)
            },
            0,
            0,
        ],
        ..AllocConfig::default()
    }
}

/// What an allocation query (a continuous query with an `ALLOCATE` sink) asks for a
/// component's resource this round, beyond what the loop's own forecast asks.
#[derive(Debug, Clone, PartialEq)]
pub struct Demand {
    /// The query that asks: named in the reasons of the decisions it drove.
    pub query: String,
    pub component: usize,
    pub resource: Resource,
    /// An amount needed now: the request is at least this, and so is its need.
    pub demand: Option<f64>,
    /// A predicted peak: the request is at least what the engine sizes for it.
    pub forecast: Option<f64>,
    /// The probability of a bottleneck: the request's risk is at least this.
    pub risk: Option<f64>,
}

/// What one round did.
#[derive(Debug, Default)]
pub struct RoundReport {
    /// The engine's decisions (its audit records).
    pub decisions: Vec<Decision>,
    /// Every component applied this round, with the limits asked for and the actuator's
    /// answer.
    pub applied: Vec<(usize, Limits, Result<(), String>)>,
}

/// Forecasters, the allocation engine and an actuator, for a fixed set of components.
pub struct Controller {
    forecasters: Vec<[AutoForecaster; 4]>,
    engine: Engine,
    actuator: Box<dyn Actuator>,
    targets: Vec<Target>,
    units: Units,
    /// Forecast steps a request covers.
    horizon: usize,
    /// Components whose last apply failed: applied again every round.
    pending: BTreeSet<usize>,
    /// Resources the engine has changed at least once, per component. Only these are
    /// applied: a resource still at its starting allocation is left as the kernel has it.
    decided: Vec<PerResource<bool>>,
    /// Each component's Bayesian risk.
    risks: Vec<ComponentRisk>,
    risk_config: RiskConfig,
    /// Each component's health from its health checks, the risk model's health evidence
    /// (`None`: no check judges it, and the model derives it from the levels).
    health: Vec<Option<bayes_risk::Health>>,
    /// With a price ([`Controller::price_headroom`]), each component's headroom is the one
    /// that spends the pool where it prevents most violations, set every round.
    priced: Option<PricedHeadroom>,
    /// With [`ForecastConfig::global`], one global LSTM for every component and resource.
    global: Option<Fleet>,
    /// The time of the usage the next round is told, for the global model's time features
    /// (`None`: the wall clock's); used once.
    clock: Option<f64>,
}

/// The global LSTM and the series it keeps for each component, per resource.
#[derive(Debug)]
struct Fleet {
    model: GlobalLstm,
    series: Vec<[SeriesId; 4]>,
}

/// A component's Bayesian network over its utilisation of each resource (usage over the
/// allocation in force, against θ: deviation from the forecast, level, trend, and a health
/// derived from the levels), with "utilisation passes θ within the horizon" per resource as
/// the bottleneck nodes. Its tables are counted online: each round's observation waits
/// `horizon` rounds for its outcome, then is counted.
#[derive(Debug, Clone)]
struct ComponentRisk {
    model: RiskModel,
    /// Observations waiting for their outcome: whether each resource passed θ so far, and
    /// the rounds seen since. The newest (always here, since it waits at least one round) is
    /// the evidence the current risk is scored on.
    waiting: VecDeque<(Observation, PerResource<bool>, usize)>,
}

impl ComponentRisk {
    fn latest(&self) -> Option<&Observation> {
        self.waiting.back().map(|w| &w.0)
    }
}

/// What a [`Controller`] carries across a restart (see [`Controller::learned`]).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Learned {
    pub engine: EngineState,
    pub decided: BTreeMap<String, PerResource<bool>>,
    /// Absent from state saved before the risk models were kept: they start afresh.
    #[serde(default)]
    pub risks: BTreeMap<String, RiskState>,
}

/// A component's Bayesian risk as learned: its tables (Dirichlet counts), and the
/// observations still waiting for their outcome (whether each resource passed θ so far, and
/// the rounds seen since), the newest being the evidence its current risk is scored on.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RiskState {
    pub tables: Vec<Vec<f64>>,
    pub waiting: Vec<(Observation, PerResource<bool>, usize)>,
}

/// Whether every number in `o` is finite (JSON can hold it).
fn finite(o: &Observation) -> bool {
    o.metrics.iter().flatten().all(|m| {
        [
            m.value,
            m.expected,
            m.expected_lower,
            m.expected_upper,
            m.ahead,
            m.ahead_spread,
        ]
        .iter()
        .all(|x| x.is_finite())
    })
}

/// A resource without usage: quiet (normal, ok, flat), and never a bottleneck.
const QUIET: MetricObs = MetricObs {
    value: 0.0,
    expected: 0.0,
    expected_lower: 0.0,
    expected_upper: 0.0,
    ahead: 0.0,
    ahead_spread: 0.0,
};

impl std::fmt::Debug for Controller {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Controller")
            .field("components", &self.targets.len())
            .field("actuator", &self.actuator.name())
            .field("pending", &self.pending)
            .finish_non_exhaustive()
    }
}

impl Controller {
    /// A controller over `engine`'s components, whose kernel-side names are `targets` (one
    /// per component, same order), applying through `actuator` in `units`; requests cover
    /// `forecast.horizon` steps (its `max_period` is set to a third of [`HISTORY_ROUNDS`]).
    pub fn new(
        engine: Engine,
        targets: Vec<Target>,
        actuator: Box<dyn Actuator>,
        units: Units,
        forecast: ForecastConfig,
    ) -> anyhow::Result<Self> {
        let horizon = forecast.horizon;
        anyhow::ensure!(
            targets.len() == engine.components().len(),
            "{} targets for {} components",
            targets.len(),
            engine.components().len()
        );
        let fc = ForecastConfig {
            max_period: HISTORY_ROUNDS / 3,
            ..forecast
        };
        fc.validate()?;
        let n = targets.len();
        let risk_config = RiskConfig {
            horizon: fc.horizon,
            ..RiskConfig::default()
        };
        let theta = engine.config().threshold;
        let specs: Vec<MetricSpec> = Resource::ALL
            .iter()
            .map(|r| MetricSpec {
                name: r.name().into(),
                resource: r.name().into(),
                threshold: theta,
            })
            .collect();
        let model = RiskModel::new(specs, risk_config)?;
        let risks = vec![
            ComponentRisk {
                model,
                waiting: VecDeque::new(),
            };
            n
        ];
        let forecasters = targets
            .iter()
            .map(|_| -> anyhow::Result<[AutoForecaster; 4]> {
                Ok([
                    AutoForecaster::new(fc)?,
                    AutoForecaster::new(fc)?,
                    AutoForecaster::new(fc)?,
                    AutoForecaster::new(fc)?,
                ])
            })
            .collect::<anyhow::Result<_>>()?;
        let global = if fc.global {
            let config = GlobalConfig {
                // Steps further ahead than this are left to the other models (a supplied
                // forecast that stops short is not scored, nor chosen, beyond its end).
                horizon: fc.horizon.min(GLOBAL_HORIZON),
                ..GlobalConfig::default()
            };
            let mut model = GlobalLstm::new(GlobalConfig {
                // Room for the longest period the forecasters look for, and a window in it.
                memory: config
                    .memory
                    .max(fc.max_period + config.window + config.horizon),
                ..config
            })?;
            let series = (0..n)
                .map(|_| Resource::ALL.map(|r| model.add_series(kind_of(r.name()))))
                .collect();
            Some(Fleet { model, series })
        } else {
            None
        };
        Ok(Self {
            forecasters,
            engine,
            actuator,
            targets,
            units,
            horizon,
            pending: BTreeSet::new(),
            decided: vec![[false; 4]; n],
            risks,
            risk_config,
            health: vec![None; n],
            priced: None,
            global,
            clock: None,
        })
    }

    /// Prices headroom ([`crate::headroom`]): from the round a quarter of `window` rounds
    /// have been seen, each component's headroom for each resource is the one that minimises
    /// its violations plus `price` × its unused allocation over the fleet's usage, judged on
    /// its last `window` rounds, and the engine's own feedback no longer sets it.
    pub fn price_headroom(&mut self, price: f64, window: usize) -> anyhow::Result<()> {
        self.priced = Some(PricedHeadroom::new(self.targets.len(), price, window)?);
        Ok(())
    }

    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    pub fn engine_mut(&mut self) -> &mut Engine {
        &mut self.engine
    }

    pub fn targets(&self) -> &[Target] {
        &self.targets
    }

    pub fn actuator(&self) -> &dyn Actuator {
        self.actuator.as_ref()
    }

    /// Hands the allocations to `other` from the next round on (actuation turned on or off),
    /// leaving the actuator it had in `other`. Every component with a resource the engine has
    /// changed is applied at the next round, so the new actuator holds what the engine holds.
    pub fn swap_actuator(&mut self, other: &mut Box<dyn Actuator>) {
        for (c, decided) in self.decided.iter().enumerate() {
            if decided.iter().any(|&d| d) {
                self.pending.insert(c);
            }
        }
        std::mem::swap(&mut self.actuator, other);
    }

    /// What the engine and the risk models have learned and which resources the engine has
    /// changed, by component name: what [`resume`](Self::resume) carries on from after a
    /// restart. (The forecasters are not in it: they warm up from the usage the store keeps.)
    pub fn learned(&self) -> Learned {
        let by_name = |c: usize| self.targets[c].component.clone();
        Learned {
            engine: self.engine.learned(),
            decided: (0..self.targets.len())
                .map(|c| (by_name(c), self.decided[c]))
                .collect(),
            risks: (0..self.targets.len())
                .map(|c| {
                    let r = &self.risks[c];
                    // JSON has no NaN: an observation that holds one (none should) is left
                    // out rather than make the whole state unreadable.
                    let state = RiskState {
                        tables: r.model.tables().to_vec(),
                        waiting: r.waiting.iter().filter(|w| finite(&w.0)).cloned().collect(),
                    };
                    (by_name(c), state)
                })
                .collect(),
        }
    }

    /// Carries on from what [`learned`](Self::learned) returned before a restart. Every
    /// resumed component with a changed resource is applied again at the next round, so the
    /// kernel holds what the engine holds even if it was changed meanwhile. A component's risk
    /// tables that no longer fit its model's shape are logged and learned afresh; tables
    /// counted under another horizon or θ fit (the shape is the same) and are kept: the
    /// outcomes counted from now on outweigh them only gradually (the tables do not decay).
    /// Returns how many components the engine resumed.
    pub fn resume(&mut self, learned: &Learned) -> usize {
        let resumed = self.engine.resume(&learned.engine);
        for (c, t) in self.targets.iter().enumerate() {
            if let Some(d) = learned.decided.get(&t.component) {
                self.decided[c] = *d;
                if d.iter().any(|&x| x) {
                    self.pending.insert(c);
                }
            }
            if let Some(state) = learned.risks.get(&t.component) {
                let risk = &mut self.risks[c];
                match risk.model.restore_tables(state.tables.clone()) {
                    Ok(()) => risk.waiting = state.waiting.iter().cloned().collect(),
                    Err(e) => tracing::warn!(
                        component = %t.component,
                        error = %e,
                        "saved risk tables do not fit; learning them afresh"
                    ),
                }
            }
        }
        resumed
    }

    /// Components whose last apply failed.
    pub fn pending(&self) -> &BTreeSet<usize> {
        &self.pending
    }

    /// The usage of the round just past, per component (NaN where unknown: the forecaster
    /// repeats its last value, the engine ignores it). Also the evidence of each component's
    /// risk, and the outcome of its observations of `horizon` rounds ago.
    pub fn observe(&mut self, usage: &[PerResource<f64>]) {
        let theta = self.engine.config().threshold;
        let h = self.horizon;
        // What each forecaster expected, then the round learned by all (and by the global
        // model, whose forecasts the evidence should see), then the evidence.
        let before: Vec<[Option<Step>; 4]> = self
            .forecasters
            .iter()
            .map(|fs| std::array::from_fn(|r| bayes_risk::expected(&fs[r], self.risk_config)))
            .collect();
        self.learn(usage);
        for (c, (fs, u)) in self.forecasters.iter().zip(usage).enumerate() {
            let alloc = self.engine.allocation(c);
            let metrics = (0..4)
                .map(|r| {
                    let raw = bayes_risk::observed(&fs[r], before[c][r], u[r], self.risk_config);
                    let a = alloc[r];
                    Some(match raw {
                        Some(m) if a > 0.0 => MetricObs {
                            value: m.value / a,
                            expected: m.expected / a,
                            expected_lower: m.expected_lower / a,
                            expected_upper: m.expected_upper / a,
                            ahead: m.ahead / a,
                            ahead_spread: m.ahead_spread / a,
                        },
                        _ => QUIET,
                    })
                })
                .collect();
            let risk = &mut self.risks[c];
            for (_, hit, age) in risk.waiting.iter_mut() {
                for r in 0..4 {
                    hit[r] |= alloc[r] > 0.0 && u[r] > theta * alloc[r];
                }
                *age += 1;
            }
            while risk.waiting.front().is_some_and(|w| w.2 >= h) {
                if let Some((obs, hit, _)) = risk.waiting.pop_front() {
                    // Every metric is present (quiet ones included), so this cannot fail.
                    let _ = risk.model.observe(&obs, &hit);
                }
            }
            let obs = Observation {
                metrics,
                health: self.health.get(c).copied().flatten(),
            };
            risk.waiting.push_back((obs, [false; 4], 0));
            self.engine.observe(c, *u);
        }
        if let Some(priced) = &mut self.priced {
            priced.observe(usage);
            for c in 0..self.targets.len() {
                for r in Resource::ALL {
                    if let Some(k) = priced.headroom(c, r, theta) {
                        self.engine.set_headroom(c, r, k);
                    }
                }
            }
        }
    }

    /// Each component's health as its health checks judge it, the evidence of the next
    /// [`observe`](Self::observe) (`None` for a component no check judges).
    pub fn set_health(&mut self, health: Vec<Option<bayes_risk::Health>>) {
        self.health = health;
        self.health.resize(self.targets.len(), None);
    }

    /// Component `c`'s risk per resource (P(utilisation passes θ within the horizon | its
    /// latest evidence)) with the evidence that moved it most; `None` before any usage.
    pub fn risk(&self, c: usize) -> Option<Vec<bayes_risk::Risk>> {
        let r = self.risks.get(c)?;
        r.model.risk(r.latest()?).ok()
    }

    /// The risk scores of component `c`, per resource (0.5 before any usage: no evidence
    /// either way).
    fn risk_scores(&self, c: usize) -> PerResource<f64> {
        let r = &self.risks[c];
        let scores = r
            .latest()
            .and_then(|o| r.model.scores(o).ok())
            .unwrap_or_default();
        std::array::from_fn(|i| scores.get(i).copied().unwrap_or(0.5))
    }

    /// Teaches the forecasters a past round's usage without deciding anything (a warm start
    /// from stored history: the engine's feedback is about its own allocations, so it is not
    /// told).
    pub fn learn(&mut self, usage: &[PerResource<f64>]) {
        for (fs, u) in self.forecasters.iter_mut().zip(usage) {
            for (f, v) in fs.iter_mut().zip(u) {
                f.update(*v);
            }
        }
        let Some(g) = &mut self.global else { return };
        // The global model's round: every series' row, a round's training budget, and every
        // series forecast in one pass, handed to its forecaster to compete with the others.
        let time = self.clock.take().unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0.0, |d| d.as_secs_f64())
        });
        for ((fs, u), ids) in self.forecasters.iter().zip(usage).zip(&g.series) {
            for r in 0..4 {
                // Every id was made by this model, so a push cannot fail.
                let _ = g.model.push(ids[r], time, u[r], fs[r].history().period());
            }
        }
        let paths = g.model.train().and_then(|_| g.model.forecast());
        match paths {
            Ok(paths) => {
                for (fs, ids) in self.forecasters.iter_mut().zip(&g.series) {
                    for r in 0..4 {
                        if let Some(Some(path)) = paths.get(ids[r].0) {
                            let medians: Vec<f64> = path.iter().map(|p| p.median).collect();
                            fs[r].supply(&medians);
                        }
                    }
                }
            }
            // The other models answer this round.
            Err(e) => tracing::warn!(error = %e, "global LSTM round failed"),
        }
    }

    /// Sets the time (Unix seconds) of the usage the next [`observe`](Self::observe) or
    /// [`learn`](Self::learn) is told (that one only): a replay's trace time, a warm start's
    /// recorded round. Unset, the wall clock's.
    pub fn set_clock(&mut self, unix_secs: f64) {
        self.clock = Some(unix_secs);
    }

    /// The global LSTM's training record, when it runs.
    pub fn global_stats(&self) -> Option<GlobalStats> {
        self.global.as_ref().map(|g| g.model.stats())
    }

    /// The global LSTM's weights and training record ([`GlobalLstm::weights`]), when it runs.
    pub fn global_checkpoint(&self) -> Option<anyhow::Result<Vec<u8>>> {
        self.global
            .as_ref()
            .map(|g| g.model.weights().map_err(Into::into))
    }

    /// Carries on with the weights of a [`global_checkpoint`](Self::global_checkpoint) taken
    /// before a restart; the series' rows come back from the warm start. Fails (and changes
    /// nothing) when the checkpoint is damaged or of another shape.
    pub fn resume_global(&mut self, bytes: &[u8]) -> anyhow::Result<()> {
        let g = self
            .global
            .as_mut()
            .ok_or_else(|| anyhow::anyhow!("the global LSTM is off"))?;
        g.model.resume_weights(bytes)?;
        Ok(())
    }

    /// The forecast of component `c`'s `r` over the horizon (95% intervals): what its next
    /// request is sized from. Empty before any usage was seen.
    pub fn forecast(&self, c: usize, r: Resource) -> Vec<Step> {
        self.forecasters
            .get(c)
            .map_or_else(Vec::new, |fs| fs[r.index()].forecast(self.horizon, 0.95))
    }

    /// Forecast steps a request covers.
    pub fn horizon(&self) -> usize {
        self.horizon
    }

    /// The rolling mean absolute error of each model (as [`model_names`](Self::model_names)
    /// orders them) forecasting component `c`'s `r` at `step` ahead; `None` until known.
    pub fn rolling_error(&self, c: usize, r: Resource, step: usize) -> Vec<Option<f64>> {
        self.forecasters
            .get(c)
            .map_or_else(Vec::new, |fs| fs[r.index()].rolling_error(step))
    }

    /// The name of each forecast model, as [`Step::model`] indexes them.
    pub fn model_names(&self) -> Vec<&'static str> {
        self.forecasters
            .first()
            .map_or_else(Vec::new, |fs| fs[0].model_names())
    }

    /// Forecasts, sizes requests, runs the engine's round `round` and applies what changed.
    pub fn round(&mut self, round: u64) -> RoundReport {
        self.round_with(round, &[])
    }

    /// [`round`](Self::round), with what allocation queries ask for on top of the forecasts.
    pub fn round_with(&mut self, round: u64, demands: &[Demand]) -> RoundReport {
        let (requests, asked_by, bases) = self.requests(demands, true);
        if let Some(priced) = &mut self.priced {
            for (c, r, base) in bases {
                priced.asked(c, r, base);
            }
        }
        let decisions = self.engine.round(round, &requests);
        self.conclude(decisions, &asked_by)
    }

    /// Between rounds: raises what allocation queries' `demands` ask for beyond the
    /// allocations now ([`Engine::raise_now`]), and applies them. The forecasts are the
    /// round's business: nothing is learned, released or judged here.
    pub fn raise_now(&mut self, round: u64, demands: &[Demand]) -> RoundReport {
        let (requests, asked_by, _) = self.requests(demands, false);
        let decisions = self.engine.raise_now(round, &requests);
        self.conclude(decisions, &asked_by)
    }

    /// Names the query behind each decision a query drove, and applies every component
    /// changed (and every one whose last apply failed).
    fn conclude(
        &mut self,
        mut decisions: Vec<forestall_actuators::alloc::Decision>,
        asked_by: &BTreeMap<(usize, usize), String>,
    ) -> RoundReport {
        // A raise (or a wait, or a grant) for a request a query shaped says which query.
        for d in &mut decisions {
            let driven = matches!(
                d.action,
                Action::Raise | Action::Deferred { .. } | Action::Granted { .. }
            );
            if let Some(query) = asked_by
                .get(&(d.component, d.resource.index()))
                .filter(|_| driven)
            {
                d.reason = format!("{}; asked by query {query}", d.reason);
            }
        }
        let mut apply: BTreeSet<usize> = std::mem::take(&mut self.pending);
        for d in decisions.iter().filter(|d| d.from != d.to && !d.dry_run) {
            apply.insert(d.component);
            self.decided[d.component][d.resource.index()] = true;
        }
        let mut applied = Vec::with_capacity(apply.len());
        for c in apply {
            let limits = self.limits(c);
            let result = self
                .actuator
                .apply(&self.targets[c], &limits)
                .map_err(|e| e.to_string());
            if result.is_err() {
                self.pending.insert(c);
            }
            applied.push((c, limits, result));
        }
        RoundReport { decisions, applied }
    }

    /// What is applied for component `c`: [`Engine::limits`] for the resources the engine
    /// has changed so far, nothing for the others.
    pub fn limits(&self, c: usize) -> Limits {
        let l = self.engine.limits(c, &self.units);
        let [cpu, mem, net, disk] = self.decided[c];
        Limits {
            cpu_millicores: l.cpu_millicores.filter(|_| cpu),
            memory_max_bytes: l.memory_max_bytes.filter(|_| mem),
            memory_high_bytes: l.memory_high_bytes.filter(|_| mem),
            net: l.net.filter(|_| net),
            io: l.io.filter(|_| disk),
            ..l
        }
    }

    /// One request per component and resource that has a forecast (with `forecasts`) or a
    /// demand: the larger of what each asks; by component and resource index, the query
    /// whose demand set the amount when one did; and what each forecast's request was sized
    /// from before headroom (its peak over θ).
    #[allow(clippy::type_complexity)]
    fn requests(
        &self,
        demands: &[Demand],
        forecasts: bool,
    ) -> (
        Vec<Request>,
        BTreeMap<(usize, usize), String>,
        Vec<(usize, Resource, f64)>,
    ) {
        let theta = self.engine.config().threshold;
        let mut out = Vec::new();
        let mut asked_by = BTreeMap::new();
        let mut bases = Vec::new();
        for c in 0..self.forecasters.len() {
            let risk = self.risk_scores(c);
            for r in Resource::ALL {
                let mut request = if forecasts {
                    self.request(c, r, &self.forecast(c, r), risk[r.index()])
                } else {
                    None
                };
                if let Some(q) = &request {
                    let headroom = self.engine.feedback(c, r).headroom;
                    bases.push((c, r, q.amount / headroom));
                }
                for d in demands
                    .iter()
                    .filter(|d| d.component == c && d.resource == r)
                {
                    let q = request.get_or_insert(Request {
                        component: c,
                        resource: r,
                        amount: 0.0,
                        need: 0.0,
                        risk: risk[r.index()],
                        observed: 0.0,
                    });
                    let before = q.amount;
                    if let Some(amount) = d.demand {
                        q.amount = q.amount.max(amount);
                        q.need = q.need.max(amount);
                        q.observed = q.observed.max(amount);
                    }
                    if let Some(peak) = d.forecast {
                        q.amount = q.amount.max(self.engine.size(c, r, peak));
                        q.need = q.need.max(peak / theta);
                    }
                    if q.amount > before {
                        asked_by.insert((c, r.index()), d.query.clone());
                    }
                    if let Some(k) = d.risk {
                        q.risk = q.risk.max(k);
                    }
                }
                out.extend(request);
            }
        }
        (out, asked_by, bases)
    }

    /// What component `c` asks of `r` given its forecast `steps` (`None` without one) and its
    /// `risk`: the forecast's peak ([`AutoForecaster::peak`]: the mean path plus the next
    /// step's 95% error bound, or the peak that recurred at this phase) / θ × headroom, and a
    /// need of the mean's peak / θ.
    pub fn request(&self, c: usize, r: Resource, steps: &[Step], risk: f64) -> Option<Request> {
        let theta = self.engine.config().threshold;
        // A recurring peak counts when it came within half a horizon of this phase.
        let peak = self.forecasters.get(c)?[r.index()].peak(steps, steps.len().div_ceil(2))?;
        let expected = steps.iter().map(|s| s.mean).fold(0.0, f64::max);
        Some(Request {
            component: c,
            resource: r,
            amount: self.engine.size(c, r, peak),
            need: expected / theta,
            risk,
            observed: 0.0,
        })
    }
}

#[cfg(test)]
mod tests;
