//! The K-quant GEMM path (`gemm_k.rs`, M >= `GEMM_K_MIN_M` with AVX-512 VNNI/BW) against
//! `reference::dot_block_k`, bit for bit: every format, N not a multiple of the 16-row vector
//! or the 32-row panel (zero-padded lanes), K of 1 to 9 super-blocks (chunks of `KC`, the last
//! partial, lanes b % 8 wrapping), M with partial groups of 4 rows and over one block of rows,
//! on the pool and on one thread.

use super::super::gemm_k::{GEMM_K_MAX_BLOCK, GEMM_K_MIN_M};
use super::super::reference::{self as r, BlockQ8K};
use super::{blocks, view, Rng};
use crate::formats::blocks::*;
use crate::matmul::qmatmul;
use crate::qtype::QType;
use bytemuck::Zeroable;

/// Every K-quant of the path and the offsets of its f16 fields.
pub(super) const CASES: [(QType, &[usize]); 6] = [
    (QType::Q4K, &[0, 2]),
    (QType::Q5K, &[0, 2]),
    (QType::Q6K, &[208]),
    (QType::Q2K, &[80, 82]),
    (QType::Q3K, &[108]),
    (QType::IQ4XS, &[0]),
];

pub(super) fn reference(qtype: QType, w: &[u8], x: &[BlockQ8K]) -> f32 {
    match qtype {
        QType::Q4K => r::dot_block_k::<BlockQ4K>(bytemuck::cast_slice(w), x),
        QType::Q5K => r::dot_block_k::<BlockQ5K>(bytemuck::cast_slice(w), x),
        QType::Q6K => r::dot_block_k::<BlockQ6K>(bytemuck::cast_slice(w), x),
        QType::Q2K => r::dot_block_k::<BlockQ2K>(bytemuck::cast_slice(w), x),
        QType::Q3K => r::dot_block_k::<BlockQ3K>(bytemuck::cast_slice(w), x),
        _ => r::dot_block_k::<BlockIQ4XS>(bytemuck::cast_slice(w), x),
    }
}

#[test]
fn k_quant_gemm_equals_reference_on_any_shape_and_thread_count() {
    shapes(false);
}

/// The same with the AVX2 K-quant GEMM forced (`gemm_avx2/k.rs`: panels of 16 rows, blocks
/// of 64 activation rows, kernel calls of 1..3 rows), also below its `MIN_M`.
#[cfg(target_arch = "x86_64")]
#[test]
fn avx2_k_quant_gemm_equals_reference_on_any_shape_and_thread_count() {
    if crate::cpu::has_avx2() {
        let _force = Avx2::new();
        shapes(true);
    }
}

/// Forces the AVX2 GEMM on this thread while alive.
#[cfg(target_arch = "x86_64")]
struct Avx2;

#[cfg(target_arch = "x86_64")]
impl Avx2 {
    fn new() -> Self {
        super::super::gemm_avx2::FORCE.set(Some(super::super::gemm_avx2::Int8Dot::Maddubs));
        Avx2
    }
}

#[cfg(target_arch = "x86_64")]
impl Drop for Avx2 {
    fn drop(&mut self) {
        super::super::gemm_avx2::FORCE.set(None);
    }
}

fn shapes(avx2: bool) {
    // (the int8 paths: on AMX the ggml formats take the bf16 tiles from `ggml_bf16_min_m`)
    let _int8 = crate::matmul::GgmlInt8::new();
    // (the VNNI kernel: the AMX tiles have `tests/amx_k.rs`)
    #[cfg(target_arch = "x86_64")]
    let _vnni = crate::matmul::gemm_amx_k::Force::new(false);
    const { assert!(GEMM_K_MIN_M <= 5 && GEMM_K_MAX_BLOCK < 67) };
    let mut rng = Rng(0x6e33_6b00_6e33_6b00);
    let avx2_shapes: &[(usize, usize, usize)] = if avx2 {
        &[
            (16, 1, 2),
            (15, 2, 3),
            (9, 7, 130),
            (31, 3, 64),
            (40, 2, 193),
        ]
    } else {
        &[]
    };
    for (qtype, halves) in CASES {
        let info = qtype.info();
        for &(n, nb, m) in [
            (5, 1, 5),
            (17, 3, 4),
            (33, 2, 7),
            (47, 9, 6),
            (32, 5, 67),
            (70, 4, 9),
        ]
        .iter()
        .chain(avx2_shapes)
        {
            let k = nb * info.block_size;
            let data = blocks(&mut rng, n * nb, info.type_size, halves);
            let x = rng.normalish(m * k, 2.0);
            let w = view(qtype, n, k, &data);
            let plan = super::super::plan::plan(&x, m, &w, m * n).unwrap();
            #[cfg(target_arch = "x86_64")]
            if avx2 {
                let k2 = super::super::gemm_avx2::k::takes(qtype);
                assert!(
                    !plan.gemm && plan.gemm2.is_some() == k2,
                    "{qtype:?}: AVX2 GEMM"
                );
                assert_eq!(k2, qtype != QType::IQ4XS);
            } else {
                assert_eq!(
                    plan.gemm,
                    crate::cpu::has_vnni_bw(),
                    "{qtype:?}: the GEMM path runs"
                );
            }
            drop(plan);
            let mut y = vec![0.0f32; m * n];
            qmatmul(&x, m, &w, &mut y).unwrap();
            let mut y1 = vec![0.0f32; m * n];
            crate::parallel::set_num_threads(1);
            let one = qmatmul(&x, m, &w, &mut y1);
            crate::parallel::set_num_threads(0);
            one.unwrap();
            let mut xq = vec![BlockQ8K::zeroed(); nb];
            for mi in 0..m {
                r::quantize_row_q8_k(&x[mi * k..(mi + 1) * k], &mut xq);
                for row in 0..n {
                    let wr = &data[row * nb * info.type_size..(row + 1) * nb * info.type_size];
                    let want = reference(qtype, wr, &xq);
                    for (got, what) in [(y[mi * n + row], "pool"), (y1[mi * n + row], "1 thread")] {
                        assert_eq!(
                            got.to_bits(),
                            want.to_bits(),
                            "{qtype:?} {what} n={n} nb={nb} m={m} row {row} act row {mi}: \
                             {got} vs {want}"
                        );
                    }
                }
            }
        }
    }
}

/// The largest integer sums the kernel packs or multiplies: every quant at its largest or
/// smallest value (all-0xff or all-zero blocks: q3_k's -4 and 3, q2_k's 3, q6_k's -32), every
/// scale at an end of its range, and activations that all quantize to -128 or alternate
/// between -128 and 127; the i16 pairs of q3_k / q2_k (`PAIR16`) and the `-BIAS·Σx` starts of
/// the group sums must give the reference's bits there too.
#[test]
fn k_quant_gemm_equals_reference_at_extreme_sums() {
    extremes(false);
}

/// The same on the AVX2 K-quant GEMM (forced): there the i16 sums of `vpmaddubsw` pairs
/// (`Levels::FOLD` dwords of them) are at their largest; and f16 scales of inf and NaN.
#[cfg(target_arch = "x86_64")]
#[test]
fn avx2_k_quant_gemm_equals_reference_at_extreme_sums() {
    if crate::cpu::has_avx2() {
        let _force = Avx2::new();
        extremes(true);
    }
}

fn extremes(avx2: bool) {
    #[cfg(target_arch = "x86_64")]
    let _vnni = crate::matmul::gemm_amx_k::Force::new(false);
    let one = f16_from_f32(1.0);
    let (n, nb, m) = (33, 2, 5);
    let specials: &[[u8; 2]] = if avx2 {
        &[one, f16_from_f32(f32::INFINITY), f16_from_f32(f32::NAN)]
    } else {
        &[one]
    };
    for (qtype, halves) in CASES {
        let info = qtype.info();
        let k = nb * info.block_size;
        for (fill, &h) in [0x00u8, 0xff, 0x0f, 0xf0]
            .into_iter()
            .flat_map(|f| specials.iter().map(move |h| (f, h)))
        {
            let mut data = vec![fill; n * nb * info.type_size];
            for b in 0..n * nb {
                for &o in halves {
                    // (one row's super-blocks take the special scale, the others 1)
                    let v = if b / nb == 7 { h } else { one };
                    data[b * info.type_size + o..][..2].copy_from_slice(&v);
                }
            }
            let xs = [
                vec![-1.0f32; m * k],
                (0..m * k)
                    .map(|i| if i % 2 == 0 { -1.0 } else { 0.99 })
                    .collect(),
            ];
            for x in xs {
                let w = view(qtype, n, k, &data);
                let mut y = vec![0.0f32; m * n];
                qmatmul(&x, m, &w, &mut y).unwrap();
                let mut xq = vec![BlockQ8K::zeroed(); nb];
                for mi in 0..m {
                    r::quantize_row_q8_k(&x[mi * k..(mi + 1) * k], &mut xq);
                    assert!(xq
                        .iter()
                        .all(|b| b.qs.iter().all(|q| q.unsigned_abs() >= 126)));
                    for row in 0..n {
                        let wr = &data[row * nb * info.type_size..][..nb * info.type_size];
                        let want = reference(qtype, wr, &xq);
                        let got = y[mi * n + row];
                        assert_eq!(
                            got.to_bits(),
                            want.to_bits(),
                            "{qtype:?} fill {fill:#x} row {row} act row {mi}: {got} vs {want}"
                        );
                    }
                }
            }
        }
    }
}
