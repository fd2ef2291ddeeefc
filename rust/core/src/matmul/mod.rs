//! Quantized CPU matmul: `y = x · Wᵀ` with `W` (N x K, quantized, one row per output feature, in
//! ferroquant's layouts) and `x` (M x K, f32), `y` (M x N, f32).
//!
//! Each output element is one dot product computed by one fixed sequence (`reference.rs`
//! defines it; `x86.rs` computes the same bits with AVX2, plus AVX-512 VNNI integer sums for the
//! 32-weight formats and AVX-512 kernels for nf4 / int8 / fp8 where the CPU has them), so
//! results do not depend on the thread count, on M, on where an output sits in a tile, or on
//! the instruction set. Work is split over output features N through the one pool of `parallel.rs`: each task
//! owns whole weight rows and reads them from memory once. For M >= 2 a task's weights stay in
//! L2 while blocks of activation rows (sized for L2) pass; with VNNI the 32-weight formats and
//! the K-quants run tiles of 8 weight rows x a block of rows (`x86/tile.rs`, `x86/tile_k.rs`,
//! driven from `panels.rs`), the others the row kernels (up to 4 activation rows per decoded
//! weight row). Calls under `SERIAL_WORK` multiply-adds run on the calling thread.
//! FERROQUANT_FORCE_SCALAR=1 runs the references. On aarch64 `neon.rs` computes the same bits
//! with NEON (`sdot` where the CPU has `dotprod`); other architectures run the references.
//!
//! Supported weight formats and the activation each uses:
//! q4_0, q5_0, q8_0, iq4_nl → activations quantized to q8_0 (ggml's `vec_dot_type`);
//! q4_1, q5_1 → activations quantized to q8_1 (q8_0 plus `s = d·Σq`, for the `m·Σx` term);
//! q2_k, q3_k, q4_k, q5_k, q6_k, iq4_xs → activations quantized to q8_K;
//! nf4, int8, fp8_e4m3, fp8_e5m2 → f32 activations (the one-byte formats: the dequantized
//! product within float rounding, fp8 decoded exactly; no activation error added to the
//! weights').

pub mod bandwidth;
#[cfg(target_arch = "x86_64")]
mod panels;
pub mod reference;
#[cfg(target_arch = "x86_64")]
pub mod x86;

#[cfg(target_arch = "aarch64")]
pub mod neon;

use rayon::prelude::*;

use crate::error::{Error, Result};
use crate::formats::blocks::*;
use crate::parallel;
use crate::qtype::QType;
use crate::quantize::{validate_view, QuantizedView, ScaleMode};
use reference::BlockQ8K;

/// The weight qtypes `qmatmul` accepts.
pub const SUPPORTED: [QType; 16] = [
    QType::Q4_0,
    QType::Q4_1,
    QType::Q5_0,
    QType::Q5_1,
    QType::Q8_0,
    QType::IQ4NL,
    QType::Q2K,
    QType::Q3K,
    QType::Q4K,
    QType::Q5K,
    QType::Q6K,
    QType::IQ4XS,
    QType::NF4,
    QType::Int8,
    QType::Fp8E4M3,
    QType::Fp8E5M2,
];

/// The activations, prepared once per call (one row of x per `m`).
enum Acts<'a> {
    Q8_0 {
        blocks: Vec<BlockQ8_0>,
        /// Each block's scale as f32, and the sum of its 32 quants.
        d: Vec<f32>,
        sums: Vec<i32>,
        /// The quants interleaved for the tile kernels (`x86::tile::interleave_q8_0`), one row
        /// after the other, or for the M = 1 row kernel (`x86::row32::interleave`); empty when
        /// neither runs.
        #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
        xt: Vec<u8>,
        /// `-BIAS · sums` for the row kernel (`x86::row32::RowQ8::nbias`); empty otherwise.
        #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
        nbias: Vec<i32>,
    },
    Q8K {
        blocks: Vec<BlockQ8K>,
        /// Interleaved for the tile kernels (`x86::tile_k::interleave_q8_k`); empty otherwise.
        #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
        xq: Vec<u8>,
        #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
        xs: Vec<i32>,
        #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
        xd: Vec<f32>,
        /// The q4_k / q5_k / q6_k row kernels with AVX-512: the blocks as
        /// `x86::interleave_k4` lays them out (`x86::XZ_BLOCK` bytes a block, one row after the
        /// other, on 64-byte boundaries); empty otherwise.
        xz: Vec<Line64>,
    },
    /// q8_1 (for q4_1 / q5_1): q8_0's fields plus each block's `s` as f32.
    Q8_1 {
        blocks: Vec<BlockQ8_0>,
        d: Vec<f32>,
        sums: Vec<i32>,
        s: Vec<f32>,
    },
    F32(&'a [f32]),
    /// x as the AVX-512 kernels read it, 64-byte aligned (`x86::permute_nf4_x`,
    /// `x86::scale_e4m3_x`, `x86::align_x`).
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    F32Prepared(AlignedX),
}

/// Activations copied to a 64-byte aligned buffer (for the AVX-512 kernels: a 64-byte load
/// that crosses a cache line costs Zen 4 about 1.6 load slots, which alone made the nf4 kernel
/// 1.5x slower).
pub struct AlignedX {
    buf: Vec<f32>,
    off: usize,
    len: usize,
}

impl AlignedX {
    /// `f(i)` for i in 0..len, 64-byte aligned.
    pub fn from_fn(len: usize, f: impl Fn(usize) -> f32) -> Self {
        let mut buf = vec![0.0f32; len + 16];
        let off = buf.as_ptr().align_offset(64).min(16);
        for (i, v) in buf[off..off + len].iter_mut().enumerate() {
            *v = f(i);
        }
        Self { buf, off, len }
    }
}

impl std::ops::Deref for AlignedX {
    type Target = [f32];
    fn deref(&self) -> &[f32] {
        &self.buf[self.off..self.off + self.len]
    }
}

/// 64 bytes on a 64-byte boundary (activations that AVX-512 kernels load a line at a time).
#[repr(C, align(64))]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct Line64([u8; 64]);

/// Everything one dot product needs, checked once.
struct Plan<'a> {
    w: &'a QuantizedView<'a>,
    m: usize,
    k: usize,
    /// Activation rows per cache block.
    m_block: usize,
    /// The tiled kernels (`x86::tile`) run: 32-weight formats, VNNI, M >= 2.
    tile: bool,
    /// The M = 1 row kernel `x86::row32` runs (q4_0, q5_0, q8_0, iq4_nl with AVX-512 VBMI).
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    row32: bool,
    row_bytes: usize,
    acts: Acts<'a>,
    /// nf4 / int8: statistics per weight row, and the weights sharing one of them.
    stats_per_row: usize,
    block_len: usize,
    simd: bool,
    /// nf4 / int8 / fp8: the AVX-512 kernels run (`x86::has_avx512`; x prepared for them).
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    avx512: bool,
    /// AVX-512 VNNI for the 32-weight integer formats.
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    vnni: bool,
    /// M = 1 and K above `LONG_K`: the row kernels prefetch the weights ahead in software.
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    long: bool,
}

fn use_simd() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        crate::formats::simd::has_avx2()
    }
    #[cfg(target_arch = "aarch64")]
    {
        neon::enabled()
    }
    #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
    {
        false
    }
}

fn use_vnni() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        x86::has_vnni()
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// The AVX-512 kernel of an f32-activation format runs for these activations (K >= 64 for the
/// one-byte formats, every `256 x` finite for e4m3: `x86::e4m3_x_fits`).
fn use_avx512(qtype: QType, simd: bool, k: usize, x: &[f32]) -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        simd && x86::has_avx512()
            && match qtype {
                QType::NF4 => true,
                QType::Int8 | QType::Fp8E5M2 => k >= reference::WIDE,
                QType::Fp8E4M3 => k >= reference::WIDE && x86::e4m3_x_fits(x),
                _ => false,
            }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (qtype, simd, k, x);
        false
    }
}

/// Activation rows handled together by the row kernels (weights decoded once for all of them).
const ROWS: usize = 4;
/// Weight rows and K positions per piece of the f32-activation formats at M >= 2 with AVX-512
/// (`Plan::f32_pieces`): 1024 positions of 4 activation rows are 16 KiB of L1.
#[cfg(target_arch = "x86_64")]
const F32_PANEL: usize = 4;
#[cfg(target_arch = "x86_64")]
const F32_PIECE: usize = 1024;
/// Weight rows per call of the M = 1 kernel `x86::row32` for rows of at most `ROW32_MAX_K`
/// columns (per-row costs shared; at K = 576 a row is only 2.25 groups: 576x576 q8_0 went
/// from 42 to 20 us per call). Longer rows go one at a time: four interleaved weight streams
/// per thread read from memory more slowly (4096x14336, 2 threads, best of 5 on a busy
/// machine: q4_0 1.64 ms one at a time, 3.19 ms four at a time).
#[cfg(target_arch = "x86_64")]
const ROW32: usize = 4;
#[cfg(target_arch = "x86_64")]
const ROW32_MAX_K: usize = 2048;
/// Weight rows of one tile panel (`x86::tile`).
#[cfg(target_arch = "x86_64")]
const NR: usize = 8;
/// At M = 1, rows longer than this many columns get a software prefetch of the weights
/// (`x86::prefetch_ahead`): from K = 8192 (fast without) to K = 14336 (half the rate without).
const LONG_K: usize = 8192;
/// Bytes of activations one block of rows may take (kept in the 1 MiB L2 beside the weights).
const ACT_BLOCK_BYTES: usize = 384 << 10;
/// Weight bytes of one task in the tiled path (re-read from L2 for every block of rows).
const TASK_WEIGHT_BYTES: usize = 256 << 10;
/// Below this many multiply-adds (M·N·K) a call runs on the calling thread: handing work to the
/// pool costs more than it saves. SmolLM2's matrices (576x576 is 0.33 M per token) stay
/// parallel: at 1 << 21 the native runtime's two-thread decode fell from 94 to 67 tokens/s.
const SERIAL_WORK: usize = if cfg!(test) { 1 << 12 } else { 1 << 16 };

impl Plan<'_> {
    /// The rows of the N x M result (`yt`, M values per weight row) from weight row `n0` on.
    /// Activation rows go in blocks of `m_block` (kept in cache while the task's weight rows
    /// pass), weight rows in panels of `NR` (tile path) or one by one; each output's
    /// arithmetic is the same wherever it sits.
    fn fill(&self, n0: usize, yt: &mut [f32]) {
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
                while i < rows {
                    self.panel::<1>(n0 + i, ms.clone(), &mut yt[i * m..(i + 1) * m]);
                    i += 1;
                }
            }
            #[cfg(target_arch = "x86_64")]
            if self.avx512 && self.f32_in_pieces() {
                self.f32_pieces(n0, ms.clone(), yt);
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

    /// Whether the f32-activation kernels run in K pieces over panels (`f32_pieces`): nf4 at
    /// M >= 2, and nf4 / int8 at M = 1 for rows longer than `LONG_K`, whose f32 activations
    /// (4 bytes a weight) no longer fit L1 next to the weights (4096 x 14336, 2 threads, quiet
    /// machine, 2026-11-27: int8 18.5 -> 21.6 GB/s, nf4 15.6 -> 17.4, alternating runs).
    #[cfg(target_arch = "x86_64")]
    fn f32_in_pieces(&self) -> bool {
        let qt = self.w.qtype;
        (self.m >= 2 && qt == QType::NF4)
            || (self.m == 1 && self.k > LONG_K && matches!(qt, QType::NF4 | QType::Int8))
    }

    /// nf4 with AVX-512 at M >= 2: panels of `F32_PANEL` weight rows, activation rows `ms` in
    /// groups of `ROWS`, K in pieces of `F32_PIECE` positions, so a piece of the activations
    /// (16 KiB for 4 rows) stays in L1 while the panel's rows pass (whole rows per call re-read
    /// the activations from L2 for every weight row). Each output's operations and order are
    /// those of one call over the whole row (identical bits, tested). Measured against whole
    /// rows (K = 4096, 256 weight rows, 1 thread, alternating in one process, busy machine):
    /// nf4 x1.45 at M = 8, x1.23 at M = 64; int8 x1.57 / x0.93 and e4m3 x0.82 / x0.68, so the
    /// one-byte formats (whose pieces carry a block sum as well) keep the row kernels.
    #[cfg(target_arch = "x86_64")]
    fn f32_pieces(&self, n0: usize, ms: std::ops::Range<usize>, yt: &mut [f32]) {
        let m = self.m;
        let rows = yt.len() / m;
        let mut p0 = 0;
        while p0 < rows {
            let np = F32_PANEL.min(rows - p0);
            let mut j = ms.start;
            while j < ms.end {
                let y = &mut yt[p0 * m..];
                j += match (ms.end - j).min(ROWS) {
                    1 => self.f32_panel::<1>(n0 + p0, np, j, y),
                    2 => self.f32_panel::<2>(n0 + p0, np, j, y),
                    3 => self.f32_panel::<3>(n0 + p0, np, j, y),
                    _ => self.f32_panel::<ROWS>(n0 + p0, np, j, y),
                };
            }
            p0 += np;
        }
    }

    /// Weight rows `n..n + np` with activation rows `m0..m0 + R` into `yt` (row `n` first, M
    /// values per row); returns R.
    #[cfg(target_arch = "x86_64")]
    fn f32_panel<const R: usize>(&self, n: usize, np: usize, m0: usize, yt: &mut [f32]) -> usize {
        let (k, m, qt) = (self.k, self.m, self.w.qtype);
        let xs: &[f32] = match &self.acts {
            Acts::F32Prepared(xs) => xs,
            Acts::F32(xs) => xs,
            _ => unreachable!("f32 formats have f32 activations"),
        };
        let x: [&[f32]; R] = std::array::from_fn(|i| &xs[(m0 + i) * k..(m0 + i + 1) * k]);
        let wrow = |p: usize| &self.w.data[(n + p) * self.row_bytes..(n + p + 1) * self.row_bytes];
        let mut lanes = [x86::Lanes::<R>::new(); F32_PANEL];
        let mut c0 = 0;
        while c0 < k {
            let c1 = (c0 + F32_PIECE).min(k);
            for (p, l) in lanes[..np].iter_mut().enumerate() {
                // SAFETY: avx512 is set only with `x86::has_avx512`, K >= 64 for the one-byte
                // formats and x prepared for the kernels (`plan`); lengths checked by `plan`;
                // pieces start at multiples of 64 and end at one or at K.
                unsafe {
                    x86::f32_range(
                        qt,
                        wrow(p),
                        self.stats_of(n + p),
                        self.block_len,
                        x,
                        c0,
                        c1,
                        l,
                    )
                };
            }
            c0 = c1;
        }
        for (p, l) in lanes[..np].iter().enumerate() {
            // SAFETY: as above.
            let y = unsafe { x86::f32_finish(qt, wrow(p), l) };
            yt[p * m + m0..p * m + m0 + R].copy_from_slice(&y);
        }
        R
    }

    /// The statistics (absmax or scales) of weight row `n` (the one scale of a per-tensor scale).
    fn stats_of(&self, n: usize) -> &[f32] {
        let spr = self.stats_per_row;
        if self.w.stats.len() == 1 {
            self.w.stats
        } else {
            &self.w.stats[n * spr..(n + 1) * spr]
        }
    }

    /// `y[j]` = weight row `n` with activation row `ms.start + j`, for the rows `ms`.
    /// Rows go to the kernels in groups of `ROWS`, then one at a time; each output's arithmetic
    /// is the same in either case.
    fn dots(&self, n: usize, ms: std::ops::Range<usize>, y: &mut [f32]) {
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

    /// R rows from activation row `m0` into `y[..R]`; returns R.
    fn dot_into<const R: usize>(&self, n: usize, wrow: &[u8], m0: usize, y: &mut [f32]) -> usize {
        let rows: [usize; R] = std::array::from_fn(|i| m0 + i);
        y[..R].copy_from_slice(&self.dot_rows(n, wrow, rows));
        R
    }

    fn dot_rows<const R: usize>(&self, n: usize, wrow: &[u8], rows: [usize; R]) -> [f32; R] {
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
            Acts::Q8_1 { blocks, d, sums, s } => {
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
                    _ => self.dot_k::<BlockIQ4XS, R>(wrow, x, xz),
                }
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
    fn dot32<W: x86::Load32, const R: usize>(
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
    fn rows32(&self, n: usize, y: &mut [f32]) {
        let Acts::Q8_0 { d, xt, nbias, .. } = &self.acts else {
            unreachable!("row32 runs only with q8_0 activations")
        };
        let x = x86::row32::RowQ8 { xt, d, nbias };
        match self.w.qtype {
            QType::Q4_0 => self.rows32_w::<BlockQ4_0>(n, &x, y),
            QType::Q8_0 => self.rows32_w::<BlockQ8_0>(n, &x, y),
            QType::Q5_0 => self.rows32_w::<BlockQ5_0>(n, &x, y),
            _ => self.rows32_w::<BlockIQ4NL>(n, &x, y),
        }
    }

    #[cfg(target_arch = "x86_64")]
    fn rows32_w<W: x86::row32::Row32>(&self, n: usize, x: &x86::row32::RowQ8<'_>, y: &mut [f32]) {
        use x86::row32::dot_rows32;
        let rest = &self.w.data[n * self.row_bytes..];
        let (nb, rb) = (self.k / QK8_0, self.row_bytes);
        // SAFETY: row32 is set only when `x86::row32::available()`; the activations were
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
    fn dot32<W: reference::Block32, const R: usize>(
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
    fn dot32_min<W: x86::Load32, const R: usize>(
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
    fn dot32_min<W: reference::Block32, const R: usize>(
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
    fn dot_k<W: x86::SumsK, const R: usize>(
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
    fn dot_k<W: reference::BlockK, const R: usize>(
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

    fn dot_f32<const R: usize>(&self, wrow: &[u8], stats: &[f32], x: [&[f32]; R]) -> [f32; R] {
        let qtype = self.w.qtype;
        let bl = self.block_len;
        #[cfg(target_arch = "aarch64")]
        if self.simd {
            if let Some(y) = neon::dot_f32(self.w.qtype, wrow, stats, bl, x) {
                return y;
            }
        }
        #[cfg(target_arch = "x86_64")]
        if self.avx512 {
            // SAFETY: avx512 is set only when `x86::has_avx512` holds, K >= 64 for the one-byte
            // formats, and x is prepared as each kernel reads it (`plan`); lengths checked by
            // `plan` (K/2 or K bytes, one stat per block, blocks the row or 2^n >= 32).
            return unsafe {
                match qtype {
                    QType::NF4 => x86::dot_nf4_avx512(wrow, stats, bl, x),
                    QType::Fp8E4M3 => x86::dot_bytes_avx512::<x86::Fp8E4M3, R>(wrow, stats, bl, x),
                    QType::Fp8E5M2 => x86::dot_bytes_avx512::<x86::Fp8E5M2, R>(wrow, stats, bl, x),
                    _ => x86::dot_bytes_avx512::<x86::Int8, R>(wrow, stats, bl, x),
                }
            };
        }
        #[cfg(target_arch = "x86_64")]
        if self.simd && x86::has_fma() {
            // SAFETY: AVX2, F16C and FMA detected; lengths checked by `plan` (K/2 or K bytes,
            // one stat per block, nf4 blocks a multiple of 32).
            return unsafe {
                match qtype {
                    QType::NF4 => x86::dot_nf4(wrow, stats, bl, x),
                    QType::Fp8E4M3 => x86::dot_fp8::<x86::Fp8E4M3, R>(wrow, stats, bl, x),
                    QType::Fp8E5M2 => x86::dot_fp8::<x86::Fp8E5M2, R>(wrow, stats, bl, x),
                    _ => x86::dot_int8(wrow, stats, bl, x),
                }
            };
        }
        std::array::from_fn(|r| match qtype {
            QType::NF4 => reference::dot_nf4(wrow, stats, bl, x[r]),
            QType::Fp8E4M3 | QType::Fp8E5M2 => {
                reference::dot_fp8(wrow, stats, bl, x[r], qtype == QType::Fp8E5M2)
            }
            _ => reference::dot_int8(wrow, stats, bl, x[r]),
        })
    }
}

fn bad(msg: String) -> Error {
    Error::InvalidArgument(msg)
}

fn stats_err(w: &QuantizedView<'_>, got: usize, expected: usize) -> Error {
    Error::DataSize {
        what: "stats",
        qtype: w.qtype.name(),
        rows: w.rows,
        cols: w.cols,
        got,
        expected,
    }
}

fn check_bnb_block(w: &QuantizedView<'_>) -> Result<usize> {
    let b = w.block_size;
    if b.is_power_of_two() && (32..=4096).contains(&b) {
        Ok(b)
    } else {
        Err(Error::BlockSize {
            qtype: w.qtype.name(),
            got: b,
            allowed: "a power of two from 32 to 4096",
        })
    }
}

/// ggml's `quantize_row_q8_0_ref` of one activation row: the AVX2 quantizer of the q8_0
/// weights where it runs (bit-identical to the reference, tested in `formats`), else the reference.
fn quantize_acts_q8_0(x: &[f32], out: &mut [BlockQ8_0]) {
    #[cfg(target_arch = "x86_64")]
    if crate::formats::simd::legacy_avx2(QType::Q8_0) {
        // SAFETY: legacy_avx2 checked AVX2 and F16C; out holds x.len() / 32 blocks.
        unsafe {
            crate::formats::simd::quantize_row_legacy_avx2(
                QType::Q8_0,
                x,
                bytemuck::cast_slice_mut(out),
            )
        };
        return;
    }
    reference::quantize_row_q8_0(x, out);
}

/// Check everything about the request and prepare the activations.
fn plan<'a>(x: &'a [f32], m: usize, w: &'a QuantizedView<'a>, out_len: usize) -> Result<Plan<'a>> {
    let (n, k) = (w.rows, w.cols);
    if !SUPPORTED.contains(&w.qtype) {
        let names: Vec<&str> = SUPPORTED.iter().map(|q| q.name()).collect();
        return Err(bad(format!(
            "qmatmul does not support {} weights; supported: {}",
            w.qtype.name(),
            names.join(" ")
        )));
    }
    validate_view(w)?;
    let (mut stats_per_row, mut block_len) = (0, 0);
    match w.qtype {
        QType::NF4 => {
            block_len = check_bnb_block(w)?;
            if w.double_quant.is_some() {
                return Err(bad(
                    "qmatmul takes nf4 weights with a plain fp32 absmax; expand a \
                     double-quantized absmax first"
                        .into(),
                ));
            }
            stats_per_row = k / block_len;
        }
        QType::Int8 | QType::Fp8E4M3 | QType::Fp8E5M2 => match w.scale_mode {
            Some(ScaleMode::Tensor) => (stats_per_row, block_len) = (1, k),
            Some(ScaleMode::Row) => (stats_per_row, block_len) = (1, k),
            Some(ScaleMode::Block) => {
                block_len = check_bnb_block(w)?;
                stats_per_row = k / block_len;
            }
            None => return Err(bad(format!("{} weights need a scale_mode", w.qtype.name()))),
        },
        q => {
            let bs = q.info().block_size;
            if w.block_size != bs {
                return Err(bad(format!(
                    "{} has block size {bs}, got block_size={}",
                    q.name(),
                    w.block_size
                )));
            }
        }
    }
    if stats_per_row > 0 {
        let expected = if w.scale_mode == Some(ScaleMode::Tensor) {
            1
        } else {
            n * stats_per_row
        };
        if w.stats.len() != expected {
            return Err(stats_err(w, w.stats.len(), expected));
        }
    }
    let x_len = m
        .checked_mul(k)
        .ok_or_else(|| bad(format!("shape {m}x{k} overflows")))?;
    if x.len() != x_len {
        return Err(bad(format!(
            "x has {} elements but M={m} rows of K={k} need {x_len}",
            x.len()
        )));
    }
    let y_len = m
        .checked_mul(n)
        .ok_or_else(|| bad(format!("shape {m}x{n} overflows")))?;
    if out_len != y_len {
        return Err(bad(format!(
            "output has {out_len} elements but M={m} rows of N={n} need {y_len}"
        )));
    }
    if let Some(i) = x.iter().position(|v| !v.is_finite()) {
        return Err(Error::NonFinite {
            row: i / k,
            col: i % k,
            value: x[i],
        });
    }
    let simd = use_simd();
    let vnni = simd && use_vnni();
    let f32_avx512 = use_avx512(w.qtype, simd, k, x);
    // Quantizing the activations is worth the pool only for many rows.
    let par = m >= 4 && m.saturating_mul(k) >= 1 << 17;
    // The tiles from M = 2 on (at M = 1 the row kernels are faster: measured, the transposes
    // cost more than the horizontal sums they save when no second row shares them).
    let tile = cfg!(target_arch = "x86_64")
        && vnni
        && m >= 2
        && matches!(
            w.qtype,
            QType::Q4_0
                | QType::Q5_0
                | QType::Q8_0
                | QType::IQ4NL
                | QType::Q4K
                | QType::Q5K
                | QType::Q6K
        );
    // M = 1: the row kernel without horizontal sums where the CPU has AVX-512 VBMI and GFNI.
    #[cfg(target_arch = "x86_64")]
    let row32 = vnni
        && m == 1
        && x86::row32::available()
        && matches!(
            w.qtype,
            QType::Q4_0 | QType::Q5_0 | QType::Q8_0 | QType::IQ4NL
        );
    #[cfg(not(target_arch = "x86_64"))]
    let row32 = false;
    let (acts, act_row_bytes) = match w.qtype {
        QType::Q4_0 | QType::Q5_0 | QType::Q8_0 | QType::IQ4NL => {
            let nb = k / QK8_0;
            let mut blocks = vec![BlockQ8_0::zeroed(); m * nb];
            let quant = |(b, x): (&mut [BlockQ8_0], &[f32])| quantize_acts_q8_0(x, b);
            if par {
                parallel::install(|| {
                    blocks
                        .par_chunks_mut(nb)
                        .zip(x.par_chunks(k))
                        .for_each(quant)
                });
            } else {
                blocks.chunks_mut(nb).zip(x.chunks(k)).for_each(quant);
            }
            let d = blocks.iter().map(|b| f16_to_f32(b.d)).collect();
            let sums: Vec<i32> = blocks
                .iter()
                .map(|b| b.qs.iter().map(|&q| q as i32).sum())
                .collect();
            #[cfg(target_arch = "x86_64")]
            let (xt, nbias) = if tile {
                (panels::interleave_q8_0_rows(&blocks, nb), Vec::new())
            } else if row32 {
                use x86::row32::interleave;
                match w.qtype {
                    QType::Q4_0 => interleave::<BlockQ4_0>(&blocks, &sums),
                    QType::Q8_0 => interleave::<BlockQ8_0>(&blocks, &sums),
                    QType::Q5_0 => interleave::<BlockQ5_0>(&blocks, &sums),
                    _ => interleave::<BlockIQ4NL>(&blocks, &sums),
                }
            } else {
                (Vec::new(), Vec::new())
            };
            #[cfg(not(target_arch = "x86_64"))]
            let (xt, nbias) = (Vec::new(), Vec::new());
            let row_bytes = if tile { k + nb * 8 } else { nb * 42 };
            (
                Acts::Q8_0 {
                    blocks,
                    d,
                    sums,
                    xt,
                    nbias,
                },
                row_bytes,
            )
        }
        QType::Q4_1 | QType::Q5_1 => {
            let nb = k / QK8_0;
            let mut q81 = vec![reference::BlockQ8_1::zeroed(); m * nb];
            parallel::install(|| {
                q81.par_chunks_mut(nb)
                    .zip(x.par_chunks(k))
                    .for_each(|(b, x)| reference::quantize_row_q8_1(x, b))
            });
            let blocks = q81.iter().map(|b| BlockQ8_0 { d: b.d, qs: b.qs }).collect();
            let d = q81.iter().map(|b| f16_to_f32(b.d)).collect();
            let sums = q81
                .iter()
                .map(|b| b.qs.iter().map(|&q| q as i32).sum())
                .collect();
            let s = q81.iter().map(|b| f16_to_f32(b.s)).collect();
            (Acts::Q8_1 { blocks, d, sums, s }, nb * 46)
        }
        QType::Q2K | QType::Q3K | QType::Q4K | QType::Q5K | QType::Q6K | QType::IQ4XS => {
            let nb = k / QK_K;
            let mut blocks = vec![BlockQ8K::zeroed(); m * nb];
            let quant = |(b, x): (&mut [BlockQ8K], &[f32])| reference::quantize_row_q8_k(x, b);
            if par {
                parallel::install(|| {
                    blocks
                        .par_chunks_mut(nb)
                        .zip(x.par_chunks(k))
                        .for_each(quant)
                });
            } else {
                blocks.chunks_mut(nb).zip(x.chunks(k)).for_each(quant);
            }
            #[cfg(target_arch = "x86_64")]
            let (xq, xs, xd) = if tile {
                panels::interleave_q8_k_rows(&blocks, nb)
            } else {
                (Vec::new(), Vec::new(), Vec::new())
            };
            #[cfg(not(target_arch = "x86_64"))]
            let (xq, xs, xd) = (Vec::new(), Vec::new(), Vec::new());
            // The AVX-512 row kernels of q4_k / q5_k / q6_k read the activations in their own
            // layout (without it they are not used). q6_k with long rows at M = 1 keeps the
            // AVX2 kernel: from memory at K = 14336 the AVX-512 one measured slower (12.4 vs
            // 14.2 GB/s, one thread; q4_k/q5_k faster there).
            #[cfg(target_arch = "x86_64")]
            let long_q6 = w.qtype == QType::Q6K && m == 1 && k > LONG_K;
            #[cfg(target_arch = "x86_64")]
            let xz = if !tile
                && simd
                && !long_q6
                && matches!(w.qtype, QType::Q4K | QType::Q5K | QType::Q6K)
                && x86::has_row_k_vnni()
            {
                let mut v = vec![Line64([0; 64]); m * nb * x86::XZ_BLOCK / 64];
                let q6 = w.qtype == QType::Q6K;
                x86::interleave_k4(&blocks, q6, bytemuck::cast_slice_mut(&mut v));
                v
            } else {
                Vec::new()
            };
            #[cfg(not(target_arch = "x86_64"))]
            let xz = Vec::new();
            let row_bytes = if tile {
                k + k / 2 + nb * 4
            } else {
                nb * std::mem::size_of::<BlockQ8K>() + 64 * xz.len() / m.max(1)
            };
            (
                Acts::Q8K {
                    blocks,
                    xq,
                    xs,
                    xd,
                    xz,
                },
                row_bytes,
            )
        }
        #[cfg(target_arch = "x86_64")]
        QType::NF4 if f32_avx512 => (Acts::F32Prepared(x86::permute_nf4_x(x)), 4 * k),
        #[cfg(target_arch = "x86_64")]
        QType::Fp8E4M3 if f32_avx512 => (Acts::F32Prepared(x86::scale_e4m3_x(x)), 4 * k),
        #[cfg(target_arch = "x86_64")]
        QType::Int8 | QType::Fp8E5M2 if f32_avx512 => (Acts::F32Prepared(x86::align_x(x)), 4 * k),
        _ => (Acts::F32(x), 4 * k),
    };
    // Blocks of activation rows that fit ACT_BLOCK_BYTES, split evenly (M = 67 at most 34 a
    // block gives 34 + 33, not 34 + 33 + 0).
    let max_block = (ACT_BLOCK_BYTES / act_row_bytes.max(1)).clamp(ROWS, 64);
    // The row kernels take ROWS rows at a time: whole multiples of ROWS a block.
    let max_block = if tile {
        max_block
    } else {
        max_block / ROWS * ROWS
    };
    let n_blocks = m.div_ceil(max_block).max(1);
    Ok(Plan {
        w,
        m,
        k,
        m_block: if tile {
            m.div_ceil(n_blocks).max(1)
        } else {
            m.div_ceil(n_blocks).next_multiple_of(ROWS)
        },
        tile,
        row32,
        row_bytes: w.qtype.row_bytes(k, w.block_size),
        acts,
        stats_per_row,
        block_len,
        simd,
        avx512: f32_avx512,
        vnni,
        long: m == 1 && k > LONG_K,
    })
}

use bytemuck::Zeroable;

/// `out = x · Wᵀ`: `x` is M x K row-major f32 (M = `m`), `w` is N x K quantized, `out` is M x N
/// row-major. Every shape, size and value is checked; errors, never panics.
///
/// M = 0 (an empty batch) is allowed once the weights check out: nothing to compute.
pub fn qmatmul(x: &[f32], m: usize, w: &QuantizedView<'_>, out: &mut [f32]) -> Result<()> {
    let plan = plan(x, m, w, out.len())?;
    if m == 0 {
        return Ok(());
    }
    let n = w.rows;
    // Each task owns whole weight rows (rows of Wᵀ·x, N x M) and reads them from memory once.
    let threads = parallel::num_threads();
    let work = n.saturating_mul(w.cols).saturating_mul(m);
    let per_task = if m >= 2 {
        // Weights of a task stay in L2 while its blocks of activation rows pass (each block of
        // activations is then read once per task, not once per weight row).
        let by_cache = (TASK_WEIGHT_BYTES / plan.row_bytes.max(1)).max(1);
        let by_balance = n.div_ceil(threads * 4).max(1);
        by_cache.min(by_balance).next_multiple_of(NR_TASK)
    } else {
        // At least ~256 K multiply-adds a task (rayon's per-task cost is about a microsecond),
        // and at least 8 tasks a thread to balance.
        let by_size = ((1 << 18) / w.cols.saturating_mul(m).max(1)).max(1);
        let t = by_size.min(n.div_ceil(threads * 8).max(1));
        if plan.tile {
            t.next_multiple_of(NR_TASK)
        } else {
            t
        }
    };
    let fill = |yt: &mut [f32]| {
        if threads == 1 || work < SERIAL_WORK {
            plan.fill(0, yt);
            return;
        }
        parallel::install(|| {
            yt.par_chunks_mut(per_task * m)
                .enumerate()
                .for_each(|(t, chunk)| plan.fill(t * per_task, chunk))
        })
    };
    if m == 1 {
        fill(out);
    } else {
        let mut yt = vec![0.0f32; n * m];
        fill(&mut yt);
        for (r, yrow) in yt.chunks_exact(m).enumerate() {
            for (mi, &v) in yrow.iter().enumerate() {
                out[mi * n + r] = v;
            }
        }
    }
    Ok(())
}

/// Task sizes of the tiled path are whole panels.
#[cfg(target_arch = "x86_64")]
const NR_TASK: usize = NR;
#[cfg(not(target_arch = "x86_64"))]
const NR_TASK: usize = 1;

#[cfg(test)]
mod tests;
