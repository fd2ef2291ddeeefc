//! What the native runtime asks before it leaves its own packed kernels: whether `qmatmul`
//! takes a format on a GEMM path (and on AMX int8 tiles) for M rows on this CPU.

use super::*;

/// Whether `qmatmul` multiplies `qtype` weights on the GEMM path (x86-64: `gemm.rs`, or the
/// bf16 GEMM of `ggml_bf16_min_m`; aarch64: the NEON GEMM) for `m` activation rows on this CPU
/// (the native runtime asks before it leaves its own packed kernels). The same condition as
/// `plan`'s `gemm` / `gemm_neon` (tested).
pub fn has_gemm(qtype: QType, m: usize, k: usize) -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        (ggml_bf16_min_m(qtype, k) > 0 && m >= ggml_bf16_min_m(qtype, k))
            || (use_simd()
                && use_vnni()
                && crate::cpu::has_vnni_bw()
                && ((m >= GEMM_MIN_M
                    && matches!(
                        qtype,
                        QType::Q4_0
                            | QType::Q5_0
                            | QType::Q8_0
                            | QType::IQ4NL
                            | QType::Q4_1
                            | QType::Q5_1
                    ))
                    || (m >= gemm_k::GEMM_K_MIN_M && gemm_k::takes(qtype))))
    }
    // The NEON GEMM (`gemm_neon.rs`: the 32-weight formats and the K-quants, dotprod).
    #[cfg(target_arch = "aarch64")]
    {
        let _ = k;
        use_simd() && gemm_neon::choose(qtype, m).is_some()
    }
    #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
    {
        let _ = (qtype, m, k);
        false
    }
}

/// Whether `qmatmul` runs `qtype` weights on AMX int8 tiles for `m` activation rows on this
/// CPU (`gemm_amx::takes`; any K, in blocks of 32), where it also takes the GEMM path.
pub fn amx_int8_takes(qtype: QType, m: usize, k: usize) -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        has_gemm(qtype, m, k) && gemm_amx::takes(qtype, m)
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (qtype, m, k);
        false
    }
}
