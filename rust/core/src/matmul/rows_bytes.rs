//! M = 1 with the AVX-512 one-byte kernels (fp8_e4m3, fp8_e5m2): a task's weight rows in
//! panels of `PANEL`, K in pieces of `PIECE` columns over the panel, so the piece of the f32
//! activations (16 KiB) stays in L1 while the panel's rows pass. Whole rows of K = 14336 read
//! their 56 KiB of activations from L2 for every 14 KiB of weights. Each output's operations
//! and order are those of one pass over its row (`x86::dot_bytes_avx512`; tested bit for bit).
//! A full panel of rows with one scale each and K a multiple of 64 runs in one pass per piece
//! (`x86::dot_bytes_piece_rows`: the activations loaded once for the 4 rows, 4 independent
//! FMA chains): fp8_e4m3 from memory, one thread, load 20, 2026-12-07 20:15 UTC, main /
//! branch alternating: 4096x14336 4.36 -> 3.92-4.02 ms, 14336x4096 4.62-4.79 -> 3.82-3.91.

use super::x86::{self, ByteLanes, Decode16};
use super::{Acts, Plan};
use crate::qtype::QType;

/// Weight rows of a panel. fp8_e4m3 M = 1 at 14336x4096 (K x N) from memory, one thread, CPU
/// time, Intel Xeon (Emerald Rapids), load 16-19, 2026-12-07 10:09-10:14 UTC, alternating
/// runs: whole rows 4.61-4.74 ms, panels of 4 in pieces of 4096 4.19-4.33, pieces of 8192
/// 4.16-4.29, panels of 2 4.44-4.65, panels of 8 in pieces of 2048 4.35-4.36.
const PANEL: usize = 4;
/// Columns of a piece (a multiple of 64).
const PIECE: usize = 4096;

impl Plan<'_> {
    /// Weight rows `n..n + y.len()` with the one activation row, for fp8 where the plan chose
    /// the AVX-512 kernels; returns the rows done (0: none, the caller's `dots` runs them).
    pub(super) fn rows_bytes(&self, n: usize, y: &mut [f32]) -> usize {
        let Acts::F32Prepared(x) = &self.acts else {
            return 0;
        };
        if !self.avx512 || self.m != 1 {
            return 0;
        }
        match self.w.qtype {
            QType::Fp8E4M3 if self.e4m3_f32 => self.rows_bytes_w::<x86::Fp8E4M3F32>(n, x, y),
            QType::Fp8E4M3 => self.rows_bytes_w::<x86::Fp8E4M3>(n, x, y),
            QType::Fp8E5M2 => self.rows_bytes_w::<x86::Fp8E5M2>(n, x, y),
            _ => return 0,
        }
        y.len()
    }

    fn rows_bytes_w<D: Decode16>(&self, n: usize, x: &[f32], y: &mut [f32]) {
        let (k, rb, bl) = (self.k, self.row_bytes, self.block_len);
        let (panel, piece) = (PANEL, PIECE);
        // Long rows: each place is prefetched a panel ahead (the same piece of the next
        // panel's rows); one piece a row: the whole-row kernel's distance.
        let pf = if k > piece {
            panel * rb
        } else {
            x86::BYTES_PREFETCH_L2
        };
        let x = &x[..k];
        let wrow = |i: usize| &self.w.data[(n + i) * rb..(n + i + 1) * rb];
        let mut p0 = 0;
        while p0 < y.len() {
            let np = panel.min(y.len() - p0);
            let mut lanes = [ByteLanes::<1>::new(); PANEL];
            let mut nan = [false; PANEL];
            let mut i0 = 0;
            // A whole panel of rows with one scale each and K a multiple of 64: the rows
            // interleaved in one pass per piece (`dot_bytes_piece_rows`).
            let together = np == PANEL && bl == k && k.is_multiple_of(64);
            while i0 < k {
                let i1 = (i0 + piece).min(k);
                if together {
                    let q: [&[u8]; PANEL] = std::array::from_fn(|p| wrow(p0 + p));
                    let s: [f32; PANEL] = std::array::from_fn(|p| self.stats_of(n + p0 + p)[0]);
                    // SAFETY: as below; each row has K bytes (a multiple of 64) and one
                    // scale, i0 and i1 are multiples of 64.
                    let found = unsafe {
                        x86::dot_bytes_piece_rows::<D, PANEL>(q, s, x, i0, i1, pf, &mut lanes)
                    };
                    for p in 0..PANEL {
                        nan[p] |= found[p];
                    }
                    i0 = i1;
                    continue;
                }
                for p in 0..np {
                    // SAFETY: avx512 is set for fp8 only with `cpu::has_avx512`, K >= 64 and
                    // the activations prepared for `D` (`plan`); `plan` checked the row's K
                    // bytes and its one scale per block (blocks the row, or 2^n >= 32 dividing
                    // K); i0 is a multiple of 64, i1 too or K.
                    nan[p] |= unsafe {
                        x86::dot_bytes_piece::<D>(
                            wrow(p0 + p),
                            self.stats_of(n + p0 + p),
                            bl,
                            x,
                            i0,
                            i1,
                            pf,
                            &mut lanes[p],
                        )
                    };
                }
                i0 = i1;
            }
            for p in 0..np {
                y[p0 + p] = if nan[p] {
                    f32::NAN
                } else {
                    // SAFETY: AVX-512 F (`cpu::has_avx512`, as above).
                    (unsafe { lanes[p].finish() })[0]
                };
            }
            p0 += np;
        }
    }
}
