//! `selector_first(value, time)` and `selector_last(value, time)`: the value at the earliest
//! or latest time of each group, together with that time, as InfluxDB 3 has them.
//!
//! Each returns a struct `{value, time}`; pick a field with `['value']` or `['time']`:
//!
//! ```sql
//! SELECT host, selector_last(usage_user, time)['value'] AS usage,
//!              selector_last(usage_user, time)['time']  AS at
//! FROM cpu GROUP BY host
//! ```
//!
//! Rows whose value or time is NULL are skipped. On equal times the first row seen wins for
//! `selector_first` and the last one for `selector_last`.

use std::sync::Arc;

use arrow::array::{Array, ArrayRef, AsArray, StructArray};
use arrow::compute::cast;
use arrow::datatypes::{DataType, Field, FieldRef, Fields, TimeUnit, TimestampNanosecondType};
use datafusion::common::{DFSchema, Result, ScalarValue, plan_err};
use datafusion::logical_expr::GetFieldAccess;
use datafusion::logical_expr::function::{AccumulatorArgs, StateFieldsArgs};
use datafusion::logical_expr::planner::{ExprPlanner, PlannerResult, RawFieldAccessExpr};
use datafusion::logical_expr::utils::format_state_name;
use datafusion::logical_expr::{
    Accumulator, AggregateUDF, AggregateUDFImpl, Signature, Volatility,
};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Kind {
    First,
    Last,
}

/// One of the two selectors.
#[derive(Debug, PartialEq, Eq, Hash)]
pub struct Selector {
    kind: Kind,
    signature: Signature,
}

/// `selector_first(value, time)`.
pub fn selector_first() -> AggregateUDF {
    AggregateUDF::new_from_impl(Selector {
        kind: Kind::First,
        signature: Signature::any(2, Volatility::Immutable),
    })
}

/// `selector_last(value, time)`.
pub fn selector_last() -> AggregateUDF {
    AggregateUDF::new_from_impl(Selector {
        kind: Kind::Last,
        signature: Signature::any(2, Volatility::Immutable),
    })
}

/// The type of the time column as the selector keeps it: nanoseconds, same time zone.
fn time_type(t: &DataType) -> Result<DataType> {
    match t {
        DataType::Timestamp(_, tz) => Ok(DataType::Timestamp(TimeUnit::Nanosecond, tz.clone())),
        other => plan_err!("the second argument of a selector must be a timestamp, not {other}"),
    }
}

fn struct_fields(value: &DataType, time: &DataType) -> Result<Fields> {
    Ok(Fields::from(vec![
        Field::new("value", value.clone(), true),
        Field::new("time", time_type(time)?, true),
    ]))
}

impl AggregateUDFImpl for Selector {
    fn name(&self) -> &str {
        match self.kind {
            Kind::First => "selector_first",
            Kind::Last => "selector_last",
        }
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn return_type(&self, arg_types: &[DataType]) -> Result<DataType> {
        Ok(DataType::Struct(struct_fields(
            &arg_types[0],
            &arg_types[1],
        )?))
    }

    fn accumulator(&self, args: AccumulatorArgs<'_>) -> Result<Box<dyn Accumulator>> {
        let DataType::Struct(fields) = args.return_field.data_type() else {
            return plan_err!("{} returns a struct", self.name());
        };
        let value = ScalarValue::try_from(fields[0].data_type())?;
        Ok(Box::new(SelectorAccumulator {
            kind: self.kind,
            fields: fields.clone(),
            value,
            time: None,
        }))
    }

    fn state_fields(&self, args: StateFieldsArgs<'_>) -> Result<Vec<FieldRef>> {
        let (value, time) = (
            args.input_fields[0].data_type(),
            args.input_fields[1].data_type(),
        );
        Ok(vec![
            Arc::new(Field::new(
                format_state_name(args.name, "value"),
                value.clone(),
                true,
            )),
            Arc::new(Field::new(
                format_state_name(args.name, "time"),
                time_type(time)?,
                true,
            )),
        ])
    }
}

#[derive(Debug)]
struct SelectorAccumulator {
    kind: Kind,
    fields: Fields,
    value: ScalarValue,
    time: Option<i64>,
}

impl SelectorAccumulator {
    /// Takes the best row of (values, times) if it beats the current one.
    fn update(&mut self, values: &ArrayRef, times: &ArrayRef) -> Result<()> {
        let times = cast(
            times,
            &DataType::Timestamp(TimeUnit::Nanosecond, time_zone(&self.fields)),
        )?;
        let times = times.as_primitive::<TimestampNanosecondType>();
        let mut best = None;
        let mut best_time = self.time;
        for i in 0..values.len() {
            if values.is_null(i) || times.is_null(i) {
                continue;
            }
            let t = times.value(i);
            let better = match (self.kind, best_time) {
                (_, None) => true,
                (Kind::First, Some(b)) => t < b,
                (Kind::Last, Some(b)) => t >= b,
            };
            if better {
                best = Some(i);
                best_time = Some(t);
            }
        }
        if let Some(i) = best {
            self.value = ScalarValue::try_from_array(values, i)?;
            self.time = best_time;
        }
        Ok(())
    }
}

fn time_zone(fields: &Fields) -> Option<Arc<str>> {
    match fields[1].data_type() {
        DataType::Timestamp(_, tz) => tz.clone(),
        _ => None,
    }
}

impl Accumulator for SelectorAccumulator {
    fn update_batch(&mut self, values: &[ArrayRef]) -> Result<()> {
        self.update(&values[0], &values[1])
    }

    fn merge_batch(&mut self, states: &[ArrayRef]) -> Result<()> {
        self.update(&states[0], &states[1])
    }

    fn state(&mut self) -> Result<Vec<ScalarValue>> {
        Ok(vec![
            self.value.clone(),
            ScalarValue::TimestampNanosecond(self.time, time_zone(&self.fields)),
        ])
    }

    fn evaluate(&mut self) -> Result<ScalarValue> {
        let time = ScalarValue::TimestampNanosecond(self.time, time_zone(&self.fields));
        let array = StructArray::try_new(
            self.fields.clone(),
            vec![self.value.to_array()?, time.to_array()?],
            None,
        )?;
        Ok(ScalarValue::Struct(Arc::new(array)))
    }

    fn size(&self) -> usize {
        std::mem::size_of_val(self) + self.value.size() - std::mem::size_of_val(&self.value)
    }
}

/// Plans `struct_expr['field']` as `get_field`, so a selector's fields can be picked. (This
/// comes with DataFusion's `nested_expressions` feature, which the build leaves out.)
#[derive(Debug)]
pub struct FieldAccessPlanner;

impl ExprPlanner for FieldAccessPlanner {
    fn plan_field_access(
        &self,
        expr: RawFieldAccessExpr,
        _schema: &DFSchema,
    ) -> Result<PlannerResult<RawFieldAccessExpr>> {
        match expr.field_access {
            GetFieldAccess::NamedStructField { name } => Ok(PlannerResult::Planned(
                datafusion::functions::core::expr_fn::get_field(expr.expr, name),
            )),
            _ => Ok(PlannerResult::Original(expr)),
        }
    }
}
