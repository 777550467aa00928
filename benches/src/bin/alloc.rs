//! One allocation round for 1,000 components (4 resources each, 4,000 requests) in a pool
//! that is short, so preemption and deferral run too.
//!
//! ```text
//! cargo run --release -p forestall-benches --bin alloc
//! ```

use std::time::Instant;

use forestall_actuators::alloc::{AllocConfig, Component, Engine, Preferences, Request, Resource};

fn main() -> anyhow::Result<()> {
    let n = 1000;
    let components: Vec<Component> = (0..n)
        .map(|i| Component {
            name: format!("c{i}"),
            weight: [10.0, 3.0, 3.0, 1.0][i % 4],
            deferrable: i % 4 == 3,
            preferences: Preferences::default(),
        })
        .collect();
    // The pool holds 90% of what the components ask for on average.
    let capacity = [Some(0.9 * 100.0 * n as f64); 4];
    let mut engine = Engine::new(
        AllocConfig::default(),
        components,
        capacity,
        vec![[50.0; 4]; n],
    )?;
    let mut seed = 1u64;
    let mut rand = move || {
        seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (seed >> 11) as f64 / (1u64 << 53) as f64
    };
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
    Ok(())
}
