//! One task of the row-kernel / tile path (`Plan::fill`): its weight rows against blocks of
//! activation rows, into the task's N x M block; and the long-K nf4 / int8 pieces.

use super::*;

impl Plan<'_> {
    /// The rows of the N x M result (`yt`, M values per weight row) from weight row `n0` on.
    /// Activation rows go in blocks of `m_block` (kept in cache while the task's weight rows
    /// pass), weight rows in panels of `NR` (tile path) or one by one; each output's
    /// arithmetic is the same wherever it sits.
    pub(super) fn fill(&self, n0: usize, yt: &mut [f32]) {
        let m = self.m;
        let rows = yt.len() / m;
        let mut mb = 0;
        while mb < m {
            let ms = mb..(mb + self.m_block).min(m);
            let mut i = 0;
            #[cfg(target_arch = "x86_64")]
            if self.tile {
                while i + NR <= rows {
                    self.panel::<NR>(n0 + i, ms.clone(), &mut yt[i * m..(i + NR) * m]);
                    i += NR;
                }
                // (q4_1 / q5_1 have only the paired 512-bit tiles: their last rows take the
                // row kernels below, with the same bits.)
                while i < rows && !matches!(self.w.qtype, QType::Q4_1 | QType::Q5_1) {
                    self.panel::<1>(n0 + i, ms.clone(), &mut yt[i * m..(i + 1) * m]);
                    i += 1;
                }
            }
            #[cfg(target_arch = "x86_64")]
            if self.avx512 && m == 1 && matches!(self.w.qtype, QType::NF4 | QType::Int8) {
                self.q16_pieces(n0, ms.clone(), yt);
                i = rows;
            }
            #[cfg(target_arch = "x86_64")]
            if self.row32_avx2 {
                self.rows32_avx2(n0 + i, &mut yt[i..rows]);
                i = rows;
            }
            #[cfg(target_arch = "x86_64")]
            if self.row32 {
                // M = 1: ROW32 weight rows at a time for short rows, then one by one.
                while i < rows {
                    let r = if self.k <= ROW32_MAX_K && rows - i >= ROW32 {
                        ROW32
                    } else {
                        1
                    };
                    self.rows32(n0 + i, &mut yt[i..i + r]);
                    i += r;
                }
            }
            #[cfg(target_arch = "x86_64")]
            if self.gint.is_some() {
                self.gint_panels(n0 + i, rows - i, ms.clone(), &mut yt[i * m..]);
                i = rows;
            }
            #[cfg(target_arch = "x86_64")]
            if m == 1 && i < rows {
                i += self.gint_rows_avx2(n0 + i, &mut yt[i..rows]);
            }
            if self.w.qtype.gint().is_some() {
                while i < rows {
                    self.dots_gint(
                        n0 + i,
                        ms.clone(),
                        &mut yt[i * m + ms.start..i * m + ms.end],
                    );
                    i += 1;
                }
            }
            #[cfg(target_arch = "x86_64")]
            if m == 1 && i < rows {
                i += self.rows_k(n0 + i, &mut yt[i..rows]);
            }
            #[cfg(target_arch = "x86_64")]
            if m == 1 && i < rows {
                i += self.rows_bytes(n0 + i, &mut yt[i..rows]);
            }
            #[cfg(target_arch = "x86_64")]
            if i < rows {
                i += self.rows_fp8(n0 + i, rows - i, ms.clone(), &mut yt[i * m..]);
            }
            while i < rows {
                self.dots(
                    n0 + i,
                    ms.clone(),
                    &mut yt[i * m + ms.start..i * m + ms.end],
                );
                i += 1;
            }
            mb = ms.end;
        }
    }

    /// nf4 / int8 rows past `Q16_LONG_K` with AVX-512: panels of `Q16_PANEL` weight rows,
    /// activation rows `ms` in groups of up to `ROWS`, K in pieces of `Q16_PIECE` columns. Each
    /// output's operations and order are those of one call over the whole row (identical bits,
    /// tested).
    #[cfg(target_arch = "x86_64")]
    pub(super) fn q16_pieces(&self, n0: usize, ms: std::ops::Range<usize>, yt: &mut [f32]) {
        let m = self.m;
        let rows = yt.len() / m;
        let mut p0 = 0;
        while p0 < rows {
            let np = Q16_PANEL.min(rows - p0);
            let mut j = ms.start;
            while j < ms.end {
                let y = &mut yt[p0 * m..];
                j += match (ms.end - j).min(ROWS) {
                    1 => self.q16_panel::<1>(n0 + p0, np, j, y),
                    2 => self.q16_panel::<2>(n0 + p0, np, j, y),
                    3 => self.q16_panel::<3>(n0 + p0, np, j, y),
                    _ => self.q16_panel::<ROWS>(n0 + p0, np, j, y),
                };
            }
            p0 += np;
        }
    }

    /// Weight rows `n..n + np` with activation rows `m0..m0 + R` into `yt` (row `n` first, M
    /// values per row); returns R.
    #[cfg(target_arch = "x86_64")]
    pub(super) fn q16_panel<const R: usize>(
        &self,
        n: usize,
        np: usize,
        m0: usize,
        yt: &mut [f32],
    ) -> usize {
        let Acts::Q16 { q, d, row, blocks } = &self.acts else {
            unreachable!("nf4 / int8 have q16 activations")
        };
        let (m, bl, nf4) = (self.m, self.block_len, self.w.qtype == QType::NF4);
        let q: &[i16] = bytemuck::cast_slice(q);
        let xq: [&[i16]; R] = std::array::from_fn(|i| &q[(m0 + i) * row..(m0 + i + 1) * row]);
        let xd: [&[f32]; R] = std::array::from_fn(|i| &d[(m0 + i) * blocks..(m0 + i + 1) * blocks]);
        let wrow = |p: usize| &self.w.data[(n + p) * self.row_bytes..(n + p + 1) * self.row_bytes];
        use reference::q16::{UNIT_INT8, UNIT_NF4};
        let unit = if nf4 { UNIT_NF4 } else { UNIT_INT8 };
        let long = self.k > q16_long_k();
        // Rows up to `q16_long_k` in one piece.
        let units = self.k.div_ceil(unit);
        let piece = if long { Q16_PIECE / unit } else { units };
        let mut lanes = [x86::q16::Lanes::<R>::new(); Q16_PANEL];
        // Rows of one piece read the panel's rows one after the other (whole rows' distance).
        let ahead = if long {
            x86::q16::PREFETCH_PANELS
        } else {
            x86::q16::PREFETCH_ROWS
        };
        let mut u0 = 0;
        while u0 < units {
            for (p, l) in lanes[..np].iter_mut().enumerate() {
                let (w, st) = (wrow(p), self.stats_of(n + p));
                // SAFETY: avx512 is set for nf4 / int8 only with `crate::cpu::has_vnni_q16()`;
                // lengths checked by `plan`, activations quantized for this K and kernel;
                // pieces start at even units.
                unsafe { x86::q16::q16_range(nf4, w, st, bl, xq, xd, u0..u0 + piece, ahead, l) };
            }
            u0 += piece;
        }
        for (p, l) in lanes[..np].iter().enumerate() {
            // SAFETY: as above.
            let y = unsafe { l.finish() };
            yt[p * m + m0..p * m + m0 + R].copy_from_slice(&y);
        }
        R
    }

    /// The statistics (absmax or scales) of weight row `n` (the one scale of a per-tensor scale).
    pub(super) fn stats_of(&self, n: usize) -> &[f32] {
        let spr = self.stats_per_row;
        if self.w.stats.len() == 1 {
            self.w.stats
        } else {
            &self.w.stats[n * spr..(n + 1) * spr]
        }
    }
}
