//! Grouped integers (`formats::gint`) read in place, 4 and 8 bits, against q16 activations
//! (`reference::q16`): the arithmetic of the fused AVX-512 kernel (`x86/gint.rs`), which runs
//! wherever `cpu::has_vnni_q16()` holds. Other widths and CPUs decode each row to int8 `q - z`
//! and take `q16::dot_int8_q16` (`matmul::dispatch`'s `dots_gint`).
//!
//! **Lanes.** A row is cut into units of 16 lanes: 4 bits, 128 elements (a lane: 8 consecutive
//! elements); 8 bits, 64 (a lane: 4). Lane `l` of unit `u` holds the exact integer sum over its
//! elements `e < K` of `c_e · xq_e`, with `c` the stored code itself at 4 bits (0..=15) and
//! `q - 128` at 8 bits (symmetric only): at most 8 · 15 · 32767 < 2^22 and 4 · 128 · 32767 <
//! 2^24, so the conversion to f32 is exact. Each lane then takes
//! `acc[l] = fma(isum as f32, s_g · xd_b, acc[l])` (`s_g` the group's fp16 scale, `xd_b` the
//! activation block's; a lane never straddles either), units in increasing order; a lane with
//! no element in the row is left alone. `main = hsum8(acc[l] + acc[l + 8])`.
//!
//! **Zero term** (4 bits): `Σ_g (s_g · z_g) · X_g`, with `X_g` the group's activation sum
//! (`group_sums`: per 64-block of the group, in order, `X = fma(Σ xq as f32, xd_b, X)`) and
//! `z_g` an f32 (`zero`: the stored integer zero, or 8 for `_sym`; `s_g · z_g` is exact, an
//! 11-bit mantissa times at most 8 bits). Group `g` goes to lane `g % 16`:
//! `zacc[g % 16] = fma(s_g · z_g, X_g, zacc[g % 16])`, groups in order, reduced as `main`.
//! The result is `main - zero term`. The zero sits in f32 on purpose: a format with a float
//! zero per group (HQQ's) needs only another `zero`.
//!
//! Why: the int8 path decodes every row into a buffer and then runs units of 32 with one float
//! multiply-add each; reading the nibbles in registers with four times the elements per float
//! step leaves the weights' memory traffic as the bound at M = 1 and shares each unpacked unit
//! among the activation rows (benches/RESULTS.md, "grouped integers read in place").

use super::hsum8;
use super::q16::Q16;
use crate::formats::gint::{code, group_len};
use crate::qtype::GInt;

/// Elements per unit of 16 lanes: 4 bits (words of 4 codes, four planes) and 8 bits (two).
pub const UNIT4: usize = 128;
pub const UNIT8: usize = 64;

/// The widths the fused arithmetic covers (integer zeros only: float zeros, `int*_fz`, take the
/// decoded path and `matmul::float_zero`).
pub fn fused_bits(g: GInt) -> bool {
    !g.float_zero && (g.bits == 4 || (g.bits == 8 && g.sym))
}

/// The zero of group `gi` as the zero term uses it (`stats`: one row's scales, then zeros).
#[inline(always)]
pub fn zero(g: GInt, stats: &[f32], groups: usize, gi: usize) -> f32 {
    if g.sym {
        (1u32 << (g.bits - 1)) as f32
    } else {
        stats[groups + gi]
    }
}

/// `X_g` of the module comment for every group of one activation row (`xq`, `xd` in element
/// order, as `q16::quantize_row_q16` writes them).
pub fn group_sums(xq: &[i16], xd: &[f32], k: usize, gl: usize, out: &mut [f32]) {
    for (gi, o) in out.iter_mut().enumerate().take(k / gl) {
        let (g0, g1) = (gi * gl, (gi + 1) * gl);
        let mut x = 0.0f32;
        let mut e0 = g0;
        while e0 < g1 {
            let b = e0 / Q16;
            let e1 = g1.min((b + 1) * Q16);
            let s: i32 = xq[e0..e1].iter().map(|&v| v as i32).sum();
            x = (s as f32).mul_add(xd[b], x);
            e0 = e1;
        }
        *o = x;
    }
}

/// One row of `k` codes (`row`, `stats` as `formats::gint` stores them) with one q16 row
/// (`xq`, `xd` in element order) and its group sums `xg` (4 bits; unused at 8).
pub fn dot_gint_q16(
    g: GInt,
    row: &[u8],
    stats: &[f32],
    k: usize,
    xq: &[i16],
    xd: &[f32],
    xg: &[f32],
) -> f32 {
    debug_assert!(fused_bits(g));
    let gl = group_len(g, k);
    let groups = k / gl;
    let unit = if g.bits == 4 { UNIT4 } else { UNIT8 };
    let span = unit / 16;
    let mut acc = [0.0f32; 16];
    for u in 0..k.div_ceil(unit) {
        for (l, a) in acc.iter_mut().enumerate() {
            let e0 = u * unit + l * span;
            if e0 >= k {
                break;
            }
            let isum: i32 = (e0..(e0 + span).min(k))
                .map(|e| {
                    let c = code(row, e, g.bits) as i32;
                    let c = if g.bits == 8 { c - 128 } else { c };
                    c * xq[e] as i32
                })
                .sum();
            *a = (isum as f32).mul_add(stats[e0 / gl] * xd[e0 / Q16], *a);
        }
    }
    let main = hsum16(&acc);
    if g.bits == 8 {
        return main;
    }
    let mut zacc = [0.0f32; 16];
    for gi in 0..groups {
        let sz = stats[gi] * zero(g, stats, groups, gi);
        zacc[gi % 16] = sz.mul_add(xg[gi], zacc[gi % 16]);
    }
    main - hsum16(&zacc)
}

/// 16 lanes folded to 8 (`a[l] + a[l + 8]`), then `hsum8`.
#[inline(always)]
pub fn hsum16(a: &[f32; 16]) -> f32 {
    hsum8(&std::array::from_fn(|l| a[l] + a[l + 8]))
}
