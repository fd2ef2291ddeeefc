//! ggml's legacy formats q4_0, q4_1, q5_0, q5_1, q8_0: scalar references that follow
//! `quantize_row_*_ref` / `dequantize_row_*` of ggml-quants.c operation for operation (same
//! float expressions, same truncating casts), so the bytes are identical to libggml and gguf-py.
//! The importance-weighted variants live in `legacy_imatrix.rs`.

use super::blocks::*;

/// (amax, the signed value with the largest magnitude), first one wins on ties as in ggml's
/// `if (amax < fabsf(v)) { amax = fabsf(v); max = v; }`. Written as a max-reduction followed by
/// a search for its first occurrence, which selects the same element (inputs are finite) and
/// vectorises.
#[inline(always)]
fn signed_absmax(x: &[f32]) -> (f32, f32) {
    let amax = x
        .iter()
        .fold(0.0f32, |m, v| if v.abs() > m { v.abs() } else { m });
    // ggml never replaces its starting max = +0.0 in a block of zeros (even one of -0.0s)
    let max = if amax > 0.0 {
        x.iter().copied().find(|v| v.abs() == amax).unwrap_or(0.0)
    } else {
        0.0
    };
    (amax, max)
}

#[inline(always)]
fn min_max(x: &[f32]) -> (f32, f32) {
    let (mut min, mut max) = (f32::MAX, -f32::MAX);
    for &v in x {
        if v < min {
            min = v;
        }
        if v > max {
            max = v;
        }
    }
    (min, max)
}

/// C's `(int8_t)f` / `(uint8_t)f` as gcc compiles them on x86-64: cvttss2si (truncate to i32;
/// NaN and out-of-range give i32::MIN) and keep the low byte. Differs from Rust's saturating
/// `as` only when 1/d overflowed (blocks of values near FLT_MIN).
#[inline(always)]
fn c_to_i8(v: f32) -> i8 {
    let i = if v.is_nan() || !(-2147483648.0..2147483648.0).contains(&v) {
        i32::MIN
    } else {
        v as i32
    };
    i as i8
}

#[inline]
fn inverse(d: f32) -> f32 {
    if d != 0.0 {
        1.0 / d
    } else {
        0.0
    }
}

#[inline(always)]
pub fn quantize_row_q4_0_ref(x: &[f32], out: &mut [u8]) {
    let blocks: &mut [BlockQ4_0] = bytemuck::cast_slice_mut(out);
    for (b, x) in blocks.iter_mut().zip(x.chunks_exact(QK4_0)) {
        let (_, max) = signed_absmax(x);
        let d = max / -8.0;
        let id = inverse(d);
        b.d = f16_from_f32(d);
        for j in 0..QK4_0 / 2 {
            let x0 = x[j] * id;
            let x1 = x[QK4_0 / 2 + j] * id;
            let xi0 = c_to_i8(x0 + 8.5).min(15) as u8;
            let xi1 = c_to_i8(x1 + 8.5).min(15) as u8;
            b.qs[j] = xi0 | (xi1 << 4);
        }
    }
}

#[inline(always)]
pub fn quantize_row_q4_1_ref(x: &[f32], out: &mut [u8]) {
    let blocks: &mut [BlockQ4_1] = bytemuck::cast_slice_mut(out);
    for (b, x) in blocks.iter_mut().zip(x.chunks_exact(QK4_1)) {
        let (min, max) = min_max(x);
        let d = (max - min) / 15.0;
        let id = inverse(d);
        b.d = f16_from_f32(d);
        b.m = f16_from_f32(min);
        for j in 0..QK4_1 / 2 {
            let x0 = (x[j] - min) * id;
            let x1 = (x[QK4_1 / 2 + j] - min) * id;
            let xi0 = c_to_i8(x0 + 0.5).min(15) as u8;
            let xi1 = c_to_i8(x1 + 0.5).min(15) as u8;
            b.qs[j] = xi0 | (xi1 << 4);
        }
    }
}

#[inline(always)]
pub fn quantize_row_q5_0_ref(x: &[f32], out: &mut [u8]) {
    let blocks: &mut [BlockQ5_0] = bytemuck::cast_slice_mut(out);
    for (b, x) in blocks.iter_mut().zip(x.chunks_exact(QK5_0)) {
        let (_, max) = signed_absmax(x);
        let d = max / -16.0;
        let id = inverse(d);
        b.d = f16_from_f32(d);
        let mut qh = 0u32;
        for j in 0..QK5_0 / 2 {
            let x0 = x[j] * id;
            let x1 = x[QK5_0 / 2 + j] * id;
            let xi0 = c_to_i8(x0 + 16.5).min(31) as u8;
            let xi1 = c_to_i8(x1 + 16.5).min(31) as u8;
            b.qs[j] = (xi0 & 0x0f) | ((xi1 & 0x0f) << 4);
            qh |= (((xi0 & 0x10) >> 4) as u32) << j;
            qh |= (((xi1 & 0x10) >> 4) as u32) << (j + QK5_0 / 2);
        }
        b.qh = qh.to_le_bytes();
    }
}

#[inline(always)]
pub fn quantize_row_q5_1_ref(x: &[f32], out: &mut [u8]) {
    let blocks: &mut [BlockQ5_1] = bytemuck::cast_slice_mut(out);
    for (b, x) in blocks.iter_mut().zip(x.chunks_exact(QK5_1)) {
        let (min, max) = min_max(x);
        let d = (max - min) / 31.0;
        let id = inverse(d);
        b.d = f16_from_f32(d);
        b.m = f16_from_f32(min);
        let mut qh = 0u32;
        for j in 0..QK5_1 / 2 {
            let x0 = (x[j] - min) * id;
            let x1 = (x[QK5_1 / 2 + j] - min) * id;
            let xi0 = c_to_i8(x0 + 0.5) as u8;
            let xi1 = c_to_i8(x1 + 0.5) as u8;
            b.qs[j] = (xi0 & 0x0f) | ((xi1 & 0x0f) << 4);
            qh |= (((xi0 & 0x10) >> 4) as u32) << j;
            qh |= (((xi1 & 0x10) >> 4) as u32) << (j + QK5_1 / 2);
        }
        b.qh = qh.to_le_bytes();
    }
}

#[inline(always)]
pub fn quantize_row_q8_0_ref(x: &[f32], out: &mut [u8]) {
    let blocks: &mut [BlockQ8_0] = bytemuck::cast_slice_mut(out);
    for (b, x) in blocks.iter_mut().zip(x.chunks_exact(QK8_0)) {
        let amax = x.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        let d = amax / 127.0;
        let id = inverse(d);
        b.d = f16_from_f32(d);
        for (q, &v) in b.qs.iter_mut().zip(x) {
            // roundf: half away from zero, as f32::round.
            *q = c_to_i8((v * id).round());
        }
    }
}

#[inline(always)]
pub fn dequantize_row_q4_0(data: &[u8], y: &mut [f32]) {
    let blocks: &[BlockQ4_0] = bytemuck::cast_slice(data);
    for (b, y) in blocks.iter().zip(y.chunks_exact_mut(QK4_0)) {
        let d = f16_to_f32(b.d);
        for j in 0..QK4_0 / 2 {
            y[j] = ((b.qs[j] & 0x0f) as i32 - 8) as f32 * d;
            y[j + QK4_0 / 2] = ((b.qs[j] >> 4) as i32 - 8) as f32 * d;
        }
    }
}

#[inline(always)]
pub fn dequantize_row_q4_1(data: &[u8], y: &mut [f32]) {
    let blocks: &[BlockQ4_1] = bytemuck::cast_slice(data);
    for (b, y) in blocks.iter().zip(y.chunks_exact_mut(QK4_1)) {
        let (d, m) = (f16_to_f32(b.d), f16_to_f32(b.m));
        for j in 0..QK4_1 / 2 {
            y[j] = (b.qs[j] & 0x0f) as f32 * d + m;
            y[j + QK4_1 / 2] = (b.qs[j] >> 4) as f32 * d + m;
        }
    }
}

#[inline(always)]
pub fn dequantize_row_q5_0(data: &[u8], y: &mut [f32]) {
    let blocks: &[BlockQ5_0] = bytemuck::cast_slice(data);
    for (b, y) in blocks.iter().zip(y.chunks_exact_mut(QK5_0)) {
        let d = f16_to_f32(b.d);
        let qh = u32::from_le_bytes(b.qh);
        for j in 0..QK5_0 / 2 {
            let xh0 = (((qh >> j) << 4) & 0x10) as u8;
            let xh1 = ((qh >> (j + 12)) & 0x10) as u8;
            y[j] = (((b.qs[j] & 0x0f) | xh0) as i32 - 16) as f32 * d;
            y[j + QK5_0 / 2] = (((b.qs[j] >> 4) | xh1) as i32 - 16) as f32 * d;
        }
    }
}

#[inline(always)]
pub fn dequantize_row_q5_1(data: &[u8], y: &mut [f32]) {
    let blocks: &[BlockQ5_1] = bytemuck::cast_slice(data);
    for (b, y) in blocks.iter().zip(y.chunks_exact_mut(QK5_1)) {
        let (d, m) = (f16_to_f32(b.d), f16_to_f32(b.m));
        let qh = u32::from_le_bytes(b.qh);
        for j in 0..QK5_1 / 2 {
            let xh0 = (((qh >> j) << 4) & 0x10) as u8;
            let xh1 = ((qh >> (j + 12)) & 0x10) as u8;
            y[j] = ((b.qs[j] & 0x0f) | xh0) as f32 * d + m;
            y[j + QK5_1 / 2] = ((b.qs[j] >> 4) | xh1) as f32 * d + m;
        }
    }
}

#[inline(always)]
pub fn dequantize_row_q8_0(data: &[u8], y: &mut [f32]) {
    let blocks: &[BlockQ8_0] = bytemuck::cast_slice(data);
    for (b, y) in blocks.iter().zip(y.chunks_exact_mut(QK8_0)) {
        let d = f16_to_f32(b.d);
        for (o, &q) in y.iter_mut().zip(b.qs.iter()) {
            *o = q as f32 * d;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ramp(n: usize) -> Vec<f32> {
        (0..n).map(|i| (i as f32 - 13.5) * 0.37).collect()
    }

    #[test]
    fn q8_0_round_trip_is_within_half_a_step() {
        let x = ramp(64);
        let mut q = vec![0u8; 2 * 34];
        quantize_row_q8_0_ref(&x, &mut q);
        let mut y = vec![0f32; 64];
        dequantize_row_q8_0(&q, &mut y);
        for (blk_x, blk_y) in x.chunks(32).zip(y.chunks(32)) {
            let amax = blk_x.iter().fold(0f32, |m, v| m.max(v.abs()));
            // half a step plus the f16 rounding of the scale
            let bound = amax / 127.0 * 0.5 + amax * 1e-3;
            for (a, b) in blk_x.iter().zip(blk_y) {
                assert!((a - b).abs() <= bound, "{a} vs {b}");
            }
        }
    }

    #[test]
    fn q4_0_keeps_the_signed_extreme_exact_and_zero_blocks_zero() {
        let mut x = ramp(32);
        x[7] = -20.0;
        let mut q = vec![0u8; 18];
        quantize_row_q4_0_ref(&x, &mut q);
        let mut y = vec![0f32; 32];
        dequantize_row_q4_0(&q, &mut y);
        assert_eq!(y[7], -20.0);
        let zeros = vec![0f32; 32];
        quantize_row_q4_0_ref(&zeros, &mut q);
        dequantize_row_q4_0(&q, &mut y);
        assert!(y.iter().all(|&v| v == 0.0));
    }

    #[test]
    fn five_bit_formats_round_trip_within_half_a_step() {
        let x = ramp(32);
        let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
        let mut y = vec![0f32; 32];
        let mut q0 = vec![0u8; 22];
        quantize_row_q5_0_ref(&x, &mut q0);
        dequantize_row_q5_0(&q0, &mut y);
        // step amax/16, so half a step is amax/32 (plus f16 rounding of d)
        assert!(x.iter().zip(&y).all(|(a, b)| (a - b).abs() <= amax / 31.0));
        let mut q1 = vec![0u8; 24];
        quantize_row_q5_1_ref(&x, &mut q1);
        dequantize_row_q5_1(&q1, &mut y);
        let step = (x[31] - x[0]) / 31.0;
        assert!(x.iter().zip(&y).all(|(a, b)| (a - b).abs() <= step * 0.51));
    }
}
