//! The block codecs of the cache types (docs/kv.md): 32 f32 values (KIVI: KIVI_GROUP) -> one
//! block and back. The
//! ggml types call ferroquant's q8_0 / q4_0 reference quantizers and fp8_e4m3 its fp8 cast, so
//! the bytes are those formats' bytes; KIVI's asymmetric blocks are defined here.

use crate::formats::blocks::{f16_from_f32, f16_to_f32};
use crate::formats::fp8;
use crate::formats::legacy::{quantize_row_q4_0_ref, quantize_row_q8_0_ref};
use crate::qtype::QType;

use super::types::{KvType, GROUP, KIVI_GROUP};

/// Encode `x` (a multiple of `t.block_len()` values, one token's row or a KIVI key group) as
/// `t`'s blocks.
pub fn encode(t: KvType, x: &[f32], out: &mut [u8]) {
    let bb = t.block_bytes();
    debug_assert_eq!(out.len(), x.len() / t.block_len() * bb);
    match t {
        KvType::F32 => {
            for (o, v) in out.chunks_exact_mut(4).zip(x) {
                o.copy_from_slice(&v.to_le_bytes());
            }
        }
        KvType::F16 => {
            for (o, &v) in out.chunks_exact_mut(2).zip(x) {
                o.copy_from_slice(&f16_from_f32(v));
            }
        }
        KvType::Q8_0 => quantize_row_q8_0_ref(x, out),
        KvType::Q4_0 => quantize_row_q4_0_ref(x, out),
        KvType::Fp8E4m3 => {
            for (o, x) in out.chunks_exact_mut(bb).zip(x.chunks_exact(GROUP)) {
                let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
                let scale = fp8::scale_of(QType::Fp8E4M3, amax);
                for (q, &v) in o[..GROUP].iter_mut().zip(x) {
                    *q = fp8::quantize_value(QType::Fp8E4M3, v, scale);
                }
                o[GROUP..].copy_from_slice(&scale.to_le_bytes());
            }
        }
        KvType::Int4 | KvType::Int2 => {
            let bits = t.kivi_bits().unwrap_or(4);
            for (o, x) in out.chunks_exact_mut(bb).zip(x.chunks_exact(KIVI_GROUP)) {
                kivi_encode(bits, x, o);
            }
        }
    }
}

/// One KIVI block of KIVI_GROUP values: `scale16 = f16(min((max - min) / (2^b - 1), 65504))`,
/// `zero16 = f16(clamp(min, -65504, 65504) + 0.0)`, then
/// `q = clamp(round_half_even((x - z) / s), 0, 2^b - 1)` in f32 with s, z the f16 values (q = 0
/// when s == 0); packed as docs/kv.md says, then scale16 and zero16.
/// The largest finite f16.
const F16_MAX: f32 = 65504.0;

pub fn kivi_encode(bits: u32, x: &[f32], out: &mut [u8]) {
    let (q, s16, z16) = kivi_quantize(bits, x);
    let packed = pack_len(bits);
    out[..packed].fill(0);
    for (i, &qi) in q.iter().enumerate() {
        out[i % packed] |= qi << (bits as usize * (i / packed));
    }
    out[packed..packed + 2].copy_from_slice(&s16);
    out[packed + 2..packed + 4].copy_from_slice(&z16);
}

/// The codes, f16 scale and f16 zero of one KIVI block (kivi_encode's numbers, unpacked; the
/// runtime's pages place them as kivi.rs's tiles).
pub fn kivi_quantize(bits: u32, x: &[f32]) -> ([u8; KIVI_GROUP], [u8; 2], [u8; 2]) {
    let levels = ((1u32 << bits) - 1) as f32;
    let (mut min, mut max) = (f32::INFINITY, f32::NEG_INFINITY);
    for &v in x {
        min = min.min(v);
        max = max.max(v);
    }
    // Clamped to the f16 range so scale and zero stay finite (as the transformers cache does);
    // `+ 0.0` makes a -0.0 minimum +0.0, whichever zero a min() picks.
    let scale = ((max - min) / levels).min(F16_MAX);
    let zero = min.clamp(-F16_MAX, F16_MAX) + 0.0;
    let (s16, z16) = (f16_from_f32(scale), f16_from_f32(zero));
    let (s, z) = (f16_to_f32(s16), f16_to_f32(z16));
    let mut q = [0u8; KIVI_GROUP];
    if s != 0.0 {
        for (q, &v) in q.iter_mut().zip(x) {
            // max(0) also maps NaN to 0; `as u8` of a value in 0..=levels is exact.
            *q = ((v - z) / s).round_ties_even().max(0.0).min(levels) as u8;
        }
    }
    (q, s16, z16)
}

/// Packed bytes of a KIVI block (32 for 4 bits, 16 for 2).
pub const fn pack_len(bits: u32) -> usize {
    KIVI_GROUP * bits as usize / 8
}

/// The KIVI_GROUP integers, the scale and the zero of a KIVI block.
#[inline(always)]
pub fn kivi_decode(bits: u32, blk: &[u8]) -> ([u8; KIVI_GROUP], f32, f32) {
    // Constant widths, so the unpacking compiles to shifts and masks of whole vectors.
    if bits == 2 {
        kivi_decode_n::<2>(blk)
    } else {
        kivi_decode_n::<4>(blk)
    }
}

#[inline(always)]
fn kivi_decode_n<const BITS: usize>(blk: &[u8]) -> ([u8; KIVI_GROUP], f32, f32) {
    let packed = KIVI_GROUP * BITS / 8;
    let mask = ((1u16 << BITS) - 1) as u8;
    let mut q = [0u8; KIVI_GROUP];
    let bytes = &blk[..packed];
    for (i, qi) in q.iter_mut().enumerate() {
        *qi = (bytes[i % packed] >> (BITS * (i / packed))) & mask;
    }
    let s = f16_to_f32([blk[packed], blk[packed + 1]]);
    let z = f16_to_f32([blk[packed + 2], blk[packed + 3]]);
    (q, s, z)
}

/// The signed 4-bit values of a q4_0 block (`nibble - 8`, element i of byte i low, i+16 high).
#[inline(always)]
pub fn q4_0_values(qs: &[u8]) -> [i8; GROUP] {
    let mut q = [0i8; GROUP];
    for i in 0..GROUP / 2 {
        q[i] = (qs[i] & 0x0f) as i8 - 8;
        q[i + GROUP / 2] = (qs[i] >> 4) as i8 - 8;
    }
    q
}

/// float8_e4m3fn -> f32 for every byte (the cast is exact; a table keeps it out of the loops).
pub fn fp8_table() -> &'static [f32; 256] {
    static TABLE: std::sync::OnceLock<[f32; 256]> = std::sync::OnceLock::new();
    TABLE.get_or_init(|| std::array::from_fn(|b| fp8::e4m3fn_to_f32(b as u8)))
}

/// Dequantize one block of `t.block_len()` values (what the attention's arithmetic reads, as plain f32; for
/// tests and for looking at a cache, never used by the attention itself).
pub fn decode(t: KvType, blk: &[u8], out: &mut [f32]) {
    match t {
        KvType::F32 => {
            for (o, b) in out.iter_mut().zip(blk.chunks_exact(4)) {
                *o = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
            }
        }
        KvType::F16 => {
            for (o, b) in out.iter_mut().zip(blk.chunks_exact(2)) {
                *o = f16_to_f32([b[0], b[1]]);
            }
        }
        KvType::Q8_0 => {
            let d = f16_to_f32([blk[0], blk[1]]);
            for (o, &q) in out.iter_mut().zip(&blk[2..34]) {
                *o = q as i8 as f32 * d;
            }
        }
        KvType::Q4_0 => {
            let d = f16_to_f32([blk[0], blk[1]]);
            for (o, q) in out.iter_mut().zip(q4_0_values(&blk[2..18])) {
                *o = q as f32 * d;
            }
        }
        KvType::Fp8E4m3 => {
            let s = f32::from_le_bytes([blk[32], blk[33], blk[34], blk[35]]);
            for (o, &q) in out.iter_mut().zip(&blk[..32]) {
                *o = fp8_table()[q as usize] * s;
            }
        }
        KvType::Int4 | KvType::Int2 => {
            let (q, s, z) = kivi_decode(t.kivi_bits().unwrap_or(4), blk);
            for (o, q) in out.iter_mut().zip(q) {
                *o = q as f32 * s + z;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kivi_round_trip_is_within_half_a_step() {
        for bits in [4u32, 2] {
            let x: Vec<f32> = (0..KIVI_GROUP)
                .map(|i| ((i * 37 % 19) as f32 - 9.0) * 0.37)
                .collect();
            let mut b = vec![0u8; pack_len(bits) + 4];
            kivi_encode(bits, &x, &mut b);
            let (q, s, z) = kivi_decode(bits, &b);
            assert!(q.iter().all(|&v| (v as u32) < (1 << bits)));
            for (&xi, &qi) in x.iter().zip(&q) {
                let back = qi as f32 * s + z;
                // half a step, plus the f16 rounding of the zero and the scale's error over 2^b-1 steps
                let tol = 0.5 * s + (z.abs() + s * ((1 << bits) as f32)) * 1e-3;
                assert!((back - xi).abs() <= tol, "bits {bits}: {xi} -> {back}");
            }
        }
        // A constant group stores scale 0 and every q = 0.
        let mut b = vec![0u8; pack_len(4) + 4];
        kivi_encode(4, &[1.5; KIVI_GROUP], &mut b);
        let (q, s, z) = kivi_decode(4, &b);
        assert_eq!((q, s, z), ([0; KIVI_GROUP], 0.0, 1.5));
    }
}
