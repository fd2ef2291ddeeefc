//! AVX2 copy of `fast::qkx2_lanes`: the 8 sub-blocks of a super-block in the 8 f32 lanes of a
//! ymm register, every lane running the scalar sequence of `common::make_qkx2_quants`
//! (`use_mad = false`) operation for operation:
//! - `nearest_int` is the same bit trick (`+ 1.5*2^23`, keep the mantissa bits, `- 2^22`);
//! - `vdivps`/`vsqrtps` round exactly like `divss`/`sqrtss` (IEEE, correctly rounded); no FMA is
//!   used, every product is rounded before it is added, as in the scalar code;
//! - comparisons are the ordered, quiet predicates (`_CMP_LT_OQ` ...) that C's `<`, `>`, `==`
//!   are, so a NaN takes the same side; `if`s become blends of values the scalar code would have
//!   computed, and a candidate the scalar code skips (`D <= 0`) is computed but discarded.
//!
//! Only called after `is_x86_feature_detected!("avx2")` (see `fast.rs`).

use std::arch::x86_64::*;

use super::common::AsymSearch;

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
fn load(a: &[f32; 8]) -> __m256 {
    // SAFETY: `a` is a valid, readable [f32; 8]: exactly the 32 bytes loadu reads (unaligned).
    unsafe { _mm256_loadu_ps(a.as_ptr()) }
}

#[inline]
#[target_feature(enable = "avx2")]
fn store(a: &mut [f32; 8], v: __m256) {
    // SAFETY: `a` is a valid, writable [f32; 8]: exactly the 32 bytes storeu writes (unaligned).
    unsafe { _mm256_storeu_ps(a.as_mut_ptr(), v) }
}

/// `make_qkx2_quants(32, nmax, x, weights, ...)` for 8 sub-blocks: `xt[i][j]`, `wt[i][j]` are
/// element `i` of sub-block `j`. Writes the levels to `lt[i][j]`; returns (scales, -mins).
#[target_feature(enable = "avx2")]
pub fn qkx2_avx2(
    p: AsymSearch,
    xt: &[[f32; 8]; 32],
    wt: &[[f32; 8]; 32],
    lt: &mut [[u8; 8]; 32],
) -> ([f32; 8], [f32; 8]) {
    let x: [__m256; 32] = std::array::from_fn(|i| load(&xt[i]));
    let w: [__m256; 32] = std::array::from_fn(|i| load(&wt[i]));
    let zero = _mm256_setzero_ps();
    let nmax_i = _mm256_set1_epi32(p.nmax);
    let nmax_f = p.nmax as f32;

    let mut min = x[0];
    let mut max = x[0];
    let mut sum_w = w[0];
    let mut sum_x = _mm256_mul_ps(sum_w, x[0]);
    for i in 1..32 {
        min = _mm256_blendv_ps(min, x[i], _mm256_cmp_ps::<_CMP_LT_OQ>(x[i], min));
        max = _mm256_blendv_ps(max, x[i], _mm256_cmp_ps::<_CMP_GT_OQ>(x[i], max));
        sum_w = _mm256_add_ps(sum_w, w[i]);
        sum_x = _mm256_add_ps(sum_x, _mm256_mul_ps(w[i], x[i]));
    }
    min = _mm256_blendv_ps(min, zero, _mm256_cmp_ps::<_CMP_GT_OQ>(min, zero));
    let degenerate = _mm256_cmp_ps::<_CMP_EQ_OQ>(max, min);
    let min0 = min;
    let iscale = _mm256_div_ps(_mm256_set1_ps(nmax_f), _mm256_sub_ps(max, min));
    let mut scale = _mm256_div_ps(_mm256_set1_ps(1.0), iscale);

    let mut lbest = [zero; 32];
    let mut best_error = zero;
    for i in 0..32 {
        let l = level(iscale, x[i], min, nmax_i);
        lbest[i] = l;
        let diff = _mm256_sub_ps(_mm256_add_ps(_mm256_mul_ps(scale, l), min), x[i]);
        best_error = _mm256_add_ps(best_error, _mm256_mul_ps(w[i], _mm256_mul_ps(diff, diff)));
    }

    let mut laux = [zero; 32];
    for is in 0..=p.nstep {
        let num = p.rmin + p.rdelta * is as f32 + nmax_f;
        let iscale = _mm256_div_ps(_mm256_set1_ps(num), _mm256_sub_ps(max, min));
        let (mut sum_l, mut sum_l2, mut sum_xl) = (zero, zero, zero);
        for i in 0..32 {
            let l = level(iscale, x[i], min, nmax_i);
            laux[i] = l;
            let wl = _mm256_mul_ps(w[i], l);
            sum_l = _mm256_add_ps(sum_l, wl);
            sum_l2 = _mm256_add_ps(sum_l2, _mm256_mul_ps(wl, l));
            sum_xl = _mm256_add_ps(sum_xl, _mm256_mul_ps(wl, x[i]));
        }
        let d = _mm256_sub_ps(_mm256_mul_ps(sum_w, sum_l2), _mm256_mul_ps(sum_l, sum_l));
        let ok = _mm256_cmp_ps::<_CMP_GT_OQ>(d, zero);
        let ts = _mm256_div_ps(
            _mm256_sub_ps(_mm256_mul_ps(sum_w, sum_xl), _mm256_mul_ps(sum_x, sum_l)),
            d,
        );
        let tm = _mm256_div_ps(
            _mm256_sub_ps(_mm256_mul_ps(sum_l2, sum_x), _mm256_mul_ps(sum_l, sum_xl)),
            d,
        );
        let pos = _mm256_cmp_ps::<_CMP_GT_OQ>(tm, zero);
        let this_min = _mm256_blendv_ps(tm, zero, pos);
        let this_scale = _mm256_blendv_ps(ts, _mm256_div_ps(sum_xl, sum_l2), pos);
        let mut cur_error = zero;
        for i in 0..32 {
            let diff = _mm256_sub_ps(
                _mm256_add_ps(_mm256_mul_ps(this_scale, laux[i]), this_min),
                x[i],
            );
            cur_error = _mm256_add_ps(cur_error, _mm256_mul_ps(w[i], _mm256_mul_ps(diff, diff)));
        }
        let take = _mm256_and_ps(ok, _mm256_cmp_ps::<_CMP_LT_OQ>(cur_error, best_error));
        if _mm256_movemask_ps(take) != 0 {
            best_error = _mm256_blendv_ps(best_error, cur_error, take);
            scale = _mm256_blendv_ps(scale, this_scale, take);
            min = _mm256_blendv_ps(min, this_min, take);
            for i in 0..32 {
                lbest[i] = _mm256_blendv_ps(lbest[i], laux[i], take);
            }
        }
    }
    scale = _mm256_blendv_ps(scale, zero, degenerate);
    // -min: flip the sign bit, as scalar negation does (0 - min would turn -0 into +0).
    let neg_min = _mm256_xor_ps(
        _mm256_blendv_ps(min, min0, degenerate),
        _mm256_set1_ps(-0.0),
    );
    for i in 0..32 {
        let l = _mm256_cvttps_epi32(_mm256_blendv_ps(lbest[i], zero, degenerate));
        let mut li = [0i32; 8];
        // SAFETY: `li` is a valid, writable [i32; 8]: exactly the 32 bytes storeu writes.
        unsafe { _mm256_storeu_si256(li.as_mut_ptr().cast(), l) };
        lt[i] = li.map(|v| v as u8);
    }
    let (mut s, mut m) = ([0f32; 8], [0f32; 8]);
    store(&mut s, scale);
    store(&mut m, neg_min);
    (s, m)
}
