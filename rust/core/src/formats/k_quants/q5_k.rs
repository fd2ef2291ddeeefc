//! q5_K: q4_K's layout with a fifth bit per weight in `qh` (5.5 bits per weight). The scale
//! stages are q4_K's (`q4_k::ref_search` etc.) with `nmax = 31`.

use super::common::*;
use super::q4_k::{impl_scales, impl_search, ref_scales, ref_search, requantize, QK_IMPL};
use crate::formats::blocks::{f16_to_f32, BlockQ5K, QK_K};

/// Search parameters of `quantize_row_q5_K_ref`.
pub const Q5K_REF: AsymSearch = AsymSearch {
    nmax: 31,
    rmin: -0.5,
    rdelta: 0.1,
    nstep: 15,
    use_mad: false,
};

/// q5_K's packing: the low nibbles as q4_K, the fifth bit of value `64g + j` in `qh[j]` bit
/// `2g`, of value `64g + 32 + j` in bit `2g + 1`.
pub fn pack_q5(l_all: &[u8; QK_K], b: &mut BlockQ5K) {
    b.qh = [0; QK_K / 8];
    for (g, (src, ql)) in l_all
        .chunks_exact(64)
        .zip(b.qs.chunks_exact_mut(32))
        .enumerate()
    {
        let (m1, m2) = (1u8 << (2 * g), 2u8 << (2 * g));
        for j in 0..32 {
            let mut l1 = src[j];
            if l1 > 15 {
                l1 -= 16;
                b.qh[j] |= m1;
            }
            let mut l2 = src[j + 32];
            if l2 > 15 {
                l2 -= 16;
                b.qh[j] |= m2;
            }
            ql[j] = l1 | (l2 << 4);
        }
    }
}

/// ggml's `quantize_row_q5_K_ref` (what `ggml_quantize_chunk` runs without an imatrix).
pub fn quantize_row_q5_k_ref(x: &[f32], out: &mut [u8]) {
    let blocks: &mut [BlockQ5K] = bytemuck::cast_slice_mut(out);
    let mut l_all = [0u8; QK_K];
    for (b, x) in blocks.iter_mut().zip(x.chunks_exact(QK_K)) {
        let (scales, mins) = ref_search(Q5K_REF, x, &mut l_all);
        (b.scales, b.d, b.dmin) = ref_scales(&scales, &mins);
        requantize(x, &b.scales, b.d, b.dmin, 31, &mut l_all);
        pack_q5(&l_all, b);
    }
}

/// ggml's `quantize_row_q5_K_impl` with an imatrix `qw`.
pub fn quantize_row_q5_k_impl(x: &[f32], out: &mut [u8], qw: &[f32]) {
    let p = AsymSearch {
        nmax: 31,
        ..QK_IMPL
    };
    let blocks: &mut [BlockQ5K] = bytemuck::cast_slice_mut(out);
    let mut l_all = [0u8; QK_K];
    for ((b, x), qw) in blocks
        .iter_mut()
        .zip(x.chunks_exact(QK_K))
        .zip(qw.chunks_exact(QK_K))
    {
        let (scales, mins, sw) = impl_search(p, x, qw, &mut l_all);
        (b.scales, b.d, b.dmin) = impl_scales(&scales, &mins, &sw, true);
        requantize(x, &b.scales, b.d, b.dmin, 31, &mut l_all);
        pack_q5(&l_all, b);
    }
}

/// ggml's `dequantize_row_q5_K` (and gguf-py's `Q5_K.dequantize_blocks`).
pub fn dequantize_row_q5_k(data: &[u8], y: &mut [f32]) {
    let blocks: &[BlockQ5K] = bytemuck::cast_slice(data);
    for (b, y) in blocks.iter().zip(y.chunks_exact_mut(QK_K)) {
        let (d, min) = (f16_to_f32(b.d), f16_to_f32(b.dmin));
        for (g, (ql, y)) in
            b.qs.chunks_exact(32)
                .zip(y.chunks_exact_mut(64))
                .enumerate()
        {
            let (sc1, m1) = get_scale_min_k4(2 * g, &b.scales);
            let (sc2, m2) = get_scale_min_k4(2 * g + 1, &b.scales);
            let (d1, m1) = (d * sc1 as f32, min * m1 as f32);
            let (d2, m2) = (d * sc2 as f32, min * m2 as f32);
            let (u1, u2) = (1u8 << (2 * g), 2u8 << (2 * g));
            for l in 0..32 {
                let h1 = if b.qh[l] & u1 != 0 { 16 } else { 0 };
                let h2 = if b.qh[l] & u2 != 0 { 16 } else { 0 };
                y[l] = d1 * ((ql[l] & 0xf) as i32 + h1) as f32 - m1;
                y[l + 32] = d2 * ((ql[l] >> 4) as i32 + h2) as f32 - m2;
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
        let mut q = [0x77u8; 176];
        quantize_row_q5_k_ref(&x, &mut q);
        assert!(q.iter().all(|&v| v == 0));
        quantize_row_q5_k_impl(&x, &mut q, &[1.0; QK_K]);
        assert!(q.iter().all(|&v| v == 0));
    }

    #[test]
    fn fifth_bit_packing_round_trips() {
        let l: [u8; QK_K] = std::array::from_fn(|i| (i * 7 % 32) as u8);
        let mut b: BlockQ5K = bytemuck::Zeroable::zeroed();
        pack_q5(&l, &mut b);
        // d = 1, dmin = 0, every scale 1: dequantize gives the levels back.
        b.d = crate::formats::blocks::f16_from_f32(1.0);
        b.scales = pack_scale_min_k4(&[1; 8], &[0; 8]);
        let mut y = [0f32; QK_K];
        dequantize_row_q5_k(bytemuck::bytes_of(&b), &mut y);
        assert!(y.iter().zip(&l).all(|(&a, &b)| a == b as f32));
    }
}
