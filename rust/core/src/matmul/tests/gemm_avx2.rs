//! The GEMM path of CPUs without AVX-512 (`gemm_avx2.rs`, `x86/gemm32_avx2.rs`), forced on
//! this thread whatever the CPU has beyond AVX2: every output has the reference's bits with
//! both integer products (AVX2 `vpmaddubsw` and, where the CPU has it, AVX-VNNI), on the pool
//! and on one thread, for N with a partial panel, K with a partial group, under one group and
//! over several chunks, M odd, below and above one block of activation rows.

use super::super::gemm_avx2::{Int8Dot, FORCE};
use super::*;

/// `reference::dot_block32` (q8_0 activations) or `dot_block32_min` (q8_1) of every weight row
/// with every activation row, M x N.
fn reference_outputs(qtype: QType, data: &[u8], n: usize, x: &[f32], m: usize) -> Vec<f32> {
    let info = qtype.info();
    let k = x.len() / m;
    let nb = k / QK8_0;
    let mut y = vec![0.0f32; m * n];
    for mi in 0..m {
        let xr = &x[mi * k..(mi + 1) * k];
        let mut q81 = vec![r::BlockQ8_1::zeroed(); nb];
        r::quantize_row_q8_1(xr, &mut q81);
        let mut q80 = vec![BlockQ8_0::zeroed(); nb];
        r::quantize_row_q8_0(xr, &mut q80);
        let min = matches!(qtype, QType::Q4_1 | QType::Q5_1);
        let xb: Vec<BlockQ8_0> = if min {
            q81.iter().map(|b| BlockQ8_0 { d: b.d, qs: b.qs }).collect()
        } else {
            q80
        };
        let xd: Vec<f32> = xb.iter().map(|b| f16_to_f32(b.d)).collect();
        let xs: Vec<f32> = q81.iter().map(|b| f16_to_f32(b.s)).collect();
        for row in 0..n {
            let wr = &data[row * nb * info.type_size..(row + 1) * nb * info.type_size];
            y[mi * n + row] = match qtype {
                QType::Q4_0 => r::dot_block32::<BlockQ4_0>(bytemuck::cast_slice(wr), &xb, &xd),
                QType::Q5_0 => r::dot_block32::<BlockQ5_0>(bytemuck::cast_slice(wr), &xb, &xd),
                QType::Q8_0 => r::dot_block32::<BlockQ8_0>(bytemuck::cast_slice(wr), &xb, &xd),
                QType::IQ4NL => r::dot_block32::<BlockIQ4NL>(bytemuck::cast_slice(wr), &xb, &xd),
                QType::Q4_1 => {
                    r::dot_block32_min::<BlockQ4_1>(bytemuck::cast_slice(wr), &xb, &xd, &xs)
                }
                _ => r::dot_block32_min::<BlockQ5_1>(bytemuck::cast_slice(wr), &xb, &xd, &xs),
            };
        }
    }
    y
}

fn products() -> Vec<Int8Dot> {
    let mut v = Vec::new();
    if crate::cpu::has_avx2() {
        v.push(Int8Dot::Maddubs);
    }
    if crate::cpu::has_avx_vnni() {
        v.push(Int8Dot::AvxVnni);
    }
    v
}

#[test]
fn avx2_gemm_equals_reference() {
    // (the int8 paths: on AMX the ggml formats take the bf16 tiles from `ggml_bf16_min_m`)
    let _int8 = crate::matmul::GgmlInt8::new();
    let mut rng = Rng(0xa2a2_6e33_a2a2_6e33);
    let dots = products();
    for qtype in [
        QType::Q4_0,
        QType::Q5_0,
        QType::Q8_0,
        QType::IQ4NL,
        QType::Q4_1,
        QType::Q5_1,
    ] {
        let info = qtype.info();
        let halves: &[usize] = if matches!(qtype, QType::Q4_1 | QType::Q5_1) {
            &[0, 2]
        } else {
            &[0]
        };
        for (n, nb, m) in [
            // one group, N one panel plus a partial one, M odd
            (7, 8, 5),
            // K under one group (only the scalar tail), 576 (2 groups + 2 blocks)
            (4, 3, 4),
            (9, 18, 16),
            // several chunks (17 groups: 8 + 8 + 1) plus a tail, N over a task
            (70, 139, 3),
            // M over one block of activation rows (64), N several panels
            (12, 16, 67),
            (5, 9, 2),
        ] {
            let k = nb * info.block_size;
            let mut data = blocks(&mut rng, n * nb, info.type_size, halves);
            if qtype == QType::Q8_0 {
                // every row holds the weight -128 (|w| = 128 in the AVX2 kernel)
                for row in 0..n {
                    data[row * nb * info.type_size + 2] = 0x80;
                }
            }
            // The integer sums' extremes: weight rows of all-ones, all-zero and (q8_0) 0x80
            // quant bytes (the largest and smallest levels), against activation rows of all
            // +127 and all -127 quants (where the i16 sums would overflow first).
            let row_bytes = nb * info.type_size;
            for (row, byte) in [(1, 0xff), (2, 0x00), (3, 0x80)] {
                if row < n {
                    for (i, v) in data[row * row_bytes..(row + 1) * row_bytes]
                        .iter_mut()
                        .enumerate()
                    {
                        if !halves
                            .iter()
                            .any(|&h| (h..h + 2).contains(&(i % info.type_size)))
                        {
                            *v = byte;
                        }
                    }
                }
            }
            let mut x = rng.normalish(m * k, 2.0);
            // rows of large and of tiny values (activation quants at ±127 and near 0)
            x[..k].iter_mut().for_each(|v| *v *= 1e4);
            if m > 1 {
                x[k..2 * k].iter_mut().for_each(|v| *v *= 1e-6);
            }
            for (mi, v) in [(2, 1.0), (3, -1.0)] {
                if mi < m {
                    x[mi * k..(mi + 1) * k].fill(v);
                }
            }
            let want = reference_outputs(qtype, &data, n, &x, m);
            let w = view(qtype, n, k, &data);
            for &dot in &dots {
                FORCE.set(Some(dot));
                let p = plan(&x, m, &w, m * n).map(|p| p.gemm2);
                let mut y = vec![0.0f32; m * n];
                let pool = qmatmul(&x, m, &w, &mut y);
                let mut y1 = vec![0.0f32; m * n];
                crate::parallel::set_num_threads(1);
                let one = qmatmul(&x, m, &w, &mut y1);
                crate::parallel::set_num_threads(0);
                FORCE.set(None);
                assert_eq!(p.unwrap(), Some(dot), "{qtype:?}: the path did not run");
                pool.unwrap();
                one.unwrap();
                for (i, (&a, &b)) in want.iter().zip(&y).enumerate() {
                    assert_eq!(
                        a.to_bits(),
                        b.to_bits(),
                        "{qtype:?} {dot:?} pool n={n} nb={nb} m={m} out {i}: {b} vs {a}"
                    );
                }
                for (i, (&a, &b)) in want.iter().zip(&y1).enumerate() {
                    assert_eq!(
                        a.to_bits(),
                        b.to_bits(),
                        "{qtype:?} {dot:?} 1 thread n={n} nb={nb} m={m} out {i}: {b} vs {a}"
                    );
                }
            }
        }
    }
}

/// Without the forcing the path runs only where the CPU lacks AVX-512 VNNI, from
/// `GEMM2_MIN_M` rows.
#[test]
fn avx2_gemm_only_without_avx512_vnni() {
    use super::super::gemm_avx2::GEMM2_MIN_M;
    let mut rng = Rng(0x1234_5678_9abc_def1);
    let (n, k) = (8, 512);
    let data = blocks(&mut rng, n * k / 32, 18, &[0]);
    let w = view(QType::Q4_0, n, k, &data);
    for m in [1, 2, GEMM2_MIN_M - 1, GEMM2_MIN_M, 16] {
        let x = rng.normalish(m * k, 1.0);
        let p = plan(&x, m, &w, m * n).unwrap();
        let want = use_simd() && !use_vnni() && m >= GEMM2_MIN_M;
        assert_eq!(p.gemm2.is_some(), want, "m={m}");
    }
}
