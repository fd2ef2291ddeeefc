//! x86 kernels of the f32-activation formats (fp8_e4m3, fp8_e5m2; nf4 and int8 run on 16-bit
//! activations since 2026-11-27: `q16.rs`): the reference's 64 lanes and fused multiply-adds
//! (see `reference.rs`) with the weights decoded in registers. Two tiers: AVX2 + FMA here (eight
//! registers of 8 lanes, activations as given), AVX-512 in `avx512.rs` (four registers of 16
//! lanes; e4m3 reads the activations times 256: `scale_e4m3_x`). Without FMA the references
//! run. Safety rules as in `x86.rs`.

use std::arch::x86_64::*;

use super::lanes_of;
use crate::matmul::reference::{self as r, WIDE};

mod avx512;
mod pieces;
pub use avx512::{
    align_x, dot_bytes_avx512, dot_bytes_piece, dot_bytes_piece_rows, e4m3_f32_x_fits, e4m3_x_fits,
    scale_e4m3_f32_x, scale_e4m3_x, Decode16, Fp8E4M3F32, Lanes as ByteLanes, BYTES_PREFETCH_L2,
};
pub use pieces::{e4m3_nan_codes, fp8_range, Fp8Pieces, Lanes64};

/// The reference's fold of 64 lanes held as eight registers (register k = lanes 8k..8k+8):
/// `(a[l] + a[l+16]) + (a[l+32] + a[l+48])` is `(r0 + r2) + (r4 + r6)` for l < 8 and
/// `(r1 + r3) + (r5 + r7)` for 8 <= l < 16; `s[l] + s[l+8]` adds the two; then `hsum8`.
#[target_feature(enable = "avx2")]
#[inline]
fn hsum64_avx2(a: &[__m256; 8]) -> f32 {
    let lo = _mm256_add_ps(_mm256_add_ps(a[0], a[2]), _mm256_add_ps(a[4], a[6]));
    let hi = _mm256_add_ps(_mm256_add_ps(a[1], a[3]), _mm256_add_ps(a[5], a[7]));
    r::hsum8(&lanes_of(_mm256_add_ps(lo, hi)))
}

/// 32 one-byte weights as four registers of eight f32 (weights 8k..8k+8 in register k),
/// exactly the reference's values (NaN codes: a NaN, payload aside).
pub trait Decode32 {
    /// # Safety
    /// AVX2 and F16C must be available; `w` has at least 32 bytes.
    unsafe fn decode32(w: &[u8]) -> [__m256; 4];
    /// The reference's value of one byte (for the tails).
    fn value(b: u8) -> f32;
}

pub struct Fp8E4M3;
pub struct Fp8E5M2;

/// 16 float16 bit patterns (one per 16-bit lane) as two registers of eight f32.
#[target_feature(enable = "avx2,f16c")]
#[inline]
fn halves16(h: __m256i) -> [__m256; 2] {
    [
        _mm256_cvtph_ps(_mm256_castsi256_si128(h)),
        _mm256_cvtph_ps(_mm256_extracti128_si256(h, 1)),
    ]
}

impl Decode32 for Fp8E5M2 {
    /// e5m2 is the upper byte of a float16: `cvtph(b << 8)`, exact (infinities and NaNs too).
    #[inline(always)]
    unsafe fn decode32(w: &[u8]) -> [__m256; 4] {
        debug_assert!(w.len() >= 32);
        // SAFETY: AVX2 and F16C are available (contract); 16-byte loads inside `w`.
        unsafe {
            let lo = _mm256_cvtepu8_epi16(_mm_loadu_si128(w.as_ptr() as *const __m128i));
            let hi = _mm256_cvtepu8_epi16(_mm_loadu_si128(w[16..].as_ptr() as *const __m128i));
            let [a, b] = halves16(_mm256_slli_epi16(lo, 8));
            let [c, d] = halves16(_mm256_slli_epi16(hi, 8));
            [a, b, c, d]
        }
    }
    fn value(b: u8) -> f32 {
        r::fp8_table(true)[b as usize]
    }
}

/// 16 e4m3fn bytes (one per 16-bit lane) re-biased as float16 (bias 7 -> 15): `(b & 0x7f) << 7`
/// with the sign in bit 15 is the value times 2^-8 for every finite code (normal and subnormal
/// e4m3 values are halves with the same digits), and the NaN codes (magnitude 0x7f) become the
/// half NaN `sign | 0x7fff`.
#[target_feature(enable = "avx2")]
#[inline]
fn e4m3_as_halves(u: __m256i) -> __m256i {
    let mag = _mm256_and_si256(u, _mm256_set1_epi16(0x7f));
    let sign = _mm256_and_si256(_mm256_slli_epi16(u, 8), _mm256_set1_epi16(i16::MIN));
    let h = _mm256_or_si256(_mm256_slli_epi16(mag, 7), sign);
    let nan = _mm256_srli_epi16(_mm256_cmpeq_epi16(mag, _mm256_set1_epi16(0x7f)), 1);
    _mm256_or_si256(h, nan)
}

impl Decode32 for Fp8E4M3 {
    /// `e4m3_as_halves`, `cvtph`, then `* 256` (exact: a power of two on normal f32 values).
    #[inline(always)]
    unsafe fn decode32(w: &[u8]) -> [__m256; 4] {
        debug_assert!(w.len() >= 32);
        // SAFETY: AVX2 and F16C are available (contract); 16-byte loads inside `w`.
        unsafe {
            let lo = _mm256_cvtepu8_epi16(_mm_loadu_si128(w.as_ptr() as *const __m128i));
            let hi = _mm256_cvtepu8_epi16(_mm_loadu_si128(w[16..].as_ptr() as *const __m128i));
            let [a, b] = halves16(e4m3_as_halves(lo));
            let [c, d] = halves16(e4m3_as_halves(hi));
            let s = _mm256_set1_ps(256.0);
            [
                _mm256_mul_ps(a, s),
                _mm256_mul_ps(b, s),
                _mm256_mul_ps(c, s),
                _mm256_mul_ps(d, s),
            ]
        }
    }
    fn value(b: u8) -> f32 {
        r::fp8_table(false)[b as usize]
    }
}

/// `reference::dot_fp8` for R activation rows at once: 32 weights per step decoded once
/// (exactly to f32), per row `part = fma(v, x, part)` into lanes `i % 64`, the block's tail on
/// the same lanes in scalar code, then `acc = fma(part, scale, acc)`.
///
/// # Safety
/// AVX2, F16C and FMA must be available (`cpu::has_fma`); `q.len() == x[r].len()`,
/// `scales.len() == x[r].len().div_ceil(block_len)`, `block_len` the whole row or a power of
/// two from 32 on.
#[target_feature(enable = "avx2,f16c,fma")]
pub unsafe fn dot_fp8<D: Decode32, const R: usize>(
    q: &[u8],
    scales: &[f32],
    block_len: usize,
    x: [&[f32]; R],
) -> [f32; R] {
    // SAFETY: the caller's contract is this function's.
    unsafe { dot_bytes::<D, R>(q, scales, block_len, x) }
}

/// 32 weights decoded once, into `part[r][4h..4h+4]` of every row.
///
/// # Safety
/// 32 bytes at `w`, 32 f32 at each `x[r]`.
#[target_feature(enable = "avx2,f16c,fma")]
#[inline]
unsafe fn bytes_step32<D: Decode32, const R: usize, const H: usize>(
    w: *const u8,
    x: [*const f32; R],
    part: &mut [[__m256; 8]; R],
) {
    // SAFETY: the caller's contract; AVX2 and F16C enabled here.
    unsafe {
        let wf = D::decode32(std::slice::from_raw_parts(w, 32));
        for r in 0..R {
            for k in 0..4 {
                let xv = _mm256_loadu_ps(x[r].add(8 * k));
                part[r][4 * H + k] = _mm256_fmadd_ps(wf[k], xv, part[r][4 * H + k]);
            }
        }
    }
}

#[target_feature(enable = "avx2,f16c,fma")]
#[inline]
unsafe fn dot_bytes<D: Decode32, const R: usize>(
    q: &[u8],
    scales: &[f32],
    block_len: usize,
    x: [&[f32]; R],
) -> [f32; R] {
    let k = q.len();
    assert!(x.iter().all(|x| x.len() == k) && scales.len() == k.div_ceil(block_len));
    let mut y = [0.0f32; R];
    if k < WIDE {
        for r in 0..R {
            y[r] = r::dot_bytes(q, scales, block_len, x[r], D::value);
        }
        return y;
    }
    let w = q.as_ptr();
    let mut xp = [std::ptr::null::<f32>(); R];
    for r in 0..R {
        xp[r] = x[r].as_ptr();
    }
    let mut acc = [[_mm256_setzero_ps(); 8]; R];
    for (b, &s) in scales.iter().enumerate() {
        let at0 = b * block_len;
        let len = block_len.min(k - at0);
        let whole = len / 32 * 32;
        let mut part = [[_mm256_setzero_ps(); 8]; R];
        for i in (at0..at0 + whole).step_by(32) {
            let mut xi = xp;
            for p in xi.iter_mut() {
                *p = p.wrapping_add(i);
            }
            // SAFETY: positions i..i + 32 are inside the row (assert above).
            unsafe {
                if i % WIDE == 0 {
                    bytes_step32::<D, R, 0>(w.add(i), xi, &mut part)
                } else {
                    bytes_step32::<D, R, 1>(w.add(i), xi, &mut part)
                }
            }
        }
        let sv = _mm256_set1_ps(s);
        for r in 0..R {
            if whole < len {
                let mut p = [0.0f32; WIDE];
                for (k, v) in part[r].iter().enumerate() {
                    p[8 * k..8 * k + 8].copy_from_slice(&lanes_of(*v));
                }
                for j in at0 + whole..at0 + len {
                    p[j % WIDE] = D::value(q[j]).mul_add(x[r][j], p[j % WIDE]);
                }
                for (k, v) in part[r].iter_mut().enumerate() {
                    // SAFETY: 8 f32 inside p.
                    *v = unsafe { _mm256_loadu_ps(p[8 * k..].as_ptr()) };
                }
            }
            // Blocks of 64 and more touch every lane; the others (blocks of 32) half of them.
            let (k0, k1) = if len >= WIDE {
                (0, 8)
            } else if at0.is_multiple_of(WIDE) {
                (0, 4)
            } else {
                (4, 8)
            };
            for k in k0..k1 {
                acc[r][k] = _mm256_fmadd_ps(part[r][k], sv, acc[r][k]);
            }
        }
    }
    for r in 0..R {
        y[r] = hsum64_avx2(&acc[r]);
    }
    y
}

#[cfg(test)]
mod tests;
