//! The group loop of the AVX-512 K-quant row kernel (`vnni.rs` has the decodes, the layouts
//! and the sums of one super-block): groups of 8 super-blocks, their sums reduced in registers
//! as they come (`t32`, `t64`, `lanes8`), `block_k_product`'s float operations once per group
//! for the 8 lanes, the AVX2 `SumsK` sums for the super-blocks past the last whole group.
//! Entry points: `dot_row_k_vnni` (one weight row, R activation rows) and `dot_rows_k_vnni`
//! (consecutive weight rows, one activation row: M = 1). Safety as in `x86.rs`.

use std::arch::x86_64::*;

use super::super::{lanes_of, prefetch_ahead};
use super::vnni::{DecodedZ, RowK, XZ_BLOCK, XZ_D};
use crate::matmul::reference::{self as r, BlockQ8K, LANES};

/// The first step of the group's reduction (a transpose that adds as it goes): in each
/// 128-bit lane, [a0+a2, b0+b2, a1+a3, b1+b3].
#[target_feature(enable = "avx512f")]
#[inline]
fn t32(a: __m512i, b: __m512i) -> __m512i {
    _mm512_add_epi32(_mm512_unpacklo_epi32(a, b), _mm512_unpackhi_epi32(a, b))
}

/// The second step: from `t32(v0, v1)` and `t32(v2, v3)`, in each 128-bit lane k the sums of
/// lane k of v0, v1, v2, v3.
#[target_feature(enable = "avx512f")]
#[inline]
fn t64(a: __m512i, b: __m512i) -> __m512i {
    _mm512_add_epi32(_mm512_unpacklo_epi64(a, b), _mm512_unpackhi_epi64(a, b))
}

/// From `t64` of super-blocks 0..4 and of 4..8: lane j = the sum of super-block j's 16 lanes.
#[target_feature(enable = "avx2,avx512f")]
#[inline]
fn lanes8(lo: __m512i, hi: __m512i) -> __m256i {
    // [lo.L0 + lo.L2, lo.L1 + lo.L3, hi.L0 + hi.L2, hi.L1 + hi.L3]
    let u = _mm512_add_epi32(
        _mm512_shuffle_i32x4::<0x44>(lo, hi),
        _mm512_shuffle_i32x4::<0xee>(lo, hi),
    );
    // [u.L0 + u.L1, u.L2 + u.L3]
    let v = _mm512_add_epi32(
        _mm512_shuffle_i32x4::<0x08>(u, u),
        _mm512_shuffle_i32x4::<0x0d>(u, u),
    );
    _mm512_castsi512_si256(v)
}

/// `t32` on 256 bits (the min sums).
#[target_feature(enable = "avx2")]
#[inline]
pub(super) fn t32y(a: __m256i, b: __m256i) -> __m256i {
    _mm256_add_epi32(_mm256_unpacklo_epi32(a, b), _mm256_unpackhi_epi32(a, b))
}

/// `t64` on 256 bits.
#[target_feature(enable = "avx2")]
#[inline]
pub(super) fn t64y(a: __m256i, b: __m256i) -> __m256i {
    _mm256_add_epi32(_mm256_unpacklo_epi64(a, b), _mm256_unpackhi_epi64(a, b))
}

/// `lanes8` on 256 bits.
#[target_feature(enable = "avx2")]
#[inline]
pub(super) fn lanes8y(lo: __m256i, hi: __m256i) -> __m256i {
    _mm256_add_epi32(
        _mm256_permute2x128_si256(lo, hi, 0x20),
        _mm256_permute2x128_si256(lo, hi, 0x31),
    )
}

/// `reference::dot_block_k` of q4_K / q5_K / q6_K for R activation rows (each super-block
/// decoded once), `long`: prefetch the weights into L2 ahead (`prefetch_ahead`). `xz[r]` is `x[r]`'s
/// blocks by `interleave_k4` (the kernel reads `x[r]` only for the super-blocks after the
/// last whole group of 8).
///
/// # Safety
/// `crate::cpu::has_vnni_bw()` must be true; every `x[r]` has at least `w.len()` blocks and every
/// `xz[r]` at least `XZ_BLOCK * w.len()` bytes.
#[target_feature(enable = "avx2,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
pub unsafe fn dot_row_k_vnni<W: RowK, const R: usize>(
    w: &[W],
    x: [&[BlockQ8K]; R],
    xz: [&[u8]; R],
    long: bool,
) -> [f32; R] {
    // SAFETY: the caller's contract is this function's.
    unsafe {
        // GFNI only helps q2_K / q3_K (one instantiation less for the others)
        let gf = W::GF_DECODE && crate::cpu::has_vbmi_gfni();
        match (long, gf) {
            (true, true) => row_k_vnni_gf::<W, R, true>(w, x, xz),
            (false, true) => row_k_vnni_gf::<W, R, false>(w, x, xz),
            (true, false) => row_k_vnni::<W, R, true>(w, x, xz),
            (false, false) => row_k_vnni::<W, R, false>(w, x, xz),
        }
    }
}

/// The sums of super-blocks j and j + 1 of a group (`RowK::sums_z`) for the R rows, through
/// `t32` / `t32y`; `next` holds super-block j decoded and is left holding j + 2 (when in the
/// group): the decode runs one super-block ahead of the sums.
///
/// # Safety
/// As `row_k_vnni`; `j + 1 < LANES`, `wg` is one whole group, `b` its first super-block.
#[inline(always)]
unsafe fn pair<W: RowK, const R: usize, const GF: bool>(
    wg: &[W],
    j: usize,
    next: &mut DecodedZ,
    xz: &[&[u8]; R],
    b: usize,
) -> ([__m512i; R], [__m256i; R]) {
    let mut s = [[_mm512_setzero_si512(); 2]; R];
    let mut m = [[_mm256_setzero_si256(); 2]; R];
    for t in 0..2 {
        let dz = *next;
        if j + t + 1 < LANES {
            let nw = &wg[j + t + 1];
            // SAFETY: AVX2 and AVX-512 F/BW/VL, GFNI if GF (contract); j + t + 1 < 8.
            *next = unsafe {
                if GF {
                    nw.decode_gf()
                } else {
                    nw.decode_z()
                }
            };
        }
        let bb = b + j + t;
        for rr in 0..R {
            let xq = &xz[rr][XZ_BLOCK * bb..XZ_BLOCK * (bb + 1)];
            // SAFETY: AVX-512 VNNI/BW (contract); xq is one whole XZ_BLOCK (a checked slice).
            let (i, mm) = unsafe { W::sums_z(&dz, xq) };
            s[rr][t] = i;
            m[rr][t] = mm;
        }
    }
    let mut out = ([_mm512_setzero_si512(); R], [_mm256_setzero_si256(); R]);
    for rr in 0..R {
        // SAFETY: AVX-512 F, AVX2 (contract).
        unsafe {
            out.0[rr] = t32(s[rr][0], s[rr][1]);
            out.1[rr] = t32y(m[rr][0], m[rr][1]);
        }
    }
    out
}

/// Four super-blocks of a group from j (`pair` twice, then `t64` / `t64y`).
///
/// # Safety
/// As `pair`; `j + 3 < LANES`.
#[inline(always)]
unsafe fn quad<W: RowK, const R: usize, const GF: bool>(
    wg: &[W],
    j: usize,
    next: &mut DecodedZ,
    xz: &[&[u8]; R],
    b: usize,
) -> ([__m512i; R], [__m256i; R]) {
    // SAFETY: the caller's contract.
    let (a0, m0) = unsafe { pair::<W, R, GF>(wg, j, next, xz, b) };
    // SAFETY: as above.
    let (a1, m1) = unsafe { pair::<W, R, GF>(wg, j + 2, next, xz, b) };
    let mut out = ([_mm512_setzero_si512(); R], [_mm256_setzero_si256(); R]);
    for rr in 0..R {
        // SAFETY: AVX-512 F, AVX2 (contract).
        unsafe {
            out.0[rr] = t64(a0[rr], a1[rr]);
            out.1[rr] = t64y(m0[rr], m1[rr]);
        }
    }
    out
}

/// The f16 `d` (and `dmin`) of a group's 8 super-blocks as f32 (`RowK::HALF_OFF`): eight
/// 4-byte loads and one `vpermw` (the word-by-word gather it replaced was a tenth of q2_K's
/// kernel by perf).
///
/// # Safety
/// AVX2, F16C, AVX-512 BW/VL must be available; `wg` holds 8 blocks.
#[inline(always)]
unsafe fn group_halves<W: RowK>(wg: &[W]) -> (__m256, __m256) {
    debug_assert!(wg.len() >= LANES && W::HALF_OFF + 4 <= std::mem::size_of::<W>());
    let word = |j: usize| {
        // SAFETY: HALF_OFF + 4 <= size_of::<W>() (its doc), j < 8 <= wg.len().
        unsafe {
            let p = (wg.as_ptr().add(j) as *const u8).add(W::HALF_OFF);
            std::ptr::read_unaligned(p as *const i32)
        }
    };
    // [d0 dmin0 d1 dmin1 ..] as u16 (or [x d0 x d1 ..] where D_HIGH)
    let v = _mm256_setr_epi32(
        word(0),
        word(1),
        word(2),
        word(3),
        word(4),
        word(5),
        word(6),
        word(7),
    );
    let (i0, i1) = if W::D_HIGH { (1, 0) } else { (0, 1) };
    let idx = _mm256_setr_epi16(
        i0,
        i0 + 2,
        i0 + 4,
        i0 + 6,
        i0 + 8,
        i0 + 10,
        i0 + 12,
        i0 + 14,
        i1,
        i1 + 2,
        i1 + 4,
        i1 + 6,
        i1 + 8,
        i1 + 10,
        i1 + 12,
        i1 + 14,
    );
    let h = _mm256_permutexvar_epi16(idx, v);
    let d = _mm256_cvtph_ps(_mm256_castsi256_si128(h));
    if W::OFFSET_SHIFT.is_some() {
        (d, _mm256_setzero_ps())
    } else {
        (d, _mm256_cvtph_ps(_mm256_extracti128_si256::<1>(h)))
    }
}

/// `dot_row_k_vnni` with one activation row for consecutive weight rows of `nb` super-blocks
/// each: `out[i]` = row i's (the same operations). At M = 1 the per-row way through the plan's
/// dispatch (`Plan::dots`) cost about a sixth of a q2_K row of K = 4096 by perf.
///
/// # Safety
/// `crate::cpu::has_vnni_bw()` must be true.
pub unsafe fn dot_rows_k_vnni<W: RowK>(
    w: &[W],
    nb: usize,
    x: &[BlockQ8K],
    xz: &[u8],
    long: bool,
    out: &mut [f32],
) {
    assert!(
        nb > 0 && w.len() >= nb * out.len() && x.len() >= nb && xz.len() >= XZ_BLOCK * nb,
        "dot_rows_k_vnni: {} weight blocks, {} activation blocks, {} prepared bytes for {} rows of {nb}",
        w.len(),
        x.len(),
        xz.len(),
        out.len()
    );
    let gf = W::GF_DECODE && crate::cpu::has_vbmi_gfni();
    // SAFETY: the caller's contract; the lengths checked above; GFNI where gf.
    unsafe {
        match (long, gf) {
            (true, true) => rows_k_gf::<W, true>(w, nb, x, xz, out),
            (false, true) => rows_k_gf::<W, false>(w, nb, x, xz, out),
            (true, false) => rows_k_plain::<W, true>(w, nb, x, xz, out),
            (false, false) => rows_k_plain::<W, false>(w, nb, x, xz, out),
        }
    }
}

/// `dot_rows_k_vnni` with GFNI.
///
/// # Safety
/// As `dot_rows_k_vnni` with the lengths checked, and GFNI must be available.
#[target_feature(enable = "avx2,f16c,avx512f,avx512bw,avx512vl,avx512vnni,gfni")]
unsafe fn rows_k_gf<W: RowK, const PF: bool>(
    w: &[W],
    nb: usize,
    x: &[BlockQ8K],
    xz: &[u8],
    out: &mut [f32],
) {
    for (o, row) in out.iter_mut().zip(w.chunks_exact(nb)) {
        // SAFETY: the caller's contract; one activation block (and XZ_BLOCK bytes) per block.
        *o = unsafe { row_k::<W, 1, PF, true>(row, [x], [xz]) }[0];
    }
}

/// `dot_rows_k_vnni` without GFNI.
///
/// # Safety
/// As `dot_rows_k_vnni` with the lengths checked.
#[target_feature(enable = "avx2,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn rows_k_plain<W: RowK, const PF: bool>(
    w: &[W],
    nb: usize,
    x: &[BlockQ8K],
    xz: &[u8],
    out: &mut [f32],
) {
    for (o, row) in out.iter_mut().zip(w.chunks_exact(nb)) {
        // SAFETY: the caller's contract; one activation block (and XZ_BLOCK bytes) per block.
        *o = unsafe { row_k::<W, 1, PF, false>(row, [x], [xz]) }[0];
    }
}

/// `row_k_vnni` with GFNI (`RowK::decode_gf`).
///
/// # Safety
/// As `row_k_vnni`, and GFNI must be available.
#[target_feature(enable = "avx2,f16c,avx512f,avx512bw,avx512vl,avx512vnni,gfni")]
unsafe fn row_k_vnni_gf<W: RowK, const R: usize, const PF: bool>(
    w: &[W],
    x: [&[BlockQ8K]; R],
    xz: [&[u8]; R],
) -> [f32; R] {
    // SAFETY: the caller's contract.
    unsafe { row_k::<W, R, PF, true>(w, x, xz) }
}

/// The kernel without GFNI.
///
/// # Safety
/// As `dot_row_k_vnni`.
#[target_feature(enable = "avx2,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
pub(super) unsafe fn row_k_vnni<W: RowK, const R: usize, const PF: bool>(
    w: &[W],
    x: [&[BlockQ8K]; R],
    xz: [&[u8]; R],
) -> [f32; R] {
    // SAFETY: the caller's contract.
    unsafe { row_k::<W, R, PF, false>(w, x, xz) }
}

/// The body of `row_k_vnni` / `row_k_vnni_gf` (inlined into each with its features; the
/// intrinsics need them).
///
/// # Safety
/// As `dot_row_k_vnni`, and GFNI if GF.
#[inline(always)]
unsafe fn row_k<W: RowK, const R: usize, const PF: bool, const GF: bool>(
    w: &[W],
    x: [&[BlockQ8K]; R],
    xz: [&[u8]; R],
) -> [f32; R] {
    let nb = w.len();
    let groups = nb / LANES;
    let mut acc = [_mm256_setzero_ps(); R];
    for g in 0..groups {
        let wg = &w[g * LANES..g * LANES + LANES];
        if PF {
            // into L2, 8 KiB ahead: 14336x4096, 2 threads, quiet machine, 2026-11-27 13:10
            // UTC, alternating runs: q4_k 25.5-27.9 -> 31.5-31.9 GB/s, q5_k 22.9-23.1 ->
            // 32.5-33.2 against the L1 prefetch 2 KiB ahead it replaced. Half the group's
            // bytes here, half before its second quad (spread over the group's work).
            prefetch_ahead(&wg[..LANES / 2]);
        }
        let b = g * LANES;
        // Software-pipelined by one super-block: the decode of j + 1 (its scales are a long
        // dependency chain) is issued before the sums of j; the reduction of the group's
        // sums (`t32`, `t64`, `lanes8`) runs as they come, in registers.
        // SAFETY: AVX2 and AVX-512 F/BW/VL, GFNI if GF: the caller's contract.
        let mut next = unsafe {
            if GF {
                wg[0].decode_gf()
            } else {
                wg[0].decode_z()
            }
        };
        // SAFETY: as above; 0 + 3 and 4 + 3 < 8.
        let (lo, mlo) = unsafe { quad::<W, R, GF>(wg, 0, &mut next, &xz, b) };
        if PF {
            prefetch_ahead(&wg[LANES / 2..]);
        }
        // SAFETY: as above.
        let (hi, mhi) = unsafe { quad::<W, R, GF>(wg, 4, &mut next, &xz, b) };
        // SAFETY: AVX2, F16C, AVX-512 BW/VL (contract); wg is 8 blocks.
        let (dw, dmin) = unsafe { group_halves(wg) };
        for rr in 0..R {
            // the group's 8 activation scales, in its first block (`interleave_k4`)
            let at = XZ_BLOCK * b + XZ_D;
            let xd = &xz[rr][at..at + 32];
            // SAFETY: 32 bytes (a checked slice); AVX (contract).
            let xd = unsafe { _mm256_loadu_ps(xd.as_ptr() as *const f32) };
            let is = lanes8(lo[rr], hi[rr]);
            let (is, ms) = match W::OFFSET_SHIFT {
                // Σ sc (q - 2^s) x = Σ sc q x - 2^s Σ sc bsum, already in `is`; no min
                Some(_) => (_mm256_cvtepi32_ps(is), _mm256_setzero_ps()),
                // the min sums come negated (the `bsums` are)
                None => (
                    _mm256_cvtepi32_ps(is),
                    _mm256_cvtepi32_ps(_mm256_sub_epi32(
                        _mm256_setzero_si256(),
                        lanes8y(mlo[rr], mhi[rr]),
                    )),
                ),
            };
            // block_k_product: (d·xd)·isum - (dmin·xd)·msum, then acc += p
            let p = _mm256_sub_ps(
                _mm256_mul_ps(_mm256_mul_ps(dw, xd), is),
                _mm256_mul_ps(_mm256_mul_ps(dmin, xd), ms),
            );
            acc[rr] = _mm256_add_ps(acc[rr], p);
        }
    }
    let mut lanes = [[0.0f32; LANES]; R];
    for (l, &a) in lanes.iter_mut().zip(&acc) {
        *l = lanes_of(a);
    }
    for b in groups * LANES..nb {
        let wb = &w[b];
        // SAFETY: AVX2 (implied by the contract, `cpu::has_vnni_bw`).
        let q = unsafe { wb.decode() };
        let (d, dmin) = wb.d_dmin();
        for (rr, l) in lanes.iter_mut().enumerate() {
            let xb = &x[rr][b];
            // SAFETY: AVX2 (contract); q is wb.decode().
            let (isum, msum) = unsafe { wb.sums_decoded(&q, xb) };
            l[b % LANES] += r::block_k_product(d, dmin, xb.d, isum, msum);
        }
    }
    let mut out = [0.0f32; R];
    for (o, l) in out.iter_mut().zip(&lanes) {
        *o = r::hsum8(l);
    }
    out
}
