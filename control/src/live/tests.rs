use super::*;
use forestall_actuators::Limits;
use forestall_actuators::alloc::Decision;
use forestall_engine::EngineConfig;
use forestall_engine::line_protocol::{ParsedLine, parse_lines};
use forestall_query::continuous::{
    ActionSink, AllocationRequest, ContinuousQueries, Notification, REQUESTS_MEASUREMENT,
};

/// A directory tree shaped like a cgroup2 mount offering cpu, memory and io, with each named
/// component's cgroup at the kernel's defaults. This machine's cgroup2 mount offers none of
/// them (they are bound to v1), so the v2 path is tested here on the tree and the v1 path for
/// real by the end-to-end test.
fn mimic_v2(components: &[&str]) -> tempfile::TempDir {
    let root = tempfile::tempdir().unwrap();
    std::fs::write(root.path().join("cgroup.controllers"), "cpu memory io").unwrap();
    std::fs::write(root.path().join("cgroup.subtree_control"), "").unwrap();
    std::fs::create_dir_all(root.path().join("forestall")).unwrap();
    std::fs::write(
        root.path().join("forestall/cgroup.controllers"),
        "cpu memory io",
    )
    .unwrap();
    std::fs::write(root.path().join("forestall/cgroup.subtree_control"), "").unwrap();
    for name in components {
        let dir = root.path().join("forestall").join(name);
        std::fs::create_dir_all(&dir).unwrap();
        for (file, value) in [
            ("cgroup.controllers", "cpu memory io"),
            ("cgroup.subtree_control", ""),
            ("cgroup.procs", ""),
            ("cpu.max", "max 100000"),
            ("cpu.weight", "100"),
            ("cpu.stat", "usage_usec 0\n"),
            ("memory.high", "max"),
            ("memory.max", "max"),
            ("memory.current", "52428800\n"),
            ("memory.stat", "anon 41943040\ninactive_file 10485760\n"),
            ("io.weight", "default 100"),
            ("io.max", ""),
            ("io.stat", ""),
        ] {
            std::fs::write(dir.join(file), value).unwrap();
        }
    }
    root
}

fn read(root: &Path, file: &str) -> String {
    std::fs::read_to_string(root.join(file))
        .unwrap()
        .trim()
        .to_string()
}

fn component(name: &str, weight: f64) -> ComponentConfig {
    ComponentConfig {
        name: name.into(),
        cgroup: None,
        weight,
        deferrable: false,
        flows: Vec::new(),
        preferences: PreferencesConfig::default(),
    }
}

/// A loop over `root` (a mimic v2 tree) that rounds every second and reads CPU from the
/// `app` measurement's `cpu_pct` (percent of a core).
fn config(root: &Path, actuate: bool, collect: bool) -> AllocationConfig {
    AllocationConfig {
        enabled: true,
        actuate,
        interval: Duration::from_secs(1),
        horizon: Duration::from_secs(5),
        release_after: Duration::from_secs(3600),
        judge_after: Duration::from_secs(3600),
        cgroup_root: root.to_path_buf(),
        cgroup_version: CgroupVersion::V2,
        collect,
        pool: Amounts {
            cpu: Some(4.0),
            mem: Some(8.0 * 1073741824.0),
            ..Amounts::default()
        },
        usage: UsageSources {
            cpu: UsageSource {
                measurement: "app".into(),
                field: "cpu_pct".into(),
                scale: 0.01,
                aggregate: Aggregate::Max,
            },
            ..UsageSources::default()
        },
        components: vec![component("web", 10.0), component("batch", 1.0)],
        ..AllocationConfig::default()
    }
}

struct Fixture {
    _data: tempfile::TempDir,
    data_dir: PathBuf,
    store: Arc<Store>,
    query: QueryEngine,
}

fn store() -> Fixture {
    let data = tempfile::tempdir().unwrap();
    let store = Arc::new(
        Store::open(EngineConfig {
            data_dir: data.path().to_path_buf(),
            ..Default::default()
        })
        .unwrap(),
    );
    Fixture {
        data_dir: data.path().to_path_buf(),
        _data: data,
        query: QueryEngine::new(Arc::clone(&store)),
        store,
    }
}

/// Forwards `ALLOCATE` rows to the loop, as the server does.
#[derive(Debug)]
struct Feed(Allocations);

#[async_trait::async_trait]
impl ActionSink for Feed {
    async fn notify(&self, _: &str, _: &Notification) -> Result<(), String> {
        Err("no webhooks in these tests".into())
    }

    async fn allocate(&self, query: &str, requests: Vec<AllocationRequest>) -> Result<(), String> {
        self.0.offer(query, requests)
    }
}

/// The loop for `cfg`, with the continuous queries feeding it and its usage queries defined.
async fn start(f: &Fixture, cfg: &AllocationConfig) -> (Allocations, ContinuousQueries) {
    let a = Allocations::new(cfg, &f.data_dir).unwrap();
    let cqs = ContinuousQueries::start(
        Arc::clone(&f.store),
        f.query.clone(),
        Some(Arc::new(Feed(a.clone()))),
    )
    .unwrap();
    cqs.reconcile_builtin(usage::builtin_queries(cfg))
        .await
        .unwrap();
    a.health_from(cqs.clone());
    (a, cqs)
}

/// One interval's steps in order, without waiting for their times: meter, run the usage
/// queries, decide.
async fn step(f: &Fixture, a: &Allocations, cqs: &ContinuousQueries) {
    a.collect(&f.store).await.unwrap();
    for r in Resource::ALL {
        let status = cqs
            .run_now(&format!("{}{r}", usage::BUILTIN_PREFIX))
            .await
            .unwrap();
        assert_eq!(status["last_error"], json!(null), "{status}");
    }
    a.round(&f.store).await.unwrap();
}

/// Writes each component's CPU percentage at the current time.
fn write_cpu(store: &Store, pcts: &[(&str, f64)]) {
    let now = now_nanos();
    let body: String = pcts
        .iter()
        .map(|(c, p)| format!("app,component={c} cpu_pct={p} {now}\n"))
        .collect();
    let o = store
        .write(body.as_bytes(), Precision::Nanoseconds, now)
        .unwrap();
    assert_eq!(o.rejected_lines, 0);
}

async fn sql(f: &Fixture, q: &str) -> Vec<Vec<String>> {
    let (_, batches) = f.query.sql(q).await.unwrap();
    let mut rows = Vec::new();
    for b in batches {
        for i in 0..b.num_rows() {
            rows.push(
                b.columns()
                    .iter()
                    .map(|c| arrow::util::display::array_value_to_string(c, i).unwrap())
                    .collect(),
            );
        }
    }
    rows
}

#[test]
fn configuration_mistakes_are_refused_with_the_reason() {
    let root = mimic_v2(&["web"]);
    let good = config(root.path(), false, false);
    good.validate().unwrap();
    let cases: Vec<(AllocationConfig, &str)> = vec![
        (
            AllocationConfig {
                components: vec![],
                ..good.clone()
            },
            "no [[allocation.components]]",
        ),
        (
            AllocationConfig {
                violation_share: 0.5,
                ..good.clone()
            },
            "violation_share must be in [0, 0.5)",
        ),
        (
            AllocationConfig {
                headroom_price: -1.0,
                ..good.clone()
            },
            "headroom_price must be a finite number",
        ),
        (
            AllocationConfig {
                headroom_price: f64::INFINITY,
                ..good.clone()
            },
            "headroom_price must be a finite number",
        ),
        (
            AllocationConfig {
                headroom_window: Duration::from_millis(1),
                ..good.clone()
            },
            "headroom_window must be at least one interval",
        ),
        (
            AllocationConfig {
                components: vec![component("web", 1.0), component("web", 2.0)],
                ..good.clone()
            },
            "listed twice",
        ),
        (
            AllocationConfig {
                components: vec![component("web'; DROP TABLE x; --", 1.0)],
                ..good.clone()
            },
            "must be 1 to 128 characters",
        ),
        (
            AllocationConfig {
                components: vec![ComponentConfig {
                    cgroup: Some("../../etc".into()),
                    ..component("web", 1.0)
                }],
                ..good.clone()
            },
            "must be relative",
        ),
        (
            AllocationConfig {
                components: vec![ComponentConfig {
                    flows: vec![FlowConfig {
                        dst: Some("10.0.0.0/33".into()),
                        ..FlowConfig::default()
                    }],
                    ..component("web", 1.0)
                }],
                ..good.clone()
            },
            "prefix length",
        ),
        (
            AllocationConfig {
                components: vec![ComponentConfig {
                    preferences: PreferencesConfig {
                        floor: Amounts {
                            cpu: Some(2.0),
                            ..Amounts::default()
                        },
                        cap: Amounts {
                            cpu: Some(1.0),
                            ..Amounts::default()
                        },
                        ..PreferencesConfig::default()
                    },
                    ..component("web", 1.0)
                }],
                ..good.clone()
            },
            "floor 2 is above its cap 1",
        ),
        (
            AllocationConfig {
                components: vec![ComponentConfig {
                    weight: f64::NAN,
                    ..component("web", 1.0)
                }],
                ..good.clone()
            },
            "weight must be positive",
        ),
        (
            AllocationConfig {
                threshold: 1.5,
                ..good.clone()
            },
            "threshold",
        ),
        (
            AllocationConfig {
                disk_device: Some("sda".into()),
                ..good.clone()
            },
            "major:minor",
        ),
        (
            AllocationConfig {
                webhook: Some("ftp://example".into()),
                ..good.clone()
            },
            "webhook",
        ),
        (
            AllocationConfig {
                pool: Amounts {
                    cpu: Some(-1.0),
                    ..Amounts::default()
                },
                ..good.clone()
            },
            "allocation.pool.cpu",
        ),
    ];
    for (c, expect) in cases {
        let e = format!("{:#}", c.validate().unwrap_err());
        assert!(e.contains(expect), "{expect:?} not in {e:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rounds_read_usage_from_the_store_and_apply_only_what_the_engine_changed() {
    let root = mimic_v2(&["web", "batch"]);
    let f = store();
    let (a, cqs) = start(&f, &config(root.path(), true, false)).await;
    // Each starts at half the 4-core pool (its cgroup has no limit). web uses 3 cores, batch
    // half a core.
    for _ in 0..4 {
        write_cpu(&f.store, &[("web", 300.0), ("batch", 50.0)]);
        step(&f, &a, &cqs).await;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let status = a.status();
    assert_eq!(status["mode"], "actuate");
    let web = &status["components"][0];
    assert_eq!(web["usage"]["cpu"], 3.0);
    let cores = web["allocation"]["cpu"].as_f64().unwrap();
    assert!(
        (3.0 / 0.8..=4.0).contains(&cores),
        "web should hold its peak over θ, within the pool: {cores}"
    );
    // The kernel (here the tree) holds what the engine holds.
    let quota = read(root.path(), "forestall/web/cpu.max");
    assert_eq!(
        quota,
        format!("{} 100000", (cores * 1000.0).ceil() as u64 * 100),
        "{status:#}"
    );
    assert_eq!(
        web["applied"]["cpu"].as_f64().unwrap(),
        (cores * 1000.0).ceil() / 1000.0
    );
    // Memory had no usage, so no decision: its limit is untouched, not set to a guess.
    assert_eq!(read(root.path(), "forestall/web/memory.max"), "max");
    // The pool is shared: web is critical (weight 10), so its need took from batch, down
    // to batch's floor (0.1 core) at most, and batch's cgroup got the smaller quota.
    let batch = status["components"][1]["allocation"]["cpu"]
        .as_f64()
        .unwrap();
    assert!(cores + batch <= 4.0 + 1e-9, "{cores} + {batch}");
    assert!((0.1..2.0).contains(&batch), "{batch}");
    assert_eq!(
        read(root.path(), "forestall/batch/cpu.max"),
        format!("{} 100000", (batch * 1000.0).ceil() as u64 * 100)
    );
    // Every decision is a row of forestall_allocations.
    let rows = sql(
        &f,
        "SELECT action, after, applied FROM forestall_allocations \
         WHERE component = 'web' AND resource = 'cpu' ORDER BY time",
    )
    .await;
    assert!(!rows.is_empty());
    let last = rows.last().unwrap();
    assert_eq!(last[0], "raise");
    assert_eq!(last[1].parse::<f64>().unwrap(), cores);
    assert_eq!(last[2], "true");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dry_run_meters_decides_and_audits_but_changes_nothing() {
    let root = mimic_v2(&["web", "batch"]);
    let f = store();
    let (a, cqs) = start(&f, &config(root.path(), false, true)).await;
    // web runs in a network namespace of its own (batch has no process).
    let netns = NetnsProcess::start();
    std::fs::write(
        root.path().join("forestall/web/cgroup.procs"),
        netns.0.id().to_string(),
    )
    .unwrap();
    let before: Vec<String> = ["cpu.max", "memory.max", "memory.high", "io.max"]
        .iter()
        .map(|file| read(root.path(), &format!("forestall/web/{file}")))
        .collect();
    for i in 1..=4u64 {
        // web's cgroup counts a second of CPU more each round.
        std::fs::write(
            root.path().join("forestall/web/cpu.stat"),
            format!("usage_usec {}\n", i * 1_000_000),
        )
        .unwrap();
        write_cpu(&f.store, &[("web", 300.0), ("batch", 50.0)]);
        step(&f, &a, &cqs).await;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let after: Vec<String> = ["cpu.max", "memory.max", "memory.high", "io.max"]
        .iter()
        .map(|file| read(root.path(), &format!("forestall/web/{file}")))
        .collect();
    assert_eq!(before, after, "dry-run changed a cgroup");
    let status = a.status();
    assert_eq!(status["mode"], "dry-run");
    assert_eq!(status["actuator"], "dry-run");
    // The recorder holds what would have been applied.
    let web = &status["components"][0];
    assert!(web["allocation"]["cpu"].as_f64().unwrap() > 2.0);
    assert_eq!(
        web["applied"]["cpu"].as_f64().unwrap(),
        (web["allocation"]["cpu"].as_f64().unwrap() * 1000.0).ceil() / 1000.0
    );
    let rows = sql(
        &f,
        "SELECT count(*), bool_or(applied) FROM forestall_allocations",
    )
    .await;
    assert_ne!(rows[0][0], "0");
    assert_eq!(rows[0][1], "false");
    // Without a disk device or a tc interface (or a webhook) nothing could apply disk or
    // network bandwidth: those are neither allocated nor audited.
    let rows = sql(
        &f,
        "SELECT count(*) FROM forestall_allocations WHERE resource IN ('disk', 'net')",
    )
    .await;
    assert_eq!(rows[0][0], "0");
    // The collector metered the cgroup: working set is memory.current less inactive file,
    // and CPU and network are rates once there are two readings; batch, with no process in
    // a namespace of its own, has no network usage.
    let rows = sql(
        &f,
        "SELECT component, max(mem), count(cpu), count(net) FROM forestall_usage \
         GROUP BY component ORDER BY component",
    )
    .await;
    assert_eq!(rows[1][0], "web");
    assert_eq!(rows[1][1].parse::<f64>().unwrap(), 40.0 * 1048576.0);
    assert_eq!((rows[1][2].as_str(), rows[1][3].as_str()), ("3", "3"));
    assert_eq!((rows[0][0].as_str(), rows[0][3].as_str()), ("batch", "0"));
    drop(netns);
}

/// A process in a network namespace of its own, killed at the end even when the test fails.
struct NetnsProcess(std::process::Child);

impl NetnsProcess {
    fn start() -> Self {
        let child = std::process::Command::new("unshare")
            .args(["--net", "sleep", "60"])
            .spawn()
            .expect("unshare(1) is installed");
        let p = Self(child);
        let own = std::fs::read_link("/proc/self/ns/net").unwrap();
        let theirs = format!("/proc/{}/ns/net", p.0.id());
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while std::fs::read_link(&theirs).ok().is_none_or(|ns| ns == own) {
            assert!(
                std::time::Instant::now() < deadline,
                "unshare --net did not"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        p
    }
}

impl Drop for NetnsProcess {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn preferences_are_checked_kept_across_restarts_and_win_over_the_file() {
    let root = mimic_v2(&["web", "batch"]);
    let f = store();
    let cfg = config(root.path(), false, false);
    let a = Allocations::new(&cfg, &f.data_dir).unwrap();
    let capped = PreferencesConfig {
        cap: Amounts {
            cpu: Some(1.5),
            ..Amounts::default()
        },
        unmanaged: vec![ResourceName::Net],
        pinned_cpus: Some(vec![0]),
        ..PreferencesConfig::default()
    };
    assert!(a.set_preferences("web", capped.clone()).unwrap());
    assert!(!a.set_preferences("nope", capped.clone()).unwrap());
    let bad = PreferencesConfig {
        floor: Amounts {
            cpu: Some(2.0),
            ..Amounts::default()
        },
        ..capped.clone()
    };
    assert!(matches!(
        a.set_preferences("web", bad),
        Err(SetError::Invalid(e)) if e.contains("above its cap")
    ));
    let no_cpu = PreferencesConfig {
        pinned_cpus: Some(vec![4096]),
        ..capped.clone()
    };
    assert!(matches!(
        a.set_preferences("web", no_cpu),
        Err(SetError::Invalid(_))
    ));
    // A restart reads them back; the refused ones left no trace.
    drop(a);
    let b = Allocations::new(&cfg, &f.data_dir).unwrap();
    let prefs = b.preferences();
    assert_eq!(prefs["web"]["cap"]["cpu"], 1.5);
    assert_eq!(prefs["web"]["unmanaged"][0], "net");
    assert_eq!(prefs["batch"], json!(PreferencesConfig::default()));
    // A damaged file is an error at start-up, not silently empty preferences.
    std::fs::write(f.data_dir.join("allocation/preferences.json"), "{not json").unwrap();
    let e = Allocations::new(&cfg, &f.data_dir).unwrap_err();
    assert!(format!("{e:#}").contains("preferences.json"), "{e:#}");
}

#[test]
fn audit_rows_survive_hostile_reasons() {
    let names = vec!["web".to_string()];
    let hostile = "quote \" backslash \\ comma, equals= space\nnewline\r\nend";
    let report = RoundReport {
        decisions: vec![Decision {
            round: 7,
            component: 0,
            resource: Resource::Cpu,
            from: 1.0,
            to: 2.5,
            action: Action::Raise,
            reason: hostile.into(),
            dry_run: false,
        }],
        applied: vec![(0, Limits::default(), Err(hostile.into()))],
    };
    let text = audit_lines(&report, &names, true, 1_000);
    let lines: Vec<_> = parse_lines(text.as_bytes(), Precision::Nanoseconds, 0)
        .map(|l| l.unwrap())
        .collect();
    assert_eq!(lines.len(), 2, "{text}");
    let flat = "quote \" backslash \\ comma, equals= space newline  end";
    fn reason(l: &ParsedLine<'_>) -> String {
        match l.fields.iter().find(|(k, _)| k == "reason") {
            Some((_, FieldValue::String(s))) => s.to_string(),
            other => panic!("reason: {other:?}"),
        }
    }
    assert_eq!(reason(&lines[0]), flat);
    assert_eq!(reason(&lines[1]), flat);
    assert_eq!(
        lines[0].tags,
        vec![
            ("component".into(), "web".into()),
            ("resource".into(), "cpu".into()),
            ("action".into(), "raise".into())
        ]
    );
    assert!(
        lines[1]
            .tags
            .contains(&("action".into(), "apply_failed".into()))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_warms_the_forecasters_from_stored_usage() {
    let root = mimic_v2(&["web", "batch"]);
    let f = store();
    // Two minutes of one-second rounds in which the usage queries delivered web at 2.5
    // cores; batch never reported. One much older row lies beyond what the forecasters keep
    // (900 rounds).
    let now = now_nanos();
    let mut body = String::new();
    let row = |usage: f64, t: i64| {
        format!(
            "{REQUESTS_MEASUREMENT},component=web,query=forestall_usage_cpu,resource=cpu usage={usage} {t}\n"
        )
    };
    for k in 1..=120i64 {
        body.push_str(&row(2.5, now - k * 1_000_000_000));
    }
    body.push_str(&row(90.0, now - 2_000 * 1_000_000_000));
    f.store
        .write(body.as_bytes(), Precision::Nanoseconds, now)
        .unwrap();
    let (a, cqs) = start(&f, &config(root.path(), false, false)).await;
    let cpu =
        |a: &Allocations, c: usize| a.forecasts()["components"][c]["resources"]["cpu"].clone();
    assert_eq!(
        cpu(&a, 0)["steps"],
        json!([]),
        "no forecast before any usage"
    );
    assert_eq!(cpu(&a, 0)["request"], json!(null));

    let learned = a.warm_up(&f.store, &f.query).await;
    // 120 rounds of rows (one or two more if the machine paused between the write and the
    // read); the row 2,000 rounds back is beyond the 900 kept.
    assert!((120..=125).contains(&learned), "{learned} rounds learned");
    let web = cpu(&a, 0);
    let steps = web["steps"].as_array().unwrap();
    assert_eq!(steps.len(), 5, "one step per round of the 5 s horizon");
    for s in steps {
        assert!((s["mean"].as_f64().unwrap() - 2.5).abs() < 1e-6, "{s}");
        assert!(
            s["upper"].as_f64().unwrap() < 3.0,
            "the old 90-core row was not read: {s}"
        );
    }
    assert!(web["request"]["amount"].as_f64().unwrap() >= 2.5 / 0.8);
    assert_eq!(cpu(&a, 1)["steps"], json!([]), "batch has no usage yet");
    // The first round after the warm start reads from where it ended, and decides at once.
    write_cpu(&f.store, &[("web", 250.0)]);
    step(&f, &a, &cqs).await;
    let status = a.status();
    assert_eq!(status["round"], 1);
    assert!(
        status["components"][0]["allocation"]["cpu"]
            .as_f64()
            .unwrap()
            >= 2.5 / 0.8
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn risks_learn_which_resource_runs_hot_and_keep_it_across_restarts() {
    let root = mimic_v2(&["web", "batch"]);
    let f = store();
    let mut cfg = config(root.path(), false, false);
    // web is capped at one core and uses three: its CPU is over θ every round. Its memory,
    // like batch's everything, reports nothing.
    cfg.components[0].preferences.cap.cpu = Some(1.0);
    let (a, cqs) = start(&f, &cfg).await;
    assert_eq!(a.risks()["components"][0]["resources"], json!(null));
    for _ in 0..30 {
        write_cpu(&f.store, &[("web", 300.0)]);
        step(&f, &a, &cqs).await;
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let risks = a.risks();
    let web = &risks["components"][0]["resources"];
    let cpu = web["cpu"]["score"].as_f64().unwrap();
    let mem = web["mem"]["score"].as_f64().unwrap();
    assert!(cpu > 0.8, "{risks:#}");
    assert!(mem < 0.2, "{risks:#}");
    let reasons = web["cpu"]["reasons"].to_string();
    assert!(reasons.contains("level:cpu=over"), "{reasons}");
    // The request behind web's CPU carries the same risk.
    let fc = a.forecasts();
    let q = &fc["components"][0]["resources"]["cpu"]["request"];
    assert!((q["risk"].as_f64().unwrap() - cpu).abs() < 1e-9, "{q}");
    let batch = risks["components"][1]["resources"]["cpu"]["score"]
        .as_f64()
        .unwrap();
    assert!(
        batch < 0.2,
        "batch reports nothing and is never hot: {batch}"
    );
    // The models' accounts: per component and resource, every step ahead is answered by the
    // model with the lowest rolling error there, and the global LSTM has a record.
    let models = a.models();
    assert_eq!(models["series"].as_array().unwrap().len(), 2 * 4);
    let web_cpu = &models["series"][0];
    assert_eq!(
        (&web_cpu["component"], &web_cpu["resource"]),
        (&json!("web"), &json!("cpu"))
    );
    for step in web_cpu["steps"].as_array().unwrap() {
        let errors = step["rolling_error"].as_object().unwrap();
        assert!(errors.contains_key("global_lstm"), "{step}");
        let least = errors
            .values()
            .filter_map(|e| e.as_f64())
            .min_by(f64::total_cmp)
            .unwrap();
        // (Ties go to the first model in the list.)
        let answering = step["model"].as_str().unwrap();
        assert_eq!(errors[answering].as_f64(), Some(least), "{step}");
    }
    let rounds = models["global_lstm"]["rounds"].clone();
    assert!(rounds.as_u64().unwrap() >= 30, "{rounds}");
    a.save();
    drop(a);

    // The tables and the evidence they score come back as they were: the same risks and
    // reasons at once, not the prior's 0.5 until a horizon of new outcomes is counted.
    let b = Allocations::new(&cfg, &f.data_dir).unwrap();
    assert_eq!(b.risks(), risks);

    // The global LSTM (on by default) serves all eight series, and its weights, kept beside
    // the state, resume with their record; weights that are not a checkpoint cost the
    // training, not the start.
    assert_eq!(b.models()["global_lstm"]["series"], 8);
    assert_eq!(b.models()["global_lstm"]["rounds"], rounds);
    drop(b);
    let weights = f.data_dir.join("allocation/global_lstm.ckpt");
    assert!(std::fs::metadata(&weights).unwrap().len() > 1000);
    std::fs::write(&weights, b"not weights").unwrap();
    let d = Allocations::new(&cfg, &f.data_dir).unwrap();
    assert_eq!(d.models()["global_lstm"]["rounds"], 0);
    drop(d);

    // State saved before risks were kept still resumes the engine; the risks start afresh.
    let path = f.data_dir.join("allocation/state.json");
    let mut saved: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    assert!(saved.as_object_mut().unwrap().remove("risks").is_some());
    std::fs::write(&path, serde_json::to_vec(&saved).unwrap()).unwrap();
    let c = Allocations::new(&cfg, &f.data_dir).unwrap();
    assert_eq!(c.status()["round"], 30);
    assert_eq!(c.risks()["components"][0]["resources"], json!(null));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_carries_on_from_the_learned_state_and_reapplies_it() {
    let root = mimic_v2(&["web", "batch"]);
    let f = store();
    let cfg = config(root.path(), true, false);
    let (a, cqs) = start(&f, &cfg).await;
    for _ in 0..4 {
        write_cpu(&f.store, &[("web", 300.0), ("batch", 50.0)]);
        step(&f, &a, &cqs).await;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let before = a.status();
    let quota = read(root.path(), "forestall/web/cpu.max");
    assert_ne!(quota, "max 100000");
    // Only the first round was written (the next save is due in five minutes); stopping the
    // server writes the rest.
    let first: Saved =
        serde_json::from_slice(&std::fs::read(f.data_dir.join("allocation/state.json")).unwrap())
            .unwrap();
    assert_eq!(first.round, 1);
    cqs.stop().await;
    a.save();
    drop(a);
    // Meanwhile someone lifts web's limit.
    std::fs::write(root.path().join("forestall/web/cpu.max"), "max 100000").unwrap();

    let (b, cqs) = start(&f, &cfg).await;
    let after = b.status();
    assert_eq!(after["round"], before["round"]);
    // JSON keeps floats to within a unit in the last place.
    fn close(a: &serde_json::Value, b: &serde_json::Value) -> bool {
        match (a, b) {
            (serde_json::Value::Object(x), serde_json::Value::Object(y)) => {
                x.len() == y.len() && x.iter().all(|(k, v)| y.get(k).is_some_and(|w| close(v, w)))
            }
            (serde_json::Value::Number(x), serde_json::Value::Number(y)) => {
                let (x, y) = (x.as_f64().unwrap(), y.as_f64().unwrap());
                (x - y).abs() <= 1e-12 * x.abs().max(1.0)
            }
            _ => a == b,
        }
    }
    for c in 0..2 {
        for what in ["allocation", "feedback"] {
            let (x, y) = (
                &after["components"][c][what],
                &before["components"][c][what],
            );
            assert!(
                close(x, y),
                "{what}: {x} vs {y}: the engine's books, not a fresh start"
            );
        }
    }
    let cores = before["components"][0]["allocation"]["cpu"]
        .as_f64()
        .unwrap();
    assert!(cores > 2.0, "web was raised above its equal share: {cores}");
    assert_eq!(after["deferred"], before["deferred"]);
    // The next round puts back what the engine holds, though it decides nothing new.
    write_cpu(&f.store, &[("web", 300.0), ("batch", 50.0)]);
    step(&f, &b, &cqs).await;
    assert_eq!(read(root.path(), "forestall/web/cpu.max"), quota);
    assert_eq!(b.status()["round"], before["round"].as_u64().unwrap() + 1);
    drop(b);

    // A damaged state costs what was learned, not the start.
    std::fs::write(f.data_dir.join("allocation/state.json"), "{\"round\": tru").unwrap();
    let c = Allocations::new(&cfg, &f.data_dir).unwrap();
    assert_eq!(c.status()["round"], 0);
}

/// The path from a write to the kernel: an on-write allocation query's demand is applied
/// when its query delivers it, not at the next round (a day away here).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_demand_is_applied_as_soon_as_its_query_delivers_it() {
    let root = mimic_v2(&["web", "batch"]);
    let f = store();
    let day = Duration::from_secs(86_400);
    let cfg = AllocationConfig {
        interval: day,
        horizon: day,
        ..config(root.path(), true, false)
    };
    let (a, cqs) = start(&f, &cfg).await;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let looping = tokio::spawn(run(
        a.clone(),
        Arc::clone(&f.store),
        f.query.clone(),
        cfg.interval,
        async {
            let _ = stopped.await;
        },
    ));
    let engine = f.query.clone().with_continuous(cqs.clone());
    engine
        .sql(
            "CREATE CONTINUOUS QUERY web_latency ON WRITE ALLOCATE AS \
             SELECT 'web' AS component, 'cpu' AS resource, \
             CASE WHEN max(p99) > 0.2 THEN 3.0 END AS demand \
             FROM latency WHERE time > now() - INTERVAL '1 minute'",
        )
        .await
        .unwrap();
    // web starts at half the 4-core pool; a fast answer asks for nothing.
    let before = read(root.path(), "forestall/web/cpu.max");
    let latency = |p99: f64| {
        let now = now_nanos();
        let o = f
            .store
            .write(
                format!("latency p99={p99} {now}").as_bytes(),
                Precision::Nanoseconds,
                now,
            )
            .unwrap();
        assert_eq!(o.rejected_lines, 0);
    };
    latency(0.05);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(read(root.path(), "forestall/web/cpu.max"), before);
    // A slow one asks for 3 cores, and the kernel has them (with the engine's overshoot,
    // within the pool, taken from batch: web is critical) before any round has run.
    latency(0.4);
    let mut quota = before.clone();
    for _ in 0..200 {
        quota = read(root.path(), "forestall/web/cpu.max");
        if quota != before {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let status = a.status();
    assert_eq!(status["round"], 0, "{status:#}");
    let cores = status["components"][0]["allocation"]["cpu"]
        .as_f64()
        .unwrap();
    assert!((3.0..=4.0).contains(&cores), "{status:#}");
    assert_eq!(
        quota,
        format!("{} 100000", (cores * 1000.0).ceil() as u64 * 100),
        "{status:#}"
    );
    // The audit says which query asked (its rows are stored just after the apply, and
    // until the first of them its table does not exist: wait).
    let mut rows = Vec::new();
    for _ in 0..200 {
        let q = "SELECT action, reason FROM forestall_allocations \
                 WHERE component = 'web' AND resource = 'cpu' AND action = 'raise'";
        if f.store.table("forestall_allocations").is_some() {
            rows = sql(&f, q).await;
        }
        if !rows.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert!(
        rows.iter()
            .any(|r| r[1].ends_with("asked by query web_latency")),
        "{rows:?}"
    );
    let _ = stop.send(());
    looping.await.unwrap();
}
