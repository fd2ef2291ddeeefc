//! The AVX-512 (F/BW/VL/VNNI) row kernel of tq1_0 and tq2_0 (`SumsK::dot_row_z`): each
//! super-block decoded to its 256 values `q + 1` as four 512-bit registers holding elements
//! `64j..64j + 64` in order, so they meet the q8_K activations as stored (no interleaved copy);
//! four `vpdpbusd` (u8 `q + 1` times i8 `x`, exact) give `Σ (q + 1)·x`, minus `Σ bsums` the
//! integer sum; the float part is the reference's (`block_k_product`, lane `b % 8`, `hsum8`).
//! Bit-identical to `reference::dot_block_k` (tested). Safety rules as in `x86.rs`.

use std::arch::x86_64::*;

use crate::formats::blocks::*;
use crate::matmul::reference::{self as r, BlockQ8K, LANES};
use crate::matmul::x86::prefetch_ahead;

/// A ternary block decoded for the row kernel.
pub(crate) trait Decode512: Copy {
    /// # Safety
    /// AVX-512 F and BW must be available.
    unsafe fn decode512(&self) -> [__m512i; 4];
    fn scale(&self) -> Half;
}

/// 32 i16 multipliers from an array (`_mm512_set_epi16` is not in core::arch).
#[target_feature(enable = "avx512f")]
#[inline]
fn lanes16(v: &[i16; 32]) -> __m512i {
    // SAFETY: 64 bytes read from a 64-byte array; AVX-512 F (this function's feature).
    unsafe { _mm512_loadu_si512(v.as_ptr() as *const __m512i) }
}

/// Multipliers of tq1_0's registers: per 16-bit lane, `3^n` of the digit its two bytes hold.
/// Register 0: digits 0 | 1 of qs[0..32]; 1: digits 2 | 3; 2: digit 4 of qs[0..32] | digits 0,
/// 1 of qs[32..48]; 3: digits 2, 3 of qs[32..48] | digit 4 of qs[32..48], then qh repeated four
/// times (byte 4n + j: digit n of qh[j], so lane 24 + i holds digit i / 2).
const fn tq1_multipliers() -> [[i16; 32]; 4] {
    let mut p = [[0i16; 32]; 4];
    let mut k = 0;
    while k < 16 {
        p[0][k] = 1;
        p[0][16 + k] = 3;
        p[1][k] = 9;
        p[1][16 + k] = 27;
        p[2][k] = 81;
        p[2][16 + k] = if k < 8 { 1 } else { 3 };
        p[3][k] = if k < 8 { 9 } else { 27 };
        p[3][16 + k] = if k < 8 {
            81
        } else {
            [1, 3, 9, 27][(k - 8) / 2]
        };
        k += 1;
    }
    p
}

const TQ1_P: [[i16; 32]; 4] = tq1_multipliers();

/// tq1_0's digit of every byte: `((u8)(byte·p)·3) >> 8`, `p` per 16-bit lane.
#[target_feature(enable = "avx512f,avx512bw")]
#[inline]
fn trits512(v: __m512i, p: __m512i) -> __m512i {
    let low = _mm512_set1_epi16(0xff);
    let even = trit16(_mm512_and_si512(v, low), p);
    let odd = trit16(_mm512_srli_epi16::<8>(v), p);
    _mm512_or_si512(even, _mm512_slli_epi16::<8>(odd))
}

/// The digit of bytes held zero-extended in 16-bit lanes.
#[target_feature(enable = "avx512f,avx512bw")]
#[inline]
fn trit16(b: __m512i, p: __m512i) -> __m512i {
    let t = _mm512_and_si512(_mm512_mullo_epi16(b, p), _mm512_set1_epi16(0xff));
    _mm512_srli_epi16::<8>(_mm512_mullo_epi16(t, _mm512_set1_epi16(3)))
}

impl Decode512 for BlockTQ1_0 {
    #[inline(always)]
    unsafe fn decode512(&self) -> [__m512i; 4] {
        // SAFETY: AVX-512 F/BW (contract); the 32-byte load is qs[0..32], the 16-byte one
        // qs[32..48].
        unsafe {
            let a = _mm256_loadu_si256(self.qs.as_ptr() as *const __m256i);
            let t = _mm_loadu_si128(self.qs[32..].as_ptr() as *const __m128i);
            let tt = _mm256_set_m128i(t, t);
            let qh = _mm_set1_epi32(i32::from_le_bytes(self.qh));
            let aa = _mm512_broadcast_i64x4(a);
            let a_tt = _mm512_inserti64x4::<1>(_mm512_castsi256_si512(a), tt);
            let t_qh = _mm256_set_m128i(qh, t);
            let tt_tqh = _mm512_inserti64x4::<1>(_mm512_castsi256_si512(tt), t_qh);
            [
                trits512(aa, lanes16(&TQ1_P[0])),
                trits512(aa, lanes16(&TQ1_P[1])),
                trits512(a_tt, lanes16(&TQ1_P[2])),
                trits512(tt_tqh, lanes16(&TQ1_P[3])),
            ]
        }
    }
    fn scale(&self) -> Half {
        self.d
    }
}

impl Decode512 for BlockTQ2_0 {
    /// Register j: elements 64j..64j + 64 = bits 2l of qs[32h..32h + 32] for h = j / 2 and
    /// l = 2(j % 2) (low half), l + 1 (high half).
    #[inline(always)]
    unsafe fn decode512(&self) -> [__m512i; 4] {
        // SAFETY: AVX-512 F/BW (contract); 32-byte loads inside qs (64).
        unsafe {
            let m3 = _mm512_set1_epi8(3);
            // shifts 0 | 2 and 4 | 6 (16-bit lanes; the mask keeps each byte's own bits)
            let s01 = _mm512_inserti64x4::<1>(_mm512_set1_epi16(0), _mm256_set1_epi16(2));
            let s23 = _mm512_inserti64x4::<1>(_mm512_set1_epi16(4), _mm256_set1_epi16(6));
            let mut q = [_mm512_setzero_si512(); 4];
            for h in 0..2 {
                let half = _mm256_loadu_si256(self.qs[32 * h..].as_ptr() as *const __m256i);
                let v = _mm512_broadcast_i64x4(half);
                q[2 * h] = _mm512_and_si512(_mm512_srlv_epi16(v, s01), m3);
                q[2 * h + 1] = _mm512_and_si512(_mm512_srlv_epi16(v, s23), m3);
            }
            q
        }
    }
    fn scale(&self) -> Half {
        self.d
    }
}

/// `reference::dot_block_k` for R activation rows (`long`: prefetch the weights ahead).
///
/// # Safety
/// AVX2, F16C, AVX-512 F/BW/VL/VNNI (`cpu::has_vnni_bw`); every `x[r]` has at least `w.len()`
/// blocks.
#[target_feature(enable = "avx2,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
pub(crate) unsafe fn dot_row_ternary<W: Decode512, const R: usize>(
    w: &[W],
    x: [&[BlockQ8K]; R],
    long: bool,
) -> [f32; R] {
    let mut acc = [[0.0f32; LANES]; R];
    for (b, wb) in w.iter().enumerate() {
        if long {
            prefetch_ahead(std::slice::from_ref(wb));
        }
        // SAFETY: AVX-512 F/BW (contract).
        let q = unsafe { wb.decode512() };
        let d = f16_to_f32(wb.scale());
        for r in 0..R {
            let xb = &x[r][b];
            let mut s = _mm512_setzero_si512();
            for (j, qj) in q.iter().enumerate() {
                // SAFETY: j < 4: the 64 bytes from 64j are inside qs (256).
                let xv = unsafe { _mm512_loadu_si512(xb.qs[64 * j..].as_ptr() as *const __m512i) };
                s = _mm512_dpbusd_epi32(s, *qj, xv);
            }
            // SAFETY: bsums is 16 i16 = the 32 bytes loaded.
            let bs = unsafe { _mm256_loadu_si256(xb.bsums.as_ptr() as *const __m256i) };
            // Σ (q + 1)·x - Σ x in one horizontal sum (exact integers in any order)
            let isum = _mm512_reduce_add_epi32(_mm512_sub_epi32(s, _mm512_cvtepi16_epi32(bs)));
            acc[r][b % LANES] += r::block_k_product(d, 0.0, xb.d, isum, 0);
        }
    }
    acc.map(|a| r::hsum8(&a))
}
