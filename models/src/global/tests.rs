use super::*;

fn small() -> GlobalConfig {
    GlobalConfig {
        window: 24,
        horizon: 6,
        hidden: 16,
        batch: 32,
        steps_per_round: 1,
        memory: 512,
        learning_rate: 1e-2,
        seed: 7,
    }
}

/// Hourly rows of a daily cycle (period 24) with a batch job at 06:00, at the series' own
/// level and scale (`size`), with noise.
fn series(rows: usize, size: f64, seed: u64) -> Vec<(f64, f64)> {
    let mut rng = seed;
    (0..rows)
        .map(|i| {
            let hour = (i % 24) as f64;
            let phase = hour * std::f64::consts::TAU / 24.0;
            let job = if (6.0..9.0).contains(&hour) { 4.0 } else { 0.0 };
            let v = size * (10.0 + 3.0 * phase.sin() + job + 0.5 * (next(&mut rng) - 0.5));
            (i as f64 * 3600.0, v)
        })
        .collect()
}

/// Feeds every series its rows in lockstep, training one round per row.
fn run(
    g: &mut GlobalLstm,
    ids: &[SeriesId],
    data: &[Vec<(f64, f64)>],
    rows: std::ops::Range<usize>,
) {
    for r in rows {
        for (&id, d) in ids.iter().zip(data) {
            let (t, v) = d[r];
            g.push(id, t, v, Some(24)).unwrap();
        }
        g.train().unwrap();
    }
}

#[test]
fn a_series_it_never_trained_on_is_forecast_from_its_first_window() {
    // Eight series of one shape at scales from 0.1 to 1,000: level and scale are taken out,
    // so one network learns the shape from all of them.
    let sizes = [0.1, 1.0, 3.0, 10.0, 30.0, 100.0, 300.0, 1000.0];
    let data: Vec<_> = sizes
        .iter()
        .enumerate()
        .map(|(i, &s)| series(480, s, i as u64 + 1))
        .collect();
    let mut g = GlobalLstm::new(small()).unwrap();
    let ids: Vec<_> = (0..data.len())
        .map(|i| g.add_series(i % KINDS.len()))
        .collect();
    run(&mut g, &ids, &data, 0..480);
    // A new series at a scale none of them had, never trained on: it is forecast from its
    // first window by what the others taught.
    let fresh = series(200, 50_000.0, 99);
    let id = g.add_series(0);
    let step = 4;
    let (mut model, mut naive, mut n) = (0.0, 0.0, 0.0);
    for (r, &(t, v)) in fresh.iter().enumerate() {
        g.push(id, t, v, Some(24)).unwrap();
        if r + 1 < small().window || r + step >= fresh.len() || r > 28 {
            continue;
        }
        let f = g.forecast().unwrap()[id.0].clone().unwrap();
        assert_eq!(f.len(), small().horizon);
        assert!(f.iter().all(|p| p.spread > 0.0 && p.median.is_finite()));
        model += (f[step - 1].median - fresh[r + step].1).abs();
        naive += (v - fresh[r + step].1).abs();
        n += 1.0;
    }
    assert!(n >= 5.0);
    let (model, naive) = (model / n, naive / n);
    assert!(model < 0.6 * naive, "global MAE {model} vs naive {naive}");
    assert_eq!(g.stats().series, 9);
    assert_eq!(g.stats().steps, 480 - (24 + 6) + 1);
}

#[test]
fn forecasts_do_not_depend_on_the_other_series_in_the_batch() {
    let data: Vec<_> = (0..3).map(|i| series(100, 1.0 + i as f64, i)).collect();
    let mut alone = GlobalLstm::new(small()).unwrap();
    let mut crowd = GlobalLstm::new(small()).unwrap();
    let a = alone.add_series(1);
    let ids: Vec<_> = (0..3).map(|_| crowd.add_series(1)).collect();
    for r in 0..100 {
        let (t, v) = data[0][r];
        alone.push(a, t, v, None).unwrap();
        for (&id, d) in ids.iter().zip(&data) {
            crowd.push(id, d[r].0, d[r].1, None).unwrap();
        }
    }
    let one = alone.forecast().unwrap()[0].clone().unwrap();
    let many = crowd.forecast().unwrap();
    assert_eq!(many.len(), 3);
    for (x, y) in one.iter().zip(many[0].as_ref().unwrap()) {
        assert!(
            (x.median - y.median).abs() < 1e-4 * (1.0 + x.median.abs()),
            "{x:?} {y:?}"
        );
        assert!(
            (x.spread - y.spread).abs() < 1e-4 * (1.0 + x.spread),
            "{x:?} {y:?}"
        );
    }
}

#[test]
fn deterministic_and_checkpoints_continue_exactly() {
    let data: Vec<_> = (0..3).map(|i| series(160, 2.0 + i as f64, i)).collect();
    let build = || {
        let mut g = GlobalLstm::new(small()).unwrap();
        let ids: Vec<_> = (0..3).map(|k| g.add_series(k)).collect();
        run(&mut g, &ids, &data, 0..80);
        (g, ids)
    };
    let ((mut a, ids), (b, _)) = (build(), build());
    assert_eq!(a.forecast().unwrap(), b.forecast().unwrap(), "same seed");
    let bytes = a.checkpoint().unwrap();
    let mut restored = GlobalLstm::restore(&bytes).unwrap();
    assert_eq!(restored.stats(), a.stats());
    assert_eq!(restored.forecast().unwrap(), a.forecast().unwrap());
    run(&mut a, &ids, &data, 80..160);
    run(&mut restored, &ids, &data, 80..160);
    assert_eq!(
        restored.forecast().unwrap(),
        a.forecast().unwrap(),
        "continues exactly"
    );
    assert_eq!(restored.stats(), a.stats());
    assert_eq!(a.stats().rows, 3 * 160);
    for cut in [0, 10, bytes.len() / 2, bytes.len() - 1] {
        assert!(GlobalLstm::restore(&bytes[..cut]).is_err(), "cut {cut}");
    }
    let mut flipped = bytes.clone();
    flipped[bytes.len() / 3] ^= 1;
    assert!(GlobalLstm::restore(&flipped).is_err());
}

#[test]
fn bad_input_is_refused_or_absorbed() {
    assert!(
        GlobalLstm::new(GlobalConfig {
            memory: 10,
            ..small()
        })
        .is_err()
    );
    assert!(
        GlobalLstm::new(GlobalConfig {
            learning_rate: f64::NAN,
            ..small()
        })
        .is_err()
    );
    let mut g = GlobalLstm::new(small()).unwrap();
    assert!(
        g.push(SeriesId(0), 0.0, 1.0, None).is_err(),
        "unknown series"
    );
    let id = g.add_series(usize::MAX);
    // A gap before the first value is skipped; later ones repeat the last value.
    g.push(id, 0.0, f64::NAN, None).unwrap();
    assert_eq!(g.stats().rows, 0);
    for i in 0..40 {
        let v = if i % 7 == 3 { f64::INFINITY } else { i as f64 };
        g.push(id, f64::NAN, v, Some(1 << 30)).unwrap();
    }
    // 40 rows hold a window and its horizon: one step.
    assert!(g.train().unwrap().is_some());
    let f = g.forecast().unwrap()[0].clone().unwrap();
    assert!(
        f.iter()
            .all(|p| p.median.is_finite() && p.spread.is_finite())
    );
    // A constant series has no scale of its own: a floor keeps it finite.
    let flat = g.add_series(2);
    for i in 0..30 {
        g.push(flat, i as f64, 5.0, Some(4)).unwrap();
    }
    let f = g.forecast().unwrap()[1].clone().unwrap();
    assert!(
        f.iter()
            .all(|p| (p.median - 5.0).abs() < 1.0 && p.spread > 0.0)
    );
}

#[test]
fn an_untrained_network_has_no_series_to_learn_from_and_says_so() {
    let mut g = GlobalLstm::new(small()).unwrap();
    assert_eq!(g.train().unwrap(), None);
    let id = g.add_series(0);
    for i in 0..10 {
        g.push(id, 0.0, i as f64, None).unwrap();
    }
    assert_eq!(
        g.train().unwrap(),
        None,
        "10 rows are fewer than a window and horizon"
    );
    assert_eq!(g.forecast().unwrap(), vec![None], "and fewer than a window");
    assert_eq!(g.stats().steps, 0);
    assert_eq!(g.stats().rounds, 2);
}

#[test]
fn laplace_quantiles() {
    let d = Laplace {
        median: 10.0,
        spread: 2.0,
    };
    assert!((d.quantile(0.5) - 10.0).abs() < 1e-12);
    // A central 90% interval of a Laplace is the median ± b·ln 10.
    assert!((d.quantile(0.95) - (10.0 + 2.0 * 10f64.ln())).abs() < 1e-9);
    assert!((d.quantile(0.05) - (10.0 - 2.0 * 10f64.ln())).abs() < 1e-9);
    assert!(d.quantile(0.0).is_finite() && d.quantile(1.0).is_finite());
}

#[test]
fn kinds_by_name() {
    for (name, kind) in [
        ("cpu", 0),
        ("cpu_usage", 0),
        ("MEM", 1),
        ("memory", 1),
        ("net", 2),
        ("rx_bytes", 2),
        ("disk", 3),
        ("io", 3),
        ("latency_p99", 4),
        ("", 4),
    ] {
        assert_eq!(kind_of(name), kind, "{name}");
    }
}

#[test]
fn a_restart_resumes_the_weights_and_keeps_its_own_series() {
    let data: Vec<_> = (0..2).map(|i| series(120, 1.0 + i as f64, i)).collect();
    let mut trained = GlobalLstm::new(small()).unwrap();
    let ids: Vec<_> = (0..2).map(|k| trained.add_series(k)).collect();
    run(&mut trained, &ids, &data, 0..120);
    let bytes = trained.weights().unwrap();
    assert!(bytes.len() < trained.checkpoint().unwrap().len());
    // After a restart: the same series, their rows back from storage, no training yet.
    let mut fresh = GlobalLstm::new(small()).unwrap();
    let ids: Vec<_> = (0..2).map(|k| fresh.add_series(k)).collect();
    for r in 0..120 {
        for (&id, d) in ids.iter().zip(&data) {
            fresh.push(id, d[r].0, d[r].1, Some(24)).unwrap();
        }
    }
    assert_ne!(fresh.forecast().unwrap(), trained.forecast().unwrap());
    fresh.resume_weights(&bytes).unwrap();
    assert_eq!(fresh.forecast().unwrap(), trained.forecast().unwrap());
    assert_eq!(fresh.stats().steps, trained.stats().steps);
    // Another shape, or damage, is refused and changes nothing.
    let mut other = GlobalLstm::new(GlobalConfig {
        hidden: 8,
        ..small()
    })
    .unwrap();
    let before = other.stats();
    assert!(other.resume_weights(&bytes).is_err());
    assert!(other.resume_weights(&bytes[..bytes.len() / 2]).is_err());
    assert_eq!(other.stats(), before);
}

#[test]
fn replay_scores_a_trained_network_beside_each_series_own_models_without_training_it() {
    // A network trained on eight series of one shape, then asked about three it never saw
    // (one shorter than the rows it is scored on), as SQL's forecast() asks it.
    let data: Vec<_> = (0..8)
        .map(|i| series(480, 1.0 + i as f64, i as u64 + 1))
        .collect();
    let mut g = GlobalLstm::new(small()).unwrap();
    let ids: Vec<_> = (0..data.len()).map(|_| g.add_series(0)).collect();
    run(&mut g, &ids, &data, 0..480);
    let trained = g.weights().unwrap();
    let frozen = || {
        let mut m = GlobalLstm::new(GlobalConfig {
            steps_per_round: 0,
            ..small()
        })
        .unwrap();
        m.resume_weights(&trained).unwrap();
        m
    };
    let fresh = [
        series(600, 5.0, 11),
        series(600, 50.0, 12),
        series(40, 2.0, 13),
    ];
    let (times, values): (Vec<Vec<f64>>, Vec<Vec<f64>>) =
        fresh.iter().map(|s| s.iter().copied().unzip()).unzip();
    let input: Vec<Replay<'_>> = times
        .iter()
        .zip(&values)
        .map(|(times, values)| Replay {
            values,
            times,
            kind: 0,
        })
        .collect();
    let config = ForecastConfig {
        horizon: 6,
        ..ForecastConfig::default()
    };
    let mut model = frozen();
    let before = model.stats();
    let fs = replay(&mut model, &input, config, 64).unwrap();
    assert_eq!(fs.len(), 3);
    let after = model.stats();
    assert_eq!(
        (after.steps, after.series),
        (before.steps, 3),
        "not trained"
    );
    let names = fs[0].model_names();
    let global = names.iter().position(|n| *n == "global_lstm").unwrap();
    for ((f, times), values) in fs.iter().zip(&times).zip(&values) {
        // Its forecasts were scored at every step ahead, like the series' own models'.
        for step in 1..=6 {
            assert!(f.rolling_error(step)[global].is_some_and(f64::is_finite));
        }
        // And the one it answers with now is the network's own for this series' rows.
        let mut alone = frozen();
        let id = alone.add_series(0);
        for (&t, &v) in times.iter().zip(values) {
            alone.push(id, t, v, f.history().period()).unwrap();
        }
        let path = alone.forecast().unwrap().remove(0).unwrap();
        let supplied = f.forecast_model(global, 6, 0.9);
        for (p, s) in path.iter().zip(&supplied) {
            assert!((p.median - s.mean).abs() < 1e-9, "{p:?} against {s:?}");
        }
    }
    // Scored on none of the rows, the network answers nothing: each forecast is what the
    // series' own models say.
    let fs = replay(&mut frozen(), &input, config, 0).unwrap();
    for (f, values) in fs.iter().zip(&values) {
        assert!(f.rolling_error(1)[global].is_none());
        let mut own = AutoForecaster::new(config).unwrap();
        for &v in values {
            own.update(v);
        }
        let strip = |steps: Vec<crate::forecast::Step>| -> Vec<(f64, f64, f64)> {
            steps.iter().map(|s| (s.mean, s.lower, s.upper)).collect()
        };
        assert_eq!(strip(f.forecast(6, 0.9)), strip(own.forecast(6, 0.9)));
    }
}

#[test]
fn the_shipped_network_loads_and_forecasts_a_series_it_never_saw() {
    let mut model = GlobalLstm::pretrained().unwrap();
    assert!(model.stats().steps > 1000, "{:?}", model.stats());
    assert_eq!(model.stats().series, 0);
    let s = series(400, 20.0, 5);
    let (times, values): (Vec<f64>, Vec<f64>) = s.into_iter().unzip();
    let input = [Replay {
        values: &values,
        times: &times,
        kind: 0,
    }];
    let fs = replay(&mut model, &input, ForecastConfig::default(), 64).unwrap();
    let global = fs[0]
        .model_names()
        .iter()
        .position(|n| *n == "global_lstm")
        .unwrap();
    assert!(fs[0].rolling_error(12)[global].is_some_and(f64::is_finite));
    assert!(fs[0].forecast(12, 0.9).iter().all(|s| s.mean.is_finite()));
}
