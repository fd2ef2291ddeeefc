//! The GEMM microkernel of the 32-weight formats (q4_0, q5_0, q8_0, iq4_nl, q4_1, q5_1) for
//! many activation rows on x86-64 CPUs without AVX-512 (AVX2, plus AVX-VNNI where present): a
//! panel of `PANEL` weight rows is decoded once per chunk of K (`KC_GROUPS` groups of 8 blocks)
//! into an L1-resident buffer (`PanelBuf`), then pairs of activation rows run through the
//! chunk against all the panel's rows. Driven by `matmul/gemm_avx2.rs`.
//!
//! **Layout.** `tile.rs`'s: weights and activations transposed per group of 8 blocks, vector t
//! holding in its 32-bit lane l the quants 4t..4t+3 of block l (`Tile32::load8_t`,
//! `tile::interleave_q8_0`), so each block's integer sum lands in lane l, the reference's float
//! lane of block 8g + l, with no horizontal reduction.
//!
//! **Integer sums** (exact, so any order gives the reference's integer):
//! - AVX-VNNI (`kernel_vnni`): `vpdpbusd` of the weights plus `BIAS` (u8) with the activations,
//!   started at `-BIAS · Σx`, as `tile.rs` does on AVX-512 VNNI.
//! - AVX2 (`kernel`), `vpmaddubsw` (u8 x i8 -> pairs summed in saturating i16), then `vpmaddwd`
//!   by ones (pairs of i16 -> i32). `|x| <= 127` (q8_0 / q8_1 activations never hold -128):
//!   - 4-bit weights plus BIAS (q4_0 + 8, q4_1: 0..15): an i16 lane sums 2 products per t, so
//!     all 8 vectors of a group stay in i16 (16 · 15 · 127 = 30480 < 32767), one `vpmaddwd` a
//!     group, started at `-BIAS · Σx`;
//!   - 5-bit (q5_0 + 16, q5_1: 0..31): 4 vectors at a time in i16 (8 · 31 · 127 = 31496);
//!   - q8_0 and iq4_nl (|w| up to 128): the panel keeps |w| and w, each product is
//!     `maddubs(|w|, sign(x, w))` (2 · 128 · 127 = 32512, no saturation), widened at once.
//!
//! **Float part** (the reference's, lane by lane in block order, as `gemm32.rs`): `acc[l] +=
//! (d_w · d_x) · isum` (plus `m_w · s_x` for q4_1 / q5_1), the lanes carried between chunks in
//! the caller's `Acc2`; the blocks after the last whole group (`Tail`: the same float
//! operations, lane `b % 8`, on `vpmaddubsw` sums) and `hsum8` the reference's
//! (`gemm_avx2.rs`). Every output has the bits of `reference::dot_block32` /
//! `dot_block32_min` (tested).
//!
//! Safety: callers check AVX2 and F16C (`cpu::has_avx2`; `kernel_vnni` also AVX-VNNI,
//! `cpu::has_avx_vnni`) at run time and pass slices of the lengths stated on each function.

use std::arch::x86_64::*;

use super::tile::{Tile32, GROUP_BYTES};
use crate::formats::blocks::*;
use crate::matmul::reference::LANES;

/// Weight rows of one panel.
pub const PANEL: usize = 4;
/// Groups of 8 blocks (256 weights) in one chunk of K: the panel's decoded chunk (4 rows x 2048
/// bytes, twice that for q8_0 / iq4_nl's |w| and w) and 2 activation rows' chunks stay in L1.
pub const KC_GROUPS: usize = 8;

/// One 256-bit line on a 32-byte boundary.
#[repr(C, align(32))]
#[derive(Clone, Copy)]
pub struct Ymm([u8; 32]);

/// A panel's decoded chunk: `q[(g * 8 + t) * PANEL + p]` = vector t of group g of row p
/// (`Tile32::load8_t`, the weights plus BIAS; for the signed formats on the AVX2 kernel |w|,
/// with w itself in `s`); `d[g * PANEL + p]` / `m[..]` the row's 8 block scales / offsets.
pub struct PanelBuf {
    q: Vec<Ymm>,
    s: Vec<Ymm>,
    d: Vec<Ymm>,
    m: Vec<Ymm>,
}

impl Default for PanelBuf {
    fn default() -> Self {
        let z = Ymm([0; 32]);
        Self {
            q: vec![z; KC_GROUPS * 8 * PANEL],
            s: vec![z; KC_GROUPS * 8 * PANEL],
            d: vec![z; KC_GROUPS * PANEL],
            m: vec![z; KC_GROUPS * PANEL],
        }
    }
}

/// The float lanes of one activation row with one panel: row p's 8 lanes at `[p]`.
#[repr(C, align(32))]
#[derive(Clone, Copy, Default)]
pub struct Acc2(pub [[f32; LANES]; PANEL]);

/// How the AVX2 kernel forms a block's integer sum (see the module comment).
pub trait Gemm2: Tile32 {
    /// `load8_t` is the signed weight plus 128: products need |w| and sign(x, w).
    const SIGNED: bool;
    /// Vectors t summed in i16 before widening (unsigned formats).
    const RUN16: usize;
}

impl Gemm2 for BlockQ4_0 {
    const SIGNED: bool = false;
    const RUN16: usize = 8;
}
impl Gemm2 for BlockQ4_1 {
    const SIGNED: bool = false;
    const RUN16: usize = 8;
}
impl Gemm2 for BlockQ5_0 {
    const SIGNED: bool = false;
    const RUN16: usize = 4;
}
impl Gemm2 for BlockQ5_1 {
    const SIGNED: bool = false;
    const RUN16: usize = 4;
}
impl Gemm2 for BlockQ8_0 {
    const SIGNED: bool = true;
    const RUN16: usize = 1;
}
impl Gemm2 for BlockIQ4NL {
    const SIGNED: bool = true;
    const RUN16: usize = 1;
}

/// Decodes groups `g0..g0 + groups` (at most `KC_GROUPS`) of the panel's rows into `buf`, for
/// `kernel_vnni` (`vnni`) or `kernel`.
///
/// # Safety
/// AVX2 and F16C (`cpu::has_avx2`); every `w[p]` has at least `(g0 + groups) * 8` blocks.
#[target_feature(enable = "avx2,f16c")]
pub unsafe fn decode_panel<W: Gemm2>(
    w: [&[W]; PANEL],
    g0: usize,
    groups: usize,
    vnni: bool,
    buf: &mut PanelBuf,
) {
    assert!(groups <= KC_GROUPS);
    let flip = _mm256_set1_epi8(-128);
    for gi in 0..groups {
        for (p, wp) in w.iter().enumerate() {
            let wg = &wp[(g0 + gi) * LANES..(g0 + gi + 1) * LANES];
            // SAFETY: AVX2 (contract); wg is a checked slice of 8 blocks.
            let v = unsafe { W::load8_t(wg) };
            for (t, &vt) in v.iter().enumerate() {
                let i = (gi * 8 + t) * PANEL + p;
                // SAFETY: aligned 32-byte stores into `Ymm`s (i < KC_GROUPS · 8 · PANEL).
                unsafe {
                    if W::SIGNED && !vnni {
                        let sw = _mm256_xor_si256(vt, flip);
                        _mm256_store_si256(
                            buf.q[i].0.as_mut_ptr() as *mut __m256i,
                            _mm256_abs_epi8(sw),
                        );
                        _mm256_store_si256(buf.s[i].0.as_mut_ptr() as *mut __m256i, sw);
                    } else {
                        _mm256_store_si256(buf.q[i].0.as_mut_ptr() as *mut __m256i, vt);
                    }
                }
            }
            let d = super::halves8(std::array::from_fn(|j| wg[j].d()));
            // SAFETY: aligned 32-byte store into a `Ymm`.
            unsafe { _mm256_store_ps(buf.d[gi * PANEL + p].0.as_mut_ptr() as *mut f32, d) };
            if W::HAS_MIN {
                let m = super::halves8(std::array::from_fn(|j| wg[j].m()));
                // SAFETY: as for d.
                unsafe { _mm256_store_ps(buf.m[gi * PANEL + p].0.as_mut_ptr() as *mut f32, m) };
            }
        }
    }
}

/// A panel's blocks past the last whole group (K not a multiple of 256: fewer than 8), decoded
/// once per panel and block of activation rows: each row's signed quants (`Load32::load`), f16
/// scales and offsets.
pub struct Tail {
    q: [[Ymm; LANES]; PANEL],
    d: [[Half; LANES]; PANEL],
    m: [[Half; LANES]; PANEL],
    len: usize,
}

impl Tail {
    /// Blocks `b0..` (fewer than 8) of the panel's rows.
    ///
    /// # Safety
    /// AVX2 and F16C; every `w[p]` has the same length, under `b0 + 8` blocks.
    #[target_feature(enable = "avx2,f16c")]
    pub unsafe fn decode<W: Gemm2>(w: [&[W]; PANEL], b0: usize) -> Self {
        let len = w[0].len() - b0;
        assert!(len < LANES && w.iter().all(|r| r.len() == b0 + len));
        let mut t = Tail {
            q: [[Ymm([0; 32]); LANES]; PANEL],
            d: [[[0; 2]; LANES]; PANEL],
            m: [[[0; 2]; LANES]; PANEL],
            len,
        };
        for (p, wp) in w.iter().enumerate() {
            for (i, b) in wp[b0..].iter().enumerate() {
                // SAFETY: AVX2 (contract); an aligned 32-byte store into a `Ymm`.
                unsafe { _mm256_store_si256(t.q[p][i].0.as_mut_ptr() as *mut __m256i, b.load()) };
                t.d[p][i] = b.d();
                t.m[p][i] = b.m();
            }
        }
        t
    }

    /// One activation row against the panel: each weight row's 8 float lanes (`lanes[p]`,
    /// the whole groups' products) plus the tail's products (`x86::tail_products`: the
    /// reference's operations, block b into lane `b % 8`), then `hsum8`: the row's outputs.
    /// `x`, `xd` (and `xs`, q8_1 activations) are the activation row's blocks from `b0` on.
    ///
    /// # Safety
    /// AVX2 and F16C; `x`, `xd` (and `xs`) have at least the tail's blocks.
    #[target_feature(enable = "avx2,f16c")]
    pub unsafe fn finish(
        &self,
        lanes: &[[f32; LANES]; PANEL],
        x: &[BlockQ8_0],
        xd: &[f32],
        xs: Option<&[f32]>,
    ) -> [f32; PANEL] {
        let mut out = [0f32; PANEL];
        for p in 0..PANEL {
            let mut q = [_mm256_setzero_si256(); LANES];
            for (i, v) in q.iter_mut().enumerate().take(self.len) {
                // SAFETY: an aligned 32-byte load from a `Ymm`.
                *v = unsafe { _mm256_load_si256(self.q[p][i].0.as_ptr() as *const __m256i) };
            }
            let (d, m) = (self.d[p], self.m[p]);
            // SAFETY: AVX2, F16C (contract); len < 8; x, xd (and xs) hold len blocks.
            let pr = unsafe { super::tail_products(&q, self.len, d, m, x, xd, xs) };
            let mut l = lanes[p];
            for (a, b) in l.iter_mut().zip(pr).take(self.len) {
                *a += b;
            }
            out[p] = crate::matmul::reference::hsum8(&l);
        }
        out
    }
}

/// One activation row of a kernel call, from group `g0` of the chunk on: its interleaved quants
/// (`tile::interleave_q8_0`), and per block the quant sum, the scale and (q8_1) `s`.
#[derive(Clone, Copy)]
pub struct XRow2<'a> {
    pub xt: &'a [u8],
    pub sums: &'a [i32],
    pub d: &'a [f32],
    pub s: &'a [f32],
}

/// Checks the lengths `kernel` / `kernel_vnni` rely on.
fn check<W: Gemm2>(groups: usize, x: &[XRow2<'_>]) {
    assert!(groups <= KC_GROUPS);
    for xj in x {
        assert!(xj.xt.len() >= groups * GROUP_BYTES);
        assert!(xj.d.len() >= groups * LANES && xj.sums.len() >= groups * LANES);
        assert!(!W::HAS_MIN || xj.s.len() >= groups * LANES);
    }
}

/// `-bias · Σx` of the 8 blocks of group g of row `x` (the integer sums' start).
///
/// # Safety
/// AVX2; `x.sums` has `8 (g + 1)` entries.
#[inline(always)]
unsafe fn start(x: &XRow2<'_>, g: usize, bias: i32) -> __m256i {
    // SAFETY: sums[8g..8g + 8] in bounds (contract); AVX2 (contract).
    unsafe {
        let s = _mm256_loadu_si256(x.sums.as_ptr().add(g * LANES) as *const __m256i);
        _mm256_mullo_epi32(_mm256_set1_epi32(-bias), s)
    }
}

/// The float part of group g: `acc[j][p] += (dw · dx) · isum (+ mw · sx)`, lane-wise.
///
/// # Safety
/// AVX2 and F16C; `buf` holds group g; `x[j]` has 8 (g + 1) scales (and `s`).
#[allow(clippy::needless_range_loop)]
#[inline(always)]
unsafe fn floats<W: Gemm2, const R: usize>(
    buf: &PanelBuf,
    g: usize,
    x: &[XRow2<'_>; R],
    isum: &[[__m256i; PANEL]; R],
    acc: &mut [Acc2; R],
) {
    // SAFETY: every load / store is in bounds by the contract; `Acc2` and `Ymm` are 32-byte
    // aligned.
    unsafe {
        for j in 0..R {
            let dx = _mm256_loadu_ps(x[j].d.as_ptr().add(g * LANES));
            let sx = if W::HAS_MIN {
                _mm256_loadu_ps(x[j].s.as_ptr().add(g * LANES))
            } else {
                _mm256_setzero_ps()
            };
            for p in 0..PANEL {
                let dw = _mm256_load_ps(buf.d[g * PANEL + p].0.as_ptr() as *const f32);
                let mut prod = _mm256_mul_ps(_mm256_mul_ps(dw, dx), _mm256_cvtepi32_ps(isum[j][p]));
                if W::HAS_MIN {
                    let mw = _mm256_load_ps(buf.m[g * PANEL + p].0.as_ptr() as *const f32);
                    prod = _mm256_add_ps(prod, _mm256_mul_ps(mw, sx));
                }
                let a = acc[j].0[p].as_mut_ptr();
                _mm256_store_ps(a, _mm256_add_ps(_mm256_load_ps(a), prod));
            }
        }
    }
}

/// R activation rows against the panel's decoded chunk (`groups` groups, decoded with
/// `vnni = false`), AVX2 only: `acc[j].0[p]` += each block's product, block by block. Two rows
/// by 4 weight rows: 8 integer accumulators, each weight vector loaded once for both rows.
///
/// # Safety
/// AVX2 and F16C (`cpu::has_avx2`); `buf` holds `groups` groups decoded by `decode_panel`
/// with `vnni = false`; every `x[j]` has `groups` groups (checked).
// (indices j, p over the register tile read more plainly than zipped iterators)
#[allow(clippy::needless_range_loop)]
#[target_feature(enable = "avx2,f16c")]
pub unsafe fn kernel<W: Gemm2, const R: usize>(
    buf: &PanelBuf,
    groups: usize,
    x: &[XRow2<'_>; R],
    acc: &mut [Acc2; R],
) {
    check::<W>(groups, x);
    let ones = _mm256_set1_epi16(1);
    let q = buf.q.as_ptr() as *const __m256i;
    let sq = buf.s.as_ptr() as *const __m256i;
    for g in 0..groups {
        let mut isum = [[_mm256_setzero_si256(); PANEL]; R];
        if !W::SIGNED && W::BIAS != 0 {
            for (j, is) in isum.iter_mut().enumerate() {
                // SAFETY: sums of group g in bounds (checked).
                *is = [unsafe { start(&x[j], g, W::BIAS) }; PANEL];
            }
        }
        let mut s16 = [[_mm256_setzero_si256(); PANEL]; R];
        for t in 0..8 {
            let mut xv = [_mm256_setzero_si256(); R];
            for (j, v) in xv.iter_mut().enumerate() {
                // SAFETY: bytes g·256 + 32t .. + 32 of xt, in bounds (checked).
                *v = unsafe {
                    _mm256_loadu_si256(
                        x[j].xt.as_ptr().add(g * GROUP_BYTES + 32 * t) as *const __m256i
                    )
                };
            }
            for p in 0..PANEL {
                let i = (g * 8 + t) * PANEL + p;
                // SAFETY: line i < KC_GROUPS · 8 · PANEL (g < groups <= KC_GROUPS), aligned.
                let wv = unsafe { _mm256_load_si256(q.add(i)) };
                if W::SIGNED {
                    // SAFETY: as for wv.
                    let sw = unsafe { _mm256_load_si256(sq.add(i)) };
                    for j in 0..R {
                        let pr = _mm256_maddubs_epi16(wv, _mm256_sign_epi8(xv[j], sw));
                        isum[j][p] = _mm256_add_epi32(isum[j][p], _mm256_madd_epi16(pr, ones));
                    }
                } else {
                    for j in 0..R {
                        s16[j][p] = _mm256_add_epi16(s16[j][p], _mm256_maddubs_epi16(wv, xv[j]));
                    }
                }
            }
            if !W::SIGNED && (t + 1) % W::RUN16 == 0 {
                for j in 0..R {
                    for p in 0..PANEL {
                        isum[j][p] =
                            _mm256_add_epi32(isum[j][p], _mm256_madd_epi16(s16[j][p], ones));
                        s16[j][p] = _mm256_setzero_si256();
                    }
                }
            }
        }
        // SAFETY: group g decoded, x's scales in bounds (checked); AVX2, F16C (contract).
        unsafe { floats::<W, R>(buf, g, x, &isum, acc) };
    }
}

/// `kernel` with AVX-VNNI: `vpdpbusd` of the weights plus BIAS (decoded with `vnni = true`)
/// with the activations, started at `-BIAS · Σx`.
///
/// # Safety
/// AVX2, F16C and AVX-VNNI (`cpu::has_avx_vnni`); `buf` decoded with `vnni = true`; lengths
/// as `kernel` (checked).
// (indices j, p over the register tile read more plainly than zipped iterators)
#[allow(clippy::needless_range_loop)]
#[target_feature(enable = "avx2,f16c,avxvnni")]
pub unsafe fn kernel_vnni<W: Gemm2, const R: usize>(
    buf: &PanelBuf,
    groups: usize,
    x: &[XRow2<'_>; R],
    acc: &mut [Acc2; R],
) {
    check::<W>(groups, x);
    let q = buf.q.as_ptr() as *const __m256i;
    for g in 0..groups {
        let mut isum = [[_mm256_setzero_si256(); PANEL]; R];
        if W::BIAS != 0 {
            for (j, is) in isum.iter_mut().enumerate() {
                // SAFETY: sums of group g in bounds (checked).
                *is = [unsafe { start(&x[j], g, W::BIAS) }; PANEL];
            }
        }
        for t in 0..8 {
            let mut xv = [_mm256_setzero_si256(); R];
            for (j, v) in xv.iter_mut().enumerate() {
                // SAFETY: bytes g·256 + 32t .. + 32 of xt, in bounds (checked).
                *v = unsafe {
                    _mm256_loadu_si256(
                        x[j].xt.as_ptr().add(g * GROUP_BYTES + 32 * t) as *const __m256i
                    )
                };
            }
            for p in 0..PANEL {
                // SAFETY: line (g·8 + t)·PANEL + p in bounds, aligned (as in `kernel`).
                let wv = unsafe { _mm256_load_si256(q.add((g * 8 + t) * PANEL + p)) };
                for j in 0..R {
                    isum[j][p] = _mm256_dpbusd_avx_epi32(isum[j][p], wv, xv[j]);
                }
            }
        }
        // SAFETY: as in `kernel`.
        unsafe { floats::<W, R>(buf, g, x, &isum, acc) };
    }
}

/// Prefetches (into L2) the bytes of groups `g0..g0 + groups` of the panel's rows, the chunk
/// `decode_panel` reads next, so the decode does not wait on memory at small M.
pub fn prefetch<W: Gemm2>(w: [&[W]; PANEL], g0: usize, groups: usize) {
    for wi in w {
        let b: &[u8] = bytemuck::cast_slice(&wi[g0 * LANES..(g0 + groups) * LANES]);
        for off in (0..b.len()).step_by(64).chain([b.len().saturating_sub(1)]) {
            // SAFETY: off < b.len() (b is not empty: groups >= 1); prefetching never faults.
            unsafe { _mm_prefetch::<_MM_HINT_T1>(b.as_ptr().add(off) as *const i8) };
        }
    }
}
