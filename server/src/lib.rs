//! # forestall-server
//!
//! The process around the engine: configuration ([`config`]), tokens ([`auth`]), the HTTP API ([`http`]), the
//! PostgreSQL wire ([`pg`]), how both take connections ([`listen`]: TLS and limits), the host collector ([`collector`]), Prometheus scraping
//! ([`scrape`]), the `forestall` binary's `serve` command ([`serve`]), which wires the store,
//! the queries, the continuous queries, the collector, the scrapes and the allocation loop
//! (`forestall-control`) together, the client commands (`query`, `write`, `status`: [`cli`]), and the model
//! evaluations behind `forestall eval` ([`eval`]). It may depend on every Forestall crate,
//! and none depends on it.

pub mod auth;
pub mod cli;
pub mod collector;
pub mod config;
pub mod console;
pub mod continuous;

pub mod error;
pub mod eval;
pub mod http;
pub mod listen;
pub mod pg;
pub mod scrape;

use std::future::Future;
use std::sync::Arc;

use anyhow::Context;
use forestall_engine::Store;

use crate::config::ServerConfig;

/// Opens the store, serves HTTP until `shutdown` resolves, then drains in-flight requests and
/// flushes the store.
pub async fn serve(
    config: ServerConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let engine_config = config.engine.clone();
    let store = tokio::task::spawn_blocking(move || Store::open(engine_config))
        .await?
        .with_context(|| format!("open the store in {}", config.engine.data_dir.display()))?;
    let store = Arc::new(store);
    let open_files = listen::raise_open_files();
    let tls = match config.tls.files()? {
        Some((cert, key)) => Some((
            listen::tls_acceptor(cert, key, &[b"http/1.1"])?,
            listen::tls_acceptor(cert, key, &[])?,
        )),
        None => None,
    };
    let listener = tokio::net::TcpListener::bind(config.http.addr)
        .await
        .with_context(|| format!("listen on {}", config.http.addr))?;
    let addr = listener.local_addr()?;
    // Queries run on their own runtime, at a lower CPU priority than ingestion. It is shut
    // down without waiting on every way out, errors included (a runtime dropped inside
    // another one panics).
    let query_runtime = QueryRuntime(Some(query_runtime(config.query.nice)?));
    let mut state = http::AppState::new(Arc::clone(&store), &config);
    let memory_limit = config.query.memory_limit();
    state.query = state
        .query
        .on_runtime(query_runtime.handle())
        .with_memory_limit(usize::try_from(memory_limit).unwrap_or(usize::MAX));
    let max_connections = |set: Option<usize>| {
        listen::Connections::new(set.unwrap_or_else(|| listen::default_max_connections(open_files)))
    };
    let (http_connections, pg_connections) = (
        max_connections(config.http.max_connections),
        max_connections(config.pg.max_connections),
    );
    tracing::info!(
        query_memory_limit_mib = memory_limit >> 20,
        http_max_connections = http_connections.max(),
        pg_max_connections = pg_connections.max(),
        open_files,
        tls = tls.is_some(),
        "limits"
    );
    let tokens = auth::Tokens::load(store.entries()).context("load the tokens")?;
    state.auth_required = config.auth_enabled()?;
    if state.auth_required {
        let count = tokens.list().len();
        tracing::info!(
            tokens = count,
            "auth is on: every endpoint but /health needs a token"
        );
        if !tokens.has_admin() {
            tracing::warn!(
                "no admin token yet: create one on this host with `forestall token create --admin`"
            );
        }
    } else if !config.http.addr.ip().is_loopback()
        || (config.pg.enabled && !config.pg.addr.ip().is_loopback())
    {
        tracing::warn!("auth is off (--without-auth) on an address other than loopback");
    }
    state.tokens = Some(tokens.clone());
    let shutdown = futures::FutureExt::shared(Box::pin(shutdown));
    let allocations = if config.allocation.enabled {
        let allocations =
            forestall_control::live::Allocations::new(&config.allocation, &config.engine.data_dir)
                .context("set up the allocation loop")?;
        state.allocations = Some(allocations.clone());
        Some(allocations)
    } else {
        None
    };
    // Continuous queries act through the server: notifications, and allocation requests
    // for the loop.
    let continuous = forestall_query::continuous::ContinuousQueries::start(
        Arc::clone(&store),
        state.query.clone(),
        Some(Arc::new(continuous::Actions {
            allocations: allocations.clone(),
        })),
    )
    .context("start the continuous queries")?;
    continuous
        .reconcile(config.continuous_queries.clone())
        .await
        .context("the [[continuous_queries]] of the config")?;
    // Forestall's own queries: the loop's usage queries and the collector's health checks
    // (any left from before that are no longer wanted are dropped).
    let mut builtin = match config.allocation.enabled {
        true => forestall_control::usage::builtin_queries(&config.allocation),
        false => Vec::new(),
    };
    builtin.extend(collector::builtin_queries(&config.collector));
    continuous
        .reconcile_builtin(builtin)
        .await
        .context("the built-in continuous queries")?;
    state.query = state.query.with_continuous(continuous.clone());
    state.continuous = Some(continuous.clone());
    let allocation = match allocations {
        Some(allocations) => {
            allocations.health_from(continuous.clone());
            tracing::info!(
                components = config.allocation.components.len(),
                actuate = config.allocation.actuate,
                interval = %humantime::format_duration(config.allocation.interval),
                "allocation loop running"
            );
            Some(tokio::spawn(forestall_control::live::run(
                allocations,
                Arc::clone(&store),
                state.query.clone(),
                config.allocation.interval,
                shutdown.clone(),
            )))
        }
        None => None,
    };
    let collector = config.collector.enabled.then(|| {
        tokio::spawn(collector::run(
            Arc::clone(&store),
            config.collector.clone(),
            shutdown.clone(),
        ))
    });
    state.scraper = scrape::Scraper::new(&config.scrape)
        .map_err(|e| anyhow::anyhow!("the [[scrape]] jobs: {e}"))?;
    let scraper = (!state.scraper.targets().is_empty()).then(|| {
        let (scraper, store, shutdown) =
            (state.scraper.clone(), Arc::clone(&store), shutdown.clone());
        tokio::spawn(async move { scraper.run(store, shutdown).await })
    });
    let pg = if config.pg.enabled {
        let pg_listener = tokio::net::TcpListener::bind(config.pg.addr)
            .await
            .with_context(|| format!("listen on {} (postgres)", config.pg.addr))?;
        let pg_addr = pg_listener.local_addr()?;
        tracing::info!(addr = %pg_addr, "forestall is serving the PostgreSQL protocol");
        println!("forestall listening on postgres://{pg_addr}");
        Some(tokio::spawn(pg::serve(
            pg_listener,
            state.query.clone(),
            state.query_limits.clone(),
            state.auth_required.then(|| tokens.clone()),
            pg_connections,
            tls.as_ref().map(|(_, pg)| pg.clone()),
            shutdown.clone(),
        )))
    } else {
        None
    };
    tracing::info!(%addr, data_dir = %config.engine.data_dir.display(), "forestall is serving HTTP");
    // Tests and scripts wait for this line, printed last, to learn the port (with
    // --http-addr 127.0.0.1:0); the Postgres line, if any, came before it.
    let scheme = if tls.is_some() { "https" } else { "http" };
    println!("forestall listening on {scheme}://{addr}");
    let settings = listen::HttpListener {
        connections: http_connections,
        header_read_timeout: config.http.header_read_timeout,
        body_read_timeout: config.http.body_read_timeout,
        tls: tls.map(|(http, _)| http),
    };
    listen::serve_http(listener, http::router(state), settings, shutdown).await;
    if let Some(pg) = pg {
        let _ = pg.await;
    }
    if let Some(allocation) = allocation {
        let _ = allocation.await;
    }
    if let Some(collector) = collector {
        let _ = collector.await;
    }
    if let Some(scraper) = scraper {
        let _ = scraper.await;
    }
    continuous.stop().await;
    drop(query_runtime);
    tracing::info!("HTTP stopped; flushing the store");
    let flushed = tokio::task::spawn_blocking(move || store.shutdown()).await?;
    flushed.context("flush at shutdown")?;
    tracing::info!("forestall stopped cleanly");
    Ok(())
}

/// The query runtime, shut down in the background when dropped.
struct QueryRuntime(Option<tokio::runtime::Runtime>);

impl QueryRuntime {
    fn handle(&self) -> tokio::runtime::Handle {
        match &self.0 {
            Some(rt) => rt.handle().clone(),
            None => unreachable!("the runtime is taken only when dropped"),
        }
    }
}

impl Drop for QueryRuntime {
    fn drop(&mut self) {
        if let Some(rt) = self.0.take() {
            rt.shutdown_background();
        }
    }
}

/// The runtime queries run on: one worker per core, threads (blocking ones too) at niceness
/// `nice`.
fn query_runtime(nice: i32) -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(std::thread::available_parallelism().map_or(2, |n| n.get()))
        .thread_name("forestall-query")
        .on_thread_start(move || lower_priority(nice))
        .enable_all()
        .build()
        .context("start the query runtime")
}

/// Sets the calling thread's niceness.
#[allow(unsafe_code)]
fn lower_priority(nice: i32) {
    // SAFETY: setpriority(2) takes plain integers and touches no memory of ours. With
    // PRIO_PROCESS and who = 0 it applies to the calling thread (a task, on Linux).
    let rc = unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, nice) };
    if rc != 0 {
        tracing::warn!(nice, error = %std::io::Error::last_os_error(), "could not lower the priority of a query thread");
    }
}

/// Installs handlers for SIGTERM and SIGINT (Ctrl-C) now, and returns a future that resolves
/// when either arrives. Installing before the server announces itself means a signal sent
/// right after start-up is never lost to the default action. Call inside the runtime.
pub fn shutdown_signal() -> std::io::Result<impl Future<Output = ()> + Send + 'static> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    Ok(async move {
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM received; shutting down"),
            _ = int.recv() => tracing::info!("Ctrl-C received; shutting down"),
        }
    })
}
