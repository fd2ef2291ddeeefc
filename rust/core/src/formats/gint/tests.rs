#[cfg(target_arch = "x86_64")]
use super::qdq::{qdq_row_avx512, qdq_row_scalar, qdq_wide_usable};
use super::*;
use crate::input::Matrix;

fn g(bits: u8, group: u16, sym: bool) -> GInt {
    GInt {
        bits,
        group,
        sym,
        float_zero: false,
    }
}

#[test]
fn pack_and_code_round_trip_every_width() {
    for bits in [2u8, 3, 4, 8] {
        let codes: Vec<u32> = (0..64).map(|j| (j * 7 + 3) as u32 % (1 << bits)).collect();
        let mut out = vec![0u8; 64 * bits as usize / 8];
        pack_row(&codes, bits, &mut out);
        let back: Vec<u32> = (0..64).map(|j| code(&out, j, bits)).collect();
        assert_eq!(back, codes, "bits {bits}");
    }
    // 4 bits: element 2j in the low nibble.
    let mut out = [0u8; 1];
    pack_row(&[0x3, 0xa], 4, &mut out);
    assert_eq!(out[0], 0xa3);
}

#[test]
#[cfg(target_arch = "x86_64")]
fn qdq_rows_avx512_and_scalar_agree_bit_for_bit() {
    // the AVX-512 build against the scalar one, on random groups with zeros, -0.0, huge
    // and tiny values, flat and one-signed groups, every width and a ragged row
    let mut rnd = uniform(777u64);
    if !qdq_wide_usable() {
        return; // nothing to compare on this CPU (the scalar build is the reference)
    }
    for (bits, group, sym) in [
        (4, 64, false),
        (4, 32, true),
        (3, 32, false),
        (8, 64, true),
        (2, 32, false),
        (4, 0, false),
    ] {
        let gi = g(bits, group, sym);
        for cols in [64usize, 192, 576] {
            let gl = group_len(gi, cols);
            let mut x: Vec<f32> = (0..cols).map(|_| rnd() * 4.0).collect();
            x[0] = -0.0;
            x[1] = 1e30 * rnd();
            x[2] = 1e-38 * rnd();
            x[3] = 4_194_304.5;
            if cols >= 128 {
                x[64..96].fill(0.7);
                x[96..128].iter_mut().for_each(|v| *v = -v.abs());
            }
            let (mut a, mut b) = (vec![0f32; cols], vec![0f32; cols]);
            qdq_row_scalar(gi, gl, &x, &mut a);
            // SAFETY: qdq_wide_usable() checked AVX-512 above.
            unsafe { qdq_row_avx512(gi, gl, &x, &mut b) };
            let (a, b): (Vec<u32>, Vec<u32>) = (
                a.iter().map(|v| v.to_bits()).collect(),
                b.iter().map(|v| v.to_bits()).collect(),
            );
            assert_eq!(a, b, "bits {bits} group {group} sym {sym} cols {cols}");
        }
    }
}

/// Uniform values in [-1, 1) from a 64-bit LCG seeded with `seed`.
fn uniform(mut seed: u64) -> impl FnMut() -> f32 {
    move || {
        seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((seed >> 33) as f32 / (1u64 << 31) as f32) * 2.0 - 1.0
    }
}

#[test]
fn qdq_equals_quantize_then_dequantize() {
    // every width and symmetry, per-group and per-channel, with flat, all-positive and
    // all-negative groups and a zero group beside random ones
    let mut rnd = uniform(12345u64);
    let cases = [
        ("int4_g64", 4, 64, false),
        ("int4_g32_sym", 4, 32, true),
        ("int2_g32", 2, 32, false),
        ("int3_g32", 3, 32, false),
        ("int8_g64_sym", 8, 64, true),
        ("int4_gch", 4, 0, false),
        ("int8_gch_sym", 8, 0, true),
    ];
    for (name, bits, group, sym) in cases {
        let qt = QType::parse(name).unwrap();
        assert_eq!(qt.gint(), Some(g(bits, group, sym)), "{name}");
        let (rows, cols) = (5, 128);
        let mut x: Vec<f32> = (0..rows * cols).map(|_| rnd() * 3.0).collect();
        x[..16].fill(0.0);
        x[16..32].iter_mut().for_each(|v| *v = v.abs() + 0.5);
        x[32..48].iter_mut().for_each(|v| *v = -v.abs() - 0.25);
        x[cols..cols + 64].fill(0.7);
        let m = Matrix::from_f32(&x, rows, cols).unwrap();
        let q = quantize(&m, qt, qt.gint().unwrap()).unwrap();
        let mut want = vec![0f32; rows * cols];
        dequantize(&q.view(), qt.gint().unwrap(), &mut want).unwrap();
        let got = qdq(&m, qt, qt.gint().unwrap()).unwrap();
        let same = got
            .iter()
            .zip(&want)
            .all(|(a, b)| a.to_bits() == b.to_bits());
        assert!(same, "{name}");
    }
    let bad = [f32::NAN; 64];
    let m = Matrix::from_f32(&bad, 1, 64).unwrap();
    let qt = QType::parse("int4_g64").unwrap();
    assert!(qdq(&m, qt, qt.gint().unwrap()).is_err());
}

#[test]
fn qdq_scaled_is_qdq_of_the_scaled_columns_scaled_back() {
    let mut rnd = uniform(777u64);
    for name in ["int4_g64", "int4_g32_sym", "int3_g32", "int8_gch_sym"] {
        let qt = QType::parse(name).unwrap();
        let gi = qt.gint().unwrap();
        let (rows, cols) = (7, 128);
        let x: Vec<f32> = (0..rows * cols).map(|_| rnd() * 2.0).collect();
        let s: Vec<f32> = (0..cols).map(|_| (rnd() * 6.0).exp()).collect();
        let xs: Vec<f32> = x.iter().enumerate().map(|(i, v)| v * s[i % cols]).collect();
        let want = qdq(&Matrix::from_f32(&xs, rows, cols).unwrap(), qt, gi).unwrap();
        let want: Vec<f32> = want
            .iter()
            .enumerate()
            .map(|(i, v)| v / s[i % cols])
            .collect();
        let m = Matrix::from_f32(&x, rows, cols).unwrap();
        let got = qdq_scaled(&m, qt, gi, &s).unwrap();
        let same = got
            .iter()
            .zip(&want)
            .all(|(a, b)| a.to_bits() == b.to_bits());
        assert!(same, "{name}");
    }
    let qt = QType::parse("int4_g64").unwrap();
    let gi = qt.gint().unwrap();
    let x = [1f32; 64];
    let m = Matrix::from_f32(&x, 1, 64).unwrap();
    assert!(qdq_scaled(&m, qt, gi, &[1.0; 63]).is_err());
    for bad in [0.0, -1.0, f32::NAN, f32::INFINITY] {
        let mut s = [1f32; 64];
        s[5] = bad;
        assert!(qdq_scaled(&m, qt, gi, &s).is_err(), "{bad}");
    }
    let mut s = [1f32; 64];
    s[3] = f32::MAX;
    let mut x2 = [1f32; 64];
    x2[3] = 4.0;
    let m2 = Matrix::from_f32(&x2, 1, 64).unwrap();
    assert!(qdq_scaled(&m2, qt, gi, &s).is_err());
}

#[test]
fn group_codes_equal_quantize_value() {
    // every path (this CPU's build and the portable one) against the scalar rule, on
    // values around the rounding ties, huge / tiny / non-finite values and every width
    let mut vals: Vec<f32> = vec![
        0.0,
        -0.0,
        f32::NAN,
        f32::INFINITY,
        f32::NEG_INFINITY,
        f32::MAX,
        -f32::MAX,
        f32::MIN_POSITIVE,
        1e-45,
        4_194_304.0,
        -4_194_304.0,
        8_388_609.0,
    ];
    let mut seed = 12345u64;
    for i in 0..4000 {
        seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let u = ((seed >> 40) as f32) / (1u64 << 24) as f32 - 0.5;
        vals.push(if i % 3 == 0 {
            (i as f32 - 2000.0) * 0.125
        } else {
            u * 40.0
        });
    }
    for &(scale, zero, maxq) in &[
        (0.25f32, 8u32, 15u32),
        (0.1, 0, 15),
        (1.0, 128, 255),
        (3.0e-3, 2, 3),
        (f32::MIN_POSITIVE, 4, 7),
        (7.5, 0, 1),
    ] {
        let want: Vec<u32> = vals
            .iter()
            .map(|&v| quantize_value(v, scale, zero, maxq))
            .collect();
        let mut got = vec![u32::MAX; vals.len()];
        group_codes(&vals, scale, zero, maxq, &mut got);
        assert_eq!(got, want, "scale {scale}, zero {zero}, maxq {maxq}");
        let mut port = vec![u32::MAX; vals.len()];
        group_codes_body(&vals, scale, zero, maxq, &mut port);
        assert_eq!(port, want);
    }
}

#[test]
fn params_follow_the_gptq_rule() {
    // asym 4 bits: range [-1, 2] -> scale 0.2, zero round(5) = 5.
    let (s, z) = group_params(g(4, 32, false), &[-1.0, 2.0, 0.5]);
    assert_eq!(s, 3.0f32 / 15.0);
    assert_eq!(z, 5);
    // sym: zero 8, scale 2 * max|x| / 15.
    let (s, z) = group_params(g(4, 32, true), &[-1.0, 0.5]);
    assert_eq!((s, z), (2.0f32 / 15.0, 8));
    // sym with no negative value keeps xmin = 0 (the peer's rule): scale = xmax / 15.
    let (s, _) = group_params(g(4, 32, true), &[0.0, 3.0]);
    assert_eq!(s, 3.0f32 / 15.0);
    // An all-zero group: [-1, 1].
    assert_eq!(group_params(g(2, 32, false), &[0.0; 4]), (2.0 / 3.0, 2));
}

#[test]
fn quantize_dequantize_and_decode_agree() {
    let (rows, cols) = (3usize, 256usize);
    let x: Vec<f32> = (0..rows * cols)
        .map(|i| ((i * 2654435761) % 1000) as f32 / 250.0 - 2.0)
        .collect();
    for qt in crate::qtype::QTYPES
        .iter()
        .filter_map(|i| i.qtype.gint().map(|gi| (i.qtype, gi)))
        .filter(|(_, gi)| !gi.float_zero)
    {
        let (qtype, gi) = qt;
        let m = Matrix::from_f32(&x, rows, cols).unwrap();
        let q = quantize(&m, qtype, gi).unwrap();
        let mut y = vec![0f32; rows * cols];
        dequantize(&q.view(), gi, &mut y).unwrap();
        let gl = group_len(gi, cols);
        let mut w = vec![0u8; cols];
        let mut sc = vec![0f32; cols / gl];
        let spr = stats_per_row(gi, cols);
        let rb = qtype.row_bytes(cols, gl);
        for r in 0..rows {
            decode_row_i8(
                gi,
                &q.data[r * rb..(r + 1) * rb],
                &q.stats[r * spr..(r + 1) * spr],
                cols,
                &mut w,
                &mut sc,
            );
            for j in 0..cols {
                assert_eq!(
                    y[r * cols + j],
                    w[j] as i8 as f32 * sc[j / gl],
                    "{}",
                    qtype.name()
                );
            }
            // Error within half a step (plus the fp16 scale rounding) where not clipped.
            for j in 0..cols {
                let s = sc[j / gl];
                let err = (y[r * cols + j] - x[r * cols + j]).abs();
                assert!(
                    err <= 0.5 * s * 1.01 + 1e-6 || gi.sym,
                    "{} err {err} step {s}",
                    qtype.name()
                );
            }
        }
    }
}

#[test]
fn float_zero_rows_decode_within_half_a_step_and_split_into_the_int8_part() {
    let (rows, cols) = (4usize, 256usize);
    let mut x: Vec<f32> = (0..rows * cols)
        .map(|i| ((i * 2654435761) % 1000) as f32 / 250.0 - 1.5)
        .collect();
    // a flat group, an all-zero group, and a group far from 0 (its zero overflows fp16)
    x[..64].fill(0.75);
    x[64..128].fill(0.0);
    for (j, v) in x[128..192].iter_mut().enumerate() {
        *v = 3000.0 + j as f32 * 1e-3;
    }
    for name in ["int4_g64_fz", "int3_g32_fz", "int2_g128_fz"] {
        let qtype = QType::parse(name).unwrap();
        let gi = qtype.gint().unwrap();
        let q = quantize(&Matrix::from_f32(&x, rows, cols).unwrap(), qtype, gi).unwrap();
        let mut y = vec![0f32; rows * cols];
        dequantize(&q.view(), gi, &mut y).unwrap();
        let gl = group_len(gi, cols);
        let groups = cols / gl;
        let rb = qtype.row_bytes(cols, gl);
        let (mut w, mut sc) = (vec![0u8; cols], vec![0f32; groups]);
        for r in 0..rows {
            let st = &q.stats[r * 2 * groups..(r + 1) * 2 * groups];
            decode_row_i8(gi, &q.data[r * rb..(r + 1) * rb], st, cols, &mut w, &mut sc);
            for (j, &wj) in w.iter().enumerate() {
                let (k, i) = (j / gl, r * cols + j);
                let (s, z) = (st[k], st[groups + k]);
                assert!(z.is_finite() && f16_round(z) == z && s > 0.0, "{name}");
                // the stored grid's nearest level: the module comment's 0.53 steps
                let err = (y[i] - x[i]).abs();
                assert!(
                    err <= 0.53 * s + 1e-7 * x[i].abs(),
                    "{name} {i}: {err} step {s}"
                );
                // int8 part + float rest = the reference value (f64, exact terms)
                let zi = int_zero(gi, z);
                assert_eq!(
                    wj,
                    (code(&q.data[r * rb..], j, gi.bits) as u8).wrapping_sub(zi)
                );
                let split = wj as i8 as f64 * s as f64 + (zi as f64 - z as f64) * s as f64;
                let want = (code(&q.data[r * rb..], j, gi.bits) as f64 - z as f64) * s as f64;
                assert!((split - want).abs() <= 1e-12 * want.abs().max(1.0));
            }
        }
        // a flat group decodes exactly
        assert!(y[..64].iter().all(|&v| v == 0.75), "{name}: {}", y[0]);
        assert!(y[64..128].iter().all(|&v| v == 0.0), "{name}");
    }
}

#[test]
fn float_zero_views_with_bad_zeros_are_errors() {
    let qtype = QType::parse("int4_g64_fz").unwrap();
    let gi = qtype.gint().unwrap();
    let x = vec![0.5f32; 128];
    let q = quantize(&Matrix::from_f32(&x, 1, 128).unwrap(), qtype, gi).unwrap();
    for bad in [f32::NAN, f32::INFINITY, 0.1] {
        let mut st = q.stats.clone();
        st[2] = bad;
        let mut v = q.view();
        v.stats = &st;
        let mut y = vec![0f32; 128];
        let err = dequantize(&v, gi, &mut y).unwrap_err().to_string();
        assert!(err.contains("int4_g64_fz") && err.contains("fp16"), "{err}");
    }
}

#[test]
fn a_group_that_does_not_divide_the_row_is_an_error() {
    let x = vec![0.5f32; 96];
    let m = Matrix::from_f32(&x, 1, 96).unwrap();
    let qt = QType::parse("int4_g64").unwrap();
    let err = quantize(&m, qt, qt.gint().unwrap()).unwrap_err();
    assert!(err.to_string().contains("int4_g64"), "{err}");
    assert!(matches!(
        err,
        Error::RowLength {
            block_size: 64,
            cols: 96,
            ..
        }
    ));
}
