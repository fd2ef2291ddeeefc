//! Tiled kernels for M >= 2 of the K-quants (q4_k, q5_k, q6_k) with AVX-512 VNNI on 256-bit
//! vectors, the layout idea of `tile.rs` one level up: per group of 8 super-blocks, vector
//! (s, t) holds in its 32-bit lane l the quants 4t..4t+3 of sub-block s (32 elements) of
//! super-block l, for the weights (decoded per group) and the activations (prepared once per
//! call by `interleave_q8_k`). Eight `vpdpbusd` give every super-block's sub-block sum in its
//! lane; the sub-block scales and mins multiply whole lanes (`vpmulld`), so the integer sums
//! (Σ_s scale_s·Σ q·x, Σ_s min_s·bsum_s) are exact and equal the reference's, and lane l is
//! the reference's float lane of super-block 8g + l. The float part is `block_k_product`'s
//! operations lane-wise; the super-blocks after the last whole group use the row kernel's
//! decode (`SumsK`) and the same float operations. Bit-identical to `reference::dot_block_k`.
//!
//! Safety as in `x86.rs`: callers check AVX2, F16C, AVX-512F/VL/VNNI (`cpu::has_vnni`).

use std::arch::x86_64::*;

use super::tile::transpose8;
use super::{lanes_of, SumsK};
use crate::formats::blocks::*;
use crate::matmul::reference::unpack_scales_k4;
use crate::matmul::reference::{self as r, BlockQ8K, LANES};

/// Interleaved activation bytes of one group of 8 super-blocks.
pub const GROUP_BYTES_K: usize = 8 * 256;
/// i32 bsum vectors per group (16 vectors of 8 lanes: lane l = bsums[j] of super-block l).
pub const GROUP_SUMS_K: usize = 16 * 8;

/// One row of q8_K activations rearranged for `tile_k_vnni`, per whole group of 8 super-blocks:
/// `xq` (2048 bytes: bytes `256s + 32t + 4l ..+4` = quants `32s + 4t ..+4` of super-block l),
/// `xs` (128 i32: `8j + l` = bsums[j] of super-block l) and `xd` (the 8 scales).
pub fn interleave_q8_k(blocks: &[BlockQ8K], xq: &mut [u8], xs: &mut [i32], xd: &mut [f32]) {
    let groups = blocks.chunks_exact(LANES);
    for (((g, q), s), d) in groups
        .zip(xq.chunks_exact_mut(GROUP_BYTES_K))
        .zip(xs.chunks_exact_mut(GROUP_SUMS_K))
        .zip(xd.chunks_exact_mut(LANES))
    {
        for (l, b) in g.iter().enumerate() {
            let bq: &[u8; 256] = bytemuck::cast_ref(&b.qs);
            for c in 0..64 {
                // dword c of the block = sub-block c / 8, t = c % 8
                q[32 * c + 4 * l..32 * c + 4 * l + 4].copy_from_slice(&bq[4 * c..4 * c + 4]);
            }
            for j in 0..16 {
                s[8 * j + l] = b.bsums[j] as i32;
            }
            d[l] = b.d;
        }
    }
}

/// A group of 8 super-blocks of one weight row, decoded.
#[derive(Clone, Copy)]
pub struct GroupK {
    /// q[s][t]: unsigned quants, lane l = elements 32s + 4t ..+4 of super-block l.
    q: [[__m256i; 8]; 8],
    /// Scale multipliers (i32 lanes): 8 sub-block scales (q4_k/q5_k) or 16 group scales (q6_k).
    sc: [__m256i; 16],
    /// q4_k/q5_k: the 8 sub-block mins.
    mn: [__m256i; 8],
    d: __m256,
    dmin: __m256,
}

impl GroupK {
    // SAFETY: all-zero bits are a valid value of every field (plain vector registers).
    const ZERO: GroupK = unsafe { std::mem::zeroed() };
}

/// K-quants with a group decode for the tiles.
pub trait TileK: SumsK {
    /// q6_k: 16 scale groups of 16, quants stored +32, no mins.
    const Q6: bool;
    /// # Safety
    /// AVX2 and F16C must be available; `w.len() >= 8`.
    unsafe fn decode8(w: &[Self]) -> GroupK;
}

#[target_feature(enable = "avx2")]
#[inline]
unsafe fn load8(v: [&[u8; 32]; 8]) -> [__m256i; 8] {
    // (Loops, not closures, around intrinsics: a closure does not inherit target features.)
    let mut o = [_mm256_setzero_si256(); 8];
    for (r, p) in o.iter_mut().zip(v) {
        // SAFETY: p is a &[u8; 32], the 32 bytes loaded; AVX2 (this function's contract).
        *r = unsafe { _mm256_loadu_si256(p.as_ptr() as *const __m256i) };
    }
    o
}

#[inline(always)]
fn chunk32(v: &[u8], at: usize) -> &[u8; 32] {
    v[at..at + 32].try_into().expect("32 bytes")
}

/// The scales and mins of 8 q4_k/q5_k super-blocks as i32 lanes, and their d / dmin.
#[target_feature(enable = "avx2,f16c")]
#[inline]
unsafe fn scales8_k4(scales: [&[u8; K_SCALE_SIZE]; 8], d: [Half; 8], dmin: [Half; 8]) -> GroupK {
    let mut sc = [[0i32; 8]; 16];
    let mut mn = [[0i32; 8]; 8];
    for (l, s) in scales.iter().enumerate() {
        let (a, m) = unpack_scales_k4(s);
        for j in 0..8 {
            sc[j][l] = a[j] as i32;
            mn[j][l] = m[j] as i32;
        }
    }
    let (d, dmin) = (d.map(u16::from_le_bytes), dmin.map(u16::from_le_bytes));
    // SAFETY: d and dmin are 8 u16 each, the 16 bytes each load reads; F16C (this function's
    // target features, checked by the caller).
    let (d, dmin) = unsafe {
        (
            _mm256_cvtph_ps(_mm_loadu_si128(d.as_ptr() as *const __m128i)),
            _mm256_cvtph_ps(_mm_loadu_si128(dmin.as_ptr() as *const __m128i)),
        )
    };
    let mut g = GroupK {
        q: [[_mm256_setzero_si256(); 8]; 8],
        sc: [_mm256_setzero_si256(); 16],
        mn: [_mm256_setzero_si256(); 8],
        d,
        dmin,
    };
    for j in 0..8 {
        // SAFETY: sc[j] and mn[j] are [i32; 8], the 32 bytes each load reads; AVX2 (contract).
        (g.sc[j], g.mn[j]) = unsafe {
            (
                _mm256_loadu_si256(sc[j].as_ptr() as *const __m256i),
                _mm256_loadu_si256(mn[j].as_ptr() as *const __m256i),
            )
        };
    }
    g
}

impl TileK for BlockQ4K {
    const Q6: bool = false;
    #[inline(always)]
    unsafe fn decode8(w: &[Self]) -> GroupK {
        // SAFETY: AVX2/F16C available (contract); all loads inside the blocks' arrays.
        unsafe {
            let mut g = scales8_k4(
                std::array::from_fn(|l| &w[l].scales),
                std::array::from_fn(|l| w[l].d),
                std::array::from_fn(|l| w[l].dmin),
            );
            let m4 = _mm256_set1_epi8(0x0f);
            for j in 0..4 {
                let t = transpose8(load8(std::array::from_fn(|l| chunk32(&w[l].qs, 32 * j))));
                for (k, &v) in t.iter().enumerate() {
                    g.q[2 * j][k] = _mm256_and_si256(v, m4);
                    g.q[2 * j + 1][k] = _mm256_and_si256(_mm256_srli_epi16(v, 4), m4);
                }
            }
            g
        }
    }
}

impl TileK for BlockQ5K {
    const Q6: bool = false;
    #[inline(always)]
    unsafe fn decode8(w: &[Self]) -> GroupK {
        // SAFETY: as for q4_k.
        unsafe {
            let mut g = scales8_k4(
                std::array::from_fn(|l| &w[l].scales),
                std::array::from_fn(|l| w[l].d),
                std::array::from_fn(|l| w[l].dmin),
            );
            let m4 = _mm256_set1_epi8(0x0f);
            let bit4 = _mm256_set1_epi8(0x10);
            let qh = transpose8(load8(std::array::from_fn(|l| &w[l].qh)));
            for j in 0..4 {
                let t = transpose8(load8(std::array::from_fn(|l| chunk32(&w[l].qs, 32 * j))));
                for (k, (&v, &h)) in t.iter().zip(&qh).enumerate() {
                    let h0 = _mm256_and_si256(super::shift_bit_to_4(h, 2 * j as i32), bit4);
                    let h1 = _mm256_and_si256(super::shift_bit_to_4(h, 2 * j as i32 + 1), bit4);
                    g.q[2 * j][k] = _mm256_or_si256(_mm256_and_si256(v, m4), h0);
                    g.q[2 * j + 1][k] =
                        _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(v, 4), m4), h1);
                }
            }
            g
        }
    }
}

impl TileK for BlockQ6K {
    const Q6: bool = true;
    #[inline(always)]
    unsafe fn decode8(w: &[Self]) -> GroupK {
        // SAFETY: AVX2/F16C available (contract); all loads inside the blocks' arrays.
        unsafe {
            let mut sc = [[0i32; 8]; 16];
            for (l, b) in w[..8].iter().enumerate() {
                for (v, &s) in sc.iter_mut().zip(&b.scales) {
                    v[l] = s as i32;
                }
            }
            let dh: [u16; 8] = std::array::from_fn(|l| u16::from_le_bytes(w[l].d));
            let mut scv = [_mm256_setzero_si256(); 16];
            for (v, a) in scv.iter_mut().zip(&sc) {
                *v = _mm256_loadu_si256(a.as_ptr() as *const __m256i);
            }
            let mut g = GroupK {
                q: [[_mm256_setzero_si256(); 8]; 8],
                sc: scv,
                mn: [_mm256_setzero_si256(); 8],
                d: _mm256_cvtph_ps(_mm_loadu_si128(dh.as_ptr() as *const __m128i)),
                dmin: _mm256_setzero_ps(),
            };
            let m4 = _mm256_set1_epi8(0x0f);
            let m2 = _mm256_set1_epi8(0x30);
            for h in 0..2 {
                let qh = transpose8(load8(std::array::from_fn(|l| chunk32(&w[l].qh, 32 * h))));
                for c in 0..2 {
                    let ql = transpose8(load8(std::array::from_fn(|l| {
                        chunk32(&w[l].ql, 64 * h + 32 * c)
                    })));
                    // sub-blocks 4h + c (low nibbles, qh bits 2c..) and 4h + c + 2 (high nibbles)
                    for t in 0..8 {
                        let (lo_top, hi_top) = if c == 0 {
                            (_mm256_slli_epi16(qh[t], 4), qh[t])
                        } else {
                            (_mm256_slli_epi16(qh[t], 2), _mm256_srli_epi16(qh[t], 2))
                        };
                        g.q[4 * h + c][t] = _mm256_or_si256(
                            _mm256_and_si256(ql[t], m4),
                            _mm256_and_si256(lo_top, m2),
                        );
                        g.q[4 * h + c + 2][t] = _mm256_or_si256(
                            _mm256_and_si256(_mm256_srli_epi16(ql[t], 4), m4),
                            _mm256_and_si256(hi_top, m2),
                        );
                    }
                }
            }
            g
        }
    }
}

/// One block of activation rows for `tile_k_vnni` (`rows` rows of `nb` super-blocks).
pub struct RowsQ8K<'a> {
    pub xq: &'a [u8],
    pub xs: &'a [i32],
    pub xd: &'a [f32],
    pub blocks: &'a [BlockQ8K],
}

/// The outputs of `NR` weight rows with every row of `x`: `out[r][i]` = weight row i with
/// activation row r, bit for bit `reference::dot_block_k`.
///
/// # Safety
/// AVX2, F16C, AVX-512F/VL/VNNI must be available. Every `w[i]` has `nb` super-blocks; `x` has
/// `out.len()` rows of `nb` blocks, and of `nb / 8` interleaved groups in `xq`/`xs`/`xd`.
#[target_feature(enable = "avx2,f16c,avx512f,avx512vl,avx512vnni")]
pub unsafe fn tile_k_vnni<W: TileK, const NR: usize>(
    w: [&[W]; NR],
    x: &RowsQ8K<'_>,
    out: &mut [[f32; NR]],
) {
    let nb = w[0].len();
    let groups = nb / LANES;
    let rows = out.len();
    debug_assert!(x.xq.len() >= rows * groups * GROUP_BYTES_K && x.blocks.len() >= rows * nb);
    let mut acc = vec![[_mm256_setzero_ps(); NR]; rows];
    for g in 0..groups {
        let mut dec = [GroupK::ZERO; NR];
        for (d, wi) in dec.iter_mut().zip(&w) {
            // SAFETY: AVX2 and F16C (the caller's contract); the checked slice has 8 super-blocks.
            *d = unsafe { W::decode8(&wi[g * LANES..g * LANES + LANES]) };
        }
        for (rr, a) in acc.iter_mut().enumerate() {
            let gi = rr * groups + g;
            let xq = &x.xq[gi * GROUP_BYTES_K..(gi + 1) * GROUP_BYTES_K];
            let xs = &x.xs[gi * GROUP_SUMS_K..(gi + 1) * GROUP_SUMS_K];
            let mut bsum = [_mm256_setzero_si256(); 16];
            for (j, v) in bsum.iter_mut().enumerate() {
                // SAFETY: a checked slice of 8 i32, the 32 bytes loaded; AVX2 (contract).
                *v = unsafe { _mm256_loadu_si256(xs[8 * j..8 * j + 8].as_ptr() as *const __m256i) };
            }
            let mut isum = [_mm256_setzero_si256(); NR];
            for s in 0..8 {
                let mut xv = [_mm256_setzero_si256(); 8];
                for (t, v) in xv.iter_mut().enumerate() {
                    let o = 256 * s + 32 * t;
                    // SAFETY: a checked slice of 32 bytes, the bytes loaded; AVX2 (contract).
                    *v = unsafe { _mm256_loadu_si256(xq[o..o + 32].as_ptr() as *const __m256i) };
                }
                for i in 0..NR {
                    let q = &dec[i].q[s];
                    let mut s0 = _mm256_dpbusd_epi32(_mm256_setzero_si256(), q[0], xv[0]);
                    let mut s1 = _mm256_dpbusd_epi32(_mm256_setzero_si256(), q[4], xv[4]);
                    for t in 1..4 {
                        s0 = _mm256_dpbusd_epi32(s0, q[t], xv[t]);
                        s1 = _mm256_dpbusd_epi32(s1, q[4 + t], xv[4 + t]);
                    }
                    let v = if W::Q6 {
                        // elements 0..16 of the sub-block are group 2s, 16..32 group 2s + 1
                        _mm256_add_epi32(
                            _mm256_mullo_epi32(s0, dec[i].sc[2 * s]),
                            _mm256_mullo_epi32(s1, dec[i].sc[2 * s + 1]),
                        )
                    } else {
                        _mm256_mullo_epi32(_mm256_add_epi32(s0, s1), dec[i].sc[s])
                    };
                    isum[i] = _mm256_add_epi32(isum[i], v);
                }
            }
            // SAFETY: a checked slice of 8 f32, the 32 bytes loaded; AVX (contract).
            let xd = unsafe { _mm256_loadu_ps(x.xd[gi * LANES..gi * LANES + LANES].as_ptr()) };
            for i in 0..NR {
                let dg = &dec[i];
                let (isum, msum) = if W::Q6 {
                    // Σ sc (q - 32) x = Σ sc q x - 32 Σ sc bsum
                    let mut b = _mm256_setzero_si256();
                    for (&sc, &bs) in dg.sc.iter().zip(&bsum) {
                        b = _mm256_add_epi32(b, _mm256_mullo_epi32(sc, bs));
                    }
                    (
                        _mm256_sub_epi32(isum[i], _mm256_slli_epi32(b, 5)),
                        _mm256_setzero_si256(),
                    )
                } else {
                    let mut m = _mm256_setzero_si256();
                    for s in 0..8 {
                        let bs = _mm256_add_epi32(bsum[2 * s], bsum[2 * s + 1]);
                        m = _mm256_add_epi32(m, _mm256_mullo_epi32(dg.mn[s], bs));
                    }
                    (isum[i], m)
                };
                // block_k_product: (d·xd)·isum - (dmin·xd)·msum, then acc += p
                let p = _mm256_sub_ps(
                    _mm256_mul_ps(_mm256_mul_ps(dg.d, xd), _mm256_cvtepi32_ps(isum)),
                    _mm256_mul_ps(_mm256_mul_ps(dg.dmin, xd), _mm256_cvtepi32_ps(msum)),
                );
                a[i] = _mm256_add_ps(a[i], p);
            }
        }
    }
    // (a loop, not `array::map`: a closure over vectors may fall out of line without AVX2)
    let mut lanes: Vec<[[f32; LANES]; NR]> = vec![[[0.0; LANES]; NR]; acc.len()];
    for (l, a) in lanes.iter_mut().zip(&acc) {
        for (li, ai) in l.iter_mut().zip(a) {
            *li = lanes_of(*ai);
        }
    }
    for b in groups * LANES..nb {
        for i in 0..NR {
            let wb = &w[i][b];
            // SAFETY: AVX2 (contract).
            let q = unsafe { wb.decode() };
            let (d, dmin) = wb.d_dmin();
            for (rr, l) in lanes.iter_mut().enumerate() {
                let xb = &x.blocks[rr * nb + b];
                // SAFETY: AVX2 (contract); q is wb.decode().
                let (isum, msum) = unsafe { wb.sums_decoded(&q, xb) };
                l[i][b % LANES] += r::block_k_product(d, dmin, xb.d, isum, msum);
            }
        }
    }
    for (l, o) in lanes.iter().zip(out.iter_mut()) {
        for i in 0..NR {
            o[i] = r::hsum8(&l[i]);
        }
    }
}
