//! `Plan`'s per-format dispatch: one weight row against one or more activation rows, to the
//! SIMD kernel the CPU has (`x86`, `neon`) or the scalar reference.

use super::reference::{self, BlockQ8K};
use super::*;
use crate::qtype::QType;

impl Plan<'_> {
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
            // SAFETY: simd is set only when AVX2 and F16C were detected; x, xd and xs have one
            // entry per weight block (all built from the same K).
            unsafe { x86::dot_block32(w, x, xd, xs) }
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

    /// Weight rows `n..n + y.len()` with the one activation row through `x86::row32_avx2`.
    #[cfg(target_arch = "x86_64")]
    pub(super) fn rows32_avx2(&self, n: usize, y: &mut [f32]) {
        use x86::row32_avx2::RowT;
        let (blocks, d, xt, nbias, s) = match &self.acts {
            Acts::Q8_0 {
                blocks,
                d,
                xt,
                nbias,
                ..
            } => (blocks, d, xt, nbias, None),
            Acts::Q8_1 {
                blocks,
                d,
                xt,
                nbias,
                s,
                ..
            } => (blocks, d, xt, nbias, Some(&s[..])),
            _ => unreachable!("row32_avx2 runs only with q8_0 / q8_1 activations"),
        };
        let x = RowT {
            blocks,
            xt,
            nbias,
            d,
            s,
        };
        for (i, yi) in y.iter_mut().enumerate() {
            let r = n + i;
            let wrow = &self.w.data[r * self.row_bytes..(r + 1) * self.row_bytes];
            *yi = match self.w.qtype {
                QType::Q4_0 => self.row32_avx2_w::<BlockQ4_0>(wrow, &x),
                QType::Q4_1 => self.row32_avx2_w::<BlockQ4_1>(wrow, &x),
                QType::Q5_0 => self.row32_avx2_w::<BlockQ5_0>(wrow, &x),
                QType::Q5_1 => self.row32_avx2_w::<BlockQ5_1>(wrow, &x),
                _ => self.row32_avx2_w::<BlockIQ4NL>(wrow, &x),
            };
        }
    }

    #[cfg(target_arch = "x86_64")]
    fn row32_avx2_w<W: x86::row32_avx2::Nib32>(
        &self,
        wrow: &[u8],
        x: &x86::row32_avx2::RowT<'_>,
    ) -> f32 {
        use x86::row32_avx2::dot_row;
        let w: &[W] = bytemuck::cast_slice(wrow);
        // SAFETY: row32_avx2 is set only where `simd` (AVX2, F16C detected); the activations
        // were prepared by `row32_avx2::interleave` for the same K (one block per weight block).
        unsafe {
            if self.long {
                dot_row::<W, true>(w, x)
            } else {
                dot_row::<W, false>(w, x)
            }
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
            // (x is read as given: `rows_fp8` takes the calls with `e4m3_f32` x)
            debug_assert!(!self.e4m3_f32);
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
