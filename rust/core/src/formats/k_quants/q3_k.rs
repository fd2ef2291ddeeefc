//! q3_K: 256 weights in 16 sub-blocks of 16, `x ~ d*(sc-32)*(l-4)` with 3-bit `l` (2 low bits
//! in `qs`, the high bit in `hmask`), 6-bit `sc` and an f16 `d` (3.4375 bits per weight).

use super::common::*;
use crate::formats::blocks::{f16_from_f32, f16_to_f32, BlockQ3K, QK_K};

/// Store the 6-bit value `l` (0..64) as the scale of sub-block `j`: low 4 bits in `scales[0..8]`
/// (the high nibble for j >= 8), the top 2 bits in `scales[8 + j%4]` at bit `2*(j/4)`.
#[inline]
fn put_scale(scales: &mut [u8; 12], j: usize, l: u8) {
    if j < 8 {
        scales[j] = l & 0xf;
    } else {
        scales[j - 8] |= (l & 0xf) << 4;
    }
    scales[j % 4 + 8] |= (l >> 4) << (2 * (j / 4));
}

/// The signed scale of sub-block `j` (`sc - 32`).
#[inline]
pub fn get_scale(scales: &[u8; 12], j: usize) -> i32 {
    let low = if j < 8 {
        scales[j] & 0xf
    } else {
        scales[j - 8] >> 4
    };
    (low | (((scales[8 + j % 4] >> (2 * (j / 4))) & 3) << 4)) as i32 - 32
}

/// ggml's requantization of one sub-block: `clamp(nearest_int(x/d), -4, 3) + 4`.
#[inline]
pub fn requantize16(xs: &[f32], d: f32, out: &mut [u8]) {
    for ii in 0..16 {
        let l = clamp(nearest_int(xs[ii] / d), -4, 3);
        out[ii] = (l + 4) as u8;
    }
}

/// Requantize against the f16 scale with `requant` (`requantize16` or a SIMD copy of it),
/// split off the high bits into `hmask` and pack (the tail shared by the ref and the imatrix
/// variant). `l_all` holds `l + 4` in 0..8; sub-blocks whose scale is zero keep the levels of
/// the search.
#[inline]
pub fn requantize_and_pack_with<R>(x: &[f32], b: &mut BlockQ3K, l_all: &mut [u8; QK_K], requant: R)
where
    R: Fn(&[f32], f32, &mut [u8]),
{
    let dd = f16_to_f32(b.d);
    for j in 0..QK_K / 16 {
        let d = dd * get_scale(&b.scales, j) as f32;
        if d == 0.0 {
            continue;
        }
        requant(&x[16 * j..16 * j + 16], d, &mut l_all[16 * j..16 * j + 16]);
    }
    // The high bit of value j goes to hmask[j % 32], bit j / 32.
    b.hmask = [0; QK_K / 8];
    for (j, l) in l_all.iter_mut().enumerate() {
        if *l > 3 {
            b.hmask[j % 32] |= 1 << (j / 32);
            *l -= 4;
        }
    }
    pack_2bit(l_all, &mut b.qs);
}

fn to_u8(l: &[i8; QK_K]) -> [u8; QK_K] {
    l.map(|v| v as u8)
}

/// ggml's `quantize_row_q3_K_ref` (what `ggml_quantize_chunk` runs without an imatrix).
pub fn quantize_row_q3_k_ref(x: &[f32], out: &mut [u8]) {
    let blocks: &mut [BlockQ3K] = bytemuck::cast_slice_mut(out);
    let mut l_all = [0i8; QK_K];
    for (b, x) in blocks.iter_mut().zip(x.chunks_exact(QK_K)) {
        let mut scales = [0f32; QK_K / 16];
        for j in 0..QK_K / 16 {
            let xs = &x[16 * j..16 * j + 16];
            scales[j] = make_q3_quants(4, xs, &mut l_all[16 * j..16 * j + 16]);
        }
        finish_block_ref(x, &scales, &l_all, b);
    }
}

/// The reference path after the sub-block searches: 6-bit signed scales against the one of
/// largest magnitude (`d = max_scale/-32`), requantization and packing. `l_all` holds the levels
/// of the searches (`l + 4`), kept where a sub-block's scale rounds to zero.
#[inline]
pub fn finish_block_ref(x: &[f32], scales: &[f32; 16], l_all: &[i8; QK_K], b: &mut BlockQ3K) {
    finish_block_ref_with(x, scales, l_all, b, requantize16);
}

/// `finish_block_ref` with the sub-block requantization `requant`.
#[inline]
pub fn finish_block_ref_with<R>(
    x: &[f32],
    scales: &[f32; 16],
    l_all: &[i8; QK_K],
    b: &mut BlockQ3K,
    requant: R,
) where
    R: Fn(&[f32], f32, &mut [u8]),
{
    let mut max_scale = 0.0f32;
    let mut amax = 0.0f32;
    for &s in scales {
        if s.abs() > amax {
            amax = s.abs();
            max_scale = s;
        }
    }
    b.scales = [0; 12];
    if max_scale != 0.0 {
        let iscale = -32.0 / max_scale;
        for j in 0..QK_K / 16 {
            // int8_t l = nearest_int(...): the low byte, then clamped and offset.
            let l = nearest_int(iscale * scales[j]) as i8 as i32;
            put_scale(&mut b.scales, j, (clamp(l, -32, 31) + 32) as u8);
        }
        b.d = f16_from_f32(1.0 / iscale);
    } else {
        b.d = f16_from_f32(0.0);
    }
    let mut l = to_u8(l_all);
    requantize_and_pack_with(x, b, &mut l, requant);
}

/// ggml's `quantize_row_q3_K_impl` with an imatrix `qw` (what `ggml_quantize_chunk` runs when
/// given one).
pub fn quantize_row_q3_k_impl(x: &[f32], out: &mut [u8], qw: &[f32]) {
    let blocks: &mut [BlockQ3K] = bytemuck::cast_slice_mut(out);
    let mut l_all = [0i8; QK_K];
    let mut weight = [0f32; 16];
    for ((b, x), qw) in blocks
        .iter_mut()
        .zip(x.chunks_exact(QK_K))
        .zip(qw.chunks_exact(QK_K))
    {
        let mut scales = [0f32; QK_K / 16];
        let mut sw = [0f32; QK_K / 16];
        let sigma2 = 2.0 * sum_sq(x) / QK_K as f32;
        for j in 0..QK_K / 16 {
            let xs = &x[16 * j..16 * j + 16];
            for l in 0..16 {
                weight[l] = qw[16 * j + l] * (sigma2 + xs[l] * xs[l]).sqrt();
            }
            let mut sumw = 0.0f32;
            for &w in &weight {
                sumw += w;
            }
            sw[j] = sumw;
            scales[j] = make_qx_quants(4, xs, &mut l_all[16 * j..16 * j + 16], Some(&weight));
        }
        finish_block_impl_with(x, &scales, &sw, &l_all, b, requantize16);
    }
}

/// The imatrix path after the sub-block searches: `make_qx_quants` over the scales (weighted
/// by the sub-block weight sums `sw`), requantization (by `requant`) and packing.
#[inline]
pub fn finish_block_impl_with<R>(
    x: &[f32],
    scales: &[f32; 16],
    sw: &[f32; 16],
    l_all: &[i8; QK_K],
    b: &mut BlockQ3K,
    requant: R,
) where
    R: Fn(&[f32], f32, &mut [u8]),
{
    b.scales = [0; 12];
    let mut ls = [0i8; QK_K / 16];
    let d_block = make_qx_quants(32, scales, &mut ls, Some(sw));
    for (j, &l) in ls.iter().enumerate() {
        put_scale(&mut b.scales, j, l as u8);
    }
    b.d = f16_from_f32(d_block);
    let mut l = to_u8(l_all);
    requantize_and_pack_with(x, b, &mut l, requant);
}

/// ggml's `dequantize_row_q3_K` (and gguf-py's `Q3_K.dequantize_blocks`):
/// `d*(sc-32) * (l - (hmask bit ? 0 : 4))`.
pub fn dequantize_row_q3_k(data: &[u8], y: &mut [f32]) {
    let blocks: &[BlockQ3K] = bytemuck::cast_slice(data);
    for (b, y) in blocks.iter().zip(y.chunks_exact_mut(QK_K)) {
        let d_all = f16_to_f32(b.d);
        for j in 0..QK_K / 16 {
            let dl = d_all * get_scale(&b.scales, j) as f32;
            let q = &b.qs[32 * (j / 8) + 16 * (j % 2)..][..16];
            let hm = &b.hmask[16 * (j % 2)..][..16];
            let shift = 2 * ((j / 2) % 4);
            let bit = 1u8 << (j / 2);
            for l in 0..16 {
                let low = ((q[l] >> shift) & 3) as i32;
                let off = if hm[l] & bit != 0 { 0 } else { 4 };
                y[16 * j + l] = dl * (low - off) as f32;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_block_is_all_zero() {
        let x = [0f32; QK_K];
        let mut q = [0x55u8; 110];
        quantize_row_q3_k_ref(&x, &mut q);
        let mut y = [1f32; QK_K];
        dequantize_row_q3_k(&q, &mut y);
        assert!(y.iter().all(|&v| v == 0.0));
        quantize_row_q3_k_impl(&x, &mut q, &[1.0; QK_K]);
        dequantize_row_q3_k(&q, &mut y);
        assert!(y.iter().all(|&v| v == 0.0));
    }

    #[test]
    fn scale_packing_round_trips() {
        let mut s = [0u8; 12];
        for j in 0..16 {
            put_scale(&mut s, j, (j * 4 + 1) as u8);
        }
        for j in 0..16 {
            assert_eq!(get_scale(&s, j), (j * 4 + 1) as i32 - 32);
        }
    }

    #[test]
    fn an_eight_level_grid_is_reproduced() {
        // Levels -4..3 times 1/4 in every sub-block: x = d*sc*l with sc*d = 1/4 exactly.
        let x: Vec<f32> = (0..QK_K).map(|i| ((i % 8) as f32 - 4.0) * 0.25).collect();
        let mut q = [0u8; 110];
        quantize_row_q3_k_ref(&x, &mut q);
        let mut y = [0f32; QK_K];
        dequantize_row_q3_k(&q, &mut y);
        assert_eq!(&y[..], &x[..]);
    }
}
