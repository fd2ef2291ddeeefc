//! The x86 kernels of the f32-activation formats against the references, bit for bit: every
//! tier (AVX2 + FMA, AVX-512), 1 to 4 activation rows at once, block sizes 32 (odd and even
//! block counts) to 512 and whole rows, row lengths with tails of every size class, long rows,
//! activations from subnormal to 2^100, and the byte decoders on all 256 codes.

use super::avx512::nf4_lane_element;
use super::*;
use crate::matmul::tests::Rng;
use crate::matmul::AlignedX;
use crate::qtype::QType;

/// Activations of mixed magnitude: mostly normal-ish, some tiny (subnormal products), some
/// large, some exact zeros.
fn acts(rng: &mut Rng, n: usize) -> Vec<f32> {
    (0..n)
        .map(|i| {
            let v = (rng.unit() + rng.unit()) * 2.0;
            match i % 37 {
                3 => v * f32::powi(2.0, -140),
                11 => v * f32::powi(2.0, 60),
                19 => 0.0,
                _ => v,
            }
        })
        .collect()
}

fn same(got: &[f32], want: &[f32], what: &str) {
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        let ok = g.to_bits() == w.to_bits() || (g.is_nan() && w.is_nan());
        assert!(
            ok,
            "{what} row {i}: {g:e} ({:#x}) vs {w:e} ({:#x})",
            g.to_bits(),
            w.to_bits()
        );
    }
}

/// Runs `f` with R = 1..4 row arrays built from `rows`, checking every output against `want`.
fn rows_1_to_4(
    rows: &[Vec<f32>],
    want: &[f32],
    what: &str,
    f1: impl Fn([&[f32]; 1]) -> [f32; 1],
    f2: impl Fn([&[f32]; 2]) -> [f32; 2],
    f3: impl Fn([&[f32]; 3]) -> [f32; 3],
    f4: impl Fn([&[f32]; 4]) -> [f32; 4],
) {
    assert_eq!(rows.len(), 4);
    let x: [&[f32]; 4] = std::array::from_fn(|i| &rows[i][..]);
    same(&f1([x[0]]), &want[..1], &format!("{what} R=1"));
    same(&f2([x[1], x[2]]), &want[1..3], &format!("{what} R=2"));
    same(
        &f3([x[3], x[0], x[1]]),
        &[want[3], want[0], want[1]],
        &format!("{what} R=3"),
    );
    same(&f4(x), want, &format!("{what} R=4"));
}

#[test]
fn nf4_lane_permutation_is_a_bijection_and_permute_x_follows_it() {
    let mut seen = [false; 16];
    for t in 0..16 {
        seen[nf4_lane_element(t)] = true;
    }
    assert!(seen.iter().all(|&s| s));
    let x: Vec<f32> = (0..64).map(|i| i as f32).collect();
    let p = permute_nf4_x(&x);
    for (i, v) in p.iter().enumerate() {
        assert_eq!(*v as usize, 16 * (i / 16) + nf4_lane_element(i % 16));
    }
}

#[test]
fn nf4_kernels_are_bit_identical_to_the_reference() {
    if !has_fma() {
        return;
    }
    let mut rng = Rng(0x0f4a_11ce_5eed_0001);
    for bs in [32usize, 64, 128, 512] {
        for nb in [1usize, 2, 3, 5, 8] {
            let k = nb * bs;
            let packed = rng.bytes(k / 2);
            let absmax: Vec<f32> = (0..nb)
                .map(|b| match b % 4 {
                    1 => rng.unit().abs() * 1e-30,
                    2 => rng.unit().abs() * 1e20,
                    _ => rng.unit().abs(),
                })
                .collect();
            let rows: Vec<Vec<f32>> = (0..4).map(|_| acts(&mut rng, k)).collect();
            let want: Vec<f32> = rows
                .iter()
                .map(|x| r::dot_nf4(&packed, &absmax, bs, x))
                .collect();
            let what = format!("nf4 avx2 bs={bs} nb={nb}");
            // SAFETY: has_fma checked; lengths as documented.
            unsafe {
                rows_1_to_4(
                    &rows,
                    &want,
                    &what,
                    |x| dot_nf4(&packed, &absmax, bs, x),
                    |x| dot_nf4(&packed, &absmax, bs, x),
                    |x| dot_nf4(&packed, &absmax, bs, x),
                    |x| dot_nf4(&packed, &absmax, bs, x),
                );
            }
            if has_avx512() {
                let xp: Vec<Vec<f32>> = rows.iter().map(|x| permute_nf4_x(x).to_vec()).collect();
                let what = format!("nf4 avx512 bs={bs} nb={nb}");
                // SAFETY: has_avx512 checked; lengths as documented.
                unsafe {
                    rows_1_to_4(
                        &xp,
                        &want,
                        &what,
                        |x| dot_nf4_avx512(&packed, &absmax, bs, x),
                        |x| dot_nf4_avx512(&packed, &absmax, bs, x),
                        |x| dot_nf4_avx512(&packed, &absmax, bs, x),
                        |x| dot_nf4_avx512(&packed, &absmax, bs, x),
                    );
                }
            }
        }
    }
}

/// (K, block length) pairs: whole rows with tails of 1..63 (and none), blocks of 32 with odd
/// and even counts, larger blocks, long rows.
const BYTE_SHAPES: [(usize, usize); 14] = [
    (64, 64),
    (65, 65),
    (77, 77),
    (100, 100),
    (127, 127),
    (145, 145),
    (333, 333),
    (4136, 4136),
    (96, 32),
    (320, 32),
    (256, 64),
    (1024, 256),
    (14336, 14336),
    (40, 40),
];

fn bytes_case<D: Decode16>(e4m3: bool, e5m2: bool, with_nan: bool, seed: u64) {
    if !has_fma() {
        return;
    }
    let mut rng = Rng(seed);
    let table = r::fp8_table(e5m2);
    let is_fp8 = e4m3 || e5m2;
    for (k, bl) in BYTE_SHAPES {
        let mut q = rng.bytes(k);
        if is_fp8 && !with_nan {
            for b in q.iter_mut() {
                if !table[*b as usize].is_finite() {
                    *b = 0;
                }
            }
        }
        if with_nan {
            q[k / 3] = if e4m3 { 0xff } else { 0x7e };
        }
        let scales: Vec<f32> = (0..k.div_ceil(bl)).map(|_| rng.unit()).collect();
        let rows: Vec<Vec<f32>> = (0..4).map(|_| acts(&mut rng, k)).collect();
        let want: Vec<f32> = rows
            .iter()
            .map(|x| r::dot_bytes(&q, &scales, bl, x, D::value))
            .collect();
        let what = format!("{} k={k} block={bl}", std::any::type_name::<D>());
        // SAFETY: has_fma checked; lengths as documented.
        unsafe {
            rows_1_to_4(
                &rows,
                &want,
                &format!("avx2 {what}"),
                |x| dot_fp8::<D, 1>(&q, &scales, bl, x),
                |x| dot_fp8::<D, 2>(&q, &scales, bl, x),
                |x| dot_fp8::<D, 3>(&q, &scales, bl, x),
                |x| dot_fp8::<D, 4>(&q, &scales, bl, x),
            );
        }
        if has_avx512() && k >= WIDE {
            let xs: Vec<Vec<f32>> = if e4m3 {
                rows.iter().map(|x| scale_e4m3_x(x).to_vec()).collect()
            } else {
                rows.clone()
            };
            // SAFETY: has_avx512 checked; lengths as documented.
            unsafe {
                rows_1_to_4(
                    &xs,
                    &want,
                    &format!("avx512 {what}"),
                    |x| dot_bytes_avx512::<D, 1>(&q, &scales, bl, x),
                    |x| dot_bytes_avx512::<D, 2>(&q, &scales, bl, x),
                    |x| dot_bytes_avx512::<D, 3>(&q, &scales, bl, x),
                    |x| dot_bytes_avx512::<D, 4>(&q, &scales, bl, x),
                );
            }
        }
        if with_nan {
            assert!(want.iter().all(|v| v.is_nan()), "{what}");
        }
    }
}

#[test]
fn int8_kernels_are_bit_identical_to_the_reference() {
    bytes_case::<Int8>(false, false, false, 0x1e8_0001);
}

#[test]
fn fp8_kernels_are_bit_identical_to_the_reference() {
    bytes_case::<Fp8E4M3>(true, false, false, 0xe4_0001);
    bytes_case::<Fp8E5M2>(false, true, false, 0xe5_0001);
}

#[test]
fn fp8_rows_with_nan_codes_give_nan_in_every_tier() {
    bytes_case::<Fp8E4M3>(true, false, true, 0xe4_0002);
    bytes_case::<Fp8E5M2>(false, true, true, 0xe5_0002);
}

#[test]
fn decode16_of_every_byte_is_the_reference_value() {
    if !has_avx512() {
        return;
    }
    #[target_feature(enable = "avx2,f16c,avx512f,avx512bw,avx512vl")]
    fn all<D: Decode16>(scale: f32) -> Vec<f32> {
        let mut out = vec![0.0f32; 256];
        for c in 0..16 {
            let bytes: [u8; 16] = std::array::from_fn(|i| (16 * c + i) as u8);
            // SAFETY: AVX-512 enabled here; 16 bytes, 16 f32.
            unsafe {
                let v = D::decode16(_mm_loadu_si128(bytes.as_ptr() as *const __m128i));
                _mm512_storeu_ps(out[16 * c..].as_mut_ptr(), v);
            }
        }
        out.iter().map(|v| v * scale).collect()
    }
    // SAFETY: has_avx512 checked.
    let (i8v, e5, e4) = unsafe { (all::<Int8>(1.0), all::<Fp8E5M2>(1.0), all::<Fp8E4M3>(256.0)) };
    let (t5, t4) = (r::fp8_table(true), r::fp8_table(false));
    for b in 0..256 {
        assert_eq!(i8v[b], (b as u8 as i8) as f32);
        assert!(
            e5[b].to_bits() == t5[b].to_bits() || (e5[b].is_nan() && t5[b].is_nan()),
            "{b:#x}"
        );
        if b & 0x7f != 0x7f {
            assert_eq!(e4[b].to_bits(), t4[b].to_bits(), "e4m3 {b:#x}");
        }
    }
}

/// Kernel throughput from L2 (`cargo test --release bench_f32_kernels -- --ignored --nocapture`):
/// 64 rows of K = 4096, one activation row, the best of 9 passes of 50 sweeps.
#[test]
#[ignore]
fn bench_f32_kernels() {
    if !has_avx512() {
        return;
    }
    let (n, k) = (64usize, 4096usize);
    let mut rng = Rng(7);
    let x = align_x(&rng.normalish(k, 1.0));
    let xp = permute_nf4_x(&x);
    let x256 = scale_e4m3_x(&x);
    let w4 = rng.bytes(n * k / 2);
    let absmax: Vec<f32> = (0..n * k / 64).map(|_| rng.unit().abs()).collect();
    let mut w8 = rng.bytes(n * k);
    for b in w8.iter_mut() {
        if *b & 0x7f == 0x7f {
            *b = 0;
        }
    }
    let sc = vec![0.5f32; n];
    let time = |name: &str, bytes: usize, f: &dyn Fn(usize) -> f32| {
        let mut best = f64::MAX;
        let mut sink = 0.0f32;
        for _ in 0..9 {
            let t = std::time::Instant::now();
            for _ in 0..50 {
                for row in 0..n {
                    sink += f(row);
                }
            }
            best = best.min(t.elapsed().as_secs_f64() / 50.0);
        }
        eprintln!(
            "{name:24} {:6.1} GB/s  ({sink:e})",
            bytes as f64 / best / 1e9
        );
    };
    // SAFETY: has_avx512 checked; lengths as documented.
    unsafe {
        let nf4_bytes = n * (k / 2 + k / 64 * 4);
        time("nf4 avx512", nf4_bytes, &|i| {
            dot_nf4_avx512(
                &w4[i * k / 2..(i + 1) * k / 2],
                &absmax[i * 64..(i + 1) * 64],
                64,
                [&xp],
            )[0]
        });
        time("nf4 avx2", nf4_bytes, &|i| {
            dot_nf4(
                &w4[i * k / 2..(i + 1) * k / 2],
                &absmax[i * 64..(i + 1) * 64],
                64,
                [&x],
            )[0]
        });
        let rowb = |i: usize| &w8[i * k..(i + 1) * k];
        time("int8 avx512", n * k, &|i| {
            dot_bytes_avx512::<Int8, 1>(rowb(i), &sc[i..i + 1], k, [&x])[0]
        });
        time("int8 avx2", n * k, &|i| {
            dot_int8(rowb(i), &sc[i..i + 1], k, [&x])[0]
        });
        time("e4m3 avx512", n * k, &|i| {
            dot_bytes_avx512::<Fp8E4M3, 1>(rowb(i), &sc[i..i + 1], k, [&x256])[0]
        });
        time("e4m3 avx2", n * k, &|i| {
            dot_fp8::<Fp8E4M3, 1>(rowb(i), &sc[i..i + 1], k, [&x])[0]
        });
        time("e5m2 avx512", n * k, &|i| {
            dot_bytes_avx512::<Fp8E5M2, 1>(rowb(i), &sc[i..i + 1], k, [&x])[0]
        });
        time("e5m2 avx2", n * k, &|i| {
            dot_fp8::<Fp8E5M2, 1>(rowb(i), &sc[i..i + 1], k, [&x])[0]
        });
        time("nf4 avx512 R=4 (x4)", 4 * nf4_bytes, &|i| {
            dot_nf4_avx512(
                &w4[i * k / 2..(i + 1) * k / 2],
                &absmax[i * 64..(i + 1) * 64],
                64,
                [&xp, &xp, &xp, &xp],
            )[0]
        });
        let xr: Vec<AlignedX> = (0..4).map(|_| align_x(&rng.normalish(k, 1.0))).collect();
        let x4: [&[f32]; 4] = std::array::from_fn(|i| &xr[i][..]);
        time("int8 avx512 R=4 4 distinct x (x4)", 4 * n * k, &|i| {
            dot_bytes_avx512::<Int8, 4>(rowb(i), &sc[i..i + 1], k, x4)[0]
        });
        for piece in [512usize, 1024, 2048] {
            let name = format!("int8 pieces {piece} (x4)");
            time(&name, 4 * n * k, &|i| {
                if i % 4 != 0 {
                    return 0.0;
                }
                let mut l = [Lanes::<4>::new(); 4];
                for c0 in (0..k).step_by(piece) {
                    for (p, l) in l.iter_mut().enumerate() {
                        f32_range(
                            QType::Int8,
                            rowb(i + p),
                            &sc[i + p..i + p + 1],
                            k,
                            x4,
                            c0,
                            c0 + piece,
                            l,
                        );
                    }
                }
                l.iter()
                    .map(|l| f32_finish(QType::Int8, rowb(i), l)[0])
                    .sum()
            });
        }
        time("int8 avx512 R=4 (x4)", 4 * n * k, &|i| {
            dot_bytes_avx512::<Int8, 4>(rowb(i), &sc[i..i + 1], k, [&x, &x, &x, &x])[0]
        });
    }
}

/// `qmatmul` at M >= 2, and at M = 1 with rows past `LONG_K` (K in pieces over panels of weight
/// rows with AVX-512, the row kernels otherwise) gives every output the reference's bits for
/// its single row: panels cut short (7 weight rows), 1 to 4 activation rows per group, pieces
/// that split blocks and rows with tails, an e4m3 row with a NaN code.
#[test]
fn qmatmul_many_rows_equal_the_reference_row_by_row() {
    use crate::matmul::qmatmul;
    use crate::qtype::QType;
    use crate::quantize::{QuantizedView, ScaleMode};
    let mut rng = Rng(0x9a11_e1d0_0000_0001);
    let cases: [(QType, Option<ScaleMode>, usize, usize); 14] = [
        (QType::NF4, None, 64, 8256),
        (QType::Int8, Some(ScaleMode::Row), 64, 8257),
        (QType::Int8, Some(ScaleMode::Block), 32, 8224),
        (QType::NF4, None, 64, 4160),
        (QType::NF4, None, 32, 2144),
        (QType::NF4, None, 256, 2048),
        (QType::Int8, Some(ScaleMode::Row), 64, 2333),
        (QType::Int8, Some(ScaleMode::Tensor), 64, 1088),
        (QType::Int8, Some(ScaleMode::Block), 32, 2144),
        (QType::Int8, Some(ScaleMode::Block), 128, 3072),
        (QType::Fp8E4M3, Some(ScaleMode::Row), 64, 2100),
        (QType::Fp8E4M3, Some(ScaleMode::Block), 64, 1280),
        (QType::Fp8E5M2, Some(ScaleMode::Row), 64, 1100),
        (QType::Fp8E5M2, Some(ScaleMode::Block), 32, 1056),
    ];
    for (qtype, mode, bs, k) in cases {
        let n = 7;
        let mut data = rng.bytes(qtype.row_bytes(k, bs) * n);
        if matches!(qtype, QType::Fp8E4M3 | QType::Fp8E5M2) {
            let t = r::fp8_table(qtype == QType::Fp8E5M2);
            for b in data.iter_mut() {
                if !t[*b as usize].is_finite() {
                    *b = 0;
                }
            }
            if qtype == QType::Fp8E4M3 {
                data[3 * k + k / 2] = 0x7f;
            }
        }
        let n_stats = match mode {
            Some(ScaleMode::Tensor) => 1,
            Some(ScaleMode::Row) => n,
            _ => n * k / bs,
        };
        let stats: Vec<f32> = (0..n_stats).map(|_| rng.unit().abs() + 0.01).collect();
        let v = QuantizedView {
            qtype,
            rows: n,
            cols: k,
            block_size: bs,
            scale_mode: mode,
            data: &data,
            stats: &stats,
            double_quant: None,
        };
        let rb = qtype.row_bytes(k, bs);
        let row_stats = |row: usize| -> &[f32] {
            match mode {
                Some(ScaleMode::Tensor) => &stats[..],
                Some(ScaleMode::Row) => &stats[row..row + 1],
                _ => &stats[row * k / bs..(row + 1) * k / bs],
            }
        };
        let bl = if matches!(mode, Some(ScaleMode::Row | ScaleMode::Tensor)) {
            k
        } else {
            bs
        };
        for m in [1usize, 2, 3, 5, 9] {
            let x = acts(&mut rng, m * k);
            let mut y = vec![0.0f32; m * n];
            qmatmul(&x, m, &v, &mut y).unwrap();
            for mi in 0..m {
                for row in 0..n {
                    let (w, xr) = (&data[row * rb..(row + 1) * rb], &x[mi * k..(mi + 1) * k]);
                    let want = match qtype {
                        QType::NF4 => r::dot_nf4(w, row_stats(row), bs, xr),
                        QType::Int8 => r::dot_int8(w, row_stats(row), bl, xr),
                        _ => r::dot_fp8(w, row_stats(row), bl, xr, qtype == QType::Fp8E5M2),
                    };
                    same(
                        &[y[mi * n + row]],
                        &[want],
                        &format!("{qtype:?} {mode:?} k={k} m={m} ({mi}, {row})"),
                    );
                }
            }
        }
    }
}
