//! # forestall-control
//!
//! The allocation loop: the one place where forecasts, risks and actuators meet.
//!
//! * [`round`]: one allocation round, usage in, limits out ([`round::Controller`]). The live
//!   loop and the replay backtest run the same code.
//! * [`live`]: the loop `serve` runs ([`live::Allocations`]). It consumes allocation
//!   requests, the rows of `ALLOCATE` continuous queries (usage, demands, risks), meters the
//!   components' cgroups into the store, and audits every decision as a measurement.
//! * [`usage`]: the built-in usage queries, one `ALLOCATE` continuous query per resource
//!   made from `[allocation.usage]`, listed and replaceable like any other.
//! * [`headroom`]: headroom priced per component, spent where it prevents most violations.
//! * [`config`]: the `[allocation]` section.
//! * [`replay`]: `forestall replay`, the allocation backtest over a recorded trace.
//!
//! Depends on `engine` (to store usage and the audit), `query` (the continuous queries it
//! consumes), `models` (forecasters, risk) and `actuators` (the engine and its plugins).
//! Only `server` depends on it.

pub mod config;
pub mod headroom;
pub mod live;
pub mod replay;
pub mod round;

pub mod usage;
