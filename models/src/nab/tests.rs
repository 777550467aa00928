use super::*;

const STD: Profile = PROFILES[0];

fn labels() -> Labels {
    // 100 rows (probation: the first 15), one window on rows 60..=69 (width 10).
    Labels {
        rows: 100,
        windows: vec![(60, 69)],
    }
}

fn alarms_at(rows: &[usize]) -> Vec<bool> {
    let mut a = vec![false; 100];
    for &r in rows {
        a[r] = true;
    }
    a
}

fn close(a: f64, b: f64) {
    assert!((a - b).abs() < 1e-5, "{a} != {b}");
}

#[test]
fn sigma_matches_nab() {
    close(sigma(-1.0), 0.986614);
    close(sigma(0.0), 0.0);
    assert_eq!(sigma(3.5), -1.0);
}

#[test]
fn an_alarm_at_the_start_of_a_window_earns_the_full_weight() {
    close(score_file(&labels(), &alarms_at(&[60]), &STD), 1.0);
    // Only the best alarm of a window counts.
    close(score_file(&labels(), &alarms_at(&[60, 61, 69]), &STD), 1.0);
}

#[test]
fn a_late_alarm_earns_less() {
    // p = -1/10: sigma(-0.1) / sigma(-1) = 0.244919 / 0.986614
    close(score_file(&labels(), &alarms_at(&[69]), &STD), 0.248242);
    // p = -6/10
    close(score_file(&labels(), &alarms_at(&[64]), &STD), 0.917428);
}

#[test]
fn false_alarms_before_and_after_a_window() {
    // Before the first window: -fp, and the window is missed: -fn.
    close(score_file(&labels(), &alarms_at(&[20]), &STD), -0.11 - 1.0);
    // Just after: p = 6/9, fp * sigma(0.667) = 0.11 * -0.931110.
    close(
        score_file(&labels(), &alarms_at(&[60, 75]), &STD),
        1.0 - 0.102422,
    );
    // Far after (p > 3): the full -fp.
    close(
        score_file(&labels(), &alarms_at(&[60, 99]), &STD),
        1.0 - 0.11,
    );
    // reward_low_FN doubles the cost of a miss.
    close(
        score_file(&labels(), &alarms_at(&[20]), &PROFILES[2]),
        -0.11 - 2.0,
    );
}

#[test]
fn alarms_in_the_probationary_period_do_not_count() {
    close(score_file(&labels(), &alarms_at(&[3, 10, 14]), &STD), -1.0);
    close(score_file(&labels(), &alarms_at(&[15]), &STD), -0.11 - 1.0);
}

#[test]
fn the_corpus_threshold_is_chosen_to_maximise_the_score() {
    let mut scores = vec![0.0; 100];
    scores[30] = 0.95; // a false alarm before the window
    scores[62] = 0.9; // inside the window, p = -0.8
    let l = [labels()];
    let s = [scores];
    let r = score_corpus(&l, &s, &STD);
    // At 0.95 only the false alarm fires (worse than never alarming); at 0.9 both fire.
    assert_eq!(r.threshold, 0.9);
    close(r.raw, -0.11 + 0.977108);
    close(r.normalized, 100.0 * (r.raw + 1.0) / 2.0);
    let r = score_corpus(&l, &s, &PROFILES[1]);
    close(r.raw, -0.22 + 0.977108);
    // A detector that only raises false alarms is best left silent: normalised 0.
    let mut noise = vec![0.0; 100];
    noise[20] = 1.0;
    let r = score_corpus(&l, &[noise], &STD);
    assert_eq!(r.threshold, f64::INFINITY);
    close(r.normalized, 0.0);
    // A perfect detector scores 100.
    let mut perfect = vec![0.0; 100];
    perfect[60] = 1.0;
    close(score_corpus(&l, &[perfect], &STD).normalized, 100.0);
}

#[test]
fn a_left_out_category_is_scored_at_the_threshold_the_others_chose() {
    let with = |rows: &[(usize, f64)]| {
        let mut s = vec![0.0; 100];
        for &(r, x) in rows {
            s[r] = x;
        }
        s
    };
    let quiet = Labels {
        rows: 100,
        windows: vec![],
    };
    let names: Vec<String> = ["a/1.csv", "b/1.csv", "c/1.csv"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    let labels = [labels(), labels(), quiet];
    let scores = [
        with(&[(30, 0.95), (62, 0.9)]), // a false alarm, then the window (p = -0.8)
        with(&[(60, 0.5)]),             // the window at its start, weakly
        with(&[(50, 0.7)]),             // no windows: only a false alarm
    ];
    let out = leave_one_category_out(&names, &labels, &scores, &STD);
    let cats: Vec<&str> = out.iter().map(|l| l.category.as_str()).collect();
    assert_eq!(cats, ["a", "b", "c"]);
    // Without a, b's weak hit sets the threshold (0.5, past c's false alarm); at 0.5 a's
    // false alarm fires too.
    assert_eq!(out[0].threshold, 0.5);
    close(out[0].tally.raw, -0.11 + 0.977108);
    close(
        out[0].tally.normalized.unwrap(),
        100.0 * (out[0].tally.raw + 1.0) / 2.0,
    );
    assert_eq!((out[0].tally.detected, out[0].tally.false_alarms), (1, 1));
    // Without b, a's hit sets 0.9, at which b's window is missed.
    assert_eq!(out[1].threshold, 0.9);
    close(out[1].tally.raw, -1.0);
    close(out[1].tally.normalized.unwrap(), 0.0);
    assert_eq!((out[1].tally.detected, out[1].tally.false_alarms), (0, 0));
    // Without c, 0.5 again: c has no windows, so no normalised score, and one false alarm.
    assert_eq!(out[2].threshold, 0.5);
    close(out[2].tally.raw, -0.11);
    assert_eq!(out[2].tally.normalized, None);
    assert_eq!(out[2].tally.false_alarms, 1);
    // The mean is over the categories with windows.
    close(
        mean_left_out(&out).unwrap(),
        (out[0].tally.normalized.unwrap() + 0.0) / 2.0,
    );
    // At the pooled threshold (0.5), the categories' raw scores add up to score_corpus's.
    let pooled = score_corpus(&labels, &scores, &STD);
    assert_eq!(pooled.threshold, 0.5);
    close(out.iter().map(|l| l.pooled.raw).sum::<f64>(), pooled.raw);
    let t = tally(&labels, &scores, &STD, pooled.threshold);
    close(t.raw, pooled.raw);
    close(t.normalized.unwrap(), pooled.normalized);
}

#[test]
fn timestamps_and_windows_map_to_rows() {
    assert_eq!(
        parse_timestamp("2014-04-01 00:00:00"),
        Some(1_396_310_400.0)
    );
    assert_eq!(
        parse_timestamp("2014-04-01 00:00:00.500000"),
        Some(1_396_310_400.5)
    );
    assert_eq!(parse_timestamp("1969-12-31 23:59:59"), Some(-1.0));
    assert_eq!(parse_timestamp("yesterday"), None);
    let ts: Vec<String> = [
        "2014-01-01 00:00:00",
        "2014-01-01 00:05:00",
        "2014-01-01 00:10:00",
        "2014-01-01 00:05:00",
        "2014-01-01 00:20:00",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let w = window_rows(
        &ts,
        &[(
            "2014-01-01 00:05:00.000000".into(),
            "2014-01-01 00:10:00.000000".into(),
        )],
    )
    .unwrap();
    // A repeated timestamp further down still belongs to the window.
    assert_eq!(w, vec![(1, 3)]);
}

/// The NAB development corpus beside the repository, or `None` (with a message) without it.
fn dev_corpus() -> Option<Vec<NabFile>> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/data/nab-dev");
    if !root.exists() {
        eprintln!("skipping: {} is not here", root.display());
        return None;
    }
    Some(load_corpus(&root).unwrap())
}

#[test]
fn the_dev_corpus_loads_with_all_its_windows() {
    let Some(files) = dev_corpus() else { return };
    assert_eq!(files.len(), 34);
    assert_eq!(files.iter().map(|f| f.windows.len()).sum::<usize>(), 72);
    assert!(
        files
            .iter()
            .all(|f| f.values.len() == f.timestamps.len() && !f.values.is_empty())
    );
    assert!(
        files
            .iter()
            .flat_map(|f| f.windows.iter())
            .all(|(l, r)| l <= r)
    );
}

#[test]
fn the_detector_meets_its_targets_on_the_dev_corpus() {
    // The default detector's scores on the 34-file dev set (realKnownCause, realTweets,
    // realAdExchange and the artificial ones), one fresh detector per file: a change that
    // loses detection quality fails here, not only in `docs/BENCHMARKS.md`. Pinned in session
    // 19 with the novelty likelihood: 67.52 / 56.22 / 73.25 pooled (65.01 / 53.94 / 70.65
    // before it). The generalisation issue's targets on all 34 (standard ≥ 72,
    // reward-low-FP ≥ 62) are not met yet. Raise these floors as the detector improves.
    let Some(files) = dev_corpus() else { return };
    let params = crate::detector::DetectorParams::default();
    let scores: Vec<Vec<f64>> = files
        .iter()
        .map(|f| crate::detector::score_series(&f.values, &params))
        .collect();
    let labels: Vec<Labels> = files.iter().map(Labels::from).collect();
    let got: Vec<(&str, f64)> = PROFILES
        .iter()
        .map(|p| (p.name, score_corpus(&labels, &scores, p).normalized))
        .collect();
    for ((name, score), floor) in got.iter().zip([67.5, 56.2, 73.2]) {
        assert!(*score >= floor, "{name}: {score:.2} < {floor} ({got:?})");
    }
    // Leave one category out (68.64 when pinned, 67.31 before the novelty likelihood; the
    // issue's target is 68): the threshold chosen on four categories, scored on the fifth,
    // averaged over those with windows.
    let names: Vec<String> = files.iter().map(|f| f.name.clone()).collect();
    let left_out = leave_one_category_out(&names, &labels, &scores, &PROFILES[0]);
    assert_eq!(left_out.len(), 5);
    let mean = mean_left_out(&left_out).unwrap();
    assert!(mean >= 68.6, "left-out mean {mean:.2} ({left_out:?})");
}
