//! The GEMM microkernel of the K-quants (q2_k, q3_k, q4_k, q5_k, q6_k, iq4_xs) for many
//! activation rows, AVX-512 F/BW/VL/VNNI. One 512-bit vector holds **16 weight rows, one per
//! 32-bit lane**: a super-block of 16 rows is decoded once per chunk of K (`KC` super-blocks)
//! into an L1-resident `SbBuf` (vector v = elements 4v..4v+4 of every row, unsigned; the
//! formats' decoders are `decode_k.rs`), then
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

/// The AVX2 twin of this kernel (no AVX-512).
pub mod avx2;

use crate::matmul::reference::{BlockQ8K, LANES};

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
pub(super) fn put_pairs(dst: &mut [Zmm], v: &[__m512i; 16]) {
    let lo = _mm512_set1_epi32(0xffff);
    for (i, d) in dst.iter_mut().take(8).enumerate() {
        let p = _mm512_or_si512(
            _mm512_and_si512(v[2 * i], lo),
            _mm512_slli_epi32::<16>(v[2 * i + 1]),
        );
        put(d, p);
    }
}

/// One line stored to `q`.
#[target_feature(enable = "avx512f")]
#[inline]
pub(super) fn put(q: &mut Zmm, v: __m512i) {
    // SAFETY: a Zmm is 64 bytes on a 64-byte boundary.
    unsafe { _mm512_store_si512(q.0.as_mut_ptr() as *mut _, v) };
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
