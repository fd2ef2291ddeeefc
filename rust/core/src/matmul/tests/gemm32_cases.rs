//! Test data of the 32-weight formats' GEMM paths (`gemm_avx2.rs`, `gemm_neon.rs`): weights and
//! activations with the integer sums' extremes, and the references' outputs for them.

use super::*;

/// N weight rows of `nb` blocks of `qtype` (random, with rows of extreme quants) and M
/// activation rows of K = 32·nb (random, with rows of large, tiny and constant values).
pub(super) fn data(
    rng: &mut Rng,
    qtype: QType,
    n: usize,
    nb: usize,
    m: usize,
) -> (Vec<u8>, Vec<f32>) {
    let info = qtype.info();
    let halves: &[usize] = if matches!(qtype, QType::Q4_1 | QType::Q5_1) {
        &[0, 2]
    } else {
        &[0]
    };
    let k = nb * info.block_size;
    let mut data = blocks(rng, n * nb, info.type_size, halves);
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
    (data, x)
}

/// `reference::dot_block32` (q8_0 activations) or `dot_block32_min` (q8_1) of every weight row
/// with every activation row, M x N.
pub(super) fn reference_outputs(
    qtype: QType,
    data: &[u8],
    n: usize,
    x: &[f32],
    m: usize,
) -> Vec<f32> {
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
