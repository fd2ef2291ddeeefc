//! Every environment switch the Rust core reads, one function each; no other module calls
//! `std::env::var` for a `FERROQUANT_*` variable.
//!
//! | variable | read | effect |
//! | --- | --- | --- |
//! | `FERROQUANT_FORCE_SCALAR` | once per process | anything but "" or "0": every kernel and quantizer runs its scalar reference (`cpu` reports no SIMD) |
//! | `FERROQUANT_NUM_THREADS` | when the pool is first built | threads of the rayon pool (`parallel`); unset, 0 or not a number: all cores |
//! | `FERROQUANT_MAX_ISA` | once per process | x86-64: "avx2" (AVX2 / FMA / F16C only: no AVX-512, no AVX-VNNI), "avxvnni" (no AVX-512) or "avx512" (no AMX) caps the kernels below what the CPU has, to run and measure the paths of older CPUs; aarch64: "neon" (no `sdot`, no `smmla`) or "dotprod" (no `smmla`); unset or anything else: no cap |
//! | `FERROQUANT_AVX2_GEMM` | at every qmatmul call that would take it | "0": the 32-weight formats' GEMM of CPUs without AVX-512 (`matmul/gemm_avx2.rs`) is off and the row kernels run (for benchmarks: `bench_matmul.py --avx2-rows`) |
//! | `FERROQUANT_NEON_GEMM` | at every qmatmul call that would take it | "0": the 32-weight formats' GEMM of aarch64 (`matmul/gemm_neon.rs`) is off and the row kernels run (to compare them: `benches/aarch64_insns`) |
//! | `FERROQUANT_GGML_BF16` | at every qmatmul call that would take it | unset, "1" or not a number: the ggml formats take the bf16 GEMM on AMX tiles (`matmul::ggml_bf16_min_m`, where AMX bf16 is usable) from each format's measured threshold (48 rows; q6_k 64: `matmul/k_route.rs`); a number n >= 2: from n rows (at least 8, `amx_bf16_small::MIN_M`: 8 to 16 rows on the small-M tiles); "0": never (their int8 paths at every M, as on CPUs without AMX bf16) |
//! | `FERROQUANT_K_TILES` | at every qmatmul call that would take them | a number n: the K-quants (q2_k..q6_k, iq4_xs) take the AMX int8 tiles (`matmul/gemm_amx_k.rs`, where AMX int8 is usable) from n rows (at least 4, the VNNI GEMM's start) instead of `matmul/k_route.rs`'s measured `tiles`; "0": never (the VNNI GEMM below the bf16 route); unset or not a number: the table (for benchmarks) |
//! | `FERROQUANT_TILES32` | at every qmatmul call that would take them | a number n: the 32-weight formats (q4_0, q4_1, q5_0, q5_1, q8_0, iq4_nl) take the AMX int8 tiles (`matmul/gemm_amx.rs`, where AMX int8 is usable) from n rows (at least 4, the AVX-512 GEMM's start) instead of `gemm_amx::min_m`'s table; "0": never (the AVX-512 GEMM); unset or not a number: the table (for benchmarks) |
//! | `FERROQUANT_M1_RUNS` | at every multi-threaded M = 1 qmatmul call | "0": the threads claim the weight rows' tasks one by one from a shared counter (the split before session 17) instead of a contiguous run of tasks each (`parallel::for_each_chunk_mut_in_runs`); same bits (for `benches/bench_matmul.py --one-by-one`) |
//! | `FERROQUANT_RUNTIME_PACK` | at every model load | "0": the runtime keeps its q8_0 / q4_K / q6_K matrices as stored instead of 8-row panels (only x86-64 with AVX-512 VNNI packs) |
//! | `FERROQUANT_EXPECT_DOTPROD` | tests (aarch64) | "1" / "0": the NEON tests fail unless `dotprod` is / is not in use (qemu CPU check) |
//! | `FERROQUANT_EXPECT_I8MM` | tests (aarch64) | "1" / "0": the same for `i8mm` (the GEMM's `smmla`) |
//! | `FERROQUANT_FUZZ_SEED` | tests | seed (u64) of the GGUF mutation fuzz test |
//! | `FERROQUANT_FUZZ_ITERS` | tests | iterations of the GGUF mutation fuzz test (default 20 000) |

use std::sync::OnceLock;

fn var(name: &str) -> Option<String> {
    std::env::var(name).ok()
}

fn parsed<T: std::str::FromStr>(name: &str) -> Option<T> {
    var(name).and_then(|v| v.trim().parse().ok())
}

/// `FERROQUANT_FORCE_SCALAR`: true when set to anything but "" or "0" (read once).
pub fn force_scalar() -> bool {
    static FORCE: OnceLock<bool> = OnceLock::new();
    *FORCE.get_or_init(|| var("FERROQUANT_FORCE_SCALAR").is_some_and(|v| !v.is_empty() && v != "0"))
}

/// `FERROQUANT_MAX_ISA`: `Some("avx2")`, `Some("avxvnni")` or `Some("avx512")` (x86-64),
/// `Some("neon")` or `Some("dotprod")` (aarch64) when set to one of them (read once; `cpu` and
/// `amx` apply it).
pub fn max_isa() -> Option<&'static str> {
    static CAP: OnceLock<Option<&'static str>> = OnceLock::new();
    *CAP.get_or_init(
        || match var("FERROQUANT_MAX_ISA").as_deref().map(str::trim) {
            Some("avx2") if cfg!(target_arch = "x86_64") => Some("avx2"),
            Some("avxvnni") if cfg!(target_arch = "x86_64") => Some("avxvnni"),
            Some("avx512") if cfg!(target_arch = "x86_64") => Some("avx512"),
            Some("neon") if cfg!(target_arch = "aarch64") => Some("neon"),
            Some("dotprod") if cfg!(target_arch = "aarch64") => Some("dotprod"),
            _ => None,
        },
    )
}

/// `FERROQUANT_AVX2_GEMM`: false only when set to "0" (read at every call that asks).
pub fn avx2_gemm() -> bool {
    var("FERROQUANT_AVX2_GEMM").is_none_or(|v| v.trim() != "0")
}

/// `FERROQUANT_NEON_GEMM`: false only when set to "0" (read at every call that asks).
pub fn neon_gemm() -> bool {
    var("FERROQUANT_NEON_GEMM").is_none_or(|v| v.trim() != "0")
}

/// `FERROQUANT_GGML_BF16`: `Some(0)` for "0" (off), `Some(n)` for a number n, `None` when
/// unset or not a number (the default: on; read at every call that asks).
pub fn ggml_bf16() -> Option<usize> {
    parsed("FERROQUANT_GGML_BF16")
}

/// `FERROQUANT_K_TILES`: `Some(n)` for a number n (0: never), `None` when unset or not a
/// number (the measured table; read at every call that asks).
pub fn k_tiles() -> Option<usize> {
    parsed("FERROQUANT_K_TILES")
}

/// `FERROQUANT_TILES32`: `Some(n)` for a number n (0: never), `None` when unset or not a
/// number (`gemm_amx::min_m`'s table; read at every call that asks).
pub fn tiles32() -> Option<usize> {
    parsed("FERROQUANT_TILES32")
}

/// `FERROQUANT_M1_RUNS`: false only when set to "0" (read at every call that asks).
pub fn m1_runs() -> bool {
    var("FERROQUANT_M1_RUNS").is_none_or(|v| v.trim() != "0")
}

/// `FERROQUANT_NUM_THREADS`: the requested size of the rayon pool, if a positive integer.
pub fn num_threads() -> Option<usize> {
    parsed::<usize>("FERROQUANT_NUM_THREADS").filter(|&n| n > 0)
}

/// `FERROQUANT_RUNTIME_PACK`: false only when set to "0" (read at every call, i.e. per load).
pub fn runtime_pack() -> bool {
    match var("FERROQUANT_RUNTIME_PACK") {
        Some(v) => v.trim() != "0",
        None => true,
    }
}

/// `FERROQUANT_EXPECT_DOTPROD` (tests): `Some(true)` for "1", `Some(false)` for anything else
/// set, `None` when unset.
pub fn expect_dotprod() -> Option<bool> {
    var("FERROQUANT_EXPECT_DOTPROD").map(|v| v == "1")
}

/// `FERROQUANT_EXPECT_I8MM` (tests): as `expect_dotprod`, for `i8mm` (`cpu::has_i8mm`).
pub fn expect_i8mm() -> Option<bool> {
    var("FERROQUANT_EXPECT_I8MM").map(|v| v == "1")
}

/// `FERROQUANT_FUZZ_SEED` (tests): the fuzz seed, if set to a u64.
pub fn fuzz_seed() -> Option<u64> {
    parsed("FERROQUANT_FUZZ_SEED")
}

/// `FERROQUANT_FUZZ_ITERS` (tests): the fuzz iteration count, if set to a number.
pub fn fuzz_iters() -> Option<usize> {
    parsed("FERROQUANT_FUZZ_ITERS")
}
