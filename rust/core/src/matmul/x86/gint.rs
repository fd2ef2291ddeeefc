//! The fused AVX-512 kernel of the grouped integers at 4 and 8 bits (`reference/gint.rs`
//! defines its arithmetic): the packed codes are read straight from the weight row (no decode
//! buffer), unpacked in registers, and each unpacked unit serves up to 4 activation rows.
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

use super::q16::{dpwssd, PREFETCH_ROWS};
use crate::matmul::reference::gint::{hsum16, UNIT4, UNIT8};
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

/// `reference::gint::dot_gint_q16` for R activation rows.
///
/// # Safety
/// `cpu::has_vnni_q16()`; `g` is 4 bits or 8 bits symmetric, `row` holds K codes
/// (`K·bits/8` bytes), K a multiple of 8 and of the group, `stats` one row's statistics, each
/// `x[r].xq` `q16_row_len(K)` values and `x[r].xd` one per 64 of them; at 4 bits each
/// `x[r].xdl` 16 per unit and `x[r].xg` one per group.
#[target_feature(enable = "avx2,fma,avx512f,avx512bw,avx512vl,avx512vnni")]
pub unsafe fn dot_gint<const R: usize>(
    g: GInt,
    row: &[u8],
    stats: &[f32],
    k: usize,
    x: [Row<'_>; R],
) -> [f32; R] {
    // SAFETY: the caller's guarantees, passed on.
    unsafe {
        if g.bits == 4 {
            dot_gint_w::<true, R>(g, row, stats, k, x)
        } else {
            dot_gint_w::<false, R>(g, row, stats, k, x)
        }
    }
}

/// `dot_gint` for one width (`FOUR`: 4 bits, else 8), so that its unit loop has no branch.
///
/// # Safety
/// As `dot_gint`.
#[target_feature(enable = "avx2,fma,avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn dot_gint_w<const FOUR: bool, const R: usize>(
    g: GInt,
    row: &[u8],
    stats: &[f32],
    k: usize,
    x: [Row<'_>; R],
) -> [f32; R] {
    let gl = crate::formats::gint::group_len(g, k);
    let groups = k / gl;
    let unit = if FOUR { UNIT4 } else { UNIT8 };
    let span = unit / 16;
    let units = k.div_ceil(unit);
    assert!(FOUR == (g.bits == 4) && (FOUR || g.bits == 8));
    assert!(row.len() == k * g.bits as usize / 8 && k.is_multiple_of(8));
    assert!(stats.len() >= groups && (gl >= 32 || gl == k));
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
    let lanes_per_group = 16 / per;
    let spread = _mm512_loadu_si512(
        std::array::from_fn::<i32, 16, _>(|l| (l / lanes_per_group) as i32).as_ptr() as *const _,
    );
    let (nib, flip) = (_mm512_set1_epi16(0x0f), _mm512_set1_epi8(-128));
    let w = row.as_ptr();
    let xq = x.map(|r| r.xq.as_ptr());
    let xs = if FOUR {
        x.map(|r| r.xdl.as_ptr())
    } else {
        x.map(|r| r.xd.as_ptr())
    };
    let mut acc = [_mm512_setzero_ps(); R];
    let full = k / unit;
    for u in 0..units {
        // 64 bytes but for a last partial unit, and the lanes that hold an element of the row.
        let (bytes, live) = if u < full {
            (64, 0xffff)
        } else {
            let left = k - u * unit;
            (
                row.len() - 64 * u,
                ((1u32 << left.div_ceil(span)) - 1) as u16,
            )
        };
        prefetch_w(w.wrapping_add(64 * u), PREFETCH_ROWS);
        // SAFETY: unit u starts inside the row; a last partial unit reads only its bytes.
        let raw = unsafe {
            if bytes == 64 {
                _mm512_loadu_si512(w.add(64 * u) as *const _)
            } else {
                _mm512_maskz_loadu_epi8((1u64 << bytes) - 1, w.add(64 * u) as *const i8)
            }
        };
        let planes: [__m512i; 4] = if FOUR {
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
        let first = (u * per) >> shift;
        let m = ((1u32 << per.min(groups - first)) - 1) as u16;
        // SAFETY: the masked load reads only this unit's scales.
        let ws = unsafe { _mm512_maskz_loadu_ps(m, stats.as_ptr().add(first)) };
        let ws = _mm512_permutexvar_ps(spread, ws);
        for r in 0..R {
            // SAFETY: xq, xd and xdl hold every unit (asserted); VNNI available.
            unsafe {
                let p = xq[r].add(unit * u);
                let xv = |j: usize| _mm512_loadu_si512(p.add(32 * j) as *const _);
                let mut s = dpwssd(_mm512_setzero_si512(), xv(0), planes[0]);
                s = dpwssd(s, xv(1), planes[1]);
                let xd = if FOUR {
                    _mm512_loadu_ps(xs[r].add(16 * u))
                } else {
                    _mm512_set1_ps(*xs[r].add(u))
                };
                if FOUR {
                    s = dpwssd(dpwssd(s, xv(2), planes[2]), xv(3), planes[3]);
                }
                let sc = _mm512_mul_ps(ws, xd);
                acc[r] = _mm512_mask3_fmadd_ps(_mm512_cvtepi32_ps(s), sc, acc[r], live);
            }
        }
    }
    let main = acc.map(|a| {
        let mut l = [0.0f32; 16];
        // SAFETY: 16 f32 of room.
        unsafe { _mm512_storeu_ps(l.as_mut_ptr(), a) };
        hsum16(&l)
    });
    if !FOUR {
        return main;
    }
    // SAFETY: AVX-512 F; stats and xg as asserted.
    let z = unsafe { zero_term(g, stats, groups, x.map(|r| r.xg)) };
    std::array::from_fn(|r| main[r] - z[r])
}

/// The 4-bit zero term of R rows: `Σ_g (s_g · z_g) · X_g`, group g in lane g % 16
/// (`reference::gint::dot_gint_q16`). The zeros come from `reference::gint::zero`'s rule, 16
/// at a time: the one place a float-zero format changes.
#[target_feature(enable = "avx2,fma,avx512f,avx512bw,avx512vl")]
unsafe fn zero_term<const R: usize>(
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
    zacc.map(|a| {
        let mut l = [0.0f32; 16];
        // SAFETY: 16 f32 of room.
        unsafe { _mm512_storeu_ps(l.as_mut_ptr(), a) };
        hsum16(&l)
    })
}
