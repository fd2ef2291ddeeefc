//! The M = 1 row kernel of the 32-weight integer formats (q4_0, iq4_nl, q5_0, q8_0) with
//! AVX-512 VBMI and GFNI beside VNNI: no horizontal integer reduction per block.
//!
//! **Layout.** A block's integer sum Σ (w + BIAS)·x is exact, so the order of its 32 products is
//! free. Per group of 8 blocks the weights are loaded straight from ggml's block layout (no
//! repacking of the stored bytes) and rearranged in registers with byte / word permutes so that
//! every 32-bit lane of a `vpdpbusd` holds four quants of one block; the activations of the row
//! are rearranged once per call (`interleave`) to match, lane for lane (`Row32::x_lane`). Four
//! 512-bit `vpdpbusd` per group then leave each block's sum in a few lanes, folded with one or
//! two lane shuffles instead of `reduce8`'s eight horizontal adds:
//! - q4_0, iq4_nl, q5_0: two `vpermt2b` gather "dword s of the quant bytes of blocks 0..3" and
//!   "of blocks 4..7" (each a 128-byte window of the group), one `vpermt2q` each makes the
//!   registers `T01` (lanes 0..7: dword 0 of blocks 0..7, lanes 8..15: dword 1) and `T23`; low
//!   nibbles are elements 4s.., high nibbles 16 + 4s... After the products, lane j + lane 8 + j
//!   is block j's sum. The f16 scales come out of the same loads with one word permute.
//! - q8_0: four `vpermt2w` gather dwords 0..3 / 4..7 of blocks 0..3 / 4..7 (lane 4q + j); two
//!   `vpermt2q` and two adds fold the four lanes of each block.
//!
//! The float part is the reference's: `acc[j] += (d_w · d_x) · isum` lane-wise, block 8g + j in
//! lane j, groups in order; the last partial group is decoded from masked loads (no byte past
//! the row is read) and added under a lane mask, so the lanes and `hsum8` give
//! `reference::dot_block32`'s bits.
//!
//! Safety: callers check `available()` (AVX2, F16C, AVX-512F/VL/BW/VNNI/VBMI, GFNI) at run time
//! and pass activations prepared by `interleave` for the same number of blocks.

use std::arch::x86_64::*;

use super::Load32;
use crate::formats::blocks::*;
use crate::matmul::reference::LANES;

/// Bytes of one group of 8 rearranged activation blocks (4 registers of 64).
pub const GROUP_BYTES: usize = 256;

/// True when the row kernel may run: `has_vnni` plus AVX-512 BW and VBMI and GFNI.
pub fn available() -> bool {
    use std::sync::OnceLock;
    static F: OnceLock<bool> = OnceLock::new();
    *F.get_or_init(|| {
        super::has_vnni()
            && std::arch::is_x86_feature_detected!("avx512bw")
            && std::arch::is_x86_feature_detected!("avx512vbmi")
            && std::arch::is_x86_feature_detected!("gfni")
    })
}

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
    /// `Σ (w + BIAS)·x + nbias` in lane j, and its scale `d_w` as f32.
    ///
    /// # Safety
    /// `available()`; `p..p + len` readable, `len == 8 * size_of::<Self>()` when `FULL`; `xt`
    /// points at the group's `GROUP_BYTES` activation bytes, `nbias` at its 8 biases.
    unsafe fn group<const FULL: bool>(
        p: *const u8,
        len: usize,
        xt: *const u8,
        nbias: *const i32,
    ) -> (__m256i, __m256);
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

/// Byte index of a `vpermt2b` over the windows `t1..t1 + 64` and `t2..t2 + 64` of a group:
/// output byte `16s + 4j + b` = quant byte `4s + b` of block `4·half + j` (block `size` bytes,
/// quants at `qoff`).
const fn quad_index(size: usize, qoff: usize, half: usize, t1: usize, t2: usize) -> Idx {
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

/// qword index of `vpermt2q` forming [a.l0, b.l0, a.l1, b.l1] and [a.l2, b.l2, a.l3, b.l3]
/// (128-bit lanes of a and b).
const Q_LO: [i64; 8] = [0, 1, 8, 9, 2, 3, 10, 11];
const Q_HI: [i64; 8] = [4, 5, 12, 13, 6, 7, 14, 15];

/// `[a.l0, b.l0, a.l1, b.l1]` and `[a.l2, b.l2, a.l3, b.l3]`.
#[target_feature(enable = "avx512f")]
#[inline]
fn pair_lanes(a: __m512i, b: __m512i) -> (__m512i, __m512i) {
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
unsafe fn dots4(nbias: *const i32, v: [__m512i; 4], xt: *const u8) -> __m256i {
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
) -> (__m256i, __m256) {
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
    ) -> (__m256i, __m256) {
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
    ) -> (__m256i, __m256) {
        // SAFETY: the caller's contract is this function's.
        unsafe { group_q4::<Self, FULL>(p, len, xt, nbias) }
    }
}

/// Bytes ahead of the group being read that the long-row path prefetches (`prefetch_l2`).
const PREFETCH_L2_AHEAD: usize = 4096;

/// Prefetch into L2 (`_MM_HINT_T1`) the `len` bytes `PREFETCH_L2_AHEAD` past `p`: the row
/// kernel's long-K path (`PF`, K above `mod.rs`'s `LONG_K`). This kernel reads the weights
/// about 2.5x as fast as `block32_vnni`, for which `x86::prefetch_ahead` (2 KiB ahead, into
/// L1) was tuned; with it, at K = 14336 (one thread, from memory, alternating in one process
/// on a busy machine) q4_0 ran at 5.8-6.3 GB/s, without any prefetch 6.6-9.6, with this one
/// 9.0-15.0. A prefetch is a hint: addresses past the data are never dereferenced.
#[target_feature(enable = "avx2")]
#[inline]
fn prefetch_l2(p: *const u8, len: usize) {
    let q = p.wrapping_add(PREFETCH_L2_AHEAD) as *const i8;
    let mut o = 0;
    while o < len {
        _mm_prefetch::<_MM_HINT_T1>(q.wrapping_add(o));
        o += 64;
    }
}

/// `reference::hsum8` of the lanes of `v`: `(a0 + a4, .., a3 + a7)`, then `(s0 + s2) + (s1 + s3)`.
#[target_feature(enable = "avx2")]
#[inline]
fn hsum8_ps(v: __m256) -> f32 {
    let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
    let t = _mm_add_ps(s, _mm_movehl_ps(s, s));
    _mm_cvtss_f32(_mm_add_ss(t, _mm_movehdup_ps(t)))
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
/// `available()`; `x` prepared by `interleave::<W>` for `nb` blocks (`x.d` at least `nb`
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
    );
    let p = w.as_ptr();
    let mut acc = [_mm256_setzero_ps(); R];
    let full = nb / LANES;
    for g in 0..full {
        // SAFETY: group g's 8 blocks of every row are in w; xt, nbias and d hold group g
        // (asserted above).
        unsafe {
            let dx = _mm256_loadu_ps(x.d.as_ptr().add(g * LANES));
            for (r, acc) in acc.iter_mut().enumerate() {
                let at = r * stride + g * gsize;
                if PF {
                    prefetch_l2(p.add(at), gsize);
                }
                let (isum, dw) = W::group::<true>(
                    p.add(at),
                    gsize,
                    x.xt.as_ptr().add(g * GROUP_BYTES),
                    x.nbias.as_ptr().add(g * LANES),
                );
                let prod = _mm256_mul_ps(_mm256_mul_ps(dw, dx), _mm256_cvtepi32_ps(isum));
                *acc = _mm256_add_ps(*acc, prod);
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
            for (r, acc) in acc.iter_mut().enumerate() {
                let at = r * stride + full * gsize;
                let (isum, dw) = if w.len() >= at + gsize {
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
                let prod = _mm256_mul_ps(_mm256_mul_ps(dw, dx), _mm256_cvtepi32_ps(isum));
                *acc = _mm256_mask_add_ps(*acc, k, *acc, prod);
            }
        }
    }
    acc.map(|a| hsum8_ps(a))
}

// ---------------------------------------------------------------- q5_0

/// Register `reg` lane `l` of the transposed layout: block `l % 8`, quad `2·reg + l / 8`
/// (registers: low nibbles of dwords 0,1; of 2,3; high nibbles of 0,1; of 2,3).
fn x_lane_t(reg: usize, l: usize) -> (usize, usize) {
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
/// Word 2L + h (dword lane L of 16) = word h of block L % 8's qh.
const fn qh16(late: bool) -> [usize; 32] {
    let mut a = [0usize; 32];
    let mut w = 0;
    while w < 32 {
        let j = (w / 2) % 8;
        a[w] = if (j >= 6) != late {
            SKIP
        } else {
            22 * j + 2 + 2 * (w % 2)
        };
        w += 1;
    }
    a
}
static Q5_D1: Idx = word_index(split8(22, 0, false), 0, 64);
static Q5_D2: Idx = word_index(split8(22, 0, true), 112, 112);
static Q5_QH1: Idx = word_index(qh16(false), 0, 64);
static Q5_QH2: Idx = word_index(qh16(true), 112, 112);
/// The words that `Q5_D2` / `Q5_QH2` replace.
const Q5_D_LATE: __mmask32 = 0xc0;
const Q5_QH_LATE: __mmask32 = 0xf000_f000;

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
fn q5_levels(nib: __m512i, qh: __m512i, reg: usize) -> __m512i {
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
    ) -> (__m256i, __m256) {
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
    ) -> (__m256i, __m256) {
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
            (isum, _mm256_cvtph_ps(d))
        }
    }
}

#[cfg(test)]
mod tests;
