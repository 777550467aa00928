use super::*;
use forestall_actuators::Actuator;
use std::collections::BTreeMap;

/// A small trace: `n` steps of 5 minutes, three components (critical, standard, batch) with
/// a daily-ish cycle of 48 steps and a surge every cycle.
fn write_trace(dir: &Path, n: usize, visible: Option<usize>) {
    std::fs::create_dir_all(dir).unwrap();
    let visible_field = visible.map_or(String::new(), |k| format!(r#""n_steps_visible": {k},"#));
    std::fs::write(
        dir.join("meta.json"),
        format!(
            r#"{{"step_seconds": 300, "n_steps": {n}, {visible_field} "warmup_steps": {}, "threshold": 0.9,
               "resources": {{"cpu": {{"floor": 50}}, "mem": {{"floor": 64}}, "net": {{"floor": 10}}, "disk": {{"floor": 10}}}},
               "contended": {{"capacity": {{"cpu": 3000, "mem": 3000, "net": 300, "disk": 300}}}}}}"#,
            n / 5
        ),
    )
    .unwrap();
    std::fs::write(
        dir.join("components.csv"),
        "component,tier,weight,deferrable,cpu_provisioned_mhz\nvm1,critical,10.0,0,1\nvm2,standard,3.0,0,1\nvm3,batch,1.0,1,1\n",
    )
    .unwrap();
    let mut usage = String::from("step,timestamp,component,cpu,mem,net,disk\n");
    for t in 0..visible.unwrap_or(n) {
        for (c, name) in ["vm1", "vm2", "vm3"].iter().enumerate() {
            let phase = t % 48;
            let surge = if (30..36).contains(&phase) { 3.0 } else { 1.0 };
            let wobble = ((t * 7919 + c * 104_729) % 17) as f64 / 17.0;
            let cpu = (300.0 + 100.0 * c as f64) * surge + 40.0 * wobble;
            writeln!(
                usage,
                "{t},{},{name},{cpu},{},{},{}",
                1_375_660_800 + 300 * t,
                500.0 + 10.0 * wobble,
                20.0 * surge,
                30.0 + wobble
            )
            .unwrap();
        }
    }
    std::fs::write(dir.join("usage.csv"), usage).unwrap();
}

#[test]
fn replay_is_deterministic_and_free_of_look_ahead() {
    let root = tempfile::tempdir().unwrap();
    let full = root.path().join("full");
    write_trace(&full, 600, None);
    let trace = load(&full).unwrap();
    assert_eq!(trace.steps, 600);
    // Step 0's time, for the global LSTM's time features (it is on, as by default).
    assert_eq!(trace.start, 1_375_660_800.0);
    assert!(Options::default().global_lstm);
    let a = run(
        &mut Forestall::new(&trace, false, &Options::default()).unwrap(),
        &trace,
    );
    let b = run(
        &mut Forestall::new(&trace, false, &Options::default()).unwrap(),
        &trace,
    );
    assert_eq!(a, b, "deterministic");
    for k in [130, 377] {
        let cut = root.path().join(format!("cut{k}"));
        write_trace(&cut, 600, Some(k));
        let t = load(&cut).unwrap();
        assert_eq!((t.usage.len(), t.steps), (k, k + 1));
        let c = run(
            &mut Forestall::new(&t, false, &Options::default()).unwrap(),
            &t,
        );
        // Decisions up to and including step k (decided from steps < k) are the same.
        assert_eq!(c[..=k], a[..=k], "cut at {k}");
        for (i, mut baseline) in baselines(&t).into_iter().enumerate() {
            let cut_run = run(baseline.as_mut(), &t);
            let full_run = run(baselines(&trace).swap_remove(i).as_mut(), &trace);
            assert_eq!(
                cut_run[..=k],
                full_run[..=k],
                "{} cut at {k}",
                baseline.name()
            );
        }
    }
}

#[test]
fn replay_drives_the_recording_actuator_with_what_live_would_apply() {
    let root = tempfile::tempdir().unwrap();
    write_trace(root.path(), 400, None);
    let trace = load(root.path()).unwrap();
    let mut f = Forestall::new(&trace, true, &Options::default()).unwrap();
    let alloc = run(&mut f, &trace);
    let (recorded, targets) = f.recorded();
    assert!(!recorded.requests().is_empty());
    for (c, target) in targets.iter().enumerate() {
        // What the actuator holds is what the engine holds at the end, in kernel terms.
        let back = recorded.read_back(target).unwrap();
        let last = alloc.last().unwrap()[c];
        assert_eq!(back, f.controller.limits(c), "{}", target.component);
        assert_eq!(
            back.cpu_millicores,
            Some((last[0] / TRACE_UNITS.cpu_per_core * 1000.0).ceil() as u64)
        );
        assert_eq!(back.memory_max_bytes, Some((last[1] * 1_048_576.0) as u64));
    }
}

#[test]
fn figures_match_a_hand_computed_case() {
    let trace = Trace {
        components: vec![TraceComponent {
            name: "a".into(),
            tier: "critical".into(),
            weight: 10.0,
            deferrable: false,
        }],
        usage: [10.0, 10.0, 95.0, 100.0, 50.0, 50.0]
            .iter()
            .map(|&u| vec![[u, u, u, u]])
            .collect(),
        steps: 6,
        warmup: 2,
        threshold: 0.9,
        step_seconds: 86_400.0 / 4.0,
        start: 0.0,
        floors: [1.0; 4],
        capacity: None,
    };
    let alloc: Vec<Vec<PerResource<f64>>> = [100.0, 100.0, 100.0, 100.0, 100.0, 200.0]
        .iter()
        .map(|&a| vec![[a; 4]])
        .collect();
    let f = figures(&trace, &alloc);
    // Scored steps 2..6: usage 95 (soft), 100 (soft, not hard: equal), 50, 50.
    assert!((f.soft - 0.5).abs() < 1e-12, "{f:?}");
    assert_eq!(f.hard, 0.0);
    // Slack: (5 + 0 + 50 + 150) / (95 + 100 + 50 + 50).
    assert!((f.slack - 205.0 / 295.0).abs() < 1e-12, "{f:?}");
    // One change (step 5) on each of 4 resources over one day.
    assert!((f.churn_per_day - 4.0).abs() < 1e-12, "{f:?}");
    assert_eq!(f.per_tier["critical"], 0.5);
}

#[test]
fn replay_reports_every_allocator_and_writes_the_allocations() {
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("trace");
    write_trace(&dir, 480, None);
    let out = root.path().join("out/alloc.csv");
    let report = replay(&dir, &out, &Options::default(), false).unwrap();
    for needle in [
        "forestall",
        "static",
        "HPA-like",
        "VPA-like",
        "Autopilot-like",
        "contended pool",
        "deferred",
    ] {
        assert!(report.contains(needle), "{needle} missing:\n{report}");
    }
    let written = std::fs::read_to_string(&out).unwrap();
    assert!(written.starts_with("component,resource,step,allocation\n"));
    assert!(written.lines().any(|l| l.starts_with("vm1,cpu,0,")));
    // With --contended the allocations written are the run within the pool: at every step
    // the components' allocations of each resource fit its capacity.
    let report = replay(&dir, &out, &Options::default(), true).unwrap();
    assert!(report.contains("contended pool"), "{report}");
    let capacity = [
        ("cpu", 3000.0),
        ("mem", 3000.0),
        ("net", 300.0),
        ("disk", 300.0),
    ];
    let mut held: BTreeMap<(String, String), f64> = BTreeMap::new();
    let mut sums: BTreeMap<(usize, String), f64> = BTreeMap::new();
    let rows: Vec<(String, String, usize, f64)> = std::fs::read_to_string(&out)
        .unwrap()
        .lines()
        .skip(1)
        .map(|l| {
            let f: Vec<&str> = l.split(',').collect();
            (
                f[0].into(),
                f[1].into(),
                f[2].parse().unwrap(),
                f[3].parse().unwrap(),
            )
        })
        .collect();
    // Rows are written where a value changes: carry each forward through the steps.
    for t in 0..480 {
        for (c, r, step, a) in &rows {
            if *step == t {
                held.insert((c.clone(), r.clone()), *a);
            }
        }
        for ((_, r), a) in &held {
            *sums.entry((t, r.clone())).or_default() += a;
        }
    }
    for ((t, r), total) in &sums {
        let cap = capacity.iter().find(|(n, _)| n == r).unwrap().1;
        assert!(
            *total <= cap * (1.0 + 1e-9),
            "step {t}: {r} {total} > {cap}"
        );
    }
    // Bad traces are refused with the reason.
    std::fs::write(
        dir.join("usage.csv"),
        "step,timestamp,component,cpu,mem,net,disk\n0,0,nobody,1,1,1,1\n",
    )
    .unwrap();
    let err = replay(&dir, &out, &Options::default(), false)
        .unwrap_err()
        .to_string();
    assert!(err.contains("unknown component"), "{err}");
    std::fs::remove_file(dir.join("meta.json")).unwrap();
    assert!(replay(&dir, &out, &Options::default(), false).is_err());
    // A trace without a pool cannot be replayed --contended.
    let plain = root.path().join("plain");
    write_trace(&plain, 48, None);
    let meta = std::fs::read_to_string(plain.join("meta.json")).unwrap();
    let meta: serde_json::Value = serde_json::from_str(&meta).unwrap();
    let mut meta = meta.as_object().unwrap().clone();
    meta.remove("contended");
    std::fs::write(
        plain.join("meta.json"),
        serde_json::to_string(&meta).unwrap(),
    )
    .unwrap();
    let err = replay(&plain, &out, &Options::default(), true)
        .unwrap_err()
        .to_string();
    assert!(err.contains("needs a pool"), "{err}");
}

/// Two components with the same relative noise (bursts of 1.6× in about one round of ten),
/// one a hundred times the other's size, over `steps` rounds of which `visible` are seen.
fn small_and_large(steps: usize, visible: usize) -> Trace {
    let component = |name: &str| TraceComponent {
        name: name.into(),
        tier: "standard".into(),
        weight: 3.0,
        deferrable: false,
    };
    Trace {
        components: vec![component("small"), component("large")],
        usage: (0..visible)
            .map(|t| {
                let h = (t * 2_654_435_761) % 1000;
                let level = (1.0 + 0.1 * (h % 17) as f64 / 17.0) * if h < 100 { 1.6 } else { 1.0 };
                [50.0, 5000.0]
                    .iter()
                    .map(|size| [size * level, 64.0, 10.0, 10.0])
                    .collect()
            })
            .collect(),
        steps,
        warmup: 240,
        threshold: 0.9,
        step_seconds: 300.0,
        start: 1_375_660_800.0,
        floors: [1.0, 64.0, 10.0, 10.0],
        capacity: None,
    }
}

/// With a price, headroom goes where it prevents violations cheaply: the small component
/// ends with more headroom and fewer violations than the large one, whose every unit of
/// headroom costs a hundred times more. The priced replay stays deterministic and free of
/// look-ahead.
#[test]
fn a_priced_headroom_is_spent_where_it_prevents_most_violations() {
    let options = Options {
        headroom_price: 0.5,
        ..Options::default()
    };
    let trace = small_and_large(1200, 1200);
    let mut f = Forestall::new(&trace, false, &options).unwrap();
    let alloc = run(&mut f, &trace);
    let headroom = |c: usize| f.engine().feedback(c, Resource::Cpu).headroom;
    assert!(headroom(0) > headroom(1), "{} {}", headroom(0), headroom(1));
    let violations = |c: usize| {
        (trace.warmup..trace.steps)
            .filter(|&t| trace.usage[t][c][0] > 0.9 * alloc[t][c][0])
            .count()
    };
    assert!(
        violations(0) < violations(1),
        "small {} large {}",
        violations(0),
        violations(1)
    );
    // The large component is not left bare: it still covers most rounds.
    assert!(
        violations(1) * 4 < trace.steps - trace.warmup,
        "{}",
        violations(1)
    );
    assert_eq!(
        run(
            &mut Forestall::new(&trace, false, &options).unwrap(),
            &trace
        ),
        alloc,
        "deterministic"
    );
    let k = 900;
    let cut = small_and_large(k + 1, k);
    let c = run(&mut Forestall::new(&cut, false, &options).unwrap(), &cut);
    assert_eq!(c[..=k], alloc[..=k], "cut at {k}");
}
