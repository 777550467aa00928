//! The host collector: the host's own metrics, written every `[collector] interval` through
//! the one write path (WAL, buffer, continuous queries), so a fresh `forestall serve` has
//! real data to query, forecast and score from its first minute.
//!
//! Measurement and field names are **Telegraf's** (its `cpu`, `mem`, `system`, `diskio`,
//! `net` and `disk` inputs), with its `host` tag: dashboards and queries written for
//! Telegraf's data read this unchanged. Line protocol's fields-per-measurement shape is
//! Telegraf's too, where node_exporter's one-series-per-value would cost a row per number.
//! Units are Telegraf's: percent for `cpu`, bytes for `mem` and `disk`, cumulative counters
//! (bytes, operations, ms) for `diskio` and `net`, whose rates a query takes. Where Telegraf
//! has no standard input, for the cgroups under `cgroup_parent`, `cgroup` rows carry the
//! same readings the allocation loop meters (`cpu_seconds` counter and `cpu_cores` over the
//! interval, `memory_bytes` working set, `io_bytes` and `net_bytes` counters), tagged with
//! the cgroup's `path`.
//!
//! Each source is read on its own: one that fails (a missing file, a cgroup that vanished,
//! a type conflict with a user's own `cpu` measurement) is logged once when it starts and
//! once when it stops failing, and the others are still written. Rates need two readings,
//! so the first collection writes no `cpu` rows and no `cgroup` `cpu_cores`.

pub mod procfs;
pub mod sys;

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use forestall_actuators::cgroup_v1::CgroupV1;
use forestall_actuators::cgroup_v2::CgroupV2;
use forestall_actuators::{Meter, Target};
use forestall_engine::line_protocol::{FieldValue, Precision, write_point};
use forestall_engine::store::now_nanos;
use forestall_engine::{Metrics, Store};
use forestall_query::continuous::{DefinitionSpec, HealthSpec};

use crate::config::CollectorConfig;
use procfs::CpuTimes;

/// What one collection read, as line protocol, and what it could not read.
#[derive(Debug, Default, Clone)]
pub struct Collection {
    pub lines: String,
    /// One per source that failed: (source, why).
    pub problems: Vec<(String, String)>,
}

/// The collector's memory between collections.
#[derive(Debug)]
pub struct Collector {
    config: CollectorConfig,
    proc: PathBuf,
    host: String,
    cpus: BTreeMap<String, CpuTimes>,
    /// Per cgroup path: when its CPU was read, and the reading.
    cgroups: BTreeMap<String, (Instant, f64)>,
    /// The sources failing at the last collection, to log changes only.
    failing: BTreeSet<String>,
}

impl Collector {
    /// A collector reading `/proc` and the configured cgroups.
    pub fn new(config: &CollectorConfig) -> Self {
        Self::with_proc(config, "/proc")
    }

    /// A collector reading another proc tree (tests point it at fixtures).
    pub fn with_proc(config: &CollectorConfig, proc: impl Into<PathBuf>) -> Self {
        let proc = proc.into();
        let host = std::fs::read_to_string(proc.join("sys/kernel/hostname"))
            .ok()
            .map(|h| h.trim().to_string())
            .filter(|h| !h.is_empty())
            .unwrap_or_else(|| "localhost".into());
        Self {
            config: config.clone(),
            proc,
            host,
            cpus: BTreeMap::new(),
            cgroups: BTreeMap::new(),
            failing: BTreeSet::new(),
        }
    }

    /// The value of every row's `host` tag.
    pub fn host(&self) -> &str {
        &self.host
    }

    /// Reads every source once, stamping rows with `now` (ns).
    pub fn collect(&mut self, now: i64) -> Collection {
        let (host, proc) = (self.host.clone(), self.proc.clone());
        let mut out = Rows {
            host: &host,
            now,
            c: Collection::default(),
        };
        let read = |name: &str| std::fs::read_to_string(proc.join(name));
        match read("stat") {
            Ok(text) => self.cpu(&text, &mut out),
            Err(e) => out.problem("cpu", format!("read /proc/stat: {e}")),
        }
        match read("meminfo") {
            Ok(text) => mem(&text, &mut out),
            Err(e) => out.problem("mem", format!("read /proc/meminfo: {e}")),
        }
        match (read("loadavg"), read("uptime")) {
            (Ok(load), Ok(up)) => system(&load, &up, &mut out),
            (Err(e), _) | (_, Err(e)) => out.problem("system", format!("read /proc: {e}")),
        }
        match read("diskstats") {
            Ok(text) => diskio(&text, &mut out),
            Err(e) => out.problem("diskio", format!("read /proc/diskstats: {e}")),
        }
        match read("net/dev") {
            Ok(text) => net(&text, &mut out),
            Err(e) => out.problem("net", format!("read /proc/net/dev: {e}")),
        }
        match (read("self/mounts"), read("filesystems")) {
            (Ok(m), Ok(f)) => disk(&m, &f, &mut out),
            (Err(e), _) | (_, Err(e)) => out.problem("disk", format!("read /proc: {e}")),
        }
        if !self.config.cgroup_parent.is_empty() {
            self.cgroup(&mut out);
        }
        out.c
    }

    fn cpu(&mut self, stat: &str, out: &mut Rows<'_>) {
        let times = procfs::cpu_times(stat);
        if times.is_empty() {
            out.problem("cpu", "/proc/stat has no cpu lines".into());
        }
        let mut next = BTreeMap::new();
        for (name, t) in times {
            if name != "cpu-total" && !self.config.per_cpu {
                continue;
            }
            if let Some(usage) = self
                .cpus
                .get(&name)
                .and_then(|before| t.usage_since(before))
            {
                let fields: Vec<_> = usage
                    .iter()
                    .map(|&(k, v)| (k, FieldValue::Float(v)))
                    .collect();
                out.row("cpu", &[("cpu", name.as_str())], &fields);
            }
            next.insert(name, t);
        }
        self.cpus = next;
    }

    /// The cgroups directly under `cgroup_parent`, metered as the allocation loop meters a
    /// component's.
    fn cgroup(&mut self, out: &mut Rows<'_>) {
        let root = &self.config.cgroup_root;
        let parent = self.config.cgroup_parent.trim_matches('/');
        let v2 = root.join("cgroup.controllers").exists();
        let meter: Box<dyn Meter> = match v2 {
            true => Box::new(CgroupV2::new(root)),
            false => Box::new(CgroupV1::new(root)),
        };
        // Where the children are listed: the unified tree, or the v1 controller that counts
        // CPU (memory when that one is not mounted).
        let listed = match v2 {
            true => root.join(parent),
            false => ["cpuacct", "memory"]
                .iter()
                .map(|c| root.join(c))
                .find(|d| d.is_dir())
                .unwrap_or_else(|| root.join("cpuacct"))
                .join(parent),
        };
        let children = match children(&listed) {
            Ok(c) => c,
            Err(e) => {
                out.problem("cgroup", format!("list {}: {e}", listed.display()));
                return;
            }
        };
        let mut next = BTreeMap::new();
        let mut failed = Vec::new();
        for child in children {
            let path = match parent {
                "" => child.clone(),
                p => format!("{p}/{child}"),
            };
            let Ok(target) = Target::new(&path, &path) else {
                continue;
            };
            let u = match meter.usage(&target) {
                Ok(u) => u,
                // A cgroup removed between the listing and the reading is no problem.
                Err(e) if listed.join(&child).exists() => {
                    failed.push(format!("{path}: {e}"));
                    continue;
                }
                Err(_) => continue,
            };
            let at = Instant::now();
            let mut fields = Vec::new();
            if let Some(cpu) = u.cpu_seconds {
                fields.push(("cpu_seconds", FieldValue::Float(cpu)));
                if let Some((t0, before)) = self.cgroups.get(&path)
                    && cpu >= *before
                {
                    let secs = at.duration_since(*t0).as_secs_f64();
                    if secs > 0.0 {
                        fields.push(("cpu_cores", FieldValue::Float((cpu - before) / secs)));
                    }
                }
                next.insert(path.clone(), (at, cpu));
            }
            for (name, v) in [
                ("memory_bytes", u.memory_bytes),
                ("io_bytes", u.io_bytes),
                ("net_bytes", u.net_bytes),
            ] {
                if let Some(v) = v {
                    fields.push((name, FieldValue::Integer(clamp(v))));
                }
            }
            if !fields.is_empty() {
                out.row("cgroup", &[("path", path.as_str())], &fields);
            }
        }
        if !failed.is_empty() {
            out.problem("cgroup", failed.join("; "));
        }
        self.cgroups = next;
    }

    /// Logs the sources that started or stopped failing since the last call.
    fn report(&mut self, problems: &[(String, String)]) {
        let now: BTreeSet<String> = problems.iter().map(|(s, _)| s.clone()).collect();
        for (source, why) in problems {
            if !self.failing.contains(source) {
                tracing::warn!(%source, problem = %why, "the host collector cannot read a source");
            }
        }
        for source in self.failing.difference(&now) {
            tracing::info!(%source, "the host collector reads the source again");
        }
        self.failing = now;
    }
}

/// Line protocol under construction, every row tagged with the host.
struct Rows<'a> {
    host: &'a str,
    now: i64,
    c: Collection,
}

impl Rows<'_> {
    fn row(&mut self, measurement: &str, tags: &[(&str, &str)], fields: &[(&str, FieldValue<'_>)]) {
        let host = [("host", self.host)];
        write_point(
            &mut self.c.lines,
            measurement,
            host.iter().chain(tags).copied(),
            fields.iter().map(|(k, v)| (*k, v)),
            self.now,
        );
        self.c.lines.push('\n');
    }

    fn problem(&mut self, source: &str, why: String) {
        self.c.problems.push((source.to_string(), why));
    }
}

/// A counter as line protocol's signed integer (Telegraf's `i` fields).
fn clamp(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

fn int(v: u64) -> FieldValue<'static> {
    FieldValue::Integer(clamp(v))
}

/// Telegraf's `mem` fields, from `/proc/meminfo` as gopsutil reads it (`cached` includes the
/// reclaimable slab; `used` is what is neither free, buffers nor cache).
fn mem(text: &str, out: &mut Rows<'_>) {
    let info: BTreeMap<&str, u64> = procfs::meminfo(text).into_iter().collect();
    let get = |k: &str| info.get(k).copied();
    let (Some(total), Some(free)) = (get("MemTotal"), get("MemFree")) else {
        out.problem("mem", "/proc/meminfo has no MemTotal or MemFree".into());
        return;
    };
    let buffered = get("Buffers").unwrap_or(0);
    let cached = get("Cached")
        .unwrap_or(0)
        .saturating_add(get("SReclaimable").unwrap_or(0));
    let available = get("MemAvailable").unwrap_or(free.saturating_add(cached));
    let used = total
        .saturating_sub(free)
        .saturating_sub(buffered)
        .saturating_sub(cached);
    let pct = |v: u64| match total {
        0 => 0.0,
        t => 100.0 * v as f64 / t as f64,
    };
    let mut fields = vec![
        ("total", int(total)),
        ("available", int(available)),
        ("used", int(used)),
        ("free", int(free)),
        ("cached", int(cached)),
        ("buffered", int(buffered)),
        ("used_percent", FieldValue::Float(pct(used))),
        ("available_percent", FieldValue::Float(pct(available))),
    ];
    for (key, name) in [
        ("Active", "active"),
        ("Inactive", "inactive"),
        ("Slab", "slab"),
        ("Shmem", "shared"),
        ("Dirty", "dirty"),
        ("SwapTotal", "swap_total"),
        ("SwapFree", "swap_free"),
        ("SwapCached", "swap_cached"),
    ] {
        if let Some(v) = get(key) {
            fields.push((name, int(v)));
        }
    }
    out.row("mem", &[], &fields);
}

/// Telegraf's `system` fields (without `n_users`, which needs utmp).
fn system(loadavg: &str, uptime: &str, out: &mut Rows<'_>) {
    let Some([l1, l5, l15]) = procfs::loadavg(loadavg) else {
        out.problem(
            "system",
            format!("/proc/loadavg is not three loads: {loadavg:?}"),
        );
        return;
    };
    let mut fields = vec![
        ("load1", FieldValue::Float(l1)),
        ("load5", FieldValue::Float(l5)),
        ("load15", FieldValue::Float(l15)),
    ];
    // The CPUs this process may run on, as Go's runtime.NumCPU() that Telegraf reports.
    let n = std::thread::available_parallelism().map_or(1, |n| n.get());
    fields.push(("n_cpus", int(n as u64)));
    if let Some(up) = procfs::uptime(uptime) {
        fields.push(("uptime", int(up)));
    }
    out.row("system", &[], &fields);
}

/// Telegraf's `diskio`, per device; devices that have never done I/O (unused loop and ram
/// devices) are left out.
fn diskio(text: &str, out: &mut Rows<'_>) {
    for d in procfs::diskstats(text) {
        if d.reads == 0 && d.writes == 0 {
            continue;
        }
        let fields = [
            ("reads", int(d.reads)),
            ("writes", int(d.writes)),
            ("read_bytes", int(d.read_bytes)),
            ("write_bytes", int(d.write_bytes)),
            ("read_time", int(d.read_time)),
            ("write_time", int(d.write_time)),
            ("io_time", int(d.io_time)),
            ("weighted_io_time", int(d.weighted_io_time)),
            ("iops_in_progress", int(d.iops_in_progress)),
            ("merged_reads", int(d.merged_reads)),
            ("merged_writes", int(d.merged_writes)),
        ];
        out.row("diskio", &[("name", d.name.as_str())], &fields);
    }
}

/// Telegraf's `net`, per interface except the loopback (Telegraf skips it unless asked).
fn net(text: &str, out: &mut Rows<'_>) {
    for n in procfs::net_dev(text) {
        if n.interface == "lo" {
            continue;
        }
        let fields = [
            ("bytes_sent", int(n.bytes_sent)),
            ("bytes_recv", int(n.bytes_recv)),
            ("packets_sent", int(n.packets_sent)),
            ("packets_recv", int(n.packets_recv)),
            ("err_in", int(n.err_in)),
            ("err_out", int(n.err_out)),
            ("drop_in", int(n.drop_in)),
            ("drop_out", int(n.drop_out)),
        ];
        out.row("net", &[("interface", n.interface.as_str())], &fields);
    }
}

/// Telegraf's `disk`, per mounted filesystem on a device.
fn disk(mounts: &str, filesystems: &str, out: &mut Rows<'_>) {
    let mut failed = Vec::new();
    for m in procfs::mounts(mounts, filesystems) {
        let u = match sys::statvfs(Path::new(&m.path)) {
            Ok(u) => u,
            Err(e) => {
                failed.push(format!("{}: {e}", m.path));
                continue;
            }
        };
        let in_use = u.used.saturating_add(u.free);
        let used_percent = match in_use {
            0 => 0.0,
            n => 100.0 * u.used as f64 / n as f64,
        };
        let device = m.device.rsplit('/').next().unwrap_or(&m.device);
        let mode = if m.read_only { "ro" } else { "rw" };
        let fields = [
            ("total", int(u.total)),
            ("free", int(u.free)),
            ("used", int(u.used)),
            ("used_percent", FieldValue::Float(used_percent)),
            ("inodes_total", int(u.inodes_total)),
            ("inodes_free", int(u.inodes_free)),
            ("inodes_used", int(u.inodes_used)),
        ];
        out.row(
            "disk",
            &[
                ("path", m.path.as_str()),
                ("device", device),
                ("fstype", m.fstype.as_str()),
                ("mode", mode),
            ],
            &fields,
        );
    }
    if !failed.is_empty() {
        out.problem("disk", failed.join("; "));
    }
}

/// Built-in health queries are named this, then what they check (`forestall_host_cpu`).
pub const BUILTIN_PREFIX: &str = "forestall_host_";

/// The built-in `HEALTH` queries over what the collector writes (`[collector] health`), with
/// the host name as their component: each runs every three collections over the last six
/// (every 30 s over a minute by default), late by half a collection so the last one is in.
/// Their thresholds are the `[collector]` section's documented ones; a user who wants others
/// replaces the query (`CREATE OR REPLACE`) and keeps it.
pub fn builtin_queries(config: &CollectorConfig) -> Vec<DefinitionSpec> {
    if !config.enabled || !config.health {
        return Vec::new();
    }
    let every = config.interval * 3;
    let window = format!(
        "INTERVAL '{} milliseconds'",
        (config.interval * 6).as_millis()
    );
    let check = |what: &str, warn: u32, fail: u32, hold: &str, query: String| DefinitionSpec {
        name: Some(format!("{BUILTIN_PREFIX}{what}")),
        every: Some(humantime::format_duration(every).to_string()),
        lateness: Some(humantime::format_duration(config.interval / 2).to_string()),
        health: Some(HealthSpec {
            warn: Some(format!("value > {warn}")),
            fail: Some(format!("value > {fail}")),
            hold: Some(hold.into()),
        }),
        query,
        ..Default::default()
    };
    vec![
        check(
            "cpu",
            90,
            98,
            "5m",
            format!(
                "SELECT host AS component, 100 - avg(usage_idle) AS value FROM cpu \
                 WHERE cpu = 'cpu-total' AND time > now() - {window} GROUP BY host"
            ),
        ),
        check(
            "memory",
            90,
            97,
            "2m",
            format!(
                "SELECT host AS component, 100 - min(available_percent) AS value FROM mem \
                 WHERE time > now() - {window} GROUP BY host"
            ),
        ),
        check(
            "disk",
            85,
            95,
            "5m",
            format!(
                "SELECT host AS component, path, max(used_percent) AS value FROM disk \
                 WHERE mode = 'rw' AND time > now() - {window} GROUP BY host, path"
            ),
        ),
    ]
}

/// The names of the directories in `dir`, sorted.
fn children(dir: &Path) -> std::io::Result<Vec<String>> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        if entry.file_type()?.is_dir()
            && let Ok(name) = entry.file_name().into_string()
        {
            out.push(name);
        }
    }
    out.sort();
    Ok(out)
}

/// Collects and writes once: what the collector read goes through [`Store::write`], and
/// lines the store rejects (a user's own `cpu` with other field types, say) are a problem of
/// that source. Returns the collection.
pub fn collect_and_write(collector: &mut Collector, store: &Store, now: i64) -> Collection {
    let cpu_before = sys::thread_cpu_micros();
    let mut c = collector.collect(now);
    if !c.lines.is_empty() {
        match store.write(c.lines.as_bytes(), Precision::Nanoseconds, now) {
            Ok(outcome) if outcome.rejected_lines > 0 => {
                let why: Vec<_> = outcome.errors.iter().map(|e| e.reason.clone()).collect();
                c.problems.push((
                    "write".into(),
                    format!(
                        "{} of {} rows rejected: {}",
                        outcome.rejected_lines,
                        outcome.rejected_lines + outcome.accepted_lines,
                        why.join("; ")
                    ),
                ));
            }
            Ok(_) => {}
            Err(e) => c.problems.push(("write".into(), e.to_string())),
        }
    }
    collector.report(&c.problems);
    let m = store.metrics();
    Metrics::add(&m.collector_collections_total, 1);
    Metrics::add(&m.collector_problems_total, c.problems.len() as u64);
    Metrics::add(
        &m.collector_cpu_microseconds_total,
        sys::thread_cpu_micros().saturating_sub(cpu_before),
    );
    c
}

/// Runs the collector until `shutdown` resolves: a collection at every multiple of the
/// interval (wall clock), so the rows of every host line up as Telegraf's do with
/// `round_interval`. A collection still running when the next is due is not doubled: that
/// tick is skipped.
pub async fn run(
    store: Arc<Store>,
    config: CollectorConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) {
    let collector = Arc::new(Mutex::new(Collector::new(&config)));
    let interval = config.interval;
    tracing::info!(
        host = %collector.lock().map(|c| c.host().to_string()).unwrap_or_default(),
        interval = %humantime::format_duration(interval),
        "host collector running"
    );
    tokio::pin!(shutdown);
    loop {
        let wait = until_next_multiple(now_nanos(), interval);
        tokio::select! {
            _ = &mut shutdown => break,
            _ = tokio::time::sleep(wait) => {}
        }
        let (collector, store) = (Arc::clone(&collector), Arc::clone(&store));
        let done = tokio::task::spawn_blocking(move || {
            let mut c = collector.lock().unwrap_or_else(|p| p.into_inner());
            collect_and_write(&mut c, &store, now_nanos());
        })
        .await;
        if let Err(e) = done {
            tracing::error!(error = %e, "the host collector failed");
        }
    }
}

/// How long from `now` (ns) to the next multiple of `interval`.
fn until_next_multiple(now: i64, interval: Duration) -> Duration {
    let step = interval.as_nanos().max(1) as i64;
    Duration::from_nanos((step - now.rem_euclid(step)) as u64)
}

#[cfg(test)]
mod tests;
