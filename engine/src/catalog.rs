//! The catalog: each measurement's schema, fixed column by column as data arrives.
//!
//! A column's kind is decided by its first write: a tag, or a field of one [`FieldType`]. A
//! later line that uses the column differently is rejected (that line only). Schemas only
//! grow; a new column is nullable and reads as NULL for older rows. Every change is written
//! to the index (synchronously) *before* the line that caused it reaches the WAL, so WAL
//! replay always finds the columns it needs.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use parking_lot::RwLock;
use serde::{Deserialize, Serialize};

use crate::Result;
use crate::index::Index;
use crate::line_protocol::{FieldType, ParsedLine};

/// Name of the timestamp column in every table.
pub const TIME_COLUMN: &str = "time";
/// Name of the hidden series-id column in segment files.
pub const SERIES_ID_COLUMN: &str = "__series_id";

/// What a column holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase", tag = "kind", content = "type")]
pub enum ColumnKind {
    Tag,
    Field(FieldType),
}

/// One measurement's schema. Immutable: a change produces a new version.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TableSchema {
    pub name: String,
    /// Columns other than `time`, by name.
    pub columns: BTreeMap<String, ColumnKind>,
    /// Retention period for this measurement; `None` falls back to the engine default.
    #[serde(default, with = "humantime_serde")]
    pub retention: Option<Duration>,
    #[serde(skip)]
    arrow: Option<SchemaRef>,
}

impl TableSchema {
    fn new(
        name: String,
        columns: BTreeMap<String, ColumnKind>,
        retention: Option<Duration>,
    ) -> Self {
        let mut schema = Self {
            name,
            columns,
            retention,
            arrow: None,
        };
        schema.arrow = Some(schema.build_arrow());
        schema
    }

    /// The table's Arrow schema: `time`, then tags by name, then fields by name.
    pub fn arrow_schema(&self) -> SchemaRef {
        match &self.arrow {
            Some(s) => Arc::clone(s),
            None => self.build_arrow(),
        }
    }

    fn build_arrow(&self) -> SchemaRef {
        let mut fields = vec![time_field()];
        fields.extend(self.tags().map(tag_field));
        fields.extend(self.columns.iter().filter_map(|(name, kind)| match kind {
            ColumnKind::Field(t) => Some(Field::new(name, field_data_type(*t), true)),
            ColumnKind::Tag => None,
        }));
        Arc::new(Schema::new(fields))
    }

    /// Tag column names, sorted.
    pub fn tags(&self) -> impl Iterator<Item = &str> {
        self.columns
            .iter()
            .filter(|(_, k)| **k == ColumnKind::Tag)
            .map(|(n, _)| n.as_str())
    }
}

/// The Arrow field of the `time` column: nanoseconds since the epoch, UTC, never null.
pub fn time_field() -> Field {
    Field::new(
        TIME_COLUMN,
        DataType::Timestamp(TimeUnit::Nanosecond, None),
        false,
    )
}

/// The Arrow field of a tag column: dictionary-encoded strings.
pub fn tag_field(name: &str) -> Field {
    Field::new(name, tag_data_type(), true)
}

/// Arrow type of tag columns.
pub fn tag_data_type() -> DataType {
    DataType::Dictionary(Box::new(DataType::Int32), Box::new(DataType::Utf8))
}

/// Arrow type of a field column.
pub fn field_data_type(t: FieldType) -> DataType {
    match t {
        FieldType::Float => DataType::Float64,
        FieldType::Integer => DataType::Int64,
        FieldType::UInteger => DataType::UInt64,
        FieldType::Boolean => DataType::Boolean,
        FieldType::String => DataType::Utf8,
    }
}

/// All schemas, in memory, backed by the index.
#[derive(Debug)]
pub struct Catalog {
    index: Arc<Index>,
    tables: RwLock<HashMap<String, Arc<TableSchema>>>,
}

impl Catalog {
    /// Loads every schema from the index.
    pub fn load(index: Arc<Index>) -> Result<Self> {
        let mut tables = HashMap::new();
        for mut schema in index.load_schemas()? {
            schema = TableSchema::new(schema.name, schema.columns, schema.retention);
            tables.insert(schema.name.clone(), Arc::new(schema));
        }
        Ok(Self {
            index,
            tables: RwLock::new(tables),
        })
    }

    /// The current schema of a measurement.
    pub fn get(&self, measurement: &str) -> Option<Arc<TableSchema>> {
        self.tables.read().get(measurement).cloned()
    }

    /// Every schema, by measurement name.
    pub fn all(&self) -> Vec<Arc<TableSchema>> {
        let mut all: Vec<_> = self.tables.read().values().cloned().collect();
        all.sort_by(|a, b| a.name.cmp(&b.name));
        all
    }

    /// Checks a line against its measurement's schema and records any new columns. `Ok(Err)`
    /// is a rejection of this line (with the reason); `Err` is a failure of the index.
    pub fn admit(&self, line: &ParsedLine<'_>) -> Result<Result<(), String>> {
        {
            let tables = self.tables.read();
            if let Some(schema) = tables.get(line.measurement.as_ref()) {
                match check(schema, line) {
                    Check::Known => return Ok(Ok(())),
                    Check::Conflict(reason) => return Ok(Err(reason)),
                    Check::NewColumns => {}
                }
            }
        }
        let mut tables = self.tables.write();
        let current = tables.get(line.measurement.as_ref());
        if let Some(schema) = current {
            // Re-check: another writer may have added the columns, or a conflicting type,
            // between the two locks.
            match check(schema, line) {
                Check::Known => return Ok(Ok(())),
                Check::Conflict(reason) => return Ok(Err(reason)),
                Check::NewColumns => {}
            }
        }
        let (mut columns, retention) = match current {
            Some(s) => (s.columns.clone(), s.retention),
            None => (BTreeMap::new(), None),
        };
        for (k, _) in &line.tags {
            columns.entry(k.to_string()).or_insert(ColumnKind::Tag);
        }
        for (k, v) in &line.fields {
            columns
                .entry(k.to_string())
                .or_insert(ColumnKind::Field(v.field_type()));
        }
        let schema = TableSchema::new(line.measurement.to_string(), columns, retention);
        self.index.put_schema(&schema)?;
        tables.insert(schema.name.clone(), Arc::new(schema));
        Ok(Ok(()))
    }

    /// Sets (or clears) a measurement's retention period.
    pub fn set_retention(&self, measurement: &str, period: Option<Duration>) -> Result<bool> {
        let mut tables = self.tables.write();
        let Some(current) = tables.get(measurement) else {
            return Ok(false);
        };
        let schema = TableSchema::new(current.name.clone(), current.columns.clone(), period);
        self.index.put_schema(&schema)?;
        tables.insert(schema.name.clone(), Arc::new(schema));
        Ok(true)
    }
}

enum Check {
    Known,
    NewColumns,
    Conflict(String),
}

fn check(schema: &TableSchema, line: &ParsedLine<'_>) -> Check {
    let mut new = false;
    for (k, _) in &line.tags {
        match schema.columns.get(k.as_ref()) {
            Some(ColumnKind::Tag) => {}
            Some(ColumnKind::Field(t)) => {
                return Check::Conflict(format!(
                    "{k:?} is a {t} field of {:?}, not a tag",
                    schema.name
                ));
            }
            None => new = true,
        }
    }
    for (k, v) in &line.fields {
        match schema.columns.get(k.as_ref()) {
            Some(ColumnKind::Field(t)) if *t == v.field_type() => {}
            Some(ColumnKind::Field(t)) => {
                return Check::Conflict(format!(
                    "field {k:?} of {:?} is {t}, got {}",
                    schema.name,
                    v.field_type()
                ));
            }
            Some(ColumnKind::Tag) => {
                return Check::Conflict(format!(
                    "{k:?} is a tag of {:?}, not a field",
                    schema.name
                ));
            }
            None => new = true,
        }
    }
    if new { Check::NewColumns } else { Check::Known }
}
