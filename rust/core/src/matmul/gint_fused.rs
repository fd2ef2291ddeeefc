//! The fused grouped-integer kernel's driver (`x86::gint`: 4- and 8-bit codes read in place,
//! arithmetic `reference::gint`): which formats take it, its activations, and its panels.
//! x86-64 only (declared so in `mod.rs`).

use super::reference;
use super::*;

/// Weight rows of one panel of the fused grouped-integer kernel (`Plan::gint_panels`), and the
/// elements of one piece of K over it.
const GINT_PANEL: usize = 8;
const GINT_PIECE: usize = 4096;

/// Grouped integers take the fused kernel (`x86::gint`, arithmetic `reference::gint`) at 4 and
/// 8 bits where the AVX-512 q16 kernels run (`avx512`: `cpu::has_vnni_q16`); otherwise each
/// row is decoded to int8 for the q16 int8 kernels (`Plan::dots_gint`). Float zeros
/// (`int*_fz`) always take the decoded path, whose exact rest `float_zero` adds.
pub(super) fn gint_fused(g: crate::qtype::GInt, avx512: bool) -> bool {
    avx512 && reference::gint::fused_bits(g)
}

/// The fused kernel's activations from the q16 rows `q` (element order, split in place).
pub(super) fn prepare_gint(
    g: crate::qtype::GInt,
    k: usize,
    m: usize,
    q: &mut [Line64],
    d: &[f32],
    row: usize,
) -> x86::gint::GintActs {
    let q: &mut [i16] = bytemuck::cast_slice_mut(q);
    let acts = x86::gint::prepare(g, k, m, q, d, row);
    if row > 0 {
        q.chunks_exact_mut(row)
            .for_each(|r| x86::gint::split_x(r, g.bits));
    }
    acts
}

impl Plan<'_> {
    /// Grouped integers on the fused kernel (`self.gint` set): weight rows `n0..n0 + rows` with
    /// the activation rows `ms` into `yt` (M values per weight row). Activation rows go in
    /// groups of up to 4; for each group, panels of `GINT_PANEL` weight rows, K in pieces of
    /// `GINT_PIECE` elements over the panel (the group's piece of activations stays in L1
    /// while the panel's rows pass), and within a piece `x86::gint::gint_units` with P rows
    /// of the panel at a time (each activation load serves P weight rows, each unpacked unit
    /// the group's rows). Each output's operations and order are those of one pass over its
    /// row (`reference::gint`, tested bit for bit).
    pub(super) fn gint_panels(
        &self,
        n0: usize,
        rows: usize,
        ms: std::ops::Range<usize>,
        yt: &mut [f32],
    ) {
        let mut j = ms.start;
        while j < ms.end {
            j += match ms.end - j {
                1 => self.gint_rows1(n0, rows, j, yt),
                2 | 3 => self.gint_group::<2, 2>(n0, rows, j, yt),
                _ => self.gint_group::<2, 4>(n0, rows, j, yt),
            };
        }
    }

    /// Activation row `mi` as the fused kernel reads it.
    fn gint_x(&self, mi: usize) -> x86::gint::Row<'_> {
        let ga = self.gint.as_ref().expect("the fused kernel's activations");
        let Acts::Q16 { q, d, row, blocks } = &self.acts else {
            unreachable!("grouped integers have q16 activations")
        };
        let q: &[i16] = bytemuck::cast_slice(q);
        x86::gint::Row {
            xq: &q[mi * row..(mi + 1) * row],
            xd: &d[mi * blocks..(mi + 1) * blocks],
            xdl: ga
                .xdl
                .get(mi * ga.lanes..(mi + 1) * ga.lanes)
                .unwrap_or_default(),
            xg: ga
                .xg
                .get(mi * ga.groups..(mi + 1) * ga.groups)
                .unwrap_or_default(),
        }
    }

    /// `gint_panels` for the one activation row `m0`: each weight row whole through
    /// `x86::gint_row` (one weight stream read in order, which the last-level cache and memory
    /// serve fastest); returns 1.
    fn gint_rows1(&self, n0: usize, rows: usize, m0: usize, yt: &mut [f32]) -> usize {
        use x86::gint_row::{gint_row, gint_row_finish, layout};
        let g = self
            .w
            .qtype
            .gint()
            .expect("gint_panels is called for grouped integers");
        let (k, m, rb) = (self.k, self.m, self.row_bytes);
        let x = self.gint_x(m0);
        let lay = layout(g, k);
        // Each row prefetches its codes and its statistics `GINT_PANEL` rows on.
        let ahead = GINT_PANEL * rb;
        let stats_ahead = GINT_PANEL * 4 * self.stats_per_row;
        for i in 0..rows {
            let n = n0 + i;
            let (w, st) = (&self.w.data[n * rb..(n + 1) * rb], self.stats_of(n));
            for off in (0..4 * st.len()).step_by(64) {
                let p = (st.as_ptr() as *const u8).wrapping_add(stats_ahead + off);
                // SAFETY: a prefetch is a hint and never faults; SSE is baseline on x86-64.
                unsafe {
                    std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T1 }>(
                        p as *const i8,
                    )
                };
            }
            // SAFETY: `gint` is set only by `gint_fused` (`cpu::has_vnni_q16`, 4 bits, or 8
            // bits symmetric); `plan` validated the rows (K codes, whole groups, their
            // statistics) and quantized, split and summed every activation row for K; `lay`
            // is `layout(g, k)`.
            let y = unsafe {
                let acc = match (g.bits == 4, lay.per) {
                    (true, 1) => gint_row::<true, 1>(g, w, st, k, x, lay, ahead),
                    (true, 2) => gint_row::<true, 2>(g, w, st, k, x, lay, ahead),
                    (true, _) => gint_row::<true, 4>(g, w, st, k, x, lay, ahead),
                    (false, 1) => gint_row::<false, 1>(g, w, st, k, x, lay, ahead),
                    (false, _) => gint_row::<false, 2>(g, w, st, k, x, lay, ahead),
                };
                gint_row_finish(g, st, x, lay, acc)
            };
            yt[i * m + m0] = y;
            if self.zeros_deferred && !crate::formats::gint::row_zeros_ok(g, st, lay.groups) {
                self.bad_zeros
                    .store(true, std::sync::atomic::Ordering::Relaxed);
            }
        }
        1
    }

    /// `gint_panels` for the R activation rows from `m0`, P weight rows a kernel call; returns R.
    fn gint_group<const P: usize, const R: usize>(
        &self,
        n0: usize,
        rows: usize,
        m0: usize,
        yt: &mut [f32],
    ) -> usize {
        use x86::gint::{gint_finish, gint_units, new_acc, Acc, Row};
        let g = self
            .w
            .qtype
            .gint()
            .expect("gint_panels is called for grouped integers");
        let (k, m, rb) = (self.k, self.m, self.row_bytes);
        let x: [Row<'_>; R] = std::array::from_fn(|r| self.gint_x(m0 + r));
        let wrow = |n: usize| &self.w.data[n * rb..(n + 1) * rb];
        let units = x86::gint::units(g, k);
        let unit = if g.bits == 4 {
            reference::gint::UNIT4
        } else {
            reference::gint::UNIT8
        };
        // One activation row stays in L1 whole, and one weight stream at a time reads fastest
        // from memory (pieces over a panel interleave its rows' streams).
        let piece = if R == 1 {
            units
        } else {
            (GINT_PIECE / unit).max(1)
        };
        // Each unit prefetches the same place in the next panel.
        let ahead = GINT_PANEL * rb;
        let mut p0 = 0;
        while p0 < rows {
            let np = GINT_PANEL.min(rows - p0);
            let (subs, rest) = (np / P, np % P);
            let mut acc: [Acc<P, R>; GINT_PANEL] = [new_acc(); GINT_PANEL];
            let mut acc1: [Acc<1, R>; GINT_PANEL] = [new_acc(); GINT_PANEL];
            let first = n0 + p0;
            let mut u0 = 0;
            while u0 < units {
                let us = u0..(u0 + piece).min(units);
                for (s, a) in acc[..subs].iter_mut().enumerate() {
                    let n = first + s * P;
                    // SAFETY: `gint` is set only by `gint_fused` (`cpu::has_vnni_q16`, 4 or 8
                    // bits); `plan` validated the rows (K codes, whole groups, their
                    // statistics) and quantized, split and summed every activation row for K.
                    unsafe {
                        gint_units::<P, R>(
                            g,
                            std::array::from_fn(|i| wrow(n + i)),
                            std::array::from_fn(|i| self.stats_of(n + i)),
                            k,
                            x,
                            us.clone(),
                            ahead,
                            a,
                        )
                    };
                }
                for (s, a) in acc1[..rest].iter_mut().enumerate() {
                    let n = first + subs * P + s;
                    // SAFETY: as above.
                    unsafe {
                        gint_units::<1, R>(
                            g,
                            [wrow(n)],
                            [self.stats_of(n)],
                            k,
                            x,
                            us.clone(),
                            ahead,
                            a,
                        )
                    };
                }
                u0 = us.end;
            }
            let mut put = |i: usize, y: [f32; R]| {
                yt[(p0 + i) * m + m0..(p0 + i) * m + m0 + R].copy_from_slice(&y);
            };
            for (s, a) in acc[..subs].iter().enumerate() {
                let n = first + s * P;
                // SAFETY: as above.
                let out = unsafe {
                    gint_finish::<P, R>(g, std::array::from_fn(|i| self.stats_of(n + i)), k, x, a)
                };
                for (i, y) in out.into_iter().enumerate() {
                    put(s * P + i, y);
                }
            }
            for (s, a) in acc1[..rest].iter().enumerate() {
                let n = first + subs * P + s;
                // SAFETY: as above.
                let [y] = unsafe { gint_finish::<1, R>(g, [self.stats_of(n)], k, x, a) };
                put(subs * P + s, y);
            }
            p0 += np;
        }
        R
    }

    /// M = 1 grouped integers of 4 and 8 bits on AVX2 without the AVX-512 kernels: each row
    /// through `x86::gint_avx2` (the codes unpacked in registers; `dots_gint`'s bits, the row
    /// never decoded into a buffer). Returns the rows done: all of `y`, or none where the
    /// kernel does not run.
    pub(super) fn gint_rows_avx2(&self, n0: usize, y: &mut [f32]) -> usize {
        let Some(g) = self.w.qtype.gint() else {
            return 0;
        };
        let k = self.k;
        let takes =
            self.simd && !self.avx512 && crate::cpu::has_fma() && x86::gint_avx2::takes(g, k);
        let Acts::Q16 { q, d, .. } = &self.acts else {
            return 0;
        };
        if !takes {
            return 0;
        }
        let (xq, xd): (&[i16], &[f32]) = (bytemuck::cast_slice(q), d);
        for (i, v) in y.iter_mut().enumerate() {
            let n = n0 + i;
            let w = &self.w.data[n * self.row_bytes..(n + 1) * self.row_bytes];
            // SAFETY: AVX2 (`simd`) and FMA checked, `takes(g, k)`; lengths are checked there.
            *v = unsafe { x86::gint_avx2::dot_gint_avx2(g, w, self.stats_of(n), k, xq, xd) };
            self.add_float_zero(n, 0..1, std::slice::from_mut(v));
        }
        y.len()
    }
}
