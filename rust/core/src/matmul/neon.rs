//! NEON (aarch64) versions of the dot products in `reference.rs`, chosen at run time
//! (`cpu::has_neon`, which honours FERROQUANT_FORCE_SCALAR). The same contract as `x86.rs`: integer
//! sums are exact, so any summation order gives the reference's integers; the float products
//! and lane accumulations are the reference's operations in the reference's order (separate
//! `vmulq_f32` and `vaddq_f32` where the references do not fuse, and LLVM does not contract
//! separate intrinsics; `vfmaq_f32` for the f32-activation formats, whose references fuse), so
//! results are identical bit for bit. Where a row ends in
//! fewer than 8 blocks, the tail runs the reference's scalar code on the same lanes.
//!
//! Files: this one (detection, dispatch, integer dots, the 32-weight formats), `k_quants.rs`
//! (q4_K, q5_K, q6_K), `q16.rs` (nf4, int8 with 16-bit activations), `gemm.rs` (the 32-weight
//! formats' GEMM kernels for M >= 2, `sdot` by element or `smmla`), `gemm_k.rs` (the same for
//! the K-quants), `tests.rs`.
//!
//! `mod.rs` calls `dot_block32`, `dot_block_k` and `dot_q16`, which take the NEON kernel of the
//! weight format when this file has one and the reference otherwise (matched by `TypeId` /
//! qtype), so a format added to the references runs on aarch64 before it gets a NEON kernel.
//!
//! Integer dots of 16 signed bytes come in two kinds: `sdot` (the Armv8.2 dot product, used when
//! `dotprod` is detected at run time) and `vmull_s8` + `vpadalq_s16` (plain Armv8.0 NEON:
//! i8 x i8 products fit in i16, pairs are widened to i32 before they are added). Rust's
//! `vdotq_s32` is still unstable (`stdarch_neon_dotprod`), so `sdot` is one instruction of
//! inline assembly.
//!
//! Safety. NEON is part of the baseline of every aarch64 target with std (the build
//! configuration has it; the assertion below keeps it so), so calling a NEON intrinsic anywhere
//! in this module is sound: the `unsafe` blocks around intrinsics cite this. `sdot` needs
//! `dotprod`: it is reached only from the `_sdot` entry points, whose callers check
//! `cpu::has_dotprod` (and the assembler refuses `sdot` in a function compiled without `dotprod`).
//! Loads go through `load_*`, which check the length they read.

use std::any::TypeId;
use std::arch::aarch64::*;
use std::arch::asm;

use super::reference::{self as r, Block32, BlockK, BlockQ8K, LANES};
use crate::cpu::has_dotprod;
use crate::formats::blocks::*;
use crate::qtype::QType;

const _: () = assert!(cfg!(target_feature = "neon"));

pub mod gemm;
pub mod gemm_k;
mod k_quants;
mod q16;
#[cfg(test)]
pub use k_quants::sums_for_test;
pub use k_quants::{dot_block_k_mull, dot_block_k_sdot, DecodeK, DecodedK};
pub use q16::{dot_int8_q16, dot_nf4_q16};

// ---------------------------------------------------------------- dispatch (from mod.rs)

#[cfg(test)]
thread_local! {
    /// Calls of a NEON kernel through the dispatch on this thread (the tests check that the
    /// dispatch takes NEON where it exists: the bits alone cannot tell).
    pub static DISPATCHED: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// `reference::dot_block32` for R activation rows: NEON (`sdot` where the CPU has it) for the
/// formats with a `Load32` below, the reference for any other `W`. Callers check `cpu::has_neon`.
pub fn dot_block32<W: Block32, const R: usize>(
    w: &[W],
    x: [&[BlockQ8_0]; R],
    xd: [&[f32]; R],
) -> [f32; R] {
    fn run<V: Load32, const R: usize>(w: &[V], x: [&[BlockQ8_0]; R], xd: [&[f32]; R]) -> [f32; R] {
        #[cfg(test)]
        DISPATCHED.with(|c| c.set(c.get() + 1));
        // SAFETY: NEON (module comment); dotprod checked for the `sdot` kernel.
        unsafe {
            if has_dotprod() {
                dot_block32_sdot(w, x, xd)
            } else {
                dot_block32_mull(w, x, xd)
            }
        }
    }
    macro_rules! neon_for {
        ($($t:ty),*) => {$(
            if TypeId::of::<W>() == TypeId::of::<$t>() {
                // W is $t: the cast is the identity.
                return run::<$t, R>(bytemuck::cast_slice(w), x, xd);
            }
        )*};
    }
    neon_for!(BlockQ4_0, BlockQ5_0, BlockQ8_0, BlockIQ4NL);
    std::array::from_fn(|i| r::dot_block32(w, x[i], xd[i]))
}

/// `reference::dot_block32_min` (q4_1 / q5_1 weights, q8_1 activations) for R rows: NEON for
/// q4_1 and q5_1, the reference for any other `W`. Callers check `cpu::has_neon`.
pub fn dot_block32_min<W: Block32, const R: usize>(
    w: &[W],
    x: [&[BlockQ8_0]; R],
    xd: [&[f32]; R],
    xs: [&[f32]; R],
) -> [f32; R] {
    fn run<V: Load32, const R: usize>(
        w: &[V],
        x: [&[BlockQ8_0]; R],
        xd: [&[f32]; R],
        xs: [&[f32]; R],
    ) -> [f32; R] {
        #[cfg(test)]
        DISPATCHED.with(|c| c.set(c.get() + 1));
        // SAFETY: NEON (module comment); dotprod checked for the `sdot` kernel.
        unsafe {
            if has_dotprod() {
                dot_block32_min_sdot(w, x, xd, xs)
            } else {
                dot_block32_min_mull(w, x, xd, xs)
            }
        }
    }
    macro_rules! neon_for {
        ($($t:ty),*) => {$(
            if TypeId::of::<W>() == TypeId::of::<$t>() {
                // W is $t: the cast is the identity.
                return run::<$t, R>(bytemuck::cast_slice(w), x, xd, xs);
            }
        )*};
    }
    neon_for!(BlockQ4_1, BlockQ5_1);
    std::array::from_fn(|i| r::dot_block32_min(w, x[i], xd[i], xs[i]))
}

/// `reference::dot_block_k` for R activation rows: NEON for the formats with a `DecodeK` below,
/// the reference for any other `W`. Callers check `cpu::has_neon`.
pub fn dot_block_k<W: BlockK, const R: usize>(w: &[W], x: [&[BlockQ8K]; R]) -> [f32; R] {
    fn run<V: DecodeK, const R: usize>(w: &[V], x: [&[BlockQ8K]; R]) -> [f32; R] {
        #[cfg(test)]
        DISPATCHED.with(|c| c.set(c.get() + 1));
        // SAFETY: NEON (module comment); dotprod checked for the `sdot` kernel.
        unsafe {
            if has_dotprod() {
                dot_block_k_sdot(w, x)
            } else {
                dot_block_k_mull(w, x)
            }
        }
    }
    macro_rules! neon_for {
        ($($t:ty),*) => {$(
            if TypeId::of::<W>() == TypeId::of::<$t>() {
                // W is $t: the cast is the identity.
                return run::<$t, R>(bytemuck::cast_slice(w), x);
            }
        )*};
    }
    neon_for!(BlockQ4K, BlockQ5K, BlockQ6K, BlockQ2K, BlockQ3K, BlockIQ4XS, BlockTQ1_0, BlockTQ2_0);
    std::array::from_fn(|i| r::dot_block_k(w, x[i]))
}

/// `reference::q16::dot_nf4_q16` / `dot_int8_q16` for R activation rows by NEON (`q16.rs`);
/// `None` for the other formats and when NEON is off (`enabled`). Lengths as checked by
/// `mod.rs::plan` (K/2 or K bytes, one stat per block of `block_len`; `xq[r]` of
/// `q16_row_len(K)` values, `xd[r]` one per 64).
pub fn dot_q16<const R: usize>(
    qtype: QType,
    w: &[u8],
    stats: &[f32],
    block_len: usize,
    xq: [&[i16]; R],
    xd: [&[f32]; R],
) -> Option<[f32; R]> {
    if !crate::cpu::has_neon() {
        return None;
    }
    let y = match qtype {
        QType::NF4 => dot_nf4_q16(w, stats, block_len, xq, xd),
        QType::Int8 => dot_int8_q16(w, stats, block_len, xq, xd),
        _ => return None,
    };
    #[cfg(test)]
    DISPATCHED.with(|c| c.set(c.get() + 1));
    Some(y)
}

// ---------------------------------------------------------------- integer dots

/// `acc + Σ a·b` by groups of four bytes (`sdot acc.4s, a.16b, b.16b`).
///
/// # Safety
/// The CPU must have the `dotprod` feature; only inlined into functions compiled with it.
#[inline(always)]
unsafe fn sdot(mut acc: int32x4_t, a: int8x16_t, b: int8x16_t) -> int32x4_t {
    // SAFETY: `sdot` reads three vector registers and writes the first; it touches no memory,
    // no stack and no flags (integer only: neither NZCV nor FPSR), and the caller guarantees
    // the CPU has it.
    unsafe {
        asm!(
            "sdot {acc:v}.4s, {a:v}.16b, {b:v}.16b",
            acc = inout(vreg) acc,
            a = in(vreg) a,
            b = in(vreg) b,
            options(pure, nomem, nostack, preserves_flags)
        );
    }
    acc
}

/// An exact integer dot of 16 signed bytes added to 4 i32 lanes. Which lane gets which products
/// differs between the kinds; the sum of the 4 lanes is the same integer.
pub trait IDot {
    /// # Safety
    /// The CPU must have what the kind needs (NEON; `dotprod` for `Sdot`).
    unsafe fn dot16(acc: int32x4_t, a: int8x16_t, b: int8x16_t) -> int32x4_t;
}

/// Armv8.2 `sdot`.
pub struct Sdot;
/// Armv8.0 `smull` / `smull2` into i16 (|a·b| <= 128·128 fits), pairwise widened into i32.
pub struct Mull;

impl IDot for Sdot {
    #[inline(always)]
    unsafe fn dot16(acc: int32x4_t, a: int8x16_t, b: int8x16_t) -> int32x4_t {
        // SAFETY: the caller guarantees dotprod (this method's contract).
        unsafe { sdot(acc, a, b) }
    }
}

impl IDot for Mull {
    #[inline(always)]
    unsafe fn dot16(acc: int32x4_t, a: int8x16_t, b: int8x16_t) -> int32x4_t {
        // SAFETY: NEON (module comment).
        unsafe {
            let lo = vmull_s8(vget_low_s8(a), vget_low_s8(b));
            let hi = vmull_high_s8(a, b);
            vpadalq_s16(vpadalq_s16(acc, lo), hi)
        }
    }
}

/// The 8 f16 at `h` as f32 (`fcvtl` / `fcvtl2`: Armv8.0 AdvSIMD, exact, the same values as
/// `f16_to_f32`; Rust's `vcvt_f32_f16` is unstable, hence assembly).
#[inline(always)]
fn f16x8_to_f32(h: &[u16; 8]) -> [float32x4_t; 2] {
    let (lo, hi): (float32x4_t, float32x4_t);
    // SAFETY: NEON (module comment); 8 u16 in bounds. The instructions read one vector
    // register and write others (`out`, not `lateout`: `lo` is written before `v` is read
    // again); no memory or stack. Flags are not declared preserved: a signalling NaN sets
    // FPSR's invalid-operation bit, as Rust's own float operations may.
    unsafe {
        let v = vld1q_u16(h.as_ptr());
        asm!(
            "fcvtl {lo:v}.4s, {v:v}.4h",
            "fcvtl2 {hi:v}.4s, {v:v}.8h",
            v = in(vreg) v,
            lo = out(vreg) lo,
            hi = out(vreg) hi,
            options(pure, nomem, nostack)
        );
    }
    [lo, hi]
}

/// 16 bytes from a slice that holds at least 16.
#[inline(always)]
fn load_u8(p: &[u8]) -> uint8x16_t {
    assert!(p.len() >= 16);
    // SAFETY: NEON; 16 bytes in bounds (checked above); vld1q has no alignment requirement.
    unsafe { vld1q_u8(p.as_ptr()) }
}

#[inline(always)]
fn load_i8(p: &[i8]) -> int8x16_t {
    assert!(p.len() >= 16);
    // SAFETY: as `load_u8`.
    unsafe { vld1q_s8(p.as_ptr()) }
}

#[inline(always)]
fn load_f32(p: &[f32]) -> float32x4_t {
    assert!(p.len() >= 4);
    // SAFETY: NEON; 4 f32 in bounds (checked above).
    unsafe { vld1q_f32(p.as_ptr()) }
}

#[inline(always)]
fn store_f32(v: float32x4_t) -> [f32; 4] {
    let mut a = [0.0f32; 4];
    // SAFETY: NEON; `a` has room for 4 f32.
    unsafe { vst1q_f32(a.as_mut_ptr(), v) };
    a
}

/// The 8 float lanes of `[lanes 0..4, lanes 4..8]`.
#[inline(always)]
fn lanes_of(v: &[float32x4_t; 2]) -> [f32; LANES] {
    let (a, b) = (store_f32(v[0]), store_f32(v[1]));
    [a[0], a[1], a[2], a[3], b[0], b[1], b[2], b[3]]
}

// ---------------------------------------------------------------- 32-weight blocks, q8_0 x

/// The low and high nibbles of 16 bytes: elements 0..15 and 16..31 of a ggml 4-bit block.
#[inline(always)]
fn nibbles_ggml(qs: &[u8; 16]) -> [uint8x16_t; 2] {
    let q = load_u8(qs);
    // SAFETY: NEON (module comment).
    unsafe { [vandq_u8(q, vdupq_n_u8(0x0f)), vshrq_n_u8::<4>(q)] }
}

/// A weight block of 32 as 32 signed i8 in element order (elements 0..15, 16..31).
pub trait Load32: Block32 {
    fn load(&self) -> [int8x16_t; 2];
}

impl Load32 for BlockQ4_0 {
    #[inline(always)]
    fn load(&self) -> [int8x16_t; 2] {
        // SAFETY: NEON (module comment).
        nibbles_ggml(&self.qs).map(|n| unsafe { vsubq_s8(vreinterpretq_s8_u8(n), vdupq_n_s8(8)) })
    }
}

impl Load32 for BlockQ8_0 {
    #[inline(always)]
    fn load(&self) -> [int8x16_t; 2] {
        [load_i8(&self.qs), load_i8(&self.qs[16..])]
    }
}

/// Byte `e / 8` of a q5_0 `qh` for element e (0..15, then 16..31), and bit `e % 8` of it.
const QH_BYTE: [[u8; 16]; 2] = [
    [0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1],
    [2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3],
];
const QH_BIT: [u8; 16] = [1, 2, 4, 8, 16, 32, 64, 128, 1, 2, 4, 8, 16, 32, 64, 128];

impl Load32 for BlockQ5_0 {
    /// Bit e of the little-endian `qh` is bit 4 of element e (`reference::unpack_q5_0`).
    #[inline(always)]
    fn load(&self) -> [int8x16_t; 2] {
        // SAFETY: NEON (module comment).
        levels5(&self.qs, self.qh)
            .map(|v| unsafe { vsubq_s8(vreinterpretq_s8_u8(v), vdupq_n_s8(16)) })
    }
}

impl Load32 for BlockQ4_1 {
    /// The unsigned nibbles 0..15 (`reference::unpack_q4_1`): valid as signed bytes.
    #[inline(always)]
    fn load(&self) -> [int8x16_t; 2] {
        // SAFETY: NEON (module comment).
        nibbles_ggml(&self.qs).map(|n| unsafe { vreinterpretq_s8_u8(n) })
    }
}

/// The five-bit levels 0..31 of a q5_0 / q5_1 block: the nibbles plus bit e of the
/// little-endian `qh` as bit 4 of element e.
#[inline(always)]
fn levels5(qs: &[u8; 16], qh: [u8; 4]) -> [uint8x16_t; 2] {
    let (bit, n) = (load_u8(&QH_BIT), nibbles_ggml(qs));
    let idx = [load_u8(&QH_BYTE[0]), load_u8(&QH_BYTE[1])];
    // SAFETY: NEON (module comment).
    unsafe {
        let qh = vreinterpretq_u8_u32(vdupq_n_u32(u32::from_le_bytes(qh)));
        std::array::from_fn(|h| {
            let bytes = vqtbl1q_u8(qh, idx[h]);
            vorrq_u8(n[h], vandq_u8(vtstq_u8(bytes, bit), vdupq_n_u8(0x10)))
        })
    }
}

impl Load32 for BlockQ5_1 {
    /// The unsigned levels 0..31 (`reference::unpack_q5_1`).
    #[inline(always)]
    fn load(&self) -> [int8x16_t; 2] {
        // SAFETY: NEON (module comment).
        levels5(&self.qs, self.qh).map(|v| unsafe { vreinterpretq_s8_u8(v) })
    }
}

impl Load32 for BlockIQ4NL {
    #[inline(always)]
    fn load(&self) -> [int8x16_t; 2] {
        let t = load_i8(&r::KVALUES_IQ4NL);
        // SAFETY: NEON (module comment).
        nibbles_ggml(&self.qs).map(|n| unsafe { vqtbl1q_s8(t, n) })
    }
}

/// `reference::dot_block32` for R activation rows at once (weights decoded once per group of 8
/// blocks): per row the 8 blocks' integer sums in two registers, then
/// `acc += (dw * dx) * float(isum)` lane-wise; each row's operations are those of R = 1.
///
/// # Safety
/// The CPU must have what `D` needs, and this must be inlined into a function compiled with it
/// (the `_sdot` / `_mull` entry points). Lengths are bounds-checked (x and xd must have one
/// entry per weight block, or this panics).
#[inline(always)]
unsafe fn block32<W: Load32, D: IDot, const R: usize>(
    w: &[W],
    x: [&[BlockQ8_0]; R],
    xd: [&[f32]; R],
    xs: Option<[&[f32]; R]>,
) -> [f32; R] {
    let nb = w.len();
    let groups = nb / LANES;
    // SAFETY: NEON is baseline on aarch64 (module comment); no memory is touched.
    let zero = unsafe { vdupq_n_s32(0) };
    // SAFETY: as above.
    let mut acc = [[unsafe { vdupq_n_f32(0.0) }; 2]; R];
    for g in 0..groups {
        let wg = &w[g * LANES..g * LANES + LANES];
        // (loops, not closures: LLVM left closures out of line, and a closure would not inherit
        // the entry point's `dotprod`)
        // SAFETY: NEON is baseline (module comment); no memory is touched.
        let mut wv = [[unsafe { vdupq_n_s8(0) }; 2]; LANES];
        let mut dh = [0u16; LANES];
        let mut mh = [0u16; LANES];
        for j in 0..LANES {
            wv[j] = wg[j].load();
            dh[j] = u16::from_le_bytes(wg[j].d());
            if W::HAS_MIN {
                mh[j] = u16::from_le_bytes(wg[j].m());
            }
        }
        let dw = f16x8_to_f32(&dh);
        let mw = f16x8_to_f32(&mh);
        for r in 0..R {
            let xg = &x[r][g * LANES..g * LANES + LANES];
            let mut s = [zero; LANES];
            for j in 0..LANES {
                let (x0, x1) = (load_i8(&xg[j].qs), load_i8(&xg[j].qs[16..]));
                // SAFETY: the kind's features are present (this function's contract).
                s[j] = unsafe { D::dot16(D::dot16(zero, wv[j][0], x0), wv[j][1], x1) };
            }
            let dx = &xd[r][g * LANES..g * LANES + LANES];
            let dx = [load_f32(dx), load_f32(&dx[4..])];
            // SAFETY: NEON (module comment).
            unsafe {
                // [S0 S1 S2 S3], [S4 S5 S6 S7]: block j's sum is the sum of s[j]'s lanes.
                let isum = [
                    vpaddq_s32(vpaddq_s32(s[0], s[1]), vpaddq_s32(s[2], s[3])),
                    vpaddq_s32(vpaddq_s32(s[4], s[5]), vpaddq_s32(s[6], s[7])),
                ];
                for h in 0..2 {
                    let mut p = vmulq_f32(vmulq_f32(dw[h], dx[h]), vcvtq_f32_s32(isum[h]));
                    if let Some(xs) = xs {
                        // the q8_1 min term: `block32_min_product`'s `+ m_w * s_x`
                        let sx = load_f32(&xs[r][g * LANES + 4 * h..]);
                        p = vaddq_f32(p, vmulq_f32(mw[h], sx));
                    }
                    acc[r][h] = vaddq_f32(acc[r][h], p);
                }
            }
        }
    }
    let mut out = [0.0f32; R];
    for r in 0..R {
        let mut lanes = lanes_of(&acc[r]);
        for b in groups * LANES..nb {
            lanes[b % LANES] += match xs {
                Some(xs) => r::block32_min_product(&w[b], &x[r][b], xd[r][b], xs[r][b]),
                None => r::block32_product(&w[b], &x[r][b], xd[r][b]),
            };
        }
        out[r] = r::hsum8(&lanes);
    }
    out
}

/// `reference::dot_block32` with `sdot`.
///
/// # Safety
/// NEON and dotprod must be available (`has_dotprod`); every `x[r]` and `xd[r]` has at least
/// `w.len()` entries.
#[target_feature(enable = "neon,dotprod")]
pub unsafe fn dot_block32_sdot<W: Load32, const R: usize>(
    w: &[W],
    x: [&[BlockQ8_0]; R],
    xd: [&[f32]; R],
) -> [f32; R] {
    // SAFETY: dotprod available (contract).
    unsafe { block32::<W, Sdot, R>(w, x, xd, None) }
}

/// `reference::dot_block32` with `smull` (Armv8.0).
///
/// # Safety
/// NEON must be available (`enabled`); lengths as for `dot_block32_sdot`.
#[target_feature(enable = "neon")]
pub unsafe fn dot_block32_mull<W: Load32, const R: usize>(
    w: &[W],
    x: [&[BlockQ8_0]; R],
    xd: [&[f32]; R],
) -> [f32; R] {
    // SAFETY: NEON available (contract).
    unsafe { block32::<W, Mull, R>(w, x, xd, None) }
}

/// `reference::dot_block32_min` (q4_1 / q5_1 against q8_1) with `sdot`: the integer sums of
/// `dot_block32_sdot`, then `(dw * dx) * isum + mw * sx` lane-wise.
///
/// # Safety
/// As `dot_block32_sdot`; every `xs[r]` also has at least `w.len()` entries.
#[target_feature(enable = "neon,dotprod")]
pub unsafe fn dot_block32_min_sdot<W: Load32, const R: usize>(
    w: &[W],
    x: [&[BlockQ8_0]; R],
    xd: [&[f32]; R],
    xs: [&[f32]; R],
) -> [f32; R] {
    // SAFETY: dotprod available (contract).
    unsafe { block32::<W, Sdot, R>(w, x, xd, Some(xs)) }
}

/// `reference::dot_block32_min` with `smull` (Armv8.0).
///
/// # Safety
/// As `dot_block32_mull`; every `xs[r]` also has at least `w.len()` entries.
#[target_feature(enable = "neon")]
pub unsafe fn dot_block32_min_mull<W: Load32, const R: usize>(
    w: &[W],
    x: [&[BlockQ8_0]; R],
    xd: [&[f32]; R],
    xs: [&[f32]; R],
) -> [f32; R] {
    // SAFETY: NEON available (contract).
    unsafe { block32::<W, Mull, R>(w, x, xd, Some(xs)) }
}

#[cfg(test)]
mod tests;
