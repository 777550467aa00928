//! Rolling-origin evaluation of the forecasters on one series: MASE and interval coverage
//! per model and for the automatic choice, at chosen steps ahead.

use std::time::{Duration, Instant};

use super::{AutoForecaster, ForecastConfig};
use crate::Result;
use crate::global::{GlobalConfig, GlobalLstm, GlobalStats, KINDS, SeriesId};

/// Interval levels whose coverage is measured.
pub const LEVELS: [f64; 3] = [0.8, 0.9, 0.95];

/// One forecaster's accuracy at one step ahead.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Accuracy {
    /// Forecasts scored.
    pub n: usize,
    /// Sum of absolute errors.
    pub abs_error: f64,
    /// Actual values inside the interval, per [`LEVELS`] entry.
    pub covered: [usize; 3],
}

impl Accuracy {
    /// Mean absolute error divided by `scale` (the series' in-sample one-step naive MAE).
    pub fn mase(&self, scale: f64) -> f64 {
        if self.n == 0 || scale <= 0.0 {
            f64::NAN
        } else {
            self.abs_error / self.n as f64 / scale
        }
    }

    /// Fraction of actual values inside the interval at `LEVELS[level]`.
    pub fn coverage(&self, level: usize) -> f64 {
        if self.n == 0 {
            f64::NAN
        } else {
            self.covered[level] as f64 / self.n as f64
        }
    }

    pub fn merge(&mut self, other: &Accuracy) {
        self.n += other.n;
        self.abs_error += other.abs_error;
        for (a, b) in self.covered.iter_mut().zip(other.covered) {
            *a += b;
        }
    }
}

/// The evaluation of one series.
#[derive(Debug, Clone, PartialEq)]
pub struct SeriesEval {
    /// Model names, then `"auto"` last.
    pub forecasters: Vec<&'static str>,
    /// The steps ahead evaluated.
    pub steps: Vec<usize>,
    /// `accuracy[forecaster][step index]`.
    pub accuracy: Vec<Vec<Accuracy>>,
    /// Mean |y_t − y_{t−1}| over the series: MASE's scale.
    pub scale: f64,
}

/// One series of a fleet to evaluate.
#[derive(Debug, Clone, Copy)]
pub struct Input<'a> {
    pub values: &'a [f64],
    /// Unix seconds per row (for the global model's time features); may be empty.
    pub times: &'a [f64],
    /// Index into [`crate::global::KINDS`].
    pub kind: usize,
    /// Rows that only train before forecasts are scored.
    pub warmup: usize,
}

/// What the global model cost over an evaluation.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GlobalCost {
    pub stats: GlobalStats,
    /// Wall time in [`GlobalLstm::train`] and in [`GlobalLstm::forecast`], over every round.
    pub train: Duration,
    pub infer: Duration,
}

/// Streams `values` through a fresh [`AutoForecaster`]; after the first `warmup` rows, every
/// row's forecasts at each of `steps` are scored against the value that comes that many rows
/// later. Forecasts only ever see the rows before them.
pub fn evaluate_series(
    values: &[f64],
    config: ForecastConfig,
    steps: &[usize],
    warmup: usize,
) -> Result<SeriesEval> {
    let input = Input {
        values,
        times: &[],
        kind: KINDS.len() - 1,
        warmup,
    };
    let (mut evals, _) = evaluate_fleet(&[input], config, None, steps)?;
    Ok(evals.remove(0))
}

/// [`evaluate_series`] for many series at once, in lockstep: round r gives every series its
/// row r. With `global`, one [`GlobalLstm`] serves them all, as it would a fleet: after each
/// round's values it trains its round's budget and forecasts every series in one batched
/// pass, and each series' [`AutoForecaster`] (with [`ForecastConfig::global`] set) scores and
/// chooses that forecast beside its own models'. Nothing sees a series' later rows.
pub fn evaluate_fleet(
    series: &[Input<'_>],
    config: ForecastConfig,
    global: Option<GlobalConfig>,
    steps: &[usize],
) -> Result<(Vec<SeriesEval>, Option<GlobalCost>)> {
    let model = global.map(GlobalLstm::new).transpose()?;
    let (evals, cost, _) = evaluate_fleet_with(series, config, model, steps)?;
    Ok((evals, cost))
}

/// [`evaluate_fleet`] with a global model that may already be trained (its series are
/// kept; the fleet's are added), which is handed back afterwards: to carry on training it,
/// to save it, or, with `steps_per_round` 0, to measure it on series it never trained on.
pub fn evaluate_fleet_with(
    series: &[Input<'_>],
    config: ForecastConfig,
    mut model: Option<GlobalLstm>,
    steps: &[usize],
) -> Result<(Vec<SeriesEval>, Option<GlobalCost>, Option<GlobalLstm>)> {
    let config = ForecastConfig {
        global: model.is_some(),
        ..config
    };
    let mut forecasters = series
        .iter()
        .map(|_| AutoForecaster::new(config))
        .collect::<Result<Vec<_>>>()?;
    let mut names = AutoForecaster::new(config)?.model_names();
    names.push("auto");
    let mut accuracy =
        vec![vec![vec![Accuracy::default(); steps.len()]; names.len()]; series.len()];
    let ids: Vec<SeriesId> = match &mut model {
        Some(g) => series.iter().map(|s| g.add_series(s.kind)).collect(),
        None => Vec::new(),
    };
    let (mut train, mut infer) = (Duration::ZERO, Duration::ZERO);
    let rows = series.iter().map(|s| s.values.len()).max().unwrap_or(0);
    for r in 0..rows {
        for (i, s) in series.iter().enumerate() {
            let Some(&v) = s.values.get(r) else { continue };
            forecasters[i].update(v);
            if let Some(g) = &mut model {
                let t = s.times.get(r).copied().unwrap_or(0.0);
                g.push(ids[i], t, v, forecasters[i].history().period())?;
            }
        }
        if let Some(g) = &mut model {
            let started = Instant::now();
            g.train()?;
            train += started.elapsed();
            let started = Instant::now();
            let paths = g.forecast()?;
            infer += started.elapsed();
            for (i, s) in series.iter().enumerate() {
                if r < s.values.len()
                    && let Some(path) = &paths[ids[i].0]
                {
                    let medians: Vec<f64> = path.iter().map(|p| p.median).collect();
                    forecasters[i].supply(&medians);
                }
            }
        }
        for (i, s) in series.iter().enumerate() {
            if r < s.values.len() && r + 1 >= s.warmup {
                score_row(&forecasters[i], s.values, r, steps, &mut accuracy[i]);
            }
        }
    }
    let evals = series
        .iter()
        .zip(accuracy)
        .map(|(s, accuracy)| SeriesEval {
            forecasters: names.clone(),
            steps: steps.to_vec(),
            accuracy,
            scale: mase_scale(s.values),
        })
        .collect();
    let cost = model.as_ref().map(|g| GlobalCost {
        stats: g.stats(),
        train,
        infer,
    });
    Ok((evals, cost, model))
}

/// Scores the forecasts `f` makes after row `i` of `values`, by every model and the
/// automatic choice, at each of `steps` ahead.
fn score_row(
    f: &AutoForecaster,
    values: &[f64],
    i: usize,
    steps: &[usize],
    accuracy: &mut [Vec<Accuracy>],
) {
    let models = accuracy.len() - 1;
    let furthest = steps.iter().copied().max().unwrap_or(1);
    for (which, acc) in accuracy.iter_mut().enumerate() {
        for (level_index, &level) in LEVELS.iter().enumerate() {
            let forecast = if which == models {
                f.forecast(furthest, level)
            } else {
                f.forecast_model(which, furthest, level)
            };
            for (s, &step) in steps.iter().enumerate() {
                let Some(&actual) = values.get(i + step) else {
                    continue;
                };
                let p = forecast[step - 1];
                if !actual.is_finite() || !p.mean.is_finite() {
                    continue;
                }
                let a = &mut acc[s];
                if level_index == 0 {
                    a.n += 1;
                    a.abs_error += (p.mean - actual).abs();
                }
                a.covered[level_index] += usize::from(p.lower <= actual && actual <= p.upper);
            }
        }
    }
}

/// Mean |y_t − y_{t−1}| over the series: MASE's scale.
fn mase_scale(values: &[f64]) -> f64 {
    let diffs: Vec<f64> = values
        .windows(2)
        .map(|w| (w[1] - w[0]).abs())
        .filter(|d| d.is_finite())
        .collect();
    if diffs.is_empty() {
        0.0
    } else {
        diffs.iter().sum::<f64>() / diffs.len() as f64
    }
}
