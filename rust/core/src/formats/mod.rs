//! One module per quantization family. ggml formats expose row functions (a row is a whole
//! number of blocks and nothing else); the bitsandbytes / int8 / fp8 families keep per-block
//! statistics beside the data and expose whole-matrix functions.

pub mod blocks;
pub mod bnb4;
pub mod bnb_dynamic;
pub mod float;
pub mod fp8;
pub mod int8;
pub mod iq4;
pub mod k_quants;
pub mod legacy;
pub mod legacy_avx2;
pub mod legacy_imatrix;
pub mod legacy_neon;
pub mod simd;

use crate::qtype::QType;

/// Quantize one row of a ggml-layout qtype, bit-exact with libggml's `ggml_quantize_chunk`
/// (with `imatrix` = its `quant_weights`). On x86-64 with AVX2 the legacy formats run the same
/// scalar source compiled for AVX2 (see `simd.rs`); results are identical by construction (Rust
/// never contracts a*b+c into an FMA) and tested against the forced scalar path.
pub fn ggml_quantize_row(qtype: QType, x: &[f32], out: &mut [u8], imatrix: Option<&[f32]>) {
    #[cfg(target_arch = "x86_64")]
    if imatrix.is_none() && simd::legacy_avx2(qtype) {
        // SAFETY: legacy_avx2 returned true only after runtime detection of AVX2 and F16C,
        // the features the callee is compiled for.
        unsafe { simd::quantize_row_legacy_avx2(qtype, x, out) };
        return;
    }
    #[cfg(target_arch = "aarch64")]
    if imatrix.is_none() && simd::legacy_neon(qtype) {
        match qtype {
            QType::Q8_0 => legacy_neon::quantize_row_q8_0(x, out),
            _ => legacy_neon::quantize_row_q4_0(x, out),
        }
        return;
    }
    ggml_quantize_row_scalar(qtype, x, out, imatrix)
}

/// The scalar reference of every ggml-layout qtype.
#[inline(always)]
pub fn ggml_quantize_row_scalar(qtype: QType, x: &[f32], out: &mut [u8], imatrix: Option<&[f32]>) {
    use QType::*;
    match (qtype, imatrix) {
        (F32 | F16 | BF16, _) => float::quantize_row(qtype, x, out),
        (Q4_0, None) => legacy::quantize_row_q4_0_ref(x, out),
        (Q4_1, None) => legacy::quantize_row_q4_1_ref(x, out),
        (Q5_0, None) => legacy::quantize_row_q5_0_ref(x, out),
        (Q5_1, None) => legacy::quantize_row_q5_1_ref(x, out),
        (Q4_0, Some(w)) => legacy_imatrix::quantize_row_q4_0_impl(x, out, w),
        (Q4_1, Some(w)) => legacy_imatrix::quantize_row_q4_1_impl(x, out, w),
        (Q5_0, Some(w)) => legacy_imatrix::quantize_row_q5_0_impl(x, out, w),
        (Q5_1, Some(w)) => legacy_imatrix::quantize_row_q5_1_impl(x, out, w),
        // ggml's q8_0 has no importance-weighted variant: quant_weights are ignored.
        (Q8_0, _) => legacy::quantize_row_q8_0_ref(x, out),
        (Q2K | Q3K | Q4K | Q5K | Q6K, w) => k_quants::quantize_row(qtype, x, out, w),
        (IQ4NL | IQ4XS, w) => iq4::quantize_row(qtype, x, out, w),
        (NF4 | FP4 | Int8 | Fp8E4M3 | Fp8E5M2, _) => {
            unreachable!("{qtype:?} is not a ggml row format")
        }
    }
}

/// Dequantize one row of a ggml-layout qtype (bit-exact with gguf-py's `dequantize`).
pub fn ggml_dequantize_row(qtype: QType, data: &[u8], y: &mut [f32]) {
    use QType::*;
    match qtype {
        F32 | F16 | BF16 => float::dequantize_row(qtype, data, y),
        Q4_0 => legacy::dequantize_row_q4_0(data, y),
        Q4_1 => legacy::dequantize_row_q4_1(data, y),
        Q5_0 => legacy::dequantize_row_q5_0(data, y),
        Q5_1 => legacy::dequantize_row_q5_1(data, y),
        Q8_0 => legacy::dequantize_row_q8_0(data, y),
        Q2K | Q3K | Q4K | Q5K | Q6K => k_quants::dequantize_row(qtype, data, y),
        IQ4NL | IQ4XS => iq4::dequantize_row(qtype, data, y),
        NF4 | FP4 | Int8 | Fp8E4M3 | Fp8E5M2 => unreachable!("{qtype:?} is not a ggml row format"),
    }
}
