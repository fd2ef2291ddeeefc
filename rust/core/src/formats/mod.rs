//! One module per quantization family. ggml formats expose row functions (a row is a whole
//! number of blocks and nothing else); the bitsandbytes / int8 / fp8 families keep per-block
//! statistics beside the data and expose whole-matrix functions.

pub mod blocks;
pub mod bnb4;
pub mod bnb_dynamic;
pub mod float;
pub mod fp8;
pub mod gint;
pub mod int8;
pub mod iq4;
pub mod k_quants;
pub mod legacy;
pub mod legacy_avx2;
pub mod legacy_imatrix;
pub mod legacy_neon;
pub mod tensor;

use crate::qtype::QType;

/// Whether `ggml_quantize_row` takes `legacy_neon.rs` for `qtype` (q8_0 and q4_0 on aarch64).
#[cfg(target_arch = "aarch64")]
#[inline]
pub fn legacy_neon(qtype: QType) -> bool {
    matches!(qtype, QType::Q4_0 | QType::Q8_0) && crate::cpu::has_neon()
}

/// Whether `quantize_row_legacy_avx2` may be called for `qtype`.
#[cfg(target_arch = "x86_64")]
#[inline]
pub fn legacy_avx2(qtype: QType) -> bool {
    use QType::*;
    matches!(qtype, Q4_0 | Q4_1 | Q5_0 | Q5_1 | Q8_0 | F16 | BF16) && crate::cpu::has_avx2()
}

/// The legacy quantizers for AVX2 + F16C: hand-vectorised q8_0 and q4_0 (`legacy_avx2.rs`),
/// the other references compiled a second time for AVX2: the same scalar sequence (no
/// fast-math, no FMA contraction in Rust), so identical bytes; tests compare them with the
/// forced scalar path (`FERROQUANT_FORCE_SCALAR=1`).
///
/// # Safety
/// The CPU must support AVX2 and F16C (checked by `legacy_avx2`).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,f16c")]
pub unsafe fn quantize_row_legacy_avx2(qtype: QType, x: &[f32], out: &mut [u8]) {
    match qtype {
        // SAFETY: the caller guarantees AVX2 and F16C, all the AVX2 quantizers need; they
        // check the lengths of x and out themselves.
        QType::Q8_0 => unsafe { legacy_avx2::quantize_row_q8_0(x, out) },
        // SAFETY: as for q8_0.
        QType::Q4_0 => unsafe { legacy_avx2::quantize_row_q4_0(x, out) },
        _ => ggml_quantize_row_scalar(qtype, x, out, None),
    }
}

/// ggml's `quantize_row_q8_0_ref` into blocks (the activations of `matmul` and the runtime):
/// the AVX2 quantizer where it runs (bit-identical, tested against the reference), else the
/// reference.
pub fn quantize_row_q8_0_blocks(x: &[f32], out: &mut [blocks::BlockQ8_0]) {
    #[cfg(target_arch = "x86_64")]
    if legacy_avx2(QType::Q8_0) {
        // SAFETY: legacy_avx2 checked AVX2 and F16C; `out` is x.len() / 32 blocks of 34 bytes,
        // the bytes quantize_row_q8_0 writes for x.
        unsafe { quantize_row_legacy_avx2(QType::Q8_0, x, bytemuck::cast_slice_mut(out)) };
        return;
    }
    legacy::quantize_row_q8_0_ref(x, bytemuck::cast_slice_mut(out));
}

/// Quantize one row of a ggml-layout qtype, bit-exact with libggml's `ggml_quantize_chunk`
/// (with `imatrix` = its `quant_weights`). On x86-64 with AVX2 the legacy formats run the same
/// scalar source compiled for AVX2 (`quantize_row_legacy_avx2`); results are identical by construction (Rust
/// never contracts a*b+c into an FMA) and tested against the forced scalar path.
pub fn ggml_quantize_row(qtype: QType, x: &[f32], out: &mut [u8], imatrix: Option<&[f32]>) {
    #[cfg(target_arch = "x86_64")]
    if imatrix.is_none() && legacy_avx2(qtype) {
        // SAFETY: legacy_avx2 returned true only after runtime detection of AVX2 and F16C,
        // the features the callee is compiled for.
        unsafe { quantize_row_legacy_avx2(qtype, x, out) };
        return;
    }
    #[cfg(target_arch = "aarch64")]
    if imatrix.is_none() && legacy_neon(qtype) {
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
        (NF4 | FP4 | Int8 | Fp8E4M3 | Fp8E5M2 | GInt(_), _) => {
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
        NF4 | FP4 | Int8 | Fp8E4M3 | Fp8E5M2 | GInt(_) => {
            unreachable!("{qtype:?} is not a ggml row format")
        }
    }
}
