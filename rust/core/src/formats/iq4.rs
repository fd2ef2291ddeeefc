//! ggml's 4-bit non-linear formats iq4_nl and iq4_xs: a scalar reference that follows
//! `quantize_row_iq4_nl_impl` of ggml-quants.c operation for operation (same f32 expressions in
//! the same order, no fused multiply-add: libggml-base is built without FMA), so the bytes are
//! identical to libggml's `ggml_quantize_chunk` with and without quant_weights (the imatrix).
//!
//! Both formats store each weight as a 4-bit index into the 16-entry table `KVALUES_IQ4NL`.
//! iq4_nl: blocks of 32 with one f16 scale (a "super-block" of one block).
//! iq4_xs: super-blocks of 256 = 8 blocks of 32; an f16 super scale `d` and, per block, a 6-bit
//! signed scale `ls - 32` split into a low nibble (`scales_l`) and 2 high bits (`scales_h`).
//! Dequantization: y = d * kvalues[q] (nl), y = (d * (ls - 32)) * kvalues[q] (xs), as
//! `dequantize_row_iq4_*` and gguf-py do.

use super::blocks::{f16_from_f32, f16_to_f32, nearest_int, BlockIQ4NL, BlockIQ4XS, QK4_NL, QK_K};
use crate::qtype::QType;

/// ggml-common.h `kvalues_iq4nl`, sorted ascending.
pub const KVALUES_IQ4NL: [i8; 16] = [
    -127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113,
];

use super::k_quants::common::GROUP_MAX_EPS;

/// Weights per block inside a super-block (both formats).
const BLOCK: usize = 32;

/// Number of scale candidates on each side of the first guess (`ntry` in ggml; 7 for
/// `quantize_iq4_nl` / `quantize_iq4_xs`, the entry points `ggml_quantize_chunk` uses).
const NTRY: i32 = 7;

/// Twice the midpoints between neighbouring table values (exact small integers).
const MID2_IQ4NL: [f32; 15] = {
    let mut m = [0.0f32; 15];
    let mut i = 0;
    while i < 15 {
        m[i] = (KVALUES_IQ4NL[i] as i32 + KVALUES_IQ4NL[i + 1] as i32) as f32;
        i += 1;
    }
    m
};

/// ggml's `best_index_int8(16, kvalues_iq4nl, x)`: the index of the table value nearest to `x`,
/// ties going to the larger value. Computed as the number of midpoints at or below `x`
/// (`2x >= val[i-1] + val[i]`, exact on both sides: doubling is exact and the sums are small
/// integers), which is what current upstream ggml's branchless search computes, without
/// branches. The libggml we test against (llama-cpp-python 0.3.36) still bisects and then
/// compares the two distances `x - val[mu-1] < val[mu] - x` in f32; for every non-NaN `x` the
/// two agree (near each midpoint both distances are exact in f32), which the unit test
/// `best_index_matches_ggml_bisection` checks over every midpoint and its float neighbours.
/// They differ only for NaN, which occurs when a block's weighted sums overflow f32 (without an
/// imatrix the weights are x^2, so from |x| of order 1e11): the bisection returns 15, the
/// branchless search 0. We return the installed peer's 15.
#[inline]
pub fn best_index_int8(x: f32) -> usize {
    if x.is_nan() {
        return 15;
    }
    let x2 = x + x;
    MID2_IQ4NL.iter().map(|&m| (x2 >= m) as usize).sum()
}

/// The weight of element `j` of a block: `qw * sqrt(sigma2 + x^2)` with an imatrix, `x^2`
/// without (ggml's choice in `quantize_row_iq4_nl_impl`).
#[inline]
fn weights(xb: &[f32], qw: Option<&[f32]>, sigma2: f32, out: &mut [f32; BLOCK]) {
    match qw {
        Some(qw) => {
            for ((w, &x), &q) in out.iter_mut().zip(xb).zip(qw) {
                *w = q * (sigma2 + x * x).sqrt();
            }
        }
        None => {
            for (w, &x) in out.iter_mut().zip(xb) {
                *w = x * x;
            }
        }
    }
}

/// The best scale of one block of 32 (the `for ib` loop body of `quantize_row_iq4_nl_impl` with
/// ntry = 7): a first guess from the signed extreme, then 2*ntry+1 candidate inverse scales
/// `(itry + kvalues[0]) / max`, each scored by the weighted least-squares criterion
/// `sumqx^2 / sumq2`; the winner's least-squares scale `sumqx / sumq2` is returned.
/// All-zero blocks (`amax < GROUP_MAX_EPS`) get scale 0.
fn block_scale(xb: &[f32], w: &[f32; BLOCK]) -> f32 {
    let values = &KVALUES_IQ4NL;
    let (mut amax, mut max) = (0.0f32, 0.0f32);
    for &v in xb {
        let ax = v.abs();
        if ax > amax {
            amax = ax;
            max = v;
        }
    }
    if amax < GROUP_MAX_EPS {
        return 0.0;
    }
    let v0 = values[0] as f32;
    // ntry > 0, so ggml starts from d = -max / values[0].
    let mut d = -max / v0;
    let id = 1.0 / d;
    let (mut sumqx, mut sumq2) = (0.0f32, 0.0f32);
    for (&x, &wj) in xb.iter().zip(w) {
        let q = values[best_index_int8(id * x)] as f32;
        sumqx += wj * q * x;
        sumq2 += wj * q * q;
    }
    // `d = sumq2 > 0 ? sumqx/sumq2 : 0.f` as in the tested libggml and current ggml (early
    // releases divided unguarded: NaN when every weight of the block is 0, e.g. an imatrix with
    // zeros there).
    d = if sumq2 > 0.0 { sumqx / sumq2 } else { 0.0 };
    let mut best = d * sumqx;
    for itry in -NTRY..=NTRY {
        let id = (itry as f32 + v0) / max;
        let (mut sumqx, mut sumq2) = (0.0f32, 0.0f32);
        for (&x, &wj) in xb.iter().zip(w) {
            let q = values[best_index_int8(id * x)] as f32;
            sumqx += wj * q * x;
            sumq2 += wj * q * q;
        }
        if sumq2 > 0.0 && sumqx * sumqx > best * sumq2 {
            d = sumqx / sumq2;
            best = d * sumqx;
        }
    }
    d
}

/// `sigma2 = 2 * mean(x^2)` over the super-block, as ggml computes it (sum first, then one
/// multiplication by `2 / super_block_size`).
#[inline]
fn sigma2(x: &[f32]) -> f32 {
    let mut s = 0.0f32;
    for &v in x {
        s += v * v;
    }
    s * (2.0f32 / x.len() as f32)
}

/// Pack 32 indices into 16 bytes: element j in the low nibble of byte j, element j+16 in the
/// high nibble.
#[inline]
fn pack32(l: &[u8], qs: &mut [u8]) {
    for j in 0..16 {
        qs[j] = l[j] | (l[j + 16] << 4);
    }
}

fn quantize_block_nl(x: &[f32], qw: Option<&[f32]>, b: &mut BlockIQ4NL) {
    let mut w = [0.0f32; BLOCK];
    weights(x, qw, sigma2(x), &mut w);
    let scale = block_scale(x, &w);
    b.d = f16_from_f32(scale);
    // ntry > 0: the indices are recomputed from the final (f32) scale.
    let id = if scale != 0.0 { 1.0 / scale } else { 0.0 };
    let mut l = [0u8; QK4_NL];
    for (lj, &v) in l.iter_mut().zip(x) {
        *lj = best_index_int8(id * v) as u8;
    }
    pack32(&l, &mut b.qs);
}

fn quantize_block_xs(x: &[f32], qw: Option<&[f32]>, b: &mut BlockIQ4XS) {
    const NB: usize = QK_K / BLOCK;
    let s2 = sigma2(x);
    let mut scales = [0.0f32; NB];
    let (mut max_scale, mut amax_scale) = (0.0f32, 0.0f32);
    let mut w = [0.0f32; BLOCK];
    for (ib, xb) in x.chunks_exact(BLOCK).enumerate() {
        weights(xb, qw.map(|q| &q[ib * BLOCK..(ib + 1) * BLOCK]), s2, &mut w);
        let d = block_scale(xb, &w);
        scales[ib] = d;
        if d.abs() > amax_scale {
            amax_scale = d.abs();
            max_scale = d;
        }
    }
    // The super scale maps the largest |block scale| to -32 (so an all-zero super-block stores
    // d = -0.0, f16 0x8000, as ggml does); block scales are rounded to 6-bit signed integers.
    let d = -max_scale / 32.0;
    b.d = f16_from_f32(d);
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    let mut scales_h = 0u16;
    b.scales_l = [0; QK_K / 64];
    let mut l = [0u8; BLOCK];
    for (ib, xb) in x.chunks_exact(BLOCK).enumerate() {
        let ls = nearest_int(id * scales[ib]).clamp(-32, 31);
        // The indices use the f32 super scale, not its f16 rounding (as ggml).
        let dl = d * ls as f32;
        let idl = if dl != 0.0 { 1.0 / dl } else { 0.0 };
        for (lj, &v) in l.iter_mut().zip(xb) {
            *lj = best_index_int8(idl * v) as u8;
        }
        pack32(&l, &mut b.qs[ib * 16..(ib + 1) * 16]);
        let ls = (ls + 32) as u8;
        b.scales_l[ib / 2] |= (ls & 0xf) << (4 * (ib % 2));
        scales_h |= ((ls >> 4) as u16) << (2 * ib);
    }
    b.scales_h = scales_h.to_le_bytes();
}

/// Quantize one row (a whole number of blocks) to iq4_nl or iq4_xs; `imatrix` is ggml's
/// `quant_weights` for this row (one value per column).
pub fn quantize_row(qtype: QType, x: &[f32], out: &mut [u8], imatrix: Option<&[f32]>) {
    match qtype {
        QType::IQ4NL => {
            let blocks: &mut [BlockIQ4NL] = bytemuck::cast_slice_mut(out);
            for (i, (b, xb)) in blocks.iter_mut().zip(x.chunks_exact(QK4_NL)).enumerate() {
                let qw = imatrix.map(|w| &w[i * QK4_NL..(i + 1) * QK4_NL]);
                quantize_block_nl(xb, qw, b);
            }
        }
        QType::IQ4XS => {
            let blocks: &mut [BlockIQ4XS] = bytemuck::cast_slice_mut(out);
            for (i, (b, xb)) in blocks.iter_mut().zip(x.chunks_exact(QK_K)).enumerate() {
                let qw = imatrix.map(|w| &w[i * QK_K..(i + 1) * QK_K]);
                quantize_block_xs(xb, qw, b);
            }
        }
        _ => unreachable!("{qtype:?} is not an iq4 format"),
    }
}

/// Dequantize one row of iq4_nl or iq4_xs (bit-exact with `dequantize_row_iq4_*` and gguf-py).
pub fn dequantize_row(qtype: QType, data: &[u8], y: &mut [f32]) {
    let values = &KVALUES_IQ4NL;
    match qtype {
        QType::IQ4NL => {
            let blocks: &[BlockIQ4NL] = bytemuck::cast_slice(data);
            for (b, y) in blocks.iter().zip(y.chunks_exact_mut(QK4_NL)) {
                let d = f16_to_f32(b.d);
                for j in 0..QK4_NL / 2 {
                    y[j] = d * values[(b.qs[j] & 0xf) as usize] as f32;
                    y[j + QK4_NL / 2] = d * values[(b.qs[j] >> 4) as usize] as f32;
                }
            }
        }
        QType::IQ4XS => {
            let blocks: &[BlockIQ4XS] = bytemuck::cast_slice(data);
            for (b, y) in blocks.iter().zip(y.chunks_exact_mut(QK_K)) {
                let d = f16_to_f32(b.d);
                let scales_h = u16::from_le_bytes(b.scales_h);
                for (ib, (y, qs)) in y
                    .chunks_exact_mut(BLOCK)
                    .zip(b.qs.chunks_exact(16))
                    .enumerate()
                {
                    let lo = (b.scales_l[ib / 2] >> (4 * (ib % 2))) & 0xf;
                    let hi = ((scales_h >> (2 * ib)) & 3) as u8;
                    let ls = (lo | (hi << 4)) as i32;
                    let dl = d * (ls - 32) as f32;
                    for j in 0..16 {
                        y[j] = dl * values[(qs[j] & 0xf) as usize] as f32;
                        y[j + 16] = dl * values[(qs[j] >> 4) as usize] as f32;
                    }
                }
            }
        }
        _ => unreachable!("{qtype:?} is not an iq4 format"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// ggml's `best_index_int8` as the tested libggml compiles it: clamp to the ends, bisect,
    /// then compare the two distances in f32.
    fn best_index_bisect(val: &[i8; 16], x: f32) -> usize {
        let n = val.len();
        if x <= val[0] as f32 {
            return 0;
        }
        if x >= val[n - 1] as f32 {
            return n - 1;
        }
        let (mut ml, mut mu) = (0usize, n - 1);
        while mu - ml > 1 {
            let mav = (ml + mu) / 2;
            if x < val[mav] as f32 {
                mu = mav;
            } else {
                ml = mav;
            }
        }
        if x - (val[mu - 1] as f32) < val[mu] as f32 - x {
            mu - 1
        } else {
            mu
        }
    }

    /// A small deterministic generator (xorshift) so the tests need no extra crate.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
        /// Roughly normal, from the sum of four uniforms.
        fn normal(&mut self) -> f32 {
            let mut s = 0.0f32;
            for _ in 0..4 {
                s += (self.next() >> 40) as f32 / (1u64 << 24) as f32;
            }
            (s - 2.0) * 1.7
        }
    }

    #[test]
    fn best_index_matches_ggml_bisection() {
        let v = &KVALUES_IQ4NL;
        let mut probes = vec![-1e30f32, -128.0, -127.0, 0.0, -0.0, 113.0, 200.0, 1e30];
        for i in 0..15 {
            // every midpoint and its float neighbours
            let m = (v[i] as f32 + v[i + 1] as f32) / 2.0;
            let up = f32::from_bits(m.to_bits() + 1);
            let down = if m > 0.0 {
                f32::from_bits(m.to_bits() - 1)
            } else {
                f32::from_bits(m.to_bits() + 1)
            };
            probes.extend([m, up, down, f32::from_bits(up.to_bits() + 1)]);
        }
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        for _ in 0..100_000 {
            probes.push(rng.normal() * 60.0);
        }
        for &x in &probes {
            assert_eq!(best_index_int8(x), best_index_bisect(v, x), "x = {x:e}");
            // and it is the nearest value
            let i = best_index_int8(x);
            let err = (v[i] as f64 - x as f64).abs();
            assert!(v.iter().all(|&q| (q as f64 - x as f64).abs() >= err));
        }
        // ties go up
        assert_eq!(best_index_int8(-4.5), 8);
        // NaN, infinities
        assert_eq!(best_index_int8(f32::NAN), 15);
        assert_eq!(best_index_bisect(v, f32::NAN), 15);
        assert_eq!(best_index_int8(f32::INFINITY), 15);
        assert_eq!(best_index_int8(f32::NEG_INFINITY), 0);
    }

    #[test]
    fn zero_blocks_dequantize_to_zero_with_ggml_bytes() {
        let x = vec![0f32; QK_K];
        let mut nl = vec![0u8; 8 * 18];
        quantize_row(QType::IQ4NL, &x, &mut nl, None);
        // d = +0 and every index 8 (the value 1 is nearest to 0)
        for b in nl.chunks(18) {
            assert_eq!(b[..2], [0, 0]);
            assert!(b[2..].iter().all(|&q| q == 0x88));
        }
        let mut xs = vec![0u8; 136];
        quantize_row(QType::IQ4XS, &x, &mut xs, None);
        // d = -max_scale/32 = -0.0 (f16 0x8000), every block scale 0 (stored 32), indices 8
        assert_eq!(xs[..2], [0x00, 0x80]);
        assert_eq!(xs[2..4], [0xaa, 0xaa]);
        assert_eq!(xs[4..8], [0, 0, 0, 0]);
        assert!(xs[8..].iter().all(|&q| q == 0x88));
        let mut y = vec![1f32; QK_K];
        dequantize_row(QType::IQ4NL, &nl, &mut y);
        assert!(y.iter().all(|&v| v == 0.0));
        dequantize_row(QType::IQ4XS, &xs, &mut y);
        assert!(y.iter().all(|&v| v == 0.0));
    }

    /// Round trip error of iq4_nl. Each value is quantized to the table entry nearest to x/s
    /// (s the f32 scale), so |x - s*q| <= |s| * 12 (largest half gap: (113 - 89) / 2) inside the
    /// table's range, and |x| - |s|*113 beyond its ends (the least-squares scale may leave the
    /// extreme value outside the range). Dequantization uses d = f16(s): another |q| * |s - d|
    /// <= 127 * |s| * 2^-11; the bound below takes 2^-10 for slack in using d for s.
    #[test]
    fn nl_round_trip_within_the_table_gaps() {
        let mut rng = Rng(12345);
        for _ in 0..200 {
            let scale = (rng.next() % 1000) as f32 / 100.0 + 0.01;
            let x: Vec<f32> = (0..QK4_NL).map(|_| rng.normal() * scale).collect();
            let w: Vec<f32> = (0..QK4_NL)
                .map(|_| (rng.next() % 100) as f32 / 10.0)
                .collect();
            for qw in [None, Some(&w[..])] {
                let mut q = vec![0u8; 18];
                quantize_row(QType::IQ4NL, &x, &mut q, qw);
                let mut y = vec![0f32; QK4_NL];
                dequantize_row(QType::IQ4NL, &q, &mut y);
                let d = f16_to_f32([q[0], q[1]]).abs();
                for (&a, &b) in x.iter().zip(&y) {
                    let beyond = (a.abs() - d * 113.0).max(0.0);
                    let bound = d * 12.0 + beyond + d * 127.0 * 2f32.powi(-10) + 1e-6;
                    assert!((a - b).abs() <= bound, "{a} vs {b}, d {d}");
                }
            }
        }
    }

    #[test]
    fn xs_packs_scales_and_keeps_signs() {
        let mut rng = Rng(777);
        let x: Vec<f32> = (0..2 * QK_K)
            .map(|i| rng.normal() * (1.0 + (i / 32) as f32))
            .collect();
        let mut q = vec![0u8; 2 * 136];
        quantize_row(QType::IQ4XS, &x, &mut q, None);
        let mut y = vec![0f32; 2 * QK_K];
        dequantize_row(QType::IQ4XS, &q, &mut y);
        // a value larger than a quarter of its block's amax keeps its sign
        for (xb, yb) in x.chunks(32).zip(y.chunks(32)) {
            let amax = xb.iter().fold(0f32, |m, v| m.max(v.abs()));
            for (&a, &b) in xb.iter().zip(yb) {
                if a.abs() > amax / 4.0 {
                    assert_eq!(a > 0.0, b > 0.0, "{a} vs {b}");
                }
            }
        }
        // the block with the largest scale uses ls - 32 = -32 (stored 0) or 31 (stored 63)
        let b = &q[..136];
        let hi = u16::from_le_bytes([b[2], b[3]]);
        let ls: Vec<u8> = (0..8)
            .map(|ib| {
                ((b[4 + ib / 2] >> (4 * (ib % 2))) & 0xf) | ((((hi >> (2 * ib)) & 3) as u8) << 4)
            })
            .collect();
        assert!(ls.iter().any(|&l| l == 0 || l == 63), "{ls:?}");
    }
}
