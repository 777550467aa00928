use super::*;

fn floats(values: &[Option<f64>]) -> Float64Array {
    values.iter().copied().collect()
}

/// Every value of `values` stored at the scale `fit` chose and read back, bit for bit.
fn round_trip(values: &[Option<f64>]) -> Option<Scale> {
    let array = floats(values);
    let schema = Arc::new(Schema::new(vec![Field::new("v", DataType::Float64, true)]));
    let batch = RecordBatch::try_new(Arc::clone(&schema), vec![Arc::new(array)]).unwrap();
    let scales = Scales::fit(&batch);
    let stored = scales.stored_schema(&schema);
    let encoded = scales.encode(&batch, &stored).unwrap();
    let back = decode(encoded.clone()).unwrap();
    assert_eq!(back.schema(), schema);
    let got = back.column(0).as_primitive::<Float64Type>();
    for (i, v) in values.iter().enumerate() {
        match v {
            None => assert!(got.is_null(i)),
            Some(v) => assert_eq!(got.value(i).to_bits(), v.to_bits(), "{v:?}"),
        }
    }
    let e = scales.get("v");
    assert_eq!(
        encoded.schema().field(0).data_type(),
        if e.is_some() {
            &DataType::Int64
        } else {
            &DataType::Float64
        }
    );
    e
}

#[test]
fn short_decimals_are_stored_as_integers_at_the_smallest_scale() {
    assert_eq!(
        round_trip(&[Some(1.0), Some(42.0), None, Some(-7.0)]),
        Some(Scale::div(0))
    );
    assert_eq!(
        round_trip(&[Some(12.5), Some(3.0), Some(0.5)]),
        Some(Scale::div(1))
    );
    assert_eq!(
        round_trip(&[Some(0.29), Some(0.1), Some(100.07)]),
        Some(Scale::div(2))
    );
    assert_eq!(
        round_trip(&[Some(0.001), Some(1e-15)]),
        Some(Scale::div(15))
    );
    assert_eq!(round_trip(&[Some(1e15), Some(-4e15)]), Some(Scale::div(0)));
    assert_eq!(round_trip(&[None, None]), Some(Scale::div(0)));
    assert_eq!(round_trip(&[]), Some(Scale::div(0)));
    // Text that parses to these floats: what a client writes.
    let text = ["98.6", "0.333", "1234.5678", "-0.05", "7"];
    let values: Vec<Option<f64>> = text.iter().map(|t| Some(t.parse().unwrap())).collect();
    assert_eq!(round_trip(&values), Some(Scale::div(4)));
}

#[test]
fn values_that_are_not_short_decimals_keep_the_column_float() {
    for odd in [
        1.0 / 3.0,
        f64::NAN,
        f64::INFINITY,
        f64::NEG_INFINITY,
        -0.0,
        f64::MIN_POSITIVE,
        5e-324,
        1e-16,
        f64::MAX,
        9_007_199_254_740_993.0,
        // 2^53: exact, but not below 2^53.
        9_007_199_254_740_992.0,
    ] {
        assert_eq!(
            round_trip(&[Some(1.5), Some(odd), Some(2.0)]),
            None,
            "{odd:?}"
        );
    }
}

#[test]
fn decimals_a_program_computed_by_multiplying_are_stored_as_integers_too() {
    // node_exporter's disk times: milliseconds × 0.001.
    let ms = [563.0, 5004.0, 20804.0, 36.0, 0.0, 7.0];
    let values: Vec<Option<f64>> = ms.iter().map(|&m| Some(m * 0.001)).collect();
    assert_eq!(values[0], Some(0.5630000000000001));
    assert_eq!(round_trip(&values), Some(Scale::inverse(3)));
    // Pressure stall times: microseconds × 1e-6; 0.1 + 0.2 is 3 × 0.1.
    let us: Vec<Option<f64>> = [2668524.0, 1626516.0, 12.0]
        .iter()
        .map(|&m| Some(m * 1e-6))
        .collect();
    assert_eq!(us[0], Some(2.6685239999999997));
    assert_eq!(round_trip(&us), Some(Scale::inverse(6)));
    assert_eq!(
        round_trip(&[Some(0.1 + 0.2), Some(1.5)]),
        Some(Scale::inverse(1))
    );
    // Parsed decimals divide, even where multiplying would also do.
    assert_eq!(round_trip(&[Some(0.5), Some(0.25)]), Some(Scale::div(2)));
}

#[test]
fn large_values_are_checked_at_the_final_scale() {
    // 2^52 + 1 is exact at scale 0 and would need 2^53·10 at scale 1: the column stays
    // float rather than storing a rounded value.
    let big = 4_503_599_627_370_497.0;
    assert_eq!(round_trip(&[Some(big), Some(0.5)]), None);
    assert_eq!(round_trip(&[Some(big), Some(3.0)]), Some(Scale::div(0)));
    // Just below the safe bound at scale 2, and above it but still exact.
    assert_eq!(
        round_trip(&[Some(22_517_998_136_852.47), Some(0.01)]),
        Some(Scale::div(2))
    );
    assert_eq!(
        round_trip(&[Some(45_035_996_273_704.96), Some(0.01)]),
        Some(Scale::div(2))
    );
}

#[test]
fn random_decimals_and_random_bits_round_trip_exactly() {
    let mut seed = 11u64;
    let mut next = || {
        seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        seed
    };
    for round in 0..400u32 {
        let digits = (round % 8) as u8;
        let values: Vec<Option<f64>> = (0..64)
            .map(|_| {
                let r = next();
                if r % 17 == 0 {
                    return None;
                }
                let m = (r >> 11) as i64 % 10_000_000_000 - 5_000_000_000;
                Some(format!("{}e-{digits}", m).parse().unwrap())
            })
            .collect();
        let e = round_trip(&values).expect("decimals fit");
        assert!(!e.inverse && e.exp <= digits, "{e:?} for {digits} digits");
        // Any bits at all: whatever is chosen reads back exactly.
        let bits: Vec<Option<f64>> = (0..64).map(|_| Some(f64::from_bits(next()))).collect();
        round_trip(&bits);
    }
}

#[test]
fn segments_of_different_scales_merge_at_the_largest_that_keeps_every_value_exact() {
    let of = |pairs: &[(&str, Stored)]| -> BTreeMap<String, Stored> {
        pairs.iter().map(|(n, s)| (n.to_string(), *s)).collect()
    };
    let scaled = |exp, max_abs| Stored::Scaled {
        scale: Scale::div(exp),
        max_abs,
    };
    let a = of(&[
        ("x", scaled(0, 100)),
        ("y", scaled(2, 5)),
        ("z", scaled(1, 1)),
    ]);
    let b = of(&[("x", scaled(1, 7)), ("y", Stored::Float)]);
    let c = of(&[("x", scaled(3, 1 << 40)), ("z", scaled(1, 1 << 50))]);
    let merged = Scales::merge([&a, &b, &c]);
    // x: 100·10^3 and 7·10^2 are small, 2^40 at its own scale: 3.
    assert_eq!(merged.get("x"), Some(Scale::div(3)));
    // y: stored as floats in one input.
    assert_eq!(merged.get("y"), None);
    // z: 2^50 at scale 1 is below 2^51.
    assert_eq!(merged.get("z"), Some(Scale::div(1)));
    let d = of(&[("z", scaled(2, 1))]);
    // z at scale 2 would take 2^50·10 past 2^51.
    assert_eq!(Scales::merge([&c, &d]).get("z"), None);
    assert_eq!(Scales::merge([&a]).get("y"), Some(Scale::div(2)));
    // Large values at one common scale need no headroom.
    let e = of(&[("w", scaled(0, 1 << 52))]);
    assert_eq!(Scales::merge([&e, &e]).get("w"), Some(Scale::div(0)));
    // Multiplied back: only at one common scale.
    let inv = |exp| Stored::Scaled {
        scale: Scale::inverse(exp),
        max_abs: 1,
    };
    let (p, q) = (of(&[("v", inv(3))]), of(&[("v", inv(3))]));
    assert_eq!(Scales::merge([&p, &q]).get("v"), Some(Scale::inverse(3)));
    let r = of(&[("v", inv(2))]);
    assert_eq!(Scales::merge([&p, &r]).get("v"), None);
    let t = of(&[("v", scaled(3, 1))]);
    assert_eq!(Scales::merge([&p, &t]).get("v"), None);
}

#[test]
fn decode_leaves_unscaled_batches_alone_and_ignores_foreign_metadata() {
    let f = Field::new("v", DataType::Int64, true).with_metadata(
        [(SCALE_KEY.to_string(), "99".to_string())]
            .into_iter()
            .collect(),
    );
    let schema = Arc::new(Schema::new(vec![f]));
    let batch = RecordBatch::try_new(
        Arc::clone(&schema),
        vec![Arc::new(Int64Array::from(vec![5]))],
    )
    .unwrap();
    // An exponent past MAX_SCALE is not ours: the column stays an integer.
    assert_eq!(decode(batch.clone()).unwrap(), batch);
}
