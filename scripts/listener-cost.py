#!/usr/bin/env python3
# What a request costs through the HTTP listener, for two `forestall` binaries side by side
# (A and B, in turn, three rounds): the median of 2,000 keep-alive GET /health, 1,000 keep-alive
# `SELECT 1` and 300 keep-alive writes of 1,000 lines, each over one connection, and A/B.
# Usage: python3 scripts/listener-cost.py BINARY_A BINARY_B
import http.client, os, statistics, subprocess, sys, tempfile, time, urllib.parse

def run(binary):
    d = tempfile.mkdtemp()
    args = [binary, "serve", "--http-addr", "127.0.0.1:0", "--pg-addr", "127.0.0.1:0", "--data-dir", d]
    env = dict(os.environ, FORESTALL__COLLECTOR__ENABLED="false")
    p = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env, text=True)
    for line in p.stdout:
        if line.startswith("forestall listening on http://"):
            host, port = line.split("http://")[1].strip().split(":")
            break
    conn = http.client.HTTPConnection(host, int(port))
    def timed(n, method, path, body=None):
        out = []
        for i in range(n):
            b = body(i) if body else None
            t = time.perf_counter()
            conn.request(method, path, body=b)
            r = conn.getresponse(); r.read()
            out.append(time.perf_counter() - t)
            assert r.status in (200, 204), r.status
        return statistics.median(out) * 1e6
    health = timed(2000, "GET", "/health")
    select1 = timed(1000, "GET", "/api/v3/query_sql?q=" + urllib.parse.quote("SELECT 1"))
    write = timed(300, "POST", "/api/v2/write", lambda r: "\n".join(
        f"cpu,host=h{i%100} u={i} {1767225600000000000 + (r*1000+i)*1000000}" for i in range(1000)).encode())
    conn.close(); p.terminate(); p.wait()
    return health, select1, write

a, b = sys.argv[1], sys.argv[2]
res = {a: [], b: []}
for _ in range(3):
    for binary in (a, b):
        res[binary].append(run(binary))
names = ["GET /health us", "SELECT 1 us", "write 1000 lines us"]
for k, name in enumerate(names):
    xa = [r[k] for r in res[a]]; xb = [r[k] for r in res[b]]
    ratios = [x / y for x, y in zip(xa, xb)]
    print(f"{name}: A {[round(x) for x in xa]} B {[round(x) for x in xb]} A/B {[round(r, 3) for r in ratios]} median {statistics.median(ratios):.3f}")
