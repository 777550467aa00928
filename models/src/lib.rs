//! # forestall-models
//!
//! Forestall's models: multi-step probabilistic forecasters (an LSTM on candle, with seasonal
//! naive and Holt-Winters/ETS beside it), the anomaly likelihood built on their prediction
//! errors, and the Bayesian network that turns a component's metric states and health into a
//! risk score per resource, with its reasons. Online training and checkpoints live here too.
//!
//! A leaf crate: it works on plain slices and Arrow arrays and depends on no other Forestall
//! crate. This crate is filled by the models issue; until then it has no items.
