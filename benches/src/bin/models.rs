//! Latency of the models on the hot path: one series' forecast once its forecaster is warm,
//! one value's update, and one component's risk inference (score plus reasons).
//!
//! ```text
//! cargo run --release -p forestall-benches --bin models -- --data ../shared/data/nab-dev
//! ```
//!
//! Forecasters are warmed on every NAB file (each is one series); the risk model is the
//! two-metric component of `forestall-models`' risk tests, trained on 5,000 rows of history.
//! Each figure is the median and 99th percentile over many calls.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Result;
use clap::Parser;
use forestall_models::forecast::{AutoForecaster, ForecastConfig};
use forestall_models::lstm::{LstmConfig, LstmForecaster};
use forestall_models::nab;
use forestall_models::risk::{
    MetricSpec, Observation, RiskConfig, RiskModel, observe_metric, training_rows,
};

#[derive(Debug, Parser)]
struct Args {
    /// A NAB-layout folder whose files warm the forecasters.
    #[arg(long)]
    data: PathBuf,
    /// Calls timed per measurement.
    #[arg(long, default_value_t = 2000)]
    calls: usize,
}

fn percentiles(mut ns: Vec<u128>) -> (f64, f64) {
    ns.sort_unstable();
    let at = |q: f64| ns[((ns.len() - 1) as f64 * q) as usize] as f64 / 1000.0;
    (at(0.5), at(0.99))
}

fn main() -> Result<()> {
    let args = Args::parse();
    let files = nab::load_corpus(&args.data)?;
    let (mut forecast_ns, mut update_ns) = (Vec::new(), Vec::new());
    for f in &files {
        let mut fc = AutoForecaster::new(ForecastConfig::default())?;
        let (warm, rest) = f.values.split_at(f.values.len() * 3 / 4);
        for &v in warm {
            fc.update(v);
        }
        for &v in rest.iter().cycle().take(args.calls) {
            let t = Instant::now();
            let p = fc.forecast(12, 0.9);
            forecast_ns.push(t.elapsed().as_nanos());
            std::hint::black_box(p);
            let t = Instant::now();
            fc.update(v);
            update_ns.push(t.elapsed().as_nanos());
        }
    }
    let (p50, p99) = percentiles(forecast_ns);
    println!("forecast, 12 steps with 90% intervals: median {p50:.1} µs, p99 {p99:.1} µs");
    let (p50, p99) = percentiles(update_ns);
    println!(
        "update (one value, 3 models × 12 steps tracked): median {p50:.1} µs, p99 {p99:.1} µs"
    );

    // The LSTM (default config: window 48, hidden 32, horizon 12, a training step every 16
    // rows), warmed on the first 2,000 rows of the first file.
    let values = &files[0].values;
    let mut lstm = LstmForecaster::new(LstmConfig::default())?;
    for &v in &values[..2000] {
        lstm.update(&[v])?;
    }
    let (mut fns, mut uns) = (Vec::new(), Vec::new());
    for &v in values[2000..].iter().cycle().take(args.calls) {
        let t = Instant::now();
        std::hint::black_box(lstm.forecast()?);
        fns.push(t.elapsed().as_nanos());
        let t = Instant::now();
        lstm.update(&[v])?;
        uns.push(t.elapsed().as_nanos());
    }
    let (p50, p99) = percentiles(fns);
    println!("LSTM forecast, 12 steps (window 48, hidden 32): median {p50:.1} µs, p99 {p99:.1} µs");
    let mean_update = uns.iter().sum::<u128>() as f64 / uns.len() as f64 / 1000.0;
    let (p50, p99) = percentiles(uns);
    println!(
        "LSTM update incl. a training step every 16 rows (batch 16): median {p50:.1} µs, p99 {p99:.1} µs, mean {mean_update:.1} µs"
    );

    let specs = vec![
        MetricSpec {
            name: "usage_user".into(),
            resource: "cpu".into(),
            threshold: 90.0,
        },
        MetricSpec {
            name: "mem_used".into(),
            resource: "memory".into(),
            threshold: 90.0,
        },
    ];
    let n = 5000;
    let cpu: Vec<f64> = (0..n)
        .map(|i| {
            let phase = i % 200;
            30.0 + if (120..170).contains(&phase) {
                1.35 * (phase - 120) as f64
            } else {
                0.0
            } + ((i * 7919) % 13) as f64 * 0.2
        })
        .collect();
    let mem: Vec<f64> = (0..n)
        .map(|i| 40.0 + ((i * 104_729) % 7) as f64 * 0.3)
        .collect();
    let series = vec![cpu, mem];
    let config = RiskConfig::default();
    let rows = training_rows(&specs, &series, config, 300)?;
    let started = Instant::now();
    let learned = RiskModel::learn(specs.clone(), config, &rows)?;
    let learn_ms = started.elapsed().as_secs_f64() * 1000.0;
    let mut declared = RiskModel::new(specs, config)?;
    for (o, l) in &rows {
        declared.observe(o, l)?;
    }
    let mut forecasters: Vec<AutoForecaster> = (0..2)
        .map(|_| AutoForecaster::new(ForecastConfig::default()))
        .collect::<Result<_, _>>()?;
    let observations: Vec<Observation> = (0..n)
        .map(|t| Observation {
            metrics: forecasters
                .iter_mut()
                .enumerate()
                .map(|(i, f)| observe_metric(f, series[i][t], config))
                .collect(),
            health: None,
        })
        .skip(300)
        .collect();
    for (name, model) in [("declared", &declared), ("learned", &learned)] {
        let mut ns = Vec::with_capacity(args.calls);
        for obs in observations.iter().cycle().take(args.calls) {
            let t = Instant::now();
            let r = model.risk(obs)?;
            ns.push(t.elapsed().as_nanos());
            std::hint::black_box(r);
        }
        let (p50, p99) = percentiles(ns);
        println!(
            "risk, one component (2 metrics, 2 resources, {name} structure): median {p50:.1} µs, p99 {p99:.1} µs"
        );
    }
    println!(
        "structure learning from {} rows: {learn_ms:.1} ms",
        rows.len()
    );
    Ok(())
}
