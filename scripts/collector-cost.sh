#!/usr/bin/env bash
# The host collector's cost: an idle `forestall serve` with the collector on, then one with it
# off, each for SECS seconds (default 300), one after the other; prints each one's CPU
# (user + system, from /proc/<pid>/stat), its RSS at the end, and the collector's own CPU
# counter from /metrics. Usage: scripts/collector-cost.sh path/to/forestall [SECS] [INTERVAL]
set -euo pipefail
bin=${1:?path to the forestall binary}
secs=${2:-300}
interval=${3:-10s}
tick=$(getconf CLK_TCK)
run() {
  local enabled=$1 dir port pid t0 t1 rss metrics
  dir=$(mktemp -d)
  port=$((20000 + RANDOM % 20000))
  FORESTALL__COLLECTOR__ENABLED=$enabled FORESTALL__COLLECTOR__INTERVAL=$interval RUST_LOG=warn \
    "$bin" serve --data-dir "$dir" --http-addr "127.0.0.1:$port" --pg-addr 127.0.0.1:0 >/dev/null 2>&1 &
  pid=$!
  for _ in $(seq 300); do curl -sf "http://127.0.0.1:$port/health" >/dev/null && break; sleep 0.1; done
  sleep 2
  t0=$(awk '{print $14 + $15}' "/proc/$pid/stat")
  sleep "$secs"
  t1=$(awk '{print $14 + $15}' "/proc/$pid/stat")
  rss=$(awk '/VmRSS/ {print $2}' "/proc/$pid/status")
  metrics=$(curl -sf "http://127.0.0.1:$port/metrics" | grep -E '^forestall_collector_(collections|cpu_microseconds)_total' | tr '\n' ' ')
  kill "$pid"; wait "$pid" || true
  rm -rf "$dir"
  awk -v e="$enabled" -v d=$((t1 - t0)) -v hz="$tick" -v s="$secs" -v rss="$rss" -v m="$metrics" \
    'BEGIN { printf "collector %-5s: %.3f %% of a core over %d s (%d ticks), RSS %.1f MiB; %s\n", e, 100 * d / hz / s, s, d, rss / 1024, m }'
}
run true
run false
