//! The M = 1 row kernel of the 32-weight integer formats (q4_0, iq4_nl, q5_0, q8_0) with
//! AVX-512 VBMI and GFNI beside VNNI: no horizontal integer reduction per block.
//!
//! **Layout.** A block's integer sum Σ (w + BIAS)·x is exact, so the order of its 32 products is
//! free. Per group of 8 blocks the weights are loaded straight from ggml's block layout (no
//! repacking of the stored bytes) and rearranged in registers with byte / word permutes so that
//! every 32-bit lane of a `vpdpbusd` holds four quants of one block; the activations of the row
//! are rearranged once per call (`interleave`) to match, lane for lane (`Row32::x_lane`). Four
//! 512-bit `vpdpbusd` per group then leave each block's sum in two or four lanes, folded with
//! a shift and an add or a few lane permutes instead of `reduce8`'s horizontal adds:
//! - q4_0, iq4_nl (here): two `vpermt2b` over the group's first 128 bytes make `T01` (qword j =
//!   quant bytes 0..8 of block j) and `T23` (bytes 8..16), block 7's qwords come by masked
//!   broadcast loads; low nibbles are elements 0..8 / 8..16, high nibbles 16.. / 24... Block j's
//!   sum is the two dwords of qword j: shift, add, `vpmovqd`.
//! - q5_0 (`wide.rs`): `T01` / `T23` as lanes of dwords (two `vpermt2b`, two `vpermt2q`), the
//!   fifth bit from qh by `vpmultishiftqb`; lanes j and 8 + j folded.
//! - q8_0 (`wide.rs`): four `vpermt2w` gather dwords 0..3 / 4..7 of blocks 0..3 / 4..7 (lane
//!   4q + j); two `vpermt2q` and two adds fold the four lanes of each block.
//!
//! The f16 scales come out of the same loads with word permutes. The float part is the
//! reference's: `acc[j] += (d_w · d_x) · isum` lane-wise, block 8g + j in lane j, groups in
//! order; the last partial group loads whole where the matrix has bytes after the row, else
//! under byte masks (no byte past the data is read), and is added under a lane mask, so the
//! lanes and `hsum8` give `reference::dot_block32`'s bits. `dot_rows32` runs R weight rows
//! group by group with one load of each group's activations.
//!
//! Safety: callers check `cpu::has_vbmi_gfni` (AVX2, F16C, AVX-512F/VL/BW/VNNI/VBMI, GFNI) at run time
//! and pass activations prepared by `interleave` for the same number of blocks.

use std::arch::x86_64::*;

use super::Load32;
use crate::formats::blocks::*;
use crate::matmul::reference::LANES;

/// Bytes of one group of 8 rearranged activation blocks (4 registers of 64).
pub const GROUP_BYTES: usize = 256;

/// One activation row prepared for `dot_row32` (`interleave`).
pub struct RowQ8<'a> {
    /// `nb.div_ceil(8) * GROUP_BYTES` bytes: group g's 4 registers of 64 bytes, register r's
    /// dword lane l = the quants `4q..4q + 4` of block `8g + b` where `(b, q) = x_lane(r, l)`;
    /// zero past the last block.
    pub xt: &'a [u8],
    /// Each block's scale as f32 (`nb` entries).
    pub d: &'a [f32],
    /// `-BIAS · Σx` per block, `nb.div_ceil(8) * 8` entries (zero past the last block).
    pub nbias: &'a [i32],
    /// q4_1 / q5_1: each block's q8_1 `s` as f32 (`nb` entries); empty for the others.
    pub s: &'a [f32],
}

/// The activation blocks of one row rearranged for `W` (`RowQ8::xt`) and `-W::BIAS · sums`.
pub fn interleave<W: Row32>(blocks: &[BlockQ8_0], sums: &[i32]) -> (Vec<u8>, Vec<i32>) {
    let groups = blocks.len().div_ceil(LANES);
    let mut xt = vec![0u8; groups * GROUP_BYTES];
    for (g, o) in xt.chunks_exact_mut(GROUP_BYTES).enumerate() {
        for reg in 0..4 {
            for l in 0..16 {
                let (b, q) = W::x_lane(reg, l);
                if let Some(blk) = blocks.get(g * LANES + b) {
                    let src: &[u8; 32] = bytemuck::cast_ref(&blk.qs);
                    let at = 64 * reg + 4 * l;
                    o[at..at + 4].copy_from_slice(&src[4 * q..4 * q + 4]);
                }
            }
        }
    }
    let mut nbias = vec![0i32; groups * LANES];
    for (n, &s) in nbias.iter_mut().zip(sums) {
        *n = -W::BIAS * s;
    }
    (xt, nbias)
}

/// A 32-weight format whose groups of 8 blocks the row kernel decodes from the stored bytes.
pub trait Row32: Load32 {
    /// Register `reg` (0..4), dword lane `l` (0..16) of a group multiplies the activation quants
    /// `4q..4q + 4` of block `b` of the group: `(b, q)`.
    fn x_lane(reg: usize, l: usize) -> (usize, usize);

    /// The 8 blocks at `p` (only the first `len` bytes are read; `len` < 8 blocks for the last
    /// partial group, whose missing blocks read as zero bytes): each block's exact
    /// `Σ (w + BIAS)·x + nbias` in lane j, its scale `d_w` and its min `m_w` as f32 (the min
    /// only where `Block32::HAS_MIN`; zero otherwise).
    ///
    /// # Safety
    /// `cpu::has_vbmi_gfni`; `p..p + len` readable, `len == 8 * size_of::<Self>()` when `FULL`; `xt`
    /// points at the group's `GROUP_BYTES` activation bytes, `nbias` at its 8 biases.
    unsafe fn group<const FULL: bool>(
        p: *const u8,
        len: usize,
        xt: *const u8,
        nbias: *const i32,
    ) -> (__m256i, __m256, __m256);
}

/// Bytes `off..off + 64` of the group at `p`, zero at and past `len` unless `FULL`.
#[target_feature(enable = "avx512f,avx512bw")]
#[inline]
unsafe fn ld<const FULL: bool>(p: *const u8, off: usize, len: usize) -> __m512i {
    if FULL {
        // SAFETY: the caller guarantees `off + 64 <= len` bytes readable at p.
        unsafe { _mm512_loadu_si512(p.add(off) as *const _) }
    } else {
        let n = len.saturating_sub(off).min(64);
        let k: __mmask64 = if n == 64 { !0 } else { (1u64 << n) - 1 };
        // SAFETY: only the first n bytes (inside p..p + len) are read; a masked-out byte is
        // never accessed, so the address may lie past the row (wrapping_add: no UB).
        unsafe { _mm512_maskz_loadu_epi8(k, p.wrapping_add(off) as *const i8) }
    }
}

/// The register of activations `reg` of the group at `xt`.
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn xreg(xt: *const u8, reg: usize) -> __m512i {
    // SAFETY: xt points at GROUP_BYTES readable bytes (caller).
    unsafe { _mm512_loadu_si512(xt.add(64 * reg) as *const _) }
}

#[repr(C, align(64))]
struct Idx([u8; 64]);

#[target_feature(enable = "avx512f")]
#[inline]
fn idx(i: &Idx) -> __m512i {
    // SAFETY: 64 readable, 64-byte aligned bytes.
    unsafe { _mm512_load_si512(i.0.as_ptr() as *const _) }
}

/// Not gathered by this index (`word_index`).
const SKIP: usize = usize::MAX;

/// Word index (as bytes, little endian u16) gathering the u16 at each byte offset of `src`
/// (words past `src.len()` and `SKIP` take word 0) from the windows `t1..t1 + 64` and
/// `t2..t2 + 64`.
const fn word_index<const N: usize>(src: [usize; N], t1: usize, t2: usize) -> Idx {
    let mut idx = [0u8; 64];
    let mut w = 0;
    while w < N {
        let s = src[w];
        if s == SKIP {
            w += 1;
            continue;
        }
        assert!(s.is_multiple_of(2));
        let i = if s >= t1 && s + 2 <= t1 + 64 {
            (s - t1) / 2
        } else {
            assert!(s >= t2 && s + 2 <= t2 + 64);
            32 + (s - t2) / 2
        };
        idx[2 * w] = i as u8;
        w += 1;
    }
    Idx(idx)
}

/// Byte offsets of a field at `off` of each of 8 blocks of `size` bytes.
const fn field8(size: usize, off: usize) -> [usize; 8] {
    let mut a = [0usize; 8];
    let mut j = 0;
    while j < 8 {
        a[j] = size * j + off;
        j += 1;
    }
    a
}

/// GF(2) matrix of `x >> 4` per byte (`gf2p8affineqb`: result bit i = parity(row 7 - i & x)).
const SHR4: i64 = 0x1020_4080_0000_0000;

/// The 4-bit formats' nibbles as unsigned bytes (q4_0: the nibble; iq4_nl: the table + 128).
pub trait Nibbles {
    /// # Safety
    /// AVX-512 BW/VBMI and GFNI available.
    unsafe fn lo(t: __m512i) -> __m512i;
    /// # Safety
    /// As `lo`.
    unsafe fn hi(t: __m512i) -> __m512i;
}

impl Nibbles for BlockQ4_0 {
    #[inline(always)]
    unsafe fn lo(t: __m512i) -> __m512i {
        // SAFETY: AVX-512F (contract).
        unsafe { _mm512_and_si512(t, _mm512_set1_epi8(0x0f)) }
    }
    #[inline(always)]
    unsafe fn hi(t: __m512i) -> __m512i {
        // SAFETY: GFNI + AVX-512BW (contract).
        unsafe { _mm512_gf2p8affine_epi64_epi8::<0>(t, _mm512_set1_epi64(SHR4)) }
    }
}

/// iq4_nl's table plus 128, repeated 4 times (`vpermb` reads the low 6 bits of the index).
static IQ4NL_TAB: Idx = {
    let mut t = [0u8; 64];
    let mut i = 0;
    while i < 64 {
        t[i] = super::KVALUES_IQ4NL_U8[i % 16];
        i += 1;
    }
    Idx(t)
};

impl Nibbles for BlockIQ4NL {
    #[inline(always)]
    unsafe fn lo(t: __m512i) -> __m512i {
        // SAFETY: VBMI (contract); the table repeats every 16 bytes, so bits 4, 5 of the index
        // do not matter and bits 6, 7 are ignored by vpermb.
        unsafe { _mm512_permutexvar_epi8(t, idx(&IQ4NL_TAB)) }
    }
    #[inline(always)]
    unsafe fn hi(t: __m512i) -> __m512i {
        // SAFETY: as `lo` (the shifted-in bits land in bits 4..7 of each byte).
        unsafe { _mm512_permutexvar_epi8(_mm512_srli_epi16::<4>(t), idx(&IQ4NL_TAB)) }
    }
}

/// Byte index of a `vpermt2b` over the first 128 bytes of a group: qword j (< `blocks`) =
/// quant bytes `h..h + 8` of block j (block `size` bytes, quants at `qoff`); the others 0.
const fn qword_index(size: usize, qoff: usize, h: usize, blocks: usize) -> Idx {
    let mut idx = [0u8; 64];
    let mut o = 0;
    while o < 8 * blocks {
        let src = size * (o / 8) + qoff + h + o % 8;
        assert!(src < 128);
        idx[o] = src as u8;
        o += 1;
    }
    Idx(idx)
}

// q4_0 / iq4_nl: 18-byte blocks, d at 0, quants at 2. The first 128 bytes hold blocks 0..7
// but the last; its two quant qwords come by masked broadcast loads.
static Q4_W0: Idx = qword_index(18, 2, 0, 7);
static Q4_W1: Idx = qword_index(18, 2, 8, 7);
static Q4_D: Idx = word_index(field8(18, 0), 0, 64);

/// The products of a group in the qword layout (qword j of every register belongs to block j):
/// two chains of two `vpdpbusd`, added, the two dwords of each qword summed and narrowed, the
/// biases added.
#[target_feature(enable = "avx512f,avx512vnni")]
#[inline]
unsafe fn dots4_qword(nbias: *const i32, v: [__m512i; 4], xt: *const u8) -> __m256i {
    // SAFETY: xt points at the group's GROUP_BYTES bytes, nbias at 8 i32 (caller).
    unsafe {
        let s0 = _mm512_dpbusd_epi32(_mm512_setzero_si512(), v[0], xreg(xt, 0));
        let s1 = _mm512_dpbusd_epi32(_mm512_setzero_si512(), v[1], xreg(xt, 1));
        let s0 = _mm512_dpbusd_epi32(s0, v[2], xreg(xt, 2));
        let s1 = _mm512_dpbusd_epi32(s1, v[3], xreg(xt, 3));
        let s = _mm512_add_epi32(s0, s1);
        let s = _mm512_cvtepi64_epi32(_mm512_add_epi32(s, _mm512_srli_epi64::<32>(s)));
        _mm256_add_epi32(s, _mm256_loadu_si256(nbias as *const __m256i))
    }
}

/// q4_0 and iq4_nl: the 4-bit formats in 18-byte blocks. `T01` qword j = quant bytes 0..8 of
/// block j (low nibbles: elements 0..8, high: 16..24), `T23` bytes 8..16.
#[target_feature(enable = "avx2,f16c,avx512f,avx512vl,avx512bw,avx512vnni,avx512vbmi,gfni")]
#[inline]
unsafe fn group_q4<W: Nibbles, const FULL: bool>(
    p: *const u8,
    len: usize,
    xt: *const u8,
    nbias: *const i32,
) -> (__m256i, __m256, __m256) {
    // SAFETY: the caller's contract (`Row32::group`); a full group has 144 bytes, so the
    // unaligned 8-byte reads at 128 and 136 are inside it (a partial group has no block 7).
    unsafe {
        let a = ld::<FULL>(p, 0, len);
        let b = ld::<FULL>(p, 64, len);
        let mut t01 = _mm512_permutex2var_epi8(a, idx(&Q4_W0), b);
        let mut t23 = _mm512_permutex2var_epi8(a, idx(&Q4_W1), b);
        if FULL {
            t01 = _mm512_mask_set1_epi64(t01, 0x80, (p.add(128) as *const i64).read_unaligned());
            t23 = _mm512_mask_set1_epi64(t23, 0x80, (p.add(136) as *const i64).read_unaligned());
        }
        let v = [W::lo(t01), W::lo(t23), W::hi(t01), W::hi(t23)];
        let d = _mm512_permutex2var_epi16(a, idx(&Q4_D), b);
        (
            dots4_qword(nbias, v, xt),
            _mm256_cvtph_ps(_mm512_castsi512_si128(d)),
            _mm256_setzero_ps(),
        )
    }
}

/// Register `reg` lane `l` of the qword layout: block `l / 2`, quad `2·reg + l % 2`
/// (registers: low nibbles of bytes 0..8, of 8..16; high nibbles of 0..8, of 8..16).
fn x_lane_qword(reg: usize, l: usize) -> (usize, usize) {
    (l / 2, 2 * reg + l % 2)
}

impl Row32 for BlockQ4_0 {
    fn x_lane(reg: usize, l: usize) -> (usize, usize) {
        x_lane_qword(reg, l)
    }
    #[inline(always)]
    unsafe fn group<const FULL: bool>(
        p: *const u8,
        len: usize,
        xt: *const u8,
        nbias: *const i32,
    ) -> (__m256i, __m256, __m256) {
        // SAFETY: the caller's contract is this function's.
        unsafe { group_q4::<Self, FULL>(p, len, xt, nbias) }
    }
}

impl Row32 for BlockIQ4NL {
    fn x_lane(reg: usize, l: usize) -> (usize, usize) {
        x_lane_qword(reg, l)
    }
    #[inline(always)]
    unsafe fn group<const FULL: bool>(
        p: *const u8,
        len: usize,
        xt: *const u8,
        nbias: *const i32,
    ) -> (__m256i, __m256, __m256) {
        // SAFETY: the caller's contract is this function's.
        unsafe { group_q4::<Self, FULL>(p, len, xt, nbias) }
    }
}

/// Bytes ahead of the group being read that the long-row path prefetches (`prefetch_l2`).
/// 8 KiB since session 17 (was 4): one thread, CPU time, from memory (640 MB rotation), load
/// 28-31, two alternating sweeps in a throw-away build: q4_0 2.18-2.20 / 2.15-2.16 ms
/// (4096x14336 / 14336x4096) at 4 KiB, 2.14-2.15 / 2.10-2.13 at 8 KiB, 2.13 / 2.11-2.13 at
/// 16 KiB, 2.64-2.66 at 2 KiB; q8_0 3.80-3.81 / 3.81-3.82 -> 3.77-3.79 / 3.74 (8 KiB).
/// Into L1 (`_MM_HINT_T0`) was 4-9 % slower, `_MM_HINT_T2` the same as T1.
const PREFETCH_L2_AHEAD: usize = 8192;

/// Prefetch into L2 (`_MM_HINT_T1`) the `len` bytes `PREFETCH_L2_AHEAD` past `p`: the row
/// kernel's long-K path (`PF`, K above `mod.rs`'s `LONG_K`). This kernel reads the weights
/// about 2.5x as fast as `block32_vnni`, for which `x86::prefetch_ahead` (2 KiB ahead, into
/// L1) was tuned; with it, at K = 14336 (one thread, from memory, alternating in one process
/// on a busy machine) q4_0 ran at 5.8-6.3 GB/s, without any prefetch 6.6-9.6, with this one
/// 9.0-15.0. A prefetch is a hint: addresses past the data are never dereferenced.
#[target_feature(enable = "avx2")]
#[inline]
fn prefetch_l2(p: *const u8, len: usize) {
    super::prefetch_l2(p, len, PREFETCH_L2_AHEAD);
}

/// `reference::hsum8` of the lanes of `v`: `(a0 + a4, .., a3 + a7)`, then `(s0 + s2) + (s1 + s3)`.
#[target_feature(enable = "avx2")]
#[inline]
fn hsum8_ps(v: __m256) -> f32 {
    let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
    let t = _mm_add_ps(s, _mm_movehl_ps(s, s));
    _mm_cvtss_f32(_mm_add_ss(t, _mm_movehdup_ps(t)))
}

/// Each lane's block product as the reference computes it: `(d_w · d_x) · isum`
/// (`reference::block32_product`), plus `m_w · s_x` where the format has a min
/// (`reference::q8_1::block32_min_product`); separate roundings, no FMA.
#[target_feature(enable = "avx2")]
#[inline]
fn product<W: Row32>(isum: __m256i, dw: __m256, dx: __m256, mw: __m256, sx: __m256) -> __m256 {
    let p = _mm256_mul_ps(_mm256_mul_ps(dw, dx), _mm256_cvtepi32_ps(isum));
    if W::HAS_MIN {
        _mm256_add_ps(p, _mm256_mul_ps(mw, sx))
    } else {
        p
    }
}

/// `dot_block32_vnni` for one activation row (`reference::dot_block32`'s bits): the `nb`
/// blocks at the start of `w`; `dot_rows32` with one row.
///
/// # Safety
/// As `dot_rows32`.
#[target_feature(enable = "avx2,f16c,avx512f,avx512vl,avx512bw,avx512vnni,avx512vbmi,gfni")]
pub unsafe fn dot_row32<W: Row32, const PF: bool>(w: &[u8], nb: usize, x: &RowQ8<'_>) -> f32 {
    // SAFETY: the caller's contract is this function's.
    unsafe { dot_rows32::<W, PF, 1>(w, 0, nb, x)[0] }
}

/// R weight rows (row r = the `nb` blocks at `r·stride` in `w`) with one activation row, each
/// `reference::dot_block32`'s bits: groups of 8 blocks through `Row32::group`, the rows
/// interleaved group by group (the activations of a group are loaded once for all R, and the
/// per-row costs, small rows' main cost, are shared); `PF`: prefetch the weights ahead
/// (`prefetch_l2`). Bytes of `w` past a row (the next rows of the matrix) let its last partial
/// group load whole; they meet zero activations and masked lanes.
///
/// # Safety
/// `cpu::has_vbmi_gfni`; `x` prepared by `interleave::<W>` for `nb` blocks (`x.d` at least `nb`
/// entries).
#[target_feature(enable = "avx2,f16c,avx512f,avx512vl,avx512bw,avx512vnni,avx512vbmi,gfni")]
pub unsafe fn dot_rows32<W: Row32, const PF: bool, const R: usize>(
    w: &[u8],
    stride: usize,
    nb: usize,
    x: &RowQ8<'_>,
) -> [f32; R] {
    let groups = nb.div_ceil(LANES);
    let size = std::mem::size_of::<W>();
    let gsize = LANES * size;
    assert!(
        R >= 1
            && w.len() >= (R - 1) * stride + nb * size
            && x.xt.len() >= groups * GROUP_BYTES
            && x.nbias.len() >= groups * LANES
            && x.d.len() >= nb
            && (!W::HAS_MIN || x.s.len() >= nb)
    );
    let p = w.as_ptr();
    let mut acc = [_mm256_setzero_ps(); R];
    let full = nb / LANES;
    for g in 0..full {
        // SAFETY: group g's 8 blocks of every row are in w; xt, nbias and d hold group g
        // (asserted above).
        unsafe {
            let dx = _mm256_loadu_ps(x.d.as_ptr().add(g * LANES));
            let sx = if W::HAS_MIN {
                _mm256_loadu_ps(x.s.as_ptr().add(g * LANES))
            } else {
                _mm256_setzero_ps()
            };
            for (r, acc) in acc.iter_mut().enumerate() {
                let at = r * stride + g * gsize;
                if PF {
                    prefetch_l2(p.add(at), gsize);
                }
                let (isum, dw, mw) = W::group::<true>(
                    p.add(at),
                    gsize,
                    x.xt.as_ptr().add(g * GROUP_BYTES),
                    x.nbias.as_ptr().add(g * LANES),
                );
                *acc = _mm256_add_ps(*acc, product::<W>(isum, dw, dx, mw, sx));
            }
        }
    }
    if full < groups {
        let left = nb - full * LANES;
        let k: __mmask8 = (1u8 << left) - 1;
        let (xt, nbias) = (full * GROUP_BYTES, full * LANES);
        // SAFETY: a whole group's bytes are read only where w has them (the row's `left`
        // blocks and the bytes after it), else only the `left` blocks under byte masks; xt
        // and nbias hold the zero-padded group, d the `left` scales read under the mask. The
        // lanes past `left` (zero activations, any weights) are not added.
        unsafe {
            let dx = _mm256_maskz_loadu_ps(k, x.d.as_ptr().add(full * LANES));
            let sx = if W::HAS_MIN {
                _mm256_maskz_loadu_ps(k, x.s.as_ptr().add(full * LANES))
            } else {
                _mm256_setzero_ps()
            };
            for (r, acc) in acc.iter_mut().enumerate() {
                let at = r * stride + full * gsize;
                let (isum, dw, mw) = if w.len() >= at + gsize {
                    W::group::<true>(
                        p.add(at),
                        gsize,
                        x.xt.as_ptr().add(xt),
                        x.nbias.as_ptr().add(nbias),
                    )
                } else {
                    W::group::<false>(
                        p.add(at),
                        left * size,
                        x.xt.as_ptr().add(xt),
                        x.nbias.as_ptr().add(nbias),
                    )
                };
                let prod = product::<W>(isum, dw, dx, mw, sx);
                *acc = _mm256_mask_add_ps(*acc, k, *acc, prod);
            }
        }
    }
    acc.map(|a| hsum8_ps(a))
}

mod min;
mod wide;

#[cfg(test)]
mod tests;
