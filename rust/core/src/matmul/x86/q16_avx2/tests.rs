//! The AVX2 q16 kernels against `reference::q16`, bit for bit: nf4 rows with and without the
//! half-unit tail, odd and even unit counts, long rows (the prefetching loop), block sizes 32 to
//! 128 and the whole row; int8 rows of every tail length class, block scales and one scale a
//! row; 1 to 4 activation rows at once (each different: ordinary, zero, one huge outlier, tiny
//! values, zero blocks), weight scales ordinary, zero, huge and tiny.

use super::*;
use crate::matmul::reference::q16::{q16_row_len, quantize_row_q16, NF4_ONE};
use crate::matmul::tests::q16_rows::{rows, stats};
use crate::matmul::tests::Rng;

const NF4_K: [usize; 7] = [32, 64, 96, 160, 4096, 8224, 16416];
const INT8_K: [usize; 11] = [1, 2, 31, 33, 63, 64, 65, 100, 4096, 8193, 14336];

fn same(got: f32, want: f32) -> bool {
    got.to_bits() == want.to_bits() || (got.is_nan() && want.is_nan())
}

/// Runs `kernel` with the first R rows and compares each result with `reference`.
fn check<const R: usize>(
    rows: &[(Vec<i16>, Vec<f32>); 4],
    kernel: impl Fn([&[i16]; R], [&[f32]; R]) -> [f32; R],
    reference: impl Fn(&[i16], &[f32]) -> f32,
    what: &str,
) {
    let xq: [&[i16]; R] = std::array::from_fn(|r| &rows[r].0[..]);
    let xd: [&[f32]; R] = std::array::from_fn(|r| &rows[r].1[..]);
    let got = kernel(xq, xd);
    for r in 0..R {
        let want = reference(xq[r], xd[r]);
        assert!(
            same(got[r], want),
            "{what} R={R} row {r}: {} != {}",
            got[r],
            want
        );
    }
}

fn check_all(
    rows: &[(Vec<i16>, Vec<f32>); 4],
    kernel1: impl Fn([&[i16]; 1], [&[f32]; 1]) -> [f32; 1],
    kernel2: impl Fn([&[i16]; 2], [&[f32]; 2]) -> [f32; 2],
    kernel3: impl Fn([&[i16]; 3], [&[f32]; 3]) -> [f32; 3],
    kernel4: impl Fn([&[i16]; 4], [&[f32]; 4]) -> [f32; 4],
    reference: impl Fn(&[i16], &[f32]) -> f32,
    what: &str,
) {
    check::<1>(rows, kernel1, &reference, what);
    check::<2>(rows, kernel2, &reference, what);
    check::<3>(rows, kernel3, &reference, what);
    check::<4>(rows, kernel4, &reference, what);
}

fn have() -> bool {
    crate::cpu::has_avx2() && crate::cpu::has_fma()
}

/// `dot_nf4_q16_avx2` where `have()` (asserted); the kernel checks the lengths itself.
fn nf4<const R: usize>(p: &[u8], a: &[f32], bs: usize, q: [&[i16]; R], d: [&[f32]; R]) -> [f32; R] {
    assert!(have());
    // SAFETY: AVX2 and FMA asserted just above; lengths are checked by the kernel (panics).
    unsafe { dot_nf4_q16_avx2(p, a, bs, q, d) }
}

/// `dot_int8_q16_avx2` where `have()` (asserted); the kernel checks the lengths itself.
fn int8<const R: usize>(
    w: &[u8],
    s: &[f32],
    bl: usize,
    x: [&[i16]; R],
    d: [&[f32]; R],
) -> [f32; R] {
    assert!(have());
    // SAFETY: AVX2 and FMA asserted just above; lengths are checked by the kernel (panics).
    unsafe { dot_int8_q16_avx2(w, s, bl, x, d) }
}

#[test]
fn nf4_q16_avx2_equals_the_reference() {
    if !have() {
        eprintln!("no AVX2 + FMA: skipped");
        return;
    }
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    for k in NF4_K {
        for bs in [32usize, 64, 128, k] {
            let packed = rng.bytes(k / 2);
            let absmax = stats(&mut rng, k.div_ceil(bs));
            for kinds in [[0, 1, 2, 3], [2, 4, 0, 0], [3, 0, 4, 1]] {
                let rows = rows(&mut rng, k, NF4_ONE, kinds);
                check_all(
                    &rows,
                    |q, d| nf4(&packed, &absmax, bs, q, d),
                    |q, d| nf4(&packed, &absmax, bs, q, d),
                    |q, d| nf4(&packed, &absmax, bs, q, d),
                    |q, d| nf4(&packed, &absmax, bs, q, d),
                    |q, d| q16::dot_nf4_q16(&packed, &absmax, bs, q, d),
                    &format!("nf4 k={k} bs={bs} kinds={kinds:?}"),
                );
            }
        }
    }
}

#[test]
fn int8_q16_avx2_equals_the_reference() {
    if !have() {
        eprintln!("no AVX2 + FMA: skipped");
        return;
    }
    let mut rng = Rng(0x2545_f491_4f6c_dd1d);
    for k in INT8_K {
        // block scales (a short last block where K is not a multiple), one scale a row, and a
        // block length the kernel leaves to the reference
        for bl in [32usize, 64, 128, k, 48] {
            let q = rng.bytes(k);
            let scales = stats(&mut rng, k.div_ceil(bl));
            for kinds in [[0, 1, 2, 3], [2, 4, 0, 0], [3, 0, 4, 1]] {
                let rows = rows(&mut rng, k, 1.0, kinds);
                check_all(
                    &rows,
                    |x, d| int8(&q, &scales, bl, x, d),
                    |x, d| int8(&q, &scales, bl, x, d),
                    |x, d| int8(&q, &scales, bl, x, d),
                    |x, d| int8(&q, &scales, bl, x, d),
                    |x, d| q16::dot_int8_q16(&q, &scales, bl, x, d),
                    &format!("int8 k={k} bl={bl} kinds={kinds:?}"),
                );
            }
        }
    }
}

/// Extreme weights: every nf4 code at the largest activations (the largest lane sums), and int8
/// -128 / 127 rows, against the reference.
#[test]
fn extreme_weights_equal_the_reference() {
    if !have() {
        return;
    }
    let k = 4096 + 32;
    let x: Vec<f32> = (0..k)
        .map(|i| if i % 3 == 0 { -1.0 } else { 1.0 })
        .collect();
    for per in [NF4_ONE, 1.0] {
        let mut q = vec![0i16; q16_row_len(k)];
        let mut d = vec![0.0f32; q16_row_len(k) / Q16];
        quantize_row_q16(&x, per, &mut q, &mut d);
        let absmax = vec![1.0f32; k / 32];
        for b in [0x00u8, 0xff, 0x0f, 0xf0, 0x80, 0x7f] {
            let w = vec![b; k / 2];
            let got = nf4(&w, &absmax, 32, [&q], [&d])[0];
            let want = q16::dot_nf4_q16(&w, &absmax, 32, &q, &d);
            assert!(same(got, want), "nf4 byte {b:#x}");
            let w = vec![b; k];
            let got = int8(&w, &absmax, 32, [&q], [&d])[0];
            let want = q16::dot_int8_q16(&w, &absmax, 32, &q, &d);
            assert!(same(got, want), "int8 byte {b:#x}");
        }
    }
}

/// Lane scales that overflow to +inf: the lanes with elements become +inf, the lanes past K
/// must stay as they are (a `fma(0, inf, acc)` there would make them NaN): tails of every kind.
#[test]
fn tail_lanes_stay_untouched_under_infinite_scales() {
    if !have() {
        return;
    }
    for k in [32usize, 96, 1, 2, 17, 31, 33, 47, 63, 65, 100] {
        let x = vec![1.0e30f32; k];
        for per in [q16::NF4_ONE, 1.0] {
            let mut q = vec![0i16; q16::q16_row_len(k)];
            let mut d = vec![0.0f32; q16::q16_row_len(k) / q16::Q16];
            q16::quantize_row_q16(&x, per, &mut q, &mut d);
            if per == 1.0 {
                let w = vec![1u8; k];
                let scales = [3.0e38f32];
                let got = int8(&w, &scales, k, [&q], [&d])[0];
                let want = q16::dot_int8_q16(&w, &scales, k, &q, &d);
                assert_eq!(want, f32::INFINITY);
                assert_eq!(got.to_bits(), want.to_bits(), "int8 k={k}");
            } else if k % 32 == 0 {
                let w = vec![0xffu8; k / 2];
                let absmax = vec![3.0e38f32 * 16383.0; k / 32];
                let got = nf4(&w, &absmax, 32, [&q], [&d])[0];
                let want = q16::dot_nf4_q16(&w, &absmax, 32, &q, &d);
                assert_eq!(want, f32::INFINITY);
                assert_eq!(got.to_bits(), want.to_bits(), "nf4 k={k}");
            }
        }
    }
}
