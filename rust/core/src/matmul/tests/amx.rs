//! The AMX int8 GEMM (`gemm_amx.rs`, `x86::amx32`): every output has the reference's bits
//! (`reference::dot_block32` / `dot_block32_min`), for every 32-weight format, M below and
//! above the format's `min_m`, on and off whole tiles of 16 rows, N with and without a partial panel of 16 (its last rows on the
//! AVX-512 GEMM), K of one block up to past one chunk, any thread count. Where AMX int8 is
//! not usable (no AMX, no permission, `FERROQUANT_MAX_ISA`) the same cases run on the AVX-512
//! or scalar paths and must give the same bits: nothing here depends on the machine.

use super::*;

/// The 32-weight formats and the halves of their blocks that hold f16 scales.
const CASES: [(QType, &[usize]); 6] = [
    (QType::Q4_0, &[0]),
    (QType::Q5_0, &[0]),
    (QType::Q8_0, &[0]),
    (QType::IQ4NL, &[0]),
    (QType::Q4_1, &[0, 2]),
    (QType::Q5_1, &[0, 2]),
];

/// The reference dot of weight row `wr` with activation row `x` (quantized as `plan` does).
fn reference_dot(qtype: QType, wr: &[u8], x: &[f32], nb: usize) -> f32 {
    if matches!(qtype, QType::Q4_1 | QType::Q5_1) {
        let mut xq = vec![r::BlockQ8_1::zeroed(); nb];
        r::quantize_row_q8_1(x, &mut xq);
        let xb: Vec<BlockQ8_0> = xq.iter().map(|b| BlockQ8_0 { d: b.d, qs: b.qs }).collect();
        let xd: Vec<f32> = xq.iter().map(|b| f16_to_f32(b.d)).collect();
        let xs: Vec<f32> = xq.iter().map(|b| f16_to_f32(b.s)).collect();
        return if qtype == QType::Q4_1 {
            r::dot_block32_min::<BlockQ4_1>(bytemuck::cast_slice(wr), &xb, &xd, &xs)
        } else {
            r::dot_block32_min::<BlockQ5_1>(bytemuck::cast_slice(wr), &xb, &xd, &xs)
        };
    }
    let mut xq = vec![BlockQ8_0::zeroed(); nb];
    r::quantize_row_q8_0(x, &mut xq);
    let xd: Vec<f32> = xq.iter().map(|b| f16_to_f32(b.d)).collect();
    match qtype {
        QType::Q4_0 => r::dot_block32::<BlockQ4_0>(bytemuck::cast_slice(wr), &xq, &xd),
        QType::Q5_0 => r::dot_block32::<BlockQ5_0>(bytemuck::cast_slice(wr), &xq, &xd),
        QType::Q8_0 => r::dot_block32::<BlockQ8_0>(bytemuck::cast_slice(wr), &xq, &xd),
        _ => r::dot_block32::<BlockIQ4NL>(bytemuck::cast_slice(wr), &xq, &xd),
    }
}

#[test]
fn amx_gemm_equals_reference() {
    // (the int8 paths: on AMX the ggml formats take the bf16 tiles from `ggml_bf16_min_m`)
    let _int8 = crate::matmul::GgmlInt8::new();
    let mut rng = Rng(0xa4c5_0019_a4c5_0019);
    for (qtype, halves) in CASES {
        let info = qtype.info();
        for (n, nb, m) in [
            (16, 1, 16),
            (16, 8, 17),
            (32, 9, 31),
            (40, 18, 16),
            (17, 66, 40),
            (48, 130, 67),
            (64, 16, 130),
            // issue 19's M = 16 and 64 (q8_0 / q5_1 on the tiles from 16, q4_0 / iq4_nl from
            // 64): whole blocks of rows, pairs of panels and an odd one out
            (48, 20, 64),
            (32, 130, 16),
            // above every format's `gemm_amx::min_m`, the last block of rows partial and an
            // odd number of blocks of rows and of panels (the 2 x 2 kernel and the single
            // one), N with a partial panel, K with a step of 4 blocks and a rest
            (32, 9, 520),
            (33, 18, 512),
            (16, 1, 529),
        ] {
            let k = nb * info.block_size;
            // Extreme weights too: each format's largest magnitudes come from random bytes.
            let data = blocks(&mut rng, n * nb, info.type_size, halves);
            let x = rng.normalish(m * k, 2.0);
            let w = view(qtype, n, k, &data);
            #[cfg(target_arch = "x86_64")]
            {
                // The plan takes the AMX path exactly where AMX int8 is usable and M is large
                // enough (every format from M = 512 on).
                let p = plan(&x, m, &w, m * n).unwrap();
                let on = crate::matmul::gemm_amx::takes(qtype, m);
                assert_eq!(p.amx.is_some(), p.gemm && on, "{qtype:?} m={m}");
                if m >= 512 {
                    assert_eq!(on, crate::amx::amx_int8_usable(), "{qtype:?} m={m}");
                }
            }
            let mut y = vec![0.0f32; m * n];
            qmatmul(&x, m, &w, &mut y).unwrap();
            let mut y1 = vec![0.0f32; m * n];
            crate::parallel::set_num_threads(1);
            let one = qmatmul(&x, m, &w, &mut y1);
            crate::parallel::set_num_threads(0);
            one.unwrap();
            let rb = nb * info.type_size;
            for mi in 0..m {
                for row in 0..n {
                    let want = reference_dot(qtype, &data[row * rb..][..rb], &x[mi * k..][..k], nb);
                    for (got, what) in [(y[mi * n + row], "pool"), (y1[mi * n + row], "1 thread")] {
                        assert_eq!(
                            got.to_bits(),
                            want.to_bits(),
                            "{qtype:?} {what} n={n} nb={nb} m={m} ({mi}, {row}): {got} vs {want}"
                        );
                    }
                }
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[test]
fn tiles32_switch_moves_the_threshold() {
    use crate::matmul::gemm_amx::{from_rows, min_m};
    for (qtype, _) in CASES {
        let table = min_m(qtype);
        assert!(table.is_some(), "{qtype:?}");
        assert_eq!(from_rows(qtype, None), table, "{qtype:?}");
        assert_eq!(from_rows(qtype, Some(0)), None, "{qtype:?}");
        assert_eq!(from_rows(qtype, Some(24)), Some(24), "{qtype:?}");
        // never below the AVX-512 GEMM's start (the tiles run inside its tasks)
        assert_eq!(from_rows(qtype, Some(1)), Some(4), "{qtype:?}");
    }
    // formats without the tiles stay without them
    assert_eq!(from_rows(QType::Q4K, Some(16)), None);
    assert_eq!(from_rows(QType::NF4, None), None);
}
