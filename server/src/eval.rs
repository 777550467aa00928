//! `forestall eval …`: offline evaluations of the models on benchmark data.

use std::fmt::Write as _;
use std::io::Write as _;
use std::path::Path;
use std::time::Instant;

use anyhow::Context;
use forestall_models::detector::{DetectorParams, score_series};
use forestall_models::forecast::ForecastConfig;
use forestall_models::forecast::evaluation::{Accuracy, Input, LEVELS, evaluate_fleet_with};
use forestall_models::global::{GlobalLstm, kind_of};
use forestall_models::nab::{self, Labels, PROFILES};

/// Runs a fresh detector over every file of a NAB-layout folder, writes
/// `OUT/<category>/<file>.csv` (`timestamp,value,anomaly_score`, same rows, same order) and
/// returns the report: the score under each NAB profile.
pub fn nab(data: &Path, out: &Path) -> anyhow::Result<String> {
    nab_with_progress(data, out, |_, _| {})
}

/// [`nab`], telling `progress` (files done, files) after each file.
pub fn nab_with_progress(
    data: &Path,
    out: &Path,
    mut progress: impl FnMut(usize, usize),
) -> anyhow::Result<String> {
    let files = nab::load_corpus(data)
        .with_context(|| format!("load the NAB corpus in {}", data.display()))?;
    anyhow::ensure!(
        !files.is_empty(),
        "no data/<category>/<file>.csv under {}",
        data.display()
    );
    let params = DetectorParams::default();
    let started = Instant::now();
    let mut labels = Vec::with_capacity(files.len());
    let mut scores = Vec::with_capacity(files.len());
    for f in &files {
        let s = score_series(&f.values, &params);
        let path = out.join(&f.name);
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
        }
        let mut w = std::io::BufWriter::new(
            std::fs::File::create(&path).with_context(|| format!("create {}", path.display()))?,
        );
        writeln!(w, "timestamp,value,anomaly_score")?;
        for ((t, v), s) in f.timestamps.iter().zip(&f.values).zip(&s) {
            writeln!(w, "{t},{v},{s}")?;
        }
        w.flush()?;
        labels.push(Labels::from(f));
        scores.push(s);
        progress(scores.len(), files.len());
    }
    let elapsed = started.elapsed();
    let rows: usize = files.iter().map(|f| f.values.len()).sum();
    let windows: usize = labels.iter().map(|l| l.windows.len()).sum();
    let mut report = format!(
        "NAB: {} files, {rows} rows, {windows} windows, scored in {:.2} s\n",
        files.len(),
        elapsed.as_secs_f64()
    );
    let names: Vec<String> = files.iter().map(|f| f.name.clone()).collect();
    let pooled: Vec<_> = PROFILES
        .iter()
        .map(|p| nab::score_corpus(&labels, &scores, p))
        .collect();
    let left_out: Vec<_> = PROFILES
        .iter()
        .map(|p| nab::leave_one_category_out(&names, &labels, &scores, p))
        .collect();
    writeln!(
        report,
        "{:<14} {:>7} {:>14}   pooled threshold",
        "profile", "pooled", "left-out mean"
    )?;
    for (r, l) in pooled.iter().zip(&left_out) {
        let mean = nab::mean_left_out(l).map_or("-".into(), |m| format!("{m:.2}"));
        writeln!(
            report,
            "{:<14} {:>7.2} {mean:>14}   {:.6}",
            r.profile, r.normalized, r.threshold
        )?;
    }
    // Per category, at the pooled threshold and at the one the other categories chose.
    let cell = |t: &nab::Tally| {
        format!(
            "{:>6} {:>3}/{:<3} {:>5}",
            t.normalized.map_or("-".into(), |n| format!("{n:.2}")),
            t.detected,
            t.windows,
            t.false_alarms
        )
    };
    for (p, l) in PROFILES.iter().zip(&left_out) {
        writeln!(
            report,
            "\n{}: per category, at the pooled threshold and left out (at the threshold the \
             other categories chose)",
            p.name
        )?;
        writeln!(
            report,
            "{:<22} {:>5}  {:>6} {:>7} {:>5}  {:>9} {:>6} {:>7} {:>5}",
            "category", "files", "pooled", "found", "false", "threshold", "score", "found", "false"
        )?;
        for c in l {
            writeln!(
                report,
                "{:<22} {:>5}  {}  {:>9.6} {}",
                c.category,
                c.files,
                cell(&c.pooled),
                c.threshold,
                cell(&c.tally)
            )?;
        }
    }
    Ok(report)
}

/// Steps ahead `eval forecast` scores.
const FORECAST_STEPS: [usize; 2] = [1, 12];

/// Streams every file of a NAB-layout folder through a fresh forecaster and returns the
/// report: per file and overall, MASE and 80/90/95% interval coverage at 1 and 12 steps
/// ahead, for every model and for the automatic choice. Rows before NAB's probationary end
/// (`min(15% of rows, 750)`) only train. With `global`, that global LSTM (fresh or already
/// trained) serves every file (row r of each in round r; its kind from the category's name,
/// [`kind_of`]) and competes in each file's automatic choice; the report ends with what it
/// cost, and the model comes back, trained further by its budget.
pub fn forecast(
    data: &Path,
    config: ForecastConfig,
    global: Option<GlobalLstm>,
) -> anyhow::Result<(String, Option<GlobalLstm>)> {
    let files =
        nab::load_corpus(data).with_context(|| format!("load the corpus in {}", data.display()))?;
    anyhow::ensure!(
        !files.is_empty(),
        "no data/<category>/<file>.csv under {}",
        data.display()
    );
    let started = Instant::now();
    let mut report = String::new();
    let header = |r: &mut String| {
        writeln!(
            r,
            "{:<16} {:>8} {:>8} {:>7} {:>7} {:>7} {:>7} {:>7} {:>7}",
            "forecaster",
            "MASE@1",
            "MASE@12",
            "c80@1",
            "c90@1",
            "c95@1",
            "c80@12",
            "c90@12",
            "c95@12"
        )
    };
    let row = |r: &mut String, name: &str, mase: [f64; 2], acc: &[Accuracy]| {
        let c = |s: usize, l: usize| 100.0 * acc[s].coverage(l);
        writeln!(
            r,
            "{name:<16} {:>8.3} {:>8.3} {:>6.1}% {:>6.1}% {:>6.1}% {:>6.1}% {:>6.1}% {:>6.1}%",
            mase[0],
            mase[1],
            c(0, 0),
            c(0, 1),
            c(0, 2),
            c(1, 0),
            c(1, 1),
            c(1, 2)
        )
    };
    let mut names = Vec::new();
    let mut pooled: Vec<Vec<Accuracy>> = Vec::new();
    let mut mase_sum: Vec<[f64; 2]> = Vec::new();
    let (mut scaled_files, mut rows, mut auto_wins) = (0usize, 0usize, 0usize);
    let times: Vec<Vec<f64>> = files.iter().map(nab::NabFile::times).collect();
    let inputs: Vec<Input<'_>> = files
        .iter()
        .zip(&times)
        .map(|(f, times)| Input {
            values: &f.values,
            times,
            kind: kind_of(nab::category(&f.name)),
            warmup: (f.values.len() * 15 / 100).min(750),
        })
        .collect();
    let (evals, cost, global) = evaluate_fleet_with(&inputs, config, global, &FORECAST_STEPS)?;
    for (f, e) in files.iter().zip(evals) {
        rows += f.values.len();
        if names.is_empty() {
            names = e.forecasters.clone();
            pooled = vec![vec![Accuracy::default(); FORECAST_STEPS.len()]; names.len()];
            mase_sum = vec![[0.0; 2]; names.len()];
        }
        writeln!(report, "{}  (MASE scale {:.4})", f.name, e.scale)?;
        header(&mut report)?;
        let scaled = e.scale > 0.0;
        scaled_files += usize::from(scaled);
        for (m, acc) in e.accuracy.iter().enumerate() {
            let mase = [acc[0].mase(e.scale), acc[1].mase(e.scale)];
            row(&mut report, e.forecasters[m], mase, acc)?;
            for (p, a) in pooled[m].iter_mut().zip(acc) {
                p.merge(a);
            }
            if scaled {
                mase_sum[m][0] += mase[0];
                mase_sum[m][1] += mase[1];
            }
        }
        // The automatic choice against seasonal naive (model 0) at the longest step.
        let auto = e.accuracy.len() - 1;
        if e.accuracy[auto][1].abs_error < e.accuracy[0][1].abs_error {
            auto_wins += 1;
        }
        report.push('\n');
    }
    let elapsed = started.elapsed();
    writeln!(
        report,
        "overall: {} files, {rows} rows, evaluated in {:.2} s; MASE averaged over the {scaled_files} files that vary, coverage pooled over every forecast",
        files.len(),
        elapsed.as_secs_f64()
    )?;
    header(&mut report)?;
    for (m, name) in names.iter().enumerate() {
        let n = scaled_files.max(1) as f64;
        row(
            &mut report,
            name,
            [mase_sum[m][0] / n, mase_sum[m][1] / n],
            &pooled[m],
        )?;
    }
    writeln!(
        report,
        "auto has lower MASE@12 than seasonal_naive on {auto_wins} of {} files ({:.0}%)",
        files.len(),
        100.0 * auto_wins as f64 / files.len() as f64
    )?;
    if let Some(c) = cost {
        let rounds = c.stats.rounds.max(1) as f64;
        writeln!(
            report,
            "global_lstm: {} series, {} rounds, {} training steps, loss {}; CPU in training \
             {:.2} s ({:.2} ms a round), in inference {:.2} s ({:.2} ms a round, {:.1} us a \
             series)",
            c.stats.series,
            c.stats.rounds,
            c.stats.steps,
            c.stats.loss.map_or("-".into(), |l| format!("{l:.4}")),
            c.train.as_secs_f64(),
            1e3 * c.train.as_secs_f64() / rounds,
            c.infer.as_secs_f64(),
            1e3 * c.infer.as_secs_f64() / rounds,
            1e6 * c.infer.as_secs_f64() / rounds / c.stats.series.max(1) as f64,
        )?;
    }
    debug_assert_eq!(LEVELS.len(), 3);
    Ok((report, global))
}

#[cfg(test)]
mod tests {
    use super::*;
    use forestall_models::global::GlobalConfig;

    #[test]
    fn writes_one_scored_csv_per_file_with_the_same_rows() {
        let data = tempfile::tempdir().unwrap();
        let out = tempfile::tempdir().unwrap();
        let cat = data.path().join("data/cat");
        std::fs::create_dir_all(&cat).unwrap();
        let mut csv = String::from("timestamp,value\n");
        for i in 0..500 {
            // A duplicate timestamp stays where it is: rows are scored by position.
            let minute = if i == 10 { 9 } else { i };
            csv.push_str(&format!(
                "2014-01-01 {:02}:{:02}:00,{}\n",
                minute / 60,
                minute % 60,
                if i == 400 { 100.0 } else { 1.0 }
            ));
        }
        std::fs::write(cat.join("f.csv"), &csv).unwrap();
        std::fs::write(
            data.path().join("windows.json"),
            r#"{"cat/f.csv": [["2014-01-01 06:35:00.000000", "2014-01-01 06:50:00.000000"]]}"#,
        )
        .unwrap();
        let report = nab(data.path(), out.path()).unwrap();
        assert!(report.contains("1 files, 500 rows, 1 windows"), "{report}");
        assert!(
            report.contains("standard") && report.contains("reward_low_FN"),
            "{report}"
        );
        // The one category, left out, has no other to choose its threshold: nothing alarms.
        assert!(report.contains("left-out mean"), "{report}");
        let line = report.lines().find(|l| l.starts_with("cat ")).unwrap();
        assert!(
            line.trim_end().ends_with("inf   0.00   0/1       0"),
            "{line}"
        );
        let written = std::fs::read_to_string(out.path().join("cat/f.csv")).unwrap();
        let lines: Vec<&str> = written.lines().collect();
        assert_eq!(lines.len(), 501);
        assert_eq!(lines[0], "timestamp,value,anomaly_score");
        assert!(
            lines[11].starts_with("2014-01-01 00:09:00,1,"),
            "{}",
            lines[11]
        );
        let score: f64 = lines[401].rsplit(',').next().unwrap().parse().unwrap();
        assert!((0.0..=1.0).contains(&score));
    }

    #[test]
    fn forecast_report_covers_every_file_and_forecaster() {
        let data = tempfile::tempdir().unwrap();
        let cat = data.path().join("data/cat");
        std::fs::create_dir_all(&cat).unwrap();
        for (name, period) in [("a.csv", 24.0), ("b.csv", 36.0)] {
            let mut csv = String::from("timestamp,value\n");
            for i in 0..1500 {
                let v = 10.0 + (i as f64 * std::f64::consts::TAU / period).sin();
                csv.push_str(&format!("2014-01-01 00:00:00,{v}\n"));
            }
            std::fs::write(cat.join(name), csv).unwrap();
        }
        let (report, _) = forecast(data.path(), ForecastConfig::default(), None).unwrap();
        for needle in [
            "cat/a.csv",
            "cat/b.csv",
            "seasonal_naive",
            "ets_smooth",
            "overall: 2 files, 3000 rows",
            "seasonal_naive on",
        ] {
            assert!(report.contains(needle), "{needle} missing from\n{report}");
        }
        assert!(!report.contains("lstm"));
        let with_lstm = ForecastConfig {
            lstm_train_every: 64,
            ..ForecastConfig::default()
        };
        let (report, _) = forecast(data.path(), with_lstm, None).unwrap();
        assert!(report.contains("lstm"), "{report}");
        let global = GlobalConfig {
            window: 24,
            hidden: 8,
            batch: 8,
            ..GlobalConfig::default()
        };
        let model = GlobalLstm::new(global).unwrap();
        let (report, model) =
            forecast(data.path(), ForecastConfig::default(), Some(model)).unwrap();
        assert!(report.contains("global_lstm "), "{report}");
        assert!(
            report.contains("global_lstm: 2 series, 1500 rounds, 1465 training steps"),
            "{report}"
        );
        // The trained model comes back; from its weights, a second pass carries on (its
        // record continues) and, with no training budget, only infers.
        let mut again = GlobalLstm::new(GlobalConfig {
            steps_per_round: 0,
            ..global
        })
        .unwrap();
        again
            .resume_weights(&model.unwrap().weights().unwrap())
            .unwrap();
        let (report, _) = forecast(data.path(), ForecastConfig::default(), Some(again)).unwrap();
        assert!(
            report.contains("global_lstm: 2 series, 3000 rounds, 1465 training steps"),
            "{report}"
        );
        assert!(
            forecast(
                &data.path().join("missing"),
                ForecastConfig::default(),
                None
            )
            .is_err()
        );
    }
}
