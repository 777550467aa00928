//! Per-component risk: a Bayesian network over the component's discretised metric states,
//! its health and one "bottleneck within the horizon" node per resource.
//!
//! For each metric there are three evidence nodes:
//! * `deviation:<m>`: the value against its own forecast (`below`, `normal`, `above`, by the
//!   forecast's interval);
//! * `level:<m>`: the value against the metric's threshold (`ok`, `near`, `over`);
//! * `trend:<m>`: where the forecast says the metric is heading over the horizon (`falling`,
//!   `flat`, `rising`, by the forecast's spread).
//!
//! and one `health` node (`pass`, `warn`, `fail`). Each resource has a `bottleneck:<r>` node
//! (`no`, `yes`): will one of its metrics cross its threshold within the horizon? Its score
//! is P(yes | evidence) and its reasons are the evidence that moved it most.
//!
//! [`training_rows`] turns a component's history into labelled samples (the label is known in
//! hindsight); [`RiskModel::learn`] learns the structure from them (or [`RiskModel::new`]
//! declares the default one: every evidence node of a resource's metrics and `health` are
//! parents of its bottleneck node), and [`RiskModel::observe`] keeps counting online.

use serde::{Deserialize, Serialize};

use crate::bayes::{Network, Variable};
use crate::forecast::{AutoForecaster, ForecastConfig, Step};
use crate::{Error, Result};

/// What a metric means for risk.
#[derive(Debug, Clone, PartialEq)]
pub struct MetricSpec {
    pub name: String,
    /// The resource this metric exhausts (for example `cpu` for `usage_user`).
    pub resource: String,
    /// The level that counts as a bottleneck.
    pub threshold: f64,
}

/// Discretisation and learning settings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RiskConfig {
    /// Rows ahead a bottleneck is predicted for.
    pub horizon: usize,
    /// `near` starts at this fraction of the threshold.
    pub near: f64,
    /// Interval level of the forecast used for deviation and trend.
    pub level: f64,
    /// Dirichlet prior per table cell.
    pub prior: f64,
    /// Parent limit for structure learning.
    pub max_parents: usize,
}

impl Default for RiskConfig {
    fn default() -> Self {
        Self {
            horizon: 12,
            near: 0.8,
            level: 0.9,
            prior: 0.5,
            max_parents: 4,
        }
    }
}

/// A component's health signal.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Health {
    Pass = 0,
    Warn = 1,
    Fail = 2,
}

/// One metric at one time, with what its forecaster expected.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct MetricObs {
    pub value: f64,
    /// The one-step forecast for this value and its interval.
    pub expected: f64,
    pub expected_lower: f64,
    pub expected_upper: f64,
    /// The forecast `horizon` rows ahead, and the half-width of its interval.
    pub ahead: f64,
    pub ahead_spread: f64,
}

/// A component at one time: one entry per metric (`None` when missing) and its health.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Observation {
    pub metrics: Vec<Option<MetricObs>>,
    pub health: Option<Health>,
}

/// One resource's risk.
#[derive(Debug, Clone, PartialEq)]
pub struct Risk {
    pub resource: String,
    /// P(bottleneck within the horizon | evidence).
    pub score: f64,
    /// The evidence that moved the score most, as `node=state (±delta)`, largest first.
    pub reasons: Vec<String>,
}

/// The risk model of one component.
#[derive(Debug, Clone, PartialEq)]
pub struct RiskModel {
    metrics: Vec<MetricSpec>,
    resources: Vec<String>,
    config: RiskConfig,
    net: Network,
}

impl RiskModel {
    /// A model with the default (declared) structure and empty tables.
    pub fn new(metrics: Vec<MetricSpec>, config: RiskConfig) -> Result<Self> {
        let (vars, resources) = variables(&metrics)?;
        let m = metrics.len();
        let mut parents = vec![Vec::new(); vars.len()];
        for (r, resource) in resources.iter().enumerate() {
            let node = 3 * m + 1 + r;
            for (i, spec) in metrics.iter().enumerate() {
                if &spec.resource == resource {
                    parents[node].extend([3 * i, 3 * i + 1, 3 * i + 2]);
                }
            }
            parents[node].push(3 * m);
        }
        let net = Network::new(vars, parents, config.prior)?;
        Ok(Self {
            metrics,
            resources,
            config,
            net,
        })
    }

    /// A model whose structure is learned from `rows` (see [`training_rows`]) by BIC hill
    /// climbing, with the tables counted from the same rows.
    pub fn learn(
        metrics: Vec<MetricSpec>,
        config: RiskConfig,
        rows: &[(Observation, Vec<bool>)],
    ) -> Result<Self> {
        let mut model = Self::new(metrics, config)?;
        let vars = model.net.vars().to_vec();
        let data: Vec<Vec<usize>> = rows
            .iter()
            .filter_map(|(o, labels)| model.sample(o, labels).ok().flatten())
            .collect();
        model.net = Network::learn(vars, &data, config.max_parents, config.prior, &|_, _| true)?;
        Ok(model)
    }

    /// The learned tables (Dirichlet counts), to keep across restarts.
    pub fn tables(&self) -> &[Vec<f64>] {
        self.net.counts()
    }

    /// Carries on from [`RiskModel::tables`] of a model with the same metrics and structure;
    /// refused (the model unchanged) if they do not fit.
    pub fn restore_tables(&mut self, tables: Vec<Vec<f64>>) -> Result<()> {
        self.net.restore_counts(tables)
    }

    pub fn network(&self) -> &Network {
        &self.net
    }

    pub fn resources(&self) -> &[String] {
        &self.resources
    }

    /// The evidence of an observation: one state per evidence node, `None` where missing.
    pub fn evidence(&self, obs: &Observation) -> Result<Vec<Option<usize>>> {
        if obs.metrics.len() != self.metrics.len() {
            return Err(Error::Config {
                reason: format!(
                    "an observation has {} metrics, the model {}",
                    obs.metrics.len(),
                    self.metrics.len()
                ),
            });
        }
        let mut e = vec![None; self.net.vars().len()];
        for (i, (spec, o)) in self.metrics.iter().zip(&obs.metrics).enumerate() {
            let Some(o) = o.filter(|o| o.value.is_finite()) else {
                continue;
            };
            e[3 * i] = Some(if o.value < o.expected_lower {
                0
            } else if o.value > o.expected_upper {
                2
            } else {
                1
            });
            e[3 * i + 1] = Some(level(o.value, spec.threshold, self.config.near));
            let change = o.ahead - o.value;
            let spread = o.ahead_spread.max(1e-9 * (1.0 + o.value.abs()));
            e[3 * i + 2] = Some(if change > spread {
                2
            } else if change < -spread {
                0
            } else {
                1
            });
        }
        let m = self.metrics.len();
        e[3 * m] = obs.health.map(|h| h as usize).or_else(|| {
            // No health signal: derive it from the levels, as the health rules do.
            let levels: Vec<usize> = (0..m).filter_map(|i| e[3 * i + 1]).collect();
            (!levels.is_empty()).then(|| levels.into_iter().max().unwrap_or(0))
        });
        Ok(e)
    }

    /// The full sample of a labelled observation; `None` when a metric is missing.
    fn sample(&self, obs: &Observation, labels: &[bool]) -> Result<Option<Vec<usize>>> {
        let e = self.evidence(obs)?;
        let m = self.metrics.len();
        if labels.len() != self.resources.len() {
            return Err(Error::Config {
                reason: format!(
                    "{} labels for {} resources",
                    labels.len(),
                    self.resources.len()
                ),
            });
        }
        let Some(mut s) = e
            .iter()
            .take(3 * m + 1)
            .copied()
            .collect::<Option<Vec<usize>>>()
        else {
            return Ok(None);
        };
        s.extend(labels.iter().map(|&b| usize::from(b)));
        Ok(Some(s))
    }

    /// Counts one labelled observation into the tables (online learning). Rows with missing
    /// metrics are skipped.
    pub fn observe(&mut self, obs: &Observation, labels: &[bool]) -> Result<()> {
        match self.sample(obs, labels)? {
            Some(s) => self.net.observe(&s, 1.0),
            None => Ok(()),
        }
    }

    /// P(bottleneck within the horizon | evidence) of each resource, without the reasons (one
    /// inference per resource instead of [`risk`](Self::risk)'s attribution).
    pub fn scores(&self, obs: &Observation) -> Result<Vec<f64>> {
        let evidence = self.evidence(obs)?;
        let m = self.metrics.len();
        (0..self.resources.len())
            .map(|r| Ok(self.net.posterior(3 * m + 1 + r, &evidence)?[1]))
            .collect()
    }

    /// The risk of each resource given an observation, with its reasons.
    pub fn risk(&self, obs: &Observation) -> Result<Vec<Risk>> {
        let evidence = self.evidence(obs)?;
        let m = self.metrics.len();
        let mut out = Vec::with_capacity(self.resources.len());
        for (r, resource) in self.resources.iter().enumerate() {
            let node = 3 * m + 1 + r;
            let (score, reasons) = self.net.explain(node, 1, &evidence)?;
            let vars = self.net.vars();
            out.push(Risk {
                resource: resource.clone(),
                score,
                reasons: reasons
                    .iter()
                    .filter(|r| r.delta.abs() >= 0.01)
                    .take(3)
                    .map(|r| {
                        let v = &vars[r.var];
                        format!("{}={} ({:+.2})", v.name, v.states[r.state], r.delta)
                    })
                    .collect(),
            });
        }
        Ok(out)
    }
}

/// The nodes of a component's network: 3 per metric, health, then a bottleneck per resource
/// (in order of first mention).
fn variables(metrics: &[MetricSpec]) -> Result<(Vec<Variable>, Vec<String>)> {
    if metrics.is_empty() {
        return Err(Error::Config {
            reason: "a risk model needs at least one metric".into(),
        });
    }
    let mut vars = Vec::new();
    let mut resources: Vec<String> = Vec::new();
    for m in metrics {
        if !m.threshold.is_finite() {
            return Err(Error::Config {
                reason: format!("metric {} has no finite threshold", m.name),
            });
        }
        vars.push(Variable::new(
            format!("deviation:{}", m.name),
            &["below", "normal", "above"],
        ));
        vars.push(Variable::new(
            format!("level:{}", m.name),
            &["ok", "near", "over"],
        ));
        vars.push(Variable::new(
            format!("trend:{}", m.name),
            &["falling", "flat", "rising"],
        ));
        if !resources.contains(&m.resource) {
            resources.push(m.resource.clone());
        }
    }
    vars.push(Variable::new("health", &["pass", "warn", "fail"]));
    for r in &resources {
        vars.push(Variable::new(format!("bottleneck:{r}"), &["no", "yes"]));
    }
    Ok((vars, resources))
}

fn level(value: f64, threshold: f64, near: f64) -> usize {
    if value >= threshold {
        2
    } else if value >= near * threshold {
        1
    } else {
        0
    }
}

/// Streams a component's aligned metric histories (`series[metric][row]`, NaN where a metric
/// is missing) through one forecaster per metric and returns, per row, the observation as it
/// looked then and its labels (did each resource's metric cross its threshold within the next
/// `horizon` rows). The last `horizon` rows have no complete label and are left out; so are
/// rows before every forecaster has seen `warmup` values.
pub fn training_rows(
    metrics: &[MetricSpec],
    series: &[Vec<f64>],
    config: RiskConfig,
    warmup: usize,
) -> Result<Vec<(Observation, Vec<bool>)>> {
    let (observations, labels) = replay(metrics, series, config)?;
    Ok(observations
        .into_iter()
        .zip(labels)
        .skip(warmup)
        .filter_map(|(o, l)| l.map(|l| (o, l)))
        .collect())
}

/// The risk of each resource of a component now (after its last row), from its history alone:
/// the history is replayed through forecasters, every row whose outcome is known is counted
/// into a model of the default structure, and the last row is the evidence.
pub fn assess(
    metrics: &[MetricSpec],
    series: &[Vec<f64>],
    config: RiskConfig,
    warmup: usize,
) -> Result<Vec<Risk>> {
    let (mut observations, labels) = replay(metrics, series, config)?;
    let Some(now) = observations.pop() else {
        return Err(Error::Config {
            reason: "no history to assess".into(),
        });
    };
    let mut model = RiskModel::new(metrics.to_vec(), config)?;
    for (o, l) in observations.iter().zip(labels).skip(warmup) {
        if let Some(l) = l {
            model.observe(o, &l)?;
        }
    }
    model.risk(&now)
}

/// Every row's observation, and its labels where the next `horizon` rows are known.
type Replay = (Vec<Observation>, Vec<Option<Vec<bool>>>);

fn replay(metrics: &[MetricSpec], series: &[Vec<f64>], config: RiskConfig) -> Result<Replay> {
    let (_, resources) = variables(metrics)?;
    if series.len() != metrics.len() {
        return Err(Error::Config {
            reason: format!("{} series for {} metrics", series.len(), metrics.len()),
        });
    }
    let rows = series.iter().map(Vec::len).min().unwrap_or(0);
    let h = config.horizon.max(1);
    let fc = ForecastConfig {
        horizon: h,
        ..ForecastConfig::default()
    };
    let mut forecasters = (0..metrics.len())
        .map(|_| AutoForecaster::new(fc))
        .collect::<Result<Vec<_>>>()?;
    let mut observations = Vec::with_capacity(rows);
    let mut labels = Vec::with_capacity(rows);
    for t in 0..rows {
        let obs = forecasters
            .iter_mut()
            .enumerate()
            .map(|(i, f)| observe_metric(f, series[i][t], config))
            .collect();
        observations.push(Observation {
            metrics: obs,
            health: None,
        });
        labels.push((t + h < rows).then(|| {
            resources
                .iter()
                .map(|r| {
                    metrics.iter().enumerate().any(|(i, m)| {
                        &m.resource == r
                            && series[i][t + 1..=t + h].iter().any(|&v| v >= m.threshold)
                    })
                })
                .collect()
        }));
    }
    Ok((observations, labels))
}

/// What `f` expected for `value`, then learns it and looks `horizon` ahead.
pub fn observe_metric(f: &mut AutoForecaster, value: f64, config: RiskConfig) -> Option<MetricObs> {
    let before = expected(f, config);
    f.update(value);
    observed(f, before, value, config)
}

/// [`observe_metric`]'s first half: what `f` expects of the next value.
pub fn expected(f: &AutoForecaster, config: RiskConfig) -> Option<Step> {
    f.forecast(1, config.level).first().copied()
}

/// [`observe_metric`]'s second half, once `f` has learned `value` (and been handed what a
/// global model forecasts after it): the metric's observation, from what was `before`
/// [`expected`] and what `f` now sees `horizon` ahead.
pub fn observed(
    f: &AutoForecaster,
    before: Option<Step>,
    value: f64,
    config: RiskConfig,
) -> Option<MetricObs> {
    let ahead = f
        .forecast(config.horizon.max(1), config.level)
        .last()
        .copied();
    match (before, ahead) {
        (Some(b), Some(a)) if value.is_finite() => Some(MetricObs {
            value,
            expected: b.mean,
            expected_lower: b.lower,
            expected_upper: b.upper,
            ahead: a.mean,
            ahead_spread: (a.upper - a.lower) / 2.0,
        }),
        _ => None,
    }
}

#[cfg(test)]
#[path = "risk/tests.rs"]
mod tests;
