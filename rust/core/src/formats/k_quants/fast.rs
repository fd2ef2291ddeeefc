//! Path selection for the fast K-quant quantizers (`avx2.rs`, `avx2_sym.rs`), and the portable
//! lane version of the q4_K / q5_K reference search: the same scalar sequence as
//! `common::make_qkx2_quants`, run for the 8 sub-blocks of a super-block side by side in 8
//! lanes (`[f32; 8]` arrays, lane `j` = sub-block `j`, element `i` of every sub-block at step
//! `i`). Each lane performs exactly the operations of the scalar reference in the same order:
//! the sums over `i` stay sequential per lane, only the independent sub-blocks run in parallel,
//! and branches become per-lane selects of values the scalar code would have computed (a lane
//! may compute a candidate the scalar code skips, e.g. when `D <= 0`, but its result is then
//! discarded, as the scalar code never computes it). So the bytes are identical to the scalar
//! reference, which the unit tests below and tests/test_k_quants.py check.
//!
//! The portable lane code is plain Rust (LLVM vectorizes it only partly: about 1.5x the scalar
//! reference); where the CPU has AVX2 (`cpu::avx2_detected`) the intrinsics of `avx2.rs`
//! and `avx2_sym.rs` run instead (q4_K: about 7x the reference per core), for all five types
//! with and without an imatrix. FERROQUANT_FORCE_SCALAR=1 (read once) selects the scalar
//! references, for tests and comparisons.

use super::common::{nearest_int, AsymSearch};
use super::q4_k::{self, pack_q4, ref_scales, requantize, Q4K_REF};
use super::q5_k::{self, pack_q5, Q5K_REF};
use super::{q2_k, q3_k, q6_k};
use crate::formats::blocks::{BlockQ4K, BlockQ5K, QK_K};

const LANES: usize = 8;
type F8 = [f32; LANES];

/// `make_qkx2_quants(32, nmax, x, weights, ...)` with `use_mad = false` for the 8 sub-blocks of
/// a super-block at once. `xt[i][j]` / `wt[i][j]` are element `i` of sub-block `j`; the levels
/// go to `lt[i][j]`. Returns (scales, -mins).
#[inline(always)]
fn qkx2_lanes(p: AsymSearch, xt: &[F8; 32], wt: &[F8; 32], lt: &mut [[u8; LANES]; 32]) -> (F8, F8) {
    debug_assert!(!p.use_mad && p.nstep >= 1);
    let nmax = p.nmax;
    let nmax_f = nmax as f32;
    let mut min = xt[0];
    let mut max = xt[0];
    let mut sum_w = wt[0];
    let mut sum_x = [0f32; LANES];
    for k in 0..LANES {
        sum_x[k] = sum_w[k] * xt[0][k];
    }
    for i in 1..32 {
        for k in 0..LANES {
            let x = xt[i][k];
            min[k] = if x < min[k] { x } else { min[k] };
            max[k] = if x > max[k] { x } else { max[k] };
            sum_w[k] += wt[i][k];
            sum_x[k] += wt[i][k] * x;
        }
    }
    let mut degenerate = [false; LANES];
    let mut iscale = [0f32; LANES];
    let mut scale = [0f32; LANES];
    for k in 0..LANES {
        min[k] = if min[k] > 0.0 { 0.0 } else { min[k] };
        degenerate[k] = max[k] == min[k];
        iscale[k] = nmax_f / (max[k] - min[k]);
        scale[k] = 1.0 / iscale[k];
    }
    let min0 = min;
    // Levels are kept as f32 (exact small integers) while searching.
    let mut lbest = [[0f32; LANES]; 32];
    let mut best_error = [0f32; LANES];
    for i in 0..32 {
        for k in 0..LANES {
            let l = nearest_int(iscale[k] * (xt[i][k] - min[k])).clamp(0, nmax) as f32;
            lbest[i][k] = l;
            let diff = scale[k] * l + min[k] - xt[i][k];
            best_error[k] += wt[i][k] * (diff * diff);
        }
    }
    let mut laux = [[0f32; LANES]; 32];
    for is in 0..=p.nstep {
        let num = p.rmin + p.rdelta * is as f32 + nmax_f;
        for k in 0..LANES {
            iscale[k] = num / (max[k] - min[k]);
        }
        let mut sum_l = [0f32; LANES];
        let mut sum_l2 = [0f32; LANES];
        let mut sum_xl = [0f32; LANES];
        for i in 0..32 {
            for k in 0..LANES {
                let l = nearest_int(iscale[k] * (xt[i][k] - min[k])).clamp(0, nmax) as f32;
                laux[i][k] = l;
                let w = wt[i][k];
                sum_l[k] += w * l;
                sum_l2[k] += w * l * l;
                sum_xl[k] += w * l * xt[i][k];
            }
        }
        let mut this_scale = [0f32; LANES];
        let mut this_min = [0f32; LANES];
        let mut ok = [false; LANES];
        for k in 0..LANES {
            let d = sum_w[k] * sum_l2[k] - sum_l[k] * sum_l[k];
            ok[k] = d > 0.0;
            let ts = (sum_w[k] * sum_xl[k] - sum_x[k] * sum_l[k]) / d;
            let tm = (sum_l2[k] * sum_x[k] - sum_l[k] * sum_xl[k]) / d;
            let pos = tm > 0.0;
            this_min[k] = if pos { 0.0 } else { tm };
            this_scale[k] = if pos { sum_xl[k] / sum_l2[k] } else { ts };
        }
        let mut cur_error = [0f32; LANES];
        for i in 0..32 {
            for k in 0..LANES {
                let diff = this_scale[k] * laux[i][k] + this_min[k] - xt[i][k];
                cur_error[k] += wt[i][k] * (diff * diff);
            }
        }
        let mut take = [false; LANES];
        for k in 0..LANES {
            take[k] = ok[k] && cur_error[k] < best_error[k];
            best_error[k] = if take[k] { cur_error[k] } else { best_error[k] };
            scale[k] = if take[k] { this_scale[k] } else { scale[k] };
            min[k] = if take[k] { this_min[k] } else { min[k] };
        }
        for i in 0..32 {
            for k in 0..LANES {
                lbest[i][k] = if take[k] { laux[i][k] } else { lbest[i][k] };
            }
        }
    }
    let mut neg_min = [0f32; LANES];
    for k in 0..LANES {
        scale[k] = if degenerate[k] { 0.0 } else { scale[k] };
        neg_min[k] = if degenerate[k] { -min0[k] } else { -min[k] };
    }
    for i in 0..32 {
        for k in 0..LANES {
            lt[i][k] = if degenerate[k] { 0 } else { lbest[i][k] as u8 };
        }
    }
    (scale, neg_min)
}

/// `q4_k::ref_search` through the lanes: transpose, weights `sqrt(sum(x^2)/32) + |x|` (the sum
/// in index order per lane), search, levels back in row order.
#[inline(always)]
fn ref_search_lanes<S>(p: AsymSearch, x: &[f32], l_all: &mut [u8; QK_K], search: S) -> (F8, F8)
where
    S: Fn(AsymSearch, &[F8; 32], &[F8; 32], &mut [[u8; LANES]; 32]) -> (F8, F8),
{
    let mut xt = [[0f32; LANES]; 32];
    for k in 0..LANES {
        for i in 0..32 {
            xt[i][k] = x[32 * k + i];
        }
    }
    let mut sum_x2 = [0f32; LANES];
    for row in &xt {
        for k in 0..LANES {
            sum_x2[k] += row[k] * row[k];
        }
    }
    let mut av_x = [0f32; LANES];
    for k in 0..LANES {
        av_x[k] = (sum_x2[k] / 32.0).sqrt();
    }
    let mut wt = [[0f32; LANES]; 32];
    for i in 0..32 {
        for k in 0..LANES {
            wt[i][k] = av_x[k] + xt[i][k].abs();
        }
    }
    let mut lt = [[0u8; LANES]; 32];
    let r = search(p, &xt, &wt, &mut lt);
    for k in 0..LANES {
        for i in 0..32 {
            l_all[32 * k + i] = lt[i][k];
        }
    }
    r
}

#[inline(always)]
fn q4_k_lanes<S>(x: &[f32], out: &mut [u8], search: S)
where
    S: Fn(AsymSearch, &[F8; 32], &[F8; 32], &mut [[u8; LANES]; 32]) -> (F8, F8),
{
    let blocks: &mut [BlockQ4K] = bytemuck::cast_slice_mut(out);
    let mut l_all = [0u8; QK_K];
    for (b, x) in blocks.iter_mut().zip(x.chunks_exact(QK_K)) {
        let (scales, mins) = ref_search_lanes(Q4K_REF, x, &mut l_all, &search);
        (b.scales, b.d, b.dmin) = ref_scales(&scales, &mins);
        requantize(x, &b.scales, b.d, b.dmin, 15, &mut l_all);
        pack_q4(&l_all, &mut b.qs);
    }
}

#[inline(always)]
fn q5_k_lanes<S>(x: &[f32], out: &mut [u8], search: S)
where
    S: Fn(AsymSearch, &[F8; 32], &[F8; 32], &mut [[u8; LANES]; 32]) -> (F8, F8),
{
    let blocks: &mut [BlockQ5K] = bytemuck::cast_slice_mut(out);
    let mut l_all = [0u8; QK_K];
    for (b, x) in blocks.iter_mut().zip(x.chunks_exact(QK_K)) {
        let (scales, mins) = ref_search_lanes(Q5K_REF, x, &mut l_all, &search);
        (b.scales, b.d, b.dmin) = ref_scales(&scales, &mins);
        requantize(x, &b.scales, b.d, b.dmin, 31, &mut l_all);
        pack_q5(&l_all, b);
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    pub use super::super::avx2::quantize_row_q2_k as q2_k_avx2;
    pub use super::super::avx2::{quantize_row_q4_k as q4_k_avx2, quantize_row_q5_k as q5_k_avx2};
    pub use super::super::avx2_sym::{
        quantize_row_q3_k as q3_k_avx2, quantize_row_q6_k as q6_k_avx2,
    };

    /// The AVX2 paths need AVX2 only; an explicitly requested one runs even when forced scalar
    /// (`default_path` honours the switch).
    pub use crate::cpu::avx2_detected as has_avx2;
}

/// Which implementation the `quantize_row_*` functions of this module run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Path {
    /// The scalar references of q4_k.rs / q5_k.rs.
    Scalar,
    /// The lane code, baseline target.
    Lanes,
    /// The search in AVX2 intrinsics (`avx2.rs`).
    Avx2,
}

/// The best path this CPU supports (unless FERROQUANT_FORCE_SCALAR is set).
pub fn default_path() -> Path {
    if crate::cpu::force_scalar() {
        return Path::Scalar;
    }
    #[cfg(target_arch = "x86_64")]
    if x86::has_avx2() {
        return Path::Avx2;
    }
    Path::Lanes
}

/// q4_K without an imatrix by `path` (falls back to `Lanes` where the CPU lacks the feature).
pub fn quantize_row_q4_k_with(path: Path, x: &[f32], out: &mut [u8]) {
    match path {
        Path::Scalar => q4_k::quantize_row_q4_k_ref(x, out),
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the function only needs AVX2, which `has_avx2` just confirmed at run time.
        Path::Avx2 if x86::has_avx2() => unsafe { x86::q4_k_avx2(x, out, None) },
        _ => q4_k_lanes(x, out, qkx2_lanes),
    }
}

/// q4_K with an imatrix `qw` by `path` (the lane code exists only for AVX2: other paths run
/// the scalar `quantize_row_q4_K_impl`).
pub fn quantize_row_q4_k_impl_with(path: Path, x: &[f32], out: &mut [u8], qw: &[f32]) {
    match path {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the function only needs AVX2, which `has_avx2` just confirmed at run time.
        Path::Avx2 if x86::has_avx2() => unsafe { x86::q4_k_avx2(x, out, Some(qw)) },
        _ => q4_k::quantize_row_q4_k_impl(x, out, qw),
    }
}

/// q4_K with an imatrix: bytes of `quantize_row_q4_K_impl`, by the fastest path.
pub fn quantize_row_q4_k_impl(x: &[f32], out: &mut [u8], qw: &[f32]) {
    quantize_row_q4_k_impl_with(default_path(), x, out, qw)
}

/// q5_K without an imatrix by `path` (falls back to `Lanes` where the CPU lacks the feature).
pub fn quantize_row_q5_k_with(path: Path, x: &[f32], out: &mut [u8]) {
    match path {
        Path::Scalar => q5_k::quantize_row_q5_k_ref(x, out),
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the function only needs AVX2, which `has_avx2` just confirmed at run time.
        Path::Avx2 if x86::has_avx2() => unsafe { x86::q5_k_avx2(x, out, None) },
        _ => q5_k_lanes(x, out, qkx2_lanes),
    }
}

/// q5_K with an imatrix `qw` by `path` (the lane code exists only for AVX2: other paths run
/// the scalar `quantize_row_q5_K_impl`).
pub fn quantize_row_q5_k_impl_with(path: Path, x: &[f32], out: &mut [u8], qw: &[f32]) {
    match path {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the function only needs AVX2, which `has_avx2` just confirmed at run time.
        Path::Avx2 if x86::has_avx2() => unsafe { x86::q5_k_avx2(x, out, Some(qw)) },
        _ => q5_k::quantize_row_q5_k_impl(x, out, qw),
    }
}

/// q5_K with an imatrix: bytes of `quantize_row_q5_K_impl`, by the fastest path.
pub fn quantize_row_q5_k_impl(x: &[f32], out: &mut [u8], qw: &[f32]) {
    quantize_row_q5_k_impl_with(default_path(), x, out, qw)
}

/// q2_K with or without an imatrix by `path` (the lane code exists only for AVX2: other paths
/// run the scalar reference).
pub fn quantize_row_q2_k_with(path: Path, x: &[f32], out: &mut [u8], qw: Option<&[f32]>) {
    match (path, qw) {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the function only needs AVX2, which `has_avx2` just confirmed at run time.
        (Path::Avx2, _) if x86::has_avx2() => unsafe { x86::q2_k_avx2(x, out, qw) },
        (_, None) => q2_k::quantize_row_q2_k_ref(x, out),
        (_, Some(w)) => q2_k::quantize_row_q2_k_impl(x, out, w),
    }
}

/// q2_K: bytes of `quantize_row_q2_K_ref` / `_impl`, by the fastest path.
pub fn quantize_row_q2_k(x: &[f32], out: &mut [u8], qw: Option<&[f32]>) {
    quantize_row_q2_k_with(default_path(), x, out, qw)
}

/// q3_K with or without an imatrix by `path` (the lane code exists only for AVX2: other paths
/// run the scalar reference).
pub fn quantize_row_q3_k_with(path: Path, x: &[f32], out: &mut [u8], qw: Option<&[f32]>) {
    match (path, qw) {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the function only needs AVX2, which `has_avx2` just confirmed at run time.
        (Path::Avx2, _) if x86::has_avx2() => unsafe { x86::q3_k_avx2(x, out, qw) },
        (_, None) => q3_k::quantize_row_q3_k_ref(x, out),
        (_, Some(w)) => q3_k::quantize_row_q3_k_impl(x, out, w),
    }
}

/// q3_K: bytes of `quantize_row_q3_K_ref` / `_impl`, by the fastest path.
pub fn quantize_row_q3_k(x: &[f32], out: &mut [u8], qw: Option<&[f32]>) {
    quantize_row_q3_k_with(default_path(), x, out, qw)
}

/// q6_K with or without an imatrix by `path` (the lane code exists only for AVX2: other paths
/// run the scalar reference).
pub fn quantize_row_q6_k_with(path: Path, x: &[f32], out: &mut [u8], qw: Option<&[f32]>) {
    match (path, qw) {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the function only needs AVX2, which `has_avx2` just confirmed at run time.
        (Path::Avx2, _) if x86::has_avx2() => unsafe { x86::q6_k_avx2(x, out, qw) },
        (_, None) => q6_k::quantize_row_q6_k_ref(x, out),
        (_, Some(w)) => q6_k::quantize_row_q6_k_impl(x, out, w),
    }
}

/// q6_K: bytes of `quantize_row_q6_K_ref` / `_impl`, by the fastest path.
pub fn quantize_row_q6_k(x: &[f32], out: &mut [u8], qw: Option<&[f32]>) {
    quantize_row_q6_k_with(default_path(), x, out, qw)
}

/// q4_K without an imatrix: bytes of `quantize_row_q4_K_ref`, by the fastest path.
pub fn quantize_row_q4_k(x: &[f32], out: &mut [u8]) {
    quantize_row_q4_k_with(default_path(), x, out)
}

/// q5_K without an imatrix: bytes of `quantize_row_q5_K_ref`, by the fastest path.
pub fn quantize_row_q5_k(x: &[f32], out: &mut [u8]) {
    quantize_row_q5_k_with(default_path(), x, out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Deterministic test rows: smooth, noisy, constant, zero, one-signed and spiky blocks.
    fn rows(seed: u64) -> Vec<f32> {
        let mut s = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
        let mut rnd = move || {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s >> 40) as f32 / (1u64 << 24) as f32 - 0.5
        };
        let mut x = Vec::with_capacity(16 * QK_K);
        for blk in 0..16 {
            for i in 0..QK_K {
                let v = rnd();
                x.push(match blk % 8 {
                    0 => v,
                    1 => v * 1e-6,
                    2 => (i % 32) as f32 * 0.1 - 1.0,
                    3 => 0.75,
                    4 => 0.0,
                    5 => v.abs() + 3.0,
                    6 => -(v.abs()) * 100.0,
                    _ => {
                        if i % 37 == 0 {
                            v * 1e4
                        } else {
                            v * 0.01
                        }
                    }
                });
            }
        }
        x
    }

    /// The non-reference paths this CPU can run.
    fn paths() -> Vec<Path> {
        #[cfg(target_arch = "x86_64")]
        if x86::has_avx2() {
            return vec![Path::Lanes, Path::Avx2];
        }
        vec![Path::Lanes]
    }

    /// Timing of the paths on one thread: `cargo test --release -p ferroquant-core
    /// time_paths -- --ignored --nocapture`.
    #[test]
    #[ignore]
    fn time_paths() {
        let x: Vec<f32> = (0..64)
            .flat_map(|s| rows(s)[..QK_K * 16].to_vec())
            .collect();
        let x = &x[..QK_K * 16 * 64];
        let mut o = vec![0u8; 16 * 64 * 144];
        let mut all = vec![Path::Scalar];
        all.extend(paths());
        // CPU time of this thread (/proc/thread-self/schedstat, Linux), robust to a busy machine.
        let cpu = || -> f64 {
            let s = std::fs::read_to_string("/proc/thread-self/schedstat").unwrap_or_default();
            s.split_whitespace()
                .next()
                .and_then(|v| v.parse().ok())
                .unwrap_or(0.0)
                / 1e9
        };
        for path in all {
            let mut best = f64::MAX;
            let reps = if path == Path::Scalar { 4 } else { 40 };
            for _ in 0..3 {
                let t = cpu();
                for _ in 0..reps {
                    quantize_row_q4_k_with(path, x, &mut o);
                }
                best = best.min(cpu() - t);
            }
            let rate = (reps * x.len()) as f64 / best / 1e6;
            println!("q4_k {path:?}: {rate:.1} M weights/s (thread CPU time)");
        }
    }

    #[test]
    fn lanes_equal_the_scalar_reference() {
        for seed in 0..4 {
            // 16 blocks, or 15 (the AVX2 path runs pairs of blocks and then a single one)
            let x = rows(seed);
            let x = &x[..QK_K * (15 + seed as usize % 2)];
            let nb = x.len() / QK_K;
            let mut r4 = vec![0u8; nb * 144];
            let mut r5 = vec![0u8; nb * 176];
            quantize_row_q4_k_with(Path::Scalar, x, &mut r4);
            quantize_row_q5_k_with(Path::Scalar, x, &mut r5);
            for path in paths() {
                let mut o4 = vec![0u8; nb * 144];
                let mut o5 = vec![0u8; nb * 176];
                quantize_row_q4_k_with(path, x, &mut o4);
                quantize_row_q5_k_with(path, x, &mut o5);
                assert_eq!(o4, r4, "q4_k {path:?} seed {seed}");
                assert_eq!(o5, r5, "q5_k {path:?} seed {seed}");
            }
            let qw: Vec<f32> = (0..x.len())
                .map(|i| (i * 7919 % 13) as f32 * 0.25)
                .collect();
            let mut r4 = vec![0u8; nb * 144];
            let mut r5 = vec![0u8; nb * 176];
            q4_k::quantize_row_q4_k_impl(x, &mut r4, &qw);
            q5_k::quantize_row_q5_k_impl(x, &mut r5, &qw);
            for path in paths() {
                let mut o4 = vec![0u8; nb * 144];
                let mut o5 = vec![0u8; nb * 176];
                quantize_row_q4_k_impl_with(path, x, &mut o4, &qw);
                quantize_row_q5_k_impl_with(path, x, &mut o5, &qw);
                assert_eq!(o4, r4, "q4_k imatrix {path:?} seed {seed}");
                assert_eq!(o5, r5, "q5_k imatrix {path:?} seed {seed}");
            }
            for w in [None, Some(&qw[..])] {
                let mut r3 = vec![0u8; nb * 110];
                let mut r2 = vec![0u8; nb * 84];
                quantize_row_q3_k_with(Path::Scalar, x, &mut r3, w);
                quantize_row_q2_k_with(Path::Scalar, x, &mut r2, w);
                for path in paths() {
                    let mut o3 = vec![0u8; nb * 110];
                    let mut o2 = vec![0u8; nb * 84];
                    quantize_row_q3_k_with(path, x, &mut o3, w);
                    quantize_row_q2_k_with(path, x, &mut o2, w);
                    let im = w.is_some();
                    assert_eq!(o3, r3, "q3_k {path:?} seed {seed} imatrix {im}");
                    assert_eq!(o2, r2, "q2_k {path:?} seed {seed} imatrix {im}");
                }
            }
            // q6_K, without and with importance weights (some of them zero)
            let qw: Vec<f32> = (0..x.len())
                .map(|i| (i * 7919 % 13) as f32 * 0.25)
                .collect();
            for w in [None, Some(&qw[..])] {
                let mut r6 = vec![0u8; nb * 210];
                quantize_row_q6_k_with(Path::Scalar, x, &mut r6, w);
                for path in paths() {
                    let mut o6 = vec![0u8; nb * 210];
                    quantize_row_q6_k_with(path, x, &mut o6, w);
                    assert_eq!(o6, r6, "q6_k {path:?} seed {seed} imatrix {}", w.is_some());
                }
            }
        }
    }
}
