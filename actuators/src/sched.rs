//! Scheduling of a component's threads: CPU affinity (`sched_setaffinity`), the nice value
//! (`setpriority`) and the I/O priority (`ioprio_set`).
//!
//! The component's processes are the ones in its cgroup (`<root>/<cgroup>/cgroup.procs`, where
//! `root` is a v1 controller's hierarchy or the v2 mount), and every thread of each
//! (`/proc/<pid>/task`) is set, since Linux schedules threads, not processes. A thread that
//! exits while this runs is skipped; any other refusal is an error. New threads and children
//! inherit all three, so a component keeps what it was given as it grows.
//!
//! Read back reports the first thread of the first process. `None` means "no limit": every
//! online CPU, nice 0, and the kernel's default I/O class.

// These three calls have no safe wrapper in std; each unsafe block is one syscall on a thread
// id with buffers sized by the kernel's own types.
#![allow(unsafe_code)]

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use crate::{Actuator, Capabilities, CpuSet, Error, IoPriority, Limits, Result, Target};

const NAME: &str = "sched";
const IOPRIO_WHO_PROCESS: libc::c_int = 1;
const IOPRIO_CLASS_SHIFT: u32 = 13;

/// The scheduling plugin over the cgroup hierarchy at `root`.
#[derive(Debug, Clone)]
pub struct Scheduling {
    root: PathBuf,
}

fn io_err(op: &'static str, path: &Path, source: io::Error) -> Error {
    Error::Io {
        actuator: NAME,
        op,
        path: path.to_path_buf(),
        source,
    }
}

/// The result of a call on thread `tid`: `Ok(false)` when the thread has gone.
fn called(op: &'static str, tid: i32, rc: libc::c_long) -> Result<bool> {
    if rc >= 0 {
        return Ok(true);
    }
    let e = io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::ESRCH) {
        return Ok(false);
    }
    Err(io_err(op, Path::new(&format!("/proc/{tid}")), e))
}

fn set_affinity(tid: i32, cpus: &CpuSet) -> Result<bool> {
    // SAFETY: cpu_set_t is plain bits; CPU_SET only touches bits below its size (1024), and
    // CpuSet holds no CPU at or above that.
    let rc = unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        for c in cpus.iter() {
            libc::CPU_SET(c, &mut set);
        }
        libc::sched_setaffinity(tid, std::mem::size_of::<libc::cpu_set_t>(), &set)
    };
    called("sched_setaffinity", tid, rc.into())
}

fn get_affinity(tid: i32) -> Result<Option<CpuSet>> {
    // SAFETY: as above; the kernel writes at most size_of::<cpu_set_t>() bytes.
    let (rc, set) = unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        let rc = libc::sched_getaffinity(tid, std::mem::size_of::<libc::cpu_set_t>(), &mut set);
        (rc, set)
    };
    if !called("sched_getaffinity", tid, rc.into())? {
        return Ok(None);
    }
    // SAFETY: CPU_ISSET reads a bit below the set's size.
    let cpus = (0..CpuSet::MAX).filter(|c| unsafe { libc::CPU_ISSET(*c, &set) });
    CpuSet::new(cpus).map(Some)
}

fn set_nice(tid: i32, nice: i32) -> Result<bool> {
    // SAFETY: a plain syscall on a thread id.
    let rc = unsafe { libc::setpriority(libc::PRIO_PROCESS, tid as libc::id_t, nice) };
    called("setpriority", tid, rc.into())
}

fn get_nice(tid: i32) -> Result<Option<i32>> {
    // getpriority may return -1 as a value, so errno is cleared first and checked after.
    // SAFETY: errno is thread-local; the call is a plain syscall.
    let nice = unsafe {
        *libc::__errno_location() = 0;
        libc::getpriority(libc::PRIO_PROCESS, tid as libc::id_t)
    };
    let errno = io::Error::last_os_error();
    match errno.raw_os_error() {
        Some(0) | None => Ok(Some(nice)),
        Some(libc::ESRCH) => Ok(None),
        _ => Err(io_err(
            "getpriority",
            Path::new(&format!("/proc/{tid}")),
            errno,
        )),
    }
}

fn encode(p: IoPriority) -> libc::c_long {
    let (class, level) = match p {
        IoPriority::None => (0, 0),
        IoPriority::RealTime(l) => (1, l),
        IoPriority::BestEffort(l) => (2, l),
        IoPriority::Idle => (3, 0),
    };
    ((class << IOPRIO_CLASS_SHIFT) | u32::from(level)) as libc::c_long
}

fn decode(v: libc::c_long) -> IoPriority {
    let level = (v & 7) as u8;
    match (v >> IOPRIO_CLASS_SHIFT) & 7 {
        1 => IoPriority::RealTime(level),
        2 => IoPriority::BestEffort(level),
        3 => IoPriority::Idle,
        _ => IoPriority::None,
    }
}

fn set_ioprio(tid: i32, p: IoPriority) -> Result<bool> {
    // SAFETY: a plain syscall on a thread id.
    let rc = unsafe { libc::syscall(libc::SYS_ioprio_set, IOPRIO_WHO_PROCESS, tid, encode(p)) };
    called("ioprio_set", tid, rc)
}

fn get_ioprio(tid: i32) -> Result<Option<IoPriority>> {
    // SAFETY: a plain syscall on a thread id.
    let rc = unsafe { libc::syscall(libc::SYS_ioprio_get, IOPRIO_WHO_PROCESS, tid) };
    Ok(called("ioprio_get", tid, rc)?.then(|| decode(rc)))
}

/// The CPUs that are online (`/sys/devices/system/cpu/online`, e.g. `0-3,6`).
fn online_cpus() -> Result<CpuSet> {
    let path = Path::new("/sys/devices/system/cpu/online");
    let text = fs::read_to_string(path).map_err(|e| io_err("read", path, e))?;
    let bad = || Error::Parse {
        actuator: NAME,
        path: path.to_path_buf(),
        value: text.trim().to_string(),
    };
    let mut cpus = Vec::new();
    for part in text.trim().split(',') {
        let (a, b) = part.split_once('-').unwrap_or((part, part));
        let (a, b): (usize, usize) = (a.parse().map_err(|_| bad())?, b.parse().map_err(|_| bad())?);
        cpus.extend(a..=b);
    }
    CpuSet::new(cpus)
}

impl Scheduling {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    /// Every thread of every process in the component's cgroup.
    fn threads(&self, target: &Target) -> Result<Vec<i32>> {
        let procs = self.root.join(&target.cgroup).join("cgroup.procs");
        let text = fs::read_to_string(&procs).map_err(|e| io_err("read", &procs, e))?;
        let mut out = Vec::new();
        for line in text.lines().filter(|l| !l.trim().is_empty()) {
            let pid: i32 = line.trim().parse().map_err(|_| Error::Parse {
                actuator: NAME,
                path: procs.clone(),
                value: line.to_string(),
            })?;
            let tasks = PathBuf::from(format!("/proc/{pid}/task"));
            let entries = match fs::read_dir(&tasks) {
                Ok(e) => e,
                // The process exited after the cgroup listed it.
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(io_err("read", &tasks, e)),
            };
            let mut tids: Vec<i32> = entries
                .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
                .collect();
            tids.sort_unstable();
            // The main thread first, so read-back reports the process's own values.
            tids.sort_by_key(|t| *t != pid);
            out.extend(tids);
        }
        Ok(out)
    }
}

impl Actuator for Scheduling {
    fn name(&self) -> &'static str {
        NAME
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            cpus: true,
            nice: true,
            io_priority: true,
            ..Capabilities::default()
        }
    }

    fn apply(&self, target: &Target, limits: &Limits) -> Result<()> {
        limits.check(NAME, self.capabilities(), || {
            "it sets only affinity, nice and I/O priority".into()
        })?;
        if limits.cpus.is_none() && limits.nice.is_none() && limits.io_priority.is_none() {
            return Ok(());
        }
        let threads = self.threads(target)?;
        if threads.is_empty() {
            return Err(Error::Invalid(format!(
                "cgroup {} has no processes to schedule",
                target.cgroup
            )));
        }
        for tid in threads {
            if let Some(cpus) = &limits.cpus {
                set_affinity(tid, cpus)?;
            }
            if let Some(n) = limits.nice {
                set_nice(tid, n)?;
            }
            if let Some(p) = limits.io_priority {
                set_ioprio(tid, p)?;
            }
        }
        Ok(())
    }

    fn read_back(&self, target: &Target) -> Result<Limits> {
        let online = online_cpus()?;
        for tid in self.threads(target)? {
            let (Some(cpus), Some(nice), Some(io)) =
                (get_affinity(tid)?, get_nice(tid)?, get_ioprio(tid)?)
            else {
                continue; // the thread exited between calls
            };
            return Ok(Limits {
                cpus: (cpus != online).then_some(cpus),
                nice: (nice != 0).then_some(nice),
                io_priority: (io != IoPriority::None).then_some(io),
                ..Limits::default()
            });
        }
        Ok(Limits::default())
    }

    fn revert(&self, target: &Target) -> Result<()> {
        // The kernel narrows a full mask to what the thread's cpuset allows.
        let all = CpuSet::new(0..CpuSet::MAX)?;
        for tid in self.threads(target)? {
            set_affinity(tid, &all)?;
            set_nice(tid, 0)?;
            set_ioprio(tid, IoPriority::None)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{ROOT, fixture};
    use std::process::Command;

    /// Affinity, nice and I/O class of a process as /proc and the kernel report them, not as
    /// the plugin does.
    fn observed(pid: u32) -> (String, i64, IoPriority) {
        let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        let allowed = status
            .lines()
            .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
            .unwrap()
            .trim()
            .to_string();
        let stat = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
        let rest = &stat[stat.rfind(')').unwrap() + 2..];
        let nice = rest.split_whitespace().nth(16).unwrap().parse().unwrap();
        // SAFETY: a plain syscall.
        let io = unsafe { libc::syscall(libc::SYS_ioprio_get, IOPRIO_WHO_PROCESS, pid) };
        (allowed, nice, decode(io))
    }

    #[test]
    fn scheduling_sets_every_process_in_the_cgroup_and_reverts() {
        let mut f = fixture("sched");
        let second = f.spawn(Command::new("sleep").arg("60"));
        let sched = Scheduling::new(format!("{ROOT}/cpu"));
        let limits = Limits {
            cpus: Some(CpuSet::new([0]).unwrap()),
            nice: Some(7),
            io_priority: Some(IoPriority::BestEffort(6)),
            ..Default::default()
        };
        sched.apply(&f.target, &limits).unwrap();
        assert_eq!(sched.read_back(&f.target).unwrap(), limits);
        for pid in [f.pid(), second] {
            assert_eq!(
                observed(pid),
                ("0".to_string(), 7, IoPriority::BestEffort(6)),
                "{pid}"
            );
        }
        // Only what is asked changes.
        sched
            .apply(
                &f.target,
                &Limits {
                    io_priority: Some(IoPriority::Idle),
                    ..Default::default()
                },
            )
            .unwrap();
        assert_eq!(observed(second), ("0".to_string(), 7, IoPriority::Idle));
        sched.revert(&f.target).unwrap();
        assert_eq!(sched.read_back(&f.target).unwrap(), Limits::default());
        let online = fs::read_to_string("/sys/devices/system/cpu/online").unwrap();
        assert_eq!(
            observed(second),
            (online.trim().to_string(), 0, IoPriority::None)
        );
    }

    #[test]
    fn scheduling_refuses_bad_values_and_empty_cgroups() {
        let f = fixture("sched-bad");
        let sched = Scheduling::new(format!("{ROOT}/cpu"));
        for (limits, says) in [
            (
                Limits {
                    nice: Some(20),
                    ..Default::default()
                },
                "outside -20..=19",
            ),
            (
                Limits {
                    io_priority: Some(IoPriority::BestEffort(8)),
                    ..Default::default()
                },
                "outside 0..=7",
            ),
            (
                Limits {
                    cpus: Some(CpuSet::new([]).unwrap()),
                    ..Default::default()
                },
                "empty CPU set",
            ),
            (
                Limits {
                    memory_max_bytes: Some(1 << 20),
                    ..Default::default()
                },
                "cannot set memory.max",
            ),
        ] {
            let err = sched.apply(&f.target, &limits).unwrap_err();
            assert!(err.to_string().contains(says), "{err}");
        }
        assert!(CpuSet::new([CpuSet::MAX]).is_err());
        // A CPU that is not online: the kernel refuses, and so does the plugin.
        let err = sched
            .apply(
                &f.target,
                &Limits {
                    cpus: Some(CpuSet::new([CpuSet::MAX - 1]).unwrap()),
                    ..Default::default()
                },
            )
            .unwrap_err();
        assert!(err.to_string().contains("sched_setaffinity"), "{err}");
        // A cgroup with nobody in it has nothing to schedule.
        let empty = Target::new("nobody", format!("{}-empty", f.target.cgroup)).unwrap();
        f.cg.create(&empty).unwrap();
        let err = sched
            .apply(
                &empty,
                &Limits {
                    nice: Some(1),
                    ..Default::default()
                },
            )
            .unwrap_err();
        f.cg.remove(&empty).unwrap();
        assert!(err.to_string().contains("no processes"), "{err}");
    }
}
