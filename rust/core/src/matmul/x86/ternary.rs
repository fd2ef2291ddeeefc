//! `SumsK` (AVX2 integer sums) for tq1_0 and tq2_0: each super-block decoded to its 256 stored
//! values `q + 1` (0, 1, 2) in element order, then `sums_k` with unit scales gives
//! `(Σ (q + 1)·x, Σ bsums)`, and `Σ (q - 1)·x` is their difference (exact integers); the float
//! part is the reference's (`dot_block_k`). Where the CPU has AVX-512 F/BW/VL/VNNI the row
//! kernel of `ternary/avx512.rs` runs instead (`SumsK::dot_row_z`). Safety rules as in `x86.rs`.

use std::arch::x86_64::*;

use super::k_low::srl16;
use super::row_k::{load256, sums_k};
use super::{DecodedK, SumsK};
use crate::formats::blocks::*;
use crate::matmul::reference::BlockQ8K;

mod avx512;
use avx512::dot_row_ternary;

/// `SumsK::dot_row_z` of the ternary formats: the AVX-512 row kernel (`avx512.rs`) where the
/// CPU has it (it reads the q8_K blocks as stored, so `xz` is not needed).
macro_rules! row_z_ternary {
    () => {
        #[inline(always)]
        unsafe fn dot_row_z<const R: usize>(
            w: &[Self],
            x: [&[BlockQ8K]; R],
            _xz: [&[u8]; R],
            long: bool,
        ) -> Option<[f32; R]> {
            if crate::cpu::has_vnni_bw() {
                // SAFETY: AVX-512 F/BW/VL/VNNI, AVX2 and F16C detected; x: the caller's.
                Some(unsafe { dot_row_ternary(w, x, long) })
            } else {
                None
            }
        }
    };
}

/// tq1_0's base-3 digit of every byte of `v`: `((u8)(byte·p)·3) >> 8`, `p` the multiplier
/// `3^n` of each byte's 16-bit lane (both bytes of a lane take the same digit), in 16-bit
/// lanes (even and odd bytes apart) with the products reduced mod 256 as ggml's `uint8_t` does.
#[target_feature(enable = "avx2")]
#[inline]
fn trits(v: __m256i, p: __m256i) -> __m256i {
    let low = _mm256_set1_epi16(0xff);
    let even = trit16(_mm256_and_si256(v, low), p);
    let odd = trit16(_mm256_srli_epi16(v, 8), p);
    _mm256_or_si256(even, _mm256_slli_epi16(odd, 8))
}

/// The digit of bytes held zero-extended in 16-bit lanes (a function, not a closure: a closure
/// does not inherit the target features).
#[target_feature(enable = "avx2")]
#[inline]
fn trit16(b: __m256i, p: __m256i) -> __m256i {
    let t = _mm256_and_si256(_mm256_mullo_epi16(b, p), _mm256_set1_epi16(0xff));
    _mm256_srli_epi16(_mm256_mullo_epi16(t, _mm256_set1_epi16(3)), 8)
}

/// Multipliers `lo` in the low 128 bits, `hi` in the high.
#[target_feature(enable = "avx2")]
#[inline]
fn halves(lo: i16, hi: i16) -> __m256i {
    _mm256_set_m128i(_mm_set1_epi16(hi), _mm_set1_epi16(lo))
}

/// Unit scales and bsum multipliers: `sums_k` then returns `(Σ u·x, Σ bsums)`.
#[target_feature(enable = "avx2")]
#[inline]
fn unit(q: [__m256i; 8]) -> DecodedK {
    DecodedK {
        q,
        scale: [_mm256_set1_epi16(1); 8],
        bsum_mul: _mm256_set1_epi16(1),
    }
}

impl SumsK for BlockTQ1_0 {
    row_z_ternary!();
    #[inline(always)]
    unsafe fn decode(&self) -> DecodedK {
        // SAFETY: AVX2 is available (contract); the 32-byte load is qs[0..32] (qs is 48), the
        // 16-byte one qs[32..48].
        unsafe {
            let head = load256(&self.qs);
            let tail = _mm_loadu_si128(self.qs[32..].as_ptr() as *const __m128i);
            let tail2 = _mm256_set_m128i(tail, tail);
            let qh = _mm_set1_epi32(i32::from_le_bytes(self.qh));
            let mut q = [_mm256_setzero_si256(); 8];
            // elements 32n + m: digit n of qs[m]
            for (n, pn) in [1i16, 3, 9, 27, 81].into_iter().enumerate() {
                q[n] = trits(head, _mm256_set1_epi16(pn));
            }
            // elements 160 + 16n + m: digit n of qs[32 + m], two digits a vector
            q[5] = trits(tail2, halves(1, 3));
            q[6] = trits(tail2, halves(9, 27));
            // elements 224..240: digit 4 of qs[32..48]; 240 + 4n + j: digit n of qh[j] (qh
            // repeated four times, byte 4n + j of the high half in 16-bit lane 2n + j / 2)
            let p_qh = _mm_set_epi16(27, 27, 9, 9, 3, 3, 1, 1);
            q[7] = trits(
                _mm256_set_m128i(qh, tail),
                _mm256_set_m128i(p_qh, _mm_set1_epi16(81)),
            );
            unit(q)
        }
    }
    #[inline(always)]
    unsafe fn sums_decoded(&self, d: &DecodedK, x: &BlockQ8K) -> (i32, i32) {
        // SAFETY: AVX2 is available (contract).
        let (usum, bsum) = unsafe { sums_k(d, x) };
        (usum - bsum, 0)
    }
}

impl SumsK for BlockTQ2_0 {
    row_z_ternary!();
    #[inline(always)]
    unsafe fn decode(&self) -> DecodedK {
        // SAFETY: AVX2 is available (contract); loads are 32 bytes inside qs (64).
        unsafe {
            let m3 = _mm256_set1_epi8(3);
            let mut q = [_mm256_setzero_si256(); 8];
            for h in 0..2 {
                let v = load256(&self.qs[32 * h..]);
                for l in 0..4 {
                    // element 128h + 32l + m: bits 2l..2l+1 of qs[32h + m]
                    q[4 * h + l] = _mm256_and_si256(srl16(v, 2 * l), m3);
                }
            }
            unit(q)
        }
    }
    #[inline(always)]
    unsafe fn sums_decoded(&self, d: &DecodedK, x: &BlockQ8K) -> (i32, i32) {
        // SAFETY: AVX2 is available (contract).
        let (usum, bsum) = unsafe { sums_k(d, x) };
        (usum - bsum, 0)
    }
}
