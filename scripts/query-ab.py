#!/usr/bin/env python3
"""Side-by-side query latency of two Forestall servers over the same data.

    python3 scripts/query-ab.py PORT_A PORT_B REPS QUERY[,QUERY...]

Serve two copies of one store (copy the data directory, remove `index/LOCK` from the copy)
with the two builds, each on its own `--http-addr` and `--pg-addr`. Every query is sent to
both servers, in alternating order, so that the machine's noise falls on both alike; the
medians and their ratio (B/A, below 1: B is faster) are printed per query. QUERY is one of
the names in Q below: TSBS cpu-only queries over 1,000 hosts on 2016-01-01.
"""
import http.client, time, sys, urllib.parse, statistics, random
pa, pb = int(sys.argv[1]), int(sys.argv[2])
reps = int(sys.argv[3]); only = sys.argv[4].split(",")
conns = {p: http.client.HTTPConnection("127.0.0.1", p) for p in (pa, pb)}
def q(p, sql):
    c = conns[p]
    c.request("GET", "/api/v3/query_sql?" + urllib.parse.urlencode({"q": sql, "format": "json"}))
    r = c.getresponse(); b = r.read()
    if r.status != 200: print(r.status, b[:300]); sys.exit(1)
    return b
def ts(h, m=0): return f"2016-01-01T{h:02d}:{m:02d}:00Z"
random.seed(1)
Q = {
 "select1": lambda: "SELECT 1",
 "single": lambda: (lambda h, s: f"SELECT date_bin(INTERVAL '1 minute', time) AS minute, max(usage_user) FROM cpu WHERE hostname = 'host_{h}' AND time >= '{ts(s)}' AND time < '{ts(s+1)}' GROUP BY 1 ORDER BY 1")(random.randrange(1000), random.randrange(23)),
 "count1": lambda: (lambda h, s: f"SELECT count(*) FROM cpu WHERE hostname = 'host_{h}' AND time >= '{ts(s)}' AND time < '{ts(s+1)}'")(random.randrange(1000), random.randrange(23)),
 "highcpu": lambda: (lambda h, s: f"SELECT * FROM cpu WHERE hostname = 'host_{h}' AND usage_user > 90 AND time >= '{ts(s)}' AND time < '{ts(s+12)}'")(random.randrange(1000), random.randrange(12)),
 "double": lambda: (lambda s: f"SELECT date_bin(INTERVAL '1 hour', time) AS hour, hostname, avg(usage_user) FROM cpu WHERE time >= '{ts(s)}' AND time < '{ts(s+12)}' GROUP BY 1, 2 ORDER BY 1, 2")(random.randrange(12)),
 "gol": lambda: (lambda m: f"SELECT date_bin(INTERVAL '1 minute', time) AS minute, max(usage_user) FROM cpu WHERE time >= '{ts(m//60, m%60)}' AND time < '{ts((m+5)//60, (m+5)%60)}' GROUP BY 1 ORDER BY 1 DESC LIMIT 5")(random.randrange(60, 1380)),
}
for name in only:
    f = Q[name]
    n = reps if name != "double" else max(5, reps // 5)
    for _ in range(3): s = f(); q(pa, s); q(pb, s)
    ta, tb = [], []
    for i in range(n):
        s = f()
        order = (pa, pb) if i % 2 == 0 else (pb, pa)
        for p in order:
            t0 = time.perf_counter(); q(p, s); dt = (time.perf_counter() - t0) * 1000
            (ta if p == pa else tb).append(dt)
    ma, mb = statistics.median(ta), statistics.median(tb)
    print(f"{name:8s} A {ma:8.2f} ms  B {mb:8.2f} ms  B/A {mb/ma:5.2f}")
