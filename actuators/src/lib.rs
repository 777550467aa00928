//! # forestall-actuators
//!
//! Forestall's allocation side: the resource pool and allocation engine (requests sized from
//! forecasts, preemption and deferral, hysteresis, cooldown, rollback), the feedback
//! controller, and the actuator plugins behind one trait (cgroup v1/v2, traffic control, I/O
//! priority, affinity and nice, webhook, dry-run).
//!
//! A leaf crate: it depends on no other Forestall crate.
//!
//! Built so far: the allocation engine with its pool, preferences, audit and feedback
//! controller ([`alloc`]), the [`Actuator`] trait with the [`Limits`] it applies, a recording
//! [`DryRun`] actuator, and the cgroup v1 and v2 plugins ([`cgroup_v1`], [`cgroup_v2`]).
//! Still to come (the allocation issue): cgroup v2 I/O, traffic control, I/O priority,
//! affinity/nice and the webhook.

pub mod alloc;
pub mod cgroup_v1;
pub mod cgroup_v2;

use std::sync::Mutex;

/// Errors of an actuator. Nothing an actuator cannot do passes silently.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The plugin cannot set this on this machine (controller missing, file absent).
    #[error("{actuator} cannot set {what} here: {why}")]
    Unsupported {
        actuator: &'static str,
        what: &'static str,
        why: String,
    },
    /// The kernel refused or the file could not be read or written.
    #[error("{actuator}: {op} {path}: {source}")]
    Io {
        actuator: &'static str,
        op: &'static str,
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    /// A value read back could not be understood.
    #[error("{actuator}: {path} holds {value:?}, not a number")]
    Parse {
        actuator: &'static str,
        path: std::path::PathBuf,
        value: String,
    },
    /// The request itself is wrong (a zero quota, a name that leaves the hierarchy).
    #[error("invalid request: {0}")]
    Invalid(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What a component gets; `None` leaves a resource as it is (on apply) or means "no limit"
/// (on read-back).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Limits {
    /// Hard CPU cap in thousandths of a core (1000 = one core).
    pub cpu_millicores: Option<u64>,
    /// Relative CPU share on the cgroup v2 scale: 1..=10000, default 100.
    pub cpu_weight: Option<u32>,
    /// Memory above which the kernel reclaims from the component first (a soft limit).
    pub memory_high_bytes: Option<u64>,
    /// Memory the component can never exceed.
    pub memory_max_bytes: Option<u64>,
    /// Bandwidth and operation caps on one block device.
    pub io: Option<IoLimit>,
}

/// Caps on one block device (`major:minor`); `None` leaves a direction unlimited on apply.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct IoLimit {
    pub device: (u32, u32),
    pub read_bps: Option<u64>,
    pub write_bps: Option<u64>,
    pub read_iops: Option<u64>,
    pub write_iops: Option<u64>,
}

/// Which parts of [`Limits`] a plugin can set here.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Capabilities {
    pub cpu_millicores: bool,
    pub cpu_weight: bool,
    pub memory_high: bool,
    pub memory_max: bool,
    pub io_max: bool,
}

impl Limits {
    /// Checks a request against what a plugin can do: every asked-for resource must be
    /// supported (`why` says why not), a CPU cap must be above zero and a weight within
    /// 1..=10000.
    pub fn check(
        &self,
        actuator: &'static str,
        caps: Capabilities,
        why: impl Fn() -> String,
    ) -> Result<()> {
        for (asked, can, what) in [
            (
                self.cpu_millicores.is_some(),
                caps.cpu_millicores,
                "a CPU quota",
            ),
            (self.cpu_weight.is_some(), caps.cpu_weight, "a CPU weight"),
            (
                self.memory_high_bytes.is_some(),
                caps.memory_high,
                "memory.high",
            ),
            (
                self.memory_max_bytes.is_some(),
                caps.memory_max,
                "memory.max",
            ),
        ] {
            if asked && !can {
                return Err(Error::Unsupported {
                    actuator,
                    what,
                    why: why(),
                });
            }
        }
        if self.cpu_millicores == Some(0) {
            return Err(Error::Invalid(
                "a CPU quota of 0 would stop the component".into(),
            ));
        }
        if let Some(w) = self.cpu_weight
            && !(1..=10_000).contains(&w)
        {
            return Err(Error::Invalid(format!(
                "CPU weight {w} is outside 1..=10000"
            )));
        }
        Ok(())
    }
}

/// The component an actuator acts on: its name and its cgroup path, relative to each
/// controller's root (`forestall/web-1`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub component: String,
    pub cgroup: String,
}

impl Target {
    /// A target whose cgroup path stays inside the hierarchy (no `..`, not absolute).
    pub fn new(component: impl Into<String>, cgroup: impl Into<String>) -> Result<Self> {
        let cgroup = cgroup.into();
        let bad = cgroup.is_empty()
            || cgroup.starts_with('/')
            || cgroup
                .split('/')
                .any(|p| p.is_empty() || p == "." || p == "..");
        if bad {
            return Err(Error::Invalid(format!(
                "cgroup path {cgroup:?} must be relative, without empty, `.` or `..` parts"
            )));
        }
        Ok(Self {
            component: component.into(),
            cgroup,
        })
    }
}

/// A way of moving resources to a component. Every method reports what it could not do.
pub trait Actuator: Send + Sync {
    fn name(&self) -> &'static str;
    /// What this plugin can set on this machine.
    fn capabilities(&self) -> Capabilities;
    /// Sets every `Some` field of `limits`; fails (having set nothing it could check first)
    /// when a field is not supported here.
    fn apply(&self, target: &Target, limits: &Limits) -> Result<()>;
    /// The limits in force, as the kernel reports them.
    fn read_back(&self, target: &Target) -> Result<Limits>;
    /// Lifts every limit this plugin can set.
    fn revert(&self, target: &Target) -> Result<()>;
}

/// An actuator that records what it was asked and changes nothing: dry-run mode, and what
/// the replay backtest drives.
#[derive(Debug, Default)]
pub struct DryRun {
    log: Mutex<Vec<(Target, Option<Limits>)>>,
}

impl DryRun {
    /// Every request so far: `Some(limits)` for an apply, `None` for a revert.
    pub fn requests(&self) -> Vec<(Target, Option<Limits>)> {
        self.log.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

impl Actuator for DryRun {
    fn name(&self) -> &'static str {
        "dry-run"
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            cpu_millicores: true,
            cpu_weight: true,
            memory_high: true,
            memory_max: true,
            io_max: true,
        }
    }

    fn apply(&self, target: &Target, limits: &Limits) -> Result<()> {
        self.log
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push((target.clone(), Some(*limits)));
        Ok(())
    }

    fn read_back(&self, target: &Target) -> Result<Limits> {
        // What was last applied (merged field by field), since nothing was really set.
        let log = self.log.lock().unwrap_or_else(|e| e.into_inner());
        let mut out = Limits::default();
        for (_, l) in log.iter().filter(|(t, _)| t == target) {
            match l {
                None => out = Limits::default(),
                Some(l) => {
                    out.cpu_millicores = l.cpu_millicores.or(out.cpu_millicores);
                    out.cpu_weight = l.cpu_weight.or(out.cpu_weight);
                    out.memory_high_bytes = l.memory_high_bytes.or(out.memory_high_bytes);
                    out.memory_max_bytes = l.memory_max_bytes.or(out.memory_max_bytes);
                    out.io = l.io.or(out.io);
                }
            }
        }
        Ok(out)
    }

    fn revert(&self, target: &Target) -> Result<()> {
        self.log
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push((target.clone(), None));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_cannot_leave_the_hierarchy() {
        for bad in ["", "/abs", "a/../b", "..", "a//b", "./a", "a/"] {
            assert!(Target::new("c", bad).is_err(), "{bad:?}");
        }
        assert_eq!(
            Target::new("c", "forestall/web-1").unwrap().cgroup,
            "forestall/web-1"
        );
    }

    #[test]
    fn dry_run_records_and_reads_back_what_it_was_asked() {
        let d = DryRun::default();
        let t = Target::new("web", "forestall/web").unwrap();
        let l = Limits {
            cpu_millicores: Some(500),
            ..Default::default()
        };
        d.apply(&t, &l).unwrap();
        d.apply(
            &t,
            &Limits {
                memory_max_bytes: Some(1 << 20),
                ..Default::default()
            },
        )
        .unwrap();
        let back = d.read_back(&t).unwrap();
        assert_eq!(
            (back.cpu_millicores, back.memory_max_bytes),
            (Some(500), Some(1 << 20))
        );
        d.revert(&t).unwrap();
        assert_eq!(d.read_back(&t).unwrap(), Limits::default());
        assert_eq!(d.requests().len(), 3);
    }
}
