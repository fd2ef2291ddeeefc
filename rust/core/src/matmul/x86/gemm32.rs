//! The GEMM microkernel of the 32-weight formats (q4_0, q5_0, q8_0, iq4_nl, q4_1, q5_1) for
//! many activation rows, AVX-512 F/BW/VL/VNNI: a panel of 8 weight rows is decoded once per
//! chunk of K (`KC_GROUPS` groups of 8 blocks) into an L1-resident buffer (`PanelBuf`), then
//! blocks of up to 4 activation rows run through the whole chunk with their float
//! accumulators in registers.
//!
//! **Numerics.** The layout is `tile::tile32_vnni512`'s: a 512-bit vector holds two weight
//! rows (row 2p in lanes 0..8, 2p + 1 in 8..16) of one group, lane l of either half being
//! block 8g + l, against one activation row broadcast to both halves; eight `vpdpbusd` leave
//! each block's exact Σ (w + BIAS)·x in its lane. The accumulator starts at `-BIAS·Σx` instead
//! of zero (the same integer as the tile's subtraction: the sums are exact). The float part is
//! the reference's, lane by lane in block order: `acc[l] += (d_w · d_x) · isum` (plus
//! `m_w · s_x` for q4_1 / q5_1, `reference::block32_min_product`), then `hsum8`. A chunk
//! boundary only pauses the lanes (kept in the caller's buffer), so every output has the bits
//! of `reference::dot_block32` / `dot_block32_min`, wherever it sits and however the work is
//! split (tested).
//!
//! Safety: callers check AVX2, F16C and AVX-512 F/BW/VL/VNNI at run time
//! (`cpu::has_vnni_bw`) and pass slices of the lengths stated on each function.

use std::arch::x86_64::*;

use super::tile::{Tile32, GROUP_BYTES};
use crate::matmul::reference::LANES;

/// Weight rows of one panel.
pub const PANEL: usize = 8;
/// Groups of 8 blocks (256 weights) in one chunk of K: the panel's decoded chunk (8 rows x
/// 2048 bytes, plus scales) and 4 activation rows' chunks stay in the 48 KiB L1 while the rows
/// pass (16 groups, 32 KiB a panel chunk, were about 5 % slower: 4096x14336, M = 64 and 512,
/// one thread).
pub const KC_GROUPS: usize = 8;
/// 64-byte lines of one decoded group: 8 vectors t x 4 row pairs.
const GROUP_LINES: usize = 8 * PANEL / 2;

/// One 512-bit line on a 64-byte boundary.
#[repr(C, align(64))]
#[derive(Clone, Copy)]
pub struct Zmm([u8; 64]);

/// A panel's decoded chunk: `q[(g * 8 + t) * 4 + p]` = vector t of group g of rows 2p (low
/// half) and 2p + 1 (high half) (`Tile32::load8_t`: lane l = elements 4t..4t+4 of block l, plus
/// `BIAS`); `d[g * 4 + p]` / `m[g * 4 + p]` the two rows' 8 block scales / offsets as f32.
pub struct PanelBuf {
    q: Vec<Zmm>,
    d: Vec<Zmm>,
    m: Vec<Zmm>,
}

impl Default for PanelBuf {
    fn default() -> Self {
        let z = Zmm([0; 64]);
        Self {
            q: vec![z; KC_GROUPS * GROUP_LINES],
            d: vec![z; KC_GROUPS * PANEL / 2],
            m: vec![z; KC_GROUPS * PANEL / 2],
        }
    }
}

/// Decodes groups `g0..g0 + groups` (at most `KC_GROUPS`) of the panel's 8 rows into `buf`.
///
/// # Safety
/// AVX2, F16C, AVX-512 F/BW/VL/VNNI (`cpu::has_vnni_bw`); every `w[i]` has at least
/// `(g0 + groups) * 8` blocks.
#[target_feature(enable = "avx2,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
pub unsafe fn decode_panel<W: Tile32>(
    w: [&[W]; PANEL],
    g0: usize,
    groups: usize,
    buf: &mut PanelBuf,
) {
    assert!(groups <= KC_GROUPS);
    for gi in 0..groups {
        for (i, wi) in w.iter().enumerate() {
            let wg = &wi[(g0 + gi) * LANES..(g0 + gi + 1) * LANES];
            // SAFETY: AVX2 (contract); wg is a checked slice of 8 blocks.
            let v = unsafe { W::load8_t(wg) };
            let half = (i % 2) * 32;
            for (t, vt) in v.iter().enumerate() {
                let line = &mut buf.q[(gi * 8 + t) * (PANEL / 2) + i / 2].0[half..half + 32];
                // SAFETY: 32 bytes stored into a checked 32-byte slice.
                unsafe { _mm256_storeu_si256(line.as_mut_ptr() as *mut __m256i, *vt) };
            }
            let dh: [u16; 8] = std::array::from_fn(|j| u16::from_le_bytes(wg[j].d()));
            // SAFETY: dh is 8 u16 (16 bytes loaded); F16C (contract).
            let d = _mm256_cvtph_ps(unsafe { _mm_loadu_si128(dh.as_ptr() as *const __m128i) });
            let line = &mut buf.d[gi * (PANEL / 2) + i / 2].0[half..half + 32];
            // SAFETY: 32 bytes stored into a checked 32-byte slice.
            unsafe { _mm256_storeu_ps(line.as_mut_ptr() as *mut f32, d) };
            if W::HAS_MIN {
                let mh: [u16; 8] = std::array::from_fn(|j| u16::from_le_bytes(wg[j].m()));
                // SAFETY: as for dh.
                let m = _mm256_cvtph_ps(unsafe { _mm_loadu_si128(mh.as_ptr() as *const __m128i) });
                let line = &mut buf.m[gi * (PANEL / 2) + i / 2].0[half..half + 32];
                // SAFETY: 32 bytes stored into a checked 32-byte slice.
                unsafe { _mm256_storeu_ps(line.as_mut_ptr() as *mut f32, m) };
            }
        }
    }
}

/// One activation row of a microkernel call, from group `g0` of the chunk on: its interleaved
/// quants (`tile::interleave_q8_0`), and per block `-BIAS · Σx` (empty where BIAS is 0), the
/// scale and (q8_1) `s`.
#[derive(Clone, Copy)]
pub struct XRow<'a> {
    pub xt: &'a [u8],
    pub nbias: &'a [i32],
    pub d: &'a [f32],
    pub s: &'a [f32],
}

/// R activation rows against the row pairs `2h, 2h + 1` of the decoded chunk (`groups`
/// groups): `acc[j][p]` (the 16 float lanes of rows 2(2h + p), 2(2h + p) + 1 with activation
/// row j) += each block's product, block by block.
///
/// # Safety
/// AVX2, F16C, AVX-512 F/BW/VL/VNNI (`cpu::has_vnni_bw`); `buf` holds `groups` decoded groups;
/// every `x[j]` has `groups * GROUP_BYTES` interleaved bytes and `groups * 8` scales (and
/// `nbias` where BIAS is not 0, `s` for q4_1 / q5_1); `h < 2`.
#[target_feature(enable = "avx2,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
pub unsafe fn kernel<W: Tile32, const R: usize>(
    buf: &PanelBuf,
    groups: usize,
    h: usize,
    x: &[XRow<'_>; R],
    acc: &mut [[__m512; 2]; R],
) {
    assert!(h < 2 && groups <= KC_GROUPS);
    for xj in x {
        assert!(xj.xt.len() >= groups * GROUP_BYTES && xj.d.len() >= groups * LANES);
        assert!(W::BIAS == 0 || xj.nbias.len() >= groups * LANES);
        assert!(!W::HAS_MIN || xj.s.len() >= groups * LANES);
    }
    let mut f = *acc;
    let q = buf.q.as_ptr() as *const __m512i;
    let dp = buf.d.as_ptr() as *const __m512;
    let mp = buf.m.as_ptr() as *const __m512;
    for g in 0..groups {
        let mut is = [[_mm512_setzero_si512(); 2]; R];
        if W::BIAS != 0 {
            for (j, isj) in is.iter_mut().enumerate() {
                // SAFETY: nbias[8g..8g + 8] is in bounds (asserted above); 32 bytes.
                let nb = _mm512_broadcast_i64x4(unsafe {
                    _mm256_loadu_si256(x[j].nbias.as_ptr().add(g * LANES) as *const __m256i)
                });
                *isj = [nb, nb];
            }
        }
        for t in 0..8 {
            let mut xv = [_mm512_setzero_si512(); R];
            for (j, v) in xv.iter_mut().enumerate() {
                // SAFETY: bytes g·256 + 32t .. + 32 of xt, in bounds (asserted above).
                *v = _mm512_broadcast_i64x4(unsafe {
                    _mm256_loadu_si256(
                        x[j].xt.as_ptr().add(g * GROUP_BYTES + 32 * t) as *const __m256i
                    )
                });
            }
            for p in 0..2 {
                // SAFETY: line (g·8 + t)·4 + 2h + p < KC_GROUPS · GROUP_LINES (g < groups <=
                // KC_GROUPS, h < 2), 64-byte aligned.
                let wq = unsafe { _mm512_load_si512(q.add((g * 8 + t) * 4 + 2 * h + p)) };
                for (isj, &xj) in is.iter_mut().zip(&xv) {
                    isj[p] = _mm512_dpbusd_epi32(isj[p], wq, xj);
                }
            }
        }
        for j in 0..R {
            // SAFETY: d[8g..8g + 8] (and s) in bounds (asserted above); 32 bytes each.
            let dx = _mm512_castsi512_ps(_mm512_broadcast_i64x4(unsafe {
                _mm256_loadu_si256(x[j].d.as_ptr().add(g * LANES) as *const __m256i)
            }));
            let xs = if W::HAS_MIN {
                // SAFETY: as above.
                _mm512_castsi512_ps(_mm512_broadcast_i64x4(unsafe {
                    _mm256_loadu_si256(x[j].s.as_ptr().add(g * LANES) as *const __m256i)
                }))
            } else {
                _mm512_setzero_ps()
            };
            for p in 0..2 {
                // SAFETY: line g·4 + 2h + p of d / m, in bounds and aligned (as above).
                let dw = unsafe { _mm512_load_ps(dp.add(g * 4 + 2 * h + p) as *const f32) };
                let mut prod = _mm512_mul_ps(_mm512_mul_ps(dw, dx), _mm512_cvtepi32_ps(is[j][p]));
                if W::HAS_MIN {
                    // SAFETY: as for dw.
                    let mw = unsafe { _mm512_load_ps(mp.add(g * 4 + 2 * h + p) as *const f32) };
                    prod = _mm512_add_ps(prod, _mm512_mul_ps(mw, xs));
                }
                f[j][p] = _mm512_add_ps(f[j][p], prod);
            }
        }
    }
    *acc = f;
}

/// Groups `g0..g0 + gc` of one panel (8 weight rows, `w[i]` with at least `8 · (g0 + gc)`
/// blocks) against activation rows `0..rows` (`x(j, g0)`: row j from group g0 on): the chunk
/// decoded once into `buf`, the rows in fours through `kernel`, their lanes carried in `acc`
/// (`rows · 2` entries: row j, half h at `2j + h`; zero before the first chunk).
///
/// # Safety
/// AVX2, F16C, AVX-512 F/BW/VL/VNNI (`cpu::has_vnni_bw`); `x(j, g0)` for j < rows returns the
/// row's data from group g0 on, at least `gc` groups; `gc <= KC_GROUPS`.
#[target_feature(enable = "avx2,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
pub unsafe fn chunk<'a, W: Tile32>(
    w: [&[W]; PANEL],
    g0: usize,
    gc: usize,
    rows: usize,
    x: &impl Fn(usize, usize) -> XRow<'a>,
    buf: &mut PanelBuf,
    acc: &mut [[__m512; 2]],
) {
    assert!(acc.len() >= rows * 2);
    // SAFETY: the features (contract); every w[i] has 8 · (g0 + gc) blocks.
    unsafe { decode_panel(w, g0, gc, buf) };
    let mut j = 0;
    while j < rows {
        let r = (rows - j).min(4);
        for h in 0..2 {
            // SAFETY: as above; x(j, g0) has the groups g0..g0 + gc; h < 2.
            unsafe {
                match r {
                    1 => run::<W, 1>(buf, gc, h, j, g0, x, acc),
                    2 => run::<W, 2>(buf, gc, h, j, g0, x, acc),
                    3 => run::<W, 3>(buf, gc, h, j, g0, x, acc),
                    _ => run::<W, 4>(buf, gc, h, j, g0, x, acc),
                }
            }
        }
        j += r;
    }
}

/// `len` zero accumulators of `chunk`.
///
/// # Safety
/// AVX-512 F must be available.
#[target_feature(enable = "avx512f")]
pub fn zeros(acc: &mut Vec<[__m512; 2]>, len: usize) {
    acc.clear();
    acc.resize(len, [_mm512_setzero_ps(); 2]);
}

/// The panel's results from its accumulators (`chunk`'s, all of K done): `out(j, y)` gets the
/// 8 dots of activation row j with the panel's weight rows, each `hsum8` of its lanes, computed
/// for 8 rows at once with the same additions: `s_l = a_l + a_{l+4}`, then `s0 + s2` and
/// `s1 + s3`, then their sum.
///
/// # Safety
/// AVX-512 F must be available.
#[target_feature(enable = "avx512f")]
pub fn finish(acc: &[[__m512; 2]], rows: usize, mut out: impl FnMut(usize, [f32; 8])) {
    // Output lane of weight row i after the reduction: quarter i % 4 (rows 0..4 from the first
    // pair of vectors, 4..8 from the second), lane 0 or 2 (see below).
    let idx = _mm512_setr_epi32(0, 4, 8, 12, 2, 6, 10, 14, 0, 0, 0, 0, 0, 0, 0, 0);
    for j in 0..rows {
        // z[2h + p]: rows 2(2h + p) (low half) and 2(2h + p) + 1 (high half)
        let z = [
            acc[2 * j][0],
            acc[2 * j][1],
            acc[2 * j + 1][0],
            acc[2 * j + 1][1],
        ];
        let sum4 = |a: __m512, b: __m512| {
            // quarters [a.q0, a.q2, b.q0, b.q2] + [a.q1, a.q3, b.q1, b.q3]: s_l = a_l + a_{l+4}
            // of rows (a lo, a hi, b lo, b hi)
            _mm512_add_ps(
                _mm512_shuffle_f32x4::<0b10_00_10_00>(a, b),
                _mm512_shuffle_f32x4::<0b11_01_11_01>(a, b),
            )
        };
        // rows 0, 1, 2, 3 and 4, 5, 6, 7 in quarters 0..4
        let (s0, s1) = (sum4(z[0], z[1]), sum4(z[2], z[3]));
        // per quarter q: [s0 + s2, s1 + s3] of s0's row q, then of s1's row q
        let t = _mm512_add_ps(
            _mm512_shuffle_ps::<0b01_00_01_00>(s0, s1),
            _mm512_shuffle_ps::<0b11_10_11_10>(s0, s1),
        );
        // lanes 0 and 2 of each quarter: (s0 + s2) + (s1 + s3)
        let u = _mm512_add_ps(t, _mm512_shuffle_ps::<0b10_11_00_01>(t, t));
        let y = _mm512_permutexvar_ps(idx, u);
        let mut a = [0.0f32; 16];
        // SAFETY: `a` has room for 16 f32; storeu has no alignment requirement.
        unsafe { _mm512_storeu_ps(a.as_mut_ptr(), y) };
        out(j, std::array::from_fn(|i| a[i]));
    }
}

/// `kernel` for activation rows `j0..j0 + R`, half `h`, their accumulators in `acc`.
///
/// # Safety
/// As `kernel`.
#[target_feature(enable = "avx2,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
#[inline]
unsafe fn run<'a, W: Tile32, const R: usize>(
    buf: &PanelBuf,
    groups: usize,
    h: usize,
    j0: usize,
    g0: usize,
    x: &impl Fn(usize, usize) -> XRow<'a>,
    acc: &mut [[__m512; 2]],
) {
    let xr: [XRow<'a>; R] = std::array::from_fn(|j| x(j0 + j, g0));
    let mut a: [[__m512; 2]; R] = std::array::from_fn(|j| acc[(j0 + j) * 2 + h]);
    // SAFETY: the caller's contract.
    unsafe { kernel::<W, R>(buf, groups, h, &xr, &mut a) };
    for (j, v) in a.iter().enumerate() {
        acc[(j0 + j) * 2 + h] = *v;
    }
}
