//! `POST /api/v1/write`: Prometheus remote write 1.0 (VictoriaMetrics' path, which Prometheus
//! users already configure). A snappy block of a `prometheus.WriteRequest`, turned into line
//! protocol ([`forestall_engine::prometheus`]) and stored through the same write path as
//! every line. 204 when every series was stored; 400 with the rejected series and lines when
//! some were not (the others are stored, and Prometheus does not retry a 4xx, so nothing is
//! written twice); 415 for remote write 2.0 or an encoding other than snappy.

use std::sync::Arc;

use axum::Json;
use axum::body::Body;
use axum::extract::{Extension, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use forestall_engine::Metrics;
use forestall_engine::line_protocol::Precision;
use forestall_engine::prometheus;
use forestall_engine::store::now_nanos;
use serde_json::json;

use super::{AppState, read_limited};
use crate::auth::Identity;
use crate::error::ApiError;

pub(super) async fn write(
    State(state): State<AppState>,
    Extension(identity): Extension<Identity>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let text = |name| {
        headers
            .get(name)
            .map(|v| v.to_str().unwrap_or("?").trim().to_ascii_lowercase())
    };
    if let Some(t) = text(header::CONTENT_TYPE)
        && t.contains("io.prometheus.write.v2")
    {
        return Err(ApiError::UnsupportedMedia(
            "remote write 2.0 is not supported: send 1.0 (prometheus.WriteRequest)".into(),
        ));
    }
    match text(header::CONTENT_ENCODING).as_deref() {
        None | Some("snappy") => {}
        Some(e) => {
            return Err(ApiError::UnsupportedMedia(format!(
                "unsupported Content-Encoding {e:?}: remote write is snappy"
            )));
        }
    }
    let limit = state.max_body_bytes;
    let raw = read_limited(body, limit).await?;
    let store = Arc::clone(&state.store);
    let now = now_nanos();
    let (summary, outcome) = tokio::task::spawn_blocking(move || {
        let size = snap::raw::decompress_len(&raw)
            .map_err(|e| ApiError::Invalid(format!("invalid snappy body: {e}")))?;
        if size as u64 > limit {
            return Err(ApiError::TooLarge(limit));
        }
        let request = snap::raw::Decoder::new()
            .decompress_vec(&raw)
            .map_err(|e| ApiError::Invalid(format!("invalid snappy body: {e}")))?;
        let converted =
            prometheus::convert(&request).map_err(|e| ApiError::Invalid(e.to_string()))?;
        super::check_measurements(&identity, converted.parsed())?;
        let outcome = if converted.lines.is_empty() {
            Default::default()
        } else {
            store.write_parsed(
                converted.lines.as_bytes(),
                converted.parsed(),
                Precision::Milliseconds,
                now,
            )?
        };
        let m = store.metrics();
        for (counter, n) in [
            (&m.remote_write_samples_total, outcome.accepted_lines),
            (&m.remote_write_stale_markers_total, converted.stale_markers),
            (&m.remote_write_non_finite_total, converted.non_finite),
            (
                &m.remote_write_histograms_dropped_total,
                converted.histograms,
            ),
            (
                &m.remote_write_series_rejected_total,
                converted.rejected_series,
            ),
        ] {
            Metrics::add(counter, n as u64);
        }
        let summary = Summary {
            series: converted.series,
            samples: converted.samples,
            rejected_series: converted.rejected_series,
            rejected: converted.rejected,
        };
        Ok((summary, outcome))
    })
    .await
    .map_err(|e| ApiError::Internal(format!("write task failed: {e}")))??;
    if summary.rejected_series == 0 && outcome.rejected_lines == 0 {
        return Ok(StatusCode::NO_CONTENT.into_response());
    }
    // The lines are ours, not the client's: their reasons, without line numbers.
    let sample_errors: Vec<_> = outcome.errors.iter().map(|e| e.reason.clone()).collect();
    let body = json!({
        "code": "invalid",
        "error": format!(
            "partial write: {} of {} series rejected, {} of {} samples rejected",
            summary.rejected_series,
            summary.series,
            outcome.rejected_lines,
            summary.samples,
        ),
        "rejected_series": summary.rejected,
        "sample_errors": sample_errors,
        "stored_samples": outcome.accepted_lines,
    });
    Ok((StatusCode::BAD_REQUEST, Json(body)).into_response())
}

/// What the response says of a conversion (which borrows the request, gone by then).
struct Summary {
    series: usize,
    samples: usize,
    rejected_series: usize,
    rejected: Vec<String>,
}
