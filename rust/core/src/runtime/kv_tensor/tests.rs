use super::*;

#[test]
fn exp_neg_is_close_to_exp() {
    for i in 0..20_000 {
        let x = -(i as f32) * 0.0045;
        let (a, b) = (exp_neg(x) as f64, (x as f64).exp());
        if x < -87.3 {
            // the cut-off (about f32's smallest normal): a weight that cannot matter
            assert!(
                a == 0.0 && b < 2.0 * f32::MIN_POSITIVE as f64,
                "{x}: {a} vs {b}"
            );
        } else {
            assert!(
                (a - b).abs() <= 4.0 * f32::EPSILON as f64 * b,
                "{x}: {a} vs {b}"
            );
        }
    }
    assert_eq!(exp_neg(f32::NEG_INFINITY), 0.0);
    assert_eq!(exp_neg(0.0), 1.0);
}

#[test]
fn f32_cache_matches_plain_attention() {
    // one head, 3 positions, head_dim 32: softmax(q.k) v by hand
    let d = 32;
    let ks: Vec<f32> = (0..3 * d)
        .map(|i| ((i * 7 % 11) as f32 - 5.0) / 8.0)
        .collect();
    let vs: Vec<f32> = (0..3 * d)
        .map(|i| ((i * 5 % 13) as f32 - 6.0) / 4.0)
        .collect();
    let q: Vec<f32> = (0..d).map(|i| ((i % 5) as f32 - 2.0) / 3.0).collect();
    let bytes = |x: &[f32]| x.iter().flat_map(|v| v.to_le_bytes()).collect::<Vec<u8>>();
    let (kb, vb) = (bytes(&ks), bytes(&vs));
    let l = Layer {
        kind: Kind::F32,
        group: 32,
        batch: 1,
        n_head_kv: 1,
        head_dim: d,
        n_quant: 3,
        k: Parts {
            main: &kb,
            scale: &[],
            zero: &[],
            cap: 3,
        },
        v: Parts {
            main: &vb,
            scale: &[],
            zero: &[],
            cap: 3,
        },
        tail_k: &[],
        tail_v: &[],
        tail_cap: 0,
        n_tail: 0,
    };
    let mut out = vec![0f32; d];
    attend_decode(&l, 1, &q, 0.5, None, &mut out, false).unwrap();
    let s: Vec<f64> = (0..3)
        .map(|t| {
            0.5 * (0..d)
                .map(|c| q[c] as f64 * ks[t * d + c] as f64)
                .sum::<f64>()
        })
        .collect();
    let mx = s.iter().cloned().fold(f64::MIN, f64::max);
    let w: Vec<f64> = s.iter().map(|x| (x - mx).exp()).collect();
    let z: f64 = w.iter().sum();
    for c in 0..d {
        let want: f64 = (0..3).map(|t| w[t] / z * vs[t * d + c] as f64).sum();
        assert!(
            (out[c] as f64 - want).abs() < 1e-5,
            "{c}: {} vs {want}",
            out[c]
        );
    }
    // a wrong buffer size is an error, not a panic
    let short = Layer { n_quant: 4, ..l };
    assert!(attend_decode(&short, 1, &q, 0.5, None, &mut out, false).is_err());
}

/// A KIVI layer of arbitrary codes and f16 scales / zeros (a fixed pseudo-random stream).
fn kivi_bytes(bits: u32, g: usize, d: usize, bh: usize, n: usize, seed: u64) -> [Vec<u8>; 6] {
    let mut x = seed.wrapping_mul(6_364_136_223_846_793_005) | 1;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let mut f16s = |count: usize, lo: f32, hi: f32| -> Vec<u8> {
        (0..count)
            .flat_map(|_| {
                let u = (next() % 10_000) as f32 / 10_000.0;
                half::f16::from_f32(lo + (hi - lo) * u).to_le_bytes()
            })
            .collect()
    };
    let groups = n.div_ceil(g);
    let (km, ks, kz) = row_bytes(Kind::Kivi(bits), true, d, g);
    let (vm, vs, vz) = row_bytes(Kind::Kivi(bits), false, d, g);
    let k_scale = f16s(bh * groups * ks / 2, 0.01, 0.5);
    let k_zero = f16s(bh * groups * kz / 2, -4.0, 1.0);
    let v_scale = f16s(bh * n * vs / 2, 0.01, 0.3);
    let v_zero = f16s(bh * n * vz / 2, -2.0, 0.5);
    let mut bytes = |count: usize| (0..count).map(|_| next() as u8).collect::<Vec<u8>>();
    [
        bytes(bh * groups * km),
        k_scale,
        k_zero,
        bytes(bh * n * vm),
        v_scale,
        v_zero,
    ]
}

#[test]
fn simd_kivi_kernel_is_bit_exact_with_the_reference() {
    for (bits, g, d, rep, n, n_tail, masked) in [
        (4, 64, 64, 3, 200, 8, false),
        (2, 64, 64, 3, 2048, 0, false),
        (4, 32, 128, 2, 77, 13, true),
        (2, 32, 32, 4, 31, 1, true),
        (4, 64, 128, 1, 130, 0, true),
        (2, 64, 64, 5, 1, 3, false),
        // KIVI's sinks and residual window: a long float32 tail (four rows at a time + rest)
        (2, 64, 64, 3, 64, 141, true),
        (2, 64, 128, 2, 128, 130, false),
        (4, 32, 32, 3, 0, 67, true),
        // the AVX-512 loops: token pairs cut by n, 4+ query heads, 128 channels, tails
        // of 1-3 rows past the fours
        (4, 64, 128, 4, 131, 7, true),
        (2, 64, 64, 6, 65, 2, false),
        (2, 32, 64, 3, 33, 5, true),
        (4, 32, 64, 1, 95, 1, false),
        (4, 128, 128, 3, 300, 4, true),
    ] {
        let (batch, n_head_kv) = (2, 2);
        let bh = batch * n_head_kv;
        let [km, ks, kz, vm, vs, vz] = kivi_bytes(bits, g, d, bh, n, n as u64 + 7);
        let wave = |i: usize, f: f32| (i as f32 * f).sin() * 2.0;
        let tail_cap = n_tail + 5; // the cache's buffers have room past the used rows
        let tail_k: Vec<f32> = (0..bh * tail_cap * d).map(|i| wave(i, 0.37)).collect();
        let tail_v: Vec<f32> = (0..bh * tail_cap * d).map(|i| wave(i, 0.11)).collect();
        let n_head = n_head_kv * rep;
        let q: Vec<f32> = (0..batch * n_head * d).map(|i| wave(i, 0.73)).collect();
        let total = n + n_tail;
        let mask: Vec<u8> = (0..batch * total).map(|i| (i % 5 != 1) as u8).collect();
        let l = Layer {
            kind: Kind::Kivi(bits),
            group: g,
            batch,
            n_head_kv,
            head_dim: d,
            n_quant: n,
            k: Parts {
                main: &km,
                scale: &ks,
                zero: &kz,
                cap: n.div_ceil(g),
            },
            v: Parts {
                main: &vm,
                scale: &vs,
                zero: &vz,
                cap: n,
            },
            tail_k: &tail_k,
            tail_v: &tail_v,
            tail_cap,
            n_tail,
        };
        #[cfg(target_arch = "x86_64")]
        assert_eq!(simd::takes(&l), crate::cpu::has_avx2());
        let m = masked.then_some(&mask[..]);
        let (mut fast, mut slow) = (vec![0f32; q.len()], vec![0f32; q.len()]);
        attend_decode(&l, n_head, &q, 0.125, m, &mut fast, false).unwrap();
        attend_decode(&l, n_head, &q, 0.125, m, &mut slow, true).unwrap();
        assert!(fast.iter().all(|x| x.is_finite()));
        let same = |x: &[f32]| x.iter().zip(&slow).all(|(a, b)| a.to_bits() == b.to_bits());
        assert!(same(&fast), "bits {bits} g {g} d {d} rep {rep} n {n}");
        // both SIMD variants, whichever the dispatch picks (AVX-512 where the CPU has it)
        #[cfg(target_arch = "x86_64")]
        if simd::takes(&l) {
            for wide in [false, true] {
                let mut o = vec![0f32; q.len()];
                for (bh, oh) in o.chunks_mut(rep * d).enumerate() {
                    let qh = &q[bh * rep * d..(bh + 1) * rep * d];
                    let b = bh / n_head_kv;
                    let mrow = m.map(|m| &m[b * total..(b + 1) * total]);
                    simd::head_kivi_with(&l, bh, rep, qh, 0.125, mrow, oh, wide);
                }
                assert!(
                    same(&o),
                    "wide {wide} bits {bits} g {g} d {d} rep {rep} n {n}"
                );
            }
        }
    }
}
