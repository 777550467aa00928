//! The audit trail: each change made through the API (tokens, retention, preferences,
//! continuous queries, flushes and compactions) is a point of the measurement
//! [`MEASUREMENT`], written through the WAL like any other point, so it is as durable as the
//! data and read with SQL: `SELECT time, token, method, path, status, detail FROM
//! forestall_audit ORDER BY time DESC`.

use std::borrow::Cow;

use crate::line_protocol::{FieldValue, write_point};
use crate::{Error, Precision, Result, Store};

/// The measurement the trail is kept in.
pub const MEASUREMENT: &str = "forestall_audit";

/// The most of a request's body or statement a change keeps.
pub const MAX_DETAIL_BYTES: usize = 4096;

/// One change.
#[derive(Debug, Clone, Copy)]
pub struct Change<'a> {
    /// Who: the token's name (`anonymous` with auth off), the tag `token`.
    pub by: &'a str,
    /// How: `POST`, `PUT` or `DELETE` over HTTP, `SQL` for a statement. A tag.
    pub method: &'a str,
    /// What: the path (`/api/v1/retention/cpu`), or the statement's kind and name.
    pub path: &'a str,
    /// The answer's HTTP status (for a statement: 200 done, 400 refused or failed).
    pub status: u16,
    /// What was asked: the request's body or the statement, cut to [`MAX_DETAIL_BYTES`],
    /// line breaks made spaces.
    pub detail: &'a str,
    /// From where, when known (the peer's IP address).
    pub peer: Option<&'a str>,
}

impl Change<'_> {
    /// The change as a line of line protocol at `now` (ns).
    pub fn line(&self, now: i64) -> String {
        let mut detail = self.detail;
        if detail.len() > MAX_DETAIL_BYTES {
            let mut end = MAX_DETAIL_BYTES;
            while !detail.is_char_boundary(end) {
                end -= 1;
            }
            detail = &detail[..end];
        }
        let detail = detail.replace(['\n', '\r'], " ");
        let (path, detail) = (
            FieldValue::String(Cow::Borrowed(self.path)),
            FieldValue::String(Cow::Owned(detail)),
        );
        let status = FieldValue::Integer(i64::from(self.status));
        let peer = self.peer.map(|p| FieldValue::String(Cow::Borrowed(p)));
        let mut fields = vec![("path", &path), ("status", &status), ("detail", &detail)];
        if let Some(peer) = &peer {
            fields.push(("peer", peer));
        }
        let mut line = String::new();
        write_point(
            &mut line,
            MEASUREMENT,
            [("token", self.by), ("method", self.method)],
            fields,
            now,
        );
        line
    }
}

impl Store {
    /// Records `change` at `now` (ns), durably (through the WAL).
    pub fn record_change(&self, change: &Change<'_>, now: i64) -> Result<()> {
        let line = change.line(now);
        let outcome = self.write(line.as_bytes(), Precision::Nanoseconds, now)?;
        match outcome.errors.first() {
            None => Ok(()),
            Some(e) => Err(Error::Observer(format!(
                "the audit trail refused a change ({MEASUREMENT} has other columns?): {e}"
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::line_protocol::parse_lines;

    #[test]
    fn a_change_is_one_line_that_reads_back_whole() {
        let body = "{\"sql\": \"SELECT \\\"a\\\", b\",\n \"k\": \"x=1 y\"}".repeat(200);
        let change = Change {
            by: "ops team, night",
            method: "PUT",
            path: "/api/v1/continuous_queries/a b",
            status: 201,
            detail: &body,
            peer: Some("10.0.0.7"),
        };
        let line = change.line(42);
        assert!(!line.contains('\n'));
        let parsed: Vec<_> = parse_lines(line.as_bytes(), Precision::Nanoseconds, 0).collect();
        assert_eq!(parsed.len(), 1);
        let p = parsed[0].as_ref().unwrap();
        assert_eq!(p.measurement, MEASUREMENT);
        let tag = |k: &str| {
            p.tags
                .iter()
                .find(|(n, _)| n == k)
                .map(|(_, v)| v.to_string())
        };
        assert_eq!(tag("token").as_deref(), Some("ops team, night"));
        let field = |k: &str| {
            p.fields
                .iter()
                .find(|(n, _)| n == k)
                .map(|(_, v)| v.clone())
        };
        let Some(FieldValue::String(detail)) = field("detail") else {
            panic!("no detail")
        };
        assert!(detail.len() <= MAX_DETAIL_BYTES);
        assert!(body.replace('\n', " ").starts_with(detail.as_ref()));
        assert_eq!(field("status"), Some(FieldValue::Integer(201)));
        assert_eq!(p.timestamp, 42);
    }
}
