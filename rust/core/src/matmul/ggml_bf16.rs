//! Where the ggml formats leave their int8 paths for the bf16 GEMM on AMX tiles
//! (`gemm_bf16.rs` with `x86/decode16_ggml.rs`): the measured row counts, the
//! `FERROQUANT_GGML_BF16` switch, and (tests) a per-thread switch back to the int8 paths.

#[cfg(target_arch = "x86_64")]
use super::*;
use crate::qtype::QType;

/// The number of activation rows from which `qtype` (one of the ggml formats: q4_0, q4_1, q5_0,
/// q5_1, q8_0, iq4_nl, q2_k..q6_k, iq4_xs) takes the bf16 GEMM on AMX tiles instead of its int8
/// paths (`x86/decode16_ggml.rs`: the format's dequantized values rounded to bf16, activations
/// rounded to bf16, the tiles' f32 sums: within `x86::amx_bf16::error_bound` of the float64
/// product, no longer the q8 activations' bits), or 0 where it does not (no AMX bf16, another
/// format, or `FERROQUANT_GGML_BF16=0`). On by default where AMX bf16 is usable.
pub fn ggml_bf16_min_m(qtype: QType, k: usize) -> usize {
    #[cfg(test)]
    if GGML_INT8.with(|c| c.get()) {
        return 0;
    }
    #[cfg(target_arch = "x86_64")]
    if x86::decode16_ggml::takes(qtype)
        && super::bf16_gemm_min_m() > 0
        && x86::amx_bf16::use_amx(usize::MAX)
    {
        // On by default (unset, "1" or anything not a number: the measured thresholds);
        // "0" off; a number n >= 2: from n rows. (Session 14 kept it opt-in over a "run-to-run
        // difference" that was two different attention paths, not this route: issue 19,
        // tests/test_kv_attention.py::test_fast_decode_false_keeps_the_dequantizing_path_*.)
        #[cfg(test)]
        if let Some(n) = GGML_FROM.with(|c| c.get()) {
            return n.max(x86::amx_bf16_small::MIN_M);
        }
        return match crate::config::ggml_bf16() {
            Some(0) => 0,
            None | Some(1) => ggml_bf16_default_min_m(qtype, k),
            Some(n) => n.max(x86::amx_bf16_small::MIN_M),
        };
    }
    let _ = (qtype, k);
    0
}

#[cfg(test)]
thread_local! {
    /// (tests) The ggml formats keep their int8 paths on this thread (`GgmlInt8`).
    static GGML_INT8: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

#[cfg(all(test, target_arch = "x86_64"))]
thread_local! {
    /// (tests) The ggml formats take the bf16 GEMM from this many rows on this thread
    /// (`GgmlBf16From`).
    static GGML_FROM: std::cell::Cell<Option<usize>> = const { std::cell::Cell::new(None) };
}

/// (tests) While it lives, `qmatmul` calls made on this thread send the ggml formats to the
/// bf16 GEMM from `n` rows (at least `amx_bf16_small::MIN_M`; where AMX bf16 runs), as
/// `FERROQUANT_GGML_BF16=n` does, so the small-M tiles' tests reach them.
#[cfg(all(test, target_arch = "x86_64"))]
pub(crate) struct GgmlBf16From(());

#[cfg(all(test, target_arch = "x86_64"))]
impl GgmlBf16From {
    pub(crate) fn new(n: usize) -> Self {
        GGML_FROM.with(|c| c.set(Some(n)));
        Self(())
    }
}

#[cfg(all(test, target_arch = "x86_64"))]
impl Drop for GgmlBf16From {
    fn drop(&mut self) {
        GGML_FROM.with(|c| c.set(None));
    }
}

/// (tests) While it lives, `qmatmul` calls made on this thread keep the ggml formats on their
/// int8 paths at every M (as `FERROQUANT_GGML_BF16=0` and CPUs without AMX do), so the tests
/// of those paths' bits still reach them on a CPU with AMX.
#[cfg(test)]
pub(crate) struct GgmlInt8(());

#[cfg(test)]
impl GgmlInt8 {
    pub(crate) fn new() -> Self {
        GGML_INT8.with(|c| c.set(true));
        Self(())
    }
}

#[cfg(test)]
impl Drop for GgmlInt8 {
    fn drop(&mut self) {
        GGML_INT8.with(|c| c.set(false));
    }
}

/// Each ggml format's row count for `ggml_bf16_min_m` at K = `k`, measured against its int8
/// paths (AMX int8 tiles or the AVX-512 GEMM for the 32-weight formats; the K-quants:
/// `k_route`'s table, against their AMX int8 tiles and the VNNI GEMM).
/// Session 16 (the decode's per-chunk `QType::info` searches gone: the route 25-35 % faster at
/// M = 32-64), one thread, CPU time, 2026-12-07 10:57-11:01 UTC, load 23-27, in-process A/B
/// against main's library (`benches/RESULTS.md`, session 16: the ggml bf16 route), bf16 / int8
/// time (medians), 4096x14336 / 14336x4096: at M = 32 0.98-1.39x (4096x14336); at 48
/// 0.79-0.99x / 0.74-0.99x. q5_1 (session 17, `benches/bench_matmul.py ... --ggml-int8`, one
/// thread, CPU time, load 25, 4096x14336 / 14336x4096): its AMX int8 tiles (`gemm_amx.rs`)
/// 16.6 / 15.4 ms at M = 48 against the route's 17.8 / 16.9 (main's build: 16.8 / 16.9
/// against 19.7 / 19.6); at 64 20.1 / 18.8 against 18.7 / 21.3 (main's: 20.8 / 20.7
/// against 19.6 / 21.0; the A/B run of 14:06-14:11 UTC: 20.4 / 18.8 against main's route
/// 18.5 / 18.1); at 128 35.0 / 34.1 against 24.4 / 24.3. So from 64 rows at every K (at
/// 14336x4096, M = 64 the two are within the runs' noise). Session 19 (after session 18's
/// 32-weight decode, `x86/decode16_ggml/w32.rs`; `FERROQUANT_GGML_BF16=32 python
/// benches/bench_matmul.py --m 32,48 --qtypes q5_1 --runs 3 --threads 1 --cpu-time --budget 0.3
/// --rotate-mb 200 --ggml-int8 --no-torch`, 2026-12-07 20:13-20:15 UTC, load 21): at M = 48
/// the route 15.5 / 15.5 ms against the tiles' 18.9 / 18.8 (at 64, 17.0 / 17.2 against 23.7 /
/// 21.8; at 32 14.0 / 14.9 against 14.2 / 13.0). So q5_1 from 48 too.
#[cfg(target_arch = "x86_64")]
fn ggml_bf16_default_min_m(qtype: QType, k: usize) -> usize {
    match super::k_route::k_route(qtype, k) {
        Some(r) => r.bf16,
        None => 48,
    }
}
