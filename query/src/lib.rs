//! # forestall-query
//!
//! Forestall's query layer: a DataFusion session in which every measurement is a table, one
//! [`TableProvider`](datafusion::catalog::TableProvider) per measurement over the engine's
//! scan API ([`provider`]), with time ranges and tag predicates pushed down so that segments
//! are pruned by the manifest and the series bitmaps before any Parquet is opened.
//!
//! May depend on `forestall-engine` and `forestall-models`; never on `actuators` or `server`.
//!
//! Beyond DataFusion's own functions: gap filling ([`gapfill`]: `date_bin_gapfill`, `locf`,
//! `interpolate`), selectors ([`selector`]: `selector_first`, `selector_last`) and
//! `last_rows('cpu')` (the latest row of every series, from the engine's last-row cache), and the
//! model functions ([`models`]: `anomaly_score(value) OVER (…)`, `forecast(…)`, `risk(…)`).
//! Results stream from the scan ([`provider::ScanExec`]) to the client. Aggregates per tag
//! and time bucket are folded in the scan as it reads ([`pushdown`]). Continuous queries
//! ([`continuous`]) run SQL on a schedule or on write, incrementally, into measurements,
//! health checks and notifications; their statements (`CREATE CONTINUOUS QUERY …`) are
//! answered by the same [`QueryEngine`] as every other query.

pub mod continuous;
pub mod gapfill;
pub mod models;
pub mod provider;
pub mod pushdown;
pub mod selector;

use std::sync::Arc;

use arrow::datatypes::SchemaRef;
use arrow::record_batch::RecordBatch;
use datafusion::common::{ParamValues, ScalarValue};
use datafusion::dataframe::DataFrame;
use datafusion::error::DataFusionError;
use datafusion::execution::context::{SQLOptions, SessionConfig, SessionContext, SessionState};
use datafusion::execution::memory_pool::{GreedyMemoryPool, TrackConsumersPool};
use datafusion::execution::runtime_env::RuntimeEnv;
use datafusion::execution::{
    FunctionRegistry, SendableRecordBatchStream, SessionStateBuilder, TaskContext,
};
use datafusion::logical_expr::{LogicalPlan, Statement};
use datafusion::physical_plan::stream::RecordBatchStreamAdapter;
use forestall_engine::Store;
use futures::stream::BoxStream;
use futures::{Stream, StreamExt, TryStreamExt};

pub use provider::{MeasurementTable, ScanExec, StoreSchema};

/// Name of the catalog and schema every measurement lives in (`forestall.public.cpu`).
pub const CATALOG: &str = "forestall";
pub const SCHEMA: &str = "public";

/// Errors of the query layer.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The query is wrong: syntax, unknown table or column, types. The user can fix it.
    #[error("{0}")]
    Query(String),
    /// The query could not run for a reason the user cannot fix.
    #[error("query failed: {0}")]
    Execution(String),
    /// What the statement creates exists already.
    #[error("{0}")]
    Exists(String),
    /// What the statement names does not exist.
    #[error("{0}")]
    NotFound(String),
    /// The caller may not do this (see [`QueryEngine::refusing_changes`]).
    #[error("{0}")]
    Forbidden(String),
    /// The query needed more memory than its limit (see [`QueryEngine::with_memory_limit`]).
    #[error("the query needs more memory than one query may hold ([query] memory_limit): {0}")]
    ResourcesExhausted(String),
}

impl From<DataFusionError> for Error {
    fn from(e: DataFusionError) -> Self {
        match e.find_root() {
            DataFusionError::SQL(..)
            | DataFusionError::Plan(_)
            | DataFusionError::SchemaError(..)
            | DataFusionError::NotImplemented(_) => Error::Query(e.strip_backtrace()),
            DataFusionError::ResourcesExhausted(m) => Error::ResourcesExhausted(m.clone()),
            _ => Error::Execution(e.strip_backtrace()),
        }
    }
}

/// The query layer's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// A query planned by [`QueryEngine::plan`].
pub(crate) struct Planned {
    pub(crate) schema: SchemaRef,
    pub(crate) plan: Arc<dyn datafusion::physical_plan::ExecutionPlan>,
    pub(crate) context: Arc<datafusion::execution::TaskContext>,
}

/// Runs SQL over a store.
#[derive(Debug, Clone)]
pub struct QueryEngine {
    /// Everything a session needs (functions, rules, the store's catalog), built once: a
    /// session is a clone of it, so a query does not pay for registering ~300 functions.
    base: SessionState,
    /// Where queries run, if not on the caller's runtime (see [`QueryEngine::on_runtime`]).
    runtime: Option<tokio::runtime::Handle>,
    /// Answers continuous-query statements (see [`QueryEngine::with_continuous`]).
    continuous: Option<continuous::ContinuousQueries>,
    /// Why continuous-query statements that change something are refused, when they are
    /// (see [`QueryEngine::refusing_changes`]).
    changes_refused: Option<Arc<str>>,
    /// The memory one query may hold (see [`QueryEngine::with_memory_limit`]).
    memory_limit: Option<usize>,
    /// The store, for the audit trail of continuous-query statements.
    store: Arc<Store>,
    /// Who runs the queries, named in the audit trail (see [`QueryEngine::on_behalf_of`]).
    caller: Option<Arc<str>>,
}

impl QueryEngine {
    pub fn new(store: Arc<Store>) -> Self {
        Self::build(store, true, true)
    }

    /// An engine that leaves every aggregate to DataFusion ([`pushdown`] off), for tests
    /// that compare the two.
    #[cfg(test)]
    pub(crate) fn without_pushdown(store: Arc<Store>) -> Self {
        Self::build(store, false, true)
    }

    /// An engine whose `forecast` leaves the global network out, for tests that compare.
    #[cfg(test)]
    pub(crate) fn without_global_forecasts(store: Arc<Store>) -> Self {
        Self::build(store, true, false)
    }

    fn build(store: Arc<Store>, pushdown: bool, global: bool) -> Self {
        let config = SessionConfig::new()
            .with_information_schema(true)
            .with_default_catalog_and_schema(CATALOG, SCHEMA)
            .with_create_default_catalog_and_schema(true);
        let mut builder = SessionStateBuilder::new()
            .with_config(config)
            .with_default_features();
        if pushdown {
            builder = builder.with_optimizer_rule(Arc::new(pushdown::AggregatePushdown));
        }
        let state = gapfill::install(builder).build();
        let mut ctx = SessionContext::new_with_state(state);
        for f in gapfill::functions() {
            ctx.register_udf(f);
        }
        ctx.register_udaf(selector::selector_first());
        ctx.register_udaf(selector::selector_last());
        let _ = ctx.register_expr_planner(Arc::new(selector::FieldAccessPlanner));
        ctx.register_udtf(
            "last_rows",
            Arc::new(provider::LastRows::new(Arc::clone(&store))),
        );
        ctx.register_udwf(models::anomaly_score());
        ctx.register_udtf(
            "forecast",
            Arc::new(models::ForecastFunction::new(Arc::clone(&store), global)),
        );
        ctx.register_udtf(
            "forecast_models",
            Arc::new(models::ForecastFunction::accounts(
                Arc::clone(&store),
                global,
            )),
        );
        ctx.register_udtf(
            "risk",
            Arc::new(models::RiskFunction::new(Arc::clone(&store))),
        );
        if let Some(catalog) = ctx.catalog(CATALOG) {
            // Registering replaces the empty default schema; there is nothing to keep.
            let _ = catalog.register_schema(SCHEMA, Arc::new(StoreSchema::new(Arc::clone(&store))));
        }
        Self {
            base: ctx.state(),
            runtime: None,
            continuous: None,
            changes_refused: None,
            memory_limit: None,
            store,
            caller: None,
        }
    }

    /// Each query run by [`QueryEngine::execute`] gets a memory pool of `bytes`: a sort
    /// past it spills to disk, and an aggregation or join that needs more fails with
    /// [`Error::ResourcesExhausted`] instead of growing until the kernel kills the process.
    /// With at most `max_concurrent` queries at once, the queries together hold at most that
    /// many times `bytes`, as PostgreSQL's `work_mem` bounds each operation. Without it
    /// (tests, tools), a query's memory is unbounded.
    pub fn with_memory_limit(mut self, bytes: usize) -> Self {
        self.memory_limit = Some(bytes);
        self
    }

    /// An engine that also answers `CREATE`, `DROP` and `SHOW CONTINUOUS QUERIES` with
    /// `queries`, and has their status as the table `system.continuous_queries`.
    pub fn with_continuous(mut self, queries: continuous::ContinuousQueries) -> Self {
        let ctx = SessionContext::new_with_state(self.base.clone());
        if let Some(catalog) = ctx.catalog(CATALOG) {
            let system = datafusion::catalog::MemorySchemaProvider::new();
            // A new schema holds no table of that name.
            let _ = datafusion::catalog::SchemaProvider::register_table(
                &system,
                "continuous_queries".into(),
                Arc::new(continuous::system::StatusTable(queries.downgrade())),
            );
            let _ = catalog.register_schema("system", Arc::new(system));
        }
        self.base = ctx.state();
        self.continuous = Some(queries);
        self
    }

    /// The same engine, refusing the continuous-query statements that change something
    /// (`CREATE`, `DROP`) with `why`: for callers allowed to query but not to administer.
    pub fn refusing_changes(mut self, why: impl Into<Arc<str>>) -> Self {
        self.changes_refused = Some(why.into());
        self
    }

    /// The same engine, naming `caller` (a token's name) in the audit trail of the changes
    /// its statements make.
    pub fn on_behalf_of(mut self, caller: &str) -> Self {
        self.caller = Some(caller.into());
        self
    }

    /// Runs `sql` if it is a continuous-query statement: `None` when it is not one. A
    /// `CREATE` or `DROP`, done or refused, goes into the audit trail
    /// ([`forestall_engine::audit`]).
    pub async fn continuous_statement(&self, sql: &str) -> Option<Result<continuous::Outcome>> {
        let statement = continuous::statement::parse(sql)?;
        let change = match &statement {
            Ok(continuous::Statement::Create { definition, .. }) => {
                Some(format!("CREATE CONTINUOUS QUERY {}", definition.name))
            }
            Ok(continuous::Statement::Drop { name, .. }) => {
                Some(format!("DROP CONTINUOUS QUERY {name}"))
            }
            _ => None,
        };
        let outcome = self.run_continuous(statement).await;
        if let Some(path) = change {
            let status = match &outcome {
                Ok(_) => 200,
                Err(Error::Forbidden(_)) => 403,
                Err(_) => 400,
            };
            self.record_change(&path, status, sql);
        }
        Some(outcome)
    }

    /// Records a change made by a statement in the audit trail; a failure to record is
    /// logged (the change is made either way).
    fn record_change(&self, path: &str, status: u16, sql: &str) {
        let now = forestall_engine::store::now_nanos();
        let change = forestall_engine::audit::Change {
            by: self.caller.as_deref().unwrap_or("anonymous"),
            method: "SQL",
            path,
            status,
            detail: sql,
            peer: None,
        };
        if let Err(e) = self.store.record_change(&change, now) {
            tracing::error!(error = %e, path, "could not record a change in the audit trail");
        }
    }

    async fn run_continuous(
        &self,
        statement: Result<continuous::Statement>,
    ) -> Result<continuous::Outcome> {
        match (statement, &self.continuous) {
            (Err(e), _) => Err(e),
            (Ok(continuous::Statement::Create { .. } | continuous::Statement::Drop { .. }), _)
                if self.changes_refused.is_some() =>
            {
                Err(Error::Forbidden(
                    self.changes_refused
                        .as_deref()
                        .unwrap_or_default()
                        .to_string(),
                ))
            }
            (Ok(_), None) => Err(Error::Execution(
                "continuous queries are not running in this process".into(),
            )),
            (Ok(s), Some(cq)) => cq.execute(s).await,
        }
    }

    /// Runs queries (planning, scans, operators) on `runtime` instead of the caller's. The
    /// server gives queries their own runtime whose threads have a lower CPU priority than
    /// ingestion's, so that heavy queries slow down other queries, not writes.
    pub fn on_runtime(mut self, runtime: tokio::runtime::Handle) -> Self {
        self.runtime = Some(runtime);
        self
    }

    /// Runs a planned query: the physical plan is made and the scans run as the returned
    /// stream is polled, so callers poll it inside [`QueryEngine::forward`], together with
    /// whatever they do with each batch (one task on the query runtime, not one per stage).
    pub fn execute(&self, df: DataFrame) -> SendableRecordBatchStream {
        let schema: SchemaRef = Arc::new(df.schema().as_arrow().clone());
        let context = Arc::new(self.task_context(&df));
        let run = async move {
            let plan = df.create_physical_plan().await?;
            datafusion::physical_plan::execute_stream(plan, context)
        };
        let batches = futures::stream::once(run).flat_map(|r| match r {
            Ok(s) => s.left_stream(),
            Err(e) => futures::stream::once(async move { Err(e) }).right_stream(),
        });
        Box::pin(RecordBatchStreamAdapter::new(schema, batches))
    }

    /// Runs `work` on the query runtime (here, without one): planning and whatever a caller
    /// does with a result run at the queries' priority, not the writes'.
    pub async fn run<F>(&self, work: F) -> Result<F::Output>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        match &self.runtime {
            None => Ok(work.await),
            Some(runtime) => runtime
                .spawn(work)
                .await
                .map_err(|e| Error::Execution(format!("query task failed: {e}"))),
        }
    }

    /// Polls `items` on the query runtime and hands them over a small channel, so that the
    /// work of producing each one (a scan, encoding a result for a client) is done there.
    /// Dropping the returned stream stops the work.
    pub fn forward<S>(&self, items: S) -> BoxStream<'static, S::Item>
    where
        S: Stream + Send + 'static,
        S::Item: Send + 'static,
    {
        let Some(runtime) = &self.runtime else {
            return items.boxed();
        };
        let (tx, mut rx) = tokio::sync::mpsc::channel(2);
        runtime.spawn(async move {
            let mut items = std::pin::pin!(items);
            while let Some(item) = items.next().await {
                if tx.send(item).await.is_err() {
                    return;
                }
            }
        });
        futures::stream::poll_fn(move |cx| rx.poll_recv(cx)).boxed()
    }

    /// A session whose default schema holds every measurement of the store, with
    /// `information_schema` (so `SHOW TABLES` and `SHOW COLUMNS FROM cpu` work). Tables are
    /// looked up when a query names them, so a schema that grew since is always current.
    /// Settings changed in one session (`SET datafusion.…`) stay in it.
    pub fn session(&self) -> SessionContext {
        SessionContext::new_with_state(self.base.clone())
    }

    /// The context `df` runs in: its session's, with a memory pool of its own when the
    /// engine has a limit ([`QueryEngine::with_memory_limit`]). Made per query (a few
    /// `Arc`s), not per session: rebuilding a session's state costs tens of microseconds.
    fn task_context(&self, df: &DataFrame) -> TaskContext {
        let context = df.task_ctx();
        let Some(limit) = self.memory_limit else {
            return context;
        };
        let shared = context.runtime_env();
        // The pool names its three largest consumers when it refuses. The disk manager
        // (spills) and the caches stay shared.
        let pool = TrackConsumersPool::new(
            GreedyMemoryPool::new(limit),
            std::num::NonZeroUsize::MIN.saturating_add(2),
        );
        context.with_runtime(Arc::new(RuntimeEnv {
            memory_pool: Arc::new(pool),
            disk_manager: Arc::clone(&shared.disk_manager),
            cache_manager: Arc::clone(&shared.cache_manager),
            object_store_registry: Arc::clone(&shared.object_store_registry),
        }))
    }

    /// The DataFrame of `sql` in a new session, checked by [`verify_read_only`].
    async fn dataframe(&self, sql: &str) -> Result<DataFrame> {
        self.dataframe_with(sql, &Params::new()).await
    }

    /// [`QueryEngine::dataframe`] with `params` bound to its placeholders.
    async fn dataframe_with(&self, sql: &str, params: &Params) -> Result<DataFrame> {
        let ctx = self.session();
        let mut plan = ctx.state().create_logical_plan(sql).await?;
        verify_read_only(&plan)?;
        let types = plan.get_parameter_types()?;
        if !params.is_empty() || !types.is_empty() {
            let mut bound = std::collections::HashMap::with_capacity(params.len());
            for (name, value) in params {
                let want = types.get(&format!("${name}")).ok_or_else(|| {
                    Error::Query(format!("parameter ${name} is not in the statement"))
                })?;
                let value = match want {
                    Some(t) if value.is_null() => ScalarValue::try_from(t)?,
                    Some(t) if value.data_type() != *t => value.cast_to(t).map_err(|e| {
                        Error::Query(format!("parameter ${name}: {value} does not fit {t}: {e}"))
                    })?,
                    _ => value.clone(),
                };
                bound.insert(name.clone(), value);
            }
            if let Some(missing) = types
                .keys()
                .find(|p| !bound.contains_key(p.trim_start_matches('$')))
            {
                return Err(Error::Query(format!(
                    "no value for the parameter {missing}"
                )));
            }
            plan = plan.with_param_values(ParamValues::Map(
                bound.into_iter().map(|(k, v)| (k, v.into())).collect(),
            ))?;
        }
        Ok(ctx.execute_logical_plan(plan).await?)
    }

    /// Plans and runs `sql`, collecting the result.
    pub async fn sql(&self, sql: &str) -> Result<(SchemaRef, Vec<RecordBatch>)> {
        if let Some(outcome) = self.continuous_statement(sql).await {
            let batch = outcome?.into_batch();
            return Ok((batch.schema(), vec![batch]));
        }
        let df = self.dataframe(sql).await?;
        let schema: SchemaRef = Arc::new(df.schema().as_arrow().clone());
        let batches = self.execute(df).try_collect().await?;
        Ok((schema, batches))
    }

    /// The physical plan of `sql` (not a continuous-query statement), its result's schema and
    /// the context to execute it in, for callers that look at the plan before running it.
    pub(crate) async fn plan(&self, sql: &str) -> Result<Planned> {
        let df = self.dataframe(sql).await?;
        let schema: SchemaRef = Arc::new(df.schema().as_arrow().clone());
        let context = Arc::new(self.task_context(&df));
        let plan = df.create_physical_plan().await?;
        Ok(Planned {
            schema,
            plan,
            context,
        })
    }

    /// Plans `sql` on the calling task and returns its batches as [`QueryEngine::execute`]
    /// does. Errors found while planning are returned here, errors while running come through
    /// the stream. Call it inside [`QueryEngine::forward`] or [`QueryEngine::run`], so that
    /// planning runs on the query runtime.
    pub async fn start(&self, sql: &str) -> Result<(SchemaRef, SendableRecordBatchStream)> {
        self.start_with(sql, &Params::new()).await
    }

    /// [`QueryEngine::start`] with values for the statement's placeholders (`$name`, `$1`),
    /// as InfluxDB 3's `params`: each is bound as a literal before the plan is optimised, so
    /// that time ranges and tag predicates are pushed down as if written in the SQL, and cast
    /// to the type the plan gives its placeholder. A placeholder without a value, or a value
    /// that does not fit its place, is an error; so is a value no placeholder takes.
    pub async fn start_with(
        &self,
        sql: &str,
        params: &Params,
    ) -> Result<(SchemaRef, SendableRecordBatchStream)> {
        if let Some(outcome) = self.continuous_statement(sql).await {
            if !params.is_empty() {
                return Err(Error::Query(
                    "continuous-query statements take no parameters".into(),
                ));
            }
            let batch = outcome?.into_batch();
            let schema = batch.schema();
            let stream = futures::stream::once(async move { Ok(batch) });
            return Ok((
                Arc::clone(&schema),
                Box::pin(RecordBatchStreamAdapter::new(schema, stream)),
            ));
        }
        let df = self.dataframe_with(sql, params).await?;
        let schema: SchemaRef = Arc::new(df.schema().as_arrow().clone());
        Ok((schema, self.execute(df)))
    }
}

/// Values for a statement's placeholders, by name without the `$` (`host` for `$host`, `1`
/// for `$1`).
pub type Params = std::collections::HashMap<String, ScalarValue>;

/// What SQL may do here: read. DataFusion's DDL (`CREATE EXTERNAL TABLE` reads any file the
/// server can) and DML (`COPY … TO` writes one; `INSERT`) are refused; `SET` is allowed and
/// lasts for the session. Every SQL surface (HTTP, PostgreSQL, continuous queries) checks its
/// plans with [`verify_read_only`].
fn read_only_sql() -> SQLOptions {
    SQLOptions::new()
        .with_allow_ddl(false)
        .with_allow_dml(false)
}

/// Checks a plan against [`read_only_sql`], and refuses `SET datafusion.runtime.…`, which
/// would choose where the session spills (any directory the server may write) and its
/// caches; a query's memory is the server's to set ([`QueryEngine::with_memory_limit`]).
pub fn verify_read_only(plan: &LogicalPlan) -> datafusion::error::Result<()> {
    read_only_sql().verify_plan(plan)?;
    if let LogicalPlan::Statement(Statement::SetVariable(set)) = plan
        && set
            .variable
            .to_ascii_lowercase()
            .starts_with("datafusion.runtime.")
    {
        return Err(DataFusionError::Plan(format!(
            "{} is set by the server ([query] memory_limit), not by a query",
            set.variable
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests;
