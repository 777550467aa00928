//! Scrape: Forestall pulls Prometheus text and OpenMetrics endpoints itself (`[[scrape]]`),
//! so node_exporter and every other exporter need no Prometheus in between.
//!
//! Each target is scraped on its own task every `interval`, its first scrape offset within
//! the interval by a hash of its URL (as Prometheus spreads targets), so one slow or hanging
//! target never delays another. A scrape is stored as Prometheus stores one:
//! * the samples the same way as a remote write's ([`forestall_engine::prometheus`]): the
//!   metric name is the measurement, the labels are tags, the sample is the `value` field;
//! * every series gets the target's `job` and `instance` labels and the job's `labels`; a
//!   scraped label of one of those names is kept as `exported_<name>` (Prometheus'
//!   `honor_labels: false`);
//! * at the scrape's start time, or the exposition's own timestamps with
//!   `honor_timestamps`;
//! * whole or not at all: a failed request, a status other than 200, a timeout, a body over
//!   the limit, text that is not a valid exposition or more samples than `sample_limit` store
//!   none of its samples;
//! * and always, per scrape, `up` (1 or 0), `scrape_duration_seconds` and
//!   `scrape_samples_scraped` with the target's labels.
//!
//! What went wrong with a target is on `GET /api/v1/targets` (Prometheus' shape: health,
//! last error, last scrape) and counted on `/metrics`.

use std::future::Future;
use std::io::Read;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use forestall_engine::line_protocol::{Precision, write_point};
use forestall_engine::prometheus::{Builder, text};
use forestall_engine::store::now_nanos;
use forestall_engine::{Metrics, Store};

use crate::config::ScrapeConfig;

/// The URL a target is scraped at: `host:port` or `http://host:port` (a path given in the
/// target wins over `metrics_path`).
pub fn target_url(target: &str, metrics_path: &str) -> Result<String, String> {
    let rest = match target.split_once("://") {
        Some(("http", rest)) => rest,
        Some((scheme, _)) => {
            return Err(format!(
                "target {target:?}: only http targets can be scraped, not {scheme}"
            ));
        }
        None => target,
    };
    let (host, path) = match rest.find('/') {
        Some(k) => (&rest[..k], &rest[k..]),
        None => (rest, metrics_path),
    };
    let port = host.rsplit_once(':').map(|(_, p)| p);
    if host.is_empty()
        || port.is_none_or(|p| p.parse::<u16>().is_err())
        || host.contains(['@', ' ', '?', '#'])
    {
        return Err(format!("target {target:?} is not host:port"));
    }
    Ok(format!("http://{host}{path}"))
}

/// What the last scrape of a target found.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Last {
    /// `None` before the first scrape.
    pub up: Option<bool>,
    pub error: Option<String>,
    /// When it started, ns since the epoch.
    pub at: i64,
    pub duration: Duration,
    /// Samples in the exposition (none when it failed).
    pub samples: usize,
    /// Samples the store refused (a type conflict with a measurement of the same name…).
    pub rejected: usize,
}

/// One target of a job: where it is, its labels, and its last scrape.
#[derive(Debug)]
pub struct Target {
    pub job: String,
    pub instance: String,
    pub url: String,
    config: ScrapeConfig,
    /// `job`, `instance` and the job's labels, sorted by name.
    labels: Vec<(String, String)>,
    /// `exported_<name>` for each of them, in the same order.
    exported: Vec<String>,
    last: Mutex<Last>,
}

impl Target {
    /// The target `instance` of `config` (whose targets are valid: checked by the config).
    pub fn new(config: &ScrapeConfig, instance: &str) -> Result<Self, String> {
        let url = target_url(instance, &config.metrics_path)?;
        let mut labels: Vec<(String, String)> = config
            .labels
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        labels.push(("job".into(), config.job.clone()));
        labels.push(("instance".into(), instance.to_string()));
        labels.sort();
        let exported = labels
            .iter()
            .map(|(k, _)| format!("exported_{k}"))
            .collect();
        Ok(Self {
            job: config.job.clone(),
            instance: instance.to_string(),
            url,
            config: config.clone(),
            labels,
            exported,
            last: Mutex::new(Last::default()),
        })
    }

    pub fn last(&self) -> Last {
        self.last.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// The agent its requests go through: the scrape's timeout over the whole request.
    fn agent(&self) -> ureq::Agent {
        ureq::AgentBuilder::new()
            .timeout(self.config.timeout)
            .user_agent(concat!("forestall/", env!("CARGO_PKG_VERSION")))
            .build()
    }

    /// Scrapes once, at `now` (ns), stores what it read and the scrape's own series, and
    /// returns (and keeps) what it found.
    pub fn scrape(&self, agent: &ureq::Agent, store: &Store, now: i64) -> Last {
        let started = Instant::now();
        let now_ms = now.div_euclid(1_000_000);
        let mut last = Last {
            at: now,
            ..Last::default()
        };
        match self
            .fetch(agent)
            .and_then(|(body, format)| self.store_exposition(store, &body, format, now_ms))
        {
            Ok((samples, rejected)) => {
                last.up = Some(true);
                last.samples = samples;
                last.rejected = rejected.0;
                last.error = rejected.1;
            }
            Err(e) => {
                last.up = Some(false);
                last.error = Some(e);
            }
        }
        last.duration = started.elapsed();
        // The scrape's own series, whatever became of it.
        let mut lines = String::new();
        let labels = || self.labels.iter().map(|(k, v)| (k.as_str(), v.as_str()));
        for (name, value) in [
            ("up", f64::from(u8::from(last.up == Some(true)))),
            ("scrape_duration_seconds", last.duration.as_secs_f64()),
            ("scrape_samples_scraped", last.samples as f64),
        ] {
            let field = forestall_engine::line_protocol::FieldValue::Float(value);
            write_point(&mut lines, name, labels(), [("value", &field)], now_ms);
            lines.push('\n');
        }
        if let Err(e) = store.write(lines.as_bytes(), Precision::Milliseconds, now) {
            let why = format!("storing up: {e}");
            last.error = Some(match last.error.take() {
                Some(before) => format!("{before}; {why}"),
                None => why,
            });
        }
        let m = store.metrics();
        Metrics::add(&m.scrapes_total, 1);
        Metrics::add(&m.scrape_failures_total, u64::from(last.up == Some(false)));
        Metrics::add(&m.scrape_samples_total, last.samples as u64);
        let changed = {
            let mut kept = self.last.lock().unwrap_or_else(|p| p.into_inner());
            let changed = kept.up != last.up || kept.error != last.error;
            *kept = last.clone();
            changed
        };
        if changed {
            match &last.error {
                Some(e) => {
                    tracing::warn!(job = %self.job, instance = %self.instance, error = %e, "scrape failed")
                }
                None => {
                    tracing::info!(job = %self.job, instance = %self.instance, "scrape target up")
                }
            }
        }
        last
    }

    /// The exposition: a 200 within the limit, as UTF-8, in the format its type names.
    fn fetch(&self, agent: &ureq::Agent) -> Result<(String, text::Format), String> {
        let response = agent
            .get(&self.url)
            .set(
                "Accept",
                "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1",
            )
            .set(
                "X-Prometheus-Scrape-Timeout-Seconds",
                &self.config.timeout.as_secs_f64().to_string(),
            )
            .call()
            .map_err(|e| match e {
                ureq::Error::Status(code, _) => format!("server returned HTTP status {code}"),
                ureq::Error::Transport(t) => format!("{t}"),
            })?;
        let format = text::Format::of_content_type(response.header("Content-Type"));
        let limit = self.config.body_size_limit;
        let mut body = Vec::new();
        response
            .into_reader()
            .take(limit + 1)
            .read_to_end(&mut body)
            .map_err(|e| format!("reading the body: {e}"))?;
        if body.len() as u64 > limit {
            return Err(format!("the body is over body_size_limit ({limit} bytes)"));
        }
        let body = String::from_utf8(body).map_err(|e| {
            format!(
                "the body is not UTF-8 (at byte {})",
                e.utf8_error().valid_up_to()
            )
        })?;
        Ok((body, format))
    }

    /// Parses and stores an exposition; (samples, (samples refused, why)).
    fn store_exposition(
        &self,
        store: &Store,
        body: &str,
        format: text::Format,
        now_ms: i64,
    ) -> Result<(usize, (usize, Option<String>)), String> {
        let samples =
            text::parse(body, format).map_err(|e| format!("parsing the exposition: {e}"))?;
        let limit = self.config.sample_limit;
        if limit > 0 && samples.len() > limit {
            return Err(format!(
                "{} samples, over sample_limit ({limit})",
                samples.len()
            ));
        }
        let mut builder = Builder::default();
        let mut labels: Vec<(&str, &str)> = Vec::new();
        for s in &samples {
            labels.clear();
            labels.push(("__name__", s.name));
            for (k, v) in &s.labels {
                let k = match self.labels.binary_search_by(|(t, _)| t.as_str().cmp(k)) {
                    Ok(i) => self.exported[i].as_str(),
                    Err(_) => k,
                };
                labels.push((k, v.as_ref()));
            }
            labels.extend(self.labels.iter().map(|(k, v)| (k.as_str(), v.as_str())));
            let ms = match (self.config.honor_timestamps, s.timestamp_ms) {
                (true, Some(ms)) => ms,
                _ => now_ms,
            };
            builder.series(&labels, [(s.value, ms)]);
        }
        let converted = builder.finish();
        let mut refused = converted.rejected_series;
        let mut why: Vec<String> = converted.rejected.clone();
        if !converted.lines.is_empty() {
            let outcome = store
                .write_parsed(
                    converted.lines.as_bytes(),
                    converted.parsed(),
                    Precision::Milliseconds,
                    now_ms * 1_000_000,
                )
                .map_err(|e| format!("storing the samples: {e}"))?;
            refused += outcome.rejected_lines;
            why.extend(outcome.errors.iter().take(4).map(|e| e.reason.clone()));
        }
        let why = (refused > 0).then(|| {
            format!(
                "{refused} of {} samples not stored: {}",
                samples.len(),
                why.join("; ")
            )
        });
        Ok((samples.len(), (refused, why)))
    }
}

/// Every target of every `[[scrape]]` job.
#[derive(Debug, Clone, Default)]
pub struct Scraper {
    targets: Arc<Vec<Arc<Target>>>,
}

impl Scraper {
    pub fn new(jobs: &[ScrapeConfig]) -> Result<Self, String> {
        let mut targets = Vec::new();
        for job in jobs {
            for t in &job.targets {
                targets.push(Arc::new(Target::new(job, t)?));
            }
        }
        Ok(Self {
            targets: Arc::new(targets),
        })
    }

    pub fn targets(&self) -> &[Arc<Target>] {
        &self.targets
    }

    /// The targets as Prometheus' `GET /api/v1/targets` lists them.
    pub fn status(&self) -> serde_json::Value {
        let active: Vec<_> = self
            .targets
            .iter()
            .map(|t| {
                let last = t.last();
                let labels: serde_json::Map<String, serde_json::Value> = t
                    .labels
                    .iter()
                    .map(|(k, v)| (k.clone(), v.clone().into()))
                    .collect();
                serde_json::json!({
                    "labels": labels,
                    "scrapePool": t.job,
                    "scrapeUrl": t.url,
                    "health": match last.up {
                        Some(true) => "up",
                        Some(false) => "down",
                        None => "unknown",
                    },
                    "lastError": last.error.unwrap_or_default(),
                    "lastScrape": (last.up.is_some()).then(|| {
                        chrono::DateTime::from_timestamp_nanos(last.at).to_rfc3339()
                    }),
                    "lastScrapeDuration": last.duration.as_secs_f64(),
                    "lastSamples": last.samples,
                    "lastSamplesRejected": last.rejected,
                    "scrapeInterval": humantime::format_duration(t.config.interval).to_string(),
                    "scrapeTimeout": humantime::format_duration(t.config.timeout).to_string(),
                })
            })
            .collect();
        serde_json::json!({ "status": "success", "data": { "activeTargets": active } })
    }

    /// Scrapes every target until `shutdown` resolves, each on its own task.
    pub async fn run(
        &self,
        store: Arc<Store>,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) {
        if self.targets.is_empty() {
            return;
        }
        tracing::info!(targets = self.targets.len(), "scraping");
        let (stop, stopped) = tokio::sync::watch::channel(false);
        let tasks: Vec<_> = self
            .targets
            .iter()
            .map(|t| {
                tokio::spawn(scrape_loop(
                    Arc::clone(t),
                    Arc::clone(&store),
                    stopped.clone(),
                ))
            })
            .collect();
        shutdown.await;
        let _ = stop.send(true);
        for t in tasks {
            let _ = t.await;
        }
    }
}

/// One target's scrapes, every interval from an offset its URL fixes, until stopped. A scrape
/// still running when the next is due is not doubled: that tick is skipped.
async fn scrape_loop(
    target: Arc<Target>,
    store: Arc<Store>,
    mut stopped: tokio::sync::watch::Receiver<bool>,
) {
    let agent = target.agent();
    let interval = target.config.interval;
    let offset = offset_of(&target.url, interval);
    loop {
        let wait = until_next(now_nanos(), interval, offset);
        tokio::select! {
            _ = stopped.changed() => return,
            _ = tokio::time::sleep(wait) => {}
        }
        let (t, s, a) = (Arc::clone(&target), Arc::clone(&store), agent.clone());
        let scrape = tokio::task::spawn_blocking(move || {
            t.scrape(&a, &s, now_nanos());
        });
        tokio::select! {
            _ = stopped.changed() => return,
            done = scrape => if let Err(e) = done {
                tracing::error!(job = %target.job, instance = %target.instance, error = %e, "a scrape failed to run");
            }
        }
    }
}

/// Where in each interval a target is scraped: fixed by its URL, as Prometheus spreads
/// targets so that they are not all scraped at once.
fn offset_of(url: &str, interval: Duration) -> Duration {
    // FNV-1a: stable across runs and builds, unlike the std hasher.
    let h = url.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    });
    Duration::from_nanos(h % interval.as_nanos().max(1) as u64)
}

/// How long from `now` (ns) until the next instant that is `offset` past a multiple of
/// `interval`.
fn until_next(now: i64, interval: Duration, offset: Duration) -> Duration {
    let step = interval.as_nanos().max(1) as i64;
    let phase = (now - offset.as_nanos() as i64).rem_euclid(step);
    Duration::from_nanos((step - phase) as u64)
}

#[cfg(test)]
mod tests;
