//! The GEMM microkernel of the 32-weight formats (q4_0, q5_0, q8_0, iq4_nl, q4_1, q5_1) for
//! many activation rows, AVX-512 F/BW/VL/VNNI: a panel of 8 weight rows is decoded once per
//! chunk of K (`KC_GROUPS` groups of 8 blocks) into an L1-resident buffer (`PanelBuf`, two rows
//! at a time on 512-bit vectors), then pairs of activation rows run through the whole chunk
//! against all 8 rows with their float accumulators in registers.
//!
//! **Numerics.** The layout is `tile::tile32_vnni512`'s: a 512-bit vector holds two weight
//! rows (row 2p in lanes 0..8, 2p + 1 in 8..16) of one group, lane l of either half being
//! block 8g + l, against one activation row broadcast to both halves; eight `vpdpbusd` leave
//! each block's exact Σ (w + BIAS)·x in its lane. The accumulator starts at `-BIAS·Σx` instead
//! of zero (the same integer as the tile's subtraction: the sums are exact). The float part is
//! the reference's, lane by lane in block order: `acc[l] += (d_w · d_x) · isum` (plus
//! `m_w · s_x` for q4_1 / q5_1, `reference::block32_min_product`), then `hsum8`. A chunk
//! boundary only pauses the lanes (kept in the caller's buffer), so every output has the bits
//! of `reference::dot_block32` / `dot_block32_min`, wherever it sits and however the work is
//! split (tested).
//!
//! **A partial last group** (K not a multiple of 256: SmolLM2's 576 is 2 groups and 2 blocks)
//! runs narrower instead of padded to a whole group: its `n` blocks (`tail_width(n)` = 2, 4 or
//! 8 of them a row) of all 8 weight rows share `TB / 2` vectors (`decode_tail`), lane
//! `(row % (16 / TB)) · TB + b` holding block b of the row, so 2 tail blocks cost 8 `vpdpbusd`
//! a row instead of the 32 of a padded group. Each lane's product is the reference's
//! `(d_w · d_x) · isum` (+ `m_w · s_x`) and is permuted into its row's lane b of the float
//! accumulator, added with a mask that leaves every other lane untouched: lane b < n gets block
//! `8 · groups + b`, as `reference::dot_block32` adds it.
//!
//! Safety: callers check AVX2, F16C and AVX-512 F/BW/VL/VNNI at run time
//! (`cpu::has_vnni_bw`) and pass slices of the lengths stated on each function.

use std::arch::x86_64::*;

use super::tile::{Tile32, GROUP_BYTES};
use crate::matmul::reference::LANES;

/// Weight rows of one panel.
pub const PANEL: usize = 8;
/// Groups of 8 blocks (256 weights) in one chunk of K: the panel's decoded chunk (8 rows x
/// 2048 bytes, plus scales) and 4 activation rows' chunks stay in the 48 KiB L1 while the rows
/// pass (16 groups, 32 KiB a panel chunk, were about 5 % slower: 4096x14336, M = 64 and 512,
/// one thread).
pub const KC_GROUPS: usize = 8;
/// 64-byte lines of one decoded group: 8 vectors t x 4 row pairs.
const GROUP_LINES: usize = 8 * PANEL / 2;

/// One 512-bit line on a 64-byte boundary.
#[repr(C, align(64))]
#[derive(Clone, Copy)]
pub struct Zmm([u8; 64]);

/// A panel's decoded chunk: `q[(g * 8 + t) * 4 + p]` = vector t of group g of rows 2p (low
/// half) and 2p + 1 (high half) (`Tile32::load8_t`: lane l = elements 4t..4t+4 of block l, plus
/// `BIAS`); `d[g * 4 + p]` / `m[g * 4 + p]` the two rows' 8 block scales / offsets as f32.
/// `tq[t * 4 + v]`, `td[v]`, `tm[v]`: the partial last group in the narrow layout of
/// `decode_tail` (v < TB / 2).
pub struct PanelBuf {
    q: Vec<Zmm>,
    d: Vec<Zmm>,
    m: Vec<Zmm>,
    tq: Vec<Zmm>,
    td: Vec<Zmm>,
    tm: Vec<Zmm>,
}

impl Default for PanelBuf {
    fn default() -> Self {
        let z = Zmm([0; 64]);
        Self {
            q: vec![z; KC_GROUPS * GROUP_LINES],
            d: vec![z; KC_GROUPS * PANEL / 2],
            m: vec![z; KC_GROUPS * PANEL / 2],
            tq: vec![z; GROUP_LINES],
            td: vec![z; PANEL / 2],
            tm: vec![z; PANEL / 2],
        }
    }
}

/// Blocks a row of the narrow layout of a partial group of `n` blocks (1..8) takes: 2, 4 or 8.
pub fn tail_width(n: usize) -> usize {
    debug_assert!((1..LANES).contains(&n));
    if n <= 2 {
        2
    } else if n <= 4 {
        4
    } else {
        8
    }
}

/// Bytes of one activation row's partial group in the narrow layout (`interleave_tail`).
pub fn tail_bytes(n: usize) -> usize {
    32 * tail_width(n)
}

/// One activation row's last `blocks.len()` (1..8) blocks in the narrow layout of the tail
/// kernel: bytes `4 · TB · t + 4b .. + 4` are bytes `4t .. 4t + 4` of block b's quants (zero
/// for b >= n); `out` holds `tail_bytes(n)` bytes.
pub fn interleave_tail(blocks: &[crate::formats::blocks::BlockQ8_0], out: &mut [u8]) {
    let tb = tail_width(blocks.len());
    out.fill(0);
    for (b, blk) in blocks.iter().enumerate() {
        let q: &[u8; 32] = bytemuck::cast_ref(&blk.qs);
        for t in 0..8 {
            out[4 * tb * t + 4 * b..][..4].copy_from_slice(&q[4 * t..4 * t + 4]);
        }
    }
}

/// Two weight rows' groups of 8 blocks decoded together on 512-bit vectors into the layout of
/// `PanelBuf`: vector t = row a's `Tile32::load8_t` vector t in the low half, row b's in the
/// high half (the same bytes as two `load8_t` calls; the 128-bit-lane shuffles of the 256-bit
/// transposes do both rows at once).
pub trait Pair32: Tile32 {
    /// # Safety
    /// AVX2, AVX-512 F/BW (`cpu::has_vnni_bw`); `a.len() >= 8`, `b.len() >= 8`.
    #[inline(always)]
    unsafe fn load16_t(a: &[Self], b: &[Self]) -> [__m512i; 8] {
        // A loop, not `array::from_fn`: the closure would not inherit the caller's target
        // features, and its intrinsics ran as calls (about 10 % of a 576x576 q8_0 call at
        // M = 128, perf).
        let mut v = [_mm512_setzero_si512(); 8];
        for (l, vl) in v.iter_mut().enumerate() {
            // SAFETY: the features (contract); a and b have 8 blocks each.
            *vl = unsafe {
                _mm512_inserti64x4::<1>(
                    _mm512_castsi256_si512(a[l].load_unsigned()),
                    b[l].load_unsigned(),
                )
            };
        }
        // SAFETY: the features (contract).
        unsafe { transpose8x2(v) }
    }
}

impl Pair32 for crate::formats::blocks::BlockQ8_0 {}
impl Pair32 for crate::formats::blocks::BlockQ5_0 {}
impl Pair32 for crate::formats::blocks::BlockQ5_1 {}

impl Pair32 for crate::formats::blocks::BlockQ4_0 {
    #[inline(always)]
    unsafe fn load16_t(a: &[Self], b: &[Self]) -> [__m512i; 8] {
        // SAFETY: the features (contract); 16-byte loads of each block's qs.
        unsafe { nibbles16_t(qs16x2(|l| &a[l].qs, |l| &b[l].qs)) }
    }
}

impl Pair32 for crate::formats::blocks::BlockQ4_1 {
    #[inline(always)]
    unsafe fn load16_t(a: &[Self], b: &[Self]) -> [__m512i; 8] {
        // SAFETY: as for q4_0.
        unsafe { nibbles16_t(qs16x2(|l| &a[l].qs, |l| &b[l].qs)) }
    }
}

impl Pair32 for crate::formats::blocks::BlockIQ4NL {
    #[inline(always)]
    unsafe fn load16_t(a: &[Self], b: &[Self]) -> [__m512i; 8] {
        // SAFETY: as for q4_0; the table is 16 bytes (kvalues + 128), the same lookup as
        // `Tile32::load8_t`'s, per 128-bit lane.
        unsafe {
            let t = _mm_loadu_si128(super::KVALUES_IQ4NL_U8.as_ptr() as *const __m128i);
            let tab = _mm512_broadcast_i32x4(t);
            let mut v = nibbles16_t(qs16x2(|l| &a[l].qs, |l| &b[l].qs));
            for r in v.iter_mut() {
                *r = _mm512_shuffle_epi8(tab, *r);
            }
            v
        }
    }
}

/// `tile::transpose8` of two sets of 8 vectors at once: input l holds set a's vector l in its
/// low half and set b's in its high half, output t likewise.
#[target_feature(enable = "avx512f,avx512bw")]
#[inline]
fn transpose8x2(v: [__m512i; 8]) -> [__m512i; 8] {
    let mut t = [_mm512_setzero_si512(); 8];
    for i in 0..4 {
        t[2 * i] = _mm512_unpacklo_epi32(v[2 * i], v[2 * i + 1]);
        t[2 * i + 1] = _mm512_unpackhi_epi32(v[2 * i], v[2 * i + 1]);
    }
    let mut u = [_mm512_setzero_si512(); 8];
    for h in 0..2 {
        let (a, b, c, d) = (t[4 * h], t[4 * h + 1], t[4 * h + 2], t[4 * h + 3]);
        u[4 * h] = _mm512_unpacklo_epi64(a, c);
        u[4 * h + 1] = _mm512_unpackhi_epi64(a, c);
        u[4 * h + 2] = _mm512_unpacklo_epi64(b, d);
        u[4 * h + 3] = _mm512_unpackhi_epi64(b, d);
    }
    // 128-bit lanes (q0, q1 | q2, q3) = (a lo, a hi | b lo, b hi): `permute2x128` 0x20 / 0x31
    // of each half, as qword indices into (x, y).
    let lo = _mm512_setr_epi64(0, 1, 8, 9, 4, 5, 12, 13);
    let hi = _mm512_setr_epi64(2, 3, 10, 11, 6, 7, 14, 15);
    let mut o = [_mm512_setzero_si512(); 8];
    for c in 0..4 {
        o[c] = _mm512_permutex2var_epi64(u[c], lo, u[4 + c]);
        o[c + 4] = _mm512_permutex2var_epi64(u[c], hi, u[4 + c]);
    }
    o
}

/// `tile::qs16_transposed` of two rows' 8 blocks at once (row a in the low half of each
/// output, row b in the high half).
///
/// # Safety
/// AVX-512 F/BW; `qa(l)`, `qb(l)` for l < 8 are the blocks' 16 quant bytes.
#[target_feature(enable = "avx512f,avx512bw")]
#[inline]
unsafe fn qs16x2<'q>(
    qa: impl Fn(usize) -> &'q [u8; 16],
    qb: impl Fn(usize) -> &'q [u8; 16],
) -> [__m512i; 4] {
    let mut a = [_mm512_setzero_si512(); 4];
    for (l, v) in a.iter_mut().enumerate() {
        // SAFETY: each load reads the 16 bytes of one &[u8; 16]; l + 4 < 8.
        let q = |r: &[u8; 16]| unsafe { _mm_loadu_si128(r.as_ptr() as *const __m128i) };
        let x = _mm512_castsi128_si512(q(qa(l)));
        let x = _mm512_inserti32x4::<1>(x, q(qa(l + 4)));
        let x = _mm512_inserti32x4::<2>(x, q(qb(l)));
        *v = _mm512_inserti32x4::<3>(x, q(qb(l + 4)));
    }
    let t0 = _mm512_unpacklo_epi32(a[0], a[1]);
    let t1 = _mm512_unpackhi_epi32(a[0], a[1]);
    let t2 = _mm512_unpacklo_epi32(a[2], a[3]);
    let t3 = _mm512_unpackhi_epi32(a[2], a[3]);
    [
        _mm512_unpacklo_epi64(t0, t2),
        _mm512_unpackhi_epi64(t0, t2),
        _mm512_unpacklo_epi64(t1, t3),
        _mm512_unpackhi_epi64(t1, t3),
    ]
}

/// `tile::nibbles_t` on 512-bit vectors.
#[target_feature(enable = "avx512f,avx512bw")]
#[inline]
fn nibbles16_t(c: [__m512i; 4]) -> [__m512i; 8] {
    let m4 = _mm512_set1_epi8(0x0f);
    let mut o = [_mm512_setzero_si512(); 8];
    for i in 0..4 {
        o[i] = _mm512_and_si512(c[i], m4);
        o[i + 4] = _mm512_and_si512(_mm512_srli_epi16::<4>(c[i]), m4);
    }
    o
}

/// Decodes groups `g0..g0 + groups` (at most `KC_GROUPS`) of the panel's 8 rows into `buf`, two
/// rows at a time on 512-bit vectors (`Pair32`; the 256-bit decode of one row at a time was
/// 5-13 % slower at M = 8 / 16, one thread, CPU time, 2026-12-06).
///
/// # Safety
/// AVX2, F16C, AVX-512 F/BW/VL/VNNI (`cpu::has_vnni_bw`); every `w[i]` has at least
/// `(g0 + groups) * 8` blocks.
#[target_feature(enable = "avx2,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
pub unsafe fn decode_panel<W: Pair32>(
    w: [&[W]; PANEL],
    g0: usize,
    groups: usize,
    buf: &mut PanelBuf,
) {
    assert!(groups <= KC_GROUPS);
    for gi in 0..groups {
        for p in 0..PANEL / 2 {
            let at = (g0 + gi) * LANES..(g0 + gi + 1) * LANES;
            let (wa, wb) = (&w[2 * p][at.clone()], &w[2 * p + 1][at]);
            // SAFETY: the features (contract); wa and wb are checked slices of 8 blocks.
            let v = unsafe { W::load16_t(wa, wb) };
            for (t, vt) in v.iter().enumerate() {
                let line = &mut buf.q[(gi * 8 + t) * (PANEL / 2) + p];
                // SAFETY: one aligned 64-byte store into a `Zmm`.
                unsafe { _mm512_store_si512(line.0.as_mut_ptr() as *mut __m512i, *vt) };
            }
            let dh: [u16; 16] = std::array::from_fn(|j| {
                u16::from_le_bytes(if j < 8 { wa[j].d() } else { wb[j - 8].d() })
            });
            // SAFETY: dh is 16 u16 (32 bytes loaded); AVX-512 F (contract).
            let d = _mm512_cvtph_ps(unsafe { _mm256_loadu_si256(dh.as_ptr() as *const __m256i) });
            // SAFETY: one aligned 64-byte store into a `Zmm`.
            unsafe { _mm512_store_ps(buf.d[gi * (PANEL / 2) + p].0.as_mut_ptr() as *mut f32, d) };
            if W::HAS_MIN {
                let mh: [u16; 16] = std::array::from_fn(|j| {
                    u16::from_le_bytes(if j < 8 { wa[j].m() } else { wb[j - 8].m() })
                });
                // SAFETY: as for dh.
                let m =
                    _mm512_cvtph_ps(unsafe { _mm256_loadu_si256(mh.as_ptr() as *const __m256i) });
                // SAFETY: as for d.
                unsafe {
                    _mm512_store_ps(buf.m[gi * (PANEL / 2) + p].0.as_mut_ptr() as *mut f32, m)
                };
            }
        }
    }
}

/// Decodes blocks `b0..b0 + n` (1 <= n < 8) of the panel's 8 rows into the narrow layout of
/// `buf.tq` / `td` / `tm`: with TB = `tail_width(n)`, vector v holds rows `v · 16 / TB ..` of
/// 16 / TB rows each, lane `(row % (16 / TB)) · TB + b` being block b (of the `load8_t` vector
/// t in `tq[t * 4 + v]`; blocks b >= n decode a zero block, and their lanes are never added).
/// Once per panel and block of activation rows, so the rows are padded to 8 blocks first and
/// go through `Pair32::load16_t` like a whole group.
///
/// # Safety
/// AVX2, F16C, AVX-512 F/BW/VL/VNNI (`cpu::has_vnni_bw`); every `w[i]` has `b0 + n` blocks.
#[target_feature(enable = "avx2,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
pub unsafe fn decode_tail<W: Pair32>(w: [&[W]; PANEL], b0: usize, n: usize, buf: &mut PanelBuf) {
    let tb = tail_width(n);
    let pad: [[W; LANES]; PANEL] = std::array::from_fn(|i| {
        std::array::from_fn(|b| if b < n { w[i][b0 + b] } else { W::zeroed() })
    });
    let mut pairs = [[_mm512_setzero_si512(); 8]; PANEL / 2];
    for (p, pv) in pairs.iter_mut().enumerate() {
        // SAFETY: the features (contract); each pad row has 8 blocks.
        *pv = unsafe { W::load16_t(&pad[2 * p], &pad[2 * p + 1]) };
    }
    // Lane indices into (pair a, pair b): rows a lo, a hi, b lo, b hi, TB = 4 (16 lanes) or
    // TB = 2 (the first 8 lanes).
    let i4 = _mm512_setr_epi32(0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27);
    let i2 = _mm512_setr_epi32(0, 1, 8, 9, 16, 17, 24, 25, 0, 0, 0, 0, 0, 0, 0, 0);
    #[allow(clippy::needless_range_loop)] // t indexes the inner arrays of `pairs`
    for t in 0..8 {
        let v: [__m512i; 4] = match tb {
            2 => {
                let a = _mm512_permutex2var_epi32(pairs[0][t], i2, pairs[1][t]);
                let b = _mm512_permutex2var_epi32(pairs[2][t], i2, pairs[3][t]);
                let z = _mm512_setzero_si512();
                [_mm512_shuffle_i64x2::<0b01_00_01_00>(a, b), z, z, z]
            }
            4 => {
                let a = _mm512_permutex2var_epi32(pairs[0][t], i4, pairs[1][t]);
                let b = _mm512_permutex2var_epi32(pairs[2][t], i4, pairs[3][t]);
                let z = _mm512_setzero_si512();
                [a, b, z, z]
            }
            _ => std::array::from_fn(|p| pairs[p][t]),
        };
        for (vi, &vv) in v.iter().enumerate().take(tb / 2) {
            // SAFETY: one aligned 64-byte store into a `Zmm` (t * 4 + vi < GROUP_LINES).
            unsafe { _mm512_store_si512(buf.tq[t * 4 + vi].0.as_mut_ptr() as *mut __m512i, vv) };
        }
    }
    let rv = 16 / tb;
    for vi in 0..tb / 2 {
        let lane = |l: usize| (vi * rv + l / tb, l % tb);
        let half = |f: &dyn Fn(&W) -> [u8; 2]| -> [u16; 16] {
            std::array::from_fn(|l| {
                let (r, b) = lane(l);
                if b < n {
                    u16::from_le_bytes(f(&w[r][b0 + b]))
                } else {
                    0
                }
            })
        };
        let dh = half(&|x: &W| x.d());
        // SAFETY: dh is 16 u16 (32 bytes loaded); AVX-512 F (contract); one aligned store.
        unsafe {
            let d = _mm512_cvtph_ps(_mm256_loadu_si256(dh.as_ptr() as *const __m256i));
            _mm512_store_ps(buf.td[vi].0.as_mut_ptr() as *mut f32, d);
        }
        if W::HAS_MIN {
            let mh = half(&|x: &W| x.m());
            // SAFETY: as for dh.
            unsafe {
                let m = _mm512_cvtph_ps(_mm256_loadu_si256(mh.as_ptr() as *const __m256i));
                _mm512_store_ps(buf.tm[vi].0.as_mut_ptr() as *mut f32, m);
            }
        }
    }
}

/// One activation row of a microkernel call, from group `g0` of the chunk on: its interleaved
/// quants (`tile::interleave_q8_0`), and per block `-BIAS · Σx` (empty where BIAS is 0), the
/// scale and (q8_1) `s` (those of the partial last group, if any, after the whole groups'),
/// and the partial last group's quants in the narrow layout (`interleave_tail`; empty without
/// one).
#[derive(Clone, Copy)]
pub struct XRow<'a> {
    pub xt: &'a [u8],
    pub xtail: &'a [u8],
    pub nbias: &'a [i32],
    pub d: &'a [f32],
    pub s: &'a [f32],
}

/// R activation rows against all 4 row pairs of the decoded chunk (`groups` groups):
/// `acc[j][p]` (the 16 float lanes of rows 2p, 2p + 1 with activation row j) += each block's
/// product, block by block. Two rows by 4 pairs (8 integer and 8 float accumulators, each
/// weight vector loaded once for both rows, each activation broadcast once for all 8 weight
/// rows) was 1.2-1.35x as fast as 4 rows by 2 pairs at M = 8..512 and 3 rows by 4 pairs (which
/// runs out of registers) 0.9x (q4_0 / q8_0 / q5_1, one thread, CPU time, 2026-12-06).
///
/// Always inlined into `chunk` (compiled with the features below): as a call of its own,
/// q4_1 / q5_1's larger body was not inlined, and passing the accumulators through memory
/// cost about 10 % at M = 512 (perf, one thread).
///
/// `tail` (0..8): blocks of a partial group after the `groups` whole ones (`decode_tail`).
///
/// # Safety
/// AVX2, F16C, AVX-512 F/BW/VL/VNNI (`cpu::has_vnni_bw`), and called only from functions
/// compiled with them; `buf` holds `groups` decoded groups (and the tail); every `x[j]` has
/// `groups * GROUP_BYTES` interleaved bytes and `groups * 8 + tail` scales (and `nbias` where
/// BIAS is not 0, `s` for q4_1 / q5_1), and `tail_bytes(tail)` of `xtail` with a tail.
#[inline(always)]
pub unsafe fn kernel<W: Tile32, const R: usize>(
    buf: &PanelBuf,
    groups: usize,
    tail: usize,
    x: &[XRow<'_>; R],
    acc: &mut [Acc; R],
) {
    const P: usize = PANEL / 2;
    assert!(groups <= KC_GROUPS && tail < LANES);
    let nblocks = groups * LANES + tail;
    for xj in x {
        assert!(xj.xt.len() >= groups * GROUP_BYTES && xj.d.len() >= nblocks);
        assert!(W::BIAS == 0 || xj.nbias.len() >= nblocks);
        assert!(!W::HAS_MIN || xj.s.len() >= nblocks);
        assert!(tail == 0 || xj.xtail.len() >= tail_bytes(tail));
    }
    let mut f = *acc;
    let q = buf.q.as_ptr() as *const __m512i;
    let dp = buf.d.as_ptr() as *const __m512;
    let mp = buf.m.as_ptr() as *const __m512;
    for g in 0..groups {
        let mut is = [[_mm512_setzero_si512(); P]; R];
        if W::BIAS != 0 {
            for (j, isj) in is.iter_mut().enumerate() {
                // SAFETY: nbias[8g..8g + 8] is in bounds (asserted above); 32 bytes.
                let nb = _mm512_broadcast_i64x4(unsafe {
                    _mm256_loadu_si256(x[j].nbias.as_ptr().add(g * LANES) as *const __m256i)
                });
                *isj = [nb; P];
            }
        }
        for t in 0..8 {
            let mut xv = [_mm512_setzero_si512(); R];
            for (j, v) in xv.iter_mut().enumerate() {
                // SAFETY: bytes g·256 + 32t .. + 32 of xt, in bounds (asserted above).
                *v = _mm512_broadcast_i64x4(unsafe {
                    _mm256_loadu_si256(
                        x[j].xt.as_ptr().add(g * GROUP_BYTES + 32 * t) as *const __m256i
                    )
                });
            }
            for p in 0..P {
                // SAFETY: line (g·8 + t)·4 + p < KC_GROUPS · GROUP_LINES (g < groups <=
                // KC_GROUPS, p < 4), 64-byte aligned.
                let wq = unsafe { _mm512_load_si512(q.add((g * 8 + t) * P + p)) };
                for (isj, &xj) in is.iter_mut().zip(&xv) {
                    isj[p] = _mm512_dpbusd_epi32(isj[p], wq, xj);
                }
            }
        }
        for j in 0..R {
            // SAFETY: d[8g..8g + 8] (and s) in bounds (asserted above); 32 bytes each.
            let dx = _mm512_castsi512_ps(_mm512_broadcast_i64x4(unsafe {
                _mm256_loadu_si256(x[j].d.as_ptr().add(g * LANES) as *const __m256i)
            }));
            let xs = if W::HAS_MIN {
                // SAFETY: as above.
                _mm512_castsi512_ps(_mm512_broadcast_i64x4(unsafe {
                    _mm256_loadu_si256(x[j].s.as_ptr().add(g * LANES) as *const __m256i)
                }))
            } else {
                _mm512_setzero_ps()
            };
            for p in 0..P {
                // SAFETY: line g·4 + p of d / m, in bounds and aligned (as above).
                let dw = unsafe { _mm512_load_ps(dp.add(g * P + p) as *const f32) };
                let mut prod = _mm512_mul_ps(_mm512_mul_ps(dw, dx), _mm512_cvtepi32_ps(is[j][p]));
                if W::HAS_MIN {
                    // SAFETY: as for dw.
                    let mw = unsafe { _mm512_load_ps(mp.add(g * P + p) as *const f32) };
                    prod = _mm512_add_ps(prod, _mm512_mul_ps(mw, xs));
                }
                f[j][p] = _mm512_add_ps(f[j][p], prod);
            }
        }
    }
    if tail > 0 {
        // SAFETY: the caller's contract (the tail's scales from block 8 · groups on).
        unsafe {
            match tail_width(tail) {
                2 => tail_step::<W, R, 2>(buf, groups * LANES, tail, x, &mut f),
                4 => tail_step::<W, R, 4>(buf, groups * LANES, tail, x, &mut f),
                _ => tail_step::<W, R, 8>(buf, groups * LANES, tail, x, &mut f),
            }
        }
    }
    *acc = f;
}

/// The partial last group of `kernel` (`n` blocks from block `b0` of each `x[j]`, TB =
/// `tail_width(n)`): TB / 2 vectors of integer sums per activation row, their float products
/// permuted into the rows' accumulators and added to lanes 0..n of each half only.
///
/// # Safety
/// As `kernel`, with `buf`'s tail decoded for these n blocks.
#[inline(always)]
unsafe fn tail_step<W: Tile32, const R: usize, const TB: usize>(
    buf: &PanelBuf,
    b0: usize,
    n: usize,
    x: &[XRow<'_>; R],
    f: &mut [Acc; R],
) {
    const P: usize = PANEL / 2;
    let v_count = TB / 2;
    let rv = 16 / TB;
    let lanes: __mmask8 = (1u8 << n).wrapping_sub(1);
    let tq = buf.tq.as_ptr() as *const __m512i;
    let mut is = [[_mm512_setzero_si512(); P]; R];
    if W::BIAS != 0 {
        for (j, isj) in is.iter_mut().enumerate() {
            // SAFETY: nbias[b0..b0 + n] is in bounds (the caller's contract).
            *isj = [unsafe { bcast_tail::<TB>(x[j].nbias[b0..].as_ptr(), lanes) }; P];
        }
    }
    for t in 0..8 {
        let mut xv = [_mm512_setzero_si512(); R];
        for (j, v) in xv.iter_mut().enumerate() {
            let q = x[j].xtail[4 * TB * t..][..4 * TB].as_ptr();
            // SAFETY: 4 · TB bytes of xtail (sliced just now); the features (contract).
            *v = unsafe {
                match TB {
                    2 => _mm512_set1_epi64((q as *const i64).read_unaligned()),
                    4 => _mm512_broadcast_i32x4(_mm_loadu_si128(q as *const __m128i)),
                    _ => _mm512_broadcast_i64x4(_mm256_loadu_si256(q as *const __m256i)),
                }
            };
        }
        for v in 0..v_count {
            // SAFETY: line t · 4 + v < GROUP_LINES, 64-byte aligned.
            let wq = unsafe { _mm512_load_si512(tq.add(t * 4 + v)) };
            for (isj, &xj) in is.iter_mut().zip(&xv) {
                isj[v] = _mm512_dpbusd_epi32(isj[v], wq, xj);
            }
        }
    }
    // Pair p (rows 2p, 2p + 1): lane h · 8 + b takes lane ((2p + h) % rv) · TB + b of vector
    // (2p) / rv; only lanes b < n of each half are added.
    let mut perm = [_mm512_setzero_si512(); P];
    for (p, v) in perm.iter_mut().enumerate() {
        let idx: [i32; 16] =
            std::array::from_fn(|l| (((2 * p + l / 8) % rv) * TB + (l % 8) % TB) as i32);
        // SAFETY: 16 i32 (64 bytes).
        *v = unsafe { _mm512_loadu_si512(idx.as_ptr() as *const __m512i) };
    }
    let mask: __mmask16 = lanes as u16 | (lanes as u16) << 8;
    for j in 0..R {
        // SAFETY: d[b0..b0 + n] (and s) are in bounds (the caller's contract).
        let dx = _mm512_castsi512_ps(unsafe {
            bcast_tail::<TB>(x[j].d[b0..].as_ptr() as *const i32, lanes)
        });
        let xs = if W::HAS_MIN {
            // SAFETY: as for dx.
            _mm512_castsi512_ps(unsafe {
                bcast_tail::<TB>(x[j].s[b0..].as_ptr() as *const i32, lanes)
            })
        } else {
            _mm512_setzero_ps()
        };
        let mut prod = [_mm512_setzero_ps(); P];
        for (v, pv) in prod.iter_mut().enumerate().take(v_count) {
            // SAFETY: lines v of td / tm, in bounds and aligned.
            let dw = unsafe { _mm512_load_ps(buf.td[v].0.as_ptr() as *const f32) };
            *pv = _mm512_mul_ps(_mm512_mul_ps(dw, dx), _mm512_cvtepi32_ps(is[j][v]));
            if W::HAS_MIN {
                // SAFETY: as for dw.
                let mw = unsafe { _mm512_load_ps(buf.tm[v].0.as_ptr() as *const f32) };
                *pv = _mm512_add_ps(*pv, _mm512_mul_ps(mw, xs));
            }
        }
        for p in 0..P {
            let src = prod[2 * p / rv];
            let y = if TB == 8 {
                src
            } else {
                _mm512_permutexvar_ps(perm[p], src)
            };
            f[j][p] = _mm512_mask_add_ps(f[j][p], mask, f[j][p], y);
        }
    }
}

/// TB 32-bit values from `p` (the first n of them, `lanes`; the rest zero), repeated over the
/// 16 lanes.
///
/// # Safety
/// AVX-512 F/VL, and called only from functions compiled with them; `p..p + n` readable (the
/// masked loads never touch the lanes left out).
#[inline(always)]
unsafe fn bcast_tail<const TB: usize>(p: *const i32, lanes: __mmask8) -> __m512i {
    // SAFETY: the contract.
    unsafe {
        match TB {
            2 => _mm512_broadcastq_epi64(_mm_maskz_loadu_epi32(lanes, p)),
            4 => _mm512_broadcast_i32x4(_mm_maskz_loadu_epi32(lanes, p)),
            _ => _mm512_broadcast_i64x4(_mm256_maskz_loadu_epi32(lanes, p)),
        }
    }
}

/// The float lanes of one activation row with one panel: pair p (rows 2p, 2p + 1) at `[p]`.
pub type Acc = [__m512; PANEL / 2];

/// Groups `g0..g0 + gc` of one panel (8 weight rows, `w[i]` with at least `8 · (g0 + gc)`
/// blocks), then `tail` (0..8) blocks of a partial group after them, against activation rows
/// `0..rows` (`x(j, g0)`: row j from group g0 on): the chunk decoded once into `buf`, the rows
/// in twos through `kernel`, their lanes carried in `acc` (`rows` entries; read only when not
/// `first`, the panel's first chunk starting from zero lanes).
///
/// # Safety
/// AVX2, F16C, AVX-512 F/BW/VL/VNNI (`cpu::has_vnni_bw`); `x(j, g0)` for j < rows returns the
/// row's data from group g0 on, at least `gc` groups (and the tail, `kernel`); `gc <=
/// KC_GROUPS`; with a tail every `w[i]` has `8 · (g0 + gc) + tail` blocks.
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx2,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
pub unsafe fn chunk<'a, W: Pair32>(
    w: [&[W]; PANEL],
    g0: usize,
    gc: usize,
    tail: usize,
    first: bool,
    rows: usize,
    x: &impl Fn(usize, usize) -> XRow<'a>,
    buf: &mut PanelBuf,
    acc: &mut [Acc],
) {
    assert!(acc.len() >= rows);
    // SAFETY: the features (contract); every w[i] has 8 · (g0 + gc) blocks (+ tail).
    unsafe {
        decode_panel(w, g0, gc, buf);
        if tail > 0 {
            decode_tail(w, (g0 + gc) * LANES, tail, buf);
        }
    }
    let mut j = 0;
    while j + 2 <= rows {
        // SAFETY: as above; x(j, g0) has the groups g0..g0 + gc (and the tail).
        unsafe { run::<W, 2>(buf, gc, tail, first, j, g0, x, acc) };
        j += 2;
    }
    if j < rows {
        // SAFETY: as above.
        unsafe { run::<W, 1>(buf, gc, tail, first, j, g0, x, acc) };
    }
}

/// Prefetches (into L2) the bytes of groups `g0..g0 + groups` of the panel's rows, the next
/// panel chunk `chunk` will decode: at M = 8 / 16 the decode otherwise waits on memory.
pub fn prefetch<W: Pair32>(w: [&[W]; PANEL], g0: usize, groups: usize) {
    for wi in w {
        let b: &[u8] = bytemuck::cast_slice(&wi[g0 * LANES..(g0 + groups) * LANES]);
        for off in (0..b.len()).step_by(64).chain([b.len().saturating_sub(1)]) {
            // SAFETY: off < b.len() (b is not empty: groups >= 1); prefetching never faults.
            unsafe { _mm_prefetch::<_MM_HINT_T1>(b.as_ptr().add(off) as *const i8) };
        }
    }
}

/// Room for `len` accumulators of `chunk` (their values are written by each panel's first
/// chunk: zeroing them every block of rows cost 4 % of a 576x576 q8_0 call at M = 128, perf).
///
/// # Safety
/// AVX-512 F must be available.
#[target_feature(enable = "avx512f")]
pub fn room(acc: &mut Vec<Acc>, len: usize) {
    if acc.len() < len {
        acc.resize(len, [_mm512_setzero_ps(); PANEL / 2]);
    }
}
/// The panel's results from its accumulators (`chunk`'s, all of K done): `out(j, y)` gets the
/// 8 dots of activation row j with the panel's weight rows, each `hsum8` of its lanes, computed
/// for 8 rows at once with the same additions: `s_l = a_l + a_{l+4}`, then `s0 + s2` and
/// `s1 + s3`, then their sum.
///
/// # Safety
/// AVX-512 F must be available.
#[target_feature(enable = "avx512f")]
pub fn finish(acc: &[Acc], rows: usize, mut out: impl FnMut(usize, [f32; 8])) {
    // Output lane of weight row i after the reduction: quarter i % 4 (rows 0..4 from the first
    // pair of vectors, 4..8 from the second), lane 0 or 2 (see below).
    let idx = _mm512_setr_epi32(0, 4, 8, 12, 2, 6, 10, 14, 0, 0, 0, 0, 0, 0, 0, 0);
    for (j, &z) in acc[..rows].iter().enumerate() {
        // z[p]: rows 2p (low half) and 2p + 1 (high half)
        let sum4 = |a: __m512, b: __m512| {
            // quarters [a.q0, a.q2, b.q0, b.q2] + [a.q1, a.q3, b.q1, b.q3]: s_l = a_l + a_{l+4}
            // of rows (a lo, a hi, b lo, b hi)
            _mm512_add_ps(
                _mm512_shuffle_f32x4::<0b10_00_10_00>(a, b),
                _mm512_shuffle_f32x4::<0b11_01_11_01>(a, b),
            )
        };
        // rows 0, 1, 2, 3 and 4, 5, 6, 7 in quarters 0..4
        let (s0, s1) = (sum4(z[0], z[1]), sum4(z[2], z[3]));
        // per quarter q: [s0 + s2, s1 + s3] of s0's row q, then of s1's row q
        let t = _mm512_add_ps(
            _mm512_shuffle_ps::<0b01_00_01_00>(s0, s1),
            _mm512_shuffle_ps::<0b11_10_11_10>(s0, s1),
        );
        // lanes 0 and 2 of each quarter: (s0 + s2) + (s1 + s3)
        let u = _mm512_add_ps(t, _mm512_shuffle_ps::<0b10_11_00_01>(t, t));
        let y = _mm512_permutexvar_ps(idx, u);
        let mut a = [0.0f32; 16];
        // SAFETY: `a` has room for 16 f32; storeu has no alignment requirement.
        unsafe { _mm512_storeu_ps(a.as_mut_ptr(), y) };
        out(j, std::array::from_fn(|i| a[i]));
    }
}

/// `kernel` for activation rows `j0..j0 + R`, their accumulators in `acc`.
///
/// # Safety
/// As `kernel`.
#[target_feature(enable = "avx2,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
#[inline]
#[allow(clippy::too_many_arguments)]
unsafe fn run<'a, W: Tile32, const R: usize>(
    buf: &PanelBuf,
    groups: usize,
    tail: usize,
    first: bool,
    j0: usize,
    g0: usize,
    x: &impl Fn(usize, usize) -> XRow<'a>,
    acc: &mut [Acc],
) {
    let xr: [XRow<'a>; R] = std::array::from_fn(|j| x(j0 + j, g0));
    let mut a: [Acc; R] = if first {
        [[_mm512_setzero_ps(); PANEL / 2]; R]
    } else {
        std::array::from_fn(|j| acc[j0 + j])
    };
    // SAFETY: the caller's contract.
    unsafe { kernel::<W, R>(buf, groups, tail, &xr, &mut a) };
    acc[j0..j0 + R].copy_from_slice(&a);
}
