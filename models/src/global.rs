//! A global LSTM forecaster: one network for many related series (DeepAR's idea, Salinas et
//! al. 2020), trained continuously on windows drawn across all of them, and answering for all
//! of them in one batched forward pass per round.
//!
//! **What it reads.** A forecast's origin is a series' newest row T. The network reads the
//! last `window` rows, each as six features:
//! * the value relative to the newest, in units of the series' scale: (y_r − y_T) / s;
//! * the value one seasonal period before that row, the same way (0 without a period);
//! * the time of day and the day of the week, each as a sine and a cosine.
//!
//! The scale s is the window's mean absolute step, floored at a tenth of the series' running
//! one, so that a calm window in a bursty series does not inflate its errors. With level and
//! scale taken out, a CPU series in MHz and a disk series in KB/s look alike, and one network
//! learns from both.
//!
//! Beside the LSTM's last state, a small head is given what the seasonal naive forecast says
//! for every step ahead (the value one period before, relative to y_T), whether a period is
//! known, and the series' kind ([`KINDS`], one-hot: the embedding of the kind). It learns when
//! to follow the season, when the recent dynamics, and when neither.
//!
//! **What it says.** For each step ahead k, a Laplace distribution ([`Laplace`]): a median
//! y_T + s·μ_k and a spread s·b_k. The loss is the Laplace negative log-likelihood,
//! log b + |y − μ| / b, whose location is the median: the forecast with the least absolute
//! error, which is what MASE measures. Untrained, μ is near 0: the naive forecast.
//!
//! **What it costs.** [`GlobalLstm::train`] takes `steps_per_round` Adam steps on `batch`
//! windows drawn by a seeded generator across every series' kept history: a fixed budget per
//! round, however many series there are. [`GlobalLstm::forecast`] runs every series through
//! the network in batched passes. Everything, kept rows included, round-trips through
//! [`GlobalLstm::checkpoint`], so a restart resumes the weights instead of retraining.

use std::collections::VecDeque;

use candle_core::{DType, Device, Tensor};
use candle_nn::rnn::{LSTM, LSTMConfig, RNN};
use candle_nn::{Init, Linear, Module, VarBuilder, VarMap};

use crate::codec::{Reader, Writer};
use crate::forecast::{AutoForecaster, ForecastConfig};
use crate::nn::{Params, candle, device, next};
use crate::{Error, Result};

/// The kinds of series the network tells apart; [`kind_of`] maps a name to one.
pub const KINDS: [&str; 5] = ["cpu", "mem", "net", "disk", "other"];

/// The index into [`KINDS`] of a metric or resource name: by its prefix (`cpu`, `mem`,
/// `net`/`rx`/`tx`, `disk`/`io`/`blk`), else `other`.
pub fn kind_of(name: &str) -> usize {
    let n = name.to_ascii_lowercase();
    let starts = |prefixes: &[&str]| prefixes.iter().any(|p| n.starts_with(p));
    if starts(&["cpu"]) {
        0
    } else if starts(&["mem"]) {
        1
    } else if starts(&["net", "rx", "tx"]) {
        2
    } else if starts(&["disk", "io", "blk"]) {
        3
    } else {
        4
    }
}

/// [`GlobalLstm::pretrained`]'s weights (a [`GlobalLstm::weights`] file, for
/// [`GlobalLstm::resume_weights`]).
pub const PRETRAINED: &[u8] = include_bytes!("global/pretrained.bin");

/// Features per input row (see the module's comment).
const INPUTS: usize = 6;
/// Scaled inputs and targets are clipped to ±this: one wild row must not swamp a batch.
const CLIP: f32 = 50.0;
/// Series per forward pass in [`GlobalLstm::forecast`].
const CHUNK: usize = 1024;

/// Settings of a [`GlobalLstm`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GlobalConfig {
    /// Rows the network reads.
    pub window: usize,
    /// Steps ahead it predicts.
    pub horizon: usize,
    pub hidden: usize,
    /// Windows per training step.
    pub batch: usize,
    /// Adam steps per [`GlobalLstm::train`] call (a round's CPU budget); 0 only infers.
    pub steps_per_round: usize,
    /// Rows kept per series, that training draws from. The seasonal features need the
    /// period plus the window within it.
    pub memory: usize,
    pub learning_rate: f64,
    pub seed: u64,
}

impl Default for GlobalConfig {
    fn default() -> Self {
        Self {
            window: 48,
            horizon: 12,
            hidden: 32,
            batch: 64,
            steps_per_round: 1,
            memory: 2048,
            learning_rate: 3e-3,
            seed: 42,
        }
    }
}

impl GlobalConfig {
    pub fn validate(&self) -> Result<()> {
        let ok = (2..=1024).contains(&self.window)
            && (1..=1024).contains(&self.horizon)
            && (1..=1024).contains(&self.hidden)
            && (1..=4096).contains(&self.batch)
            && self.steps_per_round <= 1000
            && (self.window + self.horizon..=1 << 20).contains(&self.memory)
            && self.learning_rate > 0.0
            && self.learning_rate.is_finite();
        if ok {
            Ok(())
        } else {
            Err(Error::Config {
                reason: format!("invalid global LSTM config {self:?}"),
            })
        }
    }

    /// Values the head reads beside the LSTM's state: a seasonal value per step ahead,
    /// whether a period is known, and the kind one-hot.
    fn extra(&self) -> usize {
        self.horizon + 1 + KINDS.len()
    }
}

/// One step of a forecast: a Laplace distribution.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Laplace {
    pub median: f64,
    /// The scale b: the mean absolute deviation from the median.
    pub spread: f64,
}

impl Laplace {
    /// The `q` quantile, for `q` in (0, 1).
    pub fn quantile(&self, q: f64) -> f64 {
        let q = q.clamp(1e-9, 1.0 - 1e-9);
        if q < 0.5 {
            self.median + self.spread * (2.0 * q).ln()
        } else {
            self.median - self.spread * (2.0 * (1.0 - q)).ln()
        }
    }
}

/// A series registered with [`GlobalLstm::add_series`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SeriesId(pub usize);

/// What the global model has done, for accountability.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GlobalStats {
    pub series: usize,
    /// Rows learned across every series.
    pub rows: u64,
    /// Rounds ([`GlobalLstm::train`] calls) so far.
    pub rounds: u64,
    /// Optimiser steps taken.
    pub steps: u64,
    /// Exponentially smoothed training loss (Laplace negative log-likelihood per step
    /// ahead, in scaled units); `None` before the first step.
    pub loss: Option<f64>,
}

/// The kept rows of one series.
#[derive(Debug, Clone, PartialEq)]
struct Series {
    kind: usize,
    period: Option<usize>,
    values: VecDeque<f64>,
    /// Unix seconds, for the time-of-day and day-of-week features.
    times: VecDeque<f64>,
    /// Running mean |y_t − y_{t−1}| (a plain mean over the first 1,000 steps, then smoothed
    /// over about 1,000): the floor of a window's scale.
    step: Option<f64>,
    seen: u64,
}

/// One network for many series.
#[derive(Debug)]
pub struct GlobalLstm {
    config: GlobalConfig,
    /// Where the tensors live: the CPU, or a GPU with the `cuda` feature.
    device: Device,
    params: Params,
    lstm: LSTM,
    mid: Linear,
    head: Linear,
    series: Vec<Series>,
    rng: u64,
    rounds: u64,
    loss: Option<f64>,
}

impl GlobalLstm {
    pub fn new(config: GlobalConfig) -> Result<Self> {
        config.validate()?;
        let device = device();
        let varmap = VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, &device);
        let zero = Init::Const(0.0);
        let lstm = candle_nn::rnn::lstm(
            INPUTS,
            config.hidden,
            LSTMConfig {
                w_ih_init: zero,
                w_hh_init: zero,
                b_ih_init: Some(zero),
                b_hh_init: Some(zero),
                ..LSTMConfig::default()
            },
            vb.pp("lstm"),
        )
        .map_err(candle)?;
        let mid = candle_nn::linear(config.hidden + config.extra(), config.hidden, vb.pp("mid"))
            .map_err(candle)?;
        let head =
            candle_nn::linear(config.hidden, 2 * config.horizon, vb.pp("head")).map_err(candle)?;
        let mut rng = config.seed ^ 0x9e37_79b9_7f4a_7c15;
        let params = Params::init(&varmap, &mut rng, config.hidden)?;
        Ok(Self {
            config,
            device,
            params,
            lstm,
            mid,
            head,
            series: Vec::new(),
            rng,
            rounds: 0,
            loss: None,
        })
    }

    pub fn config(&self) -> &GlobalConfig {
        &self.config
    }

    /// Registers a series of kind `kind` (an index into [`KINDS`]; out of range is `other`).
    pub fn add_series(&mut self, kind: usize) -> SeriesId {
        self.series.push(Series {
            kind: kind.min(KINDS.len() - 1),
            period: None,
            values: VecDeque::new(),
            times: VecDeque::new(),
            step: None,
            seen: 0,
        });
        SeriesId(self.series.len() - 1)
    }

    /// Learns a series' next row: its value (a non-finite value repeats the last one), its
    /// time in Unix seconds, and its seasonal period in rows if one is known (the
    /// [`crate::forecast::History`] detects it).
    pub fn push(
        &mut self,
        id: SeriesId,
        time: f64,
        value: f64,
        period: Option<usize>,
    ) -> Result<()> {
        let memory = self.config.memory;
        let s = self.series.get_mut(id.0).ok_or_else(|| Error::Config {
            reason: format!("no series {}", id.0),
        })?;
        let value = match (value.is_finite(), s.values.back()) {
            (true, _) => value,
            (false, Some(&last)) => last,
            (false, None) => return Ok(()),
        };
        if let Some(&last) = s.values.back() {
            let d = (value - last).abs();
            let n = s.seen.min(1000) as f64;
            s.step = Some(s.step.map_or(d, |m| m + (d - m) / n));
        }
        s.values.push_back(value);
        s.times.push_back(if time.is_finite() { time } else { 0.0 });
        if s.values.len() > memory {
            s.values.pop_front();
            s.times.pop_front();
        }
        s.period = period.filter(|&p| (1..memory).contains(&p));
        s.seen += 1;
        Ok(())
    }

    /// The scale of the window ending (exclusive) at `end`.
    fn scale(&self, s: &Series, end: usize) -> f64 {
        let w = self.config.window;
        let rows = s.values.range(end - w..end);
        let steps: f64 = rows
            .clone()
            .zip(rows.skip(1))
            .map(|(a, b)| (b - a).abs())
            .sum();
        let last = s.values[end - 1];
        (steps / (w - 1) as f64)
            .max(0.1 * s.step.unwrap_or(0.0))
            .max(1e-6 * (1.0 + last.abs()))
    }

    /// Appends the network's input for the window of `s` ending (exclusive) at `end`;
    /// returns the origin's value and the scale.
    fn encode(&self, s: &Series, end: usize, x: &mut Vec<f32>, extra: &mut Vec<f32>) -> (f64, f64) {
        let c = self.config;
        let last = s.values[end - 1];
        let scale = self.scale(s, end);
        let z = |v: f64| (((v - last) / scale) as f32).clamp(-CLIP, CLIP);
        for r in end - c.window..end {
            x.push(z(s.values[r]));
            x.push(match s.period {
                Some(p) if r >= p => z(s.values[r - p]),
                _ => 0.0,
            });
            let t = s.times[r];
            let day = std::f64::consts::TAU * (t.rem_euclid(86_400.0) / 86_400.0);
            // 1970-01-01 was a Thursday: day 3 of a week that starts on Monday.
            let week = std::f64::consts::TAU * ((t / 86_400.0 + 3.0).rem_euclid(7.0) / 7.0);
            x.extend([day.sin(), day.cos(), week.sin(), week.cos()].map(|v| v as f32));
        }
        for k in 1..=c.horizon {
            // The row one period (or, for a period shorter than k, whole periods) before
            // step k: what seasonal naive forecasts there.
            let seasonal = s
                .period
                .and_then(|p| (end - 1).checked_sub(p * k.div_ceil(p) - k))
                .map_or(0.0, |i| z(s.values[i]));
            extra.push(seasonal);
        }
        extra.push(if s.period.is_some() { 1.0 } else { 0.0 });
        extra.extend((0..KINDS.len()).map(|k| if k == s.kind { 1.0 } else { 0.0 }));
        (last, scale)
    }

    /// (μ, log b), each `[batch, horizon]`, in scaled units.
    fn forward(&self, x: &Tensor, extra: &Tensor) -> Result<(Tensor, Tensor)> {
        let states = self.lstm.seq(x).map_err(candle)?;
        let last = states.last().ok_or_else(|| Error::Model {
            reason: "empty input window".into(),
        })?;
        let joined = Tensor::cat(&[last.h(), extra], 1).map_err(candle)?;
        let mid = self
            .mid
            .forward(&joined)
            .and_then(|t| t.relu())
            .map_err(candle)?;
        let out = self.head.forward(&mid).map_err(candle)?;
        let h = self.config.horizon;
        let mu = out.narrow(1, 0, h).map_err(candle)?;
        let log_b = out
            .narrow(1, h, h)
            .and_then(|t| t.clamp(-7.0f32, 7.0f32))
            .map_err(candle)?;
        Ok((mu, log_b))
    }

    /// One round's training: `steps_per_round` Adam steps, each on `batch` windows drawn
    /// across the series that have a window and its horizon kept. Returns the round's mean
    /// loss, `None` when nothing could be trained.
    pub fn train(&mut self) -> Result<Option<f64>> {
        self.rounds += 1;
        let c = self.config;
        let need = c.window + c.horizon;
        let eligible: Vec<usize> = (0..self.series.len())
            .filter(|&i| self.series[i].values.len() >= need)
            .collect();
        if eligible.is_empty() || c.steps_per_round == 0 {
            return Ok(None);
        }
        let device = self.device.clone();
        let mut total = 0.0;
        for _ in 0..c.steps_per_round {
            let draws: Vec<(usize, usize)> = (0..c.batch)
                .map(|_| {
                    let pick = (next(&mut self.rng) * eligible.len() as f64) as usize;
                    let i = eligible[pick.min(eligible.len() - 1)];
                    let span = self.series[i].values.len() - need + 1;
                    let at = (next(&mut self.rng) * span as f64) as usize;
                    (i, c.window + at.min(span - 1))
                })
                .collect();
            let mut x = Vec::with_capacity(c.batch * c.window * INPUTS);
            let mut extra = Vec::with_capacity(c.batch * c.extra());
            let mut target = Vec::with_capacity(c.batch * c.horizon);
            for &(i, end) in &draws {
                let s = &self.series[i];
                let (last, scale) = self.encode(s, end, &mut x, &mut extra);
                target.extend(
                    (end..end + c.horizon)
                        .map(|r| (((s.values[r] - last) / scale) as f32).clamp(-CLIP, CLIP)),
                );
            }
            let tensor =
                |v: Vec<f32>, shape: &[usize]| Tensor::from_vec(v, shape, &device).map_err(candle);
            let x = tensor(x, &[c.batch, c.window, INPUTS])?;
            let extra = tensor(extra, &[c.batch, c.extra()])?;
            let target = tensor(target, &[c.batch, c.horizon])?;
            let (mu, log_b) = self.forward(&x, &extra)?;
            // Laplace negative log-likelihood: log b + |y − μ| / b.
            let loss = (target - mu)
                .and_then(|d| d.abs())
                .and_then(|d| d / log_b.exp()?)
                .and_then(|d| d + &log_b)
                .and_then(|l| l.mean_all())
                .map_err(candle)?;
            total += f64::from(loss.to_scalar::<f32>().map_err(candle)?);
            self.params.adam(&loss, c.learning_rate)?;
        }
        let mean = total / c.steps_per_round as f64;
        self.loss = Some(self.loss.map_or(mean, |l| l + 0.05 * (mean - l)));
        Ok(Some(mean))
    }

    /// The next `horizon` steps of every series, indexed by [`SeriesId`]; `None` for a
    /// series with fewer than `window` rows kept.
    pub fn forecast(&self) -> Result<Vec<Option<Vec<Laplace>>>> {
        let c = self.config;
        let ready: Vec<usize> = (0..self.series.len())
            .filter(|&i| self.series[i].values.len() >= c.window)
            .collect();
        let mut out = vec![None; self.series.len()];
        let device = self.device.clone();
        for chunk in ready.chunks(CHUNK) {
            let n = chunk.len();
            let mut x = Vec::with_capacity(n * c.window * INPUTS);
            let mut extra = Vec::with_capacity(n * c.extra());
            let origins: Vec<(f64, f64)> = chunk
                .iter()
                .map(|&i| {
                    let s = &self.series[i];
                    self.encode(s, s.values.len(), &mut x, &mut extra)
                })
                .collect();
            let x = Tensor::from_vec(x, (n, c.window, INPUTS), &device).map_err(candle)?;
            let extra = Tensor::from_vec(extra, (n, c.extra()), &device).map_err(candle)?;
            let (mu, log_b) = self.forward(&x, &extra)?;
            let mu: Vec<Vec<f32>> = mu.to_vec2().map_err(candle)?;
            let log_b: Vec<Vec<f32>> = log_b.to_vec2().map_err(candle)?;
            for (j, &i) in chunk.iter().enumerate() {
                let (last, scale) = origins[j];
                out[i] = Some(
                    (0..c.horizon)
                        .map(|k| Laplace {
                            median: last + scale * f64::from(mu[j][k]),
                            spread: scale * f64::from(log_b[j][k]).exp(),
                        })
                        .collect(),
                );
            }
        }
        Ok(out)
    }

    pub fn stats(&self) -> GlobalStats {
        GlobalStats {
            series: self.series.len(),
            rows: self.series.iter().map(|s| s.seen).sum(),
            rounds: self.rounds,
            steps: self.params.steps,
            loss: self.loss,
        }
    }

    /// Takes the weights, optimiser state and training record of a [`checkpoint`](Self::checkpoint)
    /// of a network of the same shape (window, horizon, width), keeping this model's series:
    /// a restart resumes training where it stopped while its series' rows come back from
    /// storage. Fails, changing nothing, on a damaged checkpoint or another shape.
    pub fn resume_weights(&mut self, bytes: &[u8]) -> Result<()> {
        let saved = Self::restore(bytes)?;
        let (a, b) = (&saved.config, &self.config);
        if (a.window, a.horizon, a.hidden) != (b.window, b.horizon, b.hidden) {
            return Err(Error::Checkpoint {
                reason: format!(
                    "a network of window {}, horizon {} and width {}, this one is {}, {} and {}",
                    a.window, a.horizon, a.hidden, b.window, b.horizon, b.hidden
                ),
            });
        }
        self.params = saved.params;
        self.lstm = saved.lstm;
        self.mid = saved.mid;
        self.head = saved.head;
        self.rounds = saved.rounds;
        self.loss = saved.loss;
        Ok(())
    }

    /// The network Forestall ships: trained on the 20 development VMs' cpu, mem, net and
    /// disk series (one pass, 2,016 rounds, seed 42; `docs/BENCHMARKS.md` says how to make it
    /// again), with no series. It forecasts series it never saw, which is what SQL's
    /// `forecast()` asks of it.
    pub fn pretrained() -> Result<Self> {
        Self::restore(PRETRAINED)
    }

    const MAGIC: [u8; 4] = *b"FSGL";
    const VERSION: u32 = 1;

    /// Weights, optimiser moments, every series' kept rows and the generator: everything
    /// needed to continue exactly.
    pub fn checkpoint(&self) -> Result<Vec<u8>> {
        self.write(&self.series)
    }

    /// A [`checkpoint`](Self::checkpoint) without the series: what
    /// [`resume_weights`](Self::resume_weights) reads, a few hundred KiB whatever the fleet.
    pub fn weights(&self) -> Result<Vec<u8>> {
        self.write(&[])
    }

    fn write(&self, series: &[Series]) -> Result<Vec<u8>> {
        let mut w = Writer::default();
        let c = &self.config;
        for x in [
            c.window,
            c.horizon,
            c.hidden,
            c.batch,
            c.steps_per_round,
            c.memory,
        ] {
            w.usize(x);
        }
        w.f64(c.learning_rate);
        w.u64(c.seed);
        w.u64(self.params.steps);
        w.u64(self.rng);
        w.u64(self.rounds);
        w.opt_f64(self.loss);
        w.usize(series.len());
        for s in series {
            w.usize(s.kind);
            w.usize(s.period.unwrap_or(0));
            w.opt_f64(s.step);
            w.u64(s.seen);
            w.f64s(s.values.iter());
            w.f64s(s.times.iter());
        }
        self.params.write(&mut w)?;
        Ok(w.finish(Self::MAGIC, Self::VERSION))
    }

    /// Restores a model from [`checkpoint`](Self::checkpoint) bytes.
    pub fn restore(bytes: &[u8]) -> Result<Self> {
        let mut r = Reader::open(bytes, Self::MAGIC, Self::VERSION)?;
        const MAX: usize = 1 << 24;
        let config = GlobalConfig {
            window: r.usize(MAX)?,
            horizon: r.usize(MAX)?,
            hidden: r.usize(MAX)?,
            batch: r.usize(MAX)?,
            steps_per_round: r.usize(MAX)?,
            memory: r.usize(MAX)?,
            learning_rate: r.f64()?,
            seed: r.u64()?,
        };
        let mut g = Self::new(config)?;
        g.params.steps = r.u64()?;
        g.rng = r.u64()?;
        g.rounds = r.u64()?;
        g.loss = r.opt_f64()?;
        let n = r.usize(MAX)?;
        for _ in 0..n {
            let kind = r.usize(KINDS.len() - 1)?;
            let period = Some(r.usize(config.memory)?).filter(|&p| p > 0);
            let step = r.opt_f64()?;
            let seen = r.u64()?;
            let values = r.f64s(config.memory)?;
            let times = r.f64s(config.memory)?;
            if values.len() != times.len() {
                return Err(Error::Checkpoint {
                    reason: "a series has more values than times".into(),
                });
            }
            g.series.push(Series {
                kind,
                period,
                values: values.into(),
                times: times.into(),
                step,
                seen,
            });
        }
        g.params.read(&mut r)?;
        r.end()?;
        Ok(g)
    }
}

/// Rows at the end of each series that a one-off query ([`replay`] in SQL's `forecast()`)
/// has the network forecast, so that its forecasts are scored beside the other models'
/// before the choice: past its 12 steps ahead, about 50 scored rows each, the rolling
/// errors' memory (`choice_alpha` 0.02).
pub const SCORED_ROWS: usize = 64;

/// One series for [`replay`]: its values, their times (Unix seconds) and its kind (an index
/// into [`KINDS`]).
#[derive(Debug, Clone, Copy)]
pub struct Replay<'a> {
    pub values: &'a [f64],
    pub times: &'a [f64],
    pub kind: usize,
}

/// Streams every series' history through a fresh [`AutoForecaster`] (with `config`'s
/// global slot on), and has `model` forecast the last `scored` rows of every series, all
/// series in one batched pass per row, so that its forecasts are scored and chosen per step
/// ahead like the other models'. The model only infers (it is not trained) and gets the
/// series as new ones. Returns the forecasters after each series' last row, in order:
/// what a one-off query needs of a network trained elsewhere, at `scored` forward passes
/// however long the histories.
pub fn replay(
    model: &mut GlobalLstm,
    series: &[Replay<'_>],
    config: ForecastConfig,
    scored: usize,
) -> Result<Vec<AutoForecaster>> {
    let config = ForecastConfig {
        global: true,
        ..config
    };
    let mut forecasters = series
        .iter()
        .map(|_| AutoForecaster::new(config))
        .collect::<Result<Vec<_>>>()?;
    let ids: Vec<SeriesId> = series.iter().map(|s| model.add_series(s.kind)).collect();
    let memory = model.config.memory;
    let learn = |f: &mut AutoForecaster, model: &mut GlobalLstm, id, s: &Replay<'_>, r: usize| {
        let v = s.values[r];
        f.update(v);
        // Rows older than the model keeps need not reach it.
        if r + scored + memory >= s.values.len() {
            let t = s.times.get(r).copied().unwrap_or(0.0);
            model.push(id, t, v, f.history().period())?;
        }
        Ok::<_, Error>(())
    };
    for ((f, s), &id) in forecasters.iter_mut().zip(series).zip(&ids) {
        for r in 0..s.values.len().saturating_sub(scored) {
            learn(f, model, id, s, r)?;
        }
    }
    // Row `back` before the end of every series in one round, oldest first.
    for back in (0..scored).rev() {
        let mut any = false;
        for ((f, s), &id) in forecasters.iter_mut().zip(series).zip(&ids) {
            if let Some(r) = s.values.len().checked_sub(back + 1) {
                learn(f, model, id, s, r)?;
                any = true;
            }
        }
        if !any {
            continue;
        }
        let paths = model.forecast()?;
        for ((f, s), id) in forecasters.iter_mut().zip(series).zip(&ids) {
            if s.values.len() > back
                && let Some(Some(path)) = paths.get(id.0)
            {
                let medians: Vec<f64> = path.iter().map(|p| p.median).collect();
                f.supply(&medians);
            }
        }
    }
    Ok(forecasters)
}

#[cfg(test)]
#[path = "global/tests.rs"]
mod tests;
