//! Runtime selection of instruction sets. The fast paths here are the scalar references compiled
//! a second time with wider instruction sets enabled, so they compute the same scalar sequence
//! (no fast-math, no FMA contraction in Rust) and give identical bytes; tests compare them with
//! the forced scalar path (`FERROQUANT_FORCE_SCALAR=1`).

use std::sync::OnceLock;

#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
use crate::qtype::QType;

/// True when `FERROQUANT_FORCE_SCALAR` is set to anything but "" or "0" (read once).
pub fn force_scalar() -> bool {
    static FORCE: OnceLock<bool> = OnceLock::new();
    *FORCE.get_or_init(|| {
        std::env::var("FERROQUANT_FORCE_SCALAR").is_ok_and(|v| !v.is_empty() && v != "0")
    })
}

/// The best instruction set this process uses ("avx2"; on aarch64 "neon+dotprod" or "neon",
/// used there by the matmul kernels and the q8_0 / q4_0 quantizers; or "scalar").
pub fn level() -> &'static str {
    #[cfg(target_arch = "x86_64")]
    if has_avx2() {
        return "avx2";
    }
    #[cfg(target_arch = "aarch64")]
    if crate::matmul::neon::has_dotprod() {
        return "neon+dotprod";
    } else if crate::matmul::neon::enabled() {
        return "neon";
    }
    "scalar"
}

#[cfg(target_arch = "x86_64")]
pub fn has_avx2() -> bool {
    static AVX2: OnceLock<bool> = OnceLock::new();
    *AVX2.get_or_init(|| {
        !force_scalar()
            && std::arch::is_x86_feature_detected!("avx2")
            && std::arch::is_x86_feature_detected!("f16c")
    })
}

/// True when NEON paths may run (aarch64: NEON detected, FERROQUANT_FORCE_SCALAR unset).
#[cfg(target_arch = "aarch64")]
pub fn has_neon() -> bool {
    static NEON: OnceLock<bool> = OnceLock::new();
    *NEON.get_or_init(|| !force_scalar() && std::arch::is_aarch64_feature_detected!("neon"))
}

/// Whether `ggml_quantize_row` takes `legacy_neon.rs` for `qtype` (q8_0 and q4_0 on aarch64).
#[cfg(target_arch = "aarch64")]
#[inline]
pub fn legacy_neon(qtype: QType) -> bool {
    matches!(qtype, QType::Q4_0 | QType::Q8_0) && has_neon()
}

/// Whether `quantize_row_legacy_avx2` may be called for `qtype`.
#[cfg(target_arch = "x86_64")]
#[inline]
pub fn legacy_avx2(qtype: QType) -> bool {
    use QType::*;
    matches!(qtype, Q4_0 | Q4_1 | Q5_0 | Q5_1 | Q8_0 | F16 | BF16) && has_avx2()
}

/// The legacy quantizers for AVX2 + F16C: hand-vectorised q8_0 and q4_0 (`legacy_avx2.rs`),
/// the other references compiled for AVX2.
///
/// # Safety
/// The CPU must support AVX2 and F16C (checked by `legacy_avx2`).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,f16c")]
pub unsafe fn quantize_row_legacy_avx2(qtype: QType, x: &[f32], out: &mut [u8]) {
    match qtype {
        // SAFETY (both): the caller guarantees AVX2 and F16C.
        QType::Q8_0 => unsafe { super::legacy_avx2::quantize_row_q8_0(x, out) },
        QType::Q4_0 => unsafe { super::legacy_avx2::quantize_row_q4_0(x, out) },
        _ => super::ggml_quantize_row_scalar(qtype, x, out, None),
    }
}
