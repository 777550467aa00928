//! The server's side of continuous queries (`forestall_query::continuous`): the notifier that
//! carries out `NOTIFY` sinks, and the HTTP API.
//!
//! | route | what |
//! |---|---|
//! | `GET /api/v1/continuous_queries` | every query: definition, SQL, watermark, lag, status |
//! | `GET /api/v1/continuous_queries/{name}` | one query |
//! | `PUT /api/v1/continuous_queries/{name}` | create or replace (JSON, the TOML form); 201 created, 200 replaced or unchanged |
//! | `DELETE /api/v1/continuous_queries/{name}` | drop; 204, or 404 |
//! | `GET /api/v1/health` | each component's health from the `HEALTH` queries, with reasons |

use std::collections::BTreeMap;

use axum::Json;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use forestall_query::continuous::{
    ActionSink, AllocationRequest, ContinuousQueries, Definition, DefinitionSpec, HealthStatus,
    Notification,
};
use serde_json::json;

use crate::error::ApiError;
use crate::http::AppState;

/// Largest definition accepted over HTTP.
pub const MAX_DEFINITION_BYTES: usize = 64 * 1024;

/// Carries out what continuous queries ask for: `NOTIFY` as a JSON POST to the query's URL
/// (see [`Notification`]), `ALLOCATE` as requests to the allocation loop, when it runs.
#[derive(Debug, Default)]
pub struct Actions {
    pub allocations: Option<forestall_control::live::Allocations>,
}

#[async_trait::async_trait]
impl ActionSink for Actions {
    async fn allocate(&self, query: &str, requests: Vec<AllocationRequest>) -> Result<(), String> {
        match &self.allocations {
            Some(a) => a.offer(query, requests),
            None if requests.is_empty() => Ok(()),
            None => Err(
                "the allocation loop is off: turn it on with [allocation] enabled = true".into(),
            ),
        }
    }

    async fn notify(&self, url: &str, event: &Notification) -> Result<(), String> {
        let body = serde_json::to_string(event).map_err(|e| e.to_string())?;
        let url = url.to_owned();
        tokio::task::spawn_blocking(move || {
            forestall_actuators::webhook::Webhook::new(&url)
                .and_then(|w| w.post(&body))
                .map_err(|e| e.to_string())
        })
        .await
        .map_err(|e| format!("notification task failed: {e}"))?
    }
}

fn queries(state: &AppState) -> Result<&ContinuousQueries, ApiError> {
    state
        .continuous
        .as_ref()
        .ok_or_else(|| ApiError::NotFound("continuous queries are not running".into()))
}

pub(crate) fn query_error(e: forestall_query::Error) -> ApiError {
    use forestall_query::Error as E;
    match e {
        E::Query(m) => ApiError::Invalid(m),
        E::Exists(m) => ApiError::Conflict(m),
        E::NotFound(m) => ApiError::NotFound(m),
        E::Forbidden(m) => ApiError::Forbidden(m),
        e @ E::ResourcesExhausted(_) => ApiError::ResourcesExhausted(e.to_string()),
        e @ E::Execution(_) => ApiError::Internal(e.to_string()),
    }
}

pub(crate) async fn list(
    State(state): State<AppState>,
) -> Result<Json<serde_json::Value>, ApiError> {
    Ok(Json(
        json!({"continuous_queries": queries(&state)?.describe_all()}),
    ))
}

pub(crate) async fn get(
    State(state): State<AppState>,
    Path(name): Path<String>,
) -> Result<Json<serde_json::Value>, ApiError> {
    queries(&state)?
        .describe(&name)
        .map(Json)
        .ok_or_else(|| ApiError::NotFound(format!("continuous query {name} does not exist")))
}

pub(crate) async fn put(
    State(state): State<AppState>,
    Path(name): Path<String>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let cqs = queries(&state)?;
    if body.len() > MAX_DEFINITION_BYTES {
        return Err(ApiError::TooLarge(MAX_DEFINITION_BYTES as u64));
    }
    let spec: DefinitionSpec = serde_json::from_slice(&body).map_err(|e| {
        ApiError::Invalid(format!(
            "expected a definition such as {{\"every\": \"1m\", \"into\": \"cpu_1m\", \"query\": \"SELECT …\"}}: {e}"
        ))
    })?;
    if spec.from_config || spec.builtin {
        return Err(ApiError::Invalid(
            "from_config and builtin are set by the server, for the queries of its config file and its own"
                .into(),
        ));
    }
    let def = Definition::from_spec(spec, Some(&name)).map_err(query_error)?;
    let outcome = cqs.create(def, true, false).await.map_err(query_error)?;
    let status = if outcome == "created" {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    let body = cqs.describe(&name).unwrap_or_else(|| json!({}));
    Ok((
        status,
        Json(json!({"outcome": outcome, "continuous_query": body})),
    )
        .into_response())
}

pub(crate) async fn delete(
    State(state): State<AppState>,
    Path(name): Path<String>,
) -> Result<StatusCode, ApiError> {
    queries(&state)?
        .drop_query(&name, false)
        .await
        .map_err(query_error)?;
    Ok(StatusCode::NO_CONTENT)
}

/// `POST /api/v1/continuous_queries/{name}/run`: runs the query now (after its run in
/// progress, if any) and answers with its status after the run; a failed run is in its
/// `last_error`, as for a scheduled one.
pub(crate) async fn run(
    State(state): State<AppState>,
    Path(name): Path<String>,
) -> Result<Json<serde_json::Value>, ApiError> {
    queries(&state)?
        .run_now(&name)
        .await
        .map(Json)
        .ok_or_else(|| ApiError::NotFound(format!("continuous query {name} does not exist")))
}

/// `GET /api/v1/health`: `{"components": {"web": {"status": "warn", "checks": [...]}}}`.
pub(crate) async fn health(
    State(state): State<AppState>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let mut components: BTreeMap<String, (HealthStatus, Vec<serde_json::Value>)> = BTreeMap::new();
    for c in queries(&state)?.health() {
        let entry = components
            .entry(c.component.clone())
            .or_insert((HealthStatus::Pass, Vec::new()));
        entry.0 = entry.0.max(c.status);
        entry.1.push(json!({
            "check": c.check,
            "labels": c.labels.iter().cloned().collect::<BTreeMap<_, _>>(),
            "status": c.status,
            "value": c.value,
            "reason": c.reason,
            "since": c.since,
            "updated": c.updated,
        }));
    }
    let components: serde_json::Map<String, serde_json::Value> = components
        .into_iter()
        .map(|(k, (status, checks))| (k, json!({"status": status, "checks": checks})))
        .collect();
    Ok(Json(json!({"components": components})))
}
