//! Tables over the engine: one [`MeasurementTable`] per measurement, found through
//! [`StoreSchema`].
//!
//! Pushdown. Filters DataFusion hands to the scan are translated where possible into the
//! engine's [`ScanRequest`]:
//! * on `time`: `=`, `<`, `<=`, `>`, `>=` and `BETWEEN` against timestamp literals (after
//!   DataFusion's simplification, `now() - INTERVAL '1 hour'` is such a literal);
//! * on tags: `=`, `!=`, `IN`, `NOT IN`, `LIKE`, `NOT LIKE`, regex `~` and `!~`, `IS NOT NULL`,
//!   and `OR`s of those.
//!
//! Every translated filter is reported as *inexact*: DataFusion still applies it to the rows
//! that come back, so the translation only has to be a superset, never exact. The engine
//! uses the time range and the tag bitmap to skip whole segments and row groups.
//!
//! Filters on fields (any expression over fields and `time` alone, such as
//! `usage_user > 90`) are not the engine's to prune by, but the scan applies them to each
//! batch as it is read, before the batch's tags are turned into strings and sent on: a query
//! that keeps one row in ten pays for one row in ten past the read. They are inexact too.

use std::sync::{Arc, Mutex};

use arrow::array::{AsArray, BooleanArray};
use arrow::datatypes::{DataType, SchemaRef};
use arrow::record_batch::RecordBatch;
use async_trait::async_trait;
use datafusion::catalog::{
    SchemaProvider, Session, TableFunctionArgs, TableFunctionImpl, TableProvider,
};
use datafusion::common::tree_node::{Transformed, TreeNode, TreeNodeRecursion};
use datafusion::common::{Column, DFSchema, DataFusionError, Result as DfResult, ScalarValue};
use datafusion::datasource::MemTable;
use datafusion::datasource::TableType;
use datafusion::execution::{SendableRecordBatchStream, TaskContext};
use datafusion::logical_expr::utils::conjunction;
use datafusion::logical_expr::{
    Between, BinaryExpr, Expr, Like, Operator, TableProviderFilterPushDown,
};
use datafusion::physical_expr::{EquivalenceProperties, PhysicalExpr};
use datafusion::physical_plan::empty::EmptyExec;
use datafusion::physical_plan::execution_plan::{Boundedness, EmissionType};
use datafusion::physical_plan::metrics::{
    BaselineMetrics, ExecutionPlanMetricsSet, MetricBuilder, MetricsSet,
};
use datafusion::physical_plan::stream::RecordBatchStreamAdapter;
use datafusion::physical_plan::{
    DisplayAs, DisplayFormatType, ExecutionPlan, Partitioning, PlanProperties,
};
use forestall_engine::catalog::{ColumnKind, TIME_COLUMN};
use forestall_engine::{RowFilter, ScanRequest, ScanStream, Store, TableSchema, TagPredicate};
use futures::StreamExt;
use regex::Regex;

use crate::pushdown::{FoldTogether, PartialScan, position_or_push};

/// Every measurement of a store, as tables.
#[derive(Debug)]
pub struct StoreSchema {
    store: Arc<Store>,
}

impl StoreSchema {
    pub fn new(store: Arc<Store>) -> Self {
        Self { store }
    }
}

#[async_trait]
impl SchemaProvider for StoreSchema {
    fn table_names(&self) -> Vec<String> {
        self.store.tables().iter().map(|t| t.name.clone()).collect()
    }

    async fn table(&self, name: &str) -> Result<Option<Arc<dyn TableProvider>>, DataFusionError> {
        Ok(self.store.table(name).map(|schema| {
            Arc::new(MeasurementTable {
                store: Arc::clone(&self.store),
                schema,
            }) as Arc<dyn TableProvider>
        }))
    }

    fn table_exist(&self, name: &str) -> bool {
        self.store.table(name).is_some()
    }
}

/// One measurement as a table: `time`, its tags, its fields.
#[derive(Debug)]
pub struct MeasurementTable {
    store: Arc<Store>,
    schema: Arc<TableSchema>,
}

#[async_trait]
impl TableProvider for MeasurementTable {
    fn schema(&self) -> SchemaRef {
        sql_schema(&self.schema.arrow_schema())
    }

    fn table_type(&self) -> TableType {
        TableType::Base
    }

    fn supports_filters_pushdown(
        &self,
        filters: &[&Expr],
    ) -> Result<Vec<TableProviderFilterPushDown>, DataFusionError> {
        Ok(filters
            .iter()
            .map(|f| {
                if time_bounds(f).is_some()
                    || tag_predicate(f, &self.schema).is_some()
                    || self.on_fields(f)
                {
                    TableProviderFilterPushDown::Inexact
                } else {
                    TableProviderFilterPushDown::Unsupported
                }
            })
            .collect())
    }

    async fn scan(
        &self,
        state: &dyn Session,
        projection: Option<&Vec<usize>>,
        filters: &[Expr],
        limit: Option<usize>,
    ) -> Result<Arc<dyn ExecutionPlan>, DataFusionError> {
        let full = sql_schema(&self.schema.arrow_schema());
        let projected: SchemaRef = match projection {
            Some(idx) => Arc::new(full.project(idx)?),
            None => Arc::clone(&full),
        };
        let columns = projected.fields().iter().map(|f| f.name().clone());
        let mut req = self.request(filters.iter(), columns.collect());
        let on_fields = conjunction(filters.iter().filter(|f| self.on_fields(f)).cloned());
        let filter = on_fields
            .clone()
            .and_then(|e| batch_filter(state, e, &projected));
        // Segment reads apply it too, before they decode the columns it does not read.
        req.filter = on_fields.and_then(|e| row_filter(state, e, &full));
        // A LIMIT reads in order on one partition.
        let partitions = match limit {
            Some(_) => 1,
            None => state.config().target_partitions(),
        };
        Ok(ScanExec::plan(
            Arc::clone(&self.store),
            req,
            projected,
            limit,
            partitions,
            Output::Rows(filter),
        ))
    }
}

/// `filter` as an expression over the batches of `schema` (its columns unqualified), or
/// `None` when it cannot be one here (a placeholder not bound yet): it is then left to the
/// filter above the scan alone.
fn batch_filter(
    state: &dyn Session,
    filter: Expr,
    schema: &SchemaRef,
) -> Option<Arc<dyn PhysicalExpr>> {
    let unqualified = filter
        .transform(|e| match e {
            Expr::Column(c) => Ok(Transformed::yes(Expr::Column(Column::new_unqualified(
                c.name,
            )))),
            e => Ok(Transformed::no(e)),
        })
        .ok()?
        .data;
    let df_schema = DFSchema::try_from(schema.as_ref().clone()).ok()?;
    state.create_physical_expr(unqualified, &df_schema).ok()
}

/// `filter` as an engine [`RowFilter`] over the columns it reads (of `schema`), or `None`
/// when it cannot be one.
fn row_filter(state: &dyn Session, filter: Expr, schema: &SchemaRef) -> Option<RowFilter> {
    let mut columns: Vec<String> = filter
        .column_refs()
        .iter()
        .map(|c| c.name.clone())
        .collect();
    columns.sort_unstable();
    columns.dedup();
    let indices: Option<Vec<usize>> = columns.iter().map(|c| schema.index_of(c).ok()).collect();
    let schema = Arc::new(schema.project(&indices?).ok()?);
    let expr = batch_filter(state, filter, &schema)?;
    let keep = move |batch: &RecordBatch| -> Result<BooleanArray, String> {
        // A segment whose column has another type than the table's is not filtered here
        // (every row passes; the filter above the read still applies).
        let types_match = batch.num_columns() == schema.fields().len()
            && (batch.schema().fields().iter())
                .zip(schema.fields())
                .all(|(a, b)| a.data_type() == b.data_type());
        if !types_match {
            return Ok(BooleanArray::from(vec![true; batch.num_rows()]));
        }
        let mask = expr
            .evaluate(batch)
            .and_then(|v| v.into_array(batch.num_rows()))
            .map_err(|e| e.to_string())?;
        mask.as_boolean_opt()
            .cloned()
            .ok_or_else(|| format!("a filter on fields gave {}", mask.data_type()))
    };
    Some(RowFilter {
        columns,
        keep: Arc::new(keep),
    })
}

impl MeasurementTable {
    pub(crate) fn store(&self) -> &Arc<Store> {
        &self.store
    }

    pub(crate) fn table_schema(&self) -> &Arc<TableSchema> {
        &self.schema
    }

    /// The engine request for `columns` under `filters`: the time range and tag predicate
    /// of those filters it can translate (the others are left to DataFusion).
    pub(crate) fn request<'a>(
        &self,
        filters: impl Iterator<Item = &'a Expr>,
        columns: Vec<String>,
    ) -> ScanRequest {
        let mut req = ScanRequest::all(self.schema.name.clone());
        let mut predicates = Vec::new();
        for f in filters {
            if let Some((lo, hi)) = time_bounds(f) {
                req.start = req.start.max(lo);
                req.end = req.end.min(hi);
            } else if let Some(p) = tag_predicate(f, &self.schema) {
                predicates.push(p);
            }
        }
        req.predicate = match predicates.len() {
            0 => None,
            1 => predicates.pop(),
            _ => Some(TagPredicate::And(predicates)),
        };
        req.projection = Some(columns);
        req
    }

    /// Whether `filter` is over fields (and `time`) alone, so that the scan can apply it to
    /// the rows it reads: at least one field, no tag, nothing volatile, no subquery.
    fn on_fields(&self, filter: &Expr) -> bool {
        let mut field = false;
        let columns_ok = filter.column_refs().iter().all(|c| {
            if c.name == TIME_COLUMN {
                return true;
            }
            let is_field = matches!(self.schema.columns.get(&c.name), Some(ColumnKind::Field(_)));
            field |= is_field;
            is_field
        });
        let plain = !filter
            .exists(|e| {
                Ok(matches!(
                    e,
                    Expr::ScalarSubquery(_)
                        | Expr::Exists(_)
                        | Expr::InSubquery(_)
                        | Expr::OuterReferenceColumn(..)
                        | Expr::AggregateFunction(_)
                        | Expr::WindowFunction(_)
                ))
            })
            .unwrap_or(true);
        field && columns_ok && plain && !filter.is_volatile()
    }

    /// Whether the engine applies `filter` exactly, row by row, so that no row it lets
    /// through fails it: a comparison of the bare `time` column with a timestamp, or a tag
    /// predicate on bare tag columns. (A cast in between could make the translation a
    /// superset, which is all [`TableProvider::scan`] needs but not enough to drop the filter.)
    pub(crate) fn applies_exactly(&self, filter: &Expr) -> bool {
        let cast = filter
            .exists(|e| Ok(matches!(e, Expr::Cast(_) | Expr::TryCast(_))))
            .unwrap_or(true);
        !cast && (time_bounds(filter).is_some() || tag_predicate(filter, &self.schema).is_some())
    }
}

/// The leaf of every query plan over a measurement: the engine's scan, streamed. Batches come
/// from a blocking task through a small channel, so a large result never sits in memory at
/// once, and a consumer that stops early (a `LIMIT`, a client that hung up) stops the scan.
///
/// Its metrics (shown by `EXPLAIN ANALYZE`) say what pruning skipped: segments by the
/// manifest, row groups by statistics, rows by the page index; and `rows_scanned`, the rows
/// that matched (more than `output_rows` when the scan folds an aggregate).
#[derive(Debug)]
pub struct ScanExec {
    store: Arc<Store>,
    req: ScanRequest,
    schema: SchemaRef,
    limit: Option<usize>,
    partitions: usize,
    output: Output,
    /// The engine scan, split once per execution and handed out partition by partition.
    slots: Mutex<Vec<Slot>>,
    props: Arc<PlanProperties>,
    metrics: ExecutionPlanMetricsSet,
}

/// What a [`ScanExec`] returns.
#[derive(Debug)]
pub(crate) enum Output {
    /// The rows it reads, less those that fail the filter on fields, if there is one.
    Rows(Option<Arc<dyn PhysicalExpr>>),
    /// A partial aggregate computed in the scan (see [`crate::pushdown`]): one row per series
    /// and time bucket instead of the rows it read.
    Folded(PartialScan),
}

#[derive(Debug)]
enum Slot {
    Ready(Box<ScanStream>),
    /// The scan split into fewer streams than there are partitions: nothing to read here.
    Empty,
    /// This partition's output, folded already by a read shared with other plans (see
    /// [`SharedRead`]).
    Folded(Vec<RecordBatch>),
    Taken,
}

/// What one partition of an execution reads from.
enum Source {
    Scan(Box<ScanStream>),
    Folded(Vec<RecordBatch>),
}

impl ScanExec {
    /// The plan reading `req` as `schema` on `partitions` threads, or an empty plan when the
    /// time range is empty (contradictory filters: nothing can match).
    pub(crate) fn plan(
        store: Arc<Store>,
        req: ScanRequest,
        schema: SchemaRef,
        limit: Option<usize>,
        partitions: usize,
        output: Output,
    ) -> Arc<dyn ExecutionPlan> {
        if req.start >= req.end {
            return Arc::new(EmptyExec::new(schema));
        }
        let partitions = partitions.max(1);
        let props = PlanProperties::new(
            EquivalenceProperties::new(Arc::clone(&schema)),
            Partitioning::UnknownPartitioning(partitions),
            EmissionType::Incremental,
            Boundedness::Bounded,
        );
        Arc::new(Self {
            store,
            req,
            schema,
            limit,
            partitions,
            output,
            slots: Mutex::new(Vec::new()),
            props: Arc::new(props),
            metrics: ExecutionPlanMetricsSet::new(),
        })
    }

    /// This partition's part of the scan; the first partition of an execution to ask (or a
    /// partition asking again, in a new execution) starts the scan.
    fn take(&self, partition: usize) -> DfResult<Option<Source>> {
        let mut slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        if !matches!(
            slots.get(partition),
            Some(Slot::Ready(_) | Slot::Empty | Slot::Folded(_))
        ) {
            let scan = self
                .store
                .scan(&self.req)
                .map_err(|e| DataFusionError::External(Box::new(e)))?;
            let mut fresh: Vec<Slot> = scan
                .split(self.partitions)
                .into_iter()
                .map(|s| Slot::Ready(Box::new(s)))
                .collect();
            fresh.resize_with(self.partitions, || Slot::Empty);
            *slots = fresh;
        }
        Ok(
            match std::mem::replace(&mut slots[partition], Slot::Taken) {
                Slot::Ready(s) => Some(Source::Scan(s)),
                Slot::Folded(batches) => Some(Source::Folded(batches)),
                _ => None,
            },
        )
    }

    /// What identifies the rows this scan reads and folds, when it folds them (an aggregate
    /// pushed into the scan) with nothing else to apply: plans whose scans have the same key
    /// read the same rows, and one [`SharedRead`] can serve them all.
    pub(crate) fn share_key(&self) -> Option<String> {
        let Output::Folded(_) = &self.output else {
            return None;
        };
        if self.req.filter.is_some() || self.limit.is_some() {
            return None;
        }
        Some(format!(
            "{}\u{0}{}\u{0}{}\u{0}{:?}\u{0}{}",
            self.req.measurement, self.req.start, self.req.end, self.req.predicate, self.partitions
        ))
    }
}

/// One read of a measurement that feeds the folding scans of several plans (continuous
/// queries rolling up the same window): the union of their columns is read and decoded once,
/// and each batch is folded for every plan. Plans that bucket and group alike fold together
/// ([`FoldTogether`]): a run of one series and bucket is found once for all of them. Memory
/// stays that of one scan's batch plus each plan's partial states (one row per series and
/// bucket).
///
/// [`SharedRead::new`] splits the read into partitions, [`SharedRead::read`] reads one (a
/// blocking call; partitions can run on threads of their own), and [`SharedRead::deliver`]
/// hands each plan its folded output, which its next execution returns instead of scanning.
pub(crate) struct SharedRead {
    scans: Vec<Arc<dyn ExecutionPlan>>,
    parts: Vec<Option<ScanStream>>,
    /// The plans' folds (copied, fresh, for each partition), each with the plans it folds
    /// for and where the columns it takes are in the read's.
    folds: Vec<(FoldTogether, Vec<usize>, Vec<usize>)>,
}

impl SharedRead {
    /// The read for `scans`: [`ScanExec`]s with the same [`ScanExec::share_key`].
    pub(crate) fn new(store: &Store, scans: Vec<Arc<dyn ExecutionPlan>>) -> DfResult<Self> {
        let execs: Vec<&ScanExec> = scans
            .iter()
            .filter_map(|s| s.downcast_ref::<ScanExec>())
            .collect();
        let (Some(first), true) = (execs.first(), execs.len() == scans.len()) else {
            return Err(DataFusionError::Internal(
                "a shared read of plans that are not scans".into(),
            ));
        };
        let key = first.share_key();
        if key.is_none() || execs.iter().any(|e| e.share_key() != key) {
            return Err(DataFusionError::Internal(
                "a shared read of scans that read different rows".into(),
            ));
        }
        let partial: Vec<&PartialScan> = execs
            .iter()
            .filter_map(|e| match &e.output {
                Output::Folded(p) => Some(p),
                Output::Rows(_) => None,
            })
            .collect();
        let mut union: Vec<String> = Vec::new();
        let folds = FoldTogether::group(&partial)
            .into_iter()
            .map(|(fold, members)| {
                let columns = fold
                    .columns()
                    .into_iter()
                    .map(|c| position_or_push(&mut union, c))
                    .collect();
                (fold, members, columns)
            })
            .collect();
        let mut req = first.req.clone();
        req.projection = Some(union);
        let scan = store
            .scan(&req)
            .map_err(|e| DataFusionError::External(Box::new(e)))?;
        let parts = scan.split(first.partitions).into_iter().map(Some).collect();
        Ok(Self {
            scans,
            parts,
            folds,
        })
    }

    /// How many partitions the read is split into.
    pub(crate) fn partitions(&self) -> usize {
        self.parts.len()
    }

    /// The reading of partition `part`, to run on a blocking thread: for each plan, the
    /// batches of partial states it folded.
    pub(crate) fn read(
        &mut self,
        part: usize,
    ) -> impl FnOnce() -> DfResult<Vec<Vec<RecordBatch>>> + Send + use<> {
        let stream = self.parts.get_mut(part).and_then(Option::take);
        let plans = self.scans.len();
        let mut folds = self.folds.clone();
        move || {
            let mut folded: Vec<Vec<Vec<RecordBatch>>> = folds
                .iter()
                .map(|(_, members, _)| vec![Vec::new(); members.len()])
                .collect();
            for batch in stream.into_iter().flatten() {
                let batch = batch.map_err(|e| DataFusionError::External(Box::new(e)))?;
                for ((fold, _, columns), folded) in folds.iter_mut().zip(&mut folded) {
                    fold.push(&batch.project(columns)?, folded)?;
                }
            }
            let mut out = vec![Vec::new(); plans];
            for ((fold, members, _), mut folded) in folds.into_iter().zip(folded) {
                fold.finish(&mut folded)?;
                for (m, batches) in members.into_iter().zip(folded) {
                    out[m] = batches;
                }
            }
            Ok(out)
        }
    }

    /// Gives each plan its output: `folded[part][plan]`, as [`SharedRead::read`] returned
    /// them.
    pub(crate) fn deliver(self, folded: Vec<Vec<Vec<RecordBatch>>>) {
        for (k, scan) in self.scans.iter().enumerate() {
            let Some(exec) = scan.downcast_ref::<ScanExec>() else {
                continue;
            };
            let mut slots: Vec<Slot> = folded
                .iter()
                .map(|part| Slot::Folded(part.get(k).cloned().unwrap_or_default()))
                .collect();
            slots.resize_with(exec.partitions, || Slot::Empty);
            *exec.slots.lock().unwrap_or_else(|e| e.into_inner()) = slots;
        }
    }
}

impl DisplayAs for ScanExec {
    fn fmt_as(&self, t: DisplayFormatType, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match t {
            DisplayFormatType::Default | DisplayFormatType::Verbose => {
                write!(f, "ForestallScanExec: measurement={}", self.req.measurement)?;
                if self.req.start != i64::MIN || self.req.end != i64::MAX {
                    write!(f, ", time=[{}, {})", self.req.start, self.req.end)?;
                }
                if let Some(p) = &self.req.predicate {
                    write!(f, ", tags={p:?}")?;
                }
                if let Some(l) = self.limit {
                    write!(f, ", limit={l}")?;
                }
                match &self.output {
                    Output::Rows(Some(filter)) => write!(f, ", filter={filter}")?,
                    Output::Rows(None) => {}
                    Output::Folded(p) => write!(f, ", partial_aggregate=[{}]", p.spec)?,
                }
                write!(f, ", partitions={}", self.partitions)
            }
            DisplayFormatType::TreeRender => write!(f, "measurement={}", self.req.measurement),
        }
    }
}

impl ExecutionPlan for ScanExec {
    fn name(&self) -> &str {
        "ForestallScanExec"
    }

    fn properties(&self) -> &Arc<PlanProperties> {
        &self.props
    }

    fn children(&self) -> Vec<&Arc<dyn ExecutionPlan>> {
        vec![]
    }

    fn apply_expressions(
        &self,
        _f: &mut dyn FnMut(&Arc<dyn PhysicalExpr>) -> DfResult<TreeNodeRecursion>,
    ) -> DfResult<TreeNodeRecursion> {
        Ok(TreeNodeRecursion::Continue)
    }

    fn with_new_children(
        self: Arc<Self>,
        _children: Vec<Arc<dyn ExecutionPlan>>,
    ) -> DfResult<Arc<dyn ExecutionPlan>> {
        Ok(self)
    }

    fn metrics(&self) -> Option<MetricsSet> {
        Some(self.metrics.clone_inner())
    }

    fn execute(
        &self,
        partition: usize,
        _context: Arc<TaskContext>,
    ) -> DfResult<SendableRecordBatchStream> {
        let counter =
            |name: &'static str| MetricBuilder::new(&self.metrics).counter(name, partition);
        let counters = [
            counter("segments_total"),
            counter("segments_pruned"),
            counter("row_groups_total"),
            counter("row_groups_pruned"),
            counter("rows_decoded"),
            counter("rows_skipped_by_page_index"),
            counter("rows_scanned"),
        ];
        let baseline = BaselineMetrics::new(&self.metrics, partition);
        let (tx, mut rx) = tokio::sync::mpsc::channel::<DfResult<RecordBatch>>(2);
        let limit = self.limit;
        let mut stream = match self.take(partition)? {
            Some(Source::Scan(s)) => *s,
            Some(Source::Folded(batches)) => {
                for b in &batches {
                    baseline.record_output(b.num_rows());
                }
                let batches = futures::stream::iter(batches.into_iter().map(Ok));
                return Ok(Box::pin(RecordBatchStreamAdapter::new(
                    Arc::clone(&self.schema),
                    batches,
                )));
            }
            None => {
                return Ok(Box::pin(RecordBatchStreamAdapter::new(
                    Arc::clone(&self.schema),
                    futures::stream::empty(),
                )));
            }
        };
        let schema = Arc::clone(&self.schema);
        let (filter, mut partial) = match &self.output {
            Output::Rows(filter) => (filter.clone(), None),
            Output::Folded(p) => (None, Some(p.start())),
        };
        tokio::task::spawn_blocking(move || {
            let external = |e: forestall_engine::Error| DataFusionError::External(Box::new(e));
            let mut rows = 0;
            // Sends batches; whether to go on: not after an error or at the limit, and not
            // when the channel is closed (the consumer is gone).
            let mut send = |batches: DfResult<Vec<RecordBatch>>| match batches {
                Ok(batches) => batches.into_iter().all(|b| {
                    rows += b.num_rows();
                    tx.blocking_send(Ok(b)).is_ok() && limit.is_none_or(|l| rows < l)
                }),
                Err(e) => {
                    let _ = tx.blocking_send(Err(e));
                    false
                }
            };
            let mut going = true;
            let mut scanned = 0;
            for batch in stream.by_ref() {
                let batch = batch.map_err(external);
                if let Ok(b) = &batch {
                    scanned += b.num_rows();
                }
                going = send(match &mut partial {
                    None => batch
                        .and_then(|b| keep(b, filter.as_deref()))
                        .and_then(|b| to_sql_types(&b, &schema))
                        .map(|b| if b.num_rows() == 0 { vec![] } else { vec![b] }),
                    Some(p) => batch.and_then(|b| p.push(&b)),
                });
                // A folding scan sends nothing for a while: notice a consumer that left.
                if !going || tx.is_closed() {
                    break;
                }
            }
            if going
                && !tx.is_closed()
                && let Some(p) = partial
            {
                send(p.finish());
            }
            let read = stream.read;
            let values = [
                stream.segments_total,
                stream.segments_pruned,
                read.row_groups,
                read.row_groups - read.row_groups_read,
                read.rows_decoded,
                read.rows_in_row_groups - read.rows_decoded,
                scanned,
            ];
            for (c, v) in counters.iter().zip(values) {
                c.add(v);
            }
        });
        let batches = futures::stream::poll_fn(move |cx| rx.poll_recv(cx)).map(move |b| {
            if let Ok(b) = &b {
                baseline.record_output(b.num_rows());
            }
            b
        });
        Ok(Box::pin(RecordBatchStreamAdapter::new(
            Arc::clone(&self.schema),
            batches,
        )))
    }
}

/// `last_rows('cpu')`: the latest row of every series of a measurement, from the engine's
/// last-row cache, so "the latest value of each host" reads one row per series instead of
/// the measurement's history. Filter and project it like any table.
#[derive(Debug)]
pub struct LastRows {
    store: Arc<Store>,
}

impl LastRows {
    pub fn new(store: Arc<Store>) -> Self {
        Self { store }
    }
}

impl TableFunctionImpl for LastRows {
    fn call_with_args(&self, args: TableFunctionArgs<'_, '_>) -> DfResult<Arc<dyn TableProvider>> {
        let name = match args.exprs() {
            [e] => string_literal(e),
            _ => None,
        };
        let Some(name) = name else {
            return Err(DataFusionError::Plan(
                "last_rows takes one argument, the measurement's name: last_rows('cpu')".into(),
            ));
        };
        let rows = self
            .store
            .last_rows(&name)
            .map_err(|e| DataFusionError::External(Box::new(e)))?
            .ok_or_else(|| DataFusionError::Plan(format!("table '{name}' not found")))?;
        Ok(Arc::new(MemTable::try_new(
            rows.schema(),
            vec![vec![rows]],
        )?))
    }
}

/// The schema SQL sees: the store's, with tags (dictionaries in storage) as `Utf8View`.
/// DataFusion groups, joins and compares view strings column-wise; dictionary columns take
/// its slow row-by-row path (grouping by host was four times slower).
pub fn sql_schema(stored: &SchemaRef) -> SchemaRef {
    let fields: Vec<_> = stored
        .fields()
        .iter()
        .map(|f| match f.data_type() {
            DataType::Dictionary(_, v) if v.as_ref() == &DataType::Utf8 => {
                Arc::new(f.as_ref().clone().with_data_type(DataType::Utf8View))
            }
            _ => Arc::clone(f),
        })
        .collect();
    Arc::new(arrow::datatypes::Schema::new(fields))
}

/// A batch of the store's types in the types of `schema` (see [`sql_schema`]).
/// The rows of `batch` that pass `filter` (a row where it is NULL does not, as in SQL).
fn keep(batch: RecordBatch, filter: Option<&dyn PhysicalExpr>) -> DfResult<RecordBatch> {
    let Some(filter) = filter else {
        return Ok(batch);
    };
    let mask = filter.evaluate(&batch)?.into_array(batch.num_rows())?;
    let mask = mask.as_boolean_opt().ok_or_else(|| {
        DataFusionError::Internal(format!("a filter on fields gave {}", mask.data_type()))
    })?;
    Ok(arrow::compute::filter_record_batch(&batch, mask)?)
}

fn to_sql_types(batch: &RecordBatch, schema: &SchemaRef) -> DfResult<RecordBatch> {
    let columns = batch
        .columns()
        .iter()
        .zip(schema.fields())
        .map(|(c, f)| {
            if c.data_type() == f.data_type() {
                Ok(Arc::clone(c))
            } else {
                arrow::compute::cast(c, f.data_type())
            }
        })
        .collect::<Result<Vec<_>, _>>()?;
    let options =
        arrow::record_batch::RecordBatchOptions::new().with_row_count(Some(batch.num_rows()));
    Ok(RecordBatch::try_new_with_options(
        Arc::clone(schema),
        columns,
        &options,
    )?)
}

/// `[start, end)` in nanoseconds implied by a filter on `time`.
fn time_bounds(e: &Expr) -> Option<(i64, i64)> {
    match e {
        Expr::BinaryExpr(BinaryExpr { left, op, right }) => {
            let (op, v) = match (column_name(left), column_name(right)) {
                (Some(TIME_COLUMN), None) => (*op, timestamp_nanos(right)?),
                (None, Some(TIME_COLUMN)) => (op.swap()?, timestamp_nanos(left)?),
                _ => return None,
            };
            match op {
                Operator::Eq => Some((v, v.saturating_add(1))),
                Operator::Lt => Some((i64::MIN, v)),
                Operator::LtEq => Some((i64::MIN, v.saturating_add(1))),
                Operator::Gt => Some((v.saturating_add(1), i64::MAX)),
                Operator::GtEq => Some((v, i64::MAX)),
                _ => None,
            }
        }
        Expr::Between(Between {
            expr,
            negated: false,
            low,
            high,
        }) if column_name(expr) == Some(TIME_COLUMN) => Some((
            timestamp_nanos(low)?,
            timestamp_nanos(high)?.saturating_add(1),
        )),
        _ => None,
    }
}

/// The column a (possibly cast) expression refers to.
fn column_name(e: &Expr) -> Option<&str> {
    match e {
        Expr::Column(c) => Some(c.name.as_str()),
        Expr::Cast(c) => column_name(&c.expr),
        Expr::TryCast(c) => column_name(&c.expr),
        _ => None,
    }
}

fn timestamp_nanos(e: &Expr) -> Option<i64> {
    let Expr::Literal(v, _) = e else { return None };
    match v {
        ScalarValue::TimestampNanosecond(Some(n), _) => Some(*n),
        ScalarValue::TimestampMicrosecond(Some(n), _) => n.checked_mul(1_000),
        ScalarValue::TimestampMillisecond(Some(n), _) => n.checked_mul(1_000_000),
        ScalarValue::TimestampSecond(Some(n), _) => n.checked_mul(1_000_000_000),
        _ => None,
    }
}

fn string_literal(e: &Expr) -> Option<String> {
    let Expr::Literal(v, _) = e else { return None };
    scalar_string(v)
}

pub(crate) fn scalar_string(v: &ScalarValue) -> Option<String> {
    match v {
        ScalarValue::Utf8(Some(s))
        | ScalarValue::LargeUtf8(Some(s))
        | ScalarValue::Utf8View(Some(s)) => Some(s.clone()),
        ScalarValue::Dictionary(_, inner) => scalar_string(inner),
        _ => None,
    }
}

/// The tag a (possibly cast) column expression names, if it is a tag of `schema`.
fn tag_column<'a>(e: &'a Expr, schema: &TableSchema) -> Option<&'a str> {
    let name = column_name(e)?;
    (schema.columns.get(name) == Some(&ColumnKind::Tag)).then_some(name)
}

/// A SQL `LIKE` pattern as an anchored regex.
fn like_regex(pattern: &str, escape: Option<char>, case_insensitive: bool) -> Option<Regex> {
    let mut re = String::from(if case_insensitive { "(?is)^" } else { "(?s)^" });
    let mut chars = pattern.chars();
    while let Some(c) = chars.next() {
        match c {
            c if Some(c) == escape => re.push_str(&regex::escape(&chars.next()?.to_string())),
            '%' => re.push_str(".*"),
            '_' => re.push('.'),
            c => re.push_str(&regex::escape(&c.to_string())),
        }
    }
    re.push('$');
    Regex::new(&re).ok()
}

/// The engine predicate for a filter on tags, if it has one.
fn tag_predicate(e: &Expr, schema: &TableSchema) -> Option<TagPredicate> {
    match e {
        Expr::BinaryExpr(BinaryExpr { left, op, right }) => {
            if matches!(op, Operator::Or | Operator::And) {
                let (l, r) = (tag_predicate(left, schema)?, tag_predicate(right, schema)?);
                return Some(if *op == Operator::Or {
                    TagPredicate::Or(vec![l, r])
                } else {
                    TagPredicate::And(vec![l, r])
                });
            }
            let (tag, value, op) = match (tag_column(left, schema), tag_column(right, schema)) {
                (Some(t), None) => (t, string_literal(right)?, *op),
                (None, Some(t)) => (t, string_literal(left)?, op.swap()?),
                _ => return None,
            };
            let tag = tag.to_string();
            match op {
                Operator::Eq => Some(TagPredicate::Eq(tag, value)),
                Operator::NotEq => Some(TagPredicate::NotEq(tag, value)),
                Operator::RegexMatch => Some(TagPredicate::Regex(tag, Regex::new(&value).ok()?)),
                Operator::RegexNotMatch => {
                    Some(TagPredicate::NotRegex(tag, Regex::new(&value).ok()?))
                }
                Operator::RegexIMatch => Some(TagPredicate::Regex(
                    tag,
                    Regex::new(&format!("(?i){value}")).ok()?,
                )),
                Operator::RegexNotIMatch => Some(TagPredicate::NotRegex(
                    tag,
                    Regex::new(&format!("(?i){value}")).ok()?,
                )),
                _ => None,
            }
        }
        Expr::InList(list) => {
            let tag = tag_column(&list.expr, schema)?.to_string();
            let values = list
                .list
                .iter()
                .map(string_literal)
                .collect::<Option<Vec<_>>>()?;
            if list.negated {
                // NOT IN: the series has the tag and its value is none of these.
                Some(TagPredicate::And(vec![
                    TagPredicate::Exists(tag.clone()),
                    TagPredicate::Not(Box::new(TagPredicate::In(tag, values))),
                ]))
            } else {
                Some(TagPredicate::In(tag, values))
            }
        }
        Expr::Like(Like {
            negated,
            expr,
            pattern,
            escape_char,
            case_insensitive,
        }) => {
            let tag = tag_column(expr, schema)?.to_string();
            // Without an ESCAPE clause, `\` escapes, as in DataFusion's (Arrow's) LIKE.
            let escape = escape_char.or(Some('\\'));
            let re = like_regex(&string_literal(pattern)?, escape, *case_insensitive)?;
            Some(if *negated {
                TagPredicate::NotRegex(tag, re)
            } else {
                TagPredicate::Regex(tag, re)
            })
        }
        Expr::IsNotNull(inner) => {
            Some(TagPredicate::Exists(tag_column(inner, schema)?.to_string()))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn like_patterns_become_anchored_regexes() {
        let re = like_regex("web-%-0_", None, false).unwrap();
        assert!(re.is_match("web-eu-01"));
        assert!(!re.is_match("xweb-eu-01"));
        assert!(!re.is_match("web-eu-011"));
        let re = like_regex("a.b%", None, true).unwrap();
        assert!(re.is_match("A.Bc") && !re.is_match("axb"));
        let re = like_regex(r"100\%", Some('\\'), false).unwrap();
        assert!(re.is_match("100%") && !re.is_match("1000"));
    }

    /// A tag filter with LIKE selects the series DataFusion's LIKE would: `\` escapes even
    /// without an ESCAPE clause (it once matched a literal backslash, and the scan dropped
    /// series the query asked for).
    #[tokio::test]
    async fn like_on_a_tag_escapes_with_backslash_as_datafusion_does() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(
            Store::open(forestall_engine::EngineConfig {
                data_dir: dir.path().to_path_buf(),
                ..Default::default()
            })
            .unwrap(),
        );
        let body = "cpu,host=a_b usage=1 1\ncpu,host=axb usage=2 1\ncpu,host=a\\\\xb usage=4 1\n";
        let o = store
            .write(body.as_bytes(), forestall_engine::Precision::Nanoseconds, 1)
            .unwrap();
        assert_eq!(o.rejected_lines, 0, "{:?}", o.errors);
        let engine = crate::QueryEngine::new(store);
        for (pattern, want) in [(r"a\_b", "1.0"), (r"a_b", "3.0"), (r"a\\%", "4.0")] {
            let sql = format!("SELECT sum(usage) FROM cpu WHERE host LIKE '{pattern}'");
            let (_, batches) = engine.sql(&sql).await.unwrap();
            let got = arrow::util::display::array_value_to_string(batches[0].column(0), 0).unwrap();
            assert_eq!(got, want, "{sql}");
        }
    }
}
