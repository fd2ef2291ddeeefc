//! The AVX2 bf16 GEMM (`gemm_bf16_avx2.rs`), forced on this thread whatever the CPU has beyond
//! AVX2 + FMA: its rounding (`round8`) against `reference::bf16::round_bf16` on dense bit
//! patterns, its kernel's run-time check, and every output of nf4, int8 (row, block, tensor
//! scales), fp8 (NaN and infinite weights) and grouped integers against `dot_bf16` bit for bit,
//! on the pool and on one thread, for N with partial panels and kernel groups, K over several
//! chunks and a piece, M from 1 to two blocks of activation rows (a last partial group),
//! activations with subnormals, huge values and the extremes of the activation range.

use super::bf16::raw_view_parts;
use super::{mixed_acts, quantized, Rng};
use crate::formats::tensor::{QuantizedView, ScaleMode};
use crate::matmul::gemm_bf16_avx2::{check_semantics, round8, FORCE};
use crate::matmul::qmatmul;
use crate::matmul::reference::bf16::{dot_bf16, round_bf16};
use crate::qtype::QType;
use crate::quantize::dequantize;

fn able() -> bool {
    crate::cpu::has_fma()
}

#[test]
fn round8_equals_round_bf16_on_dense_bit_patterns() {
    if !able() {
        return;
    }
    #[target_feature(enable = "avx2,fma")]
    fn check8(bits: &[u32; 8]) {
        use std::arch::x86_64::*;
        // SAFETY: 8 u32 read, 8 f32 written.
        let got: [u32; 8] = unsafe {
            let v = _mm256_loadu_ps(bits.as_ptr() as *const f32);
            std::mem::transmute(round8(v))
        };
        for (b, g) in bits.iter().zip(got) {
            let want = (round_bf16(f32::from_bits(*b)) as u32) << 16;
            assert_eq!(g, want, "{b:#010x}");
        }
    }
    // SAFETY: AVX2 and FMA checked above.
    let check = |b: &[u32; 8]| unsafe { check8(b) };
    // Every top half with the low halves at and around the rounding points, and every low
    // half of a few top halves (subnormal, smallest normal, one, largest finite, inf, NaN).
    let lows = [0, 1, 0x7ffe, 0x7fff, 0x8000, 0x8001, 0xfffe, 0xffff];
    for hi in 0..=0xffffu32 {
        check(&lows.map(|l| hi << 16 | l));
    }
    for hi in [
        0x0000u32, 0x0080, 0x3f80, 0x7f7f, 0x7f80, 0x7fc0, 0x8000, 0x807f, 0xff80,
    ] {
        for l0 in (0..0x10000u32).step_by(8) {
            check(&std::array::from_fn(|i| hi << 16 | (l0 + i as u32)));
        }
    }
    // And a stride through all 2^32 patterns.
    let mut b = 0u32;
    for _ in 0..(1 << 20) {
        check(&std::array::from_fn(|i| {
            b = b.wrapping_add(0x0000_1001 + i as u32);
            b
        }));
    }
}

/// The kernel's run-time check must pass here: a kernel that broke it would silently leave
/// the path off, so it fails instead.
#[test]
fn avx2_kernel_semantics_hold() {
    if able() {
        // SAFETY: AVX2 and FMA checked.
        assert!(unsafe { check_semantics() });
    }
}

/// qmatmul with the path forced at each of `ms` rows, pool and one thread, against `dot_bf16`.
fn check(name: &str, v: &QuantizedView<'_>, deq: &[f32], ms: &[usize], rng: &mut Rng) {
    let (n, k) = (v.rows, v.cols);
    FORCE.set(Some(true));
    for &m in ms {
        let mut x = if m % 2 == 1 {
            mixed_acts(rng, m * k)
        } else {
            rng.normalish(m * k, 1.0)
        };
        // The activation extremes the path meets: -128 / 127, a value that rounds to inf.
        x[0] = -128.0;
        x[k / 2] = 127.0;
        if m > 2 {
            x[2 * k + 1] = f32::MAX;
        }
        let mut y = vec![0f32; m * n];
        qmatmul(&x, m, v, &mut y).unwrap();
        let mut y1 = vec![0f32; m * n];
        crate::parallel::set_num_threads(1);
        let one = qmatmul(&x, m, v, &mut y1);
        crate::parallel::set_num_threads(0);
        one.unwrap();
        for mi in 0..m {
            let xr = &x[mi * k..(mi + 1) * k];
            for row in 0..n {
                let want = dot_bf16(&deq[row * k..(row + 1) * k], xr);
                let (got, got1) = (y[mi * n + row], y1[mi * n + row]);
                let same = |a: f32| a.to_bits() == want.to_bits() || (a.is_nan() && want.is_nan());
                assert!(
                    same(got) && same(got1),
                    "{name} k={k} n={n} m={m} ({mi}, {row}): {got:e} / {got1:e} vs {want:e}"
                );
            }
        }
    }
    FORCE.set(None);
}

#[test]
fn avx2_bf16_gemm_equals_its_reference_bnb_and_fp8() {
    if !able() {
        return;
    }
    let mut rng = Rng(0xbf16_a2a2_6e11_0021);
    let cases: [(QType, Option<ScaleMode>, usize, usize, usize); 9] = [
        (QType::NF4, None, 64, 640, 79),
        (QType::NF4, None, 32, 288, 7),
        (QType::Int8, Some(ScaleMode::Row), 64, 288, 53),
        (QType::Int8, Some(ScaleMode::Block), 32, 544, 13),
        (QType::Int8, Some(ScaleMode::Tensor), 64, 256, 6),
        (QType::Fp8E4M3, Some(ScaleMode::Row), 64, 320, 17),
        (QType::Fp8E4M3, Some(ScaleMode::Block), 64, 576, 9),
        (QType::Fp8E5M2, Some(ScaleMode::Row), 64, 288, 11),
        (QType::Fp8E5M2, Some(ScaleMode::Block), 32, 256, 50),
    ];
    for (i, (qtype, mode, bs, k, n)) in cases.into_iter().enumerate() {
        let (mut data, mut stats) = raw_view_parts(&mut rng, qtype, mode, bs, n, k);
        match qtype {
            // NaN weights (e4m3 0x7f, e5m2 0x7e) and e5m2's infinities (0x7c, 0xfc).
            QType::Fp8E4M3 => data[3 * k + 77] = 0x7f,
            QType::Fp8E5M2 => {
                data[2 * k + 5] = 0x7e;
                data[4 * k + 9] = 0x7c;
                data[5 * k + 200] = 0xfc;
            }
            // The largest codes with a large scale.
            QType::Int8 => {
                data[..64].fill(0x80);
                data[64..128].fill(0x7f);
                stats[0] = 3.0e4;
            }
            _ => data[..32].fill(0xff),
        }
        let block_size = match mode {
            Some(ScaleMode::Row) => k,
            Some(ScaleMode::Tensor) => n * k,
            _ => bs,
        };
        let v = QuantizedView {
            qtype,
            rows: n,
            cols: k,
            block_size,
            scale_mode: mode,
            data: &data,
            stats: &stats,
            double_quant: None,
        };
        let mut deq = vec![0f32; n * k];
        dequantize(&v, &mut deq).unwrap();
        let ms: &[usize] = if i == 0 {
            &[1, 5, 16, 17, 300]
        } else {
            &[3, 16, 33]
        };
        check(
            &format!("{qtype:?} {mode:?} bs={bs}"),
            &v,
            &deq,
            ms,
            &mut rng,
        );
    }
}

#[test]
fn avx2_bf16_gemm_equals_its_reference_grouped_integers() {
    if !able() {
        return;
    }
    let mut rng = Rng(0xbf16_a2a2_6e11_0022);
    let cases = [
        ("int4_g64", 640, 79),
        ("int4_g128_sym", 384, 7),
        ("int4_g32", 544, 13),
        ("int3_g64", 320, 9),
        ("int3_gch", 288, 11),
        ("int2_g32", 96, 6),
        ("int4_gch", 4128, 5),
        ("int8_g64_sym", 128, 50),
        ("int8_gch_sym", 96, 3),
        ("int8_g128_sym", 384, 9),
    ];
    for (i, (name, k, n)) in cases.into_iter().enumerate() {
        let qtype = QType::parse(name).unwrap();
        let (q, deq) = quantized(&mut rng, qtype, n, k);
        let ms: &[usize] = if i == 0 { &[2, 17, 300] } else { &[7, 20] };
        check(name, &q.view(), &deq, ms, &mut rng);
    }
}
