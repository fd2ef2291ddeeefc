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
use crate::formats::k_quants::common::get_scale_min_k4;
use crate::formats::k_quants::q3_k::get_scale;
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
            QType::Q2K => q2_k(bytemuck::cast_slice(bytes), dst),
            QType::Q3K => q3_k(bytemuck::cast_slice(bytes), dst),
            QType::Q4K => q4_k(bytemuck::cast_slice(bytes), dst),
            QType::Q5K => q5_k(bytemuck::cast_slice(bytes), dst),
            QType::Q6K => q6_k(bytemuck::cast_slice(bytes), dst),
            QType::IQ4XS => iq4_xs(bytemuck::cast_slice(bytes), dst),
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

/// The table of 32 bf16 values: entries 0..16 from `lo`, 16..32 from `hi`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
#[inline]
fn table(lo: __m512, hi: __m512) -> __m512i {
    // SAFETY: a 512-bit vector reinterpreted (32 bf16 as 32 u16).
    unsafe { std::mem::transmute::<__m512bh, __m512i>(_mm512_cvtne2ps_pbh(hi, lo)) }
}

/// `t[idx[e]]` for the 32 word indices (0..32) into `d[..32]`.
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

/// 32 bytes as 32 words, each byte shifted right by `shift` and masked with `mask`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
#[inline]
unsafe fn bits32(p: &[u8], shift: u32, mask: i16) -> __m512i {
    assert!(p.len() >= 32);
    // SAFETY: 32 bytes loaded (asserted).
    let b = _mm512_cvtepu8_epi16(unsafe { _mm256_loadu_si256(p.as_ptr() as *const __m256i) });
    _mm512_and_si512(
        _mm512_srl_epi16(b, _mm_cvtsi32_si128(shift as i32)),
        _mm512_set1_epi16(mask),
    )
}

/// `idx + add` in the words whose bit is set in `m`.
#[target_feature(enable = "avx512f,avx512bw")]
#[inline]
fn add_where(idx: __m512i, m: __mmask32, add: i16) -> __m512i {
    _mm512_mask_add_epi16(idx, m, idx, _mm512_set1_epi16(add))
}

/// Bytes `p[..32]` with any bit of `bit` set, as a mask (bit e: byte e).
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
#[inline]
unsafe fn test32(p: &[u8], bit: u8) -> __mmask32 {
    assert!(p.len() >= 32);
    // SAFETY: 32 bytes loaded (asserted).
    let v = unsafe { _mm256_loadu_si256(p.as_ptr() as *const __m256i) };
    _mm256_test_epi8_mask(v, _mm256_set1_epi8(bit as i8))
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

/// `dl · q - ml` per 16 elements (`dl = d · (sc & 15)`, `ml = dmin · (sc >> 4)`), q of 2 bits.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
unsafe fn q2_k(blocks: &[BlockQ2K], dst: &mut [u16]) {
    for (b, y) in blocks.iter().zip(dst.chunks_exact_mut(QK_K)) {
        let (dd, min) = (f16_to_f32(b.d), f16_to_f32(b.dmin));
        // 32 elements t: sub-blocks 2t and 2t + 1, bytes qs[32 (t / 4)..][..32] >> 2 (t % 4).
        for (t, d) in y.chunks_exact_mut(32).enumerate() {
            let half = |j: usize| {
                let sc = b.scales[j];
                let dl = _mm512_set1_ps(dd * (sc & 0xf) as f32);
                let ml = _mm512_set1_ps(min * (sc >> 4) as f32);
                _mm512_sub_ps(_mm512_mul_ps(dl, iota()), ml)
            };
            let tab = table(half(2 * t), half(2 * t + 1));
            // SAFETY: the features; 32 bytes of qs.
            let idx = unsafe { bits32(&b.qs[32 * (t / 4)..], 2 * (t % 4) as u32, 3) };
            let idx = add_where(idx, 0xffff_0000, 16);
            // SAFETY: the features; d has 32 elements.
            unsafe { look_up(idx, tab, d) };
        }
    }
}

/// `dl · (q - 4)` per 16 elements (`dl = d · scale`), q = 2 low bits + 4 · the hmask bit.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
unsafe fn q3_k(blocks: &[BlockQ3K], dst: &mut [u16]) {
    let q = _mm512_sub_ps(iota(), _mm512_set1_ps(4.0));
    for (b, y) in blocks.iter().zip(dst.chunks_exact_mut(QK_K)) {
        let dd = f16_to_f32(b.d);
        for (t, d) in y.chunks_exact_mut(32).enumerate() {
            let half = |j: usize| {
                let dl = _mm512_set1_ps(dd * get_scale(&b.scales, j) as f32);
                _mm512_mul_ps(dl, q)
            };
            let tab = table(half(2 * t), half(2 * t + 1));
            // SAFETY: the features; 32 bytes of qs and of hmask.
            let idx = unsafe { bits32(&b.qs[32 * (t / 4)..], 2 * (t % 4) as u32, 3) };
            // SAFETY: as above.
            let idx = add_where(idx, unsafe { test32(&b.hmask, 1 << t) }, 4);
            let idx = add_where(idx, 0xffff_0000, 16);
            // SAFETY: the features; d has 32 elements.
            unsafe { look_up(idx, tab, d) };
        }
    }
}

/// `d1 · q - m1` per 32 elements (`d1 = d · sc`, `m1 = dmin · m`), q of 4 bits (`h5`: with a
/// fifth bit from `qh`, q5_k).
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
#[inline]
unsafe fn k4(
    b_d: Half,
    b_dmin: Half,
    scales: &[u8; 12],
    qs: &[u8],
    qh: Option<&[u8]>,
    y: &mut [u16],
) {
    let (dd, min) = (f16_to_f32(b_d), f16_to_f32(b_dmin));
    let q_hi = _mm512_add_ps(iota(), _mm512_set1_ps(16.0));
    for (g, d) in y.chunks_exact_mut(32).enumerate() {
        let (sc, m) = get_scale_min_k4(g, scales);
        let (s, m) = (
            _mm512_set1_ps(dd * sc as f32),
            _mm512_set1_ps(min * m as f32),
        );
        let lo = _mm512_sub_ps(_mm512_mul_ps(s, iota()), m);
        // SAFETY: the features; 32 bytes of qs (the pair g / 2).
        let idx = unsafe { bits32(&qs[32 * (g / 2)..], 4 * (g % 2) as u32, 0xf) };
        let (idx, hi) = match qh {
            // SAFETY: the features; 32 bytes of qh.
            Some(qh) => (
                add_where(idx, unsafe { test32(qh, 1 << g) }, 16),
                _mm512_sub_ps(_mm512_mul_ps(s, q_hi), m),
            ),
            None => (idx, lo),
        };
        // SAFETY: the features; d has 32 elements.
        unsafe { look_up(idx, table(lo, hi), d) };
    }
}

#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
unsafe fn q4_k(blocks: &[BlockQ4K], dst: &mut [u16]) {
    for (b, y) in blocks.iter().zip(dst.chunks_exact_mut(QK_K)) {
        // SAFETY: the features; a block's 256 elements.
        unsafe { k4(b.d, b.dmin, &b.scales, &b.qs, None, y) };
    }
}

#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
unsafe fn q5_k(blocks: &[BlockQ5K], dst: &mut [u16]) {
    for (b, y) in blocks.iter().zip(dst.chunks_exact_mut(QK_K)) {
        // SAFETY: the features; a block's 256 elements.
        unsafe { k4(b.d, b.dmin, &b.scales, &b.qs, Some(&b.qh), y) };
    }
}

/// `(d · sc) · (q - 32)` per 16 elements, q of 6 bits: converted and scaled per element.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
unsafe fn q6_k(blocks: &[BlockQ6K], dst: &mut [u16]) {
    let off = _mm512_set1_epi32(32);
    for (b, y) in blocks.iter().zip(dst.chunks_exact_mut(QK_K)) {
        let dd = f16_to_f32(b.d);
        // 32 elements c of half h: element l from ql[64 h + l + 32 (c & 1)] (nibble c >> 1) and
        // bits 2c of qh[32 h + l], scale sc[8 h + 2 c + l / 16].
        for (i, d) in y.chunks_exact_mut(32).enumerate() {
            let (h, c) = (i / 4, i % 4);
            // SAFETY: the features; 32 bytes of ql and of qh.
            let low = unsafe { bits32(&b.ql[64 * h + 32 * (c & 1)..], 4 * (c >> 1) as u32, 0xf) };
            // SAFETY: as above.
            let high = unsafe { bits32(&b.qh[32 * h..], 2 * c as u32, 3) };
            let q = _mm512_or_si512(low, _mm512_slli_epi16::<4>(high));
            let val = |part: __m256i, j: usize| {
                let s = _mm512_set1_ps(dd * b.scales[8 * h + 2 * c + j] as f32);
                let qi = _mm512_sub_epi32(_mm512_cvtepu16_epi32(part), off);
                _mm512_mul_ps(s, _mm512_cvtepi32_ps(qi))
            };
            let lo = val(_mm512_castsi512_si256(q), 0);
            let hi = val(_mm512_extracti64x4_epi64::<1>(q), 1);
            // SAFETY: the features; d has 32 elements.
            unsafe { store(lo, hi, d) };
        }
    }
}

/// `dl · value[q]` per 32 elements (`dl = d · (ls - 32)`, 6-bit `ls`).
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
unsafe fn iq4_xs(blocks: &[BlockIQ4XS], dst: &mut [u16]) {
    let vals = iq4_values();
    for (b, y) in blocks.iter().zip(dst.chunks_exact_mut(QK_K)) {
        let dd = f16_to_f32(b.d);
        let sh = u16::from_le_bytes(b.scales_h);
        for (ib, d) in y.chunks_exact_mut(32).enumerate() {
            let lo = (b.scales_l[ib / 2] >> (4 * (ib % 2))) & 0xf;
            let hi = ((sh >> (2 * ib)) & 3) as u8;
            let dl = dd * ((lo | (hi << 4)) as i32 - 32) as f32;
            let t = _mm512_mul_ps(_mm512_set1_ps(dl), vals);
            let qs: &[u8; 16] = b.qs[16 * ib..16 * ib + 16].try_into().unwrap();
            // SAFETY: the features; d has 32 elements.
            unsafe { look_up(nibbles16(qs), table(t, t), d) };
        }
    }
}

#[cfg(test)]
pub(crate) mod tests;
mod w32;
