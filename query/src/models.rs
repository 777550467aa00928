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
//! * `risk('cpu', 'usage_user > 90 AS cpu, mem_used > 85 AS memory' [, predicate [, tag]])`:
//!   per component (the tag `component`, else `host`, or the one named), the metrics' history
//!   is replayed into the component's Bayesian network ([`forestall_models::risk::assess`]),
//!   giving per resource the probability of a bottleneck within 12 rows and the evidence
//!   behind it: rows `component, resource, score, reasons`.
//!
//! The table functions read their input with an ordinary query of the same session (so the
//! predicate prunes segments like any `WHERE`), when the query runs, not when it is planned.

use std::fmt;
use std::sync::Arc;

use arrow::array::{
    Array, ArrayRef, AsArray, Float64Array, Float64Builder, RecordBatch, StringBuilder,
    TimestampNanosecondBuilder,
};
use arrow::compute::cast;
use arrow::datatypes::{DataType, Field, FieldRef, Int64Type, Schema, SchemaRef, TimeUnit};
use async_trait::async_trait;
use datafusion::catalog::{Session, TableFunctionArgs, TableFunctionImpl, TableProvider};
use datafusion::common::{Column, DataFusionError, Result as DfResult, ScalarValue, plan_err};
use datafusion::datasource::{MemTable, TableType};
use datafusion::execution::context::{SessionContext, SessionState};
use datafusion::functions_aggregate::expr_fn::avg;
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
use forestall_models::forecast::{AutoForecaster, ForecastConfig};
use forestall_models::risk::{MetricSpec, RiskConfig, assess};

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
    /// Row times, ascending.
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
    let column = |name: &str| Expr::Column(Column::from_name(name));
    let mut keys: Vec<Expr> = tags.iter().map(|t| column(t)).collect();
    keys.push(column(TIME_COLUMN));
    let aggregates: Vec<Expr> = fields
        .iter()
        .map(|f| avg(cast_expr(column(f), DataType::Float64)).alias(f.as_str()))
        .collect();
    let sort = keys.iter().map(|k| k.clone().sort(true, true)).collect();
    let batches = df
        .aggregate(keys, aggregates)?
        .sort(sort)?
        .collect()
        .await?;
    let mut groups: Vec<Group> = Vec::new();
    for batch in &batches {
        let tag_columns = (0..tags.len())
            .map(|i| cast(batch.column(i), &DataType::Utf8))
            .collect::<Result<Vec<_>, _>>()?;
        let time = cast(batch.column(tags.len()), &DataType::Int64)?;
        let time = time.as_primitive::<Int64Type>();
        let values: Vec<&Float64Array> = (0..fields.len())
            .map(|i| batch.column(tags.len() + 1 + i).as_primitive())
            .collect();
        for row in 0..batch.num_rows() {
            let key: Vec<Option<String>> = tag_columns
                .iter()
                .map(|c| {
                    let c = c.as_string::<i32>();
                    c.is_valid(row).then(|| c.value(row).to_owned())
                })
                .collect();
            if groups.last().is_none_or(|g| g.tags != key) {
                groups.push(Group {
                    tags: key,
                    times: Vec::new(),
                    values: vec![Vec::new(); fields.len()],
                });
            }
            if let Some(g) = groups.last_mut() {
                g.times.push(time.value(row));
                for (s, v) in g.values.iter_mut().zip(&values) {
                    s.push(if v.is_valid(row) {
                        v.value(row)
                    } else {
                        f64::NAN
                    });
                }
            }
        }
    }
    Ok(groups)
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

/// `forecast(measurement, field, horizon [, predicate])`.
#[derive(Debug)]
pub struct ForecastFunction {
    store: Arc<Store>,
}

impl ForecastFunction {
    pub fn new(store: Arc<Store>) -> Self {
        Self { store }
    }
}

const FORECAST_USAGE: &str = "forecast takes a measurement, a numeric field, a horizon in steps and an optional SQL predicate: forecast('cpu', 'usage_user', 12, 'host = ''a''')";

impl TableFunctionImpl for ForecastFunction {
    fn call_with_args(&self, args: TableFunctionArgs<'_, '_>) -> DfResult<Arc<dyn TableProvider>> {
        let exprs = args.exprs();
        if !(3..=4).contains(&exprs.len()) {
            return plan_err!("{FORECAST_USAGE}");
        }
        let (Some(measurement), Some(field), Some(horizon)) = (
            string_arg(&exprs[0]),
            string_arg(&exprs[1]),
            integer_arg(&exprs[2]),
        ) else {
            return plan_err!("{FORECAST_USAGE}");
        };
        let predicate = match exprs.get(3) {
            Some(e) => {
                Some(string_arg(e).ok_or_else(|| DataFusionError::Plan(FORECAST_USAGE.into()))?)
            }
            None => None,
        };
        let horizon = usize::try_from(horizon)
            .ok()
            .filter(|h| (1..=MAX_HORIZON).contains(h))
            .ok_or_else(|| {
                DataFusionError::Plan(format!(
                    "forecast horizon must be between 1 and {MAX_HORIZON}"
                ))
            })?;
        let tags = tags_checking_fields(&self.store, &measurement, std::slice::from_ref(&field))?;
        let mut columns: Vec<Field> = tags
            .iter()
            .map(|t| Field::new(t, DataType::Utf8, true))
            .collect();
        columns.push(Field::new(
            TIME_COLUMN,
            DataType::Timestamp(TimeUnit::Nanosecond, Some("UTC".into())),
            false,
        ));
        for c in ["mean", "lower", "upper"] {
            columns.push(Field::new(c, DataType::Float64, false));
        }
        columns.push(Field::new("model", DataType::Utf8, false));
        Ok(Arc::new(ModelTable {
            schema: Arc::new(Schema::new(columns)),
            kind: ModelQuery::Forecast {
                measurement,
                field,
                horizon,
                predicate,
                tags,
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
    },
    Risk {
        measurement: String,
        metrics: Vec<MetricSpec>,
        predicate: Option<String>,
        component: String,
    },
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
            } => {
                let history = read_history(
                    state,
                    measurement,
                    tags,
                    std::slice::from_ref(field),
                    predicate.as_deref(),
                )
                .await?;
                let mut tag_builders: Vec<StringBuilder> =
                    tags.iter().map(|_| StringBuilder::new()).collect();
                let mut time = TimestampNanosecondBuilder::new().with_timezone("UTC");
                let (mut mean, mut lower, mut upper) = (
                    Float64Builder::new(),
                    Float64Builder::new(),
                    Float64Builder::new(),
                );
                let mut model = StringBuilder::new();
                let config = ForecastConfig {
                    // Errors are tracked up to 96 steps; longer forecasts widen the last.
                    horizon: (*horizon).min(96),
                    ..ForecastConfig::default()
                };
                for g in &history {
                    let mut f = AutoForecaster::new(config).map_err(external)?;
                    for &v in &g.values[0] {
                        f.update(v);
                    }
                    let names = f.model_names();
                    let (Some(&last), step) = (g.times.last(), step_of(&g.times)) else {
                        continue;
                    };
                    for (i, p) in f.forecast(*horizon, FORECAST_LEVEL).iter().enumerate() {
                        for (b, k) in tag_builders.iter_mut().zip(&g.tags) {
                            b.append_option(k.as_deref());
                        }
                        time.append_value(last.saturating_add(step.saturating_mul(i as i64 + 1)));
                        mean.append_value(p.mean);
                        lower.append_value(p.lower);
                        upper.append_value(p.upper);
                        model.append_value(names[p.model]);
                    }
                }
                let mut columns: Vec<ArrayRef> = tag_builders
                    .iter_mut()
                    .map(|b| Arc::new(b.finish()) as ArrayRef)
                    .collect();
                columns.push(Arc::new(time.finish()));
                columns.push(Arc::new(mean.finish()));
                columns.push(Arc::new(lower.finish()));
                columns.push(Arc::new(upper.finish()));
                columns.push(Arc::new(model.finish()));
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
                for g in &history {
                    let warmup = (g.times.len() / 5).min(300);
                    for r in assess(metrics, &g.values, config, warmup).map_err(external)? {
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
