//! The AVX2 M = 1 K-quant row kernel (`avx2_rows.rs`) against `reference::dot_block_k`, bit for
//! bit: 1..20 super-blocks and longer rows up to K = 16384 (whole groups of 8 and tails),
//! several weight rows a call, with and without the prefetch; all-ones / all-zero / sign-bit
//! quants and scales against activations of +-127 and -128; infinite and NaN scales; and
//! `qmatmul` at M = 1 forced onto it (on CPUs with AVX-512 VNNI too), pool and 1 thread.

use super::avx2_rows::{dot_rows_k_avx2, LanesK, FORCE};
use crate::formats::blocks::*;
use crate::matmul::reference::{self as r, BlockQ8K};
use crate::matmul::tests::{blocks, Rng};
use crate::matmul::{qmatmul, QuantizedView};
use crate::qtype::QType;
use bytemuck::Zeroable;

fn halves<W: LanesK>() -> &'static [usize] {
    match std::mem::size_of::<W>() {
        210 => &[208],
        84 => &[80, 82],
        110 => &[108],
        136 => &[0],
        _ => &[0, 2],
    }
}

fn has_avx2() -> bool {
    std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("f16c")
}

/// `n` rows of `nb` super-blocks in `data` through the kernel, each against the reference.
fn check<W: LanesK>(data: &[u8], nb: usize, x: &[BlockQ8K], what: &str) {
    let w: &[W] = bytemuck::cast_slice(data);
    let n = w.len() / nb;
    let want: Vec<u32> = w
        .chunks_exact(nb)
        .map(|row| r::dot_block_k(row, &x[..nb]).to_bits())
        .collect();
    for long in [false, true] {
        let mut got = vec![0.0f32; n];
        // SAFETY: AVX2 and F16C detected by the callers.
        unsafe { dot_rows_k_avx2(w, nb, x, long, &mut got) };
        let got: Vec<u32> = got.iter().map(|v| v.to_bits()).collect();
        assert_eq!(got, want, "{what} nb={nb} long={long}");
    }
}

fn acts(rng: &mut Rng, nb: usize, scale: f32) -> Vec<BlockQ8K> {
    let mut q = vec![BlockQ8K::zeroed(); nb];
    r::quantize_row_q8_k(&rng.normalish(nb * QK_K, scale), &mut q);
    q
}

/// Activation blocks of one quant value `v` (or alternating `v` / 127), `bsums` to match.
fn flat(nb: usize, v: i8, alternate: bool) -> Vec<BlockQ8K> {
    let mut q = vec![BlockQ8K::zeroed(); nb];
    for (b, blk) in q.iter_mut().enumerate() {
        blk.d = 0.5 + b as f32 * 0.125;
        for (i, e) in blk.qs.iter_mut().enumerate() {
            *e = if alternate && i % 2 == 1 { 127 } else { v };
        }
        for (g, s) in blk.bsums.iter_mut().enumerate() {
            *s = blk.qs[16 * g..16 * g + 16].iter().map(|&e| e as i16).sum();
        }
    }
    q
}

fn random<W: LanesK>(rng: &mut Rng) {
    let name = std::any::type_name::<W>();
    let size = std::mem::size_of::<W>();
    for nb in (1..=20).chain([31, 32, 33, 56, 57, 64]) {
        let n = 3;
        let data = blocks(rng, n * nb, size, halves::<W>());
        let x = acts(rng, nb, 1.0);
        check::<W>(&data, nb, &x, name);
    }
}

#[test]
fn rows_k_avx2_equals_reference_on_random_blocks() {
    if !has_avx2() {
        return;
    }
    let mut rng = Rng(0x0a42_b10c_5eed_1234);
    random::<BlockQ2K>(&mut rng);
    random::<BlockQ3K>(&mut rng);
    random::<BlockQ4K>(&mut rng);
    random::<BlockQ5K>(&mut rng);
    random::<BlockQ6K>(&mut rng);
    random::<BlockIQ4XS>(&mut rng);
}

/// Every quant, scale and min at its largest (0xff), sign bit only (0x80), 0x7f and zero,
/// against +-127, -128 (not iq4_xs: its signed values take `vpsignb`, as the per-block kernel,
/// and q8_K's quantizer never gives -128) and mixed activations; then d = inf / NaN in some
/// super-blocks (the float part's operations on them must match too).
fn extremes<W: LanesK>(iq4: bool) {
    let name = std::any::type_name::<W>();
    let size = std::mem::size_of::<W>();
    let nb = 19;
    let mut xs = vec![
        flat(nb, 127, false),
        flat(nb, -127, false),
        flat(nb, -127, true),
    ];
    if !iq4 {
        xs.push(flat(nb, -128, false));
        xs.push(flat(nb, -128, true));
    }
    for fill in [0xffu8, 0x7f, 0x80, 0x00] {
        let mut data = vec![fill; 2 * nb * size];
        for b in 0..2 * nb {
            for &o in halves::<W>() {
                data[b * size + o..b * size + o + 2].copy_from_slice(&f16_from_f32(0.75));
            }
        }
        for x in &xs {
            check::<W>(&data, nb, x, &format!("{name} fill={fill:#x}"));
        }
        // inf in super-block 3, NaN in 12 (and in the tail, 17), of the first row
        for (b, h) in [(3, 0x7c00u16), (12, 0x7e00), (17, 0xfc00)] {
            let o = halves::<W>()[0];
            data[b * size + o..b * size + o + 2].copy_from_slice(&h.to_le_bytes());
        }
        for x in &xs {
            check::<W>(&data, nb, x, &format!("{name} fill={fill:#x} inf/NaN"));
        }
    }
}

#[test]
fn rows_k_avx2_equals_reference_at_extreme_values() {
    if !has_avx2() {
        return;
    }
    extremes::<BlockQ2K>(false);
    extremes::<BlockQ3K>(false);
    extremes::<BlockQ4K>(false);
    extremes::<BlockQ5K>(false);
    extremes::<BlockQ6K>(false);
    extremes::<BlockIQ4XS>(true);
}

/// `qmatmul` at M = 1 forced onto the AVX2 kernel equals the reference, pool and 1 thread.
#[test]
fn qmatmul_m1_avx2_rows_equal_reference() {
    if !has_avx2() {
        return;
    }
    FORCE.set(true);
    let mut rng = Rng(0x2468_1357_aceb_dfd0);
    for (qtype, size, h) in [
        (QType::Q2K, 84, &[80usize, 82][..]),
        (QType::Q3K, 110, &[108]),
        (QType::Q4K, 144, &[0, 2]),
        (QType::Q5K, 176, &[0, 2]),
        (QType::Q6K, 210, &[208]),
        (QType::IQ4XS, 136, &[0]),
    ] {
        for (nb, n) in [(1usize, 3), (9, 37), (16, 5), (43, 7), (56, 3)] {
            let k = nb * QK_K;
            let data = blocks(&mut rng, n * nb, size, h);
            let x = rng.normalish(k, 1.0);
            let v = QuantizedView {
                qtype,
                rows: n,
                cols: k,
                block_size: QK_K,
                scale_mode: None,
                data: &data,
                stats: &[],
                double_quant: None,
            };
            let mut y = vec![0.0f32; n];
            qmatmul(&x, 1, &v, &mut y).unwrap();
            let mut y1 = vec![0.0f32; n];
            crate::parallel::set_num_threads(1);
            let one = qmatmul(&x, 1, &v, &mut y1);
            crate::parallel::set_num_threads(0);
            one.unwrap();
            let mut xq = vec![BlockQ8K::zeroed(); nb];
            r::quantize_row_q8_k(&x, &mut xq);
            for row in 0..n {
                let wr = &data[row * nb * size..(row + 1) * nb * size];
                let want = match qtype {
                    QType::Q2K => r::dot_block_k::<BlockQ2K>(bytemuck::cast_slice(wr), &xq),
                    QType::Q3K => r::dot_block_k::<BlockQ3K>(bytemuck::cast_slice(wr), &xq),
                    QType::Q4K => r::dot_block_k::<BlockQ4K>(bytemuck::cast_slice(wr), &xq),
                    QType::Q5K => r::dot_block_k::<BlockQ5K>(bytemuck::cast_slice(wr), &xq),
                    QType::Q6K => r::dot_block_k::<BlockQ6K>(bytemuck::cast_slice(wr), &xq),
                    _ => r::dot_block_k::<BlockIQ4XS>(bytemuck::cast_slice(wr), &xq),
                };
                for (got, what) in [(y[row], "pool"), (y1[row], "1 thread")] {
                    assert_eq!(
                        got.to_bits(),
                        want.to_bits(),
                        "{qtype:?} {what} nb={nb} n={n} row={row}"
                    );
                }
            }
        }
    }
    FORCE.set(false);
}

/// The bit-spread iq4_xs scales equal `scales_iq4_xs` for every `scales_h` and a spread of
/// `scales_l` (all nibble values in every position).
#[test]
fn iq4_xs_scale_bytes_equal_reference() {
    let mut rng = Rng(0x1234_4321_abcd_dcba);
    let mut w = BlockIQ4XS::zeroed();
    for h in 0..=u16::MAX {
        w.scales_h = h.to_le_bytes();
        let l = if h < 16 {
            [h as u8 * 0x11; 4]
        } else {
            let v = rng.next();
            [v as u8, (v >> 8) as u8, (v >> 16) as u8, (v >> 24) as u8]
        };
        w.scales_l = l;
        let got = super::super::k_low::scales_iq4_xs_bytes(&w).to_le_bytes();
        let want = r::scales_iq4_xs(&w);
        for b in 0..8 {
            assert_eq!(got[b] as i32 - 32, want[b], "h={h:#x} l={l:?} b={b}");
        }
    }
}
