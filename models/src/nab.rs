//! The Numenta Anomaly Benchmark: reading its data layout and scoring detectors by its rules.
//!
//! Layout: `data/<category>/<file>.csv` with `timestamp,value` rows, and `windows.json` mapping
//! `"<category>/<file>.csv"` to labelled anomaly windows `[[start, end], ...]`. Rows are scored
//! by position (timestamps may repeat or go backwards), one score per row, in file order.
//!
//! Scoring, per file of `n` rows:
//! * the first `min(floor(0.15 n), 750)` rows are probationary: alarms there do not count;
//! * an alarm inside a window `[L, R]` (width `w`) at row `i` earns
//!   `tp × σ(−(R − i + 1)/w) / σ(−1)`, where `σ(x) = 2/(1 + e^{5x}) − 1`; only the best alarm of
//!   a window counts, and a window without one costs `fn`;
//! * an alarm outside every window costs `fp` before the first window, and
//!   `fp × σ(|i − R'|/(w' − 1))` after a window ending at `R'` of width `w'` (σ clamped to −1
//!   beyond 3), so a late alarm just after a window is cheap;
//! * one threshold is chosen for the whole corpus per profile (the one maximising the summed
//!   score), and the sum is normalised to `100 × (S − S_null)/(tp × #windows − S_null)`, where
//!   `S_null = −fn × #windows` is the score of a detector that never alarms.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::{Error, Result};

/// Weights of a scoring profile.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Profile {
    pub name: &'static str,
    pub tp: f64,
    pub fp: f64,
    pub fn_: f64,
}

/// NAB's three profiles.
pub const PROFILES: [Profile; 3] = [
    Profile {
        name: "standard",
        tp: 1.0,
        fp: 0.11,
        fn_: 1.0,
    },
    Profile {
        name: "reward_low_FP",
        tp: 1.0,
        fp: 0.22,
        fn_: 1.0,
    },
    Profile {
        name: "reward_low_FN",
        tp: 1.0,
        fp: 0.11,
        fn_: 2.0,
    },
];

/// NAB's scaled sigmoid.
pub fn sigma(x: f64) -> f64 {
    if x > 3.0 {
        -1.0
    } else {
        2.0 / (1.0 + (5.0 * x).exp()) - 1.0
    }
}

/// One data file of the corpus.
#[derive(Debug, Clone)]
pub struct NabFile {
    /// `<category>/<file>.csv`
    pub name: String,
    pub timestamps: Vec<String>,
    pub values: Vec<f64>,
    /// Labelled windows as inclusive row ranges.
    pub windows: Vec<(usize, usize)>,
}

impl NabFile {
    /// Each row's time in seconds since the epoch ([`parse_timestamp`]; NaN where it does
    /// not parse).
    pub fn times(&self) -> Vec<f64> {
        self.timestamps
            .iter()
            .map(|t| parse_timestamp(t).unwrap_or(f64::NAN))
            .collect()
    }
}

/// Reads every `data/*/*.csv` under `root` (sorted by name) with its windows.
pub fn load_corpus(root: &Path) -> Result<Vec<NabFile>> {
    let windows: BTreeMap<String, Vec<(String, String)>> =
        match std::fs::read(root.join("windows.json")) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| Error::Data {
                path: root.join("windows.json"),
                reason: e.to_string(),
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => BTreeMap::new(),
            Err(e) => {
                return Err(Error::Data {
                    path: root.join("windows.json"),
                    reason: e.to_string(),
                });
            }
        };
    let data = root.join("data");
    let mut files = Vec::new();
    let read_dir = |p: &Path| -> Result<Vec<PathBuf>> {
        let mut v: Vec<PathBuf> = std::fs::read_dir(p)
            .map_err(|e| Error::Data {
                path: p.to_path_buf(),
                reason: e.to_string(),
            })?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .collect();
        v.sort();
        Ok(v)
    };
    for category in read_dir(&data)?.into_iter().filter(|p| p.is_dir()) {
        for path in read_dir(&category)?
            .into_iter()
            .filter(|p| p.extension().is_some_and(|e| e == "csv"))
        {
            let cat = category
                .file_name()
                .and_then(|s| s.to_str())
                .unwrap_or_default();
            let file = path
                .file_name()
                .and_then(|s| s.to_str())
                .unwrap_or_default();
            let name = format!("{cat}/{file}");
            let (timestamps, values) = read_csv(&path)?;
            let spans = windows.get(&name).cloned().unwrap_or_default();
            let windows = window_rows(&timestamps, &spans).map_err(|reason| Error::Data {
                path: path.clone(),
                reason,
            })?;
            files.push(NabFile {
                name,
                timestamps,
                values,
                windows,
            });
        }
    }
    Ok(files)
}

/// Reads a `timestamp,value` CSV (with a header row).
pub fn read_csv(path: &Path) -> Result<(Vec<String>, Vec<f64>)> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::Data {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })?;
    let mut ts = Vec::new();
    let mut values = Vec::new();
    for (i, line) in text.lines().enumerate().skip(1) {
        if line.trim().is_empty() {
            continue;
        }
        let bad = |reason: String| Error::Data {
            path: path.to_path_buf(),
            reason: format!("line {}: {reason}", i + 1),
        };
        let (t, v) = line
            .split_once(',')
            .ok_or_else(|| bad("expected timestamp,value".into()))?;
        let v: f64 = v
            .trim()
            .parse()
            .map_err(|_| bad(format!("invalid value {v:?}")))?;
        ts.push(t.trim().to_string());
        values.push(v);
    }
    Ok((ts, values))
}

/// Seconds since the epoch (as f64, with fractions) of `YYYY-MM-DD HH:MM:SS[.ffffff]`.
pub fn parse_timestamp(s: &str) -> Option<f64> {
    let s = s.trim();
    let (date, time) = s.split_once([' ', 'T'])?;
    let mut d = date.split('-').map(|p| p.parse::<i64>().ok());
    let (y, m, day) = (d.next()??, d.next()??, d.next()??);
    let mut t = time.split(':');
    let (hh, mm) = (
        t.next()?.parse::<i64>().ok()?,
        t.next()?.parse::<i64>().ok()?,
    );
    let ss: f64 = t.next().unwrap_or("0").parse().ok()?;
    // Days from civil (Howard Hinnant's algorithm).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some((days * 86_400 + hh * 3600 + mm * 60) as f64 + ss)
}

/// Maps windows given as timestamps to inclusive row ranges: from the first to the last row
/// whose timestamp lies in the window.
fn window_rows(
    timestamps: &[String],
    spans: &[(String, String)],
) -> Result<Vec<(usize, usize)>, String> {
    let times: Vec<Option<f64>> = timestamps.iter().map(|t| parse_timestamp(t)).collect();
    let mut out = Vec::new();
    for (start, end) in spans {
        let (s, e) = (
            parse_timestamp(start).ok_or_else(|| format!("bad window start {start:?}"))?,
            parse_timestamp(end).ok_or_else(|| format!("bad window end {end:?}"))?,
        );
        let inside: Vec<usize> = times
            .iter()
            .enumerate()
            .filter(|(_, t)| t.is_some_and(|t| t >= s && t <= e))
            .map(|(i, _)| i)
            .collect();
        if let (Some(&l), Some(&r)) = (inside.first(), inside.last()) {
            out.push((l, r));
        }
    }
    out.sort_unstable();
    Ok(out)
}

/// A file's labels in the form the scorer needs.
#[derive(Debug, Clone)]
pub struct Labels {
    pub rows: usize,
    pub windows: Vec<(usize, usize)>,
}

impl From<&NabFile> for Labels {
    fn from(f: &NabFile) -> Self {
        Self {
            rows: f.values.len(),
            windows: f.windows.clone(),
        }
    }
}

/// Where an alarm at a row would land and what it would earn.
#[derive(Debug, Clone, Copy)]
enum Slot {
    Window(usize, f64),
    Outside(f64),
}

fn probation(rows: usize) -> usize {
    (rows * 15 / 100).min(750)
}

/// The slot of every scorable row (rows in the probationary period have none).
fn slots(labels: &Labels, p: &Profile) -> Vec<Option<Slot>> {
    let prob = probation(labels.rows);
    (0..labels.rows)
        .map(|i| {
            if i < prob {
                return None;
            }
            if let Some((k, &(l, r))) = labels
                .windows
                .iter()
                .enumerate()
                .find(|(_, (l, r))| i >= *l && i <= *r)
            {
                let w = (r - l + 1) as f64;
                let pos = -((r - i + 1) as f64) / w;
                return Some(Slot::Window(k, p.tp * sigma(pos) / sigma(-1.0)));
            }
            let before = labels
                .windows
                .iter()
                .filter(|(_, r)| *r < i)
                .max_by_key(|(_, r)| *r);
            Some(Slot::Outside(match before {
                None => -p.fp,
                Some(&(l, r)) => {
                    let w = (r - l + 1) as f64;
                    let pos = if w > 1.0 {
                        (i - r) as f64 / (w - 1.0)
                    } else {
                        f64::INFINITY
                    };
                    p.fp * sigma(pos)
                }
            }))
        })
        .collect()
}

/// A file's raw score with alarms at the rows where `alarm` is true.
pub fn score_file(labels: &Labels, alarms: &[bool], p: &Profile) -> f64 {
    file_tally(labels, alarms, p).raw
}

/// What a file's alarms earn and how they land.
fn file_tally(labels: &Labels, alarms: &[bool], p: &Profile) -> Tally {
    let mut best: Vec<Option<f64>> = vec![None; labels.windows.len()];
    let (mut total, mut false_alarms) = (0.0, 0);
    for (slot, _) in slots(labels, p)
        .into_iter()
        .zip(alarms)
        .filter(|(_, a)| **a)
    {
        match slot {
            Some(Slot::Outside(w)) => {
                total += w;
                false_alarms += 1;
            }
            Some(Slot::Window(k, w)) => best[k] = Some(best[k].map_or(w, |b: f64| b.max(w))),
            None => {}
        }
    }
    Tally {
        raw: total + best.iter().map(|b| b.unwrap_or(-p.fn_)).sum::<f64>(),
        normalized: None,
        windows: labels.windows.len(),
        detected: best.iter().flatten().count(),
        false_alarms,
    }
}

/// `100 × (S − S_null)/(tp × #windows − S_null)`; `None` without windows, where a detector
/// can only lose (by its false alarms) and there is nothing to normalise by.
fn normalize(raw: f64, windows: usize, p: &Profile) -> Option<f64> {
    let null = -p.fn_ * windows as f64;
    let perfect = p.tp * windows as f64;
    (perfect - null > 0.0).then(|| 100.0 * (raw - null) / (perfect - null))
}

/// What alarms at one threshold earn on a corpus, and how they land.
#[derive(Debug, Clone, PartialEq)]
pub struct Tally {
    pub raw: f64,
    /// The normalised score; `None` for files without windows.
    pub normalized: Option<f64>,
    pub windows: usize,
    /// Windows with at least one alarm inside.
    pub detected: usize,
    /// Alarms outside every window, after the probationary period (each row counts, as in
    /// NAB).
    pub false_alarms: usize,
}

/// Scores detector outputs (`scores[f][row]`) against labels at a given threshold: rows
/// scoring at least `threshold` are alarms.
pub fn tally(labels: &[Labels], scores: &[Vec<f64>], p: &Profile, threshold: f64) -> Tally {
    let mut sum = Tally {
        raw: 0.0,
        normalized: None,
        windows: 0,
        detected: 0,
        false_alarms: 0,
    };
    for (l, s) in labels.iter().zip(scores) {
        let alarms: Vec<bool> = s.iter().map(|&x| x >= threshold).collect();
        let t = file_tally(l, &alarms, p);
        sum.raw += t.raw;
        sum.windows += t.windows;
        sum.detected += t.detected;
        sum.false_alarms += t.false_alarms;
    }
    sum.normalized = normalize(sum.raw, sum.windows, p);
    sum
}

/// A file's category: its name up to the first `/`.
pub fn category(name: &str) -> &str {
    name.split_once('/').map_or(name, |(c, _)| c)
}

/// One category scored at the threshold chosen on every other one, and at the pooled one.
#[derive(Debug, Clone, PartialEq)]
pub struct LeftOut {
    pub category: String,
    pub files: usize,
    /// The threshold the other categories chose.
    pub threshold: f64,
    /// The category's score at [`LeftOut::threshold`].
    pub tally: Tally,
    /// Its score at the threshold the whole corpus chose.
    pub pooled: Tally,
}

/// Leave-one-category-out: for each category of `names` (in order of first appearance),
/// chooses the threshold on the files of every other category, as [`score_corpus`] does, and
/// scores the category's own files at it (and at the pooled threshold, for comparison). A
/// detector whose threshold carries to series of a kind it was not chosen on scores about as
/// well here as pooled.
pub fn leave_one_category_out(
    names: &[String],
    labels: &[Labels],
    scores: &[Vec<f64>],
    p: &Profile,
) -> Vec<LeftOut> {
    let mut categories: Vec<&str> = Vec::new();
    for n in names {
        if !categories.contains(&category(n)) {
            categories.push(category(n));
        }
    }
    let split = |keep: &dyn Fn(&str) -> bool| -> (Vec<Labels>, Vec<Vec<f64>>) {
        names
            .iter()
            .zip(labels.iter().zip(scores))
            .filter(|(n, _)| keep(category(n)))
            .map(|(_, (l, s))| (l.clone(), s.clone()))
            .unzip()
    };
    let pooled = score_corpus(labels, scores, p).threshold;
    categories
        .into_iter()
        .map(|c| {
            let (rest_labels, rest_scores) = split(&|other| other != c);
            let threshold = score_corpus(&rest_labels, &rest_scores, p).threshold;
            let (own_labels, own_scores) = split(&|other| other == c);
            LeftOut {
                category: c.to_string(),
                files: own_labels.len(),
                threshold,
                tally: tally(&own_labels, &own_scores, p, threshold),
                pooled: tally(&own_labels, &own_scores, p, pooled),
            }
        })
        .collect()
}

/// The mean normalised score of the left-out categories that have windows.
pub fn mean_left_out(left_out: &[LeftOut]) -> Option<f64> {
    let scored: Vec<f64> = left_out.iter().filter_map(|l| l.tally.normalized).collect();
    (!scored.is_empty()).then(|| scored.iter().sum::<f64>() / scored.len() as f64)
}

/// The result of scoring a corpus under one profile.
#[derive(Debug, Clone, PartialEq)]
pub struct CorpusScore {
    pub profile: &'static str,
    /// The threshold that maximised the score (`f64::INFINITY`: never alarm).
    pub threshold: f64,
    pub raw: f64,
    pub normalized: f64,
}

/// Scores detector outputs (`scores[f][row]`) against labels, choosing the best threshold.
pub fn score_corpus(labels: &[Labels], scores: &[Vec<f64>], p: &Profile) -> CorpusScore {
    let windows: usize = labels.iter().map(|l| l.windows.len()).sum();
    let null = -p.fn_ * windows as f64;
    // Every scorable row as a candidate alarm, best score first; lowering the threshold
    // past a row turns it into an alarm, and the corpus score changes incrementally.
    let mut candidates: Vec<(f64, Slot)> = Vec::new();
    // Windows are numbered across the corpus.
    let mut offset = 0;
    for (l, s) in labels.iter().zip(scores) {
        for (slot, &score) in slots(l, p).into_iter().zip(s) {
            match slot {
                Some(Slot::Window(k, w)) => candidates.push((score, Slot::Window(offset + k, w))),
                Some(outside) => candidates.push((score, outside)),
                None => {}
            }
        }
        offset += l.windows.len();
    }
    candidates.sort_by(|a, b| b.0.total_cmp(&a.0));
    let mut best_window: Vec<Option<f64>> = vec![None; windows];
    let mut total = null;
    let (mut best_total, mut best_threshold) = (null, f64::INFINITY);
    let mut i = 0;
    while i < candidates.len() {
        let threshold = candidates[i].0;
        while i < candidates.len() && candidates[i].0 == threshold {
            match candidates[i].1 {
                Slot::Outside(w) => total += w,
                Slot::Window(k, w) => {
                    let old = best_window[k].unwrap_or(-p.fn_);
                    let new = best_window[k].map_or(w, |b| b.max(w));
                    best_window[k] = Some(new);
                    total += new - old;
                }
            }
            i += 1;
        }
        if total > best_total + 1e-12 {
            best_total = total;
            best_threshold = threshold;
        }
    }
    let normalized = normalize(best_total, windows, p).unwrap_or(0.0);
    CorpusScore {
        profile: p.name,
        threshold: best_threshold,
        raw: best_total,
        normalized,
    }
}

#[cfg(test)]
mod tests;
