use super::*;
use proptest::prelude::*;

fn one(line: &str) -> ParsedLine<'_> {
    parse_line(line, Precision::Nanoseconds, 42).unwrap_or_else(|e| panic!("{line:?}: {e}"))
}

fn err(line: &str) -> String {
    parse_line(line, Precision::Nanoseconds, 42).expect_err(line)
}

#[test]
fn basic_line_with_tags_fields_and_timestamp() {
    let l = one("cpu,host=a,region=eu usage=0.5,count=3i,ok=true,name=\"x y\" 1700000000000000000");
    assert_eq!(l.measurement, "cpu");
    assert_eq!(l.series_raw, "cpu,host=a,region=eu");
    assert_eq!(
        l.tags,
        vec![("host".into(), "a".into()), ("region".into(), "eu".into())]
    );
    assert_eq!(
        l.fields,
        vec![
            ("usage".into(), FieldValue::Float(0.5)),
            ("count".into(), FieldValue::Integer(3)),
            ("ok".into(), FieldValue::Boolean(true)),
            ("name".into(), FieldValue::String("x y".into())),
        ]
    );
    assert_eq!(l.timestamp, 1_700_000_000_000_000_000);
}

#[test]
fn missing_timestamp_takes_the_default() {
    assert_eq!(one("cpu v=1").timestamp, 42);
    assert_eq!(one("cpu v=1   ").timestamp, 42);
}

#[test]
fn precision_scales_timestamps_and_overflow_is_an_error() {
    let l = parse_line("m v=1 1700000000", Precision::Seconds, 0).unwrap();
    assert_eq!(l.timestamp, 1_700_000_000_000_000_000);
    let l = parse_line("m v=1 1700000000000", Precision::Milliseconds, 0).unwrap();
    assert_eq!(l.timestamp, 1_700_000_000_000_000_000);
    let l = parse_line("m v=1 -5", Precision::Microseconds, 0).unwrap();
    assert_eq!(l.timestamp, -5_000);
    let e = parse_line("m v=1 9223372036854775807", Precision::Seconds, 0).unwrap_err();
    assert!(e.contains("out of range"), "{e}");
    for (text, p) in [
        ("ns", 1),
        ("n", 1),
        ("us", 1_000),
        ("u", 1_000),
        ("ms", 1_000_000),
        ("s", 1_000_000_000),
        ("m", 60_000_000_000),
        ("h", 3_600_000_000_000),
    ] {
        assert_eq!(Precision::parse(text).unwrap().multiplier(), p, "{text}");
    }
    assert_eq!(Precision::parse("days"), None);
    for code in 0..6 {
        assert_eq!(Precision::from_code(code).unwrap().code(), code);
    }
}

#[test]
fn every_boolean_spelling() {
    for t in ["t", "T", "true", "True", "TRUE"] {
        assert_eq!(
            one(&format!("m b={t}")).fields[0].1,
            FieldValue::Boolean(true),
            "{t}"
        );
    }
    for f in ["f", "F", "false", "False", "FALSE"] {
        assert_eq!(
            one(&format!("m b={f}")).fields[0].1,
            FieldValue::Boolean(false),
            "{f}"
        );
    }
    assert!(err("m b=tRUE").contains("invalid number"));
    assert!(err("m b=yes").contains("invalid number"));
}

#[test]
fn numbers() {
    assert_eq!(one("m v=1").fields[0].1, FieldValue::Float(1.0));
    assert_eq!(one("m v=-1.5e3").fields[0].1, FieldValue::Float(-1500.0));
    assert_eq!(one("m v=.5").fields[0].1, FieldValue::Float(0.5));
    assert_eq!(one("m v=5.").fields[0].1, FieldValue::Float(5.0));
    assert_eq!(one("m v=1E-2").fields[0].1, FieldValue::Float(0.01));
    assert_eq!(
        one("m v=-9223372036854775808i").fields[0].1,
        FieldValue::Integer(i64::MIN)
    );
    assert_eq!(
        one("m v=18446744073709551615u").fields[0].1,
        FieldValue::UInteger(u64::MAX)
    );
    assert!(err("m v=9223372036854775808i").contains("out of range"));
    assert!(err("m v=18446744073709551616u").contains("out of range"));
    assert!(err("m v=-1u").contains("invalid unsigned"));
    assert!(err("m v=1.5i").contains("invalid integer"));
    assert!(err("m v=i").contains("invalid integer"));
    for bad in [
        "NaN",
        "inf",
        "-Infinity",
        "1e",
        "1.2.3",
        "0x10",
        "1_000",
        ".",
    ] {
        assert!(
            err(&format!("m v={bad}")).contains("invalid number"),
            "{bad}"
        );
    }
    assert!(err("m v=1e999").contains("out of range"));
}

#[test]
fn strings_and_their_escapes() {
    let l = one(r#"m s="a \"quoted\" \\ back\slash, with = and space""#);
    assert_eq!(
        l.fields[0].1,
        FieldValue::String(r#"a "quoted" \ back\slash, with = and space"#.into())
    );
    assert_eq!(one(r#"m s="""#).fields[0].1, FieldValue::String("".into()));
    assert!(matches!(
        one("m s=\"plain\"").fields[0].1,
        FieldValue::String(Cow::Borrowed("plain"))
    ));
    assert!(err(r#"m s="open"#).contains("unterminated string"));
    assert!(err(r#"m s="a"b"#).contains("after field value"));
}

#[test]
fn escapes_in_names() {
    let l = one(r"my\ meas\,ure=x,t\ k\=1=v\,a\ l\=ue f\ \,\=k=1i");
    assert_eq!(l.measurement, "my meas,ure=x");
    assert_eq!(l.tags, vec![("t k=1".into(), "v,a l=ue".into())]);
    assert_eq!(l.fields[0].0, "f ,=k");
    // A backslash before an ordinary character is literal, and `\\` is one backslash.
    let l = one(r"m\x,t=a\b\\c f=1");
    assert_eq!(l.measurement, r"m\x");
    assert_eq!(l.tags[0].1, r"a\b\c");
    // Unescaped names are borrowed, not copied.
    let l = one("cpu,host=a v=1");
    assert!(matches!(l.measurement, Cow::Borrowed(_)));
    assert!(matches!(l.tags[0].1, Cow::Borrowed(_)));
}

#[test]
fn structural_errors_say_what_is_wrong() {
    assert!(err("cpu").contains("missing fields"));
    assert!(err("cpu ").contains("missing fields"));
    assert!(err("cpu,host=a").contains("missing fields"));
    assert!(err(",host=a v=1").contains("missing measurement"));
    assert!(err("cpu,=a v=1").contains("missing tag key"));
    assert!(err("cpu,host v=1").contains("has no value"));
    assert!(err("cpu,host= v=1").contains("empty value"));
    assert!(err("cpu,host=a,host=b v=1").contains("duplicate tag key"));
    assert!(err("cpu v=1,v=2").contains("duplicate field key"));
    assert!(err("cpu v").contains("has no value"));
    assert!(err("cpu v=").contains("missing value"));
    assert!(err("cpu v=1,").contains("missing field key"));
    assert!(err("cpu v=1 12x").contains("after timestamp"));
    assert!(err("cpu v=1 1 2").contains("after timestamp"));
    assert!(err("cpu v=1 --1").contains("invalid timestamp"));
    assert!(err("cpu,time=1 v=1").contains("reserved"));
    assert!(err("cpu time=1").contains("reserved"));
    assert!(err("cpu\tv=1").contains("control character"));
}

#[test]
fn bodies_skip_comments_and_blank_lines_and_number_lines() {
    let body = b"# a comment\n\ncpu v=1 1\r\n   \n  # indented comment\ncpu v= 2\nmem v=3 3\n";
    let items: Vec<_> = parse_lines(body, Precision::Nanoseconds, 0).collect();
    assert_eq!(items.len(), 3);
    let first = items[0].as_ref().unwrap();
    assert_eq!(
        (first.line_number, first.timestamp, first.raw),
        (3, 1, "cpu v=1 1")
    );
    let e = items[1].as_ref().unwrap_err();
    assert_eq!(e.line, 6);
    assert!(e.to_string().starts_with("line 6: field \"v\""), "{e}");
    assert_eq!(items[2].as_ref().unwrap().line_number, 7);
}

#[test]
fn invalid_utf8_rejects_only_its_line() {
    let body = b"cpu v=1 1\ncpu,host=\xff\xfe v=1 2\ncpu v=3 3";
    let items: Vec<_> = parse_lines(body, Precision::Nanoseconds, 0).collect();
    assert_eq!(items.len(), 3);
    assert!(items[0].is_ok() && items[2].is_ok());
    let e = items[1].as_ref().unwrap_err();
    assert_eq!(e.line, 2);
    assert!(e.reason.contains("UTF-8"));
}

#[test]
fn series_key_is_canonical() {
    let a = one("cpu,z=1,a=2 v=1");
    let b = one("cpu,a=2,z=1 v=2");
    assert_eq!(a.series_key(), "cpu,a=2,z=1");
    assert_eq!(a.series_key(), b.series_key());
    assert_eq!(one(r"c\ pu,t\,k=v\ 1 v=1").series_key(), r"c\ pu,t\,k=v\ 1");
}

fn name() -> impl Strategy<Value = String> {
    // Includes every character with special meaning, plus non-ASCII.
    proptest::string::string_regex(r##"[a-zA-Z0-9_ ,=\\"#é\u{1F600}-]{1,12}"##).unwrap()
}

fn field_value() -> impl Strategy<Value = FieldValue<'static>> {
    prop_oneof![
        any::<f64>()
            .prop_filter("finite", |f| f.is_finite())
            .prop_map(FieldValue::Float),
        any::<i64>().prop_map(FieldValue::Integer),
        any::<u64>().prop_map(FieldValue::UInteger),
        any::<bool>().prop_map(FieldValue::Boolean),
        proptest::string::string_regex(r#"[a-z "\\,=\n\t]{0,10}"#)
            .unwrap()
            .prop_filter("no newline", |s| !s.contains('\n'))
            .prop_map(|s| FieldValue::String(s.into())),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn write_then_parse_round_trips(
        measurement in name().prop_filter("no comment", |m| !m.starts_with('#') && !m.starts_with(' ')),
        tags in proptest::collection::btree_map(name(), name(), 0..4),
        fields in proptest::collection::btree_map(name(), field_value(), 1..4),
        timestamp in any::<i64>(),
    ) {
        prop_assume!(!tags.contains_key("time") && !fields.contains_key("time"));
        let line = ParsedLine {
            line_number: 0,
            raw: "",
            series_raw: "",
            measurement: measurement.into(),
            tags: tags.into_iter().map(|(k, v)| (k.into(), v.into())).collect(),
            fields: fields.into_iter().map(|(k, v)| (k.into(), v)).collect(),
            timestamp,
        };
        let mut text = String::new();
        line.write_to(&mut text);
        let parsed = parse_line(&text, Precision::Nanoseconds, 0)
            .map_err(|e| TestCaseError::fail(format!("{text:?}: {e}")))?;
        prop_assert_eq!(&parsed.measurement, &line.measurement);
        prop_assert_eq!(&parsed.tags, &line.tags);
        prop_assert_eq!(&parsed.fields, &line.fields);
        prop_assert_eq!(parsed.timestamp, line.timestamp);
        prop_assert_eq!(parsed.series_key(), line.series_key());
    }

    #[test]
    fn random_bytes_never_panic(body in proptest::collection::vec(any::<u8>(), 0..512)) {
        for item in parse_lines(&body, Precision::Seconds, 0) {
            if let Err(e) = item {
                prop_assert!(e.line >= 1 && !e.reason.is_empty());
            }
        }
    }

    /// One line of a batch damaged (bytes changed, cut or put in, no newline among them):
    /// every other line is read exactly as before, and the damaged one is read or refused
    /// with its own line number. A bad line never costs its neighbours.
    #[test]
    fn a_damaged_line_never_costs_its_neighbours(
        which in 0usize..5,
        edits in proptest::collection::vec(
            (any::<usize>(), 0usize..3, proptest::collection::vec(
                prop_oneof![Just(b' '), Just(b','), Just(b'='), Just(b'"'), Just(b'\\'),
                            Just(b'#'), Just(b'\r'), any::<u8>().prop_filter("no newline", |b| *b != b'\n')],
                0..3,
            )),
            1..4,
        ),
    ) {
        let lines: Vec<Vec<u8>> = [
            &br#"cpu,host=a\ b,region=eu usage=0.5,count=3i,s="x\"y" 1700000000"#[..],
            br#"mem,host=a used=12u,ok=true 1700000001"#,
            br#"disk,dev=sda\,1 read=1e3,write=-2.5 1700000002"#,
            br#"net\ io,if=eth0 rx=10i"#,
            br#"cpu,host=b usage=99 1700000003"#,
        ]
        .iter()
        .map(|l| l.to_vec())
        .collect();
        let before: Vec<String> = lines
            .iter()
            .map(|l| format!("{:?}", parse_line(std::str::from_utf8(l).unwrap(), Precision::Seconds, 7)))
            .collect();
        let mut damaged = lines.clone();
        let line = &mut damaged[which];
        for (at, remove, insert) in &edits {
            let at = at % (line.len() + 1);
            let end = (at + remove).min(line.len());
            line.splice(at..end, insert.iter().copied());
        }
        let body = damaged.join(&b'\n');
        // By line number (a line made blank or a comment yields nothing).
        let mut items = std::collections::BTreeMap::new();
        for item in parse_lines(&body, Precision::Seconds, 7) {
            let line = match &item {
                Ok(l) => l.line_number,
                Err(e) => e.line,
            };
            prop_assert!(items.insert(line, item).is_none(), "line {} twice", line);
        }
        for (i, expected) in before.iter().enumerate() {
            if i == which {
                continue;
            }
            let Some(item) = items.get(&(i + 1)) else {
                return Err(TestCaseError::fail(format!("line {} is gone", i + 1)));
            };
            let got = item.as_ref().map(|l| {
                let mut l = l.clone();
                l.line_number = 0;
                l
            });
            prop_assert_eq!(format!("{got:?}"), expected.clone());
        }
        prop_assert!(items.keys().all(|&l| (1..=5).contains(&l)));
    }

    #[test]
    fn mutated_valid_lines_never_panic(
        pos in 0usize..60,
        byte in prop_oneof![Just(b' '), Just(b','), Just(b'='), Just(b'"'), Just(b'\\'), Just(b'\n'), any::<u8>()],
        truncate in 0usize..60,
    ) {
        let mut line = br#"cpu,host=a\ b,region=eu usage=0.5,count=3i,s="x\"y" 1700000000"#.to_vec();
        let p = pos.min(line.len() - 1);
        line[p] = byte;
        line.truncate(line.len() - truncate.min(line.len()));
        for item in parse_lines(&line, Precision::Seconds, 0) {
            let _ = item;
        }
    }
}
