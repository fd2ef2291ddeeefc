//! nf4 and int8 weights with activations quantized to 16 bits (`q16`): exact integer sums over
//! a few elements, then one fused multiply-add per float lane.
//!
//! **Activations.** Each row is cut into blocks of `Q16` = 64 (the last one zero-padded), each
//! with `d = amax / 32767` and `q = round(x / d)` (`x · (1/d)`, rounded half away from zero,
//! clamped to ±32767): a relative error of at most 2^-16 of the block's largest value, against
//! bf16's 2^-9 of each value. Stored as `xq` (K rounded up to 64 values a row) and `xd` (one
//! f32 a block: `d` for int8, `d / 16383` for nf4, whose codes are scaled by 16383).
//!
//! **Weights as integers.** int8: the byte as i8 (exact). nf4: `NF4_CODE_I16[q]` =
//! `round(code · 16383)` (`NF4_ONE`), within 0.5 / 16383 of `code`; `absmax` stays f32.
//!
//! **Units and lanes.** A row is cut into units: 64 elements for nf4, 32 for int8. Lane `l`
//! (0..16) of a unit holds the integer sum of its elements `l·u/16 .. (l+1)·u/16` (four for
//! nf4, two for int8; elements past K count as zero): at most 4 · 32767 · 16383 < 2^31. Each
//! lane then takes `acc[u % 2][l] = fma(isum as f32, s, acc[u % 2][l])` with
//! `s = scale(weight block of the lane) · xd(activation block)`, units in increasing order, two
//! sets of 16 accumulators alternating (independent chains for the SIMD paths). A lane with no
//! element in the row is left alone. The result is `hsum8` of `t[l] + t[l + 8]` with
//! `t = acc[0] + acc[1]`.
//!
//! Why 16 bits, not f32 (the reference before 2026-11-27): an f32 activation is 4 bytes of
//! L1 traffic per weight and an f32 multiply-add per weight; 16-bit sums take 32 weights an
//! instruction (`vpdpwssd`, `pmaddwd`, `smlal`). The layouts are those one 512-bit register
//! decode gives: 32 packed nf4 bytes zero-extended to 16-bit lanes give elements 2j (high
//! nibble) and 2j + 1 (low nibble) in lane j; 32 int8 bytes sign-extended give elements in order.

use super::{hsum8, nibble};

/// Activation values per q16 block (and per scale).
pub const Q16: usize = 64;
/// The largest activation quant.
pub const Q16_MAX: f32 = 32767.0;
/// nf4 codes are `round(code · NF4_ONE)`.
pub const NF4_ONE: f32 = 16383.0;
/// Elements per unit (see the module comment).
pub const UNIT_NF4: usize = 64;
pub const UNIT_INT8: usize = 32;

/// `round(NF4_CODE[i] · 16383)` (checked against `NF4_CODE` in the tests).
pub const NF4_CODE_I16: [i16; 16] = [
    -16383, -11406, -8602, -6470, -4660, -3027, -1492, 0, 1304, 2637, 4032, 5536, 7220, 9217,
    11844, 16383,
];

/// Values a q16 activation row takes: K rounded up to a whole block.
pub fn q16_row_len(k: usize) -> usize {
    k.div_ceil(Q16) * Q16
}

/// `roundf`: half away from zero (`f32::round`, spelled out so it is plain arithmetic).
#[inline(always)]
fn round_half_away(v: f32) -> f32 {
    let t = v.trunc();
    if (v - t).abs() >= 0.5 {
        t + v.signum()
    } else {
        t
    }
}

/// One activation row to q16: `q` holds `q16_row_len(x.len())` values (the padding is written
/// as zero), `d` one per block. `per` divides every `d` (16383 for nf4, 1 for int8).
pub fn quantize_row_q16(x: &[f32], per: f32, q: &mut [i16], d: &mut [f32]) {
    debug_assert_eq!(q.len(), q16_row_len(x.len()));
    for ((xb, qb), db) in x.chunks(Q16).zip(q.chunks_mut(Q16)).zip(d.iter_mut()) {
        let amax = xb.iter().fold(0.0f32, |a, v| a.max(v.abs()));
        let scale = amax / Q16_MAX;
        let inv = if scale != 0.0 { 1.0 / scale } else { 0.0 };
        for (o, &v) in qb.iter_mut().zip(xb) {
            *o = round_half_away(v * inv).clamp(-Q16_MAX, Q16_MAX) as i16;
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
        |e0, u| absmax[e0 / block_size] * xd[u * UNIT_NF4 / Q16],
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
            assert_eq!(round_half_away(c * NF4_ONE) as i16, i);
            assert!((c - i as f32 / NF4_ONE).abs() <= 0.5 / NF4_ONE);
        }
    }

    #[test]
    fn round_is_roundf() {
        for v in [
            0.5f32,
            -0.5,
            1.5,
            2.5,
            -2.5,
            0.49999997,
            -0.49999997,
            32766.5,
            1e9,
            -0.0,
        ] {
            assert_eq!(round_half_away(v).to_bits(), v.round().to_bits(), "{v}");
        }
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
        let worst = 4i64
            * 32767
            * NF4_CODE_I16
                .iter()
                .map(|c| c.unsigned_abs() as i64)
                .max()
                .unwrap();
        assert!(worst <= i32::MAX as i64);
    }
}
