//! The host collector in a real `forestall serve`: the host's metrics, and a real cgroup v1
//! group with a busy process in it, come back through SQL and `/metrics`.

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::Duration;

use crate::harness::{Server, eventually, get_text, post, remove_cgroup, sql};

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
