//! q8_0 and q4_0 quantizers written with NEON intrinsics (aarch64): the operations of
//! `legacy.rs`'s scalar references on 4 lanes at a time, so the bytes are identical (tested
//! against the references here, under qemu in CI).
//!
//! Lane-wise equivalences used:
//! - `amax`: a max-reduction of |x|; the order does not matter for finite inputs.
//! - q4_0's signed extreme is the first element whose |x| equals amax (ggml's first-wins scan):
//!   the smallest index among the lanes that compare equal.
//! - `roundf(v)` is `frinta` (round to nearest, ties away from zero): `vrndaq_f32`.
//! - `(int8_t)f`: for the finite, in-range values here (|q8_0 level| <= 127, q4_0 levels
//!   0..16 before the clamp) truncation to i32 (`vcvtq_s32_f32`) and narrowing give the same
//!   bytes. Blocks whose inverse scale is not finite (values near FLT_MIN) are handed to the
//!   scalar reference, as in `legacy_avx2.rs`.
//! - Products and sums are separate `fmul` / `fadd` (the references do not fuse).
//!
//! Safety: NEON is part of the baseline of every aarch64 target with std (asserted below), so
//! the intrinsics are sound to call here; loads and stores check their lengths.

#![cfg(target_arch = "aarch64")]

use std::arch::aarch64::*;

use super::blocks::*;
use super::legacy;

const _: () = assert!(cfg!(target_feature = "neon"));

/// The 32 values of a block in eight registers.
#[inline(always)]
fn load_block(xb: &[f32]) -> [float32x4_t; 8] {
    assert!(xb.len() >= 32);
    // SAFETY: NEON; the assert keeps all 32 reads inside `xb`; vld1q has no alignment needs.
    std::array::from_fn(|k| unsafe { vld1q_f32(xb.as_ptr().add(4 * k)) })
}

/// |x| of the 8 registers and their maximum.
#[inline(always)]
fn abs_max(v: &[float32x4_t; 8]) -> ([float32x4_t; 8], f32) {
    // SAFETY: NEON (module comment).
    unsafe {
        let a = v.map(|x| vabsq_f32(x));
        let m01 = vmaxq_f32(vmaxq_f32(a[0], a[1]), vmaxq_f32(a[2], a[3]));
        let m23 = vmaxq_f32(vmaxq_f32(a[4], a[5]), vmaxq_f32(a[6], a[7]));
        (a, vmaxvq_f32(vmaxq_f32(m01, m23)))
    }
}

/// Eight i32 registers (32 values in order) narrowed to 32 bytes, each value's low byte (the
/// values fit i8, so the saturating narrows change nothing).
#[inline(always)]
fn narrow32(q: &[int32x4_t; 8]) -> [int8x16_t; 2] {
    // SAFETY: NEON (module comment).
    unsafe {
        let h: [int16x8_t; 4] =
            std::array::from_fn(|i| vcombine_s16(vqmovn_s32(q[2 * i]), vqmovn_s32(q[2 * i + 1])));
        [
            vcombine_s8(vqmovn_s16(h[0]), vqmovn_s16(h[1])),
            vcombine_s8(vqmovn_s16(h[2]), vqmovn_s16(h[3])),
        ]
    }
}

/// NEON q8_0: identical bytes to `legacy::quantize_row_q8_0_ref`.
pub fn quantize_row_q8_0(x: &[f32], out: &mut [u8]) {
    let blocks: &mut [BlockQ8_0] = bytemuck::cast_slice_mut(out);
    for (b, xb) in blocks.iter_mut().zip(x.chunks_exact(QK8_0)) {
        let v = load_block(xb);
        let (_, amax) = abs_max(&v);
        let d = amax / 127.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        if !id.is_finite() {
            legacy::quantize_row_q8_0_ref(xb, bytemuck::bytes_of_mut(b));
            continue;
        }
        b.d = f16_from_f32(d);
        // SAFETY: NEON (module comment); qs is 32 bytes.
        unsafe {
            let vid = vdupq_n_f32(id);
            let q = v.map(|xi| vcvtq_s32_f32(vrndaq_f32(vmulq_f32(xi, vid))));
            let bytes = narrow32(&q);
            vst1q_s8(b.qs.as_mut_ptr(), bytes[0]);
            vst1q_s8(b.qs[16..].as_mut_ptr(), bytes[1]);
        }
    }
}

/// NEON q4_0: identical bytes to `legacy::quantize_row_q4_0_ref`.
pub fn quantize_row_q4_0(x: &[f32], out: &mut [u8]) {
    const LANE: [u32; 4] = [0, 1, 2, 3];
    let blocks: &mut [BlockQ4_0] = bytemuck::cast_slice_mut(out);
    for (b, xb) in blocks.iter_mut().zip(x.chunks_exact(QK4_0)) {
        let v = load_block(xb);
        let (a, amax) = abs_max(&v);
        let max = if amax > 0.0 {
            // SAFETY: NEON (module comment); LANE is 4 u32.
            let first = unsafe {
                let (am, lane) = (vdupq_n_f32(amax), vld1q_u32(LANE.as_ptr()));
                let mut first = vdupq_n_u32(32);
                for (k, ak) in a.iter().enumerate() {
                    let idx = vaddq_u32(lane, vdupq_n_u32(4 * k as u32));
                    let hit = vbslq_u32(vceqq_f32(*ak, am), idx, vdupq_n_u32(32));
                    first = vminq_u32(first, hit);
                }
                vminvq_u32(first)
            };
            xb[first as usize]
        } else {
            0.0
        };
        let d = max / -8.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        if !id.is_finite() {
            legacy::quantize_row_q4_0_ref(xb, bytemuck::bytes_of_mut(b));
            continue;
        }
        b.d = f16_from_f32(d);
        // SAFETY: NEON (module comment); qs is 16 bytes.
        unsafe {
            let (vid, bias, top) = (vdupq_n_f32(id), vdupq_n_f32(8.5), vdupq_n_s32(15));
            let l = v.map(|xi| vminq_s32(vcvtq_s32_f32(vaddq_f32(vmulq_f32(xi, vid), bias)), top));
            // levels 0..15: elements 0..15 in the low nibbles, 16..31 in the high ones
            let bytes = narrow32(&l);
            let (lo, hi) = (vreinterpretq_u8_s8(bytes[0]), vreinterpretq_u8_s8(bytes[1]));
            vst1q_u8(b.qs.as_mut_ptr(), vorrq_u8(lo, vshlq_n_u8::<4>(hi)));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed;
        (0..n)
            .map(|i| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                let u = ((s >> 40) as f32 / (1u64 << 24) as f32) - 0.5;
                match (i / 32) % 8 {
                    0 => 0.0,                     // all-zero block
                    1 => u * 1e-38,               // inverse scale overflows
                    2 => (u * 8.0).round() / 2.0, // ties and repeated extremes of both signs
                    3 => -0.0,
                    // amax 127, so q8_0's inverse scale is 1 and the others are exact halves
                    4 if i % 32 == 0 => 127.0,
                    4 => (u * 250.0).round() + 0.5,
                    5 => u * 1e30,
                    _ => u * 3.0,
                }
            })
            .collect()
    }

    #[test]
    fn neon_paths_equal_the_scalar_references() {
        for seed in 0..50 {
            let x = data(32 * 24, seed);
            let (mut a, mut b) = (vec![0u8; 24 * 34], vec![0u8; 24 * 34]);
            legacy::quantize_row_q8_0_ref(&x, &mut a);
            quantize_row_q8_0(&x, &mut b);
            assert_eq!(a, b, "q8_0 seed {seed}");
            let (mut a, mut b) = (vec![0u8; 24 * 18], vec![0u8; 24 * 18]);
            legacy::quantize_row_q4_0_ref(&x, &mut a);
            quantize_row_q4_0(&x, &mut b);
            assert_eq!(a, b, "q4_0 seed {seed}");
        }
    }

    /// Through the public dispatch (`ggml_quantize_row`), which takes these paths on aarch64
    /// unless FERROQUANT_FORCE_SCALAR is set.
    #[test]
    fn dispatch_uses_the_neon_quantizers() {
        use crate::qtype::QType;
        let x = data(32 * 16, 7);
        for (qtype, size) in [(QType::Q8_0, 34), (QType::Q4_0, 18)] {
            let (mut a, mut b) = (vec![0u8; 16 * size], vec![0u8; 16 * size]);
            super::super::ggml_quantize_row(qtype, &x, &mut a, None);
            super::super::ggml_quantize_row_scalar(qtype, &x, &mut b, None);
            assert_eq!(a, b, "{qtype:?}");
        }
        assert_eq!(
            super::super::legacy_neon(QType::Q8_0),
            !crate::cpu::force_scalar()
        );
    }
}
