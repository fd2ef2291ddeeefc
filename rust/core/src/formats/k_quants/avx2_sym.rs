//! AVX2 copies of the symmetric sub-block searches: `make_qx_quants(16, 32, x, L, 1, qw)` of
//! q6_K and `make_q3_quants(16, 4, x, L, true)` of q3_K (no imatrix), for the 16 sub-blocks of
//! a super-block in the lanes of two ymm registers (lane `k` of register `r` = sub-block
//! `8r + k`). Each lane runs the scalar sequence of `common::make_qx_quants` /
//! `common::make_q3_quants` operation for operation, under the rules of `avx2.rs` (ggml's
//! `nearest_int` bit trick, no FMA, IEEE division, ordered quiet comparisons, blends of values
//! the scalar code computes). The rest of the block (`q6_k::finish_block`,
//! `q3_k::finish_block_ref`) is shared with the references.
//!
//! Only called after `cpu::avx2_detected()` (see `fast.rs`).

use std::arch::x86_64::*;

use super::common::sum_sq;
use super::common::GROUP_MAX_EPS;
use super::q3_k::{finish_block_impl_with as q3_finish_impl, finish_block_ref_with as q3_finish};
use super::q6_k::finish_block;
use crate::formats::blocks::BlockQ3K;
use crate::formats::blocks::{BlockQ6K, QK_K};

#[inline]
#[target_feature(enable = "avx2")]
fn load(a: &[f32; 8]) -> __m256 {
    // SAFETY: `a` is a valid, readable [f32; 8]: exactly the 32 bytes loadu reads (unaligned).
    unsafe { _mm256_loadu_ps(a.as_ptr()) }
}

/// `MAX(-nmax, MIN(nmax-1, nearest_int(v)))` as f32.
#[inline]
#[target_feature(enable = "avx2")]
fn level(v: __m256, lo: __m256i, hi: __m256i) -> __m256 {
    let t = _mm256_add_ps(v, _mm256_set1_ps(12_582_912.0));
    let bits = _mm256_and_si256(_mm256_castps_si256(t), _mm256_set1_epi32(0x007f_ffff));
    let l = _mm256_sub_epi32(bits, _mm256_set1_epi32(0x0040_0000));
    _mm256_cvtepi32_ps(_mm256_max_epi32(_mm256_min_epi32(l, hi), lo))
}

/// `make_qx_quants(16, nmax, x, L, 1, w)` for 16 sub-blocks: `x[i][r]`, `w[i][r]` hold
/// element `i` of sub-blocks `8r..8r+8`. Returns the scales; `l_out[16*s + i]` gets the level
/// (`l + nmax`) of element `i` of sub-block `s`.
#[inline]
#[target_feature(enable = "avx2")]
fn qx_lanes(
    nmax: i32,
    x: &[[__m256; 2]; 16],
    w: &[[__m256; 2]; 16],
    l_out: &mut [i8; QK_K],
) -> [f32; 16] {
    let zero = _mm256_setzero_ps();
    let abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fff_ffff));
    let (lo, hi) = (_mm256_set1_epi32(-nmax), _mm256_set1_epi32(nmax - 1));
    let mut amax = [zero; 2];
    let mut max = [zero; 2];
    for xi in x {
        for r in 0..2 {
            let ax = _mm256_and_ps(xi[r], abs_mask);
            let gt = _mm256_cmp_ps::<_CMP_GT_OQ>(ax, amax[r]);
            amax[r] = _mm256_blendv_ps(amax[r], ax, gt);
            max[r] = _mm256_blendv_ps(max[r], xi[r], gt);
        }
    }
    let mut zero_group = [zero; 2];
    let mut iscale = [zero; 2];
    for r in 0..2 {
        zero_group[r] = _mm256_cmp_ps::<_CMP_LT_OQ>(amax[r], _mm256_set1_ps(GROUP_MAX_EPS));
        iscale[r] = _mm256_div_ps(_mm256_set1_ps(-(nmax as f32)), max[r]);
    }
    let mut lbest = [[zero; 2]; 16];
    let (mut sumlx, mut suml2) = ([zero; 2], [zero; 2]);
    for i in 0..16 {
        for r in 0..2 {
            let l = level(_mm256_mul_ps(iscale[r], x[i][r]), lo, hi);
            lbest[i][r] = l;
            sumlx[r] = _mm256_add_ps(sumlx[r], _mm256_mul_ps(_mm256_mul_ps(w[i][r], x[i][r]), l));
            suml2[r] = _mm256_add_ps(suml2[r], _mm256_mul_ps(_mm256_mul_ps(w[i][r], l), l));
        }
    }
    let mut scale = [zero; 2];
    let mut best = [zero; 2];
    for r in 0..2 {
        // suml2 ? sumlx/suml2 : 0 (a NaN counts as true, as in C)
        let is_zero = _mm256_cmp_ps::<_CMP_EQ_OQ>(suml2[r], zero);
        scale[r] = _mm256_blendv_ps(_mm256_div_ps(sumlx[r], suml2[r]), zero, is_zero);
        best[r] = _mm256_mul_ps(scale[r], sumlx[r]);
    }
    let mut laux = [[zero; 2]; 16];
    for is in -9..=9 {
        if is == 0 {
            continue;
        }
        let num = _mm256_set1_ps(-(nmax as f32 + 0.1 * is as f32));
        for r in 0..2 {
            iscale[r] = _mm256_div_ps(num, max[r]);
        }
        let (mut sumlx, mut suml2) = ([zero; 2], [zero; 2]);
        for i in 0..16 {
            for r in 0..2 {
                let l = level(_mm256_mul_ps(iscale[r], x[i][r]), lo, hi);
                laux[i][r] = l;
                let wx = _mm256_mul_ps(w[i][r], x[i][r]);
                sumlx[r] = _mm256_add_ps(sumlx[r], _mm256_mul_ps(wx, l));
                suml2[r] = _mm256_add_ps(suml2[r], _mm256_mul_ps(_mm256_mul_ps(w[i][r], l), l));
            }
        }
        for r in 0..2 {
            let pos = _mm256_cmp_ps::<_CMP_GT_OQ>(suml2[r], zero);
            let better = _mm256_cmp_ps::<_CMP_GT_OQ>(
                _mm256_mul_ps(sumlx[r], sumlx[r]),
                _mm256_mul_ps(best[r], suml2[r]),
            );
            let take = _mm256_and_ps(pos, better);
            if _mm256_movemask_ps(take) != 0 {
                let new_scale = _mm256_div_ps(sumlx[r], suml2[r]);
                scale[r] = _mm256_blendv_ps(scale[r], new_scale, take);
                best[r] = _mm256_blendv_ps(best[r], _mm256_mul_ps(new_scale, sumlx[r]), take);
                for l in laux.iter().zip(lbest.iter_mut()) {
                    l.1[r] = _mm256_blendv_ps(l.1[r], l.0[r], take);
                }
            }
        }
    }
    let mut scales = [0f32; 16];
    let offset = _mm256_set1_epi32(nmax);
    for r in 0..2 {
        let s = _mm256_blendv_ps(scale[r], zero, zero_group[r]);
        // SAFETY: `scales[8r..8r+8]` is 8 valid, writable f32: the 32 bytes storeu writes.
        unsafe { _mm256_storeu_ps(scales[8 * r..].as_mut_ptr(), s) };
        for i in 0..16 {
            let l = _mm256_add_epi32(_mm256_cvttps_epi32(lbest[i][r]), offset);
            let l = _mm256_andnot_si256(_mm256_castps_si256(zero_group[r]), l);
            let mut li = [0i32; 8];
            // SAFETY: `li` is a valid, writable [i32; 8]: the 32 bytes storeu writes.
            unsafe { _mm256_storeu_si256(li.as_mut_ptr().cast(), l) };
            for k in 0..8 {
                l_out[16 * (8 * r + k) + i] = li[k] as i8;
            }
        }
    }
    scales
}

/// `quantize_row_q6_K_ref` (`qw = None`, weights x^2) or `quantize_row_q6_K_impl` (`qw`),
/// bit-exact, with the sub-block searches in AVX2.
#[target_feature(enable = "avx2")]
pub fn quantize_row_q6_k(x: &[f32], out: &mut [u8], qw: Option<&[f32]>) {
    let blocks: &mut [BlockQ6K] = bytemuck::cast_slice_mut(out);
    let mut l_all = [0i8; QK_K];
    for (ib, (b, xs)) in blocks.iter_mut().zip(x.chunks_exact(QK_K)).enumerate() {
        let mut t = [[[0f32; 8]; 2]; 16];
        let mut tw = t;
        for s in 0..16 {
            for i in 0..16 {
                let v = xs[16 * s + i];
                t[i][s / 8][s % 8] = v;
                tw[i][s / 8][s % 8] = match qw {
                    Some(w) => w[QK_K * ib + 16 * s + i],
                    None => v * v,
                };
            }
        }
        let xl: [[__m256; 2]; 16] = std::array::from_fn(|i| [load(&t[i][0]), load(&t[i][1])]);
        let wl: [[__m256; 2]; 16] = std::array::from_fn(|i| [load(&tw[i][0]), load(&tw[i][1])]);
        let scales = qx_lanes(32, &xl, &wl, &mut l_all);
        finish_block(xs, &scales, &mut l_all, b);
    }
}

/// `make_q3_quants(16, nmax, x, L, true)` for 16 sub-blocks (layout as `qx_lanes`): x^2
/// weights, then up to 5 rounds of single-level moves. A lane whose scalar loop would have
/// stopped (a round without a change) keeps running with the others, but such a round changes
/// nothing (its state is the one that just produced no change), so its result is the scalar one.
#[inline]
#[target_feature(enable = "avx2")]
fn q3_lanes(nmax: i32, x: &[[__m256; 2]; 16], l_out: &mut [i8; QK_K]) -> [f32; 16] {
    let zero = _mm256_setzero_ps();
    let abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fff_ffff));
    let (lo, hi) = (_mm256_set1_epi32(-nmax), _mm256_set1_epi32(nmax - 1));
    let mut amax = [zero; 2];
    let mut max = [zero; 2];
    for xi in x {
        for r in 0..2 {
            let ax = _mm256_and_ps(xi[r], abs_mask);
            let gt = _mm256_cmp_ps::<_CMP_GT_OQ>(ax, amax[r]);
            amax[r] = _mm256_blendv_ps(amax[r], ax, gt);
            max[r] = _mm256_blendv_ps(max[r], xi[r], gt);
        }
    }
    let mut zero_group = [zero; 2];
    let mut iscale = [zero; 2];
    for r in 0..2 {
        zero_group[r] = _mm256_cmp_ps::<_CMP_LT_OQ>(amax[r], _mm256_set1_ps(GROUP_MAX_EPS));
        iscale[r] = _mm256_div_ps(_mm256_set1_ps(-(nmax as f32)), max[r]);
    }
    // w = x*x and w*x, as the scalar loop computes them each time
    let w: [[__m256; 2]; 16] = std::array::from_fn(|i| {
        [
            _mm256_mul_ps(x[i][0], x[i][0]),
            _mm256_mul_ps(x[i][1], x[i][1]),
        ]
    });
    let mut l = [[zero; 2]; 16];
    let (mut sumlx, mut suml2) = ([zero; 2], [zero; 2]);
    for i in 0..16 {
        for r in 0..2 {
            let li = level(_mm256_mul_ps(iscale[r], x[i][r]), lo, hi);
            l[i][r] = li;
            let wx = _mm256_mul_ps(w[i][r], x[i][r]);
            sumlx[r] = _mm256_add_ps(sumlx[r], _mm256_mul_ps(wx, li));
            suml2[r] = _mm256_add_ps(suml2[r], _mm256_mul_ps(_mm256_mul_ps(w[i][r], li), li));
        }
    }
    for _ in 0..5 {
        let mut changed = [zero; 2];
        for i in 0..16 {
            for r in 0..2 {
                let (wi, xi, li) = (w[i][r], x[i][r], l[i][r]);
                let wx = _mm256_mul_ps(wi, xi);
                let slx = _mm256_sub_ps(sumlx[r], _mm256_mul_ps(wx, li));
                let c1 = _mm256_cmp_ps::<_CMP_GT_OQ>(slx, zero);
                let sl2 = _mm256_sub_ps(suml2[r], _mm256_mul_ps(_mm256_mul_ps(wi, li), li));
                let new_l = level(_mm256_div_ps(_mm256_mul_ps(xi, sl2), slx), lo, hi);
                let c2 = _mm256_cmp_ps::<_CMP_NEQ_OQ>(new_l, li);
                let slx2 = _mm256_add_ps(slx, _mm256_mul_ps(wx, new_l));
                let sl2b = _mm256_add_ps(sl2, _mm256_mul_ps(_mm256_mul_ps(wi, new_l), new_l));
                let c3 = _mm256_cmp_ps::<_CMP_GT_OQ>(sl2b, zero);
                let c4 = _mm256_cmp_ps::<_CMP_GT_OQ>(
                    _mm256_mul_ps(_mm256_mul_ps(slx2, slx2), suml2[r]),
                    _mm256_mul_ps(_mm256_mul_ps(sumlx[r], sumlx[r]), sl2b),
                );
                let upd = _mm256_and_ps(_mm256_and_ps(c1, c2), _mm256_and_ps(c3, c4));
                l[i][r] = _mm256_blendv_ps(li, new_l, upd);
                sumlx[r] = _mm256_blendv_ps(sumlx[r], slx2, upd);
                suml2[r] = _mm256_blendv_ps(suml2[r], sl2b, upd);
                changed[r] = _mm256_or_ps(changed[r], upd);
            }
        }
        if _mm256_movemask_ps(_mm256_or_ps(changed[0], changed[1])) == 0 {
            break;
        }
    }
    let mut scales = [0f32; 16];
    let offset = _mm256_set1_epi32(nmax);
    for r in 0..2 {
        let pos = _mm256_cmp_ps::<_CMP_GT_OQ>(suml2[r], zero);
        let s = _mm256_and_ps(_mm256_div_ps(sumlx[r], suml2[r]), pos);
        let s = _mm256_blendv_ps(s, zero, zero_group[r]);
        // SAFETY: `scales[8r..8r+8]` is 8 valid, writable f32: the 32 bytes storeu writes.
        unsafe { _mm256_storeu_ps(scales[8 * r..].as_mut_ptr(), s) };
        for i in 0..16 {
            let li = _mm256_add_epi32(_mm256_cvttps_epi32(l[i][r]), offset);
            let li = _mm256_andnot_si256(_mm256_castps_si256(zero_group[r]), li);
            let mut v = [0i32; 8];
            // SAFETY: `v` is a valid, writable [i32; 8]: the 32 bytes storeu writes.
            unsafe { _mm256_storeu_si256(v.as_mut_ptr().cast(), li) };
            for k in 0..8 {
                l_out[16 * (8 * r + k) + i] = v[k] as i8;
            }
        }
    }
    scales
}

/// `quantize_row_q3_K_ref` (`qw = None`: `make_q3_quants`) or `quantize_row_q3_K_impl`
/// (`make_qx_quants` with weights `qw*sqrt(sigma2 + x^2)`, `sigma2 = 2*sum(x^2)/256`),
/// bit-exact, with the sub-block searches and the requantization in AVX2.
#[target_feature(enable = "avx2")]
pub fn quantize_row_q3_k(x: &[f32], out: &mut [u8], qw: Option<&[f32]>) {
    let blocks: &mut [BlockQ3K] = bytemuck::cast_slice_mut(out);
    let mut l_all = [0i8; QK_K];
    for (ib, (b, xs)) in blocks.iter_mut().zip(x.chunks_exact(QK_K)).enumerate() {
        let mut t = [[[0f32; 8]; 2]; 16];
        let mut tq = t;
        for s in 0..16 {
            for i in 0..16 {
                t[i][s / 8][s % 8] = xs[16 * s + i];
                if let Some(q) = qw {
                    tq[i][s / 8][s % 8] = q[QK_K * ib + 16 * s + i];
                }
            }
        }
        let xl: [[__m256; 2]; 16] = std::array::from_fn(|i| [load(&t[i][0]), load(&t[i][1])]);
        match qw {
            None => {
                let scales = q3_lanes(4, &xl, &mut l_all);
                q3_finish(xs, &scales, &l_all, b, |v, d, out| requantize16(v, d, out));
            }
            Some(_) => {
                let sigma2 = _mm256_set1_ps(2.0 * sum_sq(xs) / QK_K as f32);
                let mut wl = [[_mm256_setzero_ps(); 2]; 16];
                let mut sums = [_mm256_setzero_ps(); 2];
                for i in 0..16 {
                    for h in 0..2 {
                        let x2 = _mm256_mul_ps(xl[i][h], xl[i][h]);
                        let r = _mm256_sqrt_ps(_mm256_add_ps(sigma2, x2));
                        wl[i][h] = _mm256_mul_ps(load(&tq[i][h]), r);
                        sums[h] = _mm256_add_ps(sums[h], wl[i][h]);
                    }
                }
                let mut sw = [0f32; 16];
                for h in 0..2 {
                    // SAFETY: `sw[8h..8h+8]` is 8 valid, writable f32: the 32 bytes storeu writes.
                    unsafe { _mm256_storeu_ps(sw[8 * h..].as_mut_ptr(), sums[h]) };
                }
                let scales = qx_lanes(4, &xl, &wl, &mut l_all);
                q3_finish_impl(xs, &scales, &sw, &l_all, b, |v, d, out| {
                    requantize16(v, d, out)
                });
            }
        }
    }
}

/// `q3_k::requantize16` in two vectors: `clamp(nearest_int(x/d), -4, 3) + 4`.
#[inline]
#[target_feature(enable = "avx2")]
fn requantize16(xs: &[f32], d: f32, out: &mut [u8]) {
    let dv = _mm256_set1_ps(d);
    let (lo, hi) = (_mm256_set1_epi32(-4), _mm256_set1_epi32(3));
    for c in 0..2 {
        let v: &[f32; 8] = xs[8 * c..8 * c + 8].try_into().expect("8 values");
        let l = level(_mm256_div_ps(load(v), dv), lo, hi);
        let l = _mm256_add_epi32(_mm256_cvttps_epi32(l), _mm256_set1_epi32(4));
        let mut li = [0i32; 8];
        // SAFETY: `li` is a valid, writable [i32; 8]: the 32 bytes storeu writes.
        unsafe { _mm256_storeu_si256(li.as_mut_ptr().cast(), l) };
        for (o, v) in out[8 * c..8 * c + 8].iter_mut().zip(li) {
            *o = v as u8;
        }
    }
}
