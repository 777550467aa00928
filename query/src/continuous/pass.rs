//! Shared passes: one read of a source for every query due over the same rows.
//!
//! A hundred rollups of `cpu` into 1-minute buckets all come due at the same tick, over the
//! same window. Run one by one, each reads and decodes that window of `cpu` (at full-speed
//! ingestion, about 13 M rows a minute here): a hundred reads. Planned first, they are seen
//! to fold the same rows (their scans have the same [`ScanExec::share_key`]: measurement,
//! time range, tag predicate), so they meet in a *pass*: the first to arrive opens it,
//! waits while others join (until none has for [`QUIET`], at most [`GATHER`]), then takes a
//! turn to run (one per core, as any run) and reads the window once, folding each batch into
//! every member's aggregate ([`SharedRead`]). Each member then finishes its own plan (merging
//! its partial states, a row per series and bucket) and writes its own sink. A query whose
//! plan does not fold its scan (a join, a window function, a filter on fields) runs alone.
//!
//! Correctness does not depend on the pass: a member's plan computes what it would alone,
//! from the same rows, and a pass that fails fails each member's run, which backs off and
//! retries as any failed run.

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arrow::record_batch::RecordBatch;
use datafusion::physical_plan::ExecutionPlan;
use forestall_engine::Store;
use tokio::sync::{Semaphore, oneshot};

use crate::provider::{ScanExec, SharedRead};
use crate::{Error, Planned, QueryEngine, Result};

/// A pass closes once no query has joined it for this long...
const QUIET: Duration = Duration::from_millis(20);
/// ...or this long after it opened, whichever comes first.
const GATHER: Duration = Duration::from_secs(1);

/// The passes open for joining, by share key, and the turns runs take.
#[derive(Debug)]
pub(super) struct Passes {
    open: Mutex<HashMap<String, Arc<Mutex<Vec<Member>>>>>,
    /// Runs under way at once, at most one per core: queries due at the same tick take turns
    /// instead of each copying the live buffer and competing for the CPU together. A pass
    /// takes one turn for all its members.
    runs: Semaphore,
}

#[derive(Debug)]
struct Member {
    scan: Arc<dyn ExecutionPlan>,
    done: oneshot::Sender<std::result::Result<(), String>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Passes {
    pub(super) fn new(turns: usize) -> Self {
        Self {
            open: Mutex::new(HashMap::new()),
            runs: Semaphore::new(turns.max(1)),
        }
    }

    /// Runs a planned statement of a continuous query and collects its rows: in a pass with
    /// the others reading the same rows when its scan folds, alone otherwise.
    pub(super) async fn run(
        self: &Arc<Self>,
        engine: &QueryEngine,
        store: &Arc<Store>,
        planned: Planned,
    ) -> Result<Vec<RecordBatch>> {
        let Planned { plan, context, .. } = planned;
        // Alone, the run takes its turn for the whole execution; in a pass, the pass took one
        // for the read, and what is left (merging partial states) is small.
        let _turn = match shared_scan(&plan) {
            Some((key, scan)) => {
                let passes = Arc::clone(self);
                let store = Arc::clone(store);
                // On the query runtime, as a task of its own: a pass's reader must finish
                // for its members even if the run that opened it is dropped.
                engine
                    .run(async move { passes.join(key, scan, store).await })
                    .await??;
                None
            }
            None => Some(
                self.runs
                    .acquire()
                    .await
                    .map_err(|_| Error::Execution("continuous queries are stopping".into()))?,
            ),
        };
        engine
            .run(async move { datafusion::physical_plan::collect(plan, context).await })
            .await?
            .map_err(Error::from)
    }

    /// Joins (or opens and reads) the pass for `key`; returns once `scan` holds its output.
    async fn join(
        &self,
        key: String,
        scan: Arc<dyn ExecutionPlan>,
        store: Arc<Store>,
    ) -> Result<()> {
        let (done, finished) = oneshot::channel();
        let opened = match lock(&self.open).entry(key.clone()) {
            Entry::Occupied(e) => {
                lock(e.get()).push(Member { scan, done });
                None
            }
            Entry::Vacant(e) => {
                let pass = Arc::new(Mutex::new(vec![Member { scan, done }]));
                e.insert(Arc::clone(&pass));
                Some(pass)
            }
        };
        if let Some(pass) = opened {
            self.lead(&key, &pass, store).await;
        }
        finished
            .await
            .map_err(|_| Error::Execution("a shared read was abandoned".into()))?
            .map_err(Error::Execution)
    }

    /// Gathers the pass, reads, and tells every member how it went.
    async fn lead(&self, key: &str, pass: &Arc<Mutex<Vec<Member>>>, store: Arc<Store>) {
        let opened = Instant::now();
        let mut seen = 1;
        loop {
            tokio::time::sleep(QUIET).await;
            let now = lock(pass).len();
            if now == seen || opened.elapsed() >= GATHER {
                break;
            }
            seen = now;
        }
        let turn = self.runs.acquire().await;
        // Closed: later arrivals open the next pass.
        {
            let mut open = lock(&self.open);
            if open.get(key).is_some_and(|p| Arc::ptr_eq(p, pass)) {
                open.remove(key);
            }
        }
        let members = std::mem::take(&mut *lock(pass));
        let result = match turn {
            Ok(_turn) => read(store, members.iter().map(|m| Arc::clone(&m.scan)).collect())
                .await
                .map_err(|e| e.to_string()),
            Err(_) => Err("continuous queries are stopping".into()),
        };
        for m in members {
            let _ = m.done.send(result.clone());
        }
    }
}

/// One read for `scans`, each partition on a blocking thread of the current runtime.
async fn read(store: Arc<Store>, scans: Vec<Arc<dyn ExecutionPlan>>) -> Result<()> {
    let mut shared = SharedRead::new(&store, scans)?;
    let jobs: Vec<_> = (0..shared.partitions())
        .map(|p| tokio::task::spawn_blocking(shared.read(p)))
        .collect();
    let mut folded = Vec::with_capacity(jobs.len());
    for job in jobs {
        folded.push(
            job.await
                .map_err(|e| Error::Execution(format!("a shared read failed: {e}")))??,
        );
    }
    shared.deliver(folded);
    Ok(())
}

/// The plan's only scan and its share key, when the scan folds and can be shared.
fn shared_scan(plan: &Arc<dyn ExecutionPlan>) -> Option<(String, Arc<dyn ExecutionPlan>)> {
    let mut scans = Vec::new();
    let mut stack = vec![Arc::clone(plan)];
    while let Some(node) = stack.pop() {
        if node.is::<ScanExec>() {
            scans.push(Arc::clone(&node));
        }
        stack.extend(node.children().into_iter().cloned());
    }
    match scans.as_slice() {
        [scan] => {
            let key = scan.downcast_ref::<ScanExec>()?.share_key()?;
            Some((key, Arc::clone(scan)))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering;

    use arrow::util::pretty::pretty_format_batches;
    use forestall_engine::{EngineConfig, Precision};

    use super::*;

    const S: i64 = 1_000_000_000;

    /// Queries due together over the same rows read them once between them, and each gets
    /// what it gets alone; a query over other rows, or one whose scan does not fold, reads on
    /// its own.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn queries_over_the_same_rows_share_one_read_and_answer_as_alone() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(
            Store::open(EngineConfig {
                data_dir: dir.path().to_path_buf(),
                ..Default::default()
            })
            .unwrap(),
        );
        // Twenty minutes of four hosts every 10 s: the first half flushed to a segment, the
        // rest in the buffer, so the read merges both.
        let start = 1_700_000_000 * S / (60 * S) * (60 * S);
        let mut body = String::new();
        for i in 0..120 {
            for h in 0..4 {
                let t = start + i * 10 * S;
                body.push_str(&format!(
                    "cpu,host=h{h},dc=d{} usage={}.5,n={i}i {t}\n",
                    h % 2,
                    i * 3 + h
                ));
            }
            if i == 59 {
                let o = store
                    .write(body.as_bytes(), Precision::Nanoseconds, start)
                    .unwrap();
                assert_eq!(o.rejected_lines, 0);
                store.flush().unwrap();
                body.clear();
            }
        }
        store
            .write(body.as_bytes(), Precision::Nanoseconds, start)
            .unwrap();
        let engine = QueryEngine::new(Arc::clone(&store));
        let window = |lo: i64, hi: i64| {
            format!(
                "time >= to_timestamp_nanos({}) AND time < to_timestamp_nanos({})",
                start + lo * 60 * S,
                start + hi * 60 * S
            )
        };
        let w = window(2, 17);
        let statements = [
            // Three rollups of the same window: other aggregates, other fields, other tags.
            format!(
                "SELECT date_bin(INTERVAL '1 minute', time) AS time, host, avg(usage) AS usage FROM cpu WHERE {w} GROUP BY 1, host ORDER BY 1, host"
            ),
            format!(
                "SELECT date_bin(INTERVAL '1 minute', time) AS time, dc, max(n) AS n, count(*) AS points FROM cpu WHERE {w} GROUP BY 1, dc ORDER BY 1, dc"
            ),
            format!(
                "SELECT date_bin(INTERVAL '5 minutes', time) AS time, min(usage) AS lo, sum(usage) AS total FROM cpu WHERE {w} GROUP BY 1 ORDER BY 1"
            ),
            // Two more by host and minute, folded with the first: aggregates it has (the
            // sum and count of its average), others, and the groups in another order.
            format!(
                "SELECT date_bin(INTERVAL '1 minute', time) AS time, host, max(usage) AS hi, count(usage) AS c, sum(usage) AS s, avg(n) AS n FROM cpu WHERE {w} GROUP BY 1, host ORDER BY 1, host"
            ),
            format!(
                "SELECT host, max(n) AS n FROM cpu WHERE {w} GROUP BY host, date_bin(INTERVAL '1 minute', time) ORDER BY host, n"
            ),
            // A filter on a field: the scan does not fold, so it reads alone.
            format!(
                "SELECT host, count(*) AS busy FROM cpu WHERE {w} AND usage > 100 GROUP BY host ORDER BY host"
            ),
            // Another window: another read.
            format!(
                "SELECT date_bin(INTERVAL '1 minute', time) AS time, host, avg(usage) AS usage FROM cpu WHERE {} GROUP BY 1, host ORDER BY 1, host",
                window(0, 5)
            ),
        ];
        let mut alone = Vec::new();
        for sql in &statements {
            let (_, batches) = engine.sql(sql).await.unwrap();
            alone.push(pretty_format_batches(&batches).unwrap().to_string());
        }
        let mut planned = Vec::new();
        for sql in &statements {
            planned.push(engine.plan(sql).await.unwrap());
        }
        let folding = planned
            .iter()
            .filter(|p| shared_scan(&p.plan).is_some())
            .count();
        assert_eq!(
            folding, 6,
            "the rollups fold their scans, the filtered query does not"
        );

        let passes = Arc::new(Passes::new(2));
        let scans = || store.metrics().scans_total.load(Ordering::Relaxed);
        let before = scans();
        let runs = planned.into_iter().map(|p| passes.run(&engine, &store, p));
        let together = futures::future::join_all(runs).await;
        assert_eq!(
            scans() - before,
            3,
            "one shared read, the filtered query, the other window"
        );
        for ((sql, alone), together) in statements.iter().zip(&alone).zip(together) {
            let together = pretty_format_batches(&together.unwrap())
                .unwrap()
                .to_string();
            assert_eq!(&together, alone, "{sql}");
            assert!(together.lines().count() > 4, "{sql} gave rows:\n{together}");
        }
        assert!(lock(&passes.open).is_empty(), "every pass closed");
    }
}
