//! # forestall-actuators
//!
//! Forestall's allocation side: the resource pool and allocation engine (requests sized from
//! forecasts, preemption and deferral, hysteresis, cooldown, rollback), the feedback
//! controller, and the actuator plugins behind one trait (cgroup v1/v2, traffic control, I/O
//! priority, affinity and nice, webhook, dry-run).
//!
//! A leaf crate: it depends on no other Forestall crate.
//!
//! The allocation engine with its pool, preferences, audit and feedback controller
//! ([`alloc`]); the [`Actuator`] trait with the [`Limits`] it applies; and the plugins: a
//! recording [`DryRun`], [`cgroup_v1`], [`cgroup_v2`], scheduling (affinity, nice, I/O
//! priority: [`sched`]), traffic control ([`tc`]) and a [`webhook`]; [`stack`] turns an
//! allocation in the metrics' units into [`Limits`] and applies them through several plugins
//! as one.

pub mod alloc;
pub mod cgroup_v1;
pub mod cgroup_v2;
pub mod sched;
pub mod stack;
pub mod tc;
pub mod webhook;

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
    /// A command the plugin runs (`tc`) failed; `message` is its own error output.
    #[error("{actuator}: `{command}` failed: {message}")]
    Command {
        actuator: &'static str,
        command: String,
        message: String,
    },
    /// The remote end (a webhook) answered with an error.
    #[error("{actuator}: {url} answered {status}: {body}")]
    Remote {
        actuator: &'static str,
        url: String,
        status: u16,
        body: String,
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
    /// Relative block I/O share on the cgroup v2 scale: 1..=10000, default 100.
    pub io_weight: Option<u32>,
    /// Egress bandwidth for the component's traffic.
    pub net: Option<NetLimit>,
    /// The CPUs the component's threads may run on.
    pub cpus: Option<CpuSet>,
    /// Scheduling priority of the component's threads: -20 (first) ..= 19 (last).
    pub nice: Option<i32>,
    /// I/O scheduling class and level of the component's threads.
    pub io_priority: Option<IoPriority>,
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

/// Egress bandwidth in bytes per second: `rate` is guaranteed, `ceil` (at least `rate`) is
/// what the component may borrow up to when the link has room.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NetLimit {
    pub rate_bytes: u64,
    pub ceil_bytes: u64,
}

/// A set of CPUs (0..1024, as the kernel's default `cpu_set_t`).
#[derive(Clone, Copy, Default, PartialEq, Eq)]
pub struct CpuSet {
    bits: [u64; 16],
}

impl CpuSet {
    pub const MAX: usize = 1024;

    /// Fails on a CPU number of 1024 or more.
    pub fn new(cpus: impl IntoIterator<Item = usize>) -> Result<Self> {
        let mut set = Self::default();
        for c in cpus {
            if c >= Self::MAX {
                return Err(Error::Invalid(format!(
                    "CPU {c} is beyond the {} a CPU set holds",
                    Self::MAX
                )));
            }
            set.bits[c / 64] |= 1 << (c % 64);
        }
        Ok(set)
    }

    pub fn contains(&self, cpu: usize) -> bool {
        cpu < Self::MAX && self.bits[cpu / 64] & (1 << (cpu % 64)) != 0
    }

    pub fn is_empty(&self) -> bool {
        self.bits.iter().all(|w| *w == 0)
    }

    pub fn iter(&self) -> impl Iterator<Item = usize> + '_ {
        (0..Self::MAX).filter(|c| self.contains(*c))
    }
}

impl std::fmt::Debug for CpuSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_set().entries(self.iter()).finish()
    }
}

/// An I/O scheduling class (`ioprio_set(2)`); levels run 0 (first) ..= 7 (last).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IoPriority {
    /// The kernel's default: the level follows the nice value.
    None,
    RealTime(u8),
    BestEffort(u8),
    Idle,
}

/// Which parts of [`Limits`] a plugin can set here.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Capabilities {
    pub cpu_millicores: bool,
    pub cpu_weight: bool,
    pub memory_high: bool,
    pub memory_max: bool,
    pub io_max: bool,
    pub io_weight: bool,
    pub net: bool,
    pub cpus: bool,
    pub nice: bool,
    pub io_priority: bool,
}

impl Capabilities {
    /// Everything: what a plugin that only records or forwards requests can take.
    pub const ALL: Capabilities = Capabilities {
        cpu_millicores: true,
        cpu_weight: true,
        memory_high: true,
        memory_max: true,
        io_max: true,
        io_weight: true,
        net: true,
        cpus: true,
        nice: true,
        io_priority: true,
    };
}

impl Limits {
    /// Checks a request against what a plugin can do: every asked-for resource must be
    /// supported (`why` says why not), and every value must be one the kernel takes.
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
            (self.io.is_some(), caps.io_max, "I/O caps"),
            (self.io_weight.is_some(), caps.io_weight, "an I/O weight"),
            (self.net.is_some(), caps.net, "network bandwidth"),
            (self.cpus.is_some(), caps.cpus, "CPU affinity"),
            (self.nice.is_some(), caps.nice, "a nice value"),
            (
                self.io_priority.is_some(),
                caps.io_priority,
                "an I/O priority",
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
        let invalid = |m: String| Err(Error::Invalid(m));
        if self.cpu_millicores == Some(0) {
            return invalid("a CPU quota of 0 would stop the component".into());
        }
        for (w, what) in [(self.cpu_weight, "CPU"), (self.io_weight, "I/O")] {
            if let Some(w) = w
                && !(1..=10_000).contains(&w)
            {
                return invalid(format!("{what} weight {w} is outside 1..=10000"));
            }
        }
        if let Some(n) = self.net
            && (n.rate_bytes == 0 || n.ceil_bytes < n.rate_bytes)
        {
            return invalid(format!(
                "bandwidth rate {} ceil {} must be above 0 with ceil >= rate",
                n.rate_bytes, n.ceil_bytes
            ));
        }
        if self.cpus.is_some_and(|c| c.is_empty()) {
            return invalid("an empty CPU set would stop the component".into());
        }
        if let Some(n) = self.nice
            && !(-20..=19).contains(&n)
        {
            return invalid(format!("nice {n} is outside -20..=19"));
        }
        if let Some(IoPriority::RealTime(l) | IoPriority::BestEffort(l)) = self.io_priority
            && l > 7
        {
            return invalid(format!("I/O priority level {l} is outside 0..=7"));
        }
        Ok(())
    }

    /// `self` with every field `later` sets replaced: what is in force after applying `later`.
    pub fn then(self, later: &Limits) -> Limits {
        Limits {
            cpu_millicores: later.cpu_millicores.or(self.cpu_millicores),
            cpu_weight: later.cpu_weight.or(self.cpu_weight),
            memory_high_bytes: later.memory_high_bytes.or(self.memory_high_bytes),
            memory_max_bytes: later.memory_max_bytes.or(self.memory_max_bytes),
            io: later.io.or(self.io),
            io_weight: later.io_weight.or(self.io_weight),
            net: later.net.or(self.net),
            cpus: later.cpus.or(self.cpus),
            nice: later.nice.or(self.nice),
            io_priority: later.io_priority.or(self.io_priority),
        }
    }
}

/// The component an actuator acts on: its name, its cgroup path relative to each
/// controller's root (`forestall/web-1`), and the network flows that are its traffic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub component: String,
    pub cgroup: String,
    pub flows: Vec<Flow>,
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
            flows: Vec::new(),
        })
    }

    /// Adds a flow that counts as this component's traffic.
    pub fn with_flow(mut self, flow: Flow) -> Self {
        self.flows.push(flow);
        self
    }
}

/// IPv4 packets that belong to a component: every `Some` field must match.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Flow {
    /// Source network (address, prefix length).
    pub src: Option<(std::net::Ipv4Addr, u8)>,
    /// Destination network (address, prefix length).
    pub dst: Option<(std::net::Ipv4Addr, u8)>,
    pub sport: Option<u16>,
    pub dport: Option<u16>,
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

/// A shared actuator acts as the one it shares (a caller can keep a handle on a [`DryRun`]
/// it handed over).
impl<T: Actuator + ?Sized> Actuator for std::sync::Arc<T> {
    fn name(&self) -> &'static str {
        (**self).name()
    }
    fn capabilities(&self) -> Capabilities {
        (**self).capabilities()
    }
    fn apply(&self, target: &Target, limits: &Limits) -> Result<()> {
        (**self).apply(target, limits)
    }
    fn read_back(&self, target: &Target) -> Result<Limits> {
        (**self).read_back(target)
    }
    fn revert(&self, target: &Target) -> Result<()> {
        (**self).revert(target)
    }
}

/// What a component has used, as its cgroup counts it. Counters are cumulative since the
/// cgroup was created; a collector turns two readings into rates. Each resource is read on
/// its own: one that cannot be read is `None` and says why in `problems`, and the others
/// are still read.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Usage {
    /// Why a resource could not be read (a controller's group missing, say), one per
    /// resource that failed.
    pub problems: Vec<String>,
    /// CPU time, seconds.
    pub cpu_seconds: Option<f64>,
    /// Memory in use now, without inactive file cache (the working set, as the kubelet
    /// counts it), bytes.
    pub memory_bytes: Option<u64>,
    /// Bytes read and written on block devices.
    pub io_bytes: Option<u64>,
    /// Bytes received and sent on the interfaces (other than `lo`) of the network namespaces
    /// the component's processes are in, as cAdvisor counts a container's; `None` when they
    /// are all in Forestall's own namespace, whose counters are not theirs alone.
    pub net_bytes: Option<u64>,
}

/// Reads what components use: the cgroup plugins, from the same cgroups they limit.
pub trait Meter: Send + Sync {
    /// The component's usage; a counter its controllers do not keep is `None`, and a cgroup
    /// that does not exist is an error.
    fn usage(&self, target: &Target) -> Result<Usage>;
}

/// [`Usage::net_bytes`] for the processes listed in `procs` (a `cgroup.procs` file): the
/// counters of every network namespace they are in, each counted once, except Forestall's
/// own. A process that exits while it is read is skipped.
pub(crate) fn namespace_net_bytes(
    actuator: &'static str,
    procs: &std::path::Path,
) -> Result<Option<u64>> {
    let text = std::fs::read_to_string(procs).map_err(|source| Error::Io {
        actuator,
        op: "read",
        path: procs.to_path_buf(),
        source,
    })?;
    let own = std::fs::read_link("/proc/self/ns/net").ok();
    let mut seen = std::collections::BTreeSet::new();
    let mut total = None;
    for pid in text.split_whitespace() {
        let Ok(ns) = std::fs::read_link(format!("/proc/{pid}/ns/net")) else {
            continue;
        };
        if Some(&ns) == own.as_ref() || !seen.insert(ns) {
            continue;
        }
        let Ok(dev) = std::fs::read_to_string(format!("/proc/{pid}/net/dev")) else {
            continue;
        };
        *total.get_or_insert(0) += net_dev_bytes(&dev);
    }
    Ok(total)
}

/// Received plus sent bytes over the interfaces of a `/proc/<pid>/net/dev`, except `lo`.
fn net_dev_bytes(text: &str) -> u64 {
    text.lines()
        .filter_map(|l| l.split_once(':'))
        .filter(|(name, _)| name.trim() != "lo")
        .filter_map(|(_, counters)| {
            // Receive: bytes packets errs drop fifo frame compressed multicast; then transmit.
            let c: Vec<u64> = counters
                .split_whitespace()
                .map(|v| v.parse().ok())
                .collect::<Option<_>>()?;
            Some(c.first()?.saturating_add(*c.get(8)?))
        })
        .fold(0, u64::saturating_add)
}

/// The `key value` lines of a cgroup `*.stat` file, as numbers (other lines skipped).
pub(crate) fn stat_lines(text: &str) -> impl Iterator<Item = (&str, u64)> {
    text.lines().filter_map(|l| {
        let (k, v) = l.split_once(' ')?;
        Some((k, v.trim().parse().ok()?))
    })
}

/// An actuator that records what it was asked and changes nothing: dry-run mode, and what
/// the replay backtest drives.
#[derive(Debug, Default)]
pub struct DryRun {
    inner: Mutex<DryRunLog>,
}

#[derive(Debug, Default)]
struct DryRunLog {
    /// The latest [`DRY_RUN_KEPT`] requests.
    requests: std::collections::VecDeque<(Target, Option<Limits>)>,
    /// What each target would hold: every apply since its last revert, merged.
    held: Vec<(Target, Limits)>,
}

/// Requests a [`DryRun`] remembers (it runs for as long as the server in dry-run mode).
pub const DRY_RUN_KEPT: usize = 1 << 16;

impl DryRun {
    /// The latest requests, oldest first: `Some(limits)` for an apply, `None` for a revert.
    pub fn requests(&self) -> Vec<(Target, Option<Limits>)> {
        self.log().requests.iter().cloned().collect()
    }

    fn log(&self) -> std::sync::MutexGuard<'_, DryRunLog> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn record(&self, target: &Target, limits: Option<&Limits>) {
        let mut log = self.log();
        if log.requests.len() == DRY_RUN_KEPT {
            log.requests.pop_front();
        }
        log.requests.push_back((target.clone(), limits.copied()));
        let held = match log.held.iter().position(|(t, _)| t == target) {
            Some(i) => &mut log.held[i].1,
            None => {
                log.held.push((target.clone(), Limits::default()));
                &mut log.held.last_mut().expect("just pushed").1
            }
        };
        *held = match limits {
            Some(l) => held.then(l),
            None => Limits::default(),
        };
    }
}

impl Actuator for DryRun {
    fn name(&self) -> &'static str {
        "dry-run"
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities::ALL
    }

    fn apply(&self, target: &Target, limits: &Limits) -> Result<()> {
        self.record(target, Some(limits));
        Ok(())
    }

    fn read_back(&self, target: &Target) -> Result<Limits> {
        // What was applied since the last revert, merged field by field: nothing was set.
        Ok(self
            .log()
            .held
            .iter()
            .find(|(t, _)| t == target)
            .map_or_else(Limits::default, |(_, l)| *l))
    }

    fn revert(&self, target: &Target) -> Result<()> {
        self.record(target, None);
        Ok(())
    }
}

/// A real cgroup v1 component for tests, removed (with its processes killed) even when the
/// test fails.
#[cfg(test)]
pub(crate) mod testing {
    use std::net::Ipv4Addr;
    use std::path::Path;
    use std::process::{Child, Command};

    use crate::Target;
    use crate::cgroup_v1::CgroupV1;

    pub const ROOT: &str = "/sys/fs/cgroup";

    /// A network namespace with a veth pair into it: `host` (10.n.0.1) here, its peer
    /// (10.n.0.2) inside. Removed, with the pair, even when the test fails.
    pub struct Netns {
        pub name: String,
        pub host: String,
        pub peer: Ipv4Addr,
    }

    fn ip(args: &[&str]) {
        let out = Command::new("ip")
            .args(args)
            .output()
            .expect("ip(8) is installed");
        assert!(
            out.status.success(),
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    impl Netns {
        /// Namespace `n` (1 to 55): tests running at once use different `n`.
        pub fn new(n: u8) -> Self {
            let tag = format!("{}{n}", std::process::id() % 100_000);
            let (name, host, inner) = (
                format!("fstest{tag}"),
                format!("fsh{tag}"),
                format!("fsp{tag}"),
            );
            let _ = Command::new("ip").args(["netns", "del", &name]).output();
            ip(&["netns", "add", &name]);
            let ns = Netns {
                name: name.clone(),
                host: host.clone(),
                peer: Ipv4Addr::new(10, 200 + n, 0, 2),
            };
            ip(&["link", "add", &host, "type", "veth", "peer", "name", &inner]);
            ip(&["link", "set", &inner, "netns", &name]);
            ip(&[
                "addr",
                "add",
                &format!("10.{}.0.1/24", 200 + n),
                "dev",
                &host,
            ]);
            ip(&["link", "set", &host, "up"]);
            ip(&[
                "-n",
                &name,
                "addr",
                "add",
                &format!("{}/24", ns.peer),
                "dev",
                &inner,
            ]);
            ip(&["-n", &name, "link", "set", &inner, "up"]);
            ns
        }
    }

    impl Drop for Netns {
        fn drop(&mut self) {
            // Deleting the namespace deletes the peer, and with it the pair.
            let _ = Command::new("ip")
                .args(["netns", "del", &self.name])
                .output();
            let _ = Command::new("ip")
                .args(["link", "del", &self.host])
                .output();
        }
    }

    /// Moves this thread (only) into the named network namespace.
    #[allow(unsafe_code)]
    pub fn enter_netns(path: &str) {
        use std::os::fd::AsRawFd;
        let f = std::fs::File::open(path).unwrap();
        // SAFETY: setns on an open namespace file; it changes only the calling thread.
        let rc = unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
    }

    pub struct Fixture {
        pub cg: CgroupV1,
        pub target: Target,
        pub children: Vec<Child>,
    }

    impl Fixture {
        /// The first process in the component.
        pub fn pid(&self) -> u32 {
            self.children[0].id()
        }

        /// Starts another process in the component.
        pub fn spawn(&mut self, cmd: &mut Command) -> u32 {
            let child = cmd.spawn().unwrap();
            let pid = child.id();
            self.children.push(child);
            self.cg.attach(&self.target, pid).unwrap();
            pid
        }
    }

    impl Drop for Fixture {
        fn drop(&mut self) {
            for child in &mut self.children {
                let _ = child.kill();
                let _ = child.wait();
            }
            let _ = self.cg.remove(&self.target);
            // The shared parent goes with the last test that used it.
            for c in ["cpu", "cpuacct", "memory", "blkio"] {
                let _ = std::fs::remove_dir(Path::new(ROOT).join(c).join("forestall-test"));
            }
        }
    }

    /// A component running `sleep 60`.
    pub fn fixture(name: &str) -> Fixture {
        fixture_running(name, Command::new("sleep").arg("60"))
    }

    /// A component running `cmd`, in cgroup `forestall-test/<name>-<pid>` of every v1
    /// controller Forestall uses.
    pub fn fixture_running(name: &str, cmd: &mut Command) -> Fixture {
        assert!(
            Path::new(ROOT).join("cpu/cpu.cfs_quota_us").exists()
                && Path::new(ROOT)
                    .join("memory/memory.limit_in_bytes")
                    .exists(),
            "these tests need cgroup v1 cpu and memory controllers under {ROOT}, and root"
        );
        let cg = CgroupV1::new(ROOT);
        let target = Target::new(
            name,
            format!("forestall-test/{name}-{}", std::process::id()),
        )
        .unwrap();
        cg.create(&target).unwrap();
        let mut f = Fixture {
            cg,
            target,
            children: Vec::new(),
        };
        f.spawn(cmd);
        f
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn net_dev_counts_received_and_sent_bytes_except_loopback() {
        let text = "Inter-|   Receive                                                |  Transmit\n \
 face |bytes    packets errs drop fifo frame compressed multicast|bytes    packets errs drop fifo colls carrier compressed\n    \
 lo: 5000      50    0    0    0     0          0         0     5000      50    0    0    0     0       0          0\n  \
eth0: 1000      10    0    0    0     0          0         0      200       2    0    0    0     0       0          0\n\
veth1: 30        1    0    0    0     0          0         0        4       1    0    0    0     0       0          0\n";
        assert_eq!(net_dev_bytes(text), 1000 + 200 + 30 + 4);
        // A truncated line is skipped, not misread.
        assert_eq!(net_dev_bytes("eth0: 1000 10 0\n"), 0);
    }

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
