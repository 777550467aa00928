//! The `forestall` command.

use std::io::IsTerminal;
use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use forestall_server::config::{Overrides, ServerConfig};

#[derive(Debug, Parser)]
#[command(
    name = "forestall",
    version,
    about = "A time-series metric store that forecasts bottlenecks and acts before they happen"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the server (HTTP API, storage engine) until SIGTERM or Ctrl-C.
    Serve {
        /// TOML configuration file (see docs/forestall.example.toml).
        #[arg(long, value_name = "FILE", env = "FORESTALL_CONFIG")]
        config: Option<PathBuf>,
        /// Data directory [default: ./forestall-data].
        #[arg(long, value_name = "DIR")]
        data_dir: Option<PathBuf>,
        /// HTTP listen address [default: 127.0.0.1:8181].
        #[arg(long, value_name = "ADDR")]
        http_addr: Option<SocketAddr>,
        /// PostgreSQL wire protocol listen address [default: 127.0.0.1:5433].
        #[arg(long, value_name = "ADDR")]
        pg_addr: Option<SocketAddr>,
        /// Every endpoint but /health needs a token, on loopback too ([auth] enabled = true).
        #[arg(long, conflicts_with = "without_auth")]
        auth: bool,
        /// No endpoint needs a token, even when listening on an address other than loopback
        /// (which is refused without this or --auth).
        #[arg(long)]
        without_auth: bool,
    },
    /// Create, list or revoke tokens, on a running server (--host, --token) or in a stopped
    /// server's store (--data-dir).
    Token {
        #[command(subcommand)]
        what: TokenCommand,
    },
    /// Run SQL on a running server and print the answer.
    Query {
        /// The SQL.
        sql: String,
        /// json, jsonl, csv, pretty, parquet or arrow.
        #[arg(long, default_value = "pretty")]
        format: String,
        #[command(flatten)]
        host: Host,
    },
    /// Write line protocol from FILE (or stdin: `-`, the default) to a running server, in
    /// batches of whole lines. Refused lines are listed with their line numbers; the others
    /// are stored.
    Write {
        #[arg(default_value = "-")]
        file: PathBuf,
        /// The timestamps' unit: ns, us, ms or s.
        #[arg(long, default_value = "ns")]
        precision: String,
        #[command(flatten)]
        host: Host,
    },
    /// A running server's health, data, continuous queries, scrape targets and allocation
    /// loop at a glance.
    Status {
        #[command(flatten)]
        host: Host,
    },
    /// Evaluate the models on benchmark data.
    Eval {
        #[command(subcommand)]
        what: Eval,
    },
    /// Replay a usage trace (shared/data/alloc-dev layout) through Forestall's forecasters
    /// and allocation engine and through the baselines; print every figure and write
    /// Forestall's allocations to FILE.
    Replay {
        #[arg(long, value_name = "DIR")]
        trace: PathBuf,
        #[arg(long, value_name = "FILE")]
        out: PathBuf,
        /// Run the LSTM beside Forestall's other forecasters, one training step every N
        /// rounds (0: no LSTM).
        #[arg(long, value_name = "N", default_value_t = 0)]
        lstm_train_every: usize,
        /// Write the allocations of the run within the pool of meta.json (the contended
        /// case) instead of the unbounded one.
        #[arg(long)]
        contended: bool,
        /// Price headroom per component, as `allocation.headroom_price` does (0: off).
        #[arg(long, value_name = "PRICE", default_value_t = forestall_control::config::HEADROOM_PRICE)]
        headroom_price: f64,
        /// Release only after this many hours of requests well below the allocation, as
        /// `allocation.release_after` does.
        #[arg(long, value_name = "HOURS", default_value_t = 1.0)]
        release_hours: f64,
        /// Hold memory at its peak usage of this many hours, as `allocation.memory_hold` does
        /// (0: not held).
        #[arg(long, value_name = "HOURS", default_value_t = 24.0)]
        memory_hold_hours: f64,
        /// Leave the global LSTM out, as `allocation.global_lstm = false` does.
        #[arg(long)]
        no_global_lstm: bool,
    },
}

/// Where the server the client commands talk to is.
#[derive(Debug, clap::Args)]
struct Host {
    /// The server's HTTP address.
    #[arg(
        long = "host",
        env = "FORESTALL_HOST",
        default_value = "http://127.0.0.1:8181"
    )]
    url: String,
    /// The token to send (when the server's auth is on).
    #[arg(long, env = "FORESTALL_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// For an https:// host: trust only the CA certificates in this PEM file (the server's
    /// own certificate, when it is self-signed), instead of the public CAs.
    #[arg(long, env = "FORESTALL_CACERT")]
    cacert: Option<PathBuf>,
}

impl Host {
    fn client(&self) -> anyhow::Result<forestall_server::cli::Client> {
        let client = forestall_server::cli::Client::new(&self.url, self.token.as_deref());
        match &self.cacert {
            Some(ca) => client.trusting(ca),
            None => Ok(client),
        }
    }
}

#[derive(Debug, Subcommand)]
enum TokenCommand {
    /// Create a token and print its secret, once (only its hash is kept).
    Create {
        /// Its name, unique.
        #[arg(long)]
        name: String,
        /// Every permission, including managing tokens (the first token needs none:
        /// create it on the server's host, or with --data-dir).
        #[arg(long, conflicts_with = "permission")]
        admin: bool,
        /// write, write:<measurement>, query, admin or actuate (repeat for more).
        #[arg(long, value_name = "P", required_unless_present = "admin")]
        permission: Vec<String>,
        /// When it stops working: a duration from now (30d) or an RFC 3339 time.
        #[arg(long, value_name = "WHEN")]
        expires: Option<String>,
        #[command(flatten)]
        place: TokenPlace,
    },
    /// List the tokens (names, permissions, expiry; never secrets).
    List {
        #[command(flatten)]
        place: TokenPlace,
    },
    /// Revoke a token: requests with it are refused from now on.
    Revoke {
        name: String,
        #[command(flatten)]
        place: TokenPlace,
    },
}

/// A running server, or a stopped one's data directory.
#[derive(Debug, clap::Args)]
struct TokenPlace {
    #[command(flatten)]
    host: Host,
    /// Work on the store in DIR directly (its server must be stopped).
    #[arg(long, value_name = "DIR")]
    data_dir: Option<PathBuf>,
}

/// The tokens of a stopped server's store.
fn offline_tokens(dir: &std::path::Path) -> anyhow::Result<forestall_server::auth::Tokens> {
    let entries = forestall_engine::Entries::open_offline(dir).with_context(|| {
        format!(
            "open the store in {} (is its server still running?)",
            dir.display()
        )
    })?;
    Ok(forestall_server::auth::Tokens::load(entries)?)
}

fn token_command(what: TokenCommand) -> anyhow::Result<()> {
    use forestall_server::auth::TokenSpec;
    match what {
        TokenCommand::Create {
            name,
            admin,
            permission,
            expires,
            place,
        } => {
            let spec = TokenSpec {
                name,
                permissions: if admin { vec!["*".into()] } else { permission },
                expires,
            };
            let (secret, token) = match &place.data_dir {
                Some(dir) => {
                    let (secret, token) = offline_tokens(dir)?.create(&spec, false)?;
                    (secret, serde_json::to_value(&token)?)
                }
                None => {
                    let mut token = place.host.client()?.create_token(&spec)?;
                    let secret = token["token"].as_str().unwrap_or_default().to_string();
                    token["token"].take();
                    (secret, token)
                }
            };
            eprintln!(
                "token {} created with {}; keep its secret now, it is never shown again:",
                token["name"].as_str().unwrap_or("?"),
                token["permissions"]
            );
            println!("{secret}");
            Ok(())
        }
        TokenCommand::List { place } => {
            let tokens = match &place.data_dir {
                Some(dir) => serde_json::to_value(offline_tokens(dir)?.list())?,
                None => place.host.client()?.tokens()?,
            };
            println!(
                "{:<24} {:<32} {:<20} expires",
                "name", "permissions", "created"
            );
            for t in tokens.as_array().into_iter().flatten() {
                let time = |v: &serde_json::Value| {
                    v.as_i64()
                        .map(|ns| {
                            humantime::format_rfc3339_seconds(
                                std::time::UNIX_EPOCH
                                    + std::time::Duration::from_nanos(ns.max(0) as u64),
                            )
                            .to_string()
                        })
                        .unwrap_or_else(|| "never".into())
                };
                let permissions: Vec<&str> = t["permissions"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|p| p.as_str())
                    .collect();
                println!(
                    "{:<24} {:<32} {:<20} {}",
                    t["name"].as_str().unwrap_or("?"),
                    permissions.join(","),
                    time(&t["created"]),
                    time(&t["expires"])
                );
            }
            Ok(())
        }
        TokenCommand::Revoke { name, place } => {
            match &place.data_dir {
                Some(dir) => offline_tokens(dir)?.revoke(&name)?,
                None => place.host.client()?.revoke_token(&name)?,
            }
            eprintln!("token {name} revoked");
            Ok(())
        }
    }
}

#[derive(Debug, Subcommand)]
enum Eval {
    /// Score the streaming anomaly detector on a NAB-layout folder (data/<category>/<file>.csv,
    /// windows.json): writes OUT/<category>/<file>.csv and prints the NAB scores.
    Nab {
        #[arg(long, value_name = "DIR")]
        data: PathBuf,
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
    },
    /// Evaluate the forecasters on a folder of data/<category>/<file>.csv series: MASE and
    /// 80/90/95% interval coverage at 1 and 12 steps ahead, per model and for the automatic
    /// choice.
    Forecast {
        #[arg(long, value_name = "DIR")]
        data: PathBuf,
        /// Run the LSTM beside the other forecasters, one training step every N rows (0: no
        /// LSTM).
        #[arg(long, value_name = "N", default_value_t = 0)]
        lstm_train_every: usize,
        /// Run one global LSTM for every series (DeepAR-style), trained as the rows arrive,
        /// in each series' automatic choice.
        #[arg(long)]
        global_lstm: bool,
        /// The global LSTM's Adam steps per round (its CPU budget).
        #[arg(long, value_name = "N", default_value_t = 1)]
        global_steps: usize,
        /// The seed of the global LSTM's weights and of the windows it trains on.
        #[arg(long, value_name = "N", default_value_t = 42)]
        global_seed: u64,
        /// Start the global LSTM from these weights (a file --save-global wrote, or
        /// `pretrained`: the network SQL's forecast() uses) instead of untrained ones. With
        /// --global-steps 0 it is measured as it is, on series it may never have seen.
        #[arg(long, value_name = "FILE|pretrained")]
        global_from: Option<String>,
        /// Write the global LSTM's weights here afterwards (what --global-from reads).
        #[arg(long, value_name = "FILE")]
        save_global: Option<PathBuf>,
    },
}

/// mimalloc returns freed memory to the OS; with glibc's per-thread arenas, the buffers a flush
/// frees stayed resident and RSS crept up flush after flush (see docs/BENCHMARKS.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// mimalloc's `purge_delay` option: its index in `mi_option_e` of mimalloc v3 (which
/// libmimalloc-sys builds), which libmimalloc-sys does not name; a test checks that it still
/// holds v3's documented default, 1000 ms.
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// Below this much usable memory, freed memory goes back to the OS at once.
const TIGHT_MEMORY: u64 = 4 << 30;

/// Where the process may use little memory (a small container), mimalloc returns freed pages
/// at once instead of after its purge delay (1 s): under a 512 MiB cgroup, full-speed ingest
/// and heavy queries were OOM-killed without it and held with it (docs/RELIABILITY.md). It
/// costs ingest speed, so only there. `MIMALLOC_PURGE_DELAY` in the environment wins.
#[allow(unsafe_code)]
fn return_freed_memory_at_once_when_tight() {
    let usable = forestall_server::config::usable_memory();
    if usable < TIGHT_MEMORY && std::env::var_os("MIMALLOC_PURGE_DELAY").is_none() {
        // SAFETY: mi_option_set only stores the option's value; mimalloc reads it as it
        // purges, from any thread.
        unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, 0) };
        tracing::info!(
            usable_memory_mib = usable >> 20,
            "little memory: freed memory is returned to the OS at once"
        );
    }
}

fn main() -> anyhow::Result<()> {
    single_threaded_tensor_math();
    let cli = Cli::parse();
    match cli.command {
        Command::Token { what } => token_command(what),
        Command::Query { sql, format, host } => {
            let client = host.client()?;
            client.query(&sql, &format, &mut std::io::stdout().lock())
        }
        Command::Write {
            file,
            precision,
            host,
        } => {
            let client = host.client()?;
            let (input, len): (Box<dyn std::io::Read>, Option<u64>) = if file.as_os_str() == "-" {
                (Box::new(std::io::stdin().lock()), None)
            } else {
                let f = std::fs::File::open(&file)
                    .with_context(|| format!("open {}", file.display()))?;
                let len = f.metadata().ok().map(|m| m.len());
                (Box::new(f), len)
            };
            let bar = forestall_server::cli::progress(len, "writing");
            let written = client.write(input, &precision, |sent| bar.set_position(sent))?;
            bar.finish_and_clear();
            for e in written.errors.iter().take(20) {
                eprintln!("line {}: {}", e.line, e.error);
            }
            if written.errors.len() > 20 {
                eprintln!("… and {} more", written.errors.len() - 20);
            }
            eprintln!(
                "{} lines written, {} refused",
                written.lines, written.rejected
            );
            anyhow::ensure!(
                written.rejected == 0,
                "{} lines were refused",
                written.rejected
            );
            Ok(())
        }
        Command::Status { host } => {
            let client = host.client()?;
            print!("{}", client.status()?);
            Ok(())
        }
        Command::Eval {
            what: Eval::Nab { data, out },
        } => {
            let bar = forestall_server::cli::progress(None, "scoring NAB files");
            bar.set_style(
                indicatif::ProgressStyle::with_template("{msg} [{bar:30}] {pos}/{len} {elapsed}")?
                    .progress_chars("=> "),
            );
            let report = forestall_server::eval::nab_with_progress(&data, &out, |done, all| {
                bar.set_length(all as u64);
                bar.set_position(done as u64);
            })?;
            bar.finish_and_clear();
            print!("{report}");
            Ok(())
        }
        Command::Eval {
            what:
                Eval::Forecast {
                    data,
                    lstm_train_every,
                    global_lstm,
                    global_steps,
                    global_seed,
                    global_from,
                    save_global,
                },
        } => {
            use forestall_models::global::{GlobalConfig, GlobalLstm, PRETRAINED};
            let config = forestall_models::forecast::ForecastConfig {
                lstm_train_every,
                ..Default::default()
            };
            let global = if global_lstm || global_from.is_some() || save_global.is_some() {
                let mut model = GlobalLstm::new(GlobalConfig {
                    steps_per_round: global_steps,
                    seed: global_seed,
                    ..Default::default()
                })?;
                match global_from.as_deref() {
                    None => {}
                    Some("pretrained") => model.resume_weights(PRETRAINED)?,
                    Some(path) => model
                        .resume_weights(
                            &std::fs::read(path).with_context(|| format!("read {path}"))?,
                        )
                        .with_context(|| format!("load the global LSTM's weights from {path}"))?,
                }
                Some(model)
            } else {
                None
            };
            let bar = forestall_server::cli::spinner("evaluating the forecasters");
            let (report, model) = forestall_server::eval::forecast(&data, config, global)?;
            bar.finish_and_clear();
            print!("{report}");
            if let (Some(path), Some(model)) = (save_global, model) {
                std::fs::write(&path, model.weights()?)
                    .with_context(|| format!("write {}", path.display()))?;
                eprintln!("saved the global LSTM's weights to {}", path.display());
            }
            Ok(())
        }
        Command::Replay {
            trace,
            out,
            lstm_train_every,
            contended,
            headroom_price,
            release_hours,
            memory_hold_hours,
            no_global_lstm,
        } => {
            anyhow::ensure!(
                release_hours.is_finite() && release_hours > 0.0,
                "--release-hours must be a positive number of hours"
            );
            anyhow::ensure!(
                headroom_price.is_finite() && headroom_price >= 0.0,
                "--headroom-price must be a finite number of at least 0"
            );
            anyhow::ensure!(
                memory_hold_hours.is_finite() && memory_hold_hours >= 0.0,
                "--memory-hold-hours must be a number of hours, at least 0"
            );
            let options = forestall_control::replay::Options {
                lstm_train_every,
                global_lstm: !no_global_lstm,
                headroom_price,
                release_after: std::time::Duration::from_secs_f64(release_hours * 3600.0),
                memory_hold: std::time::Duration::from_secs_f64(memory_hold_hours * 3600.0),
            };
            let bar = forestall_server::cli::spinner("replaying the trace");
            let report = forestall_control::replay::replay(&trace, &out, &options, contended)?;
            bar.finish_and_clear();
            print!("{report}");
            Ok(())
        }
        Command::Serve {
            config,
            data_dir,
            http_addr,
            pg_addr,
            auth,
            without_auth,
        } => {
            let config = ServerConfig::load(
                config.as_deref(),
                std::env::vars(),
                &Overrides {
                    data_dir,
                    http_addr,
                    pg_addr,
                    auth: match (auth, without_auth) {
                        (true, _) => Some(true),
                        (_, true) => Some(false),
                        _ => None,
                    },
                },
            )?;
            init_logging(&config.log.filter);
            return_freed_memory_at_once_when_tight();
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
                .context("start the async runtime")?;
            runtime.block_on(async {
                let shutdown =
                    forestall_server::shutdown_signal().context("install signal handlers")?;
                forestall_server::serve(config, shutdown).await
            })
        }
    }
}

/// The LSTM's matrices are tiny (16 hidden units): candle splitting each product across every
/// core cost more than it saved (`eval forecast --lstm-train-every 32`: 45 s with the default,
/// 25 s with one thread, the same results; docs/BENCHMARKS.md). Candle reads the thread count
/// from `RAYON_NUM_THREADS`, so unless the operator set it, it is 1.
#[allow(unsafe_code)]
fn single_threaded_tensor_math() {
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        // SAFETY: called first thing in `main`, before any thread exists, so nothing can read
        // the environment concurrently.
        unsafe { std::env::set_var("RAYON_NUM_THREADS", "1") };
    }
}

fn init_logging(filter: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(filter));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr)
        .init();
}

#[cfg(test)]
mod tests {
    #[test]
    #[allow(unsafe_code)]
    fn mimallocs_purge_delay_option_is_where_the_server_sets_it() {
        // Its documented default is 1000 ms; another index would hold another option's value.
        // SAFETY: reads an option's value.
        let delay = unsafe { libmimalloc_sys::mi_option_get(super::MI_OPTION_PURGE_DELAY) };
        assert_eq!(delay, 1000);
    }
}
