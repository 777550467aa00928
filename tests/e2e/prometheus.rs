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
    let count = |q: &str| -> i64 {
        // Before the first write the table does not exist.
        let (status, body) = crate::harness::post(
            &server.url("/api/v3/query_sql?format=json"),
            format!(r#"{{"q": {}}}"#, serde_json::to_string(q).unwrap()).as_bytes(),
        );
        if status != 200 {
            return 0;
        }
        let rows: Vec<serde_json::Value> = serde_json::from_str(&body).unwrap();
        rows[0]["n"].as_i64().unwrap_or(0)
    };
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
