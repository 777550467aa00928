//! The prevention benchmark's parts: the workload (when requests arrive), the service and
//! the work one request costs, the open-loop driver, the HPA-like policy ([`Hpa`]), and the
//! figures a run is judged by ([`judge`], [`second_line`]). `src/bin/prevent.rs` runs them
//! with the service in a cgroup of its own, starts the Forestall policy's server, and draws
//! the plots. [`replay_usage`] runs a run's metered usage through the allocation loop
//! offline, to see what its settings cost without a live run.
//!
//! **The workload** is open loop: every request has a scheduled arrival time fixed before the
//! run, from a seed, so each policy gets the same requests and a slow service shows up as
//! latency (measured from the scheduled arrival), not as fewer requests. Time is compressed:
//! one "day" lasts [`Workload::day`]. The arrival rate is the sum of
//! * a **daily ramp** from `base_rps` at the day's start to `peak_rps` at its middle and back;
//! * a **recurring surge**, `surge_rps` more for `surge_width`, starting at the same phase of
//!   every day (`surge_phase`), moved by up to `jitter` either way (a batch job at the top of
//!   the hour, a daily peak);
//! * a few **unannounced spikes**, `spike_rps` more for `spike_width`, at seeded times away
//!   from the surges.
//!
//! Arrivals are a non-homogeneous Poisson process drawn by thinning.

use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// The shape of the load; see the module docs.
#[derive(Debug, Clone, PartialEq)]
pub struct Workload {
    pub seed: u64,
    /// How long one compressed day lasts.
    pub day: Duration,
    pub days: u32,
    pub base_rps: f64,
    pub peak_rps: f64,
    /// Where in the day the recurring surge starts, in [0, 1).
    pub surge_phase: f64,
    pub surge_width: Duration,
    pub surge_rps: f64,
    /// How far a day's surge may start from its phase, either way.
    pub jitter: Duration,
    /// Unannounced spikes over the whole run.
    pub spikes: u32,
    pub spike_width: Duration,
    pub spike_rps: f64,
}

impl Default for Workload {
    /// Six days of ten minutes; a 30 s surge at 70 % of each day.
    fn default() -> Self {
        Self {
            seed: 1,
            day: Duration::from_secs(600),
            days: 6,
            base_rps: 20.0,
            peak_rps: 60.0,
            surge_phase: 0.7,
            surge_width: Duration::from_secs(30),
            surge_rps: 80.0,
            jitter: Duration::from_secs(10),
            spikes: 3,
            spike_width: Duration::from_secs(10),
            spike_rps: 80.0,
        }
    }
}

impl Workload {
    /// The default shape over `days` days of `day`: the surge, its jitter and the spikes
    /// keep their share of the day (a 600 s day has the defaults).
    pub fn compressed(seed: u64, day: Duration, days: u32) -> Self {
        let d = Self::default();
        let scale = day.as_secs_f64() / d.day.as_secs_f64();
        Self {
            seed,
            day,
            days,
            surge_width: d.surge_width.mul_f64(scale),
            jitter: d.jitter.mul_f64(scale),
            spike_width: d.spike_width.mul_f64(scale),
            ..d
        }
    }
}

/// Why a request arrived: which part of the rate it came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cause {
    Base,
    Surge,
    Spike,
}

/// When the load rises: the start of each day's surge, and of each spike.
#[derive(Debug, Clone, PartialEq)]
pub struct Onsets {
    pub surges: Vec<Duration>,
    pub spikes: Vec<Duration>,
}

/// The run's schedule: arrival times from the start, in order, with their cause.
#[derive(Debug, Clone, PartialEq)]
pub struct Schedule {
    pub arrivals: Vec<(Duration, Cause)>,
    pub onsets: Onsets,
}

impl Workload {
    /// The whole run's length.
    pub fn length(&self) -> Duration {
        self.day * self.days
    }

    /// Checks the shape makes sense: positive rates and widths, surges that fit their day.
    pub fn validate(&self) -> Result<(), String> {
        let rates = [self.base_rps, self.peak_rps, self.surge_rps, self.spike_rps];
        if rates.iter().any(|r| !r.is_finite() || *r < 0.0) || self.peak_rps < self.base_rps {
            return Err("rates are finite, not negative, and peak_rps ≥ base_rps".into());
        }
        if self.day.is_zero() || self.days == 0 {
            return Err("a run has at least one day of some length".into());
        }
        if !(0.0..1.0).contains(&self.surge_phase) {
            return Err("surge_phase is in [0, 1)".into());
        }
        let start = self.day.mul_f64(self.surge_phase);
        if start < self.jitter || start + self.jitter + self.surge_width > self.day {
            return Err("a day's surge, jitter included, fits inside the day".into());
        }
        Ok(())
    }

    /// The surge and spike onsets of this seed (the same for every policy).
    pub fn onsets(&self) -> Onsets {
        let mut rng = StdRng::seed_from_u64(self.seed);
        let surges = (0..self.days)
            .map(|d| {
                let shift = rng.random_range(-1.0..=1.0) * self.jitter.as_secs_f64();
                let at = self.day.as_secs_f64() * (d as f64 + self.surge_phase) + shift;
                Duration::from_secs_f64(at.max(0.0))
            })
            .collect::<Vec<_>>();
        // Spikes land anywhere a surge (with a spike's width of margin) is not.
        let margin = self.spike_width + self.surge_width;
        let clear = |t: Duration| {
            surges
                .iter()
                .all(|&s| t + self.spike_width + margin < s || t > s + margin)
        };
        let room = self.length().saturating_sub(self.spike_width);
        let mut spikes = Vec::new();
        let mut tries = 0;
        while spikes.len() < self.spikes as usize && tries < 10_000 {
            tries += 1;
            let t = room.mul_f64(rng.random::<f64>());
            if clear(t) && spikes.iter().all(|&s: &Duration| t.abs_diff(s) > margin) {
                spikes.push(t);
            }
        }
        spikes.sort();
        Onsets { surges, spikes }
    }

    /// The arrival rate at `t` (requests/s), and its parts.
    pub fn rate(&self, onsets: &Onsets, t: Duration) -> (f64, [f64; 3]) {
        let phase = (t.as_secs_f64() / self.day.as_secs_f64()).fract();
        let ramp = 0.5 - 0.5 * (2.0 * std::f64::consts::PI * phase).cos();
        let base = self.base_rps + (self.peak_rps - self.base_rps) * ramp;
        let within =
            |starts: &[Duration], width: Duration| starts.iter().any(|&s| t >= s && t < s + width);
        let surge = if within(&onsets.surges, self.surge_width) {
            self.surge_rps
        } else {
            0.0
        };
        let spike = if within(&onsets.spikes, self.spike_width) {
            self.spike_rps
        } else {
            0.0
        };
        (base + surge + spike, [base, surge, spike])
    }

    /// The schedule: arrivals drawn by thinning at the highest rate, each kept with
    /// probability rate(t) / max and labelled by the part it was drawn from.
    pub fn schedule(&self) -> Schedule {
        let onsets = self.onsets();
        let max = self.peak_rps + self.surge_rps + self.spike_rps;
        let mut rng = StdRng::seed_from_u64(self.seed ^ 0x9e37_79b9_7f4a_7c15);
        let end = self.length().as_secs_f64();
        let mut arrivals = Vec::new();
        let mut t = 0.0;
        if max > 0.0 {
            loop {
                // Exponential gaps at the highest rate.
                t += -(1.0 - rng.random::<f64>()).ln() / max;
                if t >= end {
                    break;
                }
                let at = Duration::from_secs_f64(t);
                let (rate, [base, surge, _]) = self.rate(&onsets, at);
                let u = rng.random::<f64>() * max;
                if u >= rate {
                    continue;
                }
                let cause = if u < base {
                    Cause::Base
                } else if u < base + surge {
                    Cause::Surge
                } else {
                    Cause::Spike
                };
                arrivals.push((at, cause));
            }
        }
        Schedule { arrivals, onsets }
    }
}

/// The work of one request: `rounds` passes of a multiply-xorshift hash over a stride of
/// `working_set` (so that the request costs CPU time and touches memory), seeded by the
/// request. Returns the hash, which the caller must use so the work is not optimised away.
pub fn work(working_set: &mut [u64], rounds: u32, seed: u64) -> u64 {
    if working_set.is_empty() {
        return seed;
    }
    let n = working_set.len();
    let mut h = seed ^ 0x2545_f491_4f6c_dd1d;
    for _ in 0..rounds {
        h ^= h >> 33;
        h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
        h ^= h >> 33;
        let i = (h as usize) % n;
        working_set[i] = working_set[i].wrapping_add(h);
        h ^= working_set[(i + n / 2) % n];
    }
    h
}

/// The service: answers `GET /work?id=N` over HTTP/1.1 (keep-alive) with the hash of
/// [`work`]`(rounds)` over a working set of `working_set_bytes`. Each connection has a thread
/// that reads its requests; the work itself is done by `workers` threads, in arrival order,
/// so under a CPU quota requests queue for a worker and the queueing shows as latency. Runs
/// until `stop` is set; returns the requests answered.
pub fn serve(
    listener: TcpListener,
    workers: usize,
    rounds: u32,
    working_set_bytes: usize,
    stop: Arc<AtomicBool>,
) -> std::io::Result<u64> {
    listener.set_nonblocking(true)?;
    let served = Arc::new(AtomicU64::new(0));
    let (jobs, queue) = mpsc::channel::<(u64, mpsc::Sender<u64>)>();
    let queue = Arc::new(Mutex::new(queue));
    let pool: Vec<_> = (0..workers.max(1))
        .map(|w| {
            let queue = Arc::clone(&queue);
            std::thread::spawn(move || {
                let mut ws = vec![w as u64; (working_set_bytes / 8).max(1)];
                loop {
                    let next = queue.lock().unwrap_or_else(|e| e.into_inner()).recv();
                    let Ok((id, reply)) = next else { return };
                    let _ = reply.send(work(&mut ws, rounds, id));
                }
            })
        })
        .collect();
    let mut connections = Vec::new();
    while !stop.load(Ordering::Relaxed) {
        match listener.accept() {
            Ok((conn, _)) => {
                conn.set_nonblocking(false)?;
                conn.set_nodelay(true)?;
                let (jobs, served, stop) = (jobs.clone(), Arc::clone(&served), Arc::clone(&stop));
                connections.push(std::thread::spawn(move || {
                    // A closed or broken connection ends its thread.
                    let _ = answer(conn, &jobs, &served, &stop);
                }));
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(2));
            }
            Err(e) => return Err(e),
        }
    }
    for c in connections {
        let _ = c.join();
    }
    drop(jobs);
    for t in pool {
        let _ = t.join();
    }
    Ok(served.load(Ordering::Relaxed))
}

/// Reads the requests of one keep-alive connection, has a worker do each, and answers it.
fn answer(
    conn: TcpStream,
    jobs: &mpsc::Sender<(u64, mpsc::Sender<u64>)>,
    served: &AtomicU64,
    stop: &AtomicBool,
) -> std::io::Result<()> {
    conn.set_read_timeout(Some(Duration::from_millis(200)))?;
    let mut out = conn.try_clone()?;
    let mut reader = BufReader::new(conn);
    let mut line = String::new();
    loop {
        line.clear();
        match reader.read_line(&mut line) {
            Ok(0) => return Ok(()),
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                if stop.load(Ordering::Relaxed) {
                    return Ok(());
                }
                continue;
            }
            Err(e) => return Err(e),
        }
        let id: Option<u64> = line
            .split_whitespace()
            .nth(1)
            .and_then(|path| path.strip_prefix("/work?id="))
            .and_then(|v| v.parse().ok());
        // The headers, up to the blank line (no bodies are sent).
        let mut header = String::new();
        while reader.read_line(&mut header)? > 2 {
            header.clear();
        }
        let (status, body) = match id {
            Some(id) => {
                let (reply, hash) = mpsc::channel();
                jobs.send((id, reply))
                    .map_err(|_| std::io::Error::other("the workers stopped"))?;
                let hash = hash
                    .recv()
                    .map_err(|_| std::io::Error::other("the workers stopped"))?;
                ("200 OK", hash.to_string())
            }
            None => ("404 Not Found", "GET /work?id=N".to_owned()),
        };
        write!(
            out,
            "HTTP/1.1 {status}\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )?;
        served.fetch_add(1, Ordering::Relaxed);
    }
}

/// One request's outcome: its scheduled arrival, and how long from then until its answer
/// (`None`: it failed).
pub type Outcome = (Duration, Option<Duration>);

/// Sends the `arrivals` (offsets from now) to the service at `addr`, open loop: a dispatcher
/// releases each at its time to `clients` connections; a request that finds them all busy
/// waits, and its latency counts from its scheduled time, so neither a slow service nor a
/// slow client hides queueing. Each outcome also goes to `live` as it completes (for the
/// figures written while the run goes on). Returns one outcome per arrival, in order.
pub fn drive(
    addr: std::net::SocketAddr,
    arrivals: &[Duration],
    clients: usize,
    live: Option<mpsc::Sender<Outcome>>,
) -> Vec<Outcome> {
    let start = Instant::now();
    let (tx, rx) = mpsc::channel::<(usize, Duration)>();
    let rx = Arc::new(Mutex::new(rx));
    let results = Arc::new(Mutex::new(vec![None; arrivals.len()]));
    let threads: Vec<_> = (0..clients.max(1))
        .map(|_| {
            let (rx, results, live) = (Arc::clone(&rx), Arc::clone(&results), live.clone());
            std::thread::spawn(move || {
                let mut conn: Option<(BufReader<TcpStream>, TcpStream)> = None;
                loop {
                    let next = rx.lock().unwrap_or_else(|e| e.into_inner()).recv();
                    let Ok((i, at)) = next else { return };
                    let answered = request(&mut conn, addr, i as u64).is_ok();
                    if !answered {
                        conn = None;
                    }
                    let took = answered.then(|| start.elapsed().saturating_sub(at));
                    results.lock().unwrap_or_else(|e| e.into_inner())[i] = took;
                    if let Some(live) = &live {
                        let _ = live.send((at, took));
                    }
                }
            })
        })
        .collect();
    for (i, &at) in arrivals.iter().enumerate() {
        if let Some(wait) = at.checked_sub(start.elapsed()) {
            std::thread::sleep(wait);
        }
        let _ = tx.send((i, at));
    }
    drop(tx);
    for t in threads {
        let _ = t.join();
    }
    let results = std::mem::take(&mut *results.lock().unwrap_or_else(|e| e.into_inner()));
    arrivals.iter().copied().zip(results).collect()
}

/// One `GET /work` on the connection (opened if needed); the answer read whole.
fn request(
    conn: &mut Option<(BufReader<TcpStream>, TcpStream)>,
    addr: std::net::SocketAddr,
    id: u64,
) -> std::io::Result<()> {
    if conn.is_none() {
        let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
        stream.set_nodelay(true)?;
        stream.set_read_timeout(Some(Duration::from_secs(30)))?;
        *conn = Some((BufReader::new(stream.try_clone()?), stream));
    }
    let Some((reader, writer)) = conn.as_mut() else {
        unreachable!("opened above")
    };
    write!(
        writer,
        "GET /work?id={id} HTTP/1.1\r\nHost: service\r\n\r\n"
    )?;
    let mut line = String::new();
    reader.read_line(&mut line)?;
    if !line.starts_with("HTTP/1.1 200") {
        return Err(std::io::Error::other(format!("answered {line:?}")));
    }
    let mut length = 0;
    loop {
        line.clear();
        if reader.read_line(&mut line)? <= 2 {
            break;
        }
        if let Some(v) = line.strip_prefix("Content-Length: ") {
            length = v.trim().parse().unwrap_or(0);
        }
    }
    let mut body = vec![0; length];
    std::io::Read::read_exact(reader, &mut body)
}

/// The reactive policy: the Kubernetes Horizontal Pod Autoscaler's rule applied to a CPU
/// quota. Every `sync` (the HPA's default 15 s) the quota is set to usage / `target`
/// (`desiredReplicas = ceil(current × metric / target)`, quotas being continuous), unless
/// utilisation is within `tolerance` of the target (default 10 %); a raise goes at once but
/// at most doubles the quota (the default scale-up policy, 100 % per period); a release takes
/// the highest recommendation of the last `window` (the default scale-down stabilisation
/// window, 300 s). Within `[min, max]`.
#[derive(Debug, Clone)]
pub struct Hpa {
    pub target: f64,
    pub tolerance: f64,
    pub window: Duration,
    pub sync: Duration,
    pub min: f64,
    pub max: f64,
    quota: f64,
    recommendations: std::collections::VecDeque<(Duration, f64)>,
}

impl Hpa {
    /// Starts at `quota`, with Kubernetes' defaults and a 70 % utilisation target.
    pub fn new(quota: f64, min: f64, max: f64) -> Self {
        Self {
            target: 0.7,
            tolerance: 0.1,
            window: Duration::from_secs(300),
            sync: Duration::from_secs(15),
            min,
            max,
            quota: quota.clamp(min, max),
            recommendations: Default::default(),
        }
    }

    pub fn quota(&self) -> f64 {
        self.quota
    }

    /// One sync at `now` with `used` cores over the period just past; returns the quota.
    pub fn step(&mut self, now: Duration, used: f64) -> f64 {
        let ratio = used / self.quota / self.target;
        let recommended = if (ratio - 1.0).abs() <= self.tolerance {
            self.quota
        } else {
            (self.quota * ratio).clamp(self.min, self.max)
        };
        self.recommendations.push_back((now, recommended));
        while self
            .recommendations
            .front()
            .is_some_and(|(t, _)| now.saturating_sub(*t) > self.window)
        {
            self.recommendations.pop_front();
        }
        self.quota = if recommended > self.quota {
            recommended.min(self.quota * 2.0)
        } else {
            let highest = self
                .recommendations
                .iter()
                .map(|(_, r)| *r)
                .fold(f64::MIN, f64::max);
            highest.min(self.quota)
        };
        self.quota
    }
}

/// One second's figures as a line of `prevent,policy=<policy>`: the p50, p95 and p99
/// latency (seconds) of the requests that completed in it, how many did (`rps`), how many
/// arrived in it (`arrived`: the offered load, as a load balancer in front counts it; under
/// throttling more arrive than complete), how many of those completed failed, and how many
/// were over the SLO. `None` when none arrived or completed.
pub fn second_line(
    policy: &str,
    completed: &[Outcome],
    arrived: usize,
    slo: Duration,
    second_ns: i64,
) -> Option<String> {
    let mut ok: Vec<f64> = completed
        .iter()
        .filter_map(|(_, l)| l.map(|l| l.as_secs_f64()))
        .collect();
    let failed = completed.len() - ok.len();
    let over = completed
        .iter()
        .filter(|(_, l)| l.is_none_or(|l| l > slo))
        .count();
    let n = completed.len();
    if n == 0 && arrived == 0 {
        return None;
    }
    let mut line = format!(
        "prevent,policy={policy} rps={n}i,arrived={arrived}i,failed={failed}i,over_slo={over}i"
    );
    if let Some([p50, p95, p99]) = percentiles(&mut ok) {
        line.push_str(&format!(",p50={p50},p95={p95},p99={p99}"));
    }
    line.push_str(&format!(" {second_ns}"));
    Some(line)
}

/// The requests in flight as the load balancer in front of the service sees them: arrived
/// by the schedule and not yet answered. Their count and the age of the oldest are known
/// while a request still waits, where its latency is known only when it is answered, so
/// they show a queue building within a fraction of a second.
#[derive(Debug, Clone)]
pub struct InFlight<'a> {
    arrivals: &'a [Duration],
    done: Vec<bool>,
    answered: usize,
    oldest: usize,
}

impl<'a> InFlight<'a> {
    /// Over `arrivals` (offsets from the start, in order), none answered yet.
    pub fn new(arrivals: &'a [Duration]) -> Self {
        Self {
            arrivals,
            done: vec![false; arrivals.len()],
            answered: 0,
            oldest: 0,
        }
    }

    /// The request scheduled at `at` was answered (or failed).
    pub fn answered(&mut self, at: Duration) {
        let mut i = self.arrivals.partition_point(|&a| a < at);
        while i < self.arrivals.len() && self.arrivals[i] == at {
            if !self.done[i] {
                self.done[i] = true;
                self.answered += 1;
                break;
            }
            i += 1;
        }
        while self.done.get(self.oldest) == Some(&true) {
            self.oldest += 1;
        }
    }

    /// At `now` (from the start): how many requests are in flight, and how long the oldest
    /// of them has waited (zero when none is).
    pub fn at(&self, now: Duration) -> (usize, Duration) {
        let arrived = self.arrivals.partition_point(|&a| a <= now);
        let age = match self.arrivals.get(self.oldest) {
            Some(&a) if a <= now => now - a,
            _ => Duration::ZERO,
        };
        (arrived.saturating_sub(self.answered), age)
    }
}

/// The in-flight figures at a moment as a line of `prevent_queue,policy=<policy>`: the
/// requests in flight, the oldest one's age (seconds) and the requests that arrived since
/// the last such line.
pub fn queue_line(
    policy: &str,
    in_flight: usize,
    oldest: Duration,
    arrived: usize,
    at_ns: i64,
) -> String {
    format!(
        "prevent_queue,policy={policy} inflight={in_flight}i,oldest={},arrived={arrived}i {at_ns}",
        oldest.as_secs_f64()
    )
}

/// What a run is judged by.
#[derive(Debug, Clone, PartialEq)]
pub struct Figures {
    /// Seconds (by scheduled arrival) whose p99 latency passed the SLO (a failed request
    /// counts as infinitely slow).
    pub seconds_over_slo: usize,
    pub requests_over_slo: usize,
    pub failed: usize,
    /// The allocation's integral over the run (cores × seconds).
    pub cpu_seconds: f64,
    /// Per recurring surge: how long before its onset the quota had been enough for it
    /// (seconds; negative: how long after the onset it became enough; `None`: never during
    /// the surge).
    pub leads: Vec<Option<f64>>,
    /// The share of recurring surges with enough quota in place at their onset.
    pub prepared: f64,
}

/// A surge to judge: its onset and the CPU (cores) its requests need at its peak.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Surge {
    pub onset: Duration,
    pub need: f64,
}

impl Workload {
    /// Each of `onsets` with the CPU its requests need at the surge's peak (at `request`
    /// CPU-seconds a request, fully used).
    pub fn surges(&self, onsets: &Onsets, from: &[Duration], request: f64) -> Vec<Surge> {
        from.iter()
            .map(|&onset| {
                let steps = 100;
                let peak = (0..steps)
                    .map(|k| {
                        self.rate(
                            onsets,
                            onset + self.surge_width.mul_f64(k as f64 / steps as f64),
                        )
                        .0
                    })
                    .fold(0.0, f64::max);
                Surge {
                    onset,
                    need: peak * request,
                }
            })
            .collect()
    }
}

/// What one request cost on average over a run, in CPU-seconds: the metered usage
/// (`(at, cores)` samples in order, each the mean since the one before, the first since the
/// start) integrated over the run, over the `requests` it served. A surge's need is judged at
/// this cost, not at the calibration's aim: the machine's speed drifts between the
/// calibration and the run (by a third either way on this machine). `None` without usage or
/// requests.
pub fn request_cost(usage: &[(Duration, f64)], requests: usize) -> Option<f64> {
    let mut since = Duration::ZERO;
    let mut used = 0.0;
    for &(at, cores) in usage {
        if cores.is_finite() {
            used += cores.max(0.0) * at.saturating_sub(since).as_secs_f64();
        }
        since = at;
    }
    (requests > 0 && used > 0.0).then(|| used / requests as f64)
}

/// Judges a run: `outcomes` of every request, the allocation over time (`(from, cores)`,
/// in order; the first from zero), the recurring surges and their width, and the SLO.
pub fn judge(
    outcomes: &[Outcome],
    allocation: &[(Duration, f64)],
    length: Duration,
    surges: &[Surge],
    surge_width: Duration,
    slo: Duration,
) -> Figures {
    let over = |o: &Outcome| o.1.is_none_or(|l| l > slo);
    let seconds_over_slo = p99_by_second(outcomes)
        .into_values()
        .filter(|p99| *p99 > slo.as_secs_f64())
        .count();
    // The allocation in force at `t`, and its integral.
    let at = |t: Duration| {
        allocation
            .iter()
            .take_while(|(from, _)| *from <= t)
            .last()
            .map_or(0.0, |(_, a)| *a)
    };
    let cpu_seconds = allocation
        .iter()
        .enumerate()
        .map(|(i, (from, a))| {
            let to = allocation.get(i + 1).map_or(length, |n| n.0).min(length);
            a * to.saturating_sub(*from).as_secs_f64()
        })
        .sum();
    let leads: Vec<Option<f64>> = surges
        .iter()
        .map(|s| {
            let enough = |a: f64| a >= s.need;
            if enough(at(s.onset)) {
                // Since the start of the stretch of enough that holds at the onset.
                let mut since = None;
                for (from, a) in allocation.iter().take_while(|(from, _)| *from <= s.onset) {
                    since = match (enough(*a), since) {
                        (true, None) => Some(*from),
                        (true, kept) => kept,
                        (false, _) => None,
                    };
                }
                since.map(|since| (s.onset - since).as_secs_f64())
            } else {
                allocation
                    .iter()
                    .find(|(from, a)| {
                        *from > s.onset && *from < s.onset + surge_width && enough(*a)
                    })
                    .map(|(from, _)| -(*from - s.onset).as_secs_f64())
            }
        })
        .collect();
    let prepared = leads.iter().filter(|l| l.is_some_and(|l| l >= 0.0)).count() as f64
        / surges.len().max(1) as f64;
    Figures {
        seconds_over_slo,
        requests_over_slo: outcomes.iter().filter(|o| over(o)).count(),
        failed: outcomes.iter().filter(|o| o.1.is_none()).count(),
        cpu_seconds,
        leads,
        prepared,
    }
}

/// Leads as a report lists them: `12 s, -1 s, none`.
pub fn leads(leads: &[Option<f64>]) -> String {
    leads
        .iter()
        .map(|l| l.map_or("none".into(), |l| format!("{l:.0} s")))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Each second's p99 latency (seconds, by scheduled arrival; a failure is infinitely slow).
fn p99_by_second(outcomes: &[Outcome]) -> std::collections::BTreeMap<u64, f64> {
    let mut by_second: std::collections::BTreeMap<u64, Vec<f64>> = Default::default();
    for (at, latency) in outcomes {
        let l = latency.map_or(f64::INFINITY, |l| l.as_secs_f64());
        by_second.entry(at.as_secs()).or_default().push(l);
    }
    by_second
        .into_iter()
        .filter_map(|(s, mut v)| percentiles(&mut v).map(|p| (s, p[2])))
        .collect()
}

/// Seconds whose p99 passed the SLO within `width` of one of `onsets` (how a policy
/// absorbed the unannounced spikes).
pub fn seconds_over_slo_within(
    outcomes: &[Outcome],
    onsets: &[Duration],
    width: Duration,
    slo: Duration,
) -> usize {
    p99_by_second(outcomes)
        .into_iter()
        .filter(|(s, p99)| {
            let t = Duration::from_secs(*s);
            *p99 > slo.as_secs_f64() && onsets.iter().any(|&o| t >= o && t < o + width)
        })
        .count()
}

/// A run drawn as SVG: each second's p99 latency against the SLO (top), and the CPU quota
/// the kernel held with the CPU used (bottom); recurring surges shaded, spikes marked.
#[allow(clippy::too_many_arguments)]
pub fn plot(
    policy: &str,
    outcomes: &[Outcome],
    quota: &[(Duration, f64)],
    usage: &[(Duration, f64)],
    length: Duration,
    surges: (&[Duration], Duration),
    spikes: &[Duration],
    slo: Duration,
) -> String {
    use std::fmt::Write as _;
    let (w, h, left, top, gap) = (1200.0, 560.0, 60.0, 30.0, 40.0);
    let panel = (h - top - gap - 30.0) / 2.0;
    let span = length.as_secs_f64().max(1.0);
    let x = |t: f64| left + (w - left - 20.0) * t / span;
    let lat_max = slo.as_secs_f64() * 4.0;
    let y_lat = |v: f64| top + panel * (1.0 - (v / lat_max).min(1.0));
    let cores_max = quota
        .iter()
        .map(|q| q.1)
        .chain(usage.iter().map(|u| u.1))
        .filter(|v| v.is_finite())
        .fold(1.0f64, f64::max)
        * 1.1;
    let top2 = top + panel + gap;
    let y_cores = |v: f64| top2 + panel * (1.0 - (v / cores_max).min(1.0));
    let mut svg = String::new();
    let _ = writeln!(
        svg,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(svg, r#"<rect width="{w}" height="{h}" fill="white"/>"#);
    let (surges, surge_width) = surges;
    for &s in surges {
        let (a, b) = (x(s.as_secs_f64()), x((s + surge_width).as_secs_f64()));
        let _ = writeln!(
            svg,
            r##"<rect x="{a:.1}" y="{top}" width="{:.1}" height="{:.1}" fill="#f5c16c" opacity="0.4"/>"##,
            (b - a).max(1.0),
            h - top - 30.0
        );
    }
    for &s in spikes {
        let a = x(s.as_secs_f64());
        let _ = writeln!(
            svg,
            r##"<line x1="{a:.1}" x2="{a:.1}" y1="{top}" y2="{:.1}" stroke="#d62728" stroke-dasharray="2,3"/>"##,
            h - 30.0
        );
    }
    let mut path = String::new();
    for (s, p99) in p99_by_second(outcomes) {
        let _ = write!(
            path,
            "{}{:.1},{:.1}",
            if path.is_empty() { "M" } else { " L" },
            x(s as f64),
            y_lat(p99)
        );
    }
    let _ = writeln!(
        svg,
        r##"<path d="{path}" fill="none" stroke="#1f77b4" stroke-width="1"/>"##
    );
    let ys = y_lat(slo.as_secs_f64());
    let _ = writeln!(
        svg,
        r##"<line x1="{left}" x2="{:.1}" y1="{ys:.1}" y2="{ys:.1}" stroke="#d62728"/>"##,
        w - 20.0
    );
    let mut path = String::new();
    let mut last = None;
    for &(t, c) in quota {
        let c = if c.is_finite() { c } else { cores_max };
        let (xt, yc) = (x(t.as_secs_f64()), y_cores(c));
        match last {
            None => {
                let _ = write!(path, "M{xt:.1},{yc:.1}");
            }
            Some(prev) => {
                let _ = write!(path, " L{xt:.1},{prev:.1} L{xt:.1},{yc:.1}");
            }
        }
        last = Some(yc);
    }
    if let Some(prev) = last {
        let _ = write!(path, " L{:.1},{prev:.1}", x(span));
    }
    let _ = writeln!(
        svg,
        r##"<path d="{path}" fill="none" stroke="#2ca02c" stroke-width="2"/>"##
    );
    let mut path = String::new();
    for &(t, c) in usage {
        let _ = write!(
            path,
            "{}{:.1},{:.1}",
            if path.is_empty() { "M" } else { " L" },
            x(t.as_secs_f64()),
            y_cores(c)
        );
    }
    let _ = writeln!(
        svg,
        r##"<path d="{path}" fill="none" stroke="#555" stroke-width="1"/>"##
    );
    for (y0, label) in [
        (
            top,
            format!(
                "p99 latency (0 to {:.0} ms), SLO {:.0} ms in red",
                lat_max * 1000.0,
                slo.as_secs_f64() * 1000.0
            ),
        ),
        (
            top2,
            format!("CPU: quota (green), used (grey), 0 to {cores_max:.2} cores"),
        ),
    ] {
        let _ = writeln!(
            svg,
            r##"<rect x="{left}" y="{y0}" width="{:.1}" height="{panel:.1}" fill="none" stroke="#999"/>"##,
            w - left - 20.0
        );
        let _ = writeln!(
            svg,
            r#"<text x="{left}" y="{:.1}">{label}</text>"#,
            y0 - 6.0
        );
    }
    let _ = writeln!(
        svg,
        r#"<text x="{left}" y="{:.1}">{policy}: {span:.0} s; recurring surges shaded, spikes dashed</text>"#,
        h - 10.0
    );
    svg.push_str("</svg>\n");
    svg
}

/// p50, p95 and p99 of `samples` (nearest rank; sorts them). `None` when empty.
pub fn percentiles(samples: &mut [f64]) -> Option<[f64; 3]> {
    if samples.is_empty() {
        return None;
    }
    samples.sort_by(f64::total_cmp);
    let at = |q: f64| {
        let rank = (q * samples.len() as f64).ceil() as usize;
        samples[rank.clamp(1, samples.len()) - 1]
    };
    Some([at(0.50), at(0.95), at(0.99)])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn count(s: &Schedule, from: Duration, to: Duration) -> usize {
        s.arrivals
            .iter()
            .filter(|(t, _)| *t >= from && *t < to)
            .count()
    }

    #[test]
    fn the_schedule_is_fixed_by_its_seed() {
        let w = Workload::default();
        assert_eq!(w.schedule(), w.schedule());
        let other = Workload {
            seed: 2,
            ..w.clone()
        };
        assert_ne!(other.schedule().arrivals, w.schedule().arrivals);
    }

    #[test]
    fn a_request_costs_the_metered_cpu_over_the_requests_served() {
        let s = Duration::from_secs;
        // Half a core for 2 s, then a whole one for 1 s (the sample at 3 s covers 2–3 s):
        // 2 CPU-seconds over 400 requests.
        let usage = [(s(1), 0.5), (s(2), 0.5), (s(3), 1.0)];
        let cost = request_cost(&usage, 400).unwrap();
        assert!((cost - 0.005).abs() < 1e-12, "{cost}");
        assert_eq!(request_cost(&usage, 0), None);
        assert_eq!(request_cost(&[], 10), None);
        // A sample the meter could not read counts for nothing.
        let gap = [(s(1), f64::NAN), (s(2), 1.0)];
        assert_eq!(request_cost(&gap, 100), Some(0.01));
    }

    #[test]
    fn surges_recur_at_their_phase_and_spikes_stay_clear_of_them() {
        let w = Workload::default();
        w.validate().unwrap();
        let s = w.schedule();
        assert_eq!(s.onsets.surges.len(), w.days as usize);
        for (d, &onset) in s.onsets.surges.iter().enumerate() {
            let phase = w.day.mul_f64(d as f64 + w.surge_phase);
            assert!(onset.abs_diff(phase) <= w.jitter, "day {d}: {onset:?}");
            // The surge shows in the arrivals: far more in its window than in the window of
            // the same width just before it.
            let during = count(&s, onset, onset + w.surge_width);
            let before = count(&s, onset - w.surge_width, onset);
            assert!(during as f64 > 1.8 * before as f64, "{during} vs {before}");
        }
        assert_eq!(s.onsets.spikes.len(), w.spikes as usize);
        for &spike in &s.onsets.spikes {
            for &surge in &s.onsets.surges {
                assert!(
                    spike + w.spike_width <= surge || spike >= surge + w.surge_width,
                    "spike {spike:?} overlaps the surge at {surge:?}"
                );
            }
            let during = count(&s, spike, spike + w.spike_width);
            let expected = w.spike_rps * w.spike_width.as_secs_f64();
            assert!(during as f64 > 0.8 * expected, "{during} vs {expected}");
        }
        let spiked = s
            .arrivals
            .iter()
            .filter(|(_, c)| *c == Cause::Spike)
            .count();
        assert!(spiked > 0);
    }

    #[test]
    fn the_mean_rate_follows_the_shape() {
        let w = Workload {
            spikes: 0,
            ..Workload::default()
        };
        let s = w.schedule();
        // The ramp averages to the middle of base and peak; the surges add their share.
        let expected = w.length().as_secs_f64() * (w.base_rps + w.peak_rps) / 2.0
            + w.days as f64 * w.surge_rps * w.surge_width.as_secs_f64();
        let got = s.arrivals.len() as f64;
        assert!((got / expected - 1.0).abs() < 0.03, "{got} vs {expected}");
        // The day's trough (its start) is quieter than its middle.
        let minute = Duration::from_secs(60);
        let trough = count(&s, Duration::ZERO, minute);
        let middle = count(&s, w.day / 2 - minute / 2, w.day / 2 + minute / 2);
        assert!(middle as f64 > 2.0 * trough as f64, "{middle} vs {trough}");
        assert!(s.arrivals.windows(2).all(|p| p[0].0 <= p[1].0));
    }

    #[test]
    fn shapes_that_make_no_sense_are_refused() {
        let ok = Workload::default();
        for (bad, why) in [
            (
                Workload {
                    peak_rps: 1.0,
                    ..ok.clone()
                },
                "peak",
            ),
            (
                Workload {
                    base_rps: f64::NAN,
                    ..ok.clone()
                },
                "finite",
            ),
            (
                Workload {
                    surge_phase: 1.0,
                    ..ok.clone()
                },
                "surge_phase",
            ),
            (
                Workload {
                    surge_phase: 0.0,
                    ..ok.clone()
                },
                "fits",
            ),
            (
                Workload {
                    days: 0,
                    ..ok.clone()
                },
                "one day",
            ),
        ] {
            let e = bad.validate().unwrap_err();
            assert!(e.contains(why), "{e}");
        }
    }

    #[test]
    fn a_request_costs_its_rounds_and_touches_the_working_set() {
        let mut ws = vec![0u64; 1 << 12];
        let a = work(&mut ws, 1000, 7);
        assert_ne!(a, work(&mut vec![0u64; 1 << 12], 1000, 8));
        assert!(ws.iter().filter(|&&v| v != 0).count() > 500);
        // The same request on the same state gives the same hash.
        let mut again = vec![0u64; 1 << 12];
        assert_eq!(work(&mut again, 1000, 7), a);
    }

    #[test]
    fn the_service_answers_every_request_of_an_open_loop_schedule() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let service = {
            let stop = Arc::clone(&stop);
            std::thread::spawn(move || serve(listener, 2, 10_000, 1 << 20, stop))
        };
        // 200 requests over half a second, from 8 connections.
        let arrivals: Vec<Duration> = (0..200).map(|i| Duration::from_micros(2_500 * i)).collect();
        let (live, streamed) = mpsc::channel();
        let outcomes = drive(addr, &arrivals, 8, Some(live));
        // Each outcome was also streamed as it completed.
        let mut streamed: Vec<Outcome> = streamed.try_iter().collect();
        streamed.sort();
        assert_eq!(streamed, outcomes);
        assert_eq!(outcomes.len(), 200);
        assert!(outcomes.iter().zip(&arrivals).all(|((at, _), a)| at == a));
        let failed = outcomes.iter().filter(|(_, l)| l.is_none()).count();
        assert_eq!(failed, 0);
        // A path it does not serve is a 404, and the connection carries on.
        let c = TcpStream::connect(addr).unwrap();
        let mut writer = c.try_clone().unwrap();
        let mut reader = BufReader::new(c);
        write!(writer, "GET /other HTTP/1.1\r\n\r\n").unwrap();
        let mut text = String::new();
        while reader.read_line(&mut text).unwrap() > 2 {}
        assert!(text.starts_with("HTTP/1.1 404"), "{text}");
        let mut body = vec![0; "GET /work?id=N".len()];
        std::io::Read::read_exact(&mut reader, &mut body).unwrap();
        let mut conn = Some((reader, writer));
        request(&mut conn, addr, 7).unwrap();
        drop(conn);
        stop.store(true, Ordering::Relaxed);
        assert_eq!(service.join().unwrap().unwrap(), 202);
    }

    #[test]
    fn a_run_is_judged_by_its_slo_seconds_cost_and_lead_before_each_surge() {
        let s = Duration::from_secs;
        let ms = Duration::from_millis;
        // Second 0: fine; second 1: one slow request in 100 (p99 is the 99th: fine); second 2:
        // two slow ones (p99 over); second 3: a failure, one in 100 (p99 fine, but the
        // request is over the SLO).
        let mut outcomes: Vec<Outcome> = Vec::new();
        for sec in 0..4u64 {
            for i in 0..100u64 {
                let slow = (sec == 1 && i == 0) || (sec == 2 && i < 2);
                let latency = if slow { ms(900) } else { ms(20) };
                let failed = sec == 3 && i == 0;
                outcomes.push((s(sec) + ms(i), (!failed).then_some(latency)));
            }
        }
        // 1 core, raised to 2 at 50 s (10 s before the first surge, at 60 s), back to 1 at
        // 100 s, raised 5 s after the second surge's onset (200 s); the third (300 s) never
        // has enough; the fourth (380 s) needs less than the core held all along.
        let allocation = [
            (s(0), 1.0),
            (s(50), 2.0),
            (s(100), 1.0),
            (s(205), 3.0),
            (s(250), 1.0),
        ];
        let surge = |onset: u64, need: f64| Surge {
            onset: s(onset),
            need,
        };
        let f = judge(
            &outcomes,
            &allocation,
            s(400),
            &[
                surge(60, 1.5),
                surge(200, 1.5),
                surge(300, 1.5),
                surge(380, 0.8),
            ],
            s(30),
            ms(500),
        );
        assert_eq!(f.seconds_over_slo, 1);
        assert_eq!(f.requests_over_slo, 4);
        assert_eq!(f.failed, 1);
        assert_eq!(f.cpu_seconds, 50.0 + 100.0 + 105.0 + 135.0 + 150.0);
        assert_eq!(f.leads, [Some(10.0), Some(-5.0), None, Some(380.0)]);
        assert!((f.prepared - 2.0 / 4.0).abs() < 1e-12);
    }

    #[test]
    fn a_surge_needs_its_peak_rate_of_requests() {
        let w = Workload::default();
        let onsets = w.onsets();
        let surges = w.surges(&onsets, &onsets.surges, 0.005);
        assert_eq!(surges.len(), onsets.surges.len());
        for s in &surges {
            let (rate, [_, surge, _]) = w.rate(&onsets, s.onset);
            assert_eq!(surge, w.surge_rps);
            assert!(
                s.need >= rate * 0.005 && s.need <= (w.peak_rps + w.surge_rps) * 0.005,
                "{s:?}"
            );
        }
    }

    /// Noisy usage (a burst every few seconds over a steady level): the replayed loop
    /// allocates more than is used, and with a violation share its headroom settles lower
    /// instead of ratcheting up, so it allocates less.
    #[test]
    fn replayed_usage_is_covered_and_a_violation_share_costs_less() {
        let usage: Vec<f64> = (0..1000)
            .map(|s| if s % 7 == 0 { 0.4 } else { 0.2 })
            .collect();
        let settings = LoopSettings {
            day: Duration::from_secs(200),
            interval: Duration::from_secs(2),
            horizon_hours: 0.25,
            release_hours: 1.0,
            threshold: 0.8,
            violation_share: 0.0,
            headroom_price: 0.0,
            start: 0.29,
            pool: 2.0,
        };
        let ratchet = replay_usage(&usage, &settings).unwrap();
        let settles = replay_usage(
            &usage,
            &LoopSettings {
                violation_share: 0.05,
                ..settings
            },
        )
        .unwrap();
        let used: f64 = usage.iter().sum();
        assert_eq!(ratchet.rounds, 500);
        for r in [&ratchet, &settles] {
            assert!(r.cpu_seconds > used, "{r:?} against {used:.0} used");
        }
        assert!(
            settles.headroom < ratchet.headroom,
            "{settles:?} {ratchet:?}"
        );
        assert!(
            settles.cpu_seconds < ratchet.cpu_seconds,
            "{settles:?} {ratchet:?}"
        );
    }

    #[test]
    fn the_reactive_policy_follows_the_hpa_rule() {
        let s = Duration::from_secs;
        let mut h = Hpa::new(1.0, 0.1, 4.0);
        let mut step = |t: u64, used: f64, want: f64| {
            let got = h.step(s(t), used);
            assert!((got - want).abs() < 1e-9, "at {t} s: {got} (want {want})");
        };
        // At the target (within 10 %): no change.
        step(15, 0.75, 1.0);
        // Usage far above: a raise at once, at most doubling.
        step(30, 2.1, 2.0);
        step(45, 2.1, 3.0);
        // Usage falls: the highest recommendation of the last 300 s holds the quota up…
        for t in (60..=300).step_by(15) {
            step(t, 0.7, 3.0);
        }
        // …until the raise's recommendation leaves the window.
        step(360, 0.7, 1.0);
        // Never under its floor.
        step(375, 0.0, 1.0);
        step(700, 0.0, 0.1);
    }

    #[test]
    fn a_second_becomes_one_line_of_its_figures() {
        let ms = Duration::from_millis;
        let completed: Vec<Outcome> = (1..=100)
            .map(|i| (ms(i), (i != 7).then_some(ms(i * 3))))
            .collect();
        let line = second_line("static", &completed, 130, ms(200), 5_000_000_000).unwrap();
        // 99 answered: 3, 6, 9, … (not 21) ms; 34 of them over 200 ms, plus the failure.
        assert_eq!(
            line,
            "prevent,policy=static rps=100i,arrived=130i,failed=1i,over_slo=35i,p50=0.153,p95=0.288,p99=0.3 5000000000"
        );
        assert_eq!(second_line("static", &[], 0, ms(200), 0), None);
        let failed = second_line("x", &[(ms(1), None)], 0, ms(200), 0).unwrap();
        assert_eq!(
            failed,
            "prevent,policy=x rps=1i,arrived=0i,failed=1i,over_slo=1i 0"
        );
        // A second in which requests arrived and none completed is reported, not skipped.
        let stalled = second_line("x", &[], 40, ms(200), 0).unwrap();
        assert_eq!(
            stalled,
            "prevent,policy=x rps=0i,arrived=40i,failed=0i,over_slo=0i 0"
        );
    }

    #[test]
    fn a_queue_shows_in_flight_before_its_requests_are_answered() {
        let ms = Duration::from_millis;
        // Two requests share a scheduled time; the one at 30 ms is answered out of order.
        let arrivals = [ms(10), ms(20), ms(20), ms(30), ms(40)];
        let mut q = InFlight::new(&arrivals);
        assert_eq!(q.at(ms(5)), (0, ms(0)), "nothing has arrived");
        assert_eq!(q.at(ms(35)), (4, ms(25)));
        q.answered(ms(30));
        q.answered(ms(10));
        // The oldest is now one of the two at 20 ms.
        assert_eq!(q.at(ms(35)), (2, ms(15)));
        q.answered(ms(20));
        assert_eq!(
            q.at(ms(35)),
            (1, ms(15)),
            "the other one at 20 ms still waits"
        );
        q.answered(ms(20));
        // The 30 ms request was answered: the queue is empty until 40 ms arrives.
        assert_eq!(q.at(ms(35)), (0, ms(0)));
        assert_eq!(q.at(ms(100)), (1, ms(60)));
        // An answer for a time never scheduled, or twice, changes nothing.
        q.answered(ms(25));
        q.answered(ms(30));
        assert_eq!(q.at(ms(100)), (1, ms(60)));
        q.answered(ms(40));
        assert_eq!(q.at(ms(100)), (0, ms(0)));
        assert_eq!(
            queue_line("forestall", 3, ms(125), 9, 7),
            "prevent_queue,policy=forestall inflight=3i,oldest=0.125,arrived=9i 7"
        );
    }

    #[test]
    fn percentiles_are_nearest_rank() {
        let mut v: Vec<f64> = (1..=100).rev().map(f64::from).collect();
        assert_eq!(percentiles(&mut v), Some([50.0, 95.0, 99.0]));
        assert_eq!(percentiles(&mut [3.0]), Some([3.0, 3.0, 3.0]));
        assert_eq!(percentiles(&mut []), None);
    }

    #[test]
    fn a_compressed_day_keeps_the_shape_of_the_default_one() {
        let d = Workload::default();
        assert_eq!(Workload::compressed(1, d.day, d.days), d);
        let short = Workload::compressed(7, Duration::from_secs(60), 4);
        assert_eq!(short.surge_width, Duration::from_secs(3));
        assert_eq!(short.jitter, Duration::from_secs(1));
        assert_eq!(short.spike_width, Duration::from_secs(1));
        assert_eq!((short.seed, short.days), (7, 4));
        short.validate().unwrap();
    }

    #[test]
    fn slow_seconds_are_counted_within_their_windows_only() {
        let ms = Duration::from_millis;
        let s = Duration::from_secs;
        // Second 10 is slow (a failure), second 11 fast, second 30 slow but far from onsets.
        let outcomes = vec![
            (s(10) + ms(1), None),
            (s(11) + ms(5), Some(ms(20))),
            (s(30), Some(ms(900))),
        ];
        let slo = ms(200);
        assert_eq!(seconds_over_slo_within(&outcomes, &[s(10)], s(5), slo), 1);
        assert_eq!(
            seconds_over_slo_within(&outcomes, &[s(10), s(28)], s(5), slo),
            2
        );
        assert_eq!(seconds_over_slo_within(&outcomes, &[], s(5), slo), 0);
    }

    #[test]
    fn a_run_is_drawn_as_one_svg_with_latency_quota_and_usage() {
        let s = Duration::from_secs;
        let outcomes: Vec<Outcome> = (0..100)
            .map(|i| (s(i), Some(Duration::from_millis(10 + i))))
            .collect();
        let svg = plot(
            "forestall",
            &outcomes,
            &[(s(0), 0.3), (s(40), 1.2), (s(70), f64::INFINITY)],
            &[(s(1), 0.2), (s(2), 0.9)],
            s(100),
            (&[s(50)], s(10)),
            &[s(20)],
            Duration::from_millis(200),
        );
        assert!(svg.starts_with("<svg ") && svg.trim_end().ends_with("</svg>"));
        // Latency, quota and usage each a path; no NaN or infinity in the drawing.
        assert_eq!(svg.matches("<path ").count(), 3);
        assert!(!svg.contains("NaN") && !svg.contains("inf"), "{svg}");
    }
}

/// The Forestall policy's allocation settings, in hours of a real day (scaled to the
/// compressed one), as `prevent run` takes them.
#[derive(Debug, Clone, Copy)]
pub struct LoopSettings {
    pub day: Duration,
    pub interval: Duration,
    pub horizon_hours: f64,
    pub release_hours: f64,
    pub threshold: f64,
    pub violation_share: f64,
    pub headroom_price: f64,
    /// The quota the service starts at, in cores.
    pub start: f64,
    /// The CPU pool, in cores.
    pub pool: f64,
}

/// What [`replay_usage`] found.
#[derive(Debug, Clone, PartialEq)]
pub struct Replayed {
    pub cpu_seconds: f64,
    /// Rounds whose usage passed 95 % of the allocation in place (throttled, near enough).
    pub pressed_rounds: usize,
    pub rounds: usize,
    /// The learned CPU headroom at the end.
    pub headroom: f64,
    /// The allocation over time, as `judge` takes it: `(from, cores)` per round.
    pub allocation: Vec<(Duration, f64)>,
}

/// Replays metered CPU usage (`usage`: cores, one value a second, as `<policy>-usage.csv`)
/// through the live loop's `Controller` and allocation engine with `settings`, one round
/// per interval, each round deciding before it sees that round's usage. Offline and
/// exogenous: the usage does not answer the allocation, so it prices settings, it does not
/// replace a live run.
pub fn replay_usage(usage: &[f64], settings: &LoopSettings) -> anyhow::Result<Replayed> {
    use forestall_actuators::alloc::{Component, Engine, Preferences, Resource};
    use forestall_actuators::stack::Units;
    use forestall_actuators::{DryRun, Target};
    use forestall_control::config::{AllocationConfig, Amounts};

    let per_round = (settings.interval.as_secs_f64().round() as usize).max(1);
    let scaled = |hours: f64| settings.day.mul_f64(hours / 24.0).max(settings.interval);
    // The settings `prevent run` writes into the Forestall policy's config, derived as the
    // server derives them.
    let config = AllocationConfig {
        interval: settings.interval,
        horizon: scaled(settings.horizon_hours),
        release_after: scaled(settings.release_hours),
        judge_after: scaled(8.0),
        age_after: scaled(6.0),
        threshold: settings.threshold,
        violation_share: settings.violation_share,
        headroom_price: settings.headroom_price,
        headroom_window: scaled(48.0),
        pool: Amounts {
            cpu: Some(settings.pool),
            ..Amounts::default()
        },
        ..AllocationConfig::default()
    };
    let service = Component {
        name: "service".into(),
        weight: 1.0,
        deferrable: false,
        preferences: Preferences {
            unmanaged: [false, true, true, true],
            ..Preferences::default()
        },
    };
    let engine = Engine::new(
        config.engine_config(),
        vec![service],
        [Some(settings.pool), None, None, None],
        vec![[settings.start, 1e9, 0.0, 0.0]],
    )?;
    let units = Units::native(0.9);
    let mut controller = config.controller(
        engine,
        vec![Target::new("service", "prevent/service")?],
        Box::new(DryRun::default()),
        units,
    )?;
    let mut out = Replayed {
        cpu_seconds: 0.0,
        pressed_rounds: 0,
        rounds: 0,
        headroom: 1.0,
        allocation: Vec::new(),
    };
    for (t, seconds) in usage.chunks(per_round).enumerate() {
        let used = seconds.iter().sum::<f64>() / seconds.len() as f64;
        controller.round(t as u64);
        let held = controller.engine().allocation(0)[0];
        out.cpu_seconds += held * seconds.len() as f64;
        out.allocation
            .push((Duration::from_secs((t * per_round) as u64), held));
        out.pressed_rounds += usize::from(used > 0.95 * held);
        out.rounds += 1;
        controller.observe(&[[used, 1e8, f64::NAN, f64::NAN]]);
    }
    out.headroom = controller.engine().feedback(0, Resource::Cpu).headroom;
    Ok(out)
}
