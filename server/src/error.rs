//! The one place where errors become HTTP responses. Internal details are logged, never sent.

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::json;

/// An error as the API reports it.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    NotFound(String),
    /// No token, or one that is not valid: 401 with `WWW-Authenticate: Bearer`.
    #[error("{0}")]
    Unauthorized(String),
    /// A valid token without the permission.
    #[error("{0}")]
    Forbidden(String),
    #[error("{0}")]
    Conflict(String),
    #[error("method not allowed on this endpoint")]
    MethodNotAllowed,
    #[error("request body is larger than the limit of {0} bytes")]
    TooLarge(u64),
    #[error("unsupported Content-Encoding {0:?}: use gzip or identity")]
    UnsupportedEncoding(String),
    #[error("{0}")]
    UnsupportedMedia(String),
    /// The data directory's disk is full: 507, nothing of the request was stored.
    #[error("{0}")]
    StorageFull(String),
    /// The client did not send the request in time (`[http] body_read_timeout`).
    #[error("{0}")]
    RequestTimeout(String),
    #[error("the server is shutting down")]
    Unavailable,
    #[error("{0}")]
    Overloaded(String),
    /// A query that needs more memory than one may hold: 400, as retrying will not help
    /// (narrow it, or raise `[query] memory_limit`).
    #[error("{0}")]
    ResourcesExhausted(String),
    #[error("internal error: {0}")]
    Internal(String),
}

impl From<forestall_engine::Error> for ApiError {
    fn from(e: forestall_engine::Error) -> Self {
        use forestall_engine::Error as E;
        match e {
            e if e.is_storage_full() => ApiError::StorageFull(format!(
                "not stored: the disk is full ({e}); writes are taken again once space is freed"
            )),
            E::ShuttingDown | E::WalClosed => ApiError::Unavailable,
            e @ E::Overloaded(_) => ApiError::Overloaded(e.to_string()),
            E::UnknownMeasurement(m) => ApiError::NotFound(format!("unknown measurement {m:?}")),
            E::InvalidScan(m) => ApiError::Invalid(m),
            other => ApiError::Internal(other.to_string()),
        }
    }
}

impl ApiError {
    fn status(&self) -> (StatusCode, &'static str) {
        match self {
            ApiError::Invalid(_) => (StatusCode::BAD_REQUEST, "invalid"),
            ApiError::NotFound(_) => (StatusCode::NOT_FOUND, "not found"),
            ApiError::Unauthorized(_) => (StatusCode::UNAUTHORIZED, "unauthorized"),
            ApiError::Forbidden(_) => (StatusCode::FORBIDDEN, "forbidden"),
            ApiError::Conflict(_) => (StatusCode::CONFLICT, "conflict"),
            ApiError::MethodNotAllowed => (StatusCode::METHOD_NOT_ALLOWED, "method not allowed"),
            ApiError::TooLarge(_) => (StatusCode::PAYLOAD_TOO_LARGE, "request too large"),
            ApiError::UnsupportedEncoding(_) | ApiError::UnsupportedMedia(_) => {
                (StatusCode::UNSUPPORTED_MEDIA_TYPE, "unsupported media type")
            }
            ApiError::RequestTimeout(_) => (StatusCode::REQUEST_TIMEOUT, "request timeout"),
            ApiError::StorageFull(_) => (StatusCode::INSUFFICIENT_STORAGE, "storage full"),
            ApiError::Unavailable => (StatusCode::SERVICE_UNAVAILABLE, "unavailable"),
            ApiError::Overloaded(_) => (StatusCode::SERVICE_UNAVAILABLE, "overloaded"),
            ApiError::ResourcesExhausted(_) => (StatusCode::BAD_REQUEST, "resources exhausted"),
            ApiError::Internal(_) => (StatusCode::INTERNAL_SERVER_ERROR, "internal error"),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, code) = self.status();
        let message = match &self {
            ApiError::Internal(detail) => {
                tracing::error!(%detail, "internal error");
                "internal error; see the server log".to_string()
            }
            other => other.to_string(),
        };
        let mut response = (status, Json(json!({"code": code, "error": message}))).into_response();
        if matches!(self, ApiError::Overloaded(_) | ApiError::StorageFull(_)) {
            // Clients with a retry policy (Prometheus' remote write, the InfluxDB clients)
            // back off and come back.
            response.headers_mut().insert(
                axum::http::header::RETRY_AFTER,
                axum::http::HeaderValue::from_static("1"),
            );
        }
        if status == StatusCode::UNAUTHORIZED {
            response.headers_mut().insert(
                axum::http::header::WWW_AUTHENTICATE,
                axum::http::HeaderValue::from_static("Bearer realm=\"forestall\""),
            );
        }
        response
    }
}
