//! `prevent`: the prevention benchmark (`forestall_benches::prevent`). As root, with cgroup
//! v1 controllers under `/sys/fs/cgroup`:
//!
//! ```sh
//! prevent run --policy static --out /tmp/prevent
//! ```
//!
//! starts the service in a cgroup of its own, sizes its CPU quota by the policy, sends it the
//! seeded open-loop workload and prints what the run is judged by; each request's scheduled
//! time and latency go to `OUT/<policy>.csv`, the quota over time to
//! `OUT/<policy>-allocation.csv`; with `--forestall URL`, each second's p50, p95, p99 and
//! throughput, and every 100 ms the requests in flight, are written there as the run goes. The policies: `static` (the mean demand
//! plus 30 % headroom, as an operator would size it), `reactive` (the HPA's rule with its
//! defaults, [`Hpa`], starting from the static quota) and `forestall` (a `forestall serve`
//! actuating the service's cgroup, fed each second's figures and an allocation query over
//! them). Each run also writes `<policy>.json`, `.txt` and `.svg`; `prevent judge` judges a
//! run's files again and `prevent replay` prices allocation settings on a run's usage.

use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use forestall_actuators::cgroup_v1::CgroupV1;
use forestall_actuators::{Actuator, Limits, Meter, Target};
use forestall_benches::prevent::{self, Hpa, Workload};
use forestall_control::config::AllocationConfig;

#[derive(Debug, Parser)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// The service alone: prints `listening on ADDR`, serves until its stdin closes.
    Service {
        #[arg(long, default_value_t = 2)]
        workers: usize,
        /// Hash rounds per request.
        #[arg(long)]
        rounds: u32,
        #[arg(long, default_value_t = 64)]
        working_set_mib: usize,
    },
    /// One policy over the workload.
    Run(RunArgs),
    /// Judges a run again from the files it wrote in `--out` (same arguments as its run).
    Judge(RunArgs),
    /// Replays a run's metered usage (`--usage <policy>-usage.csv`) through the Forestall
    /// policy's allocation loop offline, with the run's allocation settings, and prints the
    /// CPU-seconds it would have allocated and each recurring surge's lead (as a run is
    /// judged: with the run's `--seed`, a request costing what the usage metered).
    Replay {
        #[arg(long)]
        usage: PathBuf,
        #[arg(long, default_value_t = 600)]
        day_secs: u64,
        #[arg(long, default_value_t = 5000)]
        interval_ms: u64,
        #[command(flatten)]
        allocation: Allocation,
        /// The quota the service starts at, in cores.
        #[arg(long, default_value_t = 0.29)]
        start_cores: f64,
        #[arg(long, default_value_t = 2.0)]
        pool_cores: f64,
        /// The run's seed, to judge the replayed allocation's lead before each recurring
        /// surge; and a request's cost, should the usage meter none.
        #[arg(long, default_value_t = 1)]
        seed: u64,
        #[arg(long, default_value_t = 5.0)]
        request_ms: f64,
    },
}

#[derive(Debug, clap::Args)]
struct RunArgs {
    /// static, reactive or forestall.
    #[arg(long, default_value = "static")]
    policy: String,
    #[arg(long)]
    out: PathBuf,
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Seconds in one compressed day.
    #[arg(long, default_value_t = 600)]
    day_secs: u64,
    #[arg(long, default_value_t = 6)]
    days: u32,
    /// CPU time one request should cost, in milliseconds: what the hashing is calibrated to
    /// at the start. Surges are judged at the cost the run metered (the machine's speed
    /// drifts).
    #[arg(long, default_value_t = 5.0)]
    request_ms: f64,
    /// The latency objective, in milliseconds.
    #[arg(long, default_value_t = 200)]
    slo_ms: u64,
    #[arg(long, default_value = "/sys/fs/cgroup")]
    cgroup_root: PathBuf,
    /// A Forestall to write each second's latency figures to as the run goes
    /// (`prevent,policy=…` p50, p95, p99, rps, arrived, failed, over_slo), e.g.
    /// http://127.0.0.1:8181. The forestall policy writes them to its own.
    #[arg(long)]
    forestall: Option<String>,
    /// How often the requests in flight (`prevent_queue,policy=…` inflight, oldest,
    /// arrived) are written beside the per-second lines, in milliseconds; 0: not at all.
    #[arg(long, default_value_t = 100)]
    queue_ms: u64,
    /// The forestall policy's server binary [default: `forestall` beside this one].
    #[arg(long)]
    forestall_bin: Option<PathBuf>,
    /// The forestall policy's allocation interval, in milliseconds: its rounds (and
    /// forecast steps). A compressed day should hold at most 300 of them (the longest
    /// seasonal period its forecasters look for).
    #[arg(long, default_value_t = 5000)]
    interval_ms: u64,
    /// The forestall policy: cap the service's CPU at this many cores, set over Forestall's
    /// preferences API once it is up (as an operator would).
    #[arg(long)]
    cap_cores: Option<f64>,
    #[command(flatten)]
    allocation: Allocation,
}

/// The Forestall policy's allocation settings, as `run` writes them into its server's
/// config and `replay` replays them.
#[derive(Debug, Clone, Copy, clap::Args)]
struct Allocation {
    /// The forecast horizon, in hours of a real day (scaled to the compressed one).
    #[arg(long, default_value_t = 1.0)]
    horizon_hours: f64,
    /// Release after this many hours of a real day of requests below the allocation
    /// (scaled).
    #[arg(long, default_value_t = AllocationConfig::default().release_after.as_secs_f64() / 3600.0)]
    release_hours: f64,
    /// θ: keep usage under this share of the allocation.
    #[arg(long, default_value_t = 0.8)]
    threshold: f64,
    /// `violation_share` (0: the learned headroom only grows).
    #[arg(long, default_value_t = 0.0)]
    violation_share: f64,
    /// `headroom_price`, judged over two days (scaled); 0: off.
    #[arg(long, default_value_t = AllocationConfig::default().headroom_price)]
    headroom_price: f64,
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Cmd::Service {
            workers,
            rounds,
            working_set_mib,
        } => service(workers, rounds, working_set_mib << 20),
        Cmd::Run(args) => {
            let workload =
                Workload::compressed(args.seed, Duration::from_secs(args.day_secs), args.days);
            workload.validate().map_err(anyhow::Error::msg)?;
            run(&args, &workload)
        }
        Cmd::Judge(args) => {
            let workload =
                Workload::compressed(args.seed, Duration::from_secs(args.day_secs), args.days);
            workload.validate().map_err(anyhow::Error::msg)?;
            rejudge(&args, &workload)
        }
        Cmd::Replay {
            usage,
            day_secs,
            interval_ms,
            allocation,
            start_cores,
            pool_cores,
            seed,
            request_ms,
        } => {
            let text = std::fs::read_to_string(&usage)
                .with_context(|| format!("read {}", usage.display()))?;
            // `at_s,cores`, one row a second.
            let metered: Vec<(Duration, f64)> = text
                .lines()
                .skip(1)
                .map(|l| {
                    l.split_once(',')
                        .and_then(|(at, c)| {
                            let at = Duration::try_from_secs_f64(at.trim().parse().ok()?).ok()?;
                            Some((at, c.trim().parse().ok()?))
                        })
                        .with_context(|| format!("not an `at_s,cores` row: {l:?}"))
                })
                .collect::<anyhow::Result<_>>()?;
            let cores: Vec<f64> = metered.iter().map(|&(_, c)| c).collect();
            let r = prevent::replay_usage(
                &cores,
                &prevent::LoopSettings {
                    day: Duration::from_secs(day_secs),
                    interval: Duration::from_millis(interval_ms),
                    horizon_hours: allocation.horizon_hours,
                    release_hours: allocation.release_hours,
                    threshold: allocation.threshold,
                    violation_share: allocation.violation_share,
                    headroom_price: allocation.headroom_price,
                    start: start_cores,
                    pool: pool_cores,
                },
            )?;
            let day = Duration::from_secs(day_secs);
            let length = Duration::from_secs(cores.len() as u64);
            let workload =
                Workload::compressed(seed, day, length.div_duration_f64(day).ceil() as u32);
            let onsets = workload.onsets();
            // As a run is judged: a surge recurs from its second day on.
            let recurring: Vec<Duration> = onsets
                .surges
                .iter()
                .skip(1)
                .copied()
                .filter(|&s| s < length)
                .collect();
            // Requests cost what the run metered, as a run is judged.
            let served = workload
                .schedule()
                .arrivals
                .partition_point(|&(at, _)| at < length);
            let cost = prevent::request_cost(&metered, served).unwrap_or(request_ms / 1000.0);
            let surges = workload.surges(&onsets, &recurring, cost);
            let judged = prevent::judge(
                &[],
                &r.allocation,
                length,
                &surges,
                workload.surge_width,
                Duration::MAX,
            );
            println!(
                "{:.0} CPU-seconds allocated over {} rounds; usage over 95 % of the allocation in {} rounds; learned headroom {:.2}; {:.0} % of recurring surges prepared (leads {})",
                r.cpu_seconds,
                r.rounds,
                r.pressed_rounds,
                r.headroom,
                100.0 * judged.prepared,
                prevent::leads(&judged.leads),
            );
            Ok(())
        }
    }
}

fn service(workers: usize, rounds: u32, working_set: usize) -> anyhow::Result<()> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    println!("listening on {}", listener.local_addr()?);
    std::io::stdout().flush()?;
    let stop = Arc::new(AtomicBool::new(false));
    {
        let stop = Arc::clone(&stop);
        std::thread::spawn(move || {
            let _ = std::io::copy(&mut std::io::stdin(), &mut std::io::sink());
            stop.store(true, Ordering::Relaxed);
        });
    }
    prevent::serve(listener, workers, rounds, working_set, stop)?;
    Ok(())
}

/// Hash rounds that cost about `ms` of CPU on this machine.
fn calibrate(ms: f64) -> u32 {
    let mut ws = vec![0u64; 8 << 20];
    let n = 2_000_000;
    let started = Instant::now();
    std::hint::black_box(prevent::work(&mut ws, n, 1));
    let per_round = started.elapsed().as_secs_f64() / f64::from(n);
    ((ms / 1000.0) / per_round)
        .round()
        .clamp(1.0, f64::from(u32::MAX)) as u32
}

/// The policy a run is under.
enum Policy {
    Static,
    Reactive(Hpa),
    Forestall(Box<ForestallRun>),
}

/// A Forestall serving the run: its process, its URL, and where it keeps its data.
struct ForestallRun {
    child: std::process::Child,
    url: String,
}

impl Drop for ForestallRun {
    fn drop(&mut self) {
        // SIGTERM, so it stops as a service does; killed if it lingers.
        let _ = Command::new("kill")
            .arg(self.child.id().to_string())
            .status();
        for _ in 0..100 {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What the Forestall policy needs to know to start its server.
struct ForestallSetup<'a> {
    bin: &'a std::path::Path,
    dir: PathBuf,
    cgroup_root: &'a std::path::Path,
    cgroup: String,
    pool: f64,
    day: Duration,
    interval: Duration,
    slo: Duration,
    queue: Duration,
    allocation: Allocation,
}

/// The allocation query the Forestall policy runs on every write of the latency figures:
/// when the last seconds' p99 passes half the SLO (or requests failed), or the oldest
/// request in flight has waited a quarter of it, the service asks for half as much CPU
/// again as its requests cost: those arriving (the more of the last second's arrivals and
/// the rate of the last few in-flight lines) plus those in flight, to be served within
/// half a second, times the CPU a request took over the last minute (metered usage over
/// throughput). Read from the line that carried the signal, not from the next metering;
/// from arrivals, not completions, which a throttled service caps at what its quota allows
/// (a demand sized from them asked for 1.5 × the quota in place, and a spike took a second
/// raise); and from the queue as well as from latency, which is known only once a request
/// is answered: a spike the standing quota cannot absorb shows in the queue a few hundred
/// milliseconds before it shows in a second's p99, and by then that second was lost. Its
/// usage forecast (the loop's own, from the metered cgroup) asks for what the coming
/// minutes need.
pub const LATENCY_QUERY: &str = "prevent_latency";

fn latency_query(slo: Duration, queue: Duration) -> String {
    // The in-flight lines of the last three ticks (at least 300 ms): the rate over them,
    // the queue at its longest.
    let window = (queue * 3).max(Duration::from_millis(300));
    let in_flight = if queue.is_zero() {
        "(SELECT 0.0 AS oldest, 0.0 AS inflight, 0.0 AS rate)".to_owned()
    } else {
        format!(
            "(SELECT coalesce(max(oldest), 0.0) AS oldest, \
                     coalesce(CAST(max(inflight) AS DOUBLE), 0.0) AS inflight, \
                     coalesce(CAST(sum(arrived) AS DOUBLE), 0.0) / {window_s} AS rate \
              FROM prevent_queue WHERE time > now() - INTERVAL '{window_ms} milliseconds')",
            window_s = window.as_secs_f64(),
            window_ms = window.as_millis(),
        )
    };
    format!(
        "SELECT 'service' AS component, 'cpu' AS resource, \
         CASE WHEN l.p99 > {threshold} OR l.failed > 0 OR q.oldest > {queued} \
              THEN (greatest(l.arrived, q.rate) + q.inflight * 2.0) * u.cores / r.rps * 1.5 END AS demand \
         FROM (SELECT coalesce(max(p99), 0.0) AS p99, coalesce(sum(failed), 0) AS failed, \
                      coalesce(CAST(max(arrived) AS DOUBLE), 0.0) AS arrived \
               FROM prevent WHERE time > now() - INTERVAL '2 seconds') AS l, \
              {in_flight} AS q, \
              (SELECT avg(cpu) AS cores FROM forestall_usage \
               WHERE component = 'service' AND time > now() - INTERVAL '1 minute') AS u, \
              (SELECT CAST(avg(rps) AS DOUBLE) AS rps FROM prevent \
               WHERE time > now() - INTERVAL '1 minute') AS r",
        threshold = slo.as_secs_f64() / 2.0,
        queued = slo.as_secs_f64() / 4.0,
    )
}

/// Starts a Forestall that allocates the service's CPU: the live loop actuating on the
/// service's cgroup, every `interval`, its timings (horizon, release, judging) those of a
/// real day scaled to the compressed one, and the latency query above. Waits until it
/// answers.
fn start_forestall(setup: &ForestallSetup<'_>) -> anyhow::Result<ForestallRun> {
    let _ = std::fs::remove_dir_all(&setup.dir);
    std::fs::create_dir_all(&setup.dir)
        .with_context(|| format!("create the server's directory {}", setup.dir.display()))?;
    let free_port =
        || -> anyhow::Result<u16> { Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port()) };
    let (http, pg) = (free_port()?, free_port()?);
    // A real day's settings (by default horizon 1 h, release after 4 h; judge after 8 h,
    // age after 6 h), in the compressed day.
    let scaled = |hours: f64| {
        let d = setup.day.mul_f64(hours / 24.0).max(setup.interval);
        format!("{}ms", d.as_millis())
    };
    let config = format!(
        r#"[log]
filter = "info"

# The host's metrics are not what this benchmark measures, and every run before the
# collector existed ran without it.
[collector]
enabled = false

[allocation]
enabled = true
actuate = true
interval = "{interval}ms"
horizon = "{horizon}"
release_after = "{release}"
judge_after = "{judge}"
age_after = "{age}"
threshold = {threshold}
violation_share = {violation_share}
headroom_price = {headroom_price}
headroom_window = "{headroom_window}"
cgroup_root = "{root}"
cgroup_version = "v1"
pool = {{ cpu = {pool} }}

[[allocation.components]]
name = "service"
cgroup = "{cgroup}"
# CPU is what the benchmark is about; the service's memory is left as it is.
preferences = {{ unmanaged = ["mem"] }}

[[continuous_queries]]
name = "{name}"
on_write = true
allocate = true
query = """{query}"""
"#,
        interval = setup.interval.as_millis(),
        horizon = scaled(setup.allocation.horizon_hours),
        release = scaled(setup.allocation.release_hours),
        threshold = setup.allocation.threshold,
        violation_share = setup.allocation.violation_share,
        headroom_price = setup.allocation.headroom_price,
        headroom_window = scaled(48.0),
        judge = scaled(8.0),
        age = scaled(6.0),
        root = setup.cgroup_root.display(),
        pool = setup.pool,
        cgroup = setup.cgroup,
        name = LATENCY_QUERY,
        query = latency_query(setup.slo, setup.queue),
    );
    let file = setup.dir.join("forestall.toml");
    std::fs::write(&file, config)?;
    let log = std::fs::File::create(setup.dir.join("forestall.log"))?;
    let child = Command::new(setup.bin)
        .arg("serve")
        .arg("--config")
        .arg(&file)
        .arg("--data-dir")
        .arg(setup.dir.join("data"))
        .args(["--http-addr", &format!("127.0.0.1:{http}")])
        .args(["--pg-addr", &format!("127.0.0.1:{pg}")])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .with_context(|| format!("start {}", setup.bin.display()))?;
    let run = ForestallRun {
        child,
        url: format!("http://127.0.0.1:{http}"),
    };
    let health = format!("{}/health", run.url);
    for _ in 0..300 {
        if ureq::get(&health).call().is_ok() {
            return Ok(run);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    bail!(
        "Forestall did not answer within 30 s; see {}",
        setup.dir.join("forestall.log").display()
    )
}

/// What the kernel held over the run, read every 100 ms: the quota's changes (`(from,
/// cores)`) and the CPU used in each second (cores).
#[derive(Debug, Default)]
struct Held {
    quota: Vec<(Duration, f64)>,
    usage: Vec<(Duration, f64)>,
}

fn watch(
    cgroups: CgroupV1,
    target: Target,
    started: Instant,
    done: Arc<AtomicBool>,
) -> anyhow::Result<Held> {
    let mut held = Held::default();
    let mut last_usage = (started, cgroups.usage(&target)?.cpu_seconds.unwrap_or(0.0));
    while !done.load(Ordering::Relaxed) {
        let cores = cgroups
            .read_back(&target)?
            .cpu_millicores
            .map_or(f64::INFINITY, |m| m as f64 / 1000.0);
        if held
            .quota
            .last()
            .is_none_or(|(_, c)| (c - cores).abs() > 1e-9)
        {
            held.quota.push((started.elapsed(), cores));
        }
        let now = Instant::now();
        if now.duration_since(last_usage.0) >= Duration::from_secs(1) {
            let used = cgroups.usage(&target)?.cpu_seconds.unwrap_or(0.0);
            let rate = (used - last_usage.1) / now.duration_since(last_usage.0).as_secs_f64();
            held.usage.push((started.elapsed(), rate));
            last_usage = (now, used);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(held)
}

/// The policy `args` names, started: a Forestall allocating the service's cgroup for the
/// forestall policy.
fn start_policy(
    args: &RunArgs,
    workload: &Workload,
    target: &Target,
    cores: f64,
    pool: f64,
) -> anyhow::Result<Policy> {
    let slo = Duration::from_millis(args.slo_ms);
    Ok(match args.policy.as_str() {
        "static" => Policy::Static,
        "reactive" => Policy::Reactive(Hpa::new(cores, 0.1, pool)),
        "forestall" => {
            let bin = match args.forestall_bin.clone() {
                Some(b) => b,
                None => std::env::current_exe()?.with_file_name("forestall"),
            };
            let run = start_forestall(&ForestallSetup {
                bin: &bin,
                dir: args.out.join("forestall"),
                cgroup_root: &args.cgroup_root,
                cgroup: target.cgroup.clone(),
                pool,
                day: workload.day,
                interval: Duration::from_millis(args.interval_ms),
                slo,
                queue: Duration::from_millis(args.queue_ms),
                allocation: args.allocation,
            })?;
            if let Some(cap) = args.cap_cores {
                let url = format!("{}/api/v1/preferences/service", run.url);
                ureq::put(&url)
                    .set("Content-Type", "application/json")
                    .send_string(&serde_json::json!({ "cap": { "cpu": cap } }).to_string())
                    .with_context(|| format!("cap the service's CPU at {url}"))?;
            }
            Policy::Forestall(Box::new(run))
        }
        other => bail!("unknown policy {other:?} (static, reactive, forestall)"),
    })
}

fn run(args: &RunArgs, workload: &Workload) -> anyhow::Result<()> {
    let (policy, out, request_ms) = (args.policy.as_str(), args.out.as_path(), args.request_ms);
    let slo = Duration::from_millis(args.slo_ms);
    let queue = Duration::from_millis(args.queue_ms);
    let cgroup_root = args.cgroup_root.clone();
    let schedule = workload.schedule();
    let length = workload.length();
    let mean_rps = schedule.arrivals.len() as f64 / length.as_secs_f64();
    // Static sizes at the mean demand plus 30 %, and the others start there.
    let cores = mean_rps * request_ms / 1000.0 * 1.3;
    let pool = std::thread::available_parallelism().map_or(2, |n| n.get()) as f64;
    // Every policy run into the same `--out` does the same work per request: the first
    // calibrates the hashing to `request_ms` and leaves it in `OUT/rounds`, the others reuse
    // it. (Calibrating each run made one policy's requests cost 16 % more CPU than another's
    // in one session: the machine's speed at a run's start is not its speed during it.)
    std::fs::create_dir_all(out)?;
    let calibrated = out.join("rounds");
    let rounds = match std::fs::read_to_string(&calibrated) {
        Ok(text) => text
            .trim()
            .parse()
            .with_context(|| format!("{} holds no round count", calibrated.display()))?,
        Err(_) => {
            let rounds = calibrate(request_ms);
            std::fs::write(&calibrated, format!("{rounds}\n"))?;
            rounds
        }
    };
    let cgroups = CgroupV1::new(&cgroup_root);
    let target = Target::new(
        "service",
        format!("forestall-prevent-{}-{policy}", std::process::id()),
    )?;
    cgroups.create(&target)?;
    let mut child = Command::new(std::env::current_exe()?)
        .args(["service", "--rounds", &rounds.to_string()])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .context("start the service")?;
    let mut line = String::new();
    BufReader::new(child.stdout.take().context("the service's stdout")?).read_line(&mut line)?;
    let addr: std::net::SocketAddr = line
        .trim()
        .strip_prefix("listening on ")
        .context("the service did not say where it listens")?
        .parse()?;
    cgroups.attach(&target, child.id())?;
    let quota = |cores: f64| Limits {
        cpu_millicores: Some((cores * 1000.0).ceil() as u64),
        ..Limits::default()
    };
    // The service holds the operator's quota before any policy starts: Forestall's loop
    // starts from what the cgroup holds.
    cgroups.apply(&target, &quota(cores))?;
    let policy_run = start_policy(args, workload, &target, cores, pool);
    let mut policy_run = match policy_run {
        Ok(p) => p,
        Err(e) => {
            drop(child.stdin.take());
            let _ = child.wait();
            let _ = cgroups.remove(&target);
            return Err(e);
        }
    };

    eprintln!(
        "{policy}: {} requests over {length:?} ({mean_rps:.1}/s on average), {rounds} rounds each \
         (~{request_ms} ms of CPU), quota {cores:.2} cores",
        schedule.arrivals.len()
    );
    let arrivals: Vec<Duration> = schedule.arrivals.iter().map(|(t, _)| *t).collect();
    let done = Arc::new(AtomicBool::new(false));
    let started = Instant::now();
    let watcher = {
        let (cgroups, target, done) = (
            CgroupV1::new(&cgroup_root),
            target.clone(),
            Arc::clone(&done),
        );
        std::thread::spawn(move || watch(cgroups, target, started, done))
    };
    let controller = match &mut policy_run {
        Policy::Reactive(hpa) => {
            let mut hpa = hpa.clone();
            let (cgroups, target, done) = (
                CgroupV1::new(&cgroup_root),
                target.clone(),
                Arc::clone(&done),
            );
            Some(std::thread::spawn(move || -> anyhow::Result<()> {
                let mut last = (
                    Instant::now(),
                    cgroups.usage(&target)?.cpu_seconds.unwrap_or(0.0),
                );
                while !done.load(Ordering::Relaxed) {
                    std::thread::sleep(hpa.sync);
                    let now = (
                        Instant::now(),
                        cgroups.usage(&target)?.cpu_seconds.unwrap_or(0.0),
                    );
                    let used = (now.1 - last.1) / now.0.duration_since(last.0).as_secs_f64();
                    last = now;
                    let before = hpa.quota();
                    let after = hpa.step(started.elapsed(), used);
                    if after != before {
                        cgroups.apply(&target, &quota(after))?;
                    }
                }
                Ok(())
            }))
        }
        _ => None,
    };
    // The latency figures go to the policy's Forestall, or to the one named.
    let url = match &policy_run {
        Policy::Forestall(f) => Some(f.url.clone()),
        _ => args.forestall.clone(),
    };
    let (live, reporter) = match url {
        Some(url) => {
            let (tx, rx) = std::sync::mpsc::channel();
            let policy = policy.to_owned();
            // The driver starts its clock just after this one: arrivals are counted against
            // the schedule a few microseconds early at most.
            let (arrivals, start) = (arrivals.clone(), Instant::now());
            (
                Some(tx),
                Some(std::thread::spawn(move || {
                    report(&url, &policy, &rx, slo, queue, &arrivals, start)
                })),
            )
        }
        None => (None, None),
    };
    let outcomes = prevent::drive(addr, &arrivals, 64, live);
    let written = match reporter {
        Some(r) => r
            .join()
            .map_err(|_| anyhow::anyhow!("the reporter panicked"))??,
        None => Vec::new(),
    };
    done.store(true, Ordering::Relaxed);
    if let Some(c) = controller {
        c.join()
            .map_err(|_| anyhow::anyhow!("the controller panicked"))??;
    }
    let held = watcher
        .join()
        .map_err(|_| anyhow::anyhow!("the watcher panicked"))??;
    // Write-to-actuation: each raise the latency query asked for, from the first line of
    // the run of slow seconds that carried its signal.
    let actuation = match &policy_run {
        Policy::Forestall(f) => write_to_actuation(&f.url, &written)?,
        _ => Vec::new(),
    };
    drop(child.stdin.take());
    let _ = child.wait();
    drop(policy_run);
    let _ = cgroups.remove(&target);

    let mut csv = String::from("scheduled_s,latency_s\n");
    for (at, latency) in &outcomes {
        let l = latency.map_or("".into(), |l| format!("{:.6}", l.as_secs_f64()));
        csv.push_str(&format!("{:.6},{l}\n", at.as_secs_f64()));
    }
    std::fs::write(out.join(format!("{policy}.csv")), csv)?;
    let mut csv = String::from("from_s,cores\n");
    for (from, c) in &held.quota {
        csv.push_str(&format!("{:.3},{c:.4}\n", from.as_secs_f64()));
    }
    std::fs::write(out.join(format!("{policy}-allocation.csv")), csv)?;
    let mut csv = String::from("at_s,cores\n");
    for (at, c) in &held.usage {
        csv.push_str(&format!("{:.3},{c:.4}\n", at.as_secs_f64()));
    }
    std::fs::write(out.join(format!("{policy}-usage.csv")), csv)?;
    conclude(args, workload, &outcomes, &held, actuation)
}

/// `prevent judge`: judges a run again from the files it wrote (the requests, the quota and
/// the usage), for the same arguments; the write-to-actuation figures are kept from its
/// report.
fn rejudge(args: &RunArgs, workload: &Workload) -> anyhow::Result<()> {
    let policy = args.policy.as_str();
    let read = |file: String| -> anyhow::Result<Vec<Vec<String>>> {
        let text = std::fs::read_to_string(args.out.join(&file)).with_context(|| file.clone())?;
        Ok(text
            .lines()
            .skip(1)
            .map(|l| l.split(',').map(str::to_owned).collect())
            .collect())
    };
    let secs = |v: &str| -> anyhow::Result<Duration> { Ok(Duration::from_secs_f64(v.parse()?)) };
    let mut outcomes = Vec::new();
    for row in read(format!("{policy}.csv"))? {
        let latency = match row.get(1).map(String::as_str) {
            Some("") | None => None,
            Some(l) => Some(secs(l)?),
        };
        outcomes.push((secs(&row[0])?, latency));
    }
    let series = |file: String| -> anyhow::Result<Vec<(Duration, f64)>> {
        read(file)?
            .iter()
            .map(|r| Ok((secs(&r[0])?, r[1].parse()?)))
            .collect()
    };
    let held = Held {
        quota: series(format!("{policy}-allocation.csv"))?,
        usage: series(format!("{policy}-usage.csv"))?,
    };
    let actuation = std::fs::read_to_string(args.out.join(format!("{policy}.json")))
        .ok()
        .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
        .and_then(|r| serde_json::from_value(r["write_to_actuation_s"].clone()).ok())
        .unwrap_or_default();
    conclude(args, workload, &outcomes, &held, actuation)
}

/// Judges a run and writes its report (`<policy>.txt`, `.json`) and plot (`.svg`).
fn conclude(
    args: &RunArgs,
    workload: &Workload,
    outcomes: &[prevent::Outcome],
    held: &Held,
    actuation: Vec<f64>,
) -> anyhow::Result<()> {
    let (policy, out) = (args.policy.as_str(), args.out.as_path());
    let slo = Duration::from_millis(args.slo_ms);
    let length = workload.length();
    let schedule = workload.schedule();
    let onsets = &schedule.onsets;
    // A surge recurs from its second day on: the first is news to every policy.
    let recurring = onsets.surges.get(1..).unwrap_or_default();
    let served = outcomes.iter().filter(|o| o.1.is_some()).count();
    let cost = prevent::request_cost(&held.usage, served).unwrap_or(args.request_ms / 1000.0);
    let surges = workload.surges(onsets, recurring, cost);
    let f = prevent::judge(
        outcomes,
        &held.quota,
        length,
        &surges,
        workload.surge_width,
        slo,
    );
    let svg = prevent::plot(
        policy,
        outcomes,
        &held.quota,
        &held.usage,
        length,
        (&onsets.surges, workload.surge_width),
        &onsets.spikes,
        slo,
    );
    std::fs::write(out.join(format!("{policy}.svg")), svg)?;
    let spike_seconds = prevent::seconds_over_slo_within(
        outcomes,
        &onsets.spikes,
        workload.spike_width + Duration::from_secs(10),
        slo,
    );
    let mut summary = format!(
        "{policy}: {} s with p99 over {slo:?} ({spike_seconds} s of them in spikes), {} of {} requests over it ({} failed), {:.0} CPU-seconds allocated, {} quota changes, {:.0} % of recurring surges prepared (leads {}; a request cost {:.2} ms of CPU, a surge's peak needs {:.2} cores)",
        f.seconds_over_slo,
        f.requests_over_slo,
        outcomes.len(),
        f.failed,
        f.cpu_seconds,
        held.quota.len().saturating_sub(1),
        100.0 * f.prepared,
        prevent::leads(&f.leads),
        cost * 1000.0,
        surges.iter().map(|s| s.need).fold(0.0, f64::max),
    );
    if !actuation.is_empty() {
        let mut v = actuation.clone();
        let [p50, _, p99] = prevent::percentiles(&mut v).unwrap_or([f64::NAN; 3]);
        summary.push_str(&format!(
            ", write-to-actuation p50 {:.0} ms p99 {:.0} ms over {} raises",
            p50 * 1000.0,
            p99 * 1000.0,
            actuation.len()
        ));
    }
    println!("{summary}");
    std::fs::write(out.join(format!("{policy}.txt")), summary + "\n")?;
    let report = serde_json::json!({
        "policy": policy,
        "seconds_over_slo": f.seconds_over_slo,
        "seconds_over_slo_in_spikes": spike_seconds,
        "requests": outcomes.len(),
        "request_cpu_ms": cost * 1000.0,
        "requests_over_slo": f.requests_over_slo,
        "failed": f.failed,
        "cpu_seconds": f.cpu_seconds,
        "quota_changes": held.quota.len().saturating_sub(1),
        "quota": held.quota.iter().map(|(t, c)| [t.as_secs_f64(), *c]).collect::<Vec<_>>(),
        "recurring_surges": recurring.iter().map(Duration::as_secs_f64).collect::<Vec<_>>(),
        "surge_needs_cores": surges.iter().map(|s| s.need).collect::<Vec<_>>(),
        "leads_s": f.leads,
        "prepared": f.prepared,
        "write_to_actuation_s": actuation,
    });
    std::fs::write(
        out.join(format!("{policy}.json")),
        serde_json::to_string_pretty(&report)?,
    )?;
    Ok(())
}

/// The write-to-actuation latencies (seconds) of the raises the latency query asked for:
/// for each, from the write of the line that carried it to the decision that applied it.
/// The query runs on every write, and only a slow line (p99 over half the SLO, as the
/// query's condition) asks for anything, so that line is the last slow one written before
/// the raise and after the previous raise. (Until 2026-12-04 it was the *first* slow line of
/// the run before the raise: a line whose demand the allocation already covered then counted
/// the second until the next line as latency, and one raise of a run would measure ~1 s.)
fn write_to_actuation(url: &str, written: &[(i64, bool)]) -> anyhow::Result<Vec<f64>> {
    let q = format!(
        "SELECT CAST(time AS BIGINT) AS t FROM forestall_allocations \
         WHERE component = 'service' AND resource = 'cpu' AND action = 'raise' AND applied \
         AND reason LIKE '%asked by query {LATENCY_QUERY}' ORDER BY time"
    );
    let body: serde_json::Value = serde_json::from_reader(
        ureq::get(&format!("{url}/api/v3/query_sql"))
            .query("q", &q)
            .query("format", "json")
            .call()
            .context("read the allocation audit")?
            .into_reader(),
    )?;
    let raises: Vec<i64> = body
        .as_array()
        .map(|rows| rows.iter().filter_map(|r| r["t"].as_i64()).collect())
        .unwrap_or_default();
    let mut out = Vec::new();
    let mut from = 0usize;
    for raise in raises {
        // The last slow line written before this raise and after the previous one.
        let mut carried = None;
        for (k, (at, slow)) in written.iter().enumerate().skip(from) {
            if *at > raise {
                break;
            }
            from = k + 1;
            if *slow {
                carried = Some(*at);
            }
        }
        if let Some(at) = carried {
            out.push((raise - at) as f64 / 1e9);
        }
    }
    Ok(out)
}

/// Writes one line of figures a second, over the requests that completed in it and those of
/// `arrivals` (the schedule, from `start`) that arrived in it, and every `queue` one line of
/// the requests in flight (`prevent::queue_line`), to the Forestall at `url`, until the
/// driver hangs up. Returns when each line was written (ns since the epoch, just before the
/// request) and whether it was slow as the latency query judges (p99 over half the SLO or
/// a failure; the oldest request in flight older than a quarter of it).
fn report(
    url: &str,
    policy: &str,
    outcomes: &std::sync::mpsc::Receiver<prevent::Outcome>,
    slo: Duration,
    queue: Duration,
    arrivals: &[Duration],
    start: Instant,
) -> anyhow::Result<Vec<(i64, bool)>> {
    let write = format!("{}/api/v2/write", url.trim_end_matches('/'));
    let now_ns = || {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as i64)
    };
    let post = |line: &str| {
        ureq::post(&write)
            .send_string(line)
            .map(|_| ())
            .with_context(|| format!("write to {write}"))
    };
    let step = queue.as_nanos().max(1) as i64;
    let mut second = now_ns() / 1_000_000_000;
    let mut tick = now_ns() / step;
    let mut completed: Vec<prevent::Outcome> = Vec::new();
    let mut in_flight = prevent::InFlight::new(arrivals);
    let (mut arrived, mut queued) = (0, 0);
    let mut written = Vec::new();
    loop {
        let next = (second + 1) * 1_000_000_000;
        let next_tick = (tick + 1) * step;
        let wait = Duration::from_nanos((next.min(next_tick) - now_ns()).max(0) as u64);
        let hung_up = match outcomes.recv_timeout(wait) {
            Ok(o) => {
                in_flight.answered(o.0);
                completed.push(o);
                false
            }
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => false,
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => true,
        };
        if !queue.is_zero() && now_ns() >= next_tick && !hung_up {
            let elapsed = start.elapsed();
            let upto = arrivals.partition_point(|&at| at <= elapsed);
            let (n, oldest) = in_flight.at(elapsed);
            let line =
                prevent::queue_line(policy, n, oldest, upto.saturating_sub(queued), now_ns());
            queued = upto.max(queued);
            written.push((now_ns(), oldest > slo / 4));
            post(&line)?;
            tick = now_ns() / step;
        }
        if now_ns() >= next || hung_up {
            let upto = arrivals.partition_point(|&at| at < start.elapsed());
            let line = prevent::second_line(
                policy,
                &completed,
                upto.saturating_sub(arrived),
                slo,
                second * 1_000_000_000,
            );
            arrived = upto.max(arrived);
            if let Some(line) = line {
                let mut ok: Vec<f64> = completed
                    .iter()
                    .filter_map(|(_, l)| l.map(|l| l.as_secs_f64()))
                    .collect();
                let failed = ok.len() < completed.len();
                let p99 = prevent::percentiles(&mut ok).map_or(0.0, |p| p[2]);
                written.push((now_ns(), failed || p99 > slo.as_secs_f64() / 2.0));
                post(&line)?;
            }
            completed.clear();
            second = now_ns() / 1_000_000_000;
        }
        if hung_up {
            return Ok(written);
        }
    }
}
