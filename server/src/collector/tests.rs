use super::procfs::*;
use super::*;
use forestall_engine::line_protocol::parse_lines;
use forestall_engine::{EngineConfig, ScanRequest};
use std::fs;

const STAT: &str = "\
cpu  1000 20 300 8000 50 10 5 2 100 4
cpu0 500 10 150 4000 25 5 3 1 50 2
cpu1 500 10 150 4000 25 5 2 1 50 2
intr 12345 0 0
ctxt 999
btime 1700000000
processes 42
";

/// The lines of `text`, parsed, or the first error.
fn parsed(text: &str) -> Vec<forestall_engine::line_protocol::ParsedLine<'_>> {
    parse_lines(text.as_bytes(), Precision::Nanoseconds, 0)
        .collect::<Result<_, _>>()
        .unwrap_or_else(|e| panic!("{e}: {text}"))
}

fn field(line: &forestall_engine::line_protocol::ParsedLine<'_>, name: &str) -> f64 {
    match line.fields.iter().find(|(k, _)| k == name) {
        Some((_, FieldValue::Float(f))) => *f,
        Some((_, FieldValue::Integer(i))) => *i as f64,
        other => panic!("{name}: {other:?} in {}", line.raw),
    }
}

#[test]
fn cpu_lines_are_read_and_odd_ones_skipped() {
    let times = cpu_times(STAT);
    assert_eq!(times.len(), 3);
    assert_eq!(times[0].0, "cpu-total");
    assert_eq!(times[1].0, "cpu0");
    assert_eq!(times[0].1.user, 1000);
    assert_eq!(times[0].1.guest_nice, 4);
    // A kernel with four columns; garbage, a short line, a name that is not a CPU.
    let odd =
        "cpu 1 2 3 4\ncpu0 1 2 x 4\ncpu1 1 2 3\ncpufreq 1 2 3 4\ncpu2 1 2 3 4 5 6 7 8 9 10 11\n";
    let times = cpu_times(odd);
    let names: Vec<_> = times.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, ["cpu-total", "cpu2"]);
    assert_eq!(times[0].1.idle, 4);
    assert_eq!(times[0].1.iowait, 0, "missing columns are 0");
    assert!(cpu_times("").is_empty());
    assert!(cpu_times("cpu 99999999999999999999999 1 1 1\n").is_empty());
}

#[test]
fn cpu_usage_is_telegrafs_shares_of_the_ticks_between_two_readings() {
    let before = CpuTimes {
        user: 100,
        nice: 10,
        system: 50,
        idle: 800,
        guest: 20,
        guest_nice: 5,
        ..Default::default()
    };
    let after = CpuTimes {
        user: 160,      // +60, of which 20 guest
        nice: 20,       // +10, of which 5 guest_nice
        system: 80,     // +30
        idle: 900,      // +100
        iowait: 0,      // +0
        guest: 40,      // +20
        guest_nice: 10, // +5
        ..Default::default()
    };
    let usage: BTreeMap<_, _> = after.usage_since(&before).unwrap().into_iter().collect();
    // 200 ticks passed (guest time is inside user and nice already).
    assert_eq!(usage["usage_user"], 20.0);
    assert_eq!(usage["usage_nice"], 2.5);
    assert_eq!(usage["usage_system"], 15.0);
    assert_eq!(usage["usage_idle"], 50.0);
    assert_eq!(usage["usage_guest"], 10.0);
    assert_eq!(usage["usage_guest_nice"], 2.5);
    let modes: f64 = [
        "user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal",
    ]
    .iter()
    .map(|m| usage[format!("usage_{m}").as_str()])
    .sum::<f64>()
        + usage["usage_guest"]
        + usage["usage_guest_nice"];
    assert!((modes - 100.0).abs() < 1e-9, "{modes}");
    assert_eq!(after.usage_since(&after), None, "no time passed");
    assert_eq!(before.usage_since(&after), None, "counters went backwards");
}

#[test]
fn meminfo_is_bytes_and_bad_lines_are_skipped() {
    let text = "MemTotal:       16000 kB\nMemFree: 4000 kB\nHugePages_Total:       8\n\
                Broken line\nCached: x kB\nOverflow: 99999999999999999 kB\nOdd: 5 MB\n";
    let m = meminfo(text);
    assert_eq!(
        m,
        [
            ("MemTotal", 16000 * 1024),
            ("MemFree", 4000 * 1024),
            ("HugePages_Total", 8)
        ]
    );
}

#[test]
fn loadavg_and_uptime_take_only_numbers() {
    assert_eq!(
        loadavg("0.52 1.10 2.00 2/345 6789\n"),
        Some([0.52, 1.10, 2.0])
    );
    assert_eq!(loadavg("0.52 1.10\n"), None);
    assert_eq!(loadavg("0.52 NaN 1\n"), None);
    assert_eq!(loadavg("0.52 -1 1\n"), None);
    assert_eq!(loadavg(""), None);
    assert_eq!(uptime("12345.67 2345.00\n"), Some(12345));
    assert_eq!(uptime("up\n"), None);
}

#[test]
fn diskstats_of_every_kernel_generation_are_read() {
    let text = "\
   8       0 sda 100 2 800 30 200 4 1600 60 1 90 120
 253       0 vda 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19
   7       0 loop0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0
   8       1 sda1 1 2 3
   8       2 sda2 1 2 3 4 5 6 7 8 9 x 11
";
    let d = diskstats(text);
    assert_eq!(d.len(), 3);
    assert_eq!(d[0].name, "sda");
    assert_eq!(d[0].reads, 100);
    assert_eq!(d[0].read_bytes, 800 * 512);
    assert_eq!(d[0].write_bytes, 1600 * 512);
    assert_eq!(d[0].weighted_io_time, 120);
    assert_eq!(d[1].iops_in_progress, 13);
    assert_eq!(d[2].name, "loop0");
}

#[test]
fn net_dev_skips_its_headers_and_short_lines() {
    let text = "\
Inter-|   Receive                                                |  Transmit
 face |bytes    packets errs drop fifo frame compressed multicast|bytes    packets errs drop fifo colls carrier compressed
    lo: 100 1 0 0 0 0 0 0 100 1 0 0 0 0 0 0
  eth0: 1000 10 1 2 0 0 0 0 2000 20 3 4 0 0 0 0
 veth-x@if3: 5 1 0 0 0 0 0 0 6 1 0 0 0 0 0 0
  bad0: 1 2 3
";
    let n = net_dev(text);
    let names: Vec<_> = n.iter().map(|d| d.interface.as_str()).collect();
    assert_eq!(names, ["lo", "eth0", "veth-x@if3"]);
    let eth = &n[1];
    assert_eq!(
        (eth.bytes_recv, eth.packets_recv, eth.err_in, eth.drop_in),
        (1000, 10, 1, 2)
    );
    assert_eq!(
        (eth.bytes_sent, eth.packets_sent, eth.err_out, eth.drop_out),
        (2000, 20, 3, 4)
    );
}

#[test]
fn mounts_keep_filesystems_on_devices_once_each() {
    let filesystems =
        "nodev\tsysfs\nnodev\tproc\nnodev\ttmpfs\n\text4\n\txfs\n\tsquashfs\n\toverlay\n";
    let mounts_text = "\
proc /proc proc rw,nosuid 0 0
/dev/vda1 / ext4 rw,relatime 0 0
tmpfs /run tmpfs rw 0 0
/dev/vdb /mnt/my\\040data xfs ro,relatime 0 0
/dev/vda1 / ext4 rw 0 0
/dev/loop0 /snap/core squashfs ro 0 0
overlay /var/lib/docker/overlay2/x/merged overlay rw 0 0
short line
/dev/vdc relative ext4 rw 0 0
";
    let m = mounts(mounts_text, filesystems);
    assert_eq!(m.len(), 2, "{m:?}");
    assert_eq!(m[0].path, "/");
    assert_eq!(m[0].device, "/dev/vda1");
    assert!(!m[0].read_only);
    assert_eq!(m[1].path, "/mnt/my data", "octal escapes undone");
    assert_eq!(m[1].fstype, "xfs");
    assert!(m[1].read_only);
}

/// A proc tree and a cgroup v2 tree in a temporary directory.
struct Host {
    dir: tempfile::TempDir,
}

impl Host {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let host = Self { dir };
        host.write("proc/stat", STAT);
        host.write(
            "proc/meminfo",
            "MemTotal: 1000 kB\nMemFree: 200 kB\nMemAvailable: 600 kB\nBuffers: 100 kB\n\
             Cached: 250 kB\nSReclaimable: 50 kB\nSwapTotal: 0 kB\nSwapFree: 0 kB\n",
        );
        host.write("proc/loadavg", "0.50 0.25 0.10 1/100 4242\n");
        host.write("proc/uptime", "3600.5 7000.0\n");
        host.write(
            "proc/diskstats",
            "   8 0 sda 100 2 800 30 200 4 1600 60 1 90 120\n   7 0 loop0 0 0 0 0 0 0 0 0 0 0 0\n",
        );
        host.write(
            "proc/net/dev",
            "h\nh\n lo: 1 1 0 0 0 0 0 0 1 1 0 0 0 0 0 0\n eth0: 1000 10 1 2 0 0 0 0 2000 20 3 4 0 0 0 0\n",
        );
        // The root is real, so statvfs has something to measure; the other path is not.
        host.write(
            "proc/self/mounts",
            "/dev/vda1 / ext4 rw 0 0\n/dev/vdb /nonexistent/forestall ext4 rw 0 0\n",
        );
        host.write("proc/filesystems", "nodev\tproc\n\text4\n");
        host.write("proc/sys/kernel/hostname", "web 1,eu=x\n");
        host.write("cgroup/cgroup.controllers", "cpu memory\n");
        for (name, usec, mem) in [("a.service", 2_000_000, 4096), ("b.service", 0, 0)] {
            host.write(
                &format!("cgroup/{name}/cpu.stat"),
                &format!("usage_usec {usec}\n"),
            );
            host.write(
                &format!("cgroup/{name}/memory.current"),
                &format!("{mem}\n"),
            );
            host.write(
                &format!("cgroup/{name}/memory.stat"),
                "inactive_file 1024\n",
            );
            host.write(&format!("cgroup/{name}/cgroup.procs"), "");
        }
        host
    }

    fn write(&self, rel: &str, text: &str) {
        let path = self.dir.path().join(rel);
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        fs::write(path, text).unwrap();
    }

    fn collector(&self) -> Collector {
        let config = CollectorConfig {
            cgroup_root: self.dir.path().join("cgroup"),
            ..Default::default()
        };
        Collector::with_proc(&config, self.dir.path().join("proc"))
    }
}

#[test]
fn a_collection_writes_telegrafs_measurements_from_the_proc_tree() {
    let host = Host::new();
    let mut c = host.collector();
    assert_eq!(c.host(), "web 1,eu=x");
    let first = c.collect(1_000);
    let lines = parsed(&first.lines);
    let of = |m: &str| -> Vec<&forestall_engine::line_protocol::ParsedLine<'_>> {
        lines.iter().filter(|l| l.measurement == m).collect()
    };
    assert!(of("cpu").is_empty(), "usage needs two readings");
    // Every row carries the host, escaped so that it parses back whole.
    assert!(
        lines
            .iter()
            .all(|l| l.tags.iter().any(|(k, v)| k == "host" && v == "web 1,eu=x")),
        "{}",
        first.lines
    );
    let mem = of("mem");
    assert_eq!(mem.len(), 1);
    assert_eq!(field(mem[0], "total"), 1000.0 * 1024.0);
    assert_eq!(
        field(mem[0], "cached"),
        300.0 * 1024.0,
        "Cached + SReclaimable"
    );
    assert_eq!(
        field(mem[0], "used"),
        400.0 * 1024.0,
        "total - free - buffers - cached"
    );
    assert_eq!(field(mem[0], "used_percent"), 40.0);
    assert_eq!(field(mem[0], "available_percent"), 60.0);
    let system = of("system");
    assert_eq!(field(system[0], "load1"), 0.5);
    assert_eq!(field(system[0], "uptime"), 3600.0);
    let diskio = of("diskio");
    assert_eq!(diskio.len(), 1, "a device that never did I/O is left out");
    assert_eq!(field(diskio[0], "read_bytes"), 800.0 * 512.0);
    let net = of("net");
    assert_eq!(net.len(), 1, "no loopback");
    assert_eq!(field(net[0], "bytes_sent"), 2000.0);
    let disk = of("disk");
    assert_eq!(disk.len(), 1);
    assert!(field(disk[0], "total") > 0.0);
    assert!(
        disk[0]
            .tags
            .iter()
            .any(|(k, v)| k == "device" && v == "vda1")
    );
    // The mount that is not there is that source's problem, and did not stop the rest.
    assert!(
        first
            .problems
            .iter()
            .any(|(s, why)| s == "disk" && why.contains("/nonexistent/forestall")),
        "{:?}",
        first.problems
    );
    let cgroups = of("cgroup");
    assert_eq!(cgroups.len(), 2);
    assert!(
        cgroups[0]
            .tags
            .iter()
            .any(|(k, v)| k == "path" && v == "a.service")
    );
    assert_eq!(field(cgroups[0], "cpu_seconds"), 2.0);
    assert_eq!(field(cgroups[0], "memory_bytes"), 3072.0, "working set");
    assert!(cgroups[0].fields.iter().all(|(k, _)| k != "cpu_cores"));

    // A second reading: CPU shares of what passed in between, and cgroup rates.
    host.write(
        "proc/stat",
        "cpu  1100 20 400 8300 50 10 5 2 100 4\ncpu0 550 10 200 4150 25 5 3 1 50 2\n",
    );
    host.write("cgroup/a.service/cpu.stat", "usage_usec 2500000\n");
    let second = c.collect(2_000);
    let lines = parsed(&second.lines);
    let cpu: Vec<_> = lines.iter().filter(|l| l.measurement == "cpu").collect();
    assert_eq!(cpu.len(), 2, "cpu1 is gone, so it has no second reading");
    assert!(
        cpu[0]
            .tags
            .iter()
            .any(|(k, v)| k == "cpu" && v == "cpu-total")
    );
    // 500 ticks: 100 user, 100 system, 300 idle.
    assert_eq!(field(cpu[0], "usage_user"), 20.0);
    assert_eq!(field(cpu[0], "usage_system"), 20.0);
    assert_eq!(field(cpu[0], "usage_idle"), 60.0);
    assert!(lines.iter().all(|l| l.timestamp == 2_000));
    let a = lines
        .iter()
        .find(|l| l.measurement == "cgroup" && l.tags.iter().any(|(_, v)| v == "a.service"))
        .unwrap();
    assert!(field(a, "cpu_cores") > 0.0);
}

#[test]
fn missing_sources_are_problems_and_the_rest_is_still_written() {
    let host = Host::new();
    fs::remove_file(host.dir.path().join("proc/meminfo")).unwrap();
    fs::write(host.dir.path().join("proc/loadavg"), "garbage\n").unwrap();
    fs::remove_dir_all(host.dir.path().join("cgroup")).unwrap();
    let mut c = host.collector();
    let got = c.collect(1);
    let sources: BTreeSet<_> = got.problems.iter().map(|(s, _)| s.as_str()).collect();
    assert!(sources.contains("mem"), "{:?}", got.problems);
    assert!(sources.contains("system"), "{:?}", got.problems);
    assert!(sources.contains("cgroup"), "{:?}", got.problems);
    let lines = parsed(&got.lines);
    assert!(lines.iter().any(|l| l.measurement == "net"));
    assert!(lines.iter().any(|l| l.measurement == "diskio"));
    // An empty parent turns the cgroups off: no rows, no problem.
    let config = CollectorConfig {
        cgroup_parent: String::new(),
        ..Default::default()
    };
    let mut c = Collector::with_proc(&config, host.dir.path().join("proc"));
    let got = c.collect(1);
    assert!(got.problems.iter().all(|(s, _)| s != "cgroup"));
}

#[test]
fn the_real_host_is_collected() {
    let mut c = Collector::new(&CollectorConfig::default());
    c.collect(1);
    // CPU time is counted in ticks (10 ms): let a few pass.
    std::thread::sleep(Duration::from_millis(200));
    let got = c.collect(2);
    let lines = parsed(&got.lines);
    for m in ["cpu", "mem", "system"] {
        assert!(
            lines.iter().any(|l| l.measurement == m),
            "no {m} in {}",
            got.lines
        );
    }
    let total = lines
        .iter()
        .find(|l| l.measurement == "cpu" && l.tags.iter().any(|(_, v)| v == "cpu-total"))
        .unwrap();
    let idle = field(total, "usage_idle");
    assert!((0.0..=100.0).contains(&idle), "{idle}");
}

#[test]
fn collections_go_through_the_store_and_a_conflict_costs_only_its_rows() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(EngineConfig {
        data_dir: dir.path().to_path_buf(),
        ..Default::default()
    })
    .unwrap();
    // The user's own `mem` says `total` is a string: the collector's mem rows cannot go
    // there, and everything else still does.
    store
        .write(b"mem total=\"lots\" 1", Precision::Nanoseconds, 0)
        .unwrap();
    let host = Host::new();
    let mut c = host.collector();
    let now = now_nanos();
    let got = collect_and_write(&mut c, &store, now);
    let rows = |m: &str| -> usize {
        store
            .scan(&ScanRequest::all(m))
            .unwrap()
            .map(|b| b.unwrap().num_rows())
            .sum()
    };
    assert_eq!(rows("mem"), 1, "only the user's row");
    assert_eq!(rows("net"), 1);
    assert_eq!(rows("cgroup"), 2);
    let write = got.problems.iter().find(|(s, _)| s == "write").unwrap();
    assert!(write.1.contains("total"), "{}", write.1);
    let m = store.metrics();
    assert_eq!(
        m.collector_collections_total
            .load(std::sync::atomic::Ordering::Relaxed),
        1
    );
    assert!(
        m.collector_problems_total
            .load(std::sync::atomic::Ordering::Relaxed)
            >= 2
    );
}

#[test]
fn collections_are_due_at_multiples_of_the_interval() {
    let ten = Duration::from_secs(10);
    assert_eq!(until_next_multiple(0, ten), ten);
    assert_eq!(
        until_next_multiple(3_000_000_000, ten),
        Duration::from_secs(7)
    );
    assert_eq!(
        until_next_multiple(19_999_999_999, ten),
        Duration::from_nanos(1)
    );
}

#[test]
fn the_section_is_checked() {
    let ok = CollectorConfig::default();
    assert!(ok.validate().is_ok());
    for parent in ["system.slice", "/", "", "a/b/"] {
        let c = CollectorConfig {
            cgroup_parent: parent.into(),
            ..Default::default()
        };
        assert!(c.validate().is_ok(), "{parent:?}");
    }
    for parent in ["..", "a/../b", "a//b", "./a"] {
        let c = CollectorConfig {
            cgroup_parent: parent.into(),
            ..Default::default()
        };
        assert!(c.validate().is_err(), "{parent:?}");
    }
    for interval in [Duration::from_millis(500), Duration::from_secs(7200)] {
        let c = CollectorConfig {
            interval,
            ..Default::default()
        };
        assert!(c.validate().is_err(), "{interval:?}");
    }
}
