//! Tokens in a real server: refusing to listen off loopback without auth, the first admin
//! token made from the server's host, scoped tokens over HTTP (InfluxDB's header and v1
//! forms), psql with a token as its password, revocation, restarts, and tokens made offline.

use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use crate::harness::{Server, psql_as, serve_command};

fn forestall(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_forestall"))
        .args(args)
        .env_remove("FORESTALL_TOKEN")
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// `forestall token create` against `server` with `args`; the secret it printed.
fn create(server: &Server, token: Option<&str>, args: &[&str]) -> String {
    let url = server.url("");
    let mut all = vec!["token", "create", "--host", &url];
    if let Some(t) = token {
        all.extend(["--token", t]);
    }
    all.extend(args);
    let out = forestall(&all);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let secret = text(&out.stdout).trim().to_string();
    assert!(secret.starts_with("fst_"), "{secret}");
    secret
}

/// Status of a request with `Authorization: <auth>` (none when `None`).
fn status(method: &str, url: &str, auth: Option<&str>, body: &str) -> u16 {
    let mut req = ureq::request(method, url);
    if let Some(a) = auth {
        req = req.set("Authorization", a);
    }
    match req.send_string(body) {
        Ok(r) => r.status(),
        Err(ureq::Error::Status(code, _)) => code,
        Err(e) => panic!("{url}: {e}"),
    }
}

#[test]
fn a_server_off_loopback_needs_auth_or_says_it_goes_without() {
    let dir = tempfile::tempdir().unwrap();
    let start = Instant::now();
    let out = serve_command(dir.path(), &["--http-addr", "0.0.0.0:0"])
        .env("FORESTALL__COLLECTOR__ENABLED", "false")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(
        err.contains("HTTP on 0.0.0.0:0")
            && err.contains("--auth")
            && err.contains("--without-auth"),
        "{err}"
    );
    assert!(
        start.elapsed() < Duration::from_secs(30),
        "it did not stop at once"
    );
    // Saying so starts it, and it serves without tokens.
    let server = Server::start_with(
        dir.path(),
        &[],
        &["--http-addr", "0.0.0.0:0", "--without-auth"],
    );
    let url = server.url("/api/v3/query_sql?q=SELECT%201");
    assert_eq!(status("GET", &url, None, ""), 200);
    server.terminate();
}

#[test]
fn tokens_guard_http_and_postgres_and_outlive_restarts() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start_with(dir.path(), &[], &["--auth"]);
    let url = |p: &str| server.url(p);
    assert_eq!(status("GET", &url("/health"), None, ""), 200);
    assert_eq!(
        status("GET", &url("/api/v3/query_sql?q=SELECT%201"), None, ""),
        401
    );
    // The first token, from this host, without a token; then no more of those.
    let root = create(&server, None, &["--name", "root", "--admin"]);
    let out = forestall(&[
        "token",
        "create",
        "--host",
        &url(""),
        "--name",
        "r2",
        "--admin",
    ]);
    assert!(!out.status.success());
    assert!(text(&out.stderr).contains("401"), "{}", text(&out.stderr));
    // Scoped tokens, made with the admin token.
    let writer = create(
        &server,
        Some(&root),
        &["--name", "cpu-writer", "--permission", "write:cpu"],
    );
    let reader = create(
        &server,
        Some(&root),
        &["--name", "reader", "--permission", "query"],
    );
    // InfluxDB's clients: `Token` in v2, `u`/`p` in v1.
    let v2 = url("/api/v2/write?precision=s");
    let auth = format!("Token {writer}");
    assert_eq!(
        status("POST", &v2, Some(&auth), "cpu,host=a u=1 1767225600"),
        204
    );
    let v1 = url(&format!("/write?db=x&precision=s&u=me&p={writer}"));
    assert_eq!(status("POST", &v1, None, "cpu,host=b u=2 1767225600"), 204);
    assert_eq!(
        status("POST", &v2, Some(&auth), "mem,host=a used=1 1767225600"),
        403
    );
    assert_eq!(
        status("POST", &v2, Some(&format!("Bearer {reader}")), "cpu u=3 1"),
        403
    );
    // The CLI with the reader's token, and without one.
    let q = ["query", "--host", &url(""), "SELECT count(*) AS n FROM cpu"];
    let out = forestall(&q);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("--token"),
        "{}",
        text(&out.stderr)
    );
    let mut with = q.to_vec();
    with.extend(["--token", &reader, "--format", "csv"]);
    let out = forestall(&with);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout).trim(), "n\n2");
    // psql: the token is the password.
    let (ok, rows, err) = psql_as(&server, Some(&reader), "SELECT count(*) FROM cpu");
    assert!(ok, "{err}");
    assert_eq!(rows.trim(), "2");
    for (password, why) in [(None, "no password"), (Some("fst_wrong"), "not valid")] {
        let (ok, _, err) = psql_as(&server, password, "SELECT 1");
        assert!(!ok, "{password:?}");
        assert!(
            err.contains(why) || err.contains("password"),
            "{password:?}: {err}"
        );
    }
    let (ok, _, err) = psql_as(&server, Some(&writer), "SELECT 1");
    assert!(!ok && err.contains("query permission"), "{err}");
    // Querying is not administering: no continuous queries from a reader.
    let cq = "CREATE CONTINUOUS QUERY c EVERY '1m' INTO cpu_1m AS SELECT date_bin(INTERVAL '1 minute', time) AS time, avg(u) AS u FROM cpu GROUP BY 1";
    let (ok, _, err) = psql_as(&server, Some(&reader), cq);
    assert!(!ok && err.contains("42501"), "{err}");
    let (ok, _, err) = psql_as(&server, Some(&root), cq);
    assert!(ok, "{err}");
    // The list shows names and permissions, never secrets.
    let out = forestall(&["token", "list", "--host", &url(""), "--token", &root]);
    let listed = text(&out.stdout);
    assert!(out.status.success(), "{}", text(&out.stderr));
    for name in ["root", "cpu-writer", "reader"] {
        assert!(listed.contains(name), "{listed}");
    }
    assert!(listed.contains("write:cpu"));
    assert!(!listed.contains(&root) && !listed.contains(&writer) && !listed.contains(&reader));
    // Revoked: refused at once.
    let out = forestall(&[
        "token",
        "revoke",
        "cpu-writer",
        "--host",
        &url(""),
        "--token",
        &root,
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(status("POST", &v2, Some(&auth), "cpu u=4 1767225601"), 401);
    server.terminate();
    // A token made offline, in the stopped server's store.
    let data = dir.path().to_str().unwrap();
    let out = forestall(&[
        "token",
        "create",
        "--data-dir",
        data,
        "--name",
        "offline",
        "--permission",
        "write",
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let offline = text(&out.stdout).trim().to_string();
    // After a restart: the reader still works, the revoked writer still does not, and the
    // offline token does.
    let server = Server::start_with(dir.path(), &[], &["--auth"]);
    let v2 = server.url("/api/v2/write?precision=s");
    assert_eq!(status("POST", &v2, Some(&auth), "cpu u=5 1767225602"), 401);
    let bearer = format!("Bearer {offline}");
    assert_eq!(
        status("POST", &v2, Some(&bearer), "cpu u=6 1767225603"),
        204
    );
    let (ok, rows, err) = psql_as(&server, Some(&reader), "SELECT count(*) FROM cpu");
    assert!(ok, "{err}");
    assert_eq!(rows.trim(), "3");
    // Every change made through the API is in the audit trail, with the token's name, the
    // refused ones too, and it outlived the restart; secrets are never in it.
    let (ok, trail, err) = psql_as(
        &server,
        Some(&reader),
        "SELECT token, method, path, status, detail FROM forestall_audit ORDER BY time",
    );
    assert!(ok, "{err}");
    let lines: Vec<&str> = trail.lines().collect();
    for expected in [
        "first-token,POST,/api/v1/tokens,201,",
        "root,POST,/api/v1/tokens,201,",
        "reader,SQL,CREATE CONTINUOUS QUERY c,403,CREATE CONTINUOUS QUERY c EVERY",
        "root,SQL,CREATE CONTINUOUS QUERY c,200,",
        "root,DELETE,/api/v1/tokens/cpu-writer,",
    ] {
        assert!(
            lines.iter().any(|l| l.starts_with(expected)),
            "no {expected:?} in the trail:\n{trail}"
        );
    }
    assert!(lines[0].starts_with("first-token,"), "{trail}");
    for secret in [&root, &writer, &reader] {
        assert!(!trail.contains(secret.as_str()), "a secret in the trail");
    }
    // While it runs, its store cannot be opened offline.
    let out = forestall(&["token", "list", "--data-dir", data]);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("still running"),
        "{}",
        text(&out.stderr)
    );
    server.terminate();
}
