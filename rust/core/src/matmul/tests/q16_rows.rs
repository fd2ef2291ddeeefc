//! Test inputs shared by the SIMD kernels' tests of the q16 formats (x86 AVX2, NEON):
//! activation rows of several kinds, quantized, and weight scales.

use super::Rng;
use crate::matmul::reference::q16::{q16_row_len, quantize_row_q16, Q16};

/// Activation row `kind` (0..5) of length `k`: ordinary, zero, one huge outlier, tiny
/// values, zero blocks of 64 and exact zeros.
pub(crate) fn acts(rng: &mut Rng, k: usize, kind: usize) -> Vec<f32> {
    let mut x = rng.normalish(k, 1.0);
    match kind {
        1 => x.fill(0.0),
        2 => {
            let i = rng.next() as usize % k;
            x[i] = 3.0e7;
        }
        3 => x.iter_mut().for_each(|v| *v *= 1e-39),
        4 => {
            for (b, c) in x.chunks_mut(Q16).enumerate() {
                if b % 2 == 1 {
                    c.fill(0.0);
                }
            }
            for v in x.iter_mut().step_by(7) {
                *v = 0.0;
            }
        }
        _ => {}
    }
    x
}

/// Four q16 activation rows of the given kinds (`per`: `NF4_ONE` for nf4, 1 for int8).
pub(crate) fn rows(
    rng: &mut Rng,
    k: usize,
    per: f32,
    kinds: [usize; 4],
) -> [(Vec<i16>, Vec<f32>); 4] {
    kinds.map(|kind| {
        let x = acts(rng, k, kind);
        let mut q = vec![0i16; q16_row_len(k)];
        let mut d = vec![0.0f32; q16_row_len(k) / Q16];
        quantize_row_q16(&x, per, &mut q, &mut d);
        (q, d)
    })
}

/// Weight scales: mostly ordinary, some zero, huge, tiny.
pub(crate) fn stats(rng: &mut Rng, n: usize) -> Vec<f32> {
    (0..n)
        .map(|i| match i % 11 {
            3 => 0.0,
            5 => 1.0e20,
            8 => 1.0e-30,
            _ => rng.unit().abs() * 0.1 + 1e-3,
        })
        .collect()
}
