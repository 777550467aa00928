//! Turning a continuous query's result batches into what its sink takes: line protocol for
//! the write path (`INTO`, `forestall_health`), and rows read column by column for checks.

use std::fmt::Write as _;

use arrow::array::{Array, ArrayRef, AsArray};
use arrow::compute::cast;
use arrow::datatypes::{DataType, Float64Type, Int64Type, Schema, TimeUnit, UInt64Type};
use arrow::record_batch::RecordBatch;

use crate::{Error, Result};

/// How a result column is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    Time,
    Tag,
    Float,
    Int,
    UInt,
    Bool,
    Text,
}

/// Each column's kind: `time`, strings among `keys` as tags, the rest as fields. A column of
/// a type line protocol has no field for is refused, naming it.
pub(crate) fn kinds(schema: &Schema, keys: &[String]) -> Result<Vec<Kind>> {
    let mut out = Vec::with_capacity(schema.fields().len());
    let mut has_field = false;
    for f in schema.fields() {
        let name = f.name();
        let kind = if name == "time" {
            match f.data_type() {
                DataType::Timestamp(..) => Kind::Time,
                other => {
                    return Err(Error::Query(format!(
                        "the column time is {other}, not a timestamp"
                    )));
                }
            }
        } else {
            match f.data_type() {
                t if is_string(t) && keys.iter().any(|k| k == name) => Kind::Tag,
                t if is_string(t) => Kind::Text,
                DataType::Boolean => Kind::Bool,
                DataType::Int8 | DataType::Int16 | DataType::Int32 | DataType::Int64 => Kind::Int,
                DataType::UInt8 | DataType::UInt16 | DataType::UInt32 | DataType::UInt64 => {
                    Kind::UInt
                }
                DataType::Float16
                | DataType::Float32
                | DataType::Float64
                | DataType::Decimal128(..)
                | DataType::Decimal256(..) => Kind::Float,
                other => {
                    return Err(Error::Query(format!(
                        "the column {name} is {other}, which a measurement cannot hold: cast it to a number, a boolean or a string"
                    )));
                }
            }
        };
        has_field |= !matches!(kind, Kind::Time | Kind::Tag);
        out.push(kind);
    }
    if !out.contains(&Kind::Time) {
        return Err(Error::Query("the result has no time column".into()));
    }
    if !has_field {
        return Err(Error::Query(
            "the result has no field: select at least one value besides the time and the tags"
                .into(),
        ));
    }
    Ok(out)
}

pub(crate) fn is_string(t: &DataType) -> bool {
    match t {
        DataType::Utf8 | DataType::Utf8View | DataType::LargeUtf8 => true,
        DataType::Dictionary(_, v) => is_string(v),
        _ => false,
    }
}

/// A column cast to the one type its kind is read as.
pub(crate) enum Column {
    Time(arrow::array::PrimitiveArray<Int64Type>),
    Text(arrow::array::StringArray),
    Float(arrow::array::PrimitiveArray<Float64Type>),
    Int(arrow::array::PrimitiveArray<Int64Type>),
    UInt(arrow::array::PrimitiveArray<UInt64Type>),
    Bool(arrow::array::BooleanArray),
}

fn cast_to(a: &ArrayRef, t: &DataType) -> Result<ArrayRef> {
    cast(a, t).map_err(|e| Error::Execution(format!("cast a result column: {e}")))
}

pub(crate) fn column(a: &ArrayRef, kind: Kind) -> Result<Column> {
    Ok(match kind {
        Kind::Time => {
            let ns = cast_to(a, &DataType::Timestamp(TimeUnit::Nanosecond, None))?;
            Column::Time(
                cast_to(&ns, &DataType::Int64)?
                    .as_primitive::<Int64Type>()
                    .clone(),
            )
        }
        Kind::Tag | Kind::Text => {
            Column::Text(cast_to(a, &DataType::Utf8)?.as_string::<i32>().clone())
        }
        Kind::Float => Column::Float(cast_to(a, &DataType::Float64)?.as_primitive().clone()),
        Kind::Int => Column::Int(cast_to(a, &DataType::Int64)?.as_primitive().clone()),
        Kind::UInt => Column::UInt(cast_to(a, &DataType::UInt64)?.as_primitive().clone()),
        Kind::Bool => Column::Bool(cast_to(a, &DataType::Boolean)?.as_boolean().clone()),
    })
}

/// Escapes a measurement name.
pub(crate) fn escape_measurement(out: &mut String, s: &str) {
    for c in s.chars() {
        match c {
            ',' | ' ' => {
                out.push('\\');
                out.push(c);
            }
            '\n' | '\r' => out.push(' '),
            _ => out.push(c),
        }
    }
}

/// Escapes a tag key, tag value or field key.
pub(crate) fn escape_key(out: &mut String, s: &str) {
    for c in s.chars() {
        match c {
            ',' | ' ' | '=' => {
                out.push('\\');
                out.push(c);
            }
            // Line protocol has no escape for a line break inside a name.
            '\n' | '\r' => out.push(' '),
            _ => out.push(c),
        }
    }
}

/// Escapes a string field's value (without its quotes).
pub(crate) fn escape_string(out: &mut String, s: &str) {
    for c in s.chars() {
        if c == '"' || c == '\\' {
            out.push('\\');
        }
        out.push(c);
    }
}

/// Appends the rows of `batch` to `out` as line protocol for `measurement`, one line per row
/// with a time and at least one value. Returns the lines written. Non-finite floats have no
/// line-protocol form and are left out, as are NULLs; empty tags are left out too.
pub(crate) fn encode(
    out: &mut String,
    measurement: &str,
    batch: &RecordBatch,
    kinds: &[Kind],
) -> Result<usize> {
    let names: Vec<&str> = batch
        .schema_ref()
        .fields()
        .iter()
        .map(|f| f.name().as_str())
        .collect();
    let columns: Vec<Column> = batch
        .columns()
        .iter()
        .zip(kinds)
        .map(|(a, k)| column(a, *k))
        .collect::<Result<_>>()?;
    let mut lines = 0;
    for row in 0..batch.num_rows() {
        let mut time = None;
        let mut head = String::new();
        escape_measurement(&mut head, measurement);
        let mut fields = String::new();
        for (i, c) in columns.iter().enumerate() {
            match (c, kinds[i]) {
                (Column::Time(t), _) => time = t.is_valid(row).then(|| t.value(row)),
                (Column::Text(t), Kind::Tag) => {
                    if t.is_valid(row) && !t.value(row).is_empty() {
                        head.push(',');
                        escape_key(&mut head, names[i]);
                        head.push('=');
                        escape_key(&mut head, t.value(row));
                    }
                }
                _ => {
                    if !c.is_valid(row) {
                        continue;
                    }
                    let start = fields.len();
                    if !fields.is_empty() {
                        fields.push(',');
                    }
                    escape_key(&mut fields, names[i]);
                    fields.push('=');
                    let written = match c {
                        Column::Float(v) => {
                            let x = v.value(row);
                            x.is_finite() && write!(fields, "{x:?}").is_ok()
                        }
                        Column::Int(v) => write!(fields, "{}i", v.value(row)).is_ok(),
                        Column::UInt(v) => write!(fields, "{}u", v.value(row)).is_ok(),
                        Column::Bool(v) => {
                            fields.push_str(if v.value(row) { "true" } else { "false" });
                            true
                        }
                        Column::Text(v) => {
                            fields.push('"');
                            escape_string(&mut fields, v.value(row));
                            fields.push('"');
                            true
                        }
                        Column::Time(_) => false,
                    };
                    if !written {
                        fields.truncate(start);
                    }
                }
            }
        }
        let (Some(time), false) = (time, fields.is_empty()) else {
            continue;
        };
        let _ = writeln!(out, "{head} {fields} {time}");
        lines += 1;
    }
    Ok(lines)
}

impl Column {
    pub(crate) fn is_valid(&self, row: usize) -> bool {
        match self {
            Column::Time(a) => a.is_valid(row),
            Column::Text(a) => a.is_valid(row),
            Column::Float(a) => a.is_valid(row),
            Column::Int(a) => a.is_valid(row),
            Column::UInt(a) => a.is_valid(row),
            Column::Bool(a) => a.is_valid(row),
        }
    }

    /// The row's value as a number, for numeric columns.
    pub(crate) fn number(&self, row: usize) -> Option<f64> {
        if !self.is_valid(row) {
            return None;
        }
        match self {
            Column::Float(a) => Some(a.value(row)),
            Column::Int(a) => Some(a.value(row) as f64),
            Column::UInt(a) => Some(a.value(row) as f64),
            _ => None,
        }
    }

    /// The row's value as JSON.
    pub(crate) fn json(&self, row: usize) -> serde_json::Value {
        if !self.is_valid(row) {
            return serde_json::Value::Null;
        }
        match self {
            Column::Time(a) => a.value(row).into(),
            Column::Text(a) => a.value(row).into(),
            Column::Float(a) => serde_json::Number::from_f64(a.value(row))
                .map_or(serde_json::Value::Null, Into::into),
            Column::Int(a) => a.value(row).into(),
            Column::UInt(a) => a.value(row).into(),
            Column::Bool(a) => a.value(row).into(),
        }
    }
}
