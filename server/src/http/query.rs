//! `GET` and `POST /api/v3/query_sql`: SQL over HTTP.
//!
//! Parameters `q` (the SQL) and `format`: `json` (an array of objects, the default), `jsonl`,
//! `csv` (with a header), `parquet`, or `pretty` (a text table). `POST` takes the same as a
//! JSON body (`{"q": "...", "format": "csv"}`). `db` is accepted and ignored (one namespace).
//! A wrong query is a 400 with the planner's message; a query that runs longer than
//! `query.timeout` or returns more than `query.max_result_rows` rows is stopped.

use std::collections::HashMap;

use arrow::datatypes::SchemaRef;
use arrow::record_batch::RecordBatch;
use axum::body::Bytes;
use axum::extract::{Query, State};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;

use super::AppState;
use crate::error::ApiError;

#[derive(Debug, Deserialize)]
struct QueryBody {
    q: String,
    #[serde(default)]
    format: Option<String>,
    #[serde(default)]
    #[allow(dead_code)]
    db: Option<String>,
}

pub(super) async fn get(
    State(state): State<AppState>,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Response, ApiError> {
    let sql = q
        .get("q")
        .filter(|s| !s.trim().is_empty())
        .ok_or_else(|| ApiError::Invalid("missing query parameter q".into()))?;
    run(state, sql, q.get("format").map(String::as_str)).await
}

pub(super) async fn post(State(state): State<AppState>, body: Bytes) -> Result<Response, ApiError> {
    let body: QueryBody = serde_json::from_slice(&body).map_err(|e| {
        ApiError::Invalid(format!(
            "expected a JSON body {{\"q\": \"SELECT ...\", \"format\": \"json\"}}: {e}"
        ))
    })?;
    run(state, &body.q, body.format.as_deref()).await
}

#[derive(Debug, Clone, Copy)]
enum Format {
    Json,
    Jsonl,
    Csv,
    Parquet,
    Pretty,
}

async fn run(state: AppState, sql: &str, format: Option<&str>) -> Result<Response, ApiError> {
    let format = match format.unwrap_or("json") {
        "json" => Format::Json,
        "jsonl" => Format::Jsonl,
        "csv" => Format::Csv,
        "parquet" => Format::Parquet,
        "pretty" => Format::Pretty,
        other => {
            return Err(ApiError::Invalid(format!(
                "unknown format {other:?}: use json, jsonl, csv, parquet or pretty"
            )));
        }
    };
    let limits = state.query_limits;
    let result = tokio::time::timeout(limits.timeout, state.query.sql(sql)).await;
    let (schema, batches) = match result {
        Err(_) => {
            return Err(ApiError::Invalid(format!(
                "query timed out after {}",
                humantime::format_duration(limits.timeout)
            )));
        }
        Ok(Err(forestall_query::Error::Query(m))) => return Err(ApiError::Invalid(m)),
        Ok(Err(e)) => return Err(ApiError::Internal(e.to_string())),
        Ok(Ok(r)) => r,
    };
    let rows: usize = batches.iter().map(|b| b.num_rows()).sum();
    if rows > limits.max_result_rows {
        return Err(ApiError::Invalid(format!(
            "the result has {rows} rows, more than the limit of {}; add a LIMIT or aggregate",
            limits.max_result_rows
        )));
    }
    encode(format, &schema, &batches)
}

fn encode(
    format: Format,
    schema: &SchemaRef,
    batches: &[RecordBatch],
) -> Result<Response, ApiError> {
    let internal = |e: &dyn std::fmt::Display| ApiError::Internal(format!("encode result: {e}"));
    let refs: Vec<&RecordBatch> = batches.iter().collect();
    let (content_type, body): (&str, Vec<u8>) = match format {
        Format::Json => {
            let mut w = arrow::json::ArrayWriter::new(Vec::new());
            w.write_batches(&refs).map_err(|e| internal(&e))?;
            w.finish().map_err(|e| internal(&e))?;
            let mut out = w.into_inner();
            if out.is_empty() {
                out.extend_from_slice(b"[]");
            }
            ("application/json", out)
        }
        Format::Jsonl => {
            let mut w = arrow::json::LineDelimitedWriter::new(Vec::new());
            w.write_batches(&refs).map_err(|e| internal(&e))?;
            w.finish().map_err(|e| internal(&e))?;
            ("application/jsonl", w.into_inner())
        }
        Format::Csv => {
            let mut w = arrow::csv::WriterBuilder::new()
                .with_header(true)
                .build(Vec::new());
            if batches.is_empty() {
                w.write(&RecordBatch::new_empty(schema.clone()))
                    .map_err(|e| internal(&e))?;
            }
            for b in batches {
                w.write(b).map_err(|e| internal(&e))?;
            }
            ("text/csv; charset=utf-8", w.into_inner())
        }
        Format::Parquet => {
            let mut w = parquet::arrow::ArrowWriter::try_new(Vec::new(), schema.clone(), None)
                .map_err(|e| internal(&e))?;
            for b in batches {
                w.write(b).map_err(|e| internal(&e))?;
            }
            (
                "application/vnd.apache.parquet",
                w.into_inner().map_err(|e| internal(&e))?,
            )
        }
        Format::Pretty => {
            let text = arrow::util::pretty::pretty_format_batches(batches)
                .map_err(|e| internal(&e))?
                .to_string();
            (
                "text/plain; charset=utf-8",
                format!("{text}\n").into_bytes(),
            )
        }
    };
    Ok(([(header::CONTENT_TYPE, content_type)], body).into_response())
}
