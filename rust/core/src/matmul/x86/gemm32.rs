//! The GEMM microkernel of the 32-weight formats (q4_0, q5_0, q8_0, iq4_nl, q4_1, q5_1) for
//! many activation rows, AVX-512 F/BW/VL/VNNI: a panel of 8 weight rows is decoded once per
//! chunk of K (`KC_GROUPS` groups of 8 blocks) into an L1-resident buffer (`PanelBuf`, two rows
//! at a time on 512-bit vectors, `pair32.rs`), then pairs of activation rows run through the
//! whole chunk against all 8 rows with their float accumulators in registers.
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
//! **A partial last group** (K not a multiple of 256: SmolLM2's 576 is 2 groups and 2 blocks)
//! runs narrower instead of padded to a whole group: its `n` blocks (`tail_width(n)` = 2, 4 or
//! 8 of them a row) of all 8 weight rows share `TB / 2` vectors (`decode_tail`), lane
//! `(row % (16 / TB)) · TB + b` holding block b of the row, so 2 tail blocks cost 8 `vpdpbusd`
//! a row instead of the 32 of a padded group. Each lane's product is the reference's
//! `(d_w · d_x) · isum` (+ `m_w · s_x`) and is permuted into its row's lane b of the float
//! accumulator, added with a mask that leaves every other lane untouched: lane b < n gets block
//! `8 · groups + b`, as `reference::dot_block32` adds it.
//!
//! Safety: callers check AVX2, F16C and AVX-512 F/BW/VL/VNNI at run time
//! (`cpu::has_vnni_bw`) and pass slices of the lengths stated on each function.

use std::arch::x86_64::*;

pub use super::pair32::{
    decode_panel, decode_tail, tail_bytes, tail_width, Pair32, PanelBuf, KC_GROUPS, PANEL,
};
use super::tile::{Tile32, GROUP_BYTES};
use crate::matmul::reference::LANES;

/// One activation row's last `blocks.len()` (1..8) blocks in the narrow layout of the tail
/// kernel: bytes `4 · TB · t + 4b .. + 4` are bytes `4t .. 4t + 4` of block b's quants (zero
/// for b >= n); `out` holds `tail_bytes(n)` bytes.
pub fn interleave_tail(blocks: &[crate::formats::blocks::BlockQ8_0], out: &mut [u8]) {
    let tb = tail_width(blocks.len());
    out.fill(0);
    for (b, blk) in blocks.iter().enumerate() {
        let q: &[u8; 32] = bytemuck::cast_ref(&blk.qs);
        for t in 0..8 {
            out[4 * tb * t + 4 * b..][..4].copy_from_slice(&q[4 * t..4 * t + 4]);
        }
    }
}

/// One activation row of a microkernel call, from group `g0` of the chunk on: its interleaved
/// quants (`tile::interleave_q8_0`), and per block `-BIAS · Σx` (empty where BIAS is 0), the
/// scale and (q8_1) `s` (those of the partial last group, if any, after the whole groups'),
/// and the partial last group's quants in the narrow layout (`interleave_tail`; empty without
/// one).
#[derive(Clone, Copy)]
pub struct XRow<'a> {
    pub xt: &'a [u8],
    pub xtail: &'a [u8],
    pub nbias: &'a [i32],
    pub d: &'a [f32],
    pub s: &'a [f32],
}

/// R activation rows against all 4 row pairs of the decoded chunk (`groups` groups):
/// `acc[j][p]` (the 16 float lanes of rows 2p, 2p + 1 with activation row j) += each block's
/// product, block by block. Two rows by 4 pairs (8 integer and 8 float accumulators, each
/// weight vector loaded once for both rows, each activation broadcast once for all 8 weight
/// rows) was 1.2-1.35x as fast as 4 rows by 2 pairs at M = 8..512 and 3 rows by 4 pairs (which
/// runs out of registers) 0.9x (q4_0 / q8_0 / q5_1, one thread, CPU time, 2026-12-06).
///
/// Always inlined into `chunk` (compiled with the features below): as a call of its own,
/// q4_1 / q5_1's larger body was not inlined, and passing the accumulators through memory
/// cost about 10 % at M = 512 (perf, one thread).
///
/// `tail` (0..8): blocks of a partial group after the `groups` whole ones (`decode_tail`).
///
/// # Safety
/// AVX2, F16C, AVX-512 F/BW/VL/VNNI (`cpu::has_vnni_bw`), and called only from functions
/// compiled with them; `buf` holds `groups` decoded groups (and the tail); every `x[j]` has
/// `groups * GROUP_BYTES` interleaved bytes and `groups * 8 + tail` scales (and `nbias` where
/// BIAS is not 0, `s` for q4_1 / q5_1), and `tail_bytes(tail)` of `xtail` with a tail.
#[inline(always)]
pub unsafe fn kernel<W: Tile32, const R: usize>(
    buf: &PanelBuf,
    groups: usize,
    tail: usize,
    x: &[XRow<'_>; R],
    acc: &mut [Acc; R],
) {
    const P: usize = PANEL / 2;
    assert!(groups <= KC_GROUPS && tail < LANES);
    let nblocks = groups * LANES + tail;
    for xj in x {
        assert!(xj.xt.len() >= groups * GROUP_BYTES && xj.d.len() >= nblocks);
        assert!(W::BIAS == 0 || xj.nbias.len() >= nblocks);
        assert!(!W::HAS_MIN || xj.s.len() >= nblocks);
        assert!(tail == 0 || xj.xtail.len() >= tail_bytes(tail));
    }
    let mut f = *acc;
    let q = buf.q.as_ptr() as *const __m512i;
    let dp = buf.d.as_ptr() as *const __m512;
    let mp = buf.m.as_ptr() as *const __m512;
    for g in 0..groups {
        let mut is = [[_mm512_setzero_si512(); P]; R];
        if W::BIAS != 0 {
            for (j, isj) in is.iter_mut().enumerate() {
                // SAFETY: nbias[8g..8g + 8] is in bounds (asserted above); 32 bytes.
                let nb = _mm512_broadcast_i64x4(unsafe {
                    _mm256_loadu_si256(x[j].nbias.as_ptr().add(g * LANES) as *const __m256i)
                });
                *isj = [nb; P];
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
            for p in 0..P {
                // SAFETY: line (g·8 + t)·4 + p < KC_GROUPS · GROUP_LINES (g < groups <=
                // KC_GROUPS, p < 4), 64-byte aligned.
                let wq = unsafe { _mm512_load_si512(q.add((g * 8 + t) * P + p)) };
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
            for p in 0..P {
                // SAFETY: line g·4 + p of d / m, in bounds and aligned (as above).
                let dw = unsafe { _mm512_load_ps(dp.add(g * P + p) as *const f32) };
                let mut prod = _mm512_mul_ps(_mm512_mul_ps(dw, dx), _mm512_cvtepi32_ps(is[j][p]));
                if W::HAS_MIN {
                    // SAFETY: as for dw.
                    let mw = unsafe { _mm512_load_ps(mp.add(g * P + p) as *const f32) };
                    prod = _mm512_add_ps(prod, _mm512_mul_ps(mw, xs));
                }
                f[j][p] = _mm512_add_ps(f[j][p], prod);
            }
        }
    }
    if tail > 0 {
        // SAFETY: the caller's contract (the tail's scales from block 8 · groups on).
        unsafe {
            match tail_width(tail) {
                2 => tail_step::<W, R, 2>(buf, groups * LANES, tail, x, &mut f),
                4 => tail_step::<W, R, 4>(buf, groups * LANES, tail, x, &mut f),
                _ => tail_step::<W, R, 8>(buf, groups * LANES, tail, x, &mut f),
            }
        }
    }
    *acc = f;
}

/// The partial last group of `kernel` (`n` blocks from block `b0` of each `x[j]`, TB =
/// `tail_width(n)`): TB / 2 vectors of integer sums per activation row, their float products
/// permuted into the rows' accumulators and added to lanes 0..n of each half only.
///
/// # Safety
/// As `kernel`, with `buf`'s tail decoded for these n blocks.
#[inline(always)]
unsafe fn tail_step<W: Tile32, const R: usize, const TB: usize>(
    buf: &PanelBuf,
    b0: usize,
    n: usize,
    x: &[XRow<'_>; R],
    f: &mut [Acc; R],
) {
    const P: usize = PANEL / 2;
    let v_count = TB / 2;
    let rv = 16 / TB;
    let lanes: __mmask8 = (1u8 << n).wrapping_sub(1);
    let tq = buf.tq.as_ptr() as *const __m512i;
    let mut is = [[_mm512_setzero_si512(); P]; R];
    if W::BIAS != 0 {
        for (j, isj) in is.iter_mut().enumerate() {
            // SAFETY: nbias[b0..b0 + n] is in bounds (the caller's contract).
            *isj = [unsafe { bcast_tail::<TB>(x[j].nbias[b0..].as_ptr(), lanes) }; P];
        }
    }
    for t in 0..8 {
        let mut xv = [_mm512_setzero_si512(); R];
        for (j, v) in xv.iter_mut().enumerate() {
            let q = x[j].xtail[4 * TB * t..][..4 * TB].as_ptr();
            // SAFETY: 4 · TB bytes of xtail (sliced just now); the features (contract).
            *v = unsafe {
                match TB {
                    2 => _mm512_set1_epi64((q as *const i64).read_unaligned()),
                    4 => _mm512_broadcast_i32x4(_mm_loadu_si128(q as *const __m128i)),
                    _ => _mm512_broadcast_i64x4(_mm256_loadu_si256(q as *const __m256i)),
                }
            };
        }
        for v in 0..v_count {
            // SAFETY: line t · 4 + v < GROUP_LINES, 64-byte aligned.
            let wq = unsafe { _mm512_load_si512(tq.add(t * 4 + v)) };
            for (isj, &xj) in is.iter_mut().zip(&xv) {
                isj[v] = _mm512_dpbusd_epi32(isj[v], wq, xj);
            }
        }
    }
    // Pair p (rows 2p, 2p + 1): lane h · 8 + b takes lane ((2p + h) % rv) · TB + b of vector
    // (2p) / rv; only lanes b < n of each half are added.
    let mut perm = [_mm512_setzero_si512(); P];
    for (p, v) in perm.iter_mut().enumerate() {
        let idx: [i32; 16] =
            std::array::from_fn(|l| (((2 * p + l / 8) % rv) * TB + (l % 8) % TB) as i32);
        // SAFETY: 16 i32 (64 bytes).
        *v = unsafe { _mm512_loadu_si512(idx.as_ptr() as *const __m512i) };
    }
    let mask: __mmask16 = lanes as u16 | (lanes as u16) << 8;
    for j in 0..R {
        // SAFETY: d[b0..b0 + n] (and s) are in bounds (the caller's contract).
        let dx = _mm512_castsi512_ps(unsafe {
            bcast_tail::<TB>(x[j].d[b0..].as_ptr() as *const i32, lanes)
        });
        let xs = if W::HAS_MIN {
            // SAFETY: as for dx.
            _mm512_castsi512_ps(unsafe {
                bcast_tail::<TB>(x[j].s[b0..].as_ptr() as *const i32, lanes)
            })
        } else {
            _mm512_setzero_ps()
        };
        let mut prod = [_mm512_setzero_ps(); P];
        for (v, pv) in prod.iter_mut().enumerate().take(v_count) {
            // SAFETY: lines v of td / tm, in bounds and aligned.
            let dw = unsafe { _mm512_load_ps(buf.td[v].0.as_ptr() as *const f32) };
            *pv = _mm512_mul_ps(_mm512_mul_ps(dw, dx), _mm512_cvtepi32_ps(is[j][v]));
            if W::HAS_MIN {
                // SAFETY: as for dw.
                let mw = unsafe { _mm512_load_ps(buf.tm[v].0.as_ptr() as *const f32) };
                *pv = _mm512_add_ps(*pv, _mm512_mul_ps(mw, xs));
            }
        }
        for p in 0..P {
            let src = prod[2 * p / rv];
            let y = if TB == 8 {
                src
            } else {
                _mm512_permutexvar_ps(perm[p], src)
            };
            f[j][p] = _mm512_mask_add_ps(f[j][p], mask, f[j][p], y);
        }
    }
}

/// TB 32-bit values from `p` (the first n of them, `lanes`; the rest zero), repeated over the
/// 16 lanes.
///
/// # Safety
/// AVX-512 F/VL, and called only from functions compiled with them; `p..p + n` readable (the
/// masked loads never touch the lanes left out).
#[inline(always)]
unsafe fn bcast_tail<const TB: usize>(p: *const i32, lanes: __mmask8) -> __m512i {
    // SAFETY: the contract.
    unsafe {
        match TB {
            2 => _mm512_broadcastq_epi64(_mm_maskz_loadu_epi32(lanes, p)),
            4 => _mm512_broadcast_i32x4(_mm_maskz_loadu_epi32(lanes, p)),
            _ => _mm512_broadcast_i64x4(_mm256_maskz_loadu_epi32(lanes, p)),
        }
    }
}

/// The float lanes of one activation row with one panel: pair p (rows 2p, 2p + 1) at `[p]`.
pub type Acc = [__m512; PANEL / 2];

/// Groups `g0..g0 + gc` of one panel (8 weight rows, `w[i]` with at least `8 · (g0 + gc)`
/// blocks), then `tail` (0..8) blocks of a partial group after them, against activation rows
/// `0..rows` (`x(j, g0)`: row j from group g0 on): the chunk decoded once into `buf`, the rows
/// in twos through `kernel`, their lanes carried in `acc` (`rows` entries; read only when not
/// `first`, the panel's first chunk starting from zero lanes).
/// `next` (rows, first group, groups): the panel chunk the caller runs next, prefetched into
/// L2 a share of its rows before each pair of activation rows (session 19: the whole chunk
/// before `chunk`, 272 lines for q8_0, filled the line buffers and the prefetches themselves
/// stalled, a quarter of q8_0's samples at M = 8; spread out, q4_0 / q5_0 / q8_0 at M = 8
/// were 1-10 % faster, one thread, CPU time, 4096x14336, load 20).
///
/// # Safety
/// AVX2, F16C, AVX-512 F/BW/VL/VNNI (`cpu::has_vnni_bw`); `x(j, g0)` for j < rows returns the
/// row's data from group g0 on, at least `gc` groups (and the tail, `kernel`); `gc <=
/// KC_GROUPS`; with a tail every `w[i]` has `8 · (g0 + gc) + tail` blocks.
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx2,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
pub unsafe fn chunk<'a, W: Pair32>(
    w: [&[W]; PANEL],
    g0: usize,
    gc: usize,
    tail: usize,
    first: bool,
    rows: usize,
    x: &impl Fn(usize, usize) -> XRow<'a>,
    buf: &mut PanelBuf,
    acc: &mut [Acc],
    next: Option<([&[W]; PANEL], usize, usize)>,
) {
    assert!(acc.len() >= rows);
    // SAFETY: the features (contract); every w[i] has 8 · (g0 + gc) blocks (+ tail).
    unsafe {
        decode_panel(w, g0, gc, buf);
        if tail > 0 {
            decode_tail(w, (g0 + gc) * LANES, tail, buf);
        }
    }
    let runs = rows.div_ceil(2);
    let mut pf = 0;
    let mut j = 0;
    while j < rows {
        // The next panel chunk's rows into L2 a share before each run (`next`).
        if let Some((nw, ng, ngc)) = next {
            let upto = PANEL * (j / 2 + 1) / runs;
            for wr in &nw[pf..upto] {
                prefetch_row(wr, ng, ngc);
            }
            pf = upto;
        }
        if j + 2 <= rows {
            // SAFETY: as above; x(j, g0) has the groups g0..g0 + gc (and the tail).
            unsafe { run::<W, 2>(buf, gc, tail, first, j, g0, x, acc) };
        } else {
            // SAFETY: as above.
            unsafe { run::<W, 1>(buf, gc, tail, first, j, g0, x, acc) };
        }
        j += 2;
    }
}

/// Prefetches (into L2) the bytes of groups `g0..g0 + groups` of one of the panel's rows, of
/// the next panel chunk `chunk` will decode: at M = 8 / 16 the decode otherwise waits on
/// memory.
#[inline]
fn prefetch_row<W: Pair32>(wi: &[W], g0: usize, groups: usize) {
    let b: &[u8] = bytemuck::cast_slice(&wi[g0 * LANES..(g0 + groups) * LANES]);
    for off in (0..b.len()).step_by(64).chain([b.len().saturating_sub(1)]) {
        // SAFETY: off < b.len() (b is not empty: groups >= 1); prefetching never faults.
        unsafe { _mm_prefetch::<_MM_HINT_T1>(b.as_ptr().add(off) as *const i8) };
    }
}

/// Room for `len` accumulators of `chunk` (their values are written by each panel's first
/// chunk: zeroing them every block of rows cost 4 % of a 576x576 q8_0 call at M = 128, perf).
///
/// # Safety
/// AVX-512 F must be available.
#[target_feature(enable = "avx512f")]
pub fn room(acc: &mut Vec<Acc>, len: usize) {
    if acc.len() < len {
        acc.resize(len, [_mm512_setzero_ps(); PANEL / 2]);
    }
}
/// The panel's results from its accumulators (`chunk`'s, all of K done): `out(j, y)` gets the
/// 8 dots of activation row j with the panel's weight rows, each `hsum8` of its lanes, computed
/// for 8 rows at once with the same additions: `s_l = a_l + a_{l+4}`, then `s0 + s2` and
/// `s1 + s3`, then their sum.
///
/// # Safety
/// AVX-512 F must be available.
#[target_feature(enable = "avx512f")]
pub fn finish(acc: &[Acc], rows: usize, mut out: impl FnMut(usize, [f32; 8])) {
    // Output lane of weight row i after the reduction: quarter i % 4 (rows 0..4 from the first
    // pair of vectors, 4..8 from the second), lane 0 or 2 (see below).
    let idx = _mm512_setr_epi32(0, 4, 8, 12, 2, 6, 10, 14, 0, 0, 0, 0, 0, 0, 0, 0);
    for (j, &z) in acc[..rows].iter().enumerate() {
        // z[p]: rows 2p (low half) and 2p + 1 (high half)
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

/// `kernel` for activation rows `j0..j0 + R`, their accumulators in `acc`.
///
/// # Safety
/// As `kernel`.
#[target_feature(enable = "avx2,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
#[inline]
#[allow(clippy::too_many_arguments)]
unsafe fn run<'a, W: Tile32, const R: usize>(
    buf: &PanelBuf,
    groups: usize,
    tail: usize,
    first: bool,
    j0: usize,
    g0: usize,
    x: &impl Fn(usize, usize) -> XRow<'a>,
    acc: &mut [Acc],
) {
    let xr: [XRow<'a>; R] = std::array::from_fn(|j| x(j0 + j, g0));
    let mut a: [Acc; R] = if first {
        [[_mm512_setzero_ps(); PANEL / 2]; R]
    } else {
        std::array::from_fn(|j| acc[j0 + j])
    };
    // SAFETY: the caller's contract.
    unsafe { kernel::<W, R>(buf, groups, tail, &xr, &mut a) };
    acc[j0..j0 + R].copy_from_slice(&a);
}
