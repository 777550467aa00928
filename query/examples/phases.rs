//! Where a query's time goes, in process: session, SQL parse, logical plan, optimisation,
//! physical plan and execution, each a mean over repeated runs.
//!
//! ```sh
//! cargo build --release -p forestall-query --example phases
//! ./target/release/examples/phases DATA_DIR [QUERY] [RUNS]
//! ```
//!
//! DATA_DIR is a store holding TSBS's cpu-only data (a copy of the one `tsbs query` builds;
//! remove `index/LOCK` from the copy). QUERY is one of the names below, all by default.
use std::sync::Arc;
use std::time::Instant;

use datafusion::config::Dialect;
use datafusion::physical_plan::collect;
use forestall_engine::{EngineConfig, Store};
use forestall_query::QueryEngine;

const QUERIES: [(&str, &str); 4] = [
    ("select1", "SELECT 1"),
    (
        "single",
        "SELECT date_bin(INTERVAL '1 minute', time) AS minute, max(usage_user) FROM cpu \
         WHERE hostname = 'host_17' AND time >= '2016-01-01T05:00:00Z' \
         AND time < '2016-01-01T06:00:00Z' GROUP BY 1 ORDER BY 1",
    ),
    (
        "double",
        "SELECT date_bin(INTERVAL '1 hour', time) AS hour, hostname, avg(usage_user) FROM cpu \
         WHERE time >= '2016-01-01T05:00:00Z' AND time < '2016-01-01T17:00:00Z' \
         GROUP BY 1, 2 ORDER BY 1, 2",
    ),
    (
        "highcpu",
        "SELECT * FROM cpu WHERE hostname = 'host_17' AND usage_user > 90 \
         AND time >= '2016-01-01T05:00:00Z' AND time < '2016-01-01T17:00:00Z'",
    ),
];

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let dir = args
        .next()
        .ok_or_else(|| anyhow::anyhow!("usage: phases DATA_DIR [QUERY] [RUNS]"))?;
    let only = args.next();
    let runs: usize = args.next().map_or(Ok(300), |s| s.parse())?;
    let store = Arc::new(Store::open(EngineConfig {
        data_dir: dir.into(),
        ..Default::default()
    })?);
    let engine = QueryEngine::new(store);
    for (name, sql) in QUERIES {
        if only.as_deref().is_some_and(|o| o != name) {
            continue;
        }
        let warm_up = 20;
        let mut spent = [0f64; 6];
        for i in 0..runs + warm_up {
            let mut marks = [Instant::now(); 7];
            let ctx = engine.session();
            marks[1] = Instant::now();
            let state = ctx.state();
            let statement = state.sql_to_statement(sql, &Dialect::Generic)?;
            marks[2] = Instant::now();
            let plan = state.statement_to_plan(statement).await?;
            marks[3] = Instant::now();
            let optimized = state.optimize(&plan)?;
            marks[4] = Instant::now();
            let physical = state
                .query_planner()
                .create_physical_plan(&optimized, &state)
                .await?;
            marks[5] = Instant::now();
            collect(physical, ctx.task_ctx()).await?;
            marks[6] = Instant::now();
            if i >= warm_up {
                for (k, s) in spent.iter_mut().enumerate() {
                    *s += (marks[k + 1] - marks[k]).as_secs_f64() * 1e6 / runs as f64;
                }
            }
        }
        let [session, parse, logical, optimize, physical, execute] = spent;
        println!(
            "{name:8} session {session:6.0} parse {parse:6.0} logical {logical:6.0} \
             optimize {optimize:6.0} physical {physical:6.0} execute {execute:6.0} µs"
        );
    }
    Ok(())
}
