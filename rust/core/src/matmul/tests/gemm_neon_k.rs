//! The aarch64 GEMM path of the K-quants (`gemm_neon_k.rs`, `neon/gemm_k.rs`), forced on this
//! thread with each integer product the CPU has (`sdot` with dotprod, `smmla` with i8mm):
//! every output has the bits of `reference::dot_block_k` for every K-quant at M in {2, 3, 4,
//! 5} (tiles of 4 and their remainders, odd rows paired with a copy under `smmla`), 16 and 67
//! (two blocks of activation rows), N with a partial panel, K of 1, 3 and 9 super-blocks (a
//! partial chunk of `KC`, lanes b % 8 wrapping), weight rows of extreme bytes and activation
//! rows of large, tiny and constant values, on the pool and on one thread; and the same bits
//! as the row kernels. Unforced, `plan`'s own choice (the row kernels without dotprod, as on
//! `-cpu cortex-a53` or with FERROQUANT_MAX_ISA=neon) has the same bits.

use super::super::neon::gemm::NeonDot;
use super::super::reference::{self as r, BlockQ8K};
use super::gemm_neon::{assert_same_bits, products, run_forced};
use super::*;
use bytemuck::Zeroable;

/// Every K-quant of the path and the offsets of its f16 fields.
const CASES: [(QType, &[usize]); 6] = [
    (QType::Q4K, &[0, 2]),
    (QType::Q5K, &[0, 2]),
    (QType::Q6K, &[208]),
    (QType::Q2K, &[80, 82]),
    (QType::Q3K, &[108]),
    (QType::IQ4XS, &[0]),
];

fn reference(qtype: QType, w: &[u8], x: &[BlockQ8K]) -> f32 {
    match qtype {
        QType::Q4K => r::dot_block_k::<BlockQ4K>(bytemuck::cast_slice(w), x),
        QType::Q5K => r::dot_block_k::<BlockQ5K>(bytemuck::cast_slice(w), x),
        QType::Q6K => r::dot_block_k::<BlockQ6K>(bytemuck::cast_slice(w), x),
        QType::Q2K => r::dot_block_k::<BlockQ2K>(bytemuck::cast_slice(w), x),
        QType::Q3K => r::dot_block_k::<BlockQ3K>(bytemuck::cast_slice(w), x),
        _ => r::dot_block_k::<BlockIQ4XS>(bytemuck::cast_slice(w), x),
    }
}

/// N weight rows of `nb` super-blocks (random, rows 1..3 of bytes 0xff, 0x00, 0x80 around
/// the f16 fields) and M activation rows (random; rows 0 and 1 scaled by 1e4 and 1e-6, rows 2
/// and 3 constant ±1).
fn data(
    rng: &mut Rng,
    qtype: QType,
    halves: &[usize],
    n: usize,
    nb: usize,
    m: usize,
) -> (Vec<u8>, Vec<f32>) {
    let info = qtype.info();
    let size = info.type_size;
    let mut w = blocks(rng, n * nb, size, halves);
    for (row, byte) in [(1, 0xffu8), (2, 0x00), (3, 0x80)] {
        if row < n {
            for (i, v) in w[row * nb * size..(row + 1) * nb * size]
                .iter_mut()
                .enumerate()
            {
                if !halves.iter().any(|&h| (h..h + 2).contains(&(i % size))) {
                    *v = byte;
                }
            }
        }
    }
    let k = nb * QK_K;
    let mut x = rng.normalish(m * k, 2.0);
    x[..k].iter_mut().for_each(|v| *v *= 1e4);
    if m > 1 {
        x[k..2 * k].iter_mut().for_each(|v| *v *= 1e-6);
    }
    for (mi, v) in [(2, 1.0), (3, -1.0)] {
        if mi < m {
            x[mi * k..(mi + 1) * k].fill(v);
        }
    }
    (w, x)
}

#[test]
fn neon_k_gemm_equals_reference() {
    let mut rng = Rng(0x6e33_6b61_6172_6368);
    let dots = products();
    for (qtype, halves) in CASES {
        let size = qtype.info().type_size;
        for (n, nb, ms) in [
            (13, 1, &[2, 3, 4, 5][..]),
            (9, 9, &[2, 7, 16][..]),
            (10, 3, &[67][..]),
        ] {
            for &m in ms {
                let k = nb * QK_K;
                let (data, x) = data(&mut rng, qtype, halves, n, nb, m);
                let w = view(qtype, n, k, &data);
                let mut want = vec![0.0f32; m * n];
                let mut xq = vec![BlockQ8K::zeroed(); nb];
                for mi in 0..m {
                    r::quantize_row_q8_k(&x[mi * k..(mi + 1) * k], &mut xq);
                    for row in 0..n {
                        let wr = &data[row * nb * size..(row + 1) * nb * size];
                        want[mi * n + row] = reference(qtype, wr, &xq);
                    }
                }
                // each product forced, then what `plan` chooses on this CPU (the best
                // product, or the row kernels without dotprod or with FERROQUANT_MAX_ISA=neon)
                let mut runs: Vec<(Option<NeonDot>, [Vec<f32>; 2])> = dots
                    .iter()
                    .map(|&dot| (Some(dot), run_forced(Some(dot), &w, &x, m)))
                    .collect();
                let mut y = vec![0.0f32; m * n];
                qmatmul(&x, m, &w, &mut y).unwrap();
                runs.push((None, [y.clone(), y]));
                for (dot, ys) in &runs {
                    for (what, y) in [("pool", &ys[0]), ("1 thread", &ys[1])] {
                        let case = format!("{qtype:?} {dot:?} {what} n={n} k={k} m={m}");
                        assert_same_bits(&want, y, &case);
                    }
                }
            }
        }
    }
}

/// The GEMM and the row kernels give the same bits (the switch at the threshold cannot change
/// a result).
#[test]
fn neon_k_gemm_equals_row_kernels() {
    let mut rng = Rng(0x1357_9bdf_2468_ace0);
    let dots = products();
    for (qtype, halves) in CASES {
        let (n, nb, m) = (11, 2, 6);
        let (data, x) = data(&mut rng, qtype, halves, n, nb, m);
        let w = view(qtype, n, nb * QK_K, &data);
        let rows = run_forced(None, &w, &x, m);
        for &dot in &dots {
            let gemm = run_forced(Some(dot), &w, &x, m);
            for (a, b) in rows.iter().zip(&gemm) {
                assert_same_bits(a, b, &format!("{qtype:?} {dot:?}"));
            }
        }
    }
}
