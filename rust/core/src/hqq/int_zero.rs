//! The integer-zero search of `store` (grouped integers), group-major: 16 groups per block, one
//! per vector lane (`lanes`). Each lane runs `store::search_int_zero` and the HQQ-or-RTN choice
//! of `store::gint_row` (the scalar reference) on its group with the same operations in the same
//! order, so the choices are the reference's bit for bit (tested); a lane whose candidate the
//! reference skips (a zero outside `0..=maxq`, a scale that is not finite and positive) runs on a
//! harmless stand-in and its result is masked out.

use rayon::prelude::*;

use super::lanes::{self, LANES, V};
use super::Solved;
use crate::formats::gint;
use crate::parallel;
use crate::qtype::GInt;

/// Integer-zero search: offsets around the rounded zero and fp16 scale factors (module comment).
/// (Measured on SmolLM2's blk.0 ffn_down, int4_g64, relative error: this search 0.0857 in 12
/// passes over a group; three zeros x 11 factors 0.90..1.10, each refitted, 0.0856 in 66
/// passes; the rounded zero with least squares alone 0.0890; the package's float zero 0.0743.)
pub(super) const SCALE_FACTORS: [f32; 5] = [0.90, 0.95, 1.0, 1.05, 1.10];

/// Codes `first .. first + out.len()` of a packed grouped row (`gint`'s bit stream), whole
/// bytes at a time where the span starts and ends on a byte (every group of the asymmetric
/// formats does: groups are multiples of 8), else code by code; the values of `gint::code`.
#[inline(always)]
pub(super) fn unpack(row: &[u8], bits: u8, first: usize, out: &mut [u8]) {
    if !(first.is_multiple_of(8) && out.len().is_multiple_of(8)) {
        for (j, o) in out.iter_mut().enumerate() {
            *o = gint::code(row, first + j, bits) as u8;
        }
        return;
    }
    let bytes = &row[first * bits as usize / 8..];
    match bits {
        4 => {
            for (o, &b) in out.chunks_exact_mut(2).zip(bytes) {
                (o[0], o[1]) = (b & 15, b >> 4);
            }
        }
        2 => {
            for (o, &b) in out.chunks_exact_mut(4).zip(bytes) {
                for (i, v) in o.iter_mut().enumerate() {
                    *v = (b >> (2 * i)) & 3;
                }
            }
        }
        3 => {
            for (o, t) in out.chunks_exact_mut(8).zip(bytes.chunks_exact(3)) {
                let v = t[0] as u32 | (t[1] as u32) << 8 | (t[2] as u32) << 16;
                for (i, c) in o.iter_mut().enumerate() {
                    *c = (v >> (3 * i)) as u8 & 7;
                }
            }
        }
        _ => {
            for (j, o) in out.iter_mut().enumerate() {
                *o = gint::code(row, first + j, bits) as u8;
            }
        }
    }
}

/// Write `codes` as codes `first ..` of a packed grouped row (the inverse of `unpack`; the bits
/// of the other codes are kept).
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

/// Squared error `(d s - x)^2`, `<x, d>` and `<d, d>` with `d = q - z` and nearest codes, per
/// lane, each in the reference's 8 interleaved partial sums (`store::grid_pass`).
#[inline(always)]
fn grid_pass(xt: &[f32], s: &V, z: &V, maxq: f32) -> (V, V, V) {
    let mut inv = [0f32; LANES];
    for l in 0..LANES {
        inv[l] = 1.0 / s[l];
    }
    let (mut e, mut xd, mut dd) = ([[0f32; LANES]; 8], [[0f32; LANES]; 8], [[0f32; LANES]; 8]);
    let mut one = |u: usize, x: &[f32]| {
        for l in 0..LANES {
            let v = x[l];
            let d = ((v * inv[l]).round_ties_even() + z[l]).clamp(0.0, maxq) - z[l];
            let r = d * s[l] - v;
            e[u][l] += r * r;
            xd[u][l] += v * d;
            dd[u][l] += d * d;
        }
    };
    let mut it = xt.chunks_exact(8 * LANES);
    for xs in it.by_ref() {
        for (u, x) in xs.chunks_exact(LANES).enumerate() {
            one(u, x);
        }
    }
    for (u, x) in it.remainder().chunks_exact(LANES).enumerate() {
        one(u, x);
    }
    (
        lanes::tree_sum(&e),
        lanes::tree_sum(&xd),
        lanes::tree_sum(&dd),
    )
}

/// Squared error in f64, summed in weight order, of the codes `q` (`ct`, or nearest when None)
/// decoded as `(q - z) s`, per lane.
#[inline(always)]
fn sq_err(xt: &[f32], ct: Option<&[f32]>, s: &V, z: &V, maxq: f32) -> [f64; LANES] {
    let mut inv = [0f32; LANES];
    for l in 0..LANES {
        inv[l] = 1.0 / s[l];
    }
    let mut acc = [0f64; LANES];
    for (j, x) in xt.chunks_exact(LANES).enumerate() {
        for l in 0..LANES {
            let q = match ct {
                Some(c) => c[j * LANES + l],
                None => ((x[l] * inv[l]).round_ties_even() + z[l]).clamp(0.0, maxq),
            };
            let d = ((q - z[l]) * s[l] - x[l]) as f64;
            acc[l] += d * d;
        }
    }
    acc
}

/// One block: per lane the (scale, zero) that replaces the RTN group, or None (RTN stays).
/// `xt` the weights and `ct` the RTN codes (transposed), `rs` / `rz` RTN's scale and zero,
/// `inv` / `zf` the solver's inverse scale and float zero.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn block(
    xt: &[f32],
    ct: &[f32],
    rs: &V,
    rz: &V,
    inv: &V,
    zf: &V,
    maxq: f32,
) -> [Option<(f32, f32)>; LANES] {
    let e_rtn = sq_err(xt, Some(ct), rs, rz, maxq);
    let (mut s0, mut zr, mut side) = ([0f32; LANES], [0f32; LANES], [0f32; LANES]);
    let mut ok0 = [false; LANES];
    for l in 0..LANES {
        s0[l] = gint::f16_round(1.0 / inv[l]);
        ok0[l] = s0[l] > 0.0 && s0[l].is_finite();
        zr[l] = zf[l].round_ties_even().clamp(0.0, maxq);
        side[l] = if zf[l] > zr[l] { 1.0 } else { -1.0 };
    }
    let mut best: [Option<(f32, f32, f32)>; LANES] = [None; LANES]; // (error, scale, zero)
    for t in 0..2 {
        let mut zc = zr;
        let mut zok = ok0;
        for l in 0..LANES {
            if t == 1 {
                zc[l] += side[l];
            }
            zok[l] &= (0.0..=maxq).contains(&zc[l]);
        }
        // the grid of scale factors, then one least-squares refit of its best point
        let mut grid: [Option<(f32, f32)>; LANES] = [None; LANES]; // (error, scale)
        let (mut gxd, mut gdd) = ([0f32; LANES], [0f32; LANES]);
        for f in SCALE_FACTORS {
            let (mut s, mut ok) = ([1f32; LANES], [false; LANES]);
            for l in 0..LANES {
                let v = gint::f16_round(s0[l] * f);
                ok[l] = zok[l] && v > 0.0 && v.is_finite();
                s[l] = if ok[l] { v } else { 1.0 };
            }
            let (e, xd, dd) = grid_pass(xt, &s, &zc, maxq);
            for l in 0..LANES {
                if ok[l] && grid[l].is_none_or(|g| e[l] < g.0) {
                    grid[l] = Some((e[l], s[l]));
                    (gxd[l], gdd[l]) = (xd[l], dd[l]);
                }
            }
        }
        let (mut s2, mut ok2) = ([1f32; LANES], [false; LANES]);
        for l in 0..LANES {
            if grid[l].is_some() && gdd[l] > 0.0 {
                let v = gint::f16_round(gxd[l] / gdd[l]);
                ok2[l] = v > 0.0 && v.is_finite();
                s2[l] = if ok2[l] { v } else { 1.0 };
            }
        }
        if ok2.iter().any(|&o| o) {
            let e2 = grid_pass(xt, &s2, &zc, maxq).0;
            for l in 0..LANES {
                if let Some(g) = grid[l].as_mut() {
                    if ok2[l] && e2[l] < g.0 {
                        *g = (e2[l], s2[l]);
                    }
                }
            }
        }
        for l in 0..LANES {
            if let Some((e, s)) = grid[l] {
                if best[l].is_none_or(|b| e < b.0) {
                    best[l] = Some((e, s, zc[l]));
                }
            }
        }
    }
    // HQQ's bytes where they decode with the smaller squared error
    let (mut s, mut z) = ([1f32; LANES], [0f32; LANES]);
    for l in 0..LANES {
        if let Some((_, bs, bz)) = best[l] {
            (s[l], z[l]) = (bs, bz);
        }
    }
    let e_hqq = sq_err(xt, None, &s, &z, maxq);
    let mut out = [None; LANES];
    for l in 0..LANES {
        if best[l].is_some() && e_hqq[l] < e_rtn[l] {
            out[l] = Some((s[l], z[l]));
        }
    }
    out
}

/// `block` over a chunk of blocks from `first` (group index): the transposes, then the search.
#[inline(always)]
fn chunk(job: &Job<'_>, first: usize, out: &mut [Option<(f32, f32)>]) {
    let gl = job.gl;
    let n = job.w.len() / gl;
    let (mut xt, mut ct) = (vec![0f32; gl * LANES], vec![0f32; gl * LANES]);
    let mut codes = vec![0u8; gl];
    for (b, ob) in out.chunks_mut(LANES).enumerate() {
        let f = first + b * LANES;
        lanes::transpose_block(job.w, gl, f, &mut xt);
        let (mut rs, mut rz) = ([0f32; LANES], [0f32; LANES]);
        for l in 0..LANES {
            let k = (f + l).min(n - 1);
            let (r, g) = (k / job.per_row, k % job.per_row);
            let row = &job.data[r * job.row_bytes..(r + 1) * job.row_bytes];
            unpack(row, job.g.bits, g * gl, &mut codes);
            for (j, &c) in codes.iter().enumerate() {
                ct[j * LANES + l] = c as f32;
            }
            let st = &job.stats[r * 2 * job.per_row..(r + 1) * 2 * job.per_row];
            (rs[l], rz[l]) = (st[g], st[job.per_row + g]);
        }
        let inv = lanes::gather(&job.sol.inv_scale, f);
        let zf = lanes::gather(&job.sol.zero, f);
        let res = block(&xt, &ct, &rs, &rz, &inv, &zf, job.maxq);
        let len = ob.len();
        ob.copy_from_slice(&res[..len]);
    }
}

/// `chunk` compiled for AVX-512 (the same operations: identical results).
///
/// # Safety
/// The CPU must support AVX-512 F/BW/VL (`crate::cpu::has_avx512`).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma")]
unsafe fn chunk_avx512(job: &Job<'_>, first: usize, out: &mut [Option<(f32, f32)>]) {
    chunk(job, first, out)
}

/// `chunk` compiled for AVX2 (the same operations: identical results).
///
/// # Safety
/// The CPU must support AVX2 (`crate::cpu::has_avx2`).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn chunk_avx2(job: &Job<'_>, first: usize, out: &mut [Option<(f32, f32)>]) {
    chunk(job, first, out)
}

fn run_chunk(job: &Job<'_>, first: usize, out: &mut [Option<(f32, f32)>]) {
    #[cfg(target_arch = "x86_64")]
    {
        if crate::cpu::has_avx512() {
            // SAFETY: has_avx512 checked the CPU at run time.
            unsafe { chunk_avx512(job, first, out) };
            return;
        }
        if crate::cpu::has_avx2() {
            // SAFETY: has_avx2 checked the CPU at run time.
            unsafe { chunk_avx2(job, first, out) };
            return;
        }
    }
    chunk(job, first, out)
}

/// A grouped tensor's RTN bytes, the weights and the solver's parameters.
pub struct Job<'a> {
    pub w: &'a [f32],
    pub g: GInt,
    pub gl: usize,
    pub per_row: usize,
    pub row_bytes: usize,
    pub data: &'a [u8],
    pub stats: &'a [f32],
    pub sol: &'a Solved,
    pub maxq: f32,
}

/// Per group (row-major order), the (scale, zero) of the HQQ bytes that replace RTN's, or None.
pub fn choose(job: &Job<'_>) -> Vec<Option<(f32, f32)>> {
    let n = job.w.len() / job.gl;
    let per_task = parallel::rows_per_task(n.div_ceil(LANES), job.gl * LANES) * LANES;
    let mut out = vec![None; n];
    parallel::install(|| {
        out.par_chunks_mut(per_task)
            .enumerate()
            .for_each(|(t, oc)| run_chunk(job, t * per_task, oc))
    });
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unpack_and_pack_are_gints_bit_stream() {
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
                let mut got = vec![0u8; len];
                unpack(&row, bits, first, &mut got);
                let want: Vec<u8> = codes[first..first + len].iter().map(|&c| c as u8).collect();
                assert_eq!(got, want, "unpack bits={bits} {first}+{len}");
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
