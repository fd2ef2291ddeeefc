//! The AVX-512 q16 kernels against `reference::q16`, bit for bit: 1 to 4 activation rows at
//! once, nf4 block sizes 32 (odd and even block counts) to whole rows, int8 rows of every tail
//! length with per-row and per-block scales, long rows, activations
//! with zeros, tiny values and one outlier per block.

use super::*;
use crate::matmul::reference::q16::{
    dot_int8_q16, dot_nf4_q16, q16_row_len, quantize_row_q16, NF4_ONE,
};
use crate::matmul::tests::Rng;

fn acts(rng: &mut Rng, k: usize, per: f32) -> (Vec<i16>, Vec<f32>) {
    let x: Vec<f32> = (0..k)
        .map(|i| {
            let v = (rng.unit() + rng.unit()) * 2.0;
            match i % 41 {
                3 => v * f32::powi(2.0, -130),
                11 => v * 3000.0,
                19 => 0.0,
                _ => v,
            }
        })
        .collect();
    let mut q = vec![0i16; q16_row_len(k)];
    let mut d = vec![0.0f32; q16_row_len(k) / Q16];
    quantize_row_q16(&x, per, &mut q, &mut d);
    (q, d)
}

fn check(got: [f32; 4], want: [f32; 4], what: &str) {
    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
        assert_eq!(g.to_bits(), w.to_bits(), "{what} row {i}: {g:e} vs {w:e}");
    }
}

/// Calls `f` for R = 1..4 over the four rows and returns the four results.
macro_rules! rows_1_to_4 {
    ($nf4:expr, $w:expr, $s:expr, $bl:expr, $xq:expr, $xd:expr) => {{
        let xq: [&[i16]; 4] = std::array::from_fn(|i| &$xq[i][..]);
        let xd: [&[f32]; 4] = std::array::from_fn(|i| &$xd[i][..]);
        // SAFETY: `cpu::has_vnni_q16()` checked by the caller; shapes built to the contract.
        unsafe {
            let a = dot_q16_avx512::<1>($nf4, $w, $s, $bl, [xq[0]], [xd[0]]);
            let b = dot_q16_avx512::<2>($nf4, $w, $s, $bl, [xq[1], xq[2]], [xd[1], xd[2]]);
            let c = dot_q16_avx512::<1>($nf4, $w, $s, $bl, [xq[3]], [xd[3]]);
            let d = dot_q16_avx512::<4>($nf4, $w, $s, $bl, xq, xd);
            let e = dot_q16_avx512::<3>(
                $nf4,
                $w,
                $s,
                $bl,
                [xq[2], xq[3], xq[0]],
                [xd[2], xd[3], xd[0]],
            );
            assert_eq!(
                d.map(f32::to_bits),
                [a[0], b[0], b[1], c[0]].map(f32::to_bits)
            );
            assert_eq!(e.map(f32::to_bits), [d[2], d[3], d[0]].map(f32::to_bits));
            d
        }
    }};
}

#[test]
fn nf4_matches_reference() {
    if !crate::cpu::has_vnni_q16() {
        return;
    }
    let mut rng = Rng(0x5eed_0016);
    for &k in &[32usize, 64, 96, 160, 4096, 8224, 16416] {
        for &bs in &[32usize, 64, 128, 4096] {
            if !k.is_multiple_of(bs) {
                continue;
            }
            let packed: Vec<u8> = (0..k / 2).map(|_| rng.next() as u8).collect();
            let absmax: Vec<f32> = (0..k / bs)
                .map(|b| {
                    if b % 7 == 5 {
                        0.0
                    } else {
                        rng.unit() * 4.0 + 0.01
                    }
                })
                .collect();
            let xs: Vec<_> = (0..4).map(|_| acts(&mut rng, k, NF4_ONE)).collect();
            let want: [f32; 4] =
                std::array::from_fn(|i| dot_nf4_q16(&packed, &absmax, bs, &xs[i].0, &xs[i].1));
            let split: Vec<Vec<i16>> = xs
                .iter()
                .map(|(q, _)| {
                    let mut q = q.clone();
                    split_nf4_x(&mut q);
                    q
                })
                .collect();
            let xd: Vec<&Vec<f32>> = xs.iter().map(|x| &x.1).collect();
            let what = format!("nf4 K={k} bs={bs}");
            let got = rows_1_to_4!(true, &packed, &absmax, bs, split, xd);
            check(got, want, &what);
        }
    }
}

#[test]
fn int8_matches_reference() {
    if !crate::cpu::has_vnni_q16() {
        return;
    }
    let mut rng = Rng(0x5eed_0008);
    for &k in &[1usize, 2, 31, 33, 63, 64, 65, 100, 4096, 8193, 14336] {
        for &bl in &[k, 32, 64, 128] {
            if bl != k && !k.is_multiple_of(bl) {
                continue;
            }
            let q: Vec<u8> = (0..k).map(|_| rng.next() as u8).collect();
            let scales: Vec<f32> = (0..k.div_ceil(bl))
                .map(|b| {
                    if b % 5 == 3 {
                        0.0
                    } else {
                        rng.unit() * 0.1 + 1e-4
                    }
                })
                .collect();
            let xs: Vec<_> = (0..4).map(|_| acts(&mut rng, k, 1.0)).collect();
            let want: [f32; 4] =
                std::array::from_fn(|i| dot_int8_q16(&q, &scales, bl, &xs[i].0, &xs[i].1));
            let xq: Vec<&Vec<i16>> = xs.iter().map(|x| &x.0).collect();
            let xd: Vec<&Vec<f32>> = xs.iter().map(|x| &x.1).collect();
            let what = format!("int8 K={k} bl={bl}");
            let got = rows_1_to_4!(false, &q, &scales, bl, xq, xd);
            check(got, want, &what);
        }
    }
}

#[test]
fn quantizer_matches_reference() {
    if !crate::cpu::has_vnni_q16() {
        return;
    }
    let mut rng = Rng(0x5eed_0017);
    for &k in &[1usize, 5, 16, 17, 63, 64, 65, 100, 128, 4096, 4099] {
        for per in [1.0f32, NF4_ONE] {
            let mut x: Vec<f32> = (0..k).map(|_| (rng.unit() - 0.5) * 9.0).collect();
            for i in (0..k).step_by(13) {
                x[i] = 0.0;
            }
            x[k / 2] = -x[k / 2].abs() * 1e3;
            if k > 200 {
                x[128..192].fill(1e-39); // a block of subnormals: counts as zero
                x[130] = -3e-34;
            }
            if k > 70 {
                x[64..70.min(k)].fill(1e-39); // a block of tiny values
                x[70] = 0.5 * x[70].signum();
            }
            let mut want = vec![0i16; q16_row_len(k)];
            let mut want_d = vec![0.0f32; q16_row_len(k) / Q16];
            quantize_row_q16(&x, per, &mut want, &mut want_d);
            for split in [false, true] {
                let mut q = vec![7i16; q16_row_len(k)];
                let mut d = vec![7.0f32; q16_row_len(k) / Q16];
                // SAFETY: cpu::has_vnni_q16() checked; sizes as documented.
                unsafe { quantize_row_q16_avx512(&x, per, split, &mut q, &mut d) };
                let mut w = want.clone();
                if split {
                    split_nf4_x(&mut w);
                }
                assert_eq!(q, w, "k={k} per={per} split={split}");
                assert_eq!(
                    d.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                    want_d.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
                );
            }
        }
    }
}
