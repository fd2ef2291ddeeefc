//! q6_K: 256 weights in 16 sub-blocks of 16, `x ~ d*sc*(l-32)` with 6-bit `l` (4 bits in
//! `ql`, 2 in `qh`), int8 `sc` and an f16 `d` (6.5625 bits per weight).

use super::common::*;
use crate::formats::blocks::{f16_from_f32, f16_to_f32, BlockQ6K, QK_K};

/// The shared body of `quantize_row_q6_K_ref` (`qw = None`) and `quantize_row_q6_K_impl`
/// (`qw` = the imatrix of the row; ggml passes it to `make_qx_quants` unchanged).
fn quantize_row(x: &[f32], out: &mut [u8], qw: Option<&[f32]>) {
    let blocks: &mut [BlockQ6K] = bytemuck::cast_slice_mut(out);
    let mut l_all = [0i8; QK_K];
    for (i, (b, x)) in blocks.iter_mut().zip(x.chunks_exact(QK_K)).enumerate() {
        let mut scales = [0f32; QK_K / 16];
        for ib in 0..QK_K / 16 {
            let xs = &x[16 * ib..16 * ib + 16];
            let w = qw.map(|w| &w[QK_K * i + 16 * ib..QK_K * i + 16 * ib + 16]);
            scales[ib] = make_qx_quants(32, xs, &mut l_all[16 * ib..16 * ib + 16], w);
        }
        finish_block(x, &scales, &mut l_all, b);
    }
}

/// Everything after the sub-block searches: the int8 sub-block scales against the largest
/// one, the requantization with the f16 block scale, and the packing. `l_all` holds the
/// levels of the searches (`l + 32`), kept where a sub-block's scale rounds to zero.
#[inline]
pub fn finish_block(x: &[f32], scales: &[f32; 16], l_all: &mut [i8; QK_K], b: &mut BlockQ6K) {
    let mut max_scale = 0.0f32;
    let mut max_abs_scale = 0.0f32;
    for &scale in scales {
        let abs_scale = scale.abs();
        if abs_scale > max_abs_scale {
            max_abs_scale = abs_scale;
            max_scale = scale;
        }
    }
    if max_abs_scale < GROUP_MAX_EPS {
        *b = bytemuck::Zeroable::zeroed();
        return;
    }
    let iscale = -128.0 / max_scale;
    b.d = f16_from_f32(1.0 / iscale);
    for ib in 0..QK_K / 16 {
        b.scales[ib] = nearest_int(iscale * scales[ib]).min(127) as i8;
    }
    let dd = f16_to_f32(b.d);
    for j in 0..QK_K / 16 {
        let d = dd * b.scales[j] as f32;
        if d == 0.0 {
            continue;
        }
        for ii in 0..16 {
            let l = clamp(nearest_int(x[16 * j + ii] / d), -32, 31);
            l_all[16 * j + ii] = (l + 32) as i8;
        }
    }
    pack(l_all, b);
}

/// Byte `l` of `ql[64h..]` holds values `128h + l` (low nibble) and `128h + 64 + l` (high);
/// byte `l + 32` values `128h + 32 + l` and `128h + 96 + l`; `qh[32h + l]` their top 2 bits.
fn pack(l_all: &[i8; QK_K], b: &mut BlockQ6K) {
    for (h, src) in l_all.chunks_exact(128).enumerate() {
        let ql = &mut b.ql[64 * h..64 * h + 64];
        let qh = &mut b.qh[32 * h..32 * h + 32];
        for l in 0..32 {
            let v = [src[l], src[l + 32], src[l + 64], src[l + 96]].map(|v| v as u8);
            ql[l] = (v[0] & 0xf) | ((v[2] & 0xf) << 4);
            ql[l + 32] = (v[1] & 0xf) | ((v[3] & 0xf) << 4);
            qh[l] = (v[0] >> 4) | ((v[1] >> 4) << 2) | ((v[2] >> 4) << 4) | ((v[3] >> 4) << 6);
        }
    }
}

/// ggml's `quantize_row_q6_K_ref` (what `ggml_quantize_chunk` runs without an imatrix).
pub fn quantize_row_q6_k_ref(x: &[f32], out: &mut [u8]) {
    quantize_row(x, out, None);
}

/// ggml's `quantize_row_q6_K_impl` with an imatrix `qw`.
pub fn quantize_row_q6_k_impl(x: &[f32], out: &mut [u8], qw: &[f32]) {
    quantize_row(x, out, Some(qw));
}

/// ggml's `dequantize_row_q6_K` (and gguf-py's `Q6_K.dequantize_blocks`): `d*sc*(l-32)`.
pub fn dequantize_row_q6_k(data: &[u8], y: &mut [f32]) {
    let blocks: &[BlockQ6K] = bytemuck::cast_slice(data);
    for (b, y) in blocks.iter().zip(y.chunks_exact_mut(QK_K)) {
        let d = f16_to_f32(b.d);
        for h in 0..2 {
            let ql = &b.ql[64 * h..];
            let qh = &b.qh[32 * h..];
            let sc = &b.scales[8 * h..];
            let y = &mut y[128 * h..];
            for l in 0..32 {
                let is = l / 16;
                let q1 = ((ql[l] & 0xf) | ((qh[l] & 3) << 4)) as i32 - 32;
                let q2 = ((ql[l + 32] & 0xf) | (((qh[l] >> 2) & 3) << 4)) as i32 - 32;
                let q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i32 - 32;
                let q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i32 - 32;
                y[l] = d * sc[is] as f32 * q1 as f32;
                y[l + 32] = d * sc[is + 2] as f32 * q2 as f32;
                y[l + 64] = d * sc[is + 4] as f32 * q3 as f32;
                y[l + 96] = d * sc[is + 6] as f32 * q4 as f32;
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
        let mut q = [0x11u8; 210];
        quantize_row_q6_k_ref(&x, &mut q);
        assert!(q.iter().all(|&v| v == 0));
        quantize_row_q6_k_impl(&x, &mut q, &[1.0; QK_K]);
        assert!(q.iter().all(|&v| v == 0));
    }

    #[test]
    fn a_symmetric_grid_is_reproduced() {
        // Every sub-block holds -32, -28, ..., 28 times 1/64: its extreme -1/2 gives the scale
        // 1/64 exactly, the int8 scales are all -128 and d = -2^-13 is exact in f16.
        let x: Vec<f32> = (0..QK_K)
            .map(|i| ((i % 16) as f32 * 4.0 - 32.0) / 64.0)
            .collect();
        let mut q = [0u8; 210];
        quantize_row_q6_k_ref(&x, &mut q);
        let mut y = [0f32; QK_K];
        dequantize_row_q6_k(&q, &mut y);
        assert_eq!(&y[..], &x[..]);
    }
}
