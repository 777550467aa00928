//! Streaming multi-step forecasters, their tracked errors, and the automatic choice.
//!
//! An [`AutoForecaster`] follows one series. Every value it is given updates a shared
//! [`History`] (a bounded window with the detected seasonal period) and every [`Model`]:
//! seasonal naive and two Holt-Winters (ETS(A,Ad,A)) variants. Beside each model it keeps
//! the forecasts it made for the next `horizon` steps; when their actual values arrive, the
//! signed errors go into a sorted window per step ahead. That window gives two things:
//! * the **prediction interval**: the empirical quantiles of the recent errors at that step
//!   (a split-conformal interval, so coverage holds whatever the error distribution);
//! * the **rolling error** (an exponentially weighted mean absolute error per step ahead), by
//!   which the best model answers each step of a forecast.
//!
//! A new series is never left without a forecast: from its first value the answer is the
//! naive one, with an interval from the series' own step-to-step variation until enough
//! errors are known. Every update is O(models × horizon × log window); nothing looks ahead.
//! The whole state round-trips through [`AutoForecaster::checkpoint`] exactly.

use std::collections::VecDeque;

pub mod evaluation;

use crate::codec::{Reader, Writer};
use crate::{Error, Result};

/// Settings of an [`AutoForecaster`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ForecastConfig {
    /// Steps ahead whose errors are tracked. Longer forecasts reuse the last step's errors,
    /// widened by √(h / horizon).
    pub horizon: usize,
    /// Longest seasonal period looked for, in rows.
    pub max_period: usize,
    /// Recent errors kept per model and step ahead (interval quantiles come from them).
    pub error_window: usize,
    /// Smoothing of the rolling absolute error that picks the answering model.
    pub choice_alpha: f64,
    /// Run a small LSTM ([`crate::lstm`]: a 32-row window, 16 hidden units) beside the other
    /// models, taking one training step every this many rows: its CPU budget. 0 (the
    /// default) runs no LSTM.
    pub lstm_train_every: usize,
    /// Keep a slot for a [`crate::global::GlobalLstm`] serving many series: its forecasts
    /// are handed in by [`AutoForecaster::supply`] after each value, and compete with the
    /// other models' like theirs.
    pub global: bool,
}

impl Default for ForecastConfig {
    fn default() -> Self {
        Self {
            horizon: 12,
            max_period: 1008,
            error_window: 256,
            choice_alpha: 0.02,
            lstm_train_every: 0,
            global: false,
        }
    }
}

impl ForecastConfig {
    pub fn validate(&self) -> Result<()> {
        let bad = |reason: &str| {
            Err(Error::Config {
                reason: reason.into(),
            })
        };
        if !(1..=10_000).contains(&self.horizon) {
            return bad("horizon must be between 1 and 10000");
        }
        if !(4..=100_000).contains(&self.max_period) {
            return bad("max_period must be between 4 and 100000");
        }
        if !(16..=100_000).contains(&self.error_window) {
            return bad("error_window must be between 16 and 100000");
        }
        if !(self.choice_alpha > 0.0 && self.choice_alpha <= 1.0) {
            return bad("choice_alpha must be in (0, 1]");
        }
        if self.lstm_train_every > 1_000_000 {
            return bad("lstm_train_every must be at most 1000000 (0 for no LSTM)");
        }
        Ok(())
    }
}

/// One step of a forecast.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Step {
    pub mean: f64,
    pub lower: f64,
    pub upper: f64,
    /// Index into [`AutoForecaster::model_names`] of the model that answered.
    pub model: usize,
}

/// The recent values of a series and its detected seasonal period.
#[derive(Debug, Clone, PartialEq)]
pub struct History {
    values: VecDeque<f64>,
    capacity: usize,
    max_period: usize,
    /// Values seen in all (not just kept).
    seen: u64,
    period: Option<usize>,
    /// Smoothed |y_t − y_{t−1}|: the fallback spread before errors are known.
    step: Option<f64>,
}

impl History {
    fn new(max_period: usize) -> Self {
        let capacity = 3 * max_period;
        Self {
            values: VecDeque::with_capacity(capacity + 1),
            capacity,
            max_period,
            seen: 0,
            period: None,
            step: None,
        }
    }

    fn push(&mut self, value: f64) {
        if let Some(&last) = self.values.back() {
            let d = (value - last).abs();
            self.step = Some(self.step.map_or(d, |s| s + 0.01 * (d - s)));
        }
        self.values.push_back(value);
        if self.values.len() > self.capacity {
            self.values.pop_front();
        }
        self.seen += 1;
        // Look for the period every 64 rows until one is found or the window is full, then
        // every 1024 rows (a period can change, or a better one show up).
        let n = self.seen;
        let every = if self.period.is_none() && n <= self.capacity as u64 {
            64
        } else {
            1024
        };
        if n >= 48 && n.is_multiple_of(every) {
            let (a, b) = self.values.as_slices();
            let window: Vec<f64> = a.iter().chain(b).copied().collect();
            self.period = detect_period(&window, self.max_period);
        }
    }

    /// The detected seasonal period, in rows.
    pub fn period(&self) -> Option<usize> {
        self.period
    }

    pub fn last(&self) -> Option<f64> {
        self.values.back().copied()
    }

    /// The peak that recurs over the next `steps` rows (1 is the next row): for each of the
    /// last `periods` whole periods, the highest value at the same phase, `margin` rows either
    /// side (a recurring peak comes a little earlier or later each time), widened by 1 % of
    /// the period for each period back (a period detected from noisy data can be a percent
    /// or two off, and the error adds up); then the lower median of those highs, so that a
    /// peak that came in one period only (an unannounced spike) does not count. `None`
    /// without a period or before two periods' highs are known.
    pub fn recurring_peak(&self, steps: usize, margin: usize, periods: usize) -> Option<f64> {
        let p = self.period?;
        let mut highs: Vec<f64> = (1..=periods)
            .map_while(|k| {
                let margin = margin + k * p.div_ceil(100);
                // Step s, k periods ago, was k·p − s rows before the newest.
                let nearest = (k * p).checked_sub(steps + margin)?;
                let farthest = k * p - 1 + margin;
                (farthest < self.values.len())
                    .then(|| (nearest..=farthest).filter_map(|b| self.back(b)))
                    .map(|w| w.fold(f64::MIN, f64::max))
            })
            .collect();
        if highs.len() < 2 {
            return None;
        }
        highs.sort_by(f64::total_cmp);
        Some(highs[(highs.len() - 1) / 2])
    }

    /// The value `back` rows before the newest (0 is the newest).
    fn back(&self, back: usize) -> Option<f64> {
        self.values
            .len()
            .checked_sub(back + 1)
            .map(|i| self.values[i])
    }
}

/// Finds the dominant seasonal period of `values` from its autocorrelation: the lag of the
/// strongest autocorrelation peak that rises clearly above the trough before it, preferring
/// the shortest of near-equal peaks (a cycle's multiples peak too). `None` when no lag in
/// `4..=max_lag` qualifies or fewer than two cycles fit.
pub fn detect_period(values: &[f64], max_lag: usize) -> Option<usize> {
    let n = values.len();
    let max_lag = max_lag.min(n / 2);
    if max_lag < 4 || values.iter().any(|v| !v.is_finite()) {
        return None;
    }
    // Remove the least-squares line, so a trend does not look like a long cycle.
    let nf = n as f64;
    let mean_t = (nf - 1.0) / 2.0;
    let mean_y = values.iter().sum::<f64>() / nf;
    let (mut sty, mut stt) = (0.0, 0.0);
    for (i, &y) in values.iter().enumerate() {
        let dt = i as f64 - mean_t;
        sty += dt * (y - mean_y);
        stt += dt * dt;
    }
    let slope = if stt > 0.0 { sty / stt } else { 0.0 };
    let x: Vec<f64> = values
        .iter()
        .enumerate()
        .map(|(i, &y)| y - mean_y - slope * (i as f64 - mean_t))
        .collect();
    let var: f64 = x.iter().map(|v| v * v).sum();
    if var <= 1e-12 * nf * (1.0 + mean_y * mean_y) {
        return None;
    }
    // The (biased) autocorrelation finds the peaks; they are ranked corrected for the
    // shrinking overlap, so that long lags are not penalised.
    let acf: Vec<f64> = (0..=max_lag + 1)
        .map(|k| {
            if k >= n {
                return 0.0;
            }
            dot(&x[..n - k], &x[k..]) / var
        })
        .collect();
    let mut peaks = Vec::new();
    let mut trough = acf[1];
    for k in 2..=max_lag {
        trough = trough.min(acf[k - 1]);
        if k >= 4
            && acf[k] >= acf[k - 1]
            && acf[k] >= acf[k + 1]
            && acf[k] > 0.3
            && acf[k] - trough > 0.3
        {
            peaks.push((k, acf[k] * nf / (n - k) as f64));
        }
    }
    let best = peaks.iter().map(|&(_, r)| r).fold(f64::MIN, f64::max);
    let (k, _) = peaks.into_iter().find(|&(_, r)| r >= 0.9 * best)?;
    // The biased estimate puts a broad peak a few lags early: refine it to the lag at which
    // the series repeats itself best, which is what seasonal naive uses it for.
    let mad = |lag: usize| {
        values[lag..]
            .iter()
            .zip(values)
            .map(|(a, b)| (a - b).abs())
            .sum::<f64>()
            / (n - lag) as f64
    };
    (k.saturating_sub(2).max(4)..=(k + 2).min(max_lag)).min_by(|&a, &b| mad(a).total_cmp(&mad(b)))
}

/// The dot product of two equally long slices, in eight independent sums so that it runs in
/// vector registers (a single running sum is a chain of dependent additions the compiler
/// must keep in order). Period detection is almost all this: one per lag.
fn dot(a: &[f64], b: &[f64]) -> f64 {
    let mut acc = [0.0; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f64 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ca.zip(cb) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    acc.iter().sum::<f64>() + tail
}

/// The forecasting models an [`AutoForecaster`] runs side by side.
#[derive(Debug, Clone, PartialEq)]
pub enum Model {
    /// The value one period ago (the last value when no period is known).
    SeasonalNaive,
    /// Holt-Winters with additive error, damped additive trend and additive seasonality.
    Ets(Ets),
    /// The LSTM, when [`ForecastConfig::lstm_train_every`] asks for it.
    Lstm(Box<Neural>),
    /// The global LSTM's forecast after the newest value, as [`AutoForecaster::supply`]
    /// handed it in; empty until it is (a value without one has no forecast from it).
    Global(Vec<f64>),
}

/// The LSTM as one of an [`AutoForecaster`]'s models. Cloning copies its weights (through a
/// checkpoint), so a clone trains on alone.
#[derive(Debug)]
pub struct Neural(crate::lstm::LstmForecaster);

impl Neural {
    /// Window and width: small enough that a forecast every row costs tens of microseconds.
    fn new(horizon: usize, train_every: usize) -> Result<Self> {
        crate::lstm::LstmForecaster::new(crate::lstm::LstmConfig {
            features: 1,
            window: 32,
            horizon,
            hidden: 16,
            batch: 8,
            train_every,
            memory: 2048.max(32 + horizon),
            ..crate::lstm::LstmConfig::default()
        })
        .map(Self)
    }
}

impl Clone for Neural {
    fn clone(&self) -> Self {
        let bytes = self
            .0
            .checkpoint()
            .expect("an LSTM checkpoints its own state");
        Self(
            crate::lstm::LstmForecaster::restore(&bytes)
                .expect("an LSTM restores its own checkpoint"),
        )
    }
}

impl PartialEq for Neural {
    fn eq(&self, other: &Self) -> bool {
        matches!((self.0.checkpoint(), other.0.checkpoint()), (Ok(a), Ok(b)) if a == b)
    }
}

impl Model {
    pub fn name(&self) -> &'static str {
        match self {
            Model::SeasonalNaive => "seasonal_naive",
            Model::Ets(e) => e.name,
            Model::Lstm(_) => "lstm",
            Model::Global(_) => "global_lstm",
        }
    }

    /// Learns the value just pushed onto `history`.
    fn update(&mut self, history: &History) {
        match self {
            Model::Ets(e) => e.update(history),
            Model::Lstm(n) => {
                if let Some(v) = history.last() {
                    // One feature per row, always: the only error `update` has.
                    let _ = n.0.update(&[v]);
                }
            }
            Model::Global(path) => path.clear(),
            Model::SeasonalNaive => {}
        }
    }

    /// Point forecasts for the next `out.len()` steps.
    fn forecast(&self, history: &History, out: &mut [f64]) {
        match self {
            Model::SeasonalNaive => {
                let m = history.period.unwrap_or(1);
                for (i, o) in out.iter_mut().enumerate() {
                    let h = i + 1;
                    let back = m * h.div_ceil(m) - h;
                    *o = history.back(back).or(history.last()).unwrap_or(f64::NAN);
                }
            }
            Model::Ets(e) => e.forecast(out),
            // Until its window is full the LSTM has no forecast: NaN errors are not counted,
            // so it is not chosen before it has a record.
            Model::Lstm(n) => match n.0.forecast() {
                Ok(Some(p)) => {
                    for (o, p) in out
                        .iter_mut()
                        .zip(p.iter().map(|p| p.mean).chain(std::iter::repeat(f64::NAN)))
                    {
                        *o = p;
                    }
                }
                _ => out.fill(f64::NAN),
            },
            Model::Global(path) => {
                for (o, p) in out
                    .iter_mut()
                    .zip(path.iter().copied().chain(std::iter::repeat(f64::NAN)))
                {
                    *o = p;
                }
            }
        }
    }
}

/// ETS(A,Ad,A) state and smoothing parameters.
#[derive(Debug, Clone, PartialEq)]
pub struct Ets {
    name: &'static str,
    alpha: f64,
    beta: f64,
    gamma: f64,
    phi: f64,
    level: Option<f64>,
    trend: f64,
    /// Seasonal terms indexed by row number modulo the period; empty without a period.
    season: Vec<f64>,
    /// Rows seen: the next row's seasonal index is `t % period`.
    t: u64,
    /// Smoothed |one-step error|: errors beyond `CLIP` times it are clipped before they move
    /// the state, so a spike does not drag level, trend and season after it.
    scale: Option<f64>,
}

/// Errors beyond this many times the typical error are clipped (robust Holt-Winters).
const CLIP: f64 = 3.0;

impl Ets {
    /// A model with fixed smoothing: `alpha` (level), `beta` (trend), `gamma` (season) and
    /// damping `phi`.
    pub fn new(name: &'static str, alpha: f64, beta: f64, gamma: f64, phi: f64) -> Self {
        Self {
            name,
            alpha,
            beta,
            gamma,
            phi,
            level: None,
            trend: 0.0,
            season: Vec::new(),
            t: 0,
            scale: None,
        }
    }

    fn update(&mut self, history: &History) {
        let Some(y) = history.last() else { return };
        let m = history.period.unwrap_or(0);
        if m != self.season.len() {
            self.reseason(history, m);
        }
        let Some(level) = self.level else {
            self.level = Some(y);
            self.t += 1;
            return;
        };
        let idx = if m > 0 {
            (self.t % m as u64) as usize
        } else {
            0
        };
        let s = if m > 0 { self.season[idx] } else { 0.0 };
        let raw = y - (level + self.phi * self.trend + s);
        let e = match self.scale {
            Some(scale) => raw.clamp(-CLIP * scale, CLIP * scale),
            None => raw,
        };
        self.scale = Some(
            self.scale
                .map_or(raw.abs(), |sc| sc + 0.02 * (raw.abs() - sc)),
        );
        self.level = Some(level + self.phi * self.trend + self.alpha * e);
        self.trend = self.phi * self.trend + self.beta * e;
        if m > 0 {
            self.season[idx] = s + self.gamma * e;
        }
        self.t += 1;
    }

    /// Starts the seasonal terms of period `m` from the last full cycles of the history
    /// (the newest value is row `t`, not yet learned), and the level from the last cycle.
    fn reseason(&mut self, history: &History, m: usize) {
        self.season = vec![0.0; m];
        if m == 0 {
            return;
        }
        let cycles = (history.values.len() - 1) / m;
        if cycles == 0 {
            return;
        }
        let mut counts = vec![0usize; m];
        for c in 0..cycles {
            let mut cycle = Vec::with_capacity(m);
            for j in 0..m {
                // `back` counts from the value before the newest; row t − 1 − back.
                let back = 1 + c * m + j;
                cycle.push((back, history.back(back).unwrap_or(0.0)));
            }
            let mean = cycle.iter().map(|(_, v)| v).sum::<f64>() / m as f64;
            for (back, v) in cycle {
                let row = self.t as i64 - back as i64;
                let idx = row.rem_euclid(m as i64) as usize;
                self.season[idx] += v - mean;
                counts[idx] += 1;
            }
            if c == 0 {
                self.level = Some(mean);
                self.trend = 0.0;
            }
        }
        for (s, c) in self.season.iter_mut().zip(counts) {
            *s /= c.max(1) as f64;
        }
    }

    fn forecast(&self, out: &mut [f64]) {
        let level = self.level.unwrap_or(f64::NAN);
        let m = self.season.len();
        let mut damp = 0.0;
        let mut phi_h = 1.0;
        for (i, o) in out.iter_mut().enumerate() {
            phi_h *= self.phi;
            damp += phi_h;
            let s = if m > 0 {
                self.season[((self.t + i as u64) % m as u64) as usize]
            } else {
                0.0
            };
            *o = level + damp * self.trend + s;
        }
    }
}

/// The models an [`AutoForecaster`] with `config` runs.
fn models(config: &ForecastConfig) -> Result<Vec<Model>> {
    let mut models = vec![
        Model::SeasonalNaive,
        Model::Ets(Ets::new("ets", 0.3, 0.05, 0.1, 0.98)),
        Model::Ets(Ets::new("ets_smooth", 0.05, 0.005, 0.05, 0.98)),
    ];
    if config.lstm_train_every > 0 {
        models.push(Model::Lstm(Box::new(Neural::new(
            config.horizon,
            config.lstm_train_every,
        )?)));
    }
    if config.global {
        models.push(Model::Global(Vec::new()));
    }
    Ok(models)
}

/// Signed errors of one model at one step ahead: the last `window` of them, in arrival order
/// and sorted. Kept as `f32` in buffers of exactly `window`: a forecaster tracks one window
/// per model and step (36 by default), so this is most of its memory (2 KiB per window
/// instead of 8 KiB with `f64` and the growth of a queue that is pushed before it is
/// popped). Interval quantiles need no more precision than `f32`'s 7 digits.
#[derive(Debug, Clone, PartialEq)]
struct ErrorWindow {
    arrival: VecDeque<f32>,
    sorted: Vec<f32>,
    mae: Option<f64>,
}

impl ErrorWindow {
    fn new() -> Self {
        Self {
            arrival: VecDeque::new(),
            sorted: Vec::new(),
            mae: None,
        }
    }

    fn push(&mut self, err: f64, window: usize, alpha: f64) {
        let e = err as f32;
        if !e.is_finite() {
            return;
        }
        if self.arrival.capacity() < window {
            self.arrival.reserve_exact(window - self.arrival.len());
            self.sorted.reserve_exact(window - self.sorted.len());
        }
        if self.arrival.len() >= window
            && let Some(old) = self.arrival.pop_front()
        {
            let at = self.sorted.partition_point(|&x| x < old);
            self.sorted.remove(at);
        }
        self.arrival.push_back(e);
        let at = self.sorted.partition_point(|&x| x < e);
        self.sorted.insert(at, e);
        let a = err.abs();
        self.mae = Some(self.mae.map_or(a, |m| m + alpha * (a - m)));
    }

    /// The `q` quantile of the recent errors (linear interpolation).
    fn quantile(&self, q: f64) -> f64 {
        let n = self.sorted.len();
        let pos = q.clamp(0.0, 1.0) * (n - 1) as f64;
        let lo = pos.floor() as usize;
        let hi = (lo + 1).min(n - 1);
        let (a, b) = (f64::from(self.sorted[lo]), f64::from(self.sorted[hi]));
        a + (pos - lo as f64) * (b - a)
    }
}

/// Errors needed before an interval comes from a model's own errors.
const MIN_ERRORS: usize = 20;

/// One model with its pending forecasts and tracked errors.
#[derive(Debug, Clone, PartialEq)]
struct Tracked {
    model: Model,
    /// Forecasts made after each recent row for the next `horizon` steps; newest at the back.
    pending: VecDeque<Vec<f64>>,
    errors: Vec<ErrorWindow>,
}

/// A forecaster for one series: every model, their tracked errors, the best one answering.
#[derive(Debug, Clone, PartialEq)]
pub struct AutoForecaster {
    config: ForecastConfig,
    history: History,
    models: Vec<Tracked>,
}

impl AutoForecaster {
    pub fn new(config: ForecastConfig) -> Result<Self> {
        config.validate()?;
        let models = models(&config)?
            .into_iter()
            .map(|model| Tracked {
                model,
                pending: VecDeque::with_capacity(config.horizon + 1),
                errors: (0..config.horizon).map(|_| ErrorWindow::new()).collect(),
            })
            .collect();
        Ok(Self {
            history: History::new(config.max_period),
            config,
            models,
        })
    }

    pub fn config(&self) -> &ForecastConfig {
        &self.config
    }

    /// Names of the models, in the order [`Step::model`] indexes.
    pub fn model_names(&self) -> Vec<&'static str> {
        self.models.iter().map(|t| t.model.name()).collect()
    }

    pub fn history(&self) -> &History {
        &self.history
    }

    /// Learns the next value. A non-finite value is taken as a repeat of the last one (a gap
    /// must not poison the state).
    pub fn update(&mut self, value: f64) {
        let value = if value.is_finite() {
            value
        } else {
            match self.history.last() {
                Some(v) => v,
                None => return,
            }
        };
        let h = self.config.horizon;
        for t in &mut self.models {
            let n = t.pending.len();
            for (i, f) in t.pending.iter().enumerate() {
                // The forecast made `age` rows ago predicted this value at step `age`.
                let age = n - i;
                t.errors[age - 1].push(
                    value - f[age - 1],
                    self.config.error_window,
                    self.config.choice_alpha,
                );
            }
        }
        self.history.push(value);
        for t in &mut self.models {
            t.model.update(&self.history);
            // The oldest forecast has been scored at every step: its buffer takes the new one.
            let mut buf = if t.pending.len() >= h {
                t.pending.pop_front().unwrap_or_default()
            } else {
                Vec::new()
            };
            buf.resize(h, 0.0);
            t.model.forecast(&self.history, &mut buf);
            t.pending.push_back(buf);
        }
    }

    /// Hands in the global model's forecast for the steps after the newest value (medians,
    /// `path[0]` the next row), to be scored and chosen like the other models'. Call it after
    /// [`update`](Self::update); a value without it has no global forecast. Returns false,
    /// and does nothing, when [`ForecastConfig::global`] is off.
    pub fn supply(&mut self, path: &[f64]) -> bool {
        let h = self.config.horizon;
        let Some(t) = self
            .models
            .iter_mut()
            .find(|t| matches!(t.model, Model::Global(_)))
        else {
            return false;
        };
        let fitted: Vec<f64> = path
            .iter()
            .copied()
            .chain(std::iter::repeat(f64::NAN))
            .take(h)
            .collect();
        if let Some(newest) = t.pending.back_mut() {
            newest.copy_from_slice(&fitted);
        }
        t.model = Model::Global(fitted);
        true
    }

    /// The rolling mean absolute error of each model at `step` ahead (1-based), `None` until
    /// it has made such a forecast and seen the outcome.
    pub fn rolling_error(&self, step: usize) -> Vec<Option<f64>> {
        let i = step.clamp(1, self.config.horizon) - 1;
        self.models.iter().map(|t| t.errors[i].mae).collect()
    }

    /// The model that answers at `step` ahead: the lowest rolling error, else the first.
    pub fn choice(&self, step: usize) -> usize {
        self.rolling_error(step)
            .into_iter()
            .enumerate()
            .filter_map(|(i, e)| e.map(|e| (i, e)))
            .min_by(|a, b| a.1.total_cmp(&b.1))
            .map_or(0, |(i, _)| i)
    }

    /// Forecasts `steps` ahead with central `level` intervals (for example 0.9), each step
    /// answered by the model with the lowest rolling error there. Empty before the first value.
    pub fn forecast(&self, steps: usize, level: f64) -> Vec<Step> {
        self.forecast_by(steps, level, None)
    }

    /// Like [`forecast`](Self::forecast), but every step from model `model` (an index into
    /// [`model_names`](Self::model_names)); for evaluation.
    pub fn forecast_model(&self, model: usize, steps: usize, level: f64) -> Vec<Step> {
        self.forecast_by(steps, level, Some(model.min(self.models.len() - 1)))
    }

    fn forecast_by(&self, steps: usize, level: f64, fixed: Option<usize>) -> Vec<Step> {
        if self.history.last().is_none() || steps == 0 {
            return Vec::new();
        }
        let mut means = vec![vec![]; self.models.len()];
        (0..steps)
            .map(|i| {
                let step = i + 1;
                let mut path = |m: usize| {
                    if means[m].is_empty() {
                        means[m] = vec![0.0; steps];
                        self.models[m].model.forecast(&self.history, &mut means[m]);
                    }
                    means[m][i]
                };
                let mut m = fixed.unwrap_or_else(|| self.choice(step));
                let mut mean = path(m);
                // A neural model says nothing beyond its horizon, nor the global one for a
                // value it was not handed a forecast for: seasonal naive answers there.
                if !mean.is_finite() && fixed.is_none() {
                    m = 0;
                    mean = path(0);
                }
                let (lo, hi) = self.interval(m, step, level);
                Step {
                    mean,
                    lower: mean + lo,
                    upper: mean + hi,
                    model: m,
                }
            })
            .collect()
    }

    /// What the series should stay under over `path` (this forecaster's
    /// [`forecast`](Self::forecast) of the coming steps): the mean path's peak plus the first
    /// step's upper error bound, or the peak that recurred at this phase on most of the last
    /// three periods ([`History::recurring_peak`], `margin` rows either side), whichever is
    /// higher. `None` for an empty path.
    ///
    /// Errors further ahead are not added. Most of them are the rises no model saw coming, so
    /// their upper quantile is the size of a surge, and a bound that covers it at every step
    /// allocates for a surge all day. The rises that recur are what the second term
    /// anticipates: at their phase, not everywhere.
    pub fn peak(&self, path: &[Step], margin: usize) -> Option<f64> {
        let next = path.first()?;
        let mean = path.iter().map(|s| s.mean).fold(next.mean, f64::max);
        let noise = (next.upper - next.mean).max(0.0);
        let recurring = self
            .history
            .recurring_peak(path.len(), margin, 3)
            .unwrap_or(f64::MIN);
        Some((mean + noise).max(recurring))
    }

    /// The interval offsets around model `m`'s mean at `step` ahead.
    fn interval(&self, m: usize, step: usize, level: f64) -> (f64, f64) {
        let level = level.clamp(0.0, 0.9999);
        let h = self.config.horizon;
        let tracked = step.min(h);
        let w = &self.models[m].errors[tracked - 1];
        let widen = (step as f64 / tracked as f64).sqrt();
        if w.sorted.len() >= MIN_ERRORS {
            let lo = w.quantile((1.0 - level) / 2.0);
            let hi = w.quantile((1.0 + level) / 2.0);
            return (lo * widen, hi * widen);
        }
        // Too few errors yet: a normal interval from the series' own step-to-step change,
        // growing like a random walk's.
        let scale = self
            .history
            .step
            .unwrap_or(0.0)
            .max(1e-6 * (1.0 + self.history.last().unwrap_or(0.0).abs()))
            * 1.25;
        let z = normal_quantile((1.0 + level) / 2.0);
        let half = z * scale * (step as f64).sqrt();
        (-half, half)
    }

    const MAGIC: [u8; 4] = *b"FSAF";
    const VERSION: u32 = 3;

    /// The whole state as bytes; [`restore`](Self::restore) continues exactly from it.
    pub fn checkpoint(&self) -> Result<Vec<u8>> {
        let mut w = Writer::default();
        let c = &self.config;
        w.usize(c.horizon);
        w.usize(c.max_period);
        w.usize(c.error_window);
        w.f64(c.choice_alpha);
        w.usize(c.lstm_train_every);
        w.usize(usize::from(c.global));
        let h = &self.history;
        w.f64s(h.values.iter());
        w.u64(h.seen);
        w.usize(h.period.unwrap_or(0));
        w.opt_f64(h.step);
        w.usize(self.models.len());
        for t in &self.models {
            match &t.model {
                Model::Ets(e) => {
                    w.opt_f64(e.level);
                    w.f64(e.trend);
                    w.f64s(e.season.iter());
                    w.u64(e.t);
                    w.opt_f64(e.scale);
                }
                Model::Lstm(n) => w.bytes(&n.0.checkpoint()?),
                Model::Global(path) => w.f64s(path.iter()),
                Model::SeasonalNaive => {}
            }
            w.usize(t.pending.len());
            for p in &t.pending {
                w.f64s(p.iter());
            }
            for e in &t.errors {
                w.usize(e.arrival.len());
                for &v in &e.arrival {
                    w.f64(f64::from(v));
                }
                w.opt_f64(e.mae);
            }
        }
        Ok(w.finish(Self::MAGIC, Self::VERSION))
    }

    /// Restores a forecaster from [`checkpoint`](Self::checkpoint) bytes.
    pub fn restore(bytes: &[u8]) -> Result<Self> {
        let mut r = Reader::open(bytes, Self::MAGIC, Self::VERSION)?;
        const MAX: usize = 1 << 24;
        let config = ForecastConfig {
            horizon: r.usize(MAX)?,
            max_period: r.usize(MAX)?,
            error_window: r.usize(MAX)?,
            choice_alpha: r.f64()?,
            lstm_train_every: r.usize(MAX)?,
            global: r.usize(1)? == 1,
        };
        let mut f = Self::new(config)?;
        let values = r.f64s(3 * config.max_period)?;
        f.history.values = values.into();
        f.history.seen = r.u64()?;
        f.history.period = Some(r.usize(config.max_period)?).filter(|&p| p > 0);
        f.history.step = r.opt_f64()?;
        let n = r.usize(MAX)?;
        if n != f.models.len() {
            return Err(Error::Checkpoint {
                reason: format!("{n} models, this build runs {}", f.models.len()),
            });
        }
        for t in &mut f.models {
            match &mut t.model {
                Model::Ets(e) => {
                    e.level = r.opt_f64()?;
                    e.trend = r.f64()?;
                    e.season = r.f64s(config.max_period)?;
                    e.t = r.u64()?;
                    e.scale = r.opt_f64()?;
                }
                Model::Lstm(n) => {
                    n.0 = crate::lstm::LstmForecaster::restore(r.bytes(1 << 30)?)?;
                }
                Model::Global(path) => *path = r.f64s(config.horizon)?,
                Model::SeasonalNaive => {}
            }
            let pending = r.usize(config.horizon)?;
            for _ in 0..pending {
                t.pending.push_back(r.f64s(config.horizon)?);
            }
            for e in &mut t.errors {
                let errors = r.f64s(config.error_window)?;
                e.arrival = VecDeque::with_capacity(config.error_window);
                e.arrival.extend(errors.iter().map(|&v| v as f32));
                e.sorted = Vec::with_capacity(config.error_window);
                e.sorted.extend(&e.arrival);
                e.sorted.sort_by(f32::total_cmp);
                e.mae = r.opt_f64()?;
            }
        }
        r.end()?;
        Ok(f)
    }
}

/// The standard normal quantile (Acklam's rational approximation, relative error < 1.2e-9).
pub fn normal_quantile(p: f64) -> f64 {
    const A: [f64; 6] = [
        -3.969_683_028_665_376e1,
        2.209_460_984_245_205e2,
        -2.759_285_104_469_687e2,
        1.383_577_518_672_69e2,
        -3.066_479_806_614_716e1,
        2.506_628_277_459_239,
    ];
    const B: [f64; 5] = [
        -5.447_609_879_822_406e1,
        1.615_858_368_580_409e2,
        -1.556_989_798_598_866e2,
        6.680_131_188_771_972e1,
        -1.328_068_155_288_572e1,
    ];
    const C: [f64; 6] = [
        -7.784_894_002_430_293e-3,
        -3.223_964_580_411_365e-1,
        -2.400_758_277_161_838,
        -2.549_732_539_343_734,
        4.374_664_141_464_968,
        2.938_163_982_698_783,
    ];
    const D: [f64; 4] = [
        7.784_695_709_041_462e-3,
        3.224_671_290_700_398e-1,
        2.445_134_137_142_996,
        3.754_408_661_907_416,
    ];
    let p = p.clamp(1e-12, 1.0 - 1e-12);
    let tail = |q: f64| {
        (((((C[0] * q + C[1]) * q + C[2]) * q + C[3]) * q + C[4]) * q + C[5])
            / ((((D[0] * q + D[1]) * q + D[2]) * q + D[3]) * q + 1.0)
    };
    if p < 0.024_25 {
        tail((-2.0 * p.ln()).sqrt())
    } else if p > 1.0 - 0.024_25 {
        -tail((-2.0 * (1.0 - p).ln()).sqrt())
    } else {
        let q = p - 0.5;
        let r = q * q;
        (((((A[0] * r + A[1]) * r + A[2]) * r + A[3]) * r + A[4]) * r + A[5]) * q
            / (((((B[0] * r + B[1]) * r + B[2]) * r + B[3]) * r + B[4]) * r + 1.0)
    }
}

#[cfg(test)]
#[path = "forecast/tests.rs"]
mod tests;
