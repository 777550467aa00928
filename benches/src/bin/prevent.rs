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
//! throughput are written there as the run goes. Built so far: `static` (the mean demand plus
//! 30 % headroom, as an operator would size it) and `reactive` (the HPA's rule with its
//! defaults, [`Hpa`], starting from the static quota). The Forestall policy, the latency
//! written to Forestall as it happens, and the plots are to come.

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
    Run {
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
        /// CPU time one request costs, in milliseconds (calibrated at start).
        #[arg(long, default_value_t = 5.0)]
        request_ms: f64,
        /// The latency objective, in milliseconds.
        #[arg(long, default_value_t = 200)]
        slo_ms: u64,
        #[arg(long, default_value = "/sys/fs/cgroup")]
        cgroup_root: PathBuf,
        /// A Forestall to write each second's latency figures to as the run goes
        /// (`prevent,policy=…` p50, p95, p99, rps, failed, over_slo), e.g.
        /// http://127.0.0.1:8181.
        #[arg(long)]
        forestall: Option<String>,
    },
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Cmd::Service {
            workers,
            rounds,
            working_set_mib,
        } => service(workers, rounds, working_set_mib << 20),
        Cmd::Run {
            policy,
            out,
            seed,
            day_secs,
            days,
            request_ms,
            slo_ms,
            cgroup_root,
            forestall,
        } => {
            let workload = Workload {
                seed,
                day: Duration::from_secs(day_secs),
                days,
                ..Workload::default()
            };
            workload.validate().map_err(anyhow::Error::msg)?;
            run(
                &policy,
                &out,
                &workload,
                request_ms,
                Duration::from_millis(slo_ms),
                cgroup_root,
                forestall,
            )
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

fn run(
    policy: &str,
    out: &std::path::Path,
    workload: &Workload,
    request_ms: f64,
    slo: Duration,
    cgroup_root: PathBuf,
    forestall: Option<String>,
) -> anyhow::Result<()> {
    let schedule = workload.schedule();
    let length = workload.length();
    let mean_rps = schedule.arrivals.len() as f64 / length.as_secs_f64();
    // Static sizes at the mean demand plus 30 %, and the reactive policy starts there.
    let cores = mean_rps * request_ms / 1000.0 * 1.3;
    let pool = std::thread::available_parallelism().map_or(2, |n| n.get()) as f64;
    let reactive = match policy {
        "static" => None,
        "reactive" => Some(Hpa::new(cores, 0.1, pool)),
        other => bail!("policy {other:?} is not built yet (static, reactive)"),
    };
    let rounds = calibrate(request_ms);
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
    cgroups.apply(&target, &quota(cores))?;
    eprintln!(
        "{policy}: {} requests over {length:?} ({mean_rps:.1}/s on average), {rounds} rounds each \
         (~{request_ms} ms of CPU), quota {cores:.2} cores",
        schedule.arrivals.len()
    );
    let arrivals: Vec<Duration> = schedule.arrivals.iter().map(|(t, _)| *t).collect();
    // The allocation over time: (from, cores).
    let mut allocation = vec![(Duration::ZERO, cores)];
    let done = Arc::new(AtomicBool::new(false));
    let controller = reactive.map(|mut hpa| {
        let (cgroups, target, done) = (
            CgroupV1::new(&cgroup_root),
            target.clone(),
            Arc::clone(&done),
        );
        std::thread::spawn(move || -> anyhow::Result<Vec<(Duration, f64)>> {
            let started = Instant::now();
            let mut changes = Vec::new();
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
                    changes.push((started.elapsed(), after));
                }
            }
            Ok(changes)
        })
    });
    let (live, reporter) = match forestall {
        Some(url) => {
            let (tx, rx) = std::sync::mpsc::channel();
            let policy = policy.to_owned();
            (
                Some(tx),
                Some(std::thread::spawn(move || report(&url, &policy, &rx, slo))),
            )
        }
        None => (None, None),
    };
    let outcomes = prevent::drive(addr, &arrivals, 64, live);
    if let Some(r) = reporter {
        r.join()
            .map_err(|_| anyhow::anyhow!("the reporter panicked"))??;
    }
    done.store(true, Ordering::Relaxed);
    if let Some(c) = controller {
        let changes = c
            .join()
            .map_err(|_| anyhow::anyhow!("the controller panicked"))??;
        allocation.extend(changes);
    }
    drop(child.stdin.take());
    let _ = child.wait();
    let _ = cgroups.remove(&target);

    std::fs::create_dir_all(out)?;
    let mut csv = String::from("scheduled_s,latency_s\n");
    for (at, latency) in &outcomes {
        let l = latency.map_or("".into(), |l| format!("{:.6}", l.as_secs_f64()));
        csv.push_str(&format!("{:.6},{l}\n", at.as_secs_f64()));
    }
    std::fs::write(out.join(format!("{policy}.csv")), csv)?;
    let mut csv = String::from("from_s,cores\n");
    for (from, c) in &allocation {
        csv.push_str(&format!("{:.3},{c:.4}\n", from.as_secs_f64()));
    }
    std::fs::write(out.join(format!("{policy}-allocation.csv")), csv)?;
    let f = prevent::judge(
        &outcomes,
        &allocation,
        length,
        &schedule.onsets.surges,
        workload.surge_width,
        slo,
        workload.day / 10,
    );
    println!(
        "{policy}: {} s with p99 over {slo:?}, {} of {} requests over it ({} failed), {:.0} CPU-seconds allocated, {} quota changes, {:.0} % of surges prepared",
        f.seconds_over_slo,
        f.requests_over_slo,
        outcomes.len(),
        f.failed,
        f.cpu_seconds,
        allocation.len() - 1,
        100.0 * f.prepared
    );
    Ok(())
}

/// Writes one line of figures a second, over the requests that completed in it, to the
/// Forestall at `url`, until the driver hangs up.
fn report(
    url: &str,
    policy: &str,
    outcomes: &std::sync::mpsc::Receiver<prevent::Outcome>,
    slo: Duration,
) -> anyhow::Result<()> {
    let write = format!("{}/api/v2/write", url.trim_end_matches('/'));
    let now_ns = || {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as i64)
    };
    let mut second = now_ns() / 1_000_000_000;
    let mut completed = Vec::new();
    loop {
        let next = (second + 1) * 1_000_000_000;
        let wait = Duration::from_nanos((next - now_ns()).max(0) as u64);
        let hung_up = match outcomes.recv_timeout(wait) {
            Ok(o) => {
                completed.push(o);
                false
            }
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => false,
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => true,
        };
        if now_ns() >= next || hung_up {
            if let Some(line) =
                prevent::second_line(policy, &completed, slo, second * 1_000_000_000)
            {
                ureq::post(&write)
                    .send_string(&line)
                    .with_context(|| format!("write to {write}"))?;
            }
            completed.clear();
            second = now_ns() / 1_000_000_000;
        }
        if hung_up {
            return Ok(());
        }
    }
}
