//! The SQL statements that manage continuous queries, recognised before DataFusion sees the
//! text (over HTTP and pgwire alike):
//!
//! ```text
//! CREATE [OR REPLACE] CONTINUOUS QUERY [IF NOT EXISTS] <name>
//!     [EVERY <duration> | ON WRITE]
//!     [LATENESS <duration>]
//!     [BACKFILL <duration> | BACKFILL FROM '<RFC 3339 time>']
//!     <sink>
//! AS <SELECT …>
//!
//! <sink> ::= INTO <measurement>
//!          | HEALTH [WARN WHEN <condition>] [FAIL WHEN <condition>] [FOR <duration>]
//!          | NOTIFY '<http url>' [WHEN <condition>] [FOR <duration>]
//!          | ALLOCATE
//!
//! DROP CONTINUOUS QUERY [IF EXISTS] <name>
//! SHOW CONTINUOUS QUERIES
//! ```
//!
//! A duration is `'1 minute'`, `INTERVAL '1 minute'` or `'1m'`. A condition is a SQL
//! expression over the `SELECT`'s output columns. Every error names the line and column it was
//! found at, in the statement as written.

use datafusion::sql::sqlparser::dialect::PostgreSqlDialect;
use datafusion::sql::sqlparser::keywords::Keyword;
use datafusion::sql::sqlparser::parser::Parser;
use datafusion::sql::sqlparser::tokenizer::{Location, Token, TokenWithSpan, Tokenizer};

use super::{Definition, Schedule, Sink, parse_duration};
use crate::{Error, Result};

/// A statement about continuous queries.
#[derive(Debug, Clone, PartialEq)]
pub enum Statement {
    Create {
        definition: Definition,
        or_replace: bool,
        if_not_exists: bool,
    },
    Drop {
        name: String,
        if_exists: bool,
    },
    Show,
}

/// Recognises a continuous-query statement. `None` when `sql` is some other statement (for
/// DataFusion); `Some(Err(…))` when it is one of ours but malformed.
pub fn parse(sql: &str) -> Option<Result<Statement>> {
    // Every query comes through here: only a text that names the keyword is tokenized.
    const KEYWORD: &[u8] = b"CONTINUOUS";
    if !sql
        .as_bytes()
        .windows(KEYWORD.len())
        .any(|w| w.eq_ignore_ascii_case(KEYWORD))
    {
        return None;
    }
    let tokens = match Tokenizer::new(&PostgreSqlDialect {}, sql).tokenize_with_location() {
        Ok(t) => t,
        // DataFusion reports a text it cannot tokenize in its own words.
        Err(_) => return None,
    };
    let tokens: Vec<TokenWithSpan> = tokens
        .into_iter()
        .filter(|t| !matches!(t.token, Token::Whitespace(_)))
        .collect();
    let mut p = Cursor {
        sql,
        tokens: &tokens,
        at: 0,
    };
    if p.word("CREATE") {
        let or_replace = p.words(&["OR", "REPLACE"]);
        if !p.words(&["CONTINUOUS", "QUERY"]) {
            return None;
        }
        Some(create(&mut p, or_replace))
    } else if p.word("DROP") {
        if !p.words(&["CONTINUOUS", "QUERY"]) {
            return None;
        }
        Some(drop(&mut p))
    } else if p.word("SHOW") {
        if !p.words(&["CONTINUOUS", "QUERIES"]) {
            return None;
        }
        Some(p.end().map(|()| Statement::Show))
    } else {
        None
    }
}

fn create(p: &mut Cursor<'_>, or_replace: bool) -> Result<Statement> {
    let if_not_exists = p.words(&["IF", "NOT", "EXISTS"]);
    if or_replace && if_not_exists {
        return Err(p.error("OR REPLACE and IF NOT EXISTS cannot be combined"));
    }
    let name = p.identifier("the continuous query's name")?;
    let mut schedule = None;
    let mut lateness = None;
    let mut backfill = None;
    let mut sink = None;
    loop {
        let clause_at = p.location();
        if p.word("AS") {
            break;
        }
        if p.word("EVERY") {
            once(&schedule, clause_at, "EVERY or ON WRITE")?;
            schedule = Some(Schedule::Every(p.duration()?));
        } else if p.words(&["ON", "WRITE"]) {
            once(&schedule, clause_at, "EVERY or ON WRITE")?;
            schedule = Some(Schedule::OnWrite);
        } else if p.word("LATENESS") {
            once(&lateness, clause_at, "LATENESS")?;
            lateness = Some(p.duration()?);
        } else if p.word("BACKFILL") {
            once(&backfill, clause_at, "BACKFILL")?;
            backfill = Some(if p.word("FROM") {
                p.string("a start time such as '2026-01-01T00:00:00Z'")?
            } else {
                p.duration_text()?
            });
        } else if p.word("INTO") {
            once(&sink, clause_at, "a sink")?;
            sink = Some(Sink::Into {
                measurement: p.identifier("the measurement to write into")?,
            });
        } else if p.word("HEALTH") {
            once(&sink, clause_at, "a sink")?;
            let warn = if p.words(&["WARN", "WHEN"]) {
                Some(p.condition()?)
            } else {
                None
            };
            let fail = if p.words(&["FAIL", "WHEN"]) {
                Some(p.condition()?)
            } else {
                None
            };
            if warn.is_none() && fail.is_none() {
                return Err(
                    p.error("HEALTH needs WARN WHEN <condition>, FAIL WHEN <condition> or both")
                );
            }
            let hold = p.hold()?;
            sink = Some(Sink::Health { warn, fail, hold });
        } else if p.word("NOTIFY") {
            once(&sink, clause_at, "a sink")?;
            let url = p.string("the webhook's URL in quotes")?;
            let when = if p.word("WHEN") {
                Some(p.condition()?)
            } else {
                None
            };
            let hold = p.hold()?;
            sink = Some(Sink::Notify { url, when, hold });
        } else if p.word("ALLOCATE") {
            once(&sink, clause_at, "a sink")?;
            sink = Some(Sink::Allocate);
        } else if p.done() {
            return Err(p.error("expected AS SELECT …: the query is missing"));
        } else {
            return Err(p.error(
                "expected EVERY, ON WRITE, LATENESS, BACKFILL, a sink (INTO, HEALTH, NOTIFY or ALLOCATE) or AS",
            ));
        }
    }
    let Some(sink) = sink else {
        return Err(Error::Query(format!(
            "continuous query {name:?} has no sink: say INTO <measurement>, HEALTH …, NOTIFY … or ALLOCATE"
        )));
    };
    let select_at = p.location();
    let select = p.rest();
    if select.trim().is_empty() {
        return Err(p.error("expected a SELECT after AS"));
    }
    let definition = Definition {
        name,
        schedule: schedule.unwrap_or_default(),
        lateness: lateness.unwrap_or(super::DEFAULT_LATENESS),
        backfill,
        sink,
        query: select.to_owned(),
        select_at: Some((select_at.line, select_at.column)),
        from_config: false,
        builtin: false,
    };
    Ok(Statement::Create {
        definition,
        or_replace,
        if_not_exists,
    })
}

fn drop(p: &mut Cursor<'_>) -> Result<Statement> {
    let if_exists = p.words(&["IF", "EXISTS"]);
    let name = p.identifier("the continuous query's name")?;
    p.end()?;
    Ok(Statement::Drop { name, if_exists })
}

fn once<T>(seen: &Option<T>, at: Location, what: &str) -> Result<()> {
    match seen {
        Some(_) => Err(Error::Query(format!(
            "{what} is given twice (line {}, column {})",
            at.line, at.column
        ))),
        None => Ok(()),
    }
}

/// Walks the statement's tokens (whitespace left out) and slices its text.
struct Cursor<'a> {
    sql: &'a str,
    tokens: &'a [TokenWithSpan],
    at: usize,
}

impl Cursor<'_> {
    fn peek(&self) -> Option<&Token> {
        self.tokens
            .get(self.at)
            .map(|t| &t.token)
            .filter(|t| !matches!(t, Token::EOF))
    }

    fn done(&self) -> bool {
        self.peek().is_none()
    }

    fn location(&self) -> Location {
        match self.tokens.get(self.at) {
            Some(t) if !matches!(t.token, Token::EOF) => t.span.start,
            _ => self
                .tokens
                .last()
                .map_or(Location::new(1, 1), |t| t.span.end),
        }
    }

    fn error(&self, message: &str) -> Error {
        let at = self.location();
        let found = match self.peek() {
            Some(t) => format!("found {t}"),
            None => "found the end of the statement".into(),
        };
        Error::Query(format!(
            "{message}; {found} at line {}, column {}",
            at.line, at.column
        ))
    }

    /// Takes the next token if it is the keyword or word `w` (any case, unquoted).
    fn word(&mut self, w: &str) -> bool {
        match self.peek() {
            Some(Token::Word(word))
                if word.quote_style.is_none() && word.value.eq_ignore_ascii_case(w) =>
            {
                self.at += 1;
                true
            }
            _ => false,
        }
    }

    /// Takes the words in order if all of them come next, and nothing otherwise.
    fn words(&mut self, ws: &[&str]) -> bool {
        let start = self.at;
        if ws.iter().all(|w| self.word(w)) {
            true
        } else {
            self.at = start;
            false
        }
    }

    fn end(&mut self) -> Result<()> {
        if matches!(self.peek(), Some(Token::SemiColon)) {
            self.at += 1;
        }
        if self.done() {
            Ok(())
        } else {
            Err(self.error("unexpected text after the statement"))
        }
    }

    fn identifier(&mut self, what: &str) -> Result<String> {
        match self.peek() {
            Some(Token::Word(w))
                if w.quote_style.is_some()
                    || w.keyword == Keyword::NoKeyword
                    || !is_clause(&w.value) =>
            {
                let name = w.value.clone();
                self.at += 1;
                super::check_name(&name, what)?;
                Ok(name)
            }
            _ => Err(self.error(&format!("expected {what}"))),
        }
    }

    fn string(&mut self, what: &str) -> Result<String> {
        match self.peek() {
            Some(Token::SingleQuotedString(s)) => {
                let s = s.clone();
                self.at += 1;
                Ok(s)
            }
            _ => Err(self.error(&format!("expected {what}"))),
        }
    }

    /// A duration as written: `'5 minutes'`, `INTERVAL '5 minutes'` or `5m`.
    fn duration_text(&mut self) -> Result<String> {
        let at = self.location();
        self.word("INTERVAL");
        let text = match self.peek().cloned() {
            Some(Token::SingleQuotedString(s)) => {
                self.at += 1;
                s
            }
            Some(Token::Number(n, _)) => {
                self.at += 1;
                // `5m`: a number with its unit right after it.
                match self.peek() {
                    Some(Token::Word(w)) if w.quote_style.is_none() && !is_clause(&w.value) => {
                        let unit = w.value.clone();
                        self.at += 1;
                        format!("{n}{unit}")
                    }
                    _ => n,
                }
            }
            _ => return Err(self.error("expected a duration such as '1 minute'")),
        };
        parse_duration(&text)
            .map_err(|e| Error::Query(format!("{e} at line {}, column {}", at.line, at.column)))?;
        Ok(text)
    }

    fn duration(&mut self) -> Result<std::time::Duration> {
        let text = self.duration_text()?;
        parse_duration(&text)
    }

    /// `[FOR <duration>]`, zero when absent.
    fn hold(&mut self) -> Result<std::time::Duration> {
        if self.word("FOR") {
            self.duration()
        } else {
            Ok(std::time::Duration::ZERO)
        }
    }

    /// A SQL condition, up to the next clause keyword outside parentheses, checked to parse.
    fn condition(&mut self) -> Result<String> {
        let start = self.at;
        let mut depth = 0usize;
        while let Some(t) = self.peek() {
            match t {
                Token::LParen => depth += 1,
                Token::RParen => depth = depth.saturating_sub(1),
                Token::Word(w) if depth == 0 && w.quote_style.is_none() && is_clause(&w.value) => {
                    break;
                }
                Token::SemiColon if depth == 0 => break,
                _ => {}
            }
            self.at += 1;
        }
        if self.at == start {
            return Err(self.error("expected a condition such as value > 90"));
        }
        let from = self.tokens[start].span.start;
        let to = self.tokens[self.at - 1].span.end;
        let text = slice(self.sql, from, to).trim().to_owned();
        Parser::new(&PostgreSqlDialect {})
            .try_with_sql(&text)
            .and_then(|mut p| p.parse_expr())
            .map_err(|e| {
                Error::Query(format!(
                    "the condition at line {}, column {} does not parse: {e}",
                    from.line, from.column
                ))
            })?;
        Ok(text)
    }

    /// The text from the next token to the end, without a final `;`.
    fn rest(&mut self) -> &str {
        let Some(first) = self
            .tokens
            .get(self.at)
            .filter(|t| !matches!(t.token, Token::EOF))
        else {
            return "";
        };
        let start = offset(self.sql, first.span.start);
        let text = self.sql[start..].trim_end();
        self.at = self.tokens.len();
        text.strip_suffix(';').unwrap_or(text).trim_end()
    }
}

/// Words that start a clause of ours: a condition or an identifier stops before them.
fn is_clause(w: &str) -> bool {
    [
        "AS", "EVERY", "ON", "LATENESS", "BACKFILL", "INTO", "HEALTH", "NOTIFY", "ALLOCATE",
        "WARN", "FAIL", "FOR", "WHEN",
    ]
    .iter()
    .any(|k| k.eq_ignore_ascii_case(w))
}

/// The byte offset of a 1-based line and column (columns count characters).
fn offset(sql: &str, at: Location) -> usize {
    let mut line = 1u64;
    let mut column = 1u64;
    for (i, c) in sql.char_indices() {
        if line == at.line && column == at.column {
            return i;
        }
        if c == '\n' {
            line += 1;
            column = 1;
        } else {
            column += 1;
        }
    }
    sql.len()
}

/// The text between two token locations, both ends included.
fn slice(sql: &str, from: Location, to: Location) -> &str {
    let start = offset(sql, from);
    // `to` is the position just after the last character of the last token.
    let end = offset(sql, to).max(start);
    &sql[start..end]
}

/// `query` placed at `at` (line, column) of an otherwise blank text: a parser's error
/// positions in the result are positions in the statement the query was written in.
pub(super) fn positioned(query: &str, at: (u64, u64)) -> String {
    let (line, column) = (at.0.max(1) as usize, at.1.max(1) as usize);
    let mut out = "\n".repeat(line - 1);
    out.push_str(&" ".repeat(column - 1));
    out.push_str(query);
    out
}
