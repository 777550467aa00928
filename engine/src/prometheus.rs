//! Prometheus remote write 1.0: a `prometheus.WriteRequest` (protobuf, already out of its
//! snappy block) turned into line protocol for [`Store::write`](crate::Store::write), so a
//! remote write goes through the one write path (WAL, buffer, observers) as every line does.
//! A scrape's samples ([`text`] reads the exposition formats) take the same way, through
//! [`Builder`].
//!
//! The mapping, as VictoriaMetrics and InfluxDB's Prometheus endpoints make it: the metric
//! name (`__name__`) is the measurement, the other labels are tags (an empty label is an
//! absent one, as in Prometheus), and each sample is a float `value` field at its
//! millisecond timestamp. Samples in any order are taken. What a column of finite floats
//! cannot hold is counted and dropped, never stored as something else:
//! * a stale marker (the NaN Prometheus writes when a series disappears): Forestall has no
//!   staleness; the series simply has no newer rows;
//! * any other NaN and ±Inf: line protocol (the WAL's format) has no spelling for them, and
//!   one NaN would make every `avg` or `sum` over its series NaN;
//! * native histograms (field 4 of a series): not stored in this version.
//!
//! Decoding is strict about the wire format (a truncated varint, a length past the end or a
//! field of the wrong wire type rejects the whole request, before anything is stored) and
//! skips fields it does not know, as protobuf readers must. A series Prometheus itself would
//! not accept (no metric name, a metric or label name outside Prometheus' grammar, a label
//! twice) or that line protocol cannot carry (a line break or tab in a label value) is rejected and
//! reported, and the other series are still stored.

use std::borrow::Cow;
use std::fmt::Write as _;

use crate::line_protocol::{FieldValue, LineError, ParsedLine, Precision, write_series};

pub mod text;

/// The bit pattern of Prometheus' stale marker (`value.StaleNaN`).
pub const STALE_NAN_BITS: u64 = 0x7ff0_0000_0000_0002;

/// A remote write request as line protocol, with what it could not carry. The lines are
/// also at hand already parsed ([`Converted::parsed`]), borrowing the request's labels, so
/// the store admits them without parsing the text back; the text is what the WAL keeps.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Converted<'a> {
    /// One line per stored sample, timestamps in milliseconds.
    pub lines: String,
    pub series: usize,
    /// Samples written as lines.
    pub samples: usize,
    pub stale_markers: usize,
    /// NaN (other than stale markers) and ±Inf samples.
    pub non_finite: usize,
    /// Native histogram samples.
    pub histograms: usize,
    /// Series rejected, with why (the first [`MAX_REJECTIONS`] listed).
    pub rejected: Vec<String>,
    pub rejected_series: usize,
    /// The series that have lines: (metric name, the other labels sorted, empty ones out).
    named: Vec<Labels<'a>>,
    /// One per line of `lines`, in order.
    points: Vec<Point>,
}

/// A series' metric name and its other labels, sorted.
type Labels<'a> = (&'a str, Vec<(&'a str, &'a str)>);

/// Where a line is in [`Converted::lines`] and what it holds.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Point {
    /// Index into [`Converted::named`].
    series: usize,
    start: usize,
    /// The end of its measurement and tags.
    prefix_end: usize,
    end: usize,
    value: f64,
    ms: i64,
}

impl Converted<'_> {
    /// The lines as [`parse_lines`](crate::line_protocol::parse_lines) would read them
    /// from [`Converted::lines`] at millisecond precision, without reading the text: the
    /// same measurement, tags, field, timestamp, `raw` and `series_raw`.
    pub fn parsed(&self) -> impl Iterator<Item = Result<ParsedLine<'_>, LineError>> + '_ {
        self.points.iter().enumerate().map(|(i, p)| {
            let line = i + 1;
            let raw = &self.lines[p.start..p.end];
            let timestamp =
                p.ms.checked_mul(Precision::Milliseconds.multiplier())
                    .ok_or_else(|| LineError {
                        line,
                        reason: format!("timestamp {} is out of range for precision", p.ms),
                    })?;
            let (name, tags) = &self.named[p.series];
            Ok(ParsedLine {
                line_number: line,
                raw,
                series_raw: &self.lines[p.start..p.prefix_end],
                measurement: Cow::Borrowed(*name),
                tags: tags
                    .iter()
                    .map(|&(k, v)| (Cow::Borrowed(k), Cow::Borrowed(v)))
                    .collect(),
                fields: vec![(Cow::Borrowed("value"), FieldValue::Float(p.value))],
                timestamp,
            })
        })
    }
}

/// Rejected series listed in [`Converted::rejected`].
pub const MAX_REJECTIONS: usize = 16;

/// Why a request could not be decoded at all.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid remote write request: {0}")]
pub struct DecodeError(pub String);

fn bad(msg: impl Into<String>) -> DecodeError {
    DecodeError(msg.into())
}

/// A protobuf wire reader over one message.
struct Reader<'a> {
    buf: &'a [u8],
    at: usize,
}

/// A field's value as the wire carries it.
enum Value<'a> {
    Varint(u64),
    Fixed64(u64),
    Bytes(&'a [u8]),
    Fixed32,
}

impl<'a> Reader<'a> {
    fn new(buf: &'a [u8]) -> Self {
        Self { buf, at: 0 }
    }

    fn varint(&mut self) -> Result<u64, DecodeError> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let b = *self
                .buf
                .get(self.at)
                .ok_or_else(|| bad("a varint runs past the end of its message"))?;
            self.at += 1;
            if shift == 63 && b > 1 {
                return Err(bad("a varint overflows 64 bits"));
            }
            v |= u64::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err(bad("a varint is longer than 10 bytes"))
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        let end = self
            .at
            .checked_add(n)
            .filter(|&e| e <= self.buf.len())
            .ok_or_else(|| bad("a field's length runs past the end of its message"))?;
        let s = &self.buf[self.at..end];
        self.at = end;
        Ok(s)
    }

    /// The next field's number and value; `None` at the end of the message.
    fn field(&mut self) -> Result<Option<(u64, Value<'a>)>, DecodeError> {
        if self.at == self.buf.len() {
            return Ok(None);
        }
        let key = self.varint()?;
        let number = key >> 3;
        if number == 0 {
            return Err(bad("field number 0"));
        }
        let value = match key & 7 {
            0 => Value::Varint(self.varint()?),
            1 => Value::Fixed64(u64::from_le_bytes(
                self.take(8)?.try_into().expect("8 bytes"),
            )),
            2 => {
                let n = usize::try_from(self.varint()?)
                    .map_err(|_| bad("a field's length does not fit in memory"))?;
                Value::Bytes(self.take(n)?)
            }
            5 => {
                self.take(4)?;
                Value::Fixed32
            }
            w => {
                return Err(bad(format!(
                    "field {number} has wire type {w} (groups are not used)"
                )));
            }
        };
        Ok(Some((number, value)))
    }
}

fn wrong(what: &str) -> DecodeError {
    bad(format!("{what} has the wrong wire type"))
}

/// A label: (name, value).
fn label(buf: &[u8]) -> Result<(&str, &str), DecodeError> {
    let (mut name, mut value) = ("", "");
    let mut r = Reader::new(buf);
    while let Some((n, v)) = r.field()? {
        let slot = match n {
            1 => &mut name,
            2 => &mut value,
            _ => continue,
        };
        let Value::Bytes(b) = v else {
            return Err(wrong("a label's name or value"));
        };
        *slot = std::str::from_utf8(b).map_err(|_| bad("a label is not UTF-8"))?;
    }
    Ok((name, value))
}

/// A sample: (value, timestamp in ms).
fn sample(buf: &[u8]) -> Result<(f64, i64), DecodeError> {
    let (mut value, mut ts) = (0.0, 0);
    let mut r = Reader::new(buf);
    while let Some((n, v)) = r.field()? {
        match (n, v) {
            (1, Value::Fixed64(bits)) => value = f64::from_bits(bits),
            (2, Value::Varint(t)) => ts = t as i64,
            (1 | 2, _) => return Err(wrong("a sample's value or timestamp")),
            _ => {}
        }
    }
    Ok((value, ts))
}

/// Decodes a `WriteRequest` and writes its samples as line protocol: the series in
/// metric-name order, each series' samples in the order sent.
pub fn convert(request: &[u8]) -> Result<Converted<'_>, DecodeError> {
    let mut out = Builder::default();
    let mut r = Reader::new(request);
    // Reused per series.
    let mut labels: Vec<(&str, &str)> = Vec::new();
    let mut samples: Vec<(f64, i64)> = Vec::new();
    while let Some((n, v)) = r.field()? {
        let series = match (n, v) {
            (1, Value::Bytes(b)) => b,
            (1, _) => return Err(wrong("a time series")),
            _ => continue, // metadata (3) and anything newer
        };
        labels.clear();
        samples.clear();
        let mut s = Reader::new(series);
        while let Some((n, v)) = s.field()? {
            match (n, v) {
                (1, Value::Bytes(b)) => labels.push(label(b)?),
                (2, Value::Bytes(b)) => samples.push(sample(b)?),
                (4, Value::Bytes(_)) => out.out.histograms += 1,
                (1 | 2 | 4, _) => return Err(wrong("a series' label, sample or histogram")),
                _ => {} // exemplars (3)
            }
        }
        out.series(&labels, samples.drain(..));
    }
    Ok(out.finish())
}

/// Series of samples turned into lines, as [`convert`] does for a remote write and a scrape
/// does for an exposition: give each series with [`Builder::series`], then
/// [`Builder::finish`].
#[derive(Debug, Default)]
pub struct Builder<'a> {
    out: Converted<'a>,
    /// The series to write, and their samples: series k's are all[from[k]..from[k + 1]].
    named: Vec<Labels<'a>>,
    from: Vec<usize>,
    all: Vec<(f64, i64)>,
}

impl<'a> Builder<'a> {
    /// A series: its labels (`__name__` among them; an empty value is an absent label) and
    /// its (value, milliseconds) samples. A series Prometheus would not take is counted and
    /// listed in [`Converted::rejected`], and its samples dropped; returns whether it was
    /// taken.
    pub fn series(
        &mut self,
        labels: &[(&'a str, &'a str)],
        samples: impl IntoIterator<Item = (f64, i64)>,
    ) -> bool {
        self.out.series += 1;
        match name_and_tags(labels) {
            Ok(named) => {
                self.from.push(self.all.len());
                self.named.push(named);
                self.all.extend(samples);
                true
            }
            Err(why) => {
                self.out.rejected_series += 1;
                if self.out.rejected.len() < MAX_REJECTIONS {
                    self.out.rejected.push(why);
                }
                false
            }
        }
    }

    /// The lines: the series in metric-name order (stable: one series given twice keeps its
    /// order), each series' samples in the order given, stale markers and other non-finite
    /// values counted and left out.
    pub fn finish(self) -> Converted<'a> {
        let Self {
            mut out,
            mut named,
            mut from,
            all,
        } = self;
        from.push(all.len());
        // Lines of one measurement come together, so the store admits them as a run.
        let mut order: Vec<usize> = (0..named.len()).collect();
        order.sort_by_key(|&k| named[k].0);
        for k in order {
            let mut prefix = None;
            for &(value, ms) in &all[from[k]..from[k + 1]] {
                if value.to_bits() == STALE_NAN_BITS {
                    out.stale_markers += 1;
                    continue;
                } else if !value.is_finite() {
                    out.non_finite += 1;
                    continue;
                }
                out.samples += 1;
                let start = out.lines.len();
                // The first line of the series writes its measurement and tags; the others
                // copy them.
                let prefix_end = match prefix {
                    Some((from, to)) => {
                        out.lines.extend_from_within(from..to);
                        start + (to - from)
                    }
                    None => {
                        let (name, tags) = &named[k];
                        write_series(&mut out.lines, name, tags.iter().copied());
                        prefix = Some((start, out.lines.len()));
                        out.lines.len()
                    }
                };
                // Writing to a String cannot fail.
                let _ = write!(out.lines, " value={value:?} {ms}");
                out.points.push(Point {
                    series: out.named.len(),
                    start,
                    prefix_end,
                    end: out.lines.len(),
                    value,
                    ms,
                });
                out.lines.push('\n');
            }
            if prefix.is_some() {
                out.named.push(std::mem::take(&mut named[k]));
            }
        }
        out
    }
}

/// A series' metric name and its other non-empty labels, sorted, or why it cannot be
/// stored.
fn name_and_tags<'a>(labels: &[(&'a str, &'a str)]) -> Result<Labels<'a>, String> {
    let name = labels
        .iter()
        .find(|(k, _)| *k == "__name__")
        .map(|(_, v)| *v)
        .filter(|v| !v.is_empty())
        .ok_or_else(|| format!("a series without a metric name ({})", describe(labels)))?;
    if !valid_name(name, true) {
        return Err(format!(
            "{name:?} is not a metric name ([a-zA-Z_:][a-zA-Z0-9_:]*)"
        ));
    }
    if let Some((k, _)) = labels.iter().find(|(k, _)| !valid_name(k, false)) {
        return Err(format!(
            "{name}: {k:?} is not a label name ([a-zA-Z_][a-zA-Z0-9_]*)"
        ));
    }
    // Line protocol ends a line at '\n' and refuses '\r' and '\t' in a name or tag.
    if labels.iter().any(|(_, v)| v.contains(['\n', '\r', '\t'])) {
        return Err(format!(
            "{name}: a label value with a line break or tab ({})",
            describe(labels)
        ));
    }
    let mut tags: Vec<(&str, &str)> = labels
        .iter()
        .filter(|(k, v)| *k != "__name__" && !v.is_empty())
        .copied()
        .collect();
    tags.sort_unstable();
    if let Some(w) = tags.windows(2).find(|w| w[0].0 == w[1].0) {
        return Err(format!("{name}: the label {:?} twice", w[0].0));
    }
    Ok((name, tags))
}

/// Prometheus' names: metric names `[a-zA-Z_:][a-zA-Z0-9_:]*`, label names without the colons.
/// Anything else could not be queried by name, and some would not survive line protocol (a
/// measurement starting with `#` is a comment there).
fn valid_name(s: &str, colons: bool) -> bool {
    let ok = |c: u8, first: bool| {
        c.is_ascii_alphabetic()
            || c == b'_'
            || (colons && c == b':')
            || (!first && c.is_ascii_digit())
    };
    let b = s.as_bytes();
    !b.is_empty() && ok(b[0], true) && b[1..].iter().all(|&c| ok(c, false))
}

fn describe(labels: &[(&str, &str)]) -> String {
    let mut s = String::new();
    for (i, (k, v)) in labels.iter().take(8).enumerate() {
        if i > 0 {
            s.push_str(", ");
        }
        let _ = write!(s, "{k}={v:?}");
    }
    s
}

/// One series to [`encode`]: its labels (`__name__` among them) and its (value, ms) samples.
pub type Series<'a> = (Vec<(&'a str, &'a str)>, Vec<(f64, i64)>);

/// Encodes a `WriteRequest`, for tests and load generators.
pub fn encode(series: &[Series<'_>]) -> Vec<u8> {
    fn varint(out: &mut Vec<u8>, mut v: u64) {
        while v >= 0x80 {
            out.push((v as u8) | 0x80);
            v >>= 7;
        }
        out.push(v as u8);
    }
    fn bytes(out: &mut Vec<u8>, field: u64, b: &[u8]) {
        varint(out, (field << 3) | 2);
        varint(out, b.len() as u64);
        out.extend_from_slice(b);
    }
    let mut out = Vec::new();
    for (labels, samples) in series {
        let mut ts = Vec::new();
        for (k, v) in labels {
            let mut l = Vec::new();
            bytes(&mut l, 1, k.as_bytes());
            bytes(&mut l, 2, v.as_bytes());
            bytes(&mut ts, 1, &l);
        }
        for &(value, t) in samples {
            let mut s = vec![(1 << 3) | 1];
            s.extend_from_slice(&value.to_bits().to_le_bytes());
            varint(&mut s, 2 << 3);
            varint(&mut s, t as u64);
            bytes(&mut ts, 2, &s);
        }
        bytes(&mut out, 1, &ts);
    }
    out
}

#[cfg(test)]
mod tests;
