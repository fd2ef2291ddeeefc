//! HQQ's parameters written as ordinary tensors of existing formats. Per format, from the
//! solver's per-group (inverse scale `s`, float zero `z`), `w ~ (q - z) / s`:
//!
//! - **Grouped integers** (`int{b}_g*`, asymmetric: fp16 scale, integer zero): the float zero
//!   cannot be stored, and rounding it alone gives back what the solver gained, so a joint
//!   search follows, in squared error (the stored decode `(q - z) * s`, f32): the integer zeros
//!   `round(z)` and its neighbour on `z`'s side, each with the fp16 scales `f16(1/s) * {0.90,
//!   0.95, 1, 1.05, 1.10}`, the best of these refitted once by least squares (`s = <w, q - z> /
//!   <q - z, q - z>`, fp16).
//! - **Grouped integers with float zeros** (`int{b}_g*_fz`): the solver's zero is stored as it
//!   is: scale `f16(1/s)`, zero `f16(z)`, codes the nearest levels of that stored grid
//!   (`gint::quantize_value_fz`).
//! - **q4_1 / q5_1** (fp16 `d`, fp16 minimum `m`, `x = d q + m`): the float zero is native:
//!   `d = f16(1/s)`, `m = f16(-z/s)`, codes the nearest levels of the stored grid.
//! - **q4_K / q5_K / q2_K**: the solver runs per sub-block (32 / 32 / 16 weights); sub-block
//!   scale `1/s` and min `max(z/s, 0)` (the format's mins are unsigned) are then quantized the
//!   format's own way (ggml's reference scale stage: 6-bit, or 4-bit for q2_K, fractions of the
//!   super-block maxima, fp16 `d` / `dmin`) and the codes requantized against them.
//!
//! Every block (a group, a 32-block, a 256-super-block) then keeps, of HQQ's bytes and the
//! format's round-to-nearest bytes, the ones that decode with the smaller squared error (f64):
//! an HQQ tensor's squared error is never above RTN's, block by block (the lp objective alone
//! does not bound the L2 error).

use std::borrow::Cow;

use crate::error::{Error, Result};
use crate::formats::blocks::{f16_from_f32, f16_to_f32, BlockQ2K, BlockQ4K, BlockQ4_1};
use crate::formats::blocks::{BlockQ5K, BlockQ5_1, QK_K};
use crate::formats::k_quants::{q2_k, q4_k, q5_k};
use crate::formats::{ggml_dequantize_row, gint, tensor::Quantized};
use crate::hqq::int_zero::{self, SCALE_FACTORS};
use crate::hqq::{solve, solve_blocks, HqqConfig, Solved};
use crate::input::{map_rows, Elems, Matrix};
use crate::qtype::{GInt, QType};
use crate::quantize::{quantize as quantize_rtn, Options, F16_MAX};

/// The qtypes HQQ writes (for error messages).
pub const SUPPORTED: &str = "the asymmetric grouped integer qtypes (int2/int3/int4 \
     _g32/_g64/_g128/_gch), their float-zero variants (int2/int3/int4 _g32/_g64/_g128 _fz), \
     q4_1, q5_1, q2_k, q4_k, q5_k";

/// (group, bits) of the solver for `qtype`, or None when the format has no zero point.
pub fn geometry(qtype: QType, cols: usize) -> Option<(usize, u8)> {
    use QType::*;
    match qtype {
        GInt(g) if !g.sym => Some((gint::group_len(g, cols), g.bits)),
        Q4_1 | Q4K => Some((32, 4)),
        Q5_1 | Q5K => Some((32, 5)),
        Q2K => Some((16, 2)),
        _ => None,
    }
}

/// `m` as an HQQ-optimised tensor of `qtype` (same layout as `crate::quantize`'s).
pub fn quantize(m: &Matrix<'_>, qtype: QType, cfg: &HqqConfig) -> Result<Quantized> {
    quantize_with(m, qtype, cfg, false)
}

/// `quantize`; `reference`: grouped integers through the scalar search (`gint_row`) instead of
/// the group-major one (`int_zero`), which must give the same bytes (tested).
pub fn quantize_with(
    m: &Matrix<'_>,
    qtype: QType,
    cfg: &HqqConfig,
    reference: bool,
) -> Result<Quantized> {
    cfg.check()?;
    let Some((group, bits)) = geometry(qtype, m.cols) else {
        return Err(Error::InvalidArgument(format!(
            "method hqq optimises zero points: {} has none; use {SUPPORTED}",
            qtype.name()
        )));
    };
    if let (QType::GInt(g), false) = (qtype, reference) {
        if g.float_zero {
            return float_zero_tensor(m, qtype, g, group, cfg);
        }
        return gint_tensor(m, qtype, g, group, cfg);
    }
    // the format's own tensor: its shape and range checks, and the RTN candidate of every block
    let mut q = quantize_rtn(m, qtype, &Options::default())?;
    let w = as_f32(m);
    let w: &[f32] = &w;
    let sol = solve(w, group, bits, cfg)?;
    let per_row = m.cols / group;
    let row_bytes = q.data.len() / m.rows;
    let stats_row = q.stats.len() / m.rows;
    let (data, stats) = (&mut q.data, &mut q.stats);
    match qtype {
        QType::GInt(g) => map_rows(m, data, row_bytes, stats, stats_row, |r, x, out, st| {
            gint_row_dispatch(g, x, &sol, r * per_row, out, st)
        }),
        _ => map_rows(m, data, row_bytes, &mut [], 0, |r, x, out, _| {
            ggml_row_dispatch(qtype, x, &sol, r * per_row, out)
        }),
    }
    Ok(q)
}

/// The weights as one f32 slice (borrowed when they are f32 already).
fn as_f32<'a>(m: &'a Matrix<'_>) -> Cow<'a, [f32]> {
    match m.elems {
        Elems::F32(v) => Cow::Borrowed(v),
        _ => {
            let mut buf = Vec::new();
            Cow::Owned(
                (0..m.rows)
                    .flat_map(|r| m.row(r, &mut buf).to_vec())
                    .collect(),
            )
        }
    }
}

/// The fast path for grouped integers: the format's checks, the solver, then `int_zero` on the
/// solver's transposed blocks (RTN candidate, search and codes in one pass per block; the same
/// bytes as the reference path, which starts from `crate::quantize`'s RTN tensor: tested).
fn gint_tensor(
    m: &Matrix<'_>,
    qtype: QType,
    g: GInt,
    group: usize,
    cfg: &HqqConfig,
) -> Result<Quantized> {
    // `crate::quantize`'s checks for the format, in its order: value range, then row length
    m.check_range(F16_MAX, qtype.name())?;
    gint::check_shape(qtype, g, m.rows, m.cols)?;
    let w = as_f32(m);
    let (sol, wt) = solve_blocks(&w, group, g.bits, cfg)?;
    let (data, picks) = int_zero::quantize(&int_zero::Job {
        w: &w,
        wt: &wt,
        bits: g.bits,
        gl: group,
        sol: &sol,
        maxq: ((1u32 << g.bits) - 1) as f32,
    });
    let per_row = m.cols / group;
    let mut stats = vec![0f32; m.rows * 2 * per_row];
    for (st, row) in stats
        .chunks_exact_mut(2 * per_row)
        .zip(picks.chunks_exact(per_row))
    {
        for (k, p) in row.iter().enumerate() {
            (st[k], st[per_row + k]) = p.stored();
        }
    }
    Ok(Quantized {
        qtype,
        rows: m.rows,
        cols: m.cols,
        block_size: group,
        scale_mode: None,
        data,
        stats,
        double_quant: None,
    })
}

/// The fast path for float zeros: the format's checks, the solver, then one pass per row that
/// computes each group's RTN candidate (`gint::group_params_fz`) and the solver's stored one,
/// keeps the smaller squared error and packs (the same bytes as the reference path, which
/// starts from `crate::quantize`'s RTN tensor: tested).
fn float_zero_tensor(
    m: &Matrix<'_>,
    qtype: QType,
    g: GInt,
    group: usize,
    cfg: &HqqConfig,
) -> Result<Quantized> {
    m.check_range(F16_MAX, qtype.name())?;
    gint::check_shape(qtype, g, m.rows, m.cols)?;
    let w = as_f32(m);
    let sol = solve(&w, group, g.bits, cfg)?;
    let per_row = m.cols / group;
    let row_bytes = qtype.row_bytes(m.cols, group);
    let mut data = vec![0u8; m.rows * row_bytes];
    let mut stats = vec![0f32; m.rows * 2 * per_row];
    map_rows(
        m,
        &mut data,
        row_bytes,
        &mut stats,
        2 * per_row,
        |r, x, out, st| float_zero_row_dispatch(g, x, &sol, r * per_row, out, st),
    );
    Ok(Quantized {
        qtype,
        rows: m.rows,
        cols: m.cols,
        block_size: group,
        scale_mode: None,
        data,
        stats,
        double_quant: None,
    })
}

/// Codes of `x` on the float-zero grid `(s, z)` into `codes`, and their squared error: f64
/// squares of the f32 decode errors, summed in 8 interleaved lanes (vectorisable), then the
/// lanes in order. Both paths (`float_zero_row`, `gint_row`) compare candidates with it.
#[inline(always)]
fn fz_codes(x: &[f32], s: f32, z: f32, maxq: u32, codes: &mut [u32]) -> f64 {
    for (c, &v) in codes.iter_mut().zip(x) {
        *c = gint::quantize_value_fz(v, s, z, maxq);
    }
    let mut lanes = [0f64; 8];
    for (cc, xc) in codes.chunks_exact(8).zip(x.chunks_exact(8)) {
        for l in 0..8 {
            let d = ((cc[l] as f32 - z) * s - xc[l]) as f64;
            lanes[l] += d * d;
        }
    }
    lanes.iter().sum()
}

#[inline(always)]
fn float_zero_row(g: GInt, x: &[f32], sol: &Solved, first: usize, out: &mut [u8], st: &mut [f32]) {
    let gl = g.group as usize;
    let groups = x.len() / gl;
    let maxq = (1u32 << g.bits) - 1;
    let gb = gl * g.bits as usize / 8;
    let (mut rtn, mut alt) = ([0u32; 128], [0u32; 128]);
    for (k, xg) in x.chunks_exact(gl).enumerate() {
        let (mut s, mut z) = gint::group_params_fz(g, xg);
        let e_rtn = fz_codes(xg, s, z, maxq, &mut rtn[..gl]);
        let mut best = &rtn;
        let (hs, hz) = (
            gint::f16_round(1.0 / sol.inv_scale[first + k]),
            gint::f16_round(sol.zero[first + k]),
        );
        if hs >= half::f16::MIN_POSITIVE.to_f32() && hs.is_finite() && hz.is_finite() {
            let e_hqq = fz_codes(xg, hs, hz, maxq, &mut alt[..gl]);
            if e_hqq < e_rtn {
                (best, s, z) = (&alt, hs, hz);
            }
        }
        gint::pack_row(&best[..gl], g.bits, &mut out[k * gb..(k + 1) * gb]);
        (st[k], st[groups + k]) = (s, z);
    }
}

fn float_zero_row_dispatch(
    g: GInt,
    x: &[f32],
    sol: &Solved,
    first: usize,
    out: &mut [u8],
    st: &mut [f32],
) {
    #[cfg(target_arch = "x86_64")]
    if crate::cpu::has_avx2() {
        // SAFETY: has_avx2 checked the CPU at run time.
        unsafe { float_zero_row_avx2(g, x, sol, first, out, st) };
        return;
    }
    float_zero_row(g, x, sol, first, out, st)
}

/// # Safety
/// The CPU must support AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn float_zero_row_avx2(
    g: GInt,
    x: &[f32],
    sol: &Solved,
    first: usize,
    out: &mut [u8],
    st: &mut [f32],
) {
    float_zero_row(g, x, sol, first, out, st)
}

/// The row functions compiled for AVX2 where the CPU has it (rounding is one instruction there
/// instead of a libm call; the same operations, identical results).
fn gint_row_dispatch(
    g: GInt,
    x: &[f32],
    sol: &Solved,
    first: usize,
    out: &mut [u8],
    st: &mut [f32],
) {
    #[cfg(target_arch = "x86_64")]
    if crate::cpu::has_avx2() {
        // SAFETY: has_avx2 checked the CPU at run time.
        unsafe { gint_row_avx2(g, x, sol, first, out, st) };
        return;
    }
    gint_row(g, x, sol, first, out, st)
}

/// # Safety
/// The CPU must support AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn gint_row_avx2(
    g: GInt,
    x: &[f32],
    sol: &Solved,
    first: usize,
    out: &mut [u8],
    st: &mut [f32],
) {
    gint_row(g, x, sol, first, out, st)
}

fn ggml_row_dispatch(qtype: QType, x: &[f32], sol: &Solved, first: usize, out: &mut [u8]) {
    #[cfg(target_arch = "x86_64")]
    if crate::cpu::has_avx2() {
        // SAFETY: has_avx2 checked the CPU at run time.
        unsafe { ggml_row_avx2(qtype, x, sol, first, out) };
        return;
    }
    ggml_row(qtype, x, sol, first, out)
}

/// # Safety
/// The CPU must support AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn ggml_row_avx2(qtype: QType, x: &[f32], sol: &Solved, first: usize, out: &mut [u8]) {
    ggml_row(qtype, x, sol, first, out)
}

#[inline(always)]
fn nearest(x: f32, inv: f32, z: f32, maxq: f32) -> f32 {
    ((x * inv).round_ties_even() + z).clamp(0.0, maxq)
}

/// Squared error of the grid `s (q - z)` with nearest codes, and `<x, d>`, `<d, d>` (d = q - z),
/// each summed in 8 interleaved lanes (vectorisable).
#[inline(always)]
fn grid_pass(x: &[f32], s: f32, z: f32, maxq: f32) -> (f32, f32, f32) {
    let inv = 1.0 / s;
    let (mut e, mut xd, mut dd) = ([0f32; 8], [0f32; 8], [0f32; 8]);
    let mut lane = |l: usize, v: f32| {
        let d = nearest(v, inv, z, maxq) - z;
        let r = d * s - v;
        e[l] += r * r;
        xd[l] += v * d;
        dd[l] += d * d;
    };
    let mut it = x.chunks_exact(8);
    for xs in it.by_ref() {
        for (l, &v) in xs.iter().enumerate() {
            lane(l, v);
        }
    }
    for (l, &v) in it.remainder().iter().enumerate() {
        lane(l, v);
    }
    let sum = |a: [f32; 8]| ((a[0] + a[1]) + (a[2] + a[3])) + ((a[4] + a[5]) + (a[6] + a[7]));
    (sum(e), sum(xd), sum(dd))
}

/// The best (scale, zero) of the integer-zero search, or None (no finite positive scale).
#[inline(always)]
fn search_int_zero(x: &[f32], inv: f32, zf: f32, maxq: f32) -> Option<(f32, f32)> {
    let s0 = gint::f16_round(1.0 / inv);
    if !(s0 > 0.0 && s0.is_finite()) {
        return None;
    }
    let zr = zf.round_ties_even().clamp(0.0, maxq);
    let side = if zf > zr { 1.0 } else { -1.0 };
    let mut best: Option<(f32, f32, f32)> = None;
    for z in [zr, zr + side] {
        if !(0.0..=maxq).contains(&z) {
            continue;
        }
        // the grid, then one least-squares refit of this zero's best grid point
        let mut grid_best: Option<(f32, f32, f32, f32)> = None; // (error, scale, <x,d>, <d,d>)
        for f in SCALE_FACTORS {
            let s = gint::f16_round(s0 * f);
            if !(s > 0.0 && s.is_finite()) {
                continue;
            }
            let (e, xd, dd) = grid_pass(x, s, z, maxq);
            if grid_best.is_none_or(|g| e < g.0) {
                grid_best = Some((e, s, xd, dd));
            }
        }
        let Some((mut e, mut s, xd, dd)) = grid_best else {
            continue;
        };
        if dd > 0.0 {
            let s2 = gint::f16_round(xd / dd);
            if s2 > 0.0 && s2.is_finite() {
                let e2 = grid_pass(x, s2, z, maxq).0;
                if e2 < e {
                    (e, s) = (e2, s2);
                }
            }
        }
        if best.is_none_or(|b| e < b.0) {
            best = Some((e, s, z));
        }
    }
    best.map(|(_, s, z)| (s, z))
}

/// One grouped-integer row: `out` / `st` hold the format's RTN row on entry.
#[inline(always)]
fn gint_row(g: GInt, x: &[f32], sol: &Solved, first: usize, out: &mut [u8], st: &mut [f32]) {
    let gl = gint::group_len(g, x.len());
    let groups = x.len() / gl;
    let maxq = ((1u32 << g.bits) - 1) as f32;
    let mut codes: Vec<u32> = (0..x.len()).map(|j| gint::code(out, j, g.bits)).collect();
    for k in 0..groups {
        let xg = &x[k * gl..(k + 1) * gl];
        let cg = &mut codes[k * gl..(k + 1) * gl];
        let (rs, rz) = (st[k], st[groups + k]);
        let sq = |c: &mut dyn Iterator<Item = f32>, s: f32, z: f32| -> f64 {
            c.zip(xg)
                .map(|(q, &v)| (((q - z) * s - v) as f64).powi(2))
                .sum()
        };
        let e_rtn = sq(&mut cg.iter().map(|&c| c as f32), rs, rz);
        if g.float_zero {
            // the solver's zero as stored (fp16), codes the nearest levels of the stored grid
            let (s, z) = (
                gint::f16_round(1.0 / sol.inv_scale[first + k]),
                gint::f16_round(sol.zero[first + k]),
            );
            if !(s >= half::f16::MIN_POSITIVE.to_f32() && s.is_finite() && z.is_finite()) {
                continue;
            }
            let mut rtn = cg.to_vec();
            let e_rtn = fz_codes(xg, rs, rz, maxq as u32, &mut rtn);
            let mut alt = vec![0u32; gl];
            if fz_codes(xg, s, z, maxq as u32, &mut alt) < e_rtn {
                cg.copy_from_slice(&alt);
                (st[k], st[groups + k]) = (s, z);
            }
            continue;
        }
        let Some((s, z)) = search_int_zero(xg, sol.inv_scale[first + k], sol.zero[first + k], maxq)
        else {
            continue;
        };
        let inv = 1.0 / s;
        let e_hqq = sq(&mut xg.iter().map(|&v| nearest(v, inv, z, maxq)), s, z);
        if e_hqq < e_rtn {
            for (c, &v) in cg.iter_mut().zip(xg) {
                *c = nearest(v, inv, z, maxq) as u32;
            }
            (st[k], st[groups + k]) = (s, z);
        }
    }
    gint::pack_row(&codes, g.bits, out);
}

/// q4_1 / q5_1 blocks from the solver's parameters (module comment).
#[inline(always)]
fn legacy_blocks(qtype: QType, x: &[f32], sol: &Solved, first: usize, out: &mut [u8]) {
    let maxq = if qtype == QType::Q4_1 { 15.0 } else { 31.0 };
    for (k, xb) in x.chunks_exact(32).enumerate() {
        let (inv, z) = (sol.inv_scale[first + k], sol.zero[first + k]);
        let (d, m) = (f16_from_f32(1.0 / inv), f16_from_f32(-z / inv));
        let (d32, m32) = (f16_to_f32(d), f16_to_f32(m));
        let mut l = [0u8; 32];
        if d32 > 0.0 {
            for (lv, &v) in l.iter_mut().zip(xb) {
                *lv = ((v - m32) / d32).round_ties_even().clamp(0.0, maxq) as u8;
            }
        }
        if qtype == QType::Q4_1 {
            let b: &mut BlockQ4_1 = bytemuck::from_bytes_mut(&mut out[20 * k..20 * k + 20]);
            (b.d, b.m) = (d, m);
            for j in 0..16 {
                b.qs[j] = l[j] | (l[j + 16] << 4);
            }
        } else {
            let b: &mut BlockQ5_1 = bytemuck::from_bytes_mut(&mut out[24 * k..24 * k + 24]);
            (b.d, b.m) = (d, m);
            let mut qh = 0u32;
            for j in 0..16 {
                b.qs[j] = (l[j] & 15) | ((l[j + 16] & 15) << 4);
                qh |= ((l[j] >> 4) as u32) << j | ((l[j + 16] >> 4) as u32) << (j + 16);
            }
            b.qh = qh.to_le_bytes();
        }
    }
}

/// K-quant super-blocks from the solver's per-sub-block parameters (module comment).
#[inline(always)]
fn k_blocks(qtype: QType, x: &[f32], sol: &Solved, first: usize, out: &mut [u8]) {
    let (sub, maxq) = match qtype {
        QType::Q2K => (16, 3.0),
        QType::Q4K => (32, 15.0),
        _ => (32, 31.0),
    };
    let nsub = QK_K / sub;
    let bytes = out.len() / (x.len() / QK_K);
    for (bi, xb) in x.chunks_exact(QK_K).enumerate() {
        let mut scales = [0f32; 16];
        let mut mins = [0f32; 16];
        let mut l_all = [0u8; QK_K];
        for j in 0..nsub {
            let k = first + bi * nsub + j;
            let (inv, z) = (sol.inv_scale[k], sol.zero[k]);
            scales[j] = 1.0 / inv;
            mins[j] = (z / inv).max(0.0);
            for i in 0..sub {
                let v = xb[sub * j + i];
                l_all[sub * j + i] = (v * inv + z).round_ties_even().clamp(0.0, maxq) as u8;
            }
        }
        let raw = &mut out[bi * bytes..(bi + 1) * bytes];
        match qtype {
            QType::Q2K => {
                let b: &mut BlockQ2K = bytemuck::from_bytes_mut(raw);
                q2_k::finish_block_ref(xb, &scales, &mins, &mut l_all, b);
            }
            QType::Q4K => {
                let b: &mut BlockQ4K = bytemuck::from_bytes_mut(raw);
                let (sc, mn) = (first8(&scales), first8(&mins));
                (b.scales, b.d, b.dmin) = q4_k::ref_scales(&sc, &mn);
                q4_k::requantize(xb, &b.scales, b.d, b.dmin, 15, &mut l_all);
                q4_k::pack_q4(&l_all, &mut b.qs);
            }
            _ => {
                let b: &mut BlockQ5K = bytemuck::from_bytes_mut(raw);
                let (sc, mn) = (first8(&scales), first8(&mins));
                (b.scales, b.d, b.dmin) = q4_k::ref_scales(&sc, &mn);
                q4_k::requantize(xb, &b.scales, b.d, b.dmin, 31, &mut l_all);
                q5_k::pack_q5(&l_all, b);
            }
        }
    }
}

fn first8(a: &[f32; 16]) -> [f32; 8] {
    let mut o = [0f32; 8];
    o.copy_from_slice(&a[..8]);
    o
}

/// One ggml row: `out` holds the format's RTN row on entry; each block keeps the better bytes.
#[inline(always)]
fn ggml_row(qtype: QType, x: &[f32], sol: &Solved, first: usize, out: &mut [u8]) {
    let mut ours = vec![0u8; out.len()];
    if matches!(qtype, QType::Q4_1 | QType::Q5_1) {
        legacy_blocks(qtype, x, sol, first, &mut ours);
    } else {
        k_blocks(qtype, x, sol, first, &mut ours);
    }
    let (mut y_rtn, mut y_ours) = (vec![0f32; x.len()], vec![0f32; x.len()]);
    ggml_dequantize_row(qtype, out, &mut y_rtn);
    ggml_dequantize_row(qtype, &ours, &mut y_ours);
    let bs = qtype.info().block_size;
    let bb = out.len() / (x.len() / bs);
    let sq = |y: &[f32], xs: &[f32]| -> f64 {
        y.iter()
            .zip(xs)
            .map(|(&a, &b)| ((a - b) as f64).powi(2))
            .sum()
    };
    for (k, xb) in x.chunks_exact(bs).enumerate() {
        let span = k * bs..(k + 1) * bs;
        if sq(&y_ours[span.clone()], xb) < sq(&y_rtn[span], xb) {
            out[k * bb..(k + 1) * bb].copy_from_slice(&ours[k * bb..(k + 1) * bb]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hqq::tests::sample;
    use crate::quantize::dequantize;

    fn rel_err(qtype: QType, w: &[f32], q: &Quantized) -> f64 {
        let mut y = vec![0f32; w.len()];
        dequantize(&q.view(), &mut y).unwrap();
        let num: f64 = y.iter().zip(w).map(|(a, b)| ((a - b) as f64).powi(2)).sum();
        let den: f64 = w.iter().map(|&b| (b as f64).powi(2)).sum();
        let _ = qtype;
        (num / den).sqrt()
    }

    #[test]
    fn every_format_decodes_no_worse_than_rtn() {
        let (rows, cols) = (8, 512);
        let w = sample(rows * cols, 11, 0.02);
        let m = Matrix::from_f32(&w, rows, cols).unwrap();
        for name in [
            "int4_g64",
            "int4_g64_fz",
            "int3_g32_fz",
            "int3_g128",
            "int2_g32",
            "int4_gch",
            "q4_1",
            "q5_1",
            "q2_k",
            "q4_k",
            "q5_k",
        ] {
            let qt = QType::parse(name).unwrap();
            let ours = quantize(&m, qt, &HqqConfig::default()).unwrap();
            let rtn = quantize_rtn(&m, qt, &Options::default()).unwrap();
            assert_eq!(ours.data.len(), rtn.data.len(), "{name}");
            let (a, b) = (rel_err(qt, &w, &ours), rel_err(qt, &w, &rtn));
            assert!(a <= b, "{name}: hqq {a} rtn {b}");
        }
    }

    #[test]
    fn the_group_major_search_gives_the_reference_bytes() {
        // heavy tails and odd shapes: skipped candidates, the shrinkage, a block's padding
        let mut ran = 0;
        for (rows, cols, scale, seed) in [(7, 576, 0.02, 21), (5, 384, 3.0, 22), (3, 100, 0.5, 23)]
        {
            let mut w = sample(rows * cols, seed, scale);
            w[..32].fill(0.125); // a constant half-group
            w[64..128].fill(0.0); // an all-zero group: RTN's [-1, 1]
            w[128..192].iter_mut().for_each(|v| *v *= 1e-30); // scales below fp16's range
            w[192..196].fill(-0.0);
            let m = Matrix::from_f32(&w, rows, cols).unwrap();
            for name in [
                "int4_g64",
                "int3_g64",
                "int2_g32",
                "int4_gch",
                "int3_g128",
                "int4_g64_fz",
                "int3_g32_fz",
                "int2_g128_fz",
            ] {
                let qt = QType::parse(name).unwrap();
                let cfg = HqqConfig::default();
                let (Ok(a), Ok(b)) = (
                    quantize_with(&m, qt, &cfg, true),
                    quantize_with(&m, qt, &cfg, false),
                ) else {
                    continue; // a row length the format cannot hold
                };
                let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                assert_eq!(a.data, b.data, "{name} {rows}x{cols}");
                assert_eq!(bits(&a.stats), bits(&b.stats), "{name} {rows}x{cols}");
                ran += 1;
            }
        }
        assert!(ran >= 9, "{ran}");
    }

    #[test]
    fn formats_without_a_zero_point_are_refused() {
        let w = vec![0.5f32; 256];
        let m = Matrix::from_f32(&w, 1, 256).unwrap();
        for name in ["q4_0", "q6_k", "int4_g64_sym", "nf4"] {
            let err = quantize(&m, QType::parse(name).unwrap(), &HqqConfig::default());
            assert!(err.unwrap_err().to_string().contains("has none"), "{name}");
        }
    }
}
