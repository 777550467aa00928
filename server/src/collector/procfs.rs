//! Parsers of the `/proc` files the collector reads. Each takes the file's text and returns
//! what it could read: a line that is short, truncated or not a number is skipped, never a
//! panic and never a guess, so one odd line (a new kernel's extra column, a device name
//! with a space) costs that line only.

/// One `cpu` line of `/proc/stat`, in USER_HZ ticks. Kernels before 2.6.33 have fewer
/// columns; the missing ones are 0.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct CpuTimes {
    pub user: u64,
    pub nice: u64,
    pub system: u64,
    pub idle: u64,
    pub iowait: u64,
    pub irq: u64,
    pub softirq: u64,
    pub steal: u64,
    pub guest: u64,
    pub guest_nice: u64,
}

impl CpuTimes {
    /// Every tick the CPU spent: guest time is left out, as the kernel counts it in user
    /// (and guest_nice in nice) already.
    pub fn total(&self) -> u64 {
        [
            self.user,
            self.nice,
            self.system,
            self.idle,
            self.iowait,
            self.irq,
            self.softirq,
            self.steal,
        ]
        .iter()
        .fold(0u64, |a, &b| a.saturating_add(b))
    }

    /// The share of each mode between `before` and `self`, in percent, with Telegraf's
    /// `cpu` field names (`usage_user` … `usage_guest_nice`); `None` when no time passed or a
    /// counter went backwards (a CPU taken offline and back, a reset).
    pub fn usage_since(&self, before: &CpuTimes) -> Option<[(&'static str, f64); 10]> {
        let d = |now: u64, then: u64| now.checked_sub(then);
        let total = d(self.total(), before.total())?;
        if total == 0 {
            return None;
        }
        let user = d(self.user, before.user)?;
        let nice = d(self.nice, before.nice)?;
        let guest = d(self.guest, before.guest)?;
        let guest_nice = d(self.guest_nice, before.guest_nice)?;
        let pct = |ticks: u64| 100.0 * ticks as f64 / total as f64;
        Some([
            ("usage_user", pct(user.saturating_sub(guest))),
            ("usage_system", pct(d(self.system, before.system)?)),
            ("usage_idle", pct(d(self.idle, before.idle)?)),
            ("usage_nice", pct(nice.saturating_sub(guest_nice))),
            ("usage_iowait", pct(d(self.iowait, before.iowait)?)),
            ("usage_irq", pct(d(self.irq, before.irq)?)),
            ("usage_softirq", pct(d(self.softirq, before.softirq)?)),
            ("usage_steal", pct(d(self.steal, before.steal)?)),
            ("usage_guest", pct(guest)),
            ("usage_guest_nice", pct(guest_nice)),
        ])
    }
}

/// The `cpu` lines of `/proc/stat`: (`cpu-total` or `cpuN`, times), Telegraf's tag values.
pub fn cpu_times(stat: &str) -> Vec<(String, CpuTimes)> {
    stat.lines()
        .filter_map(|line| {
            let mut parts = line.split_ascii_whitespace();
            let name = parts.next()?;
            let id = name.strip_prefix("cpu")?;
            if !(id.is_empty() || id.bytes().all(|b| b.is_ascii_digit())) {
                return None;
            }
            let v: Vec<u64> = parts.map(|p| p.parse().ok()).collect::<Option<_>>()?;
            if v.len() < 4 {
                return None;
            }
            let at = |i: usize| v.get(i).copied().unwrap_or(0);
            let times = CpuTimes {
                user: at(0),
                nice: at(1),
                system: at(2),
                idle: at(3),
                iowait: at(4),
                irq: at(5),
                softirq: at(6),
                steal: at(7),
                guest: at(8),
                guest_nice: at(9),
            };
            let tag = match id {
                "" => "cpu-total".to_string(),
                _ => name.to_string(),
            };
            Some((tag, times))
        })
        .collect()
}

/// `/proc/meminfo` as (key, bytes): `kB` values times 1024, unitless ones (`HugePages_*`) as
/// they are.
pub fn meminfo(text: &str) -> Vec<(&str, u64)> {
    text.lines()
        .filter_map(|line| {
            let (key, rest) = line.split_once(':')?;
            let mut parts = rest.split_ascii_whitespace();
            let v: u64 = parts.next()?.parse().ok()?;
            match parts.next() {
                None => Some((key.trim(), v)),
                Some("kB") => Some((key.trim(), v.checked_mul(1024)?)),
                Some(_) => None,
            }
        })
        .collect()
}

/// `/proc/loadavg`'s three load averages.
pub fn loadavg(text: &str) -> Option<[f64; 3]> {
    let mut parts = text.split_ascii_whitespace();
    let mut next = || -> Option<f64> {
        let v: f64 = parts.next()?.parse().ok()?;
        (v.is_finite() && v >= 0.0).then_some(v)
    };
    Some([next()?, next()?, next()?])
}

/// `/proc/uptime`'s first number, whole seconds.
pub fn uptime(text: &str) -> Option<u64> {
    let v: f64 = text.split_ascii_whitespace().next()?.parse().ok()?;
    (v.is_finite() && v >= 0.0).then_some(v as u64)
}

/// One line of `/proc/diskstats`, with Telegraf's `diskio` names (times in ms, bytes from
/// 512-byte sectors, whatever the device's block size: the kernel counts in those).
#[derive(Debug, Clone, PartialEq)]
pub struct DiskStats {
    pub name: String,
    pub reads: u64,
    pub merged_reads: u64,
    pub read_bytes: u64,
    pub read_time: u64,
    pub writes: u64,
    pub merged_writes: u64,
    pub write_bytes: u64,
    pub write_time: u64,
    pub iops_in_progress: u64,
    pub io_time: u64,
    pub weighted_io_time: u64,
}

/// The devices of `/proc/diskstats` (14 columns or more; later kernels add discards and
/// flushes, which are not read).
pub fn diskstats(text: &str) -> Vec<DiskStats> {
    text.lines()
        .filter_map(|line| {
            let parts: Vec<&str> = line.split_ascii_whitespace().collect();
            if parts.len() < 14 {
                return None;
            }
            let v: Vec<u64> = parts[3..14]
                .iter()
                .map(|p| p.parse().ok())
                .collect::<Option<_>>()?;
            Some(DiskStats {
                name: parts[2].to_string(),
                reads: v[0],
                merged_reads: v[1],
                read_bytes: v[2].saturating_mul(512),
                read_time: v[3],
                writes: v[4],
                merged_writes: v[5],
                write_bytes: v[6].saturating_mul(512),
                write_time: v[7],
                iops_in_progress: v[8],
                io_time: v[9],
                weighted_io_time: v[10],
            })
        })
        .collect()
}

/// One interface of `/proc/net/dev`, with Telegraf's `net` names.
#[derive(Debug, Clone, PartialEq)]
pub struct NetDev {
    pub interface: String,
    pub bytes_recv: u64,
    pub packets_recv: u64,
    pub err_in: u64,
    pub drop_in: u64,
    pub bytes_sent: u64,
    pub packets_sent: u64,
    pub err_out: u64,
    pub drop_out: u64,
}

/// The interfaces of `/proc/net/dev` (the two header lines have no numbers and are skipped).
pub fn net_dev(text: &str) -> Vec<NetDev> {
    text.lines()
        .filter_map(|line| {
            let (name, counters) = line.split_once(':')?;
            let v: Vec<u64> = counters
                .split_ascii_whitespace()
                .map(|p| p.parse().ok())
                .collect::<Option<_>>()?;
            if v.len() < 16 {
                return None;
            }
            let interface = name.trim();
            if interface.is_empty() {
                return None;
            }
            Some(NetDev {
                interface: interface.to_string(),
                bytes_recv: v[0],
                packets_recv: v[1],
                err_in: v[2],
                drop_in: v[3],
                bytes_sent: v[8],
                packets_sent: v[9],
                err_out: v[10],
                drop_out: v[11],
            })
        })
        .collect()
}

/// A mounted filesystem from `/proc/self/mounts`.
#[derive(Debug, Clone, PartialEq)]
pub struct Mount {
    pub device: String,
    pub path: String,
    pub fstype: String,
    pub read_only: bool,
}

/// The mounts of `/proc/self/mounts` whose filesystem keeps data on a device: types that
/// `/proc/filesystems` marks `nodev` (proc, tmpfs, cgroup, overlay's upper layers, network
/// filesystems, …) are left out, as gopsutil's physical partitions, and so are the types of
/// Telegraf's default `ignore_fs` that some kernels do not mark (`overlay`, `aufs`,
/// `squashfs`, `iso9660`). A path mounted twice is listed once.
pub fn mounts(mounts: &str, filesystems: &str) -> Vec<Mount> {
    let nodev: Vec<&str> = filesystems
        .lines()
        .filter_map(|l| l.strip_prefix("nodev"))
        .map(str::trim)
        .collect();
    let mut seen = std::collections::BTreeSet::new();
    mounts
        .lines()
        .filter_map(|line| {
            let mut parts = line.split_ascii_whitespace();
            let device = unescape(parts.next()?);
            let path = unescape(parts.next()?);
            let fstype = parts.next()?.to_string();
            let options = parts.next()?;
            if nodev.contains(&fstype.as_str())
                || IGNORED_FS.contains(&fstype.as_str())
                || !path.starts_with('/')
                || !seen.insert(path.clone())
            {
                return None;
            }
            Some(Mount {
                device,
                path,
                fstype,
                read_only: options.split(',').any(|o| o == "ro"),
            })
        })
        .collect()
}

/// Filesystems left out whether or not `/proc/filesystems` marks them `nodev`.
const IGNORED_FS: [&str; 6] = [
    "tmpfs", "devtmpfs", "overlay", "aufs", "squashfs", "iso9660",
];

/// A mounts field with the kernel's octal escapes (`\040` for a space) undone.
fn unescape(field: &str) -> String {
    let b = field.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let octal = b.get(i + 1..i + 4).filter(|d| {
            b[i] == b'\\' && d.iter().all(|c| (b'0'..=b'7').contains(c)) && d[0] <= b'3'
        });
        match octal {
            Some(d) => {
                out.push((d[0] - b'0') * 64 + (d[1] - b'0') * 8 + (d[2] - b'0'));
                i += 4;
            }
            None => {
                out.push(b[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}
