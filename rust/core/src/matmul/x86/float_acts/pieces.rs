//! fp8 with AVX2 at M >= 2 (`matmul/rows_fp8.rs`): `dot_fp8`'s operations for up to 4
//! activation rows over a range of K, the lanes kept in memory between ranges, so that a piece
//! of the activations stays in L1 while a panel of weight rows passes. `dot_fp8` over whole rows
//! holds 4 rows x 64 lanes (32 registers of 16) and spilled them to the stack at every step,
//! and at K = 4096 its 4 activation rows (64 KiB) came from L2 for every weight row.
//!
//! Here the 64 lanes go in quarters: quarter `c` takes the positions `i` with `i % 64` in
//! `16c..16c + 16`, in increasing order, into two registers a row (8 accumulators for 4 rows).
//! Each lane's chain is the reference's (its positions in order, the same fused multiply-adds,
//! the same block ends), so the bits are `dot_fp8`'s (tested: `matmul/tests.rs`).

use std::arch::x86_64::*;

use super::{e4m3_as_halves, halves16, hsum64_avx2, Decode32, Fp8E4M3, Fp8E4M3F32, Fp8E5M2};
use crate::matmul::reference::WIDE;

/// 16 fp8 bytes as two registers of eight f32 for `fp8_range`, and the scalar value its tails
/// take, on the scale of the activations it reads.
pub trait Fp8Pieces {
    /// # Safety
    /// AVX2 and F16C; 16 bytes readable at `w`.
    unsafe fn decode(w: *const u8) -> [__m256; 2];
    /// The value of one byte as `decode` gives it.
    fn value(b: u8) -> f32;
}

impl Fp8Pieces for Fp8E5M2 {
    /// `Fp8E5M2::decode32`'s: `cvtph(b << 8)`, exact.
    #[inline(always)]
    unsafe fn decode(w: *const u8) -> [__m256; 2] {
        // SAFETY: the caller's contract.
        unsafe {
            let h = _mm256_cvtepu8_epi16(_mm_loadu_si128(w as *const __m128i));
            halves16(_mm256_slli_epi16(h, 8))
        }
    }
    fn value(b: u8) -> f32 {
        <Fp8E5M2 as Decode32>::value(b)
    }
}

impl Fp8Pieces for Fp8E4M3 {
    /// `Fp8E4M3::decode32`'s: re-biased to float16, `cvtph`, `* 256`.
    #[inline(always)]
    unsafe fn decode(w: *const u8) -> [__m256; 2] {
        // SAFETY: the caller's contract.
        unsafe {
            let h = _mm256_cvtepu8_epi16(_mm_loadu_si128(w as *const __m128i));
            let [a, b] = halves16(e4m3_as_halves(h));
            let s = _mm256_set1_ps(256.0);
            [_mm256_mul_ps(a, s), _mm256_mul_ps(b, s)]
        }
    }
    fn value(b: u8) -> f32 {
        <Fp8E4M3 as Decode32>::value(b)
    }
}

impl Fp8Pieces for Fp8E4M3F32 {
    /// The AVX-512 `Fp8E4M3F32`'s bit map on 8 lanes: the byte sign-extended, shifted to f32's
    /// exponent and mantissa, masked: the value times 2^-120 (subnormal codes as subnormal f32
    /// with the same digits), three integer operations per 8 weights where the float16 route
    /// takes eight, two of them on the FMA ports. The activations are read times 2^120
    /// (`scale_e4m3_f32_x`, |x| < 2^8), so each product is the real `v · x` and each FMA rounds
    /// as the reference's. NaN codes come out finite: the caller finds them
    /// (`e4m3_nan_codes`).
    #[inline(always)]
    unsafe fn decode(w: *const u8) -> [__m256; 2] {
        // SAFETY: the caller's contract (8-byte loads at w and w + 8).
        unsafe {
            let lo = _mm256_cvtepi8_epi32(_mm_loadl_epi64(w as *const __m128i));
            let hi = _mm256_cvtepi8_epi32(_mm_loadl_epi64(w.add(8) as *const __m128i));
            let m = _mm256_set1_epi32(0x87f0_0000u32 as i32);
            [
                _mm256_castsi256_ps(_mm256_and_si256(_mm256_slli_epi32::<20>(lo), m)),
                _mm256_castsi256_ps(_mm256_and_si256(_mm256_slli_epi32::<20>(hi), m)),
            ]
        }
    }
    /// `Fp8E4M3`'s value times 2^-120 (exact: the smallest code, 2^-9, becomes 2^-129).
    fn value(b: u8) -> f32 {
        <Fp8E4M3 as Decode32>::value(b) * f32::from_bits((127 - 120) << 23)
    }
}

/// True when `q` holds an e4m3 NaN code (0x7f, 0xff): `max(2b mod 256)` is 0xfe exactly for
/// those.
///
/// # Safety
/// AVX2 must be available.
#[target_feature(enable = "avx2")]
pub unsafe fn e4m3_nan_codes(q: &[u8]) -> bool {
    let mut m = _mm256_setzero_si256();
    let mut c = q.chunks_exact(32);
    for v in c.by_ref() {
        // SAFETY: 32 bytes of q.
        let v = unsafe { _mm256_loadu_si256(v.as_ptr() as *const __m256i) };
        m = _mm256_max_epu8(m, _mm256_add_epi8(v, v));
    }
    let hit = _mm256_movemask_epi8(_mm256_cmpeq_epi8(m, _mm256_set1_epi8(0xfeu8 as i8))) != 0;
    hit || c.remainder().iter().any(|&b| b & 0x7f == 0x7f)
}

/// One (weight row, activation row) pair between ranges: the reference's 64 lanes of the
/// running block (`part`) and of the row (`acc`).
#[derive(Clone, Copy)]
#[repr(C, align(64))]
pub struct Lanes64 {
    pub part: [f32; WIDE],
    pub acc: [f32; WIDE],
}

impl Lanes64 {
    pub const ZERO: Self = Self {
        part: [0.0; WIDE],
        acc: [0.0; WIDE],
    };

    /// The output: `dot_fp8`'s final fold (`hsum64_avx2`) of `acc`.
    ///
    /// # Safety
    /// AVX2 must be available.
    #[target_feature(enable = "avx2")]
    pub unsafe fn finish(&self) -> f32 {
        let mut a = [_mm256_setzero_ps(); 8];
        for (k, v) in a.iter_mut().enumerate() {
            // SAFETY: 8 f32 inside acc.
            *v = unsafe { _mm256_loadu_ps(self.acc[8 * k..].as_ptr()) };
        }
        hsum64_avx2(&a)
    }
}

/// Positions `i0..i1` of `dot_fp8::<D, R>(q, scales, block_len, x)` into `st[..R]` (one per
/// activation row; blocks that end inside the range are folded into `acc` and `part` cleared).
///
/// # Safety
/// AVX2, F16C and FMA must be available; `q.len() == x[r].len()` (K) with K >= 64;
/// `scales.len() == K.div_ceil(block_len)`, `block_len` K or a power of two from 32 on;
/// `i0 <= i1 <= K`, i0 a multiple of 64, i1 too or K; `st[r]` holds positions `0..i0`.
#[target_feature(enable = "avx2,f16c,fma")]
pub unsafe fn fp8_range<D: Fp8Pieces, const R: usize>(
    q: &[u8],
    scales: &[f32],
    block_len: usize,
    x: [&[f32]; R],
    i0: usize,
    i1: usize,
    st: &mut [Lanes64],
) {
    let k = q.len();
    assert!(k >= WIDE && x.iter().all(|x| x.len() == k) && st.len() >= R);
    assert!(scales.len() == k.div_ceil(block_len) && i0.is_multiple_of(WIDE) && i0 <= i1);
    assert!(i1 <= k && (i1 == k || i1.is_multiple_of(WIDE)));
    let w = q.as_ptr();
    let xp: [*const f32; R] = std::array::from_fn(|r| x[r].as_ptr());
    let mut b = i0 / block_len;
    while b * block_len < i1 {
        let at0 = b * block_len;
        let end = (at0 + block_len).min(k);
        let len = end - at0;
        let whole_end = at0 + len / 32 * 32;
        let (s, e) = (at0.max(i0), end.min(i1));
        // s and ve are multiples of 32 (i0, i1, at0 are; ve <= whole_end)
        let ve = e.min(whole_end);
        for c in 0..4 {
            // SAFETY: positions below ve <= K of q and of every x[r] (asserted).
            unsafe { quarter::<D, R>(w, xp, s, ve, c, st) };
        }
        if e == end {
            // the block ends in this range: `dot_fp8`'s tail and fold
            let sv = _mm256_set1_ps(scales[b]);
            let (k0, k1) = if len >= WIDE {
                (0, 8)
            } else if at0.is_multiple_of(WIDE) {
                (0, 4)
            } else {
                (4, 8)
            };
            for (r, l) in st[..R].iter_mut().enumerate() {
                for j in whole_end..end {
                    l.part[j % WIDE] = D::value(q[j]).mul_add(x[r][j], l.part[j % WIDE]);
                }
                for kk in k0..k1 {
                    // SAFETY: 8 f32 inside part and acc.
                    unsafe {
                        let p = _mm256_loadu_ps(l.part[8 * kk..].as_ptr());
                        let a = _mm256_loadu_ps(l.acc[8 * kk..].as_ptr());
                        _mm256_storeu_ps(l.acc[8 * kk..].as_mut_ptr(), _mm256_fmadd_ps(p, sv, a));
                    }
                }
                l.part = [0.0; WIDE];
            }
        }
        b += 1;
    }
}

/// Quarter `c` (lanes `16c..16c + 16`) of positions `s..e` (multiples of 32) into
/// `st[r].part`: the positions `i` with `i % 64 == 16c`, 16 a step, in order.
///
/// # Safety
/// AVX2, F16C and FMA; positions below `e` inside `w` and every `x[r]`; `st.len() >= R`.
#[inline(always)]
unsafe fn quarter<D: Fp8Pieces, const R: usize>(
    w: *const u8,
    x: [*const f32; R],
    s: usize,
    e: usize,
    c: usize,
    st: &mut [Lanes64],
) {
    let off = 16 * c;
    let mut i = s + (off + WIDE - s % WIDE) % WIDE;
    if i + 16 > e {
        return;
    }
    // SAFETY: the caller's contract; each load is 16 bytes of w or 8 f32 of x[r] below e, or
    // 8 f32 inside st[r].part (off + 16 <= 64).
    unsafe {
        let mut p = [[_mm256_setzero_ps(); 2]; R];
        for r in 0..R {
            p[r][0] = _mm256_loadu_ps(st[r].part[off..].as_ptr());
            p[r][1] = _mm256_loadu_ps(st[r].part[off + 8..].as_ptr());
        }
        while i + 16 <= e {
            let [a, b] = D::decode(w.add(i));
            for r in 0..R {
                p[r][0] = _mm256_fmadd_ps(a, _mm256_loadu_ps(x[r].add(i)), p[r][0]);
                p[r][1] = _mm256_fmadd_ps(b, _mm256_loadu_ps(x[r].add(i + 8)), p[r][1]);
            }
            i += WIDE;
        }
        for r in 0..R {
            _mm256_storeu_ps(st[r].part[off..].as_mut_ptr(), p[r][0]);
            _mm256_storeu_ps(st[r].part[off + 8..].as_mut_ptr(), p[r][1]);
        }
    }
}
