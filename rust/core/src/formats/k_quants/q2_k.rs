//! q2_K: 256 weights in 16 sub-blocks of 16, `x ~ d*sc*l - dmin*m` with 2-bit `l`, 4-bit
//! `sc`/`m` and f16 `d`/`dmin` (2.625 bits per weight).

use super::common::*;
use crate::formats::blocks::{f16_from_f32, f16_to_f32, BlockQ2K, QK_K};

/// Requantize every sub-block against the f16 block scales and pack (the tail shared by
/// `quantize_row_q2_K_ref` and `quantize_row_q2_K_impl`). Sub-blocks whose scale is zero keep
/// the levels of the search.
fn requantize_and_pack(x: &[f32], b: &mut BlockQ2K, l_all: &mut [u8; QK_K]) {
    let (dd, dmin) = (f16_to_f32(b.d), f16_to_f32(b.dmin));
    for j in 0..QK_K / 16 {
        let d = dd * (b.scales[j] & 0xf) as f32;
        if d == 0.0 {
            continue;
        }
        let dm = dmin * (b.scales[j] >> 4) as f32;
        for ii in 0..16 {
            let l = nearest_int((x[16 * j + ii] + dm) / d);
            l_all[16 * j + ii] = clamp(l, 0, 3) as u8;
        }
    }
    pack_2bit(l_all, &mut b.qs);
}

/// Search parameters of `quantize_row_q2_K_ref`.
pub const Q2K_REF: AsymSearch = AsymSearch {
    nmax: 3,
    rmin: -0.5,
    rdelta: 0.1,
    nstep: 15,
    use_mad: true,
};

/// ggml's `quantize_row_q2_K_ref` (what `ggml_quantize_chunk` runs without an imatrix).
pub fn quantize_row_q2_k_ref(x: &[f32], out: &mut [u8]) {
    let blocks: &mut [BlockQ2K] = bytemuck::cast_slice_mut(out);
    let mut l_all = [0u8; QK_K];
    let mut laux = [0u8; 16];
    let mut weights = [0f32; 16];
    for (b, x) in blocks.iter_mut().zip(x.chunks_exact(QK_K)) {
        let mut scales = [0f32; QK_K / 16];
        let mut mins = [0f32; QK_K / 16];
        for j in 0..QK_K / 16 {
            let xs = &x[16 * j..16 * j + 16];
            for l in 0..16 {
                weights[l] = xs[l].abs();
            }
            let ls = &mut l_all[16 * j..16 * j + 16];
            (scales[j], mins[j]) = make_qkx2_quants(Q2K_REF, xs, &weights, ls, &mut laux);
        }
        finish_block_ref(x, &scales, &mins, &mut l_all, b);
    }
}

/// The reference path after the sub-block searches: 4-bit scales and mins against their
/// maxima (`d = max_scale/15`, `dmin = max_min/15`), requantization and packing.
#[inline]
pub fn finish_block_ref(
    x: &[f32],
    scales: &[f32; 16],
    mins: &[f32; 16],
    l_all: &mut [u8; QK_K],
    b: &mut BlockQ2K,
) {
    const Q4SCALE: f32 = 15.0;
    let mut max_scale = 0.0f32;
    let mut max_min = 0.0f32;
    for j in 0..QK_K / 16 {
        if scales[j] > max_scale {
            max_scale = scales[j];
        }
        if mins[j] > max_min {
            max_min = mins[j];
        }
    }
    if max_scale > 0.0 {
        let iscale = Q4SCALE / max_scale;
        for j in 0..QK_K / 16 {
            b.scales[j] = nearest_int(iscale * scales[j]) as u8;
        }
        b.d = f16_from_f32(max_scale / Q4SCALE);
    } else {
        b.scales = [0; QK_K / 16];
        b.d = f16_from_f32(0.0);
    }
    if max_min > 0.0 {
        let iscale = Q4SCALE / max_min;
        for j in 0..QK_K / 16 {
            let l = nearest_int(iscale * mins[j]);
            b.scales[j] |= (l << 4) as u8;
        }
        b.dmin = f16_from_f32(max_min / Q4SCALE);
    } else {
        b.dmin = f16_from_f32(0.0);
    }
    requantize_and_pack(x, b, l_all);
}

/// ggml's `quantize_row_q2_K_impl` (what `ggml_quantize_chunk` runs with an imatrix `qw`, one
/// weight per column of the row).
pub fn quantize_row_q2_k_impl(x: &[f32], out: &mut [u8], qw: &[f32]) {
    let blocks: &mut [BlockQ2K] = bytemuck::cast_slice_mut(out);
    let mut l_all = [0u8; QK_K];
    let mut laux = [0u8; 16];
    let mut weight = [0f32; 16];
    for ((b, x), qw) in blocks
        .iter_mut()
        .zip(x.chunks_exact(QK_K))
        .zip(qw.chunks_exact(QK_K))
    {
        let mut scales = [0f32; QK_K / 16];
        let mut mins = [0f32; QK_K / 16];
        let mut sw = [0f32; QK_K / 16];
        let sigma2 = sum_sq(x) / QK_K as f32;
        for j in 0..QK_K / 16 {
            let xs = &x[16 * j..16 * j + 16];
            for l in 0..16 {
                weight[l] = qw[16 * j + l] * (sigma2 + xs[l] * xs[l]).sqrt();
            }
            for &w in &weight {
                sw[j] += w;
            }
            let ls = &mut l_all[16 * j..16 * j + 16];
            (scales[j], mins[j]) = make_qkx3_quants(Q2K_IMPL, xs, &weight, ls, &mut laux);
        }
        finish_block_impl(x, &scales, &mins, &sw, &mut l_all, b);
    }
}

/// Search parameters of `quantize_row_q2_K_impl`.
pub const Q2K_IMPL: AsymSearch = AsymSearch {
    nmax: 3,
    rmin: -0.9,
    rdelta: 0.05,
    nstep: 36,
    use_mad: false,
};

/// The imatrix path after the sub-block searches: `make_qp_quants` over the scales and the
/// mins (weighted by the sub-block weight sums `sw`), requantization and packing.
#[inline]
pub fn finish_block_impl(
    x: &[f32],
    scales: &[f32; 16],
    mins: &[f32; 16],
    sw: &[f32; 16],
    l_all: &mut [u8; QK_K],
    b: &mut BlockQ2K,
) {
    let mut ls = [0u8; QK_K / 16];
    let mut lm = [0u8; QK_K / 16];
    let dm = make_qp_quants(15, scales, &mut ls, sw);
    let mm = make_qp_quants(15, mins, &mut lm, sw);
    b.d = f16_from_f32(dm);
    b.dmin = f16_from_f32(mm);
    for j in 0..QK_K / 16 {
        b.scales[j] = ls[j] | (lm[j] << 4);
    }
    requantize_and_pack(x, b, l_all);
}

/// ggml's `dequantize_row_q2_K` (and gguf-py's `Q2_K.dequantize_blocks`): `dl*l - ml`.
pub fn dequantize_row_q2_k(data: &[u8], y: &mut [f32]) {
    let blocks: &[BlockQ2K] = bytemuck::cast_slice(data);
    for (b, y) in blocks.iter().zip(y.chunks_exact_mut(QK_K)) {
        let (d, min) = (f16_to_f32(b.d), f16_to_f32(b.dmin));
        for j in 0..QK_K / 16 {
            let sc = b.scales[j];
            let dl = d * (sc & 0xf) as f32;
            let ml = min * (sc >> 4) as f32;
            // sub-block j: 128-value half j/8, byte offset 16*(j%2), shift 2*((j/2)%4)
            let q = &b.qs[32 * (j / 8) + 16 * (j % 2)..][..16];
            let shift = 2 * ((j / 2) % 4);
            for l in 0..16 {
                y[16 * j + l] = dl * ((q[l] >> shift) & 3) as f32 - ml;
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
        let mut q = [0xffu8; 84];
        quantize_row_q2_k_ref(&x, &mut q);
        assert!(q.iter().all(|&v| v == 0));
        quantize_row_q2_k_impl(&x, &mut q, &[1.0; QK_K]);
        let mut y = [1f32; QK_K];
        dequantize_row_q2_k(&q, &mut y);
        assert!(y.iter().all(|&v| v == 0.0));
    }

    #[test]
    fn a_four_level_grid_is_reproduced() {
        // Every sub-block holds the levels {-1, 0, 1, 2} * 15/16: scale and min are 15 * 1/16,
        // exact in f16 and in the 4-bit sub-block scales.
        let x: Vec<f32> = (0..QK_K)
            .map(|i| 0.9375 * (i % 4) as f32 - 0.9375)
            .collect();
        let mut q = [0u8; 84];
        quantize_row_q2_k_ref(&x, &mut q);
        let mut y = [0f32; QK_K];
        dequantize_row_q2_k(&q, &mut y);
        assert_eq!(&y[..], &x[..]);
    }
}
