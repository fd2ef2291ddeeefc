//! The K-quants' AMX int8 GEMM (`gemm_amx_k.rs`, `x86::amx_k`) against
//! `reference::dot_block_k`, bit for bit: every K-quant, N with and without a partial panel of
//! 16, M with and without a partial block of 16 rows (and below 16), K of one super-block up
//! to 14336, on the pool and on one thread; then the extreme integer sums. The plans here take
//! the tiles at every M (`Force`) where AMX int8 is usable; elsewhere the same cases run on the
//! VNNI or scalar paths and must give the same bits.

use super::super::gemm_amx_k::{min_m, takes, Force, KC_SB};
use super::super::reference::{self as r, BlockQ8K};
use super::gemm_k::{reference, CASES};
use super::{blocks, view, Rng};
use crate::formats::blocks::*;
use crate::matmul::qmatmul;
use bytemuck::Zeroable;

/// `qmatmul` of the case on the pool and on one thread, each output against the reference.
fn check(qtype: crate::qtype::QType, n: usize, k: usize, m: usize, data: &[u8], x: &[f32]) {
    let info = qtype.info();
    let nb = k / info.block_size;
    let w = view(qtype, n, k, data);
    let p = super::super::plan::plan(x, m, &w, m * n).unwrap();
    assert_eq!(
        p.amx_k.is_some(),
        p.gemm && crate::amx::amx_int8_usable(),
        "{qtype:?} m={m}: the tiles run"
    );
    drop(p);
    let mut y = vec![0.0f32; m * n];
    qmatmul(x, m, &w, &mut y).unwrap();
    let mut y1 = vec![0.0f32; m * n];
    crate::parallel::set_num_threads(1);
    let one = qmatmul(x, m, &w, &mut y1);
    crate::parallel::set_num_threads(0);
    one.unwrap();
    let rb = nb * info.type_size;
    let mut xq = vec![BlockQ8K::zeroed(); nb];
    for mi in 0..m {
        r::quantize_row_q8_k(&x[mi * k..(mi + 1) * k], &mut xq);
        for row in 0..n {
            let want = reference(qtype, &data[row * rb..][..rb], &xq);
            for (got, what) in [(y[mi * n + row], "pool"), (y1[mi * n + row], "1 thread")] {
                assert_eq!(
                    got.to_bits(),
                    want.to_bits(),
                    "{qtype:?} {what} n={n} k={k} m={m} row {row} act row {mi}: {got} vs {want}"
                );
            }
        }
    }
}

#[test]
fn amx_k_gemm_equals_reference_on_any_shape_and_thread_count() {
    // (the int8 paths: on AMX the ggml formats take the bf16 tiles from `ggml_bf16_min_m`)
    let _int8 = crate::matmul::GgmlInt8::new();
    let _amx = Force::new(true);
    let mut rng = Rng(0xa3c0_6b19_a3c0_6b19);
    for (qtype, halves) in CASES {
        let info = qtype.info();
        for (n, nb, m) in [
            (16, 1, 16),
            (5, 1, 4),
            (17, 3, 17),
            (33, 9, 31),
            (48, 2, 64),
            (70, 4, 9),
            (31, 5, 67),
            (17, 56, 18),
            (18, 17, 33),
            (16, 33, 40),
        ] {
            let k = nb * info.block_size;
            let data = blocks(&mut rng, n * nb, info.type_size, halves);
            let x = rng.normalish(m * k, 2.0);
            check(qtype, n, k, m, &data, &x);
        }
    }
}

/// The plan takes the tiles from `min_m` rows exactly where AMX int8 is usable, at K of one
/// chunk (`KC_SB` super-blocks) and of several.
#[test]
fn amx_k_gemm_runs_from_min_m() {
    let _int8 = crate::matmul::GgmlInt8::new();
    for (qtype, _) in CASES {
        for k in [KC_SB * QK_K, 14336] {
            let t = min_m(qtype, k).expect("every K-quant has a threshold");
            assert_eq!(
                takes(qtype, t, k),
                crate::amx::amx_int8_usable(),
                "{qtype:?} k={k}"
            );
            assert!(!takes(qtype, t - 1, k), "{qtype:?} k={k}");
        }
    }
}

/// `k_route`'s table: every K-quant has its row, and the plan follows it where AMX runs: the
/// VNNI GEMM below the tiles, the tiles up to the bf16 route, the route from there (K of one
/// chunk and of four). (q4_k / q5_k take the route before their tiles' start: the tiles run
/// there only with the route off.)
#[test]
fn plans_follow_the_k_route_table() {
    use super::super::k_route::k_route;
    let mut rng = Rng(0x4b52_4f55_5445_0001);
    let default = std::env::var_os("FERROQUANT_GGML_BF16").is_none();
    for (qtype, halves) in CASES {
        let info = qtype.info();
        for k in [KC_SB * QK_K, 14336] {
            let r = k_route(qtype, k).expect("a K-quant's row");
            let tiles = r.tiles.expect("tiles");
            let t = crate::matmul::ggml_bf16_min_m(qtype, k);
            if t > 0 && default {
                assert_eq!(
                    t, r.bf16,
                    "{qtype:?} k={k}: the route's threshold is the table's"
                );
            }
            let n = 16;
            let data = blocks(&mut rng, n * (k / info.block_size), info.type_size, halves);
            let w = view(qtype, n, k, &data);
            for m in [tiles - 1, tiles, r.bf16 - 1, r.bf16] {
                let x = vec![0.5f32; m * k];
                let p = super::super::plan::plan(&x, m, &w, m * n).unwrap();
                let route = t > 0 && m >= t;
                assert_eq!(p.bf16.is_some(), route, "{qtype:?} k={k} m={m}: the route");
                let amx = !route && m >= tiles && crate::amx::amx_int8_usable();
                assert_eq!(p.amx_k.is_some(), amx, "{qtype:?} k={k} m={m}: the tiles");
            }
        }
    }
}

/// Every quant at an end of its range, every scale at an end of its range, and activations
/// that all quantize to -128 or alternate between -128 and 127: the signed quants, the i16
/// pairs of q3_k / q2_k and the min terms give the reference's bits there too.
#[test]
fn amx_k_gemm_equals_reference_at_extreme_sums() {
    let _int8 = crate::matmul::GgmlInt8::new();
    let _amx = Force::new(true);
    let one = f16_from_f32(1.0);
    let (n, nb, m) = (33, 2, 17);
    for (qtype, halves) in CASES {
        let info = qtype.info();
        let k = nb * info.block_size;
        for fill in [0x00u8, 0xff, 0x0f, 0xf0, 0x80] {
            let mut data = vec![fill; n * nb * info.type_size];
            for b in 0..n * nb {
                for &o in halves {
                    data[b * info.type_size + o..][..2].copy_from_slice(&one);
                }
            }
            let xs = [
                vec![-1.0f32; m * k],
                (0..m * k)
                    .map(|i| if i % 2 == 0 { -1.0 } else { 0.99 })
                    .collect(),
            ];
            for x in xs {
                check(qtype, n, k, m, &data, &x);
            }
        }
    }
}
