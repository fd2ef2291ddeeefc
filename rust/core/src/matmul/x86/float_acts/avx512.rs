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
use std::sync::OnceLock;

use super::{has_fma, Decode32, Fp8E4M3, Fp8E5M2, Int8};
use crate::matmul::reference::{self as r, WIDE};
use crate::matmul::x86::lanes_of;
use crate::matmul::AlignedX;
use crate::qtype::QType;

/// True when the kernels here may run: `has_fma` plus AVX-512 F, BW and VL.
pub fn has_avx512() -> bool {
    static F: OnceLock<bool> = OnceLock::new();
    *F.get_or_init(|| {
        has_fma()
            && std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512bw")
            && std::arch::is_x86_feature_detected!("avx512vl")
    })
}

/// The reference's fold of four registers of 16 lanes: `(r0 + r1) + (r2 + r3)` is
/// `(a[l] + a[l+16]) + (a[l+32] + a[l+48])`, then `s[l] + s[l+8]` (low half + high half), then
/// `hsum8`. `unperm` first puts the 16 sums back in lane order (nf4's lanes are permuted).
#[target_feature(enable = "avx2,avx512f")]
#[inline]
fn hsum64_512(a: &[__m512; 4], unperm: Option<__m512i>) -> f32 {
    let s = _mm512_add_ps(_mm512_add_ps(a[0], a[1]), _mm512_add_ps(a[2], a[3]));
    let s = match unperm {
        Some(i) => _mm512_permutexvar_ps(i, s),
        None => s,
    };
    let hi = _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(s), 1));
    r::hsum8(&lanes_of(_mm256_add_ps(_mm512_castps512_ps256(s), hi)))
}

// ---------------------------------------------------------------- nf4

/// Where the 16 weights of 8 packed bytes land in `dot_nf4_avx512`'s register: the 8 bytes are
/// broadcast to every 64-bit lane, 64-bit lane c shifts right by 4c (`vpsrlvd`), so 32-bit lane
/// t = 2c + d holds nibble c of dword d in its low 4 bits, which is what `vpermps` reads. That
/// nibble is element `8d + (c ^ 1)` of the 16 (byte 4d + c/2; low nibbles are odd elements).
pub const fn nf4_lane_element(t: usize) -> usize {
    8 * (t % 2) + ((t / 2) ^ 1)
}

const fn nf4_unperm() -> [i32; 16] {
    let mut inv = [0i32; 16];
    let mut t = 0;
    while t < 16 {
        inv[nf4_lane_element(t)] = t as i32;
        t += 1;
    }
    inv
}

/// Activations as `dot_nf4_avx512` reads them: within every 16, lane t holds element
/// `nf4_lane_element(t)`. `x.len()` is a multiple of 16 (nf4 rows are whole blocks of 32).
pub fn permute_nf4_x(x: &[f32]) -> AlignedX {
    debug_assert!(x.len().is_multiple_of(16));
    AlignedX::from_fn(x.len(), |i| x[i / 16 * 16 + nf4_lane_element(i % 16)])
}

/// An aligned copy of the activations (`AlignedX`) for `dot_bytes_avx512` (int8, e5m2).
pub fn align_x(x: &[f32]) -> AlignedX {
    AlignedX::from_fn(x.len(), |i| x[i])
}

/// 16 dequantized weights from the 8 bytes at `w` (`tab` = code times absmax).
///
/// # Safety
/// 8 bytes readable at `w`.
#[target_feature(enable = "avx2,fma,avx512f,avx512bw,avx512vl")]
#[inline]
unsafe fn nf4_16(w: *const u8, counts: __m512i, tab: __m512) -> __m512 {
    // SAFETY: 8 bytes at w (caller).
    let q = _mm512_set1_epi64(unsafe { (w as *const i64).read_unaligned() });
    _mm512_permutexvar_ps(_mm512_srlv_epi32(q, counts), tab)
}

/// 32 weights (16 bytes at `w`) into registers 2h, 2h+1 of every row.
///
/// # Safety
/// 16 bytes at `w`, 32 f32 at each `x[r]`.
#[target_feature(enable = "avx2,fma,avx512f,avx512bw,avx512vl")]
#[inline]
unsafe fn nf4_step32<const R: usize, const H: usize>(
    w: *const u8,
    counts: __m512i,
    tab: __m512,
    x: [*const f32; R],
    acc: &mut [[__m512; 4]; R],
) {
    // SAFETY: the caller's contract.
    unsafe {
        let w0 = nf4_16(w, counts, tab);
        let w1 = nf4_16(w.add(8), counts, tab);
        for r in 0..R {
            let a = &mut acc[r];
            a[2 * H] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(x[r]), a[2 * H]);
            a[2 * H + 1] = _mm512_fmadd_ps(w1, _mm512_loadu_ps(x[r].add(16)), a[2 * H + 1]);
        }
    }
}

/// The lanes of R dot products in progress: `acc` (and `part`, the current block's sums, for the
/// one-byte formats), so a row can be computed in pieces of K (`qmatmul` at M >= 2 runs pieces
/// of 1024 over a panel of weight rows, keeping the activations' piece in L1) with the same
/// operations in the same order as in one go.
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

    /// The folded sums (`nf4`: the lanes are `dot_nf4_avx512`'s permuted ones).
    ///
    /// # Safety
    /// `has_avx512`.
    #[target_feature(enable = "avx2,avx512f")]
    pub unsafe fn finish(&self, nf4: bool) -> [f32; R] {
        // SAFETY: 16 i32.
        let unperm = unsafe { _mm512_loadu_si512(NF4_UNPERM.as_ptr() as *const _) };
        let mut y = [0.0f32; R];
        for (y, a) in y.iter_mut().zip(&self.acc) {
            *y = hsum64_512(a, nf4.then_some(unperm));
        }
        y
    }
}

impl<const R: usize> Default for Lanes<R> {
    fn default() -> Self {
        Self::new()
    }
}

/// `reference::dot_nf4` for R activation rows with AVX-512: per block the 16 codes times
/// absmax in one register (the dequantized weights' table), then per 16 weights a broadcast
/// load of 8 bytes, one variable shift, one 16-entry permute (`nf4_16`) and one FMA per row.
/// Lanes are the reference's, permuted within each 16 (`nf4_lane_element`); `x[r]` must be
/// permuted the same way (`permute_nf4_x`), and the fold puts them back.
///
/// # Safety
/// `has_avx512`; `block_size` a multiple of 32, `packed.len() * 2 == x[r].len()`,
/// `absmax.len() * block_size == x[r].len()`.
#[target_feature(enable = "avx2,fma,avx512f,avx512bw,avx512vl")]
pub unsafe fn dot_nf4_avx512<const R: usize>(
    packed: &[u8],
    absmax: &[f32],
    block_size: usize,
    x: [&[f32]; R],
) -> [f32; R] {
    let mut l = Lanes::new();
    // SAFETY: the caller's contract is nf4_range's over the whole row.
    unsafe {
        nf4_range(packed, absmax, block_size, x, 0, x[0].len(), &mut l);
        l.finish(true)
    }
}

/// Positions `i0..i1` of `dot_nf4_avx512` into `l` (i0 a multiple of 64; i1 too, or K).
///
/// # Safety
/// As for `dot_nf4_avx512`.
#[target_feature(enable = "avx2,fma,avx512f,avx512bw,avx512vl")]
pub unsafe fn nf4_range<const R: usize>(
    packed: &[u8],
    absmax: &[f32],
    block_size: usize,
    x: [&[f32]; R],
    i0: usize,
    i1: usize,
    l: &mut Lanes<R>,
) {
    let k = absmax.len() * block_size;
    assert!(block_size.is_multiple_of(32) && packed.len() * 2 == k);
    assert!(x.iter().all(|x| x.len() == k));
    assert!(i0.is_multiple_of(WIDE) && i0 <= i1 && (i1.is_multiple_of(WIDE) || i1 == k) && i1 <= k);
    // SAFETY: NF4_CODE has 16 entries.
    let code = unsafe { _mm512_loadu_ps(r::NF4_CODE.as_ptr()) };
    let counts = _mm512_setr_epi32(0, 0, 4, 4, 8, 8, 12, 12, 16, 16, 20, 20, 24, 24, 28, 28);
    let tab = |b: usize| _mm512_mul_ps(code, _mm512_set1_ps(absmax[b]));
    let w = packed.as_ptr();
    let xp = x.map(|x| x.as_ptr());
    let at = |p: [*const f32; R], i: usize| p.map(|p| p.wrapping_add(i));
    let mut acc_regs = l.acc;
    let acc = &mut acc_regs;
    let nb = absmax.len();
    let (g0, g1) = (i0 / WIDE, i1 / WIDE);
    // SAFETY (all steps): positions `i..i + 32` (bytes i/2..i/2 + 16) are inside the row, as
    // the asserts above establish for every i below.
    unsafe {
        if block_size == 32 {
            for g in g0..g1 {
                let (b, i) = (2 * g, g * WIDE);
                nf4_step32::<R, 0>(w.add(i / 2), counts, tab(b), at(xp, i), acc);
                nf4_step32::<R, 1>(w.add(i / 2 + 16), counts, tab(b + 1), at(xp, i + 32), acc);
            }
            if i1 == k && !k.is_multiple_of(WIDE) {
                let i = k - 32;
                nf4_step32::<R, 0>(w.add(i / 2), counts, tab(nb - 1), at(xp, i), acc);
            }
        } else {
            // One flat loop over groups of 64 (a block is 2^n of them): the table changes
            // at every block's first group.
            let shift = (block_size / WIDE).trailing_zeros();
            let mask = block_size / WIDE - 1;
            let mut t = tab(g0 >> shift);
            for g in g0..g1 {
                if g & mask == 0 {
                    t = tab(g >> shift);
                }
                let i = g * WIDE;
                if g % 2 == 0 {
                    // A hint: an address past the row is never dereferenced.
                    _mm_prefetch::<_MM_HINT_T0>(
                        (w as *const i8).wrapping_add(i / 2 + NF4_PREFETCH),
                    );
                }
                nf4_step32::<R, 0>(w.add(i / 2), counts, t, at(xp, i), acc);
                nf4_step32::<R, 1>(w.add(i / 2 + 16), counts, t, at(xp, i + 32), acc);
            }
        }
    }
    l.acc = acc_regs;
}

/// How far ahead (bytes) the nf4 kernel prefetches its weights, one line per 64 bytes. From
/// memory at M = 1 (K = 4096, one thread, old and new kernels alternating in one process, a
/// busy machine): without it the new kernel read no faster than the old one (x0.96-1.07), with
/// it x1.5-1.9 (2048: 12.5 GB/s against 8.0). The one-byte formats' kernel was 0.6x slower with
/// the same prefetch at any distance from 256 to 4096; it prefetches into L2 instead
/// (`BYTES_PREFETCH_L2`), which did nothing for nf4 (compute bound: 12 GB/s on one thread,
/// 22 on two, with either).
const NF4_PREFETCH: usize = 2048;

/// How far ahead (bytes) the one-byte formats' kernel prefetches its weights into L2
/// (`_MM_HINT_T1`, one line per 64 bytes). M = 1 from memory, 4096x14336, quiet machine,
/// 2026-11-27 13:00 UTC: int8 one thread 9.0 -> 21.3 GB/s, two threads 16.2 -> 33 GB/s
/// (fp8_e4m3 14.7 -> 28, e5m2 21.9 -> 31.5); an L1 prefetch (T0) at 512-4096 bytes only
/// reached 10-11.7 GB/s on one thread; from L2 (256 rows) unchanged (21.3 GB/s).
const BYTES_PREFETCH_L2: usize = 8192;

static NF4_UNPERM: [i32; 16] = nf4_unperm();

// ---------------------------------------------------------------- int8, fp8

/// 16 one-byte weights (a register's 16 bytes) as 16 f32: exactly the reference's values for
/// int8 and e5m2, the value times 2^-8 for e4m3 (`E4M3_X_SCALE`; NaN codes excepted).
pub trait Decode16: Decode32 {
    /// e4m3: the caller multiplies the activations by 256 and checks the row for NaN codes.
    const E4M3: bool = false;
    /// # Safety
    /// AVX-512 F, BW, VL and F16C must be available.
    unsafe fn decode16(v: __m128i) -> __m512;
}

impl Decode16 for Int8 {
    /// Sign extension and i32 -> f32, both exact.
    #[inline(always)]
    unsafe fn decode16(v: __m128i) -> __m512 {
        _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(v))
    }
}

impl Decode16 for Fp8E5M2 {
    /// e5m2 is the upper byte of a float16: `cvtph(b << 8)`, exact (infinities and NaNs too).
    #[inline(always)]
    unsafe fn decode16(v: __m128i) -> __m512 {
        _mm512_cvtph_ps(_mm256_slli_epi16(_mm256_cvtepu8_epi16(v), 8))
    }
}

impl Decode16 for Fp8E4M3 {
    const E4M3: bool = true;
    /// The byte sign-extended to 16 bits and shifted left by 7 has the sign in bit 15 and the
    /// magnitude in bits 7..14, with a copy of the sign in bit 14 that `& 0xbf80` clears: the
    /// float16 `sign | (b & 0x7f) << 7`, which is the e4m3 value times 2^-8 for every finite
    /// code, subnormals included (both formats have 3 / 10 mantissa bits and the biases differ
    /// by 8). The NaN codes (magnitude 0x7f) come out as 480 / 256: rows holding one are
    /// found before (`has_e4m3_nan`).
    #[inline(always)]
    unsafe fn decode16(v: __m128i) -> __m512 {
        let h = _mm256_slli_epi16(_mm256_cvtepi8_epi16(v), 7);
        _mm512_cvtph_ps(_mm256_and_si256(h, _mm256_set1_epi16(0xbf80u16 as i16)))
    }
}

/// The factor by which e4m3 activations are scaled for `dot_bytes_avx512`: `h · (256 x)` is
/// the real number `v · x` (v = 256 h), so the FMA rounds it exactly as the reference does as
/// long as `256 x` is finite (`e4m3_x_fits`).
pub const E4M3_X_SCALE: f32 = 256.0;

/// True when every `256 x` is finite (|x| < 2^120), so `scale_e4m3_x` is exact.
pub fn e4m3_x_fits(x: &[f32]) -> bool {
    x.iter().all(|v| v.abs() < f32::powi(2.0, 120))
}

/// The activations as `dot_bytes_avx512::<Fp8E4M3, _>` reads them (`E4M3_X_SCALE`), aligned.
pub fn scale_e4m3_x(x: &[f32]) -> AlignedX {
    AlignedX::from_fn(x.len(), |i| x[i] * E4M3_X_SCALE)
}

/// True when the row holds an e4m3 NaN code (0x7f, 0xff): `2b mod 256` is 0xfe exactly for
/// those, and no byte's double is larger.
#[target_feature(enable = "avx2,avx512f,avx512bw")]
unsafe fn has_e4m3_nan(q: &[u8]) -> bool {
    let mut m = _mm512_setzero_si512();
    let chunks = q.chunks_exact(64);
    let rest = chunks.remainder();
    for c in chunks {
        // SAFETY: 64 bytes.
        let v = unsafe { _mm512_loadu_si512(c.as_ptr() as *const _) };
        m = _mm512_max_epu8(m, _mm512_add_epi8(v, v));
    }
    _mm512_cmpeq_epi8_mask(m, _mm512_set1_epi8(0xfeu8 as i8)) != 0
        || rest.iter().any(|&b| b & 0x7f == 0x7f)
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

/// `reference::dot_int8` / `dot_fp8` for R activation rows with AVX-512: 16 weights decoded
/// per register (`Decode16`), per row `part = fma(v, x, part)` in four registers, the row's
/// tail by masked loads, then `acc = fma(part, scale, acc)` per block. For e4m3 `x[r]` holds
/// the activations times 256 (`scale_e4m3_x`), and a row with a NaN code gives NaN (as the
/// reference does: NaN · x is NaN and stays NaN through every sum).
///
/// # Safety
/// `has_avx512`; `q.len() == x[r].len() >= 64`, `scales.len() == x[r].len().div_ceil(block_len)`,
/// `block_len` the whole row or a power of two from 32 on that divides it.
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl")]
pub unsafe fn dot_bytes_avx512<D: Decode16, const R: usize>(
    q: &[u8],
    scales: &[f32],
    block_len: usize,
    x: [&[f32]; R],
) -> [f32; R] {
    if row_has_nan_code::<D>(q) {
        return [f32::NAN; R];
    }
    let mut l = Lanes::new();
    // SAFETY: the caller's contract is bytes_range's over the whole row.
    unsafe {
        bytes_range::<D, R>(q, scales, block_len, x, 0, q.len(), &mut l);
        l.finish(false)
    }
}

/// True when `D` is e4m3 and the row holds one of its NaN codes (`dot_bytes_avx512` and
/// `bytes_range` compute those rows' lanes as if the code were 480: the row's result is NaN).
pub fn row_has_nan_code<D: Decode16>(q: &[u8]) -> bool {
    // SAFETY: has_e4m3_nan needs AVX-512 BW, which every caller has checked (`has_avx512`).
    D::E4M3 && unsafe { has_e4m3_nan(q) }
}

/// Positions `i0..i1` of `dot_bytes_avx512` into `l` (i0 a multiple of 64; i1 too, or K),
/// without the NaN-code check.
///
/// # Safety
/// As for `dot_bytes_avx512`.
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl")]
pub unsafe fn bytes_range<D: Decode16, const R: usize>(
    q: &[u8],
    scales: &[f32],
    block_len: usize,
    x: [&[f32]; R],
    i0: usize,
    i1: usize,
    l: &mut Lanes<R>,
) {
    let k = q.len();
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
    // SAFETY (all steps): the positions read are inside the row (asserts above).
    unsafe {
        if block_len == 32 {
            // Two blocks of 32 fill the four registers: parts of each, then their scales.
            for b in (2 * (i0 / WIDE)..i1.div_ceil(32)).step_by(2) {
                let i = 32 * b;
                *part = zero;
                bytes_16::<D, R, 0>(w.add(i), at(i), 16, part);
                bytes_16::<D, R, 1>(w.add(i + 16), at(i + 16), 16, part);
                fma_acc(acc, part, scales[b], [0, 2]);
                if b + 1 < scales.len() {
                    bytes_16::<D, R, 2>(w.add(i + 32), at(i + 32), 16, part);
                    bytes_16::<D, R, 3>(w.add(i + 48), at(i + 48), 16, part);
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
                _mm_prefetch::<_MM_HINT_T1>((w as *const i8).wrapping_add(i + BYTES_PREFETCH_L2));
                bytes_16::<D, R, 0>(w.add(i), at(i), 16, part);
                bytes_16::<D, R, 1>(w.add(i + 16), at(i + 16), 16, part);
                bytes_16::<D, R, 2>(w.add(i + 32), at(i + 32), 16, part);
                bytes_16::<D, R, 3>(w.add(i + 48), at(i + 48), 16, part);
                if i + WIDE == end {
                    fma_acc(acc, part, scales[b], [0, 4]);
                    b += 1;
                    start = end;
                    end = (end + block_len).min(k);
                }
            }
            let rest = i1 - whole;
            if rest > 0 {
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
}

/// Positions `i0..i1` of weight row `w` (with its `stats`) of an f32-activation format into
/// `l`: `nf4_range` or `bytes_range` by qtype (`qmatmul`'s pieces at M >= 2).
///
/// # Safety
/// As for `dot_nf4_avx512` / `dot_bytes_avx512`, x prepared as they read it.
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl")]
#[allow(clippy::too_many_arguments)]
pub unsafe fn f32_range<const R: usize>(
    qtype: QType,
    w: &[u8],
    stats: &[f32],
    block_len: usize,
    x: [&[f32]; R],
    i0: usize,
    i1: usize,
    l: &mut Lanes<R>,
) {
    // SAFETY: the caller's contract.
    unsafe {
        match qtype {
            QType::NF4 => nf4_range(w, stats, block_len, x, i0, i1, l),
            QType::Fp8E4M3 => bytes_range::<Fp8E4M3, R>(w, stats, block_len, x, i0, i1, l),
            QType::Fp8E5M2 => bytes_range::<Fp8E5M2, R>(w, stats, block_len, x, i0, i1, l),
            _ => bytes_range::<Int8, R>(w, stats, block_len, x, i0, i1, l),
        }
    }
}

/// The results of a row computed by `f32_range` pieces (NaN for an e4m3 row with a NaN code).
///
/// # Safety
/// `has_avx512`.
pub unsafe fn f32_finish<const R: usize>(qtype: QType, w: &[u8], l: &Lanes<R>) -> [f32; R] {
    if qtype == QType::Fp8E4M3 && row_has_nan_code::<Fp8E4M3>(w) {
        return [f32::NAN; R];
    }
    // SAFETY: the caller's contract.
    unsafe { l.finish(qtype == QType::NF4) }
}
