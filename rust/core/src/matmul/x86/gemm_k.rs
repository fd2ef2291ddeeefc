//! The GEMM microkernel of the K-quants (q2_k, q3_k, q4_k, q5_k, q6_k, iq4_xs) for many
//! activation rows, AVX-512 F/BW/VL/VNNI. One 512-bit vector holds **16 weight rows, one per
//! 32-bit lane**: a super-block of 16 rows is decoded once per chunk of K (`KC` super-blocks)
//! into an L1-resident `SbBuf` (vector v = elements 4v..4v+4 of every row, unsigned), then
//! blocks of up to 4 activation rows run through the chunk, each activation dword broadcast to
//! all lanes (the q8_K blocks as they are: no interleaving of the activations).
//!
//! **Numerics.** Per super-block, lane r gets row r's exact integer sums: `vpdpbusd` over the
//! 32 (or 16) elements of a sub-block, times the sub-block scale, summed. For the formats
//! whose quants are stored with a bias `BIAS` to make them unsigned (q6_k, q3_k, iq4_xs) each
//! sub-block's sum starts at `-BIAS · Σx` (its q8_K `bsums`), so it is the signed quants' sum
//! and `isum` is the reference's directly; the min of q4_k, q5_k, q2_k is `msum = Σ_g m_g ·
//! bsum_g`, from 8 `vpdpwssd` with the per-group (m_2i, m_2i+1) pairs. The scale multiply is
//! `vpmulld`, or for q3_k / q2_k (`PAIR16`: a sub-block's sum fits in i16) one `vpdpwssd` per
//! two sub-blocks, their sums packed as an i16 pair by one masked `vpshufb`. Both integers
//! equal the reference's
//! (`reference::BlockK::sums`; no i32 overflow: at most ~2.5e8). The float part is
//! `reference::block_k_product` lane-wise, `(d·xd)·isum - (dmin·xd)·msum` (for the formats
//! without a min the reference subtracts `(0·xd)·0 = ±0`, which changes no sum: the lane
//! accumulators start at +0 and never become -0), added to float accumulator `b % 8` of the
//! output, and `finish` does `hsum8` across the 8 accumulators (vertical adds, the reference's
//! order). So every output has the bits of `reference::dot_block_k` whatever its row's lane,
//! its panel, the chunking of K or the thread count (tested).
//!
//! Safety: callers check AVX2, F16C and AVX-512 F/BW/VL/VNNI at run time (`cpu::has_vnni_bw`)
//! and pass slices of the lengths stated on each function.

use std::arch::x86_64::*;

use crate::formats::blocks::*;
use crate::matmul::reference::{self as r, BlockQ8K, LANES};

/// Weight rows of one vector (one per 32-bit lane).
pub const NV: usize = 16;
/// Vectors of one panel (the microkernel's weight side): a panel is `NV · PV` = 32 rows.
pub const PV: usize = 2;
/// Super-blocks of one chunk of K: a panel's decoded chunk (2 x 2 x 5.6 KiB) stays in L1 with
/// the activation rows passing it.
pub const KC: usize = 2;

/// One 512-bit line on a 64-byte boundary.
#[repr(C, align(64))]
#[derive(Clone, Copy)]
pub struct Zmm(pub [u8; 64]);

const ZMM0: Zmm = Zmm([0; 64]);

/// One super-block of 16 weight rows, decoded: `q[v]` lane r = elements 4v..4v+4 of row r
/// (unsigned: the quant plus the format's bias), `sc[g]` the i32 scale of sub-block g (of 32
/// elements; of 16 for `SUB16` formats; for `PAIR16` formats `sc[i]`, i < 8, the i16 pair
/// (sc_2i, sc_2i+1)), `c[i]` the i16 pair (c_2i, c_2i+1) of the min's coefficients (read only
/// with `MIN`), `d` / `dmin` the f32 super-block scale and min.
#[derive(Clone, Copy)]
pub struct SbBuf {
    pub q: [Zmm; 64],
    pub sc: [Zmm; 16],
    pub c: [Zmm; 8],
    pub d: Zmm,
    pub dmin: Zmm,
}

impl Default for SbBuf {
    fn default() -> Self {
        Self {
            q: [ZMM0; 64],
            sc: [ZMM0; 16],
            c: [ZMM0; 8],
            d: ZMM0,
            dmin: ZMM0,
        }
    }
}

/// The scalar side of one row's super-block: 16 scales (the first 8 when not `SUB16`), 16
/// correction coefficients, d and dmin (f16 bits).
pub struct Scales {
    pub sc: [i32; 16],
    pub c: [i16; 16],
    pub d: u16,
    pub dmin: u16,
}

/// A K-quant the GEMM decodes.
pub trait DecodeK: bytemuck::Pod {
    /// Scales per 16 elements (q6_k, q2_k, q3_k) instead of per 32.
    const SUB16: bool;
    /// The correction is the min term (`msum`, with `dmin`) rather than a bias in `isum`.
    const MIN: bool;
    /// The bias of the unsigned quants (q6_k 32, q3_k 4, iq4_xs 128; 0 with `MIN`): each
    /// group's integer sum starts at `-BIAS · Σx` of its activations (the q8_K `bsums`), so it
    /// is the signed quants' sum and no correction term is left.
    const BIAS: i32;
    /// A group's sum fits in i16 (q3_k: |Σ q x| <= 16·4·128, q2_k: 16·3·128), so two groups
    /// take their scales in one `vpdpwssd` instead of two `vpmulld` (two µops each on Intel)
    /// and two adds: `sc[i]` holds the i16 pair (sc_2i, sc_2i+1), i < 8.
    const PAIR16: bool;
    /// Row `self`'s scales and correction coefficients.
    fn scales(&self) -> Scales;
    /// The unsigned quants of 16 rows' super-blocks into `q` (see `SbBuf`).
    ///
    /// # Safety
    /// AVX-512 F/BW must be available.
    unsafe fn quants(rows: &[&Self; NV], q: &mut [Zmm; 64]);
    /// The scales, coefficients, d and dmin of 16 rows into `buf` with vector code, the same
    /// values as `scales` (false: not done, `decode` runs `scales` row by row).
    ///
    /// # Safety
    /// AVX2, F16C, AVX-512 F/BW must be available.
    unsafe fn scales16(_rows: &[&Self; NV], _buf: &mut SbBuf) -> bool {
        false
    }
    /// `quants` and `scales16` in one, for a format whose scales come out of the quants'
    /// transposes (false: not done, `decode` runs the two).
    ///
    /// # Safety
    /// AVX2, F16C, AVX-512 F/BW must be available.
    unsafe fn quants_scales(_rows: &[&Self; NV], _buf: &mut SbBuf) -> bool {
        false
    }
}

/// The pairs `(v[2i] & 0xffff) | (v[2i + 1] << 16)`, i < 8, of 16 lane vectors into `dst`.
#[target_feature(enable = "avx512f")]
#[inline]
fn put_pairs(dst: &mut [Zmm], v: &[__m512i; 16]) {
    let lo = _mm512_set1_epi32(0xffff);
    for (i, d) in dst.iter_mut().take(8).enumerate() {
        let p = _mm512_or_si512(
            _mm512_and_si512(v[2 * i], lo),
            _mm512_slli_epi32::<16>(v[2 * i + 1]),
        );
        put(d, p);
    }
}

/// The f16 field at byte `off` of 16 rows' blocks as f32, into `dst`.
///
/// # Safety
/// AVX2, F16C, AVX-512 F; `off + 2` is within the block.
#[target_feature(enable = "avx2,f16c,avx512f")]
#[inline]
unsafe fn f16_field<W: DecodeK>(rows: &[&W; NV], off: usize, dst: &mut Zmm) {
    assert!(off + 2 <= std::mem::size_of::<W>());
    let h: [u16; NV] = std::array::from_fn(|i| {
        let b = bytemuck::bytes_of(rows[i]);
        u16::from_le_bytes([b[off], b[off + 1]])
    });
    // SAFETY: 32 bytes (16 f16) loaded; the features (contract); 64 bytes stored into a Zmm.
    unsafe {
        let v = _mm512_cvtph_ps(_mm256_loadu_si256(h.as_ptr() as *const __m256i));
        _mm512_store_ps(dst.0.as_mut_ptr() as *mut f32, v);
    }
}

/// The f16 values of 16 lanes' low (`HI` false) or high 16 bits as f32, into `dst`.
#[target_feature(enable = "avx2,f16c,avx512f")]
#[inline]
fn halves_to(v: __m512i, hi: bool, dst: &mut Zmm) {
    let v = if hi { _mm512_srli_epi32::<16>(v) } else { v };
    let f = _mm512_cvtph_ps(_mm512_cvtepi32_epi16(v));
    // SAFETY: a Zmm is 64 bytes on a 64-byte boundary.
    unsafe { _mm512_store_ps(dst.0.as_mut_ptr() as *mut f32, f) };
}

/// q4_k / q5_k: d, dmin and the 12 scale bytes are the first 16 bytes of the block: ggml's
/// word-wide unpacking (`reference::unpack_scales_k4`) on 16 rows at once.
#[target_feature(enable = "avx2,f16c,avx512f,avx512bw")]
#[inline]
unsafe fn k4_scales16<W: DecodeK>(rows: &[&W; NV], buf: &mut SbBuf) {
    // SAFETY: bytes 0..64 of a q4_k (144) / q5_k (176) block; AVX-512 F (contract).
    let t = unsafe { tr(rows, 0) };
    let (u0, u1, u2) = (t[1], t[2], t[3]);
    let k1 = _mm512_set1_epi32(0x3f3f_3f3f);
    let k2 = _mm512_set1_epi32(0x0f0f_0f0f);
    let k3 = _mm512_set1_epi32(0x0303_0303);
    let hi = |a: __m512i, b: __m512i| {
        _mm512_or_si512(
            _mm512_and_si512(a, k2),
            _mm512_slli_epi32::<4>(_mm512_and_si512(_mm512_srli_epi32::<6>(b), k3)),
        )
    };
    let sc = [_mm512_and_si512(u0, k1), hi(u2, u0)];
    let mn = [_mm512_and_si512(u1, k1), hi(_mm512_srli_epi32::<4>(u2), u1)];
    let ff = _mm512_set1_epi32(0xff);
    for s in 0..8 {
        let byte = |v: __m512i| {
            let sh = _mm512_set1_epi32(8 * (s as i32 % 4));
            _mm512_and_si512(_mm512_srlv_epi32(v, sh), ff)
        };
        put(&mut buf.sc[s], byte(sc[s / 4]));
        let m = byte(mn[s / 4]);
        put(
            &mut buf.c[s],
            _mm512_or_si512(m, _mm512_slli_epi32::<16>(m)),
        );
    }
    halves_to(t[0], false, &mut buf.d);
    halves_to(t[0], true, &mut buf.dmin);
}

/// `out[c]` lane i = dword c of the 64 bytes at byte `off` of row i (a 16 x 16 transpose).
///
/// # Safety
/// AVX-512 F; `off + 64` is within every row's block.
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn tr<W: DecodeK>(rows: &[&W; NV], off: usize) -> [__m512i; 16] {
    assert!(off + 64 <= std::mem::size_of::<W>());
    let mut v = [_mm512_setzero_si512(); 16];
    for (vi, row) in v.iter_mut().zip(rows) {
        // SAFETY: bytes off..off + 64 of the block (asserted); unaligned load.
        *vi = unsafe { _mm512_loadu_si512((*row as *const W as *const u8).add(off) as *const _) };
    }
    let mut t = [_mm512_setzero_si512(); 16];
    for k in 0..8 {
        t[2 * k] = _mm512_unpacklo_epi32(v[2 * k], v[2 * k + 1]);
        t[2 * k + 1] = _mm512_unpackhi_epi32(v[2 * k], v[2 * k + 1]);
    }
    // u[4k + j], 128-bit lane q: dword 4q + j of rows 4k..4k + 4
    let mut u = [_mm512_setzero_si512(); 16];
    for k in 0..4 {
        u[4 * k] = _mm512_unpacklo_epi64(t[4 * k], t[4 * k + 2]);
        u[4 * k + 1] = _mm512_unpackhi_epi64(t[4 * k], t[4 * k + 2]);
        u[4 * k + 2] = _mm512_unpacklo_epi64(t[4 * k + 1], t[4 * k + 3]);
        u[4 * k + 3] = _mm512_unpackhi_epi64(t[4 * k + 1], t[4 * k + 3]);
    }
    let mut out = [_mm512_setzero_si512(); 16];
    for j in 0..4 {
        let (a, b, c, d) = (u[j], u[4 + j], u[8 + j], u[12 + j]);
        let x0 = _mm512_shuffle_i32x4::<0b01_00_01_00>(a, b);
        let x1 = _mm512_shuffle_i32x4::<0b11_10_11_10>(a, b);
        let y0 = _mm512_shuffle_i32x4::<0b01_00_01_00>(c, d);
        let y1 = _mm512_shuffle_i32x4::<0b11_10_11_10>(c, d);
        out[j] = _mm512_shuffle_i32x4::<0b10_00_10_00>(x0, y0);
        out[4 + j] = _mm512_shuffle_i32x4::<0b11_01_11_01>(x0, y0);
        out[8 + j] = _mm512_shuffle_i32x4::<0b10_00_10_00>(x1, y1);
        out[12 + j] = _mm512_shuffle_i32x4::<0b11_01_11_01>(x1, y1);
    }
    out
}

#[target_feature(enable = "avx512f")]
#[inline]
fn put(q: &mut Zmm, v: __m512i) {
    // SAFETY: a Zmm is 64 bytes on a 64-byte boundary.
    unsafe { _mm512_store_si512(q.0.as_mut_ptr() as *mut _, v) };
}

/// Bit `s` (0..8) of every byte moved to bit 4 (the 16-bit shifts stay inside the masked bit).
#[target_feature(enable = "avx512f,avx512bw")]
#[inline]
fn bit_to_4(v: __m512i, s: u32) -> __m512i {
    let m = _mm512_set1_epi8(0x10);
    let x = match s {
        0 => _mm512_slli_epi16::<4>(v),
        1 => _mm512_slli_epi16::<3>(v),
        2 => _mm512_slli_epi16::<2>(v),
        3 => _mm512_slli_epi16::<1>(v),
        4 => v,
        5 => _mm512_srli_epi16::<1>(v),
        6 => _mm512_srli_epi16::<2>(v),
        _ => _mm512_srli_epi16::<3>(v),
    };
    _mm512_and_si512(x, m)
}

fn k4_scales(scales: &[u8; K_SCALE_SIZE], d: Half, dmin: Half) -> Scales {
    let (sc, mn) = r::unpack_scales_k4(scales);
    Scales {
        sc: std::array::from_fn(|j| if j < 8 { sc[j] as i32 } else { 0 }),
        c: std::array::from_fn(|g| mn[g / 2] as i16),
        d: u16::from_le_bytes(d),
        dmin: u16::from_le_bytes(dmin),
    }
}

/// q4_k's nibbles from the transposed `qs` dwords (`qs(c)`, c in 0..32).
#[target_feature(enable = "avx512f,avx512bw")]
#[inline]
fn k4_nibbles(qs: impl Fn(usize) -> __m512i, q: &mut [Zmm; 64]) {
    let m4 = _mm512_set1_epi8(0x0f);
    for c in 0..32 {
        let v = qs(c);
        let (j, t) = (c / 8, c % 8);
        put(&mut q[16 * j + t], _mm512_and_si512(v, m4));
        put(
            &mut q[16 * j + 8 + t],
            _mm512_and_si512(_mm512_srli_epi16::<4>(v), m4),
        );
    }
}

impl DecodeK for BlockQ4K {
    const SUB16: bool = false;
    const MIN: bool = true;
    const BIAS: i32 = 0;
    const PAIR16: bool = false;
    fn scales(&self) -> Scales {
        k4_scales(&self.scales, self.d, self.dmin)
    }
    #[inline(always)]
    unsafe fn scales16(rows: &[&Self; NV], buf: &mut SbBuf) -> bool {
        // SAFETY: the features (contract).
        unsafe { k4_scales16(rows, buf) };
        true
    }
    #[inline(always)]
    unsafe fn quants(rows: &[&Self; NV], q: &mut [Zmm; 64]) {
        // SAFETY: AVX-512 F/BW (contract); qs is bytes 16..144 of the 144-byte block.
        unsafe {
            let (a, b) = (tr(rows, 16), tr(rows, 80));
            k4_nibbles(|c| if c < 16 { a[c] } else { b[c - 16] }, q);
        }
    }
}

impl DecodeK for BlockQ5K {
    const SUB16: bool = false;
    const MIN: bool = true;
    const BIAS: i32 = 0;
    const PAIR16: bool = false;
    fn scales(&self) -> Scales {
        k4_scales(&self.scales, self.d, self.dmin)
    }
    #[inline(always)]
    unsafe fn scales16(rows: &[&Self; NV], buf: &mut SbBuf) -> bool {
        // SAFETY: the features (contract).
        unsafe { k4_scales16(rows, buf) };
        true
    }
    #[inline(always)]
    unsafe fn quants(rows: &[&Self; NV], q: &mut [Zmm; 64]) {
        // SAFETY: AVX-512 F/BW (contract); qh is bytes 16..48 and qs 48..176 of the block:
        // a = qh dwords 0..8 then qs dwords 0..8, b = qs 8..24, c = qs 16..32.
        unsafe {
            let (a, b, c) = (tr(rows, 16), tr(rows, 80), tr(rows, 112));
            k4_nibbles(
                |i| match i {
                    0..8 => a[8 + i],
                    8..24 => b[i - 8],
                    _ => c[i - 16],
                },
                q,
            );
            for t in 0..8 {
                for s in 0..8 {
                    let v = &mut q[8 * s + t];
                    let lo = _mm512_load_si512(v.0.as_ptr() as *const _);
                    put(v, _mm512_or_si512(lo, bit_to_4(a[t], s as u32)));
                }
            }
        }
    }
}

impl DecodeK for BlockQ6K {
    const SUB16: bool = true;
    const MIN: bool = false;
    const BIAS: i32 = 32;
    const PAIR16: bool = false;
    fn scales(&self) -> Scales {
        Scales {
            sc: self.scales.map(|s| s as i32),
            c: self.scales.map(|s| -32 * s as i16),
            d: u16::from_le_bytes(self.d),
            dmin: 0,
        }
    }
    #[inline(always)]
    unsafe fn scales16(rows: &[&Self; NV], buf: &mut SbBuf) -> bool {
        // SAFETY: bytes 144..208 of the 210-byte block (the scales are 192..208: dwords
        // 12..16); the features (contract).
        unsafe {
            let t = tr(rows, 144);
            for i in 0..4 {
                let v = t[12 + i];
                // bytes 4i + b, sign-extended: (v << (24 - 8b)) >> 24
                let b = [
                    _mm512_srai_epi32::<24>(_mm512_slli_epi32::<24>(v)),
                    _mm512_srai_epi32::<24>(_mm512_slli_epi32::<16>(v)),
                    _mm512_srai_epi32::<24>(_mm512_slli_epi32::<8>(v)),
                    _mm512_srai_epi32::<24>(v),
                ];
                for (k, bk) in b.iter().enumerate() {
                    put(&mut buf.sc[4 * i + k], *bk);
                }
            }
            // (`c`: not read without a min, `BIAS`.)
            f16_field(rows, 208, &mut buf.d);
            put(&mut buf.dmin, _mm512_setzero_si512());
        }
        true
    }
    #[inline(always)]
    unsafe fn quants(rows: &[&Self; NV], q: &mut [Zmm; 64]) {
        // SAFETY: AVX-512 F/BW (contract); ql is bytes 0..128, qh 128..192 of the 210.
        unsafe {
            let (l0, l1, h) = (tr(rows, 0), tr(rows, 64), tr(rows, 128));
            let ql = |c: usize| if c < 16 { l0[c] } else { l1[c - 16] };
            let (m4, m2) = (_mm512_set1_epi8(0x0f), _mm512_set1_epi8(0x30));
            for hh in 0..2 {
                for t in 0..8 {
                    let qh = h[8 * hh + t];
                    let tops = [
                        _mm512_slli_epi16::<4>(qh),
                        _mm512_slli_epi16::<2>(qh),
                        qh,
                        _mm512_srli_epi16::<2>(qh),
                    ];
                    for (k, top) in tops.into_iter().enumerate() {
                        let l = ql(16 * hh + 8 * (k % 2) + t);
                        let low = if k < 2 { l } else { _mm512_srli_epi16::<4>(l) };
                        let v =
                            _mm512_or_si512(_mm512_and_si512(low, m4), _mm512_and_si512(top, m2));
                        put(&mut q[8 * (4 * hh + k) + t], v);
                    }
                }
            }
        }
    }
}

impl DecodeK for BlockQ2K {
    const SUB16: bool = true;
    const MIN: bool = true;
    const BIAS: i32 = 0;
    const PAIR16: bool = true;
    fn scales(&self) -> Scales {
        Scales {
            sc: self.scales.map(|s| (s & 15) as i32),
            c: self.scales.map(|s| (s >> 4) as i16),
            d: u16::from_le_bytes(self.d),
            dmin: u16::from_le_bytes(self.dmin),
        }
    }
    #[inline(always)]
    unsafe fn scales16(rows: &[&Self; NV], buf: &mut SbBuf) -> bool {
        // SAFETY: bytes 0..64 of the 84-byte block (the scales are dwords 0..4), d and dmin
        // at 80 and 82; the features (contract).
        unsafe {
            let t = tr(rows, 0);
            let (m4, ff) = (_mm512_set1_epi32(15), _mm512_set1_epi32(0xff));
            // byte g of every row: scale = low nibble, min = high nibble
            let byte = |g: usize| {
                let sh = _mm512_set1_epi32(8 * (g as i32 % 4));
                _mm512_and_si512(_mm512_srlv_epi32(t[g / 4], sh), ff)
            };
            // Plain loops: `[T; N]::map` / `from_fn` left the closures, intrinsics and all, as
            // calls without the target features (a third of a q2_k GEMM at M = 16, perf).
            let (mut sc, mut mn) = ([_mm512_setzero_si512(); 16], [_mm512_setzero_si512(); 16]);
            for g in 0..16 {
                let b = byte(g);
                sc[g] = _mm512_and_si512(b, m4);
                mn[g] = _mm512_srli_epi32::<4>(b);
            }
            put_pairs(&mut buf.sc, &sc);
            put_pairs(&mut buf.c, &mn);
            f16_field(rows, 80, &mut buf.d);
            f16_field(rows, 82, &mut buf.dmin);
        }
        true
    }
    #[inline(always)]
    unsafe fn quants(rows: &[&Self; NV], q: &mut [Zmm; 64]) {
        // SAFETY: AVX-512 F/BW (contract); qs is bytes 16..80 of the 84-byte block.
        unsafe {
            let a = tr(rows, 16);
            let m3 = _mm512_set1_epi8(3);
            for h in 0..2 {
                for t in 0..8 {
                    let v = a[8 * h + t];
                    let parts = [
                        v,
                        _mm512_srli_epi16::<2>(v),
                        _mm512_srli_epi16::<4>(v),
                        _mm512_srli_epi16::<6>(v),
                    ];
                    for (j, p) in parts.into_iter().enumerate() {
                        put(&mut q[8 * (4 * h + j) + t], _mm512_and_si512(p, m3));
                    }
                }
            }
        }
    }
}

impl DecodeK for BlockQ3K {
    const SUB16: bool = true;
    const MIN: bool = false;
    const BIAS: i32 = 4;
    const PAIR16: bool = true;
    // A plain loop, always inlined: with `[T; N]::map` the compiler left `try_map` as a call
    // of its own (12 % of a q3_k GEMM at M = 16, perf) once the driver loop changed.
    #[inline(always)]
    fn scales(&self) -> Scales {
        let sc = r::scales_q3_k(&self.scales);
        let (mut s32, mut c) = ([0i32; 16], [0i16; 16]);
        for ((s32, c), &s) in s32.iter_mut().zip(c.iter_mut()).zip(&sc) {
            *s32 = s as i32;
            *c = -4 * s as i16;
        }
        Scales {
            sc: s32,
            c,
            d: u16::from_le_bytes(self.d),
            dmin: 0,
        }
    }
    #[inline(always)]
    unsafe fn quants(rows: &[&Self; NV], q: &mut [Zmm; 64]) {
        // SAFETY: the contract.
        unsafe { q3_k_quants(rows, q) };
    }
    #[inline(always)]
    unsafe fn quants_scales(rows: &[&Self; NV], buf: &mut SbBuf) -> bool {
        // SAFETY: the contract; d is bytes 108..110 of the 110-byte block.
        unsafe {
            let s = q3_k_quants(rows, &mut buf.q);
            q3_k_scales(&s, buf);
            f16_field(rows, 108, &mut buf.d);
            put(&mut buf.dmin, _mm512_setzero_si512());
        }
        true
    }
}

/// q3_k's unsigned quants (the quant plus 4) of 16 rows into `q`; returns the transposed
/// scale dwords (bytes 96..108 of the block, lane r = row r).
///
/// # Safety
/// AVX-512 F/BW must be available.
#[target_feature(enable = "avx512f,avx512bw")]
#[inline]
unsafe fn q3_k_quants(rows: &[&BlockQ3K; NV], q: &mut [Zmm; 64]) -> [__m512i; 3] {
    // SAFETY: AVX-512 F/BW (contract); hmask is bytes 0..32, qs 32..96 of the 110: a =
    // hmask dwords 0..8 then qs dwords 0..8, b (from byte 44) = qs dwords 3..19 then the
    // scales' 3 dwords.
    let (a, b) = unsafe { (tr(rows, 0), tr(rows, 44)) };
    let m3 = _mm512_set1_epi8(3);
    for h in 0..2 {
        for t in 0..8 {
            let v = if h == 0 { a[8 + t] } else { b[5 + t] };
            let hm = a[t];
            let low = [
                v,
                _mm512_srli_epi16::<2>(v),
                _mm512_srli_epi16::<4>(v),
                _mm512_srli_epi16::<6>(v),
            ];
            for (s, lo) in low.into_iter().enumerate() {
                // bit 4h + s of hmask to bit 2: u = low + 4·high (the quant plus 4)
                let bit = 4 * h + s;
                let high = _mm512_srli_epi16::<2>(bit_to_4(hm, bit as u32));
                put(
                    &mut q[8 * (4 * h + s) + t],
                    _mm512_or_si512(_mm512_and_si512(lo, m3), high),
                );
            }
        }
    }
    [b[13], b[14], b[15]]
}

/// `reference::scales_q3_k` on 16 rows (`s`: the scale dwords, lane r = row r) as i16 pairs
/// into `buf.sc` (`PAIR16`).
#[target_feature(enable = "avx512f")]
#[inline]
fn q3_k_scales(s: &[__m512i; 3], buf: &mut SbBuf) {
    let bits = |v: __m512i, sh: usize, mask: i32| {
        _mm512_and_si512(
            _mm512_srlv_epi32(v, _mm512_set1_epi32(sh as i32)),
            _mm512_set1_epi32(mask),
        )
    };
    let mut sc = [_mm512_setzero_si512(); 16];
    for (j, v) in sc.iter_mut().enumerate() {
        // low = (sc[j % 8] >> 4 (j / 8)) & 15, high = (sc[8 + j % 4] >> 2 (j / 4)) & 3
        let low = bits(s[(j % 8) / 4], 8 * (j % 4) + 4 * (j / 8), 15);
        let high = bits(s[2], 8 * (j % 4) + 2 * (j / 4), 3);
        *v = _mm512_sub_epi32(
            _mm512_or_si512(low, _mm512_slli_epi32::<4>(high)),
            _mm512_set1_epi32(32),
        );
    }
    put_pairs(&mut buf.sc, &sc);
}

impl DecodeK for BlockIQ4XS {
    const SUB16: bool = false;
    const MIN: bool = false;
    const BIAS: i32 = 128;
    const PAIR16: bool = false;
    fn scales(&self) -> Scales {
        let sc = r::scales_iq4_xs(self);
        Scales {
            sc: std::array::from_fn(|j| if j < 8 { sc[j] } else { 0 }),
            c: std::array::from_fn(|g| (-128 * sc[g / 2]) as i16),
            d: u16::from_le_bytes(self.d),
            dmin: 0,
        }
    }
    #[inline(always)]
    unsafe fn scales16(rows: &[&Self; NV], buf: &mut SbBuf) -> bool {
        // SAFETY: bytes 0..64 of the 136-byte block: dword 0 = d | scales_h << 16, dword 1 =
        // scales_l; the features (contract).
        unsafe {
            let t = tr(rows, 0);
            let h = _mm512_srli_epi32::<16>(t[0]);
            for b in 0..8 {
                // reference::scales_iq4_xs: low = (scales_l >> 4b) & 15, high = (h >> 2b) & 3
                let sh = |n: usize| _mm512_set1_epi32(n as i32);
                let low = _mm512_and_si512(_mm512_srlv_epi32(t[1], sh(4 * b)), sh(15));
                let high = _mm512_and_si512(_mm512_srlv_epi32(h, sh(2 * b)), sh(3));
                let v =
                    _mm512_sub_epi32(_mm512_or_si512(low, _mm512_slli_epi32::<4>(high)), sh(32));
                put(&mut buf.sc[b], v);
            }
            halves_to(t[0], false, &mut buf.d);
            put(&mut buf.dmin, _mm512_setzero_si512());
        }
        true
    }
    #[inline(always)]
    unsafe fn quants(rows: &[&Self; NV], q: &mut [Zmm; 64]) {
        // SAFETY: AVX-512 F/BW (contract); qs is bytes 8..136 of the 136-byte block.
        unsafe {
            let (a, b) = (tr(rows, 8), tr(rows, 72));
            let tab: [u8; 16] = std::array::from_fn(|i| (r::KVALUES_IQ4NL[i] as i32 + 128) as u8);
            let tab = _mm512_broadcast_i32x4(_mm_loadu_si128(tab.as_ptr() as *const __m128i));
            let m4 = _mm512_set1_epi8(0x0f);
            for c in 0..32 {
                let v = if c < 16 { a[c] } else { b[c - 16] };
                let (sb, t) = (c / 4, c % 4);
                let lo = _mm512_shuffle_epi8(tab, _mm512_and_si512(v, m4));
                let hi = _mm512_shuffle_epi8(tab, _mm512_and_si512(_mm512_srli_epi16::<4>(v), m4));
                put(&mut q[8 * sb + t], lo);
                put(&mut q[8 * sb + 4 + t], hi);
            }
        }
    }
}

/// Decodes one super-block of 16 rows (`rows[i]`: row i's block; rows past the panel's end
/// point at a zero block and give lanes nobody reads) into `buf`.
///
/// # Safety
/// AVX2, F16C, AVX-512 F/BW/VL/VNNI (`cpu::has_vnni_bw`).
#[target_feature(enable = "avx2,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
pub unsafe fn decode<W: DecodeK>(rows: &[&W; NV], buf: &mut SbBuf) {
    // SAFETY: the features (contract).
    if unsafe { W::quants_scales(rows, buf) } {
        return;
    }
    // SAFETY: AVX-512 F/BW (contract).
    unsafe { W::quants(rows, &mut buf.q) };
    // SAFETY: the features (contract).
    if unsafe { W::scales16(rows, buf) } {
        return;
    }
    let mut sc = [[0i32; NV]; 16];
    let mut c = [[0u32; NV]; 8];
    let mut d = [0u16; NV];
    let mut dmin = [0u16; NV];
    for (i, row) in rows.iter().enumerate() {
        let s = row.scales();
        for (scg, &v) in sc.iter_mut().zip(&s.sc) {
            scg[i] = v;
        }
        for (cp, pair) in c.iter_mut().zip(s.c.chunks_exact(2)) {
            cp[i] = (pair[0] as u16 as u32) | ((pair[1] as u16 as u32) << 16);
        }
        d[i] = s.d;
        dmin[i] = s.dmin;
    }
    let mut scv = [_mm512_setzero_si512(); 16];
    for (d, v) in scv.iter_mut().zip(&sc) {
        // SAFETY: the 64 bytes of v loaded.
        *d = unsafe { _mm512_loadu_si512(v.as_ptr() as *const _) };
    }
    if W::PAIR16 {
        put_pairs(&mut buf.sc, &scv);
    } else {
        let groups = if W::SUB16 { 16 } else { 8 };
        for (dst, v) in buf.sc.iter_mut().zip(scv).take(groups) {
            put(dst, v);
        }
    }
    for (dst, v) in buf.c.iter_mut().zip(&c) {
        // SAFETY: as above.
        put(dst, unsafe { _mm512_loadu_si512(v.as_ptr() as *const _) });
    }
    for (dst, h) in [(&mut buf.d, d), (&mut buf.dmin, dmin)] {
        // SAFETY: 32 bytes (16 f16) loaded; F16C / AVX-512 F (contract); 64 bytes stored.
        unsafe {
            let v = _mm512_cvtph_ps(_mm256_loadu_si256(h.as_ptr() as *const __m256i));
            _mm512_store_ps(dst.0.as_mut_ptr() as *mut f32, v);
        }
    }
}

/// Float accumulators of one activation row with one vector of 16 weight rows: lane
/// accumulator `b % 8` for super-block b.
pub type Acc = [__m512; LANES];

/// R activation rows (`x[j]`: row j's q8_K blocks of the chunk) against the P decoded vectors
/// of each of the chunk's super-blocks (`buf[sb * PV + p]`, `nsb` super-blocks, the first
/// being super-block `b0` of the row): `acc[j][p][(b0 + sb) % 8] += ` each super-block's
/// product (`acc[j][p]` is `acc[j * PV + p]`).
///
/// # Safety
/// AVX2, F16C, AVX-512 F/BW/VL/VNNI (`cpu::has_vnni_bw`); `buf` holds `nsb * PV` decoded
/// super-blocks; every `x[j]` has at least `nsb` blocks.
#[target_feature(enable = "avx2,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
pub unsafe fn kernel<W: DecodeK, const R: usize, const P: usize>(
    buf: &[SbBuf],
    nsb: usize,
    b0: usize,
    x: &[&[BlockQ8K]; R],
    acc: &mut [Acc],
) {
    assert!(P <= PV && buf.len() >= nsb * PV && acc.len() >= R * PV);
    for xj in x {
        assert!(xj.len() >= nsb);
    }
    let (groups, len) = if W::SUB16 { (16, 4) } else { (8, 8) };
    // Bytes 2, 3 of each dword from bytes 0, 1 of the same dword (`PAIR16`'s packing).
    let to_high = _mm512_set4_epi32(0x0d0c_0000, 0x0908_0000, 0x0504_0000, 0x0100_0000);
    const HIGH_WORDS: u64 = 0xcccc_cccc_cccc_cccc;
    for sb in 0..nsb {
        let wb: [&SbBuf; P] = std::array::from_fn(|p| &buf[sb * PV + p]);
        let xq: [*const i32; R] = std::array::from_fn(|j| x[j][sb].qs.as_ptr() as *const i32);
        // -BIAS · Σx of each group of each activation row: where its integer sum starts.
        let mut init = [[0i32; 16]; R];
        if W::BIAS != 0 {
            for (j, ij) in init.iter_mut().enumerate() {
                // SAFETY: bsums is 16 i16 (32 bytes); unaligned read.
                let b = unsafe { _mm256_loadu_si256(x[j][sb].bsums.as_ptr() as *const __m256i) };
                let v = if W::SUB16 {
                    _mm512_mullo_epi32(_mm512_cvtepi16_epi32(b), _mm512_set1_epi32(-W::BIAS))
                } else {
                    // groups of 32 elements: -BIAS · (bsums[2g] + bsums[2g + 1]), exact
                    let m = _mm256_set1_epi16(-W::BIAS as i16);
                    _mm512_zextsi256_si512(_mm256_madd_epi16(b, m))
                };
                // SAFETY: 64 bytes stored into the 16 i32.
                unsafe { _mm512_storeu_si512(ij.as_mut_ptr() as *mut _, v) };
            }
        }
        // The R x P integer sums of group g.
        let group = |g: usize| {
            let mut a = [[_mm512_setzero_si512(); P]; R];
            for (aj, ij) in a.iter_mut().zip(&init) {
                *aj = [_mm512_set1_epi32(ij[g]); P];
            }
            for v in g * len..(g + 1) * len {
                let mut xv = [_mm512_setzero_si512(); R];
                for j in 0..R {
                    // SAFETY: dword v < 64 of the 256-byte qs; unaligned read.
                    xv[j] = _mm512_set1_epi32(unsafe { xq[j].add(v).read_unaligned() });
                }
                for p in 0..P {
                    // SAFETY: an aligned Zmm of the decoded buffer.
                    let w = unsafe { _mm512_load_si512(wb[p].q[v].0.as_ptr() as *const _) };
                    for j in 0..R {
                        a[j][p] = _mm512_dpbusd_epi32(a[j][p], w, xv[j]);
                    }
                }
            }
            a
        };
        let mut isum = [[_mm512_setzero_si512(); P]; R];
        if W::PAIR16 {
            for i in 0..groups / 2 {
                let (lo, hi) = (group(2 * i), group(2 * i + 1));
                for p in 0..P {
                    // SAFETY: as above.
                    let s = unsafe { _mm512_load_si512(wb[p].sc[i].0.as_ptr() as *const _) };
                    for j in 0..R {
                        // (low word of group 2i's sum, low word of group 2i + 1's): both fit
                        let pair =
                            _mm512_mask_shuffle_epi8(lo[j][p], HIGH_WORDS, hi[j][p], to_high);
                        isum[j][p] = _mm512_dpwssd_epi32(isum[j][p], pair, s);
                    }
                }
            }
        } else {
            for g in 0..groups {
                let a = group(g);
                for p in 0..P {
                    // SAFETY: as above.
                    let s = unsafe { _mm512_load_si512(wb[p].sc[g].0.as_ptr() as *const _) };
                    for j in 0..R {
                        isum[j][p] = _mm512_add_epi32(isum[j][p], _mm512_mullo_epi32(a[j][p], s));
                    }
                }
            }
        }
        // The min term `msum` (the formats with a bias have none left).
        let mut corr = [[_mm512_setzero_si512(); P]; R];
        for i in 0..if W::MIN { 8 } else { 0 } {
            let mut bs = [_mm512_setzero_si512(); R];
            for j in 0..R {
                // SAFETY: bsums is 16 i16; dword i is bsums[2i], bsums[2i + 1].
                bs[j] = _mm512_set1_epi32(unsafe {
                    (x[j][sb].bsums.as_ptr() as *const i32)
                        .add(i)
                        .read_unaligned()
                });
            }
            for p in 0..P {
                // SAFETY: an aligned Zmm of the decoded buffer.
                let c = unsafe { _mm512_load_si512(wb[p].c[i].0.as_ptr() as *const _) };
                for j in 0..R {
                    corr[j][p] = _mm512_dpwssd_epi32(corr[j][p], c, bs[j]);
                }
            }
        }
        let lane = (b0 + sb) % LANES;
        for j in 0..R {
            let xd = _mm512_set1_ps(x[j][sb].d);
            for p in 0..P {
                // SAFETY: aligned Zmm of the decoded buffer.
                let d = unsafe { _mm512_load_ps(wb[p].d.0.as_ptr() as *const f32) };
                let prod = if W::MIN {
                    // SAFETY: as above.
                    let dmin = unsafe { _mm512_load_ps(wb[p].dmin.0.as_ptr() as *const f32) };
                    _mm512_sub_ps(
                        _mm512_mul_ps(_mm512_mul_ps(d, xd), _mm512_cvtepi32_ps(isum[j][p])),
                        _mm512_mul_ps(_mm512_mul_ps(dmin, xd), _mm512_cvtepi32_ps(corr[j][p])),
                    )
                } else {
                    _mm512_mul_ps(_mm512_mul_ps(d, xd), _mm512_cvtepi32_ps(isum[j][p]))
                };
                let a = &mut acc[j * PV + p][lane];
                *a = _mm512_add_ps(*a, prod);
            }
        }
    }
}

/// Zeroed accumulators: `len` of them.
///
/// # Safety
/// AVX-512 F must be available.
#[target_feature(enable = "avx512f")]
pub fn zeros(acc: &mut Vec<Acc>, len: usize) {
    acc.clear();
    acc.resize(len, [_mm512_setzero_ps(); LANES]);
}

/// The 16 outputs of one accumulator set: `hsum8` of the lanes, `s_l = a_l + a_{l+4}`, then
/// `(s0 + s2) + (s1 + s3)`, as vertical adds.
///
/// # Safety
/// AVX-512 F must be available.
#[target_feature(enable = "avx512f")]
pub fn finish(a: &Acc) -> [f32; NV] {
    let s: [__m512; 4] = std::array::from_fn(|l| _mm512_add_ps(a[l], a[l + 4]));
    let y = _mm512_add_ps(_mm512_add_ps(s[0], s[2]), _mm512_add_ps(s[1], s[3]));
    let mut o = [0.0f32; NV];
    // SAFETY: `o` has room for 16 f32; storeu has no alignment requirement.
    unsafe { _mm512_storeu_ps(o.as_mut_ptr(), y) };
    o
}
