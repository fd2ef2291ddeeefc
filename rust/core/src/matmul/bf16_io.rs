//! `qmatmul` with bfloat16 activations and outputs (QuantLinear in a bf16 model): the casts a
//! bf16 caller would make around the f32 call, done here on the calling thread. Through torch
//! they were two more ops a call, each an allocation and, on torch's OpenMP team, a parallel
//! region (SmolLM2's 128-token prompt: 420 of them a forward; without them a call at M = 128
//! took 1.0-1.16x less CPU time, most at the smallest shapes, one thread). Numerics: those of `qmatmul` on the exact f32 values of the bf16 inputs,
//! each output then rounded to bf16 as torch's `Tensor.to(torch.bfloat16)` does (nearest, ties
//! to even, subnormals kept; a NaN becomes 0x7fc0, c10's scalar conversion).

use std::cell::RefCell;

use super::qmatmul;
use crate::error::{Error, Result};
use crate::formats::tensor::QuantizedView;

/// Scratch up to this many f32 values (activations or outputs) is kept per thread between
/// calls (no allocation, page faults or zeroing per call); larger calls allocate their own.
const KEEP: usize = 1 << 20;

thread_local! {
    /// The calling thread's f32 activations and outputs.
    static SCRATCH: RefCell<(Vec<f32>, Vec<f32>)> = const { RefCell::new((Vec::new(), Vec::new())) };
}

/// The f32 value of bf16 bits (exact).
#[inline]
pub fn bf16_to_f32(b: u16) -> f32 {
    f32::from_bits((b as u32) << 16)
}

/// `v` rounded to bf16 bits: nearest, ties to even (the carry of a mantissa of all ones goes
/// into the exponent, up to infinity), subnormals rounded as any value; NaN -> 0x7fc0.
#[inline]
pub fn f32_to_bf16(v: f32) -> u16 {
    if v.is_nan() {
        return 0x7fc0;
    }
    let u = v.to_bits();
    (u.wrapping_add(0x7fff + ((u >> 16) & 1)) >> 16) as u16
}

/// `out = bf16(x · Wᵀ)`: `x` (M x K) and `out` (M x N) hold bf16 bits, row-major; the product
/// is `qmatmul`'s on the f32 values of x. Errors as `qmatmul`'s (the same checks).
pub fn qmatmul_bf16(x: &[u16], m: usize, w: &QuantizedView<'_>, out: &mut [u16]) -> Result<()> {
    SCRATCH.with_borrow_mut(|(xs, ys)| {
        let mut own = (Vec::new(), Vec::new());
        let (xf, yf) = if x.len() <= KEEP && out.len() <= KEEP {
            (xs, ys)
        } else {
            (&mut own.0, &mut own.1)
        };
        // Every element of both is written before it is read: x below, the outputs by
        // `qmatmul` (every path writes each of its outputs; `matmul/tests/bf16_io.rs`).
        let xf = room(xf, x.len());
        let yf = room(yf, out.len());
        widen(x, xf);
        qmatmul(xf, m, w, yf)?;
        narrow(yf, out);
        Ok(())
    })
}

/// `qmatmul_bf16` of a weight that stacks several (QuantLinear's q/k/v or gate/up, fused: one
/// call, one activation preparation): `outs[i]` (M x `outs[i].len() / M`) gets the next
/// `outs[i].len() / M` columns of `bf16(x · Wᵀ)`, in order. Each output's bits are those of its
/// column in the stacked product (every output is computed on its own: the same bits as a call
/// on that weight alone, `matmul/tests/bf16_io.rs`). Errors: as `qmatmul`'s, and when the
/// outputs are not M rows of columns adding up to W's rows.
pub fn qmatmul_bf16_split(
    x: &[u16],
    m: usize,
    w: &QuantizedView<'_>,
    outs: &mut [&mut [u16]],
) -> Result<()> {
    let n = w.rows;
    let cols: Vec<usize> = outs
        .iter()
        .map(|o| o.len().checked_div(m).unwrap_or(0))
        .collect();
    let fits = outs.iter().zip(&cols).all(|(o, &c)| o.len() == c * m);
    if m == 0 || !fits || cols.iter().sum::<usize>() != n {
        return Err(Error::InvalidArgument(format!(
            "qmatmul_bf16_split: outputs of {:?} values for {m} rows do not split {n} columns",
            outs.iter().map(|o| o.len()).collect::<Vec<_>>()
        )));
    }
    let len = m
        .checked_mul(n)
        .ok_or_else(|| Error::InvalidArgument(format!("output shape {m}x{n} overflows")))?;
    SCRATCH.with_borrow_mut(|(xs, ys)| {
        let mut own = (Vec::new(), Vec::new());
        let (xf, yf) = if x.len() <= KEEP && len <= KEEP {
            (xs, ys)
        } else {
            (&mut own.0, &mut own.1)
        };
        // As `qmatmul_bf16`: every element is written before it is read.
        let xf = room(xf, x.len());
        let yf = room(yf, len);
        widen(x, xf);
        qmatmul(xf, m, w, yf)?;
        let mut c0 = 0;
        for (o, &c) in outs.iter_mut().zip(&cols) {
            for (r, orow) in o.chunks_exact_mut(c).enumerate() {
                narrow(&yf[r * n + c0..r * n + c0 + c], orow);
            }
            c0 += c;
        }
        Ok(())
    })
}

/// The first `len` values of `buf`, grown (never shrunk) to hold them: a scratch cut to each
/// call's size was zero-filled again by every larger call after a smaller one (a SmolLM2 layer's
/// calls alternate 576 / 1536 / 3072 columns: up to 1.5 MB of memset a layer).
fn room(buf: &mut Vec<f32>, len: usize) -> &mut [f32] {
    if buf.len() < len {
        buf.resize(len, 0.0);
    }
    &mut buf[..len]
}

fn widen(x: &[u16], xf: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if crate::cpu::has_avx512() {
        // SAFETY: AVX-512 F is present (checked at run time).
        return unsafe { widen_avx512(x, xf) };
    }
    for (d, &s) in xf.iter_mut().zip(x) {
        *d = bf16_to_f32(s);
    }
}

fn narrow(y: &[f32], out: &mut [u16]) {
    #[cfg(target_arch = "x86_64")]
    if crate::cpu::has_avx512() {
        // SAFETY: AVX-512 F/BW are present (checked at run time).
        return unsafe { narrow_avx512(y, out) };
    }
    for (d, &s) in out.iter_mut().zip(y) {
        *d = f32_to_bf16(s);
    }
}

/// `widen`'s loop compiled for AVX-512 (the compiler vectorizes it; the same values).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
unsafe fn widen_avx512(x: &[u16], xf: &mut [f32]) {
    for (d, &s) in xf.iter_mut().zip(x) {
        *d = bf16_to_f32(s);
    }
}

/// `narrow`'s loop compiled for AVX-512 (integer rounding, so the same bits).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
unsafe fn narrow_avx512(y: &[f32], out: &mut [u16]) {
    for (d, &s) in out.iter_mut().zip(y) {
        *d = f32_to_bf16(s);
    }
}
