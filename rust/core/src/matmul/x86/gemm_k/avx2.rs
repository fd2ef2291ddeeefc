//! The GEMM microkernel of the K-quants (q2_k, q3_k, q4_k, q5_k, q6_k) for many activation
//! rows with AVX2 only (no `vpdpbusd`). One 256-bit vector holds **8 weight rows, one per
//! 32-bit lane**, as in `gemm_k.rs` (its 512-bit twin): a super-block of 8 rows is decoded once
//! per chunk of K into an L1-resident `SbBuf2` (vector v = elements 4v..4v+4 of every row, the
//! unsigned levels), then blocks of up to 3 activation rows run through it, each activation
//! dword broadcast to all lanes.
//!
//! **Numerics.** `vpmaddubsw` (unsigned level x signed activation, pairs summed into i16,
//! saturating) then `vpaddw` over `Levels::FOLD` dwords: each i16 lane holds at most
//! `2 · FOLD · max_level · 128` in magnitude (q4_k 2·8·15·128 = 30720, q5_k 2·4·31·128,
//! q6_k 2·2·63·128 = 32256, q3_k / q2_k 2·4·7·128), so neither the pair sums nor the adds
//! saturate or wrap, for any q8_K value incl. -128. `vpmaddwd` with the sub-block's scale
//! (as an i16 pair) then gives scale · the fold's exact sum in i32. The correction `corr =
//! Σ_g c_g · bsum_g` (8 `vpmaddwd` of `DecodeK::scales`' coefficient pairs with the q8_K
//! `bsums` pairs) is the min's `msum` (q4_k, q5_k, q2_k) or, for the biased levels (q6_k 32,
//! q3_k 4: c_g = -BIAS · sc_g), the part that makes `isum` the signed quants' sum. So both
//! integers equal `reference::BlockK::sums`' (exact, no i32 overflow), and the float part and
//! lanes are `gemm_k.rs`': `(d·xd)·isum - (dmin·xd)·msum` (without a min `(d·xd)·isum`, which
//! the reference's `- (0·xd)·0` cannot change on lanes that start at +0), added to lane
//! accumulator `b % 8`, `finish` = `hsum8`. Every output has the bits of
//! `reference::dot_block_k` (tested). iq4_xs (levels up to 255: `vpmaddubsw` would saturate)
//! stays on the row kernels.
//!
//! Safety: callers check AVX2 and F16C at run time and pass slices of the stated lengths.

use std::arch::x86_64::*;

use super::DecodeK;
use crate::formats::blocks::*;
use crate::matmul::reference::{self as r, BlockQ8K, LANES};

/// Weight rows of one vector (one per 32-bit lane).
pub const NV: usize = 8;
/// Vectors of one panel: a panel is `NV · PV` = 16 rows.
pub const PV: usize = 2;
/// Super-blocks of one chunk of K (a panel's decoded chunk, 2 x 2 x 2.9 KiB, stays in L1).
pub const KC: usize = 2;
/// Activation rows of one kernel call at most (3 x 2 i16 + 3 x 2 i32 accumulators, the 2
/// weight vectors and a broadcast: 15 of the 16 registers).
pub const MR: usize = 3;

/// One 256-bit line on a 32-byte boundary.
#[repr(C, align(32))]
#[derive(Clone, Copy)]
pub struct Ymm(pub [u8; 32]);

const YMM0: Ymm = Ymm([0; 32]);

/// One super-block of 8 weight rows, decoded: `q[v]` lane r = elements 4v..4v+4 of row r
/// (levels), `sc[g]` lane r = (sc_g, sc_g) as an i16 pair (g < 8, or < 16 with `SUB16`),
/// `c[i]` the i16 pair (c_2i, c_2i+1), `d` / `dmin` as f32.
#[derive(Clone, Copy)]
pub struct SbBuf2 {
    pub q: [Ymm; 64],
    pub sc: [Ymm; 16],
    pub c: [Ymm; 8],
    pub d: Ymm,
    pub dmin: Ymm,
}

impl Default for SbBuf2 {
    fn default() -> Self {
        Self {
            q: [YMM0; 64],
            sc: [YMM0; 16],
            c: [YMM0; 8],
            d: YMM0,
            dmin: YMM0,
        }
    }
}

/// A K-quant this kernel takes: its unsigned levels and how many dwords fold in i16.
pub trait Levels: DecodeK {
    /// Dwords of `vpmaddubsw` pairs summed in i16 before `vpmaddwd` (see the module comment).
    const FOLD: usize;
    /// The 256 levels (quant + `DecodeK::BIAS`) in element order.
    fn levels(&self, out: &mut [u8; QK_K]);
    /// The levels of 8 rows straight into `q` with vector code (false: not done).
    ///
    /// # Safety
    /// AVX2 must be available.
    unsafe fn quants8(_rows: &[&Self; NV], _q: &mut [Ymm; 64]) -> bool {
        false
    }
}

impl Levels for BlockQ4K {
    const FOLD: usize = 8;
    fn levels(&self, out: &mut [u8; QK_K]) {
        *out = r::unpack_q4_k(self);
    }
    #[inline(always)]
    unsafe fn quants8(rows: &[&Self; NV], q: &mut [Ymm; 64]) -> bool {
        // SAFETY: AVX2 (contract).
        unsafe { q4k_quants(rows, q) };
        true
    }
}
impl Levels for BlockQ5K {
    const FOLD: usize = 4;
    fn levels(&self, out: &mut [u8; QK_K]) {
        *out = r::unpack_q5_k(self);
    }
}
impl Levels for BlockQ6K {
    const FOLD: usize = 2;
    fn levels(&self, out: &mut [u8; QK_K]) {
        *out = r::unpack_q6_k(self);
    }
}
impl Levels for BlockQ2K {
    const FOLD: usize = 4;
    fn levels(&self, out: &mut [u8; QK_K]) {
        *out = r::unpack_q2_k(self);
    }
}
impl Levels for BlockQ3K {
    const FOLD: usize = 4;
    fn levels(&self, out: &mut [u8; QK_K]) {
        for (o, q) in out.iter_mut().zip(r::unpack_q3_k(self)) {
            *o = (q + 4) as u8;
        }
    }
}

/// One line stored to `q`.
#[target_feature(enable = "avx2")]
#[inline]
fn put(q: &mut Ymm, v: __m256i) {
    // SAFETY: a Ymm is 32 bytes on a 32-byte boundary.
    unsafe { _mm256_store_si256(q.0.as_mut_ptr() as *mut _, v) };
}

/// 8 x 8 dwords transposed: `out[t]` lane r = dword t of `v[r]`.
#[target_feature(enable = "avx2")]
#[inline]
fn transpose8(v: [__m256i; 8]) -> [__m256i; 8] {
    let t0 = _mm256_unpacklo_epi32(v[0], v[1]);
    let t1 = _mm256_unpackhi_epi32(v[0], v[1]);
    let t2 = _mm256_unpacklo_epi32(v[2], v[3]);
    let t3 = _mm256_unpackhi_epi32(v[2], v[3]);
    let t4 = _mm256_unpacklo_epi32(v[4], v[5]);
    let t5 = _mm256_unpackhi_epi32(v[4], v[5]);
    let t6 = _mm256_unpacklo_epi32(v[6], v[7]);
    let t7 = _mm256_unpackhi_epi32(v[6], v[7]);
    let u0 = _mm256_unpacklo_epi64(t0, t2);
    let u1 = _mm256_unpackhi_epi64(t0, t2);
    let u2 = _mm256_unpacklo_epi64(t1, t3);
    let u3 = _mm256_unpackhi_epi64(t1, t3);
    let u4 = _mm256_unpacklo_epi64(t4, t6);
    let u5 = _mm256_unpackhi_epi64(t4, t6);
    let u6 = _mm256_unpacklo_epi64(t5, t7);
    let u7 = _mm256_unpackhi_epi64(t5, t7);
    [
        _mm256_permute2x128_si256::<0x20>(u0, u4),
        _mm256_permute2x128_si256::<0x20>(u1, u5),
        _mm256_permute2x128_si256::<0x20>(u2, u6),
        _mm256_permute2x128_si256::<0x20>(u3, u7),
        _mm256_permute2x128_si256::<0x31>(u0, u4),
        _mm256_permute2x128_si256::<0x31>(u1, u5),
        _mm256_permute2x128_si256::<0x31>(u2, u6),
        _mm256_permute2x128_si256::<0x31>(u3, u7),
    ]
}

/// q4_k's levels of 8 rows straight from the nibbles: 32 bytes of `qs` give sub-blocks 2j
/// (low nibbles) and 2j + 1 (high).
#[target_feature(enable = "avx2")]
#[inline]
fn q4k_quants(rows: &[&BlockQ4K; NV], q: &mut [Ymm; 64]) {
    let m4 = _mm256_set1_epi8(0x0f);
    for j in 0..4 {
        let mut lo = [_mm256_setzero_si256(); 8];
        let mut hi = [_mm256_setzero_si256(); 8];
        for (i, row) in rows.iter().enumerate() {
            // SAFETY: bytes 32j..32j + 32 of the 128-byte qs.
            let v = unsafe { _mm256_loadu_si256(row.qs[32 * j..].as_ptr() as *const _) };
            lo[i] = _mm256_and_si256(v, m4);
            hi[i] = _mm256_and_si256(_mm256_srli_epi16::<4>(v), m4);
        }
        for (t, v) in transpose8(lo).into_iter().enumerate() {
            put(&mut q[16 * j + t], v);
        }
        for (t, v) in transpose8(hi).into_iter().enumerate() {
            put(&mut q[16 * j + 8 + t], v);
        }
    }
}

/// Decodes one super-block of 8 rows (`rows[i]`: row i's block; rows past the panel's end
/// point at a zero block and give lanes nobody reads) into `buf`.
///
/// # Safety
/// AVX2 and F16C.
#[target_feature(enable = "avx2,f16c")]
pub unsafe fn decode<W: Levels>(rows: &[&W; NV], buf: &mut SbBuf2) {
    // SAFETY: AVX2 (contract).
    if !unsafe { W::quants8(rows, &mut buf.q) } {
        let mut lv = [[0u8; QK_K]; NV];
        for (l, row) in lv.iter_mut().zip(rows) {
            row.levels(l);
        }
        for c in 0..8 {
            let mut v = [_mm256_setzero_si256(); 8];
            for (v, l) in v.iter_mut().zip(&lv) {
                // SAFETY: bytes 32c..32c + 32 of the row's 256 levels.
                *v = unsafe { _mm256_loadu_si256(l[32 * c..].as_ptr() as *const _) };
            }
            for (t, v) in transpose8(v).into_iter().enumerate() {
                put(&mut buf.q[8 * c + t], v);
            }
        }
    }
    let mut sc = [[0u32; NV]; 16];
    let mut c = [[0u32; NV]; 8];
    let mut d = [0u16; NV];
    let mut dmin = [0u16; NV];
    for (i, row) in rows.iter().enumerate() {
        let s = row.scales();
        for (scg, &v) in sc.iter_mut().zip(&s.sc) {
            scg[i] = (v as u16 as u32) * 0x1_0001;
        }
        for (cp, pair) in c.iter_mut().zip(s.c.chunks_exact(2)) {
            cp[i] = (pair[0] as u16 as u32) | ((pair[1] as u16 as u32) << 16);
        }
        d[i] = s.d;
        dmin[i] = s.dmin;
    }
    let groups = if W::SUB16 { 16 } else { 8 };
    for (dst, v) in buf.sc.iter_mut().zip(&sc).take(groups) {
        // SAFETY: the 32 bytes of v loaded.
        put(dst, unsafe { _mm256_loadu_si256(v.as_ptr() as *const _) });
    }
    for (dst, v) in buf.c.iter_mut().zip(&c) {
        // SAFETY: as above.
        put(dst, unsafe { _mm256_loadu_si256(v.as_ptr() as *const _) });
    }
    for (dst, h) in [(&mut buf.d, d), (&mut buf.dmin, dmin)] {
        // SAFETY: 16 bytes (8 f16) loaded; F16C (contract); 32 bytes stored, aligned.
        unsafe {
            let v = _mm256_cvtph_ps(_mm_loadu_si128(h.as_ptr() as *const __m128i));
            _mm256_store_ps(dst.0.as_mut_ptr() as *mut f32, v);
        }
    }
}

/// Float accumulators of one activation row with one vector of 8 weight rows: lane
/// accumulator `b % 8` for super-block b.
pub type Acc = [__m256; LANES];

/// R activation rows (`x[j]`: row j's q8_K blocks of the chunk) against the P decoded vectors
/// of each of the chunk's super-blocks (`buf[sb * PV + p]`, `nsb` super-blocks, the first
/// being super-block `b0` of the row): `acc[j * PV + p][(b0 + sb) % 8] +=` each product.
///
/// # Safety
/// AVX2 and F16C; `buf` holds `nsb * PV` decoded super-blocks; every `x[j]` has at least
/// `nsb` blocks.
#[target_feature(enable = "avx2,f16c")]
pub unsafe fn kernel<W: Levels, const R: usize, const P: usize>(
    buf: &[SbBuf2],
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
    for sb in 0..nsb {
        let wb: [&SbBuf2; P] = std::array::from_fn(|p| &buf[sb * PV + p]);
        let xq: [*const i32; R] = std::array::from_fn(|j| x[j][sb].qs.as_ptr() as *const i32);
        let mut isum = [[_mm256_setzero_si256(); P]; R];
        for g in 0..groups {
            let mut f0 = g * len;
            while f0 < (g + 1) * len {
                let mut a = [[_mm256_setzero_si256(); P]; R];
                for v in f0..f0 + W::FOLD {
                    let mut w = [_mm256_setzero_si256(); P];
                    for p in 0..P {
                        // SAFETY: an aligned Ymm of the decoded buffer.
                        w[p] = unsafe { _mm256_load_si256(wb[p].q[v].0.as_ptr() as *const _) };
                    }
                    for j in 0..R {
                        // SAFETY: dword v < 64 of the 256-byte qs; unaligned read.
                        let xv = _mm256_set1_epi32(unsafe { xq[j].add(v).read_unaligned() });
                        for p in 0..P {
                            a[j][p] = _mm256_add_epi16(a[j][p], _mm256_maddubs_epi16(w[p], xv));
                        }
                    }
                }
                for p in 0..P {
                    // SAFETY: as above.
                    let s = unsafe { _mm256_load_si256(wb[p].sc[g].0.as_ptr() as *const _) };
                    for j in 0..R {
                        isum[j][p] = _mm256_add_epi32(isum[j][p], _mm256_madd_epi16(a[j][p], s));
                    }
                }
                f0 += W::FOLD;
            }
        }
        let mut corr = [[_mm256_setzero_si256(); P]; R];
        for i in 0..8 {
            let mut bs = [_mm256_setzero_si256(); R];
            for j in 0..R {
                // SAFETY: bsums is 16 i16; dword i is bsums[2i], bsums[2i + 1].
                bs[j] = _mm256_set1_epi32(unsafe {
                    (x[j][sb].bsums.as_ptr() as *const i32)
                        .add(i)
                        .read_unaligned()
                });
            }
            for p in 0..P {
                // SAFETY: an aligned Ymm of the decoded buffer.
                let c = unsafe { _mm256_load_si256(wb[p].c[i].0.as_ptr() as *const _) };
                for j in 0..R {
                    corr[j][p] = _mm256_add_epi32(corr[j][p], _mm256_madd_epi16(c, bs[j]));
                }
            }
        }
        let lane = (b0 + sb) % LANES;
        for j in 0..R {
            let xd = _mm256_set1_ps(x[j][sb].d);
            for p in 0..P {
                // SAFETY: aligned Ymm of the decoded buffer.
                let d = unsafe { _mm256_load_ps(wb[p].d.0.as_ptr() as *const f32) };
                let prod = if W::MIN {
                    // SAFETY: as above.
                    let dmin = unsafe { _mm256_load_ps(wb[p].dmin.0.as_ptr() as *const f32) };
                    _mm256_sub_ps(
                        _mm256_mul_ps(_mm256_mul_ps(d, xd), _mm256_cvtepi32_ps(isum[j][p])),
                        _mm256_mul_ps(_mm256_mul_ps(dmin, xd), _mm256_cvtepi32_ps(corr[j][p])),
                    )
                } else {
                    let s = _mm256_add_epi32(isum[j][p], corr[j][p]);
                    _mm256_mul_ps(_mm256_mul_ps(d, xd), _mm256_cvtepi32_ps(s))
                };
                let a = &mut acc[j * PV + p][lane];
                *a = _mm256_add_ps(*a, prod);
            }
        }
    }
}

/// Zeroed accumulators: `len` of them.
///
/// # Safety
/// AVX must be available.
#[target_feature(enable = "avx")]
pub fn zeros(acc: &mut Vec<Acc>, len: usize) {
    acc.clear();
    acc.resize(len, [_mm256_setzero_ps(); LANES]);
}

/// The 8 outputs of one accumulator set: `hsum8` of the lanes as vertical adds.
///
/// # Safety
/// AVX must be available.
#[target_feature(enable = "avx")]
pub fn finish(a: &Acc) -> [f32; NV] {
    let s = [
        _mm256_add_ps(a[0], a[4]),
        _mm256_add_ps(a[1], a[5]),
        _mm256_add_ps(a[2], a[6]),
        _mm256_add_ps(a[3], a[7]),
    ];
    let y = _mm256_add_ps(_mm256_add_ps(s[0], s[2]), _mm256_add_ps(s[1], s[3]));
    let mut o = [0.0f32; NV];
    // SAFETY: `o` has room for 8 f32; storeu has no alignment requirement.
    unsafe { _mm256_storeu_ps(o.as_mut_ptr(), y) };
    o
}
