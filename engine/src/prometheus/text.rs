//! The Prometheus exposition formats a scrape reads: the text format (0.0.4, what
//! node_exporter and most client libraries serve) and OpenMetrics 1.0 text. Each sample line
//! becomes a [`Sample`]; comments, `HELP`, `TYPE` and `UNIT` lines carry nothing a store of
//! samples needs and are skipped.
//!
//! As Prometheus' own parser does, one malformed line fails the whole exposition: a scrape is
//! stored whole or not at all, so a target that emits garbage shows as down instead of as a
//! silently partial set of series. The differences between the two formats that matter here:
//! a text timestamp is integer milliseconds, an OpenMetrics one is seconds with a fraction;
//! OpenMetrics must end with `# EOF` and nothing may follow it; OpenMetrics lines may carry
//! an exemplar after ` # `, which is skipped.

use std::borrow::Cow;

/// Which exposition format a body is in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// Prometheus text format 0.0.4.
    Text,
    /// OpenMetrics 1.0 text.
    OpenMetrics,
}

impl Format {
    /// The format a response's `Content-Type` names (the text format when it names none or
    /// another, as Prometheus falls back).
    pub fn of_content_type(content_type: Option<&str>) -> Self {
        match content_type {
            Some(t)
                if t.trim()
                    .to_ascii_lowercase()
                    .starts_with("application/openmetrics-text") =>
            {
                Self::OpenMetrics
            }
            _ => Self::Text,
        }
    }
}

/// One sample line of an exposition.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample<'a> {
    pub name: &'a str,
    /// The labels as written, values unescaped, in their order on the line.
    pub labels: Vec<(&'a str, Cow<'a, str>)>,
    pub value: f64,
    /// Milliseconds since the epoch, when the line has a timestamp.
    pub timestamp_ms: Option<i64>,
}

/// Why an exposition could not be read: the first bad line (numbered from 1) and what is
/// wrong with it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("line {line}: {reason}")]
pub struct ParseError {
    pub line: usize,
    pub reason: String,
}

/// Every sample of `body`, in order, or the first reason it is not a valid exposition.
pub fn parse(body: &str, format: Format) -> Result<Vec<Sample<'_>>, ParseError> {
    let mut samples = Vec::new();
    let mut eof = None;
    // The last "line" is what follows the final newline (empty in a well-formed body).
    let last = body.split('\n').count();
    for (i, line) in body.split('\n').enumerate() {
        let line_number = i + 1;
        let fail = |reason: String| ParseError {
            line: line_number,
            reason,
        };
        let line = line.strip_suffix('\r').unwrap_or(line);
        if let Some(at) = eof {
            // Only the final newline may follow `# EOF`.
            if !(line.is_empty() && line_number == last) {
                return Err(fail(format!("content after the # EOF of line {at}")));
            }
            continue;
        }
        let text = match format {
            Format::Text => line.trim_start_matches([' ', '\t']),
            Format::OpenMetrics => line,
        };
        if text.is_empty() {
            if format == Format::OpenMetrics && line_number < last {
                return Err(fail("an empty line (OpenMetrics has none)".into()));
            }
            continue;
        }
        if let Some(comment) = text.strip_prefix('#') {
            if format == Format::OpenMetrics && comment == " EOF" {
                eof = Some(line_number);
            }
            continue;
        }
        samples.push(sample(text, format).map_err(fail)?);
    }
    if format == Format::OpenMetrics && eof.is_none() {
        return Err(ParseError {
            line: last,
            reason: "an OpenMetrics exposition ends with # EOF, and this one does not".into(),
        });
    }
    Ok(samples)
}

/// One sample line.
fn sample(line: &str, format: Format) -> Result<Sample<'_>, String> {
    let mut c = Cursor { s: line, at: 0 };
    let name = c.name(true);
    if name.is_empty() {
        return Err(format!(
            "a sample line starts with a metric name, not {:?}",
            c.rest_head()
        ));
    }
    let mut labels = Vec::new();
    if c.eat('{') {
        loop {
            c.blanks();
            if c.eat('}') {
                break;
            }
            let label = c.name(false);
            if label.is_empty() {
                return Err(format!(
                    "a label name was expected in {name}'s labels, not {:?}",
                    c.rest_head()
                ));
            }
            c.blanks();
            if !c.eat('=') {
                return Err(format!("label {label} of {name} has no ="));
            }
            c.blanks();
            let value = c
                .quoted()
                .map_err(|why| format!("label {label} of {name}: {why}"))?;
            labels.push((label, value));
            c.blanks();
            if c.eat(',') {
                continue;
            }
            if c.eat('}') {
                break;
            }
            return Err(format!(
                "{name}'s labels go on with , or end with }}, not {:?}",
                c.rest_head()
            ));
        }
    }
    if !c.blanks() {
        return Err(format!(
            "{name}: a blank and a value follow the name and labels, not {:?}",
            c.rest_head()
        ));
    }
    let value = c.token();
    let value = float(value).ok_or_else(|| format!("{name}: {value:?} is not a number"))?;
    let mut timestamp_ms = None;
    c.blanks();
    let before_ts = c.at;
    let ts = c.token();
    if ts == "#" {
        c.at = before_ts; // an exemplar, not a timestamp
    } else if !ts.is_empty() {
        timestamp_ms = Some(match format {
            Format::Text => ts
                .parse::<i64>()
                .map_err(|_| format!("{name}: timestamp {ts:?} is not integer milliseconds"))?,
            Format::OpenMetrics => float(ts)
                .filter(|s| s.is_finite() && s.abs() < 9.2e15)
                .map(|s| (s * 1000.0).round() as i64)
                .ok_or_else(|| format!("{name}: timestamp {ts:?} is not a number of seconds"))?,
        });
        c.blanks();
    }
    let rest = &c.s[c.at..];
    let exemplar = format == Format::OpenMetrics && rest.starts_with('#');
    if !rest.is_empty() && !exemplar {
        return Err(format!("{name}: unexpected {rest:?} after the value"));
    }
    Ok(Sample {
        name,
        labels,
        value,
        timestamp_ms,
    })
}

/// A number as Go's `ParseFloat` reads one in an exposition: decimal or exponent notation,
/// `NaN`, `Inf` with an optional sign, in any case.
fn float(text: &str) -> Option<f64> {
    let digits = text.strip_prefix(['+', '-']).unwrap_or(text);
    let named = ["nan", "inf", "infinity"]
        .iter()
        .any(|n| digits.eq_ignore_ascii_case(n));
    // Rust also takes what an exposition never holds; keep to digits, '.', exponents.
    let plain = !digits.is_empty()
        && digits
            .bytes()
            .all(|b| b.is_ascii_digit() || matches!(b, b'.' | b'e' | b'E' | b'+' | b'-'));
    (named || plain).then(|| text.parse().ok()).flatten()
}

struct Cursor<'a> {
    s: &'a str,
    at: usize,
}

impl<'a> Cursor<'a> {
    fn peek(&self) -> Option<u8> {
        self.s.as_bytes().get(self.at).copied()
    }

    fn eat(&mut self, c: char) -> bool {
        let hit = self.peek() == Some(c as u8);
        if hit {
            self.at += 1;
        }
        hit
    }

    /// Skips blanks; whether there were any.
    fn blanks(&mut self) -> bool {
        let from = self.at;
        while matches!(self.peek(), Some(b' ' | b'\t')) {
            self.at += 1;
        }
        self.at > from
    }

    /// A metric name (`[a-zA-Z_:][a-zA-Z0-9_:]*`) or, with `metric` false, a label name
    /// (the same without colons); empty when none starts here.
    fn name(&mut self, metric: bool) -> &'a str {
        let from = self.at;
        while let Some(b) = self.peek() {
            let ok = b.is_ascii_alphabetic()
                || b == b'_'
                || (metric && b == b':')
                || (self.at > from && b.is_ascii_digit());
            if !ok {
                break;
            }
            self.at += 1;
        }
        &self.s[from..self.at]
    }

    /// Up to the next blank or the end.
    fn token(&mut self) -> &'a str {
        let from = self.at;
        while !matches!(self.peek(), None | Some(b' ' | b'\t')) {
            self.at += 1;
        }
        &self.s[from..self.at]
    }

    /// A double-quoted label value, with `\\`, `\"` and `\n` unescaped.
    fn quoted(&mut self) -> Result<Cow<'a, str>, String> {
        if !self.eat('"') {
            return Err(format!(
                "a value in double quotes, not {:?}",
                self.rest_head()
            ));
        }
        let from = self.at;
        let mut owned: Option<String> = None;
        loop {
            let rest = &self.s[self.at..];
            let Some(k) = rest.find(['"', '\\']) else {
                return Err("the value's closing quote is missing".into());
            };
            if rest.as_bytes()[k] == b'"' {
                let value = match owned {
                    Some(mut o) => {
                        o.push_str(&rest[..k]);
                        Cow::Owned(o)
                    }
                    None => Cow::Borrowed(&self.s[from..self.at + k]),
                };
                self.at += k + 1;
                return Ok(value);
            }
            let o = owned.get_or_insert_with(|| self.s[from..self.at].to_owned());
            o.push_str(&rest[..k]);
            let escaped = match rest.as_bytes().get(k + 1) {
                Some(b'\\') => '\\',
                Some(b'"') => '"',
                Some(b'n') => '\n',
                Some(_) => return Err(format!("unknown escape in {:?}", &rest[k..])),
                None => return Err("the value's closing quote is missing".into()),
            };
            o.push(escaped);
            self.at += k + 2;
        }
    }

    /// The start of what is left, for messages.
    fn rest_head(&self) -> &'a str {
        let rest = &self.s[self.at..];
        let mut end = rest.len().min(32);
        while !rest.is_char_boundary(end) {
            end -= 1;
        }
        &rest[..end]
    }
}

#[cfg(test)]
mod tests;
