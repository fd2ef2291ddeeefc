//! Grouped integers through `qmatmul`: every output equals the scalar reference bit for bit,
//! with the pool and with one thread, whatever kernel the CPU runs: `reference::gint` where the
//! fused kernel runs (4 and 8 bits with `cpu::has_vnni_q16`), otherwise the row decoded to int8
//! `q - z` by `formats::gint::decode_row_i8` and `reference::q16::dot_int8_q16`. Both references
//! are within a derived bound of the f64 dot with the independently dequantized weights.

use super::{mixed_acts, quantized, Rng};
use crate::formats::gint;
use crate::input::Matrix;
use crate::matmul::qmatmul;
use crate::matmul::reference::gint::{dot_gint_q16, fused_bits, group_sums, zero, UNIT4, UNIT8};
use crate::matmul::reference::q16::{dot_int8_q16, q16_row_len, quantize_row_q16, Q16};
use crate::qtype::{GInt, QType};
use crate::quantize::{dequantize, quantize, Options};

/// Whether `qmatmul` takes the fused kernel for these weights (below `GEMM16_MIN_M` rows).
fn fused_runs(g: GInt) -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        crate::cpu::has_avx2()
            && crate::cpu::has_avx512()
            && crate::cpu::has_vnni_q16()
            && fused_bits(g)
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = g;
        false
    }
}

/// One weight row of `q` against one q16 activation row, by the reference of `fused`.
#[allow(clippy::too_many_arguments)]
fn reference_dot(
    g: GInt,
    fused: bool,
    row: &[u8],
    st: &[f32],
    k: usize,
    xq: &[i16],
    xd: &[f32],
) -> f32 {
    let gl = gint::group_len(g, k);
    if fused {
        let mut xg = vec![0f32; k / gl];
        group_sums(xq, xd, k, gl, &mut xg);
        return dot_gint_q16(g, row, st, k, xq, xd, &xg);
    }
    let mut w8 = vec![0u8; k];
    let mut sc = vec![0f32; k / gl];
    gint::decode_row_i8(g, row, st, k, &mut w8, &mut sc);
    dot_int8_q16(&w8, &sc, gl, xq, xd)
}

/// The derived bound of a reference against the f64 dot of the dequantized row `w` with `x`:
/// the activation rounding (half a q16 step per element) plus, for the float sums, `c · 2^-24`
/// of the sum of the magnitudes they add, `c` the longest chain of roundings a term passes
/// (one product, the lane's fused multiply-adds, five reduction levels, the group sums' and
/// the final subtraction), with q the weights' integers as the reference multiplies them.
fn bound(g: GInt, fused: bool, codes: &[i32], st: &[f32], k: usize, xq: &[i16], xd: &[f32]) -> f64 {
    let gl = gint::group_len(g, k);
    let groups = k / gl;
    let xh = |e: usize| (xq[e] as f64 * xd[e / Q16] as f64).abs();
    let act: f64 = (0..k)
        .map(|e| {
            let z = zero(g, st, groups, e / gl) as f64;
            ((codes[e] as f64 - z) * st[e / gl] as f64).abs() * 0.5 * xd[e / Q16] as f64
        })
        .sum::<f64>()
        * (1.0 + 1e-6);
    let (terms, chain) = if fused {
        let mag: f64 = (0..k)
            .map(|e| {
                let c = if g.bits == 8 {
                    codes[e] - 128
                } else {
                    codes[e]
                };
                (c as f64 * st[e / gl] as f64).abs() * xh(e)
            })
            .sum();
        let zmag: f64 = if g.bits == 8 {
            0.0
        } else {
            (0..k)
                .map(|e| (st[e / gl] as f64 * zero(g, st, groups, e / gl) as f64) * xh(e))
                .sum()
        };
        let unit = if g.bits == 4 { UNIT4 } else { UNIT8 };
        (
            mag + zmag,
            k.div_ceil(unit) + groups.div_ceil(16) + gl.div_ceil(Q16) + 10,
        )
    } else {
        let mag: f64 = (0..k)
            .map(|e| {
                let z = zero(g, st, groups, e / gl) as f64;
                ((codes[e] as f64 - z) * st[e / gl] as f64).abs() * xh(e)
            })
            .sum();
        (mag, k.div_ceil(32) + 10)
    };
    act + chain as f64 * f32::EPSILON as f64 / 2.0 * terms * 1.01 + 1e-30
}

#[test]
fn grouped_integer_qmatmul_equals_its_reference() {
    let mut rng = Rng(0x6e1f_7000_0000_0013);
    let cases = [
        ("int4_g64", 256),
        ("int4_g64", 576),
        ("int4_g128_sym", 384),
        ("int4_g32", 4160),
        ("int4_g32", 96),
        ("int4_g64_sym", 64),
        ("int3_g64", 192),
        ("int3_gch", 200),
        ("int2_g32", 96),
        ("int2_gch_sym", 104),
        ("int4_gch", 4104),
        ("int4_gch", 40),
        ("int8_g64_sym", 128),
        ("int8_g32_sym", 160),
        ("int8_g128_sym", 384),
        ("int8_gch_sym", 72),
        // two pieces of K over a panel (`GINT_PIECE`), the second ending in a partial unit
        ("int8_g32_sym", 4160),
        ("int4_g128_sym", 8320),
    ];
    for (name, k) in cases {
        let qtype = QType::parse(name).unwrap();
        let g = qtype.gint().unwrap();
        let fused = fused_runs(g);
        // a panel of 8 weight rows, then 3: pairs and a single row (`Plan::gint_panels`)
        let n = 11;
        let (q, deq) = quantized(&mut rng, qtype, n, k);
        let (gl, spr) = (gint::group_len(g, k), gint::stats_per_row(g, k));
        let rb = qtype.row_bytes(k, gl);
        // Outputs where the two references differ: the fused one must be what ran.
        let mut differ = 0;
        // Below `GEMM16_MIN_M`: from there on the bf16 GEMM may run (`tests/bf16.rs`); 9 and
        // 11 take two 4-row steps and a rest (with the small-M AMX tiles off on this thread:
        // they take 8 rows and more, `x86::amx_bf16_small`).
        #[cfg(target_arch = "x86_64")]
        crate::matmul::x86::amx_bf16::force(Some(false));
        for m in [1usize, 2, 3, 5, 7, 9, 11] {
            let x = if m % 4 == 1 {
                mixed_acts(&mut rng, m * k)
            } else {
                rng.normalish(m * k, 1.0)
            };
            let mut y = vec![0f32; m * n];
            qmatmul(&x, m, &q.view(), &mut y).unwrap();
            let mut y1 = vec![0f32; m * n];
            crate::parallel::set_num_threads(1);
            let one = qmatmul(&x, m, &q.view(), &mut y1);
            crate::parallel::set_num_threads(0);
            one.unwrap();
            assert!(
                y.iter().zip(&y1).all(|(a, b)| a.to_bits() == b.to_bits()),
                "{name} k={k} m={m}: one thread differs"
            );
            for mi in 0..m {
                let xr = &x[mi * k..(mi + 1) * k];
                let mut xq = vec![0i16; q16_row_len(k)];
                let mut xd = vec![0f32; q16_row_len(k) / Q16];
                quantize_row_q16(xr, 1.0, &mut xq, &mut xd);
                for row in 0..n {
                    let (wrow, st) = (
                        &q.data[row * rb..(row + 1) * rb],
                        &q.stats[row * spr..(row + 1) * spr],
                    );
                    let want = reference_dot(g, fused, wrow, st, k, &xq, &xd);
                    if fused {
                        // the decoded path's reference exists for every width; the fused one
                        // only for `fused_bits` (debug-asserted there)
                        differ += (want != reference_dot(g, false, wrow, st, k, &xq, &xd)) as usize;
                    }
                    let got = y[mi * n + row];
                    assert_eq!(
                        got.to_bits(),
                        want.to_bits(),
                        "{name} k={k} m={m} ({mi}, {row}): {got} vs {want}"
                    );
                    // Both references against the dequantized weights in f64.
                    let codes: Vec<i32> =
                        (0..k).map(|e| gint::code(wrow, e, g.bits) as i32).collect();
                    let wr = &deq[row * k..(row + 1) * k];
                    let exact: f64 = wr.iter().zip(xr).map(|(&a, &b)| a as f64 * b as f64).sum();
                    for f in [false, fused_bits(g)] {
                        let r = reference_dot(g, f, wrow, st, k, &xq, &xd) as f64;
                        let b = bound(g, f, &codes, st, k, &xq, &xd);
                        assert!(
                            (r - exact).abs() <= b,
                            "{name} k={k} fused={f}: {r} vs {exact} (bound {b})"
                        );
                    }
                }
            }
        }
        #[cfg(target_arch = "x86_64")]
        crate::matmul::x86::amx_bf16::force(None);
        if fused {
            assert!(
                differ > 0,
                "{name} k={k}: the fused arithmetic never showed"
            );
        }
    }
}

#[test]
fn grouped_integer_views_with_bad_statistics_are_errors() {
    let qtype = QType::parse("int4_g64").unwrap();
    let w = vec![0.25f32; 2 * 128];
    let q = quantize(
        &Matrix::from_f32(&w, 2, 128).unwrap(),
        qtype,
        &Options::default(),
    )
    .unwrap();
    let mut y = vec![0f32; 2];
    let x = vec![1f32; 128];
    let mut v = q.view();
    let short = &q.stats[..3];
    v.stats = short;
    assert!(qmatmul(&x, 1, &v, &mut y)
        .unwrap_err()
        .to_string()
        .contains("stats"));
    // beyond 4 bits, negative, not an integer, NaN, infinite, and the row named (row 1)
    for (i, z) in [
        (2, 16.0),
        (2, -1.0),
        (3, 7.5),
        (2, 1e-6),
        (2, f32::NAN),
        (3, f32::INFINITY),
        (6, 15.0 + 1e-6),
    ] {
        let mut bad = q.stats.clone();
        bad[i] = z;
        let mut v = q.view();
        v.stats = &bad;
        let e = qmatmul(&x, 1, &v, &mut y).unwrap_err().to_string();
        assert!(
            e.contains("zero point") && e.contains(&format!("row {}", i / 4)),
            "{z}: {e}"
        );
    }
    // every integer zero in range passes
    let mut edge = q.stats.clone();
    for (i, z) in [(2, 0.0), (3, 15.0), (6, 0.0), (7, 15.0)] {
        edge[i] = z;
    }
    let mut v = q.view();
    v.stats = &edge;
    assert!(qmatmul(&x, 1, &v, &mut y).is_ok());
}

/// M = 1 on the fused kernel checks each row's zeros as it reads it (`Plan::zeros_deferred`),
/// not before the call: a bad zero in any row, on the pool (rows spread over tasks) or on one
/// thread, still gives `validate_zeros`' error naming the first bad row, as M = 2 (checked
/// before) does; and the check is on the same zeros `gint::validate` sees.
#[test]
fn deferred_zero_checks_name_the_first_bad_row() {
    let (n, k) = (96, 4096);
    for name in ["int4_g64", "int4_g128", "int4_gch"] {
        let qtype = QType::parse(name).unwrap();
        let g = qtype.gint().unwrap();
        let mut rng = Rng(11);
        let w = rng.normalish(n * k, 1.0);
        let q = quantize(
            &Matrix::from_f32(&w, n, k).unwrap(),
            qtype,
            &Options::default(),
        )
        .unwrap();
        let spr = gint::stats_per_row(g, k);
        let groups = spr / 2;
        let x = rng.normalish(2 * k, 1.0);
        for (row, z) in [(95usize, 16.0f32), (50, 2.5), (0, f32::NAN), (70, -1.0)] {
            let mut bad = q.stats.clone();
            bad[row * spr + groups + groups / 2] = z;
            if row == 50 {
                bad[90 * spr + groups] = 17.0; // a later bad row: the first is named
            }
            let mut v = q.view();
            v.stats = &bad;
            let want = gint::validate(&v, g).unwrap_err().to_string();
            assert!(want.contains(&format!("row {row}")), "{want}");
            for threads in [0, 1] {
                crate::parallel::set_num_threads(threads);
                let mut y = vec![0f32; 2 * n];
                let e1 = qmatmul(&x[..k], 1, &v, &mut y[..n]);
                let e2 = qmatmul(&x, 2, &v, &mut y);
                crate::parallel::set_num_threads(0);
                assert_eq!(
                    e1.unwrap_err().to_string(),
                    want,
                    "{name} m=1 threads={threads}"
                );
                assert_eq!(
                    e2.unwrap_err().to_string(),
                    want,
                    "{name} m=2 threads={threads}"
                );
            }
        }
        // the untouched zeros pass at M = 1 (and the result is M = 2's first row, bit for bit)
        let mut y1 = vec![0f32; n];
        let mut y2 = vec![0f32; 2 * n];
        qmatmul(&x[..k], 1, &q.view(), &mut y1).unwrap();
        qmatmul(&x, 2, &q.view(), &mut y2).unwrap();
        assert!(
            y1.iter()
                .zip(&y2[..n])
                .all(|(a, b)| a.to_bits() == b.to_bits())
                || !fused_runs(g)
        );
    }
}

/// Float zeros: every output is the int8 reference of the row decoded with `int_zero` plus
/// `float_zero::correction` (its scalar reference), bit for bit, on the pool and on one thread,
/// at M past the bf16 GEMM's threshold too (float zeros never take it); and within the q16
/// activation error of the f64 dot with the dequantized weights.
#[test]
fn float_zero_qmatmul_equals_the_int8_reference_plus_its_correction() {
    use crate::matmul::float_zero::{correction, group_sums};
    let mut rng = Rng(0x6e1f_7000_0000_0f2e);
    for (name, k) in [
        ("int4_g64_fz", 320),
        ("int3_g32_fz", 4128),
        ("int2_g128_fz", 256),
    ] {
        let qtype = QType::parse(name).unwrap();
        let g = qtype.gint().unwrap();
        let n = 9;
        // offset groups: zeros away from the integers and outside 0..=maxq
        let w: Vec<f32> = rng
            .normalish(n * k, 0.05)
            .iter()
            .enumerate()
            .map(|(i, v)| v + 0.03 * ((i / 64) % 5) as f32 - 0.06)
            .collect();
        let q = crate::hqq::store::quantize(
            &Matrix::from_f32(&w, n, k).unwrap(),
            qtype,
            &crate::hqq::HqqConfig::default(),
        )
        .unwrap();
        let mut deq = vec![0f32; n * k];
        dequantize(&q.view(), &mut deq).unwrap();
        let gl = gint::group_len(g, k);
        let (spr, rb) = (gint::stats_per_row(g, k), qtype.row_bytes(k, gl));
        for m in [1usize, 3, 5, 13] {
            let x = if m == 5 {
                mixed_acts(&mut rng, m * k)
            } else {
                rng.normalish(m * k, 1.0)
            };
            let mut y = vec![0f32; m * n];
            qmatmul(&x, m, &q.view(), &mut y).unwrap();
            crate::parallel::set_num_threads(1);
            let mut y1 = vec![0f32; m * n];
            let r1 = qmatmul(&x, m, &q.view(), &mut y1);
            crate::parallel::set_num_threads(0);
            r1.unwrap();
            let sums = group_sums(&x, k, gl);
            for mi in 0..m {
                let xr = &x[mi * k..(mi + 1) * k];
                let mut xq = vec![0i16; q16_row_len(k)];
                let mut xd = vec![0f32; q16_row_len(k) / Q16];
                quantize_row_q16(xr, 1.0, &mut xq, &mut xd);
                let xs = &sums[mi * (k / gl)..(mi + 1) * (k / gl)];
                for row in 0..n {
                    let (mut w8, mut sc) = (vec![0u8; k], vec![0f32; k / gl]);
                    let st = &q.stats[row * spr..(row + 1) * spr];
                    gint::decode_row_i8(
                        g,
                        &q.data[row * rb..(row + 1) * rb],
                        st,
                        k,
                        &mut w8,
                        &mut sc,
                    );
                    let want = dot_int8_q16(&w8, &sc, gl, &xq, &xd) + correction(g, st, xs);
                    for (got, what) in [(y[mi * n + row], "pool"), (y1[mi * n + row], "1 thread")] {
                        assert_eq!(
                            got.to_bits(),
                            want.to_bits(),
                            "{name} k={k} m={m} ({mi}, {row}) {what}: {got} vs {want}"
                        );
                    }
                    if m != 5 {
                        let wr = &deq[row * k..(row + 1) * k];
                        let exact: f64 =
                            wr.iter().zip(xr).map(|(&a, &b)| a as f64 * b as f64).sum();
                        let mag: f64 = wr
                            .iter()
                            .zip(xr)
                            .map(|(&a, &b)| (a as f64 * b as f64).abs())
                            .sum();
                        assert!(
                            (want as f64 - exact).abs() <= 1e-3 * mag + 1e-9,
                            "{name}: {want} vs {exact}"
                        );
                    }
                }
            }
        }
    }
}
