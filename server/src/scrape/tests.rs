use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;

use forestall_engine::{EngineConfig, ScanRequest};

use super::*;

/// A target on 127.0.0.1 that answers every request with `response(request_head)`, or
/// holds the connection without answering when it returns `None`.
fn target(response: impl Fn(&str) -> Option<Vec<u8>> + Send + 'static) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { return };
            let mut head = String::new();
            let mut reader = BufReader::new(conn.try_clone().unwrap());
            loop {
                let mut line = String::new();
                if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                    break;
                }
                head.push_str(&line);
            }
            match response(&head) {
                Some(bytes) => {
                    let _ = conn.write_all(&bytes);
                }
                None => {
                    // Hangs: keeps the connection open, says nothing.
                    std::thread::spawn(move || {
                        std::thread::sleep(Duration::from_secs(30));
                        drop(conn);
                    });
                }
            }
        }
    });
    addr
}

fn http(status: &str, content_type: &str, body: &[u8], extra: &str) -> Vec<u8> {
    let mut out = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n{extra}\r\n",
        body.len()
    )
    .into_bytes();
    out.extend_from_slice(body);
    out
}

const TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";

fn new_store() -> (tempfile::TempDir, Store) {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(EngineConfig {
        data_dir: dir.path().to_path_buf(),
        ..Default::default()
    })
    .unwrap();
    (dir, store)
}

/// Every row of a measurement, each as column → value text (absent tags left out).
fn rows(store: &Store, m: &str) -> Vec<BTreeMap<String, String>> {
    let mut out = Vec::new();
    let Ok(batches) = store.scan(&ScanRequest::all(m)) else {
        return out;
    };
    for b in batches {
        let b = b.unwrap();
        for r in 0..b.num_rows() {
            let mut row = BTreeMap::new();
            for (f, c) in b.schema().fields().iter().zip(b.columns()) {
                if c.is_valid(r) {
                    let v = arrow::util::display::array_value_to_string(c, r).unwrap();
                    row.insert(f.name().clone(), v);
                }
            }
            out.push(row);
        }
    }
    out
}

fn job(targets: &[&str]) -> ScrapeConfig {
    ScrapeConfig {
        job: "node".into(),
        targets: targets.iter().map(|t| t.to_string()).collect(),
        timeout: Duration::from_millis(500),
        interval: Duration::from_secs(1),
        ..Default::default()
    }
}

fn scrape_once(config: &ScrapeConfig, store: &Store, now: i64) -> Last {
    let t = Target::new(config, &config.targets[0]).unwrap();
    t.scrape(&t.agent(), store, now)
}

const NOW: i64 = 1_700_000_000_000_000_000;

#[test]
fn targets_are_host_port_over_http() {
    assert_eq!(
        target_url("127.0.0.1:9100", "/metrics").unwrap(),
        "http://127.0.0.1:9100/metrics"
    );
    assert_eq!(
        target_url("http://exporter:9100/probe?x=1", "/metrics").unwrap(),
        "http://exporter:9100/probe?x=1"
    );
    assert_eq!(
        target_url("[::1]:9100", "/m").unwrap(),
        "http://[::1]:9100/m"
    );
    for bad in [
        "",
        "exporter",
        "exporter:http",
        ":9100x",
        "user@host:1",
        "host:99999",
    ] {
        assert!(target_url(bad, "/metrics").is_err(), "{bad:?}");
    }
    let e = target_url("https://exporter:9100", "/metrics").unwrap_err();
    assert!(e.contains("only http"), "{e}");
}

#[test]
fn a_scrape_stores_every_sample_with_the_targets_labels_and_its_up() {
    let exposition = "# HELP node_load1 1m load average.\n# TYPE node_load1 gauge\n\
                      node_load1 0.5\n\
                      node_cpu_seconds_total{cpu=\"0\",mode=\"idle\"} 100.25\n\
                      node_cpu_seconds_total{cpu=\"0\",mode=\"user\"} 7\n\
                      pushed{job=\"batch\",instance=\"\"} 3 1699999999000\n\
                      odd{quantile=\"0.5\"} NaN\n";
    let addr = target(move |head| {
        assert!(head.starts_with("GET /metrics HTTP/1.1"), "{head}");
        assert!(head.contains("text/plain;version=0.0.4"), "{head}");
        Some(http("200 OK", TEXT, exposition.as_bytes(), ""))
    });
    let (_dir, store) = new_store();
    let mut config = job(&[&addr]);
    config.labels.insert("env".into(), "dev".into());
    let last = scrape_once(&config, &store, NOW);
    assert_eq!(last.up, Some(true), "{last:?}");
    assert_eq!((last.samples, last.rejected, &last.error), (5, 0, &None));
    let load = rows(&store, "node_load1");
    assert_eq!(load.len(), 1);
    assert_eq!(load[0]["value"], "0.5");
    assert_eq!(load[0]["job"], "node");
    assert_eq!(load[0]["instance"], addr);
    assert_eq!(load[0]["env"], "dev");
    assert_eq!(load[0]["time"], "2023-11-14T22:13:20");
    let cpu = rows(&store, "node_cpu_seconds_total");
    let modes: Vec<(&str, &str)> = cpu
        .iter()
        .map(|r| (r["mode"].as_str(), r["value"].as_str()))
        .collect();
    assert_eq!(modes, [("idle", "100.25"), ("user", "7.0")]);
    // The exposition's own job is kept as exported_job; an empty label is an absent one;
    // its own timestamp is honoured.
    let pushed = rows(&store, "pushed");
    assert_eq!(pushed[0]["exported_job"], "batch");
    assert_eq!(pushed[0]["job"], "node");
    assert!(!pushed[0].contains_key("exported_instance"));
    assert_eq!(pushed[0]["time"], "2023-11-14T22:13:19");
    // NaN has no place in a column of floats: read, counted as scraped, not stored.
    assert!(rows(&store, "odd").is_empty());
    let up = rows(&store, "up");
    assert_eq!(
        (up[0]["value"].as_str(), up[0]["job"].as_str()),
        ("1.0", "node")
    );
    assert_eq!(rows(&store, "scrape_samples_scraped")[0]["value"], "5.0");
    assert_eq!(rows(&store, "scrape_duration_seconds").len(), 1);
    let m = store.metrics();
    assert_eq!(
        m.scrapes_total.load(std::sync::atomic::Ordering::Relaxed),
        1
    );
    assert_eq!(
        m.scrape_samples_total
            .load(std::sync::atomic::Ordering::Relaxed),
        5
    );
}

#[test]
fn openmetrics_is_read_gzipped_with_its_second_timestamps() {
    let body = "# TYPE requests counter\nrequests_total{code=\"200\"} 17 1700000000.5 # {trace=\"a\"} 1\n# EOF\n";
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    gz.write_all(body.as_bytes()).unwrap();
    let gz = gz.finish().unwrap();
    let addr = target(move |head| {
        assert!(
            head.to_ascii_lowercase().contains("accept-encoding: gzip"),
            "{head}"
        );
        Some(http(
            "200 OK",
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            &gz,
            "Content-Encoding: gzip\r\n",
        ))
    });
    let (_dir, store) = new_store();
    let last = scrape_once(&job(&[&addr]), &store, NOW);
    assert_eq!(last.up, Some(true), "{last:?}");
    let r = rows(&store, "requests_total");
    assert_eq!(r[0]["time"], "2023-11-14T22:13:20.500");
    assert_eq!(r[0]["code"], "200");
    // Without honor_timestamps the scrape's own time is used.
    let mut config = job(&[&addr]);
    config.honor_timestamps = false;
    let (_dir2, store2) = new_store();
    scrape_once(&config, &store2, NOW);
    assert_eq!(
        rows(&store2, "requests_total")[0]["time"],
        "2023-11-14T22:13:20"
    );
}

#[test]
fn a_failed_scrape_stores_nothing_but_an_up_of_zero_and_says_why() {
    type Respond = Box<dyn Fn(&str) -> Option<Vec<u8>> + Send>;
    let cases: Vec<(&str, Respond, &str)> = vec![
        (
            "500",
            Box::new(|_: &str| Some(http("500 Internal Server Error", TEXT, b"m 1\n", ""))),
            "HTTP status 500",
        ),
        (
            "malformed",
            Box::new(|_: &str| Some(http("200 OK", TEXT, b"m 1\nm{a=\"b} 2\n", ""))),
            "line 2",
        ),
        (
            "not utf-8",
            Box::new(|_: &str| Some(http("200 OK", TEXT, b"m{a=\"\xff\"} 1\n", ""))),
            "not UTF-8",
        ),
        (
            "truncated",
            Box::new(|_: &str| {
                let mut r = http("200 OK", TEXT, b"m 1\nm 2\n", "");
                r.truncate(r.len() - 4);
                Some(r)
            }),
            "reading the body",
        ),
        ("hangs", Box::new(|_: &str| None), "timed out"),
    ];
    for (name, response, why) in cases {
        let addr = target(response);
        let (_dir, store) = new_store();
        let last = scrape_once(&job(&[&addr]), &store, NOW);
        assert_eq!(last.up, Some(false), "{name}: {last:?}");
        let error = last.error.clone().unwrap_or_default();
        assert!(
            error.to_lowercase().contains(&why.to_lowercase()),
            "{name}: {error}"
        );
        assert!(rows(&store, "m").is_empty(), "{name}: nothing stored");
        let up = rows(&store, "up");
        assert_eq!(up.len(), 1, "{name}");
        assert_eq!(up[0]["value"], "0.0", "{name}");
        assert_eq!(rows(&store, "scrape_samples_scraped")[0]["value"], "0.0");
    }
    // Nobody listening.
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let (_dir, store) = new_store();
    let last = scrape_once(&job(&[&format!("127.0.0.1:{port}")]), &store, NOW);
    assert_eq!(last.up, Some(false));
    assert_eq!(
        store
            .metrics()
            .scrape_failures_total
            .load(std::sync::atomic::Ordering::Relaxed),
        1
    );
}

#[test]
fn limits_fail_a_scrape_whole() {
    let body: String = (0..100).map(|i| format!("m{{i=\"{i}\"}} {i}\n")).collect();
    let addr = target(move |_| Some(http("200 OK", TEXT, body.as_bytes(), "")));
    let (_dir, store) = new_store();
    let mut config = job(&[&addr]);
    config.sample_limit = 99;
    let last = scrape_once(&config, &store, NOW);
    assert_eq!(last.up, Some(false));
    assert!(last.error.unwrap().contains("sample_limit"));
    config.sample_limit = 100;
    config.body_size_limit = 500;
    let last = scrape_once(&config, &store, NOW);
    assert!(last.error.unwrap().contains("body_size_limit"));
    assert!(rows(&store, "m").is_empty());
    config.body_size_limit = 64 << 20;
    assert_eq!(scrape_once(&config, &store, NOW).up, Some(true));
    assert_eq!(rows(&store, "m").len(), 100);
}

#[test]
fn samples_the_store_refuses_cost_only_themselves() {
    let addr = target(|_| Some(http("200 OK", TEXT, b"mem 1\nload 2\n", "")));
    let (_dir, store) = new_store();
    // A user's own `mem` has a string `value`.
    store
        .write(b"mem value=\"lots\" 1", Precision::Nanoseconds, 0)
        .unwrap();
    let last = scrape_once(&job(&[&addr]), &store, NOW);
    assert_eq!(last.up, Some(true), "{last:?}");
    assert_eq!(last.rejected, 1);
    assert!(last.error.unwrap().contains("1 of 2 samples not stored"));
    assert_eq!(rows(&store, "load").len(), 1);
    assert_eq!(rows(&store, "mem").len(), 1, "only the user's row");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hanging_target_does_not_hold_up_the_others() {
    let good = target(|_| Some(http("200 OK", TEXT, b"m 1\n", "")));
    let hangs = target(|_| None);
    let (_dir, store) = new_store();
    let store = Arc::new(store);
    let mut config = job(&[&hangs, &good]);
    config.timeout = Duration::from_secs(1);
    let scraper = Scraper::new(&[config]).unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let running = {
        let (scraper, store) = (scraper.clone(), Arc::clone(&store));
        tokio::spawn(async move {
            scraper
                .run(store, async {
                    let _ = stopped.await;
                })
                .await
        })
    };
    // Every target is scraped once a second; the hanging one takes its whole timeout.
    let deadline = Instant::now() + Duration::from_secs(20);
    while rows(&store, "m").len() < 3 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let _ = stop.send(());
    running.await.unwrap();
    assert!(
        rows(&store, "m").len() >= 3,
        "the good target kept being scraped"
    );
    let status = scraper.status();
    let targets = status["data"]["activeTargets"].as_array().unwrap();
    let of = |addr: &str| {
        targets
            .iter()
            .find(|t| t["labels"]["instance"] == addr)
            .unwrap()
            .clone()
    };
    assert_eq!(of(&good)["health"], "up");
    assert_eq!(of(&good)["lastError"], "");
    assert_eq!(of(&good)["scrapeUrl"], format!("http://{good}/metrics"));
    assert_eq!(of(&hangs)["health"], "down");
    assert!(
        of(&hangs)["lastError"]
            .as_str()
            .unwrap()
            .contains("timed out"),
        "{}",
        of(&hangs)
    );
    let downs = rows(&store, "up")
        .iter()
        .filter(|r| r["instance"] == hangs && r["value"] == "0.0")
        .count();
    assert!(downs >= 1);
}

#[test]
fn each_target_keeps_its_place_in_the_interval() {
    let i = Duration::from_secs(15);
    let a = offset_of("http://a:9100/metrics", i);
    assert!(a < i);
    assert_eq!(a, offset_of("http://a:9100/metrics", i));
    assert_ne!(a, offset_of("http://b:9100/metrics", i));
    // From just before the offset, the wait ends at it; from it, a whole interval later.
    let s = 1_000_000_000i64;
    let at = 10 * 15 * s + a.as_nanos() as i64;
    assert_eq!(until_next(at - 1, i, a), Duration::from_nanos(1));
    assert_eq!(until_next(at, i, a), i);
}
