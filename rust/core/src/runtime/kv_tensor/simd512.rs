//! The AVX-512 halves of the KIVI decode-step kernel (`simd.rs` dispatches here where the CPU
//! has AVX-512 F/BW/VL): the same float operations per lane, in the same order, as the AVX2
//! kernel and `super::head_reference`, on 16 lanes instead of 8, so results are bit-identical.
//!
//! Keys (and the float32 tail's keys): two tokens per zmm register, token A in lanes 0-7 and
//! token B in lanes 8-15, each with the reference's eight lane partial sums; the query vector
//! is the same in both halves, and the reduction tree runs in both halves at once. Values (and
//! the tail's values): 16 channels per register, each channel's accumulator summing the tokens
//! in token order (`(w s) * code` multiplied, then added: no fused multiply-add, as there).

use std::arch::x86_64::*;

use super::{row_bytes, Kind, Layer};

/// Whether the value kernel takes the layer's blocks: 16 channels of one register must share
/// one bit field (`pack`, the bytes per value block, a multiple of 16).
pub(super) fn takes_values(l: &Layer<'_>) -> bool {
    let Kind::Kivi(bits) = l.kind else {
        return false;
    };
    (l.group * bits as usize / 8).is_multiple_of(16) && l.head_dim.is_multiple_of(32)
}

/// Eight f32 `x[..8]` in both 256-bit halves of a zmm register.
#[inline]
#[target_feature(enable = "avx512f")]
fn dup8(x: &[f32]) -> __m512 {
    let x = &x[..8];
    // SAFETY: `x` holds 8 f32 (sliced above); unaligned load.
    let v = _mm512_castps256_ps512(unsafe { _mm256_loadu_ps(x.as_ptr()) });
    _mm512_shuffle_f32x4(v, v, 0b01_00_01_00)
}

#[inline]
#[target_feature(enable = "avx512f")]
fn load16(x: &[f32]) -> __m512 {
    let x = &x[..16];
    // SAFETY: `x` holds 16 f32 (sliced above); unaligned load.
    unsafe { _mm512_loadu_ps(x.as_ptr()) }
}

#[inline]
#[target_feature(enable = "avx512f")]
fn store16(x: &mut [f32], v: __m512) {
    let x = &mut x[..16];
    // SAFETY: `x` holds 16 f32 (sliced above); unaligned store.
    unsafe { _mm512_storeu_ps(x.as_mut_ptr(), v) }
}

/// Rows a[..8] (lanes 0-7) and b[..8] (lanes 8-15) of float32.
#[inline]
#[target_feature(enable = "avx512f")]
fn pair8(a: &[f32], b: &[f32]) -> __m512 {
    let (a, b) = (&a[..8], &b[..8]);
    // SAFETY: `a` holds 8 f32 (sliced above); unaligned load.
    let lo = _mm512_castps256_ps512(unsafe { _mm256_loadu_ps(a.as_ptr()) });
    // SAFETY: `b` holds 8 f32 (sliced above); unaligned load.
    let hi = _mm512_castps256_ps512(unsafe { _mm256_loadu_ps(b.as_ptr()) });
    _mm512_shuffle_f32x4(lo, hi, 0b01_00_01_00)
}

/// 16 codes: `(byte >> shift) & mask` of the 16 bytes `lo[..8]`, `hi[..8]`, as f32.
#[inline]
#[target_feature(enable = "avx512f")]
fn codes8x2(lo: &[u8], hi: &[u8], shift: __m128i, mask: __m512i) -> __m512i {
    let a = i64::from_le_bytes(lo[..8].try_into().expect("8 bytes"));
    let b = i64::from_le_bytes(hi[..8].try_into().expect("8 bytes"));
    let wide = _mm512_cvtepu8_epi32(_mm_set_epi64x(b, a));
    _mm512_and_si512(_mm512_srl_epi32(wide, shift), mask)
}

/// 16 codes of 16 consecutive bytes as f32.
#[inline]
#[target_feature(enable = "avx512f")]
fn codes16(bytes: &[u8], shift: __m128i, mask: __m512i) -> __m512 {
    let b = &bytes[..16];
    // SAFETY: `b` holds 16 bytes (sliced above); unaligned load.
    let v = unsafe { _mm_loadu_si128(b.as_ptr().cast()) };
    let wide = _mm512_cvtepu8_epi32(v);
    _mm512_cvtepi32_ps(_mm512_and_si512(_mm512_srl_epi32(wide, shift), mask))
}

/// `simd::reduce8` in both halves: (lanes 0-7's sum, lanes 8-15's sum), each
/// `((a0 + a4) + (a1 + a5)) + ((a2 + a6) + (a3 + a7))`.
#[inline]
#[target_feature(enable = "avx512f")]
fn reduce8x2(acc: __m512) -> (f32, f32) {
    // 128-bit lanes swapped in pairs: lane i (< 4) of each half becomes a_i + a_{i+4}
    let s4 = _mm512_add_ps(acc, _mm512_shuffle_f32x4(acc, acc, 0b10_11_00_01));
    // within 128 bits (s1, s0, s3, s2): lane 0 s0 + s1, lane 2 s2 + s3
    let s2 = _mm512_add_ps(s4, _mm512_permute_ps(s4, 0b10_11_00_01));
    // lane 0 + lane 2
    let s1 = _mm512_add_ps(s2, _mm512_permute_ps(s2, 0b00_00_11_10));
    let a = _mm512_cvtss_f32(s1);
    let b = _mm_cvtss_f32(_mm512_extractf32x4_ps(s1, 2));
    (a, b)
}

/// The quantized keys' scores for the `rep` query heads, head_dim = 8 L: `qs` (rep x d) the
/// group's scaled queries and `cst` its constants (`super::kivi_scaled_query`); `main` the
/// group's `pack` lines of head_dim bytes (line j holds tokens j, j + pack, ... in its bit
/// fields from the low bits up); `n` the group's tokens used; scores of token i go to
/// `s[r * total + i]` (s starts at the group's first token).
#[allow(clippy::too_many_arguments)]
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
pub(super) fn key_group<const L: usize>(
    bits: u32,
    main: &[u8],
    n: usize,
    rep: usize,
    qs: &[f32],
    cst: &[f32],
    scale: f32,
    total: usize,
    s: &mut [f32],
) {
    let d = 8 * L;
    let pack = main.len() / d;
    let mask_bits = _mm512_set1_epi32((1 << bits) - 1);
    let mut qv = [[_mm512_setzero_ps(); L]; 4];
    for r0 in (0..rep).step_by(4) {
        let rn = (rep - r0).min(4);
        for (i, v) in qv.iter_mut().enumerate().take(rn) {
            for (k, x) in v.iter_mut().enumerate() {
                *x = dup8(&qs[(r0 + i) * d + 8 * k..]);
            }
        }
        for field in 0..8 / bits as usize {
            let shift = _mm_cvtsi32_si128((bits as usize * field) as i32);
            // lines j .. j + 3 (pack is a multiple of 8): tokens i .. i + 3 of the group, two
            // per register
            for j in (0..pack).step_by(4) {
                let i = field * pack + j;
                if i >= n {
                    break;
                }
                let line = |x: usize| &main[(j + x) * d..(j + x + 1) * d];
                let mut codes = [[_mm512_setzero_ps(); L]; 2];
                for (p, c) in codes.iter_mut().enumerate() {
                    let (la, lb) = (line(2 * p), line(2 * p + 1));
                    for (k, ck) in c.iter_mut().enumerate() {
                        let w = codes8x2(&la[8 * k..], &lb[8 * k..], shift, mask_bits);
                        *ck = _mm512_cvtepi32_ps(w);
                    }
                }
                for (r, v) in qv.iter().enumerate().take(rn) {
                    let mut acc = [_mm512_setzero_ps(); 2];
                    for (a, c) in acc.iter_mut().zip(&codes) {
                        for (qk, ck) in v.iter().zip(c) {
                            *a = _mm512_add_ps(*a, _mm512_mul_ps(*qk, *ck));
                        }
                    }
                    let sums = reduce8x4(acc[0], acc[1]);
                    let cr = _mm_set1_ps(cst[r0 + r]);
                    let sc = _mm_mul_ps(_mm_add_ps(sums, cr), _mm_set1_ps(scale));
                    let at = (r0 + r) * total + i;
                    let mut four = [0f32; 4];
                    // SAFETY: `four` holds 4 f32; unaligned store.
                    unsafe { _mm_storeu_ps(four.as_mut_ptr(), sc) };
                    let used = (n - i).min(4);
                    s[at..at + used].copy_from_slice(&four[..used]);
                }
            }
        }
    }
}

/// `simd::reduce8` of four tokens at once: `ab` holds tokens A (lanes 0-7) and B (8-15), `cd`
/// tokens C and D; the result is (A, B, C, D), each `((x0 + x4) + (x1 + x5)) + ((x2 + x6) +
/// (x3 + x7))` as there.
#[inline]
#[target_feature(enable = "avx512f")]
fn reduce8x4(ab: __m512, cd: __m512) -> __m128 {
    // 128-bit lanes (A0-3, B0-3, C0-3, D0-3) + (A4-7, B4-7, C4-7, D4-7)
    let lo = _mm512_shuffle_f32x4(ab, cd, 0b10_00_10_00);
    let hi = _mm512_shuffle_f32x4(ab, cd, 0b11_01_11_01);
    let s4 = _mm512_add_ps(lo, hi);
    // within each 128 bits: lane 0 s0 + s1, lane 2 s2 + s3, then lane 0 + lane 2
    let s2 = _mm512_add_ps(s4, _mm512_permute_ps(s4, 0b10_11_00_01));
    let s1 = _mm512_add_ps(s2, _mm512_permute_ps(s2, 0b00_00_11_10));
    let idx = _mm512_setr_epi32(0, 4, 8, 12, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0);
    _mm512_castps512_ps128(_mm512_permutexvar_ps(idx, s1))
}

/// `simd::tail_scores` on two rows per register.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
pub(super) fn tail_scores<const L: usize>(
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
        let mut qv = [_mm512_setzero_ps(); L];
        for (k, v) in qv.iter_mut().enumerate() {
            *v = dup8(&q[r * d + 8 * k..]);
        }
        let s = &mut scores[r * total + l.n_quant..(r + 1) * total];
        let mut i = 0;
        let mut fours = rows.chunks_exact(4 * d);
        for four in &mut fours {
            let mut acc = [_mm512_setzero_ps(); 2];
            for (k, qk) in qv.iter().enumerate() {
                for (j, a) in acc.iter_mut().enumerate() {
                    let pair = pair8(&four[2 * j * d + 8 * k..], &four[(2 * j + 1) * d + 8 * k..]);
                    *a = _mm512_add_ps(*a, _mm512_mul_ps(*qk, pair));
                }
            }
            let sc = _mm_mul_ps(reduce8x4(acc[0], acc[1]), _mm_set1_ps(scale));
            let out = &mut s[i..i + 4];
            // SAFETY: `out` holds 4 f32 (sliced above); unaligned store.
            unsafe { _mm_storeu_ps(out.as_mut_ptr(), sc) };
            i += 4;
        }
        for row in fours.remainder().chunks_exact(d) {
            // one row: the upper half repeats it (its sum unused)
            let mut acc = _mm512_setzero_ps();
            for (k, qk) in qv.iter().enumerate() {
                acc = _mm512_add_ps(acc, _mm512_mul_ps(*qk, pair8(&row[8 * k..], &row[8 * k..])));
            }
            s[i] = reduce8x2(acc).0 * scale;
            i += 1;
        }
    }
}

/// `simd::tail_values` on 16 channels per register (head_dim a multiple of 32).
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
pub(super) fn tail_values(l: &Layer<'_>, bh: usize, rep: usize, scores: &[f32], out: &mut [f32]) {
    let d = l.head_dim;
    let total = l.n_quant + l.n_tail;
    let base = bh * l.tail_cap * d;
    let rows = &l.tail_v[base..base + l.n_tail * d];
    for r in 0..rep {
        let w_r = &scores[r * total + l.n_quant..(r + 1) * total];
        for c0 in (0..d).step_by(64) {
            let width = (d - c0).min(64) / 16; // 2 or 4 registers
            let o = &mut out[r * d + c0..r * d + c0 + 16 * width];
            let mut acc = [_mm512_setzero_ps(); 4];
            for (k, a) in acc.iter_mut().enumerate().take(width) {
                *a = load16(&o[16 * k..]);
            }
            for (row, &w) in rows.chunks_exact(d).zip(w_r) {
                if w == 0.0 {
                    continue;
                }
                let ws = _mm512_set1_ps(w);
                for (k, a) in acc.iter_mut().enumerate().take(width) {
                    *a = _mm512_add_ps(*a, _mm512_mul_ps(ws, load16(&row[c0 + 16 * k..])));
                }
            }
            for (k, a) in acc.iter().enumerate().take(width) {
                store16(&mut o[16 * k..], *a);
            }
        }
    }
}

/// The quantized values' part of `out` (written, not added) and the zero terms `zsum`
/// (`Σ_t w_rt z_tb` in token order, the tokens with w = 0 skipped, as the reference sums them;
/// `simd::values_r` adds them): R query heads per pass, 16 channels per register, W registers
/// per pass (head_dim 32: 2; else 4, 64 channels).
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
pub(super) fn values<const R: usize>(
    l: &Layer<'_>,
    bh: usize,
    rep: usize,
    scores: &[f32],
    vs: &[f32],
    vz: &[f32],
    zsum: &mut [f32],
    out: &mut [f32],
) {
    if l.head_dim == 32 {
        values_w::<R, 2>(l, bh, rep, scores, vs, vz, zsum, out)
    } else {
        values_w::<R, 4>(l, bh, rep, scores, vs, vz, zsum, out)
    }
}

#[allow(clippy::too_many_arguments)]
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
fn values_w<const R: usize, const W: usize>(
    l: &Layer<'_>,
    bh: usize,
    rep: usize,
    scores: &[f32],
    vs: &[f32],
    vz: &[f32],
    zsum: &mut [f32],
    out: &mut [f32],
) {
    let Kind::Kivi(bits) = l.kind else {
        unreachable!("takes() admits KIVI only")
    };
    let (d, g) = (l.head_dim, l.group);
    let total = l.n_quant + l.n_tail;
    let mask_bits = _mm512_set1_epi32((1 << bits) - 1);
    let pack = g * bits as usize / 8;
    let nb = d / g;
    let (m, _, _) = row_bytes(l.kind, false, d, g);
    let rows = &l.v.main[bh * l.v.cap * m..(bh * l.v.cap + l.n_quant) * m];
    for r0 in (0..rep).step_by(R) {
        for c0 in (0..d).step_by(16 * W) {
            let mut at = [0usize; W];
            let mut blk = [0usize; W];
            let mut shift = [_mm_setzero_si128(); W];
            for k in 0..W {
                let c = c0 + 16 * k;
                let j = c % g;
                blk[k] = c / g;
                at[k] = blk[k] * pack + j % pack;
                shift[k] = _mm_cvtsi32_si128((bits as usize * (j / pack)) as i32);
            }
            // the value blocks starting in this pass (g >= 32: at most 2 of the 64 channels)
            let (b0, b1) = (c0.div_ceil(g), (c0 + 16 * W).div_ceil(g).min(nb));
            let mut acc = [[_mm512_setzero_ps(); W]; R];
            let mut z = [[0f32; 2]; R];
            for (t, row) in rows.chunks_exact(m).enumerate() {
                let mut codes = [_mm512_setzero_ps(); W];
                for k in 0..W {
                    codes[k] = codes16(&row[at[k]..], shift[k], mask_bits);
                }
                let (st, zt) = (&vs[t * nb..(t + 1) * nb], &vz[t * nb..(t + 1) * nb]);
                for (i, (a, zi)) in acc.iter_mut().zip(z.iter_mut()).enumerate() {
                    let w = scores[(r0 + i) * total + t];
                    if w == 0.0 {
                        continue;
                    }
                    for k in 0..W {
                        let ws = _mm512_set1_ps(w * st[blk[k]]);
                        a[k] = _mm512_add_ps(a[k], _mm512_mul_ps(ws, codes[k]));
                    }
                    for (b, zb) in (b0..b1).zip(zi.iter_mut()) {
                        *zb += w * zt[b];
                    }
                }
            }
            for (i, a) in acc.iter().enumerate() {
                for (k, v) in a.iter().enumerate() {
                    let o = (r0 + i) * d + c0 + 16 * k;
                    store16(&mut out[o..o + 16], *v);
                }
                for (b, zb) in (b0..b1).zip(z[i]) {
                    zsum[(r0 + i) * nb + b] = zb;
                }
            }
        }
    }
}
