//! What the candle networks ([`crate::lstm`], [`crate::global`]) share: their trainable
//! parameters with Adam's moments, a seeded initialisation, and the checkpoint of both.
//!
//! Everything here is deterministic under a seed: weights are drawn from our own generator,
//! not candle's, and the optimiser is ours, so that a checkpoint holds the moments and a
//! restored network continues exactly.

use candle_core::{Device, Tensor, Var};
use candle_nn::VarMap;

use crate::codec::{Reader, Writer};
use crate::{Error, Result};

pub(crate) fn candle(e: candle_core::Error) -> Error {
    Error::Model {
        reason: e.to_string(),
    }
}

/// The device the global LSTM runs on: with the `cuda` feature, the first CUDA GPU (if it
/// cannot be opened, the CPU, with a warning on stderr); without it, the CPU.
pub(crate) fn device() -> Device {
    #[cfg(feature = "cuda")]
    {
        match Device::new_cuda(0) {
            Ok(d) => return d,
            Err(e) => eprintln!("forestall-models: no CUDA device ({e}); the CPU runs the LSTM"),
        }
    }
    Device::Cpu
}

/// A uniform draw in [0, 1) from a 64-bit LCG state.
pub(crate) fn next(state: &mut u64) -> f64 {
    *state = state
        .wrapping_mul(6_364_136_223_846_793_005)
        .wrapping_add(1_442_695_040_888_963_407);
    (*state >> 11) as f64 / (1u64 << 53) as f64
}

/// A network's trainable variables, in a fixed order (sorted by name), and Adam's state.
#[derive(Debug)]
pub(crate) struct Params {
    vars: Vec<(String, Var)>,
    m: Vec<Tensor>,
    v: Vec<Tensor>,
    /// Optimiser steps taken.
    pub(crate) steps: u64,
}

impl Params {
    /// Takes the variables of `varmap` and draws each from Uniform(−1/√fan_in, 1/√fan_in)
    /// with `rng` (a weight's fan-in is its last dimension; a bias's is `bias_fan_in`).
    pub(crate) fn init(varmap: &VarMap, rng: &mut u64, bias_fan_in: usize) -> Result<Self> {
        let mut vars: Vec<(String, Var)> = varmap
            .data()
            .lock()
            .map_err(|_| Error::Model {
                reason: "variable map lock poisoned".into(),
            })?
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        vars.sort_by(|a, b| a.0.cmp(&b.0));
        for (name, var) in &vars {
            let shape = var.as_tensor().dims().to_vec();
            let fan_in = if name.contains("weight") {
                *shape.last().unwrap_or(&1)
            } else {
                bias_fan_in
            };
            let bound = 1.0 / (fan_in as f64).sqrt();
            let n: usize = shape.iter().product();
            let values: Vec<f32> = (0..n)
                .map(|_| ((next(rng) * 2.0 - 1.0) * bound) as f32)
                .collect();
            let device = var.as_tensor().device().clone();
            var.set(&Tensor::from_vec(values, shape.as_slice(), &device).map_err(candle)?)
                .map_err(candle)?;
        }
        let zeros = |var: &Var| var.as_tensor().zeros_like().map_err(candle);
        let m = vars.iter().map(|(_, v)| zeros(v)).collect::<Result<_>>()?;
        let v = vars.iter().map(|(_, v)| zeros(v)).collect::<Result<_>>()?;
        Ok(Self {
            vars,
            m,
            v,
            steps: 0,
        })
    }

    /// The values of the variable whose name ends with `suffix`, flattened (row-major).
    pub(crate) fn values(&self, suffix: &str) -> Result<Vec<f32>> {
        let (_, var) = self
            .vars
            .iter()
            .find(|(n, _)| n.ends_with(suffix))
            .ok_or_else(|| Error::Model {
                reason: format!("no variable {suffix}"),
            })?;
        var.as_tensor()
            .flatten_all()
            .and_then(|t| t.to_vec1())
            .map_err(candle)
    }

    /// One Adam step (β₁ 0.9, β₂ 0.999, bias-corrected) down the gradient of `loss`.
    pub(crate) fn adam(&mut self, loss: &Tensor, learning_rate: f64) -> Result<()> {
        let grads = loss.backward().map_err(candle)?;
        self.steps += 1;
        let (b1, b2, eps): (f64, f64, f64) = (0.9, 0.999, 1e-8);
        let t = i32::try_from(self.steps).unwrap_or(i32::MAX);
        let lr = learning_rate * (1.0 - b2.powi(t)).sqrt() / (1.0 - b1.powi(t));
        for (k, (_, var)) in self.vars.iter().enumerate() {
            let Some(g) = grads.get(var.as_tensor()) else {
                continue;
            };
            let m = ((&self.m[k] * b1).map_err(candle)? + (g * (1.0 - b1)).map_err(candle)?)
                .map_err(candle)?;
            let v = ((&self.v[k] * b2).map_err(candle)?
                + (g.sqr().map_err(candle)? * (1.0 - b2)).map_err(candle)?)
            .map_err(candle)?;
            let step = ((&m * lr).map_err(candle)?
                / (v.sqrt().map_err(candle)? + eps).map_err(candle)?)
            .map_err(candle)?;
            var.set(&(var.as_tensor() - step).map_err(candle)?)
                .map_err(candle)?;
            self.m[k] = m;
            self.v[k] = v;
        }
        Ok(())
    }

    /// Every variable with its two moments, in order (the step count is the caller's to
    /// write, where its format always had it).
    pub(crate) fn write(&self, w: &mut Writer) -> Result<()> {
        let mut tensor = |t: &Tensor| -> Result<()> {
            let v: Vec<f32> = t.flatten_all().and_then(|t| t.to_vec1()).map_err(candle)?;
            let v: Vec<f64> = v.into_iter().map(f64::from).collect();
            w.f64s(v.iter());
            Ok(())
        };
        for (k, (_, var)) in self.vars.iter().enumerate() {
            tensor(var.as_tensor())?;
            tensor(&self.m[k])?;
            tensor(&self.v[k])?;
        }
        Ok(())
    }

    /// Reads what [`write`](Self::write) wrote into these (same-shaped) variables.
    pub(crate) fn read(&mut self, r: &mut Reader<'_>) -> Result<()> {
        let mut tensor = |like: &Tensor| -> Result<Tensor> {
            let v = r.f64s(1 << 24)?;
            if v.len() != like.elem_count() {
                return Err(Error::Checkpoint {
                    reason: "a tensor does not match the model's shape".into(),
                });
            }
            let v: Vec<f32> = v.into_iter().map(|x| x as f32).collect();
            Tensor::from_vec(v, like.dims(), like.device()).map_err(candle)
        };
        for k in 0..self.vars.len() {
            let w = tensor(self.vars[k].1.as_tensor())?;
            self.vars[k].1.set(&w).map_err(candle)?;
            self.m[k] = tensor(&self.m[k])?;
            self.v[k] = tensor(&self.v[k])?;
        }
        Ok(())
    }
}
