//! The live allocation loop on a real cgroup v1 component: `forestall serve` meters a
//! CPU-throttled busy loop, gives it more CPU round by round, obeys a cap set over the API,
//! keeps that cap and its audit across a kill -9, and stores every decision as rows SQL can
//! read.
//! Needs root and cgroup v1 cpu, cpuacct, memory and blkio controllers (as the machines here
//! have).

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use crate::harness::{Server, eventually, get_json, post, put, remove_cgroup, sql};

const ROOT: &str = "/sys/fs/cgroup";
const CONTROLLERS: [&str; 4] = ["cpu", "cpuacct", "memory", "blkio"];

/// A busy loop in its own cgroup under every controller; killed and removed on drop.
struct Burner {
    cgroup: String,
    child: Child,
}

impl Burner {
    fn start() -> Burner {
        Burner::running("burner", "while :; do :; done")
    }

    /// `script` (run by `sh -c`) in its own cgroup `name` under every controller (one name
    /// per test: tests of one process run side by side).
    fn running(name: &str, script: &str) -> Burner {
        assert!(
            Path::new(ROOT).join("cpu/cpu.cfs_quota_us").exists(),
            "this test needs cgroup v1 controllers under {ROOT}, and root"
        );
        let cgroup = format!("forestall-e2e-{}/{name}", std::process::id());
        for c in CONTROLLERS {
            std::fs::create_dir_all(Path::new(ROOT).join(c).join(&cgroup)).unwrap();
        }
        let child = Command::new("sh").args(["-c", script]).spawn().unwrap();
        let b = Burner { cgroup, child };
        for c in CONTROLLERS {
            std::fs::write(b.dir(c).join("cgroup.procs"), b.child.id().to_string()).unwrap();
        }
        b
    }

    fn dir(&self, controller: &str) -> PathBuf {
        Path::new(ROOT).join(controller).join(&self.cgroup)
    }

    /// The CPU quota in cores, `None` when unlimited.
    fn quota(&self) -> Option<f64> {
        let read = |f: &str| -> i64 {
            std::fs::read_to_string(self.dir("cpu").join(f))
                .unwrap()
                .trim()
                .parse()
                .unwrap()
        };
        let q = read("cpu.cfs_quota_us");
        (q > 0).then(|| q as f64 / read("cpu.cfs_period_us") as f64)
    }

    fn set_quota(&self, cores: f64) {
        std::fs::write(
            self.dir("cpu").join("cpu.cfs_quota_us"),
            ((cores * 100_000.0) as i64).to_string(),
        )
        .unwrap();
    }

    /// Cores used over the next `secs`, as the kernel counts them.
    fn cores_used(&self, secs: f64) -> f64 {
        let read = || -> f64 {
            std::fs::read_to_string(self.dir("cpuacct").join("cpuacct.usage"))
                .unwrap()
                .trim()
                .parse::<f64>()
                .unwrap()
                / 1e9
        };
        let (c0, t0) = (read(), Instant::now());
        std::thread::sleep(Duration::from_secs_f64(secs));
        (read() - c0) / t0.elapsed().as_secs_f64()
    }
}

impl Drop for Burner {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        for c in CONTROLLERS {
            remove_cgroup(&self.dir(c));
        }
    }
}

fn env(b: &Burner) -> Vec<(&'static str, String)> {
    vec![
        ("FORESTALL__ALLOCATION__ENABLED", "true".into()),
        ("FORESTALL__ALLOCATION__ACTUATE", "true".into()),
        ("FORESTALL__ALLOCATION__INTERVAL", "1s".into()),
        ("FORESTALL__ALLOCATION__HORIZON", "5s".into()),
        ("FORESTALL__ALLOCATION__RELEASE_AFTER", "1h".into()),
        ("FORESTALL__ALLOCATION__JUDGE_AFTER", "1h".into()),
        ("FORESTALL__ALLOCATION__CGROUP_VERSION", "v1".into()),
        ("FORESTALL__ALLOCATION__POOL__CPU", "1.5".into()),
        (
            "FORESTALL__ALLOCATION__COMPONENTS",
            format!(
                r#"[{{ name = "burner", cgroup = "{}", weight = 10 }}]"#,
                b.cgroup
            ),
        ),
    ]
}

fn start(dir: &Path, b: &Burner) -> Server {
    let env = env(b);
    let pairs: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    Server::start(dir, &pairs)
}

#[test]
fn the_loop_gives_a_throttled_component_more_cpu_and_obeys_a_cap_set_over_the_api() {
    let burner = Burner::start();
    // Throttled hard before Forestall starts.
    burner.set_quota(0.3);
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path(), &burner);

    // Round by round, usage presses on the allocation and the allocation rises.
    eventually(
        "the loop raises the burner's quota above 0.6 core",
        Duration::from_secs(60),
        || burner.quota().is_some_and(|q| q > 0.6),
    );
    // More than the 0.3 core it was throttled to (the exact share depends on what else the
    // two cores are running: CI runs every end-to-end test at once).
    let used = burner.cores_used(2.0);
    assert!(
        used > 0.35,
        "the burner uses what it was given: {used} cores"
    );
    let quota = burner.quota().unwrap();
    assert!(quota <= 1.5 + 1e-9, "never more than the pool: {quota}");

    // The API shows what the kernel holds.
    let (status, state) = get_json(&server.url("/api/v1/allocations"));
    assert_eq!(status, 200);
    assert_eq!(state["mode"], "actuate");
    let c = &state["components"][0];
    assert_eq!(c["component"], "burner");
    assert_eq!(c["problems"], serde_json::json!([]), "{state:#}");
    let applied = c["applied"]["cpu"].as_f64().unwrap();
    let now_quota = burner.quota().unwrap();
    assert!(
        (applied - now_quota).abs() < 0.011,
        "API {applied} vs kernel {now_quota}"
    );

    // So does the forecast each request is sized from.
    let (status, fc) = get_json(&server.url("/api/v1/forecasts"));
    assert_eq!(status, 200);
    let cpu = &fc["components"][0]["resources"]["cpu"];
    assert_eq!(cpu["steps"].as_array().unwrap().len(), 5, "{fc:#}");
    assert!(cpu["request"]["amount"].as_f64().unwrap() > 0.3, "{fc:#}");

    // And the models' accounts: who answers each of those steps, every model's rolling
    // error, and the global LSTM (on by default) serving the component's four resources.
    let (status, models) = get_json(&server.url("/api/v1/models"));
    assert_eq!(status, 200);
    let cpu = &models["series"][0];
    assert_eq!(cpu["resource"], "cpu", "{models:#}");
    assert_eq!(cpu["steps"].as_array().unwrap().len(), 5, "{models:#}");
    assert!(cpu["steps"][0]["model"].is_string(), "{models:#}");
    assert_eq!(models["global_lstm"]["series"], 4, "{models:#}");

    let (status, risks) = get_json(&server.url("/api/v1/risks"));
    assert_eq!(status, 200);
    let score = risks["components"][0]["resources"]["cpu"]["score"].as_f64();
    assert!(score.is_some_and(|s| (0.0..=1.0).contains(&s)), "{risks:#}");

    // The metered usage and every decision are rows SQL can read.
    let rows = sql(
        &server,
        "SELECT max(cpu) AS cpu FROM forestall_usage WHERE component = 'burner'",
    );
    assert!(rows[0]["cpu"].as_f64().unwrap() > 0.35, "{rows:?}");
    let rows = sql(
        &server,
        "SELECT after FROM forestall_allocations \
         WHERE component = 'burner' AND resource = 'cpu' AND action = 'raise' AND applied \
         ORDER BY time",
    );
    assert!(rows.len() >= 2, "{rows:?}");
    assert!(rows[0]["after"].as_f64().unwrap() < rows.last().unwrap()["after"].as_f64().unwrap());

    // Bad preferences are refused with the reason; nothing changes.
    let url = server.url("/api/v1/preferences/burner");
    for (body, expect) in [
        (&b"{not json"[..], 400),
        (br#"{"cap": {"cpu": "lots"}}"#, 400),
        (br#"{"cap": {"cpu": 1}, "unknown": 1}"#, 400),
        (br#"{"cap": {"cpu": 0.5}, "floor": {"cpu": 1}}"#, 400),
        (br#"{"cap": {"cpu": -1}}"#, 400),
        (br#"{"pinned_cpus": [99999]}"#, 400),
    ] {
        let (status, json) = put(&url, body);
        assert_eq!(status, expect, "{}: {json}", String::from_utf8_lossy(body));
        assert_eq!(json["code"], "invalid", "{json}");
    }
    // Just over the 64 KiB limit: small enough that the whole body fits in the socket's
    // buffers, so the client reads the answer instead of a reset from a server that stopped
    // reading at the limit (as it should).
    let (status, json) = put(&url, &vec![b' '; (64 << 10) + 4096]);
    assert_eq!(status, 413, "{json}");
    let (status, json) = put(&server.url("/api/v1/preferences/nobody"), b"{}");
    assert_eq!(status, 404, "{json}");

    // A cap holds from the next round, whatever the cooldown.
    let (status, json) = put(&url, br#"{"cap": {"cpu": 0.4}}"#);
    assert_eq!(status, 200, "{json}");
    assert_eq!(json["cap"]["cpu"], 0.4);
    eventually(
        "the cap brings the quota down to 0.4 core",
        Duration::from_secs(30),
        || burner.quota().is_some_and(|q| q <= 0.4 + 1e-9),
    );
    let used = burner.cores_used(2.0);
    assert!(
        used < 0.45,
        "the kernel holds the burner to its cap: {used}"
    );
    let row = sql(
        &server,
        "SELECT count(*) AS n, CAST(max(time) AS BIGINT) AS last FROM forestall_allocations",
    );
    let (before, last) = (
        row[0]["n"].as_u64().unwrap(),
        row[0]["last"].as_i64().unwrap(),
    );
    let audited = |server: &Server| {
        sql(
            server,
            &format!(
                "SELECT count(*) AS n FROM forestall_allocations \
                 WHERE time <= to_timestamp_nanos({last})"
            ),
        )[0]["n"]
            .as_u64()
            .unwrap()
    };
    server.kill();

    // The cap and the audit outlive a kill -9, and the loop keeps to the cap.
    let server = start(dir.path(), &burner);
    let (status, prefs) = get_json(&server.url("/api/v1/preferences"));
    assert_eq!(status, 200);
    assert_eq!(prefs["burner"]["cap"]["cpu"], 0.4, "{prefs}");
    assert_eq!(audited(&server), before, "audit rows lost or doubled");
    std::thread::sleep(Duration::from_secs(3));
    assert!(burner.quota().is_some_and(|q| q <= 0.4 + 1e-9));
    assert_eq!(server.terminate().code(), Some(0));
}

#[test]
fn without_the_loop_its_endpoints_say_how_to_turn_it_on() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), &[]);
    let (status, json) = get_json(&server.url("/api/v1/allocations"));
    assert_eq!(status, 404);
    assert!(
        json["error"]
            .as_str()
            .unwrap()
            .contains("[allocation] enabled"),
        "{json}"
    );
    let (status, _) = put(&server.url("/api/v1/preferences/x"), b"{}");
    assert_eq!(status, 404);
}

#[test]
fn an_allocation_query_over_latency_sets_a_real_cpu_quota_until_it_is_dropped() {
    // An idle service: its own usage would never ask for more CPU. Its latency does.
    let web = Burner::running("web", "exec sleep 600");
    web.set_quota(0.2);
    let dir = tempfile::tempdir().unwrap();
    let mut env = env(&web);
    env.retain(|(k, _)| *k != "FORESTALL__ALLOCATION__COMPONENTS");
    env.push((
        "FORESTALL__ALLOCATION__COMPONENTS",
        format!(r#"[{{ name = "web", cgroup = "{}" }}]"#, web.cgroup),
    ));
    env.push(("FORESTALL__ALLOCATION__POOL__CPU", "2".into()));
    let pairs: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let server = Server::start(dir.path(), &pairs);
    let latency = |p99: f64| {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos();
        let (status, text) = crate::harness::post(
            &server.url("/api/v2/write"),
            format!("latency,service=web p99={p99} {now}").as_bytes(),
        );
        assert_eq!(status, 204, "{text}");
    };
    sql(
        &server,
        "CREATE CONTINUOUS QUERY web_latency EVERY '1s' ALLOCATE AS \
         SELECT 'web' AS component, 'cpu' AS resource, max(p99) * 2 AS demand \
         FROM latency WHERE service = 'web' AND time > now() - INTERVAL '1 hour'",
    );
    latency(0.6);
    // p99 of 0.6 s asks for 1.2 cores: the kernel's quota follows.
    eventually(
        "the quota to follow the latency query's demand",
        Duration::from_secs(30),
        || web.quota().is_some_and(|q| q >= 1.19),
    );
    // The loop lists what each query asked for: the latency query's demand, beside the
    // built-in usage queries' usage.
    let from = |status: &serde_json::Value, query: &str| -> Vec<serde_json::Value> {
        status["components"][0]["requested_by_queries"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|r| r["query"] == query)
            .cloned()
            .collect()
    };
    let (_, status) = get_json(&server.url("/api/v1/allocations"));
    let asked = from(&status, "web_latency");
    assert_eq!(asked.len(), 1, "{status}");
    assert_eq!(asked[0]["demand"], 1.2, "{status}");
    // The usage the loop reads comes from its built-in queries, listed with the others (the
    // raise may have come before their first run: a demand is raised when it is delivered).
    let (_, listed) = get_json(&server.url("/api/v1/continuous_queries/forestall_usage_mem"));
    assert_eq!(listed["definition"]["builtin"], true, "{listed}");
    assert_eq!(listed["definition"]["allocate"], true, "{listed}");
    eventually(
        "the built-in usage query's rows in the loop's status",
        Duration::from_secs(30),
        || {
            let (_, status) = get_json(&server.url("/api/v1/allocations"));
            !from(&status, "forestall_usage_mem").is_empty()
        },
    );
    // Each run's rows are recorded with the query that asked.
    let recorded = sql(
        &server,
        "SELECT max(demand) AS d FROM forestall_allocation_requests \
         WHERE query = 'web_latency' AND component = 'web' AND resource = 'cpu'",
    );
    assert_eq!(recorded[0]["d"], serde_json::json!(1.2), "{recorded:?}");
    // The audit says which query asked.
    let audit = sql(
        &server,
        "SELECT reason FROM forestall_allocations WHERE component = 'web' AND resource = 'cpu' AND action = 'raise'",
    );
    assert!(
        audit.iter().any(|r| r["reason"]
            .as_str()
            .is_some_and(|t| t.ends_with("asked by query web_latency"))),
        "{audit:#?}"
    );
    let raised = web.quota();

    // Dropped: what it asked for is withdrawn, and a worse latency changes nothing.
    let (ok, _, err) = crate::harness::psql(&server, "DROP CONTINUOUS QUERY web_latency");
    assert!(ok, "{err}");
    latency(0.95);
    std::thread::sleep(Duration::from_secs(4));
    let audit = sql(
        &server,
        "SELECT round, resource, action, before, after, reason FROM forestall_allocations ORDER BY time",
    );
    assert_eq!(web.quota(), raised, "{audit:#?}");
    let (_, status) = get_json(&server.url("/api/v1/allocations"));
    assert!(from(&status, "web_latency").is_empty(), "{status}");
}

/// Actuation turned on and off at run time (`PUT /api/v1/actuation`, the `actuate`
/// permission): in dry-run the loop decides raises and the kernel keeps its quota; switched
/// on, the next round applies what the engine holds; the switch outlives a restart over the
/// configuration, and each switch is in the audit trail.
#[test]
fn actuation_is_switched_on_and_off_over_the_api_and_the_switch_outlives_a_restart() {
    let burner = Burner::running("switch", "while :; do :; done");
    burner.set_quota(0.3);
    let dir = tempfile::tempdir().unwrap();
    let mut env = env(&burner);
    for (k, v) in &mut env {
        if *k == "FORESTALL__ALLOCATION__ACTUATE" {
            *v = "false".into();
        }
    }
    let pairs: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let server = Server::start(dir.path(), &pairs);
    let url = server.url("/api/v1/actuation");
    let (status, state) = get_json(&url);
    assert_eq!(status, 200);
    assert_eq!(state["actuate"], false, "{state}");
    // Dry run: a raise is decided and audited, not applied (and, the kernel still
    // throttling the burner, its usage does not press for another).
    eventually(
        "a dry-run raise of the burner's CPU",
        Duration::from_secs(60),
        || {
            // (The table exists from the first round on.)
            let (status, body) = post(
                &server.url("/api/v3/query_sql?format=json"),
                br#"{"q": "SELECT count(*) AS n FROM forestall_allocations WHERE component = 'burner' AND resource = 'cpu' AND action = 'raise' AND NOT applied"}"#,
            );
            status == 200
                && serde_json::from_str::<serde_json::Value>(&body).unwrap()[0]["n"]
                    .as_u64()
                    .unwrap_or(0)
                    >= 1
        },
    );
    assert_eq!(burner.quota(), Some(0.3), "dry run changed the kernel");

    // Bad switches are refused.
    for body in [
        &b"{\"actuate\": \"yes\"}"[..],
        b"{}",
        b"true",
        b"{\"actuate\": true, \"x\": 1}",
    ] {
        let (status, answer) = put(&url, body);
        assert_eq!(status, 400, "{answer}");
    }
    assert_eq!(burner.quota(), Some(0.3));

    // On: the next round applies the engine's allocation.
    let (status, state) = put(&url, br#"{"actuate": true}"#);
    assert_eq!(status, 200, "{state}");
    assert_eq!(state["actuate"], true);
    assert_ne!(state["actuator"], "dry-run", "{state}");
    eventually(
        "the raised quota reaches the kernel",
        Duration::from_secs(30),
        || burner.quota().is_some_and(|q| q > 0.35),
    );
    let (_, allocations) = get_json(&server.url("/api/v1/allocations"));
    assert_eq!(allocations["mode"], "actuate");

    // The switch outlives a restart, over `actuate = false` in the configuration.
    server.terminate();
    let server = Server::start(dir.path(), &pairs);
    let url = server.url("/api/v1/actuation");
    let (_, state) = get_json(&url);
    assert_eq!(state["actuate"], true, "{state}");
    assert_eq!(state["configured"], false, "{state}");

    // Off: the kernel keeps what it has, and the loop goes back to recording.
    let (status, state) = put(&url, br#"{"actuate": false}"#);
    assert_eq!(status, 200, "{state}");
    assert_eq!(state["actuator"], "dry-run");
    let (_, allocations) = get_json(&server.url("/api/v1/allocations"));
    assert_eq!(allocations["mode"], "dry-run");
    let kept = burner.quota();
    assert!(kept.is_some_and(|q| q > 0.35), "{kept:?}");

    let rows = sql(
        &server,
        "SELECT detail, status FROM forestall_audit WHERE path = '/api/v1/actuation' \
         AND method = 'PUT' ORDER BY time",
    );
    let switches: Vec<(String, u64)> = rows
        .iter()
        .map(|r| {
            (
                r["detail"].as_str().unwrap_or_default().to_string(),
                r["status"].as_u64().unwrap_or(0),
            )
        })
        .filter(|(_, status)| *status == 200)
        .collect();
    assert_eq!(
        switches,
        [
            (r#"{"actuate": true}"#.to_string(), 200),
            (r#"{"actuate": false}"#.to_string(), 200)
        ],
        "{rows:?}"
    );
    server.terminate();
}
