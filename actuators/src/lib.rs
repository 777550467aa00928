//! # forestall-actuators
//!
//! Forestall's allocation side: the resource pool and allocation engine (requests sized from
//! forecasts, preemption and deferral, hysteresis, cooldown, rollback), the feedback
//! controller, and the actuator plugins behind one trait (cgroup v1/v2, traffic control, I/O
//! priority, affinity and nice, webhook, dry-run).
//!
//! A leaf crate: it depends on no other Forestall crate. This crate is filled by the
//! allocation issue; until then it has no items.
