//! Quantized CPU matmul: `y = x · Wᵀ` with `W` (N x K, quantized, one row per output feature, in
//! ferroquant's layouts) and `x` (M x K, f32), `y` (M x N, f32).
//!
//! Each output element is one dot product computed by one fixed sequence (`reference.rs`
//! defines it; `x86.rs` computes the same bits with AVX2, plus AVX-512 VNNI integer sums for the
//! 32-weight formats and an AVX-512F nf4 decode where the CPU has them), so results do not
//! depend on the thread count, on M, or on the instruction set. Work is split over output
//! features N through the one pool of `parallel.rs`; each task reads a weight row once and uses
//! it for all M activation rows (4 at a time in the SIMD kernels). FERROQUANT_FORCE_SCALAR=1
//! runs the references. On aarch64 `neon.rs` computes the same bits with NEON (`sdot` where the
//! CPU has `dotprod`); other architectures run the references.
//!
//! Supported weight formats and the activation each uses:
//! q4_0, q5_0, q8_0, iq4_nl → activations quantized to q8_0 (ggml's `vec_dot_type`);
//! q4_1, q5_1 → activations quantized to q8_1 (q8_0 plus `s = d·Σq`, for the `m·Σx` term);
//! q2_k, q3_k, q4_k, q5_k, q6_k, iq4_xs → activations quantized to q8_K;
//! nf4, int8, fp8_e4m3, fp8_e5m2 → f32 activations (the one-byte formats: the dequantized
//! product within float rounding, fp8 decoded exactly; no activation error added to the
//! weights').

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
    },
    /// q8_1 (for q4_1 / q5_1): q8_0's fields plus each block's `s` as f32.
    Q8_1 {
        blocks: Vec<BlockQ8_0>,
        d: Vec<f32>,
        sums: Vec<i32>,
        s: Vec<f32>,
    },
    Q8K(Vec<BlockQ8K>),
    F32(&'a [f32]),
}

/// Everything one dot product needs, checked once.
struct Plan<'a> {
    w: &'a QuantizedView<'a>,
    k: usize,
    row_bytes: usize,
    acts: Acts<'a>,
    /// nf4 / int8: statistics per weight row, and the weights sharing one of them.
    stats_per_row: usize,
    block_len: usize,
    simd: bool,
    /// AVX-512F for the nf4 decode.
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    avx512: bool,
    /// AVX-512 VNNI for the 32-weight integer formats.
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    vnni: bool,
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

fn use_avx512() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        x86::has_avx512f()
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Activation rows handled together by the SIMD kernels (weights decoded once for all of them).
const ROWS: usize = 4;

impl Plan<'_> {
    /// `y[mi]` = weight row `n` with activation row `mi`, for every `mi` (y has M entries).
    /// Rows go to the kernels in groups of `ROWS`, then one at a time; each output's arithmetic
    /// is the same in either case.
    fn dots(&self, n: usize, y: &mut [f32]) {
        let wrow = &self.w.data[n * self.row_bytes..(n + 1) * self.row_bytes];
        let mut m0 = 0;
        while m0 < y.len() {
            if y.len() - m0 >= ROWS && self.simd {
                let rows: [usize; ROWS] = std::array::from_fn(|i| m0 + i);
                y[m0..m0 + ROWS].copy_from_slice(&self.dot_rows(n, wrow, rows));
                m0 += ROWS;
            } else {
                y[m0] = self.dot_rows(n, wrow, [m0])[0];
                m0 += 1;
            }
        }
    }

    fn dot_rows<const R: usize>(&self, n: usize, wrow: &[u8], rows: [usize; R]) -> [f32; R] {
        let k = self.k;
        match &self.acts {
            Acts::Q8_0 { blocks, d, sums } => {
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
            Acts::Q8K(blocks) => {
                let nb = k / QK_K;
                let x = rows.map(|mi| &blocks[mi * nb..(mi + 1) * nb]);
                match self.w.qtype {
                    QType::Q2K => self.dot_k::<BlockQ2K, R>(wrow, x),
                    QType::Q3K => self.dot_k::<BlockQ3K, R>(wrow, x),
                    QType::Q4K => self.dot_k::<BlockQ4K, R>(wrow, x),
                    QType::Q5K => self.dot_k::<BlockQ5K, R>(wrow, x),
                    QType::Q6K => self.dot_k::<BlockQ6K, R>(wrow, x),
                    _ => self.dot_k::<BlockIQ4XS, R>(wrow, x),
                }
            }
            Acts::F32(xs) => {
                let x = rows.map(|mi| &xs[mi * k..(mi + 1) * k]);
                let spr = self.stats_per_row;
                let stats = if self.w.stats.len() == 1 {
                    self.w.stats
                } else {
                    &self.w.stats[n * spr..(n + 1) * spr]
                };
                self.dot_f32(wrow, stats, x)
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
            unsafe { x86::dot_block32_vnni(w, x, xd, xs) }
        } else if self.simd {
            // SAFETY: simd is set only when AVX2 and F16C were detected; x and xd have one
            // entry per weight block (both built from the same K).
            unsafe { x86::dot_block32(w, x, xd) }
        } else {
            std::array::from_fn(|r| reference::dot_block32(w, x[r], xd[r]))
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
            unsafe { x86::dot_block32_min_vnni(w, x, xd, xsum, xs) }
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
        std::array::from_fn(|r| reference::dot_block32_min(w, x[r], xd[r], xs[r]))
    }

    #[cfg(target_arch = "x86_64")]
    fn dot_k<W: x86::SumsK, const R: usize>(&self, wrow: &[u8], x: [&[BlockQ8K]; R]) -> [f32; R] {
        let w: &[W] = bytemuck::cast_slice(wrow);
        if self.simd {
            // SAFETY: AVX2 detected; x has one block per weight block.
            unsafe { x86::dot_block_k(w, x) }
        } else {
            std::array::from_fn(|r| reference::dot_block_k(w, x[r]))
        }
    }

    #[cfg(not(target_arch = "x86_64"))]
    fn dot_k<W: reference::BlockK, const R: usize>(
        &self,
        wrow: &[u8],
        x: [&[BlockQ8K]; R],
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
        if self.simd {
            // SAFETY: AVX2 and F16C (and AVX-512F where used) detected; lengths checked by
            // `plan` (K/2 or K bytes, one stat per block, nf4 blocks a multiple of 32).
            return unsafe {
                match qtype {
                    QType::NF4 if self.avx512 => x86::dot_nf4_avx512(wrow, stats, bl, x),
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
    let acts = match w.qtype {
        QType::Q4_0 | QType::Q5_0 | QType::Q8_0 | QType::IQ4NL => {
            let nb = k / QK8_0;
            let mut blocks = vec![BlockQ8_0::zeroed(); m * nb];
            parallel::install(|| {
                blocks
                    .par_chunks_mut(nb)
                    .zip(x.par_chunks(k))
                    .for_each(|(b, x)| reference::quantize_row_q8_0(x, b))
            });
            let d = blocks.iter().map(|b| f16_to_f32(b.d)).collect();
            let sums = blocks
                .iter()
                .map(|b| b.qs.iter().map(|&q| q as i32).sum())
                .collect();
            Acts::Q8_0 { blocks, d, sums }
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
            Acts::Q8_1 { blocks, d, sums, s }
        }
        QType::Q2K | QType::Q3K | QType::Q4K | QType::Q5K | QType::Q6K | QType::IQ4XS => {
            let nb = k / QK_K;
            let mut blocks = vec![BlockQ8K::zeroed(); m * nb];
            parallel::install(|| {
                blocks
                    .par_chunks_mut(nb)
                    .zip(x.par_chunks(k))
                    .for_each(|(b, x)| reference::quantize_row_q8_k(x, b))
            });
            Acts::Q8K(blocks)
        }
        _ => Acts::F32(x),
    };
    Ok(Plan {
        w,
        k,
        row_bytes: w.qtype.row_bytes(k, w.block_size),
        acts,
        stats_per_row,
        block_len,
        simd: use_simd(),
        avx512: use_avx512(),
        vnni: use_vnni(),
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
    // Rows of Wᵀ·x (N x M): each task owns whole weight rows, reads each row once and reuses it
    // for all M activation rows.
    let per_task = parallel::rows_per_task(n, w.cols.saturating_mul(m));
    let fill = |yt: &mut [f32]| {
        parallel::install(|| {
            yt.par_chunks_mut(per_task * m)
                .enumerate()
                .for_each(|(t, chunk)| {
                    for (i, yrow) in chunk.chunks_mut(m).enumerate() {
                        plan.dots(t * per_task + i, yrow);
                    }
                })
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

#[cfg(test)]
mod tests;
