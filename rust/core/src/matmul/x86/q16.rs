//! AVX-512 kernels of the q16 dot products (`reference/q16.rs`): nf4 and int8 weights against
//! 16-bit activations, `vpdpwssd` for the exact integer sums (32 products an instruction), one
//! conversion and one masked fused multiply-add per unit of 16 lanes.
//!
//! nf4: 64 packed bytes (a unit of 128) as 32 words; shifted by 4, 0, 12 and 8 bits they index
//! (`vpermw` reads the low 5 bits) the codes of elements 4w, 4w + 1, 4w + 2 and 4w + 3, and
//! `vpdpwssd` adds words 2i and 2i + 1 of each, so with the activations in the same four runs
//! (`split_nf4_x`) 32-bit lane i sums elements 8i .. 8i + 7: the reference's lanes.
//! int8: 32 bytes sign-extended are elements in order, lane i sums elements 2i, 2i + 1.

use std::arch::x86_64::*;

use super::lanes_of;
use crate::matmul::reference::q16::{
    inverse, q16_row_len, NF4_CODE_I16, Q16, Q16_MAX, UNIT_INT8, UNIT_NF4,
};
use crate::matmul::reference::{self as r};

/// How far ahead (bytes) the kernels prefetch their weights into L2 (`_MM_HINT_T1`), at every
/// K: the hardware prefetchers alone leave a row stream well under the memory's rate (as for
/// the f32-activation kernels these replace: int8 2x faster with it). Whole rows take
/// `PREFETCH_ROWS`; long rows, read in pieces over panels of 4 rows (`qmatmul`), take
/// `PREFETCH_PANELS`, which reaches into the next panel's rows: K = 14336, one thread, from
/// memory, 2026-11-27 14:14 UTC (busy machine): int8 8 KiB 14.1 GB/s, 16 KiB 18.0, 32 KiB 19.6;
/// nf4 11.5, 13.8, 14.0. Whole rows of 4096: 8 KiB 26.5 / 15.4, 32 KiB 24.4 / 15.5.
pub const PREFETCH_ROWS: usize = 8192;
pub const PREFETCH_PANELS: usize = 32768;
/// Prefetch into L2 the line `ahead` bytes past `p` (a hint: an address past the data is never
/// dereferenced, so `wrapping_add` keeps it sound).
#[target_feature(enable = "avx2")]
#[inline]
fn prefetch_w(p: *const u8, ahead: usize) {
    _mm_prefetch::<_MM_HINT_T1>(p.wrapping_add(ahead) as *const i8);
}

/// The activations as `nf4_range` reads them, in place: within every 128, four runs
/// of 32 (run j holds elements 4w + j, w = 0..32), matching the codes the kernel looks up.
pub fn split_nf4_x(q: &mut [i16]) {
    for u in q.chunks_exact_mut(UNIT_NF4) {
        let v: [i16; UNIT_NF4] = std::array::from_fn(|i| u[i]);
        for (i, o) in u.iter_mut().enumerate() {
            *o = v[4 * (i % 32) + i / 32];
        }
    }
}

/// `reference::q16::quantize_row_q16` with AVX-512 (the same operations lane by lane: an
/// integer max of the magnitudes' bits, one multiply, truncation, the exact remainder against
/// ±0.5, a clamp). For nf4 (`nf4`) the values are laid out as `split_nf4_x` does.
///
/// # Safety
/// `cpu::has_vnni_q16()`; `q.len() == q16_row_len(x.len())`; `d.len() == q.len() / 64`.
#[target_feature(enable = "avx2,fma,avx512f,avx512bw,avx512vl,avx512vnni")]
pub unsafe fn quantize_row_q16_avx512(
    x: &[f32],
    per: f32,
    nf4: bool,
    q: &mut [i16],
    d: &mut [f32],
) {
    assert!(q.len() == q16_row_len(x.len()));
    assert!(d.len() == q.len() / Q16);
    // run j of a unit takes words 4w + j of the 64-word halves (low half: w < 16)
    let runs: [__m512i; 4] = std::array::from_fn(|j| {
        let idx: [i16; 32] = std::array::from_fn(|w| (4 * (w % 16) + j) as i16);
        // SAFETY: 64 bytes.
        unsafe { _mm512_loadu_si512(idx.as_ptr() as *const _) }
    });
    let (lim, one) = (_mm512_set1_epi32(Q16_MAX as i32), _mm512_set1_epi32(1));
    let (half, nhalf) = (_mm512_set1_ps(0.5), _mm512_set1_ps(-0.5));
    // One block of 64: its scale and its values as two registers of 32 words.
    let block = |b: usize| -> (f32, [__m512i; 2]) {
        let n = x.len().saturating_sub(Q16 * b).min(Q16);
        // SAFETY: the masked loads read only the block's n values.
        let v: [__m512; 4] = std::array::from_fn(|j| unsafe {
            let m = ((1u32 << n.saturating_sub(16 * j).min(16)) - 1) as u16;
            _mm512_maskz_loadu_ps(m, x.as_ptr().wrapping_add(Q16 * b + 16 * j))
        });
        let mag =
            v.map(|v| _mm512_and_si512(_mm512_castps_si512(v), _mm512_set1_epi32(0x7fff_ffff)));
        let top = _mm512_max_epu32(
            _mm512_max_epu32(mag[0], mag[1]),
            _mm512_max_epu32(mag[2], mag[3]),
        );
        let scale = f32::from_bits(_mm512_reduce_max_epu32(top)) / Q16_MAX;
        let inv = _mm512_set1_ps(inverse(scale));
        let qv = v.map(|v| {
            let t = _mm512_mul_ps(v, inv);
            let i = _mm512_cvttps_epi32(t);
            let f = _mm512_sub_ps(t, _mm512_cvtepi32_ps(i));
            let i = _mm512_mask_add_epi32(i, _mm512_cmp_ps_mask::<_CMP_GE_OQ>(f, half), i, one);
            let i = _mm512_mask_sub_epi32(i, _mm512_cmp_ps_mask::<_CMP_LE_OQ>(f, nhalf), i, one);
            let i = _mm512_max_epi32(
                _mm512_min_epi32(i, lim),
                _mm512_sub_epi32(_mm512_setzero_si512(), lim),
            );
            _mm512_cvtepi32_epi16(i)
        });
        let lo = _mm512_inserti64x4::<1>(_mm512_castsi256_si512(qv[0]), qv[1]);
        let hi = _mm512_inserti64x4::<1>(_mm512_castsi256_si512(qv[2]), qv[3]);
        (scale / per, [lo, hi])
    };
    for (u, qu) in q.chunks_exact_mut(UNIT_NF4).enumerate() {
        let (d0, v0) = block(2 * u);
        let (d1, v1) = block(2 * u + 1);
        let out = if nf4 {
            runs.map(|idx| {
                let a = _mm512_permutex2var_epi16(v0[0], idx, v0[1]);
                let b = _mm512_permutex2var_epi16(v1[0], idx, v1[1]);
                _mm512_mask_blend_epi16(0xffff_0000, a, b)
            })
        } else {
            [v0[0], v0[1], v1[0], v1[1]]
        };
        for (j, o) in out.iter().enumerate() {
            // SAFETY: qu is 128 values.
            unsafe { _mm512_storeu_si512(qu.as_mut_ptr().add(32 * j) as *mut _, *o) };
        }
        d[2 * u] = d0;
        d[2 * u + 1] = d1;
    }
}

/// `vpdpwssd` (acc + products of 16-bit pairs), kept as that one instruction: LLVM rewrites a
/// chain of `_mm512_dpwssd_epi32` starting from zero into `vpmaddwd` + `vpaddd`, three more
/// operations a unit on the pipes that bound the nf4 kernel.
///
/// # Safety
/// AVX-512 VNNI (the callers' `cpu::has_vnni_q16()`).
#[target_feature(enable = "avx512f,avx512vnni")]
#[inline]
pub(super) unsafe fn dpwssd(acc: __m512i, a: __m512i, b: __m512i) -> __m512i {
    let mut acc = acc;
    // SAFETY: a register-only instruction of a feature the caller guarantees.
    unsafe {
        std::arch::asm!(
            "vpdpwssd {acc}, {a}, {b}",
            acc = inout(zmm_reg) acc,
            a = in(zmm_reg) a,
            b = in(zmm_reg) b,
            options(pure, nomem, nostack, preserves_flags)
        )
    };
    acc
}

/// R dot products in progress: each row's two sets of 16 float lanes (a row can be computed in
/// pieces of K with the same operations in the same order as in one go).
#[derive(Clone, Copy)]
pub struct Lanes<const R: usize>([[__m512; 2]; R]);

impl<const R: usize> Lanes<R> {
    pub fn new() -> Self {
        // SAFETY: an all-zero __m512 is sixteen +0.0.
        Self(unsafe { std::mem::zeroed() })
    }

    /// The reference's final reduction of each row's lanes (`hsum_q16`).
    ///
    /// # Safety
    /// AVX-512 F (`cpu::has_vnni_q16()`).
    #[target_feature(enable = "avx2,avx512f")]
    pub unsafe fn finish(&self) -> [f32; R] {
        self.0.map(|a| {
            let t = _mm512_add_ps(a[0], a[1]);
            let hi = _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(t), 1));
            r::hsum8(&lanes_of(_mm256_add_ps(_mm512_castps512_ps256(t), hi)))
        })
    }
}

impl<const R: usize> Default for Lanes<R> {
    fn default() -> Self {
        Self::new()
    }
}

/// Units `range` (clamped to the row; starting even) of `reference::q16::dot_nf4_q16` for R
/// activation rows (laid out by `split_nf4_x`) into `acc`, the weights prefetched `ahead` bytes
/// ahead. Per unit of 128: one 64-byte load, three shifts, four `vpermw` (the low 5 bits of
/// each word index a table holding the 16 codes twice), four `vpdpwssd` per row, one
/// conversion, multiply and fused multiply-add per row.
///
/// # Safety
/// `cpu::has_vnni_q16()`; K = 2 · `packed.len()` a multiple of 32, `block_size` a power of two from 32
/// that divides K, `absmax.len() == K / block_size`, each `xq[r]` `q16_row_len(K)` values and
/// each `xd[r]` `q16_row_len(K) / 64`.
#[target_feature(enable = "avx2,fma,avx512f,avx512bw,avx512vl,avx512vnni")]
#[allow(clippy::too_many_arguments)]
unsafe fn nf4_range<const R: usize>(
    packed: &[u8],
    absmax: &[f32],
    block_size: usize,
    xq: [&[i16]; R],
    xd: [&[f32]; R],
    range: std::ops::Range<usize>,
    ahead: usize,
    acc: &mut Lanes<R>,
) {
    let (u0, u1) = (range.start, range.end);
    let k = 2 * packed.len();
    let units = k.div_ceil(UNIT_NF4);
    assert!(k.is_multiple_of(32) && block_size >= 32 && block_size.is_power_of_two());
    assert!(absmax.len() * block_size == k);
    assert!(xq.iter().all(|x| x.len() == units * UNIT_NF4));
    assert!(xd.iter().all(|d| d.len() == units * UNIT_NF4 / Q16));
    let codes: [i16; 32] = std::array::from_fn(|i| NF4_CODE_I16[i % 16]);
    // SAFETY: 64 bytes.
    let table = unsafe { _mm512_loadu_si512(codes.as_ptr() as *const _) };
    // The lanes' scales `absmax · xd`: the products of a unit's two halves (blocks of 64 and
    // more: one absmax block and one activation block each) or four quarters (blocks of 32) in
    // a 128-bit register, spread over the 16 lanes by one permute.
    let spread = if block_size == 32 {
        _mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3)
    } else {
        _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1)
    };
    let shift = block_size.trailing_zeros();
    let (u1, acc) = (u1.min(units), &mut acc.0);
    assert!(u0.is_multiple_of(2));
    let w = packed.as_ptr();
    // Unit u (`bytes` of it, 64 but for a last partial unit) into accumulator set `set`.
    let step = |u: usize, set: usize, bytes: usize, acc: &mut [[__m512; 2]; R]| {
        prefetch_w(w.wrapping_add(64 * u), ahead);
        // SAFETY: unit u starts inside the row; a last partial unit reads only its bytes.
        let raw = unsafe {
            if bytes == 64 {
                _mm512_loadu_si512(w.add(64 * u) as *const _)
            } else {
                _mm512_maskz_loadu_epi8((1u64 << bytes) - 1, w.add(64 * u) as *const i8)
            }
        };
        let c = [
            _mm512_permutexvar_epi16(_mm512_srli_epi16::<4>(raw), table),
            _mm512_permutexvar_epi16(raw, table),
            _mm512_permutexvar_epi16(_mm512_srli_epi16::<12>(raw), table),
            _mm512_permutexvar_epi16(_mm512_srli_epi16::<8>(raw), table),
        ];
        // the halves' (quarters') absmax: blocks of 64 two, of 32 four, larger one
        let a = if block_size >= UNIT_NF4 {
            _mm_set1_ps(absmax[(UNIT_NF4 * u) >> shift])
        } else {
            let per_unit = UNIT_NF4 >> shift;
            let first = per_unit * u;
            let m = ((1u32 << per_unit.min(absmax.len() - first)) - 1) as u8;
            // SAFETY: the masked load reads only this unit's absmax values.
            unsafe { _mm_maskz_loadu_ps(m, absmax.as_ptr().add(first)) }
        };
        for r in 0..R {
            // SAFETY: xq[r] and xd[r] hold every unit (asserted); VNNI available.
            let (s, d2) = unsafe {
                let p = xq[r].as_ptr().add(UNIT_NF4 * u);
                let x = |j: usize| _mm512_loadu_si512(p.add(32 * j) as *const _);
                let s = dpwssd(_mm512_setzero_si512(), x(0), c[0]);
                let s = dpwssd(dpwssd(dpwssd(s, x(1), c[1]), x(2), c[2]), x(3), c[3]);
                let d2 = _mm_load_sd(xd[r].as_ptr().add(2 * u) as *const f64);
                (s, _mm_castpd_ps(d2))
            };
            let d = if block_size == 32 {
                _mm_unpacklo_ps(d2, d2)
            } else {
                d2
            };
            let sc = _mm512_permutexvar_ps(spread, _mm512_castps128_ps512(_mm_mul_ps(a, d)));
            let f = _mm512_cvtepi32_ps(s);
            acc[r][set] = if bytes == 64 {
                _mm512_fmadd_ps(f, sc, acc[r][set])
            } else {
                let lanes = ((1u32 << (bytes / 4)) - 1) as u16;
                _mm512_mask3_fmadd_ps(f, sc, acc[r][set], lanes)
            };
        }
    };
    let whole = (k / UNIT_NF4).min(u1);
    let mut u = u0;
    while u + 2 <= whole {
        step(u, 0, 64, acc);
        step(u + 1, 1, 64, acc);
        u += 2;
    }
    if u < whole {
        step(u, 0, 64, acc);
        u += 1;
    }
    if u < u1 {
        step(u, u % 2, k / 2 - 64 * u, acc);
    }
}

/// Units `range` (clamped to the row; starting even) of `reference::q16::dot_int8_q16` for R
/// activation rows (as quantized, element order) into `acc`, the weights prefetched `ahead`
/// bytes ahead.
///
/// # Safety
/// `cpu::has_vnni_q16()`; K = `q.len()` >= 1, `block_len` K or a power of two from 32 that divides K,
/// `scales.len() == K.div_ceil(block_len)`, each `xq[r]` `q16_row_len(K)` values and each
/// `xd[r]` `q16_row_len(K) / 64`.
#[target_feature(enable = "avx2,fma,avx512f,avx512bw,avx512vl,avx512vnni")]
#[allow(clippy::too_many_arguments)]
unsafe fn int8_range<const R: usize>(
    q: &[u8],
    scales: &[f32],
    block_len: usize,
    xq: [&[i16]; R],
    xd: [&[f32]; R],
    range: std::ops::Range<usize>,
    ahead: usize,
    acc: &mut Lanes<R>,
) {
    let (u0, u1) = (range.start, range.end);
    let k = q.len();
    let units = k.div_ceil(UNIT_INT8);
    assert!(block_len >= k || (block_len >= 32 && block_len.is_power_of_two()));
    assert!(scales.len() == k.div_ceil(block_len));
    assert!(xq.iter().all(|x| x.len() == q16_row_len(k)));
    assert!(xd.iter().all(|d| d.len() == q16_row_len(k) / Q16));
    let (whole_row, shift) = (block_len >= k, block_len.trailing_zeros());
    let (u1, acc) = (u1.min(units), &mut acc.0);
    assert!(u0.is_multiple_of(2));
    let w = q.as_ptr();
    // Unit u's weight scale (a shift, not a division: one per unit cost more than the rest).
    let scale = |u: usize| {
        if whole_row {
            scales[0]
        } else {
            scales[(UNIT_INT8 * u) >> shift]
        }
    };
    let step = |u: usize, set: usize, acc: &mut [[__m512; 2]; R]| {
        let n = (k - UNIT_INT8 * u).min(UNIT_INT8);
        // SAFETY: unit u starts inside the row; a last partial unit reads only its n bytes.
        let b = unsafe {
            if n == UNIT_INT8 {
                _mm256_loadu_si256(w.add(UNIT_INT8 * u) as *const __m256i)
            } else {
                _mm256_maskz_loadu_epi8((1u32 << n) - 1, w.add(UNIT_INT8 * u) as *const i8)
            }
        };
        let wq = _mm512_cvtepi8_epi16(b);
        let sw = scale(u);
        let lanes: __mmask16 = if n == UNIT_INT8 {
            0xffff
        } else {
            ((1u32 << n.div_ceil(2)) - 1) as u16
        };
        for r in 0..R {
            // SAFETY: xq[r] holds the whole units (asserted; the padding is zero).
            let x = unsafe { _mm512_loadu_si512(xq[r].as_ptr().add(UNIT_INT8 * u) as *const _) };
            let s = _mm512_dpwssd_epi32(_mm512_setzero_si512(), x, wq);
            let sc = _mm512_set1_ps(sw * xd[r][UNIT_INT8 * u / Q16]);
            acc[r][set] = _mm512_mask3_fmadd_ps(_mm512_cvtepi32_ps(s), sc, acc[r][set], lanes);
        }
    };
    // Whole pairs of units (64 bytes) without the tail's masks; then the rest unit by unit.
    let pairs = (k / (2 * UNIT_INT8)).min(u1 / 2);
    for g in u0 / 2..pairs {
        let u = 2 * g;
        prefetch_w(w.wrapping_add(UNIT_INT8 * u), ahead);
        // SAFETY: units u and u + 1 are whole: 64 bytes inside the row.
        let (w0, w1) = unsafe {
            let p = w.add(UNIT_INT8 * u);
            (
                _mm512_cvtepi8_epi16(_mm256_loadu_si256(p as *const __m256i)),
                _mm512_cvtepi8_epi16(_mm256_loadu_si256(p.add(32) as *const __m256i)),
            )
        };
        let (s0, s1) = (scale(u), scale(u + 1));
        for r in 0..R {
            // SAFETY: xq[r] and xd[r] hold every unit (asserted).
            unsafe {
                let p = xq[r].as_ptr().add(UNIT_INT8 * u);
                let z = _mm512_setzero_si512();
                let i0 = _mm512_dpwssd_epi32(z, _mm512_loadu_si512(p as *const _), w0);
                let i1 = _mm512_dpwssd_epi32(z, _mm512_loadu_si512(p.add(32) as *const _), w1);
                let d = *xd[r].as_ptr().add(g);
                let (c0, c1) = (_mm512_set1_ps(s0 * d), _mm512_set1_ps(s1 * d));
                acc[r][0] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(i0), c0, acc[r][0]);
                acc[r][1] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(i1), c1, acc[r][1]);
            }
        }
    }
    let mut u = (2 * pairs).max(u0);
    while u < u1 {
        step(u, u % 2, acc);
        u += 1;
    }
}

/// `nf4_range` (nf4) or `int8_range` (int8): units `range` of weight row `w` (its `stats`:
/// absmax or scales, blocks of `block_len`) for R activation rows into `acc`.
///
/// # Safety
/// As for `nf4_range` / `int8_range`.
#[target_feature(enable = "avx2,fma,avx512f,avx512bw,avx512vl,avx512vnni")]
#[allow(clippy::too_many_arguments)]
pub unsafe fn q16_range<const R: usize>(
    nf4: bool,
    w: &[u8],
    stats: &[f32],
    block_len: usize,
    xq: [&[i16]; R],
    xd: [&[f32]; R],
    range: std::ops::Range<usize>,
    ahead: usize,
    acc: &mut Lanes<R>,
) {
    // SAFETY: the caller's contract.
    unsafe {
        if nf4 {
            nf4_range(w, stats, block_len, xq, xd, range, ahead, acc)
        } else {
            int8_range(w, stats, block_len, xq, xd, range, ahead, acc)
        }
    }
}

/// `reference::q16::dot_nf4_q16` (nf4) or `dot_int8_q16` (int8) of one whole weight row for R
/// activation rows.
///
/// # Safety
/// As for `nf4_range` / `int8_range`.
#[target_feature(enable = "avx2,fma,avx512f,avx512bw,avx512vl,avx512vnni")]
pub unsafe fn dot_q16_avx512<const R: usize>(
    nf4: bool,
    w: &[u8],
    stats: &[f32],
    block_len: usize,
    xq: [&[i16]; R],
    xd: [&[f32]; R],
) -> [f32; R] {
    let mut acc = Lanes::new();
    let all = 0..usize::MAX;
    // SAFETY: the caller's contract, over all the units.
    unsafe {
        q16_range(
            nf4,
            w,
            stats,
            block_len,
            xq,
            xd,
            all,
            PREFETCH_ROWS,
            &mut acc,
        )
    };
    acc.finish()
}

#[cfg(test)]
mod tests;
