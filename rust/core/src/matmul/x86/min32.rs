//! `Load32` for the 32-weight formats with a min (q4_1, q5_1): the unsigned quants, already
//! what the VNNI u8 x i8 product takes (BIAS 0); and the five-bit level decode q5_0 shares.
//! Safety rules as in `x86.rs`.

use std::arch::x86_64::*;

use super::{nibbles_ggml, Load32};
use crate::formats::blocks::*;

impl Load32 for BlockQ4_1 {
    #[inline(always)]
    unsafe fn load(&self) -> __m256i {
        // SAFETY: AVX2 is available (this method's contract).
        unsafe { nibbles_ggml(&self.qs) }
    }
    #[inline(always)]
    unsafe fn load_unsigned(&self) -> __m256i {
        // SAFETY: AVX2 is available (this method's contract).
        unsafe { nibbles_ggml(&self.qs) }
    }
    const BIAS: i32 = 0;
}

/// Byte j (0..31) of the result is 0xff when bit j of the little-endian `qh` is set, else 0
/// (ggml's `bytes_from_bits_32`): byte j takes byte j/8 of qh, ORs every bit but j % 8, and
/// compares with all ones.
#[target_feature(enable = "avx2")]
#[inline]
fn bits_to_bytes(qh: [u8; 4]) -> __m256i {
    let spread = _mm256_shuffle_epi8(
        _mm256_set1_epi32(i32::from_le_bytes(qh)),
        _mm256_set_epi64x(
            0x0303_0303_0303_0303,
            0x0202_0202_0202_0202,
            0x0101_0101_0101_0101,
            0,
        ),
    );
    let others = _mm256_set1_epi64x(0x7fbf_dfef_f7fb_fdfe);
    _mm256_cmpeq_epi8(_mm256_or_si256(spread, others), _mm256_set1_epi64x(-1))
}

/// The 32 five-bit levels (0..31) of a q5_0 / q5_1 block in element order: element j (0..31)
/// takes bit j of qh as its bit 4 (elements 0..15 the low nibbles, 16..31 the high ones).
///
/// # Safety
/// AVX2 must be available.
#[target_feature(enable = "avx2")]
#[inline]
pub(super) unsafe fn q5_levels(qs: &[u8; 16], qh: [u8; 4]) -> __m256i {
    let hi = _mm256_and_si256(bits_to_bytes(qh), _mm256_set1_epi8(0x10));
    // SAFETY: AVX2 is available (contract).
    _mm256_or_si256(unsafe { nibbles_ggml(qs) }, hi)
}

impl Load32 for BlockQ5_1 {
    #[inline(always)]
    unsafe fn load(&self) -> __m256i {
        // SAFETY: AVX2 is available (this method's contract).
        unsafe { q5_levels(&self.qs, self.qh) }
    }
    #[inline(always)]
    unsafe fn load_unsigned(&self) -> __m256i {
        // SAFETY: as `load`.
        unsafe { self.load() }
    }
    const BIAS: i32 = 0;
}
