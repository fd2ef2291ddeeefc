//! q8_0 weights in panels of 8 rows, for the runtime's matmuls on x86-64 with AVX-512 VNNI.
//!
//! **Layout.** Rows go in panels of `P` = 8 (the last one padded with zero rows); a panel holds
//! its blocks in order, 272 bytes per block: 8 vectors of 32 bytes, where bytes `4i .. 4i + 4`
//! of vector t are quants `4t .. 4t + 4` of row i's block, plus 128 (`q ^ 0x80`, the unsigned
//! operand of `vpdpbusd`), then the 8 rows' f16 scales. The same 34 bytes per 32 weights as
//! q8_0. One `vpdpbusd` of vector t with the activation's quants `4t .. 4t + 4` broadcast adds
//! four products of each of the 8 rows into that row's lane: eight of them leave every row's
//! exact Σ (w + 128)·x in its own lane, with no horizontal sum and no tail code for K not a
//! multiple of 256 (SmolLM2's 576 is 18 blocks).
//!
//! **Arithmetic** (`matmul::reference::dot_block32`'s, so the products are bit for bit those of
//! `matmul::qmatmul` on the q8_0 rows): per block `isum = Σ (w + 128)·x - 128·Σx`, exact in i32;
//! `p = (d_w · d_x) · f32(isum)`; block b is added to lane `b % 8` of its row in block order;
//! the lanes are summed `((a0 + a4) + (a2 + a6)) + ((a1 + a5) + (a3 + a7))`. The vectors here run
//! over rows, so each of these operations is one vector operation for 8 rows. Several activation
//! rows (prompt) go lane by lane (blocks l, l + 8, ... of lane l in order): the same sums.
//!
//! Any weight whose blocks are q8_0 values (q8_0 itself, q5_0 repacked by `weights.rs`) can be
//! packed. Elsewhere (no VNNI, another architecture) the runtime keeps q8_0 rows for `qmatmul`;
//! the portable kernel here exists for the tests and as the definition of the layout.

use std::ops::Range;

use rayon::prelude::*;

use crate::error::{Error, Result};
use crate::formats::blocks::*;
use crate::matmul::reference;
use crate::parallel;

#[cfg(target_arch = "x86_64")]
mod x86;

/// Rows per panel.
pub const P: usize = 8;
/// Bytes of one block of a panel: P x 32 quants and P f16 scales.
pub const BLOCK_BYTES: usize = P * 34;

/// A matrix of q8_0 values in panels (`rows` x `cols`, `cols` a multiple of 32).
#[derive(Clone, Debug)]
pub struct Packed {
    pub rows: usize,
    pub cols: usize,
    pub data: Vec<u8>,
    /// The same q8_0 rows as stored in the mapped file, when the weight is used in place (not
    /// stacked or repacked): many-row matmuls may take `qmatmul`'s GEMM path on them instead.
    pub file_rows: Option<Range<usize>>,
}

/// Whether the runtime packs its q8_0 matrices: x86-64 with AVX-512 VNNI (and not
/// FERROQUANT_FORCE_SCALAR), unless FERROQUANT_RUNTIME_PACK=0.
pub fn enabled() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        crate::config::runtime_pack() && crate::cpu::has_vnni()
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

impl Packed {
    /// Pack `rows` rows of `cols / 32` q8_0 blocks each.
    pub fn from_q8_0(blocks: &[BlockQ8_0], rows: usize, cols: usize) -> Packed {
        let nb = cols / QK8_0;
        assert_eq!(blocks.len(), rows * nb, "q8_0 blocks of {rows} x {cols}");
        let panels = rows.div_ceil(P);
        let mut data = vec![0x80u8; panels * nb * BLOCK_BYTES];
        data.par_chunks_mut(nb * BLOCK_BYTES.max(1))
            .enumerate()
            .for_each(|(p, panel)| {
                for (b, out) in panel.chunks_exact_mut(BLOCK_BYTES).enumerate() {
                    for i in 0..P.min(rows - p * P) {
                        let blk = &blocks[(p * P + i) * nb + b];
                        for t in 0..8 {
                            for c in 0..4 {
                                out[32 * t + 4 * i + c] = (blk.qs[4 * t + c] as u8) ^ 0x80;
                            }
                        }
                        out[256 + 2 * i..256 + 2 * i + 2].copy_from_slice(&blk.d);
                    }
                    for i in P.min(rows - p * P)..P {
                        out[256 + 2 * i..256 + 2 * i + 2].fill(0);
                    }
                }
            });
        Packed {
            rows,
            cols,
            data,
            file_rows: None,
        }
    }

    fn blocks(&self) -> usize {
        self.cols / QK8_0
    }

    fn panel(&self, p: usize) -> &[u8] {
        let len = self.blocks() * BLOCK_BYTES;
        &self.data[p * len..(p + 1) * len]
    }

    /// Row `r` as f32, as `dequantize` of the q8_0 row gives it (`q as f32 * d`).
    pub fn row_f32(&self, r: usize, out: &mut [f32]) {
        let (p, i) = (r / P, r % P);
        for (blk, y) in self
            .panel(p)
            .chunks_exact(BLOCK_BYTES)
            .zip(out.chunks_exact_mut(QK8_0))
        {
            let d = f16_to_f32([blk[256 + 2 * i], blk[257 + 2 * i]]);
            for t in 0..8 {
                for c in 0..4 {
                    y[4 * t + c] = ((blk[32 * t + 4 * i + c] ^ 0x80) as i8) as f32 * d;
                }
            }
        }
    }
}

/// Activation rows quantized to q8_0 once, for every packed matmul that reads them.
#[derive(Default)]
pub struct ActsQ8 {
    pub m: usize,
    pub k: usize,
    blocks: Vec<BlockQ8_0>,
    /// Each block's scale as f32.
    d: Vec<f32>,
    /// 128 x the sum of each block's quants (the bias of the unsigned weights).
    bias: Vec<i32>,
}

/// `x` holds `m` finite rows of `k`, a non-zero multiple of `block` (what the activation
/// quantizers of the packed kernels need); errors as `qmatmul` does.
pub(crate) fn check_acts(x: &[f32], m: usize, k: usize, block: usize, what: &str) -> Result<()> {
    if k == 0 || !k.is_multiple_of(block) || x.len() != m * k {
        return Err(Error::InvalidArgument(format!(
            "{what}: x has {} elements for {m} rows of {k} (a multiple of {block})",
            x.len()
        )));
    }
    if let Some(i) = x.iter().position(|v| !v.is_finite()) {
        return Err(Error::NonFinite {
            row: i / k,
            col: i % k,
            value: x[i],
        });
    }
    Ok(())
}

impl ActsQ8 {
    /// Quantize the `m` rows of `x` (rows of `k`, a multiple of 32) as ggml's
    /// `quantize_row_q8_0` (what `qmatmul` does). Errors on a non-finite value, as `qmatmul`.
    pub fn quantize(&mut self, x: &[f32], m: usize, k: usize) -> Result<()> {
        check_acts(x, m, k, QK8_0, "packed matmul")?;
        let nb = k / QK8_0;
        (self.m, self.k) = (m, k);
        self.blocks.resize(m * nb, BlockQ8_0::zeroed());
        let quant =
            |(b, x): (&mut [BlockQ8_0], &[f32])| crate::formats::quantize_row_q8_0_blocks(x, b);
        if m >= 4 && m * k >= 1 << 17 {
            self.blocks
                .par_chunks_mut(nb)
                .zip(x.par_chunks(k))
                .for_each(quant);
        } else {
            self.blocks.chunks_mut(nb).zip(x.chunks(k)).for_each(quant);
        }
        self.d.clear();
        self.d.extend(self.blocks.iter().map(|b| f16_to_f32(b.d)));
        self.bias.clear();
        self.bias.extend(
            self.blocks
                .iter()
                .map(|b| 128 * b.qs.iter().map(|&q| q as i32).sum::<i32>()),
        );
        Ok(())
    }

    fn row(&self, r: usize) -> Row<'_> {
        let nb = self.k / QK8_0;
        Row {
            x: &self.blocks[r * nb..(r + 1) * nb],
            d: &self.d[r * nb..(r + 1) * nb],
            bias: &self.bias[r * nb..(r + 1) * nb],
        }
    }
}

use bytemuck::Zeroable;

/// One activation row: its blocks, their scales and biases.
#[derive(Clone, Copy)]
struct Row<'a> {
    x: &'a [BlockQ8_0],
    d: &'a [f32],
    bias: &'a [i32],
}

/// The portable panel kernel: the reference's operations on the packed bytes.
fn panel_ref(w: &[u8], x: Row<'_>) -> [f32; P] {
    let mut acc = [[0f32; reference::LANES]; P];
    for (b, blk) in w.chunks_exact(BLOCK_BYTES).enumerate().take(x.x.len()) {
        for (i, a) in acc.iter_mut().enumerate() {
            let mut isum = 0i32;
            for t in 0..8 {
                for c in 0..4 {
                    isum += blk[32 * t + 4 * i + c] as i32 * x.x[b].qs[4 * t + c] as i32;
                }
            }
            let dw = f16_to_f32([blk[256 + 2 * i], blk[257 + 2 * i]]);
            a[b % reference::LANES] += (dw * x.d[b]) * (isum - x.bias[b]) as f32;
        }
    }
    acc.map(|a| reference::hsum8(&a))
}

/// Which kernel runs the panels.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Kernel {
    Portable,
    #[cfg(target_arch = "x86_64")]
    Vnni,
}

impl Kernel {
    /// The fastest the CPU allows.
    pub fn best() -> Kernel {
        #[cfg(target_arch = "x86_64")]
        if crate::cpu::has_vnni() {
            return Kernel::Vnni;
        }
        Kernel::Portable
    }

    /// Panel `w` with R activation rows.
    fn run<const R: usize>(self, w: &[u8], x: [Row<'_>; R]) -> [[f32; P]; R] {
        match self {
            Kernel::Portable => x.map(|x| panel_ref(w, x)),
            #[cfg(target_arch = "x86_64")]
            // SAFETY: Vnni is chosen only when AVX2, F16C and AVX-512F/VL/VNNI were detected
            // (`cpu::has_vnni`); w holds x[r].x.len() blocks of BLOCK_BYTES, every row of x as many
            // blocks, scales and biases (checked by `matmul_with`).
            Kernel::Vnni => unsafe {
                if R == 1 {
                    let y = x86::panel1(w, x[0].x, x[0].d, x[0].bias);
                    std::array::from_fn(|_| y)
                } else {
                    x86::panel_rows(w, x.map(|r| r.x), x.map(|r| r.d), x.map(|r| r.bias))
                }
            },
        }
    }
}

/// Multiply-adds per task (rayon's per-task cost is about a microsecond).
const TASK_WORK: usize = 1 << 18;
/// Activation rows per kernel call in a batch.
const ROWS: usize = 4;

/// `out = x · Wᵀ` (M x N, row-major) for activations quantized in `a`.
pub fn matmul(w: &Packed, a: &ActsQ8, out: &mut [f32]) -> Result<()> {
    matmul_with(Kernel::best(), w, a, out)
}

/// `matmul` with a chosen kernel (the tests run both).
pub fn matmul_with(kern: Kernel, w: &Packed, a: &ActsQ8, out: &mut [f32]) -> Result<()> {
    let (m, n, k) = (a.m, w.rows, w.cols);
    if a.k != k || out.len() != m * n || w.data.len() != n.div_ceil(P) * (k / QK8_0) * BLOCK_BYTES {
        return Err(Error::InvalidArgument(format!(
            "packed matmul shapes: acts {m}x{}, weights {n}x{k}, out {}",
            a.k,
            out.len()
        )));
    }
    if m == 0 || n == 0 {
        return Ok(());
    }
    let panels = n.div_ceil(P);
    let threads = parallel::num_threads();
    let work = m * n * k;
    let tasks = if threads == 1 {
        1
    } else {
        work.div_ceil(TASK_WORK)
            .next_multiple_of(threads)
            .min(panels)
    };
    let per_task = panels.div_ceil(tasks);
    if m == 1 {
        let run = |(t, y): (usize, &mut [f32])| {
            for (j, yp) in y.chunks_mut(P).enumerate() {
                let [v] = kern.run(w.panel(t * per_task + j), [a.row(0)]);
                yp.copy_from_slice(&v[..yp.len()]);
            }
        };
        if tasks == 1 {
            run((0, out));
        } else {
            parallel::install(|| out.par_chunks_mut(per_task * P).enumerate().for_each(run));
        }
        return Ok(());
    }
    // M >= 2: a task owns panels (whole columns of out) and runs every activation row past each
    // panel while it sits in L1; its columns are written through `Cols`.
    let cols = Cols(out.as_mut_ptr(), out.len());
    let run = |t: usize| {
        for p in t * per_task..((t + 1) * per_task).min(panels) {
            let wp = w.panel(p);
            let width = P.min(n - p * P);
            let put = |r: usize, v: &[f32; P]| {
                // SAFETY: columns p*P .. p*P + width of row r are inside out (r < m, the
                // panel's columns < n) and written by this task only (tasks own disjoint panels).
                unsafe { cols.write(r * n + p * P, &v[..width]) }
            };
            let mut r = 0;
            while r + ROWS <= m {
                let ys = kern.run(wp, std::array::from_fn::<_, ROWS, _>(|j| a.row(r + j)));
                for (j, y) in ys.iter().enumerate() {
                    put(r + j, y);
                }
                r += ROWS;
            }
            while r + 2 <= m {
                let ys = kern.run(wp, [a.row(r), a.row(r + 1)]);
                put(r, &ys[0]);
                put(r + 1, &ys[1]);
                r += 2;
            }
            if r < m {
                let [y] = kern.run(wp, [a.row(r)]);
                put(r, &y);
            }
        }
    };
    if tasks == 1 {
        run(0);
    } else {
        parallel::install(|| (0..tasks).into_par_iter().for_each(run));
    }
    Ok(())
}

/// Rows `rows` of `x · Wᵀ` for one activation row (`a.m == 1`) on the calling thread: `out` has
/// `rows.len()` values; `rows.start` is a multiple of `P`.
pub fn matvec_rows(w: &Packed, a: &ActsQ8, rows: Range<usize>, out: &mut [f32]) -> Result<()> {
    let k = w.cols;
    if a.m != 1
        || a.k != k
        || !rows.start.is_multiple_of(P)
        || rows.end > w.rows
        || out.len() != rows.len()
    {
        return Err(Error::InvalidArgument(format!(
            "packed matvec: acts {}x{}, weights {}x{k}, rows {rows:?}, out {}",
            a.m,
            a.k,
            w.rows,
            out.len()
        )));
    }
    let kern = Kernel::best();
    for (j, yp) in out.chunks_mut(P).enumerate() {
        let [v] = kern.run(w.panel(rows.start / P + j), [a.row(0)]);
        yp.copy_from_slice(&v[..yp.len()]);
    }
    Ok(())
}

/// The output of a batched matmul, written by tasks that own disjoint columns.
#[derive(Clone, Copy)]
pub(super) struct Cols(pub(super) *mut f32, pub(super) usize);

// SAFETY: tasks write disjoint elements only (see `matmul_with`); the pointer outlives them
// (the parallel loop returns before `out` is released).
unsafe impl Send for Cols {}
// SAFETY: shared between the tasks of one parallel loop, which only call `write` on disjoint
// element ranges (its contract), so no element is accessed by two threads.
unsafe impl Sync for Cols {}

impl Cols {
    /// # Safety
    /// `at + v.len() <= self.1`, and no other thread touches those elements meanwhile.
    pub(super) unsafe fn write(&self, at: usize, v: &[f32]) {
        debug_assert!(at + v.len() <= self.1);
        // SAFETY: in bounds and unshared (this function's contract). A whole panel's 8 values
        // as one fixed-size copy (no call to memcpy).
        unsafe {
            match <&[f32; P]>::try_from(v) {
                Ok(v8) => (self.0.add(at) as *mut [f32; P]).write_unaligned(*v8),
                Err(_) => std::ptr::copy_nonoverlapping(v.as_ptr(), self.0.add(at), v.len()),
            }
        }
    }
}

#[cfg(test)]
mod tests;
