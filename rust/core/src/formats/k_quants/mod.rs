//! ggml's K-quants q2_K..q6_K (ggml-quants.c), bit-exact with libggml's `ggml_quantize_chunk`.
//!
//! Which C function defines the bytes (checked in ggml-quants.c: every `quantize_qN_K` calls
//! `quantize_row_qN_K_ref` when `quant_weights == NULL` and `quantize_row_qN_K_impl` per row
//! otherwise):
//!
//! | type | no imatrix                          | imatrix                                  |
//! |------|-------------------------------------|------------------------------------------|
//! | q2_K | `make_qkx2_quants` (MAD, 16 steps)   | `make_qkx3_quants` + `make_qp_quants`    |
//! | q3_K | `make_q3_quants`                    | `make_qx_quants` on values and on scales |
//! | q4_K | `make_qkx2_quants` (21 steps)        | `make_qkx3_quants` + `make_qp_quants`    |
//! | q5_K | `make_qkx2_quants` (16 steps)        | `make_qkx3_quants` + `make_qp_quants`    |
//! | q6_K | `make_qx_quants` (x^2 weights)       | `make_qx_quants` (imatrix weights)       |
//!
//! `q2_k.rs` .. `q6_k.rs` hold the scalar references (one per format and path) and the
//! dequantizers; `common.rs` the shared searches. The fast paths run the searches of the
//! independent sub-blocks of a super-block side by side in SIMD lanes, each lane doing exactly
//! the scalar sequence of its sub-block, and share everything after the search with the
//! references: `avx2.rs` (`make_qkx2_quants` / `make_qkx3_quants` for q2_K, q4_K, q5_K),
//! `avx2_sym.rs` (`make_qx_quants` for q6_K and the q3_K imatrix path, `make_q3_quants` for q3_K), both runtime-detected, and `fast.rs`, which picks
//! the path (FERROQUANT_FORCE_SCALAR=1 forces the references) and holds a portable lane version
//! of the q4_K/q5_K search for CPUs without AVX2. Every fast path is tested bit-exact against its reference (`fast::tests`) and,
//! through Python, against libggml.

// The references index arrays like the C loops they mirror, so that each line can be checked
// against ggml-quants.c; iterator rewrites would hide that correspondence.
#![allow(clippy::needless_range_loop)]

#[cfg(target_arch = "x86_64")]
mod avx2;
#[cfg(target_arch = "x86_64")]
mod avx2_sym;
pub mod common;
pub mod fast;
pub mod q2_k;
pub mod q3_k;
pub mod q4_k;
pub mod q5_k;
pub mod q6_k;

use crate::qtype::QType;

/// Quantize one row (a whole number of 256-value blocks) into `out`; `imatrix` is the row's
/// importance weights (one per column), as libggml's `quant_weights`.
pub fn quantize_row(qtype: QType, x: &[f32], out: &mut [u8], imatrix: Option<&[f32]>) {
    use QType::*;
    match (qtype, imatrix) {
        (Q2K, w) => fast::quantize_row_q2_k(x, out, w),
        (Q3K, w) => fast::quantize_row_q3_k(x, out, w),
        (Q4K, None) => fast::quantize_row_q4_k(x, out),
        (Q4K, Some(w)) => fast::quantize_row_q4_k_impl(x, out, w),
        (Q5K, None) => fast::quantize_row_q5_k(x, out),
        (Q5K, Some(w)) => fast::quantize_row_q5_k_impl(x, out, w),
        (Q6K, w) => fast::quantize_row_q6_k(x, out, w),
        _ => unreachable!("{qtype:?} is not a K-quant"),
    }
}

/// Dequantize one row (bit-exact with gguf-py's `dequantize` and libggml's `dequantize_row_*`).
pub fn dequantize_row(qtype: QType, data: &[u8], y: &mut [f32]) {
    use QType::*;
    match qtype {
        Q2K => q2_k::dequantize_row_q2_k(data, y),
        Q3K => q3_k::dequantize_row_q3_k(data, y),
        Q4K => q4_k::dequantize_row_q4_k(data, y),
        Q5K => q5_k::dequantize_row_q5_k(data, y),
        Q6K => q6_k::dequantize_row_q6_k(data, y),
        _ => unreachable!("{qtype:?} is not a K-quant"),
    }
}
