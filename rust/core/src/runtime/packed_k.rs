//! q4_K and q6_K matrices in panels of 8 rows for the runtime's VNNI kernel (`packed.rs` does
//! the same for q8_0 values; SmolLM2's q4_k_m keeps its ffn_down in these two).
//!
//! **Layout.** Per panel and super-block of 256, `SB_BYTES`: 64 vectors of 32 bytes where bytes
//! `4i .. 4i + 4` of vector t are the unsigned quants `4t .. 4t + 4` of row i (q4_K 0..15, q6_K
//! 0..63, one byte each: decode is a load), then the sub-block scales (q4_K: 8 scales and 8
//! mins, q6_K: 16 signed scales) as bytes `[group][row]`, then the 8 rows' f16 `d` and `dmin`
//! (0 for q6_K). 276 bytes a row and super-block against q4_K's 144 and q6_K's 210: more bytes
//! to read, no bit fiddling.
//!
//! **Arithmetic** (`matmul::reference::dot_block_k`'s, so the products are bit for bit those of
//! `qmatmul`): per super-block the exact integers `isum = Σ_g scale_g · Σ_{e in g} q_e x_e`
//! (q6_K: `(q - 32)`, by subtracting `32 · bsum_g`) and `msum = Σ_s min_s · (Σx of sub-block
//! s)`, then `p = (d · d_x) · isum - (dmin · d_x) · msum`, added to lane `b % 8`, lanes summed
//! `((a0 + a4) + (a2 + a6)) + ((a1 + a5) + (a3 + a7))`: one vector operation for 8 rows each.

use rayon::prelude::*;

use crate::error::{Error, Result};
use crate::formats::blocks::*;
use crate::matmul::reference::{self, BlockQ8K};
use crate::parallel;
use crate::qtype::QType;

use super::packed::{Cols, P};

#[cfg(target_arch = "x86_64")]
mod x86;

/// Bytes of one super-block of a panel.
pub const SB_BYTES: usize = 64 * 32 + 128 + 32;
const SCALES: usize = 64 * 32;
const D: usize = SCALES + 128;

/// A q4_K or q6_K matrix in panels (`rows` x `cols`, `cols` a multiple of 256).
#[derive(Clone, Debug)]
pub struct PackedK {
    pub q6: bool,
    pub rows: usize,
    pub cols: usize,
    pub data: Vec<u8>,
    /// The rows as stored in the mapped file, when the weight is used in place (see
    /// `Packed::file_rows`).
    pub file_rows: Option<std::ops::Range<usize>>,
}

/// One row's super-block unpacked: quants, scales per group, mins, d, dmin.
struct Unpacked {
    q: [u8; QK_K],
    scales: [u8; 16],
    mins: [u8; 8],
    d: Half,
    dmin: Half,
}

fn unpack(qtype: QType, block: &[u8]) -> Unpacked {
    if qtype == QType::Q6K {
        let b: &BlockQ6K = bytemuck::from_bytes(block);
        Unpacked {
            q: reference::unpack_q6_k(b),
            scales: b.scales.map(|s| s as u8),
            mins: [0; 8],
            d: b.d,
            dmin: [0, 0],
        }
    } else {
        let b: &BlockQ4K = bytemuck::from_bytes(block);
        let mut scales = [0u8; 16];
        let mut mins = [0u8; 8];
        for s in 0..8 {
            let (sc, m) = reference::scale_min_k4(s, &b.scales);
            (scales[s], mins[s]) = (sc as u8, m as u8);
        }
        Unpacked {
            q: reference::unpack_q4_k(b),
            scales,
            mins,
            d: b.d,
            dmin: b.dmin,
        }
    }
}

impl PackedK {
    /// Pack `rows` rows of q4_K or q6_K super-blocks (`data`, the rows as stored); None for
    /// another qtype.
    pub fn new(qtype: QType, data: &[u8], rows: usize, cols: usize) -> Option<PackedK> {
        if !matches!(qtype, QType::Q4K | QType::Q6K) || !cols.is_multiple_of(QK_K) {
            return None;
        }
        let nb = cols / QK_K;
        let bb = qtype.info().type_size;
        if data.len() != rows * nb * bb {
            return None;
        }
        let mut out = vec![0u8; rows.div_ceil(P) * nb * SB_BYTES];
        out.par_chunks_mut(nb * SB_BYTES)
            .enumerate()
            .for_each(|(p, panel)| {
                for (b, o) in panel.chunks_exact_mut(SB_BYTES).enumerate() {
                    for i in 0..P.min(rows - p * P) {
                        let at = ((p * P + i) * nb + b) * bb;
                        let u = unpack(qtype, &data[at..at + bb]);
                        for t in 0..64 {
                            o[32 * t + 4 * i..32 * t + 4 * i + 4]
                                .copy_from_slice(&u.q[4 * t..4 * t + 4]);
                        }
                        // q6_K: 16 scales; q4_K: 8 scales, then 8 mins.
                        let groups = if qtype == QType::Q6K { 16 } else { 8 };
                        for g in 0..groups {
                            o[SCALES + 8 * g + i] = u.scales[g];
                        }
                        for s in 0..16 - groups {
                            o[SCALES + 64 + 8 * s + i] = u.mins[s];
                        }
                        o[D + 2 * i..D + 2 * i + 2].copy_from_slice(&u.d);
                        o[D + 16 + 2 * i..D + 18 + 2 * i].copy_from_slice(&u.dmin);
                    }
                }
            });
        Some(PackedK {
            q6: qtype == QType::Q6K,
            rows,
            cols,
            data: out,
            file_rows: None,
        })
    }

    /// q4_K or q6_K.
    pub fn qtype(&self) -> QType {
        if self.q6 {
            QType::Q6K
        } else {
            QType::Q4K
        }
    }

    fn panel(&self, p: usize) -> &[u8] {
        let len = self.cols / QK_K * SB_BYTES;
        &self.data[p * len..(p + 1) * len]
    }

    /// Panel `p` with one activation row (`x`: its q8_K blocks).
    fn run(&self, p: usize, x: &[BlockQ8K]) -> [f32; P] {
        let w = self.panel(p);
        #[cfg(target_arch = "x86_64")]
        if crate::cpu::has_vnni() {
            // SAFETY: AVX2, F16C, AVX-512F/VL/VNNI detected; w holds x.len() super-blocks of
            // SB_BYTES (x has cols / 256 blocks, checked by the callers).
            return unsafe {
                if self.q6 {
                    x86::panel_k::<true>(w, x)
                } else {
                    x86::panel_k::<false>(w, x)
                }
            };
        }
        panel_ref(self.q6, w, x)
    }
}

/// The portable kernel: the reference's operations on the packed bytes.
fn panel_ref(q6: bool, w: &[u8], x: &[BlockQ8K]) -> [f32; P] {
    let mut acc = [[0f32; reference::LANES]; P];
    for (b, (sb, xb)) in w.chunks_exact(SB_BYTES).zip(x).enumerate() {
        for (i, a) in acc.iter_mut().enumerate() {
            let q = |e: usize| sb[32 * (e / 4) + 4 * i + e % 4] as i32;
            let (mut isum, mut msum) = (0i32, 0i32);
            if q6 {
                for g in 0..16 {
                    let dot: i32 = (16 * g..16 * g + 16)
                        .map(|e| (q(e) - 32) * xb.qs[e] as i32)
                        .sum();
                    isum += sb[SCALES + 8 * g + i] as i8 as i32 * dot;
                }
            } else {
                for s in 0..8 {
                    let dot: i32 = (32 * s..32 * s + 32).map(|e| q(e) * xb.qs[e] as i32).sum();
                    isum += sb[SCALES + 8 * s + i] as i32 * dot;
                    let bs = xb.bsums[2 * s] as i32 + xb.bsums[2 * s + 1] as i32;
                    msum += sb[SCALES + 64 + 8 * s + i] as i32 * bs;
                }
            }
            let d = f16_to_f32([sb[D + 2 * i], sb[D + 2 * i + 1]]);
            let dmin = f16_to_f32([sb[D + 16 + 2 * i], sb[D + 17 + 2 * i]]);
            a[b % reference::LANES] += reference::block_k_product(d, dmin, xb.d, isum, msum);
        }
    }
    acc.map(|a| reference::hsum8(&a))
}

/// Activation rows quantized to q8_K once.
#[derive(Default)]
pub struct ActsQ8K {
    pub m: usize,
    pub k: usize,
    blocks: Vec<BlockQ8K>,
}

impl ActsQ8K {
    /// ggml's `quantize_row_q8_K` of the `m` rows of `x` (what `qmatmul` does); errors on a
    /// non-finite value.
    pub fn quantize(&mut self, x: &[f32], m: usize, k: usize) -> Result<()> {
        super::packed::check_acts(x, m, k, QK_K, "packed K-quant matmul")?;
        let nb = k / QK_K;
        (self.m, self.k) = (m, k);
        self.blocks
            .resize(m * nb, <BlockQ8K as bytemuck::Zeroable>::zeroed());
        // The AVX-512 quantizer where it runs (bit for bit the reference's).
        #[cfg(target_arch = "x86_64")]
        let quant =
            |(b, x): (&mut [BlockQ8K], &[f32])| crate::matmul::x86::q8k::quantize_row_q8_k(x, b);
        #[cfg(not(target_arch = "x86_64"))]
        let quant = |(b, x): (&mut [BlockQ8K], &[f32])| reference::quantize_row_q8_k(x, b);
        if m >= 4 && m * k >= 1 << 17 {
            self.blocks
                .par_chunks_mut(nb)
                .zip(x.par_chunks(k))
                .for_each(quant);
        } else {
            self.blocks.chunks_mut(nb).zip(x.chunks(k)).for_each(quant);
        }
        Ok(())
    }

    fn row(&self, r: usize) -> &[BlockQ8K] {
        let nb = self.k / QK_K;
        &self.blocks[r * nb..(r + 1) * nb]
    }
}

fn check(w: &PackedK, a: &ActsQ8K, out: usize, want: usize) -> Result<()> {
    let size = w.rows.div_ceil(P) * (w.cols / QK_K) * SB_BYTES;
    if a.k != w.cols || out != want || w.data.len() != size {
        return Err(Error::InvalidArgument(format!(
            "packed K-quant matmul shapes: acts {}x{}, weights {}x{}, out {out}",
            a.m, a.k, w.rows, w.cols
        )));
    }
    Ok(())
}

/// `out = x · Wᵀ` (M x N, row-major) for activations quantized in `a`.
pub fn matmul(w: &PackedK, a: &ActsQ8K, out: &mut [f32]) -> Result<()> {
    let (m, n) = (a.m, w.rows);
    check(w, a, out.len(), m * n)?;
    if m == 0 || n == 0 {
        return Ok(());
    }
    let panels = n.div_ceil(P);
    let threads = parallel::num_threads();
    let tasks = if threads == 1 {
        1
    } else {
        (m * n * w.cols)
            .div_ceil(1 << 18)
            .next_multiple_of(threads)
            .min(panels)
    };
    let per_task = panels.div_ceil(tasks);
    let cols = Cols(out.as_mut_ptr(), out.len());
    let run = |t: usize| {
        for p in t * per_task..((t + 1) * per_task).min(panels) {
            let width = P.min(n - p * P);
            for r in 0..m {
                let y = w.run(p, a.row(r));
                // SAFETY: columns p*P .. p*P + width of row r are inside out and written by
                // this task only (tasks own disjoint panels).
                unsafe { cols.write(r * n + p * P, &y[..width]) };
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

/// Rows `rows` of `x · Wᵀ` for one activation row on the calling thread (`rows.start` a
/// multiple of `P`).
pub fn matvec_rows(
    w: &PackedK,
    a: &ActsQ8K,
    rows: std::ops::Range<usize>,
    out: &mut [f32],
) -> Result<()> {
    check(w, a, out.len(), rows.len())?;
    if a.m != 1 || !rows.start.is_multiple_of(P) || rows.end > w.rows {
        return Err(Error::InvalidArgument(format!(
            "packed K-quant matvec: rows {rows:?} of {}",
            w.rows
        )));
    }
    for (j, yp) in out.chunks_mut(P).enumerate() {
        let y = w.run(rows.start / P + j, a.row(0));
        yp.copy_from_slice(&y[..yp.len()]);
    }
    Ok(())
}

#[cfg(test)]
mod tests;
