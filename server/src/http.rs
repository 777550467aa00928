//! The HTTP API.
//!
//! | route | what |
//! |---|---|
//! | `POST /api/v2/write?org=&bucket=&precision=ns\|us\|ms\|s` | InfluxDB v2 line protocol write |
//! | `POST /write?db=&precision=n\|ns\|u\|us\|ms\|s\|m\|h` | InfluxDB v1 line protocol write |
//! | `POST /api/v1/write` | Prometheus remote write 1.0 (snappy protobuf; see [`remote_write`]) |
//! | `POST /api/v1/admin/flush` | flush the buffer to segments now |
//! | `POST /api/v1/admin/compact` | flush, then compact every partition that has more than one small segment |
//! | `GET /api/v1/retention` | every measurement with its retention period |
//! | `PUT /api/v1/retention/{measurement}` | set (`{"period": "30d"}`) or clear (`{"period": null}`) a measurement's retention |
//! | `GET`/`POST /api/v3/query_sql?q=…&format=json\|jsonl\|csv\|parquet\|pretty` | SQL (see [`query`]) |
//! | `GET /api/v1/allocations` | the allocation loop's state (404 when it is off) |
//! | `GET /api/v1/forecasts` | per component and resource, the forecast and the request the loop sizes from it |
//! | `GET /api/v1/models` | per component and resource, the model answering each step ahead and every model's rolling error; the global LSTM's record |
//! | `GET /api/v1/risks` | per component and resource, the Bayesian risk of passing θ within the horizon, with its reasons |
//! | `GET /api/v1/preferences` | every component's preferences |
//! | `PUT /api/v1/preferences/{component}` | replace a component's preferences (JSON, kept across restarts) |
//! | `GET`, `PUT`, `DELETE /api/v1/continuous_queries[/{name}]` | continuous queries (see [`crate::continuous`]) |
//! | `POST /api/v1/continuous_queries/{name}/run` | run one now; its status after the run |
//! | `GET /api/v1/health` | each component's health from the health-check queries |
//! | `GET`, `POST /api/v1/tokens`, `DELETE /api/v1/tokens/{name}` | tokens (see [`crate::auth`]): list without secrets, create (the secret is in the answer, once), revoke |
//! | `GET /health` | liveness and version |
//! | `GET /metrics` | Forestall's own metrics, Prometheus text format |
//!
//! Forestall has one namespace: `org`, `bucket`, `db` and `rp` are accepted for client
//! compatibility and ignored, always. Writes answer 204 when every line was stored and 400
//! with the list of rejected lines (line number and reason) when some or all were not; the
//! valid lines of such a request are stored (InfluxDB's partial write). Bodies may be gzip
//! (`Content-Encoding: gzip`); the size limit applies before and after decompression.
//! Every error is JSON: `{"code": ..., "error": ...}`.
//!
//! With auth on ([`crate::auth`]), a layer checks every request's token against what its
//! route needs before the handler runs: 401 without a valid one, 403 without the permission.

use std::collections::HashMap;
use std::io::Read;
use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::Path;
use axum::extract::{Extension, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use forestall_engine::Store;
use forestall_engine::line_protocol::{LineError, ParsedLine, Precision, parse_lines};
use forestall_engine::store::{WriteOutcome, now_nanos};
use http_body_util::BodyExt;
use serde_json::json;

use crate::auth::{self, Identity, Need};
use crate::error::ApiError;

mod query;
mod remote_write;

/// Shared state of the handlers.
#[derive(Debug, Clone)]
pub struct AppState {
    pub store: Arc<Store>,
    pub query: forestall_query::QueryEngine,
    pub query_limits: QueryLimits,
    pub max_body_bytes: u64,
    /// The live allocation loop, when `[allocation] enabled`.
    pub allocations: Option<forestall_control::live::Allocations>,
    /// The continuous queries, when running.
    pub continuous: Option<forestall_query::continuous::ContinuousQueries>,
    /// The `[[scrape]]` targets (none when none are configured).
    pub scraper: crate::scrape::Scraper,
    /// The tokens, when loaded (the server always loads them; handler tests may not).
    pub tokens: Option<crate::auth::Tokens>,
    /// Whether every request but `/health` needs a token.
    pub auth_required: bool,
}

impl AppState {
    /// State over `store` with the limits of `config`.
    pub fn new(store: Arc<Store>, config: &crate::config::ServerConfig) -> Self {
        Self {
            query: forestall_query::QueryEngine::new(Arc::clone(&store)),
            store,
            query_limits: QueryLimits {
                timeout: config.query.timeout,
                max_result_rows: config.query.max_result_rows,
                slots: QuerySlots::new(config.query.max_concurrent(), config.query.queue_timeout),
            },
            max_body_bytes: config.http.max_body_bytes,
            allocations: None,
            continuous: None,
            scraper: Default::default(),
            tokens: None,
            auth_required: false,
        }
    }
}

/// Limits on SQL queries.
#[derive(Debug, Clone)]
pub struct QueryLimits {
    pub timeout: std::time::Duration,
    pub max_result_rows: usize,
    /// Queries running at once, over HTTP and PostgreSQL together.
    pub slots: QuerySlots,
}

/// How many SQL queries may run at once, and how long one waits for a turn (as
/// VictoriaMetrics' `-search.maxConcurrentRequests` and `-search.maxQueueDuration`): beyond
/// that a query is refused at once with "try again", instead of every query slowing down
/// until they all time out and the server runs out of memory. A query holds its slot until
/// its last row is sent or its client goes away.
#[derive(Debug, Clone)]
pub struct QuerySlots {
    semaphore: Arc<tokio::sync::Semaphore>,
    max: usize,
    wait: std::time::Duration,
}

/// A query's turn: the slot is free again when this is dropped.
pub type QuerySlot = tokio::sync::OwnedSemaphorePermit;

impl QuerySlots {
    pub fn new(max: usize, wait: std::time::Duration) -> Self {
        let max = max.max(1);
        Self {
            semaphore: Arc::new(tokio::sync::Semaphore::new(max)),
            max,
            wait,
        }
    }

    /// Waits up to the queue timeout for a slot; the error says why there was none.
    pub async fn acquire(&self) -> Result<QuerySlot, String> {
        let busy = || {
            format!(
                "{} queries are running, the most this server runs at once (query.max_concurrent), and none finished within {} (query.queue_timeout); try again",
                self.max,
                humantime::format_duration(self.wait)
            )
        };
        match tokio::time::timeout(self.wait, Arc::clone(&self.semaphore).acquire_owned()).await {
            Ok(Ok(slot)) => Ok(slot),
            // The semaphore is never closed.
            Ok(Err(_)) | Err(_) => Err(busy()),
        }
    }
}

/// The router with every route.
pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/api/v2/write", post(write_v2))
        .route("/write", post(write_v1))
        .route("/api/v1/write", post(remote_write::write))
        .route("/api/v1/admin/flush", post(admin_flush))
        .route("/api/v1/admin/compact", post(admin_compact))
        .route("/api/v1/retention", get(list_retention))
        .route("/api/v1/retention/{measurement}", put(set_retention))
        .route("/api/v3/query_sql", get(query::get).post(query::post))
        .route("/api/v1/allocations", get(allocations))
        .route("/api/v1/forecasts", get(forecasts))
        .route("/api/v1/models", get(models))
        .route("/api/v1/risks", get(risks))
        .route("/api/v1/preferences", get(list_preferences))
        .route("/api/v1/preferences/{component}", put(set_preferences))
        .route("/api/v1/actuation", get(actuation).put(set_actuation))
        .route("/api/v1/continuous_queries", get(crate::continuous::list))
        .route(
            "/api/v1/continuous_queries/{name}",
            get(crate::continuous::get)
                .put(crate::continuous::put)
                .delete(crate::continuous::delete),
        )
        .route(
            "/api/v1/continuous_queries/{name}/run",
            post(crate::continuous::run),
        )
        .route("/api/v1/health", get(crate::continuous::health))
        .route("/api/v1/targets", get(targets))
        .route("/", get(crate::console::index))
        .route("/console/app.js", get(crate::console::script))
        .route("/console/app.css", get(crate::console::style))
        .route("/api/v1/tokens", get(list_tokens).post(create_token))
        .route("/api/v1/tokens/{name}", axum::routing::delete(revoke_token))
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            authorize,
        ))
        .with_state(state)
}

/// The auth layer: the request's [`Identity`] (anonymous with every permission when auth is
/// off) goes into its extensions for the handlers, or the request ends here. A change
/// ([`audited`]) is recorded in the audit trail with its answer's status
/// ([`forestall_engine::audit`]).
async fn authorize(
    State(state): State<AppState>,
    mut request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let identity = match identify(&state, &request) {
        Ok(identity) => identity,
        Err(e) => return e.into_response(),
    };
    if !audited(request.method(), request.uri().path()) {
        request.extensions_mut().insert(identity);
        return next.run(request).await;
    }
    // What was asked, kept for the trail (change requests are small JSON bodies).
    let (parts, body) = request.into_parts();
    let asked = match read_limited(body, state.max_body_bytes).await {
        Ok(bytes) => bytes,
        Err(e) => return e.into_response(),
    };
    let peer = parts
        .extensions
        .get::<axum::extract::ConnectInfo<std::net::SocketAddr>>()
        .map(|c| c.0.ip().to_string());
    let (method, path) = (parts.method.to_string(), parts.uri.path().to_owned());
    let mut request = axum::extract::Request::from_parts(parts, Body::from(asked.clone()));
    let by = identity.audit_name().to_owned();
    request.extensions_mut().insert(identity);
    let response = next.run(request).await;
    let status = response.status().as_u16();
    let store = Arc::clone(&state.store);
    let recorded = tokio::task::spawn_blocking(move || {
        let change = forestall_engine::audit::Change {
            by: &by,
            method: &method,
            path: &path,
            status,
            detail: &String::from_utf8_lossy(&asked),
            peer: peer.as_deref(),
        };
        store.record_change(&change, now_nanos())
    })
    .await;
    match recorded {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::error!(error = %e, "could not record a change in the audit trail"),
        Err(e) => tracing::error!(error = %e, "could not record a change in the audit trail"),
    }
    response
}

/// Whether a request changes something the audit trail keeps: tokens, retention,
/// preferences, continuous queries, flushes and compactions (not data: writes are the
/// data's own record).
fn audited(method: &axum::http::Method, path: &str) -> bool {
    use axum::http::Method;
    if matches!(*method, Method::GET | Method::HEAD | Method::OPTIONS) {
        return false;
    }
    match auth::required(method, path) {
        Need::Admin | Need::Actuate => true,
        Need::All => path.starts_with("/api/v1/tokens"),
        _ => false,
    }
}

fn identify(state: &AppState, request: &axum::extract::Request) -> Result<Identity, ApiError> {
    if !state.auth_required {
        return Ok(Identity::anonymous());
    }
    let tokens = state
        .tokens
        .as_ref()
        .ok_or_else(|| ApiError::Internal("auth is on but no tokens are loaded".into()))?;
    let (method, path) = (request.method(), request.uri().path());
    let need = auth::required(method, path);
    let secret = auth::secret_of(request.headers(), request.uri());
    if secret.is_none()
        && need == Need::All
        && method == axum::http::Method::POST
        && path == "/api/v1/tokens"
        && !tokens.has_admin()
    {
        let peer = request
            .extensions()
            .get::<axum::extract::ConnectInfo<std::net::SocketAddr>>();
        return match peer {
            Some(peer) if peer.0.ip().is_loopback() => Ok(Identity::first_token()),
            _ => Err(ApiError::Unauthorized(
                "no admin token exists yet: create the first with `forestall token create --admin` on the server's own host (loopback), or with --data-dir while it is stopped".into(),
            )),
        };
    }
    tokens
        .check(secret.as_deref(), need)
        .map_err(|refused| match refused {
            auth::Refused::Forbidden { .. } => ApiError::Forbidden(refused.to_string()),
            other => ApiError::Unauthorized(other.to_string()),
        })
}

fn tokens(state: &AppState) -> Result<&auth::Tokens, ApiError> {
    state
        .tokens
        .as_ref()
        .ok_or_else(|| ApiError::NotFound("tokens are not loaded in this process".into()))
}

fn token_json(t: &auth::Token) -> serde_json::Value {
    json!({
        "name": t.name,
        "permissions": t.permissions,
        "created": t.created,
        "expires": t.expires,
    })
}

/// `GET /api/v1/tokens`: every token, without secrets (only hashes are kept).
async fn list_tokens(State(state): State<AppState>) -> Result<Json<serde_json::Value>, ApiError> {
    let list: Vec<_> = tokens(&state)?.list().iter().map(token_json).collect();
    Ok(Json(json!({ "tokens": list })))
}

/// `POST /api/v1/tokens` `{"name": "ci", "permissions": ["write:cpu"], "expires": "30d"}`:
/// the new token with its secret, which is never shown again.
async fn create_token(
    State(state): State<AppState>,
    Extension(identity): Extension<Identity>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let spec: auth::TokenSpec = serde_json::from_slice(&body).map_err(|e| {
        ApiError::Invalid(format!(
            "expected {{\"name\": \"ci\", \"permissions\": [\"write\", \"query\"], \"expires\": \"30d\"}}: {e}"
        ))
    })?;
    let tokens = tokens(&state)?.clone();
    let first = identity.first_token;
    let (secret, token) = tokio::task::spawn_blocking(move || tokens.create(&spec, first))
        .await
        .map_err(|e| ApiError::Internal(format!("token task failed: {e}")))?
        .map_err(token_error)?;
    tracing::info!(token = %token.name, permissions = ?token.permissions, by = %identity.name, "token created");
    let mut body = token_json(&token);
    body["token"] = json!(secret);
    Ok((StatusCode::CREATED, Json(body)).into_response())
}

/// `DELETE /api/v1/tokens/{name}`: requests with it are refused from now on.
async fn revoke_token(
    State(state): State<AppState>,
    Extension(identity): Extension<Identity>,
    Path(name): Path<String>,
) -> Result<StatusCode, ApiError> {
    let tokens = tokens(&state)?.clone();
    let revoked = name.clone();
    tokio::task::spawn_blocking(move || tokens.revoke(&revoked))
        .await
        .map_err(|e| ApiError::Internal(format!("token task failed: {e}")))?
        .map_err(token_error)?;
    tracing::info!(token = %name, by = %identity.name, "token revoked");
    Ok(StatusCode::NO_CONTENT)
}

fn token_error(e: auth::TokenError) -> ApiError {
    use auth::TokenError as E;
    match e {
        E::Invalid(m) => ApiError::Invalid(m),
        e @ E::Exists(_) => ApiError::Conflict(e.to_string()),
        e @ E::NotFound(_) => ApiError::NotFound(e.to_string()),
        E::Forbidden(m) => ApiError::Forbidden(m),
        E::Store(e) => ApiError::from(e),
    }
}

/// Refuses a write (403, nothing of it stored) with a line of a measurement `identity` may
/// not write. The lines are the engine's own parse, so what is checked is what would be
/// stored.
pub(crate) fn check_measurements<'a>(
    identity: &Identity,
    lines: impl Iterator<Item = Result<ParsedLine<'a>, LineError>>,
) -> Result<(), ApiError> {
    if identity.writes_anything() {
        return Ok(());
    }
    for line in lines.flatten() {
        if !identity.may_write(&line.measurement) {
            return Err(ApiError::Forbidden(format!(
                "the token {:?} may not write measurement {:?} (line {}); nothing was stored",
                identity.name, line.measurement, line.line_number
            )));
        }
    }
    Ok(())
}

async fn not_found() -> ApiError {
    ApiError::NotFound("no such endpoint".into())
}

async fn method_not_allowed() -> ApiError {
    ApiError::MethodNotAllowed
}

async fn health() -> Json<serde_json::Value> {
    Json(json!({"status": "pass", "name": "forestall", "version": env!("CARGO_PKG_VERSION")}))
}

async fn admin_flush(State(state): State<AppState>) -> Result<Json<serde_json::Value>, ApiError> {
    let store = Arc::clone(&state.store);
    tokio::task::spawn_blocking(move || store.flush())
        .await
        .map_err(|e| ApiError::Internal(format!("flush task failed: {e}")))??;
    Ok(Json(json!({"segments": state.store.segments().len()})))
}

async fn admin_compact(State(state): State<AppState>) -> Result<Json<serde_json::Value>, ApiError> {
    let store = Arc::clone(&state.store);
    let compacted = tokio::task::spawn_blocking(move || {
        store.flush()?;
        store.compact_all()
    })
    .await
    .map_err(|e| ApiError::Internal(format!("compaction task failed: {e}")))??;
    Ok(Json(
        json!({"compacted_partitions": compacted, "segments": state.store.segments().len()}),
    ))
}

fn retention_json(store: &Store) -> serde_json::Value {
    let default = store.config().retention.default_period;
    let tables: Vec<_> = store
        .tables()
        .iter()
        .map(|t| {
            json!({
                "measurement": t.name,
                "period": t.retention.map(|p| humantime::format_duration(p).to_string()),
                "effective": t.retention.or(default).map(|p| humantime::format_duration(p).to_string()),
            })
        })
        .collect();
    json!({
        "default": default.map(|p| humantime::format_duration(p).to_string()),
        "measurements": tables,
    })
}

async fn list_retention(State(state): State<AppState>) -> Json<serde_json::Value> {
    Json(retention_json(&state.store))
}

#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct RetentionBody {
    /// A duration such as `30d` or `12h`; `null` returns to the engine default.
    period: Option<String>,
}

async fn set_retention(
    State(state): State<AppState>,
    Path(measurement): Path<String>,
    body: Bytes,
) -> Result<Json<serde_json::Value>, ApiError> {
    let body: RetentionBody = serde_json::from_slice(&body)
        .map_err(|e| ApiError::Invalid(format!("expected {{\"period\": \"30d\" | null}}: {e}")))?;
    let period = match body.period.as_deref() {
        None => None,
        Some(text) => {
            let p = humantime::parse_duration(text)
                .map_err(|e| ApiError::Invalid(format!("invalid period {text:?}: {e}")))?;
            let partition = state.store.config().partition_duration;
            if p < partition {
                return Err(ApiError::Invalid(format!(
                    "period {text:?} is shorter than one partition ({}); data is dropped a partition at a time",
                    humantime::format_duration(partition)
                )));
            }
            Some(p)
        }
    };
    let store = Arc::clone(&state.store);
    let name = measurement.clone();
    let found = tokio::task::spawn_blocking(move || store.set_retention(&name, period))
        .await
        .map_err(|e| ApiError::Internal(format!("retention task failed: {e}")))??;
    if !found {
        return Err(ApiError::NotFound(format!(
            "unknown measurement {measurement:?}"
        )));
    }
    Ok(Json(retention_json(&state.store)))
}

fn allocation_loop(state: &AppState) -> Result<&forestall_control::live::Allocations, ApiError> {
    state.allocations.as_ref().ok_or_else(|| {
        ApiError::NotFound(
            "the allocation loop is not running: set [allocation] enabled = true and list components".into(),
        )
    })
}

/// A view of the allocation loop, built off the async workers (reading back from the kernel
/// touches files).
async fn loop_view(
    state: &AppState,
    view: fn(&forestall_control::live::Allocations) -> serde_json::Value,
) -> Result<Json<serde_json::Value>, ApiError> {
    let a = allocation_loop(state)?.clone();
    let json = tokio::task::spawn_blocking(move || view(&a))
        .await
        .map_err(|e| ApiError::Internal(format!("allocation view task failed: {e}")))?;
    Ok(Json(json))
}

async fn allocations(State(state): State<AppState>) -> Result<Json<serde_json::Value>, ApiError> {
    loop_view(&state, |a| a.status()).await
}

/// The `[[scrape]]` targets and their last scrapes, as Prometheus' `GET /api/v1/targets`.
async fn targets(State(state): State<AppState>) -> Json<serde_json::Value> {
    Json(state.scraper.status())
}

async fn forecasts(State(state): State<AppState>) -> Result<Json<serde_json::Value>, ApiError> {
    loop_view(&state, |a| a.forecasts()).await
}

async fn models(State(state): State<AppState>) -> Result<Json<serde_json::Value>, ApiError> {
    loop_view(&state, |a| a.models()).await
}

async fn risks(State(state): State<AppState>) -> Result<Json<serde_json::Value>, ApiError> {
    loop_view(&state, |a| a.risks()).await
}

async fn list_preferences(
    State(state): State<AppState>,
) -> Result<Json<serde_json::Value>, ApiError> {
    loop_view(&state, |a| a.preferences()).await
}

async fn set_preferences(
    State(state): State<AppState>,
    Path(component): Path<String>,
    body: Body,
) -> Result<Json<serde_json::Value>, ApiError> {
    use forestall_control::config::PreferencesConfig;
    use forestall_control::live::SetError;
    let a = allocation_loop(&state)?.clone();
    let body = read_limited(body, 64 << 10).await?;
    let prefs: PreferencesConfig = serde_json::from_slice(&body).map_err(|e| {
        ApiError::Invalid(format!(
            "expected {{\"cap\": {{\"cpu\": 2}}, \"floor\": {{…}}, \"opt_out\": false, \"unmanaged\": [\"net\"], \"pinned_cpus\": [0]}}: {e}"
        ))
    })?;
    let name = component.clone();
    let set = tokio::task::spawn_blocking(move || a.set_preferences(&name, prefs))
        .await
        .map_err(|e| ApiError::Internal(format!("preferences task failed: {e}")))?;
    match set {
        Ok(true) => Ok(Json(
            allocation_loop(&state)?.preferences()[&component].clone(),
        )),
        Ok(false) => Err(ApiError::NotFound(format!(
            "no component {component:?} in [[allocation.components]]"
        ))),
        Err(SetError::Invalid(e)) => Err(ApiError::Invalid(e)),
        Err(e @ SetError::Io(_)) => Err(ApiError::Internal(e.to_string())),
    }
}

async fn actuation(State(state): State<AppState>) -> Result<Json<serde_json::Value>, ApiError> {
    loop_view(&state, |a| a.actuation()).await
}

/// `PUT /api/v1/actuation` `{"actuate": true|false}`: turns applying allocations to the
/// kernel on or off at run time (the `actuate` permission), kept across restarts.
async fn set_actuation(
    State(state): State<AppState>,
    body: Body,
) -> Result<Json<serde_json::Value>, ApiError> {
    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Switch {
        actuate: bool,
    }
    let a = allocation_loop(&state)?.clone();
    let body = read_limited(body, 4 << 10).await?;
    let switch: Switch = serde_json::from_slice(&body).map_err(|e| {
        ApiError::Invalid(format!(
            "expected {{\"actuate\": true}} or {{\"actuate\": false}}: {e}"
        ))
    })?;
    let set = tokio::task::spawn_blocking(move || {
        a.set_actuating(switch.actuate).map(|()| a.actuation())
    })
    .await
    .map_err(|e| ApiError::Internal(format!("actuation task failed: {e}")))?;
    set.map(Json).map_err(|e| ApiError::Internal(e.to_string()))
}

async fn metrics(State(state): State<AppState>) -> Response {
    let mut out = String::new();
    for (name, help, kind, value) in state.store.metrics().snapshot() {
        out.push_str(&format!(
            "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}\n"
        ));
    }
    if let Some(cqs) = &state.continuous {
        cqs.prometheus(&mut out);
    }
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        out,
    )
        .into_response()
}

async fn write_v2(
    State(state): State<AppState>,
    Extension(identity): Extension<Identity>,
    Query(q): Query<HashMap<String, String>>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let precision = precision(&q, &["ns", "us", "ms", "s"])?;
    write(state, identity, precision, headers, body).await
}

async fn write_v1(
    State(state): State<AppState>,
    Extension(identity): Extension<Identity>,
    Query(q): Query<HashMap<String, String>>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let precision = precision(&q, &["n", "ns", "u", "us", "ms", "s", "m", "h"])?;
    write(state, identity, precision, headers, body).await
}

/// The `precision` parameter, one of `allowed` (nanoseconds when absent).
fn precision(q: &HashMap<String, String>, allowed: &[&str]) -> Result<Precision, ApiError> {
    match q.get("precision").map(String::as_str) {
        None | Some("") => Ok(Precision::Nanoseconds),
        Some(p) => allowed
            .contains(&p)
            .then(|| Precision::parse(p))
            .flatten()
            .ok_or_else(|| {
                ApiError::Invalid(format!(
                    "invalid precision {p:?}: expected one of {}",
                    allowed.join(", ")
                ))
            }),
    }
}

async fn write(
    state: AppState,
    identity: Identity,
    precision: Precision,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let limit = state.max_body_bytes;
    let raw = read_limited(body, limit).await?;
    let body = match headers
        .get(header::CONTENT_ENCODING)
        .map(|v| v.to_str().unwrap_or("?").trim().to_ascii_lowercase())
    {
        None => raw,
        Some(e) if e.is_empty() || e == "identity" => raw,
        Some(e) if e == "gzip" || e == "x-gzip" => gunzip(&raw, limit)?,
        Some(e) => return Err(ApiError::UnsupportedEncoding(e)),
    };
    let store = Arc::clone(&state.store);
    let now = now_nanos();
    let outcome = tokio::task::spawn_blocking(move || {
        check_measurements(&identity, parse_lines(&body, precision, now))?;
        Ok::<_, ApiError>(store.write(&body, precision, now)?)
    })
    .await
    .map_err(|e| ApiError::Internal(format!("write task failed: {e}")))??;
    Ok(write_response(outcome))
}

fn write_response(o: WriteOutcome) -> Response {
    if o.rejected_lines == 0 {
        return StatusCode::NO_CONTENT.into_response();
    }
    let errors: Vec<_> = o
        .errors
        .iter()
        .map(|e| json!({"line": e.line, "error": e.reason}))
        .collect();
    let body = json!({
        "code": "invalid",
        "error": format!(
            "partial write: {} of {} lines rejected{}",
            o.rejected_lines,
            o.rejected_lines + o.accepted_lines,
            if o.errors.len() < o.rejected_lines { format!(" (first {} listed)", o.errors.len()) } else { String::new() }
        ),
        "accepted_lines": o.accepted_lines,
        "rejected_lines": o.rejected_lines,
        "line_errors": errors,
    });
    (StatusCode::BAD_REQUEST, Json(body)).into_response()
}

async fn read_limited(body: Body, limit: u64) -> Result<Bytes, ApiError> {
    let limited = http_body_util::Limited::new(body, limit as usize);
    match limited.collect().await {
        Ok(c) => Ok(c.to_bytes()),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => Err(ApiError::TooLarge(limit)),
        Err(e) if crate::listen::body_timed_out(e.as_ref()) => {
            Err(ApiError::RequestTimeout(e.to_string()))
        }
        Err(e) => Err(ApiError::Invalid(format!(
            "could not read the request body: {e}"
        ))),
    }
}

fn gunzip(raw: &[u8], limit: u64) -> Result<Bytes, ApiError> {
    let mut out = Vec::with_capacity(raw.len().saturating_mul(4).min(limit as usize));
    let mut decoder = flate2::read::MultiGzDecoder::new(raw).take(limit + 1);
    decoder
        .read_to_end(&mut out)
        .map_err(|e| ApiError::Invalid(format!("invalid gzip body: {e}")))?;
    if out.len() as u64 > limit {
        return Err(ApiError::TooLarge(limit));
    }
    Ok(Bytes::from(out))
}

#[cfg(test)]
mod tests;
