//! M = 1 grouped integers of 4 and 8 bits on AVX2 (no AVX-512: `x86/gint_row.rs` does not run):
//! the decoded path's arithmetic, `reference::q16::dot_int8_q16` of the row decoded to int8
//! `q - z` (`formats::gint::decode_row_i8`), with the codes unpacked in registers instead of
//! into a buffer that the int8 kernel then reads back.
//!
//! A unit is 32 elements (16 lanes of 2, as `dot_int8_q16_avx2`): at 4 bits 16 packed bytes
//! (byte j holds elements 2j, low nibble, and 2j + 1), at 8 bits 32 bytes. The codes minus the
//! group's zero are formed as bytes (`vpsubb`, wrapping as `decode_row_i8`'s `wrapping_sub`),
//! sign-extended to words and multiplied with the activations by `pmaddwd`: each lane's integer
//! is the reference's, exact. The float part is `q16_avx2`'s int8 one: one
//! `fma(float(isum), scale · xd, acc)` per lane and unit, two sets alternating by unit, and
//! `hsum_q16`'s reduction, so the bits are the decoded path's (tests: `q16_avx2/gint/tests.rs`
//! and `tests/gint.rs` through `qmatmul`).
//!
//! Safety of every function here: as `x86.rs` (AVX2 and FMA checked by the callers), lengths
//! checked by the entry point.

use std::arch::x86_64::*;

use super::super::prefetch_l2;
use crate::formats::gint;
use crate::matmul::reference::q16::{self, Q16, UNIT_INT8};
use crate::qtype::GInt;

/// Rows longer than this prefetch the weights into L2 (as `q16_avx2`'s `LONG_K`).
const LONG_K: usize = 8192;
/// Bytes ahead of the weights being read that the long rows prefetch into L2.
const PREFETCH_AHEAD: usize = 8192;

/// The rows this kernel takes: 4 and 8 bits, K whole units, each unit inside one group (a
/// group of the whole row, or a power of two from 32 on).
pub fn takes(g: GInt, k: usize) -> bool {
    let gl = gint::group_len(g, k);
    (g.bits == 4 || g.bits == 8)
        && k > 0
        && k.is_multiple_of(UNIT_INT8)
        && (gl >= k || (gl.is_power_of_two() && gl >= UNIT_INT8))
}

/// One unit's 32 words `code - z` (elements 0..16, 16..32) from its bytes at `w`.
///
/// # Safety
/// 16 bytes (4 bits) or 32 bytes (8 bits) at `w`; AVX2 (the callers').
#[inline(always)]
unsafe fn words<const BITS: u8>(w: *const u8, z: __m128i) -> [__m256i; 2] {
    // SAFETY: the caller's contract.
    unsafe {
        let (e0, e1) = if BITS == 4 {
            let b = _mm_loadu_si128(w as *const __m128i);
            let m = _mm_set1_epi8(15);
            let lo = _mm_and_si128(b, m);
            let hi = _mm_and_si128(_mm_srli_epi16(b, 4), m);
            (_mm_unpacklo_epi8(lo, hi), _mm_unpackhi_epi8(lo, hi))
        } else {
            (
                _mm_loadu_si128(w as *const __m128i),
                _mm_loadu_si128(w.add(16) as *const __m128i),
            )
        };
        [
            _mm256_cvtepi8_epi16(_mm_sub_epi8(e0, z)),
            _mm256_cvtepi8_epi16(_mm_sub_epi8(e1, z)),
        ]
    }
}

/// Unit `u` (words `c`, lane scale `s`) into set S of `acc` (`acc[2 * S + half]`).
///
/// # Safety
/// 32 i16 at `x`; AVX2 and FMA (the callers').
#[inline(always)]
unsafe fn unit<const S: usize>(c: [__m256i; 2], x: *const i16, s: __m256, acc: &mut [__m256; 4]) {
    // SAFETY: the caller's contract.
    unsafe {
        for h in 0..2 {
            let xv = _mm256_loadu_si256(x.add(16 * h) as *const __m256i);
            let isum = _mm256_madd_epi16(c[h], xv);
            acc[2 * S + h] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum), s, acc[2 * S + h]);
        }
    }
}

/// `reference::q16::dot_int8_q16` of weight row `row` decoded by `formats::gint::decode_row_i8`
/// (`stats`: the row's scales, then its zeros), with one q16 activation row, bit for bit.
///
/// # Safety
/// AVX2 and FMA present (`crate::cpu::has_avx2()`, `crate::cpu::has_fma()`); `takes(g, k)`.
/// Lengths are checked here (panics).
#[target_feature(enable = "avx2,fma")]
pub unsafe fn dot_gint_avx2(
    g: GInt,
    row: &[u8],
    stats: &[f32],
    k: usize,
    xq: &[i16],
    xd: &[f32],
) -> f32 {
    assert!(takes(g, k));
    let gl = gint::group_len(g, k);
    let groups = k / gl;
    assert!(row.len() >= k * g.bits as usize / 8);
    assert!(stats.len() >= if g.sym { groups } else { 2 * groups });
    assert!(xq.len() >= q16::q16_row_len(k) && xd.len() >= k.div_ceil(Q16));
    // SAFETY: AVX2 and FMA (contract); lengths checked above.
    let acc = unsafe {
        match (g.bits, k > LONG_K) {
            (4, true) => rows::<4, true>(g, row, stats, k, xq, xd),
            (4, false) => rows::<4, false>(g, row, stats, k, xq, xd),
            (_, true) => rows::<8, true>(g, row, stats, k, xq, xd),
            (_, false) => rows::<8, false>(g, row, stats, k, xq, xd),
        }
    };
    super::finish(&acc, _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7))
}

/// # Safety
/// As `dot_gint_avx2`, lengths checked.
#[inline(always)]
unsafe fn rows<const BITS: u8, const PF: bool>(
    g: GInt,
    row: &[u8],
    stats: &[f32],
    k: usize,
    xq: &[i16],
    xd: &[f32],
) -> [__m256; 4] {
    let gl = gint::group_len(g, k);
    let groups = k / gl;
    // units of one group: a power of two (or the whole row)
    let gshift = if gl >= k {
        63
    } else {
        (gl / UNIT_INT8).trailing_zeros()
    };
    let ub = UNIT_INT8 * BITS as usize / 8;
    let units = k / UNIT_INT8;
    let mut acc = [_mm256_setzero_ps(); 4];
    let (w, x) = (row.as_ptr(), xq.as_ptr());
    let (mut cur, mut z) = (usize::MAX, _mm_setzero_si128());
    // SAFETY: every unit reads inside the row and the activations (asserted by the caller);
    // group and block indices are below `groups` and `xd.len()`; AVX2 and FMA (contract).
    unsafe {
        // (a macro, not a closure: see `q16_avx2`; a closure over vectors falls out of line)
        macro_rules! zero {
            ($u:expr) => {{
                let gi = $u >> gshift;
                if gi != cur {
                    cur = gi;
                    z = _mm_set1_epi8(gint::row_zero(g, stats, groups, gi) as i8);
                }
            }};
        }
        // the lane scale `scale · xd` (the reference's f32 product) of unit u
        macro_rules! scale {
            ($u:expr) => {
                _mm256_set1_ps(stats[$u >> gshift] * xd[$u * UNIT_INT8 / Q16])
            };
        }
        macro_rules! one {
            ($u:expr, $s:literal, $sc:expr) => {{
                let u = $u;
                zero!(u);
                unit::<$s>(
                    words::<BITS>(w.add(u * ub), z),
                    x.add(u * UNIT_INT8),
                    $sc,
                    &mut acc,
                );
            }};
        }
        let mut u = 0;
        while u + 2 <= units {
            if PF && (u * ub).is_multiple_of(64) {
                prefetch_l2(w.add(u * ub), 64, PREFETCH_AHEAD);
            }
            // u even: both units in one activation block, and in one group from 64 on
            let s0 = scale!(u);
            let s1 = if gshift > 0 { s0 } else { scale!(u + 1) };
            one!(u, 0, s0);
            one!(u + 1, 1, s1);
            u += 2;
        }
        if u < units {
            one!(u, 0, scale!(u));
        }
        // (read: the last unit's update is otherwise unused)
        debug_assert!(units == 0 || cur != usize::MAX);
    }
    acc
}

#[cfg(test)]
mod tests;
