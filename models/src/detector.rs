//! A streaming anomaly detector: one-step forecasts, scaled errors, anomaly likelihood.
//!
//! Several cheap one-step forecasters run side by side: naive (the last value) and seasonal
//! naive at a few candidate periods (a day and an hour of 5-minute data, a day of hourly data).
//! Each forecaster's error, divided by its own typical error, is its surprise; by default the
//! largest surprise counts (something a usually-right forecaster did not expect), and a
//! refractory period damps repeats so the first alarm of an event stands out; [`Likelihood`] turns the surprise into
//! a score in [0, 1]. Every step is O(1) in time and memory bounded by the longest period
//! and the likelihood's history: no look-ahead, no second pass.

use std::collections::VecDeque;

use crate::likelihood::{Likelihood, LikelihoodParams, log_scale};

/// Parameters of [`Detector`]: one set for every series.
#[derive(Debug, Clone, PartialEq)]
pub struct DetectorParams {
    /// Candidate seasonal periods, in rows.
    pub periods: Vec<usize>,
    /// Smoothing of each forecaster's error scale.
    pub scale_alpha: f64,
    /// Smoothing of the error used to pick the best forecaster.
    pub choice_alpha: f64,
    /// How the forecasters' surprises become one.
    pub combine: Combine,
    /// After a score, later scores within this many rows are damped unless they exceed it:
    /// the first alarm of an event is the one that counts.
    pub refractory: usize,
    pub likelihood: LikelihoodParams,
}

impl Default for DetectorParams {
    fn default() -> Self {
        Self {
            periods: vec![288, 24, 12],
            scale_alpha: 0.005,
            choice_alpha: 0.01,
            combine: Combine::Max,
            refractory: 300,
            likelihood: LikelihoodParams {
                short: 5,
                ..LikelihoodParams::default()
            },
        }
    }
}

/// How the forecasters' surprises combine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Combine {
    /// The surprise of the forecaster with the lowest recent error.
    Best,
    /// The largest surprise: anything that a usually-right forecaster did not expect.
    Max,
}

/// One forecaster's running state.
#[derive(Debug, Clone)]
struct Candidate {
    /// 0 for naive, else the seasonal period.
    lag: usize,
    scale: Option<f64>,
    choice: Option<f64>,
}

/// A streaming detector for one series. Create one per series.
#[derive(Debug, Clone)]
pub struct Detector {
    params: DetectorParams,
    history: VecDeque<f64>,
    capacity: usize,
    candidates: Vec<Candidate>,
    likelihood: Likelihood,
    magnitude: f64,
    /// Recent output scores, for the refractory period.
    recent: VecDeque<f64>,
}

impl Detector {
    pub fn new(params: DetectorParams) -> Self {
        let capacity = params.periods.iter().copied().max().unwrap_or(1).max(1);
        let candidates = std::iter::once(0)
            .chain(params.periods.iter().copied())
            .map(|lag| Candidate {
                lag,
                scale: None,
                choice: None,
            })
            .collect();
        let likelihood = Likelihood::new(params.likelihood);
        Self {
            params,
            history: VecDeque::with_capacity(capacity + 1),
            capacity,
            candidates,
            likelihood,
            magnitude: 0.0,
            recent: VecDeque::new(),
        }
    }

    /// Takes the next value; returns its anomaly score in [0, 1].
    pub fn update(&mut self, value: f64) -> f64 {
        let value = if value.is_finite() {
            value
        } else {
            self.history.back().copied().unwrap_or(0.0)
        };
        self.magnitude += 0.01 * (value.abs() - self.magnitude);
        let floor = 1e-6 * (1.0 + self.magnitude);
        let mut best: Option<(f64, f64)> = None; // (choice error, surprise)
        for c in &mut self.candidates {
            let lag = c.lag.max(1);
            if self.history.len() < lag {
                continue;
            }
            let predicted = self.history[self.history.len() - lag];
            let err = (value - predicted).abs();
            let surprise = match c.scale {
                Some(s) => err / (s + floor),
                None => 0.0,
            };
            if let Some(choice) = c.choice {
                let better = match self.params.combine {
                    Combine::Best => best.is_none_or(|(b, _)| choice < b),
                    Combine::Max => best.is_none_or(|(_, s)| surprise > s),
                };
                if better {
                    best = Some((choice, surprise));
                }
            }
            c.scale = Some(
                c.scale
                    .map_or(err, |s| s + self.params.scale_alpha * (err - s)),
            );
            c.choice = Some(
                c.choice
                    .map_or(err, |s| s + self.params.choice_alpha * (err - s)),
            );
        }
        self.history.push_back(value);
        if self.history.len() > self.capacity {
            self.history.pop_front();
        }
        let surprise = best.map_or(0.0, |(_, s)| s);
        let score = log_scale(self.likelihood.update((1.0 + surprise.min(1e6)).ln()));
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
