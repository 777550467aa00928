//! A webhook: each decision is POSTed as JSON to an orchestrator, which carries it out.
//!
//! ```json
//! {"component":"web","cgroup":"forestall/web","action":"apply",
//!  "limits":{"cpu_millicores":1500,"memory_max_bytes":1073741824}}
//! ```
//!
//! `action` is `apply` (only the limits being set are listed) or `revert` (no `limits`). A 2xx
//! answer is an acknowledgement; anything else, a timeout or a broken answer is an error that
//! names the URL and quotes the answer. Read back reports what the orchestrator acknowledged,
//! since it alone knows what is in force.
//!
//! Plain `http://` over HTTP/1.1 with `Connection: close`; for TLS, point it at a local proxy.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::sync::Mutex;
use std::time::Duration;

use crate::{Actuator, Capabilities, Error, IoPriority, Limits, Result, Target};

const NAME: &str = "webhook";
/// The most of an answer that is read; an orchestrator has no reason to say more.
const MAX_ANSWER: u64 = 64 * 1024;

/// The webhook plugin for one URL.
#[derive(Debug)]
pub struct Webhook {
    url: String,
    host: String,
    port: u16,
    path: String,
    headers: Vec<(String, String)>,
    timeout: Duration,
    acknowledged: Mutex<HashMap<(String, String), Limits>>,
}

/// `s` as a JSON string literal.
fn json_str(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// The `limits` object: the fields being set, in [`Limits`]' order.
fn limits_json(l: &Limits) -> String {
    let mut f: Vec<String> = Vec::new();
    let mut num = |k: &str, v: Option<u64>| {
        if let Some(v) = v {
            f.push(format!("\"{k}\":{v}"));
        }
    };
    num("cpu_millicores", l.cpu_millicores);
    num("cpu_weight", l.cpu_weight.map(u64::from));
    num("memory_high_bytes", l.memory_high_bytes);
    num("memory_max_bytes", l.memory_max_bytes);
    num("io_weight", l.io_weight.map(u64::from));
    if let Some(io) = &l.io {
        let opt = |v: Option<u64>| v.map_or("null".to_string(), |v| v.to_string());
        f.push(format!(
            "\"io\":{{\"device\":\"{}:{}\",\"read_bps\":{},\"write_bps\":{},\"read_iops\":{},\"write_iops\":{}}}",
            io.device.0,
            io.device.1,
            opt(io.read_bps),
            opt(io.write_bps),
            opt(io.read_iops),
            opt(io.write_iops)
        ));
    }
    if let Some(n) = &l.net {
        f.push(format!(
            "\"net\":{{\"rate_bytes\":{},\"ceil_bytes\":{}}}",
            n.rate_bytes, n.ceil_bytes
        ));
    }
    if let Some(c) = &l.cpus {
        let cpus: Vec<String> = c.iter().map(|c| c.to_string()).collect();
        f.push(format!("\"cpus\":[{}]", cpus.join(",")));
    }
    if let Some(n) = l.nice {
        f.push(format!("\"nice\":{n}"));
    }
    if let Some(p) = l.io_priority {
        let (class, level) = match p {
            IoPriority::None => ("none", None),
            IoPriority::RealTime(l) => ("realtime", Some(l)),
            IoPriority::BestEffort(l) => ("best-effort", Some(l)),
            IoPriority::Idle => ("idle", None),
        };
        let level = level.map_or("null".to_string(), |l| l.to_string());
        f.push(format!(
            "\"io_priority\":{{\"class\":\"{class}\",\"level\":{level}}}"
        ));
    }
    format!("{{{}}}", f.join(","))
}

impl Webhook {
    /// A webhook posting to `url` (`http://host[:port][/path]`), waiting at most 5 s.
    pub fn new(url: &str) -> Result<Self> {
        let invalid = |why: &str| Err(Error::Invalid(format!("webhook URL {url:?}: {why}")));
        let Some(rest) = url.strip_prefix("http://") else {
            return invalid("only http:// is supported (put a local TLS proxy in front)");
        };
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, "/"),
        };
        if url.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return invalid("it holds spaces or control characters");
        }
        let (host, port) = match authority.rsplit_once(':') {
            Some((h, p)) => match p.parse::<u16>() {
                Ok(p) if p > 0 => (h, p),
                _ => return invalid("the port is not a number in 1..=65535"),
            },
            None => (authority, 80),
        };
        if host.is_empty() || host.contains('@') {
            return invalid("it has no host (or holds credentials)");
        }
        Ok(Self {
            url: url.to_string(),
            host: host.to_string(),
            port,
            path: path.to_string(),
            headers: Vec::new(),
            timeout: Duration::from_secs(5),
            acknowledged: Mutex::new(HashMap::new()),
        })
    }

    /// Sends `name: value` with every request (an `Authorization` token, say).
    pub fn with_header(mut self, name: &str, value: &str) -> Result<Self> {
        let token = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_graphic() && b != b':');
        if !token(name) || value.chars().any(|c| c.is_control()) {
            return Err(Error::Invalid(format!(
                "webhook header {name:?} is not a valid header name and value"
            )));
        }
        self.headers.push((name.to_string(), value.to_string()));
        Ok(self)
    }

    /// How long to wait to connect, and for each read and write.
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    fn net_err(&self, op: &'static str, source: std::io::Error) -> Error {
        Error::Io {
            actuator: NAME,
            op,
            path: self.url.clone().into(),
            source,
        }
    }

    /// POSTs `body` (JSON); Ok on a 2xx answer.
    pub fn post(&self, body: &str) -> Result<()> {
        let addrs = (self.host.as_str(), self.port)
            .to_socket_addrs()
            .map_err(|e| self.net_err("resolve", e))?;
        let mut last = None;
        let mut stream = None;
        for addr in addrs {
            match TcpStream::connect_timeout(&addr, self.timeout) {
                Ok(s) => {
                    stream = Some(s);
                    break;
                }
                Err(e) => last = Some(e),
            }
        }
        let mut stream = stream.ok_or_else(|| {
            self.net_err(
                "connect",
                last.unwrap_or_else(|| std::io::ErrorKind::NotFound.into()),
            )
        })?;
        stream
            .set_read_timeout(Some(self.timeout))
            .and_then(|()| stream.set_write_timeout(Some(self.timeout)))
            .map_err(|e| self.net_err("configure", e))?;
        let mut request = format!(
            "POST {} HTTP/1.1\r\nHost: {}:{}\r\nContent-Type: application/json\r\n\
             Content-Length: {}\r\nConnection: close\r\nUser-Agent: forestall\r\n",
            self.path,
            self.host,
            self.port,
            body.len()
        );
        for (name, value) in &self.headers {
            request.push_str(&format!("{name}: {value}\r\n"));
        }
        request.push_str("\r\n");
        request.push_str(body);
        stream
            .write_all(request.as_bytes())
            .map_err(|e| self.net_err("send", e))?;
        let mut answer = Vec::new();
        stream
            .take(MAX_ANSWER)
            .read_to_end(&mut answer)
            .map_err(|e| self.net_err("read the answer from", e))?;
        let text = String::from_utf8_lossy(&answer);
        let status_line = text.lines().next().unwrap_or("");
        let status = status_line
            .strip_prefix("HTTP/1.")
            .and_then(|r| r.get(2..5))
            .and_then(|s| s.parse::<u16>().ok())
            .filter(|s| (100..600).contains(s))
            .ok_or_else(|| Error::Parse {
                actuator: NAME,
                path: self.url.clone().into(),
                value: status_line.chars().take(200).collect(),
            })?;
        if (200..300).contains(&status) {
            return Ok(());
        }
        let body = text.split_once("\r\n\r\n").map_or("", |(_, b)| b);
        Err(Error::Remote {
            actuator: NAME,
            url: self.url.clone(),
            status,
            body: body.trim().chars().take(512).collect(),
        })
    }

    fn key(target: &Target) -> (String, String) {
        (target.component.clone(), target.cgroup.clone())
    }

    fn acknowledged(&self) -> std::sync::MutexGuard<'_, HashMap<(String, String), Limits>> {
        self.acknowledged.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Actuator for Webhook {
    fn name(&self) -> &'static str {
        NAME
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities::ALL
    }

    fn apply(&self, target: &Target, limits: &Limits) -> Result<()> {
        limits.check(NAME, self.capabilities(), String::new)?;
        self.post(&format!(
            "{{\"component\":{},\"cgroup\":{},\"action\":\"apply\",\"limits\":{}}}",
            json_str(&target.component),
            json_str(&target.cgroup),
            limits_json(limits)
        ))?;
        let mut acked = self.acknowledged();
        let now = acked.get(&Self::key(target)).copied().unwrap_or_default();
        acked.insert(Self::key(target), now.then(limits));
        Ok(())
    }

    fn read_back(&self, target: &Target) -> Result<Limits> {
        Ok(self
            .acknowledged()
            .get(&Self::key(target))
            .copied()
            .unwrap_or_default())
    }

    fn revert(&self, target: &Target) -> Result<()> {
        self.post(&format!(
            "{{\"component\":{},\"cgroup\":{},\"action\":\"revert\"}}",
            json_str(&target.component),
            json_str(&target.cgroup)
        ))?;
        self.acknowledged().remove(&Self::key(target));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{CpuSet, NetLimit};
    use std::io::BufRead;
    use std::net::TcpListener;

    /// A real HTTP server on 127.0.0.1 that answers each request with the next of `answers`
    /// (raw bytes) and hands back the requests it read (head, body).
    fn server(
        answers: Vec<&'static str>,
    ) -> (String, std::thread::JoinHandle<Vec<(String, String)>>) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}/hooks/forestall", listener.local_addr().unwrap());
        let handle = std::thread::spawn(move || {
            let mut seen = Vec::new();
            for answer in answers {
                let (conn, _) = listener.accept().unwrap();
                let mut reader = std::io::BufReader::new(conn);
                let mut head = String::new();
                let mut length = 0;
                loop {
                    let mut line = String::new();
                    reader.read_line(&mut line).unwrap();
                    if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                        length = v.trim().parse().unwrap();
                    }
                    if line == "\r\n" {
                        break;
                    }
                    head.push_str(&line);
                }
                let mut body = vec![0; length];
                reader.read_exact(&mut body).unwrap();
                seen.push((head, String::from_utf8(body).unwrap()));
                if answer == "hang" {
                    // Say nothing until the client gives up and closes.
                    let _ = reader.read_to_end(&mut Vec::new());
                    continue;
                }
                reader.get_mut().write_all(answer.as_bytes()).unwrap();
            }
            seen
        });
        (url, handle)
    }

    const OK: &str = "HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n";

    #[test]
    fn webhook_posts_each_decision_and_reads_back_what_was_acknowledged() {
        let (url, srv) = server(vec![OK, OK, "HTTP/1.0 204 No Content\r\n\r\n"]);
        let hook = Webhook::new(&url)
            .unwrap()
            .with_header("Authorization", "Bearer s3cret")
            .unwrap();
        let t = Target::new("web \"1\"", "forestall/web-1").unwrap();
        let first = Limits {
            cpu_millicores: Some(1500),
            memory_max_bytes: Some(1 << 30),
            net: Some(NetLimit {
                rate_bytes: 1000,
                ceil_bytes: 2000,
            }),
            cpus: Some(CpuSet::new([0, 2]).unwrap()),
            io_priority: Some(IoPriority::BestEffort(3)),
            ..Default::default()
        };
        hook.apply(&t, &first).unwrap();
        let second = Limits {
            cpu_millicores: Some(800),
            ..Default::default()
        };
        hook.apply(&t, &second).unwrap();
        assert_eq!(hook.read_back(&t).unwrap(), first.then(&second));
        hook.revert(&t).unwrap();
        assert_eq!(hook.read_back(&t).unwrap(), Limits::default());
        let seen = srv.join().unwrap();
        assert!(
            seen[0].0.starts_with("POST /hooks/forestall HTTP/1.1\r\n"),
            "{}",
            seen[0].0
        );
        assert!(seen[0].0.contains("Authorization: Bearer s3cret\r\n"));
        assert!(seen[0].0.contains("Content-Type: application/json\r\n"));
        assert_eq!(
            seen[0].1,
            "{\"component\":\"web \\\"1\\\"\",\"cgroup\":\"forestall/web-1\",\"action\":\"apply\",\
             \"limits\":{\"cpu_millicores\":1500,\"memory_max_bytes\":1073741824,\
             \"net\":{\"rate_bytes\":1000,\"ceil_bytes\":2000},\"cpus\":[0,2],\
             \"io_priority\":{\"class\":\"best-effort\",\"level\":3}}}"
        );
        assert_eq!(
            seen[1].1,
            "{\"component\":\"web \\\"1\\\"\",\"cgroup\":\"forestall/web-1\",\"action\":\"apply\",\
             \"limits\":{\"cpu_millicores\":800}}"
        );
        assert_eq!(
            seen[2].1,
            "{\"component\":\"web \\\"1\\\"\",\"cgroup\":\"forestall/web-1\",\"action\":\"revert\"}"
        );
    }

    #[test]
    fn webhook_reports_refusals_timeouts_and_broken_answers() {
        let refused = "HTTP/1.1 409 Conflict\r\nContent-Length: 16\r\n\r\nnode is draining";
        let (url, srv) = server(vec![OK, refused, "hang", "garbage\r\n\r\n", ""]);
        let hook = Webhook::new(&url)
            .unwrap()
            .with_timeout(Duration::from_millis(300));
        let t = Target::new("db", "forestall/db").unwrap();
        let set = |m| Limits {
            cpu_millicores: Some(m),
            ..Default::default()
        };
        hook.apply(&t, &set(500)).unwrap();
        // A refusal is an error quoting the orchestrator, and does not count as in force.
        let err = hook.apply(&t, &set(900)).unwrap_err();
        assert!(
            matches!(&err, Error::Remote { status: 409, body, .. } if body == "node is draining"),
            "{err}"
        );
        assert_eq!(hook.read_back(&t).unwrap(), set(500));
        let err = hook.apply(&t, &set(900)).unwrap_err();
        assert!(
            err.to_string().contains("read the answer"),
            "timeout: {err}"
        );
        let err = hook.apply(&t, &set(900)).unwrap_err();
        assert!(matches!(err, Error::Parse { .. }), "{err}");
        // Closing without a word is a broken answer too.
        let err = hook.revert(&t).unwrap_err();
        assert!(matches!(err, Error::Parse { .. }), "{err}");
        assert_eq!(hook.read_back(&t).unwrap(), set(500));
        srv.join().unwrap();
        // Nobody listening.
        let closed = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let err = Webhook::new(&format!("http://{closed}/"))
            .unwrap()
            .apply(&t, &set(1))
            .unwrap_err();
        assert!(err.to_string().contains("connect"), "{err}");
        // Bad values are refused before anything is sent.
        let err = hook.apply(&t, &set(0)).unwrap_err();
        assert!(matches!(err, Error::Invalid(_)), "{err}");
    }

    #[test]
    fn webhook_refuses_bad_urls_and_header_injection() {
        for bad in [
            "https://example.com/",
            "ftp://x/",
            "http://",
            "http://:80/",
            "http://host:0/",
            "http://host:99999/",
            "http://host:port/",
            "http://user@host/",
            "http://host/a b",
            "http://host/\r\nX: y",
        ] {
            assert!(Webhook::new(bad).is_err(), "{bad:?}");
        }
        let ok = Webhook::new("http://orchestrator.local/hook").unwrap();
        assert_eq!((ok.port, ok.path.as_str()), (80, "/hook"));
        assert_eq!(Webhook::new("http://h:8080").unwrap().path, "/");
        let hook = || Webhook::new("http://127.0.0.1:9/").unwrap();
        assert!(hook().with_header("X-Token", "a\r\nInjected: 1").is_err());
        assert!(hook().with_header("Bad Name", "v").is_err());
        assert!(hook().with_header("", "v").is_err());
        assert!(hook().with_header("X-Token", "abc").is_ok());
    }
}
