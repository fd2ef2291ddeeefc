//! fp8 (e4m3, e5m2) with the AVX2 kernels (no AVX-512; M = 1 e4m3 with the bit map only): a task's weight rows in
//! panels of `PANEL`, K in pieces of `PIECE` columns, and per piece the activation rows in
//! groups of up to 4 against each row of the panel (`x86::fp8_range`), so the group's piece of
//! the activations (16 KiB) stays in L1 while the panel's rows pass, and the panel's piece of
//! the weights while the groups pass. Whole rows (`dot_fp8`) read 4 activation rows of K = 4096
//! (64 KiB) from L2 for every 4 KiB of weights and spilled their 32 accumulators. Each output's
//! operations and order are `dot_fp8`'s over its row (tested bit for bit, `matmul/tests.rs`).

use super::x86::{self, Fp8Pieces, Lanes64};
use super::{Acts, Plan};
use crate::matmul::reference::WIDE;
use crate::qtype::QType;
use std::cell::RefCell;
use std::ops::Range;

/// Weight rows of a panel.
const PANEL: usize = 8;
/// Columns of a piece (a multiple of 64).
const PIECE: usize = 1024;

thread_local! {
    /// Each pool thread's lanes: PANEL x (activation rows of the block).
    static LANES: RefCell<Vec<Lanes64>> = const { RefCell::new(Vec::new()) };
}

/// True where `rows_fp8` may run (`Plan::fp8_pieces` decides): fp8, any M, the AVX2 kernels
/// (`simd` with FMA, not the AVX-512 ones), K >= 64.
pub(super) fn takes(qtype: QType, m: usize, k: usize, simd: bool, avx512: bool) -> bool {
    matches!(qtype, QType::Fp8E4M3 | QType::Fp8E5M2)
        && m >= 1
        && simd
        && !avx512
        && k >= WIDE
        && crate::cpu::has_fma()
}

impl Plan<'_> {
    /// `takes` for this plan, from 4 rows or with e4m3's bit map (`e4m3_f32`): at M = 2 the
    /// float16 route was slower in pieces (e5m2 4096x14336: 19.4 against 16.4 ms).
    pub(super) fn fp8_pieces(&self) -> bool {
        takes(self.w.qtype, self.m, self.k, self.simd, self.avx512)
            && (self.m >= 4 || self.e4m3_f32)
    }

    /// Weight rows `n..n + rows` with the activation rows `ms` into `yt` (row `n` first, M
    /// values a row); returns the rows done (0 where `fp8_pieces` does not hold).
    pub(super) fn rows_fp8(
        &self,
        n: usize,
        rows: usize,
        ms: Range<usize>,
        yt: &mut [f32],
    ) -> usize {
        if !self.fp8_pieces() {
            return 0;
        }
        match self.w.qtype {
            QType::Fp8E4M3 if self.e4m3_f32 => self.rows_fp8_w::<x86::Fp8E4M3F32>(n, rows, ms, yt),
            QType::Fp8E4M3 => self.rows_fp8_w::<x86::Fp8E4M3>(n, rows, ms, yt),
            _ => self.rows_fp8_w::<x86::Fp8E5M2>(n, rows, ms, yt),
        }
        rows
    }

    fn rows_fp8_w<D: Fp8Pieces>(&self, n: usize, rows: usize, ms: Range<usize>, yt: &mut [f32]) {
        let xs: &[f32] = match &self.acts {
            Acts::F32(xs) => xs,
            Acts::F32Prepared(xs) => xs,
            _ => unreachable!("fp8 has f32 activations"),
        };
        // `Fp8E4M3F32` decodes NaN codes as finite values: the rows that hold one are NaN.
        let scan = self.e4m3_f32;
        let (k, m, rb, bl) = (self.k, self.m, self.row_bytes, self.block_len);
        let nr = ms.len();
        let xrow = |mi: usize| &xs[mi * k..(mi + 1) * k];
        let wrow = |i: usize| &self.w.data[(n + i) * rb..(n + i + 1) * rb];
        LANES.with_borrow_mut(|lanes| {
            lanes.resize(PANEL * nr, Lanes64::ZERO);
            let mut p0 = 0;
            while p0 < rows {
                let np = PANEL.min(rows - p0);
                lanes[..np * nr].fill(Lanes64::ZERO);
                let mut nan = [false; PANEL];
                let mut i0 = 0;
                while i0 < k {
                    let i1 = (i0 + PIECE).min(k);
                    let mut j = 0;
                    while j < nr {
                        let g = (nr - j).min(4);
                        let m0 = ms.start + j;
                        for p in 0..np {
                            let (q, s) = (wrow(p0 + p), self.stats_of(n + p0 + p));
                            if scan && j == 0 {
                                // SAFETY: AVX2 (`fp8_pieces`).
                                nan[p] |= unsafe { x86::e4m3_nan_codes(&q[i0..i1]) };
                            }
                            let st = &mut lanes[p * nr + j..];
                            // SAFETY: `fp8_pieces`: AVX2, F16C (`simd`) and FMA, K >= 64;
                            // `plan` checked K bytes a row and one scale per block (blocks the
                            // row or 2^n >= 32); i0 a multiple of 64, i1 too or K; st holds
                            // positions 0..i0 of these rows.
                            unsafe {
                                match g {
                                    1 => x86::fp8_range::<D, 1>(q, s, bl, [xrow(m0)], i0, i1, st),
                                    2 => {
                                        let x = [xrow(m0), xrow(m0 + 1)];
                                        x86::fp8_range::<D, 2>(q, s, bl, x, i0, i1, st)
                                    }
                                    3 => {
                                        let x = [xrow(m0), xrow(m0 + 1), xrow(m0 + 2)];
                                        x86::fp8_range::<D, 3>(q, s, bl, x, i0, i1, st)
                                    }
                                    _ => {
                                        let x = std::array::from_fn(|r| xrow(m0 + r));
                                        x86::fp8_range::<D, 4>(q, s, bl, x, i0, i1, st)
                                    }
                                }
                            }
                        }
                        j += g;
                    }
                    i0 = i1;
                }
                for p in 0..np {
                    for j in 0..nr {
                        // SAFETY: AVX2 (`fp8_pieces`).
                        let y = unsafe { lanes[p * nr + j].finish() };
                        yt[(p0 + p) * m + ms.start + j] = if nan[p] { f32::NAN } else { y };
                    }
                }
                p0 += np;
            }
        });
    }
}
