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
    let len = out.len();
    run(x, m, w, &mut [out], len)
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
    run(x, m, w, outs, len)
}

/// `qmatmul_bf16_split` after its checks (`outs`: M rows each, `len` values in all; one output:
/// `qmatmul`'s checks of `len`). Where the bf16 GEMM's jobs take the call they write the bf16
/// outputs themselves (`out16::Bf16Out`); otherwise the f32 product goes to a scratch and is
/// narrowed.
fn run(
    x: &[u16],
    m: usize,
    w: &QuantizedView<'_>,
    outs: &mut [&mut [u16]],
    len: usize,
) -> Result<()> {
    #[cfg(target_arch = "x86_64")]
    let plan = plan_bf16(x, m, w, len)?;
    #[cfg(target_arch = "x86_64")]
    if let Some(plan) = &plan {
        if !super::x86::amx_bf16_small::use_small(m) {
            let xb = plan
                .bf16
                .as_ref()
                .expect("plan_bf16 sets the bf16 activations");
            plan.run_bf16_to(xb, &super::out16::Bf16Out::new(outs, m));
            return Ok(());
        }
    }
    let n = w.rows;
    SCRATCH.with_borrow_mut(|(xs, ys)| {
        let mut own = (Vec::new(), Vec::new());
        let (xf, yf) = if x.len() <= KEEP && len <= KEEP {
            (xs, ys)
        } else {
            (&mut own.0, &mut own.1)
        };
        // Every element of both is written before it is read: x below, the outputs by
        // `qmatmul` (every path writes each of its outputs; `matmul/tests/bf16_io.rs`).
        let yf = room(yf, len);
        #[cfg(target_arch = "x86_64")]
        let direct = plan.map(|plan| {
            let xb = plan
                .bf16
                .as_ref()
                .expect("plan_bf16 sets the bf16 activations");
            plan.run_bf16(xb, yf)
        });
        #[cfg(not(target_arch = "x86_64"))]
        let direct: Option<()> = None;
        if direct.is_none() {
            let xf = room(xf, x.len());
            widen(x, xf);
            qmatmul(xf, m, w, yf)?;
        }
        if let [out] = outs {
            narrow(yf, out);
            return Ok(());
        }
        let mut c0 = 0;
        for o in outs.iter_mut() {
            let c = o.len() / m.max(1);
            for (r, orow) in o.chunks_exact_mut(c.max(1)).enumerate() {
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

/// The index of the first non-finite value of bf16 bits `x` (exponent bits all set), as
/// `plan::first_non_finite` on their f32 values.
#[cfg(target_arch = "x86_64")]
pub(super) fn first_non_finite_bf16(x: &[u16]) -> Option<usize> {
    const CHUNK: usize = 256;
    const EXP: u16 = 0x7f80;
    x.chunks(CHUNK).enumerate().find_map(|(c, xs)| {
        let any = xs.iter().fold(false, |a, &v| a | (v & EXP == EXP));
        any.then(|| c * CHUNK + xs.iter().position(|&v| v & EXP == EXP).unwrap_or(0))
    })
}

/// The bf16 GEMM's activations (`x86::acts16::prepare`'s layout) from bf16 bits `x` (M x K, K a
/// multiple of 32): the bits `prepare` makes from their f32 values, which `vcvtne2ps2bf16`
/// rounds back exactly except subnormals, read as signed zeros (`reference::bf16::round_bf16`):
/// flushed here the same way. Each 16 rows x 16 pairs of columns go through one 16 x 16
/// transpose of dwords instead of `prepare`'s 256 scattered stores.
///
/// # Safety
/// AVX-512 F/BW (the bf16 GEMM's callers hold `cpu::has_avx512_bf16`).
#[cfg(target_arch = "x86_64")]
pub(super) unsafe fn acts16(x: &[u16], m: usize, k: usize) -> super::x86::gemm16::Acts16 {
    use super::x86::gemm16::{Acts16, Pairs16};
    assert!(k.is_multiple_of(32) && x.len() == m * k);
    let pairs = k / 2;
    let stride = pairs + 16;
    let vectors = m.div_ceil(16);
    let len = vectors * stride;
    // The last call's buffer when it has the room (`acts16::spare`: no allocation, no fresh
    // pages), not zero-filled: `acts16_avx512` writes every entry.
    let mut out = super::x86::acts16::spare(len);
    // SAFETY: MaybeUninit needs no initialization; the capacity is at least len.
    unsafe { out.set_len(len) };
    for (v, o) in out.chunks_exact_mut(stride).enumerate() {
        let rows = (m - 16 * v).min(16);
        // SAFETY: AVX-512 F/BW (caller's contract); the block holds `rows` rows of k, `o`
        // k / 2 + 16 entries.
        unsafe { acts16_avx512(&x[16 * v * k..(16 * v + rows) * k], rows, k, o) };
    }
    // SAFETY: every entry was written (`acts16_avx512` writes a vector's `stride` entries), and
    // MaybeUninit<T> has T's size and alignment, so the allocation is a Vec<Pairs16> of len.
    let out = unsafe {
        let mut out = std::mem::ManuallyDrop::new(out);
        Vec::from_raw_parts(out.as_mut_ptr() as *mut Pairs16, len, out.capacity())
    };
    Acts16 {
        x: out,
        pairs,
        stride,
        vectors,
    }
}

/// `acts16` of one vector (`rows` <= 16 rows of `x`, the others zero): per 32 columns the 16
/// rows' 64 bytes, flushed, transposed as 16 x 16 dwords into 16 entries of `o`; the 16 entries
/// after the `k / 2` zero.
///
/// # Safety
/// AVX-512 F/BW; `x` holds `rows` rows of `k` (a multiple of 32), `o` `k / 2 + 16` entries.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn acts16_avx512(
    x: &[u16],
    rows: usize,
    k: usize,
    o: &mut [std::mem::MaybeUninit<super::x86::gemm16::Pairs16>],
) {
    use std::arch::x86_64::*;
    assert!(rows <= 16 && x.len() == rows * k && o.len() == k / 2 + 16);
    let exp = _mm512_set1_epi16(0x7f80);
    let sign = _mm512_set1_epi16(-0x8000);
    for c in 0..k / 32 {
        // (moves only: the dwords pass through the float transpose as bits; no `array::map`
        // with a closure here: a closure is compiled without this function's target features,
        // and where LLVM did not inline it every vector went through memory, which made whole
        // SmolLM2 prompts 15 % slower in one build of session 18)
        let mut tf = [_mm512_setzero_ps(); 16];
        for (l, tl) in tf.iter_mut().enumerate().take(rows) {
            // SAFETY: row l's columns 32c..32c + 32 are inside x (caller's contract).
            let v = unsafe { _mm512_loadu_si512(x.as_ptr().add(l * k + 32 * c) as *const _) };
            // (subnormals and zeros: exponent bits all clear -> the sign alone)
            let sub = _mm512_testn_epi16_mask(v, exp);
            *tl = _mm512_castsi512_ps(_mm512_mask_mov_epi16(v, sub, _mm512_and_si512(v, sign)));
        }
        // SAFETY: AVX-512 F (caller's contract).
        unsafe { super::x86::acts16::transpose16(&mut tf) };
        for (i, ti) in tf.iter().enumerate() {
            // SAFETY: entry 16c + i < k / 2 (caller's contract); a 64-byte store.
            unsafe { _mm512_storeu_ps(o.as_mut_ptr().add(16 * c + i) as *mut f32, *ti) };
        }
    }
    for i in 0..16 {
        // SAFETY: entry k / 2 + i < o.len() (asserted); a 64-byte store.
        unsafe {
            _mm512_storeu_ps(
                o.as_mut_ptr().add(k / 2 + i) as *mut f32,
                _mm512_setzero_ps(),
            )
        };
    }
}

/// `plan` for bf16 activations (`x`: M x K bf16 bits) when the bf16 GEMM takes the call: its
/// activations made straight from the bits (`acts16`: the same `Acts16` as `plan`'s
/// from their f32 values, without the widening and the rounding back), else None (the caller
/// widens x and calls `qmatmul`). Errors: `plan`'s, in the same order.
#[cfg(target_arch = "x86_64")]
pub(super) fn plan_bf16<'a>(
    x: &[u16],
    m: usize,
    w: &'a QuantizedView<'a>,
    out_len: usize,
) -> Result<Option<super::Plan<'a>>> {
    let k = w.cols;
    let (stats_per_row, block_len) = super::plan::check(m, w, x.len(), out_len)?;
    if let Some(i) = first_non_finite_bf16(x) {
        return Err(Error::NonFinite {
            row: i / k,
            col: i % k,
            value: bf16_to_f32(x[i]),
        });
    }
    if !super::plan::bf16_route(w, m) {
        return Ok(None);
    }
    // SAFETY: `bf16_route` holds `cpu::has_avx512_bf16` (AVX-512 F/BW/VL and BF16).
    let xb = unsafe { acts16(x, m, k) };
    Ok(Some(super::plan::bf16_plan(
        &[],
        m,
        w,
        stats_per_row,
        block_len,
        xb,
    )))
}
