//! Float columns stored as scaled integers.
//!
//! Most metric floats are decimals of a few digits: integers sent as float64 (every
//! Prometheus sample is one), or text such as `usage_user=12.5`. Stored as floats they
//! compress badly: TSBS's integer values written as floats took 0.60 bytes each, against
//! 0.40 as integers. So a segment stores a float column whose every value `v` is exactly
//! `m / 10^e` (bit for bit, with `|m| < 2^53`) as the integers `m`, delta-encoded like an
//! integer field, and keeps `e` in the column's metadata in the file ([`SCALE_KEY`]); a read
//! divides by `10^e` and gets the very same floats back.
//!
//! Programs also compute decimals by multiplying: node_exporter serves a disk's busy time as
//! `ms × 0.001`, so 563 ms is `0.5630000000000001`, not the float nearest 0.563. A column that
//! is not all parsed decimals is tried that way too ([`Scale::inverse`]: `v = m × 10^-e`, with
//! `10^-e` the float nearest it, as the program's constant is). A column with any other
//! value (a ratio such as 1/3, NaN, ±∞, −0) stays float in that segment. This is the core
//! of ALP (Afroozeh, Kuffó and Boncz, SIGMOD 2023), whose decoding multiplies by an inverse
//! power of ten, and of VictoriaMetrics' decimal conversion, per segment and column rather
//! than per vector.
//!
//! Why a read gets the value back: `m` and `10^e` are exact in a float64 (`|m| < 2^53`,
//! `e ≤ 22`), and IEEE division is correctly rounded, so `m / 10^e` is the float nearest the
//! decimal, which is what the write checked it to be. A value exact at scale `e` is also exact
//! at any larger scale while `|m| × 10^k` stays below 2^51 (then `v × 10^(e+k)` rounds to
//! `m × 10^k`, and `m × 10^k / 10^(e+k)` is the same rational number): compaction relies on
//! that to merge segments of different scales without reading their values. Multiplying by
//! `10^-e` has no such rule, so segments scaled that way merge only at one common scale.

use std::collections::BTreeMap;
use std::sync::Arc;

use arrow::array::{Array, ArrayRef, AsArray, Float64Array, Int64Array, RecordBatch};
use arrow::datatypes::{DataType, Field, Float64Type, Int64Type, Schema, SchemaRef};

/// The key, in a stored field's metadata, of a scaled column's decimal exponent.
pub const SCALE_KEY: &str = "forestall.decimal_scale";
/// The key, in a stored field's metadata, present (`true`) when a scaled column multiplies by
/// `10^-e` rather than divides by `10^e`.
pub const INVERSE_KEY: &str = "forestall.decimal_inverse";

/// The largest exponent tried: `10^15` keeps a cent-precise value below 2^53 up to 90 billion,
/// and a value needing more digits than that is not a short decimal.
pub const MAX_SCALE: u8 = 15;

/// 2^51: below it, a value exact at one scale is exact at every larger one (module docs).
const SAFE: f64 = 2_251_799_813_685_248.0;
/// 2^53: integers below it are exact in a float64.
const EXACT: f64 = 9_007_199_254_740_992.0;

const POW10: [f64; MAX_SCALE as usize + 1] = [
    1e0, 1e1, 1e2, 1e3, 1e4, 1e5, 1e6, 1e7, 1e8, 1e9, 1e10, 1e11, 1e12, 1e13, 1e14, 1e15,
];
/// The floats nearest `10^-e`, as a program's `0.001` is.
const INV10: [f64; MAX_SCALE as usize + 1] = [
    1e0, 1e-1, 1e-2, 1e-3, 1e-4, 1e-5, 1e-6, 1e-7, 1e-8, 1e-9, 1e-10, 1e-11, 1e-12, 1e-13, 1e-14,
    1e-15,
];

/// How a scaled column's integers `m` turn back into its floats.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Scale {
    /// The decimal exponent `e`, at most [`MAX_SCALE`].
    pub exp: u8,
    /// `v = m × 10^-e` (a decimal a program computed by multiplying) rather than
    /// `v = m / 10^e` (the float nearest the decimal, as text parses).
    pub inverse: bool,
}

impl Scale {
    /// Dividing by `10^e`.
    pub const fn div(exp: u8) -> Self {
        Self {
            exp,
            inverse: false,
        }
    }

    /// Multiplying by `10^-e`.
    pub const fn inverse(exp: u8) -> Self {
        Self { exp, inverse: true }
    }

    fn decode(self, m: i64) -> f64 {
        let e = usize::from(self.exp);
        if self.inverse {
            m as f64 * INV10[e]
        } else {
            m as f64 / POW10[e]
        }
    }

    /// `m` where `v` is exactly what `m` decodes to and `|m| < 2^53`.
    fn encode(self, v: f64) -> Option<i64> {
        let m = (v * POW10[usize::from(self.exp)]).round();
        // NaN fails this too. The check decodes the integer stored, so that −0 (stored as 0)
        // fails it.
        if m.is_nan() || m.abs() >= EXACT {
            return None;
        }
        let m = m as i64;
        (self.decode(m).to_bits() == v.to_bits()).then_some(m)
    }
}

/// The smallest scale at which every (non-null) value of `values` is stored exactly, if any
/// exponent up to [`MAX_SCALE`] does: dividing if it can, multiplying otherwise.
pub fn fit(values: &Float64Array) -> Option<Scale> {
    fit_as(values, Scale::div(0)).or_else(|| fit_as(values, Scale::inverse(0)))
}

fn fit_as(values: &Float64Array, mut scale: Scale) -> Option<Scale> {
    let mut max_abs = 0f64;
    for (i, &v) in values.values().iter().enumerate() {
        if values.is_null(i) {
            continue;
        }
        while scale.encode(v).is_none() {
            scale.exp += 1;
            if scale.exp > MAX_SCALE {
                return None;
            }
        }
        max_abs = max_abs.max(v.abs());
    }
    // Dividing, values that fit at a smaller exponent fit at this one unless they are large
    // (module docs); multiplying, there is no such rule. Otherwise check them all.
    if !scale.inverse && max_abs * POW10[usize::from(scale.exp)] < SAFE {
        return Some(scale);
    }
    let all = values.iter().flatten().all(|v| scale.encode(v).is_some());
    all.then_some(scale)
}

/// How a segment stores its float columns: the columns stored as scaled integers, with their
/// exponent. Every other column is stored as it is.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Scales(BTreeMap<String, Scale>);

impl Scales {
    /// The scales that store every float column of `batch` exactly, for those that have one.
    pub fn fit(batch: &RecordBatch) -> Self {
        let schema = batch.schema();
        Self(
            schema
                .fields()
                .iter()
                .zip(batch.columns())
                .filter_map(|(f, c)| {
                    let values = c.as_primitive_opt::<Float64Type>()?;
                    Some((f.name().clone(), fit(values)?))
                })
                .collect(),
        )
    }

    /// The scales that hold every input segment's values of each float column: `inputs`
    /// gives, per segment, each column's stored form ([`Stored`]; a column a segment lacks is
    /// left out). A column that any segment stores as floats, or whose largest value would not
    /// stay exact at the common scale, is stored as floats; so is one that segments multiply
    /// back at different scales, or that some multiply and others divide.
    pub fn merge<'a>(inputs: impl IntoIterator<Item = &'a BTreeMap<String, Stored>>) -> Self {
        let mut common: BTreeMap<String, Option<Vec<(Scale, u64)>>> = BTreeMap::new();
        for input in inputs {
            for (name, stored) in input {
                let slot = common
                    .entry(name.clone())
                    .or_insert_with(|| Some(Vec::new()));
                match (slot.as_mut(), stored) {
                    (Some(all), Stored::Scaled { scale, max_abs }) => all.push((*scale, *max_abs)),
                    (_, Stored::Float) => *slot = None,
                    (None, _) => {}
                }
            }
        }
        Self(
            common
                .into_iter()
                .filter_map(|(name, parts)| {
                    let parts = parts?;
                    let first = parts.first()?.0;
                    if first.inverse || parts.iter().any(|(s, _)| s.inverse) {
                        let same = parts.iter().all(|&(s, _)| s == first);
                        return same.then_some((name, first));
                    }
                    let e = parts.iter().map(|&(s, _)| s.exp).max()?;
                    let fits = parts.iter().all(|&(s, max_abs)| {
                        s.exp == e
                            || 10u64
                                .checked_pow(u32::from(e - s.exp))
                                .and_then(|k| max_abs.checked_mul(k))
                                .is_some_and(|m| (m as f64) < SAFE)
                    });
                    fits.then_some((name, Scale::div(e)))
                })
                .collect(),
        )
    }

    /// The scale of `column`, if it is stored scaled.
    pub fn get(&self, column: &str) -> Option<Scale> {
        self.0.get(column).copied()
    }

    /// The schema a segment of `schema` is stored with: scaled columns as `Int64` carrying
    /// their exponent.
    pub fn stored_schema(&self, schema: &Schema) -> SchemaRef {
        let fields: Vec<Arc<Field>> = schema
            .fields()
            .iter()
            .map(|f| match self.get(f.name()) {
                Some(scale) if f.data_type() == &DataType::Float64 => {
                    let mut meta = std::collections::HashMap::new();
                    meta.insert(SCALE_KEY.to_string(), scale.exp.to_string());
                    if scale.inverse {
                        meta.insert(INVERSE_KEY.to_string(), "true".to_string());
                    }
                    Arc::new(
                        Field::new(f.name(), DataType::Int64, f.is_nullable()).with_metadata(meta),
                    )
                }
                _ => Arc::clone(f),
            })
            .collect();
        Arc::new(Schema::new_with_metadata(fields, schema.metadata().clone()))
    }

    /// `batch` (of the logical schema) as stored under `stored` (from
    /// [`Scales::stored_schema`]). A value that does not fit its column's scale is an error:
    /// the scales were fitted to these values, so it would be a bug, and storing it rounded
    /// would lose data.
    pub fn encode(&self, batch: &RecordBatch, stored: &SchemaRef) -> Result<RecordBatch, String> {
        if self.0.is_empty() {
            return Ok(batch.clone());
        }
        let mut columns: Vec<ArrayRef> = Vec::with_capacity(batch.num_columns());
        for (f, c) in batch.schema().fields().iter().zip(batch.columns()) {
            let (Some(scale), Some(values)) =
                (self.get(f.name()), c.as_primitive_opt::<Float64Type>())
            else {
                columns.push(Arc::clone(c));
                continue;
            };
            let mut ints = Vec::with_capacity(values.len());
            for (i, &v) in values.values().iter().enumerate() {
                match scale.encode(v) {
                    Some(m) => ints.push(m),
                    // The value under a null means nothing.
                    None if values.is_null(i) => ints.push(0),
                    None => {
                        return Err(format!(
                            "{}: {v:?} does not fit the column's scale {scale:?}",
                            f.name()
                        ));
                    }
                }
            }
            let ints = Int64Array::new(ints.into(), values.nulls().cloned());
            columns.push(Arc::new(ints));
        }
        RecordBatch::try_new(Arc::clone(stored), columns).map_err(|e| e.to_string())
    }
}

/// How one segment stores one float column (see [`Scales::merge`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stored {
    Float,
    /// As integers `m` that `scale` turns back into floats, the largest `|m|` being
    /// `max_abs`.
    Scaled {
        scale: Scale,
        max_abs: u64,
    },
}

/// The scale of a stored field, if it is a scaled float column.
pub fn scale_of(field: &Field) -> Option<Scale> {
    let meta = field.metadata();
    let exp: u8 = meta.get(SCALE_KEY)?.parse().ok()?;
    let inverse = meta.get(INVERSE_KEY).is_some_and(|v| v == "true");
    (field.data_type() == &DataType::Int64 && exp <= MAX_SCALE).then_some(Scale { exp, inverse })
}

/// A stored schema as its columns are read: scaled columns as `Float64` again.
pub fn logical_schema(stored: &Schema) -> SchemaRef {
    let fields: Vec<Arc<Field>> = stored
        .fields()
        .iter()
        .map(|f| match scale_of(f) {
            Some(_) => Arc::new(Field::new(f.name(), DataType::Float64, f.is_nullable())),
            None => Arc::clone(f),
        })
        .collect();
    Arc::new(Schema::new_with_metadata(fields, stored.metadata().clone()))
}

/// A batch read from a segment with its scaled columns turned back into floats.
pub fn decode(batch: RecordBatch) -> Result<RecordBatch, String> {
    let schema = batch.schema();
    if !schema.fields().iter().any(|f| scale_of(f).is_some()) {
        return Ok(batch);
    }
    let logical = logical_schema(&schema);
    let columns: Vec<ArrayRef> = schema
        .fields()
        .iter()
        .zip(batch.columns())
        .map(
            |(f, c)| match (scale_of(f), c.as_primitive_opt::<Int64Type>()) {
                (Some(scale), Some(ints)) => {
                    let e = usize::from(scale.exp);
                    let floats: Float64Array = if scale.inverse {
                        let p = INV10[e];
                        ints.unary(|m| m as f64 * p)
                    } else {
                        let p = POW10[e];
                        ints.unary(|m| m as f64 / p)
                    };
                    Arc::new(floats) as ArrayRef
                }
                _ => Arc::clone(c),
            },
        )
        .collect();
    let options = arrow::array::RecordBatchOptions::new().with_row_count(Some(batch.num_rows()));
    RecordBatch::try_new_with_options(logical, columns, &options).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests;
