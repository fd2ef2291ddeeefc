//! AVX-512 kernels of the f32-activation formats: the reference's 64 lanes as four registers of
//! 16 (register k = lanes 16k..16k+16), fused multiply-adds, one decode per 16 weights.
//!
//! What bounds them at M = 1 is the vector pipes, not the loads: on Zen 4 (512-bit operations
//! take a 256-bit pipe for two cycles) FMAs go to pipes 0/1, permutes to 1/2, shifts and
//! conversions to 2/3. nf4 needs a shift, a permute and an FMA per 16 weights (1.5 cycles),
//! int8 a sign extension (from memory), a conversion and an FMA (1.5 cycles for 16 bytes).
//! The references' former separate multiply and add cost a third operation per weight on the
//! FMA pipes, and their 32 lanes (two registers) left the adds waiting on their own latency.

use std::arch::x86_64::*;

use super::{Decode32, Fp8E4M3, Fp8E5M2};
use crate::matmul::reference::{self as r, WIDE};
use crate::matmul::x86::lanes_of;
use crate::matmul::AlignedX;

/// The reference's fold of four registers of 16 lanes: `(r0 + r1) + (r2 + r3)` is
/// `(a[l] + a[l+16]) + (a[l+32] + a[l+48])`, then `s[l] + s[l+8]` (low half + high half), then
/// `hsum8`.
#[target_feature(enable = "avx2,avx512f")]
#[inline]
fn hsum64_512(a: &[__m512; 4]) -> f32 {
    let s = _mm512_add_ps(_mm512_add_ps(a[0], a[1]), _mm512_add_ps(a[2], a[3]));
    let hi = _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(s), 1));
    r::hsum8(&lanes_of(_mm256_add_ps(_mm512_castps512_ps256(s), hi)))
}

/// An aligned copy of the activations (`AlignedX`) for `dot_bytes_avx512` (e5m2).
pub fn align_x(x: &[f32]) -> AlignedX {
    AlignedX::from_fn(x.len(), |i| x[i])
}

/// How far ahead (bytes) the one-byte formats' kernel prefetches its weights into L2
/// (`_MM_HINT_T1`, one line per 64 bytes). M = 1 from memory, 4096x14336, quiet machine,
/// 2026-11-27 13:00 UTC: int8 one thread 9.0 -> 21.3 GB/s, two threads 16.2 -> 33 GB/s
/// (fp8_e4m3 14.7 -> 28, e5m2 21.9 -> 31.5); an L1 prefetch (T0) at 512-4096 bytes only
/// reached 10-11.7 GB/s on one thread; from L2 (256 rows) unchanged (21.3 GB/s).
/// 16 KiB on the Intel Xeon (Emerald Rapids) of session 14: fp8_e4m3 M = 1 from memory, one
/// thread, CPU time, load 24, 2026-12-07 03:29 UTC, two alternating sweeps: 14336x4096
/// 9.4 / 8.8 -> 11.0 / 10.6 GB/s, 4096x14336 11.8 / 11.4 -> 12.1 / 12.1 (32 and 64 KiB:
/// 10.6-10.7 at 14336x4096).
pub const BYTES_PREFETCH_L2: usize = 16384;

/// The lanes of R dot products in progress: `acc`, and `part`, the current block's sums.
#[derive(Clone, Copy)]
pub struct Lanes<const R: usize> {
    acc: [[__m512; 4]; R],
    part: [[__m512; 4]; R],
}

impl<const R: usize> Lanes<R> {
    pub fn new() -> Self {
        // SAFETY: an all-zero __m512 is sixteen +0.0.
        unsafe { std::mem::zeroed() }
    }

    /// The folded sums.
    ///
    /// # Safety
    /// AVX-512 F (`cpu::has_avx512`).
    #[target_feature(enable = "avx2,avx512f")]
    pub fn finish(&self) -> [f32; R] {
        self.acc.map(|a| hsum64_512(&a))
    }
}

impl<const R: usize> Default for Lanes<R> {
    fn default() -> Self {
        Self::new()
    }
}

// ---------------------------------------------------------------- int8, fp8

/// 16 one-byte weights (a register's 16 bytes) as 16 f32: exactly the reference's values for
/// int8 and e5m2, the value times 2^-8 for e4m3 (`E4M3_X_SCALE`; NaN codes excepted).
pub trait Decode16: Decode32 {
    /// e4m3: the caller checks the row for NaN codes.
    const E4M3: bool = false;
    /// The factor by which the kernels read the activations (`decode16` gives the values
    /// divided by it).
    const X_SCALE: f32 = 1.0;
    /// # Safety
    /// AVX-512 F, BW, VL and F16C must be available.
    unsafe fn decode16(v: __m128i) -> __m512;
    /// 32 weights (a register's 32 bytes) as `decode16` of each half: the widening, shift and
    /// mask once on 512 bits instead of twice on 256 (two fewer vector operations per 32
    /// weights on the pipes that bound these kernels; the same bits).
    /// # Safety
    /// As `decode16`.
    unsafe fn decode32_512(v: __m256i) -> [__m512; 2];
}

impl Decode16 for Fp8E5M2 {
    /// e5m2 is the upper byte of a float16: `cvtph(b << 8)`, exact (infinities and NaNs too).
    #[inline(always)]
    unsafe fn decode16(v: __m128i) -> __m512 {
        _mm512_cvtph_ps(_mm256_slli_epi16(_mm256_cvtepu8_epi16(v), 8))
    }
    #[inline(always)]
    unsafe fn decode32_512(v: __m256i) -> [__m512; 2] {
        halves_to_f32(_mm512_slli_epi16(_mm512_cvtepu8_epi16(v), 8))
    }
}

/// The 32 float16 of `h` as two registers of 16 f32 (low half, high half).
#[target_feature(enable = "avx2,f16c,avx512f,avx512bw,avx512vl")]
#[inline]
fn halves_to_f32(h: __m512i) -> [__m512; 2] {
    [
        _mm512_cvtph_ps(_mm512_castsi512_si256(h)),
        _mm512_cvtph_ps(_mm512_extracti64x4_epi64::<1>(h)),
    ]
}

impl Decode16 for Fp8E4M3 {
    const E4M3: bool = true;
    const X_SCALE: f32 = E4M3_X_SCALE;
    /// The byte sign-extended to 16 bits and shifted left by 7 has the sign in bit 15 and the
    /// magnitude in bits 7..14, with a copy of the sign in bit 14 that `& 0xbf80` clears: the
    /// float16 `sign | (b & 0x7f) << 7`, which is the e4m3 value times 2^-8 for every finite
    /// code, subnormals included (both formats have 3 / 10 mantissa bits and the biases differ
    /// by 8). The NaN codes (magnitude 0x7f) come out as 480 / 256: rows holding one are
    /// found as the row is read (`bytes_range`).
    #[inline(always)]
    unsafe fn decode16(v: __m128i) -> __m512 {
        let h = _mm256_slli_epi16(_mm256_cvtepi8_epi16(v), 7);
        _mm512_cvtph_ps(_mm256_and_si256(h, _mm256_set1_epi16(0xbf80u16 as i16)))
    }
    #[inline(always)]
    unsafe fn decode32_512(v: __m256i) -> [__m512; 2] {
        let h = _mm512_slli_epi16(_mm512_cvtepi8_epi16(v), 7);
        halves_to_f32(_mm512_and_si512(h, _mm512_set1_epi16(0xbf80u16 as i16)))
    }
}

/// e4m3 decoded straight to f32 bits: the byte sign-extended to 32 bits, shifted left by 20
/// and `& 0x87f0_0000` keeps the sign in bit 31 and the magnitude's 4 exponent / 3 mantissa
/// bits at the bottom of f32's exponent / the top of its mantissa: the e4m3 value times
/// 2^-120 for every finite code (the subnormal codes as f32 subnormals with the same digits,
/// the zeros as signed zeros; NaN codes come out as 480 · 2^-120 and are found as `Fp8E4M3`'s
/// are). Three vector operations per 16 weights (one of them on the shuffle port) where
/// `Fp8E4M3`'s float16 conversion costs four (two on it): the M = 1 kernel is bound by those
/// ports, not by the FMAs. The activations are read times 2^120 (`E4M3_F32_X_SCALE`), which
/// is finite only for |x| < 2^8 (`e4m3_f32_x_fits`); `plan` chooses `Fp8E4M3` otherwise.
/// The scalar value (`Decode32`) is `Fp8E4M3`'s.
pub struct Fp8E4M3F32;

impl Decode32 for Fp8E4M3F32 {
    #[inline(always)]
    unsafe fn decode32(w: &[u8]) -> [__m256; 4] {
        // SAFETY: the caller's contract is `Fp8E4M3::decode32`'s.
        unsafe { Fp8E4M3::decode32(w) }
    }
    fn value(b: u8) -> f32 {
        Fp8E4M3::value(b)
    }
}

impl Decode16 for Fp8E4M3F32 {
    const E4M3: bool = true;
    const X_SCALE: f32 = E4M3_F32_X_SCALE;
    #[inline(always)]
    unsafe fn decode16(v: __m128i) -> __m512 {
        let d = _mm512_slli_epi32::<20>(_mm512_cvtepi8_epi32(v));
        _mm512_castsi512_ps(_mm512_and_si512(
            d,
            _mm512_set1_epi32(0x87f0_0000u32 as i32),
        ))
    }
    #[inline(always)]
    unsafe fn decode32_512(v: __m256i) -> [__m512; 2] {
        [
            Self::decode16(_mm256_castsi256_si128(v)),
            Self::decode16(_mm256_extracti128_si256::<1>(v)),
        ]
    }
}

/// The factor by which `Fp8E4M3F32` reads the activations: `(v 2^-120) · (x 2^120)` is the real
/// number `v · x`, so each FMA rounds as the reference's does.
pub const E4M3_F32_X_SCALE: f32 = f32::from_bits((127 + 120) << 23);

/// True when every `x 2^120` is finite (|x| < 2^8), so `scale_e4m3_f32_x` is exact.
pub fn e4m3_f32_x_fits(x: &[f32]) -> bool {
    top_magnitude_bits(x) < 256.0f32.to_bits()
}

/// The activations as `Fp8E4M3F32` reads them (`E4M3_F32_X_SCALE`), aligned.
pub fn scale_e4m3_f32_x(x: &[f32]) -> AlignedX {
    AlignedX::from_fn(x.len(), |i| x[i] * E4M3_F32_X_SCALE)
}

/// The factor by which e4m3 activations are scaled for `dot_bytes_avx512`: `h · (256 x)` is
/// the real number `v · x` (v = 256 h), so the FMA rounds it exactly as the reference does as
/// long as `256 x` is finite (`e4m3_x_fits`).
pub const E4M3_X_SCALE: f32 = 256.0;

/// True when every `256 x` is finite (|x| < 2^120), so `scale_e4m3_x` is exact.
pub fn e4m3_x_fits(x: &[f32]) -> bool {
    top_magnitude_bits(x) < E4M3_F32_X_SCALE.to_bits()
}

/// The largest `|x|`'s bits (NaN's above infinity's): one pass that vectorises, where
/// `all(|v| v.abs() < c)` stops early but runs a scalar loop.
fn top_magnitude_bits(x: &[f32]) -> u32 {
    x.iter().fold(0u32, |m, v| m.max(v.to_bits() & 0x7fff_ffff))
}

/// The activations as `dot_bytes_avx512::<Fp8E4M3, _>` reads them (`E4M3_X_SCALE`), aligned.
pub fn scale_e4m3_x(x: &[f32]) -> AlignedX {
    AlignedX::from_fn(x.len(), |i| x[i] * E4M3_X_SCALE)
}

/// 16 weights at `w` into register I of every row (`part[r][I] = fma(w, x, part[r][I])`);
/// `n` < 16 reads only the first n weights and activations (the others count as 0 · 0).
///
/// # Safety
/// `n` bytes at `w` and `n` f32 at each `x[r]` (16 when `n` is 16).
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl")]
#[inline]
unsafe fn bytes_16<D: Decode16, const R: usize, const I: usize>(
    w: *const u8,
    x: [*const f32; R],
    n: usize,
    part: &mut [[__m512; 4]; R],
) {
    // SAFETY: the caller's contract; masked loads touch only the first n elements.
    unsafe {
        if n >= 16 {
            let wv = D::decode16(_mm_loadu_si128(w as *const __m128i));
            for r in 0..R {
                part[r][I] = _mm512_fmadd_ps(wv, _mm512_loadu_ps(x[r]), part[r][I]);
            }
        } else {
            let m = ((1u32 << n) - 1) as __mmask16;
            let wv = D::decode16(_mm_maskz_loadu_epi8(m, w as *const i8));
            for r in 0..R {
                let xv = _mm512_maskz_loadu_ps(m, x[r]);
                part[r][I] = _mm512_fmadd_ps(wv, xv, part[r][I]);
            }
        }
    }
}

/// 32 weights at `w` into registers I and I + 1 of every row (`bytes_16` at `w` and `w + 16`,
/// one `decode32_512`).
///
/// # Safety
/// 32 bytes at `w` and 32 f32 at each `x[r]`.
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl")]
#[inline]
unsafe fn bytes_32<D: Decode16, const R: usize, const I: usize>(
    w: *const u8,
    x: [*const f32; R],
    part: &mut [[__m512; 4]; R],
) {
    // SAFETY: the caller's contract.
    unsafe {
        let [lo, hi] = D::decode32_512(_mm256_loadu_si256(w as *const __m256i));
        for r in 0..R {
            part[r][I] = _mm512_fmadd_ps(lo, _mm512_loadu_ps(x[r]), part[r][I]);
            part[r][I + 1] = _mm512_fmadd_ps(hi, _mm512_loadu_ps(x[r].add(16)), part[r][I + 1]);
        }
    }
}

/// `reference::dot_int8` / `dot_fp8` for R activation rows with AVX-512: 16 weights decoded
/// per register (`Decode16`), per row `part = fma(v, x, part)` in four registers, the row's
/// tail by masked loads, then `acc = fma(part, scale, acc)` per block. For e4m3 `x[r]` holds
/// the activations times 256 (`scale_e4m3_x`), and a row with a NaN code gives NaN (as the
/// reference does: NaN · x is NaN and stays NaN through every sum).
///
/// # Safety
/// `cpu::has_avx512`; `q.len() == x[r].len() >= 64`, `scales.len() == x[r].len().div_ceil(block_len)`,
/// `block_len` the whole row or a power of two from 32 on that divides it.
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl")]
pub unsafe fn dot_bytes_avx512<D: Decode16, const R: usize>(
    q: &[u8],
    scales: &[f32],
    block_len: usize,
    x: [&[f32]; R],
) -> [f32; R] {
    let mut l = Lanes::new();
    // SAFETY: the caller's contract is bytes_range's over the whole row.
    let nan = unsafe {
        bytes_range::<D, R>(
            q,
            scales,
            block_len,
            x,
            0,
            q.len(),
            BYTES_PREFETCH_L2,
            &mut l,
        )
    };
    if nan {
        return [f32::NAN; R];
    }
    l.finish()
}

/// Positions `i0..i1` of one weight row (`q`, its `scales`) with one activation row into
/// `l`, as `dot_bytes_avx512` computes them (i0 a multiple of 64; i1 too, or K): the M = 1
/// path runs a row in pieces of K over a panel of rows (`Plan::bytes_pieces`), with the same
/// operations per lane in the same order as one pass. `pf`: how far ahead (bytes) the weights
/// are prefetched into L2. Returns true when e4m3 codes in the range hold a NaN code (the
/// row's result is then NaN).
///
/// # Safety
/// As for `dot_bytes_avx512`.
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl")]
#[allow(clippy::too_many_arguments)]
pub unsafe fn dot_bytes_piece<D: Decode16>(
    q: &[u8],
    scales: &[f32],
    block_len: usize,
    x: &[f32],
    i0: usize,
    i1: usize,
    pf: usize,
    l: &mut Lanes<1>,
) -> bool {
    // SAFETY: the caller's contract.
    unsafe { bytes_range::<D, 1>(q, scales, block_len, [x], i0, i1, pf, l) }
}

/// `dot_bytes_piece` for P weight rows at once, each with the one scale of its row
/// (`block_len == K`), K and `i0..i1` multiples of 64: the rows interleaved per 64 positions,
/// each group of activations loaded once for the P rows, and P independent chains of FMAs
/// where one row's four wait on their own latency. Each row's lanes get `bytes_range`'s
/// operations in its order (the same bits; `rows_bytes` runs it for the M = 1 panels).
/// Returns, per row, whether the range holds a NaN code (e4m3).
///
/// # Safety
/// `cpu::has_avx512`; `q[p].len() == x.len()`, a multiple of 64 that is at least 64;
/// `i0 <= i1 <= K`, both multiples of 64; `l[p]` holds positions `0..i0` of row p.
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl")]
pub unsafe fn dot_bytes_piece_rows<D: Decode16, const P: usize>(
    q: [&[u8]; P],
    scales: [f32; P],
    x: &[f32],
    i0: usize,
    i1: usize,
    pf: usize,
    l: &mut [Lanes<1>; P],
) -> [bool; P] {
    let k = x.len();
    assert!(k >= WIDE && k.is_multiple_of(WIDE) && q.iter().all(|q| q.len() == k));
    assert!(i0.is_multiple_of(WIDE) && i1.is_multiple_of(WIDE) && i0 <= i1 && i1 <= k);
    let mut part = [[_mm512_setzero_ps(); 4]; P];
    let mut nanm = [_mm512_setzero_si512(); P];
    for p in 0..P {
        part[p] = l[p].part[0];
    }
    let xp = x.as_ptr();
    let mut i = i0;
    // SAFETY: positions i..i + 64 < i1 <= K of every row and of x (asserted); AVX-512 F/BW/VL,
    // FMA and F16C are the caller's contract. Prefetches are hints (never dereferenced).
    unsafe {
        while i < i1 {
            let x0 = _mm512_loadu_ps(xp.add(i));
            let x1 = _mm512_loadu_ps(xp.add(i + 16));
            let x2 = _mm512_loadu_ps(xp.add(i + 32));
            let x3 = _mm512_loadu_ps(xp.add(i + 48));
            for p in 0..P {
                let w = q[p].as_ptr().add(i);
                _mm_prefetch::<_MM_HINT_T1>((w as *const i8).wrapping_add(pf));
                if D::E4M3 {
                    let v = _mm512_loadu_si512(w as *const _);
                    nanm[p] = _mm512_max_epu8(nanm[p], _mm512_add_epi8(v, v));
                }
                let [a, b] = D::decode32_512(_mm256_loadu_si256(w as *const __m256i));
                let [c, d] = D::decode32_512(_mm256_loadu_si256(w.add(32) as *const __m256i));
                part[p][0] = _mm512_fmadd_ps(a, x0, part[p][0]);
                part[p][1] = _mm512_fmadd_ps(b, x1, part[p][1]);
                part[p][2] = _mm512_fmadd_ps(c, x2, part[p][2]);
                part[p][3] = _mm512_fmadd_ps(d, x3, part[p][3]);
            }
            i += WIDE;
        }
    }
    let mut nan = [false; P];
    for p in 0..P {
        if i1 == k {
            // the row's one block ends: `bytes_range`'s `fma_acc`
            let sv = _mm512_set1_ps(scales[p]);
            for (a, &v) in l[p].acc[0].iter_mut().zip(&part[p]) {
                *a = _mm512_fmadd_ps(v, sv, *a);
            }
        }
        l[p].part[0] = part[p];
        nan[p] = D::E4M3 && _mm512_cmpeq_epi8_mask(nanm[p], _mm512_set1_epi8(0xfeu8 as i8)) != 0;
    }
    nan
}

/// Positions `i0..i1` of `dot_bytes_avx512` into `l` (i0 a multiple of 64; i1 too, or K),
/// weights prefetched `pf` bytes ahead; for e4m3 true when the range holds a NaN code: each
/// 64 bytes' `max(m, 2b mod 256)` as they pass (0xfe exactly for the codes 0x7f / 0xff, and no
/// byte's double is larger), which a separate pass over the row cost a tenth more time.
///
/// # Safety
/// As for `dot_bytes_avx512`.
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl")]
#[allow(clippy::too_many_arguments)]
unsafe fn bytes_range<D: Decode16, const R: usize>(
    q: &[u8],
    scales: &[f32],
    block_len: usize,
    x: [&[f32]; R],
    i0: usize,
    i1: usize,
    pf: usize,
    l: &mut Lanes<R>,
) -> bool {
    let k = q.len();
    let mut nanm = _mm512_setzero_si512();
    assert!(k >= WIDE && x.iter().all(|x| x.len() == k));
    assert!(scales.len() == k.div_ceil(block_len) && (block_len == k || block_len >= 32));
    assert!(i0.is_multiple_of(WIDE) && i0 <= i1 && (i1.is_multiple_of(WIDE) || i1 == k) && i1 <= k);
    let w = q.as_ptr();
    let xp = x.map(|x| x.as_ptr());
    let at = |i: usize| xp.map(|p| p.wrapping_add(i));
    // `part` in registers for the loop; `acc` (touched once a block) where it is.
    let mut part_regs = l.part;
    let part = &mut part_regs;
    let acc = &mut l.acc;
    let fma_acc =
        |acc: &mut [[__m512; 4]; R], part: &[[__m512; 4]; R], s: f32, regs: [usize; 2]| {
            let sv = _mm512_set1_ps(s);
            for r in 0..R {
                for k in regs[0]..regs[1] {
                    acc[r][k] = _mm512_fmadd_ps(part[r][k], sv, acc[r][k]);
                }
            }
        };
    let zero = [[_mm512_setzero_ps(); 4]; R];
    // SAFETY: every step reads positions in i0..i1 <= K of the weights and of each activation
    // row (asserted above: K = q.len() = x[r].len(), one scale per block); AVX-512 F/BW/VL, FMA
    // and F16C are the caller's contract (`cpu::has_avx512`).
    unsafe {
        if block_len == 32 {
            // Two blocks of 32 fill the four registers: parts of each, then their scales.
            for b in (2 * (i0 / WIDE)..i1.div_ceil(32)).step_by(2) {
                let i = 32 * b;
                if D::E4M3 {
                    // 64 bytes, or the row's last 32
                    let m = if b + 1 < scales.len() {
                        u64::MAX
                    } else {
                        u32::MAX as u64
                    };
                    let v = _mm512_maskz_loadu_epi8(m, w.add(i) as *const i8);
                    nanm = _mm512_max_epu8(nanm, _mm512_add_epi8(v, v));
                }
                *part = zero;
                bytes_32::<D, R, 0>(w.add(i), at(i), part);
                fma_acc(acc, part, scales[b], [0, 2]);
                if b + 1 < scales.len() {
                    bytes_32::<D, R, 2>(w.add(i + 32), at(i + 32), part);
                    fma_acc(acc, part, scales[b + 1], [2, 4]);
                }
            }
        } else {
            // Groups of 64; a block (the row, or 2^n groups) starts its part at its first
            // group and adds it to acc after its last (after the row's tail for a whole row).
            // (Block bounds are tracked, not computed: a division per group cost a third.)
            let whole = i1 / WIDE * WIDE;
            let mut b = i0 / block_len;
            let mut start = b * block_len;
            let mut end = (start + block_len).min(k);
            for i in (i0..whole).step_by(WIDE) {
                if i == start {
                    *part = zero;
                }
                // A hint into L2 (see `BYTES_PREFETCH_L2`): an address past the row is never
                // dereferenced.
                _mm_prefetch::<_MM_HINT_T1>((w as *const i8).wrapping_add(i + pf));
                if D::E4M3 {
                    let v = _mm512_loadu_si512(w.add(i) as *const _);
                    nanm = _mm512_max_epu8(nanm, _mm512_add_epi8(v, v));
                }
                bytes_32::<D, R, 0>(w.add(i), at(i), part);
                bytes_32::<D, R, 2>(w.add(i + 32), at(i + 32), part);
                if i + WIDE == end {
                    fma_acc(acc, part, scales[b], [0, 4]);
                    b += 1;
                    start = end;
                    end = (end + block_len).min(k);
                }
            }
            let rest = i1 - whole;
            if rest > 0 {
                if D::E4M3 {
                    let v = _mm512_maskz_loadu_epi8((1u64 << rest) - 1, w.add(whole) as *const i8);
                    nanm = _mm512_max_epu8(nanm, _mm512_add_epi8(v, v));
                }
                // The row's tail (a whole-row block, K > 64: its part is running).
                let n = |j: usize| rest.saturating_sub(16 * j).min(16);
                bytes_16::<D, R, 0>(w.add(whole), at(whole), n(0), part);
                if rest > 16 {
                    bytes_16::<D, R, 1>(w.add(whole + 16), at(whole + 16), n(1), part);
                }
                if rest > 32 {
                    bytes_16::<D, R, 2>(w.add(whole + 32), at(whole + 32), n(2), part);
                }
                if rest > 48 {
                    bytes_16::<D, R, 3>(w.add(whole + 48), at(whole + 48), n(3), part);
                }
                fma_acc(acc, part, scales[scales.len() - 1], [0, 4]);
            }
        }
    }
    l.part = part_regs;
    D::E4M3 && _mm512_cmpeq_epi8_mask(nanm, _mm512_set1_epi8(0xfeu8 as i8)) != 0
}
