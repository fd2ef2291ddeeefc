//! The AMX kernel of `gram_bf16` (`tdpbf16ps`, Intel Sapphire Rapids and later): where the tiles
//! are usable it replaces the `vdpbf16ps` kernel (`x86.rs`), which on those CPUs runs at about
//! 55 GFLOP/s on one core (the tiles: several hundred).
//!
//! **Layout.** `tdpbf16ps C, A, B` adds `Σ_k A[m][2k + j] · B[k][2n + j]` (k < 16, j < 2) to the
//! f32 tile C. For x^T x, A's row m is feature `i0 + m` over 32 consecutive tokens (x
//! transposed: `xt`, `[dp, nt]`, tokens contiguous) and B's row k is the pair of tokens
//! `(2k, 2k + 1)` for 16 features (`packed`, `[nt / 2, dp]` `u32`, the AVX-512 kernel's
//! layout). Output blocks of 32 x 32 (2 x 2 C tiles, tiles 0-3; A in 4-5, B in 6-7) on and above
//! the diagonal, each over every token in one pass of the tiles (the C tiles never leave the
//! tile unit between the first pair and the last); rows padded with 64 bytes so that the 16
//! rows of a tile load do not share cache sets.
//!
//! **Numerics.** The tile's arithmetic (no simple order/rounding model matches it on more than
//! one pair per lane, `matmul::x86::amx_bf16`): each output within `error_bound_with_unit`'s
//! float64 bound with the faithful unit 2^-23, exactly symmetric (the block on and above the
//! diagonal is mirrored), and, since every block is the same sequence of tile instructions
//! over the same zero-padded data whichever thread runs it, the same bits for every thread
//! count and call.

use std::arch::asm;

use rayon::prelude::*;

use crate::matmul::x86::amx_bf16::CONFIG;

/// Features per output block (2 tiles of 16).
const B: usize = 32;
/// Tokens per step (16 pairs: one A tile's row).
const T: usize = 32;
/// Padding of every row of `xt` (tokens) and `packed` (u32), 64 bytes each.
const PAD_T: usize = 32;
const PAD_P: usize = 16;

macro_rules! tile_load {
    ($t:literal, $p:expr, $s:expr) => {
        asm!(concat!("tileloadd tmm", $t, ", [{p} + {s}*1]"), p = in(reg) $p, s = in(reg) $s,
            options(nostack, readonly))
    };
}

macro_rules! tile_store {
    ($t:literal, $p:expr, $s:expr) => {
        asm!(concat!("tilestored [{p} + {s}*1], tmm", $t), p = in(reg) $p, s = in(reg) $s,
            options(nostack))
    };
}

macro_rules! tdp {
    ($c:literal, $a:literal, $b:literal) => {
        asm!(
            concat!("tdpbf16ps tmm", $c, ", tmm", $a, ", tmm", $b),
            options(nomem, nostack)
        )
    };
}

/// The operands in the tiles' layouts (zero-padded).
struct Operands {
    /// x transposed, as pairs of tokens: `dp` rows of `xs` u32 (the first `nt / 2` used), the
    /// transpose of `packed` (a u32 of a pair is token 2p's bf16 low, 2p + 1's high, so each row
    /// read as u16 is one feature over consecutive tokens: A's layout).
    xt: Vec<u32>,
    xs: usize,
    /// Pairs of tokens: `nt / 2` rows of `ps` u32 (the first `dp` used).
    packed: Vec<u32>,
    ps: usize,
    /// Tokens (a multiple of T) and features (a multiple of B) after padding.
    nt: usize,
    dp: usize,
}

fn operands(x: &[u16], n: usize, d: usize) -> Operands {
    let nt = n.div_ceil(T) * T;
    let dp = d.div_ceil(B) * B;
    let np = nt / 2;
    let (xs, ps) = (np + PAD_T / 2, dp + PAD_P);
    let mut packed = vec![0u32; np * ps];
    for (p, line) in packed.chunks_exact_mut(ps).enumerate() {
        let even = x.get(2 * p * d..(2 * p + 1) * d);
        let odd = x.get((2 * p + 1) * d..(2 * p + 2) * d);
        match (even, odd) {
            (Some(e), Some(o)) => {
                for ((slot, &lo), &hi) in line[..d].iter_mut().zip(e).zip(o) {
                    *slot = lo as u32 | (hi as u32) << 16;
                }
            }
            (Some(e), None) => {
                for (slot, &lo) in line[..d].iter_mut().zip(e) {
                    *slot = lo as u32;
                }
            }
            _ => {}
        }
    }
    // the transpose in blocks of 16 x 16 (both multiples: np of 16, dp of 32)
    let mut xt = vec![0u32; dp * xs];
    for p0 in (0..np).step_by(16) {
        for f0 in (0..dp).step_by(16) {
            for p in p0..p0 + 16 {
                let src = &packed[p * ps + f0..p * ps + f0 + 16];
                for (k, &v) in src.iter().enumerate() {
                    xt[(f0 + k) * xs + p] = v;
                }
            }
        }
    }
    Operands {
        xt,
        xs,
        packed,
        ps,
        nt,
        dp,
    }
}

/// x^T x (`[d, d]` row-major f32) of the bf16 matrix `x` `[n, d]` on AMX tiles, in the current
/// rayon pool (blocks of columns in parallel).
///
/// # Safety
/// `amx::amx_bf16_usable()` returned true; `x.len() == n * d`.
pub unsafe fn gram(x: &[u16], n: usize, d: usize) -> Vec<f32> {
    debug_assert_eq!(x.len(), n * d);
    let mut out = vec![0.0f32; d * d];
    if n == 0 || d == 0 {
        return out;
    }
    let op = operands(x, n, d);
    // one strip of B columns per task: rows 0..j0 + B of those columns, blocks of B x B
    let strips: Vec<Vec<f32>> = (0..op.dp / B)
        .into_par_iter()
        .map(|s| {
            let j0 = s * B;
            let mut acc = vec![0.0f32; (j0 + B) * B];
            // SAFETY: AMX bf16 usable (contract); configured here and released below on this
            // thread, with no other code in between.
            unsafe { crate::amx::tile_config(&CONFIG) };
            for i0 in (0..=j0).step_by(B) {
                // SAFETY: tiles configured; i0 + B <= dp, j0 + B <= dp, and `acc` holds the B
                // x B block at rows i0.. (row stride B).
                unsafe { block(&op, i0, j0, acc[i0 * B..].as_mut_ptr()) };
            }
            // SAFETY: configured above on this thread.
            unsafe { crate::amx::tile_release() };
            acc
        })
        .collect();
    // the upper triangle's blocks to their place and, transposed, to the mirror's (block by
    // block: both sides' writes stay within a few cache lines per row)
    for (s, acc) in strips.iter().enumerate() {
        let j0 = s * B;
        let j1 = (j0 + B).min(d);
        for i0 in (0..=j0).step_by(B) {
            let i1 = (i0 + B).min(d);
            for i in i0..i1 {
                let row = &acc[i * B..i * B + (j1 - j0)];
                for (jj, &v) in row.iter().enumerate() {
                    let j = j0 + jj;
                    if i <= j {
                        out[i * d + j] = v;
                    }
                }
            }
            for j in j0..j1 {
                for i in i0..i1.min(j + 1) {
                    out[j * d + i] = acc[i * B + (j - j0)];
                }
            }
        }
    }
    out
}

/// The output block of features `i0..i0 + B` x `j0..j0 + B` over every token, stored at `c`
/// (B rows of B f32).
///
/// # Safety
/// AMX bf16 usable and `CONFIG` loaded on this thread; `i0 + B <= op.dp`, `j0 + B <= op.dp`;
/// `c` is valid for B x B f32 writes.
#[inline(never)]
unsafe fn block(op: &Operands, i0: usize, j0: usize, c: *mut f32) {
    debug_assert!(i0 + B <= op.dp && j0 + B <= op.dp);
    let (sa, sb, sc) = (op.xs * 4, op.ps * 4, B * 4);
    // SAFETY: A tiles read 16 rows of 64 bytes from xt rows i0.. / i0 + 16.. at pair p (p + 16
    // <= nt / 2 <= xs); B tiles 16 rows of 64 bytes from packed rows p.. (p + 16 <=
    // nt / 2) at columns j0 / j0 + 16 (j0 + B <= dp <= ps); C tiles write the caller's block.
    unsafe {
        asm!(
            "tilezero tmm0",
            "tilezero tmm1",
            "tilezero tmm2",
            "tilezero tmm3",
            options(nomem, nostack)
        );
        let a0 = op.xt.as_ptr().add(i0 * op.xs);
        let a1 = a0.add(16 * op.xs);
        let b0 = op.packed.as_ptr().add(j0);
        let mut p = 0;
        while p < op.nt / 2 {
            tile_load!(4, a0.add(p), sa);
            tile_load!(6, b0.add(p * op.ps), sb);
            tile_load!(7, b0.add(p * op.ps + 16), sb);
            tdp!(0, 4, 6);
            tdp!(1, 4, 7);
            tile_load!(5, a1.add(p), sa);
            tdp!(2, 5, 6);
            tdp!(3, 5, 7);
            p += 16;
        }
        tile_store!(0, c, sc);
        tile_store!(1, c.add(16), sc);
        tile_store!(2, c.add(16 * B), sc);
        tile_store!(3, c.add(16 * B + 16), sc);
    }
}
