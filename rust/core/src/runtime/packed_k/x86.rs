//! The panel kernel of `packed_k.rs` with AVX-512 VNNI on 256-bit vectors (one lane per weight
//! row), the module comment's arithmetic.

use std::arch::x86_64::*;

use super::{D, SB_BYTES, SCALES};
use crate::matmul::reference::BlockQ8K;

/// One panel with one activation row: `w` holds `x.len()` super-blocks of `SB_BYTES`.
///
/// # Safety
/// AVX2, F16C and AVX-512F/VL/VNNI must be available (`cpu::has_vnni`); `w.len() >= x.len() *
/// SB_BYTES`.
#[target_feature(enable = "avx2,f16c,avx512f,avx512vl,avx512vnni")]
pub unsafe fn panel_k<const Q6: bool>(w: &[u8], x: &[BlockQ8K]) -> [f32; 8] {
    debug_assert!(w.len() >= x.len() * SB_BYTES);
    let mut acc = [_mm256_setzero_ps(); 8];
    for (b, xb) in x.iter().enumerate() {
        // SAFETY: b < x.len() and w holds x.len() super-blocks of SB_BYTES (contract), so the
        // offset stays inside w.
        let wb = unsafe { w.as_ptr().add(b * SB_BYTES) };
        let xq = xb.qs.as_ptr() as *const i32;
        // (Macros, not closures: a closure does not inherit the target features.)
        macro_rules! wv {
            ($t:expr) => {
                // SAFETY: t < 64, so the 32 bytes of vector t lie in the first 64 * 32 bytes of
                // this super-block (`SB_BYTES`); AVX2 (contract); unaligned load.
                unsafe { _mm256_loadu_si256(wb.add(32 * ($t)) as *const __m256i) }
            };
        }
        macro_rules! xv {
            ($t:expr) => {
                // SAFETY: t < 64: i32 t is bytes 4t..4t + 4 of the 256 activation quants;
                // read_unaligned, as qs is only byte-aligned.
                unsafe { _mm256_set1_epi32(xq.add($t).read_unaligned()) }
            };
        }
        macro_rules! scales {
            ($g:expr) => {
                // SAFETY: g < 16: 8 bytes at SCALES + 8g end by SCALES + 128 = D, inside the
                // super-block; SSE2 (baseline); unaligned load.
                unsafe { _mm_loadl_epi64(wb.add(SCALES + 8 * ($g)) as *const __m128i) }
            };
        }
        let (mut isum, mut msum) = (_mm256_setzero_si256(), _mm256_setzero_si256());
        if Q6 {
            for g in 0..16 {
                let mut d0 = _mm256_dpbusd_epi32(_mm256_setzero_si256(), wv!(4 * g), xv!(4 * g));
                let mut d1 =
                    _mm256_dpbusd_epi32(_mm256_setzero_si256(), wv!(4 * g + 1), xv!(4 * g + 1));
                d0 = _mm256_dpbusd_epi32(d0, wv!(4 * g + 2), xv!(4 * g + 2));
                d1 = _mm256_dpbusd_epi32(d1, wv!(4 * g + 3), xv!(4 * g + 3));
                let off = _mm256_set1_epi32(32 * xb.bsums[g] as i32);
                let dot = _mm256_sub_epi32(_mm256_add_epi32(d0, d1), off);
                let sc = _mm256_cvtepi8_epi32(scales!(g));
                isum = _mm256_add_epi32(isum, _mm256_mullo_epi32(sc, dot));
            }
        } else {
            for s in 0..8 {
                let (mut d0, mut d1) = (_mm256_setzero_si256(), _mm256_setzero_si256());
                for t in 0..4 {
                    d0 = _mm256_dpbusd_epi32(d0, wv!(8 * s + t), xv!(8 * s + t));
                    d1 = _mm256_dpbusd_epi32(d1, wv!(8 * s + t + 4), xv!(8 * s + t + 4));
                }
                let sc = _mm256_cvtepu8_epi32(scales!(s));
                isum = _mm256_add_epi32(isum, _mm256_mullo_epi32(sc, _mm256_add_epi32(d0, d1)));
                let m = _mm256_cvtepu8_epi32(scales!(8 + s));
                let bs = xb.bsums[2 * s] as i32 + xb.bsums[2 * s + 1] as i32;
                msum = _mm256_add_epi32(msum, _mm256_mullo_epi32(m, _mm256_set1_epi32(bs)));
            }
        }
        // SAFETY: the 8 f16 `d` are bytes D..D + 16 of the super-block, the 8 `dmin` the next 16
        // (D + 32 = SB_BYTES); F16C (contract).
        let (d, dmin) = unsafe {
            (
                _mm256_cvtph_ps(_mm_loadu_si128(wb.add(D) as *const __m128i)),
                _mm256_cvtph_ps(_mm_loadu_si128(wb.add(D + 16) as *const __m128i)),
            )
        };
        let xd = _mm256_set1_ps(xb.d);
        let p = _mm256_sub_ps(
            _mm256_mul_ps(_mm256_mul_ps(d, xd), _mm256_cvtepi32_ps(isum)),
            _mm256_mul_ps(_mm256_mul_ps(dmin, xd), _mm256_cvtepi32_ps(msum)),
        );
        acc[b % 8] = _mm256_add_ps(acc[b % 8], p);
    }
    let s0 = _mm256_add_ps(acc[0], acc[4]);
    let s1 = _mm256_add_ps(acc[1], acc[5]);
    let s2 = _mm256_add_ps(acc[2], acc[6]);
    let s3 = _mm256_add_ps(acc[3], acc[7]);
    let v = _mm256_add_ps(_mm256_add_ps(s0, s2), _mm256_add_ps(s1, s3));
    let mut out = [0f32; 8];
    // SAFETY: out has room for the 8 f32 stored (unaligned store).
    unsafe { _mm256_storeu_ps(out.as_mut_ptr(), v) };
    out
}
