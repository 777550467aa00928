//! A streaming anomaly detector: forecast, scaled error, anomaly likelihood, first alarm.
//!
//! Each value is compared with the one-step forecast an [`AutoForecaster`] made before seeing
//! it. The error divided by the forecast's own spread (its 90% interval half-width in normal
//! units) is the *surprise* `z`, clipped at [`DetectorParams::clip`]: beyond that, a bigger
//! error says nothing more, and one huge outlier must not numb the likelihood for months.
//! Four [`Likelihood`]s judge the series against its own history:
//! * an instant one, the surprise of this row: spikes and broken patterns;
//! * a sustained one, the surprise's mean over the last rows: a series that keeps being a
//!   little wrong, a changed regime;
//!
//!   both with a recurrence floor: a surprise as high as 30 or more of the history's is given
//!   their frequency (a spike the series has every few hours is not one in a billion);
//! * a level one, the mean of the last values themselves, high or low: a slow drift to where
//!   the series has not been, which a forecaster follows step by step without surprise (a
//!   machine cooling over hours, a day of half the usual traffic, spikes coming denser);
//! * a novelty one, with a recurrence floor too: the distance from the last 24 values to the
//!   nearest window of the previous 1,000 rows (as in KNN CAD, a nearest-neighbour novelty):
//!   a shape the series has not drawn lately, though every value is in range and each step
//!   was forecast well enough to pass alone.
//!
//! The score is the most significant of the four, and a refractory period halves scores that
//! do not exceed the recent maximum by a margin, so the first alarm of an event stands out
//! from the rest of it (a score creeping towards saturation is the same event).
//!
//! A value beyond the range the series has had (by more than a share of that range) is an
//! anomaly outright, as in Numenta's HTM detector: its score is 1 whatever the likelihoods
//! and the refractory period say. A forecaster that adapts quickly can make a rise to a new
//! high look ordinary; the range cannot. The range must have held, though: a side counts once
//! no value has broken through it for the likelihoods' learning period. The first value is
//! such a break, so a new series learns its range first, and a series still climbing to new
//! highs (a trend, or one event rising in steps) reports that once, not at every step.
//!
//! Every step costs one forecaster update (O(models × log window)), three ordered inserts
//! into the likelihoods' histories (O(history) moves) and the novelty's distance profile
//! (O(novelty history), updated from the previous row's); nothing looks ahead.

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
    /// After a score, later scores within this many rows are halved unless they exceed it by
    /// [`DetectorParams::margin`]: the first alarm of an event is the one that counts.
    pub refractory: usize,
    /// How much a score within the refractory period must exceed the recent maximum to stand
    /// (0.01 is a tenth of a decade of tail probability).
    pub margin: f64,
    /// A value beyond the lowest or highest seen so far by more than this share of their
    /// distance scores 1, if that side of the range has held for the likelihoods' learning
    /// period (`None`: never).
    pub spatial: Option<f64>,
    /// The likelihoods' history, learning period and recurrence floor (their `short` is set
    /// by the detector; the level likelihood has no recurrence floor).
    pub likelihood: LikelihoodParams,
    /// Values in the window the novelty likelihood compares with earlier ones (0: no novelty
    /// likelihood).
    pub novelty_window: usize,
    /// Rows of earlier windows the novelty likelihood searches for the nearest.
    pub novelty_history: usize,
}

impl Default for DetectorParams {
    fn default() -> Self {
        Self {
            clip: 10.0,
            sustained: 12,
            level: 48,
            refractory: 300,
            margin: 0.01,
            spatial: Some(0.05),
            likelihood: LikelihoodParams {
                recurring: 30,
                ..LikelihoodParams::default()
            },
            novelty_window: 24,
            novelty_history: 1000,
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
    /// Finite values seen, and the range they span.
    seen: usize,
    range: Option<Range>,
    novelty: Option<Novelty>,
}

/// How far the last `window` values are from the nearest window of the series' recent past,
/// judged by a likelihood against the history of that distance: a shape the series has not
/// drawn lately, though every value is in range and each step was forecast well enough.
#[derive(Debug, Clone)]
struct Novelty {
    window: usize,
    history: usize,
    /// The recent values, oldest first; the front is dropped in batches.
    values: Vec<f64>,
    /// `profile[e]`: the squared distance from the current window to the one ending before
    /// `values[e]`, for the earlier windows in reach (the distance profile). Each row updates
    /// it from the previous row's in O(history), as matrix-profile algorithms do; it is
    /// computed afresh when the front is dropped, which bounds the rounding that updates
    /// accumulate.
    profile: Vec<f64>,
    /// Whether `profile` holds the previous row's distances.
    ready: bool,
    /// The last row's distance to the nearest earlier window (0 before there are enough).
    distance: f64,
    likelihood: Likelihood,
}

impl Novelty {
    /// Takes the next value and returns the likelihood's tail for the distance (0.5 while
    /// there are too few earlier windows, which the likelihood learns as distance 0).
    fn update(&mut self, x: f64) -> f64 {
        if !x.is_finite() {
            return 1.0;
        }
        let w = self.window;
        let keep = self.history + 2 * w;
        self.values.push(x);
        self.profile.push(0.0);
        if self.values.len() >= 2 * keep {
            let drop = self.values.len() - keep;
            self.values.drain(..drop);
            self.profile.drain(..drop);
            self.ready = false;
        }
        let v = &self.values;
        let n = v.len();
        if n < 4 * w {
            self.distance = 0.0;
            return self.likelihood.update(0.0);
        }
        // Earlier windows end at least `w` rows before this one, so none overlaps it, and
        // start within the last `keep` values.
        let (lo, hi) = ((n + w).saturating_sub(keep).max(w), n - 2 * w);
        let current = &v[n - w..];
        let direct = |e: usize| -> f64 {
            current
                .iter()
                .zip(&v[e - w..e])
                .map(|(a, b)| (a - b) * (a - b))
                .sum()
        };
        // The previous row's reach began at `lo` or one before it.
        let previous_lo = (n - 1 + w).saturating_sub(keep).max(w);
        let (newest, oldest) = (v[n - 1], v[n - 1 - w]);
        for e in (lo..=hi).rev() {
            self.profile[e] = if self.ready && e > previous_lo {
                // The window ending at `e` against the current one shares w − 1 pairs with
                // the window ending at `e − 1` against the previous current one.
                let (a, b) = (v[e - 1], v[e - 1 - w]);
                self.profile[e - 1] + (newest - a) * (newest - a) - (oldest - b) * (oldest - b)
            } else {
                direct(e)
            };
        }
        self.ready = true;
        let nearest = self.profile[lo..=hi]
            .iter()
            .copied()
            .fold(f64::INFINITY, f64::min);
        self.distance = nearest.max(0.0).sqrt();
        self.likelihood.update(self.distance)
    }
}

/// The lowest and highest finite values seen, and the last row (counted from 1) at which a
/// value broke through each side by more than the spatial tolerance.
#[derive(Debug, Clone, Copy)]
struct Range {
    low: f64,
    high: f64,
    low_broken: usize,
    high_broken: usize,
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
                recurring: 0,
                ..params.likelihood
            })
        });
        let novelty = (params.novelty_window > 0).then(|| Novelty {
            window: params.novelty_window,
            history: params.novelty_history.max(2 * params.novelty_window),
            values: Vec::new(),
            profile: Vec::new(),
            ready: false,
            distance: 0.0,
            likelihood: Likelihood::new(LikelihoodParams {
                short: 1,
                // Distances are in the series' units, which may be tiny.
                min_std: 0.0,
                ..params.likelihood
            }),
        });
        Self {
            params,
            forecaster,
            instant,
            sustained,
            level,
            recent: VecDeque::new(),
            seen: 0,
            range: None,
            novelty,
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
        if let Some(novelty) = &mut self.novelty {
            tail = tail.min(novelty.update(value));
        }
        let score = significance(tail);
        let beyond = self.beyond_range(value);
        let score = if self.params.refractory == 0 {
            score
        } else {
            let before = self.recent.iter().copied().fold(0.0, f64::max);
            self.recent.push_back(score);
            if self.recent.len() > self.params.refractory {
                self.recent.pop_front();
            }
            if score > before + self.params.margin {
                score
            } else {
                score * 0.5
            }
        };
        if beyond { 1.0 } else { score }
    }

    /// Whether `value` breaks through a side of the range that has held for the learning
    /// period, by more than the spatial tolerance; records it.
    fn beyond_range(&mut self, value: f64) -> bool {
        let Some(share) = self.params.spatial else {
            return false;
        };
        if !value.is_finite() {
            return false;
        }
        self.seen += 1;
        let row = self.seen;
        let Some(range) = &mut self.range else {
            // The first value breaks through both sides of an empty range.
            self.range = Some(Range {
                low: value,
                high: value,
                low_broken: row,
                high_broken: row,
            });
            return false;
        };
        let margin = (range.high - range.low) * share;
        let held = |broken: usize| row - broken > self.params.likelihood.learning;
        let mut beyond = false;
        if range.high > range.low && value > range.high + margin {
            beyond = held(range.high_broken);
            range.high_broken = row;
        }
        if range.high > range.low && value < range.low - margin {
            beyond = held(range.low_broken);
            range.low_broken = row;
        }
        range.low = range.low.min(value);
        range.high = range.high.max(value);
        beyond
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

    /// The next uniform draw in [0, 1) of a seeded LCG.
    fn uniform(seed: &mut u64) -> f64 {
        *seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (*seed >> 11) as f64 / (1u64 << 53) as f64
    }

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
            *x += uniform(&mut seed) * 2.0;
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
        // The drift ends below the lowest value seen: judge the likelihood alone.
        let with = DetectorParams {
            spatial: None,
            ..DetectorParams::default()
        };
        let without = DetectorParams {
            level: 0,
            ..with.clone()
        };
        let (before, drift) = (peak(&with, 1000..5000), peak(&with, 5000..6000));
        assert!(drift > 0.9 && drift > before + 0.3, "{drift} vs {before}");
        let blind = peak(&without, 5000..6000);
        assert!(blind < drift - 0.3, "without the level likelihood: {blind}");
    }

    #[test]
    fn a_value_beyond_a_range_that_held_is_reported_even_inside_the_refractory_period() {
        let mut v = sine(4000);
        v[2950] = 40.0; // at the sine's crest (60): a surprise inside the range 40..60
        v[3000] = 90.0; // far beyond the range, which has held since row 300 or so
        v[3050] = 100.0; // beyond 90 by more than 5% of 40..90, but the same excursion
        v[3100] = 95.0; // within the range now
        v[3400] = 110.0; // beyond 100 after the range held for the learning period again
        let s = score_series(&v, &DetectorParams::default());
        let without = score_series(
            &v,
            &DetectorParams {
                spatial: None,
                ..DetectorParams::default()
            },
        );
        assert!(s[2950] > 0.5, "the surprise is an alarm: {}", s[2950]);
        assert!(
            without[3000] < 1.0,
            "damped without the range: {}",
            without[3000]
        );
        assert_eq!(s[3000], 1.0);
        assert_eq!(
            s[3050], without[3050],
            "a second break 50 rows later is not"
        );
        assert!(s[3050] < 1.0);
        assert!(s[3100] <= 0.5, "a repeat is damped: {}", s[3100]);
        assert_eq!(s[3400], 1.0);
        // Not during the learning period, when every new value may widen the range.
        assert!(s[1..300].iter().all(|&x| x < 0.5));
    }

    #[test]
    fn a_score_creeping_up_inside_the_refractory_period_is_damped() {
        // Noise of ±1 on the sine, a spike, and a slightly larger one 20 rows later.
        let mut seed = 3u64;
        let mut v = sine(4000);
        for x in &mut v {
            *x += uniform(&mut seed) * 2.0;
        }
        let spikes = |second: f64| {
            let mut v = v.clone();
            v[3000] += 2.7;
            v[3020] += second;
            let params = DetectorParams {
                spatial: None,
                ..DetectorParams::default()
            };
            let undamped = DetectorParams {
                margin: -1.0,
                ..params.clone()
            };
            (score_series(&v, &params), score_series(&v, &undamped))
        };
        // Just more significant than the first (by less than the margin): the same event.
        let (s, raw) = spikes(3.55);
        assert!(s[3000] > 0.7, "the first spike: {}", s[3000]);
        assert!(
            raw[3020] > raw[3000] && raw[3020] < raw[3000] + 0.01,
            "{} then {}",
            raw[3000],
            raw[3020]
        );
        assert_eq!(s[3020], raw[3020] * 0.5);
        // Clearly more significant: it stands.
        let (s, raw) = spikes(3.8);
        assert!(raw[3020] > raw[3000] + 0.05, "{}", raw[3020]);
        assert_eq!(s[3020], raw[3020]);
    }

    #[test]
    fn a_shape_the_series_has_not_drawn_lately_is_novel_a_repeated_one_is_not() {
        // A 50-row cycle with noise; at row 3000 one cycle runs at twice the speed, inside
        // the same range.
        let mut seed = 5u64;
        let mut v: Vec<f64> = (0..4000)
            .map(|i| {
                let noise = uniform(&mut seed) * 0.4;
                50.0 + 10.0 * (i as f64 * std::f64::consts::TAU / 50.0).sin() + noise
            })
            .collect();
        for (i, x) in v.iter_mut().enumerate().skip(3000).take(50) {
            *x = 50.0 + 10.0 * (i as f64 * std::f64::consts::TAU / 25.0).sin();
        }
        let params = DetectorParams::default();
        let mut novelty = Detector::new(params.clone()).novelty.unwrap();
        let tails: Vec<f64> = v.iter().map(|&x| novelty.update(x)).collect();
        let quiet = tails[1000..3000]
            .iter()
            .cloned()
            .fold(f64::INFINITY, f64::min);
        let changed = tails[3000..3060]
            .iter()
            .cloned()
            .fold(f64::INFINITY, f64::min);
        assert!(quiet > 1e-4, "a repeated cycle: {quiet}");
        assert!(changed < 1e-8, "the faster cycle: {changed}");
        // Without a window there is no novelty likelihood.
        let without = DetectorParams {
            novelty_window: 0,
            ..params
        };
        assert!(Detector::new(without).novelty.is_none());
    }

    #[test]
    fn the_updated_distance_profile_finds_the_nearest_window_as_a_full_search_does() {
        // A short reach, so that the front is dropped (and the profile recomputed) often.
        let (w, history) = (5, 40);
        let params = DetectorParams {
            novelty_window: w,
            novelty_history: history,
            ..DetectorParams::default()
        };
        let mut novelty = Detector::new(params).novelty.unwrap();
        let mut seed = 9u64;
        let v: Vec<f64> = (0..600)
            .map(|i| 1e4 + (i % 17) as f64 + uniform(&mut seed))
            .collect();
        for n in 1..=v.len() {
            novelty.update(v[n - 1]);
            let expected = if n < 4 * w {
                0.0
            } else {
                let current = &v[n - w..n];
                let first = (n + w).saturating_sub(history + 2 * w).max(w);
                (first..=n - 2 * w)
                    .map(|e| {
                        current
                            .iter()
                            .zip(&v[e - w..e])
                            .map(|(a, b)| (a - b) * (a - b))
                            .sum::<f64>()
                    })
                    .fold(f64::INFINITY, f64::min)
                    .sqrt()
            };
            assert!(
                (novelty.distance - expected).abs() < 1e-6,
                "row {n}: {} against {expected}",
                novelty.distance
            );
        }
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
