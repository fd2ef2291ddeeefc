//! q4_1 and q5_1 weights (`w = d·q + m`, q unsigned) against activations quantized to q8_1, as
//! ggml's `ggml_vec_dot_q4_1_q8_1` / `ggml_vec_dot_q5_1_q8_1`: per block of 32 the exact integer
//! `isum = Σ q_w q_x`, then `(d_w d_x)·isum + m_w s_x`, where the q8_1 block carries
//! `s = f16(d · Σ q_x)` (d the f32 scale before its f16 rounding), so `m_w s_x` stands for
//! `m_w Σ x̂`. The blocks' products are summed in the 8 lanes of `reference.rs`.

use super::{Block32, BlockQ8_0};
use crate::formats::blocks::*;

/// ggml's `block_q8_1`: d, s = d·Σq (both f16), 32 quants.
#[repr(C)]
#[derive(Clone, Copy, Debug, bytemuck::Pod, bytemuck::Zeroable)]
pub struct BlockQ8_1 {
    pub d: Half,
    pub s: Half,
    pub qs: [i8; 32],
}

const _: () = assert!(std::mem::size_of::<BlockQ8_1>() == 36);

/// ggml's `quantize_row_q8_1_ref`: `d = amax/127`, `id = 1/d` (0 for an all-zero block),
/// `q = roundf(x·id)` (half away from zero), `d` stored as f16 and `s = f16((float)Σq · d)`.
pub fn quantize_row_q8_1(x: &[f32], out: &mut [BlockQ8_1]) {
    for (b, x) in out.iter_mut().zip(x.chunks_exact(32)) {
        let amax = x.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        let d = amax / 127.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        b.d = f16_from_f32(d);
        let mut sum = 0i32;
        for (q, &v) in b.qs.iter_mut().zip(x) {
            *q = c_to_i8((v * id).round());
            sum += *q as i32;
        }
        b.s = f16_from_f32(sum as f32 * d);
    }
}

/// C's `(int8_t)roundf(v)` as x86-64 gcc compiles it (cvttss2si: NaN and out-of-range give
/// i32::MIN, low byte kept). Differs from Rust's saturating `as` only when `1/d` overflowed
/// (blocks of values near FLT_MIN), as in `legacy.rs`.
#[inline(always)]
fn c_to_i8(v: f32) -> i8 {
    let i = if v.is_nan() || !(-2147483648.0..2147483648.0).contains(&v) {
        i32::MIN
    } else {
        v as i32
    };
    i as i8
}

/// The 32 unsigned quants (0..15) of a q4_1 block in element order.
#[inline(always)]
pub fn unpack_q4_1(w: &BlockQ4_1) -> [i8; 32] {
    let mut q = [0i8; 32];
    for j in 0..16 {
        q[j] = (w.qs[j] & 0x0f) as i8;
        q[j + 16] = (w.qs[j] >> 4) as i8;
    }
    q
}

/// The 32 unsigned quants (0..31) of a q5_1 block in element order: the nibbles plus bit j of
/// qh as bit 4 of element j.
pub fn unpack_q5_1(w: &BlockQ5_1) -> [i8; 32] {
    let qh = u32::from_le_bytes(w.qh);
    let mut q = [0i8; 32];
    for j in 0..16 {
        let h0 = (((qh >> j) << 4) & 0x10) as u8;
        let h1 = ((qh >> (j + 12)) & 0x10) as u8;
        q[j] = ((w.qs[j] & 0x0f) | h0) as i8;
        q[j + 16] = ((w.qs[j] >> 4) | h1) as i8;
    }
    q
}

impl Block32 for BlockQ4_1 {
    fn d(&self) -> Half {
        self.d
    }
    fn isum(&self, x: &BlockQ8_0) -> i32 {
        super::isum32(&unpack_q4_1(self), &x.qs)
    }
    const HAS_MIN: bool = true;
    fn m(&self) -> Half {
        self.m
    }
}

impl Block32 for BlockQ5_1 {
    fn d(&self) -> Half {
        self.d
    }
    fn isum(&self, x: &BlockQ8_0) -> i32 {
        super::isum32(&unpack_q5_1(self), &x.qs)
    }
    const HAS_MIN: bool = true;
    fn m(&self) -> Half {
        self.m
    }
}

/// The float product of a block with a min: `(d_w d_x)·isum + m_w s_x` (two products, one add,
/// in this order; `xd`, `xs` are the activation block's d and s as f32).
#[inline(always)]
pub fn block32_min_product<W: Block32>(w: &W, x: &BlockQ8_0, xd: f32, xs: f32) -> f32 {
    super::block32_product(w, x, xd) + f16_to_f32(w.m()) * xs
}

/// Σ over blocks of `block32_min_product`, lane-wise (block b in lane b % 8).
pub fn dot_block32_min<W: Block32>(w: &[W], x: &[BlockQ8_0], xd: &[f32], xs: &[f32]) -> f32 {
    let mut acc = [0.0f32; super::LANES];
    for (b, (((w, x), &xd), &xs)) in w.iter().zip(x).zip(xd).zip(xs).enumerate() {
        acc[b % super::LANES] += block32_min_product(w, x, xd, xs);
    }
    super::hsum8(&acc)
}
