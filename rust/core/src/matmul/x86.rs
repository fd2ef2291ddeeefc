//! AVX2 versions of the dot products in `reference.rs`, chosen at run time (`cpu::has_avx2`,
//! which honours FERROQUANT_FORCE_SCALAR). Integer sums are exact, so any summation order gives
//! the reference's integers; float products and lane accumulations are the reference's
//! operations in the reference's order (separate multiply and add, no FMA), so the results are
//! identical bit for bit. Where a row of the 32-weight formats ends in fewer than 8 blocks, the
//! tail's integer sums are vector ones too (`tail_products`), its float operations the
//! reference's on the same lanes; other tails (8 elements) run the reference's scalar code.
//!
//! Safety of every function here: callers must have checked AVX2 and F16C at run time, and pass
//! slices of matching lengths (checked by the callers in `mod.rs`); all loads are unaligned
//! loads from in-bounds pointers of those slices.

use std::arch::x86_64::*;

use super::reference::{self as r, Block32, LANES};
use crate::formats::blocks::*;

#[inline(always)]
pub(crate) fn lanes_of(v: __m256) -> [f32; LANES] {
    let mut a = [0.0f32; LANES];
    // SAFETY: `a` has room for 8 f32; storeu has no alignment requirement.
    unsafe { _mm256_storeu_ps(a.as_mut_ptr(), v) };
    a
}

/// 8 x i32 partial sums of one block: `w` (32 signed i8) times the 32 i8 at `x`.
#[target_feature(enable = "avx2")]
#[inline]
unsafe fn block_isums(w: __m256i, x: &[i8; 32]) -> __m256i {
    let xv = _mm256_loadu_si256(x.as_ptr() as *const __m256i);
    // |w| (unsigned) times x with w's sign; |x| <= 127 (our quantizers never give -128), so
    // the pairs of maddubs cannot saturate: 2 * 128 * 127 < 32767.
    let p16 = _mm256_maddubs_epi16(_mm256_sign_epi8(w, w), _mm256_sign_epi8(xv, w));
    _mm256_madd_epi16(p16, _mm256_set1_epi16(1))
}

/// 8 x i32 partial sums of one block: the unsigned levels `wu` (`Load32::load_unsigned`, at
/// most 31: `UNSIGNED_MAX_BIAS`) times the 32 i8 at `x`, with no sign fix-up: a maddubs pair is
/// at most 2 * 31 * 128 < 32767, so nothing saturates.
#[target_feature(enable = "avx2")]
#[inline]
unsafe fn block_isums_unsigned(wu: __m256i, x: &[i8; 32]) -> __m256i {
    let xv = _mm256_loadu_si256(x.as_ptr() as *const __m256i);
    _mm256_madd_epi16(_mm256_maddubs_epi16(wu, xv), _mm256_set1_epi16(1))
}

/// 8 x i32 partial sums of one block, `w` (32 signed i8) times the 32 i8 at `x`, for any values
/// (x = -128 too, where `block_isums`' sign trick is wrong): both widened to i16, `vpmaddwd`.
/// Four more operations than `block_isums`; for the tails (`tail_products`), whose activations
/// the tests take to the i8 limits.
#[target_feature(enable = "avx2")]
#[inline]
unsafe fn block_isums_wide(w: __m256i, x: &[i8; 32]) -> __m256i {
    let xv = _mm256_loadu_si256(x.as_ptr() as *const __m256i);
    let wl = _mm256_cvtepi8_epi16(_mm256_castsi256_si128(w));
    let wh = _mm256_cvtepi8_epi16(_mm256_extracti128_si256::<1>(w));
    let xl = _mm256_cvtepi8_epi16(_mm256_castsi256_si128(xv));
    let xh = _mm256_cvtepi8_epi16(_mm256_extracti128_si256::<1>(xv));
    _mm256_add_epi32(_mm256_madd_epi16(wl, xl), _mm256_madd_epi16(wh, xh))
}

/// Formats whose `BIAS` is at most this have unsigned levels of at most 31 (q4_0, q5_0, q4_1,
/// q5_1): `block32_avx2` multiplies those and subtracts `BIAS · Σx` (as the VNNI kernels do),
/// two sign operations a block fewer than `block_isums`. q8_0 and iq4_nl (BIAS 128) keep them.
const UNSIGNED_MAX_BIAS: i32 = 16;

/// The sum of the 8 i32 lanes of `v` (exact in wrapping i32, as the reference's integer sums).
#[target_feature(enable = "avx2")]
#[inline]
pub(crate) fn hsum_epi32(v: __m256i) -> i32 {
    let s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    let s = _mm_add_epi32(s, _mm_unpackhi_epi64(s, s));
    let s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0b01));
    _mm_cvtsi128_si32(s)
}

/// The exact integer sum of one weight block with one q8_0 block, by VNNI:
/// Σ (w + BIAS) x - BIAS Σx (`xsum`).
#[target_feature(enable = "avx2,avx512f,avx512vl,avx512vnni")]
#[inline]
pub(crate) unsafe fn isum_vnni<W: Load32>(wu: __m256i, x: &BlockQ8_0, xsum: i32) -> i32 {
    // SAFETY: the 32 bytes loaded are x.qs ([i8; 32]); AVX2 is this function's contract.
    let xv = unsafe { _mm256_loadu_si256(x.qs.as_ptr() as *const __m256i) };
    hsum_epi32(_mm256_dpbusd_epi32(_mm256_setzero_si256(), wu, xv)) - W::BIAS * xsum
}

/// Horizontal sums of 8 vectors of 8 i32: lane j of the result is the sum of `v[j]`.
#[target_feature(enable = "avx2")]
#[inline]
fn reduce8(v: &[__m256i; 8]) -> __m256i {
    let h01 = _mm256_hadd_epi32(v[0], v[1]);
    let h23 = _mm256_hadd_epi32(v[2], v[3]);
    let h45 = _mm256_hadd_epi32(v[4], v[5]);
    let h67 = _mm256_hadd_epi32(v[6], v[7]);
    // [v0lo v1lo v2lo v3lo | v0hi v1hi v2hi v3hi] (lo/hi = sum of the low/high 4 lanes)
    let a = _mm256_hadd_epi32(h01, h23);
    let b = _mm256_hadd_epi32(h45, h67);
    let lo = _mm256_permute2x128_si256(a, b, 0x20);
    let hi = _mm256_permute2x128_si256(a, b, 0x31);
    _mm256_add_epi32(lo, hi)
}

/// The 32 nibbles of 16 bytes in ggml order: low nibbles (elements 0..15), then high nibbles.
#[target_feature(enable = "avx2")]
#[inline]
unsafe fn nibbles_ggml(qs: &[u8; 16]) -> __m256i {
    let q = _mm_loadu_si128(qs.as_ptr() as *const __m128i);
    let m4 = _mm_set1_epi8(0x0f);
    let lo = _mm_and_si128(q, m4);
    let hi = _mm_and_si128(_mm_srli_epi16(q, 4), m4);
    _mm256_set_m128i(hi, lo)
}

/// A weight block of 32 as 32 signed i8 in element order.
pub trait Load32: Block32 {
    /// # Safety
    /// AVX2 must be available.
    unsafe fn load(&self) -> __m256i;
    /// The weights plus `BIAS`, as 32 unsigned bytes (for the u8 x i8 VNNI product).
    ///
    /// # Safety
    /// AVX2 must be available.
    unsafe fn load_unsigned(&self) -> __m256i;
    const BIAS: i32;
}

impl Load32 for BlockQ4_0 {
    #[inline(always)]
    unsafe fn load(&self) -> __m256i {
        // SAFETY: AVX2 is available (this method's contract).
        unsafe { _mm256_sub_epi8(nibbles_ggml(&self.qs), _mm256_set1_epi8(8)) }
    }
    #[inline(always)]
    unsafe fn load_unsigned(&self) -> __m256i {
        // SAFETY: AVX2 is available (this method's contract).
        unsafe { nibbles_ggml(&self.qs) }
    }
    const BIAS: i32 = 8;
}

impl Load32 for BlockQ8_0 {
    #[inline(always)]
    unsafe fn load(&self) -> __m256i {
        // SAFETY: qs is 32 bytes; AVX is available.
        unsafe { _mm256_loadu_si256(self.qs.as_ptr() as *const __m256i) }
    }
    #[inline(always)]
    unsafe fn load_unsigned(&self) -> __m256i {
        // SAFETY: qs is 32 bytes; AVX2 is available. w ^ 0x80 == w + 128 as u8.
        unsafe {
            _mm256_xor_si256(
                _mm256_loadu_si256(self.qs.as_ptr() as *const __m256i),
                _mm256_set1_epi8(-128),
            )
        }
    }
    const BIAS: i32 = 128;
}

impl Load32 for BlockQ5_0 {
    #[inline(always)]
    unsafe fn load(&self) -> __m256i {
        // SAFETY: AVX2 is available (this method's contract).
        unsafe { _mm256_sub_epi8(self.load_unsigned(), _mm256_set1_epi8(16)) }
    }
    #[inline(always)]
    unsafe fn load_unsigned(&self) -> __m256i {
        // SAFETY: AVX2 is available (this method's contract). The levels 0..31: the nibbles
        // plus bit j of qh as bit 4 of element j (as q5_1's).
        unsafe { min32::q5_levels(&self.qs, self.qh) }
    }
    const BIAS: i32 = 16;
}

impl Load32 for BlockIQ4NL {
    #[inline(always)]
    unsafe fn load(&self) -> __m256i {
        // SAFETY: 16-byte table loaded from a 16-element i8 array; AVX2 is available.
        unsafe {
            let t = _mm_loadu_si128(r::KVALUES_IQ4NL.as_ptr() as *const __m128i);
            _mm256_shuffle_epi8(_mm256_set_m128i(t, t), nibbles_ggml(&self.qs))
        }
    }
    #[inline(always)]
    unsafe fn load_unsigned(&self) -> __m256i {
        // SAFETY: as `load`; the table is kvalues + 128 (1..241).
        unsafe {
            let t = _mm_loadu_si128(KVALUES_IQ4NL_U8.as_ptr() as *const __m128i);
            _mm256_shuffle_epi8(_mm256_set_m128i(t, t), nibbles_ggml(&self.qs))
        }
    }
    const BIAS: i32 = 128;
}

/// ggml's kvalues_iq4nl plus 128.
pub(crate) const KVALUES_IQ4NL_U8: [u8; 16] = {
    let mut t = [0u8; 16];
    let mut i = 0;
    while i < 16 {
        t[i] = (r::KVALUES_IQ4NL[i] as i16 + 128) as u8;
        i += 1;
    }
    t
};

/// `dot_block32` with AVX-512 VNNI: per block `dpbusd(w + BIAS, x)` (u8 x i8 products summed
/// in i32, exact: 4 * 255 * 127 per step) minus `BIAS * Σx` (`xsum`, the activation block's
/// quant sum) is the same integer as the reference's Σ w x; the float part is `dot_block32`'s.
///
/// # Safety
/// AVX2, F16C, AVX-512F/VL/VNNI must be available (`cpu::has_vnni`); every `x[r]`, `xd[r]`,
/// `xsum[r]` has at least `w.len()` entries.
#[target_feature(enable = "avx2,f16c,avx512f,avx512vl,avx512vnni")]
pub unsafe fn dot_block32_vnni<W: Load32, const R: usize>(
    w: &[W],
    x: [&[BlockQ8_0]; R],
    xd: [&[f32]; R],
    xsum: [&[i32]; R],
    long: bool,
) -> [f32; R] {
    // SAFETY: the caller's contract is this function's.
    unsafe {
        if long {
            block32_vnni::<W, R, true>(w, x, xd, xsum, None)
        } else {
            block32_vnni::<W, R, false>(w, x, xd, xsum, None)
        }
    }
}

/// `reference::dot_block32_min` (q4_1 / q5_1 against q8_1) with AVX-512 VNNI: the integer sums
/// of `dot_block32_vnni`, then `(dw * dx) * isum + mw * sx` lane-wise.
///
/// # Safety
/// As `dot_block32_vnni`; every `xs[r]` also has at least `w.len()` entries.
#[target_feature(enable = "avx2,f16c,avx512f,avx512vl,avx512vnni")]
pub unsafe fn dot_block32_min_vnni<W: Load32, const R: usize>(
    w: &[W],
    x: [&[BlockQ8_0]; R],
    xd: [&[f32]; R],
    xsum: [&[i32]; R],
    xs: [&[f32]; R],
    long: bool,
) -> [f32; R] {
    // SAFETY: the caller's contract is this function's.
    unsafe {
        if long {
            block32_vnni::<W, R, true>(w, x, xd, xsum, Some(xs))
        } else {
            block32_vnni::<W, R, false>(w, x, xd, xsum, Some(xs))
        }
    }
}

/// Bytes ahead of the weights being read that `prefetch_ahead` asks for.
pub(crate) const PREFETCH_AHEAD: usize = 8192;

/// Prefetch (into L2, `_MM_HINT_T1`) the weight bytes `PREFETCH_AHEAD` past the group `wg`.
/// For long rows at M = 1 (`mod.rs`: K above `LONG_K`): one weight row plus the activations
/// exceed L1, the activations are re-read from L2 every row, and the hardware prefetchers alone
/// left q8_0 at K = 14336 streaming at half the rate of K = 4096 (measured in the commit that
/// added this; at K = 4096 the same prefetch was a little slower, so short rows go without).
/// L2 8 KiB ahead rather than L1 2 KiB (14336x4096, 2 threads, quiet, 2026-11-27 13:15 UTC,
/// alternating runs): q4_1 21.9-23.1 -> 24.1-24.8 GB/s, q6_k's AVX2 kernel 23.6-25.3 -> 26.4,
/// q3_k unchanged (13.5: compute bound).
/// A prefetch is a hint: an address past the end of `w` is never dereferenced, so
/// `wrapping_add` keeps it sound.
#[target_feature(enable = "avx2")]
#[inline]
pub(crate) fn prefetch_ahead<W>(wg: &[W]) {
    prefetch_l2(
        wg.as_ptr() as *const u8,
        std::mem::size_of_val(wg),
        PREFETCH_AHEAD,
    );
}

/// Prefetch into L2 (`_MM_HINT_T1`) the `len` bytes `ahead` past `p`, one line per 64 bytes.
/// A hint: an address past the data is never dereferenced, so `wrapping_add` keeps it sound.
#[target_feature(enable = "avx2")]
#[inline]
pub(crate) fn prefetch_l2(p: *const u8, len: usize, ahead: usize) {
    let q = p.wrapping_add(ahead) as *const i8;
    let mut o = 0;
    while o < len {
        _mm_prefetch::<_MM_HINT_T1>(q.wrapping_add(o));
        o += 64;
    }
}

/// The 8 f16 values `h` of a group of blocks as f32.
#[target_feature(enable = "avx2,f16c")]
#[inline]
fn halves8(h: [Half; LANES]) -> __m256 {
    let bits: [u16; LANES] = h.map(u16::from_le_bytes);
    // SAFETY: `bits` is 16 bytes; loadu has no alignment requirement.
    _mm256_cvtph_ps(unsafe { _mm_loadu_si128(bits.as_ptr() as *const __m128i) })
}

/// The lanes `acc`, plus the blocks past the last group of 8 (`tail_products`), then the
/// reference's `hsum8`.
///
/// # Safety
/// AVX2 and F16C; `x`, `xd` (and `xs`) have at least `w.len()` entries.
#[target_feature(enable = "avx2,f16c")]
#[inline]
unsafe fn finish32<W: Load32>(
    w: &[W],
    acc: __m256,
    x: &[BlockQ8_0],
    xd: &[f32],
    xs: Option<&[f32]>,
) -> f32 {
    let mut lanes = lanes_of(acc);
    let b0 = w.len() / LANES * LANES;
    if b0 < w.len() {
        let tail = &w[b0..];
        let mut q = [_mm256_setzero_si256(); LANES];
        let (mut d, mut m) = ([[0u8; 2]; LANES], [[0u8; 2]; LANES]);
        for (i, b) in tail.iter().enumerate() {
            // SAFETY: AVX2 (contract); b is one whole block.
            q[i] = unsafe { b.load() };
            d[i] = b.d();
            m[i] = b.m();
        }
        let xs = xs.map(|s| &s[b0..]);
        // SAFETY: AVX2, F16C (contract); x, xd (and xs) hold the tail's blocks from b0.
        let p = unsafe { tail_products(&q, tail.len(), d, m, &x[b0..], &xd[b0..], xs) };
        for (l, pl) in lanes.iter_mut().zip(p).take(tail.len()) {
            *l += pl;
        }
    }
    r::hsum8(&lanes)
}

/// The products of `len` (< 8) blocks past a row's last whole group, block i in lane i (lane
/// `b % 8` of block b): `(d_w · d_x) · isum` (q4_1 / q5_1 with `xs`: `+ m_w · s_x`), the
/// reference's float operations (`block32_product`, `block32_min_product`) lane by lane on the
/// integer sums of `block_isums_wide` (exact for any i8: the reference's integers); lanes from
/// `len` on hold zero products. `q[i]` is block i's 32 signed weights (`Load32::load`), `d` / `m` its f16
/// scale and offset; `x`, `xd`, `xs` the activation blocks from the same block on.
///
/// # Safety
/// AVX2 and F16C; `len < 8`; `x`, `xd` (and `xs`) have at least `len` entries.
#[target_feature(enable = "avx2,f16c")]
#[inline]
pub(crate) unsafe fn tail_products(
    q: &[__m256i; LANES],
    len: usize,
    d: [Half; LANES],
    m: [Half; LANES],
    x: &[BlockQ8_0],
    xd: &[f32],
    xs: Option<&[f32]>,
) -> [f32; LANES] {
    let mut s = [_mm256_setzero_si256(); LANES];
    let (mut dx, mut sx) = ([0f32; LANES], [0f32; LANES]);
    for i in 0..len {
        // SAFETY: AVX2 (contract); x[i].qs is 32 bytes.
        s[i] = unsafe { block_isums_wide(q[i], &x[i].qs) };
        dx[i] = xd[i];
        if let Some(xs) = xs {
            sx[i] = xs[i];
        }
    }
    let isum = _mm256_cvtepi32_ps(reduce8(&s));
    // SAFETY: 8 f32 from arrays of 8.
    let (dxv, sxv) = unsafe { (_mm256_loadu_ps(dx.as_ptr()), _mm256_loadu_ps(sx.as_ptr())) };
    let p = _mm256_mul_ps(_mm256_mul_ps(halves8(d), dxv), isum);
    let p = if xs.is_some() {
        _mm256_add_ps(p, _mm256_mul_ps(halves8(m), sxv))
    } else {
        p
    };
    lanes_of(p)
}

#[target_feature(enable = "avx2,f16c,avx512f,avx512vl,avx512vnni")]
#[inline]
unsafe fn block32_vnni<W: Load32, const R: usize, const PF: bool>(
    w: &[W],
    x: [&[BlockQ8_0]; R],
    xd: [&[f32]; R],
    xsum: [&[i32]; R],
    xs: Option<[&[f32]; R]>,
) -> [f32; R] {
    let nb = w.len();
    let groups = nb / LANES;
    let bias = _mm256_set1_epi32(W::BIAS);
    let mut acc = [_mm256_setzero_ps(); R];
    for g in 0..groups {
        let wg = &w[g * LANES..g * LANES + LANES];
        if PF {
            prefetch_ahead(wg);
        }
        let mut wv = [_mm256_setzero_si256(); 8];
        for j in 0..LANES {
            // SAFETY: AVX2, the caller's contract (`cpu::has_vnni`); wg[j] is one whole block.
            wv[j] = unsafe { wg[j].load_unsigned() };
        }
        let dw = halves8(std::array::from_fn(|j| wg[j].d()));
        let mw = if W::HAS_MIN {
            halves8(std::array::from_fn(|j| wg[j].m()))
        } else {
            _mm256_setzero_ps()
        };
        for r in 0..R {
            let xg = &x[r][g * LANES..g * LANES + LANES];
            let mut s = [_mm256_setzero_si256(); 8];
            for j in 0..LANES {
                // SAFETY: the 32 bytes loaded are xg[j].qs ([i8; 32]); AVX2 (contract).
                let xv = unsafe { _mm256_loadu_si256(xg[j].qs.as_ptr() as *const __m256i) };
                s[j] = _mm256_dpbusd_epi32(_mm256_setzero_si256(), wv[j], xv);
            }
            // SAFETY: 8 i32 from g * 8: (g + 1) * 8 <= w.len() <= xsum[r].len()
            // (groups = w.len() / 8 and the caller's contract).
            let xsm =
                unsafe { _mm256_loadu_si256(xsum[r][g * LANES..].as_ptr() as *const __m256i) };
            let isum = _mm256_sub_epi32(reduce8(&s), _mm256_mullo_epi32(bias, xsm));
            // SAFETY: 8 f32 from g * 8: (g + 1) * 8 <= w.len() <= xd[r].len() (groups =
            // w.len() / 8 and the caller's contract).
            let dx = unsafe { _mm256_loadu_ps(xd[r][g * LANES..].as_ptr()) };
            let p = _mm256_mul_ps(_mm256_mul_ps(dw, dx), _mm256_cvtepi32_ps(isum));
            // (no closure here: closures do not inherit the target features)
            let p = if let Some(xs) = xs {
                // SAFETY: 8 f32 from g * 8: (g + 1) * 8 <= w.len() <= xs[r].len() (as for xd).
                let sx = unsafe { _mm256_loadu_ps(xs[r][g * LANES..].as_ptr()) };
                _mm256_add_ps(p, _mm256_mul_ps(mw, sx))
            } else {
                p
            };
            acc[r] = _mm256_add_ps(acc[r], p);
        }
    }
    let mut out = [0f32; R];
    for r in 0..R {
        // SAFETY: AVX2, F16C (contract); x[r], xd[r] (and xs[r]) have w.len() entries.
        out[r] = unsafe { finish32(w, acc[r], x[r], xd[r], xs.map(|xs| xs[r])) };
    }
    out
}

/// `reference::dot_block32` for R activation rows at once (the weights are decoded once per
/// group of 8 blocks and reused): per row, the 8 blocks' integer sums in one register, then
/// `acc += (dw * dx) * float(isum)` lane-wise; each row's operations are those of R = 1.
///
/// # Safety
/// AVX2 and F16C must be available; every `x[r]`, `xd[r]` and `xsum[r]` (the activation
/// blocks' quant sums) has at least `w.len()` entries.
#[target_feature(enable = "avx2,f16c")]
pub unsafe fn dot_block32<W: Load32, const R: usize>(
    w: &[W],
    x: [&[BlockQ8_0]; R],
    xd: [&[f32]; R],
    xsum: [&[i32]; R],
) -> [f32; R] {
    // SAFETY: the caller's contract is this function's.
    unsafe { block32_avx2(w, x, xd, xsum, None) }
}

/// `reference::dot_block32_min` (q4_1 / q5_1 against q8_1) for R rows at once: the integer
/// sums of `dot_block32`, then `acc += (dw * dx) * float(isum) + mw * sx` lane-wise.
///
/// # Safety
/// As `dot_block32`; every `xs[r]` also has at least `w.len()` entries.
#[target_feature(enable = "avx2,f16c")]
pub unsafe fn dot_block32_min<W: Load32, const R: usize>(
    w: &[W],
    x: [&[BlockQ8_0]; R],
    xd: [&[f32]; R],
    xs: [&[f32]; R],
) -> [f32; R] {
    // SAFETY: the caller's contract is this function's (q4_1 / q5_1 have BIAS 0: no sums
    // are read).
    unsafe { block32_avx2(w, x, xd, [&[]; R], Some(xs)) }
}

#[target_feature(enable = "avx2,f16c")]
#[inline]
unsafe fn block32_avx2<W: Load32, const R: usize>(
    w: &[W],
    x: [&[BlockQ8_0]; R],
    xd: [&[f32]; R],
    xsum: [&[i32]; R],
    xs: Option<[&[f32]; R]>,
) -> [f32; R] {
    let nb = w.len();
    let groups = nb / LANES;
    let unsigned = W::BIAS <= UNSIGNED_MAX_BIAS;
    let biased = unsigned && W::BIAS != 0;
    assert!(!biased || xsum.iter().all(|s| s.len() >= groups * LANES));
    let bias = _mm256_set1_epi32(W::BIAS);
    let mut acc = [_mm256_setzero_ps(); R];
    for g in 0..groups {
        let wg = &w[g * LANES..g * LANES + LANES];
        let mut wv = [_mm256_setzero_si256(); 8];
        for j in 0..LANES {
            // SAFETY: AVX2, the caller's contract (`cpu::has_avx2`); wg[j] is one whole block.
            wv[j] = unsafe {
                if unsigned {
                    wg[j].load_unsigned()
                } else {
                    wg[j].load()
                }
            };
        }
        let dw = halves8(std::array::from_fn(|j| wg[j].d()));
        let mw = if W::HAS_MIN {
            halves8(std::array::from_fn(|j| wg[j].m()))
        } else {
            _mm256_setzero_ps()
        };
        for r in 0..R {
            let xg = &x[r][g * LANES..g * LANES + LANES];
            let mut s = [_mm256_setzero_si256(); 8];
            for j in 0..LANES {
                // SAFETY: AVX2, the caller's contract; both read the 32 bytes of xg[j].qs.
                s[j] = unsafe {
                    if unsigned {
                        block_isums_unsigned(wv[j], &xg[j].qs)
                    } else {
                        block_isums(wv[j], &xg[j].qs)
                    }
                };
            }
            // Σ (w + BIAS)·x - BIAS·Σx: the reference's exact integer (wrapping i32 as hers).
            let isum = if biased {
                // SAFETY: 8 i32 from g * 8 < groups * 8 <= xsum[r].len() (asserted above).
                let xsm =
                    unsafe { _mm256_loadu_si256(xsum[r][g * LANES..].as_ptr() as *const __m256i) };
                _mm256_sub_epi32(reduce8(&s), _mm256_mullo_epi32(bias, xsm))
            } else {
                reduce8(&s)
            };
            // SAFETY: 8 f32 from g * 8: (g + 1) * 8 <= w.len() <= xd[r].len() (groups =
            // w.len() / 8 and the caller's contract).
            let dx = unsafe { _mm256_loadu_ps(xd[r][g * LANES..].as_ptr()) };
            let p = _mm256_mul_ps(_mm256_mul_ps(dw, dx), _mm256_cvtepi32_ps(isum));
            // (no closure here: closures do not inherit the target features)
            let p = if let Some(xs) = xs {
                // SAFETY: 8 f32 from g * 8: (g + 1) * 8 <= w.len() <= xs[r].len() (as for xd).
                let sx = unsafe { _mm256_loadu_ps(xs[r][g * LANES..].as_ptr()) };
                _mm256_add_ps(p, _mm256_mul_ps(mw, sx))
            } else {
                p
            };
            acc[r] = _mm256_add_ps(acc[r], p);
        }
    }
    let mut out = [0f32; R];
    for r in 0..R {
        // SAFETY: AVX2, F16C (contract); x[r], xd[r] (and xs[r]) have w.len() entries.
        out[r] = unsafe { finish32(w, acc[r], x[r], xd[r], xs.map(|xs| xs[r])) };
    }
    out
}

mod row_k;
pub(crate) use row_k::shift_bit_to_4;
pub use row_k::{
    dot_block_k, dot_block_k_prefetch, dot_rows_k_avx2, dot_rows_k_vnni, interleave_k4,
    vnni_rows_k, xz_order, DecodedK, LanesK, RowK, SumsK, XzOrder, XZ_BLOCK,
};

mod k_low;
mod ternary;
pub use k_low::scales_q3_k_kmask;
mod min32;
pub mod row32;
pub mod row32_avx2;

// ---------------------------------------------------------------- f32 activations

pub mod acts16;
pub mod amx32;
// (#[macro_use]: its tile macros serve amx_bf16_small too)
#[macro_use]
pub mod amx_bf16;
pub mod amx_bf16_small;
pub mod amx_k;
pub mod decode16_fp8;
pub mod decode16_ggml;
pub mod decode16_vbmi;
mod decode_k;
mod float_acts;
pub mod gemm16;
pub mod gemm16_fma;
pub mod gemm32;
pub mod gemm32_avx2;
pub mod gemm_k;
pub mod gint;
pub mod gint_row;
pub mod pair32;
pub mod q16;
pub mod q8k;
pub mod tile;
pub mod tile_k;
pub use float_acts::*;
mod q16_avx2;
pub use q16_avx2::{dot_int8_q16_avx2, dot_nf4_q16_avx2, gint as gint_avx2};
