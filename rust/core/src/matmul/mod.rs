//! Quantized CPU matmul: `y = x · Wᵀ` with `W` (N x K, quantized, one row per output feature, in
//! ferroquant's layouts) and `x` (M x K, f32), `y` (M x N, f32).
//!
//! Each output element is one dot product computed by one fixed sequence (`reference.rs`
//! defines it; `x86.rs` computes the same bits with AVX2, plus AVX-512 VNNI integer sums for the
//! 32-weight formats and AVX-512 kernels for nf4 / int8 / fp8 where the CPU has them), so
//! results do not depend on the thread count, on M, on where an output sits in a tile, or on
//! the instruction set. Work is split over output features N through the one pool of `parallel.rs`: each task
//! owns whole weight rows and reads them from memory once. For M >= 2 a task's weights stay in
//! L2 while blocks of activation rows (sized for L2) pass; with VNNI the 32-weight formats and
//! the K-quants run tiles of 8 weight rows x a block of rows (`x86/tile.rs`, `x86/tile_k.rs`,
//! driven from `panels.rs`), the others the row kernels (up to 4 activation rows per decoded
//! weight row). From `GEMM_MIN_M` rows (AVX-512 F/BW, any K) the 32-weight
//! formats take the register-blocked GEMM of `gemm.rs` / `x86/gemm32.rs` instead, which writes
//! `out` directly; from `gemm_k::GEMM_K_MIN_M` rows the K-quants (q2_k..q6_k, iq4_xs) take
//! `gemm_k.rs` / `x86/gemm_k.rs`. Without AVX-512 VNNI the 32-weight formats take the AVX2 GEMM
//! of `gemm_avx2.rs` / `x86/gemm32_avx2.rs` (AVX-VNNI where present) from
//! `gemm_avx2::GEMM2_MIN_M` rows, q2_k..q6_k its `k` (`gemm_avx2/k.rs`) from `k::min_m`. From `GEMM16_MIN_M` rows (AVX-512 BF16, K a multiple of 32) nf4,
//! int8, fp8 and the grouped integers take the bf16 GEMM of `gemm_bf16.rs` / `x86/gemm16.rs`,
//! with its own numerics (`reference/bf16.rs`: bf16 operands, f32 sums; not the q16 / f32 ones).
//! Where AMX bf16 is usable the ggml formats (not tq*) take it too from `ggml_bf16_min_m` rows
//! (48; the K-quants by `k_route`'s table: 48, q6_k 64), their blocks decoded by `x86/decode16_ggml.rs`: from there within the tiles' bound
//! of the dequantized product, no longer the q8 activations' bits.
//! Calls under `SERIAL_WORK` multiply-adds run on the calling thread.
//! At M = 1 the row kernels `x86/row32.rs` (32-weight formats), `x86/row_k/vnni.rs` (K-quants)
//! and `x86/float_acts/avx512.rs` take AVX-512 where the CPU has it; tq1_0 / tq2_0 take
//! `x86/ternary/avx512.rs` at every M.
//! FERROQUANT_FORCE_SCALAR=1 runs the references. On aarch64 `neon.rs` computes the same bits
//! with NEON (`sdot` where the CPU has `dotprod`), and from `gemm_neon::GEMM_NEON_MIN_M` rows
//! the 32-weight formats take the NEON GEMM of `gemm_neon.rs` / `neon/gemm.rs` (`sdot` by
//! element, `smmla` with `i8mm`), the K-quants that of `gemm_neon_k.rs` / `neon/gemm_k.rs`;
//! other architectures run the references.
//!
//! Files: this one (the driver: `qmatmul`, the task split), `fill.rs` (`Plan::fill`: one task
//! of the row kernels / tiles), `plan.rs` (every check, the kernel choice), `acts_quant.rs` (the
//! activations quantized once per call), `dispatch.rs` (one weight row against activation rows,
//! per format, to the kernel the CPU has), `gint_fused.rs` (the fused grouped-integer kernel's
//! driver), `panels.rs` (the tile panels), `gemm.rs` (the GEMM path's driver), `gemm_bf16.rs`
//! (the bf16 GEMM's driver), `gemm_takes.rs` (which path the native runtime can count on),
//! `neon_walk.rs` (the NEON GEMMs' shared walk), `out_ptr.rs` (the shared output),
//! `aligned.rs` (aligned activation buffers).
//!
//! Supported weight formats and the activation each uses:
//! q4_0, q5_0, q8_0, iq4_nl → activations quantized to q8_0 (ggml's `vec_dot_type`);
//! q4_1, q5_1 → activations quantized to q8_1 (q8_0 plus `s = d·Σq`, for the `m·Σx` term);
//! q2_k, q3_k, q4_k, q5_k, q6_k, iq4_xs, tq1_0, tq2_0 → activations quantized to q8_K;
//! nf4, int8 → activations quantized to 16 bits in blocks of 64 (`reference/q16.rs`);
//! grouped integers (`formats/gint.rs`) → the same q16 activations: at 4 and 8 bits with AVX-512
//! VNNI the codes read in place by `x86/gint.rs` (arithmetic: `reference/gint.rs`, a float zero
//! term per group); otherwise each weight row decoded to int8 `q - z` with its group scales
//! (`Plan::dots_gint`), then the int8 kernels;
//! fp8_e4m3, fp8_e5m2 → f32 activations (the dequantized product within float rounding, fp8
//! decoded exactly; no activation error added to the weights').

pub mod bandwidth;
pub mod bf16_io;
#[cfg(target_arch = "x86_64")]
mod panels;
pub mod reference;
#[cfg(target_arch = "x86_64")]
pub mod x86;

#[cfg(target_arch = "aarch64")]
pub mod neon;

use crate::error::Result;
use crate::formats::blocks::*;
use crate::formats::tensor::QuantizedView;
use crate::parallel;
use crate::qtype::QType;
use reference::BlockQ8K;

/// The weight qtypes `qmatmul` accepts.
pub const SUPPORTED: [QType; 18] = [
    QType::Q4_0,
    QType::Q4_1,
    QType::Q5_0,
    QType::Q5_1,
    QType::Q8_0,
    QType::IQ4NL,
    QType::Q2K,
    QType::Q3K,
    QType::Q4K,
    QType::Q5K,
    QType::Q6K,
    QType::IQ4XS,
    QType::TQ1_0,
    QType::TQ2_0,
    QType::NF4,
    QType::Int8,
    QType::Fp8E4M3,
    QType::Fp8E5M2,
];

/// True when `qmatmul` takes `qtype` weights: `SUPPORTED` and the grouped integers.
pub fn supports(qtype: QType) -> bool {
    SUPPORTED.contains(&qtype) || qtype.gint().is_some()
}

/// The number of activation rows from which nf4, int8, fp8 and the grouped integers take the
/// bf16 GEMM (`reference::bf16`'s numerics) on this CPU, or 0 where it has no such path.
pub fn bf16_gemm_min_m() -> usize {
    #[cfg(target_arch = "x86_64")]
    if crate::cpu::has_avx512_bf16() && x86::gemm16::semantics_hold() {
        // (from fewer rows where the small-M tiles run: `x86::amx_bf16_small`)
        if x86::amx_bf16_small::use_small(x86::amx_bf16_small::MIN_M) {
            return x86::amx_bf16_small::MIN_M.min(GEMM16_MIN_M);
        }
        return GEMM16_MIN_M;
    }
    #[cfg(target_arch = "x86_64")]
    return gemm_bf16_avx2::min_m();
    #[cfg(not(target_arch = "x86_64"))]
    0
}

/// The number of activation rows from which that bf16 GEMM runs on AMX tiles instead
/// (`x86/amx_bf16.rs`: the same roundings, the tiles' own summation order, a float64 bound
/// instead of `reference::bf16`'s bits), or 0 where it does not.
pub fn bf16_amx_min_m() -> usize {
    #[cfg(target_arch = "x86_64")]
    if bf16_gemm_min_m() > 0 && x86::amx_bf16::use_amx(usize::MAX) {
        return x86::amx_bf16_small::MIN_M.min(x86::amx_bf16::AMX_BF16_MIN_M);
    }
    0
}

/// The activations, prepared once per call (one row of x per `m`).
enum Acts<'a> {
    Q8_0 {
        blocks: Vec<BlockQ8_0>,
        /// Each block's scale as f32, and the sum of its 32 quants.
        d: Vec<f32>,
        sums: Vec<i32>,
        /// The quants interleaved for the tile kernels (`x86::tile::interleave_q8_0`), one row
        /// after the other, or for the M = 1 row kernel (`x86::row32::interleave`); empty when
        /// neither runs.
        #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
        xt: Vec<u8>,
        /// `-BIAS · sums` for the row kernel (`x86::row32::RowQ8::nbias`); empty otherwise.
        #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
        nbias: Vec<i32>,
        /// The GEMM path with K not a multiple of 256: each row's last `nb % 8` blocks in the
        /// narrow layout of `x86::gemm32::interleave_tail`, one row after the other; empty
        /// otherwise.
        #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
        xtail: Vec<u8>,
    },
    Q8K {
        blocks: Vec<BlockQ8K>,
        /// Interleaved for the tile kernels (`x86::tile_k::interleave_q8_k`); empty otherwise.
        #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
        xq: Vec<u8>,
        #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
        xs: Vec<i32>,
        #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
        xd: Vec<f32>,
        /// The q4_k / q5_k / q6_k row kernels with AVX-512: the blocks as
        /// `x86::interleave_k4` lays them out (`x86::XZ_BLOCK` bytes a block, one row after the
        /// other, on 64-byte boundaries); empty otherwise.
        xz: Vec<Line64>,
    },
    /// q8_1 (for q4_1 / q5_1): q8_0's fields plus each block's `s` as f32.
    Q8_1 {
        blocks: Vec<BlockQ8_0>,
        d: Vec<f32>,
        sums: Vec<i32>,
        s: Vec<f32>,
        /// Interleaved for the tile kernel as q8_0's `xt`, or for the M = 1 row kernel
        /// (`x86::row32::interleave`); empty when neither runs.
        #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
        xt: Vec<u8>,
        /// The row kernel's `-BIAS · sums` (zeros: BIAS is 0 for q4_1 / q5_1); empty otherwise.
        #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
        nbias: Vec<i32>,
        /// As q8_0's `xtail`.
        #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
        xtail: Vec<u8>,
    },
    /// nf4, int8: each row quantized to 16 bits (`reference::q16`), `row` values a row (K
    /// rounded up to 64, zero padded; for the AVX-512 nf4 kernel each 64 split into even and
    /// odd elements: `x86::q16::split_nf4_x`), and `blocks` scales a row in `d`.
    Q16 {
        q: Vec<Line64>,
        d: Vec<f32>,
        row: usize,
        blocks: usize,
    },
    F32(&'a [f32]),
    /// x as the AVX-512 kernels read it, 64-byte aligned (`x86::permute_nf4_x`,
    /// `x86::scale_e4m3_x`, `x86::align_x`).
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    F32Prepared(AlignedX),
}

/// Everything one dot product needs, checked once.
struct Plan<'a> {
    w: &'a QuantizedView<'a>,
    m: usize,
    k: usize,
    /// Activation rows per cache block.
    m_block: usize,
    /// The tiled kernels (`x86::tile`) run: 32-weight formats, VNNI, M >= 2.
    tile: bool,
    /// The GEMM path (`gemm.rs`) runs: the 32-weight formats with AVX-512 F/BW/VL/VNNI, M >=
    /// `GEMM_MIN_M`, K a multiple of 256.
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    gemm: bool,
    /// The GEMM path's whole panels of 16 weight rows run on AMX int8 tiles (`gemm_amx.rs`),
    /// with these activations.
    #[cfg(target_arch = "x86_64")]
    amx: Option<x86::amx32::AmxX>,
    /// The K-quants' GEMM runs on AMX int8 tiles (`gemm_amx_k.rs`), with these activations.
    #[cfg(target_arch = "x86_64")]
    amx_k: Option<x86::amx_k::AmxXK>,
    /// The GEMM path without AVX-512 (`gemm_avx2.rs`) runs, with this integer product.
    #[cfg(target_arch = "x86_64")]
    gemm2: Option<gemm_avx2::Int8Dot>,
    /// The aarch64 GEMM path (`gemm_neon.rs`) runs, with this integer product.
    #[cfg(target_arch = "aarch64")]
    gemm_neon: Option<neon::gemm::NeonDot>,
    /// The M = 1 row kernel `x86::row32` runs (q4_0, q5_0, q8_0, iq4_nl, q4_1, q5_1 with
    /// AVX-512 VBMI).
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    row32: bool,
    /// M = 1 without AVX-512 VNNI: `x86::row32_avx2` (q4_0, q5_0, iq4_nl, q4_1, q5_1).
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    row32_avx2: bool,
    row_bytes: usize,
    acts: Acts<'a>,
    /// nf4 / int8: statistics per weight row, and the weights sharing one of them.
    stats_per_row: usize,
    block_len: usize,
    simd: bool,
    /// fp8: the AVX-512 kernels run (`cpu::has_avx512`; x prepared for them); nf4 / int8: the
    /// AVX-512 q16 kernels (`x86::q16::available`).
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    avx512: bool,
    /// fp8_e4m3 with `avx512`: x is prepared for `x86::Fp8E4M3F32` (else for `Fp8E4M3`).
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    e4m3_f32: bool,
    /// AVX-512 VNNI for the 32-weight integer formats.
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    vnni: bool,
    /// M = 1 and K above `LONG_K` (q4_k: any K): the row kernels prefetch the weights ahead in
    /// software.
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    long: bool,
    /// The bf16 GEMM path (`gemm_bf16.rs`) runs, with these activations.
    #[cfg(target_arch = "x86_64")]
    bf16: Option<x86::gemm16::Acts16>,
    /// Float-zero grouped weights: each activation row's group sums (`float_zero`), else empty.
    fz_sums: Vec<f32>,
    /// Grouped integers read in place (`x86::gint`, `gint_fused::gint_fused`): the q16 rows are
    /// split into its planes, and these are its other activations.
    #[cfg(target_arch = "x86_64")]
    gint: Option<x86::gint::GintActs>,
    /// Asymmetric integer zeros left to the M = 1 fused kernel (`gint_rows1`), which checks
    /// each row's (`formats::gint::row_zeros_ok`) and sets `bad_zeros` on a failure;
    /// `qmatmul` then returns `formats::gint::validate_zeros`' error.
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    zeros_deferred: bool,
    bad_zeros: std::sync::atomic::AtomicBool,
}

fn use_simd() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        crate::cpu::has_avx2()
    }
    #[cfg(target_arch = "aarch64")]
    {
        crate::cpu::has_neon()
    }
    #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
    {
        false
    }
}

fn use_vnni() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        crate::cpu::has_vnni()
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// The AVX-512 kernel runs for these activations: nf4 / int8 (q16) wherever the CPU has it; fp8
/// for K >= 64, and every `256 x` finite for e4m3 (`x86::e4m3_x_fits`).
fn use_avx512(qtype: QType, simd: bool, k: usize, x: &[f32]) -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        simd && crate::cpu::has_avx512()
            && match qtype {
                QType::NF4 | QType::Int8 | QType::GInt(_) => crate::cpu::has_vnni_q16(),
                QType::Fp8E5M2 => k >= reference::WIDE,
                QType::Fp8E4M3 => k >= reference::WIDE && x86::e4m3_x_fits(x),
                _ => false,
            }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (qtype, simd, k, x);
        false
    }
}

/// Activation rows handled together by the row kernels (weights decoded once for all of them).
const ROWS: usize = 4;
/// nf4 / int8 with the AVX-512 q16 kernels: rows longer than `Q16_LONG_K` run in pieces of
/// `Q16_PIECE` columns over panels of `Q16_PANEL` weight rows (`Plan::q16_pieces`), so the
/// piece of the 16-bit activations stays in L1 while the panel's rows pass, and the weights
/// are prefetched `x86::q16::PREFETCH_PANELS` ahead (into the next panel's rows). Whole rows
/// slowed down with K (one thread, from L2, 2026-11-27 14:10 UTC: int8 23.5 GB/s at K = 4096,
/// 14.5 at 8192, 11.9 at 14336; nf4 13.7 at 8192, 10.7 at 14336); with pieces 24.2, 20.6 (L2)
/// and from memory at K = 14336 int8 12.5 -> 19.6 GB/s, nf4 10.0 -> 14.0 (one thread, busy
/// machine; panels of 2 or 4, pieces of 2048 to 8192 within noise of each other). Shorter rows
/// take the same loop with one piece a row: it skips the per-row dispatch of `dots` (nf4
/// 576x576, one thread: 34.9 -> 17.3 us a call; 4096 x 256 rows from L2: 37.8 -> 30.6 us; from
/// memory, K = 4096: 16.4 -> 18.4 GB/s). M = 1 only:
/// at M = 8 and 64 (14336x4096, 2 threads, 2026-11-27 14:39 UTC, two alternating runs) the row
/// kernels with up to 4 activation rows were faster (nf4 6.3-6.4 ms against 6.8-7.2 at M = 8,
/// 51 against 53-58 at M = 64; int8 6.9-7.3 against 7.4-7.7, 56 against 59).
/// That was the AMD Zen 5; on the Intel Xeon (Emerald Rapids) whole rows are faster up to
/// `Q16_LONG_K_INTEL` (the 16-bit activations of a row of 16384 are 32 KiB, inside its 48 KiB
/// L1 with the row's weights): K = 14336 from memory, one thread, CPU time, load 17-19,
/// 2026-12-07 10:20 UTC, alternating runs: nf4 2.36-2.39 -> 2.10-2.21 ms, int8 3.79-3.81 ->
/// 3.46-3.50 ms (pieces of 8192: nf4 2.24-2.56).
#[cfg(target_arch = "x86_64")]
const Q16_LONG_K: usize = 4096;
#[cfg(target_arch = "x86_64")]
const Q16_LONG_K_INTEL: usize = 16384;
/// Rows longer than this take `Plan::q16_pieces`' pieces (`Q16_LONG_K`).
#[cfg(target_arch = "x86_64")]
fn q16_long_k() -> usize {
    if crate::cpu::is_intel() {
        Q16_LONG_K_INTEL
    } else {
        Q16_LONG_K
    }
}
#[cfg(target_arch = "x86_64")]
const Q16_PANEL: usize = 4;
#[cfg(target_arch = "x86_64")]
const Q16_PIECE: usize = 4096;
/// Weight rows per call of the M = 1 kernel `x86::row32` for rows of at most `ROW32_MAX_K`
/// columns (per-row costs shared; at K = 576 a row is only 2.25 groups: 576x576 q8_0 went
/// from 42 to 20 us per call). Longer rows go one at a time: four interleaved weight streams
/// per thread read from memory more slowly (4096x14336, 2 threads, best of 5 on a busy
/// machine: q4_0 1.64 ms one at a time, 3.19 ms four at a time).
#[cfg(target_arch = "x86_64")]
const ROW32: usize = 4;
#[cfg(target_arch = "x86_64")]
const ROW32_MAX_K: usize = 2048;
/// From this many activation rows on the 32-weight formats take the GEMM path (`gemm.rs`).
#[cfg(target_arch = "x86_64")]
const GEMM_MIN_M: usize = 4;
/// From this many activation rows on nf4, int8, fp8 and the grouped integers take the bf16
/// GEMM (`gemm_bf16.rs`) where the CPU has AVX-512 BF16 (and with it `reference::bf16`'s
/// numerics instead of `reference::q16`'s / the f32 ones). Measured (one thread, CPU time, both
/// Llama-3-8B ffn shapes, 2026-12-06 12:35-12:47 UTC, load 20): at M = 8 the row kernels were
/// faster (nf4 0.66-0.86x torch bf16 against 0.53x, int8 0.85-0.87x against 0.66x), at M = 16
/// the GEMM (nf4 0.78-0.91x against 0.48-0.60x, int8 0.96-1.01x against 0.44-0.58x); the row
/// kernels' time grows with M, the GEMM's does not below 16 (16 lanes), so they cross at M = 9
/// to 10.
#[cfg(target_arch = "x86_64")]
pub const GEMM16_MIN_M: usize = 12;
/// Activation rows of one block on the GEMM path (each panel chunk decoded once per block).
#[cfg(target_arch = "x86_64")]
const GEMM_MAX_BLOCK: usize = 128;
/// Weight rows of one task on the GEMM path (8 panels): each chunk of a block of activation
/// rows (up to 320 KiB) is read into L2 once per task and used by all its panels, whose lanes
/// (`GEMM_MAX_BLOCK` x 256 bytes a panel) wait beside it. Sized by weight bytes instead (128
/// KiB), rows of K = 14336 made tasks of 2 panels that re-read the activations for every pair
/// (14336x4096, M = 512: 0.74-0.81x torch bf16 against 0.9-1.0x at 4096x14336).
#[cfg(target_arch = "x86_64")]
const GEMM_TASK_ROWS: usize = 64;
/// Weight rows of one tile panel (`x86::tile`).
#[cfg(target_arch = "x86_64")]
const NR: usize = 8;
/// At M = 1, rows longer than this many columns get a software prefetch of the weights
/// (`x86::prefetch_ahead`, `row32`'s `prefetch_l2`). Set at 8192 on the AMD (Zen) machines
/// (fast without up to K = 8192, half the rate without at 14336); on the Intel Xeon (Emerald
/// Rapids, 2 cores) of session 13 the rows of K = 4096 read from memory at 9.0 GB/s without it
/// (q4_0, one thread, CPU time) against 15.3 at K = 14336 with it, so K = 4096 takes it too.
const LONG_K: usize = 2048;
/// Bytes of activations one block of rows may take (kept in the 1 MiB L2 beside the weights).
const ACT_BLOCK_BYTES: usize = 384 << 10;
/// Weight bytes of one task in the tiled path (re-read from L2 for every block of rows).
const TASK_WEIGHT_BYTES: usize = 256 << 10;
/// Below this many multiply-adds (M·N·K) a call runs on the calling thread: handing work to the
/// pool costs more than it saves. SmolLM2's matrices (576x576 is 0.33 M per token) stay
/// parallel: at 1 << 21 the native runtime's two-thread decode fell from 94 to 67 tokens/s.
const SERIAL_WORK: usize = if cfg!(test) { 1 << 12 } else { 1 << 16 };

mod acts_quant;
mod aligned;
mod dispatch;
mod fill;
mod gemm_takes;
#[cfg(target_arch = "x86_64")]
mod gint_fused;
mod out_ptr;
pub use aligned::AlignedX;
use aligned::Line64;
pub use gemm_takes::{amx_int8_takes, has_gemm};
use out_ptr::OutPtr;
mod ggml_bf16;
#[cfg(target_arch = "x86_64")]
mod k_route;
pub use ggml_bf16::ggml_bf16_min_m;
#[cfg(all(test, target_arch = "x86_64"))]
pub(crate) use ggml_bf16::GgmlBf16From;
#[cfg(test)]
pub(crate) use ggml_bf16::GgmlInt8;
pub(crate) mod float_zero;
#[cfg(target_arch = "x86_64")]
mod gemm;
#[cfg(target_arch = "x86_64")]
mod gemm_amx;
#[cfg(target_arch = "x86_64")]
mod gemm_amx_k;
#[cfg(target_arch = "x86_64")]
mod gemm_avx2;
#[cfg(target_arch = "x86_64")]
mod gemm_bf16;
#[cfg(target_arch = "x86_64")]
mod gemm_bf16_avx2;
#[cfg(target_arch = "x86_64")]
mod gemm_bf16_small;
#[cfg(target_arch = "x86_64")]
mod gemm_k;
#[cfg(target_arch = "aarch64")]
mod gemm_neon;
#[cfg(target_arch = "aarch64")]
mod gemm_neon_k;
#[cfg(target_arch = "aarch64")]
mod neon_walk;
#[cfg(target_arch = "x86_64")]
mod out16;
mod plan;
#[cfg(target_arch = "x86_64")]
mod rows_bytes;
#[cfg(target_arch = "x86_64")]
mod rows_fp8;
#[cfg(target_arch = "x86_64")]
mod rows_k;
use plan::plan;

/// `out = x · Wᵀ`: `x` is M x K row-major f32 (M = `m`), `w` is N x K quantized, `out` is M x N
/// row-major. Every shape, size and value is checked; errors, never panics.
///
/// M = 0 (an empty batch) is allowed once the weights check out: nothing to compute.
pub fn qmatmul(x: &[f32], m: usize, w: &QuantizedView<'_>, out: &mut [f32]) -> Result<()> {
    let plan = plan(x, m, w, out.len())?;
    if m == 0 {
        return Ok(());
    }
    #[cfg(target_arch = "x86_64")]
    if let Some(xb) = &plan.bf16 {
        plan.run_bf16(xb, out);
        return Ok(());
    }
    #[cfg(target_arch = "x86_64")]
    if gemm_bf16_avx2::takes(w, m) {
        plan.run_bf16_avx2(x, out);
        return Ok(());
    }
    let n = w.rows;
    // Each task owns whole weight rows (rows of Wᵀ·x, N x M) and reads them from memory once.
    let threads = parallel::num_threads();
    let work = n.saturating_mul(w.cols).saturating_mul(m);
    let per_task = if m >= 2 {
        // Weights of a task stay in L2 while its blocks of activation rows pass (each block of
        // activations is then read once per task, not once per weight row).
        let by_cache = (TASK_WEIGHT_BYTES / plan.row_bytes.max(1)).max(1);
        #[cfg(target_arch = "x86_64")]
        let by_cache = if plan.gemm || plan.gemm2.is_some() {
            GEMM_TASK_ROWS
        } else {
            by_cache
        };
        let by_balance = n.div_ceil(threads * 4).max(1);
        let rows = by_cache.min(by_balance).next_multiple_of(NR_TASK);
        // (the NEON GEMM's tasks: whole panels but the last)
        #[cfg(target_arch = "aarch64")]
        let rows = if plan.gemm_neon.is_some() {
            rows.next_multiple_of(neon::gemm::PANEL)
        } else {
            rows
        };
        rows
    } else {
        // At least ~256 K multiply-adds a task (rayon's per-task cost is about a microsecond),
        // and at least 8 tasks a thread to balance.
        let by_size = ((1 << 18) / w.cols.saturating_mul(m).max(1)).max(1);
        let t = by_size.min(n.div_ceil(threads * 8).max(1));
        if plan.tile {
            t.next_multiple_of(NR_TASK)
        } else {
            t
        }
    };
    #[cfg(target_arch = "x86_64")]
    let per_task = if plan.amx.is_some() {
        amx_task_rows(threads, m, w.cols)
    } else {
        per_task
    };
    if m == 1 {
        if threads == 1 || work < SERIAL_WORK {
            plan.fill(0, out);
        } else {
            let fill = |t: usize, chunk: &mut [f32]| plan.fill(t * per_task, chunk);
            if crate::config::m1_runs() {
                // A contiguous run of tasks a thread, so that its stream of rows (and its
                // software prefetch ahead of them) runs on from task to task.
                parallel::for_each_chunk_mut_in_runs(out, per_task, fill)
            } else {
                parallel::for_each_chunk_mut(out, per_task, fill)
            }
        }
        if plan.bad_zeros.load(std::sync::atomic::Ordering::Relaxed) {
            if let QType::GInt(g) = w.qtype {
                crate::formats::gint::validate_zeros(w, g)?;
            }
            // (not reached: both checks are `integer_zeros`)
            return Err(crate::error::Error::InvalidArgument(format!(
                "{}: a zero point is not an integer in range",
                w.qtype.name()
            )));
        }
        return Ok(());
    }
    // M >= 2: each task writes its columns of `out` (the GEMM path directly, the others
    // through a task-sized N x M buffer).
    #[cfg(all(test, target_arch = "aarch64"))]
    if plan.gemm_neon.is_some() {
        let mut ran = gemm_neon::RAN.lock().unwrap_or_else(|e| e.into_inner());
        ran.push(w.data.as_ptr() as usize);
    }
    let outp = OutPtr::new(out, n);
    let task = |t: usize| {
        let n0 = t * per_task;
        let rows = per_task.min(n - n0);
        #[cfg(target_arch = "x86_64")]
        if plan.gemm {
            plan.fill_gemm(n0, rows, &outp);
            return;
        }
        #[cfg(target_arch = "x86_64")]
        if let Some(dot) = plan.gemm2 {
            plan.fill_gemm2(dot, n0, rows, &outp);
            return;
        }
        #[cfg(target_arch = "aarch64")]
        if let Some(dot) = plan.gemm_neon {
            plan.fill_gemm_neon(dot, n0, rows, &outp);
            return;
        }
        let mut yt = vec![0.0f32; rows * m];
        plan.fill(n0, &mut yt);
        outp.scatter(n0, m, &yt);
    };
    let tasks = n.div_ceil(per_task);
    if threads == 1 || work < SERIAL_WORK {
        (0..tasks).for_each(task);
    } else {
        parallel::for_each_index(tasks, task);
    }
    Ok(())
}

/// Weight rows of one task where the AMX int8 tiles run (`gemm_amx.rs`): whole panels of 16
/// (a task of 72 rows, `GEMM_TASK_ROWS`-style balancing at N = 576 on two threads, left 8 rows
/// of each task to the AVX-512 GEMM), in pairs for the 2 x 2 tile blocks. Tasks take their
/// rows with every activation row, so on several threads with small activations (SmolLM2's
/// prompt: 128 x 576 bytes) pairs of panels spread N = 192 or 576 evenly over the team (its
/// threads take tasks one by one); larger activations, re-read from L3 by every task, keep
/// `GEMM_TASK_ROWS`.
#[cfg(target_arch = "x86_64")]
fn amx_task_rows(threads: usize, m: usize, k: usize) -> usize {
    use x86::amx32::NT;
    const SMALL_ACTS: usize = 256 << 10;
    if threads > 1 && m.saturating_mul(k) <= SMALL_ACTS {
        2 * NT
    } else {
        GEMM_TASK_ROWS.next_multiple_of(NT)
    }
}

/// Task sizes of the tiled path are whole panels.
#[cfg(target_arch = "x86_64")]
const NR_TASK: usize = NR;
#[cfg(not(target_arch = "x86_64"))]
const NR_TASK: usize = 1;

/// (tests) `qmatmul` calls so far, on any thread, that ran the NEON GEMM on weights starting
/// inside `bytes` (0 off aarch64): the runtime's tests check that its many-row matmuls take
/// it (the bits alone cannot tell). Count before and after while `bytes` is alive.
#[cfg(test)]
pub(crate) fn neon_gemm_runs(bytes: &[u8]) -> usize {
    #[cfg(target_arch = "aarch64")]
    {
        let r = bytes.as_ptr_range();
        let ran = gemm_neon::RAN.lock().unwrap_or_else(|e| e.into_inner());
        ran.iter()
            .filter(|&&a| (r.start as usize..r.end as usize).contains(&a))
            .count()
    }
    #[cfg(not(target_arch = "aarch64"))]
    {
        let _ = bytes;
        0
    }
}

#[cfg(test)]
mod tests;
