//! # forestall-models
//!
//! Forestall's models: multi-step probabilistic forecasters (an LSTM on candle, with seasonal
//! naive and Holt-Winters/ETS beside it), the anomaly likelihood built on their prediction
//! errors, and the Bayesian network that turns a component's metric states and health into a
//! risk score per resource, with its reasons. Online training and checkpoints live here too.
//!
//! A leaf crate: it works on plain slices and depends on no other Forestall crate.
//!
//! Modules: [`forecast`] (streaming forecasters with conformal intervals and the automatic
//! choice, [`forecast::evaluation`]), [`global`] (one LSTM for a fleet of series, whose
//! forecasts compete in each series' automatic choice), [`lstm`] (a per-series LSTM on candle,
//! trained continuously), [`detector`] and [`likelihood`] (the anomaly score), [`bayes`]
//! (Bayesian networks: inference, structure learning, explanations), [`risk`] (a component's
//! risk network), [`codec`] (the checkpoint format) and [`nab`] (the NAB benchmark's layout
//! and scorer).

pub mod bayes;
pub mod codec;
pub mod detector;
pub mod forecast;
pub mod global;
pub mod likelihood;
pub mod lstm;
pub mod nab;
mod nn;
pub mod risk;

use std::path::PathBuf;

/// Errors of the models crate.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("read {path}: {reason}")]
    Data { path: PathBuf, reason: String },
    #[error("invalid model config: {reason}")]
    Config { reason: String },
    #[error("bayesian network: {reason}")]
    Network { reason: String },
    #[error("model: {reason}")]
    Model { reason: String },
    #[error("read checkpoint: {reason}")]
    Checkpoint { reason: String },
}

/// The models crate's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;
