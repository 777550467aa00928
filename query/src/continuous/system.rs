//! `system.continuous_queries`: the queries' status as a table, for SQL.

use std::sync::Arc;

use arrow::datatypes::SchemaRef;
use async_trait::async_trait;
use datafusion::catalog::{Session, TableProvider};
use datafusion::datasource::MemTable;
use datafusion::error::Result;
use datafusion::logical_expr::{Expr, TableType};
use datafusion::physical_plan::ExecutionPlan;

use super::runtime::{WeakQueries, status_schema};

/// The table: one row per query, as `SHOW CONTINUOUS QUERIES` shows it, read when scanned.
#[derive(Debug)]
pub(crate) struct StatusTable(pub WeakQueries);

#[async_trait]
impl TableProvider for StatusTable {
    fn schema(&self) -> SchemaRef {
        status_schema()
    }

    fn table_type(&self) -> TableType {
        TableType::View
    }

    async fn scan(
        &self,
        state: &dyn Session,
        projection: Option<&Vec<usize>>,
        filters: &[Expr],
        limit: Option<usize>,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        let batch = match self.0.upgrade() {
            Some(queries) => queries.table(),
            None => arrow::record_batch::RecordBatch::new_empty(status_schema()),
        };
        let table = MemTable::try_new(batch.schema(), vec![vec![batch]])?;
        table.scan(state, projection, filters, limit).await
    }
}
