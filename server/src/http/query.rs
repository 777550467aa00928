//! `GET` and `POST /api/v3/query_sql`: SQL over HTTP.
//!
//! Parameters `q` (the SQL) and `format`: `json` (an array of objects, the default), `jsonl`,
//! `csv` (with a header), `parquet`, `arrow` (an Arrow IPC stream) or `pretty` (a text table). `POST` takes the same as a
//! JSON body (`{"q": "...", "format": "csv"}`). `db` is accepted and ignored (one namespace).
//! `params` gives values for the statement's placeholders, as InfluxDB 3 takes them: a JSON
//! object (in `GET`, URL-encoded JSON), `{"q": "SELECT * FROM cpu WHERE host = $host AND
//! usage > $1", "params": {"host": "a", "1": 90}}`. Strings, numbers, booleans and null;
//! each value is cast to the type its place in the plan has.
//! A wrong query is a 400 with the planner's message; a query that runs longer than
//! `query.timeout` or returns more than `query.max_result_rows` rows is stopped. A query
//! waits for a turn among those running ([`super::QuerySlots`]) and gets a 503 with
//! `Retry-After` when none comes within `query.queue_timeout`.

use std::collections::HashMap;

use arrow::datatypes::SchemaRef;
use arrow::record_batch::RecordBatch;
use axum::body::Bytes;
use axum::extract::{Extension, Query, State};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use futures::StreamExt;
use serde::Deserialize;

use super::AppState;
use crate::auth::{Identity, Need};
use crate::error::ApiError;

#[derive(Debug, Deserialize)]
struct QueryBody {
    q: String,
    #[serde(default)]
    format: Option<String>,
    #[serde(default)]
    #[allow(dead_code)]
    db: Option<String>,
    #[serde(default)]
    params: Option<serde_json::Map<String, serde_json::Value>>,
}

/// `params` as values for the query engine: keys without their `$`, JSON scalars as SQL
/// literals (integers as Int64, other numbers as Float64).
fn params(
    json: Option<&serde_json::Map<String, serde_json::Value>>,
) -> Result<forestall_query::Params, ApiError> {
    use datafusion::common::ScalarValue;
    use serde_json::Value;
    let mut out = forestall_query::Params::new();
    for (name, value) in json.into_iter().flatten() {
        let name = name.strip_prefix('$').unwrap_or(name);
        if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            return Err(ApiError::Invalid(format!(
                "params: {name:?} is not a parameter name (letters, digits and _)"
            )));
        }
        let scalar = match value {
            Value::Null => ScalarValue::Null,
            Value::Bool(b) => ScalarValue::Boolean(Some(*b)),
            Value::String(s) => ScalarValue::Utf8(Some(s.clone())),
            Value::Number(n) => match n.as_i64() {
                Some(i) => ScalarValue::Int64(Some(i)),
                None => ScalarValue::Float64(n.as_f64()),
            },
            Value::Array(_) | Value::Object(_) => {
                return Err(ApiError::Invalid(format!(
                    "params: ${name} must be a string, number, boolean or null"
                )));
            }
        };
        out.insert(name.to_owned(), scalar);
    }
    Ok(out)
}

pub(super) async fn get(
    State(state): State<AppState>,
    Extension(identity): Extension<Identity>,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Response, ApiError> {
    let sql = q
        .get("q")
        .filter(|s| !s.trim().is_empty())
        .ok_or_else(|| ApiError::Invalid("missing query parameter q".into()))?;
    let json = match q.get("params") {
        None => None,
        Some(text) => Some(
            serde_json::from_str::<serde_json::Map<String, serde_json::Value>>(text)
                .map_err(|e| ApiError::Invalid(format!("params must be a JSON object: {e}")))?,
        ),
    };
    run(
        as_caller(state, &identity),
        sql,
        params(json.as_ref())?,
        q.get("format").map(String::as_str),
    )
    .await
}

pub(super) async fn post(
    State(state): State<AppState>,
    Extension(identity): Extension<Identity>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let body: QueryBody = serde_json::from_slice(&body).map_err(|e| {
        ApiError::Invalid(format!(
            "expected a JSON body {{\"q\": \"SELECT ...\", \"format\": \"json\", \"params\": {{}}}}: {e}"
        ))
    })?;
    let params = params(body.params.as_ref())?;
    run(
        as_caller(state, &identity),
        &body.q,
        params,
        body.format.as_deref(),
    )
    .await
}

/// The state with a query engine that does what `identity` may: creating and dropping
/// continuous queries in SQL needs the admin permission, as their HTTP API does; and that
/// names it in the audit trail of those statements.
fn as_caller(mut state: AppState, identity: &Identity) -> AppState {
    state.query = state.query.on_behalf_of(identity.audit_name());
    if !identity.allows(Need::Admin) {
        state.query = state.query.refusing_changes(format!(
            "the token {:?} may query but not create or drop continuous queries: that needs the admin permission",
            identity.name
        ));
    }
    state
}

#[derive(Debug, Clone, Copy)]
enum Format {
    Json,
    Jsonl,
    Csv,
    Parquet,
    Pretty,
    Arrow,
}

/// Rows buffered before the response starts. A result that ends within them gets an exact
/// status (a 400 for a limit or a runtime error); a longer one is streamed, and an error after
/// the first byte can only cut the response short (and is logged).
const BUFFER_ROWS: usize = 8192;

async fn run(
    state: AppState,
    sql: &str,
    params: forestall_query::Params,
    format: Option<&str>,
) -> Result<Response, ApiError> {
    let format = match format.unwrap_or("json") {
        "json" => Format::Json,
        "jsonl" => Format::Jsonl,
        "csv" => Format::Csv,
        "parquet" => Format::Parquet,
        "pretty" => Format::Pretty,
        "arrow" => Format::Arrow,
        other => {
            return Err(ApiError::Invalid(format!(
                "unknown format {other:?}: use json, jsonl, csv, parquet, arrow or pretty"
            )));
        }
    };
    let limits = state.query_limits.clone();
    // The slot is held by the response's stream, until the last row is sent or the client
    // goes away.
    let slot = limits.slots.acquire().await.map_err(ApiError::Overloaded)?;
    let (timeout, max_result_rows) = (limits.timeout, limits.max_result_rows);
    let deadline = tokio::time::Instant::now() + timeout;
    let timed_out = move || {
        ApiError::Invalid(format!(
            "query timed out after {}",
            humantime::format_duration(timeout)
        ))
    };
    let too_many = move || {
        ApiError::Invalid(format!(
            "the result has more than {max_result_rows} rows; add a LIMIT or aggregate"
        ))
    };
    // Planning, the scans and encoding all run in one task on the query runtime (a result
    // costs the queries' priority, not the writes'), which hands the encoded bytes over.
    let steps = futures::stream::unfold(
        Step::Plan(Box::new(state.query.clone()), sql.to_owned(), params),
        move |step| async move {
            match step {
                Step::Plan(query, sql, params) => {
                    let started =
                        match tokio::time::timeout_at(deadline, query.start_with(&sql, &params))
                            .await
                        {
                            Err(_) => Err(timed_out()),
                            Ok(Err(e)) => Err(query_error(e)),
                            Ok(Ok((schema, stream))) => {
                                Encoder::new(format, &schema).map(|encoder| (encoder, stream))
                            }
                        };
                    Some(match started {
                        Err(e) => (Err(e), Step::Done),
                        Ok((mut encoder, stream)) => (
                            Ok(Chunk::Rows(encoder.start(), 0)),
                            Step::Run(encoder, stream, 0),
                        ),
                    })
                }
                Step::Run(mut encoder, mut stream, rows) => {
                    let (chunk, next) = match tokio::time::timeout_at(deadline, stream.next()).await
                    {
                        Err(_) => (Err(timed_out()), Step::Done),
                        Ok(Some(Err(e))) => (Err(query_error(e.into())), Step::Done),
                        Ok(Some(Ok(batch))) => {
                            let rows = rows + batch.num_rows();
                            if rows > max_result_rows {
                                (Err(too_many()), Step::Done)
                            } else {
                                match encoder.batch(&batch) {
                                    Ok(bytes) => (
                                        Ok(Chunk::Rows(bytes, rows)),
                                        Step::Run(encoder, stream, rows),
                                    ),
                                    Err(e) => (Err(e), Step::Done),
                                }
                            }
                        }
                        Ok(None) => (encoder.finish().map(Chunk::End), Step::Done),
                    };
                    Some((chunk, next))
                }
                Step::Done => None,
            }
        },
    );
    let streams = format.streams();
    let mut head = Vec::new();
    let mut chunks = state.query.forward(steps);
    loop {
        match chunks.next().await {
            None => {
                return Err(ApiError::Internal(
                    "the query ended without a result".into(),
                ));
            }
            Some(Err(e)) => return Err(e),
            Some(Ok(Chunk::Rows(bytes, rows))) => {
                head.extend(bytes);
                if rows >= BUFFER_ROWS && streams {
                    break;
                }
            }
            Some(Ok(Chunk::End(bytes))) => {
                head.extend(bytes);
                return Ok(([(header::CONTENT_TYPE, format.content_type())], head).into_response());
            }
        }
    }
    // Stream the rest; an error after the first byte can only cut the response short.
    let rest = chunks.map(move |chunk| {
        let _running = &slot;
        match chunk {
            Ok(Chunk::Rows(bytes, _) | Chunk::End(bytes)) => Ok(Bytes::from(bytes)),
            Err(e) => {
                tracing::warn!(error = %e, "query stream cut short");
                Err(std::io::Error::other(e.to_string()))
            }
        }
    });
    let body = futures::stream::once(async move { Ok(Bytes::from(head)) }).chain(rest);
    Ok((
        [(header::CONTENT_TYPE, format.content_type())],
        axum::body::Body::from_stream(body),
    )
        .into_response())
}

/// Where a query is: to be planned, running, or over.
enum Step {
    Plan(
        Box<forestall_query::QueryEngine>,
        String,
        forestall_query::Params,
    ),
    Run(
        Encoder,
        datafusion::execution::SendableRecordBatchStream,
        usize,
    ),
    Done,
}

/// A piece of an encoded result: a batch's bytes with the rows so far, or the last bytes.
enum Chunk {
    Rows(Vec<u8>, usize),
    End(Vec<u8>),
}

fn query_error(e: forestall_query::Error) -> ApiError {
    crate::continuous::query_error(e)
}

impl Format {
    /// Whether bytes can go out before the last batch.
    fn streams(self) -> bool {
        matches!(
            self,
            Format::Json | Format::Jsonl | Format::Csv | Format::Arrow
        )
    }

    fn content_type(self) -> &'static str {
        match self {
            Format::Json => "application/json",
            Format::Jsonl => "application/jsonl",
            Format::Csv => "text/csv; charset=utf-8",
            Format::Parquet => "application/vnd.apache.parquet",
            Format::Pretty => "text/plain; charset=utf-8",
            Format::Arrow => "application/vnd.apache.arrow.stream",
        }
    }
}

/// Turns batches into the bytes of one format, a batch at a time where the format allows.
enum Encoder {
    Json {
        first: bool,
    },
    Jsonl,
    Csv {
        header: bool,
        schema: SchemaRef,
    },
    Parquet(Option<Box<parquet::arrow::ArrowWriter<Vec<u8>>>>),
    Pretty(Vec<RecordBatch>),
    /// Arrow IPC stream: the schema, then each batch as it comes.
    Arrow(Box<arrow_ipc::writer::StreamWriter<Vec<u8>>>),
}

fn internal(e: &dyn std::fmt::Display) -> ApiError {
    ApiError::Internal(format!("encode result: {e}"))
}

impl Encoder {
    fn new(format: Format, schema: &SchemaRef) -> Result<Self, ApiError> {
        Ok(match format {
            Format::Json => Encoder::Json { first: true },
            Format::Jsonl => Encoder::Jsonl,
            Format::Csv => Encoder::Csv {
                header: true,
                schema: schema.clone(),
            },
            Format::Parquet => Encoder::Parquet(Some(Box::new(
                parquet::arrow::ArrowWriter::try_new(Vec::new(), schema.clone(), None)
                    .map_err(|e| internal(&e))?,
            ))),
            Format::Pretty => Encoder::Pretty(Vec::new()),
            Format::Arrow => Encoder::Arrow(Box::new(
                arrow_ipc::writer::StreamWriter::try_new(Vec::new(), schema)
                    .map_err(|e| internal(&e))?,
            )),
        })
    }

    fn start(&mut self) -> Vec<u8> {
        match self {
            Encoder::Json { .. } => b"[".to_vec(),
            // The schema message, written when the writer was made.
            Encoder::Arrow(w) => std::mem::take(w.get_mut()),
            _ => Vec::new(),
        }
    }

    fn batch(&mut self, batch: &RecordBatch) -> Result<Vec<u8>, ApiError> {
        if batch.num_rows() == 0 {
            return Ok(Vec::new());
        }
        match self {
            Encoder::Json { first } => {
                let mut w = arrow::json::ArrayWriter::new(Vec::new());
                w.write(batch).map_err(|e| internal(&e))?;
                w.finish().map_err(|e| internal(&e))?;
                let array = w.into_inner();
                // `[{..},{..}]` without its brackets, joined to what came before.
                let inner = array.get(1..array.len() - 1).unwrap_or_default();
                let mut out = Vec::with_capacity(inner.len() + 1);
                if !*first {
                    out.push(b',');
                }
                *first = false;
                out.extend_from_slice(inner);
                Ok(out)
            }
            Encoder::Jsonl => {
                let mut w = arrow::json::LineDelimitedWriter::new(Vec::new());
                w.write(batch).map_err(|e| internal(&e))?;
                w.finish().map_err(|e| internal(&e))?;
                Ok(w.into_inner())
            }
            Encoder::Csv { header, .. } => {
                let mut w = arrow::csv::WriterBuilder::new()
                    .with_header(*header)
                    .build(Vec::new());
                w.write(batch).map_err(|e| internal(&e))?;
                *header = false;
                Ok(w.into_inner())
            }
            Encoder::Parquet(w) => {
                w.as_mut()
                    .ok_or_else(|| internal(&"parquet writer already finished"))?
                    .write(batch)
                    .map_err(|e| internal(&e))?;
                Ok(Vec::new())
            }
            Encoder::Pretty(batches) => {
                batches.push(batch.clone());
                Ok(Vec::new())
            }
            Encoder::Arrow(w) => {
                w.write(batch).map_err(|e| internal(&e))?;
                Ok(std::mem::take(w.get_mut()))
            }
        }
    }

    fn finish(&mut self) -> Result<Vec<u8>, ApiError> {
        match self {
            Encoder::Json { .. } => Ok(b"]".to_vec()),
            Encoder::Jsonl => Ok(Vec::new()),
            Encoder::Csv { header, schema } => {
                if !*header {
                    return Ok(Vec::new());
                }
                // No rows: still the header line.
                let mut w = arrow::csv::WriterBuilder::new()
                    .with_header(true)
                    .build(Vec::new());
                w.write(&RecordBatch::new_empty(schema.clone()))
                    .map_err(|e| internal(&e))?;
                *header = false;
                Ok(w.into_inner())
            }
            Encoder::Parquet(w) => w
                .take()
                .ok_or_else(|| internal(&"parquet writer already finished"))?
                .into_inner()
                .map_err(|e| internal(&e)),
            Encoder::Arrow(w) => {
                w.finish().map_err(|e| internal(&e))?;
                Ok(std::mem::take(w.get_mut()))
            }
            Encoder::Pretty(batches) => {
                let text = arrow::util::pretty::pretty_format_batches(batches)
                    .map_err(|e| internal(&e))?
                    .to_string();
                Ok(format!("{text}\n").into_bytes())
            }
        }
    }
}
