//! The NEON GEMM kernels of the 32-weight formats (q4_0, q5_0, q8_0, iq4_nl against q8_0
//! activations; q4_1, q5_1 against q8_1), driven by `matmul/gemm_neon.rs`: a panel of `PANEL`
//! weight rows times a chunk of `KC` blocks is decoded once into an L1 buffer (`decode`: signed
//! bytes in the layout of the integer kind, the scales as f32), then every tile of up to `TILE`
//! activation rows passes it (`chunk_sdot`, `chunk_i8mm`).
//!
//! Two integer kinds:
//! - `sdot` by element (`dotprod`): the weights of 4 rows x 4 consecutive elements in one
//!   register, 4 elements of one activation row broadcast from a lane (`sdot v.4s, w.16b,
//!   x.4b[i]`); a tile of 8 weight rows x 4 activation rows is 8 i32 registers, 64 `sdot` a block
//!   of 32 (16 multiply-adds each).
//! - `smmla` (`i8mm`): 2 weight rows x 8 elements against 2 activation rows x 8 elements, a 2 x 2
//!   block of i32 sums (32 multiply-adds); the same tile is 8 registers, 32 `smmla` a block.
//!
//! Bits. Every block's integer sum is exact (|w·x| <= 128·128, 32 of them fit in i32), whatever
//! the order. The float part is the reference's (`reference::block32_product`,
//! `block32_min_product`): `p = (d_w * d_x) * float(isum)` [`+ m_w * s_x`] with separate
//! multiplies and adds, and `lane[b % 8] += p` for the blocks of each lane in increasing order.
//! The kernels walk a chunk lane by lane (blocks l, l + 8, ... of the chunk, whose first block
//! is a multiple of 8), so each lane's float accumulators stay in registers through the chunk
//! and its additions keep the reference's order; the lanes meet only in `hsum8`, at the end.

use std::arch::aarch64::*;
use std::arch::asm;

use super::{f16x8_to_f32, load_i8, Load32};
use crate::formats::blocks::BlockQ8_0;
use crate::matmul::reference::LANES;

/// Weight rows of a panel.
pub const PANEL: usize = 8;
/// Activation rows of one kernel call (the i32 sums of a tile: 8 registers).
pub const TILE: usize = 4;
/// Blocks of 32 of one chunk of K (a multiple of `LANES`): the decoded panel chunk is 8 KiB of
/// quants and 2 KiB of scales, in L1 while the tiles pass.
pub const KC: usize = 32;
/// Decoded bytes of one block of the panel (8 rows x 32 quants).
const BLOCK_BYTES: usize = 32 * PANEL;
/// Decoded f32 scales of one block of the panel (each row's twice for `smmla`'s 2 x 2 sums).
const BLOCK_SCALES: usize = 2 * PANEL;

const _: () = assert!(KC.is_multiple_of(LANES));

/// The integer product of the kernels.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NeonDot {
    /// `sdot` by element (Armv8.2 `dotprod`).
    Sdot,
    /// `smmla` (Armv8.6 `i8mm`).
    I8mm,
}

impl NeonDot {
    /// The best product this CPU has (`cpu::has_i8mm`, `has_dotprod`, both honouring
    /// FERROQUANT_FORCE_SCALAR and FERROQUANT_MAX_ISA), or `None` (the row kernels run).
    pub fn detect() -> Option<Self> {
        if crate::cpu::has_i8mm() {
            Some(NeonDot::I8mm)
        } else if crate::cpu::has_dotprod() {
            Some(NeonDot::Sdot)
        } else {
            None
        }
    }
}

/// One panel chunk, decoded (per thread, reused across calls).
#[derive(Default)]
pub struct PanelBuf {
    q: Vec<i8>,
    d: Vec<f32>,
    m: Vec<f32>,
}

/// The float lanes of one tile: per lane (block % 8), 8 vectors of 4 sums; which (weight row,
/// activation row) sits where depends on the kind (`lanes`).
pub type TileAcc = [[[f32; 4]; 8]; LANES];

/// The activation rows of one tile from the chunk's first block on: quants, scales (d as f32)
/// and, for q8_1, `s` as f32 (empty for q8_0). Rows past the tile's count repeat its last row.
#[derive(Clone, Copy)]
pub struct XTile<'a> {
    pub q: [&'a [BlockQ8_0]; TILE],
    pub d: [&'a [f32]; TILE],
    pub s: [&'a [f32]; TILE],
}

/// The 8 float lanes of weight row `n` (0..PANEL) with activation row `j` (0..TILE) of a tile.
pub fn lanes(dot: NeonDot, acc: &TileAcc, n: usize, j: usize) -> [f32; LANES] {
    let (v, e) = match dot {
        // row j's two registers, rows 0..3 then 4..7
        NeonDot::Sdot => (2 * j + n / 4, n % 4),
        // pair of weight rows n / 2, pair of activation rows j / 2: [w0x0, w0x1, w1x0, w1x1]
        NeonDot::I8mm => (2 * (n / 2) + j / 2, 2 * (n % 2) + j % 2),
    };
    std::array::from_fn(|l| acc[l][v][e])
}

/// `cb` blocks from block `c0` of each weight row of the panel (`np` rows; the rest decode as
/// zeros) into `buf`, in `dot`'s layout.
pub fn decode<W: Load32>(
    dot: NeonDot,
    w: &[&[W]; PANEL],
    np: usize,
    c0: usize,
    cb: usize,
    buf: &mut PanelBuf,
) {
    assert!(cb <= KC && np <= PANEL);
    buf.q.resize(KC * BLOCK_BYTES, 0);
    buf.d.resize(KC * BLOCK_SCALES, 0.0);
    buf.m.resize(KC * BLOCK_SCALES, 0.0);
    // (the bounds checked once here, not per block and row)
    let rows: [&[W]; PANEL] =
        std::array::from_fn(|i| if i < np { &w[i][c0..c0 + cb] } else { &[] });
    match (dot, np == PANEL) {
        (NeonDot::Sdot, true) => decode_rows::<W, false, true>(&rows, np, cb, buf),
        (NeonDot::Sdot, false) => decode_rows::<W, false, false>(&rows, np, cb, buf),
        (NeonDot::I8mm, true) => decode_rows::<W, true, true>(&rows, np, cb, buf),
        (NeonDot::I8mm, false) => decode_rows::<W, true, false>(&rows, np, cb, buf),
    }
}

/// `decode` for `smmla`'s layout (`MM`) or `sdot`'s, a full panel (`FULL`, np = PANEL: the
/// row loop unrolled, the rows in registers) or not. `rows[i]` has `cb` blocks for i < np.
// (index loops over parallel arrays, unrolled)
#[allow(clippy::needless_range_loop)]
#[inline(always)]
fn decode_rows<W: Load32, const MM: bool, const FULL: bool>(
    rows: &[&[W]; PANEL],
    np: usize,
    cb: usize,
    buf: &mut PanelBuf,
) {
    assert!(cb <= KC && buf.q.len() >= KC * BLOCK_BYTES);
    assert!(buf.d.len() >= KC * BLOCK_SCALES && buf.m.len() >= KC * BLOCK_SCALES);
    assert!((0..np).all(|i| rows[i].len() >= cb));
    let np = if FULL { PANEL } else { np };
    let q = buf.q.as_mut_ptr();
    // SAFETY: NEON is baseline on aarch64 (`neon.rs`); `rows[i][b]` for i < np, b < cb is in
    // bounds (asserted above); every store writes 16 bytes at an offset of at most 240 into
    // block b's 256 (b < cb <= KC blocks of the buffer, asserted).
    unsafe {
        let zero = vdupq_n_s8(0);
        for b in 0..cb {
            let mut v = [[zero; 2]; PANEL];
            let (mut dh, mut mh) = ([0u16; PANEL], [0u16; PANEL]);
            for i in 0..np {
                let blk = rows.get_unchecked(i).get_unchecked(b);
                v[i] = blk.load();
                dh[i] = u16::from_le_bytes(blk.d());
                if W::HAS_MIN {
                    mh[i] = u16::from_le_bytes(blk.m());
                }
            }
            let o = q.add(b * BLOCK_BYTES);
            if MM {
                // Step s (8 elements) of half h, pair p: [row 2p: 8 bytes, row 2p + 1].
                for p in 0..PANEL / 2 {
                    for h in 0..2 {
                        let a = vreinterpretq_s64_s8(v[2 * p][h]);
                        let c = vreinterpretq_s64_s8(v[2 * p + 1][h]);
                        vst1q_s8(
                            o.add((8 * h + p) * 16),
                            vreinterpretq_s8_s64(vzip1q_s64(a, c)),
                        );
                        vst1q_s8(
                            o.add((8 * h + 4 + p) * 16),
                            vreinterpretq_s8_s64(vzip2q_s64(a, c)),
                        );
                    }
                }
            } else {
                // Step s (4 elements) of half h: [rows 0..3: 4 bytes each], [rows 4..7]: a
                // 4 x 4 transpose of 32-bit words.
                for g in 0..2 {
                    for h in 0..2 {
                        let r = [
                            vreinterpretq_s32_s8(v[4 * g][h]),
                            vreinterpretq_s32_s8(v[4 * g + 1][h]),
                            vreinterpretq_s32_s8(v[4 * g + 2][h]),
                            vreinterpretq_s32_s8(v[4 * g + 3][h]),
                        ];
                        let t0 = vreinterpretq_s64_s32(vzip1q_s32(r[0], r[1]));
                        let t1 = vreinterpretq_s64_s32(vzip2q_s32(r[0], r[1]));
                        let t2 = vreinterpretq_s64_s32(vzip1q_s32(r[2], r[3]));
                        let t3 = vreinterpretq_s64_s32(vzip2q_s32(r[2], r[3]));
                        let t = [
                            vzip1q_s64(t0, t2),
                            vzip2q_s64(t0, t2),
                            vzip1q_s64(t1, t3),
                            vzip2q_s64(t1, t3),
                        ];
                        for (s, t) in t.into_iter().enumerate() {
                            vst1q_s8(o.add((4 * h + s) * 32 + 16 * g), vreinterpretq_s8_s64(t));
                        }
                    }
                }
            }
            let dot = if MM { NeonDot::I8mm } else { NeonDot::Sdot };
            scales(
                dot,
                &dh,
                &mut buf.d[b * BLOCK_SCALES..(b + 1) * BLOCK_SCALES],
            );
            if W::HAS_MIN {
                scales(
                    dot,
                    &mh,
                    &mut buf.m[b * BLOCK_SCALES..(b + 1) * BLOCK_SCALES],
                );
            }
        }
    }
}

/// The 8 rows' f16 scales (or mins) of one block as f32 in `dot`'s layout.
#[inline(always)]
fn scales(dot: NeonDot, h: &[u16; PANEL], o: &mut [f32]) {
    let v = f16x8_to_f32(h);
    let mut st = |off: usize, v: float32x4_t| {
        assert!(off + 4 <= o.len());
        // SAFETY: NEON (baseline); 4 f32 inside `o` (checked).
        unsafe { vst1q_f32(o.as_mut_ptr().add(off), v) }
    };
    // SAFETY: NEON (baseline); no memory is touched.
    unsafe {
        match dot {
            NeonDot::Sdot => {
                st(0, v[0]);
                st(4, v[1]);
            }
            NeonDot::I8mm => {
                // [d0 d0 d1 d1], [d2 d2 d3 d3], ...: the weight rows of smmla's lanes
                st(0, vzip1q_f32(v[0], v[0]));
                st(4, vzip2q_f32(v[0], v[0]));
                st(8, vzip1q_f32(v[1], v[1]));
                st(12, vzip2q_f32(v[1], v[1]));
            }
        }
    }
}

/// `acc + Σ_t w[4e + t] · x[4I + t]` in lane e (`sdot acc.4s, w.16b, x.4b[I]`).
///
/// # Safety
/// The CPU must have `dotprod`; only inlined into functions compiled with it.
#[inline(always)]
pub(super) unsafe fn sdot_lane<const I: usize>(
    mut acc: int32x4_t,
    w: int8x16_t,
    x: int8x16_t,
) -> int32x4_t {
    // SAFETY: `sdot` reads three vector registers and writes the first; no memory, stack or
    // flags; the caller guarantees dotprod.
    unsafe {
        asm!(
            "sdot {acc:v}.4s, {w:v}.16b, {x:v}.4b[{i}]",
            acc = inout(vreg) acc,
            w = in(vreg) w,
            x = in(vreg) x,
            i = const I,
            options(pure, nomem, nostack, preserves_flags)
        );
    }
    acc
}

/// `acc + W · Xᵀ` for W, X two rows of 8 bytes each: lane 2i + j gets row i of `w` times row j
/// of `x` (`smmla acc.4s, w.16b, x.16b`).
///
/// # Safety
/// The CPU must have `i8mm`; only inlined into functions compiled with it.
#[inline(always)]
pub(super) unsafe fn smmla(mut acc: int32x4_t, w: int8x16_t, x: int8x16_t) -> int32x4_t {
    // SAFETY: as `sdot_lane`; the caller guarantees i8mm.
    unsafe {
        asm!(
            "smmla {acc:v}.4s, {w:v}.16b, {x:v}.16b",
            acc = inout(vreg) acc,
            w = in(vreg) w,
            x = in(vreg) x,
            options(pure, nomem, nostack, preserves_flags)
        );
    }
    acc
}

/// The lengths every kernel relies on (panics otherwise).
fn check(buf: &PanelBuf, cb: usize, x: &XTile<'_>, rows: usize, min: bool) {
    assert!(cb <= KC && buf.q.len() >= KC * BLOCK_BYTES && buf.d.len() >= KC * BLOCK_SCALES);
    assert!(!min || buf.m.len() >= KC * BLOCK_SCALES);
    for j in 0..rows {
        assert!(x.q[j].len() >= cb && x.d[j].len() >= cb && (!min || x.s[j].len() >= cb));
    }
}

/// One chunk (`cb` blocks) of the panel in `buf` against activation rows `x.q[..R]`, with
/// `sdot` by element: each lane's float sums (`acc`, rows j in vectors 2j and 2j + 1) carried
/// on by the chunk's blocks of that lane.
///
/// # Safety
/// The CPU must have `dotprod` (`cpu::has_dotprod`). Lengths are checked (panics).
// (index loops over parallel arrays: loops, not closures, stay inline with the target features)
#[allow(clippy::needless_range_loop)]
#[target_feature(enable = "neon,dotprod")]
pub unsafe fn chunk_sdot<const R: usize, const MIN: bool>(
    buf: &PanelBuf,
    cb: usize,
    x: &XTile<'_>,
    acc: &mut TileAcc,
) {
    check(buf, cb, x, R, MIN);
    let (wq, wd, wm) = (buf.q.as_ptr(), buf.d.as_ptr(), buf.m.as_ptr());
    // SAFETY: NEON is baseline and dotprod is this function's contract; the buffer reads stay
    // inside the decoded KC blocks (`check`: b < cb <= KC) and the activation reads inside the
    // first cb blocks of each row (`check`).
    unsafe {
        let zero = vdupq_n_s32(0);
        for (l, a) in acc.iter_mut().enumerate().take(cb.min(LANES)) {
            let mut f = [[vdupq_n_f32(0.0); 2]; R];
            for j in 0..R {
                f[j] = [
                    vld1q_f32(a[2 * j].as_ptr()),
                    vld1q_f32(a[2 * j + 1].as_ptr()),
                ];
            }
            let mut b = l;
            while b < cb {
                let w = wq.add(b * BLOCK_BYTES);
                let mut s = [[zero; 2]; R];
                for h in 0..2 {
                    let mut xv = [vdupq_n_s8(0); R];
                    for j in 0..R {
                        xv[j] = load_i8(&x.q[j][b].qs[16 * h..]);
                    }
                    macro_rules! step {
                        ($i:literal) => {{
                            let w0 = vld1q_s8(w.add((4 * h + $i) * 32));
                            let w1 = vld1q_s8(w.add((4 * h + $i) * 32 + 16));
                            for j in 0..R {
                                s[j][0] = sdot_lane::<$i>(s[j][0], w0, xv[j]);
                                s[j][1] = sdot_lane::<$i>(s[j][1], w1, xv[j]);
                            }
                        }};
                    }
                    step!(0);
                    step!(1);
                    step!(2);
                    step!(3);
                }
                let dw = [
                    vld1q_f32(wd.add(b * BLOCK_SCALES)),
                    vld1q_f32(wd.add(b * BLOCK_SCALES + 4)),
                ];
                let mw = if MIN {
                    [
                        vld1q_f32(wm.add(b * BLOCK_SCALES)),
                        vld1q_f32(wm.add(b * BLOCK_SCALES + 4)),
                    ]
                } else {
                    dw
                };
                for j in 0..R {
                    let dx = x.d[j][b];
                    for v in 0..2 {
                        // (d_w * d_x) * isum [+ m_w * s_x], then the lane's add
                        let mut p = vmulq_f32(vmulq_n_f32(dw[v], dx), vcvtq_f32_s32(s[j][v]));
                        if MIN {
                            p = vaddq_f32(p, vmulq_n_f32(mw[v], x.s[j][b]));
                        }
                        f[j][v] = vaddq_f32(f[j][v], p);
                    }
                }
                b += LANES;
            }
            for j in 0..R {
                vst1q_f32(a[2 * j].as_mut_ptr(), f[j][0]);
                vst1q_f32(a[2 * j + 1].as_mut_ptr(), f[j][1]);
            }
        }
    }
}

/// `chunk_sdot` with `smmla`: activation rows in `P` pairs (rows 2q, 2q + 1; `x` repeats its
/// last row where the tile has an odd count), pair q with weight pair p in vector 2p + q.
///
/// # Safety
/// The CPU must have `i8mm` (`cpu::has_i8mm`). Lengths are checked (panics).
// (index loops over parallel arrays: loops, not closures, stay inline with the target features)
#[allow(clippy::needless_range_loop)]
#[target_feature(enable = "neon,dotprod,i8mm")]
pub unsafe fn chunk_i8mm<const P: usize, const MIN: bool>(
    buf: &PanelBuf,
    cb: usize,
    x: &XTile<'_>,
    acc: &mut TileAcc,
) {
    check(buf, cb, x, 2 * P, MIN);
    let (wq, wd, wm) = (buf.q.as_ptr(), buf.d.as_ptr(), buf.m.as_ptr());
    // SAFETY: as in `chunk_sdot`, with i8mm this function's contract.
    unsafe {
        let zero = vdupq_n_s32(0);
        for (l, a) in acc.iter_mut().enumerate().take(cb.min(LANES)) {
            let mut f = [[vdupq_n_f32(0.0); P]; 4];
            for (p, fp) in f.iter_mut().enumerate() {
                for q in 0..P {
                    fp[q] = vld1q_f32(a[2 * p + q].as_ptr());
                }
            }
            let mut b = l;
            while b < cb {
                let w = wq.add(b * BLOCK_BYTES);
                let mut s = [[zero; P]; 4];
                for h in 0..2 {
                    let mut xz = [[vdupq_n_s8(0); 2]; P];
                    for q in 0..P {
                        let r0 = vreinterpretq_s64_s8(load_i8(&x.q[2 * q][b].qs[16 * h..]));
                        let r1 = vreinterpretq_s64_s8(load_i8(&x.q[2 * q + 1][b].qs[16 * h..]));
                        xz[q] = [
                            vreinterpretq_s8_s64(vzip1q_s64(r0, r1)),
                            vreinterpretq_s8_s64(vzip2q_s64(r0, r1)),
                        ];
                    }
                    for t in 0..2 {
                        for (p, sp) in s.iter_mut().enumerate() {
                            let wv = vld1q_s8(w.add(((2 * h + t) * 4 + p) * 16));
                            for q in 0..P {
                                sp[q] = smmla(sp[q], wv, xz[q][t]);
                            }
                        }
                    }
                }
                let mut dx = [vdupq_n_f32(0.0); P];
                let mut sx = [vdupq_n_f32(0.0); P];
                for q in 0..P {
                    // [x0 x1 x0 x1]: the activation rows of smmla's lanes
                    let pair = |v: [&[f32]; TILE]| {
                        vzip1q_f32(vdupq_n_f32(v[2 * q][b]), vdupq_n_f32(v[2 * q + 1][b]))
                    };
                    dx[q] = pair(x.d);
                    if MIN {
                        sx[q] = pair(x.s);
                    }
                }
                for (p, (fp, sp)) in f.iter_mut().zip(&s).enumerate() {
                    let dw = vld1q_f32(wd.add(b * BLOCK_SCALES + 4 * p));
                    let mw = if MIN {
                        vld1q_f32(wm.add(b * BLOCK_SCALES + 4 * p))
                    } else {
                        dw
                    };
                    for q in 0..P {
                        let mut v = vmulq_f32(vmulq_f32(dw, dx[q]), vcvtq_f32_s32(sp[q]));
                        if MIN {
                            v = vaddq_f32(v, vmulq_f32(mw, sx[q]));
                        }
                        fp[q] = vaddq_f32(fp[q], v);
                    }
                }
                b += LANES;
            }
            for (p, fp) in f.iter().enumerate() {
                for q in 0..P {
                    vst1q_f32(a[2 * p + q].as_mut_ptr(), fp[q]);
                }
            }
        }
    }
}
