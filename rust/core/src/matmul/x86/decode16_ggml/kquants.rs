//! The K-quants (q2_k..q6_k, iq4_xs) of `decode16_ggml::decode`: per 256-element block the
//! sub-block scales are decoded once into one f32 vector (the dequantizer's own products,
//! `d · sc` and `dmin · m`, lane by lane: the same f32 multiplications as its scalar loop), and
//! each table holds as many sub-blocks as its 32 entries fit: q2_k's 4 values a sub-block of 16
//! take 8 sub-blocks a table (2 tables a block), q3_k's 8 values take 4 (4 tables), q4_k's and
//! iq4_xs' 16 values take 2 (4 tables), q5_k's 32 values one (8 tables). The code indices are
//! widened once per 32 bytes and shared by the element groups that read those bytes (the
//! nibbles or bit pairs of one byte), the high bit planes (q3_k's hmask, q5_k's qh) once per
//! block. q6_k (64 values per 16 elements) is converted and scaled per element, its 6-bit codes
//! assembled in bytes. Session 18 (issue 19, M = 64): the decode was ~58 % of a q5_k product.
//!
//! Values: as in the parent module, every element is the dequantizer's f32 value rounded once
//! to bf16 (`decode16_ggml/tests.rs` checks them bit for bit).

use std::arch::x86_64::*;

use super::{iota, look_up, splat_half, table};
use crate::formats::blocks::*;

/// `vpternlog` immediates: `a | (b & c)` and `(a & b) | c`.
const A_OR_B_AND_C: i32 = 0xF8;
const A_AND_B_OR_C: i32 = 0xEA;

/// A vector stored for reading its lanes one at a time (broadcasts from memory).
#[repr(align(64))]
struct Lanes([f32; 16]);

/// `v` into `l`.
#[target_feature(enable = "avx512f")]
#[inline]
fn store_lanes(v: __m512, l: &mut Lanes) {
    // SAFETY: 64 aligned bytes.
    unsafe { _mm512_store_ps(l.0.as_mut_ptr(), v) };
    // (opaque to the optimiser: the lanes are then read by broadcasts from memory, a load
    // each, where LLVM would otherwise shuffle them out of the register, 1-2 port-5 uops each)
    std::hint::black_box(l);
}

/// Two `Lanes` for a block's scales computed one block ahead (q4_k, q5_k, q6_k): read right
/// after their own store, the broadcasts waited on it and on the block's last line (its `d`):
/// ~40 % of q6_k's decode samples at M = 64 sat on the first of them (session 19).
fn lanes2() -> [Lanes; 2] {
    [Lanes([0.0; 16]), Lanes([0.0; 16])]
}

/// `p[..32]` as 32 words (zero-extended).
#[target_feature(enable = "avx512f,avx512bw")]
#[inline]
fn words32(p: &[u8]) -> __m512i {
    assert!(p.len() >= 32);
    // SAFETY: 32 bytes loaded (asserted).
    _mm512_cvtepu8_epi16(unsafe { _mm256_loadu_si256(p.as_ptr() as *const __m256i) })
}

/// `p[..32]` as bytes.
#[target_feature(enable = "avx2")]
#[inline]
fn bytes32(p: &[u8]) -> __m256i {
    assert!(p.len() >= 32);
    // SAFETY: 32 bytes loaded (asserted).
    unsafe { _mm256_loadu_si256(p.as_ptr() as *const __m256i) }
}

/// `p[..16]` as bytes.
#[target_feature(enable = "sse2")]
#[inline]
fn bytes16(p: &[u8]) -> __m128i {
    assert!(p.len() >= 16);
    // SAFETY: 16 bytes loaded (asserted).
    unsafe { _mm_loadu_si128(p.as_ptr() as *const __m128i) }
}

/// Word lanes 0..16 `a`, 16..32 `b`.
#[target_feature(enable = "avx512f,avx512bw")]
#[inline]
fn halves16(a: i16, b: i16) -> __m512i {
    _mm512_mask_blend_epi16(0xffff_0000, _mm512_set1_epi16(a), _mm512_set1_epi16(b))
}

/// Lanes `l` of `v` at lanes `idx` (`vpermps`).
#[target_feature(enable = "avx512f")]
#[inline]
fn pick(v: __m512, idx: __m512i) -> __m512 {
    _mm512_permutexvar_ps(idx, v)
}

// ------------------------------------------------------------------------------------ q2_k

/// `dl · q - ml` per 16 elements (`dl = d · (sc & 15)`, `ml = dmin · (sc >> 4)`), q of 2 bits:
/// table h holds sub-blocks 8h..8h + 8 (entry 4r + q).
///
/// # Safety
/// `cpu::has_avx512_bf16`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
pub(super) unsafe fn q2_k(blocks: &[BlockQ2K], dst: &mut [u16]) {
    let q = _mm512_setr_ps(
        0., 1., 2., 3., 0., 1., 2., 3., 0., 1., 2., 3., 0., 1., 2., 3.,
    );
    // Lane l of a table half: sub-block l / 4.
    let sub = _mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3);
    let three = _mm512_set1_epi16(3);
    for (b, y) in blocks.iter().zip(dst.chunks_exact_mut(QK_K)) {
        let sc = _mm512_cvtepu8_epi32(bytes16(&b.scales));
        let lo4 = _mm512_cvtepi32_ps(_mm512_and_si512(sc, _mm512_set1_epi32(0xf)));
        let dl = _mm512_mul_ps(splat_half(b.d), lo4);
        let hi4 = _mm512_cvtepi32_ps(_mm512_srli_epi32::<4>(sc));
        let ml = _mm512_mul_ps(splat_half(b.dmin), hi4);
        for h in 0..2 {
            let half = |r0: i32| {
                let at = _mm512_add_epi32(sub, _mm512_set1_epi32(8 * h as i32 + r0));
                _mm512_sub_ps(_mm512_mul_ps(pick(dl, at), q), pick(ml, at))
            };
            let tab = table(half(0), half(4));
            // 32 elements t = 4h + v: sub-blocks 2t, 2t + 1 (r = 2v, 2v + 1), the bit pair 2v
            // of qs[32 h..][..32].
            let w = words32(&b.qs[32 * h..]);
            for v in 0..4 {
                let r = halves16(8 * v as i16, 8 * v as i16 + 4);
                let x = _mm512_srl_epi16(w, _mm_cvtsi32_si128(2 * v as i32));
                let idx = _mm512_ternarylogic_epi32::<A_AND_B_OR_C>(x, three, r);
                let t = 4 * h + v;
                // SAFETY: the features; 32 elements of the block.
                unsafe { look_up(idx, tab, &mut y[32 * t..]) };
            }
        }
    }
}

// ------------------------------------------------------------------------------------ q3_k

/// q3_k's 16 six-bit scales (`q3_k::get_scale` + 32) as bytes j = 0..16.
#[target_feature(enable = "sse2")]
#[inline]
fn q3_scales(s: &[u8; 12]) -> __m128i {
    const M1: u32 = 0x0303_0303;
    const M2: u32 = 0x0f0f_0f0f;
    let u = |i: usize| u32::from_le_bytes([s[4 * i], s[4 * i + 1], s[4 * i + 2], s[4 * i + 3]]);
    let (a0, a1, t) = (u(0), u(1), u(2));
    let j0 = (a0 & M2) | ((t & M1) << 4);
    let j4 = (a1 & M2) | (((t >> 2) & M1) << 4);
    let j8 = ((a0 >> 4) & M2) | (((t >> 4) & M1) << 4);
    let j12 = ((a1 >> 4) & M2) | (((t >> 6) & M1) << 4);
    _mm_setr_epi32(j0 as i32, j4 as i32, j8 as i32, j12 as i32)
}

/// `dl · (q - 4)` per 16 elements (`dl = d · scale`), q = 2 low bits + 4 · the hmask bit:
/// table u holds sub-blocks 4u..4u + 4 (entry 8r + q).
///
/// # Safety
/// `cpu::has_avx512_bf16`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
pub(super) unsafe fn q3_k(blocks: &[BlockQ3K], dst: &mut [u16]) {
    let q = _mm512_sub_ps(
        _mm512_setr_ps(
            0., 1., 2., 3., 4., 5., 6., 7., 0., 1., 2., 3., 4., 5., 6., 7.,
        ),
        _mm512_set1_ps(4.0),
    );
    let sub = _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1);
    let (three, four) = (_mm512_set1_epi16(3), _mm512_set1_epi16(4));
    for (b, y) in blocks.iter().zip(dst.chunks_exact_mut(QK_K)) {
        let sc = _mm512_sub_epi32(
            _mm512_cvtepu8_epi32(q3_scales(&b.scales)),
            _mm512_set1_epi32(32),
        );
        let dl = _mm512_mul_ps(splat_half(b.d), _mm512_cvtepi32_ps(sc));
        // hmask bit t of element l at bit 2 + t of word l.
        let hm = _mm512_slli_epi16::<2>(words32(&b.hmask));
        for u in 0..4 {
            let half = |r0: i32| {
                let at = _mm512_add_epi32(sub, _mm512_set1_epi32(4 * u as i32 + r0));
                _mm512_mul_ps(pick(dl, at), q)
            };
            let tab = table(half(0), half(2));
            // 32 elements t = 2u + v: sub-blocks 2t, 2t + 1 (r = 2v, 2v + 1), the bit pair
            // 2 (t % 4) of qs[32 (t / 4)..][..32], the hmask bit t.
            let w = words32(&b.qs[32 * (u / 2)..]);
            for v in 0..2 {
                let t = 2 * u + v;
                let r = halves16(16 * v as i16, 16 * v as i16 + 8);
                let x = _mm512_srl_epi16(w, _mm_cvtsi32_si128(2 * (t % 4) as i32));
                let x = _mm512_ternarylogic_epi32::<A_AND_B_OR_C>(x, three, r);
                let hb = _mm512_srl_epi16(hm, _mm_cvtsi32_si128(t as i32));
                let idx = _mm512_ternarylogic_epi32::<A_OR_B_AND_C>(x, hb, four);
                // SAFETY: the features; 32 elements of the block.
                unsafe { look_up(idx, tab, &mut y[32 * t..]) };
            }
        }
    }
}

// ----------------------------------------------------------------------------- q4_k, q5_k

/// The 8 sub-block scales and mins of q4_k / q5_k (`get_scale_min_k4`) times `d` and `dmin`:
/// lanes 0..8 `d · sc`, 8..16 `dmin · m`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
#[inline]
fn scales_mins_k4(d: Half, dmin: Half, s: &[u8; 12], l: &mut Lanes) {
    const M1: u32 = 0x3f3f_3f3f;
    const M2: u32 = 0x0f0f_0f0f;
    const M3: u32 = 0x0303_0303;
    let u = |i: usize| u32::from_le_bytes([s[4 * i], s[4 * i + 1], s[4 * i + 2], s[4 * i + 3]]);
    let (u0, u1, u2) = (u(0), u(1), u(2));
    let sc_hi = (u2 & M2) | (((u0 >> 6) & M3) << 4);
    let m_hi = ((u2 >> 4) & M2) | (((u1 >> 6) & M3) << 4);
    let v = _mm_setr_epi32(
        (u0 & M1) as i32,
        sc_hi as i32,
        (u1 & M1) as i32,
        m_hi as i32,
    );
    let f = _mm512_mask_blend_ps(0xff00, splat_half(d), splat_half(dmin));
    store_lanes(
        _mm512_mul_ps(f, _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(v))),
        l,
    );
}

/// `d1 · q - m1` per 32 elements (`d1 = d · sc`, `m1 = dmin · m`), q of 4 bits: table p holds
/// sub-blocks 2p and 2p + 1 (the low and high nibbles of qs[32 p..][..32]).
///
/// # Safety
/// `cpu::has_avx512_bf16`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
pub(super) unsafe fn q4_k(blocks: &[BlockQ4K], dst: &mut [u16]) {
    let (mask, sixteen) = (_mm512_set1_epi16(0xf), _mm512_set1_epi16(16));
    let mut sms = lanes2();
    if let Some(b) = blocks.first() {
        scales_mins_k4(b.d, b.dmin, &b.scales, &mut sms[0]);
    }
    for (i, (b, y)) in blocks.iter().zip(dst.chunks_exact_mut(QK_K)).enumerate() {
        if let Some(n) = blocks.get(i + 1) {
            scales_mins_k4(n.d, n.dmin, &n.scales, &mut sms[(i + 1) & 1]);
        }
        let sm = &sms[i & 1];
        for p in 0..4 {
            let half = |g: usize| {
                let (s, m) = (_mm512_set1_ps(sm.0[g]), _mm512_set1_ps(sm.0[8 + g]));
                _mm512_sub_ps(_mm512_mul_ps(s, iota()), m)
            };
            let tab = table(half(2 * p), half(2 * p + 1));
            let w = words32(&b.qs[32 * p..]);
            let lo = _mm512_and_si512(w, mask);
            let hi = _mm512_or_si512(_mm512_srli_epi16::<4>(w), sixteen);
            // SAFETY: the features; 64 elements of the block.
            unsafe {
                look_up(lo, tab, &mut y[64 * p..]);
                look_up(hi, tab, &mut y[64 * p + 32..]);
            }
        }
    }
}

/// q4_k with a fifth bit from `qh` (element l of sub-block g: bit g of qh[l]): one table per
/// sub-block.
///
/// # Safety
/// `cpu::has_avx512_bf16`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
pub(super) unsafe fn q5_k(blocks: &[BlockQ5K], dst: &mut [u16]) {
    let q_hi = _mm512_add_ps(iota(), _mm512_set1_ps(16.0));
    let (mask, bit4) = (_mm512_set1_epi16(0xf), _mm512_set1_epi16(0x10));
    let mut sms = lanes2();
    if let Some(b) = blocks.first() {
        scales_mins_k4(b.d, b.dmin, &b.scales, &mut sms[0]);
    }
    for (i, (b, y)) in blocks.iter().zip(dst.chunks_exact_mut(QK_K)).enumerate() {
        if let Some(n) = blocks.get(i + 1) {
            scales_mins_k4(n.d, n.dmin, &n.scales, &mut sms[(i + 1) & 1]);
        }
        let sm = &sms[i & 1];
        // qh bit g of element l at bit 4 + g of word l.
        let qh = _mm512_slli_epi16::<4>(words32(&b.qh));
        for p in 0..4 {
            let w = words32(&b.qs[32 * p..]);
            let nib = [_mm512_and_si512(w, mask), _mm512_srli_epi16::<4>(w)];
            for (h, &nib) in nib.iter().enumerate() {
                let g = 2 * p + h;
                let (s, m) = (_mm512_set1_ps(sm.0[g]), _mm512_set1_ps(sm.0[8 + g]));
                let tab = table(
                    _mm512_sub_ps(_mm512_mul_ps(s, iota()), m),
                    _mm512_sub_ps(_mm512_mul_ps(s, q_hi), m),
                );
                let hb = _mm512_srl_epi16(qh, _mm_cvtsi32_si128(g as i32));
                let idx = _mm512_ternarylogic_epi32::<A_OR_B_AND_C>(nib, hb, bit4);
                // SAFETY: the features; 32 elements of the block.
                unsafe { look_up(idx, tab, &mut y[32 * g..]) };
            }
        }
    }
}

// ------------------------------------------------------------------------------------ q6_k

/// q6_k's 16 sub-block scales times `d` (the dequantizer's f32 products `d · sc`) into `l`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
#[inline]
fn q6_scales(b: &BlockQ6K, l: &mut Lanes) {
    let sc: &[u8; 16] = bytemuck::cast_ref(&b.scales);
    let s = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(bytes16(sc)));
    store_lanes(_mm512_mul_ps(splat_half(b.d), s), l);
}

/// `(d · sc) · (q - 32)` per 16 elements, q of 6 bits: the codes of 32 elements assembled as
/// bytes (q - 32 in i8), sign-extended, converted and scaled per element.
///
/// # Safety
/// `cpu::has_avx512_bf16`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
pub(super) unsafe fn q6_k(blocks: &[BlockQ6K], dst: &mut [u16]) {
    let (lo4, hi2, off) = (
        _mm256_set1_epi8(0xf),
        _mm256_set1_epi8(0x30),
        _mm256_set1_epi8(32),
    );
    let mut ss = lanes2();
    if let Some(b) = blocks.first() {
        q6_scales(b, &mut ss[0]);
    }
    for (i, (b, y)) in blocks.iter().zip(dst.chunks_exact_mut(QK_K)).enumerate() {
        if let Some(n) = blocks.get(i + 1) {
            q6_scales(n, &mut ss[(i + 1) & 1]);
        }
        let s = &ss[i & 1];
        for h in 0..2 {
            let (ql0, ql1) = (bytes32(&b.ql[64 * h..]), bytes32(&b.ql[64 * h + 32..]));
            let qh = bytes32(&b.qh[32 * h..]);
            // 32 elements c of half h: element l's low nibble from ql[64 h + 32 (c & 1) + l]
            // (nibble c >> 1), its high bits 2c of qh[32 h + l] (at bits 4, 5 of its byte).
            let q = [
                (_mm256_and_si256(ql0, lo4), _mm256_slli_epi16::<4>(qh)),
                (_mm256_and_si256(ql1, lo4), _mm256_slli_epi16::<2>(qh)),
                (_mm256_and_si256(_mm256_srli_epi16::<4>(ql0), lo4), qh),
                (
                    _mm256_and_si256(_mm256_srli_epi16::<4>(ql1), lo4),
                    _mm256_srli_epi16::<2>(qh),
                ),
            ];
            for (c, &(low, high)) in q.iter().enumerate() {
                let q = _mm256_ternarylogic_epi32::<A_OR_B_AND_C>(low, high, hi2);
                let q = _mm256_sub_epi8(q, off);
                let j = 8 * h + 2 * c;
                let val = |part: __m128i, j: usize| {
                    let qf = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(part));
                    _mm512_mul_ps(_mm512_set1_ps(s.0[j]), qf)
                };
                let lo = val(_mm256_castsi256_si128(q), j);
                let hi = val(_mm256_extracti128_si256::<1>(q), j + 1);
                let d = &mut y[128 * h + 32 * c..][..32];
                // SAFETY: 64 bytes into a 32-element slice.
                unsafe { _mm512_storeu_si512(d.as_mut_ptr() as *mut __m512i, table(lo, hi)) };
            }
        }
    }
}

// ---------------------------------------------------------------------------------- iq4_xs

/// `dl · value[q]` per 32 elements (`dl = d · (ls - 32)`, 6-bit `ls`): table p holds
/// sub-blocks 2p and 2p + 1.
///
/// # Safety
/// `cpu::has_avx512_bf16`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
pub(super) unsafe fn iq4_xs(blocks: &[BlockIQ4XS], dst: &mut [u16]) {
    let vals = super::iq4_values();
    let sixteen = _mm512_set1_epi16(16);
    for (b, y) in blocks.iter().zip(dst.chunks_exact_mut(QK_K)) {
        let dd = f16_to_f32(b.d);
        let sh = u16::from_le_bytes(b.scales_h);
        let dl = |ib: usize| {
            let lo = (b.scales_l[ib / 2] >> (4 * (ib % 2))) & 0xf;
            let hi = ((sh >> (2 * ib)) & 3) as u8;
            _mm512_mul_ps(
                _mm512_set1_ps(dd * ((lo | (hi << 4)) as i32 - 32) as f32),
                vals,
            )
        };
        for p in 0..4 {
            let tab = table(dl(2 * p), dl(2 * p + 1));
            let q0: &[u8; 16] = b.qs[32 * p..32 * p + 16].try_into().unwrap();
            let q1: &[u8; 16] = b.qs[32 * p + 16..32 * p + 32].try_into().unwrap();
            // SAFETY: the features; 64 elements of the block.
            unsafe {
                look_up(super::nibbles16(q0), tab, &mut y[64 * p..]);
                let i1 = _mm512_or_si512(super::nibbles16(q1), sixteen);
                look_up(i1, tab, &mut y[64 * p + 32..]);
            }
        }
    }
}
