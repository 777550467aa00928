//! A real Prometheus (Debian's 2.42) scraping a real node_exporter and remote-writing to
//! Forestall: the same series come back through SQL. `scripts/setup.sh` installs both.

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::harness::{Server, eventually, get_json, sql};

/// A child process killed when dropped.
struct Process(Child);

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The `n` of a `SELECT count(*) AS n …`, 0 while the table does not exist (before the
/// first write).
fn count(server: &Server, q: &str) -> i64 {
    let (status, body) = crate::harness::post(
        &server.url("/api/v3/query_sql?format=json"),
        format!(r#"{{"q": {}}}"#, serde_json::to_string(q).unwrap()).as_bytes(),
    );
    if status != 200 {
        return 0;
    }
    let rows: Vec<serde_json::Value> = serde_json::from_str(&body).unwrap();
    rows[0]["n"].as_i64().unwrap_or(0)
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn spawn(program: &str, args: &[String]) -> Process {
    Process(
        Command::new(program)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("{program} (scripts/setup.sh installs it): {e}")),
    )
}

#[test]
fn prometheus_remote_write_from_a_real_prometheus_scraping_node_exporter() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("forestall");
    std::fs::create_dir_all(&data).unwrap();
    let server = Server::start(&data, &[]);
    let exporter_port = free_port();
    let _exporter = spawn(
        "prometheus-node-exporter",
        &[format!("--web.listen-address=127.0.0.1:{exporter_port}")],
    );
    let prom_port = free_port();
    let config = dir.path().join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            r#"global:
  scrape_interval: 1s
scrape_configs:
  - job_name: node
    static_configs:
      - targets: ["127.0.0.1:{exporter_port}"]
remote_write:
  - url: "{write}"
    queue_config:
      batch_send_deadline: 1s
"#,
            write = server.url("/api/v1/write")
        ),
    )
    .unwrap();
    let _prometheus = spawn(
        "prometheus",
        &[
            format!("--config.file={}", config.display()),
            format!("--storage.tsdb.path={}", dir.path().join("tsdb").display()),
            format!("--web.listen-address=127.0.0.1:{prom_port}"),
        ],
    );
    let count = |q: &str| count(&server, q);
    eventually(
        "node_exporter's samples reach Forestall through Prometheus",
        Duration::from_secs(120),
        || {
            count("SELECT count(*) AS n FROM up WHERE job = 'node' AND value = 1") >= 2
                && count("SELECT count(*) AS n FROM node_cpu_seconds_total") > 0
        },
    );
    // The series Prometheus has are the series Forestall has: node_cpu_seconds_total, one per
    // cpu and mode, with the target's labels as tags.
    let prom = format!("http://127.0.0.1:{prom_port}/api/v1/query?query=node_cpu_seconds_total");
    let (status, answer) = get_json(&prom);
    assert_eq!(status, 200, "{answer}");
    let mut want: Vec<(String, String, String)> = answer["data"]["result"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            let m = &s["metric"];
            let l = |k: &str| m[k].as_str().unwrap().to_string();
            (l("cpu"), l("mode"), l("instance"))
        })
        .collect();
    want.sort();
    assert!(!want.is_empty());
    let got: Vec<(String, String, String)> = sql(
        &server,
        "SELECT DISTINCT cpu, mode, instance FROM node_cpu_seconds_total WHERE job = 'node' \
         ORDER BY cpu, mode, instance",
    )
    .iter()
    .map(|r| {
        let l = |k: &str| r[k].as_str().unwrap().to_string();
        (l("cpu"), l("mode"), l("instance"))
    })
    .collect();
    assert_eq!(got, want);
    // Values are the counters' own: CPU seconds only grow.
    let rows = sql(
        &server,
        "SELECT min(value) AS lo, max(value) AS hi FROM node_cpu_seconds_total \
         WHERE mode = 'idle' AND cpu = '0'",
    );
    let (lo, hi) = (
        rows[0]["lo"].as_f64().unwrap(),
        rows[0]["hi"].as_f64().unwrap(),
    );
    assert!(lo > 0.0 && hi >= lo, "{rows:?}");
    // Nothing was refused along the way.
    let (_, metrics) = crate::harness::get_text(&server.url("/metrics"));
    assert!(
        metrics.contains("forestall_remote_write_series_rejected_total 0"),
        "{metrics}"
    );
}

/// Forestall scraping a real node_exporter itself, with no Prometheus in between, beside a
/// target that hangs and one that answers garbage: node_exporter's series come back through
/// SQL as it exposes them, and the bad targets are down with their reasons while it is up.
#[test]
fn forestall_scrapes_node_exporter_itself_and_bad_targets_do_not_stop_it() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("forestall");
    std::fs::create_dir_all(&data).unwrap();
    let exporter_port = free_port();
    let _exporter = spawn(
        "prometheus-node-exporter",
        &[format!("--web.listen-address=127.0.0.1:{exporter_port}")],
    );
    // A target that accepts and never answers, and one that answers HTML.
    let hangs = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let garbage = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let (hangs_addr, garbage_addr) = (hangs.local_addr().unwrap(), garbage.local_addr().unwrap());
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for c in hangs.incoming().map_while(Result::ok) {
            held.push(c);
        }
    });
    std::thread::spawn(move || {
        use std::io::{Read, Write};
        for mut c in garbage.incoming().map_while(Result::ok) {
            let mut buf = [0u8; 4096];
            let _ = c.read(&mut buf);
            let body = "<html><body>502 Bad Gateway</body></html>\n";
            let _ = write!(
                c,
                "HTTP/1.1 200 OK\r\nContent-Type: text/html\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
        }
    });
    let config = dir.path().join("forestall.toml");
    std::fs::write(
        &config,
        format!(
            r#"[[scrape]]
job = "node"
targets = ["127.0.0.1:{exporter_port}", "{hangs_addr}", "{garbage_addr}"]
interval = "1s"
timeout = "800ms"
labels = {{ env = "test" }}
"#
        ),
    )
    .unwrap();
    let config = config.display().to_string();
    let server = Server::start(&data, &[("FORESTALL_CONFIG", config.as_str())]);
    let exporter = format!("127.0.0.1:{exporter_port}");
    let count = |q: &str| count(&server, q);
    eventually(
        "two scrapes of every target",
        Duration::from_secs(60),
        || {
            count(&format!(
                "SELECT count(*) AS n FROM up WHERE instance = '{exporter}' AND value = 1"
            )) >= 2
                && count(&format!(
                    "SELECT count(*) AS n FROM up WHERE instance = '{hangs_addr}' AND value = 0"
                )) >= 2
                && count(&format!(
                    "SELECT count(*) AS n FROM up WHERE instance = '{garbage_addr}' AND value = 0"
                )) >= 2
        },
    );
    // The series node_exporter exposes are the series Forestall has.
    let (status, exposition) = crate::harness::get_text(&format!("http://{exporter}/metrics"));
    assert_eq!(status, 200);
    let mut want: Vec<(String, String)> = exposition
        .lines()
        .filter_map(|l| l.strip_prefix("node_cpu_seconds_total{"))
        .map(|l| {
            let label = |k: &str| {
                let from = l.find(&format!("{k}=\"")).unwrap() + k.len() + 2;
                l[from..from + l[from..].find('"').unwrap()].to_string()
            };
            (label("cpu"), label("mode"))
        })
        .collect();
    want.sort();
    assert!(!want.is_empty());
    let got: Vec<(String, String)> = sql(
        &server,
        &format!(
            "SELECT DISTINCT cpu, mode FROM node_cpu_seconds_total \
             WHERE job = 'node' AND instance = '{exporter}' AND env = 'test' ORDER BY cpu, mode"
        ),
    )
    .iter()
    .map(|r| {
        (
            r["cpu"].as_str().unwrap().into(),
            r["mode"].as_str().unwrap().into(),
        )
    })
    .collect();
    assert_eq!(got, want);
    // Counters only grow from scrape to scrape.
    let rows = sql(
        &server,
        "SELECT min(value) AS lo, max(value) AS hi, count(*) AS n FROM node_cpu_seconds_total \
         WHERE mode = 'idle' AND cpu = '0'",
    );
    let (lo, hi) = (
        rows[0]["lo"].as_f64().unwrap(),
        rows[0]["hi"].as_f64().unwrap(),
    );
    assert!(
        lo > 0.0 && hi >= lo && rows[0]["n"].as_i64().unwrap() >= 2,
        "{rows:?}"
    );
    // Nothing of the bad targets was stored but their up.
    assert_eq!(
        count(&format!(
            "SELECT count(*) AS n FROM scrape_samples_scraped \
             WHERE instance = '{garbage_addr}' AND value > 0"
        )),
        0
    );
    // The targets page says which is which, and why.
    let (status, targets) = get_json(&server.url("/api/v1/targets"));
    assert_eq!(status, 200, "{targets}");
    let of = |addr: &str| {
        targets["data"]["activeTargets"]
            .as_array()
            .unwrap()
            .iter()
            .find(|t| t["labels"]["instance"] == addr)
            .unwrap_or_else(|| panic!("{addr} in {targets}"))
            .clone()
    };
    assert_eq!(of(&exporter)["health"], "up", "{targets}");
    assert_eq!(of(&hangs_addr.to_string())["health"], "down");
    for (addr, why) in [
        (hangs_addr, "timed out"),
        (garbage_addr, "parsing the exposition: line 1"),
    ] {
        let error = of(&addr.to_string())["lastError"].clone();
        assert!(error.as_str().unwrap().contains(why), "{targets}");
    }
    let (_, metrics) = crate::harness::get_text(&server.url("/metrics"));
    assert!(
        metrics.contains("forestall_scrape_failures_total"),
        "{metrics}"
    );
}
