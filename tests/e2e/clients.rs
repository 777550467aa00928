//! Line protocol from the official InfluxDB v2 Python client (`influxdb-client` from PyPI,
//! which scripts/setup.sh installs): its batching write API with gzip, its synchronous write
//! and its error on a partial write, against a real `forestall serve`.

use crate::harness::{Server, python_ok, sql};

const SCRIPT: &str = r#"
import sys
from influxdb_client import InfluxDBClient, Point, WritePrecision
from influxdb_client.client.write_api import SYNCHRONOUS, WriteOptions
from influxdb_client.rest import ApiException

url = sys.argv[1]
failures = []
with InfluxDBClient(url=url, token="any", org="any", enable_gzip=True) as client:
    # Batches of 250, gzip-compressed, flushed by size, by the interval and at close.
    with client.write_api(write_options=WriteOptions(batch_size=250, flush_interval=500,
                                                     max_retries=0)) as batched:
        for i in range(1000):
            p = (Point("client_cpu").tag("host", "h%d" % (i % 10)).tag("region", "eu west")
                 .field("usage", i / 10.0).field("count", i).time(1_700_000_000 + i, WritePrecision.S))
            batched.write(bucket="b", record=p, write_precision=WritePrecision.S)
        batched.write(bucket="b", record=["client_mem,host=h0 used=5i 1700000000000",
                                          "client_mem,host=h1 used=6i 1700000000001"],
                      write_precision=WritePrecision.MS)
    sync = client.write_api(write_options=SYNCHRONOUS)
    sync.write(bucket="b", record="client_cpu,host=h0 usage=99.5,count=7i 1700000999000000000")
    # A field whose type conflicts with the stored one: a 400 the client raises, and the
    # good line of the same request is stored.
    try:
        sync.write(bucket="b", record=["client_cpu,host=h0 usage=\"high\" 1700000999000000001",
                                       "client_cpu,host=h0 usage=1.0 1700000999000000002"])
        failures.append("a conflicting type was accepted")
    except ApiException as e:
        if e.status != 400 or "usage" not in (e.body or ""):
            failures.append("status %s body %r" % (e.status, e.body))
print("ok" if not failures else "; ".join(failures))
"#;

#[test]
fn the_official_influxdb_python_client_writes_in_batches_with_gzip() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), &[]);
    python_ok(
        SCRIPT,
        &[&format!("http://{}", server.addr)],
        "influxdb-client",
    );
    let rows = sql(
        &server,
        "SELECT count(*) AS n, count(DISTINCT host) AS hosts, max(\"count\") AS top, \
         sum(usage) AS total FROM client_cpu WHERE region = 'eu west'",
    );
    assert_eq!(rows[0]["n"], 1000, "{rows:?}");
    assert_eq!(rows[0]["hosts"], 10);
    assert_eq!(rows[0]["top"], 999);
    // Σ i/10 for i < 1000.
    assert!((rows[0]["total"].as_f64().unwrap() - 49_950.0).abs() < 1e-6);
    let rows = sql(
        &server,
        "SELECT CAST(time AS BIGINT) AS t, usage FROM client_cpu WHERE region IS NULL ORDER BY t",
    );
    let got: Vec<(i64, f64)> = rows
        .iter()
        .map(|r| (r["t"].as_i64().unwrap(), r["usage"].as_f64().unwrap()))
        .collect();
    assert_eq!(
        got,
        [
            (1_700_000_999_000_000_000, 99.5),
            (1_700_000_999_000_000_002, 1.0)
        ]
    );
    let mem = sql(&server, "SELECT sum(used) AS s FROM client_mem");
    assert_eq!(mem[0]["s"], 11);
    server.terminate();
}
