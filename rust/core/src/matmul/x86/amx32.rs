//! The AMX int8 GEMM microkernel of the 32-weight formats (q4_0, q5_0, q8_0, iq4_nl, q4_1,
//! q5_1), the weights in the A tiles and the activations in the B tiles: a panel of 16 weight
//! rows is decoded once into A-tile rows (per block of 32 weights, 16 rows of 32 bytes: row n
//! holds weight row n's `Load32::load`, no transpose), the activations are packed once per
//! call into the B-tile layout of `tdpbssd` (`AmxX`: per block of 16 activation rows and block
//! of K, 8 rows of 64 bytes, row k holding quants `4k..4k + 4` of each activation row, the last
//! block of rows padded with zero rows). Then two panels by two blocks of activation rows a
//! block of K at a time (`rows_x_panels_2x2`: each A and B tile feeds two `tdpbssd`, 4 C
//! tiles), or one by one 4 blocks of K at a time (`rows_x_panel`, for an odd block of rows or
//! panel out), each C tile the 16 x 16 exact integer sums of one block (row n: weight row n,
//! lane i: activation row i), stored to L1 while the float part (AVX-512) of the previous step
//! runs. (With the weights in the B tiles, as in session 13, every panel block took two 8 x 8
//! dword transposes to decode: a quarter of a q8_0 call at M = 64 and most of it at M = 16.)
//!
//! **Numerics (bit-identical to `reference::dot_block32` / `dot_block32_min`).** Each C
//! element is `Σ w·x` over one block's 32 products of signed bytes (weights as the reference's
//! `unpack_*` gives them, |w| <= 127, activations q8_0 quants): exact in i32, as the
//! reference's `isum32`. The float part is the reference's, operation for operation: per block
//! b, `(d_w · d_x) · (isum as f32)` (`+ m_w · s_x` for q4_1 / q5_1), added to lane `b % 8`
//! of that output's 8 float accumulators in block order, then `hsum8`'s additions. Every
//! output is computed alone (no sum crosses outputs or tasks), so the bits do not depend on M,
//! the blocking or the thread count (tested against the reference).
//!
//! Safety: callers hold `amx::amx_int8_usable()` (which implies AVX-512 F/BW/VL/VNNI, F16C)
//! and configure the tiles with `tiles` on the thread that runs the kernel.

use std::arch::x86_64::*;

use super::Load32;
use crate::amx::TileConfig;
use crate::formats::blocks::*;
use crate::matmul::reference::LANES;

/// Weight rows of one panel (the 16 int32 columns of a C tile).
pub const NT: usize = 16;
/// Activation rows of one A / C tile.
pub const MT: usize = 16;

/// One 64-byte line on a 64-byte boundary (a tile row, or 16 f32 / i32).
#[repr(C, align(64))]
#[derive(Clone, Copy)]
pub struct Zmm([u8; 64]);

const ZERO: Zmm = Zmm([0; 64]);

/// Blocks a step of the kernel multiplies (one C tile each).
const STEP: usize = 4;

/// The activations of a call packed for the B tiles: per block of 16 rows (the last padded
/// with zero rows) and block b, 8 lines at `q[(mb · nb + b) · 8..]`, line k holding quants
/// `4k..4k + 4` of row i at bytes `4i..4i + 4`; the rows' scales at `d[(mb · nb + b) · 16..]`
/// (and `s`, q8_1's).
#[derive(Default)]
pub struct AmxX {
    q: Vec<Zmm>,
    d: Vec<f32>,
    s: Vec<f32>,
}

impl AmxX {
    /// Pack `m` rows of `nb` q8_0 blocks (`blocks`, their scales `d` as f32, and q8_1's `s`
    /// when not empty).
    pub fn pack(blocks: &[BlockQ8_0], d: &[f32], s: &[f32], m: usize, nb: usize) -> Self {
        let mbs = m.div_ceil(MT);
        let mut x = AmxX {
            q: vec![ZERO; mbs * nb * 8],
            d: vec![0.0; mbs * nb * MT],
            s: if s.is_empty() {
                Vec::new()
            } else {
                vec![0.0; mbs * nb * MT]
            },
        };
        for r in 0..m {
            let (mb, i) = (r / MT, r % MT);
            for b in 0..nb {
                let t = mb * nb + b;
                let q: &[u8; 32] = bytemuck::cast_ref(&blocks[r * nb + b].qs);
                for k in 0..8 {
                    x.q[t * 8 + k].0[4 * i..4 * i + 4].copy_from_slice(&q[4 * k..4 * k + 4]);
                }
                x.d[t * MT + i] = d[r * nb + b];
                if !s.is_empty() {
                    x.s[t * MT + i] = s[r * nb + b];
                }
            }
        }
        x
    }
}

/// One decoded panel: `b` the A tiles of every block (`nb · 8` lines: weight row n's 32
/// bytes at byte `32n` of the block's 512), `d` / `m` each block's 16 weight scales /
/// offsets as f32 (`nb` lines, lane n: weight row n).
#[derive(Default)]
pub struct AmxPanel {
    b: Vec<Zmm>,
    d: Vec<Zmm>,
    m: Vec<Zmm>,
}

impl AmxPanel {
    /// Decode 16 weight rows of `nb` blocks each.
    ///
    /// # Safety
    /// AVX2, F16C and AVX-512 F (`amx::amx_int8_usable` implies them); every `w[n]` has `nb`
    /// blocks.
    #[target_feature(enable = "avx2,f16c,avx512f")]
    pub unsafe fn decode<W: Load32>(&mut self, w: [&[W]; NT], nb: usize) {
        self.b.resize(nb * 8, ZERO);
        self.d.resize(nb, ZERO);
        self.m.resize(nb, ZERO);
        // Each row's distance from row 0 in bytes, where all 16 fit an i32 (rows of one
        // weight buffer): then a block's 16 scales (and offsets) are one gather.
        let base = w[0].as_ptr() as isize;
        let mut offs = [0i32; NT];
        let mut gather = true;
        for (o, wn) in offs.iter_mut().zip(&w) {
            match i32::try_from(wn.as_ptr() as isize - base) {
                Ok(v) => *o = v,
                Err(_) => gather = false,
            }
        }
        // SAFETY: 16 i32 (64 bytes).
        let idx = unsafe { _mm512_loadu_si512(offs.as_ptr() as *const __m512i) };
        for b in 0..nb {
            for (n, wn) in w.iter().enumerate() {
                // SAFETY: AVX2 (contract); block b of each row exists (contract).
                let v = unsafe { wn[b].load() };
                let line = self.b[b * 8 + n / 2].0[32 * (n % 2)..].as_mut_ptr() as *mut __m256i;
                // SAFETY: 32 bytes inside line b · 8 + n / 2 (resized above).
                unsafe { _mm256_storeu_si256(line, v) };
            }
            if gather {
                // SAFETY: lane n reads the first 4 bytes of block b of row n (base + offs[n]
                // is row n's start; every block holds at least 4 bytes, d first and m after
                // it, `x86::pair32`); F16C / AVX-512 F (contract); aligned 64-byte stores.
                unsafe {
                    let p = w[0].as_ptr().add(b) as *const u8;
                    let h = _mm512_i32gather_epi32::<1>(idx, p as _);
                    let d = _mm512_cvtph_ps(_mm512_cvtepi32_epi16(h));
                    _mm512_store_ps(self.d[b].0.as_mut_ptr() as *mut f32, d);
                    if W::HAS_MIN {
                        let m = _mm512_cvtph_ps(_mm512_cvtepi32_epi16(_mm512_srli_epi32::<16>(h)));
                        _mm512_store_ps(self.m[b].0.as_mut_ptr() as *mut f32, m);
                    }
                }
                continue;
            }
            let dh: [u16; NT] = std::array::from_fn(|n| u16::from_le_bytes(w[n][b].d()));
            // SAFETY: dh is 16 u16 (32 bytes loaded); F16C / AVX-512 F (contract); an aligned
            // 64-byte store into a `Zmm`.
            unsafe {
                let d = _mm512_cvtph_ps(_mm256_loadu_si256(dh.as_ptr() as *const __m256i));
                _mm512_store_ps(self.d[b].0.as_mut_ptr() as *mut f32, d);
            }
            if W::HAS_MIN {
                let mh: [u16; NT] = std::array::from_fn(|n| u16::from_le_bytes(w[n][b].m()));
                // SAFETY: as for dh.
                unsafe {
                    let m = _mm512_cvtph_ps(_mm256_loadu_si256(mh.as_ptr() as *const __m256i));
                    _mm512_store_ps(self.m[b].0.as_mut_ptr() as *mut f32, m);
                }
            }
        }
    }
}

/// The tile unit configured for the kernel: tmm0..tmm3 C tiles (16 x 16 i32), tmm4 / tmm6 A
/// tiles (16 rows x 32 bytes: one block of a panel's 16 weight rows), tmm5 / tmm7 B tiles
/// (8 x 64 bytes: one block of 16 activation rows). Released on drop (on this thread), so no tile state outlives the kernel.
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
            .tile(4, 16, 32)
            .tile(5, 8, 64)
            .tile(6, 16, 32)
            .tile(7, 8, 64);
        // SAFETY: the caller's contract (AMX usable); the shapes are valid (`tile` checks).
        Tiles(unsafe { crate::amx::ConfiguredTiles::new(&cfg) })
    }
}

/// Block of activation rows `mb` of `x` (its first `rows` rows real) with the panel's 16
/// weight rows over `nb` blocks: `out(i, y)` gets row i's 16 dots.
///
/// # Safety
/// `amx::amx_int8_usable()`, and a live `Tiles` on this thread; `p` decoded for `nb` blocks;
/// `x` packed with `nb` blocks a row and at least `mb + 1` blocks of rows (with `s` for a
/// minimum).
#[target_feature(enable = "avx2,f16c,avx512f,avx512bw,avx512vl")]
pub unsafe fn rows_x_panel<const MIN: bool>(
    p: &AmxPanel,
    nb: usize,
    x: &AmxX,
    mb: usize,
    rows: usize,
    out: impl FnMut(usize, &[f32; NT]),
) {
    assert!((1..=MT).contains(&rows) && p.b.len() >= nb * 8 && p.d.len() >= nb);
    let t0 = mb * nb;
    assert!(x.q.len() >= (t0 + nb) * 8 && x.d.len() >= (t0 + nb) * MT);
    assert!(!MIN || (x.s.len() >= (t0 + nb) * MT && p.m.len() >= nb));
    // Two buffers of STEP C tiles: the tiles of the next step are multiplied and stored
    // while the float part of this one runs (it reads the other buffer).
    let mut c = [[ZERO; STEP * NT]; 2];
    let mut f = [[_mm512_setzero_ps(); NT]; LANES];
    let xq = x.q[t0 * 8..].as_ptr();
    let bq = p.b.as_ptr();
    let width = |b: usize| if b + STEP <= nb { STEP } else { 1 };
    let mut b = 0;
    let mut n = width(0);
    // SAFETY: `Tiles` configured (contract); blocks 0..n exist (n <= nb).
    unsafe { issue(bq, xq, 0, n, c[0].as_mut_ptr()) };
    let mut cur = 0;
    while b < nb {
        let next = b + n;
        let nn = if next < nb { width(next) } else { 0 };
        if nn > 0 {
            // SAFETY: as above, blocks next..next + nn <= nb.
            unsafe { issue(bq, xq, next, nn, c[cur ^ 1].as_mut_ptr()) };
        }
        for j in 0..n {
            let bj = b + j;
            // SAFETY: lines of `c`, `p` and `x` in bounds (asserted above).
            unsafe {
                let (dx, xs) = act_scales::<MIN>(x, t0 + bj);
                let c = &c[cur][j * NT..][..NT];
                tile_float::<MIN>(c, p, bj, dx, xs, &mut f[bj % LANES]);
            }
        }
        b = next;
        n = nn;
        cur ^= 1;
    }
    // SAFETY: the features (this function's).
    unsafe { finish(&f, rows, out) };
}

/// Blocks ahead whose tiles `rows_x_panels_2x2` prefetches into L1: the panels and packed
/// rows of a task sit in L2, and a `tileloadd` waiting on L2 held up the tile unit (the
/// hottest instructions of a q8_0 call at M = 64, perf).
const PREFETCH: usize = 2;

/// The 8 lines of one block's tile (`tileloadd` reads them next).
///
/// # Safety
/// `p` points into an allocation (prefetching itself never faults).
#[inline(always)]
unsafe fn prefetch_block(p: *const Zmm) {
    for l in 0..8 {
        // SAFETY: prefetches never fault (the contract keeps the address arithmetic valid).
        unsafe { _mm_prefetch::<_MM_HINT_T0>(p.add(l) as *const i8) };
    }
}

/// Activation rows' scales (and q8_1 sums) of packed block `t`, lane i: row i.
///
/// # Safety
/// AVX-512 F, and called only from functions compiled with it; block t of `x` exists (and
/// its `s` with MIN).
#[inline(always)]
unsafe fn act_scales<const MIN: bool>(x: &AmxX, t: usize) -> (__m512, __m512) {
    let d = &x.d[t * MT..][..MT];
    // SAFETY: 16 f32 of d (sliced just now); the features (contract).
    let dx = unsafe { _mm512_loadu_ps(d.as_ptr()) };
    let xs = if MIN {
        let s = &x.s[t * MT..][..MT];
        // SAFETY: as for d.
        unsafe { _mm512_loadu_ps(s.as_ptr()) }
    } else {
        // SAFETY: the features (contract).
        unsafe { _mm512_setzero_ps() }
    };
    (dx, xs)
}

/// The float part of block `bj`'s C tile `c` (line n: weight row n's 16 integer sums, lane i
/// with activation row i) into `fl` (`fl[n]`: lane `bj % 8` of weight row n's outputs with
/// the 16 activation rows): the reference's `(d_w · d_x) · isum` (`+ m_w · s_x`), then added.
///
/// # Safety
/// AVX-512 F, and called only from functions compiled with it; `c` has 16 lines; block `bj`
/// of `p` exists (with `m` for MIN).
#[inline(always)]
unsafe fn tile_float<const MIN: bool>(
    c: &[Zmm],
    p: &AmxPanel,
    bj: usize,
    dx: __m512,
    xs: __m512,
    fl: &mut [__m512; NT],
) {
    let dw: &[f32; NT] = bytemuck::cast_ref(&p.d[bj].0);
    let mw: &[f32; NT] = if MIN {
        bytemuck::cast_ref(&p.m[bj].0)
    } else {
        dw
    };
    for (n, fln) in fl.iter_mut().enumerate() {
        // SAFETY: a 64-byte aligned line of `c`; the features (contract).
        unsafe {
            let ci = _mm512_load_si512(c[n].0.as_ptr() as _);
            let w = _mm512_set1_ps(dw[n]);
            let mut prod = _mm512_mul_ps(_mm512_mul_ps(w, dx), _mm512_cvtepi32_ps(ci));
            if MIN {
                prod = _mm512_add_ps(prod, _mm512_mul_ps(_mm512_set1_ps(mw[n]), xs));
            }
            *fln = _mm512_add_ps(*fln, prod);
        }
    }
}

/// The outputs from the lanes `f` (`f[l][n]`: lane l of weight row n with the 16 activation
/// rows): `hsum8`'s additions (`s_l = a_l + a_{l+4}`, then `(s0 + s2) + (s1 + s3)`) for 16
/// activation rows at once, then `out(i, y)` with activation row i's 16 dots, i < rows.
///
/// # Safety
/// AVX-512 F, and called only from functions compiled with it.
#[inline(always)]
#[allow(clippy::needless_range_loop)] // i indexes the inner arrays of `t` (a transpose)
unsafe fn finish(f: &[[__m512; NT]; LANES], rows: usize, mut out: impl FnMut(usize, &[f32; NT])) {
    let mut t = [[0.0f32; MT]; NT];
    for (n, tn) in t.iter_mut().enumerate() {
        // SAFETY: the features (contract); 16 f32 of room.
        unsafe {
            let s0 = _mm512_add_ps(f[0][n], f[4][n]);
            let s1 = _mm512_add_ps(f[1][n], f[5][n]);
            let s2 = _mm512_add_ps(f[2][n], f[6][n]);
            let s3 = _mm512_add_ps(f[3][n], f[7][n]);
            let y = _mm512_add_ps(_mm512_add_ps(s0, s2), _mm512_add_ps(s1, s3));
            _mm512_storeu_ps(tn.as_mut_ptr(), y);
        }
    }
    for i in 0..rows {
        let v: [f32; NT] = std::array::from_fn(|n| t[n][i]);
        out(i, &v);
    }
}

/// The integer sums of blocks `b..b + n` (n = STEP or 1) of the panel's A tiles at `aq` with
/// the packed activation rows' B tiles at `bq`, one C tile each, stored to `cp` (1 KiB a
/// block).
///
/// # Safety
/// A live `Tiles` on this thread; `aq` / `bq` hold blocks `b..b + n` (8 lines each); `cp` has
/// room for `n` KiB.
#[inline(always)]
unsafe fn issue(aq: *const Zmm, bq: *const Zmm, b: usize, n: usize, cp: *mut Zmm) {
    // SAFETY: the contract: A tiles read 512 contiguous bytes (stride 32) of each block's 16
    // weight rows, B tiles its 512 packed activation bytes (stride 64), C tiles write 1 KiB
    // each at `cp`.
    unsafe {
        let (a, w) = (aq.add(b * 8), bq.add(b * 8));
        if n == STEP {
            std::arch::asm!(
                "tilezero tmm0",
                "tilezero tmm1",
                "tilezero tmm2",
                "tilezero tmm3",
                "tileloadd tmm4, [{a} + {s32}*1]",
                "tileloadd tmm5, [{w} + {s64}*1]",
                "tdpbssd tmm0, tmm4, tmm5",
                "tileloadd tmm6, [{a} + {s32}*1 + 512]",
                "tileloadd tmm7, [{w} + {s64}*1 + 512]",
                "tdpbssd tmm1, tmm6, tmm7",
                "tileloadd tmm4, [{a} + {s32}*1 + 1024]",
                "tileloadd tmm5, [{w} + {s64}*1 + 1024]",
                "tdpbssd tmm2, tmm4, tmm5",
                "tileloadd tmm6, [{a} + {s32}*1 + 1536]",
                "tileloadd tmm7, [{w} + {s64}*1 + 1536]",
                "tdpbssd tmm3, tmm6, tmm7",
                "tilestored [{c} + {s64}*1], tmm0",
                "tilestored [{c} + {s64}*1 + 1024], tmm1",
                "tilestored [{c} + {s64}*1 + 2048], tmm2",
                "tilestored [{c} + {s64}*1 + 3072], tmm3",
                a = in(reg) a, w = in(reg) w, c = in(reg) cp,
                s32 = in(reg) 32usize, s64 = in(reg) 64usize, options(nostack),
            );
        } else {
            std::arch::asm!(
                "tilezero tmm0",
                "tileloadd tmm4, [{a} + {s32}*1]",
                "tileloadd tmm5, [{w} + {s64}*1]",
                "tdpbssd tmm0, tmm4, tmm5",
                "tilestored [{c} + {s64}*1], tmm0",
                a = in(reg) a, w = in(reg) w, c = in(reg) cp,
                s32 = in(reg) 32usize, s64 = in(reg) 64usize, options(nostack),
            );
        }
    }
}

/// Blocks of activation rows `mb` and `mb + 1` of `x` (`rows[0]` / `rows[1]` of them real)
/// with the 16 weight rows of each of `p[0]`, `p[1]`, one block at a time: each A tile and
/// each B tile feeds two `tdpbssd` (2 x 2 C tiles), half the tile loads of `rows_x_panel` per
/// output. `out(mi, pi, i, y)`: row i of block of rows `mb + mi` with panel `pi`. The float
/// part and its order per output are `rows_x_panel`'s (the same bits).
///
/// # Safety
/// As `rows_x_panel`, for both panels and both blocks of rows.
#[target_feature(enable = "avx2,f16c,avx512f,avx512bw,avx512vl")]
pub unsafe fn rows_x_panels_2x2<const MIN: bool>(
    p: [&AmxPanel; 2],
    nb: usize,
    x: &AmxX,
    mb: usize,
    rows: [usize; 2],
    mut out: impl FnMut(usize, usize, usize, &[f32; NT]),
) {
    for pp in p {
        assert!(pp.b.len() >= nb * 8 && pp.d.len() >= nb && (!MIN || pp.m.len() >= nb));
    }
    assert!(rows.iter().all(|r| (1..=MT).contains(r)));
    let t0 = mb * nb;
    assert!(x.q.len() >= (t0 + 2 * nb) * 8 && x.d.len() >= (t0 + 2 * nb) * MT);
    assert!(!MIN || x.s.len() >= (t0 + 2 * nb) * MT);
    let mut c = [[ZERO; 4 * NT]; 2];
    // f[q]: quadrant q = 2 · pi + mi (the order of `issue2x2`'s C tiles).
    let mut f = [[[_mm512_setzero_ps(); NT]; LANES]; 4];
    let (xa0, xa1) = (x.q[t0 * 8..].as_ptr(), x.q[(t0 + nb) * 8..].as_ptr());
    let (w0, w1) = (p[0].b.as_ptr(), p[1].b.as_ptr());
    // SAFETY: `Tiles` configured (contract); block 0 of both blocks of rows and panels exists.
    unsafe { issue2x2(w0, w1, xa0, xa1, 0, c[0].as_mut_ptr()) };
    for b in 0..nb {
        let cur = b % 2;
        if b + 1 < nb {
            // SAFETY: as above, block b + 1 < nb.
            unsafe { issue2x2(w0, w1, xa0, xa1, b + 1, c[cur ^ 1].as_mut_ptr()) };
        }
        if b + PREFETCH < nb {
            for o in [w0, w1, xa0, xa1] {
                // SAFETY: block b + PREFETCH < nb of each operand exists; prefetches never
                // fault.
                unsafe { prefetch_block(o.add((b + PREFETCH) * 8)) };
            }
        }
        // SAFETY: blocks of rows mb, mb + 1 (and their s) exist (asserted above).
        let sc = unsafe {
            [
                act_scales::<MIN>(x, t0 + b),
                act_scales::<MIN>(x, t0 + nb + b),
            ]
        };
        for q in 0..4 {
            let (pi, mi) = (q / 2, q % 2);
            let (dx, xs) = sc[mi];
            // SAFETY: lines of `c` and of the panel in bounds (asserted above).
            unsafe {
                let cq = &c[cur][q * NT..][..NT];
                tile_float::<MIN>(cq, p[pi], b, dx, xs, &mut f[q][b % LANES]);
            }
        }
    }
    for (q, fq) in f.iter().enumerate() {
        let (pi, mi) = (q / 2, q % 2);
        // SAFETY: the features (this function's).
        unsafe { finish(fq, rows[mi], |i, y| out(mi, pi, i, y)) };
    }
}

/// The 2 x 2 integer sums of block `b`: A tiles of the two panels (`a0`, `a1`), B tiles of
/// the two blocks of activation rows (`x0`, `x1`), C tiles (p0, m0), (p0, m1), (p1, m0),
/// (p1, m1) stored to `cp` (1 KiB each).
///
/// # Safety
/// A live `Tiles` on this thread; the four operands hold block b (8 lines each); `cp` has
/// room for 4 KiB.
#[inline(always)]
unsafe fn issue2x2(
    a0: *const Zmm,
    a1: *const Zmm,
    x0: *const Zmm,
    x1: *const Zmm,
    b: usize,
    cp: *mut Zmm,
) {
    // SAFETY: the contract: A tiles (tmm4, tmm6) read 512 contiguous bytes (stride 32), B
    // tiles (tmm5, tmm7) 512 bytes (stride 64), C tiles write 1 KiB each at `cp`.
    unsafe {
        std::arch::asm!(
            "tilezero tmm0",
            "tilezero tmm1",
            "tilezero tmm2",
            "tilezero tmm3",
            "tileloadd tmm4, [{a0} + {s32}*1]",
            "tileloadd tmm5, [{x0} + {s64}*1]",
            "tdpbssd tmm0, tmm4, tmm5",
            "tileloadd tmm7, [{x1} + {s64}*1]",
            "tdpbssd tmm1, tmm4, tmm7",
            "tileloadd tmm6, [{a1} + {s32}*1]",
            "tdpbssd tmm2, tmm6, tmm5",
            "tdpbssd tmm3, tmm6, tmm7",
            "tilestored [{c} + {s64}*1], tmm0",
            "tilestored [{c} + {s64}*1 + 1024], tmm1",
            "tilestored [{c} + {s64}*1 + 2048], tmm2",
            "tilestored [{c} + {s64}*1 + 3072], tmm3",
            a0 = in(reg) a0.add(b * 8), a1 = in(reg) a1.add(b * 8),
            x0 = in(reg) x0.add(b * 8), x1 = in(reg) x1.add(b * 8), c = in(reg) cp,
            s32 = in(reg) 32usize, s64 = in(reg) 64usize, options(nostack),
        );
    }
}
