//! `gram_bf16`'s AVX-512 path against its scalar reference (bit for bit), every path against
//! exact sums (the AMX path within its float64 bound, the same bits for every thread count).

use super::*;
use crate::matmul::reference::bf16::{bf16_value, round_bf16};

fn rng(seed: u64) -> impl FnMut() -> u64 {
    let mut s = seed | 1;
    move || {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        s
    }
}

/// bf16 bits over many exponents, with zeros, tiny normals and subnormals mixed in.
fn values(n: usize, seed: u64) -> Vec<u16> {
    let mut r = rng(seed);
    (0..n)
        .map(|_| {
            let v = r();
            match v % 16 {
                0 => 0,
                1 => (v >> 8) as u16 & 0x807f, // subnormal (or zero) of either sign
                2 => 0x0080 | ((v >> 8) as u16 & 0x807f), // smallest exponent
                _ => {
                    let e = 100 + (v >> 20) % 50; // 2^-27 .. 2^22
                    ((v >> 8) as u16 & 0x807f) | ((e as u16) << 7)
                }
            }
        })
        .collect()
}

#[test]
fn kernel_equals_reference_bit_for_bit() {
    // odd and even token counts, widths below, at and across the 48-column strips and 8-row
    // tiles, and more than one block of 256 pairs
    for (k, &(n, d)) in [
        (1, 1),
        (2, 3),
        (7, 17),
        (64, 48),
        (33, 49),
        (600, 100),
        (515, 130),
    ]
    .iter()
    .enumerate()
    {
        let x = values(n * d, 7 + k as u64);
        if !Path::Avx512Bf16.usable() {
            return; // no vdpbf16ps here: the reference is what gram_bf16 runs (or AMX, below)
        }
        let got = gram_bf16_on(&x, n, d, Path::Avx512Bf16).unwrap();
        let want = gram_reference(&x, n, d);
        for (a, (g, w)) in got.iter().zip(&want).enumerate() {
            assert_eq!(
                g.to_bits(),
                w.to_bits(),
                "n {n} d {d} at ({}, {})",
                a / d,
                a % d
            );
        }
    }
}

#[test]
fn symmetric_and_zero_for_no_tokens() {
    for path in paths() {
        for (n, d) in [(9, 21), (70, 45)] {
            let x = values(n * d, 3);
            let g = gram_bf16_on(&x, n, d, path).unwrap();
            for i in 0..d {
                for j in 0..d {
                    assert_eq!(g[i * d + j].to_bits(), g[j * d + i].to_bits(), "{path:?}");
                }
            }
        }
        assert!(gram_bf16_on(&[], 0, 5, path)
            .unwrap()
            .iter()
            .all(|&v| v == 0.0));
        assert!(gram_bf16_on(&[], 3, 0, path).unwrap().is_empty());
    }
}

/// Every path that runs here.
fn paths() -> Vec<Path> {
    [Path::Amx, Path::Avx512Bf16, Path::Scalar]
        .into_iter()
        .filter(|p| p.usable())
        .collect()
}

#[test]
fn exact_where_every_partial_sum_is() {
    // small integers: every product and partial sum is an integer below 2^24, so exact in f32,
    // and the result must equal the integer sum whatever the order
    let (n, d) = (301, 57);
    let mut r = rng(11);
    let ints: Vec<i64> = (0..n * d).map(|_| (r() % 33) as i64 - 16).collect();
    let x: Vec<u16> = ints.iter().map(|&v| round_bf16(v as f32)).collect();
    for path in paths() {
        let g = gram_bf16_on(&x, n, d, path).unwrap();
        for i in 0..d {
            for j in 0..d {
                let want: i64 = (0..n).map(|t| ints[t * d + i] * ints[t * d + j]).sum();
                assert_eq!(g[i * d + j], want as f32, "{path:?} ({i}, {j})");
            }
        }
    }
}

#[test]
fn within_the_summation_bound_of_the_exact_products() {
    let (n, d) = (1000, 40);
    let x = values(n * d, 5);
    // the reference's chain rounds to nearest (2^-24); the AVX-512 path is its bits
    let g = gram_bf16_on(&x, n, d, Path::Scalar).unwrap();
    let u = 2f64.powi(-24);
    let gamma = n as f64 * u / (1.0 - n as f64 * u);
    let val = |t: usize, i: usize| {
        let v = bf16_value(x[t * d + i]) as f64;
        if v.abs() < 2f64.powi(-126) {
            0.0
        } else {
            v
        }
    };
    for i in 0..d {
        for j in 0..d {
            let exact: f64 = (0..n).map(|t| val(t, i) * val(t, j)).sum();
            let mass: f64 = (0..n).map(|t| (val(t, i) * val(t, j)).abs()).sum();
            let bound = gamma * mass + 2.0 * n as f64 * 2f64.powi(-126);
            assert!((g[i * d + j] as f64 - exact).abs() <= bound, "({i}, {j})");
        }
    }
}

/// The AMX path (where usable): every output within the faithful-rounding bound of the float64
/// sum of the bf16 products (`error_bound_with_unit`, unit 2^-23, subnormals flushed), on
/// values over many exponents with zeros and subnormals and on cancelling sums, at token and
/// feature counts below, at and across the 32-wide blocks and 32-token steps; and the same
/// bits in pools of 1, 2 and 3 threads.
#[cfg(target_arch = "x86_64")]
#[test]
fn amx_within_the_faithful_bound_for_every_thread_count() {
    if !Path::Amx.usable() {
        return; // no tiles here: the paths above are what runs
    }
    let val = |v: u16| {
        let f = bf16_value(v);
        if f.abs() < f32::MIN_POSITIVE {
            0.0
        } else {
            f
        }
    };
    for (k, &(n, d)) in [(1, 1), (31, 33), (64, 32), (97, 70), (600, 100)]
        .iter()
        .enumerate()
    {
        let mut x = values(n * d, 21 + k as u64);
        if k == 3 {
            // feature 1 = -feature 0 on even tokens: (0, 1) sums cancel to the odd tokens'
            for t in (0..n).step_by(2) {
                x[t * d + 1] = x[t * d] ^ 0x8000;
            }
        }
        let runs: Vec<Vec<f32>> = [1, 2, 3]
            .iter()
            .map(|&t| {
                let pool = rayon::ThreadPoolBuilder::new()
                    .num_threads(t)
                    .build()
                    .unwrap();
                // SAFETY: AMX bf16 usable (checked above); x holds n x d.
                pool.install(|| unsafe { amx::gram(&x, n, d) })
            })
            .collect();
        for r in &runs[1..] {
            assert!(
                r.iter()
                    .zip(&runs[0])
                    .all(|(a, b)| a.to_bits() == b.to_bits()),
                "n {n} d {d}: thread counts disagree"
            );
        }
        assert_eq!(
            gram_bf16_on(&x, n, d, Path::Amx)
                .unwrap()
                .iter()
                .map(|v| v.to_bits())
                .collect::<Vec<_>>(),
            runs[0].iter().map(|v| v.to_bits()).collect::<Vec<_>>()
        );
        let g = &runs[0];
        for i in 0..d {
            let xi: Vec<f32> = (0..n).map(|t| val(x[t * d + i])).collect();
            for j in 0..d {
                let xj: Vec<f32> = (0..n).map(|t| val(x[t * d + j])).collect();
                let exact: f64 = xi.iter().zip(&xj).map(|(&a, &b)| a as f64 * b as f64).sum();
                let bound =
                    crate::matmul::reference::bf16::error_bound_with_unit(&xi, &xj, 2f64.powi(-23));
                let got = g[i * d + j] as f64;
                assert!(
                    (got - exact).abs() <= bound,
                    "n {n} d {d} ({i}, {j}): {got} vs {exact} (bound {bound})"
                );
            }
        }
    }
}

#[test]
fn wrong_length_is_an_error() {
    let e = gram_bf16(&[0; 5], 2, 3).unwrap_err().to_string();
    assert!(e.contains("2 tokens x 3 features"), "{e}");
}
