//! The bf16 GEMM on AMX tiles (`tdpbf16ps`, Intel Sapphire Rapids and later) for nf4, int8,
//! fp8 and the grouped integers: the same driver, decoded chunk and activations as
//! `gemm16.rs` (`matmul/gemm_bf16.rs`), another microkernel.
//!
//! **Layout.** `tdpbf16ps C, A, B` adds `Σ_k A[m][2k + j] · B[k][2n + j]` (k < 16, j < 2) to
//! the f32 tile C (16 x 16). The activations are already in B's pair layout: 16 consecutive
//! `Pairs16` of one vector (1 KiB) are a B tile, row k holding pair k of the 16 activation rows
//! (the columns n). The decoded chunk (weight rows of `KC` bf16, 512 bytes apart) gives A tiles
//! of 16 weight rows x 16 pairs, and a C tile's row m (16 f32) is the f32 accumulator vector of
//! weight row m and one activation vector: the driver's per-thread chains, loaded into C at
//! the start of a chunk and stored back at its end. Blocks of 2 x 2 C tiles (2 A and 2 B tiles
//! per step of 16 pairs, tiles 0-7), with 2 x 1, 1 x 2 and 1 x 1 at the edges of a job.
//!
//! **Numerics.** The tile's own arithmetic, not `reference::bf16`'s: on this machine (Intel
//! Xeon, Emerald Rapids) one pair per lane equals "both products summed exactly, rounded to
//! f32, then added to the accumulator", but no simple order / rounding model matched 2 to 16
//! pairs (10-60 % of lanes differ), so the path is tested against a float64 bound that holds
//! for any summation order (`error_bound`), and against itself for thread counts.
//!
//! Safety: callers check `amx::amx_bf16_usable()` (which implies AVX-512 and the process's
//! permission) and configure the tiles with `CONFIG` on the running thread first.

use std::arch::asm;
use std::sync::atomic::{AtomicU8, Ordering};

use super::gemm16::{Pairs16, KC};
use crate::amx::TileConfig;

/// From this many activation rows the bf16 GEMM runs on tiles (where AMX bf16 is usable): from
/// its first row count. Rows 12-16 are one vector (one B tile) for both kernels, and at M = 16
/// the tiles took 8.6 ms against 17.3 ms for the AVX-512 kernels at M = 12 (nf4 4096x14336,
/// one thread, CPU time, 2026-12-07, Intel Xeon with AMX, load 4-6).
pub const AMX_BF16_MIN_M: usize = crate::matmul::GEMM16_MIN_M;

/// Eight tiles of 16 rows x 64 bytes: C 0-3, A 4-5, B 6-7.
pub const CONFIG: TileConfig = TileConfig::new()
    .tile(0, 16, 64)
    .tile(1, 16, 64)
    .tile(2, 16, 64)
    .tile(3, 16, 64)
    .tile(4, 16, 64)
    .tile(5, 16, 64)
    .tile(6, 16, 64)
    .tile(7, 16, 64);

/// Bytes between the decoded chunk's rows (A's stride).
const A_STRIDE: usize = KC * 2;

/// 0: on where usable; 1: off; 2: on where usable (tests and A/B timings).
static FORCE: AtomicU8 = AtomicU8::new(0);

/// Turns the tile kernels off (`Some(false)`) or gives the choice back (`None` / `Some(true)`:
/// on wherever `amx_bf16_usable`). For tests and A/B timings.
pub fn force(on: Option<bool>) {
    FORCE.store(
        match on {
            None => 0,
            Some(false) => 1,
            Some(true) => 2,
        },
        Ordering::Relaxed,
    );
}

/// True when a bf16 GEMM of `m` activation rows should run on tiles.
pub fn use_amx(m: usize) -> bool {
    FORCE.load(Ordering::Relaxed) != 1 && m >= AMX_BF16_MIN_M && crate::amx::amx_bf16_usable()
}

/// Where one chunk's block of tiles sits.
pub struct Chunk<'a> {
    /// The decoded chunk: rows of `KC` bf16 (PANEL rows).
    pub w: &'a [u16],
    /// The activations of the job's first vector at this chunk's first pair; vector j starts
    /// `j · x_stride` entries later.
    pub x: &'a [Pairs16],
    pub x_stride: usize,
    /// Pairs in this chunk (a multiple of 16).
    pub pairs: usize,
}

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

/// One chunk for weight rows `i..i + 16 RA` and activation vectors `v..v + RB` of the job:
/// `acc[r · nv + j]` is the chain of row r and vector j (`acc` holds whole tiles: its rows
/// rounded up to 16).
///
/// # Safety
/// AMX bf16 usable and `CONFIG` loaded on this thread; `c.w` holds rows `i..i + 16 RA` of `KC`
/// entries, `c.x` vectors `v..v + RB` at `x_stride` apart, each with `c.pairs` entries from
/// its start; `acc` has `(i + 16 RA) · nv` entries.
#[inline(always)]
pub unsafe fn block<const RA: usize, const RB: usize>(
    c: &Chunk<'_>,
    i: usize,
    v: usize,
    nv: usize,
    acc: &mut [core::arch::x86_64::__m512],
) {
    debug_assert!(c.pairs.is_multiple_of(16) && c.w.len() >= (i + 16 * RA) * KC);
    debug_assert!(acc.len() >= (i + 16 * RA) * nv && v + RB <= nv);
    let cs = nv * 64;
    let c0 = acc[i * nv + v..].as_mut_ptr();
    // SAFETY: the caller's contract: the C tiles are rows i.. (and i + 16..) of acc, nv vectors
    // (64 bytes) apart, from vector v (and v + 1); the A tiles 16 rows of 64 bytes KC · 2 bytes
    // apart inside c.w; the B tiles 16 consecutive Pairs16 of vector v (v + 1) inside c.x.
    unsafe {
        let c2 = c0.add(16 * nv);
        tile_load!(0, c0, cs);
        if RB == 2 {
            tile_load!(1, c0.add(1), cs);
        }
        if RA == 2 {
            tile_load!(2, c2, cs);
            if RB == 2 {
                tile_load!(3, c2.add(1), cs);
            }
        }
        let a0 = c.w[i * KC..].as_ptr();
        let b0 = c.x[v * c.x_stride..].as_ptr();
        let b1 = b0.add(c.x_stride);
        let mut p = 0;
        while p < c.pairs {
            let a = a0.add(2 * p);
            tile_load!(4, a, A_STRIDE);
            tile_load!(6, b0.add(p), 64usize);
            if RB == 2 {
                tile_load!(7, b1.add(p), 64usize);
            }
            tdp!(0, 4, 6);
            if RB == 2 {
                tdp!(1, 4, 7);
            }
            if RA == 2 {
                tile_load!(5, a.add(16 * KC), A_STRIDE);
                tdp!(2, 5, 6);
                if RB == 2 {
                    tdp!(3, 5, 7);
                }
            }
            p += 16;
        }
        tile_store!(0, c0, cs);
        if RB == 2 {
            tile_store!(1, c0.add(1), cs);
        }
        if RA == 2 {
            tile_store!(2, c2, cs);
            if RB == 2 {
                tile_store!(3, c2.add(1), cs);
            }
        }
    }
}

/// The whole chunk: weight rows `0..rows16` (a multiple of 16) x activation vectors `0..nv`.
///
/// # Safety
/// As `block`, for every row and vector.
pub unsafe fn chunk(
    c: &Chunk<'_>,
    rows16: usize,
    nv: usize,
    acc: &mut [core::arch::x86_64::__m512],
) {
    let mut v = 0;
    while v < nv {
        let two_v = v + 2 <= nv;
        let mut i = 0;
        while i < rows16 {
            let two_r = i + 32 <= rows16;
            // SAFETY: the caller's contract, for rows i.. and vectors v.. inside the chunk.
            unsafe {
                match (two_r, two_v) {
                    (true, true) => block::<2, 2>(c, i, v, nv, acc),
                    (true, false) => block::<2, 1>(c, i, v, nv, acc),
                    (false, true) => block::<1, 2>(c, i, v, nv, acc),
                    (false, false) => block::<1, 1>(c, i, v, nv, acc),
                }
            }
            i += if two_r { 32 } else { 16 };
        }
        v += if two_v { 2 } else { 1 };
    }
}

/// A float64 bound on `|y - Σ w_i x_i|` for an output of the tile path, whatever order and
/// grouping the tile's adder uses: the factors are rounded to bf16 as in `reference::bf16`
/// (relative `u_b = 2^-8` each, products exact), and the K products and the accumulator's +0
/// meet in K additions, each rounded to f32 (faithfully: relative error below `2u = 2^-23`,
/// nearest or not) or flushed below 2^-126; any summation tree of K + 1 terms puts at most K
/// roundings on a term, hence `γ_K` with `2u`, twice `reference::bf16::error_bound`'s:
///
/// `(2 u_b + u_b²) S + γ'_K (1 + u_b)² S + 2^-126 (Σ|x| + Σ|w| + 2K)`, `γ'_K = 2Ku / (1 - 2Ku)`.
pub fn error_bound(w: &[f32], x: &[f32]) -> f64 {
    crate::matmul::reference::bf16::error_bound_with_unit(w, x, 2f64.powi(-23))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::matmul::reference::bf16::{bf16_value, round_bf16};
    use core::arch::x86_64::__m512;

    /// The kernel alone on adversarial values (where AMX bf16 is usable): products from 2^-140
    /// (flushed) to 2^60, sums that cancel to a small remainder, and accumulators that start
    /// non-zero (a second chunk); every output within `error_bound` of the float64 sum, in
    /// every block shape (2 x 2, 2 x 1, 1 x 2, 1 x 1: 48 rows x 3 vectors).
    #[test]
    fn tiles_within_the_bound_on_adversarial_values() {
        if !crate::amx::amx_bf16_usable() {
            return; // no tiles here (the GEMM tests check the AVX-512 path instead)
        }
        let (rows, nv, pairs) = (48usize, 3usize, 128usize);
        let mut s = 0x2545_f491_4f6c_dd1du64;
        let mut rnd = move || {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            s
        };
        let mut val = |i: usize| -> f32 {
            let r = rnd();
            let m = 1.0 + (r >> 11 & 0xff) as f32 / 256.0;
            let sign = if r & 1 == 1 { -1.0 } else { 1.0 };
            let e = match (r >> 20) % 4 {
                0 => ((r >> 24) % 60) as i32 - 30,
                1 => -70 - (r >> 30) as i32 % 10,
                _ => (i % 7) as i32 * 4,
            };
            sign * m * 2f32.powi(e)
        };
        let w: Vec<u16> = (0..rows * KC).map(|i| round_bf16(val(i))).collect();
        // Activations: vector 1 cancels (x[2i + 1] = -x[2i] against equal weights on row 0..).
        let mut x = vec![Pairs16::default(); nv * pairs];
        for (j, p) in x.iter_mut().enumerate() {
            for (l, e) in p.0.iter_mut().enumerate() {
                let (a, b) = (round_bf16(val(j + l)), round_bf16(val(l)));
                let b = if j / pairs == 1 { a ^ 0x8000 } else { b };
                *e = a as u32 | (b as u32) << 16;
            }
        }
        let mut wc = w.clone();
        for r in 0..rows {
            for p in 0..pairs {
                wc[r * KC + 2 * p + 1] = wc[r * KC + 2 * p] ^ (r as u16 & 1) << 15;
            }
        }
        for (wt, what) in [(&w, "random"), (&wc, "cancelling")] {
            // 64-byte aligned lanes: the kernel reads and writes them as __m512.
            #[repr(C, align(64))]
            #[derive(Clone, Copy)]
            struct Lanes([f32; 16]);
            let mut acc = vec![Lanes([0f32; 16]); rows * nv];
            let c = Chunk {
                w: wt,
                x: &x,
                x_stride: pairs,
                pairs,
            };
            // SAFETY: AMX bf16 usable (checked); `CONFIG` loaded here and released below; wt
            // has rows x KC, x nv vectors of `pairs`, acc rows · nv vectors of 16 f32, 64-byte
            // aligned (the size and alignment of __m512).
            unsafe {
                crate::amx::tile_config(&CONFIG);
                let a = std::slice::from_raw_parts_mut(acc.as_mut_ptr() as *mut __m512, rows * nv);
                chunk(&c, rows, nv, a);
                chunk(&c, rows, nv, a);
                crate::amx::tile_release();
            }
            for r in 0..rows {
                for j in 0..nv {
                    for (l, &got) in acc[r * nv + j].0.iter().enumerate() {
                        let wf: Vec<f32> =
                            (0..2 * pairs).map(|e| bf16_value(wt[r * KC + e])).collect();
                        let xf: Vec<f32> = (0..2 * pairs)
                            .map(|e| {
                                bf16_value((x[j * pairs + e / 2].0[l] >> (16 * (e % 2))) as u16)
                            })
                            .collect();
                        // Two chunks: the row twice.
                        let (w2, x2) = ([&wf[..], &wf[..]].concat(), [&xf[..], &xf[..]].concat());
                        let exact: f64 =
                            w2.iter().zip(&x2).map(|(&a, &b)| a as f64 * b as f64).sum();
                        let got = got as f64;
                        let bound = error_bound(&w2, &x2);
                        assert!(
                            (got - exact).abs() <= bound,
                            "{what} row {r} vector {j} lane {l}: {got} vs {exact} (bound {bound})"
                        );
                    }
                }
            }
        }
    }
}
