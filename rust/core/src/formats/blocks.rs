//! ggml block layouts, defined once (ggml-common.h). Every field is a byte array so the structs
//! have alignment 1 and can be viewed in place over any byte buffer (bytemuck checks this at
//! compile time). The CUDA headers repeat these sizes with static_asserts.

use bytemuck::{Pod, Zeroable};

pub const QK4_0: usize = 32;
pub const QK4_1: usize = 32;
pub const QK5_0: usize = 32;
pub const QK5_1: usize = 32;
pub const QK8_0: usize = 32;
pub const QK4_NL: usize = 32;
pub const QK_K: usize = 256;
pub const K_SCALE_SIZE: usize = 12;

/// An IEEE half stored little-endian, as ggml_half.
pub type Half = [u8; 2];

#[repr(C)]
#[derive(Clone, Copy, Debug, Pod, Zeroable)]
pub struct BlockQ4_0 {
    pub d: Half,
    pub qs: [u8; QK4_0 / 2],
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Pod, Zeroable)]
pub struct BlockQ4_1 {
    pub d: Half,
    pub m: Half,
    pub qs: [u8; QK4_1 / 2],
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Pod, Zeroable)]
pub struct BlockQ5_0 {
    pub d: Half,
    pub qh: [u8; 4],
    pub qs: [u8; QK5_0 / 2],
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Pod, Zeroable)]
pub struct BlockQ5_1 {
    pub d: Half,
    pub m: Half,
    pub qh: [u8; 4],
    pub qs: [u8; QK5_1 / 2],
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Pod, Zeroable)]
pub struct BlockQ8_0 {
    pub d: Half,
    pub qs: [i8; QK8_0],
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Pod, Zeroable)]
pub struct BlockQ2K {
    pub scales: [u8; QK_K / 16],
    pub qs: [u8; QK_K / 4],
    pub d: Half,
    pub dmin: Half,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Pod, Zeroable)]
pub struct BlockQ3K {
    pub hmask: [u8; QK_K / 8],
    pub qs: [u8; QK_K / 4],
    pub scales: [u8; 12],
    pub d: Half,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Pod, Zeroable)]
pub struct BlockQ4K {
    pub d: Half,
    pub dmin: Half,
    pub scales: [u8; K_SCALE_SIZE],
    pub qs: [u8; QK_K / 2],
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Pod, Zeroable)]
pub struct BlockQ5K {
    pub d: Half,
    pub dmin: Half,
    pub scales: [u8; K_SCALE_SIZE],
    pub qh: [u8; QK_K / 8],
    pub qs: [u8; QK_K / 2],
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Pod, Zeroable)]
pub struct BlockQ6K {
    pub ql: [u8; QK_K / 2],
    pub qh: [u8; QK_K / 4],
    pub scales: [i8; QK_K / 16],
    pub d: Half,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Pod, Zeroable)]
pub struct BlockIQ4NL {
    pub d: Half,
    pub qs: [u8; QK4_NL / 2],
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Pod, Zeroable)]
pub struct BlockIQ4XS {
    pub d: Half,
    pub scales_h: [u8; 2],
    pub scales_l: [u8; QK_K / 64],
    pub qs: [u8; QK_K / 2],
}

/// ggml's `block_tq1_0` (BitNet b1.58 ternary, 1.6875 bits a weight): 240 weights as base-3
/// digits, five a byte in `qs`, the last 16 four a byte in `qh`, then the f16 scale.
#[repr(C)]
#[derive(Clone, Copy, Debug, Pod, Zeroable)]
pub struct BlockTQ1_0 {
    pub qs: [u8; (QK_K - 4 * QK_K / 64) / 5],
    pub qh: [u8; QK_K / 64],
    pub d: Half,
}

/// ggml's `block_tq2_0` (ternary, 2.0625 bits a weight): four 2-bit values (q + 1) a byte,
/// then the f16 scale.
#[repr(C)]
#[derive(Clone, Copy, Debug, Pod, Zeroable)]
pub struct BlockTQ2_0 {
    pub qs: [u8; QK_K / 4],
    pub d: Half,
}

const _: () = assert!(std::mem::size_of::<BlockQ4_0>() == 18);
const _: () = assert!(std::mem::size_of::<BlockTQ1_0>() == 54);
const _: () = assert!(std::mem::size_of::<BlockTQ2_0>() == 66);
const _: () = assert!(std::mem::size_of::<BlockQ4_1>() == 20);
const _: () = assert!(std::mem::size_of::<BlockQ5_0>() == 22);
const _: () = assert!(std::mem::size_of::<BlockQ5_1>() == 24);
const _: () = assert!(std::mem::size_of::<BlockQ8_0>() == 34);
const _: () = assert!(std::mem::size_of::<BlockQ2K>() == 84);
const _: () = assert!(std::mem::size_of::<BlockQ3K>() == 110);
const _: () = assert!(std::mem::size_of::<BlockQ4K>() == 144);
const _: () = assert!(std::mem::size_of::<BlockQ5K>() == 176);
const _: () = assert!(std::mem::size_of::<BlockQ6K>() == 210);
const _: () = assert!(std::mem::size_of::<BlockIQ4NL>() == 18);
const _: () = assert!(std::mem::size_of::<BlockIQ4XS>() == 136);

/// (name, size in bytes) of every block struct, for the test that compares them with the CUDA
/// headers.
pub const BLOCK_SIZES: [(&str, usize); 12] = [
    ("block_q4_0", std::mem::size_of::<BlockQ4_0>()),
    ("block_q4_1", std::mem::size_of::<BlockQ4_1>()),
    ("block_q5_0", std::mem::size_of::<BlockQ5_0>()),
    ("block_q5_1", std::mem::size_of::<BlockQ5_1>()),
    ("block_q8_0", std::mem::size_of::<BlockQ8_0>()),
    ("block_q2_K", std::mem::size_of::<BlockQ2K>()),
    ("block_q3_K", std::mem::size_of::<BlockQ3K>()),
    ("block_q4_K", std::mem::size_of::<BlockQ4K>()),
    ("block_q5_K", std::mem::size_of::<BlockQ5K>()),
    ("block_q6_K", std::mem::size_of::<BlockQ6K>()),
    ("block_iq4_nl", std::mem::size_of::<BlockIQ4NL>()),
    ("block_iq4_xs", std::mem::size_of::<BlockIQ4XS>()),
];

/// f32 -> ggml_half, round to nearest even (what F16C's `_cvtss_sh(x, 0)` and ggml's scalar
/// fallback do).
#[inline]
pub fn f16_from_f32(x: f32) -> Half {
    half::f16::from_f32(x).to_le_bytes()
}

#[inline]
pub fn f16_to_f32(h: Half) -> f32 {
    half::f16::from_le_bytes(h).to_f32()
}

/// ggml's `nearest_int`: round half to even through the 1.5*2^23 trick. ggml only `assert`s
/// |x| <= 2^22 - 1, which release builds compile out; for larger, infinite or NaN values the
/// trick returns a deterministic wrong integer (0 for NaN, -2^22 for an infinity) that callers
/// then clamp. This keeps that release behaviour (no assertion), so every build agrees with
/// libggml on every input.
#[inline(always)]
pub fn nearest_int(fval: f32) -> i32 {
    let val = fval + 12_582_912.0;
    ((val.to_bits() & 0x007f_ffff) as i32) - 0x0040_0000
}

/// Where each ggml block keeps its quantized values: (qtype, byte offset, byte length) of the one
/// contiguous run of quant fields (qs, and qh / hmask / ql where the format has them); the rest
/// of the block is scales. The CUDA path stores the two apart (`ferroquant.cuda.qmatmul`'s split
/// layout) and takes these spans from here rather than from a table of its own.
pub const QUANT_SPANS: [(&str, usize, usize); 12] = [
    ("q4_0", std::mem::offset_of!(BlockQ4_0, qs), QK4_0 / 2),
    ("q4_1", std::mem::offset_of!(BlockQ4_1, qs), QK4_1 / 2),
    ("q5_0", std::mem::offset_of!(BlockQ5_0, qh), 4 + QK5_0 / 2),
    ("q5_1", std::mem::offset_of!(BlockQ5_1, qh), 4 + QK5_1 / 2),
    ("q8_0", std::mem::offset_of!(BlockQ8_0, qs), QK8_0),
    ("q2_k", std::mem::offset_of!(BlockQ2K, qs), QK_K / 4),
    (
        "q3_k",
        std::mem::offset_of!(BlockQ3K, hmask),
        QK_K / 8 + QK_K / 4,
    ),
    ("q4_k", std::mem::offset_of!(BlockQ4K, qs), QK_K / 2),
    (
        "q5_k",
        std::mem::offset_of!(BlockQ5K, qh),
        QK_K / 8 + QK_K / 2,
    ),
    (
        "q6_k",
        std::mem::offset_of!(BlockQ6K, ql),
        QK_K / 2 + QK_K / 4,
    ),
    ("iq4_nl", std::mem::offset_of!(BlockIQ4NL, qs), QK4_NL / 2),
    ("iq4_xs", std::mem::offset_of!(BlockIQ4XS, qs), QK_K / 2),
];

// The multi-field spans above are contiguous: each second field starts where the first ends.
const _: () =
    assert!(std::mem::offset_of!(BlockQ5_0, qs) == std::mem::offset_of!(BlockQ5_0, qh) + 4);
const _: () =
    assert!(std::mem::offset_of!(BlockQ5_1, qs) == std::mem::offset_of!(BlockQ5_1, qh) + 4);
const _: () =
    assert!(std::mem::offset_of!(BlockQ3K, qs) == std::mem::offset_of!(BlockQ3K, hmask) + QK_K / 8);
const _: () =
    assert!(std::mem::offset_of!(BlockQ5K, qs) == std::mem::offset_of!(BlockQ5K, qh) + QK_K / 8);
const _: () =
    assert!(std::mem::offset_of!(BlockQ6K, qh) == std::mem::offset_of!(BlockQ6K, ql) + QK_K / 2);
