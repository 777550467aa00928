#!/usr/bin/env python3
"""The web console's first render with 1,000 series, in headless Chromium.

Starts `forestall serve` (the binary given) on an empty data directory, writes 1,000 series
(`cpu,host=h000..h999 usage_user`, two hours every 10 s: 720,000 rows), then loads the
console in Chromium over WebDriver (chromedriver) N times and prints, for each load, the
time from navigation start until the first chart is drawn (the console sets
`window.__consoleRendered` then): the page, the measurement list, the 1,000-series list, the
first series' points and anomaly scores, and its forecast.

    python3 scripts/console-render.py $CARGO_TARGET_DIR/release/forestall [N]
"""
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def call(method, url, body=None):
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method,
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as r:
        return json.loads(r.read() or b"null")


def wait(url, seconds=60):
    deadline = time.time() + seconds
    while True:
        try:
            urllib.request.urlopen(url, timeout=2).read()
            return
        except Exception:
            if time.time() > deadline:
                raise
            time.sleep(0.1)


def main():
    binary = sys.argv[1]
    loads = int(sys.argv[2]) if len(sys.argv) > 2 else 5
    data = tempfile.mkdtemp(prefix="forestall-console-")
    http, pg = free_port(), free_port()
    env = dict(os.environ, FORESTALL__COLLECTOR__ENABLED="false")
    server = subprocess.Popen([binary, "serve", "--data-dir", data,
                               "--http-addr", f"127.0.0.1:{http}", "--pg-addr", f"127.0.0.1:{pg}"],
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{http}"
    driver = None
    try:
        wait(base + "/health")
        now = int(time.time())
        for h in range(1000):
            lines = "".join(f"cpu,host=h{h:03} usage_user={50 + (h % 17) + (k % 60) / 6} {now - 7200 + k * 10}\n"
                            for k in range(720))
            urllib.request.urlopen(urllib.request.Request(
                base + "/api/v2/write?precision=s", data=lines.encode(), method="POST")).read()
        port = free_port()
        driver = subprocess.Popen(["chromedriver", f"--port={port}"],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wd = f"http://127.0.0.1:{port}"
        wait(wd + "/status")
        session = call("POST", wd + "/session", {"capabilities": {"alwaysMatch": {
            "goog:chromeOptions": {"binary": "/usr/bin/chromium", "args": [
                "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1280,900"]}}}})["value"]["sessionId"]
        s = f"{wd}/session/{session}"
        times = []
        for _ in range(loads):
            call("POST", s + "/url", {"url": "about:blank"})
            call("POST", s + "/url", {"url": base + "/"})
            deadline = time.time() + 120
            while True:
                v = call("POST", s + "/execute/sync", {"script":
                    "return window.__consoleRendered && document.querySelectorAll('#chart circle.point').length"
                    " ? [window.__consoleRendered, document.querySelectorAll('#series option').length] : null",
                    "args": []})["value"]
                if v:
                    break
                if time.time() > deadline:
                    raise SystemExit("the console did not render within 120 s")
                time.sleep(0.05)
            times.append(v[0])
            print(f"first render {v[0]:.0f} ms ({v[1]} series listed)")
        print(f"median of {loads}: {statistics.median(times):.0f} ms")
        call("DELETE", s)
    finally:
        if driver:
            driver.kill()
        server.terminate()
        server.wait()


if __name__ == "__main__":
    main()
