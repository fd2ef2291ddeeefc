//! The KIVI group encoder of `ferroquant.kv`'s torch layout (python/ferroquant/kv/codecs.py's
//! `_encode_kivi`, one native call instead of a dozen torch ops): each group of `group` values
//! is quantized by the runtime's block rule (`runtime::kv::block::kivi_quantize`, the rule of
//! docs/kv.md and `kv/reference.py`'s `kivi_group`), and the codes are packed and the f16 scale
//! and zero stored where `codecs` puts them:
//! - keys, per channel over `group` tokens: `q` (B, H, n/G, pack, D), byte (j, c) holding
//!   tokens j, j + pack, ... of channel c from the low bits up; scale and zero (B, H, n/G, 1, D);
//! - values, per token over `group` channels: `q` (B, H, n, D/G, pack), byte j of a block holding
//!   channels j, j + pack, ...; scale and zero (B, H, n, D/G, 1).

use crate::formats::blocks::{f16_from_f32, f16_to_f32};
use crate::runtime::kv::types::KIVI_GROUP;
use crate::{Error, Result};

const F16_MAX: f32 = 65504.0;

/// `runtime::kv::block::kivi_quantize` (the codes, f16 scale and f16 zero of one group), the
/// same operations, inlined into `encode_with` so that its rounding is one instruction where
/// the CPU has SSE4.1 (the baseline build calls libm's rintf per value). Tested bit-exact
/// against the runtime's block and the Python reference.
#[inline(always)]
fn quantize(bits: u32, x: &[f32], q: &mut [u8; KIVI_GROUP]) -> ([u8; 2], [u8; 2]) {
    let levels = ((1u32 << bits) - 1) as f32;
    // min and max in eight lanes (vectorised; the same values in any order for finite input)
    let (mut mn, mut mx) = ([f32::INFINITY; 8], [f32::NEG_INFINITY; 8]);
    let eights = x.chunks_exact(8);
    let rest = eights.remainder();
    for c in eights {
        for l in 0..8 {
            mn[l] = mn[l].min(c[l]);
            mx[l] = mx[l].max(c[l]);
        }
    }
    let (mut min, mut max) = (f32::INFINITY, f32::NEG_INFINITY);
    for (&a, &b) in mn.iter().zip(&mx).chain(rest.iter().zip(rest)) {
        min = min.min(a);
        max = max.max(b);
    }
    // + 0.0: an all-zero group has scale +0.0 whichever signed zeros min and max picked (the
    // reference's max - min of one and the same value)
    let scale = (((max - min) + 0.0) / levels).min(F16_MAX);
    let zero = min.clamp(-F16_MAX, F16_MAX) + 0.0;
    let (s16, z16) = (f16_from_f32(scale), f16_from_f32(zero));
    let (s, z) = (f16_to_f32(s16), f16_to_f32(z16));
    if s != 0.0 {
        for (q, &v) in q.iter_mut().zip(x) {
            *q = ((v - z) / s).round_ties_even().max(0.0).min(levels) as u8;
        }
    } else {
        q.fill(0);
    }
    (s16, z16)
}

/// Shape of the states: (batch x heads, tokens, head_dim).
#[derive(Clone, Copy, Debug)]
pub struct States {
    pub bh: usize,
    pub n: usize,
    pub d: usize,
}

/// Encode float32 states `x` (bh, n, d) into `q`, `scale`, `zero` (f16 little-endian bytes).
#[allow(clippy::too_many_arguments)]
pub fn kivi_encode(
    bits: u32,
    group: usize,
    keys: bool,
    shape: States,
    x: &[f32],
    q: &mut [u8],
    scale: &mut [u8],
    zero: &mut [u8],
) -> Result<()> {
    let States { bh, n, d } = shape;
    let bad = |msg: String| Err(Error::InvalidArgument(format!("kv KIVI encode: {msg}")));
    if bits != 2 && bits != 4 {
        return bad(format!("{bits} bits (expected 2 or 4)"));
    }
    if group == 0 || group > KIVI_GROUP || !(group * bits as usize).is_multiple_of(8) {
        return bad(format!("group {group} (expected 8 .. {KIVI_GROUP} values)"));
    }
    let along = if keys { n } else { d };
    if !along.is_multiple_of(group) {
        let what = if keys { "tokens" } else { "head_dim" };
        return bad(format!(
            "{along} {what} are not a multiple of the group {group}"
        ));
    }
    let groups = bh * n * d / group;
    let pack = group * bits as usize / 8;
    if x.len() != bh * n * d || q.len() != groups * pack || scale.len() != 2 * groups {
        return bad(format!(
            "{} values, {} code bytes, {} scale bytes for {groups} groups of {group} (pack {pack})",
            x.len(),
            q.len(),
            scale.len()
        ));
    }
    if zero.len() != scale.len() {
        return bad(format!(
            "{} zero bytes, expected {}",
            zero.len(),
            scale.len()
        ));
    }
    #[cfg(target_arch = "x86_64")]
    if crate::cpu::has_avx2() {
        // SAFETY: the CPU has AVX2 (and so SSE4.1).
        unsafe { encode_avx2(bits, group, keys, shape, x, q, scale, zero) };
        return Ok(());
    }
    encode_with(bits, group, keys, shape, x, q, scale, zero);
    Ok(())
}

/// `encode_with` compiled for AVX2 (the rounding in one instruction, loops vectorised).
#[cfg(target_arch = "x86_64")]
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx2")]
fn encode_avx2(
    bits: u32,
    group: usize,
    keys: bool,
    shape: States,
    x: &[f32],
    q: &mut [u8],
    scale: &mut [u8],
    zero: &mut [u8],
) {
    encode_with(bits, group, keys, shape, x, q, scale, zero)
}

/// The encoder proper (arguments checked by `kivi_encode`).
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn encode_with(
    bits: u32,
    group: usize,
    keys: bool,
    shape: States,
    x: &[f32],
    q: &mut [u8],
    scale: &mut [u8],
    zero: &mut [u8],
) {
    let States { bh, n, d } = shape;
    let pack = group * bits as usize / 8;
    q.fill(0);
    let mut col = vec![0f32; group];
    let mut codes = [0u8; KIVI_GROUP];
    // group gi's codes and scale / zero; its code byte j at base + j * stride (a plain
    // function, not a closure: a closure would not inherit encode_avx2's target features)
    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    fn put(
        bits: u32,
        vals: &[f32],
        codes: &mut [u8; KIVI_GROUP],
        q: &mut [u8],
        (scale, zero): (&mut [u8], &mut [u8]),
        gi: usize,
        base: usize,
        stride: usize,
    ) {
        let pack = vals.len() * bits as usize / 8;
        let (s16, z16) = quantize(bits, vals, codes);
        // element i = f * pack + j in bit field f of byte j
        for (f, field) in codes[..vals.len()].chunks_exact(pack).enumerate() {
            for (j, &c) in field.iter().enumerate() {
                q[base + j * stride] |= c << (bits as usize * f);
            }
        }
        scale[2 * gi..2 * gi + 2].copy_from_slice(&s16);
        zero[2 * gi..2 * gi + 2].copy_from_slice(&z16);
    }
    if keys {
        // group index (bh, grp, c); its bytes at ((bh * n/G + grp) * pack + j) * d + c
        for h in 0..bh {
            for grp in 0..n / group {
                let rows = &x[(h * n + grp * group) * d..(h * n + (grp + 1) * group) * d];
                let row = h * (n / group) + grp;
                for c in 0..d {
                    for (i, v) in col.iter_mut().enumerate() {
                        *v = rows[i * d + c];
                    }
                    let sz = (&mut *scale, &mut *zero);
                    put(
                        bits,
                        &col,
                        &mut codes,
                        q,
                        sz,
                        row * d + c,
                        row * pack * d + c,
                        d,
                    );
                }
            }
        }
    } else {
        // group index (bh, t, blk); its bytes at gi * pack + j
        for (gi, vals) in x.chunks_exact(group).enumerate() {
            let sz = (&mut *scale, &mut *zero);
            put(bits, vals, &mut codes, q, sz, gi, gi * pack, 1);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runtime::kv::block;

    #[test]
    fn values_are_the_runtime_blocks_and_keys_their_transpose() {
        // values with group 64 are exactly the runtime's blocks (codes, then scale, then zero)
        let (bh, n, d) = (2, 64, 128);
        let x: Vec<f32> = (0..bh * n * d)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) * 0.013 + (i % 7) as f32)
            .collect();
        for bits in [2u32, 4] {
            let pack = 64 * bits as usize / 8;
            let groups = bh * n * d / 64;
            let (mut q, mut s, mut z) = (
                vec![0u8; groups * pack],
                vec![0u8; 2 * groups],
                vec![0u8; 2 * groups],
            );
            let shape = States { bh, n, d };
            kivi_encode(bits, 64, false, shape, &x, &mut q, &mut s, &mut z).unwrap();
            let mut blk = vec![0u8; pack + 4];
            for gi in 0..groups {
                block::kivi_encode(bits, &x[gi * 64..(gi + 1) * 64], &mut blk);
                assert_eq!(&blk[..pack], &q[gi * pack..(gi + 1) * pack]);
                assert_eq!(&blk[pack..pack + 2], &s[2 * gi..2 * gi + 2]);
                assert_eq!(&blk[pack + 2..], &z[2 * gi..2 * gi + 2]);
            }
            // keys: channel c of group grp is the runtime block of that column
            kivi_encode(bits, 64, true, shape, &x, &mut q, &mut s, &mut z).unwrap();
            for h in 0..bh {
                for c in 0..d {
                    let colv: Vec<f32> = (0..n).map(|t| x[(h * n + t) * d + c]).collect();
                    block::kivi_encode(bits, &colv, &mut blk);
                    for j in 0..pack {
                        assert_eq!(blk[j], q[(h * pack + j) * d + c]);
                    }
                    let gi = h * d + c;
                    assert_eq!(&blk[pack..pack + 2], &s[2 * gi..2 * gi + 2]);
                }
            }
        }
        // wrong sizes are errors
        let shape = States { bh: 1, n: 3, d: 64 };
        let mut q = vec![0u8; 96];
        let (mut s, mut z) = (vec![0u8; 6], vec![0u8; 6]);
        assert!(kivi_encode(4, 64, true, shape, &x[..192], &mut q, &mut s, &mut z).is_err());
        assert!(kivi_encode(3, 64, false, shape, &x[..192], &mut q, &mut s, &mut z).is_err());
    }
}
