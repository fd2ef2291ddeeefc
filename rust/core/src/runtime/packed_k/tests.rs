use super::*;
use crate::input::Matrix;
use crate::quantize::{quantize, Options};

fn vals(n: usize, seed: u32) -> Vec<f32> {
    (0..n)
        .map(|i| {
            let h = (i as u32 ^ seed).wrapping_mul(2654435761).rotate_left(7) ^ seed;
            (h % 20001) as f32 / 10000.0 - 1.0
        })
        .collect()
}

/// `reference::dot_block_k` of every weight row with every activation row (M x N).
fn want(qtype: QType, data: &[u8], n: usize, x: &[f32], m: usize, k: usize) -> Vec<f32> {
    let nb = k / QK_K;
    let mut xq = vec![<BlockQ8K as bytemuck::Zeroable>::zeroed(); m * nb];
    for (b, xr) in xq.chunks_mut(nb).zip(x.chunks(k)) {
        reference::quantize_row_q8_k(xr, b);
    }
    let rb = nb * qtype.info().type_size;
    let mut y = vec![0f32; m * n];
    for r in 0..m {
        let xb = &xq[r * nb..(r + 1) * nb];
        for c in 0..n {
            let row = &data[c * rb..(c + 1) * rb];
            y[r * n + c] = if qtype == QType::Q6K {
                reference::dot_block_k::<BlockQ6K>(bytemuck::cast_slice(row), xb)
            } else {
                reference::dot_block_k::<BlockQ4K>(bytemuck::cast_slice(row), xb)
            };
        }
    }
    y
}

#[test]
fn packed_k_products_are_the_reference_bit_for_bit() {
    for qtype in [QType::Q4K, QType::Q6K] {
        // One super-block, fewer than 8, 9 (a lane reused); rows not a multiple of 8.
        for &(n, k) in &[(8, 256), (13, 1536), (5, 2304)] {
            let w = vals(n * k, 5 + k as u32);
            let mx = Matrix::from_f32(&w, n, k).unwrap();
            let q = quantize(&mx, qtype, &Options::default()).unwrap();
            let packed = PackedK::new(qtype, &q.data, n, k).unwrap();
            for m in [1usize, 2, 5] {
                let mut x = vals(m * k, 99 + m as u32);
                x[3] = 25.0;
                x[256..256.min(k) + if k > 256 { 256 } else { 0 }].fill(0.0);
                let expect = want(qtype, &q.data, n, &x, m, k);
                let mut a = ActsQ8K::default();
                a.quantize(&x, m, k).unwrap();
                let mut y = vec![f32::NAN; m * n];
                matmul(&packed, &a, &mut y).unwrap();
                for (i, (g, e)) in y.iter().zip(&expect).enumerate() {
                    assert_eq!(
                        g.to_bits(),
                        e.to_bits(),
                        "{qtype:?} n={n} k={k} m={m} at {i}"
                    );
                }
                if m == 1 {
                    let mut part = vec![0f32; n - 8.min(n - 1) / 8 * 8];
                    let start = 8.min(n - 1) / 8 * 8;
                    matvec_rows(&packed, &a, start..n, &mut part).unwrap();
                    assert_eq!(&part[..], &expect[start..n]);
                }
                // The portable kernel on the same bytes.
                let nb = k / QK_K;
                for p in 0..n.div_ceil(P) {
                    let r = panel_ref(packed.q6, packed.panel(p), &a.row(0)[..nb]);
                    for (i, v) in r.iter().enumerate().take(n - p * P) {
                        assert_eq!(v.to_bits(), expect[p * P + i].to_bits());
                    }
                }
            }
        }
    }
    assert!(PackedK::new(QType::Q8_0, &[], 0, 256).is_none());
}
