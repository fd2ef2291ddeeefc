//! AVX-512 kernels of the q16 dot products (`reference/q16.rs`): nf4 and int8 weights against
//! 16-bit activations, `vpdpwssd` for the exact integer sums (32 products an instruction), one
//! conversion and one masked fused multiply-add per unit of 16 lanes.
//!
//! nf4: 32 packed bytes zero-extended to 16-bit lanes hold element 2j (high nibble) and 2j + 1
//! (low nibble) in lane j; `vpermw` looks both nibbles' 16-bit codes up, and `vpdpwssd` pairs
//! lanes 2i and 2i + 1, so with the activations split into even and odd elements
//! (`split_nf4_x`) 32-bit lane i sums elements 4i .. 4i + 3: the reference's lanes.
//! int8: 32 bytes sign-extended are elements in order, lane i sums elements 2i, 2i + 1.

use std::arch::x86_64::*;
use std::sync::OnceLock;

use super::{has_fma, has_vnni, lanes_of, prefetch_l2};
use crate::matmul::reference::q16::{inverse, NF4_CODE_I16, Q16, Q16_MAX, UNIT_INT8, UNIT_NF4};
use crate::matmul::reference::{self as r};

/// How far ahead (bytes) the kernels prefetch their weights into L2 (`_MM_HINT_T1`), at every
/// K: the hardware prefetchers alone leave a row stream well under the memory's rate (as for
/// the f32-activation kernels these replace: int8 2x faster with it).
const NF4_PREFETCH: usize = 8192;
const INT8_PREFETCH: usize = 8192;

/// True when the kernels here may run: AVX-512 F, BW and VNNI (with VL, AVX2 and FMA).
pub fn available() -> bool {
    static F: OnceLock<bool> = OnceLock::new();
    *F.get_or_init(|| {
        has_vnni()
            && has_fma()
            && std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512bw")
    })
}

/// The activations as `dot_nf4_q16_avx512` reads them: within every 64, the even elements,
/// then the odd ones (in place; rows are whole blocks of 64).
pub fn split_nf4_x(q: &mut [i16]) {
    for u in q.chunks_exact_mut(UNIT_NF4) {
        let v: [i16; UNIT_NF4] = std::array::from_fn(|i| u[i]);
        for j in 0..UNIT_NF4 / 2 {
            u[j] = v[2 * j];
            u[UNIT_NF4 / 2 + j] = v[2 * j + 1];
        }
    }
}

/// `reference::q16::quantize_row_q16` with AVX-512 (the same operations lane by lane: an
/// integer max of the magnitudes' bits, one multiply, truncation, the exact remainder against
/// ±0.5, a clamp), for nf4 (`split`) with each 64 split into even and odd elements as
/// `split_nf4_x` does.
///
/// # Safety
/// `available()`; `q.len() == q16_row_len(x.len())`, `d.len() == x.len().div_ceil(64)`.
#[target_feature(enable = "avx2,fma,avx512f,avx512bw,avx512vl,avx512vnni")]
pub unsafe fn quantize_row_q16_avx512(
    x: &[f32],
    per: f32,
    split: bool,
    q: &mut [i16],
    d: &mut [f32],
) {
    assert!(q.len() == x.len().div_ceil(Q16) * Q16 && d.len() == x.len().div_ceil(Q16));
    let evens: [i16; 32] = std::array::from_fn(|i| 2 * i as i16);
    let odds: [i16; 32] = std::array::from_fn(|i| 2 * i as i16 + 1);
    // SAFETY: 64 bytes each.
    let (ie, io) = unsafe {
        (
            _mm512_loadu_si512(evens.as_ptr() as *const _),
            _mm512_loadu_si512(odds.as_ptr() as *const _),
        )
    };
    let (lim, one) = (_mm512_set1_epi32(Q16_MAX as i32), _mm512_set1_epi32(1));
    let (half, nhalf) = (_mm512_set1_ps(0.5), _mm512_set1_ps(-0.5));
    for (b, (db, qb)) in d.iter_mut().zip(q.chunks_exact_mut(Q16)).enumerate() {
        let n = (x.len() - Q16 * b).min(Q16);
        // SAFETY: the masked loads read only the block's n values.
        let v: [__m512; 4] = std::array::from_fn(|j| unsafe {
            let m = ((1u32 << n.saturating_sub(16 * j).min(16)) - 1) as u16;
            _mm512_maskz_loadu_ps(m, x.as_ptr().add(Q16 * b + 16 * j))
        });
        let mag =
            v.map(|v| _mm512_and_si512(_mm512_castps_si512(v), _mm512_set1_epi32(0x7fff_ffff)));
        let top = _mm512_max_epu32(
            _mm512_max_epu32(mag[0], mag[1]),
            _mm512_max_epu32(mag[2], mag[3]),
        );
        let scale = f32::from_bits(_mm512_reduce_max_epu32(top)) / Q16_MAX;
        let inv = _mm512_set1_ps(inverse(scale));
        *db = scale / per;
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
        let (a, c) = if split {
            (
                _mm512_permutex2var_epi16(lo, ie, hi),
                _mm512_permutex2var_epi16(lo, io, hi),
            )
        } else {
            (lo, hi)
        };
        // SAFETY: qb is 64 values.
        unsafe {
            _mm512_storeu_si512(qb.as_mut_ptr() as *mut _, a);
            _mm512_storeu_si512(qb.as_mut_ptr().add(32) as *mut _, c);
        }
    }
}

/// The reference's final reduction of one row's two sets of 16 lanes (`hsum_q16`).
#[target_feature(enable = "avx2,avx512f")]
#[inline]
fn finish(acc: [__m512; 2]) -> f32 {
    let t = _mm512_add_ps(acc[0], acc[1]);
    let hi = _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(t), 1));
    r::hsum8(&lanes_of(_mm256_add_ps(_mm512_castps512_ps256(t), hi)))
}

/// `reference::q16::dot_nf4_q16` for R activation rows (prepared by `split_nf4_x`); `LONG`
/// prefetches the weights into L2 (rows past `LONG_K` at M = 1).
///
/// # Safety
/// `available()`; K = 2 · `packed.len()` a multiple of 32, `block_size` a power of two from 32
/// that divides K, `absmax.len() == K / block_size`, each `xq[r]` `q16_row_len(K)` values and
/// each `xd[r]` K.div_ceil(64).
#[target_feature(enable = "avx2,fma,avx512f,avx512bw,avx512vl,avx512vnni")]
pub unsafe fn dot_nf4_q16_avx512<const R: usize, const LONG: bool>(
    packed: &[u8],
    absmax: &[f32],
    block_size: usize,
    xq: [&[i16]; R],
    xd: [&[f32]; R],
) -> [f32; R] {
    let k = 2 * packed.len();
    let units = k.div_ceil(UNIT_NF4);
    assert!(k.is_multiple_of(32) && block_size >= 32 && block_size.is_power_of_two());
    assert!(absmax.len() * block_size == k);
    assert!(xq.iter().all(|x| x.len() == units * UNIT_NF4));
    assert!(xd.iter().all(|d| d.len() == units * UNIT_NF4 / Q16));
    let codes: [i16; 32] = std::array::from_fn(|i| NF4_CODE_I16[i % 16]);
    // SAFETY: 64 bytes.
    let table = unsafe { _mm512_loadu_si512(codes.as_ptr() as *const _) };
    let low4 = _mm512_set1_epi16(0x0f);
    let shift = block_size.trailing_zeros();
    let mut acc = [[_mm512_setzero_ps(); 2]; R];
    let w = packed.as_ptr();
    // The 16-bit codes of 32 packed bytes: even elements (high nibbles), odd (low nibbles).
    let decode = |b: __m256i| {
        let wq = _mm512_cvtepu8_epi16(b);
        (
            _mm512_permutexvar_epi16(_mm512_srli_epi16::<4>(wq), table),
            _mm512_permutexvar_epi16(_mm512_and_si512(wq, low4), table),
        )
    };
    // Unit u's absmax per lane (blocks of 32: lanes 0..8 in block 2u, 8..16 in block 2u + 1).
    let scale = |u: usize| {
        if block_size >= UNIT_NF4 {
            _mm512_set1_ps(absmax[(UNIT_NF4 * u) >> shift])
        } else {
            let a1 = absmax.get(2 * u + 1).copied().unwrap_or(0.0);
            _mm512_mask_blend_ps(0xff00, _mm512_set1_ps(absmax[2 * u]), _mm512_set1_ps(a1))
        }
    };
    let step = |u: usize, set: usize, acc: &mut [[__m512; 2]; R]| {
        let whole = 64 * u + 64 <= k;
        // SAFETY: unit u starts inside the row; a last half unit reads only its 16 bytes.
        let b = unsafe {
            if whole {
                _mm256_loadu_si256(w.add(32 * u) as *const __m256i)
            } else {
                _mm256_maskz_loadu_epi8(0xffff, w.add(32 * u) as *const i8)
            }
        };
        let (even, odd) = decode(b);
        let a = scale(u);
        let lanes: __mmask16 = if whole { 0xffff } else { 0x00ff };
        for r in 0..R {
            // SAFETY: xq[r] holds the whole units (asserted).
            let (xe, xo) = unsafe {
                let p = xq[r].as_ptr().add(UNIT_NF4 * u);
                (
                    _mm512_loadu_si512(p as *const _),
                    _mm512_loadu_si512(p.add(32) as *const _),
                )
            };
            let z = _mm512_setzero_si512();
            let s = _mm512_dpwssd_epi32(_mm512_dpwssd_epi32(z, xe, even), xo, odd);
            let sc = _mm512_mul_ps(a, _mm512_set1_ps(xd[r][u]));
            acc[r][set] = _mm512_mask3_fmadd_ps(_mm512_cvtepi32_ps(s), sc, acc[r][set], lanes);
        }
    };
    // Whole pairs of units (64 bytes) without the tail's masks; then the rest unit by unit.
    let pairs = k / (2 * UNIT_NF4);
    for g in 0..pairs {
        let u = 2 * g;
        prefetch_l2(w.wrapping_add(32 * u), 64, NF4_PREFETCH);
        // SAFETY: units u and u + 1 are whole: 64 bytes inside the row.
        let (b0, b1) = unsafe {
            let p = w.add(32 * u);
            (
                _mm256_loadu_si256(p as *const __m256i),
                _mm256_loadu_si256(p.add(32) as *const __m256i),
            )
        };
        let (e0, o0) = decode(b0);
        let (e1, o1) = decode(b1);
        let (a0, a1) = (scale(u), scale(u + 1));
        for r in 0..R {
            // SAFETY: xq[r] and xd[r] hold every unit (asserted).
            unsafe {
                let p = xq[r].as_ptr().add(UNIT_NF4 * u);
                let z = _mm512_setzero_si512();
                let x = |i: usize| _mm512_loadu_si512(p.add(32 * i) as *const _);
                let s0 = _mm512_dpwssd_epi32(_mm512_dpwssd_epi32(z, x(0), e0), x(1), o0);
                let s1 = _mm512_dpwssd_epi32(_mm512_dpwssd_epi32(z, x(2), e1), x(3), o1);
                let d = xd[r].as_ptr().add(u);
                let sc0 = _mm512_mul_ps(a0, _mm512_set1_ps(*d));
                let sc1 = _mm512_mul_ps(a1, _mm512_set1_ps(*d.add(1)));
                acc[r][0] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s0), sc0, acc[r][0]);
                acc[r][1] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s1), sc1, acc[r][1]);
            }
        }
    }
    let mut u = 2 * pairs;
    while u < units {
        step(u, u % 2, &mut acc);
        u += 1;
    }
    acc.map(|a| finish(a))
}

/// `reference::q16::dot_int8_q16` for R activation rows (as quantized, element order).
///
/// # Safety
/// `available()`; K = `q.len()` >= 1, `block_len` K or a power of two from 32 that divides K,
/// `scales.len() == K.div_ceil(block_len)`, each `xq[r]` `q16_row_len(K)` values and each
/// `xd[r]` K.div_ceil(64).
#[target_feature(enable = "avx2,fma,avx512f,avx512bw,avx512vl,avx512vnni")]
pub unsafe fn dot_int8_q16_avx512<const R: usize, const LONG: bool>(
    q: &[u8],
    scales: &[f32],
    block_len: usize,
    xq: [&[i16]; R],
    xd: [&[f32]; R],
) -> [f32; R] {
    let k = q.len();
    let units = k.div_ceil(UNIT_INT8);
    assert!(block_len >= k || (block_len >= 32 && block_len.is_power_of_two()));
    assert!(scales.len() == k.div_ceil(block_len));
    assert!(xq.iter().all(|x| x.len() == k.div_ceil(Q16) * Q16));
    assert!(xd.iter().all(|d| d.len() == k.div_ceil(Q16)));
    let (whole_row, shift) = (block_len >= k, block_len.trailing_zeros());
    let mut acc = [[_mm512_setzero_ps(); 2]; R];
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
    let pairs = k / (2 * UNIT_INT8);
    for g in 0..pairs {
        let u = 2 * g;
        prefetch_l2(w.wrapping_add(UNIT_INT8 * u), 64, INT8_PREFETCH);
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
    let mut u = 2 * pairs;
    while u < units {
        step(u, u % 2, &mut acc);
        u += 1;
    }
    acc.map(|a| finish(a))
}

#[cfg(test)]
mod tests;
