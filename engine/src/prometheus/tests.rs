use super::*;
use crate::line_protocol::{FieldValue, Precision, parse_lines};

/// A line parsed back: (measurement, sorted tags, value, time in ns).
type Row = (String, Vec<(String, String)>, f64, i64);

/// The lines of a conversion, parsed back; and its lines already parsed, checked to be
/// exactly what parsing the text gives.
fn parsed(c: &Converted<'_>) -> Vec<Row> {
    let direct: Vec<_> = c.parsed().collect();
    let read: Vec<_> = parse_lines(c.lines.as_bytes(), Precision::Milliseconds, 0).collect();
    assert_eq!(direct, read, "{}", c.lines);
    parse_lines(c.lines.as_bytes(), Precision::Milliseconds, 0)
        .map(|l| {
            let l = l.unwrap_or_else(|e| panic!("{e}: {}", c.lines));
            let mut tags: Vec<_> = l
                .tags
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
            tags.sort();
            assert_eq!(l.fields.len(), 1);
            assert_eq!(l.fields[0].0, "value");
            let FieldValue::Float(v) = l.fields[0].1 else {
                panic!("{:?}", l.fields)
            };
            (l.measurement.to_string(), tags, v, l.timestamp)
        })
        .collect()
}

fn tags(t: &[(&str, &str)]) -> Vec<(String, String)> {
    t.iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

#[test]
fn the_metric_name_is_the_measurement_labels_are_tags_and_samples_are_values() {
    let request = encode(&[
        (
            // Labels in any order; an empty label is an absent one; values with the
            // characters line protocol escapes.
            vec![
                ("job", "node exporter"),
                ("__name__", "node_cpu_seconds_total"),
                ("mode", "user,system=x"),
                ("empty", ""),
            ],
            // Out of order, negative and fractional values.
            vec![
                (12.5, 1_700_000_001_000),
                (-3.0, 1_700_000_000_000),
                (1e-9, 5),
            ],
        ),
        (vec![("__name__", "up")], vec![(1.0, 1_700_000_000_500)]),
    ]);
    let c = convert(&request).unwrap();
    assert_eq!((c.series, c.samples, c.rejected_series), (2, 4, 0));
    let rows = parsed(&c);
    let cpu = tags(&[("job", "node exporter"), ("mode", "user,system=x")]);
    assert_eq!(
        rows,
        vec![
            (
                "node_cpu_seconds_total".into(),
                cpu.clone(),
                12.5,
                1_700_000_001_000_000_000
            ),
            (
                "node_cpu_seconds_total".into(),
                cpu.clone(),
                -3.0,
                1_700_000_000_000_000_000
            ),
            ("node_cpu_seconds_total".into(), cpu, 1e-9, 5_000_000),
            ("up".into(), vec![], 1.0, 1_700_000_000_500_000_000),
        ]
    );
}

#[test]
fn stale_markers_nan_and_infinities_are_counted_and_not_stored() {
    let stale = f64::from_bits(STALE_NAN_BITS);
    assert!(stale.is_nan());
    let request = encode(&[(
        vec![("__name__", "m")],
        vec![
            (1.0, 1),
            (stale, 2),
            (f64::NAN, 3),
            (f64::INFINITY, 4),
            (f64::NEG_INFINITY, 5),
            (2.0, 6),
        ],
    )]);
    let c = convert(&request).unwrap();
    assert_eq!((c.samples, c.stale_markers, c.non_finite), (2, 1, 3));
    let values: Vec<f64> = parsed(&c).iter().map(|r| r.2).collect();
    assert_eq!(values, [1.0, 2.0]);
}

#[test]
fn a_series_that_cannot_be_named_is_rejected_and_the_others_are_kept() {
    let request = encode(&[
        (vec![("job", "x")], vec![(1.0, 1)]),
        (vec![("__name__", "")], vec![(1.0, 1)]),
        (vec![("__name__", "m"), ("path", "a\nb")], vec![(1.0, 1)]),
        (
            vec![("__name__", "m"), ("a", "1"), ("a", "2")],
            vec![(1.0, 1)],
        ),
        (vec![("__name__", "m"), ("", "1")], vec![(1.0, 1)]),
        (vec![("__name__", "#m")], vec![(1.0, 1)]),
        (vec![("__name__", "m"), ("a:b", "1")], vec![(1.0, 1)]),
        (vec![("__name__", "ok:rate5m")], vec![(7.0, 1)]),
        (vec![("__name__", "m"), ("path", "a\tb")], vec![(1.0, 1)]),
    ]);
    let c = convert(&request).unwrap();
    assert_eq!((c.series, c.rejected_series, c.samples), (9, 8, 1));
    assert!(
        c.rejected[0].contains("without a metric name"),
        "{:?}",
        c.rejected
    );
    assert!(c.rejected[2].contains("line break"), "{:?}", c.rejected);
    assert!(
        c.rejected[7].contains("line break or tab"),
        "{:?}",
        c.rejected
    );
    assert!(c.rejected[3].contains("\"a\" twice"), "{:?}", c.rejected);
    assert!(
        c.rejected[4].contains("\"\" is not a label name"),
        "{:?}",
        c.rejected
    );
    assert!(
        c.rejected[5].contains("\"#m\" is not a metric name"),
        "{:?}",
        c.rejected
    );
    assert!(
        c.rejected[6].contains("\"a:b\" is not a label name"),
        "{:?}",
        c.rejected
    );
    assert_eq!(parsed(&c)[0].0, "ok:rate5m");
}

#[test]
fn unknown_fields_metadata_exemplars_and_histograms_are_skipped() {
    let mut request = encode(&[(vec![("__name__", "m")], vec![(1.0, 1)])]);
    // Metadata (3), an unknown varint field (15) and an unknown fixed32 (16) at the top.
    request.extend_from_slice(&[(3 << 3) | 2, 2, 0x08, 0x01]);
    request.extend_from_slice(&[15 << 3, 0x96, 0x01]);
    request.extend_from_slice(&[0x85, 0x01, 1, 2, 3, 4]);
    // A series with an exemplar (3) and a native histogram (4) beside its sample.
    let mut series = encode(&[(vec![("__name__", "h")], vec![(2.0, 2)])]);
    let inner_len = series[1] as usize;
    let mut inner = series.split_off(2);
    assert_eq!(inner.len(), inner_len);
    inner.extend_from_slice(&[(3 << 3) | 2, 0]);
    inner.extend_from_slice(&[(4 << 3) | 2, 1, 0x00]);
    request.push((1 << 3) | 2);
    request.push(inner.len() as u8);
    request.extend_from_slice(&inner);
    let c = convert(&request).unwrap();
    assert_eq!((c.series, c.samples, c.histograms), (2, 2, 1));
    let names: Vec<String> = parsed(&c).into_iter().map(|r| r.0).collect();
    assert_eq!(names, ["h", "m"], "in metric-name order");
}

#[test]
fn malformed_requests_are_rejected_whole() {
    let cases: &[(&str, Vec<u8>)] = &[
        ("a truncated varint", vec![0x0a, 0x80]),
        ("a length past the end", vec![0x0a, 0x05, 0x01]),
        ("a huge length", {
            let mut v = vec![0x0a];
            v.extend_from_slice(&[0xff; 9]);
            v.push(0x01);
            v
        }),
        ("a varint of 11 bytes", {
            let mut v = vec![0x08];
            v.extend_from_slice(&[0xff; 10]);
            v.push(0x01);
            v
        }),
        ("a series as a varint", vec![0x08, 0x01]),
        ("a group", vec![(1 << 3) | 3]),
        ("field number 0", vec![0x00, 0x00]),
        ("a label as a varint", vec![0x0a, 0x02, 0x08, 0x01]),
        (
            "a sample value as a varint",
            vec![0x0a, 0x04, 0x12, 0x02, 0x08, 0x01],
        ),
        (
            "a label not UTF-8",
            vec![0x0a, 0x06, 0x0a, 0x04, 0x0a, 0x02, 0xff, 0xfe],
        ),
    ];
    for (what, bytes) in cases {
        assert!(convert(bytes).is_err(), "{what}: {:?}", convert(bytes));
    }
    assert_eq!(convert(&[]).unwrap(), Converted::default());
}

#[test]
fn every_truncation_and_random_input_fails_cleanly_or_keeps_whole_series() {
    let request = encode(&[
        (
            vec![("__name__", "a"), ("k", "v")],
            vec![(1.0, 1), (2.0, 2)],
        ),
        (vec![("__name__", "b")], vec![(3.0, 3)]),
    ]);
    let whole = convert(&request).unwrap();
    for cut in 0..request.len() {
        // A cut at a series boundary is a shorter valid request; anywhere else it is an
        // error. Never a panic, never a partial series.
        if let Ok(c) = convert(&request[..cut]) {
            assert!(whole.lines.starts_with(&c.lines), "cut {cut}: {c:?}");
            assert!(
                c.lines.is_empty() || c.lines.lines().count() == 2,
                "cut {cut}: {c:?}"
            );
        }
    }
    let mut seed = 7u64;
    for _ in 0..20_000 {
        let len = (seed % 64) as usize;
        let bytes: Vec<u8> = (0..len)
            .map(|_| {
                seed = seed
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                (seed >> 56) as u8
            })
            .collect();
        if let Ok(c) = convert(&bytes) {
            // Whatever decodes is valid line protocol.
            parsed(&c);
        }
    }
}

/// A mutation of a valid request: bytes changed, cut out or put in at random places.
#[derive(Debug, Clone)]
enum Mutation {
    Set(usize, u8),
    Remove(usize, usize),
    Insert(usize, Vec<u8>),
}

fn mutation() -> impl proptest::strategy::Strategy<Value = Mutation> {
    use proptest::prelude::*;
    prop_oneof![
        (any::<usize>(), any::<u8>()).prop_map(|(at, b)| Mutation::Set(at, b)),
        (any::<usize>(), 1usize..6).prop_map(|(at, n)| Mutation::Remove(at, n)),
        (
            any::<usize>(),
            proptest::collection::vec(
                prop_oneof![Just(0x0a), Just(0x12), Just(0xff), Just(0x80), any::<u8>()],
                1..6
            )
        )
            .prop_map(|(at, b)| Mutation::Insert(at, b)),
    ]
}

fn mutate(bytes: &mut Vec<u8>, m: &Mutation) {
    if bytes.is_empty() {
        return;
    }
    match m {
        Mutation::Set(at, b) => {
            let at = at % bytes.len();
            bytes[at] = *b;
        }
        Mutation::Remove(at, n) => {
            let at = at % bytes.len();
            bytes.drain(at..(at + n).min(bytes.len()));
        }
        Mutation::Insert(at, b) => {
            let at = at % (bytes.len() + 1);
            bytes.splice(at..at, b.iter().copied());
        }
    }
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(2048))]

    /// Mutated remote-write requests (valid ones with bytes changed, removed or inserted,
    /// up to four times): never a panic; either an error or a conversion whose lines are
    /// valid line protocol, each a whole sample of a named series.
    #[test]
    fn mutated_requests_fail_cleanly_or_convert_to_valid_lines(
        series in proptest::collection::vec(
            (
                "[a-z_]{1,8}",
                proptest::collection::vec(("[a-z]{1,4}", "[ -~]{0,6}"), 0..3),
                proptest::collection::vec((proptest::num::f64::ANY, proptest::num::i64::ANY), 1..4),
            ),
            1..4,
        ),
        mutations in proptest::collection::vec(mutation(), 1..5),
    ) {
        let owned: Vec<Series<'_>> = series
            .iter()
            .map(|(name, labels, samples)| {
                let mut l: Vec<(&str, &str)> = vec![("__name__", name.as_str())];
                l.extend(labels.iter().map(|(k, v)| (k.as_str(), v.as_str())));
                (l, samples.clone())
            })
            .collect();
        let mut request = encode(&owned);
        for m in &mutations {
            mutate(&mut request, m);
        }
        if let Ok(c) = convert(&request) {
            // The lines as given are the lines as read back; each is a sample of a named
            // series, or (a timestamp beyond what nanoseconds hold) a line the store refuses.
            let direct: Vec<_> = c.parsed().collect();
            let read: Vec<_> = parse_lines(c.lines.as_bytes(), Precision::Milliseconds, 0).collect();
            proptest::prop_assert_eq!(&direct, &read);
            proptest::prop_assert_eq!(direct.len(), c.samples);
            for line in direct {
                match line {
                    Ok(l) => proptest::prop_assert!(!l.measurement.is_empty() && l.fields.len() == 1),
                    Err(e) => proptest::prop_assert!(e.reason.contains("out of range"), "{e}"),
                }
            }
        }
    }
}
