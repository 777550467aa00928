//! The PostgreSQL wire protocol with real clients: `psql` and a Python `psycopg` script read
//! back rows that were written over HTTP.

use crate::harness::{Server, post, psql, python_ok};

/// 2026-01-01T00:00:00Z
const T0: i64 = 1_767_225_600_000_000_000;

fn write_sample(server: &Server) {
    let mut body = String::new();
    for m in 0..10i64 {
        for h in 0..3 {
            body.push_str(&format!(
                "cpu,host=h{h},region=eu usage={}.5,count={}i,up=true {}\n",
                m + h,
                m * 10 + h,
                T0 + m * 60_000_000_000
            ));
        }
    }
    let (status, text) = post(&server.url("/api/v2/write?precision=ns"), body.as_bytes());
    assert_eq!(status, 204, "{text}");
}

#[test]
fn psql_reads_rows_written_over_http_and_gets_postgres_errors() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), &[]);
    write_sample(&server);

    let (ok, out, err) = psql(
        &server,
        "SELECT host, max(usage), sum(count) FROM cpu GROUP BY host ORDER BY host",
    );
    assert!(ok, "{err}");
    assert_eq!(out, "h0,9.5,450\nh1,10.5,460\nh2,11.5,470\n");

    // Timestamps, booleans and a time filter.
    let (ok, out, err) = psql(
        &server,
        "SELECT time, up FROM cpu WHERE host = 'h1' AND time >= '2026-01-01T00:08:00Z' ORDER BY time",
    );
    assert!(ok, "{err}");
    assert_eq!(out, "2026-01-01 00:08:00,t\n2026-01-01 00:09:00,t\n");

    // Several statements in one simple query, inside a transaction block.
    let (ok, out, err) = psql(
        &server,
        "BEGIN; SET application_name = 'x'; SELECT count(*) FROM cpu; COMMIT",
    );
    assert!(ok, "{err}");
    assert!(out.contains("30"), "{out}");

    // Errors are Postgres errors with a SQLSTATE, and the server keeps serving.
    let (ok, _, err) = psql(&server, "SELEC 1");
    assert!(!ok && err.contains("42601"), "{err}");
    let (ok, _, err) = psql(&server, "SELECT * FROM nope");
    assert!(!ok && err.contains("42P01"), "{err}");
    let (ok, _, err) = psql(&server, "SELECT nope FROM cpu");
    assert!(!ok && err.contains("ERROR"), "{err}");
    let (ok, _, err) = psql(&server, "SELECT usage + host FROM cpu");
    assert!(!ok && err.contains("ERROR"), "{err}");
    let (ok, out, _) = psql(&server, "SELECT count(*) FROM cpu");
    assert!(ok && out == "30\n", "{out}");
}

#[test]
fn psql_result_size_limit_is_an_error_not_a_crash() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), &[("FORESTALL__QUERY__MAX_RESULT_ROWS", "5")]);
    write_sample(&server);
    let (ok, _, err) = psql(&server, "SELECT * FROM cpu");
    assert!(!ok && err.contains("54000"), "{err}");
    let (ok, out, err) = psql(&server, "SELECT * FROM cpu LIMIT 5");
    assert!(ok, "{err}");
    assert_eq!(out.lines().count(), 5);
}

const PSYCOPG_SCRIPT: &str = r#"
import sys, datetime, psycopg
host, port = sys.argv[1], sys.argv[2]
with psycopg.connect(host=host, port=port, user="app", dbname="forestall", connect_timeout=10) as conn:
    # Server-side parameters ($1, $2) through the extended protocol, in a transaction block.
    rows = conn.execute(
        "SELECT host, usage, count, time FROM cpu WHERE host = %s AND usage > %s ORDER BY time",
        ("h2", 9.0),
    ).fetchall()
    assert [r[1] for r in rows] == [9.5, 10.5, 11.5], rows
    assert rows[0][0] == "h2" and rows[0][2] == 72, rows
    assert rows[0][3] == datetime.datetime(2026, 1, 1, 0, 7), rows
    # Binary results.
    with conn.cursor(binary=True) as cur:
        cur.execute("SELECT count(*) AS n, max(time) AS t FROM cpu WHERE region = %s", ("eu",))
        n, t = cur.fetchone()
        assert n == 30 and t == datetime.datetime(2026, 1, 1, 0, 9), (n, t)
    # A prepared statement reused with other parameters.
    for h, want in (("h0", 10), ("h1", 10), ("zz", 0)):
        (n,) = conn.execute("SELECT count(*) FROM cpu WHERE host = %s", (h,), prepare=True).fetchone()
        assert n == want, (h, n)
    # A bad query raises, and the connection is usable after a rollback.
    try:
        conn.execute("SELECT * FROM missing_table")
        raise SystemExit("expected an error")
    except psycopg.errors.UndefinedTable:
        conn.rollback()
    (n,) = conn.execute("SELECT count(*) FROM cpu").fetchone()
    assert n == 30
# A client that goes away in the middle of a large result (27,000 rows, streamed).
gone = psycopg.connect(host=host, port=port, user="app", dbname="forestall", connect_timeout=10)
seen = 0
for row in gone.cursor().stream("SELECT a.usage FROM cpu a CROSS JOIN cpu b CROSS JOIN cpu c"):
    seen += 1
    if seen == 100:
        break
gone.pgconn.finish()
# The server goes on serving.
with psycopg.connect(host=host, port=port, user="app", dbname="forestall", connect_timeout=10) as conn:
    (n,) = conn.execute("SELECT count(*) FROM cpu").fetchone()
    assert n == 30
print("ok")
"#;

#[test]
fn psycopg_reads_rows_with_parameters_and_binary_results_and_survives_a_hang_up() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), &[]);
    write_sample(&server);
    let (host, port) = server.pg_addr.rsplit_once(':').unwrap();
    python_ok(PSYCOPG_SCRIPT, &[host, port], "psycopg");
}
