//! CPU feature detection, the one place that asks the CPU what it has (`is_*_feature_detected`)
//! and applies `FERROQUANT_FORCE_SCALAR` (`config::force_scalar`). Every fast path in `formats`,
//! `matmul` and `runtime` is chosen by one of these functions, and every `unsafe` call of a
//! `#[target_feature]` function cites the one that checked its features.
//!
//! Each answer is computed once per process. The `has_*` functions are false when
//! FERROQUANT_FORCE_SCALAR is set; `avx2_detected` is the bare CPU fact, for the few callers
//! that must keep an explicitly requested AVX2 path callable (tests of the K-quant paths) or
//! whose fast path does not follow the switch (bnb4's block quantizer, bit-exact either way).
//!
//! x86-64 levels, each implying the ones above it where it says so:
//! - `has_avx2`: AVX2 + F16C (legacy quantizers, the AVX2 matmul kernels, runtime ops),
//! - `has_fma`: `has_avx2` + FMA (float-activation and q16 AVX2 kernels),
//! - `has_avx512`: `has_fma` + AVX-512 F/BW/VL (fp8 / nf4 / int8 AVX-512 kernels),
//! - `has_avx512_bf16`: `has_avx512` + AVX-512 BF16 (the bf16 GEMM, `matmul/x86/gemm16.rs`),
//! - `has_vnni`: `has_avx2` + AVX-512 VL/VNNI (32-weight integer dots, tiles, runtime panels),
//! - `has_vnni_bw`: `has_vnni` + AVX-512 F/BW (the K-quant row kernel, `x86/row_k/vnni.rs`),
//! - `has_vnni_q16`: `has_vnni_bw` + `has_fma` (nf4 / int8 AVX-512, `x86/q16.rs`),
//! - `has_vbmi_gfni`: `has_vnni` + AVX-512 BW/VBMI + GFNI (32-weight row kernel, `x86/row32.rs`),
//! - `has_avx_vnni`: `has_avx2` + AVX-VNNI (256-bit `vpdpbusd`, the GEMM of CPUs without
//!   AVX-512: `matmul/x86/gemm32_avx2.rs`).
//!
//! `FERROQUANT_MAX_ISA` (`config::max_isa`) caps them: "avx2" makes `has_avx512`, `has_vnni`
//! and `has_avx_vnni` (and every level built on them) false, "avxvnni" the AVX-512 ones,
//! "avx512" only AMX (`amx::amx_int8_usable`, `amx::amx_bf16_usable`).
//!
//! aarch64: `has_neon` (NEON, the baseline; false only when forced scalar) and `has_dotprod`
//! (`has_neon` + the Armv8.2 dot product, `sdot`).

use std::sync::OnceLock;

pub use crate::config::force_scalar;

/// Memoise a feature test (one `OnceLock` per call site of the macro).
macro_rules! once {
    ($e:expr) => {{
        static F: OnceLock<bool> = OnceLock::new();
        *F.get_or_init(|| $e)
    }};
}

#[cfg(target_arch = "x86_64")]
macro_rules! x86 {
    ($($f:tt),+) => { $(std::arch::is_x86_feature_detected!($f))&&+ };
}

/// The CPU has AVX2 (whatever FERROQUANT_FORCE_SCALAR says).
#[cfg(target_arch = "x86_64")]
pub fn avx2_detected() -> bool {
    once!(x86!("avx2"))
}

/// AVX2 and F16C, not forced scalar.
#[cfg(target_arch = "x86_64")]
pub fn has_avx2() -> bool {
    once!(!force_scalar() && x86!("avx2", "f16c"))
}

/// `has_avx2` and FMA.
#[cfg(target_arch = "x86_64")]
pub fn has_fma() -> bool {
    once!(has_avx2() && x86!("fma"))
}

/// `has_fma` and AVX-512 F, BW and VL.
#[cfg(target_arch = "x86_64")]
pub fn has_avx512() -> bool {
    once!(has_fma() && avx512_allowed() && x86!("avx512f", "avx512bw", "avx512vl"))
}

/// `has_avx512` and AVX-512 BF16 (the bf16 GEMM, `matmul/x86/gemm16.rs`).
#[cfg(target_arch = "x86_64")]
pub fn has_avx512_bf16() -> bool {
    once!(has_avx512() && x86!("avx512bf16"))
}

/// `has_avx2` and AVX-512 VNNI and VL.
#[cfg(target_arch = "x86_64")]
pub fn has_vnni() -> bool {
    once!(has_avx2() && avx512_allowed() && x86!("avx512vnni", "avx512vl"))
}

/// `has_vnni` and AVX-512 F and BW.
#[cfg(target_arch = "x86_64")]
pub fn has_vnni_bw() -> bool {
    once!(has_vnni() && x86!("avx512f", "avx512bw"))
}

/// `has_vnni_bw` and FMA.
#[cfg(target_arch = "x86_64")]
pub fn has_vnni_q16() -> bool {
    once!(has_vnni_bw() && has_fma())
}

/// The CPU's vendor string is "GenuineIntel" (memory-side tuning that differs between
/// Intel and AMD parts, e.g. `matmul`'s M = 1 row lengths, keys on it).
#[cfg(target_arch = "x86_64")]
pub fn is_intel() -> bool {
    once!({
        let r = std::arch::x86_64::__cpuid(0);
        (r.ebx, r.edx, r.ecx) == (0x756e_6547, 0x4965_6e69, 0x6c65_746e)
    })
}

/// `has_vnni` and AVX-512 BW and VBMI and GFNI.
#[cfg(target_arch = "x86_64")]
pub fn has_vbmi_gfni() -> bool {
    once!(has_vnni() && x86!("avx512bw", "avx512vbmi", "gfni"))
}

/// No `FERROQUANT_MAX_ISA` cap below AVX-512 ("avx512" only turns AMX off, `amx.rs`).
#[cfg(target_arch = "x86_64")]
fn avx512_allowed() -> bool {
    matches!(crate::config::max_isa(), None | Some("avx512"))
}

/// `has_avx2` and AVX-VNNI (unless `FERROQUANT_MAX_ISA=avx2`).
#[cfg(target_arch = "x86_64")]
pub fn has_avx_vnni() -> bool {
    once!(has_avx2() && crate::config::max_isa() != Some("avx2") && x86!("avxvnni"))
}

/// NEON, not forced scalar.
#[cfg(target_arch = "aarch64")]
pub fn has_neon() -> bool {
    once!(!force_scalar() && std::arch::is_aarch64_feature_detected!("neon"))
}

/// `has_neon` and `dotprod` (`sdot`).
#[cfg(target_arch = "aarch64")]
pub fn has_dotprod() -> bool {
    once!(has_neon() && std::arch::is_aarch64_feature_detected!("dotprod"))
}

/// The best instruction set the quantizers use: "avx2"; on aarch64 "neon+dotprod" or "neon";
/// or "scalar" (`_native.simd_level()`). The quantizers' x86 paths stop at AVX2, so this is
/// `kernel_level` with every x86 level named "avx2".
pub fn level() -> &'static str {
    match kernel_level() {
        "amx-int8" | "avx512-vnni" | "avx512" | "avx2" => "avx2",
        "neon-dotprod" => "neon+dotprod",
        other => other,
    }
}

/// The widest instruction set the quantized matmul kernels (and the runtime on them) use:
/// "amx-int8" (the 32-weight formats' GEMM on AMX int8 tiles, `amx::amx_int8_usable`; the
/// rest as "avx512-vnni"), "avx512-vnni" (integer dots, tiles and runtime panels in AVX-512
/// VNNI), "avx512" (the
/// AVX-512 float kernels, integer dots in AVX2), "avx2", "neon-dotprod" (`sdot`), "neon"
/// (Armv8.0 `smull`) or "scalar" (the references). `_native.kernel_simd_level()`.
pub fn kernel_level() -> &'static str {
    #[cfg(target_arch = "x86_64")]
    {
        if has_vnni() && crate::amx::amx_int8_usable() {
            return "amx-int8";
        } else if has_vnni() {
            return "avx512-vnni";
        } else if has_avx512() {
            return "avx512";
        } else if has_avx2() {
            return "avx2";
        }
    }
    #[cfg(target_arch = "aarch64")]
    if has_dotprod() {
        return "neon-dotprod";
    } else if has_neon() {
        return "neon";
    }
    "scalar"
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn levels_agree_with_force_scalar() {
        assert_eq!(level() == "scalar", kernel_level() == "scalar");
        if force_scalar() {
            assert_eq!(kernel_level(), "scalar");
        }
        #[cfg(target_arch = "x86_64")]
        {
            assert!(!has_vnni_q16() || (has_vnni_bw() && has_fma() && has_avx512()));
            assert!(!has_vbmi_gfni() || has_vnni());
            assert_eq!(
                matches!(kernel_level(), "avx512-vnni" | "amx-int8"),
                has_vnni()
            );
            assert_eq!(
                kernel_level() == "amx-int8",
                has_vnni() && crate::amx::amx_int8_usable()
            );
        }
    }
}
