//! Rolling-origin evaluation of the forecasters on one series: MASE and interval coverage
//! per model and for the automatic choice, at chosen steps ahead.

use super::{AutoForecaster, ForecastConfig};
use crate::Result;

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

/// Streams `values` through a fresh [`AutoForecaster`]; after the first `warmup` rows, every
/// row's forecasts at each of `steps` are scored against the value that comes that many rows
/// later. Forecasts only ever see the rows before them.
pub fn evaluate_series(
    values: &[f64],
    config: ForecastConfig,
    steps: &[usize],
    warmup: usize,
) -> Result<SeriesEval> {
    let mut f = AutoForecaster::new(config)?;
    let mut forecasters = f.model_names();
    forecasters.push("auto");
    let models = forecasters.len() - 1;
    let mut accuracy = vec![vec![Accuracy::default(); steps.len()]; forecasters.len()];
    let furthest = steps.iter().copied().max().unwrap_or(1);
    for (i, &v) in values.iter().enumerate() {
        f.update(v);
        if i + 1 < warmup {
            continue;
        }
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
                    if !actual.is_finite() {
                        continue;
                    }
                    let p = forecast[step - 1];
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
    let diffs: Vec<f64> = values
        .windows(2)
        .map(|w| (w[1] - w[0]).abs())
        .filter(|d| d.is_finite())
        .collect();
    let scale = if diffs.is_empty() {
        0.0
    } else {
        diffs.iter().sum::<f64>() / diffs.len() as f64
    };
    Ok(SeriesEval {
        forecasters,
        steps: steps.to_vec(),
        accuracy,
        scale,
    })
}
