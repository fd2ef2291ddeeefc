//! The x86 kernels of the f32-activation formats (fp8) against the references, bit for bit: every
//! tier (AVX2 + FMA, AVX-512), 1 to 4 activation rows at once, block sizes 32 (odd and even
//! block counts) to 512 and whole rows, row lengths with tails of every size class, long rows,
//! activations from subnormal to 2^100, and the byte decoders on all 256 codes.

use super::*;
use crate::matmul::tests::{mixed_acts as acts, Rng};

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

/// (K, block length) pairs: whole rows with tails of 1..63 (and none), blocks of 32 with odd
/// and even counts, larger blocks, long rows.
const BYTE_SHAPES: [(usize, usize); 16] = [
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
    (8256, 64),
    (4192, 32),
];

fn bytes_case<D: Decode16>(e4m3: bool, e5m2: bool, with_nan: bool, seed: u64) {
    if !crate::cpu::has_fma() {
        return;
    }
    let mut rng = Rng(seed);
    let table = r::fp8_table(e5m2);
    let is_fp8 = e4m3 || e5m2;
    for (k, bl) in BYTE_SHAPES {
        let mut q = rng.bytes(k);
        if is_fp8 {
            for b in q.iter_mut() {
                if !table[*b as usize].is_finite() {
                    *b = 0;
                }
            }
        }
        let scales: Vec<f32> = (0..k.div_ceil(bl)).map(|_| rng.unit()).collect();
        let mut rows: Vec<Vec<f32>> = (0..4).map(|_| acts(&mut rng, k)).collect();
        if D::X_SCALE > 256.0 {
            // `Fp8E4M3F32` runs for |x| < 2^8: the large activations at the largest such
            // float (x 2^120 just below 2^128), the subnormal and small ones as they are
            let edge = f32::from_bits(256.0f32.to_bits() - 1);
            for v in rows.iter_mut().flatten() {
                if v.abs() >= 256.0 {
                    *v = edge.copysign(*v);
                }
            }
        }
        if !with_nan {
            let _ = check_bytes::<D>(&q, &scales, bl, &rows);
            continue;
        }
        // A NaN code first, a third in, in the last whole 64 (or the last 32 of a block-32
        // row), and in the row's tail: the kernels find it wherever it sits.
        let last = k - 1;
        for at in [0, k / 3, (k / 64 * 64).saturating_sub(1), last] {
            let mut q = q.clone();
            q[at] = if e4m3 { 0xff } else { 0x7e };
            let want = check_bytes::<D>(&q, &scales, bl, &rows);
            assert!(
                want.iter().all(|v| v.is_nan()),
                "k={k} block={bl} NaN code at {at}"
            );
        }
    }
}

/// The activations as the AVX-512 kernels read them with `D` (what `plan` prepares).
fn prepared<D: Decode16>(x: &[f32]) -> Vec<f32> {
    if D::X_SCALE == avx512::E4M3_X_SCALE {
        scale_e4m3_x(x).to_vec()
    } else if D::X_SCALE == avx512::E4M3_F32_X_SCALE {
        assert!(e4m3_f32_x_fits(x), "Fp8E4M3F32 runs for |x| < 2^8");
        scale_e4m3_f32_x(x).to_vec()
    } else {
        x.to_vec()
    }
}

/// Every tier, 1 to 4 activation rows, and the M = 1 pieces (`dot_bytes_piece`) against the
/// reference for one weight row.
fn check_bytes<D: Decode16>(q: &[u8], scales: &[f32], bl: usize, rows: &[Vec<f32>]) -> Vec<f32> {
    let k = q.len();
    let want: Vec<f32> = rows
        .iter()
        .map(|x| r::dot_bytes(q, scales, bl, x, D::value))
        .collect();
    let what = format!("{} k={k} block={bl}", std::any::type_name::<D>());
    // SAFETY: has_fma checked (`bytes_case`); lengths as documented.
    unsafe {
        rows_1_to_4(
            rows,
            &want,
            &format!("avx2 {what}"),
            |x| dot_fp8::<D, 1>(q, scales, bl, x),
            |x| dot_fp8::<D, 2>(q, scales, bl, x),
            |x| dot_fp8::<D, 3>(q, scales, bl, x),
            |x| dot_fp8::<D, 4>(q, scales, bl, x),
        );
    }
    if crate::cpu::has_avx512() && k >= WIDE {
        let xs: Vec<Vec<f32>> = rows.iter().map(|x| prepared::<D>(x)).collect();
        // SAFETY: has_avx512 checked; lengths as documented.
        unsafe {
            rows_1_to_4(
                &xs,
                &want,
                &format!("avx512 {what}"),
                |x| dot_bytes_avx512::<D, 1>(q, scales, bl, x),
                |x| dot_bytes_avx512::<D, 2>(q, scales, bl, x),
                |x| dot_bytes_avx512::<D, 3>(q, scales, bl, x),
                |x| dot_bytes_avx512::<D, 4>(q, scales, bl, x),
            );
        }
    }
    if crate::cpu::has_avx512() && k >= WIDE {
        let x = prepared::<D>(&rows[0]);
        // pieces of one and three groups of 64, and `rows_bytes`' 4096
        for piece in [64, 192, 4096] {
            let mut l = ByteLanes::<1>::new();
            let mut nan = false;
            let mut i0 = 0;
            while i0 < k {
                let i1 = (i0 + piece).min(k);
                // SAFETY: has_avx512 checked; lengths as documented, i0 a multiple of 64.
                nan |= unsafe { dot_bytes_piece::<D>(q, scales, bl, &x, i0, i1, 4096, &mut l) };
                i0 = i1;
            }
            let got = if nan {
                f32::NAN
            } else {
                // SAFETY: has_avx512 checked.
                (unsafe { l.finish() })[0]
            };
            same(
                &[got],
                &want[..1],
                &format!("avx512 pieces of {piece} {what}"),
            );
        }
    }
    want
}

#[test]
fn fp8_kernels_are_bit_identical_to_the_reference() {
    bytes_case::<Fp8E4M3>(true, false, false, 0xe4_0001);
    bytes_case::<Fp8E4M3F32>(true, false, false, 0xe4_0003);
    bytes_case::<Fp8E5M2>(false, true, false, 0xe5_0001);
}

#[test]
fn fp8_rows_with_nan_codes_give_nan_in_every_tier() {
    bytes_case::<Fp8E4M3>(true, false, true, 0xe4_0002);
    bytes_case::<Fp8E4M3F32>(true, false, true, 0xe4_0004);
    bytes_case::<Fp8E5M2>(false, true, true, 0xe5_0002);
}

#[test]
fn decode16_of_every_byte_is_the_reference_value() {
    if !crate::cpu::has_avx512() {
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
        // decode32_512 gives decode16's bits for both halves
        for c in 0..8 {
            let bytes: [u8; 32] = std::array::from_fn(|i| (32 * c + i) as u8);
            let mut two = [0.0f32; 32];
            // SAFETY: AVX-512 enabled here; 32 bytes, 32 f32.
            unsafe {
                let [lo, hi] =
                    D::decode32_512(_mm256_loadu_si256(bytes.as_ptr() as *const __m256i));
                _mm512_storeu_ps(two.as_mut_ptr(), lo);
                _mm512_storeu_ps(two[16..].as_mut_ptr(), hi);
            }
            for (i, v) in two.iter().enumerate() {
                let want = out[32 * c + i];
                assert!(
                    v.to_bits() == want.to_bits(),
                    "decode32_512 {:#x}",
                    32 * c + i
                );
            }
        }
        out.iter().map(|v| v * scale).collect()
    }
    // SAFETY: has_avx512 checked.
    let (e5, e4, e4f) = unsafe {
        (
            all::<Fp8E5M2>(1.0),
            all::<Fp8E4M3>(256.0),
            all::<Fp8E4M3F32>(avx512::E4M3_F32_X_SCALE),
        )
    };
    let (t5, t4) = (r::fp8_table(true), r::fp8_table(false));
    for b in 0..256 {
        assert!(
            e5[b].to_bits() == t5[b].to_bits() || (e5[b].is_nan() && t5[b].is_nan()),
            "{b:#x}"
        );
        if b & 0x7f != 0x7f {
            assert_eq!(e4[b].to_bits(), t4[b].to_bits(), "e4m3 {b:#x}");
            assert_eq!(e4f[b].to_bits(), t4[b].to_bits(), "e4m3 as f32 {b:#x}");
        }
    }
}

/// `dot_bytes_piece_rows` (a panel of rows with one scale each, interleaved) against the
/// reference row by row, in pieces of one and three groups of 64 and of 4096, with a NaN code
/// in one row (e4m3): each row's bits and its NaN alone.
fn piece_rows_case<D: Decode16>(e5m2: bool, seed: u64) {
    if !crate::cpu::has_avx512() {
        return;
    }
    const P: usize = 4;
    let mut rng = Rng(seed);
    let table = r::fp8_table(e5m2);
    for k in [64, 320, 4160, 14336] {
        let mut q: Vec<Vec<u8>> = (0..P).map(|_| rng.bytes(k)).collect();
        for b in q.iter_mut().flatten() {
            if !table[*b as usize].is_finite() {
                *b = 0;
            }
        }
        if D::E4M3 {
            q[2][k / 3] = 0xff;
        }
        let scales: [f32; P] = std::array::from_fn(|_| rng.unit());
        let mut x = acts(&mut rng, k);
        if D::X_SCALE > 256.0 {
            let edge = f32::from_bits(256.0f32.to_bits() - 1);
            for v in x.iter_mut() {
                if v.abs() >= 256.0 {
                    *v = edge.copysign(*v);
                }
            }
        }
        let want: Vec<f32> = (0..P)
            .map(|p| r::dot_bytes(&q[p], &scales[p..p + 1], k, &x, D::value))
            .collect();
        let xs = prepared::<D>(&x);
        for piece in [64, 192, 4096] {
            let mut l = [ByteLanes::<1>::new(); P];
            let mut nan = [false; P];
            let mut i0 = 0;
            while i0 < k {
                let i1 = (i0 + piece).min(k);
                let rows: [&[u8]; P] = std::array::from_fn(|p| &q[p][..]);
                // SAFETY: has_avx512 checked; K a multiple of 64, i0 and i1 too.
                let found = unsafe {
                    dot_bytes_piece_rows::<D, P>(rows, scales, &xs, i0, i1, 4096, &mut l)
                };
                for p in 0..P {
                    nan[p] |= found[p];
                }
                i0 = i1;
            }
            let got: Vec<f32> = (0..P)
                .map(|p| {
                    if nan[p] {
                        f32::NAN
                    } else {
                        // SAFETY: has_avx512 checked.
                        (unsafe { l[p].finish() })[0]
                    }
                })
                .collect();
            let what = format!("{} k={k} pieces of {piece}", std::any::type_name::<D>());
            same(&got, &want, &what);
            if D::E4M3 {
                assert!(
                    got[2].is_nan() && !got[0].is_nan(),
                    "{what}: NaN in row 2 only"
                );
            }
        }
    }
}

#[test]
fn fp8_panel_rows_are_bit_identical_to_the_reference() {
    piece_rows_case::<Fp8E4M3>(false, 0xe4_0011);
    piece_rows_case::<Fp8E4M3F32>(false, 0xe4_0012);
    piece_rows_case::<Fp8E5M2>(true, 0xe5_0011);
}
