//! The fused AVX-512 kernel of the grouped integers at 4 and 8 bits (`reference/gint.rs`
//! defines its arithmetic): the packed codes are read straight from the weight row (no decode
//! buffer), unpacked in registers; each unpacked unit serves up to 4 activation rows, and each
//! activation load P weight rows (`gint_units`, over a range of units so that `Plan::gint_panels`
//! can run K in pieces over a panel of rows with the accumulators carried between pieces).
//!
//! 4 bits: 64 bytes (a unit of 128) as 32 words; masked at bits 0, 4, 8 and 12 they are the
//! codes of elements 4w, 4w + 1, 4w + 2 and 4w + 3 (four planes), and `vpdpwssd` adds words 2i
//! and 2i + 1 of each, so with the activations in the same four runs (`split_x`, nf4's
//! layout) 32-bit lane i sums elements 8i .. 8i + 7. 8 bits: 64 bytes with the top bit flipped
//! (`q - 128` as i8), sign-extended from the low and high byte of each word: two planes, lane i
//! sums elements 4i .. 4i + 3. Per unit and row: the `vpdpwssd`s, one conversion, one multiply
//! (the lanes' group scales by the activation blocks' scales) and one fused multiply-add.
//! The 4-bit zero term is one vector fused multiply-add per 16 groups (`zero_term`).

use std::arch::x86_64::*;

use super::q16::dpwssd;
use crate::matmul::reference::gint::{UNIT4, UNIT8};
use crate::matmul::reference::q16::Q16;
use crate::qtype::GInt;

/// Activations prepared for the kernel, beside the q16 rows of `Acts::Q16` (which `split_x`
/// has reordered): per row, `lanes` scales `xd` spread over the 16 lanes of each unit (4 bits)
/// and the `groups` group sums `X_g` (`reference::gint::group_sums`, 4 bits).
pub struct GintActs {
    pub xdl: Vec<f32>,
    pub lanes: usize,
    pub xg: Vec<f32>,
    pub groups: usize,
}

/// Every 128 (4 bits) or 64 (8 bits) values of a q16 row reordered into the kernel's planes:
/// plane j of a unit holds the unit's elements `P·w + j`, w = 0..32 (P planes).
pub fn split_x(q: &mut [i16], bits: u8) {
    if crate::cpu::has_avx512() {
        // SAFETY: AVX-512 F and BW detected.
        return unsafe { split_x_avx512(q, bits) };
    }
    split_x_scalar(q, bits);
}

fn split_x_scalar(q: &mut [i16], bits: u8) {
    let planes = if bits == 4 { 4 } else { 2 };
    let unit = 32 * planes;
    let mut v = [0i16; UNIT4];
    for u in q.chunks_exact_mut(unit) {
        v[..unit].copy_from_slice(u);
        for (i, o) in u.iter_mut().enumerate() {
            *o = v[planes * (i % 32) + i / 32];
        }
    }
}

/// `split_x` by word permutes: plane j's word L is element `P·L + j` of the unit, which for
/// the first 16 words (4 bits; all 32 at 8 bits) lies in the unit's first 64 elements (two
/// registers) and for the last 16 in its second 64, at the same offset `(P·L + j) mod 64`:
/// one `vpermt2w` of each pair of registers and a blend. The scalar loop was most of a 4-bit
/// M = 1 call's fixed cost at K = 14336 (its 14336 words one by one, before the pool starts).
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn split_x_avx512(q: &mut [i16], bits: u8) {
    let planes: usize = if bits == 4 { 4 } else { 2 };
    let unit = 32 * planes;
    let idx: [__m512i; 4] = std::array::from_fn(|j| {
        let w: [i16; 32] = std::array::from_fn(|l| ((planes * l + j) % 64) as i16);
        // SAFETY: 32 i16 are 64 bytes.
        unsafe { _mm512_loadu_si512(w.as_ptr() as *const _) }
    });
    for u in q.chunks_exact_mut(unit) {
        let p = u.as_mut_ptr();
        // SAFETY: `unit` (64 or 128) i16 at p: 2 or 4 registers, read before any is written.
        unsafe {
            let r: [__m512i; 4] =
                std::array::from_fn(|i| _mm512_loadu_si512(p.add(32 * (i % planes)) as *const _));
            if planes == 2 {
                for (j, ix) in idx.iter().take(2).enumerate() {
                    let o = _mm512_permutex2var_epi16(r[0], *ix, r[1]);
                    _mm512_storeu_si512(p.add(32 * j) as *mut _, o);
                }
            } else {
                for (j, ix) in idx.iter().enumerate() {
                    let lo = _mm512_permutex2var_epi16(r[0], *ix, r[1]);
                    let hi = _mm512_permutex2var_epi16(r[2], *ix, r[3]);
                    let o = _mm512_mask_blend_epi16(0xffff_0000, lo, hi);
                    _mm512_storeu_si512(p.add(32 * j) as *mut _, o);
                }
            }
        }
    }
}

/// `GintActs` of `m` q16 rows (element order: call before `split_x`).
pub fn prepare(g: GInt, k: usize, m: usize, q: &[i16], d: &[f32], row: usize) -> GintActs {
    use crate::matmul::reference::gint::group_sums;
    if g.bits != 4 {
        return GintActs {
            xdl: Vec::new(),
            lanes: 0,
            xg: Vec::new(),
            groups: 0,
        };
    }
    let gl = crate::formats::gint::group_len(g, k);
    let (groups, blocks) = (k / gl, row / Q16);
    let lanes = 16 * k.div_ceil(UNIT4);
    let mut xdl = vec![0.0f32; m * lanes];
    let mut xg = vec![0.0f32; m * groups];
    for mi in 0..m {
        let (xq, xd) = (
            &q[mi * row..(mi + 1) * row],
            &d[mi * blocks..(mi + 1) * blocks],
        );
        for (l, o) in xdl[mi * lanes..(mi + 1) * lanes].iter_mut().enumerate() {
            *o = xd[8 * l / Q16];
        }
        group_sums(xq, xd, k, gl, &mut xg[mi * groups..(mi + 1) * groups]);
    }
    GintActs {
        xdl,
        lanes,
        xg,
        groups,
    }
}

/// Prefetch into L2 the line `ahead` bytes past `p` (a hint: an address past the data is never
/// dereferenced, so `wrapping_add` keeps it sound).
#[target_feature(enable = "avx2")]
#[inline]
fn prefetch_w(p: *const u8, ahead: usize) {
    _mm_prefetch::<_MM_HINT_T1>(p.wrapping_add(ahead) as *const i8);
}

/// One activation row as the kernel reads it: `xq` split by `split_x` (`q16_row_len(K)`
/// values), `xd` its block scales, and (4 bits) its `GintActs` parts.
#[derive(Clone, Copy)]
pub struct Row<'a> {
    pub xq: &'a [i16],
    pub xd: &'a [f32],
    pub xdl: &'a [f32],
    pub xg: &'a [f32],
}

/// The lane accumulators of P weight rows with R activation rows (`reference::gint`'s `acc`),
/// carried from one range of units to the next.
pub type Acc<const P: usize, const R: usize> = [[__m512; R]; P];

/// Accumulators before the first unit.
pub fn new_acc<const P: usize, const R: usize>() -> Acc<P, R> {
    // SAFETY: an all-zero __m512 is 16 zeros (plain data).
    unsafe { std::mem::zeroed() }
}

/// `reference::gint::dot_gint_q16`'s lane loop over the units `units` of P weight rows (`rows`,
/// `stats`) with R activation rows, into `acc`: each unpacked unit serves the R rows and each
/// activation load the P weight rows. Ranges taken in increasing order over `0..units(K)` leave
/// `acc` as one pass over the whole row would (the lanes' operations and order are the same).
/// `ahead`: how far past each unit its weights are prefetched into L2.
///
/// # Safety
/// `cpu::has_vnni_q16()`; `g` is 4 bits or 8 bits symmetric, each row holds K codes
/// (`K·bits/8` bytes), K a multiple of 8 and of the group, each `stats` one row's statistics,
/// each `x[r].xq` `q16_row_len(K)` values and `x[r].xd` one per 64 of them; at 4 bits each
/// `x[r].xdl` 16 per unit and `x[r].xg` one per group.
#[target_feature(enable = "avx2,fma,avx512f,avx512bw,avx512vl,avx512vnni")]
#[allow(clippy::too_many_arguments)]
pub unsafe fn gint_units<const P: usize, const R: usize>(
    g: GInt,
    rows: [&[u8]; P],
    stats: [&[f32]; P],
    k: usize,
    x: [Row<'_>; R],
    units: std::ops::Range<usize>,
    ahead: usize,
    acc: &mut Acc<P, R>,
) {
    // SAFETY: the caller's guarantees, passed on.
    unsafe {
        if g.bits == 4 {
            units_w::<true, P, R>(g, rows, stats, k, x, units, ahead, acc)
        } else {
            units_w::<false, P, R>(g, rows, stats, k, x, units, ahead, acc)
        }
    }
}

/// Units in a row of K elements (`gint_units`' ranges lie within `0..units(g, k)`).
pub fn units(g: GInt, k: usize) -> usize {
    k.div_ceil(if g.bits == 4 { UNIT4 } else { UNIT8 })
}

/// `gint_units` for one width (`FOUR`: 4 bits, else 8), so that its unit loop has no branch.
///
/// # Safety
/// As `gint_units`.
#[target_feature(enable = "avx2,fma,avx512f,avx512bw,avx512vl,avx512vnni")]
#[allow(clippy::too_many_arguments)]
unsafe fn units_w<const FOUR: bool, const P: usize, const R: usize>(
    g: GInt,
    rows: [&[u8]; P],
    stats: [&[f32]; P],
    k: usize,
    x: [Row<'_>; R],
    range: std::ops::Range<usize>,
    ahead: usize,
    acc: &mut Acc<P, R>,
) {
    let gl = crate::formats::gint::group_len(g, k);
    let groups = k / gl;
    let unit = if FOUR { UNIT4 } else { UNIT8 };
    let span = unit / 16;
    let units = k.div_ceil(unit);
    let row_len = k * g.bits as usize / 8;
    assert!(FOUR == (g.bits == 4) && (FOUR || g.bits == 8));
    assert!(k.is_multiple_of(8) && range.end <= units);
    assert!(rows.iter().all(|r| r.len() == row_len));
    assert!(stats.iter().all(|s| s.len() >= groups) && (gl >= 32 || gl == k));
    for r in &x {
        assert!(r.xq.len() >= units * unit && r.xd.len() * Q16 >= units * unit);
        assert!(!FOUR || (r.xdl.len() >= 16 * units && r.xg.len() >= groups));
    }
    // The lanes' group scales: a unit holds `per` groups (1 when groups are at least a unit,
    // or per-channel), lane l the group `l·span / gl` of them: a masked load of the unit's
    // scales spread by one permute. Unit u's first group is `(u · per) >> shift` (no division
    // in the loop: groups are powers of two or the whole row).
    assert!(gl == k || gl.is_power_of_two());
    let (per, shift) = if gl == k {
        (1, usize::BITS - 1)
    } else if gl >= unit {
        (1, (gl / unit).trailing_zeros())
    } else {
        (unit / gl, 0)
    };
    // lane l reads scale l / (16 / per): a shift, as a division per lane cost a whole unit's
    // time on every call (K = 4096 rows at M = 1 are 32 units).
    let spread = _mm512_srl_epi32(
        _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
        _mm_cvtsi32_si128((16 / per).trailing_zeros() as i32),
    );
    let (nib, flip) = (_mm512_set1_epi16(0x0f), _mm512_set1_epi8(-128));
    let w = rows.map(|r| r.as_ptr());
    let sp = stats.map(|s| s.as_ptr());
    let xq = x.map(|r| r.xq.as_ptr());
    let xs = if FOUR {
        x.map(|r| r.xdl.as_ptr())
    } else {
        x.map(|r| r.xd.as_ptr())
    };
    let full = k / unit;
    // The same rows' statistics `ahead` is for their codes (rows of `row_len` bytes, statistics
    // one row after another).
    let stats_ahead = ahead / row_len * 4 * crate::formats::gint::stats_per_row(g, k);
    for u in range {
        // 64 bytes but for a last partial unit, and the lanes that hold an element of the row.
        let (bytes, live) = if u < full {
            (64, 0xffff)
        } else {
            let left = k - u * unit;
            (row_len - 64 * u, ((1u32 << left.div_ceil(span)) - 1) as u16)
        };
        let first = (u * per) >> shift;
        let m = ((1u32 << per.min(groups - first)) - 1) as u16;
        let mut planes = [[_mm512_setzero_si512(); 4]; P];
        let mut ws = [_mm512_setzero_ps(); P];
        for p in 0..P {
            prefetch_w(w[p].wrapping_add(64 * u), ahead);
            // SAFETY: unit u starts inside the row; a last partial unit reads only its bytes;
            // the masked load reads only this unit's scales.
            let raw = unsafe {
                if bytes == 64 {
                    _mm512_loadu_si512(w[p].add(64 * u) as *const _)
                } else {
                    _mm512_maskz_loadu_epi8((1u64 << bytes) - 1, w[p].add(64 * u) as *const i8)
                }
            };
            planes[p] = if FOUR {
                [
                    _mm512_and_si512(raw, nib),
                    _mm512_and_si512(_mm512_srli_epi16::<4>(raw), nib),
                    _mm512_and_si512(_mm512_srli_epi16::<8>(raw), nib),
                    _mm512_srli_epi16::<12>(raw),
                ]
            } else {
                let v = _mm512_xor_si512(raw, flip);
                let lo = _mm512_srai_epi16::<8>(_mm512_slli_epi16::<8>(v));
                [lo, _mm512_srai_epi16::<8>(v), lo, lo]
            };
            // (the scales, and the zeros that `zero_term` reads after the row)
            prefetch_w(sp[p].wrapping_add(first) as *const u8, stats_ahead);
            if !g.sym {
                prefetch_w(sp[p].wrapping_add(groups + first) as *const u8, stats_ahead);
            }
            // SAFETY: the loads read only this unit's scales (`m`'s groups).
            ws[p] = unsafe {
                match (per, m) {
                    // One or two groups a unit (g >= 64): broadcasts, no shuffle.
                    (1, _) => _mm512_set1_ps(*sp[p].add(first)),
                    (2, 0b11) => _mm512_mask_mov_ps(
                        _mm512_set1_ps(*sp[p].add(first)),
                        0xff00,
                        _mm512_set1_ps(*sp[p].add(first + 1)),
                    ),
                    _ => _mm512_permutexvar_ps(spread, _mm512_maskz_loadu_ps(m, sp[p].add(first))),
                }
            };
        }
        for r in 0..R {
            // SAFETY: xq, xd and xdl hold every unit (asserted); VNNI available.
            unsafe {
                let xp = xq[r].add(unit * u);
                let xv: [__m512i; 4] = std::array::from_fn(|j| {
                    if FOUR || j < 2 {
                        _mm512_loadu_si512(xp.add(32 * j) as *const _)
                    } else {
                        _mm512_setzero_si512()
                    }
                });
                let xd = if FOUR {
                    _mm512_loadu_ps(xs[r].add(16 * u))
                } else {
                    _mm512_set1_ps(*xs[r].add(u))
                };
                for p in 0..P {
                    let pl = &planes[p];
                    // Two chains of `vpdpwssd` at 4 bits (exact integer sums: any order gives
                    // the same lane sums), so that a unit waits two latencies, not four.
                    let mut s = dpwssd(_mm512_setzero_si512(), xv[0], pl[0]);
                    s = dpwssd(s, xv[1], pl[1]);
                    if FOUR {
                        let t = dpwssd(_mm512_setzero_si512(), xv[2], pl[2]);
                        s = _mm512_add_epi32(s, dpwssd(t, xv[3], pl[3]));
                    }
                    let sc = _mm512_mul_ps(ws[p], xd);
                    acc[p][r] = _mm512_mask3_fmadd_ps(_mm512_cvtepi32_ps(s), sc, acc[p][r], live);
                }
            }
        }
    }
}

/// The results of P weight rows with R activation rows from their accumulators after every
/// unit: `main` minus the zero term at 4 bits (`reference::gint::dot_gint_q16`).
///
/// # Safety
/// As `gint_units` (AVX-512 F).
#[target_feature(enable = "avx2,fma,avx512f,avx512bw,avx512vl")]
pub unsafe fn gint_finish<const P: usize, const R: usize>(
    g: GInt,
    stats: [&[f32]; P],
    k: usize,
    x: [Row<'_>; R],
    acc: &Acc<P, R>,
) -> [[f32; R]; P] {
    let groups = k / crate::formats::gint::group_len(g, k);
    std::array::from_fn(|p| {
        let main = acc[p].map(|a| hsum16_v(a));
        if g.bits != 4 {
            return main;
        }
        // SAFETY: AVX-512 F; stats and xg as the caller guarantees.
        let z = unsafe { zero_term(g, stats[p], groups, x.map(|r| r.xg)) };
        std::array::from_fn(|r| main[r] - z[r])
    })
}

/// The 4-bit zero term of R rows: `Σ_g (s_g · z_g) · X_g`, group g in lane g % 16
/// (`reference::gint::dot_gint_q16`). The zeros come from `reference::gint::zero`'s rule, 16
/// at a time: the one place a float-zero format changes.
#[target_feature(enable = "avx2,fma,avx512f,avx512bw,avx512vl")]
pub(super) unsafe fn zero_term<const R: usize>(
    g: GInt,
    stats: &[f32],
    groups: usize,
    xg: [&[f32]; R],
) -> [f32; R] {
    assert!(stats.len() >= if g.sym { groups } else { 2 * groups });
    assert!(xg.iter().all(|x| x.len() >= groups));
    let sym_zero = _mm512_set1_ps((1u32 << (g.bits - 1)) as f32);
    let mut zacc = [_mm512_setzero_ps(); R];
    let mut g0 = 0;
    while g0 < groups {
        let m = ((1u32 << (groups - g0).min(16)) - 1) as u16;
        // SAFETY: the masked loads read groups g0 .. min(g0 + 16, groups) (asserted).
        unsafe {
            let s = _mm512_maskz_loadu_ps(m, stats.as_ptr().add(g0));
            let z = if g.sym {
                sym_zero
            } else {
                _mm512_maskz_loadu_ps(m, stats.as_ptr().add(groups + g0))
            };
            let sz = _mm512_mul_ps(s, z);
            for r in 0..R {
                let xv = _mm512_maskz_loadu_ps(m, xg[r].as_ptr().add(g0));
                zacc[r] = _mm512_mask3_fmadd_ps(sz, xv, zacc[r], m);
            }
        }
        g0 += 16;
    }
    zacc.map(|a| hsum16_v(a))
}

/// The 16 lanes reduced in `reference::gint::hsum16`'s order: `a[l] + a[l + 8]`, then
/// `t[l] + t[l + 4]`, then `(s0 + s2) + (s1 + s3)`: the same additions, in registers.
///
/// # Safety
/// AVX-512 F (a safe function with target features: callable only where they hold).
#[target_feature(enable = "avx2,fma,avx512f")]
#[inline]
pub fn hsum16_v(a: __m512) -> f32 {
    let hi = _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(a)));
    let t = _mm256_add_ps(_mm512_castps512_ps256(a), hi);
    let s = _mm_add_ps(_mm256_castps256_ps128(t), _mm256_extractf128_ps::<1>(t));
    let u = _mm_add_ps(s, _mm_movehl_ps(s, s));
    _mm_cvtss_f32(_mm_add_ss(u, _mm_movehdup_ps(u)))
}

#[cfg(test)]
mod split_tests {
    use super::*;

    /// The permute version of `split_x` against the scalar loop: both widths, whole units and
    /// a remainder (left as it is), every word distinct.
    #[test]
    fn split_x_avx512_is_the_scalar_reordering() {
        if !crate::cpu::has_avx512() {
            return;
        }
        for bits in [4u8, 8] {
            for len in [0usize, 64, 128, 192, 14336, 14336 + 64] {
                let x: Vec<i16> = (0..len).map(|i| (i as i16).wrapping_mul(7919)).collect();
                let (mut a, mut b) = (x.clone(), x.clone());
                split_x_scalar(&mut a, bits);
                // SAFETY: has_avx512 checked.
                unsafe { split_x_avx512(&mut b, bits) };
                assert_eq!(a, b, "bits={bits} len={len}");
                assert!(len < 128 || a != x, "the reordering moved nothing");
            }
        }
    }
}
