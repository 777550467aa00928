//! The prevention benchmark's parts that need no machine: the workload (when requests
//! arrive), the work one request costs, and the per-second latency figures the generator
//! writes to Forestall. The `prevent` harness (service in its own cgroup, open-loop driver,
//! policies, report) is built on these.
//!
//! **The workload** is open loop: every request has a scheduled arrival time fixed before the
//! run, from a seed, so each policy gets the same requests and a slow service shows up as
//! latency (measured from the scheduled arrival), not as fewer requests. Time is compressed:
//! one "day" lasts [`Workload::day`]. The arrival rate is the sum of
//! * a **daily ramp** from `base_rps` at the day's start to `peak_rps` at its middle and back;
//! * a **recurring surge**, `surge_rps` more for `surge_width`, starting at the same phase of
//!   every day (`surge_phase`), moved by up to `jitter` either way (a batch job at the top of
//!   the hour, a daily peak);
//! * a few **unannounced spikes**, `spike_rps` more for `spike_width`, at seeded times away
//!   from the surges.
//!
//! Arrivals are a non-homogeneous Poisson process drawn by thinning.

use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// The shape of the load; see the module docs.
#[derive(Debug, Clone, PartialEq)]
pub struct Workload {
    pub seed: u64,
    /// How long one compressed day lasts.
    pub day: Duration,
    pub days: u32,
    pub base_rps: f64,
    pub peak_rps: f64,
    /// Where in the day the recurring surge starts, in [0, 1).
    pub surge_phase: f64,
    pub surge_width: Duration,
    pub surge_rps: f64,
    /// How far a day's surge may start from its phase, either way.
    pub jitter: Duration,
    /// Unannounced spikes over the whole run.
    pub spikes: u32,
    pub spike_width: Duration,
    pub spike_rps: f64,
}

impl Default for Workload {
    /// Six days of ten minutes; a 30 s surge at 70 % of each day.
    fn default() -> Self {
        Self {
            seed: 1,
            day: Duration::from_secs(600),
            days: 6,
            base_rps: 20.0,
            peak_rps: 60.0,
            surge_phase: 0.7,
            surge_width: Duration::from_secs(30),
            surge_rps: 80.0,
            jitter: Duration::from_secs(10),
            spikes: 3,
            spike_width: Duration::from_secs(10),
            spike_rps: 80.0,
        }
    }
}

/// Why a request arrived: which part of the rate it came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cause {
    Base,
    Surge,
    Spike,
}

/// When the load rises: the start of each day's surge, and of each spike.
#[derive(Debug, Clone, PartialEq)]
pub struct Onsets {
    pub surges: Vec<Duration>,
    pub spikes: Vec<Duration>,
}

/// The run's schedule: arrival times from the start, in order, with their cause.
#[derive(Debug, Clone, PartialEq)]
pub struct Schedule {
    pub arrivals: Vec<(Duration, Cause)>,
    pub onsets: Onsets,
}

impl Workload {
    /// The whole run's length.
    pub fn length(&self) -> Duration {
        self.day * self.days
    }

    /// Checks the shape makes sense: positive rates and widths, surges that fit their day.
    pub fn validate(&self) -> Result<(), String> {
        let rates = [self.base_rps, self.peak_rps, self.surge_rps, self.spike_rps];
        if rates.iter().any(|r| !r.is_finite() || *r < 0.0) || self.peak_rps < self.base_rps {
            return Err("rates are finite, not negative, and peak_rps ≥ base_rps".into());
        }
        if self.day.is_zero() || self.days == 0 {
            return Err("a run has at least one day of some length".into());
        }
        if !(0.0..1.0).contains(&self.surge_phase) {
            return Err("surge_phase is in [0, 1)".into());
        }
        let start = self.day.mul_f64(self.surge_phase);
        if start < self.jitter || start + self.jitter + self.surge_width > self.day {
            return Err("a day's surge, jitter included, fits inside the day".into());
        }
        Ok(())
    }

    /// The surge and spike onsets of this seed (the same for every policy).
    pub fn onsets(&self) -> Onsets {
        let mut rng = StdRng::seed_from_u64(self.seed);
        let surges = (0..self.days)
            .map(|d| {
                let shift = rng.random_range(-1.0..=1.0) * self.jitter.as_secs_f64();
                let at = self.day.as_secs_f64() * (d as f64 + self.surge_phase) + shift;
                Duration::from_secs_f64(at.max(0.0))
            })
            .collect::<Vec<_>>();
        // Spikes land anywhere a surge (with a spike's width of margin) is not.
        let margin = self.spike_width + self.surge_width;
        let clear = |t: Duration| {
            surges
                .iter()
                .all(|&s| t + self.spike_width + margin < s || t > s + margin)
        };
        let room = self.length().saturating_sub(self.spike_width);
        let mut spikes = Vec::new();
        let mut tries = 0;
        while spikes.len() < self.spikes as usize && tries < 10_000 {
            tries += 1;
            let t = room.mul_f64(rng.random::<f64>());
            if clear(t) && spikes.iter().all(|&s: &Duration| t.abs_diff(s) > margin) {
                spikes.push(t);
            }
        }
        spikes.sort();
        Onsets { surges, spikes }
    }

    /// The arrival rate at `t` (requests/s), and its parts.
    pub fn rate(&self, onsets: &Onsets, t: Duration) -> (f64, [f64; 3]) {
        let phase = (t.as_secs_f64() / self.day.as_secs_f64()).fract();
        let ramp = 0.5 - 0.5 * (2.0 * std::f64::consts::PI * phase).cos();
        let base = self.base_rps + (self.peak_rps - self.base_rps) * ramp;
        let within =
            |starts: &[Duration], width: Duration| starts.iter().any(|&s| t >= s && t < s + width);
        let surge = if within(&onsets.surges, self.surge_width) {
            self.surge_rps
        } else {
            0.0
        };
        let spike = if within(&onsets.spikes, self.spike_width) {
            self.spike_rps
        } else {
            0.0
        };
        (base + surge + spike, [base, surge, spike])
    }

    /// The schedule: arrivals drawn by thinning at the highest rate, each kept with
    /// probability rate(t) / max and labelled by the part it was drawn from.
    pub fn schedule(&self) -> Schedule {
        let onsets = self.onsets();
        let max = self.peak_rps + self.surge_rps + self.spike_rps;
        let mut rng = StdRng::seed_from_u64(self.seed ^ 0x9e37_79b9_7f4a_7c15);
        let end = self.length().as_secs_f64();
        let mut arrivals = Vec::new();
        let mut t = 0.0;
        if max > 0.0 {
            loop {
                // Exponential gaps at the highest rate.
                t += -(1.0 - rng.random::<f64>()).ln() / max;
                if t >= end {
                    break;
                }
                let at = Duration::from_secs_f64(t);
                let (rate, [base, surge, _]) = self.rate(&onsets, at);
                let u = rng.random::<f64>() * max;
                if u >= rate {
                    continue;
                }
                let cause = if u < base {
                    Cause::Base
                } else if u < base + surge {
                    Cause::Surge
                } else {
                    Cause::Spike
                };
                arrivals.push((at, cause));
            }
        }
        Schedule { arrivals, onsets }
    }
}

/// The work of one request: `rounds` passes of a multiply-xorshift hash over a stride of
/// `working_set` (so that the request costs CPU time and touches memory), seeded by the
/// request. Returns the hash, which the caller must use so the work is not optimised away.
pub fn work(working_set: &mut [u64], rounds: u32, seed: u64) -> u64 {
    if working_set.is_empty() {
        return seed;
    }
    let n = working_set.len();
    let mut h = seed ^ 0x2545_f491_4f6c_dd1d;
    for _ in 0..rounds {
        h ^= h >> 33;
        h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
        h ^= h >> 33;
        let i = (h as usize) % n;
        working_set[i] = working_set[i].wrapping_add(h);
        h ^= working_set[(i + n / 2) % n];
    }
    h
}

/// p50, p95 and p99 of `samples` (nearest rank; sorts them). `None` when empty.
pub fn percentiles(samples: &mut [f64]) -> Option<[f64; 3]> {
    if samples.is_empty() {
        return None;
    }
    samples.sort_by(f64::total_cmp);
    let at = |q: f64| {
        let rank = (q * samples.len() as f64).ceil() as usize;
        samples[rank.clamp(1, samples.len()) - 1]
    };
    Some([at(0.50), at(0.95), at(0.99)])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn count(s: &Schedule, from: Duration, to: Duration) -> usize {
        s.arrivals
            .iter()
            .filter(|(t, _)| *t >= from && *t < to)
            .count()
    }

    #[test]
    fn the_schedule_is_fixed_by_its_seed() {
        let w = Workload::default();
        assert_eq!(w.schedule(), w.schedule());
        let other = Workload {
            seed: 2,
            ..w.clone()
        };
        assert_ne!(other.schedule().arrivals, w.schedule().arrivals);
    }

    #[test]
    fn surges_recur_at_their_phase_and_spikes_stay_clear_of_them() {
        let w = Workload::default();
        w.validate().unwrap();
        let s = w.schedule();
        assert_eq!(s.onsets.surges.len(), w.days as usize);
        for (d, &onset) in s.onsets.surges.iter().enumerate() {
            let phase = w.day.mul_f64(d as f64 + w.surge_phase);
            assert!(onset.abs_diff(phase) <= w.jitter, "day {d}: {onset:?}");
            // The surge shows in the arrivals: far more in its window than in the window of
            // the same width just before it.
            let during = count(&s, onset, onset + w.surge_width);
            let before = count(&s, onset - w.surge_width, onset);
            assert!(during as f64 > 1.8 * before as f64, "{during} vs {before}");
        }
        assert_eq!(s.onsets.spikes.len(), w.spikes as usize);
        for &spike in &s.onsets.spikes {
            for &surge in &s.onsets.surges {
                assert!(
                    spike + w.spike_width <= surge || spike >= surge + w.surge_width,
                    "spike {spike:?} overlaps the surge at {surge:?}"
                );
            }
            let during = count(&s, spike, spike + w.spike_width);
            let expected = w.spike_rps * w.spike_width.as_secs_f64();
            assert!(during as f64 > 0.8 * expected, "{during} vs {expected}");
        }
        let spiked = s
            .arrivals
            .iter()
            .filter(|(_, c)| *c == Cause::Spike)
            .count();
        assert!(spiked > 0);
    }

    #[test]
    fn the_mean_rate_follows_the_shape() {
        let w = Workload {
            spikes: 0,
            ..Workload::default()
        };
        let s = w.schedule();
        // The ramp averages to the middle of base and peak; the surges add their share.
        let expected = w.length().as_secs_f64() * (w.base_rps + w.peak_rps) / 2.0
            + w.days as f64 * w.surge_rps * w.surge_width.as_secs_f64();
        let got = s.arrivals.len() as f64;
        assert!((got / expected - 1.0).abs() < 0.03, "{got} vs {expected}");
        // The day's trough (its start) is quieter than its middle.
        let minute = Duration::from_secs(60);
        let trough = count(&s, Duration::ZERO, minute);
        let middle = count(&s, w.day / 2 - minute / 2, w.day / 2 + minute / 2);
        assert!(middle as f64 > 2.0 * trough as f64, "{middle} vs {trough}");
        assert!(s.arrivals.windows(2).all(|p| p[0].0 <= p[1].0));
    }

    #[test]
    fn shapes_that_make_no_sense_are_refused() {
        let ok = Workload::default();
        for (bad, why) in [
            (
                Workload {
                    peak_rps: 1.0,
                    ..ok.clone()
                },
                "peak",
            ),
            (
                Workload {
                    base_rps: f64::NAN,
                    ..ok.clone()
                },
                "finite",
            ),
            (
                Workload {
                    surge_phase: 1.0,
                    ..ok.clone()
                },
                "surge_phase",
            ),
            (
                Workload {
                    surge_phase: 0.0,
                    ..ok.clone()
                },
                "fits",
            ),
            (
                Workload {
                    days: 0,
                    ..ok.clone()
                },
                "one day",
            ),
        ] {
            let e = bad.validate().unwrap_err();
            assert!(e.contains(why), "{e}");
        }
    }

    #[test]
    fn a_request_costs_its_rounds_and_touches_the_working_set() {
        let mut ws = vec![0u64; 1 << 12];
        let a = work(&mut ws, 1000, 7);
        assert_ne!(a, work(&mut vec![0u64; 1 << 12], 1000, 8));
        assert!(ws.iter().filter(|&&v| v != 0).count() > 500);
        // The same request on the same state gives the same hash.
        let mut again = vec![0u64; 1 << 12];
        assert_eq!(work(&mut again, 1000, 7), a);
    }

    #[test]
    fn percentiles_are_nearest_rank() {
        let mut v: Vec<f64> = (1..=100).rev().map(f64::from).collect();
        assert_eq!(percentiles(&mut v), Some([50.0, 95.0, 99.0]));
        assert_eq!(percentiles(&mut [3.0]), Some([3.0, 3.0, 3.0]));
        assert_eq!(percentiles(&mut []), None);
    }
}
