//! Anomaly likelihood: how unusual a recent signal is against its own long-run history.
//!
//! A forecaster's error, scaled by its expected spread, is a *surprise*. Surprise alone is a
//! poor alarm: noisy series are always surprising, and one outlier in a quiet series is not
//! a regime change. The likelihood compares the short-term mean of a signal with the
//! distribution of that mean over a long history (a normal fit to a trailing window) and
//! reports the tail probability: the upper tail for a surprise, both tails for a level. The
//! final score is the tail's significance in decades ([`significance`]), so that 1e-3 and
//! 1e-9 are far apart: thresholds then carry across series.
//!
//! Surprises are heavy-tailed: a series whose forecaster misses a recurring spike every few
//! hours has a history full of surprises that the normal fit calls one in a billion. With
//! [`LikelihoodParams::recurring`], a signal at least as high as `recurring` or more of the
//! history's values gets their frequency as its tail if that is larger: what keeps happening
//! is part of the series.
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
    /// Lower bound on the fitted standard deviation, in the signal's units (a relative
    /// floor of 1e-9 × (1 + |mean|) always applies).
    pub min_std: f64,
    /// Which tail is unusual.
    pub side: Side,
    /// With [`Side::Upper`]: when at least this many values of the history are as high as the
    /// short-term mean, their share of the history is a floor under its tail (0: never).
    pub recurring: usize,
}

/// Which tail of the fitted distribution [`Likelihood`] reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// High values only; the signal is clamped at 0 (a surprise is never negative).
    Upper,
    /// Both: a level is unusual when high or low.
    Both,
}

impl Default for LikelihoodParams {
    fn default() -> Self {
        Self {
            learning: 300,
            short: 10,
            history: 8640,
            min_std: 0.05,
            side: Side::Upper,
            recurring: 0,
        }
    }
}

/// Streaming anomaly likelihood over one signal.
#[derive(Debug, Clone)]
pub struct Likelihood {
    p: LikelihoodParams,
    recent: VecDeque<f64>,
    recent_sum: f64,
    history: VecDeque<f64>,
    /// The history in ascending order, when `recurring` needs ranks.
    sorted: Vec<f64>,
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
            sorted: Vec::new(),
            sum: 0.0,
            sum_sq: 0.0,
            seen: 0,
        }
    }

    /// Takes the next value of the signal and returns the probability, under the normal fit
    /// to its history, of a short-term mean at least this far out: 0.5 while learning, 1 for
    /// a non-finite value (which is not recorded).
    pub fn update(&mut self, x: f64) -> f64 {
        if !x.is_finite() {
            return 1.0;
        }
        let x = match self.p.side {
            Side::Upper => x.max(0.0),
            Side::Both => x,
        };
        self.seen += 1;
        self.recent.push_back(x);
        self.recent_sum += x;
        if self.recent.len() > self.p.short {
            self.recent_sum -= self.recent.pop_front().unwrap_or(0.0);
        }
        let avg = self.recent_sum / self.recent.len() as f64;
        // Score against the history *before* adding this point.
        let tail = if self.seen <= self.p.learning || self.history.len() < 2 {
            0.5
        } else {
            let n = self.history.len() as f64;
            let mean = self.sum / n;
            let var = (self.sum_sq / n - mean * mean).max(0.0);
            let std = var
                .sqrt()
                .max(self.p.min_std)
                .max(1e-9 * (1.0 + mean.abs()));
            let z = (avg - mean) / std;
            match self.p.side {
                Side::Upper => normal_tail(z).max(self.recurrence(avg)),
                Side::Both => 2.0 * normal_tail(z.abs()),
            }
        };
        self.history.push_back(avg);
        self.sum += avg;
        self.sum_sq += avg * avg;
        if self.ranks() {
            let at = self.sorted.partition_point(|&h| h < avg);
            self.sorted.insert(at, avg);
        }
        if self.history.len() > self.p.history {
            let old = self.history.pop_front().unwrap_or(0.0);
            self.sum -= old;
            self.sum_sq -= old * old;
            if self.ranks() {
                let at = self.sorted.partition_point(|&h| h < old);
                self.sorted.remove(at);
            }
        }
        tail
    }

    fn ranks(&self) -> bool {
        self.p.recurring > 0 && self.p.side == Side::Upper
    }

    /// The share of the history at least `avg` (less a rounding margin, since running sums
    /// drift), when that is at least `recurring` values; 0 otherwise.
    fn recurrence(&self, avg: f64) -> f64 {
        if !self.ranks() {
            return 0.0;
        }
        let floor = avg - 1e-9 * (1.0 + avg.abs());
        let count = self.sorted.len() - self.sorted.partition_point(|&h| h < floor);
        if count >= self.p.recurring {
            count as f64 / self.sorted.len() as f64
        } else {
            0.0
        }
    }
}

/// Decades of significance at which [`significance`] reaches 1.
pub const FULL_SIGNIFICANCE: f64 = 10.0;

/// A tail probability as a score in [0, 1]: its decades of significance over
/// [`FULL_SIGNIFICANCE`] (0.5 → 0.03, 1e-3 → 0.3, 1e-10 and beyond → 1).
pub fn significance(tail: f64) -> f64 {
    if tail.is_nan() {
        return 0.0;
    }
    (-tail.log10() / FULL_SIGNIFICANCE).clamp(0.0, 1.0)
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

    fn noise(seed: &mut u64) -> f64 {
        *seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (*seed >> 11) as f64 / (1u64 << 53) as f64
    }

    #[test]
    fn steady_surprise_is_unremarkable_and_a_burst_is_likely_anomalous() {
        let mut l = Likelihood::new(LikelihoodParams {
            learning: 50,
            ..Default::default()
        });
        let mut seed = 1u64;
        let mut last = 0.0;
        for _ in 0..2000 {
            last = l.update(1.0 + 0.2 * noise(&mut seed));
        }
        assert!(last > 0.01, "ordinary surprise: {last}");
        let burst: Vec<f64> = (0..10).map(|_| l.update(6.0)).collect();
        assert!(burst[5] < 1e-4, "burst: {burst:?}");
        assert!(significance(burst[5]) > significance(last));
    }

    #[test]
    fn a_level_is_unusual_on_both_sides_a_surprise_only_when_high() {
        let params = LikelihoodParams {
            learning: 50,
            short: 5,
            min_std: 0.0,
            ..Default::default()
        };
        let mut level = Likelihood::new(LikelihoodParams {
            side: Side::Both,
            ..params
        });
        let mut surprise = Likelihood::new(params);
        let mut seed = 7u64;
        for _ in 0..2000 {
            let x = 50.0 + noise(&mut seed);
            level.update(x);
            surprise.update(x - 50.0);
        }
        let (mut low, mut high) = (level.clone(), level.clone());
        let drop: Vec<f64> = (0..5).map(|_| low.update(40.0)).collect();
        let rise: Vec<f64> = (0..5).map(|_| high.update(60.0)).collect();
        assert!(drop[4] < 1e-6 && rise[4] < 1e-6, "{drop:?} {rise:?}");
        assert!((significance(drop[4]) - significance(rise[4])).abs() < 1e-9);
        // A negative surprise counts as none: no smaller than an ordinary one.
        let quiet: Vec<f64> = (0..5).map(|_| surprise.update(-10.0)).collect();
        assert!(quiet[4] > 0.5, "{quiet:?}");
    }

    #[test]
    fn a_surprise_that_keeps_recurring_is_as_likely_as_its_frequency() {
        // Quiet surprises with a spike of 10 every 50 rows: the normal fit calls a spike one
        // in a million; it is 2% of the history (20 of its 1,000 values).
        let fed = |recurring: usize| {
            let mut l = Likelihood::new(LikelihoodParams {
                learning: 50,
                short: 1,
                history: 1000,
                recurring,
                ..Default::default()
            });
            let mut seed = 5u64;
            for i in 0..2000 {
                l.update(if i % 50 == 49 { 10.0 } else { noise(&mut seed) });
            }
            l
        };
        let normal = fed(0).update(10.0);
        assert!(normal < 1e-6, "normal fit: {normal}");
        let mut recurring = fed(10);
        // Higher than anything in the history: the normal fit decides, as without.
        assert_eq!(recurring.clone().update(12.0), fed(0).update(12.0));
        let frequency = recurring.update(10.0);
        assert!((frequency - 20.0 / 1000.0).abs() < 1e-12, "{frequency}");
        // Rarer in the history than `recurring` asks (20 < 30): the normal fit decides.
        assert_eq!(fed(30).update(10.0), normal);
    }

    #[test]
    fn learning_period_and_bad_input_give_neutral_scores() {
        let mut l = Likelihood::new(LikelihoodParams::default());
        assert_eq!(l.update(f64::NAN), 1.0);
        assert_eq!(l.update(f64::INFINITY), 1.0);
        assert_eq!(l.update(-3.0), 0.5);
        assert_eq!(significance(1.0), 0.0);
        assert_eq!(significance(f64::NAN), 0.0);
        assert_eq!(significance(0.0), 1.0);
        assert!((significance(0.5) - 0.0301).abs() < 1e-3);
    }
}
