//! One allocation round for 1,000 components (4 resources each, 4,000 requests) in a pool
//! that is short, so preemption and deferral run too; then the live loop's whole round for
//! the same 1,000 components (forecasting 4,000 series, sizing, the engine, applying to a
//! recorder).
//!
//! ```text
//! cargo run --release -p forestall-benches --bin alloc
//! ```

use std::time::Instant;

use std::time::Duration;

use forestall_actuators::alloc::{AllocConfig, Component, Engine, Preferences, Request, Resource};
use forestall_actuators::stack::Units;
use forestall_actuators::{DryRun, Target};
use forestall_control::round::{self as control, Controller, Timing};

/// `n` components in four tiers: critical, two standard, deferrable batch.
fn components(n: usize) -> Vec<Component> {
    (0..n)
        .map(|i| Component {
            name: format!("c{i}"),
            weight: [10.0, 3.0, 3.0, 1.0][i % 4],
            deferrable: i % 4 == 3,
            preferences: Preferences::default(),
        })
        .collect()
}

/// A seeded uniform [0, 1) generator (a 64-bit LCG's high bits).
fn uniform(mut seed: u64) -> impl FnMut() -> f64 {
    move || {
        seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (seed >> 11) as f64 / (1u64 << 53) as f64
    }
}

fn main() -> anyhow::Result<()> {
    let n = 1000;
    let components = components(n);
    // The pool holds 90% of what the components ask for on average.
    let capacity = [Some(0.9 * 100.0 * n as f64); 4];
    let mut engine = Engine::new(
        AllocConfig::default(),
        components,
        capacity,
        vec![[50.0; 4]; n],
    )?;
    let mut rand = uniform(1);
    let mut times = Vec::new();
    for round in 0..300u64 {
        let requests: Vec<Request> = (0..n)
            .flat_map(|c| Resource::ALL.map(|r| (c, r)))
            .map(|(c, r)| {
                let amount = 100.0 * (0.5 + rand());
                Request {
                    component: c,
                    resource: r,
                    amount,
                    need: amount * (0.6 + 0.3 * rand()),
                    risk: rand(),
                    observed: 0.0,
                }
            })
            .collect();
        for c in 0..n {
            engine.observe(c, [80.0 * (0.5 + rand()); 4]);
        }
        let t = Instant::now();
        let d = engine.round(round, &requests);
        times.push(t.elapsed().as_secs_f64() * 1000.0);
        std::hint::black_box(d);
    }
    times.sort_by(f64::total_cmp);
    println!(
        "allocation round, {n} components × 4 resources, short pool: median {:.2} ms, p99 {:.2} ms ({} audit records)",
        times[times.len() / 2],
        times[times.len() * 99 / 100],
        engine.audit().count()
    );
    drop(engine);
    live_round(n)
}

/// This process's resident memory in MiB (`VmRSS`), if `/proc` says.
fn rss_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let kib: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kib / 1024.0)
}

/// The live loop's round (`Controller`: observe, forecast, size, engine, apply) at 5-minute
/// rounds with a one-hour horizon, after a day of history, on daily-cycle usage with noise.
fn live_round(n: usize) -> anyhow::Result<()> {
    let before = rss_mib();
    let timing = Timing::measured(Duration::from_secs(300));
    let engine = Engine::new(
        control::tuned(0.8, [1.0; 4], &timing),
        components(n),
        [Some(0.9 * 100.0 * n as f64); 4],
        vec![[50.0; 4]; n],
    )?;
    let targets = (0..n)
        .map(|i| Target::new(format!("c{i}"), format!("forestall/c{i}")))
        .collect::<Result<_, _>>()?;
    let units = Units {
        disk_device: Some((8, 0)),
        ..Units::native(0.8)
    };
    let mut controller = Controller::new(
        engine,
        targets,
        Box::new(DryRun::default()),
        units,
        timing.forecast(),
    )?;
    let mut rand = uniform(7);
    let mut times = Vec::new();
    for round in 0..2 * 288u64 {
        let phase = (round % 288) as f64 / 288.0 * std::f64::consts::TAU;
        let usage: Vec<[f64; 4]> = (0..n)
            .map(|c| {
                let base = 40.0 + 20.0 * (phase + c as f64).sin();
                [0; 4].map(|_| base * (0.9 + 0.2 * rand()))
            })
            .collect();
        let t = Instant::now();
        controller.observe(&usage);
        let report = controller.round(round);
        if round >= 288 {
            times.push(t.elapsed().as_secs_f64() * 1000.0);
        }
        std::hint::black_box(report);
    }
    times.sort_by(f64::total_cmp);
    println!(
        "live round (observe, forecast 12 steps, size, engine, apply), {n} components × 4 resources, after a day: median {:.1} ms, p99 {:.1} ms",
        times[times.len() / 2],
        times[times.len() * 99 / 100],
    );
    if let (Some(before), Some(after)) = (before, rss_mib()) {
        println!(
            "live loop memory for {n} components × 4 resources: {:.0} MiB ({:.0} KiB per forecast series)",
            after - before,
            (after - before) * 1024.0 / (4 * n) as f64
        );
    }
    std::hint::black_box(&controller);
    Ok(())
}
