//! The AVX2 row kernel of the 32-weight formats (`x86::dot_block32`, `dot_block32_min`) at its
//! integer limits: every weight at its largest and smallest level with activation quants of
//! +-127, where q4_0 / q5_0 / q4_1 / q5_1 take the unsigned product without sign fix-ups and
//! q8_0 / iq4_nl the signed one, and for the unsigned product -128 too (outside what our
//! quantizer gives; the signed product's `vpsignb` needs |x| <= 127, `block_isums`): bit for
//! bit the reference, for R = 1 and 3, with partial groups.

use super::*;

/// Each activation block's quant sum (`Acts::*::sums`).
pub(crate) fn block_sums(x: &[BlockQ8_0]) -> Vec<i32> {
    x.iter()
        .map(|b| b.qs.iter().map(|&q| q as i32).sum())
        .collect()
}

/// Activation blocks whose quants are all `q`, or alternate `q` and -`q` (`alt`), scale 0.5.
fn acts(nb: usize, q: i8, alt: bool) -> Vec<BlockQ8_0> {
    let mut b = vec![BlockQ8_0::zeroed(); nb];
    for blk in &mut b {
        blk.d = f16_from_f32(0.5);
        for (i, v) in blk.qs.iter_mut().enumerate() {
            *v = if alt && i % 2 == 1 {
                q.saturating_neg()
            } else {
                q
            };
        }
    }
    b
}

fn check<W: x86::Load32>(data: &[u8], nb: usize, min: bool) {
    let w: &[W] = bytemuck::cast_slice(&data[..nb * std::mem::size_of::<W>()]);
    let lo = if W::BIAS <= 16 { -128 } else { -127 };
    let xs: Vec<Vec<BlockQ8_0>> = [(127, false), (lo, false), (lo, true)]
        .iter()
        .map(|&(q, alt)| acts(nb, q, alt))
        .collect();
    let xd: Vec<Vec<f32>> = xs
        .iter()
        .map(|x| x.iter().map(|b| f16_to_f32(b.d)).collect())
        .collect();
    let sums: Vec<Vec<i32>> = xs.iter().map(|x| block_sums(x)).collect();
    // q8_1's `s` (any value: the min term's float part is the reference's either way)
    let s: Vec<Vec<f32>> = sums
        .iter()
        .map(|v| v.iter().map(|&t| t as f32 * 0.5).collect())
        .collect();
    let x: [&[BlockQ8_0]; 3] = std::array::from_fn(|i| &xs[i][..]);
    let d: [&[f32]; 3] = std::array::from_fn(|i| &xd[i][..]);
    let sm: [&[i32]; 3] = std::array::from_fn(|i| &sums[i][..]);
    let ss: [&[f32]; 3] = std::array::from_fn(|i| &s[i][..]);
    let want: [u32; 3] = std::array::from_fn(|i| {
        if min {
            r::dot_block32_min(w, x[i], d[i], ss[i]).to_bits()
        } else {
            r::dot_block32(w, x[i], d[i]).to_bits()
        }
    });
    // SAFETY: AVX2 and F16C detected by the caller; one activation block per weight block.
    let (three, one) = unsafe {
        if min {
            (
                x86::dot_block32_min(w, x, d, ss),
                x86::dot_block32_min(w, [x[2]], [d[2]], [ss[2]])[0],
            )
        } else {
            (
                x86::dot_block32(w, x, d, sm),
                x86::dot_block32(w, [x[2]], [d[2]], [sm[2]])[0],
            )
        }
    };
    let name = std::any::type_name::<W>();
    assert_eq!(three.map(f32::to_bits), want, "{name} nb={nb} R=3");
    assert_eq!(one.to_bits(), want[2], "{name} nb={nb} R=1");
}

/// Blocks of `size` bytes, scales (f16 0.25) at `halves`, every other byte `fill`.
fn extreme(nb: usize, size: usize, halves: &[usize], fill: u8) -> Vec<u8> {
    let mut v = vec![fill; nb * size];
    for b in 0..nb {
        for &o in halves {
            v[b * size + o..b * size + o + 2].copy_from_slice(&f16_from_f32(0.25));
        }
    }
    v
}

#[test]
fn row32_avx2_limits_equal_reference() {
    if !crate::cpu::has_avx2() {
        return;
    }
    for nb in [1usize, 8, 9, 23] {
        // 0xff: every nibble 15 and every qh bit set (level 31); 0x00: level 0; 0x80: q8_0's
        // -128 and iq4_nl's nibbles 0 / 8.
        for fill in [0xffu8, 0x00, 0x80, 0x7f] {
            check::<BlockQ4_0>(&extreme(nb, 18, &[0], fill), nb, false);
            check::<BlockQ5_0>(&extreme(nb, 22, &[0], fill), nb, false);
            check::<BlockQ8_0>(&extreme(nb, 34, &[0], fill), nb, false);
            check::<BlockIQ4NL>(&extreme(nb, 18, &[0], fill), nb, false);
            check::<BlockQ4_1>(&extreme(nb, 20, &[0, 2], fill), nb, true);
            check::<BlockQ5_1>(&extreme(nb, 24, &[0, 2], fill), nb, true);
        }
    }
}
