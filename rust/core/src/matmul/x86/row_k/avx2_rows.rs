//! M = 1 K-quant rows on AVX2 (the CPUs without AVX-512 VNNI, where `rows_k.rs` has no
//! prepared activations): all of a task's weight rows in one call, each row in groups of 8
//! super-blocks whose integer sums stay in vectors until the group's 8 are reduced together
//! (`t32y`, `t64y`, `lanes8y`), `block_k_product`'s float operations once per group for the 8
//! lanes (d / dmin by F16C, the activations' d from one array). Per lane the same operations as
//! `reference::dot_block_k` (super-block b in lane b % 8), so the same bits; the super-blocks
//! past the last whole group take `dot_block_k`'s per-block code. Safety rules as in `x86.rs`.

use std::arch::x86_64::*;

use super::super::{lanes_of, prefetch_ahead};
use super::group::{lanes8y, t32y, t64y};
use super::sums_k_lanes;
use super::vnni::RowK;
use super::DecodedK;
use crate::formats::blocks::*;
use crate::matmul::reference::{self as r, BlockQ8K, LANES};

#[cfg(test)]
thread_local! {
    /// Tests set this to take this kernel at M = 1 on a CPU with AVX-512 VNNI too.
    pub(crate) static FORCE: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Whether M = 1 takes the AVX-512 row kernel (the plan prepares its activations): the CPU has
/// AVX-512 VNNI and no test forces this kernel on this thread (`FORCE`).
pub fn vnni_rows_k() -> bool {
    #[cfg(test)]
    if FORCE.get() {
        return false;
    }
    crate::cpu::has_vnni_bw()
}

/// A super-block's integer sums with one activation block left in 8 i32 lanes each (no
/// horizontal sums): lanes summing to `SumsK::sums_decoded`'s (isum, msum); the `OFFSET_SHIFT`
/// formats fold their offset into the first and leave the second unused.
pub trait LanesK: RowK {
    /// # Safety
    /// AVX2 must be available; `d` comes from `self.decode()`.
    unsafe fn sums_lanes(d: &DecodedK, x: &BlockQ8K) -> (__m256i, __m256i);
}

macro_rules! lanes_min {
    ($($t:ty),*) => {$(
        impl LanesK for $t {
            #[inline(always)]
            unsafe fn sums_lanes(d: &DecodedK, x: &BlockQ8K) -> (__m256i, __m256i) {
                // SAFETY: the caller's contract.
                unsafe { sums_k_lanes(d, x) }
            }
        }
    )*};
}
lanes_min!(BlockQ2K, BlockQ4K, BlockQ5K);

/// q3_K (stored +4) and q6_K (+32): Σ sc u x - 2^s Σ sc bsum, as `sums_decoded` (exact).
macro_rules! lanes_offset {
    ($($t:ty => $s:literal),*) => {$(
        impl LanesK for $t {
            #[inline(always)]
            unsafe fn sums_lanes(d: &DecodedK, x: &BlockQ8K) -> (__m256i, __m256i) {
                // SAFETY: the caller's contract.
                unsafe {
                    let (a, m) = sums_k_lanes(d, x);
                    (_mm256_sub_epi32(a, _mm256_slli_epi32(m, $s)), m)
                }
            }
        }
    )*};
}
lanes_offset!(BlockQ3K => 2, BlockQ6K => 5);

impl LanesK for BlockIQ4XS {
    /// Signed values (-127..113): |q| times x with q's sign (pairs below 2 * 127 * 127).
    #[inline(always)]
    unsafe fn sums_lanes(d: &DecodedK, x: &BlockQ8K) -> (__m256i, __m256i) {
        // SAFETY: AVX2 (contract); loads are 32 bytes from 32b inside x.qs (256).
        unsafe {
            let mut acc = _mm256_setzero_si256();
            for b in 0..8 {
                let xv = _mm256_loadu_si256(x.qs[32 * b..].as_ptr() as *const __m256i);
                let w = d.q[b];
                let p16 = _mm256_maddubs_epi16(_mm256_sign_epi8(w, w), _mm256_sign_epi8(xv, w));
                acc = _mm256_add_epi32(acc, _mm256_madd_epi16(p16, d.scale[b]));
            }
            (acc, _mm256_setzero_si256())
        }
    }
}

/// `out[i]` = `reference::dot_block_k` of weight row i (`nb` super-blocks each, consecutive in
/// `w`) with the activation row `x`; `long`: prefetch the weights into L2 ahead.
///
/// # Safety
/// AVX2 and F16C must be available.
pub unsafe fn dot_rows_k_avx2<W: LanesK>(
    w: &[W],
    nb: usize,
    x: &[BlockQ8K],
    long: bool,
    out: &mut [f32],
) {
    assert!(
        nb > 0 && w.len() >= nb * out.len() && x.len() >= nb,
        "dot_rows_k_avx2: {} weight blocks, {} activation blocks for {} rows of {nb}",
        w.len(),
        x.len(),
        out.len()
    );
    // the activations' scales once per call: one load per group below
    let xd: Vec<f32> = x[..nb].iter().map(|b| b.d).collect();
    // SAFETY: the caller's contract; lengths checked above.
    unsafe {
        if long {
            rows::<W, true>(w, nb, x, &xd, out)
        } else {
            rows::<W, false>(w, nb, x, &xd, out)
        }
    }
}

/// # Safety
/// As `dot_rows_k_avx2`, lengths checked.
#[target_feature(enable = "avx2,f16c")]
unsafe fn rows<W: LanesK, const PF: bool>(
    w: &[W],
    nb: usize,
    x: &[BlockQ8K],
    xd: &[f32],
    out: &mut [f32],
) {
    for (o, row) in out.iter_mut().zip(w.chunks_exact(nb)) {
        // SAFETY: the caller's contract; x and xd have nb entries.
        *o = unsafe { row_k::<W, PF>(row, x, xd) };
    }
}

/// Super-blocks j and j + 1 of a group through `t32y` (sums, min sums).
///
/// # Safety
/// AVX2; `j + 1 < wg.len()`, `xg.len() >= wg.len()`.
#[inline(always)]
unsafe fn pair<W: LanesK>(wg: &[W], xg: &[BlockQ8K], j: usize) -> (__m256i, __m256i) {
    // SAFETY: AVX2 (contract); q is the block's decode.
    unsafe {
        let q0 = wg[j].decode();
        let (a0, m0) = W::sums_lanes(&q0, &xg[j]);
        let q1 = wg[j + 1].decode();
        let (a1, m1) = W::sums_lanes(&q1, &xg[j + 1]);
        let mins = if W::OFFSET_SHIFT.is_none() {
            t32y(m0, m1)
        } else {
            _mm256_setzero_si256()
        };
        (t32y(a0, a1), mins)
    }
}

/// Four super-blocks from j (`pair` twice, then `t64y`).
///
/// # Safety
/// As `pair`, `j + 3 < wg.len()`.
#[inline(always)]
unsafe fn quad<W: LanesK>(wg: &[W], xg: &[BlockQ8K], j: usize) -> (__m256i, __m256i) {
    // SAFETY: the caller's contract.
    unsafe {
        let (a0, m0) = pair(wg, xg, j);
        let (a1, m1) = pair(wg, xg, j + 2);
        (t64y(a0, a1), t64y(m0, m1))
    }
}

/// The f16 `d` and `dmin` (0 for the formats without a min) of a group's 8 super-blocks as
/// f32: eight 4-byte loads, one in-lane byte shuffle and one 64-bit permute.
///
/// # Safety
/// `wg` holds 8 blocks.
#[target_feature(enable = "avx2,f16c")]
#[inline]
unsafe fn group_halves<W: RowK>(wg: &[W]) -> (__m256, __m256) {
    debug_assert!(wg.len() >= LANES && W::HALF_OFF + 4 <= std::mem::size_of::<W>());
    let mut words = [0i32; LANES];
    for (j, v) in words.iter_mut().enumerate() {
        // SAFETY: HALF_OFF + 4 <= size_of::<W>() (RowK's doc), j < 8 <= wg.len().
        *v = unsafe {
            let p = (wg.as_ptr().add(j) as *const u8).add(W::HALF_OFF);
            std::ptr::read_unaligned(p as *const i32)
        };
    }
    // SAFETY: 32 bytes of `words`.
    let v = unsafe { _mm256_loadu_si256(words.as_ptr() as *const __m256i) };
    // per 128-bit lane: the 4 d (bytes 0..8), then the 4 dmin (8..16)
    let (d0, m0) = if W::D_HIGH { (2, 0) } else { (0, 2) };
    let mut idx = [0i8; 32];
    for k in 0..4 {
        for b in 0..2 {
            for l in 0..2 {
                idx[16 * l + 2 * k + b] = (4 * k + d0 + b) as i8;
                idx[16 * l + 8 + 2 * k + b] = (4 * k + m0 + b) as i8;
            }
        }
    }
    // SAFETY: 32 bytes of `idx`.
    let idx = unsafe { _mm256_loadu_si256(idx.as_ptr() as *const __m256i) };
    // [d0..3 | dmin0..3 | d4..7 | dmin4..7] -> [d0..7 | dmin0..7]
    let h = _mm256_permute4x64_epi64::<0b11_01_10_00>(_mm256_shuffle_epi8(v, idx));
    let d = _mm256_cvtph_ps(_mm256_castsi256_si128(h));
    if W::OFFSET_SHIFT.is_some() {
        (d, _mm256_setzero_ps())
    } else {
        (d, _mm256_cvtph_ps(_mm256_extracti128_si256::<1>(h)))
    }
}

/// One weight row (`w.len()` super-blocks) with the activation row.
///
/// # Safety
/// `x` and `xd` have at least `w.len()` entries.
#[target_feature(enable = "avx2,f16c")]
#[inline]
unsafe fn row_k<W: LanesK, const PF: bool>(w: &[W], x: &[BlockQ8K], xd: &[f32]) -> f32 {
    let nb = w.len();
    let groups = nb / LANES;
    let mut acc = _mm256_setzero_ps();
    for g in 0..groups {
        let wg = &w[g * LANES..g * LANES + LANES];
        let xg = &x[g * LANES..g * LANES + LANES];
        if PF {
            prefetch_ahead(&wg[..LANES / 2]);
        }
        // SAFETY: AVX2 (this function's feature); wg and xg hold 8 blocks.
        let (lo, mlo) = unsafe { quad(wg, xg, 0) };
        if PF {
            prefetch_ahead(&wg[LANES / 2..]);
        }
        // SAFETY: as above.
        let (hi, mhi) = unsafe { quad(wg, xg, 4) };
        // SAFETY: wg is 8 blocks.
        let (dw, dmin) = unsafe { group_halves(wg) };
        let xdg = &xd[g * LANES..g * LANES + LANES];
        // SAFETY: 8 floats (a checked slice).
        let xdv = unsafe { _mm256_loadu_ps(xdg.as_ptr()) };
        let is = _mm256_cvtepi32_ps(lanes8y(lo, hi));
        let ms = if W::OFFSET_SHIFT.is_none() {
            _mm256_cvtepi32_ps(lanes8y(mlo, mhi))
        } else {
            _mm256_setzero_ps()
        };
        // block_k_product: (d·xd)·isum - (dmin·xd)·msum, then acc += p
        let p = _mm256_sub_ps(
            _mm256_mul_ps(_mm256_mul_ps(dw, xdv), is),
            _mm256_mul_ps(_mm256_mul_ps(dmin, xdv), ms),
        );
        acc = _mm256_add_ps(acc, p);
    }
    let mut lanes = lanes_of(acc);
    for b in groups * LANES..nb {
        let wb = &w[b];
        // SAFETY: AVX2 (this function's feature).
        let q = unsafe { wb.decode() };
        let (d, dmin) = wb.d_dmin();
        // SAFETY: AVX2 (this function's feature); q is wb.decode().
        let (isum, msum) = unsafe { wb.sums_decoded(&q, &x[b]) };
        lanes[b % LANES] += r::block_k_product(d, dmin, x[b].d, isum, msum);
    }
    r::hsum8(&lanes)
}
