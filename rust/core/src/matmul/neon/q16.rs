//! NEON kernels of the q16 dot products (`reference::q16`: nf4 and int8 weights, 16-bit
//! activations), bit for bit: a unit's 16 lanes are four registers of 4 i32 / f32 (lanes
//! 4j..4j+4 in register j), each lane's integer sum exact (`smull` / `smlal` of 16-bit values
//! into i32: no product or partial sum of a lane overflows, see the reference), then one
//! `vfmaq_f32(acc, float(isum), s)` per lane (the reference's `mul_add`), two sets of
//! accumulators alternating by unit, and `hsum_q16`'s reduction. Safety rules as in `neon.rs`.
//!
//! nf4 (units of 128 elements, lanes of 8), by quarter units: 32 elements = 16 packed bytes =
//! lanes 4Q..4Q + 4 of the unit = one register, one weight block and one activation block. The
//! activations are loaded de-interleaved by four (`ld4`: `X_k[i] = x[4i + k]`, i = 0..8), and
//! the codes in the same order: element 4i is the high nibble of byte 2i, 4i + 1 its low
//! nibble, 4i + 2 and 4i + 3 those of byte 2i + 1, so `uzp1` / `uzp2` of the high and low
//! nibbles give the indices of k = 0, 1 and k = 2, 3; two `tbl` (low and high code bytes) and
//! a `zip` make the 16-bit codes. `Σ_k C_k[i] X_k[i]` (`smull` + three `smlal` for i = 0..4,
//! `smull2` + three `smlal2` for i = 4..8) sums elements 4i..4i + 4; `addp` of adjacent pairs
//! makes the quarter's four lanes of 8 elements, then one `scvtf` and one `fmla`.
//!
//! int8 (lanes of 2 elements, a half unit = 16 elements): weights (`ld2`, sign-extended) and
//! activations (`ld2`) de-interleaved by two, lane i = `W_0[i] X_0[i] + W_1[i] X_1[i]`.
//!
//! Tails: nf4 rows with K % 128 != 0 end in the last unit's whole quarters (its other lanes
//! have no quarter: untouched), then, where K % 32 != 0, a quarter read from a copy of the last
//! bytes padded with code 7 (0); int8 rows with K % 32 != 0 end in a unit read from a zeroed
//! copy of the last bytes. The lanes past K of these keep their accumulators (`vbslq_f32`).
//! Activations are read up to `q16_row_len(K)` (the zero padding).

use std::arch::aarch64::*;

use super::{load_u8, store_f32};
use crate::matmul::reference::{
    self as r,
    q16::{self, Q16, UNIT_INT8},
};

const NF4_LO: [u8; 16] = q16::NF4_CODE_BYTES[0];
const NF4_HI: [u8; 16] = q16::NF4_CODE_BYTES[1];

/// 32 i16 de-interleaved by four (`X_k[i] = p[4i + k]`).
#[inline(always)]
fn load4_i16(p: &[i16]) -> int16x8x4_t {
    assert!(p.len() >= 32);
    // SAFETY: NEON; 32 i16 in bounds (checked above).
    unsafe { vld4q_s16(p.as_ptr()) }
}

/// 16 i16 de-interleaved by two.
#[inline(always)]
fn load2_i16(p: &[i16]) -> int16x8x2_t {
    assert!(p.len() >= 16);
    // SAFETY: NEON; 16 i16 in bounds (checked above).
    unsafe { vld2q_s16(p.as_ptr()) }
}

/// 16 bytes as i8 de-interleaved by two.
#[inline(always)]
fn load2_i8(p: &[u8]) -> int8x8x2_t {
    assert!(p.len() >= 16);
    // SAFETY: NEON; 16 bytes in bounds (checked above).
    unsafe { vld2_s8(p.as_ptr() as *const i8) }
}

/// The lanes `[0..4, 4..8]` of one half: `(lanes 0..4, lanes 4..8)` of `Σ_k c[k] · x[k]`.
#[inline(always)]
fn isums<const N: usize>(c: &[int16x8_t; N], x: &[int16x8_t; N]) -> [int32x4_t; 2] {
    // SAFETY: NEON (module comment).
    unsafe {
        let mut lo = vmull_s16(vget_low_s16(c[0]), vget_low_s16(x[0]));
        let mut hi = vmull_high_s16(c[0], x[0]);
        for k in 1..N {
            lo = vmlal_s16(lo, vget_low_s16(c[k]), vget_low_s16(x[k]));
            hi = vmlal_high_s16(hi, c[k], x[k]);
        }
        [lo, hi]
    }
}

/// `acc[2H..2H + 2] = fma(float(isum), s, acc)` on the lanes of `mask` (all when `mask` is
/// `None`).
#[inline(always)]
fn fma_half<const H: usize>(
    acc: &mut [float32x4_t; 4],
    isum: [int32x4_t; 2],
    s: float32x4_t,
    mask: Option<[uint32x4_t; 2]>,
) {
    for (j, v) in isum.into_iter().enumerate() {
        let a = &mut acc[2 * H + j];
        // SAFETY: NEON (module comment).
        unsafe {
            let n = vfmaq_f32(*a, vcvtq_f32_s32(v), s);
            *a = match mask {
                Some(m) => vbslq_f32(m[j], n, *a),
                None => n,
            };
        }
    }
}

/// `hsum_q16` of one row's two sets of four registers.
#[inline(always)]
fn finish(acc: &[[float32x4_t; 4]; 2]) -> f32 {
    // SAFETY: NEON (module comment).
    unsafe {
        let t: [float32x4_t; 4] = std::array::from_fn(|j| vaddq_f32(acc[0][j], acc[1][j]));
        let lo = store_f32(vaddq_f32(t[0], t[2]));
        let hi = store_f32(vaddq_f32(t[1], t[3]));
        r::hsum8(&[lo[0], lo[1], lo[2], lo[3], hi[0], hi[1], hi[2], hi[3]])
    }
}

// ---------------------------------------------------------------- nf4

/// The nf4 codes of the 32 elements of 16 packed bytes, de-interleaved by four (`C_k[i]` =
/// code of element 4i + k).
#[inline(always)]
fn nf4_codes(tab: (uint8x16_t, uint8x16_t), wq: &[u8]) -> [int16x8_t; 4] {
    let q = load_u8(wq);
    // SAFETY: NEON (module comment).
    unsafe {
        let (hi, lo) = (vshrq_n_u8::<4>(q), vandq_u8(q, vdupq_n_u8(0x0f)));
        // [k = 0 | k = 1] (high, low nibbles of the even bytes), [k = 2 | k = 3] (odd bytes)
        let idx = [vuzp1q_u8(hi, lo), vuzp2q_u8(hi, lo)];
        let mut c = [vdupq_n_s16(0); 4];
        for (p, &ix) in idx.iter().enumerate() {
            let (l, h) = (vqtbl1q_u8(tab.0, ix), vqtbl1q_u8(tab.1, ix));
            c[2 * p] = vreinterpretq_s16_u8(vzip1q_u8(l, h));
            c[2 * p + 1] = vreinterpretq_s16_u8(vzip2q_u8(l, h));
        }
        c
    }
}

/// Quarter `g` of an nf4 row (elements 32g..32g + 32: lanes 4(g % 4)..4(g % 4) + 4 of unit
/// g / 4) into `acc[r]` (the register of those lanes in the unit's set, `g % 8` of the row's
/// eight). Codes from `wq` (16 packed bytes: the row's, or the tail's padded copy), `a` the
/// weight block's absmax, `x[r]` the 32 activations and `d[r]` their block's scale; `mask`:
/// the lanes to update (all when `None`).
#[inline(always)]
fn nf4_quarter<const R: usize>(
    tab: (uint8x16_t, uint8x16_t),
    wq: &[u8],
    a: f32,
    x: [&[i16]; R],
    d: [f32; R],
    acc: [&mut float32x4_t; R],
    mask: Option<uint32x4_t>,
) {
    let c = nf4_codes(tab, wq);
    for ((acc, x), d) in acc.into_iter().zip(x).zip(d) {
        let x = load4_i16(x);
        let [lo, hi] = isums(&c, &[x.0, x.1, x.2, x.3]);
        // SAFETY: NEON (module comment).
        unsafe {
            // sums of 4 elements (4i..4i + 4, i = 0..8) to lanes of 8: adjacent pairs
            let s = vpaddq_s32(lo, hi);
            let n = vfmaq_f32(*acc, vcvtq_f32_s32(s), vdupq_n_f32(a * d));
            *acc = match mask {
                Some(m) => vbslq_f32(m, n, *acc),
                None => n,
            };
        }
    }
}

/// `reference::q16::dot_nf4_q16` for R activation rows at once (the codes decoded once per
/// quarter unit), bit for bit. A block size the kernel does not take (shorter than the row and
/// not a power of two from 32 on) runs the reference. Lengths as the reference's (checked:
/// panics): `xq[r]` at least `q16_row_len(K)` values.
///
/// One loop over the row's quarter units (32 elements), whose accumulator is register `g % 8`
/// of the row's two sets of four (set `(g / 4) % 2`, register `g % 4`): the order of the
/// reference, unit by unit, lane by lane. The accumulators are indexed at run time, so they
/// live in memory (one load and store a quarter and row, store-to-load forwarded), which keeps
/// LLVM from hoisting four quarters' loads at once (32 live registers: it spilled ~30 a unit).
pub fn dot_nf4_q16<const R: usize>(
    packed: &[u8],
    absmax: &[f32],
    block_size: usize,
    xq: [&[i16]; R],
    xd: [&[f32]; R],
) -> [f32; R] {
    let k = 2 * packed.len();
    let shift = if block_size >= k {
        63
    } else if block_size.is_power_of_two() && block_size >= 32 {
        block_size.trailing_zeros()
    } else {
        return std::array::from_fn(|r| q16::dot_nf4_q16(packed, absmax, block_size, xq[r], xd[r]));
    };
    let tab = (load_u8(&NF4_LO), load_u8(&NF4_HI));
    // SAFETY: NEON (module comment).
    let zero = unsafe { vdupq_n_f32(0.0) };
    let mut acc = [[zero; 8]; R];
    let quarters = k / 32;
    for (g, wq) in packed.chunks_exact(16).enumerate() {
        let e = 32 * g;
        let x: [&[i16]; R] = std::array::from_fn(|r| &xq[r][e..e + 32]);
        let d: [f32; R] = std::array::from_fn(|r| xd[r][e / Q16]);
        let slots = acc.each_mut().map(|a| &mut a[g % 8]);
        nf4_quarter(tab, wq, absmax[e >> shift], x, d, slots, None);
    }
    // K % 32 != 0: a part quarter from a copy padded with code 7 (0), its lanes past K left
    // alone.
    let part = k - 32 * quarters;
    if part > 0 {
        let (g, e) = (quarters, 32 * quarters);
        let mut buf = [0x77u8; 16];
        buf[..part / 2].copy_from_slice(&packed[e / 2..]);
        // SAFETY: NEON (module comment).
        let mask = unsafe {
            let ids: [u32; 4] = [0, 1, 2, 3];
            vcltq_u32(
                vld1q_u32(ids.as_ptr()),
                vdupq_n_u32(part.div_ceil(8) as u32),
            )
        };
        let x: [&[i16]; R] = std::array::from_fn(|r| &xq[r][e..e + 32]);
        let d: [f32; R] = std::array::from_fn(|r| xd[r][e / Q16]);
        let slots = acc.each_mut().map(|a| &mut a[g % 8]);
        nf4_quarter(tab, &buf, absmax[e >> shift], x, d, slots, Some(mask));
    }
    std::array::from_fn(|r| {
        let a = &acc[r];
        finish(&[[a[0], a[1], a[2], a[3]], [a[4], a[5], a[6], a[7]]])
    })
}

// ---------------------------------------------------------------- int8

/// The row's state for the int8 loop.
struct Int8Row<'a, const R: usize> {
    scales: &'a [f32],
    /// log2 of the block length (63 for one scale a row).
    shift: u32,
    xq: [&'a [i16]; R],
    xd: [&'a [f32]; R],
}

impl<const R: usize> Int8Row<'_, R> {
    /// Unit `u` (its 32 weights in `w`: the row's, or the tail's zeroed copy) into `acc` (the
    /// unit's set) of every row; `lanes`: the lanes with an element in the row (16 but in the
    /// tail).
    #[inline(always)]
    fn unit<const MASK: bool>(
        &self,
        u: usize,
        w: &[u8],
        lanes: usize,
        acc: &mut [[float32x4_t; 4]; R],
    ) {
        let e = u * UNIT_INT8;
        let a = self.scales[e >> self.shift];
        // SAFETY: NEON (module comment).
        let (w0, w1, masks) = unsafe {
            let (p, q) = (load2_i8(w), load2_i8(&w[16..]));
            let wide = |v: int8x8x2_t| [vmovl_s8(v.0), vmovl_s8(v.1)];
            let ids: [u32; 4] = [0, 1, 2, 3];
            let ids = vld1q_u32(ids.as_ptr());
            let n = vdupq_n_u32(lanes as u32);
            let m: [uint32x4_t; 4] =
                std::array::from_fn(|j| vcltq_u32(vaddq_u32(ids, vdupq_n_u32(4 * j as u32)), n));
            (wide(p), wide(q), m)
        };
        for ((acc, xq), xd) in acc.iter_mut().zip(&self.xq).zip(&self.xd) {
            // SAFETY: NEON (module comment).
            let sv = unsafe { vdupq_n_f32(a * xd[e / Q16]) };
            let x0 = load2_i16(&xq[e..]);
            let x1 = load2_i16(&xq[e + 16..]);
            let (m0, m1) = if MASK {
                (Some([masks[0], masks[1]]), Some([masks[2], masks[3]]))
            } else {
                (None, None)
            };
            fma_half::<0>(acc, isums(&w0, &[x0.0, x0.1]), sv, m0);
            fma_half::<1>(acc, isums(&w1, &[x1.0, x1.1]), sv, m1);
        }
    }
}

/// `reference::q16::dot_int8_q16` for R activation rows at once (the weights widened once),
/// bit for bit. A block length the kernel does not take (shorter than the row and not a power
/// of two from 32 on) runs the reference. Lengths as the reference's (checked: panics):
/// `xq[r]` at least `q16_row_len(K)` values.
pub fn dot_int8_q16<const R: usize>(
    q: &[u8],
    scales: &[f32],
    block_len: usize,
    xq: [&[i16]; R],
    xd: [&[f32]; R],
) -> [f32; R] {
    let k = q.len();
    let shift = if block_len >= k {
        63
    } else if block_len.is_power_of_two() && block_len >= UNIT_INT8 {
        block_len.trailing_zeros()
    } else {
        return std::array::from_fn(|r| q16::dot_int8_q16(q, scales, block_len, xq[r], xd[r]));
    };
    let row = Int8Row {
        scales,
        shift,
        xq,
        xd,
    };
    // The two sets: `cur` is always the set of the next unit (swapped after each unit).
    // SAFETY: NEON (module comment).
    let zero = unsafe { vdupq_n_f32(0.0) };
    let (mut cur, mut other) = ([[zero; 4]; R], [[zero; 4]; R]);
    let units = k / UNIT_INT8;
    for u in 0..units {
        row.unit::<false>(u, &q[u * UNIT_INT8..], 16, &mut cur);
        std::mem::swap(&mut cur, &mut other);
    }
    let rest = k - units * UNIT_INT8;
    if rest > 0 {
        let mut buf = [0u8; UNIT_INT8];
        buf[..rest].copy_from_slice(&q[units * UNIT_INT8..]);
        row.unit::<true>(units, &buf, rest.div_ceil(UNIT_INT8 / 16), &mut cur);
    }
    let (s0, s1) = if units.is_multiple_of(2) {
        (cur, other)
    } else {
        (other, cur)
    };
    std::array::from_fn(|r| finish(&[s0[r], s1[r]]))
}
