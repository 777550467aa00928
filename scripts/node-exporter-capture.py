#!/usr/bin/env python3
# Real-world floats: a node_exporter capture stored by each system, and the bytes per value.
#
# 1. `capture`: runs prometheus-node-exporter on this machine and scrapes it every
#    `--interval` seconds for `--seconds`, writing every sample as a line-protocol line
#    (`<metric>,<labels> value=<the exposition's own text> <ms>`), skipping NaN and ±Inf,
#    which no system here stores as a sample. The values are what node_exporter serves:
#    counters of seconds with two decimals, byte counters, ratios, timestamps.
# 2. `measure`: loads that file into each system (a fresh data directory each, one after the
#    other), flushes and compacts, waits until the directory's size is stable while the
#    server runs, and reports bytes per value: the whole data directory, and for Forestall
#    its segments alone.
#
# Usage:
#   python3 scripts/node-exporter-capture.py capture --out /tmp/node.lp --seconds 600
#   python3 scripts/node-exporter-capture.py measure --data /tmp/node.lp \
#       --system forestall=target/release/forestall --system old=/tmp/forestall-old \
#       --system victoriametrics
import argparse, http.client, os, re, shutil, subprocess, sys, tempfile, time

SAMPLE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)(?:\s+(-?\d+))?\s*$')
LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)",?')


def lp_escape(s, specials=",= "):
    s = s.replace("\\", "\\\\")
    for c in specials:
        s = s.replace(c, "\\" + c)
    return s


def unescape(v):
    return re.sub(r'\\(.)', lambda m: "\n" if m.group(1) == "n" else m.group(1), v)


def to_lines(text, ms):
    out = []
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = SAMPLE.match(line)
        if not m:
            raise ValueError("unparsed line: %r" % line)
        name, labels, value, _ = m.groups()
        v = float(value)
        if v != v or v in (float("inf"), float("-inf")):
            continue
        tags = []
        for k, lv in LABEL.findall(labels or ""):
            lv = unescape(lv)
            if lv and "\n" not in lv and "\t" not in lv:
                tags.append((k, lv))
        tags.sort()
        series = lp_escape(name, ", ") + "".join(
            ",%s=%s" % (lp_escape(k), lp_escape(lv)) for k, lv in tags)
        out.append("%s value=%s %d\n" % (series, value, ms * 1_000_000))
    return out


def get(port, path, method="GET", body=None):
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    c.request(method, path, body=body)
    r = c.getresponse()
    data = r.read()
    c.close()
    return r.status, data


def wait_http(port, path, proc, seconds=60):
    deadline = time.time() + seconds
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError("server exited with %s" % proc.returncode)
        try:
            if get(port, path)[0] < 500:
                return
        except OSError:
            pass
        time.sleep(0.2)
    raise RuntimeError("no answer on port %d" % port)


def capture(args):
    port = 19100
    proc = subprocess.Popen(["prometheus-node-exporter", "--web.listen-address=127.0.0.1:%d" % port],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_http(port, "/metrics", proc)
        n = scrapes = 0
        with open(args.out + ".partial", "w") as f:
            start = time.time()
            while time.time() - start < args.seconds:
                t = time.time()
                status, body = get(port, "/metrics")
                if status == 200:
                    lines = to_lines(body.decode(), int(t * 1000))
                    f.writelines(lines)
                    n += len(lines)
                    scrapes += 1
                time.sleep(max(0.0, args.interval - (time.time() - t)))
        os.rename(args.out + ".partial", args.out)
        print("%d scrapes, %d samples -> %s" % (scrapes, n, args.out))
    finally:
        proc.terminate()
        proc.wait()


def dir_size(d):
    total = 0
    for root, _, files in os.walk(d):
        for name in files:
            try:
                total += os.path.getsize(os.path.join(root, name))
            except OSError:
                pass
    return total


def stable_size(d, quiet, limit=300):
    last, since, deadline = -1, time.time(), time.time() + limit
    while time.time() < deadline:
        size = dir_size(d)
        if size != last:
            last, since = size, time.time()
        elif time.time() - since >= quiet:
            return size
        time.sleep(0.5)
    return last


def measure_one(name, spec, data, values, work):
    port = 18500
    d = tempfile.mkdtemp(prefix=name + "-", dir=work)
    if spec == "victoriametrics":
        cmd = ["victoria-metrics", "-storageDataPath=" + d, "-httpListenAddr=127.0.0.1:%d" % port,
               "-retentionPeriod=100y"]
        ready, write = "/health", "/write"
        maintenance = [("/internal/force_flush", "GET"), ("/internal/force_merge", "GET")]
    else:
        cmd = [spec, "serve", "--http-addr", "127.0.0.1:%d" % port, "--data-dir", d]
        ready, write = "/health", "/write?precision=ns"
        maintenance = [("/api/v1/admin/flush", "POST"), ("/api/v1/admin/compact", "POST")]
    env = dict(os.environ, RUST_LOG="warn", FORESTALL__COLLECTOR__ENABLED="false")
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=open(d + ".log", "w"), env=env)
    try:
        wait_http(port, ready, proc)
        batch = []
        with open(data) as f:
            for line in f:
                batch.append(line)
                if len(batch) == 5000:
                    status, body = get(port, write, "POST", "".join(batch).encode())
                    if status not in (200, 204):
                        raise RuntimeError("%s: write %s %s" % (name, status, body[:300]))
                    batch = []
        if batch:
            status, body = get(port, write, "POST", "".join(batch).encode())
            if status not in (200, 204):
                raise RuntimeError("%s: write %s %s" % (name, status, body[:300]))
        sizes = []
        for path, method in maintenance:
            get(port, path, method)
            sizes.append(stable_size(d, 15))
        segments = dir_size(os.path.join(d, "segments")) if spec != "victoriametrics" else None
        index = dir_size(os.path.join(d, "index")) if spec != "victoriametrics" else None
        return sizes, segments, index
    finally:
        proc.terminate()
        proc.wait()
        shutil.rmtree(d, ignore_errors=True)


def measure(args):
    values = sum(1 for _ in open(args.data))
    os.makedirs(args.work, exist_ok=True)
    print("%s: %d values" % (args.data, values))
    print("| system | B/value after flush | B/value compacted | segments B/value | index MB |")
    print("|---|---|---|---|---|")
    for s in args.system:
        name, _, spec = s.partition("=")
        spec = spec or name
        (flushed, compacted), segments, index = measure_one(name, spec, args.data, values, args.work)
        seg = "%.3f" % (segments / values) if segments is not None else "–"
        idx = "%.1f" % (index / 1e6) if index is not None else "–"
        print("| %s | %.3f | %.3f | %s | %s |" % (name, flushed / values, compacted / values, seg, idx))
        sys.stdout.flush()


def main():
    p = argparse.ArgumentParser(description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("capture")
    c.add_argument("--out", required=True)
    c.add_argument("--seconds", type=float, default=600)
    c.add_argument("--interval", type=float, default=1.0)
    m = sub.add_parser("measure")
    m.add_argument("--data", required=True)
    m.add_argument("--system", action="append", required=True,
                   help="NAME=forestall-binary, or victoriametrics")
    m.add_argument("--work", default="/tmp/node-capture")
    args = p.parse_args()
    capture(args) if args.cmd == "capture" else measure(args)


if __name__ == "__main__":
    main()
