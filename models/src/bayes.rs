//! Discrete Bayesian networks: Dirichlet-count tables updated online, exact inference by
//! variable elimination, structure learning by BIC hill climbing, and explanations.
//!
//! The networks Forestall builds are small (a component's metric states, its health and one
//! "bottleneck within the horizon" node per resource: tens of nodes with two to three states),
//! so exact inference is cheap and always preferred to sampling.

use std::collections::HashMap;

use crate::{Error, Result};

/// A discrete variable.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Variable {
    pub name: String,
    pub states: Vec<String>,
}

impl Variable {
    pub fn new(name: impl Into<String>, states: &[&str]) -> Self {
        Self {
            name: name.into(),
            states: states.iter().map(|s| (*s).to_owned()).collect(),
        }
    }

    pub fn card(&self) -> usize {
        self.states.len()
    }
}

/// A Bayesian network over discrete variables. Each node's conditional table is a set of
/// Dirichlet counts, one row per configuration of its parents; probabilities are the
/// posterior means `(count + prior) / (row total + prior × states)`.
#[derive(Debug, Clone, PartialEq)]
pub struct Network {
    vars: Vec<Variable>,
    /// Parents of each node, ascending.
    parents: Vec<Vec<usize>>,
    /// `counts[v][config × card(v) + state]`, `config` in mixed radix over `parents[v]`
    /// (the last parent varying fastest).
    counts: Vec<Vec<f64>>,
    prior: f64,
}

/// One piece of evidence's effect on a query, from [`Network::explain`].
#[derive(Debug, Clone, PartialEq)]
pub struct Reason {
    /// The observed node.
    pub var: usize,
    /// Its observed state.
    pub state: usize,
    /// How far this node moved the target's probability when it was added (see
    /// [`Network::explain`]).
    pub delta: f64,
}

fn invalid(reason: impl Into<String>) -> Error {
    Error::Network {
        reason: reason.into(),
    }
}

impl Network {
    /// A network with the given structure and empty tables (every row uniform).
    /// `prior` is the Dirichlet pseudo-count per table cell (> 0).
    pub fn new(vars: Vec<Variable>, parents: Vec<Vec<usize>>, prior: f64) -> Result<Self> {
        if parents.len() != vars.len() {
            return Err(invalid(format!(
                "{} parent lists for {} variables",
                parents.len(),
                vars.len()
            )));
        }
        if !(prior > 0.0 && prior.is_finite()) {
            return Err(invalid("the Dirichlet prior must be positive"));
        }
        let mut seen = HashMap::new();
        for (i, v) in vars.iter().enumerate() {
            if v.card() < 2 {
                return Err(invalid(format!(
                    "variable {} has fewer than 2 states",
                    v.name
                )));
            }
            if seen.insert(v.name.as_str(), i).is_some() {
                return Err(invalid(format!("variable {} is declared twice", v.name)));
            }
        }
        let mut sorted = parents;
        for (v, ps) in sorted.iter_mut().enumerate() {
            ps.sort_unstable();
            ps.dedup();
            if let Some(&p) = ps.iter().find(|&&p| p >= vars.len() || p == v) {
                return Err(invalid(format!(
                    "variable {} has an invalid parent index {p}",
                    vars[v].name
                )));
            }
        }
        if topological_order(&sorted).is_none() {
            return Err(invalid("the structure has a cycle"));
        }
        let mut counts = Vec::with_capacity(vars.len());
        for (v, ps) in sorted.iter().enumerate() {
            let rows: usize = ps.iter().map(|&p| vars[p].card()).product();
            if rows.saturating_mul(vars[v].card()) > 1 << 20 {
                return Err(invalid(format!(
                    "the table of {} would have more than 2^20 cells",
                    vars[v].name
                )));
            }
            counts.push(vec![0.0; rows * vars[v].card()]);
        }
        Ok(Self {
            vars,
            parents: sorted,
            counts,
            prior,
        })
    }

    /// A network whose structure is declared by name: `edges` are `(parent, child)` pairs.
    pub fn declared(vars: Vec<Variable>, edges: &[(&str, &str)], prior: f64) -> Result<Self> {
        let index = |name: &str| {
            vars.iter()
                .position(|v| v.name == name)
                .ok_or_else(|| invalid(format!("edge names unknown variable {name}")))
        };
        let mut parents = vec![Vec::new(); vars.len()];
        for (p, c) in edges {
            parents[index(c)?].push(index(p)?);
        }
        Self::new(vars, parents, prior)
    }

    pub fn vars(&self) -> &[Variable] {
        &self.vars
    }

    pub fn parents(&self, v: usize) -> &[usize] {
        &self.parents[v]
    }

    /// The index of the variable called `name`.
    pub fn index(&self, name: &str) -> Option<usize> {
        self.vars.iter().position(|v| v.name == name)
    }

    fn config(&self, v: usize, sample: &[usize]) -> usize {
        self.parents[v]
            .iter()
            .fold(0, |acc, &p| acc * self.vars[p].card() + sample[p])
    }

    fn check_sample(&self, sample: &[usize]) -> Result<()> {
        if sample.len() != self.vars.len() {
            return Err(invalid(format!(
                "a sample has {} values for {} variables",
                sample.len(),
                self.vars.len()
            )));
        }
        if let Some((v, &s)) = sample
            .iter()
            .enumerate()
            .find(|&(v, &s)| s >= self.vars[v].card())
        {
            return Err(invalid(format!(
                "state {s} of {} is out of range",
                self.vars[v].name
            )));
        }
        Ok(())
    }

    /// Adds one fully observed sample with `weight` to the tables (online learning).
    pub fn observe(&mut self, sample: &[usize], weight: f64) -> Result<()> {
        self.check_sample(sample)?;
        if !(weight >= 0.0 && weight.is_finite()) {
            return Err(invalid("a sample weight must be finite and non-negative"));
        }
        for v in 0..self.vars.len() {
            let cell = self.config(v, sample) * self.vars[v].card() + sample[v];
            self.counts[v][cell] += weight;
        }
        Ok(())
    }

    /// The conditional tables' counts, one list per node (see [`Network::restore_counts`]).
    pub fn counts(&self) -> &[Vec<f64>] {
        &self.counts
    }

    /// Replaces the tables' counts with `counts` from [`Network::counts`] of a network of the
    /// same structure (a checkpoint): refused, leaving the tables as they were, if their shape
    /// differs or a count is negative or not finite.
    pub fn restore_counts(&mut self, counts: Vec<Vec<f64>>) -> Result<()> {
        if counts.len() != self.counts.len()
            || counts
                .iter()
                .zip(&self.counts)
                .any(|(a, b)| a.len() != b.len())
        {
            return Err(invalid(
                "the saved tables do not fit this network's structure",
            ));
        }
        if counts
            .iter()
            .flatten()
            .any(|c| !(c.is_finite() && *c >= 0.0))
        {
            return Err(invalid("a saved count is negative or not finite"));
        }
        self.counts = counts;
        Ok(())
    }

    /// Multiplies every count by `factor` in (0, 1]: older evidence fades, so the tables follow
    /// a component whose behaviour changes.
    pub fn decay(&mut self, factor: f64) {
        let factor = factor.clamp(0.0, 1.0);
        for c in self.counts.iter_mut().flatten() {
            *c *= factor;
        }
    }

    /// P(v = state | parents as in `sample`).
    pub fn probability(&self, v: usize, sample: &[usize]) -> f64 {
        let card = self.vars[v].card();
        let row = self.config(v, sample) * card;
        let cells = &self.counts[v][row..row + card];
        let total: f64 = cells.iter().sum::<f64>() + self.prior * card as f64;
        (cells[sample[v]] + self.prior) / total
    }

    /// The joint probability of a full assignment.
    pub fn joint(&self, sample: &[usize]) -> f64 {
        (0..self.vars.len())
            .map(|v| self.probability(v, sample))
            .product()
    }

    /// The conditional table of `v` as a factor over `v` and its parents.
    fn factor(&self, v: usize) -> Factor {
        let mut vars = self.parents[v].clone();
        vars.push(v);
        let order: Vec<usize> = {
            let mut o: Vec<usize> = (0..vars.len()).collect();
            o.sort_by_key(|&i| vars[i]);
            o
        };
        let sorted: Vec<usize> = order.iter().map(|&i| vars[i]).collect();
        let cards: Vec<usize> = sorted.iter().map(|&u| self.vars[u].card()).collect();
        let size: usize = cards.iter().product();
        let mut values = Vec::with_capacity(size);
        let mut sample = vec![0; self.vars.len()];
        let mut odo = vec![0; sorted.len()];
        for _ in 0..size {
            for (k, &u) in sorted.iter().enumerate() {
                sample[u] = odo[k];
            }
            values.push(self.probability(v, &sample));
            step(&mut odo, &cards);
        }
        Factor {
            vars: sorted,
            cards,
            values,
        }
    }

    /// The posterior distribution of `target` given `evidence` (`evidence[v]` is the observed
    /// state of `v`, or `None`), by variable elimination.
    pub fn posterior(&self, target: usize, evidence: &[Option<usize>]) -> Result<Vec<f64>> {
        // Only the factors of the relevant nodes are built.
        self.posterior_with(&|v| self.factor(v), target, evidence)
    }

    /// Every node's conditional table as a factor.
    fn tables(&self) -> Vec<Factor> {
        (0..self.vars.len()).map(|v| self.factor(v)).collect()
    }

    /// Variable elimination with node `v`'s conditional table from `table(v)`.
    fn posterior_with(
        &self,
        table: &dyn Fn(usize) -> Factor,
        target: usize,
        evidence: &[Option<usize>],
    ) -> Result<Vec<f64>> {
        if target >= self.vars.len() {
            return Err(invalid(format!("no variable {target}")));
        }
        if evidence.len() != self.vars.len() {
            return Err(invalid(format!(
                "evidence has {} entries for {} variables",
                evidence.len(),
                self.vars.len()
            )));
        }
        for (v, e) in evidence.iter().enumerate() {
            if let Some(s) = e
                && *s >= self.vars[v].card()
            {
                return Err(invalid(format!(
                    "state {s} of {} is out of range",
                    self.vars[v].name
                )));
            }
        }
        if let Some(s) = evidence[target] {
            let mut p = vec![0.0; self.vars[target].card()];
            p[s] = 1.0;
            return Ok(p);
        }
        let relevant = self.relevant(target, evidence);
        let mut factors: Vec<Factor> = relevant
            .iter()
            .map(|&v| {
                let mut f = table(v);
                for u in f.vars.clone() {
                    if let Some(s) = evidence[u] {
                        f = f.reduce(u, s);
                    }
                }
                f
            })
            .collect();
        let mut hidden: Vec<usize> = relevant
            .iter()
            .copied()
            .filter(|&v| v != target && evidence[v].is_none())
            .collect();
        while !hidden.is_empty() {
            // Greedy order: eliminate the variable whose product factor is smallest.
            let (pos, _) = hidden
                .iter()
                .enumerate()
                .map(|(i, &v)| {
                    let mut scope: Vec<usize> = factors
                        .iter()
                        .filter(|f| f.vars.contains(&v))
                        .flat_map(|f| f.vars.iter().copied())
                        .collect();
                    scope.sort_unstable();
                    scope.dedup();
                    let size: usize = scope.iter().map(|&u| self.vars[u].card()).product();
                    (i, size)
                })
                .min_by_key(|&(_, size)| size)
                .unwrap_or((0, 0));
            let v = hidden.swap_remove(pos);
            let (with, without): (Vec<Factor>, Vec<Factor>) =
                factors.into_iter().partition(|f| f.vars.contains(&v));
            factors = without;
            if let Some(product) = with.into_iter().reduce(|a, b| a.product(&b)) {
                factors.push(product.sum_out(v));
            }
        }
        let result = factors
            .into_iter()
            .reduce(|a, b| a.product(&b))
            .ok_or_else(|| invalid("nothing to infer"))?;
        // Only the target is left in scope (constant factors have no variables).
        let total: f64 = result.values.iter().sum();
        if total.is_nan() || total <= 0.0 {
            return Err(invalid("the evidence has probability zero"));
        }
        Ok(result.values.iter().map(|p| p / total).collect())
    }

    /// The target, the evidence and their ancestors: nodes outside this set sum to one and
    /// need not be touched (barren nodes).
    fn relevant(&self, target: usize, evidence: &[Option<usize>]) -> Vec<usize> {
        let mut keep = vec![false; self.vars.len()];
        let mut stack: Vec<usize> = std::iter::once(target)
            .chain((0..self.vars.len()).filter(|&v| evidence[v].is_some()))
            .collect();
        while let Some(v) = stack.pop() {
            if !keep[v] {
                keep[v] = true;
                stack.extend(&self.parents[v]);
            }
        }
        (0..self.vars.len()).filter(|&v| keep[v]).collect()
    }

    /// `P(target = state | evidence)` and the evidence that moved it, largest effect first.
    ///
    /// Attribution is sequential: starting from no evidence (the base rate), the observed node
    /// that moves the probability most is added, then the next, until all are in. Each
    /// [`Reason::delta`] is the move its node made, so the deltas sum to the score minus the
    /// base rate, and redundant evidence (two nodes saying the same thing) is credited once
    /// instead of vanishing from a leave-one-out comparison.
    pub fn explain(
        &self,
        target: usize,
        state: usize,
        evidence: &[Option<usize>],
    ) -> Result<(f64, Vec<Reason>)> {
        let score = *self
            .posterior(target, evidence)?
            .get(state)
            .ok_or_else(|| invalid(format!("state {state} of the target is out of range")))?;
        let mut current = vec![None; self.vars.len()];
        let tables = self.tables();
        let table = |v: usize| tables[v].clone();
        let mut p = self.posterior_with(&table, target, &current)?[state];
        let mut remaining: Vec<(usize, usize)> = evidence
            .iter()
            .enumerate()
            .filter(|&(v, _)| v != target)
            .filter_map(|(v, e)| e.map(|s| (v, s)))
            .collect();
        let mut reasons = Vec::with_capacity(remaining.len());
        while !remaining.is_empty() {
            let mut best: Option<(usize, f64)> = None;
            for (i, &(v, s)) in remaining.iter().enumerate() {
                current[v] = Some(s);
                let q = self.posterior_with(&table, target, &current)?[state];
                current[v] = None;
                if best.is_none_or(|(_, b)| (q - p).abs() > (b - p).abs()) {
                    best = Some((i, q));
                }
            }
            let Some((i, q)) = best else { break };
            let (v, s) = remaining.swap_remove(i);
            current[v] = Some(s);
            reasons.push(Reason {
                var: v,
                state: s,
                delta: q - p,
            });
            p = q;
        }
        debug_assert!(evidence[target].is_some() || (p - score).abs() < 1e-9);
        reasons.sort_by(|a, b| b.delta.abs().total_cmp(&a.delta.abs()));
        Ok((score, reasons))
    }

    /// Learns a structure from complete samples by hill climbing on the BIC score (adding,
    /// removing and reversing edges; at most `max_parents` per node), then fills the tables
    /// from the same samples. `allowed(parent, child)` can forbid edges.
    pub fn learn(
        vars: Vec<Variable>,
        data: &[Vec<usize>],
        max_parents: usize,
        prior: f64,
        allowed: &dyn Fn(usize, usize) -> bool,
    ) -> Result<Self> {
        let empty = Self::new(vars.clone(), vec![Vec::new(); vars.len()], prior)?;
        for s in data {
            empty.check_sample(s)?;
        }
        let n = vars.len();
        let cards: Vec<usize> = vars.iter().map(Variable::card).collect();
        let mut cache: HashMap<(usize, Vec<usize>), f64> = HashMap::new();
        let mut family = |v: usize, ps: &[usize]| -> f64 {
            let mut key = ps.to_vec();
            key.sort_unstable();
            *cache
                .entry((v, key.clone()))
                .or_insert_with(|| bic_family(&cards, data, v, &key))
        };
        let mut parents: Vec<Vec<usize>> = vec![Vec::new(); n];
        let mut scores: Vec<f64> = (0..n).map(|v| family(v, &[])).collect();
        loop {
            // (gain, child changes with their new parent sets)
            let mut best: Option<(f64, Changes)> = None;
            let mut consider = |gain: f64, change: Changes| {
                if gain > 1e-9 && best.as_ref().is_none_or(|(g, _)| gain > *g) {
                    best = Some((gain, change));
                }
            };
            for c in 0..n {
                for p in 0..n {
                    if p == c {
                        continue;
                    }
                    if parents[c].contains(&p) {
                        // Remove p → c.
                        let without: Vec<usize> =
                            parents[c].iter().copied().filter(|&u| u != p).collect();
                        let gain = family(c, &without) - scores[c];
                        consider(gain, vec![(c, without.clone())]);
                        // Reverse to c → p.
                        if allowed(c, p) && parents[p].len() < max_parents {
                            let mut trial = parents.clone();
                            trial[c] = without.clone();
                            trial[p].push(c);
                            if topological_order(&trial).is_some() {
                                let mut pp = parents[p].clone();
                                pp.push(c);
                                let gain =
                                    family(c, &without) - scores[c] + family(p, &pp) - scores[p];
                                consider(gain, vec![(c, without), (p, pp)]);
                            }
                        }
                    } else if allowed(p, c) && parents[c].len() < max_parents {
                        // Add p → c.
                        let mut trial = parents.clone();
                        trial[c].push(p);
                        if topological_order(&trial).is_some() {
                            let with = trial[c].clone();
                            let gain = family(c, &with) - scores[c];
                            consider(gain, vec![(c, with)]);
                        }
                    }
                }
            }
            let Some((_, changes)) = best else { break };
            for (c, ps) in changes {
                scores[c] = family(c, &ps);
                parents[c] = ps;
            }
        }
        let mut net = Self::new(vars, parents, prior)?;
        for s in data {
            net.observe(s, 1.0)?;
        }
        Ok(net)
    }
}

/// New parent sets for some nodes: one move of the structure search.
type Changes = Vec<(usize, Vec<usize>)>;

/// The BIC score of node `v` with `parents`: log-likelihood of the data under the maximum-
/// likelihood table, less `½ log N` per free parameter.
fn bic_family(cards: &[usize], data: &[Vec<usize>], v: usize, parents: &[usize]) -> f64 {
    let card = cards[v];
    let rows: usize = parents.iter().map(|&p| cards[p]).product();
    let mut counts = vec![0.0f64; rows * card];
    for s in data {
        let config = parents.iter().fold(0, |acc, &p| acc * cards[p] + s[p]);
        counts[config * card + s[v]] += 1.0;
    }
    let mut ll = 0.0;
    for row in counts.chunks(card) {
        let total: f64 = row.iter().sum();
        for &c in row {
            if c > 0.0 {
                ll += c * (c / total).ln();
            }
        }
    }
    let params = (rows * (card - 1)) as f64;
    ll - 0.5 * (data.len().max(1) as f64).ln() * params
}

/// A topological order of the nodes, or `None` when the parent lists have a cycle.
fn topological_order(parents: &[Vec<usize>]) -> Option<Vec<usize>> {
    let n = parents.len();
    let mut children = vec![Vec::new(); n];
    let mut indegree = vec![0; n];
    for (c, ps) in parents.iter().enumerate() {
        indegree[c] = ps.len();
        for &p in ps {
            children[p].push(c);
        }
    }
    let mut ready: Vec<usize> = (0..n).filter(|&v| indegree[v] == 0).collect();
    let mut order = Vec::with_capacity(n);
    while let Some(v) = ready.pop() {
        order.push(v);
        for &c in &children[v] {
            indegree[c] -= 1;
            if indegree[c] == 0 {
                ready.push(c);
            }
        }
    }
    (order.len() == n).then_some(order)
}

/// Advances a mixed-radix odometer (last digit fastest).
fn step(odo: &mut [usize], cards: &[usize]) {
    for k in (0..odo.len()).rev() {
        odo[k] += 1;
        if odo[k] < cards[k] {
            return;
        }
        odo[k] = 0;
    }
}

/// A table over a set of variables (ascending), last variable varying fastest.
#[derive(Debug, Clone)]
struct Factor {
    vars: Vec<usize>,
    cards: Vec<usize>,
    values: Vec<f64>,
}

impl Factor {
    fn strides(&self) -> Vec<usize> {
        let mut s = vec![1; self.vars.len()];
        for k in (0..self.vars.len().saturating_sub(1)).rev() {
            s[k] = s[k + 1] * self.cards[k + 1];
        }
        s
    }

    fn product(&self, other: &Factor) -> Factor {
        let mut vars: Vec<usize> = self.vars.iter().chain(&other.vars).copied().collect();
        vars.sort_unstable();
        vars.dedup();
        let cards: Vec<usize> = vars
            .iter()
            .map(|v| {
                let (f, k) = match self.vars.iter().position(|u| u == v) {
                    Some(k) => (self, k),
                    None => (other, other.vars.iter().position(|u| u == v).unwrap_or(0)),
                };
                f.cards[k]
            })
            .collect();
        let stride_in = |f: &Factor| -> Vec<usize> {
            let s = f.strides();
            vars.iter()
                .map(|v| f.vars.iter().position(|u| u == v).map_or(0, |k| s[k]))
                .collect()
        };
        let (sa, sb) = (stride_in(self), stride_in(other));
        let size: usize = cards.iter().product();
        let mut values = Vec::with_capacity(size);
        let mut odo = vec![0; vars.len()];
        let (mut ia, mut ib) = (0usize, 0usize);
        for _ in 0..size {
            values.push(self.values[ia] * other.values[ib]);
            // Advance the odometer, keeping both indices in step.
            for k in (0..odo.len()).rev() {
                odo[k] += 1;
                ia += sa[k];
                ib += sb[k];
                if odo[k] < cards[k] {
                    break;
                }
                ia -= sa[k] * cards[k];
                ib -= sb[k] * cards[k];
                odo[k] = 0;
            }
        }
        Factor {
            vars,
            cards,
            values,
        }
    }

    /// For variable `v`: the factor's values as `outer × card(v) × inner` blocks, and an
    /// empty factor over the scope without `v`.
    fn split(&self, v: usize) -> Option<(usize, usize, usize, Factor)> {
        let k = self.vars.iter().position(|&u| u == v)?;
        let inner: usize = self.cards[k + 1..].iter().product();
        let card = self.cards[k];
        let outer = self.values.len() / (inner * card);
        let mut vars = self.vars.clone();
        let mut cards = self.cards.clone();
        vars.remove(k);
        cards.remove(k);
        let rest = Factor {
            vars,
            cards,
            values: Vec::new(),
        };
        Some((outer, card, inner, rest))
    }

    fn sum_out(&self, v: usize) -> Factor {
        let Some((outer, card, inner, mut rest)) = self.split(v) else {
            return self.clone();
        };
        let values = &mut rest.values;
        values.resize(outer * inner, 0.0);
        for o in 0..outer {
            for s in 0..card {
                let base = (o * card + s) * inner;
                for i in 0..inner {
                    values[o * inner + i] += self.values[base + i];
                }
            }
        }
        rest
    }

    fn reduce(&self, v: usize, state: usize) -> Factor {
        let Some((outer, card, inner, mut rest)) = self.split(v) else {
            return self.clone();
        };
        rest.values.reserve(outer * inner);
        for o in 0..outer {
            let base = (o * card + state) * inner;
            rest.values
                .extend_from_slice(&self.values[base..base + inner]);
        }
        rest
    }
}

#[cfg(test)]
#[path = "bayes/tests.rs"]
mod tests;
