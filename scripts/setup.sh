#!/usr/bin/env bash
# Installs what building and testing Forestall needs on a fresh Debian machine: Debian's
# RocksDB (linked instead of compiling its C++; see ../shared/BUILD.md), libclang for bindgen,
# the real clients the tests drive (psql, curl, and psycopg from PyPI or Debian), openssl for
# the TLS tests' certificates, iproute2 (ip, tc) and util-linux (unshare) for the
# network-namespace tests, Prometheus with
# node_exporter for the remote-write test, the official influxdb-client and DuckDB (PyPI), and
# Chromium with its WebDriver for the web console's test.
# Idempotent: does nothing when everything is already there.
set -euo pipefail

need=()
for pkg in librocksdb-dev libclang-dev; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || need+=("$pkg")
done
command -v psql >/dev/null || need+=(postgresql-client)
command -v curl >/dev/null || need+=(curl)
# Certificates for the TLS tests.
command -v openssl >/dev/null || need+=(openssl)
{ command -v tc && command -v ip; } >/dev/null || need+=(iproute2)
command -v python3 >/dev/null || need+=(python3)
command -v unshare >/dev/null || need+=(util-linux)
# A real Prometheus and node_exporter for the remote-write test.
command -v prometheus >/dev/null || need+=(prometheus)
command -v prometheus-node-exporter >/dev/null || need+=(prometheus-node-exporter)
# Headless Chromium and its WebDriver for the web console's test.
command -v chromium >/dev/null || need+=(chromium)
command -v chromedriver >/dev/null || need+=(chromium-driver)
if [ ${#need[@]} -gt 0 ]; then
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  echo "setup: installing ${need[*]}" >&2
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${need[@]}" >/dev/null
fi
if ! python3 -c 'import psycopg' 2>/dev/null; then
  echo "setup: installing psycopg" >&2
  # pip where Python allows it; Debian's own Python is externally managed, so apt there.
  python3 -m pip install -q --disable-pip-version-check psycopg >&2 2>/dev/null \
    || { sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo"
         $sudo apt-get update -qq
         DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq python3-psycopg >/dev/null; }
  python3 -c 'import psycopg' || { echo "setup: psycopg is still missing" >&2; exit 1; }
fi
# From PyPI only: the official InfluxDB v2 client, and DuckDB, the differential SQL test's
# reference engine.
for module in influxdb_client:influxdb-client duckdb:duckdb; do
  python3 -c "import ${module%%:*}" 2>/dev/null && continue
  package="${module##*:}"
  echo "setup: installing $package" >&2
  if ! python3 -m pip --version >/dev/null 2>&1; then
    # Debian's Python comes without pip.
    sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq python3-pip >/dev/null
  fi
  # Debian's externally managed Python needs pip told so.
  python3 -m pip install -q --disable-pip-version-check "$package" >&2 2>/dev/null \
    || python3 -m pip install -q --disable-pip-version-check --break-system-packages "$package" >&2
  python3 -c "import ${module%%:*}" || { echo "setup: $package is still missing" >&2; exit 1; }
done
command -v cargo >/dev/null || { echo "setup: cargo is missing; install Rust with rustup" >&2; exit 1; }
