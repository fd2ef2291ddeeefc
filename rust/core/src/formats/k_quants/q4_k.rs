//! q4_K: 256 weights in 8 sub-blocks of 32, `x ~ d*sc*l - dmin*m` with 4-bit `l`, 6-bit
//! `sc`/`m` packed into 12 bytes and f16 `d`/`dmin` (4.5 bits per weight). The scale stages
//! here are shared with q5_K, which differs only in `nmax`, the search parameters and the
//! packing of `l`.

use super::common::*;
use crate::formats::blocks::{f16_from_f32, f16_to_f32, BlockQ4K, Half, QK_K};

/// Search parameters of `quantize_row_q4_K_ref`.
pub const Q4K_REF: AsymSearch = AsymSearch {
    nmax: 15,
    rmin: -1.0,
    rdelta: 0.1,
    nstep: 20,
    use_mad: false,
};

/// Search parameters of `quantize_row_q4_K_impl` / `quantize_row_q5_K_impl` (nmax set by type).
pub const QK_IMPL: AsymSearch = AsymSearch {
    nmax: 15,
    rmin: -0.9,
    rdelta: 0.05,
    nstep: 36,
    use_mad: false,
};

/// The weights of the reference search for one 32-value sub-block: `sqrt(sum(x^2)/32) + |x|`.
#[inline]
pub fn ref_weights(xs: &[f32], weights: &mut [f32; 32]) {
    let av_x = (sum_sq(xs) / 32.0).sqrt();
    for l in 0..32 {
        weights[l] = av_x + xs[l].abs();
    }
}

/// The reference search of q4_K / q5_K: per sub-block `make_qkx2_quants` with the weights
/// `ref_weights`. Fills `l_all` and returns (scales, mins).
pub fn ref_search(p: AsymSearch, x: &[f32], l_all: &mut [u8; QK_K]) -> ([f32; 8], [f32; 8]) {
    let mut scales = [0f32; 8];
    let mut mins = [0f32; 8];
    let mut weights = [0f32; 32];
    let mut laux = [0u8; 32];
    for j in 0..8 {
        let xs = &x[32 * j..32 * j + 32];
        ref_weights(xs, &mut weights);
        let ls = &mut l_all[32 * j..32 * j + 32];
        (scales[j], mins[j]) = make_qkx2_quants(p, xs, &weights, ls, &mut laux);
    }
    (scales, mins)
}

/// The reference scale stage: sub-block scales and mins as 6-bit fractions of their maxima,
/// `d = max_scale/63`, `dmin = max_min/63`. Returns (packed scales, d, dmin).
pub fn ref_scales(scales: &[f32; 8], mins: &[f32; 8]) -> ([u8; 12], Half, Half) {
    let mut max_scale = 0.0f32;
    let mut max_min = 0.0f32;
    for j in 0..8 {
        if scales[j] > max_scale {
            max_scale = scales[j];
        }
        if mins[j] > max_min {
            max_min = mins[j];
        }
    }
    let inv_scale = if max_scale > 0.0 {
        63.0 / max_scale
    } else {
        0.0
    };
    let inv_min = if max_min > 0.0 { 63.0 / max_min } else { 0.0 };
    let mut ls = [0u8; 8];
    let mut lm = [0u8; 8];
    for j in 0..8 {
        // uint8_t ls = nearest_int(...); ls = MIN(63, ls);
        ls[j] = (nearest_int(inv_scale * scales[j]) as u8).min(63);
        lm[j] = (nearest_int(inv_min * mins[j]) as u8).min(63);
    }
    let packed = pack_scale_min_k4(&ls, &lm);
    (
        packed,
        f16_from_f32(max_scale / 63.0),
        f16_from_f32(max_min / 63.0),
    )
}

/// The imatrix search of q4_K / q5_K: weights `qw * sqrt(sigma2 + x^2)` with
/// `sigma2 = 2*sum(x^2)/256`, `make_qkx3_quants` per sub-block. Returns (scales, mins, the
/// sums of the weights per sub-block).
pub fn impl_search(
    p: AsymSearch,
    x: &[f32],
    qw: &[f32],
    l_all: &mut [u8; QK_K],
) -> ([f32; 8], [f32; 8], [f32; 8]) {
    let mut scales = [0f32; 8];
    let mut mins = [0f32; 8];
    let mut sw = [0f32; 8];
    let mut weights = [0f32; 32];
    let mut laux = [0u8; 32];
    let sigma2 = 2.0 * sum_sq(x) / QK_K as f32;
    for j in 0..8 {
        let xs = &x[32 * j..32 * j + 32];
        for l in 0..32 {
            weights[l] = qw[32 * j + l] * (sigma2 + xs[l] * xs[l]).sqrt();
        }
        let mut sumw = 0.0f32;
        for &w in &weights {
            sumw += w;
        }
        sw[j] = sumw;
        let ls = &mut l_all[32 * j..32 * j + 32];
        (scales[j], mins[j]) = make_qkx3_quants(p, xs, &weights, ls, &mut laux);
    }
    (scales, mins, sw)
}

/// The imatrix scale stage: `make_qp_quants` over the scales and over the mins. `cap63` is
/// q5_K's extra `MIN(63, ...)` (q4_K packs the levels as they come).
pub fn impl_scales(
    scales: &[f32; 8],
    mins: &[f32; 8],
    sw: &[f32; 8],
    cap63: bool,
) -> ([u8; 12], Half, Half) {
    let mut ls = [0u8; 8];
    let mut lm = [0u8; 8];
    let d_block = make_qp_quants(63, scales, &mut ls, sw);
    let m_block = make_qp_quants(63, mins, &mut lm, sw);
    if cap63 {
        for j in 0..8 {
            ls[j] = ls[j].min(63);
            lm[j] = lm[j].min(63);
        }
    }
    let packed = pack_scale_min_k4(&ls, &lm);
    (packed, f16_from_f32(d_block), f16_from_f32(m_block))
}

/// Requantize every sub-block to `[0, nmax]` against the f16 scales (the common tail).
/// Sub-blocks whose scale is zero keep the levels of the search.
pub fn requantize(
    x: &[f32],
    scales: &[u8; 12],
    d: Half,
    dmin: Half,
    nmax: i32,
    l_all: &mut [u8; QK_K],
) {
    let (dd, dmin) = (f16_to_f32(d), f16_to_f32(dmin));
    for j in 0..8 {
        let (sc, m) = get_scale_min_k4(j, scales);
        let d = dd * sc as f32;
        if d == 0.0 {
            continue;
        }
        let dm = dmin * m as f32;
        for ii in 0..32 {
            let l = nearest_int((x[32 * j + ii] + dm) / d);
            l_all[32 * j + ii] = clamp(l, 0, nmax) as u8;
        }
    }
}

/// q4_K's packing: byte `l` of 32-byte group `g` holds values `64g + l` (low nibble) and
/// `64g + 32 + l` (high nibble).
pub fn pack_q4(l_all: &[u8; QK_K], qs: &mut [u8; QK_K / 2]) {
    for (src, q) in l_all.chunks_exact(64).zip(qs.chunks_exact_mut(32)) {
        for l in 0..32 {
            q[l] = src[l] | (src[l + 32] << 4);
        }
    }
}

/// ggml's `quantize_row_q4_K_ref` (what `ggml_quantize_chunk` runs without an imatrix).
pub fn quantize_row_q4_k_ref(x: &[f32], out: &mut [u8]) {
    let blocks: &mut [BlockQ4K] = bytemuck::cast_slice_mut(out);
    let mut l_all = [0u8; QK_K];
    for (b, x) in blocks.iter_mut().zip(x.chunks_exact(QK_K)) {
        let (scales, mins) = ref_search(Q4K_REF, x, &mut l_all);
        (b.scales, b.d, b.dmin) = ref_scales(&scales, &mins);
        requantize(x, &b.scales, b.d, b.dmin, 15, &mut l_all);
        pack_q4(&l_all, &mut b.qs);
    }
}

/// ggml's `quantize_row_q4_K_impl` with an imatrix `qw`.
pub fn quantize_row_q4_k_impl(x: &[f32], out: &mut [u8], qw: &[f32]) {
    let blocks: &mut [BlockQ4K] = bytemuck::cast_slice_mut(out);
    let mut l_all = [0u8; QK_K];
    for ((b, x), qw) in blocks
        .iter_mut()
        .zip(x.chunks_exact(QK_K))
        .zip(qw.chunks_exact(QK_K))
    {
        let (scales, mins, sw) = impl_search(QK_IMPL, x, qw, &mut l_all);
        (b.scales, b.d, b.dmin) = impl_scales(&scales, &mins, &sw, false);
        requantize(x, &b.scales, b.d, b.dmin, 15, &mut l_all);
        pack_q4(&l_all, &mut b.qs);
    }
}

/// ggml's `dequantize_row_q4_K` (and gguf-py's `Q4_K.dequantize_blocks`): `d*sc*l - dmin*m`.
pub fn dequantize_row_q4_k(data: &[u8], y: &mut [f32]) {
    let blocks: &[BlockQ4K] = bytemuck::cast_slice(data);
    for (b, y) in blocks.iter().zip(y.chunks_exact_mut(QK_K)) {
        let (d, min) = (f16_to_f32(b.d), f16_to_f32(b.dmin));
        for (g, (q, y)) in
            b.qs.chunks_exact(32)
                .zip(y.chunks_exact_mut(64))
                .enumerate()
        {
            let (sc1, m1) = get_scale_min_k4(2 * g, &b.scales);
            let (sc2, m2) = get_scale_min_k4(2 * g + 1, &b.scales);
            let (d1, m1) = (d * sc1 as f32, min * m1 as f32);
            let (d2, m2) = (d * sc2 as f32, min * m2 as f32);
            for l in 0..32 {
                y[l] = d1 * (q[l] & 0xf) as f32 - m1;
                y[l + 32] = d2 * (q[l] >> 4) as f32 - m2;
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
        let mut q = [0x33u8; 144];
        quantize_row_q4_k_ref(&x, &mut q);
        assert!(q.iter().all(|&v| v == 0));
        quantize_row_q4_k_impl(&x, &mut q, &[1.0; QK_K]);
        assert!(q.iter().all(|&v| v == 0));
    }

    #[test]
    fn a_sixteen_level_grid_is_reproduced() {
        // Levels 0..15 times 1/8 minus 1 in every sub-block: the search finds scale 1/8 and
        // min 1 everywhere, so the 6-bit scales are all 63 and d = f16(1/8/63), dmin = f16(1/63).
        // f16 rounding is within 2^-12 relative, so d*63 is within 2^-12/8 of 1/8 and dmin*63
        // within 2^-12 of 1: level l is off by at most 15*2^-15 + 2^-12 = 7.02e-4 (+ f32
        // rounding, ~1e-7), and the nearest level can only be closer.
        let x: Vec<f32> = (0..QK_K).map(|i| (i % 16) as f32 * 0.125 - 1.0).collect();
        let mut q = [0u8; 144];
        quantize_row_q4_k_ref(&x, &mut q);
        let mut y = [0f32; QK_K];
        dequantize_row_q4_k(&q, &mut y);
        for (a, b) in x.iter().zip(&y) {
            assert!((a - b).abs() < 7.1e-4, "{a} vs {b}");
        }
    }

    #[test]
    fn every_value_goes_to_the_nearest_level_of_its_sub_block() {
        // The last step of q4_K is l = clamp(nearest_int((x + dm)/d), 0, 15) against the stored
        // scales, so y = d*l - dm is the level of the sub-block's grid nearest to x; the only
        // slack is the f32 rounding of the quotient and of y (a few ulps of the magnitudes).
        let x: Vec<f32> = (0..2 * QK_K)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) * 0.013 + if i % 97 == 0 { 3.0 } else { 0.0 })
            .collect();
        let mut q = [0u8; 288];
        quantize_row_q4_k_ref(&x, &mut q);
        let mut y = vec![0f32; 2 * QK_K];
        dequantize_row_q4_k(&q, &mut y);
        let blocks: &[BlockQ4K] = bytemuck::cast_slice(&q);
        for (bi, b) in blocks.iter().enumerate() {
            let (d, dmin) = (f16_to_f32(b.d), f16_to_f32(b.dmin));
            for j in 0..8 {
                let (sc, m) = get_scale_min_k4(j, &b.scales);
                let (dl, ml) = (d * sc as f32, dmin * m as f32);
                for i in 0..32 {
                    let k = QK_K * bi + 32 * j + i;
                    let best = (0..16)
                        .map(|l| (x[k] - (dl * l as f32 - ml)).abs())
                        .fold(f32::MAX, f32::min);
                    let slack = 4.0 * f32::EPSILON * (x[k].abs() + ml + 15.0 * dl);
                    assert!((x[k] - y[k]).abs() <= best + slack, "{} vs {}", x[k], y[k]);
                }
            }
        }
    }
}
