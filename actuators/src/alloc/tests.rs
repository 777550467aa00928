use super::*;

fn component(name: &str, weight: f64, deferrable: bool) -> Component {
    Component {
        name: name.into(),
        weight,
        deferrable,
        preferences: Preferences::default(),
    }
}

fn cpu(c: usize, amount: f64) -> Request {
    Request {
        component: c,
        resource: Resource::Cpu,
        amount,
        need: amount,
        risk: 0.5,
        observed: 0.0,
    }
}

fn pool(cpu: f64) -> PerResource<Option<f64>> {
    [Some(cpu), None, None, None]
}

fn at(cpu: f64) -> PerResource<f64> {
    [cpu, 1.0, 1.0, 1.0]
}

/// A critical db, a standard web and a deferrable batch component sharing 100 CPUs, holding
/// `cpu` each.
fn three_tiers(cpu: [f64; 3]) -> Engine {
    let comps = vec![
        component("db", 10.0, false),
        component("web", 3.0, false),
        component("batch", 1.0, true),
    ];
    Engine::new(
        AllocConfig::default(),
        comps,
        pool(100.0),
        cpu.map(at).to_vec(),
    )
    .unwrap()
}

/// A CPU request of `amount` whose need is `need`.
fn with_need(c: usize, amount: f64, need: f64) -> Request {
    Request {
        need,
        ..cpu(c, amount)
    }
}

fn cpus(e: &Engine) -> Vec<f64> {
    (0..e.components().len())
        .map(|c| e.allocation(c)[0])
        .collect()
}

#[test]
fn a_short_pool_preempts_for_the_critical_and_defers_the_rest() {
    let mut comps = vec![
        component("db", 10.0, false),
        component("web", 3.0, false),
        component("batch", 1.0, true),
    ];
    comps[2].preferences.floor[0] = Some(5.0);
    let mut e = Engine::new(
        AllocConfig::default(),
        comps,
        pool(100.0),
        vec![at(30.0), at(30.0), at(30.0)],
    )
    .unwrap();
    // Batch asks for 50: 10 are free, the other 10 wait in the queue.
    let d = e.round(1, &[cpu(2, 50.0)]);
    assert_eq!(e.allocation(2)[0], 40.0);
    assert!(
        d.iter()
            .any(|d| matches!(d.action, Action::Deferred { short } if (short - 10.0).abs() < 1e-9)),
        "{d:?}"
    );
    assert_eq!(e.deferred().len(), 1);
    // The critical db asks for 70: the pool is empty, so it takes from batch (lowest weight)
    // down to its floor, then from web.
    let d = e.round(2, &[cpu(0, 70.0), cpu(2, 50.0)]);
    assert_eq!(e.allocation(0)[0], 70.0, "{d:?}");
    assert_eq!(e.allocation(2)[0], 5.0);
    assert_eq!(e.allocation(1)[0], 25.0);
    assert!(
        d.iter()
            .any(|d| d.component == 2 && d.action == Action::Preempted { by: 0 })
    );
    let total: f64 = (0..3).map(|c| e.allocation(c)[0]).sum();
    assert!(total <= 100.0 + 1e-9);
    // Web is not critical: it cannot preempt, and waits.
    e.round(3, &[cpu(1, 40.0)]);
    assert_eq!(e.allocation(1)[0], 25.0);
    assert_eq!(e.deferred().len(), 2);
    // The db's need passes; after its cooldown it releases step by step, and the queue is
    // served: web first (higher weight), then batch.
    for round in 4..60 {
        e.round(round, &[cpu(0, 20.0), cpu(1, 40.0), cpu(2, 50.0)]);
    }
    // Within the 2% raise band of its request.
    assert!(e.allocation(1)[0] >= 40.0 * 0.98, "{}", e.allocation(1)[0]);
    assert!(e.allocation(2)[0] > 5.0);
    assert!(
        e.audit()
            .any(|d| d.component == 1 && matches!(d.action, Action::Granted { .. }))
    );
    let total: f64 = (0..3).map(|c| e.allocation(c)[0]).sum();
    assert!(total <= 100.0 + 1e-9, "{total}");
}

#[test]
fn work_that_cannot_wait_takes_deferrable_work_but_never_memory() {
    let comps = vec![component("web", 3.0, false), component("batch", 1.0, true)];
    let full = [Some(100.0), Some(100.0), None, None];
    let mut e = Engine::new(
        AllocConfig::default(),
        comps,
        full,
        vec![[40.0, 40.0, 1.0, 1.0], [60.0, 60.0, 1.0, 1.0]],
    )
    .unwrap();
    let ask = |c, resource, amount| Request {
        component: c,
        resource,
        amount,
        need: amount,
        risk: 0.5,
        observed: 0.0,
    };
    // Web's CPU cannot wait: it takes from batch's CPU, which can.
    let d = e.round(1, &[ask(0, Resource::Cpu, 60.0)]);
    assert_eq!(e.allocation(0)[0], 60.0, "{d:?}");
    assert_eq!(e.allocation(1)[0], 40.0);
    assert!(
        d.iter()
            .any(|d| d.component == 1 && d.action == Action::Preempted { by: 0 })
    );
    // Batch's memory cannot wait either, so it is never taken: web's memory request waits.
    let d = e.round(2, &[ask(0, Resource::Mem, 60.0)]);
    assert_eq!(e.allocation(1)[1], 60.0, "{d:?}");
    assert_eq!(e.allocation(0)[1], 40.0);
    assert!(
        e.deferred()
            .iter()
            .any(|q| q.component == 0 && q.resource == Resource::Mem)
    );
    // Batch cannot take from web: deferrable work waits for the pool.
    e.round(3, &[ask(1, Resource::Cpu, 60.0)]);
    assert_eq!(e.allocation(1)[0], 40.0);
    assert!(
        e.deferred()
            .iter()
            .any(|q| q.component == 1 && q.resource == Resource::Cpu)
    );
}

#[test]
fn on_a_short_pool_every_need_is_served_before_anyones_headroom() {
    let mut e = three_tiers([10.0, 10.0, 10.0]);
    // 70 free; the db wants 90 (need 40), web 40 (need 30), batch 40 (need 20): 140 asked.
    let d = e.round(
        1,
        &[
            with_need(0, 90.0, 40.0),
            with_need(1, 40.0, 30.0),
            with_need(2, 40.0, 20.0),
        ],
    );
    let cpu = cpus(&e);
    // Every need is met; the db's headroom takes what is left, and preempts no one below
    // their need.
    assert_eq!(cpu, vec![50.0, 30.0, 20.0], "{d:?}");
    assert!(
        !d.iter()
            .any(|d| matches!(d.action, Action::Preempted { .. })),
        "{d:?}"
    );
    // Missing headroom is not work waiting.
    assert!(e.deferred().is_empty(), "{:?}", e.deferred());
    // The db's need grows: it preempts batch, which can wait, down to the floor (0 here), and
    // batch's missing need waits in the queue.
    let d = e.round(
        2,
        &[
            with_need(0, 90.0, 75.0),
            with_need(1, 40.0, 30.0),
            with_need(2, 40.0, 20.0),
        ],
    );
    let cpu = cpus(&e);
    assert_eq!(cpu[0], 75.0, "{d:?}");
    assert!((cpu.iter().sum::<f64>() - 100.0).abs() < 1e-9, "{cpu:?}");
    assert!(
        d.iter()
            .any(|d| d.component == 2 && d.action == Action::Preempted { by: 0 })
    );
    assert!(e.deferred().iter().any(|q| q.component == 2));
}

#[test]
fn a_need_reclaims_headroom_but_never_the_critical_tiers() {
    let mut e = three_tiers([40.0, 50.0, 10.0]);
    // The pool is full. The db and web each hold 20 above their need; batch needs 30.
    let d = e.round(
        1,
        &[
            with_need(0, 40.0, 20.0),
            with_need(1, 50.0, 30.0),
            with_need(2, 30.0, 30.0),
        ],
    );
    let cpu = cpus(&e);
    assert_eq!(cpu, vec![40.0, 30.0, 30.0], "{d:?}");
    assert!(
        d.iter().any(|d| d.component == 1
            && d.action == Action::Preempted { by: 2 }
            && d.reason.contains("reclaimed")),
        "{d:?}"
    );
    assert!(e.deferred().is_empty());
    // More need than there is headroom outside the critical tier: the rest waits.
    e.round(
        2,
        &[
            with_need(0, 40.0, 20.0),
            with_need(1, 30.0, 30.0),
            with_need(2, 45.0, 45.0),
        ],
    );
    assert_eq!(e.allocation(0)[0], 40.0);
    assert_eq!(e.allocation(2)[0], 30.0);
    assert!(e.deferred().iter().any(|q| q.component == 2));
}

#[test]
fn deferred_work_that_waited_its_turn_takes_the_pool_in_turns() {
    let config = AllocConfig {
        age_after: 3,
        ..AllocConfig::default()
    };
    let comps = vec![component("a", 1.0, true), component("b", 1.0, true)];
    let mut e = Engine::new(config, comps, pool(100.0), vec![at(90.0), at(10.0)]).unwrap();
    // Both need more than half the pool for ever: without turns, b would wait for ever
    // behind a, which holds 90.
    let mut longest = 0;
    for round in 1..40 {
        e.round(round, &[with_need(0, 90.0, 90.0), with_need(1, 60.0, 60.0)]);
        let total: f64 = cpus(&e).iter().sum();
        assert!(total <= 100.0 + 1e-9, "{total}");
        for d in e.deferred() {
            longest = longest.max(round - d.since);
        }
    }
    assert!(longest <= 3, "a request waited {longest} rounds");
    let granted = |c| {
        e.audit()
            .filter(|d| d.component == c && matches!(d.action, Action::Granted { .. }))
            .count()
    };
    assert!(
        granted(0) >= 3 && granted(1) >= 3,
        "{} {}",
        granted(0),
        granted(1)
    );
    assert!(
        e.audit()
            .any(|d| d.component == 0 && d.reason.contains("its turn")),
        "b took from a when its turn came"
    );
}

#[test]
fn noisy_requests_do_not_make_the_allocation_flap() {
    let mut e = Engine::new(
        AllocConfig::default(),
        vec![component("svc", 3.0, false)],
        pool(1e9),
        vec![at(100.0)],
    )
    .unwrap();
    let mut seed = 9u64;
    let mut changes = 0;
    for round in 0..1000 {
        seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let noise = (seed >> 11) as f64 / (1u64 << 53) as f64 - 0.5;
        // ±10% around 100 every round.
        let d = e.round(round, &[cpu(0, 100.0 * (1.0 + 0.2 * noise))]);
        changes += d.iter().filter(|d| d.from != d.to).count();
    }
    // The first rounds may settle near the top of the band; after that it holds.
    assert!(changes <= 3, "{changes} changes in 1000 noisy rounds");
    let a = e.allocation(0)[0];
    assert!((100.0..=115.0).contains(&a), "{a}");
}

#[test]
fn a_fresh_start_releases_only_after_a_whole_window_of_low_requests() {
    // Starts at 8 cores (what its cgroup held) and asks for 1 from the first round.
    let config = AllocConfig::default();
    let window = config.cooldown;
    let mut e = Engine::new(
        config,
        vec![component("svc", 1.0, false)],
        pool(16.0),
        vec![at(8.0)],
    )
    .unwrap();
    for round in 0..window - 1 {
        let d = e.round(round, &[cpu(0, 1.0)]);
        assert!(d.is_empty(), "round {round}: {d:?}");
    }
    let d = e.round(window - 1, &[cpu(0, 1.0)]);
    assert_eq!(d.len(), 1, "{d:?}");
    assert_eq!(d[0].action, Action::Release);
    assert!(d[0].to < 8.0);
    // The reason counts the requests it saw.
    assert!(
        d[0].reason
            .starts_with(&format!("requests of the last {window} rounds")),
        "{}",
        d[0].reason
    );
}

#[test]
fn preferences_win_caps_floors_and_opt_out() {
    let mut comps = vec![
        component("critical", 10.0, false),
        component("capped", 3.0, false),
        component("opted_out", 1.0, false),
    ];
    comps[1].preferences.cap[0] = Some(50.0);
    comps[1].preferences.floor[0] = Some(20.0);
    comps[2].preferences.opt_out = true;
    let mut e = Engine::new(
        AllocConfig::default(),
        comps,
        pool(120.0),
        vec![at(30.0), at(30.0), at(40.0)],
    )
    .unwrap();
    for round in 0..50 {
        let d = e.round(round, &[cpu(0, 200.0), cpu(1, 500.0), cpu(2, 1.0)]);
        assert!(
            d.iter().all(|d| d.component != 2),
            "opted-out touched: {d:?}"
        );
        assert!(e.allocation(1)[0] <= 50.0);
        assert!(e.allocation(1)[0] >= 20.0);
        assert_eq!(e.allocation(2)[0], 40.0);
    }
    // The critical component took what it could: the pool less the opted-out share and
    // the capped one's floor.
    assert_eq!(e.allocation(0)[0], 120.0 - 40.0 - 20.0);
    // A floor above a cap is refused.
    let mut bad = component("bad", 1.0, false);
    bad.preferences.floor[0] = Some(10.0);
    bad.preferences.cap[0] = Some(5.0);
    assert!(Engine::new(AllocConfig::default(), vec![bad], pool(10.0), vec![at(1.0)]).is_err());
}

#[test]
fn a_cap_lowered_by_new_preferences_holds_from_the_next_round() {
    let mut e = three_tiers([40.0, 30.0, 20.0]);
    // Recently raised, so no release would be due for a cooldown.
    e.round(0, &[cpu(1, 45.0)]);
    assert!(e.allocation(1)[0] > 40.0);
    let mut p = Preferences::default();
    p.cap[0] = Some(25.0);
    e.set_preferences(1, p);
    let d = e.round(1, &[cpu(1, 45.0)]);
    assert_eq!(e.allocation(1)[0], 25.0, "{d:?}");
    assert!(
        d.iter()
            .any(|d| d.component == 1 && d.action == Action::Release && d.reason.contains("cap")),
        "{d:?}"
    );
    // Later requests above the cap do not raise it again.
    for round in 2..20 {
        e.round(round, &[cpu(1, 80.0)]);
        assert_eq!(e.allocation(1)[0], 25.0);
    }
}

#[test]
fn unmanaged_resources_are_never_touched_and_pinned_cpus_come_with_the_limits() {
    let mut comps = vec![component("db", 10.0, false), component("web", 3.0, false)];
    comps[1].preferences.unmanaged[0] = true;
    comps[1].preferences.pinned_cpus = Some(crate::CpuSet::new([0, 1]).unwrap());
    let mut e = Engine::new(
        AllocConfig::default(),
        comps,
        pool(100.0),
        vec![at(30.0), at(70.0)],
    )
    .unwrap();
    for round in 0..30 {
        // The critical db wants more than is free, web's CPU is unmanaged, and web asks for
        // less: nothing moves web's CPU, not preemption, not a release.
        let d = e.round(round, &[cpu(0, 90.0), cpu(1, 10.0)]);
        assert!(
            !d.iter()
                .any(|d| d.component == 1 && d.resource == Resource::Cpu),
            "{d:?}"
        );
    }
    assert_eq!(cpus(&e), vec![30.0, 70.0]);
    let units = crate::stack::Units::native(1.0);
    let web = e.limits(1, &units);
    assert_eq!(web.cpu_millicores, None, "unmanaged CPU is left alone");
    assert_eq!(web.memory_max_bytes, Some(1));
    assert_eq!(web.cpus.unwrap().iter().collect::<Vec<_>>(), vec![0, 1]);
    assert_eq!(e.limits(0, &units).cpu_millicores, Some(30_000));
    assert_eq!(e.limits(0, &units).cpus, None);
}

#[test]
fn a_raise_that_did_not_help_is_rolled_back_and_headroom_shrinks() {
    let config = AllocConfig::default();
    let mut e = Engine::new(
        config,
        vec![component("svc", 3.0, false)],
        pool(1e9),
        vec![at(100.0)],
    )
    .unwrap();
    // A forecast says a surge is coming; it never does.
    e.round(0, &[cpu(0, 200.0)]);
    assert_eq!(e.allocation(0)[0], 200.0);
    let mut rolled = None;
    let last = config.rollback_after + 6;
    for round in 1..=last {
        e.observe(0, [50.0, 0.0, 0.0, 0.0]);
        let d = e.round(round, &[cpu(0, 200.0)]);
        if let Some(d) = d.iter().find(|d| d.action == Action::Rollback) {
            rolled = Some((round, d.clone()));
        }
        if rolled.is_some() {
            // Held: the same wrong request does not raise it again.
            assert_eq!(e.allocation(0)[0], 100.0, "round {round}");
        }
    }
    let (round, d) = rolled.expect("rolled back");
    assert_eq!(round, config.rollback_after);
    assert_eq!((d.from, d.to), (200.0, 100.0));
    assert!(d.reason.contains("peaked at 50.0"), "{}", d.reason);
    let f = e.feedback(0, Resource::Cpu);
    assert!(
        f.headroom < 1.0 && f.effectiveness < 0.5 && f.judged >= 1,
        "{f:?}"
    );
    // Real pressure overrides the hold: usage near the allocation…
    let mut pressed = e.clone();
    pressed.observe(0, [95.0, 0.0, 0.0, 0.0]);
    pressed.round(last + 1, &[cpu(0, 200.0)]);
    assert_eq!(pressed.allocation(0)[0], 200.0);
    // …or a need observed now, such as a latency query's demand, even between rounds.
    e.round(last + 1, &[cpu(0, 200.0)]);
    assert_eq!(e.allocation(0)[0], 100.0, "still held");
    let observed = Request {
        observed: 150.0,
        ..cpu(0, 150.0)
    };
    e.raise_now(last + 2, &[observed]);
    assert_eq!(e.allocation(0)[0], 150.0);
    // The hold covers the level judged wrong, not a larger claim (a recurring peak the
    // forecast sees coming).
    e.round(last + 3, &[cpu(0, 190.0)]);
    assert_eq!(e.allocation(0)[0], 150.0, "still held up to 200");
    e.round(last + 4, &[cpu(0, 300.0)]);
    assert_eq!(e.allocation(0)[0], 300.0);
    // A raise that was needed keeps its allocation and grows effectiveness.
    let mut e = Engine::new(
        config,
        vec![component("svc", 3.0, false)],
        pool(1e9),
        vec![at(100.0)],
    )
    .unwrap();
    e.round(0, &[cpu(0, 200.0)]);
    for round in 1..=30 {
        e.observe(0, [150.0, 0.0, 0.0, 0.0]);
        e.round(round, &[cpu(0, 200.0)]);
    }
    assert_eq!(e.allocation(0)[0], 200.0);
    assert!(e.feedback(0, Resource::Cpu).effectiveness > 0.5);
}

#[test]
fn dry_run_audits_decisions_and_changes_nothing() {
    let config = AllocConfig {
        dry_run: true,
        ..AllocConfig::default()
    };
    let mut e = Engine::new(
        config,
        vec![component("svc", 3.0, false)],
        pool(1e9),
        vec![at(100.0)],
    )
    .unwrap();
    let d = e.round(0, &[cpu(0, 300.0)]);
    assert_eq!(d.len(), 1);
    assert!(d[0].dry_run && d[0].action == Action::Raise && d[0].to == 300.0);
    assert_eq!(e.allocation(0)[0], 100.0);
}

#[test]
fn requests_are_sized_from_the_forecast_and_learned_headroom() {
    let mut e = Engine::new(
        AllocConfig::default(),
        vec![component("svc", 3.0, false)],
        pool(1e9),
        vec![at(100.0)],
    )
    .unwrap();
    assert!((e.size(0, Resource::Cpu, 90.0) - 100.0).abs() < 1e-9);
    // Violations grow the headroom.
    for _ in 0..5 {
        e.observe(0, [99.0, 0.0, 0.0, 0.0]);
    }
    assert!(e.size(0, Resource::Cpu, 90.0) > 120.0);
    assert!(e.size(0, Resource::Mem, 90.0) < 100.1);
}

/// A component whose usage passes its usual level 1 round in 10 (noise, not a trend), its
/// requests sized from the same forecast every round: with no violation share the learned
/// headroom grows until no round passes θ × the allocation at all; with a share of 5 % it
/// settles lower, where about that share of rounds do.
#[test]
fn headroom_settles_where_violations_take_their_share_of_rounds() {
    let run = |violation_share: f64| {
        let mut e = Engine::new(
            AllocConfig {
                violation_share,
                ..AllocConfig::default()
            },
            vec![component("svc", 3.0, false)],
            pool(1e9),
            vec![at(100.0)],
        )
        .unwrap();
        let mut violations = 0;
        for round in 0..6000u64 {
            let amount = e.size(0, Resource::Cpu, 60.0);
            e.round(round, &[with_need(0, amount, 60.0)]);
            let usage = match round % 20 {
                0 => 78.0,
                10 => 70.0,
                _ => 60.0,
            };
            if round >= 4000 && usage > 0.9 * e.allocation(0)[0] {
                violations += 1;
            }
            e.observe(0, [usage, 0.0, 0.0, 0.0]);
        }
        (
            e.feedback(0, Resource::Cpu).headroom,
            violations as f64 / 2000.0,
        )
    };
    let (grown, none) = run(0.0);
    let (settled, share) = run(0.05);
    assert!(grown >= 1.29, "headroom {grown}");
    assert!(none < 0.01, "violations {none}");
    assert!(
        settled < grown - 0.05,
        "headroom {settled}, without a share {grown}"
    );
    assert!((0.02..=0.1).contains(&share), "violations {share}");
}

#[test]
fn an_engine_resumed_from_what_another_learned_decides_as_it_would() {
    let requests = |round: u64| -> Vec<Request> {
        // Rising and falling demand that defers, preempts, raises, releases and rolls back.
        let wave = 60.0 + 50.0 * ((round as f64) / 7.0).sin();
        vec![
            with_need(0, wave, 0.8 * wave),
            with_need(1, 90.0 - 0.5 * wave, 40.0),
            with_need(2, 70.0, 50.0),
        ]
    };
    let mut a = three_tiers([30.0, 30.0, 30.0]);
    for round in 0..60 {
        a.round(round, &requests(round));
        a.observe(0, [0.5 * a.allocation(0)[0], 1.0, 1.0, 1.0]);
    }
    let state = a.learned();
    assert!(
        state
            .components
            .iter()
            .all(|c| c.last_change[0].is_some() && !c.recent[0].1.is_empty()),
        "{state:?}"
    );
    let mut b = three_tiers([30.0, 30.0, 30.0]);
    assert_eq!(b.resume(&state), 3);
    assert_eq!(b.learned(), state);
    for round in 60..200 {
        let da = a.round(round, &requests(round));
        let db = b.round(round, &requests(round));
        assert_eq!(da, db, "round {round}");
        a.observe(0, [0.5 * a.allocation(0)[0], 1.0, 1.0, 1.0]);
        b.observe(0, [0.5 * b.allocation(0)[0], 1.0, 1.0, 1.0]);
    }
    // Names it does not know are skipped; a lowered cap bounds what is resumed.
    let mut comps = vec![component("db", 10.0, false), component("other", 1.0, false)];
    comps[0].preferences.cap[0] = Some(5.0);
    let mut c = Engine::new(AllocConfig::default(), comps, pool(100.0), vec![at(1.0); 2]).unwrap();
    assert_eq!(c.resume(&state), 1);
    assert_eq!(c.allocation(0)[0], 5.0);
    assert_eq!(c.allocation(1)[0], 1.0);
    assert!(c.deferred().iter().all(|d| d.component == 0));
}

#[test]
fn the_stabilisation_window_keeps_the_maximum_of_the_last_n_requests() {
    let mut seed = 3u64;
    for n in [1u64, 2, 5, 48] {
        let mut w = Window::default();
        let mut plain: VecDeque<f64> = VecDeque::new();
        for _ in 0..2000 {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            // Ties are common: values on a coarse grid.
            let v = ((seed >> 58) as f64) * 10.0;
            plain.push_back(v);
            if plain.len() > n as usize {
                plain.pop_front();
            }
            let want = plain.iter().copied().fold(f64::MIN, f64::max);
            assert_eq!(w.push(v, n), want);
            assert!(w.entries.len() <= n as usize);
        }
    }
}

#[test]
fn holders_find_the_next_member_across_word_boundaries() {
    let mut seed = 11u64;
    for n in [1usize, 63, 64, 65, 130, 1000] {
        let mut h = Holders::new(n);
        let mut plain = vec![false; n];
        for _ in 0..4 * n {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let k = (seed >> 33) as usize % n;
            let on = seed >> 63 == 1;
            h.set(k, on);
            plain[k] = on;
        }
        for k in 0..=n + 1 {
            let want = (k..n).find(|&p| plain[p]);
            assert_eq!(h.next(k), want, "n {n}, from {k}");
        }
    }
}

#[test]
fn a_raise_between_rounds_serves_only_raises_and_leaves_the_release_window_alone() {
    let config = AllocConfig::default();
    let window = config.cooldown;
    let mut e = Engine::new(
        config,
        vec![component("svc", 1.0, false), component("other", 1.0, false)],
        pool(16.0),
        vec![at(8.0), at(2.0)],
    )
    .unwrap();
    // Low requests between rounds neither release nor count toward the window that would.
    for round in 0..window - 1 {
        let d = e.round(round, &[cpu(0, 1.0)]);
        assert!(d.is_empty(), "round {round}: {d:?}");
        for _ in 0..3 {
            assert!(e.raise_now(round, &[cpu(0, 1.0)]).is_empty());
        }
    }
    // A request above the allocation is raised at once, as a round raises it.
    let d = e.raise_now(window - 2, &[cpu(1, 4.0)]);
    assert_eq!(d.len(), 1, "{d:?}");
    assert_eq!(d[0].action, Action::Raise);
    assert_eq!((d[0].component, d[0].from), (1, 2.0));
    let expected = (4.0 * (1.0 + config.overshoot)).min(2.0 * config.max_step_up);
    assert!((d[0].to - expected).abs() < 1e-9, "{d:?}");
    // Asked again, it is already in place.
    assert!(e.raise_now(window - 2, &[cpu(1, 4.0)]).is_empty());
    // The release comes at the round it would have come without the interim steps.
    let d = e.round(window - 1, &[cpu(0, 1.0)]);
    assert_eq!(d.len(), 1, "{d:?}");
    assert_eq!((d[0].component, d[0].action.clone()), (0, Action::Release));
}

#[test]
fn a_raise_between_rounds_stays_within_the_pool_and_queues_the_rest() {
    let mut e = Engine::new(
        AllocConfig::default(),
        vec![component("svc", 1.0, false), component("other", 1.0, false)],
        pool(4.0),
        vec![at(2.0), at(1.5)],
    )
    .unwrap();
    let d = e.raise_now(0, &[cpu(0, 10.0)]);
    assert_eq!(d.len(), 2, "{d:?}");
    assert!(
        d[0].action == Action::Raise && (d[0].to - 2.5).abs() < 1e-9,
        "only what is free: {d:?}"
    );
    assert_eq!(d[1].action, Action::Deferred { short: 7.5 }, "{d:?}");
    assert_eq!(e.deferred().len(), 1, "the rest waits, visibly");
    assert_eq!(
        cpus(&e),
        vec![2.5, 1.5],
        "equal weights take nothing from each other"
    );
}

#[test]
fn a_critical_need_between_rounds_preempts_as_a_round_would() {
    // Before any round each holds what it needs; a critical demand's need then takes from
    // the lower weights down to their floors, deferrable work first.
    let mut e = three_tiers([40.0, 30.0, 30.0]);
    let d = e.raise_now(0, &[with_need(0, 80.0, 70.0)]);
    assert!(
        d.iter()
            .any(|d| d.action == Action::Raise && d.component == 0),
        "{d:?}"
    );
    let [db, web, batch] = cpus(&e)[..] else {
        panic!()
    };
    assert!((db - 70.0).abs() < 1e-9, "{:?}", cpus(&e));
    assert!((web + batch - 30.0).abs() < 1e-9, "{:?}", cpus(&e));
    // A standard component's demand takes nothing from a critical one or an equal.
    let mut e = three_tiers([40.0, 30.0, 30.0]);
    let d = e.raise_now(0, &[with_need(1, 60.0, 50.0)]);
    assert!(
        cpus(&e)[0] >= 40.0 && cpus(&e)[1] <= 60.0,
        "{d:?} {:?}",
        cpus(&e)
    );
}

#[test]
fn memory_is_held_at_its_recent_peak_usage_and_a_round_over_it_raises_at_once() {
    let config = AllocConfig {
        hold_peak: [0, 12, 0, 0],
        ..AllocConfig::default()
    };
    let new = || {
        Engine::new(
            config,
            vec![component("svc", 3.0, false)],
            [None; 4],
            vec![[100.0, 100.0, 1.0, 1.0]],
        )
        .unwrap()
    };
    // The forecast asks 20 of each; memory used 80 in the first round, 10 after.
    let asks = [Resource::Cpu, Resource::Mem].map(|resource| Request {
        resource,
        ..cpu(0, 20.0)
    });
    let mut e = new();
    let mut lowest_mem = f64::INFINITY;
    let mut cpu_released_at = None;
    for round in 0..12 {
        e.observe(0, [10.0, if round == 0 { 80.0 } else { 10.0 }, 0.0, 0.0]);
        e.round(round, &asks);
        lowest_mem = lowest_mem.min(e.allocation(0)[1]);
        if cpu_released_at.is_none() && e.allocation(0)[0] < 100.0 {
            cpu_released_at = Some(round);
        }
    }
    // CPU, which holds no peak, is released to the request after its window; memory only
    // to the peak of the last 12 rounds.
    assert!(cpu_released_at.is_some(), "CPU was released");
    assert!(
        (80.0..100.0).contains(&lowest_mem),
        "memory held at its peak usage: {lowest_mem}"
    );
    // A restart carries the peak on.
    let mut resumed = new();
    resumed.resume(&e.learned());
    assert_eq!(resumed.learned(), e.learned());
    // Once the peak is older than 12 rounds, memory follows the requests down.
    for round in 12..60 {
        e.observe(0, [10.0; 4]);
        e.round(round, &asks);
    }
    assert!(e.allocation(0)[1] < 40.0, "{:?}", e.allocation(0));
    // A round over the allocation raises it the next round, whatever the forecast asks.
    e.observe(0, [10.0, 90.0, 0.0, 0.0]);
    let d = e.round(60, &asks);
    let raise = d
        .iter()
        .find(|d| d.resource == Resource::Mem && d.action == Action::Raise)
        .unwrap_or_else(|| panic!("{d:?}"));
    assert!(raise.to >= 90.0, "{raise:?}");
    assert!(
        raise
            .reason
            .starts_with("usage peaked at 90.0 in the last 12 rounds"),
        "{}",
        raise.reason
    );
}
