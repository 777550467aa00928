//! Aggregates folded in the scan.
//!
//! The commonest query over metrics is an aggregate per series and time bucket: the average
//! CPU per host per hour, the maximum per minute of one host. DataFusion alone would turn every
//! row's tags into strings, filter the rows again and hash each row into its group. But a
//! segment's rows are sorted by series and then time, so the rows of one series' bucket lie
//! next to each other, and the scan can fold them as they come out of the file.
//!
//! [`AggregatePushdown`] rewrites
//!
//! ```text
//! Aggregate: group by [date_bin(stride, time[, origin]) or date_trunc(unit, time)], tags…;
//!            count/sum/min/max/avg(field)…
//!   filters the engine applies exactly (time ranges, tag predicates), pure column projections
//!     TableScan of a measurement
//! ```
//!
//! into
//!
//! ```text
//! Projection: the same names and types
//!   Aggregate: group by bucket, tags; merge the partial states (sum of counts, min of mins, …)
//!     TableScan of the partial states: ForestallScanExec folding each run of one series and
//!     bucket into one row
//! ```
//!
//! One series' bucket can arrive in several runs (two segments, the buffer, a batch boundary);
//! the aggregate above merges them, so the answer does not depend on how the rows were stored.
//! Anything else (`DISTINCT`, `FILTER (WHERE …)`, other functions or arguments, a filter on a
//! field) keeps DataFusion's own plan.

use std::cmp::Ordering;
use std::fmt;
use std::ops::Range;
use std::sync::Arc;

use arrow::array::{
    Array, ArrayRef, ArrowPrimitiveType, AsArray, Float64Array, Int64Array, PrimitiveArray,
    RecordBatch, RecordBatchOptions, StringViewArray, TimestampNanosecondArray,
};
use arrow::datatypes::{
    DataType, Field, Float64Type, Int32Type, Int64Type, Schema, SchemaRef, TimestampNanosecondType,
    UInt32Type, UInt64Type,
};
use async_trait::async_trait;
use datafusion::catalog::{Session, TableProvider};
use datafusion::common::tree_node::Transformed;
use datafusion::common::{Column, DataFusionError, Result as DfResult, ScalarValue};
use datafusion::datasource::{TableType, provider_as_source, source_as_provider};
use datafusion::functions::expr_fn::coalesce;
use datafusion::functions_aggregate::expr_fn::{max, min, sum};
use datafusion::logical_expr::expr::{AggregateFunction, ScalarFunction};
use datafusion::logical_expr::utils::split_conjunction;
use datafusion::logical_expr::{
    Aggregate, Expr, LogicalPlan, LogicalPlanBuilder, TableScan, cast, lit,
};
use datafusion::optimizer::{ApplyOrder, OptimizerConfig, OptimizerRule};
use datafusion::physical_plan::ExecutionPlan;
use forestall_engine::catalog::{ColumnKind, SERIES_ID_COLUMN, TIME_COLUMN};
use forestall_engine::{FieldType, ScanRequest, Store};

use crate::gapfill::stride_nanos;
use crate::provider::{MeasurementTable, Output, ScanExec};

/// Rows of partial states per batch.
const BATCH_ROWS: usize = 8192;

/// The optimizer rule; see the module docs.
#[derive(Debug, Default)]
pub struct AggregatePushdown;

impl OptimizerRule for AggregatePushdown {
    fn name(&self) -> &str {
        "forestall_aggregate_pushdown"
    }

    fn apply_order(&self) -> Option<ApplyOrder> {
        Some(ApplyOrder::BottomUp)
    }

    fn rewrite(
        &self,
        plan: LogicalPlan,
        _config: &dyn OptimizerConfig,
    ) -> DfResult<Transformed<LogicalPlan>> {
        let LogicalPlan::Aggregate(aggregate) = &plan else {
            return Ok(Transformed::no(plan));
        };
        match rewrite(aggregate)? {
            Some(new) => Ok(Transformed::yes(new)),
            None => Ok(Transformed::no(plan)),
        }
    }
}

/// An aggregate function the scan can fold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Count,
    Sum,
    Min,
    Max,
    Avg,
}

/// How a field's values are folded: as `f64` (float fields, and integers cast to float) or
/// as `i64` (the sum, min and max of an integer field, which SQL answers as integers).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    F64,
    I64,
}

/// One aggregate of the query.
#[derive(Debug, Clone, PartialEq, Eq)]
struct PartialAgg {
    kind: Kind,
    /// The field read; `None` counts rows (`count(*)`).
    field: Option<usize>,
    mode: Mode,
}

/// A column of partial states.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stat {
    Count,
    Sum,
    Min,
    Max,
}

/// What the scan folds: a time bucket, the tags grouped by and the aggregates.
#[derive(Debug)]
pub(crate) struct PartialSpec {
    /// `(stride, origin)` in nanoseconds.
    bucket: Option<(i64, i64)>,
    tags: Vec<String>,
    /// The fields the aggregates read, in the order the scan returns them.
    fields: Vec<String>,
    aggs: Vec<PartialAgg>,
    /// The partial-state columns after the bucket and the tags: (aggregate, statistic).
    stats: Vec<(usize, Stat)>,
    /// Every column the scan returns: the bucket, the tags, then `stats`.
    schema: SchemaRef,
}

impl PartialSpec {
    /// The engine columns to read: series id, time, the tags, the fields.
    fn columns(&self) -> Vec<String> {
        [SERIES_ID_COLUMN, TIME_COLUMN]
            .into_iter()
            .map(String::from)
            .chain(self.tags.iter().cloned())
            .chain(self.fields.iter().cloned())
            .collect()
    }

    /// The half-open bucket `[lo, hi)` holding `t`; the whole timeline without a bucket.
    fn bucket_of(&self, t: i64) -> (i64, i64) {
        let Some((stride, origin)) = self.bucket else {
            return (i64::MIN, i64::MAX);
        };
        // As `date_bin`: origin + ⌊(t − origin) / stride⌋ × stride, in i128 so that no
        // timestamp overflows on the way.
        let (t, stride, origin) = (i128::from(t), i128::from(stride), i128::from(origin));
        let lo = origin + (t - origin).div_euclid(stride) * stride;
        let clamp = |v: i128| v.clamp(i128::from(i64::MIN), i128::from(i64::MAX)) as i64;
        (clamp(lo), clamp(lo + stride))
    }
}

impl fmt::Display for PartialSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some((stride, origin)) = self.bucket {
            write!(f, "bucket={stride}ns")?;
            if origin != 0 {
                write!(f, "+{origin}")?;
            }
            write!(f, ", ")?;
        }
        write!(f, "by=[{}], aggs=[", self.tags.join(", "))?;
        for (i, a) in self.aggs.iter().enumerate() {
            let field = a.field.map_or("*", |k| self.fields[k].as_str());
            let sep = if i == 0 { "" } else { ", " };
            write!(f, "{sep}{:?}({field})", a.kind)?;
        }
        write!(f, "]")
    }
}

/// A scan that folds as it reads: its spec and the columns of it the plan wants.
#[derive(Debug, Clone)]
pub(crate) struct PartialScan {
    pub(crate) spec: Arc<PartialSpec>,
    projection: Option<Vec<usize>>,
}

impl PartialScan {
    /// The folding state of one partition.
    pub(crate) fn start(&self) -> Folder {
        Folder {
            spec: Arc::clone(&self.spec),
            projection: self.projection.clone(),
            run: None,
            out: Out::new(&self.spec),
        }
    }
}

/// Running totals of one aggregate over one run. Starting values and comparisons are
/// DataFusion's, so that a run's min and max are what DataFusion would have found.
#[derive(Debug, Clone, Copy)]
struct Acc {
    /// Non-null values (rows, for `count(*)`).
    count: i64,
    sum_f: f64,
    sum_i: i64,
    min_f: f64,
    max_f: f64,
    min_i: i64,
    max_i: i64,
}

impl Acc {
    const START: Acc = Acc {
        count: 0,
        sum_f: 0.0,
        sum_i: 0,
        min_f: f64::MAX,
        max_f: f64::MIN,
        min_i: i64::MAX,
        max_i: i64::MIN,
    };
}

/// The rows of one series in one bucket, so far.
#[derive(Debug, Clone)]
struct Run {
    series: u32,
    lo: i64,
    hi: i64,
    tags: Vec<Option<String>>,
    accs: Vec<Acc>,
}

/// Partial states waiting to be sent, column by column.
#[derive(Debug, Clone)]
struct Out {
    bucket: Vec<i64>,
    tags: Vec<Vec<Option<String>>>,
    /// One per `spec.stats`.
    stats: Vec<StatColumn>,
}

/// A column of partial states: counts, or float or integer values (null where the run had
/// no value).
#[derive(Debug, Clone)]
enum StatColumn {
    Count(Vec<i64>),
    F64(Vec<Option<f64>>),
    I64(Vec<Option<i64>>),
}

impl Out {
    fn new(spec: &PartialSpec) -> Self {
        let stats = spec
            .stats
            .iter()
            .map(|(k, stat)| match (stat, spec.aggs[*k].mode) {
                (Stat::Count, _) => StatColumn::Count(Vec::new()),
                (_, Mode::F64) => StatColumn::F64(Vec::new()),
                (_, Mode::I64) => StatColumn::I64(Vec::new()),
            })
            .collect();
        Self {
            bucket: Vec::new(),
            tags: vec![Vec::new(); spec.tags.len()],
            stats,
        }
    }

    fn len(&self) -> usize {
        self.bucket.len()
    }

    fn push(&mut self, spec: &PartialSpec, run: Run) {
        self.bucket.push(run.lo);
        for (col, tag) in self.tags.iter_mut().zip(run.tags) {
            col.push(tag);
        }
        for (col, (k, stat)) in self.stats.iter_mut().zip(&spec.stats) {
            let a = &run.accs[*k];
            let some = a.count > 0;
            match col {
                StatColumn::Count(v) => v.push(a.count),
                StatColumn::F64(v) => v.push(some.then_some(match stat {
                    Stat::Min => a.min_f,
                    Stat::Max => a.max_f,
                    _ => a.sum_f,
                })),
                StatColumn::I64(v) => v.push(some.then_some(match stat {
                    Stat::Min => a.min_i,
                    Stat::Max => a.max_i,
                    _ => a.sum_i,
                })),
            }
        }
    }

    /// The waiting rows as a batch of `spec.schema`, projected; empties the buffers.
    fn take(&mut self, spec: &PartialSpec, projection: Option<&[usize]>) -> DfResult<RecordBatch> {
        let bucket = std::mem::take(&mut self.bucket);
        let mut columns: Vec<ArrayRef> = Vec::with_capacity(spec.schema.fields().len());
        if spec.bucket.is_some() {
            columns.push(Arc::new(TimestampNanosecondArray::from(bucket)));
        }
        for col in &mut self.tags {
            let values = std::mem::take(col);
            columns.push(Arc::new(StringViewArray::from_iter(
                values.iter().map(|v| v.as_deref()),
            )));
        }
        for col in &mut self.stats {
            columns.push(match col {
                StatColumn::Count(v) => Arc::new(Int64Array::from(std::mem::take(v))),
                StatColumn::F64(v) => Arc::new(Float64Array::from(std::mem::take(v))),
                StatColumn::I64(v) => Arc::new(Int64Array::from(std::mem::take(v))),
            });
        }
        let batch = RecordBatch::try_new(Arc::clone(&spec.schema), columns)?;
        // `project` keeps the row count, so an empty projection still says how many rows.
        Ok(match projection {
            None => batch,
            Some(p) => batch.project(p)?,
        })
    }
}

/// One partition's folding: rows in, partial states out.
#[derive(Debug, Clone)]
pub(crate) struct Folder {
    spec: Arc<PartialSpec>,
    projection: Option<Vec<usize>>,
    run: Option<Run>,
    out: Out,
}

impl Folder {
    /// Folds a batch of the scan (`spec.columns()`); returns the batches of partial states
    /// that filled up.
    pub(crate) fn push(&mut self, batch: &RecordBatch) -> DfResult<Vec<RecordBatch>> {
        let Folder {
            spec,
            projection,
            run,
            out,
        } = self;
        let bad = |what: &str| DataFusionError::Internal(format!("aggregate scan: {what}"));
        let series = batch
            .column(0)
            .as_primitive_opt::<UInt32Type>()
            .ok_or_else(|| bad("series id column"))?
            .values();
        let times = batch
            .column(1)
            .as_primitive_opt::<TimestampNanosecondType>()
            .ok_or_else(|| bad("time column"))?
            .values();
        let tags = &batch.columns()[2..2 + spec.tags.len()];
        let fields = &batch.columns()[2 + spec.tags.len()..];
        if fields.len() != spec.fields.len() {
            return Err(bad("field columns"));
        }
        let mut ready = Vec::new();
        let n = batch.num_rows();
        let mut i = 0;
        while i < n {
            let (s, t) = (series[i], times[i]);
            if !run
                .as_ref()
                .is_some_and(|r| r.series == s && r.lo <= t && t < r.hi)
            {
                if let Some(done) = run.take() {
                    out.push(spec, done);
                    if out.len() >= BATCH_ROWS {
                        ready.push(out.take(spec, projection.as_deref())?);
                    }
                }
                let (lo, hi) = spec.bucket_of(t);
                *run = Some(Run {
                    series: s,
                    lo,
                    hi,
                    tags: tags.iter().map(|c| tag_at(c, i)).collect(),
                    accs: vec![Acc::START; spec.aggs.len()],
                });
            }
            let Some(current) = run.as_mut() else {
                return Err(bad("no run"));
            };
            let mut j = i + 1;
            while j < n && series[j] == s && current.lo <= times[j] && times[j] < current.hi {
                j += 1;
            }
            for (acc, agg) in current.accs.iter_mut().zip(&spec.aggs) {
                fold(acc, agg, agg.field.map(|k| &fields[k]), i..j)?;
            }
            i = j;
        }
        Ok(ready)
    }

    /// The last partial states, once the scan is done.
    pub(crate) fn finish(mut self) -> DfResult<Vec<RecordBatch>> {
        if let Some(done) = self.run.take() {
            self.out.push(&self.spec, done);
        }
        if self.out.len() == 0 {
            return Ok(Vec::new());
        }
        Ok(vec![self.out.take(&self.spec, self.projection.as_deref())?])
    }
}

/// Scans that fold the same rows by the same bucket and tags (continuous queries rolling up
/// one window), folded as one: a [`Folder`] of every member's aggregates, each distinct one
/// once, whose partial states are cut into each member's columns. A run of one series and
/// bucket is found, and its tags copied, once for all the members, not once per member.
#[derive(Debug, Clone)]
pub(crate) struct FoldTogether {
    folder: Folder,
    /// For each member: its output schema, and where its columns are in the folder's.
    members: Vec<(SchemaRef, Vec<usize>)>,
}

impl FoldTogether {
    /// `scans` grouped into folds, each with the indices of its members in `scans`: those
    /// with the same bucket and tags fold together.
    pub(crate) fn group(scans: &[&PartialScan]) -> Vec<(FoldTogether, Vec<usize>)> {
        let mut groups: Vec<Vec<usize>> = Vec::new();
        for (i, scan) in scans.iter().enumerate() {
            let alike = |g: &Vec<usize>| {
                let first = &scans[g[0]].spec;
                first.bucket == scan.spec.bucket && first.tags == scan.spec.tags
            };
            match groups.iter_mut().find(|g| alike(g)) {
                Some(g) => g.push(i),
                None => groups.push(vec![i]),
            }
        }
        groups
            .into_iter()
            .map(|g| {
                let members: Vec<&PartialScan> = g.iter().map(|&i| scans[i]).collect();
                (Self::new(&members), g)
            })
            .collect()
    }

    fn new(scans: &[&PartialScan]) -> Self {
        let first = &scans[0].spec;
        // The bucket and the tags lead every member's columns alike.
        let lead = usize::from(first.bucket.is_some()) + first.tags.len();
        let mut fields: Vec<String> = Vec::new();
        let mut aggs: Vec<PartialAgg> = Vec::new();
        let mut stats: Vec<(usize, Stat)> = Vec::new();
        let mut schema_fields: Vec<Field> = first.schema.fields()[..lead]
            .iter()
            .map(|f| f.as_ref().clone())
            .collect();
        let mut members = Vec::with_capacity(scans.len());
        for scan in scans {
            let spec = &scan.spec;
            let agg_at: Vec<usize> = spec
                .aggs
                .iter()
                .map(|a| {
                    let field = a
                        .field
                        .map(|k| position_or_push(&mut fields, spec.fields[k].clone()));
                    position_or_push(&mut aggs, PartialAgg { field, ..a.clone() })
                })
                .collect();
            let mut at: Vec<usize> = (0..lead).collect();
            for (i, (k, stat)) in spec.stats.iter().enumerate() {
                let key = (agg_at[*k], *stat);
                let n = stats.len();
                let s = position_or_push(&mut stats, key);
                if s == n {
                    let own = spec.schema.field(lead + i);
                    schema_fields.push(Field::new(
                        stat_name(key.0, key.1),
                        own.data_type().clone(),
                        own.is_nullable(),
                    ));
                }
                at.push(lead + s);
            }
            members.push(match &scan.projection {
                Some(p) => (
                    Arc::new(spec.schema.project(p).unwrap_or_else(|_| Schema::empty())),
                    p.iter().filter_map(|&c| at.get(c).copied()).collect(),
                ),
                None => (Arc::clone(&spec.schema), at),
            });
        }
        let spec = Arc::new(PartialSpec {
            bucket: first.bucket,
            tags: first.tags.clone(),
            fields,
            aggs,
            stats,
            schema: Arc::new(Schema::new(schema_fields)),
        });
        Self {
            folder: PartialScan {
                spec,
                projection: None,
            }
            .start(),
            members,
        }
    }

    /// The engine columns the fold reads, in the order [`FoldTogether::push`] takes them.
    pub(crate) fn columns(&self) -> Vec<String> {
        self.folder.spec.columns()
    }

    /// Folds a batch of [`FoldTogether::columns`]; appends to `out[m]` the batches of
    /// member `m`'s partial states that filled up.
    pub(crate) fn push(
        &mut self,
        batch: &RecordBatch,
        out: &mut [Vec<RecordBatch>],
    ) -> DfResult<()> {
        let ready = self.folder.push(batch)?;
        cut(&self.members, ready, out)
    }

    /// Appends the last partial states, once the read is done.
    pub(crate) fn finish(self, out: &mut [Vec<RecordBatch>]) -> DfResult<()> {
        let last = self.folder.finish()?;
        cut(&self.members, last, out)
    }
}

/// Cuts `ready` (batches of a [`FoldTogether`]'s folder) into each member's columns.
fn cut(
    members: &[(SchemaRef, Vec<usize>)],
    ready: Vec<RecordBatch>,
    out: &mut [Vec<RecordBatch>],
) -> DfResult<()> {
    for batch in ready {
        let rows = RecordBatchOptions::new().with_row_count(Some(batch.num_rows()));
        for ((schema, at), out) in members.iter().zip(out.iter_mut()) {
            let columns = at.iter().map(|&c| Arc::clone(batch.column(c))).collect();
            out.push(RecordBatch::try_new_with_options(
                Arc::clone(schema),
                columns,
                &rows,
            )?);
        }
    }
    Ok(())
}

/// Where `item` is in `items`, pushed at the end if it was not there.
pub(crate) fn position_or_push<T: PartialEq>(items: &mut Vec<T>, item: T) -> usize {
    match items.iter().position(|x| *x == item) {
        Some(i) => i,
        None => {
            items.push(item);
            items.len() - 1
        }
    }
}

/// A tag's value at row `i` (tags come from the engine dictionary-encoded).
fn tag_at(column: &ArrayRef, i: usize) -> Option<String> {
    if column.is_null(i) {
        return None;
    }
    let (values, i) = match column.as_dictionary_opt::<Int32Type>() {
        Some(d) => (d.values(), usize::try_from(d.keys().value(i)).ok()?),
        None => (column, i),
    };
    if values.is_null(i) {
        return None;
    }
    match values.data_type() {
        DataType::Utf8 => Some(values.as_string::<i32>().value(i).to_string()),
        DataType::LargeUtf8 => Some(values.as_string::<i64>().value(i).to_string()),
        DataType::Utf8View => Some(values.as_string_view().value(i).to_string()),
        _ => None,
    }
}

/// Folds rows `range` of `values` (`None`: count rows) into `acc`.
fn fold(
    acc: &mut Acc,
    agg: &PartialAgg,
    values: Option<&ArrayRef>,
    range: Range<usize>,
) -> DfResult<()> {
    let Some(values) = values else {
        acc.count += range.len() as i64;
        return Ok(());
    };
    let nulls = values
        .nulls()
        .map_or(0, |n| n.slice(range.start, range.len()).null_count());
    let valid = range.len() - nulls;
    acc.count += valid as i64;
    if agg.kind == Kind::Count || valid == 0 {
        return Ok(());
    }
    match (agg.mode, values.data_type()) {
        (Mode::F64, DataType::Float64) => fold_f64(
            acc,
            agg.kind,
            values.as_primitive::<Float64Type>(),
            range,
            |v| v,
        ),
        (Mode::F64, DataType::Int64) => fold_f64(
            acc,
            agg.kind,
            values.as_primitive::<Int64Type>(),
            range,
            |v| v as f64,
        ),
        (Mode::F64, DataType::UInt64) => fold_f64(
            acc,
            agg.kind,
            values.as_primitive::<UInt64Type>(),
            range,
            |v| v as f64,
        ),
        (Mode::I64, DataType::Int64) => {
            let a = values.as_primitive::<Int64Type>();
            match agg.kind {
                Kind::Sum => each(a, range, |v| acc.sum_i = acc.sum_i.wrapping_add(v)),
                Kind::Min => each(a, range, |v| acc.min_i = acc.min_i.min(v)),
                Kind::Max => each(a, range, |v| acc.max_i = acc.max_i.max(v)),
                Kind::Count | Kind::Avg => {}
            }
        }
        (mode, t) => {
            return Err(DataFusionError::Internal(format!(
                "aggregate scan: cannot fold {t} as {mode:?}"
            )));
        }
    }
    Ok(())
}

fn fold_f64<T: ArrowPrimitiveType>(
    acc: &mut Acc,
    kind: Kind,
    a: &PrimitiveArray<T>,
    range: Range<usize>,
    to_f64: impl Fn(T::Native) -> f64,
) {
    match kind {
        Kind::Sum | Kind::Avg => each(a, range, |v| acc.sum_f += to_f64(v)),
        // DataFusion's rule: the new value replaces the current one if it is less (greater)
        // or they do not compare, so a NaN replaces and is replaced.
        Kind::Min => each(a, range, |v| {
            let v = to_f64(v);
            if matches!(v.partial_cmp(&acc.min_f), Some(Ordering::Less) | None) {
                acc.min_f = v;
            }
        }),
        Kind::Max => each(a, range, |v| {
            let v = to_f64(v);
            if matches!(v.partial_cmp(&acc.max_f), Some(Ordering::Greater) | None) {
                acc.max_f = v;
            }
        }),
        Kind::Count => {}
    }
}

/// Calls `f` with each non-null value of rows `range`.
fn each<T: ArrowPrimitiveType>(
    a: &PrimitiveArray<T>,
    range: Range<usize>,
    mut f: impl FnMut(T::Native),
) {
    let values = &a.values()[range.clone()];
    match a.nulls() {
        None => values.iter().for_each(|&v| f(v)),
        Some(nulls) => {
            for (k, &v) in range.zip(values) {
                if nulls.is_valid(k) {
                    f(v)
                }
            }
        }
    }
}

/// The partial states as a table, for the rewritten plan.
#[derive(Debug)]
struct PartialTable {
    store: Arc<Store>,
    req: ScanRequest,
    spec: Arc<PartialSpec>,
}

#[async_trait]
impl TableProvider for PartialTable {
    fn schema(&self) -> SchemaRef {
        Arc::clone(&self.spec.schema)
    }

    fn table_type(&self) -> TableType {
        TableType::Temporary
    }

    async fn scan(
        &self,
        state: &dyn Session,
        projection: Option<&Vec<usize>>,
        _filters: &[Expr],
        _limit: Option<usize>,
    ) -> DfResult<Arc<dyn ExecutionPlan>> {
        let schema = match projection {
            Some(p) => Arc::new(self.spec.schema.project(p)?),
            None => Arc::clone(&self.spec.schema),
        };
        let partial = PartialScan {
            spec: Arc::clone(&self.spec),
            projection: projection.cloned(),
        };
        Ok(ScanExec::plan(
            Arc::clone(&self.store),
            self.req.clone(),
            schema,
            None,
            state.config().target_partitions(),
            Output::Folded(partial),
        ))
    }
}

/// The rewritten plan for `aggregate`, if the scan can fold it.
fn rewrite(aggregate: &Aggregate) -> DfResult<Option<LogicalPlan>> {
    // Down to the scan, through column-only projections and filters.
    let mut node = aggregate.input.as_ref();
    let mut filters: Vec<&Expr> = Vec::new();
    let scan: &TableScan = loop {
        match node {
            LogicalPlan::Projection(p) if p.expr.iter().all(|e| matches!(e, Expr::Column(_))) => {
                node = &p.input
            }
            LogicalPlan::Filter(f) => {
                filters.extend(split_conjunction(&f.predicate));
                node = &f.input;
            }
            LogicalPlan::TableScan(s) => break s,
            _ => return Ok(None),
        }
    };
    if scan.fetch.is_some() {
        return Ok(None);
    }
    let Ok(provider) = source_as_provider(&scan.source) else {
        return Ok(None);
    };
    let Some(table) = provider.downcast_ref::<MeasurementTable>() else {
        return Ok(None);
    };
    // The scan's filters were pushed down from the filters above it: each once.
    for f in &scan.filters {
        if !filters.contains(&f) {
            filters.push(f);
        }
    }
    if !filters.iter().all(|f| table.applies_exactly(f)) {
        return Ok(None);
    }
    let columns = &table.table_schema().columns;
    let column = |e: &Expr| match e {
        Expr::Column(c) => Some(c.name.clone()),
        _ => None,
    };

    // Groups: at most one time bucket, and tags.
    let mut bucket = None;
    let mut tags = Vec::new();
    let mut group_is_bucket = Vec::new();
    for g in &aggregate.group_expr {
        let g = match g {
            Expr::Alias(a) => a.expr.as_ref(),
            g => g,
        };
        if let Some(name) = column(g)
            && columns.get(&name) == Some(&ColumnKind::Tag)
        {
            group_is_bucket.push(false);
            tags.push(name);
            continue;
        }
        match date_bin(g) {
            Some(b) if bucket.is_none() => {
                bucket = Some(b);
                group_is_bucket.push(true);
            }
            _ => return Ok(None),
        }
    }

    // Aggregates: count, sum, min, max and avg of a field.
    let mut fields: Vec<String> = Vec::new();
    let mut aggs = Vec::new();
    for (i, e) in aggregate.aggr_expr.iter().enumerate() {
        let e = match e {
            Expr::Alias(a) => a.expr.as_ref(),
            e => e,
        };
        let Expr::AggregateFunction(AggregateFunction { func, params }) = e else {
            return Ok(None);
        };
        if params.distinct
            || params.filter.is_some()
            || !params.order_by.is_empty()
            || params.null_treatment.is_some()
            || params.args.len() != 1
        {
            return Ok(None);
        }
        let kind = match func.name() {
            "count" => Kind::Count,
            "sum" => Kind::Sum,
            "min" => Kind::Min,
            "max" => Kind::Max,
            "avg" => Kind::Avg,
            _ => return Ok(None),
        };
        // The argument: a field, possibly cast to float, or (for count) a constant or time.
        let arg = &params.args[0];
        let (name, to_float) = match arg {
            Expr::Cast(c) if c.field.data_type() == &DataType::Float64 => (column(&c.expr), true),
            e => (column(e), false),
        };
        let field_type = name.as_ref().and_then(|n| match columns.get(n) {
            Some(ColumnKind::Field(t)) => Some(*t),
            _ => None,
        });
        let counts_rows = kind == Kind::Count
            && (matches!(arg, Expr::Literal(v, _) if !v.is_null())
                || name.as_deref() == Some(TIME_COLUMN));
        let (field, mode) = match (field_type, to_float) {
            _ if counts_rows => (None, Mode::F64),
            (Some(_), _) if kind == Kind::Count => (name, Mode::F64),
            (Some(FieldType::Float), _) => (name, Mode::F64),
            (Some(FieldType::Integer | FieldType::UInteger), true) => (name, Mode::F64),
            (Some(FieldType::Integer), false) if kind != Kind::Avg => (name, Mode::I64),
            _ => return Ok(None),
        };
        // What DataFusion would answer must be what the merge answers.
        let expected = match (kind, mode) {
            (Kind::Count, _) => DataType::Int64,
            (Kind::Avg, _) | (_, Mode::F64) => DataType::Float64,
            (_, Mode::I64) => DataType::Int64,
        };
        let n = aggregate.group_expr.len() + i;
        if aggregate.schema.field(n).data_type() != &expected {
            return Ok(None);
        }
        let field = field.map(|f| position_or_push(&mut fields, f));
        aggs.push(PartialAgg { kind, field, mode });
    }

    // The partial-state columns, named so that no tag can collide with them.
    let time_type = DataType::Timestamp(arrow::datatypes::TimeUnit::Nanosecond, None);
    for (i, is_bucket) in group_is_bucket.iter().enumerate() {
        let want = if *is_bucket {
            &time_type
        } else {
            &DataType::Utf8View
        };
        if aggregate.schema.field(i).data_type() != want {
            return Ok(None);
        }
    }
    let mut schema_fields = Vec::new();
    let bucket_name = "__bucket";
    if bucket.is_some() {
        schema_fields.push(Field::new(bucket_name, time_type, false));
    }
    for t in &tags {
        if t.starts_with("__") {
            return Ok(None);
        }
        schema_fields.push(Field::new(t, DataType::Utf8View, true));
    }
    let mut stats = Vec::new();
    for (k, a) in aggs.iter().enumerate() {
        let kinds: &[Stat] = match a.kind {
            Kind::Count => &[Stat::Count],
            Kind::Sum => &[Stat::Sum],
            Kind::Min => &[Stat::Min],
            Kind::Max => &[Stat::Max],
            Kind::Avg => &[Stat::Sum, Stat::Count],
        };
        for &stat in kinds {
            let (t, nullable) = match (stat, a.mode) {
                (Stat::Count, _) => (DataType::Int64, false),
                (_, Mode::F64) => (DataType::Float64, true),
                (_, Mode::I64) => (DataType::Int64, true),
            };
            schema_fields.push(Field::new(stat_name(k, stat), t, nullable));
            stats.push((k, stat));
        }
    }
    let spec = Arc::new(PartialSpec {
        bucket,
        tags,
        fields,
        aggs,
        stats,
        schema: Arc::new(Schema::new(schema_fields)),
    });
    let req = table.request(filters.into_iter(), spec.columns());
    let source = provider_as_source(Arc::new(PartialTable {
        store: Arc::clone(table.store()),
        req,
        spec: Arc::clone(&spec),
    }));

    // Merge the partial states per group, then give every output its old name and type.
    let qualifier = scan.table_name.clone();
    let state = |name: &str| Expr::Column(Column::new(Some(qualifier.clone()), name));
    let mut group = Vec::new();
    if spec.bucket.is_some() {
        group.push(state(bucket_name));
    }
    group.extend(spec.tags.iter().map(|t| state(t)));
    let mut merges = Vec::new();
    for (k, stat) in &spec.stats {
        let column = state(&stat_name(*k, *stat));
        let merged = match stat {
            Stat::Count | Stat::Sum => sum(column),
            Stat::Min => min(column),
            Stat::Max => max(column),
        };
        merges.push(merged.alias(format!("__merged{}", stat_name(*k, *stat))));
    }
    let merged = |k: usize, stat: Stat| {
        Expr::Column(Column::from_name(format!("__merged{}", stat_name(k, stat))))
    };
    // The groups in their original order: the bucket where it was, the tags in turn.
    let mut tag_columns = spec.tags.iter().map(|t| state(t));
    let mut outputs: Vec<Expr> = group_is_bucket
        .iter()
        .map(|&is_bucket| {
            if is_bucket {
                Some(state(bucket_name))
            } else {
                tag_columns.next()
            }
        })
        .collect::<Option<_>>()
        .ok_or_else(|| DataFusionError::Internal("aggregate pushdown: groups".into()))?;
    for (k, a) in spec.aggs.iter().enumerate() {
        outputs.push(match a.kind {
            Kind::Count => coalesce(vec![merged(k, Stat::Count), lit(0i64)]),
            Kind::Sum => merged(k, Stat::Sum),
            Kind::Min => merged(k, Stat::Min),
            Kind::Max => merged(k, Stat::Max),
            Kind::Avg => merged(k, Stat::Sum) / cast(merged(k, Stat::Count), DataType::Float64),
        });
    }
    let outputs: Vec<Expr> = outputs
        .into_iter()
        .enumerate()
        .map(|(i, e)| {
            let (q, f) = aggregate.schema.qualified_field(i);
            e.alias_qualified(q.cloned(), f.name())
        })
        .collect();
    let plan = LogicalPlanBuilder::scan(qualifier.clone(), source, None)?
        .aggregate(group, merges)?
        .project(outputs)?
        .build()?;
    Ok(Some(plan))
}

fn stat_name(k: usize, stat: Stat) -> String {
    let s = match stat {
        Stat::Count => "count",
        Stat::Sum => "sum",
        Stat::Min => "min",
        Stat::Max => "max",
    };
    format!("__agg{k}_{s}")
}

/// `(stride, origin)` of a time bucket: `date_bin(<interval>, time[, <origin>])` with
/// constant arguments, or `date_trunc(<unit>, time)` for units of fixed length (up to a
/// week, whose buckets start on Mondays).
fn date_bin(e: &Expr) -> Option<(i64, i64)> {
    let Expr::ScalarFunction(ScalarFunction { func, args }) = e else {
        return None;
    };
    if func.name() == "date_trunc" {
        let [Expr::Literal(unit, _), Expr::Column(c)] = args.as_slice() else {
            return None;
        };
        const DAY: i64 = 86_400_000_000_000;
        let bucket = match crate::provider::scalar_string(unit)?
            .to_lowercase()
            .as_str()
        {
            "microsecond" => (1_000, 0),
            "millisecond" => (1_000_000, 0),
            "second" => (1_000_000_000, 0),
            "minute" => (60_000_000_000, 0),
            "hour" => (3_600_000_000_000, 0),
            "day" => (DAY, 0),
            // 1970-01-05 was a Monday.
            "week" => (7 * DAY, 4 * DAY),
            _ => return None,
        };
        return (c.name == TIME_COLUMN).then_some(bucket);
    }
    if func.name() != "date_bin" {
        return None;
    }
    let stride = match args.first()? {
        Expr::Literal(v, _) => stride_nanos(v).ok()?,
        _ => return None,
    };
    match args.get(1)? {
        Expr::Column(c) if c.name == TIME_COLUMN => {}
        _ => return None,
    }
    let origin = match args.get(2) {
        None => 0,
        Some(Expr::Literal(ScalarValue::TimestampNanosecond(Some(o), None), _)) => *o,
        Some(_) => return None,
    };
    (args.len() <= 3).then_some((stride, origin))
}
