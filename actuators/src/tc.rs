//! Traffic control: egress bandwidth per component with HTB on one interface, through `tc`.
//!
//! The interface gets an HTB root qdisc (`1:`) whose default sends unclassified traffic on
//! unshaped, so only the components Forestall manages are touched. Each component has its own
//! class `1:<minor>` with `rate` (guaranteed) and `ceil` (what it may borrow up to), and u32
//! filters steer its [`Flow`]s to that class. The minor number is a hash of the component's
//! name, so it is the same after a restart; two names that hash alike are refused, not merged.
//! A component's filters all carry preference `<minor>`, so they are removed together.
//!
//! Rates go to `tc` in bits per second and read back as `tc` prints them: exact for round
//! figures, to three or four significant digits otherwise.

use std::collections::HashMap;
use std::process::Command;
use std::sync::Mutex;

use crate::{Actuator, Capabilities, Error, Flow, Limits, NetLimit, Result, Target};

const NAME: &str = "tc";

/// The traffic-control plugin for one interface, optionally inside a named network namespace.
#[derive(Debug)]
pub struct TrafficControl {
    dev: String,
    netns: Option<String>,
    /// minor → (component, flows whose filters are installed).
    classes: Mutex<HashMap<u16, (String, Vec<Flow>)>>,
}

/// The class minor of a component: FNV-1a of its name folded into 0x10..=0xfffe (lower ones
/// are left for the operator).
fn minor_of(component: &str) -> u16 {
    let mut h: u32 = 0x811c_9dc5;
    for b in component.bytes() {
        h ^= u32::from(b);
        h = h.wrapping_mul(0x0100_0193);
    }
    (h % 0xffef) as u16 + 0x10
}

/// A rate as `tc` prints it (`8Mbit`, `800Kbit`, `1200bit`), in bytes per second.
fn parse_rate(text: &str) -> Option<u64> {
    let digits = text.find(|c: char| !c.is_ascii_digit())?;
    let (n, unit) = text.split_at(digits);
    let n: u64 = n.parse().ok()?;
    let scale: u64 = match unit {
        "bit" => 1,
        "Kbit" => 1_000,
        "Mbit" => 1_000_000,
        "Gbit" => 1_000_000_000,
        "Tbit" => 1_000_000_000_000,
        _ => return None,
    };
    Some(n * scale / 8)
}

/// The u32 selectors of a flow; a flow with no fields matches every IPv4 packet.
fn selectors(f: &Flow) -> Vec<String> {
    let mut out = Vec::new();
    for (dir, net) in [("src", f.src), ("dst", f.dst)] {
        if let Some((addr, len)) = net {
            out.extend(["match", "ip", dir].map(String::from));
            out.push(format!("{addr}/{len}"));
        }
    }
    for (dir, port) in [("sport", f.sport), ("dport", f.dport)] {
        if let Some(p) = port {
            out.extend(["match", "ip", dir].map(String::from));
            out.extend([p.to_string(), "0xffff".into()]);
        }
    }
    if out.is_empty() {
        out.extend(["match", "u32", "0", "0"].map(String::from));
    }
    out
}

impl TrafficControl {
    /// Shapes `dev` in the current network namespace.
    pub fn new(dev: impl Into<String>) -> Self {
        Self {
            dev: dev.into(),
            netns: None,
            classes: Mutex::new(HashMap::new()),
        }
    }

    /// Shapes `dev` inside the network namespace `netns` (as `ip netns` names it).
    pub fn in_netns(dev: impl Into<String>, netns: impl Into<String>) -> Self {
        Self {
            netns: Some(netns.into()),
            ..Self::new(dev)
        }
    }

    /// Runs `tc` with `args`; its output, or its own error message as the error.
    fn tc(&self, args: &[&str]) -> Result<String> {
        let mut cmd = Command::new("tc");
        if let Some(ns) = &self.netns {
            cmd.args(["-n", ns]);
        }
        cmd.args(args);
        let shown = || format!("tc {}", args.join(" "));
        let out = cmd.output().map_err(|e| Error::Command {
            actuator: NAME,
            command: shown(),
            message: e.to_string(),
        })?;
        if !out.status.success() {
            return Err(Error::Command {
                actuator: NAME,
                command: shown(),
                message: String::from_utf8_lossy(&out.stderr).trim().to_string(),
            });
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    fn class_id(minor: u16) -> String {
        format!("1:{minor:x}")
    }

    /// The component's class as `tc` shows it, if it exists.
    fn class(&self, minor: u16) -> Result<Option<NetLimit>> {
        let id = Self::class_id(minor);
        let shown = self.tc(&["class", "show", "dev", &self.dev, "classid", &id])?;
        let Some(line) = shown.lines().find(|l| l.contains("htb")) else {
            return Ok(None);
        };
        let word_after = |key: &str| {
            let mut words = line.split_whitespace();
            words.find(|w| *w == key)?;
            parse_rate(words.next()?)
        };
        match (word_after("rate"), word_after("ceil")) {
            (Some(rate_bytes), Some(ceil_bytes)) => Ok(Some(NetLimit {
                rate_bytes,
                ceil_bytes,
            })),
            _ => Err(Error::Parse {
                actuator: NAME,
                path: format!("tc class {id} on {}", self.dev).into(),
                value: line.to_string(),
            }),
        }
    }

    fn has_filters(&self, minor: u16) -> Result<bool> {
        let prio = minor.to_string();
        let shown = self.tc(&[
            "filter", "show", "dev", &self.dev, "parent", "1:", "prio", &prio,
        ])?;
        Ok(!shown.trim().is_empty())
    }

    fn delete_filters(&self, minor: u16) -> Result<()> {
        if self.has_filters(minor)? {
            let prio = minor.to_string();
            self.tc(&[
                "filter", "del", "dev", &self.dev, "parent", "1:", "prio", &prio,
            ])?;
        }
        Ok(())
    }

    /// Adds the HTB root qdisc unless it is there. Another root qdisc is not replaced: `tc`
    /// refuses and the error says so.
    fn ensure_root(&self) -> Result<()> {
        let shown = self.tc(&["qdisc", "show", "dev", &self.dev, "root"])?;
        if !shown.contains("qdisc htb 1: root") {
            self.tc(&[
                "qdisc", "add", "dev", &self.dev, "root", "handle", "1:", "htb",
            ])?;
        }
        Ok(())
    }

    /// The component's minor, claimed for it; refused when another component holds it.
    fn claim(&self, component: &str) -> Result<u16> {
        let minor = minor_of(component);
        let mut classes = self.classes.lock().unwrap_or_else(|e| e.into_inner());
        match classes.get(&minor) {
            Some((holder, _)) if holder != component => Err(Error::Invalid(format!(
                "components {holder:?} and {component:?} hash to the same tc class {}",
                Self::class_id(minor)
            ))),
            Some(_) => Ok(minor),
            None => {
                classes.insert(minor, (component.to_string(), Vec::new()));
                Ok(minor)
            }
        }
    }
}

impl Actuator for TrafficControl {
    fn name(&self) -> &'static str {
        NAME
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            net: self.tc(&["qdisc", "show", "dev", &self.dev]).is_ok(),
            ..Capabilities::default()
        }
    }

    fn apply(&self, target: &Target, limits: &Limits) -> Result<()> {
        limits.check(NAME, self.capabilities(), || {
            format!("interface {} is not there, or tc is missing", self.dev)
        })?;
        let Some(net) = limits.net else {
            return Ok(());
        };
        if target.flows.is_empty() {
            return Err(Error::Invalid(format!(
                "component {} has no flows to steer to its bandwidth class",
                target.component
            )));
        }
        let minor = self.claim(&target.component)?;
        self.ensure_root()?;
        let id = Self::class_id(minor);
        let (rate, ceil) = (
            format!("{}bit", net.rate_bytes * 8),
            format!("{}bit", net.ceil_bytes * 8),
        );
        self.tc(&[
            "class", "replace", "dev", &self.dev, "parent", "1:", "classid", &id, "htb", "rate",
            &rate, "ceil", &ceil,
        ])?;
        let installed = {
            let classes = self.classes.lock().unwrap_or_else(|e| e.into_inner());
            classes
                .get(&minor)
                .map(|(_, f)| f.clone())
                .unwrap_or_default()
        };
        // Filters are rewritten only when the flows changed (or after a restart), so a rate
        // change never leaves the traffic unsteered for a moment.
        if installed != target.flows || !self.has_filters(minor)? {
            self.delete_filters(minor)?;
            let prio = minor.to_string();
            for flow in &target.flows {
                let mut args: Vec<String> = [
                    "filter", "add", "dev", &self.dev, "parent", "1:", "protocol", "ip", "prio",
                    &prio, "u32",
                ]
                .map(String::from)
                .to_vec();
                args.extend(selectors(flow));
                args.extend(["flowid".to_string(), id.clone()]);
                self.tc(&args.iter().map(String::as_str).collect::<Vec<_>>())?;
            }
            let mut classes = self.classes.lock().unwrap_or_else(|e| e.into_inner());
            classes.insert(minor, (target.component.clone(), target.flows.clone()));
        }
        Ok(())
    }

    fn read_back(&self, target: &Target) -> Result<Limits> {
        Ok(Limits {
            net: self.class(minor_of(&target.component))?,
            ..Limits::default()
        })
    }

    fn revert(&self, target: &Target) -> Result<()> {
        let minor = minor_of(&target.component);
        {
            let mut classes = self.classes.lock().unwrap_or_else(|e| e.into_inner());
            match classes.get(&minor) {
                Some((holder, _)) if *holder != target.component => {
                    return Err(Error::Invalid(format!(
                        "tc class {} belongs to {holder:?}, not {:?}",
                        Self::class_id(minor),
                        target.component
                    )));
                }
                _ => classes.remove(&minor),
            };
        }
        let shown = self.tc(&["qdisc", "show", "dev", &self.dev, "root"])?;
        if !shown.contains("qdisc htb 1: root") {
            return Ok(()); // nothing of ours is there
        }
        self.delete_filters(minor)?;
        if self.class(minor)?.is_some() {
            self.tc(&[
                "class",
                "del",
                "dev",
                &self.dev,
                "classid",
                &Self::class_id(minor),
            ])?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::net::{SocketAddr, TcpListener, TcpStream};
    use std::time::{Duration, Instant};

    use crate::testing::{Netns, enter_netns};

    impl Netns {
        /// A TCP sink inside the namespace; it reports (seconds since its first byte, bytes
        /// so far) after every read.
        fn sink(&self) -> (SocketAddr, std::thread::JoinHandle<Vec<(f64, u64)>>) {
            let path = format!("/run/netns/{}", self.name);
            let (tx, rx) = std::sync::mpsc::channel();
            let peer = self.peer;
            let handle = std::thread::spawn(move || {
                enter_netns(&path);
                let listener = TcpListener::bind((peer, 0)).unwrap();
                tx.send(listener.local_addr().unwrap()).unwrap();
                let (mut conn, _) = listener.accept().unwrap();
                let mut buf = vec![0u8; 1 << 16];
                let (mut total, mut start, mut log) = (0u64, None, Vec::new());
                loop {
                    let n = conn.read(&mut buf).unwrap();
                    if n == 0 {
                        return log;
                    }
                    let t0 = *start.get_or_insert_with(Instant::now);
                    total += n as u64;
                    log.push((t0.elapsed().as_secs_f64(), total));
                }
            });
            (rx.recv().unwrap(), handle)
        }
    }

    /// Bytes per second a bulk transfer to the namespace reaches over `secs`, from the
    /// receiver's clock, leaving out the first half second (the bucket's burst, slow start).
    fn throughput(ns: &Netns, secs: f64) -> f64 {
        let (addr, sink) = ns.sink();
        let mut conn = TcpStream::connect(addr).unwrap();
        let chunk = vec![7u8; 1 << 16];
        let t0 = Instant::now();
        while t0.elapsed() < Duration::from_secs_f64(secs) {
            conn.write_all(&chunk).unwrap();
        }
        drop(conn);
        let log = sink.join().unwrap();
        let from = log
            .iter()
            .find(|(t, _)| *t >= 0.5)
            .copied()
            .unwrap_or(log[0]);
        let to = *log.last().unwrap();
        (to.1 - from.1) as f64 / (to.0 - from.0).max(1e-3)
    }

    #[test]
    fn tc_htb_class_shapes_a_transfer_across_a_veth_pair_and_removal_restores_it() {
        let ns = Netns::new(1);
        let tc = TrafficControl::new(&ns.host);
        assert!(tc.capabilities().net);
        let target = Target::new("bulk", "forestall/bulk")
            .unwrap()
            .with_flow(Flow {
                dst: Some((ns.peer, 32)),
                ..Default::default()
            });
        let free = throughput(&ns, 1.5);
        let rate = 1_000_000; // 8 Mbit/s
        let shaped = Limits {
            net: Some(NetLimit {
                rate_bytes: rate,
                ceil_bytes: rate,
            }),
            ..Default::default()
        };
        tc.apply(&target, &shaped).unwrap();
        assert_eq!(tc.read_back(&target).unwrap(), shaped);
        let held = throughput(&ns, 3.0);
        assert!(
            held > 0.7 * rate as f64 && held < 1.15 * rate as f64,
            "shaped to {rate} B/s, measured {held:.0} B/s"
        );
        assert!(
            free > 10.0 * held,
            "unshaped {free:.0} B/s vs shaped {held:.0}"
        );
        // Raising the rate raises the transfer, without touching the filter.
        let raised = Limits {
            net: Some(NetLimit {
                rate_bytes: 3 * rate,
                ceil_bytes: 3 * rate,
            }),
            ..Default::default()
        };
        tc.apply(&target, &raised).unwrap();
        let up = throughput(&ns, 2.5);
        assert!(
            up > 2.0 * held && up < 3.45 * rate as f64,
            "raised to {} B/s, measured {up:.0} B/s (was {held:.0})",
            3 * rate
        );
        tc.revert(&target).unwrap();
        assert_eq!(tc.read_back(&target).unwrap(), Limits::default());
        let after = throughput(&ns, 1.0);
        assert!(after > 10.0 * held, "after removal {after:.0} B/s");
        // Reverting twice is fine: there is nothing left to remove.
        tc.revert(&target).unwrap();
    }

    #[test]
    fn tc_refuses_what_it_cannot_do() {
        let ns = Netns::new(2);
        let tc = TrafficControl::new(&ns.host);
        let net = |rate_bytes, ceil_bytes| Limits {
            net: Some(NetLimit {
                rate_bytes,
                ceil_bytes,
            }),
            ..Default::default()
        };
        let bare = Target::new("web", "forestall/web").unwrap();
        let err = tc.apply(&bare, &net(1000, 1000)).unwrap_err();
        assert!(err.to_string().contains("no flows"), "{err}");
        let web = bare.with_flow(Flow {
            dport: Some(8080),
            ..Default::default()
        });
        let err = tc.apply(&web, &net(1000, 10)).unwrap_err();
        assert!(err.to_string().contains("ceil >= rate"), "{err}");
        let err = tc
            .apply(
                &web,
                &Limits {
                    cpu_weight: Some(10),
                    ..Default::default()
                },
            )
            .unwrap_err();
        assert!(matches!(err, Error::Unsupported { .. }), "{err}");
        // No such interface: refused before anything is run.
        let nowhere = TrafficControl::new("fs-no-such0");
        assert!(!nowhere.capabilities().net);
        let err = nowhere.apply(&web, &net(1000, 1000)).unwrap_err();
        assert!(matches!(err, Error::Unsupported { .. }), "{err}");
        // A foreign root qdisc is not replaced; tc's refusal comes back as the error.
        let out = Command::new("tc")
            .args([
                "qdisc", "add", "dev", &ns.host, "root", "handle", "5:", "pfifo",
            ])
            .output()
            .unwrap();
        assert!(out.status.success());
        let err = tc.apply(&web, &net(1000, 1000)).unwrap_err();
        assert!(
            matches!(&err, Error::Command { command, .. } if command.contains("qdisc add")),
            "{err}"
        );
        // The interface inside the namespace, named from outside it.
        let inner = TrafficControl::in_netns(ns.host.replacen("fsh", "fsp", 1), &ns.name);
        inner.apply(&web, &net(125_000, 250_000)).unwrap();
        assert_eq!(inner.read_back(&web).unwrap(), net(125_000, 250_000));
        let text = inner.tc(&["filter", "show", "dev", &inner.dev]).unwrap();
        assert!(
            text.contains("00001f90/0000ffff at 20"),
            "dport 8080 filter: {text}"
        );
        inner.revert(&web).unwrap();
        assert_eq!(inner.read_back(&web).unwrap(), Limits::default());
    }

    #[test]
    fn tc_rates_and_classes_parse_as_tc_prints_them() {
        assert_eq!(parse_rate("8Mbit"), Some(1_000_000));
        assert_eq!(parse_rate("8388Kbit"), Some(1_048_500));
        assert_eq!(parse_rate("1200bit"), Some(150));
        assert_eq!(parse_rate("2Gbit"), Some(250_000_000));
        for bad in ["", "Mbit", "8", "8mbit", "8 Mbit", "-8Mbit"] {
            assert_eq!(parse_rate(bad), None, "{bad:?}");
        }
        let m = minor_of("web-1");
        assert!((0x10..=0xfffe).contains(&m));
        assert_eq!(m, minor_of("web-1"));
        // Two components whose classes collide are refused, not merged.
        let tc = TrafficControl::new("lo");
        let (a, b) = (0..10_000)
            .map(|i| format!("c{i}"))
            .find_map(|a| {
                let b = (0..100_000)
                    .map(|j| format!("d{j}"))
                    .find(|b| minor_of(b) == minor_of(&a))?;
                Some((a, b))
            })
            .unwrap();
        tc.claim(&a).unwrap();
        assert!(
            tc.claim(&b)
                .unwrap_err()
                .to_string()
                .contains("same tc class")
        );
        assert_eq!(tc.claim(&a).unwrap(), minor_of(&a));
    }
}
