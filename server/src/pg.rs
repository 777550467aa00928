//! The PostgreSQL wire protocol, so that `psql` and ordinary Postgres drivers (psycopg, JDBC,
//! Grafana's Postgres source) query Forestall with the same SQL as `/api/v3/query_sql`.
//!
//! * Simple and extended query protocols. Prepared statements are planned once by DataFusion;
//!   `$1`-style parameters take their types from the plan where DataFusion can infer them, and
//!   from what the client declared otherwise.
//! * Each connection has its own DataFusion session, so `SET datafusion.…` lasts for the
//!   connection. Other `SET`s (`client_encoding`, `application_name`, …) and `BEGIN` /
//!   `COMMIT` / `ROLLBACK` are accepted and do nothing: the store is read-only over this
//!   protocol, so there is nothing for a transaction to protect.
//! * Columns are typed: `bool`, `int2/4/8`, `float4/8`, `text`, `timestamp(tz)`, `date`,
//!   `bytea`; other Arrow types (intervals, decimals, structs, lists) arrive as text.
//!   Text-format timestamps print as Postgres prints them (`2026-01-01 00:08:00`).
//!   Unsigned 64-bit fields are sent as `int8`; a value above `i64::MAX` is an error.
//! * Errors are Postgres error responses with a SQLSTATE: `42601` syntax, `42P01` unknown
//!   table, `42703` unknown column, `42000` other planning errors, `57014` timeout, `54000`
//!   the result-size limit, `53000` no turn among the queries running at once
//!   (`query.max_concurrent`, `query.queue_timeout`), `53200` more memory than a session may
//!   hold (`query.memory_limit`), `XX000` internal.
//! * With auth on ([`crate::auth`]), the password is a token with the `query` permission
//!   (any user name), sent as `AuthenticationCleartextPassword` asks. With `[tls]`
//!   configured, connections may ask for TLS (`sslmode=require` or `verify-full`), and a
//!   password is taken only over TLS; without it, off the host, tunnel or terminate TLS in
//!   front. Creating or dropping a continuous query also needs `admin`. Without auth, any
//!   user name and no password.
//! * At most `[pg] max_connections` connections at once; one more gets SQLSTATE 53300
//!   ([`crate::listen`]).
//! * A message that is not well formed (a length under 4, counts or strings running past its
//!   end, bytes after it, an unknown type) gets a FATAL error with SQLSTATE 08P01 and the
//!   connection is closed, as in PostgreSQL ([`wire`]).

use std::fmt::Debug;
use std::sync::Arc;
use std::time::Duration;

use arrow::array::{Array, AsArray, RecordBatch};
use arrow::datatypes::{
    DataType, Date32Type, Float32Type, Float64Type, Int8Type, Int16Type, Int32Type, Int64Type,
    TimeUnit, TimestampNanosecondType, UInt8Type, UInt16Type, UInt32Type, UInt64Type,
};
use arrow::util::display::{ArrayFormatter, FormatOptions};
use async_trait::async_trait;
use chrono::{DateTime, NaiveDate, NaiveDateTime, Utc};
use datafusion::common::{DataFusionError, ParamValues, ScalarValue};
use datafusion::execution::SendableRecordBatchStream;
use datafusion::execution::context::SessionContext;
use datafusion::logical_expr::{LogicalPlan, Statement, TransactionConclusion};
use datafusion::sql::parser::{DFParser, Statement as DfStatement};
use datafusion::sql::sqlparser::dialect::PostgreSqlDialect;
use forestall_query::QueryEngine;
use futures::{Sink, StreamExt, stream};
use pgwire::api::auth::mechanism::{AuthMechanism, AuthState};
use pgwire::api::auth::{
    AuthDriver, AuthOutcome, DefaultServerParameterProvider, StartupHandler, protocol_negotiation,
    save_startup_parameters_to_metadata,
};
use pgwire::api::portal::{Format, Portal};
use pgwire::api::query::{ExtendedQueryHandler, SimpleQueryHandler};
use pgwire::api::results::{DataRowEncoder, FieldFormat, FieldInfo, QueryResponse, Response, Tag};
use pgwire::api::stmt::QueryParser;
use pgwire::api::store::PortalStore;
use pgwire::api::{ClientInfo, ClientPortalStore, NoopHandler, PgWireServerHandlers, Type};
use pgwire::error::{ErrorInfo, PgWireError, PgWireResult};
use pgwire::messages::data::DataRow;
use pgwire::messages::startup::{Authentication, PasswordMessageFamily};
use pgwire::messages::{PgWireBackendMessage, PgWireFrontendMessage};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

mod wire;

use crate::auth::{Identity, Need, Tokens};
use crate::http::{QueryLimits, QuerySlot};
use crate::listen::Connections;

/// Serves the Postgres protocol on `listener` until `shutdown` resolves. Connections already
/// open end with the process.
pub async fn serve(
    listener: TcpListener,
    query: QueryEngine,
    limits: QueryLimits,
    tokens: Option<Tokens>,
    connections: Connections,
    tls: Option<TlsAcceptor>,
    shutdown: impl std::future::Future<Output = ()> + Send,
) {
    let handlers = Arc::new(Handlers {
        backend: Arc::new(Backend {
            parser: Arc::new(Parser {
                query: query.clone(),
            }),
            query,
            limits,
            auth: tokens.is_some(),
        }),
        startup: Arc::new(Startup {
            tokens,
            password_needs_tls: tls.is_some(),
            driver: AuthDriver::new(DefaultServerParameterProvider::default()),
        }),
    });
    tokio::pin!(shutdown);
    loop {
        let socket = tokio::select! {
            _ = &mut shutdown => return,
            accepted = listener.accept() => match accepted {
                Ok((socket, _)) => socket,
                Err(e) => {
                    tracing::warn!(error = %e, "pg accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let _ = socket.set_nodelay(true);
        let Some(permit) = connections.admit() else {
            tokio::spawn(crate::listen::refuse_pg(socket));
            continue;
        };
        let (handlers, tls) = (Arc::clone(&handlers), tls.clone());
        tokio::spawn(async move {
            let _permit = permit;
            if let Err(e) = wire::process_socket(socket, tls, handlers).await {
                tracing::debug!(error = %e, "pg connection ended with an error");
            }
        });
    }
}

struct Handlers {
    backend: Arc<Backend>,
    startup: Arc<Startup>,
}

impl PgWireServerHandlers for Handlers {
    fn simple_query_handler(&self) -> Arc<impl SimpleQueryHandler> {
        Arc::clone(&self.backend)
    }

    fn extended_query_handler(&self) -> Arc<impl ExtendedQueryHandler> {
        Arc::clone(&self.backend)
    }

    fn startup_handler(&self) -> Arc<impl StartupHandler> {
        Arc::clone(&self.startup)
    }
}

/// The connection's start: without auth, pgwire's no-op handshake (no password); with it, a
/// cleartext password that must be a token with the query permission, whose identity is kept
/// in the session's extensions ([`ConnIdentity`]).
struct Startup {
    tokens: Option<Tokens>,
    /// Whether the listener has TLS, and so takes passwords only over it.
    password_needs_tls: bool,
    driver: AuthDriver<DefaultServerParameterProvider, Identity>,
}

/// The token a connection authenticated with.
struct ConnIdentity(Identity);

#[async_trait]
impl StartupHandler for Startup {
    async fn on_startup<C>(
        &self,
        client: &mut C,
        message: PgWireFrontendMessage,
    ) -> PgWireResult<()>
    where
        C: ClientInfo + Sink<PgWireBackendMessage> + Unpin + Send + Sync,
        C::Error: Debug,
        PgWireError: From<<C as Sink<PgWireBackendMessage>>::Error>,
    {
        let Some(tokens) = &self.tokens else {
            return NoopHandler.on_startup(client, message).await;
        };
        let outcome = match message {
            PgWireFrontendMessage::Startup(ref startup) => {
                if self.password_needs_tls && !client.is_secure() {
                    return Err(PgWireError::UserError(Box::new(ErrorInfo::new(
                        "FATAL".into(),
                        "28000".into(),
                        "this server takes tokens only over TLS: connect with sslmode=require \
                         (or verify-full)"
                            .into(),
                    ))));
                }
                protocol_negotiation(client, startup).await?;
                save_startup_parameters_to_metadata(client, startup);
                let mechanism = Box::new(TokenPassword(tokens.clone()));
                self.driver.begin_authentication(client, mechanism).await?
            }
            PgWireFrontendMessage::PasswordMessageFamily(m) => {
                self.driver.advance_authentication(client, m).await?
            }
            _ => return Ok(()),
        };
        if let AuthOutcome::Authenticated {
            identity,
            final_message,
        } = outcome
        {
            if let Some(identity) = identity {
                client
                    .session_extensions()
                    .get_or_insert_with(|| ConnIdentity(identity));
            }
            self.driver
                .complete_authentication(client, final_message)
                .await?;
        }
        Ok(())
    }
}

/// A cleartext password checked as a token with the query permission.
struct TokenPassword(Tokens);

#[async_trait]
impl AuthMechanism<Identity> for TokenPassword {
    async fn begin(
        &mut self,
        _client: &(dyn ClientInfo + Send + Sync),
    ) -> PgWireResult<AuthState<Identity>> {
        Ok(AuthState::InProgress(Authentication::CleartextPassword))
    }

    async fn next(
        &mut self,
        _client: &(dyn ClientInfo + Send + Sync),
        message: PasswordMessageFamily,
    ) -> PgWireResult<AuthState<Identity>> {
        let password = message.into_password()?;
        Ok(match self.0.check(Some(&password.password), Need::Query) {
            Ok(identity) => AuthState::Ok {
                final_message: None,
                identity: Some(identity),
            },
            Err(refused) => AuthState::Failed(PgWireError::UserError(Box::new(ErrorInfo::new(
                "FATAL".into(),
                "28P01".into(),
                format!(
                    "{refused} (send a Forestall token with the query permission as the password)"
                ),
            )))),
        })
    }
}

struct Backend {
    query: QueryEngine,
    limits: QueryLimits,
    parser: Arc<Parser>,
    /// Whether connections authenticated with a token ([`ConnIdentity`]).
    auth: bool,
}

/// Who runs a connection's statements: the name the audit trail gives them, and whether
/// they may create and drop continuous queries.
struct Caller {
    name: String,
    admin: bool,
}

impl Backend {
    /// The connection's caller: without auth, anonymous and allowed everything; with it,
    /// its token's name, an administrator when the token has the admin permission.
    fn caller<C: ClientInfo>(&self, client: &C) -> Caller {
        let identity = client.session_extensions().get::<ConnIdentity>();
        match (&identity, self.auth) {
            (Some(id), true) => Caller {
                name: id.0.audit_name().to_owned(),
                admin: id.0.allows(Need::Admin),
            },
            (_, auth) => Caller {
                name: "anonymous".into(),
                admin: !auth,
            },
        }
    }
}

/// The connection's DataFusion session, kept in its extensions.
struct ConnSession(SessionContext);

fn session<C: ClientInfo>(client: &C, query: &QueryEngine) -> SessionContext {
    client
        .session_extensions()
        .get_or_insert_with(|| ConnSession(query.session()))
        .0
        .clone()
}

/// A parsed statement: a plan to run, or one of the session statements answered in place.
#[derive(Debug, Clone)]
enum Stmt {
    Plan(Box<LogicalPlan>),
    Begin,
    Commit,
    Rollback,
    /// A `SET` of something other than DataFusion's options: accepted, ignored.
    Set,
    /// `CREATE`, `DROP` or `SHOW CONTINUOUS QUERIES`, answered by the continuous queries.
    Continuous(String),
}

/// A continuous-query statement's error, with its SQLSTATE.
fn continuous_error(e: forestall_query::Error) -> PgWireError {
    use forestall_query::Error as E;
    match e {
        E::Query(m) => user_error("42601", m),
        E::Exists(m) => user_error("42710", m),
        E::NotFound(m) => user_error("42704", m),
        E::Forbidden(m) => user_error("42501", m),
        e @ E::ResourcesExhausted(_) => user_error("53200", e.to_string()),
        E::Execution(m) => {
            tracing::error!(error = %m, "continuous-query statement failed");
            user_error("XX000", "internal error; see the server log")
        }
    }
}

fn user_error(code: &str, message: impl Into<String>) -> PgWireError {
    PgWireError::UserError(Box::new(ErrorInfo::new(
        "ERROR".into(),
        code.into(),
        message.into(),
    )))
}

/// A DataFusion error as a Postgres error with the closest SQLSTATE.
fn df_error(e: DataFusionError) -> PgWireError {
    let root = e.find_root();
    let message = e.strip_backtrace();
    let code = match root {
        DataFusionError::SQL(..) => "42601",
        DataFusionError::Plan(m) if m.contains("table") && m.contains("not found") => "42P01",
        DataFusionError::SchemaError(..) => "42703",
        DataFusionError::Plan(_) | DataFusionError::NotImplemented(_) => "42000",
        // out_of_memory: the session's pool ([query] memory_limit) refused.
        DataFusionError::ResourcesExhausted(m) => {
            let e = forestall_query::Error::ResourcesExhausted(m.clone());
            return user_error("53200", e.to_string());
        }
        _ => {
            tracing::error!(error = %message, "pg query failed");
            return user_error("XX000", "internal error; see the server log");
        }
    };
    user_error(code, message)
}

/// The statements of `sql`, parsed but not planned.
fn split(sql: &str) -> PgWireResult<Vec<DfStatement>> {
    let statements =
        DFParser::parse_sql_with_dialect(sql, &PostgreSqlDialect {}).map_err(df_error)?;
    Ok(statements.into_iter().collect())
}

/// Plans one statement in the connection's session.
/// [`plan`] on the query runtime: planning costs the queries' priority, not the writes'.
async fn plan_on(
    query: &QueryEngine,
    ctx: &SessionContext,
    statement: DfStatement,
) -> PgWireResult<Stmt> {
    let ctx = ctx.clone();
    query
        .run(async move { plan(&ctx, statement).await })
        .await
        .map_err(|e| user_error("XX000", e.to_string()))?
}

async fn plan(ctx: &SessionContext, statement: DfStatement) -> PgWireResult<Stmt> {
    use datafusion::sql::sqlparser::ast::Statement as Sql;
    // Session statements drivers send on their own (psycopg's `BEGIN`, a pool's `DISCARD
    // ALL`) are answered before DataFusion, which plans only some of their spellings.
    if let DfStatement::Statement(sql) = &statement {
        match sql.as_ref() {
            Sql::StartTransaction { .. } => return Ok(Stmt::Begin),
            Sql::Commit { .. } => return Ok(Stmt::Commit),
            Sql::Rollback { .. } => return Ok(Stmt::Rollback),
            Sql::Discard { .. } | Sql::Deallocate { .. } => return Ok(Stmt::Set),
            _ => {}
        }
    }
    let plan = ctx
        .state()
        .statement_to_plan(statement)
        .await
        .map_err(df_error)?;
    forestall_query::verify_read_only(&plan).map_err(df_error)?;
    Ok(match plan {
        LogicalPlan::Statement(Statement::TransactionStart(_)) => Stmt::Begin,
        LogicalPlan::Statement(Statement::TransactionEnd(end)) => match end.conclusion {
            TransactionConclusion::Commit => Stmt::Commit,
            TransactionConclusion::Rollback => Stmt::Rollback,
        },
        LogicalPlan::Statement(Statement::SetVariable(ref set))
            if !set.variable.to_ascii_lowercase().starts_with("datafusion.") =>
        {
            Stmt::Set
        }
        plan => Stmt::Plan(Box::new(plan)),
    })
}

impl Backend {
    /// Runs one statement: a session statement at once, a query as a row stream.
    async fn run(
        &self,
        ctx: &SessionContext,
        stmt: Stmt,
        params: Option<ParamValues>,
        format: &Format,
        caller: &Caller,
    ) -> PgWireResult<Response> {
        let plan = match stmt {
            Stmt::Begin => return Ok(Response::TransactionStart(Tag::new("BEGIN"))),
            Stmt::Commit => return Ok(Response::TransactionEnd(Tag::new("COMMIT"))),
            Stmt::Rollback => return Ok(Response::TransactionEnd(Tag::new("ROLLBACK"))),
            Stmt::Set => return Ok(Response::Execution(Tag::new("SET"))),
            Stmt::Continuous(sql) => return self.continuous(&sql, format, caller).await,
            Stmt::Plan(plan) => *plan,
        };
        let plan = match params {
            Some(p) => plan.with_param_values(p).map_err(df_error)?,
            None => plan,
        };
        if let LogicalPlan::Statement(_) | LogicalPlan::Ddl(_) = plan {
            // `SET datafusion.…` and the like: DataFusion applies them to the session.
            let tag = if matches!(plan, LogicalPlan::Statement(_)) {
                "SET"
            } else {
                "OK"
            };
            ctx.execute_logical_plan(plan)
                .await
                .map_err(df_error)?
                .collect()
                .await
                .map_err(df_error)?;
            return Ok(Response::Execution(Tag::new(tag)));
        }
        // A turn among the queries running at once, held until the last row is sent.
        let slot = self
            .limits
            .slots
            .acquire()
            .await
            .map_err(|e| user_error("53000", e))?;
        let df = ctx.execute_logical_plan(plan).await.map_err(df_error)?;
        let fields = Arc::new(fields(df.schema().as_arrow(), format));
        let batches = self.query.execute(df);
        // The scans run and rows are encoded on the query runtime, at the queries' priority.
        let rows = self.query.forward(row_stream(
            batches,
            Arc::clone(&fields),
            &self.limits,
            Some(slot),
        ));
        Ok(Response::Query(QueryResponse::new(fields, rows)))
    }
}

impl Backend {
    /// Runs a continuous-query statement: `SHOW` as rows, the others as a command tag.
    async fn continuous(
        &self,
        sql: &str,
        format: &Format,
        caller: &Caller,
    ) -> PgWireResult<Response> {
        let mut engine = self.query.clone().on_behalf_of(&caller.name);
        if !caller.admin {
            engine = engine.refusing_changes(
                "creating or dropping a continuous query needs a token with the admin permission",
            );
        }
        let outcome = match engine.continuous_statement(sql).await {
            Some(Ok(o)) => o,
            Some(Err(e)) => return Err(continuous_error(e)),
            None => return Err(user_error("XX000", "not a continuous-query statement")),
        };
        match outcome {
            forestall_query::continuous::Outcome::Done { tag, .. } => {
                Ok(Response::Execution(Tag::new(tag)))
            }
            forestall_query::continuous::Outcome::Rows(batch) => {
                let fields = Arc::new(fields(batch.schema_ref(), format));
                let schema = batch.schema();
                let batches: SendableRecordBatchStream = Box::pin(
                    datafusion::physical_plan::stream::RecordBatchStreamAdapter::new(
                        schema,
                        stream::once(async move { Ok(batch) }),
                    ),
                );
                let rows = row_stream(batches, Arc::clone(&fields), &self.limits, None);
                Ok(Response::Query(QueryResponse::new(fields, rows)))
            }
        }
    }
}

fn timed_out(limit: Duration) -> PgWireError {
    user_error(
        "57014",
        format!(
            "query timed out after {}",
            humantime::format_duration(limit)
        ),
    )
}

/// Encodes batches into data rows as they come, enforcing the timeout and the row limit;
/// the query's `slot`, if it has one, is held until the stream ends or is dropped.
fn row_stream(
    batches: SendableRecordBatchStream,
    fields: Arc<Vec<FieldInfo>>,
    limits: &QueryLimits,
    slot: Option<QuerySlot>,
) -> impl futures::Stream<Item = PgWireResult<DataRow>> + Send + 'static {
    let (timeout, max_result_rows) = (limits.timeout, limits.max_result_rows);
    let deadline = tokio::time::Instant::now() + timeout;
    let state = (batches, 0usize, false);
    stream::unfold(state, move |(mut batches, rows, done)| {
        let _running = &slot;
        let fields = Arc::clone(&fields);
        async move {
            if done {
                return None;
            }
            let next = match tokio::time::timeout_at(deadline, batches.next()).await {
                Err(_) => {
                    return Some((vec![Err(timed_out(timeout))], (batches, rows, true)));
                }
                Ok(None) => return None,
                Ok(Some(Err(e))) => return Some((vec![Err(df_error(e))], (batches, rows, true))),
                Ok(Some(Ok(b))) => b,
            };
            let rows = rows + next.num_rows();
            if rows > max_result_rows {
                let e = user_error(
                    "54000",
                    format!(
                        "the result has more than {max_result_rows} rows; add a LIMIT or aggregate"
                    ),
                );
                return Some((vec![Err(e)], (batches, rows, true)));
            }
            match encode_batch(&next, &fields) {
                Ok(encoded) => Some((
                    encoded.into_iter().map(Ok).collect(),
                    (batches, rows, false),
                )),
                Err(e) => Some((vec![Err(e)], (batches, rows, true))),
            }
        }
    })
    .flat_map(stream::iter)
}

/// The Postgres type a column is sent as.
fn pg_type(t: &DataType) -> Type {
    match t {
        DataType::Boolean => Type::BOOL,
        DataType::Int8 | DataType::Int16 | DataType::UInt8 => Type::INT2,
        DataType::Int32 | DataType::UInt16 => Type::INT4,
        DataType::Int64 | DataType::UInt32 | DataType::UInt64 => Type::INT8,
        DataType::Float16 | DataType::Float32 => Type::FLOAT4,
        DataType::Float64 => Type::FLOAT8,
        DataType::Timestamp(_, None) => Type::TIMESTAMP,
        DataType::Timestamp(_, Some(_)) => Type::TIMESTAMPTZ,
        DataType::Date32 => Type::DATE,
        DataType::Binary | DataType::LargeBinary | DataType::BinaryView => Type::BYTEA,
        DataType::Dictionary(_, v) => pg_type(v),
        _ => Type::TEXT,
    }
}

fn fields(schema: &arrow::datatypes::Schema, format: &Format) -> Vec<FieldInfo> {
    schema
        .fields()
        .iter()
        .enumerate()
        .map(|(i, f)| {
            FieldInfo::new(
                f.name().clone(),
                None,
                None,
                pg_type(f.data_type()),
                format.format_for(i),
            )
        })
        .collect()
}

/// One column of a batch, ready to encode row by row.
enum Column<'a> {
    Bool(&'a arrow::array::BooleanArray),
    I16(Vec<Option<i16>>),
    I32(Vec<Option<i32>>),
    I64(Vec<Option<i64>>),
    U64(&'a arrow::array::UInt64Array, &'a str),
    F32(&'a arrow::array::Float32Array),
    F64(&'a arrow::array::Float64Array),
    Timestamp(arrow::array::ArrayRef, bool),
    Date(&'a arrow::array::PrimitiveArray<Date32Type>),
    Str(arrow::array::ArrayRef),
    Bytes(arrow::array::ArrayRef),
    Text(ArrayFormatter<'a>, &'a dyn Array),
}

fn internal(e: impl std::fmt::Display) -> PgWireError {
    tracing::error!(error = %e, "pg encode failed");
    user_error("XX000", format!("encode result: {e}"))
}

fn column<'a>(array: &'a arrow::array::ArrayRef, name: &'a str) -> PgWireResult<Column<'a>> {
    use arrow::compute::cast;
    fn widen<T, U>(a: &arrow::array::PrimitiveArray<T>) -> Vec<Option<U>>
    where
        T: arrow::datatypes::ArrowPrimitiveType,
        U: From<T::Native>,
    {
        a.iter().map(|v| v.map(U::from)).collect()
    }
    Ok(match array.data_type() {
        DataType::Boolean => Column::Bool(array.as_boolean()),
        DataType::Int8 => Column::I16(widen::<Int8Type, i16>(array.as_primitive())),
        DataType::Int16 => Column::I16(array.as_primitive::<Int16Type>().iter().collect()),
        DataType::UInt8 => Column::I16(widen::<UInt8Type, i16>(array.as_primitive())),
        DataType::Int32 => Column::I32(array.as_primitive::<Int32Type>().iter().collect()),
        DataType::UInt16 => Column::I32(widen::<UInt16Type, i32>(array.as_primitive())),
        DataType::Int64 => Column::I64(array.as_primitive::<Int64Type>().iter().collect()),
        DataType::UInt32 => Column::I64(widen::<UInt32Type, i64>(array.as_primitive())),
        DataType::UInt64 => Column::U64(array.as_primitive::<UInt64Type>(), name),
        DataType::Float32 => Column::F32(array.as_primitive::<Float32Type>()),
        DataType::Float64 => Column::F64(array.as_primitive::<Float64Type>()),
        DataType::Timestamp(_, tz) => Column::Timestamp(
            cast(array, &DataType::Timestamp(TimeUnit::Nanosecond, None)).map_err(internal)?,
            tz.is_some(),
        ),
        DataType::Date32 => Column::Date(array.as_primitive()),
        DataType::Utf8 | DataType::Utf8View | DataType::LargeUtf8 => {
            Column::Str(cast(array, &DataType::Utf8).map_err(internal)?)
        }
        DataType::Binary | DataType::LargeBinary | DataType::BinaryView => {
            Column::Bytes(cast(array, &DataType::Binary).map_err(internal)?)
        }
        _ => Column::Text(
            ArrayFormatter::try_new(array.as_ref(), &FormatOptions::default().with_null(""))
                .map_err(internal)?,
            array.as_ref(),
        ),
    })
}

fn encode_batch(batch: &RecordBatch, fields: &Arc<Vec<FieldInfo>>) -> PgWireResult<Vec<DataRow>> {
    let schema = batch.schema();
    // Dictionary columns (tags) are unpacked first; then every column is typed once.
    let arrays: Vec<arrow::array::ArrayRef> = batch
        .columns()
        .iter()
        .map(|a| match a.data_type() {
            DataType::Dictionary(_, v) => arrow::compute::cast(a, v).map_err(internal),
            _ => Ok(Arc::clone(a)),
        })
        .collect::<PgWireResult<_>>()?;
    let columns: Vec<Column<'_>> = arrays
        .iter()
        .zip(schema.fields())
        .map(|(a, f)| column(a, f.name()))
        .collect::<PgWireResult<_>>()?;
    let text: Vec<bool> = fields
        .iter()
        .map(|f| f.format() == FieldFormat::Text)
        .collect();
    let mut encoder = DataRowEncoder::new(Arc::clone(fields));
    let mut rows = Vec::with_capacity(batch.num_rows());
    for row in 0..batch.num_rows() {
        for (ci, col) in columns.iter().enumerate() {
            match col {
                Column::Bool(a) => encoder.encode_field(&a.is_valid(row).then(|| a.value(row)))?,
                Column::I16(v) => encoder.encode_field(&v[row])?,
                Column::I32(v) => encoder.encode_field(&v[row])?,
                Column::I64(v) => encoder.encode_field(&v[row])?,
                Column::U64(a, name) => {
                    let v = if a.is_valid(row) {
                        Some(i64::try_from(a.value(row)).map_err(|_| {
                            user_error(
                                "22003",
                                format!(
                                    "value {} of column {name} does not fit a Postgres bigint",
                                    a.value(row)
                                ),
                            )
                        })?)
                    } else {
                        None
                    };
                    encoder.encode_field(&v)?
                }
                Column::F32(a) => encoder.encode_field(&a.is_valid(row).then(|| a.value(row)))?,
                Column::F64(a) => encoder.encode_field(&a.is_valid(row).then(|| a.value(row)))?,
                Column::Timestamp(a, tz) => {
                    let a = a.as_primitive::<TimestampNanosecondType>();
                    let t = a
                        .is_valid(row)
                        .then(|| DateTime::<Utc>::from_timestamp_nanos(a.value(row)));
                    if text[ci] {
                        encoder.encode_field(&t.map(|t| timestamp_text(t, *tz)))?
                    } else if *tz {
                        encoder.encode_field(&t)?
                    } else {
                        encoder.encode_field(&t.map(|t| t.naive_utc()))?
                    }
                }
                Column::Date(a) => {
                    let d = a.is_valid(row).then(|| {
                        NaiveDate::from_num_days_from_ce_opt(a.value(row) + 719_163)
                            .unwrap_or_default()
                    });
                    encoder.encode_field(&d)?
                }
                Column::Bytes(a) => {
                    let a = a.as_binary::<i32>();
                    encoder.encode_field(&a.is_valid(row).then(|| a.value(row)))?
                }
                Column::Str(a) => {
                    let a = a.as_string::<i32>();
                    encoder.encode_field(&a.is_valid(row).then(|| a.value(row)))?
                }
                Column::Text(f, a) => {
                    let s = a.is_valid(row).then(|| f.value(row).to_string());
                    encoder.encode_field(&s)?
                }
            }
        }
        rows.push(encoder.take_row());
    }
    Ok(rows)
}

/// A timestamp as Postgres prints it: no fraction when it is zero, microseconds without
/// trailing zeros otherwise, and `+00` for a time zone (answers are in UTC).
fn timestamp_text(t: DateTime<Utc>, tz: bool) -> String {
    let mut s = t.format("%Y-%m-%d %H:%M:%S").to_string();
    let micros = t.timestamp_subsec_micros();
    if micros > 0 {
        let frac = format!("{micros:06}");
        s.push('.');
        s.push_str(frac.trim_end_matches('0'));
    }
    if tz {
        s.push_str("+00");
    }
    s
}

/// The Arrow type a client-declared parameter type reads as, when the plan does not say.
fn arrow_type(t: &Type) -> DataType {
    match *t {
        Type::BOOL => DataType::Boolean,
        Type::INT2 => DataType::Int16,
        Type::INT4 => DataType::Int32,
        Type::INT8 => DataType::Int64,
        Type::FLOAT4 => DataType::Float32,
        Type::FLOAT8 | Type::NUMERIC => DataType::Float64,
        Type::TIMESTAMP => DataType::Timestamp(TimeUnit::Nanosecond, None),
        Type::TIMESTAMPTZ => DataType::Timestamp(TimeUnit::Nanosecond, Some("UTC".into())),
        Type::DATE => DataType::Date32,
        _ => DataType::Utf8,
    }
}

/// The parameters of a portal as DataFusion values of the types the plan expects.
fn params(portal: &Portal<Stmt>, plan: &LogicalPlan) -> PgWireResult<ParamValues> {
    let inferred = plan.get_parameter_types().map_err(df_error)?;
    let mut values = Vec::with_capacity(portal.parameter_len());
    for i in 0..portal.parameter_len() {
        let declared = portal
            .statement
            .parameter_types
            .get(i)
            .cloned()
            .flatten()
            .unwrap_or(Type::UNKNOWN);
        let want = inferred
            .get(&format!("${}", i + 1))
            .cloned()
            .flatten()
            .unwrap_or_else(|| arrow_type(&declared));
        let bad =
            |e: &dyn std::fmt::Display| user_error("22P02", format!("parameter ${}: {e}", i + 1));
        let value = match &portal.parameters[i] {
            None => ScalarValue::try_from(&want).map_err(|e| bad(&e))?,
            Some(bytes) if !portal.parameter_format.is_binary(i) => {
                let text = std::str::from_utf8(bytes).map_err(|e| bad(&e))?;
                ScalarValue::try_from_string(text.to_string(), &want).map_err(|e| bad(&e))?
            }
            Some(_) => binary_param(portal, i, &declared)
                .map_err(|e| bad(&e))?
                .cast_to(&want)
                .map_err(|e| bad(&e))?,
        };
        values.push(value);
    }
    Ok(ParamValues::from(values))
}

/// A binary-format parameter, decoded by its declared type.
fn binary_param(portal: &Portal<Stmt>, i: usize, t: &Type) -> PgWireResult<ScalarValue> {
    Ok(match *t {
        Type::BOOL => ScalarValue::Boolean(portal.parameter::<bool>(i, t)?),
        Type::INT2 => ScalarValue::Int16(portal.parameter::<i16>(i, t)?),
        Type::INT4 => ScalarValue::Int32(portal.parameter::<i32>(i, t)?),
        Type::INT8 => ScalarValue::Int64(portal.parameter::<i64>(i, t)?),
        Type::FLOAT4 => ScalarValue::Float32(portal.parameter::<f32>(i, t)?),
        Type::FLOAT8 => ScalarValue::Float64(portal.parameter::<f64>(i, t)?),
        Type::TIMESTAMP => ScalarValue::TimestampNanosecond(
            portal
                .parameter::<NaiveDateTime>(i, t)?
                .and_then(|d| d.and_utc().timestamp_nanos_opt()),
            None,
        ),
        Type::TIMESTAMPTZ => ScalarValue::TimestampNanosecond(
            portal
                .parameter::<DateTime<chrono::FixedOffset>>(i, t)?
                .and_then(|d| d.timestamp_nanos_opt()),
            Some("UTC".into()),
        ),
        Type::TEXT | Type::VARCHAR | Type::UNKNOWN | Type::NAME | Type::BPCHAR => {
            ScalarValue::Utf8(portal.parameter::<String>(i, t)?)
        }
        _ => {
            return Err(user_error(
                "0A000",
                format!("binary parameters of type {} are not supported", t.name()),
            ));
        }
    })
}

#[async_trait]
impl SimpleQueryHandler for Backend {
    async fn do_query<C>(&self, client: &mut C, query: &str) -> PgWireResult<Vec<Response>>
    where
        C: ClientInfo + ClientPortalStore + Sink<PgWireBackendMessage> + Unpin + Send + Sync,
        C::PortalStore: PortalStore,
        C::Error: Debug,
        PgWireError: From<<C as Sink<PgWireBackendMessage>>::Error>,
    {
        if forestall_query::continuous::statement::parse(query).is_some() {
            let stmt = Stmt::Continuous(query.to_owned());
            return Ok(vec![
                self.run(
                    &session(client, &self.query),
                    stmt,
                    None,
                    &Format::UnifiedText,
                    &self.caller(client),
                )
                .await?,
            ]);
        }
        let ctx = session(client, &self.query);
        // Statements are planned one at a time, after the previous one ran, so that a `SET`
        // applies to the queries after it. An error ends the batch, as in Postgres.
        let mut out = Vec::new();
        for statement in split(query)? {
            let stmt = plan_on(&self.query, &ctx, statement).await?;
            let caller = self.caller(client);
            out.push(
                self.run(&ctx, stmt, None, &Format::UnifiedText, &caller)
                    .await?,
            );
        }
        Ok(out)
    }
}

/// Plans the statements of the extended protocol in the connection's session.
struct Parser {
    query: QueryEngine,
}

#[async_trait]
impl QueryParser for Parser {
    type Statement = Stmt;

    async fn parse_sql<C>(
        &self,
        client: &C,
        sql: &str,
        _types: &[Option<Type>],
    ) -> PgWireResult<Option<Stmt>>
    where
        C: ClientInfo + Unpin + Send + Sync,
    {
        if forestall_query::continuous::statement::parse(sql).is_some() {
            return Ok(Some(Stmt::Continuous(sql.to_owned())));
        }
        let mut statements = split(sql)?;
        if statements.len() > 1 {
            return Err(user_error(
                "42601",
                "cannot insert multiple commands into a prepared statement",
            ));
        }
        match statements.pop() {
            None => Ok(None),
            Some(statement) => Ok(Some(
                plan_on(&self.query, &session(client, &self.query), statement).await?,
            )),
        }
    }

    fn get_parameter_types(&self, stmt: &Stmt) -> PgWireResult<Vec<Type>> {
        let Stmt::Plan(plan) = stmt else {
            return Ok(Vec::new());
        };
        let types = plan.get_parameter_types().map_err(df_error)?;
        let mut out = vec![Type::UNKNOWN; types.len()];
        for (name, t) in types {
            if let Some(i) = name
                .strip_prefix('$')
                .and_then(|n| n.parse::<usize>().ok())
                .filter(|&n| n >= 1 && n <= out.len())
            {
                out[i - 1] = t.as_ref().map_or(Type::UNKNOWN, pg_type);
            }
        }
        Ok(out)
    }

    fn get_result_schema(
        &self,
        stmt: &Stmt,
        format: Option<&Format>,
    ) -> PgWireResult<Vec<FieldInfo>> {
        match stmt {
            Stmt::Plan(plan) if !matches!(**plan, LogicalPlan::Statement(_)) => Ok(fields(
                plan.schema().as_arrow(),
                format.unwrap_or(&Format::UnifiedText),
            )),
            Stmt::Continuous(sql)
                if matches!(
                    forestall_query::continuous::statement::parse(sql),
                    Some(Ok(forestall_query::continuous::Statement::Show))
                ) =>
            {
                Ok(fields(
                    &forestall_query::continuous::runtime::status_schema(),
                    format.unwrap_or(&Format::UnifiedText),
                ))
            }
            _ => Ok(Vec::new()),
        }
    }
}

#[async_trait]
impl ExtendedQueryHandler for Backend {
    type Statement = Stmt;
    type QueryParser = Parser;

    fn query_parser(&self) -> Arc<Parser> {
        Arc::clone(&self.parser)
    }

    async fn do_query<C>(
        &self,
        client: &mut C,
        portal: &Portal<Stmt>,
        _max_rows: usize,
    ) -> PgWireResult<Response>
    where
        C: ClientInfo + ClientPortalStore + Sink<PgWireBackendMessage> + Unpin + Send + Sync,
        C::PortalStore: PortalStore<Statement = Self::Statement>,
        C::Error: Debug,
        PgWireError: From<<C as Sink<PgWireBackendMessage>>::Error>,
    {
        let ctx = session(client, &self.query);
        let stmt = portal.statement.statement.clone();
        let params = match &stmt {
            Stmt::Plan(plan) if portal.parameter_len() > 0 => Some(params(portal, plan)?),
            _ => None,
        };
        let caller = self.caller(client);
        self.run(&ctx, stmt, params, &portal.result_column_format, &caller)
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_print_as_postgres_prints_them() {
        let t = |n: i64| DateTime::<Utc>::from_timestamp_nanos(n);
        let s = 1_767_225_600_000_000_000; // 2026-01-01T00:00:00Z
        assert_eq!(timestamp_text(t(s), false), "2026-01-01 00:00:00");
        assert_eq!(
            timestamp_text(t(s + 500_000_000), false),
            "2026-01-01 00:00:00.5"
        );
        assert_eq!(
            timestamp_text(t(s + 123_456_789), true),
            "2026-01-01 00:00:00.123456+00"
        );
        assert_eq!(timestamp_text(t(s + 999), false), "2026-01-01 00:00:00");
    }
}
