//! nf4 and int8 weights with activations quantized to 16 bits (`q16`): exact integer sums over
//! a few elements, then one fused multiply-add per float lane.
//!
//! **Activations.** Each row is cut into blocks of `Q16` = 64 (the last one zero-padded), each
//! with `d = amax / 32767` and `q = round(x / d)` (`x · (1/d)`, rounded half away from zero,
//! clamped to ±32767; a block with d below f32's smallest normal counts as zero): an error of
//! at most 2^-16 of the block's largest value, against bf16's 2^-9 of each value. Stored as
//! `xq` (K rounded up to 128 values a row) and `xd` (one f32 a block: `d` for int8, `d / 8191`
//! for nf4, whose codes are scaled by 8191).
//!
//! **Weights as integers.** int8: the byte as i8 (exact). nf4: `NF4_CODE_I16[q]` =
//! `round(code · 8191)` (`NF4_ONE`), within 0.5 / 8191 = 6.1e-5 of `code` (bf16 holds the
//! larger codes to 2^-9 = 2e-3); `absmax` stays f32.
//!
//! **Units and lanes.** A row is cut into units: 128 elements for nf4, 32 for int8. Lane `l`
//! (0..16) of a unit holds the integer sum of its elements `l·u/16 .. (l+1)·u/16` (eight for
//! nf4, two for int8; elements past K count as zero): at most 8 · 32767 · 8191 < 2^31. Each
//! lane then takes `acc[u % 2][l] = fma(isum as f32, s, acc[u % 2][l])` with
//! `s = scale(weight block of the lane) · xd(activation block)`, units in increasing order, two
//! sets of 16 accumulators alternating (independent chains for the SIMD paths). A lane with no
//! element in the row is left alone. The result is `hsum8` of `t[l] + t[l + 8]` with
//! `t = acc[0] + acc[1]`.
//!
//! Why 16 bits, not f32 (the reference before 2026-11-27): an f32 activation is 4 bytes of
//! L1 traffic per weight and an f32 multiply-add per weight; 16-bit sums take 32 weights an
//! instruction (`vpdpwssd`, `pmaddwd`, `smlal`). The layouts are those the cheapest 512-bit
//! decodes give: 64 packed nf4 bytes as 32 words, shifted by 0, 4, 8 and 12 bits, index the
//! codes of elements 4w + 1, 4w, 4w + 3 and 4w + 2 (`vpermw` reads 5 bits); `vpdpwssd` adds
//! words 2i and 2i + 1 of each, so 32-bit lane i collects elements 8i .. 8i + 7. 32 int8 bytes
//! sign-extended give elements in order, lane i elements 2i and 2i + 1. A unit's lanes share
//! one conversion and one multiply-add, the float work that bounds these kernels.

use super::{hsum8, nibble};

/// Activation values per q16 block (and per scale).
pub const Q16: usize = 64;
/// The largest activation quant.
pub const Q16_MAX: f32 = 32767.0;
/// nf4 codes are `round(code · NF4_ONE)` (eight products of a lane stay below 2^31).
pub const NF4_ONE: f32 = 8191.0;
/// Elements per unit (see the module comment).
pub const UNIT_NF4: usize = 128;
pub const UNIT_INT8: usize = 32;

/// `round(NF4_CODE[i] · 8191)` (checked against `NF4_CODE` in the tests).
pub const NF4_CODE_I16: [i16; 16] = [
    -8191, -5703, -4301, -3235, -2330, -1513, -746, 0, 652, 1318, 2016, 2768, 3610, 4608, 5922,
    8191,
];

/// Byte `i` (0: low, 1: high) of each 16-bit nf4 code: the two 16-entry tables the AVX2 and
/// NEON kernels look the codes up with (`vpshufb`, `tbl`).
pub const NF4_CODE_BYTES: [[u8; 16]; 2] = {
    let mut t = [[0u8; 16]; 2];
    let mut j = 0;
    while j < 16 {
        let b = (NF4_CODE_I16[j] as u16).to_le_bytes();
        t[0][j] = b[0];
        t[1][j] = b[1];
        j += 1;
    }
    t
};

/// Values a q16 activation row takes: K rounded up to a whole nf4 unit of 128 (zero padded;
/// one scale per 64 of them).
pub fn q16_row_len(k: usize) -> usize {
    k.div_ceil(UNIT_NF4) * UNIT_NF4
}

/// `roundf(t)` (half away from zero) as an integer clamped to ±32767, in plain integer and
/// float operations that vectorize (`f32::round` and `trunc` are library calls on baseline
/// x86-64): `t as i32` truncates, `t - trunc` is exact. The same as `roundf` for |t| < 2^31
/// (tested); quantized activations are within ±32767.01.
#[inline(always)]
fn round_q16(t: f32) -> i16 {
    let i = t as i32;
    let f = t - i as f32;
    let r = i + (f >= 0.5) as i32 - (f <= -0.5) as i32;
    r.clamp(-(Q16_MAX as i32), Q16_MAX as i32) as i16
}

/// The largest |x| of a block: finite floats' magnitudes order as their bit patterns do (an
/// integer max, which vectorizes).
#[inline(always)]
fn amax(x: &[f32]) -> f32 {
    f32::from_bits(
        x.iter()
            .map(|v| v.to_bits() & 0x7fff_ffff)
            .max()
            .unwrap_or(0),
    )
}

/// `1 / scale`, or 0 for a block whose scale is zero or subnormal (amax < 32767 · 2^-126 ≈
/// 3.9e-34: its values count as zero, an error below 4e-34 each), where `1 / scale` would
/// overflow to infinity.
#[inline(always)]
pub fn inverse(scale: f32) -> f32 {
    if scale >= f32::MIN_POSITIVE {
        1.0 / scale
    } else {
        0.0
    }
}

/// One activation row to q16: `q` holds `q16_row_len(x.len())` values, `d` one per 64 of them
/// (the padding is written as zero). `per` divides every `d` (8191 for nf4, 1 for int8).
pub fn quantize_row_q16(x: &[f32], per: f32, q: &mut [i16], d: &mut [f32]) {
    debug_assert_eq!(q.len(), q16_row_len(x.len()));
    q.fill(0);
    d.fill(0.0);
    for ((xb, qb), db) in x.chunks(Q16).zip(q.chunks_mut(Q16)).zip(d.iter_mut()) {
        let scale = amax(xb) / Q16_MAX;
        let inv = inverse(scale);
        for (o, &v) in qb.iter_mut().zip(xb) {
            *o = round_q16(v * inv);
        }
        qb[xb.len()..].fill(0);
        *db = scale / per;
    }
}

/// The two sets of 16 lanes, reduced in the fixed order of the module comment.
#[inline(always)]
pub fn hsum_q16(acc: &[[f32; 16]; 2]) -> f32 {
    let t: [f32; 16] = std::array::from_fn(|l| acc[0][l] + acc[1][l]);
    hsum8(&std::array::from_fn(|l| t[l] + t[l + 8]))
}

/// The fold shared by both formats: unit `u` lane `l` covers `span` elements from
/// `u·16·span + l·span`; `isum(e0, e1)` is the integer sum over elements e0..e1 (< K) and
/// `scale(e0, u)` the lane's float scale.
#[inline(always)]
fn dot_units(
    k: usize,
    span: usize,
    isum: impl Fn(usize, usize) -> i32,
    scale: impl Fn(usize, usize) -> f32,
) -> f32 {
    let mut acc = [[0.0f32; 16]; 2];
    let unit = 16 * span;
    for u in 0..k.div_ceil(unit) {
        for (l, a) in acc[u % 2].iter_mut().enumerate() {
            let e0 = u * unit + l * span;
            if e0 >= k {
                break;
            }
            let s = isum(e0, (e0 + span).min(k));
            *a = (s as f32).mul_add(scale(e0, u), *a);
        }
    }
    hsum_q16(&acc)
}

/// One nf4 row (bitsandbytes packing, plain f32 absmax per `block_size`) with one q16 row.
pub fn dot_nf4_q16(
    packed: &[u8],
    absmax: &[f32],
    block_size: usize,
    xq: &[i16],
    xd: &[f32],
) -> f32 {
    let k = 2 * packed.len();
    dot_units(
        k,
        UNIT_NF4 / 16,
        |e0, e1| {
            (e0..e1)
                .map(|e| NF4_CODE_I16[nibble(packed, e)] as i32 * xq[e] as i32)
                .sum()
        },
        |e0, _| absmax[e0 / block_size] * xd[e0 / Q16],
    )
}

/// One int8 row (`scales`: one per `block_len`, the whole row for per-row and per-tensor
/// scales) with one q16 row.
pub fn dot_int8_q16(q: &[u8], scales: &[f32], block_len: usize, xq: &[i16], xd: &[f32]) -> f32 {
    dot_units(
        q.len(),
        UNIT_INT8 / 16,
        |e0, e1| (e0..e1).map(|e| (q[e] as i8) as i32 * xq[e] as i32).sum(),
        |e0, u| scales[e0 / block_len] * xd[u * UNIT_INT8 / Q16],
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::matmul::reference::NF4_CODE;

    #[test]
    fn nf4_codes_are_the_rounded_f32_codes() {
        for (c, &i) in NF4_CODE.iter().zip(&NF4_CODE_I16) {
            assert_eq!((c * NF4_ONE).round() as i16, i);
            assert!((c - i as f32 / NF4_ONE).abs() <= 0.5 / NF4_ONE);
        }
    }

    #[test]
    fn round_is_roundf_clamped() {
        let mut v = vec![
            0.5f32,
            -0.5,
            1.5,
            2.5,
            -2.5,
            0.49999997,
            -0.49999997,
            32766.5,
            -0.0,
        ];
        v.extend([
            32767.01, -32767.01, 40000.0, 1e9, -1e9, 1e-30, 8388607.5, 8388609.0,
        ]);
        let mut s = 1u32;
        for _ in 0..100_000 {
            s = s.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            v.push(((s >> 8) as f32 / (1 << 24) as f32 - 0.5) * 70000.0);
        }
        for &t in &v {
            assert_eq!(
                round_q16(t),
                t.round().clamp(-32767.0, 32767.0) as i16,
                "{t}"
            );
        }
    }

    #[test]
    fn amax_is_the_largest_magnitude() {
        let x = [1.0f32, -7.5, 3.0, -0.0, 7.25];
        assert_eq!(amax(&x), 7.5);
        assert_eq!(amax(&[-0.0]), 0.0);
        assert_eq!(amax(&[]), 0.0);
    }

    #[test]
    fn quantize_row_bounds_and_padding() {
        let x: Vec<f32> = (0..100).map(|i| (i as f32 - 40.0) * 0.37).collect();
        let mut q = vec![7i16; q16_row_len(100)];
        let mut d = vec![0.0f32; 2];
        quantize_row_q16(&x, 1.0, &mut q, &mut d);
        assert!(q[100..].iter().all(|&v| v == 0));
        for (i, &v) in x.iter().enumerate() {
            let db = d[i / Q16];
            assert!(
                (v - q[i] as f32 * db).abs() <= 0.5 * db * (1.0 + 1e-6),
                "{i}"
            );
        }
        assert_eq!(q.iter().map(|v| v.unsigned_abs()).max(), Some(32767));
    }

    #[test]
    fn worst_nf4_lane_does_not_overflow() {
        let worst = (UNIT_NF4 as i64 / 16)
            * 32767
            * NF4_CODE_I16
                .iter()
                .map(|c| c.unsigned_abs() as i64)
                .max()
                .unwrap();
        assert!(worst <= i32::MAX as i64);
    }
}
