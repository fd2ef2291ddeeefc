//! Unit tests of the kernels added for q4_1 / q5_1 (q8_1 activations): the references within a
//! derived bound of an f64 dot of the dequantized weights (the crate's ggml dequantizer, itself
//! tested bit-exact against gguf-py), the SIMD paths bit for bit against the references (R = 1
//! and R = 4 rows, every K from 1 to 24 blocks), and the q8_1 activation quantizer.
//!
//! Bound (q4_1 / q5_1). Weights `w = d_w q + m`, activations x̂ = f16(d) q_x with d = amax/127
//! (f32), and `s = f16(d Σ q_x)`. Per block the kernel's exact value is
//! `d_w d_x Σ q_w q_x + m s = Σ w x̂ + m (s - f16(d) Σq)`, so its distance to Σ w x is at most
//!   e_b Σ |w| + |m| e_s,  e_b = d/2 (1 + 2^-20) + 127 |d - f16(d)|,
//!   e_s = |Σq| |d - f16(d)| + 2^-11 |d Σq| + 2^-25 (s's f16 rounding), |Σq| <= Σ|x|/d + 16.
//! The float part (block products, lanes) adds at most (nb + 24) 2^-23 Σ (|w| + 2|m|)(|x| + d)
//! (|d_w q_w| <= |w| + |m|: the terms d_w·isum and m·s can each exceed |w x|).

use super::super::reference::{self as r, BlockQ8_1};
use super::super::*;
use super::{blocks, view, Rng};
use crate::formats::ggml_dequantize_row;

/// The new 32-weight formats and the offsets of their f16 fields (d, m).
const MIN32: [QType; 2] = [QType::Q4_1, QType::Q5_1];

fn q8_1_row(x: &[f32]) -> (Vec<BlockQ8_0>, Vec<f32>, Vec<i32>, Vec<f32>) {
    let mut q = vec![BlockQ8_1::zeroed(); x.len() / 32];
    r::quantize_row_q8_1(x, &mut q);
    let b = q.iter().map(|b| BlockQ8_0 { d: b.d, qs: b.qs }).collect();
    let d = q.iter().map(|b| f16_to_f32(b.d)).collect();
    let sums = q
        .iter()
        .map(|b| b.qs.iter().map(|&v| v as i32).sum())
        .collect();
    let s = q.iter().map(|b| f16_to_f32(b.s)).collect();
    (b, d, sums, s)
}

#[test]
fn min32_references_within_derived_bound_of_f64_dot() {
    let mut rng = Rng(0x2468_ace0_1357_9bdf);
    for qtype in MIN32 {
        let ts = qtype.info().type_size;
        for nb in [1usize, 3, 8, 9, 17] {
            let (k, n, m) = (nb * 32, 3, 2);
            let data = blocks(&mut rng, n * nb, ts, &[0, 2]);
            for scale in [1.0f32, 1e-3, 1e3] {
                let x = rng.normalish(m * k, scale);
                let mut y = vec![0.0f32; m * n];
                qmatmul(&x, m, &view(qtype, n, k, &data), &mut y).unwrap();
                let mut w = vec![0.0f32; k];
                for row in 0..n {
                    let rb = &data[row * nb * ts..(row + 1) * nb * ts];
                    ggml_dequantize_row(qtype, rb, &mut w);
                    for mi in 0..m {
                        let xr = &x[mi * k..(mi + 1) * k];
                        let exact: f64 = w.iter().zip(xr).map(|(&a, &b)| a as f64 * b as f64).sum();
                        let (mut bound, mut wx) = (0.0f64, 0.0f64);
                        for (b, (wb, xb)) in w.chunks(32).zip(xr.chunks(32)).enumerate() {
                            let mw = f16_to_f32([rb[b * ts + 2], rb[b * ts + 3]]).abs() as f64;
                            let amax = xb.iter().fold(0.0f32, |a, v| a.max(v.abs()));
                            let d32 = amax / 127.0;
                            let (d, dh) = (d32 as f64, f16_to_f32(f16_from_f32(d32)) as f64);
                            let e = d / 2.0 * (1.0 + 2f64.powi(-20)) + 127.0 * (d - dh).abs();
                            let sx: f64 = xb.iter().map(|v| v.abs() as f64).sum();
                            let sum_q = if d > 0.0 { sx / d + 16.0 } else { 0.0 };
                            let es = sum_q * (d - dh).abs()
                                + 2f64.powi(-11) * (sx + 16.0 * d)
                                + 2f64.powi(-25);
                            let sw: f64 = wb.iter().map(|v| v.abs() as f64).sum();
                            bound += e * sw + mw * es;
                            wx += wb
                                .iter()
                                .zip(xb)
                                .map(|(&a, &b)| (a.abs() as f64 + 2.0 * mw) * (b.abs() as f64 + d))
                                .sum::<f64>();
                        }
                        bound += (nb + 24) as f64 * 2f64.powi(-23) * wx;
                        let got = y[mi * n + row] as f64;
                        assert!(
                            (got - exact).abs() <= bound,
                            "{qtype:?} nb={nb} scale={scale}: got {got} exact {exact} bound {bound}"
                        );
                    }
                }
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
fn check_min32_simd<W: x86::Load32>(rng: &mut Rng, nb: usize) {
    let ts = std::mem::size_of::<W>();
    let data = blocks(rng, nb, ts, &[0, 2]);
    let w: &[W] = bytemuck::cast_slice(&data);
    let rows: Vec<_> = (0..4)
        .map(|i| q8_1_row(&rng.normalish(nb * 32, 0.5 + i as f32)))
        .collect();
    let x: [&[BlockQ8_0]; 4] = std::array::from_fn(|i| &rows[i].0[..]);
    let xd: [&[f32]; 4] = std::array::from_fn(|i| &rows[i].1[..]);
    let xsum: [&[i32]; 4] = std::array::from_fn(|i| &rows[i].2[..]);
    let xs: [&[f32]; 4] = std::array::from_fn(|i| &rows[i].3[..]);
    let want: [u32; 4] =
        std::array::from_fn(|i| r::dot_block32_min(w, x[i], xd[i], xs[i]).to_bits());
    // SAFETY: AVX2 and F16C detected by the caller; one activation block per weight block.
    let avx2 = unsafe { x86::dot_block32_min(w, x, xd, xs) }.map(f32::to_bits);
    assert_eq!(
        avx2,
        want,
        "{} nb={nb} avx2 R=4",
        std::any::type_name::<W>()
    );
    // SAFETY: as above.
    let one = unsafe { x86::dot_block32_min(w, [x[1]], [xd[1]], [xs[1]]) }[0].to_bits();
    assert_eq!(
        one,
        want[1],
        "{} nb={nb} avx2 R=1",
        std::any::type_name::<W>()
    );
    if x86::has_vnni() {
        // SAFETY: AVX-512 VNNI/VL detected; lengths as above.
        let v = unsafe { x86::dot_block32_min_vnni(w, x, xd, xsum, xs) }.map(f32::to_bits);
        assert_eq!(v, want, "{} nb={nb} vnni R=4", std::any::type_name::<W>());
        // SAFETY: as above.
        let v1 = unsafe { x86::dot_block32_min_vnni(w, [x[2]], [xd[2]], [xsum[2]], [xs[2]]) };
        assert_eq!(
            v1[0].to_bits(),
            want[2],
            "{} nb={nb} vnni R=1",
            std::any::type_name::<W>()
        );
    }
}

#[cfg(target_arch = "x86_64")]
#[test]
fn min32_simd_paths_are_bit_identical_to_references() {
    if !crate::formats::simd::has_avx2() {
        return;
    }
    let mut rng = Rng(0x0ddb_a11c_afe0_1234);
    for nb in 1..=24 {
        check_min32_simd::<BlockQ4_1>(&mut rng, nb);
        check_min32_simd::<BlockQ5_1>(&mut rng, nb);
    }
}

#[cfg(target_arch = "x86_64")]
#[test]
fn q5_1_simd_unpack_equals_reference_unpack() {
    if !crate::formats::simd::has_avx2() {
        return;
    }
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    for _ in 0..500 {
        let data = rng.bytes(24);
        let b: &BlockQ5_1 = bytemuck::from_bytes(&data);
        let mut got = [0i8; 32];
        // SAFETY: AVX2 detected; `got` has room for 32 bytes.
        unsafe {
            let v = x86::Load32::load(b);
            std::arch::x86_64::_mm256_storeu_si256(got.as_mut_ptr() as *mut _, v);
        }
        assert_eq!(got, r::unpack_q5_1(b));
    }
}

#[test]
fn q8_1_activation_quantization() {
    let mut x: Vec<f32> = (0..96).map(|i| (i as f32 - 40.0) * 0.31).collect();
    x[70] = -90.0;
    x[32..64].iter_mut().for_each(|v| *v = 0.0);
    let mut out = vec![BlockQ8_1::zeroed(); 3];
    r::quantize_row_q8_1(&x, &mut out);
    for (b, blk) in out.iter().enumerate() {
        let xb = &x[32 * b..32 * b + 32];
        let amax = xb.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        let d = amax / 127.0;
        assert_eq!(blk.d, f16_from_f32(d));
        let mut sum = 0;
        for (j, &q) in blk.qs.iter().enumerate() {
            let want = if d == 0.0 {
                0.0
            } else {
                (xb[j] * (1.0 / d)).round()
            };
            assert_eq!(q as f32, want, "block {b} element {j}");
            assert!(q.unsigned_abs() <= 127);
            sum += q as i32;
        }
        assert_eq!(blk.s, f16_from_f32(sum as f32 * d), "block {b}");
    }
    assert!(out[1].qs.iter().all(|&q| q == 0) && out[1].s == [0, 0] && out[1].d == [0, 0]);
}

#[test]
fn min32_four_rows_at_once_equal_one_at_a_time_and_zero_weights() {
    let mut rng = Rng(0x1111_2222_3333_4444);
    for qtype in MIN32 {
        let ts = qtype.info().type_size;
        let (n, nb, m) = (3, 11, 9);
        let k = nb * 32;
        let data = blocks(&mut rng, n * nb, ts, &[0, 2]);
        let x = rng.normalish(m * k, 1.5);
        let v = view(qtype, n, k, &data);
        let mut all = vec![0.0f32; m * n];
        qmatmul(&x, m, &v, &mut all).unwrap();
        for mi in 0..m {
            let mut one = vec![0.0f32; n];
            qmatmul(&x[mi * k..(mi + 1) * k], 1, &v, &mut one).unwrap();
            for (a, b) in one.iter().zip(&all[mi * n..(mi + 1) * n]) {
                assert_eq!(a.to_bits(), b.to_bits(), "{qtype:?} row {mi}");
            }
        }
        let zeros = vec![0u8; n * nb * ts];
        qmatmul(&x, m, &view(qtype, n, k, &zeros), &mut all).unwrap();
        assert!(all.iter().all(|&v| v == 0.0), "{qtype:?}");
    }
}
