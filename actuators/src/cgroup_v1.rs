//! cgroup v1: `cpu.cfs_quota_us` (over `cpu.cfs_period_us`) for the CPU cap, `cpu.shares`
//! for the weight, `memory.limit_in_bytes` and `memory.soft_limit_in_bytes` for memory, and
//! `blkio.throttle.{read,write}_{bps,iops}_device` for I/O caps (read back: the first device
//! throttled; revert: every device's throttles lifted), and `blkio.bfq.weight` (BFQ, 1..=1000,
//! default 100) or `blkio.weight` (CFQ, 10..=1000, default 500) for the I/O weight.
//!
//! Each controller is its own hierarchy (`/sys/fs/cgroup/cpu/<path>`,
//! `/sys/fs/cgroup/memory/<path>`). Weights use the cgroup v2 scale everywhere in Forestall
//! (1..=10000, default 100); v1's shares are 1024 at the default, so shares = weight × 1024 /
//! 100. A memory limit of "none" reads back from v1 as a huge page-rounded number; anything
//! at or above 2^62 is reported as no limit.

use std::fs;
use std::path::{Path, PathBuf};

use crate::{Actuator, Capabilities, Error, IoLimit, Limits, Meter, Result, Target, Usage};

const NAME: &str = "cgroup-v1";
const NO_LIMIT: u64 = 1 << 62;
/// The throttle files, in the order of [`IoLimit`]'s fields.
const THROTTLES: [&str; 4] = ["read_bps", "write_bps", "read_iops", "write_iops"];

fn throttle_values(l: &IoLimit) -> [Option<u64>; 4] {
    [l.read_bps, l.write_bps, l.read_iops, l.write_iops]
}

/// The I/O weight file this kernel has, and how the v2 scale (1..=10000, default 100) maps to
/// and from it.
#[derive(Debug, Clone, Copy)]
enum BlkioWeight {
    Bfq,
    Cfq,
}

impl BlkioWeight {
    fn file(self) -> &'static str {
        match self {
            BlkioWeight::Bfq => "blkio.bfq.weight",
            BlkioWeight::Cfq => "blkio.weight",
        }
    }

    fn to_kernel(self, w: u32) -> u32 {
        match self {
            BlkioWeight::Bfq => w.clamp(1, 1000),
            BlkioWeight::Cfq => (w * 5).clamp(10, 1000),
        }
    }

    fn weight_of(self, k: i64) -> u32 {
        let k = k.clamp(1, 1000) as u32;
        match self {
            BlkioWeight::Bfq => k,
            BlkioWeight::Cfq => k.div_ceil(5),
        }
    }

    fn default_value(self) -> u32 {
        self.to_kernel(100)
    }
}

/// `major:minor value` lines of a throttle file.
fn throttle_lines(path: &Path) -> Result<Vec<((u32, u32), u64)>> {
    let text = fs::read_to_string(path).map_err(|e| io("read", path, e))?;
    let bad = |line: &str| Error::Parse {
        actuator: NAME,
        path: path.to_path_buf(),
        value: line.to_string(),
    };
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|line| {
            let (dev, value) = line.split_once(' ').ok_or_else(|| bad(line))?;
            let (maj, min) = dev.split_once(':').ok_or_else(|| bad(line))?;
            Ok((
                (
                    maj.parse().map_err(|_| bad(line))?,
                    min.parse().map_err(|_| bad(line))?,
                ),
                value.trim().parse().map_err(|_| bad(line))?,
            ))
        })
        .collect()
}

/// The cgroup v1 plugin over controllers mounted under `root` (normally `/sys/fs/cgroup`).
#[derive(Debug, Clone)]
pub struct CgroupV1 {
    root: PathBuf,
}

impl CgroupV1 {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    fn dir(&self, controller: &str, target: &Target) -> PathBuf {
        self.root.join(controller).join(&target.cgroup)
    }

    fn has(&self, controller: &str, file: &str) -> bool {
        self.root.join(controller).join(file).exists()
    }

    fn blkio_weight(&self) -> Option<BlkioWeight> {
        [BlkioWeight::Bfq, BlkioWeight::Cfq]
            .into_iter()
            .find(|w| self.has("blkio", w.file()))
    }

    /// The controllers this plugin uses that are mounted (`cpuacct` for metering only).
    fn controllers(&self) -> Vec<&'static str> {
        ["cpu", "cpuacct", "memory", "blkio"]
            .into_iter()
            .filter(|c| self.root.join(c).is_dir())
            .collect()
    }

    /// Creates the component's cgroup in every controller this plugin uses.
    pub fn create(&self, target: &Target) -> Result<()> {
        for c in self.controllers() {
            let dir = self.dir(c, target);
            fs::create_dir_all(&dir).map_err(|source| io("create", &dir, source))?;
        }
        Ok(())
    }

    /// Moves a process (all its threads) into the component's cgroups.
    pub fn attach(&self, target: &Target, pid: u32) -> Result<()> {
        for c in self.controllers() {
            write(&self.dir(c, target).join("cgroup.procs"), &pid.to_string())?;
        }
        Ok(())
    }

    /// Removes the component's cgroups; the kernel refuses while processes are in them.
    pub fn remove(&self, target: &Target) -> Result<()> {
        for c in self.controllers() {
            let dir = self.dir(c, target);
            match fs::remove_dir(&dir) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(io("remove", &dir, e)),
            }
        }
        Ok(())
    }
}

fn io(op: &'static str, path: &Path, source: std::io::Error) -> Error {
    Error::Io {
        actuator: NAME,
        op,
        path: path.to_path_buf(),
        source,
    }
}

fn write(path: &Path, value: &str) -> Result<()> {
    fs::write(path, value).map_err(|e| io("write", path, e))
}

fn read_i64(path: &Path) -> Result<i64> {
    let text = fs::read_to_string(path).map_err(|e| io("read", path, e))?;
    text.trim().parse().map_err(|_| Error::Parse {
        actuator: NAME,
        path: path.to_path_buf(),
        value: text.trim().to_string(),
    })
}

impl Actuator for CgroupV1 {
    fn name(&self) -> &'static str {
        NAME
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            cpu_millicores: self.has("cpu", "cpu.cfs_quota_us"),
            cpu_weight: self.has("cpu", "cpu.shares"),
            memory_high: self.has("memory", "memory.soft_limit_in_bytes"),
            memory_max: self.has("memory", "memory.limit_in_bytes"),
            io_max: THROTTLES
                .iter()
                .all(|f| self.has("blkio", &format!("blkio.throttle.{f}_device"))),
            io_weight: self.blkio_weight().is_some(),
            ..Capabilities::default()
        }
    }

    fn apply(&self, target: &Target, limits: &Limits) -> Result<()> {
        limits.check(NAME, self.capabilities(), || {
            format!("no such controller file under {}", self.root.display())
        })?;
        self.create(target)?;
        let cpu = self.dir("cpu", target);
        if let Some(m) = limits.cpu_millicores {
            let period = read_i64(&cpu.join("cpu.cfs_period_us"))?.max(1) as u64;
            // The kernel's floor is 1 ms of quota.
            let quota = (m * period / 1000).max(1000);
            write(&cpu.join("cpu.cfs_quota_us"), &quota.to_string())?;
        }
        if let Some(w) = limits.cpu_weight {
            let shares = (u64::from(w) * 1024 / 100).max(2);
            write(&cpu.join("cpu.shares"), &shares.to_string())?;
        }
        let mem = self.dir("memory", target);
        if let Some(b) = limits.memory_max_bytes {
            write(&mem.join("memory.limit_in_bytes"), &b.to_string())?;
        }
        if let Some(b) = limits.memory_high_bytes {
            write(&mem.join("memory.soft_limit_in_bytes"), &b.to_string())?;
        }
        let blkio = self.dir("blkio", target);
        if let (Some(w), Some(kind)) = (limits.io_weight, self.blkio_weight()) {
            write(&blkio.join(kind.file()), &kind.to_kernel(w).to_string())?;
        }
        if let Some(l) = &limits.io {
            let (maj, min) = l.device;
            for (file, value) in THROTTLES.iter().zip(throttle_values(l)) {
                if let Some(v) = value {
                    let path = blkio.join(format!("blkio.throttle.{file}_device"));
                    write(&path, &format!("{maj}:{min} {v}"))?;
                }
            }
        }
        Ok(())
    }

    fn read_back(&self, target: &Target) -> Result<Limits> {
        let caps = self.capabilities();
        let cpu = self.dir("cpu", target);
        let mem = self.dir("memory", target);
        let blkio = self.dir("blkio", target);
        let mut out = Limits::default();
        // A controller without the component's group holds no limit of it: what the others
        // hold is still read (one missing group made every limit unknown, and the loop then
        // started the component from an equal share of the host instead of its quota). With
        // no group at all, the read below fails and says which file is missing.
        let any = [&cpu, &mem, &blkio].iter().any(|d| d.is_dir());
        let (has_cpu, has_mem, has_blkio) = (!any || cpu.is_dir(), mem.is_dir(), blkio.is_dir());
        if caps.cpu_millicores && has_cpu {
            let quota = read_i64(&cpu.join("cpu.cfs_quota_us"))?;
            let period = read_i64(&cpu.join("cpu.cfs_period_us"))?.max(1);
            if quota > 0 {
                out.cpu_millicores = Some((quota * 1000 / period) as u64);
            }
        }
        if caps.cpu_weight && has_cpu {
            let shares = read_i64(&cpu.join("cpu.shares"))?.max(0) as u64;
            out.cpu_weight = Some(((shares * 100).div_ceil(1024)).clamp(1, 10_000) as u32);
        }
        let bytes = |file: &str| -> Result<Option<u64>> {
            let v = read_i64(&mem.join(file))?;
            Ok((v >= 0 && (v as u64) < NO_LIMIT).then_some(v as u64))
        };
        if caps.memory_max && has_mem {
            out.memory_max_bytes = bytes("memory.limit_in_bytes")?;
        }
        if caps.memory_high && has_mem {
            out.memory_high_bytes = bytes("memory.soft_limit_in_bytes")?;
        }
        if let Some(kind) = self.blkio_weight().filter(|_| has_blkio) {
            out.io_weight = Some(kind.weight_of(read_i64(&blkio.join(kind.file()))?));
        }
        if caps.io_max && has_blkio {
            let mut found: Option<IoLimit> = None;
            for (i, file) in THROTTLES.iter().enumerate() {
                for (device, value) in
                    throttle_lines(&blkio.join(format!("blkio.throttle.{file}_device")))?
                {
                    let l = found.get_or_insert(IoLimit {
                        device,
                        ..Default::default()
                    });
                    if l.device == device {
                        let slot = [
                            &mut l.read_bps,
                            &mut l.write_bps,
                            &mut l.read_iops,
                            &mut l.write_iops,
                        ];
                        *slot.into_iter().nth(i).expect("four throttles") = Some(value);
                    }
                }
            }
            out.io = found;
        }
        Ok(out)
    }

    fn revert(&self, target: &Target) -> Result<()> {
        let caps = self.capabilities();
        let cpu = self.dir("cpu", target);
        let mem = self.dir("memory", target);
        if caps.cpu_millicores {
            write(&cpu.join("cpu.cfs_quota_us"), "-1")?;
        }
        if caps.cpu_weight {
            write(&cpu.join("cpu.shares"), "1024")?;
        }
        if caps.memory_high {
            write(&mem.join("memory.soft_limit_in_bytes"), "-1")?;
        }
        if caps.memory_max {
            write(&mem.join("memory.limit_in_bytes"), "-1")?;
        }
        let blkio = self.dir("blkio", target);
        if let Some(kind) = self.blkio_weight() {
            write(&blkio.join(kind.file()), &kind.default_value().to_string())?;
        }
        if caps.io_max {
            for file in THROTTLES {
                let path = blkio.join(format!("blkio.throttle.{file}_device"));
                for ((maj, min), _) in throttle_lines(&path)? {
                    // Zero removes a v1 throttle.
                    write(&path, &format!("{maj}:{min} 0"))?;
                }
            }
        }
        Ok(())
    }
}

impl Meter for CgroupV1 {
    /// `cpuacct.usage`, `memory.usage_in_bytes` less `memory.stat`'s `total_inactive_file`,
    /// and the `Total` of `blkio.throttle.io_service_bytes`; each from its controller when it
    /// is mounted. Network: the namespaces of the processes in the first of those cgroups'
    /// `cgroup.procs` ([`Usage::net_bytes`]).
    fn usage(&self, target: &Target) -> Result<Usage> {
        let mut out = Usage::default();
        let mut found = false;
        let mut failed: Option<Error> = None;
        let mut keep = |out: &mut Usage, r: Result<()>| {
            if let Err(e) = r {
                out.problems.push(e.to_string());
                failed.get_or_insert(e);
            }
        };
        let acct = self.dir("cpuacct", target);
        if self.root.join("cpuacct").is_dir() {
            let read = read_i64(&acct.join("cpuacct.usage"))
                .map(|v| out.cpu_seconds = Some(v.max(0) as f64 / 1e9));
            keep(&mut out, read);
            found = true;
        }
        let mem = self.dir("memory", target);
        if self.root.join("memory").is_dir() {
            let read = (|| {
                let used = read_i64(&mem.join("memory.usage_in_bytes"))?.max(0) as u64;
                let path = mem.join("memory.stat");
                let stat = fs::read_to_string(&path).map_err(|e| io("read", &path, e))?;
                let inactive = crate::stat_lines(&stat)
                    .find(|(k, _)| *k == "total_inactive_file")
                    .map_or(0, |(_, v)| v);
                Ok(used.saturating_sub(inactive))
            })()
            .map(|b| out.memory_bytes = Some(b));
            keep(&mut out, read);
            found = true;
        }
        let blkio = self.dir("blkio", target);
        if self.root.join("blkio").is_dir() {
            let path = blkio.join("blkio.throttle.io_service_bytes");
            let read = fs::read_to_string(&path)
                .map_err(|e| io("read", &path, e))
                .map(|text| {
                    // `maj:min Read N` … lines per device, then `Total N` over all of them.
                    out.io_bytes = Some(
                        text.lines()
                            .rev()
                            .filter_map(|l| l.strip_prefix("Total "))
                            .find_map(|v| v.trim().parse::<u64>().ok())
                            .unwrap_or(0),
                    );
                });
            keep(&mut out, read);
            found = true;
        }
        if let Some(procs) = ["cpuacct", "memory", "blkio"]
            .into_iter()
            .filter(|c| self.root.join(c).is_dir())
            .map(|c| self.dir(c, target).join("cgroup.procs"))
            .find(|p| p.exists())
        {
            let read = crate::namespace_net_bytes(NAME, &procs).map(|n| out.net_bytes = n);
            keep(&mut out, read);
        }
        // Nothing read at all: the component's cgroup is not there.
        let read_any =
            out.cpu_seconds.is_some() || out.memory_bytes.is_some() || out.io_bytes.is_some();
        if let (false, Some(e)) = (read_any, failed) {
            return Err(e);
        }
        if !found {
            return Err(Error::Unsupported {
                actuator: NAME,
                what: "usage",
                why: format!(
                    "no cpuacct, memory or blkio controller under {}",
                    self.root.display()
                ),
            });
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    use crate::testing::{ROOT, fixture, fixture_running};

    #[test]
    fn cgroup_v1_limits_read_back_from_the_kernel_as_set() {
        let f = fixture("limits");
        // The process is in the component's cgroups.
        let own = fs::read_to_string(format!("/proc/{}/cgroup", f.pid())).unwrap();
        assert!(own.contains(&f.target.cgroup), "{own}");
        let limits = Limits {
            cpu_millicores: Some(200),
            cpu_weight: Some(50),
            memory_high_bytes: Some(32 << 20),
            memory_max_bytes: Some(64 << 20),
            io: Some(IoLimit {
                device: block_device(),
                read_bps: Some(10 << 20),
                write_bps: Some(5 << 20),
                read_iops: None,
                write_iops: Some(200),
            }),
            ..Default::default()
        };
        f.cg.apply(&f.target, &limits).unwrap();
        assert_eq!(f.cg.read_back(&f.target).unwrap(), limits);
        // Raising one resource leaves the others as they were.
        f.cg.apply(
            &f.target,
            &Limits {
                cpu_millicores: Some(1500),
                ..Default::default()
            },
        )
        .unwrap();
        let back = f.cg.read_back(&f.target).unwrap();
        assert_eq!(back.cpu_millicores, Some(1500));
        assert_eq!(back.memory_max_bytes, Some(64 << 20));
        // Revert lifts everything.
        f.cg.revert(&f.target).unwrap();
        let back = f.cg.read_back(&f.target).unwrap();
        assert_eq!(
            (
                back.cpu_millicores,
                back.memory_max_bytes,
                back.memory_high_bytes
            ),
            (None, None, None)
        );
        assert_eq!(back.cpu_weight, Some(100));
    }

    #[test]
    fn cgroup_v1_meter_counts_a_components_cpu_memory_and_disk() {
        let mut f = fixture_running(
            "meter",
            Command::new("sh").args(["-c", "while :; do :; done"]),
        );
        let before = f.cg.usage(&f.target).unwrap();
        // 64 MiB held, and 8 MiB written past the page cache. Each waits until it is in the
        // cgroup (a child runs before it is attached), and the writer says when it is done.
        let dir = tempfile::tempdir().unwrap();
        let (go, held, written, file) = (
            dir.path().join("go"),
            dir.path().join("held"),
            dir.path().join("written"),
            dir.path().join("data"),
        );
        let gated = |script: String| {
            let mut c = Command::new("sh");
            c.args([
                "-c",
                &format!(
                    "while [ ! -e {} ]; do sleep 0.01; done; {script}",
                    go.display()
                ),
            ]);
            c
        };
        f.spawn(&mut gated(format!(
            "exec python3 -c \"import time; x = bytearray(64 << 20); x[::4096] = b'1' * len(x[::4096]); open('{}', 'w').close(); time.sleep(60)\"",
            held.display()
        )));
        f.spawn(&mut gated(format!(
            "dd if=/dev/zero of={} bs=1M count=8 oflag=direct status=none && touch {}; sleep 60",
            file.display(),
            written.display()
        )));
        fs::write(&go, "").unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
        while !(held.exists() && written.exists()) {
            assert!(
                std::time::Instant::now() < deadline,
                "the memory holder or the writer did not finish"
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        // The burner's CPU needs a moment; the memory is held and the write is complete.
        std::thread::sleep(std::time::Duration::from_secs(2));
        let after = f.cg.usage(&f.target).unwrap();
        let cpu = after.cpu_seconds.unwrap() - before.cpu_seconds.unwrap();
        assert!(cpu > 0.5, "the burner used {cpu} s of CPU in 2 s");
        let mem = after.memory_bytes.unwrap();
        assert!(mem >= 60 << 20, "memory in use: {mem}");
        let io = after.io_bytes.unwrap() - before.io_bytes.unwrap();
        assert!(io >= 8 << 20, "disk bytes: {io}");
        // A component whose cgroup does not exist is an error, not zero.
        let gone = Target::new("gone", "forestall-test/no-such-cgroup").unwrap();
        assert!(matches!(f.cg.usage(&gone), Err(Error::Io { .. })));
        // A group missing under one controller costs that resource only, and says so.
        let partial = format!("forestall-test/partial-{}", std::process::id());
        let made: Vec<PathBuf> = ["cpu", "cpuacct", "memory"]
            .iter()
            .map(|c| Path::new(ROOT).join(c).join(&partial))
            .collect();
        for d in &made {
            fs::create_dir_all(d).unwrap();
        }
        let target = Target::new("partial", &partial).unwrap();
        fs::write(made[0].join("cpu.cfs_quota_us"), "30000").unwrap();
        let u = f.cg.usage(&target);
        // Its limits are read back without blkio too: the loop starts it from its quota.
        let held = f.cg.read_back(&target);
        for d in &made {
            let _ = fs::remove_dir(d);
        }
        let held = held.unwrap();
        assert_eq!((held.cpu_millicores, held.io), (Some(300), None));
        let u = u.unwrap();
        assert_eq!((u.cpu_seconds, u.io_bytes), (Some(0.0), None));
        assert!(u.memory_bytes.is_some());
        assert!(
            u.problems.len() == 1 && u.problems[0].contains("blkio"),
            "{:?}",
            u.problems
        );
    }

    #[test]
    fn cgroup_v1_meter_counts_the_network_of_a_components_own_namespace() {
        // In Forestall's own namespace, the counters are not the component's.
        let host = fixture("net-host");
        assert_eq!(host.cg.usage(&host.target).unwrap().net_bytes, None);
        drop(host);
        // A TCP sink inside a namespace of its own, in the component: it prints its port,
        // reads until end of stream and says so.
        let ns = crate::testing::Netns::new(3);
        let script = format!(
            "import socket, time\n\
             s = socket.socket(); s.bind(('{}', 0)); s.listen(1)\n\
             print(s.getsockname()[1], flush=True)\n\
             c, _ = s.accept()\n\
             while c.recv(1 << 16): pass\n\
             print('done', flush=True); time.sleep(60)",
            ns.peer
        );
        let mut f = fixture_running(
            "net",
            Command::new("ip")
                .args(["netns", "exec", &ns.name, "python3", "-c", &script])
                .stdout(std::process::Stdio::piped()),
        );
        let mut out = std::io::BufReader::new(f.children[0].stdout.take().unwrap());
        let mut line = String::new();
        std::io::BufRead::read_line(&mut out, &mut line).unwrap();
        let port: u16 = line.trim().parse().unwrap();
        let before = f.cg.usage(&f.target).unwrap().net_bytes.unwrap();
        let sent = 4u64 << 20;
        let mut conn = std::net::TcpStream::connect((ns.peer, port)).unwrap();
        std::io::Write::write_all(&mut conn, &vec![7u8; sent as usize]).unwrap();
        drop(conn);
        line.clear();
        std::io::BufRead::read_line(&mut out, &mut line).unwrap();
        assert_eq!(line.trim(), "done");
        let counted = f.cg.usage(&f.target).unwrap().net_bytes.unwrap() - before;
        // What arrived, plus headers and the acknowledgements sent back; counted once (the
        // host's end of the pair is not the component's).
        assert!(
            counted >= sent && counted < sent + sent / 4,
            "counted {counted} bytes for {sent} sent"
        );
    }

    /// A real block device's `major:minor`: a disk if there is one, else any.
    fn block_device() -> (u32, u32) {
        let mut devices: Vec<(String, (u32, u32))> = fs::read_dir("/sys/block")
            .unwrap()
            .filter_map(|e| {
                let e = e.ok()?;
                let dev = fs::read_to_string(e.path().join("dev")).ok()?;
                let (maj, min) = dev.trim().split_once(':')?;
                Some((
                    e.file_name().to_string_lossy().into_owned(),
                    (maj.parse().ok()?, min.parse().ok()?),
                ))
            })
            .collect();
        devices
            .sort_by_key(|(name, _)| ["loop", "ram", "zram"].iter().any(|p| name.starts_with(p)));
        devices.first().expect("a block device in /sys/block").1
    }

    /// CPU seconds a process has used (utime + stime).
    fn cpu_secs(pid: u32) -> f64 {
        let stat = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
        let rest = &stat[stat.rfind(')').unwrap() + 2..];
        let f: Vec<&str> = rest.split_whitespace().collect();
        (f[11].parse::<f64>().unwrap() + f[12].parse::<f64>().unwrap()) / 100.0
    }

    /// Share of one core the process used over `secs` of wall time.
    fn cpu_share(pid: u32, secs: f64) -> f64 {
        let c0 = cpu_secs(pid);
        let t0 = std::time::Instant::now();
        std::thread::sleep(std::time::Duration::from_secs_f64(secs));
        (cpu_secs(pid) - c0) / t0.elapsed().as_secs_f64()
    }

    #[test]
    fn cgroup_v1_cpu_quota_holds_a_cpu_burner_to_its_share() {
        // A busy loop; the quota, not the machine, decides how much CPU it gets.
        let f = fixture_running(
            "burn",
            Command::new("sh").args(["-c", "while :; do :; done"]),
        );
        let pid = f.pid();
        f.cg.apply(
            &f.target,
            &Limits {
                cpu_millicores: Some(200),
                ..Default::default()
            },
        )
        .unwrap();
        std::thread::sleep(std::time::Duration::from_millis(300));
        let held = cpu_share(pid, 2.0);
        // CFS enforces the quota every 100 ms period; 0.2 of a core, with rounding to ticks.
        assert!(held < 0.3, "held at {held:.2} of a core with a 20 % quota");
        assert!(
            held > 0.1,
            "the burner barely ran ({held:.2}); is it in the cgroup?"
        );
        f.cg.apply(
            &f.target,
            &Limits {
                cpu_millicores: Some(1000),
                ..Default::default()
            },
        )
        .unwrap();
        std::thread::sleep(std::time::Duration::from_millis(300));
        let raised = cpu_share(pid, 2.0);
        assert!(
            raised > 1.5 * held && raised > 0.3,
            "raising the quota to a core took it from {held:.2} to only {raised:.2}"
        );
    }

    #[test]
    fn cgroup_v1_io_weight_is_refused_when_the_kernel_has_no_proportional_io_scheduler() {
        let f = fixture("ioweight");
        let ask = Limits {
            io_weight: Some(300),
            ..Default::default()
        };
        match f.cg.blkio_weight() {
            // This machine: no BFQ or CFQ weight file, so the request is an error.
            None => {
                let err = f.cg.apply(&f.target, &ask).unwrap_err();
                assert!(matches!(err, Error::Unsupported { .. }), "{err}");
            }
            Some(_) => {
                f.cg.apply(&f.target, &ask).unwrap();
                assert_eq!(f.cg.read_back(&f.target).unwrap().io_weight, Some(300));
            }
        }
    }

    /// The kernel here has neither BFQ nor CFQ, so the weight files are tested on a tree that
    /// mimics a v1 blkio hierarchy of each kind.
    #[test]
    fn cgroup_v1_mimic_tree_blkio_weight_maps_the_v2_scale_each_way() {
        // (file, its default, weight asked, what the kernel file gets, what reads back)
        for (file, default, set, kernel, back) in [
            ("blkio.bfq.weight", "100", 300, "300", 300),
            ("blkio.bfq.weight", "100", 5000, "1000", 1000),
            ("blkio.weight", "500", 300, "1000", 200),
            ("blkio.weight", "500", 40, "200", 40),
        ] {
            let root = tempfile::tempdir().unwrap();
            let blkio = root.path().join("blkio");
            fs::create_dir_all(blkio.join("c")).unwrap();
            fs::write(blkio.join(file), default).unwrap();
            fs::write(blkio.join("c").join(file), default).unwrap();
            let cg = CgroupV1::new(root.path());
            let t = Target::new("c", "c").unwrap();
            assert!(cg.capabilities().io_weight && !cg.capabilities().cpu_weight);
            cg.apply(
                &t,
                &Limits {
                    io_weight: Some(set),
                    ..Default::default()
                },
            )
            .unwrap();
            assert_eq!(
                fs::read_to_string(blkio.join("c").join(file)).unwrap(),
                kernel
            );
            assert_eq!(cg.read_back(&t).unwrap().io_weight, Some(back), "{file}");
            cg.revert(&t).unwrap();
            assert_eq!(
                fs::read_to_string(blkio.join("c").join(file)).unwrap(),
                default
            );
            assert_eq!(cg.read_back(&t).unwrap().io_weight, Some(100));
        }
    }

    #[test]
    fn cgroup_v1_refuses_what_it_cannot_do_and_cleans_up() {
        let f = fixture("refuse");
        let err =
            f.cg.apply(
                &f.target,
                &Limits {
                    cpu_millicores: Some(0),
                    ..Default::default()
                },
            )
            .unwrap_err();
        assert!(err.to_string().contains("quota of 0"), "{err}");
        // A controller that is not there is an error, not a silent no-op.
        let empty = tempfile::tempdir().unwrap();
        let nowhere = CgroupV1::new(empty.path());
        let err = nowhere
            .apply(
                &f.target,
                &Limits {
                    memory_max_bytes: Some(1 << 20),
                    ..Default::default()
                },
            )
            .unwrap_err();
        assert!(matches!(err, Error::Unsupported { .. }), "{err}");
        // The kernel refuses to remove a cgroup with a process in it; after the process is
        // gone, removal works and nothing is left behind.
        assert!(f.cg.remove(&f.target).is_err());
        let dirs = [f.cg.dir("cpu", &f.target), f.cg.dir("memory", &f.target)];
        drop(f);
        for d in dirs {
            assert!(!d.exists(), "{} left behind", d.display());
        }
    }
}
