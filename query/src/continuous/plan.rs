//! What the runtime needs to know about an `INTO` query's `SELECT`, read from its syntax tree:
//! the one measurement it reads, its time bucket (width and origin), which output columns are
//! grouping keys (they become tags), and how to restrict it to a window of buckets.

use datafusion::sql::parser::{DFParser, Statement as DfStatement};
use datafusion::sql::sqlparser::ast::{
    self, Expr, FunctionArg, FunctionArgExpr, FunctionArguments, GroupByExpr, Query, SelectItem,
    SetExpr, TableFactor, Value,
};
use datafusion::sql::sqlparser::dialect::PostgreSqlDialect;
use datafusion::sql::sqlparser::parser::Parser;

use super::parse_duration;
use crate::{Error, Result};

/// A time bucket: `[origin + k·width, origin + (k+1)·width)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Bucket {
    pub width: i64,
    pub origin: i64,
}

impl Bucket {
    /// The start of the bucket holding `t`.
    pub fn floor(&self, t: i64) -> i64 {
        t - (t - self.origin).rem_euclid(self.width)
    }
}

/// An `INTO` query, understood.
#[derive(Debug, Clone)]
pub(crate) struct Incremental {
    /// The measurement it reads.
    pub source: String,
    pub bucket: Bucket,
    /// Output columns that are grouping keys: strings among them are written as tags.
    pub keys: Vec<String>,
    query: Box<Query>,
    /// What `time` is qualified with in the window filter (the table's alias or name).
    qualifier: String,
}

fn error(message: impl Into<String>) -> Error {
    Error::Query(message.into())
}

/// Parses `sql` as one `SELECT` statement; `select_at` is where it starts in the statement it
/// was written in, so that errors point there.
pub(crate) fn parse_select(sql: &str, select_at: Option<(u64, u64)>) -> Result<Box<Query>> {
    let text = match select_at {
        Some(at) => super::statement::positioned(sql, at),
        None => sql.to_owned(),
    };
    let mut statements = DFParser::parse_sql_with_dialect(&text, &PostgreSqlDialect {})
        .map_err(|e| error(format!("the query does not parse: {e}")))?;
    if statements.len() != 1 {
        return Err(error("a continuous query is one SELECT statement"));
    }
    match statements.pop_front() {
        Some(DfStatement::Statement(s)) => match *s {
            ast::Statement::Query(q) => Ok(q),
            other => Err(error(format!(
                "a continuous query is a SELECT, not {}",
                first_words(&other.to_string())
            ))),
        },
        _ => Err(error("a continuous query is a SELECT statement")),
    }
}

fn first_words(s: &str) -> String {
    s.split_whitespace().take(2).collect::<Vec<_>>().join(" ")
}

impl Incremental {
    /// Checks that `query` can run incrementally and says how.
    pub fn new(query: Box<Query>) -> Result<Self> {
        let SetExpr::Select(select) = query.body.as_ref() else {
            return Err(error(
                "an INTO continuous query is one SELECT … GROUP BY (no UNION or VALUES)",
            ));
        };
        let [from] = select.from.as_slice() else {
            return Err(error(
                "an INTO continuous query reads one measurement: FROM <measurement>",
            ));
        };
        if !from.joins.is_empty() {
            return Err(error(
                "an INTO continuous query reads one measurement: joins cannot be computed a bucket at a time",
            ));
        }
        let TableFactor::Table {
            name, alias, args, ..
        } = &from.relation
        else {
            return Err(error(
                "an INTO continuous query reads one measurement: FROM <measurement>, not a subquery",
            ));
        };
        if args.is_some() {
            return Err(error(
                "an INTO continuous query reads a measurement, not a table function",
            ));
        }
        let source = name
            .0
            .last()
            .and_then(|p| p.as_ident())
            .map(|i| i.value.clone())
            .ok_or_else(|| error("FROM names no measurement"))?;
        let qualifier = alias
            .as_ref()
            .map_or_else(|| source.clone(), |a| a.name.value.clone());

        let mut bucket = None;
        let mut outputs = Vec::with_capacity(select.projection.len());
        for item in &select.projection {
            let (expr, name) = match item {
                SelectItem::ExprWithAlias { expr, alias } => (expr, Some(alias.value.clone())),
                SelectItem::UnnamedExpr(expr) => (expr, output_name(expr)),
                _ => {
                    return Err(error(
                        "an INTO continuous query names its columns: SELECT * is not grouped by a time bucket",
                    ));
                }
            };
            if let Some(b) = time_bucket(expr)? {
                if name.as_deref() != Some("time") {
                    return Err(error(
                        "name the time bucket time: SELECT date_bin(INTERVAL '1 minute', time) AS time, …",
                    ));
                }
                bucket = Some(b);
            }
            outputs.push((expr.clone(), name));
        }
        let Some(bucket) = bucket else {
            return Err(error(
                "an INTO continuous query is grouped by a time bucket: SELECT date_bin(INTERVAL '1 minute', time) AS time, … GROUP BY 1, …",
            ));
        };
        let GroupByExpr::Expressions(group, _) = &select.group_by else {
            return Err(error("GROUP BY ALL is not supported in a continuous query"));
        };
        let mut keys = Vec::new();
        for g in group {
            let name = match g {
                Expr::Value(v) => match &v.value {
                    Value::Number(n, _) => n
                        .parse::<usize>()
                        .ok()
                        .and_then(|i| i.checked_sub(1))
                        .and_then(|i| outputs.get(i))
                        .and_then(|(_, n)| n.clone()),
                    _ => None,
                },
                Expr::Identifier(id)
                    if outputs.iter().any(|(_, n)| n.as_deref() == Some(&id.value)) =>
                {
                    Some(id.value.clone())
                }
                other => outputs
                    .iter()
                    .find(|(e, _)| e == other)
                    .and_then(|(_, n)| n.clone()),
            };
            if let Some(n) = name {
                keys.push(n);
            }
        }
        if !keys.iter().any(|k| k == "time") {
            return Err(error(
                "an INTO continuous query is grouped by its time bucket: add it to GROUP BY (GROUP BY 1, … or GROUP BY time, …)",
            ));
        }
        Ok(Self {
            source,
            bucket,
            keys,
            query,
            qualifier,
        })
    }

    /// The query restricted to the rows with `start <= time < end` (ns).
    pub fn window_sql(&self, start: i64, end: i64) -> String {
        let mut query = self.query.clone();
        let window = format!(
            "\"{q}\".\"time\" >= to_timestamp_nanos({start}) AND \"{q}\".\"time\" < to_timestamp_nanos({end})",
            q = self.qualifier.replace('"', "\"\"")
        );
        // Cannot fail: the text is built above from quoted names and integers.
        let window = Parser::new(&PostgreSqlDialect {})
            .try_with_sql(&window)
            .and_then(|mut p| p.parse_expr())
            .expect("the window filter parses");
        if let SetExpr::Select(select) = query.body.as_mut() {
            select.selection = Some(match select.selection.take() {
                None => window,
                Some(existing) => Expr::BinaryOp {
                    left: Box::new(Expr::Nested(Box::new(existing))),
                    op: ast::BinaryOperator::And,
                    right: Box::new(window),
                },
            });
        }
        query.to_string()
    }
}

/// The name DataFusion gives an unaliased column expression, where it is a plain column.
fn output_name(expr: &Expr) -> Option<String> {
    match expr {
        Expr::Identifier(id) => Some(id.value.clone()),
        Expr::CompoundIdentifier(ids) => ids.last().map(|i| i.value.clone()),
        _ => None,
    }
}

/// The bucket of `date_bin(<interval>, time[, <origin>])` or `date_trunc('<unit>', time)`.
fn time_bucket(expr: &Expr) -> Result<Option<Bucket>> {
    let Expr::Function(f) = expr else {
        return Ok(None);
    };
    let name = f.name.to_string().to_ascii_lowercase();
    if name != "date_bin" && name != "date_trunc" {
        return Ok(None);
    }
    let FunctionArguments::List(list) = &f.args else {
        return Ok(None);
    };
    let args: Vec<&Expr> = list
        .args
        .iter()
        .filter_map(|a| match a {
            FunctionArg::Unnamed(FunctionArgExpr::Expr(e)) => Some(e),
            _ => None,
        })
        .collect();
    let on_time = args.get(1).and_then(|e| output_name(e)).as_deref() == Some("time");
    if !on_time {
        return Err(error(format!(
            "{name}(…) buckets the source's time column: {name}(…, time)"
        )));
    }
    if name == "date_bin" {
        let width = interval(args[0])?;
        let origin = match args.get(2) {
            None => 0,
            Some(e) => timestamp(e)?,
        };
        return Ok(Some(Bucket { width, origin }));
    }
    let unit = match args[0] {
        Expr::Value(v) => match &v.value {
            Value::SingleQuotedString(s) => s.to_ascii_lowercase(),
            _ => String::new(),
        },
        _ => String::new(),
    };
    const S: i64 = 1_000_000_000;
    let (width, origin) = match unit.as_str() {
        "microsecond" | "microseconds" => (1_000, 0),
        "millisecond" | "milliseconds" => (1_000_000, 0),
        "second" => (S, 0),
        "minute" => (60 * S, 0),
        "hour" => (3_600 * S, 0),
        "day" => (86_400 * S, 0),
        // 1970-01-05 was a Monday, where date_trunc starts its weeks.
        "week" => (7 * 86_400 * S, 4 * 86_400 * S),
        _ => {
            return Err(error(format!(
                "date_trunc({unit:?}, time): a continuous query needs buckets of a fixed length (microsecond to week); use date_bin for others"
            )));
        }
    };
    Ok(Some(Bucket { width, origin }))
}

fn interval(e: &Expr) -> Result<i64> {
    let text = match e {
        Expr::Interval(i) => {
            let value = match i.value.as_ref() {
                Expr::Value(v) => match &v.value {
                    Value::SingleQuotedString(s) => s.clone(),
                    other => other.to_string(),
                },
                other => other.to_string(),
            };
            match &i.leading_field {
                Some(f) => format!("{value} {f}"),
                None => value,
            }
        }
        Expr::Value(v) => match &v.value {
            Value::SingleQuotedString(s) => s.clone(),
            _ => String::new(),
        },
        _ => String::new(),
    };
    let width = parse_duration(&text).map_err(|_| {
        error(format!(
            "date_bin's width must be a constant interval such as INTERVAL '1 minute', not {e}"
        ))
    })?;
    match i64::try_from(width.as_nanos()) {
        Ok(w) if w > 0 => Ok(w),
        _ => Err(error(format!(
            "date_bin's width {e} is not a usable interval"
        ))),
    }
}

fn timestamp(e: &Expr) -> Result<i64> {
    let text = match e {
        Expr::Value(v) => match &v.value {
            Value::SingleQuotedString(s) => Some(s.clone()),
            _ => None,
        },
        Expr::TypedString(t) => match &t.value.value {
            Value::SingleQuotedString(s) => Some(s.clone()),
            _ => None,
        },
        Expr::Cast { expr, .. } => match expr.as_ref() {
            Expr::Value(v) => match &v.value {
                Value::SingleQuotedString(s) => Some(s.clone()),
                _ => None,
            },
            _ => None,
        },
        _ => None,
    };
    text.and_then(|t| arrow::compute::kernels::cast_utils::string_to_timestamp_nanos(&t).ok())
        .ok_or_else(|| {
            error(format!(
                "date_bin's origin must be a constant time such as TIMESTAMP '2026-01-01T00:00:00Z', not {e}"
            ))
        })
}
