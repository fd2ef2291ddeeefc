//! Tiled kernels for M >= 2 of the 32-weight integer formats (q4_0, q5_0, q8_0, iq4_nl) with
//! AVX-512 VNNI on 256-bit vectors: a panel of `NR` weight rows times a block of activation rows,
//! accumulated group by group (8 blocks of 32) over K. Each weight group is decoded once per
//! panel and block of rows, each activation group is loaded once per panel.
//!
//! **Layout.** A block's integer sum Σ w·x is exact, so it does not depend on the order of its 32
//! products. Weights and activations are therefore both "transposed" per group of 8 blocks:
//! vector t (0..8) holds in its 32-bit lane l the four quants 4t..4t+3 of block l (activations:
//! prepared once per call by `interleave_q8_0`; weights: decoded per group). Eight `vpdpbusd`
//! into one register leave block l's exact Σ (w + BIAS)·x in lane l without any horizontal
//! reduction, and lane l is the reference's float lane of block 8g + l. The float part is the
//! reference's: `acc[l] += (d_w · d_x) · isum` per group in block order, the blocks after the
//! last whole group on the same lanes in scalar code, then `hsum8`: the same bits as
//! `reference::dot_block32` for every output, wherever it sits in a tile.
//!
//! Safety as in `x86.rs`: callers check AVX2, F16C, AVX-512F/VL/VNNI at run time (`cpu::has_vnni`)
//! and pass slices of the lengths stated on each function.

use std::arch::x86_64::*;

use super::{isum_vnni, lanes_of, Load32};
use crate::formats::blocks::*;
use crate::matmul::reference::{self as r, LANES};

/// Bytes of one interleaved group of 8 activation blocks.
pub const GROUP_BYTES: usize = 256;

/// Activation quants of one row of q8_0 blocks rearranged for the tile kernels: per whole group
/// of 8 blocks, 256 bytes where bytes `32t + 4l .. 32t + 4l + 4` are bytes `4t .. 4t + 4` of
/// block l's quants. `out` holds `blocks.len() / 8 * 256` bytes (the tail blocks stay in
/// `blocks` only).
pub fn interleave_q8_0(blocks: &[BlockQ8_0], out: &mut [u8]) {
    for (g, o) in blocks
        .chunks_exact(LANES)
        .zip(out.chunks_exact_mut(GROUP_BYTES))
    {
        for (l, b) in g.iter().enumerate() {
            let q: &[u8; 32] = bytemuck::cast_ref(&b.qs);
            for t in 0..8 {
                o[32 * t + 4 * l..32 * t + 4 * l + 4].copy_from_slice(&q[4 * t..4 * t + 4]);
            }
        }
    }
}

/// 8 vectors of 8 dwords transposed: lane l of output t = lane t of input l.
#[target_feature(enable = "avx2")]
#[inline]
pub(crate) fn transpose8(v: [__m256i; 8]) -> [__m256i; 8] {
    let mut t = [_mm256_setzero_si256(); 8];
    for i in 0..4 {
        t[2 * i] = _mm256_unpacklo_epi32(v[2 * i], v[2 * i + 1]);
        t[2 * i + 1] = _mm256_unpackhi_epi32(v[2 * i], v[2 * i + 1]);
    }
    // u[c] (c < 4) = dword c | dword c + 4 of rows 0..3; u[4 + c] the same of rows 4..7
    let mut u = [_mm256_setzero_si256(); 8];
    for h in 0..2 {
        let (a, b, c, d) = (t[4 * h], t[4 * h + 1], t[4 * h + 2], t[4 * h + 3]);
        u[4 * h] = _mm256_unpacklo_epi64(a, c);
        u[4 * h + 1] = _mm256_unpackhi_epi64(a, c);
        u[4 * h + 2] = _mm256_unpacklo_epi64(b, d);
        u[4 * h + 3] = _mm256_unpackhi_epi64(b, d);
    }
    let mut o = [_mm256_setzero_si256(); 8];
    for c in 0..4 {
        o[c] = _mm256_permute2x128_si256(u[c], u[4 + c], 0x20);
        o[c + 4] = _mm256_permute2x128_si256(u[c], u[4 + c], 0x31);
    }
    o
}

/// The 16 quant bytes of 8 q4_0-style blocks transposed: output c (0..4), lane l = bytes
/// 4c..4c+4 of block l (their low nibbles are elements 4c.., the high ones 16 + 4c..).
#[target_feature(enable = "avx2")]
#[inline]
unsafe fn qs16_transposed(qs: [&[u8; 16]; 8]) -> [__m256i; 4] {
    // (Loops, not closures, around intrinsics: a closure does not inherit target features.)
    let mut a = [_mm256_setzero_si256(); 4];
    for (l, v) in a.iter_mut().enumerate() {
        // SAFETY: each load reads the 16 bytes of one &[u8; 16] (l < 4, so l + 4 < 8 indexes
        // qs); SSE2 is baseline.
        let (lo, hi) = unsafe {
            (
                _mm_loadu_si128(qs[l].as_ptr() as *const __m128i),
                _mm_loadu_si128(qs[l + 4].as_ptr() as *const __m128i),
            )
        };
        *v = _mm256_set_m128i(hi, lo);
    }
    let t0 = _mm256_unpacklo_epi32(a[0], a[1]);
    let t1 = _mm256_unpackhi_epi32(a[0], a[1]);
    let t2 = _mm256_unpacklo_epi32(a[2], a[3]);
    let t3 = _mm256_unpackhi_epi32(a[2], a[3]);
    [
        _mm256_unpacklo_epi64(t0, t2),
        _mm256_unpackhi_epi64(t0, t2),
        _mm256_unpacklo_epi64(t1, t3),
        _mm256_unpackhi_epi64(t1, t3),
    ]
}

/// Nibbles of `qs16_transposed`: vector t < 4 = low nibbles of c = t, t >= 4 = high nibbles of
/// c = t - 4, i.e. elements 4t..4t+4 of each block in lane order.
#[target_feature(enable = "avx2")]
#[inline]
fn nibbles_t(c: [__m256i; 4]) -> [__m256i; 8] {
    let m4 = _mm256_set1_epi8(0x0f);
    let mut o = [_mm256_setzero_si256(); 8];
    for i in 0..4 {
        o[i] = _mm256_and_si256(c[i], m4);
        o[i + 4] = _mm256_and_si256(_mm256_srli_epi16(c[i], 4), m4);
    }
    o
}

/// A 32-weight format whose groups of 8 blocks can be decoded in the transposed layout.
pub trait Tile32: Load32 {
    /// The quants plus `BIAS` of the 8 blocks `w[..8]`, transposed: vector t, lane l = elements
    /// 4t..4t+4 of block l (unsigned bytes).
    ///
    /// # Safety
    /// AVX2 must be available; `w.len() >= 8`.
    #[inline(always)]
    unsafe fn load8_t(w: &[Self]) -> [__m256i; 8] {
        // SAFETY: AVX2 is available (this method's contract); w has 8 blocks.
        unsafe {
            let mut v = [_mm256_setzero_si256(); 8];
            for (l, r) in v.iter_mut().enumerate() {
                *r = w[l].load_unsigned();
            }
            transpose8(v)
        }
    }
}

impl Tile32 for BlockQ8_0 {}
impl Tile32 for BlockQ5_0 {}
impl Tile32 for BlockQ5_1 {}

impl Tile32 for BlockQ4_1 {
    #[inline(always)]
    unsafe fn load8_t(w: &[Self]) -> [__m256i; 8] {
        // SAFETY: AVX2 is available (contract); 16-byte loads of each block's qs.
        unsafe { nibbles_t(qs16_transposed(std::array::from_fn(|l| &w[l].qs))) }
    }
}

impl Tile32 for BlockQ4_0 {
    #[inline(always)]
    unsafe fn load8_t(w: &[Self]) -> [__m256i; 8] {
        // SAFETY: AVX2 is available (contract); 16-byte loads of each block's qs.
        unsafe { nibbles_t(qs16_transposed(std::array::from_fn(|l| &w[l].qs))) }
    }
}

impl Tile32 for BlockIQ4NL {
    #[inline(always)]
    unsafe fn load8_t(w: &[Self]) -> [__m256i; 8] {
        // SAFETY: AVX2 is available (contract); the table is 16 bytes (kvalues + 128).
        unsafe {
            let t = _mm_loadu_si128(super::KVALUES_IQ4NL_U8.as_ptr() as *const __m128i);
            let tab = _mm256_set_m128i(t, t);
            let mut v = nibbles_t(qs16_transposed(std::array::from_fn(|l| &w[l].qs)));
            for r in v.iter_mut() {
                *r = _mm256_shuffle_epi8(tab, *r);
            }
            v
        }
    }
}

/// One block of activation rows for `tile32_vnni`: `rows` rows, each with `nb` q8_0 blocks.
pub struct RowsQ8<'a> {
    /// Interleaved quants (`interleave_q8_0`), `nb / 8 * 256` bytes per row.
    pub xt: &'a [u8],
    pub blocks: &'a [BlockQ8_0],
    /// Each block's scale as f32 and the sum of its quants.
    pub d: &'a [f32],
    pub sums: &'a [i32],
    /// q8_1 activations (q4_1 / q5_1 weights): each block's `s` as f32; empty for q8_0.
    pub s: &'a [f32],
}

/// The outputs of `NR` weight rows (one panel) with every row of `x`: `out[r][i]` = the dot of
/// weight row `i` with activation row `r`, bit for bit `reference::dot_block32`'s.
///
/// # Safety
/// AVX2, F16C, AVX-512F/VL/VNNI must be available (`cpu::has_vnni`). Every `w[i]` has `nb` blocks;
/// `x` has `out.len()` rows of `nb` blocks (`xt`: `nb / 8 * 256` bytes per row).
#[target_feature(enable = "avx2,f16c,avx512f,avx512vl,avx512vnni")]
pub unsafe fn tile32_vnni<W: Tile32, const NR: usize>(
    w: [&[W]; NR],
    x: &RowsQ8<'_>,
    out: &mut [[f32; NR]],
) {
    let nb = w[0].len();
    let groups = nb / LANES;
    let rows = out.len();
    let gbytes = groups * GROUP_BYTES;
    debug_assert!(x.xt.len() >= rows * gbytes && x.d.len() >= rows * nb);
    debug_assert!(W::BIAS.count_ones() == 1 && !W::HAS_MIN);
    let shift = _mm_cvtsi32_si128(W::BIAS.trailing_zeros() as i32);
    let mut acc = vec![[_mm256_setzero_ps(); NR]; rows];
    for g in 0..groups {
        let mut wv = [[_mm256_setzero_si256(); 8]; NR];
        let mut dw = [_mm256_setzero_ps(); NR];
        for i in 0..NR {
            let wg = &w[i][g * LANES..g * LANES + LANES];
            // SAFETY: AVX2, the caller's contract (`cpu::has_vnni`); wg is a checked slice of 8 blocks.
            wv[i] = unsafe { W::load8_t(wg) };
            let dh: [u16; 8] = std::array::from_fn(|j| u16::from_le_bytes(wg[j].d()));
            // SAFETY: dh is 8 u16, the 16 bytes loaded; F16C (contract).
            dw[i] = _mm256_cvtph_ps(unsafe { _mm_loadu_si128(dh.as_ptr() as *const __m128i) });
        }
        for (rr, a) in acc.iter_mut().enumerate() {
            let xg = &x.xt[rr * gbytes + g * GROUP_BYTES..rr * gbytes + (g + 1) * GROUP_BYTES];
            let mut xv = [_mm256_setzero_si256(); 8];
            for (t, v) in xv.iter_mut().enumerate() {
                // SAFETY: t < 8: bytes 32t..32t + 32 of xg, a checked slice of GROUP_BYTES = 256.
                *v = unsafe { _mm256_loadu_si256(xg[32 * t..].as_ptr() as *const __m256i) };
            }
            let at = rr * nb + g * LANES;
            // BIAS · Σx per block (BIAS is a power of two)
            // SAFETY: x.sums[at..at + 8] is a checked slice of 8 i32, the 32 bytes loaded.
            let sums =
                unsafe { _mm256_loadu_si256(x.sums[at..at + LANES].as_ptr() as *const __m256i) };
            let bias = _mm256_sll_epi32(sums, shift);
            // SAFETY: x.d[at..at + 8] is a checked slice of 8 f32, the 32 bytes loaded.
            let dx = unsafe { _mm256_loadu_ps(x.d[at..at + LANES].as_ptr()) };
            for i in 0..NR {
                let mut s0 = _mm256_dpbusd_epi32(_mm256_setzero_si256(), wv[i][0], xv[0]);
                let mut s1 = _mm256_dpbusd_epi32(_mm256_setzero_si256(), wv[i][1], xv[1]);
                for t in 1..4 {
                    s0 = _mm256_dpbusd_epi32(s0, wv[i][2 * t], xv[2 * t]);
                    s1 = _mm256_dpbusd_epi32(s1, wv[i][2 * t + 1], xv[2 * t + 1]);
                }
                let isum = _mm256_sub_epi32(_mm256_add_epi32(s0, s1), bias);
                let p = _mm256_mul_ps(_mm256_mul_ps(dw[i], dx), _mm256_cvtepi32_ps(isum));
                a[i] = _mm256_add_ps(a[i], p);
            }
        }
    }
    // (a loop, not `array::map`: a closure over vectors may fall out of line without AVX2)
    let mut lanes: Vec<[[f32; LANES]; NR]> = vec![[[0.0; LANES]; NR]; acc.len()];
    for (l, a) in lanes.iter_mut().zip(&acc) {
        for (li, ai) in l.iter_mut().zip(a) {
            *li = lanes_of(*ai);
        }
    }
    let lanes = lanes;
    // SAFETY: the features of this function (the caller's contract); lengths as stated above.
    unsafe { finish32(w, x, lanes, out) };
}

/// The blocks after the last whole group (integer sums in SIMD, the float operations of
/// `reference::block32_product` on the same lanes), then `hsum8` of every output's lanes.
///
/// # Safety
/// As `tile32_vnni`; `lanes` has `out.len()` entries.
#[target_feature(enable = "avx2,f16c,avx512f,avx512vl,avx512vnni")]
unsafe fn finish32<W: Tile32, const NR: usize>(
    w: [&[W]; NR],
    x: &RowsQ8<'_>,
    mut lanes: Vec<[[f32; LANES]; NR]>,
    out: &mut [[f32; NR]],
) {
    let nb = w[0].len();
    let groups = nb / LANES;
    for b in groups * LANES..nb {
        for i in 0..NR {
            // SAFETY: AVX2 (contract); w[i][b] is one whole block (checked index).
            let wu = unsafe { w[i][b].load_unsigned() };
            let dw = f16_to_f32(w[i][b].d());
            for (rr, l) in lanes.iter_mut().enumerate() {
                let at = rr * nb + b;
                // SAFETY: AVX-512 VL/VNNI (contract, `cpu::has_vnni`); the block is a checked index.
                let isum = unsafe { isum_vnni::<W>(wu, &x.blocks[at], x.sums[at]) };
                l[i][b % LANES] += if W::HAS_MIN {
                    // `reference::block32_min_product`
                    (dw * x.d[at]) * isum as f32 + f16_to_f32(w[i][b].m()) * x.s[at]
                } else {
                    (dw * x.d[at]) * isum as f32
                };
            }
        }
    }
    for (l, o) in lanes.iter().zip(out.iter_mut()) {
        for i in 0..NR {
            o[i] = r::hsum8(&l[i]);
        }
    }
}

/// One group of a panel's weights decoded for `tile32_vnni512`: `q[t][i]` = vector t of weight
/// row i (`Tile32::load8_t`), `d[i]` its 8 block scales; on 64 bytes so that rows 2p and
/// 2p + 1 load as one 512-bit vector.
#[repr(C, align(64))]
struct PanelGroup<const NR: usize> {
    q: [[__m256i; NR]; 8],
    d: [__m256; NR],
    /// q4_1 / q5_1: the 8 block offsets `m` (zero otherwise).
    m: [__m256; NR],
}

/// `tile32_vnni` on 512-bit vectors: each vector holds two weight rows (2p in lanes 0..8,
/// 2p + 1 in lanes 8..16) against one activation row broadcast to both halves, so one
/// `vpdpbusd` does the work of two and every lane keeps the arithmetic (and the bits) of the
/// 256-bit kernel: lane l of either half is the reference's float lane of block 8g + l.
///
/// # Safety
/// As `tile32_vnni`, plus AVX-512 F/BW (`cpu::has_vnni_bw`); NR is even.
#[target_feature(enable = "avx2,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
pub unsafe fn tile32_vnni512<W: Tile32, const NR: usize>(
    w: [&[W]; NR],
    x: &RowsQ8<'_>,
    out: &mut [[f32; NR]],
) {
    assert!(NR.is_multiple_of(2), "weight rows go in pairs");
    let np = NR / 2;
    let nb = w[0].len();
    let groups = nb / LANES;
    let rows = out.len();
    let gbytes = groups * GROUP_BYTES;
    debug_assert!(x.xt.len() >= rows * gbytes && x.d.len() >= rows * nb);
    debug_assert!(W::BIAS == 0 || W::BIAS.count_ones() == 1);
    debug_assert!(!W::HAS_MIN || x.s.len() >= rows * nb);
    let shift = _mm_cvtsi32_si128(W::BIAS.trailing_zeros().min(32) as i32);
    let mut acc = vec![_mm512_setzero_ps(); rows * np];
    let mut pg = PanelGroup::<NR> {
        q: [[_mm256_setzero_si256(); NR]; 8],
        d: [_mm256_setzero_ps(); NR],
        m: [_mm256_setzero_ps(); NR],
    };
    for g in 0..groups {
        for i in 0..NR {
            let wg = &w[i][g * LANES..g * LANES + LANES];
            // SAFETY: AVX2, the caller's contract; wg is a checked slice of 8 blocks.
            let v = unsafe { W::load8_t(wg) };
            for (t, q) in pg.q.iter_mut().enumerate() {
                q[i] = v[t];
            }
            let dh: [u16; 8] = std::array::from_fn(|j| u16::from_le_bytes(wg[j].d()));
            // SAFETY: dh is 8 u16, the 16 bytes loaded; F16C (contract).
            pg.d[i] = _mm256_cvtph_ps(unsafe { _mm_loadu_si128(dh.as_ptr() as *const __m128i) });
            if W::HAS_MIN {
                let mh: [u16; 8] = std::array::from_fn(|j| u16::from_le_bytes(wg[j].m()));
                // SAFETY: mh is 8 u16, the 16 bytes loaded; F16C (contract).
                pg.m[i] =
                    _mm256_cvtph_ps(unsafe { _mm_loadu_si128(mh.as_ptr() as *const __m128i) });
            }
        }
        // Activation rows in fours (weights and activations each loaded once per four
        // `vpdpbusd`: the kernel is bound by the multiply units, not the loads).
        let mut rr = 0;
        while rr < rows {
            let r = (rows - rr).min(4);
            let a = &mut acc[rr * np..(rr + r) * np];
            let at = (rr, g, gbytes, nb);
            // SAFETY: the features of this function; rows rr..rr + r exist (r <= rows - rr).
            unsafe {
                match r {
                    1 => group_rows::<W, NR, 1>(&pg, x, at, shift, a),
                    2 => group_rows::<W, NR, 2>(&pg, x, at, shift, a),
                    3 => group_rows::<W, NR, 3>(&pg, x, at, shift, a),
                    _ => group_rows::<W, NR, 4>(&pg, x, at, shift, a),
                }
            }
            rr += r;
        }
    }
    let lanes: Vec<[[f32; LANES]; NR]> = acc
        .chunks_exact(np)
        .map(|a| {
            let mut l = [[0.0f32; LANES]; NR];
            for (p, v) in a.iter().enumerate() {
                let h = lanes16(*v);
                l[2 * p].copy_from_slice(&h[..LANES]);
                l[2 * p + 1].copy_from_slice(&h[LANES..]);
            }
            l
        })
        .collect();
    // SAFETY: the features of this function (the caller's contract); lengths as stated above.
    unsafe { finish32(w, x, lanes, out) };
}

/// Group g of activation rows `rr..rr + R` (`at` = (rr, g, interleaved bytes a row, blocks a
/// row)) against the decoded panel group: `acc` (R rows of NR / 2 vectors) += each lane's
/// `(d_w · d_x) · isum`, the reference's operations.
///
/// # Safety
/// As `tile32_vnni512`; x has rows rr..rr + R.
#[target_feature(enable = "avx2,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
#[inline]
unsafe fn group_rows<W: Tile32, const NR: usize, const R: usize>(
    pg: &PanelGroup<NR>,
    x: &RowsQ8<'_>,
    (rr, g, gbytes, nb): (usize, usize, usize, usize),
    shift: __m128i,
    acc: &mut [__m512],
) {
    let np = NR / 2;
    let mut is = [[_mm512_setzero_si512(); R]; NR];
    let mut xg: [&[u8]; R] = [&[]; R];
    for (j, xg) in xg.iter_mut().enumerate() {
        let o = (rr + j) * gbytes + g * GROUP_BYTES;
        *xg = &x.xt[o..o + GROUP_BYTES];
    }
    for t in 0..8 {
        let mut xv = [_mm512_setzero_si512(); R];
        for j in 0..R {
            // SAFETY: bytes 32t..32t + 32 of a checked slice of GROUP_BYTES = 256 (t < 8).
            xv[j] = _mm512_broadcast_i64x4(unsafe {
                _mm256_loadu_si256(xg[j][32 * t..].as_ptr() as *const __m256i)
            });
        }
        for (p, isp) in is[..np].iter_mut().enumerate() {
            // SAFETY: q[t][2p..2p + 2] are 64 contiguous bytes of pg on a 64-byte boundary (pg is
            // aligned to 64, its rows are NR (even) vectors of 32 bytes).
            let wq = unsafe { _mm512_load_si512(pg.q[t][2 * p..].as_ptr() as *const __m512i) };
            for (s, &xj) in isp.iter_mut().zip(&xv) {
                *s = _mm512_dpbusd_epi32(*s, wq, xj);
            }
        }
    }
    // (The scales after the integer sums: held through them they cost registers, and spills.)
    for j in 0..R {
        let at = (rr + j) * nb + g * LANES;
        // SAFETY: x.sums[at..at + 8] / x.d[at..at + 8] are checked slices of 8 i32 / f32, the
        // 32 bytes each load reads.
        let (sums, d) = unsafe {
            (
                _mm256_loadu_si256(x.sums[at..at + LANES].as_ptr() as *const __m256i),
                _mm256_loadu_si256(x.d[at..at + LANES].as_ptr() as *const __m256i),
            )
        };
        // BIAS · Σx per block (BIAS is a power of two, or 0: a shift by 32 gives 0), both halves
        let bias = _mm512_sll_epi32(_mm512_broadcast_i64x4(sums), shift);
        let dx = _mm512_castsi512_ps(_mm512_broadcast_i64x4(d));
        let xs = if W::HAS_MIN {
            // SAFETY: x.s[at..at + 8] is a checked slice of 8 f32, the 32 bytes loaded.
            let s = unsafe { _mm256_loadu_si256(x.s[at..at + LANES].as_ptr() as *const __m256i) };
            _mm512_castsi512_ps(_mm512_broadcast_i64x4(s))
        } else {
            _mm512_setzero_ps()
        };
        for p in 0..np {
            // SAFETY: d[2p..2p + 2] and m[2p..2p + 2] are 64 contiguous bytes of pg on a 64-byte
            // boundary.
            let (dw, mw) = unsafe {
                (
                    _mm512_load_ps(pg.d[2 * p..].as_ptr() as *const f32),
                    _mm512_load_ps(pg.m[2 * p..].as_ptr() as *const f32),
                )
            };
            let isum = _mm512_sub_epi32(is[p][j], bias);
            let mut prod = _mm512_mul_ps(_mm512_mul_ps(dw, dx), _mm512_cvtepi32_ps(isum));
            if W::HAS_MIN {
                // `reference::block32_min_product`: (d_w d_x)·isum + m_w·s_x
                prod = _mm512_add_ps(prod, _mm512_mul_ps(mw, xs));
            }
            acc[j * np + p] = _mm512_add_ps(acc[j * np + p], prod);
        }
    }
}

/// The 16 lanes of a 512-bit vector.
#[target_feature(enable = "avx512f")]
#[inline]
pub(crate) fn lanes16(v: __m512) -> [f32; 16] {
    let mut a = [0.0f32; 16];
    // SAFETY: `a` has room for 16 f32; storeu has no alignment requirement.
    unsafe { _mm512_storeu_ps(a.as_mut_ptr(), v) };
    a
}
