//! `bf16_io.rs`: the rounding against `half`'s (an independent implementation), `qmatmul`
//! writing every output whatever `out` held (what lets `qmatmul_bf16` reuse its scratch), and
//! `qmatmul_bf16` equal to the f32 call on the widened inputs, rounded.

use super::super::bf16_io::{bf16_to_f32, f32_to_bf16, qmatmul_bf16};
use super::*;
use crate::input::Matrix;
use crate::quantize::{quantize, Options};

#[test]
fn rounding_is_nearest_even_as_half_rounds() {
    let mut rng = Rng(0xb16b_16b1_6b16_b16b);
    let edges = [
        0.0f32,
        -0.0,
        1.0,
        f32::MAX,
        f32::MIN,
        f32::MIN_POSITIVE,
        f32::INFINITY,
        f32::NEG_INFINITY,
        f32::from_bits(1),
        f32::from_bits(0x8000_8000), // a tie on a negative subnormal
        f32::from_bits(0x3f80_8000), // 1 + 2^-8: a tie, rounds to even (down)
        f32::from_bits(0x3f81_8000), // a tie that rounds up
        f32::from_bits(0x7f7f_ffff), // rounds up to infinity
    ];
    let random = (0..1 << 20).map(|_| f32::from_bits(rng.next() as u32));
    for v in edges.into_iter().chain(random) {
        let want = if v.is_nan() {
            0x7fc0
        } else {
            half::bf16::from_f32(v).to_bits()
        };
        assert_eq!(f32_to_bf16(v), want, "{v:e} ({:#010x})", v.to_bits());
    }
    // Widening is exact (a NaN keeps its payload, as torch's conversion: `half` sets the
    // quiet bit).
    for b in 0..=u16::MAX {
        let (got, want) = (bf16_to_f32(b), half::bf16::from_bits(b).to_f32());
        if want.is_nan() {
            assert!(got.is_nan() && got.to_bits() >> 16 == b as u32, "{b:#06x}");
        } else {
            assert_eq!(got.to_bits(), want.to_bits(), "{b:#06x}");
        }
    }
}

/// A weight of `qtype` (n x k) quantized from random values.
fn weight(rng: &mut Rng, qtype: QType, n: usize, k: usize) -> crate::formats::tensor::Quantized {
    let w = rng.normalish(n * k, 0.5);
    quantize(
        &Matrix::from_f32(&w, n, k).unwrap(),
        qtype,
        &Options::default(),
    )
    .unwrap()
}

const QTYPES: [QType; 9] = [
    QType::Q4_0,
    QType::Q8_0,
    QType::Q4_1,
    QType::Q5_0,
    QType::Q4K,
    QType::Q6K,
    QType::NF4,
    QType::Int8,
    QType::Fp8E4M3,
];

/// Every path of `qmatmul` assigns each output (none accumulates into `out`): NaN-filled and
/// zero-filled outputs end equal, for M on each side of the paths' thresholds (row kernels,
/// tiles, GEMMs, bf16 GEMM and AMX from 12 / 32 / 128 rows), N with partial panels.
#[test]
fn qmatmul_writes_every_output() {
    let mut rng = Rng(0x0b1f_0b1f_0b1f_0b1f);
    for qtype in QTYPES {
        for (n, k) in [(40, 256), (33, 512)] {
            let q = weight(&mut rng, qtype, n, k);
            for m in [1, 2, 5, 12, 16, 33, 128, 131] {
                let x = rng.normalish(m * k, 1.0);
                let mut zero = vec![0f32; m * n];
                let mut nan = vec![f32::NAN; m * n];
                qmatmul(&x, m, &q.view(), &mut zero).unwrap();
                qmatmul(&x, m, &q.view(), &mut nan).unwrap();
                assert!(
                    zero.iter()
                        .zip(&nan)
                        .all(|(a, b)| a.to_bits() == b.to_bits()),
                    "{qtype:?} {n}x{k} m={m}"
                );
            }
        }
    }
}

/// `qmatmul_bf16` = the f32 call on the widened x, each output rounded; twice in a row (the
/// second reuses the first's scratch, with other shapes in between), one thread and the pool.
#[test]
fn qmatmul_bf16_is_the_f32_call_rounded() {
    let mut rng = Rng(0x1b16_1b16_1b16_1b16);
    for qtype in QTYPES {
        let (n, k) = (48, 512);
        let q = weight(&mut rng, qtype, n, k);
        for m in [1, 7, 16, 128, 130] {
            let xb: Vec<u16> = rng
                .normalish(m * k, 1.0)
                .iter()
                .map(|&v| half::bf16::from_f32(v).to_bits())
                .collect();
            let xf: Vec<f32> = xb
                .iter()
                .map(|&b| half::bf16::from_bits(b).to_f32())
                .collect();
            let mut yf = vec![0f32; m * n];
            qmatmul(&xf, m, &q.view(), &mut yf).unwrap();
            let want: Vec<u16> = yf
                .iter()
                .map(|&v| half::bf16::from_f32(v).to_bits())
                .collect();
            for threads in [1, 0] {
                crate::parallel::set_num_threads(threads);
                for _ in 0..2 {
                    let mut got = vec![0u16; m * n];
                    let r = qmatmul_bf16(&xb, m, &q.view(), &mut got);
                    let m2 = m.min(3);
                    let mut other = vec![0u16; m2 * n];
                    let r2 = qmatmul_bf16(&xb[..m2 * k], m2, &q.view(), &mut other);
                    crate::parallel::set_num_threads(0);
                    r.unwrap();
                    r2.unwrap();
                    assert_eq!(got, want, "{qtype:?} m={m} threads={threads}");
                    crate::parallel::set_num_threads(threads);
                }
            }
            crate::parallel::set_num_threads(0);
        }
    }
    // Bad input: the f32 call's errors.
    let q = weight(&mut rng, QType::Q8_0, 16, 64);
    let mut out = vec![0u16; 16];
    assert!(qmatmul_bf16(&[0u16; 63], 1, &q.view(), &mut out).is_err());
}

/// `qmatmul_bf16_split` of weights stacked row-wise (their data and statistics concatenated,
/// as QuantLinear fuses q/k/v or gate/up) = `qmatmul_bf16` on each weight alone, for M on each
/// side of the paths' thresholds and parts that are not whole panels; one thread and the pool.
#[test]
fn split_call_of_stacked_weights_is_each_weight_alone() {
    use super::super::bf16_io::qmatmul_bf16_split;
    let mut rng = Rng(0x5b11_75b1_175b_1175);
    let gint = QType::parse("int4_g64").unwrap();
    for qtype in QTYPES.into_iter().chain([gint]) {
        let k = 512;
        let parts: Vec<_> = [48, 16, 24]
            .iter()
            .map(|&n| weight(&mut rng, qtype, n, k))
            .collect();
        let mut stacked = parts[0].clone();
        stacked.rows = parts.iter().map(|p| p.rows).sum();
        stacked.data = parts.iter().flat_map(|p| p.data.clone()).collect();
        stacked.stats = parts.iter().flat_map(|p| p.stats.clone()).collect();
        for m in [1, 7, 16, 128, 130] {
            let xb: Vec<u16> = rng
                .normalish(m * k, 1.0)
                .iter()
                .map(|&v| half::bf16::from_f32(v).to_bits())
                .collect();
            for threads in [1, 0] {
                crate::parallel::set_num_threads(threads);
                let want: Vec<Vec<u16>> = parts
                    .iter()
                    .map(|p| {
                        let mut y = vec![0u16; m * p.rows];
                        qmatmul_bf16(&xb, m, &p.view(), &mut y).unwrap();
                        y
                    })
                    .collect();
                let mut got: Vec<Vec<u16>> = parts.iter().map(|p| vec![1u16; m * p.rows]).collect();
                let mut outs: Vec<&mut [u16]> = got.iter_mut().map(|g| g.as_mut_slice()).collect();
                let r = qmatmul_bf16_split(&xb, m, &stacked.view(), &mut outs);
                crate::parallel::set_num_threads(0);
                r.unwrap();
                assert_eq!(got, want, "{qtype:?} m={m} threads={threads}");
            }
        }
    }
    // Bad input: outputs that do not split the weight's rows, or not whole rows of M.
    let q = weight(&mut rng, QType::Q8_0, 16, 64);
    let x = vec![0u16; 2 * 64];
    for sizes in [[2 * 8, 2 * 7], [2 * 8, 2 * 9], [2 * 8, 2 * 8 - 1]] {
        let mut a = vec![0u16; sizes[0]];
        let mut b = vec![0u16; sizes[1]];
        let mut outs: Vec<&mut [u16]> = vec![&mut a, &mut b];
        assert!(
            qmatmul_bf16_split(&x, 2, &q.view(), &mut outs).is_err(),
            "{sizes:?}"
        );
    }
}

/// bf16 bits that are finite, a third of them subnormals or zeros (either sign).
#[cfg(target_arch = "x86_64")]
fn finite_bits(rng: &mut Rng, len: usize) -> Vec<u16> {
    (0..len)
        .map(|_| {
            let r = rng.next();
            let b = r as u16;
            match (r >> 32) % 3 {
                0 => b & 0x807f,                         // a subnormal or a zero
                _ if b & 0x7f80 == 0x7f80 => b & 0xbfff, // no infinity or NaN
                _ => b,
            }
        })
        .collect()
}

/// `acts16` (the bf16 GEMM's activations straight from bf16 bits) = `acts16::prepare` of their
/// f32 values, subnormals and signed zeros included, for M with partial vectors of 16 rows.
#[cfg(target_arch = "x86_64")]
#[test]
fn acts16_is_prepare_of_the_widened_bits() {
    if !crate::cpu::has_avx512_bf16() {
        return; // neither runs without AVX-512 BF16 (`plan::bf16_route`)
    }
    let mut rng = Rng(0xac75_16ac_7516_ac75);
    for k in [32, 96, 576] {
        for m in [1, 15, 16, 17, 40, 128] {
            let xb = finite_bits(&mut rng, m * k);
            let xf: Vec<f32> = xb.iter().map(|&b| bf16_to_f32(b)).collect();
            // SAFETY: AVX-512 F/BW/VL and BF16 (checked above); x is m x k, k % 32 == 0.
            let (got, want) = unsafe {
                (
                    super::super::bf16_io::acts16(&xb, m, k),
                    crate::matmul::x86::acts16::prepare(&xf, m, k, false).expect("finite"),
                )
            };
            let bits = |a: &crate::matmul::x86::gemm16::Acts16| -> Vec<[u32; 16]> {
                a.x.iter().map(|p| p.0).collect()
            };
            assert_eq!(
                (got.pairs, got.stride, got.vectors),
                (want.pairs, want.stride, want.vectors)
            );
            assert_eq!(bits(&got), bits(&want), "m={m} k={k}");
        }
    }
}

/// `qmatmul_bf16` on activations with subnormals and zeros (the bf16 GEMM's direct activations,
/// `plan::plan_bf16`) = the f32 call on the widened bits, rounded; a non-finite activation is
/// the f32 call's error (same row, column and value).
#[cfg(target_arch = "x86_64")]
#[test]
fn qmatmul_bf16_direct_activations_with_subnormals() {
    let mut rng = Rng(0xd1ec_7d1e_c7d1_ec7d);
    for qtype in QTYPES {
        let (n, k) = (40, 256);
        let q = weight(&mut rng, qtype, n, k);
        for m in [12, 16, 33, 128] {
            let mut xb = finite_bits(&mut rng, m * k);
            let xf: Vec<f32> = xb.iter().map(|&b| bf16_to_f32(b)).collect();
            let mut yf = vec![0f32; m * n];
            qmatmul(&xf, m, &q.view(), &mut yf).unwrap();
            let want: Vec<u16> = yf.iter().map(|&v| f32_to_bf16(v)).collect();
            let mut got = vec![0u16; m * n];
            qmatmul_bf16(&xb, m, &q.view(), &mut got).unwrap();
            assert_eq!(got, want, "{qtype:?} m={m}");
            for bad in [0x7f80u16, 0xff80, 0x7fc1] {
                let at = (m / 2) * k + 37;
                xb[at] = bad;
                let mut xf2 = xf.clone();
                xf2[at] = bf16_to_f32(bad);
                let e1 = qmatmul(&xf2, m, &q.view(), &mut yf)
                    .unwrap_err()
                    .to_string();
                let e2 = qmatmul_bf16(&xb, m, &q.view(), &mut got)
                    .unwrap_err()
                    .to_string();
                assert_eq!(e1, e2, "{qtype:?} m={m} {bad:#06x}");
                xb[at] = 0;
            }
        }
    }
}

/// `Bf16Out`'s tiles = `f32_to_bf16` of `OutPtr`'s f32 tiles, value for value:
/// values that round up, down, to even on ties, into the exponent, to infinity, subnormals,
/// signed zeros, infinities and NaNs; jobs of 8-144 rows from column 0 or 40, parts that
/// split 16- or 32-column blocks or not, M with a partial vector.
#[cfg(target_arch = "x86_64")]
#[test]
fn bf16_tiles_are_the_f32_tiles_rounded() {
    use super::super::out16::{Bf16Out, Sink};
    use crate::matmul::OutPtr;
    use std::arch::x86_64::__m512;
    if !crate::cpu::has_avx512_bf16() {
        return; // the bf16 GEMM (the only caller) does not run without it
    }
    let special = [
        0x3f80_8000u32, // a tie, even below: down
        0x3f81_8000,    // a tie, odd below: up
        0x3f80_7fff,
        0x3f80_8001,
        0x7f7f_ffff, // rounds to infinity
        0x3fff_ffff, // carries into the exponent
        0x0000_0001, // subnormals
        0x807f_ffff,
        0x0000_0000,
        0x8000_0000,
        0x7f80_0000,
        0xff80_0000,
        0x7fc0_0000,
        0xffff_ffff,
        0x7f80_0001,
    ];
    let mut s = 0x0b16_0007u64;
    let mut next = move || {
        s = s
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (s >> 32) as u32
    };
    for (m, nv, v0) in [(128usize, 8usize, 0usize), (40, 3, 0), (37, 1, 2)] {
        for (rows, n0, parts) in [
            (144usize, 0usize, vec![144usize]),
            (144, 0, vec![48, 16, 80]),
            (144, 40, vec![40, 56, 8, 7, 73]),
            (8, 0, vec![8]),
            (48, 8, vec![56]),
        ] {
            let n: usize = parts.iter().sum();
            let rows16 = rows.next_multiple_of(16);
            let acc: Vec<__m512> = (0..rows16 * nv)
                .map(|_| {
                    let v: [u32; 16] = std::array::from_fn(|_| {
                        let r = next();
                        if r % 4 == 0 {
                            special[(r as usize >> 8) % special.len()]
                        } else {
                            r
                        }
                    });
                    // SAFETY: 16 dwords, any bits.
                    unsafe { std::mem::transmute::<[u32; 16], __m512>(v) }
                })
                .collect();
            let at = |i: usize, j: usize| i * nv + j;
            let mut f = vec![0f32; m * n];
            OutPtr::new(&mut f, n).tiles(&acc, rows, nv, v0, m, n0, at);
            let mut got: Vec<Vec<u16>> = parts.iter().map(|&c| vec![0x5555; m * c]).collect();
            let mut outs: Vec<&mut [u16]> = got.iter_mut().map(|g| g.as_mut_slice()).collect();
            Bf16Out::new(&mut outs, m).tiles(&acc, rows, nv, v0, m, n0, at);
            let mut c0 = 0;
            for (p, &c) in got.iter().zip(&parts) {
                for mi in 0..m {
                    for ci in 0..c {
                        let (col, fv) = (c0 + ci, f[mi * n + c0 + ci]);
                        let written = (n0..n0 + rows).contains(&col)
                            && (16 * v0..16 * (v0 + nv)).contains(&mi);
                        let want = if written { f32_to_bf16(fv) } else { 0x5555 };
                        assert_eq!(p[mi * c + ci], want, "m={m} {parts:?} row {mi} col {col}");
                    }
                }
                c0 += c;
            }
        }
    }
}
