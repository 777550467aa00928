//! Safe to expose (issue 23): TLS on both ports with a certificate the test makes (curl,
//! psql and psycopg verifying it), clients that trickle bytes or hold a thousand connections,
//! the connection limits, and the memory one query may hold, each against a real server.

use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use crate::harness::{Server, post, psql, python_ok, sql};

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// A private CA and a server certificate it signs for 127.0.0.1 and localhost, made with
/// `openssl`: (CA certificate, server certificate, server key), as PEM files.
fn certificates(dir: &Path) -> (String, String, String) {
    let path = |name: &str| dir.join(name).to_str().unwrap().to_string();
    let openssl = |args: &str| {
        let out = Command::new("openssl")
            .args(args.split_whitespace())
            .output()
            .expect("run openssl (scripts/setup.sh installs it)");
        assert!(out.status.success(), "{}", text(&out.stderr));
    };
    let ec = "-newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes";
    let (ca, ca_key) = (path("ca.pem"), path("ca.key"));
    let (csr, cert, key, ext) = (
        path("server.csr"),
        path("cert.pem"),
        path("key.pem"),
        path("ext"),
    );
    openssl(&format!(
        "req -x509 {ec} -days 2 -subj /CN=forestall-test-ca -keyout {ca_key} -out {ca}"
    ));
    openssl(&format!(
        "req {ec} -subj /CN=forestall -keyout {key} -out {csr}"
    ));
    std::fs::write(
        &ext,
        "subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\n\
         keyUsage=digitalSignature\nextendedKeyUsage=serverAuth\n",
    )
    .unwrap();
    openssl(&format!(
        "x509 -req -in {csr} -CA {ca} -CAkey {ca_key} -CAcreateserial -days 2 -extfile {ext} \
         -out {cert}"
    ));
    (ca, cert, key)
}

fn curl(args: &[&str]) -> Output {
    Command::new("curl")
        .args(["-sS", "--max-time", "20"])
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run curl (scripts/setup.sh installs it)")
}

/// `psql` with a libpq connection string and `PGPASSWORD`: (success, stdout, stderr).
fn psql_conn(conn: &str, password: &str, sql: &str) -> (bool, String, String) {
    let out = Command::new("psql")
        .arg(conn)
        .args(["-w", "-X", "-A", "-t", "-v", "VERBOSITY=verbose", "-c", sql])
        .env("PGPASSWORD", password)
        .env("PGCONNECT_TIMEOUT", "10")
        .output()
        .expect("run psql (scripts/setup.sh installs it)");
    (out.status.success(), text(&out.stdout), text(&out.stderr))
}

#[test]
fn tls_serves_https_and_postgres_with_a_certificate_curl_psql_and_psycopg_verify() {
    let dir = tempfile::tempdir().unwrap();
    let (ca, cert, key) = certificates(dir.path());
    let server = Server::start_with(
        &dir.path().join("data"),
        &[
            ("FORESTALL__TLS__CERT", cert.as_str()),
            ("FORESTALL__TLS__KEY", key.as_str()),
        ],
        &["--auth"],
    );
    let https = |path: &str| format!("https://{}{path}", server.addr);
    // The first token, from the server's host, by the CLI over HTTPS trusting the
    // certificate; without it, the CLI does not trust the server.
    let cli = |ca: Option<&str>| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_forestall"));
        cmd.args(["token", "create", "--admin", "--name", "root", "--host"])
            .arg(https(""))
            .env_remove("FORESTALL_TOKEN");
        if let Some(ca) = ca {
            cmd.args(["--cacert", ca]);
        }
        cmd.output().unwrap()
    };
    let out = cli(None);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("certificate"),
        "{}",
        text(&out.stderr)
    );
    let out = cli(Some(&ca));
    assert!(out.status.success(), "{}", text(&out.stderr));
    let token = text(&out.stdout).trim().to_string();
    let auth = format!("Authorization: Token {token}");
    // curl verifies the server against the test's certificate.
    let out = curl(&["--cacert", &ca, &https("/health")]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("pass"), "{}", text(&out.stdout));
    let write = https("/api/v2/write?precision=s");
    let out = curl(&[
        "--cacert",
        &ca,
        "-H",
        &auth,
        "-w",
        "%{http_code}",
        "--data-binary",
        "cpu,host=a u=7 1767225600",
        &write,
    ]);
    assert_eq!(text(&out.stdout), "204", "{}", text(&out.stderr));
    let query = https("/api/v3/query_sql?q=SELECT%20u%20FROM%20cpu");
    let out = curl(&["--cacert", &ca, "-H", &auth, &query]);
    assert!(
        text(&out.stdout).contains("\"u\":7.0"),
        "{}",
        text(&out.stdout)
    );
    // Without the certificate, curl does not trust the server (exit 60); and the port
    // speaks TLS only: a plain-text request gets no HTTP answer.
    let out = curl(&[&https("/health")]);
    assert_eq!(out.status.code(), Some(60), "{}", text(&out.stderr));
    let out = curl(&[&format!("http://{}/health", server.addr)]);
    assert!(!out.status.success(), "{}", text(&out.stdout));
    // PostgreSQL: psql with verify-full (the certificate names 127.0.0.1) and the token
    // as its password.
    let (host, port) = server.pg_addr.rsplit_once(':').unwrap();
    let conn = |mode: &str| {
        format!(
            "host={host} port={port} user=grafana dbname=forestall sslmode={mode} \
             sslrootcert={ca}"
        )
    };
    let (ok, out, err) = psql_conn(&conn("verify-full"), &token, "SELECT u FROM cpu");
    assert!(ok, "{err}");
    assert_eq!(out.trim().parse::<f64>().ok(), Some(7.0), "{out}");
    // The token is not taken over a connection without TLS.
    let (ok, _, err) = psql_conn(&conn("disable"), &token, "SELECT 1");
    assert!(!ok);
    assert!(err.contains("only over TLS"), "{err}");
    // psycopg, verifying the certificate too.
    python_ok(
        r#"
import sys, psycopg
host, port, ca, token = sys.argv[1:5]
with psycopg.connect(host=host, port=port, user="app", dbname="forestall", password=token,
                     sslmode="verify-full", sslrootcert=ca, connect_timeout=10) as conn:
    assert conn.info.pgconn.ssl_in_use, "not over TLS"
    (u,) = conn.execute("SELECT u FROM cpu").fetchone()
    assert u == 7.0, u
print("ok")
"#,
        &[host, port, &ca, &token],
        "psycopg",
    );
    server.terminate();
}

/// Opens a connection and sends the start of a request head that never ends.
fn half_a_head(addr: &str) -> TcpStream {
    let mut s = TcpStream::connect(addr).unwrap();
    s.write_all(b"POST /api/v2/write HTTP/1.1\r\nHost: x\r\n")
        .unwrap();
    s
}

/// Whether the server closed `s` (or reset it) before `within`.
fn closed_by_server(s: &mut TcpStream, within: Duration) -> bool {
    s.set_read_timeout(Some(within)).unwrap();
    let mut buf = [0u8; 512];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e) if e.kind() == ErrorKind::ConnectionReset => return true,
            Err(_) => return false,
        }
    }
}

#[test]
fn slow_clients_and_a_thousand_held_connections_do_not_stop_health_or_writes() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(
        dir.path(),
        &[
            ("FORESTALL__HTTP__HEADER_READ_TIMEOUT", "2s"),
            ("FORESTALL__HTTP__BODY_READ_TIMEOUT", "2s"),
        ],
    );
    // A thousand connections, each holding half a request head (slowloris).
    let mut held: Vec<TcpStream> = (0..1000).map(|_| half_a_head(&server.addr)).collect();
    // Meanwhile the server answers and acknowledges writes.
    let (status, _) = crate::harness::get_text(&server.url("/health"));
    assert_eq!(status, 200);
    let (status, body) = post(
        &server.url("/api/v2/write?precision=s"),
        b"flood,host=a v=1 1767225600",
    );
    assert_eq!(status, 204, "{body}");
    // Each held connection is closed once its head is late, not kept open.
    let open = held
        .iter_mut()
        .map(|s| closed_by_server(s, Duration::from_secs(60)))
        .filter(|closed| !closed)
        .count();
    assert_eq!(open, 0, "connections the server kept open");
    // A client that keeps sending, one byte at a time, is closed all the same: the head's
    // time counts from its first byte, not from the last.
    let mut trickle = half_a_head(&server.addr);
    let started = Instant::now();
    let mut cut = false;
    while started.elapsed() < Duration::from_secs(60) {
        if trickle.write_all(b"a").is_err() {
            cut = true;
            break;
        }
        trickle
            .set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        let mut buf = [0u8; 64];
        match trickle.read(&mut buf) {
            Ok(0) => {
                cut = true;
                break;
            }
            Err(e) if e.kind() == ErrorKind::ConnectionReset => {
                cut = true;
                break;
            }
            _ => {}
        }
    }
    assert!(cut, "a trickling head kept its connection");
    // A body that stops short: 408, and nothing of it is stored.
    let mut slow = TcpStream::connect(&server.addr).unwrap();
    slow.write_all(
        b"POST /api/v2/write?precision=s HTTP/1.1\r\nHost: x\r\nContent-Length: 200\r\n\r\n\
          partial,host=a v=1 1767225600\n",
    )
    .unwrap();
    slow.set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    let mut answer = String::new();
    let _ = slow.read_to_string(&mut answer);
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("did not arrive within 2s"), "{answer}");
    let rows = sql(&server, "SELECT count(*) AS n FROM flood");
    assert_eq!(rows[0]["n"], 1);
    let (_, body) = crate::harness::get_text(
        &server.url("/api/v3/query_sql?q=SELECT%20count(*)%20FROM%20partial"),
    );
    assert!(
        body.contains("not found"),
        "the cut body's point must not be stored: {body}"
    );
    server.terminate();
}

#[test]
fn connections_over_the_limit_get_503_or_53300_and_the_rest_keep_working() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(
        dir.path(),
        &[
            ("FORESTALL__HTTP__MAX_CONNECTIONS", "8"),
            ("FORESTALL__PG__MAX_CONNECTIONS", "2"),
        ],
    );
    let held: Vec<TcpStream> = (0..8)
        .map(|_| TcpStream::connect(&server.addr).unwrap())
        .collect();
    // The ninth is answered at once and closed.
    let mut ninth = TcpStream::connect(&server.addr).unwrap();
    ninth
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let mut answer = String::new();
    let _ = ninth.read_to_string(&mut answer);
    assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
    assert!(answer.contains("Retry-After: 1"), "{answer}");
    assert!(answer.contains("too many connections"), "{answer}");
    drop(held);
    crate::harness::eventually("a place frees up", Duration::from_secs(30), || {
        // Until the server has seen the eight close, a request may be refused or cut.
        ureq::get(&server.url("/health"))
            .timeout(Duration::from_secs(5))
            .call()
            .is_ok_and(|r| r.status() == 200)
    });
    // PostgreSQL: two connections that have not started up hold both places.
    let (host, port) = server.pg_addr.rsplit_once(':').unwrap();
    let pg: Vec<TcpStream> = (0..2)
        .map(|_| TcpStream::connect((host, port.parse::<u16>().unwrap())).unwrap())
        .collect();
    let (ok, _, err) = psql(&server, "SELECT 1");
    assert!(!ok);
    assert!(err.contains("too many connections"), "{err}");
    drop(pg);
    crate::harness::eventually("a pg place frees up", Duration::from_secs(30), || {
        psql(&server, "SELECT 1").0
    });
    server.terminate();
}

#[test]
fn a_query_over_its_memory_limit_fails_cleanly_and_the_server_keeps_serving() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), &[("FORESTALL__QUERY__MEMORY_LIMIT", "1048576")]);
    // Two million groups do not fit in 1 MiB.
    let big = "SELECT count(*) AS n FROM (SELECT value FROM range(2000000) GROUP BY value)";
    let url = server.url(&format!(
        "/api/v3/query_sql?q={}",
        big.replace(' ', "%20")
            .replace('(', "%28")
            .replace(')', "%29")
    ));
    let (status, body) = crate::harness::get_text(&url);
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("resources exhausted"), "{body}");
    assert!(body.contains("memory_limit"), "{body}");
    let (ok, _, err) = psql(&server, big);
    assert!(!ok);
    assert!(err.contains("53200"), "{err}");
    // A session cannot lift it.
    let (ok, _, err) = psql(&server, "SET datafusion.runtime.memory_limit = '10G'");
    assert!(!ok);
    assert!(err.contains("set by the server"), "{err}");
    // What fits still runs, on both.
    let small = "SELECT count(*) AS n FROM (SELECT value FROM range(200) GROUP BY value)";
    assert_eq!(sql(&server, small)[0]["n"], 200);
    let (ok, out, err) = psql(&server, small);
    assert!(ok, "{err}");
    assert_eq!(out.trim(), "200");
    server.terminate();
}

#[test]
fn a_postgres_query_without_a_turn_gets_53000_and_runs_once_one_frees() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(
        dir.path(),
        &[
            ("FORESTALL__QUERY__MAX_CONCURRENT", "1"),
            ("FORESTALL__QUERY__QUEUE_TIMEOUT", "1s"),
            ("FORESTALL__QUERY__MAX_RESULT_ROWS", "100000000"),
        ],
    );
    // An HTTP client that asks for a large result and does not read it holds the only turn:
    // the turn is held by the result's stream, which waits for the client.
    let mut holder = TcpStream::connect(&server.addr).unwrap();
    holder
        .write_all(
            b"GET /api/v3/query_sql?q=SELECT%20value%20FROM%20range(50000000)&format=csv \
              HTTP/1.1\r\nHost: x\r\n\r\n",
        )
        .unwrap();
    let mut head = [0u8; 64];
    holder
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let n = holder.read(&mut head).unwrap();
    assert!(
        head[..n].starts_with(b"HTTP/1.1 200"),
        "{}",
        text(&head[..n])
    );
    let (ok, _, err) = psql(&server, "SELECT 1");
    assert!(!ok);
    assert!(err.contains("53000"), "{err}");
    // The holder goes away: its turn is given back.
    drop(holder);
    crate::harness::eventually("the turn is free", Duration::from_secs(30), || {
        psql(&server, "SELECT 1").0
    });
    server.terminate();
}

/// 100 heavy queries at once (self-joins of 100,000 rows, 100 M joined rows each) over
/// HTTP: the concurrent-query limit runs a few at a time and sends the rest 503 with
/// `Retry-After` once their queue time is up, while `/health` answers and writes keep being
/// acknowledged throughout, and every acknowledged point is then in the store.
#[test]
fn a_hundred_heavy_queries_at_once_leave_health_and_writes_answering() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), &[("FORESTALL__QUERY__QUEUE_TIMEOUT", "5s")]);
    for host in 0..100 {
        let body: String = (0..1000)
            .map(|i| format!("heavy,host=h{host} v={i}i {}\n", 1_767_225_600 + i))
            .collect();
        let (status, text) = post(&server.url("/api/v2/write?precision=s"), body.as_bytes());
        assert_eq!(status, 204, "{text}");
    }
    let query = r#"{"q": "SELECT a.host, count(*) AS n, sum(a.v * b.v) AS s FROM heavy a JOIN heavy b ON a.host = b.host GROUP BY a.host"}"#;
    let url = server.url("/api/v3/query_sql");
    let queries: Vec<_> = (0..100)
        .map(|_| {
            let url = url.clone();
            std::thread::spawn(move || {
                let started = Instant::now();
                let answer = ureq::post(&url)
                    .timeout(Duration::from_secs(300))
                    .set("Content-Type", "application/json")
                    .send_string(query);
                let (status, retry_after, body) = match answer {
                    Ok(r) => (r.status(), None, r.into_string().unwrap_or_default()),
                    Err(ureq::Error::Status(code, r)) => (
                        code,
                        r.header("Retry-After").map(str::to_string),
                        r.into_string().unwrap_or_default(),
                    ),
                    Err(e) => (0, None, e.to_string()),
                };
                (status, retry_after, body, started.elapsed())
            })
        })
        .collect();
    // While they run: health checks and writes, each timed (reported, not asserted).
    let (mut health, mut writes, mut written) = (Vec::new(), Vec::new(), 0);
    let mut round = 0;
    while !queries.iter().all(|q| q.is_finished()) {
        let t = Instant::now();
        let (status, _) = crate::harness::get_text(&server.url("/health"));
        assert_eq!(status, 200);
        health.push(t.elapsed());
        let body: String = (0..100)
            .map(|i| {
                format!(
                    "during,host=h{} v={i}i {}\n",
                    round % 7,
                    1_767_225_600 + round * 100 + i
                )
            })
            .collect();
        let t = Instant::now();
        let (status, text) = post(&server.url("/api/v2/write?precision=s"), body.as_bytes());
        assert_eq!(status, 204, "a write during the flood: {text}");
        writes.push(t.elapsed());
        written += 100;
        round += 1;
        std::thread::sleep(Duration::from_millis(100));
    }
    let answers: Vec<_> = queries.into_iter().map(|q| q.join().unwrap()).collect();
    let ok = answers.iter().filter(|a| a.0 == 200).count();
    for (status, retry_after, body, _) in &answers {
        match status {
            200 => assert!(body.contains("\"n\":1000000"), "{body}"),
            503 => assert!(retry_after.is_some(), "503 without Retry-After: {body}"),
            _ => panic!("a heavy query got {status}: {body}"),
        }
    }
    assert!(ok >= 1, "no heavy query ran");
    assert!(round >= 5, "the flood was over after {round} checks");
    let rows = sql(&server, "SELECT count(*) AS n FROM during");
    assert_eq!(rows[0]["n"], written);
    let max = |v: &[Duration]| v.iter().max().copied().unwrap_or_default();
    let median = |v: &mut Vec<Duration>| {
        v.sort();
        v[v.len() / 2]
    };
    let slowest_query = answers.iter().map(|a| a.3).max().unwrap_or_default();
    eprintln!(
        "100 heavy queries: {ok} answered, {} got 503; slowest answer {slowest_query:?}; \
         during them {round} rounds: /health median {:?} max {:?}, a 100-line write median \
         {:?} max {:?}",
        100 - ok,
        median(&mut health.clone()),
        max(&health),
        median(&mut writes.clone()),
        max(&writes),
    );
    server.terminate();
}
