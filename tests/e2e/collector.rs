//! The host collector in a real `forestall serve`: the host's metrics, and a real cgroup v1
//! group with a busy process in it, come back through SQL and `/metrics`.

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::Duration;

use crate::harness::{Server, eventually, get_json, get_text, post, put, remove_cgroup, sql};

const ROOT: &str = "/sys/fs/cgroup";
const CONTROLLERS: [&str; 2] = ["cpuacct", "memory"];

/// A busy loop holding a few MB in `<parent>/busy` under the CPU and memory controllers;
/// removed on drop.
struct Busy {
    parent: String,
    child: Child,
}

impl Busy {
    fn start() -> Busy {
        assert!(
            Path::new(ROOT).join("cpuacct/cpuacct.usage").exists(),
            "this test needs cgroup v1 cpuacct and memory under {ROOT}, and root"
        );
        let parent = format!("forestall-e2e-collector-{}", std::process::id());
        for c in CONTROLLERS {
            std::fs::create_dir_all(Path::new(ROOT).join(c).join(&parent).join("busy")).unwrap();
        }
        let child = Command::new("sh")
            // Memory charged to the group once it is in it (a few MB held in a variable),
            // then CPU.
            .args([
                "-c",
                "sleep 0.5; x=$(head -c 4000000 /dev/zero | tr '\\0' a); while :; do :; done",
            ])
            .spawn()
            .unwrap();
        let b = Busy { parent, child };
        for c in CONTROLLERS {
            std::fs::write(b.dir(c).join("cgroup.procs"), b.child.id().to_string()).unwrap();
        }
        b
    }

    fn dir(&self, controller: &str) -> PathBuf {
        Path::new(ROOT)
            .join(controller)
            .join(&self.parent)
            .join("busy")
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        for c in CONTROLLERS {
            remove_cgroup(&self.dir(c));
        }
    }
}

/// The rows of `q`, or none while a table it reads does not exist yet.
fn rows(server: &Server, q: &str) -> Vec<serde_json::Value> {
    let (status, body) = post(
        &server.url("/api/v3/query_sql?format=json"),
        serde_json::json!({ "q": q }).to_string().as_bytes(),
    );
    match status {
        200 => serde_json::from_str(&body).unwrap(),
        _ => Vec::new(),
    }
}

#[test]
fn the_host_collector_writes_the_hosts_metrics_and_its_cgroups() {
    let busy = Busy::start();
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(
        dir.path(),
        &[
            ("FORESTALL__COLLECTOR__ENABLED", "true"),
            ("FORESTALL__COLLECTOR__INTERVAL", "1s"),
            ("FORESTALL__COLLECTOR__CGROUP_PARENT", &busy.parent),
        ],
    );
    let wait = Duration::from_secs(60);
    eventually("cpu-total rows", wait, || {
        !rows(
            &server,
            "SELECT usage_idle FROM cpu WHERE cpu = 'cpu-total' AND host IS NOT NULL",
        )
        .is_empty()
    });
    for row in sql(
        &server,
        "SELECT usage_user, usage_idle FROM cpu WHERE cpu = 'cpu-total'",
    ) {
        for f in ["usage_user", "usage_idle"] {
            let v = row[f].as_f64().unwrap();
            assert!((0.0..=100.0).contains(&v), "{f} {v}");
        }
    }
    let mem = sql(&server, "SELECT total, used_percent FROM mem LIMIT 1");
    assert!(mem[0]["total"].as_i64().unwrap() > 0);
    let load = sql(&server, "SELECT load1, n_cpus FROM system LIMIT 1");
    assert!(load[0]["n_cpus"].as_i64().unwrap() >= 1);
    // The busy loop's group, by its path under the configured parent.
    let path = format!("{}/busy", busy.parent);
    let q = format!(
        "SELECT max(cpu_cores) AS cores, max(memory_bytes) AS mem FROM cgroup WHERE path = '{path}'"
    );
    eventually("the busy cgroup's CPU rate and its memory", wait, || {
        rows(&server, &q).first().is_some_and(|r| {
            r["cores"].as_f64().is_some() && r["mem"].as_i64().is_some_and(|m| m > 1 << 20)
        })
    });
    let row = &sql(&server, &q)[0];
    assert!(row["cores"].as_f64().unwrap() > 0.2, "{row}");
    // The collector's own cost is on /metrics.
    let (_, metrics) = get_text(&server.url("/metrics"));
    let collections: u64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("forestall_collector_collections_total "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    assert!(collections >= 2, "{metrics}");
    assert!(metrics.contains("forestall_collector_cpu_microseconds_total"));
    server.terminate();
}

/// `check`'s entry for `host` in `GET /api/v1/health`, once it has one.
fn check(server: &Server, host: &str, check: &str) -> Option<serde_json::Value> {
    let (_, health) = get_json(&server.url("/api/v1/health"));
    health["components"][host]["checks"]
        .as_array()?
        .iter()
        .find(|c| c["check"] == check)
        .cloned()
}

#[test]
fn a_fresh_server_judges_the_hosts_health_from_what_it_collects() {
    let dir = tempfile::tempdir().unwrap();
    let env = [
        ("FORESTALL__COLLECTOR__ENABLED", "true"),
        ("FORESTALL__COLLECTOR__INTERVAL", "1s"),
        ("FORESTALL__COLLECTOR__CGROUP_PARENT", ""),
    ];
    let server = Server::start(dir.path(), &env);
    // The three built-in checks are listed as Forestall's own.
    let (_, listed) = get_json(&server.url("/api/v1/continuous_queries"));
    let builtin: Vec<&str> = listed["continuous_queries"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|q| q["definition"]["builtin"] == true)
        .map(|q| q["name"].as_str().unwrap())
        .collect();
    let names = [
        "forestall_host_cpu",
        "forestall_host_disk",
        "forestall_host_memory",
    ];
    assert_eq!(builtin, names, "{listed}");
    eventually("a mem row", Duration::from_secs(30), || {
        !rows(&server, "SELECT host FROM mem").is_empty()
    });
    let host = sql(&server, "SELECT host FROM mem LIMIT 1")[0]["host"]
        .as_str()
        .unwrap()
        .to_string();
    // Each check judges the host from the collector's rows: a percentage, and a status that
    // follows from it (pass below the warn threshold).
    for (name, warn) in [
        ("forestall_host_cpu", 90.0),
        ("forestall_host_memory", 90.0),
    ] {
        eventually(name, Duration::from_secs(60), || {
            check(&server, &host, name).is_some_and(|c| c["value"].is_number())
        });
        let c = check(&server, &host, name).unwrap();
        let value = c["value"].as_f64().unwrap();
        assert!((0.0..=100.0).contains(&value), "{c}");
        if value < warn {
            assert_eq!(c["status"], "pass", "{c}");
        }
    }
    // The memory figure is the collector's: 100 - available_percent.
    let available = sql(
        &server,
        "SELECT min(available_percent) AS a FROM mem WHERE time > now() - INTERVAL '6 seconds'",
    )[0]["a"]
        .as_f64()
        .unwrap();
    let used = check(&server, &host, "forestall_host_memory").unwrap()["value"]
        .as_f64()
        .unwrap();
    assert!(
        (used - (100.0 - available)).abs() < 10.0,
        "{used} vs {available}"
    );
    // A user replaces one with a stricter check: it is theirs, judged at once...
    let (status, body) = put(
        &server.url("/api/v1/continuous_queries/forestall_host_memory"),
        serde_json::json!({
            "every": "1s",
            "health": {"warn": "value > 0"},
            "query": "SELECT host AS component, 100 - min(available_percent) AS value FROM mem WHERE time > now() - INTERVAL '10 seconds' GROUP BY host",
        })
        .to_string()
        .as_bytes(),
    );
    assert_eq!(status, 200, "{body}");
    eventually("the user's check warns", Duration::from_secs(30), || {
        check(&server, &host, "forestall_host_memory").is_some_and(|c| c["status"] == "warn")
    });
    server.terminate();
    // ...and kept across a restart, even with the built-in checks turned off, which drops
    // the other two.
    let mut off = env.to_vec();
    off.push(("FORESTALL__COLLECTOR__HEALTH", "false"));
    let server = Server::start(dir.path(), &off);
    let (_, listed) = get_json(&server.url("/api/v1/continuous_queries"));
    let left: Vec<(&str, bool)> = listed["continuous_queries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|q| {
            (
                q["name"].as_str().unwrap(),
                q["definition"]["builtin"] == true,
            )
        })
        .collect();
    assert_eq!(left, [("forestall_host_memory", false)], "{listed}");
    server.terminate();
}
