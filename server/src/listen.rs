//! How connections are taken: the HTTP listener's accept loop, TLS for both listeners, and
//! the limits that keep one client from holding the server.
//!
//! - **Connections.** Each listener takes at most `max_connections` at once
//!   ([`Connections`]). One past that is answered at once and closed: HTTP with `503` and
//!   `Retry-After`, PostgreSQL with SQLSTATE 53300, as Postgres says "too many clients".
//! - **Slow clients.** A request's head must arrive within `[http] header_read_timeout` (the
//!   same bound closes a keep-alive connection that sits idle) and its body within
//!   `[http] body_read_timeout` of the head, or the request ends (`408`) and the connection
//!   closes. A client that trickles bytes (slowloris) holds a connection for those times at
//!   most. The PostgreSQL listener's start-up has pgwire's own bound.
//! - **TLS.** With `[tls] cert` and `key` (PEM files), both listeners speak TLS (rustls,
//!   TLS 1.2 and 1.3): HTTPS only on the HTTP port, and on the PostgreSQL port whatever the
//!   client asks for, with passwords (tokens) refused over a connection without it.
//!
//! The accept loop is hyper's HTTP/1.1 connection under axum's router, as `axum::serve`
//! does, plus what `axum::serve` does not offer: the timer behind the header timeout, the
//! limit, TLS.

use std::future::Future;
use std::net::SocketAddr;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use anyhow::Context as _;
use axum::Router;
use axum::extract::ConnectInfo;
use bytes::Bytes;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls;

/// How many connections a listener holds at once.
#[derive(Debug, Clone)]
pub struct Connections {
    open: Arc<Semaphore>,
    max: usize,
}

impl Connections {
    pub fn new(max: usize) -> Self {
        Self {
            open: Arc::new(Semaphore::new(max.max(1))),
            max: max.max(1),
        }
    }

    /// A place for one more connection, held until the permit is dropped; `None` when all
    /// `max` are taken.
    pub fn admit(&self) -> Option<OwnedSemaphorePermit> {
        Arc::clone(&self.open).try_acquire_owned().ok()
    }

    /// The limit.
    pub fn max(&self) -> usize {
        self.max
    }

    /// Connections open now.
    pub fn open(&self) -> usize {
        self.max - self.open.available_permits()
    }
}

/// The default `max_connections` of a listener, given the open-file limit in force (from
/// [`raise_open_files`]; 1,024 when unknown): half of it after 1,024 kept for the store's
/// files, at least 64 and at most 10,000.
pub fn default_max_connections(open_files: Option<u64>) -> usize {
    (open_files.unwrap_or(1024).saturating_sub(1024) / 2).clamp(64, 10_000) as usize
}

/// Raises the soft limit on open files to the hard one (as Go's runtime does at start),
/// so that connections and the store's files do not run into the 1,024 most shells give.
/// Returns the limit now in force.
#[allow(unsafe_code)]
pub fn raise_open_files() -> Option<u64> {
    // SAFETY: an all-zero rlimit is a valid value of a plain C struct of integers.
    let mut lim: libc::rlimit = unsafe { std::mem::zeroed() };
    // SAFETY: `lim` is a writable rlimit alive for the call.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return None;
    }
    if lim.rlim_cur < lim.rlim_max {
        let raised = libc::rlimit {
            rlim_cur: lim.rlim_max,
            rlim_max: lim.rlim_max,
        };
        // SAFETY: `raised` is a valid rlimit alive for the call.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
            return Some(raised.rlim_cur);
        }
    }
    Some(lim.rlim_cur)
}

/// A TLS server configuration from a PEM certificate chain and a PEM private key (PKCS#8,
/// PKCS#1 or SEC1), offering `alpn` (empty: none).
pub fn tls_acceptor(cert: &Path, key: &Path, alpn: &[&[u8]]) -> anyhow::Result<TlsAcceptor> {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    let chain = CertificateDer::pem_file_iter(cert)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .with_context(|| format!("read the TLS certificate {}", cert.display()))?;
    if chain.is_empty() {
        anyhow::bail!("{} holds no PEM certificate", cert.display());
    }
    let key = PrivateKeyDer::from_pem_file(key)
        .with_context(|| format!("read the TLS private key {}", key.display()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .context("TLS protocol versions")?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .with_context(|| {
            format!(
                "the TLS certificate {} and key do not make a usable pair",
                cert.display()
            )
        })?;
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(TlsAcceptor::from(Arc::new(config)))
}

/// The HTTP listener's settings.
#[derive(Clone)]
pub struct HttpListener {
    pub connections: Connections,
    pub header_read_timeout: Duration,
    pub body_read_timeout: Duration,
    pub tls: Option<TlsAcceptor>,
}

impl std::fmt::Debug for HttpListener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpListener")
            .field("connections", &self.connections)
            .field("header_read_timeout", &self.header_read_timeout)
            .field("body_read_timeout", &self.body_read_timeout)
            .field("tls", &self.tls.is_some())
            .finish()
    }
}

/// Serves `app` on `listener` until `shutdown` resolves, then lets the requests in flight
/// finish (connections stop after their current response) and returns.
pub async fn serve_http(
    listener: TcpListener,
    app: Router,
    settings: HttpListener,
    shutdown: impl std::future::Future<Output = ()> + Send,
) {
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let settings = Arc::new(settings);
    tokio::pin!(shutdown);
    loop {
        let (socket, peer) = tokio::select! {
            _ = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Out of file descriptors, most likely: wait for some to close.
                    tracing::warn!(error = %e, "HTTP accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let _ = socket.set_nodelay(true);
        let Some(permit) = settings.connections.admit() else {
            tokio::spawn(refuse_http(socket, settings.tls.is_some()));
            continue;
        };
        let (app, settings, watcher) = (app.clone(), Arc::clone(&settings), graceful.watcher());
        tokio::spawn(async move {
            let _permit = permit;
            match &settings.tls {
                None => serve_connection(TokioIo::new(socket), peer, app, &settings, watcher).await,
                Some(tls) => {
                    // The handshake counts as reading the head.
                    let handshake =
                        tokio::time::timeout(settings.header_read_timeout, tls.accept(socket));
                    match handshake.await {
                        Ok(Ok(stream)) => {
                            serve_connection(TokioIo::new(stream), peer, app, &settings, watcher)
                                .await
                        }
                        Ok(Err(e)) => tracing::debug!(%peer, error = %e, "TLS handshake failed"),
                        Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                    }
                }
            }
        });
    }
    drop(listener);
    graceful.shutdown().await;
}

async fn serve_connection<I>(
    io: TokioIo<I>,
    peer: SocketAddr,
    app: Router,
    settings: &HttpListener,
    watcher: hyper_util::server::graceful::Watcher,
) where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let body_limit = settings.body_read_timeout;
    let service = hyper::service::service_fn(move |request: hyper::Request<Incoming>| {
        let mut request =
            request.map(|body| axum::body::Body::new(ReadDeadline::new(body, body_limit)));
        // The peer's address tells the auth layer whether a first token may be made.
        request.extensions_mut().insert(ConnectInfo(peer));
        tower::ServiceExt::oneshot(app.clone(), request)
    });
    let connection = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(settings.header_read_timeout)
        .serve_connection(io, service);
    if let Err(e) = watcher.watch(connection).await {
        tracing::debug!(%peer, error = %e, "HTTP connection ended with an error");
    }
}

/// Answers a connection over the limit with `503` and closes it (a TLS connection is only
/// closed: a plain-text answer would mean nothing to its client).
async fn refuse_http(mut socket: TcpStream, tls: bool) {
    if !tls {
        const BODY: &str =
            "{\"code\":\"overloaded\",\"error\":\"too many connections; try again\"}";
        let response = format!(
            "HTTP/1.1 503 Service Unavailable\r\nRetry-After: 1\r\nContent-Type: application/json\r\n\
             Content-Length: {}\r\nConnection: close\r\n\r\n{BODY}",
            BODY.len()
        );
        let _ = tokio::time::timeout(
            Duration::from_secs(1),
            socket.write_all(response.as_bytes()),
        )
        .await;
        let _ = socket.shutdown().await;
    }
    tracing::debug!("a connection over [http] max_connections was refused");
}

/// Why a request's body stopped: it did not arrive within `[http] body_read_timeout`.
#[derive(Debug, thiserror::Error)]
#[error("the request body did not arrive within {}", humantime::format_duration(*.0))]
pub struct BodyTimedOut(pub Duration);

/// A request body that fails with [`BodyTimedOut`] once its time is up.
struct ReadDeadline {
    inner: Incoming,
    limit: Duration,
    deadline: Pin<Box<tokio::time::Sleep>>,
}

impl ReadDeadline {
    fn new(inner: Incoming, limit: Duration) -> Self {
        Self {
            inner,
            limit,
            deadline: Box::pin(tokio::time::sleep(limit)),
        }
    }
}

impl Body for ReadDeadline {
    type Data = Bytes;
    type Error = axum::BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = self.get_mut();
        if let Poll::Ready(frame) = Pin::new(&mut this.inner).poll_frame(cx) {
            return Poll::Ready(frame.map(|f| f.map_err(Into::into)));
        }
        match this.deadline.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Some(Err(BodyTimedOut(this.limit).into()))),
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Whether `e` (or what caused it) is a [`BodyTimedOut`].
pub fn body_timed_out(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut next = Some(e);
    while let Some(e) = next {
        if e.is::<BodyTimedOut>() {
            return true;
        }
        next = e.source();
    }
    false
}

/// Answers a PostgreSQL connection over the limit as Postgres does ("sorry, too many
/// clients already"): declines TLS or GSS encryption if the client asks first, reads its
/// start-up message, sends an `ErrorResponse` (FATAL, SQLSTATE 53300) and closes. A client
/// that sends nothing within a second is just closed.
pub async fn refuse_pg(mut socket: TcpStream) {
    use tokio::io::AsyncReadExt;
    const SSL_REQUEST: u32 = 80_877_103;
    const GSSENC_REQUEST: u32 = 80_877_104;
    let start_up = async {
        // At most an SSL request, a GSS request, then the start-up message.
        for _ in 0..3 {
            let len = socket.read_u32().await? as usize;
            if !(8..=10_000).contains(&len) {
                return Err(std::io::Error::other("not a start-up message"));
            }
            let mut body = vec![0u8; len - 4];
            socket.read_exact(&mut body).await?;
            let code = u32::from_be_bytes([body[0], body[1], body[2], body[3]]);
            if len == 8 && (code == SSL_REQUEST || code == GSSENC_REQUEST) {
                socket.write_all(b"N").await?;
                continue;
            }
            return Ok(());
        }
        Err(std::io::Error::other("no start-up message"))
    };
    if let Ok(Ok(())) = tokio::time::timeout(Duration::from_secs(1), start_up).await {
        let mut fields = Vec::new();
        for (tag, value) in [
            (b'S', "FATAL"),
            (b'V', "FATAL"),
            (b'C', "53300"),
            (
                b'M',
                "too many connections ([pg] max_connections); try again",
            ),
        ] {
            fields.push(tag);
            fields.extend_from_slice(value.as_bytes());
            fields.push(0);
        }
        fields.push(0);
        let mut message = vec![b'E'];
        message.extend_from_slice(&(fields.len() as u32 + 4).to_be_bytes());
        message.extend_from_slice(&fields);
        let _ = tokio::time::timeout(Duration::from_secs(1), socket.write_all(&message)).await;
    }
    let _ = socket.shutdown().await;
    tracing::debug!("a connection over [pg] max_connections was refused");
}
