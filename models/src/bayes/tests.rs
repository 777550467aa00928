use super::*;

/// A small deterministic generator.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> f64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (self.0 >> 11) as f64 / (1u64 << 53) as f64
    }

    fn pick(&mut self, p: &[f64]) -> usize {
        let mut u = self.next() * p.iter().sum::<f64>();
        for (i, &x) in p.iter().enumerate() {
            if u < x {
                return i;
            }
            u -= x;
        }
        p.len() - 1
    }
}

fn binary(name: &str) -> Variable {
    Variable::new(name, &["no", "yes"])
}

/// Fills every table with random counts.
fn randomise(net: &mut Network, rng: &mut Rng) {
    for table in &mut net.counts {
        for c in table.iter_mut() {
            *c = (rng.next() * 20.0).floor();
        }
    }
}

/// P(target | evidence) by summing the joint over every full assignment.
fn brute_force(net: &Network, target: usize, evidence: &[Option<usize>]) -> Vec<f64> {
    let cards: Vec<usize> = net.vars().iter().map(Variable::card).collect();
    let total: usize = cards.iter().product();
    let mut odo = vec![0; cards.len()];
    let mut p = vec![0.0; cards[target]];
    for _ in 0..total {
        if evidence
            .iter()
            .zip(&odo)
            .all(|(e, s)| e.is_none_or(|e| e == *s))
        {
            p[odo[target]] += net.joint(&odo);
        }
        step(&mut odo, &cards);
    }
    let z: f64 = p.iter().sum();
    p.iter().map(|x| x / z).collect()
}

#[test]
fn variable_elimination_matches_brute_force_enumeration() {
    let mut rng = Rng(42);
    for trial in 0..40 {
        let n = 3 + trial % 5;
        let vars: Vec<Variable> = (0..n)
            .map(|i| {
                let states = ["a", "b", "c"];
                Variable::new(format!("v{i}"), &states[..2 + (i + trial) % 2])
            })
            .collect();
        // Parents only from lower indices: acyclic by construction.
        let parents: Vec<Vec<usize>> = (0..n)
            .map(|i| (0..i).filter(|_| rng.next() < 0.5).take(3).collect())
            .collect();
        let mut net = Network::new(vars, parents, 0.5).unwrap();
        randomise(&mut net, &mut rng);
        for _ in 0..5 {
            let target = (rng.next() * n as f64) as usize;
            let evidence: Vec<Option<usize>> = (0..n)
                .map(|v| {
                    (v != target && rng.next() < 0.4)
                        .then(|| (rng.next() * net.vars()[v].card() as f64) as usize)
                })
                .collect();
            let ve = net.posterior(target, &evidence).unwrap();
            let bf = brute_force(&net, target, &evidence);
            for (a, b) in ve.iter().zip(&bf) {
                assert!((a - b).abs() < 1e-12, "trial {trial}: {ve:?} vs {bf:?}");
            }
        }
    }
}

/// Samples from a network by ancestral sampling (parents have lower indices).
fn sample(net: &Network, rng: &mut Rng, n: usize) -> Vec<Vec<usize>> {
    (0..n)
        .map(|_| {
            let mut s = vec![0; net.vars().len()];
            for v in 0..s.len() {
                let p: Vec<f64> = (0..net.vars()[v].card())
                    .map(|state| {
                        s[v] = state;
                        net.probability(v, &s)
                    })
                    .collect();
                s[v] = rng.pick(&p);
            }
            s
        })
        .collect()
}

fn skeleton(net: &Network) -> Vec<(usize, usize)> {
    let mut e: Vec<(usize, usize)> = (0..net.vars().len())
        .flat_map(|c| net.parents(c).iter().map(move |&p| (p.min(c), p.max(c))))
        .collect();
    e.sort_unstable();
    e
}

/// Colliders `a → c ← b` with `a` and `b` not adjacent: with the skeleton, they fix the
/// Markov equivalence class.
fn v_structures(net: &Network) -> Vec<(usize, usize, usize)> {
    let adjacent = |a: usize, b: usize| net.parents(a).contains(&b) || net.parents(b).contains(&a);
    let mut out = Vec::new();
    for c in 0..net.vars().len() {
        let ps = net.parents(c);
        for (i, &a) in ps.iter().enumerate() {
            for &b in &ps[i + 1..] {
                if !adjacent(a, b) {
                    out.push((a, b, c));
                }
            }
        }
    }
    out
}

#[test]
fn structure_learning_recovers_the_generating_network() {
    // cloud → rain, cloud → sprinkler, rain → wet ← sprinkler, wet → slippery.
    let vars = vec![
        binary("cloud"),
        binary("rain"),
        binary("sprinkler"),
        binary("wet"),
        binary("slippery"),
    ];
    let truth = Network::declared(
        vars.clone(),
        &[
            ("cloud", "rain"),
            ("cloud", "sprinkler"),
            ("rain", "wet"),
            ("sprinkler", "wet"),
            ("wet", "slippery"),
        ],
        1e-9,
    )
    .unwrap();
    let mut truth = truth;
    // Strong, clear dependencies.
    let set = |net: &mut Network, v: &str, table: &[f64]| {
        let i = net.index(v).unwrap();
        net.counts[i] = table.to_vec();
    };
    set(&mut truth, "cloud", &[50.0, 50.0]);
    set(&mut truth, "rain", &[80.0, 20.0, 20.0, 80.0]);
    set(&mut truth, "sprinkler", &[30.0, 70.0, 85.0, 15.0]);
    set(
        &mut truth,
        "wet",
        &[95.0, 5.0, 15.0, 85.0, 15.0, 85.0, 2.0, 98.0],
    );
    set(&mut truth, "slippery", &[90.0, 10.0, 25.0, 75.0]);
    let data = sample(&truth, &mut Rng(7), 5000);
    let learned = Network::learn(vars, &data, 3, 1.0, &|_, _| true).unwrap();
    assert_eq!(skeleton(&learned), skeleton(&truth));
    assert_eq!(v_structures(&learned), v_structures(&truth));
    // And its tables: P(wet | rain, sprinkler) close to the truth.
    let wet = learned.index("wet").unwrap();
    let p = learned.probability(wet, &[0, 1, 1, 1, 0]);
    assert!((p - 0.98).abs() < 0.03, "{p}");
}

#[test]
fn forbidden_edges_and_the_parent_limit_are_respected() {
    let vars: Vec<Variable> = (0..4).map(|i| binary(&format!("x{i}"))).collect();
    // x3 is the XOR-ish child of x0..x2: it wants three parents.
    let mut rng = Rng(3);
    let data: Vec<Vec<usize>> = (0..3000)
        .map(|_| {
            let a = usize::from(rng.next() < 0.5);
            let b = usize::from(rng.next() < 0.5);
            let c = usize::from(rng.next() < 0.5);
            let d = if rng.next() < 0.9 {
                a & (b | c)
            } else {
                1 - (a & (b | c))
            };
            vec![a, b, c, d]
        })
        .collect();
    let net = Network::learn(vars.clone(), &data, 1, 1.0, &|_, _| true).unwrap();
    assert!((0..4).all(|v| net.parents(v).len() <= 1));
    let net = Network::learn(vars, &data, 3, 1.0, &|p, _| p != 0).unwrap();
    assert!((0..4).all(|c| !net.parents(c).contains(&0)));
}

#[test]
fn online_counts_move_the_posterior_and_decay_forgets() {
    let vars = vec![binary("load"), binary("bottleneck")];
    let mut net = Network::declared(vars, &[("load", "bottleneck")], 1.0).unwrap();
    let evidence = [Some(1), None];
    assert!((net.posterior(1, &evidence).unwrap()[1] - 0.5).abs() < 1e-12);
    for _ in 0..30 {
        net.observe(&[1, 1], 1.0).unwrap();
    }
    net.observe(&[1, 0], 1.0).unwrap();
    let p = net.posterior(1, &evidence).unwrap()[1];
    assert!((p - 31.0 / 33.0).abs() < 1e-12, "{p}");
    net.decay(0.1);
    for _ in 0..30 {
        net.observe(&[1, 0], 1.0).unwrap();
    }
    assert!(net.posterior(1, &evidence).unwrap()[1] < 0.2);
    // Diagnostic reasoning: a bottleneck makes high load more likely.
    let p = net.posterior(0, &[None, Some(1)]).unwrap();
    assert!((p.iter().sum::<f64>() - 1.0).abs() < 1e-12);
}

#[test]
fn explanations_rank_the_evidence_that_moved_the_score() {
    let vars = vec![
        binary("cpu_high"),
        binary("disk_high"),
        binary("bottleneck"),
    ];
    let mut net = Network::declared(
        vars,
        &[("cpu_high", "bottleneck"), ("disk_high", "bottleneck")],
        1.0,
    )
    .unwrap();
    // CPU drives the bottleneck; disk barely matters.
    for (cpu, disk, b, n) in [
        (0, 0, 0, 90),
        (0, 0, 1, 10),
        (0, 1, 0, 80),
        (0, 1, 1, 20),
        (1, 0, 0, 15),
        (1, 0, 1, 85),
        (1, 1, 0, 10),
        (1, 1, 1, 90),
    ] {
        net.observe(&[cpu, disk, b], n as f64).unwrap();
    }
    let (score, reasons) = net.explain(2, 1, &[Some(1), Some(1), None]).unwrap();
    assert!(score > 0.85, "{score}");
    assert_eq!(reasons.len(), 2);
    assert_eq!(reasons[0].var, 0, "{reasons:?}");
    assert!(reasons[0].delta > reasons[1].delta.abs());
    // The moves add up to the score less the base rate.
    let base = net.posterior(2, &[None, None, None]).unwrap()[1];
    let moved: f64 = reasons.iter().map(|r| r.delta).sum();
    assert!((base + moved - score).abs() < 1e-12);
    assert!(net.explain(2, 1, &[Some(1)]).is_err());
    assert!(net.explain(2, 5, &[None, None, None]).is_err());
}

#[test]
fn bad_structures_and_queries_are_refused() {
    let two = || vec![binary("a"), binary("b")];
    assert!(Network::declared(two(), &[("a", "b"), ("b", "a")], 1.0).is_err());
    assert!(Network::declared(two(), &[("a", "c")], 1.0).is_err());
    assert!(Network::new(two(), vec![vec![0], vec![]], 1.0).is_err());
    assert!(Network::new(two(), vec![vec![], vec![5]], 1.0).is_err());
    assert!(Network::new(two(), vec![vec![]], 1.0).is_err());
    assert!(Network::new(two(), vec![vec![], vec![]], 0.0).is_err());
    assert!(Network::new(vec![binary("a"), binary("a")], vec![vec![], vec![]], 1.0).is_err());
    assert!(Network::new(vec![Variable::new("a", &["only"])], vec![vec![]], 1.0).is_err());
    let mut net = Network::declared(two(), &[("a", "b")], 1.0).unwrap();
    assert!(net.observe(&[0], 1.0).is_err());
    assert!(net.observe(&[0, 2], 1.0).is_err());
    assert!(net.observe(&[0, 1], f64::NAN).is_err());
    assert!(net.posterior(2, &[None, None]).is_err());
    assert!(net.posterior(0, &[None]).is_err());
    assert!(net.posterior(0, &[None, Some(9)]).is_err());
    assert_eq!(net.posterior(0, &[Some(1), None]).unwrap(), vec![0.0, 1.0]);
    assert!(Network::learn(two(), &[vec![0, 3]], 2, 1.0, &|_, _| true).is_err());
}

#[test]
fn restored_counts_give_the_same_posteriors_and_misfits_are_refused() {
    let vars = vec![
        binary("a"),
        binary("b"),
        Variable::new("c", &["x", "y", "z"]),
    ];
    let parents = vec![vec![], vec![0], vec![0, 1]];
    let mut learned = Network::new(vars.clone(), parents.clone(), 0.5).unwrap();
    randomise(&mut learned, &mut Rng(7));
    let mut fresh = Network::new(vars.clone(), parents.clone(), 0.5).unwrap();
    fresh.restore_counts(learned.counts().to_vec()).unwrap();
    let evidence = [None, Some(1), Some(2)];
    assert_eq!(
        fresh.posterior(0, &evidence).unwrap(),
        learned.posterior(0, &evidence).unwrap()
    );
    // Tables of another structure, or with a count no data can give, are refused and change
    // nothing.
    let mut other = Network::new(vars, vec![vec![], vec![0], vec![1]], 0.5).unwrap();
    let before = other.counts().to_vec();
    assert!(other.restore_counts(learned.counts().to_vec()).is_err());
    let mut bad = learned.counts().to_vec();
    bad[1][0] = f64::NAN;
    assert!(fresh.restore_counts(bad.clone()).is_err());
    bad[1][0] = -1.0;
    assert!(fresh.restore_counts(bad).is_err());
    assert_eq!(other.counts(), &before[..]);
    assert_eq!(fresh.counts(), learned.counts());
}
