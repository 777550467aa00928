//! Tokens: who may do what over HTTP and the PostgreSQL protocol.
//!
//! A token is a random secret (`fst_` and 43 base64url characters: 256 bits) with a name, a
//! set of permissions and an optional expiry. The secret is shown once, when it is created;
//! the store keeps only its SHA-256 (a secret of 256 random bits needs no slow hash: there is
//! no dictionary to try). Tokens live in the store's catalog entries (`auth/token/<name>`),
//! so they are as durable as the data and survive a restart.
//!
//! | permission | allows |
//! |---|---|
//! | `*` | everything, including managing tokens (`forestall token create --admin`) |
//! | `write` | the write endpoints (line protocol, remote write) |
//! | `write:<measurement>` | writes of that measurement only (repeat for more) |
//! | `query` | SQL over HTTP and the PostgreSQL protocol, and every read-only view |
//! | `admin` | flush, compact, retention, continuous queries |
//! | `actuate` | components' preferences (what the allocation loop may do to them), and turning actuation on or off (`/api/v1/actuation`) |
//!
//! A request carries its token as `Authorization: Bearer <token>` or `Token <token>` (the
//! InfluxDB clients' forms), as the password of HTTP Basic, or as InfluxDB v1's `p`
//! parameter; a PostgreSQL client sends it as its password (any user name). When auth is on,
//! every endpoint but `/health` and the console's static files checks it: no token or an
//! unknown, expired or revoked one is 401, a token without the permission is 403.
//!
//! **The first token.** With auth on and no `*` token yet, `POST /api/v1/tokens` creates one
//! without a token, from a loopback client only (`forestall token create --admin` on the
//! server's host), as `influxdb3 create token --admin` does; or `forestall token create
//! --admin --data-dir DIR` writes it into a stopped server's store.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use forestall_engine::store::{Entries, now_nanos};
use parking_lot::RwLock;
use rand::RngCore;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// The catalog entries' key prefix of tokens.
const PREFIX: &str = "auth/token/";

/// Every secret starts with this, so a leaked one is recognisable (secret scanners).
pub const SECRET_PREFIX: &str = "fst_";

/// What a token may do.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Permission {
    /// Everything, including tokens.
    All,
    /// Writes; of one measurement when `Some`.
    Write(Option<String>),
    Query,
    Admin,
    Actuate,
}

impl Permission {
    /// Parses `*`, `write`, `write:<measurement>`, `query`, `admin` or `actuate`.
    pub fn parse(text: &str) -> Result<Self, String> {
        Ok(match text {
            "*" => Permission::All,
            "write" => Permission::Write(None),
            "query" => Permission::Query,
            "admin" => Permission::Admin,
            "actuate" => Permission::Actuate,
            other => match other.strip_prefix("write:") {
                Some(m) if !m.is_empty() => Permission::Write(Some(m.to_string())),
                _ => {
                    return Err(format!(
                        "unknown permission {other:?}: use *, write, write:<measurement>, query, admin or actuate"
                    ));
                }
            },
        })
    }
}

impl std::fmt::Display for Permission {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Permission::All => f.write_str("*"),
            Permission::Write(None) => f.write_str("write"),
            Permission::Write(Some(m)) => write!(f, "write:{m}"),
            Permission::Query => f.write_str("query"),
            Permission::Admin => f.write_str("admin"),
            Permission::Actuate => f.write_str("actuate"),
        }
    }
}

/// What a request needs (see [`required`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Need {
    /// Nothing: `/health` and the console's static files.
    Nothing,
    /// Some write permission (which measurements is checked against the body).
    Write,
    Query,
    Admin,
    Actuate,
    /// The `*` permission: managing tokens.
    All,
}

/// A stored token: everything but its secret.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Token {
    pub name: String,
    /// The SHA-256 of the secret, hex.
    pub hash: String,
    /// As [`Permission::parse`] reads them.
    pub permissions: Vec<String>,
    /// Nanoseconds since the epoch.
    pub created: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires: Option<i64>,
}

/// The caller a token names, once checked.
#[derive(Debug, Clone, PartialEq)]
pub struct Identity {
    pub name: String,
    permissions: BTreeSet<Permission>,
    /// A loopback caller without a token while no `*` token exists: it may create that
    /// first token and nothing else.
    pub first_token: bool,
}

impl Identity {
    /// The identity of every request when auth is off.
    pub fn anonymous() -> Self {
        Self {
            name: String::new(),
            permissions: [Permission::All].into(),
            first_token: false,
        }
    }

    /// A caller of what needs nothing (`/health`, the console's files): no permission.
    pub fn nobody() -> Self {
        Self {
            name: String::new(),
            permissions: BTreeSet::new(),
            first_token: false,
        }
    }

    /// A loopback caller creating the first `*` token (see the module's doc).
    pub fn first_token() -> Self {
        Self {
            name: String::new(),
            permissions: BTreeSet::new(),
            first_token: true,
        }
    }

    /// Its name in the audit trail: the token's, `anonymous` with auth off, `first-token`
    /// for the loopback caller making the first admin token.
    pub fn audit_name(&self) -> &str {
        match (self.name.as_str(), self.first_token) {
            ("", true) => "first-token",
            ("", false) => "anonymous",
            (name, _) => name,
        }
    }

    /// Whether it has `need`.
    pub fn allows(&self, need: Need) -> bool {
        let p = &self.permissions;
        p.contains(&Permission::All)
            || match need {
                Need::Nothing => true,
                Need::Write => p.iter().any(|p| matches!(p, Permission::Write(_))),
                Need::Query => p.contains(&Permission::Query),
                Need::Admin => p.contains(&Permission::Admin),
                Need::Actuate => p.contains(&Permission::Actuate),
                Need::All => false,
            }
    }

    /// Whether it may write `measurement`.
    pub fn may_write(&self, measurement: &str) -> bool {
        self.permissions.iter().any(|p| match p {
            Permission::All | Permission::Write(None) => true,
            Permission::Write(Some(m)) => m == measurement,
            _ => false,
        })
    }

    /// Whether it may write every measurement (no per-measurement check is needed).
    pub fn writes_anything(&self) -> bool {
        self.permissions
            .iter()
            .any(|p| matches!(p, Permission::All | Permission::Write(None)))
    }
}

/// Why a token was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    #[error("this endpoint needs a token: send `Authorization: Bearer <token>`")]
    Missing,
    #[error("the token is not valid (unknown, revoked or mistyped)")]
    Unknown,
    #[error("the token {0:?} expired")]
    Expired(String),
    #[error("the token {name:?} does not allow this: it needs the {need} permission")]
    Forbidden { name: String, need: &'static str },
}

impl Need {
    fn permission_name(self) -> &'static str {
        match self {
            Need::Nothing => "no",
            Need::Write => "write",
            Need::Query => "query",
            Need::Admin => "admin",
            Need::Actuate => "actuate",
            Need::All => "*",
        }
    }
}

/// What a request to create a token asks for.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenSpec {
    pub name: String,
    pub permissions: Vec<String>,
    /// A duration from now (`30d`), or an RFC 3339 time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires: Option<String>,
}

/// Why a token could not be made or removed.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("{0}")]
    Invalid(String),
    #[error("a token named {0:?} exists: revoke it first, or choose another name")]
    Exists(String),
    #[error("no token named {0:?}")]
    NotFound(String),
    #[error("{0}")]
    Forbidden(String),
    #[error("store the token: {0}")]
    Store(#[from] forestall_engine::Error),
}

/// The server's tokens: loaded from the catalog at start, changed through it.
#[derive(Debug, Clone)]
pub struct Tokens {
    entries: Entries,
    by_name: Arc<RwLock<BTreeMap<String, Token>>>,
}

impl Tokens {
    /// The tokens kept in `entries`.
    pub fn load(entries: Entries) -> Result<Self, TokenError> {
        let mut by_name = BTreeMap::new();
        for (key, value) in entries.list(PREFIX)? {
            let token: Token = serde_json::from_slice(&value).map_err(|e| {
                TokenError::Invalid(format!("stored token {key} is unreadable: {e}"))
            })?;
            by_name.insert(token.name.clone(), token);
        }
        Ok(Self {
            entries,
            by_name: Arc::new(RwLock::new(by_name)),
        })
    }

    /// Every token, by name (no secrets: only hashes are kept).
    pub fn list(&self) -> Vec<Token> {
        self.by_name.read().values().cloned().collect()
    }

    /// Whether a `*` token exists (after which the first-token exception is closed).
    pub fn has_admin(&self) -> bool {
        self.by_name
            .read()
            .values()
            .any(|t| t.permissions.iter().any(|p| p == "*"))
    }

    /// Makes a token as `spec` says, stores it durably, and returns its secret (the only
    /// time it is seen) with the stored record. `first` (a caller without a token): only a
    /// `*` token, and only while none exists.
    pub fn create(&self, spec: &TokenSpec, first: bool) -> Result<(String, Token), TokenError> {
        let name = spec.name.trim();
        if name.is_empty()
            || name.len() > 128
            || !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        {
            return Err(TokenError::Invalid(format!(
                "a token's name is 1 to 128 letters, digits, '-', '_' or '.', not {:?}",
                spec.name
            )));
        }
        if spec.permissions.is_empty() {
            return Err(TokenError::Invalid(
                "a token needs at least one permission: *, write, write:<measurement>, query, admin or actuate"
                    .into(),
            ));
        }
        let permissions: BTreeSet<Permission> = spec
            .permissions
            .iter()
            .map(|p| Permission::parse(p.trim()))
            .collect::<Result<_, _>>()
            .map_err(TokenError::Invalid)?;
        let now = now_nanos();
        let expires = spec
            .expires
            .as_deref()
            .map(|e| parse_expiry(e, now))
            .transpose()
            .map_err(TokenError::Invalid)?;
        let mut secret = [0u8; 32];
        rand::rng().fill_bytes(&mut secret);
        let secret = format!(
            "{SECRET_PREFIX}{}",
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(secret)
        );
        let token = Token {
            name: name.to_string(),
            hash: hex(&Sha256::digest(secret.as_bytes())),
            permissions: permissions.iter().map(Permission::to_string).collect(),
            created: now,
            expires,
        };
        let mut all = self.by_name.write();
        if first {
            let admin = all.values().any(|t| t.permissions.iter().any(|p| p == "*"));
            if admin || permissions != BTreeSet::from([Permission::All]) {
                return Err(TokenError::Forbidden(
                    "without a token, only the first admin token can be created (permissions [\"*\"]), and only while none exists".into(),
                ));
            }
        }
        if all.contains_key(name) {
            return Err(TokenError::Exists(name.to_string()));
        }
        let json = serde_json::to_vec(&token).expect("a token serialises");
        self.entries
            .put(&[(format!("{PREFIX}{name}"), Some(json))])?;
        all.insert(token.name.clone(), token.clone());
        Ok((secret, token))
    }

    /// Removes token `name` for good: requests with it are refused from now on.
    pub fn revoke(&self, name: &str) -> Result<(), TokenError> {
        let mut all = self.by_name.write();
        if !all.contains_key(name) {
            return Err(TokenError::NotFound(name.to_string()));
        }
        self.entries.put(&[(format!("{PREFIX}{name}"), None)])?;
        all.remove(name);
        Ok(())
    }

    /// The identity `secret` names, if it is a live token. Every stored hash is compared,
    /// each in constant time, so the answer's timing says nothing about which bytes matched.
    pub fn authenticate(&self, secret: &str) -> Result<Identity, Refused> {
        let digest = Sha256::digest(secret.as_bytes());
        let presented = hex(&digest);
        let mut found = None;
        for token in self.by_name.read().values() {
            if constant_time_eq(token.hash.as_bytes(), presented.as_bytes()) {
                found = Some(token.clone());
            }
        }
        let token = found.ok_or(Refused::Unknown)?;
        if token.expires.is_some_and(|e| e <= now_nanos()) {
            return Err(Refused::Expired(token.name));
        }
        Ok(Identity {
            first_token: false,
            permissions: token
                .permissions
                .iter()
                .filter_map(|p| Permission::parse(p).ok())
                .collect(),
            name: token.name,
        })
    }

    /// Checks a request's token (if any) against `need`.
    pub fn check(&self, secret: Option<&str>, need: Need) -> Result<Identity, Refused> {
        if need == Need::Nothing {
            return Ok(Identity::nobody());
        }
        let identity = self.authenticate(secret.ok_or(Refused::Missing)?)?;
        if !identity.allows(need) {
            return Err(Refused::Forbidden {
                name: identity.name,
                need: need.permission_name(),
            });
        }
        Ok(identity)
    }
}

/// A token's expiry: a duration from `now` (`30d`, `12h`) or an RFC 3339 time, in the future.
fn parse_expiry(text: &str, now: i64) -> Result<i64, String> {
    let at = match humantime::parse_duration(text) {
        Ok(d) => now.saturating_add(i64::try_from(d.as_nanos()).unwrap_or(i64::MAX)),
        Err(_) => {
            let t = humantime::parse_rfc3339_weak(text).map_err(|_| {
                format!("expires {text:?} is neither a duration (30d) nor an RFC 3339 time")
            })?;
            let d = t
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or(Duration::ZERO);
            i64::try_from(d.as_nanos()).unwrap_or(i64::MAX)
        }
    };
    if at <= now {
        return Err(format!("expires {text:?} is not in the future"));
    }
    Ok(at)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Equal slices, compared without an early exit.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The token of an HTTP request: `Authorization: Bearer|Token <t>`, Basic's password, or
/// InfluxDB v1's `p` query parameter (decoded as the handlers decode their parameters).
pub fn secret_of(headers: &axum::http::HeaderMap, uri: &axum::http::Uri) -> Option<String> {
    if let Some(value) = headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
    {
        let (scheme, rest) = value.trim().split_once(' ').unwrap_or((value, ""));
        let rest = rest.trim();
        if scheme.eq_ignore_ascii_case("bearer") || scheme.eq_ignore_ascii_case("token") {
            return Some(rest.to_string());
        }
        if scheme.eq_ignore_ascii_case("basic") {
            let decoded = base64::engine::general_purpose::STANDARD
                .decode(rest)
                .ok()?;
            let decoded = String::from_utf8(decoded).ok()?;
            return decoded.split_once(':').map(|(_, p)| p.to_string());
        }
        return None;
    }
    let axum::extract::Query(mut params) =
        axum::extract::Query::<std::collections::HashMap<String, String>>::try_from_uri(uri)
            .ok()?;
    params.remove("p")
}

/// What a request to `path` with `method` needs.
pub fn required(method: &axum::http::Method, path: &str) -> Need {
    use axum::http::Method;
    let read = method == Method::GET || method == Method::HEAD;
    match path {
        "/health" | "/" | "/console/app.js" | "/console/app.css" => Need::Nothing,
        "/api/v2/write" | "/write" | "/api/v1/write" => Need::Write,
        "/api/v3/query_sql" | "/metrics" => Need::Query,
        p if p.starts_with("/api/v1/tokens") => Need::All,
        p if p.starts_with("/api/v1/admin/") => Need::Admin,
        p if p.starts_with("/api/v1/retention") || p.starts_with("/api/v1/continuous_queries") => {
            if read {
                Need::Query
            } else {
                Need::Admin
            }
        }
        p if p.starts_with("/api/v1/preferences") || p == "/api/v1/actuation" => {
            if read {
                Need::Query
            } else {
                Need::Actuate
            }
        }
        // Every other view (allocations, forecasts, models, risks, health, targets), and
        // paths that do not exist (which then answer 404 to a caller with a token only).
        _ => {
            if read {
                Need::Query
            } else {
                Need::All
            }
        }
    }
}

#[cfg(test)]
mod tests;
