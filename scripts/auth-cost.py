#!/usr/bin/env python3
# The auth layer's cost per request: a release `forestall serve` with and without --auth, three
# rounds each; the median time of 300 writes of 1,000 lines and of 1,000 small GETs.
# Usage: python3 scripts/auth-cost.py target/release/forestall
import subprocess, sys, time, os, tempfile, urllib.request, re, json, statistics
binary = sys.argv[1]
def run(auth):
    d = tempfile.mkdtemp()
    args = [binary, "serve", "--http-addr", "127.0.0.1:0", "--pg-addr", "127.0.0.1:0", "--data-dir", d]
    if auth: args.append("--auth")
    env = dict(os.environ, FORESTALL__COLLECTOR__ENABLED="false")
    p = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env, text=True)
    url = None
    for line in p.stdout:
        if line.startswith("forestall listening on http://"):
            url = line.split("on ")[1].strip(); break
    headers = {}
    if auth:
        out = subprocess.run([binary, "token", "create", "--host", url, "--name", "w", "--admin"], capture_output=True, text=True)
        headers["Authorization"] = "Bearer " + out.stdout.strip()
    times = []
    for r in range(300):
        body = "\n".join(f"cpu,host=h{i%100} u={i} {1767225600000000000 + (r*1000+i)*1000000}" for i in range(1000)).encode()
        req = urllib.request.Request(url + "/api/v2/write", data=body, headers=headers, method="POST")
        t = time.perf_counter(); urllib.request.urlopen(req).read(); times.append(time.perf_counter() - t)
    small = []
    for r in range(1000):
        req = urllib.request.Request(url + "/api/v1/continuous_queries", headers=headers)
        t = time.perf_counter(); urllib.request.urlopen(req).read(); small.append(time.perf_counter() - t)
    p.terminate(); p.wait()
    return statistics.median(times) * 1000, statistics.median(small) * 1e6
res = {False: [], True: []}
for i in range(3):
    for a in (False, True):
        res[a].append(run(a))
for a in (False, True):
    print("auth" if a else "open", "write 1000 lines median ms", [round(x[0], 3) for x in res[a]], "GET small median us", [round(x[1]) for x in res[a]])
