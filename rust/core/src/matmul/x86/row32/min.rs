//! The formats with a min of the row kernel (`super`): q4_1 (20-byte blocks) and q5_1 (24-byte
//! blocks), in q5_0's transposed layout (`wide.rs`: `T01` / `T23` as 128-bit lanes of dwords,
//! lane j / 8 + j of block j), unsigned quants (BIAS 0), and each block's min `m_w` beside its
//! scale: the kernel adds `m_w · s_x` as `reference::q8_1::block32_min_product` does. Safety
//! rules as in `super`.

use std::arch::x86_64::*;

use super::wide::{dots4, pair_lanes, q5_levels, qh16, quad_index, x_lane_t, Q5_QH_LATE};
use super::*;

/// Word index sources of the scales (words 0..8) and mins (words 8..16) of 8 blocks of `size`
/// bytes (d at 0, m at 2): blocks before `first_late` unless `late`, the others if `late`.
const fn dm16(size: usize, first_late: usize, late: bool) -> [usize; 16] {
    let mut a = [SKIP; 16];
    let mut j = 0;
    while j < 8 {
        if (j >= first_late) == late {
            a[j] = size * j;
            a[8 + j] = size * j + 2;
        }
        j += 1;
    }
    a
}

/// The words of `dm16(.., true)`: blocks from `first_late` on, scale and min.
const fn dm_late(first_late: usize) -> __mmask32 {
    let lanes = (0xffu32 << first_late) & 0xff;
    lanes | (lanes << 8)
}

/// Scales and mins as f32 from the words of `dm` (`dm16`'s order).
#[target_feature(enable = "avx512f,f16c")]
#[inline]
fn scales_mins(dm: __m512i) -> (__m256, __m256) {
    (
        _mm256_cvtph_ps(_mm512_castsi512_si128(dm)),
        _mm256_cvtph_ps(_mm512_extracti32x4_epi32::<1>(dm)),
    )
}

// ---------------------------------------------------------------- q4_1

// 20-byte blocks: d at 0, m at 2, quants at 4. Windows 0..64 + 64..128 (blocks 0..3, the
// scales and mins of blocks 0..6), 64..128 + 96..160 (blocks 4..7), 96..160 (block 7's).
static Q41_A: Idx = quad_index(20, 4, 0, 0, 64);
static Q41_B: Idx = quad_index(20, 4, 1, 64, 96);
static Q41_DM1: Idx = word_index(dm16(20, 7, false), 0, 64);
static Q41_DM2: Idx = word_index(dm16(20, 7, true), 96, 96);

impl Row32 for BlockQ4_1 {
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
        // SAFETY: the caller's contract is this function's (the 160 bytes of a full group are
        // read as 0..64, 64..128, 96..160).
        unsafe {
            let a = ld::<FULL>(p, 0, len);
            let b = ld::<FULL>(p, 64, len);
            let c = ld::<FULL>(p, 96, len);
            let za = _mm512_permutex2var_epi8(a, idx(&Q41_A), b);
            let zb = _mm512_permutex2var_epi8(b, idx(&Q41_B), c);
            let (t01, t23) = pair_lanes(za, zb);
            let m4 = _mm512_set1_epi8(0x0f);
            let v = [
                _mm512_and_si512(t01, m4),
                _mm512_and_si512(t23, m4),
                BlockQ4_0::hi(t01),
                BlockQ4_0::hi(t23),
            ];
            let dm = _mm512_permutex2var_epi16(a, idx(&Q41_DM1), b);
            let dm = _mm512_mask_permutexvar_epi16(dm, dm_late(7), idx(&Q41_DM2), c);
            let (d, m) = scales_mins(dm);
            (dots4(nbias, v, xt), d, m)
        }
    }
}

// ---------------------------------------------------------------- q5_1

// 24-byte blocks: d at 0, m at 2, qh at 4, quants at 8. Windows 0..64 + 64..128 (blocks 0..3,
// the scales, mins and qh of blocks 0..5), 64..128 + 128..192 (blocks 4..7), 128..192 (the
// scales, mins and qh of blocks 6, 7).
static Q51_A: Idx = quad_index(24, 8, 0, 0, 64);
static Q51_B: Idx = quad_index(24, 8, 1, 64, 128);
static Q51_DM1: Idx = word_index(dm16(24, 6, false), 0, 64);
static Q51_DM2: Idx = word_index(dm16(24, 6, true), 128, 128);
static Q51_QH1: Idx = word_index(qh16(24, 4, false), 0, 64);
static Q51_QH2: Idx = word_index(qh16(24, 4, true), 128, 128);

impl Row32 for BlockQ5_1 {
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
        // SAFETY: the caller's contract is this function's (the 192 bytes of a full group are
        // read as 0..64, 64..128, 128..192).
        unsafe {
            let a = ld::<FULL>(p, 0, len);
            let b = ld::<FULL>(p, 64, len);
            let c = ld::<FULL>(p, 128, len);
            let za = _mm512_permutex2var_epi8(a, idx(&Q51_A), b);
            let zb = _mm512_permutex2var_epi8(b, idx(&Q51_B), c);
            let (t01, t23) = pair_lanes(za, zb);
            let qh = _mm512_permutex2var_epi16(a, idx(&Q51_QH1), b);
            let qh = _mm512_mask_permutexvar_epi16(qh, Q5_QH_LATE, idx(&Q51_QH2), c);
            let m4 = _mm512_set1_epi8(0x0f);
            let v = [
                q5_levels(_mm512_and_si512(t01, m4), qh, 0),
                q5_levels(_mm512_and_si512(t23, m4), qh, 1),
                q5_levels(BlockQ4_0::hi(t01), qh, 2),
                q5_levels(BlockQ4_0::hi(t23), qh, 3),
            ];
            let dm = _mm512_permutex2var_epi16(a, idx(&Q51_DM1), b);
            let dm = _mm512_mask_permutexvar_epi16(dm, dm_late(6), idx(&Q51_DM2), c);
            let (d, m) = scales_mins(dm);
            (dots4(nbias, v, xt), d, m)
        }
    }
}
