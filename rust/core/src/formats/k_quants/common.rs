//! The helpers of ggml-quants.c that the K-quants share: the scale searches `make_qx_quants`,
//! `make_q3_quants`, `make_qkx2_quants`, `make_qkx3_quants`, `make_qp_quants` and the 6-bit
//! scale packing of q4_K / q5_K. Each follows its C original operation for operation: the same
//! f32 expressions in the same order (C evaluates `a*b*c` as `(a*b)*c`, `w*l` converts the int
//! `l` to float first), the same integer truncations (`uint8_t L = int` keeps the low byte), and
//! the same comparisons (so a NaN takes the same branch). libggml-base is built without FMA
//! contraction (its disassembly holds no `vfmadd`), and Rust never contracts, so plain `*` and
//! `+` reproduce it.

/// ggml's `GROUP_MAX_EPS`: a group whose largest magnitude is below it is all zero.
pub const GROUP_MAX_EPS: f32 = 1e-15;

pub use crate::formats::blocks::nearest_int;

/// `MAX(lo, MIN(hi, l))` on ints.
#[inline(always)]
pub fn clamp(l: i32, lo: i32, hi: i32) -> i32 {
    l.min(hi).max(lo)
}

/// (largest |x|, the signed value that has it), the first one on ties, as in ggml's loops
/// `if (ax > amax) { amax = ax; max = x[i]; }`.
#[inline]
fn signed_absmax(x: &[f32]) -> (f32, f32) {
    let (mut amax, mut max) = (0.0f32, 0.0f32);
    for &v in x {
        let ax = v.abs();
        if ax > amax {
            amax = ax;
            max = v;
        }
    }
    (amax, max)
}

/// Weight of element `i` in `make_qx_quants` (only `rmse_type == 1` is used by the K-quants:
/// the given weights, or x^2 without them).
#[inline(always)]
fn qx_weight(qw: Option<&[f32]>, x: &[f32], i: usize) -> f32 {
    match qw {
        Some(w) => w[i],
        None => x[i] * x[i],
    }
}

/// ggml's `make_qx_quants(n, nmax, x, L, rmse_type = 1, qw)`: symmetric quantization to
/// `[-nmax, nmax-1]` (stored in `l` with offset `nmax`), the scale refined by a weighted
/// least-squares fit over 19 candidate inverse scales. Returns the scale.
pub fn make_qx_quants(nmax: i32, x: &[f32], l_out: &mut [i8], qw: Option<&[f32]>) -> f32 {
    let n = x.len();
    let (amax, max) = signed_absmax(x);
    if amax < GROUP_MAX_EPS {
        l_out[..n].fill(0);
        return 0.0;
    }
    let mut iscale = -(nmax as f32) / max;
    let mut sumlx = 0.0f32;
    let mut suml2 = 0.0f32;
    for i in 0..n {
        let l = clamp(nearest_int(iscale * x[i]), -nmax, nmax - 1);
        l_out[i] = (l + nmax) as i8;
        let w = qx_weight(qw, x, i);
        sumlx += w * x[i] * l as f32;
        suml2 += w * l as f32 * l as f32;
    }
    let mut scale = if suml2 != 0.0 { sumlx / suml2 } else { 0.0 };
    let mut best = scale * sumlx;
    for is in -9..=9 {
        if is == 0 {
            continue;
        }
        iscale = -(nmax as f32 + 0.1 * is as f32) / max;
        sumlx = 0.0;
        suml2 = 0.0;
        for i in 0..n {
            let l = clamp(nearest_int(iscale * x[i]), -nmax, nmax - 1);
            let w = qx_weight(qw, x, i);
            sumlx += w * x[i] * l as f32;
            suml2 += w * l as f32 * l as f32;
        }
        if suml2 > 0.0 && sumlx * sumlx > best * suml2 {
            for i in 0..n {
                let l = nearest_int(iscale * x[i]);
                l_out[i] = (nmax + clamp(l, -nmax, nmax - 1)) as i8;
            }
            scale = sumlx / suml2;
            best = scale * sumlx;
        }
    }
    scale
}

/// ggml's `make_q3_quants(n, nmax, x, L, do_rmse = true)`: symmetric quantization to
/// `[-nmax, nmax-1]` with x^2 weights, then up to 5 rounds of moving single values to the
/// level that most improves the weighted fit. Returns the scale; `l_out` holds `l + nmax`.
pub fn make_q3_quants(nmax: i32, x: &[f32], l_out: &mut [i8]) -> f32 {
    let n = x.len();
    let (amax, max) = signed_absmax(x);
    if amax < GROUP_MAX_EPS {
        l_out[..n].fill(0);
        return 0.0;
    }
    let iscale = -(nmax as f32) / max;
    let mut sumlx = 0.0f32;
    let mut suml2 = 0.0f32;
    for i in 0..n {
        let l = clamp(nearest_int(iscale * x[i]), -nmax, nmax - 1);
        l_out[i] = l as i8;
        let w = x[i] * x[i];
        sumlx += w * x[i] * l as f32;
        suml2 += w * l as f32 * l as f32;
    }
    for _ in 0..5 {
        let mut n_changed = 0;
        for i in 0..n {
            let w = x[i] * x[i];
            let li = l_out[i] as f32;
            let mut slx = sumlx - w * x[i] * li;
            if slx > 0.0 {
                let mut sl2 = suml2 - w * li * li;
                let new_l = clamp(nearest_int(x[i] * sl2 / slx), -nmax, nmax - 1);
                if new_l != l_out[i] as i32 {
                    slx += w * x[i] * new_l as f32;
                    sl2 += w * new_l as f32 * new_l as f32;
                    if sl2 > 0.0 && slx * slx * suml2 > sumlx * sumlx * sl2 {
                        l_out[i] = new_l as i8;
                        sumlx = slx;
                        suml2 = sl2;
                        n_changed += 1;
                    }
                }
            }
        }
        if n_changed == 0 {
            break;
        }
    }
    for l in l_out[..n].iter_mut() {
        *l = (*l as i32 + nmax) as i8;
    }
    if suml2 > 0.0 {
        sumlx / suml2
    } else {
        0.0
    }
}

/// The parameters of one `make_qkx2_quants` / `make_qkx3_quants` call site.
#[derive(Clone, Copy, Debug)]
pub struct AsymSearch {
    pub nmax: i32,
    pub rmin: f32,
    pub rdelta: f32,
    pub nstep: i32,
    pub use_mad: bool,
}

/// ggml's `make_qkx2_quants`: asymmetric quantization `x ~ scale*l + min` with `l` in
/// `[0, nmax]` and `min <= 0`, searching `nstep + 1` candidate inverse scales
/// `(rmin + rdelta*is + nmax)/(max - min)` and keeping the one with the smallest weighted
/// error. A better candidate replaces `min`, which the later candidates then start from.
/// Returns `(scale, -min)`.
pub fn make_qkx2_quants(
    p: AsymSearch,
    x: &[f32],
    weights: &[f32],
    l_out: &mut [u8],
    laux: &mut [u8],
) -> (f32, f32) {
    let n = x.len();
    let nmax = p.nmax;
    let mut min = x[0];
    let mut max = x[0];
    let mut sum_w = weights[0];
    let mut sum_x = sum_w * x[0];
    for i in 1..n {
        if x[i] < min {
            min = x[i];
        }
        if x[i] > max {
            max = x[i];
        }
        let w = weights[i];
        sum_w += w;
        sum_x += w * x[i];
    }
    if min > 0.0 {
        min = 0.0;
    }
    if max == min {
        l_out[..n].fill(0);
        return (0.0, -min);
    }
    let err = |d: f32| if p.use_mad { d.abs() } else { d * d };
    let mut iscale = nmax as f32 / (max - min);
    let mut scale = 1.0 / iscale;
    let mut best_error = 0.0f32;
    for i in 0..n {
        let l = nearest_int(iscale * (x[i] - min));
        l_out[i] = clamp(l, 0, nmax) as u8;
        let diff = scale * l_out[i] as f32 + min - x[i];
        best_error += weights[i] * err(diff);
    }
    if p.nstep < 1 {
        return (scale, -min);
    }
    for is in 0..=p.nstep {
        iscale = (p.rmin + p.rdelta * is as f32 + nmax as f32) / (max - min);
        let (mut sum_l, mut sum_l2, mut sum_xl) = (0.0f32, 0.0f32, 0.0f32);
        for i in 0..n {
            let l = clamp(nearest_int(iscale * (x[i] - min)), 0, nmax);
            laux[i] = l as u8;
            let w = weights[i];
            let lf = l as f32;
            sum_l += w * lf;
            sum_l2 += w * lf * lf;
            sum_xl += w * lf * x[i];
        }
        let d = sum_w * sum_l2 - sum_l * sum_l;
        if d > 0.0 {
            let mut this_scale = (sum_w * sum_xl - sum_x * sum_l) / d;
            let mut this_min = (sum_l2 * sum_x - sum_l * sum_xl) / d;
            if this_min > 0.0 {
                this_min = 0.0;
                this_scale = sum_xl / sum_l2;
            }
            let mut cur_error = 0.0f32;
            for i in 0..n {
                let diff = this_scale * laux[i] as f32 + this_min - x[i];
                cur_error += weights[i] * err(diff);
            }
            if cur_error < best_error {
                l_out[..n].copy_from_slice(&laux[..n]);
                best_error = cur_error;
                scale = this_scale;
                min = this_min;
            }
        }
    }
    (scale, -min)
}

/// ggml's `make_qkx3_quants` with explicit weights (the only way the K-quants call it): as
/// `make_qkx2_quants`, but a candidate level is computed as `v > 0 ? nearest_int(MIN(v, nmax))
/// : 0`, which stays defined when an updated `min` makes `v` infinite or NaN.
/// Returns `(scale, -min)`.
pub fn make_qkx3_quants(
    p: AsymSearch,
    x: &[f32],
    weights: &[f32],
    l_out: &mut [u8],
    laux: &mut [u8],
) -> (f32, f32) {
    let n = x.len();
    let nmax = p.nmax;
    let nmax_f = nmax as f32;
    let mut min = x[0];
    let mut max = x[0];
    let mut sum_w = weights[0];
    let mut sum_x = sum_w * x[0];
    for i in 1..n {
        if x[i] < min {
            min = x[i];
        }
        if x[i] > max {
            max = x[i];
        }
        let w = weights[i];
        sum_w += w;
        sum_x += w * x[i];
    }
    if min > 0.0 {
        min = 0.0;
    }
    // `max <= min` is false for a NaN, as in C.
    if max <= min {
        l_out[..n].fill(0);
        return (0.0, -min);
    }
    let err = |d: f32| if p.use_mad { d.abs() } else { d * d };
    let mut iscale = nmax_f / (max - min);
    let mut scale = 1.0 / iscale;
    let mut best_mad = 0.0f32;
    for i in 0..n {
        let l = nearest_int(iscale * (x[i] - min));
        l_out[i] = clamp(l, 0, nmax) as u8;
        let diff = scale * l_out[i] as f32 + min - x[i];
        best_mad += weights[i] * err(diff);
    }
    if p.nstep < 1 {
        return (scale, -min);
    }
    for is in 0..=p.nstep {
        iscale = (p.rmin + p.rdelta * is as f32 + nmax_f) / (max - min);
        let (mut sum_l, mut sum_l2, mut sum_xl) = (0.0f32, 0.0f32, 0.0f32);
        for i in 0..n {
            let v = iscale * (x[i] - min);
            // C's MIN(v, nmax) is `v < nmax ? v : nmax`.
            let l = if v > 0.0 {
                nearest_int(if v < nmax_f { v } else { nmax_f })
            } else {
                0
            };
            laux[i] = l as u8;
            let w = weights[i];
            let lf = l as f32;
            sum_l += w * lf;
            sum_l2 += w * lf * lf;
            sum_xl += w * lf * x[i];
        }
        let d = sum_w * sum_l2 - sum_l * sum_l;
        if d > 0.0 {
            let mut this_scale = (sum_w * sum_xl - sum_x * sum_l) / d;
            let mut this_min = (sum_l2 * sum_x - sum_l * sum_xl) / d;
            if this_min > 0.0 {
                this_min = 0.0;
                this_scale = sum_xl / sum_l2;
            }
            let mut mad = 0.0f32;
            for i in 0..n {
                let diff = this_scale * laux[i] as f32 + this_min - x[i];
                mad += weights[i] * err(diff);
            }
            if mad < best_mad {
                l_out[..n].copy_from_slice(&laux[..n]);
                best_mad = mad;
                scale = this_scale;
                min = this_min;
            }
        }
    }
    (scale, -min)
}

/// ggml's `make_qp_quants`: quantize the non-negative sub-block scales (or mins) `x` to
/// `[0, nmax]` against one block scale, weighted by `qw`. Returns the block scale.
pub fn make_qp_quants(nmax: i32, x: &[f32], l_out: &mut [u8], qw: &[f32]) -> f32 {
    let n = x.len();
    let mut max = 0.0f32;
    for &v in x {
        // MAX(max, v) = max > v ? max : v
        max = if max > v { max } else { v };
    }
    if max < GROUP_MAX_EPS {
        l_out[..n].fill(0);
        return 0.0;
    }
    let mut iscale = nmax as f32 / max;
    for i in 0..n {
        l_out[i] = nearest_int(iscale * x[i]) as u8;
    }
    let scale = 1.0 / iscale;
    let mut best_mse = 0.0f32;
    for i in 0..n {
        let diff = x[i] - scale * l_out[i] as f32;
        best_mse += qw[i] * diff * diff;
    }
    for is in -4..=4 {
        if is == 0 {
            continue;
        }
        let iscale_is = (0.1 * is as f32 + nmax as f32) / max;
        let scale_is = 1.0 / iscale_is;
        let mut mse = 0.0f32;
        for i in 0..n {
            let l = nearest_int(iscale_is * x[i]).min(nmax);
            let diff = x[i] - scale_is * l as f32;
            mse += qw[i] * diff * diff;
        }
        if mse < best_mse {
            best_mse = mse;
            iscale = iscale_is;
        }
    }
    let mut sumlx = 0.0f32;
    let mut suml2 = 0.0f32;
    for i in 0..n {
        // The sums use the int `l`; `L[i]` keeps its low byte.
        let l = nearest_int(iscale * x[i]).min(nmax);
        l_out[i] = l as u8;
        let w = qw[i];
        sumlx += w * x[i] * l as f32;
        suml2 += w * l as f32 * l as f32;
    }
    for _ in 0..5 {
        let mut n_changed = 0;
        for i in 0..n {
            let w = qw[i];
            let li = l_out[i] as f32;
            let mut slx = sumlx - w * x[i] * li;
            let mut sl2 = suml2 - w * li * li;
            if slx > 0.0 && sl2 > 0.0 {
                let new_l = nearest_int(x[i] * sl2 / slx).min(nmax);
                if new_l != l_out[i] as i32 {
                    slx += w * x[i] * new_l as f32;
                    sl2 += w * new_l as f32 * new_l as f32;
                    if slx * slx * suml2 > sumlx * sumlx * sl2 {
                        l_out[i] = new_l as u8;
                        sumlx = slx;
                        suml2 = sl2;
                        n_changed += 1;
                    }
                }
            }
        }
        if n_changed == 0 {
            break;
        }
    }
    if suml2 > 0.0 {
        sumlx / suml2
    } else {
        0.0
    }
}

/// ggml's `get_scale_min_k4`: the 6-bit scale and min of sub-block `j` (0..8) of q4_K / q5_K.
#[inline]
pub fn get_scale_min_k4(j: usize, q: &[u8; 12]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        (
            (q[j + 4] & 0xf) | ((q[j - 4] >> 6) << 4),
            (q[j + 4] >> 4) | ((q[j] >> 6) << 4),
        )
    }
}

/// The inverse of `get_scale_min_k4`: pack 8 (scale, min) pairs of 6 bits into 12 bytes, in
/// the order of ggml's loop (`scales` starts zeroed as in a fresh block; every byte is written
/// with `=` before it is or-ed into).
pub fn pack_scale_min_k4(ls: &[u8; 8], lm: &[u8; 8]) -> [u8; 12] {
    let mut s = [0u8; 12];
    for j in 0..8 {
        let (sc, m) = (ls[j], lm[j]);
        if j < 4 {
            s[j] = sc;
            s[j + 4] = m;
        } else {
            s[j + 4] = (sc & 0xf) | ((m & 0xf) << 4);
            s[j - 4] |= (sc >> 4) << 6;
            s[j] |= (m >> 4) << 6;
        }
    }
    s
}

/// Pack 256 2-bit values as q2_K / q3_K do: byte `l` of each 32-byte group holds values
/// `l, l+32, l+64, l+96` of its 128-value half in bits 0-1, 2-3, 4-5, 6-7.
pub fn pack_2bit(l_in: &[u8; 256], qs: &mut [u8; 64]) {
    for (half, q) in l_in.chunks_exact(128).zip(qs.chunks_exact_mut(32)) {
        for l in 0..32 {
            q[l] = half[l] | (half[l + 32] << 2) | (half[l + 64] << 4) | (half[l + 96] << 6);
        }
    }
}

/// The sum of squares of `x` in index order (ggml's `sumx2` loops).
#[inline]
pub fn sum_sq(x: &[f32]) -> f32 {
    let mut s = 0.0f32;
    for &v in x {
        s += v * v;
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_int_rounds_half_to_even() {
        assert_eq!(nearest_int(0.5), 0);
        assert_eq!(nearest_int(1.5), 2);
        assert_eq!(nearest_int(2.5), 2);
        assert_eq!(nearest_int(-0.5), 0);
        assert_eq!(nearest_int(-1.5), -2);
        assert_eq!(nearest_int(3.49), 3);
        for v in [-1000.25f32, -7.5, 0.0, 12.75, 4_194_303.0] {
            assert_eq!(nearest_int(v), crate::formats::blocks::nearest_int(v));
        }
    }

    #[test]
    fn scale_min_packing_round_trips() {
        let ls = [0, 1, 63, 17, 32, 63, 5, 48];
        let lm = [63, 0, 2, 33, 63, 1, 60, 31];
        let s = pack_scale_min_k4(&ls, &lm);
        for j in 0..8 {
            assert_eq!(get_scale_min_k4(j, &s), (ls[j], lm[j]));
        }
    }

    #[test]
    fn qkx2_fits_an_exact_grid_exactly() {
        // x = 0.5*l - 1 for l = 0..15 twice: a 4-bit grid with scale 0.5 and min -1.
        let x: Vec<f32> = (0..32).map(|i| 0.5 * (i % 16) as f32 - 1.0).collect();
        let w = vec![1.0f32; 32];
        let (mut l, mut aux) = ([0u8; 32], [0u8; 32]);
        let p = AsymSearch {
            nmax: 15,
            rmin: -1.0,
            rdelta: 0.1,
            nstep: 20,
            use_mad: false,
        };
        let (scale, neg_min) = make_qkx2_quants(p, &x, &w, &mut l, &mut aux);
        assert_eq!((scale, neg_min), (0.5, 1.0));
        assert!(l.iter().enumerate().all(|(i, &v)| v as usize == i % 16));
    }

    #[test]
    fn zero_groups_give_zero_scales() {
        let x = [0.0f32; 16];
        let mut li = [5i8; 16];
        assert_eq!(make_qx_quants(32, &x, &mut li, None), 0.0);
        assert!(li.iter().all(|&v| v == 0));
        assert_eq!(make_q3_quants(4, &x, &mut li), 0.0);
        let mut lu = [5u8; 16];
        assert_eq!(make_qp_quants(15, &x, &mut lu, &[1.0; 16]), 0.0);
        assert!(lu.iter().all(|&v| v == 0));
    }

    #[test]
    fn qx_quants_of_a_symmetric_grid() {
        // x = l/4 for l = -8..8: make_qx_quants with nmax 8 finds scale -... with |l| <= 8.
        let x: Vec<f32> = (-8..8).map(|l| l as f32 * 0.25).collect();
        let mut l = [0i8; 16];
        let scale = make_qx_quants(8, &x, &mut l, None);
        // The signed extreme is -2.0 = -8 * 0.25, so the grid is recovered: x = scale*(L-8).
        for (i, &v) in x.iter().enumerate() {
            assert_eq!(scale * (l[i] as f32 - 8.0), v, "i={i}");
        }
    }
}
