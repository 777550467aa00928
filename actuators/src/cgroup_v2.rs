//! cgroup v2: `cpu.max` (`"<quota> <period>"` or `"max <period>"`), `cpu.weight`,
//! `memory.high` and `memory.max` (bytes or `"max"`), `io.weight` (`"default <w>"`) and
//! `io.max` (`"<maj>:<min> rbps=<n|max> wbps=… riops=… wiops=…"`, one line per throttled device;
//! read back: the first), in one unified hierarchy (`/sys/fs/cgroup/<path>` on a pure v2
//! machine).
//!
//! A controller is usable in a cgroup only when its parent lists it in
//! `cgroup.subtree_control`; [`CgroupV2::create`] enables the controllers the parent offers
//! (`cgroup.controllers`) on the way down, and capabilities are what the root offers.

use std::fs;
use std::path::{Path, PathBuf};

use crate::{Actuator, Capabilities, Error, IoLimit, Limits, Meter, Result, Target, Usage};

const NAME: &str = "cgroup-v2";
const DEFAULT_PERIOD_US: u64 = 100_000;
/// The `io.max` keys, in the order of [`IoLimit`]'s fields.
const IO_KEYS: [&str; 4] = ["rbps", "wbps", "riops", "wiops"];

/// The cgroup v2 plugin over the unified hierarchy mounted at `root`.
#[derive(Debug, Clone)]
pub struct CgroupV2 {
    root: PathBuf,
}

fn io(op: &'static str, path: &Path, source: std::io::Error) -> Error {
    Error::Io {
        actuator: NAME,
        op,
        path: path.to_path_buf(),
        source,
    }
}

fn read(path: &Path) -> Result<String> {
    fs::read_to_string(path)
        .map(|s| s.trim().to_string())
        .map_err(|e| io("read", path, e))
}

fn write(path: &Path, value: &str) -> Result<()> {
    fs::write(path, value).map_err(|e| io("write", path, e))
}

fn number(path: &Path, text: &str) -> Result<u64> {
    text.parse().map_err(|_| Error::Parse {
        actuator: NAME,
        path: path.to_path_buf(),
        value: text.to_string(),
    })
}

/// One `io.max` line: `maj:min key=value …`, each value a number or `max`.
fn io_max_line(path: &Path, line: &str) -> Result<IoLimit> {
    let bad = || Error::Parse {
        actuator: NAME,
        path: path.to_path_buf(),
        value: line.to_string(),
    };
    let mut parts = line.split_whitespace();
    let (maj, min) = parts
        .next()
        .and_then(|d| d.split_once(':'))
        .ok_or_else(bad)?;
    let mut out = IoLimit {
        device: (
            maj.parse().map_err(|_| bad())?,
            min.parse().map_err(|_| bad())?,
        ),
        ..Default::default()
    };
    for part in parts {
        let (key, value) = part.split_once('=').ok_or_else(bad)?;
        let i = IO_KEYS.iter().position(|k| *k == key).ok_or_else(bad)?;
        let value = match value {
            "max" => None,
            v => Some(v.parse().map_err(|_| bad())?),
        };
        let slot = [
            &mut out.read_bps,
            &mut out.write_bps,
            &mut out.read_iops,
            &mut out.write_iops,
        ];
        *slot.into_iter().nth(i).expect("four keys") = value;
    }
    Ok(out)
}

/// `"max"` or a number of bytes.
fn bytes_or_max(path: &Path) -> Result<Option<u64>> {
    match read(path)?.as_str() {
        "max" => Ok(None),
        v => number(path, v).map(Some),
    }
}

impl CgroupV2 {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    fn dir(&self, target: &Target) -> PathBuf {
        self.root.join(&target.cgroup)
    }

    /// The controllers the root offers.
    fn offered(&self) -> Vec<String> {
        read(&self.root.join("cgroup.controllers"))
            .map(|s| s.split_whitespace().map(str::to_string).collect())
            .unwrap_or_default()
    }

    /// Creates the component's cgroup, enabling `cpu`, `memory` and `io` in each ancestor's
    /// `cgroup.subtree_control` where the ancestor offers them.
    pub fn create(&self, target: &Target) -> Result<()> {
        let mut dir = self.root.clone();
        for part in target.cgroup.split('/') {
            let offered = read(&dir.join("cgroup.controllers")).unwrap_or_default();
            let enable: Vec<String> = ["cpu", "memory", "io"]
                .iter()
                .filter(|c| offered.split_whitespace().any(|o| o == **c))
                .map(|c| format!("+{c}"))
                .collect();
            if !enable.is_empty() {
                write(&dir.join("cgroup.subtree_control"), &enable.join(" "))?;
            }
            dir = dir.join(part);
            fs::create_dir_all(&dir).map_err(|e| io("create", &dir, e))?;
        }
        Ok(())
    }

    /// Moves a process into the component's cgroup.
    pub fn attach(&self, target: &Target, pid: u32) -> Result<()> {
        write(&self.dir(target).join("cgroup.procs"), &pid.to_string())
    }
}

impl Actuator for CgroupV2 {
    fn name(&self) -> &'static str {
        NAME
    }

    fn capabilities(&self) -> Capabilities {
        let offered = self.offered();
        let has = |c: &str| offered.iter().any(|o| o == c);
        Capabilities {
            cpu_millicores: has("cpu"),
            cpu_weight: has("cpu"),
            memory_high: has("memory"),
            memory_max: has("memory"),
            io_max: has("io"),
            io_weight: has("io"),
            ..Capabilities::default()
        }
    }

    fn apply(&self, target: &Target, limits: &Limits) -> Result<()> {
        limits.check(NAME, self.capabilities(), || {
            format!(
                "{} does not offer the controller (cgroup.controllers)",
                self.root.display()
            )
        })?;
        let dir = self.dir(target);
        if let Some(m) = limits.cpu_millicores {
            let quota = (m * DEFAULT_PERIOD_US / 1000).max(1000);
            write(
                &dir.join("cpu.max"),
                &format!("{quota} {DEFAULT_PERIOD_US}"),
            )?;
        }
        if let Some(w) = limits.cpu_weight {
            write(&dir.join("cpu.weight"), &w.to_string())?;
        }
        if let Some(b) = limits.memory_max_bytes {
            write(&dir.join("memory.max"), &b.to_string())?;
        }
        if let Some(b) = limits.memory_high_bytes {
            write(&dir.join("memory.high"), &b.to_string())?;
        }
        if let Some(w) = limits.io_weight {
            write(&dir.join("io.weight"), &format!("default {w}"))?;
        }
        if let Some(l) = &limits.io {
            let (maj, min) = l.device;
            let values = [l.read_bps, l.write_bps, l.read_iops, l.write_iops];
            let mut line = format!("{maj}:{min}");
            for (key, v) in IO_KEYS.iter().zip(values) {
                match v {
                    Some(v) => line.push_str(&format!(" {key}={v}")),
                    None => line.push_str(&format!(" {key}=max")),
                }
            }
            write(&dir.join("io.max"), &line)?;
        }
        Ok(())
    }

    fn read_back(&self, target: &Target) -> Result<Limits> {
        let caps = self.capabilities();
        let dir = self.dir(target);
        let mut out = Limits::default();
        if caps.cpu_millicores {
            let path = dir.join("cpu.max");
            let text = read(&path)?;
            let mut parts = text.split_whitespace();
            let (quota, period) = (parts.next().unwrap_or("max"), parts.next());
            let period = match period {
                Some(p) => number(&path, p)?.max(1),
                None => DEFAULT_PERIOD_US,
            };
            if quota != "max" {
                out.cpu_millicores = Some(number(&path, quota)? * 1000 / period);
            }
        }
        if caps.cpu_weight {
            let path = dir.join("cpu.weight");
            out.cpu_weight = Some(number(&path, &read(&path)?)? as u32);
        }
        if caps.memory_max {
            out.memory_max_bytes = bytes_or_max(&dir.join("memory.max"))?;
        }
        if caps.memory_high {
            out.memory_high_bytes = bytes_or_max(&dir.join("memory.high"))?;
        }
        if caps.io_weight {
            let path = dir.join("io.weight");
            let text = read(&path)?;
            let w = text
                .lines()
                .find_map(|l| l.strip_prefix("default "))
                .unwrap_or(text.as_str());
            out.io_weight = Some(number(&path, w.trim())? as u32);
        }
        if caps.io_max {
            let path = dir.join("io.max");
            let text = read(&path)?;
            out.io = match text.lines().find(|l| !l.trim().is_empty()) {
                Some(line) => Some(io_max_line(&path, line)?),
                None => None,
            };
        }
        Ok(out)
    }

    fn revert(&self, target: &Target) -> Result<()> {
        let caps = self.capabilities();
        let dir = self.dir(target);
        if caps.cpu_millicores {
            write(&dir.join("cpu.max"), &format!("max {DEFAULT_PERIOD_US}"))?;
        }
        if caps.cpu_weight {
            write(&dir.join("cpu.weight"), "100")?;
        }
        if caps.memory_high {
            write(&dir.join("memory.high"), "max")?;
        }
        if caps.memory_max {
            write(&dir.join("memory.max"), "max")?;
        }
        if caps.io_weight {
            write(&dir.join("io.weight"), "default 100")?;
        }
        if caps.io_max {
            let path = dir.join("io.max");
            for line in read(&path)?.lines().filter(|l| !l.trim().is_empty()) {
                let (maj, min) = io_max_line(&path, line)?.device;
                write(
                    &path,
                    &format!("{maj}:{min} rbps=max wbps=max riops=max wiops=max"),
                )?;
            }
        }
        Ok(())
    }
}

impl Meter for CgroupV2 {
    /// `cpu.stat`'s `usage_usec` (kept by every cgroup), `memory.current` less `memory.stat`'s
    /// `inactive_file`, and the `rbytes` and `wbytes` of every device in `io.stat`; memory and
    /// I/O only where their controllers are enabled. Network: the namespaces of the processes
    /// in `cgroup.procs` ([`Usage::net_bytes`]).
    fn usage(&self, target: &Target) -> Result<Usage> {
        let dir = self.dir(target);
        let cpu = read(&dir.join("cpu.stat"))?;
        let mut out = Usage {
            cpu_seconds: crate::stat_lines(&cpu)
                .find(|(k, _)| *k == "usage_usec")
                .map(|(_, v)| v as f64 / 1e6),
            ..Usage::default()
        };
        let current = dir.join("memory.current");
        if current.exists() {
            let used = number(&current, &read(&current)?)?;
            let stat = read(&dir.join("memory.stat"))?;
            let inactive = crate::stat_lines(&stat)
                .find(|(k, _)| *k == "inactive_file")
                .map_or(0, |(_, v)| v);
            out.memory_bytes = Some(used.saturating_sub(inactive));
        }
        let io_stat = dir.join("io.stat");
        if io_stat.exists() {
            let text = read(&io_stat)?;
            out.io_bytes = Some(
                text.split_whitespace()
                    .filter_map(|kv| {
                        kv.strip_prefix("rbytes=")
                            .or_else(|| kv.strip_prefix("wbytes="))
                    })
                    .filter_map(|v| v.parse::<u64>().ok())
                    .sum(),
            );
        }
        out.net_bytes = crate::namespace_net_bytes(NAME, &dir.join("cgroup.procs"))?;
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A directory tree shaped like a cgroup2 mount whose root offers `controllers`, with a
    /// component's cgroup holding the kernel's default values. This machine's cgroup2 mount
    /// offers no cpu or memory controller (they are bound to v1), so the plugin's file
    /// handling is tested here and its kernel behaviour by the v1 plugin's tests.
    fn mimic(controllers: &str, cgroup: &str) -> (tempfile::TempDir, CgroupV2, Target) {
        let root = tempfile::tempdir().unwrap();
        fs::write(root.path().join("cgroup.controllers"), controllers).unwrap();
        fs::write(root.path().join("cgroup.subtree_control"), "").unwrap();
        let cg = CgroupV2::new(root.path());
        let target = Target::new("web", cgroup).unwrap();
        let dir = root.path().join(cgroup);
        fs::create_dir_all(&dir).unwrap();
        for (file, value) in [
            ("cgroup.controllers", controllers),
            ("cgroup.subtree_control", ""),
            ("cgroup.procs", ""),
            ("cpu.max", "max 100000"),
            ("cpu.weight", "100"),
            ("memory.high", "max"),
            ("memory.max", "max"),
            ("io.weight", "default 100"),
            ("io.max", ""),
        ] {
            fs::write(dir.join(file), value).unwrap();
        }
        (root, cg, target)
    }

    #[test]
    fn cgroup_v2_mimic_tree_meter_reads_cpu_working_set_and_io() {
        let (root, cg, target) = mimic("cpu memory io", "forestall/web");
        let dir = root.path().join("forestall/web");
        for (file, value) in [
            (
                "cpu.stat",
                "usage_usec 2500000\nuser_usec 2000000\nsystem_usec 500000\n",
            ),
            ("memory.current", "104857600\n"),
            (
                "memory.stat",
                "anon 73400320\nfile 31457280\ninactive_file 20971520\n",
            ),
            (
                "io.stat",
                "8:0 rbytes=1048576 wbytes=4194304 rios=10 wios=40 dbytes=0 dios=0\n\
                 253:0 rbytes=100 wbytes=0 rios=1 wios=0 dbytes=0 dios=0\n",
            ),
        ] {
            fs::write(dir.join(file), value).unwrap();
        }
        assert_eq!(
            cg.usage(&target).unwrap(),
            Usage {
                cpu_seconds: Some(2.5),
                memory_bytes: Some(80 << 20),
                io_bytes: Some(5 * 1048576 + 100),
                // No process in a network namespace of its own.
                net_bytes: None,
                problems: vec![],
            }
        );
        // Without the memory and io controllers, only CPU is counted.
        fs::remove_file(dir.join("memory.current")).unwrap();
        fs::remove_file(dir.join("io.stat")).unwrap();
        let u = cg.usage(&target).unwrap();
        assert_eq!(
            (u.cpu_seconds, u.memory_bytes, u.io_bytes),
            (Some(2.5), None, None)
        );
        // A component without a cgroup is an error.
        let gone = Target::new("gone", "forestall/gone").unwrap();
        assert!(matches!(cg.usage(&gone), Err(Error::Io { .. })));
    }

    #[test]
    fn cgroup_v2_mimic_tree_limits_round_trip_and_revert() {
        let (root, cg, target) = mimic("cpu memory io", "forestall/web");
        assert_eq!(cg.read_back(&target).unwrap().cpu_millicores, None);
        let limits = Limits {
            cpu_millicores: Some(250),
            cpu_weight: Some(400),
            memory_high_bytes: Some(256 << 20),
            memory_max_bytes: Some(512 << 20),
            io: Some(IoLimit {
                device: (8, 0),
                read_bps: Some(10 << 20),
                write_bps: None,
                read_iops: None,
                write_iops: Some(300),
            }),
            io_weight: Some(250),
            ..Default::default()
        };
        cg.apply(&target, &limits).unwrap();
        let dir = root.path().join("forestall/web");
        assert_eq!(read(&dir.join("cpu.max")).unwrap(), "25000 100000");
        assert_eq!(
            read(&dir.join("io.max")).unwrap(),
            "8:0 rbps=10485760 wbps=max riops=max wiops=300"
        );
        assert_eq!(read(&dir.join("io.weight")).unwrap(), "default 250");
        assert_eq!(cg.read_back(&target).unwrap(), limits);
        cg.revert(&target).unwrap();
        assert_eq!(read(&dir.join("cpu.max")).unwrap(), "max 100000");
        assert_eq!(
            read(&dir.join("io.max")).unwrap(),
            "8:0 rbps=max wbps=max riops=max wiops=max"
        );
        let back = cg.read_back(&target).unwrap();
        assert_eq!(
            (back.cpu_millicores, back.memory_max_bytes, back.cpu_weight),
            (None, None, Some(100))
        );
        assert_eq!(back.io_weight, Some(100));
        // A kernel-written io.max with one line per device reads back as the first.
        fs::write(
            dir.join("io.max"),
            "8:0 rbps=max wbps=2097152 riops=max wiops=max\n8:16 rbps=1 wbps=max riops=max wiops=max\n",
        )
        .unwrap();
        let io = cg.read_back(&target).unwrap().io.unwrap();
        assert_eq!(
            (io.device, io.write_bps, io.read_bps),
            ((8, 0), Some(2 << 20), None)
        );
        fs::write(dir.join("io.max"), "8:0 rbps=lots").unwrap();
        assert!(matches!(
            cg.read_back(&target).unwrap_err(),
            Error::Parse { .. }
        ));
    }

    #[test]
    fn cgroup_v2_mimic_tree_create_enables_controllers_on_the_way_down() {
        let (root, cg, _) = mimic("cpu memory io", "forestall/web");
        let target = Target::new("db", "forestall/db").unwrap();
        cg.create(&target).unwrap();
        assert_eq!(
            read(&root.path().join("cgroup.subtree_control")).unwrap(),
            "+cpu +memory +io"
        );
        assert!(root.path().join("forestall/db").is_dir());
    }

    #[test]
    fn cgroup_v2_mimic_tree_refuses_controllers_the_root_does_not_offer() {
        let (root, cg, target) = mimic("io", "forestall/web");
        let err = cg
            .apply(
                &target,
                &Limits {
                    cpu_millicores: Some(100),
                    ..Default::default()
                },
            )
            .unwrap_err();
        assert!(matches!(err, Error::Unsupported { .. }), "{err}");
        let err = CgroupV2::new(root.path())
            .apply(
                &target,
                &Limits {
                    cpu_weight: Some(0),
                    ..Default::default()
                },
            )
            .unwrap_err();
        assert!(err.to_string().contains("cannot set a CPU weight"), "{err}");
    }
}
