//! The in-memory columnar buffer: points that are durable in the WAL but not yet in a segment.
//!
//! Points are grouped per measurement and time partition ([`PartitionBuffer`]). Each partition
//! keeps its series table (canonical key and tags, found through a cache keyed by the series
//! text as written) and one Arrow builder per field, so a snapshot is a plain
//! [`RecordBatch`] in the table's column order. Rows are kept in arrival order; sorting by
//! series and time happens once, at flush.

use std::collections::{BTreeMap, HashMap};

use ahash::RandomState;
use std::sync::Arc;

use arrow::array::{
    Array, ArrayBuilder, ArrayRef, BooleanBuilder, DictionaryArray, Float64Builder, Int32Array,
    Int64Builder, StringArray, StringBuilder, TimestampNanosecondArray, UInt64Builder,
};
use arrow::datatypes::{Field, Int32Type, Schema};
use arrow::record_batch::RecordBatch;

use crate::catalog::{field_data_type, tag_field, time_field};
use crate::line_protocol::{FieldType, FieldValue, ParsedLine};
use crate::{Error, Result};

/// One series of a partition: its canonical key and its tags sorted by key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SeriesEntry {
    pub key: Box<str>,
    pub tags: Vec<(String, String)>,
}

impl SeriesEntry {
    /// The value of `tag`, if the series has it.
    pub fn tag(&self, tag: &str) -> Option<&str> {
        self.tags
            .binary_search_by(|(k, _)| k.as_str().cmp(tag))
            .ok()
            .map(|i| self.tags[i].1.as_str())
    }
}

#[derive(Debug)]
enum FieldBuilder {
    Float(Float64Builder),
    Integer(Int64Builder),
    UInteger(UInt64Builder),
    Boolean(BooleanBuilder),
    String(StringBuilder),
}

impl FieldBuilder {
    fn new(t: FieldType, nulls: usize) -> Self {
        let mut b = match t {
            FieldType::Float => FieldBuilder::Float(Float64Builder::new()),
            FieldType::Integer => FieldBuilder::Integer(Int64Builder::new()),
            FieldType::UInteger => FieldBuilder::UInteger(UInt64Builder::new()),
            FieldType::Boolean => FieldBuilder::Boolean(BooleanBuilder::new()),
            FieldType::String => FieldBuilder::String(StringBuilder::new()),
        };
        b.append_nulls(nulls);
        b
    }

    fn len(&self) -> usize {
        match self {
            FieldBuilder::Float(b) => b.len(),
            FieldBuilder::Integer(b) => b.len(),
            FieldBuilder::UInteger(b) => b.len(),
            FieldBuilder::Boolean(b) => b.len(),
            FieldBuilder::String(b) => b.len(),
        }
    }

    fn append_nulls(&mut self, n: usize) {
        match self {
            FieldBuilder::Float(b) => b.append_nulls(n),
            FieldBuilder::Integer(b) => b.append_nulls(n),
            FieldBuilder::UInteger(b) => b.append_nulls(n),
            FieldBuilder::Boolean(b) => b.append_nulls(n),
            FieldBuilder::String(b) => (0..n).for_each(|_| b.append_null()),
        }
    }

    /// Appends a value; returns its approximate size in bytes. A value of another type (the
    /// catalog makes that impossible) is stored as NULL.
    fn append(&mut self, v: &FieldValue<'_>) -> usize {
        match (self, v) {
            (FieldBuilder::Float(b), FieldValue::Float(x)) => b.append_value(*x),
            (FieldBuilder::Integer(b), FieldValue::Integer(x)) => b.append_value(*x),
            (FieldBuilder::UInteger(b), FieldValue::UInteger(x)) => b.append_value(*x),
            (FieldBuilder::Boolean(b), FieldValue::Boolean(x)) => b.append_value(*x),
            (FieldBuilder::String(b), FieldValue::String(s)) => {
                b.append_value(s);
                return s.len() + 4;
            }
            (b, _) => {
                debug_assert!(false, "field type changed under the catalog");
                b.append_nulls(1);
            }
        }
        8
    }

    fn finish(&mut self) -> ArrayRef {
        match self {
            FieldBuilder::Float(b) => Arc::new(b.finish()),
            FieldBuilder::Integer(b) => Arc::new(b.finish()),
            FieldBuilder::UInteger(b) => Arc::new(b.finish()),
            FieldBuilder::Boolean(b) => Arc::new(b.finish()),
            FieldBuilder::String(b) => Arc::new(b.finish()),
        }
    }

    fn finish_cloned(&self) -> ArrayRef {
        match self {
            FieldBuilder::Float(b) => Arc::new(b.finish_cloned()),
            FieldBuilder::Integer(b) => Arc::new(b.finish_cloned()),
            FieldBuilder::UInteger(b) => Arc::new(b.finish_cloned()),
            FieldBuilder::Boolean(b) => Arc::new(b.finish_cloned()),
            FieldBuilder::String(b) => Arc::new(b.finish_cloned()),
        }
    }

    fn field_type(&self) -> FieldType {
        match self {
            FieldBuilder::Float(_) => FieldType::Float,
            FieldBuilder::Integer(_) => FieldType::Integer,
            FieldBuilder::UInteger(_) => FieldType::UInteger,
            FieldBuilder::Boolean(_) => FieldType::Boolean,
            FieldBuilder::String(_) => FieldType::String,
        }
    }
}

/// The rows of one measurement in one time partition.
#[derive(Debug)]
pub struct PartitionBuffer {
    measurement: Arc<str>,
    partition: i64,
    /// Series by their text as written (the hot path), and by canonical key. Keyed by client
    /// input, so the hasher is randomised (no crafted collisions).
    by_raw: HashMap<Box<str>, u32, RandomState>,
    by_key: HashMap<Box<str>, u32, RandomState>,
    series: Vec<SeriesEntry>,
    row_series: Vec<u32>,
    times: Vec<i64>,
    /// Field columns in order of first appearance; snapshots sort them by name.
    fields: Vec<(String, FieldBuilder)>,
    field_index: HashMap<String, usize, RandomState>,
    /// The field names of the previous line and their columns: consecutive lines nearly
    /// always have the same fields in the same order.
    shape_names: Vec<String>,
    shape_slots: Vec<usize>,
    min_time: i64,
    max_time: i64,
    bytes: usize,
    /// The latest time of each series so far, and whether a row ever came at or before its
    /// series' latest (a duplicate or an out-of-order point): then scans merge duplicates.
    series_last: Vec<i64>,
    unordered: bool,
}

impl PartitionBuffer {
    fn new(measurement: Arc<str>, partition: i64) -> Self {
        Self {
            measurement,
            partition,
            by_raw: HashMap::default(),
            by_key: HashMap::default(),
            series: Vec::new(),
            row_series: Vec::new(),
            times: Vec::new(),
            fields: Vec::new(),
            field_index: HashMap::default(),
            shape_names: Vec::new(),
            shape_slots: Vec::new(),
            min_time: i64::MAX,
            max_time: i64::MIN,
            bytes: 0,
            series_last: Vec::new(),
            unordered: false,
        }
    }

    fn series_for(&mut self, line: &ParsedLine<'_>) -> u32 {
        if let Some(&s) = self.by_raw.get(line.series_raw) {
            return s;
        }
        let key = line.series_key();
        let idx = match self.by_key.get(key.as_str()) {
            Some(&s) => s,
            None => {
                let mut tags: Vec<(String, String)> = line
                    .tags
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect();
                tags.sort();
                let idx = self.series.len() as u32;
                self.bytes += key.len() * 2
                    + tags
                        .iter()
                        .map(|(k, v)| k.len() + v.len() + 48)
                        .sum::<usize>();
                self.series.push(SeriesEntry {
                    key: key.clone().into_boxed_str(),
                    tags,
                });
                self.by_key.insert(key.into_boxed_str(), idx);
                idx
            }
        };
        self.by_raw.insert(line.series_raw.into(), idx);
        self.bytes += line.series_raw.len() + 32;
        idx
    }

    fn push(&mut self, line: &ParsedLine<'_>) -> usize {
        let before = self.bytes;
        let series = self.series_for(line);
        match self.series_last.get_mut(series as usize) {
            Some(last) => {
                self.unordered |= line.timestamp <= *last;
                *last = (*last).max(line.timestamp);
            }
            None => self.series_last.push(line.timestamp),
        }
        let row = self.times.len();
        self.row_series.push(series);
        self.times.push(line.timestamp);
        self.min_time = self.min_time.min(line.timestamp);
        self.max_time = self.max_time.max(line.timestamp);
        let same_shape = line.fields.len() == self.shape_names.len()
            && line
                .fields
                .iter()
                .zip(&self.shape_names)
                .all(|((name, _), known)| name.as_ref() == known.as_str());
        if !same_shape {
            self.shape_names.clear();
            self.shape_slots.clear();
            for (name, value) in &line.fields {
                let slot = match self.field_index.get(name.as_ref()) {
                    Some(&slot) => slot,
                    None => {
                        let slot = self.fields.len();
                        self.fields
                            .push((name.to_string(), FieldBuilder::new(value.field_type(), row)));
                        self.field_index.insert(name.to_string(), slot);
                        slot
                    }
                };
                self.shape_names.push(name.to_string());
                self.shape_slots.push(slot);
            }
        }
        let mut bytes = 12;
        for ((_, value), &slot) in line.fields.iter().zip(&self.shape_slots) {
            bytes += self.fields[slot].1.append(value);
        }
        if line.fields.len() < self.fields.len() {
            for (_, b) in &mut self.fields {
                if b.len() == row {
                    b.append_nulls(1);
                    bytes += 1;
                }
            }
        }
        self.bytes += bytes;
        self.bytes - before
    }

    /// Rows held.
    pub fn rows(&self) -> usize {
        self.times.len()
    }

    /// An immutable copy of the rows, as Arrow, with the fields `wanted` says yes to (and
    /// time and every tag). A copy is made under the buffer's lock, which writers wait for:
    /// a query copies only what it reads.
    pub fn snapshot(&self, wanted: &dyn Fn(&str) -> bool) -> Result<PartitionSnapshot> {
        let fields = self
            .fields
            .iter()
            .filter(|(name, _)| wanted(name))
            .map(|(name, b)| (name.clone(), b.field_type(), b.finish_cloned()))
            .collect();
        self.make_snapshot(self.times.clone(), self.row_series.clone(), fields)
    }

    /// The rows as Arrow, moving the buffers instead of copying them.
    pub fn into_snapshot(mut self) -> Result<PartitionSnapshot> {
        let fields = self
            .fields
            .iter_mut()
            .map(|(name, b)| (name.clone(), b.field_type(), b.finish()))
            .collect();
        let times = std::mem::take(&mut self.times);
        let row_series = std::mem::take(&mut self.row_series);
        self.make_snapshot(times, row_series, fields)
    }

    fn make_snapshot(
        &self,
        times: Vec<i64>,
        row_series: Vec<u32>,
        mut field_columns: Vec<(String, FieldType, ArrayRef)>,
    ) -> Result<PartitionSnapshot> {
        let rows = times.len();
        let series = Arc::new(self.series.clone());
        // Tag columns are dictionaries whose keys are the row's local series index and whose
        // values are each series' tag value: one pass over the rows, no hashing.
        let mut tag_names: Vec<&str> = self
            .series
            .iter()
            .flat_map(|s| s.tags.iter().map(|(k, _)| k.as_str()))
            .collect();
        tag_names.sort_unstable();
        tag_names.dedup();
        let mut fields = vec![time_field()];
        let keys = Int32Array::from_iter_values(row_series.iter().map(|&s| s as i32));
        let mut columns: Vec<ArrayRef> = vec![Arc::new(TimestampNanosecondArray::from(times))];
        for tag in tag_names {
            let values: StringArray = self.series.iter().map(|s| s.tag(tag)).collect();
            let dict = DictionaryArray::<Int32Type>::try_new(keys.clone(), Arc::new(values))
                .map_err(|source| self.arrow_error(source))?;
            // A series without the tag has a null value; make the row itself null so
            // every reader sees a plain null.
            let dict = if dict.values().null_count() > 0 {
                let logical = dict.logical_nulls();
                let keys = Int32Array::new(dict.keys().values().clone(), logical);
                DictionaryArray::<Int32Type>::try_new(keys, Arc::clone(dict.values()))
                    .map_err(|source| self.arrow_error(source))?
            } else {
                dict
            };
            fields.push(tag_field(tag));
            columns.push(Arc::new(dict));
        }
        field_columns.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        for (name, field_type, column) in field_columns {
            fields.push(Field::new(name, field_data_type(field_type), true));
            columns.push(column);
        }
        let batch = RecordBatch::try_new(Arc::new(Schema::new(fields)), columns)
            .map_err(|source| self.arrow_error(source))?;
        debug_assert_eq!(batch.num_rows(), rows);
        Ok(PartitionSnapshot {
            measurement: self.measurement.to_string(),
            partition: self.partition,
            series,
            row_series,
            batch,
            min_time: self.min_time,
            max_time: self.max_time,
            bytes: self.bytes,
            unordered: self.unordered,
        })
    }

    fn arrow_error(&self, source: arrow::error::ArrowError) -> Error {
        Error::Arrow {
            measurement: self.measurement.to_string(),
            source,
        }
    }
}

/// An immutable copy of a partition's rows: what scans read and flushes write.
#[derive(Debug, Clone)]
pub struct PartitionSnapshot {
    pub measurement: String,
    /// Start of the partition (ns).
    pub partition: i64,
    /// The partition's series; `row_series[i]` indexes it.
    pub series: Arc<Vec<SeriesEntry>>,
    pub row_series: Vec<u32>,
    /// `time`, tags (sorted), fields (sorted); arrival order.
    pub batch: RecordBatch,
    pub min_time: i64,
    pub max_time: i64,
    /// Approximate memory held by the partition it was taken from.
    pub bytes: usize,
    /// Whether a series has a row at or before an earlier row's time (possible duplicates).
    pub unordered: bool,
}

/// Every partition of every measurement.
#[derive(Debug, Default)]
pub struct Buffer {
    tables: HashMap<Arc<str>, TableBuffer>,
    rows: usize,
    bytes: usize,
}

#[derive(Debug)]
struct TableBuffer {
    name: Arc<str>,
    parts: BTreeMap<i64, PartitionBuffer>,
}

impl Buffer {
    /// Appends lines (already admitted by the catalog). `partition_nanos` is the partition
    /// width.
    pub fn insert<'a>(
        &mut self,
        lines: impl IntoIterator<Item = &'a ParsedLine<'a>>,
        partition_nanos: i64,
    ) {
        for line in lines {
            let partition = line.timestamp.div_euclid(partition_nanos) * partition_nanos;
            let table = match self.tables.get_mut(line.measurement.as_ref()) {
                Some(t) => t,
                None => {
                    let name: Arc<str> = Arc::from(line.measurement.as_ref());
                    self.tables
                        .entry(Arc::clone(&name))
                        .or_insert_with(|| TableBuffer {
                            name,
                            parts: BTreeMap::new(),
                        })
                }
            };
            let part = table
                .parts
                .entry(partition)
                .or_insert_with(|| PartitionBuffer::new(Arc::clone(&table.name), partition));
            self.bytes += part.push(line);
            self.rows += 1;
        }
    }

    /// Rows held.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Approximate bytes held.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Whether the buffer holds nothing.
    pub fn is_empty(&self) -> bool {
        self.rows == 0
    }

    /// Snapshots of the partitions of `measurement` that overlap `[start, end)`, with the
    /// fields `wanted` says yes to (see [`PartitionBuffer::snapshot`]).
    pub fn snapshot(
        &self,
        measurement: &str,
        start: i64,
        end: i64,
        partition_nanos: i64,
        wanted: &dyn Fn(&str) -> bool,
    ) -> Result<Vec<PartitionSnapshot>> {
        let Some(table) = self.tables.get(measurement) else {
            return Ok(Vec::new());
        };
        let first = start
            .div_euclid(partition_nanos)
            .saturating_mul(partition_nanos);
        table
            .parts
            .range(first..end.max(first))
            .map(|(_, p)| p)
            .filter(|p| p.rows() > 0 && p.max_time >= start && p.min_time < end)
            .map(|p| p.snapshot(wanted))
            .collect()
    }

    /// Takes everything out, as snapshots, leaving the buffer empty.
    pub fn drain(&mut self) -> Result<Vec<PartitionSnapshot>> {
        let tables = std::mem::take(&mut self.tables);
        self.rows = 0;
        self.bytes = 0;
        let mut out = Vec::new();
        for (_, table) in tables {
            for (_, p) in table.parts {
                out.push(p.into_snapshot()?);
            }
        }
        out.sort_by(|a, b| (&a.measurement, a.partition).cmp(&(&b.measurement, b.partition)));
        Ok(out)
    }

    /// Drops the partitions of `measurement` that end at or before `cutoff`; returns the rows
    /// dropped.
    pub fn drop_before(&mut self, measurement: &str, cutoff: i64, partition_nanos: i64) -> usize {
        let Some(table) = self.tables.get_mut(measurement) else {
            return 0;
        };
        let mut dropped = 0;
        table.parts.retain(|&start, p| {
            let keep = start.saturating_add(partition_nanos) > cutoff;
            if !keep {
                dropped += p.rows();
                self.bytes = self.bytes.saturating_sub(p.bytes);
            }
            keep
        });
        self.rows -= dropped;
        dropped
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::line_protocol::{Precision, parse_lines};
    use arrow::array::{AsArray, Float64Array};
    use arrow::datatypes::Float64Type;

    const DAY: i64 = 86_400_000_000_000;

    fn insert(buffer: &mut Buffer, body: &str) {
        let lines: Vec<_> = parse_lines(body.as_bytes(), Precision::Nanoseconds, 0)
            .map(|l| l.unwrap())
            .collect();
        buffer.insert(&lines, DAY);
    }

    #[test]
    fn rows_land_in_their_partition_and_new_fields_backfill_nulls() {
        let mut b = Buffer::default();
        insert(
            &mut b,
            "cpu,host=a u=1 10\ncpu,host=b u=2 20\ncpu,host=a u=3,s=\"x\" 30",
        );
        insert(&mut b, &format!("cpu,host=a u=4 {}", DAY + 5));
        assert_eq!(b.rows(), 4);
        let snaps = b.snapshot("cpu", 0, 2 * DAY, DAY, &|_| true).unwrap();
        assert_eq!(snaps.len(), 2);
        let s = &snaps[0];
        assert_eq!(s.partition, 0);
        assert_eq!((s.min_time, s.max_time), (10, 30));
        assert_eq!(s.series.len(), 2);
        assert_eq!(s.row_series, vec![0, 1, 0]);
        let names: Vec<_> = s
            .batch
            .schema()
            .fields()
            .iter()
            .map(|f| f.name().clone())
            .collect();
        assert_eq!(names, ["time", "host", "s", "u"]);
        let u = s
            .batch
            .column_by_name("u")
            .unwrap()
            .as_primitive::<Float64Type>();
        assert_eq!(u, &Float64Array::from(vec![1.0, 2.0, 3.0]));
        let strings = s.batch.column_by_name("s").unwrap().as_string::<i32>();
        assert_eq!(
            strings.iter().collect::<Vec<_>>(),
            vec![None, None, Some("x")]
        );
        assert_eq!(snaps[1].partition, DAY);
        // Only the partitions overlapping the range are copied.
        assert_eq!(
            b.snapshot("cpu", DAY, DAY + 1, DAY, &|_| true)
                .unwrap()
                .len(),
            0
        );
        assert_eq!(
            b.snapshot("cpu", DAY + 5, DAY + 6, DAY, &|_| true)
                .unwrap()
                .len(),
            1
        );
        assert!(
            b.snapshot("mem", 0, DAY, DAY, &|_| true)
                .unwrap()
                .is_empty()
        );
    }

    #[test]
    fn tag_order_as_written_does_not_split_series_and_missing_tags_are_null() {
        let mut b = Buffer::default();
        insert(&mut b, "m,a=1,b=2 v=1 1\nm,b=2,a=1 v=2 2\nm,a=1 v=3 3");
        let s = &b.snapshot("m", 0, DAY, DAY, &|_| true).unwrap()[0];
        assert_eq!(s.series.len(), 2);
        assert_eq!(s.row_series, vec![0, 0, 1]);
        let bcol = s.batch.column_by_name("b").unwrap();
        assert_eq!(bcol.null_count(), 1);
        assert!(bcol.is_null(2));
        let dict = bcol.as_dictionary::<Int32Type>();
        let values = dict.values().as_string::<i32>();
        assert_eq!(values.value(dict.keys().value(0) as usize), "2");
    }

    #[test]
    fn a_snapshot_copies_only_the_fields_wanted_with_time_and_tags() {
        let mut b = Buffer::default();
        insert(&mut b, "m,host=a x=1,y=2,z=3i 1\nm,host=b y=5 2");
        let s = &b.snapshot("m", 0, DAY, DAY, &|f| f == "y").unwrap()[0];
        let names: Vec<&str> = s
            .batch
            .schema_ref()
            .fields()
            .iter()
            .map(|f| f.name().as_str())
            .collect();
        assert_eq!(names, ["time", "host", "y"]);
        let y = s.batch.column_by_name("y").unwrap();
        assert_eq!(
            y.as_primitive::<Float64Type>().values().to_vec(),
            [2.0, 5.0]
        );
        // The buffer itself keeps every field.
        let all = &b.snapshot("m", 0, DAY, DAY, &|_| true).unwrap()[0];
        assert_eq!(all.batch.num_columns(), 5);
    }

    #[test]
    fn fields_in_any_order_or_subset_land_in_their_own_columns() {
        let mut b = Buffer::default();
        insert(
            &mut b,
            "m a=1,b=10 1\nm b=20,a=2 2\nm b=30 3\nm a=4,b=40 4\nm c=5i 5\nm a=6,b=60 6",
        );
        let s = &b.snapshot("m", 0, DAY, DAY, &|_| true).unwrap()[0];
        let col = |n: &str| s.batch.column_by_name(n).unwrap().clone();
        let a = col("a");
        let a = a.as_primitive::<Float64Type>();
        let bcol = col("b");
        let bcol = bcol.as_primitive::<Float64Type>();
        let got: Vec<(Option<f64>, Option<f64>)> = (0..6)
            .map(|i| {
                (
                    a.is_valid(i).then(|| a.value(i)),
                    bcol.is_valid(i).then(|| bcol.value(i)),
                )
            })
            .collect();
        assert_eq!(
            got,
            vec![
                (Some(1.0), Some(10.0)),
                (Some(2.0), Some(20.0)),
                (None, Some(30.0)),
                (Some(4.0), Some(40.0)),
                (None, None),
                (Some(6.0), Some(60.0)),
            ]
        );
        assert_eq!(col("c").null_count(), 5);
    }

    #[test]
    fn negative_times_partition_correctly_and_drain_empties() {
        let mut b = Buffer::default();
        insert(&mut b, "m v=1 -1\nm v=2 0");
        let drained = b.drain().unwrap();
        assert_eq!(
            drained.iter().map(|s| s.partition).collect::<Vec<_>>(),
            vec![-DAY, 0]
        );
        assert!(b.is_empty() && b.bytes() == 0);
    }

    #[test]
    fn drop_before_removes_whole_partitions() {
        let mut b = Buffer::default();
        insert(
            &mut b,
            &format!("m v=1 5\nm v=2 {}\nm v=3 {}", DAY + 1, 2 * DAY + 1),
        );
        assert_eq!(b.drop_before("m", 2 * DAY, DAY), 2);
        assert_eq!(b.rows(), 1);
        assert_eq!(
            b.snapshot("m", 0, 3 * DAY, DAY, &|_| true).unwrap()[0].partition,
            2 * DAY
        );
    }
}
