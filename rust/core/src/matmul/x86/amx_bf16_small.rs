//! The bf16 GEMM on AMX tiles for few activation rows (`MIN_M` to 16: one activation vector,
//! one B tile per 16 pairs), where the decode of the weights is most of the time: a job owns
//! `ROWS` weight rows (panels of 16, one C tile each; the kernel takes up to 4) for the whole
//! of K, the C tiles stay in the tile registers from the first pair to the last (no load /
//! store per chunk), and each chunk of `KCS` columns is decoded into a buffer that stays in
//! L1 (`ROWS` x `W_STRIDE` bf16) right before its tile steps read it. The driver is
//! `matmul/gemm_bf16_small.rs`.
//!
//! **Numerics.** Each output is the same chain of `tdpbf16ps` steps as on `amx_bf16.rs` (16
//! pairs a step, in K order, from +0): C kept in a register instead of stored and reloaded
//! between chunks, which is exact, so the same bits as that path for the same inputs and
//! `amx_bf16::error_bound` holds (tested in `matmul/tests/bf16.rs` and below).
//!
//! Safety: callers check `amx::amx_bf16_usable()` and configure the tiles with `CONFIG` on the
//! running thread first.

use std::arch::asm;
use std::arch::x86_64::__m512;

use super::gemm16::{Pairs16, KC};
use crate::amx::TileConfig;

/// Weight rows of one job: one panel (one C tile), so that each row's chunk is a long run of
/// bytes. Jobs of 16, 32 and 64 rows with chunks of 256, 512 and 1024 columns: 16 x 1024 was
/// the fastest (nf4 4096x14336, M = 16, one thread, CPU time, 2026-12-07, load 20: 8.2-8.4
/// ms against 9.2-10.3 for 64 x 256), the hardware prefetchers following 16 streams of 512
/// bytes a chunk better than 64 of 128.
pub const ROWS: usize = 16;
/// Columns of K per decoded chunk (its 16 rows, 33 KiB, stay in L1).
pub const KCS: usize = 4 * KC;
/// Entries between the decoded chunk's rows: `KCS` and one 64-byte line more (the 16 rows of
/// an A tile in 16 different L1 sets).
pub const W_STRIDE: usize = KCS + 32;
/// The fewest activation rows that run here (where AMX bf16 is usable): at M = 8 these tiles
/// took 7.3 ms against the row kernels' 10.0 (nf4 4096x14336; int8 7.8 against 12.0; one
/// thread, CPU time, 2026-12-07, load 20); at M = 4 the row kernels were faster (4.0 ms).
pub const MIN_M: usize = 8;

/// C 0-3, A 4-5, B 6 (and 7: one panel's second B), 16 rows x 64 bytes each.
pub const CONFIG: TileConfig = TileConfig::new()
    .tile(0, 16, 64)
    .tile(1, 16, 64)
    .tile(2, 16, 64)
    .tile(3, 16, 64)
    .tile(4, 16, 64)
    .tile(5, 16, 64)
    .tile(6, 16, 64)
    .tile(7, 16, 64);

/// True when a bf16 GEMM of `m` activation rows runs here: `MIN_M..=16` rows and the tiles
/// allowed on this thread (`amx_bf16::use_amx`: usable, not forced off).
pub fn use_small(m: usize) -> bool {
    (MIN_M..=16).contains(&m) && super::amx_bf16::use_amx(usize::MAX)
}

/// One job's C tiles as 64 rows of 16 f32 (row i: weight row i of the job, lanes: activation
/// rows), 64-byte aligned for `tilestored` and the driver's vector reads.
#[repr(C, align(64))]
pub struct Tiles(pub [__m512; 64]);

// (`tile_load!`, `tdp!`: amx_bf16's macros)

/// C tiles 0-3 to zero (the chains' +0 start).
///
/// # Safety
/// AMX bf16 usable and `CONFIG` loaded on this thread.
pub unsafe fn zero() {
    // SAFETY: the caller's contract; tilezero touches no memory.
    unsafe {
        asm!(
            "tilezero tmm0",
            "tilezero tmm1",
            "tilezero tmm2",
            "tilezero tmm3",
            options(nomem, nostack)
        )
    };
}

/// Adds one chunk to the C tiles of `panels` panels (1..=4): `w` the decoded chunk (panel r's
/// row i at `(16 r + i) · ws`, `2 · pairs` bf16 each, ws a multiple of 32), `x` the activation
/// vector's `pairs` pairs of this chunk (a multiple of 16).
///
/// # Safety
/// AMX bf16 usable and `CONFIG` loaded on this thread.
pub unsafe fn chunk(w: &[u16], ws: usize, x: &[Pairs16], pairs: usize, panels: usize) {
    assert!((1..=4).contains(&panels) && pairs.is_multiple_of(16) && 2 * pairs <= ws);
    assert!(w.len() >= 16 * panels * ws && x.len() >= pairs && ws.is_multiple_of(32));
    // SAFETY: the caller's contract and the asserts above.
    unsafe {
        match panels {
            1 => steps1(w, ws, x, pairs),
            2 => steps::<2>(w, ws, x, pairs),
            3 => steps::<3>(w, ws, x, pairs),
            _ => steps::<4>(w, ws, x, pairs),
        }
    }
}

/// `chunk` for one panel: the A and B tiles of consecutive steps in two pairs of registers
/// (4 / 6, 5 / 7), so that a step's loads need not wait for the previous step's `tdpbf16ps`
/// to release its tiles, and the B tiles loaded with the T1 hint (`tileloaddt1`: 32 KiB of
/// activations a chunk, streamed once a job, that would push the decoded chunk out of L1).
/// The same chain of steps into tile 0 as `steps::<1>`, so the same bits. nf4 M = 8,
/// 4096x14336: 5.5 ms against 6.2 (one thread, CPU time, 2026-12-07, load 25; int8 7.1
/// against 7.6, fp8 9.2 against 9.8).
///
/// # Safety
/// As `chunk`, with its asserts' conditions for one panel.
#[inline(always)]
unsafe fn steps1(w: &[u16], ws: usize, x: &[Pairs16], pairs: usize) {
    let a_stride: usize = ws * 2;
    // SAFETY: as `steps` for P = 1: every A tile is 16 rows of 64 bytes inside w, every B tile
    // 16 consecutive Pairs16 inside x (p + 16 <= pairs, p + 32 <= pairs in the loop).
    unsafe {
        let a = w.as_ptr();
        let b = x.as_ptr();
        let mut p = 0;
        while p + 32 <= pairs {
            tile_load_t1!(6, b.add(p), 64usize);
            tile_load!(4, a.add(2 * p), a_stride);
            tdp!(0, 4, 6);
            tile_load_t1!(7, b.add(p + 16), 64usize);
            tile_load!(5, a.add(2 * p + 32), a_stride);
            tdp!(0, 5, 7);
            p += 32;
        }
        if p < pairs {
            tile_load_t1!(6, b.add(p), 64usize);
            tile_load!(4, a.add(2 * p), a_stride);
            tdp!(0, 4, 6);
        }
    }
}

/// `chunk` for `P` panels.
///
/// # Safety
/// As `chunk`, with the asserts' conditions.
#[inline(always)]
unsafe fn steps<const P: usize>(w: &[u16], ws: usize, x: &[Pairs16], pairs: usize) {
    let a_stride: usize = ws * 2;
    let panel: usize = 16 * ws;
    // SAFETY: every A tile is 16 rows of 64 bytes inside w (rows 16 r.. of the chunk, pairs
    // p..p + 16: 2 p + 32 <= 2 · pairs <= W_STRIDE entries from a row's start); every B tile
    // 16 consecutive Pairs16 inside x (p + 16 <= pairs).
    unsafe {
        let a = w.as_ptr();
        let b = x.as_ptr();
        let mut p = 0;
        while p < pairs {
            tile_load!(6, b.add(p), 64usize);
            tile_load!(4, a.add(2 * p), a_stride);
            tdp!(0, 4, 6);
            if P >= 2 {
                tile_load!(5, a.add(panel + 2 * p), a_stride);
                tdp!(1, 5, 6);
            }
            if P >= 3 {
                tile_load!(4, a.add(2 * panel + 2 * p), a_stride);
                tdp!(2, 4, 6);
            }
            if P >= 4 {
                tile_load!(5, a.add(3 * panel + 2 * p), a_stride);
                tdp!(3, 5, 6);
            }
            p += 16;
        }
    }
}

/// The C tiles of `panels` panels into `c` (panel r at rows `16 r..16 r + 16`).
///
/// # Safety
/// AMX bf16 usable and `CONFIG` loaded on this thread; panels in 1..=4.
pub unsafe fn store(panels: usize, c: &mut Tiles) {
    assert!((1..=4).contains(&panels));
    let p = c.0.as_mut_ptr();
    let s = 64usize;
    // SAFETY: tile r goes to rows 16 r..16 r + 16 of c (64 rows of 64 bytes), r < panels <= 4.
    unsafe {
        asm!("tilestored [{p} + {s}*1], tmm0", p = in(reg) p, s = in(reg) s, options(nostack));
        if panels >= 2 {
            let q = p.add(16);
            asm!("tilestored [{p} + {s}*1], tmm1", p = in(reg) q, s = in(reg) s, options(nostack));
        }
        if panels >= 3 {
            let q = p.add(32);
            asm!("tilestored [{p} + {s}*1], tmm2", p = in(reg) q, s = in(reg) s, options(nostack));
        }
        if panels >= 4 {
            let q = p.add(48);
            asm!("tilestored [{p} + {s}*1], tmm3", p = in(reg) q, s = in(reg) s, options(nostack));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::matmul::reference::bf16::round_bf16;
    use crate::matmul::x86::amx_bf16;

    /// Every panel count (1 to 4) gives the bits of `amx_bf16::chunk` (C stored and reloaded
    /// between chunks) on the same decoded rows and activations, over two chunks: the same
    /// chain.
    #[test]
    fn same_bits_as_the_tile_path() {
        if !crate::amx::amx_bf16_usable() {
            return; // no tiles here
        }
        const R: usize = 64;
        const WS: usize = KC + 32;
        let mut s = 0x2545_f491_4f6c_dd1du64;
        let mut val = move || {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            round_bf16(((s >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 2f32.powi((s % 13) as i32))
        };
        let pairs = KC / 2;
        let chunks = 2;
        let x: Vec<Pairs16> = (0..chunks * pairs)
            .map(|_| Pairs16(std::array::from_fn(|_| val() as u32 | (val() as u32) << 16)))
            .collect();
        // Weight rows: chunk c of row i at [c][i · WS..] (ours) and at
        // [i · amx W_STRIDE + c · KC] (the tile path's chunk of 2 · KC columns).
        let w: Vec<Vec<u16>> = (0..chunks)
            .map(|_| (0..R * WS).map(|_| val()).collect())
            .collect();
        let mut wa = vec![0u16; R * amx_bf16::W_STRIDE];
        for (c, wc) in w.iter().enumerate() {
            for i in 0..R {
                wa[i * amx_bf16::W_STRIDE + c * KC..][..KC].copy_from_slice(&wc[i * WS..][..KC]);
            }
        }
        #[repr(C, align(64))]
        struct Acc([__m512; R]);
        // SAFETY: AMX bf16 usable (checked); each configuration loaded and released here; the
        // buffers have the lengths `chunk` / `amx_bf16::chunk` need (R rows, one vector).
        let (want, got) = unsafe {
            let mut acc = Acc([core::arch::x86_64::_mm512_setzero_ps(); R]);
            crate::amx::tile_config(&amx_bf16::CONFIG);
            let c = amx_bf16::Chunk {
                w: &wa,
                x: &x,
                x_stride: chunks * pairs,
                pairs: chunks * pairs,
            };
            amx_bf16::chunk(&c, R, 1, &mut acc.0);
            crate::amx::tile_release();
            let want: Vec<u32> = acc.0.iter().flat_map(|v| bits(*v)).collect();
            let mut got = Vec::new();
            for panels in 1..=4 {
                let mut t = Tiles([core::arch::x86_64::_mm512_setzero_ps(); 64]);
                crate::amx::tile_config(&CONFIG);
                zero();
                for (c, wc) in w.iter().enumerate() {
                    chunk(wc, WS, &x[c * pairs..], pairs, panels);
                }
                store(panels, &mut t);
                crate::amx::tile_release();
                got.push(
                    t.0[..16 * panels]
                        .iter()
                        .flat_map(|v| bits(*v))
                        .collect::<Vec<u32>>(),
                );
            }
            (want, got)
        };
        assert!(
            want.iter().any(|&b| b != 0),
            "all zero: the test cannot fail"
        );
        for (p, g) in got.iter().enumerate() {
            assert_eq!(g[..], want[..g.len()], "{} panels", p + 1);
        }
    }

    /// One panel (`steps1`: two pairs of A / B tiles, a last odd step) gives the bits of the
    /// first panel of two (`steps::<2>`, one A / B pair a step) over an odd number of steps,
    /// two chunks: the same chain either way.
    #[test]
    fn one_panel_same_bits_as_the_first_of_two_with_odd_steps() {
        if !crate::amx::amx_bf16_usable() {
            return; // no tiles here
        }
        const WS: usize = KC + 32;
        let pairs = KC / 2 - 16; // 7 steps of 16 pairs
        let mut s = 0x9e37_79b9_7f4a_7c15u64;
        let mut val = move || {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            round_bf16(((s >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 2f32.powi((s % 13) as i32))
        };
        let x: Vec<Pairs16> = (0..2 * pairs)
            .map(|_| Pairs16(std::array::from_fn(|_| val() as u32 | (val() as u32) << 16)))
            .collect();
        let w: Vec<Vec<u16>> = (0..2)
            .map(|_| (0..32 * WS).map(|_| val()).collect())
            .collect();
        let run = |panels: usize| {
            // SAFETY: AMX bf16 usable (checked), so AVX-512 F; configured and released here;
            // w holds 32 rows WS apart, x 2 · pairs pairs.
            let t = unsafe {
                let mut t = Tiles([core::arch::x86_64::_mm512_setzero_ps(); 64]);
                crate::amx::tile_config(&CONFIG);
                zero();
                for (c, wc) in w.iter().enumerate() {
                    chunk(wc, WS, &x[c * pairs..], pairs, panels);
                }
                store(panels, &mut t);
                crate::amx::tile_release();
                t
            };
            t.0[..16]
                .iter()
                .flat_map(|v| bits(*v))
                .collect::<Vec<u32>>()
        };
        let (one, two) = (run(1), run(2));
        assert!(
            one.iter().any(|&b| b != 0),
            "all zero: the test cannot fail"
        );
        assert_eq!(one, two);
    }

    fn bits(v: __m512) -> [u32; 16] {
        // SAFETY: __m512 is 16 u32, any bits valid.
        unsafe { std::mem::transmute::<__m512, [u32; 16]>(v) }
    }
}
