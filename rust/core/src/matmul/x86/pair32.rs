//! The panel decode of the 32-weight GEMM (`gemm32.rs`) and its layout (`PanelBuf`): a
//! panel's groups of 8 blocks, two weight rows at a time on 512-bit vectors (`decode_panel`),
//! and the partial last group in the narrow layout (`decode_tail`). The bytes are
//! `Tile32::load8_t`'s (tested against the reference through every GEMM path).
//!
//! Safety: callers check AVX2, F16C and AVX-512 F/BW/VL/VNNI at run time
//! (`cpu::has_vnni_bw`) and pass slices of the lengths stated on each function.

use std::arch::x86_64::*;

use std::mem::{offset_of, size_of};

use super::tile::Tile32;
use crate::formats::blocks::*;
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
pub struct Zmm(pub(super) [u8; 64]);

/// A panel's decoded chunk: `q[(g * 8 + t) * 4 + p]` = vector t of group g of rows 2p (low
/// half) and 2p + 1 (high half) (`Tile32::load8_t`: lane l = elements 4t..4t+4 of block l, plus
/// `BIAS`); `d[g * 4 + p]` / `m[g * 4 + p]` the two rows' 8 block scales / offsets as f32.
/// `tq[t * 4 + v]`, `td[v]`, `tm[v]`: the partial last group in the narrow layout of
/// `decode_tail` (v < TB / 2).
pub struct PanelBuf {
    pub(super) q: Vec<Zmm>,
    pub(super) d: Vec<Zmm>,
    pub(super) m: Vec<Zmm>,
    pub(super) tq: Vec<Zmm>,
    pub(super) td: Vec<Zmm>,
    pub(super) tm: Vec<Zmm>,
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

/// Two weight rows' groups of 8 blocks decoded together on 512-bit vectors into the layout of
/// `PanelBuf`: vector t = row a's `Tile32::load8_t` vector t in the low half, row b's in the
/// high half (the same bytes as two `load8_t` calls; the 128-bit-lane shuffles of the 256-bit
/// transposes do both rows at once).
pub trait Pair32: Tile32 {
    /// # Safety
    /// AVX2, AVX-512 F/BW (`cpu::has_vnni_bw`); `a.len() >= 8`, `b.len() >= 8`.
    #[inline(always)]
    unsafe fn load16_t(a: &[Self], b: &[Self]) -> [__m512i; 8] {
        // SAFETY: the contract.
        unsafe { load16_generic(a, b) }
    }
}

/// `Pair32::load16_t` from `Load32::load_unsigned` per block and a transpose.
///
/// # Safety
/// As `Pair32::load16_t`.
#[inline(always)]
unsafe fn load16_generic<W: Tile32>(a: &[W], b: &[W]) -> [__m512i; 8] {
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

// Every 32-weight block starts with its f16 scale d, q4_1 / q5_1's with m after it
// (`scales16` reads both as one 32-bit word).
const _: () = {
    assert!(offset_of!(BlockQ4_0, d) == 0 && offset_of!(BlockQ8_0, d) == 0);
    assert!(offset_of!(BlockQ5_0, d) == 0 && offset_of!(BlockIQ4NL, d) == 0);
    assert!(offset_of!(BlockQ4_1, d) == 0 && offset_of!(BlockQ4_1, m) == 2);
    assert!(offset_of!(BlockQ5_1, d) == 0 && offset_of!(BlockQ5_1, m) == 2);
};

/// The little-endian 32-bit word at byte `off` of each of the 8 blocks of `a` (lanes 0..8)
/// and of `b` (lanes 8..16): two 8-lane gathers.
///
/// # Safety
/// AVX2, AVX-512 F; `a.len() >= 8`, `b.len() >= 8`, `off + 4 <= size_of::<W>()`.
#[target_feature(enable = "avx2,avx512f")]
#[inline]
unsafe fn words16<W>(a: &[W], b: &[W], off: usize) -> __m512i {
    debug_assert!(a.len() >= 8 && b.len() >= 8 && off + 4 <= size_of::<W>());
    let s = size_of::<W>() as i32;
    let idx = _mm256_setr_epi32(0, s, 2 * s, 3 * s, 4 * s, 5 * s, 6 * s, 7 * s);
    // SAFETY: lane l reads bytes off..off + 4 of block l (in bounds: the contract).
    unsafe {
        let ga = _mm256_i32gather_epi32::<1>(a.as_ptr().cast::<u8>().add(off).cast(), idx);
        let gb = _mm256_i32gather_epi32::<1>(b.as_ptr().cast::<u8>().add(off).cast(), idx);
        _mm512_inserti64x4::<1>(_mm512_castsi256_si512(ga), gb)
    }
}

/// The f16 scales d (and, `HAS_MIN`, offsets m) of the 8 blocks of `a` (lanes 0..8) and `b`
/// (8..16) as f32: one gathered word per block (d its low half, m its high half).
///
/// # Safety
/// As `words16` (a 32-weight block of at least 4 bytes).
#[target_feature(enable = "avx2,f16c,avx512f")]
#[inline]
unsafe fn scales16<W: Pair32>(a: &[W], b: &[W]) -> (__m512, __m512) {
    // SAFETY: the contract; every block starts with d (and m), `const _` above.
    let h = unsafe { words16(a, b, 0) };
    let d = _mm512_cvtph_ps(_mm512_cvtepi32_epi16(h));
    let m = if W::HAS_MIN {
        _mm512_cvtph_ps(_mm512_cvtepi32_epi16(_mm512_srli_epi32::<16>(h)))
    } else {
        _mm512_setzero_ps()
    };
    (d, m)
}

/// q5_0 / q5_1's fifth bit into the nibbles of `v` (`nibbles16_t`'s layout): byte i of lane l
/// of vector t is element 4t + i of lane l's block, so it gets 16 where bit 4t + i of that
/// block's `qh` (lane l of `qh`) is set: byte t / 2 of the word spread over the lane's 4
/// bytes (`vpshufb`), tested against bits 4 (t % 2) .. + 4, added under the mask (the nibbles
/// are below 16: the add is the or of `min32::q5_levels`).
#[target_feature(enable = "avx512f,avx512bw")]
#[inline]
fn fifth_bits(v: &mut [__m512i; 8], qh: __m512i) {
    let c10 = _mm512_set1_epi8(0x10);
    let lo = _mm512_set1_epi32(0x0804_0201);
    let hi = _mm512_set1_epi32(0x8040_2010_u32 as i32);
    for c in 0..4 {
        let r = c as i32 * 0x0101_0101;
        let idx = _mm512_broadcast_i32x4(_mm_setr_epi32(
            r,
            r + 0x0404_0404,
            r + 0x0808_0808,
            r + 0x0c0c_0c0c,
        ));
        let s = _mm512_shuffle_epi8(qh, idx);
        let (k0, k1) = (_mm512_test_epi8_mask(s, lo), _mm512_test_epi8_mask(s, hi));
        v[2 * c] = _mm512_mask_add_epi8(v[2 * c], k0, v[2 * c], c10);
        v[2 * c + 1] = _mm512_mask_add_epi8(v[2 * c + 1], k1, v[2 * c + 1], c10);
    }
}

impl Pair32 for BlockQ8_0 {
    #[inline(always)]
    unsafe fn load16_t(a: &[Self], b: &[Self]) -> [__m512i; 8] {
        // The +128 of `load_unsigned` once per pair of blocks on 512-bit vectors.
        let flip = _mm512_set1_epi8(-128);
        let mut v = [_mm512_setzero_si512(); 8];
        for (l, vl) in v.iter_mut().enumerate() {
            // SAFETY: the features (contract); 32-byte loads of each block's qs.
            *vl = unsafe {
                let qa = _mm256_loadu_si256(a[l].qs.as_ptr() as *const __m256i);
                let qb = _mm256_loadu_si256(b[l].qs.as_ptr() as *const __m256i);
                _mm512_xor_si512(
                    _mm512_inserti64x4::<1>(_mm512_castsi256_si512(qa), qb),
                    flip,
                )
            };
        }
        // SAFETY: the features (contract).
        unsafe { transpose8x2(v) }
    }
}

impl Pair32 for BlockQ5_0 {
    #[inline(always)]
    unsafe fn load16_t(a: &[Self], b: &[Self]) -> [__m512i; 8] {
        // SAFETY: the features (contract); 16-byte loads of each block's qs, one 32-bit word
        // of each block's qh.
        unsafe {
            let mut v = nibbles16_t(qs16x2(|l| &a[l].qs, |l| &b[l].qs));
            fifth_bits(&mut v, words16(a, b, offset_of!(BlockQ5_0, qh)));
            v
        }
    }
}

impl Pair32 for BlockQ5_1 {
    #[inline(always)]
    unsafe fn load16_t(a: &[Self], b: &[Self]) -> [__m512i; 8] {
        // SAFETY: as for q5_0.
        unsafe {
            let mut v = nibbles16_t(qs16x2(|l| &a[l].qs, |l| &b[l].qs));
            fifth_bits(&mut v, words16(a, b, offset_of!(BlockQ5_1, qh)));
            v
        }
    }
}

impl Pair32 for BlockQ4_0 {
    #[inline(always)]
    unsafe fn load16_t(a: &[Self], b: &[Self]) -> [__m512i; 8] {
        // SAFETY: the features (contract); 16-byte loads of each block's qs.
        unsafe { nibbles16_t(qs16x2(|l| &a[l].qs, |l| &b[l].qs)) }
    }
}

impl Pair32 for BlockQ4_1 {
    #[inline(always)]
    unsafe fn load16_t(a: &[Self], b: &[Self]) -> [__m512i; 8] {
        // SAFETY: as for q4_0.
        unsafe { nibbles16_t(qs16x2(|l| &a[l].qs, |l| &b[l].qs)) }
    }
}

impl Pair32 for BlockIQ4NL {
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
            // SAFETY: the features (contract); wa and wb have 8 blocks.
            let (d, m) = unsafe { scales16(wa, wb) };
            // SAFETY: aligned 64-byte stores into `Zmm`s.
            unsafe {
                _mm512_store_ps(buf.d[gi * (PANEL / 2) + p].0.as_mut_ptr() as *mut f32, d);
                if W::HAS_MIN {
                    _mm512_store_ps(buf.m[gi * (PANEL / 2) + p].0.as_mut_ptr() as *mut f32, m);
                }
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
