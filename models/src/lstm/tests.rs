use super::*;

fn small() -> LstmConfig {
    LstmConfig {
        features: 2,
        window: 24,
        horizon: 6,
        hidden: 16,
        batch: 16,
        train_every: 2,
        memory: 1024,
        learning_rate: 1e-2,
        seed: 7,
    }
}

/// Feature 0: a cycle of 24 rows with noise; feature 1: a phase signal that leads it.
fn rows(n: usize) -> Vec<[f64; 2]> {
    let mut seed = 3u64;
    (0..n)
        .map(|i| {
            let phase = i as f64 * std::f64::consts::TAU / 24.0;
            [
                50.0 + 10.0 * phase.sin() + 2.0 * (next(&mut seed) - 0.5),
                phase.cos(),
            ]
        })
        .collect()
}

#[test]
fn learns_a_pattern_better_than_the_naive_forecast() {
    let data = rows(1600);
    let mut f = LstmForecaster::new(small()).unwrap();
    let step = 6;
    let (mut lstm, mut naive, mut n) = (0.0, 0.0, 0.0);
    for (i, r) in data.iter().enumerate() {
        f.update(r).unwrap();
        if i >= 1300 && i + step < data.len() {
            let p = f.forecast().unwrap().unwrap();
            lstm += (p[step - 1].mean - data[i + step][0]).abs();
            naive += (r[0] - data[i + step][0]).abs();
            n += 1.0;
            assert!(p.iter().all(|p| p.std > 0.0 && p.std.is_finite()));
        }
    }
    let (lstm, naive) = (lstm / n, naive / n);
    assert!(lstm < 0.5 * naive, "LSTM MAE {lstm} vs naive {naive}");
}

#[test]
fn deterministic_and_checkpoints_continue_exactly() {
    let data = rows(400);
    let run = || {
        let mut f = LstmForecaster::new(small()).unwrap();
        for r in &data[..200] {
            f.update(r).unwrap();
        }
        f
    };
    let (mut a, b) = (run(), run());
    assert_eq!(
        a.forecast().unwrap(),
        b.forecast().unwrap(),
        "same seed, same model"
    );
    let bytes = a.checkpoint().unwrap();
    let mut restored = LstmForecaster::restore(&bytes).unwrap();
    assert_eq!(restored.forecast().unwrap(), a.forecast().unwrap());
    for r in &data[200..] {
        a.update(r).unwrap();
        restored.update(r).unwrap();
    }
    assert_eq!(
        restored.forecast().unwrap(),
        a.forecast().unwrap(),
        "continues exactly"
    );
    assert_eq!(restored.seen(), 400);
    for cut in [0, 10, bytes.len() / 3, bytes.len() - 1] {
        assert!(LstmForecaster::restore(&bytes[..cut]).is_err(), "cut {cut}");
    }
    // Another seed is another model.
    let mut other = LstmForecaster::new(LstmConfig { seed: 8, ..small() }).unwrap();
    for r in &data[..200] {
        other.update(r).unwrap();
    }
    assert_ne!(other.forecast().unwrap(), b.forecast().unwrap());
}

#[test]
fn bad_rows_and_configs_are_refused_and_gaps_repeat() {
    let mut f = LstmForecaster::new(small()).unwrap();
    assert!(f.update(&[1.0]).is_err());
    assert!(f.forecast().unwrap().is_none());
    for i in 0..30 {
        let x = if i == 10 { f64::NAN } else { i as f64 };
        f.update(&[x, 0.0]).unwrap();
    }
    let p = f.forecast().unwrap().unwrap();
    assert_eq!(p.len(), 6);
    assert!(p.iter().all(|p| p.mean.is_finite()));
    assert!(
        LstmForecaster::new(LstmConfig {
            window: 0,
            ..small()
        })
        .is_err()
    );
    assert!(
        LstmForecaster::new(LstmConfig {
            memory: 10,
            ..small()
        })
        .is_err()
    );
}

#[test]
fn plain_inference_matches_candle() {
    let mut f = LstmForecaster::new(small()).unwrap();
    for r in rows(120) {
        f.update(&r).unwrap();
    }
    let len = f.history.len();
    let input = f.inputs(&[len]).unwrap();
    let (mean, log_var) = f.forward(&input).unwrap();
    let candle: Vec<f32> = Tensor::cat(&[mean, log_var], 1)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    let window: Vec<f32> = input.flatten_all().unwrap().to_vec1().unwrap();
    let plain = f.plain.forward(&window);
    assert_eq!(plain.len(), candle.len());
    for (a, b) in plain.iter().zip(&candle) {
        // log-variances are clamped in the candle path only
        assert!(
            (a.clamp(-10.0, 10.0) - b).abs() < 1e-4,
            "{plain:?} vs {candle:?}"
        );
    }
}
