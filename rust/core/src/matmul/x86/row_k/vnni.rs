//! The M = 1 row kernel of the K-quants with AVX-512 (F/BW/VL/VNNI): q4_K, q5_K and q6_K here,
//! q2_K, q3_K and iq4_xs by their decodes in `low.rs` (`RowK`), the weights in their own
//! super-block layout (no repacking). Per super-block, four 512-bit vectors hold 64 unsigned quants
//! each (two sub-blocks of 32: q6_K in element order, q4_K / q5_K as one 64-byte load of qs splits
//! into low and high nibbles, `K4_ORDER`); the activations are prepared once per call in the same
//! order (`interleave_k4`, 64-byte aligned, with their `bsums` and `d`: the kernel reads nothing
//! else of them). `vpdpbusd` gives sums of 4 products (below 2^15 in magnitude: 4·63·128),
//! `vpackssdw` packs two of them into i16 without saturating, and `vpdpwssd` multiplies by the
//! sub-block (or 16-group) scales and adds. The mins (q4_K / q5_K / q2_K) and the offsets (q6_K
//! -32, q3_K -4, iq4_xs -128) use the activations' `bsums` (one `vpmaddwd` or `vpdpwssd`). The
//! integers are exact, so they equal the reference's whatever the order.
//!
//! Super-blocks go in groups of 8 (`group.rs`): each one's partial sums stay in 16 i32 lanes and
//! are reduced as they come, two at a time (`t32`, `t64`, `lanes8`: a transpose that adds as it
//! goes, in registers) until super-block j's integer sums are in lane j at the group's end, and
//! `block_k_product`'s operations run once for the 8 lanes (`d`, `dmin` converted 8 at a time from
//! eight 4-byte loads, the activation scales one load): lane j accumulates super-block 8g + j, the
//! reference's lane `b % 8`, in the reference's order. The quant offsets (q6_K, q3_K, iq4_xs) are
//! subtracted inside the 16 lanes (`vpdpwssd` with the negated `bsums`), so only the min formats
//! (q4_K, q5_K, q2_K) reduce a second set of sums. Super-blocks past the last whole group use the
//! AVX2 `SumsK` sums and the reference's scalar float code on the same lanes. Bit-identical to
//! `reference::dot_block_k`. (Session 15, Intel Xeon: the old group end, its 16 sums spilled to the
//! stack, `d` gathered a word at a time, was about half of q2_K's kernel by perf at K = 4096.)
//!
//! What made it fast here (Zen 4, measured with the loop alone): short dependency chains per
//! super-block. The scale decode (`vpermw` at its end) runs one super-block ahead, and the 16
//! lanes of a super-block's sums are not folded to 8 at the end of its chain (a
//! `vextracti64x4` there cost 1.7x in the loop).
//!
//! Safety as in `x86.rs`: callers check AVX2, F16C and AVX-512 F/BW/VL/VNNI (`cpu::has_vnni_bw`).

use std::arch::x86_64::*;

use super::super::q16::dpwssd;
use super::SumsK;
use crate::formats::blocks::*;
use crate::matmul::reference::{BlockQ8K, LANES};

/// One super-block decoded for `dot_row_k_vnni`.
#[derive(Clone, Copy)]
pub struct DecodedZ {
    /// Unsigned quants, 64 a vector, in the order `RowK::ORDER` gives the activations:
    /// q6_K / q2_K in element order (vector i = sub-blocks 2i and 2i + 1), q4_K / q5_K
    /// in `K4_ORDER`, q3_K in `Q3_ORDER`, iq4_xs as `XzOrder::Nibbles`.
    pub(super) q: [__m512i; 4],
    /// i16 multipliers of `packs(p0, p1)` and `packs(p2, p3)` (p_i = `dpbusd(q[i], x)`): in
    /// 128-bit lane k of a pack, i16 0..3 are sums of 4 products from lane k of p0 / p2 and
    /// i16 4..7 from lane k of p1 / p3; their multipliers are the scales of those elements.
    /// (iq4_xs: i32 multipliers of p0, p1 and of p2, p3; see `low.rs`.)
    pub(super) scl: [__m512i; 2],
    /// i16 multipliers of the 16 `bsums`: each sub-block's min twice (q4_K / q5_K), the 16
    /// mins (q2_K), or the scales of the 16 groups (q6_K, q3_K, iq4_xs: for their offsets).
    pub(super) bmul: __m256i,
}

/// How `interleave_k4` orders a format's activation quants (the order of its decoded quants).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum XzOrder {
    /// Element order (q6_K, q2_K).
    Elements,
    /// 32-element sub-blocks in `Q3_ORDER` (q3_K).
    Q3,
    /// 32-element sub-blocks in `K4_ORDER` (q4_K, q5_K).
    K4,
    /// iq4_xs: vector 2h + t, 128-bit lane k holds elements 32(4h + k) + 16t .. + 16 (the low
    /// nibbles of one 64-byte load of qs are t = 0, its high nibbles t = 1).
    Nibbles,
}

/// The activation order of `qtype`'s AVX-512 row kernel, None where it has none.
pub fn xz_order(qtype: crate::qtype::QType) -> Option<XzOrder> {
    use crate::qtype::QType;
    match qtype {
        QType::Q4K => Some(BlockQ4K::ORDER),
        QType::Q5K => Some(BlockQ5K::ORDER),
        QType::Q6K => Some(BlockQ6K::ORDER),
        QType::Q3K => Some(BlockQ3K::ORDER),
        QType::Q2K => Some(BlockQ2K::ORDER),
        QType::IQ4XS => Some(BlockIQ4XS::ORDER),
        _ => None,
    }
}

/// K-quants with the AVX-512 row kernel.
pub trait RowK: SumsK {
    /// The activations' order (`interleave_k4`).
    const ORDER: XzOrder;
    /// None: the `bsums` term is the min sum (`d·xd·isum - dmin·xd·msum`); Some(s): the
    /// quants are stored with an offset of 2^s (q6_K 32, q3_K 4, iq4_xs 128), removed as
    /// `isum - (msum << s)` (exact integers; `bmul` holds the scales times 2^s and the
    /// activations' `bsums` are negated; q3_K's `bsums` carry the 4 instead, its `bmul` is the
    /// scales; iq4_xs starts its sums from the activations' sub-block sums, `low.rs`), and
    /// there is no min.
    const OFFSET_SHIFT: Option<i32>;
    /// Byte offset of the 4 bytes holding `d` (f16) and, for the formats with a min, `dmin`
    /// after it; `D_HIGH`: `d` is the high half (formats without a min whose `d` ends the
    /// block: the 4 bytes stay inside it).
    const HALF_OFF: usize;
    const D_HIGH: bool = false;
    /// `decode_gf` differs from `decode_z` (used where the CPU has GFNI).
    const GF_DECODE: bool = false;
    /// # Safety
    /// AVX2, AVX-512 F/BW/VL must be available.
    unsafe fn decode_z(&self) -> DecodedZ;
    /// `decode_z` with GFNI (q2_K / q3_K's low bits by `vgf2p8affineqb`; the others: the
    /// same code).
    ///
    /// # Safety
    /// As `decode_z`, and GFNI must be available.
    #[inline(always)]
    unsafe fn decode_gf(&self) -> DecodedZ {
        // SAFETY: the caller's contract.
        unsafe { self.decode_z() }
    }
    /// The integer sums of one super-block with one activation block (`XZ_BLOCK` bytes):
    /// Σ scale·q·x in 16 i32 lanes and -Σ bmul·bsum in 8 (formats with a min), or
    /// Σ scale·q·x - Σ bmul·bsum in the 16 lanes (`OFFSET_SHIFT` formats; the 8 unused).
    ///
    /// # Safety
    /// AVX-512 F/BW/VL/VNNI must be available; `xq` holds `XZ_BLOCK` bytes.
    #[inline(always)]
    unsafe fn sums_z(d: &DecodedZ, xq: &[u8]) -> (__m512i, __m256i) {
        // SAFETY: the caller's contract.
        unsafe { sums_packs(d, xq, Self::OFFSET_SHIFT.is_some()) }
    }
}

/// i16 permutation indices (`vpermw`) to `DecodedZ::scl[h]`, from the 16 per-16-group scales
/// (q6_K: lane k, i16 0..3 -> group 8h + k, i16 4..7 -> group 8h + 4 + k) or from q4_K /
/// q5_K's [sc0..sc7, m0..m7] (their quants in `K4_ORDER`: lane k, i16 0..3 -> sub-block
/// 4h + 2(k / 2), i16 4..7 -> the next sub-block).
const fn scl_idx(h: usize, k4: bool) -> [i16; 32] {
    let mut t = [0i16; 32];
    let mut i = 0;
    while i < 32 {
        let (k, pos) = (i / 8, i % 8);
        t[i] = if k4 {
            (4 * h + 2 * (k / 2) + if pos < 4 { 0 } else { 1 }) as i16
        } else {
            (8 * h + k + if pos < 4 { 0 } else { 4 }) as i16
        };
        i += 1;
    }
    t
}

/// The sub-block order of q4_K / q5_K's quant vectors (pairs: the low and high halves of
/// `DecodedZ::q[i]`), and of the activations `interleave_k4` prepares for them.
pub const K4_ORDER: [usize; 8] = [0, 2, 1, 3, 4, 6, 5, 7];

/// The sub-block order of q3_K's quant vectors and activations (`XzOrder::Q3`): vector v holds
/// sub-blocks `Q3_ORDER[2v]` (low half) and `Q3_ORDER[2v + 1]` (`q3.rs`, which checks it
/// against its field pairing at compile time).
pub const Q3_ORDER: [usize; 8] = [0, 2, 1, 3, 4, 7, 5, 6];

/// Bytes of one activation block as `interleave_k4` lays it out: the 256 quants, the 16
/// `bsums` (i16, negated; q3_K: times -4; iq4_xs: 8 i32, -32 times each sub-block's sum), `d` (f32), zeros to
/// a multiple of 64; the first block of each whole group of 8 holds the group's 8 `d` there
/// instead (its own first).
pub const XZ_BLOCK: usize = 320;
const XZ_BSUMS: usize = QK_K;
pub(super) const XZ_D: usize = QK_K + 32;

/// The activation blocks for `dot_row_k_vnni`, `XZ_BLOCK` bytes each, rows of `nb` blocks one
/// after the other: the quants in `K4_ORDER` for q4_K / q5_K (as they are for q6_K), then the
/// `bsums` negated (so that `vpdpwssd` subtracts the quant offsets of q6_K / q3_K / iq4_xs in
/// the sums' own register) and `d`; block 8g of a row (g < nb / 8) holds the `d` of blocks
/// 8g..8g + 8 (one load per group in the kernel). The kernel reads nothing else of the
/// activations: at K = 14336 the q8_K blocks plus a copy of their quants (30 KB) crowded L1,
/// and q4_k ran from memory at the old kernel's speed (12.4 GB/s; 15 with this layout).
/// `qmatmul` puts them on 64-byte boundaries (each 512-bit load then reads one cache line).
pub fn interleave_k4(blocks: &[BlockQ8K], nb: usize, order: XzOrder, out: &mut [u8]) {
    for (i, (b, o)) in blocks
        .iter()
        .zip(out.chunks_exact_mut(XZ_BLOCK))
        .enumerate()
    {
        let q: &[u8; QK_K] = bytemuck::cast_ref(&b.qs);
        match order {
            XzOrder::Elements => o[..QK_K].copy_from_slice(q),
            XzOrder::K4 | XzOrder::Q3 => {
                let ord = if order == XzOrder::K4 {
                    K4_ORDER
                } else {
                    Q3_ORDER
                };
                for (t, &s) in ord.iter().enumerate() {
                    o[32 * t..32 * t + 32].copy_from_slice(&q[32 * s..32 * s + 32]);
                }
            }
            XzOrder::Nibbles => {
                // 16-byte chunk c: vector v = c / 4 = 2h + t, lane k = c % 4 -> source chunk
                // 2(4h + k) + t
                for c in 0..16 {
                    let (v, k) = (c / 4, c % 4);
                    let src = 2 * (4 * (v / 2) + k) + v % 2;
                    o[16 * c..16 * c + 16].copy_from_slice(&q[16 * src..16 * src + 16]);
                }
            }
        }
        if order == XzOrder::Nibbles {
            // iq4_xs: per sub-block of 32, -32 (its two bsums' sum) as i32 (|.| <= 32·32·128):
            // the kernel starts each 4-dword lane's `vpdpbusd` from it, so the lane's 4 dwords
            // carry the sub-block's -128·Σx (the offset of its +128 quants) into the scale
            // multiply, with no multiply of its own (`low.rs`, `RowK for BlockIQ4XS`)
            for (d, s) in o[XZ_BSUMS..XZ_D]
                .chunks_exact_mut(4)
                .zip(b.bsums.chunks_exact(2))
            {
                let v = -32 * (i32::from(s[0]) + i32::from(s[1]));
                d.copy_from_slice(&v.to_le_bytes());
            }
        } else {
            // q3_K: times its offset 4 here, not its scales in the kernel (one `vpsllw` a
            // super-block less; |4·bsum| <= 4·16·128 still fits i16)
            let mul = if order == XzOrder::Q3 { 4 } else { 1 };
            for (d, &s) in o[XZ_BSUMS..XZ_D].chunks_exact_mut(2).zip(&b.bsums) {
                // |bsum| <= 16 * 128: the negation fits
                d.copy_from_slice(&(-s * mul).to_le_bytes());
            }
        }
        o[XZ_D..].fill(0);
        let at = i % nb.max(1);
        let group_start = at.is_multiple_of(LANES) && at + LANES <= nb;
        let ds = if group_start { LANES } else { 1 };
        for (t, d) in o[XZ_D..XZ_D + 4 * ds].chunks_exact_mut(4).enumerate() {
            d.copy_from_slice(&blocks[i + t].d.to_le_bytes());
        }
    }
}

const SCL_K4: [[i16; 32]; 2] = [scl_idx(0, true), scl_idx(1, true)];
pub(super) const SCL_Q6: [[i16; 32]; 2] = [scl_idx(0, false), scl_idx(1, false)];
/// From [sc0..sc7, m0..m7] (i16) to [m0 m0 m1 m1 .. m7 m7]: bsums 2s and 2s + 1 are
/// sub-block s's.
const MIN_IDX: [i16; 16] = [8, 8, 9, 9, 10, 10, 11, 11, 12, 12, 13, 13, 14, 14, 15, 15];

#[target_feature(enable = "avx2,avx512f,avx512bw")]
#[inline]
pub(super) unsafe fn load_idx32(t: &[i16; 32]) -> __m512i {
    // SAFETY: 64 bytes.
    unsafe { _mm512_loadu_si512(t.as_ptr() as *const __m512i) }
}

/// [sc0..sc7, m0..m7] as i16 from the 12 scale bytes of a q4_K / q5_K block, with ggml's
/// word-wide masks (`reference::unpack_scales_k4`) on the four 32-bit lanes of one register.
///
/// # Safety
/// AVX2 must be available; `p` points at the 12 scale bytes and 4 more readable bytes.
#[target_feature(enable = "avx2")]
#[inline]
unsafe fn scales_mins_k4(p: *const u8) -> __m256i {
    // SAFETY: 16 readable bytes at p (caller).
    let v = unsafe { _mm_loadu_si128(p as *const __m128i) };
    // [u0 & 0x3f.., u1 & 0x3f..]: sc0..3, m0..3
    let lo = _mm_and_si128(v, _mm_set1_epi32(0x3f3f_3f3f));
    // [u2 & 0x0f.., (u2 >> 4) & 0x0f..] | [(u0 >> 6) & 3 .., (u1 >> 6) & 3 ..] << 4
    let u2 = _mm_shuffle_epi32(v, 0b1010);
    let a = _mm_and_si128(
        _mm_srlv_epi32(u2, _mm_set_epi32(0, 0, 4, 0)),
        _mm_set1_epi32(0x0f0f_0f0f),
    );
    let b = _mm_and_si128(_mm_srli_epi32(v, 2), _mm_set1_epi32(0x3030_3030));
    let hi = _mm_or_si128(a, b);
    _mm256_cvtepu8_epi16(_mm_unpacklo_epi32(lo, hi))
}

/// q4_K / q5_K: the nibble vectors (`DecodedZ::q` in `K4_ORDER`: the low nibbles of the 64
/// bytes qs[64h..] are sub-blocks 4h (low half) and 4h + 2 (high half), their high nibbles
/// 4h + 1 and 4h + 3), the scale vectors and the mins.
#[target_feature(enable = "avx2,avx512f,avx512bw,avx512vl")]
#[inline]
unsafe fn decode_k4(qs: &[u8; QK_K / 2], scales: *const u8) -> DecodedZ {
    let m4 = _mm512_set1_epi8(0x0f);
    let mut q = [_mm512_setzero_si512(); 4];
    for h in 0..2 {
        // SAFETY: 64 bytes inside qs (128).
        let v = unsafe { _mm512_loadu_si512(qs[64 * h..].as_ptr() as *const __m512i) };
        q[2 * h] = _mm512_and_si512(v, m4);
        q[2 * h + 1] = _mm512_and_si512(_mm512_srli_epi16(v, 4), m4);
    }
    // SAFETY: 16 readable bytes at `scales` (caller).
    let g = unsafe { scales_mins_k4(scales) };
    let gz = _mm512_zextsi256_si512(g);
    // SAFETY: constant tables of 32 i16 / 16 i16.
    unsafe {
        DecodedZ {
            q,
            scl: [
                _mm512_permutexvar_epi16(load_idx32(&SCL_K4[0]), gz),
                _mm512_permutexvar_epi16(load_idx32(&SCL_K4[1]), gz),
            ],
            bmul: _mm256_permutexvar_epi16(
                _mm256_loadu_si256(MIN_IDX.as_ptr() as *const __m256i),
                g,
            ),
        }
    }
}

impl RowK for BlockQ4K {
    const ORDER: XzOrder = XzOrder::K4;
    const OFFSET_SHIFT: Option<i32> = None;
    const HALF_OFF: usize = 0;
    #[inline(always)]
    unsafe fn decode_z(&self) -> DecodedZ {
        // SAFETY: AVX-512 available (contract); the 12 scale bytes (offset 4) are followed by
        // qs, so 16 bytes from there stay inside the block.
        unsafe { decode_k4(&self.qs, (self as *const Self as *const u8).add(4)) }
    }
}

impl RowK for BlockQ5K {
    const ORDER: XzOrder = XzOrder::K4;
    const OFFSET_SHIFT: Option<i32> = None;
    const HALF_OFF: usize = 0;
    #[inline(always)]
    unsafe fn decode_z(&self) -> DecodedZ {
        // SAFETY: AVX-512 available (contract); 16 bytes from `scales` stay inside the block
        // (qh follows), 32-byte loads inside qh.
        unsafe {
            let mut z = decode_k4(&self.qs, (self as *const Self as *const u8).add(4));
            let hv = _mm512_broadcast_i64x4(_mm256_loadu_si256(self.qh.as_ptr() as *const __m256i));
            let bit4 = _mm512_set1_epi8(0x10);
            for (i, v) in z.q.iter_mut().enumerate() {
                // bit s of qh[l] to bit 4 for the sub-blocks s of q[i] (`K4_ORDER`: 0 | 2,
                // 1 | 3, 4 | 6, 5 | 7); the 64-bit shifts leak bits across bytes, which the
                // mask 0x10 removes.
                let h = match i {
                    0 => _mm512_sllv_epi64(hv, _mm512_set_epi64(2, 2, 2, 2, 4, 4, 4, 4)),
                    1 => _mm512_sllv_epi64(hv, _mm512_set_epi64(1, 1, 1, 1, 3, 3, 3, 3)),
                    2 => _mm512_srlv_epi64(hv, _mm512_set_epi64(2, 2, 2, 2, 0, 0, 0, 0)),
                    _ => _mm512_srlv_epi64(hv, _mm512_set_epi64(3, 3, 3, 3, 1, 1, 1, 1)),
                };
                // v | (h & 0x10)
                *v = _mm512_ternarylogic_epi32::<0xf8>(*v, h, bit4);
            }
            z
        }
    }
}

impl RowK for BlockQ6K {
    const ORDER: XzOrder = XzOrder::Elements;
    const OFFSET_SHIFT: Option<i32> = Some(5);
    // d: the last 2 of 210 bytes
    const HALF_OFF: usize = 206;
    const D_HIGH: bool = true;
    #[inline(always)]
    unsafe fn decode_z(&self) -> DecodedZ {
        // SAFETY: AVX-512 available (contract); 64-byte loads inside ql (128), 32 inside qh
        // (64), 16 bytes of scales.
        unsafe {
            let m4 = _mm512_set1_epi8(0x0f);
            let m2 = _mm512_set1_epi8(0x30);
            let mut q = [_mm512_setzero_si512(); 4];
            for h in 0..2 {
                // low 256 bits: ql[64h..+32] (elements 128h + l and, high nibbles, 128h + 64 + l),
                // high 256 bits: ql[64h + 32..+32] (128h + 32 + l and 128h + 96 + l)
                let v = _mm512_loadu_si512(self.ql[64 * h..].as_ptr() as *const __m512i);
                let qh = _mm512_broadcast_i64x4(_mm256_loadu_si256(
                    self.qh[32 * h..].as_ptr() as *const __m256i
                ));
                // bits 2k..2k+1 of qh to bits 4..5: k = 0, 1 (<< 4, << 2), k = 2, 3 (>> 0, >> 2);
                // the mask 0x30 drops what crossed a byte boundary.
                let t01 = _mm512_sllv_epi64(qh, _mm512_set_epi64(2, 2, 2, 2, 4, 4, 4, 4));
                let t23 = _mm512_srlv_epi64(qh, _mm512_set_epi64(2, 2, 2, 2, 0, 0, 0, 0));
                // (v & 0x0f) | (t & 0x30)
                q[2 * h] = _mm512_ternarylogic_epi32::<0xf8>(_mm512_and_si512(v, m4), t01, m2);
                q[2 * h + 1] = _mm512_ternarylogic_epi32::<0xf8>(
                    _mm512_and_si512(_mm512_srli_epi16(v, 4), m4),
                    t23,
                    m2,
                );
            }
            let sc = _mm256_cvtepi8_epi16(_mm_loadu_si128(self.scales.as_ptr() as *const __m128i));
            let gz = _mm512_zextsi256_si512(sc);
            DecodedZ {
                q,
                scl: [
                    _mm512_permutexvar_epi16(load_idx32(&SCL_Q6[0]), gz),
                    _mm512_permutexvar_epi16(load_idx32(&SCL_Q6[1]), gz),
                ],
                // the scales times 32 (|sc| <= 128: fits i16)
                bmul: _mm256_slli_epi16(sc, 5),
            }
        }
    }
}

/// The integer sums of one super-block with one activation block (`RowK::sums_z`): Σ scale·q·x
/// in 16 i32 lanes and -Σ bmul·bsum in 8 (q4_K / q5_K / q2_K: their min sums, negated), or
/// with `offset` (q6_K / q3_K) Σ scale·q·x - Σ bmul·bsum in the 16 (one more `vpdpwssd`;
/// `bmul` is scaled by the offset, the `bsums` negated). The 16 lanes are not folded to 8
/// here: `vextracti64x4` at the end of this chain made the loop 1.7x slower (the super-blocks'
/// chains overlap less); the group's reduction (`t32`, `t64`, `lanes8`) adds them.
#[target_feature(enable = "avx2,avx512f,avx512bw,avx512vl,avx512vnni")]
#[inline]
unsafe fn sums_packs(d: &DecodedZ, xq: &[u8], offset: bool) -> (__m512i, __m256i) {
    debug_assert!(xq.len() >= XZ_BLOCK);
    let z = _mm512_setzero_si512();
    let mut p = [z; 4];
    for (i, v) in p.iter_mut().enumerate() {
        // SAFETY: 64 bytes inside xq (256).
        let xv = unsafe { _mm512_loadu_si512(xq[64 * i..].as_ptr() as *const __m512i) };
        *v = _mm512_dpbusd_epi32(z, d.q[i], xv);
    }
    // |p| <= 4·63·128 < 2^15: the packs are exact
    let s = _mm512_madd_epi16(_mm512_packs_epi32(p[0], p[1]), d.scl[0]);
    // `q16::dpwssd`: the intrinsic's chain became vpmaddwd + vpdpwssd + vpaddd (one vector
    // uop more per super-block on p0 / p5, the ports that bound this kernel)
    // SAFETY: AVX-512 F / VNNI (this function's features).
    let s = unsafe { dpwssd(s, _mm512_packs_epi32(p[2], p[3]), d.scl[1]) };
    // SAFETY: 32 bytes of bsums.
    let bs = unsafe { _mm256_loadu_si256(xq[XZ_BSUMS..].as_ptr() as *const __m256i) };
    if offset {
        // SAFETY: as above.
        let s = unsafe {
            dpwssd(
                s,
                _mm512_zextsi256_si512(bs),
                _mm512_zextsi256_si512(d.bmul),
            )
        };
        (s, _mm256_setzero_si256())
    } else {
        (s, _mm256_madd_epi16(bs, d.bmul))
    }
}
