//! The ggml formats (q4_0, q4_1, q5_0, q5_1, q8_0, iq4_nl, q2_k..q6_k, iq4_xs) decoded into the
//! bf16 GEMM's chunk layout (`gemm16.rs`: a weight row's elements in order, one bf16 each), for
//! the AMX bf16 path at many activation rows (`matmul/gemm_bf16.rs`).
//!
//! **Values.** Every decoded element is `reference::bf16::round_bf16` of the format's f32 value
//! as `formats::dequantize` computes it: the same f32 operations on the same operands in the
//! same order (`(q - 8) · d`, `q · d + m`, `d1 · q - m1`, `(d · sc) · q`, ...), then
//! `vcvtne2ps2bf16` (the rounding `gemm16::semantics_hold` checks). Codes of at most 5 bits
//! (32 values, with up to two scales per 32 elements) go through a table: the 32 possible
//! values of those 32 elements computed once as f32 and rounded, then one `vpermw` of the 32
//! code indices; 8-bit (q8_0) and 6-bit (q6_k) codes are converted and scaled per element.
//! The 32-weight formats (q4_0, q4_1, q5_0, q5_1, q8_0, iq4_nl) are in `decode16_ggml/w32.rs`
//! (`q · d + m` fused where that gives the same bits, indices by one shuffle).
//!
//! Safety: callers check `cpu::has_avx512_bf16` (AVX-512 F/BW/VL and BF16).

use std::arch::x86_64::*;

use crate::formats::blocks::*;
use crate::formats::iq4::KVALUES_IQ4NL;
use crate::qtype::QType;

/// True for the formats `decode` takes.
pub fn takes(qtype: QType) -> bool {
    matches!(
        qtype,
        QType::Q4_0
            | QType::Q4_1
            | QType::Q5_0
            | QType::Q5_1
            | QType::Q8_0
            | QType::IQ4NL
            | QType::Q2K
            | QType::Q3K
            | QType::Q4K
            | QType::Q5K
            | QType::Q6K
            | QType::IQ4XS
    )
}

/// Elements and bytes of one block of `qtype` (one of `takes`): constants, without
/// `QType::info`'s search of the format table (the GEMM asks once per chunk of every row, and
/// the searches cost 15-25 % of the whole product at M = 32-64).
#[inline]
pub fn block_geometry(qtype: QType) -> (usize, usize) {
    use std::mem::size_of;
    match qtype {
        QType::Q4_0 => (QK4_0, size_of::<BlockQ4_0>()),
        QType::Q4_1 => (QK4_1, size_of::<BlockQ4_1>()),
        QType::Q5_0 => (QK5_0, size_of::<BlockQ5_0>()),
        QType::Q5_1 => (QK5_1, size_of::<BlockQ5_1>()),
        QType::Q8_0 => (QK8_0, size_of::<BlockQ8_0>()),
        QType::IQ4NL => (QK4_NL, size_of::<BlockIQ4NL>()),
        QType::Q2K => (QK_K, size_of::<BlockQ2K>()),
        QType::Q3K => (QK_K, size_of::<BlockQ3K>()),
        QType::Q4K => (QK_K, size_of::<BlockQ4K>()),
        QType::Q5K => (QK_K, size_of::<BlockQ5K>()),
        QType::Q6K => (QK_K, size_of::<BlockQ6K>()),
        QType::IQ4XS => (QK_K, size_of::<BlockIQ4XS>()),
        _ => unreachable!("decode16_ggml takes the ggml formats of `takes` only"),
    }
}

/// Whole blocks of `qtype` (`bytes`, one piece of a weight row) as bf16 into `dst` (one entry
/// per element, at least as many as the blocks hold).
///
/// # Safety
/// `cpu::has_avx512_bf16`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
pub unsafe fn decode(qtype: QType, bytes: &[u8], dst: &mut [u16]) {
    let (bs, ts) = block_geometry(qtype);
    assert!(bytes.len().is_multiple_of(ts));
    assert!(dst.len() >= bytes.len() / ts * bs);
    // SAFETY: every arm needs the features (the contract) and gets blocks cast from whole block
    // sizes and a dst that holds their elements (asserted).
    unsafe {
        match qtype {
            QType::Q4_0 => w32::q4_0(bytemuck::cast_slice(bytes), dst),
            QType::Q4_1 => w32::q4_1(bytemuck::cast_slice(bytes), dst),
            QType::Q5_0 => w32::q5_0(bytemuck::cast_slice(bytes), dst),
            QType::Q5_1 => w32::q5_1(bytemuck::cast_slice(bytes), dst),
            QType::Q8_0 => w32::q8_0(bytemuck::cast_slice(bytes), dst),
            QType::IQ4NL => w32::iq4_nl(bytemuck::cast_slice(bytes), dst),
            QType::Q2K => kquants::q2_k(bytemuck::cast_slice(bytes), dst),
            QType::Q3K => kquants::q3_k(bytemuck::cast_slice(bytes), dst),
            QType::Q4K => kquants::q4_k(bytemuck::cast_slice(bytes), dst),
            QType::Q5K => kquants::q5_k(bytemuck::cast_slice(bytes), dst),
            QType::Q6K => kquants::q6_k(bytemuck::cast_slice(bytes), dst),
            QType::IQ4XS => kquants::iq4_xs(bytemuck::cast_slice(bytes), dst),
            _ => unreachable!("decode16_ggml takes the ggml formats of `takes` only"),
        }
    }
}

// ------------------------------------------------------------------------------ helpers

/// 0..16 as f32.
#[target_feature(enable = "avx512f")]
#[inline]
fn iota() -> __m512 {
    _mm512_setr_ps(
        0., 1., 2., 3., 4., 5., 6., 7., 8., 9., 10., 11., 12., 13., 14., 15.,
    )
}

/// A block's f16 scale as f32 in every lane: `vcvtph2ps` (AVX-512 F; the exact conversion of
/// `f16_to_f32`, NaN payloads quieted the same way), without the per-call F16C check and
/// scalar fallback of the `half` crate in the per-block loops (`w32.rs`, `kquants.rs`).
#[target_feature(enable = "avx512f")]
#[inline]
fn splat_half(h: Half) -> __m512 {
    _mm512_cvtph_ps(_mm256_set1_epi16(u16::from_le_bytes(h) as i16))
}

/// The table of 32 bf16 values: entries 0..16 from `lo`, 16..32 from `hi`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
#[inline]
fn table(lo: __m512, hi: __m512) -> __m512i {
    // SAFETY: a 512-bit vector reinterpreted (32 bf16 as 32 u16).
    unsafe { std::mem::transmute::<__m512bh, __m512i>(_mm512_cvtne2ps_pbh(hi, lo)) }
}

/// `t[idx[e]]` for the 32 word indices into `d[..32]` (`vpermw` reads bits 0..4 of each).
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
#[inline]
unsafe fn look_up(idx: __m512i, t: __m512i, d: &mut [u16]) {
    assert!(d.len() >= 32);
    // SAFETY: 64 bytes into a checked 32-element slice.
    unsafe {
        _mm512_storeu_si512(
            d.as_mut_ptr() as *mut __m512i,
            _mm512_permutexvar_epi16(idx, t),
        )
    };
}

/// Two f32 vectors (elements 0..16, 16..32) as 32 bf16 at `d`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
#[inline]
unsafe fn store(lo: __m512, hi: __m512, d: &mut [u16]) {
    assert!(d.len() >= 32);
    // SAFETY: 64 bytes into a checked 32-element slice.
    unsafe { _mm512_storeu_si512(d.as_mut_ptr() as *mut __m512i, table(lo, hi)) };
}

/// 16 bytes as 32 word indices: element e < 16 the low nibble of byte e, element 16 + e its
/// high nibble (the 32-weight formats' order).
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
#[inline]
unsafe fn nibbles16(p: &[u8; 16]) -> __m512i {
    // SAFETY: 16 bytes loaded.
    let b = _mm256_cvtepu8_epi16(unsafe { _mm_loadu_si128(p.as_ptr() as *const __m128i) });
    let lo = _mm256_and_si256(b, _mm256_set1_epi16(0xf));
    let hi = _mm256_srli_epi16::<4>(b);
    _mm512_inserti64x4::<1>(_mm512_castsi256_si512(lo), hi)
}

// ------------------------------------------------------------------ the 32-weight formats

/// The 16 iq4 values as f32.
#[target_feature(enable = "avx512f")]
#[inline]
fn iq4_values() -> __m512 {
    // SAFETY: 16 bytes of the table.
    let v = unsafe { _mm_loadu_si128(KVALUES_IQ4NL.as_ptr() as *const __m128i) };
    _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(v))
}

// ---------------------------------------------------------------------------- K-quants

/// q2_k..q6_k and iq4_xs (a table per sub-block group, the scales of a block in one vector).
mod kquants;

#[cfg(test)]
pub(crate) mod tests;
mod w32;
