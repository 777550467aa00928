//! From the engine's allocations to the kernel: [`Units`] turns an allocation (in the units
//! the metrics use) into [`Limits`], and a [`Stack`] of plugins applies them, each field by
//! the first plugin that can set it here.

use crate::alloc::{PerResource, Resource};
use crate::{Actuator, Capabilities, Error, IoLimit, Limits, NetLimit, Result, Target};

/// What one unit of each resource's allocation is, and which block device disk I/O means.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Units {
    /// CPU allocations are in MHz of this many MHz per core (a core's clock), or in cores
    /// when this is 1.
    pub cpu_per_core: f64,
    /// Bytes in one unit of memory allocation (MB: 2^20).
    pub mem_bytes: f64,
    /// Bytes per second in one unit of network allocation (KB/s: 1024).
    pub net_bytes_per_sec: f64,
    /// Bytes per second in one unit of disk allocation (KB/s: 1024).
    pub disk_bytes_per_sec: f64,
    /// The device disk limits apply to; `None` leaves disk I/O alone.
    pub disk_device: Option<(u32, u32)>,
    /// `memory.high` (reclaim starts) as a share of the memory allocation, which is
    /// `memory.max`; the engine's threshold θ is the natural choice.
    pub memory_high_share: f64,
}

impl Units {
    /// Allocations in the kernel's own units (cores, bytes, bytes per second), disk I/O left
    /// alone, and `memory.high` at `memory_high_share` of the memory allocation.
    pub fn native(memory_high_share: f64) -> Self {
        Self {
            cpu_per_core: 1.0,
            mem_bytes: 1.0,
            net_bytes_per_sec: 1.0,
            disk_bytes_per_sec: 1.0,
            disk_device: None,
            memory_high_share,
        }
    }

    /// The limits that hold a component to `alloc`: a CPU quota, memory high and max,
    /// egress bandwidth (guaranteed and ceiling alike), and read and write bandwidth on the
    /// disk device. Non-finite or non-positive amounts leave that resource alone.
    pub fn limits(&self, alloc: PerResource<f64>) -> Limits {
        let amount = |r: Resource| Some(alloc[r.index()]).filter(|v| v.is_finite() && *v > 0.0);
        let cpu =
            amount(Resource::Cpu).map(|v| ((v / self.cpu_per_core * 1000.0).ceil() as u64).max(1));
        let mem = amount(Resource::Mem).map(|v| (v * self.mem_bytes) as u64);
        let net = amount(Resource::Net).map(|v| {
            let rate = ((v * self.net_bytes_per_sec) as u64).max(1);
            NetLimit {
                rate_bytes: rate,
                ceil_bytes: rate,
            }
        });
        let io = match (amount(Resource::Disk), self.disk_device) {
            (Some(v), Some(device)) => {
                let bps = ((v * self.disk_bytes_per_sec) as u64).max(1);
                Some(IoLimit {
                    device,
                    read_bps: Some(bps),
                    write_bps: Some(bps),
                    ..Default::default()
                })
            }
            _ => None,
        };
        Limits {
            cpu_millicores: cpu,
            memory_max_bytes: mem,
            memory_high_bytes: mem.map(|m| (m as f64 * self.memory_high_share) as u64),
            net,
            io,
            ..Limits::default()
        }
    }
}

/// Several plugins acting as one: every field of a request goes to the first plugin that can
/// set it here. A request with a field no plugin can set is refused before any plugin acts.
pub struct Stack {
    plugins: Vec<Box<dyn Actuator>>,
}

impl std::fmt::Debug for Stack {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list()
            .entries(self.plugins.iter().map(|p| p.name()))
            .finish()
    }
}

/// The fields of `l` that `caps` allows.
fn part(l: &Limits, caps: Capabilities) -> Limits {
    Limits {
        cpu_millicores: l.cpu_millicores.filter(|_| caps.cpu_millicores),
        cpu_weight: l.cpu_weight.filter(|_| caps.cpu_weight),
        memory_high_bytes: l.memory_high_bytes.filter(|_| caps.memory_high),
        memory_max_bytes: l.memory_max_bytes.filter(|_| caps.memory_max),
        io: l.io.filter(|_| caps.io_max),
        io_weight: l.io_weight.filter(|_| caps.io_weight),
        net: l.net.filter(|_| caps.net),
        cpus: l.cpus.filter(|_| caps.cpus),
        nice: l.nice.filter(|_| caps.nice),
        io_priority: l.io_priority.filter(|_| caps.io_priority),
    }
}

/// Field by field, `f` of `a` and `b`.
fn zip(a: Capabilities, b: Capabilities, f: fn(bool, bool) -> bool) -> Capabilities {
    Capabilities {
        cpu_millicores: f(a.cpu_millicores, b.cpu_millicores),
        cpu_weight: f(a.cpu_weight, b.cpu_weight),
        memory_high: f(a.memory_high, b.memory_high),
        memory_max: f(a.memory_max, b.memory_max),
        io_max: f(a.io_max, b.io_max),
        io_weight: f(a.io_weight, b.io_weight),
        net: f(a.net, b.net),
        cpus: f(a.cpus, b.cpus),
        nice: f(a.nice, b.nice),
        io_priority: f(a.io_priority, b.io_priority),
    }
}

impl Stack {
    /// The plugins in order of preference.
    pub fn new(plugins: Vec<Box<dyn Actuator>>) -> Self {
        Self { plugins }
    }

    /// Each plugin with the fields it owns here: those it can set and no earlier plugin
    /// can (plugins that own nothing left out). Asks each plugin its capabilities once.
    fn assigned(&self) -> Vec<(&dyn Actuator, Capabilities)> {
        let mut taken = Capabilities::default();
        let mut out = Vec::new();
        for p in &self.plugins {
            let mine = zip(p.capabilities(), taken, |can, held| can && !held);
            taken = zip(taken, mine, |a, b| a || b);
            if mine != Capabilities::default() {
                out.push((p.as_ref(), mine));
            }
        }
        out
    }
}

impl Actuator for Stack {
    fn name(&self) -> &'static str {
        "stack"
    }

    fn capabilities(&self) -> Capabilities {
        self.assigned()
            .into_iter()
            .fold(Capabilities::default(), |acc, (_, caps)| {
                zip(acc, caps, |a, b| a || b)
            })
    }

    fn apply(&self, target: &Target, limits: &Limits) -> Result<()> {
        let assigned = self.assigned();
        let caps = assigned
            .iter()
            .fold(Capabilities::default(), |acc, (_, c)| {
                zip(acc, *c, |a, b| a || b)
            });
        let names: Vec<&str> = self.plugins.iter().map(|p| p.name()).collect();
        limits.check("stack", caps, || {
            format!("none of its plugins ({}) can", names.join(", "))
        })?;
        for (plugin, caps) in assigned {
            let mine = part(limits, caps);
            if mine != Limits::default() {
                plugin.apply(target, &mine)?;
            }
        }
        Ok(())
    }

    fn read_back(&self, target: &Target) -> Result<Limits> {
        let mut out = Limits::default();
        for (plugin, caps) in self.assigned() {
            out = out.then(&part(&plugin.read_back(target)?, caps));
        }
        Ok(out)
    }

    fn revert(&self, target: &Target) -> Result<()> {
        // Every plugin is asked, even after one fails; the first failure is reported.
        let mut first: Option<Error> = None;
        for p in &self.plugins {
            if let Err(e) = p.revert(target) {
                first.get_or_insert(e);
            }
        }
        first.map_or(Ok(()), Err)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sched::Scheduling;
    use crate::testing::{ROOT, fixture};
    use crate::{DryRun, cgroup_v1::CgroupV1};

    /// The Bitbrains trace's units: MHz of 2.6 GHz cores, MB, KB/s.
    const TRACE: Units = Units {
        cpu_per_core: 2600.0,
        mem_bytes: 1048576.0,
        net_bytes_per_sec: 1024.0,
        disk_bytes_per_sec: 1024.0,
        disk_device: Some((8, 0)),
        memory_high_share: 0.9,
    };

    #[test]
    fn units_turn_an_allocation_into_limits() {
        let l = TRACE.limits([1300.0, 512.0, 100.0, 2048.0]);
        assert_eq!(l.cpu_millicores, Some(500));
        assert_eq!(l.memory_max_bytes, Some(512 << 20));
        assert_eq!(l.memory_high_bytes, Some((512.0 * 1048576.0 * 0.9) as u64));
        assert_eq!(
            l.net,
            Some(NetLimit {
                rate_bytes: 102_400,
                ceil_bytes: 102_400
            })
        );
        let io = l.io.unwrap();
        assert_eq!(
            (io.device, io.read_bps, io.write_bps),
            ((8, 0), Some(2 << 20), Some(2 << 20))
        );
        // Nothing for amounts that are not there, and at least 1 millicore for a sliver.
        let l = Units {
            disk_device: None,
            ..TRACE
        }
        .limits([0.001, f64::NAN, 0.0, 10.0]);
        assert_eq!(
            l,
            Limits {
                cpu_millicores: Some(1),
                ..Limits::default()
            }
        );
    }

    #[test]
    fn a_stack_routes_each_field_to_the_first_plugin_that_can_set_it() {
        let f = fixture("stack");
        let stack = Stack::new(vec![
            Box::new(CgroupV1::new(ROOT)),
            Box::new(Scheduling::new(format!("{ROOT}/cpu"))),
        ]);
        let caps = stack.capabilities();
        assert!(caps.cpu_millicores && caps.memory_max && caps.nice && !caps.net);
        let mut want = TRACE.limits([1300.0, 256.0, 0.0, 0.0]);
        want.nice = Some(4);
        stack.apply(&f.target, &want).unwrap();
        let back = stack.read_back(&f.target).unwrap();
        assert_eq!(
            (back.cpu_millicores, back.memory_max_bytes, back.nice),
            (Some(500), Some(256 << 20), Some(4))
        );
        // The kernel rounds memory.soft_limit_in_bytes to pages.
        let high = back.memory_high_bytes.unwrap();
        assert!(
            high.abs_diff(want.memory_high_bytes.unwrap()) < 4096,
            "{high}"
        );
        // Bandwidth: no plugin here can set it, so nothing at all is applied.
        let with_net = TRACE.limits([2600.0, 128.0, 100.0, 0.0]);
        let err = stack.apply(&f.target, &with_net).unwrap_err();
        assert!(
            err.to_string()
                .contains("none of its plugins (cgroup-v1, sched)"),
            "{err}"
        );
        assert_eq!(
            stack.read_back(&f.target).unwrap().cpu_millicores,
            Some(500)
        );
        stack.revert(&f.target).unwrap();
        let back = stack.read_back(&f.target).unwrap();
        assert_eq!(
            (back.cpu_millicores, back.memory_max_bytes, back.nice),
            (None, None, None)
        );
    }

    #[test]
    fn a_stack_prefers_earlier_plugins_and_reverts_them_all() {
        let first = DryRun::default();
        let stack = Stack::new(vec![Box::new(first), Box::new(DryRun::default())]);
        let t = Target::new("web", "forestall/web").unwrap();
        let l = TRACE.limits([2600.0, 64.0, 10.0, 10.0]);
        stack.apply(&t, &l).unwrap();
        assert_eq!(stack.read_back(&t).unwrap(), l);
        let assigned = stack.assigned();
        assert_eq!(assigned.len(), 1, "the first dry run takes everything");
        stack.revert(&t).unwrap();
        assert_eq!(stack.read_back(&t).unwrap(), Limits::default());
    }
}
