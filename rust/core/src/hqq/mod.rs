//! HQQ (half-quadratic quantization, Badri & Shaji 2023): the calibration-free zero-point
//! solver, and (`store`) the tensors it writes in existing formats.
//!
//! **Solver** (the `hqq` package's default, `optimize_weights_proximal_legacy`, hqq 0.2.8).
//! Groups of `group` consecutive weights; per group an inverse scale `s` and a float zero `z`
//! with `w ~ (q - z) / s`, `q` in `0..=maxq`. Start (`Quantizer.quantize`): `s = maxq / (max -
//! min)` (1 when `|max - min| <= 1e-4`), capped at 2e4, `z = -min * s`. Each step, for the whole
//! tensor:
//!
//! ```text
//! q = clamp(round_half_even(w * s + z), 0, maxq);  r = w - (q - z) / s
//! e = sign(r) * max(|r| - (1/beta) * |r|^(p-1), 0)          (the lp shrinkage, p = lp_norm)
//! z = mean over the group of (q - (w - e) * s)
//! ```
//! then the package's early stop: the step's mean |r| over the whole tensor (before the zero
//! update) must improve on the best so far, else the loop ends, keeping the zero that step
//! computed. `beta` grows by `kappa` after each step (the paper; the package's legacy solver
//! keeps it fixed: `kappa = 1` reproduces it). `s` is not updated (the package's default).
//!
//! **Arithmetic, defined here once.** f32 throughout, as the package on the CPU, in its
//! operation order (no FMA: Rust never contracts). The package's torch reductions have their
//! own summation order; ours is fixed: a group's sums go into 8 interleaved partial sums
//! (element `j` into lane `j % 8`, in order) combined as `((l0+l1)+(l2+l3))+((l4+l5)+(l6+l7))`,
//! and the tensor's mean |r| is the f64 sum of the groups' f32 sums in group order. So the
//! result depends on nothing but the input (not the thread count), and the vectorised path can
//! reproduce the reference bit for bit.
//!
//! `solve_reference` is the plain transcription (whole-tensor passes like the package's torch
//! code, the shrinkage evaluated everywhere). `solve` is the fast path: the tensor transposed
//! once into group-major blocks (`lanes`: 16 groups side by side, one per vector lane, so each
//! lane runs the reference's operations on its own group in the reference's order, without
//! horizontal sums), one fused pass per block and step (16 groups of 64 are 4 KiB: they stay in
//! L1), blocks in parallel (rayon), compiled for AVX-512 or AVX2 where the CPU has them. The
//! shrinkage is evaluated only for errors of at least `0.999 * beta^(-1/(2-p))`: below it
//! `|r| - |r|^(p-1)/beta < 0` with a margin of 0.13 % that f32 `powf` rounding (< 1e-6
//! relative) cannot cross, so `e = 0` exactly and `w - e == w`.
//! Tests compare the two bit for bit, and the reference with the package live (Python).

mod int_zero;
mod lanes;
pub mod store;

use lanes::V;

use rayon::prelude::*;

use crate::error::{Error, Result};
use crate::parallel;

/// The solver's options; defaults are the package's (`lp_norm` 0.7, `beta` 10, `kappa` 1.01,
/// 20 iterations, early stop).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct HqqConfig {
    pub lp_norm: f32,
    pub beta: f64,
    pub kappa: f64,
    pub iters: u32,
    pub early_stop: bool,
}

impl Default for HqqConfig {
    fn default() -> Self {
        Self {
            lp_norm: 0.7,
            beta: 10.0,
            kappa: 1.01,
            iters: 20,
            early_stop: true,
        }
    }
}

impl HqqConfig {
    /// Reject options the solver is not defined for.
    pub fn check(&self) -> Result<()> {
        let p_ok = self.lp_norm > 0.0 && self.lp_norm <= 1.0;
        let beta_ok = self.beta > 0.0 && self.beta.is_finite();
        let kappa_ok = self.kappa >= 1.0 && self.kappa.is_finite();
        if !(p_ok && beta_ok && kappa_ok && self.iters >= 1) {
            return Err(Error::InvalidArgument(format!(
                "hqq needs 0 < lp_norm <= 1, beta > 0, kappa >= 1, iters >= 1; got lp_norm={}, \
                 beta={}, kappa={}, iters={}",
                self.lp_norm, self.beta, self.kappa, self.iters
            )));
        }
        Ok(())
    }
}

/// HQQ's float parameters per group: inverse scale and zero (`w ~ (q - zero) / inv_scale`),
/// and the number of steps run.
#[derive(Clone, Debug, PartialEq)]
pub struct Solved {
    pub inv_scale: Vec<f32>,
    pub zero: Vec<f32>,
    pub steps: u32,
}

const LANES: usize = 8;

#[inline(always)]
fn lane_sum(a: &[f32; LANES]) -> f32 {
    ((a[0] + a[1]) + (a[2] + a[3])) + ((a[4] + a[5]) + (a[6] + a[7]))
}

/// The package's start for one group: (inverse scale, zero).
pub fn init_group(x: &[f32], maxq: f32) -> (f32, f32) {
    let mut mn = f32::INFINITY;
    let mut mx = f32::NEG_INFINITY;
    for &v in x {
        // explicit comparisons (not `min` / `max`, whose choice between -0 and +0 is left to
        // the instruction): the lanes of `init_block` make the same choices
        mn = if v < mn { v } else { mn };
        mx = if v > mx { v } else { mx };
    }
    init_from_range(mn, mx, maxq)
}

#[inline(always)]
fn init_from_range(mn: f32, mx: f32, maxq: f32) -> (f32, f32) {
    let den = mx - mn;
    let s = if den.abs() <= 1e-4 { 1.0 } else { maxq / den };
    let s = s.min(2e4);
    (s, -mn * s)
}

/// `init_group` for the 16 groups of a transposed block.
#[inline(always)]
fn init_block(xb: &[f32], maxq: f32, s: &mut [f32], z: &mut [f32]) {
    let mut mn = [f32::INFINITY; lanes::LANES];
    let mut mx = [f32::NEG_INFINITY; lanes::LANES];
    for x in xb.chunks_exact(lanes::LANES) {
        for l in 0..lanes::LANES {
            mn[l] = if x[l] < mn[l] { x[l] } else { mn[l] };
            mx[l] = if x[l] > mx[l] { x[l] } else { mx[l] };
        }
    }
    for l in 0..lanes::LANES {
        (s[l], z[l]) = init_from_range(mn[l], mx[l], maxq);
    }
}

/// Transpose a chunk of blocks from group `first` and compute their start (`init_block`).
#[inline(always)]
fn prepare_chunk(
    w: &[f32],
    group: usize,
    first: usize,
    wt: &mut [f32],
    s: &mut [f32],
    z: &mut [f32],
    maxq: f32,
) {
    let bl = group * lanes::LANES;
    for (b, blk) in wt.chunks_exact_mut(bl).enumerate() {
        lanes::transpose_block(w, group, first + b * lanes::LANES, blk);
        let span = b * lanes::LANES..(b + 1) * lanes::LANES;
        init_block(blk, maxq, &mut s[span.clone()], &mut z[span]);
    }
}

/// `prepare_chunk` compiled for AVX-512 (the same operations: identical results).
///
/// # Safety
/// The CPU must support AVX-512 F/BW/VL (`crate::cpu::has_avx512`).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma")]
unsafe fn prepare_chunk_avx512(
    w: &[f32],
    group: usize,
    first: usize,
    wt: &mut [f32],
    s: &mut [f32],
    z: &mut [f32],
    maxq: f32,
) {
    prepare_chunk(w, group, first, wt, s, z, maxq)
}

fn run_prepare_chunk(
    w: &[f32],
    group: usize,
    first: usize,
    wt: &mut [f32],
    s: &mut [f32],
    z: &mut [f32],
    maxq: f32,
) {
    #[cfg(target_arch = "x86_64")]
    if crate::cpu::has_avx512() {
        // SAFETY: has_avx512 checked the CPU at run time.
        unsafe { prepare_chunk_avx512(w, group, first, wt, s, z, maxq) };
        return;
    }
    prepare_chunk(w, group, first, wt, s, z, maxq)
}

/// The lp shrinkage of one error; +0 where it vanishes (so `w - e` is `w` bit for bit).
#[inline(always)]
pub fn shrink(r: f32, inv_beta: f32, p: f32) -> f32 {
    let a = r.abs();
    let t = a - inv_beta * a.powf(p - 1.0);
    if t > 0.0 {
        t.copysign(r)
    } else {
        0.0
    }
}

#[inline(always)]
fn code(w: f32, s: f32, z: f32, maxq: f32) -> f32 {
    (w * s + z).round_ties_even().clamp(0.0, maxq)
}

fn check(w: &[f32], group: usize, bits: u8) -> Result<()> {
    if !(1..=8).contains(&bits) {
        return Err(Error::InvalidArgument(format!(
            "hqq bits must be 1..=8, got {bits}"
        )));
    }
    if group == 0 || w.is_empty() || !w.len().is_multiple_of(group) {
        return Err(Error::InvalidArgument(format!(
            "hqq: {} weights do not split into groups of {group}",
            w.len()
        )));
    }
    // a branch-free scan first (it vectorises; `position` alone does not), the index on failure
    let bad = w.iter().fold(0u32, |b, v| b | u32::from(!v.is_finite()));
    if let Some(i) = (bad != 0).then(|| w.iter().position(|v| !v.is_finite()).unwrap_or(0)) {
        return Err(Error::NonFinite {
            row: i / group,
            col: i % group,
            value: w[i],
        });
    }
    Ok(())
}

/// The threshold below which every error shrinks to exactly 0 (module comment).
fn skip_threshold(beta: f64, p: f32) -> f32 {
    (0.999 * beta.powf(-1.0 / (2.0 - p as f64))) as f32
}

/// The scalar reference: the module comment's steps as whole-tensor passes.
pub fn solve_reference(w: &[f32], group: usize, bits: u8, cfg: &HqqConfig) -> Result<Solved> {
    cfg.check()?;
    check(w, group, bits)?;
    let maxq = ((1u32 << bits) - 1) as f32;
    let n = w.len() / group;
    let (s, mut z): (Vec<f32>, Vec<f32>) =
        w.chunks_exact(group).map(|x| init_group(x, maxq)).unzip();
    let mut wq = vec![0f32; w.len()];
    let mut wr = vec![0f32; w.len()];
    let (mut best, mut beta, mut steps) = (f64::INFINITY, cfg.beta, 0);
    for _ in 0..cfg.iters {
        steps += 1;
        let inv_beta = (1.0 / beta) as f32;
        for i in 0..w.len() {
            let k = i / group;
            wq[i] = code(w[i], s[k], z[k], maxq);
            wr[i] = w[i] - (wq[i] - z[k]) / s[k];
        }
        let mut total = 0f64;
        for k in 0..n {
            let mut acc = [0f32; LANES];
            for j in 0..group {
                acc[j % LANES] += wr[k * group + j].abs();
            }
            total += lane_sum(&acc) as f64;
        }
        for k in 0..n {
            let mut acc = [0f32; LANES];
            for j in 0..group {
                let i = k * group + j;
                let e = shrink(wr[i], inv_beta, cfg.lp_norm);
                acc[j % LANES] += wq[i] - (w[i] - e) * s[k];
            }
            z[k] = lane_sum(&acc) / group as f32;
        }
        let current = total / w.len() as f64;
        if current < best {
            best = current;
        } else if cfg.early_stop {
            break;
        }
        beta *= cfg.kappa;
    }
    Ok(Solved {
        inv_scale: s,
        zero: z,
        steps,
    })
}

/// Per-step constants of the fused kernel.
#[derive(Clone, Copy)]
struct Step {
    maxq: f32,
    inv_beta: f32,
    p: f32,
    thr: f32,
}

/// The step of the reference for one group whose errors reach the threshold: the zero update
/// with the shrinkage (`shrink` only where `|r| >= thr`: below it, it is +0 exactly).
/// In three passes, so that only the few errors at or above the threshold take the scalar
/// `powf`: every term `q - (w - e) s` with `e = 0` (vectorised: `w - 0` is `w`), those terms
/// patched, then the reference's sums in its order (the same terms, the same additions).
/// `terms` / `errs`: scratch of at least `x.len()`.
#[inline(always)]
fn shrunk_zero(x: &[f32], s: f32, z: f32, c: Step, terms: &mut [f32], errs: &mut [f32]) -> f32 {
    let (terms, errs) = (&mut terms[..x.len()], &mut errs[..x.len()]);
    for ((t, r), &xv) in terms.iter_mut().zip(errs.iter_mut()).zip(x) {
        let qv = code(xv, s, z, c.maxq);
        *r = xv - (qv - z) / s;
        *t = qv - xv * s;
    }
    for (j, &rv) in errs.iter().enumerate() {
        if rv.abs() >= c.thr {
            let (xv, qv) = (x[j], code(x[j], s, z, c.maxq));
            terms[j] = qv - (xv - shrink(rv, c.inv_beta, c.p)) * s;
        }
    }
    let mut zacc = [0f32; LANES];
    let mut it = terms.chunks_exact(LANES);
    for ts in it.by_ref() {
        for (a, &t) in zacc.iter_mut().zip(ts) {
            *a += t;
        }
    }
    for (a, &t) in zacc.iter_mut().zip(it.remainder()) {
        *a += t;
    }
    lane_sum(&zacc) / x.len() as f32
}

/// One step for a block of 16 groups (`lanes`), fused: per lane the new zero as if every
/// shrinkage were 0, the sum of |r|, and the largest |r| (the caller redoes a lane whose errors
/// reach the threshold with `shrunk_zero`: rare, errors are in weight units, the threshold near
/// 0.17). Each lane runs the reference's operations on its group in the reference's order.
/// (Evaluating the shrinkage inside this loop instead, for the few errors that need it, costs
/// the loop its vectorisation: measured 10x slower.)
#[inline(always)]
fn step_block(xb: &[f32], group: usize, s: &V, z: &V, c: Step) -> (V, V, V) {
    let mut acc = [[0f32; lanes::LANES]; LANES];
    let mut zacc = [[0f32; lanes::LANES]; LANES];
    let mut big = [0f32; lanes::LANES];
    let mut one = |u: usize, x: &[f32]| {
        for l in 0..lanes::LANES {
            let xv = x[l];
            let ws = xv * s[l];
            let qv = (ws + z[l]).round_ties_even().clamp(0.0, c.maxq);
            let a = (xv - (qv - z[l]) / s[l]).abs();
            acc[u][l] += a;
            big[l] = if a > big[l] { a } else { big[l] };
            zacc[u][l] += qv - ws;
        }
    };
    // whole runs of 8 weights (lane `j % 8` of the reference), then the tail
    let mut it = xb.chunks_exact(LANES * lanes::LANES);
    for xs in it.by_ref() {
        for (u, x) in xs.chunks_exact(lanes::LANES).enumerate() {
            one(u, x);
        }
    }
    for (u, x) in it.remainder().chunks_exact(lanes::LANES).enumerate() {
        one(u, x);
    }
    let gn = group as f32;
    let mut zn = lanes::tree_sum(&zacc);
    for v in zn.iter_mut() {
        *v /= gn;
    }
    (zn, lanes::tree_sum(&acc), big)
}

/// One step over a chunk of blocks: `wt` transposed blocks, `s` / `z` / `sums` per group
/// (padded to whole blocks), `w` the whole tensor and `first` the chunk's first group.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn step_chunk(
    wt: &[f32],
    w: &[f32],
    group: usize,
    first: usize,
    s: &[f32],
    z: &mut [f32],
    sums: &mut [f32],
    c: Step,
) {
    let n = w.len() / group;
    let (mut terms, mut errs) = (Vec::new(), Vec::new());
    for (b, xb) in wt.chunks_exact(group * lanes::LANES).enumerate() {
        let span = b * lanes::LANES..(b + 1) * lanes::LANES;
        let sv: &V = s[span.clone()].try_into().unwrap();
        let zv: V = z[span.clone()].try_into().unwrap();
        let (zn, abs, big) = step_block(xb, group, sv, &zv, c);
        for l in 0..lanes::LANES {
            let i = span.start + l;
            sums[i] = abs[l];
            z[i] = if big[l] < c.thr {
                zn[l]
            } else {
                let k = (first + i).min(n - 1);
                if terms.is_empty() {
                    (terms, errs) = (vec![0f32; group], vec![0f32; group]);
                }
                let x = &w[k * group..(k + 1) * group];
                shrunk_zero(x, sv[l], zv[l], c, &mut terms, &mut errs)
            };
        }
    }
}

/// `step_chunk` compiled for AVX-512 (the same operations: identical results).
///
/// # Safety
/// The CPU must support AVX-512 F/BW/VL (`crate::cpu::has_avx512`).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma")]
#[allow(clippy::too_many_arguments)]
unsafe fn step_chunk_avx512(
    wt: &[f32],
    w: &[f32],
    group: usize,
    first: usize,
    s: &[f32],
    z: &mut [f32],
    sums: &mut [f32],
    c: Step,
) {
    step_chunk(wt, w, group, first, s, z, sums, c)
}

/// `step_chunk` compiled for AVX2 (the same operations: identical results).
///
/// # Safety
/// The CPU must support AVX2 (`crate::cpu::has_avx2`).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
#[allow(clippy::too_many_arguments)]
unsafe fn step_chunk_avx2(
    wt: &[f32],
    w: &[f32],
    group: usize,
    first: usize,
    s: &[f32],
    z: &mut [f32],
    sums: &mut [f32],
    c: Step,
) {
    step_chunk(wt, w, group, first, s, z, sums, c)
}

#[allow(clippy::too_many_arguments)]
fn run_step_chunk(
    wt: &[f32],
    w: &[f32],
    group: usize,
    first: usize,
    s: &[f32],
    z: &mut [f32],
    sums: &mut [f32],
    c: Step,
) {
    #[cfg(target_arch = "x86_64")]
    {
        if crate::cpu::has_avx512() {
            // SAFETY: has_avx512 checked the CPU at run time.
            unsafe { step_chunk_avx512(wt, w, group, first, s, z, sums, c) };
            return;
        }
        if crate::cpu::has_avx2() {
            // SAFETY: has_avx2 checked the CPU at run time.
            unsafe { step_chunk_avx2(wt, w, group, first, s, z, sums, c) };
            return;
        }
    }
    step_chunk(wt, w, group, first, s, z, sums, c)
}

/// The fast path: bit-identical to `solve_reference` (tested), for any thread count. The
/// tensor is transposed once into group-major blocks (`lanes`); each step is one fused pass
/// over them, blocks in parallel.
pub fn solve(w: &[f32], group: usize, bits: u8, cfg: &HqqConfig) -> Result<Solved> {
    solve_blocks(w, group, bits, cfg).map(|(sol, _)| sol)
}

/// `solve`, also returning its transposed blocks (`lanes`: groups `16 b ..` at `16 b group`,
/// padded with the last group) for the integer-zero search to reuse.
pub(crate) fn solve_blocks(
    w: &[f32],
    group: usize,
    bits: u8,
    cfg: &HqqConfig,
) -> Result<(Solved, Vec<f32>)> {
    cfg.check()?;
    check(w, group, bits)?;
    let maxq = ((1u32 << bits) - 1) as f32;
    let n = w.len() / group;
    let nb = n.div_ceil(lanes::LANES);
    let per_task = parallel::rows_per_task(nb, group * lanes::LANES);
    let (gs, bs) = (per_task * lanes::LANES, per_task * lanes::LANES * group);
    let mut wt = vec![0f32; nb * lanes::LANES * group];
    let mut s = vec![0f32; nb * lanes::LANES];
    let mut z = vec![0f32; nb * lanes::LANES];
    parallel::install(|| {
        wt.par_chunks_mut(bs)
            .zip(s.par_chunks_mut(gs))
            .zip(z.par_chunks_mut(gs))
            .enumerate()
            .for_each(|(t, ((wc, sc), zc))| run_prepare_chunk(w, group, t * gs, wc, sc, zc, maxq))
    });
    let mut sums = vec![0f32; nb * lanes::LANES];
    let (mut best, mut beta, mut steps) = (f64::INFINITY, cfg.beta, 0);
    for _ in 0..cfg.iters {
        steps += 1;
        let c = Step {
            maxq,
            inv_beta: (1.0 / beta) as f32,
            p: cfg.lp_norm,
            thr: skip_threshold(beta, cfg.lp_norm),
        };
        parallel::install(|| {
            wt.par_chunks(bs)
                .zip(s.par_chunks(gs))
                .zip(z.par_chunks_mut(gs))
                .zip(sums.par_chunks_mut(gs))
                .enumerate()
                .for_each(|(t, (((wc, sc), zc), uc))| {
                    run_step_chunk(wc, w, group, t * gs, sc, zc, uc, c)
                })
        });
        let total = sums[..n].iter().fold(0f64, |t, &v| t + v as f64);
        let current = total / w.len() as f64;
        if current < best {
            best = current;
        } else if cfg.early_stop {
            break;
        }
        beta *= cfg.kappa;
    }
    s.truncate(n);
    z.truncate(n);
    let sol = Solved {
        inv_scale: s,
        zero: z,
        steps,
    };
    Ok((sol, wt))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A deterministic heavy-tailed sample (xorshift + a cubic: outliers like real weights).
    pub(crate) fn sample(n: usize, seed: u64, scale: f32) -> Vec<f32> {
        let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let u = (x >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0;
                (scale as f64 * (u + 2.0 * u * u * u)) as f32
            })
            .collect()
    }

    fn same(a: &Solved, b: &Solved) -> bool {
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        a.steps == b.steps
            && bits(&a.inv_scale) == bits(&b.inv_scale)
            && bits(&a.zero) == bits(&b.zero)
    }

    #[test]
    fn fast_path_is_bit_identical_to_the_reference() {
        for (n, group, bits, scale, seed) in [
            (64 * 40, 64, 4, 0.02, 1),
            (32 * 33, 32, 3, 1.0, 2),
            (16 * 50, 16, 2, 30.0, 3),
            (100 * 7, 100, 5, 0.5, 4), // a group that is not a multiple of 8 lanes
            (128 * 9, 128, 4, 0.2, 5), // large errors: the shrinkage branch runs
        ] {
            let w = sample(n, seed, scale);
            for cfg in [
                HqqConfig::default(),
                HqqConfig {
                    kappa: 1.0,
                    ..HqqConfig::default()
                },
                HqqConfig {
                    lp_norm: 1.0,
                    beta: 0.5,
                    early_stop: false,
                    ..HqqConfig::default()
                },
            ] {
                let r = solve_reference(&w, group, bits, &cfg).unwrap();
                let f = solve(&w, group, bits, &cfg).unwrap();
                assert!(same(&r, &f), "n={n} group={group} bits={bits} {cfg:?}");
            }
        }
    }

    #[test]
    fn results_do_not_depend_on_the_thread_count() {
        let w = sample(64 * 300, 7, 0.05);
        let cfg = HqqConfig::default();
        let reference = solve_reference(&w, 64, 4, &cfg).unwrap();
        // the chunking follows the pool's size (rows_per_task); the results must not
        for threads in [1, 3, 0] {
            parallel::set_num_threads(threads);
            assert!(
                same(&reference, &solve(&w, 64, 4, &cfg).unwrap()),
                "{threads}"
            );
        }
    }

    #[test]
    fn the_solver_lowers_the_mean_abs_error_from_its_start() {
        let w = sample(64 * 200, 9, 0.03);
        let cfg = HqqConfig::default();
        let start = solve(&w, 64, 4, &HqqConfig { iters: 1, ..cfg }).unwrap();
        let done = solve(&w, 64, 4, &cfg).unwrap();
        let mae = |s: &Solved| {
            let mut t = 0f64;
            for (k, x) in w.chunks_exact(64).enumerate() {
                for &v in x {
                    let q = code(v, s.inv_scale[k], s.zero[k], 15.0);
                    t += (v - (q - s.zero[k]) / s.inv_scale[k]).abs() as f64;
                }
            }
            t
        };
        assert!(done.steps > 1);
        assert!(mae(&done) < mae(&start));
    }

    #[test]
    fn bad_input_is_an_error() {
        let cfg = HqqConfig::default();
        assert!(solve(&[1.0; 10], 4, 4, &cfg).is_err());
        assert!(solve(&[f32::NAN; 8], 4, 4, &cfg).is_err());
        assert!(solve(&[1.0; 8], 4, 9, &cfg).is_err());
        let bad = HqqConfig {
            lp_norm: 2.0,
            ..cfg
        };
        assert!(solve(&[1.0; 8], 4, 4, &bad).is_err());
        // a constant group: scale 1, the zero makes the grid hit the value
        let s = solve(&[0.25; 8], 8, 4, &cfg).unwrap();
        assert_eq!(s.inv_scale, vec![1.0]);
    }
}
