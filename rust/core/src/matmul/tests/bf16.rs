//! The bf16 GEMM (nf4, int8, fp8, grouped integers at M >= `GEMM16_MIN_M` with AVX-512 BF16):
//! every output has the bits of `reference::bf16::dot_bf16` of the dequantized weight row and
//! the activation row, with the pool and with one thread, across partial chunks of K, jobs
//! with a partial panel, every kernel width (1 to 4 activation vectors) and several blocks of
//! activation rows. On a CPU without the path the same calls must equal the row-by-row
//! results (the q16 / f32 references, tested elsewhere).

use super::{mixed_acts, quantized, Rng};
use crate::formats::tensor::{QuantizedView, ScaleMode};
use crate::matmul::qmatmul;
use crate::matmul::reference::bf16::{dot_bf16, error_bound};
use crate::matmul::reference::fp8_table;
use crate::qtype::QType;
use crate::quantize::dequantize;

/// Serializes the tests that turn the tile kernels on or off (`amx_bf16::force`, one switch for
/// the process) with those whose expectations depend on it (every `check` compares a call on
/// the pool with one on one thread: a switch between them would change the path).
static FORCE_LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn force_lock() -> std::sync::MutexGuard<'static, ()> {
    FORCE_LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

/// The path runs here for `qtype` at `m` rows (the same conditions as `plan`, for the shapes
/// below, K = `k`): the ggml formats from `ggml_bf16_min_m`, the others from `bf16_gemm_min_m`.
fn bf16_path(qtype: QType, m: usize, k: usize) -> bool {
    let ggml = crate::matmul::ggml_bf16_min_m(qtype, k);
    if ggml > 0 {
        return m >= ggml;
    }
    let t = crate::matmul::bf16_gemm_min_m();
    t > 0 && m >= t && !is_ggml(qtype)
}

/// The ggml formats that can take the path (on AMX tiles only).
fn is_ggml(qtype: QType) -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        crate::matmul::x86::decode16_ggml::takes(qtype)
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = qtype;
        false
    }
}

/// The AMX tile path may run here for `m` rows (then outputs are checked against
/// `amx_bf16::error_bound` where they differ from `reference::bf16`; elsewhere they must not).
fn amx_path(qtype: QType, m: usize, k: usize) -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        bf16_path(qtype, m, k)
            && crate::matmul::bf16_amx_min_m() > 0
            && m >= crate::matmul::bf16_amx_min_m()
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (qtype, m, k);
        false
    }
}

fn amx_bound(w: &[f32], x: &[f32]) -> f64 {
    #[cfg(target_arch = "x86_64")]
    {
        crate::matmul::x86::amx_bf16::error_bound(w, x)
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (w, x);
        0.0
    }
}

/// Random bytes and scales for a bitsandbytes-style view (fp8: finite codes, plus one e4m3
/// NaN code).
pub(super) fn raw_view_parts(
    rng: &mut Rng,
    qtype: QType,
    mode: Option<ScaleMode>,
    bs: usize,
    n: usize,
    k: usize,
) -> (Vec<u8>, Vec<f32>) {
    let mut data = rng.bytes(qtype.row_bytes(k, bs) * n);
    if matches!(qtype, QType::Fp8E4M3 | QType::Fp8E5M2) {
        let t = fp8_table(qtype == QType::Fp8E5M2);
        for b in data.iter_mut() {
            if !t[*b as usize].is_finite() {
                *b = 0;
            }
        }
    }
    let n_stats = match mode {
        Some(ScaleMode::Tensor) => 1,
        Some(ScaleMode::Row) => n,
        _ => n * k / bs,
    };
    let stats = (0..n_stats)
        .map(|_| rng.unit().abs() * 0.1 + 0.001)
        .collect();
    (data, stats)
}

/// qmatmul at `ms` rows (pool and one thread) against the bf16 reference of `deq` (N x K).
fn check(name: &str, v: &QuantizedView<'_>, deq: &[f32], ms: &[usize], rng: &mut Rng) {
    let (n, k) = (v.rows, v.cols);
    for &m in ms {
        let x = if m % 2 == 1 {
            mixed_acts(rng, m * k)
        } else {
            rng.normalish(m * k, 1.0)
        };
        let mut y = vec![0f32; m * n];
        qmatmul(&x, m, v, &mut y).unwrap();
        let mut y1 = vec![0f32; m * n];
        crate::parallel::set_num_threads(1);
        let one = qmatmul(&x, m, v, &mut y1);
        crate::parallel::set_num_threads(0);
        one.unwrap();
        for mi in 0..m {
            let xr = &x[mi * k..(mi + 1) * k];
            let mut rows = vec![0f32; n];
            if !bf16_path(v.qtype, m, k) {
                qmatmul(xr, 1, v, &mut rows).unwrap();
            }
            for row in 0..n {
                let wr = &deq[row * k..(row + 1) * k];
                let want = if bf16_path(v.qtype, m, k) {
                    dot_bf16(wr, xr)
                } else {
                    rows[row]
                };
                let (got, got1) = (y[mi * n + row], y1[mi * n + row]);
                // Jobs split the same way for any thread count: the same bits.
                assert!(
                    got.to_bits() == got1.to_bits(),
                    "{name} threads k={k} n={n} m={m} ({mi}, {row}): {got:e} vs {got1:e}"
                );
                let same = got.to_bits() == want.to_bits() || (got.is_nan() && want.is_nan());
                if !same && amx_path(v.qtype, m, k) && want.is_finite() {
                    // The tile path (its own arithmetic): within its float64 bound.
                    let exact: f64 = wr.iter().zip(xr).map(|(&a, &b)| a as f64 * b as f64).sum();
                    let bound = amx_bound(wr, xr);
                    assert!(
                        (got as f64 - exact).abs() <= bound,
                        "{name} amx bound k={k} ({mi}, {row}): {got} vs {exact}, bound {bound}"
                    );
                } else {
                    assert!(
                        same,
                        "{name} k={k} n={n} m={m} ({mi}, {row}): {got:e} vs {want:e}"
                    );
                }
                if bf16_path(v.qtype, m, k) && want.is_finite() {
                    let exact: f64 = wr.iter().zip(xr).map(|(&a, &b)| a as f64 * b as f64).sum();
                    let bound = error_bound(wr, xr);
                    assert!(
                        (want as f64 - exact).abs() <= bound,
                        "{name} bound k={k} ({mi}, {row}): {want} vs {exact}, bound {bound}"
                    );
                }
            }
        }
    }
}

#[test]
fn bf16_gemm_equals_its_reference_bnb_and_fp8() {
    // (the tiles must not be switched between the pool's call and the one thread's)
    let _lock = force_lock();
    let mut rng = Rng(0xbf16_0000_6e11_0019);
    let cases: [(QType, Option<ScaleMode>, usize, usize, usize); 11] = [
        (QType::NF4, None, 64, 576, 53),
        (QType::NF4, None, 32, 288, 7),
        (QType::NF4, None, 256, 512, 49),
        (QType::Int8, Some(ScaleMode::Row), 64, 288, 53),
        (QType::Int8, Some(ScaleMode::Block), 32, 544, 13),
        (QType::Int8, Some(ScaleMode::Tensor), 64, 256, 6),
        (QType::Int8, Some(ScaleMode::Block), 128, 640, 25),
        (QType::Fp8E4M3, Some(ScaleMode::Row), 64, 320, 53),
        (QType::Fp8E4M3, Some(ScaleMode::Block), 64, 576, 9),
        (QType::Fp8E5M2, Some(ScaleMode::Row), 64, 288, 11),
        (QType::Fp8E5M2, Some(ScaleMode::Block), 32, 256, 50),
    ];
    for (i, (qtype, mode, bs, k, n)) in cases.into_iter().enumerate() {
        let (mut data, stats) = raw_view_parts(&mut rng, qtype, mode, bs, n, k);
        if qtype == QType::Fp8E4M3 && mode == Some(ScaleMode::Block) {
            data[3 * k + 77] = 0x7f; // a NaN weight: its outputs are NaN on every path
        }
        // (the weights sharing a scale, as `dequantize` checks them)
        let block_size = match mode {
            Some(ScaleMode::Row) => k,
            Some(ScaleMode::Tensor) => n * k,
            _ => bs,
        };
        let v = QuantizedView {
            qtype,
            rows: n,
            cols: k,
            block_size,
            scale_mode: mode,
            data: &data,
            stats: &stats,
            double_quant: None,
        };
        let mut deq = vec![0f32; n * k];
        dequantize(&v, &mut deq).unwrap();
        let ms: &[usize] = if i < 2 {
            &[8, 37, 70, 300]
        } else {
            &[8, 16, 17, 64]
        };
        check(
            &format!("{qtype:?} {mode:?} bs={bs}"),
            &v,
            &deq,
            ms,
            &mut rng,
        );
    }
}

#[test]
fn bf16_gemm_equals_its_reference_grouped_integers() {
    // (the tiles must not be switched between the pool's call and the one thread's)
    let _lock = force_lock();
    let mut rng = Rng(0xbf16_0000_6e11_0013);
    let cases = [
        ("int4_g64", 576, 53),
        ("int4_g128_sym", 384, 7),
        ("int4_g32", 544, 49),
        ("int3_g64", 320, 9),
        ("int3_gch", 288, 11),
        ("int2_g32", 96, 6),
        ("int4_gch", 4128, 5),
        ("int8_g64_sym", 128, 50),
        ("int8_gch_sym", 96, 3),
        ("int8_g32_sym", 320, 13),
        ("int8_g128_sym", 384, 9),
    ];
    for (i, (name, k, n)) in cases.into_iter().enumerate() {
        let qtype = QType::parse(name).unwrap();
        let (q, deq) = quantized(&mut rng, qtype, n, k);
        let ms: &[usize] = if i == 0 {
            &[12, 37, 70, 300]
        } else {
            &[13, 33]
        };
        check(name, &q.view(), &deq, ms, &mut rng);
    }
}

/// Two panels of weight rows (the second partial: 160 = 144 + 16, so the output tiles of 16
/// columns are whole and partial) and two blocks of activation rows (530 = 512 + 18: the second
/// block ends in a vector of 2 rows, the half-width kernel), K two chunks and a piece; and 14
/// rows (one vector of 9-16 rows: the 24-row kernel and, on the partial panel, the 1-row one).
#[test]
fn bf16_gemm_equals_its_reference_across_panels_and_blocks() {
    // (the tiles must not be switched between the pool's call and the one thread's)
    let _lock = force_lock();
    let mut rng = Rng(0xbf16_0000_6e11_0530);
    let (n, k) = (160, 576);
    let (data, stats) = raw_view_parts(&mut rng, QType::NF4, None, 64, n, k);
    let v = QuantizedView {
        qtype: QType::NF4,
        rows: n,
        cols: k,
        block_size: 64,
        scale_mode: None,
        data: &data,
        stats: &stats,
        double_quant: None,
    };
    let mut deq = vec![0f32; n * k];
    dequantize(&v, &mut deq).unwrap();
    check("nf4 panels", &v, &deq, &[530, 14], &mut rng);
}

/// Both kernel families forced in turn: `x86::gemm16_fma` (f32 FMAs, chosen where `vdpbf16ps`
/// is slow, for the blocks of 24 x 1, 12 x 2, 8 x 3 and 6 x 4) and `gemm16::kernel`
/// (`vdpbf16ps`), each against the reference: M = 16, 32, 47, 64 (one to four vectors), 65
/// and 530 (blocks of 4 vectors, then 1 or 2; the 1-row blocks of a partial panel; a last
/// vector of 1 or 2 rows), K two chunks and a piece, activations with subnormals and tiny
/// values (`mixed_acts` at odd M).
/// The FMA kernels' run-time check (`semantics_hold`, their bits against `reference::bf16::step`
/// on subnormal and underflowing lanes) must pass wherever the `vdpbf16ps` one does: a kernel
/// that broke it would silently fall back at run time, so it fails here.
#[cfg(target_arch = "x86_64")]
#[test]
fn bf16_gemm_fma_and_dpbf16_kernels_equal_the_reference() {
    use crate::matmul::x86::{gemm16, gemm16_fma};
    if crate::cpu::has_avx512_bf16() && gemm16::semantics_hold() {
        assert!(
            gemm16_fma::semantics_hold(),
            "FMA kernels differ from reference::bf16"
        );
    }
    let mut rng = Rng(0xbf16_0000_f3a0_0019);
    let (n, k) = (160, 576);
    let (data, stats) = raw_view_parts(&mut rng, QType::NF4, None, 64, n, k);
    let v = QuantizedView {
        qtype: QType::NF4,
        rows: n,
        cols: k,
        block_size: 64,
        scale_mode: None,
        data: &data,
        stats: &stats,
        double_quant: None,
    };
    let mut deq = vec![0f32; n * k];
    dequantize(&v, &mut deq).unwrap();
    // (the AVX-512 kernels at every M: the tile path off meanwhile)
    let _lock = force_lock();
    crate::matmul::x86::amx_bf16::force(Some(false));
    for fma in [true, false] {
        gemm16_fma::force(Some(fma));
        check(
            &format!("nf4 fma={fma}"),
            &v,
            &deq,
            &[16, 32, 47, 64, 65, 530],
            &mut rng,
        );
    }
    gemm16_fma::force(None);
    crate::matmul::x86::amx_bf16::force(None);
}

/// The AMX tile path (where the process may use it: elsewhere these are the calls above again)
/// at M = 12 (one B tile, 4 lanes empty), 47 (2 x 2 blocks and a half-empty vector), 530 (blocks of 32
/// vectors, the last one of 2 rows) on two panels (144 rows: 2 x 2 and 1 x 2 blocks; 16 rows:
/// 1 x n), K two tile chunks and a piece; and the grouped int4 / int8 formats. Every output within
/// `amx_bf16::error_bound` of the float64 product, the same bits for 1 and 2 threads.
#[cfg(target_arch = "x86_64")]
#[test]
fn bf16_gemm_amx_tiles_within_their_bound() {
    let _lock = force_lock();
    crate::matmul::x86::amx_bf16::force(Some(true));
    let mut rng = Rng(0xbf16_0000_a3c0_0019);
    // K: two tile chunks (`amx_bf16::KCA` = 512) and a piece of 64.
    let (n, k) = (160, 1088);
    for qtype in [QType::NF4, QType::Int8] {
        let mode = (qtype == QType::Int8).then_some(ScaleMode::Block);
        let (data, stats) = raw_view_parts(&mut rng, qtype, mode, 64, n, k);
        let v = QuantizedView {
            qtype,
            rows: n,
            cols: k,
            block_size: 64,
            scale_mode: mode,
            data: &data,
            stats: &stats,
            double_quant: None,
        };
        let mut deq = vec![0f32; n * k];
        dequantize(&v, &mut deq).unwrap();
        check(
            &format!("{qtype:?} amx"),
            &v,
            &deq,
            &[16, 47, 530],
            &mut rng,
        );
    }
    for name in ["int4_g64", "int8_g64_sym"] {
        let qtype = QType::parse(name).unwrap();
        let (q, deq) = quantized(&mut rng, qtype, 40, 320);
        check(name, &q.view(), &deq, &[33], &mut rng);
    }
    crate::matmul::x86::amx_bf16::force(None);
}

/// The tile path on the shapes where its chunking has edges: K of one chunk of 32 columns, a
/// whole chunk and a last one of 32 (16 pairs: one tile step), two whole chunks and 288 (a
/// decode call of 256 and one of 32 per row); N = 150 (a panel of 144 and one of 6 rows: a
/// partial 16-row tile whose rows past N are never decoded); M = 17 (one vector and one row)
/// and 100 (7 vectors, the last of 4 rows). Every output within the tile bound, the same bits
/// for 1 and 2 threads, and an exact zero where a weight row is zero (a chunk decoded into the
/// wrong row or read at the wrong columns would show there).
#[cfg(target_arch = "x86_64")]
#[test]
fn bf16_gemm_amx_tiles_on_edge_shapes() {
    let _lock = force_lock();
    crate::matmul::x86::amx_bf16::force(Some(true));
    let mut rng = Rng(0xbf16_0000_0e1a_0019);
    let n = 150;
    for k in [32, 544, 1312] {
        let (mut data, stats) = raw_view_parts(&mut rng, QType::NF4, None, 32, n, k);
        // Rows 3 and 149 (the second panel) all zero weights: nf4 code 7 is 0.0 (bytes 0x77).
        let rb = QType::NF4.row_bytes(k, 32);
        for r in [3, 149] {
            data[r * rb..(r + 1) * rb].fill(0x77);
        }
        let v = QuantizedView {
            qtype: QType::NF4,
            rows: n,
            cols: k,
            block_size: 32,
            scale_mode: None,
            data: &data,
            stats: &stats,
            double_quant: None,
        };
        let mut deq = vec![0f32; n * k];
        dequantize(&v, &mut deq).unwrap();
        assert!(deq[3 * k..4 * k].iter().all(|&w| w == 0.0));
        check(&format!("edges k={k}"), &v, &deq, &[17, 100], &mut rng);
        let x = rng.normalish(100 * k, 1.0);
        let mut y = vec![1f32; 100 * n];
        qmatmul(&x, 100, &v, &mut y).unwrap();
        for mi in 0..100 {
            for r in [3, 149] {
                assert_eq!(y[mi * n + r], 0.0, "k={k} row {r} m {mi}");
            }
        }
    }
    crate::matmul::x86::amx_bf16::force(None);
}

/// The ggml formats (`x86/decode16_ggml.rs`) on the AMX bf16 tiles, where they take them: every
/// output within `amx_bf16::error_bound` of the float64 product of the dequantized weights, the
/// same bits for 1 and 2 threads, at and past the format's threshold (M = t, 47, 530: partial
/// and whole blocks of activation rows), on two panels (160 rows: 144 + 16) and K with two
/// whole chunks and, for the 32-weight formats, a partial one (576 = 2 · 256 + 64); below the
/// threshold (t - 1) and with the tiles turned off (as on a CPU without AMX) each output must
/// be the old paths' (the same row computed alone, M = 1, bit for bit).
#[cfg(target_arch = "x86_64")]
#[test]
fn bf16_gemm_ggml_formats_within_the_tile_bound() {
    use crate::matmul::x86::decode16_ggml::tests::FORMATS;
    let _lock = force_lock();
    let mut rng = Rng(0xbf16_0000_9919_0019);
    let n = 160;
    for qtype in FORMATS {
        let k = if qtype.info().block_size == 32 {
            576
        } else {
            512
        };
        let (q, deq) = quantized(&mut rng, qtype, n, k);
        let v = q.view();
        let t = crate::matmul::ggml_bf16_min_m(qtype, k);
        let ms: Vec<usize> = if t > 0 {
            vec![t - 1, t, 47, 530]
        } else {
            vec![47]
        };
        check(&format!("{qtype:?}"), &v, &deq, &ms, &mut rng);
        // The tiles off: the int8 paths at every M (`bf16_path` says so, `check` compares
        // with single rows).
        crate::matmul::x86::amx_bf16::force(Some(false));
        assert_eq!(crate::matmul::ggml_bf16_min_m(qtype, k), 0);
        assert!(!bf16_path(qtype, 530, k));
        check(&format!("{qtype:?} no amx"), &v, &deq, &[64], &mut rng);
        crate::matmul::x86::amx_bf16::force(None);
    }
}

/// The ggml formats on the small-M AMX bf16 tiles (`gemm_bf16_small.rs`, 8 to 16 rows) and the
/// big tile loop above them, sent there from 8 rows (`GgmlBf16From`, as
/// `FERROQUANT_GGML_BF16=8` does): every output within `amx_bf16::error_bound` of the float64
/// product of the dequantized weights and the same bits for 1 and 2 threads at M = 8, 12, 16
/// (small tiles), 31 and 47 (the big loop), on two jobs and a partial one (N = 40: 16 + 16 + 8)
/// and K of several 1024-column chunks and a partial one (2336 = 2 · 1024 + 288 for the
/// 32-weight formats, 2304 = 2 · 1024 + 256 for the K-quants).
#[cfg(target_arch = "x86_64")]
#[test]
fn bf16_gemm_ggml_formats_on_the_small_tiles_within_the_bound() {
    use crate::matmul::x86::decode16_ggml::tests::FORMATS;
    let _lock = force_lock();
    if !crate::matmul::x86::amx_bf16_small::use_small(8) {
        return; // no AMX bf16 here: the int8 paths' tests cover these formats
    }
    let _from = crate::matmul::GgmlBf16From::new(8);
    let mut rng = Rng(0xbf16_0000_5318_0008);
    let n = 40;
    for qtype in FORMATS {
        let k = if qtype.info().block_size == 32 {
            2336
        } else {
            2304
        };
        assert_eq!(crate::matmul::ggml_bf16_min_m(qtype, k), 8);
        let (q, deq) = quantized(&mut rng, qtype, n, k);
        let v = q.view();
        assert!(amx_path(qtype, 8, k));
        check(
            &format!("{qtype:?} from 8"),
            &v,
            &deq,
            &[8, 12, 16, 31, 47],
            &mut rng,
        );
    }
}

/// `gemm16::decode_fp8` element by element: every code of both formats (the e4m3 NaN codes of
/// both signs, e5m2's infinities and NaNs included) times scales from the flushed subnormals to
/// the overflowing (2.5e36 and f32::MAX: 256 · scale is infinite, the decoder's fallback), one
/// per 32 codes, equals `round_bf16(fp8_table[code] · scale)` bit for bit
/// (where AVX-512 BF16 runs).
#[cfg(target_arch = "x86_64")]
#[test]
fn decode_fp8_equals_the_rounded_table_on_every_code() {
    use crate::matmul::reference::bf16::round_bf16;
    if !crate::cpu::has_avx512_bf16() {
        return;
    }
    let scales = [
        1.0f32,
        0.37,
        -2.5,
        1e-30,
        3e-39,
        1e30,
        2.5e36,
        f32::MAX,
        f32::INFINITY,
    ];
    for e5m2 in [false, true] {
        let t = fp8_table(e5m2);
        // Every code in every 32-code chunk position, under every scale.
        let codes: Vec<u8> = (0..scales.len() * 256)
            .map(|i| (i * 33 + i / 256) as u8)
            .collect();
        let mut got = vec![0u16; codes.len()];
        let scale = |j: usize| scales[j % scales.len()];
        // SAFETY: AVX-512 BF16 checked above; 9 · 256 codes (a multiple of 32), room for all.
        unsafe { crate::matmul::x86::gemm16::decode_fp8(&codes, e5m2, scale, &mut got) };
        let mut seen = [0u32; 256];
        for (i, (&c, &g)) in codes.iter().zip(&got).enumerate() {
            seen[c as usize] += 1;
            let want = round_bf16(t[c as usize] * scale(i / 32));
            assert_eq!(g, want, "e5m2={e5m2} code {c:#04x} scale {}", scale(i / 32));
        }
        assert!(seen.iter().all(|&n| n > 0), "a code never decoded");
    }
}
