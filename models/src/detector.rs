//! A streaming anomaly detector: forecast, scaled error, anomaly likelihood, first alarm.
//!
//! Each value is compared with the one-step forecast an [`AutoForecaster`] made before seeing
//! it. The error divided by the forecast's own spread (its 90% interval half-width in normal
//! units) is the *surprise* `z`, clipped at [`DetectorParams::clip`]: beyond that, a bigger
//! error says nothing more, and one huge outlier must not numb the likelihood for months.
//! Three [`Likelihood`]s judge the series against its own history:
//! * an instant one, the surprise of this row: spikes and broken patterns;
//! * a sustained one, the surprise's mean over the last rows: a series that keeps being a
//!   little wrong, a changed regime;
//! * a level one, the mean of the last values themselves, high or low: a slow drift to where
//!   the series has not been, which a forecaster follows step by step without surprise (a
//!   machine cooling over hours, a day of half the usual traffic, spikes coming denser).
//!
//! The score is the most significant of the three, and a refractory period halves scores that
//! do not exceed the recent maximum, so the first alarm of an event stands out from the rest
//! of it.
//!
//! Every step costs one forecaster update (O(models × log window)); nothing looks ahead.

use std::collections::VecDeque;

use crate::forecast::{AutoForecaster, ForecastConfig};
use crate::likelihood::{Likelihood, LikelihoodParams, Side, significance};

/// Parameters of [`Detector`]: one set for every series.
#[derive(Debug, Clone, PartialEq)]
pub struct DetectorParams {
    /// Surprises (errors in units of the forecast's spread) are clipped here.
    pub clip: f64,
    /// Rows averaged by the sustained likelihood.
    pub sustained: usize,
    /// Values averaged by the level likelihood (0: no level likelihood).
    pub level: usize,
    /// After a score, later scores within this many rows are halved unless they exceed it:
    /// the first alarm of an event is the one that counts.
    pub refractory: usize,
    /// The likelihoods' history and learning period (their `short` is set by the detector).
    pub likelihood: LikelihoodParams,
}

impl Default for DetectorParams {
    fn default() -> Self {
        Self {
            clip: 10.0,
            sustained: 12,
            level: 48,
            refractory: 300,
            likelihood: LikelihoodParams::default(),
        }
    }
}

/// A streaming detector for one series. Create one per series.
#[derive(Debug, Clone)]
pub struct Detector {
    params: DetectorParams,
    forecaster: AutoForecaster,
    instant: Likelihood,
    sustained: Likelihood,
    level: Option<Likelihood>,
    /// Recent output scores, for the refractory period.
    recent: VecDeque<f64>,
}

/// The interval level whose half-width scales the surprise, and its normal quantile.
const LEVEL: f64 = 0.9;
const LEVEL_Z: f64 = 1.644_853_626_951_472_2;

impl Detector {
    pub fn new(params: DetectorParams) -> Self {
        let forecaster = AutoForecaster::new(ForecastConfig {
            horizon: 1,
            ..ForecastConfig::default()
        })
        // The default forecast config with horizon 1 is valid.
        .expect("a valid forecast config");
        let instant = Likelihood::new(LikelihoodParams {
            short: 1,
            ..params.likelihood
        });
        let sustained = Likelihood::new(LikelihoodParams {
            short: params.sustained.max(1),
            ..params.likelihood
        });
        let level = (params.level > 0).then(|| {
            Likelihood::new(LikelihoodParams {
                short: params.level,
                min_std: 0.0,
                side: Side::Both,
                ..params.likelihood
            })
        });
        Self {
            params,
            forecaster,
            instant,
            sustained,
            level,
            recent: VecDeque::new(),
        }
    }

    /// Takes the next value; returns its anomaly score in [0, 1].
    pub fn update(&mut self, value: f64) -> f64 {
        let z = match self.forecaster.forecast(1, LEVEL).first() {
            Some(p) if value.is_finite() => {
                let spread = ((p.upper - p.lower) / 2.0 / LEVEL_Z).max(1e-9 * (1.0 + value.abs()));
                (value - p.mean).abs() / spread
            }
            _ => 0.0,
        };
        self.forecaster.update(value);
        let surprise = if z.is_finite() {
            z.min(self.params.clip)
        } else {
            self.params.clip
        };
        let mut tail = self
            .instant
            .update(surprise)
            .min(self.sustained.update(surprise));
        if let Some(level) = &mut self.level {
            tail = tail.min(level.update(value));
        }
        let score = significance(tail);
        if self.params.refractory == 0 {
            return score;
        }
        let before = self.recent.iter().copied().fold(0.0, f64::max);
        self.recent.push_back(score);
        if self.recent.len() > self.params.refractory {
            self.recent.pop_front();
        }
        if score > before { score } else { score * 0.5 }
    }
}

/// Scores a whole series with a fresh detector (row by row, as a stream).
pub fn score_series(values: &[f64], params: &DetectorParams) -> Vec<f64> {
    let mut d = Detector::new(params.clone());
    values.iter().map(|&v| d.update(v)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sine(n: usize) -> Vec<f64> {
        (0..n)
            .map(|i| 50.0 + 10.0 * (i as f64 * std::f64::consts::TAU / 288.0).sin())
            .collect()
    }

    #[test]
    fn scores_are_in_range_and_a_spike_stands_out() {
        let mut v = sine(4000);
        v[3000] += 40.0;
        let s = score_series(&v, &DetectorParams::default());
        assert!(s.iter().all(|x| (0.0..=1.0).contains(x)));
        let before = s[1000..2990].iter().cloned().fold(0.0, f64::max);
        assert!(s[3000] > before, "spike {} vs max before {before}", s[3000]);
    }

    #[test]
    fn a_slow_drift_to_a_new_level_is_flagged_by_the_level_likelihood() {
        // Noise of ±1 around 50, then a decline of 3 over 600 rows: every step's change
        // (0.005) hides in the noise, so the forecaster follows it without surprise.
        let mut seed = 3u64;
        let mut v = vec![49.0; 6000];
        for (i, x) in v.iter_mut().enumerate() {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            *x += (seed >> 11) as f64 / (1u64 << 53) as f64 * 2.0;
            if i >= 5000 {
                *x -= 3.0 * ((i - 5000) as f64 / 600.0).min(1.0);
            }
        }
        let peak = |params: &DetectorParams, rows: std::ops::Range<usize>| {
            score_series(&v, params)[rows]
                .iter()
                .cloned()
                .fold(0.0, f64::max)
        };
        let with = DetectorParams::default();
        let without = DetectorParams {
            level: 0,
            ..DetectorParams::default()
        };
        let (before, drift) = (peak(&with, 1000..5000), peak(&with, 5000..6000));
        assert!(drift > 0.9 && drift > before + 0.3, "{drift} vs {before}");
        let blind = peak(&without, 5000..6000);
        assert!(blind < drift - 0.3, "without the level likelihood: {blind}");
    }

    #[test]
    fn no_look_ahead_scores_of_a_prefix_do_not_change() {
        let mut v = sine(3000);
        for (i, x) in v.iter_mut().enumerate() {
            *x += ((i * 7919) % 13) as f64 * 0.1;
        }
        let full = score_series(&v, &DetectorParams::default());
        for k in [1, 10, 500, 2999] {
            assert_eq!(
                score_series(&v[..k], &DetectorParams::default()),
                full[..k].to_vec(),
                "cut at {k}"
            );
        }
    }

    #[test]
    fn flat_and_non_finite_input_is_handled() {
        let mut v = vec![5.0; 1000];
        v[700] = f64::NAN;
        v[800] = 6.0;
        let s = score_series(&v, &DetectorParams::default());
        assert!(s.iter().all(|x| x.is_finite() && (0.0..=1.0).contains(x)));
        assert!(s[800] >= s[799]);
    }
}
