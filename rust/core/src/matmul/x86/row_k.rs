//! K-quant (q4_K, q5_K, q6_K) integer sums in AVX2 for the row kernels: each super-block
//! decoded once (`SumsK::decode`), then `sums_decoded` per activation row; the float part is
//! the reference's scalar code. Where the CPU has AVX-512 F/BW/VL/VNNI, q4_K, q5_K, q6_K and
//! (`k_low.rs`' formats) q2_K, q3_K, iq4_xs run `vnni.rs`'s row kernel instead
//! (`SumsK::dot_row_z`; their decodes for it in `low.rs`). Safety rules as in `x86.rs`.

use std::arch::x86_64::*;

use super::prefetch_ahead;
use crate::formats::blocks::*;
use crate::matmul::reference::{self as r, unpack_scales_k4, BlockK, BlockQ8K, LANES};

mod avx2_rows;
mod group;
mod low;
mod q3;
mod vnni;
pub use avx2_rows::{dot_rows_k_avx2, vnni_rows_k, LanesK};
use group::dot_row_k_vnni;
pub use group::dot_rows_k_vnni;
pub use vnni::{interleave_k4, xz_order, RowK, XzOrder, XZ_BLOCK};
#[cfg(test)]
mod avx2_tests;
#[cfg(test)]
mod tests;

/// A K-quant super-block decoded once for several activation rows: the unsigned quants of the
/// 8 sub-blocks of 32, per sub-block scale multipliers (i16 lanes), and the multipliers of the 16
/// bsums (mins for q4_K/q5_K, scales for q6_K).
pub struct DecodedK {
    pub(crate) q: [__m256i; 8],
    pub(crate) scale: [__m256i; 8],
    pub(crate) bsum_mul: __m256i,
}

/// Integer sums of K-quant blocks in AVX2 (the float part is the reference's scalar code).
pub trait SumsK: BlockK {
    /// # Safety
    /// AVX2 must be available.
    unsafe fn decode(&self) -> DecodedK;
    /// (Σ scale·q·x, Σ bsum_mul·bsum) with `self`'s correction: q4_K/q5_K return them as
    /// (isum, msum); q6_K (quants stored +32) returns (Σ sc·q·x - 32·Σ sc·bsum, 0).
    ///
    /// # Safety
    /// AVX2 must be available; `d` comes from `self.decode()`.
    unsafe fn sums_decoded(&self, d: &DecodedK, x: &BlockQ8K) -> (i32, i32);
    /// `reference::dot_block_k` by the AVX-512 row kernel (`vnni.rs`, `long`: with the weight
    /// prefetch) where this format has one and the CPU runs it (`cpu::has_vnni_bw`), else None.
    /// `xz[r]`: `x[r]`'s quants by `interleave_k4` (None if too short).
    ///
    /// # Safety
    /// AVX2 must be available; every `x[r]` has at least `w.len()` blocks.
    #[inline(always)]
    unsafe fn dot_row_z<const R: usize>(
        _w: &[Self],
        _x: [&[BlockQ8K]; R],
        _xz: [&[u8]; R],
        _long: bool,
    ) -> Option<[f32; R]>
    where
        Self: Sized,
    {
        None
    }
}

/// `SumsK::dot_row_z` of the formats with a `RowK` decode: the AVX-512 row kernel where the
/// CPU runs it and `xz` holds the prepared activations, else None.
///
/// # Safety
/// AVX2 must be available; every `x[r]` has at least `w.len()` blocks.
#[inline(always)]
pub(crate) unsafe fn row_z_vnni<W: RowK, const R: usize>(
    w: &[W],
    x: [&[BlockQ8K]; R],
    xz: [&[u8]; R],
    long: bool,
) -> Option<[f32; R]> {
    let xz_ok = xz.iter().all(|v| v.len() >= XZ_BLOCK * w.len());
    if xz_ok && crate::cpu::has_vnni_bw() {
        // SAFETY: AVX-512 F/BW/VL/VNNI, AVX2 and F16C detected; x: the caller's; xz checked
        // above.
        Some(unsafe { dot_row_k_vnni(w, x, xz, long) })
    } else {
        None
    }
}

/// `SumsK::dot_row_z` by `row_z_vnni`.
macro_rules! row_z {
    () => {
        #[inline(always)]
        unsafe fn dot_row_z<const R: usize>(
            w: &[Self],
            x: [&[BlockQ8K]; R],
            xz: [&[u8]; R],
            long: bool,
        ) -> Option<[f32; R]> {
            // SAFETY: the caller's contract is row_z's.
            unsafe { $crate::matmul::x86::row_k::row_z_vnni(w, x, xz, long) }
        }
    };
}
pub(crate) use row_z;

#[target_feature(enable = "avx2")]
#[inline]
pub(crate) unsafe fn load256(p: &[u8]) -> __m256i {
    debug_assert!(p.len() >= 32);
    _mm256_loadu_si256(p.as_ptr() as *const __m256i)
}

#[target_feature(enable = "avx2")]
#[inline]
unsafe fn load256_i8(p: &[i8]) -> __m256i {
    debug_assert!(p.len() >= 32);
    _mm256_loadu_si256(p.as_ptr() as *const __m256i)
}

/// Scale broadcasts and the duplicated mins of a q4_K/q5_K block.
#[target_feature(enable = "avx2")]
#[inline]
fn scales_k4(scales: &[u8; K_SCALE_SIZE]) -> ([__m256i; 8], __m256i) {
    let (sc, m) = unpack_scales_k4(scales);
    // scale[s] = sc[s] in every i16 lane: the 8 bytes in every 64-bit lane, one byte shuffle
    // each (index [s, zero] per i16: zero-extended).
    let scb = _mm256_broadcastq_epi64(_mm_set_epi64x(0, i64::from_le_bytes(sc)));
    let mut scale = [_mm256_setzero_si256(); 8];
    for (s, v) in scale.iter_mut().enumerate() {
        *v = _mm256_shuffle_epi8(scb, _mm256_set1_epi16(s as i16 | (0x80 << 8)));
    }
    let m16 = _mm_cvtepu8_epi16(_mm_set_epi64x(0, i64::from_le_bytes(m)));
    // [m0 m0 m1 m1 ... m7 m7]: bsums 2s and 2s+1 belong to sub-block s
    let mins = _mm256_set_m128i(_mm_unpackhi_epi16(m16, m16), _mm_unpacklo_epi16(m16, m16));
    (scale, mins)
}

/// (Σ_s scale_s Σ q x, Σ bsum_mul·bsum) in 8 i32 lanes each (their lane sums).
#[target_feature(enable = "avx2")]
#[inline]
pub(crate) unsafe fn sums_k_lanes(d: &DecodedK, x: &BlockQ8K) -> (__m256i, __m256i) {
    let mut acc = _mm256_setzero_si256();
    for s in 0..8 {
        // SAFETY: s < 8: the 32 bytes from 32s are inside qs (256); AVX2 (this function's contract).
        let xv = unsafe { load256_i8(&x.qs[32 * s..]) };
        // q <= 63 unsigned, |x| <= 127: the maddubs pairs stay below 2 * 63 * 127.
        let p = _mm256_madd_epi16(_mm256_maddubs_epi16(d.q[s], xv), d.scale[s]);
        acc = _mm256_add_epi32(acc, p);
    }
    // SAFETY: bsums is 16 i16 = the 32 bytes loaded; AVX2 (contract).
    let bs = unsafe { _mm256_loadu_si256(x.bsums.as_ptr() as *const __m256i) };
    (acc, _mm256_madd_epi16(bs, d.bsum_mul))
}

/// `sums_k_lanes` reduced: two reductions of 8 i32 sharing their adds.
#[target_feature(enable = "avx2")]
#[inline]
pub(crate) unsafe fn sums_k(d: &DecodedK, x: &BlockQ8K) -> (i32, i32) {
    // SAFETY: AVX2 (contract).
    let (acc, mv) = unsafe { sums_k_lanes(d, x) };
    // [a0+a1 a2+a3 m0+m1 m2+m3 | a4+a5 a6+a7 m4+m5 m6+m7] -> [A M A M | A' M' A' M']
    let t = _mm256_hadd_epi32(acc, mv);
    let t = _mm256_hadd_epi32(t, t);
    let t = _mm_add_epi32(_mm256_castsi256_si128(t), _mm256_extracti128_si256(t, 1));
    (_mm_cvtsi128_si32(t), _mm_extract_epi32(t, 1))
}

impl SumsK for BlockQ4K {
    row_z!();
    #[inline(always)]
    unsafe fn decode(&self) -> DecodedK {
        // SAFETY: AVX2 is available (contract); loads are 32 bytes inside qs (128 bytes).
        unsafe {
            let m4 = _mm256_set1_epi8(0x0f);
            let mut q = [_mm256_setzero_si256(); 8];
            for j in 0..4 {
                let v = load256(&self.qs[32 * j..]);
                q[2 * j] = _mm256_and_si256(v, m4);
                q[2 * j + 1] = _mm256_and_si256(_mm256_srli_epi16(v, 4), m4);
            }
            let (scale, bsum_mul) = scales_k4(&self.scales);
            DecodedK { q, scale, bsum_mul }
        }
    }
    #[inline(always)]
    unsafe fn sums_decoded(&self, d: &DecodedK, x: &BlockQ8K) -> (i32, i32) {
        // SAFETY: AVX2 is available (contract).
        unsafe { sums_k(d, x) }
    }
}

impl SumsK for BlockQ5K {
    row_z!();
    #[inline(always)]
    unsafe fn decode(&self) -> DecodedK {
        // SAFETY: AVX2 is available (contract); loads are 32 bytes inside qs / qh.
        unsafe {
            let m4 = _mm256_set1_epi8(0x0f);
            let bit4 = _mm256_set1_epi8(0x10);
            let qh = load256(&self.qh);
            let mut q = [_mm256_setzero_si256(); 8];
            for j in 0..4 {
                let v = load256(&self.qs[32 * j..]);
                // bit s of qh[l] is bit 4 of element 32s + l; the 16-bit shifts leak bits
                // across bytes, which the mask 0x10 removes.
                let h0 = _mm256_and_si256(shift_bit_to_4(qh, 2 * j as i32), bit4);
                let h1 = _mm256_and_si256(shift_bit_to_4(qh, 2 * j as i32 + 1), bit4);
                q[2 * j] = _mm256_or_si256(_mm256_and_si256(v, m4), h0);
                q[2 * j + 1] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(v, 4), m4), h1);
            }
            let (scale, bsum_mul) = scales_k4(&self.scales);
            DecodedK { q, scale, bsum_mul }
        }
    }
    #[inline(always)]
    unsafe fn sums_decoded(&self, d: &DecodedK, x: &BlockQ8K) -> (i32, i32) {
        // SAFETY: AVX2 is available (contract).
        unsafe { sums_k(d, x) }
    }
}

/// `v` shifted (in 16-bit lanes) so that bit `s` (0..7) of each byte lands on bit 4.
#[target_feature(enable = "avx2")]
#[inline]
pub(crate) fn shift_bit_to_4(v: __m256i, s: i32) -> __m256i {
    match s {
        0 => _mm256_slli_epi16(v, 4),
        1 => _mm256_slli_epi16(v, 3),
        2 => _mm256_slli_epi16(v, 2),
        3 => _mm256_slli_epi16(v, 1),
        4 => v,
        5 => _mm256_srli_epi16(v, 1),
        6 => _mm256_srli_epi16(v, 2),
        _ => _mm256_srli_epi16(v, 3),
    }
}

/// From 16 signed byte scales (group g of 16 in byte g): per 32-element chunk c, the i16 scale
/// of group 2c in the low 128 bits and of 2c+1 in the high. The even groups' scales go to the
/// low half, the odd ones' to the high, sign-extended once; then one byte shuffle a chunk.
/// Plain loops, no closures: a closure does not inherit the target features, and intrinsics
/// left in one are not inlined.
#[target_feature(enable = "avx2")]
#[inline]
pub(crate) fn group_scales(sc8: __m128i) -> [__m256i; 8] {
    let eo = _mm_setr_epi8(0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15);
    let e = _mm256_cvtepi8_epi16(_mm_shuffle_epi8(sc8, eo));
    let mut v = [_mm256_setzero_si256(); 8];
    for (c, out) in v.iter_mut().enumerate() {
        *out = _mm256_shuffle_epi8(e, _mm256_set1_epi16((0x0100 + 0x0202 * c) as i16));
    }
    v
}

impl SumsK for BlockQ6K {
    row_z!();
    #[inline(always)]
    unsafe fn decode(&self) -> DecodedK {
        // SAFETY: AVX2 is available (contract); loads are 32 bytes inside ql / qh and 16
        // bytes of scales.
        unsafe {
            let m4 = _mm256_set1_epi8(0x0f);
            let m2 = _mm256_set1_epi8(0x30);
            let mut q = [_mm256_setzero_si256(); 8];
            for h in 0..2 {
                let ql0 = load256(&self.ql[64 * h..]);
                let ql1 = load256(&self.ql[64 * h + 32..]);
                let qh = load256(&self.qh[32 * h..]);
                // bits 2k..2k+1 of qh to bits 4..5 (qh << 4, qh << 2, qh, qh >> 2 in 16-bit
                // lanes; the mask 0x30 drops what crossed a byte boundary)
                let top = [
                    _mm256_and_si256(_mm256_slli_epi16(qh, 4), m2),
                    _mm256_and_si256(_mm256_slli_epi16(qh, 2), m2),
                    _mm256_and_si256(qh, m2),
                    _mm256_and_si256(_mm256_srli_epi16(qh, 2), m2),
                ];
                q[4 * h] = _mm256_or_si256(_mm256_and_si256(ql0, m4), top[0]);
                q[4 * h + 1] = _mm256_or_si256(_mm256_and_si256(ql1, m4), top[1]);
                q[4 * h + 2] =
                    _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(ql0, 4), m4), top[2]);
                q[4 * h + 3] =
                    _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(ql1, 4), m4), top[3]);
            }
            // q[c] holds elements 32c..32c+32: its low 128 bits are group 2c, the high group
            // 2c+1 (groups of 16 share a scale).
            let sc = self.scales;
            let scv = _mm_loadu_si128(sc.as_ptr() as *const __m128i);
            // scale[c] = [sc[2c] x 8 | sc[2c+1] x 8] as i16
            let scale = group_scales(scv);
            DecodedK {
                q,
                scale,
                bsum_mul: _mm256_cvtepi8_epi16(scv),
            }
        }
    }
    #[inline(always)]
    unsafe fn sums_decoded(&self, d: &DecodedK, x: &BlockQ8K) -> (i32, i32) {
        // SAFETY: AVX2 is available (contract).
        let (isum, bias) = unsafe { sums_k(d, x) };
        // Σ sc (q - 32) x = Σ sc q x - 32 Σ sc bsum (exact integers).
        (isum - 32 * bias, 0)
    }
}

/// `reference::dot_block_k` for R activation rows at once, integer sums in AVX2 (each
/// super-block decoded once), float part the reference's.
///
/// # Safety
/// AVX2 must be available; every `x[r]` has at least `w.len()` blocks.
#[target_feature(enable = "avx2")]
pub unsafe fn dot_block_k<W: SumsK, const R: usize>(w: &[W], x: [&[BlockQ8K]; R]) -> [f32; R] {
    // SAFETY: the caller's contract is this function's.
    unsafe { block_k::<W, R, false>(w, x) }
}

/// `dot_block_k` prefetching the weights ahead (`prefetch_ahead`), for long rows at M = 1.
///
/// # Safety
/// As `dot_block_k`.
#[target_feature(enable = "avx2")]
pub unsafe fn dot_block_k_prefetch<W: SumsK, const R: usize>(
    w: &[W],
    x: [&[BlockQ8K]; R],
) -> [f32; R] {
    // SAFETY: the caller's contract is this function's.
    unsafe { block_k::<W, R, true>(w, x) }
}

#[target_feature(enable = "avx2")]
#[inline]
unsafe fn block_k<W: SumsK, const R: usize, const PF: bool>(
    w: &[W],
    x: [&[BlockQ8K]; R],
) -> [f32; R] {
    let mut acc = [[0.0f32; LANES]; R];
    for (b, wb) in w.iter().enumerate() {
        if PF {
            prefetch_ahead(std::slice::from_ref(wb));
        }
        // SAFETY: AVX2, the caller's contract (`cpu::has_avx2`).
        let q = unsafe { wb.decode() };
        let (d, dmin) = wb.d_dmin();
        for r in 0..R {
            let xb = &x[r][b];
            // SAFETY: AVX2 (contract); q is wb.decode().
            let (isum, msum) = unsafe { wb.sums_decoded(&q, xb) };
            acc[r][b % LANES] += r::block_k_product(d, dmin, xb.d, isum, msum);
        }
    }
    acc.map(|a| r::hsum8(&a))
}
