//! `tsbs query`: TSBS's cpu-only queries against each system, on the same data, in one run.
//!
//! Each system is loaded with the data set, asked to flush and compact, and then each query
//! runs `reps` times (after two warm-up runs) with parameters drawn from one seeded generator,
//! so every system answers the same questions. Latency is the client's wall time for the HTTP
//! request, response body read in full.
//!
//! | query | question | Forestall (SQL) | InfluxDB 1.6 (InfluxQL) | VictoriaMetrics (PromQL) |
//! |---|---|---|---|---|
//! | single-groupby-1-1-1 | max `usage_user` per minute, 1 host, 1 h | `date_bin` + `max` | `GROUP BY time(1m)` | `max_over_time[1m]`, step 1m |
//! | double-groupby-1 | avg `usage_user` per host per hour, 12 h | `date_bin` + `avg` by host | `GROUP BY time(1h), hostname` | `avg_over_time[1h]` by host, step 1h |
//! | high-cpu-1 | rows of 1 host with `usage_user` > 90, 12 h | `WHERE usage_user > 90` | same | `cpu_usage_user{…} > 90`, step 10s |
//! | groupby-orderby-limit | max per minute, the 5 minutes before a random time | `ORDER BY 1 DESC LIMIT 5` | `ORDER BY time DESC LIMIT 5` | `max(max_over_time[1m])`, 5 steps |
//!
//! groupby-orderby-limit gives every system the window `[T - 5 min, T)`. TSBS's SQL form has
//! only `time < T`, but InfluxQL's `GROUP BY time(1m)` without a lower bound counts buckets
//! from 1970, and the data has a point every 10 s, so the latest five buckets before `T` are
//! those five minutes either way.
//! | lastpoint | the latest row of every host | `last_rows('cpu')` | `last(*) GROUP BY hostname` | instant query of every `cpu_*` series |
//!
//! VictoriaMetrics stores each field as its own series (`cpu_usage_user{hostname=…}`), so its
//! lastpoint returns one sample per (host, field). Then, for Forestall, the data is loaded
//! again into a fresh server while one client runs these queries back to back, and the load
//! throughput is compared with the plain load of the same run.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::{START_SECS, Stage, System, load, stable_size, start_ready, stop};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    SingleGroupby,
    DoubleGroupby,
    HighCpu,
    GroupbyOrderbyLimit,
    Lastpoint,
}

pub const KINDS: [Kind; 5] = [
    Kind::SingleGroupby,
    Kind::DoubleGroupby,
    Kind::HighCpu,
    Kind::GroupbyOrderbyLimit,
    Kind::Lastpoint,
];

impl Kind {
    pub fn name(self) -> &'static str {
        match self {
            Kind::SingleGroupby => "single-groupby-1-1-1",
            Kind::DoubleGroupby => "double-groupby-1",
            Kind::HighCpu => "high-cpu-1",
            Kind::GroupbyOrderbyLimit => "groupby-orderby-limit",
            Kind::Lastpoint => "lastpoint",
        }
    }
}

/// The parameters of one query: a host and a time window (seconds since the epoch).
#[derive(Debug, Clone, Copy)]
struct Params {
    host: usize,
    start: i64,
    end: i64,
}

fn params(kind: Kind, rng: &mut StdRng, hosts: usize, hours: usize) -> Params {
    let host = rng.random_range(0..hosts);
    let hour = |rng: &mut StdRng, len: usize| {
        START_SECS + 3600 * rng.random_range(0..=(hours.saturating_sub(len)) as i64)
    };
    match kind {
        Kind::SingleGroupby => {
            let start = hour(rng, 1);
            Params {
                host,
                start,
                end: start + 3600,
            }
        }
        Kind::DoubleGroupby | Kind::HighCpu => {
            let start = hour(rng, 12);
            Params {
                host,
                start,
                end: start + 12 * 3600,
            }
        }
        Kind::GroupbyOrderbyLimit => {
            let end = START_SECS + rng.random_range(300..(hours as i64 * 3600));
            Params {
                host,
                start: end - 300,
                end,
            }
        }
        Kind::Lastpoint => Params {
            host,
            start: START_SECS,
            end: START_SECS + hours as i64 * 3600,
        },
    }
}

/// `2016-01-01T05:00:00Z` from seconds since the epoch.
fn rfc3339(secs: i64) -> String {
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// The HTTP request that asks `system` the question.
fn request(
    system: &System,
    base: &str,
    agent: &ureq::Agent,
    kind: Kind,
    p: Params,
) -> ureq::Request {
    let (s, e, host) = (rfc3339(p.start), rfc3339(p.end), format!("host_{}", p.host));
    match system {
        System::Forestall(_) => {
            let sql = match kind {
                Kind::SingleGroupby => format!(
                    "SELECT date_bin(INTERVAL '1 minute', time) AS minute, max(usage_user) FROM cpu \
                     WHERE hostname = '{host}' AND time >= '{s}' AND time < '{e}' GROUP BY 1 ORDER BY 1"
                ),
                Kind::DoubleGroupby => format!(
                    "SELECT date_bin(INTERVAL '1 hour', time) AS hour, hostname, avg(usage_user) FROM cpu \
                     WHERE time >= '{s}' AND time < '{e}' GROUP BY 1, 2 ORDER BY 1, 2"
                ),
                Kind::HighCpu => format!(
                    "SELECT * FROM cpu WHERE hostname = '{host}' AND usage_user > 90 \
                     AND time >= '{s}' AND time < '{e}'"
                ),
                Kind::GroupbyOrderbyLimit => format!(
                    "SELECT date_bin(INTERVAL '1 minute', time) AS minute, max(usage_user) FROM cpu \
                     WHERE time >= '{s}' AND time < '{e}' GROUP BY 1 ORDER BY 1 DESC LIMIT 5"
                ),
                Kind::Lastpoint => "SELECT * FROM last_rows('cpu')".to_string(),
            };
            agent
                .get(&format!("{base}/api/v3/query_sql"))
                .query("q", &sql)
                .query("format", "json")
        }
        System::InfluxDb => {
            let q = match kind {
                Kind::SingleGroupby => format!(
                    "SELECT max(usage_user) FROM cpu WHERE hostname = '{host}' AND time >= '{s}' \
                     AND time < '{e}' GROUP BY time(1m)"
                ),
                Kind::DoubleGroupby => format!(
                    "SELECT mean(usage_user) FROM cpu WHERE time >= '{s}' AND time < '{e}' \
                     GROUP BY time(1h), hostname"
                ),
                Kind::HighCpu => format!(
                    "SELECT * FROM cpu WHERE usage_user > 90 AND hostname = '{host}' \
                     AND time >= '{s}' AND time < '{e}'"
                ),
                Kind::GroupbyOrderbyLimit => format!(
                    "SELECT max(usage_user) FROM cpu WHERE time >= '{s}' AND time < '{e}' \
                     GROUP BY time(1m) ORDER BY time DESC LIMIT 5"
                ),
                Kind::Lastpoint => "SELECT last(*) FROM cpu GROUP BY hostname".to_string(),
            };
            agent
                .get(&format!("{base}/query"))
                .query("db", "bench")
                .query("q", &q)
        }
        System::VictoriaMetrics => {
            let range = |query: String, start: i64, end: i64, step: &str| {
                agent
                    .get(&format!("{base}/api/v1/query_range"))
                    .query("query", &query)
                    .query("start", &start.to_string())
                    .query("end", &end.to_string())
                    .query("step", step)
            };
            match kind {
                Kind::SingleGroupby => range(
                    format!("max_over_time(cpu_usage_user{{hostname=\"{host}\"}}[1m])"),
                    p.start,
                    p.end - 60,
                    "60s",
                ),
                Kind::DoubleGroupby => range(
                    "avg(avg_over_time(cpu_usage_user[1h])) by (hostname)".into(),
                    p.start,
                    p.end - 3600,
                    "3600s",
                ),
                Kind::HighCpu => range(
                    format!("cpu_usage_user{{hostname=\"{host}\"}} > 90"),
                    p.start,
                    p.end,
                    "10s",
                ),
                Kind::GroupbyOrderbyLimit => range(
                    "max(max_over_time(cpu_usage_user[1m]))".into(),
                    p.start,
                    p.end - 60,
                    "60s",
                ),
                Kind::Lastpoint => agent
                    .get(&format!("{base}/api/v1/query"))
                    .query("query", "{__name__=~\"cpu_.*\"}")
                    .query("time", &p.end.to_string()),
            }
        }
    }
}

/// Runs one query; returns its latency and the size of the answer.
fn run(
    system: &System,
    base: &str,
    agent: &ureq::Agent,
    kind: Kind,
    p: Params,
) -> Result<(Duration, usize)> {
    let started = Instant::now();
    let resp = request(system, base, agent, kind, p)
        .call()
        .with_context(|| format!("{} {}", system.name(), kind.name()))?;
    let body = resp.into_string()?;
    let elapsed = started.elapsed();
    if body.contains("\"error\"") && !matches!(system, System::Forestall(_)) {
        bail!("{} {}: {body}", system.name(), kind.name());
    }
    Ok((elapsed, body.len()))
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

pub struct Options<'a> {
    pub work: &'a Path,
    pub data: &'a Path,
    pub hosts: usize,
    pub hours: usize,
    pub reps: usize,
    pub batch: usize,
    pub clients: usize,
    pub seed: u64,
}

/// Median latency (ms) per query kind for one system.
fn measure(system: &System, opts: &Options<'_>) -> Result<Vec<(f64, f64, usize)>> {
    let (mut child, dir, base, agent) = start_ready(system, opts.work)?;
    eprintln!("   loading");
    load(&base, &agent, opts.data, opts.batch, opts.clients)?;
    for (stage, quiet) in [(Stage::Flush, 3), (Stage::Compact, 15)] {
        if let Some((method, path)) = system.maintenance(stage) {
            agent.request(method, &format!("{base}{path}")).call()?;
        }
        stable_size(&dir, Duration::from_secs(quiet));
    }
    let mut out = Vec::new();
    for kind in KINDS {
        let mut rng = StdRng::seed_from_u64(opts.seed);
        for _ in 0..2 {
            run(
                system,
                &base,
                &agent,
                kind,
                params(kind, &mut rng, opts.hosts, opts.hours),
            )?;
        }
        let mut ms = Vec::with_capacity(opts.reps);
        let mut bytes = 0;
        for _ in 0..opts.reps {
            let p = params(kind, &mut rng, opts.hosts, opts.hours);
            let (d, b) = run(system, &base, &agent, kind, p)?;
            ms.push(d.as_secs_f64() * 1e3);
            bytes = b;
        }
        let med = median(&mut ms);
        let p90 = ms[(ms.len() * 9 / 10).min(ms.len() - 1)];
        eprintln!(
            "   {:<22} median {med:.2} ms  p90 {p90:.2} ms  ({bytes} B)",
            kind.name()
        );
        out.push((med, p90, bytes));
    }
    stop(&mut child, system.name(), || {})?;
    Ok(out)
}

/// Load throughput (values/s) of a fresh server, alone and with one client querying.
fn ingest_under_queries(system: &System, opts: &Options<'_>) -> Result<(f64, f64, usize)> {
    let values = (opts.hosts * opts.hours * 360 * 10) as f64;
    let mut rates = [0.0; 2];
    let mut queries_run = 0;
    for (i, with_queries) in [false, true].into_iter().enumerate() {
        let (mut child, _dir, base, agent) = start_ready(system, opts.work)?;
        let done = Arc::new(AtomicBool::new(false));
        let querier = with_queries.then(|| {
            let (done, base, agent) = (Arc::clone(&done), base.clone(), agent.clone());
            let system = match system {
                System::Forestall(p) => System::Forestall(p.clone()),
                System::VictoriaMetrics => System::VictoriaMetrics,
                System::InfluxDb => System::InfluxDb,
            };
            let (hosts, hours, seed) = (opts.hosts, opts.hours, opts.seed);
            std::thread::spawn(move || {
                let mut rng = StdRng::seed_from_u64(seed);
                let mut n = 0;
                while !done.load(Ordering::Relaxed) {
                    for kind in KINDS {
                        let p = params(kind, &mut rng, hosts, hours);
                        // Early on a query may find no table yet; that is fine here.
                        let _ = run(&system, &base, &agent, kind, p);
                        n += 1;
                    }
                }
                n
            })
        });
        let started = Instant::now();
        load(&base, &agent, opts.data, opts.batch, opts.clients)?;
        rates[i] = values / started.elapsed().as_secs_f64();
        done.store(true, Ordering::Relaxed);
        if let Some(q) = querier {
            queries_run = q.join().map_err(|_| anyhow::anyhow!("querier panicked"))?;
        }
        stop(&mut child, system.name(), || {})?;
    }
    Ok((rates[0], rates[1], queries_run))
}

pub fn main(systems: &[System], opts: &Options<'_>) -> Result<()> {
    let mut results = Vec::new();
    for system in systems {
        eprintln!("== {}", system.name());
        results.push((system.name(), measure(system, opts)?));
    }
    println!(
        "\nTSBS cpu-only queries: {} hosts x {} h, flushed and compacted; median (p90) of {} runs, ms\n",
        opts.hosts, opts.hours, opts.reps
    );
    let names: Vec<&str> = results.iter().map(|(n, _)| *n).collect();
    println!("| query | {} |", names.join(" | "));
    println!("|---|{}", "---|".repeat(names.len()));
    for (k, kind) in KINDS.iter().enumerate() {
        let cells: Vec<String> = results
            .iter()
            .map(|(_, r)| format!("{:.2} ({:.2})", r[k].0, r[k].1))
            .collect();
        println!("| {} | {} |", kind.name(), cells.join(" | "));
    }
    let peers: Vec<_> = results.iter().filter(|(n, _)| *n != "forestall").collect();
    if let Some((_, f)) = results.iter().find(|(n, _)| *n == "forestall")
        && !peers.is_empty()
    {
        println!(
            "\nForestall's median latency as a multiple of each peer's (below 1 is faster):\n"
        );
        println!(
            "| query | {} |",
            peers
                .iter()
                .map(|(n, _)| *n)
                .collect::<Vec<_>>()
                .join(" | ")
        );
        println!("|---|{}", "---|".repeat(peers.len()));
        for (k, kind) in KINDS.iter().enumerate() {
            let cells: Vec<String> = peers
                .iter()
                .map(|(_, r)| format!("{:.2}x", f[k].0 / r[k].0))
                .collect();
            println!("| {} | {} |", kind.name(), cells.join(" | "));
        }
    }
    for system in systems.iter().filter(|s| matches!(s, System::Forestall(_))) {
        eprintln!(
            "== {}: ingest alone, then ingest with one client querying",
            system.name()
        );
        let (alone, busy, n) = ingest_under_queries(system, opts)?;
        println!(
            "\nIngest while one client runs the five queries back to back ({n} queries): \
             {busy:.0} values/s against {alone:.0} alone = {:.0}%",
            100.0 * busy / alone
        );
    }
    Ok(())
}
