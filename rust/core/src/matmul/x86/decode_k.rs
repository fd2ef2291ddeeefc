//! The six K-quants' decoders for the VNNI K-quant GEMM (`gemm_k.rs`): `DecodeK` for q4_k,
//! q5_k, q6_k, q2_k, q3_k and iq4_xs, each turning 16 rows' super-blocks into an `SbBuf`
//! (16 x 16 dword transposes of the blocks, then the quants made unsigned per format and
//! the scales unpacked lane-wise; the values `reference::BlockK` defines, tested bit-exact
//! through the GEMM's outputs).
//!
//! Safety: as `gemm_k.rs` (callers check the features at run time).

use std::arch::x86_64::*;

use super::gemm_k::{put, put_pairs, DecodeK, SbBuf, Scales, Zmm, NV};
use crate::formats::blocks::*;
use crate::matmul::reference as r;

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
