//! Prometheus remote write ingest: the TSBS data set as Prometheus would send it (one series
//! per host and field, `cpu_<field>` with the host's tags as labels, a float sample every
//! 10 s), in snappy `WriteRequest`s of `samples` samples in time order, as Prometheus' queue
//! sends them. Every request is encoded before the clock starts, then the same requests go to
//! each system's `/api/v1/write` from `clients` clients, one system at a time.

use std::fs;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use forestall_engine::line_protocol::{FieldValue, Precision, parse_lines};
use forestall_engine::prometheus::encode;

use super::{System, cpu_secs, peak_rss, start_ready, stop};

pub struct Options<'a> {
    pub work: &'a Path,
    pub data: &'a Path,
    pub samples: usize,
    pub clients: usize,
}

/// One sample with its series' labels, owned: (labels, value, ms).
type Sample = (Vec<(String, String)>, f64, i64);

/// The data set's lines as snappy remote write requests, and how many samples they hold.
fn requests(data: &Path, per_request: usize) -> Result<(Vec<Vec<u8>>, usize)> {
    let text = fs::read(data).with_context(|| format!("read {}", data.display()))?;
    let mut out = Vec::new();
    let mut total = 0;
    // The samples of the request being filled.
    let mut pending: Vec<Sample> = Vec::with_capacity(per_request);
    let mut encoder = snap::raw::Encoder::new();
    let mut flush = |pending: &mut Vec<Sample>| -> Result<()> {
        let series: Vec<forestall_engine::prometheus::Series<'_>> = pending
            .iter()
            .map(|(labels, v, t)| {
                (
                    labels
                        .iter()
                        .map(|(k, v)| (k.as_str(), v.as_str()))
                        .collect(),
                    vec![(*v, *t)],
                )
            })
            .collect();
        out.push(encoder.compress_vec(&encode(&series))?);
        pending.clear();
        Ok(())
    };
    for line in parse_lines(&text, Precision::Nanoseconds, 0) {
        let line = line.map_err(|e| anyhow::anyhow!("{e}"))?;
        for (field, value) in &line.fields {
            let v = match value {
                FieldValue::Integer(i) => *i as f64,
                FieldValue::Float(f) => *f,
                _ => bail!("a non-numeric field in the data set"),
            };
            let name = format!("{}_{field}", line.measurement);
            let mut labels = vec![("__name__".to_string(), name)];
            labels.extend(
                line.tags
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string())),
            );
            pending.push((labels, v, line.timestamp / 1_000_000));
            total += 1;
            if pending.len() == per_request {
                flush(&mut pending)?;
            }
        }
    }
    if !pending.is_empty() {
        flush(&mut pending)?;
    }
    Ok((out, total))
}

pub fn main(systems: &[System], o: &Options<'_>) -> Result<()> {
    eprintln!("encoding {} as remote write requests", o.data.display());
    let (requests, samples) = requests(o.data, o.samples)?;
    let bytes: usize = requests.iter().map(Vec::len).sum();
    eprintln!(
        "{} requests, {samples} samples, {:.1} MB snappy",
        requests.len(),
        bytes as f64 / 1e6
    );
    let requests = Arc::new(requests);
    let mut rows = Vec::new();
    for system in systems {
        let (mut child, _dir, base, agent) = start_ready(system, o.work)?;
        let pid = child.id();
        let cpu0 = cpu_secs(pid)?;
        let next = Arc::new(AtomicUsize::new(0));
        let failed = Arc::new(Mutex::new(None));
        let started = Instant::now();
        let url = format!("{base}/api/v1/write");
        let workers: Vec<_> = (0..o.clients)
            .map(|_| {
                let (requests, next, failed, agent, url) = (
                    Arc::clone(&requests),
                    Arc::clone(&next),
                    Arc::clone(&failed),
                    agent.clone(),
                    url.clone(),
                );
                std::thread::spawn(move || {
                    while let Some(body) = requests.get(next.fetch_add(1, Ordering::Relaxed)) {
                        let answer = agent
                            .post(&url)
                            .set("Content-Type", "application/x-protobuf")
                            .set("Content-Encoding", "snappy")
                            .set("X-Prometheus-Remote-Write-Version", "0.1.0")
                            .send_bytes(body);
                        match answer {
                            Ok(r) if r.status() / 100 == 2 => {}
                            Ok(r) => {
                                *failed.lock().unwrap() = Some(format!("answered {}", r.status()));
                                return;
                            }
                            Err(e) => {
                                *failed.lock().unwrap() = Some(e.to_string());
                                return;
                            }
                        }
                    }
                })
            })
            .collect();
        for w in workers {
            w.join().map_err(|_| anyhow::anyhow!("client panicked"))?;
        }
        let secs = started.elapsed().as_secs_f64();
        let cpu = cpu_secs(pid)? - cpu0;
        let rss = peak_rss(pid)?;
        stop(&mut child, system.name(), || {})?;
        if let Some(e) = failed.lock().unwrap().take() {
            bail!("{}: a write failed: {e}", system.name());
        }
        eprintln!("   {}: {secs:.1} s, {cpu:.1} CPU-s", system.name());
        rows.push((system.name(), secs, cpu, rss));
    }
    println!(
        "\nPrometheus remote write: {samples} samples in {} requests of {} from {} clients\n",
        requests.len(),
        o.samples,
        o.clients
    );
    println!("| system | samples/s | server CPU per sample | peak RSS |");
    println!("|---|---|---|---|");
    for (name, secs, cpu, rss) in &rows {
        println!(
            "| {name} | {:.2} M | {:.2} µs | {:.0} MiB |",
            samples as f64 / secs / 1e6,
            cpu / samples as f64 * 1e6,
            *rss as f64 / 1048576.0
        );
    }
    if let [(a, sa, ca, _), (b, sb, cb, _), ..] = rows.as_slice() {
        println!(
            "\n{a} / {b}: throughput {:.2} ×, CPU per sample {:.2} ×",
            sb / sa,
            ca / cb
        );
    }
    Ok(())
}
