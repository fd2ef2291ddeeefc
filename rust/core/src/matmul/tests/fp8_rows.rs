//! fp8 at M >= 1 (`rows_fp8.rs` with AVX2 where there is no AVX-512; elsewhere whatever `plan`
//! chooses): every output bit for bit `reference::dot_fp8` of its rows, for M = 1..17 (groups
//! of 1 to 4 activation rows), N not a multiple of the panel, K with partial pieces and tails,
//! per-row, per-tensor and block scales, a NaN code, e4m3 with and without the bit map (|x| <
//! 2^8 or not), on the pool and on one thread.

use super::*;
use crate::matmul::reference::WIDE;

#[test]
fn fp8_rows_in_pieces_equal_the_reference_bit_for_bit() {
    let mut rng = Rng(0xf8f8_0000_2020_0707);
    let cases: [(QType, Option<ScaleMode>, usize, usize, usize); 8] = [
        // (qtype, scales, block, K, N): K past one piece (1024), pieces ending mid-block
        (QType::Fp8E4M3, Some(ScaleMode::Row), 64, 2100, 19),
        (QType::Fp8E4M3, Some(ScaleMode::Block), 32, 2144, 9),
        (QType::Fp8E4M3, Some(ScaleMode::Block), 2048, 4096, 11),
        (QType::Fp8E4M3, Some(ScaleMode::Tensor), 64, 1088, 17),
        (QType::Fp8E5M2, Some(ScaleMode::Row), 64, 1100, 10),
        (QType::Fp8E5M2, Some(ScaleMode::Block), 64, 1088, 8),
        (QType::Fp8E5M2, Some(ScaleMode::Block), 32, 96, 3),
        (QType::Fp8E4M3, Some(ScaleMode::Row), 64, WIDE, 5),
    ];
    #[cfg(target_arch = "x86_64")]
    let mut ran = false;
    #[cfg(target_arch = "x86_64")]
    let avx2_only = !crate::cpu::has_avx512() && crate::cpu::has_fma() && crate::cpu::has_avx2();
    for (qtype, mode, bs, k, n) in cases {
        let mut data = rng.bytes(qtype.row_bytes(k, bs) * n);
        let t = r::fp8_table(qtype == QType::Fp8E5M2);
        for b in data.iter_mut() {
            if !t[*b as usize].is_finite() {
                *b = 0;
            }
        }
        if qtype == QType::Fp8E4M3 {
            data[2 * k + k / 3] = 0x7f; // a NaN code: row 2's outputs are NaN
        }
        let n_stats = match mode {
            Some(ScaleMode::Tensor) => 1,
            Some(ScaleMode::Row) => n,
            _ => n * k.div_ceil(bs),
        };
        let stats: Vec<f32> = (0..n_stats).map(|_| rng.unit().abs() + 0.01).collect();
        let v = QuantizedView {
            qtype,
            rows: n,
            cols: k,
            block_size: bs,
            scale_mode: mode,
            data: &data,
            stats: &stats,
            double_quant: None,
        };
        let bl = if matches!(mode, Some(ScaleMode::Row | ScaleMode::Tensor)) {
            k
        } else {
            bs
        };
        let spr = k.div_ceil(bl);
        let row_stats = |row: usize| -> &[f32] {
            match mode {
                Some(ScaleMode::Tensor) => &stats[..],
                _ => &stats[row * spr..(row + 1) * spr],
            }
        };
        // e4m3 also with every |x| < 2^8: decoded by the bit map (`x86::Fp8E4M3F32`)
        let smalls: &[bool] = if qtype == QType::Fp8E4M3 {
            &[false, true]
        } else {
            &[false]
        };
        for (m, &small) in (1..=17).flat_map(|m| smalls.iter().map(move |s| (m, s))) {
            let mut x = mixed_acts(&mut rng, m * k);
            if small {
                let edge = f32::from_bits(256.0f32.to_bits() - 1);
                for v in x.iter_mut().filter(|v| v.abs() >= 256.0) {
                    *v = edge.copysign(*v);
                }
            }
            #[cfg(target_arch = "x86_64")]
            {
                let p = plan(&x, m, &v, m * n).unwrap();
                if avx2_only && p.simd {
                    assert_eq!(p.e4m3_f32, small, "{qtype:?} k={k} m={m}");
                    assert_eq!(p.fp8_pieces(), m >= 4 || small, "{qtype:?} k={k} m={m}");
                }
                ran |= p.fp8_pieces();
                if p.bf16.is_some() {
                    continue; // the bf16 GEMM: its own numerics (`tests/bf16.rs`)
                }
            }
            let mut y = vec![0.0f32; m * n];
            qmatmul(&x, m, &v, &mut y).unwrap();
            let mut y1 = vec![0.0f32; m * n];
            crate::parallel::set_num_threads(1);
            let one = qmatmul(&x, m, &v, &mut y1);
            crate::parallel::set_num_threads(0);
            one.unwrap();
            for mi in 0..m {
                for row in 0..n {
                    let w = &data[row * k..(row + 1) * k];
                    let xr = &x[mi * k..(mi + 1) * k];
                    let want = r::dot_fp8(w, row_stats(row), bl, xr, qtype == QType::Fp8E5M2);
                    for (got, what) in [(y[mi * n + row], "pool"), (y1[mi * n + row], "1 thread")] {
                        assert!(
                            got.to_bits() == want.to_bits() || (got.is_nan() && want.is_nan()),
                            "{qtype:?} {mode:?} k={k} m={m} ({mi}, {row}) {what}: {got:e} vs {want:e}"
                        );
                    }
                    assert_eq!(want.is_nan(), qtype == QType::Fp8E4M3 && row == 2);
                }
            }
        }
    }
    #[cfg(target_arch = "x86_64")]
    if avx2_only && use_simd() {
        assert!(ran, "the pieces never ran: the test cannot fail");
    }
}
