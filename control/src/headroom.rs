//! Headroom priced per component: where a unit of allocation prevents the most violations.
//!
//! Without it, every component's request is its forecast's peak over θ times a headroom that
//! a feedback controller grows after violations and, with a violation share, shrinks until
//! violations take that share of rounds: every component ends at the same violation rate,
//! whatever its size. That spends the pool badly. Headroom on a component that uses 50 MHz
//! costs almost nothing, and the same relative headroom on one that uses 20 GHz costs a
//! host. With a *price* the headroom of each component and resource is instead the multiplier
//! that minimises, over its last `window` rounds,
//!
//! > share of rounds whose usage passed θ × (base × k) + price × mean unused (base × k − usage)⁺
//! > / the fleet's mean usage of that resource,
//!
//! where the base is what each round's request was sized from (the forecast's peak over θ).
//! Each component then buys headroom until one more unit of it, priced against the fleet's
//! usage, would prevent fewer violations than it costs: the headroom goes where it prevents
//! most. The price is the operator's one knob: a higher price holds less headroom and
//! accepts more violations. A component's choice is judged on what its own past requests and
//! usage would have done (the allocation in force also has the engine's bands and releases,
//! which only hold more), so it is causal, and it adapts as the forecasts get better or
//! worse.

use std::collections::VecDeque;

use forestall_actuators::alloc::{PerResource, Resource};

/// The multipliers a priced headroom chooses from: geometric, from a quarter of the base to
/// six times it (about 7 % apart, so a choice moves in visible steps, not in noise).
const CHOICES: usize = 48;
const LOWEST: f64 = 0.25;
const HIGHEST: f64 = 6.0;

/// The candidate headrooms, lowest first.
fn choices() -> impl Iterator<Item = f64> {
    let step = (HIGHEST / LOWEST).ln() / (CHOICES - 1) as f64;
    (0..CHOICES).map(move |i| LOWEST * (step * i as f64).exp())
}

/// The headroom that minimises violations plus `price` × unused allocation over the fleet's
/// usage `fleet`, judged on `pairs` of (base, usage): the request's size before headroom, and
/// the usage of the round it was for. `None` without a pair with a positive base or without
/// fleet usage.
pub fn priced(
    pairs: impl IntoIterator<Item = (f64, f64)>,
    theta: f64,
    price: f64,
    fleet: f64,
) -> Option<f64> {
    // Usage over base, with prefix sums of base and usage in that order: the unused
    // allocation at k is k × Σ base − Σ usage over the rounds whose ratio is below k.
    let mut rows: Vec<(f64, f64, f64)> = pairs
        .into_iter()
        .filter(|(b, u)| b.is_finite() && *b > 0.0 && u.is_finite())
        .map(|(b, u)| (u.max(0.0) / b, b, u.max(0.0)))
        .collect();
    if rows.is_empty() || !(fleet.is_finite() && fleet > 0.0) {
        return None;
    }
    rows.sort_by(|x, y| x.0.total_cmp(&y.0));
    let n = rows.len() as f64;
    let mut base = Vec::with_capacity(rows.len() + 1);
    let mut used = Vec::with_capacity(rows.len() + 1);
    let (mut sb, mut su) = (0.0, 0.0);
    base.push(0.0);
    used.push(0.0);
    for &(_, b, u) in &rows {
        sb += b;
        su += u;
        base.push(sb);
        used.push(su);
    }
    let mut best = (f64::INFINITY, None);
    for k in choices() {
        let below = rows.partition_point(|r| r.0 < k);
        let unused = (k * base[below] - used[below]).max(0.0) / n;
        let within = rows.partition_point(|r| r.0 <= theta * k);
        let violations = (rows.len() - within) as f64 / n;
        let cost = violations + price * unused / fleet;
        if cost < best.0 {
            best = (cost, Some(k));
        }
    }
    best.1
}

/// The priced headroom's memory, for a fixed set of components: each component's requests
/// and usage over the window, and the fleet's usage per resource.
#[derive(Debug, Clone)]
pub struct PricedHeadroom {
    price: f64,
    window: usize,
    /// Per component and resource: (base, usage) of the last `window` rounds.
    pairs: Vec<PerResource<VecDeque<(f64, f64)>>>,
    /// Per resource: the fleet's total usage of each of the last `window` rounds, and its
    /// mean.
    fleet: PerResource<VecDeque<f64>>,
    fleet_mean: PerResource<f64>,
    /// The base each request of the current round was sized from, waiting for its usage.
    asked: Vec<PerResource<Option<f64>>>,
}

impl PricedHeadroom {
    /// For `components` components, judging the last `window` rounds at `price` (finite and
    /// positive).
    pub fn new(components: usize, price: f64, window: usize) -> anyhow::Result<Self> {
        anyhow::ensure!(
            price.is_finite() && price > 0.0,
            "a headroom price must be a positive number, not {price}"
        );
        anyhow::ensure!(
            window >= 1,
            "a headroom window must hold at least one round"
        );
        Ok(Self {
            price,
            window,
            pairs: vec![Default::default(); components],
            fleet: Default::default(),
            fleet_mean: [0.0; 4],
            asked: vec![[None; 4]; components],
        })
    }

    /// This round's request for component `c`'s `r` was sized from `base` (before headroom).
    pub fn asked(&mut self, c: usize, r: Resource, base: f64) {
        if let Some(a) = self.asked.get_mut(c) {
            a[r.index()] = Some(base);
        }
    }

    /// The usage of the round the last requests were for (NaN where unknown): pairs it with
    /// them and adds it to the fleet's.
    pub fn observe(&mut self, usage: &[PerResource<f64>]) {
        let mut totals = [0.0; 4];
        for (c, u) in usage.iter().enumerate().take(self.pairs.len()) {
            for r in 0..4 {
                if !u[r].is_finite() {
                    continue;
                }
                totals[r] += u[r].max(0.0);
                if let Some(base) = self.asked[c][r].take() {
                    let pairs = &mut self.pairs[c][r];
                    pairs.push_back((base, u[r]));
                    if pairs.len() > self.window {
                        pairs.pop_front();
                    }
                }
            }
        }
        for (r, total) in totals.into_iter().enumerate() {
            self.fleet[r].push_back(total);
            if self.fleet[r].len() > self.window {
                self.fleet[r].pop_front();
            }
            self.fleet_mean[r] = self.fleet[r].iter().sum::<f64>() / self.fleet[r].len() as f64;
        }
    }

    /// Component `c`'s headroom for `r` at utilisation threshold `theta`, once a quarter of
    /// the window has been seen (before that, `None`: the caller keeps what it had).
    pub fn headroom(&self, c: usize, r: Resource, theta: f64) -> Option<f64> {
        let pairs = &self.pairs.get(c)?[r.index()];
        if pairs.len() < self.window.div_ceil(4) {
            return None;
        }
        let fleet = self.fleet_mean[r.index()];
        priced(pairs.iter().copied(), theta, self.price, fleet)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Usage around a steady base with a few high rounds: the same relative noise for a
    /// small and a large component.
    fn noisy(base: f64, rounds: usize) -> Vec<(f64, f64)> {
        (0..rounds)
            .map(|i| {
                let wobble = [0.5, 0.6, 0.7, 0.55, 0.65, 0.75, 0.6, 1.2][i % 8];
                (base, base * wobble)
            })
            .collect()
    }

    #[test]
    fn a_small_component_gets_more_headroom_than_a_large_one_with_the_same_noise() {
        let (small, large) = (noisy(10.0, 200), noisy(1000.0, 200));
        let fleet = 1010.0 * 0.7;
        let k_small = priced(small.iter().copied(), 0.9, 0.5, fleet).unwrap();
        let k_large = priced(large.iter().copied(), 0.9, 0.5, fleet).unwrap();
        // The small one covers its high rounds (1.2 × base over θ needs k ≥ 1.33); for the
        // large one, covering them costs more than one round in eight of violations is worth.
        assert!(k_small >= 1.2 / 0.9, "small {k_small}");
        assert!(k_large < 1.2 / 0.9, "large {k_large}");
        assert!(
            k_large >= 0.75 / 0.9,
            "large {k_large} still covers the rest"
        );
    }

    #[test]
    fn a_higher_price_holds_less_headroom() {
        let pairs = noisy(100.0, 400);
        let ks: Vec<f64> = [0.01, 0.3, 3.0, 100.0]
            .iter()
            .map(|&p| priced(pairs.iter().copied(), 0.9, p, 100.0).unwrap())
            .collect();
        assert!(ks.windows(2).all(|w| w[0] >= w[1]), "{ks:?}");
        assert!(ks[0] > ks[3], "{ks:?}");
        assert!(
            ks[0] >= 1.2 / 0.9,
            "a cheap headroom covers every round: {ks:?}"
        );
    }

    #[test]
    fn no_usage_to_judge_chooses_nothing() {
        assert_eq!(priced([], 0.9, 1.0, 10.0), None);
        assert_eq!(priced([(0.0, 3.0), (f64::NAN, 1.0)], 0.9, 1.0, 10.0), None);
        assert_eq!(priced([(1.0, 0.5)], 0.9, 1.0, 0.0), None);
    }

    #[test]
    fn requests_pair_with_the_usage_of_their_round_and_the_window_slides() {
        let mut h = PricedHeadroom::new(2, 1.0, 8).unwrap();
        assert!(PricedHeadroom::new(1, 0.0, 8).is_err());
        assert!(PricedHeadroom::new(1, f64::NAN, 8).is_err());
        assert!(PricedHeadroom::new(1, 1.0, 0).is_err());
        // Usage without a request is the fleet's, not a pair.
        h.observe(&[[5.0, f64::NAN, 0.0, 0.0], [5.0; 4]]);
        assert_eq!(h.headroom(0, Resource::Cpu, 0.9), None);
        for round in 0..20 {
            h.asked(0, Resource::Cpu, 10.0);
            let u = if round < 12 { 20.0 } else { 5.0 };
            h.observe(&[[u, f64::NAN, 0.0, 0.0], [5.0; 4]]);
        }
        assert_eq!(h.pairs[0][0].len(), 8, "the window holds 8 rounds");
        assert!(h.pairs[1][0].is_empty(), "component 1 asked nothing");
        // The last 8 rounds used half the base: the headroom no longer covers twice it.
        let k = h.headroom(0, Resource::Cpu, 0.9).unwrap();
        assert!((0.5 / 0.9..2.0 / 0.9).contains(&k), "{k}");
    }
}
