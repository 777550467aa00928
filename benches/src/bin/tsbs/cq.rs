//! `tsbs cq`: what continuous queries cost ingestion, and how far behind they run.
//!
//! ```text
//! tsbs cq --hosts 1000 --hours 2 --queries 100 --pairs 2 --live-secs 180
//! ```
//!
//! The data set is TSBS cpu-only, generated to end at the start of the run (so that the
//! rollups' buckets are recent). Each pair starts two fresh servers in turn, one without
//! continuous queries and one with `--queries` rollups of 10-second data into 1-minute buckets
//! (10 fields × avg, max, min, sum, count × grouped by `hostname` (1,000 series) or by
//! `datacenter`), all `EVERY '1m' LATENESS '10s'` with a backfill covering the data, so they
//! materialise it while it loads. On each server:
//!
//! 1. **Load**: the data file at full speed (as `tsbs ingest`): lines per second.
//! 2. **Live**: `--live-secs` of full-speed writes of all hosts with the current time: lines
//!    per second, and, with the rollups, every query's lag (now − watermark) sampled each
//!    second after the first two minutes (a new query starts one bucket plus its lateness
//!    behind).
//! 3. With the rollups: the duration of each query's last run (an incremental run of one
//!    1-minute bucket; over 1,000 series for those grouped by host).
//!
//! Then an on-write query (`ON WRITE … INTO`, 10-second buckets) on a third server: a point
//! with a new maximum is written, and the rollup is polled until it shows it, `--on-write`
//! times: the write-to-sink latency.

use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail};

use super::{FIELDS, System, generate, load, start_ready, stop};

/// What a run needs.
#[derive(Debug)]
pub struct Options<'a> {
    pub work: &'a Path,
    pub forestall_bin: &'a Path,
    pub hosts: usize,
    pub hours: usize,
    pub queries: usize,
    pub pairs: usize,
    pub live_secs: u64,
    pub on_write: usize,
    pub batch: usize,
    pub clients: usize,
}

const AGGREGATES: [&str; 5] = ["avg", "max", "min", "sum", "count"];

fn now_nanos() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as i64)
}

/// The `i`-th rollup: field, aggregate and grouping vary with `i`.
fn rollup(i: usize, hours: usize) -> (String, bool) {
    let field = FIELDS[i % FIELDS.len()];
    let agg = AGGREGATES[(i / FIELDS.len()) % AGGREGATES.len()];
    let by_host = (i / (FIELDS.len() * AGGREGATES.len())).is_multiple_of(2);
    let key = if by_host { "hostname" } else { "datacenter" };
    let sql = format!(
        "CREATE CONTINUOUS QUERY r{i} EVERY '1m' LATENESS '10s' BACKFILL '{}h' INTO rollup_{i} AS \
         SELECT date_bin(INTERVAL '1 minute', time) AS time, {key}, {agg}({field}) AS v \
         FROM cpu GROUP BY 1, {key}",
        hours + 1
    );
    (sql, by_host)
}

fn sql(agent: &ureq::Agent, base: &str, q: &str) -> Result<serde_json::Value> {
    let body = serde_json::json!({"q": q, "format": "json"}).to_string();
    let resp = agent
        .post(&format!("{base}/api/v3/query_sql"))
        .set("Content-Type", "application/json")
        .send_string(&body);
    match resp {
        Ok(r) => Ok(serde_json::from_str(&r.into_string()?)?),
        Err(ureq::Error::Status(code, r)) => {
            bail!("{q}: {code} {}", r.into_string().unwrap_or_default())
        }
        Err(e) => Err(e.into()),
    }
}

fn statuses(agent: &ureq::Agent, base: &str) -> Result<Vec<serde_json::Value>> {
    let v: serde_json::Value = serde_json::from_str(
        &agent
            .get(&format!("{base}/api/v1/continuous_queries"))
            .call()?
            .into_string()?,
    )?;
    Ok(v["continuous_queries"]
        .as_array()
        .cloned()
        .unwrap_or_default())
}

/// Full-speed writes of every host at the current time from `clients` threads for `secs`;
/// with `lag`, samples the queries' worst lag every second after `warm` seconds. Returns
/// lines per second and the lag samples.
fn live(
    agent: &ureq::Agent,
    base: &str,
    tagsets: &Arc<Vec<String>>,
    clients: usize,
    secs: u64,
    lag: bool,
) -> Result<(f64, Vec<f64>)> {
    let stop_at = Instant::now() + Duration::from_secs(secs);
    let lines = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicBool::new(false));
    let url = format!("{base}/write?db=bench&precision=ns");
    let writers: Vec<_> = (0..clients)
        .map(|c| {
            let (agent, url, lines, failed, tagsets) = (
                agent.clone(),
                url.clone(),
                Arc::clone(&lines),
                Arc::clone(&failed),
                Arc::clone(tagsets),
            );
            std::thread::spawn(move || {
                let hosts = tagsets.len();
                let mut body = String::with_capacity(hosts * 400);
                let mut k = 0u64;
                while Instant::now() < stop_at {
                    body.clear();
                    let t = now_nanos() + c as i64;
                    for (h, tags) in tagsets.iter().enumerate() {
                        body.push_str(tags);
                        body.push(' ');
                        for (f, name) in FIELDS.iter().enumerate() {
                            let v = (k as usize + h * 7 + f * 13) % 100;
                            body.push_str(&format!("{}{name}={v}i", if f == 0 { "" } else { "," }));
                        }
                        body.push_str(&format!(" {t}\n"));
                    }
                    k += 1;
                    match agent.post(&url).send_string(&body) {
                        Ok(r) if r.status() == 204 => {
                            lines.fetch_add(hosts as u64, Ordering::Relaxed);
                        }
                        _ => {
                            failed.store(true, Ordering::Relaxed);
                            return;
                        }
                    }
                }
            })
        })
        .collect();
    let started = Instant::now();
    let mut samples = Vec::new();
    while Instant::now() < stop_at {
        std::thread::sleep(Duration::from_secs(1));
        if lag && started.elapsed() >= Duration::from_secs(120) {
            let worst = statuses(agent, base)?
                .iter()
                .filter_map(|q| q["lag_seconds"].as_f64())
                .fold(0.0, f64::max);
            samples.push(worst);
        }
    }
    for w in writers {
        w.join().map_err(|_| anyhow::anyhow!("writer panicked"))?;
    }
    if failed.load(Ordering::Relaxed) {
        bail!("a live write failed");
    }
    Ok((
        lines.load(Ordering::Relaxed) as f64 / started.elapsed().as_secs_f64(),
        samples,
    ))
}

fn quantile(v: &mut [f64], q: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    v[((v.len() - 1) as f64 * q).round() as usize]
}

/// CPU time (user and system) process `pid` has used, in seconds.
fn cpu_seconds(pid: u32) -> Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // The fields after the command (which may hold spaces), from the state on: utime and
    // stime are the 12th and 13th, in clock ticks.
    let rest = stat.rsplit(')').next().unwrap_or_default();
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| -> Result<f64> { Ok(f.get(i).context("short /proc stat")?.parse()?) };
    // Linux reports these in USER_HZ, 100 a second on every architecture it runs on.
    Ok((ticks(11)? + ticks(12)?) / 100.0)
}

/// One server: load, live, and the queries' figures.
struct Run {
    load_lps: f64,
    live_lps: f64,
    /// The server's CPU seconds per million lines written live.
    live_cpu_per_mline: f64,
    lags: Vec<f64>,
    host_runs: Vec<f64>,
    dc_runs: Vec<f64>,
    failures: u64,
}

fn one(opts: &Options<'_>, data: &Path, tagsets: &Arc<Vec<String>>, queries: usize) -> Result<Run> {
    let system = System::Forestall(opts.forestall_bin.to_path_buf());
    let (mut child, dir, base, agent) = start_ready(&system, opts.work)?;
    let mut by_host = Vec::new();
    for i in 0..queries {
        let (q, host) = rollup(i, opts.hours);
        sql(&agent, &base, &q)?;
        by_host.push(host);
    }
    let lines = (opts.hosts * opts.hours * 360) as f64;
    let t = Instant::now();
    load(&base, &agent, data, opts.batch, opts.clients)?;
    let load_lps = lines / t.elapsed().as_secs_f64();
    let cpu_before = cpu_seconds(child.id())?;
    let live_started = Instant::now();
    let (live_lps, lags) = live(
        &agent,
        &base,
        tagsets,
        opts.clients,
        opts.live_secs,
        queries > 0,
    )?;
    let live_lines = live_lps * live_started.elapsed().as_secs_f64();
    let live_cpu_per_mline = (cpu_seconds(child.id())? - cpu_before) / live_lines * 1e6;
    let mut run = Run {
        load_lps,
        live_lps,
        live_cpu_per_mline,
        lags,
        host_runs: Vec::new(),
        dc_runs: Vec::new(),
        failures: 0,
    };
    for q in statuses(&agent, &base)? {
        let i: usize = q["name"].as_str().unwrap_or("r0")[1..].parse().unwrap_or(0);
        run.failures += q["status"]["failures"].as_u64().unwrap_or(0);
        if let Some(d) = q["status"]["last_duration_seconds"].as_f64() {
            if by_host.get(i).copied().unwrap_or(false) {
                run.host_runs.push(d);
            } else {
                run.dc_runs.push(d);
            }
        }
    }
    stop(&mut child, "forestall", || {})?;
    if run.failures > 0 {
        // The next server's log replaces this one: keep it, it says why runs failed.
        let kept = opts
            .work
            .join(format!("forestall-failed-runs-{}.log", now_nanos()));
        std::fs::copy(dir.with_extension("log"), &kept)?;
        eprintln!(
            "   {} failed runs; the server's log is kept in {}",
            run.failures,
            kept.display()
        );
    }
    Ok(run)
}

/// Write-to-sink latency of an on-write rollup, in seconds, `n` times.
fn on_write(opts: &Options<'_>, n: usize) -> Result<Vec<f64>> {
    let system = System::Forestall(opts.forestall_bin.to_path_buf());
    let (mut child, _dir, base, agent) = start_ready(&system, opts.work)?;
    sql(
        &agent,
        &base,
        "CREATE CONTINUOUS QUERY lat ON WRITE INTO lat_10s AS \
         SELECT date_bin(INTERVAL '10 seconds', time) AS time, service, max(p99) AS p99 \
         FROM latency GROUP BY 1, service",
    )?;
    let url = format!("{base}/write?db=bench&precision=ns");
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        // A new maximum every time, in the open bucket.
        let v = 1000 + i;
        let t = Instant::now();
        agent
            .post(&url)
            .send_string(&format!("latency,service=web p99={v} {}", now_nanos()))
            .context("write")?;
        let q = "SELECT max(p99) AS m FROM lat_10s";
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let seen = sql(&agent, &base, q)
                .ok()
                .and_then(|r| r[0]["m"].as_f64())
                .is_some_and(|m| m >= v as f64);
            if seen {
                break;
            }
            if Instant::now() > deadline {
                bail!("the on-write rollup did not show write {i}");
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        out.push(t.elapsed().as_secs_f64());
        std::thread::sleep(Duration::from_millis(20));
    }
    stop(&mut child, "forestall", || {})?;
    Ok(out)
}

pub fn main(opts: &Options<'_>) -> Result<()> {
    std::fs::create_dir_all(opts.work)?;
    let end = now_nanos() / 3_600_000_000_000 * 3_600;
    let start = end - (opts.hours as i64) * 3_600;
    let data = opts.work.join(format!(
        "tsbs-cpu-{}hosts-{}h-cq.lp",
        opts.hosts, opts.hours
    ));
    eprintln!("generating {} (from {start} s)", data.display());
    let set = super::DataSet {
        hosts: opts.hosts,
        hours: opts.hours,
        seed: 1,
        floats: false,
    };
    generate(&set, &data, start)?;
    // The live writes use the data set's series: each host's measurement and tags.
    let tagsets: Arc<Vec<String>> = Arc::new(
        BufReader::new(File::open(&data)?)
            .lines()
            .take(opts.hosts)
            .map(|l| Ok(l?.split(' ').next().unwrap_or_default().to_owned()))
            .collect::<Result<_>>()?,
    );
    let mut pairs = Vec::new();
    for p in 0..opts.pairs {
        // Odd pairs run the server with queries first, so that a machine growing faster or
        // slower over the run does not favour one side.
        let mut runs = [None, None];
        for with in [p % 2 == 1, p % 2 == 0] {
            let queries = if with { opts.queries } else { 0 };
            eprintln!("== pair {p}: with {queries} rollups");
            let run = one(opts, &data, &tagsets, queries)?;
            eprintln!(
                "   load {:.0} lines/s, live {:.0} lines/s, {:.2} server CPU-s per million live lines",
                run.load_lps, run.live_lps, run.live_cpu_per_mline
            );
            runs[usize::from(with)] = Some(run);
        }
        let [Some(without), Some(with)] = runs else {
            unreachable!("both runs of a pair ran")
        };
        pairs.push((without, with));
    }
    let mut latencies = on_write(opts, opts.on_write)?;

    println!(
        "| pair | load without (lines/s) | load with | ratio | live without (lines/s) | live with | ratio | server CPU-s per M live lines without / with | worst lag p50 / max (s) | run over 1,000 series p50 / p90 (s) | by datacenter p50 (s) | failed runs |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|");
    for (p, (a, b)) in pairs.iter_mut().enumerate() {
        let mut lags = b.lags.clone();
        println!(
            "| {p} | {:.0} | {:.0} | {:.3} | {:.0} | {:.0} | {:.3} | {:.2} / {:.2} | {:.1} / {:.1} | {:.3} / {:.3} | {:.3} | {} |",
            a.load_lps,
            b.load_lps,
            b.load_lps / a.load_lps,
            a.live_lps,
            b.live_lps,
            b.live_lps / a.live_lps,
            a.live_cpu_per_mline,
            b.live_cpu_per_mline,
            quantile(&mut lags, 0.5),
            quantile(&mut lags, 1.0),
            quantile(&mut b.host_runs, 0.5),
            quantile(&mut b.host_runs, 0.9),
            quantile(&mut b.dc_runs, 0.5),
            b.failures,
        );
    }
    println!(
        "\non-write rollup, from the write request to the sink showing the point ({} writes): p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
        latencies.len(),
        quantile(&mut latencies, 0.5) * 1e3,
        quantile(&mut latencies, 0.99) * 1e3,
        quantile(&mut latencies, 1.0) * 1e3,
    );
    Ok(())
}
