//! The NEON GEMM kernels of the K-quants (q2_k, q3_k, q4_k, q5_k, q6_k, iq4_xs against q8_K
//! activations), driven by `matmul/gemm_neon_k.rs`: the super-blocks of a panel of `PANEL`
//! weight rows are decoded once per chunk of `KC` super-blocks into an L1 buffer (`decode`:
//! each row through the row kernels' `DecodeK`, so the quants are signed bytes, then laid out
//! for the integer kind as in `gemm.rs`; the group scales, the mins and d / dmin per row),
//! then every tile of up to `TILE` activation rows passes it (`chunk_sdot`, `chunk_i8mm`).
//!
//! Bits. Per super-block and (weight row, activation row) the kernels form the reference's two
//! integers: `isum = Σ_g scale_g · Σ_{e in g} q_e x_e` (groups of 16 or, `PER32`, 32 elements;
//! the products exact whatever the order) and `msum = Σ_g min_g · bsum_g` (`MIN`; for the
//! formats with one min per 32 elements, q4_k / q5_k, over the sums of the two bsums of a
//! group, the same integer; zero for the formats without mins). The float part is
//! `reference::block_k_product` lane-wise, `(d·xd)·isum - (dmin·xd)·msum` with separate
//! multiplies and subtractions (dmin = 0 for the formats without a min, as in the reference),
//! added to float lane `b % 8` of the output in increasing super-block order; the lanes meet
//! in `hsum8` at the end. So every output has the reference's bits, whatever the panel, the
//! tile, the chunking or the thread count.

use std::arch::aarch64::*;

use super::gemm::{sdot_lane, smmla, NeonDot, TileAcc, PANEL, TILE};
use super::{f16x8_to_f32, load_i8, DecodeK};
use crate::formats::blocks::*;
use crate::matmul::reference::{BlockQ8K, LANES};

/// Super-blocks of one chunk of K: the decoded panel chunk (8 x 3.1 KiB) stays in L1 while the
/// tiles pass.
pub const KC: usize = 8;
/// Decoded bytes of one super-block of the panel (8 rows x 256 quants).
const SB_BYTES: usize = QK_K * PANEL;

/// A K-quant the GEMM takes: the group size of its scales and whether it has mins (checked
/// against `DecodeK::decode` in `decode`).
pub trait GemmK: DecodeK {
    /// One scale per 32 elements (q4_k, q5_k, iq4_xs), not per 16 (q6_k, q3_k, q2_k).
    const PER32: bool;
    /// A min term `msum` (q4_k, q5_k, q2_k).
    const MIN: bool;
    /// The f16 bits of d and dmin (0, +0.0, for the formats without a min: the value
    /// `BlockK::d_dmin` gives).
    fn d_bits(&self) -> [u16; 2];
}

impl GemmK for BlockQ4K {
    const PER32: bool = true;
    const MIN: bool = true;
    fn d_bits(&self) -> [u16; 2] {
        [u16::from_le_bytes(self.d), u16::from_le_bytes(self.dmin)]
    }
}
impl GemmK for BlockQ5K {
    const PER32: bool = true;
    const MIN: bool = true;
    fn d_bits(&self) -> [u16; 2] {
        [u16::from_le_bytes(self.d), u16::from_le_bytes(self.dmin)]
    }
}
impl GemmK for BlockQ6K {
    const PER32: bool = false;
    const MIN: bool = false;
    fn d_bits(&self) -> [u16; 2] {
        [u16::from_le_bytes(self.d), 0]
    }
}
impl GemmK for BlockQ2K {
    const PER32: bool = false;
    const MIN: bool = true;
    fn d_bits(&self) -> [u16; 2] {
        [u16::from_le_bytes(self.d), u16::from_le_bytes(self.dmin)]
    }
}
impl GemmK for BlockQ3K {
    const PER32: bool = false;
    const MIN: bool = false;
    fn d_bits(&self) -> [u16; 2] {
        [u16::from_le_bytes(self.d), 0]
    }
}
impl GemmK for BlockIQ4XS {
    const PER32: bool = true;
    const MIN: bool = false;
    fn d_bits(&self) -> [u16; 2] {
        [u16::from_le_bytes(self.d), 0]
    }
}

/// One super-block of the panel, decoded. `q`, per 16 elements c (at 128c): `sdot`'s layout,
/// step s (elements 16c + 4s..+4) of rows 0..3 at 16s, of rows 4..7 at 64 + 16s, each row's
/// 4 bytes in turn; `smmla`'s, step t (elements 16c + 8t..+8) of pair p at 32p + 16t: [row 2p:
/// 8 bytes], [row 2p + 1]. `sc[g]`, `d`, `dmin`: the rows' values in the kind's lanes
/// (`sdot`: row i at i; `smmla`: rows 2p, 2p, 2p + 1, 2p + 1 at 4p..4p + 4). `mins[g]`: row
/// i's min of group g at i (both kinds; only with `MIN`). Groups past the format's (8 with
/// `PER32`) are neither written nor read.
#[derive(Clone, Copy)]
#[repr(C, align(16))]
pub struct SbPanel {
    q: [i8; SB_BYTES],
    sc: [[i32; 16]; 16],
    mins: [[i32; PANEL]; 16],
    d: [f32; 16],
    dmin: [f32; 16],
}

impl SbPanel {
    const ZERO: SbPanel = SbPanel {
        q: [0; SB_BYTES],
        sc: [[0; 16]; 16],
        mins: [[0; PANEL]; 16],
        d: [0.0; 16],
        dmin: [0.0; 16],
    };
}

/// `cb` super-blocks from super-block `c0` of each weight row of the panel (`np` rows; the rest
/// decode as zeros) into `buf`, in `dot`'s layout.
// (index loops over parallel arrays)
#[allow(clippy::needless_range_loop)]
pub fn decode<W: GemmK>(
    dot: NeonDot,
    w: &[&[W]; PANEL],
    np: usize,
    c0: usize,
    cb: usize,
    buf: &mut Vec<SbPanel>,
) {
    assert!(cb <= KC && np <= PANEL);
    buf.resize(KC, SbPanel::ZERO);
    let groups = if W::PER32 { 8 } else { 16 };
    for (b, p) in buf.iter_mut().enumerate().take(cb) {
        let mut sc = [[0i32; 16]; PANEL];
        // SAFETY: NEON (baseline); registers only.
        let mut mins = [[unsafe { vdupq_n_s32(0) }; 4]; PANEL];
        let (mut dh, mut mh) = ([0u16; PANEL], [0u16; PANEL]);
        // SAFETY: NEON is baseline on aarch64 (`neon.rs`); `st4` writes 64 bytes at 128r + 64g
        // (r < 16, g < 2), `st2` 32 at 128r + 32p (p < 4): inside the SB_BYTES of `p.q`.
        unsafe {
            let mut v = [[vdupq_n_s8(0); 16]; PANEL];
            for i in 0..np {
                let blk = &w[i][c0 + b];
                let k = blk.decode();
                assert_eq!(k.per32, W::PER32);
                v[i] = k.q;
                sc[i] = k.scale;
                mins[i] = k.mins;
                [dh[i], mh[i]] = blk.d_bits();
            }
            let o = p.q.as_mut_ptr();
            match dot {
                NeonDot::Sdot => {
                    // register r = steps 4r..4r + 4: `st4` of 4 rows' registers writes the
                    // 4 x 4 transpose of their 32-bit words (step 4r + s of rows 4g..4g + 4
                    // at 128r + 64g + 16s)
                    for r in 0..16 {
                        for g in 0..2 {
                            let w = |i: usize| vreinterpretq_s32_s8(v[4 * g + i][r]);
                            vst4q_s32(
                                o.add(128 * r + 64 * g) as *mut i32,
                                int32x4x4_t(w(0), w(1), w(2), w(3)),
                            );
                        }
                    }
                }
                NeonDot::I8mm => {
                    // register r = steps 2r, 2r + 1: `st2` of a pair's registers puts their
                    // 8-byte halves side by side (step 2r + t of pair p at 128r + 32p + 16t)
                    for r in 0..16 {
                        for pr in 0..PANEL / 2 {
                            let a = vreinterpretq_s64_s8(v[2 * pr][r]);
                            let c = vreinterpretq_s64_s8(v[2 * pr + 1][r]);
                            vst2q_s64(o.add(128 * r + 32 * pr) as *mut i64, int64x2x2_t(a, c));
                        }
                    }
                }
            }
        }
        // the scales, mins, d and dmin of the 8 rows turned into vectors of 4 rows (4 x 4
        // transposes), in the kind's lanes
        // SAFETY: NEON (baseline); the loads read 4 i32 / f32 inside `sc[r]`, `d`, `dmin`,
        // the stores write 4 inside a row of `p.sc`, `p.mins`, `p.d`, `p.dmin`.
        unsafe {
            let (d, dmin) = (f16x8_to_f32(&dh), f16x8_to_f32(&mh));
            let put = |o: &mut [i32; 16], h: usize, t: int32x4_t| match dot {
                NeonDot::Sdot => vst1q_s32(o[4 * h..].as_mut_ptr(), t),
                NeonDot::I8mm => {
                    vst1q_s32(o[8 * h..].as_mut_ptr(), vzip1q_s32(t, t));
                    vst1q_s32(o[8 * h + 4..].as_mut_ptr(), vzip2q_s32(t, t));
                }
            };
            for h in 0..2 {
                for q in 0..groups / 4 {
                    let a: [int32x4_t; 4] =
                        std::array::from_fn(|r| vld1q_s32(sc[4 * h + r][4 * q..].as_ptr()));
                    for (c, t) in tr4(a).into_iter().enumerate() {
                        put(&mut p.sc[4 * q + c], h, t);
                    }
                }
                if W::MIN {
                    for q in 0..4 {
                        let a: [int32x4_t; 4] = std::array::from_fn(|r| mins[4 * h + r][q]);
                        for (c, t) in tr4(a).into_iter().enumerate() {
                            // (q4_k / q5_k: the min of sub-block g is that of bsums 2g and
                            // 2g + 1)
                            let e = 4 * q + c;
                            if !W::PER32 {
                                vst1q_s32(p.mins[e][4 * h..].as_mut_ptr(), t);
                            } else if e % 2 == 0 {
                                vst1q_s32(p.mins[e / 2][4 * h..].as_mut_ptr(), t);
                            }
                        }
                    }
                }
                for (src, dst) in [(&d, &mut p.d), (&dmin, &mut p.dmin)] {
                    let t = src[h];
                    match dot {
                        NeonDot::Sdot => vst1q_f32(dst[4 * h..].as_mut_ptr(), t),
                        NeonDot::I8mm => {
                            vst1q_f32(dst[8 * h..].as_mut_ptr(), vzip1q_f32(t, t));
                            vst1q_f32(dst[8 * h + 4..].as_mut_ptr(), vzip2q_f32(t, t));
                        }
                    }
                }
            }
        }
    }
}

/// The 4 x 4 transpose of 32-bit lanes: `out[c]` lane r = `a[r]` lane c.
#[inline(always)]
fn tr4(a: [int32x4_t; 4]) -> [int32x4_t; 4] {
    // SAFETY: NEON (baseline); registers only.
    unsafe {
        let t0 = vreinterpretq_s64_s32(vzip1q_s32(a[0], a[1]));
        let t1 = vreinterpretq_s64_s32(vzip2q_s32(a[0], a[1]));
        let t2 = vreinterpretq_s64_s32(vzip1q_s32(a[2], a[3]));
        let t3 = vreinterpretq_s64_s32(vzip2q_s32(a[2], a[3]));
        [
            vreinterpretq_s32_s64(vzip1q_s64(t0, t2)),
            vreinterpretq_s32_s64(vzip2q_s64(t0, t2)),
            vreinterpretq_s32_s64(vzip1q_s64(t1, t3)),
            vreinterpretq_s32_s64(vzip2q_s64(t1, t3)),
        ]
    }
}

/// The lengths every kernel relies on (panics otherwise).
fn check(buf: &[SbPanel], cb: usize, x: &[&[BlockQ8K]; TILE], rows: usize) {
    assert!(cb <= buf.len());
    for xj in &x[..rows] {
        assert!(xj.len() >= cb);
    }
}

/// `msum` of super-block `b` for activation rows `x[..R]` with the panel's rows, in `sdot`'s
/// layout (row j: rows 0..3, rows 4..7): the bsums widened to i32 (for `PER32`, each pair
/// summed: the sum of a sub-block of 32), each times its group's mins by lane.
///
/// # Safety
/// NEON (baseline); `x[j]` has block `b` for j < R (the callers' `check`).
#[inline(always)]
unsafe fn msums<const R: usize, const PER32: bool>(
    p: &SbPanel,
    x: &[&[BlockQ8K]; TILE],
    b: usize,
) -> [[int32x4_t; 2]; R] {
    /// `m + a · bs[l]` (`mla` by element; `l` a constant after unrolling).
    #[inline(always)]
    fn mla_lane(m: int32x4_t, a: int32x4_t, bs: int32x4_t, l: usize) -> int32x4_t {
        // SAFETY: NEON (baseline); registers only.
        unsafe {
            match l {
                0 => vmlaq_laneq_s32::<0>(m, a, bs),
                1 => vmlaq_laneq_s32::<1>(m, a, bs),
                2 => vmlaq_laneq_s32::<2>(m, a, bs),
                _ => vmlaq_laneq_s32::<3>(m, a, bs),
            }
        }
    }
    // SAFETY: NEON (baseline); the loads read 8 i16 inside `bsums` and 4 i32 inside
    // `p.mins[g]`.
    unsafe {
        let mut m = [[vdupq_n_s32(0); 2]; R];
        let mut bs = [[vdupq_n_s32(0); 4]; R];
        for j in 0..R {
            let v = &x[j][b].bsums;
            let (b0, b1) = (vld1q_s16(v.as_ptr()), vld1q_s16(v[8..].as_ptr()));
            bs[j] = if PER32 {
                [
                    vpaddlq_s16(b0),
                    vpaddlq_s16(b1),
                    vdupq_n_s32(0),
                    vdupq_n_s32(0),
                ]
            } else {
                [
                    vmovl_s16(vget_low_s16(b0)),
                    vmovl_high_s16(b0),
                    vmovl_s16(vget_low_s16(b1)),
                    vmovl_high_s16(b1),
                ]
            };
        }
        let groups = if PER32 { 8 } else { 16 };
        for g in 0..groups {
            let mn = [
                vld1q_s32(p.mins[g].as_ptr()),
                vld1q_s32(p.mins[g][4..].as_ptr()),
            ];
            for j in 0..R {
                for v in 0..2 {
                    m[j][v] = mla_lane(m[j][v], mn[v], bs[j][g / 4], g % 4);
                }
            }
        }
        m
    }
}

/// One chunk (`cb` super-blocks, the first being super-block `b0` of the rows) of the panel in
/// `buf` (`sdot`'s layout) against activation rows `x[..R]`, with `sdot` by element: row j's
/// float lanes in `acc[lane][2j]`, `acc[lane][2j + 1]` (weight rows 0..3, 4..7).
///
/// # Safety
/// The CPU must have `dotprod` (`cpu::has_dotprod`). Lengths are checked (panics).
// (index loops over parallel arrays: loops, not closures, stay inline with the target features)
#[allow(clippy::needless_range_loop)]
#[target_feature(enable = "neon,dotprod")]
pub unsafe fn chunk_sdot<const R: usize, const PER32: bool, const MIN: bool>(
    buf: &[SbPanel],
    cb: usize,
    b0: usize,
    x: &[&[BlockQ8K]; TILE],
    acc: &mut TileAcc,
) {
    check(buf, cb, x, R);
    // SAFETY: NEON is baseline and dotprod is this function's contract; the buffer reads stay
    // inside `p.q` (16 bytes at 128c + 64 + 48 at most, c < 16) and the scale rows, the activation reads inside
    // the first cb blocks of each row (`check`).
    unsafe {
        let zero = vdupq_n_s32(0);
        for (b, p) in buf.iter().enumerate().take(cb) {
            let wq = p.q.as_ptr();
            let mut isum = [[zero; 2]; R];
            let mut s = [[zero; 2]; R];
            for c in 0..16 {
                let mut xv = [vdupq_n_s8(0); R];
                for j in 0..R {
                    xv[j] = load_i8(&x[j][b].qs[16 * c..]);
                }
                macro_rules! step {
                    ($i:literal) => {{
                        let w0 = vld1q_s8(wq.add(128 * c + 16 * $i));
                        let w1 = vld1q_s8(wq.add(128 * c + 64 + 16 * $i));
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
                if !PER32 || c % 2 == 1 {
                    let g = if PER32 { c / 2 } else { c };
                    let sc = [
                        vld1q_s32(p.sc[g].as_ptr()),
                        vld1q_s32(p.sc[g][4..].as_ptr()),
                    ];
                    for j in 0..R {
                        for v in 0..2 {
                            isum[j][v] = vmlaq_s32(isum[j][v], s[j][v], sc[v]);
                            s[j][v] = zero;
                        }
                    }
                }
            }
            let msum = if MIN {
                msums::<R, PER32>(p, x, b)
            } else {
                [[zero; 2]; R]
            };
            let d = [vld1q_f32(p.d.as_ptr()), vld1q_f32(p.d[4..].as_ptr())];
            let dmin = [vld1q_f32(p.dmin.as_ptr()), vld1q_f32(p.dmin[4..].as_ptr())];
            let a = &mut acc[(b0 + b) % LANES];
            for j in 0..R {
                let xd = x[j][b].d;
                for v in 0..2 {
                    // (d·xd)·isum - (dmin·xd)·msum, then the lane's add
                    let prod = vsubq_f32(
                        vmulq_f32(vmulq_n_f32(d[v], xd), vcvtq_f32_s32(isum[j][v])),
                        vmulq_f32(vmulq_n_f32(dmin[v], xd), vcvtq_f32_s32(msum[j][v])),
                    );
                    let o = a[2 * j + v].as_mut_ptr();
                    vst1q_f32(o, vaddq_f32(vld1q_f32(o), prod));
                }
            }
        }
    }
}

/// `chunk_sdot` with `smmla` (`buf` in its layout): activation rows in `P` pairs (rows 2q,
/// 2q + 1; `x` repeats its last row where the tile has an odd count), pair q with weight pair
/// p in `acc[lane][2p + q]`.
///
/// # Safety
/// The CPU must have `i8mm` (`cpu::has_i8mm`). Lengths are checked (panics).
// (index loops over parallel arrays: loops, not closures, stay inline with the target features)
#[allow(clippy::needless_range_loop)]
#[target_feature(enable = "neon,dotprod,i8mm")]
pub unsafe fn chunk_i8mm<const P: usize, const PER32: bool, const MIN: bool>(
    buf: &[SbPanel],
    cb: usize,
    b0: usize,
    x: &[&[BlockQ8K]; TILE],
    acc: &mut TileAcc,
) {
    check(buf, cb, x, 2 * P);
    // SAFETY: as in `chunk_sdot` (16 bytes at 128c + 96 + 16 at most), with i8mm this
    // function's contract.
    unsafe {
        let zero = vdupq_n_s32(0);
        for (b, p) in buf.iter().enumerate().take(cb) {
            let wq = p.q.as_ptr();
            let mut isum = [[zero; P]; 4];
            let mut s = [[zero; P]; 4];
            for c in 0..16 {
                let mut xz = [[vdupq_n_s8(0); 2]; P];
                for q in 0..P {
                    let r0 = vreinterpretq_s64_s8(load_i8(&x[2 * q][b].qs[16 * c..]));
                    let r1 = vreinterpretq_s64_s8(load_i8(&x[2 * q + 1][b].qs[16 * c..]));
                    xz[q] = [
                        vreinterpretq_s8_s64(vzip1q_s64(r0, r1)),
                        vreinterpretq_s8_s64(vzip2q_s64(r0, r1)),
                    ];
                }
                for t in 0..2 {
                    for pr in 0..4 {
                        let wv = vld1q_s8(wq.add(128 * c + 32 * pr + 16 * t));
                        for q in 0..P {
                            s[pr][q] = smmla(s[pr][q], wv, xz[q][t]);
                        }
                    }
                }
                if !PER32 || c % 2 == 1 {
                    let g = if PER32 { c / 2 } else { c };
                    for pr in 0..4 {
                        let sc = vld1q_s32(p.sc[g][4 * pr..].as_ptr());
                        for q in 0..P {
                            isum[pr][q] = vmlaq_s32(isum[pr][q], s[pr][q], sc);
                            s[pr][q] = zero;
                        }
                    }
                }
            }
            // msum in `sdot`'s layout, zipped into the pairs': rows 4v, 4v + 1 (pair 2v) with
            // activation rows 2q, 2q + 1 are [w0x0, w0x1, w1x0, w1x1]
            let mut msum = [[zero; P]; 4];
            if MIN {
                let mut m = [[zero; 2]; TILE];
                if P == 1 {
                    m[..2].copy_from_slice(&msums::<2, PER32>(p, x, b));
                } else {
                    m = msums::<4, PER32>(p, x, b);
                }
                for q in 0..P {
                    for v in 0..2 {
                        msum[2 * v][q] = vzip1q_s32(m[2 * q][v], m[2 * q + 1][v]);
                        msum[2 * v + 1][q] = vzip2q_s32(m[2 * q][v], m[2 * q + 1][v]);
                    }
                }
            }
            let mut dx = [vdupq_n_f32(0.0); P];
            for q in 0..P {
                // [x0 x1 x0 x1]: the activation rows of smmla's lanes
                dx[q] = vzip1q_f32(vdupq_n_f32(x[2 * q][b].d), vdupq_n_f32(x[2 * q + 1][b].d));
            }
            let a = &mut acc[(b0 + b) % LANES];
            for pr in 0..4 {
                let d = vld1q_f32(p.d[4 * pr..].as_ptr());
                let dmin = vld1q_f32(p.dmin[4 * pr..].as_ptr());
                for q in 0..P {
                    let prod = vsubq_f32(
                        vmulq_f32(vmulq_f32(d, dx[q]), vcvtq_f32_s32(isum[pr][q])),
                        vmulq_f32(vmulq_f32(dmin, dx[q]), vcvtq_f32_s32(msum[pr][q])),
                    );
                    let o = a[2 * pr + q].as_mut_ptr();
                    vst1q_f32(o, vaddq_f32(vld1q_f32(o), prod));
                }
            }
        }
    }
}
