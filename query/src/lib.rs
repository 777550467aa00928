//! # forestall-query
//!
//! Forestall's query layer: a DataFusion session in which every measurement is a table, one
//! `TableProvider` per measurement over the engine's scan API (time and tag predicates pushed
//! down, segments pruned by the manifest and the series bitmaps), the time-series SQL
//! functions (`date_bin_gapfill`, selectors, `forecast`, `anomaly_score`, `risk`) and the
//! continuous-query runtime.
//!
//! May depend on `forestall-engine` and `forestall-models`; never on `actuators` or `server`.
//! This crate is filled by the SQL issue; until then it has no items.
