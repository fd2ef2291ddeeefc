//! NEON K-quant kernels (q4_K, q5_K, q6_K with q8_K activations): each super-block decoded
//! once into signed bytes and scales, integer sums with the kinds of `neon.rs`, the float part
//! the reference's scalar code. Safety rules as in `neon.rs`.

use std::arch::aarch64::*;

pub(super) use super::{load_i8, load_u8};
use super::{IDot, Mull, Sdot};
#[cfg(test)]
use crate::cpu::has_dotprod;
use crate::formats::blocks::*;
use crate::matmul::reference::{self as r, unpack_scales_k4, BlockK, BlockQ8K, LANES};

/// A K-quant super-block decoded once for several activation rows: the 256 weights as 16
/// registers of signed bytes in element order (q6_K: already minus 32), the scales (`per32`:
/// one per sub-block of 32 in `scale[..8]` (q4_K, q5_K, iq4_xs); otherwise one per group of 16
/// (q6_K, q2_K, q3_K)), and the min multiplier of each of the 16 `bsums` as i32 (a sub-block
/// min of q4_K/q5_K twice; zero for the formats without mins).
pub struct DecodedK {
    pub(super) q: [int8x16_t; 16],
    pub(super) scale: [i32; 16],
    pub(super) per32: bool,
    pub(super) mins: [int32x4_t; 4],
}

/// Integer sums of K-quant blocks in NEON (the float part is the reference's scalar code).
pub trait DecodeK: BlockK {
    fn decode(&self) -> DecodedK;
}

mod k_low;
mod ternary;

/// 16 unsigned byte multipliers (one per bsum) widened to i32.
#[inline(always)]
pub(super) fn widen_u8x16(m: uint8x16_t) -> [int32x4_t; 4] {
    // SAFETY: NEON (module comment).
    unsafe {
        let (lo, hi) = (vmovl_u8(vget_low_u8(m)), vmovl_high_u8(m));
        [lo, hi].map(|h| {
            [
                vreinterpretq_s32_u32(vmovl_u16(vget_low_u16(h))),
                vreinterpretq_s32_u32(vmovl_high_u16(h)),
            ]
        })
    }
    .as_flattened()
    .try_into()
    .expect("four vectors")
}

/// The 8 scales of a q4_K/q5_K block (in `scale[..8]`) and its mins per bsum (sub-block s's
/// min for bsums 2s and 2s + 1) as i32.
#[inline(always)]
fn scales_k4(q: &[u8; K_SCALE_SIZE]) -> ([i32; 16], [int32x4_t; 4]) {
    let (sc, m) = unpack_scales_k4(q);
    let mut scale = [0i32; 16];
    for s in 0..8 {
        scale[s] = sc[s] as i32;
    }
    // SAFETY: NEON (module comment); 8 bytes in bounds of `m`.
    let mins = unsafe {
        let m8 = vld1_u8(m.as_ptr());
        widen_u8x16(vcombine_u8(vzip1_u8(m8, m8), vzip2_u8(m8, m8)))
    };
    (scale, mins)
}

/// The 4-bit quants of q4_K/q5_K in element order: chunk j of 64 takes the low nibbles of
/// qs[32j..32j+32] (sub-block 2j), then the high nibbles (sub-block 2j+1).
#[inline(always)]
fn nibbles_k(qs: &[u8; QK_K / 2]) -> [int8x16_t; 16] {
    // (loops rather than `array::map` / `from_fn` closures, which LLVM left out of line)
    // SAFETY: NEON (module comment).
    unsafe {
        let mut q = [vdupq_n_s8(0); 16];
        for j in 0..4 {
            for half in 0..2 {
                // register i holds elements 16i..16i+16
                let v = load_u8(&qs[32 * j + 16 * half..]);
                q[4 * j + half] = vreinterpretq_s8_u8(vandq_u8(v, vdupq_n_u8(0x0f)));
                q[4 * j + 2 + half] = vreinterpretq_s8_u8(vshrq_n_u8::<4>(v));
            }
        }
        q
    }
}

impl DecodeK for BlockQ4K {
    #[inline(always)]
    fn decode(&self) -> DecodedK {
        let (scale, mins) = scales_k4(&self.scales);
        DecodedK {
            q: nibbles_k(&self.qs),
            scale,
            per32: true,
            mins,
        }
    }
}

impl DecodeK for BlockQ5K {
    /// q4_K's nibbles plus bit s of qh[l] as bit 4 of element 32s + l.
    #[inline(always)]
    fn decode(&self) -> DecodedK {
        let mut q = nibbles_k(&self.qs);
        let qh = [load_u8(&self.qh), load_u8(&self.qh[16..])];
        for (i, v) in q.iter_mut().enumerate() {
            let (s, h) = (i / 2, i % 2);
            // SAFETY: NEON (module comment).
            unsafe {
                let b4 = vandq_u8(vtstq_u8(qh[h], vdupq_n_u8(1 << s)), vdupq_n_u8(0x10));
                *v = vorrq_s8(*v, vreinterpretq_s8_u8(b4));
            }
        }
        let (scale, mins) = scales_k4(&self.scales);
        DecodedK {
            q,
            scale,
            per32: true,
            mins,
        }
    }
}

impl DecodeK for BlockQ6K {
    /// `reference::unpack_q6_k` minus 32, 16 lanes of l at a time.
    #[inline(always)]
    fn decode(&self) -> DecodedK {
        // SAFETY: decode_q6 needs only NEON, baseline on aarch64 (module comment).
        unsafe { self.decode_q6() }
    }
}

impl BlockQ6K {
    /// # Safety
    /// NEON (always, see the module comment); a separate function only to hold one `unsafe`.
    #[inline(always)]
    unsafe fn decode_q6(&self) -> DecodedK {
        let (m4, m3) = (vdupq_n_u8(0x0f), vdupq_n_u8(3));
        let mut q = [vdupq_n_s8(0); 16];
        for h in 0..2 {
            for half in 0..2 {
                let at = 16 * half;
                let ql0 = load_u8(&self.ql[64 * h + at..]);
                let ql1 = load_u8(&self.ql[64 * h + 32 + at..]);
                let qh = load_u8(&self.qh[32 * h + at..]);
                let top = |k: i32| -> uint8x16_t {
                    let t = match k {
                        0 => qh,
                        1 => vshrq_n_u8::<2>(qh),
                        2 => vshrq_n_u8::<4>(qh),
                        _ => vshrq_n_u8::<6>(qh),
                    };
                    vshlq_n_u8::<4>(vandq_u8(t, m3))
                };
                let u = [
                    vorrq_u8(vandq_u8(ql0, m4), top(0)),
                    vorrq_u8(vandq_u8(ql1, m4), top(1)),
                    vorrq_u8(vshrq_n_u8::<4>(ql0), top(2)),
                    vorrq_u8(vshrq_n_u8::<4>(ql1), top(3)),
                ];
                // element 128h + 32k + at + i sits in register 8h + 2k + half
                for (k, v) in u.into_iter().enumerate() {
                    q[8 * h + 2 * k + half] = vsubq_s8(vreinterpretq_s8_u8(v), vdupq_n_s8(32));
                }
            }
        }
        DecodedK {
            q,
            scale: self.scales.map(|s| s as i32),
            per32: false,
            mins: [vdupq_n_s32(0); 4],
        }
    }
}

/// (Σ_g scale_g Σ_{e in g} q_e x_e, Σ_g min_g bsum_g): exact integers (the first at most
/// 256 · 64 · 128 · 128 < 2^31 in magnitude, the second 16 · 63 · 2^15), the reference's
/// `BlockK::sums` before any format's correction (`DecodeK::correct`).
///
/// # Safety
/// As for `block32`.
#[inline(always)]
unsafe fn sums_k<D: IDot>(d: &DecodedK, x: &BlockQ8K) -> (i32, i32) {
    // SAFETY: NEON (module comment), the kind's features (caller's contract); bsums holds 16
    // i16.
    unsafe {
        let zero = vdupq_n_s32(0);
        let mut acc = zero;
        if d.per32 {
            for s in 0..8 {
                let x0 = load_i8(&x.qs[32 * s..]);
                let x1 = load_i8(&x.qs[32 * s + 16..]);
                let dot = D::dot16(D::dot16(zero, d.q[2 * s], x0), d.q[2 * s + 1], x1);
                acc = vmlaq_n_s32(acc, dot, d.scale[s]);
            }
        } else {
            for g in 0..16 {
                let dot = D::dot16(zero, d.q[g], load_i8(&x.qs[16 * g..]));
                acc = vmlaq_n_s32(acc, dot, d.scale[g]);
            }
        }
        let (b0, b1) = (
            vld1q_s16(x.bsums.as_ptr()),
            vld1q_s16(x.bsums[8..].as_ptr()),
        );
        // the 16 bsums widened to i32, times their min multipliers
        let mut m = vmulq_s32(vmovl_s16(vget_low_s16(b0)), d.mins[0]);
        m = vmlaq_s32(m, vmovl_high_s16(b0), d.mins[1]);
        m = vmlaq_s32(m, vmovl_s16(vget_low_s16(b1)), d.mins[2]);
        m = vmlaq_s32(m, vmovl_high_s16(b1), d.mins[3]);
        (vaddvq_s32(acc), vaddvq_s32(m))
    }
}

/// `reference::dot_block_k` for R activation rows at once: each super-block decoded once,
/// integer sums in NEON, float part the reference's.
///
/// # Safety
/// As for `block32`.
#[inline(always)]
unsafe fn block_k<W: DecodeK, D: IDot, const R: usize>(w: &[W], x: [&[BlockQ8K]; R]) -> [f32; R] {
    let mut acc = [[0.0f32; LANES]; R];
    for (b, wb) in w.iter().enumerate() {
        let q = wb.decode();
        let (d, dmin) = wb.d_dmin();
        for r in 0..R {
            let xb = &x[r][b];
            // SAFETY: the kind's features are present (caller's contract).
            let (isum, msum) = unsafe { sums_k::<D>(&q, xb) };
            acc[r][b % LANES] += r::block_k_product(d, dmin, xb.d, isum, msum);
        }
    }
    acc.map(|a| r::hsum8(&a))
}

/// `reference::dot_block_k` with `sdot`.
///
/// # Safety
/// NEON and dotprod must be available (`has_dotprod`); every `x[r]` has at least `w.len()`
/// blocks.
#[target_feature(enable = "neon,dotprod")]
pub unsafe fn dot_block_k_sdot<W: DecodeK, const R: usize>(
    w: &[W],
    x: [&[BlockQ8K]; R],
) -> [f32; R] {
    // SAFETY: dotprod available (contract).
    unsafe { block_k::<W, Sdot, R>(w, x) }
}

/// `reference::dot_block_k` with `smull` (Armv8.0).
///
/// # Safety
/// NEON must be available (`enabled`); lengths as for `dot_block_k_sdot`.
#[target_feature(enable = "neon")]
pub unsafe fn dot_block_k_mull<W: DecodeK, const R: usize>(
    w: &[W],
    x: [&[BlockQ8K]; R],
) -> [f32; R] {
    // SAFETY: NEON available (contract).
    unsafe { block_k::<W, Mull, R>(w, x) }
}

/// The integer sums of one super-block by kind (for the tests).
#[cfg(test)]
pub fn sums_for_test<W: DecodeK>(w: &W, x: &BlockQ8K, dotprod: bool) -> (i32, i32) {
    #[target_feature(enable = "neon,dotprod")]
    unsafe fn sdot_sums(d: &DecodedK, x: &BlockQ8K) -> (i32, i32) {
        // SAFETY: dotprod (this function's contract).
        unsafe { sums_k::<Sdot>(d, x) }
    }
    let d = w.decode();
    if dotprod {
        assert!(has_dotprod());
        // SAFETY: dotprod detected (asserted above).
        unsafe { sdot_sums(&d, x) }
    } else {
        // SAFETY: NEON (module comment).
        unsafe { sums_k::<Mull>(&d, x) }
    }
}
