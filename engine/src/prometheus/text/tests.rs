use super::*;

fn labels<'a>(s: &'a Sample<'a>) -> Vec<(&'a str, &'a str)> {
    s.labels.iter().map(|(k, v)| (*k, v.as_ref())).collect()
}

#[test]
fn node_exporter_text_is_read_sample_by_sample() {
    let body = "# HELP node_cpu_seconds_total Seconds the CPUs spent in each mode.\n\
                # TYPE node_cpu_seconds_total counter\n\
                node_cpu_seconds_total{cpu=\"0\",mode=\"idle\"} 3.14159e+06\n\
                node_cpu_seconds_total{cpu=\"0\",mode=\"user\",} 42\n\
                \n\
                \t node_load1 0.25\n\
                node_boot_time_seconds 1.7e9 1700000000123\n\
                go_gc_duration_seconds{quantile=\"0.5\"} NaN\n\
                node_up{a = \"b\" , c=\"d\"}\t+Inf\t\n";
    let s = parse(body, Format::Text).unwrap();
    assert_eq!(s.len(), 6);
    assert_eq!(s[0].name, "node_cpu_seconds_total");
    assert_eq!(labels(&s[0]), [("cpu", "0"), ("mode", "idle")]);
    assert_eq!(s[0].value, 3.14159e6);
    assert_eq!(s[0].timestamp_ms, None);
    assert_eq!(
        labels(&s[1]),
        [("cpu", "0"), ("mode", "user")],
        "a trailing comma"
    );
    assert_eq!((s[2].name, s[2].value), ("node_load1", 0.25));
    assert!(s[2].labels.is_empty());
    assert_eq!(s[3].timestamp_ms, Some(1_700_000_000_123));
    assert!(s[4].value.is_nan());
    assert_eq!(labels(&s[5]), [("a", "b"), ("c", "d")]);
    assert_eq!(s[5].value, f64::INFINITY);
}

#[test]
fn label_values_are_unescaped_and_borrowed_when_they_can_be() {
    let body = "m{path=\"C:\\\\dir\",msg=\"say \\\"hi\\\"\\nbye\",plain=\"x y,}{\"} -1.5e-3\n";
    let s = parse(body, Format::Text).unwrap();
    assert_eq!(
        labels(&s[0]),
        [
            ("path", "C:\\dir"),
            ("msg", "say \"hi\"\nbye"),
            ("plain", "x y,}{")
        ]
    );
    assert!(matches!(s[0].labels[2].1, Cow::Borrowed(_)));
    assert_eq!(s[0].value, -0.0015);
}

#[test]
fn openmetrics_has_second_timestamps_exemplars_and_an_eof() {
    let body = "# TYPE http_requests counter\n\
                # UNIT http_requests requests\n\
                http_requests_total{code=\"200\"} 17 1520879607.789 # {trace_id=\"KOO5S4vxi0o\"} 0.67\n\
                http_requests_created{code=\"200\"} 1520430000.123\n\
                up 1 # {a=\"b\"} 1\n\
                # EOF\n";
    let s = parse(body, Format::OpenMetrics).unwrap();
    assert_eq!(s.len(), 3);
    assert_eq!(s[0].timestamp_ms, Some(1_520_879_607_789));
    assert_eq!(s[0].value, 17.0);
    assert_eq!(s[1].timestamp_ms, None);
    assert_eq!(
        (s[2].name, s[2].value, s[2].timestamp_ms),
        ("up", 1.0, None)
    );
    // Without the final newline too.
    assert_eq!(parse("up 1\n# EOF", Format::OpenMetrics).unwrap().len(), 1);
    // The text format has no exemplars.
    assert!(parse("up 1 # {a=\"b\"} 1\n", Format::Text).is_err());
}

#[test]
fn the_content_type_names_the_format() {
    let of = |t| Format::of_content_type(t);
    assert_eq!(
        of(Some(
            "application/openmetrics-text; version=1.0.0; charset=utf-8"
        )),
        Format::OpenMetrics
    );
    assert_eq!(of(Some("text/plain; version=0.0.4")), Format::Text);
    assert_eq!(of(Some("application/json")), Format::Text);
    assert_eq!(of(None), Format::Text);
}

#[test]
fn a_malformed_line_fails_the_exposition_and_says_where() {
    let fails = |body: &str, format, line, why: &str| {
        let e = parse(body, format).unwrap_err();
        assert_eq!(e.line, line, "{body:?}: {e}");
        assert!(e.reason.contains(why), "{body:?}: {e}");
    };
    let t = Format::Text;
    fails("up 1\n{a=\"b\"} 1\n", t, 2, "starts with a metric name");
    fails("9lives 1\n", t, 1, "starts with a metric name");
    fails("m{a=\"b} 1\n", t, 1, "closing quote is missing");
    fails("m{a=b} 1\n", t, 1, "double quotes");
    fails("m{a} 1\n", t, 1, "has no =");
    fails("m{=\"b\"} 1\n", t, 1, "label name was expected");
    fails("m{a=\"b\" c=\"d\"} 1\n", t, 1, "go on with ,");
    fails("m{a=\"\\t\"} 1\n", t, 1, "unknown escape");
    fails("m{a=\"b\\", t, 1, "closing quote is missing");
    fails("m\n", t, 1, "a blank and a value");
    fails("m{a=\"b\"}1\n", t, 1, "a blank and a value");
    fails("m 1O\n", t, 1, "is not a number");
    fails("m 0x1p3\n", t, 1, "is not a number");
    fails("m infinit\n", t, 1, "is not a number");
    fails("m 1 1.5\n", t, 1, "integer milliseconds");
    fails("m 1 2 3\n", t, 1, "unexpected \"3\"");
    fails(
        "<html><body>502 Bad Gateway</body></html>\n",
        t,
        1,
        "metric name",
    );
    let om = Format::OpenMetrics;
    fails("up 1\n", om, 2, "ends with # EOF");
    fails("up 1\n# EOF\nup 2\n", om, 3, "after the # EOF");
    fails("up 1\n\n# EOF\n", om, 2, "empty line");
    fails("up 1 soon\n# EOF\n", om, 1, "number of seconds");
    fails("up 1 1e300\n# EOF\n", om, 1, "number of seconds");
}

#[test]
fn nothing_to_read_is_no_samples() {
    assert_eq!(parse("", Format::Text).unwrap(), []);
    assert_eq!(parse("# just a comment\n\n", Format::Text).unwrap(), []);
    assert_eq!(parse("# EOF\n", Format::OpenMetrics).unwrap(), []);
}
