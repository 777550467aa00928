use super::*;

/// A deterministic noise source in [-0.5, 0.5).
fn noise(seed: &mut u64) -> f64 {
    *seed = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (*seed >> 11) as f64 / (1u64 << 53) as f64 - 0.5
}

fn seasonal(n: usize, period: usize, noise_amp: f64, slope: f64) -> Vec<f64> {
    let mut seed = 7;
    (0..n)
        .map(|i| {
            50.0 + slope * i as f64
                + 10.0 * (i as f64 * std::f64::consts::TAU / period as f64).sin()
                + noise_amp * noise(&mut seed)
        })
        .collect()
}

/// Mean absolute error at `step` ahead of the automatic choice, and of the naive forecast
/// (the last value), over the second half of `values`.
fn errors_at(values: &[f64], step: usize) -> (f64, f64) {
    let mut f = AutoForecaster::new(ForecastConfig::default()).unwrap();
    let (mut auto, mut naive, mut n) = (0.0, 0.0, 0.0);
    for (i, &v) in values.iter().enumerate() {
        f.update(v);
        if i >= values.len() / 2 && i + step < values.len() {
            let actual = values[i + step];
            auto += (f.forecast(step, 0.9)[step - 1].mean - actual).abs();
            naive += (v - actual).abs();
            n += 1.0;
        }
    }
    (auto / n, naive / n)
}

#[test]
fn period_detection_finds_the_cycle_and_not_noise_or_trends() {
    assert_eq!(detect_period(&seasonal(600, 24, 4.0, 0.05), 200), Some(24));
    assert_eq!(
        detect_period(&seasonal(3000, 288, 2.0, 0.0), 1008),
        Some(288)
    );
    let mut seed = 3;
    let white: Vec<f64> = (0..2000).map(|_| noise(&mut seed)).collect();
    assert_eq!(detect_period(&white, 500), None);
    let mut walk = vec![0.0];
    for _ in 0..2000 {
        let next = walk[walk.len() - 1] + noise(&mut seed);
        walk.push(next);
    }
    assert_eq!(detect_period(&walk, 500), None);
    assert_eq!(detect_period(&[1.0; 500], 100), None);
    assert_eq!(detect_period(&[1.0, f64::NAN, 2.0, 1.0, 2.0], 2), None);
}

#[test]
fn beats_the_naive_forecast_on_seasonal_and_trending_series() {
    let s = seasonal(4000, 48, 2.0, 0.0);
    for step in [1, 12] {
        let (auto, naive) = errors_at(&s, step);
        assert!(
            auto < 0.8 * naive,
            "seasonal, step {step}: auto {auto} naive {naive}"
        );
    }
    let mut seed = 11;
    let trend: Vec<f64> = (0..3000)
        .map(|i| 0.5 * i as f64 + noise(&mut seed))
        .collect();
    let (auto, naive) = errors_at(&trend, 12);
    assert!(auto < 0.5 * naive, "trend: auto {auto} naive {naive}");
}

#[test]
fn ninety_percent_intervals_cover_about_ninety_percent() {
    let s = seasonal(6000, 48, 6.0, 0.0);
    let mut f = AutoForecaster::new(ForecastConfig::default()).unwrap();
    for step in [1usize, 12] {
        let (mut hits, mut n) = (0, 0);
        for (i, &v) in s.iter().enumerate() {
            f.update(v);
            if i >= 2000 && i + step < s.len() {
                let p = f.forecast(step, 0.9)[step - 1];
                hits += usize::from(p.lower <= s[i + step] && s[i + step] <= p.upper);
                n += 1;
            }
        }
        let coverage = hits as f64 / n as f64;
        assert!(
            (0.85..=0.95).contains(&coverage),
            "step {step}: coverage {coverage}"
        );
        f = AutoForecaster::new(ForecastConfig::default()).unwrap();
    }
}

#[test]
fn a_new_series_gets_a_forecast_from_its_first_value() {
    let mut f = AutoForecaster::new(ForecastConfig::default()).unwrap();
    assert!(f.forecast(5, 0.9).is_empty());
    f.update(f64::NAN); // nothing to repeat yet: ignored
    assert!(f.forecast(5, 0.9).is_empty());
    f.update(42.0);
    let p = f.forecast(30, 0.9);
    assert_eq!(p.len(), 30);
    for s in &p {
        assert_eq!(s.mean, 42.0);
        assert!(s.lower < 42.0 && s.upper > 42.0, "{s:?}");
    }
    f.update(f64::INFINITY); // a gap repeats the last value
    assert!(f.forecast(3, 0.9).iter().all(|s| s.mean.is_finite()));
    // Beyond the tracked horizon intervals keep widening.
    let mut f = AutoForecaster::new(ForecastConfig::default()).unwrap();
    for v in seasonal(500, 24, 3.0, 0.0) {
        f.update(v);
    }
    let p = f.forecast(48, 0.9);
    assert!(p[47].upper - p[47].lower > p[11].upper - p[11].lower);
}

#[test]
fn checkpoints_round_trip_and_continue_exactly() {
    // With and without the LSTM (whose weights, optimiser and generator go in too).
    for lstm_train_every in [0, 16] {
        let config = ForecastConfig {
            lstm_train_every,
            ..ForecastConfig::default()
        };
        let s = seasonal(2200, 36, 3.0, 0.01);
        let mut a = AutoForecaster::new(config).unwrap();
        for &v in &s[..1700] {
            a.update(v);
        }
        let bytes = a.checkpoint().unwrap();
        let mut b = AutoForecaster::restore(&bytes).unwrap();
        assert_eq!(a, b);
        for &v in &s[1700..] {
            a.update(v);
            b.update(v);
            assert_eq!(a.forecast(12, 0.9), b.forecast(12, 0.9));
        }
        assert_eq!(a, b);

        // Damaged checkpoints are refused, never half-read.
        for cut in [0, 3, 15, bytes.len() / 2, bytes.len() - 1] {
            assert!(AutoForecaster::restore(&bytes[..cut]).is_err(), "cut {cut}");
        }
        let mut flipped = bytes.clone();
        flipped[bytes.len() / 2] ^= 0x10;
        let err = AutoForecaster::restore(&flipped).unwrap_err().to_string();
        assert!(err.contains("checksum"), "{err}");
        let mut foreign = bytes.clone();
        foreign[0] = b'X';
        assert!(AutoForecaster::restore(&foreign).is_err());
    }
}

#[test]
fn the_lstm_runs_beside_the_others_and_answers_where_it_is_best() {
    let config = ForecastConfig {
        lstm_train_every: 8,
        ..ForecastConfig::default()
    };
    let mut f = AutoForecaster::new(config).unwrap();
    assert_eq!(
        f.model_names(),
        ["seasonal_naive", "ets", "ets_smooth", "lstm"]
    );
    // Until its 32-row window is full it has no forecast, so no record, and is never
    // chosen; the forecaster answers from the first value all the same.
    for i in 0..32 {
        f.update((i % 7) as f64);
        assert_eq!(f.rolling_error(1)[3], None, "row {i}");
        assert!(
            f.forecast(12, 0.9)
                .iter()
                .all(|s| s.model != 3 && s.mean.is_finite())
        );
    }
    // A pattern no seasonal or smoothing model captures: the value is a function of the last
    // two (a logistic map, chaotic). A network reading a window can learn it; a season
    // cannot.
    let mut x = 0.3f64;
    for _ in 0..3000 {
        x = 3.9 * x * (1.0 - x);
        f.update(100.0 * x);
    }
    let errors = f.rolling_error(1);
    let lstm = errors[3].unwrap();
    let best_other = errors[..3]
        .iter()
        .map(|e| e.unwrap())
        .fold(f64::INFINITY, f64::min);
    assert!(
        lstm < best_other,
        "one step ahead the LSTM should beat the rest here: {errors:?}"
    );
    assert_eq!(f.choice(1), 3);
    assert_eq!(f.forecast(1, 0.9)[0].model, 3);
}

#[test]
fn a_supplied_global_forecast_is_scored_chosen_and_checkpointed() {
    let s = seasonal(600, 36, 3.0, 0.0);
    let config = ForecastConfig {
        global: true,
        ..ForecastConfig::default()
    };
    let h = config.horizon;
    let mut f = AutoForecaster::new(config).unwrap();
    assert_eq!(f.model_names().last(), Some(&"global_lstm"));
    let global = f.model_names().len() - 1;
    // An oracle: the true coming values. It must win every step ahead.
    for i in 0..500 {
        f.update(s[i]);
        assert!(f.supply(&s[i + 1..i + 1 + h]));
    }
    for step in 1..=h {
        assert_eq!(f.choice(step), global, "step {step}");
    }
    let path = f.forecast(h, 0.9);
    for (k, p) in path.iter().enumerate() {
        assert_eq!(p.model, global);
        assert_eq!(p.mean, s[500 + k]);
    }
    let restored = AutoForecaster::restore(&f.checkpoint().unwrap()).unwrap();
    assert_eq!(restored, f);
    assert_eq!(restored.forecast(h, 0.9), path);
    // A value it was handed no forecast for: the answer comes from a model that has one.
    f.update(s[500]);
    let path = f.forecast(2 * h, 0.9);
    assert!(path.iter().all(|p| p.mean.is_finite() && p.model != global));
    // Without the slot, a supplied forecast is refused.
    let mut plain = AutoForecaster::new(ForecastConfig::default()).unwrap();
    plain.update(1.0);
    assert!(!plain.supply(&[1.0]));
}

#[test]
fn bad_configs_are_refused() {
    for c in [
        ForecastConfig {
            horizon: 0,
            ..Default::default()
        },
        ForecastConfig {
            choice_alpha: f64::NAN,
            ..Default::default()
        },
        ForecastConfig {
            error_window: 2,
            ..Default::default()
        },
        ForecastConfig {
            lstm_train_every: usize::MAX,
            ..Default::default()
        },
    ] {
        assert!(AutoForecaster::new(c).is_err(), "{c:?}");
    }
}

#[test]
fn normal_quantile_inverts_the_tail() {
    for p in [0.01, 0.05, 0.5, 0.9, 0.975] {
        let z = normal_quantile(p);
        assert!(
            (crate::likelihood::normal_tail(z) - (1.0 - p)).abs() < 1e-6,
            "{p}"
        );
    }
}

#[test]
fn evaluation_scores_every_forecaster_on_rows_after_the_warmup() {
    use super::evaluation::evaluate_series;
    let s = seasonal(3000, 48, 4.0, 0.0);
    let e = evaluate_series(&s, ForecastConfig::default(), &[1, 12], 500).unwrap();
    assert_eq!(
        e.forecasters,
        ["seasonal_naive", "ets", "ets_smooth", "auto"]
    );
    for acc in &e.accuracy {
        // Rows 499..=2999, less the last `step` rows that have no actual value yet.
        assert_eq!(acc[0].n, 2501 - 1);
        assert_eq!(acc[1].n, 2501 - 12);
    }
    let auto = &e.accuracy[3][1];
    let seasonal_naive = &e.accuracy[0][1];
    assert!(auto.mase(e.scale) < seasonal_naive.mase(e.scale));
    let c90 = auto.coverage(1);
    assert!((0.85..=0.95).contains(&c90), "{c90}");
    assert!(auto.coverage(0) < auto.coverage(2));
}

#[test]
fn a_fleet_evaluation_runs_one_global_model_for_every_series() {
    use super::evaluation::{Input, evaluate_fleet};
    use crate::global::GlobalConfig;
    let data: Vec<Vec<f64>> = (0..3)
        .map(|k| seasonal(700 + 50 * k, 24, 2.0, 0.0))
        .collect();
    let times: Vec<f64> = (0..800).map(|i| f64::from(i) * 3600.0).collect();
    let inputs: Vec<Input<'_>> = data
        .iter()
        .map(|v| Input {
            values: v,
            times: &times,
            kind: 0,
            warmup: 300,
        })
        .collect();
    let global = GlobalConfig {
        window: 24,
        hidden: 8,
        batch: 8,
        memory: 256,
        ..GlobalConfig::default()
    };
    let (evals, cost) =
        evaluate_fleet(&inputs, ForecastConfig::default(), Some(global), &[1, 12]).unwrap();
    let cost = cost.unwrap();
    assert_eq!(cost.stats.series, 3);
    assert_eq!(cost.stats.rows, 700 + 750 + 800);
    // One round per row of the longest series; a step from the first with a window and its
    // horizon (24 + 12 rows).
    assert_eq!(cost.stats.rounds, 800);
    assert_eq!(cost.stats.steps, 800 - 36 + 1);
    for (e, v) in evals.iter().zip(&data) {
        assert_eq!(
            e.forecasters,
            ["seasonal_naive", "ets", "ets_smooth", "global_lstm", "auto"]
        );
        // Every model, the global one included, is scored on every row after the warmup.
        for acc in &e.accuracy {
            assert_eq!(acc[1].n, v.len() - 299 - 12);
            assert!(acc[1].abs_error.is_finite());
        }
    }
    // Without a global model the same series score as they do alone.
    let (plain, cost) = evaluate_fleet(&inputs, ForecastConfig::default(), None, &[12]).unwrap();
    assert!(cost.is_none());
    let alone = super::evaluation::evaluate_series(&data[1], ForecastConfig::default(), &[12], 300)
        .unwrap();
    assert_eq!(plain[1], alone);
}

#[test]
fn error_windows_hold_exactly_their_window_and_stay_sorted() {
    // A forecaster keeps one window per model and step: what they hold is most of its memory.
    let config = ForecastConfig::default();
    let mut f = AutoForecaster::new(config).unwrap();
    for v in seasonal(3 * config.error_window, 24, 2.0, 0.01) {
        f.update(v);
    }
    let restored = AutoForecaster::restore(&f.checkpoint().unwrap()).unwrap();
    for g in [&f, &restored] {
        for t in &g.models {
            for w in &t.errors {
                assert_eq!(w.arrival.len(), config.error_window);
                assert!(w.arrival.capacity() <= config.error_window);
                assert!(w.sorted.capacity() <= config.error_window);
                let mut want: Vec<f32> = w.arrival.iter().copied().collect();
                want.sort_by(f32::total_cmp);
                assert_eq!(w.sorted, want);
            }
        }
    }
}

/// Days of 100 rows around 10: a surge to 30 for 5 rows from row 70 of every day (a row or two
/// early or late), and on day 1 only, a spike to 40 at row 30.
fn surging_days(days: usize) -> Vec<f64> {
    let mut seed = 3;
    let mut v = Vec::new();
    for d in 0..days {
        let onset = [70, 72, 68, 71, 69, 70][d % 6];
        for i in 0..100 {
            let surge = (onset..onset + 5).contains(&i);
            let spike = d == 1 && (30..33).contains(&i);
            v.push(
                match (surge, spike) {
                    (true, _) => 30.0,
                    (_, true) => 40.0,
                    _ => 10.0,
                } + noise(&mut seed),
            );
        }
    }
    v
}

#[test]
fn the_peak_covers_a_recurring_surge_at_its_phase_and_not_all_day() {
    let v = surging_days(5);
    let (h, margin) = (4, 2);
    let config = ForecastConfig {
        horizon: h,
        ..ForecastConfig::default()
    };
    let mut f = AutoForecaster::new(config).unwrap();
    let mut at = std::collections::BTreeMap::new();
    for (t, &x) in v.iter().enumerate() {
        f.update(x);
        // After the newest row of day 4 at phase `t % 100`: the bound over the next 4 rows.
        if t >= 400 {
            let path = f.forecast(h, 0.95);
            let old = path.iter().map(|s| s.upper).fold(f64::MIN, f64::max);
            at.insert(t % 100, (f.peak(&path, margin).unwrap(), old));
        }
    }
    // The surges' jitter can put the detected period a row or two off the true 100.
    let period = f.history().period().unwrap();
    assert!((98..=102).contains(&period), "{period}");
    // Rows 67..=70 come next: the surge that started at rows 68 to 72 is covered in time.
    let (before_surge, _) = at[&66];
    assert!(before_surge > 29.0, "{before_surge}");
    // Far from it, the bound is the level and its noise: the spike of day 1 came on one
    // day of three and does not count, and the surges no model foresaw (the errors four rows
    // ahead) are not added everywhere as the steps' upper bounds add them.
    for phase in [20, 28, 45] {
        let (peak, old) = at[&phase];
        assert!(peak < 12.0, "{phase}: {peak}");
        assert!(old > peak, "{phase}: {old} {peak}");
    }
    // A forecast without a period has no recurring peak: the level and its noise.
    let mut cold = AutoForecaster::new(config).unwrap();
    for &x in &v[..120] {
        cold.update(x);
    }
    assert_eq!(cold.history().recurring_peak(h, margin, 3), None);
    assert!(cold.peak(&[], margin).is_none());
    let path = cold.forecast(h, 0.95);
    let p = cold.peak(&path, margin).unwrap();
    assert!(p >= path[0].upper && p < 15.0, "{p}");
}
