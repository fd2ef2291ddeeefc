//! The 5- and 8-bit formats of the row kernel (`super`): q5_0 (the 4-bit layout of `T01` /
//! `T23` as 128-bit lanes of dwords, plus the fifth bit from qh by `vpmultishiftqb`) and q8_0
//! (four `vpermt2w` gathers of dwords 0..3 / 4..7 of blocks 0..3 / 4..7). Safety rules as in
//! `super`.

use std::arch::x86_64::*;

use super::*;

/// Byte index of a `vpermt2b` over the windows `t1..t1 + 64` and `t2..t2 + 64` of a group:
/// output byte `16s + 4j + b` = quant byte `4s + b` of block `4·half + j` (block `size` bytes,
/// quants at `qoff`).
pub(super) const fn quad_index(size: usize, qoff: usize, half: usize, t1: usize, t2: usize) -> Idx {
    let mut idx = [0u8; 64];
    let mut o = 0;
    while o < 64 {
        let (s, j, b) = (o / 16, (o / 4) % 4, o % 4);
        let src = size * (4 * half + j) + qoff + 4 * s + b;
        idx[o] = if src >= t1 && src < t1 + 64 {
            (src - t1) as u8
        } else {
            assert!(src >= t2 && src < t2 + 64);
            (64 + src - t2) as u8
        };
        o += 1;
    }
    Idx(idx)
}

/// qword index of `vpermt2q` forming [a.l0, b.l0, a.l1, b.l1] and [a.l2, b.l2, a.l3, b.l3]
/// (128-bit lanes of a and b).
const Q_LO: [i64; 8] = [0, 1, 8, 9, 2, 3, 10, 11];
const Q_HI: [i64; 8] = [4, 5, 12, 13, 6, 7, 14, 15];

/// `[a.l0, b.l0, a.l1, b.l1]` and `[a.l2, b.l2, a.l3, b.l3]`.
#[target_feature(enable = "avx512f")]
#[inline]
pub(super) fn pair_lanes(a: __m512i, b: __m512i) -> (__m512i, __m512i) {
    // SAFETY: 8 i64 each.
    let (il, ih) = unsafe {
        (
            _mm512_loadu_epi64(Q_LO.as_ptr()),
            _mm512_loadu_epi64(Q_HI.as_ptr()),
        )
    };
    let lo = _mm512_permutex2var_epi64(a, il, b);
    let hi = _mm512_permutex2var_epi64(a, ih, b);
    (lo, hi)
}

/// The sum of the two 256-bit halves.
#[target_feature(enable = "avx512f")]
#[inline]
fn fold(v: __m512i) -> __m256i {
    _mm256_add_epi32(_mm512_castsi512_si256(v), _mm512_extracti64x4_epi64::<1>(v))
}

/// The four products of a group whose register lanes j and 8 + j belong to block j (q4_0,
/// iq4_nl, q5_0): two chains of two `vpdpbusd` (the first starting from `-BIAS·Σx` in lanes
/// 0..8), added, the halves folded.
#[target_feature(enable = "avx512f,avx512vnni")]
#[inline]
pub(super) unsafe fn dots4(nbias: *const i32, v: [__m512i; 4], xt: *const u8) -> __m256i {
    // SAFETY: xt points at the group's GROUP_BYTES bytes, nbias at 8 i32 (caller).
    unsafe {
        let init = _mm512_zextsi256_si512(_mm256_loadu_si256(nbias as *const __m256i));
        let s0 = _mm512_dpbusd_epi32(init, v[0], xreg(xt, 0));
        let s1 = _mm512_dpbusd_epi32(_mm512_setzero_si512(), v[1], xreg(xt, 1));
        let s0 = _mm512_dpbusd_epi32(s0, v[2], xreg(xt, 2));
        let s1 = _mm512_dpbusd_epi32(s1, v[3], xreg(xt, 3));
        fold(_mm512_add_epi32(s0, s1))
    }
}

// ---------------------------------------------------------------- q5_0

/// Register `reg` lane `l` of the transposed layout: block `l % 8`, quad `2·reg + l / 8`
/// (registers: low nibbles of dwords 0,1; of 2,3; high nibbles of 0,1; of 2,3).
pub(super) fn x_lane_t(reg: usize, l: usize) -> (usize, usize) {
    (l % 8, 2 * reg + l / 8)
}

// 22-byte blocks: d at 0, qh at 2, quants at 6. Windows 0..64 + 64..128 (blocks 0..3 and the
// scales of blocks 0..5), 64..128 + 112..176 (blocks 4..7), 112..176 (scales of blocks 6, 7).
static Q5_A: Idx = quad_index(22, 6, 0, 0, 64);
static Q5_B: Idx = quad_index(22, 6, 1, 64, 112);
/// Blocks 0..5 from the first two windows, 6 and 7 from the third (merged under a mask).
const fn split8(size: usize, off: usize, late: bool) -> [usize; 8] {
    let mut a = field8(size, off);
    let mut j = 0;
    while j < 8 {
        if (j >= 6) != late {
            a[j] = SKIP;
        }
        j += 1;
    }
    a
}
/// Word 2L + h (dword lane L of 16) = word h of block L % 8's qh (blocks of `size` bytes, qh
/// at `off`); blocks 0..5 unless `late`, 6 and 7 if `late`.
pub(super) const fn qh16(size: usize, off: usize, late: bool) -> [usize; 32] {
    let mut a = [0usize; 32];
    let mut w = 0;
    while w < 32 {
        let j = (w / 2) % 8;
        a[w] = if (j >= 6) != late {
            SKIP
        } else {
            size * j + off + 2 * (w % 2)
        };
        w += 1;
    }
    a
}
static Q5_D1: Idx = word_index(split8(22, 0, false), 0, 64);
static Q5_D2: Idx = word_index(split8(22, 0, true), 112, 112);
static Q5_QH1: Idx = word_index(qh16(22, 2, false), 0, 64);
static Q5_QH2: Idx = word_index(qh16(22, 2, true), 112, 112);
/// The words that `Q5_D2` / `Q5_QH2` replace.
const Q5_D_LATE: __mmask32 = 0xc0;
pub(super) const Q5_QH_LATE: __mmask32 = 0xf000_f000;

/// `vpmultishiftqb` controls: register `reg`'s byte `4L + b` takes the qh bit of its element
/// (`4·(2·reg + L / 8) + b`, in the 32-bit half `L % 2` of its qword) to bit 4.
const fn q5_shift(reg: usize) -> Idx {
    let mut c = [0u8; 64];
    let mut o = 0;
    while o < 64 {
        let (l, b) = (o / 4, o % 4);
        let e = 4 * (2 * reg + l / 8) + b;
        c[o] = ((32 * (l % 2) + e + 64 - 4) % 64) as u8;
        o += 1;
    }
    Idx(c)
}
static Q5_SHIFT: [Idx; 4] = [q5_shift(0), q5_shift(1), q5_shift(2), q5_shift(3)];

/// `nib | (qh bits of `reg` & 0x10)`: the five-bit levels (0..31) of register `reg`.
#[target_feature(enable = "avx512f,avx512bw,avx512vbmi")]
#[inline]
pub(super) fn q5_levels(nib: __m512i, qh: __m512i, reg: usize) -> __m512i {
    let h = _mm512_multishift_epi64_epi8(idx(&Q5_SHIFT[reg]), qh);
    // a | (b & c)
    _mm512_ternarylogic_epi32::<0xf8>(nib, h, _mm512_set1_epi8(0x10))
}

impl Row32 for BlockQ5_0 {
    fn x_lane(reg: usize, l: usize) -> (usize, usize) {
        x_lane_t(reg, l)
    }
    #[inline(always)]
    unsafe fn group<const FULL: bool>(
        p: *const u8,
        len: usize,
        xt: *const u8,
        nbias: *const i32,
    ) -> (__m256i, __m256, __m256) {
        // SAFETY: the caller's contract is this function's (the 176 bytes of a full group are
        // read as 0..64, 64..128, 112..176).
        unsafe {
            let a = ld::<FULL>(p, 0, len);
            let b = ld::<FULL>(p, 64, len);
            let c = ld::<FULL>(p, 112, len);
            let za = _mm512_permutex2var_epi8(a, idx(&Q5_A), b);
            let zb = _mm512_permutex2var_epi8(b, idx(&Q5_B), c);
            let (t01, t23) = pair_lanes(za, zb);
            let qh = _mm512_permutex2var_epi16(a, idx(&Q5_QH1), b);
            let qh = _mm512_mask_permutexvar_epi16(qh, Q5_QH_LATE, idx(&Q5_QH2), c);
            let m4 = _mm512_set1_epi8(0x0f);
            let shr4 = _mm512_set1_epi64(SHR4);
            let v = [
                q5_levels(_mm512_and_si512(t01, m4), qh, 0),
                q5_levels(_mm512_and_si512(t23, m4), qh, 1),
                q5_levels(_mm512_gf2p8affine_epi64_epi8::<0>(t01, shr4), qh, 2),
                q5_levels(_mm512_gf2p8affine_epi64_epi8::<0>(t23, shr4), qh, 3),
            ];
            let d = _mm512_permutex2var_epi16(a, idx(&Q5_D1), b);
            let d = _mm512_mask_permutexvar_epi16(d, Q5_D_LATE, idx(&Q5_D2), c);
            (
                dots4(nbias, v, xt),
                _mm256_cvtph_ps(_mm512_castsi512_si128(d)),
                _mm256_setzero_ps(),
            )
        }
    }
}

// ---------------------------------------------------------------- q8_0

/// Word index of register `reg` (0..4) of q8_0 (34-byte blocks, quants at 2): dword lane
/// `4q + j` = dword `q + 4·(reg % 2)` of block `j + 4·(reg / 2)`, from the windows `t1`, `t2`.
const fn q8_index(reg: usize, t1: usize, t2: usize) -> Idx {
    let mut src = [0usize; 32];
    let mut w = 0;
    while w < 32 {
        let (o, h) = (w / 2, w % 2);
        let (j, q) = (o % 4, o / 4);
        src[w] = 34 * (j + 4 * (reg / 2)) + 2 + 4 * (q + 4 * (reg % 2)) + 2 * h;
        w += 1;
    }
    word_index(src, t1, t2)
}
/// The windows (byte offsets of the 64-byte loads) of q8_0's registers 0..4.
const Q8_WIN: [(usize, usize); 4] = [(0, 64), (16, 80), (136, 200), (144, 208)];
static Q8_IDX: [Idx; 4] = [
    q8_index(0, Q8_WIN[0].0, Q8_WIN[0].1),
    q8_index(1, Q8_WIN[1].0, Q8_WIN[1].1),
    q8_index(2, Q8_WIN[2].0, Q8_WIN[2].1),
    q8_index(3, Q8_WIN[3].0, Q8_WIN[3].1),
];
/// Scales of blocks 0..3 from register 0's windows, of 4..7 from register 2's.
static Q8_D1: Idx = word_index([0, 34, 68, 102], Q8_WIN[0].0, Q8_WIN[0].1);
static Q8_D2: Idx = word_index([136, 170, 204, 238], Q8_WIN[2].0, Q8_WIN[2].1);

impl Row32 for BlockQ8_0 {
    fn x_lane(reg: usize, l: usize) -> (usize, usize) {
        (l % 4 + 4 * (reg / 2), l / 4 + 4 * (reg % 2))
    }
    #[inline(always)]
    unsafe fn group<const FULL: bool>(
        p: *const u8,
        len: usize,
        xt: *const u8,
        nbias: *const i32,
    ) -> (__m256i, __m256, __m256) {
        // SAFETY: the caller's contract is this function's (every window lies in the 272 bytes
        // of a full group).
        unsafe {
            let mut v = [_mm512_setzero_si512(); 4];
            let mut win = [[_mm512_setzero_si512(); 2]; 4];
            for reg in 0..4 {
                let (t1, t2) = Q8_WIN[reg];
                win[reg] = [ld::<FULL>(p, t1, len), ld::<FULL>(p, t2, len)];
                let q = _mm512_permutex2var_epi16(win[reg][0], idx(&Q8_IDX[reg]), win[reg][1]);
                // w + 128 as u8
                v[reg] = _mm512_xor_si512(q, _mm512_set1_epi8(-128));
            }
            let mut sa = _mm512_zextsi128_si512(_mm_loadu_si128(nbias as *const __m128i));
            let mut sb = _mm512_zextsi128_si512(_mm_loadu_si128(nbias.add(4) as *const __m128i));
            sa = _mm512_dpbusd_epi32(sa, v[0], xreg(xt, 0));
            sb = _mm512_dpbusd_epi32(sb, v[2], xreg(xt, 2));
            sa = _mm512_dpbusd_epi32(sa, v[1], xreg(xt, 1));
            sb = _mm512_dpbusd_epi32(sb, v[3], xreg(xt, 3));
            // lanes 4q + j of sa (blocks 0..3) and sb (4..7) summed over q
            let (lo, hi) = pair_lanes(sa, sb);
            let isum = fold(_mm512_add_epi32(lo, hi));
            let d1 = _mm512_permutex2var_epi16(win[0][0], idx(&Q8_D1), win[0][1]);
            let d2 = _mm512_permutex2var_epi16(win[2][0], idx(&Q8_D2), win[2][1]);
            let d = _mm_unpacklo_epi64(_mm512_castsi512_si128(d1), _mm512_castsi512_si128(d2));
            (isum, _mm256_cvtph_ps(d), _mm256_setzero_ps())
        }
    }
}
