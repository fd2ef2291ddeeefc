//! `RowK` decodes of q2_K and iq4_xs for the AVX-512 row kernel (`vnni.rs`; q3_K: `q3.rs`). Before
//! these, the three ran the AVX2 `SumsK` kernel at M = 1 and read 29-57 % of the machine's
//! bandwidth (quiet, 2 threads, session 9).
//!
//! - q2_K: element order, like q6_K (vector i = sub-blocks 2i and 2i + 1; the 16-group
//!   scales through `SCL_Q6`). Each 32-byte run of qs is broadcast to both 256-bit halves and
//!   shifted by a different count per half (or one `vpgf2p8affineqb`). Its mins multiply the
//!   `bsums`. (q3_K: `q3.rs`.)
//! - iq4_xs: the table values are signed (-127..113); stored + 128 (1..241, unsigned) they go
//!   into `vpdpbusd`, and the offset comes off with the activations' sub-block sums, which
//!   `interleave_k4` stores (times -32, i32) for the `vpdpbusd` to start from. A sum of 4
//!   products can reach 4·241·127 > 2^15, so the packs to i16 of the other formats would
//!   saturate: the 4-product sums are multiplied by their sub-block scale in i32
//!   (`vpmulld`). The activations are in `XzOrder::Nibbles` so that the low and the high
//!   nibbles of one 64-byte load of qs are one vector each, without a permute.
//!
//! Integers exact, so equal to the reference's whatever the order (tested in `tests.rs`).
//! Safety as in `x86.rs`.

use std::arch::x86_64::*;

use super::vnni::{load_idx32, DecodedZ, RowK, XzOrder, SCL_Q6};
use crate::formats::blocks::*;
use crate::matmul::reference::KVALUES_IQ4NL;

/// `scl` of the element-order formats: the 16 i16 group scales through `SCL_Q6`.
#[target_feature(enable = "avx2,avx512f,avx512bw")]
#[inline]
unsafe fn scl_groups16(sc: __m256i) -> [__m512i; 2] {
    let gz = _mm512_zextsi256_si512(sc);
    // SAFETY: constant tables of 32 i16.
    unsafe {
        [
            _mm512_permutexvar_epi16(load_idx32(&SCL_Q6[0]), gz),
            _mm512_permutexvar_epi16(load_idx32(&SCL_Q6[1]), gz),
        ]
    }
}

/// The low two bits of q2_K's elements in element order: vector 2h + j holds
/// sub-blocks 4h + 2j (bits 4j..4j+1 of qs[32h + l]) and 4h + 2j + 1 (bits 4j+2..4j+3).
#[target_feature(enable = "avx2,avx512f,avx512bw")]
#[inline]
unsafe fn low2(qs: &[u8; QK_K / 4]) -> [__m512i; 4] {
    let m3 = _mm512_set1_epi8(3);
    let mut q = [_mm512_setzero_si512(); 4];
    for h in 0..2 {
        // SAFETY: 32 bytes inside qs (64).
        let v = unsafe {
            _mm512_broadcast_i64x4(_mm256_loadu_si256(qs[32 * h..].as_ptr() as *const __m256i))
        };
        // the 64-bit shifts move bits across bytes; the mask keeps each byte's own
        q[2 * h] = _mm512_and_si512(
            _mm512_srlv_epi64(v, _mm512_set_epi64(2, 2, 2, 2, 0, 0, 0, 0)),
            m3,
        );
        q[2 * h + 1] = _mm512_and_si512(
            _mm512_srlv_epi64(v, _mm512_set_epi64(6, 6, 6, 6, 4, 4, 4, 4)),
            m3,
        );
    }
    q
}

/// A `vgf2p8affineqb` matrix that moves bits b and b + 1 of each byte to bits 0 and 1 and
/// clears the rest (row i of the matrix, byte 7 - i, selects the input bits of output bit i).
pub(super) const fn gf_bits2(b: u32) -> i64 {
    (((1u64 << b) << 56) | ((1u64 << (b + 1)) << 48)) as i64
}

/// `low2` by GFNI: one `vgf2p8affineqb` a vector instead of a shift and a mask (the
/// matrices differ per 64-bit lane: bits 4j..4j+1 in the low half, 4j+2..4j+3 in the high).
#[target_feature(enable = "avx2,avx512f,avx512bw,gfni")]
#[inline]
unsafe fn low2_gf(qs: &[u8; QK_K / 4]) -> [__m512i; 4] {
    let mut q = [_mm512_setzero_si512(); 4];
    for h in 0..2 {
        // SAFETY: 32 bytes inside qs (64).
        let v = unsafe {
            _mm512_broadcast_i64x4(_mm256_loadu_si256(qs[32 * h..].as_ptr() as *const __m256i))
        };
        for j in 0..2 {
            let (lo, hi) = (gf_bits2(4 * j), gf_bits2(4 * j + 2));
            let m = _mm512_set_epi64(hi, hi, hi, hi, lo, lo, lo, lo);
            q[2 * h + j as usize] = _mm512_gf2p8affine_epi64_epi8::<0>(v, m);
        }
    }
    q
}

/// q2_K's `DecodedZ` around its low bits `q` (`low2` or `low2_gf`).
#[target_feature(enable = "avx2,avx512f,avx512bw")]
#[inline]
unsafe fn decode_q2(w: &BlockQ2K, q: [__m512i; 4]) -> DecodedZ {
    // SAFETY: 16 bytes of scales.
    let sc = unsafe { _mm_loadu_si128(w.scales.as_ptr() as *const __m128i) };
    // the 16 bytes zero-extended once: the scales are the low nibbles (& 15), the mins the
    // high ones (>> 4 of the i16: nothing above the byte); 5 vector uops where masking and
    // extending each half took 7
    let sc = _mm256_cvtepu8_epi16(sc);
    DecodedZ {
        q,
        // SAFETY: AVX-512 F/BW (this function's features).
        scl: unsafe { scl_groups16(_mm256_and_si256(sc, _mm256_set1_epi16(15))) },
        bmul: _mm256_srli_epi16(sc, 4),
    }
}

impl RowK for BlockQ2K {
    const ORDER: XzOrder = XzOrder::Elements;
    const OFFSET_SHIFT: Option<i32> = None;
    // d, dmin: the last 4 of 84 bytes
    const HALF_OFF: usize = 80;
    const GF_DECODE: bool = true;
    #[inline(always)]
    unsafe fn decode_z(&self) -> DecodedZ {
        // SAFETY: AVX-512 F/BW available (contract).
        unsafe { decode_q2(self, low2(&self.qs)) }
    }
    #[inline(always)]
    unsafe fn decode_gf(&self) -> DecodedZ {
        // SAFETY: AVX-512 F/BW and GFNI available (contract).
        unsafe { decode_q2(self, low2_gf(&self.qs)) }
    }
}

/// kvalues_iq4nl + 128 (1..241): the iq4_xs values as unsigned bytes.
const IQ4_U8: [u8; 16] = {
    let mut t = [0u8; 16];
    let mut i = 0;
    while i < 16 {
        t[i] = (KVALUES_IQ4NL[i] as i16 + 128) as u8;
        i += 1;
    }
    t
};

/// i32 permutation indices to `DecodedZ::scl[h]` of iq4_xs: 128-bit lane k takes the scale of
/// sub-block 4h + k.
const XS_SCL_IDX: [[i32; 16]; 2] = {
    let mut t = [[0i32; 16]; 2];
    let mut i = 0;
    while i < 16 {
        t[0][i] = (i / 4) as i32;
        t[1][i] = (4 + i / 4) as i32;
        i += 1;
    }
    t
};

impl RowK for BlockIQ4XS {
    const ORDER: XzOrder = XzOrder::Nibbles;
    const OFFSET_SHIFT: Option<i32> = Some(7);
    // d, scales_h
    const HALF_OFF: usize = 0;
    #[inline(always)]
    unsafe fn decode_z(&self) -> DecodedZ {
        // SAFETY: AVX-512 F/BW/VL available (contract); 64-byte loads inside qs (128), the
        // 16-byte table and index tables.
        unsafe {
            let table = _mm512_broadcast_i32x4(_mm_loadu_si128(IQ4_U8.as_ptr() as *const __m128i));
            let m4 = _mm512_set1_epi8(0x0f);
            let mut q = [_mm512_setzero_si512(); 4];
            for h in 0..2 {
                let v = _mm512_loadu_si512(self.qs[64 * h..].as_ptr() as *const __m512i);
                let lo = _mm512_and_si512(v, m4);
                let hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), m4);
                q[2 * h] = _mm512_shuffle_epi8(table, lo);
                q[2 * h + 1] = _mm512_shuffle_epi8(table, hi);
            }
            // scales: low nibbles of scales_l (byte i: sub-blocks 2i, 2i + 1), 2 bits each of
            // scales_h on bits 4..5, minus 32 (`reference::scales_iq4_xs`)
            let l = _mm_cvtsi32_si128(i32::from_le_bytes(self.scales_l));
            let nib = _mm_unpacklo_epi8(
                _mm_and_si128(l, _mm_set1_epi8(0x0f)),
                _mm_and_si128(_mm_srli_epi16(l, 4), _mm_set1_epi8(0x0f)),
            );
            let h = _mm256_set1_epi32(u16::from_le_bytes(self.scales_h) as i32);
            let hb = _mm256_and_si256(
                _mm256_srlv_epi32(h, _mm256_set_epi32(14, 12, 10, 8, 6, 4, 2, 0)),
                _mm256_set1_epi32(3),
            );
            let sc = _mm256_sub_epi32(
                _mm256_or_si256(_mm256_cvtepu8_epi32(nib), _mm256_slli_epi32(hb, 4)),
                _mm256_set1_epi32(32),
            );
            let sz = _mm512_zextsi256_si512(sc);
            let idx0 = _mm512_loadu_si512(XS_SCL_IDX[0].as_ptr() as *const __m512i);
            let idx1 = _mm512_loadu_si512(XS_SCL_IDX[1].as_ptr() as *const __m512i);
            DecodedZ {
                q,
                scl: [
                    _mm512_permutexvar_epi32(idx0, sz),
                    _mm512_permutexvar_epi32(idx1, sz),
                ],
                // unused: the offset comes with the activations (`sums_z`)
                bmul: _mm256_setzero_si256(),
            }
        }
    }
    /// Σ sc·((q + 128)·x - 128·x) in i32: `vpdpbusd` twice into one register (vectors 0, 1
    /// and 2, 3 have the same sub-blocks' scales in each lane), starting from the offset:
    /// lane k of pair h holds sub-block 4h + k, and each of its 4 dwords starts at -32 times
    /// the sub-block's Σx (`interleave_k4`'s i32 in the `bsums` place, spread by the scales'
    /// own `vpermd`), so the 4 add up to -128·Σx (below 8·241·128 + 2^17 < 2^19 a dword);
    /// then one `vpmulld` by the scales per pair (no packs, see the module comment). The
    /// `vpdpwssd` of the negated `bsums` by the scales times 128 it replaces, with that
    /// product's three shuffles and LLVM's extra `vpaddd`, was five vector uops of about 36 a
    /// super-block.
    #[inline(always)]
    unsafe fn sums_z(d: &DecodedZ, xq: &[u8]) -> (__m512i, __m256i) {
        debug_assert!(xq.len() >= super::vnni::XZ_BLOCK);
        // SAFETY: 32 bytes of the offsets (offset QK_K inside the block); AVX2, AVX-512
        // (contract).
        let off = unsafe {
            _mm512_zextsi256_si512(_mm256_loadu_si256(xq[QK_K..].as_ptr() as *const __m256i))
        };
        let mut s = _mm512_setzero_si512();
        for h in 0..2 {
            // SAFETY: 64-byte loads inside xq (256), the 64-byte index table; AVX-512
            // F/BW/VNNI (contract).
            unsafe {
                let idx = _mm512_loadu_si512(XS_SCL_IDX[h].as_ptr() as *const __m512i);
                let x0 = _mm512_loadu_si512(xq[128 * h..].as_ptr() as *const __m512i);
                let x1 = _mm512_loadu_si512(xq[128 * h + 64..].as_ptr() as *const __m512i);
                let p = _mm512_dpbusd_epi32(_mm512_permutexvar_epi32(idx, off), d.q[2 * h], x0);
                let p = _mm512_dpbusd_epi32(p, d.q[2 * h + 1], x1);
                s = _mm512_add_epi32(s, _mm512_mullo_epi32(p, d.scl[h]));
            }
        }
        (s, _mm256_setzero_si256())
    }
}
