//! NEON kernels of the f32-activation formats (nf4, int8): the reference's 64 lanes (see
//! `reference.rs`) as 16 registers of 4 f32, weights decoded in registers, fused multiply-adds
//! (`vfmaq_f32`, as the references fuse). Safety rules as in `neon.rs`.

use std::arch::aarch64::*;

use super::{load_f32, load_u8, store_f32};
use crate::matmul::reference::{self as r, WIDE};

/// Registers of 4 f32 holding the 64 lanes.
const REGS: usize = WIDE / 4;

/// The 64 lanes of 16 registers (register k = lanes 4k..4k+4).
#[inline(always)]
fn wide_lanes(v: &[float32x4_t; REGS]) -> [f32; WIDE] {
    let mut a = [0.0f32; WIDE];
    for (k, r) in v.iter().enumerate() {
        a[4 * k..4 * k + 4].copy_from_slice(&store_f32(*r));
    }
    a
}

/// The reference's fold of the 64 lanes: registers k, k+4, k+8, k+12 hold lanes l, l+16, l+32,
/// l+48 (l = 4k..4k+4), so `(a[l] + a[l+16]) + (a[l+32] + a[l+48])` is four register sums;
/// `s[l] + s[l+8]` pairs registers 0 + 2 and 1 + 3; then `hsum8`.
#[inline(always)]
fn hsum64(a: &[float32x4_t; REGS]) -> f32 {
    // SAFETY: NEON (see `neon.rs`).
    unsafe {
        let s: [float32x4_t; 4] = std::array::from_fn(|k| {
            vaddq_f32(vaddq_f32(a[k], a[k + 4]), vaddq_f32(a[k + 8], a[k + 12]))
        });
        let t0 = store_f32(vaddq_f32(s[0], s[2]));
        let t1 = store_f32(vaddq_f32(s[1], s[3]));
        r::hsum8(&[t0[0], t0[1], t0[2], t0[3], t1[0], t1[1], t1[2], t1[3]])
    }
}

/// The NF4 code as 4 byte planes: plane k holds byte k (little-endian) of each of the 16 f32.
fn nf4_planes() -> [uint8x16_t; 4] {
    let bytes = r::NF4_CODE.map(f32::to_le_bytes);
    std::array::from_fn(|k| {
        let plane: [u8; 16] = std::array::from_fn(|i| bytes[i][k]);
        load_u8(&plane)
    })
}

/// The 32 nf4 codes of 16 packed bytes in element order (element 2j is the high nibble of byte
/// j, 2j+1 the low nibble), as 8 registers: each plane looked up with `tbl`, then the bytes
/// interleaved back into f32 (the exact bits of `NF4_CODE`).
#[inline(always)]
fn nf4_decode32(planes: &[uint8x16_t; 4], wq: &[u8]) -> [float32x4_t; 8] {
    let q = load_u8(wq);
    // SAFETY: NEON (see `neon.rs`).
    unsafe {
        let (hi, lo) = (vshrq_n_u8::<4>(q), vandq_u8(q, vdupq_n_u8(0x0f)));
        let idx = [vzip1q_u8(hi, lo), vzip2q_u8(hi, lo)];
        let mut out = [vdupq_n_f32(0.0); 8];
        for (i, &ix) in idx.iter().enumerate() {
            let b: [uint8x16_t; 4] = std::array::from_fn(|k| vqtbl1q_u8(planes[k], ix));
            // 16-bit halves of elements 0..7 and 8..15 of this group of 16
            let lo16 = [vzip1q_u8(b[0], b[1]), vzip2q_u8(b[0], b[1])];
            let hi16 = [vzip1q_u8(b[2], b[3]), vzip2q_u8(b[2], b[3])];
            for h in 0..2 {
                let (l, t) = (vreinterpretq_u16_u8(lo16[h]), vreinterpretq_u16_u8(hi16[h]));
                out[4 * i + 2 * h] = vreinterpretq_f32_u16(vzip1q_u16(l, t));
                out[4 * i + 2 * h + 1] = vreinterpretq_f32_u16(vzip2q_u16(l, t));
            }
        }
        out
    }
}

/// `reference::dot_nf4` for R activation rows at once: 32 codes per step decoded once, times
/// absmax (the dequantized weights, the same f32 products as the reference's), then per row
/// `acc = fma(w, x, acc)` over the 8 registers of lanes 32h..32h+32.
///
/// # Safety
/// NEON must be available (`enabled`); `block_size` a multiple of 32,
/// `packed.len() * 2 == x[r].len()`, `absmax.len() * block_size == x[r].len()`.
#[target_feature(enable = "neon")]
pub unsafe fn dot_nf4<const R: usize>(
    packed: &[u8],
    absmax: &[f32],
    block_size: usize,
    x: [&[f32]; R],
) -> [f32; R] {
    debug_assert!(block_size.is_multiple_of(32));
    let planes = nf4_planes();
    let mut acc = [[vdupq_n_f32(0.0); REGS]; R];
    for (b, &s) in absmax.iter().enumerate() {
        let sv = vdupq_n_f32(s);
        let wb = &packed[b * block_size / 2..(b + 1) * block_size / 2];
        for (c, wq) in wb.chunks_exact(16).enumerate() {
            let code = nf4_decode32(&planes, wq);
            let w = code.map(|c| vmulq_f32(c, sv));
            let at = b * block_size + 32 * c;
            let h = 8 * ((at / 32) % 2);
            for r in 0..R {
                let xq = &x[r][at..at + 32];
                for k in 0..8 {
                    acc[r][h + k] = vfmaq_f32(acc[r][h + k], w[k], load_f32(&xq[4 * k..]));
                }
            }
        }
    }
    acc.map(|a| hsum64(&a))
}

/// `reference::dot_int8` for R activation rows at once: 32 weights per step converted once
/// (sign-extended, exactly to f32), per row `part = fma(q, x, part)` into lanes `i % 64`, the
/// block's tail on the same lanes in scalar code, then `acc = fma(part, scale, acc)` on the
/// lanes the block touched.
///
/// # Safety
/// NEON must be available (`enabled`); `q.len() == x[r].len()`,
/// `scales.len() == x[r].len().div_ceil(block_len)`.
#[target_feature(enable = "neon")]
pub unsafe fn dot_int8<const R: usize>(
    q: &[u8],
    scales: &[f32],
    block_len: usize,
    x: [&[f32]; R],
) -> [f32; R] {
    let value = |w: u8| (w as i8) as f32;
    let mut acc = [[vdupq_n_f32(0.0); REGS]; R];
    for (b, (&s, qb)) in scales.iter().zip(q.chunks(block_len)).enumerate() {
        let at0 = b * block_len;
        let mut part = [[vdupq_n_f32(0.0); REGS]; R];
        let whole = qb.len() / 32 * 32;
        for (c, w32) in qb[..whole].chunks_exact(32).enumerate() {
            let mut wf = [vdupq_n_f32(0.0); 8];
            for h in 0..2 {
                let v = vreinterpretq_s8_u8(load_u8(&w32[16 * h..]));
                let w16 = [vmovl_s8(vget_low_s8(v)), vmovl_high_s8(v)];
                for (i, &w) in w16.iter().enumerate() {
                    wf[4 * h + 2 * i] = vcvtq_f32_s32(vmovl_s16(vget_low_s16(w)));
                    wf[4 * h + 2 * i + 1] = vcvtq_f32_s32(vmovl_high_s16(w));
                }
            }
            let at = at0 + 32 * c;
            let h = 8 * ((at / 32) % 2);
            for r in 0..R {
                let x32 = &x[r][at..at + 32];
                for k in 0..8 {
                    part[r][h + k] = vfmaq_f32(part[r][h + k], wf[k], load_f32(&x32[4 * k..]));
                }
            }
        }
        let sv = vdupq_n_f32(s);
        for r in 0..R {
            let xb = &x[r][at0..at0 + qb.len()];
            if qb.len() >= WIDE {
                let mut p = wide_lanes(&part[r]);
                for j in whole..qb.len() {
                    let l = (at0 + j) % WIDE;
                    p[l] = value(qb[j]).mul_add(xb[j], p[l]);
                }
                for k in 0..REGS {
                    acc[r][k] = vfmaq_f32(acc[r][k], load_f32(&p[4 * k..]), sv);
                }
            } else {
                // A block shorter than the lanes (32, or a short row): lane by lane.
                let mut p = wide_lanes(&part[r]);
                let mut a = wide_lanes(&acc[r]);
                for j in whole..qb.len() {
                    let l = (at0 + j) % WIDE;
                    p[l] = value(qb[j]).mul_add(xb[j], p[l]);
                }
                for j in 0..qb.len() {
                    let l = (at0 + j) % WIDE;
                    a[l] = p[l].mul_add(s, a[l]);
                }
                acc[r] = std::array::from_fn(|k| load_f32(&a[4 * k..]));
            }
        }
    }
    acc.map(|a| hsum64(&a))
}
