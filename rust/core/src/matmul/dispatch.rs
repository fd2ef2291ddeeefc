//! `Plan`'s per-format dispatch: one weight row against one or more activation rows, to the
//! SIMD kernel the CPU has (`x86`, `neon`) or the scalar reference.

use super::reference::{self, BlockQ8K};
use super::*;
use crate::qtype::QType;

/// Weight rows of one panel of the fused grouped-integer kernel (`Plan::gint_panels`), and the
/// elements of one piece of K over it.
#[cfg(target_arch = "x86_64")]
const GINT_PANEL: usize = 8;
#[cfg(target_arch = "x86_64")]
const GINT_PIECE: usize = 4096;

/// Grouped integers take the fused kernel (`x86::gint`, arithmetic `reference::gint`) at 4 and
/// 8 bits where the AVX-512 q16 kernels run (`avx512`: `cpu::has_vnni_q16`); otherwise each
/// row is decoded to int8 for the q16 int8 kernels (`Plan::dots_gint`). Float zeros
/// (`int*_fz`) always take the decoded path, whose exact rest `float_zero` adds.
#[cfg(target_arch = "x86_64")]
pub(super) fn gint_fused(g: crate::qtype::GInt, avx512: bool) -> bool {
    avx512 && reference::gint::fused_bits(g)
}

/// The fused kernel's activations from the q16 rows `q` (element order, split in place).
#[cfg(target_arch = "x86_64")]
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
    #[cfg(target_arch = "x86_64")]
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
    #[cfg(target_arch = "x86_64")]
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
    #[cfg(target_arch = "x86_64")]
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
    #[cfg(target_arch = "x86_64")]
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

    /// `y[j]` = weight row `n` with activation row `ms.start + j`, for the rows `ms`.
    /// Rows go to the kernels in groups of `ROWS`, then one at a time; each output's arithmetic
    /// is the same in either case.
    pub(super) fn dots(&self, n: usize, ms: std::ops::Range<usize>, y: &mut [f32]) {
        let wrow = &self.w.data[n * self.row_bytes..(n + 1) * self.row_bytes];
        let mut j = 0;
        while j < y.len() {
            let m0 = ms.start + j;
            let left = if self.simd { y.len() - j } else { 1 };
            let step = match left {
                1 => {
                    y[j] = self.dot_rows(n, wrow, [m0])[0];
                    1
                }
                2 => self.dot_into::<2>(n, wrow, m0, &mut y[j..]),
                3 => self.dot_into::<3>(n, wrow, m0, &mut y[j..]),
                _ => self.dot_into::<ROWS>(n, wrow, m0, &mut y[j..]),
            };
            j += step;
        }
    }

    /// Grouped integers: weight row `n` decoded to int8 `q - z` and its group scales
    /// (`formats::gint::decode_row_i8`, into buffers kept per thread), then the int8 q16 kernels
    /// (`dot_q16`) with the activation rows `ms`, up to `ROWS` at a time.
    pub(super) fn dots_gint(&self, n: usize, ms: std::ops::Range<usize>, y: &mut [f32]) {
        use crate::formats::gint;
        use std::cell::RefCell;
        thread_local! {
            static ROW: RefCell<(Vec<u8>, Vec<f32>)> = const { RefCell::new((Vec::new(), Vec::new())) };
        }
        let g = self
            .w
            .qtype
            .gint()
            .expect("dots_gint is called for grouped integers");
        let k = self.k;
        let Acts::Q16 { q, d, row, blocks } = &self.acts else {
            unreachable!("grouped integers have q16 activations")
        };
        let q: &[i16] = bytemuck::cast_slice(q);
        ROW.with_borrow_mut(|(w8, scales)| {
            w8.resize(k, 0);
            scales.resize(k / self.block_len, 0.0);
            let wrow = &self.w.data[n * self.row_bytes..(n + 1) * self.row_bytes];
            gint::decode_row_i8(g, wrow, self.stats_of(n), k, w8, scales);
            let xq = |mi: usize| &q[mi * row..(mi + 1) * row];
            let xd = |mi: usize| &d[mi * blocks..(mi + 1) * blocks];
            let mut j = 0;
            while j < y.len() {
                let m0 = ms.start + j;
                let left = if self.simd { y.len() - j } else { 1 };
                if left >= ROWS {
                    let r: [usize; ROWS] = std::array::from_fn(|i| m0 + i);
                    let out = self.dot_q16(w8, scales, r.map(xq), r.map(xd));
                    y[j..j + ROWS].copy_from_slice(&out);
                    j += ROWS;
                } else {
                    y[j] = self.dot_q16(w8, scales, [xq(m0)], [xd(m0)])[0];
                    j += 1;
                }
            }
        });
        self.add_float_zero(n, ms, y);
    }

    /// R rows from activation row `m0` into `y[..R]`; returns R.
    pub(super) fn dot_into<const R: usize>(
        &self,
        n: usize,
        wrow: &[u8],
        m0: usize,
        y: &mut [f32],
    ) -> usize {
        let rows: [usize; R] = std::array::from_fn(|i| m0 + i);
        y[..R].copy_from_slice(&self.dot_rows(n, wrow, rows));
        R
    }

    pub(super) fn dot_rows<const R: usize>(
        &self,
        n: usize,
        wrow: &[u8],
        rows: [usize; R],
    ) -> [f32; R] {
        let k = self.k;
        match &self.acts {
            Acts::Q8_0 {
                blocks, d, sums, ..
            } => {
                let nb = k / QK8_0;
                let x = rows.map(|mi| &blocks[mi * nb..(mi + 1) * nb]);
                let xd = rows.map(|mi| &d[mi * nb..(mi + 1) * nb]);
                let xs = rows.map(|mi| &sums[mi * nb..(mi + 1) * nb]);
                match self.w.qtype {
                    QType::Q4_0 => self.dot32::<BlockQ4_0, R>(wrow, x, xd, xs),
                    QType::Q8_0 => self.dot32::<BlockQ8_0, R>(wrow, x, xd, xs),
                    QType::Q5_0 => self.dot32::<BlockQ5_0, R>(wrow, x, xd, xs),
                    _ => self.dot32::<BlockIQ4NL, R>(wrow, x, xd, xs),
                }
            }
            Acts::Q8_1 {
                blocks, d, sums, s, ..
            } => {
                let nb = k / QK8_0;
                let x = rows.map(|mi| &blocks[mi * nb..(mi + 1) * nb]);
                let xd = rows.map(|mi| &d[mi * nb..(mi + 1) * nb]);
                let xsum = rows.map(|mi| &sums[mi * nb..(mi + 1) * nb]);
                let xs = rows.map(|mi| &s[mi * nb..(mi + 1) * nb]);
                match self.w.qtype {
                    QType::Q4_1 => self.dot32_min::<BlockQ4_1, R>(wrow, x, xd, xsum, xs),
                    _ => self.dot32_min::<BlockQ5_1, R>(wrow, x, xd, xsum, xs),
                }
            }
            Acts::Q8K { blocks, xz, .. } => {
                let nb = k / QK_K;
                let x = rows.map(|mi| &blocks[mi * nb..(mi + 1) * nb]);
                let xz: &[u8] = bytemuck::cast_slice(xz);
                let zr = xz.len() / self.m.max(1);
                let xz = rows.map(|mi| xz.get(mi * zr..(mi + 1) * zr).unwrap_or_default());
                match self.w.qtype {
                    QType::Q2K => self.dot_k::<BlockQ2K, R>(wrow, x, xz),
                    QType::Q3K => self.dot_k::<BlockQ3K, R>(wrow, x, xz),
                    QType::Q4K => self.dot_k::<BlockQ4K, R>(wrow, x, xz),
                    QType::Q5K => self.dot_k::<BlockQ5K, R>(wrow, x, xz),
                    QType::Q6K => self.dot_k::<BlockQ6K, R>(wrow, x, xz),
                    QType::TQ1_0 => self.dot_k::<BlockTQ1_0, R>(wrow, x, xz),
                    QType::TQ2_0 => self.dot_k::<BlockTQ2_0, R>(wrow, x, xz),
                    _ => self.dot_k::<BlockIQ4XS, R>(wrow, x, xz),
                }
            }
            Acts::Q16 { q, d, row, blocks } => {
                let q: &[i16] = bytemuck::cast_slice(q);
                let xq = rows.map(|mi| &q[mi * row..(mi + 1) * row]);
                let xd = rows.map(|mi| &d[mi * blocks..(mi + 1) * blocks]);
                self.dot_q16(wrow, self.stats_of(n), xq, xd)
            }
            Acts::F32(_) | Acts::F32Prepared(_) => {
                let xs: &[f32] = match &self.acts {
                    Acts::F32(xs) => xs,
                    Acts::F32Prepared(xs) => xs,
                    _ => unreachable!(),
                };
                let x = rows.map(|mi| &xs[mi * k..(mi + 1) * k]);
                self.dot_f32(wrow, self.stats_of(n), x)
            }
        }
    }

    #[cfg(target_arch = "x86_64")]
    pub(super) fn dot32<W: x86::Load32, const R: usize>(
        &self,
        wrow: &[u8],
        x: [&[BlockQ8_0]; R],
        xd: [&[f32]; R],
        xs: [&[i32]; R],
    ) -> [f32; R] {
        let w: &[W] = bytemuck::cast_slice(wrow);
        if self.simd && self.vnni {
            // SAFETY: vnni is set only when AVX2, F16C and AVX-512 VNNI/VL were detected; x,
            // xd and xs have one entry per weight block (all built from the same K).
            unsafe { x86::dot_block32_vnni(w, x, xd, xs, self.long) }
        } else if self.simd {
            // SAFETY: simd is set only when AVX2 and F16C were detected; x and xd have one
            // entry per weight block (both built from the same K).
            unsafe { x86::dot_block32(w, x, xd) }
        } else {
            std::array::from_fn(|r| reference::dot_block32(w, x[r], xd[r]))
        }
    }

    /// Weight rows `n..n + y.len()` (`ROW32` or 1 of them) with the one activation row
    /// through `x86::row32` (M = 1; the kernel may read the rows after them).
    #[cfg(target_arch = "x86_64")]
    pub(super) fn rows32(&self, n: usize, y: &mut [f32]) {
        use x86::row32::RowQ8;
        match &self.acts {
            Acts::Q8_0 { d, xt, nbias, .. } => {
                let x = RowQ8 {
                    xt,
                    d,
                    nbias,
                    s: &[],
                };
                match self.w.qtype {
                    QType::Q4_0 => self.rows32_w::<BlockQ4_0>(n, &x, y),
                    QType::Q8_0 => self.rows32_w::<BlockQ8_0>(n, &x, y),
                    QType::Q5_0 => self.rows32_w::<BlockQ5_0>(n, &x, y),
                    _ => self.rows32_w::<BlockIQ4NL>(n, &x, y),
                }
            }
            Acts::Q8_1 {
                d, xt, nbias, s, ..
            } => {
                let x = RowQ8 { xt, d, nbias, s };
                match self.w.qtype {
                    QType::Q4_1 => self.rows32_w::<BlockQ4_1>(n, &x, y),
                    _ => self.rows32_w::<BlockQ5_1>(n, &x, y),
                }
            }
            _ => unreachable!("row32 runs only with q8_0 / q8_1 activations"),
        }
    }

    #[cfg(target_arch = "x86_64")]
    pub(super) fn rows32_w<W: x86::row32::Row32>(
        &self,
        n: usize,
        x: &x86::row32::RowQ8<'_>,
        y: &mut [f32],
    ) {
        use x86::row32::dot_rows32;
        let rest = &self.w.data[n * self.row_bytes..];
        let (nb, rb) = (self.k / QK8_0, self.row_bytes);
        // SAFETY: row32 is set only when `crate::cpu::has_vbmi_gfni()`; the activations were
        // prepared by `interleave::<W>` for the same K (one block per weight block); `rest`
        // holds the y.len() rows (the caller's part of the N rows) and any after them.
        unsafe {
            match (y.len() == ROW32, self.long) {
                (true, true) => y.copy_from_slice(&dot_rows32::<W, true, ROW32>(rest, rb, nb, x)),
                (true, false) => y.copy_from_slice(&dot_rows32::<W, false, ROW32>(rest, rb, nb, x)),
                (false, true) => y.copy_from_slice(&dot_rows32::<W, true, 1>(rest, rb, nb, x)),
                (false, false) => y.copy_from_slice(&dot_rows32::<W, false, 1>(rest, rb, nb, x)),
            }
        }
    }

    #[cfg(not(target_arch = "x86_64"))]
    pub(super) fn dot32<W: reference::Block32, const R: usize>(
        &self,
        wrow: &[u8],
        x: [&[BlockQ8_0]; R],
        xd: [&[f32]; R],
        _xs: [&[i32]; R],
    ) -> [f32; R] {
        let w: &[W] = bytemuck::cast_slice(wrow);
        #[cfg(target_arch = "aarch64")]
        if self.simd {
            return neon::dot_block32(w, x, xd);
        }
        std::array::from_fn(|r| reference::dot_block32(w, x[r], xd[r]))
    }

    #[cfg(target_arch = "x86_64")]
    pub(super) fn dot32_min<W: x86::Load32, const R: usize>(
        &self,
        wrow: &[u8],
        x: [&[BlockQ8_0]; R],
        xd: [&[f32]; R],
        xsum: [&[i32]; R],
        xs: [&[f32]; R],
    ) -> [f32; R] {
        let w: &[W] = bytemuck::cast_slice(wrow);
        if self.simd && self.vnni {
            // SAFETY: vnni is set only when AVX2, F16C and AVX-512 VNNI/VL were detected; x,
            // xd, xsum and xs have one entry per weight block (all built from the same K).
            unsafe { x86::dot_block32_min_vnni(w, x, xd, xsum, xs, self.long) }
        } else if self.simd {
            // SAFETY: simd is set only when AVX2 and F16C were detected; x, xd and xs have one
            // entry per weight block.
            unsafe { x86::dot_block32_min(w, x, xd, xs) }
        } else {
            std::array::from_fn(|r| reference::dot_block32_min(w, x[r], xd[r], xs[r]))
        }
    }

    #[cfg(not(target_arch = "x86_64"))]
    pub(super) fn dot32_min<W: reference::Block32, const R: usize>(
        &self,
        wrow: &[u8],
        x: [&[BlockQ8_0]; R],
        xd: [&[f32]; R],
        _xsum: [&[i32]; R],
        xs: [&[f32]; R],
    ) -> [f32; R] {
        let w: &[W] = bytemuck::cast_slice(wrow);
        #[cfg(target_arch = "aarch64")]
        if self.simd {
            return neon::dot_block32_min(w, x, xd, xs);
        }
        std::array::from_fn(|r| reference::dot_block32_min(w, x[r], xd[r], xs[r]))
    }

    #[cfg(target_arch = "x86_64")]
    pub(super) fn dot_k<W: x86::SumsK, const R: usize>(
        &self,
        wrow: &[u8],
        x: [&[BlockQ8K]; R],
        xz: [&[u8]; R],
    ) -> [f32; R] {
        let w: &[W] = bytemuck::cast_slice(wrow);
        if self.simd {
            // SAFETY: AVX2 detected; x has one block per weight block.
            if let Some(y) = unsafe { W::dot_row_z(w, x, xz, self.long) } {
                return y;
            }
            // SAFETY: as above.
            unsafe {
                if self.long {
                    x86::dot_block_k_prefetch(w, x)
                } else {
                    x86::dot_block_k(w, x)
                }
            }
        } else {
            std::array::from_fn(|r| reference::dot_block_k(w, x[r]))
        }
    }

    #[cfg(not(target_arch = "x86_64"))]
    pub(super) fn dot_k<W: reference::BlockK, const R: usize>(
        &self,
        wrow: &[u8],
        x: [&[BlockQ8K]; R],
        _xz: [&[u8]; R],
    ) -> [f32; R] {
        let w: &[W] = bytemuck::cast_slice(wrow);
        #[cfg(target_arch = "aarch64")]
        if self.simd {
            return neon::dot_block_k(w, x);
        }
        std::array::from_fn(|r| reference::dot_block_k(w, x[r]))
    }

    /// nf4 / int8 against q16 activations (`reference::q16`).
    pub(super) fn dot_q16<const R: usize>(
        &self,
        wrow: &[u8],
        stats: &[f32],
        xq: [&[i16]; R],
        xd: [&[f32]; R],
    ) -> [f32; R] {
        let bl = self.block_len;
        let nf4 = self.w.qtype == QType::NF4;
        #[cfg(target_arch = "x86_64")]
        if self.avx512 {
            // SAFETY: avx512 is set for nf4 / int8 only with `crate::cpu::has_vnni_q16()`; lengths
            // checked by `plan` (K/2 or K bytes, one stat per block, blocks the row or 2^n >= 32
            // dividing K) and the activations quantized for this K (split for nf4).
            return unsafe { x86::q16::dot_q16_avx512(nf4, wrow, stats, bl, xq, xd) };
        }
        #[cfg(target_arch = "x86_64")]
        if self.simd && crate::cpu::has_fma() {
            // SAFETY: AVX2, F16C and FMA detected; lengths checked by `plan` and the kernels.
            return unsafe {
                if nf4 {
                    x86::dot_nf4_q16_avx2(wrow, stats, bl, xq, xd)
                } else {
                    x86::dot_int8_q16_avx2(wrow, stats, bl, xq, xd)
                }
            };
        }
        #[cfg(target_arch = "aarch64")]
        if self.simd {
            if let Some(y) = neon::dot_q16(self.w.qtype, wrow, stats, bl, xq, xd) {
                return y;
            }
        }
        std::array::from_fn(|r| {
            if nf4 {
                reference::q16::dot_nf4_q16(wrow, stats, bl, xq[r], xd[r])
            } else {
                reference::q16::dot_int8_q16(wrow, stats, bl, xq[r], xd[r])
            }
        })
    }

    pub(super) fn dot_f32<const R: usize>(
        &self,
        wrow: &[u8],
        stats: &[f32],
        x: [&[f32]; R],
    ) -> [f32; R] {
        let qtype = self.w.qtype;
        let bl = self.block_len;
        #[cfg(target_arch = "x86_64")]
        if self.avx512 {
            // SAFETY: avx512 is set only when `cpu::has_avx512` holds, K >= 64 for the one-byte
            // formats, and x is prepared as each kernel reads it (`plan`); lengths checked by
            // `plan` (K/2 or K bytes, one stat per block, blocks the row or 2^n >= 32).
            return unsafe {
                match qtype {
                    QType::Fp8E4M3 if self.e4m3_f32 => {
                        x86::dot_bytes_avx512::<x86::Fp8E4M3F32, R>(wrow, stats, bl, x)
                    }
                    QType::Fp8E4M3 => x86::dot_bytes_avx512::<x86::Fp8E4M3, R>(wrow, stats, bl, x),
                    _ => x86::dot_bytes_avx512::<x86::Fp8E5M2, R>(wrow, stats, bl, x),
                }
            };
        }
        #[cfg(target_arch = "x86_64")]
        if self.simd && crate::cpu::has_fma() {
            // SAFETY: AVX2, F16C and FMA detected; lengths checked by `plan` (K/2 or K bytes,
            // one stat per block, nf4 blocks a multiple of 32).
            return unsafe {
                match qtype {
                    QType::Fp8E4M3 => x86::dot_fp8::<x86::Fp8E4M3, R>(wrow, stats, bl, x),
                    _ => x86::dot_fp8::<x86::Fp8E5M2, R>(wrow, stats, bl, x),
                }
            };
        }
        std::array::from_fn(|r| reference::dot_fp8(wrow, stats, bl, x[r], qtype == QType::Fp8E5M2))
    }
}
