//! The panel kernels of `packed.rs` with AVX-512 VNNI on 256-bit vectors (one lane per weight
//! row of the panel). The arithmetic is the module comment's, each operation one vector
//! operation for the 8 rows.
//!
//! Safety of both kernels: AVX2, F16C and AVX-512F/VL/VNNI must be available (`cpu::has_vnni`); `w`
//! holds at least `x.len()` blocks of `BLOCK_BYTES`; `xd` and `xb` have `x.len()` entries (for
//! every row of `x`).

use std::arch::x86_64::*;

use super::BLOCK_BYTES;
use crate::formats::blocks::BlockQ8_0;

/// Lane `i` = weight row i's `(d_w · d_x) · isum` of one block (`wb`: its BLOCK_BYTES).
#[target_feature(enable = "avx2,f16c,avx512f,avx512vl,avx512vnni")]
#[inline]
unsafe fn block(wv: &[__m256i; 8], dw: __m256, x: &BlockQ8_0, xd: f32, xb: i32) -> __m256 {
    let xp = x.qs.as_ptr() as *const i32;
    // Two chains of four products (latency), added exactly in i32.
    let (mut i0, mut i1) = (_mm256_setzero_si256(), _mm256_setzero_si256());
    for t in 0..4 {
        // SAFETY: t + 4 < 8 four-byte words inside the 32 quants (unaligned reads).
        let (x0, x1) = unsafe {
            (
                _mm256_set1_epi32(xp.add(t).read_unaligned()),
                _mm256_set1_epi32(xp.add(t + 4).read_unaligned()),
            )
        };
        i0 = _mm256_dpbusd_epi32(i0, wv[t], x0);
        i1 = _mm256_dpbusd_epi32(i1, wv[t + 4], x1);
    }
    let isum = _mm256_sub_epi32(_mm256_add_epi32(i0, i1), _mm256_set1_epi32(xb));
    _mm256_mul_ps(
        _mm256_mul_ps(dw, _mm256_set1_ps(xd)),
        _mm256_cvtepi32_ps(isum),
    )
}

/// The 8 quant vectors and the 8 scales of the block at `wb`.
#[target_feature(enable = "avx2,f16c")]
#[inline]
unsafe fn load(wb: *const u8) -> ([__m256i; 8], __m256) {
    let mut wv = [_mm256_setzero_si256(); 8];
    for (t, v) in wv.iter_mut().enumerate() {
        // SAFETY: the block has BLOCK_BYTES = 8 x 32 + 16 bytes (caller's contract).
        *v = unsafe { _mm256_loadu_si256(wb.add(32 * t) as *const __m256i) };
    }
    // SAFETY: as above: the 16 scale bytes follow the quants.
    let dw = _mm256_cvtph_ps(unsafe { _mm_loadu_si128(wb.add(256) as *const __m128i) });
    (wv, dw)
}

/// ((a0 + a4) + (a2 + a6)) + ((a1 + a5) + (a3 + a7)), lane by lane.
#[target_feature(enable = "avx2")]
#[inline]
fn tree(a: &[__m256; 8]) -> [f32; 8] {
    let s0 = _mm256_add_ps(a[0], a[4]);
    let s1 = _mm256_add_ps(a[1], a[5]);
    let s2 = _mm256_add_ps(a[2], a[6]);
    let s3 = _mm256_add_ps(a[3], a[7]);
    let v = _mm256_add_ps(_mm256_add_ps(s0, s2), _mm256_add_ps(s1, s3));
    let mut out = [0f32; 8];
    // SAFETY: out has room for 8 f32 (unaligned store).
    unsafe { _mm256_storeu_ps(out.as_mut_ptr(), v) };
    out
}

/// One panel with one activation row, blocks in order (block b into accumulator b % 8).
///
/// # Safety
/// See the module comment.
#[target_feature(enable = "avx2,f16c,avx512f,avx512vl,avx512vnni")]
pub unsafe fn panel1(w: &[u8], x: &[BlockQ8_0], xd: &[f32], xb: &[i32]) -> [f32; 8] {
    let nb = x.len();
    debug_assert!(w.len() >= nb * BLOCK_BYTES && xd.len() >= nb && xb.len() >= nb);
    let wp = w.as_ptr();
    let mut acc = [_mm256_setzero_ps(); 8];
    let mut b = 0;
    while b + 8 <= nb {
        for (l, a) in acc.iter_mut().enumerate() {
            // SAFETY: block b + l < nb is inside w (contract).
            let (wv, dw) = unsafe { load(wp.add((b + l) * BLOCK_BYTES)) };
            // SAFETY: features as this function's.
            let p = unsafe { block(&wv, dw, &x[b + l], xd[b + l], xb[b + l]) };
            *a = _mm256_add_ps(*a, p);
        }
        b += 8;
    }
    for (l, a) in acc.iter_mut().enumerate().take(nb - b) {
        // SAFETY: as above.
        let (wv, dw) = unsafe { load(wp.add((b + l) * BLOCK_BYTES)) };
        // SAFETY: features as this function's.
        let p = unsafe { block(&wv, dw, &x[b + l], xd[b + l], xb[b + l]) };
        *a = _mm256_add_ps(*a, p);
    }
    tree(&acc)
}

/// One panel with R activation rows (the weights loaded once for all of them), lane by lane:
/// accumulator l of a row takes blocks l, l + 8, ... in order, as in `panel1`.
///
/// # Safety
/// See the module comment.
#[target_feature(enable = "avx2,f16c,avx512f,avx512vl,avx512vnni")]
pub unsafe fn panel_rows<const R: usize>(
    w: &[u8],
    x: [&[BlockQ8_0]; R],
    xd: [&[f32]; R],
    xb: [&[i32]; R],
) -> [[f32; 8]; R] {
    let nb = x[0].len();
    debug_assert!(w.len() >= nb * BLOCK_BYTES);
    debug_assert!((0..R).all(|r| x[r].len() == nb && xd[r].len() >= nb && xb[r].len() >= nb));
    let wp = w.as_ptr();
    let mut lanes = [[_mm256_setzero_ps(); 8]; R];
    // Indexed: lane l of every row (clippy's iterator form would need a transposed array).
    #[allow(clippy::needless_range_loop)]
    for l in 0..8.min(nb) {
        let mut acc = [_mm256_setzero_ps(); R];
        let mut b = l;
        while b < nb {
            // SAFETY: block b < nb is inside w (contract).
            let (wv, dw) = unsafe { load(wp.add(b * BLOCK_BYTES)) };
            for r in 0..R {
                // SAFETY: features as this function's; block b of row r exists.
                let p = unsafe { block(&wv, dw, &x[r][b], xd[r][b], xb[r][b]) };
                acc[r] = _mm256_add_ps(acc[r], p);
            }
            b += 8;
        }
        for r in 0..R {
            lanes[r][l] = acc[r];
        }
    }
    let mut out = [[0f32; 8]; R];
    for r in 0..R {
        out[r] = tree(&lanes[r]);
    }
    out
}
