//! TSBS "cpu-only" style ingestion benchmark: Forestall against VictoriaMetrics and InfluxDB 1.6,
//! the same data, in the same run.
//!
//! ```text
//! tsbs generate --hosts 1000 --hours 24 --out FILE
//! tsbs ingest   --hosts 1000 --hours 24 --work DIR --systems forestall,victoriametrics,influxdb
//! tsbs query    --hosts 1000 --hours 24 --work DIR --systems forestall,victoriametrics,influxdb
//! tsbs remote-write --hosts 1000 --hours 2 --work DIR --systems forestall,victoriametrics
//! ```
//!
//! `query` is described in its module. With `TSBS_VM_NO_CACHE=1` VictoriaMetrics runs with
//! `-search.disableCache`, so that repeated query windows measure its query work rather than
//! its rollup result cache.
//!
//! The data follows TSBS's `cpu-only` use case: measurement `cpu`, ten tags per host
//! (hostname, region, datacenter, rack, os, arch, team, service, service_version,
//! service_environment), ten fields `usage_user` … `usage_guest_nice` that are random walks
//! clamped to 0–100 and written as integers (as TSBS's InfluxDB serializer does), one row per
//! host every 10 s from 2016-01-01T00:00:00Z. The loader sends batches of 5,000 lines from 2
//! concurrent clients. Each server runs as a child process with a fresh data directory; the
//! harness reads its CPU time and peak RSS from /proc, stops it gracefully (each flushes what it
//! buffers) and measures its data directory.

use std::fs::{self, File};
use std::io::{BufRead, BufReader, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

#[path = "tsbs/cq.rs"]
mod cq;
#[path = "tsbs/query.rs"]
mod query;
#[path = "tsbs/remote_write.rs"]
mod remote_write;

const START_SECS: i64 = 1_451_606_400; // 2016-01-01T00:00:00Z
const FIELDS: [&str; 10] = [
    "usage_user",
    "usage_system",
    "usage_idle",
    "usage_nice",
    "usage_iowait",
    "usage_irq",
    "usage_softirq",
    "usage_steal",
    "usage_guest",
    "usage_guest_nice",
];
const REGIONS: [&str; 9] = [
    "us-east-1",
    "us-west-1",
    "us-west-2",
    "eu-west-1",
    "eu-central-1",
    "ap-southeast-1",
    "ap-southeast-2",
    "ap-northeast-1",
    "sa-east-1",
];

#[derive(Debug, Parser)]
#[command(about = "TSBS cpu-only ingestion benchmark")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

/// Which data set: its size and seed.
#[derive(Debug, Clone, Copy, clap::Args)]
struct DataSet {
    #[arg(long, default_value_t = 1000)]
    hosts: usize,
    #[arg(long, default_value_t = 24)]
    hours: usize,
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Write the values as floats (`usage_user=58`), as Prometheus and most agents send
    /// them, rather than as TSBS's integers (`usage_user=58i`).
    #[arg(long)]
    floats: bool,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Write the data set as line protocol.
    Generate {
        #[command(flatten)]
        data: DataSet,
        #[arg(long)]
        out: PathBuf,
    },
    /// Load the data set into each system and report throughput, CPU, disk and memory.
    Ingest {
        #[command(flatten)]
        run: Run,
    },
    /// Load the data set into each system, then time TSBS's queries against each; then
    /// measure Forestall's ingest while a client queries.
    Query {
        #[command(flatten)]
        run: Run,
        /// Timed runs of each query (after two warm-up runs).
        #[arg(long, default_value_t = 20)]
        reps: usize,
    },
    /// The data set as Prometheus remote write requests, to each system's `/api/v1/write`
    /// (forestall and victoriametrics; InfluxDB 1.6 has no such endpoint).
    RemoteWrite {
        #[command(flatten)]
        run: Run,
        /// Samples per request (Prometheus' `max_samples_per_send`).
        #[arg(long, default_value_t = 2000)]
        samples: usize,
    },
    /// Ingest with and without continuous rollups, their lag and run cost, and an on-write
    /// query's write-to-sink latency (see `tsbs/cq.rs`).
    Cq {
        #[command(flatten)]
        run: Run,
        /// Rollups on the server that has them.
        #[arg(long, default_value_t = 100)]
        queries: usize,
        /// Servers with and without, in turn.
        #[arg(long, default_value_t = 2)]
        pairs: usize,
        /// Seconds of live writes on each server.
        #[arg(long, default_value_t = 180)]
        live_secs: u64,
        /// Writes timed through the on-write query.
        #[arg(long, default_value_t = 200)]
        on_write: usize,
    },
}

/// What a run against the servers needs.
#[derive(Debug, clap::Args)]
struct Run {
    #[command(flatten)]
    data: DataSet,
    /// Scratch directory for the data set and the servers' data directories.
    #[arg(long, default_value = "/tmp/forestall-bench")]
    work: PathBuf,
    /// Comma-separated: forestall, victoriametrics, influxdb.
    #[arg(long, default_value = "forestall,victoriametrics,influxdb")]
    systems: String,
    /// The forestall binary (build it with `cargo build --release --bin forestall`).
    #[arg(long, default_value = "target/release/forestall")]
    forestall_bin: PathBuf,
    /// Lines per write request.
    #[arg(long, default_value_t = 5000)]
    batch: usize,
    /// Concurrent writing clients.
    #[arg(long, default_value_t = 2)]
    clients: usize,
}

impl Run {
    /// The data file (generated if missing) and the systems to run.
    fn prepare(&self) -> Result<(PathBuf, Vec<System>)> {
        let data = data_file(&self.work, &self.data)?;
        let systems = self
            .systems
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(|n| System::parse(n, &self.forestall_bin))
            .collect::<Result<Vec<_>>>()?;
        Ok((data, systems))
    }
}

/// The data file of a data set in `work`, generated if missing.
fn data_file(work: &Path, set: &DataSet) -> Result<PathBuf> {
    fs::create_dir_all(work)?;
    let kind = if set.floats { "-floats" } else { "" };
    let data = work.join(format!(
        "tsbs-cpu-{}hosts-{}h-seed{}{kind}.lp",
        set.hosts, set.hours, set.seed
    ));
    if !data.exists() {
        eprintln!("generating {}", data.display());
        generate(set, &data, START_SECS)?;
    }
    Ok(data)
}

fn main() -> Result<()> {
    match Cli::parse().command {
        Cmd::Generate { data, out } => generate(&data, &out, START_SECS),
        Cmd::Ingest { run } => {
            let (data, systems) = run.prepare()?;
            let DataSet { hosts, hours, .. } = run.data;
            let values = (hosts * hours * 360 * FIELDS.len()) as u64;
            let mut results = Vec::new();
            for system in &systems {
                eprintln!("== {}", system.name());
                let r = run_one(system, &run.work, &data, run.batch, run.clients)?;
                eprintln!("   {r:?}");
                results.push((system.name().to_string(), r));
            }
            report(&results, values, hosts, hours, run.batch, run.clients);
            Ok(())
        }
        Cmd::Cq {
            run,
            queries,
            pairs,
            live_secs,
            on_write,
        } => cq::main(&cq::Options {
            work: &run.work,
            forestall_bin: &run.forestall_bin,
            hosts: run.data.hosts,
            hours: run.data.hours,
            queries,
            pairs,
            live_secs,
            on_write,
            batch: run.batch,
            clients: run.clients,
        }),
        Cmd::RemoteWrite { run, samples } => {
            let (data, systems) = run.prepare()?;
            if systems.iter().any(|s| matches!(s, System::InfluxDb)) {
                bail!(
                    "InfluxDB 1.6 takes no remote write at /api/v1/write: leave it out of --systems"
                );
            }
            remote_write::main(
                &systems,
                &remote_write::Options {
                    work: &run.work,
                    data: &data,
                    samples,
                    clients: run.clients,
                },
            )
        }
        Cmd::Query { run, reps } => {
            let (data, systems) = run.prepare()?;
            query::main(
                &systems,
                &query::Options {
                    work: &run.work,
                    data: &data,
                    hosts: run.data.hosts,
                    hours: run.data.hours,
                    reps,
                    batch: run.batch,
                    clients: run.clients,
                    seed: run.data.seed,
                },
            )
        }
    }
}

/// Standard normal sample (Box–Muller).
fn normal(rng: &mut StdRng) -> f64 {
    let u1: f64 = rng.random::<f64>().max(f64::MIN_POSITIVE);
    let u2: f64 = rng.random();
    (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
}

/// Writes the data set, its first row at `start_secs` (Unix seconds), to `out`.
fn generate(set: &DataSet, out: &Path, start_secs: i64) -> Result<()> {
    let DataSet {
        hosts,
        hours,
        seed,
        floats,
    } = *set;
    let mut rng = StdRng::seed_from_u64(seed);
    let tags: Vec<String> = (0..hosts)
        .map(|h| {
            let region = REGIONS[rng.random_range(0..REGIONS.len())];
            let dc = ["a", "b", "c"][rng.random_range(0..3)];
            format!(
                "cpu,hostname=host_{h},region={region},datacenter={region}{dc},rack={},os={},arch={},team={},service={},service_version={},service_environment={}",
                rng.random_range(0..100),
                ["Ubuntu16.10", "Ubuntu16.04LTS", "Ubuntu15.10"][rng.random_range(0..3)],
                ["x64", "x86"][rng.random_range(0..2)],
                ["SF", "NYC", "LON", "CHI"][rng.random_range(0..4)],
                rng.random_range(0..20),
                rng.random_range(0..2),
                ["production", "staging", "test"][rng.random_range(0..3)],
            )
        })
        .collect();
    let mut state: Vec<[f64; 10]> = (0..hosts)
        .map(|_| std::array::from_fn(|_| rng.random_range(0.0..100.0)))
        .collect();
    let tmp = out.with_extension("partial");
    let mut w = BufWriter::with_capacity(1 << 20, File::create(&tmp)?);
    let mut line = String::with_capacity(512);
    for step in 0..hours * 360 {
        let ts = (start_secs + step as i64 * 10) * 1_000_000_000;
        for (h, tagset) in tags.iter().enumerate() {
            line.clear();
            line.push_str(tagset);
            for (f, name) in FIELDS.iter().enumerate() {
                let v = &mut state[h][f];
                *v = (*v + normal(&mut rng)).clamp(0.0, 100.0);
                line.push(if f == 0 { ' ' } else { ',' });
                line.push_str(name);
                line.push('=');
                line.push_str(&(*v as i64).to_string());
                if !floats {
                    line.push('i');
                }
            }
            line.push(' ');
            line.push_str(&ts.to_string());
            line.push('\n');
            w.write_all(line.as_bytes())?;
        }
    }
    w.flush()?;
    drop(w);
    fs::rename(&tmp, out)?;
    Ok(())
}

#[derive(Debug, Clone, Copy)]
enum Stage {
    Flush,
    Compact,
}

enum System {
    Forestall(PathBuf),
    VictoriaMetrics,
    InfluxDb,
}

impl System {
    fn parse(name: &str, forestall_bin: &Path) -> Result<Self> {
        Ok(match name {
            "forestall" => System::Forestall(forestall_bin.to_path_buf()),
            "victoriametrics" => System::VictoriaMetrics,
            "influxdb" => System::InfluxDb,
            other => bail!("unknown system {other:?}"),
        })
    }

    fn port(&self) -> u16 {
        match self {
            System::Forestall(_) => 18181,
            System::VictoriaMetrics => 18428,
            System::InfluxDb => 18086,
        }
    }

    fn start(&self, dir: &Path) -> Result<Child> {
        let port = self.port();
        let mut cmd = match self {
            System::Forestall(bin) => {
                let mut c = Command::new(bin);
                c.args([
                    "serve",
                    "--http-addr",
                    &format!("127.0.0.1:{port}"),
                    "--data-dir",
                ])
                .arg(dir);
                c.env("RUST_LOG", "warn");
                // The host collector's `cpu` would collide with the data set's (Telegraf's
                // float fields against TSBS's integers), and it is not what is measured.
                c.env("FORESTALL__COLLECTOR__ENABLED", "false");
                c
            }
            System::VictoriaMetrics => {
                let mut c = Command::new("victoria-metrics");
                c.arg(format!("-storageDataPath={}", dir.display()))
                    .arg(format!("-httpListenAddr=127.0.0.1:{port}"))
                    .arg("-retentionPeriod=100y")
                    .arg("-loggerLevel=ERROR");
                if std::env::var_os("TSBS_VM_NO_CACHE").is_some() {
                    // Measure query work, not VictoriaMetrics' rollup result cache (the
                    // benchmark repeats windows; Forestall caches no results).
                    c.arg("-search.disableCache");
                }
                c
            }
            System::InfluxDb => {
                let conf = dir.join("influxdb.conf");
                fs::write(
                    &conf,
                    format!(
                        "reporting-disabled = true\nbind-address = \"127.0.0.1:{}\"\n[meta]\n  dir = \"{d}/meta\"\n[data]\n  dir = \"{d}/data\"\n  wal-dir = \"{d}/wal\"\n  query-log-enabled = false\n  cache-snapshot-write-cold-duration = \"5s\"\n  compact-full-write-cold-duration = \"10s\"\n[http]\n  bind-address = \"127.0.0.1:{port}\"\n  log-enabled = false\n[monitor]\n  store-enabled = false\n[continuous_queries]\n  enabled = false\n",
                        port + 2,
                        d = dir.display()
                    ),
                )?;
                let mut c = Command::new("influxd");
                c.arg("-config").arg(&conf);
                c
            }
        };
        // Servers' logs go next to their data directory, not into the report.
        let log = File::create(dir.with_extension("log"))?;
        cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(log);
        cmd.spawn()
            .with_context(|| format!("start {}", self.name()))
    }

    fn name(&self) -> &'static str {
        match self {
            System::Forestall(_) => "forestall",
            System::VictoriaMetrics => "victoriametrics",
            System::InfluxDb => "influxdb",
        }
    }

    /// The request that makes the system flush or fully compact now. InfluxDB has none; it
    /// does both on the short timers its config above sets.
    fn maintenance(&self, stage: Stage) -> Option<(&'static str, &'static str)> {
        match (self, stage) {
            (System::Forestall(_), Stage::Flush) => Some(("POST", "/api/v1/admin/flush")),
            (System::Forestall(_), Stage::Compact) => Some(("POST", "/api/v1/admin/compact")),
            (System::VictoriaMetrics, Stage::Flush) => Some(("GET", "/internal/force_flush")),
            (System::VictoriaMetrics, Stage::Compact) => Some(("GET", "/internal/force_merge")),
            (System::InfluxDb, _) => None,
        }
    }

    fn ready_path(&self) -> &'static str {
        match self {
            System::Forestall(_) | System::VictoriaMetrics => "/health",
            System::InfluxDb => "/ping",
        }
    }
}

#[derive(Debug)]
struct RunResult {
    load_secs: f64,
    cpu_secs_load: f64,
    cpu_secs_total: f64,
    disk_flushed: u64,
    disk_compacted: u64,
    peak_rss_bytes: u64,
}

/// utime + stime of a process, in seconds.
fn cpu_secs(pid: u32) -> Result<f64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the parenthesised command name; utime and stime are fields 14 and 15.
    let rest = &stat[stat.rfind(')').context("stat format")? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = f[11].parse::<f64>()? + f[12].parse::<f64>()?;
    Ok(ticks / 100.0)
}

/// Peak resident set size (VmHWM), in bytes.
fn peak_rss(pid: u32) -> Result<u64> {
    let status = fs::read_to_string(format!("/proc/{pid}/status"))?;
    let line = status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .context("VmHWM")?;
    let kb: u64 = line
        .split_whitespace()
        .nth(1)
        .context("VmHWM value")?
        .parse()?;
    Ok(kb * 1024)
}

fn dir_size(path: &Path) -> u64 {
    let mut total = 0;
    if let Ok(entries) = fs::read_dir(path) {
        for e in entries.flatten() {
            match e.metadata() {
                Ok(m) if m.is_dir() => total += dir_size(&e.path()),
                Ok(m) => total += m.len(),
                Err(_) => {}
            }
        }
    }
    total
}

/// The size of `dir` once it has not changed for `quiet` (at most five minutes), excluding the
/// InfluxDB config file the harness wrote.
fn stable_size(dir: &Path, quiet: Duration) -> u64 {
    let measure = || {
        dir_size(dir)
            - fs::metadata(dir.join("influxdb.conf"))
                .map(|m| m.len())
                .unwrap_or(0)
    };
    let deadline = Instant::now() + Duration::from_secs(300);
    let mut last = measure();
    let mut since = Instant::now();
    while Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(500));
        let now = measure();
        if now != last {
            last = now;
            since = Instant::now();
        } else if since.elapsed() >= quiet {
            break;
        }
    }
    last
}

/// Starts `system` on a fresh data directory under `work` and waits until it answers.
fn start_ready(system: &System, work: &Path) -> Result<(Child, PathBuf, String, ureq::Agent)> {
    let dir = work.join(system.name());
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir)?;
    let mut child = system.start(&dir)?;
    let base = format!("http://127.0.0.1:{}", system.port());
    let agent = ureq::AgentBuilder::new()
        .timeout(Duration::from_secs(300))
        .build();
    let deadline = Instant::now() + Duration::from_secs(60);
    while agent
        .get(&format!("{base}{}", system.ready_path()))
        .call()
        .is_err()
    {
        if Instant::now() > deadline {
            let _ = child.kill();
            bail!("{} did not become ready", system.name());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    if let System::InfluxDb = system {
        agent
            .post(&format!("{base}/query"))
            .send_form(&[("q", "CREATE DATABASE bench")])?;
    }
    Ok((child, dir, base, agent))
}

/// Sends the whole data file to the InfluxDB v1 write endpoint (all three serve it) in
/// batches of `batch` lines from `clients` concurrent clients.
fn load(base: &str, agent: &ureq::Agent, data: &Path, batch: usize, clients: usize) -> Result<()> {
    let reader = Arc::new(Mutex::new(BufReader::with_capacity(
        4 << 20,
        File::open(data)?,
    )));
    let url = format!("{base}/write?db=bench&precision=ns");
    let workers: Vec<_> = (0..clients)
        .map(|_| {
            let (reader, url, agent) = (Arc::clone(&reader), url.clone(), agent.clone());
            std::thread::spawn(move || -> Result<()> {
                let mut body = Vec::with_capacity(batch * 400);
                loop {
                    body.clear();
                    {
                        let mut r = reader
                            .lock()
                            .map_err(|_| anyhow::anyhow!("reader poisoned"))?;
                        for _ in 0..batch {
                            if r.read_until(b'\n', &mut body)? == 0 {
                                break;
                            }
                        }
                    }
                    if body.is_empty() {
                        return Ok(());
                    }
                    let resp = agent
                        .post(&url)
                        .send_bytes(&body)
                        .context("write request")?;
                    if resp.status() != 204 {
                        bail!("write answered {}", resp.status());
                    }
                }
            })
        })
        .collect();
    for w in workers {
        w.join().map_err(|_| anyhow::anyhow!("client panicked"))??;
    }
    Ok(())
}

fn run_one(
    system: &System,
    work: &Path,
    data: &Path,
    batch: usize,
    clients: usize,
) -> Result<RunResult> {
    let (mut child, dir, base, agent) = start_ready(system, work)?;
    let pid = child.id();
    let peak = Arc::new(AtomicU64::new(0));
    let monitor = {
        let peak = Arc::clone(&peak);
        std::thread::spawn(move || {
            while let Ok(rss) = peak_rss(pid) {
                peak.fetch_max(rss, Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(200));
            }
        })
    };

    let cpu0 = cpu_secs(pid)?;
    let started = Instant::now();
    load(&base, &agent, data, batch, clients)?;
    let load_secs = started.elapsed().as_secs_f64();
    let cpu_load = cpu_secs(pid)? - cpu0;

    // After flush, then after compaction: each system is asked to put what it buffers on
    // disk, then to merge it into its final layout, and measured once its directory is quiet.
    let mut sizes = [0u64; 2];
    for (i, (stage, quiet)) in [(Stage::Flush, 3), (Stage::Compact, 15)]
        .into_iter()
        .enumerate()
    {
        if let Some((method, path)) = system.maintenance(stage) {
            agent.request(method, &format!("{base}{path}")).call()?;
        }
        sizes[i] = stable_size(&dir, Duration::from_secs(quiet));
    }
    let [disk_flushed, disk_compacted] = sizes;
    let mut cpu_total = cpu_secs(pid)? - cpu0;
    stop(&mut child, system.name(), || {
        if let Ok(c) = cpu_secs(pid) {
            cpu_total = c - cpu0;
        }
    })?;
    let _ = monitor.join();
    Ok(RunResult {
        load_secs,
        cpu_secs_load: cpu_load,
        cpu_secs_total: cpu_total,
        disk_flushed,
        disk_compacted,
        peak_rss_bytes: peak.load(Ordering::Relaxed),
    })
}

/// SIGTERM, then waits (at most five minutes) for the server to exit, calling `tick` while
/// it does.
fn stop(child: &mut Child, name: &str, mut tick: impl FnMut()) -> Result<()> {
    Command::new("kill")
        .arg("-TERM")
        .arg(child.id().to_string())
        .status()?;
    let exit_deadline = Instant::now() + Duration::from_secs(300);
    loop {
        tick();
        if child.try_wait()?.is_some() {
            return Ok(());
        }
        if Instant::now() > exit_deadline {
            let _ = child.kill();
            bail!("{name} did not stop");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn report(
    results: &[(String, RunResult)],
    values: u64,
    hosts: usize,
    hours: usize,
    batch: usize,
    clients: usize,
) {
    let v = values as f64;
    println!(
        "\nTSBS cpu-only: {hosts} hosts x {hours} h = {values} values; batches of {batch} lines from {clients} clients\n"
    );
    println!(
        "| system | values/s | server CPU µs/value (load) | server CPU µs/value (incl. flush, compaction) | bytes/value after flush | bytes/value compacted | peak RSS MiB |"
    );
    println!("|---|---|---|---|---|---|---|");
    for (name, r) in results {
        println!(
            "| {name} | {:.0} | {:.3} | {:.3} | {:.3} | {:.3} | {:.0} |",
            v / r.load_secs,
            r.cpu_secs_load * 1e6 / v,
            r.cpu_secs_total * 1e6 / v,
            r.disk_flushed as f64 / v,
            r.disk_compacted as f64 / v,
            r.peak_rss_bytes as f64 / (1 << 20) as f64
        );
    }
    if let Some((_, f)) = results.iter().find(|(n, _)| n == "forestall") {
        println!(
            "\nForestall relative to each peer (throughput: higher is better; the rest: lower is better):\n"
        );
        println!(
            "| peer | throughput | CPU/value (load) | CPU/value (all) | bytes/value after flush | bytes/value compacted | peak RSS |"
        );
        println!("|---|---|---|---|---|---|---|");
        for (name, r) in results.iter().filter(|(n, _)| n != "forestall") {
            println!(
                "| {name} | {:.2}x | {:.2}x | {:.2}x | {:.2}x | {:.2}x | {:.2}x |",
                r.load_secs / f.load_secs,
                f.cpu_secs_load / r.cpu_secs_load,
                f.cpu_secs_total / r.cpu_secs_total,
                f.disk_flushed as f64 / r.disk_flushed as f64,
                f.disk_compacted as f64 / r.disk_compacted as f64,
                f.peak_rss_bytes as f64 / r.peak_rss_bytes as f64
            );
        }
    }
}
