//! The blocked decode-step kernel for KIVI (`int4` / `int2`) caches on AVX2, bit-exact with
//! `super::head_reference` (same float operations in the same order, only scheduled
//! differently; tested in `super::tests` and tests/test_kv_attention.py).
//!
//! Keys: per token, its head_dim codes are widened once into register-resident vectors of 8
//! and dotted against every query head of the GQA group (the group's `rep` heads share one pass
//! over the keys), with the reference's eight lane partial sums and its reduction tree. Values:
//! per query head and 64 channels, the accumulators stay in registers across all tokens; each
//! token adds `(w s) * code` in the reference's order, the zero terms summed apart as there.
//! The reference decodes a row into memory and reads it back per head; here nothing of the
//! cache is written to memory. The float32 tail (KIVI's sinks and residual, up to a few hundred
//! tokens) the same way: each query head's vectors loaded once and dotted against four rows at
//! a time (four independent sums instead of one dependency chain), and the output's channels
//! accumulated in registers across the tail's rows.

use std::arch::x86_64::*;

use super::simd512;
use super::{
    add_value_zeros, f16_at, kivi_key_group, kivi_scaled_query, row_bytes, softmax, Kind, Layer,
};

/// Whether this kernel takes the layer: a KIVI type, head_dim 32, 64 or 128 (register-resident
/// rows), codes in whole 8-byte lanes, on a CPU with AVX2.
pub(super) fn takes(l: &Layer<'_>) -> bool {
    let Kind::Kivi(bits) = l.kind else {
        return false;
    };
    let pack = l.group * bits as usize / 8;
    matches!(l.head_dim, 32 | 64 | 128)
        && l.group.is_multiple_of(32)
        && pack.is_multiple_of(8)
        && crate::cpu::has_avx2()
}

/// `super::head` for a layer `takes` accepted: the AVX-512 loops where the CPU has them.
pub(super) fn head_kivi(
    l: &Layer<'_>,
    bh: usize,
    rep: usize,
    q: &[f32],
    scale: f32,
    mask: Option<&[u8]>,
    out: &mut [f32],
) {
    head_kivi_with(l, bh, rep, q, scale, mask, out, crate::cpu::has_avx512())
}

/// `head_kivi` with the AVX-512 loops on (`wide`, where the CPU has AVX-512) or off (the AVX2
/// ones; for tests, which check both against the reference).
#[allow(clippy::too_many_arguments)]
pub(super) fn head_kivi_with(
    l: &Layer<'_>,
    bh: usize,
    rep: usize,
    q: &[f32],
    scale: f32,
    mask: Option<&[u8]>,
    out: &mut [f32],
    wide: bool,
) {
    assert!(takes(l), "the AVX2 KIVI kernel does not take this layer");
    let wide = wide && crate::cpu::has_avx512();
    if wide {
        // SAFETY: `takes` checked AVX2 and F16C, `has_avx512` AVX-512 F/BW/VL.
        unsafe { head_avx512(l, bh, rep, q, scale, mask, out) }
    } else {
        // SAFETY: `takes` checked that the CPU has AVX2.
        unsafe { head_avx2(l, bh, rep, q, scale, mask, out, false) }
    }
}

/// `head_avx2` compiled with AVX-512 enabled, so its AVX-512 loops inline.
#[target_feature(enable = "avx2,f16c,avx512f,avx512bw,avx512vl")]
fn head_avx512(
    l: &Layer<'_>,
    bh: usize,
    rep: usize,
    q: &[f32],
    scale: f32,
    mask: Option<&[u8]>,
    out: &mut [f32],
) {
    head_avx2(l, bh, rep, q, scale, mask, out, true)
}

/// Little-endian f16 `src` (2 bytes each) as f32 in `out` (the conversion is exact: the same
/// values as `f16_at`), eight at a time with F16C.
#[inline]
#[target_feature(enable = "avx2,f16c")]
fn f16s(src: &[u8], out: &mut [f32]) {
    let src = &src[..2 * out.len()];
    let done = out.len() / 8 * 8;
    let mut chunks = out.chunks_exact_mut(8);
    for (o, b) in (&mut chunks).zip(src.chunks_exact(16)) {
        let b = &b[..16];
        // SAFETY: `b` holds 16 bytes (sliced above); unaligned load.
        let h = unsafe { _mm_loadu_si128(b.as_ptr().cast()) };
        store8(o, _mm256_cvtph_ps(h));
    }
    for (i, o) in chunks.into_remainder().iter_mut().enumerate() {
        *o = f16_at(src, done + i);
    }
}

/// 8 codes (`(byte >> shift) & mask` of 8 consecutive bytes) as f32.
#[inline]
#[target_feature(enable = "avx2")]
fn codes8(bytes: &[u8], shift: __m128i, mask: __m256i) -> __m256 {
    let b: [u8; 8] = bytes[..8].try_into().expect("8 bytes");
    let wide = _mm256_cvtepu8_epi32(_mm_cvtsi64_si128(i64::from_le_bytes(b)));
    _mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srl_epi32(wide, shift), mask))
}

#[inline]
#[target_feature(enable = "avx2")]
fn load8(x: &[f32]) -> __m256 {
    let x = &x[..8];
    // SAFETY: `x` holds 8 f32 (sliced above); unaligned load.
    unsafe { _mm256_loadu_ps(x.as_ptr()) }
}

#[inline]
#[target_feature(enable = "avx2")]
fn store8(x: &mut [f32], v: __m256) {
    let x = &mut x[..8];
    // SAFETY: `x` holds 8 f32 (sliced above); unaligned store.
    unsafe { _mm256_storeu_ps(x.as_mut_ptr(), v) }
}

/// `super::dot`'s reduction of its eight partial sums:
/// `((a0 + a4) + (a1 + a5)) + ((a2 + a6) + (a3 + a7))`.
#[inline]
#[target_feature(enable = "avx2")]
fn reduce8(acc: __m256) -> f32 {
    let s4 = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
    // lanes (s0 + s1, s1 + s0, s2 + s3, s3 + s2): float addition commutes exactly
    let s2 = _mm_add_ps(s4, _mm_shuffle_ps(s4, s4, 0b10_11_00_01));
    _mm_cvtss_f32(_mm_add_ss(s2, _mm_movehl_ps(s2, s2)))
}

/// The kernel; `wide`: the AVX-512 loops (the caller checked the CPU has them).
#[allow(clippy::too_many_arguments)]
#[inline]
#[target_feature(enable = "avx2,f16c")]
fn head_avx2(
    l: &Layer<'_>,
    bh: usize,
    rep: usize,
    q: &[f32],
    scale: f32,
    mask: Option<&[u8]>,
    out: &mut [f32],
    wide: bool,
) {
    let total = l.n_quant + l.n_tail;
    let mut scores = vec![0f32; rep * total];
    match l.head_dim {
        32 => scores_l::<4>(l, bh, rep, q, scale, &mut scores, wide),
        64 => scores_l::<8>(l, bh, rep, q, scale, &mut scores, wide),
        128 => scores_l::<16>(l, bh, rep, q, scale, &mut scores, wide),
        _ => unreachable!("takes() admits head_dim 32, 64, 128"),
    }
    softmax(&mut scores, rep, total, mask);
    values(l, bh, rep, &scores, out, wide);
    if wide {
        // SAFETY: `wide` only where the CPU has AVX-512 F/BW/VL (head_kivi_with).
        unsafe { simd512::tail_values(l, bh, rep, &scores, out) }
    } else {
        tail_values(l, bh, rep, &scores, out);
    }
}

/// The keys' and the tail's scores, head_dim = 8 L.
#[allow(clippy::too_many_arguments)]
#[inline]
#[target_feature(enable = "avx2")]
fn scores_l<const L: usize>(
    l: &Layer<'_>,
    bh: usize,
    rep: usize,
    q: &[f32],
    scale: f32,
    scores: &mut [f32],
    wide: bool,
) {
    key_scores::<L>(l, bh, rep, q, scale, scores, wide);
    if wide {
        // SAFETY: `wide` only where the CPU has AVX-512 F/BW/VL (head_kivi_with).
        unsafe { simd512::tail_scores::<L>(l, bh, rep, q, scale, scores) }
    } else {
        tail_scores::<L>(l, bh, rep, q, scale, scores);
    }
}

/// `super::tail_scores`, head_dim = 8 L: per query head its L vectors stay in registers and
/// four tail rows are dotted at once, each with the reference's lane sums and reduction.
#[inline]
#[target_feature(enable = "avx2")]
fn tail_scores<const L: usize>(
    l: &Layer<'_>,
    bh: usize,
    rep: usize,
    q: &[f32],
    scale: f32,
    scores: &mut [f32],
) {
    let d = l.head_dim;
    let total = l.n_quant + l.n_tail;
    let base = bh * l.tail_cap * d;
    let rows = &l.tail_k[base..base + l.n_tail * d];
    for r in 0..rep {
        let mut qv = [_mm256_setzero_ps(); L];
        for (k, v) in qv.iter_mut().enumerate() {
            *v = load8(&q[r * d + 8 * k..]);
        }
        let s = &mut scores[r * total + l.n_quant..(r + 1) * total];
        let blocks = rows.chunks_exact(4 * d);
        let rest = blocks.remainder();
        let mut i = 0;
        for four in blocks {
            let mut acc = [_mm256_setzero_ps(); 4];
            for (k, qk) in qv.iter().enumerate() {
                for (j, a) in acc.iter_mut().enumerate() {
                    *a = _mm256_add_ps(*a, _mm256_mul_ps(*qk, load8(&four[j * d + 8 * k..])));
                }
            }
            for (j, a) in acc.iter().enumerate() {
                s[i + j] = reduce8(*a) * scale;
            }
            i += 4;
        }
        for row in rest.chunks_exact(d) {
            let mut acc = _mm256_setzero_ps();
            for (k, qk) in qv.iter().enumerate() {
                acc = _mm256_add_ps(acc, _mm256_mul_ps(*qk, load8(&row[8 * k..])));
            }
            s[i] = reduce8(acc) * scale;
            i += 1;
        }
    }
}

/// `super::tail_values`: per query head and 32 channels the output stays in registers across
/// the tail's rows; each row with a non-zero weight adds `w * row` in token order.
#[inline]
#[target_feature(enable = "avx2")]
fn tail_values(l: &Layer<'_>, bh: usize, rep: usize, scores: &[f32], out: &mut [f32]) {
    let d = l.head_dim;
    let total = l.n_quant + l.n_tail;
    let base = bh * l.tail_cap * d;
    let rows = &l.tail_v[base..base + l.n_tail * d];
    for r in 0..rep {
        let w_r = &scores[r * total + l.n_quant..(r + 1) * total];
        for c0 in (0..d).step_by(32) {
            let o = &mut out[r * d + c0..r * d + c0 + 32];
            let mut acc = [_mm256_setzero_ps(); 4];
            for (k, a) in acc.iter_mut().enumerate() {
                *a = load8(&o[8 * k..]);
            }
            for (row, &w) in rows.chunks_exact(d).zip(w_r) {
                if w == 0.0 {
                    continue;
                }
                let ws = _mm256_set1_ps(w);
                for (k, a) in acc.iter_mut().enumerate() {
                    *a = _mm256_add_ps(*a, _mm256_mul_ps(ws, load8(&row[c0 + 8 * k..])));
                }
            }
            for (k, a) in acc.iter().enumerate() {
                store8(&mut o[8 * k..], *a);
            }
        }
    }
}

/// The quantized keys' scores, head_dim = 8 L: a group's codes are `pack` lines of head_dim
/// bytes; line j holds tokens j, j + pack, ... in its bit fields from the low bits up.
#[inline]
#[target_feature(enable = "avx2")]
fn key_scores<const L: usize>(
    l: &Layer<'_>,
    bh: usize,
    rep: usize,
    q: &[f32],
    scale: f32,
    scores: &mut [f32],
    wide: bool,
) {
    let Kind::Kivi(bits) = l.kind else {
        unreachable!("takes() admits KIVI only")
    };
    let (d, g) = (l.head_dim, l.group);
    let total = l.n_quant + l.n_tail;
    let mask_bits = _mm256_set1_epi32((1 << bits) - 1);
    let (mut ks, mut kz) = (vec![0f32; d], vec![0f32; d]);
    let (mut qs, mut cst) = (vec![0f32; rep * d], vec![0f32; rep]);
    let pack = g * bits as usize / 8;
    let group_bytes = pack * d;
    for grp in 0..l.n_quant.div_ceil(g) {
        kivi_key_group(&l.k, bh, grp, &mut ks, &mut kz);
        kivi_scaled_query(q, &ks, &kz, &mut qs, &mut cst);
        let at = bh * l.k.cap + grp;
        let main = &l.k.main[at * group_bytes..(at + 1) * group_bytes];
        let n = g.min(l.n_quant - grp * g);
        if wide {
            let s = &mut scores[grp * g..];
            // SAFETY: `wide` only where the CPU has AVX-512 F/BW/VL (head_kivi_with).
            unsafe { simd512::key_group::<L>(bits, main, n, rep, &qs, &cst, scale, total, s) };
            continue;
        }
        for (j, line) in main.chunks_exact(d).enumerate() {
            for field in 0..8 / bits as usize {
                let i = field * pack + j;
                if i >= n {
                    break;
                }
                let shift = _mm_cvtsi32_si128((bits as usize * field) as i32);
                let mut codes = [_mm256_setzero_ps(); L];
                for (c, bytes) in codes.iter_mut().zip(line.chunks_exact(8)) {
                    *c = codes8(bytes, shift, mask_bits);
                }
                for r in 0..rep {
                    let qr = &qs[r * d..(r + 1) * d];
                    let mut acc = _mm256_setzero_ps();
                    for (k, c) in codes.iter().enumerate() {
                        acc = _mm256_add_ps(acc, _mm256_mul_ps(load8(&qr[8 * k..]), *c));
                    }
                    let sc = reduce8(acc) + cst[r];
                    scores[r * total + grp * g + i] = sc * scale;
                }
            }
        }
    }
}

/// The quantized values' part of `out` (written, not added: the reference starts from 0).
#[inline]
#[target_feature(enable = "avx2,f16c")]
fn values(l: &Layer<'_>, bh: usize, rep: usize, scores: &[f32], out: &mut [f32], wide: bool) {
    // R query heads per pass over the rows, each with W = 4 vectors of accumulators in
    // registers (head_dim is 32, 64 or 128: whole blocks of 32 channels)
    let wide = wide && simd512::takes_values(l);
    match (rep % 4, rep % 3, rep % 2) {
        (0, _, _) => values_r::<4, 4>(l, bh, rep, scores, out, wide),
        (_, 0, _) => values_r::<3, 4>(l, bh, rep, scores, out, wide),
        (_, _, 0) => values_r::<2, 4>(l, bh, rep, scores, out, wide),
        _ => values_r::<1, 4>(l, bh, rep, scores, out, wide),
    }
}

/// `values` with R query heads per pass and W vectors of 8 channels per register block: row t
/// holds head_dim / g blocks of `pack` bytes; channel j of a block is byte j % pack, bit field
/// j / pack. Per token the codes are widened once and added to the R heads' accumulators.
#[inline]
#[target_feature(enable = "avx2,f16c")]
fn values_r<const R: usize, const W: usize>(
    l: &Layer<'_>,
    bh: usize,
    rep: usize,
    scores: &[f32],
    out: &mut [f32],
    wide: bool,
) {
    let Kind::Kivi(bits) = l.kind else {
        unreachable!("takes() admits KIVI only")
    };
    let (d, g) = (l.head_dim, l.group);
    let total = l.n_quant + l.n_tail;
    let mask_bits = _mm256_set1_epi32((1 << bits) - 1);
    let pack = g * bits as usize / 8;
    let nb = d / g;
    let (m, sb, zb) = row_bytes(l.kind, false, d, g);
    // the rows' scales and zeros: one contiguous run of f16 per (batch, head)
    let (first, last) = (bh * l.v.cap * sb, (bh * l.v.cap + l.n_quant) * sb);
    let (mut vs, mut vz) = (vec![0f32; l.n_quant * nb], vec![0f32; l.n_quant * nb]);
    f16s(&l.v.scale[first..last], &mut vs);
    f16s(&l.v.zero[first..last], &mut vz);
    debug_assert_eq!(sb, zb);
    let rows = &l.v.main[bh * l.v.cap * m..(bh * l.v.cap + l.n_quant) * m];
    let mut zsum = vec![0f32; rep * nb];
    if wide {
        // SAFETY: `wide` only where the CPU has AVX-512 F/BW/VL (head_kivi_with).
        unsafe { simd512::values::<R>(l, bh, rep, scores, &vs, &vz, &mut zsum, out) };
        return add_value_zeros(out, &zsum, d, g);
    }
    for r in 0..rep {
        let w_r = &scores[r * total..r * total + l.n_quant];
        for b in 0..nb {
            let mut z = 0f32; // Σ_t w z in token order, in a register
            for (t, &w) in w_r.iter().enumerate() {
                if w != 0.0 {
                    z += w * vz[t * nb + b];
                }
            }
            zsum[r * nb + b] = z;
        }
    }
    for r0 in (0..rep).step_by(R) {
        for c0 in (0..d).step_by(8 * W) {
            // a register block lies in one value block (g is a multiple of 32), one bit field
            // per vector, fixed over the tokens
            let b = c0 / g;
            let mut at = [0usize; W];
            let mut shift = [_mm_setzero_si128(); W];
            for k in 0..W {
                let j = c0 % g + 8 * k;
                at[k] = b * pack + j % pack;
                shift[k] = _mm_cvtsi32_si128((bits as usize * (j / pack)) as i32);
            }
            let mut acc = [[_mm256_setzero_ps(); W]; R];
            for (t, row) in rows.chunks_exact(m).enumerate() {
                let mut codes = [_mm256_setzero_ps(); W];
                for k in 0..W {
                    codes[k] = codes8(&row[at[k]..], shift[k], mask_bits);
                }
                let s = vs[t * nb + b];
                for (i, a) in acc.iter_mut().enumerate() {
                    let w = scores[(r0 + i) * total + t];
                    if w == 0.0 {
                        continue;
                    }
                    let ws = _mm256_set1_ps(w * s);
                    for k in 0..W {
                        a[k] = _mm256_add_ps(a[k], _mm256_mul_ps(ws, codes[k]));
                    }
                }
            }
            for (i, a) in acc.iter().enumerate() {
                for (k, v) in a.iter().enumerate() {
                    let o = (r0 + i) * d + c0 + 8 * k;
                    store8(&mut out[o..o + 8], *v);
                }
            }
        }
    }
    add_value_zeros(out, &zsum, d, g);
}
