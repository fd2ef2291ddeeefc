//! The NEON kernels against the scalar references, bit for bit: every format, many block counts
//! (below, at and past the 8-lane groups), one row and four rows at once, both integer kinds
//! (`smull` always; `sdot` where the CPU has dotprod: CI runs this file under qemu with
//! `-cpu max` and `-cpu cortex-a53`, and FERROQUANT_EXPECT_DOTPROD says which one it is).
//! Activations are quantized by the reference quantizers, and also raw random blocks (quants
//! of -128, bsums of any value) to show the integer paths are exact beyond what the
//! quantizers produce.

use bytemuck::{Pod, Zeroable};

use super::super::reference::{self as r, BlockQ8K};
use super::super::tests::formats::q8_1_row;
use super::super::tests::q16_rows as q16_test;
use super::super::tests::{blocks, Rng};
use super::*;
use crate::cpu::has_neon;

const NBS: [usize; 12] = [1, 2, 3, 7, 8, 9, 15, 16, 17, 24, 31, 33];
/// Activation scales: ordinary, large, tiny (products in the subnormal range), and a zero row.
const SCALES: [f32; 4] = [1.0, 300.0, 1e-19, 0.0];

fn dotprod_kinds() -> Vec<bool> {
    if has_dotprod() {
        vec![false, true]
    } else {
        vec![false]
    }
}

fn bits<const R: usize>(v: [f32; R]) -> [u32; R] {
    v.map(f32::to_bits)
}

/// Four activation rows of q8_0 blocks: quantized rows at each of `SCALES`, or raw random blocks
/// (with a finite f16 scale).
fn q8_0_rows(rng: &mut Rng, nb: usize, raw: bool) -> [Vec<BlockQ8_0>; 4] {
    std::array::from_fn(|i| {
        if raw {
            bytemuck::cast_slice(&blocks(rng, nb, 34, &[0])).to_vec()
        } else {
            let x = rng.normalish(nb * 32, SCALES[i]);
            let mut q = vec![BlockQ8_0::zeroed(); nb];
            r::quantize_row_q8_0(&x, &mut q);
            q
        }
    })
}

fn check_block32<W: Load32>(data: &[u8], xs: &[Vec<BlockQ8_0>; 4], what: &str) {
    let w: &[W] = bytemuck::cast_slice(data);
    let xd: [Vec<f32>; 4] =
        std::array::from_fn(|i| xs[i].iter().map(|b| f16_to_f32(b.d)).collect());
    let want: [f32; 4] = std::array::from_fn(|i| r::dot_block32(w, &xs[i], &xd[i]));
    let x4: [&[BlockQ8_0]; 4] = std::array::from_fn(|i| &xs[i][..]);
    let d4: [&[f32]; 4] = std::array::from_fn(|i| &xd[i][..]);
    for dp in dotprod_kinds() {
        // SAFETY: NEON is part of every aarch64 std target, dotprod only when detected; one
        // activation block and scale per weight block.
        let (four, ones) = unsafe {
            if dp {
                let ones: [f32; 4] =
                    std::array::from_fn(|i| dot_block32_sdot(w, [x4[i]], [d4[i]])[0]);
                (dot_block32_sdot(w, x4, d4), ones)
            } else {
                let ones: [f32; 4] =
                    std::array::from_fn(|i| dot_block32_mull(w, [x4[i]], [d4[i]])[0]);
                (dot_block32_mull(w, x4, d4), ones)
            }
        };
        assert_eq!(bits(four), bits(want), "{what} R=4 sdot={dp}");
        assert_eq!(bits(ones), bits(want), "{what} R=1 sdot={dp}");
    }
}

/// q4_1 / q5_1 against q8_1 activations (`dot_block32_min`), both integer kinds, R = 4 and 1.
fn check_block32_min<W: Load32>(rng: &mut Rng, nb: usize) {
    let data = blocks(rng, nb, std::mem::size_of::<W>(), &[0, 2]);
    let w: &[W] = bytemuck::cast_slice(&data);
    let rows: Vec<_> = (0..4)
        .map(|i| q8_1_row(&rng.normalish(nb * 32, SCALES[i])))
        .collect();
    let x: [&[BlockQ8_0]; 4] = std::array::from_fn(|i| &rows[i].0[..]);
    let xd: [&[f32]; 4] = std::array::from_fn(|i| &rows[i].1[..]);
    let xs: [&[f32]; 4] = std::array::from_fn(|i| &rows[i].3[..]);
    let want: [f32; 4] = std::array::from_fn(|i| r::dot_block32_min(w, x[i], xd[i], xs[i]));
    for dp in dotprod_kinds() {
        // SAFETY: NEON is part of every aarch64 std target, dotprod only when detected; one
        // activation block, scale and sum per weight block.
        let (four, ones) = unsafe {
            let one = |i: usize| {
                if dp {
                    dot_block32_min_sdot(w, [x[i]], [xd[i]], [xs[i]])[0]
                } else {
                    dot_block32_min_mull(w, [x[i]], [xd[i]], [xs[i]])[0]
                }
            };
            let ones: [f32; 4] = std::array::from_fn(one);
            if dp {
                (dot_block32_min_sdot(w, x, xd, xs), ones)
            } else {
                (dot_block32_min_mull(w, x, xd, xs), ones)
            }
        };
        let what = std::any::type_name::<W>();
        assert_eq!(bits(four), bits(want), "{what} nb={nb} R=4 sdot={dp}");
        assert_eq!(bits(ones), bits(want), "{what} nb={nb} R=1 sdot={dp}");
    }
}

#[test]
fn block32_min_kernels_equal_the_reference() {
    let mut rng = Rng(0x51de_0001_2345_6789);
    for nb in NBS {
        check_block32_min::<BlockQ4_1>(&mut rng, nb);
        check_block32_min::<BlockQ5_1>(&mut rng, nb);
    }
}

#[test]
fn detection_and_dispatch() {
    assert_eq!(has_neon(), !crate::cpu::force_scalar());
    assert_eq!(super::super::use_simd(), has_neon());
    assert!(!has_dotprod() || has_neon());
    let want = match (has_neon(), has_dotprod()) {
        (true, true) => "neon+dotprod",
        (true, false) => "neon",
        _ => "scalar",
    };
    assert_eq!(crate::cpu::level(), want);
    // CI says which CPU qemu emulates, so that each run provably takes the path it means to.
    if let Some(want) = crate::config::expect_dotprod() {
        assert_eq!(has_dotprod(), want, "FERROQUANT_EXPECT_DOTPROD");
    }
    if let Some(want) = crate::config::expect_i8mm() {
        assert_eq!(crate::cpu::has_i8mm(), want, "FERROQUANT_EXPECT_I8MM");
    }
    assert!(!crate::cpu::has_i8mm() || has_dotprod());
}

#[test]
fn block32_kernels_equal_the_reference() {
    let mut rng = Rng(0x0a0a_1234_5678_9abc);
    for nb in NBS {
        for raw in [false, true] {
            let xs = q8_0_rows(&mut rng, nb, raw);
            let tag = |q: &str| format!("{q} nb={nb} raw={raw}");
            check_block32::<BlockQ4_0>(&blocks(&mut rng, nb, 18, &[0]), &xs, &tag("q4_0"));
            check_block32::<BlockQ5_0>(&blocks(&mut rng, nb, 22, &[0]), &xs, &tag("q5_0"));
            check_block32::<BlockQ8_0>(&blocks(&mut rng, nb, 34, &[0]), &xs, &tag("q8_0"));
            check_block32::<BlockIQ4NL>(&blocks(&mut rng, nb, 18, &[0]), &xs, &tag("iq4_nl"));
        }
    }
}

/// Extreme quants: every weight and activation quant at -128 or 127 (the i8 products and their
/// pairwise sums are largest there: 2 · 128 · 128 does not fit i16).
#[test]
fn block32_extreme_quants_equal_the_reference() {
    for nb in [1usize, 8, 9] {
        for (wq, xq) in [(-128i8, -128i8), (127, 127), (-128, 127), (127, -128)] {
            let mk = |q: i8| -> Vec<BlockQ8_0> {
                (0..nb)
                    .map(|b| BlockQ8_0 {
                        d: f16_from_f32(0.5 + b as f32),
                        qs: [q; 32],
                    })
                    .collect()
            };
            let w = mk(wq);
            let xs: [Vec<BlockQ8_0>; 4] = std::array::from_fn(|_| mk(xq));
            check_block32::<BlockQ8_0>(bytemuck::cast_slice(&w), &xs, &format!("q8_0 {wq} {xq}"));
        }
    }
}

#[test]
fn block32_loads_equal_the_reference_unpacking() {
    let mut rng = Rng(0x7777_0000_1111_2222);
    let as_array = |v: [int8x16_t; 2]| {
        let mut a = [0i8; 32];
        // SAFETY: `a` has room for 2 x 16 bytes.
        unsafe {
            vst1q_s8(a.as_mut_ptr(), v[0]);
            vst1q_s8(a[16..].as_mut_ptr(), v[1]);
        }
        a
    };
    for _ in 0..500 {
        let b5: BlockQ5_0 = bytemuck::pod_read_unaligned(&rng.bytes(22));
        assert_eq!(as_array(b5.load()), r::unpack_q5_0(&b5));
        let b51: BlockQ5_1 = bytemuck::pod_read_unaligned(&rng.bytes(24));
        assert_eq!(as_array(b51.load()), r::unpack_q5_1(&b51));
        let b41: BlockQ4_1 = bytemuck::pod_read_unaligned(&rng.bytes(20));
        assert_eq!(as_array(b41.load()), r::unpack_q4_1(&b41));
        let b4: BlockQ4_0 = bytemuck::pod_read_unaligned(&rng.bytes(18));
        assert_eq!(as_array(b4.load()), r::unpack_q4_0(&b4));
        let bi: BlockIQ4NL = bytemuck::pod_read_unaligned(&rng.bytes(18));
        assert_eq!(as_array(bi.load()), r::unpack_iq4_nl(&bi));
    }
}

#[test]
fn f16_vector_conversion_equals_f16_to_f32() {
    // every f16 bit pattern, eight at a time, NaNs included (both quiet a signalling NaN)
    for base in (0..=u16::MAX).step_by(8) {
        let h: [u16; 8] = std::array::from_fn(|i| base + i as u16);
        let [lo, hi] = f16x8_to_f32(&h);
        let (lo, hi) = (store_f32(lo), store_f32(hi));
        for i in 0..8 {
            let got = if i < 4 { lo[i] } else { hi[i - 4] };
            let want = f16_to_f32(h[i].to_le_bytes());
            assert!(
                got.to_bits() == want.to_bits(),
                "{:#06x}: {got} vs {want}",
                h[i]
            );
        }
    }
}

/// Four activation rows of q8_K blocks (quantized at each of `SCALES`, or raw random bytes).
fn q8_k_rows(rng: &mut Rng, nb: usize, raw: bool) -> [Vec<BlockQ8K>; 4] {
    std::array::from_fn(|i| {
        let mut q = vec![BlockQ8K::zeroed(); nb];
        if raw {
            let mut bytes = rng.bytes(nb * 292);
            for b in 0..nb {
                bytes[b * 292..b * 292 + 4].copy_from_slice(&(rng.unit() * 0.1).to_le_bytes());
            }
            q = bytemuck::cast_slice(&bytes).to_vec();
        } else {
            r::quantize_row_q8_k(&rng.normalish(nb * QK_K, SCALES[i]), &mut q);
        }
        q
    })
}

fn check_block_k<W: DecodeK>(data: &[u8], xs: &[Vec<BlockQ8K>; 4], what: &str) {
    let w: &[W] = bytemuck::cast_slice(data);
    for dp in dotprod_kinds() {
        for x in xs {
            for (wb, xb) in w.iter().zip(x) {
                assert_eq!(
                    sums_for_test(wb, xb, dp),
                    wb.sums(xb),
                    "{what} sums sdot={dp}"
                );
            }
        }
    }
    let want: [f32; 4] = std::array::from_fn(|i| r::dot_block_k(w, &xs[i]));
    let x4: [&[BlockQ8K]; 4] = std::array::from_fn(|i| &xs[i][..]);
    for dp in dotprod_kinds() {
        // SAFETY: NEON always, dotprod only when detected; one activation block per weight block.
        let (four, ones) = unsafe {
            if dp {
                let ones: [f32; 4] = std::array::from_fn(|i| dot_block_k_sdot(w, [x4[i]])[0]);
                (dot_block_k_sdot(w, x4), ones)
            } else {
                let ones: [f32; 4] = std::array::from_fn(|i| dot_block_k_mull(w, [x4[i]])[0]);
                (dot_block_k_mull(w, x4), ones)
            }
        };
        assert_eq!(bits(four), bits(want), "{what} R=4 sdot={dp}");
        assert_eq!(bits(ones), bits(want), "{what} R=1 sdot={dp}");
    }
}

#[test]
fn k_quant_kernels_equal_the_reference() {
    let mut rng = Rng(0x5151_abab_9e37_79b9);
    for nb in [1usize, 2, 7, 8, 9, 17] {
        for raw in [false, true] {
            let xs = q8_k_rows(&mut rng, nb, raw);
            let tag = |q: &str| format!("{q} nb={nb} raw={raw}");
            check_block_k::<BlockQ4K>(&blocks(&mut rng, nb, 144, &[0, 2]), &xs, &tag("q4_k"));
            check_block_k::<BlockQ5K>(&blocks(&mut rng, nb, 176, &[0, 2]), &xs, &tag("q5_k"));
            check_block_k::<BlockQ6K>(&blocks(&mut rng, nb, 210, &[208]), &xs, &tag("q6_k"));
            let q2 = blocks(&mut rng, nb, 84, &[80, 82]);
            check_block_k::<BlockQ2K>(&q2, &xs, &tag("q2_k"));
            check_block_k::<BlockQ3K>(&blocks(&mut rng, nb, 110, &[108]), &xs, &tag("q3_k"));
            let iq = blocks(&mut rng, nb, 136, &[0]);
            check_block_k::<BlockIQ4XS>(&iq, &xs, &tag("iq4_xs"));
            check_block_k::<BlockTQ1_0>(&blocks(&mut rng, nb, 54, &[52]), &xs, &tag("tq1_0"));
            check_block_k::<BlockTQ2_0>(&blocks(&mut rng, nb, 66, &[64]), &xs, &tag("tq2_0"));
        }
    }
}

// ---------------------------------------------------------------- q16 (nf4, int8)

/// nf4 row lengths: K % 128 of every kind of tail (0, 32, 64, 96: whole quarters of the last
/// unit; K % 32 != 0: a part quarter, with K % 8 == 0 or not), one to three units, long rows.
const NF4_K: [usize; 18] = [
    2, 8, 30, 32, 34, 64, 96, 100, 128, 160, 224, 246, 256, 4096, 4160, 8224, 14432, 16416,
];
const INT8_K: [usize; 11] = [1, 2, 31, 33, 63, 64, 65, 100, 4096, 8193, 14336];

fn same_bits(got: f32, want: f32) -> bool {
    got.to_bits() == want.to_bits() || (got.is_nan() && want.is_nan())
}

/// `kernel` with the first R rows against `reference` row by row.
fn check_q16<const R: usize>(
    rows: &[(Vec<i16>, Vec<f32>); 4],
    kernel: impl Fn([&[i16]; R], [&[f32]; R]) -> [f32; R],
    reference: impl Fn(&[i16], &[f32]) -> f32,
    what: &str,
) {
    let xq: [&[i16]; R] = std::array::from_fn(|i| &rows[i].0[..]);
    let xd: [&[f32]; R] = std::array::from_fn(|i| &rows[i].1[..]);
    let got = kernel(xq, xd);
    for i in 0..R {
        let want = reference(xq[i], xd[i]);
        assert!(
            same_bits(got[i], want),
            "{what} R={R} row {i}: {} != {want}",
            got[i]
        );
    }
}

/// R = 1..4 through `dot_q16` (the dispatch), against the reference.
fn check_q16_all(
    qtype: crate::qtype::QType,
    w: &[u8],
    stats: &[f32],
    bl: usize,
    rows: &[(Vec<i16>, Vec<f32>); 4],
    what: &str,
) {
    use crate::qtype::QType;
    let reference = |xq: &[i16], xd: &[f32]| match qtype {
        QType::NF4 => r::q16::dot_nf4_q16(w, stats, bl, xq, xd),
        _ => r::q16::dot_int8_q16(w, stats, bl, xq, xd),
    };
    check_q16::<1>(
        rows,
        |q, d| dot_q16(qtype, w, stats, bl, q, d).unwrap(),
        reference,
        what,
    );
    check_q16::<2>(
        rows,
        |q, d| dot_q16(qtype, w, stats, bl, q, d).unwrap(),
        reference,
        what,
    );
    check_q16::<3>(
        rows,
        |q, d| dot_q16(qtype, w, stats, bl, q, d).unwrap(),
        reference,
        what,
    );
    check_q16::<4>(
        rows,
        |q, d| dot_q16(qtype, w, stats, bl, q, d).unwrap(),
        reference,
        what,
    );
}

#[test]
fn nf4_q16_kernel_equals_the_reference() {
    if !has_neon() {
        return;
    }
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    for k in NF4_K {
        // block sizes: one or more a quarter unit, longer than the row, the whole row (any K),
        // and one the kernel leaves to the reference
        for bs in [32usize, 64, 128, 256, k, 48] {
            let packed = rng.bytes(k / 2);
            let absmax = q16_test::stats(&mut rng, k.div_ceil(bs));
            for kinds in [[0, 1, 2, 3], [2, 4, 0, 0], [3, 0, 4, 1]] {
                let rows = q16_test::rows(&mut rng, k, r::q16::NF4_ONE, kinds);
                let what = format!("nf4 k={k} bs={bs} kinds={kinds:?}");
                check_q16_all(crate::qtype::QType::NF4, &packed, &absmax, bs, &rows, &what);
            }
        }
    }
}

#[test]
fn int8_q16_kernel_equals_the_reference() {
    if !has_neon() {
        return;
    }
    let mut rng = Rng(0x2545_f491_4f6c_dd1d);
    for k in INT8_K {
        // block scales (a short last block where K is not a multiple), one scale a row, and a
        // block length the kernel leaves to the reference
        for bl in [32usize, 64, 128, k, 48] {
            let q = rng.bytes(k);
            let scales = q16_test::stats(&mut rng, k.div_ceil(bl));
            for kinds in [[0, 1, 2, 3], [2, 4, 0, 0], [3, 0, 4, 1]] {
                let rows = q16_test::rows(&mut rng, k, 1.0, kinds);
                let what = format!("int8 k={k} bl={bl} kinds={kinds:?}");
                check_q16_all(crate::qtype::QType::Int8, &q, &scales, bl, &rows, &what);
            }
        }
    }
}

/// Every nf4 code and the int8 extremes (-128, 127) at the largest activations.
#[test]
fn q16_extreme_weights_equal_the_reference() {
    let k = 4096 + 32;
    let x: Vec<f32> = (0..k)
        .map(|i| if i % 3 == 0 { -1.0 } else { 1.0 })
        .collect();
    for per in [r::q16::NF4_ONE, 1.0] {
        let mut q = vec![0i16; r::q16::q16_row_len(k)];
        let mut d = vec![0.0f32; r::q16::q16_row_len(k) / r::q16::Q16];
        r::q16::quantize_row_q16(&x, per, &mut q, &mut d);
        let absmax = vec![1.0f32; k / 32];
        for b in [0x00u8, 0xff, 0x0f, 0xf0, 0x80, 0x7f] {
            let w = vec![b; k / 2];
            let got = dot_nf4_q16(&w, &absmax, 32, [&q], [&d])[0];
            let want = r::q16::dot_nf4_q16(&w, &absmax, 32, &q, &d);
            assert!(same_bits(got, want), "nf4 byte {b:#x}");
            let w = vec![b; k];
            let got = dot_int8_q16(&w, &absmax, 32, [&q], [&d])[0];
            let want = r::q16::dot_int8_q16(&w, &absmax, 32, &q, &d);
            assert!(same_bits(got, want), "int8 byte {b:#x}");
        }
    }
}

/// Lane scales that overflow to +inf: the lanes with elements become +inf, the lanes past K
/// must stay as they are (a `fma(0, inf, acc)` there would make them NaN): tails of every kind.
#[test]
fn tail_lanes_stay_untouched_under_infinite_scales() {
    for k in [
        32usize, 64, 96, 1, 2, 8, 10, 17, 31, 33, 34, 47, 63, 65, 100, 130, 4100,
    ] {
        let x = vec![1.0e30f32; k];
        for per in [r::q16::NF4_ONE, 1.0] {
            let mut q = vec![0i16; r::q16::q16_row_len(k)];
            let mut d = vec![0.0f32; r::q16::q16_row_len(k) / r::q16::Q16];
            r::q16::quantize_row_q16(&x, per, &mut q, &mut d);
            if per == 1.0 {
                let w = vec![1u8; k];
                let scales = [3.0e38f32];
                let got = dot_int8_q16(&w, &scales, k, [&q], [&d])[0];
                let want = r::q16::dot_int8_q16(&w, &scales, k, &q, &d);
                assert_eq!(want, f32::INFINITY);
                assert_eq!(got.to_bits(), want.to_bits(), "int8 k={k}");
            } else if k % 2 == 0 {
                let w = vec![0xffu8; k / 2];
                let absmax = vec![3.0e38f32 * r::q16::NF4_ONE; k.div_ceil(32)];
                let got = dot_nf4_q16(&w, &absmax, 32, [&q], [&d])[0];
                let want = r::q16::dot_nf4_q16(&w, &absmax, 32, &q, &d);
                assert_eq!(want, f32::INFINITY);
                assert_eq!(got.to_bits(), want.to_bits(), "nf4 k={k}");
            }
        }
    }
}

/// Formats without a NEON kernel here (as a format added to the references would be): the
/// dispatch must run the reference for them.
#[repr(transparent)]
#[derive(Clone, Copy, Pod, Zeroable)]
struct Plain32(BlockQ4_0);

impl r::Block32 for Plain32 {
    fn d(&self) -> Half {
        self.0.d
    }
    fn isum(&self, x: &BlockQ8_0) -> i32 {
        self.0.isum(x)
    }
}

#[repr(transparent)]
#[derive(Clone, Copy, Pod, Zeroable)]
struct PlainK(BlockQ4K);

impl r::BlockK for PlainK {
    fn sums(&self, x: &BlockQ8K) -> (i32, i32) {
        self.0.sums(x)
    }
    fn d_dmin(&self) -> (f32, f32) {
        self.0.d_dmin()
    }
}

#[test]
fn dispatch_takes_neon_where_it_exists_and_the_reference_otherwise() {
    let mut rng = Rng(0x3141_5926_5358_9793);
    let nb = 11;
    let xs = q8_0_rows(&mut rng, nb, false);
    let xd: [Vec<f32>; 4] =
        std::array::from_fn(|i| xs[i].iter().map(|b| f16_to_f32(b.d)).collect());
    let x4: [&[BlockQ8_0]; 4] = std::array::from_fn(|i| &xs[i][..]);
    let d4: [&[f32]; 4] = std::array::from_fn(|i| &xd[i][..]);
    let data = blocks(&mut rng, nb, 18, &[0]);
    let (w, plain): (&[BlockQ4_0], &[Plain32]) =
        (bytemuck::cast_slice(&data), bytemuck::cast_slice(&data));
    let calls = || DISPATCHED.with(|c| c.get());
    let want: [f32; 4] = std::array::from_fn(|i| r::dot_block32(w, x4[i], d4[i]));
    let n = calls();
    assert_eq!(bits(dot_block32(w, x4, d4)), bits(want));
    assert_eq!(calls(), n + 1, "q4_0 must take the NEON kernel");
    assert_eq!(bits(dot_block32(plain, x4, d4)), bits(want));
    assert_eq!(
        calls(),
        n + 1,
        "a format without a NEON loader takes the reference"
    );
    let xk = q8_k_rows(&mut rng, 3, false);
    let k4: [&[BlockQ8K]; 4] = std::array::from_fn(|i| &xk[i][..]);
    let data = blocks(&mut rng, 3, 144, &[0, 2]);
    let (w, plain): (&[BlockQ4K], &[PlainK]) =
        (bytemuck::cast_slice(&data), bytemuck::cast_slice(&data));
    let want: [f32; 4] = std::array::from_fn(|i| r::dot_block_k(w, k4[i]));
    assert_eq!(bits(dot_block_k(w, k4)), bits(want));
    assert_eq!(calls(), n + 2, "q4_k must take the NEON kernel");
    assert_eq!(bits(dot_block_k(plain, k4)), bits(want));
    assert_eq!(calls(), n + 2);
    // every NEON format of the block-32 and K-quant families goes through its kernel
    let x1: [&[BlockQ8_0]; 1] = [x4[0]];
    let d1: [&[f32]; 1] = [d4[0]];
    let b32 = blocks(&mut rng, nb, 34, &[0]);
    dot_block32::<BlockQ5_0, 1>(bytemuck::cast_slice(&b32[..nb * 22]), x1, d1);
    dot_block32::<BlockQ8_0, 1>(bytemuck::cast_slice(&b32), x1, d1);
    dot_block32::<BlockIQ4NL, 1>(bytemuck::cast_slice(&b32[..nb * 18]), x1, d1);
    let bk = blocks(&mut rng, 3, 210, &[208]);
    let k1: [&[BlockQ8K]; 1] = [k4[0]];
    dot_block_k::<BlockQ5K, 1>(bytemuck::cast_slice(&bk[..3 * 176]), k1);
    dot_block_k::<BlockQ6K, 1>(bytemuck::cast_slice(&bk), k1);
    assert_eq!(calls(), n + 7);
    let s1: [&[f32]; 1] = [d4[0]];
    dot_block32_min::<BlockQ4_1, 1>(bytemuck::cast_slice(&b32[..nb * 20]), x1, d1, s1);
    dot_block32_min::<BlockQ5_1, 1>(bytemuck::cast_slice(&b32[..nb * 24]), x1, d1, s1);
    assert_eq!(calls(), n + 9, "q4_1 and q5_1 must take the NEON kernel");
    let bl = blocks(&mut rng, 3, 136, &[0]);
    dot_block_k::<BlockQ2K, 1>(bytemuck::cast_slice(&bk[..3 * 84]), k1);
    dot_block_k::<BlockQ3K, 1>(bytemuck::cast_slice(&bk[..3 * 110]), k1);
    dot_block_k::<BlockIQ4XS, 1>(bytemuck::cast_slice(&bl), k1);
    assert_eq!(
        calls(),
        n + 12,
        "q2_k, q3_k and iq4_xs must take the NEON kernel"
    );
    dot_block_k::<BlockTQ1_0, 1>(bytemuck::cast_slice(&bk[..3 * 54]), k1);
    dot_block_k::<BlockTQ2_0, 1>(bytemuck::cast_slice(&bk[..3 * 66]), k1);
    assert_eq!(calls(), n + 14, "tq1_0 and tq2_0 must take the NEON kernel");
}

/// `dot_q16` takes the NEON kernels for nf4 and int8 (when NEON is on), `None` otherwise.
#[test]
fn q16_dispatch_takes_neon_for_nf4_and_int8() {
    use crate::qtype::QType;
    let calls = || DISPATCHED.with(|c| c.get());
    // K = 64: `q16_row_len(64)` = 128 activations, one scale per 64
    let (xq, xd) = ([vec![2i16; 128]], [vec![0.25f32; 2]]);
    let (xq, xd): ([&[i16]; 1], [&[f32]; 1]) = ([&xq[0]], [&xd[0]]);
    assert!(dot_q16(QType::Q4_0, &[0; 64], &[1.0], 64, xq, xd).is_none());
    let n = calls();
    let y = dot_q16(QType::Int8, &[2; 64], &[1.0], 64, xq, xd);
    if !has_neon() {
        assert!(y.is_none());
        assert!(dot_q16(QType::NF4, &[0xff; 32], &[1.0], 64, xq, xd).is_none());
        return;
    }
    // 16 lanes of 2 · 2 · 2, times 0.25, in each of the two units
    assert_eq!(y.unwrap()[0], 64.0);
    // 0xff: code 15 (8191) everywhere: 64 · 8191 · 2 · (0.25 / 8191)... as the reference
    let y = dot_q16(QType::NF4, &[0xff; 32], &[1.0], 64, xq, xd).unwrap();
    assert_eq!(
        y[0].to_bits(),
        r::q16::dot_nf4_q16(&[0xff; 32], &[1.0], 64, xq[0], xd[0]).to_bits()
    );
    assert_eq!(calls(), n + 2);
}

/// `qmatmul` itself (the dispatch in `mod.rs`) against the references called directly, for every
/// format and M = 1..6 (groups of 4 rows, then single rows).
#[test]
fn qmatmul_on_aarch64_equals_the_references() {
    use crate::formats::tensor::QuantizedView;
    use crate::qtype::QType;
    let mut rng = Rng(0x2468_ace0_1357_9bdf);
    let (n, nb) = (3usize, 9usize);
    let cases: [(QType, &[usize]); 14] = [
        (QType::TQ1_0, &[52]),
        (QType::TQ2_0, &[64]),
        (QType::Q2K, &[80, 82]),
        (QType::Q3K, &[108]),
        (QType::IQ4XS, &[0]),
        (QType::Q4_0, &[0]),
        (QType::Q4_1, &[0, 2]),
        (QType::Q5_1, &[0, 2]),
        (QType::Q5_0, &[0]),
        (QType::Q8_0, &[0]),
        (QType::IQ4NL, &[0]),
        (QType::Q4K, &[0, 2]),
        (QType::Q5K, &[0, 2]),
        (QType::Q6K, &[208]),
    ];
    for (qtype, halves) in cases {
        let info = qtype.info();
        let k = nb * info.block_size;
        let data = blocks(&mut rng, n * nb, info.type_size, halves);
        for m in 1..=6 {
            let x = rng.normalish(m * k, 2.0);
            let v = QuantizedView {
                qtype,
                rows: n,
                cols: k,
                block_size: info.block_size,
                scale_mode: None,
                data: &data,
                stats: &[],
                double_quant: None,
            };
            let mut y = vec![0.0f32; m * n];
            super::super::qmatmul(&x, m, &v, &mut y).unwrap();
            for mi in 0..m {
                let xr = &x[mi * k..(mi + 1) * k];
                for row in 0..n {
                    let wr = &data[row * nb * info.type_size..(row + 1) * nb * info.type_size];
                    let want = reference_dot(qtype, wr, xr);
                    assert_eq!(y[mi * n + row].to_bits(), want.to_bits(), "{qtype:?} m={m}");
                }
            }
        }
    }
}

fn reference_dot(qtype: crate::qtype::QType, w: &[u8], x: &[f32]) -> f32 {
    use crate::qtype::QType;
    fn b32<W: Pod + r::Block32>(w: &[u8], x: &[f32]) -> f32 {
        let mut q = vec![BlockQ8_0::zeroed(); x.len() / 32];
        r::quantize_row_q8_0(x, &mut q);
        let d: Vec<f32> = q.iter().map(|b| f16_to_f32(b.d)).collect();
        r::dot_block32::<W>(bytemuck::cast_slice(w), &q, &d)
    }
    fn bk<W: Pod + r::BlockK>(w: &[u8], x: &[f32]) -> f32 {
        let mut q = vec![BlockQ8K::zeroed(); x.len() / QK_K];
        r::quantize_row_q8_k(x, &mut q);
        r::dot_block_k::<W>(bytemuck::cast_slice(w), &q)
    }
    fn min32<W: Pod + r::Block32>(w: &[u8], x: &[f32]) -> f32 {
        let (q, d, _, s) = q8_1_row(x);
        r::dot_block32_min::<W>(bytemuck::cast_slice(w), &q, &d, &s)
    }
    match qtype {
        QType::Q4_0 => b32::<BlockQ4_0>(w, x),
        QType::Q4_1 => min32::<BlockQ4_1>(w, x),
        QType::Q5_1 => min32::<BlockQ5_1>(w, x),
        QType::Q5_0 => b32::<BlockQ5_0>(w, x),
        QType::Q8_0 => b32::<BlockQ8_0>(w, x),
        QType::IQ4NL => b32::<BlockIQ4NL>(w, x),
        QType::Q4K => bk::<BlockQ4K>(w, x),
        QType::Q2K => bk::<BlockQ2K>(w, x),
        QType::Q3K => bk::<BlockQ3K>(w, x),
        QType::IQ4XS => bk::<BlockIQ4XS>(w, x),
        QType::Q5K => bk::<BlockQ5K>(w, x),
        QType::TQ1_0 => bk::<BlockTQ1_0>(w, x),
        QType::TQ2_0 => bk::<BlockTQ2_0>(w, x),
        _ => bk::<BlockQ6K>(w, x),
    }
}
