//! `DecodeK` for tq1_0 and tq2_0 (`reference/ternary.rs`): the stored `q + 1` decoded to the
//! signed `q` in element order, unit scales per sub-block of 32, no mins; the integer sums and
//! the float part are `k_quants.rs`'s. Safety rules as in `neon.rs`.

use std::arch::aarch64::*;

use super::{load_u8, DecodeK, DecodedK};
use crate::formats::blocks::*;

/// tq1_0's base-3 digit of every byte of `v`, `p` the byte's multiplier `3^n`:
/// `((u8)(byte·p)·3) >> 8` (ggml's formula), minus 1.
#[inline(always)]
fn trits(v: uint8x16_t, p: uint8x16_t) -> int8x16_t {
    // SAFETY: NEON (module comment).
    unsafe {
        let t = vmulq_u8(v, p);
        let three = vdupq_n_u8(3);
        let lo = vshrn_n_u16::<8>(vmull_u8(vget_low_u8(t), vget_low_u8(three)));
        let hi = vshrn_n_u16::<8>(vmull_high_u8(t, three));
        vsubq_s8(vreinterpretq_s8_u8(vcombine_u8(lo, hi)), vdupq_n_s8(1))
    }
}

/// Unit scales a sub-block of 32, no mins.
#[inline(always)]
fn unit(q: [int8x16_t; 16]) -> DecodedK {
    let mut scale = [0i32; 16];
    scale[..8].fill(1);
    DecodedK {
        q,
        scale,
        per32: true,
        // SAFETY: NEON (module comment).
        mins: [unsafe { vdupq_n_s32(0) }; 4],
    }
}

impl DecodeK for BlockTQ1_0 {
    /// `formats::ternary::unpack_tq1_0`: register 2n + h = digit n of qs[16h..16h+16] (n < 5),
    /// 10 + n = digit n of qs[32..48], 15 = digit b / 4 of qh[b % 4] for byte b.
    #[inline(always)]
    fn decode(&self) -> DecodedK {
        // SAFETY: NEON is baseline (module comment); every load reads 16 bytes inside qs.
        unsafe {
            let mut q = [vdupq_n_s8(0); 16];
            let tail = load_u8(&self.qs[32..]);
            for (n, p) in [1u8, 3, 9, 27, 81].into_iter().enumerate() {
                for h in 0..2 {
                    q[2 * n + h] = trits(load_u8(&self.qs[16 * h..]), vdupq_n_u8(p));
                }
                q[10 + n] = trits(tail, vdupq_n_u8(p));
            }
            let qh = vreinterpretq_u8_u32(vdupq_n_u32(u32::from_le_bytes(self.qh)));
            const P_QH: [u8; 16] = [1, 1, 1, 1, 3, 3, 3, 3, 9, 9, 9, 9, 27, 27, 27, 27];
            q[15] = trits(qh, vld1q_u8(P_QH.as_ptr()));
            unit(q)
        }
    }
}

impl DecodeK for BlockTQ2_0 {
    /// `formats::ternary::unpack_tq2_0`: element 128h + 32l + m is bits 2l..2l+1 of
    /// qs[32h + m], minus 1.
    #[inline(always)]
    fn decode(&self) -> DecodedK {
        // SAFETY: NEON is baseline (module comment); every load reads 16 bytes inside qs.
        unsafe {
            let mut q = [vdupq_n_s8(0); 16];
            for h in 0..2 {
                for half in 0..2 {
                    let v = load_u8(&self.qs[32 * h + 16 * half..]);
                    for l in 0..4 {
                        let c = match l {
                            0 => v,
                            1 => vshrq_n_u8::<2>(v),
                            2 => vshrq_n_u8::<4>(v),
                            _ => vshrq_n_u8::<6>(v),
                        };
                        let c = vreinterpretq_s8_u8(vandq_u8(c, vdupq_n_u8(3)));
                        q[8 * h + 2 * l + half] = vsubq_s8(c, vdupq_n_s8(1));
                    }
                }
            }
            unit(q)
        }
    }
}
