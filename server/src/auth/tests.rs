use super::*;
use axum::http::{HeaderMap, HeaderValue, Method};
use forestall_engine::{EngineConfig, Store};

fn store(dir: &std::path::Path) -> Store {
    Store::open(EngineConfig {
        data_dir: dir.to_path_buf(),
        ..Default::default()
    })
    .unwrap()
}

fn spec(name: &str, permissions: &[&str]) -> TokenSpec {
    TokenSpec {
        name: name.into(),
        permissions: permissions.iter().map(|p| p.to_string()).collect(),
        expires: None,
    }
}

#[test]
fn permissions_parse_and_print_back_and_bad_ones_are_refused() {
    for text in ["*", "write", "write:cpu", "query", "admin", "actuate"] {
        assert_eq!(Permission::parse(text).unwrap().to_string(), text);
    }
    for bad in ["", "read", "write:", "WRITE", "admin "] {
        let e = Permission::parse(bad).unwrap_err();
        assert!(e.contains("write:<measurement>"), "{bad}: {e}");
    }
}

#[test]
fn a_token_works_until_it_is_revoked_and_only_its_hash_is_kept() {
    let dir = tempfile::tempdir().unwrap();
    let s = store(dir.path());
    let tokens = Tokens::load(s.entries()).unwrap();
    let (secret, token) = tokens
        .create(&spec("ci", &["write:cpu", "query"]), false)
        .unwrap();
    assert!(
        secret.starts_with(SECRET_PREFIX) && secret.len() == 4 + 43,
        "{secret}"
    );
    assert_ne!(token.hash, secret);
    assert!(
        !serde_json::to_string(&tokens.list())
            .unwrap()
            .contains(&secret)
    );
    let id = tokens.authenticate(&secret).unwrap();
    assert_eq!(id.name, "ci");
    assert!(id.allows(Need::Write) && id.allows(Need::Query));
    assert!(!id.allows(Need::Admin) && !id.allows(Need::Actuate) && !id.allows(Need::All));
    assert!(id.may_write("cpu") && !id.may_write("mem") && !id.writes_anything());
    // A near miss is no token.
    let mut wrong = secret.clone();
    wrong.pop();
    wrong.push('A');
    if wrong == secret {
        wrong.push('B');
    }
    assert_eq!(tokens.authenticate(&wrong), Err(Refused::Unknown));
    assert_eq!(tokens.check(None, Need::Query), Err(Refused::Missing));
    assert!(matches!(
        tokens.check(Some(&secret), Need::Admin),
        Err(Refused::Forbidden { need: "admin", .. })
    ));
    // Names are unique; a second token gets another secret.
    assert!(matches!(
        tokens.create(&spec("ci", &["query"]), false),
        Err(TokenError::Exists(_))
    ));
    let (other, _) = tokens.create(&spec("ro", &["query"]), false).unwrap();
    assert_ne!(other, secret);
    // Kept across a restart, hashes only.
    drop(tokens);
    drop(s);
    let s = store(dir.path());
    let tokens = Tokens::load(s.entries()).unwrap();
    assert_eq!(tokens.authenticate(&secret).unwrap().name, "ci");
    tokens.revoke("ci").unwrap();
    assert_eq!(tokens.authenticate(&secret), Err(Refused::Unknown));
    assert!(matches!(tokens.revoke("ci"), Err(TokenError::NotFound(_))));
    drop(tokens);
    drop(s);
    let s = store(dir.path());
    let tokens = Tokens::load(s.entries()).unwrap();
    assert_eq!(tokens.authenticate(&secret), Err(Refused::Unknown));
    assert_eq!(tokens.authenticate(&other).unwrap().name, "ro");
    drop(s);
    let mut found = false;
    for entry in walk(dir.path()) {
        let bytes = std::fs::read(&entry).unwrap_or_default();
        found |= bytes.windows(other.len()).any(|w| w == other.as_bytes());
    }
    assert!(
        !found,
        "a token's secret is stored somewhere under the data directory"
    );
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

#[test]
fn expiry_is_checked_and_must_be_in_the_future() {
    let dir = tempfile::tempdir().unwrap();
    let s = store(dir.path());
    let tokens = Tokens::load(s.entries()).unwrap();
    let mut short = spec("short", &["query"]);
    short.expires = Some("1s".into());
    let (secret, token) = tokens.create(&short, false).unwrap();
    assert!(token.expires.unwrap() > token.created);
    assert!(tokens.authenticate(&secret).is_ok());
    std::thread::sleep(std::time::Duration::from_millis(1100));
    assert_eq!(
        tokens.authenticate(&secret),
        Err(Refused::Expired("short".into()))
    );
    let mut dated = spec("dated", &["query"]);
    dated.expires = Some("2999-01-01T00:00:00Z".into());
    assert!(tokens.create(&dated, false).is_ok());
    for bad in ["2001-01-01T00:00:00Z", "soon", "0s"] {
        let mut s = spec("bad", &["query"]);
        s.expires = Some(bad.into());
        assert!(
            matches!(tokens.create(&s, false), Err(TokenError::Invalid(_))),
            "{bad}"
        );
    }
}

#[test]
fn bad_names_and_permissions_are_refused_with_a_reason() {
    let dir = tempfile::tempdir().unwrap();
    let s = store(dir.path());
    let tokens = Tokens::load(s.entries()).unwrap();
    for (name, permissions) in [
        ("", &["query"][..]),
        ("a/b", &["query"]),
        ("a b", &["query"]),
        (&"x".repeat(129), &["query"]),
        ("ok", &[]),
        ("ok", &["read"]),
    ] {
        let e = tokens.create(&spec(name, permissions), false).unwrap_err();
        assert!(
            matches!(e, TokenError::Invalid(_)),
            "{name:?} {permissions:?}: {e}"
        );
    }
    assert!(tokens.list().is_empty());
}

#[test]
fn without_a_token_only_the_first_admin_token_can_be_made() {
    let dir = tempfile::tempdir().unwrap();
    let s = store(dir.path());
    let tokens = Tokens::load(s.entries()).unwrap();
    assert!(!tokens.has_admin());
    assert!(matches!(
        tokens.create(&spec("w", &["write"]), true),
        Err(TokenError::Forbidden(_))
    ));
    let (root, _) = tokens.create(&spec("root", &["*"]), true).unwrap();
    assert!(tokens.has_admin());
    assert!(tokens.authenticate(&root).unwrap().allows(Need::All));
    assert!(matches!(
        tokens.create(&spec("root2", &["*"]), true),
        Err(TokenError::Forbidden(_))
    ));
}

#[test]
fn a_secret_comes_from_bearer_token_basic_or_the_v1_parameter() {
    let root: axum::http::Uri = "/write".parse().unwrap();
    let query = |q: &str| -> axum::http::Uri { format!("/write?{q}").parse().unwrap() };
    let with = |value: &str| {
        let mut h = HeaderMap::new();
        h.insert(
            axum::http::header::AUTHORIZATION,
            HeaderValue::from_str(value).unwrap(),
        );
        h
    };
    assert_eq!(
        secret_of(&with("Bearer fst_a"), &root).as_deref(),
        Some("fst_a")
    );
    assert_eq!(
        secret_of(&with("Token fst_b"), &root).as_deref(),
        Some("fst_b")
    );
    assert_eq!(
        secret_of(&with("bearer  fst_c "), &root).as_deref(),
        Some("fst_c")
    );
    // Basic: user:token, base64.
    let basic = base64::engine::general_purpose::STANDARD.encode("me:fst_d");
    assert_eq!(
        secret_of(&with(&format!("Basic {basic}")), &root).as_deref(),
        Some("fst_d")
    );
    assert_eq!(secret_of(&with("Basic !!!"), &root), None);
    assert_eq!(secret_of(&with("Digest x"), &root), None);
    // InfluxDB v1: ?u=me&p=token, percent-decoded; a header wins.
    assert_eq!(
        secret_of(&HeaderMap::new(), &query("db=x&u=me&p=fst_e%2Bf")).as_deref(),
        Some("fst_e+f")
    );
    assert_eq!(
        secret_of(&HeaderMap::new(), &query("p=%zz%4")).as_deref(),
        Some("%zz%4")
    );
    assert_eq!(secret_of(&HeaderMap::new(), &query("db=x")), None);
    assert_eq!(secret_of(&HeaderMap::new(), &root), None);
}

#[test]
fn each_route_needs_its_permission() {
    let (get, post, put, delete) = (Method::GET, Method::POST, Method::PUT, Method::DELETE);
    for (method, path, need) in [
        (&get, "/health", Need::Nothing),
        (&get, "/", Need::Nothing),
        (&get, "/console/app.js", Need::Nothing),
        (&post, "/api/v2/write", Need::Write),
        (&post, "/write", Need::Write),
        (&post, "/api/v1/write", Need::Write),
        (&get, "/api/v3/query_sql", Need::Query),
        (&post, "/api/v3/query_sql", Need::Query),
        (&get, "/metrics", Need::Query),
        (&post, "/api/v1/admin/flush", Need::Admin),
        (&post, "/api/v1/admin/compact", Need::Admin),
        (&get, "/api/v1/retention", Need::Query),
        (&put, "/api/v1/retention/cpu", Need::Admin),
        (&get, "/api/v1/continuous_queries", Need::Query),
        (&put, "/api/v1/continuous_queries/x", Need::Admin),
        (&delete, "/api/v1/continuous_queries/x", Need::Admin),
        (&post, "/api/v1/continuous_queries/x/run", Need::Admin),
        (&get, "/api/v1/preferences", Need::Query),
        (&put, "/api/v1/preferences/web", Need::Actuate),
        (&get, "/api/v1/actuation", Need::Query),
        (&put, "/api/v1/actuation", Need::Actuate),
        (&get, "/api/v1/allocations", Need::Query),
        (&get, "/api/v1/risks", Need::Query),
        (&get, "/api/v1/health", Need::Query),
        (&get, "/api/v1/targets", Need::Query),
        (&get, "/api/v1/tokens", Need::All),
        (&post, "/api/v1/tokens", Need::All),
        (&delete, "/api/v1/tokens/ci", Need::All),
        (&post, "/no/such/thing", Need::All),
    ] {
        assert_eq!(required(method, path), need, "{method} {path}");
    }
}
