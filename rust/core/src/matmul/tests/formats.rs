//! Unit tests of the kernels added for q4_1 / q5_1 (q8_1 activations) and q2_K / q3_K / iq4_xs
//! (q8_K activations): the references within a derived bound of an f64 dot of the dequantized
//! weights (the crate's ggml dequantizer, itself tested bit-exact against gguf-py), the SIMD
//! paths bit for bit against the references (R = 1 and R = 4 rows, many K), the q8_1 activation
//! quantizer, and the scale decoders against ggml's own formulation of them.
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
use crate::formats::tensor::ScaleMode;
use bytemuck::Zeroable;

/// The new 32-weight formats and the offsets of their f16 fields (d, m).
const MIN32: [QType; 2] = [QType::Q4_1, QType::Q5_1];

/// A row quantized to q8_1, as the kernels take it: (q8_0 blocks, d, Σq, s) per block.
#[allow(dead_code)] // used on x86-64 and by the NEON tests
pub(crate) fn q8_1_row(x: &[f32]) -> (Vec<BlockQ8_0>, Vec<f32>, Vec<i32>, Vec<f32>) {
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
    if crate::cpu::has_vnni() {
        // SAFETY: AVX-512 VNNI/VL detected; lengths as above.
        let v = unsafe { x86::dot_block32_min_vnni(w, x, xd, xsum, xs, false) }.map(f32::to_bits);
        assert_eq!(v, want, "{} nb={nb} vnni R=4", std::any::type_name::<W>());
        // SAFETY: as above.
        let v1 = unsafe { x86::dot_block32_min_vnni(w, [x[2]], [xd[2]], [xsum[2]], [xs[2]], true) };
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
    if !crate::cpu::has_avx2() {
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
fn q5_simd_unpack_equals_reference_unpack() {
    use std::arch::x86_64::*;
    if !crate::cpu::has_avx2() {
        return;
    }
    fn bytes(v: __m256i) -> [i8; 32] {
        let mut out = [0i8; 32];
        // SAFETY: AVX2 detected by the caller; `out` has room for 32 bytes.
        unsafe { _mm256_storeu_si256(out.as_mut_ptr() as *mut __m256i, v) };
        out
    }
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    for _ in 0..500 {
        let data = rng.bytes(24);
        let b: &BlockQ5_1 = bytemuck::from_bytes(&data);
        let b0: &BlockQ5_0 = bytemuck::from_bytes(&data[2..]);
        // SAFETY: AVX2 detected above.
        unsafe {
            use x86::Load32;
            assert_eq!(bytes(b.load()), r::unpack_q5_1(b));
            assert_eq!(bytes(b.load_unsigned()), r::unpack_q5_1(b));
            assert_eq!(bytes(b0.load()), r::unpack_q5_0(b0));
            let biased = r::unpack_q5_0(b0).map(|v| v + 16);
            assert_eq!(bytes(b0.load_unsigned()), biased);
        }
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

// ---------------------------------------------------------------- q2_K, q3_K, iq4_xs (q8_K)

/// The new super-block formats and the offsets of their f16 fields.
const K_LOW: [(QType, &[usize]); 3] = [
    (QType::Q2K, &[80, 82]),
    (QType::Q3K, &[108]),
    (QType::IQ4XS, &[0]),
];

/// q2_K: |dmin · (scales[g] >> 4)| of group g of 16 (the offset subtracted from its weights).
fn q2k_offset(blk: &[u8], g: usize) -> f64 {
    (f16_to_f32([blk[82], blk[83]]) as f64 * (blk[g] >> 4) as f64).abs()
}

/// Bound (q8_K activations): the integer sums make the kernel's exact value Σ w x̂ (x̂ = q/iscale,
/// |x - x̂| <= d/2 (1 + 2^-20), d = amax/127 of the super-block), so the activation term is
/// 0.501 d Σ|w|; the float part (block products, lanes) adds at most
/// (nb + 24) 2^-23 Σ w̃ (|x| + d), w̃ = |w| (+ 2 |dmin m| of the group for q2_K, whose terms
/// d·isum and dmin·msum can each exceed |w x|; the f32 dequantized weight rounds them too).
#[test]
fn k_low_references_within_derived_bound_of_f64_dot() {
    let mut rng = Rng(0x7777_1234_abcd_9876);
    for (qtype, halves) in K_LOW {
        let ts = qtype.info().type_size;
        for nb in [1usize, 2, 8, 9] {
            let (k, n, m) = (nb * QK_K, 3, 2);
            let data = blocks(&mut rng, n * nb, ts, halves);
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
                        for (b, (wb, xb)) in w.chunks(QK_K).zip(xr.chunks(QK_K)).enumerate() {
                            let amax = xb.iter().fold(0.0f32, |a, v| a.max(v.abs())) as f64;
                            let d = amax / 127.0;
                            bound += 0.501 * d * wb.iter().map(|v| v.abs() as f64).sum::<f64>();
                            for (i, (&a, &v)) in wb.iter().zip(xb).enumerate() {
                                let off = if qtype == QType::Q2K {
                                    2.0 * q2k_offset(&rb[b * ts..], i / 16)
                                } else {
                                    0.0
                                };
                                wx += (a.abs() as f64 + off) * (v.abs() as f64 + d);
                            }
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
fn check_k_simd<W: x86::SumsK>(rng: &mut Rng, nb: usize, halves: &[usize]) {
    let name = std::any::type_name::<W>();
    let data = blocks(rng, nb, std::mem::size_of::<W>(), halves);
    let w: &[W] = bytemuck::cast_slice(&data);
    let rows: Vec<Vec<BlockQ8K>> = (0..4)
        .map(|i| {
            let mut q = vec![BlockQ8K::zeroed(); nb];
            r::quantize_row_q8_k(&rng.normalish(nb * QK_K, 0.5 + i as f32), &mut q);
            q
        })
        .collect();
    for (wb, xb) in w.iter().zip(&rows[0]) {
        // SAFETY: AVX2 detected by the caller.
        let got = unsafe { wb.sums_decoded(&wb.decode(), xb) };
        let (isum, msum) = r::BlockK::sums(wb, xb);
        // q3_K's AVX2 sums fold its bias into isum and return 0, as the reference does.
        assert_eq!(got, (isum, msum), "{name} nb={nb} sums");
    }
    let x: [&[BlockQ8K]; 4] = std::array::from_fn(|i| &rows[i][..]);
    let want: [u32; 4] = std::array::from_fn(|i| r::dot_block_k(w, x[i]).to_bits());
    // SAFETY: AVX2 detected by the caller; one activation block per weight block.
    let got = unsafe { x86::dot_block_k(w, x) }.map(f32::to_bits);
    assert_eq!(got, want, "{name} nb={nb} R=4");
    // SAFETY: as above.
    let one = unsafe { x86::dot_block_k(w, [x[3]]) }[0].to_bits();
    assert_eq!(one, want[3], "{name} nb={nb} R=1");
}

#[cfg(target_arch = "x86_64")]
#[test]
fn k_low_simd_paths_are_bit_identical_to_references() {
    if !crate::cpu::has_avx2() {
        return;
    }
    let mut rng = Rng(0xabad_1dea_5eed_0042);
    for nb in [1usize, 2, 3, 7, 8, 9, 16, 17] {
        check_k_simd::<BlockQ2K>(&mut rng, nb, K_LOW[0].1);
        check_k_simd::<BlockQ3K>(&mut rng, nb, K_LOW[1].1);
        check_k_simd::<BlockIQ4XS>(&mut rng, nb, K_LOW[2].1);
    }
}

/// ggml's q3_K scale decode, transcribed (`kmask1`/`kmask2` over four u32), against the per-scale
/// formula of `reference::scales_q3_k`.
#[test]
fn q3_k_scales_equal_ggml_kmask_decode() {
    let mut rng = Rng(0x3333_5555_7777_9999);
    for _ in 0..2000 {
        let sc: [u8; 12] = rng.bytes(12).try_into().unwrap();
        let (kmask1, kmask2) = (0x0303_0303u32, 0x0f0f_0f0fu32);
        let u = |i: usize| u32::from_le_bytes(sc[4 * i..4 * i + 4].try_into().unwrap());
        let (a0, a1, tmp) = (u(0), u(1), u(2));
        let aux = [
            (a0 & kmask2) | ((tmp & kmask1) << 4),
            (a1 & kmask2) | (((tmp >> 2) & kmask1) << 4),
            ((a0 >> 4) & kmask2) | (((tmp >> 4) & kmask1) << 4),
            ((a1 >> 4) & kmask2) | (((tmp >> 6) & kmask1) << 4),
        ];
        let want: Vec<i8> = aux
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .map(|b| b as i8 - 32)
            .collect();
        assert_eq!(r::scales_q3_k(&sc).to_vec(), want, "{sc:?}");
        #[cfg(target_arch = "x86_64")]
        assert_eq!(x86::scales_q3_k_kmask(&sc).to_vec(), want, "{sc:?}");
    }
}

/// ggml's iq4_xs scale decode, transcribed (`h >>= 4` per pair), against `scales_iq4_xs`.
#[test]
fn iq4_xs_scales_equal_ggml_decode() {
    let mut rng = Rng(0x4444_6666_8888_aaaa);
    for _ in 0..2000 {
        let bytes = rng.bytes(136);
        let b: &BlockIQ4XS = bytemuck::from_bytes(&bytes);
        let mut h = u16::from_le_bytes(b.scales_h) as u32;
        let mut want = Vec::new();
        for ib in (0..8).step_by(2) {
            let l = b.scales_l[ib / 2] as u32;
            want.push(((l & 0xf) | ((h << 4) & 0x30)) as i32 - 32);
            want.push(((l >> 4) | ((h << 2) & 0x30)) as i32 - 32);
            h >>= 4;
        }
        assert_eq!(r::scales_iq4_xs(b).to_vec(), want);
    }
}

#[test]
fn k_low_four_rows_at_once_equal_one_at_a_time_and_zero_weights() {
    let mut rng = Rng(0x5555_6666_7777_8888);
    for (qtype, halves) in K_LOW {
        let ts = qtype.info().type_size;
        let (n, nb, m) = (3, 3, 9);
        let k = nb * QK_K;
        let data = blocks(&mut rng, n * nb, ts, halves);
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

// ---------------------------------------------------------------- fp8 (f32 activations)

const FP8: [QType; 2] = [QType::Fp8E4M3, QType::Fp8E5M2];

/// Random fp8 bytes with the NaN / infinity codes replaced by zero (those are checked apart).
fn finite_fp8(rng: &mut Rng, n: usize, qtype: QType) -> Vec<u8> {
    let t = r::fp8_table(qtype == QType::Fp8E5M2);
    rng.bytes(n)
        .into_iter()
        .map(|b| if t[b as usize].is_finite() { b } else { 0 })
        .collect()
}

fn fp8_view<'a>(
    qtype: QType,
    n: usize,
    k: usize,
    mode: ScaleMode,
    bs: usize,
    data: &'a [u8],
    stats: &'a [f32],
) -> QuantizedView<'a> {
    QuantizedView {
        qtype,
        rows: n,
        cols: k,
        block_size: bs,
        scale_mode: Some(mode),
        data,
        stats,
        double_quant: None,
    }
}

/// The reference against an f64 dot of the weights dequantized by `formats::fp8` (torch's
/// decode): the float work is at most K/8 + nb + 16 roundings along any path (32 lanes of
/// partial sums, one scale product per block, the lane folds), bound
/// (K/8 + nb + 16) 2^-23 Σ |w x|.
#[test]
fn fp8_reference_within_float_bound_of_dequantized_product() {
    let mut rng = Rng(0xf8f8_0000_1234_5678);
    for qtype in FP8 {
        for mode in [ScaleMode::Row, ScaleMode::Tensor, ScaleMode::Block] {
            for k in [64usize, 320, 1024] {
                let n = 4;
                // the block_size the format records: the scale's group
                let bs = match mode {
                    ScaleMode::Tensor => n * k,
                    ScaleMode::Row => k,
                    ScaleMode::Block => 32,
                };
                let data = finite_fp8(&mut rng, n * k, qtype);
                let n_stats = match mode {
                    ScaleMode::Tensor => 1,
                    ScaleMode::Row => n,
                    ScaleMode::Block => n * k / bs,
                };
                let stats: Vec<f32> = (0..n_stats).map(|_| rng.unit().abs() * 0.01).collect();
                let v = fp8_view(qtype, n, k, mode, bs, &data, &stats);
                let x = rng.normalish(2 * k, 1.0);
                let mut y = vec![0.0f32; 2 * n];
                qmatmul(&x, 2, &v, &mut y).unwrap();
                let mut w = vec![0.0f32; n * k];
                crate::formats::fp8::dequantize(&v, &mut w).unwrap();
                let nb = if mode == ScaleMode::Block { k / bs } else { 1 };
                for mi in 0..2 {
                    for row in 0..n {
                        let (mut exact, mut wx) = (0.0f64, 0.0f64);
                        for j in 0..k {
                            let p = w[row * k + j] as f64 * x[mi * k + j] as f64;
                            exact += p;
                            wx += p.abs();
                        }
                        let bound = (k / 8 + nb + 16) as f64 * 2f64.powi(-23) * wx;
                        let got = y[mi * n + row] as f64;
                        assert!(
                            (got - exact).abs() <= bound,
                            "{qtype:?} {mode:?} k={k}: {got} vs {exact} (bound {bound})"
                        );
                    }
                }
            }
        }
    }
}

/// Every byte through the SIMD decode: the table's bits (NaN codes: a NaN of the same sign).
#[cfg(target_arch = "x86_64")]
#[test]
fn fp8_simd_decode_of_every_byte_equals_the_table() {
    use std::arch::x86_64::*;
    if !crate::cpu::has_avx2() {
        return;
    }
    fn all<D: x86::Decode32>(e5m2: bool) {
        let t = r::fp8_table(e5m2);
        for c in 0..8 {
            let bytes: [u8; 32] = std::array::from_fn(|i| (32 * c + i) as u8);
            let mut got = [0.0f32; 32];
            // SAFETY: AVX2 and F16C detected; 32 bytes decoded, 32 f32 stored.
            unsafe {
                for (k, v) in D::decode32(&bytes).iter().enumerate() {
                    _mm256_storeu_ps(got[8 * k..].as_mut_ptr(), *v);
                }
            }
            for (i, &b) in bytes.iter().enumerate() {
                let want = t[b as usize];
                if want.is_nan() {
                    let same_sign = got[i].is_sign_negative() == want.is_sign_negative();
                    assert!(got[i].is_nan() && same_sign, "byte {b:#04x} e5m2={e5m2}");
                } else {
                    assert_eq!(
                        got[i].to_bits(),
                        want.to_bits(),
                        "byte {b:#04x} e5m2={e5m2}"
                    );
                }
                assert_eq!(D::value(b).to_bits(), want.to_bits());
            }
        }
    }
    all::<x86::Fp8E4M3>(false);
    all::<x86::Fp8E5M2>(true);
}

#[cfg(target_arch = "x86_64")]
#[test]
fn fp8_simd_paths_are_bit_identical_to_references() {
    if !crate::cpu::has_avx2() {
        return;
    }
    let mut rng = Rng(0x0f8f_8f8f_1111_2222);
    for qtype in FP8 {
        let e5m2 = qtype == QType::Fp8E5M2;
        for nb in [1usize, 2, 7, 8, 9, 16, 23] {
            // blocks of 32, and whole rows of a length that is not a multiple of 8 (tails)
            for (k, bl) in [(nb * 32, 32), (nb * 13 + 5, nb * 13 + 5)] {
                let q = finite_fp8(&mut rng, k, qtype);
                let scales: Vec<f32> = (0..k.div_ceil(bl)).map(|_| rng.unit()).collect();
                let xs: Vec<Vec<f32>> = (0..4).map(|_| rng.normalish(k, 1.0)).collect();
                let x: [&[f32]; 4] = std::array::from_fn(|i| &xs[i][..]);
                let want = x.map(|x| r::dot_fp8(&q, &scales, bl, x, e5m2).to_bits());
                // SAFETY: AVX2 and F16C detected; lengths as documented.
                let got = unsafe {
                    if e5m2 {
                        x86::dot_fp8::<x86::Fp8E5M2, 4>(&q, &scales, bl, x)
                    } else {
                        x86::dot_fp8::<x86::Fp8E4M3, 4>(&q, &scales, bl, x)
                    }
                };
                assert_eq!(got.map(f32::to_bits), want, "{qtype:?} k={k} R=4");
                // SAFETY: as above.
                let one = unsafe {
                    if e5m2 {
                        x86::dot_fp8::<x86::Fp8E5M2, 1>(&q, &scales, bl, [x[2]])
                    } else {
                        x86::dot_fp8::<x86::Fp8E4M3, 1>(&q, &scales, bl, [x[2]])
                    }
                };
                assert_eq!(one[0].to_bits(), want[2], "{qtype:?} k={k} R=1");
            }
        }
    }
}

/// NaN codes (e4m3fn 0x7f / 0xff, e5m2 exponent 31) are user bytes the quantizer never writes:
/// no panic, a NaN output on every path (payloads may differ between paths).
#[test]
fn fp8_nan_codes_give_nan_not_panic() {
    for (qtype, code) in [
        (QType::Fp8E4M3, 0x7f),
        (QType::Fp8E4M3, 0xff),
        (QType::Fp8E5M2, 0x7e),
    ] {
        let (n, k) = (2, 96);
        let mut data = vec![0x38u8; n * k];
        data[k + 70] = code;
        let stats = [0.5f32, 0.25];
        let v = fp8_view(qtype, n, k, ScaleMode::Row, k, &data, &stats);
        let x = vec![1.0f32; 5 * k];
        let mut y = vec![0.0f32; 5 * n];
        qmatmul(&x, 5, &v, &mut y).unwrap();
        for mi in 0..5 {
            assert!(
                y[mi * n].is_finite() && y[mi * n + 1].is_nan(),
                "{qtype:?} {y:?}"
            );
        }
        let e5m2 = qtype == QType::Fp8E5M2;
        assert!(r::dot_fp8(&data[k..], &stats[1..], k, &x[..k], e5m2).is_nan());
    }
}

// ---------------------------------------------------------------- tq1_0, tq2_0 (q8_K)

/// The ternary formats and the offsets of their f16 scale.
const TERNARY: [(QType, &[usize]); 2] = [(QType::TQ1_0, &[52]), (QType::TQ2_0, &[64])];

/// The reference's integer sum is Σ v·q_x over the dequantized digits v (scale set to 1.0, so
/// the dequantizer, tested bit-exact against gguf-py and libggml, gives v in {-1, 0, 1}; tq2_0's
/// unused code 3 gives 2 in both), for arbitrary bytes.
#[test]
fn ternary_sums_equal_the_dequantized_digits() {
    let mut rng = Rng(0x7e57_7e57_0000_0001);
    for (qtype, halves) in TERNARY {
        let ts = qtype.info().type_size;
        let mut data = blocks(&mut rng, 64, ts, halves);
        for b in data.chunks_exact_mut(ts) {
            b[ts - 2..].copy_from_slice(&f16_from_f32(1.0));
        }
        for (i, blk) in data.chunks_exact(ts).enumerate() {
            let mut v = [0.0f32; QK_K];
            ggml_dequantize_row(qtype, blk, &mut v);
            let mut xq = [BlockQ8K::zeroed()];
            r::quantize_row_q8_k(&rng.normalish(QK_K, 1.0), &mut xq);
            let want: i32 = v
                .iter()
                .zip(&xq[0].qs)
                .map(|(&a, &q)| a as i32 * q as i32)
                .sum();
            let got = match qtype {
                QType::TQ1_0 => r::BlockK::sums(bytemuck::from_bytes::<BlockTQ1_0>(blk), &xq[0]),
                _ => r::BlockK::sums(bytemuck::from_bytes::<BlockTQ2_0>(blk), &xq[0]),
            };
            assert_eq!(got, (want, 0), "{qtype:?} block {i}");
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[test]
fn ternary_simd_paths_are_bit_identical_to_references() {
    if !crate::cpu::has_avx2() {
        return;
    }
    let mut rng = Rng(0x7e57_7e57_0000_0002);
    for nb in [1usize, 2, 3, 7, 8, 9, 16, 17] {
        check_k_simd::<BlockTQ1_0>(&mut rng, nb, TERNARY[0].1);
        check_k_simd::<BlockTQ2_0>(&mut rng, nb, TERNARY[1].1);
        check_ternary_row_z::<BlockTQ1_0>(&mut rng, nb, TERNARY[0].1);
        check_ternary_row_z::<BlockTQ2_0>(&mut rng, nb, TERNARY[1].1);
    }
}

/// The AVX-512 row kernel (`SumsK::dot_row_z`) against the reference, R = 1 and 4, with and
/// without the prefetch; skipped (None) where the CPU lacks AVX-512 VNNI/BW.
#[cfg(target_arch = "x86_64")]
fn check_ternary_row_z<W: x86::SumsK>(rng: &mut Rng, nb: usize, halves: &[usize]) {
    let name = std::any::type_name::<W>();
    let data = blocks(rng, nb, std::mem::size_of::<W>(), halves);
    let w: &[W] = bytemuck::cast_slice(&data);
    let rows: Vec<Vec<BlockQ8K>> = (0..4)
        .map(|i| {
            let mut q = vec![BlockQ8K::zeroed(); nb];
            r::quantize_row_q8_k(&rng.normalish(nb * QK_K, 0.5 + i as f32), &mut q);
            q
        })
        .collect();
    let x: [&[BlockQ8K]; 4] = std::array::from_fn(|i| &rows[i][..]);
    let want: [u32; 4] = std::array::from_fn(|i| r::dot_block_k(w, x[i]).to_bits());
    for long in [false, true] {
        // SAFETY: AVX2 detected by the caller; one activation block per weight block.
        let Some(got) = (unsafe { W::dot_row_z(w, x, [&[]; 4], long) }) else {
            assert!(!crate::cpu::has_vnni_bw(), "{name}: no AVX-512 kernel");
            return;
        };
        assert_eq!(
            got.map(f32::to_bits),
            want,
            "{name} nb={nb} R=4 long={long}"
        );
        // SAFETY: as above.
        let one = unsafe { W::dot_row_z(w, [x[2]], [&[]], long) }.unwrap()[0];
        assert_eq!(one.to_bits(), want[2], "{name} nb={nb} R=1 long={long}");
    }
}

/// `plan`'s q8_1 activations (the fast q8_0 quantizer plus `s`) are `reference::quantize_row_q8_1`'s
/// bits, block for block, on the pool and off it: random rows, all-zero blocks, ties at .5,
/// blocks whose max is subnormal (`1/d` overflows to inf: ggml's C cast rules) or at the limits
/// of f16.
#[test]
fn plan_q8_1_equals_reference() {
    let mut rng = Rng(0x0981_0981_0981_0981);
    let (m, k) = (6, 32 * 40);
    let mut x = rng.normalish(m * k, 3.0);
    x[32..64].iter_mut().for_each(|v| *v = 0.0);
    for (j, v) in x[64..96].iter_mut().enumerate() {
        *v = (j as f32 - 16.0) * 0.5; // amax 8, id 127 / 8: products at and near .5
    }
    x[96..128].iter_mut().for_each(|v| *v = 1e-40); // subnormal max: 1/d is inf
    x[128] = -2.0e-39;
    x[160..192]
        .iter_mut()
        .enumerate()
        .for_each(|(j, v)| *v = if j % 2 == 0 { 65504.0 * 127.0 } else { -1.0 });
    x[192..224].iter_mut().for_each(|v| *v = 6.0e-8);
    for par in [false, true] {
        let (blocks, s) = super::super::plan::quantize_q8_1(&x, m, k, par);
        let (want_b, _, _, want_s) = q8_1_row(&x);
        assert_eq!(blocks.len(), want_b.len());
        for (i, ((b, w), (s, ws))) in blocks
            .iter()
            .zip(&want_b)
            .zip(s.iter().zip(&want_s))
            .enumerate()
        {
            assert_eq!(b.d, w.d, "block {i} d (par {par})");
            assert_eq!(b.qs, w.qs, "block {i} quants (par {par})");
            assert_eq!(s.to_bits(), ws.to_bits(), "block {i} s (par {par})");
        }
    }
}
