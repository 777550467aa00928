#!/usr/bin/env python3
# Memory pressure: `forestall serve` in a memory cgroup with a hard limit (512 MiB by
# default, no swap), TSBS cpu-only lines written as fast as it takes them from several
# clients, and heavy queries run over and over meanwhile. Reports what the clients got, what
# the queries got, the cgroup's peak usage, the server's peak RSS, the OOM kills, and whether
# every acknowledged line is in the store afterwards.
#
# Clients honour backpressure as a production client should: a 503 or 507 is retried after
# its Retry-After; only a 204 counts as acknowledged.
#
# Usage (root; cgroup v1 or v2):
#   tsbs generate --hosts 1000 --hours 24 --out /tmp/tsbs.lp     # benches' generator
#   python3 scripts/memory-pressure.py --forestall target/release/forestall --data /tmp/tsbs.lp
import argparse, http.client, json, os, shutil, subprocess, sys, tempfile, threading, time

HEAVY = [
    # 1,440 buckets × 1,000 hosts: about 1.4 M groups.
    "SELECT hostname, date_bin(INTERVAL '1 minute', time) AS m, max(usage_user) AS u, "
    "avg(usage_system) AS s FROM cpu GROUP BY 1, 2 ORDER BY u DESC LIMIT 10",
    # A sort of every row.
    "SELECT hostname, time, usage_user FROM cpu ORDER BY usage_idle DESC, time LIMIT 10",
    # A self-join on host and time.
    "SELECT a.hostname, count(*) AS n FROM cpu a JOIN cpu b ON a.hostname = b.hostname "
    "AND a.time = b.time GROUP BY 1 ORDER BY n DESC LIMIT 5",
]


def cgroup_paths(name):
    v2 = os.path.exists("/sys/fs/cgroup/cgroup.controllers")
    if v2:
        d = "/sys/fs/cgroup/" + name
        return v2, d, {"limit": "memory.max", "usage": "memory.current", "peak": "memory.peak",
                       "procs": "cgroup.procs"}
    d = "/sys/fs/cgroup/memory/" + name
    return v2, d, {"limit": "memory.limit_in_bytes", "usage": "memory.usage_in_bytes",
                   "peak": "memory.max_usage_in_bytes", "procs": "cgroup.procs"}


def read(path, default=""):
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return default


def oom_kills(v2, d):
    text = read(d + ("/memory.events" if v2 else "/memory.oom_control"))
    for line in text.splitlines():
        k, _, v = line.partition(" ")
        if k == "oom_kill":
            return int(v)
    return 0


def status_kb(pid, key):
    for line in read("/proc/%d/status" % pid).splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--forestall", required=True)
    ap.add_argument("--data", required=True, help="TSBS cpu-only line protocol")
    ap.add_argument("--limit-mib", type=int, default=512)
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--batch", type=int, default=5000)
    ap.add_argument("--env", action="append", default=[], help="KEY=VALUE for the server")
    ap.add_argument("--queriers", type=int, default=2, help="clients running heavy queries")
    ap.add_argument("--only", type=int, help="run only this one of the heavy queries (0-2)")
    a = ap.parse_args()

    name = "forestall-pressure-%d" % os.getpid()
    v2, d, files = cgroup_paths(name)
    os.makedirs(d)
    with open(os.path.join(d, files["limit"]), "w") as f:
        f.write(str(a.limit_mib << 20))
    data_dir = tempfile.mkdtemp(prefix="pressure-", dir="/tmp")
    env = dict(os.environ, FORESTALL__COLLECTOR__ENABLED="false")
    env.update(kv.split("=", 1) for kv in a.env)
    server = subprocess.Popen(
        ["sh", "-c", 'echo $$ > "$0" && exec "$@"', os.path.join(d, files["procs"]),
         a.forestall, "serve", "--http-addr", "127.0.0.1:0", "--pg-addr", "127.0.0.1:0",
         "--data-dir", data_dir],
        stdout=subprocess.PIPE, stderr=open(data_dir + ".log", "w"), env=env, text=True)
    for out in server.stdout:
        if out.startswith("forestall listening on http://"):
            host, port = out.split("http://")[1].strip().split(":")
            break
    else:
        sys.exit("the server did not start; see %s.log" % data_dir)
    port = int(port)
    try:
        ok = run(a, host, port, server, v2, d, files, data_dir)
    finally:
        if server.poll() is None:
            server.terminate()
            server.wait()
        os.rmdir(d)
        # The data (about 1 GB a run) goes; the server's log stays.
        shutil.rmtree(data_dir, ignore_errors=True)
    sys.exit(0 if ok else 1)


def run(a, host, port, server, v2, d, files, data_dir):
    lock = threading.Lock()
    statuses, acked, retries = {}, [0], [0]
    lines = open(a.data, "rb")
    done = threading.Event()

    def next_batch():
        with lock:
            batch = [lines.readline() for _ in range(a.batch)]
        return b"".join(l for l in batch if l)

    def writer():
        conn = http.client.HTTPConnection(host, port, timeout=600)
        while True:
            body = next_batch()
            if not body:
                return
            n = body.count(b"\n")
            while True:
                try:
                    conn.request("POST", "/api/v2/write", body=body)
                    r = conn.getresponse()
                    text = r.read()
                except (OSError, http.client.HTTPException) as e:
                    with lock:
                        statuses[type(e).__name__] = statuses.get(type(e).__name__, 0) + 1
                    if server.poll() is not None:
                        return  # killed
                    conn = http.client.HTTPConnection(host, port, timeout=600)
                    time.sleep(1)
                    continue
                with lock:
                    statuses[r.status] = statuses.get(r.status, 0) + 1
                if r.status == 204:
                    with lock:
                        acked[0] += n
                    break
                if r.status in (503, 507, 429):
                    with lock:
                        retries[0] += 1
                    time.sleep(float(r.getheader("Retry-After") or 1))
                    continue
                print("write refused:", r.status, text[:300], file=sys.stderr)
                break

    queries = {}

    def querier():
        conn = http.client.HTTPConnection(host, port, timeout=600)
        i = 0
        while not done.is_set():
            q = HEAVY[a.only] if a.only is not None else HEAVY[i % len(HEAVY)]
            i += 1
            try:
                conn.request("POST", "/api/v3/query_sql", body=json.dumps({"q": q}),
                             headers={"Content-Type": "application/json"})
                r = conn.getresponse()
                text = r.read().decode(errors="replace")
                key = str(r.status)
                if r.status == 400 and "resources exhausted" in text:
                    key = "400 resources exhausted"
                elif r.status != 200:
                    key = "%d %s" % (r.status, text[:120])
            except (OSError, http.client.HTTPException) as e:
                key = type(e).__name__
                if server.poll() is not None:
                    return
                conn = http.client.HTTPConnection(host, port, timeout=600)
                time.sleep(1)
            with lock:
                queries[key] = queries.get(key, 0) + 1

    peak = {"cgroup": 0, "rss_kb": 0}

    def monitor():
        while not done.is_set():
            peak["cgroup"] = max(peak["cgroup"], int(read(os.path.join(d, files["usage"]), "0")))
            peak["rss_kb"] = max(peak["rss_kb"], status_kb(server.pid, "VmHWM"))
            time.sleep(0.2)


    started = time.time()
    threads = [threading.Thread(target=writer) for _ in range(a.clients)]
    extra = [threading.Thread(target=querier) for _ in range(a.queriers)]
    extra.append(threading.Thread(target=monitor))
    for t in threads + extra:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.time() - started
    done.set()
    for t in extra:
        t.join()
    alive = server.poll() is None
    stored = None
    if alive:
        conn = http.client.HTTPConnection(host, port, timeout=600)
        conn.request("POST", "/api/v3/query_sql?format=json",
                     body=json.dumps({"q": "SELECT count(*) AS n FROM cpu"}),
                     headers={"Content-Type": "application/json"})
        answer = json.loads(conn.getresponse().read())
        stored = answer[0]["n"] if isinstance(answer, list) and answer else answer
    cgroup_peak = int(read(os.path.join(d, files["peak"]), "0") or 0)
    rss_peak = status_kb(server.pid, "VmHWM") if alive else peak["rss_kb"]
    report = {
        "limit_mib": a.limit_mib,
        "seconds": round(elapsed, 1),
        "lines_acknowledged": acked[0],
        "values_per_second": round(acked[0] * 10 / elapsed),
        "write_statuses": statuses,
        "write_retries_after_backpressure": retries[0],
        "queries": queries,
        "oom_kills": oom_kills(v2, d),
        "server_alive": alive,
        "rows_stored": stored,
        "cgroup_peak_mib": round(max(cgroup_peak, peak["cgroup"]) / 2**20, 1),
        "server_peak_rss_mib": round(max(rss_peak, peak["rss_kb"]) / 1024, 1),
        "log": data_dir + ".log",
    }
    print(json.dumps(report, indent=2))
    return alive and report["oom_kills"] == 0 and stored == acked[0]


if __name__ == "__main__":
    main()
