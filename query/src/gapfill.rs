//! Gap filling: `date_bin_gapfill(stride, time [, origin])` in `GROUP BY`, with `locf(agg)`
//! (last observation carried forward) and `interpolate(agg)` (linear) in the select list, as
//! in InfluxDB 3:
//!
//! ```sql
//! SELECT date_bin_gapfill(INTERVAL '1 minute', time) AS minute, host,
//!        avg(usage) AS plain, locf(avg(usage)) AS carried, interpolate(avg(usage)) AS linear
//! FROM cpu
//! WHERE time >= '2026-01-01T00:00:00Z' AND time < '2026-01-01T01:00:00Z'
//! GROUP BY 1, host
//! ```
//!
//! Every group gets a row for every bucket of the `WHERE` time range, also where it had no
//! data; those rows hold NULL, or the filled value. The range must be bounded on both sides.
//!
//! How: an analyzer rule ([`GapFillRule`]) finds a projection over an aggregate grouped by
//! `date_bin_gapfill`, turns that into an ordinary `date_bin`, and puts a [`GapFill`] node
//! between the two that knows the stride, the range and each column's fill. Its operator
//! ([`GapFillExec`]) reads the aggregate's (small) output whole and writes it out with the
//! gaps filled, sorted by group and then time.

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;

use arrow::array::{Array, ArrayRef, AsArray, RecordBatch, TimestampNanosecondArray, UInt32Array};
use arrow::compute::{cast, concat_batches, take};
use arrow::datatypes::{
    DataType, Field, FieldRef, Float64Type, SchemaRef, TimeUnit, TimestampNanosecondType,
};
use arrow::row::{RowConverter, SortField};
use async_trait::async_trait;
use datafusion::catalog::Session;
use datafusion::common::tree_node::{Transformed, TreeNode, TreeNodeRecursion};
use datafusion::common::{
    Column, DFSchema, DFSchemaRef, DataFusionError, Result, ScalarValue, TableReference,
    internal_err, plan_err,
};
use datafusion::config::ConfigOptions;
use datafusion::execution::context::QueryPlanner;
use datafusion::execution::{SendableRecordBatchStream, SessionStateBuilder, TaskContext};
use datafusion::logical_expr::expr::{Alias, ScalarFunction};
use datafusion::logical_expr::physical_planning_context::PhysicalPlanningContext;
use datafusion::logical_expr::simplify::SimplifyContext;
use datafusion::logical_expr::{
    Aggregate, BinaryExpr, ColumnarValue, Expr, Extension, LogicalPlan, Operator, Projection,
    ScalarFunctionArgs, ScalarUDF, ScalarUDFImpl, Signature, UserDefinedLogicalNode,
    UserDefinedLogicalNodeCore, Volatility,
};
use datafusion::optimizer::AnalyzerRule;
use datafusion::optimizer::simplify_expressions::ExprSimplifier;
use datafusion::physical_expr::{EquivalenceProperties, PhysicalExpr};
use datafusion::physical_plan::execution_plan::{Boundedness, EmissionType};
use datafusion::physical_plan::stream::RecordBatchStreamAdapter;
use datafusion::physical_plan::{
    DisplayAs, DisplayFormatType, Distribution, ExecutionPlan, Partitioning, PlanProperties,
};
use datafusion::physical_planner::{DefaultPhysicalPlanner, ExtensionPlanner, PhysicalPlanner};
use futures::StreamExt;

/// Adds the gap-filling functions, rule and planner to a session being built.
pub fn install(builder: SessionStateBuilder) -> SessionStateBuilder {
    builder
        .with_analyzer_rule(Arc::new(GapFillRule))
        .with_query_planner(Arc::new(GapFillPlanner))
}

/// The functions: `date_bin_gapfill`, `locf`, `interpolate`.
pub fn functions() -> Vec<ScalarUDF> {
    vec![
        ScalarUDF::new_from_impl(DateBinGapfill::new()),
        ScalarUDF::new_from_impl(FillMarker::new(Fill::Locf)),
        ScalarUDF::new_from_impl(FillMarker::new(Fill::Interpolate)),
    ]
}

const GAPFILL: &str = "date_bin_gapfill";

/// `date_bin_gapfill`: `date_bin` that also marks its aggregate for gap filling. Outside a
/// `GROUP BY` it is plain `date_bin`.
#[derive(Debug, PartialEq, Eq, Hash)]
struct DateBinGapfill {
    inner: Arc<ScalarUDF>,
}

impl DateBinGapfill {
    fn new() -> Self {
        Self {
            inner: datafusion::functions::datetime::date_bin(),
        }
    }
}

impl ScalarUDFImpl for DateBinGapfill {
    fn name(&self) -> &str {
        GAPFILL
    }

    fn signature(&self) -> &Signature {
        self.inner.signature()
    }

    fn return_type(&self, arg_types: &[DataType]) -> Result<DataType> {
        self.inner.return_type(arg_types)
    }

    fn return_field_from_args(
        &self,
        args: datafusion::logical_expr::ReturnFieldArgs<'_>,
    ) -> Result<arrow::datatypes::FieldRef> {
        self.inner.return_field_from_args(args)
    }

    fn coerce_types(&self, arg_types: &[DataType]) -> Result<Vec<DataType>> {
        self.inner.coerce_types(arg_types)
    }

    fn invoke_with_args(&self, args: ScalarFunctionArgs) -> Result<ColumnarValue> {
        self.inner.invoke_with_args(args)
    }
}

/// How a column's missing buckets are filled.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd)]
pub enum Fill {
    /// NULL.
    Null,
    /// The group's previous value.
    Locf,
    /// Linear between the group's previous and next values (numbers only).
    Interpolate,
}

impl Fill {
    fn function_name(self) -> &'static str {
        match self {
            Fill::Null => "",
            Fill::Locf => "locf",
            Fill::Interpolate => "interpolate",
        }
    }
}

/// `locf(x)` and `interpolate(x)`: markers the rule removes; evaluated anywhere else they
/// return their argument.
#[derive(Debug, PartialEq, Eq, Hash)]
struct FillMarker {
    fill: Fill,
    signature: Signature,
}

impl FillMarker {
    fn new(fill: Fill) -> Self {
        Self {
            fill,
            signature: Signature::any(1, Volatility::Immutable),
        }
    }
}

impl ScalarUDFImpl for FillMarker {
    fn name(&self) -> &str {
        self.fill.function_name()
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn return_type(&self, arg_types: &[DataType]) -> Result<DataType> {
        Ok(arg_types[0].clone())
    }

    fn invoke_with_args(&self, mut args: ScalarFunctionArgs) -> Result<ColumnarValue> {
        Ok(args.args.remove(0))
    }
}

/// The fill of an expression of the select list, and the expression without the marker.
fn strip_fill(e: &Expr) -> (Fill, Option<Expr>) {
    match e {
        Expr::Alias(Alias { expr, .. }) => strip_fill(expr),
        Expr::ScalarFunction(ScalarFunction { func, args }) if args.len() == 1 => {
            match func.name() {
                "locf" => (Fill::Locf, Some(args[0].clone())),
                "interpolate" => (Fill::Interpolate, Some(args[0].clone())),
                _ => (Fill::Null, None),
            }
        }
        _ => (Fill::Null, None),
    }
}

/// The `date_bin_gapfill` call of a group expression, if it is one.
fn gapfill_call(e: &Expr) -> Option<&ScalarFunction> {
    match e {
        Expr::Alias(Alias { expr, .. }) => gapfill_call(expr),
        Expr::ScalarFunction(f) if f.func.name() == GAPFILL => Some(f),
        _ => None,
    }
}

/// Rewrites aggregates grouped by `date_bin_gapfill`; see the module docs.
#[derive(Debug)]
pub struct GapFillRule;

impl AnalyzerRule for GapFillRule {
    fn name(&self) -> &str {
        "gap_fill"
    }

    fn analyze(&self, plan: LogicalPlan, _config: &ConfigOptions) -> Result<LogicalPlan> {
        plan.transform_up(|node| {
            let LogicalPlan::Projection(projection) = &node else {
                return Ok(Transformed::no(node));
            };
            let LogicalPlan::Aggregate(aggregate) = projection.input.as_ref() else {
                return Ok(Transformed::no(node));
            };
            match aggregate
                .group_expr
                .iter()
                .position(|e| gapfill_call(e).is_some())
            {
                None => Ok(Transformed::no(node)),
                Some(time_group) => {
                    rewrite(projection, aggregate, time_group).map(Transformed::yes)
                }
            }
        })
        .map(|t| t.data)
    }
}

fn rewrite(
    projection: &Projection,
    aggregate: &Aggregate,
    time_group: usize,
) -> Result<LogicalPlan> {
    let call = gapfill_call(&aggregate.group_expr[time_group]).expect("found above");
    let stride = match call.args.first() {
        Some(Expr::Literal(v, _)) => stride_nanos(v)?,
        _ => return plan_err!("date_bin_gapfill needs a constant interval as its first argument"),
    };
    let origin = match call.args.get(2) {
        None => 0,
        Some(e) => match constant(e, aggregate.input.schema())? {
            Some(ScalarValue::TimestampNanosecond(Some(n), _)) => n,
            _ => return plan_err!("date_bin_gapfill's origin must be a constant timestamp"),
        },
    };
    let Some(time) = call.args.get(1).and_then(|e| match e {
        Expr::Column(c) => Some(c.name.clone()),
        Expr::Cast(c) => match c.expr.as_ref() {
            Expr::Column(c) => Some(c.name.clone()),
            _ => None,
        },
        _ => None,
    }) else {
        return plan_err!("date_bin_gapfill's second argument must be the time column");
    };
    let (start, end) = time_range(&aggregate.input, &time)?;

    // The aggregate groups by plain date_bin, under the old name so that the columns the
    // projection refers to keep their names.
    let old_name = aggregate.schema.field(time_group).name().clone();
    let date_bin = Expr::ScalarFunction(ScalarFunction {
        func: datafusion::functions::datetime::date_bin(),
        args: call.args.clone(),
    })
    .alias(old_name);
    let mut group_expr = aggregate.group_expr.clone();
    group_expr[time_group] = date_bin;
    let new_aggregate = LogicalPlan::Aggregate(Aggregate::try_new(
        Arc::clone(&aggregate.input),
        group_expr,
        aggregate.aggr_expr.clone(),
    )?);

    // Fills: each marker in the select list becomes a column of its own after the aggregate's
    // (the same aggregate may be selected plain, carried and interpolated at once).
    let input_schema = Arc::clone(new_aggregate.schema());
    let mut fills: Vec<(usize, Fill)> = Vec::new();
    // A gap has no value for any aggregate, so each may be NULL (count(*) too).
    let mut fields: Vec<(Option<TableReference>, FieldRef)> = input_schema
        .iter()
        .enumerate()
        .map(|(i, (q, f))| {
            let f = if i >= aggregate.group_expr.len() && !f.is_nullable() {
                Arc::new(f.as_ref().clone().with_nullable(true))
            } else {
                Arc::clone(f)
            };
            (q.cloned(), f)
        })
        .collect();
    let mut exprs = Vec::with_capacity(projection.expr.len());
    for e in &projection.expr {
        let (fill, inner) = strip_fill(e);
        let Some(inner) = inner else {
            exprs.push(e.clone());
            continue;
        };
        let Expr::Column(c) = &inner else {
            return plan_err!(
                "{}() takes an aggregate of the query, like {}(avg(x))",
                fill.function_name(),
                fill.function_name()
            );
        };
        let source = input_schema.index_of_column(c)?;
        if source < aggregate.group_expr.len() {
            return plan_err!(
                "{}() applies to aggregates, not to GROUP BY columns",
                fill.function_name()
            );
        }
        let name = format!("{}({})", fill.function_name(), c.name);
        if !fields.iter().any(|(_, f)| f.name() == &name) {
            let source_field = input_schema.field(source);
            fields.push((
                None,
                Arc::new(Field::new(&name, source_field.data_type().clone(), true)),
            ));
            fills.push((source, fill));
        }
        exprs.push(Expr::Column(Column::from_name(name)).alias(e.schema_name().to_string()));
    }
    let schema = Arc::new(DFSchema::new_with_metadata(fields, HashMap::new())?);
    let gapfill = LogicalPlan::Extension(Extension {
        node: Arc::new(GapFill {
            input: new_aggregate,
            schema,
            time_column: time_group,
            group_columns: (0..aggregate.group_expr.len())
                .filter(|&i| i != time_group)
                .collect(),
            stride,
            origin,
            start,
            end,
            fills,
        }),
    });
    Ok(LogicalPlan::Projection(Projection::try_new(
        exprs,
        Arc::new(gapfill),
    )?))
}

pub(crate) fn stride_nanos(v: &ScalarValue) -> Result<i64> {
    let nanos = match v {
        ScalarValue::IntervalMonthDayNano(Some(i)) if i.months == 0 => {
            i64::from(i.days) * 86_400_000_000_000 + i.nanoseconds
        }
        ScalarValue::IntervalDayTime(Some(i)) => {
            i64::from(i.days) * 86_400_000_000_000 + i64::from(i.milliseconds) * 1_000_000
        }
        ScalarValue::DurationNanosecond(Some(n)) => *n,
        _ => return plan_err!("date_bin_gapfill needs a fixed interval (no months), got {v}"),
    };
    if nanos <= 0 {
        return plan_err!("date_bin_gapfill needs a positive interval");
    }
    Ok(nanos)
}

/// A constant expression's value, after simplification (casts of literals, `now()`).
fn constant(e: &Expr, schema: &DFSchemaRef) -> Result<Option<ScalarValue>> {
    let context = SimplifyContext::builder()
        .with_schema(Arc::clone(schema))
        .with_current_time()
        .build();
    let simplified = ExprSimplifier::new(context).simplify(e.clone())?;
    Ok(match simplified {
        Expr::Literal(v, _) => v
            .cast_to(&DataType::Timestamp(TimeUnit::Nanosecond, None))
            .ok(),
        _ => None,
    })
}

/// `[start, end)` from the filters on `time` below the aggregate: the tightest of the
/// bounds (`>`, `>=`, `<`, `<=`, `BETWEEN`) that every row must meet. An empty range is
/// `start == end`: no buckets, and no rows.
fn time_range(plan: &LogicalPlan, time: &str) -> Result<(i64, i64)> {
    let (mut start, mut end) = (None::<i64>, None::<i64>);
    plan.apply(|node| {
        if let LogicalPlan::Filter(f) = node {
            for conjunct in split_and(&f.predicate) {
                if let Expr::Between(between) = conjunct
                    && !between.negated
                    && is_column(&between.expr, time)
                {
                    let schema = f.input.schema();
                    if let (
                        Some(ScalarValue::TimestampNanosecond(Some(low), _)),
                        Some(ScalarValue::TimestampNanosecond(Some(high), _)),
                    ) = (
                        constant(&between.low, schema)?,
                        constant(&between.high, schema)?,
                    ) {
                        start = Some(start.map_or(low, |s| s.max(low)));
                        end = Some(end.map_or(high + 1, |e| e.min(high + 1)));
                    }
                    continue;
                }
                let Expr::BinaryExpr(BinaryExpr { left, op, right }) = conjunct else {
                    continue;
                };
                let (op, value) = match (is_column(left, time), is_column(right, time)) {
                    (true, false) => (*op, right),
                    (false, true) => match op.swap() {
                        Some(op) => (op, left),
                        None => continue,
                    },
                    _ => continue,
                };
                let Some(ScalarValue::TimestampNanosecond(Some(v), _)) =
                    constant(value, f.input.schema())?
                else {
                    continue;
                };
                match op {
                    Operator::Gt => start = Some(start.map_or(v + 1, |s| s.max(v + 1))),
                    Operator::GtEq => start = Some(start.map_or(v, |s| s.max(v))),
                    Operator::Lt => end = Some(end.map_or(v, |e| e.min(v))),
                    Operator::LtEq => end = Some(end.map_or(v + 1, |e| e.min(v + 1))),
                    _ => {}
                }
            }
        }
        Ok(TreeNodeRecursion::Continue)
    })?;
    match (start, end) {
        (Some(s), Some(e)) => Ok((s, e.max(s))),
        _ => plan_err!(
            "date_bin_gapfill needs a time range bounded on both sides in WHERE, like \
             time >= '2026-01-01T00:00:00Z' AND time < '2026-01-01T01:00:00Z'"
        ),
    }
}

fn split_and(e: &Expr) -> Vec<&Expr> {
    match e {
        Expr::BinaryExpr(BinaryExpr {
            left,
            op: Operator::And,
            right,
        }) => {
            let mut out = split_and(left);
            out.extend(split_and(right));
            out
        }
        e => vec![e],
    }
}

fn is_column(e: &Expr, name: &str) -> bool {
    match e {
        Expr::Column(c) => c.name == name,
        Expr::Cast(c) => is_column(&c.expr, name),
        Expr::TryCast(c) => is_column(&c.expr, name),
        _ => false,
    }
}

/// The logical node: fills the gaps of its input, an aggregate grouped by time buckets. Its
/// output is the input's columns (NULL in the gaps) followed by one column per fill.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct GapFill {
    input: LogicalPlan,
    schema: DFSchemaRef,
    /// Index of the bucket column in the input.
    time_column: usize,
    /// The other group columns.
    group_columns: Vec<usize>,
    stride: i64,
    origin: i64,
    start: i64,
    end: i64,
    /// The extra columns: (input column, how its gaps are filled).
    fills: Vec<(usize, Fill)>,
}

impl PartialOrd for GapFill {
    fn partial_cmp(&self, _other: &Self) -> Option<std::cmp::Ordering> {
        None
    }
}

impl UserDefinedLogicalNodeCore for GapFill {
    fn name(&self) -> &str {
        "GapFill"
    }

    fn inputs(&self) -> Vec<&LogicalPlan> {
        vec![&self.input]
    }

    fn schema(&self) -> &DFSchemaRef {
        &self.schema
    }

    fn expressions(&self) -> Vec<Expr> {
        Vec::new()
    }

    fn fmt_for_explain(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "GapFill: stride={}ns, range=[{}, {}), fills={:?}",
            self.stride, self.start, self.end, self.fills
        )
    }

    fn with_exprs_and_inputs(
        &self,
        _exprs: Vec<Expr>,
        mut inputs: Vec<LogicalPlan>,
    ) -> Result<Self> {
        let Some(input) = inputs.pop() else {
            return internal_err!("GapFill has one input");
        };
        Ok(Self {
            input,
            ..self.clone()
        })
    }
}

/// Plans [`GapFill`] nodes as [`GapFillExec`].
#[derive(Debug)]
struct GapFillPlanner;

#[async_trait]
impl QueryPlanner for GapFillPlanner {
    async fn create_physical_plan(
        &self,
        logical_plan: &LogicalPlan,
        session_state: &dyn Session,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        DefaultPhysicalPlanner::with_extension_planners(vec![Arc::new(GapFillExtension)])
            .create_physical_plan(logical_plan, session_state)
            .await
    }
}

struct GapFillExtension;

#[async_trait]
impl ExtensionPlanner for GapFillExtension {
    async fn plan_extension(
        &self,
        _planner: &dyn PhysicalPlanner,
        node: &dyn UserDefinedLogicalNode,
        _logical_inputs: &[&LogicalPlan],
        physical_inputs: &[Arc<dyn ExecutionPlan>],
        _session: &dyn Session,
        _planning_ctx: &PhysicalPlanningContext,
    ) -> Result<Option<Arc<dyn ExecutionPlan>>> {
        let Some(gapfill) = node.as_any().downcast_ref::<GapFill>() else {
            return Ok(None);
        };
        let input = Arc::clone(&physical_inputs[0]);
        let schema: SchemaRef = Arc::new(gapfill.schema.as_arrow().clone());
        Ok(Some(Arc::new(GapFillExec {
            props: Arc::new(PlanProperties::new(
                EquivalenceProperties::new(Arc::clone(&schema)),
                Partitioning::UnknownPartitioning(1),
                EmissionType::Final,
                Boundedness::Bounded,
            )),
            input,
            schema,
            spec: gapfill.clone(),
        })))
    }
}

/// The operator; see the module docs.
#[derive(Debug)]
pub struct GapFillExec {
    input: Arc<dyn ExecutionPlan>,
    schema: SchemaRef,
    spec: GapFill,
    props: Arc<PlanProperties>,
}

impl DisplayAs for GapFillExec {
    fn fmt_as(&self, _t: DisplayFormatType, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "GapFillExec: stride={}ns, range=[{}, {})",
            self.spec.stride, self.spec.start, self.spec.end
        )
    }
}

impl ExecutionPlan for GapFillExec {
    fn name(&self) -> &str {
        "GapFillExec"
    }

    fn properties(&self) -> &Arc<PlanProperties> {
        &self.props
    }

    fn required_input_distribution(&self) -> Vec<Distribution> {
        vec![Distribution::SinglePartition]
    }

    fn children(&self) -> Vec<&Arc<dyn ExecutionPlan>> {
        vec![&self.input]
    }

    fn apply_expressions(
        &self,
        _f: &mut dyn FnMut(&Arc<dyn PhysicalExpr>) -> Result<TreeNodeRecursion>,
    ) -> Result<TreeNodeRecursion> {
        Ok(TreeNodeRecursion::Continue)
    }

    fn with_new_children(
        self: Arc<Self>,
        mut children: Vec<Arc<dyn ExecutionPlan>>,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        let Some(input) = children.pop() else {
            return internal_err!("GapFillExec has one input");
        };
        Ok(Arc::new(Self {
            input,
            schema: Arc::clone(&self.schema),
            spec: self.spec.clone(),
            props: Arc::clone(&self.props),
        }))
    }

    fn execute(
        &self,
        partition: usize,
        context: Arc<TaskContext>,
    ) -> Result<SendableRecordBatchStream> {
        let mut input = self.input.execute(partition, context)?;
        let input_schema = self.input.schema();
        let spec = self.spec.clone();
        let out_schema = Arc::clone(&self.schema);
        let schema = Arc::clone(&self.schema);
        let filled = futures::stream::once(async move {
            let mut batches = Vec::new();
            while let Some(b) = input.next().await {
                batches.push(b?);
            }
            let all = concat_batches(&input_schema, &batches)?;
            fill_gaps(&spec, &schema, &all)
        });
        Ok(Box::pin(RecordBatchStreamAdapter::new(out_schema, filled)))
    }
}

/// The aggregate's output with a row for every (group, bucket), sorted by group and time.
fn fill_gaps(spec: &GapFill, schema: &SchemaRef, input: &RecordBatch) -> Result<RecordBatch> {
    let bucket = |t: i64| spec.origin + (t - spec.origin).div_euclid(spec.stride) * spec.stride;
    let buckets: Vec<i64> = {
        let mut out = Vec::new();
        let mut b = bucket(spec.start);
        while b < spec.end {
            out.push(b);
            b += spec.stride;
        }
        out
    };
    if buckets.len() > 10_000_000 {
        return Err(DataFusionError::ResourcesExhausted(format!(
            "date_bin_gapfill would make {} buckets per group; use a larger interval",
            buckets.len()
        )));
    }
    let times = cast(
        input.column(spec.time_column),
        &DataType::Timestamp(TimeUnit::Nanosecond, None),
    )?;
    let times = times.as_primitive::<TimestampNanosecondType>();

    // Groups, in the order of their keys.
    let key_columns: Vec<ArrayRef> = spec
        .group_columns
        .iter()
        .map(|&i| Arc::clone(input.column(i)))
        .collect();
    let converter = RowConverter::new(
        key_columns
            .iter()
            .map(|c| SortField::new(c.data_type().clone()))
            .collect(),
    )?;
    // (With no group column besides time, every row is in the one group.)
    let keys = (!key_columns.is_empty())
        .then(|| converter.convert_columns(&key_columns))
        .transpose()?;
    /// A group's first input row (for its key values) and its rows by bucket.
    type Group = (u32, HashMap<i64, u32>);
    let mut groups: HashMap<Vec<u8>, Group> = HashMap::new();
    for row in 0..input.num_rows() {
        if times.is_null(row) {
            continue;
        }
        let entry = groups
            .entry(
                keys.as_ref()
                    .map_or_else(Vec::new, |k| k.row(row).as_ref().to_vec()),
            )
            .or_insert_with(|| (row as u32, HashMap::new()));
        entry.1.insert(times.value(row), row as u32);
    }
    let mut groups: Vec<(Vec<u8>, Group)> = groups.into_iter().collect();
    groups.sort_by(|a, b| a.0.cmp(&b.0));

    // Output row -> input row (None for a gap), and each group's first key row.
    let n = groups.len() * buckets.len();
    let mut source: Vec<Option<u32>> = Vec::with_capacity(n);
    let mut key_rows: Vec<u32> = Vec::with_capacity(n);
    for (_, (first, rows)) in &groups {
        for b in &buckets {
            source.push(rows.get(b).copied());
            key_rows.push(*first);
        }
    }
    let source = UInt32Array::from(source);
    let key_rows = UInt32Array::from(key_rows);
    let mut columns = Vec::with_capacity(schema.fields().len());
    for (i, field) in input.schema().fields().iter().enumerate() {
        let column = if i == spec.time_column {
            let t: TimestampNanosecondArray = (0..groups.len())
                .flat_map(|_| buckets.iter().copied())
                .map(Some)
                .collect();
            cast(&t, field.data_type())?
        } else if spec.group_columns.contains(&i) {
            take(input.column(i), &key_rows, None)?
        } else {
            take(input.column(i), &source, None)?
        };
        columns.push(column);
    }
    for &(i, fill) in &spec.fills {
        let column = Arc::clone(&columns[i]);
        columns.push(match fill {
            Fill::Null => column,
            Fill::Locf => locf(&column, buckets.len())?,
            Fill::Interpolate => interpolate(&column, buckets.len())?,
        });
    }
    Ok(RecordBatch::try_new(Arc::clone(schema), columns)?)
}

/// Within each run of `per_group` rows, a NULL takes the previous non-NULL value.
fn locf(column: &ArrayRef, per_group: usize) -> Result<ArrayRef> {
    let mut indices = Vec::with_capacity(column.len());
    for start in (0..column.len()).step_by(per_group.max(1)) {
        let mut last = None;
        for row in start..(start + per_group).min(column.len()) {
            if column.is_valid(row) {
                last = Some(row as u32);
            }
            indices.push(if column.is_valid(row) {
                Some(row as u32)
            } else {
                last
            });
        }
    }
    Ok(take(column, &UInt32Array::from(indices), None)?)
}

/// Within each run of `per_group` rows, a NULL between two values becomes the straight line
/// between them; NULLs before the first or after the last value stay NULL.
fn interpolate(column: &ArrayRef, per_group: usize) -> Result<ArrayRef> {
    let data_type = column.data_type().clone();
    if !data_type.is_numeric() {
        return plan_err!("interpolate() needs numbers, not {data_type}");
    }
    let floats = cast(column, &DataType::Float64)?;
    let floats = floats.as_primitive::<Float64Type>();
    let mut out: Vec<Option<f64>> = floats.iter().collect();
    for start in (0..out.len()).step_by(per_group.max(1)) {
        let end = (start + per_group).min(out.len());
        let mut prev: Option<usize> = None;
        for row in start..end {
            if out[row].is_none() {
                continue;
            }
            if let Some(p) = prev
                && row > p + 1
            {
                let (a, b) = (out[p].unwrap_or_default(), out[row].unwrap_or_default());
                for (k, slot) in out.iter_mut().enumerate().take(row).skip(p + 1) {
                    *slot = Some(a + (b - a) * (k - p) as f64 / (row - p) as f64);
                }
            }
            prev = Some(row);
        }
    }
    let filled: ArrayRef = Arc::new(arrow::array::Float64Array::from(out));
    Ok(cast(&filled, &data_type)?)
}
