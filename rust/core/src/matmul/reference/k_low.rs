//! q2_K, q3_K and iq4_xs weights against q8_K activations (ggml's `ggml_vec_dot_q2_K_q8_K`,
//! `..._q3_K_q8_K`, `..._iq4_xs_q8_K`): per super-block of 256 the exact integer sums, sub-block
//! scales applied in integers, then the float product of `block_k_product` (q2_K's min term from
//! the activation `bsums`, as ggml's `dmin * summs`). ggml sums iq4_xs's eight sub-blocks in
//! floats (`d4d8 * (ls - 32) * sumi` each); here they are one exact integer, so the results
//! differ from libggml's only by float rounding.

use super::{BlockK, BlockQ8K, KVALUES_IQ4NL};
use crate::formats::blocks::*;

/// q2_K's 2-bit quants in element order: in each half h of 128, element 128h + 32j + l is bits
/// 2j..2j+1 of qs[32h + l].
pub fn unpack_q2_k(w: &BlockQ2K) -> [u8; QK_K] {
    let mut q = [0u8; QK_K];
    for h in 0..2 {
        for j in 0..4 {
            for l in 0..32 {
                q[128 * h + 32 * j + l] = (w.qs[32 * h + l] >> (2 * j)) & 3;
            }
        }
    }
    q
}

/// Σ_g scale_g · Σ_{e in group g of 16} q_e x_e.
#[inline(always)]
fn isum_groups16<Q: Copy + Into<i32>>(
    q: &[Q; QK_K],
    scale: impl Fn(usize) -> i32,
    x: &BlockQ8K,
) -> i32 {
    (0..16)
        .map(|g| {
            let dot: i32 = (16 * g..16 * g + 16)
                .map(|e| q[e].into() * x.qs[e] as i32)
                .sum();
            scale(g) * dot
        })
        .sum()
}

impl BlockK for BlockQ2K {
    /// (Σ_g (sc_g & 15)·Σ q x, Σ_g (sc_g >> 4)·bsum_g).
    fn sums(&self, x: &BlockQ8K) -> (i32, i32) {
        let q = unpack_q2_k(self);
        let isum = isum_groups16(&q, |g| (self.scales[g] & 15) as i32, x);
        let msum = (0..16)
            .map(|g| (self.scales[g] >> 4) as i32 * x.bsums[g] as i32)
            .sum();
        (isum, msum)
    }
    fn d_dmin(&self) -> (f32, f32) {
        (f16_to_f32(self.d), f16_to_f32(self.dmin))
    }
}

/// q3_K's signed quants (-4..3) in element order: in each half h of 128, element 128h + 32s + l
/// takes bits 2s..2s+1 of qs[32h + l], minus 4 unless bit 4h + s of hmask[l] is set.
pub fn unpack_q3_k(w: &BlockQ3K) -> [i8; QK_K] {
    let mut q = [0i8; QK_K];
    for h in 0..2 {
        for s in 0..4 {
            for l in 0..32 {
                let low = ((w.qs[32 * h + l] >> (2 * s)) & 3) as i8;
                let high = (w.hmask[l] >> (4 * h + s)) & 1;
                q[128 * h + 32 * s + l] = low - if high == 1 { 0 } else { 4 };
            }
        }
    }
    q
}

/// q3_K's 16 six-bit scales minus 32: scale j has low bits from nibble j / 8 of scales[j % 8]
/// and high bits 2(j / 4)..2(j / 4)+1 of scales[8 + j % 4] (ggml's `kmask` shuffle).
pub fn scales_q3_k(sc: &[u8; 12]) -> [i8; 16] {
    std::array::from_fn(|j| {
        let low = (sc[j % 8] >> (4 * (j / 8))) & 15;
        let high = (sc[8 + j % 4] >> (2 * (j / 4))) & 3;
        (low | (high << 4)) as i8 - 32
    })
}

impl BlockK for BlockQ3K {
    /// (Σ_g scale_g·Σ q x, 0).
    fn sums(&self, x: &BlockQ8K) -> (i32, i32) {
        let q = unpack_q3_k(self);
        let sc = scales_q3_k(&self.scales);
        (isum_groups16(&q, |g| sc[g] as i32, x), 0)
    }
    fn d_dmin(&self) -> (f32, f32) {
        (f16_to_f32(self.d), 0.0)
    }
}

/// iq4_xs's signed values (kvalues_iq4nl) in element order: sub-block b of 32 takes the low
/// nibbles of qs[16b..16b+16] as elements 0..15 and the high nibbles as 16..31.
pub fn unpack_iq4_xs(w: &BlockIQ4XS) -> [i8; QK_K] {
    let mut q = [0i8; QK_K];
    for b in 0..8 {
        for j in 0..16 {
            let v = w.qs[16 * b + j];
            q[32 * b + j] = KVALUES_IQ4NL[(v & 15) as usize];
            q[32 * b + 16 + j] = KVALUES_IQ4NL[(v >> 4) as usize];
        }
    }
    q
}

/// iq4_xs's 8 sub-block scales `ls - 32`: ls has the low nibble b % 2 of scales_l[b / 2] and
/// bits 2b..2b+1 of the little-endian scales_h as bits 4..5.
pub fn scales_iq4_xs(w: &BlockIQ4XS) -> [i32; 8] {
    let h = u16::from_le_bytes(w.scales_h) as i32;
    std::array::from_fn(|b| {
        let low = ((w.scales_l[b / 2] >> (4 * (b % 2))) & 15) as i32;
        (low | (((h >> (2 * b)) & 3) << 4)) - 32
    })
}

impl BlockK for BlockIQ4XS {
    /// (Σ_b (ls_b - 32)·Σ q x, 0).
    fn sums(&self, x: &BlockQ8K) -> (i32, i32) {
        let q = unpack_iq4_xs(self);
        let sc = scales_iq4_xs(self);
        let isum = (0..8)
            .map(|b| {
                let dot: i32 = (32 * b..32 * b + 32)
                    .map(|e| q[e] as i32 * x.qs[e] as i32)
                    .sum();
                sc[b] * dot
            })
            .sum();
        (isum, 0)
    }
    fn d_dmin(&self) -> (f32, f32) {
        (f16_to_f32(self.d), 0.0)
    }
}
