//! The AMX int8 GEMM microkernel of the 32-weight formats (q4_0, q5_0, q8_0, iq4_nl, q4_1,
//! q5_1): a panel of 16 weight rows is decoded once into the B-tile layout of `tdpbssd`
//! (per block of 32 weights, 8 rows of 64 bytes: row k of block b holds weights `4k..4k + 4`
//! of each of the 16 weight rows, 4 bytes each: two 8 x 8 dword transposes of the rows'
//! `Load32::load`), then blocks of 16 activation rows (`AmxX`: packed once per call, the
//! last block padded with zero rows) pass it: two blocks of rows by two panels a block of K at
//! a time (`rows_x_panels_2x2`: each A and B tile feeds two `tdpbssd`, 4 C tiles), or one by
//! one 4 blocks of K at a time (`rows_x_panel`, for an odd block of rows or panel out), each
//! C tile the 16 x 16 exact integer sums of one block, stored to L1 while the float part
//! (AVX-512) of the previous step runs.
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

use super::tile::transpose8;
use super::Load32;
use crate::amx::{tile_config, tile_release, TileConfig};
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

/// The activations of a call packed for the A tiles: per block of 16 rows (the last padded
/// with zero rows) and block b, 16 rows of the block's 32 quants (512 bytes, 8 lines) at
/// `q[(mb · nb + b) · 8..]`, their scales at `d[(mb · nb + b) · 16..]` (and `s`, q8_1's).
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
                let line = &mut x.q[t * 8 + i / 2].0;
                line[32 * (i % 2)..][..32].copy_from_slice(q);
                x.d[t * MT + i] = d[r * nb + b];
                if !s.is_empty() {
                    x.s[t * MT + i] = s[r * nb + b];
                }
            }
        }
        x
    }
}

/// One decoded panel: `b` the B tiles of every block (`nb · 8` lines), `d` / `m` each block's
/// 16 weight scales / offsets as f32 (`nb` lines).
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
    /// AVX2 and F16C (`amx::amx_int8_usable` implies them); every `w[n]` has `nb` blocks.
    #[target_feature(enable = "avx2,f16c")]
    #[allow(clippy::needless_range_loop)] // b indexes the 16 rows at once
    pub unsafe fn decode<W: Load32>(&mut self, w: [&[W]; NT], nb: usize) {
        self.b.resize(nb * 8, ZERO);
        self.d.resize(nb, ZERO);
        self.m.resize(nb, ZERO);
        for b in 0..nb {
            for h in 0..2 {
                let mut v = [_mm256_setzero_si256(); 8];
                for (n, vn) in v.iter_mut().enumerate() {
                    // SAFETY: AVX2 (contract); block b of each row exists (contract).
                    *vn = unsafe { w[8 * h + n][b].load() };
                }
                // Output k, lane n: row 8h + n's dword k (weights 4k..4k + 4): B row k.
                let t = transpose8(v);
                for (k, tk) in t.iter().enumerate() {
                    let line = self.b[b * 8 + k].0[32 * h..].as_mut_ptr() as *mut __m256i;
                    // SAFETY: 32 bytes inside line b · 8 + k (resized above).
                    unsafe { _mm256_storeu_si256(line, *tk) };
                }
            }
            for (n, wn) in w.iter().enumerate() {
                let blk = &wn[b];
                self.d[b].0[4 * n..4 * n + 4].copy_from_slice(&f16_to_f32(blk.d()).to_ne_bytes());
                if W::HAS_MIN {
                    let m = f16_to_f32(blk.m()).to_ne_bytes();
                    self.m[b].0[4 * n..4 * n + 4].copy_from_slice(&m);
                }
            }
        }
    }
}

/// The tile unit configured for the kernel: tmm0..tmm3 C tiles (16 x 16 i32), tmm4 / tmm6 A
/// tiles (16 rows x 32 bytes: one block of 16 activation rows), tmm5 / tmm7 B tiles (8 x 64
/// bytes). Released on drop (on this thread), so no tile state outlives the kernel.
pub struct Tiles(());

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
        unsafe { tile_config(&cfg) };
        Tiles(())
    }
}

impl Drop for Tiles {
    fn drop(&mut self) {
        // SAFETY: a `Tiles` exists only after `tile_config` succeeded under `amx_int8_usable`.
        unsafe { tile_release() };
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
#[allow(clippy::needless_range_loop)] // i indexes the 8 lanes' accumulators at once
pub unsafe fn rows_x_panel<const MIN: bool>(
    p: &AmxPanel,
    nb: usize,
    x: &AmxX,
    mb: usize,
    rows: usize,
    mut out: impl FnMut(usize, &[f32; NT]),
) {
    assert!((1..=MT).contains(&rows) && p.b.len() >= nb * 8 && p.d.len() >= nb);
    let t0 = mb * nb;
    assert!(x.q.len() >= (t0 + nb) * 8 && x.d.len() >= (t0 + nb) * MT);
    assert!(!MIN || (x.s.len() >= (t0 + nb) * MT && p.m.len() >= nb));
    // Two buffers of STEP C tiles: the tiles of the next step are multiplied and stored
    // while the float part of this one runs (it reads the other buffer).
    let mut c = [[ZERO; STEP * MT]; 2];
    let mut f = [[_mm512_setzero_ps(); MT]; LANES];
    let xq = x.q[t0 * 8..].as_ptr();
    let bq = p.b.as_ptr();
    let width = |b: usize| if b + STEP <= nb { STEP } else { 1 };
    let mut b = 0;
    let mut n = width(0);
    // SAFETY: `Tiles` configured (contract); blocks 0..n exist (n <= nb).
    unsafe { issue(xq, bq, 0, n, c[0].as_mut_ptr()) };
    let mut cur = 0;
    while b < nb {
        let next = b + n;
        let nn = if next < nb { width(next) } else { 0 };
        if nn > 0 {
            // SAFETY: as above, blocks next..next + nn <= nb.
            unsafe { issue(xq, bq, next, nn, c[cur ^ 1].as_mut_ptr()) };
        }
        let cb = &c[cur];
        for j in 0..n {
            let bj = b + j;
            // SAFETY: line bj of d (and m), 64-byte aligned (asserted in bounds above).
            let dw = unsafe { _mm512_load_ps(p.d[bj].0.as_ptr() as *const f32) };
            let mw = if MIN {
                // SAFETY: as above.
                unsafe { _mm512_load_ps(p.m[bj].0.as_ptr() as *const f32) }
            } else {
                _mm512_setzero_ps()
            };
            let xd = &x.d[(t0 + bj) * MT..][..MT];
            let fl = &mut f[bj % LANES];
            for i in 0..rows {
                // SAFETY: a 64-byte aligned line of `c`.
                let ci = unsafe { _mm512_load_si512(cb[j * MT + i].0.as_ptr() as _) };
                let dx = _mm512_set1_ps(xd[i]);
                let mut prod = _mm512_mul_ps(_mm512_mul_ps(dw, dx), _mm512_cvtepi32_ps(ci));
                if MIN {
                    let xs = _mm512_set1_ps(x.s[(t0 + bj) * MT + i]);
                    prod = _mm512_add_ps(prod, _mm512_mul_ps(mw, xs));
                }
                fl[i] = _mm512_add_ps(fl[i], prod);
            }
        }
        b = next;
        n = nn;
        cur ^= 1;
    }
    for i in 0..rows {
        // hsum8: s_l = a_l + a_{l+4}, then (s0 + s2) + (s1 + s3), 16 outputs at once.
        let s0 = _mm512_add_ps(f[0][i], f[4][i]);
        let s1 = _mm512_add_ps(f[1][i], f[5][i]);
        let s2 = _mm512_add_ps(f[2][i], f[6][i]);
        let s3 = _mm512_add_ps(f[3][i], f[7][i]);
        let y = _mm512_add_ps(_mm512_add_ps(s0, s2), _mm512_add_ps(s1, s3));
        let mut v = [0.0f32; NT];
        // SAFETY: 16 f32 of room.
        unsafe { _mm512_storeu_ps(v.as_mut_ptr(), y) };
        out(i, &v);
    }
}

/// The integer sums of blocks `b..b + n` (n = STEP or 1) of the packed activation rows at `xq`
/// with the panel's B tiles at `bq`, one C tile each, stored to `cp` (1 KiB a block).
///
/// # Safety
/// A live `Tiles` on this thread; `xq` / `bq` hold blocks `b..b + n` (8 lines each); `cp` has
/// room for `n` KiB.
#[inline(always)]
unsafe fn issue(xq: *const Zmm, bq: *const Zmm, b: usize, n: usize, cp: *mut Zmm) {
    // SAFETY: the contract: A tiles read 512 contiguous bytes (stride 32) of each block's 16
    // packed rows, B tiles its 512 bytes (stride 64), C tiles write 1 KiB each at `cp`.
    unsafe {
        let (a, w) = (xq.add(b * 8), bq.add(b * 8));
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
#[allow(clippy::needless_range_loop)] // q, i index several arrays at once
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
    let mut c = [[ZERO; 4 * MT]; 2];
    // f[q]: quadrant q = 2 · mi + pi.
    let mut f = [[[_mm512_setzero_ps(); MT]; LANES]; 4];
    let (xa0, xa1) = (x.q[t0 * 8..].as_ptr(), x.q[(t0 + nb) * 8..].as_ptr());
    let (w0, w1) = (p[0].b.as_ptr(), p[1].b.as_ptr());
    // SAFETY: `Tiles` configured (contract); block 0 of both blocks of rows and panels exists.
    unsafe { issue2x2(xa0, xa1, w0, w1, 0, c[0].as_mut_ptr()) };
    for b in 0..nb {
        let cur = b % 2;
        if b + 1 < nb {
            // SAFETY: as above, block b + 1 < nb.
            unsafe { issue2x2(xa0, xa1, w0, w1, b + 1, c[cur ^ 1].as_mut_ptr()) };
        }
        let cb = &c[cur];
        for q in 0..4 {
            let (mi, pi) = (q / 2, q % 2);
            // SAFETY: line b of the panel's d (and m), 64-byte aligned (asserted above).
            let dw = unsafe { _mm512_load_ps(p[pi].d[b].0.as_ptr() as *const f32) };
            let mw = if MIN {
                // SAFETY: as above.
                unsafe { _mm512_load_ps(p[pi].m[b].0.as_ptr() as *const f32) }
            } else {
                _mm512_setzero_ps()
            };
            let t = t0 + mi * nb + b;
            let xd = &x.d[t * MT..][..MT];
            let fl = &mut f[q][b % LANES];
            for i in 0..rows[mi] {
                // SAFETY: a 64-byte aligned line of `c`.
                let ci = unsafe { _mm512_load_si512(cb[q * MT + i].0.as_ptr() as _) };
                let dx = _mm512_set1_ps(xd[i]);
                let mut prod = _mm512_mul_ps(_mm512_mul_ps(dw, dx), _mm512_cvtepi32_ps(ci));
                if MIN {
                    let xs = _mm512_set1_ps(x.s[t * MT + i]);
                    prod = _mm512_add_ps(prod, _mm512_mul_ps(mw, xs));
                }
                fl[i] = _mm512_add_ps(fl[i], prod);
            }
        }
    }
    for q in 0..4 {
        let (mi, pi) = (q / 2, q % 2);
        let fq = &f[q];
        for i in 0..rows[mi] {
            // hsum8, as `rows_x_panel`.
            let s0 = _mm512_add_ps(fq[0][i], fq[4][i]);
            let s1 = _mm512_add_ps(fq[1][i], fq[5][i]);
            let s2 = _mm512_add_ps(fq[2][i], fq[6][i]);
            let s3 = _mm512_add_ps(fq[3][i], fq[7][i]);
            let y = _mm512_add_ps(_mm512_add_ps(s0, s2), _mm512_add_ps(s1, s3));
            let mut v = [0.0f32; NT];
            // SAFETY: 16 f32 of room.
            unsafe { _mm512_storeu_ps(v.as_mut_ptr(), y) };
            out(mi, pi, i, &v);
        }
    }
}

/// The 2 x 2 integer sums of block `b`: A tiles of the two blocks of rows (`xa0`, `xa1`), B
/// tiles of the two panels (`w0`, `w1`), C tiles (m0, p0), (m0, p1), (m1, p0), (m1, p1)
/// stored to `cp` (1 KiB each).
///
/// # Safety
/// A live `Tiles` on this thread; the four operands hold block b (8 lines each); `cp` has
/// room for 4 KiB.
#[inline(always)]
unsafe fn issue2x2(
    xa0: *const Zmm,
    xa1: *const Zmm,
    w0: *const Zmm,
    w1: *const Zmm,
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
            "tileloadd tmm5, [{w0} + {s64}*1]",
            "tdpbssd tmm0, tmm4, tmm5",
            "tileloadd tmm7, [{w1} + {s64}*1]",
            "tdpbssd tmm1, tmm4, tmm7",
            "tileloadd tmm6, [{a1} + {s32}*1]",
            "tdpbssd tmm2, tmm6, tmm5",
            "tdpbssd tmm3, tmm6, tmm7",
            "tilestored [{c} + {s64}*1], tmm0",
            "tilestored [{c} + {s64}*1 + 1024], tmm1",
            "tilestored [{c} + {s64}*1 + 2048], tmm2",
            "tilestored [{c} + {s64}*1 + 3072], tmm3",
            a0 = in(reg) xa0.add(b * 8), a1 = in(reg) xa1.add(b * 8),
            w0 = in(reg) w0.add(b * 8), w1 = in(reg) w1.add(b * 8), c = in(reg) cp,
            s32 = in(reg) 32usize, s64 = in(reg) 64usize, options(nostack),
        );
    }
}
