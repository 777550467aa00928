use super::*;

fn specs() -> Vec<MetricSpec> {
    vec![
        MetricSpec {
            name: "usage_user".into(),
            resource: "cpu".into(),
            threshold: 90.0,
        },
        MetricSpec {
            name: "mem_used".into(),
            resource: "memory".into(),
            threshold: 90.0,
        },
    ]
}

/// CPU idles near 30 and every 200 rows ramps to ~97 over 50 rows; memory stays near 40.
fn history(n: usize) -> Vec<Vec<f64>> {
    let mut seed = 5u64;
    let mut noise = move || {
        seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (seed >> 11) as f64 / (1u64 << 53) as f64 - 0.5
    };
    let cpu = (0..n)
        .map(|i| {
            let phase = i % 200;
            let base = if (120..170).contains(&phase) {
                30.0 + 1.35 * (phase - 120) as f64
            } else {
                30.0
            };
            base + 3.0 * noise()
        })
        .collect();
    let mem = (0..n).map(|_| 40.0 + 2.0 * noise()).collect();
    vec![cpu, mem]
}

/// Feeds a fresh forecaster per metric the first `t + 1` rows and returns the last
/// observation.
fn observation_at(series: &[Vec<f64>], t: usize) -> Observation {
    let config = RiskConfig::default();
    let metrics = series
        .iter()
        .map(|s| {
            let mut f = AutoForecaster::new(ForecastConfig::default()).unwrap();
            let mut last = None;
            for &v in &s[..=t] {
                last = observe_metric(&mut f, v, config);
            }
            last
        })
        .collect();
    Observation {
        metrics,
        health: None,
    }
}

fn cpu_score(model: &RiskModel, obs: &Observation) -> (f64, Vec<String>) {
    let r = model.risk(obs).unwrap();
    // The scores alone are the same numbers as the explained ones.
    let scores = model.scores(obs).unwrap();
    assert_eq!(scores.len(), r.len());
    for (s, r) in scores.iter().zip(&r) {
        assert!((s - r.score).abs() < 1e-9, "{s} vs {r:?}");
    }
    assert_eq!(r[0].resource, "cpu");
    assert_eq!(r[1].resource, "memory");
    assert!(r[1].score < 0.1, "memory: {:?}", r[1]);
    (r[0].score, r[0].reasons.clone())
}

#[test]
fn a_rising_metric_near_its_threshold_is_a_risk_and_an_idle_one_is_not() {
    let series = history(5000);
    let rows = training_rows(&specs(), &series, RiskConfig::default(), 300).unwrap();
    assert_eq!(rows.len(), 5000 - 12 - 300);
    // Labels are hindsight: row 4156 (ramp at ~78) sees 90 within 12 rows.
    assert!(rows[4156 - 300].1[0]);
    assert!(!rows[4050 - 300].1[0]);

    let declared = {
        let mut m = RiskModel::new(specs(), RiskConfig::default()).unwrap();
        for (o, l) in &rows[..4000] {
            m.observe(o, l).unwrap();
        }
        m
    };
    let learned = RiskModel::learn(specs(), RiskConfig::default(), &rows[..4000]).unwrap();
    for model in [&declared, &learned] {
        // Mid-ramp, at about 75 and rising: a bottleneck within 12 rows is likely.
        let (high, reasons) = cpu_score(model, &observation_at(&series, 4754));
        assert!(high > 0.6, "mid-ramp risk {high}");
        assert!(
            reasons.iter().any(|r| r.contains(":usage_user")),
            "{reasons:?}"
        );
        // Idle: no risk.
        let (low, _) = cpu_score(model, &observation_at(&series, 4700));
        assert!(low < 0.1, "idle risk {low}");
    }
}

#[test]
fn missing_metrics_are_unobserved_and_bad_shapes_are_refused() {
    let model = RiskModel::new(specs(), RiskConfig::default()).unwrap();
    let obs = Observation {
        metrics: vec![None, None],
        health: Some(Health::Fail),
    };
    let r = model.risk(&obs).unwrap();
    assert!(r.iter().all(|r| (0.0..=1.0).contains(&r.score)));
    assert!(
        model
            .risk(&Observation {
                metrics: vec![None],
                health: None
            })
            .is_err()
    );
    let mut m = model.clone();
    assert!(m.observe(&obs, &[true]).is_err());
    // A row missing a metric is skipped, not an error.
    m.observe(&obs, &[true, false]).unwrap();
    assert!(RiskModel::new(Vec::new(), RiskConfig::default()).is_err());
    let mut bad = specs();
    bad[0].threshold = f64::NAN;
    assert!(RiskModel::new(bad, RiskConfig::default()).is_err());
}

#[test]
fn assess_scores_the_last_row_from_the_history_alone() {
    let series = history(4755);
    let r = assess(&specs(), &series, RiskConfig::default(), 300).unwrap();
    assert!(r[0].score > 0.6, "{r:?}");
    assert!(r[1].score < 0.1, "{r:?}");
    let idle: Vec<Vec<f64>> = series.iter().map(|s| s[..4701].to_vec()).collect();
    let r = assess(&specs(), &idle, RiskConfig::default(), 300).unwrap();
    assert!(r[0].score < 0.1, "{r:?}");
    assert!(assess(&specs(), &[vec![], vec![]], RiskConfig::default(), 0).is_err());
    assert!(assess(&specs(), &series[..1], RiskConfig::default(), 0).is_err());
}
