//! The web console in a real headless Chromium (Debian's `chromium` and `chromium-driver`,
//! which `scripts/setup.sh` installs), driven over WebDriver against a real server with real
//! data: the chart draws the series' points, its anomalies and the forecast band; the risk
//! table lists the loop's components; an SQL error is shown to the user. Screenshots of each
//! go to `$CARGO_TARGET_TMPDIR/console/`.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::harness::{Server, post};

/// chromedriver, killed (with its browser) on drop.
struct Driver {
    child: Child,
    url: String,
    session: String,
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = ureq::delete(&format!("{}/session/{}", self.url, self.session)).call();
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Driver {
    fn start() -> Driver {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = Command::new("chromedriver")
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("chromedriver (Debian's chromium-driver; scripts/setup.sh installs it)");
        let url = format!("http://127.0.0.1:{port}");
        let deadline = Instant::now() + Duration::from_secs(30);
        while ureq::get(&format!("{url}/status")).call().is_err() {
            assert!(Instant::now() < deadline, "chromedriver did not start");
            std::thread::sleep(Duration::from_millis(100));
        }
        let caps = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": "/usr/bin/chromium",
                "args": ["--headless=new", "--no-sandbox", "--disable-gpu",
                         "--disable-dev-shm-usage", "--window-size=1280,900"]
            }
        }}});
        let mut d = Driver {
            child,
            url,
            session: String::new(),
        };
        let answer = d.call("POST", "/session", Some(caps));
        d.session = answer["sessionId"].as_str().unwrap().to_string();
        d
    }

    fn call(&self, method: &str, path: &str, body: Option<Value>) -> Value {
        let url = if path == "/session" {
            format!("{}{path}", self.url)
        } else {
            format!("{}/session/{}{path}", self.url, self.session)
        };
        let request = ureq::request(method, &url);
        let response = match body {
            Some(b) => request
                .set("Content-Type", "application/json")
                .send_string(&b.to_string()),
            None => request.call(),
        };
        let v: Value = match response {
            Ok(r) => serde_json::from_reader(r.into_reader()).unwrap(),
            Err(ureq::Error::Status(code, r)) => {
                panic!(
                    "WebDriver {method} {path}: {code} {}",
                    r.into_string().unwrap()
                )
            }
            Err(e) => panic!("WebDriver {method} {path}: {e}"),
        };
        v["value"].clone()
    }

    fn go(&self, url: &str) {
        self.call("POST", "/url", Some(json!({ "url": url })));
    }

    /// Runs `script` (a function body) in the page and returns what it returns.
    fn run(&self, script: &str) -> Value {
        self.call(
            "POST",
            "/execute/sync",
            Some(json!({ "script": script, "args": [] })),
        )
    }

    /// Waits until `script` returns something truthy, and returns it.
    fn until(&self, what: &str, script: &str) -> Value {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let v = self.run(script);
            if !(v.is_null() || v == false || v == 0 || v == "") {
                return v;
            }
            assert!(
                Instant::now() < deadline,
                "{what}; the page shows: {}",
                self.run("return document.body.innerText")
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Types `query` into the SQL box and submits it.
    fn submit_sql(&self, query: &str) {
        let script = format!(
            "document.querySelector('#sql-text').value = {}; \
             document.querySelector('#sql-form').requestSubmit()",
            serde_json::to_string(query).unwrap()
        );
        self.run(&script);
    }

    fn screenshot(&self, name: &str) {
        use base64::Engine as _;
        let png = self.call("GET", "/screenshot", None);
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(png.as_str().unwrap())
            .unwrap();
        let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("console");
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(format!("{name}.png"));
        std::fs::write(&path, bytes).unwrap();
        eprintln!("screenshot: {}", path.display());
    }
}

#[test]
fn the_console_charts_a_series_with_its_band_lists_risks_and_shows_sql_errors() {
    let dir = tempfile::tempdir().unwrap();
    // The loop in dry-run over a component, so that the risk table has a row.
    let server = Server::start(
        dir.path(),
        &[
            ("FORESTALL__ALLOCATION__ENABLED", "true"),
            ("FORESTALL__ALLOCATION__ACTUATE", "false"),
            ("FORESTALL__ALLOCATION__INTERVAL", "1s"),
            (
                "FORESTALL__ALLOCATION__COMPONENTS",
                r#"[{ name = "checkout", cgroup = "forestall-console-e2e" }]"#,
            ),
        ],
    );
    // Two hours of a daily-looking series every 10 s, with one spike, up to now.
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let mut lines = String::new();
    for k in 0..720i64 {
        let t = now - 7200 + k * 10;
        let v = 50.0 + 10.0 * ((k as f64) / 60.0).sin() + if k == 600 { 45.0 } else { 0.0 };
        lines.push_str(&format!("cpu,host=web-1 usage_user={v} {t}\n"));
        lines.push_str(&format!("cpu,host=web-2 usage_user={} {t}\n", v / 2.0));
    }
    let (status, body) = post(&server.url("/api/v2/write?precision=s"), lines.as_bytes());
    assert_eq!(status, 204, "{body}");

    let d = Driver::start();
    d.go(&server.url("/"));
    // The first measurement and series are drawn: points, the anomaly and the band.
    let points = d.until(
        "the chart draws the series",
        "return window.__consoleRendered && document.querySelectorAll('#chart circle.point').length",
    );
    // The default range is the last hour: 360 points every 10 s.
    assert!(points.as_u64().unwrap() >= 350, "{points}");
    d.until(
        "the forecast band is drawn ahead of the series",
        "return document.querySelector('#chart path.band')",
    );
    let anomalies = d.run("return document.querySelectorAll('#chart circle.anomaly').length");
    assert!(
        anomalies.as_u64().unwrap() >= 1,
        "the spike is marked: {anomalies}"
    );
    let legend = d.run("return document.querySelector('#legend').textContent");
    assert!(
        legend.as_str().unwrap().contains("forecast 12 steps"),
        "{legend}"
    );
    let series =
        d.run("return [...document.querySelectorAll('#series option')].map(o => o.textContent)");
    assert_eq!(series, json!(["host=web-1", "host=web-2"]));
    d.screenshot("explore");

    // Risks: the loop's component is listed.
    d.run("document.querySelector('button[data-tab=risks]').click()");
    let risks = d.until(
        "the risk table lists the components",
        "return document.querySelector('#risks tbody').innerText",
    );
    assert!(risks.as_str().unwrap().contains("checkout"), "{risks}");
    d.screenshot("risks");

    // SQL: a bad query's error is shown to the user, and a good one's rows.
    d.run("document.querySelector('button[data-tab=sql]').click()");
    d.submit_sql("SELECT no_such_column FROM cpu");
    let error = d.until(
        "the SQL error is shown",
        "const e = document.querySelector('#sql-error'); return !e.hidden && e.textContent",
    );
    assert!(
        error.as_str().unwrap().contains("no_such_column"),
        "{error}"
    );
    d.screenshot("sql-error");
    d.submit_sql("SELECT host, count(*) AS n FROM cpu GROUP BY host ORDER BY host");
    let table = d.until(
        "the rows are shown",
        "const e = document.querySelector('#sql-error'); \
         return e.hidden && document.querySelector('#sql-result tbody')?.innerText",
    );
    assert!(table.as_str().unwrap().contains("web-2\t720"), "{table}");
    // The page loaded nothing from elsewhere.
    let foreign = d.run(
        "return performance.getEntriesByType('resource').map(r => r.name).filter(n => !n.startsWith(location.origin))",
    );
    assert_eq!(foreign, json!([]));
}
