//! Anomaly likelihood: how unusual the recent surprise is against its own long-run history.
//!
//! A forecaster's error, scaled by its expected spread, is a *surprise*. Surprise alone is a
//! poor alarm: noisy series are always surprising, and one outlier in a quiet series is not
//! a regime change. The likelihood compares the short-term mean of the surprise with the
//! distribution of that mean over a long history (a normal fit to a trailing window) and
//! reports the upper-tail probability. The final score is the log-scaled likelihood, so
//! that 0.999 and 0.99999 are far apart: thresholds then carry across series.
//!
//! After Ahmad et al., "Unsupervised real-time anomaly detection for streaming data"
//! (Neurocomputing 2017), the post-processing of Numenta's HTM detector.

use std::collections::VecDeque;

/// Parameters of [`Likelihood`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LikelihoodParams {
    /// Rows before any score other than 0.5 is given.
    pub learning: usize,
    /// Rows in the short-term average.
    pub short: usize,
    /// Rows of history the normal fit uses.
    pub history: usize,
    /// Lower bound on the fitted standard deviation (surprise units).
    pub min_std: f64,
}

impl Default for LikelihoodParams {
    fn default() -> Self {
        Self {
            learning: 300,
            short: 10,
            history: 8640,
            min_std: 0.05,
        }
    }
}

/// Streaming anomaly likelihood over a surprise signal.
#[derive(Debug, Clone)]
pub struct Likelihood {
    p: LikelihoodParams,
    recent: VecDeque<f64>,
    recent_sum: f64,
    history: VecDeque<f64>,
    sum: f64,
    sum_sq: f64,
    seen: usize,
}

impl Likelihood {
    pub fn new(p: LikelihoodParams) -> Self {
        Self {
            p,
            recent: VecDeque::with_capacity(p.short + 1),
            recent_sum: 0.0,
            history: VecDeque::with_capacity(p.history + 1),
            sum: 0.0,
            sum_sq: 0.0,
            seen: 0,
        }
    }

    /// Takes the next surprise (≥ 0) and returns the anomaly likelihood in [0, 1].
    pub fn update(&mut self, surprise: f64) -> f64 {
        let surprise = if surprise.is_finite() {
            surprise.max(0.0)
        } else {
            0.0
        };
        self.seen += 1;
        self.recent.push_back(surprise);
        self.recent_sum += surprise;
        if self.recent.len() > self.p.short {
            self.recent_sum -= self.recent.pop_front().unwrap_or(0.0);
        }
        let avg = self.recent_sum / self.recent.len() as f64;
        // Score against the history *before* adding this point.
        let likelihood = if self.seen <= self.p.learning || self.history.len() < 2 {
            0.5
        } else {
            let n = self.history.len() as f64;
            let mean = self.sum / n;
            let var = (self.sum_sq / n - mean * mean).max(0.0);
            let std = var.sqrt().max(self.p.min_std);
            1.0 - normal_tail((avg - mean) / std)
        };
        self.history.push_back(avg);
        self.sum += avg;
        self.sum_sq += avg * avg;
        if self.history.len() > self.p.history {
            let old = self.history.pop_front().unwrap_or(0.0);
            self.sum -= old;
            self.sum_sq -= old * old;
        }
        likelihood
    }
}

/// Log-scales a likelihood into [0, 1]: 0.5 → ~0.03, 0.999 → 0.3, 0.9999999999 → 1.
pub fn log_scale(likelihood: f64) -> f64 {
    ((1.000_000_000_1 - likelihood).ln() / (1.0 - 0.999_999_999_9f64).ln()).clamp(0.0, 1.0)
}

/// Upper-tail probability of the standard normal, P(Z > z).
pub fn normal_tail(z: f64) -> f64 {
    0.5 * erfc(z / std::f64::consts::SQRT_2)
}

/// Complementary error function (Numerical Recipes' Chebyshev fit, relative error < 1.2e-7).
fn erfc(x: f64) -> f64 {
    let z = x.abs();
    let t = 1.0 / (1.0 + 0.5 * z);
    let r = t
        * (-z * z - 1.265_512_23
            + t * (1.000_023_68
                + t * (0.374_091_96
                    + t * (0.096_784_18
                        + t * (-0.186_288_06
                            + t * (0.278_868_07
                                + t * (-1.135_203_98
                                    + t * (1.488_515_87
                                        + t * (-0.822_152_23 + t * 0.170_872_77)))))))))
            .exp();
    if x >= 0.0 { r } else { 2.0 - r }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normal_tail_is_accurate() {
        assert!((normal_tail(0.0) - 0.5).abs() < 1e-7);
        assert!((normal_tail(1.96) - 0.024_998).abs() < 1e-5);
        assert!((normal_tail(-1.0) - 0.841_345).abs() < 1e-5);
        assert!(normal_tail(10.0) < 1e-20);
    }

    #[test]
    fn steady_surprise_is_unremarkable_and_a_burst_is_likely_anomalous() {
        let mut l = Likelihood::new(LikelihoodParams {
            learning: 50,
            ..Default::default()
        });
        let mut seed = 1u64;
        let mut noise = || {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (seed >> 11) as f64 / (1u64 << 53) as f64
        };
        let mut last = 0.0;
        for _ in 0..2000 {
            last = l.update(1.0 + 0.2 * noise());
        }
        assert!(last < 0.99, "ordinary surprise: {last}");
        let burst: Vec<f64> = (0..10).map(|_| l.update(6.0)).collect();
        assert!(burst[5] > 0.9999, "burst: {burst:?}");
        assert!(log_scale(burst[5]) > log_scale(last));
    }

    #[test]
    fn learning_period_and_bad_input_give_neutral_scores() {
        let mut l = Likelihood::new(LikelihoodParams::default());
        assert_eq!(l.update(f64::NAN), 0.5);
        assert_eq!(l.update(f64::INFINITY), 0.5);
        assert_eq!(l.update(-3.0), 0.5);
        assert!((0.0..=1.0).contains(&log_scale(0.5)));
    }
}
