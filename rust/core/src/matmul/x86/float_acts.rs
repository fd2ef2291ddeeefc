//! AVX2 / AVX-512F kernels of the f32-activation formats (nf4, int8, fp8): the reference's lane
//! structure (32 lanes, see `reference.rs`) with the weights decoded in registers. Safety rules
//! as in `x86.rs`.

use std::arch::x86_64::*;

use super::lanes_of;
use crate::matmul::reference::{self as r, WIDE};

/// Store four registers as the 32 lanes of the f32-activation formats.
#[inline(always)]
fn wide_lanes(v: &[__m256; 4]) -> [f32; WIDE] {
    let mut a = [0.0f32; WIDE];
    for (k, r) in v.iter().enumerate() {
        a[8 * k..8 * k + 8].copy_from_slice(&lanes_of(*r));
    }
    a
}

/// The 32 nf4 indices of 16 packed bytes in element order, as four groups of 8 bytes (the low
/// 8 bytes of each register): element 2j is the high nibble of byte j, 2j+1 the low nibble.
#[target_feature(enable = "avx2")]
#[inline]
unsafe fn nf4_indices(wq: &[u8]) -> [__m128i; 4] {
    debug_assert!(wq.len() >= 16);
    let q = unsafe { _mm_loadu_si128(wq.as_ptr() as *const __m128i) };
    let m4 = _mm_set1_epi8(0x0f);
    let hi = _mm_and_si128(_mm_srli_epi16(q, 4), m4);
    let lo = _mm_and_si128(q, m4);
    let e0 = _mm_unpacklo_epi8(hi, lo);
    let e1 = _mm_unpackhi_epi8(hi, lo);
    [e0, _mm_srli_si128(e0, 8), e1, _mm_srli_si128(e1, 8)]
}

/// 8 nf4 codes from the 8 indices in the low bytes of `idx8`: two 8-entry permutes and a blend
/// on bit 3 of the index.
#[target_feature(enable = "avx2")]
#[inline]
fn nf4_decode8(tab_lo: __m256, tab_hi: __m256, idx8: __m128i) -> __m256 {
    let idx = _mm256_cvtepu8_epi32(idx8);
    let lo = _mm256_permutevar8x32_ps(tab_lo, idx);
    let hi = _mm256_permutevar8x32_ps(tab_hi, idx);
    _mm256_blendv_ps(lo, hi, _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28)))
}

/// `reference::dot_nf4` for R activation rows at once: 32 weights per step decoded once in
/// registers (two permutes of the code table and a blend on bit 3 of the index), then per row
/// `part[k] += code * x` for the four registers of 32 lanes and `acc[k] += part[k] * absmax`
/// per block.
///
/// # Safety
/// AVX2 must be available; `block_size` a multiple of 32, `packed.len() * 2 == x[r].len()`,
/// `absmax.len() * block_size == x[r].len()`.
#[target_feature(enable = "avx2")]
pub unsafe fn dot_nf4<const R: usize>(
    packed: &[u8],
    absmax: &[f32],
    block_size: usize,
    x: [&[f32]; R],
) -> [f32; R] {
    debug_assert!(block_size.is_multiple_of(32));
    let tab_lo = unsafe { _mm256_loadu_ps(r::NF4_CODE.as_ptr()) };
    let tab_hi = unsafe { _mm256_loadu_ps(r::NF4_CODE[8..].as_ptr()) };
    let mut acc = [[_mm256_setzero_ps(); 4]; R];
    for (b, &s) in absmax.iter().enumerate() {
        let mut part = [[_mm256_setzero_ps(); 4]; R];
        let wb = &packed[b * block_size / 2..(b + 1) * block_size / 2];
        for (c, wq) in wb.chunks_exact(16).enumerate() {
            let idx = unsafe { nf4_indices(wq) };
            let mut code = [_mm256_setzero_ps(); 4];
            for k in 0..4 {
                code[k] = nf4_decode8(tab_lo, tab_hi, idx[k]);
            }
            let at = b * block_size + 32 * c;
            for r in 0..R {
                let xq = &x[r][at..at + 32];
                for k in 0..4 {
                    let xv = unsafe { _mm256_loadu_ps(xq[8 * k..].as_ptr()) };
                    part[r][k] = _mm256_add_ps(part[r][k], _mm256_mul_ps(code[k], xv));
                }
            }
        }
        let sv = _mm256_set1_ps(s);
        for r in 0..R {
            for k in 0..4 {
                acc[r][k] = _mm256_add_ps(acc[r][k], _mm256_mul_ps(part[r][k], sv));
            }
        }
    }
    acc.map(|a| r::hsum32(&wide_lanes(&a)))
}

/// True when the AVX-512F decode of nf4 may run (AVX2 allowed, FERROQUANT_FORCE_SCALAR unset).
pub fn has_avx512f() -> bool {
    use std::sync::OnceLock;
    static F: OnceLock<bool> = OnceLock::new();
    *F.get_or_init(|| {
        crate::formats::simd::has_avx2() && std::arch::is_x86_feature_detected!("avx512f")
    })
}

/// `dot_nf4` with AVX-512F on split activations: `x` holds, for every 32 elements, the 16 even
/// ones then the 16 odd ones. The 16 packed bytes of 32 weights widen to 16 dwords (byte i:
/// element 2i in its high nibble, 2i+1 in its low one); one 16-entry permute of the code table
/// by the low nibbles (`vpermps` reads only the index's low 4 bits) gives the odd elements, one
/// by the bytes shifted right by 4 the even ones. Register `e` then holds reference lanes
/// 0, 2, .., 30 and register `o` lanes 1, 3, .., 31, with the reference's products and sums on
/// every lane, so the result is the same bits.
///
/// # Safety
/// AVX-512F must be available (`has_avx512f`); lengths as for `dot_nf4`, `x[r]` split.
#[target_feature(enable = "avx2,avx512f")]
pub unsafe fn dot_nf4_avx512<const R: usize>(
    packed: &[u8],
    absmax: &[f32],
    block_size: usize,
    x: [&[f32]; R],
) -> [f32; R] {
    debug_assert!(block_size.is_multiple_of(32));
    let tab = unsafe { _mm512_loadu_ps(r::NF4_CODE.as_ptr()) };
    // [even, odd] per row
    let mut acc = [[_mm512_setzero_ps(); 2]; R];
    for (b, &s) in absmax.iter().enumerate() {
        let mut part = [[_mm512_setzero_ps(); 2]; R];
        let wb = &packed[b * block_size / 2..(b + 1) * block_size / 2];
        for (c, wq) in wb.chunks_exact(16).enumerate() {
            let q = _mm512_cvtepu8_epi32(unsafe { _mm_loadu_si128(wq.as_ptr() as *const __m128i) });
            let code = [
                _mm512_permutexvar_ps(_mm512_srli_epi32(q, 4), tab),
                _mm512_permutexvar_ps(q, tab),
            ];
            let at = b * block_size + 32 * c;
            for r in 0..R {
                let xq = &x[r][at..at + 32];
                for k in 0..2 {
                    let xv = unsafe { _mm512_loadu_ps(xq[16 * k..].as_ptr()) };
                    part[r][k] = _mm512_add_ps(part[r][k], _mm512_mul_ps(code[k], xv));
                }
            }
        }
        let sv = _mm512_set1_ps(s);
        for r in 0..R {
            for k in 0..2 {
                acc[r][k] = _mm512_add_ps(acc[r][k], _mm512_mul_ps(part[r][k], sv));
            }
        }
    }
    acc.map(|a| {
        let mut eo = [0.0f32; WIDE];
        // SAFETY: eo holds 32 f32.
        unsafe {
            _mm512_storeu_ps(eo.as_mut_ptr(), a[0]);
            _mm512_storeu_ps(eo[16..].as_mut_ptr(), a[1]);
        }
        let l: [f32; WIDE] = std::array::from_fn(|j| eo[(j % 2) * 16 + j / 2]);
        r::hsum32(&l)
    })
}

/// Split one row of activations as `dot_nf4_avx512` reads them (tests).
pub fn split_even_odd(x: &[f32]) -> Vec<f32> {
    let mut xe = vec![0.0f32; x.len()];
    for (o, c) in xe.chunks_exact_mut(32).zip(x.chunks_exact(32)) {
        for i in 0..16 {
            o[i] = c[2 * i];
            o[16 + i] = c[2 * i + 1];
        }
    }
    xe
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

pub struct Int8;
pub struct Fp8E4M3;
pub struct Fp8E5M2;

impl Decode32 for Int8 {
    #[inline(always)]
    unsafe fn decode32(w: &[u8]) -> [__m256; 4] {
        debug_assert!(w.len() >= 32);
        let mut out = [_mm256_setzero_ps(); 4];
        for (k, v) in out.iter_mut().enumerate() {
            // SAFETY: AVX2 is available (contract); 8 bytes inside `w`; sign extension and
            // i32 -> f32 are exact.
            *v = unsafe {
                let wv = _mm_loadl_epi64(w[8 * k..].as_ptr() as *const __m128i);
                _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(wv))
            };
        }
        out
    }
    fn value(b: u8) -> f32 {
        (b as i8) as f32
    }
}

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

/// `reference::dot_int8` for R activation rows at once: 32 weights per step converted once
/// (sign-extended, exactly to f32), per row `part[k] += q * x` in four registers, the block's
/// tail on the same lanes in scalar code, then `acc += part * scale`.
///
/// # Safety
/// AVX2 and F16C must be available (`simd::has_avx2` checks both); `q.len() == x[r].len()`,
/// `scales.len() == x[r].len().div_ceil(block_len)`.
#[target_feature(enable = "avx2,f16c")]
pub unsafe fn dot_int8<const R: usize>(
    q: &[u8],
    scales: &[f32],
    block_len: usize,
    x: [&[f32]; R],
) -> [f32; R] {
    // SAFETY: the caller's contract is this function's.
    unsafe { dot_bytes::<Int8, R>(q, scales, block_len, x) }
}

/// `reference::dot_fp8`: `dot_int8`'s loop with the fp8 decode of `D` (`Fp8E4M3`, `Fp8E5M2`).
///
/// # Safety
/// AVX2 and F16C must be available; lengths as for `dot_int8`.
#[target_feature(enable = "avx2,f16c")]
pub unsafe fn dot_fp8<D: Decode32, const R: usize>(
    q: &[u8],
    scales: &[f32],
    block_len: usize,
    x: [&[f32]; R],
) -> [f32; R] {
    // SAFETY: the caller's contract is this function's.
    unsafe { dot_bytes::<D, R>(q, scales, block_len, x) }
}

#[target_feature(enable = "avx2,f16c")]
#[inline]
unsafe fn dot_bytes<D: Decode32, const R: usize>(
    q: &[u8],
    scales: &[f32],
    block_len: usize,
    x: [&[f32]; R],
) -> [f32; R] {
    let mut acc = [[_mm256_setzero_ps(); 4]; R];
    for (b, (&s, qb)) in scales.iter().zip(q.chunks(block_len)).enumerate() {
        let mut part = [[_mm256_setzero_ps(); 4]; R];
        let whole = qb.len() / WIDE * WIDE;
        for (c, w32) in qb[..whole].chunks_exact(WIDE).enumerate() {
            // SAFETY: a 32-byte chunk; AVX2 and F16C are enabled here.
            let wf = unsafe { D::decode32(w32) };
            let at = b * block_len + WIDE * c;
            for r in 0..R {
                let x32 = &x[r][at..at + WIDE];
                for k in 0..4 {
                    // SAFETY: 8 f32 inside the 32-element chunk.
                    let xv = unsafe { _mm256_loadu_ps(x32[8 * k..].as_ptr()) };
                    part[r][k] = _mm256_add_ps(part[r][k], _mm256_mul_ps(wf[k], xv));
                }
            }
        }
        let sv = _mm256_set1_ps(s);
        for r in 0..R {
            let mut p = wide_lanes(&part[r]);
            let xb = &x[r][b * block_len..b * block_len + qb.len()];
            for j in whole..qb.len() {
                p[j % WIDE] += D::value(qb[j]) * xb[j];
            }
            for k in 0..4 {
                // SAFETY: 8 f32 inside p.
                let pk = unsafe { _mm256_loadu_ps(p[8 * k..].as_ptr()) };
                acc[r][k] = _mm256_add_ps(acc[r][k], _mm256_mul_ps(pk, sv));
            }
        }
    }
    acc.map(|a| r::hsum32(&wide_lanes(&a)))
}
