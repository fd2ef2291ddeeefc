//! `plan`: every check of a `qmatmul` call (shapes, sizes, stats, values), the choice of kernel
//! family for this CPU, and the activations prepared once per call (`Acts`).

use super::reference::{self, BlockQ8K};
use super::*;
use crate::error::{Error, Result};
use crate::formats::tensor::{validate_view, QuantizedView, ScaleMode};
use crate::qtype::QType;
use std::sync::atomic::AtomicBool;

#[cfg(target_arch = "x86_64")]
use super::acts_quant::gemm_tail;
pub(super) use super::acts_quant::quantize_q8_1;
use super::acts_quant::{quantize_q16, quantize_rows, scales_and_sums};

fn bad(msg: String) -> Error {
    Error::InvalidArgument(msg)
}

fn stats_err(w: &QuantizedView<'_>, got: usize, expected: usize) -> Error {
    Error::DataSize {
        what: "stats",
        qtype: w.qtype.name(),
        rows: w.rows,
        cols: w.cols,
        got,
        expected,
    }
}

fn check_bnb_block(w: &QuantizedView<'_>) -> Result<usize> {
    let b = w.block_size;
    if b.is_power_of_two() && (32..=4096).contains(&b) {
        Ok(b)
    } else {
        Err(Error::BlockSize {
            qtype: w.qtype.name(),
            got: b,
            allowed: "a power of two from 32 to 4096",
        })
    }
}

/// The index of the first infinite or NaN value of `x`, if any. Every call reads all of x
/// before it runs: a plain `position(!is_finite)` stops at each value and does not vectorize
/// (128x576 activations alone, loaded machine: ~70 us against ~7 us; a 576x192 q8_0 call at
/// M = 128 went from 170 to 150 us). Chunks are OR-ed without an early exit, and only a chunk
/// that has one is searched.
pub(super) fn first_non_finite(x: &[f32]) -> Option<usize> {
    const CHUNK: usize = 256;
    const EXP: u32 = 0x7f80_0000; // all exponent bits set: an infinity or a NaN
    x.chunks(CHUNK).enumerate().find_map(|(c, xs)| {
        let any = xs.iter().fold(false, |a, v| a | (v.to_bits() & EXP == EXP));
        any.then(|| c * CHUNK + xs.iter().position(|v| !v.is_finite()).unwrap_or(0))
    })
}

/// Check everything about the request and prepare the activations.
pub(super) fn plan<'a>(
    x: &'a [f32],
    m: usize,
    w: &'a QuantizedView<'a>,
    out_len: usize,
) -> Result<Plan<'a>> {
    let k = w.cols;
    let (stats_per_row, block_len) = check(m, w, x.len(), out_len)?;
    // (the bf16 path checks x while it converts it: one pass over x instead of two)
    #[cfg(target_arch = "x86_64")]
    let checked = bf16_route(w, m);
    #[cfg(not(target_arch = "x86_64"))]
    let checked = false;
    if !checked {
        if let Some(i) = first_non_finite(x) {
            return Err(non_finite(x, k, i));
        }
    }
    route(x, m, w, stats_per_row, block_len)
}

/// The error for the non-finite `x[i]` (x: M x K).
fn non_finite(x: &[f32], k: usize, i: usize) -> Error {
    Error::NonFinite {
        row: i / k,
        col: i % k,
        value: x[i],
    }
}

/// Every check of `plan` but the activations' values: the format is supported, the view, the
/// block size and statistics fit, x (`x_len` values) and the output (`out_len`) have M rows.
/// Returns the statistics per weight row and the weights sharing one (nf4 / int8 / fp8 /
/// grouped integers; 0 otherwise).
pub(super) fn check(
    m: usize,
    w: &QuantizedView<'_>,
    x_len_got: usize,
    out_len: usize,
) -> Result<(usize, usize)> {
    let (n, k) = (w.rows, w.cols);
    if !supports(w.qtype) {
        let names: Vec<&str> = SUPPORTED.iter().map(|q| q.name()).collect();
        return Err(bad(format!(
            "qmatmul does not support {} weights; supported: {} and the grouped integers \
             (int{{2,3,4}}_g{{32,64,128,ch}}[_sym], int8_g*_sym)",
            w.qtype.name(),
            names.join(" ")
        )));
    }
    validate_view(w)?;
    let (mut stats_per_row, mut block_len) = (0, 0);
    match w.qtype {
        QType::NF4 => {
            block_len = check_bnb_block(w)?;
            if w.double_quant.is_some() {
                return Err(bad(
                    "qmatmul takes nf4 weights with a plain fp32 absmax; expand a \
                     double-quantized absmax first"
                        .into(),
                ));
            }
            stats_per_row = k / block_len;
        }
        QType::Int8 | QType::Fp8E4M3 | QType::Fp8E5M2 => match w.scale_mode {
            Some(ScaleMode::Tensor) => (stats_per_row, block_len) = (1, k),
            Some(ScaleMode::Row) => (stats_per_row, block_len) = (1, k),
            Some(ScaleMode::Block) => {
                block_len = check_bnb_block(w)?;
                stats_per_row = k / block_len;
            }
            None => return Err(bad(format!("{} weights need a scale_mode", w.qtype.name()))),
        },
        QType::GInt(g) => {
            // the zeros: below, once the path is known
            crate::formats::gint::validate_shape(w, g)?;
            block_len = crate::formats::gint::group_len(g, k);
            stats_per_row = crate::formats::gint::stats_per_row(g, k);
        }
        q => {
            let bs = q.info().block_size;
            if w.block_size != bs {
                return Err(bad(format!(
                    "{} has block size {bs}, got block_size={}",
                    q.name(),
                    w.block_size
                )));
            }
        }
    }
    if stats_per_row > 0 {
        let expected = if w.scale_mode == Some(ScaleMode::Tensor) {
            1
        } else {
            n * stats_per_row
        };
        if w.stats.len() != expected {
            return Err(stats_err(w, w.stats.len(), expected));
        }
    }
    let x_len = m
        .checked_mul(k)
        .ok_or_else(|| bad(format!("shape {m}x{k} overflows")))?;
    if x_len_got != x_len {
        return Err(bad(format!(
            "x has {x_len_got} elements but M={m} rows of K={k} need {x_len}"
        )));
    }
    let y_len = m
        .checked_mul(n)
        .ok_or_else(|| bad(format!("shape {m}x{n} overflows")))?;
    if out_len != y_len {
        return Err(bad(format!(
            "output has {out_len} elements but M={m} rows of N={n} need {y_len}"
        )));
    }
    Ok((stats_per_row, block_len))
}

/// The bf16 GEMM takes the call: its formats, many rows, K in whole chunks of 32, groups that
/// divide a chunk of K, and a CPU whose bf16 instructions do what `reference::bf16` says; the
/// ggml formats where AMX bf16 runs, from `ggml_bf16_min_m` rows.
#[cfg(target_arch = "x86_64")]
pub(super) fn bf16_route(w: &QuantizedView<'_>, m: usize) -> bool {
    (m >= GEMM16_MIN_M || x86::amx_bf16_small::use_small(m))
        && w.cols.is_multiple_of(32)
        && match w.qtype {
            QType::NF4 | QType::Int8 | QType::Fp8E4M3 | QType::Fp8E5M2 => true,
            // (float zeros: the int8 path and its correction, `float_zero.rs`)
            QType::GInt(g) => {
                !g.float_zero && (g.group == 0 || x86::gemm16::KC.is_multiple_of(g.group as usize))
            }
            // the ggml formats on AMX tiles only, from their measured row counts
            q => ggml_bf16_min_m(q, w.cols) > 0 && m >= ggml_bf16_min_m(q, w.cols),
        }
        && crate::cpu::has_avx512_bf16()
        && x86::gemm16::semantics_hold()
}

/// The plan of a call on the bf16 GEMM with activations `xb` (`x`: the f32 ones, or empty
/// where the call had bf16 activations: the bf16 GEMM reads `xb` only).
#[cfg(target_arch = "x86_64")]
pub(super) fn bf16_plan<'a>(
    x: &'a [f32],
    m: usize,
    w: &'a QuantizedView<'a>,
    stats_per_row: usize,
    block_len: usize,
    xb: x86::gemm16::Acts16,
) -> Plan<'a> {
    let simd = use_simd();
    Plan {
        w,
        m,
        k: w.cols,
        m_block: m,
        tile: false,
        gemm: false,
        amx: None,
        amx_k: None,
        gemm2: None,
        row32: false,
        row32_avx2: false,
        row_bytes: w.qtype.row_bytes(w.cols, w.block_size),
        acts: Acts::F32(x),
        stats_per_row,
        block_len,
        simd,
        avx512: false,
        e4m3_f32: false,
        vnni: simd && use_vnni(),
        long: false,
        bf16: Some(xb),
        fz_sums: Vec::new(),
        gint: None,
        zeros_deferred: false,
        bad_zeros: AtomicBool::new(false),
    }
}

/// `plan` past its checks: the kernel family and the activations it reads.
fn route<'a>(
    x: &'a [f32],
    m: usize,
    w: &'a QuantizedView<'a>,
    stats_per_row: usize,
    block_len: usize,
) -> Result<Plan<'a>> {
    let k = w.cols;
    #[cfg(target_arch = "x86_64")]
    let n = w.rows;
    let simd = use_simd();
    let vnni = simd && use_vnni();
    // Quantizing the activations is worth the pool only for many rows.
    let par = m >= 4 && m.saturating_mul(k) >= 1 << 17;
    // The tiles from M = 2 on (at M = 1 the row kernels are faster: measured, the transposes
    // cost more than the horizontal sums they save when no second row shares them).
    #[cfg(target_arch = "x86_64")]
    let bw = crate::cpu::has_vnni_bw();
    #[cfg(not(target_arch = "x86_64"))]
    let bw = false;
    // (tests force the AVX2 GEMM on AVX-512 machines: `gemm_avx2::forced`)
    #[cfg(target_arch = "x86_64")]
    let forced2 = super::gemm_avx2::forced();
    #[cfg(not(target_arch = "x86_64"))]
    let forced2: Option<()> = None;
    let tile = cfg!(target_arch = "x86_64")
        && vnni
        && m >= 2
        && forced2.is_none()
        && match w.qtype {
            QType::Q4_0
            | QType::Q5_0
            | QType::Q8_0
            | QType::IQ4NL
            | QType::Q4K
            | QType::Q5K
            | QType::Q6K => true,
            // only the 512-bit tile kernel has their `m·s` term
            QType::Q4_1 | QType::Q5_1 => bw,
            _ => false,
        };
    // The GEMM path: the tile formats with 512-bit VNNI, many rows (any K: `gemm.rs` runs the
    // last partial group of 8 blocks narrower, `x86::gemm32::decode_tail`).
    #[cfg(target_arch = "x86_64")]
    let gemm = tile
        && bw
        && m >= GEMM_MIN_M
        && matches!(
            w.qtype,
            QType::Q4_0 | QType::Q5_0 | QType::Q8_0 | QType::IQ4NL | QType::Q4_1 | QType::Q5_1
        );
    // The K-quants' GEMM (`gemm_k.rs`): 512-bit VNNI, many rows.
    #[cfg(target_arch = "x86_64")]
    let gemm_k =
        vnni && bw && forced2.is_none() && m >= gemm_k::GEMM_K_MIN_M && gemm_k::takes(w.qtype);
    #[cfg(target_arch = "x86_64")]
    let gemm = gemm || gemm_k;
    #[cfg(not(target_arch = "x86_64"))]
    let gemm = false;
    // The 32-weight formats' GEMM without AVX-512 VNNI (`gemm_avx2.rs`): AVX2, many rows.
    #[cfg(target_arch = "x86_64")]
    let gemm2 = {
        use super::gemm_avx2::{min_m, takes, Int8Dot};
        let on = takes(w.qtype)
            && m >= 2
            && (forced2.is_some()
                || (simd && !tile && m >= min_m(w.qtype) && crate::config::avx2_gemm()));
        on.then(|| forced2.unwrap_or_else(Int8Dot::detect))
    };
    // The 32-weight formats' GEMM on aarch64 (`gemm_neon.rs`): dotprod / i8mm, M >= 2.
    #[cfg(target_arch = "aarch64")]
    let gemm_neon = if simd {
        super::gemm_neon::choose(w.qtype, m)
    } else {
        None
    };
    // M = 1: the row kernel without horizontal sums where the CPU has AVX-512 VBMI and GFNI.
    #[cfg(target_arch = "x86_64")]
    let row32 = vnni
        && m == 1
        && crate::cpu::has_vbmi_gfni()
        && matches!(
            w.qtype,
            QType::Q4_0 | QType::Q5_0 | QType::Q8_0 | QType::IQ4NL | QType::Q4_1 | QType::Q5_1
        );
    #[cfg(target_arch = "x86_64")]
    let row32_avx2 =
        simd && m == 1 && (!vnni || x86::row32_avx2::forced()) && x86::row32_avx2::takes(w.qtype);
    #[cfg(target_arch = "x86_64")]
    let row32 = row32 && !row32_avx2;
    #[cfg(not(target_arch = "x86_64"))]
    let (row32, row32_avx2) = (false, false);
    // The AVX2 bf16 GEMM reads x as it is (`bf16_route` skipped the finite check).
    #[cfg(target_arch = "x86_64")]
    if super::gemm_bf16_avx2::takes(w, m) {
        if let Some(i) = first_non_finite(x) {
            return Err(non_finite(x, k, i));
        }
        let none = x86::acts16::Acts16 {
            x: Vec::new(),
            pairs: 0,
            stride: 0,
            vectors: 0,
        };
        return Ok(Plan {
            bf16: None,
            ..bf16_plan(x, m, w, stats_per_row, block_len, none)
        });
    }
    #[cfg(target_arch = "x86_64")]
    if bf16_route(w, m) {
        // SAFETY: `cpu::has_avx512_bf16` (AVX-512 F/BW/VL and BF16); x is M x K, K % 32 == 0.
        let Some(xb) = (unsafe { x86::acts16::prepare(x, m, k, par) }) else {
            let i = first_non_finite(x).expect("prepare found a non-finite value");
            return Err(non_finite(x, k, i));
        };
        return Ok(bf16_plan(x, m, w, stats_per_row, block_len, xb));
    }
    // (after the bf16 return: fp8 e4m3's check reads all of x)
    let f32_avx512 = use_avx512(w.qtype, simd, k, x);
    // e4m3 decoded straight to f32 where every |x| < 2^8 (`x86::Fp8E4M3F32`)
    #[cfg(target_arch = "x86_64")]
    let e4m3_f32 = w.qtype == QType::Fp8E4M3
        && (f32_avx512 || super::rows_fp8::takes(w.qtype, m, k, simd, f32_avx512))
        && x86::e4m3_f32_x_fits(x);
    #[cfg(not(target_arch = "x86_64"))]
    let e4m3_f32 = false;
    // Every weight row on AMX int8 tiles (whole panels of 16; tasks of whole panels,
    // `amx_task_rows`): the AVX-512 GEMM's activation layouts (`xt`, `nbias`, `xtail`) would go
    // unread, so they are not built (at 576x576, M = 128: 4 % of a call).
    // (asked once: `FERROQUANT_TILES32` is read at every ask, and `amx` below must agree)
    #[cfg(target_arch = "x86_64")]
    let amx32 = gemm && !gemm_k && super::gemm_amx::takes(w.qtype, m);
    #[cfg(target_arch = "x86_64")]
    let amx_all = amx32 && n.is_multiple_of(x86::amx32::NT);
    #[cfg(target_arch = "x86_64")]
    let mut gint = None;
    let (acts, act_row_bytes) = match w.qtype {
        QType::Q4_0 | QType::Q5_0 | QType::Q8_0 | QType::IQ4NL => {
            let nb = k / QK8_0;
            let mut blocks = vec![BlockQ8_0::zeroed(); m * nb];
            quantize_rows(
                x,
                k,
                &mut blocks,
                par,
                crate::formats::quantize_row_q8_0_blocks,
            );
            let (d, sums) = scales_and_sums(&blocks, par);
            #[cfg(target_arch = "x86_64")]
            let (xt, nbias) = if amx_all {
                (Vec::new(), Vec::new())
            } else if tile {
                let xt = panels::interleave_q8_0_rows(&blocks, nb, par);
                // The GEMM kernel starts its integer sums at -BIAS · Σx.
                let bias = match w.qtype {
                    QType::Q4_0 => <BlockQ4_0 as x86::Load32>::BIAS,
                    QType::Q5_0 => <BlockQ5_0 as x86::Load32>::BIAS,
                    QType::Q8_0 => <BlockQ8_0 as x86::Load32>::BIAS,
                    _ => <BlockIQ4NL as x86::Load32>::BIAS,
                };
                let nbias = if gemm {
                    sums.iter().map(|&s| -bias * s).collect()
                } else {
                    Vec::new()
                };
                (xt, nbias)
            } else if row32_avx2 {
                x86::row32_avx2::interleave(w.qtype, &blocks, &sums)
            } else if row32 {
                use x86::row32::interleave;
                match w.qtype {
                    QType::Q4_0 => interleave::<BlockQ4_0>(&blocks, &sums),
                    QType::Q8_0 => interleave::<BlockQ8_0>(&blocks, &sums),
                    QType::Q5_0 => interleave::<BlockQ5_0>(&blocks, &sums),
                    _ => interleave::<BlockIQ4NL>(&blocks, &sums),
                }
            } else if gemm2.is_some() {
                (panels::interleave_q8_0_rows(&blocks, nb, par), Vec::new())
            } else {
                (Vec::new(), Vec::new())
            };
            #[cfg(not(target_arch = "x86_64"))]
            let (xt, nbias) = (Vec::new(), Vec::new());
            #[cfg(target_arch = "x86_64")]
            let xtail = gemm_tail(gemm && !amx_all, &blocks, nb);
            #[cfg(not(target_arch = "x86_64"))]
            let xtail = Vec::new();
            let row_bytes = if tile { k + nb * 8 } else { nb * 42 };
            (
                Acts::Q8_0 {
                    blocks,
                    d,
                    sums,
                    xt,
                    nbias,
                    xtail,
                },
                row_bytes,
            )
        }
        QType::Q4_1 | QType::Q5_1 => {
            let nb = k / QK8_0;
            let (blocks, s) = quantize_q8_1(x, m, k, par);
            let (d, sums) = scales_and_sums(&blocks, par);
            #[cfg(target_arch = "x86_64")]
            let (xt, nbias) = if amx_all {
                (Vec::new(), Vec::new())
            } else if tile || gemm2.is_some() {
                (panels::interleave_q8_0_rows(&blocks, nb, par), Vec::new())
            } else if row32_avx2 {
                x86::row32_avx2::interleave(w.qtype, &blocks, &sums)
            } else if row32 {
                use x86::row32::interleave;
                match w.qtype {
                    QType::Q4_1 => interleave::<BlockQ4_1>(&blocks, &sums),
                    _ => interleave::<BlockQ5_1>(&blocks, &sums),
                }
            } else {
                (Vec::new(), Vec::new())
            };
            #[cfg(not(target_arch = "x86_64"))]
            let (xt, nbias) = (Vec::new(), Vec::new());
            #[cfg(target_arch = "x86_64")]
            let xtail = gemm_tail(gemm && !amx_all, &blocks, nb);
            #[cfg(not(target_arch = "x86_64"))]
            let xtail = Vec::new();
            let row_bytes = if tile { k + nb * 12 } else { nb * 46 };
            (
                Acts::Q8_1 {
                    blocks,
                    d,
                    sums,
                    s,
                    xt,
                    nbias,
                    xtail,
                },
                row_bytes,
            )
        }
        QType::Q2K
        | QType::Q3K
        | QType::Q4K
        | QType::Q5K
        | QType::Q6K
        | QType::IQ4XS
        | QType::TQ1_0
        | QType::TQ2_0 => {
            let nb = k / QK_K;
            let mut blocks = vec![BlockQ8K::zeroed(); m * nb];
            #[cfg(target_arch = "x86_64")]
            quantize_rows(x, k, &mut blocks, par, x86::q8k::quantize_row_q8_k);
            #[cfg(not(target_arch = "x86_64"))]
            quantize_rows(x, k, &mut blocks, par, reference::quantize_row_q8_k);
            #[cfg(target_arch = "x86_64")]
            let (xq, xs, xd) = if tile && !gemm_k {
                panels::interleave_q8_k_rows(&blocks, nb)
            } else {
                (Vec::new(), Vec::new(), Vec::new())
            };
            #[cfg(not(target_arch = "x86_64"))]
            let (xq, xs, xd) = (Vec::new(), Vec::new(), Vec::new());
            // The AVX-512 row kernels of q4_k / q5_k / q6_k read the activations in their own
            // layout (without it they are not used). (q6_k with rows past LONG_K at M = 1 kept
            // the AVX2 kernel while the long-row prefetch went to L1; with the L2 prefetch the
            // AVX-512 one reads 14336x4096 at 31 GB/s against 26 on 2 threads, 25 vs 13.5 on
            // one, quiet machine, 2026-11-27 13:17 UTC.)
            #[cfg(target_arch = "x86_64")]
            let xz = match x86::xz_order(w.qtype) {
                Some(order) if !tile && simd && x86::vnni_rows_k() => {
                    let mut v = vec![Line64([0; 64]); m * nb * x86::XZ_BLOCK / 64];
                    x86::interleave_k4(&blocks, nb, order, bytemuck::cast_slice_mut(&mut v));
                    v
                }
                _ => Vec::new(),
            };
            #[cfg(not(target_arch = "x86_64"))]
            let xz = Vec::new();
            let row_bytes = if tile {
                k + k / 2 + nb * 4
            } else {
                nb * std::mem::size_of::<BlockQ8K>() + 64 * xz.len() / m.max(1)
            };
            (
                Acts::Q8K {
                    blocks,
                    xq,
                    xs,
                    xd,
                    xz,
                },
                row_bytes,
            )
        }
        QType::NF4 | QType::Int8 | QType::GInt(_) => {
            #[allow(unused_mut)]
            let mut acts = quantize_q16(x, m, k, w.qtype == QType::NF4, f32_avx512, par);
            #[cfg(target_arch = "x86_64")]
            if let (QType::GInt(g), Acts::Q16 { q, d, row, .. }) = (w.qtype, &mut acts) {
                if super::gint_fused::gint_fused(g, f32_avx512) {
                    gint = Some(super::gint_fused::prepare_gint(g, k, m, q, d, *row));
                }
            }
            let Acts::Q16 { row, blocks, .. } = acts else {
                unreachable!()
            };
            (acts, 2 * row + 4 * blocks)
        }
        #[cfg(target_arch = "x86_64")]
        QType::Fp8E4M3 if e4m3_f32 => (Acts::F32Prepared(x86::scale_e4m3_f32_x(x)), 4 * k),
        #[cfg(target_arch = "x86_64")]
        QType::Fp8E4M3 if f32_avx512 => (Acts::F32Prepared(x86::scale_e4m3_x(x)), 4 * k),
        #[cfg(target_arch = "x86_64")]
        QType::Fp8E5M2 if f32_avx512 => (Acts::F32Prepared(x86::align_x(x)), 4 * k),
        _ => (Acts::F32(x), 4 * k),
    };
    // Blocks of activation rows that fit ACT_BLOCK_BYTES, split evenly (M = 67 at most 34 a
    // block gives 34 + 33, not 34 + 33 + 0).
    let max_block = (ACT_BLOCK_BYTES / act_row_bytes.max(1)).clamp(ROWS, 64);
    // The row kernels take ROWS rows at a time: whole multiples of ROWS a block.
    let max_block = if tile {
        max_block
    } else {
        max_block / ROWS * ROWS
    };
    // The GEMM path keeps one chunk of K of the block's rows in L2 (`gemm.rs`).
    #[cfg(target_arch = "x86_64")]
    let max_block = if gemm_k {
        gemm_k::GEMM_K_MAX_BLOCK
    } else if gemm {
        use x86::gemm32::KC_GROUPS;
        let chunk_bytes = KC_GROUPS * (x86::tile::GROUP_BYTES + 12 * reference::LANES);
        (ACT_BLOCK_BYTES / chunk_bytes).clamp(ROWS, GEMM_MAX_BLOCK)
    } else {
        max_block
    };
    let n_blocks = m.div_ceil(max_block).max(1);
    // The 32-weight GEMM's whole panels of 16 on AMX int8 tiles (not the K-quants'), their
    // activations packed once for every task.
    #[cfg(target_arch = "x86_64")]
    let amx = amx32.then(|| super::gemm_amx::pack(&acts, m, k)).flatten();
    // The K-quants' GEMM on AMX int8 tiles, the q8_K activations packed once for every task.
    #[cfg(target_arch = "x86_64")]
    let amx_k = (gemm_k && super::gemm_amx_k::takes(w.qtype, m, k))
        .then(|| super::gemm_amx_k::pack(&acts, m, k))
        .flatten();
    // Asymmetric integer zeros: at M = 1 the fused kernel checks each row's zeros as it reads
    // them (`Plan::zeros_deferred`; a pass over every zero before the call was a quarter of
    // int4_g64's M = 1 time from memory); every other path checks them all here.
    #[cfg(target_arch = "x86_64")]
    let fused_m1 = m == 1 && gint.is_some();
    #[cfg(not(target_arch = "x86_64"))]
    let fused_m1 = false;
    let zeros_deferred = match w.qtype {
        QType::GInt(g) if !g.sym && !g.float_zero && fused_m1 => true,
        QType::GInt(g) => {
            crate::formats::gint::validate_zeros(w, g)?;
            false
        }
        _ => false,
    };
    Ok(Plan {
        w,
        m,
        k,
        m_block: if tile {
            m.div_ceil(n_blocks).max(1)
        } else {
            m.div_ceil(n_blocks).next_multiple_of(ROWS)
        },
        tile,
        gemm,
        #[cfg(target_arch = "x86_64")]
        amx,
        #[cfg(target_arch = "x86_64")]
        amx_k,
        #[cfg(target_arch = "x86_64")]
        gemm2,
        #[cfg(target_arch = "aarch64")]
        gemm_neon,
        row32,
        row32_avx2,
        row_bytes: w.qtype.row_bytes(k, w.block_size),
        acts,
        stats_per_row,
        block_len,
        simd,
        avx512: f32_avx512,
        e4m3_f32,
        vnni,
        // q4_k's row kernel prefetches at every K: at K = 4096 (below the LONG_K of then), one thread, CPU
        // time, 4096x14336, loaded machine (load 16-21), 2026-12-06 14:57-15:01 UTC,
        // alternating: 22.6-23.5 -> 26.8-27.1 GB/s in 3 of 4 pairs (22.6 both in the fourth);
        // q5_k, q6_k, q2_k, q3_k, iq4_xs, q4_1 and q5_1 showed no consistent change.
        long: m == 1 && (k > LONG_K || w.qtype == QType::Q4K),
        #[cfg(target_arch = "x86_64")]
        bf16: None,
        fz_sums: match w.qtype.gint() {
            Some(g) if g.float_zero => super::float_zero::group_sums(x, k, block_len),
            _ => Vec::new(),
        },
        #[cfg(target_arch = "x86_64")]
        gint,
        zeros_deferred,
        bad_zeros: AtomicBool::new(false),
    })
}

use bytemuck::Zeroable;
