//! AVX2 copy of `fast::qkx2_lanes`: the 8 sub-blocks of a super-block (q4_K, q5_K; for q2_K
//! 8 of its 16) in the 8 f32 lanes of a ymm register, every lane running the scalar sequence of
//! `common::make_qkx2_quants` (or `make_qkx3_quants` for the imatrix paths) operation for
//! operation:
//! - `nearest_int` is the same bit trick (`+ 1.5*2^23`, keep the mantissa bits, `- 2^22`);
//! - `vdivps`/`vsqrtps` round exactly like `divss`/`sqrtss` (IEEE, correctly rounded); no FMA is
//!   used, every product is rounded before it is added, as in the scalar code;
//! - comparisons are the ordered, quiet predicates (`_CMP_LT_OQ` ...) that C's `<`, `>`, `==`
//!   are, so a NaN takes the same side; `if`s become blends of values the scalar code would have
//!   computed, and a candidate the scalar code skips (`D <= 0`) is computed but discarded.
//!
//! Only called after `cpu::avx2_detected()` (see `fast.rs`).

use std::arch::x86_64::*;

use super::common::{get_scale_min_k4, sum_sq, AsymSearch};
use super::q2_k::{finish_block_impl, finish_block_ref, Q2K_IMPL, Q2K_REF};
use super::q4_k::{impl_scales, pack_q4, ref_scales, Q4K_REF, QK_IMPL};
use super::q5_k::{pack_q5, Q5K_REF};
use crate::formats::blocks::{f16_to_f32, BlockQ2K, BlockQ4K, BlockQ5K, Half, QK_K};

/// ggml's `nearest_int` on 8 lanes.
#[inline]
#[target_feature(enable = "avx2")]
fn nearest_int8(v: __m256) -> __m256i {
    let t = _mm256_add_ps(v, _mm256_set1_ps(12_582_912.0));
    let bits = _mm256_and_si256(_mm256_castps_si256(t), _mm256_set1_epi32(0x007f_ffff));
    _mm256_sub_epi32(bits, _mm256_set1_epi32(0x0040_0000))
}

/// `MAX(0, MIN(nmax, nearest_int(iscale*(x - min))))` as f32.
#[inline]
#[target_feature(enable = "avx2")]
fn level(iscale: __m256, x: __m256, min: __m256, nmax: __m256i) -> __m256 {
    let l = nearest_int8(_mm256_mul_ps(iscale, _mm256_sub_ps(x, min)));
    let l = _mm256_max_epi32(_mm256_min_epi32(l, nmax), _mm256_setzero_si256());
    _mm256_cvtepi32_ps(l)
}

#[inline]
#[target_feature(enable = "avx2")]
pub(super) fn load(a: &[f32; 8]) -> __m256 {
    // SAFETY: `a` is a valid, readable [f32; 8]: exactly the 32 bytes loadu reads (unaligned).
    unsafe { _mm256_loadu_ps(a.as_ptr()) }
}

#[inline]
#[target_feature(enable = "avx2")]
pub(super) fn store(a: &mut [f32; 8], v: __m256) {
    // SAFETY: `a` is a valid, writable [f32; 8]: exactly the 32 bytes storeu writes (unaligned).
    unsafe { _mm256_storeu_ps(a.as_mut_ptr(), v) }
}

/// `make_qkx3_quants`' candidate level: `v = iscale*(x - min)`,
/// `v > 0 ? nearest_int(v < nmax ? v : nmax) : 0`, as f32.
#[inline]
#[target_feature(enable = "avx2")]
fn level3(iscale: __m256, x: __m256, min: __m256, nmax: __m256) -> __m256 {
    let v = _mm256_mul_ps(iscale, _mm256_sub_ps(x, min));
    let c = _mm256_blendv_ps(nmax, v, _mm256_cmp_ps::<_CMP_LT_OQ>(v, nmax));
    let l = _mm256_cvtepi32_ps(nearest_int8(c));
    let pos = _mm256_cmp_ps::<_CMP_GT_OQ>(v, _mm256_setzero_ps());
    _mm256_and_ps(l, pos)
}

/// ggml's error term: `use_mad ? fabsf(diff) : diff*diff`.
#[inline]
#[target_feature(enable = "avx2")]
fn err<const MAD: bool>(diff: __m256) -> __m256 {
    if MAD {
        _mm256_and_ps(diff, _mm256_castsi256_ps(_mm256_set1_epi32(0x7fff_ffff)))
    } else {
        _mm256_mul_ps(diff, diff)
    }
}

/// `make_qkx2_quants(E, nmax, x, weights, ...)` for `N` registers of 8 sub-blocks of `E`
/// values: `x[i][b]`, `w[i][b]` hold element `i` of the 8 sub-blocks of register `b` (the 8
/// sub-blocks of a q4_K / q5_K super-block, or half of the 16 of a q2_K one). The registers are
/// independent; interleaving them hides the latency of the sequential sums. `MAD` is ggml's
/// `use_mad` (error |diff| instead of diff^2). `X3` selects `make_qkx3_quants` instead (the
/// imatrix paths): degenerate when `max <= min`, and candidate levels
/// `v > 0 ? nearest_int(MIN(v, nmax)) : 0`. Writes the levels to `lt[b][i]` (lane =
/// sub-block); returns (scales, -mins) per register.
#[inline]
#[target_feature(enable = "avx2")]
pub(super) fn qkx2_avx2<const N: usize, const E: usize, const MAD: bool, const X3: bool>(
    p: AsymSearch,
    x: &[[__m256; N]; E],
    w: &[[__m256; N]; E],
    lt: &mut [[[i32; 8]; E]; N],
) -> [([f32; 8], [f32; 8]); N] {
    debug_assert_eq!(p.use_mad, MAD);
    let zero = _mm256_setzero_ps();
    let nmax_i = _mm256_set1_epi32(p.nmax);
    let nmax_f = p.nmax as f32;
    let nmax_v = _mm256_set1_ps(nmax_f);

    let mut min = x[0];
    let mut max = x[0];
    let mut sum_w = w[0];
    let mut sum_x = [zero; N];
    for b in 0..N {
        sum_x[b] = _mm256_mul_ps(sum_w[b], x[0][b]);
    }
    for i in 1..E {
        for b in 0..N {
            let xi = x[i][b];
            min[b] = _mm256_blendv_ps(min[b], xi, _mm256_cmp_ps::<_CMP_LT_OQ>(xi, min[b]));
            max[b] = _mm256_blendv_ps(max[b], xi, _mm256_cmp_ps::<_CMP_GT_OQ>(xi, max[b]));
            sum_w[b] = _mm256_add_ps(sum_w[b], w[i][b]);
            sum_x[b] = _mm256_add_ps(sum_x[b], _mm256_mul_ps(w[i][b], xi));
        }
    }
    let mut degenerate = [zero; N];
    let mut scale = [zero; N];
    let mut iscale = [zero; N];
    for b in 0..N {
        min[b] = _mm256_blendv_ps(min[b], zero, _mm256_cmp_ps::<_CMP_GT_OQ>(min[b], zero));
        degenerate[b] = if X3 {
            _mm256_cmp_ps::<_CMP_LE_OQ>(max[b], min[b])
        } else {
            _mm256_cmp_ps::<_CMP_EQ_OQ>(max[b], min[b])
        };
        iscale[b] = _mm256_div_ps(_mm256_set1_ps(nmax_f), _mm256_sub_ps(max[b], min[b]));
        scale[b] = _mm256_div_ps(_mm256_set1_ps(1.0), iscale[b]);
    }
    let min0 = min;

    let mut lbest = [[zero; N]; E];
    let mut best_error = [zero; N];
    for i in 0..E {
        for b in 0..N {
            let l = level(iscale[b], x[i][b], min[b], nmax_i);
            lbest[i][b] = l;
            let diff = _mm256_sub_ps(_mm256_add_ps(_mm256_mul_ps(scale[b], l), min[b]), x[i][b]);
            let e = _mm256_mul_ps(w[i][b], err::<MAD>(diff));
            best_error[b] = _mm256_add_ps(best_error[b], e);
        }
    }

    let mut laux = [[zero; N]; E];
    for is in 0..=p.nstep {
        let num = _mm256_set1_ps(p.rmin + p.rdelta * is as f32 + nmax_f);
        for b in 0..N {
            iscale[b] = _mm256_div_ps(num, _mm256_sub_ps(max[b], min[b]));
        }
        let (mut sum_l, mut sum_l2, mut sum_xl) = ([zero; N], [zero; N], [zero; N]);
        for i in 0..E {
            for b in 0..N {
                let l = if X3 {
                    level3(iscale[b], x[i][b], min[b], nmax_v)
                } else {
                    level(iscale[b], x[i][b], min[b], nmax_i)
                };
                laux[i][b] = l;
                let wl = _mm256_mul_ps(w[i][b], l);
                sum_l[b] = _mm256_add_ps(sum_l[b], wl);
                sum_l2[b] = _mm256_add_ps(sum_l2[b], _mm256_mul_ps(wl, l));
                sum_xl[b] = _mm256_add_ps(sum_xl[b], _mm256_mul_ps(wl, x[i][b]));
            }
        }
        let mut ok = [zero; N];
        let mut this_scale = [zero; N];
        let mut this_min = [zero; N];
        for b in 0..N {
            let (sw, sx, sl, sl2, sxl) = (sum_w[b], sum_x[b], sum_l[b], sum_l2[b], sum_xl[b]);
            let d = _mm256_sub_ps(_mm256_mul_ps(sw, sl2), _mm256_mul_ps(sl, sl));
            ok[b] = _mm256_cmp_ps::<_CMP_GT_OQ>(d, zero);
            let ts = _mm256_div_ps(
                _mm256_sub_ps(_mm256_mul_ps(sw, sxl), _mm256_mul_ps(sx, sl)),
                d,
            );
            let tm = _mm256_div_ps(
                _mm256_sub_ps(_mm256_mul_ps(sl2, sx), _mm256_mul_ps(sl, sxl)),
                d,
            );
            let pos = _mm256_cmp_ps::<_CMP_GT_OQ>(tm, zero);
            this_min[b] = _mm256_blendv_ps(tm, zero, pos);
            this_scale[b] = _mm256_blendv_ps(ts, _mm256_div_ps(sxl, sl2), pos);
        }
        let mut cur_error = [zero; N];
        for i in 0..E {
            for b in 0..N {
                let fit = _mm256_add_ps(_mm256_mul_ps(this_scale[b], laux[i][b]), this_min[b]);
                let diff = _mm256_sub_ps(fit, x[i][b]);
                let e = _mm256_mul_ps(w[i][b], err::<MAD>(diff));
                cur_error[b] = _mm256_add_ps(cur_error[b], e);
            }
        }
        for b in 0..N {
            let better = _mm256_cmp_ps::<_CMP_LT_OQ>(cur_error[b], best_error[b]);
            let take = _mm256_and_ps(ok[b], better);
            if _mm256_movemask_ps(take) != 0 {
                best_error[b] = _mm256_blendv_ps(best_error[b], cur_error[b], take);
                scale[b] = _mm256_blendv_ps(scale[b], this_scale[b], take);
                min[b] = _mm256_blendv_ps(min[b], this_min[b], take);
                for i in 0..E {
                    lbest[i][b] = _mm256_blendv_ps(lbest[i][b], laux[i][b], take);
                }
            }
        }
    }
    let mut out = [([0f32; 8], [0f32; 8]); N];
    for b in 0..N {
        let s = _mm256_blendv_ps(scale[b], zero, degenerate[b]);
        // -min: flip the sign bit, as scalar negation does (0 - min would turn -0 into +0).
        let m = _mm256_blendv_ps(min[b], min0[b], degenerate[b]);
        let neg_min = _mm256_xor_ps(m, _mm256_set1_ps(-0.0));
        store(&mut out[b].0, s);
        store(&mut out[b].1, neg_min);
        for i in 0..E {
            let l = _mm256_cvttps_epi32(_mm256_blendv_ps(lbest[i][b], zero, degenerate[b]));
            store_i(&mut lt[b][i], l);
        }
    }
    out
}

#[inline]
#[target_feature(enable = "avx2")]
fn store_i(a: &mut [i32; 8], v: __m256i) {
    // SAFETY: `a` is a valid, writable [i32; 8]: exactly the 32 bytes storeu writes (unaligned).
    unsafe { _mm256_storeu_si256(a.as_mut_ptr().cast(), v) }
}

/// Transpose `N` super-blocks (lane = sub-block) and compute the reference weights
/// `sqrt(sum(x^2)/32) + |x|` (the sum in index order per lane, as the scalar loop).
#[inline]
#[target_feature(enable = "avx2")]
fn lanes_and_weights<const N: usize>(
    xs: &[f32],
    x: &mut [[__m256; N]; 32],
    w: &mut [[__m256; N]; 32],
) {
    for b in 0..N {
        let blk = &xs[256 * b..256 * b + 256];
        let mut t = [[0f32; 8]; 32];
        for k in 0..8 {
            for i in 0..32 {
                t[i][k] = blk[32 * k + i];
            }
        }
        let mut sum_x2 = _mm256_setzero_ps();
        for i in 0..32 {
            x[i][b] = load(&t[i]);
            sum_x2 = _mm256_add_ps(sum_x2, _mm256_mul_ps(x[i][b], x[i][b]));
        }
        let av_x = _mm256_sqrt_ps(_mm256_div_ps(sum_x2, _mm256_set1_ps(32.0)));
        let abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fff_ffff));
        for i in 0..32 {
            w[i][b] = _mm256_add_ps(av_x, _mm256_and_ps(x[i][b], abs_mask));
        }
    }
}

/// `q4_k::requantize` with the 32 divisions of a sub-block in 4 vectors.
#[inline]
#[target_feature(enable = "avx2")]
fn requantize(x: &[f32], scales: &[u8; 12], d: Half, dmin: Half, nmax: i32, l: &mut [u8; 256]) {
    let (dd, dmin) = (f16_to_f32(d), f16_to_f32(dmin));
    let nmax_i = _mm256_set1_epi32(nmax);
    for j in 0..8 {
        let (sc, m) = get_scale_min_k4(j, scales);
        let d = dd * sc as f32;
        if d == 0.0 {
            continue;
        }
        let dm = _mm256_set1_ps(dmin * m as f32);
        let dv = _mm256_set1_ps(d);
        for c in 0..4 {
            let xs: &[f32; 8] = x[32 * j + 8 * c..][..8].try_into().expect("8 values");
            let q = _mm256_div_ps(_mm256_add_ps(load(xs), dm), dv);
            let li = _mm256_max_epi32(
                _mm256_min_epi32(nearest_int8(q), nmax_i),
                _mm256_setzero_si256(),
            );
            let mut out = [0i32; 8];
            store_i(&mut out, li);
            for (o, v) in l[32 * j + 8 * c..][..8].iter_mut().zip(out) {
                *o = v as u8;
            }
        }
    }
}

/// The levels of `lt` (lane = sub-block) back in row order.
#[inline]
fn untranspose(lt: &[[i32; 8]; 32], l: &mut [u8; 256]) {
    for k in 0..8 {
        for i in 0..32 {
            l[32 * k + i] = lt[i][k] as u8;
        }
    }
}

/// The imatrix weights of `q4_k::impl_search` for `N` super-blocks: `qw*sqrt(sigma2 + x^2)`
/// with `sigma2 = 2*sum(x^2)/256` (the sum in index order, scalar as in ggml), and their sums
/// per sub-block (index order per lane).
#[inline]
#[target_feature(enable = "avx2")]
fn impl_lanes_and_weights<const N: usize>(
    xs: &[f32],
    qw: &[f32],
    x: &mut [[__m256; N]; 32],
    w: &mut [[__m256; N]; 32],
) -> [[f32; 8]; N] {
    let mut sw = [[0f32; 8]; N];
    for b in 0..N {
        let blk = &xs[256 * b..256 * b + 256];
        let q = &qw[256 * b..256 * b + 256];
        let sigma2 = _mm256_set1_ps(2.0 * sum_sq(blk) / QK_K as f32);
        let mut t = [[0f32; 8]; 32];
        let mut tq = [[0f32; 8]; 32];
        for k in 0..8 {
            for i in 0..32 {
                t[i][k] = blk[32 * k + i];
                tq[i][k] = q[32 * k + i];
            }
        }
        let mut sumw = _mm256_setzero_ps();
        for i in 0..32 {
            x[i][b] = load(&t[i]);
            let r = _mm256_sqrt_ps(_mm256_add_ps(sigma2, _mm256_mul_ps(x[i][b], x[i][b])));
            w[i][b] = _mm256_mul_ps(load(&tq[i]), r);
            sumw = _mm256_add_ps(sumw, w[i][b]);
        }
        store(&mut sw[b], sumw);
    }
    sw
}

/// Search `N` super-blocks (`xs`, the row's blocks `first..first+N`) with the reference
/// weights (`qw = None`, `make_qkx2_quants`) or the imatrix weights (`make_qkx3_quants`), then
/// `finish(block, values, scales, mins, weight sums, levels)` each.
#[inline]
#[target_feature(enable = "avx2")]
fn blocks_n<const N: usize, F>(
    p: AsymSearch,
    xs: &[f32],
    qw: Option<&[f32]>,
    first: usize,
    finish: &mut F,
) where
    F: FnMut(usize, &[f32], &[f32; 8], &[f32; 8], &[f32; 8], &mut [u8; 256]),
{
    let mut xl = [[_mm256_setzero_ps(); N]; 32];
    let mut wl = xl;
    let mut lt = [[[0i32; 8]; 32]; N];
    let (r, sw) = match qw {
        None => {
            lanes_and_weights::<N>(xs, &mut xl, &mut wl);
            let r = qkx2_avx2::<N, 32, false, false>(p, &xl, &wl, &mut lt);
            (r, [[0f32; 8]; N])
        }
        Some(qw) => {
            let sw = impl_lanes_and_weights::<N>(xs, qw, &mut xl, &mut wl);
            (qkx2_avx2::<N, 32, false, true>(p, &xl, &wl, &mut lt), sw)
        }
    };
    let mut l_all = [0u8; 256];
    for b in 0..N {
        untranspose(&lt[b], &mut l_all);
        let x = &xs[256 * b..256 * b + 256];
        finish(first + b, x, &r[b].0, &r[b].1, &sw[b], &mut l_all);
    }
}

/// q4_K (`nmax = 15`) or q5_K (`nmax = 31`) on whole super-blocks, two at a time.
#[inline]
#[target_feature(enable = "avx2")]
fn q45_row<F>(p: AsymSearch, x: &[f32], qw: Option<&[f32]>, mut finish: F)
where
    F: FnMut(usize, &[f32], &[f32; 8], &[f32; 8], &[f32; 8], &mut [u8; 256]),
{
    let nb = x.len() / 256;
    let mut i = 0;
    while i + 2 <= nb {
        let q = qw.map(|w| &w[256 * i..256 * (i + 2)]);
        blocks_n::<2, F>(p, &x[256 * i..256 * (i + 2)], q, i, &mut finish);
        i += 2;
    }
    if i < nb {
        let q = qw.map(|w| &w[256 * i..256 * (i + 1)]);
        blocks_n::<1, F>(p, &x[256 * i..256 * (i + 1)], q, i, &mut finish);
    }
}

/// `quantize_row_q4_K_ref` (`qw = None`) or `quantize_row_q4_K_impl`, bit-exact, with the
/// search and the requantization in AVX2.
#[target_feature(enable = "avx2")]
pub fn quantize_row_q4_k(x: &[f32], out: &mut [u8], qw: Option<&[f32]>) {
    let blocks: &mut [BlockQ4K] = bytemuck::cast_slice_mut(out);
    let p = if qw.is_some() { QK_IMPL } else { Q4K_REF };
    q45_row(p, x, qw, |i, xs, scales, mins, sw, l_all| {
        let b = &mut blocks[i];
        (b.scales, b.d, b.dmin) = match qw {
            None => ref_scales(scales, mins),
            Some(_) => impl_scales(scales, mins, sw, false),
        };
        requantize(xs, &b.scales, b.d, b.dmin, 15, l_all);
        pack_q4(l_all, &mut b.qs);
    });
}

/// `quantize_row_q5_K_ref` (`qw = None`) or `quantize_row_q5_K_impl`, bit-exact, with the
/// search and the requantization in AVX2.
#[target_feature(enable = "avx2")]
pub fn quantize_row_q5_k(x: &[f32], out: &mut [u8], qw: Option<&[f32]>) {
    let blocks: &mut [BlockQ5K] = bytemuck::cast_slice_mut(out);
    let p = match qw {
        None => Q5K_REF,
        Some(_) => AsymSearch {
            nmax: 31,
            ..QK_IMPL
        },
    };
    q45_row(p, x, qw, |i, xs, scales, mins, sw, l_all| {
        let b = &mut blocks[i];
        (b.scales, b.d, b.dmin) = match qw {
            None => ref_scales(scales, mins),
            Some(_) => impl_scales(scales, mins, sw, true),
        };
        requantize(xs, &b.scales, b.d, b.dmin, 31, l_all);
        pack_q5(l_all, b);
    });
}

/// `quantize_row_q2_K_ref` (`qw = None`) or `quantize_row_q2_K_impl`, bit-exact: the 16
/// sub-blocks of 16 values of a super-block in the lanes of two registers (lane `k` of register
/// `r` = sub-block `8r + k`); the ref path searches with weights `|x|` and
/// `make_qkx2_quants(..., use_mad = true)`, the imatrix path with `qw*sqrt(sigma2 + x^2)`
/// (`sigma2 = sum(x^2)/256`) and `make_qkx3_quants`; the rest is `q2_k::finish_block_*`.
#[target_feature(enable = "avx2")]
pub fn quantize_row_q2_k(x: &[f32], out: &mut [u8], qw: Option<&[f32]>) {
    let blocks: &mut [BlockQ2K] = bytemuck::cast_slice_mut(out);
    let abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fff_ffff));
    let mut l_all = [0u8; QK_K];
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
        let mut lt = [[[0i32; 8]; 16]; 2];
        let mut sw = [0f32; 16];
        let r = match qw {
            None => {
                let wl: [[__m256; 2]; 16] = std::array::from_fn(|i| {
                    [
                        _mm256_and_ps(xl[i][0], abs_mask),
                        _mm256_and_ps(xl[i][1], abs_mask),
                    ]
                });
                qkx2_avx2::<2, 16, true, false>(Q2K_REF, &xl, &wl, &mut lt)
            }
            Some(_) => {
                let sigma2 = _mm256_set1_ps(sum_sq(xs) / QK_K as f32);
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
                for h in 0..2 {
                    let part: &mut [f32; 8] = (&mut sw[8 * h..8 * h + 8]).try_into().expect("8");
                    store(part, sums[h]);
                }
                qkx2_avx2::<2, 16, false, true>(Q2K_IMPL, &xl, &wl, &mut lt)
            }
        };
        let mut scales = [0f32; 16];
        let mut mins = [0f32; 16];
        for h in 0..2 {
            scales[8 * h..8 * h + 8].copy_from_slice(&r[h].0);
            mins[8 * h..8 * h + 8].copy_from_slice(&r[h].1);
            for k in 0..8 {
                for i in 0..16 {
                    l_all[16 * (8 * h + k) + i] = lt[h][i][k] as u8;
                }
            }
        }
        match qw {
            None => finish_block_ref(xs, &scales, &mins, &mut l_all, b),
            Some(_) => finish_block_impl(xs, &scales, &mins, &sw, &mut l_all, b),
        }
    }
}
