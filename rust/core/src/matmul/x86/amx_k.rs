//! The AMX int8 GEMM microkernel of the K-quants (q2_k, q3_k, q4_k, q5_k, q6_k, iq4_xs) with
//! q8_K activations. The weights go in the **B tiles**: each super-block of a panel of 16
//! weight rows, decoded by the VNNI K-quant GEMM's `gemm_k::decode` (whose `SbBuf::q[v]`, lane
//! r = elements 4v..4v + 4 of weight row r, is already the `tdpbssd` B layout), is `expand`ed
//! once per call into the products `w' = sc_g · q` of every element with its sub-block scale,
//! split exactly into two i8 planes, and (q2_k, whose products fit one plane) a plane of each
//! element's min (`KSb`; q4_k / q5_k take the min term on AVX-512 from the q8_K `bsums`). The activations go in the **A tiles** (`AmxXK`: 16 rows of 256 bytes a
//! super-block, packed once per call). So 4 `tdpbssd` a plane sum a whole super-block of 16 x
//! 16 outputs (no per-sub-block integer epilogue, which held a first version with one C tile
//! per sub-block to the VNNI GEMM's speed), stored to L1 while the previous super-block's
//! float part runs on AVX-512.
//!
//! **Numerics (bit-identical to `reference::dot_block_k`).** Per super-block and output,
//! `C_lo + 128 · C_hi = Σ_k x_k · sc_g(k) · q_k = Σ_g sc_g · Σ_{k in g} x_k q_k`, the
//! reference's `isum`, and `C_mn = Σ_g m_g · Σ_{k in g} x_k` its `msum` (the q8_K `bsums` are
//! those sums): exact in i32 (|w'| <= 4096, |isum| < 2^28). The float part is
//! `reference::block_k_product` operation for operation, `(d·xd)·isum - (dmin·xd)·msum` (no
//! min: `(d·xd)·isum`, as `gemm_k`), added to float accumulator `b % 8` of the output in
//! super-block order, then `hsum8`'s additions (`gemm_k::finish`). Every output is computed
//! alone, so its bits depend on neither M, the blocking nor the thread count (tested).
//!
//! Safety: callers hold `amx::amx_int8_usable()` (which implies AVX2, F16C, AVX-512
//! F/BW/VL/VNNI) and configure the tiles with `Tiles::new` on the thread that runs the kernel.

use std::arch::x86_64::*;

use super::gemm_k::{self, Acc, DecodeK, SbBuf, Zmm, NV};
use crate::amx::TileConfig;
use crate::formats::blocks::QK_K;
use crate::matmul::reference::{BlockQ8K, LANES};

/// Activation rows of one A / C tile.
pub const MT: usize = 16;
/// Weight rows of one panel (the 16 int32 columns of a C tile).
pub const NT: usize = NV;
/// 64-byte lines of one packed super-block of 16 activation rows (256 bytes a row).
const XLINES: usize = MT * QK_K / 64;

const ZERO: Zmm = Zmm([0; 64]);

/// The activations of a call packed for the A tiles: per block of 16 rows (the last padded
/// with zero rows) and super-block b, `XLINES` lines at `q[(mb · nb + b) · XLINES..]` (row i's
/// 256 quants at byte 256 i), the rows' scales at `d[(mb · nb + b) · 16 + i]` and their
/// `bsums` as 8 dwords (i16 pairs) at `bs[(mb · nb + b) · 16 + i]`.
#[derive(Default)]
pub struct AmxXK {
    q: Vec<Zmm>,
    d: Vec<f32>,
    bs: Vec<[i32; 8]>,
}

impl AmxXK {
    /// Pack `m` rows of `nb` q8_K blocks each.
    pub fn pack(blocks: &[BlockQ8K], m: usize, nb: usize) -> Self {
        let mbs = m.div_ceil(MT);
        let mut x = AmxXK {
            q: vec![ZERO; mbs * nb * XLINES],
            d: vec![0.0; mbs * nb * MT],
            bs: vec![[0; 8]; mbs * nb * MT],
        };
        for r in 0..m {
            let (mb, i) = (r / MT, r % MT);
            for b in 0..nb {
                let t = mb * nb + b;
                let blk = &blocks[r * nb + b];
                let q: &[u8; QK_K] = bytemuck::cast_ref(&blk.qs);
                for (l, line) in x.q[t * XLINES + 4 * i..][..4].iter_mut().enumerate() {
                    line.0.copy_from_slice(&q[64 * l..64 * (l + 1)]);
                }
                x.d[t * MT + i] = blk.d;
                x.bs[t * MT + i] = bytemuck::cast(blk.bsums);
            }
        }
        x
    }
}

/// One super-block of a panel of 16 weight rows as the tiles multiply it. The per-element
/// products `w' = sc_g · q` (g the element's sub-block, q the signed quant) are split exactly
/// into two i8 planes, `w' = 128 · hi + lo` (lo = w' & 127, hi = w' >> 7: |w'| <= 4096, so
/// hi fits an i8), each in the `tdpbssd` B layout (line v, lane r: elements 4v..4v + 4 of
/// weight row r; lines 16j..16j + 16 are the B tile of elements 64j..64j + 64); `mn` holds
/// each element's min `m_g` the same way (q2_k: `min_plane`). So one C tile per plane sums a
/// whole super-block: `isum = 128 · C_hi + C_lo`, `msum = C_mn` (no per-sub-block epilogue).
/// q4_k / q5_k take their `msum` on AVX-512 instead (`c`: `SbBuf::c`'s (m_g, m_g) pairs, 8
/// `vpdpwssd` with the rows' `bsums` as `gemm_k` does): with two planes their C tiles fit two
/// blocks of activation rows. `d` / `dmin`: the f32 super-block scale and min of each lane.
#[derive(Clone, Copy)]
pub struct KSb {
    lo: [Zmm; 64],
    hi: [Zmm; 64],
    mn: [Zmm; 64],
    c: [Zmm; 8],
    d: Zmm,
    dmin: Zmm,
}

impl Default for KSb {
    fn default() -> Self {
        Self {
            lo: [ZERO; 64],
            hi: [ZERO; 64],
            mn: [ZERO; 64],
            c: [ZERO; 8],
            d: ZERO,
            dmin: ZERO,
        }
    }
}

/// Whether the products of `W` need the `hi` plane (q2_k's |sc · q| <= 45 fits an i8 alone).
const fn has_hi<W: DecodeK>() -> bool {
    !(W::PAIR16 && W::MIN)
}

/// Whether the min goes through the tiles (`KSb::mn`: q2_k, with no hi plane) rather than
/// `KSb::c` on AVX-512 (q4_k, q5_k).
const fn min_plane<W: DecodeK>() -> bool {
    W::MIN && !has_hi::<W>()
}

/// The i32 scale of sub-block g of a decoded super-block, lane r: row r's (`SbBuf::sc`: one
/// line a sub-block, or i16 pairs for `PAIR16`).
#[target_feature(enable = "avx512f")]
#[inline]
fn scale<W: DecodeK>(b: &SbBuf, g: usize) -> __m512i {
    // SAFETY: aligned lines of the buffer.
    unsafe {
        if W::PAIR16 {
            let v = _mm512_load_si512(b.sc[g / 2].0.as_ptr() as *const _);
            if g.is_multiple_of(2) {
                _mm512_srai_epi32::<16>(_mm512_slli_epi32::<16>(v))
            } else {
                _mm512_srai_epi32::<16>(v)
            }
        } else {
            _mm512_load_si512(b.sc[g].0.as_ptr() as *const _)
        }
    }
}

/// The min of sub-block g (`MIN` formats: `SbBuf::c`, i16 pairs (m_2i, m_2i+1) for q2_k's
/// 16-element sub-blocks, (m_g, m_g) for q4_k / q5_k's 32), lane r: row r's, 0..63.
#[target_feature(enable = "avx512f")]
#[inline]
fn min_of<W: DecodeK>(b: &SbBuf, g: usize) -> __m512i {
    // SAFETY: aligned lines of the buffer.
    unsafe {
        if W::SUB16 {
            let v = _mm512_load_si512(b.c[g / 2].0.as_ptr() as *const _);
            if g.is_multiple_of(2) {
                _mm512_and_si512(v, _mm512_set1_epi32(0xffff))
            } else {
                _mm512_srli_epi32::<16>(v)
            }
        } else {
            let v = _mm512_load_si512(b.c[g].0.as_ptr() as *const _);
            _mm512_and_si512(v, _mm512_set1_epi32(0xffff))
        }
    }
}

#[target_feature(enable = "avx512f")]
#[inline]
fn put(z: &mut Zmm, v: __m512i) {
    // SAFETY: a Zmm is 64 bytes on a 64-byte boundary.
    unsafe { _mm512_store_si512(z.0.as_mut_ptr() as *mut _, v) };
}

/// `out` from the VNNI GEMM's decode `b` of the same 16 rows (`gemm_k::decode`: unsigned
/// quants, the format's `BIAS` added).
///
/// # Safety
/// AVX-512 F/BW must be available.
#[target_feature(enable = "avx512f,avx512bw")]
pub unsafe fn expand<W: DecodeK>(b: &SbBuf, out: &mut KSb) {
    let (groups, len) = if W::SUB16 { (16, 4) } else { (8, 8) };
    let bias = _mm512_set1_epi8(W::BIAS as u8 as i8);
    let (m7, mb) = (_mm512_set1_epi16(127), _mm512_set1_epi16(0xff));
    for g in 0..groups {
        // the scale in both words of each lane (|sc| < 2^15)
        let s = scale::<W>(b, g);
        let s16 = _mm512_or_si512(
            _mm512_and_si512(s, _mm512_set1_epi32(0xffff)),
            _mm512_slli_epi32::<16>(s),
        );
        for v in g * len..(g + 1) * len {
            // SAFETY: an aligned line of the buffer.
            let u = unsafe { _mm512_load_si512(b.q[v].0.as_ptr() as *const _) };
            // the signed quants (u - BIAS wraps to the i8 for iq4_xs's 128), even and odd
            // bytes sign-extended to words, times the scale: exact (|w'| <= 4096)
            let q = _mm512_sub_epi8(u, bias);
            let qe = _mm512_srai_epi16::<8>(_mm512_slli_epi16::<8>(q));
            let qo = _mm512_srai_epi16::<8>(q);
            let (pe, po) = (_mm512_mullo_epi16(qe, s16), _mm512_mullo_epi16(qo, s16));
            let lo = _mm512_or_si512(
                _mm512_and_si512(pe, m7),
                _mm512_slli_epi16::<8>(_mm512_and_si512(po, m7)),
            );
            put(&mut out.lo[v], lo);
            if has_hi::<W>() {
                let (he, ho) = (_mm512_srai_epi16::<7>(pe), _mm512_srai_epi16::<7>(po));
                let hi = _mm512_or_si512(_mm512_and_si512(he, mb), _mm512_slli_epi16::<8>(ho));
                put(&mut out.hi[v], hi);
            }
        }
        if min_plane::<W>() {
            // the min in each byte of the lane
            let m = _mm512_mullo_epi32(min_of::<W>(b, g), _mm512_set1_epi32(0x0101_0101));
            for v in g * len..(g + 1) * len {
                put(&mut out.mn[v], m);
            }
        }
    }
    if W::MIN && !min_plane::<W>() {
        out.c = b.c;
    }
    out.d = b.d;
    out.dmin = b.dmin;
}

/// The tile unit configured for the kernel, every tile 16 x 64 bytes: tmm0..tmm3 C tiles (16 x
/// 16 i32), tmm4 / tmm5 A tiles (16 activation rows x 64 elements), tmm6 / tmm7 (and tmm5 with
/// one block of rows) B tiles (64 elements of 16 weight rows of one plane). Released on drop
/// (on this thread).
pub struct Tiles(#[allow(dead_code)] crate::amx::ConfiguredTiles);

impl Tiles {
    /// # Safety
    /// `amx::amx_int8_usable()` returned true; the value is dropped on the thread that made it.
    pub unsafe fn new() -> Self {
        let cfg = TileConfig::new()
            .tile(0, 16, 64)
            .tile(1, 16, 64)
            .tile(2, 16, 64)
            .tile(3, 16, 64)
            .tile(4, 16, 64)
            .tile(5, 16, 64)
            .tile(6, 16, 64)
            .tile(7, 16, 64);
        // SAFETY: the caller's contract (AMX usable); the shapes are valid (`tile` checks).
        Tiles(unsafe { crate::amx::ConfiguredTiles::new(&cfg) })
    }
}

/// Super-blocks ahead whose lines `rows_x_panel` prefetches into L1: the panel and the packed
/// rows sit in L2, and a `tileloadd` waiting on L2 holds up the tile unit.
const PREFETCH: usize = 2;

/// The planes of `W` (lo, then hi where `has_hi`, then the min where `MIN`).
const fn planes<W: DecodeK>() -> usize {
    1 + has_hi::<W>() as usize + min_plane::<W>() as usize
}

/// Blocks of activation rows `rows_x_panel` takes at once for `W`: two where their C tiles fit
/// (2 planes x 2 blocks of rows, each B tile then serves both), else one.
pub const fn blocks_of_rows<W: DecodeK>() -> usize {
    if planes::<W>() <= 2 {
        2
    } else {
        1
    }
}

/// Zeroed float accumulators for `len` panel x block-of-rows pairs (16 rows of `Acc` each).
///
/// # Safety
/// AVX-512 F must be available.
#[target_feature(enable = "avx512f")]
pub fn zero_accs(acc: &mut Vec<[Acc; MT]>, len: usize) {
    acc.clear();
    acc.resize(len, [[_mm512_setzero_ps(); LANES]; MT]);
}

/// The 16 outputs of activation row `i`'s accumulators (`gemm_k::finish`).
///
/// # Safety
/// AVX-512 F must be available.
#[target_feature(enable = "avx512f")]
pub fn finish(a: &Acc) -> [f32; NT] {
    gemm_k::finish(a)
}

/// R blocks of activation rows `mb..mb + R` of `x` with super-blocks `b0..b0 + p.len()` of
/// one panel of 16 weight rows (`p[j]`: super-block b0 + j, `expand`ed), added to `acc[r][i]`
/// (block r's activation row i; `finish` gives its 16 dots once every super-block of K has
/// passed). The float lanes are those of the super-blocks' global index (`b % LANES`), so a
/// pass over K in chunks adds in the order of a pass over all of it: the same bits.
///
/// # Safety
/// `amx::amx_int8_usable()` and a live `Tiles` on this thread; `x` was packed with `nb`
/// super-blocks a row and at least `mb + R` blocks of rows; `b0 + p.len() <= nb`; `planes · R
/// <= 4`.
#[target_feature(enable = "avx2,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
pub unsafe fn rows_x_panel<W: DecodeK, const R: usize>(
    p: &[KSb],
    b0: usize,
    nb: usize,
    x: &AmxXK,
    mb: usize,
    acc: &mut [[Acc; MT]; R],
) {
    let np = planes::<W>();
    let kn = p.len();
    assert!(np * R <= 4 && b0 + kn <= nb);
    let t0 = mb * nb;
    assert!(x.q.len() >= (t0 + R * nb) * XLINES && x.d.len() >= (t0 + R * nb) * MT);
    assert!(x.bs.len() >= (t0 + R * nb) * MT);
    if kn == 0 {
        return;
    }
    // Two buffers of the C tiles: super-block b + 1's tiles are multiplied and stored while
    // b's float part runs (it reads the other buffer).
    let mut c = [[ZERO; 4 * MT]; 2];
    // (row r's super-block b0 of the packed activations)
    let xq: [*const Zmm; R] = std::array::from_fn(|r| x.q[(t0 + r * nb + b0) * XLINES..].as_ptr());
    let prefetch = |b: usize| {
        let planes = [
            Some(&p[b].lo),
            has_hi::<W>().then_some(&p[b].hi),
            min_plane::<W>().then_some(&p[b].mn),
        ];
        // SAFETY: prefetches never fault; the addresses stay inside `p[b]` and the packed
        // super-block b0 + b of `x` (asserted above).
        unsafe {
            for pl in planes.into_iter().flatten() {
                for l in pl.iter() {
                    _mm_prefetch::<_MM_HINT_T0>(l.0.as_ptr() as *const i8);
                }
            }
            for xr in xq {
                for l in 0..XLINES {
                    _mm_prefetch::<_MM_HINT_T0>(xr.add(b * XLINES + l) as *const i8);
                }
            }
        }
    };
    for b in 0..PREFETCH.min(kn) {
        prefetch(b);
    }
    let issue = |b: usize, cp: *mut Zmm| {
        // SAFETY: `Tiles` configured (contract); super-block b0 + b < nb of `p` and of `x`'s R
        // blocks of rows (asserted above); `c` has room for 4 KiB.
        unsafe {
            let xa: [*const Zmm; R] = std::array::from_fn(|r| xq[r].add(b * XLINES));
            issue::<W, R>(xa, &p[b], cp);
        }
    };
    issue(0, c[0].as_mut_ptr());
    let mut cur = 0;
    #[allow(clippy::needless_range_loop)] // b also names the super-blocks ahead
    for b in 0..kn {
        if b + PREFETCH < kn {
            prefetch(b + PREFETCH);
        }
        if b + 1 < kn {
            issue(b + 1, c[cur ^ 1].as_mut_ptr());
        }
        for (r, ar) in acc.iter_mut().enumerate() {
            let cl = |pl: usize| &c[cur][(pl * R + r) * MT..][..MT];
            // SAFETY: super-block b0 + b of `p` and of block of rows r of `x` (asserted above).
            unsafe {
                super_block::<W>(
                    [cl(0), cl(1), cl(np - 1)],
                    &p[b],
                    x,
                    t0 + r * nb + b0 + b,
                    (b0 + b) % LANES,
                    ar,
                )
            };
        }
        cur ^= 1;
    }
}

/// The float part of one super-block of one block of rows (its C tiles `c`: lo, hi, min;
/// packed block `t` of `x`, lane `lane`): `isum = 128 · C_hi + C_lo`, `msum = C_mn`, then
/// `reference::block_k_product` for each activation row, into `acc[i][lane]`.
///
/// # Safety
/// AVX-512 F, and called only from functions compiled with it; block t of `x` exists; each
/// `c[k]` has 16 lines.
#[inline(always)]
unsafe fn super_block<W: DecodeK>(
    c: [&[Zmm]; 3],
    w: &KSb,
    x: &AmxXK,
    t: usize,
    lane: usize,
    acc: &mut [Acc; MT],
) {
    let xd = &x.d[t * MT..][..MT];
    let bs = &x.bs[t * MT..][..MT];
    // SAFETY: aligned lines of the super-block and of `c`; the features (contract).
    unsafe {
        let ld = |z: &Zmm| _mm512_load_si512(z.0.as_ptr() as *const _);
        let d = _mm512_load_ps(w.d.0.as_ptr() as *const f32);
        let dmin = _mm512_load_ps(w.dmin.0.as_ptr() as *const f32);
        let mut cw = [_mm512_setzero_si512(); 8];
        if W::MIN && !min_plane::<W>() {
            for (cv, l) in cw.iter_mut().zip(&w.c) {
                *cv = ld(l);
            }
        }
        for i in 0..MT {
            let mut isum = ld(&c[0][i]);
            if has_hi::<W>() {
                isum = _mm512_add_epi32(isum, _mm512_slli_epi32::<7>(ld(&c[1][i])));
            }
            let xdi = _mm512_set1_ps(xd[i]);
            let is = _mm512_cvtepi32_ps(isum);
            let prod = if W::MIN {
                let msum = if min_plane::<W>() {
                    ld(&c[2][i])
                } else {
                    let mut s = _mm512_setzero_si512();
                    for (cv, &b) in cw.iter().zip(&bs[i]) {
                        s = _mm512_dpwssd_epi32(s, *cv, _mm512_set1_epi32(b));
                    }
                    s
                };
                let msum = _mm512_cvtepi32_ps(msum);
                _mm512_sub_ps(
                    _mm512_mul_ps(_mm512_mul_ps(d, xdi), is),
                    _mm512_mul_ps(_mm512_mul_ps(dmin, xdi), msum),
                )
            } else {
                _mm512_mul_ps(_mm512_mul_ps(d, xdi), is)
            };
            acc[i][lane] = _mm512_add_ps(acc[i][lane], prod);
        }
    }
}

/// `tileloadd` of 16 lines of 64 bytes at `p` (row stride `stride`) into tmm`T`.
///
/// # Safety
/// A live `Tiles`; the 16 rows are readable.
#[inline(always)]
unsafe fn load<const T: u8>(p: *const u8, stride: usize) {
    // SAFETY: the contract.
    unsafe {
        match T {
            4 => {
                std::arch::asm!("tileloadd tmm4, [{p} + {s}*1]", p = in(reg) p, s = in(reg) stride, options(nostack, readonly))
            }
            5 => {
                std::arch::asm!("tileloadd tmm5, [{p} + {s}*1]", p = in(reg) p, s = in(reg) stride, options(nostack, readonly))
            }
            6 => {
                std::arch::asm!("tileloadd tmm6, [{p} + {s}*1]", p = in(reg) p, s = in(reg) stride, options(nostack, readonly))
            }
            _ => {
                std::arch::asm!("tileloadd tmm7, [{p} + {s}*1]", p = in(reg) p, s = in(reg) stride, options(nostack, readonly))
            }
        }
    }
}

/// `tdpbssd` of C tile `c` (tmm0..tmm3) with A tile tmm(4 + a) and B tile tmm(6 + b) (b < 2),
/// or tmm5 for b = 2.
///
/// # Safety
/// A live `Tiles` with the operands loaded.
#[inline(always)]
unsafe fn dp(c: usize, a: usize, b: usize) {
    // SAFETY: the contract; register operations only.
    unsafe {
        macro_rules! d {
            ($s:literal) => {
                std::arch::asm!($s, options(nostack, nomem))
            };
        }
        match (c, a, b) {
            (0, 0, 0) => d!("tdpbssd tmm0, tmm4, tmm6"),
            (0, 0, _) => d!("tdpbssd tmm0, tmm4, tmm7"),
            (1, 0, 0) => d!("tdpbssd tmm1, tmm4, tmm6"),
            (1, 0, 1) => d!("tdpbssd tmm1, tmm4, tmm7"),
            (1, 1, 0) => d!("tdpbssd tmm1, tmm5, tmm6"),
            (1, _, _) => d!("tdpbssd tmm1, tmm5, tmm7"),
            (2, 0, 0) => d!("tdpbssd tmm2, tmm4, tmm6"),
            (2, 0, 1) => d!("tdpbssd tmm2, tmm4, tmm7"),
            (2, 0, _) => d!("tdpbssd tmm2, tmm4, tmm5"),
            (2, _, 0) => d!("tdpbssd tmm2, tmm5, tmm6"),
            (2, _, _) => d!("tdpbssd tmm2, tmm5, tmm7"),
            (_, 0, 0) => d!("tdpbssd tmm3, tmm4, tmm6"),
            (_, 0, _) => d!("tdpbssd tmm3, tmm4, tmm7"),
            (_, _, 0) => d!("tdpbssd tmm3, tmm5, tmm6"),
            _ => d!("tdpbssd tmm3, tmm5, tmm7"),
        }
    }
}

/// The C tiles of one super-block for R blocks of rows: for each 64 elements j, the A tiles
/// of the packed rows at `xa[r]` (16 rows, stride 256, bytes 64j..) with the B tile of each
/// of `w`'s planes (lines 16j..), summed in C tile `plane · R + r`; stored to `cp` (1 KiB each
/// in that order).
///
/// # Safety
/// A live `Tiles` on this thread; each `xa[r]` holds 16 rows of 256 bytes; `cp` has room for
/// `planes · R` KiB, at most 4.
#[inline(always)]
unsafe fn issue<W: DecodeK, const R: usize>(xa: [*const Zmm; R], w: &KSb, cp: *mut Zmm) {
    let pls: [Option<&[Zmm; 64]>; 3] = [
        Some(&w.lo),
        has_hi::<W>().then_some(&w.hi),
        min_plane::<W>().then_some(&w.mn),
    ];
    // SAFETY: the contract: A tiles read 16 rows of 64 bytes at stride 256 inside the packed
    // super-blocks, B tiles 16 lines of the planes (lines 16j..16j + 16 < 64), C tiles write
    // 1 KiB each at `cp`; the tile registers are this kernel's (`Tiles`).
    unsafe {
        std::arch::asm!(
            "tilezero tmm0",
            "tilezero tmm1",
            "tilezero tmm2",
            "tilezero tmm3",
            options(nostack, nomem)
        );
        for j in 0..4 {
            load::<4>((xa[0] as *const u8).add(64 * j), 256);
            if R > 1 {
                load::<5>((xa[R - 1] as *const u8).add(64 * j), 256);
            }
            for (k, pl) in pls.into_iter().flatten().enumerate() {
                // B slots: tmm6, tmm7, then tmm5 (free with one block of rows)
                let b = k;
                let src = pl[16 * j..].as_ptr() as *const u8;
                match b {
                    0 => load::<6>(src, 64),
                    1 => load::<7>(src, 64),
                    _ => load::<5>(src, 64),
                }
                for r in 0..R {
                    dp(k * R + r, r, b);
                }
            }
        }
        std::arch::asm!(
            "tilestored [{c} + {s64}*1], tmm0",
            "tilestored [{c} + {s64}*1 + 1024], tmm1",
            "tilestored [{c} + {s64}*1 + 2048], tmm2",
            "tilestored [{c} + {s64}*1 + 3072], tmm3",
            c = in(reg) cp, s64 = in(reg) 64usize, options(nostack),
        );
    }
}
