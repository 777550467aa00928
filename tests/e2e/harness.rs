//! Starting, stopping and killing a real `forestall serve`.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{self, Receiver};
use std::time::{Duration, Instant};

use forestall_engine::{EngineConfig, ScanRequest, Store};

/// A running server.
pub struct Server {
    pub child: Child,
    pub addr: String,
    /// `host:port` of the PostgreSQL protocol.
    pub pg_addr: String,
    pub stderr: Receiver<String>,
}

/// `forestall serve` on `data_dir` with `args`, on free loopback ports unless `args` name
/// addresses, with the collector off.
pub fn serve_command(data_dir: &Path, args: &[&str]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_forestall"));
    cmd.arg("serve");
    for flag in ["--http-addr", "--pg-addr"] {
        if !args.contains(&flag) {
            cmd.args([flag, "127.0.0.1:0"]);
        }
    }
    cmd.args(args).arg("--data-dir").arg(data_dir);
    cmd
}

impl Server {
    /// Starts `forestall serve` on a free port with `data_dir` and extra environment.
    pub fn start(data_dir: &Path, env: &[(&str, &str)]) -> Server {
        Self::start_with(data_dir, env, &[])
    }

    /// [`Server::start`] with more `serve` arguments (`--auth`; an `--http-addr` or
    /// `--pg-addr` of their own replaces the free loopback port).
    pub fn start_with(data_dir: &Path, env: &[(&str, &str)], args: &[&str]) -> Server {
        let mut cmd = serve_command(data_dir, args);
        cmd.env("RUST_LOG", "info")
            // The host collector would write `cpu`, `mem`, … into every test's store; the tests
            // that want it turn it back on.
            .env("FORESTALL__COLLECTOR__ENABLED", "false")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("start forestall");
        let stdout = child.stdout.take().unwrap();
        let stderr = child.stderr.take().unwrap();
        let (addr_tx, addr_rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Some(addr) = line.strip_prefix("forestall listening on ") {
                    let _ = addr_tx.send(addr.to_string());
                }
            }
        });
        let (err_tx, err_rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if err_tx.send(line).is_err() {
                    break;
                }
            }
        });
        // The Postgres line comes first, then the HTTP one once everything is up.
        let (mut addr, mut pg_addr) = (None, String::new());
        while addr.is_none() {
            match addr_rx.recv_timeout(Duration::from_secs(60)) {
                Ok(a) => {
                    if let Some(a) = a.strip_prefix("http://").or(a.strip_prefix("https://")) {
                        addr = Some(a.to_string());
                    } else if let Some(a) = a.strip_prefix("postgres://") {
                        pg_addr = a.to_string();
                    }
                }
                Err(_) => {
                    let _ = child.kill();
                    let log: Vec<String> = err_rx.try_iter().collect();
                    panic!("forestall did not start:\n{}", log.join("\n"));
                }
            }
        }
        Server {
            child,
            addr: addr.unwrap_or_default(),
            pg_addr,
            stderr: err_rx,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    /// Waits (bounded) for a stderr line containing `needle`; returns every line seen.
    pub fn wait_for_log(&self, needle: &str, timeout: Duration) -> Vec<String> {
        let deadline = Instant::now() + timeout;
        let mut seen = Vec::new();
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            match self.stderr.recv_timeout(left) {
                Ok(line) => {
                    let hit = line.contains(needle);
                    seen.push(line);
                    if hit {
                        return seen;
                    }
                }
                Err(_) => break,
            }
        }
        panic!(
            "no log line with {needle:?} within {timeout:?}; saw:\n{}",
            seen.join("\n")
        );
    }

    /// SIGKILL: no shutdown code runs.
    pub fn kill(mut self) {
        self.child.kill().expect("kill");
        self.child.wait().expect("wait");
    }

    /// SIGTERM, then waits for a clean exit.
    pub fn terminate(mut self) -> std::process::ExitStatus {
        let rc = unsafe_kill(self.child.id(), libc::SIGTERM);
        assert_eq!(rc, 0, "send SIGTERM");
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                if !status.success() {
                    // Give the reader thread a moment to collect the last lines.
                    std::thread::sleep(Duration::from_millis(100));
                    let log: Vec<String> = self.stderr.try_iter().collect();
                    eprintln!(
                        "forestall exited with {status}; its log:\n{}",
                        log.join("\n")
                    );
                }
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "forestall did not exit after SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[allow(unsafe_code)]
fn unsafe_kill(pid: u32, sig: i32) -> i32 {
    // SAFETY: kill(2) takes plain integers and touches no memory of ours.
    unsafe { libc::kill(pid as i32, sig) }
}

/// POSTs a body; returns the status (0 when the server could not be reached).
pub fn post(url: &str, body: &[u8]) -> (u16, String) {
    match ureq::post(url)
        .timeout(Duration::from_secs(30))
        .send_bytes(body)
    {
        Ok(r) => {
            let status = r.status();
            (status, r.into_string().unwrap_or_default())
        }
        Err(ureq::Error::Status(code, r)) => (code, r.into_string().unwrap_or_default()),
        Err(_) => (0, String::new()),
    }
}

/// Opens the data directory in-process (the server must be stopped) and returns every row of
/// `measurement` as (series tag value, time).
pub fn read_back(
    data_dir: &Path,
    measurement: &str,
    tag: &str,
    field: &str,
) -> Vec<(String, i64, i64)> {
    use arrow::array::{Array, ArrayAccessor, AsArray};
    use arrow::datatypes::{Int32Type, Int64Type, TimestampNanosecondType};
    let config = EngineConfig {
        data_dir: data_dir.to_path_buf(),
        ..Default::default()
    };
    let store = Store::open(config).expect("reopen the data directory");
    let mut out = Vec::new();
    for batch in store.scan(&ScanRequest::all(measurement)).expect("scan") {
        let batch = batch.expect("batch");
        let times = batch
            .column_by_name("time")
            .unwrap()
            .as_primitive::<TimestampNanosecondType>();
        let tags = batch
            .column_by_name(tag)
            .unwrap()
            .as_dictionary::<Int32Type>()
            .downcast_dict::<arrow::array::StringArray>()
            .unwrap();
        let values = batch
            .column_by_name(field)
            .unwrap()
            .as_primitive::<Int64Type>();
        for i in 0..batch.num_rows() {
            assert!(values.is_valid(i));
            out.push((tags.value(i).to_string(), times.value(i), values.value(i)));
        }
    }
    out
}

/// Waits (bounded) until `f` holds, checking every 200 ms.
pub fn eventually(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !f() {
        assert!(Instant::now() < deadline, "not within {timeout:?}: {what}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// A response's status and JSON body (every answer of the API is JSON, errors too).
pub fn answer(url: &str, resp: Result<ureq::Response, ureq::Error>) -> (u16, serde_json::Value) {
    let (status, r) = match resp {
        Ok(r) => (r.status(), r),
        Err(ureq::Error::Status(code, r)) => (code, r),
        Err(e) => panic!("{url}: {e}"),
    };
    let text = r.into_string().unwrap();
    let json = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{url}: {e}: {text}"));
    (status, json)
}

pub fn get_json(url: &str) -> (u16, serde_json::Value) {
    answer(url, ureq::get(url).timeout(Duration::from_secs(30)).call())
}

pub fn put(url: &str, body: &[u8]) -> (u16, serde_json::Value) {
    answer(
        url,
        ureq::put(url)
            .timeout(Duration::from_secs(30))
            .send_bytes(body),
    )
}

pub fn sql(server: &Server, q: &str) -> Vec<serde_json::Value> {
    let (status, body) = post(
        &server.url("/api/v3/query_sql?format=json"),
        format!(r#"{{"q": {}}}"#, serde_json::to_string(q).unwrap()).as_bytes(),
    );
    assert_eq!(status, 200, "{q}: {body}");
    serde_json::from_str(&body).unwrap()
}

/// GETs a text body; returns the status and the text.
pub fn get_text(url: &str) -> (u16, String) {
    match ureq::get(url).timeout(Duration::from_secs(30)).call() {
        Ok(r) => (r.status(), r.into_string().unwrap_or_default()),
        Err(ureq::Error::Status(code, r)) => (code, r.into_string().unwrap_or_default()),
        Err(e) => panic!("{url}: {e}"),
    }
}

/// DELETE; returns the status.
pub fn delete(url: &str) -> u16 {
    match ureq::delete(url).timeout(Duration::from_secs(30)).call() {
        Ok(r) => r.status(),
        Err(ureq::Error::Status(code, _)) => code,
        Err(e) => panic!("{url}: {e}"),
    }
}

/// Runs `psql -c sql`; returns (success, stdout, stderr).
pub fn psql(server: &Server, sql: &str) -> (bool, String, String) {
    psql_as(server, None, sql)
}

/// [`psql`] with a password (`PGPASSWORD`); it never prompts for one.
pub fn psql_as(server: &Server, password: Option<&str>, sql: &str) -> (bool, String, String) {
    let (host, port) = server.pg_addr.rsplit_once(':').unwrap();
    let mut cmd = Command::new("psql");
    if let Some(p) = password {
        cmd.env("PGPASSWORD", p);
    }
    let out = cmd
        .args([
            "-h",
            host,
            "-p",
            port,
            "-U",
            "grafana",
            "-d",
            "forestall",
            "-w",
        ])
        .args([
            "-X",
            "-A",
            "-t",
            "-F",
            ",",
            "-v",
            "VERBOSITY=verbose",
            "-c",
            sql,
        ])
        .env("PGCONNECT_TIMEOUT", "10")
        .output()
        .expect("run psql (scripts/setup.sh installs it)");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Removes a cgroup directory once the kernel lets it go (only when its last process is
/// gone), then its parent if that is empty.
pub fn remove_cgroup(dir: &Path) {
    for _ in 0..50 {
        if std::fs::remove_dir(dir).is_ok() || !dir.exists() {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    if let Some(parent) = dir.parent() {
        let _ = std::fs::remove_dir(parent);
    }
}

/// Runs a Python `script` with `args` and asserts it printed `ok` (a client library's
/// test; `needs` names what scripts/setup.sh installs for it).
pub fn python_ok(script: &str, args: &[&str], needs: &str) {
    let out = Command::new("python3")
        .arg("-c")
        .arg(script)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("run python3 (scripts/setup.sh installs {needs}): {e}"));
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(
        out.status.success() && stdout.trim() == "ok",
        "{stdout}\n{stderr}"
    );
}
