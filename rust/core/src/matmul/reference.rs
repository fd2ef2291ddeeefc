//! Scalar references of the quantized dot products `y = Σ_i w_i x_i` of one weight row with one
//! activation row. These define the result bit for bit; the SIMD paths in `x86.rs` compute the
//! same integers and the same float operations in the same order (tested against these).
//!
//! Activations are quantized as ggml does for its `vec_dot` (ggml-quants.c):
//! - q4_0, q5_0, q8_0, iq4_nl weights: activations to q8_0 blocks (`quantize_row_q8_0_ref`, f16
//!   scale, `roundf`), an exact integer sum per block of 32, times `d_w * d_x`.
//! - q4_1, q5_1 weights (`d·q + m`): activations to q8_1 blocks (q8_0's d and quants plus
//!   `s = f16(d·Σq)`), per block `(d_w d_x)·isum + m_w·s_x` (`reference/q8_1.rs`).
//! - q2_k, q3_k, q4_k, q5_k, q6_k, iq4_xs weights: activations to q8_K blocks
//!   (`quantize_row_q8_K_ref`: f32 scale `1/iscale`, `nearest_int`, plus the 16-element sums
//!   `bsums`), an exact integer sum per super-block of 256 (sub-block scales applied in
//!   integers), the minimum term from `bsums` (q2_k, q3_k, iq4_xs in `reference/k_low.rs`).
//! - tq1_0, tq2_0 weights: activations to q8_K, the exact `Σ (q - 1)·x` per super-block times
//!   `d_w·d_x` (`reference/ternary.rs`).
//! - nf4, int8: activations to 16 bits per block of 64, exact integer sums over lanes of a few
//!   elements, one fused multiply-add a lane (`reference/q16.rs`, which defines them).
//! - fp8_e4m3, fp8_e5m2: activations stay f32; the weights are decoded in registers (no
//!   activation error at all; fp8 bytes decode exactly through a 256-entry table, so the result
//!   is within float rounding of the dequantized product).
//!
//! **Float order (the same in every path).** Per-block float products go to one of 8 lanes,
//! block `b` to lane `b % 8`: `acc[b % 8] += p_b`, blocks in increasing order. The 8 lanes are
//! summed as `((a0 + a4) + (a2 + a6)) + ((a1 + a5) + (a3 + a7))`, which is what an AVX2
//! register reduction (high half + low half, then movehl, then the last pair) does.
//!
//! **The f32-activation formats** (fp8; nf4 and int8 until their move to 16-bit activations)
//! use `WIDE` = 64 lanes, element `i` of the row (its position in the row, not in its block)
//! in lane `i % 64`, and fused multiply-adds (`f32::mul_add`, one rounding; FMA3 / AVX-512 in
//! the SIMD paths): per block of the scale, `part[i % 64] = fma(v_i, x_i, part[i % 64])` (v the
//! byte's exact value), then `acc[l] = fma(part[l], scale_b, acc[l])` for the lanes the block
//! touched (all 64 unless the block is shorter: blocks of 32, rows shorter than 64).
//!
//! Elements go in increasing order, so each lane's sequence is fixed. 64 lanes are four AVX-512
//! registers (eight AVX2, sixteen NEON): four independent chains of 4-cycle FMAs per activation
//! row, enough to keep one FMA a cycle going. 64 lanes are folded to 16 as
//! `(a[l] + a[l+16]) + (a[l+32] + a[l+48])`, to 8 as `s[l] + s[l+8]`, then summed as above.
//! (Before 2026-11-27 these formats used 32 lanes and a separate multiply and add, with the
//! nf4 scale applied per block. Fusing alone makes the AVX-512 kernels 1.21-1.27x faster from
//! L2 at M = 1 and 4 (the same kernels built with multiply + add, measured side by side): on
//! Zen 4 an FMA frees the pipe a separate add would take from the decode's shifts and
//! permutes. With the nf4 scale in the weight, 64 lanes and the new decodes, M = 1 is
//! 1.3-2.5x faster per core; benches/RESULTS.md, "f32-activation kernels".)

use bytemuck::{Pod, Zeroable};

use crate::formats::blocks::*;
use crate::formats::{fp8, legacy};

pub mod bf16;
pub mod gint;
mod k_low;
pub mod q16;
mod q8_1;
mod ternary;
pub use k_low::{scales_iq4_xs, scales_q3_k, unpack_iq4_xs, unpack_q2_k, unpack_q3_k};
pub use q8_1::{
    block32_min_product, dot_block32_min, quantize_row_q8_1, unpack_q4_1, unpack_q5_1, BlockQ8_1,
};

/// Number of float accumulator lanes (one AVX2 register of f32).
pub const LANES: usize = 8;
/// Lanes of the f32-activation formats (four AVX-512 registers, see the module comment).
pub const WIDE: usize = 64;

/// ggml's `block_q8_K`: the activation format of the K-quant dot products.
#[repr(C)]
#[derive(Clone, Copy, Debug, Pod, Zeroable)]
pub struct BlockQ8K {
    pub d: f32,
    pub qs: [i8; QK_K],
    pub bsums: [i16; QK_K / 16],
}

const _: () = assert!(std::mem::size_of::<BlockQ8K>() == 292);

/// The NF4 code of bitsandbytes (index 0..15), digits as bitsandbytes prints them (each literal
/// rounds to the f32 bitsandbytes stores).
#[allow(clippy::excessive_precision)]
pub const NF4_CODE: [f32; 16] = [
    -1.0,
    -0.696_192_800_998_687_7,
    -0.525_073_051_452_636_7,
    -0.394_917_488_098_144_53,
    -0.284_441_381_692_886_35,
    -0.184_773_430_228_233_34,
    -0.091_050_036_251_544_95,
    0.0,
    0.079_580_299_556_255_34,
    0.160_930_201_411_247_25,
    0.246_112_301_945_686_34,
    0.337_915_241_718_292_24,
    0.440_709_829_330_444_34,
    0.562_617_003_917_694_1,
    0.722_956_836_223_602_3,
    1.0,
];

/// ggml's `kvalues_iq4nl`.
pub const KVALUES_IQ4NL: [i8; 16] = [
    -127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113,
];

/// The fixed reduction order of the 8 lanes (see the module comment).
#[inline(always)]
pub fn hsum8(a: &[f32; LANES]) -> f32 {
    let s = [a[0] + a[4], a[1] + a[5], a[2] + a[6], a[3] + a[7]];
    (s[0] + s[2]) + (s[1] + s[3])
}

/// The fixed reduction of the f32-activation formats' 64 lanes: fold to 16, then to 8 (see the
/// module comment), then `hsum8`.
#[inline(always)]
pub fn hsum64(a: &[f32; WIDE]) -> f32 {
    let mut s = [0.0f32; 16];
    for l in 0..16 {
        s[l] = (a[l] + a[l + 16]) + (a[l + 32] + a[l + 48]);
    }
    let mut t = [0.0f32; LANES];
    for l in 0..LANES {
        t[l] = s[l] + s[l + 8];
    }
    hsum8(&t)
}

// ---------------------------------------------------------------- activation quantization

/// ggml's `quantize_row_q8_0_ref` (the legacy quantizer of q8_0 weights, reused).
pub fn quantize_row_q8_0(x: &[f32], out: &mut [BlockQ8_0]) {
    legacy::quantize_row_q8_0_ref(x, bytemuck::cast_slice_mut(out));
}

/// ggml's `nearest_int` without its debug assertion: the same bits for |x| < 2^22, and a
/// defined (if meaningless) value otherwise, so hostile activations cannot panic a debug build.
#[inline(always)]
fn nearest_int_unchecked(fval: f32) -> i32 {
    let val = fval + 12_582_912.0;
    ((val.to_bits() & 0x007f_ffff) as i32) - 0x0040_0000
}

/// ggml's `quantize_row_q8_K_ref`: per block of 256, `iscale = -127/max` (max = the signed value
/// of largest magnitude, first one on ties), `q = min(127, nearest_int(iscale*x))`, `d = 1/iscale`,
/// `bsums[j]` = sum of the 16 quants of group j. An all-zero block gets d = 0 and zero quants.
pub fn quantize_row_q8_k(x: &[f32], out: &mut [BlockQ8K]) {
    for (b, x) in out.iter_mut().zip(x.chunks_exact(QK_K)) {
        let (mut max, mut amax) = (0.0f32, 0.0f32);
        for &v in x {
            if v.abs() > amax {
                amax = v.abs();
                max = v;
            }
        }
        if amax == 0.0 {
            *b = BlockQ8K::zeroed();
            continue;
        }
        let iscale = -127.0f32 / max;
        for (q, &v) in b.qs.iter_mut().zip(x) {
            *q = nearest_int_unchecked(iscale * v).min(127) as i8;
        }
        for (s, g) in b.bsums.iter_mut().zip(b.qs.chunks_exact(16)) {
            *s = g.iter().map(|&q| q as i16).sum();
        }
        b.d = 1.0 / iscale;
    }
}

// ---------------------------------------------------------------- 32-weight blocks, q8_0 x

/// The 32 signed weights of a q4_0 block in element order (low nibbles are elements 0..15).
#[inline(always)]
pub fn unpack_q4_0(w: &BlockQ4_0) -> [i8; 32] {
    let mut q = [0i8; 32];
    for j in 0..16 {
        q[j] = (w.qs[j] & 0x0f) as i8 - 8;
        q[j + 16] = (w.qs[j] >> 4) as i8 - 8;
    }
    q
}

#[inline(always)]
pub fn unpack_iq4_nl(w: &BlockIQ4NL) -> [i8; 32] {
    let mut q = [0i8; 32];
    for j in 0..16 {
        q[j] = KVALUES_IQ4NL[(w.qs[j] & 0x0f) as usize];
        q[j + 16] = KVALUES_IQ4NL[(w.qs[j] >> 4) as usize];
    }
    q
}

/// q5_0's 32 levels minus 16 (ggml's `dequantize_row_q5_0` without the scale).
pub fn unpack_q5_0(w: &BlockQ5_0) -> [i8; 32] {
    let qh = u32::from_le_bytes(w.qh);
    let mut q = [0i8; 32];
    for j in 0..16 {
        let h0 = (((qh >> j) << 4) & 0x10) as u8;
        let h1 = ((qh >> (j + 12)) & 0x10) as u8;
        q[j] = ((w.qs[j] & 0x0f) | h0) as i8 - 16;
        q[j + 16] = ((w.qs[j] >> 4) | h1) as i8 - 16;
    }
    q
}

#[inline(always)]
pub fn isum32(w: &[i8; 32], x: &[i8; 32]) -> i32 {
    w.iter().zip(x).map(|(&a, &b)| a as i32 * b as i32).sum()
}

/// A weight block of 32 with an f16 scale and an exact integer dot with a q8_0 block (for
/// q4_1 / q5_1 the activation block is q8_1's, whose d and quants are q8_0's).
pub trait Block32: Pod {
    fn d(&self) -> Half;
    fn isum(&self, x: &BlockQ8_0) -> i32;
    /// q4_1 / q5_1: the weights are `d·q + m` with unsigned q (`dot_block32_min`).
    const HAS_MIN: bool = false;
    /// The block's offset `m` (zero where there is none).
    fn m(&self) -> Half {
        [0; 2]
    }
}

impl Block32 for BlockQ4_0 {
    fn d(&self) -> Half {
        self.d
    }
    fn isum(&self, x: &BlockQ8_0) -> i32 {
        isum32(&unpack_q4_0(self), &x.qs)
    }
}

impl Block32 for BlockQ8_0 {
    fn d(&self) -> Half {
        self.d
    }
    fn isum(&self, x: &BlockQ8_0) -> i32 {
        isum32(&self.qs, &x.qs)
    }
}

impl Block32 for BlockQ5_0 {
    fn d(&self) -> Half {
        self.d
    }
    fn isum(&self, x: &BlockQ8_0) -> i32 {
        isum32(&unpack_q5_0(self), &x.qs)
    }
}

impl Block32 for BlockIQ4NL {
    fn d(&self) -> Half {
        self.d
    }
    fn isum(&self, x: &BlockQ8_0) -> i32 {
        isum32(&unpack_iq4_nl(self), &x.qs)
    }
}

/// The float product of block `b`: `(d_w * d_x) * isum` (d_x = the activation block's f16 scale
/// as f32, passed in as `xd`).
#[inline(always)]
pub fn block32_product<W: Block32>(w: &W, x: &BlockQ8_0, xd: f32) -> f32 {
    (f16_to_f32(w.d()) * xd) * w.isum(x) as f32
}

/// Σ over blocks of `(d_w d_x) isum_b`, lane-wise (block b in lane b % 8).
pub fn dot_block32<W: Block32>(w: &[W], x: &[BlockQ8_0], xd: &[f32]) -> f32 {
    let mut acc = [0.0f32; LANES];
    for (b, ((w, x), &xd)) in w.iter().zip(x).zip(xd).enumerate() {
        acc[b % LANES] += block32_product(w, x, xd);
    }
    hsum8(&acc)
}

// ---------------------------------------------------------------- K-quants, q8_K x

/// ggml's `get_scale_min_k4`: the 6-bit scale and min of sub-block `j` (0..8), widened.
#[inline(always)]
pub fn scale_min_k4(j: usize, q: &[u8; K_SCALE_SIZE]) -> (i32, i32) {
    let (sc, m) = crate::formats::k_quants::common::get_scale_min_k4(j, q);
    (sc as i32, m as i32)
}

/// The 8 scales and 8 mins of a q4_K/q5_K block at once, with ggml's word-wide bit shuffling
/// (what its SIMD kernels do; the same values as `scale_min_k4` for every j: tested). Shared by
/// the x86 and NEON kernels.
#[inline(always)]
pub fn unpack_scales_k4(q: &[u8; K_SCALE_SIZE]) -> ([u8; 8], [u8; 8]) {
    const KMASK1: u32 = 0x3f3f_3f3f;
    const KMASK2: u32 = 0x0f0f_0f0f;
    const KMASK3: u32 = 0x0303_0303;
    let u = |i: usize| u32::from_le_bytes([q[4 * i], q[4 * i + 1], q[4 * i + 2], q[4 * i + 3]]);
    let (u0, u1, u2) = (u(0), u(1), u(2));
    let sc = [u0 & KMASK1, (u2 & KMASK2) | (((u0 >> 6) & KMASK3) << 4)];
    let m = [
        u1 & KMASK1,
        ((u2 >> 4) & KMASK2) | (((u1 >> 6) & KMASK3) << 4),
    ];
    let bytes = |w: [u32; 2]| {
        let mut b = [0u8; 8];
        b[..4].copy_from_slice(&w[0].to_le_bytes());
        b[4..].copy_from_slice(&w[1].to_le_bytes());
        b
    };
    (bytes(sc), bytes(m))
}

/// Σ_s min_s · (Σ of the 32 activation quants of sub-block s), from the bsums.
#[inline(always)]
pub fn min_sum_k4(scales: &[u8; K_SCALE_SIZE], x: &BlockQ8K) -> i32 {
    (0..8)
        .map(|s| scale_min_k4(s, scales).1 * (x.bsums[2 * s] as i32 + x.bsums[2 * s + 1] as i32))
        .sum()
}

/// The unsigned quants of a q4_K block in element order (chunk j of 64: low nibbles of
/// qs[32j..32j+32] are elements 64j..64j+32, high nibbles the next 32).
pub fn unpack_q4_k(w: &BlockQ4K) -> [u8; QK_K] {
    let mut q = [0u8; QK_K];
    for j in 0..4 {
        for l in 0..32 {
            q[64 * j + l] = w.qs[32 * j + l] & 0x0f;
            q[64 * j + 32 + l] = w.qs[32 * j + l] >> 4;
        }
    }
    q
}

/// q5_K: the q4_K nibbles plus bit s of qh[l] as bit 4 of element 32s + l.
pub fn unpack_q5_k(w: &BlockQ5K) -> [u8; QK_K] {
    let mut q = [0u8; QK_K];
    for j in 0..4 {
        for l in 0..32 {
            q[64 * j + l] = w.qs[32 * j + l] & 0x0f;
            q[64 * j + 32 + l] = w.qs[32 * j + l] >> 4;
        }
    }
    for s in 0..8 {
        for l in 0..32 {
            q[32 * s + l] |= ((w.qh[l] >> s) & 1) << 4;
        }
    }
    q
}

/// q6_K: unsigned 6-bit quants (0..63; the weight is q - 32) in element order. In each half h
/// of 128: element 128h + 32k + l takes its low 4 bits from ql[64h + l + 32(k%2)] (low nibble for
/// k < 2, high nibble otherwise) and its top 2 bits from bits 2k..2k+1 of qh[32h + l].
pub fn unpack_q6_k(w: &BlockQ6K) -> [u8; QK_K] {
    let mut q = [0u8; QK_K];
    for h in 0..2 {
        for l in 0..32 {
            let (ql0, ql1, qh) = (w.ql[64 * h + l], w.ql[64 * h + l + 32], w.qh[32 * h + l]);
            q[128 * h + l] = (ql0 & 0x0f) | ((qh & 3) << 4);
            q[128 * h + 32 + l] = (ql1 & 0x0f) | (((qh >> 2) & 3) << 4);
            q[128 * h + 64 + l] = (ql0 >> 4) | (((qh >> 4) & 3) << 4);
            q[128 * h + 96 + l] = (ql1 >> 4) | (((qh >> 6) & 3) << 4);
        }
    }
    q
}

/// Σ_s scale_s · Σ_{e in sub-block s} q_e x_e over the 8 sub-blocks of 32 (q4_K, q5_K).
fn isum_k4(q: &[u8; QK_K], scales: &[u8; K_SCALE_SIZE], x: &BlockQ8K) -> i32 {
    (0..8)
        .map(|s| {
            let dot: i32 = (32 * s..32 * s + 32)
                .map(|e| q[e] as i32 * x.qs[e] as i32)
                .sum();
            scale_min_k4(s, scales).0 * dot
        })
        .sum()
}

/// The exact integer parts of a K-quant super-block: (Σ scale·q·x, Σ min·bsum).
pub trait BlockK: Pod {
    fn sums(&self, x: &BlockQ8K) -> (i32, i32);
    /// f16 super-block scale and min (min is zero for q6_K, which has none).
    fn d_dmin(&self) -> (f32, f32);
}

impl BlockK for BlockQ4K {
    fn sums(&self, x: &BlockQ8K) -> (i32, i32) {
        (
            isum_k4(&unpack_q4_k(self), &self.scales, x),
            min_sum_k4(&self.scales, x),
        )
    }
    fn d_dmin(&self) -> (f32, f32) {
        (f16_to_f32(self.d), f16_to_f32(self.dmin))
    }
}

impl BlockK for BlockQ5K {
    fn sums(&self, x: &BlockQ8K) -> (i32, i32) {
        (
            isum_k4(&unpack_q5_k(self), &self.scales, x),
            min_sum_k4(&self.scales, x),
        )
    }
    fn d_dmin(&self) -> (f32, f32) {
        (f16_to_f32(self.d), f16_to_f32(self.dmin))
    }
}

impl BlockK for BlockQ6K {
    /// Σ_g scale_g · Σ_{e in group g of 16} (q_e - 32) x_e.
    fn sums(&self, x: &BlockQ8K) -> (i32, i32) {
        let q = unpack_q6_k(self);
        let isum = (0..16)
            .map(|g| {
                let dot: i32 = (16 * g..16 * g + 16)
                    .map(|e| (q[e] as i32 - 32) * x.qs[e] as i32)
                    .sum();
                self.scales[g] as i32 * dot
            })
            .sum();
        (isum, 0)
    }
    fn d_dmin(&self) -> (f32, f32) {
        (f16_to_f32(self.d), 0.0)
    }
}

/// The float product of one super-block from its integer sums:
/// `(d_w d_x) isum - (dmin_w d_x) msum` (q6_K has no min: dmin = 0 and msum = 0, and
/// `p - 0.0 == p`, so this is ggml's `d * isum` there).
#[inline(always)]
pub fn block_k_product(d: f32, dmin: f32, xd: f32, isum: i32, msum: i32) -> f32 {
    (d * xd) * isum as f32 - (dmin * xd) * msum as f32
}

/// Σ over super-blocks, lane-wise (super-block b in lane b % 8).
pub fn dot_block_k<W: BlockK>(w: &[W], x: &[BlockQ8K]) -> f32 {
    let mut acc = [0.0f32; LANES];
    for (b, (w, x)) in w.iter().zip(x).enumerate() {
        let (isum, msum) = w.sums(x);
        let (d, dmin) = w.d_dmin();
        acc[b % LANES] += block_k_product(d, dmin, x.d, isum, msum);
    }
    hsum8(&acc)
}

// ---------------------------------------------------------------- f32 activations

/// Element `j` of a bitsandbytes-packed 4-bit row: element 2j in the high nibble of byte j.
#[inline(always)]
pub fn nibble(packed: &[u8], j: usize) -> usize {
    let b = packed[j / 2];
    (if j.is_multiple_of(2) {
        b >> 4
    } else {
        b & 0x0f
    }) as usize
}

/// Σ_b scale_b Σ_{j in b} v_j x_j for one fp8 row (fp8_e4m3 = float8_e4m3fn, fp8_e5m2): each
/// byte decoded exactly through the format's 256-entry table (`fp8_table`); `block_len` is the
/// scale's block (the whole row for per-row and per-tensor scales).
pub fn dot_fp8(q: &[u8], scales: &[f32], block_len: usize, x: &[f32], e5m2: bool) -> f32 {
    let t = fp8_table(e5m2);
    dot_bytes(q, scales, block_len, x, |w| t[w as usize])
}

/// The float32 value of every fp8 byte (the exact decoders of `formats::fp8`; the e4m3fn NaN
/// codes 0x7f / 0xff and e5m2's infinities and NaNs included).
pub fn fp8_table(e5m2: bool) -> &'static [f32; 256] {
    use std::sync::OnceLock;
    static E4M3: OnceLock<[f32; 256]> = OnceLock::new();
    static E5M2: OnceLock<[f32; 256]> = OnceLock::new();
    if e5m2 {
        E5M2.get_or_init(|| std::array::from_fn(|b| fp8::e5m2_to_f32(b as u8)))
    } else {
        E4M3.get_or_init(|| std::array::from_fn(|b| fp8::e4m3fn_to_f32(b as u8)))
    }
}

/// The one-byte formats' dot: per block `part[i % 64] = fma(v(q_i), x_i, part[i % 64])`, then
/// `acc[l] = fma(part[l], scale, acc[l])` on the lanes the block touched.
#[inline(always)]
pub fn dot_bytes(
    q: &[u8],
    scales: &[f32],
    block_len: usize,
    x: &[f32],
    value: impl Fn(u8) -> f32,
) -> f32 {
    let mut acc = [0.0f32; WIDE];
    for (b, ((&s, qb), xb)) in scales
        .iter()
        .zip(q.chunks(block_len))
        .zip(x.chunks(block_len))
        .enumerate()
    {
        let mut part = [0.0f32; WIDE];
        let at = b * block_len;
        for (j, (&w, &xv)) in qb.iter().zip(xb).enumerate() {
            let l = (at + j) % WIDE;
            part[l] = value(w).mul_add(xv, part[l]);
        }
        for j in 0..qb.len().min(WIDE) {
            let l = (at + j) % WIDE;
            acc[l] = part[l].mul_add(s, acc[l]);
        }
    }
    hsum64(&acc)
}
