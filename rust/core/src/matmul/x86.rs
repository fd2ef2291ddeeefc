//! AVX2 versions of the dot products in `reference.rs`, chosen at run time (`simd::has_avx2`,
//! which honours FERROQUANT_FORCE_SCALAR). Integer sums are exact, so any summation order gives
//! the reference's integers; float products and lane accumulations are the reference's
//! operations in the reference's order (separate multiply and add, no FMA), so the results are
//! identical bit for bit. Where a row ends in fewer than 8 blocks (or 8 elements), the tail runs
//! the reference's scalar code on the same lanes.
//!
//! Safety of every function here: callers must have checked AVX2 and F16C at run time, and pass
//! slices of matching lengths (checked by the callers in `mod.rs`); all loads are unaligned
//! loads from in-bounds pointers of those slices.

use std::arch::x86_64::*;

use super::reference::{self as r, Block32, BlockK, BlockQ8K, LANES, WIDE};
use crate::formats::blocks::*;

#[inline(always)]
fn lanes_of(v: __m256) -> [f32; LANES] {
    let mut a = [0.0f32; LANES];
    // SAFETY: `a` has room for 8 f32; storeu has no alignment requirement.
    unsafe { _mm256_storeu_ps(a.as_mut_ptr(), v) };
    a
}

/// 8 x i32 partial sums of one block: `w` (32 signed i8) times the 32 i8 at `x`.
#[target_feature(enable = "avx2")]
#[inline]
unsafe fn block_isums(w: __m256i, x: &[i8; 32]) -> __m256i {
    let xv = _mm256_loadu_si256(x.as_ptr() as *const __m256i);
    // |w| (unsigned) times x with w's sign; |x| <= 127 (our quantizers never give -128), so
    // the pairs of maddubs cannot saturate: 2 * 128 * 127 < 32767.
    let p16 = _mm256_maddubs_epi16(_mm256_sign_epi8(w, w), _mm256_sign_epi8(xv, w));
    _mm256_madd_epi16(p16, _mm256_set1_epi16(1))
}

/// Horizontal sums of 8 vectors of 8 i32: lane j of the result is the sum of `v[j]`.
#[target_feature(enable = "avx2")]
#[inline]
fn reduce8(v: &[__m256i; 8]) -> __m256i {
    let h01 = _mm256_hadd_epi32(v[0], v[1]);
    let h23 = _mm256_hadd_epi32(v[2], v[3]);
    let h45 = _mm256_hadd_epi32(v[4], v[5]);
    let h67 = _mm256_hadd_epi32(v[6], v[7]);
    // [v0lo v1lo v2lo v3lo | v0hi v1hi v2hi v3hi] (lo/hi = sum of the low/high 4 lanes)
    let a = _mm256_hadd_epi32(h01, h23);
    let b = _mm256_hadd_epi32(h45, h67);
    let lo = _mm256_permute2x128_si256(a, b, 0x20);
    let hi = _mm256_permute2x128_si256(a, b, 0x31);
    _mm256_add_epi32(lo, hi)
}

#[target_feature(enable = "avx2")]
#[inline]
fn hsum_i32(v: __m256i) -> i32 {
    let s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    let s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0b01_00_11_10));
    let s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0b10_11_00_01));
    _mm_cvtsi128_si32(s)
}

/// The 32 nibbles of 16 bytes in ggml order: low nibbles (elements 0..15), then high nibbles.
#[target_feature(enable = "avx2")]
#[inline]
unsafe fn nibbles_ggml(qs: &[u8; 16]) -> __m256i {
    let q = _mm_loadu_si128(qs.as_ptr() as *const __m128i);
    let m4 = _mm_set1_epi8(0x0f);
    let lo = _mm_and_si128(q, m4);
    let hi = _mm_and_si128(_mm_srli_epi16(q, 4), m4);
    _mm256_set_m128i(hi, lo)
}

/// A weight block of 32 as 32 signed i8 in element order.
pub trait Load32: Block32 {
    /// # Safety
    /// AVX2 must be available.
    unsafe fn load(&self) -> __m256i;
}

impl Load32 for BlockQ4_0 {
    #[inline(always)]
    unsafe fn load(&self) -> __m256i {
        // SAFETY: AVX2 is available (this method's contract).
        unsafe { _mm256_sub_epi8(nibbles_ggml(&self.qs), _mm256_set1_epi8(8)) }
    }
}

impl Load32 for BlockQ8_0 {
    #[inline(always)]
    unsafe fn load(&self) -> __m256i {
        // SAFETY: qs is 32 bytes; AVX is available.
        unsafe { _mm256_loadu_si256(self.qs.as_ptr() as *const __m256i) }
    }
}

impl Load32 for BlockIQ4NL {
    #[inline(always)]
    unsafe fn load(&self) -> __m256i {
        // SAFETY: 16-byte table loaded from a 16-element i8 array; AVX2 is available.
        unsafe {
            let t = _mm_loadu_si128(r::KVALUES_IQ4NL.as_ptr() as *const __m128i);
            _mm256_shuffle_epi8(_mm256_set_m128i(t, t), nibbles_ggml(&self.qs))
        }
    }
}

/// `reference::dot_block32` with 8 blocks per step: their integer sums in one register, then
/// `acc += (dw * dx) * float(isum)` lane-wise.
///
/// # Safety
/// AVX2 and F16C must be available; `x.len() >= w.len()`, `xd.len() >= w.len()`.
#[target_feature(enable = "avx2,f16c")]
pub unsafe fn dot_block32<W: Load32>(w: &[W], x: &[BlockQ8_0], xd: &[f32]) -> f32 {
    let nb = w.len();
    let groups = nb / LANES;
    let mut acc = _mm256_setzero_ps();
    for g in 0..groups {
        let wg = &w[g * LANES..g * LANES + LANES];
        let xg = &x[g * LANES..g * LANES + LANES];
        let mut s = [_mm256_setzero_si256(); 8];
        let mut dh = [0u16; 8];
        for j in 0..LANES {
            s[j] = unsafe { block_isums(wg[j].load(), &xg[j].qs) };
            dh[j] = u16::from_le_bytes(wg[j].d());
        }
        let isum = reduce8(&s);
        let dw = _mm256_cvtph_ps(unsafe { _mm_loadu_si128(dh.as_ptr() as *const __m128i) });
        let dx = unsafe { _mm256_loadu_ps(xd[g * LANES..].as_ptr()) };
        let p = _mm256_mul_ps(_mm256_mul_ps(dw, dx), _mm256_cvtepi32_ps(isum));
        acc = _mm256_add_ps(acc, p);
    }
    let mut lanes = lanes_of(acc);
    for b in groups * LANES..nb {
        lanes[b % LANES] += r::block32_product(&w[b], &x[b], xd[b]);
    }
    r::hsum8(&lanes)
}

// ---------------------------------------------------------------- K-quants

/// Integer sums of K-quant blocks in AVX2 (the float part is the reference's scalar code).
pub trait SumsK: BlockK {
    /// # Safety
    /// AVX2 must be available.
    unsafe fn sums_avx2(&self, x: &BlockQ8K) -> (i32, i32);
}

#[target_feature(enable = "avx2")]
#[inline]
unsafe fn load256(p: &[u8]) -> __m256i {
    debug_assert!(p.len() >= 32);
    _mm256_loadu_si256(p.as_ptr() as *const __m256i)
}

#[target_feature(enable = "avx2")]
#[inline]
unsafe fn load256_i8(p: &[i8]) -> __m256i {
    debug_assert!(p.len() >= 32);
    _mm256_loadu_si256(p.as_ptr() as *const __m256i)
}

/// Σ_s sc_s Σ q x over the 8 sub-blocks of 32, `q(j)` giving the unsigned quants of chunk j
/// (elements 64j..64j+64) as two registers.
#[target_feature(enable = "avx2")]
#[inline]
unsafe fn isum_k4(
    scales: &[u8; K_SCALE_SIZE],
    x: &BlockQ8K,
    q: impl Fn(usize) -> (__m256i, __m256i),
) -> i32 {
    let mut acc = _mm256_setzero_si256();
    for j in 0..4 {
        let (lo, hi) = q(j);
        let (sc0, _) = r::scale_min_k4(2 * j, scales);
        let (sc1, _) = r::scale_min_k4(2 * j + 1, scales);
        let x0 = unsafe { load256_i8(&x.qs[64 * j..]) };
        let x1 = unsafe { load256_i8(&x.qs[64 * j + 32..]) };
        // q <= 31, |x| <= 127: the maddubs pairs stay below 2 * 31 * 127.
        let p0 = _mm256_madd_epi16(_mm256_maddubs_epi16(lo, x0), _mm256_set1_epi16(sc0 as i16));
        let p1 = _mm256_madd_epi16(_mm256_maddubs_epi16(hi, x1), _mm256_set1_epi16(sc1 as i16));
        acc = _mm256_add_epi32(acc, _mm256_add_epi32(p0, p1));
    }
    hsum_i32(acc)
}

impl SumsK for BlockQ4K {
    #[inline(always)]
    unsafe fn sums_avx2(&self, x: &BlockQ8K) -> (i32, i32) {
        // SAFETY: AVX2 is available (contract); loads are 32 bytes inside qs (128 bytes).
        let isum = unsafe {
            isum_k4(&self.scales, x, |j| {
                let q = load256(&self.qs[32 * j..]);
                let m4 = _mm256_set1_epi8(0x0f);
                (
                    _mm256_and_si256(q, m4),
                    _mm256_and_si256(_mm256_srli_epi16(q, 4), m4),
                )
            })
        };
        (isum, r::min_sum_k4(&self.scales, x))
    }
}

impl SumsK for BlockQ5K {
    #[inline(always)]
    unsafe fn sums_avx2(&self, x: &BlockQ8K) -> (i32, i32) {
        // SAFETY: AVX2 is available (contract); loads are 32 bytes inside qs / qh.
        let isum = unsafe {
            let qh = load256(&self.qh);
            isum_k4(&self.scales, x, |j| {
                let q = load256(&self.qs[32 * j..]);
                let m4 = _mm256_set1_epi8(0x0f);
                let sixteen = _mm256_set1_epi8(16);
                // bit 2j of qh[l] is bit 4 of element 64j + l, bit 2j+1 of element 64j+32+l.
                let b0 = _mm256_set1_epi8(1 << (2 * j));
                let b1 = _mm256_set1_epi8((1u8 << (2 * j + 1)) as i8);
                let h0 = _mm256_and_si256(_mm256_cmpeq_epi8(_mm256_and_si256(qh, b0), b0), sixteen);
                let h1 = _mm256_and_si256(_mm256_cmpeq_epi8(_mm256_and_si256(qh, b1), b1), sixteen);
                (
                    _mm256_or_si256(_mm256_and_si256(q, m4), h0),
                    _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(q, 4), m4), h1),
                )
            })
        };
        (isum, r::min_sum_k4(&self.scales, x))
    }
}

impl SumsK for BlockQ6K {
    #[inline(always)]
    unsafe fn sums_avx2(&self, x: &BlockQ8K) -> (i32, i32) {
        // SAFETY: AVX2 is available (contract); loads are 32 bytes inside ql / qh / x.qs.
        unsafe {
            let m4 = _mm256_set1_epi8(0x0f);
            let m2 = _mm256_set1_epi8(3);
            let mut acc = _mm256_setzero_si256();
            for h in 0..2 {
                let ql0 = load256(&self.ql[64 * h..]);
                let ql1 = load256(&self.ql[64 * h + 32..]);
                let qh = load256(&self.qh[32 * h..]);
                let top = |s: i32| {
                    let t = match s {
                        0 => qh,
                        2 => _mm256_srli_epi16(qh, 2),
                        4 => _mm256_srli_epi16(qh, 4),
                        _ => _mm256_srli_epi16(qh, 6),
                    };
                    // (t & 3) << 4 stays inside each byte.
                    _mm256_slli_epi16(_mm256_and_si256(t, m2), 4)
                };
                let q = [
                    _mm256_or_si256(_mm256_and_si256(ql0, m4), top(0)),
                    _mm256_or_si256(_mm256_and_si256(ql1, m4), top(2)),
                    _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(ql0, 4), m4), top(4)),
                    _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(ql1, 4), m4), top(6)),
                ];
                for (k, &qk) in q.iter().enumerate() {
                    let e = 128 * h + 32 * k;
                    let xv = load256_i8(&x.qs[e..]);
                    // Unsigned q <= 63 times x: pairs below 2 * 63 * 127; the low 128 bits
                    // are group e/16, the high 128 bits group e/16 + 1.
                    let sc = _mm256_set_m128i(
                        _mm_set1_epi16(self.scales[e / 16 + 1] as i16),
                        _mm_set1_epi16(self.scales[e / 16] as i16),
                    );
                    let p = _mm256_madd_epi16(_mm256_maddubs_epi16(qk, xv), sc);
                    acc = _mm256_add_epi32(acc, p);
                }
            }
            // Σ sc (q - 32) x = Σ sc q x - 32 Σ sc bsum (exact integers).
            let bias: i32 = (0..16)
                .map(|g| self.scales[g] as i32 * x.bsums[g] as i32)
                .sum();
            (hsum_i32(acc) - 32 * bias, 0)
        }
    }
}

/// `reference::dot_block_k` with the integer sums in AVX2.
///
/// # Safety
/// AVX2 must be available; `x.len() >= w.len()`.
#[target_feature(enable = "avx2")]
pub unsafe fn dot_block_k<W: SumsK>(w: &[W], x: &[BlockQ8K]) -> f32 {
    let mut acc = [0.0f32; LANES];
    for (b, (w, x)) in w.iter().zip(x).enumerate() {
        let (isum, msum) = unsafe { w.sums_avx2(x) };
        let (d, dmin) = w.d_dmin();
        acc[b % LANES] += r::block_k_product(d, dmin, x.d, isum, msum);
    }
    r::hsum8(&acc)
}

// ---------------------------------------------------------------- f32 activations

/// Store four registers as the 32 lanes of the f32-activation formats.
#[inline(always)]
fn wide_lanes(v: &[__m256; 4]) -> [f32; WIDE] {
    let mut a = [0.0f32; WIDE];
    for (k, r) in v.iter().enumerate() {
        a[8 * k..8 * k + 8].copy_from_slice(&lanes_of(*r));
    }
    a
}

/// `reference::dot_nf4`: 32 weights per step decoded in registers (two permutes of the code
/// table and a blend on bit 3 of the index), `part[k] += code * x` for the four registers of
/// 32 lanes, then `acc[k] += part[k] * absmax` per block.
///
/// # Safety
/// AVX2 must be available; `block_size` a multiple of 32, `packed.len() * 2 == x.len()`,
/// `absmax.len() * block_size == x.len()`.
#[target_feature(enable = "avx2")]
pub unsafe fn dot_nf4(packed: &[u8], absmax: &[f32], block_size: usize, x: &[f32]) -> f32 {
    debug_assert!(block_size.is_multiple_of(32));
    let tab_lo = unsafe { _mm256_loadu_ps(r::NF4_CODE.as_ptr()) };
    let tab_hi = unsafe { _mm256_loadu_ps(r::NF4_CODE[8..].as_ptr()) };
    let m4 = _mm_set1_epi8(0x0f);
    let decode = |idx8: __m128i| {
        let idx = _mm256_cvtepu8_epi32(idx8);
        let lo = _mm256_permutevar8x32_ps(tab_lo, idx);
        let hi = _mm256_permutevar8x32_ps(tab_hi, idx);
        _mm256_blendv_ps(lo, hi, _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28)))
    };
    let mut acc = [_mm256_setzero_ps(); 4];
    for (b, &s) in absmax.iter().enumerate() {
        let mut part = [_mm256_setzero_ps(); 4];
        let wb = &packed[b * block_size / 2..(b + 1) * block_size / 2];
        let xb = &x[b * block_size..(b + 1) * block_size];
        for (wq, xq) in wb.chunks_exact(16).zip(xb.chunks_exact(32)) {
            let q = unsafe { _mm_loadu_si128(wq.as_ptr() as *const __m128i) };
            let hi = _mm_and_si128(_mm_srli_epi16(q, 4), m4);
            let lo = _mm_and_si128(q, m4);
            // element 2j = high nibble of byte j, element 2j+1 = its low nibble
            let e0 = _mm_unpacklo_epi8(hi, lo);
            let e1 = _mm_unpackhi_epi8(hi, lo);
            let idx = [e0, _mm_srli_si128(e0, 8), e1, _mm_srli_si128(e1, 8)];
            for k in 0..4 {
                let xv = unsafe { _mm256_loadu_ps(xq[8 * k..].as_ptr()) };
                part[k] = _mm256_add_ps(part[k], _mm256_mul_ps(decode(idx[k]), xv));
            }
        }
        let sv = _mm256_set1_ps(s);
        for k in 0..4 {
            acc[k] = _mm256_add_ps(acc[k], _mm256_mul_ps(part[k], sv));
        }
    }
    r::hsum32(&wide_lanes(&acc))
}

/// True when the AVX-512F decode of nf4 may run (AVX2 allowed, FERROQUANT_FORCE_SCALAR unset).
pub fn has_avx512f() -> bool {
    use std::sync::OnceLock;
    static F: OnceLock<bool> = OnceLock::new();
    *F.get_or_init(|| {
        crate::formats::simd::has_avx2() && std::arch::is_x86_feature_detected!("avx512f")
    })
}

/// `dot_nf4` with AVX-512F: one 16-entry permute decodes 16 weights. The products and sums are
/// those of the four AVX2 registers (a 512-bit register holds lanes 0..15 or 16..31 of the 32),
/// so the result is the same bits.
///
/// # Safety
/// AVX-512F must be available (`has_avx512f`); lengths as for `dot_nf4`.
#[target_feature(enable = "avx2,avx512f")]
pub unsafe fn dot_nf4_avx512(packed: &[u8], absmax: &[f32], block_size: usize, x: &[f32]) -> f32 {
    debug_assert!(block_size.is_multiple_of(32));
    let tab = unsafe { _mm512_loadu_ps(r::NF4_CODE.as_ptr()) };
    let m4 = _mm_set1_epi8(0x0f);
    let mut acc = [_mm512_setzero_ps(); 2];
    for (b, &s) in absmax.iter().enumerate() {
        let mut part = [_mm512_setzero_ps(); 2];
        let wb = &packed[b * block_size / 2..(b + 1) * block_size / 2];
        let xb = &x[b * block_size..(b + 1) * block_size];
        for (wq, xq) in wb.chunks_exact(16).zip(xb.chunks_exact(32)) {
            let q = unsafe { _mm_loadu_si128(wq.as_ptr() as *const __m128i) };
            let hi = _mm_and_si128(_mm_srli_epi16(q, 4), m4);
            let lo = _mm_and_si128(q, m4);
            let e = [_mm_unpacklo_epi8(hi, lo), _mm_unpackhi_epi8(hi, lo)];
            for k in 0..2 {
                let code = _mm512_permutexvar_ps(_mm512_cvtepu8_epi32(e[k]), tab);
                let xv = unsafe { _mm512_loadu_ps(xq[16 * k..].as_ptr()) };
                part[k] = _mm512_add_ps(part[k], _mm512_mul_ps(code, xv));
            }
        }
        let sv = _mm512_set1_ps(s);
        for k in 0..2 {
            acc[k] = _mm512_add_ps(acc[k], _mm512_mul_ps(part[k], sv));
        }
    }
    let mut a = [0.0f32; WIDE];
    // SAFETY: a holds 32 f32.
    unsafe {
        _mm512_storeu_ps(a.as_mut_ptr(), acc[0]);
        _mm512_storeu_ps(a[16..].as_mut_ptr(), acc[1]);
    }
    r::hsum32(&a)
}

/// `reference::dot_int8`: 32 weights per step in four registers (sign-extended, converted
/// exactly to f32), `part[k] += q * x`, the block's tail on the same lanes in scalar code, then
/// `acc += part * scale`.
///
/// # Safety
/// AVX2 must be available; `q.len() == x.len()`, `scales.len() == x.len().div_ceil(block_len)`.
#[target_feature(enable = "avx2")]
pub unsafe fn dot_int8(q: &[u8], scales: &[f32], block_len: usize, x: &[f32]) -> f32 {
    let mut acc = [_mm256_setzero_ps(); 4];
    for ((&s, qb), xb) in scales
        .iter()
        .zip(q.chunks(block_len))
        .zip(x.chunks(block_len))
    {
        let mut part = [_mm256_setzero_ps(); 4];
        let whole = qb.len() / WIDE * WIDE;
        for (w32, x32) in qb[..whole]
            .chunks_exact(WIDE)
            .zip(xb[..whole].chunks_exact(WIDE))
        {
            for k in 0..4 {
                // SAFETY: 8 bytes / 8 f32 inside the 32-element chunks.
                let (wv, xv) = unsafe {
                    (
                        _mm_loadl_epi64(w32[8 * k..].as_ptr() as *const __m128i),
                        _mm256_loadu_ps(x32[8 * k..].as_ptr()),
                    )
                };
                let wf = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(wv));
                part[k] = _mm256_add_ps(part[k], _mm256_mul_ps(wf, xv));
            }
        }
        let mut p = wide_lanes(&part);
        for j in whole..qb.len() {
            p[j % WIDE] += (qb[j] as i8) as f32 * xb[j];
        }
        let sv = _mm256_set1_ps(s);
        for k in 0..4 {
            // SAFETY: 8 f32 inside p.
            let pk = unsafe { _mm256_loadu_ps(p[8 * k..].as_ptr()) };
            acc[k] = _mm256_add_ps(acc[k], _mm256_mul_ps(pk, sv));
        }
    }
    r::hsum32(&wide_lanes(&acc))
}
