//! The 32-weight ggml formats (q4_0, q4_1, q5_0, q5_1, q8_0, iq4_nl) decoded to bf16, with as
//! few vector uops per block as the values allow: with 512-bit uops in flight only ports 0 and
//! 5 execute vector work, and the decode of the AMX bf16 route (about half of its time at M = 64)
//! is bound by them, not by its loads.
//!
//! - **Tables**: `q · d + m` (q4_1, q5_1) as one `vfmadd`: the product of a 5-bit integer and
//!   an f16 (11 significant bits) is exact in f32, so the fused sum rounds once, as the
//!   reference's add does after its exact product. (The one difference: where m is a NaN and
//!   so is the product, d a NaN or 0 · inf, the add returns the product's NaN and the fused
//!   op m's; a block with a NaN m takes the multiply and the add.)
//! - **Code indices**: the 16 code bytes broadcast to the four 128-bit lanes by the load, one
//!   `vpshufb` (word e < 16: byte e, word 16 + e: byte e, high bytes zero) and a masked
//!   `vpsrlw` of the upper 16 words by 4. `vpermw` reads bits 0..4 of each word only: the
//!   16-entry tables (q4_0, q4_1, iq4_nl) are stored twice, so bit 4 (byte e's bit 4 in words
//!   e < 16) selects the same value; q5's bit 4 comes from its mask (`vpmovm2w`) in the same
//!   `vpternlogd` that keeps the nibble.
//!
//! Safety: callers check `cpu::has_avx512_bf16` (AVX-512 F/BW/VL and BF16).

use std::arch::x86_64::*;

use super::{iota, iq4_values, look_up, splat_half, store, table};
use crate::formats::blocks::*;

/// Whether an f16 is a NaN.
#[inline]
fn is_nan(h: Half) -> bool {
    u16::from_le_bytes(h) & 0x7fff > 0x7c00
}

/// `q · s + m` as the reference rounds it (`fused`: no m is a NaN, see the module's note).
#[target_feature(enable = "avx512f")]
#[inline]
fn scale_add(q: __m512, s: __m512, m: __m512, fused: bool) -> __m512 {
    if fused {
        _mm512_fmadd_ps(q, s, m)
    } else {
        _mm512_add_ps(_mm512_mul_ps(q, s), m)
    }
}

/// The 32 word indices of a block's 16 code bytes: word e < 16 byte e (all 8 bits), word
/// 16 + e byte e >> 4.
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
#[inline]
fn codes(qs: &[u8; 16]) -> __m512i {
    // Word i: byte i % 16 of its lane (each lane holds the 16 bytes), then a zero byte (-1).
    const SHUF: [i8; 64] = {
        let mut c = [-1i8; 64];
        let mut i = 0;
        while i < 32 {
            c[2 * i] = (i % 16) as i8;
            i += 1;
        }
        c
    };
    // SAFETY: 16 bytes read from `qs`, 64 from the constant.
    let (b, ctl) = unsafe {
        (
            _mm512_broadcast_i32x4(_mm_loadu_si128(qs.as_ptr() as *const __m128i)),
            _mm512_loadu_si512(SHUF.as_ptr() as *const __m512i),
        )
    };
    let w = _mm512_shuffle_epi8(b, ctl);
    _mm512_mask_srli_epi16::<4>(w, 0xffff_0000, w)
}

/// `codes` with bits 0..3 kept and bit 4 set in the words whose bit of `qh` is set (q5's fifth
/// bit; bits 5.. of the words are left to whatever `vpermw` ignores).
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
#[inline]
fn codes5(qs: &[u8; 16], qh: [u8; 4]) -> __m512i {
    let fifth = _mm512_movm_epi16(u32::from_le_bytes(qh));
    // (c ? a : b) per bit, c = 0x000f per word: the nibble from the codes, the rest from qh's.
    _mm512_ternarylogic_epi32::<0xe4>(codes(qs), fifth, _mm512_set1_epi16(0xf))
}

/// `((q - 8) as f32) · d`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
pub(super) fn q4_0(blocks: &[BlockQ4_0], dst: &mut [u16]) {
    let q = _mm512_sub_ps(iota(), _mm512_set1_ps(8.0));
    for (b, d) in blocks.iter().zip(dst.chunks_exact_mut(32)) {
        let lo = _mm512_mul_ps(q, splat_half(b.d));
        // SAFETY: this function's features; d has 32 elements.
        unsafe { look_up(codes(&b.qs), table(lo, lo), d) };
    }
}

/// `q · d + m` (the product exact: one rounding, as the reference's add).
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
pub(super) fn q4_1(blocks: &[BlockQ4_1], dst: &mut [u16]) {
    for (b, d) in blocks.iter().zip(dst.chunks_exact_mut(32)) {
        let fused = !is_nan(b.m);
        let lo = scale_add(iota(), splat_half(b.d), splat_half(b.m), fused);
        // SAFETY: this function's features; d has 32 elements.
        unsafe { look_up(codes(&b.qs), table(lo, lo), d) };
    }
}

/// `((q - 16) as f32) · d`, q's fifth bit (element e: bit e of `qh`).
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
pub(super) fn q5_0(blocks: &[BlockQ5_0], dst: &mut [u16]) {
    let q = _mm512_sub_ps(iota(), _mm512_set1_ps(16.0));
    for (b, d) in blocks.iter().zip(dst.chunks_exact_mut(32)) {
        let s = splat_half(b.d);
        let t = table(_mm512_mul_ps(q, s), _mm512_mul_ps(iota(), s));
        // SAFETY: this function's features; d has 32 elements.
        unsafe { look_up(codes5(&b.qs, b.qh), t, d) };
    }
}

/// `q · d + m`, q of 5 bits (the product exact, as in q4_1).
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
pub(super) fn q5_1(blocks: &[BlockQ5_1], dst: &mut [u16]) {
    let q_hi = _mm512_add_ps(iota(), _mm512_set1_ps(16.0));
    for (b, d) in blocks.iter().zip(dst.chunks_exact_mut(32)) {
        let fused = !is_nan(b.m);
        let (s, m) = (splat_half(b.d), splat_half(b.m));
        let t = table(scale_add(iota(), s, m, fused), scale_add(q_hi, s, m, fused));
        // SAFETY: this function's features; d has 32 elements.
        unsafe { look_up(codes5(&b.qs, b.qh), t, d) };
    }
}

/// `q as f32 · d`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
pub(super) fn q8_0(blocks: &[BlockQ8_0], dst: &mut [u16]) {
    for (b, d) in blocks.iter().zip(dst.chunks_exact_mut(32)) {
        let s = splat_half(b.d);
        // SAFETY: 16 + 16 bytes of the block's 32 quants.
        let (lo, hi) = unsafe {
            (
                _mm_loadu_si128(b.qs.as_ptr() as *const __m128i),
                _mm_loadu_si128(b.qs.as_ptr().add(16) as *const __m128i),
            )
        };
        let lo = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(lo));
        let hi = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(hi));
        // SAFETY: the features; d has 32 elements.
        unsafe { store(_mm512_mul_ps(lo, s), _mm512_mul_ps(hi, s), d) };
    }
}

/// `d · value[q]`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
pub(super) fn iq4_nl(blocks: &[BlockIQ4NL], dst: &mut [u16]) {
    let vals = iq4_values();
    for (b, d) in blocks.iter().zip(dst.chunks_exact_mut(32)) {
        let lo = _mm512_mul_ps(splat_half(b.d), vals);
        // SAFETY: this function's features; d has 32 elements.
        unsafe { look_up(codes(&b.qs), table(lo, lo), d) };
    }
}

#[cfg(test)]
mod tests {
    use super::super::decode;
    use crate::formats::ggml_dequantize_row;
    use crate::matmul::reference::bf16::round_bf16;
    use crate::qtype::QType;

    /// f16 scales where a fused `q · d + m` or the scale conversion could part from the
    /// reference: ±max, ±inf, quiet and signalling NaNs with payloads of either sign, the
    /// subnormals' ends, the smallest normal, ±0 and two plain values.
    const SPECIAL: [u16; 16] = [
        0x7bff, 0xfbff, 0x7c00, 0xfc00, 0x7e00, 0x7c01, 0xfe01, 0x7d55, 0x0001, 0x8001, 0x03ff,
        0x0400, 0x0000, 0x8000, 0x3c00, 0xb555,
    ];

    /// Every pair of `SPECIAL` scales (d, and m where the format has one), one block each, in
    /// runs of every length 1..=40 (the GEMM's partial chunks): the rounded reference's
    /// bits, NaN payloads included.
    #[test]
    fn special_scale_pairs_equal_the_rounded_reference() {
        if !crate::cpu::has_avx512_bf16() {
            return;
        }
        for qtype in [
            QType::Q4_0,
            QType::Q4_1,
            QType::Q5_0,
            QType::Q5_1,
            QType::Q8_0,
            QType::IQ4NL,
        ] {
            let info = qtype.info();
            let (bs, ts) = (info.block_size, info.type_size);
            let with_m = matches!(qtype, QType::Q4_1 | QType::Q5_1);
            let pairs: Vec<(u16, u16)> = SPECIAL
                .iter()
                .flat_map(|&d| SPECIAL.iter().map(move |&m| (d, m)))
                .filter(|&(_, m)| with_m || m == SPECIAL[0])
                .collect();
            let nb = pairs.len();
            let mut data: Vec<u8> = (0..nb * ts).map(|i| (i * 151 + i / 7) as u8).collect();
            for (b, &(d, m)) in pairs.iter().enumerate() {
                data[b * ts..b * ts + 2].copy_from_slice(&d.to_le_bytes());
                if with_m {
                    data[b * ts + 2..b * ts + 4].copy_from_slice(&m.to_le_bytes());
                }
            }
            let mut want = vec![0f32; nb * bs];
            ggml_dequantize_row(qtype, &data, &mut want);
            for len in 1..=40.min(nb) {
                for b0 in (0..nb - len + 1).step_by(len) {
                    let mut got = vec![0u16; len * bs];
                    // SAFETY: AVX-512 BF16 checked above; whole blocks, room for their elements.
                    unsafe { decode(qtype, &data[b0 * ts..(b0 + len) * ts], &mut got) };
                    for (e, (&g, &w)) in got.iter().zip(&want[b0 * bs..]).enumerate() {
                        let (d, m) = pairs[b0 + e / bs];
                        assert_eq!(
                            g,
                            round_bf16(w),
                            "{qtype:?} d {d:#06x} m {m:#06x} element {}: {w:e}",
                            e % bs
                        );
                    }
                }
            }
        }
    }
}
