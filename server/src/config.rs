//! Server configuration, layered: defaults < TOML file < `FORESTALL__SECTION__KEY` environment
//! variables < command-line flags.
//!
//! Every section is documented in `docs/forestall.example.toml`, which a test parses.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use forestall_engine::EngineConfig;
use serde::{Deserialize, Serialize};

/// Prefix of configuration environment variables; `__` separates sections and keys.
pub const ENV_PREFIX: &str = "FORESTALL__";

/// Errors while loading configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("parse config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("environment variable {var}: {message}")]
    Env { var: String, message: String },
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

/// `[http]`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HttpConfig {
    /// Listen address. Default `127.0.0.1:8181`.
    pub addr: SocketAddr,
    /// Largest request body accepted, before and after decompression. Default 32 MiB.
    pub max_body_bytes: u64,
    /// A request's head (line and headers) must arrive within this, and a keep-alive
    /// connection idle this long is closed. Default 30 s.
    #[serde(with = "humantime_serde")]
    pub header_read_timeout: std::time::Duration,
    /// A request's body must arrive within this of its head, or the request gets 408 and
    /// the connection closes. Default 60 s.
    #[serde(with = "humantime_serde")]
    pub body_read_timeout: std::time::Duration,
    /// Connections open at once; one more gets 503 with `Retry-After` and is closed.
    /// Default (unset): half the open-file limit after 1,024 for the store, 64 to 10,000.
    pub max_connections: Option<usize>,
}

impl Default for HttpConfig {
    fn default() -> Self {
        Self {
            addr: SocketAddr::from(([127, 0, 0, 1], 8181)),
            max_body_bytes: 32 << 20,
            header_read_timeout: std::time::Duration::from_secs(30),
            body_read_timeout: std::time::Duration::from_secs(60),
            max_connections: None,
        }
    }
}

/// `[pg]`: the PostgreSQL wire protocol.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PgConfig {
    /// Serve the Postgres protocol. Default true.
    pub enabled: bool,
    /// Listen address. Default `127.0.0.1:5433`. With `[auth]` on, clients send a token as
    /// their password.
    pub addr: SocketAddr,
    /// Connections open at once; one more gets SQLSTATE 53300. Default (unset): as
    /// `[http] max_connections`.
    pub max_connections: Option<usize>,
}

impl Default for PgConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            addr: SocketAddr::from(([127, 0, 0, 1], 5433)),
            max_connections: None,
        }
    }
}

/// `[tls]`: a certificate for both listeners. With it, the HTTP port speaks HTTPS only,
/// and the PostgreSQL port takes TLS when a client asks (and passwords only then).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM file of the server's certificate, followed by its chain.
    pub cert: Option<PathBuf>,
    /// PEM file of its private key (PKCS#8, PKCS#1 or SEC1).
    pub key: Option<PathBuf>,
}

impl TlsConfig {
    /// The certificate and key files, when TLS is on.
    pub fn files(&self) -> Result<Option<(&Path, &Path)>, ConfigError> {
        match (&self.cert, &self.key) {
            (Some(cert), Some(key)) => Ok(Some((cert, key))),
            (None, None) => Ok(None),
            _ => Err(ConfigError::Invalid(
                "[tls] needs both cert and key (PEM files), or neither".into(),
            )),
        }
    }
}

/// `[log]`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogConfig {
    /// A `tracing` filter (`info`, `forestall_engine=debug,info`). `RUST_LOG` overrides it.
    pub filter: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            filter: "info".into(),
        }
    }
}

/// `[query]`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct QueryConfig {
    /// A SQL query running longer than this is stopped. Default 60 s.
    #[serde(with = "humantime_serde")]
    pub timeout: std::time::Duration,
    /// A result with more rows than this is refused (add a LIMIT). Default 1,000,000.
    pub max_result_rows: usize,
    /// Niceness (0–19) of the threads queries run on: above 0, ingestion wins the CPU when
    /// both want it. Default 10.
    pub nice: i32,
    /// SQL queries that run at once, over HTTP and PostgreSQL together; more wait for a
    /// turn. Default (unset): twice the cores, at least 4, and at most one per 256 MiB of
    /// the memory the process may use ([`default_max_concurrent`]).
    pub max_concurrent: Option<usize>,
    /// How long a query waits for a turn before it is refused (HTTP 503 with
    /// `Retry-After`, PostgreSQL SQLSTATE 53000). Default 10 s.
    #[serde(with = "humantime_serde")]
    pub queue_timeout: std::time::Duration,
    /// Bytes of memory one query (one PostgreSQL connection's queries) may hold for sorts,
    /// aggregations and joins: a sort past it spills to disk, anything else fails with an
    /// error (HTTP 400, SQLSTATE 53200) instead of running the process out of memory.
    /// Default (unset): a quarter of the memory the process may use ([`usable_memory`]: the
    /// host's, or its memory cgroup's limit if lower) shared among `max_concurrent` queries,
    /// at least 32 MiB. (A quarter, not more: a query's operators hold memory the pool does
    /// not count, such as batches in flight; measured in docs/RELIABILITY.md.)
    pub memory_limit: Option<u64>,
}

impl QueryConfig {
    /// [`QueryConfig::max_concurrent`], or its default for this machine.
    pub fn max_concurrent(&self) -> usize {
        self.max_concurrent.unwrap_or_else(|| {
            let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
            default_max_concurrent(cores, usable_memory())
        })
    }

    /// [`QueryConfig::memory_limit`], or its default for this machine.
    pub fn memory_limit(&self) -> u64 {
        self.memory_limit.unwrap_or_else(|| {
            let share = usable_memory() / 4 / self.max_concurrent().max(1) as u64;
            share.max(32 << 20)
        })
    }
}

/// Queries at once when not configured: two per core (at least four), but no more than one
/// per 256 MiB of the memory this process may use (at least one). A heavy query holds more
/// than its pool counts (batches in flight, allocator slack): under a 512 MiB cgroup, four at
/// once beside full-speed ingest were OOM-killed, two held (docs/RELIABILITY.md).
pub fn default_max_concurrent(cores: usize, usable: u64) -> usize {
    let by_memory = usize::try_from(usable / (256 << 20)).unwrap_or(usize::MAX);
    (2 * cores).max(4).min(by_memory.max(1))
}

/// The write buffer's flush threshold when none is configured: the engine's default, or a
/// sixteenth of the memory this process may use if that is less (at least 4 MiB). Writes
/// wait at twice it, and a flush holds another buffer's worth while it writes, so the buffer
/// stays within an eighth or so.
pub fn default_max_buffer_bytes(engine_default: u64, usable: u64) -> u64 {
    engine_default.min((usable / 16).max(4 << 20))
}

/// The memory this process may use: the host's (`MemTotal`), or less if its memory cgroup
/// or one above it has a lower limit (v2 `memory.max` along the path; v1
/// `hierarchical_memory_limit`, which already takes the ancestors into account).
pub fn usable_memory() -> u64 {
    let host = forestall_control::config::host_memory().unwrap_or(u64::MAX);
    let cgroup = std::fs::read_to_string("/proc/self/cgroup")
        .ok()
        .and_then(|t| cgroup_memory_limit(&t, Path::new("/sys/fs/cgroup")))
        .unwrap_or(u64::MAX);
    host.min(cgroup)
}

/// The memory limit over the cgroup that `proc_self_cgroup` (the text of
/// `/proc/self/cgroup`) names, with cgroupfs mounted at `root`; `None` without one.
fn cgroup_memory_limit(proc_self_cgroup: &str, root: &Path) -> Option<u64> {
    let read = |p: PathBuf| std::fs::read_to_string(p).ok();
    // v1: a line `N:…memory…:/path`.
    let v1 = proc_self_cgroup.lines().find_map(|l| {
        let mut parts = l.splitn(3, ':');
        let (_, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
        controllers
            .split(',')
            .any(|c| c == "memory")
            .then(|| path.trim().trim_start_matches('/').to_owned())
    });
    if let Some(path) = v1 {
        let stat = read(root.join("memory").join(path).join("memory.stat"))?;
        return stat.lines().find_map(|l| {
            l.strip_prefix("hierarchical_memory_limit ")?
                .trim()
                .parse()
                .ok()
        });
    }
    // v2: the unified line `0::/path`; the lowest memory.max from it up to the root.
    let path = proc_self_cgroup
        .lines()
        .find_map(|l| l.strip_prefix("0::"))?
        .trim()
        .trim_start_matches('/');
    let mut dir = root.join(path);
    let mut lowest = None::<u64>;
    while dir.starts_with(root) {
        if let Some(max) = read(dir.join("memory.max")).and_then(|m| m.trim().parse().ok()) {
            lowest = Some(lowest.map_or(max, |l: u64| l.min(max)));
        }
        if !dir.pop() {
            break;
        }
    }
    lowest
}

impl Default for QueryConfig {
    fn default() -> Self {
        Self {
            timeout: std::time::Duration::from_secs(60),
            max_result_rows: 1_000_000,
            nice: 10,
            max_concurrent: None,
            queue_timeout: std::time::Duration::from_secs(10),
            memory_limit: None,
        }
    }
}

/// `[collector]`: the host's own metrics, written every `interval` through the normal write
/// path, with Telegraf's measurement and field names (see [`crate::collector`]).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CollectorConfig {
    /// Collect. Default true.
    pub enabled: bool,
    /// Between collections, aligned to multiples of it. Default 10 s (1 s to 1 h).
    #[serde(with = "humantime_serde")]
    pub interval: std::time::Duration,
    /// A `cpu` row per core besides `cpu-total`, as Telegraf's `percpu`. Default true.
    pub per_cpu: bool,
    /// Where cgroup controllers are mounted. Default `/sys/fs/cgroup`.
    pub cgroup_root: PathBuf,
    /// The cgroup whose children are metered into `cgroup` (`/` for the top-level ones,
    /// `system.slice` for systemd's services); empty for none. Default `/`.
    pub cgroup_parent: String,
    /// Built-in `HEALTH` continuous queries over what the collector writes: the host's CPU,
    /// memory and filesystems (see [`crate::collector::builtin_queries`]). Default true.
    pub health: bool,
}

impl Default for CollectorConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            interval: std::time::Duration::from_secs(10),
            per_cpu: true,
            cgroup_root: PathBuf::from("/sys/fs/cgroup"),
            cgroup_parent: "/".into(),
            health: true,
        }
    }
}

impl CollectorConfig {
    /// Checks the section.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let secs = self.interval.as_secs_f64();
        if !(1.0..=3600.0).contains(&secs) {
            return Err(ConfigError::Invalid(format!(
                "collector.interval must be within 1s..=1h, not {}",
                humantime::format_duration(self.interval)
            )));
        }
        let parent = self.cgroup_parent.trim_matches('/');
        if parent
            .split('/')
            .any(|p| p == "." || p == ".." || (p.is_empty() && !parent.is_empty()))
        {
            return Err(ConfigError::Invalid(format!(
                "collector.cgroup_parent {:?} must be a cgroup path without empty, `.` or `..` parts",
                self.cgroup_parent
            )));
        }
        Ok(())
    }
}

/// `[[scrape]]`: a job of Prometheus targets Forestall scrapes itself (see
/// [`crate::scrape`]), with Prometheus' meaning for every setting.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ScrapeConfig {
    /// The `job` label of every series scraped. Required.
    pub job: String,
    /// `host:port` (or `http://host:port`) of each target; its `instance` label.
    pub targets: Vec<String>,
    /// Between scrapes of a target. Default 15 s (1 s to 1 h).
    #[serde(with = "humantime_serde")]
    pub interval: std::time::Duration,
    /// A scrape that takes longer fails. Default 10 s, at most `interval`.
    #[serde(with = "humantime_serde")]
    pub timeout: std::time::Duration,
    /// Default `/metrics`.
    pub metrics_path: String,
    /// Labels added to every series of the job (a scraped label of the same name is kept as
    /// `exported_<name>`, as Prometheus does with `honor_labels = false`).
    pub labels: BTreeMap<String, String>,
    /// Use the timestamps the exposition gives (else the scrape's). Default true.
    pub honor_timestamps: bool,
    /// More samples than this fail the scrape (0: no limit, Prometheus' default).
    pub sample_limit: usize,
    /// A larger body fails the scrape. Default 64 MiB.
    pub body_size_limit: u64,
}

impl Default for ScrapeConfig {
    fn default() -> Self {
        Self {
            job: String::new(),
            targets: Vec::new(),
            interval: std::time::Duration::from_secs(15),
            timeout: std::time::Duration::from_secs(10),
            metrics_path: "/metrics".into(),
            labels: BTreeMap::new(),
            honor_timestamps: true,
            sample_limit: 0,
            body_size_limit: 64 << 20,
        }
    }
}

impl ScrapeConfig {
    /// Checks one `[[scrape]]` job.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |what: String| {
            Err(ConfigError::Invalid(format!(
                "scrape job {:?}: {what}",
                self.job
            )))
        };
        if self.job.is_empty() {
            return Err(ConfigError::Invalid(
                "every [[scrape]] names its job".into(),
            ));
        }
        if self.targets.is_empty() {
            return bad("lists no targets".into());
        }
        let secs = self.interval.as_secs_f64();
        if !(1.0..=3600.0).contains(&secs) {
            return bad(format!(
                "interval must be within 1s..=1h, not {}",
                humantime::format_duration(self.interval)
            ));
        }
        if self.timeout.is_zero() || self.timeout > self.interval {
            return bad(format!(
                "timeout must be above zero and at most the interval ({}), not {}",
                humantime::format_duration(self.interval),
                humantime::format_duration(self.timeout)
            ));
        }
        if !self.metrics_path.starts_with('/') {
            return bad(format!(
                "metrics_path {:?} must start with /",
                self.metrics_path
            ));
        }
        if self.body_size_limit == 0 {
            return bad("body_size_limit must be above zero".into());
        }
        for t in &self.targets {
            if let Err(why) = crate::scrape::target_url(t, &self.metrics_path) {
                return bad(why);
            }
        }
        for (k, v) in &self.labels {
            let name_ok = k
                .chars()
                .next()
                .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
                && k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
            if !name_ok || k.starts_with("__") || matches!(k.as_str(), "job" | "instance") {
                return bad(format!(
                    "{k:?} cannot be a label here (a label name, not job, instance or __*)"
                ));
            }
            if v.contains(['\n', '\r']) {
                return bad(format!("the value of label {k} has a line break"));
            }
        }
        Ok(())
    }
}

/// The whole configuration.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServerConfig {
    pub http: HttpConfig,
    pub pg: PgConfig,
    pub query: QueryConfig,
    pub log: LogConfig,
    pub engine: EngineConfig,
    pub allocation: forestall_control::config::AllocationConfig,
    pub collector: CollectorConfig,
    /// `[[continuous_queries]]`: queries declared here are created at start, replaced when
    /// changed, and dropped when no longer declared (those made over the API are kept).
    pub continuous_queries: Vec<forestall_query::continuous::DefinitionSpec>,
    /// `[[scrape]]`: Prometheus targets to scrape.
    pub scrape: Vec<ScrapeConfig>,
    pub auth: AuthConfig,
    pub tls: TlsConfig,
}

/// `[auth]`: whether requests need a token (see [`crate::auth`]).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuthConfig {
    /// `true`: every endpoint but `/health` needs a token; `false`: none does, wherever
    /// the server listens (`serve --without-auth`). Unset (the default): off on loopback,
    /// and a server listening anywhere else refuses to start until it is set.
    pub enabled: Option<bool>,
}

/// Values given on the command line; they win over everything else.
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    pub data_dir: Option<PathBuf>,
    pub http_addr: Option<SocketAddr>,
    pub pg_addr: Option<SocketAddr>,
    /// `serve --auth` (`Some(true)`) or `--without-auth` (`Some(false)`).
    pub auth: Option<bool>,
}

impl ServerConfig {
    /// Whether requests need a token: `[auth] enabled` when set; otherwise off, which is
    /// refused unless every address the server listens on is loopback.
    pub fn auth_enabled(&self) -> Result<bool, ConfigError> {
        if let Some(enabled) = self.auth.enabled {
            return Ok(enabled);
        }
        let mut exposed = Vec::new();
        if !self.http.addr.ip().is_loopback() {
            exposed.push(format!("HTTP on {}", self.http.addr));
        }
        if self.pg.enabled && !self.pg.addr.ip().is_loopback() {
            exposed.push(format!("PostgreSQL on {}", self.pg.addr));
        }
        if exposed.is_empty() {
            return Ok(false);
        }
        Err(ConfigError::Invalid(format!(
            "Forestall would listen for {} without authentication: anyone who reaches it could \
             read and write every series and steer allocations. Start it with --auth (or \
             [auth] enabled = true) and create the first token with `forestall token create \
             --admin`, or accept the risk with --without-auth",
            exposed.join(" and ")
        )))
    }

    /// Loads the layers: defaults, then `file` (if any), then the environment `env` (pass
    /// `std::env::vars()`), then `overrides`; and validates the result.
    pub fn load(
        file: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
        overrides: &Overrides,
    ) -> Result<Self, ConfigError> {
        let mut table = match file {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                    path: path.to_path_buf(),
                    source,
                })?;
                toml::from_str::<toml::Table>(&text).map_err(|e| ConfigError::Parse {
                    path: path.to_path_buf(),
                    message: e.to_string(),
                })?
            }
            None => toml::Table::new(),
        };
        let mut vars: Vec<(String, String)> = env
            .into_iter()
            .filter(|(k, _)| k.starts_with(ENV_PREFIX))
            .collect();
        vars.sort();
        for (var, raw) in vars {
            let path: Vec<String> = var[ENV_PREFIX.len()..]
                .split("__")
                .map(|s| s.to_ascii_lowercase())
                .collect();
            if path.iter().any(|p| p.is_empty()) {
                return Err(ConfigError::Env {
                    var,
                    message: "empty section or key".into(),
                });
            }
            set_path(&mut table, &path, env_value(&raw)).map_err(|message| ConfigError::Env {
                var: var.clone(),
                message,
            })?;
        }
        let buffer_set = table
            .get("engine")
            .and_then(|t| t.get("flush"))
            .and_then(|t| t.get("max_buffer_bytes"))
            .is_some();
        let mut config: ServerConfig =
            table
                .try_into()
                .map_err(|e: toml::de::Error| ConfigError::Parse {
                    path: file
                        .map(Path::to_path_buf)
                        .unwrap_or_else(|| "<environment>".into()),
                    message: e.to_string(),
                })?;
        // Derived defaults: the write buffer fits the memory this process may use.
        if !buffer_set {
            config.engine.flush.max_buffer_bytes =
                default_max_buffer_bytes(config.engine.flush.max_buffer_bytes, usable_memory());
        }
        if let Some(dir) = &overrides.data_dir {
            config.engine.data_dir = dir.clone();
        }
        if let Some(addr) = overrides.http_addr {
            config.http.addr = addr;
        }
        if let Some(addr) = overrides.pg_addr {
            config.pg.addr = addr;
        }
        if let Some(auth) = overrides.auth {
            config.auth.enabled = Some(auth);
        }
        config.validate()?;
        Ok(config)
    }

    /// Checks the whole configuration.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if !(0..=19).contains(&self.query.nice) {
            return Err(ConfigError::Invalid(
                "query.nice must be within 0..=19".into(),
            ));
        }
        if self.query.timeout.is_zero()
            || self.query.max_result_rows == 0
            || self.query.max_concurrent == Some(0)
        {
            return Err(ConfigError::Invalid(
                "query.timeout, query.max_result_rows and query.max_concurrent must be positive"
                    .into(),
            ));
        }
        if self.http.max_body_bytes < 1024 {
            return Err(ConfigError::Invalid(
                "http.max_body_bytes must be at least 1024".into(),
            ));
        }
        if self.http.header_read_timeout.is_zero()
            || self.http.body_read_timeout.is_zero()
            || self.http.max_connections == Some(0)
            || self.pg.max_connections == Some(0)
            || self.query.memory_limit.is_some_and(|b| b < 1 << 20)
        {
            return Err(ConfigError::Invalid(
                "http.header_read_timeout, http.body_read_timeout and the max_connections must \
                 be positive, and query.memory_limit at least 1 MiB"
                    .into(),
            ));
        }
        self.tls.files()?;
        self.engine
            .validate()
            .map_err(|e| ConfigError::Invalid(e.to_string()))?;
        self.collector.validate()?;
        self.auth_enabled()?;
        let mut jobs = BTreeSet::new();
        for job in &self.scrape {
            job.validate()?;
            if !jobs.insert(job.job.as_str()) {
                return Err(ConfigError::Invalid(format!(
                    "two [[scrape]] jobs are named {:?}",
                    job.job
                )));
            }
        }
        self.allocation
            .validate()
            .map_err(|e| ConfigError::Invalid(format!("{e:#}")))
    }
}

/// An environment value as TOML when it parses as a TOML value (`100`, `true`, `"x"`,
/// `[1, 2]`), otherwise as a plain string (`10s`, `127.0.0.1:8181`).
fn env_value(raw: &str) -> toml::Value {
    match toml::from_str::<toml::Table>(&format!("v = {raw}")) {
        Ok(mut t) => t
            .remove("v")
            .unwrap_or_else(|| toml::Value::String(raw.to_string())),
        Err(_) => toml::Value::String(raw.to_string()),
    }
}

fn set_path(table: &mut toml::Table, path: &[String], value: toml::Value) -> Result<(), String> {
    let (last, parents) = path.split_last().ok_or("empty name")?;
    let mut cur = table;
    for p in parents {
        let entry = cur
            .entry(p.clone())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        cur = entry
            .as_table_mut()
            .ok_or_else(|| format!("{p:?} is not a section"))?;
    }
    cur.insert(last.clone(), value);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn the_memory_limit_comes_from_the_cgroup_v1_or_v2_and_its_ancestors() {
        let root = tempfile::tempdir().unwrap();
        let r = root.path();
        // v1: hierarchical_memory_limit already counts the ancestors.
        std::fs::create_dir_all(r.join("memory/a/b")).unwrap();
        std::fs::write(
            r.join("memory/a/b/memory.stat"),
            "cache 0\nhierarchical_memory_limit 536870912\n",
        )
        .unwrap();
        let v1 = "12:memory:/a/b\n11:cpu,cpuacct:/a/b\n";
        assert_eq!(cgroup_memory_limit(v1, r), Some(512 << 20));
        // v2: the lowest memory.max on the way up.
        std::fs::create_dir_all(r.join("x/y")).unwrap();
        std::fs::write(r.join("x/y/memory.max"), "max\n").unwrap();
        std::fs::write(r.join("x/memory.max"), "1073741824\n").unwrap();
        assert_eq!(cgroup_memory_limit("0::/x/y\n", r), Some(1 << 30));
        // No limit anywhere.
        assert_eq!(cgroup_memory_limit("0::/x/y/z\n", &r.join("none")), None);
        assert_eq!(cgroup_memory_limit("", r), None);
    }

    #[test]
    fn defaults_are_documented_values() {
        let c = ServerConfig::load(None, env(&[]), &Overrides::default()).unwrap();
        assert_eq!(c.http.addr.to_string(), "127.0.0.1:8181");
        assert_eq!(c.engine.data_dir, PathBuf::from("./forestall-data"));
        assert_eq!(c.engine.wal.sync, forestall_engine::SyncPolicy::Always);
        assert!(
            c.collector.enabled,
            "the host collector is on out of the box"
        );
        assert_eq!(c.collector.interval, Duration::from_secs(10));
    }

    #[test]
    fn auth_is_required_off_loopback_unless_turned_off_on_purpose() {
        let load = |vars: &[(&str, &str)], auth: Option<bool>| {
            ServerConfig::load(
                None,
                env(vars),
                &Overrides {
                    auth,
                    ..Default::default()
                },
            )
        };
        // Loopback: off unless asked for.
        assert!(!load(&[], None).unwrap().auth_enabled().unwrap());
        assert!(load(&[], Some(true)).unwrap().auth_enabled().unwrap());
        // Any other address: refused, naming it and the two ways out...
        for (var, addr, what) in [
            (
                "FORESTALL__HTTP__ADDR",
                "0.0.0.0:8181",
                "HTTP on 0.0.0.0:8181",
            ),
            (
                "FORESTALL__PG__ADDR",
                "10.1.2.3:5433",
                "PostgreSQL on 10.1.2.3:5433",
            ),
        ] {
            let e = load(&[(var, addr)], None).unwrap_err().to_string();
            assert!(
                e.contains(what) && e.contains("--auth") && e.contains("--without-auth"),
                "{e}"
            );
            // ...which both work.
            assert!(
                load(&[(var, addr)], Some(true))
                    .unwrap()
                    .auth_enabled()
                    .unwrap()
            );
            assert!(
                !load(&[(var, addr)], Some(false))
                    .unwrap()
                    .auth_enabled()
                    .unwrap()
            );
            let on = load(&[(var, addr), ("FORESTALL__AUTH__ENABLED", "true")], None).unwrap();
            assert!(on.auth_enabled().unwrap());
        }
        // A pg address off loopback does not matter when pg is off.
        let c = load(
            &[
                ("FORESTALL__PG__ADDR", "0.0.0.0:5433"),
                ("FORESTALL__PG__ENABLED", "false"),
            ],
            None,
        );
        assert!(!c.unwrap().auth_enabled().unwrap());
    }

    #[test]
    fn layers_apply_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("c.toml");
        std::fs::write(
            &file,
            "[http]\naddr = \"127.0.0.1:9000\"\nmax_body_bytes = 2048\n[engine]\ndata_dir = \"/from/file\"\n[engine.flush]\ninterval = \"30s\"\n",
        )
        .unwrap();
        let c = ServerConfig::load(
            Some(&file),
            env(&[
                ("FORESTALL__HTTP__MAX_BODY_BYTES", "4096"),
                ("FORESTALL__ENGINE__DATA_DIR", "/from/env"),
                ("FORESTALL__ENGINE__WAL__SYNC", "interval"),
                ("UNRELATED", "x"),
            ]),
            &Overrides {
                data_dir: Some("/from/flag".into()),
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(c.http.addr.to_string(), "127.0.0.1:9000", "file");
        assert_eq!(c.http.max_body_bytes, 4096, "env over file");
        assert_eq!(
            c.engine.data_dir,
            PathBuf::from("/from/flag"),
            "flag over env over file"
        );
        assert_eq!(c.engine.flush.interval, Duration::from_secs(30));
        assert_eq!(c.engine.wal.sync, forestall_engine::SyncPolicy::Interval);
    }

    #[test]
    fn mistakes_are_reported_with_their_source() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("c.toml");
        std::fs::write(&file, "[http]\nadress = \"x\"\n").unwrap();
        let e = ServerConfig::load(Some(&file), env(&[]), &Overrides::default())
            .unwrap_err()
            .to_string();
        assert!(e.contains("c.toml") && e.contains("adress"), "{e}");
        let e = ServerConfig::load(
            None,
            env(&[("FORESTALL__ENGINE__WAL__SYNC", "sometimes")]),
            &Overrides::default(),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("sometimes"), "{e}");
        let e = ServerConfig::load(
            None,
            env(&[("FORESTALL__ENGINE__FLUSH__ZSTD_LEVEL", "99")]),
            &Overrides::default(),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("zstd_level"), "{e}");
        let e = ServerConfig::load(
            Some(Path::new("/nonexistent/f.toml")),
            env(&[]),
            &Overrides::default(),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("/nonexistent/f.toml"), "{e}");
    }

    #[test]
    fn the_example_config_parses_and_matches_the_defaults() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/forestall.example.toml");
        let c = ServerConfig::load(Some(&path), env(&[]), &Overrides::default()).unwrap();
        let d = ServerConfig::default();
        assert_eq!(toml::to_string(&c).unwrap(), toml::to_string(&d).unwrap());
    }

    #[test]
    fn tls_needs_a_cert_and_a_key_and_limits_must_be_positive() {
        let load = |vars: &[(&str, &str)]| {
            ServerConfig::load(None, env(vars), &Overrides::default()).map_err(|e| e.to_string())
        };
        let e = load(&[("FORESTALL__TLS__CERT", "/etc/cert.pem")]).unwrap_err();
        assert!(e.contains("both cert and key"), "{e}");
        let c = load(&[
            ("FORESTALL__TLS__CERT", "/etc/cert.pem"),
            ("FORESTALL__TLS__KEY", "/etc/key.pem"),
        ])
        .unwrap();
        assert!(c.tls.files().unwrap().is_some());
        for (var, value) in [
            ("FORESTALL__HTTP__HEADER_READ_TIMEOUT", "0s"),
            ("FORESTALL__HTTP__BODY_READ_TIMEOUT", "0s"),
            ("FORESTALL__HTTP__MAX_CONNECTIONS", "0"),
            ("FORESTALL__PG__MAX_CONNECTIONS", "0"),
            ("FORESTALL__QUERY__MEMORY_LIMIT", "1000"),
        ] {
            let e = load(&[(var, value)]).unwrap_err();
            assert!(e.contains("must"), "{var}={value}: {e}");
        }
        // Unset, a query's memory is a share of what the process may use, never nothing.
        let q = QueryConfig {
            max_concurrent: Some(4),
            ..Default::default()
        };
        assert!(q.memory_limit() >= 32 << 20);
        assert!(q.memory_limit() <= usable_memory() / 16 || q.memory_limit() == 32 << 20);
        let set = QueryConfig {
            memory_limit: Some(5 << 20),
            ..q
        };
        assert_eq!(set.memory_limit(), 5 << 20);
        assert_eq!(default_max_concurrent(2, 24 << 30), 4);
        assert_eq!(default_max_concurrent(16, 24 << 30), 32);
        assert_eq!(default_max_concurrent(2, 512 << 20), 2);
        assert_eq!(default_max_concurrent(2, 100 << 20), 1);
        // Unset, the write buffer fits the memory too; set, it is as set.
        assert_eq!(default_max_buffer_bytes(128 << 20, 24 << 30), 128 << 20);
        assert_eq!(default_max_buffer_bytes(128 << 20, 512 << 20), 32 << 20);
        assert_eq!(default_max_buffer_bytes(128 << 20, 16 << 20), 4 << 20);
        let loaded = load(&[]).unwrap();
        assert_eq!(
            loaded.engine.flush.max_buffer_bytes,
            default_max_buffer_bytes(128 << 20, usable_memory())
        );
        let loaded = load(&[("FORESTALL__ENGINE__FLUSH__MAX_BUFFER_BYTES", "2097152")]).unwrap();
        assert_eq!(loaded.engine.flush.max_buffer_bytes, 2 << 20);
    }

    #[test]
    fn scrape_jobs_take_prometheus_defaults_and_bad_ones_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("c.toml");
        let load = |text: &str| {
            std::fs::write(&file, text).unwrap();
            ServerConfig::load(Some(&file), env(&[]), &Overrides::default())
        };
        let c = load("[[scrape]]\njob = \"node\"\ntargets = [\"127.0.0.1:9100\"]\n").unwrap();
        let job = &c.scrape[0];
        assert_eq!(job.interval, std::time::Duration::from_secs(15));
        assert_eq!(job.timeout, std::time::Duration::from_secs(10));
        assert_eq!(job.metrics_path, "/metrics");
        assert!(job.honor_timestamps);
        for (text, why) in [
            ("[[scrape]]\ntargets = [\"a:1\"]", "names its job"),
            ("[[scrape]]\njob = \"j\"", "no targets"),
            (
                "[[scrape]]\njob = \"j\"\ntargets = [\"a\"]",
                "not host:port",
            ),
            (
                "[[scrape]]\njob = \"j\"\ntargets = [\"https://a:1\"]",
                "only http",
            ),
            (
                "[[scrape]]\njob = \"j\"\ntargets = [\"a:1\"]\ninterval = \"5s\"\ntimeout = \"6s\"",
                "at most the interval",
            ),
            (
                "[[scrape]]\njob = \"j\"\ntargets = [\"a:1\"]\ninterval = \"100ms\"",
                "1s..=1h",
            ),
            (
                "[[scrape]]\njob = \"j\"\ntargets = [\"a:1\"]\nmetrics_path = \"m\"",
                "start with /",
            ),
            (
                "[[scrape]]\njob = \"j\"\ntargets = [\"a:1\"]\nlabels = { job = \"x\" }",
                "cannot be a label",
            ),
            (
                "[[scrape]]\njob = \"j\"\ntargets = [\"a:1\"]\nlabels = { \"a-b\" = \"x\" }",
                "cannot be a label",
            ),
            (
                "[[scrape]]\njob = \"j\"\ntargets = [\"a:1\"]\nscheme = \"http\"",
                "unknown field",
            ),
            (
                "[[scrape]]\njob = \"j\"\ntargets = [\"a:1\"]\n[[scrape]]\njob = \"j\"\ntargets = [\"b:1\"]",
                "two [[scrape]] jobs",
            ),
        ] {
            let e = load(text).unwrap_err().to_string();
            assert!(e.contains(why), "{text}: {e}");
        }
    }

    #[test]
    fn the_allocation_section_is_checked_when_the_file_is_loaded() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("c.toml");
        std::fs::write(
            &file,
            "[allocation]\nenabled = true\n[[allocation.components]]\nname = \"a b\"\n",
        )
        .unwrap();
        let e = ServerConfig::load(Some(&file), env(&[]), &Overrides::default())
            .unwrap_err()
            .to_string();
        assert!(e.contains("\"a b\""), "{e}");
    }
}
