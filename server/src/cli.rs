//! The client commands of the `forestall` binary, talking to a running server over its HTTP
//! API, as `influxdb3 query` and `influxdb3 write` do:
//! * `forestall query "SQL" [--format F]`: the answer on stdout, as the server formats it;
//! * `forestall write [FILE|-] [--precision P]`: line protocol in batches of whole lines
//!   (a file of any size, with a progress bar on a terminal); a line the server refuses is
//!   reported with its line number in the input, and the other lines are still stored;
//! * `forestall status`: the server's health, data, continuous queries, scrape targets and
//!   allocation loop at a glance;
//! * `forestall token create|list|revoke`: tokens ([`crate::auth`]), on a running server or,
//!   with `--data-dir`, in a stopped server's store.
//!
//! Each takes `--host` (default `http://127.0.0.1:8181`, or `FORESTALL_HOST`) and `--token`
//! (or `FORESTALL_TOKEN`). A server that cannot be reached or answers an error is a message
//! on stderr and exit status 1.

use std::io::{BufRead, Read, Write};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use serde_json::Value;

/// Where the server is, and the token to show it.
#[derive(Debug, Clone)]
pub struct Client {
    host: String,
    agent: ureq::Agent,
    /// Sent as `Authorization: Bearer` when set.
    token: Option<String>,
}

/// A batch of a write: at most this many bytes of whole lines (the server's body limit is
/// 32 MiB by default).
pub const WRITE_BATCH_BYTES: usize = 4 << 20;

impl Client {
    pub fn new(host: &str, token: Option<&str>) -> Self {
        Self {
            token: token.map(str::to_string).filter(|t| !t.is_empty()),
            host: host.trim_end_matches('/').to_string(),
            agent: ureq::AgentBuilder::new()
                .timeout_connect(Duration::from_secs(10))
                .user_agent(concat!("forestall-cli/", env!("CARGO_PKG_VERSION")))
                .build(),
        }
    }

    /// The same client, trusting only the CA certificates in the PEM file `ca` for HTTPS
    /// (as `curl --cacert`), for servers whose certificate no public CA signed.
    pub fn trusting(mut self, ca: &std::path::Path) -> anyhow::Result<Self> {
        use rustls_pki_types::CertificateDer;
        use rustls_pki_types::pem::PemObject;
        use tokio_rustls::rustls;
        let mut roots = rustls::RootCertStore::empty();
        let certs = CertificateDer::pem_file_iter(ca)
            .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
            .with_context(|| format!("read the CA certificates in {}", ca.display()))?;
        let (added, _) = roots.add_parsable_certificates(certs);
        if added == 0 {
            anyhow::bail!("{} holds no usable PEM certificate", ca.display());
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .context("TLS protocol versions")?
            .with_root_certificates(roots)
            .with_no_client_auth();
        self.agent = ureq::AgentBuilder::new()
            .timeout_connect(Duration::from_secs(10))
            .user_agent(concat!("forestall-cli/", env!("CARGO_PKG_VERSION")))
            .tls_config(Arc::new(tls))
            .build();
        Ok(self)
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.host)
    }

    /// A request to `path`, with the token.
    fn request(&self, method: &str, path: &str) -> ureq::Request {
        let request = self.agent.request(method, &self.url(path));
        match &self.token {
            Some(t) => request.set("Authorization", &format!("Bearer {t}")),
            None => request,
        }
    }

    /// The server's error for a failed request: its `error` message when it sent one.
    fn failed(&self, path: &str, e: ureq::Error) -> anyhow::Error {
        match e {
            ureq::Error::Status(code, response) => {
                let body = response.into_string().unwrap_or_default();
                let message = serde_json::from_str::<Value>(&body)
                    .ok()
                    .and_then(|v| v["error"].as_str().map(str::to_string))
                    .unwrap_or(body);
                let hint = match (code, &self.token) {
                    (401, None) => " (give a token: --token or FORESTALL_TOKEN)",
                    _ => "",
                };
                anyhow::anyhow!(
                    "{} answered {code}: {}{hint}",
                    self.url(path),
                    message.trim()
                )
            }
            ureq::Error::Transport(t) => anyhow::anyhow!(
                "cannot reach Forestall at {} ({t}); is `forestall serve` running there? (--host)",
                self.host
            ),
        }
    }

    fn get_json(&self, path: &str) -> anyhow::Result<Value> {
        let response = self
            .request("GET", path)
            .call()
            .map_err(|e| self.failed(path, e))?;
        serde_json::from_reader(response.into_reader())
            .with_context(|| format!("{} did not answer JSON", self.url(path)))
    }

    /// `POST /api/v1/tokens`: the new token, with its secret.
    pub fn create_token(&self, spec: &crate::auth::TokenSpec) -> anyhow::Result<Value> {
        let path = "/api/v1/tokens";
        let response = self
            .request("POST", path)
            .set("Content-Type", "application/json")
            .send_string(&serde_json::to_string(spec)?)
            .map_err(|e| self.failed(path, e))?;
        serde_json::from_reader(response.into_reader())
            .with_context(|| format!("{} did not answer JSON", self.url(path)))
    }

    /// `GET /api/v1/tokens`: every token, without secrets.
    pub fn tokens(&self) -> anyhow::Result<Value> {
        Ok(self.get_json("/api/v1/tokens")?["tokens"].take())
    }

    /// `DELETE /api/v1/tokens/{name}`.
    pub fn revoke_token(&self, name: &str) -> anyhow::Result<()> {
        let path = format!("/api/v1/tokens/{name}");
        self.request("DELETE", &path)
            .call()
            .map_err(|e| self.failed(&path, e))?;
        Ok(())
    }

    /// Runs `sql` and copies the answer, in `format`, to `out` as it streams in.
    pub fn query(&self, sql: &str, format: &str, out: &mut impl Write) -> anyhow::Result<()> {
        let path = "/api/v3/query_sql";
        let response = self
            .request("POST", path)
            .set("Content-Type", "application/json")
            .send_string(&serde_json::json!({ "q": sql, "format": format }).to_string())
            .map_err(|e| self.failed(path, e))?;
        std::io::copy(&mut response.into_reader(), out).context(
            "the answer was cut off (the query failed after it started; see the server log)",
        )?;
        out.flush()?;
        Ok(())
    }

    /// Writes the line protocol read from `input` in batches of whole lines. Returns the
    /// lines stored and the errors, each with its line number in the input; `progress` is
    /// told the bytes sent so far.
    pub fn write(
        &self,
        input: impl Read,
        precision: &str,
        mut progress: impl FnMut(u64),
    ) -> anyhow::Result<Written> {
        let path = format!("/api/v2/write?precision={precision}");
        let mut reader = std::io::BufReader::with_capacity(1 << 20, input);
        let mut written = Written::default();
        let (mut batch, mut line) = (Vec::new(), Vec::new());
        // The input's number of the batch's first line, and the lines in the batch.
        let (mut first_line, mut lines, mut sent) = (1usize, 0usize, 0u64);
        loop {
            line.clear();
            let n = reader
                .read_until(b'\n', &mut line)
                .context("read the input")?;
            let full = !batch.is_empty() && batch.len() + line.len() > WRITE_BATCH_BYTES;
            if n == 0 || full {
                self.send_batch(&path, &batch, first_line, &mut written)?;
                sent += batch.len() as u64;
                progress(sent);
                first_line += lines;
                (lines, batch) = (0, Vec::new());
            }
            if n == 0 {
                return Ok(written);
            }
            batch.extend_from_slice(&line);
            if !line.ends_with(b"\n") {
                batch.push(b'\n');
            }
            lines += 1;
        }
    }

    fn send_batch(
        &self,
        path: &str,
        batch: &[u8],
        first_line: usize,
        written: &mut Written,
    ) -> anyhow::Result<()> {
        // Blank lines and comments are not points.
        let lines = batch
            .split(|&b| b == b'\n')
            .filter(|l| !l.trim_ascii().is_empty() && !l.trim_ascii_start().starts_with(b"#"))
            .count();
        if lines == 0 {
            return Ok(());
        }
        match self.request("POST", path).send_bytes(batch) {
            Ok(_) => {
                written.lines += lines;
                Ok(())
            }
            Err(ureq::Error::Status(400, response)) => {
                let body: Value =
                    serde_json::from_reader(response.into_reader()).unwrap_or_default();
                let errors = body["line_errors"].as_array().cloned().unwrap_or_default();
                if errors.is_empty() {
                    bail!(
                        "{} answered 400: {}",
                        self.url(path),
                        body["error"].as_str().unwrap_or("no reason given")
                    );
                }
                let count = |k: &str| body[k].as_u64().map(|n| n as usize);
                written.rejected += count("rejected_lines").unwrap_or(errors.len());
                written.lines +=
                    count("accepted_lines").unwrap_or_else(|| lines.saturating_sub(errors.len()));
                for e in errors {
                    let line = e["line"].as_u64().unwrap_or(0) as usize;
                    written.errors.push(LineError {
                        line: line + first_line - 1,
                        error: e["error"].as_str().unwrap_or("").to_string(),
                    });
                }
                Ok(())
            }
            Err(e) => Err(self.failed(path, e)),
        }
    }

    /// What `forestall status` prints.
    pub fn status(&self) -> anyhow::Result<String> {
        let health = self.get_json("/health")?;
        let mut out = String::new();
        let line = |out: &mut String, k: &str, v: String| {
            out.push_str(&format!("{k:<20} {v}\n"));
        };
        line(&mut out, "server", self.host.clone());
        line(
            &mut out,
            "health",
            health["status"].as_str().unwrap_or("?").to_string(),
        );
        if let Some(v) = health["version"].as_str() {
            line(&mut out, "version", v.to_string());
        }
        let metrics = self.metrics()?;
        let m = |name: &str| metrics.get(name).copied().unwrap_or(0.0);
        line(
            &mut out,
            "written",
            format!(
                "{} points, {} values",
                m("forestall_points_written_total"),
                m("forestall_values_written_total")
            ),
        );
        line(
            &mut out,
            "segments",
            format!(
                "{} ({:.1} MiB)",
                m("forestall_segments"),
                m("forestall_segment_bytes") / (1 << 20) as f64
            ),
        );
        let tables: Vec<Value> = serde_json::from_value(self.get_json(&format!(
            "/api/v3/query_sql?format=json&q={}",
            url_encode(
                "SELECT table_name FROM information_schema.tables WHERE table_schema = 'public' ORDER BY table_name"
            )
        ))?)
        .unwrap_or_default();
        let names: Vec<&str> = tables
            .iter()
            .filter_map(|t| t["table_name"].as_str())
            .collect();
        line(
            &mut out,
            "measurements",
            match names.len() {
                0 => "none".into(),
                n if n <= 8 => format!("{n}: {}", names.join(", ")),
                n => format!("{n}: {}, …", names[..8].join(", ")),
            },
        );
        let cqs: Vec<Value> = serde_json::from_value(self.get_json(&format!(
            "/api/v3/query_sql?format=json&q={}",
            url_encode("SELECT name, last_error FROM system.continuous_queries ORDER BY name")
        ))?)
        .unwrap_or_default();
        let failing: Vec<String> = cqs
            .iter()
            .filter_map(|q| {
                let e = q["last_error"].as_str().filter(|e| !e.is_empty())?;
                Some(format!("{} ({e})", q["name"].as_str().unwrap_or("?")))
            })
            .collect();
        line(
            &mut out,
            "continuous queries",
            tally(cqs.len(), &failing, "failing"),
        );
        let targets = self.get_json("/api/v1/targets")?;
        let targets = targets["data"]["activeTargets"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        if !targets.is_empty() {
            let down: Vec<String> = targets
                .iter()
                .filter(|t| t["health"] == "down")
                .map(|t| {
                    format!(
                        "{} ({})",
                        t["scrapeUrl"].as_str().unwrap_or("?"),
                        t["lastError"].as_str().unwrap_or("?")
                    )
                })
                .collect();
            line(
                &mut out,
                "scrape targets",
                tally(targets.len(), &down, "down"),
            );
        }
        let allocation = match self.get_json("/api/v1/allocations") {
            Ok(a) => format!(
                "{} components, {}",
                a["components"].as_array().map_or(0, Vec::len),
                a["mode"].as_str().unwrap_or("?")
            ),
            Err(_) => "off".into(),
        };
        line(&mut out, "allocation loop", allocation);
        Ok(out)
    }

    /// The server's `/metrics`, name (without labels) → value.
    fn metrics(&self) -> anyhow::Result<std::collections::BTreeMap<String, f64>> {
        let text = self
            .agent
            .get(&self.url("/metrics"))
            .call()
            .map_err(|e| self.failed("/metrics", e))?
            .into_string()?;
        Ok(text
            .lines()
            .filter(|l| !l.starts_with('#'))
            .filter_map(|l| {
                let (name, value) = l.rsplit_once(' ')?;
                Some((name.to_string(), value.parse().ok()?))
            })
            .collect())
    }
}

/// What a write stored and refused.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Written {
    pub lines: usize,
    pub rejected: usize,
    pub errors: Vec<LineError>,
}

/// A refused line, numbered in the whole input.
#[derive(Debug, Clone, PartialEq)]
pub struct LineError {
    pub line: usize,
    pub error: String,
}

/// "3, none down" or "3, down: a (why); b (why)".
fn tally(all: usize, bad: &[String], what: &str) -> String {
    match bad.len() {
        0 => format!("{all}, none {what}"),
        _ => format!("{all}, {what}: {}", bad.join("; ")),
    }
}

fn url_encode(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                out.push(b as char)
            }
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

/// A progress bar on stderr for `len` units (bytes when `bytes`), drawn only when stderr is
/// a terminal: piped or redirected, the commands stay quiet.
pub fn progress(len: Option<u64>, what: &str) -> indicatif::ProgressBar {
    let bar = match len {
        Some(n) => indicatif::ProgressBar::new(n),
        None => indicatif::ProgressBar::new_spinner(),
    };
    bar.set_draw_target(indicatif::ProgressDrawTarget::stderr());
    let template = match len {
        Some(_) => "{msg} [{bar:30}] {bytes}/{total_bytes} {elapsed} (eta {eta})",
        None => "{msg} {spinner} {bytes} {elapsed}",
    };
    if let Ok(style) = indicatif::ProgressStyle::with_template(template) {
        bar.set_style(style.progress_chars("=> "));
    }
    bar.set_message(what.to_string());
    bar
}

/// A spinner with the time elapsed on stderr, for a command whose length is not known,
/// drawn only when stderr is a terminal.
pub fn spinner(what: &str) -> indicatif::ProgressBar {
    let bar = progress(None, what);
    if let Ok(style) = indicatif::ProgressStyle::with_template("{msg} {spinner} {elapsed}") {
        bar.set_style(style);
    }
    bar.enable_steady_tick(Duration::from_millis(200));
    bar
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queries_are_url_encoded() {
        assert_eq!(url_encode("a b='c'&d"), "a%20b%3D%27c%27%26d");
    }
}
