//! `gram_bf16` against its scalar reference (bit for bit), and the reference against exact sums.

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
        let got = gram_bf16(&x, n, d).unwrap();
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
    let (n, d) = (9, 21);
    let x = values(n * d, 3);
    let g = gram_bf16(&x, n, d).unwrap();
    for i in 0..d {
        for j in 0..d {
            assert_eq!(g[i * d + j].to_bits(), g[j * d + i].to_bits());
        }
    }
    assert!(gram_bf16(&[], 0, 5).unwrap().iter().all(|&v| v == 0.0));
}

#[test]
fn exact_where_every_partial_sum_is() {
    // small integers: every product and partial sum is an integer below 2^24, so exact in f32,
    // and the result must equal the integer sum whatever the order
    let (n, d) = (301, 57);
    let mut r = rng(11);
    let ints: Vec<i64> = (0..n * d).map(|_| (r() % 33) as i64 - 16).collect();
    let x: Vec<u16> = ints.iter().map(|&v| round_bf16(v as f32)).collect();
    let g = gram_bf16(&x, n, d).unwrap();
    for i in 0..d {
        for j in 0..d {
            let want: i64 = (0..n).map(|t| ints[t * d + i] * ints[t * d + j]).sum();
            assert_eq!(g[i * d + j], want as f32, "({i}, {j})");
        }
    }
}

#[test]
fn within_the_summation_bound_of_the_exact_products() {
    let (n, d) = (1000, 40);
    let x = values(n * d, 5);
    let g = gram_bf16(&x, n, d).unwrap();
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

#[test]
fn wrong_length_is_an_error() {
    let e = gram_bf16(&[0; 5], 2, 3).unwrap_err().to_string();
    assert!(e.contains("2 tokens x 3 features"), "{e}");
}
