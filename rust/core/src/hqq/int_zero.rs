//! The grouped-integer tensor of `store`, group-major: 16 groups per block, one per vector lane
//! (`lanes`), on the solver's own transposed blocks (`solve_blocks`: no second transpose). Each
//! lane computes the format's round-to-nearest group (`gint::quantize`'s rule, fused here: no
//! separate RTN tensor), runs `store::search_int_zero` and the HQQ-or-RTN choice of
//! `store::gint_row` (the scalar reference, which starts from `gint::quantize`'s bytes) on its
//! group with the same operations in the same order, so the bytes are the reference's bit for
//! bit (tested); a lane whose candidate the reference skips (a zero outside `0..=maxq`, a scale
//! that is not finite and positive) runs on a harmless stand-in and its result is masked out.
//! Each grid point's pass computes only its error; the least-squares moments are computed for
//! the winning point alone (the reference computes them for every point and uses that one's).

use rayon::prelude::*;

use super::lanes::{self, LANES, V};
use super::Solved;
use crate::parallel;

/// Integer-zero search: offsets around the rounded zero and fp16 scale factors (module comment).
/// (Measured on SmolLM2's blk.0 ffn_down, int4_g64, relative error: this search 0.0857 in 12
/// passes over a group; three zeros x 11 factors 0.90..1.10, each refitted, 0.0856 in 66
/// passes; the rounded zero with least squares alone 0.0890; the package's float zero 0.0743.)
pub(super) const SCALE_FACTORS: [f32; 5] = [0.90, 0.95, 1.0, 1.05, 1.10];

/// Write `codes` as codes `first ..` of a packed grouped row (`gint`'s bit stream; the bits of
/// the other codes are kept), whole bytes at a time where the span starts and ends on a byte.
#[inline(always)]
pub(super) fn pack(codes: &[u8], bits: u8, first: usize, row: &mut [u8]) {
    let b = bits as usize;
    if !(first.is_multiple_of(8) && codes.len().is_multiple_of(8)) {
        for (j, &c) in codes.iter().enumerate() {
            let bit = (first + j) * b;
            let v = ((c as u32) & ((1 << b) - 1)) << (bit % 8);
            let m = ((1u32 << b) - 1) << (bit % 8);
            row[bit / 8] = (row[bit / 8] & !(m as u8)) | v as u8;
            if bit % 8 + b > 8 {
                row[bit / 8 + 1] = (row[bit / 8 + 1] & !((m >> 8) as u8)) | (v >> 8) as u8;
            }
        }
        return;
    }
    let bytes = &mut row[first * b / 8..];
    match bits {
        4 => {
            for (o, c) in bytes.iter_mut().zip(codes.chunks_exact(2)) {
                *o = c[0] | c[1] << 4;
            }
        }
        2 => {
            for (o, c) in bytes.iter_mut().zip(codes.chunks_exact(4)) {
                *o = c[0] | c[1] << 2 | c[2] << 4 | c[3] << 6;
            }
        }
        3 => {
            for (o, c) in bytes.chunks_exact_mut(3).zip(codes.chunks_exact(8)) {
                let v = c
                    .iter()
                    .enumerate()
                    .fold(0u32, |v, (i, &x)| v | (x as u32) << (3 * i));
                o.copy_from_slice(&v.to_le_bytes()[..3]);
            }
        }
        _ => {
            for (o, &c) in bytes.iter_mut().zip(codes) {
                *o = c;
            }
        }
    }
}

/// Runs of 8 weights (partial sum `u` = weight `j % 8`, the reference's lanes), then the tail:
/// `one(u, x)` for each weight row `x` (16 lanes) of a transposed block.
#[inline(always)]
fn for_each_run(xt: &[f32], mut one: impl FnMut(usize, &[f32])) {
    let mut it = xt.chunks_exact(8 * LANES);
    for xs in it.by_ref() {
        for (u, x) in xs.chunks_exact(LANES).enumerate() {
            one(u, x);
        }
    }
    for (u, x) in it.remainder().chunks_exact(LANES).enumerate() {
        one(u, x);
    }
}

/// `clamp(round(t) + z, 0, maxq) - z` for an integer zero `z` in `0..=maxq`, as two operations
/// fewer: `round(t)` is an integer, so adding and subtracting `z` is exact wherever the clamp
/// does not bind (|round(t)| < 2^24 - 2^8), and where it binds both give `-z` or `maxq - z`.
#[inline(always)]
fn code_offset(t: f32, z: f32, maxq: f32) -> f32 {
    t.round_ties_even().max(-z).min(maxq - z)
}

/// `grid_err` for two zeros with the same scales in one pass: `round(x / s)` is shared (the
/// two zero candidates of the search meet every grid scale), each sum is `grid_err`'s.
#[inline(always)]
fn grid_err2(xt: &[f32], s: &V, z0: &V, z1: &V, maxq: f32) -> (V, V) {
    let inv = inverse(s);
    let (mut e0, mut e1) = ([[0f32; LANES]; 8], [[0f32; LANES]; 8]);
    for_each_run(xt, |u, x| {
        for l in 0..LANES {
            let v = x[l];
            let t = (v * inv[l]).round_ties_even();
            let r0 = t.max(-z0[l]).min(maxq - z0[l]) * s[l] - v;
            let r1 = t.max(-z1[l]).min(maxq - z1[l]) * s[l] - v;
            e0[u][l] += r0 * r0;
            e1[u][l] += r1 * r1;
        }
    });
    (lanes::tree_sum(&e0), lanes::tree_sum(&e1))
}

/// Per lane, `1 / s`.
#[inline(always)]
fn inverse(s: &V) -> V {
    let mut inv = [0f32; LANES];
    for l in 0..LANES {
        inv[l] = 1.0 / s[l];
    }
    inv
}

/// Squared error `(d s - x)^2` with `d = q - z` and nearest codes, per lane, in the reference's
/// 8 interleaved partial sums (`store::grid_pass`'s first result).
#[inline(always)]
fn grid_err(xt: &[f32], s: &V, z: &V, maxq: f32) -> V {
    let inv = inverse(s);
    let mut e = [[0f32; LANES]; 8];
    for_each_run(xt, |u, x| {
        for l in 0..LANES {
            let v = x[l];
            let d = code_offset(v * inv[l], z[l], maxq);
            let r = d * s[l] - v;
            e[u][l] += r * r;
        }
    });
    lanes::tree_sum(&e)
}

/// `<x, d>` and `<d, d>` of the same codes (`store::grid_pass`'s other two results, the same
/// sums): only needed for a zero's best grid point, so not computed in every grid pass.
#[inline(always)]
fn grid_moments(xt: &[f32], s: &V, z: &V, maxq: f32) -> (V, V) {
    let inv = inverse(s);
    let (mut xd, mut dd) = ([[0f32; LANES]; 8], [[0f32; LANES]; 8]);
    for_each_run(xt, |u, x| {
        for l in 0..LANES {
            let v = x[l];
            let d = code_offset(v * inv[l], z[l], maxq);
            xd[u][l] += v * d;
            dd[u][l] += d * d;
        }
    });
    (lanes::tree_sum(&xd), lanes::tree_sum(&dd))
}

/// Squared error in f64, summed in weight order, of the nearest codes decoded as `(q - z) s`,
/// per lane (`store::gint_row`'s HQQ error).
#[inline(always)]
fn sq_err(xt: &[f32], s: &V, z: &V, maxq: f32) -> [f64; LANES] {
    let inv = inverse(s);
    let mut acc = [0f64; LANES];
    for x in xt.chunks_exact(LANES) {
        for l in 0..LANES {
            let d = (code_offset(x[l] * inv[l], z[l], maxq) * s[l] - x[l]) as f64;
            acc[l] += d * d;
        }
    }
    acc
}

/// The format's round-to-nearest group (`gint::group_params` and `gint::quantize_value`,
/// asymmetric) per lane: the f32 scale the codes are rounded with and the integer zero.
/// (`gint`'s `round_even` leaves values of at least 2^22 as they are; every such value is
/// clamped to 0 or `maxq` here, so rounding them first changes nothing.)
#[inline(always)]
fn rtn_params(xt: &[f32], maxq: f32) -> (V, V) {
    // min(min(x), 0) and max(max(x), 0); inputs are finite, so only the sign of a zero could
    // differ from `f32::min` / `max`, and neither the scale nor the zero depends on it
    let (mut mn, mut mx) = ([0f32; LANES], [0f32; LANES]);
    for x in xt.chunks_exact(LANES) {
        for l in 0..LANES {
            mn[l] = if x[l] < mn[l] { x[l] } else { mn[l] };
            mx[l] = if x[l] > mx[l] { x[l] } else { mx[l] };
        }
    }
    let (mut scale, mut zero) = ([0f32; LANES], [0f32; LANES]);
    for l in 0..LANES {
        let (mut lo, mut hi) = (mn[l], mx[l]);
        if lo == 0.0 && hi == 0.0 {
            (lo, hi) = (lo - 1.0, hi + 1.0);
        }
        let mut s = (hi - lo) / maxq;
        if s == 0.0 {
            s = f32::MIN_POSITIVE;
        }
        scale[l] = s;
        // through u32 as `gint` stores it: +0, never -0
        zero[l] = (-lo / s).round_ties_even().clamp(0.0, maxq) as u32 as f32;
    }
    (scale, zero)
}

/// RTN's squared error in f64, in weight order: its codes (rounded with the f32 `scale`)
/// decoded with the stored fp16 scale `rs`, per lane (`store::gint_row`'s RTN error).
#[inline(always)]
fn rtn_err(xt: &[f32], scale: &V, zero: &V, rs: &V, maxq: f32) -> [f64; LANES] {
    let mut acc = [0f64; LANES];
    for x in xt.chunks_exact(LANES) {
        for l in 0..LANES {
            let q = ((x[l] / scale[l]).round_ties_even() + zero[l]).clamp(0.0, maxq);
            let d = ((q - zero[l]) * rs[l] - x[l]) as f64;
            acc[l] += d * d;
        }
    }
    acc
}

/// What a group stores: the format's RTN group (codes rounded with the f32 `scale`, stored
/// scale its fp16 value), or the search's HQQ group (nearest codes of the fp16 `scale`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Pick {
    Rtn { scale: f32, zero: f32 },
    Hqq { scale: f32, zero: f32 },
}

impl Pick {
    /// The (scale, zero) the format stores.
    pub fn stored(self) -> (f32, f32) {
        match self {
            Pick::Rtn { scale, zero } => (lanes::f16_round(scale), zero),
            Pick::Hqq { scale, zero } => (scale, zero),
        }
    }

    /// The group's codes for the weights `x`.
    #[inline(always)]
    fn codes(self, x: &[f32], maxq: f32, out: &mut [u8]) {
        match self {
            Pick::Rtn { scale, zero } => {
                for (o, &v) in out.iter_mut().zip(x) {
                    *o = ((v / scale).round_ties_even() + zero).clamp(0.0, maxq) as i32 as u8;
                }
            }
            Pick::Hqq { scale, zero } => {
                let inv = 1.0 / scale;
                for (o, &v) in out.iter_mut().zip(x) {
                    *o = ((v * inv).round_ties_even() + zero).clamp(0.0, maxq) as i32 as u8;
                }
            }
        }
    }
}

/// One block: per lane RTN's group, the search (`store::search_int_zero`), and the one of the
/// two that decodes with the smaller squared error (`store::gint_row`). `xt` the weights
/// (transposed), `inv` / `zf` the solver's inverse scale and float zero.
#[inline(always)]
fn block(xt: &[f32], inv: &V, zf: &V, maxq: f32) -> [Pick; LANES] {
    let (rscale, rzero) = rtn_params(xt, maxq);
    let mut rs = [0f32; LANES];
    for l in 0..LANES {
        rs[l] = lanes::f16_round(rscale[l]);
    }
    let e_rtn = rtn_err(xt, &rscale, &rzero, &rs, maxq);
    let (mut s0, mut zr, mut side) = ([0f32; LANES], [0f32; LANES], [0f32; LANES]);
    let mut ok0 = [false; LANES];
    for l in 0..LANES {
        s0[l] = lanes::f16_round(1.0 / inv[l]);
        ok0[l] = s0[l] > 0.0 && s0[l].is_finite();
        zr[l] = zf[l].round_ties_even().clamp(0.0, maxq);
        side[l] = if zf[l] > zr[l] { 1.0 } else { -1.0 };
    }
    // the zeros round(z) and its neighbour on z's side (t = 0, 1)
    let (mut zc, mut zok) = ([zr; 2], [ok0; 2]);
    for l in 0..LANES {
        zc[1][l] += side[l];
        for t in 0..2 {
            zok[t][l] &= (0.0..=maxq).contains(&zc[t][l]);
        }
    }
    // per zero the grid of scale factors (errors only, both zeros in one pass per factor), then
    // one least-squares refit of its best point (the moments computed for that point alone)
    let (mut ge, mut gs) = ([[0f32; LANES]; 2], [[1f32; LANES]; 2]);
    let mut ghas = [[false; LANES]; 2];
    for f in SCALE_FACTORS {
        let (mut s, mut valid) = ([1f32; LANES], [false; LANES]);
        for l in 0..LANES {
            let v = lanes::f16_round(s0[l] * f);
            valid[l] = v > 0.0 && v.is_finite();
            s[l] = if valid[l] { v } else { 1.0 };
        }
        let ok: [[bool; LANES]; 2] =
            std::array::from_fn(|t| std::array::from_fn(|l| zok[t][l] && valid[l]));
        if !ok.iter().flatten().any(|&o| o) {
            continue;
        }
        let (e0, e1) = grid_err2(xt, &s, &zc[0], &zc[1], maxq);
        for (t, e) in [e0, e1].iter().enumerate() {
            for l in 0..LANES {
                if ok[t][l] && (!ghas[t][l] || e[l] < ge[t][l]) {
                    (ge[t][l], gs[t][l], ghas[t][l]) = (e[l], s[l], true);
                }
            }
        }
    }
    // the best (error, scale, zero) per lane, zero 0 before zero 1; `has`: one was found
    let (mut be, mut bs, mut bz) = ([0f32; LANES], [1f32; LANES], [0f32; LANES]);
    let mut has = [false; LANES];
    for t in 0..2 {
        let (ge, gs, ghas, zc) = (&mut ge[t], &mut gs[t], &ghas[t], &zc[t]);
        if !ghas.iter().any(|&h| h) {
            continue;
        }
        let (gxd, gdd) = grid_moments(xt, gs, zc, maxq);
        let (mut s2, mut ok2) = ([1f32; LANES], [false; LANES]);
        for l in 0..LANES {
            if ghas[l] && gdd[l] > 0.0 {
                let v = lanes::f16_round(gxd[l] / gdd[l]);
                ok2[l] = v > 0.0 && v.is_finite();
                s2[l] = if ok2[l] { v } else { 1.0 };
            }
        }
        if ok2.iter().any(|&o| o) {
            let e2 = grid_err(xt, &s2, zc, maxq);
            for l in 0..LANES {
                if ok2[l] && e2[l] < ge[l] {
                    (ge[l], gs[l]) = (e2[l], s2[l]);
                }
            }
        }
        for l in 0..LANES {
            if ghas[l] && (!has[l] || ge[l] < be[l]) {
                (be[l], bs[l], bz[l], has[l]) = (ge[l], gs[l], zc[l], true);
            }
        }
    }
    // HQQ's group where it decodes with the smaller squared error
    let e_hqq = sq_err(xt, &bs, &bz, maxq);
    std::array::from_fn(|l| {
        if has[l] && e_hqq[l] < e_rtn[l] {
            Pick::Hqq {
                scale: bs[l],
                zero: bz[l],
            }
        } else {
            Pick::Rtn {
                scale: rscale[l],
                zero: rzero[l],
            }
        }
    })
}

/// The groups `first .. first + picks.len()` (`first` a multiple of 16): `block` on the
/// solver's transposed blocks, then each group's codes into its bytes `data`.
#[inline(always)]
fn chunk(job: &Job<'_>, first: usize, picks: &mut [Pick], data: &mut [u8]) {
    let gl = job.gl;
    for (b, pb) in picks.chunks_mut(LANES).enumerate() {
        let f = first + b * LANES;
        let xt = &job.wt[f * gl..(f + LANES) * gl];
        let inv = lanes::gather(&job.sol.inv_scale, f);
        let zf = lanes::gather(&job.sol.zero, f);
        let res = block(xt, &inv, &zf, job.maxq);
        pb.copy_from_slice(&res[..pb.len()]);
    }
    let gb = gl * job.bits as usize / 8;
    let mut codes = vec![0u8; gl];
    for (i, (p, out)) in picks.iter().zip(data.chunks_exact_mut(gb)).enumerate() {
        let k = first + i;
        p.codes(&job.w[k * gl..(k + 1) * gl], job.maxq, &mut codes);
        pack(&codes, job.bits, 0, out);
    }
}

/// `chunk` compiled for AVX-512 (the same operations: identical results).
///
/// # Safety
/// The CPU must support AVX-512 F/BW/VL (`crate::cpu::has_avx512`).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma")]
unsafe fn chunk_avx512(job: &Job<'_>, first: usize, picks: &mut [Pick], data: &mut [u8]) {
    chunk(job, first, picks, data)
}

/// `chunk` compiled for AVX2 (the same operations: identical results).
///
/// # Safety
/// The CPU must support AVX2 (`crate::cpu::has_avx2`).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn chunk_avx2(job: &Job<'_>, first: usize, picks: &mut [Pick], data: &mut [u8]) {
    chunk(job, first, picks, data)
}

fn run_chunk(job: &Job<'_>, first: usize, picks: &mut [Pick], data: &mut [u8]) {
    #[cfg(target_arch = "x86_64")]
    {
        if crate::cpu::has_avx512() {
            // SAFETY: has_avx512 checked the CPU at run time.
            unsafe { chunk_avx512(job, first, picks, data) };
            return;
        }
        if crate::cpu::has_avx2() {
            // SAFETY: has_avx2 checked the CPU at run time.
            unsafe { chunk_avx2(job, first, picks, data) };
            return;
        }
    }
    chunk(job, first, picks, data)
}

/// A grouped tensor: the weights (row-major, groups of `gl` in order), the solver's
/// parameters and its transposed blocks (`solve_blocks`).
pub struct Job<'a> {
    pub w: &'a [f32],
    pub wt: &'a [f32],
    pub bits: u8,
    pub gl: usize,
    pub sol: &'a Solved,
    pub maxq: f32,
}

/// The tensor's packed codes (`gint`'s layout: every group is whole bytes, in order) and, per
/// group, what it stores.
pub fn quantize(job: &Job<'_>) -> (Vec<u8>, Vec<Pick>) {
    let n = job.w.len() / job.gl;
    let gb = job.gl * job.bits as usize / 8;
    let per_task = parallel::rows_per_task(n.div_ceil(LANES), job.gl * LANES) * LANES;
    let mut picks = vec![
        Pick::Rtn {
            scale: 1.0,
            zero: 0.0
        };
        n
    ];
    let mut data = vec![0u8; n * gb];
    parallel::install(|| {
        picks
            .par_chunks_mut(per_task)
            .zip(data.par_chunks_mut(per_task * gb))
            .enumerate()
            .for_each(|(t, (pc, dc))| run_chunk(job, t * per_task, pc, dc))
    });
    (data, picks)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::formats::gint;

    #[test]
    fn pack_is_gints_bit_stream() {
        let mut x = 0x2545_F491_4F6C_DD1Du64;
        let mut rand = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        for bits in [2u8, 3, 4] {
            // aligned spans (whole bytes) and unaligned ones (code by code)
            for (first, len) in [(0, 64), (64, 64), (8, 16), (3, 7), (5, 64), (248, 8)] {
                let mut codes: Vec<u32> = (0..256).map(|_| rand() as u32 % (1 << bits)).collect();
                let mut row = vec![0u8; 256 * bits as usize / 8];
                gint::pack_row(&codes, bits, &mut row);
                let new: Vec<u8> = (0..len).map(|_| rand() as u8 % (1 << bits)).collect();
                pack(&new, bits, first, &mut row);
                for (c, &v) in codes[first..first + len].iter_mut().zip(&new) {
                    *c = v as u32;
                }
                let mut want_row = vec![0u8; row.len()];
                gint::pack_row(&codes, bits, &mut want_row);
                assert_eq!(row, want_row, "pack bits={bits} {first}+{len}");
            }
        }
    }
}
