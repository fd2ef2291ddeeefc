//! Unit tests of the matmul references (against an independent dequantization and an f64 dot,
//! within the bound derived below) and of the SIMD paths (bit for bit against the references),
//! on hand-built random blocks (the K-quant / nf4 / int8 quantizers live elsewhere).
//!
//! Bound. With activations quantized to x̂ (q8_0: x̂ = f16(d)·q, d = amax/127, |x - x̂| <=
//! d/2 + 127·d·2^-11 (the f16 rounding of d, |q| <= 127) + float rounding, below 0.57·d;
//! q8_K: x̂ = q/iscale, |x - x̂| <= d/2 (1 + 2^-20)), the exact dot differs from Σ w x by at most
//! Σ_b c·d_b·Σ_{i in b} |w_i|. The float part adds at most (n + 8)·2^-24·Σ|w_i||x̂_i| with n the
//! number of float operations along the longest path (blocks + lanes + 3); we allow
//! (n + 16)·2^-23·Σ|w||x| (|x̂| <= |x| + d).

use super::reference::{self as r, BlockQ8K};
use super::*;
use crate::error::Error;
use crate::formats::legacy;
use crate::formats::tensor::ScaleMode;
use bytemuck::Zeroable;

mod amx;
#[cfg(target_arch = "x86_64")]
mod amx_k;
mod bf16;
#[cfg(target_arch = "x86_64")]
mod bf16_avx2;
mod bf16_io;
pub(crate) mod formats;
mod fp8_rows;
mod gemm32_cases;
#[cfg(target_arch = "x86_64")]
mod gemm_avx2;
#[cfg(target_arch = "x86_64")]
mod gemm_k;
#[cfg(target_arch = "aarch64")]
mod gemm_neon;
#[cfg(target_arch = "aarch64")]
mod gemm_neon_k;
mod gint;
pub(crate) mod q16_rows;
#[cfg(target_arch = "x86_64")]
mod row32_avx2;
#[cfg(target_arch = "x86_64")]
mod row32_t;
#[cfg(target_arch = "x86_64")]
use row32_avx2::block_sums;

/// xorshift64: reproducible test data (also used by `neon/tests.rs`).
pub(crate) struct Rng(pub(crate) u64);

impl Rng {
    pub(crate) fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    pub(crate) fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
    /// Uniform in [-1, 1).
    pub(crate) fn unit(&mut self) -> f32 {
        (self.next() >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }
    pub(crate) fn normalish(&mut self, n: usize, scale: f32) -> Vec<f32> {
        (0..n)
            .map(|_| (self.unit() + self.unit() + self.unit()) * scale)
            .collect()
    }
}

/// `n` x `k` random weights (normal-ish, 0.05) quantized to `qtype`, and their dequantized values.
pub(crate) fn quantized(
    rng: &mut Rng,
    qtype: QType,
    n: usize,
    k: usize,
) -> (crate::formats::tensor::Quantized, Vec<f32>) {
    let w = rng.normalish(n * k, 0.05);
    let q = crate::quantize::quantize(
        &crate::input::Matrix::from_f32(&w, n, k).unwrap(),
        qtype,
        &crate::quantize::Options::default(),
    )
    .unwrap();
    let mut deq = vec![0f32; n * k];
    crate::quantize::dequantize(&q.view(), &mut deq).unwrap();
    (q, deq)
}

/// Random blocks of `size` bytes with a sane f16 at each of `half_at` (the scales).
pub(crate) fn blocks(rng: &mut Rng, nb: usize, size: usize, half_at: &[usize]) -> Vec<u8> {
    let mut v = rng.bytes(nb * size);
    for b in 0..nb {
        for &o in half_at {
            let h = f16_from_f32(rng.unit() * 0.01);
            v[b * size + o..b * size + o + 2].copy_from_slice(&h);
        }
    }
    v
}

/// Independent dequantization of one block (written from gguf-py's numpy code).
fn dequant(qtype: QType, blk: &[u8], out: &mut [f32]) {
    match qtype {
        QType::Q4_0 => legacy::dequantize_row_q4_0(blk, out),
        QType::Q5_0 => legacy::dequantize_row_q5_0(blk, out),
        QType::Q8_0 => legacy::dequantize_row_q8_0(blk, out),
        QType::IQ4NL => {
            let d = f16_to_f32([blk[0], blk[1]]);
            for j in 0..32 {
                let nib = (blk[2 + j % 16] >> (4 * (j / 16))) & 15;
                out[j] = d * r::KVALUES_IQ4NL[nib as usize] as f32;
            }
        }
        QType::Q4K | QType::Q5K => {
            let d = f16_to_f32([blk[0], blk[1]]);
            let dmin = f16_to_f32([blk[2], blk[3]]);
            let sc: [u8; 12] = blk[4..16].try_into().unwrap();
            let (qh, qs) = if qtype == QType::Q5K {
                (&blk[16..48], &blk[48..176])
            } else {
                (&blk[0..0], &blk[16..144])
            };
            for e in 0..256 {
                let (chunk, within) = (e / 64, e % 64);
                let byte = qs[32 * chunk + within % 32];
                let mut q = if within < 32 { byte & 15 } else { byte >> 4 };
                if qtype == QType::Q5K {
                    q |= ((qh[e % 32] >> (e / 32)) & 1) << 4;
                }
                let (s, m) = r::scale_min_k4(e / 32, &sc);
                out[e] = d * s as f32 * q as f32 - dmin * m as f32;
            }
        }
        QType::Q6K => {
            let (ql, qh, sc) = (&blk[0..128], &blk[128..192], &blk[192..208]);
            let d = f16_to_f32([blk[208], blk[209]]);
            for e in 0..256 {
                let (h, rest) = (e / 128, e % 128);
                let (k, l) = (rest / 32, rest % 32);
                let byte = ql[64 * h + 32 * (k % 2) + l];
                let low = if k < 2 { byte & 15 } else { byte >> 4 };
                let top = (qh[32 * h + l] >> (2 * k)) & 3;
                let q = (low | (top << 4)) as i32 - 32;
                out[e] = d * (sc[e / 16] as i8) as f32 * q as f32;
            }
        }
        _ => unreachable!(),
    }
}

fn view(qtype: QType, rows: usize, cols: usize, data: &[u8]) -> QuantizedView<'_> {
    QuantizedView {
        qtype,
        rows,
        cols,
        block_size: qtype.info().block_size,
        scale_mode: None,
        data,
        stats: &[],
        double_quant: None,
    }
}

const GGML_CASES: [(QType, &[usize]); 7] = [
    (QType::Q4_0, &[0]),
    (QType::Q5_0, &[0]),
    (QType::Q8_0, &[0]),
    (QType::IQ4NL, &[0]),
    (QType::Q4K, &[0, 2]),
    (QType::Q5K, &[0, 2]),
    (QType::Q6K, &[208]),
];

#[test]
fn ggml_references_within_derived_bound_of_f64_dot() {
    let mut rng = Rng(0x1234_5678_9abc_def1);
    for (qtype, halves) in GGML_CASES {
        let info = qtype.info();
        for nb in [1usize, 3, 8, 9, 17] {
            let k = nb * info.block_size;
            let n = 3;
            let data = blocks(&mut rng, n * nb, info.type_size, halves);
            for scale in [1.0f32, 1e-3, 1e3] {
                let x = rng.normalish(2 * k, scale);
                let mut y = vec![0.0f32; 2 * n];
                qmatmul(&x, 2, &view(qtype, n, k, &data), &mut y).unwrap();
                let is_k = info.block_size == QK_K;
                let (c, ab) = if is_k { (0.501, QK_K) } else { (0.57, QK8_0) };
                let mut w = vec![0.0f32; k];
                for row in 0..n {
                    let rb = &data[row * nb * info.type_size..(row + 1) * nb * info.type_size];
                    for (b, blk) in rb.chunks_exact(info.type_size).enumerate() {
                        let bs = info.block_size;
                        dequant(qtype, blk, &mut w[b * bs..(b + 1) * bs]);
                    }
                    for mi in 0..2 {
                        let xr = &x[mi * k..(mi + 1) * k];
                        let exact: f64 = w.iter().zip(xr).map(|(&a, &b)| a as f64 * b as f64).sum();
                        let mut bound = 0.0f64;
                        let mut wx = 0.0f64;
                        for (wb, xb) in w.chunks(ab).zip(xr.chunks(ab)) {
                            let amax = xb.iter().fold(0.0f32, |m, v| m.max(v.abs())) as f64;
                            let d = amax / 127.0;
                            let sw: f64 = wb.iter().map(|v| v.abs() as f64).sum();
                            bound += c * d * sw;
                            wx += wb
                                .iter()
                                .zip(xb)
                                .map(|(&a, &b)| a.abs() as f64 * (b.abs() as f64 + d))
                                .sum::<f64>();
                        }
                        bound += (nb + 16 + 8) as f64 * f64::powi(2.0, -23) * wx;
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

/// nf4 / int8 (q16 activations) against the float64 product of the dequantized weights: the
/// activation error (at most half a q16 step, d = amax / 32767, per element), nf4's code
/// rounding (0.5 / 8191 of absmax per weight) and float slack.
#[test]
fn q16_references_within_bound() {
    use r::q16::{NF4_ONE, Q16, Q16_MAX};
    let mut rng = Rng(0xfeed_beef_0123_4567);
    for (qtype, mode, bs) in [
        (QType::NF4, None, 64),
        (QType::NF4, None, 32),
        (QType::Int8, Some(ScaleMode::Row), 64),
        (QType::Int8, Some(ScaleMode::Tensor), 64),
        (QType::Int8, Some(ScaleMode::Block), 32),
    ] {
        for k in [64usize, 320, 1024, 4160] {
            let n = 5;
            let data = rng.bytes(qtype.row_bytes(k, bs) * n);
            let n_stats = match mode {
                Some(ScaleMode::Tensor) => 1,
                Some(ScaleMode::Row) => n,
                _ => n * k / bs,
            };
            let stats: Vec<f32> = (0..n_stats).map(|_| rng.unit().abs() * 0.1).collect();
            let mut x = rng.normalish(k, 1.0);
            x[k / 3] *= 50.0; // an outlier: its block's other values get coarser steps
            let v = QuantizedView {
                qtype,
                rows: n,
                cols: k,
                block_size: bs,
                scale_mode: mode,
                data: &data,
                stats: &stats,
                double_quant: None,
            };
            let mut y = vec![0.0f32; n];
            qmatmul(&x, 1, &v, &mut y).unwrap();
            let step: Vec<f64> = x
                .chunks(Q16)
                .map(|b| b.iter().fold(0.0f64, |a, v| a.max(v.abs() as f64)) / Q16_MAX as f64)
                .collect();
            for row in 0..n {
                let (mut exact, mut err, mut wx) = (0.0f64, 0.0f64, 0.0f64);
                for j in 0..k {
                    let (wq, s, code_err) = if qtype == QType::NF4 {
                        let b = data[row * k / 2 + j / 2];
                        let q = if j % 2 == 0 { b >> 4 } else { b & 15 };
                        let s = stats[row * k / bs + j / bs] as f64;
                        (r::NF4_CODE[q as usize] as f64, s, 0.5 / NF4_ONE as f64 * s)
                    } else {
                        let s = match mode {
                            Some(ScaleMode::Tensor) => stats[0],
                            Some(ScaleMode::Row) => stats[row],
                            _ => stats[row * k / bs + j / bs],
                        };
                        ((data[row * k + j] as i8) as f64, s as f64, 0.0)
                    };
                    let (w, xj, e) = (wq * s, x[j] as f64, 0.5 * step[j / Q16] * (1.0 + 1e-6));
                    exact += w * xj;
                    err += w.abs() * e + code_err * (xj.abs() + e);
                    wx += (w.abs() + code_err) * (xj.abs() + e);
                }
                let bound = err + (k / 16 + 32) as f64 * f64::powi(2.0, -23) * wx;
                let got = y[row] as f64;
                assert!(
                    (got - exact).abs() <= bound,
                    "{qtype:?} {mode:?} k={k}: {got} vs {exact} (bound {bound})"
                );
                // The bound is not vacuous: well under the weights' own scale.
                assert!(
                    bound < 1e-2 * wx + 1e-30,
                    "{qtype:?} k={k}: bound {bound} vs {wx}"
                );
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[test]
fn simd_paths_are_bit_identical_to_references() {
    if !crate::cpu::has_avx2() {
        return;
    }
    let mut rng = Rng(0x0bad_cafe_dead_f00d);
    for nb in [1usize, 2, 7, 8, 9, 16, 23] {
        for (qtype, halves) in GGML_CASES {
            let info = qtype.info();
            let k = nb * info.block_size;
            let data = blocks(&mut rng, nb, info.type_size, halves);
            let x = rng.normalish(k, 2.0);
            let (simd, scalar) = if info.block_size == QK8_0 {
                let mut xq = vec![BlockQ8_0::zeroed(); nb];
                r::quantize_row_q8_0(&x, &mut xq);
                let xd: Vec<f32> = xq.iter().map(|b| f16_to_f32(b.d)).collect();
                let xs = block_sums(&xq);
                // SAFETY: AVX2 and F16C detected above; one activation block per weight block.
                unsafe {
                    match qtype {
                        QType::Q4_0 => {
                            let w: &[BlockQ4_0] = bytemuck::cast_slice(&data);
                            (
                                x86::dot_block32(w, [&xq], [&xd], [&xs])[0],
                                r::dot_block32(w, &xq, &xd),
                            )
                        }
                        QType::Q8_0 => {
                            let w: &[BlockQ8_0] = bytemuck::cast_slice(&data);
                            (
                                x86::dot_block32(w, [&xq], [&xd], [&xs])[0],
                                r::dot_block32(w, &xq, &xd),
                            )
                        }
                        QType::Q5_0 => {
                            let w: &[BlockQ5_0] = bytemuck::cast_slice(&data);
                            (
                                x86::dot_block32(w, [&xq], [&xd], [&xs])[0],
                                r::dot_block32(w, &xq, &xd),
                            )
                        }
                        _ => {
                            let w: &[BlockIQ4NL] = bytemuck::cast_slice(&data);
                            (
                                x86::dot_block32(w, [&xq], [&xd], [&xs])[0],
                                r::dot_block32(w, &xq, &xd),
                            )
                        }
                    }
                }
            } else {
                let mut xq = vec![BlockQ8K::zeroed(); nb];
                r::quantize_row_q8_k(&x, &mut xq);
                // SAFETY: AVX2 detected above.
                unsafe {
                    match qtype {
                        QType::Q4K => {
                            let w: &[BlockQ4K] = bytemuck::cast_slice(&data);
                            for (wb, xb) in w.iter().zip(&xq) {
                                assert_eq!(wb.sums_avx2_for_test(xb), r::BlockK::sums(wb, xb));
                            }
                            (x86::dot_block_k(w, [&xq])[0], r::dot_block_k(w, &xq))
                        }
                        QType::Q5K => {
                            let w: &[BlockQ5K] = bytemuck::cast_slice(&data);
                            for (wb, xb) in w.iter().zip(&xq) {
                                assert_eq!(wb.sums_avx2_for_test(xb), r::BlockK::sums(wb, xb));
                            }
                            (x86::dot_block_k(w, [&xq])[0], r::dot_block_k(w, &xq))
                        }
                        _ => {
                            let w: &[BlockQ6K] = bytemuck::cast_slice(&data);
                            for (wb, xb) in w.iter().zip(&xq) {
                                assert_eq!(wb.sums_avx2_for_test(xb), r::BlockK::sums(wb, xb));
                            }
                            (x86::dot_block_k(w, [&xq])[0], r::dot_block_k(w, &xq))
                        }
                    }
                }
            };
            assert_eq!(simd.to_bits(), scalar.to_bits(), "{qtype:?} nb={nb}");
        }
    }
}

/// The multi-row kernels (4 activation rows per call) give each row's single-row bits.
#[test]
fn four_rows_at_once_equal_one_at_a_time() {
    let mut rng = Rng(0x5eed_5eed_5eed_5eed);
    for (qtype, halves) in GGML_CASES {
        let info = qtype.info();
        let (n, nb, m) = (3, 11, 9);
        let k = nb * info.block_size;
        let data = blocks(&mut rng, n * nb, info.type_size, halves);
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
    }
    for (qtype, mode, bs, k) in [
        (QType::NF4, None, 64, 320),
        (QType::Int8, Some(ScaleMode::Row), 64, 333),
        (QType::Int8, Some(ScaleMode::Block), 32, 320),
    ] {
        let (n, m) = (3, 6);
        let data = rng.bytes(qtype.row_bytes(k, bs) * n);
        let n_stats = if mode == Some(ScaleMode::Row) {
            n
        } else {
            n * k / bs
        };
        let stats: Vec<f32> = (0..n_stats).map(|_| rng.unit().abs()).collect();
        let x = rng.normalish(m * k, 1.0);
        let v = QuantizedView {
            qtype,
            rows: n,
            cols: k,
            block_size: bs,
            scale_mode: mode,
            data: &data,
            stats: &stats,
            double_quant: None,
        };
        let mut all = vec![0.0f32; m * n];
        qmatmul(&x, m, &v, &mut all).unwrap();
        for mi in 0..m {
            let mut one = vec![0.0f32; n];
            qmatmul(&x[mi * k..(mi + 1) * k], 1, &v, &mut one).unwrap();
            let want: Vec<u32> = one.iter().map(|v| v.to_bits()).collect();
            let got: Vec<u32> = all[mi * n..(mi + 1) * n]
                .iter()
                .map(|v| v.to_bits())
                .collect();
            assert_eq!(want, got, "{qtype:?} row {mi}");
        }
    }
}

#[cfg(target_arch = "x86_64")]
trait SumsForTest {
    fn sums_avx2_for_test(&self, x: &BlockQ8K) -> (i32, i32);
}

#[cfg(target_arch = "x86_64")]
impl<W: x86::SumsK> SumsForTest for W {
    fn sums_avx2_for_test(&self, x: &BlockQ8K) -> (i32, i32) {
        // SAFETY: only called after has_avx2() returned true.
        unsafe { self.sums_decoded(&self.decode(), x) }
    }
}

/// The word-wide unpacking the x86 and NEON kernels share, on every architecture.
#[test]
fn unpacked_k4_scales_equal_get_scale_min_k4() {
    let mut rng = Rng(0x1357_9bdf_2468_ace0);
    for _ in 0..2000 {
        let q: [u8; 12] = rng.bytes(12).try_into().unwrap();
        let (sc, m) = r::unpack_scales_k4(&q);
        for j in 0..8 {
            assert_eq!(
                (sc[j] as i32, m[j] as i32),
                r::scale_min_k4(j, &q),
                "{q:?} j={j}"
            );
        }
    }
}

#[test]
fn q8_k_activation_quantization() {
    let mut x: Vec<f32> = (0..512).map(|i| (i as f32 - 100.0) * 0.37).collect();
    x[300] = -500.0; // the block's signed max is negative: iscale > 0
    x[256..300].iter_mut().for_each(|v| *v = 0.0);
    let mut out = vec![BlockQ8K::zeroed(); 2];
    r::quantize_row_q8_k(&x, &mut out);
    for (b, blk) in out.iter().enumerate() {
        let xb = &x[b * 256..(b + 1) * 256];
        let max = xb
            .iter()
            .copied()
            .fold(0.0f32, |m, v| if v.abs() > m.abs() { v } else { m });
        let iscale = -127.0f32 / max;
        assert_eq!(blk.d, 1.0 / iscale);
        for (j, &q) in blk.qs.iter().enumerate() {
            let want = ((iscale * xb[j]) as f64).round_ties_even().min(127.0) as i8;
            assert_eq!(q, want, "block {b} element {j}");
        }
        for g in 0..16 {
            let s: i32 = blk.qs[16 * g..16 * g + 16].iter().map(|&q| q as i32).sum();
            assert_eq!(blk.bsums[g] as i32, s);
        }
    }
    let mut z = vec![BlockQ8K::zeroed(); 1];
    r::quantize_row_q8_k(&[0.0; 256], &mut z);
    assert_eq!(z[0].d, 0.0);
    assert!(z[0].qs.iter().all(|&q| q == 0));
}

/// `plan`'s chunked check finds the same first infinite or NaN value as a plain search: every
/// kind of non-finite value (NaNs with payloads and either sign, both infinities), alone or
/// followed by a second one, at chunk edges and inside, in lengths around the chunk size; the
/// largest finite values, subnormals and -0 pass.
#[test]
fn first_non_finite_matches_a_plain_search() {
    let bad = [
        f32::NAN,
        -f32::NAN,
        f32::from_bits(0x7f80_0001),
        f32::from_bits(0xffc0_1234),
        f32::INFINITY,
        f32::NEG_INFINITY,
    ];
    let fine = [f32::MAX, f32::MIN, f32::MIN_POSITIVE, 1e-45, -0.0, 0.0, 1.5];
    for len in [0usize, 1, 7, 255, 256, 257, 511, 512, 513, 128 * 576] {
        let x: Vec<f32> = (0..len).map(|i| fine[i % fine.len()]).collect();
        assert_eq!(plan::first_non_finite(&x), None, "len {len}");
        let spots = [0, 1, 255, 256, 257, len / 2, len.saturating_sub(1)];
        for (t, &b) in bad.iter().enumerate() {
            for &at in spots.iter().filter(|&&at| at < len) {
                let mut y = x.clone();
                y[at] = b;
                let later = (at + 1 + t * 97).min(len - 1);
                y[later] = bad[(t + 1) % bad.len()];
                let want = y.iter().position(|v| !v.is_finite());
                assert_eq!(plan::first_non_finite(&y), want, "len {len}, at {at}, {b}");
            }
        }
    }
}

#[test]
fn bad_shapes_are_errors() {
    let data = vec![0u8; 18 * 2];
    let x = vec![0.5f32; 64];
    let mut y = vec![0.0f32; 1];
    let v = view(QType::Q4_0, 1, 64, &data);
    assert!(qmatmul(&x, 1, &v, &mut y).is_ok());
    assert!(qmatmul(&x[..63], 1, &v, &mut y).is_err());
    assert!(qmatmul(&x, 2, &v, &mut y).is_err());
    assert!(qmatmul(&x, 0, &v, &mut y).is_err()); // x and y are not empty
    assert!(qmatmul(&[], 0, &v, &mut []).is_ok()); // an empty batch
    assert!(qmatmul(&x, 1, &v, &mut [0.0; 2]).is_err());
    assert!(qmatmul(&x, 1, &view(QType::Q4_0, 1, 64, &data[..35]), &mut y).is_err());
    assert!(qmatmul(&x, 1, &view(QType::F16, 1, 64, &data), &mut y).is_err()); // no kernel
    let mut bad_bs = view(QType::Q4_0, 1, 64, &data);
    bad_bs.block_size = 64;
    assert!(qmatmul(&x, 1, &bad_bs, &mut y).is_err());
    let mut nan = x.clone();
    nan[7] = f32::NAN;
    assert!(matches!(
        qmatmul(&nan, 1, &v, &mut y),
        Err(Error::NonFinite { row: 0, col: 7, .. })
    ));
    let nf4 = QuantizedView {
        qtype: QType::NF4,
        block_size: 64,
        data: &data[..32],
        stats: &[1.0, 2.0],
        ..view(QType::NF4, 1, 64, &data)
    };
    assert!(matches!(
        qmatmul(&x, 1, &nf4, &mut y),
        Err(Error::DataSize { .. })
    ));
    // int8 without a scale mode, then with too few scales
    let bytes = vec![1u8; 64];
    let mut int8 = QuantizedView {
        block_size: 64,
        ..view(QType::Int8, 1, 64, &bytes)
    };
    assert!(qmatmul(&x, 1, &int8, &mut y).is_err());
    int8.scale_mode = Some(ScaleMode::Row);
    assert!(matches!(
        qmatmul(&x, 1, &int8, &mut y),
        Err(Error::DataSize { .. })
    ));
    int8.stats = &[0.5];
    qmatmul(&x, 1, &int8, &mut y).unwrap();
    assert_eq!(y[0], 0.5 * 0.5 * 64.0);
}

/// Many rows of the bf16 GEMM's formats (where it runs, `x86::acts16::prepare` checks x while
/// it converts it; elsewhere the plan's own pass): an infinity or a NaN anywhere is a
/// `NonFinite` error naming its row and column (the first one), never a result.
#[test]
fn non_finite_rows_of_many_are_errors_on_every_path() {
    let (m, k) = (37usize, 96usize);
    let data = vec![0x37u8; k]; // nf4: K / 2 bytes a row, 2 rows; fp8: K bytes, 1 row
    let x: Vec<f32> = (0..m * k).map(|i| (i % 11) as f32 - 5.0).collect();
    let nf4 = QuantizedView {
        block_size: 32,
        stats: &[0.5; 6],
        ..view(QType::NF4, 2, k, &data)
    };
    let fp8 = QuantizedView {
        scale_mode: Some(ScaleMode::Row),
        stats: &[0.25],
        ..view(QType::Fp8E4M3, 1, k, &data)
    };
    for w in [&nf4, &fp8] {
        let mut y = vec![0.0f32; m * w.rows];
        assert!(qmatmul(&x, m, w, &mut y).is_ok(), "{:?}", w.qtype);
        for (row, col) in [(0usize, 0usize), (0, 95), (16, 33), (36, 95)] {
            for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
                let mut xb = x.clone();
                xb[row * k + col] = bad;
                // a second one later: the first is named
                xb[m * k - 1] = f32::NAN;
                let got = qmatmul(&xb, m, w, &mut y);
                assert!(
                    matches!(got, Err(Error::NonFinite { row: r, col: c, .. }) if (r, c) == (row, col)),
                    "{:?} {bad} at ({row}, {col}): {got:?}",
                    w.qtype
                );
            }
        }
    }
}

/// The tiled path (M >= 2: panels of weight rows times blocks of activation rows, split over
/// tasks) and the GEMM path (`gemm.rs`, from `GEMM_MIN_M` rows, K in chunks) give every output the reference's bits, for odd M, N not a multiple of the panel, K
/// with and without a partial group of 8 blocks, blocks of rows split unevenly, and M = 1 rows
/// long enough for the prefetching row kernels.
#[test]
fn tiles_equal_reference_for_any_m_and_n() {
    // (the int8 paths: on AMX the ggml formats take the bf16 tiles from `ggml_bf16_min_m`)
    let _int8 = crate::matmul::GgmlInt8::new();
    let mut rng = Rng(0x7113_7113_7113_7113);
    for (qtype, halves) in &GGML_CASES[..4] {
        let info = qtype.info();
        for (n, nb, m) in [
            (5, 9, 1),
            (1, 1, 2),
            (3, 7, 3),
            (8, 8, 5),
            (13, 9, 13),
            (17, 17, 67),
            (9, 130, 3),
            // the GEMM path (M >= 4, whole groups): K in one chunk, in 2 and in 3 (the last
            // partial), N with a partial panel, M over one block of rows
            (17, 8, 67),
            (24, 136, 6),
            (9, 264, 4),
            (16, 16, 9),
            // blocks of rows above `gemm::PANEL_MAJOR_MAX_M`: chunk by chunk over the panels
            (16, 136, 40),
            // K not a multiple of 256 on the GEMM path (the partial last group in the narrow
            // layout, `x86::gemm32::decode_tail`): SmolLM2's 576 (18 blocks), under one group,
            // one whole chunk plus 2 blocks, 9 groups plus 2; every tail length 1..7 (narrow
            // widths 2, 4 and 8), panel- and chunk-major blocks of rows; SmolLM2's k / v
            // projection (576x192) at M = 130 (blocks of rows split unevenly)
            (16, 18, 16),
            (9, 3, 5),
            (8, 66, 4),
            (17, 74, 9),
            (8, 1, 4),
            (16, 33, 7),
            (9, 12, 5),
            (16, 13, 6),
            (8, 22, 33),
            (17, 23, 40),
            (192, 18, 130),
            // M = 1 rows past `LONG_K` (the software prefetch): K = 14336, and 8 * 33 + 3 blocks
            (3, 448, 1),
            (5, 267, 1),
        ] {
            let k = nb * info.block_size;
            let data = blocks(&mut rng, n * nb, info.type_size, halves);
            let x = rng.normalish(m * k, 2.0);
            let mut y = vec![0.0f32; m * n];
            qmatmul(&x, m, &view(*qtype, n, k, &data), &mut y).unwrap();
            let mut y1 = vec![0.0f32; m * n];
            crate::parallel::set_num_threads(1);
            let one = qmatmul(&x, m, &view(*qtype, n, k, &data), &mut y1);
            crate::parallel::set_num_threads(0);
            one.unwrap();
            assert!(
                y.iter().zip(&y1).all(|(a, b)| a.to_bits() == b.to_bits()),
                "{qtype:?} n={n} nb={nb} m={m}: 1 thread differs"
            );
            let mut xq = vec![BlockQ8_0::zeroed(); nb];
            for mi in 0..m {
                r::quantize_row_q8_0(&x[mi * k..(mi + 1) * k], &mut xq);
                let xd: Vec<f32> = xq.iter().map(|b| f16_to_f32(b.d)).collect();
                for row in 0..n {
                    let wr = &data[row * nb * info.type_size..(row + 1) * nb * info.type_size];
                    let want = match qtype {
                        QType::Q4_0 => {
                            r::dot_block32::<BlockQ4_0>(bytemuck::cast_slice(wr), &xq, &xd)
                        }
                        QType::Q5_0 => {
                            r::dot_block32::<BlockQ5_0>(bytemuck::cast_slice(wr), &xq, &xd)
                        }
                        QType::Q8_0 => {
                            r::dot_block32::<BlockQ8_0>(bytemuck::cast_slice(wr), &xq, &xd)
                        }
                        _ => r::dot_block32::<BlockIQ4NL>(bytemuck::cast_slice(wr), &xq, &xd),
                    };
                    let got = y[mi * n + row];
                    assert_eq!(
                        got.to_bits(),
                        want.to_bits(),
                        "{qtype:?} n={n} nb={nb} m={m} row {row} act row {mi}: {got} vs {want}"
                    );
                }
            }
        }
    }
}

/// q4_1 / q5_1 (q8_1 activations, the `m·s` term) through the paired 512-bit tiles where the
/// CPU has them: every output the reference's bits, for N with and without an odd panel (the
/// last rows take the row kernels), K with and without a partial group, odd M, uneven blocks of
/// rows, and any thread count.
#[test]
fn min32_tiles_equal_reference() {
    // (the int8 paths: on AMX the ggml formats take the bf16 tiles from `ggml_bf16_min_m`)
    let _int8 = crate::matmul::GgmlInt8::new();
    let mut rng = Rng(0x5eed_4151_5eed_4151);
    for qtype in [QType::Q4_1, QType::Q5_1] {
        let info = qtype.info();
        for (n, nb, m) in [
            (8, 8, 2),
            (13, 9, 13),
            (17, 17, 67),
            (16, 130, 5),
            (3, 3, 4),
            // the GEMM path (see `tiles_equal_reference_for_any_m_and_n`)
            (16, 136, 6),
            (16, 136, 40),
            (9, 264, 4),
            (24, 8, 67),
            // K not a multiple of 256 on the GEMM path (see above): every tail length
            (16, 18, 16),
            (9, 3, 5),
            (8, 74, 9),
            (8, 1, 4),
            (16, 12, 5),
            (16, 13, 6),
            (8, 22, 33),
            (17, 23, 40),
            (192, 18, 130),
        ] {
            let k = nb * info.block_size;
            let data = blocks(&mut rng, n * nb, info.type_size, &[0, 2]);
            let x = rng.normalish(m * k, 2.0);
            let w = view(qtype, n, k, &data);
            let mut y = vec![0.0f32; m * n];
            qmatmul(&x, m, &w, &mut y).unwrap();
            let mut y1 = vec![0.0f32; m * n];
            crate::parallel::set_num_threads(1);
            let one = qmatmul(&x, m, &w, &mut y1);
            crate::parallel::set_num_threads(0);
            one.unwrap();
            let mut xq = vec![r::BlockQ8_1::zeroed(); nb];
            for mi in 0..m {
                r::quantize_row_q8_1(&x[mi * k..(mi + 1) * k], &mut xq);
                let xb: Vec<BlockQ8_0> =
                    xq.iter().map(|b| BlockQ8_0 { d: b.d, qs: b.qs }).collect();
                let xd: Vec<f32> = xq.iter().map(|b| f16_to_f32(b.d)).collect();
                let xs: Vec<f32> = xq.iter().map(|b| f16_to_f32(b.s)).collect();
                for row in 0..n {
                    let wr = &data[row * nb * info.type_size..(row + 1) * nb * info.type_size];
                    let want = if qtype == QType::Q4_1 {
                        r::dot_block32_min::<BlockQ4_1>(bytemuck::cast_slice(wr), &xb, &xd, &xs)
                    } else {
                        r::dot_block32_min::<BlockQ5_1>(bytemuck::cast_slice(wr), &xb, &xd, &xs)
                    };
                    for (got, what) in [(y[mi * n + row], "pool"), (y1[mi * n + row], "1 thread")] {
                        assert_eq!(
                            got.to_bits(),
                            want.to_bits(),
                            "{qtype:?} {what} n={n} nb={nb} m={m} row {row} act row {mi}: {got} vs {want}"
                        );
                    }
                }
            }
        }
    }
}

/// The K-quant tiles (groups of 8 super-blocks, tails in the row kernel's code) give every
/// output the reference's bits.
#[test]
fn k_quant_tiles_equal_reference() {
    let mut rng = Rng(0x0dd5_0dd5_0dd5_0dd5);
    for (qtype, halves) in &GGML_CASES[4..] {
        let info = qtype.info();
        // (3, 57, 1): M = 1, K = 14592 > `LONG_K` (the prefetching row kernel)
        for (n, nb, m) in [
            (5, 9, 1),
            (3, 1, 2),
            (8, 8, 5),
            (13, 9, 13),
            (9, 17, 3),
            (3, 57, 1),
        ] {
            let k = nb * info.block_size;
            let data = blocks(&mut rng, n * nb, info.type_size, halves);
            let x = rng.normalish(m * k, 2.0);
            let mut y = vec![0.0f32; m * n];
            qmatmul(&x, m, &view(*qtype, n, k, &data), &mut y).unwrap();
            let mut xq = vec![BlockQ8K::zeroed(); nb];
            for mi in 0..m {
                r::quantize_row_q8_k(&x[mi * k..(mi + 1) * k], &mut xq);
                for row in 0..n {
                    let wr = &data[row * nb * info.type_size..(row + 1) * nb * info.type_size];
                    let want = match qtype {
                        QType::Q4K => r::dot_block_k::<BlockQ4K>(bytemuck::cast_slice(wr), &xq),
                        QType::Q5K => r::dot_block_k::<BlockQ5K>(bytemuck::cast_slice(wr), &xq),
                        _ => r::dot_block_k::<BlockQ6K>(bytemuck::cast_slice(wr), &xq),
                    };
                    let got = y[mi * n + row];
                    assert_eq!(
                        got.to_bits(),
                        want.to_bits(),
                        "{qtype:?} n={n} nb={nb} m={m} row {row} act row {mi}: {got} vs {want}"
                    );
                }
            }
        }
    }
}

/// Activations of mixed magnitude: mostly normal-ish, some tiny (subnormal products), some
/// large, some exact zeros.
pub(crate) fn mixed_acts(rng: &mut Rng, n: usize) -> Vec<f32> {
    (0..n)
        .map(|i| {
            let v = (rng.unit() + rng.unit()) * 2.0;
            match i % 37 {
                3 => v * f32::powi(2.0, -140),
                11 => v * f32::powi(2.0, 60),
                19 => 0.0,
                _ => v,
            }
        })
        .collect()
}

/// Through `qmatmul` (every M, the row kernels with 1 to 4 activation rows, and the CPU's
/// kernels: AVX-512, AVX2, NEON or scalar) each output equals its scalar reference.
#[test]
fn qmatmul_many_rows_equal_the_f32_and_q16_references_row_by_row() {
    use crate::matmul::reference::q16::{self, q16_row_len, quantize_row_q16, NF4_ONE, Q16};
    let mut rng = Rng(0x9a11_e1d0_0000_0001);
    let cases: [(QType, Option<ScaleMode>, usize, usize); 22] = [
        // past `Q16_LONG_K_INTEL`: pieces over panels on every CPU
        (QType::NF4, None, 64, 16512),
        (QType::Int8, Some(ScaleMode::Block), 32, 16416),
        (QType::NF4, None, 64, 8256),
        (QType::Int8, Some(ScaleMode::Row), 64, 8257),
        (QType::Int8, Some(ScaleMode::Block), 32, 8224),
        (QType::NF4, None, 64, 4160),
        (QType::NF4, None, 32, 2144),
        (QType::NF4, None, 256, 2048),
        (QType::Int8, Some(ScaleMode::Row), 64, 2333),
        (QType::Int8, Some(ScaleMode::Tensor), 64, 1088),
        (QType::Int8, Some(ScaleMode::Block), 32, 2144),
        (QType::Int8, Some(ScaleMode::Block), 128, 3072),
        (QType::Fp8E4M3, Some(ScaleMode::Row), 64, 2100),
        (QType::Fp8E4M3, Some(ScaleMode::Block), 64, 1280),
        (QType::Fp8E5M2, Some(ScaleMode::Row), 64, 1100),
        (QType::Fp8E5M2, Some(ScaleMode::Block), 32, 1056),
        // long rows (M = 1: pieces of 4096 over panels of 4, `rows_bytes.rs`, and a tail)
        (QType::Fp8E4M3, Some(ScaleMode::Row), 64, 9000),
        (QType::Fp8E4M3, Some(ScaleMode::Block), 32, 4160),
        (QType::Fp8E5M2, Some(ScaleMode::Block), 64, 8256),
        // one scale a row and K a multiple of 64: a panel's rows in one pass
        // (`dot_bytes_piece_rows`), in pieces and whole
        (QType::Fp8E4M3, Some(ScaleMode::Row), 64, 8256),
        (QType::Fp8E4M3, Some(ScaleMode::Tensor), 64, 2112),
        (QType::Fp8E5M2, Some(ScaleMode::Row), 64, 4160),
    ];
    for (qtype, mode, bs, k) in cases {
        let n = 7;
        let mut data = rng.bytes(qtype.row_bytes(k, bs) * n);
        if matches!(qtype, QType::Fp8E4M3 | QType::Fp8E5M2) {
            let t = r::fp8_table(qtype == QType::Fp8E5M2);
            for b in data.iter_mut() {
                if !t[*b as usize].is_finite() {
                    *b = 0;
                }
            }
            if qtype == QType::Fp8E4M3 {
                data[3 * k + k / 2] = 0x7f;
            }
        }
        let n_stats = match mode {
            Some(ScaleMode::Tensor) => 1,
            Some(ScaleMode::Row) => n,
            _ => n * k / bs,
        };
        let stats: Vec<f32> = (0..n_stats).map(|_| rng.unit().abs() + 0.01).collect();
        let v = QuantizedView {
            qtype,
            rows: n,
            cols: k,
            block_size: bs,
            scale_mode: mode,
            data: &data,
            stats: &stats,
            double_quant: None,
        };
        let rb = qtype.row_bytes(k, bs);
        let row_stats = |row: usize| -> &[f32] {
            match mode {
                Some(ScaleMode::Tensor) => &stats[..],
                Some(ScaleMode::Row) => &stats[row..row + 1],
                _ => &stats[row * k / bs..(row + 1) * k / bs],
            }
        };
        let bl = if matches!(mode, Some(ScaleMode::Row | ScaleMode::Tensor)) {
            k
        } else {
            bs
        };
        // Below `GEMM16_MIN_M` and the small-M tiles' 8 rows (`x86::amx_bf16_small::MIN_M`):
        // from there on the bf16 GEMM may run (`tests/bf16.rs`).
        // e4m3 also with every |x| < 2^8: decoded straight to f32 (`x86::Fp8E4M3F32`)
        let smalls: &[bool] = if qtype == QType::Fp8E4M3 {
            &[false, true]
        } else {
            &[false]
        };
        for (m, &small) in [1usize, 2, 3, 5, 7]
            .into_iter()
            .flat_map(|m| smalls.iter().map(move |s| (m, s)))
        {
            let mut x = mixed_acts(&mut rng, m * k);
            if small {
                let edge = f32::from_bits(256.0f32.to_bits() - 1);
                for v in x.iter_mut().filter(|v| v.abs() >= 256.0) {
                    *v = edge.copysign(*v);
                }
            }
            #[cfg(target_arch = "x86_64")]
            {
                let p = plan(&x, m, &v, m * n).unwrap();
                assert_eq!(
                    p.e4m3_f32,
                    small && (p.avx512 || p.fp8_pieces()),
                    "{qtype:?} k={k} m={m}"
                );
            }
            let mut y = vec![0.0f32; m * n];
            qmatmul(&x, m, &v, &mut y).unwrap();
            for mi in 0..m {
                for row in 0..n {
                    let (w, xr) = (&data[row * rb..(row + 1) * rb], &x[mi * k..(mi + 1) * k]);
                    let per = if qtype == QType::NF4 { NF4_ONE } else { 1.0 };
                    let mut xq = vec![0i16; q16_row_len(k)];
                    let mut xd = vec![0.0f32; q16_row_len(k) / Q16];
                    quantize_row_q16(xr, per, &mut xq, &mut xd);
                    let want = match qtype {
                        QType::NF4 => q16::dot_nf4_q16(w, row_stats(row), bs, &xq, &xd),
                        QType::Int8 => q16::dot_int8_q16(w, row_stats(row), bl, &xq, &xd),
                        _ => r::dot_fp8(w, row_stats(row), bl, xr, qtype == QType::Fp8E5M2),
                    };
                    let got = y[mi * n + row];
                    assert!(
                        got.to_bits() == want.to_bits() || (got.is_nan() && want.is_nan()),
                        "{qtype:?} {mode:?} k={k} m={m} ({mi}, {row}): {got:e} vs {want:e}"
                    );
                }
            }
        }
    }
}

/// `has_gemm` (what the native runtime asks) says what `plan` chooses, for every format with a
/// kernel here and M around the threshold.
#[test]
fn has_gemm_matches_the_plan() {
    let mut rng = Rng(0x6e33_6e33_6e33_6e33);
    let mut cases: Vec<(QType, &[usize])> = GGML_CASES.to_vec();
    cases.extend([
        (QType::Q4_1, &[0, 2][..]),
        (QType::Q5_1, &[0, 2][..]),
        (QType::Q2K, &[80, 82][..]),
        (QType::Q3K, &[108][..]),
        (QType::IQ4XS, &[0][..]),
    ]);
    for &(qtype, halves) in &cases {
        let info = qtype.info();
        let (n, k) = (8, 512);
        let data = blocks(&mut rng, n * k / info.block_size, info.type_size, halves);
        let w = view(qtype, n, k, &data);
        for m in [1, 2, 3, 4, 16] {
            let x = rng.normalish(m * k, 1.0);
            let p = plan(&x, m, &w, m * n).unwrap();
            // (the GEMM of `gemm.rs` / `gemm_k.rs`, or from `ggml_bf16_min_m` the bf16 one)
            #[cfg(target_arch = "x86_64")]
            let on = p.gemm || p.bf16.is_some();
            #[cfg(target_arch = "aarch64")]
            let on = p.gemm_neon.is_some();
            #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
            let on = p.gemm;
            assert_eq!(on, has_gemm(qtype, m, k), "{qtype:?} m={m}");
        }
    }
    // Which formats have the path (on a CPU with AVX-512 VNNI / BW).
    #[cfg(target_arch = "x86_64")]
    if use_simd() && use_vnni() && crate::cpu::has_vnni_bw() {
        assert!(has_gemm(QType::Q4_0, 4, 512) && !has_gemm(QType::Q4_0, 3, 512));
        assert!(
            has_gemm(QType::Q4K, 4, 512)
                && has_gemm(QType::Q6K, 16, 512)
                && !has_gemm(QType::Q4K, 3, 512)
        );
    }
    // aarch64: every format of the NEON GEMM from 2 rows where the CPU has dotprod (qemu
    // `-cpu max` / `cortex-a76`), none without (`cortex-a53`, FERROQUANT_MAX_ISA=neon).
    #[cfg(target_arch = "aarch64")]
    {
        let on = use_simd() && crate::cpu::has_dotprod() && crate::config::neon_gemm();
        for (qtype, _) in cases {
            assert_eq!(has_gemm(qtype, 2, 512), on, "{qtype:?}");
            assert!(!has_gemm(qtype, 1, 512), "{qtype:?}");
        }
        assert!(!has_gemm(QType::NF4, 16, 512) && !has_gemm(QType::TQ2_0, 16, 512));
    }
}
