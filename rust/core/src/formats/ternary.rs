//! ggml's ternary formats tq1_0 and tq2_0 (BitNet b1.58 weights: {-1, 0, +1} times one f16 scale
//! per block of 256), the scalar references of ggml-quants.c (`quantize_row_tq1_0_ref`,
//! `quantize_row_tq2_0_ref`, `dequantize_row_tq1_0`, `dequantize_row_tq2_0`).
//!
//! Both take `d = max|x|` of the block and `q = lroundf(x / d)`: ternary data at one magnitude
//! per block round-trips exactly (as long as `d` is an f16). Both store `q + 1` (0, 1, 2):
//! - tq2_0: four 2-bit values a byte, element `128h + 32l + m` in bits `2l..2l+1` of
//!   `qs[32h + m]`;
//! - tq1_0: five base-3 digits a byte as a fixed-point fraction (`ceil(v·256/243)` for the
//!   5-digit value v, most significant digit first), so digit `n` is `((u8)(byte·3^n)·3) >> 8`:
//!   element `32n + m` (n < 5, m < 32) from `qs[m]`, `160 + 16n + m` (m < 16) from `qs[32 + m]`,
//!   `240 + 4n + j` (n < 4) from `qh[j]` (four digits, shifted up one place).
//!
//! ggml's ternary quantizers take no importance weights (its `quantize_tq*_0` ignore
//! `quant_weights`), and neither do these.

use super::blocks::*;
use crate::qtype::QType;

/// `{1, 3, 9, 27, 81}`: multiplying a packed byte by `3^n` (mod 256) brings digit n to the top.
const POW3: [u8; 5] = [1, 3, 9, 27, 81];

/// Digit `n` (0, 1 or 2) of a tq1_0 byte: the top base-3 digit of `byte·3^n mod 256`.
#[inline(always)]
pub fn trit(byte: u8, n: usize) -> u8 {
    let q = byte.wrapping_mul(POW3[n]);
    ((q as u16 * 3) >> 8) as u8
}

/// The block's 256 values `q + 1` (0, 1, 2) in element order.
pub fn unpack_tq1_0(b: &BlockTQ1_0) -> [u8; QK_K] {
    let mut q = [0u8; QK_K];
    for n in 0..5 {
        for m in 0..32 {
            q[32 * n + m] = trit(b.qs[m], n);
        }
        for m in 0..16 {
            q[160 + 16 * n + m] = trit(b.qs[32 + m], n);
        }
    }
    for n in 0..4 {
        for j in 0..4 {
            q[240 + 4 * n + j] = trit(b.qh[j], n);
        }
    }
    q
}

/// The block's 256 values `q + 1` (0, 1, 2) in element order.
pub fn unpack_tq2_0(b: &BlockTQ2_0) -> [u8; QK_K] {
    let mut q = [0u8; QK_K];
    for h in 0..2 {
        for l in 0..4 {
            for m in 0..32 {
                q[128 * h + 32 * l + m] = (b.qs[32 * h + m] >> (2 * l)) & 3;
            }
        }
    }
    q
}

/// `d = max|x|` (ggml's `MAX(amax, fabsf(v))` scan) and `1/d` (0 for an all-zero block).
fn block_scale(x: &[f32]) -> (f32, f32) {
    let mut amax = 0.0f32;
    for &v in x {
        if v.abs() > amax {
            amax = v.abs();
        }
    }
    (amax, if amax != 0.0 { 1.0 / amax } else { 0.0 })
}

/// ggml's `int xi = lroundf(x·id) + 1`: 0, 1 or 2 for finite x (|x·id| <= 1 up to rounding).
/// When the block's max is below about 2.9e-39 (a subnormal), `1/d` overflows to inf and x·id is
/// inf or NaN; x86-64's `lroundf` then returns LONG_MIN, whose low 32 bits are 0, so ggml (and
/// gguf-py's int8 cast) store the digit 1. Matched here rather than left to Rust's saturating cast.
#[inline(always)]
fn digit(x: f32, id: f32) -> u8 {
    let v = x * id;
    let rounded = if v.is_finite() { v.round() as i32 } else { 0 };
    (rounded + 1) as u8
}

/// Base-3 digits, most significant first, to ggml's fixed-point byte `ceil(v·256/243)` (as u8
/// arithmetic, as ggml's `uint8_t q` does).
#[inline(always)]
fn pack_digits(digits: impl Iterator<Item = u8>) -> u8 {
    let v = digits.fold(0u8, |q, d| q.wrapping_mul(3).wrapping_add(d));
    // ggml: (q * 256 + (243 - 1)) / 243
    (v as u16 * 256).div_ceil(243) as u8
}

/// ggml's `quantize_row_tq1_0_ref`: `x.len()` a multiple of 256, `out` 54 bytes a block.
pub fn quantize_row_tq1_0(x: &[f32], out: &mut [u8]) {
    let blocks: &mut [BlockTQ1_0] = bytemuck::cast_slice_mut(out);
    for (b, x) in blocks.iter_mut().zip(x.chunks_exact(QK_K)) {
        let (d, id) = block_scale(x);
        b.d = f16_from_f32(d);
        for m in 0..32 {
            b.qs[m] = pack_digits((0..5).map(|n| digit(x[32 * n + m], id)));
        }
        for m in 0..16 {
            b.qs[32 + m] = pack_digits((0..5).map(|n| digit(x[160 + 16 * n + m], id)));
        }
        for j in 0..4 {
            // four digits, then a zero digit: the first value becomes the most significant
            let digits = (0..4).map(|n| digit(x[240 + 4 * n + j], id));
            b.qh[j] = pack_digits(digits.chain(std::iter::once(0)));
        }
    }
}

/// ggml's `quantize_row_tq2_0_ref`: `x.len()` a multiple of 256, `out` 66 bytes a block.
pub fn quantize_row_tq2_0(x: &[f32], out: &mut [u8]) {
    let blocks: &mut [BlockTQ2_0] = bytemuck::cast_slice_mut(out);
    for (b, x) in blocks.iter_mut().zip(x.chunks_exact(QK_K)) {
        let (d, id) = block_scale(x);
        b.d = f16_from_f32(d);
        for h in 0..2 {
            for m in 0..32 {
                b.qs[32 * h + m] = (0..4).fold(0u8, |q, l| {
                    q | ((digit(x[128 * h + 32 * l + m], id) & 3) << (2 * l))
                });
            }
        }
    }
}

/// Quantize one row to tq1_0 or tq2_0.
pub fn quantize_row(qtype: QType, x: &[f32], out: &mut [u8]) {
    match qtype {
        QType::TQ1_0 => quantize_row_tq1_0(x, out),
        QType::TQ2_0 => quantize_row_tq2_0(x, out),
        _ => unreachable!("{qtype:?} is not a ternary format"),
    }
}

/// Dequantize one row of tq1_0 or tq2_0: `(q - 1)·d` (bit-exact with ggml and gguf-py).
pub fn dequantize_row(qtype: QType, data: &[u8], y: &mut [f32]) {
    fn write(q: &[u8; QK_K], d: f32, y: &mut [f32]) {
        for (v, &q) in y.iter_mut().zip(q) {
            *v = (q as i32 - 1) as f32 * d;
        }
    }
    match qtype {
        QType::TQ1_0 => {
            let blocks: &[BlockTQ1_0] = bytemuck::cast_slice(data);
            for (b, y) in blocks.iter().zip(y.chunks_exact_mut(QK_K)) {
                write(&unpack_tq1_0(b), f16_to_f32(b.d), y);
            }
        }
        QType::TQ2_0 => {
            let blocks: &[BlockTQ2_0] = bytemuck::cast_slice(data);
            for (b, y) in blocks.iter().zip(y.chunks_exact_mut(QK_K)) {
                write(&unpack_tq2_0(b), f16_to_f32(b.d), y);
            }
        }
        _ => unreachable!("{qtype:?} is not a ternary format"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ternary_row(seed: u64, blocks: usize) -> Vec<f32> {
        let mut s = seed;
        (0..blocks * QK_K)
            .map(|i| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                let scale = 0.25 * (1 + i / QK_K) as f32;
                ((s >> 33) % 3) as f32 * scale - scale
            })
            .collect()
    }

    #[test]
    fn ternary_rows_round_trip_exactly() {
        for qtype in [QType::TQ1_0, QType::TQ2_0] {
            for seed in 0..20 {
                let mut x = ternary_row(seed, 3);
                // one element of each block at full magnitude, so d is the block's scale
                for b in 0..3 {
                    x[b * QK_K + 7] = 0.25 * (1 + b) as f32;
                }
                let mut q = vec![0u8; 3 * qtype.info().type_size];
                quantize_row(qtype, &x, &mut q);
                let mut y = vec![0f32; x.len()];
                dequantize_row(qtype, &q, &mut y);
                assert_eq!(x, y, "{qtype:?} seed {seed}");
            }
        }
    }

    #[test]
    fn every_tq1_0_byte_value_of_five_digits_decodes_to_its_digits() {
        for v in 0..243u16 {
            let digits: Vec<u8> = (0..5).rev().map(|n| (v / 3u16.pow(n) % 3) as u8).collect();
            let byte = pack_digits(digits.iter().copied());
            let back: Vec<u8> = (0..5).map(|n| trit(byte, n)).collect();
            assert_eq!(back, digits, "value {v}");
        }
    }

    #[test]
    fn zero_block_has_zero_scale_and_middle_digits() {
        let x = vec![0f32; QK_K];
        let mut q = [0u8; 66];
        quantize_row_tq2_0(&x, &mut q);
        assert_eq!(&q[..64], &[0b0101_0101; 64]);
        assert_eq!(&q[64..], &[0, 0]);
    }
}
