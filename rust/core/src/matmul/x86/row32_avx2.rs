//! The M = 1 row kernel of the 4- and 5-bit 32-weight formats (q4_0, q4_1, q5_0, q5_1, iq4_nl)
//! on AVX2 without AVX-512: no horizontal integer reduction (`reduce8`) per group of 8 blocks.
//!
//! **Layout.** A block's integer sum is exact, so the order of its 32 products is free. Per
//! group of 8 blocks the 16 quant bytes of each block are loaded as stored and transposed in
//! registers (4 x 4 dwords in each 128-bit half: 8 unpacks), so that dword lane l of register
//! k holds quant bytes 4k..4k + 4 of block l: low nibbles elements 4k.., high nibbles 16 + 4k...
//! The activation row is transposed once per call to match (`interleave`: register q's lane l
//! = quants 4q..4q + 4 of block l). The `vpmaddubsw` products of the unsigned levels are summed
//! in i16 across registers before one `vpmaddwd` (q4: 8 registers, each i16 at most
//! 8 · 2 · 15 · 128 = 30720; q5: 4, 4 · 2 · 31 · 128 = 31744: no wrap), leaving block l's
//! `Σ (w + BIAS)·x` in lane l; `nbias` (`-BIAS · Σx`) makes it the reference's exact integer.
//! iq4_nl keeps the signed product of `block_isums` (|x| <= 127) per register, in i32.
//!
//! The float part is `block32_avx2`'s, the reference's: `acc += (d_w · d_x) · isum` (+ `m_w ·
//! s_x`) lane-wise, block 8g + l in lane l, groups in order; the blocks past the last whole
//! group take `finish32` (as `block32_avx2`), then `hsum8`: `reference::dot_block32`'s bits.

use std::arch::x86_64::*;

use super::{finish32, prefetch_l2, Load32};
use crate::formats::blocks::*;
use crate::matmul::reference::{self as r, LANES};

/// Bytes of one group of 8 transposed activation blocks (8 registers of 32).
pub const GROUP_BYTES: usize = 256;

/// Bytes ahead of the group being read that long rows prefetch into L2.
pub const AHEAD: usize = 8192;

/// The formats this kernel takes.
pub fn takes(q: crate::qtype::QType) -> bool {
    use crate::qtype::QType;
    matches!(
        q,
        QType::Q4_0 | QType::Q4_1 | QType::Q5_0 | QType::Q5_1 | QType::IQ4NL
    )
}

#[cfg(test)]
thread_local! {
    /// Tests: `plan` on this thread takes this kernel at M = 1 for the formats it takes, even
    /// where the CPU has AVX-512 VNNI.
    pub(crate) static FORCE: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Whether tests force this kernel on this thread (`FORCE`); always false outside tests.
pub fn forced() -> bool {
    #[cfg(test)]
    return FORCE.get();
    #[cfg(not(test))]
    false
}

/// The activation row `blocks` transposed for the kernel (whole groups only: the last partial
/// group is read from `blocks` by `finish32`) and `-BIAS · sums` per block of those groups
/// (zeros where the kernel's product has no bias).
pub fn interleave(
    q: crate::qtype::QType,
    blocks: &[BlockQ8_0],
    sums: &[i32],
) -> (Vec<u8>, Vec<i32>) {
    use crate::qtype::QType;
    let bias = match q {
        QType::Q4_0 => BlockQ4_0::BIAS,
        QType::Q5_0 => BlockQ5_0::BIAS,
        _ => 0,
    };
    let groups = blocks.len() / LANES;
    let mut xt = vec![0u8; groups * GROUP_BYTES];
    for (o, g) in xt
        .chunks_exact_mut(GROUP_BYTES)
        .zip(blocks.chunks_exact(LANES))
    {
        for (l, b) in g.iter().enumerate() {
            let src: &[u8; 32] = bytemuck::cast_ref(&b.qs);
            for q in 0..8 {
                let at = 32 * q + 4 * l;
                o[at..at + 4].copy_from_slice(&src[4 * q..4 * q + 4]);
            }
        }
    }
    let nbias = sums[..groups * LANES].iter().map(|&s| -bias * s).collect();
    (xt, nbias)
}

/// A format of 16 nibble bytes a block (plus q5's fifth bits) for this kernel.
pub trait Nib32: Load32 {
    /// The fifth bit of each level in `qh` (q5_0 / q5_1).
    const Q5: bool;
    /// Signed levels from a table (iq4_nl), product per register as `block_isums`.
    const SIGNED: bool;
    fn qs(&self) -> &[u8; 16];
    fn qh(&self) -> [u8; 4] {
        [0; 4]
    }
}

impl Nib32 for BlockQ4_0 {
    const Q5: bool = false;
    const SIGNED: bool = false;
    fn qs(&self) -> &[u8; 16] {
        &self.qs
    }
}

impl Nib32 for BlockQ4_1 {
    const Q5: bool = false;
    const SIGNED: bool = false;
    fn qs(&self) -> &[u8; 16] {
        &self.qs
    }
}

impl Nib32 for BlockQ5_0 {
    const Q5: bool = true;
    const SIGNED: bool = false;
    fn qs(&self) -> &[u8; 16] {
        &self.qs
    }
    fn qh(&self) -> [u8; 4] {
        self.qh
    }
}

impl Nib32 for BlockQ5_1 {
    const Q5: bool = true;
    const SIGNED: bool = false;
    fn qs(&self) -> &[u8; 16] {
        &self.qs
    }
    fn qh(&self) -> [u8; 4] {
        self.qh
    }
}

impl Nib32 for BlockIQ4NL {
    const Q5: bool = false;
    const SIGNED: bool = true;
    fn qs(&self) -> &[u8; 16] {
        &self.qs
    }
}

/// Register `q` (0..8) of the group `wg`'s levels: lane l = the levels of elements 4q..4q + 4
/// of block l (the nibbles of the transposed dwords `t`; q5's fifth bits from `qh`, lane l =
/// block l's 32 bits).
#[inline(always)]
unsafe fn levels<W: Nib32>(t: &[__m256i; 4], qh: __m256i, q: usize) -> __m256i {
    // SAFETY: AVX2 (the caller's contract).
    unsafe {
        let m4 = _mm256_set1_epi8(0x0f);
        let v = if q < 4 {
            _mm256_and_si256(t[q], m4)
        } else {
            _mm256_and_si256(_mm256_srli_epi16(t[q - 4], 4), m4)
        };
        if W::Q5 {
            // bits 4q..4q + 4 of qh to bit 4 of bytes 0..4: bit b times 2^(4 + 7k) lands on
            // bit 8b + 4 only for k = b (no two products overlap, so no carries).
            let h = _mm256_and_si256(
                _mm256_srlv_epi32(qh, _mm256_set1_epi32(4 * q as i32)),
                _mm256_set1_epi32(0xf),
            );
            let h = _mm256_mullo_epi32(h, _mm256_set1_epi32(0x0204_0810));
            _mm256_or_si256(v, _mm256_and_si256(h, _mm256_set1_epi32(0x1010_1010)))
        } else if W::SIGNED {
            let t = _mm_loadu_si128(r::KVALUES_IQ4NL.as_ptr() as *const __m128i);
            _mm256_shuffle_epi8(_mm256_set_m128i(t, t), v)
        } else {
            v
        }
    }
}

/// The 8 exact integer sums `Σ w·x` of the group `wg` (lane l = block l) against the
/// transposed activations at `xt`, `nb` = the group's `-BIAS · Σx`.
#[inline(always)]
unsafe fn group_isums<W: Nib32>(wg: &[W], xt: *const u8, nb: *const i32) -> __m256i {
    // SAFETY: AVX2 (the caller's contract); wg has 8 blocks, xt GROUP_BYTES bytes, nb 8 i32.
    unsafe {
        macro_rules! ld {
            ($j:expr) => {
                _mm_loadu_si128(wg[$j].qs().as_ptr() as *const __m128i)
            };
        }
        let a: [__m256i; 4] = [
            _mm256_set_m128i(ld!(4), ld!(0)),
            _mm256_set_m128i(ld!(5), ld!(1)),
            _mm256_set_m128i(ld!(6), ld!(2)),
            _mm256_set_m128i(ld!(7), ld!(3)),
        ];
        let u0 = _mm256_unpacklo_epi32(a[0], a[1]);
        let u1 = _mm256_unpackhi_epi32(a[0], a[1]);
        let u2 = _mm256_unpacklo_epi32(a[2], a[3]);
        let u3 = _mm256_unpackhi_epi32(a[2], a[3]);
        let t = [
            _mm256_unpacklo_epi64(u0, u2),
            _mm256_unpackhi_epi64(u0, u2),
            _mm256_unpacklo_epi64(u1, u3),
            _mm256_unpackhi_epi64(u1, u3),
        ];
        let qh = if W::Q5 {
            let h: [i32; 8] = std::array::from_fn(|j| i32::from_le_bytes(wg[j].qh()));
            _mm256_loadu_si256(h.as_ptr() as *const __m256i)
        } else {
            _mm256_setzero_si256()
        };
        macro_rules! x {
            ($q:expr) => {
                _mm256_loadu_si256(xt.add(32 * $q) as *const __m256i)
            };
        }
        let ones = _mm256_set1_epi16(1);
        let s = if W::SIGNED {
            let mut s = _mm256_setzero_si256();
            for q in 0..8 {
                let w = levels::<W>(&t, qh, q);
                let xv = x!(q);
                let p = _mm256_maddubs_epi16(_mm256_sign_epi8(w, w), _mm256_sign_epi8(xv, w));
                s = _mm256_add_epi32(s, _mm256_madd_epi16(p, ones));
            }
            s
        } else {
            // i16 sums of `PER` registers (see the module comment), then one vpmaddwd each
            let per = if W::Q5 { 4 } else { 8 };
            let mut s = _mm256_setzero_si256();
            let mut q = 0;
            while q < 8 {
                let mut p = _mm256_maddubs_epi16(levels::<W>(&t, qh, q), x!(q));
                for j in q + 1..q + per {
                    p = _mm256_add_epi16(p, _mm256_maddubs_epi16(levels::<W>(&t, qh, j), x!(j)));
                }
                s = _mm256_add_epi32(s, _mm256_madd_epi16(p, ones));
                q += per;
            }
            s
        };
        _mm256_add_epi32(s, _mm256_loadu_si256(nb as *const __m256i))
    }
}

/// The activation row as this kernel reads it.
pub struct RowT<'a> {
    /// The blocks (read for the last partial group).
    pub blocks: &'a [BlockQ8_0],
    /// `interleave`'s transposed whole groups and `-BIAS · Σx`.
    pub xt: &'a [u8],
    pub nbias: &'a [i32],
    /// Each block's scale as f32.
    pub d: &'a [f32],
    /// q4_1 / q5_1: each block's q8_1 `s` as f32; None for the others.
    pub s: Option<&'a [f32]>,
}

/// `reference::dot_block32` (q4_1 / q5_1: `dot_block32_min`) of the weight row `w` with the
/// activation row `x`, the same bits. `PF`: prefetch the weights `AHEAD` bytes ahead into L2.
///
/// # Safety
/// AVX2 and F16C must be available; `x` was prepared by `interleave` for `w.len()` blocks.
#[target_feature(enable = "avx2,f16c")]
pub unsafe fn dot_row<W: Nib32, const PF: bool>(w: &[W], x: &RowT<'_>) -> f32 {
    let groups = w.len() / LANES;
    assert!(
        x.xt.len() >= groups * GROUP_BYTES
            && x.nbias.len() >= groups * LANES
            && x.blocks.len() >= w.len()
            && x.d.len() >= w.len()
            && x.s.is_none_or(|s| s.len() >= w.len())
    );
    assert_eq!(x.s.is_some(), W::HAS_MIN);
    let mut acc = _mm256_setzero_ps();
    for g in 0..groups {
        let wg = &w[g * LANES..g * LANES + LANES];
        if PF {
            prefetch_l2(wg.as_ptr() as *const u8, std::mem::size_of_val(wg), AHEAD);
        }
        // SAFETY: AVX2 (contract); g < groups: GROUP_BYTES bytes of xt and 8 nbias (asserted).
        let isum = unsafe {
            group_isums(
                wg,
                x.xt.as_ptr().add(g * GROUP_BYTES),
                x.nbias.as_ptr().add(g * LANES),
            )
        };
        let dw = super::halves8(std::array::from_fn(|j| wg[j].d()));
        // SAFETY: 8 f32 from g * 8 < w.len() <= x.d.len() (asserted).
        let dx = unsafe { _mm256_loadu_ps(x.d.as_ptr().add(g * LANES)) };
        let p = _mm256_mul_ps(_mm256_mul_ps(dw, dx), _mm256_cvtepi32_ps(isum));
        let p = if let Some(s) = x.s {
            let mw = super::halves8(std::array::from_fn(|j| wg[j].m()));
            // SAFETY: as for dx (asserted).
            let sx = unsafe { _mm256_loadu_ps(s.as_ptr().add(g * LANES)) };
            _mm256_add_ps(p, _mm256_mul_ps(mw, sx))
        } else {
            p
        };
        acc = _mm256_add_ps(acc, p);
    }
    // SAFETY: AVX2, F16C (contract); blocks, d (and s) have w.len() entries (asserted).
    unsafe { finish32(w, acc, x.blocks, x.d, x.s) }
}
