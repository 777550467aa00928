//! # forestall-server
//!
//! The process around the engine: configuration ([`config`]), the HTTP API ([`http`]), the
//! `forestall` binary's `serve` command ([`serve`]) and its offline evaluations ([`eval`]). This is the only crate that wires the
//! others together; it may depend on every Forestall crate, and none depends on it.

pub mod config;
pub mod error;
pub mod eval;
pub mod http;
pub mod pg;

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
    let listener = tokio::net::TcpListener::bind(config.http.addr)
        .await
        .with_context(|| format!("listen on {}", config.http.addr))?;
    let addr = listener.local_addr()?;
    let state = http::AppState::new(Arc::clone(&store), &config);
    let shutdown = futures::FutureExt::shared(Box::pin(shutdown));
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
            state.query_limits,
            shutdown.clone(),
        )))
    } else {
        None
    };
    tracing::info!(%addr, data_dir = %config.engine.data_dir.display(), "forestall is serving HTTP");
    // Tests and scripts wait for this line, printed last, to learn the port (with
    // --http-addr 127.0.0.1:0); the Postgres line, if any, came before it.
    println!("forestall listening on http://{addr}");
    let app = http::router(state);
    let served = axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await;
    if let Some(pg) = pg {
        let _ = pg.await;
    }
    tracing::info!("HTTP stopped; flushing the store");
    let flushed = tokio::task::spawn_blocking(move || store.shutdown()).await?;
    served.context("HTTP server")?;
    flushed.context("flush at shutdown")?;
    tracing::info!("forestall stopped cleanly");
    Ok(())
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
