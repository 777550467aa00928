//! InfluxDB line protocol (v1 and v2 share one text format).
//!
//! ```text
//! measurement[,tag_key=tag_value...] field_key=field_value[,field_key=field_value...] [timestamp]
//! ```
//!
//! The rules follow InfluxDB's specification:
//! * measurement: `,` ` ` and `\` are escaped with a backslash;
//! * tag keys, tag values and field keys: `,` `=` ` ` and `\` are escaped;
//! * a backslash before any other character is a literal backslash;
//! * string field values are double-quoted, with `\"` and `\\` as their only escapes;
//! * field values: float (`1`, `-1.5e3`), integer (`1i`), unsigned (`1u`), boolean
//!   (`t T true True TRUE f F false False FALSE`) and string;
//! * the timestamp is optional, an integer in the request's [`Precision`];
//! * blank lines and lines whose first non-blank character is `#` are skipped.
//!
//! Parsing borrows from the request body: a name or value is copied only when it contains an
//! escape. Every error carries its 1-based line number and a reason.

use std::borrow::Cow;
use std::fmt::{self, Write as _};

/// A field value as written.
#[derive(Debug, Clone, PartialEq)]
pub enum FieldValue<'a> {
    Float(f64),
    Integer(i64),
    UInteger(u64),
    Boolean(bool),
    String(Cow<'a, str>),
}

impl FieldValue<'_> {
    /// The column type this value requires.
    pub fn field_type(&self) -> FieldType {
        match self {
            FieldValue::Float(_) => FieldType::Float,
            FieldValue::Integer(_) => FieldType::Integer,
            FieldValue::UInteger(_) => FieldType::UInteger,
            FieldValue::Boolean(_) => FieldType::Boolean,
            FieldValue::String(_) => FieldType::String,
        }
    }
}

/// The type of a field column, fixed by its first write.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FieldType {
    Float,
    Integer,
    UInteger,
    Boolean,
    String,
}

impl fmt::Display for FieldType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            FieldType::Float => "float",
            FieldType::Integer => "integer",
            FieldType::UInteger => "unsigned",
            FieldType::Boolean => "boolean",
            FieldType::String => "string",
        })
    }
}

/// Unit of the timestamps in a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Precision {
    #[default]
    Nanoseconds,
    Microseconds,
    Milliseconds,
    Seconds,
    Minutes,
    Hours,
}

impl Precision {
    /// Parses the `precision` query parameter of `/write` (v1: `n u ms s m h`) and
    /// `/api/v2/write` (v2: `ns us ms s`).
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "ns" | "n" => Precision::Nanoseconds,
            "us" | "u" | "µ" | "µs" => Precision::Microseconds,
            "ms" => Precision::Milliseconds,
            "s" => Precision::Seconds,
            "m" => Precision::Minutes,
            "h" => Precision::Hours,
            _ => return None,
        })
    }

    /// Nanoseconds per unit.
    pub fn multiplier(self) -> i64 {
        match self {
            Precision::Nanoseconds => 1,
            Precision::Microseconds => 1_000,
            Precision::Milliseconds => 1_000_000,
            Precision::Seconds => 1_000_000_000,
            Precision::Minutes => 60_000_000_000,
            Precision::Hours => 3_600_000_000_000,
        }
    }

    /// A stable one-byte code, used by the WAL.
    pub fn code(self) -> u8 {
        match self {
            Precision::Nanoseconds => 0,
            Precision::Microseconds => 1,
            Precision::Milliseconds => 2,
            Precision::Seconds => 3,
            Precision::Minutes => 4,
            Precision::Hours => 5,
        }
    }

    /// Inverse of [`Precision::code`].
    pub fn from_code(code: u8) -> Option<Self> {
        Some(match code {
            0 => Precision::Nanoseconds,
            1 => Precision::Microseconds,
            2 => Precision::Milliseconds,
            3 => Precision::Seconds,
            4 => Precision::Minutes,
            5 => Precision::Hours,
            _ => return None,
        })
    }
}

/// One parsed line.
#[derive(Debug, Clone, PartialEq)]
pub struct ParsedLine<'a> {
    /// 1-based line number in the request body.
    pub line_number: usize,
    /// The line as written, without its line ending.
    pub raw: &'a str,
    /// The measurement and tag section as written (`cpu,host=a`), still escaped. Lines of one
    /// series written the same way share it, which makes it a cheap series cache key.
    pub series_raw: &'a str,
    pub measurement: Cow<'a, str>,
    pub tags: Vec<(Cow<'a, str>, Cow<'a, str>)>,
    pub fields: Vec<(Cow<'a, str>, FieldValue<'a>)>,
    /// Nanoseconds since the Unix epoch (the request's default time when the line had none).
    pub timestamp: i64,
}

impl ParsedLine<'_> {
    /// The canonical series key: measurement and tags sorted by key, escaped as line
    /// protocol (`cpu,host=a,region=eu`). Two lines belong to the same series exactly when
    /// their canonical keys are equal.
    pub fn series_key(&self) -> String {
        let mut tags: Vec<_> = self.tags.iter().collect();
        tags.sort_by(|a, b| a.0.cmp(&b.0));
        let mut key = String::with_capacity(self.series_raw.len());
        write_series(
            &mut key,
            &self.measurement,
            tags.into_iter().map(|(k, v)| (k.as_ref(), v.as_ref())),
        );
        key
    }

    /// Writes the line back as line protocol with a nanosecond timestamp. Parsing the output
    /// gives back an equal line (the round trip is property-tested).
    pub fn write_to(&self, out: &mut String) {
        write_point(
            out,
            &self.measurement,
            self.tags.iter().map(|(k, v)| (k.as_ref(), v.as_ref())),
            self.fields.iter().map(|(k, v)| (k.as_ref(), v)),
            self.timestamp,
        );
    }
}

/// Writes one point as a line of line protocol (without its newline), escaped as
/// [`parse_lines`] reads it, the timestamp in nanoseconds.
pub fn write_point<'t, 'f, 'v: 'f>(
    out: &mut String,
    measurement: &str,
    tags: impl IntoIterator<Item = (&'t str, &'t str)>,
    fields: impl IntoIterator<Item = (&'f str, &'f FieldValue<'v>)>,
    timestamp: i64,
) {
    write_series(out, measurement, tags);
    out.push(' ');
    for (i, (k, v)) in fields.into_iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        escape_into(out, k, TAG_SPECIALS);
        out.push('=');
        // Writing to a String cannot fail.
        let _ = match v {
            FieldValue::Float(f) => write!(out, "{f:?}"),
            FieldValue::Integer(i) => write!(out, "{i}i"),
            FieldValue::UInteger(u) => write!(out, "{u}u"),
            FieldValue::Boolean(b) => write!(out, "{b}"),
            FieldValue::String(s) => {
                out.push('"');
                for c in s.chars() {
                    if c == '"' || c == '\\' {
                        out.push('\\');
                    }
                    out.push(c);
                }
                out.push('"');
                Ok(())
            }
        };
    }
    let _ = write!(out, " {timestamp}");
}

/// Writes a measurement and its tags as they begin a line (`cpu,host=a`), escaped.
pub(crate) fn write_series<'t>(
    out: &mut String,
    measurement: &str,
    tags: impl IntoIterator<Item = (&'t str, &'t str)>,
) {
    escape_into(out, measurement, MEASUREMENT_SPECIALS);
    for (k, v) in tags {
        out.push(',');
        escape_into(out, k, TAG_SPECIALS);
        out.push('=');
        escape_into(out, v, TAG_SPECIALS);
    }
}

/// Why a line was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("line {line}: {reason}")]
pub struct LineError {
    /// 1-based line number in the request body.
    pub line: usize,
    pub reason: String,
}

pub(crate) const MEASUREMENT_SPECIALS: &[u8] = b", \\";
pub(crate) const TAG_SPECIALS: &[u8] = b",= \\";

/// Appends `s` to `out`, escaping the characters that are special in its position.
pub(crate) fn escape_into(out: &mut String, s: &str, specials: &[u8]) {
    // Text without any special (almost all of it) is one copy.
    if !s.bytes().any(|b| matches!(b, b',' | b'=' | b' ' | b'\\')) {
        out.push_str(s);
        return;
    }
    // The specials are ASCII, so every split below is at a character boundary.
    let mut rest = s;
    while let Some(i) = rest.bytes().position(|b| specials.contains(&b)) {
        out.push_str(&rest[..i]);
        out.push('\\');
        out.push(char::from(rest.as_bytes()[i]));
        rest = &rest[i + 1..];
    }
    out.push_str(rest);
}

/// Parses a request body. Yields one item per non-blank, non-comment line, in order: the
/// parsed line or the reason it was rejected. `default_time` (ns) is used for lines without
/// a timestamp.
pub fn parse_lines(
    body: &[u8],
    precision: Precision,
    default_time: i64,
) -> impl Iterator<Item = Result<ParsedLine<'_>, LineError>> {
    body.split(|&b| b == b'\n')
        .enumerate()
        .filter_map(move |(i, bytes)| {
            let line_number = i + 1;
            let bytes = bytes.strip_suffix(b"\r").unwrap_or(bytes);
            let line = match std::str::from_utf8(bytes) {
                Ok(line) => line,
                Err(e) => {
                    return Some(Err(LineError {
                        line: line_number,
                        reason: format!("invalid UTF-8 at byte {}", e.valid_up_to()),
                    }));
                }
            };
            let trimmed = line.trim_start_matches([' ', '\t']);
            if trimmed.is_empty() || trimmed.starts_with('#') {
                return None;
            }
            Some(match parse_line(trimmed, precision, default_time) {
                Ok(mut parsed) => {
                    parsed.line_number = line_number;
                    Ok(parsed)
                }
                Err(reason) => Err(LineError {
                    line: line_number,
                    reason,
                }),
            })
        })
}

/// Parses one line (without its line ending). The returned line's number is 0; use
/// [`parse_lines`] for bodies.
pub fn parse_line(
    line: &str,
    precision: Precision,
    default_time: i64,
) -> Result<ParsedLine<'_>, String> {
    let mut p = Cursor { s: line, pos: 0 };

    let measurement = p.token(MEASUREMENT_SPECIALS, b", ")?;
    if measurement.is_empty() {
        return Err("missing measurement".into());
    }
    let mut tags: Vec<(Cow<'_, str>, Cow<'_, str>)> = Vec::new();
    while p.peek() == Some(b',') {
        p.pos += 1;
        let key = p.token(TAG_SPECIALS, b",= ")?;
        if key.is_empty() {
            return Err(format!("missing tag key at column {}", p.pos + 1));
        }
        if p.peek() != Some(b'=') {
            return Err(format!("tag key {key:?} has no value (expected '=')"));
        }
        p.pos += 1;
        let value = p.token(TAG_SPECIALS, b",= ")?;
        if value.is_empty() {
            return Err(format!("tag {key:?} has an empty value"));
        }
        if key == "time" {
            return Err("\"time\" is reserved and cannot be a tag key".into());
        }
        if tags.iter().any(|(k, _)| *k == key) {
            return Err(format!("duplicate tag key {key:?}"));
        }
        tags.push((key, value));
    }
    let series_raw = &line[..p.pos];
    if p.peek() != Some(b' ') {
        return Err(match p.peek() {
            None => "missing fields".into(),
            Some(c) => format!("unexpected {:?} at column {}", c as char, p.pos + 1),
        });
    }
    p.skip_spaces();

    let mut fields: Vec<(Cow<'_, str>, FieldValue<'_>)> = Vec::new();
    loop {
        let key = p.token(TAG_SPECIALS, b",= ")?;
        if key.is_empty() {
            return Err(if fields.is_empty() && p.peek().is_none() {
                "missing fields".into()
            } else {
                format!("missing field key at column {}", p.pos + 1)
            });
        }
        if p.peek() != Some(b'=') {
            return Err(format!("field {key:?} has no value (expected '=')"));
        }
        p.pos += 1;
        let value = p.field_value().map_err(|e| format!("field {key:?}: {e}"))?;
        if key == "time" {
            return Err("\"time\" is reserved and cannot be a field key".into());
        }
        if fields.iter().any(|(k, _)| *k == key) {
            return Err(format!("duplicate field key {key:?}"));
        }
        fields.push((key, value));
        match p.peek() {
            Some(b',') => p.pos += 1,
            Some(b' ') | None => break,
            Some(c) => {
                return Err(format!(
                    "unexpected {:?} after field value at column {}",
                    c as char,
                    p.pos + 1
                ));
            }
        }
    }

    p.skip_spaces();
    let timestamp = if p.at_end() {
        default_time
    } else {
        let start = p.pos;
        while matches!(p.peek(), Some(b'0'..=b'9' | b'-' | b'+')) {
            p.pos += 1;
        }
        let text = &line[start..p.pos];
        p.skip_spaces();
        if !p.at_end() {
            return Err(format!(
                "unexpected text after timestamp at column {}",
                p.pos + 1
            ));
        }
        let ts: i64 = text
            .parse()
            .map_err(|_| format!("invalid timestamp {text:?}"))?;
        ts.checked_mul(precision.multiplier())
            .ok_or_else(|| format!("timestamp {text} is out of range for precision"))?
    };

    Ok(ParsedLine {
        line_number: 0,
        raw: line,
        series_raw,
        measurement,
        tags,
        fields,
        timestamp,
    })
}

struct Cursor<'a> {
    s: &'a str,
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn peek(&self) -> Option<u8> {
        self.s.as_bytes().get(self.pos).copied()
    }

    fn at_end(&self) -> bool {
        self.pos >= self.s.len()
    }

    fn skip_spaces(&mut self) {
        while self.peek() == Some(b' ') {
            self.pos += 1;
        }
    }

    /// Reads an identifier up to an unescaped byte in `stops`. `\x` for `x` in `specials` is
    /// an escape; a backslash before anything else is literal. Borrows unless it unescapes.
    fn token(&mut self, specials: &[u8], stops: &[u8]) -> Result<Cow<'a, str>, String> {
        let bytes = self.s.as_bytes();
        let start = self.pos;
        let mut owned: Option<String> = None;
        let mut run_start = start;
        while let Some(&b) = bytes.get(self.pos) {
            if b == b'\\' {
                if let Some(&next) = bytes.get(self.pos + 1)
                    && specials.contains(&next)
                {
                    let buf = owned.get_or_insert_with(String::new);
                    buf.push_str(&self.s[run_start..self.pos]);
                    buf.push(next as char);
                    self.pos += 2;
                    run_start = self.pos;
                    continue;
                }
                self.pos += 1;
                continue;
            }
            if stops.contains(&b) {
                break;
            }
            if b == b'\t' || b == b'\r' {
                return Err(format!(
                    "unexpected control character at column {}",
                    self.pos + 1
                ));
            }
            self.pos += 1;
        }
        Ok(match owned {
            Some(mut buf) => {
                buf.push_str(&self.s[run_start..self.pos]);
                Cow::Owned(buf)
            }
            None => Cow::Borrowed(&self.s[start..self.pos]),
        })
    }

    fn field_value(&mut self) -> Result<FieldValue<'a>, String> {
        let bytes = self.s.as_bytes();
        if self.peek() == Some(b'"') {
            self.pos += 1;
            let start = self.pos;
            let mut owned: Option<String> = None;
            let mut run_start = start;
            loop {
                match bytes.get(self.pos) {
                    None => return Err("unterminated string".into()),
                    Some(b'"') => break,
                    Some(b'\\') if matches!(bytes.get(self.pos + 1), Some(b'"' | b'\\')) => {
                        let buf = owned.get_or_insert_with(String::new);
                        buf.push_str(&self.s[run_start..self.pos]);
                        buf.push(bytes[self.pos + 1] as char);
                        self.pos += 2;
                        run_start = self.pos;
                    }
                    Some(_) => self.pos += 1,
                }
            }
            let value = match owned {
                Some(mut buf) => {
                    buf.push_str(&self.s[run_start..self.pos]);
                    Cow::Owned(buf)
                }
                None => Cow::Borrowed(&self.s[start..self.pos]),
            };
            self.pos += 1; // closing quote
            return Ok(FieldValue::String(value));
        }
        let start = self.pos;
        while let Some(&b) = bytes.get(self.pos) {
            if b == b',' || b == b' ' {
                break;
            }
            self.pos += 1;
        }
        let text = &self.s[start..self.pos];
        if text.is_empty() {
            return Err("missing value".into());
        }
        parse_scalar(text)
    }
}

fn parse_scalar<'a>(text: &str) -> Result<FieldValue<'a>, String> {
    match text {
        "t" | "T" | "true" | "True" | "TRUE" => return Ok(FieldValue::Boolean(true)),
        "f" | "F" | "false" | "False" | "FALSE" => return Ok(FieldValue::Boolean(false)),
        _ => {}
    }
    let (last, body) = (text.as_bytes()[text.len() - 1], &text[..text.len() - 1]);
    match last {
        b'i' => {
            if !is_integer_text(body) {
                return Err(format!("invalid integer {text:?}"));
            }
            body.parse::<i64>().map(FieldValue::Integer).map_err(|_| {
                format!("integer {text:?} is out of range for a 64-bit signed integer")
            })
        }
        b'u' => {
            if !is_integer_text(body) || body.starts_with(['-', '+']) {
                return Err(format!("invalid unsigned integer {text:?}"));
            }
            body.parse::<u64>()
                .map(FieldValue::UInteger)
                .map_err(|_| format!("unsigned integer {text:?} is out of range"))
        }
        _ => {
            // Only decimal notation: Rust's parser would also take "inf", "NaN" and "1e",
            // which InfluxDB rejects.
            if !is_float_text(text) {
                return Err(format!("invalid number {text:?}"));
            }
            match text.parse::<f64>() {
                Ok(v) if v.is_finite() => Ok(FieldValue::Float(v)),
                _ => Err(format!("float {text:?} is out of range")),
            }
        }
    }
}

fn is_integer_text(s: &str) -> bool {
    let digits = s.strip_prefix(['-', '+']).unwrap_or(s);
    !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit())
}

fn is_float_text(s: &str) -> bool {
    let s = s.strip_prefix(['-', '+']).unwrap_or(s);
    let (mantissa, exponent) = match s.find(['e', 'E']) {
        Some(i) => (&s[..i], Some(&s[i + 1..])),
        None => (s, None),
    };
    let (int, frac) = match mantissa.split_once('.') {
        Some((a, b)) => (a, b),
        None => (mantissa, ""),
    };
    let digits_ok = (!int.is_empty() || !frac.is_empty())
        && int.bytes().all(|b| b.is_ascii_digit())
        && frac.bytes().all(|b| b.is_ascii_digit());
    digits_ok && exponent.is_none_or(is_integer_text)
}

#[cfg(test)]
mod tests;
