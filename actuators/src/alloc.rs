//! The resource pool and the allocation engine, with its feedback controller.
//!
//! Each round (each time risks and forecasts are refreshed) the caller sizes one
//! [`Request`] per component and resource with [`Engine::size`] (the forecast's upper
//! quantile over the horizon, over the utilisation threshold, times the component's learned
//! headroom) and hands them to [`Engine::round`], which follows the design's loop:
//!
//! * requests are served by priority (criticality weight, then risk), except that a request
//!   deferred for [`AllocConfig::age_after`] rounds goes before every non-critical one;
//! * a raise is granted from the pool. When the raises asked for exceed a pool, every
//!   component's need (its expected use, without headroom) is served by priority before
//!   anyone's headroom. A need first reclaims what non-critical components hold above their
//!   own need; then a component whose weight is at least [`AllocConfig::preempt_weight`] takes
//!   from lower-weight holders down to their floors, and a need that cannot wait takes
//!   lower weights' deferrable work (a deferrable component's CPU, network and disk, never its
//!   memory). Whatever is still missing waits in a visible queue of deferred requests,
//!   retried every round. Preemption for headroom never takes a holder below its need;
//! * lower requests release resources, but only when every request of the last
//!   [`AllocConfig::cooldown`] rounds is past a hysteresis band, a cooldown after the last
//!   change, and by at most [`AllocConfig::max_step_down`] per round, so noisy forecasts do not
//!   flap;
//! * a raise is judged [`AllocConfig::rollback_after`] rounds later: if usage never came near
//!   the old allocation, it did not help and is rolled back, and raising to that level again
//!   is held off as long, unless usage presses on the allocation or a query's demand observes
//!   a need above it; the feedback controller shrinks that component's headroom; a violation
//!   (usage over θ × the allocation) grows it, and with [`AllocConfig::violation_share`]
//!   each round without one shrinks it a little, so that it settles where violations take
//!   that share of rounds;
//! * preferences always win: a cap is never exceeded, a floor never undercut, an opted-out
//!   component or an unmanaged resource is never touched, and pinned CPUs go with every
//!   allocation ([`Engine::limits`]);
//! * in dry-run mode every decision is computed and audited, and nothing changes.
//!
//! Every change, preemption, deferral, grant and rollback is an audit [`Decision`] with its
//! reason. The engine is plain data and arithmetic: deterministic, no clock, no I/O.

use std::collections::VecDeque;
use std::fmt;

/// The resources an allocation covers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Resource {
    Cpu,
    Mem,
    Net,
    Disk,
}

impl Resource {
    pub const ALL: [Resource; 4] = [Resource::Cpu, Resource::Mem, Resource::Net, Resource::Disk];

    pub fn name(self) -> &'static str {
        match self {
            Resource::Cpu => "cpu",
            Resource::Mem => "mem",
            Resource::Net => "net",
            Resource::Disk => "disk",
        }
    }

    pub fn index(self) -> usize {
        self as usize
    }
}

impl fmt::Display for Resource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Per resource, indexed by [`Resource::index`].
pub type PerResource<T> = [T; 4];

/// What operators set from outside: these always win over the engine.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Preferences {
    /// Never allocate more than this.
    pub cap: PerResource<Option<f64>>,
    /// Never allocate less than this (preemption stops here too).
    pub floor: PerResource<Option<f64>>,
    /// Leave this component alone entirely.
    pub opt_out: bool,
    /// Resources the engine leaves alone for this component (someone else manages them): it
    /// never raises, releases or preempts them, and [`Engine::limits`] omits them.
    pub unmanaged: PerResource<bool>,
    /// The CPUs the component's threads are pinned to, applied with every allocation.
    pub pinned_cpus: Option<crate::CpuSet>,
}

/// A component that receives resources.
#[derive(Debug, Clone, PartialEq)]
pub struct Component {
    pub name: String,
    /// Criticality: higher is served first and may preempt.
    pub weight: f64,
    /// Its requests may wait in the queue (batch work).
    pub deferrable: bool,
    pub preferences: Preferences,
}

/// Engine settings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AllocConfig {
    /// The utilisation an allocation should keep usage under (θ).
    pub threshold: f64,
    /// The smallest allocation of each resource, whatever the preferences.
    pub min: PerResource<f64>,
    /// A raise happens only when the request exceeds the allocation by this fraction.
    pub up_band: f64,
    /// A release happens only when the request is below the allocation by this fraction.
    pub down_band: f64,
    /// Rounds after any change before a release.
    pub cooldown: u64,
    /// A release removes at most this fraction of the allocation per round.
    pub max_step_down: f64,
    /// A raise multiplies the allocation by at most this per round.
    pub max_step_up: f64,
    /// A raise goes this fraction past the request.
    pub overshoot: f64,
    /// Components with at least this weight preempt lower-weight ones when the pool is short.
    pub preempt_weight: f64,
    /// Rounds after a raise when it is judged (and rolled back if it did not help).
    pub rollback_after: u64,
    /// A request deferred for this many rounds is served before every other non-critical
    /// request, so deferred work cannot starve behind a busier tier.
    pub age_after: u64,
    /// The share of rounds in which usage may pass θ × the allocation. Each such round
    /// grows the component's headroom by 5 %; with a share above 0, each round without one
    /// shrinks it by 5 % × share / (1 − share), so the headroom settles where violations
    /// take that share of rounds (on noisy usage it would otherwise only grow, up to 2×).
    /// 0: it only grows, and shrinks when a raise is rolled back.
    pub violation_share: f64,
    /// Per resource, the rounds of usage whose peak an allocation is kept at or above (0:
    /// none): every request asks at least that peak, so no release goes below what the
    /// component used in that time and a round over the allocation raises it at once. For
    /// memory, which is not compressible: usage over `memory.max` is an OOM kill, not a
    /// slower round, and memory a workload used yesterday it tends to use again.
    pub hold_peak: PerResource<u64>,
    /// Compute and audit decisions, change nothing.
    pub dry_run: bool,
}

impl Default for AllocConfig {
    fn default() -> Self {
        Self {
            threshold: 0.9,
            min: [0.0; 4],
            up_band: 0.02,
            down_band: 0.15,
            cooldown: 6,
            max_step_down: 0.2,
            max_step_up: 8.0,
            overshoot: 0.0,
            preempt_weight: 10.0,
            rollback_after: 24,
            age_after: 72,
            violation_share: 0.0,
            hold_peak: [0; 4],
            dry_run: false,
        }
    }
}

/// One component's wish for one resource this round.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Request {
    pub component: usize,
    pub resource: Resource,
    /// What the component should hold: its expected peak with headroom ([`Engine::size`]).
    pub amount: f64,
    /// What it is expected to use, over the threshold, without headroom. When a pool is
    /// short, every component's need is served (by priority) before anyone's headroom, and
    /// preemption for headroom never takes a component below its need.
    pub need: f64,
    /// Risk in [0, 1]: orders requests of equal weight.
    pub risk: f64,
    /// What a query's demand asks for now (0 without one): a need observed, such as the CPU
    /// that brings latency back under its objective, not forecast. Above the allocation it
    /// presses as usage over θ does, so a hold-off after a rolled-back raise does not delay it.
    pub observed: f64,
}

/// What the engine did.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    Raise,
    Release,
    /// Taken from this component for a more critical one.
    Preempted {
        by: usize,
    },
    /// The rest of the request waits in the queue.
    Deferred {
        short: f64,
    },
    /// A deferred request was met after waiting this many rounds.
    Granted {
        waited: u64,
    },
    /// A raise that did not help was undone.
    Rollback,
}

/// An audit record: every decision, with its reason.
#[derive(Debug, Clone, PartialEq)]
pub struct Decision {
    pub round: u64,
    pub component: usize,
    pub resource: Resource,
    pub from: f64,
    pub to: f64,
    pub action: Action,
    pub reason: String,
    /// Computed in dry-run mode: nothing was changed.
    pub dry_run: bool,
}

/// A request waiting for the pool.
#[derive(Debug, Clone, PartialEq)]
pub struct Deferred {
    pub component: usize,
    pub resource: Resource,
    /// What is still missing.
    pub short: f64,
    /// The round it first waited.
    pub since: u64,
}

/// A raise waiting to be judged.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Trial {
    round: u64,
    before: f64,
    /// Highest usage seen since the raise; `None` until usage is observed (a raise is never
    /// judged blind).
    peak: Option<f64>,
}

/// The feedback controller's state for one component and resource.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Feedback {
    /// Multiplies the sized request: grows after violations, shrinks after raises that did
    /// not help.
    pub headroom: f64,
    /// Share of judged raises that were needed (usage came near the old allocation).
    pub effectiveness: f64,
    /// Raises judged so far.
    pub judged: u64,
}

impl Default for Feedback {
    fn default() -> Self {
        Self {
            headroom: 1.0,
            effectiveness: 0.5,
            judged: 0,
        }
    }
}

const HEADROOM_RANGE: (f64, f64) = (0.9, 2.0);

/// Errors of the allocation engine (a bad setup, not a bad round).
#[derive(Debug, thiserror::Error)]
pub enum AllocError {
    #[error("invalid allocation setup: {0}")]
    Invalid(String),
}

/// The allocation engine for a fixed set of components sharing one pool.
#[derive(Debug, Clone)]
pub struct Engine {
    config: AllocConfig,
    components: Vec<Component>,
    /// Pool capacity per resource; `None` is unlimited.
    capacity: PerResource<Option<f64>>,
    alloc: Vec<PerResource<f64>>,
    /// Σ alloc per resource, kept in step with `alloc`.
    used: PerResource<f64>,
    last_change: Vec<PerResource<Option<u64>>>,
    trials: Vec<PerResource<Option<Trial>>>,
    feedback: Vec<PerResource<Feedback>>,
    /// After a rollback, raises to `held_at` wait until this round unless usage presses.
    held_until: Vec<PerResource<u64>>,
    /// The allocation a rolled-back raise was undone from: until `held_until`, raises to no
    /// more than it are held off (that level was judged wrong; a larger one is a new claim).
    held_at: Vec<PerResource<f64>>,
    /// Usage in the last round observed.
    last_usage: Vec<PerResource<f64>>,
    /// The last `cooldown` requests: a release goes only as low as their maximum (a
    /// stabilisation window, like the Kubernetes autoscaler's for scaling down).
    recent: Vec<PerResource<Window>>,
    /// Usage of the last [`AllocConfig::hold_peak`] rounds, for the resources that hold it.
    usage_peak: Vec<PerResource<Window>>,
    deferred: Vec<Deferred>,
    /// The latest [`AUDIT_KEPT`] decisions (the durable audit is the caller's: the server
    /// stores it as a measurement).
    audit: VecDeque<Decision>,
    /// This round's decisions, returned by [`Engine::round`].
    this_round: Vec<Decision>,
    /// This round's need per component and resource: what preemption for headroom leaves.
    needs: Vec<PerResource<f64>>,
    /// Component indices, lowest weight first: the order preemption takes in.
    by_weight: Vec<usize>,
    /// Each component's place in `by_weight`.
    place: Vec<usize>,
    /// Per resource, who holds more than their floor, and more than their need, this round:
    /// preemption visits only them instead of every component.
    above_floor: PerResource<Holders>,
    above_need: PerResource<Holders>,
    /// This round's requests that have waited [`AllocConfig::age_after`] rounds.
    aged: Vec<PerResource<bool>>,
}

/// A set of places in `by_weight`, as bits.
#[derive(Debug, Clone, Default)]
struct Holders(Vec<u64>);

impl Holders {
    fn new(n: usize) -> Self {
        Self(vec![0; n.div_ceil(64)])
    }

    fn set(&mut self, k: usize, on: bool) {
        let bit = 1 << (k % 64);
        if on {
            self.0[k / 64] |= bit;
        } else {
            self.0[k / 64] &= !bit;
        }
    }

    /// The first place at or after `k` in the set.
    fn next(&self, k: usize) -> Option<usize> {
        let (mut w, mut bits) = (k / 64, self.0.get(k / 64)? & (u64::MAX << (k % 64)));
        loop {
            if bits != 0 {
                return Some(w * 64 + bits.trailing_zeros() as usize);
            }
            w += 1;
            bits = *self.0.get(w)?;
        }
    }
}

/// What preemption leaves a holder: its floor, or its need this round (at least its floor).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Keep {
    Floor,
    Need,
}

/// The largest of a component's last `n` requests for a resource, as a monotonic queue: a
/// request followed by a larger one can never be the maximum again, so only the others are
/// kept (a handful, where a plain window would keep all `n`).
#[derive(Debug, Clone, Default, PartialEq)]
struct Window {
    /// Requests pushed so far.
    seen: u64,
    /// (index, amount), amounts strictly decreasing from the front.
    entries: VecDeque<(u64, f64)>,
}

impl Window {
    /// Adds a request and returns the largest of the last `n`.
    fn push(&mut self, amount: f64, n: u64) -> f64 {
        while self.entries.back().is_some_and(|&(_, v)| v <= amount) {
            self.entries.pop_back();
        }
        self.entries.push_back((self.seen, amount));
        self.seen += 1;
        while self
            .entries
            .front()
            .is_some_and(|&(k, _)| k + n < self.seen)
        {
            self.entries.pop_front();
        }
        self.max()
    }

    /// The largest amount in the window (`f64::MIN` when empty).
    fn max(&self) -> f64 {
        self.entries.front().map_or(f64::MIN, |&(_, v)| v)
    }

    fn saved(&self) -> (u64, Vec<(u64, f64)>) {
        (self.seen, self.entries.iter().copied().collect())
    }

    fn restored((seen, entries): &(u64, Vec<(u64, f64)>)) -> Self {
        Self {
            seen: *seen,
            entries: entries.iter().copied().collect(),
        }
    }
}

/// Which part of a request a raise serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Part {
    /// The need, on a short pool: may preempt down to floors, and what is missing waits.
    Need,
    /// Everything, headroom included: preempts only above others' needs, and a shortfall in
    /// headroom is not work waiting.
    Whole,
}

/// What an engine has learned about one component, by name: enough to carry on after a
/// restart ([`Engine::learned`], [`Engine::resume`]).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ComponentState {
    pub name: String,
    pub alloc: PerResource<f64>,
    pub last_change: PerResource<Option<u64>>,
    /// Headroom, effectiveness and judged raises per resource.
    pub feedback: PerResource<(f64, f64, u64)>,
    pub held_until: PerResource<u64>,
    /// What the hold-off covers (states written before it was kept hold nothing off).
    #[serde(default)]
    pub held_at: PerResource<f64>,
    pub last_usage: PerResource<f64>,
    /// The stabilisation window per resource: requests seen, and the (index, amount) of
    /// those that can still be its maximum, oldest first.
    pub recent: PerResource<(u64, Vec<(u64, f64)>)>,
    /// Raises under trial: (round, allocation before, peak usage since).
    pub trials: PerResource<Option<(u64, f64, Option<f64>)>>,
    /// The usage whose peak is held, as `recent` (states written before it was kept hold
    /// none until usage comes).
    #[serde(default)]
    pub usage_peak: PerResource<(u64, Vec<(u64, f64)>)>,
}

/// An engine's learned state: its components' and the deferred queue (by component name and
/// resource name).
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct EngineState {
    pub components: Vec<ComponentState>,
    /// (component, resource, short, since round).
    pub deferred: Vec<(String, String, f64, u64)>,
}

/// Decisions kept in memory.
pub const AUDIT_KEPT: usize = 1 << 20;

impl Engine {
    /// An engine whose components start at `initial` allocations (raised to their floors and
    /// lowered to their caps).
    pub fn new(
        config: AllocConfig,
        components: Vec<Component>,
        capacity: PerResource<Option<f64>>,
        initial: Vec<PerResource<f64>>,
    ) -> Result<Self, AllocError> {
        if initial.len() != components.len() {
            return Err(AllocError::Invalid(format!(
                "{} initial allocations for {} components",
                initial.len(),
                components.len()
            )));
        }
        if !(config.threshold > 0.0 && config.threshold <= 1.0) {
            return Err(AllocError::Invalid("threshold must be in (0, 1]".into()));
        }
        if !(0.0..1.0).contains(&config.max_step_down) || config.max_step_up < 1.0 {
            return Err(AllocError::Invalid(
                "max_step_down must be in [0, 1) and max_step_up at least 1".into(),
            ));
        }
        if !(0.0..0.5).contains(&config.violation_share) {
            return Err(AllocError::Invalid(
                "violation_share must be in [0, 0.5)".into(),
            ));
        }
        for c in &components {
            for r in Resource::ALL {
                let i = r.index();
                if let (Some(f), Some(cap)) = (c.preferences.floor[i], c.preferences.cap[i])
                    && f > cap
                {
                    return Err(AllocError::Invalid(format!(
                        "{}: {r} floor {f} is above its cap {cap}",
                        c.name
                    )));
                }
            }
        }
        let components_len = components.len();
        let mut e = Self {
            config,
            alloc: vec![[0.0; 4]; components.len()],
            used: [0.0; 4],
            last_change: vec![[None; 4]; components.len()],
            trials: vec![[None; 4]; components.len()],
            feedback: vec![[Feedback::default(); 4]; components.len()],
            held_until: vec![[0; 4]; components.len()],
            held_at: vec![[0.0; 4]; components.len()],
            last_usage: vec![[0.0; 4]; components.len()],
            recent: vec![Default::default(); components.len()],
            usage_peak: vec![Default::default(); components.len()],
            components,
            capacity,
            deferred: Vec::new(),
            audit: VecDeque::new(),
            this_round: Vec::new(),
            needs: Vec::new(),
            by_weight: Vec::new(),
            place: vec![0; components_len],
            above_floor: std::array::from_fn(|_| Holders::new(components_len)),
            above_need: std::array::from_fn(|_| Holders::new(components_len)),
            aged: vec![[false; 4]; components_len],
        };
        e.by_weight = (0..e.components.len()).collect();
        e.by_weight.sort_by(|&a, &b| {
            e.components[a]
                .weight
                .total_cmp(&e.components[b].weight)
                .then(a.cmp(&b))
        });
        for (k, &c) in e.by_weight.iter().enumerate() {
            e.place[c] = k;
        }
        for (c, init) in initial.into_iter().enumerate() {
            for r in Resource::ALL {
                let v = e.bounded(c, r, init[r.index()]);
                e.alloc[c][r.index()] = v;
                e.used[r.index()] += v;
            }
        }
        e.hold_needs();
        Ok(e)
    }

    /// Until a round says otherwise, each component needs what it holds: what a raise
    /// between rounds (before the first, or after a resume) may not take from it.
    fn hold_needs(&mut self) {
        self.needs.clone_from(&self.alloc);
        for c in 0..self.components.len() {
            for r in Resource::ALL {
                self.mark(c, r);
            }
        }
    }

    pub fn config(&self) -> &AllocConfig {
        &self.config
    }

    pub fn components(&self) -> &[Component] {
        &self.components
    }

    pub fn allocation(&self, component: usize) -> PerResource<f64> {
        self.alloc[component]
    }

    /// Requests waiting for the pool.
    pub fn deferred(&self) -> &[Deferred] {
        &self.deferred
    }

    /// The latest decisions, oldest first.
    pub fn audit(&self) -> impl Iterator<Item = &Decision> {
        self.audit.iter()
    }

    pub fn feedback(&self, component: usize, resource: Resource) -> Feedback {
        self.feedback[component][resource.index()]
    }

    /// Replaces a component's preferences (they take effect from the next round).
    pub fn set_preferences(&mut self, component: usize, preferences: Preferences) {
        if let Some(c) = self.components.get_mut(component) {
            c.preferences = preferences;
        }
    }

    /// Sets a component's headroom for a resource, for a caller that learns it another way
    /// (the control loop's priced headroom); the feedback's own updates start from it.
    pub fn set_headroom(&mut self, component: usize, resource: Resource, headroom: f64) {
        if let Some(f) = self.feedback.get_mut(component)
            && headroom.is_finite()
            && headroom > 0.0
        {
            f[resource.index()].headroom = headroom;
        }
    }

    /// Sizes a request: the forecast peak over the horizon (its upper quantile), over the
    /// threshold, times the component's learned headroom.
    pub fn size(&self, component: usize, resource: Resource, forecast_peak: f64) -> f64 {
        let h = self.feedback[component][resource.index()].headroom;
        (forecast_peak.max(0.0) / self.config.threshold) * h
    }

    /// What to apply for `component` now: its allocation in kernel terms ([`Units`]), without
    /// the resources it leaves unmanaged, with its pinned CPUs; nothing for an opted-out one.
    ///
    /// [`Units`]: crate::stack::Units
    pub fn limits(&self, component: usize, units: &crate::stack::Units) -> crate::Limits {
        let p = &self.components[component].preferences;
        if p.opt_out {
            return crate::Limits::default();
        }
        let mut alloc = self.alloc[component];
        for r in Resource::ALL {
            if p.unmanaged[r.index()] {
                alloc[r.index()] = f64::NAN; // Units leaves a non-finite amount alone
            }
        }
        crate::Limits {
            cpus: p.pinned_cpus,
            ..units.limits(alloc)
        }
    }

    /// What the engine has learned, to carry on after a restart with [`resume`](Self::resume).
    pub fn learned(&self) -> EngineState {
        let components = self
            .components
            .iter()
            .enumerate()
            .map(|(c, comp)| ComponentState {
                name: comp.name.clone(),
                alloc: self.alloc[c],
                last_change: self.last_change[c],
                feedback: self.feedback[c].map(|f| (f.headroom, f.effectiveness, f.judged)),
                held_until: self.held_until[c],
                held_at: self.held_at[c],
                last_usage: self.last_usage[c],
                recent: std::array::from_fn(|i| self.recent[c][i].saved()),
                trials: self.trials[c].map(|t| t.map(|t| (t.round, t.before, t.peak))),
                usage_peak: std::array::from_fn(|i| self.usage_peak[c][i].saved()),
            })
            .collect();
        let deferred = self
            .deferred
            .iter()
            .map(|d| {
                (
                    self.components[d.component].name.clone(),
                    d.resource.name().to_string(),
                    d.short,
                    d.since,
                )
            })
            .collect();
        EngineState {
            components,
            deferred,
        }
    }

    /// Carries on from `state`: each component found by name takes back its allocation
    /// (within its current floor and cap), feedback, trials, hold-offs and stabilisation
    /// window, and its deferred requests queue again. Components the state does not name keep
    /// their starting values; names this engine does not have are ignored. Returns how many
    /// components were resumed.
    pub fn resume(&mut self, state: &EngineState) -> usize {
        let index: std::collections::HashMap<&str, usize> = self
            .components
            .iter()
            .enumerate()
            .map(|(i, c)| (c.name.as_str(), i))
            .collect();
        let mut resumed = 0;
        for s in &state.components {
            let Some(&c) = index.get(s.name.as_str()) else {
                continue;
            };
            for r in Resource::ALL {
                let i = r.index();
                let v = self.bounded(c, r, s.alloc[i]);
                self.used[i] += v - self.alloc[c][i];
                self.alloc[c][i] = v;
                let (headroom, effectiveness, judged) = s.feedback[i];
                self.feedback[c][i] = Feedback {
                    headroom: if headroom.is_finite() {
                        headroom.clamp(HEADROOM_RANGE.0, HEADROOM_RANGE.1)
                    } else {
                        1.0
                    },
                    effectiveness: if effectiveness.is_finite() {
                        effectiveness.clamp(0.0, 1.0)
                    } else {
                        0.5
                    },
                    judged,
                };
                self.last_change[c][i] = s.last_change[i];
                self.held_until[c][i] = s.held_until[i];
                self.held_at[c][i] = s.held_at[i];
                self.last_usage[c][i] = s.last_usage[i];
                self.recent[c][i] = Window::restored(&s.recent[i]);
                self.usage_peak[c][i] = Window::restored(&s.usage_peak[i]);
                self.trials[c][i] = s.trials[i].map(|(round, before, peak)| Trial {
                    round,
                    before,
                    peak,
                });
            }
            resumed += 1;
        }
        self.deferred = state
            .deferred
            .iter()
            .filter_map(|(name, resource, short, since)| {
                let resource = Resource::ALL.into_iter().find(|r| r.name() == resource)?;
                Some(Deferred {
                    component: *index.get(name.as_str())?,
                    resource,
                    short: *short,
                    since: *since,
                })
            })
            .collect();
        self.hold_needs();
        resumed
    }

    /// The floor and cap that bound a component's allocation.
    fn bounds(&self, c: usize, r: Resource) -> (f64, f64) {
        let p = &self.components[c].preferences;
        let floor = p.floor[r.index()]
            .unwrap_or(0.0)
            .max(self.config.min[r.index()]);
        let cap = p.cap[r.index()].unwrap_or(f64::INFINITY).max(floor);
        (floor, cap)
    }

    fn bounded(&self, c: usize, r: Resource, v: f64) -> f64 {
        let (floor, cap) = self.bounds(c, r);
        if v.is_finite() {
            v.clamp(floor, cap)
        } else {
            floor
        }
    }

    fn free(&self, r: Resource) -> f64 {
        match self.capacity[r.index()] {
            Some(cap) => cap - self.used[r.index()],
            None => f64::INFINITY,
        }
    }

    /// Feedback: the usage a component had in the round just past. Violations grow its
    /// headroom; raises under trial record the peak they saw.
    pub fn observe(&mut self, component: usize, usage: PerResource<f64>) {
        if self.components[component].preferences.opt_out {
            return;
        }
        for r in Resource::ALL {
            let i = r.index();
            let u = usage[i];
            if !u.is_finite() {
                continue;
            }
            self.last_usage[component][i] = u;
            let hold = self.config.hold_peak[i];
            if hold > 0 {
                self.usage_peak[component][i].push(u, hold);
            }
            if let Some(t) = &mut self.trials[component][i] {
                t.peak = Some(t.peak.map_or(u, |p| p.max(u)));
            }
            let f = &mut self.feedback[component][i];
            let share = self.config.violation_share;
            if u > self.config.threshold * self.alloc[component][i] {
                f.headroom = (f.headroom * 1.05).min(HEADROOM_RANGE.1);
            } else if share > 0.0 {
                f.headroom =
                    (f.headroom * (1.0 - 0.05 * share / (1.0 - share))).max(HEADROOM_RANGE.0);
            }
        }
    }

    fn record(&mut self, d: Decision) {
        if !self.config.dry_run {
            let (c, i) = (d.component, d.resource.index());
            self.used[i] += d.to - self.alloc[c][i];
            self.alloc[c][i] = d.to;
            self.last_change[c][i] = Some(d.round);
            self.mark(c, d.resource);
        }
        self.push_audit(d);
    }

    /// Files `c` among the holders of `r` that preemption may take from.
    fn mark(&mut self, c: usize, r: Resource) {
        let (i, k) = (r.index(), self.place[c]);
        let touchable = !self.untouchable(c, r);
        let floor = self.bounds(c, r).0;
        let need = self.needs.get(c).map_or(floor, |n| n[i].max(floor));
        let have = self.alloc[c][i];
        self.above_floor[i].set(k, touchable && have > floor);
        self.above_need[i].set(k, touchable && have > need);
    }

    fn push_audit(&mut self, d: Decision) {
        if self.audit.len() == AUDIT_KEPT {
            self.audit.pop_front();
        }
        self.this_round.push(d.clone());
        self.audit.push_back(d);
    }

    /// One round: judges raises under trial, then serves `requests` by priority. Returns this
    /// round's decisions (also appended to the audit).
    pub fn round(&mut self, round: u64, requests: &[Request]) -> Vec<Decision> {
        self.this_round.clear();
        self.judge(round);
        self.enforce_caps(round);
        // Critical first, then requests deferred for `age_after` rounds, then by weight and
        // risk.
        for a in &mut self.aged {
            *a = [false; 4];
        }
        for d in &self.deferred {
            if round >= d.since.saturating_add(self.config.age_after) {
                self.aged[d.component][d.resource.index()] = true;
            }
        }
        let order = self.ranked(requests);
        // A component without a request this round needs what it holds.
        self.needs.clone_from(&self.alloc);
        for q in &order {
            if q.need.is_finite() {
                self.needs[q.component][q.resource.index()] =
                    self.bounded(q.component, q.resource, q.need.min(q.amount));
            }
        }
        for c in 0..self.components.len() {
            for r in Resource::ALL {
                self.mark(c, r);
            }
        }
        self.needs_first(round, &order);
        for q in order {
            self.serve(round, q);
        }
        std::mem::take(&mut self.this_round)
    }

    /// An interim step between rounds, for requests that should not wait for the next one (an
    /// allocation query that fired on the write that brought its signal): each request that
    /// would raise its allocation is served now, in the round's order and as the round would
    /// raise it. Nothing is released, judged or rolled back, and the requests do not count
    /// toward the release windows: the next round sees its own requests as usual. `round` is
    /// the last round's number (the raises are judged from it).
    pub fn raise_now(&mut self, round: u64, requests: &[Request]) -> Vec<Decision> {
        self.this_round.clear();
        let order = self.ranked(requests);
        // A request's need holds from now on (the next round recomputes every need).
        for q in &order {
            let (c, i) = (q.component, q.resource.index());
            if q.need.is_finite() {
                let need = self.bounded(c, q.resource, q.need.min(q.amount));
                self.needs[c][i] = self.needs[c][i].max(need);
                self.mark(c, q.resource);
            }
        }
        // As in a round: on a short pool needs first, then whole requests.
        self.needs_first(round, &order);
        for q in order {
            if !self.untouchable(q.component, q.resource) && q.amount.is_finite() {
                self.raise_whole(round, q);
            }
        }
        std::mem::take(&mut self.this_round)
    }

    /// A pool is short when the raises `order` asks for exceed what is free; then needs come
    /// first, in order, and whole requests after.
    fn needs_first(&mut self, round: u64, order: &[&Request]) {
        let mut asked = [0.0; 4];
        for q in order {
            let i = q.resource.index();
            asked[i] += (self.bounded(q.component, q.resource, q.amount)
                - self.alloc[q.component][i])
                .max(0.0);
        }
        for q in order {
            let (c, r) = (q.component, q.resource);
            let need = self.needs[c][r.index()];
            if asked[r.index()] > self.free(r)
                && !self.untouchable(c, r)
                && self.may_raise(round, q, need)
            {
                let current = self.alloc[c][r.index()];
                self.raise(round, q, current, need, Part::Need);
            }
        }
    }

    /// Raises `q`'s allocation for its whole amount if it should rise (see `may_raise`);
    /// whether it did try.
    fn raise_whole(&mut self, round: u64, q: &Request) -> bool {
        let (c, r) = (q.component, q.resource);
        let current = self.alloc[c][r.index()];
        let target = self.bounded(c, r, q.amount);
        if !self.may_raise(round, q, target) {
            return false;
        }
        let target = self.raise_target(c, r, current, target);
        self.raise(round, q, current, target, Part::Whole);
        true
    }

    /// `requests` for known components in the order they are served: critical first, then
    /// those deferred for `age_after` rounds, then by weight and risk.
    fn ranked<'a>(&self, requests: &'a [Request]) -> Vec<&'a Request> {
        let mut ranked: Vec<(u8, &Request)> = requests
            .iter()
            .filter(|q| q.component < self.components.len())
            .map(|q| {
                let rank = if self.components[q.component].weight >= self.config.preempt_weight {
                    2
                } else {
                    u8::from(self.aged[q.component][q.resource.index()])
                };
                (rank, q)
            })
            .collect();
        ranked.sort_by(|(ra, a), (rb, b)| {
            let (wa, wb) = (
                self.components[a.component].weight,
                self.components[b.component].weight,
            );
            rb.cmp(ra)
                .then(wb.total_cmp(&wa))
                .then(b.risk.total_cmp(&a.risk))
                .then(a.component.cmp(&b.component))
                .then(a.resource.cmp(&b.resource))
        });
        ranked.into_iter().map(|(_, q)| q).collect()
    }

    /// Where a raise of `c`'s `r` from `current` toward `target` goes: a little beyond it (a
    /// request that keeps creeping up then raises once, not every round), at most
    /// `max_step_up` times the current allocation, at least the floor.
    fn raise_target(&self, c: usize, r: Resource, current: f64, target: f64) -> f64 {
        self.bounded(c, r, target * (1.0 + self.config.overshoot))
            .min(current.max(1e-9) * self.config.max_step_up)
            .max(self.bounds(c, r).0)
    }

    /// Brings every allocation above its cap (a cap lowered since the last round) down to it
    /// at once: a cap is never exceeded, whatever the cooldown.
    fn enforce_caps(&mut self, round: u64) {
        for c in 0..self.components.len() {
            for r in Resource::ALL {
                let (from, cap) = (self.alloc[c][r.index()], self.bounds(c, r).1);
                if from > cap && !self.untouchable(c, r) {
                    self.record(Decision {
                        round,
                        component: c,
                        resource: r,
                        from,
                        to: cap,
                        action: Action::Release,
                        reason: format!("the preferences cap {r} at {cap}"),
                        dry_run: self.config.dry_run,
                    });
                }
            }
        }
    }

    /// Rolls back raises that did not help, and feeds every judged raise to the controller.
    fn judge(&mut self, round: u64) {
        for c in 0..self.components.len() {
            for r in Resource::ALL {
                let i = r.index();
                let Some(t) = self.trials[c][i] else { continue };
                if round < t.round + self.config.rollback_after {
                    continue;
                }
                self.trials[c][i] = None;
                let Some(peak) = t.peak else { continue };
                let helped = peak > self.config.threshold * t.before;
                let f = &mut self.feedback[c][i];
                f.judged += 1;
                f.effectiveness += 0.1 * (f64::from(u8::from(helped)) - f.effectiveness);
                if helped {
                    continue;
                }
                f.headroom = (f.headroom * 0.95).max(HEADROOM_RANGE.0);
                // Undo the raise, and hold off raising to that level again for as long unless
                // usage really presses: the forecast that asked for it was wrong.
                let from = self.alloc[c][i];
                let to = self.bounded(c, r, t.before).min(from);
                self.held_until[c][i] = round + self.config.rollback_after;
                self.held_at[c][i] = from;
                if to < from * (1.0 - self.config.up_band) {
                    self.record(Decision {
                        round,
                        component: c,
                        resource: r,
                        from,
                        to,
                        action: Action::Rollback,
                        reason: format!(
                            "raised from {:.1} {} rounds ago; usage peaked at {:.1}, under {:.0}% of the old allocation",
                            t.before,
                            round - t.round,
                            peak,
                            100.0 * self.config.threshold
                        ),
                        dry_run: self.config.dry_run,
                    });
                }
            }
        }
    }

    fn serve(&mut self, round: u64, q: &Request) {
        let (c, r, i) = (q.component, q.resource, q.resource.index());
        if self.untouchable(c, r) || !q.amount.is_finite() {
            return;
        }
        let q = &Request {
            amount: q.amount.max(self.held_peak(c, r)),
            ..*q
        };
        let current = self.alloc[c][i];
        let stable = self.recent[c][i].push(q.amount, self.config.cooldown.max(1));
        if !self.raise_whole(round, q) {
            self.settle_deferred(round, c, r);
            // A resource never changed counts its cooldown from its first request: a fresh
            // start releases nothing before a whole window of requests says it may.
            let window = self.config.cooldown.max(1);
            let cooled = match self.last_change[c][i] {
                Some(at) => round >= at + self.config.cooldown,
                None => self.recent[c][i].seen >= window,
            };
            let stable = self.bounded(c, r, stable);
            if stable < current * (1.0 - self.config.down_band) && cooled {
                let to = stable.max(current * (1.0 - self.config.max_step_down));
                self.record(Decision {
                    round,
                    component: c,
                    resource: r,
                    from: current,
                    to,
                    action: Action::Release,
                    reason: format!(
                        "requests of the last {} rounds are at least {:.0}% below the allocation",
                        self.recent[c][i].seen.min(window),
                        100.0 * (1.0 - stable / current)
                    ),
                    dry_run: self.config.dry_run,
                });
            }
        }
    }

    /// Takes up to `need - free` of `r` for `c`, lowest weight first, from the components
    /// whose weight passes `weight_ok` (an ascending prefix of `by_weight`) and that `takeable`
    /// accepts, down to what `keep` leaves them (opted-out components and `c` itself are never
    /// touched); returns what is free after. In dry-run nothing moves, but the count goes on
    /// so the decisions are the ones a live run would make.
    #[allow(clippy::too_many_arguments)]
    fn take_for(
        &mut self,
        round: u64,
        c: usize,
        r: Resource,
        need: f64,
        mut free: f64,
        why: impl Fn(&Self) -> String,
        weight_ok: impl Fn(f64) -> bool,
        keep: Keep,
        takeable: impl Fn(&Self, usize) -> bool,
    ) -> f64 {
        let i = r.index();
        let end = self
            .by_weight
            .partition_point(|&v| weight_ok(self.components[v].weight));
        let mut k = 0;
        while free < need {
            let holders = match keep {
                Keep::Floor => &self.above_floor[i],
                Keep::Need => &self.above_need[i],
            };
            let Some(place) = holders.next(k).filter(|&p| p < end) else {
                break;
            };
            k = place + 1;
            let v = self.by_weight[place];
            // Holders are never opted out of `r` (see `mark`).
            if v == c || !takeable(self, v) {
                continue;
            }
            let floor = self.bounds(v, r).0;
            let keep = match keep {
                Keep::Floor => floor,
                Keep::Need => floor.max(self.needs[v][i]),
            };
            let have = self.alloc[v][i];
            if have <= keep {
                continue;
            }
            let take = (have - keep).min(need - free);
            let reason = why(self);
            self.record(Decision {
                round,
                component: v,
                resource: r,
                from: have,
                to: have - take,
                action: Action::Preempted { by: c },
                reason,
                dry_run: self.config.dry_run,
            });
            free += take;
        }
        free
    }

    /// The peak usage `c`'s `r` is held at ([`AllocConfig::hold_peak`]); 0 where none is.
    fn held_peak(&self, c: usize, r: Resource) -> f64 {
        if self.config.hold_peak[r.index()] == 0 {
            return 0.0;
        }
        self.usage_peak[c][r.index()].max().max(0.0)
    }

    /// Whether the operator keeps the engine off `c`'s `r`.
    fn untouchable(&self, c: usize, r: Resource) -> bool {
        let p = &self.components[c].preferences;
        p.opt_out || p.unmanaged[r.index()]
    }

    /// Whether `q`'s allocation should rise to `target`: past the raise band and not held off
    /// after a rollback (a target no higher than the level rolled back from, unless usage or
    /// an observed demand presses), or below its floor.
    fn may_raise(&self, round: u64, q: &Request, target: f64) -> bool {
        let (c, r, i) = (q.component, q.resource, q.resource.index());
        let current = self.alloc[c][i];
        let pressed = self.last_usage[c][i] > self.config.threshold * current
            || q.observed > current * (1.0 + self.config.up_band);
        let held = round < self.held_until[c][i]
            && target <= self.held_at[c][i] * (1.0 + self.config.up_band)
            && !pressed;
        (target > current * (1.0 + self.config.up_band) && !held) || current < self.bounds(c, r).0
    }

    fn raise(&mut self, round: u64, q: &Request, current: f64, target: f64, part: Part) {
        let (c, r, i) = (q.component, q.resource, q.resource.index());
        let need = target - current;
        let mut free = self.free(r).max(0.0);
        let weight = self.components[c].weight;
        let critical = weight >= self.config.preempt_weight;
        if free < need && part == Part::Need {
            // A need comes before headroom: take what others hold above their own need. The
            // critical tier's headroom is never taken: it is what keeps that tier clear of
            // violations.
            let why = |e: &Self| {
                format!(
                    "headroom above its need reclaimed for {}'s need on a short pool of {r}",
                    e.components[c].name
                )
            };
            let preempt_weight = self.config.preempt_weight;
            free = self.take_for(
                round,
                c,
                r,
                need,
                free,
                why,
                |w| w < preempt_weight,
                Keep::Need,
                |_, _| true,
            );
        }
        if free < need && (critical || !self.deferrable(c, r)) {
            // Only a critical component takes what cannot wait; anyone whose request cannot
            // wait takes deferrable work; equal or higher weights are never touched. For a
            // need, down to floors; for headroom, down to the holder's own need.
            let why = |e: &Self| {
                format!(
                    "pool short of {r} for {} (weight {weight})",
                    e.components[c].name
                )
            };
            let keep = match part {
                Part::Need => Keep::Floor,
                Part::Whole => Keep::Need,
            };
            free = self.take_for(
                round,
                c,
                r,
                need,
                free,
                why,
                |w| w < weight,
                keep,
                |e, v| critical || e.deferrable(v, r),
            );
        }
        if free < need && part == Part::Need && self.aged[c][i] {
            // Work that has waited its turn takes from deferrable work of no higher weight
            // that has not: deferred work shares the pool in turns instead of starving.
            let why = |e: &Self| {
                format!(
                    "{} waited {} rounds for {r}; its turn",
                    e.components[c].name, e.config.age_after
                )
            };
            free = self.take_for(
                round,
                c,
                r,
                need,
                free,
                why,
                |w| w <= weight,
                Keep::Floor,
                |e, v| e.deferrable(v, r) && !e.aged[v][i],
            );
        }
        let grant = need.min(free);
        if grant > 0.0 {
            let to = current + grant;
            // A need and then headroom raised in one round are one raise to judge.
            let before = match self.trials[c][i] {
                Some(t) if t.round == round => t.before,
                _ => current,
            };
            self.trials[c][i] = Some(Trial {
                round,
                before,
                peak: None,
            });
            self.record(Decision {
                round,
                component: c,
                resource: r,
                from: current,
                to,
                action: Action::Raise,
                reason: match part {
                    Part::Need => format!(
                        "need {:.1} (risk {:.2}) above the allocation on a short pool; needs first",
                        target, q.risk
                    ),
                    Part::Whole if q.amount > 0.0 && q.amount <= self.held_peak(c, r) => {
                        format!(
                            "usage peaked at {:.1} in the last {} rounds, above the allocation",
                            q.amount, self.config.hold_peak[i]
                        )
                    }
                    Part::Whole => format!(
                        "request {:.1} (risk {:.2}) above the allocation",
                        q.amount, q.risk
                    ),
                },
                dry_run: self.config.dry_run,
            });
        }
        let short = need - grant;
        let tolerance = 1e-9 * target.abs().max(1.0);
        let need_met = self.alloc[c][i] >= self.needs[c][i] * (1.0 - 1e-9);
        if part == Part::Whole && short > tolerance && need_met {
            // Only headroom is missing: nothing waits.
            self.settle_deferred(round, c, r);
        } else if short > tolerance {
            match self
                .deferred
                .iter_mut()
                .find(|d| d.component == c && d.resource == r)
            {
                Some(d) => d.short = short,
                None => {
                    self.deferred.push(Deferred {
                        component: c,
                        resource: r,
                        short,
                        since: round,
                    });
                    let to = self.alloc[c][i];
                    self.push_audit(Decision {
                        round,
                        component: c,
                        resource: r,
                        from: to,
                        to,
                        action: Action::Deferred { short },
                        reason: format!("pool short of {short:.1} {r}; queued"),
                        dry_run: self.config.dry_run,
                    });
                }
            }
        } else {
            self.settle_deferred(round, c, r);
        }
    }

    /// Whether `c`'s work on `r` may wait: a deferrable component's CPU, network and disk
    /// work, never memory (memory that is not there is an OOM, not a delay).
    fn deferrable(&self, c: usize, r: Resource) -> bool {
        self.components[c].deferrable && r != Resource::Mem
    }

    /// A request that no longer waits leaves the queue, audited with its wait.
    fn settle_deferred(&mut self, round: u64, c: usize, r: Resource) {
        if let Some(pos) = self
            .deferred
            .iter()
            .position(|d| d.component == c && d.resource == r)
        {
            let d = self.deferred.remove(pos);
            let to = self.alloc[c][r.index()];
            self.push_audit(Decision {
                round,
                component: c,
                resource: r,
                from: to,
                to,
                action: Action::Granted {
                    waited: round - d.since,
                },
                reason: format!("met after waiting {} rounds", round - d.since),
                dry_run: self.config.dry_run,
            });
        }
    }
}

#[cfg(test)]
#[path = "alloc/tests.rs"]
mod tests;
