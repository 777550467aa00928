//! # forestall-benches
//!
//! Load generators and peer comparisons for Forestall. Not a library for users: its binaries
//! produce the figures in `docs/BENCHMARKS.md`, each with the command that reproduces it.

pub mod prevent;
