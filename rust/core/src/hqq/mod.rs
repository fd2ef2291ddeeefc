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
//! code, the shrinkage evaluated everywhere). `solve` is the fast path: one fused pass per group
//! per step (the group stays in L1), groups in parallel (rayon, per chunk of groups), AVX2 where
//! the CPU has it, and the shrinkage skipped for a group whose errors are all below
//! `0.999 * beta^(-1/(2-p))`: there `|r| - |r|^(p-1)/beta < 0` with a margin of 0.13 % that
//! f32 `powf` rounding (< 1e-6 relative) cannot cross, so `e = 0` exactly and `w - e == w`.
//! Tests compare the two bit for bit, and the reference with the package live (Python).

pub mod store;

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
        mn = mn.min(v);
        mx = mx.max(v);
    }
    let den = mx - mn;
    let s = if den.abs() <= 1e-4 { 1.0 } else { maxq / den };
    let s = s.min(2e4);
    (s, -mn * s)
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
    if let Some(i) = w.iter().position(|v| !v.is_finite()) {
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

/// One step for one group, fused: returns (new zero, sum of |r|). One pass computes the codes,
/// the errors, their sum and the zero update as if every shrinkage were 0; only a group with
/// an error above the threshold (rare: errors are in weight units, the threshold near 0.17)
/// runs a second pass with the shrinkage, recomputing its codes and errors the same way.
#[inline(always)]
fn step_group(x: &[f32], s: f32, z: f32, c: Step) -> (f32, f32) {
    let mut acc = [0f32; LANES];
    let mut big = [0f32; LANES];
    let mut zacc = [0f32; LANES];
    let mut lane = |l: usize, xv: f32| {
        let qv = code(xv, s, z, c.maxq);
        let rv = xv - (qv - z) / s;
        let a = rv.abs();
        acc[l] += a;
        big[l] = if a > big[l] { a } else { big[l] };
        zacc[l] += qv - xv * s;
    };
    // whole chunks of 8 (fixed trip count: one vector per chunk), then the tail
    let mut it = x.chunks_exact(LANES);
    for xs in it.by_ref() {
        for (l, &xv) in xs.iter().enumerate() {
            lane(l, xv);
        }
    }
    for (l, &xv) in it.remainder().iter().enumerate() {
        lane(l, xv);
    }
    let abs_sum = lane_sum(&acc);
    if !big.iter().all(|&b| b < c.thr) {
        zacc = [0f32; LANES];
        for (j, &xv) in x.iter().enumerate() {
            let qv = code(xv, s, z, c.maxq);
            let rv = xv - (qv - z) / s;
            zacc[j % LANES] += qv - (xv - shrink(rv, c.inv_beta, c.p)) * s;
        }
    }
    (lane_sum(&zacc) / x.len() as f32, abs_sum)
}

/// One step over a chunk of groups.
#[inline(always)]
fn step_chunk(w: &[f32], group: usize, s: &[f32], z: &mut [f32], sums: &mut [f32], c: Step) {
    for (k, x) in w.chunks_exact(group).enumerate() {
        (z[k], sums[k]) = step_group(x, s[k], z[k], c);
    }
}

/// `step_chunk` compiled for AVX2 (the same operations: identical results).
///
/// # Safety
/// The CPU must support AVX2 (`crate::cpu::has_avx2`).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn step_chunk_avx2(
    w: &[f32],
    group: usize,
    s: &[f32],
    z: &mut [f32],
    sums: &mut [f32],
    c: Step,
) {
    step_chunk(w, group, s, z, sums, c)
}

fn run_step_chunk(w: &[f32], group: usize, s: &[f32], z: &mut [f32], sums: &mut [f32], c: Step) {
    #[cfg(target_arch = "x86_64")]
    if crate::cpu::has_avx2() {
        // SAFETY: has_avx2 checked the CPU at run time.
        unsafe { step_chunk_avx2(w, group, s, z, sums, c) };
        return;
    }
    step_chunk(w, group, s, z, sums, c)
}

/// The fast path: bit-identical to `solve_reference` (tested), for any thread count.
pub fn solve(w: &[f32], group: usize, bits: u8, cfg: &HqqConfig) -> Result<Solved> {
    cfg.check()?;
    check(w, group, bits)?;
    let maxq = ((1u32 << bits) - 1) as f32;
    let n = w.len() / group;
    let per_task = parallel::rows_per_task(n, group);
    let mut s = vec![0f32; n];
    let mut z = vec![0f32; n];
    parallel::install(|| {
        w.par_chunks(per_task * group)
            .zip(s.par_chunks_mut(per_task))
            .zip(z.par_chunks_mut(per_task))
            .for_each(|((wc, sc), zc)| {
                for ((x, sv), zv) in wc.chunks_exact(group).zip(sc).zip(zc) {
                    (*sv, *zv) = init_group(x, maxq);
                }
            })
    });
    let mut sums = vec![0f32; n];
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
            w.par_chunks(per_task * group)
                .zip(s.par_chunks(per_task))
                .zip(z.par_chunks_mut(per_task))
                .zip(sums.par_chunks_mut(per_task))
                .for_each(|(((wc, sc), zc), uc)| run_step_chunk(wc, group, sc, zc, uc, c))
        });
        let total = sums.iter().fold(0f64, |t, &v| t + v as f64);
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
