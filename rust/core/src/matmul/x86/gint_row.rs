//! The fused grouped-integer kernel for one activation row (M = 1, and the last row of an odd
//! M): `reference::gint`'s arithmetic, as `x86::gint::gint_units` computes it, in a unit loop
//! with no per-unit branch. `gint_units` serves P weight rows and R activation rows over any
//! range of units and decides per unit whether it is partial and how its scales spread; at one
//! activation row that bookkeeping (about 35 scalar operations a unit against about 20 vector
//! ones) bounded the kernel, not the weights' memory traffic. Here the whole units run with
//! the scales' spread fixed at compile time (`PER` groups a unit), the activations as memory
//! operands of `vpdpwssd`, and the lanes reduced in registers; a last partial unit goes to
//! `gint_units` with the same accumulator. Same lane sums (exact integers), same float
//! operations in the same order: bit for bit `reference::gint::dot_gint_q16`.

use std::arch::x86_64::*;

use super::gint::{gint_units, hsum16_v, zero_term, Row};
use crate::matmul::reference::gint::{UNIT4, UNIT8};
use crate::qtype::GInt;

/// `acc + Σ` of the products of `a`'s 16-bit pairs with the 64 bytes at `b` (`vpdpwssd` with
/// a memory operand, kept as that one instruction as `q16::dpwssd` is).
///
/// # Safety
/// AVX-512 VNNI; `b` readable for 64 bytes.
#[target_feature(enable = "avx512f,avx512vnni")]
#[inline]
unsafe fn dpwssd_m(acc: __m512i, a: __m512i, b: *const i16) -> __m512i {
    let mut acc = acc;
    // SAFETY: reads the 64 bytes at `b` (the caller's guarantee); a feature the caller has.
    unsafe {
        std::arch::asm!(
            "vpdpwssd {acc}, {a}, zmmword ptr [{b}]",
            acc = inout(zmm_reg) acc,
            a = in(zmm_reg) a,
            b = in(reg) b,
            options(pure, readonly, nostack, preserves_flags),
        );
    }
    acc
}

/// How a row of K meets its units, computed once per call (the divisions stay out of the
/// rows): `per` groups a unit (the `PER` of `gint_row`), at one group a unit the shift from a
/// unit to its group (`u >> shift`), the groups, the whole units and all units of a row.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct Layout {
    pub per: usize,
    pub shift: u32,
    pub groups: usize,
    pub full: usize,
    pub units: usize,
}

/// `Layout` of the rows of K codes of `g` (4 bits, or 8 bits symmetric).
pub fn layout(g: GInt, k: usize) -> Layout {
    let unit = if g.bits == 4 { UNIT4 } else { UNIT8 };
    let gl = crate::formats::gint::group_len(g, k);
    let (per, shift) = if gl == k {
        (1, usize::BITS - 1)
    } else if gl >= unit {
        (1, (gl / unit).trailing_zeros())
    } else {
        (unit / gl, 0)
    };
    Layout {
        per,
        shift,
        groups: k / gl,
        full: k / unit,
        units: k.div_ceil(unit),
    }
}

/// `reference::gint::dot_gint_q16`'s lane accumulators of one weight row (`row`, `stats`) with
/// one activation row `x` after every unit (`gint_finish` gives the result). `lay`:
/// `layout(g, k)`, whose `per` is `PER` (1, 2, or 4 at 4 bits); `FOUR`: 4 bits (else 8,
/// symmetric). `ahead`: how far past each unit its codes are prefetched into L2.
///
/// # Safety
/// As `gint_units` (which checks the slices' lengths with asserts), and `lay == layout(g, k)`
/// (debug-asserted: a division per row cost a tenth of a K = 4096 row).
#[target_feature(enable = "avx2,fma,avx512f,avx512bw,avx512vl,avx512vnni")]
pub unsafe fn gint_row<const FOUR: bool, const PER: usize>(
    g: GInt,
    row: &[u8],
    stats: &[f32],
    k: usize,
    x: Row<'_>,
    lay: Layout,
    ahead: usize,
) -> __m512 {
    let unit = if FOUR { UNIT4 } else { UNIT8 };
    let Layout {
        shift,
        groups,
        full,
        units,
        ..
    } = lay;
    debug_assert_eq!(lay, layout(g, k));
    assert!(FOUR == (g.bits == 4) && (FOUR || (g.bits == 8 && g.sym)));
    assert!(row.len() == k * g.bits as usize / 8 && stats.len() >= groups);
    assert!(x.xq.len() >= full * unit && (!FOUR || x.xdl.len() >= 16 * full));
    assert!(FOUR || x.xd.len() >= full);
    assert!(PER == lay.per && (PER == 1 || PER == 2 || (FOUR && PER == 4)));
    assert!(full * unit <= k && units * unit >= k);
    // every whole unit's scales lie within the row's groups
    assert!(if PER == 1 {
        full == 0 || (full - 1) >> shift < groups
    } else {
        full * PER <= groups
    });
    let nib = _mm512_set1_epi16(0x0f);
    let flip = _mm512_set1_epi8(-128);
    // lane l of a unit takes the unit's scale l / (16 / PER)
    let spread = _mm512_srl_epi32(
        _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
        _mm_cvtsi32_si128((16 / PER).trailing_zeros() as i32),
    );
    let (w, sp, xq) = (row.as_ptr(), stats.as_ptr(), x.xq.as_ptr());
    let xs = if FOUR { x.xdl.as_ptr() } else { x.xd.as_ptr() };
    let mut acc = _mm512_setzero_ps();
    for u in 0..full {
        // SAFETY: unit u < full lies in the row, its activations and lane scales in `x`, its
        // PER scales (groups u·PER ..) or its one scale (group u >> shift) in `stats`
        // (asserted above); prefetches never fault.
        unsafe {
            let wp = w.add(64 * u);
            _mm_prefetch::<_MM_HINT_T1>(wp.wrapping_add(ahead) as *const i8);
            let raw = _mm512_loadu_si512(wp as *const _);
            let xp = xq.add(unit * u);
            let s = if FOUR {
                let s = _mm512_madd_epi16(_mm512_and_si512(raw, nib), _mm512_loadu_si512(xp as _));
                let p1 = _mm512_and_si512(_mm512_srli_epi16::<4>(raw), nib);
                let s = dpwssd_m(s, p1, xp.add(32));
                let p2 = _mm512_and_si512(_mm512_srli_epi16::<8>(raw), nib);
                let t = _mm512_madd_epi16(p2, _mm512_loadu_si512(xp.add(64) as _));
                let t = dpwssd_m(t, _mm512_srli_epi16::<12>(raw), xp.add(96));
                _mm512_add_epi32(s, t)
            } else {
                let v = _mm512_xor_si512(raw, flip);
                let lo = _mm512_srai_epi16::<8>(_mm512_slli_epi16::<8>(v));
                let s = _mm512_madd_epi16(lo, _mm512_loadu_si512(xp as _));
                dpwssd_m(s, _mm512_srai_epi16::<8>(v), xp.add(32))
            };
            let ws = match PER {
                1 => _mm512_set1_ps(*sp.add(u >> shift)),
                2 => _mm512_permutexvar_ps(
                    spread,
                    _mm512_castsi512_ps(_mm512_set1_epi64(
                        (sp.add(2 * u) as *const i64).read_unaligned(),
                    )),
                ),
                _ => _mm512_permutexvar_ps(
                    spread,
                    _mm512_broadcast_f32x4(_mm_loadu_ps(sp.add(4 * u))),
                ),
            };
            let xd = if FOUR {
                _mm512_loadu_ps(xs.add(16 * u))
            } else {
                _mm512_set1_ps(*xs.add(u))
            };
            acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s), _mm512_mul_ps(ws, xd), acc);
        }
    }
    if full < units {
        let mut a = [[acc]];
        // SAFETY: the caller's guarantees are `gint_units`' own.
        unsafe { gint_units::<1, 1>(g, [row], [stats], k, [x], full..units, ahead, &mut a) };
        acc = a[0][0];
    }
    acc
}

/// `reference::gint::dot_gint_q16`'s result from `gint_row`'s accumulators: `main`, minus the
/// zero term at 4 bits (`x86::gint::gint_finish` for one row, without its division).
///
/// # Safety
/// As `gint_row`.
#[target_feature(enable = "avx2,fma,avx512f,avx512bw,avx512vl")]
pub unsafe fn gint_row_finish(g: GInt, stats: &[f32], x: Row<'_>, lay: Layout, acc: __m512) -> f32 {
    let main = hsum16_v(acc);
    if g.bits != 4 {
        return main;
    }
    // SAFETY: the caller's guarantees (`zero_term` asserts the lengths).
    let [z] = unsafe { zero_term(g, stats, lay.groups, [x.xg]) };
    main - z
}
