//! An LSTM forecaster on candle (CPU): multivariate input, mean and spread for each of the
//! next `horizon` steps, trained continuously.
//!
//! The input is a window of the last `window` rows of a component's metrics (each feature
//! normalised by its running mean and variance); an LSTM layer reads it, and a linear head
//! gives, for each step ahead of the *target* feature (feature 0), a mean and a log-variance.
//! The loss is the Gaussian negative log-likelihood, so the network learns its own spread.
//!
//! Training is continuous and bounded: every `train_every` rows one Adam step runs on a batch
//! of windows drawn (by a seeded generator) from the recent history. Nothing is retrained from
//! scratch. Everything is deterministic under the seed: the weights are initialised from it,
//! not from candle's generator, and the optimiser is ours, so that
//! [`LstmForecaster::checkpoint`] can hold its moments and a restored model continues exactly.

use std::collections::VecDeque;

use candle_core::{D, DType, Device, Tensor};
use candle_nn::rnn::{LSTM, LSTMConfig, RNN};
use candle_nn::{Init, Linear, Module, VarBuilder, VarMap};

use crate::codec::{Reader, Writer};
use crate::nn::{Params, candle, next};
use crate::{Error, Result};

/// Settings of an [`LstmForecaster`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LstmConfig {
    /// Metrics per row; feature 0 is forecast.
    pub features: usize,
    /// Rows the network reads.
    pub window: usize,
    /// Steps ahead it predicts.
    pub horizon: usize,
    pub hidden: usize,
    /// Windows per training step.
    pub batch: usize,
    /// Rows between training steps (the CPU budget).
    pub train_every: usize,
    /// Rows of history training draws from.
    pub memory: usize,
    pub learning_rate: f64,
    pub seed: u64,
}

impl Default for LstmConfig {
    fn default() -> Self {
        Self {
            features: 1,
            window: 48,
            horizon: 12,
            hidden: 32,
            batch: 16,
            train_every: 16,
            memory: 4096,
            learning_rate: 3e-3,
            seed: 42,
        }
    }
}

impl LstmConfig {
    pub fn validate(&self) -> Result<()> {
        let ok = (1..=64).contains(&self.features)
            && (2..=1024).contains(&self.window)
            && (1..=1024).contains(&self.horizon)
            && (1..=1024).contains(&self.hidden)
            && (1..=1024).contains(&self.batch)
            && self.train_every >= 1
            && self.memory >= self.window + self.horizon
            && self.learning_rate > 0.0
            && self.learning_rate.is_finite();
        if ok {
            Ok(())
        } else {
            Err(Error::Config {
                reason: format!("invalid LSTM config {self:?}"),
            })
        }
    }
}

/// Running mean and variance of each feature (Welford).
#[derive(Debug, Clone, PartialEq)]
struct Normaliser {
    n: u64,
    mean: Vec<f64>,
    m2: Vec<f64>,
}

impl Normaliser {
    fn push(&mut self, row: &[f64]) {
        self.n += 1;
        for ((m, s), &x) in self.mean.iter_mut().zip(&mut self.m2).zip(row) {
            let d = x - *m;
            *m += d / self.n as f64;
            *s += d * (x - *m);
        }
    }

    fn std(&self, i: usize) -> f64 {
        if self.n < 2 {
            1.0
        } else {
            (self.m2[i] / (self.n - 1) as f64).sqrt().max(1e-6)
        }
    }

    fn norm(&self, i: usize, x: f64) -> f32 {
        ((x - self.mean[i]) / self.std(i)) as f32
    }
}

/// An LSTM forecaster for one component.
#[derive(Debug)]
pub struct LstmForecaster {
    config: LstmConfig,
    /// Trainable variables and Adam's state.
    params: Params,
    lstm: LSTM,
    head: Linear,
    /// The weights as plain arrays, refreshed after every training step: inference runs on
    /// them (a 48-step window through candle's per-op dispatch took 4 ms; this takes tens of
    /// microseconds).
    plain: Plain,
    norm: Normaliser,
    history: VecDeque<Vec<f64>>,
    seen: u64,
    rng: u64,
}

/// One predicted step.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Prediction {
    pub mean: f64,
    /// Predicted standard deviation.
    pub std: f64,
}

impl LstmForecaster {
    pub fn new(config: LstmConfig) -> Result<Self> {
        config.validate()?;
        let device = Device::Cpu;
        let varmap = VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, &device);
        let zero = Init::Const(0.0);
        let lstm = candle_nn::rnn::lstm(
            config.features,
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
        let head =
            candle_nn::linear(config.hidden, 2 * config.horizon, vb.pp("head")).map_err(candle)?;
        let mut rng = config.seed ^ 0x9e37_79b9_7f4a_7c15;
        let params = Params::init(&varmap, &mut rng, config.hidden)?;
        let mut f = Self {
            plain: Plain::default(),
            norm: Normaliser {
                n: 0,
                mean: vec![0.0; config.features],
                m2: vec![0.0; config.features],
            },
            config,
            params,
            lstm,
            head,
            history: VecDeque::with_capacity(config.memory + 1),
            seen: 0,
            rng,
        };
        f.refresh_plain()?;
        Ok(f)
    }

    /// Copies the weights out of candle for [`Plain::forward`].
    fn refresh_plain(&mut self) -> Result<()> {
        let get = |suffix: &str| self.params.values(suffix);
        self.plain = Plain {
            w_ih: get("lstm.weight_ih_l0")?,
            w_hh: get("lstm.weight_hh_l0")?,
            b_ih: get("lstm.bias_ih_l0")?,
            b_hh: get("lstm.bias_hh_l0")?,
            head_w: get("head.weight")?,
            head_b: get("head.bias")?,
            features: self.config.features,
            hidden: self.config.hidden,
        };
        Ok(())
    }

    pub fn config(&self) -> &LstmConfig {
        &self.config
    }

    /// Rows learned so far.
    pub fn seen(&self) -> u64 {
        self.seen
    }

    /// Learns the next row (one value per feature; a non-finite value repeats the last one),
    /// and every `train_every` rows takes one training step.
    pub fn update(&mut self, row: &[f64]) -> Result<()> {
        if row.len() != self.config.features {
            return Err(Error::Config {
                reason: format!(
                    "a row has {} values, the model {} features",
                    row.len(),
                    self.config.features
                ),
            });
        }
        let last = self.history.back();
        let row: Vec<f64> = row
            .iter()
            .enumerate()
            .map(|(i, &x)| {
                if x.is_finite() {
                    x
                } else {
                    last.map_or(0.0, |l| l[i])
                }
            })
            .collect();
        self.norm.push(&row);
        self.history.push_back(row);
        if self.history.len() > self.config.memory {
            self.history.pop_front();
        }
        self.seen += 1;
        let c = self.config;
        if self.seen.is_multiple_of(c.train_every as u64)
            && self.history.len() >= c.window + c.horizon
        {
            self.train_step()?;
        }
        Ok(())
    }

    /// The network's input for windows ending (exclusive) at each of `ends`.
    fn inputs(&self, ends: &[usize]) -> Result<Tensor> {
        let c = self.config;
        let mut data = Vec::with_capacity(ends.len() * c.window * c.features);
        for &e in ends {
            for r in e - c.window..e {
                for (i, &x) in self.history[r].iter().enumerate() {
                    data.push(self.norm.norm(i, x));
                }
            }
        }
        Tensor::from_vec(data, (ends.len(), c.window, c.features), &Device::Cpu).map_err(candle)
    }

    /// (mean, log-variance), each `[batch, horizon]`, in normalised units.
    fn forward(&self, input: &Tensor) -> Result<(Tensor, Tensor)> {
        let states = self.lstm.seq(input).map_err(candle)?;
        let last = states.last().ok_or_else(|| Error::Model {
            reason: "empty input window".into(),
        })?;
        let out = self.head.forward(last.h()).map_err(candle)?;
        let h = self.config.horizon;
        let mean = out.narrow(D::Minus1, 0, h).map_err(candle)?;
        let log_var = out
            .narrow(D::Minus1, h, h)
            .and_then(|t| t.clamp(-10.0f32, 10.0f32))
            .map_err(candle)?;
        Ok((mean, log_var))
    }

    fn train_step(&mut self) -> Result<()> {
        let c = self.config;
        let len = self.history.len();
        // Window ends in [window, len − horizon], drawn from the seeded generator.
        let span = len - c.horizon - c.window + 1;
        let ends: Vec<usize> = (0..c.batch)
            .map(|_| c.window + ((next(&mut self.rng) * span as f64) as usize).min(span - 1))
            .collect();
        let input = self.inputs(&ends)?;
        let mut target = Vec::with_capacity(c.batch * c.horizon);
        for &e in &ends {
            for r in e..e + c.horizon {
                target.push(self.norm.norm(0, self.history[r][0]));
            }
        }
        let target =
            Tensor::from_vec(target, (c.batch, c.horizon), &Device::Cpu).map_err(candle)?;
        let (mean, log_var) = self.forward(&input)?;
        // Gaussian negative log-likelihood: ½ (log σ² + (y − μ)² / σ²).
        let loss = (log_var.clone()
            + ((target - mean).map_err(candle)?.sqr().map_err(candle)?
                / log_var.exp().map_err(candle)?)
            .map_err(candle)?)
        .map_err(candle)?
        .mean_all()
        .map_err(candle)?;
        self.params.adam(&loss, c.learning_rate)?;
        self.refresh_plain()
    }

    /// The next `horizon` steps of feature 0, or `None` before `window` rows are known.
    pub fn forecast(&self) -> Result<Option<Vec<Prediction>>> {
        let c = self.config;
        let len = self.history.len();
        if len < c.window {
            return Ok(None);
        }
        let window: Vec<f32> = self
            .history
            .range(len - c.window..)
            .flat_map(|row| row.iter().enumerate().map(|(i, &x)| self.norm.norm(i, x)))
            .collect();
        let out = self.plain.forward(&window);
        let (mu, sd) = (self.norm.mean[0], self.norm.std(0));
        Ok(Some(
            (0..c.horizon)
                .map(|k| Prediction {
                    mean: mu + f64::from(out[k]) * sd,
                    std: (0.5 * f64::from(out[c.horizon + k].clamp(-10.0, 10.0))).exp() * sd,
                })
                .collect(),
        ))
    }

    const MAGIC: [u8; 4] = *b"FSLM";
    const VERSION: u32 = 1;

    /// Weights, optimiser moments, normaliser, history and generator: everything needed to
    /// continue exactly.
    pub fn checkpoint(&self) -> Result<Vec<u8>> {
        let mut w = Writer::default();
        let c = &self.config;
        for x in [
            c.features,
            c.window,
            c.horizon,
            c.hidden,
            c.batch,
            c.train_every,
            c.memory,
        ] {
            w.usize(x);
        }
        w.f64(c.learning_rate);
        w.u64(c.seed);
        w.u64(self.params.steps);
        w.u64(self.seen);
        w.u64(self.rng);
        w.u64(self.norm.n);
        w.f64s(self.norm.mean.iter());
        w.f64s(self.norm.m2.iter());
        w.usize(self.history.len());
        for row in &self.history {
            w.f64s(row.iter());
        }
        self.params.write(&mut w)?;
        Ok(w.finish(Self::MAGIC, Self::VERSION))
    }

    /// Restores a forecaster from [`checkpoint`](Self::checkpoint) bytes.
    pub fn restore(bytes: &[u8]) -> Result<Self> {
        let mut r = Reader::open(bytes, Self::MAGIC, Self::VERSION)?;
        const MAX: usize = 1 << 24;
        let config = LstmConfig {
            features: r.usize(MAX)?,
            window: r.usize(MAX)?,
            horizon: r.usize(MAX)?,
            hidden: r.usize(MAX)?,
            batch: r.usize(MAX)?,
            train_every: r.usize(MAX)?,
            memory: r.usize(MAX)?,
            learning_rate: r.f64()?,
            seed: r.u64()?,
        };
        let mut f = Self::new(config)?;
        f.params.steps = r.u64()?;
        f.seen = r.u64()?;
        f.rng = r.u64()?;
        f.norm.n = r.u64()?;
        f.norm.mean = r.f64s(config.features)?;
        f.norm.m2 = r.f64s(config.features)?;
        if f.norm.mean.len() != config.features || f.norm.m2.len() != config.features {
            return Err(Error::Checkpoint {
                reason: "normaliser does not match the features".into(),
            });
        }
        let rows = r.usize(config.memory)?;
        for _ in 0..rows {
            let row = r.f64s(config.features)?;
            if row.len() != config.features {
                return Err(Error::Checkpoint {
                    reason: "a history row does not match the features".into(),
                });
            }
            f.history.push_back(row);
        }
        f.params.read(&mut r)?;
        r.end()?;
        f.refresh_plain()?;
        Ok(f)
    }
}

/// The network's weights as plain row-major arrays (candle's layout: gates in, forget, cell,
/// out; `y = x Wᵀ + b`).
#[derive(Debug, Clone, Default, PartialEq)]
struct Plain {
    w_ih: Vec<f32>,
    w_hh: Vec<f32>,
    b_ih: Vec<f32>,
    b_hh: Vec<f32>,
    head_w: Vec<f32>,
    head_b: Vec<f32>,
    features: usize,
    hidden: usize,
}

impl Plain {
    /// Runs a window (`rows × features`, normalised) from the zero state and returns the
    /// head's output (means, then log-variances).
    fn forward(&self, window: &[f32]) -> Vec<f32> {
        let (f, h) = (self.features, self.hidden);
        let sigmoid = |x: f32| 1.0 / (1.0 + (-x).exp());
        let (mut hs, mut cs) = (vec![0.0f32; h], vec![0.0f32; h]);
        let mut gates = vec![0.0f32; 4 * h];
        for x in window.chunks(f) {
            for (g, gate) in gates.iter_mut().enumerate() {
                let wi = &self.w_ih[g * f..(g + 1) * f];
                let wh = &self.w_hh[g * h..(g + 1) * h];
                *gate = self.b_ih[g]
                    + self.b_hh[g]
                    + wi.iter().zip(x).map(|(a, b)| a * b).sum::<f32>()
                    + wh.iter().zip(&hs).map(|(a, b)| a * b).sum::<f32>();
            }
            for k in 0..h {
                let i = sigmoid(gates[k]);
                let fg = sigmoid(gates[h + k]);
                let g = gates[2 * h + k].tanh();
                let o = sigmoid(gates[3 * h + k]);
                cs[k] = fg * cs[k] + i * g;
                hs[k] = o * cs[k].tanh();
            }
        }
        self.head_b
            .iter()
            .enumerate()
            .map(|(j, b)| {
                b + self.head_w[j * h..(j + 1) * h]
                    .iter()
                    .zip(&hs)
                    .map(|(a, b)| a * b)
                    .sum::<f32>()
            })
            .collect()
    }
}

#[cfg(test)]
#[path = "lstm/tests.rs"]
mod tests;
