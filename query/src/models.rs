//! The model functions: `anomaly_score(value) OVER (…)`, `forecast(…)` and `risk(…)`.
//!
//! * `anomaly_score(value) OVER (PARTITION BY host ORDER BY time)`: the streaming detector of
//!   `forestall-models`, fresh per partition, run over the partition's rows in window order;
//!   a score in [0, 1] per row (NULL where the value is NULL). Each row's score depends only
//!   on the rows before it.
//! * `forecast('cpu', 'usage_user', 12 [, 'host = ''a'' AND time > now() - interval ''1 day'''])`:
//!   for every series of the measurement that matches the optional SQL predicate, its history
//!   goes through an [`AutoForecaster`] and the next `horizon` steps come back as rows: the
//!   series' tags, `time` (spaced like the series' recent rows), `mean`, `lower` and `upper`
//!   (a 90% interval) and the `model` that answered.
//! * `forecast_models('cpu', 'usage_user', 12 [, predicate])`: the accounts behind
//!   `forecast` with the same arguments, one row per series, step ahead and model: the series'
//!   tags, `step`, `model`, its `rolling_error` there (NULL until it has been scored) and
//!   whether it `answers` that step, so that a forecast can be checked rather than trusted.
//! * `risk('cpu', 'usage_user > 90 AS cpu, mem_used > 85 AS memory' [, predicate [, tag]])`:
//!   per component (the tag `component`, else `host`, or the one named), the metrics' history
//!   is replayed into the component's Bayesian network ([`forestall_models::risk::assess`]),
//!   giving per resource the probability of a bottleneck within 12 rows and the evidence
//!   behind it: rows `component, resource, score, reasons`.
//!
//! The table functions read their input with an ordinary query of the same session (so the
//! predicate prunes segments like any `WHERE`), when the query runs, not when it is planned.

use std::collections::HashMap;
use std::fmt;
use std::fmt::Write as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use arrow::array::{
    Array, ArrayRef, AsArray, BooleanBuilder, Float64Array, Float64Builder, Int64Builder,
    RecordBatch, StringBuilder, TimestampNanosecondBuilder,
};
use arrow::compute::cast;
use arrow::datatypes::{DataType, Field, FieldRef, Int64Type, Schema, SchemaRef, TimeUnit};
use async_trait::async_trait;
use datafusion::catalog::{Session, TableFunctionArgs, TableFunctionImpl, TableProvider};
use datafusion::common::{Column, DataFusionError, Result as DfResult, ScalarValue, plan_err};
use datafusion::datasource::{MemTable, TableType};
use datafusion::execution::context::{SessionContext, SessionState};
use datafusion::logical_expr::function::{PartitionEvaluatorArgs, WindowUDFFieldArgs};
use datafusion::logical_expr::{
    Expr, PartitionEvaluator, Signature, Volatility, WindowUDF, WindowUDFImpl,
};
use datafusion::physical_plan::ExecutionPlan;
use datafusion::prelude::cast as cast_expr;
use forestall_engine::Store;
use forestall_engine::catalog::{ColumnKind, TIME_COLUMN};
use forestall_engine::line_protocol::FieldType;
use forestall_models::detector::{Detector, DetectorParams};
use forestall_models::forecast::{AutoForecaster, ForecastConfig, Step};
use forestall_models::global::{GlobalLstm, KINDS, Replay, SCORED_ROWS, kind_of, replay};
use forestall_models::risk::{MetricSpec, RiskConfig, assess};
use futures::StreamExt;

/// Longest forecast a query may ask for, in steps.
pub const MAX_HORIZON: usize = 10_000;
/// Interval level of `forecast`'s `lower` and `upper`.
pub const FORECAST_LEVEL: f64 = 0.9;

/// `anomaly_score(value) OVER (…)`.
pub fn anomaly_score() -> WindowUDF {
    WindowUDF::new_from_impl(AnomalyScore {
        signature: Signature::numeric(1, Volatility::Immutable),
    })
}

#[derive(Debug, PartialEq, Eq, Hash)]
struct AnomalyScore {
    signature: Signature,
}

impl WindowUDFImpl for AnomalyScore {
    fn name(&self) -> &str {
        "anomaly_score"
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn partition_evaluator(
        &self,
        _: PartitionEvaluatorArgs<'_>,
    ) -> DfResult<Box<dyn PartitionEvaluator>> {
        Ok(Box::new(ScoreEvaluator))
    }

    fn field(&self, args: WindowUDFFieldArgs<'_>) -> DfResult<FieldRef> {
        Ok(Arc::new(Field::new(args.name(), DataType::Float64, true)))
    }
}

#[derive(Debug)]
struct ScoreEvaluator;

impl PartitionEvaluator for ScoreEvaluator {
    fn evaluate_all(&mut self, values: &[ArrayRef], num_rows: usize) -> DfResult<ArrayRef> {
        let [values] = values else {
            return plan_err!("anomaly_score takes one argument");
        };
        let values = cast(values, &DataType::Float64)?;
        let values = values.as_primitive::<arrow::datatypes::Float64Type>();
        let mut detector = Detector::new(DetectorParams::default());
        let mut out = Float64Builder::with_capacity(num_rows);
        for v in values.iter() {
            out.append_option(v.map(|v| detector.update(v)));
        }
        Ok(Arc::new(out.finish()))
    }
}

/// One group of series (one tag combination) read by [`read_history`].
struct Group {
    /// The group's tag values.
    tags: Vec<Option<String>>,
    /// Row times: ascending, one row each, once [`in_time_order`] has run (as read, in any
    /// order).
    times: Vec<i64>,
    /// `values[field][row]`, NaN where the field is missing.
    values: Vec<Vec<f64>>,
}

/// Reads a measurement's numeric fields per group of tags, one row per time (the average of
/// rows that share it), in time order.
async fn read_history(
    state: &dyn Session,
    measurement: &str,
    tags: &[String],
    fields: &[String],
    predicate: Option<&str>,
) -> DfResult<Vec<Group>> {
    let Some(state) = state.as_any().downcast_ref::<SessionState>() else {
        return Err(DataFusionError::Internal(
            "model functions need a DataFusion session state".into(),
        ));
    };
    let ctx = SessionContext::new_with_state(state.clone());
    let mut df = ctx
        .table(datafusion::common::TableReference::bare(measurement))
        .await?;
    if let Some(p) = predicate {
        let e = ctx.parse_sql_expr(p, df.schema())?;
        df = df.filter(e)?;
    }
    // The rows are grouped here rather than with GROUP BY and ORDER BY: those hash and sort
    // every row by every tag (strings), which for all series of a measurement took most of
    // the time and gigabytes of memory, while a group's rows need only a sort by time.
    let column = |name: &str| Expr::Column(Column::from_name(name));
    let mut columns: Vec<Expr> = tags
        .iter()
        .map(|t| cast_expr(column(t), DataType::Utf8).alias(t.as_str()))
        .collect();
    columns.push(cast_expr(column(TIME_COLUMN), DataType::Int64).alias(TIME_COLUMN));
    columns.extend(
        fields
            .iter()
            .map(|f| cast_expr(column(f), DataType::Float64).alias(f.as_str())),
    );
    let mut stream = df.select(columns)?.execute_stream().await?;
    // Rows of each group as they come, `(time, values)`; a group's tags keyed by an
    // unambiguous encoding (each tag as `length:value`, `-` for none).
    let mut index: HashMap<String, usize> = HashMap::new();
    let mut found: Vec<Group> = Vec::new();
    let mut key = String::new();
    while let Some(batch) = stream.next().await {
        let batch = batch?;
        let tag_columns: Vec<&arrow::array::StringArray> = (0..tags.len())
            .map(|i| batch.column(i).as_string::<i32>())
            .collect();
        let time = batch.column(tags.len()).as_primitive::<Int64Type>();
        let values: Vec<&Float64Array> = (0..fields.len())
            .map(|i| batch.column(tags.len() + 1 + i).as_primitive())
            .collect();
        for row in 0..batch.num_rows() {
            if !time.is_valid(row) {
                continue;
            }
            key.clear();
            for c in &tag_columns {
                if c.is_valid(row) {
                    let v = c.value(row);
                    // Writing to a String cannot fail.
                    let _ = write!(key, "{}:{v}", v.len());
                } else {
                    key.push('-');
                }
            }
            let g = match index.get(key.as_str()) {
                Some(&g) => g,
                None => {
                    let tags = tag_columns
                        .iter()
                        .map(|c| c.is_valid(row).then(|| c.value(row).to_owned()))
                        .collect();
                    found.push(Group {
                        tags,
                        times: Vec::new(),
                        values: vec![Vec::new(); fields.len()],
                    });
                    index.insert(key.clone(), found.len() - 1);
                    found.len() - 1
                }
            };
            let group = &mut found[g];
            group.times.push(time.value(row));
            for (s, v) in group.values.iter_mut().zip(&values) {
                s.push(if v.is_valid(row) {
                    v.value(row)
                } else {
                    f64::NAN
                });
            }
        }
    }
    found.sort_by(|a, b| a.tags.cmp(&b.tags));
    Ok(found.into_iter().map(in_time_order).collect())
}

/// A group's rows (as read) in time order, one per time: rows that share a time are averaged
/// per field (ignoring missing values, NaN if all are missing), as `avg` would.
fn in_time_order(read: Group) -> Group {
    // As the engine returns a series: already in order, one row per time.
    if read.times.is_sorted_by(|a, b| a < b) {
        return read;
    }
    let Group {
        tags,
        times,
        values,
    } = read;
    let mut order: Vec<usize> = (0..times.len()).collect();
    order.sort_by_key(|&i| times[i]);
    let mut group = Group {
        tags,
        times: Vec::with_capacity(times.len()),
        values: vec![Vec::with_capacity(times.len()); values.len()],
    };
    let mut start = 0;
    while start < order.len() {
        let t = times[order[start]];
        let end = start + order[start..].partition_point(|&i| times[i] == t);
        group.times.push(t);
        for (out, field) in group.values.iter_mut().zip(&values) {
            let (sum, n) = order[start..end]
                .iter()
                .map(|&i| field[i])
                .filter(|v| !v.is_nan())
                .fold((0.0, 0usize), |(s, n), v| (s + v, n + 1));
            out.push(if n == 0 { f64::NAN } else { sum / n as f64 });
        }
        start = end;
    }
    group
}

/// Runs `work` on every group, in order, on the blocking threads of the runtime the query
/// runs on (a model replays a series' whole history: seconds for thousands of series, which
/// must not hold up the async workers), one share of the groups per core. A query that is
/// dropped (cancelled, timed out) stops the work at the next group.
async fn per_group<R: Send + 'static>(
    groups: Arc<Vec<Group>>,
    work: impl Fn(&Group) -> DfResult<R> + Send + Sync + 'static,
) -> DfResult<Vec<R>> {
    per_batch(groups, 1, move |batch| batch.iter().map(&work).collect()).await
}

/// [`per_group`] for work that takes up to `size` groups at once (one batched forward pass
/// for all of them, say) and returns a result per group, in order; a dropped query stops at
/// the next batch.
async fn per_batch<R: Send + 'static>(
    groups: Arc<Vec<Group>>,
    size: usize,
    work: impl Fn(&[Group]) -> DfResult<Vec<R>> + Send + Sync + 'static,
) -> DfResult<Vec<R>> {
    struct CancelOnDrop(Arc<AtomicBool>);
    impl Drop for CancelOnDrop {
        fn drop(&mut self) {
            self.0.store(true, Ordering::Relaxed);
        }
    }
    let cancelled = Arc::new(AtomicBool::new(false));
    let _guard = CancelOnDrop(Arc::clone(&cancelled));
    let work = Arc::new(work);
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let share = groups.len().div_ceil(threads).max(1);
    let size = size.max(1);
    let tasks: Vec<_> = (0..groups.len())
        .step_by(share)
        .map(|start| {
            let (groups, work, cancelled) = (
                Arc::clone(&groups),
                Arc::clone(&work),
                Arc::clone(&cancelled),
            );
            tokio::task::spawn_blocking(move || {
                let end = (start + share).min(groups.len());
                let mut out = Vec::with_capacity(end - start);
                for batch in groups[start..end].chunks(size) {
                    if cancelled.load(Ordering::Relaxed) {
                        return Err(DataFusionError::Execution("query cancelled".into()));
                    }
                    out.extend(work(batch)?);
                }
                Ok(out)
            })
        })
        .collect();
    let mut out = Vec::with_capacity(groups.len());
    for task in tasks {
        let part = task
            .await
            .map_err(|e| DataFusionError::External(Box::new(e)))??;
        out.extend(part);
    }
    Ok(out)
}

/// The typical spacing of the last rows: the median of their gaps (1 s if unknown).
fn step_of(times: &[i64]) -> i64 {
    let tail = &times[times.len().saturating_sub(101)..];
    let mut gaps: Vec<i64> = tail
        .windows(2)
        .map(|w| w[1] - w[0])
        .filter(|&g| g > 0)
        .collect();
    if gaps.is_empty() {
        return 1_000_000_000;
    }
    let mid = gaps.len() / 2;
    *gaps.select_nth_unstable(mid).1
}

fn literal(e: &Expr) -> Option<&ScalarValue> {
    match e {
        Expr::Literal(v, _) => Some(v),
        Expr::Cast(c) => literal(&c.expr),
        _ => None,
    }
}

fn string_arg(e: &Expr) -> Option<String> {
    literal(e).and_then(crate::provider::scalar_string)
}

fn integer_arg(e: &Expr) -> Option<i64> {
    match literal(e)? {
        ScalarValue::Int64(Some(v)) => Some(*v),
        ScalarValue::Int32(Some(v)) => Some(i64::from(*v)),
        ScalarValue::UInt64(Some(v)) => i64::try_from(*v).ok(),
        _ => None,
    }
}

/// The measurement's tags, and checks that `fields` are numeric fields of it.
fn tags_checking_fields(
    store: &Store,
    measurement: &str,
    fields: &[String],
) -> DfResult<Vec<String>> {
    let Some(table) = store.table(measurement) else {
        return plan_err!("table '{measurement}' not found");
    };
    for f in fields {
        match table.columns.get(f) {
            Some(ColumnKind::Field(
                FieldType::Float | FieldType::Integer | FieldType::UInteger,
            )) => {}
            Some(ColumnKind::Field(t)) => {
                return plan_err!("field '{f}' of '{measurement}' is {t}, not a number");
            }
            Some(ColumnKind::Tag) => {
                return plan_err!("'{f}' is a tag of '{measurement}', not a field");
            }
            None => return plan_err!("'{measurement}' has no field '{f}'"),
        }
    }
    Ok(table
        .columns
        .iter()
        .filter(|(_, k)| **k == ColumnKind::Tag)
        .map(|(n, _)| n.clone())
        .collect())
}

/// `forecast(measurement, field, horizon [, predicate])`, or with
/// [`ForecastFunction::accounts`], `forecast_models` with the same arguments.
#[derive(Debug)]
pub struct ForecastFunction {
    store: Arc<Store>,
    accounts: bool,
    /// Whether the shipped global network ([`GlobalLstm::pretrained`]) competes with each
    /// series' own models.
    global: bool,
}

impl ForecastFunction {
    /// `forecast`: the next steps of every matching series.
    pub fn new(store: Arc<Store>, global: bool) -> Self {
        Self {
            store,
            accounts: false,
            global,
        }
    }

    /// `forecast_models`: which model answers each of those steps, and every model's
    /// rolling error there.
    pub fn accounts(store: Arc<Store>, global: bool) -> Self {
        Self {
            store,
            accounts: true,
            global,
        }
    }

    fn name(&self) -> &'static str {
        if self.accounts {
            "forecast_models"
        } else {
            "forecast"
        }
    }
}

impl TableFunctionImpl for ForecastFunction {
    fn call_with_args(&self, args: TableFunctionArgs<'_, '_>) -> DfResult<Arc<dyn TableProvider>> {
        let name = self.name();
        let usage = || {
            DataFusionError::Plan(format!(
                "{name} takes a measurement, a numeric field, a horizon in steps and an optional SQL predicate: {name}('cpu', 'usage_user', 12, 'host = ''a''')"
            ))
        };
        let exprs = args.exprs();
        if !(3..=4).contains(&exprs.len()) {
            return Err(usage());
        }
        let (Some(measurement), Some(field), Some(horizon)) = (
            string_arg(&exprs[0]),
            string_arg(&exprs[1]),
            integer_arg(&exprs[2]),
        ) else {
            return Err(usage());
        };
        let predicate = match exprs.get(3) {
            Some(e) => Some(string_arg(e).ok_or_else(usage)?),
            None => None,
        };
        let horizon = usize::try_from(horizon)
            .ok()
            .filter(|h| (1..=MAX_HORIZON).contains(h))
            .ok_or_else(|| {
                DataFusionError::Plan(format!(
                    "{name} horizon must be between 1 and {MAX_HORIZON}"
                ))
            })?;
        let tags = tags_checking_fields(&self.store, &measurement, std::slice::from_ref(&field))?;
        let mut columns: Vec<Field> = tags
            .iter()
            .map(|t| Field::new(t, DataType::Utf8, true))
            .collect();
        if self.accounts {
            columns.push(Field::new("step", DataType::Int64, false));
            columns.push(Field::new("model", DataType::Utf8, false));
            columns.push(Field::new("rolling_error", DataType::Float64, true));
            columns.push(Field::new("answers", DataType::Boolean, false));
        } else {
            columns.push(Field::new(
                TIME_COLUMN,
                DataType::Timestamp(TimeUnit::Nanosecond, Some("UTC".into())),
                false,
            ));
            for c in ["mean", "lower", "upper"] {
                columns.push(Field::new(c, DataType::Float64, false));
            }
            columns.push(Field::new("model", DataType::Utf8, false));
        }
        Ok(Arc::new(ModelTable {
            schema: Arc::new(Schema::new(columns)),
            kind: ModelQuery::Forecast {
                measurement,
                field,
                horizon,
                predicate,
                tags,
                accounts: self.accounts,
                global: self.global,
            },
        }))
    }
}

/// `risk(measurement, metrics [, predicate [, component tag]])`.
#[derive(Debug)]
pub struct RiskFunction {
    store: Arc<Store>,
}

impl RiskFunction {
    pub fn new(store: Arc<Store>) -> Self {
        Self { store }
    }
}

const RISK_USAGE: &str = "risk takes a measurement, its metrics as 'field > threshold [AS resource], …', an optional SQL predicate and an optional component tag: risk('cpu', 'usage_user > 90 AS cpu', 'time > now() - interval ''1 day''', 'host')";

/// Parses `usage_user > 90 AS cpu, mem_used > 85 AS memory`.
fn parse_metrics(spec: &str) -> DfResult<Vec<MetricSpec>> {
    let bad = |item: &str| {
        DataFusionError::Plan(format!(
            "risk metric '{}' is not 'field > threshold [AS resource]'",
            item.trim()
        ))
    };
    spec.split(',')
        .map(|item| {
            let (cond, resource) = match item.to_ascii_lowercase().find(" as ") {
                Some(at) => (&item[..at], Some(item[at + 4..].trim())),
                None => (item, None),
            };
            let (field, threshold) = cond.split_once('>').ok_or_else(|| bad(item))?;
            let field = field.trim();
            let threshold: f64 = threshold.trim().parse().map_err(|_| bad(item))?;
            if field.is_empty() || !threshold.is_finite() || resource == Some("") {
                return Err(bad(item));
            }
            Ok(MetricSpec {
                name: field.to_owned(),
                resource: resource.unwrap_or(field).to_owned(),
                threshold,
            })
        })
        .collect()
}

impl TableFunctionImpl for RiskFunction {
    fn call_with_args(&self, args: TableFunctionArgs<'_, '_>) -> DfResult<Arc<dyn TableProvider>> {
        let exprs = args.exprs();
        if !(2..=4).contains(&exprs.len()) {
            return plan_err!("{RISK_USAGE}");
        }
        let strings: Vec<String> = exprs
            .iter()
            .map(|e| string_arg(e).ok_or_else(|| DataFusionError::Plan(RISK_USAGE.into())))
            .collect::<DfResult<_>>()?;
        let measurement = strings[0].clone();
        let metrics = parse_metrics(&strings[1])?;
        let fields: Vec<String> = metrics.iter().map(|m| m.name.clone()).collect();
        let tags = tags_checking_fields(&self.store, &measurement, &fields)?;
        let component = match strings.get(3) {
            Some(t) if tags.contains(t) => t.clone(),
            Some(t) => return plan_err!("'{measurement}' has no tag '{t}'"),
            None => ["component", "host"]
                .into_iter()
                .find(|t| tags.iter().any(|x| x == t))
                .map(str::to_owned)
                .ok_or_else(|| {
                    DataFusionError::Plan(format!(
                        "'{measurement}' has neither a 'component' nor a 'host' tag: name the component tag as risk's fourth argument"
                    ))
                })?,
        };
        let schema = Arc::new(Schema::new(vec![
            Field::new("component", DataType::Utf8, true),
            Field::new("resource", DataType::Utf8, false),
            Field::new("score", DataType::Float64, false),
            Field::new("reasons", DataType::Utf8, false),
        ]));
        Ok(Arc::new(ModelTable {
            schema,
            kind: ModelQuery::Risk {
                measurement,
                metrics,
                predicate: strings.get(2).cloned().filter(|p| !p.trim().is_empty()),
                component,
            },
        }))
    }
}

#[derive(Debug)]
enum ModelQuery {
    Forecast {
        measurement: String,
        field: String,
        horizon: usize,
        predicate: Option<String>,
        tags: Vec<String>,
        /// `forecast_models`: the models' accounts instead of the forecast.
        accounts: bool,
        /// The shipped global network competes (see [`ForecastFunction`]).
        global: bool,
    },
    Risk {
        measurement: String,
        metrics: Vec<MetricSpec>,
        predicate: Option<String>,
        component: String,
    },
}

/// Series per batched forward pass of the global network in `forecast`.
const GLOBAL_BATCH: usize = 256;

/// One series' history replayed through an [`AutoForecaster`].
struct Replayed {
    names: Vec<&'static str>,
    forecast: Vec<Step>,
    /// `errors[step - 1][model]`: every model's rolling error at each step of `forecast`
    /// (only for `forecast_models`).
    errors: Vec<Vec<Option<f64>>>,
}

/// The result of a model table function, computed when the query runs.
struct ModelTable {
    schema: SchemaRef,
    kind: ModelQuery,
}

impl fmt::Debug for ModelTable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ModelTable")
            .field("kind", &self.kind)
            .finish()
    }
}

impl ModelTable {
    async fn compute(&self, state: &dyn Session) -> DfResult<RecordBatch> {
        let external = |e: forestall_models::Error| DataFusionError::External(Box::new(e));
        match &self.kind {
            ModelQuery::Forecast {
                measurement,
                field,
                horizon,
                predicate,
                tags,
                accounts,
                global,
            } => {
                let history = read_history(
                    state,
                    measurement,
                    tags,
                    std::slice::from_ref(field),
                    predicate.as_deref(),
                )
                .await?;
                let config = ForecastConfig {
                    // Errors are tracked up to 96 steps; longer forecasts widen the last.
                    horizon: (*horizon).min(96),
                    ..ForecastConfig::default()
                };
                let (steps, accounts) = (*horizon, *accounts);
                let answer = move |f: &AutoForecaster| {
                    let forecast = f.forecast(steps, FORECAST_LEVEL);
                    let errors: Vec<Vec<Option<f64>>> = if accounts {
                        (1..=forecast.len()).map(|s| f.rolling_error(s)).collect()
                    } else {
                        Vec::new()
                    };
                    Replayed {
                        names: f.model_names(),
                        forecast,
                        errors,
                    }
                };
                let history = Arc::new(history);
                let replayed = if *global {
                    // The kind the network was told of: the measurement's, else the field's.
                    let kind = match kind_of(measurement) {
                        k if k == KINDS.len() - 1 => kind_of(field),
                        k => k,
                    };
                    per_batch(Arc::clone(&history), GLOBAL_BATCH, move |groups| {
                        let mut model = GlobalLstm::pretrained().map_err(external)?;
                        let times: Vec<Vec<f64>> = groups
                            .iter()
                            .map(|g| g.times.iter().map(|&t| t as f64 / 1e9).collect())
                            .collect();
                        let series: Vec<Replay<'_>> = groups
                            .iter()
                            .zip(&times)
                            .map(|(g, times)| Replay {
                                values: &g.values[0],
                                times,
                                kind,
                            })
                            .collect();
                        let forecasters =
                            replay(&mut model, &series, config, SCORED_ROWS).map_err(external)?;
                        Ok(forecasters.iter().map(answer).collect())
                    })
                    .await?
                } else {
                    per_group(Arc::clone(&history), move |g| {
                        let mut f = AutoForecaster::new(config).map_err(external)?;
                        for &v in &g.values[0] {
                            f.update(v);
                        }
                        Ok(answer(&f))
                    })
                    .await?
                };
                let mut tag_builders: Vec<StringBuilder> =
                    tags.iter().map(|_| StringBuilder::new()).collect();
                let mut columns: Vec<ArrayRef> = Vec::new();
                if accounts {
                    let mut step = Int64Builder::new();
                    let mut model = StringBuilder::new();
                    let mut error = Float64Builder::new();
                    let mut answers = BooleanBuilder::new();
                    for (g, r) in history.iter().zip(&replayed) {
                        for (k, (p, errors)) in r.forecast.iter().zip(&r.errors).enumerate() {
                            for (m, (name, e)) in r.names.iter().zip(errors).enumerate() {
                                for (b, t) in tag_builders.iter_mut().zip(&g.tags) {
                                    b.append_option(t.as_deref());
                                }
                                step.append_value(k as i64 + 1);
                                model.append_value(name);
                                error.append_option(*e);
                                answers.append_value(m == p.model);
                            }
                        }
                    }
                    columns.extend(tag_builders.iter_mut().map(|b| Arc::new(b.finish()) as _));
                    columns.push(Arc::new(step.finish()));
                    columns.push(Arc::new(model.finish()));
                    columns.push(Arc::new(error.finish()));
                    columns.push(Arc::new(answers.finish()));
                } else {
                    let mut time = TimestampNanosecondBuilder::new().with_timezone("UTC");
                    let (mut mean, mut lower, mut upper) = (
                        Float64Builder::new(),
                        Float64Builder::new(),
                        Float64Builder::new(),
                    );
                    let mut model = StringBuilder::new();
                    for (g, r) in history.iter().zip(&replayed) {
                        let (Some(&last), step) = (g.times.last(), step_of(&g.times)) else {
                            continue;
                        };
                        for (i, p) in r.forecast.iter().enumerate() {
                            for (b, k) in tag_builders.iter_mut().zip(&g.tags) {
                                b.append_option(k.as_deref());
                            }
                            time.append_value(
                                last.saturating_add(step.saturating_mul(i as i64 + 1)),
                            );
                            mean.append_value(p.mean);
                            lower.append_value(p.lower);
                            upper.append_value(p.upper);
                            model.append_value(r.names[p.model]);
                        }
                    }
                    columns.extend(tag_builders.iter_mut().map(|b| Arc::new(b.finish()) as _));
                    columns.push(Arc::new(time.finish()));
                    columns.push(Arc::new(mean.finish()));
                    columns.push(Arc::new(lower.finish()));
                    columns.push(Arc::new(upper.finish()));
                    columns.push(Arc::new(model.finish()));
                }
                Ok(RecordBatch::try_new(Arc::clone(&self.schema), columns)?)
            }
            ModelQuery::Risk {
                measurement,
                metrics,
                predicate,
                component,
            } => {
                let fields: Vec<String> = metrics.iter().map(|m| m.name.clone()).collect();
                let history = read_history(
                    state,
                    measurement,
                    std::slice::from_ref(component),
                    &fields,
                    predicate.as_deref(),
                )
                .await?;
                let config = RiskConfig::default();
                let (mut comp, mut resource, mut score, mut reasons) = (
                    StringBuilder::new(),
                    StringBuilder::new(),
                    Float64Builder::new(),
                    StringBuilder::new(),
                );
                let history = Arc::new(history);
                let specs = metrics.clone();
                let risks = per_group(Arc::clone(&history), move |g| {
                    let warmup = (g.times.len() / 5).min(300);
                    assess(&specs, &g.values, config, warmup).map_err(external)
                })
                .await?;
                for (g, risks) in history.iter().zip(risks) {
                    for r in risks {
                        comp.append_option(g.tags[0].as_deref());
                        resource.append_value(&r.resource);
                        score.append_value(r.score);
                        reasons.append_value(r.reasons.join("; "));
                    }
                }
                Ok(RecordBatch::try_new(
                    Arc::clone(&self.schema),
                    vec![
                        Arc::new(comp.finish()),
                        Arc::new(resource.finish()),
                        Arc::new(score.finish()),
                        Arc::new(reasons.finish()),
                    ],
                )?)
            }
        }
    }
}

#[async_trait]
impl TableProvider for ModelTable {
    fn schema(&self) -> SchemaRef {
        Arc::clone(&self.schema)
    }

    fn table_type(&self) -> TableType {
        TableType::Temporary
    }

    async fn scan(
        &self,
        state: &dyn Session,
        projection: Option<&Vec<usize>>,
        filters: &[Expr],
        limit: Option<usize>,
    ) -> DfResult<Arc<dyn ExecutionPlan>> {
        let batch = self.compute(state).await?;
        MemTable::try_new(Arc::clone(&self.schema), vec![vec![batch]])?
            .scan(state, projection, filters, limit)
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_groups_rows_come_in_time_order_with_shared_times_averaged() {
        // Two series of one component, read in no particular order: at time 20 both have a
        // value, at 30 one of them has none.
        let times = [30, 10, 20, 20, 30];
        let values = vec![vec![f64::NAN, 1.0, 2.0, 4.0, 5.0], vec![f64::NAN; 5]];
        let g = in_time_order(Group {
            tags: vec![Some("web".into())],
            times: times.to_vec(),
            values,
        });
        assert_eq!(g.times, vec![10, 20, 30]);
        assert_eq!(g.values[0], vec![1.0, 3.0, 5.0]);
        assert!(g.values[1].iter().all(|v| v.is_nan()), "no value: NaN");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn per_group_keeps_order_and_a_dropped_query_stops_its_work() {
        let groups = |n: usize| {
            Arc::new(
                (0..n)
                    .map(|i| Group {
                        tags: vec![Some(i.to_string())],
                        times: vec![],
                        values: vec![],
                    })
                    .collect::<Vec<_>>(),
            )
        };
        let tags = per_group(groups(25), |g| Ok(g.tags[0].clone().unwrap()))
            .await
            .unwrap();
        assert_eq!(tags, (0..25).map(|i| i.to_string()).collect::<Vec<_>>());

        // 1,000 groups of 2 ms each; the query is dropped after 20 ms.
        let done = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counter = Arc::clone(&done);
        let work = per_group(groups(1000), move |_| {
            std::thread::sleep(std::time::Duration::from_millis(2));
            counter.fetch_add(1, Ordering::Relaxed);
            Ok(())
        });
        assert!(
            tokio::time::timeout(std::time::Duration::from_millis(20), work)
                .await
                .is_err()
        );
        // Left alone, the shares would take a second or more to finish all 1,000.
        tokio::time::sleep(std::time::Duration::from_millis(2500)).await;
        let n = done.load(Ordering::Relaxed);
        assert!(
            n < 500,
            "{n} groups were worked on after the query was dropped"
        );
    }

    #[test]
    fn risk_metric_specs_parse_and_bad_ones_are_refused() {
        let m = parse_metrics("usage_user > 90 AS cpu, mem_used>85.5").unwrap();
        assert_eq!(m.len(), 2);
        assert_eq!(
            (m[0].name.as_str(), m[0].resource.as_str(), m[0].threshold),
            ("usage_user", "cpu", 90.0)
        );
        assert_eq!(
            (m[1].name.as_str(), m[1].resource.as_str(), m[1].threshold),
            ("mem_used", "mem_used", 85.5)
        );
        for bad in [
            "",
            "usage_user",
            "usage_user > x",
            "> 5",
            "a > 1 AS ",
            "a > inf",
        ] {
            assert!(parse_metrics(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn the_step_is_the_median_recent_gap() {
        assert_eq!(step_of(&[0, 10, 20, 30, 1000]), 10);
        assert_eq!(step_of(&[5]), 1_000_000_000);
        assert_eq!(step_of(&[5, 5, 5]), 1_000_000_000);
    }
}
