//! `forestall eval …`: offline evaluations of the models on benchmark data.

use std::fmt::Write as _;
use std::io::Write as _;
use std::path::Path;
use std::time::Instant;

use anyhow::Context;
use forestall_models::detector::{DetectorParams, score_series};
use forestall_models::nab::{self, Labels, PROFILES};

/// Runs a fresh detector over every file of a NAB-layout folder, writes
/// `OUT/<category>/<file>.csv` (`timestamp,value,anomaly_score`, same rows, same order) and
/// returns the report: the score under each NAB profile.
pub fn nab(data: &Path, out: &Path) -> anyhow::Result<String> {
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
    }
    let elapsed = started.elapsed();
    let rows: usize = files.iter().map(|f| f.values.len()).sum();
    let windows: usize = labels.iter().map(|l| l.windows.len()).sum();
    let mut report = format!(
        "NAB: {} files, {rows} rows, {windows} windows, scored in {:.2} s\n",
        files.len(),
        elapsed.as_secs_f64()
    );
    for p in &PROFILES {
        let r = nab::score_corpus(&labels, &scores, p);
        writeln!(
            report,
            "{:<14} {:>7.2}   (threshold {:.6})",
            r.profile, r.normalized, r.threshold
        )?;
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
