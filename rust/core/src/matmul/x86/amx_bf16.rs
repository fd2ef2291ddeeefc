//! The bf16 GEMM on AMX tiles (`tdpbf16ps`, Intel Sapphire Rapids and later) for nf4, int8,
//! fp8 and the grouped integers: the same driver, decoded chunk and activations as
//! `gemm16.rs` (`matmul/gemm_bf16.rs`), another microkernel.
//!
//! **Layout.** `tdpbf16ps C, A, B` adds `Σ_k A[m][2k + j] · B[k][2n + j]` (k < 16, j < 2) to
//! the f32 tile C (16 x 16). The activations are already in B's pair layout: 16 consecutive
//! `Pairs16` of one vector (1 KiB) are a B tile, row k holding pair k of the 16 activation rows
//! (the columns n). The decoded chunk (weight rows of `KCA` bf16, `W_STRIDE` apart: the
//! `gemm16::decode_*` output, `KC` columns a call) gives A tiles of 16 weight rows x 16 pairs,
//! and a C tile's row m (16 f32) is the f32 accumulator vector of weight row m and one
//! activation vector: the driver's per-thread chains, kept as whole tiles (`acc_index`: 1 KiB
//! each, loaded and stored with a 64-byte stride), loaded into C at the start of a chunk and
//! stored back at its end. Blocks of 2 x 2 C tiles (2 A and 2 B tiles per step of 16 pairs,
//! tiles 0-7), with 2 x 1, 1 x 2 and 1 x 1 at the edges of a job; 32 rows at a time, every
//! vector pair inside, the B tiles loaded with the T1 hint (`tileloaddt1`: they stream, the
//! A tiles stay in L1). Storing and reloading C is exact, so the chunking does not change a
//! bit: each output is the tile's steps of 16 pairs in K order.
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
use std::cell::Cell;

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

/// Columns of K per chunk of the tile path (`matmul/gemm_bf16.rs`'s `job_amx`): 2 x `KC`, so
/// a C tile is loaded and stored once per 16 `tdpbf16ps` steps; the 2 A tiles' rows of a chunk
/// (32 x 1 KiB) stay in L1 while the vectors' B tiles pass from L2. Chunks of 256, 512 and 1024
/// columns, rows outer or vectors outer: 512 and 256 rows outer were fastest (nf4 M = 512,
/// 4096x14336 and 14336x4096, one thread, CPU time: 62-66 ms against 63-84 ms; 2026-12-07,
/// Intel Xeon with AMX, load 20-27, so only the order of the ranking is worth much).
pub const KCA: usize = 2 * KC;
/// Entries between the decoded chunk's rows: `KCA` and one 64-byte line more, so that the 16
/// rows of an A tile (a `tileloadd` of 16 lines) fall in 16 different L1 sets (at a power of
/// two apart they would share a few).
pub const W_STRIDE: usize = KCA + 32;

thread_local! {
    /// 0: on where usable; 1: off; 2: on where usable (tests and A/B timings). Per calling
    /// thread: `run_bf16` takes the decision on the thread that calls `qmatmul`, before any job
    /// is handed to the pool, so a test that forces the path cannot switch the path under a
    /// test running beside it (a global switch made the pool-vs-one-thread comparisons flaky).
    static FORCE: Cell<u8> = const { Cell::new(0) };
}

/// Turns the tile kernels off (`Some(false)`) or gives the choice back (`None` / `Some(true)`:
/// on wherever `amx_bf16_usable`) for the calls made on this thread. For tests and A/B timings.
pub fn force(on: Option<bool>) {
    FORCE.with(|f| {
        f.set(match on {
            None => 0,
            Some(false) => 1,
            Some(true) => 2,
        })
    });
}

/// True when a bf16 GEMM of `m` activation rows should run on tiles.
pub fn use_amx(m: usize) -> bool {
    FORCE.with(Cell::get) != 1 && m >= AMX_BF16_MIN_M && crate::amx::amx_bf16_usable()
}

/// Where one chunk's block of tiles sits.
pub struct Chunk<'a> {
    /// The decoded chunk: weight rows of bf16, `W_STRIDE` entries apart.
    pub w: &'a [u16],
    /// The activations of the job's first vector at this chunk's first pair; vector j starts
    /// `j · x_stride` entries later.
    pub x: &'a [Pairs16],
    pub x_stride: usize,
    /// Pairs in this chunk (a multiple of 16, at most `KCA / 2`).
    pub pairs: usize,
}

/// Where the chain of weight row `i` and activation vector `j` of a job with `nv` vectors sits
/// in the job's accumulators: whole C tiles, each 16 consecutive vectors (rows `16 t..16 t + 16`
/// of one vector j: tile `t · nv + j`), so a tile loads and stores with a 64-byte stride.
#[inline(always)]
pub fn acc_index(i: usize, j: usize, nv: usize) -> usize {
    ((i / 16) * nv + j) * 16 + i % 16
}

macro_rules! tile_load {
    ($t:literal, $p:expr, $s:expr) => {
        asm!(concat!("tileloadd tmm", $t, ", [{p} + {s}*1]"), p = in(reg) $p, s = in(reg) $s,
            options(nostack, readonly))
    };
}

/// `tileloadd` with the T1 hint (`tileloaddt1`, "little temporal locality"): for the B tiles,
/// which stream through L1 once per block of 32 weight rows, so that they do not push that
/// block's A tiles (its 32 decoded rows, reused by every pair of vectors) out of L1 (nf4
/// 4096x14336 tiles alone, one thread: 40-42 ms at M = 512 against 54-57 ms with `tileloadd`).
/// A hint only: the same tile, the same bits.
macro_rules! tile_load_t1 {
    ($t:literal, $p:expr, $s:expr) => {
        asm!(concat!("tileloaddt1 tmm", $t, ", [{p} + {s}*1]"), p = in(reg) $p, s = in(reg) $s,
            options(nostack, readonly))
    };
}

macro_rules! tile_store {
    ($t:literal, $p:expr, $s:expr) => {
        asm!(concat!("tilestored [{p} + {s}*1], tmm", $t), p = in(reg) $p, s = in(reg) $s,
            options(nostack))
    };
}

/// `tilezero`: a C tile of +0.0 (a job's first chunk: no zeroed accumulators to load).
macro_rules! tile_zero {
    ($t:literal) => {
        asm!(concat!("tilezero tmm", $t), options(nomem, nostack))
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

/// One chunk for weight rows `i..i + 16 RA` and activation vectors `v..v + RB` of the job
/// (chains at `acc_index`): the C tiles loaded once, every step of 16 pairs of the chunk, stored
/// once.
///
/// # Safety
/// AMX bf16 usable and `CONFIG` loaded on this thread; i a multiple of 16; `c.w` holds rows
/// `i..i + 16 RA` (`W_STRIDE` apart) with `2 · c.pairs` entries each, `c.x` vectors
/// `v..v + RB` at `x_stride` apart, each with `c.pairs` entries from its start; `acc` has the
/// tiles of rows `..i + 16 RA` for `nv` vectors.
#[inline(always)]
pub unsafe fn block<const RA: usize, const RB: usize, const ZERO: bool>(
    c: &Chunk<'_>,
    i: usize,
    v: usize,
    nv: usize,
    acc: &mut [core::arch::x86_64::__m512],
) {
    debug_assert!(c.pairs.is_multiple_of(16) && c.pairs <= KCA / 2 && i.is_multiple_of(16));
    debug_assert!(c.w.len() >= (i + 16 * RA - 1) * W_STRIDE + 2 * c.pairs);
    debug_assert!(acc.len() > acc_index(i + 16 * RA - 1, nv - 1, nv) && v + RB <= nv);
    const CS: usize = 64;
    const A_STRIDE: usize = W_STRIDE * 2;
    let base = acc.as_mut_ptr();
    // SAFETY: the caller's contract: the C tiles are 16 consecutive vectors of acc (tiles
    // (i / 16) · nv + v.. and one row of tiles later); the A tiles 16 rows of 64 bytes
    // W_STRIDE · 2 bytes apart inside c.w; the B tiles 16 consecutive Pairs16 of vector v
    // (v + 1) inside c.x.
    unsafe {
        let c0 = base.add(acc_index(i, v, nv));
        let c2 = if RA == 2 {
            base.add(acc_index(i + 16, v, nv))
        } else {
            c0
        };
        if ZERO {
            // (+0.0 in every lane: the bits of loading zeroed accumulators)
            tile_zero!(0);
            if RB == 2 {
                tile_zero!(1);
            }
            if RA == 2 {
                tile_zero!(2);
                if RB == 2 {
                    tile_zero!(3);
                }
            }
        } else {
            tile_load!(0, c0, CS);
            if RB == 2 {
                tile_load!(1, c0.add(16), CS);
            }
            if RA == 2 {
                tile_load!(2, c2, CS);
                if RB == 2 {
                    tile_load!(3, c2.add(16), CS);
                }
            }
        }
        let a0 = c.w.as_ptr().add(i * W_STRIDE);
        let b0 = c.x.as_ptr().add(v * c.x_stride);
        let b1 = b0.add(c.x_stride);
        let mut p = 0;
        while p < c.pairs {
            let a = a0.add(2 * p);
            tile_load!(4, a, A_STRIDE);
            tile_load_t1!(6, b0.add(p), 64usize);
            if RB == 2 {
                tile_load_t1!(7, b1.add(p), 64usize);
            }
            tdp!(0, 4, 6);
            if RB == 2 {
                tdp!(1, 4, 7);
            }
            if RA == 2 {
                tile_load!(5, a.add(16 * W_STRIDE), A_STRIDE);
                tdp!(2, 5, 6);
                if RB == 2 {
                    tdp!(3, 5, 7);
                }
            }
            p += 16;
        }
        tile_store!(0, c0, CS);
        if RB == 2 {
            tile_store!(1, c0.add(16), CS);
        }
        if RA == 2 {
            tile_store!(2, c2, CS);
            if RB == 2 {
                tile_store!(3, c2.add(16), CS);
            }
        }
    }
}

/// The whole chunk: weight rows `0..rows16` (a multiple of 16) x activation vectors `0..nv`,
/// 32 rows at a time (their 2 A tiles' lines, 64 KiB at `KCA`, reused from L1 / L2 by every
/// pair of vectors), the vectors in pairs inside.
///
/// # Safety
/// As `block`, for every row and vector.
pub unsafe fn chunk(
    c: &Chunk<'_>,
    rows16: usize,
    nv: usize,
    acc: &mut [core::arch::x86_64::__m512],
) {
    // SAFETY: the caller's contract.
    unsafe { chunk_z::<false>(c, rows16, nv, acc) }
}

/// `chunk` on accumulators of +0.0 whatever `acc` holds (a job's first chunk): each C tile
/// starts from `tilezero` instead of a load, so the caller needs no zeroed accumulators (their
/// memset and loads were ~3 % of a SmolLM2 call at M = 128); every tile of the chunk is stored.
/// The bits of `chunk` on zeroed accumulators (`chunking_does_not_change_the_bits`).
///
/// # Safety
/// As `chunk`.
pub unsafe fn chunk_from_zero(
    c: &Chunk<'_>,
    rows16: usize,
    nv: usize,
    acc: &mut [core::arch::x86_64::__m512],
) {
    // SAFETY: the caller's contract.
    unsafe { chunk_z::<true>(c, rows16, nv, acc) }
}

/// `chunk` (ZERO false) or `chunk_from_zero` (true).
///
/// # Safety
/// As `chunk`.
#[inline(always)]
unsafe fn chunk_z<const ZERO: bool>(
    c: &Chunk<'_>,
    rows16: usize,
    nv: usize,
    acc: &mut [core::arch::x86_64::__m512],
) {
    let mut i = 0;
    while i < rows16 {
        let two_r = i + 32 <= rows16;
        let mut v = 0;
        while v < nv {
            let two_v = v + 2 <= nv;
            // SAFETY: the caller's contract, for rows i.. and vectors v.. inside the chunk.
            unsafe {
                match (two_r, two_v) {
                    (true, true) => block::<2, 2, ZERO>(c, i, v, nv, acc),
                    (true, false) => block::<2, 1, ZERO>(c, i, v, nv, acc),
                    (false, true) => block::<1, 2, ZERO>(c, i, v, nv, acc),
                    (false, false) => block::<1, 1, ZERO>(c, i, v, nv, acc),
                }
            }
            v += if two_v { 2 } else { 1 };
        }
        i += if two_r { 32 } else { 16 };
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
        let (rows, nv, pairs) = (48usize, 3usize, KCA / 2);
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
        let w: Vec<u16> = (0..rows * W_STRIDE).map(|i| round_bf16(val(i))).collect();
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
                wc[r * W_STRIDE + 2 * p + 1] = wc[r * W_STRIDE + 2 * p] ^ (r as u16 & 1) << 15;
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
            // has rows x W_STRIDE, x nv vectors of `pairs`, acc rows · nv vectors of 16 f32, 64-byte
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
                    for (l, &got) in acc[acc_index(r, j, nv)].0.iter().enumerate() {
                        let wf: Vec<f32> = (0..2 * pairs)
                            .map(|e| bf16_value(wt[r * W_STRIDE + e]))
                            .collect();
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

    /// The chunking of K does not change a bit: one chunk of `KCA / 2` pairs and the same pairs
    /// in two chunks of half as many (C stored and reloaded between them) give the same outputs,
    /// and so does a first chunk from `tilezero` (`chunk_from_zero`) on accumulators of NaNs.
    #[test]
    fn chunking_does_not_change_the_bits() {
        if !crate::amx::amx_bf16_usable() {
            return; // no tiles here
        }
        let (rows, nv, pairs) = (48usize, 3usize, KCA / 2);
        let mut s = 0x9e37_79b9_7f4a_7c15u64;
        let mut val = move || {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            round_bf16(((s >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 2f32.powi((s % 9) as i32))
        };
        let w: Vec<u16> = (0..rows * W_STRIDE).map(|_| val()).collect();
        let mut x = vec![Pairs16::default(); nv * pairs];
        for p in x.iter_mut() {
            for e in p.0.iter_mut() {
                *e = val() as u32 | (val() as u32) << 16;
            }
        }
        #[repr(C, align(64))]
        #[derive(Clone, Copy)]
        struct Lanes([f32; 16]);
        // zero: the first chunk by `chunk_from_zero` on accumulators holding NaNs
        let run = |parts: usize, zero: bool| {
            let start = if zero { f32::NAN } else { 0.0 };
            let mut acc = vec![Lanes([start; 16]); rows * nv];
            let (wi, xi) = (pairs / parts * 2, pairs / parts);
            // SAFETY: AMX bf16 usable (checked); `CONFIG` loaded here and released below; each
            // part's chunk starts inside w and x with `pairs / parts` pairs left in every row
            // and vector; acc holds rows · nv vectors of 16 f32, 64-byte aligned.
            unsafe {
                crate::amx::tile_config(&CONFIG);
                let a = std::slice::from_raw_parts_mut(acc.as_mut_ptr() as *mut __m512, rows * nv);
                for p in 0..parts {
                    let c = Chunk {
                        w: &w[p * wi..],
                        x: &x[p * xi..],
                        x_stride: pairs,
                        pairs: pairs / parts,
                    };
                    if zero && p == 0 {
                        chunk_from_zero(&c, rows, nv, a);
                    } else {
                        chunk(&c, rows, nv, a);
                    }
                }
                crate::amx::tile_release();
            }
            acc.iter()
                .flat_map(|l| l.0.map(f32::to_bits))
                .collect::<Vec<u32>>()
        };
        let (one, two) = (run(1, false), run(2, false));
        assert!(
            one.iter().any(|&b| b != 0),
            "all outputs zero: the test cannot fail"
        );
        assert_eq!(one, two);
        assert_eq!(one, run(1, true));
        assert_eq!(one, run(2, true));
    }
}
