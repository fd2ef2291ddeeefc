//! The AVX2 M = 1 row kernel without horizontal sums (`x86/row32_avx2.rs`): bit for bit the
//! reference, called directly (random blocks with NaN / inf scales among the random f16 bytes,
//! and every weight at its largest / smallest level against activation quants of +-127 and
//! -128, or -127 for iq4_nl's signed product; rows of 1..17 blocks and K = 14336 + 32, with and
//! without the prefetch) and through `qmatmul` forced on this thread (pool and one thread).

use super::super::x86::row32_avx2::{self as t, dot_row, interleave, Nib32, RowT, FORCE};
use super::gemm32_cases as cases;
use super::*;

/// One activation row: random quants in `lo..=127` with the extremes in places, scale 0.5..2.
fn acts(rng: &mut Rng, nb: usize, lo: i8, fill: Option<i8>) -> Vec<BlockQ8_0> {
    let mut b = vec![BlockQ8_0::zeroed(); nb];
    for (i, blk) in b.iter_mut().enumerate() {
        blk.d = f16_from_f32(0.5 + (i % 4) as f32 * 0.5);
        for (j, v) in blk.qs.iter_mut().enumerate() {
            let r = (rng.next() as u8 as i8).max(lo);
            *v = match fill {
                Some(f) if j % 3 != 2 || i % 2 == 0 => f,
                _ => r,
            };
        }
    }
    b
}

fn check<W: Nib32>(qtype: QType, data: &[u8], x: &[BlockQ8_0], what: &str) {
    let nb = x.len();
    let w: &[W] = bytemuck::cast_slice(&data[..nb * std::mem::size_of::<W>()]);
    let d: Vec<f32> = x.iter().map(|b| f16_to_f32(b.d)).collect();
    let sums = block_sums(x);
    let s: Vec<f32> = sums.iter().map(|&v| v as f32 * 0.25).collect();
    let want = if W::HAS_MIN {
        r::dot_block32_min(w, x, &d, &s)
    } else {
        r::dot_block32(w, x, &d)
    };
    let (xt, nbias) = interleave(qtype, x, &sums);
    let row = RowT {
        blocks: x,
        xt: &xt,
        nbias: &nbias,
        d: &d,
        s: W::HAS_MIN.then_some(&s[..]),
    };
    // SAFETY: AVX2 and F16C checked by the caller; the row was prepared for nb blocks.
    let got = unsafe { [dot_row::<W, false>(w, &row), dot_row::<W, true>(w, &row)] };
    for g in got {
        // (NaN payloads may differ between paths, as elsewhere: `tests/formats.rs`)
        assert!(
            g.to_bits() == want.to_bits() || (g.is_nan() && want.is_nan()),
            "{qtype:?} nb={nb} {what}: {g} vs {want}"
        );
    }
}

fn check_q(qtype: QType, data: &[u8], x: &[BlockQ8_0], what: &str) {
    match qtype {
        QType::Q4_0 => check::<BlockQ4_0>(qtype, data, x, what),
        QType::Q4_1 => check::<BlockQ4_1>(qtype, data, x, what),
        QType::Q5_0 => check::<BlockQ5_0>(qtype, data, x, what),
        QType::Q5_1 => check::<BlockQ5_1>(qtype, data, x, what),
        _ => check::<BlockIQ4NL>(qtype, data, x, what),
    }
}

const FORMATS: [QType; 5] = [
    QType::Q4_0,
    QType::Q4_1,
    QType::Q5_0,
    QType::Q5_1,
    QType::IQ4NL,
];

#[test]
fn row32_t_kernel_equals_reference() {
    if !crate::cpu::has_avx2() {
        return;
    }
    let mut rng = Rng(0x7e32_7e32_0bad_cafe);
    for qtype in FORMATS {
        assert!(t::takes(qtype));
        let info = qtype.info();
        let size = info.type_size;
        let halves: &[usize] = if matches!(qtype, QType::Q4_1 | QType::Q5_1) {
            &[0, 2]
        } else {
            &[0]
        };
        // iq4_nl's signed product needs |x| <= 127 (`block_isums`), the others take -128
        let lo = if qtype == QType::IQ4NL { -127 } else { -128 };
        let nbs: Vec<usize> = (1..=17).chain([24, 63, 449, 448 + 7]).collect();
        for nb in nbs {
            // random bytes: every level, NaN / inf / subnormal f16 scales among the raw bytes
            let raw = rng.bytes(nb * size);
            let scaled = blocks(&mut rng, nb, size, halves);
            for (data, dn) in [(&raw, "raw"), (&scaled, "scaled")] {
                for fill in [None, Some(127), Some(lo)] {
                    let x = acts(&mut rng, nb, lo, fill);
                    check_q(qtype, data, &x, &format!("{dn} x={fill:?}"));
                }
            }
            // every quant byte 0xff (levels 15 / 31, qh all set), 0x00 (level 0), 0x88
            for byte in [0xffu8, 0x00, 0x88] {
                let mut data = scaled.clone();
                for (i, v) in data.iter_mut().enumerate() {
                    if !halves.iter().any(|&h| (h..h + 2).contains(&(i % size))) {
                        *v = byte;
                    }
                }
                for fill in [Some(127), Some(lo), Some(-127)] {
                    let mut x = acts(&mut rng, nb, lo, fill);
                    for blk in &mut x {
                        blk.qs.iter_mut().for_each(|v| *v = fill.unwrap());
                    }
                    check_q(qtype, &data, &x, &format!("byte {byte:#x} x={fill:?}"));
                }
            }
        }
    }
}

#[test]
fn row32_t_qmatmul_equals_reference() {
    if !(use_simd() && crate::cpu::has_avx2()) {
        return;
    }
    let mut rng = Rng(0x5eed_7e32_0000_0001);
    for qtype in FORMATS {
        // K under one group, one group and a tail, K = 576, long rows (prefetch) with a tail
        for (n, nb) in [(5, 3), (9, 8), (7, 18), (3, 449), (6, 64 + 5)] {
            let k = nb * QK8_0;
            let (data, x) = cases::data(&mut rng, qtype, n, nb, 1);
            let want = cases::reference_outputs(qtype, &data, n, &x, 1);
            let w = view(qtype, n, k, &data);
            FORCE.set(true);
            let p = plan(&x, 1, &w, n).map(|p| p.row32_avx2);
            let mut y = vec![0.0f32; n];
            let pool = qmatmul(&x, 1, &w, &mut y);
            let mut y1 = vec![0.0f32; n];
            crate::parallel::set_num_threads(1);
            let one = qmatmul(&x, 1, &w, &mut y1);
            crate::parallel::set_num_threads(0);
            FORCE.set(false);
            assert!(p.unwrap(), "{qtype:?}: the path did not run");
            pool.unwrap();
            one.unwrap();
            for (name, got) in [("pool", &y), ("1 thread", &y1)] {
                for (i, (&a, &b)) in want.iter().zip(got.iter()).enumerate() {
                    assert_eq!(
                        a.to_bits(),
                        b.to_bits(),
                        "{qtype:?} {name} nb={nb} out {i}: {b} vs {a}"
                    );
                }
            }
        }
    }
}

/// Unforced, the kernel runs at M = 1 only where the CPU has AVX2 and no AVX-512 VNNI; M = 2..4
/// keep `x86::dot_block32`.
#[test]
fn row32_t_only_at_m1_without_vnni() {
    let mut rng = Rng(0x0dd_7e32);
    let (n, k) = (4, 512);
    let data = blocks(&mut rng, n * k / 32, 18, &[0]);
    let w = view(QType::Q4_0, n, k, &data);
    for m in [1, 2, 3, 4] {
        let x = rng.normalish(m * k, 1.0);
        let p = plan(&x, m, &w, m * n).unwrap();
        assert_eq!(p.row32_avx2, m == 1 && use_simd() && !use_vnni(), "m={m}");
    }
}
