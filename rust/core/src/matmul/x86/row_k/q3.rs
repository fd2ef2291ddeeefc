//! q3_K's `RowK` decode for the AVX-512 row kernel (`vnni.rs`). The stored quant is
//! low2 + 4·hbit (0..7; offset 4, removed with the `bsums`: `OFFSET_SHIFT` 2): the two low
//! bits are field f (bits 2f, 2f + 1) of qs[32h + l], the high bit is bit t = 4h + f of
//! hmask[l], for element 128h + 32f + l (sub-block 4h + f).
//!
//! The 64 quants of a vector take two fields of one 32-byte run h of qs, broadcast to both
//! 256-bit halves: `Q3_FIELDS` (so the activations are in `vnni::Q3_ORDER`, `XzOrder::Q3`). With
//! GFNI, one `vpternlogd` puts each byte's hmask bit next to its qs field (the bits of the
//! field from qs, all others from hmask, `Q3_MASK`) and one `vgf2p8affineqb` gathers the three
//! bits to 0..2 and clears the rest: 2 vector uops a vector. For that, hmask bit t must not sit
//! on the field's bits 2f, 2f + 1: it does for f = 0, t = 0 and f = 3, t = 7, so those two
//! fields read hmask rotated in 64-bit lanes by +2 (low half) / -2 (high half), one `vprolvq`
//! for the super-block (`Q3_ROT`). The field pairing keeps every vector on one copy of hmask.
//! Before (element order), each vector was a `vgf2p8affineqb`, a `vprolvq` and a
//! `vpternlogd`: 12 of about 35 vector uops a super-block, now 9. Without GFNI: shifts, the
//! same order.
//!
//! Integers exact, so equal to the reference's whatever the order (tested in `tests.rs`).
//! Safety as in `x86.rs`.

use std::arch::x86_64::*;

use super::low::gf_bits2;
use super::vnni::{load_idx32, DecodedZ, RowK, XzOrder, Q3_ORDER};
use crate::formats::blocks::*;

/// The qs fields (low half, high half) of vector v; vectors 2h, 2h + 1 read run h.
const Q3_FIELDS: [[u32; 2]; 4] = [[0, 2], [1, 3], [0, 3], [1, 2]];
/// Whether vector v reads hmask rotated (+2 in the low half, -2 in the high).
const Q3_ROT: [bool; 4] = [true, false, true, false];

// `vnni::Q3_ORDER` (the activations' order; it lives there, with `K4_ORDER`, so that
// `interleave_k4` needs nothing from here) is the sub-blocks of `Q3_FIELDS`: vector v's low
// half is sub-block 4(v / 2) + `Q3_FIELDS[v][0]`, its high half the other.
const _: () = {
    let mut v = 0;
    while v < 4 {
        assert!(Q3_ORDER[2 * v] == 4 * (v / 2) + Q3_FIELDS[v][0] as usize);
        assert!(Q3_ORDER[2 * v + 1] == 4 * (v / 2) + Q3_FIELDS[v][1] as usize);
        v += 1;
    }
};

/// Where hmask bit t sits in the copy vector v reads, for its half `hi`.
const fn hbit_pos(v: usize, hi: usize) -> u32 {
    let t = 4 * (v as u32 / 2) + Q3_FIELDS[v][hi];
    match (Q3_ROT[v], hi) {
        (false, _) => t,
        (true, 0) => t + 2,
        (true, _) => t - 2,
    }
}

/// The `vgf2p8affineqb` matrices (low half, high half) of vector v: field bits to 0, 1, the
/// hmask bit to 2 (row i of the matrix, byte 7 - i, selects the input bits of output bit i).
const Q3_GF: [[i64; 2]; 4] = {
    let mut m = [[0i64; 2]; 4];
    let mut v = 0;
    while v < 4 {
        let mut hi = 0;
        while hi < 2 {
            let f = Q3_FIELDS[v][hi];
            let p = hbit_pos(v, hi);
            // the hmask bit must not land on the field's bits (the ternlog takes those from qs)
            assert!(p < 8 && p != 2 * f && p != 2 * f + 1);
            m[v][hi] = gf_bits2(2 * f) | ((1i64 << p) << 40);
            hi += 1;
        }
        v += 1;
    }
    m
};

/// The byte masks of vector v's ternlog (low half, high half): the field's bits from qs.
const Q3_MASK: [[i64; 2]; 4] = {
    let mut m = [[0i64; 2]; 4];
    let mut v = 0;
    while v < 4 {
        m[v][0] = ((3u64 << (2 * Q3_FIELDS[v][0])) * 0x0101_0101_0101_0101) as i64;
        m[v][1] = ((3u64 << (2 * Q3_FIELDS[v][1])) * 0x0101_0101_0101_0101) as i64;
        v += 1;
    }
    m
};

/// i16 permutation indices (`vpermw`) from the 16 group scales to `DecodedZ::scl[h]`: lane k
/// of `packs(p[2h], p[2h + 1])` holds, in i16 0..3, 4-product sums of lane k of vector 2h,
/// in 4..7 of vector 2h + 1; lane k of vector v is group 2·(its chunk's sub-block) + k % 2.
const fn scl_idx_q3(h: usize) -> [i16; 32] {
    let mut t = [0i16; 32];
    let mut i = 0;
    while i < 32 {
        let (k, pos) = (i / 8, i % 8);
        let v = 2 * h + if pos < 4 { 0 } else { 1 };
        t[i] = (2 * Q3_ORDER[2 * v + k / 2] + k % 2) as i16;
        i += 1;
    }
    t
}
const SCL_Q3: [[i16; 32]; 2] = [scl_idx_q3(0), scl_idx_q3(1)];

/// `k_low::scales_q3_k_aux` (`scales_q3_k_kmask` before the -32) in one register (ggml's masks
/// on its four dwords; the scalar version and its four inserts were most of q3_K's decode
/// outside the quants): dword i is `(A_i & 0x0f..) | (((tmp >> 2i) & 0x03..) << 4)`,
/// A = a0, a1, a0 >> 4, a1 >> 4.
#[target_feature(enable = "avx2")]
#[inline]
unsafe fn scales_q3_vec(w: &BlockQ3K) -> __m128i {
    // SAFETY: the 16 bytes from offset 92 (the last 4 of qs, then the 12 scale bytes; `d`
    // follows) are inside the block: dwords [qs tail, a0, a1, tmp].
    let v =
        unsafe { _mm_loadu_si128((w as *const BlockQ3K as *const u8).add(92) as *const __m128i) };
    let a = _mm_srlv_epi32(_mm_shuffle_epi32::<0x99>(v), _mm_setr_epi32(0, 0, 4, 4));
    let t = _mm_srlv_epi32(_mm_shuffle_epi32::<0xff>(v), _mm_setr_epi32(0, 2, 4, 6));
    _mm_or_si128(
        _mm_and_si128(a, _mm_set1_epi32(0x0f0f_0f0f)),
        _mm_slli_epi32(_mm_and_si128(t, _mm_set1_epi32(0x0303_0303)), 4),
    )
}

/// q3_K's `DecodedZ` around its quants `q` (`quants_gf` or `quants_shift`): the scales.
#[target_feature(enable = "avx2,avx512f,avx512bw,avx512vl")]
#[inline]
unsafe fn decode_q3(w: &BlockQ3K, q: [__m512i; 4]) -> DecodedZ {
    let sc8 = _mm_sub_epi8(scales_q3_vec(w), _mm_set1_epi8(32));
    let sc = _mm256_cvtepi8_epi16(sc8);
    let gz = _mm512_zextsi256_si512(sc);
    DecodedZ {
        q,
        // SAFETY: constant tables of 32 i16; AVX-512 F/BW (this function's features).
        scl: unsafe {
            [
                _mm512_permutexvar_epi16(load_idx32(&SCL_Q3[0]), gz),
                _mm512_permutexvar_epi16(load_idx32(&SCL_Q3[1]), gz),
            ]
        },
        // the scales, in group order (the `bsums`', which `interleave_k4` stores times -4,
        // the offset)
        bmul: sc,
    }
}

/// The 32 bytes of qs run h (or of hmask) in both 256-bit halves.
///
/// # Safety
/// AVX-512 F; `p` has 32 readable bytes.
#[target_feature(enable = "avx2,avx512f")]
#[inline]
unsafe fn bcast32(p: &[u8]) -> __m512i {
    debug_assert!(p.len() >= 32);
    // SAFETY: 32 bytes (caller).
    unsafe { _mm512_broadcast_i64x4(_mm256_loadu_si256(p.as_ptr() as *const __m256i)) }
}

/// The stored quants (0..7) of the 4 vectors by GFNI (the module comment).
#[target_feature(enable = "avx2,avx512f,avx512bw,gfni")]
#[inline]
unsafe fn quants_gf(w: &BlockQ3K) -> [__m512i; 4] {
    // SAFETY: 32 bytes of hmask, of qs from 0 and 32 (64).
    let (hm, qs) = unsafe { (bcast32(&w.hmask), [bcast32(&w.qs), bcast32(&w.qs[32..])]) };
    let hmr = _mm512_rolv_epi64(hm, _mm512_set_epi64(62, 62, 62, 62, 2, 2, 2, 2));
    let mut q = [_mm512_setzero_si512(); 4];
    for (v, o) in q.iter_mut().enumerate() {
        let src = if Q3_ROT[v] { hmr } else { hm };
        let [ml, mh] = Q3_MASK[v];
        let m = _mm512_set_epi64(mh, mh, mh, mh, ml, ml, ml, ml);
        // m ? qs : hmask (0xe4: bit a·4 + b·2 + c of the table is c ? a : b)
        let c = _mm512_ternarylogic_epi32::<0xe4>(qs[v / 2], src, m);
        let [gl, gh] = Q3_GF[v];
        *o =
            _mm512_gf2p8affine_epi64_epi8::<0>(c, _mm512_set_epi64(gh, gh, gh, gh, gl, gl, gl, gl));
    }
    q
}

/// The same quants by shifts (CPUs without GFNI): the fields by 64-bit shifts and a mask,
/// hmask bit t onto bit 2 by a 64-bit rotate by 2 - t.
#[target_feature(enable = "avx2,avx512f,avx512bw")]
#[inline]
unsafe fn quants_shift(w: &BlockQ3K) -> [__m512i; 4] {
    // SAFETY: 32 bytes of hmask, of qs from 0 and 32 (64).
    let (hm, qs) = unsafe { (bcast32(&w.hmask), [bcast32(&w.qs), bcast32(&w.qs[32..])]) };
    let (m3, four) = (_mm512_set1_epi8(3), _mm512_set1_epi8(4));
    let mut q = [_mm512_setzero_si512(); 4];
    for (v, o) in q.iter_mut().enumerate() {
        let [fl, fh] = Q3_FIELDS[v];
        let (sl, sh) = (2 * fl as i64, 2 * fh as i64);
        let low2 = _mm512_and_si512(
            _mm512_srlv_epi64(qs[v / 2], _mm512_set_epi64(sh, sh, sh, sh, sl, sl, sl, sl)),
            m3,
        );
        let t = 4 * (v as i64 / 2);
        let (rl, rh) = ((2 - t - fl as i64) & 63, (2 - t - fh as i64) & 63);
        let h = _mm512_rolv_epi64(hm, _mm512_set_epi64(rh, rh, rh, rh, rl, rl, rl, rl));
        // low2 | (h & 4)
        *o = _mm512_ternarylogic_epi32::<0xf8>(low2, h, four);
    }
    q
}

impl RowK for BlockQ3K {
    const ORDER: XzOrder = XzOrder::Q3;
    const OFFSET_SHIFT: Option<i32> = Some(2);
    // d: the last 2 of 110 bytes
    const HALF_OFF: usize = 106;
    const D_HIGH: bool = true;
    const GF_DECODE: bool = true;
    #[inline(always)]
    unsafe fn decode_z(&self) -> DecodedZ {
        // SAFETY: AVX-512 F/BW/VL available (contract).
        unsafe { decode_q3(self, quants_shift(self)) }
    }
    #[inline(always)]
    unsafe fn decode_gf(&self) -> DecodedZ {
        // SAFETY: AVX-512 F/BW/VL and GFNI available (contract).
        unsafe { decode_q3(self, quants_gf(self)) }
    }
}
