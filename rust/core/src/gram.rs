//! x^T x of calibration activations in bf16 (GPTQ's Hessian, `calib/capture.py`'s `gram`): the
//! Linear's input as its bf16 GEMM reads it, products summed in f32 on AMX tiles where they
//! are usable (`gram/amx.rs`), else on `vdpbf16ps` where the CPU has AVX-512 BF16 (about 3x
//! torch's f32 GEMM of the same triangle on one Zen 5 core), else the scalar reference.
//!
//! **Input.** `x` is `[n, d]` row-major bf16 bits (tokens x features): the f32 activations
//! rounded to bf16 by the caller (torch's round-to-nearest-even; subnormals are read as zero).
//!
//! **Sum.** Output `(i, j)` is one f32 chain over the pairs of tokens `(2p, 2p + 1)` in
//! increasing p, starting at +0; each pair adds `x[2p+1][i] x[2p+1][j]`, then `x[2p][i]
//! x[2p][j]`, each a fused multiply-add of an exact product with subnormal inputs read as zero
//! and subnormal results flushed (`matmul::reference::bf16::step`, the semantics of
//! `vdpbf16ps`, checked at run time before the kernel is used). An odd n is padded with a zero
//! token. The order is fixed, so the result is the same bits on every call, every thread count
//! and (scalar reference or kernel) every CPU; `(i, j)` and `(j, i)` are the same chain, so the
//! output is exactly symmetric. Error against the exact sum of the bf16 products: Higham's
//! recursive-summation bound `γ_n Σ_t |x_ti x_tj|` (`u = 2^-24`) plus flushes below 2^-126.
//!
//! **The AMX path** (`Path::Amx`, chosen wherever `amx::amx_bf16_usable`) sums in the tile
//! unit's own order and rounding, which no simple model matches (`matmul::x86::amx_bf16`): its
//! outputs are not the reference's bits but each lies within `error_bound_with_unit`'s float64
//! bound with the faithful unit `2^-23` (twice the nearest-rounding unit: `γ_n` with `2u`), the
//! output is still exactly symmetric, and the bits are the same on every call and every thread
//! count (one fixed tile sequence per output block). So on a CPU with AMX the Hessians (and the
//! GPTQ codes that follow from them) differ in their last bits from an AVX-512 BF16 CPU's.

use crate::error::{Error, Result};
use crate::matmul::reference::bf16::step;

#[cfg(target_arch = "x86_64")]
mod amx;
#[cfg(target_arch = "x86_64")]
mod x86;

#[cfg(test)]
mod tests;

/// Which kernel computes `gram_bf16`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Path {
    /// AMX bf16 tiles (the tile unit's summation, bounded: see the module comment).
    Amx,
    /// AVX-512 BF16 `vdpbf16ps`: the reference's bits.
    Avx512Bf16,
    /// The scalar reference.
    Scalar,
}

impl Path {
    /// The fastest path usable here (`gram_bf16`'s choice).
    pub fn best() -> Path {
        #[cfg(target_arch = "x86_64")]
        {
            if crate::amx::amx_bf16_usable() {
                return Path::Amx;
            }
            if crate::cpu::has_avx512_bf16() && crate::matmul::x86::gemm16::semantics_hold() {
                return Path::Avx512Bf16;
            }
        }
        Path::Scalar
    }

    /// Whether this path runs here.
    pub fn usable(self) -> bool {
        match self {
            Path::Scalar => true,
            #[cfg(target_arch = "x86_64")]
            Path::Amx => crate::amx::amx_bf16_usable(),
            #[cfg(target_arch = "x86_64")]
            Path::Avx512Bf16 => {
                crate::cpu::has_avx512_bf16() && crate::matmul::x86::gemm16::semantics_hold()
            }
            #[cfg(not(target_arch = "x86_64"))]
            _ => false,
        }
    }

    /// "amx", "avx512bf16" or "scalar".
    pub fn name(self) -> &'static str {
        match self {
            Path::Amx => "amx",
            Path::Avx512Bf16 => "avx512bf16",
            Path::Scalar => "scalar",
        }
    }
}

/// Whether `gram_bf16` runs a fast kernel here (AMX or AVX-512 BF16; else the scalar reference,
/// much slower: callers with a fast f32 GEMM of their own should use it instead).
pub fn fast() -> bool {
    Path::best() != Path::Scalar
}

fn check(x: &[u16], n: usize, d: usize) -> Result<()> {
    if n.checked_mul(d) != Some(x.len()) {
        return Err(Error::InvalidArgument(format!(
            "gram: {} bf16 values are not {n} tokens x {d} features",
            x.len()
        )));
    }
    Ok(())
}

/// x^T x (`[d, d]` row-major f32) of the bf16 matrix `x` `[n, d]` on the fastest path here
/// (`Path::best`; the module comment says what each sums).
pub fn gram_bf16(x: &[u16], n: usize, d: usize) -> Result<Vec<f32>> {
    gram_bf16_on(x, n, d, Path::best())
}

/// `gram_bf16` on a given path (tests and A/B timings); an error where it does not run here.
pub fn gram_bf16_on(x: &[u16], n: usize, d: usize, path: Path) -> Result<Vec<f32>> {
    check(x, n, d)?;
    if !path.usable() {
        return Err(Error::InvalidArgument(format!(
            "gram: the {} path does not run on this CPU",
            path.name()
        )));
    }
    match path {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: AMX bf16 usable (checked); x holds n x d (`check`).
        Path::Amx => Ok(crate::parallel::install(|| unsafe { amx::gram(x, n, d) })),
        #[cfg(target_arch = "x86_64")]
        // SAFETY: AVX-512 F/BW/VL and BF16 were detected (`usable`).
        Path::Avx512Bf16 => Ok(unsafe { x86::gram(x, n, d) }),
        _ => Ok(gram_reference(x, n, d)),
    }
}

/// The scalar reference of `gram_bf16` (the module comment's chain, output by output).
pub fn gram_reference(x: &[u16], n: usize, d: usize) -> Vec<f32> {
    let at = |t: usize, i: usize| if t < n { x[t * d + i] } else { 0 };
    let mut out = vec![0.0f32; d * d];
    for i in 0..d {
        for j in i..d {
            let mut acc = 0.0f32;
            for p in 0..n.div_ceil(2) {
                let (e, o) = (2 * p, 2 * p + 1);
                acc = step(acc, [at(e, i), at(o, i)], [at(e, j), at(o, j)]);
            }
            out[i * d + j] = acc;
            out[j * d + i] = acc;
        }
    }
    out
}
