//! NEON kernels of the f32-activation formats (nf4, int8): the reference's lane structure (32
//! lanes, see `reference.rs`) as 8 registers of 4 f32, weights decoded in registers, separate
//! multiply and add (the references do not fuse). Safety rules as in `neon.rs`.

use std::arch::aarch64::*;

use super::{load_f32, load_u8, store_f32};
use crate::matmul::reference::{self as r, WIDE};

/// Registers of 4 f32 holding the 32 lanes.
const REGS: usize = WIDE / 4;

#[inline(always)]
fn wide_lanes(v: &[float32x4_t; REGS]) -> [f32; WIDE] {
    let mut a = [0.0f32; WIDE];
    for (k, r) in v.iter().enumerate() {
        a[4 * k..4 * k + 4].copy_from_slice(&store_f32(*r));
    }
    a
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
fn nf4_decode32(planes: &[uint8x16_t; 4], wq: &[u8]) -> [float32x4_t; REGS] {
    let q = load_u8(wq);
    // SAFETY: NEON (see `neon.rs`).
    unsafe {
        let (hi, lo) = (vshrq_n_u8::<4>(q), vandq_u8(q, vdupq_n_u8(0x0f)));
        let idx = [vzip1q_u8(hi, lo), vzip2q_u8(hi, lo)];
        let mut out = [vdupq_n_f32(0.0); REGS];
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

/// `reference::dot_nf4` for R activation rows at once: 32 weights per step decoded once, per
/// row `part[k] += code * x` over the 8 registers of 32 lanes and `acc[k] += part[k] * absmax`
/// per block.
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
        let mut part = [[vdupq_n_f32(0.0); REGS]; R];
        let wb = &packed[b * block_size / 2..(b + 1) * block_size / 2];
        for (c, wq) in wb.chunks_exact(16).enumerate() {
            let code = nf4_decode32(&planes, wq);
            let at = b * block_size + WIDE * c;
            for r in 0..R {
                let xq = &x[r][at..at + WIDE];
                for k in 0..REGS {
                    let p = vmulq_f32(code[k], load_f32(&xq[4 * k..]));
                    part[r][k] = vaddq_f32(part[r][k], p);
                }
            }
        }
        let sv = vdupq_n_f32(s);
        for r in 0..R {
            for k in 0..REGS {
                acc[r][k] = vaddq_f32(acc[r][k], vmulq_f32(part[r][k], sv));
            }
        }
    }
    acc.map(|a| r::hsum32(&wide_lanes(&a)))
}

/// `reference::dot_int8` for R activation rows at once: 32 weights per step converted once
/// (sign-extended, exactly to f32), per row `part[k] += q * x`, the block's tail on the same
/// lanes in scalar code, then `acc += part * scale`.
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
    let mut acc = [[vdupq_n_f32(0.0); REGS]; R];
    for (b, (&s, qb)) in scales.iter().zip(q.chunks(block_len)).enumerate() {
        let mut part = [[vdupq_n_f32(0.0); REGS]; R];
        let whole = qb.len() / WIDE * WIDE;
        for (c, w32) in qb[..whole].chunks_exact(WIDE).enumerate() {
            let mut wf = [vdupq_n_f32(0.0); REGS];
            for h in 0..2 {
                let v = vreinterpretq_s8_u8(load_u8(&w32[16 * h..]));
                let w16 = [vmovl_s8(vget_low_s8(v)), vmovl_high_s8(v)];
                for (i, &w) in w16.iter().enumerate() {
                    wf[4 * h + 2 * i] = vcvtq_f32_s32(vmovl_s16(vget_low_s16(w)));
                    wf[4 * h + 2 * i + 1] = vcvtq_f32_s32(vmovl_high_s16(w));
                }
            }
            let at = b * block_len + WIDE * c;
            for r in 0..R {
                let x32 = &x[r][at..at + WIDE];
                for k in 0..REGS {
                    let p = vmulq_f32(wf[k], load_f32(&x32[4 * k..]));
                    part[r][k] = vaddq_f32(part[r][k], p);
                }
            }
        }
        let sv = vdupq_n_f32(s);
        for r in 0..R {
            let mut p = wide_lanes(&part[r]);
            let xb = &x[r][b * block_len..b * block_len + qb.len()];
            for j in whole..qb.len() {
                p[j % WIDE] += (qb[j] as i8) as f32 * xb[j];
            }
            for k in 0..REGS {
                let pk = load_f32(&p[4 * k..]);
                acc[r][k] = vaddq_f32(acc[r][k], vmulq_f32(pk, sv));
            }
        }
    }
    acc.map(|a| r::hsum32(&wide_lanes(&a)))
}
