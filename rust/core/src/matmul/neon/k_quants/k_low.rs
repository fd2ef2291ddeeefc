//! `DecodeK` for q2_K, q3_K and iq4_xs (the formats of `reference/k_low.rs`): the quants decoded
//! to signed bytes in element order, their scales and (q2_K) the min of each group of 16; the
//! integer sums and the float part are `k_quants.rs`'s. Safety rules as in `neon.rs`.

use std::arch::aarch64::*;

use super::{load_u8, widen_u8x16, DecodeK, DecodedK};
use crate::formats::blocks::*;
use crate::matmul::reference as r;

/// Bits 2j..2j+1 of every byte of `v` (j = 0..3), as 0..3.
#[inline(always)]
fn crumb(v: uint8x16_t, j: usize) -> uint8x16_t {
    // SAFETY: NEON (module comment).
    unsafe {
        let t = match j {
            0 => v,
            1 => vshrq_n_u8::<2>(v),
            2 => vshrq_n_u8::<4>(v),
            _ => vshrq_n_u8::<6>(v),
        };
        vandq_u8(t, vdupq_n_u8(3))
    }
}

impl DecodeK for BlockQ2K {
    /// `reference::unpack_q2_k` (element 128h + 32j + l: bits 2j of qs[32h + l]); group g's
    /// scale is `scales[g] & 15`, its min `scales[g] >> 4`.
    #[inline(always)]
    fn decode(&self) -> DecodedK {
        // SAFETY: NEON is baseline (module comment); every load reads 16 bytes inside qs /
        // scales.
        unsafe {
            let mut q = [vdupq_n_s8(0); 16];
            for h in 0..2 {
                for half in 0..2 {
                    let v = load_u8(&self.qs[32 * h + 16 * half..]);
                    for j in 0..4 {
                        q[8 * h + 2 * j + half] = vreinterpretq_s8_u8(crumb(v, j));
                    }
                }
            }
            let sc = load_u8(&self.scales);
            DecodedK {
                q,
                scale: self.scales.map(|s| (s & 15) as i32),
                per32: false,
                mins: widen_u8x16(vshrq_n_u8::<4>(sc)),
            }
        }
    }
}

impl DecodeK for BlockQ3K {
    /// `reference::unpack_q3_k` (the low two bits from qs, minus 4 unless bit 4h + s of
    /// hmask[l] is set) with `reference::scales_q3_k`.
    #[inline(always)]
    fn decode(&self) -> DecodedK {
        // SAFETY: NEON is baseline (module comment); every load reads 16 bytes inside qs /
        // hmask.
        unsafe {
            let mut q = [vdupq_n_s8(0); 16];
            for half in 0..2 {
                let hm = load_u8(&self.hmask[16 * half..]);
                for h in 0..2 {
                    let v = load_u8(&self.qs[32 * h + 16 * half..]);
                    for s in 0..4 {
                        let bit = vdupq_n_u8(1 << (4 * h + s));
                        // 4 where the high bit is clear, 0 where it is set
                        let minus = vbicq_u8(vdupq_n_u8(4), vtstq_u8(hm, bit));
                        q[8 * h + 2 * s + half] =
                            vsubq_s8(vreinterpretq_s8_u8(crumb(v, s)), vreinterpretq_s8_u8(minus));
                    }
                }
            }
            DecodedK {
                q,
                scale: r::scales_q3_k(&self.scales).map(|s| s as i32),
                per32: false,
                mins: [vdupq_n_s32(0); 4],
            }
        }
    }
}

impl DecodeK for BlockIQ4XS {
    /// `reference::unpack_iq4_xs` (sub-block b: low nibbles of qs[16b..16b+16], then the high
    /// ones, through kvalues_iq4nl) with `reference::scales_iq4_xs`, one per sub-block of 32.
    #[inline(always)]
    fn decode(&self) -> DecodedK {
        // SAFETY: NEON is baseline (module comment); every load reads 16 bytes inside qs /
        // the table.
        unsafe {
            let t = vld1q_s8(r::KVALUES_IQ4NL.as_ptr());
            let mut q = [vdupq_n_s8(0); 16];
            for b in 0..8 {
                let v = load_u8(&self.qs[16 * b..]);
                q[2 * b] = vqtbl1q_s8(t, vandq_u8(v, vdupq_n_u8(0x0f)));
                q[2 * b + 1] = vqtbl1q_s8(t, vshrq_n_u8::<4>(v));
            }
            let sc = r::scales_iq4_xs(self);
            let mut scale = [0i32; 16];
            scale[..8].copy_from_slice(&sc);
            DecodedK {
                q,
                scale,
                per32: true,
                mins: [vdupq_n_s32(0); 4],
            }
        }
    }
}
