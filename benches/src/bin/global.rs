//! The cost of one round of the global LSTM for a fleet: every series' row pushed, the
//! round's training budget, and every series forecast in batched passes.
//!
//! ```text
//! cargo run -p forestall-benches --bin global -- --data ../shared/data/forecast-dev --series 1000
//! ```
//!
//! The fleet is the folder's series tiled up to `--series`: copy k of a file starts k × 37
//! rows later and is scaled by 1 + k/10, so no two series are alike. Every series is first
//! given `--warm` rows (no training), then each timed round gives every series one row. Tensor
//! math runs on one thread (as `forestall` runs it), so wall time is CPU time on a quiet
//! machine. Runs with `forestall`'s allocator (mimalloc). Reports the median and 99th
//! percentile of each part of a round.
//!
//! With `--query`, what SQL's `forecast()` pays for the shipped network instead: the first
//! `--series` series of the folder replayed through their own models, then the same with
//! the frozen network scored on their last rows (`global::replay`), each timed over
//! `--rounds` repetitions (the fastest kept; the read from the store is the same in both).
//! Run it with `--release`: in the dev profile Forestall's own models are unoptimised and
//! the ratio means nothing.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Result;
use clap::Parser;
use forestall_models::global::{GlobalConfig, GlobalLstm, kind_of};
use forestall_models::nab;

#[derive(Debug, Parser)]
struct Args {
    /// A NAB-layout folder of series (data/<kind>/<file>.csv).
    #[arg(long)]
    data: PathBuf,
    /// Series in the fleet.
    #[arg(long, default_value_t = 1000)]
    series: usize,
    /// Rows each series is given before timing.
    #[arg(long, default_value_t = 400)]
    warm: usize,
    /// Rounds timed.
    #[arg(long, default_value_t = 100)]
    rounds: usize,
    /// Adam steps per round.
    #[arg(long, default_value_t = 1)]
    steps: usize,
    /// Time a query's model work with and without the shipped network instead.
    #[arg(long)]
    query: bool,
}

/// The allocator `forestall` runs with: candle allocates a tensor per operation, and the
/// system allocator maps and unmaps each large one.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn percentiles(mut ms: Vec<f64>) -> (f64, f64) {
    ms.sort_by(f64::total_cmp);
    let at = |q: f64| ms[((ms.len() - 1) as f64 * q) as usize];
    (at(0.5), at(0.99))
}

#[allow(unsafe_code)]
fn main() -> Result<()> {
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        // SAFETY: first thing in `main`, before any thread exists.
        unsafe { std::env::set_var("RAYON_NUM_THREADS", "1") };
    }
    let args = Args::parse();
    let files = nab::load_corpus(&args.data)?;
    anyhow::ensure!(!files.is_empty(), "no series under {}", args.data.display());
    if args.query {
        return query(&files, &args);
    }
    let mut model = GlobalLstm::new(GlobalConfig {
        steps_per_round: args.steps,
        ..GlobalConfig::default()
    })?;
    let fleet: Vec<_> = (0..args.series)
        .map(|i| {
            let f = &files[i % files.len()];
            let copy = i / files.len();
            let id = model.add_series(kind_of(nab::category(&f.name)));
            (id, f, copy * 37, 1.0 + copy as f64 / 10.0)
        })
        .collect();
    let row = |f: &nab::NabFile, offset: usize, scale: f64, r: usize| {
        let i = (offset + r) % f.values.len();
        (r as f64 * 300.0, f.values[i] * scale)
    };
    let period = Some(288);
    for r in 0..args.warm {
        for &(id, f, offset, scale) in &fleet {
            let (t, v) = row(f, offset, scale, r);
            model.push(id, t, v, period)?;
        }
    }
    let (mut push, mut train, mut infer) = (Vec::new(), Vec::new(), Vec::new());
    for r in args.warm..args.warm + args.rounds {
        let started = Instant::now();
        for &(id, f, offset, scale) in &fleet {
            let (t, v) = row(f, offset, scale, r);
            model.push(id, t, v, period)?;
        }
        push.push(started.elapsed().as_secs_f64() * 1e3);
        let started = Instant::now();
        model.train()?;
        train.push(started.elapsed().as_secs_f64() * 1e3);
        let started = Instant::now();
        let paths = model.forecast()?;
        infer.push(started.elapsed().as_secs_f64() * 1e3);
        std::hint::black_box(paths);
    }
    let total: Vec<f64> = (0..args.rounds)
        .map(|i| push[i] + train[i] + infer[i])
        .collect();
    println!(
        "global LSTM round, {} series, {} Adam step(s) of {} windows, {} rounds after {} warm rows",
        args.series,
        args.steps,
        GlobalConfig::default().batch,
        args.rounds,
        args.warm
    );
    for (name, ms) in [
        ("push", push),
        ("train", train),
        ("forecast", infer),
        ("round", total),
    ] {
        let (p50, p99) = percentiles(ms);
        println!(
            "{name:<9} p50 {p50:>8.2} ms  p99 {p99:>8.2} ms  ({:.1} us a series at p50)",
            1e3 * p50 / args.series as f64
        );
    }
    Ok(())
}

/// `--query`: one query's model work over the first `--series` files, as `forecast()` does it
/// with and without the shipped network.
fn query(files: &[nab::NabFile], args: &Args) -> Result<()> {
    use forestall_models::forecast::{AutoForecaster, ForecastConfig};
    use forestall_models::global::{Replay, SCORED_ROWS, replay};
    let files = &files[..args.series.min(files.len())];
    let times: Vec<Vec<f64>> = files.iter().map(nab::NabFile::times).collect();
    let config = ForecastConfig::default();
    let (mut own, mut with) = (f64::INFINITY, f64::INFINITY);
    for _ in 0..args.rounds.max(1) {
        let started = Instant::now();
        for f in files {
            let mut a = AutoForecaster::new(config)?;
            for &v in &f.values {
                a.update(v);
            }
            std::hint::black_box(a.forecast(12, 0.9));
        }
        own = own.min(started.elapsed().as_secs_f64());
        let started = Instant::now();
        let mut model = GlobalLstm::pretrained()?;
        let series: Vec<Replay<'_>> = files
            .iter()
            .zip(&times)
            .map(|(f, times)| Replay {
                values: &f.values,
                times,
                kind: kind_of(nab::category(&f.name)),
            })
            .collect();
        let forecasters = replay(&mut model, &series, config, SCORED_ROWS)?;
        std::hint::black_box(forecasters[0].forecast(12, 0.9));
        with = with.min(started.elapsed().as_secs_f64());
    }
    println!(
        "a query's model work, {} series: own models {:.1} ms, with the shipped network {:.1} ms ({:.2}x)",
        files.len(),
        own * 1e3,
        with * 1e3,
        with / own
    );
    Ok(())
}
