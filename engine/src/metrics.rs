//! The engine's own counters and gauges, read by the server's `/metrics`.

use std::sync::atomic::{AtomicU64, Ordering};

macro_rules! metrics {
    ($( $(#[doc = $doc:literal])* $name:ident : $kind:literal ),* $(,)?) => {
        /// Counters (monotonic) and gauges of one store. Cheap to update from any thread.
        #[derive(Debug, Default)]
        pub struct Metrics {
            $( $(#[doc = $doc])* pub $name: AtomicU64, )*
        }

        impl Metrics {
            /// Every metric as (name, help, kind, value); kind is `counter` or `gauge`.
            pub fn snapshot(&self) -> Vec<(&'static str, &'static str, &'static str, u64)> {
                vec![$( (
                    concat!("forestall_", stringify!($name)),
                    concat!($($doc),*).trim_ascii(),
                    $kind,
                    self.$name.load(Ordering::Relaxed),
                ), )*]
            }
        }
    };
}

metrics! {
    /// Lines (points) accepted and made durable.
    points_written_total: "counter",
    /// Field values accepted (a point with ten fields counts ten).
    values_written_total: "counter",
    /// Line protocol bytes accepted, after decompression.
    bytes_written_total: "counter",
    /// Lines rejected, each with its reason.
    lines_rejected_total: "counter",
    /// Prometheus remote write samples stored.
    remote_write_samples_total: "counter",
    /// Prometheus remote write stale markers, dropped (there is no staleness to record).
    remote_write_stale_markers_total: "counter",
    /// Prometheus remote write NaN and ±Inf samples, dropped.
    remote_write_non_finite_total: "counter",
    /// Prometheus remote write native histogram samples, dropped (not stored yet).
    remote_write_histograms_dropped_total: "counter",
    /// Prometheus remote write series rejected (no or invalid names), each with its reason.
    remote_write_series_rejected_total: "counter",
    /// Scrapes of `[[scrape]]` targets made.
    scrapes_total: "counter",
    /// Scrapes that failed (`up` 0): no answer, a status other than 200, a timeout, a body
    /// over the limit or text that is not an exposition.
    scrape_failures_total: "counter",
    /// Samples read by scrapes.
    scrape_samples_total: "counter",
    /// Host collections made (`[collector]`).
    collector_collections_total: "counter",
    /// Host collector sources that could not be read or written, one per source and
    /// collection.
    collector_problems_total: "counter",
    /// CPU time the host collector has used, reading and writing, in microseconds.
    collector_cpu_microseconds_total: "counter",
    /// Records appended to the WAL.
    wal_records_total: "counter",
    /// Bytes appended to the WAL.
    wal_bytes_total: "counter",
    /// fsync calls on WAL files (one serves every request of a group commit).
    wal_syncs_total: "counter",
    /// Torn or corrupt WAL tails cut off during replay.
    wal_torn_tails_total: "counter",
    /// Buffer flushes completed.
    flushes_total: "counter",
    /// Segments written by flushes and compactions.
    segments_written_total: "counter",
    /// Bytes of segment files written.
    segment_bytes_written_total: "counter",
    /// Compactions completed.
    compactions_total: "counter",
    /// Segments removed by retention.
    retention_segments_dropped_total: "counter",
    /// Segment files that could not be read by a scan.
    segment_read_errors_total: "counter",
    /// Scans of a measurement started (a query starts one per table it reads; continuous
    /// queries folding the same rows share one).
    scans_total: "counter",
    /// Segments in the manifest.
    segments: "gauge",
    /// Bytes of the segments in the manifest.
    segment_bytes: "gauge",
    /// Rows held in the in-memory buffer (including frozen buffers being flushed).
    buffer_rows: "gauge",
    /// Approximate bytes held in the in-memory buffer.
    buffer_bytes: "gauge",
    /// Series known to the index.
    series: "gauge",
}

impl Metrics {
    /// Adds to a counter.
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    /// Sets a gauge.
    pub fn set(gauge: &AtomicU64, v: u64) {
        gauge.store(v, Ordering::Relaxed);
    }
}
