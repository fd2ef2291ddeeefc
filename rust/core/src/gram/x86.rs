//! The AVX-512 BF16 kernel of `gram_bf16`. The tokens are packed in pairs (`u32`: token 2p's
//! bf16 low, 2p + 1's high, for every feature), so one `vdpbf16ps` of a broadcast feature `i`
//! against 16 features `j` adds one pair of tokens to 16 outputs in the reference's order. The
//! upper triangle is computed in strips of `W` columns (in parallel), each strip in tiles of `R`
//! rows by `W` columns (24 accumulators) over blocks of `KC` pairs: a tile's accumulators go
//! through memory between blocks, which keeps each output one chain.

use std::arch::x86_64::*;

use rayon::prelude::*;

/// Rows per tile.
const R: usize = 8;
/// 16-lane vectors per tile row.
const C: usize = 3;
/// Columns per strip.
const W: usize = 16 * C;
/// Pairs of tokens per block (a strip's block, `KC x W x 4` bytes, stays in L2).
const KC: usize = 256;

/// # Safety
/// AVX-512 F/BW/VL and BF16 (`cpu::has_avx512_bf16`).
pub unsafe fn gram(x: &[u16], n: usize, d: usize) -> Vec<f32> {
    let dp = d.div_ceil(W) * W;
    let np = n.div_ceil(2);
    // packed pairs [np, dp]; the padding (an odd n's last token, features past d) is zero
    let mut packed = vec![0u32; np * dp];
    for (p, row) in packed.chunks_exact_mut(dp.max(1)).enumerate() {
        let even = &x[2 * p * d..(2 * p + 1) * d];
        let odd = x.get((2 * p + 1) * d..(2 * p + 2) * d);
        for (j, slot) in row[..d].iter_mut().enumerate() {
            let hi = odd.map_or(0, |o| o[j]);
            *slot = even[j] as u32 | (hi as u32) << 16;
        }
    }
    let strips: Vec<Vec<f32>> = crate::parallel::install(|| {
        (0..dp / W)
            .into_par_iter()
            .map(|s| {
                let j0 = s * W;
                let rows = j0 + W; // rows 0..j0 + W: the strip's upper triangle, whole tiles
                let mut acc = vec![0.0f32; rows * W];
                for p0 in (0..np).step_by(KC) {
                    let p1 = (p0 + KC).min(np);
                    for i0 in (0..rows).step_by(R) {
                        // SAFETY: the features (contract); `tile`'s bounds hold: i0 + R <= rows
                        // <= dp, j0 + W <= dp, p1 <= np, and `acc` holds R x W from i0 * W.
                        unsafe {
                            tile(&packed, dp, p0, p1, i0, j0, &mut acc[i0 * W..(i0 + R) * W])
                        };
                    }
                }
                acc
            })
            .collect()
    });
    let mut out = vec![0.0f32; d * d];
    for (s, acc) in strips.iter().enumerate() {
        let j0 = s * W;
        for j in j0..(j0 + W).min(d) {
            for i in 0..=j {
                let v = acc[i * W + (j - j0)];
                out[i * d + j] = v;
                out[j * d + i] = v;
            }
        }
    }
    out
}

/// Adds pairs `p0..p1` to the tile of rows `i0..i0 + R`, columns `j0..j0 + W` (`out`: R x W).
///
/// # Safety
/// AVX-512 F/BW/VL and BF16; `packed` is `[np, dp]` with `p1 <= np`, `i0 + R <= dp`,
/// `j0 + W <= dp`; `out.len() == R * W`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
unsafe fn tile(
    packed: &[u32],
    dp: usize,
    p0: usize,
    p1: usize,
    i0: usize,
    j0: usize,
    out: &mut [f32],
) {
    debug_assert!(p1 * dp <= packed.len() && i0 + R <= dp && j0 + W <= dp);
    debug_assert_eq!(out.len(), R * W);
    let o = out.as_mut_ptr();
    // SAFETY: every pointer below stays inside `packed` / `out` (contract); unaligned loads.
    unsafe {
        let mut acc = [[_mm512_setzero_ps(); C]; R];
        for (r, row) in acc.iter_mut().enumerate() {
            for (c, v) in row.iter_mut().enumerate() {
                *v = _mm512_loadu_ps(o.add(r * W + 16 * c));
            }
        }
        for p in p0..p1 {
            let line = packed.as_ptr().add(p * dp);
            let b: [__m512bh; C] = std::array::from_fn(|c| {
                std::mem::transmute::<__m512i, __m512bh>(_mm512_loadu_si512(
                    line.add(j0 + 16 * c) as *const __m512i
                ))
            });
            for (r, row) in acc.iter_mut().enumerate() {
                let a = std::mem::transmute::<__m512i, __m512bh>(_mm512_set1_epi32(
                    *line.add(i0 + r) as i32,
                ));
                for (c, v) in row.iter_mut().enumerate() {
                    *v = _mm512_dpbf16_ps(*v, a, b[c]);
                }
            }
        }
        for (r, row) in acc.iter().enumerate() {
            for (c, v) in row.iter().enumerate() {
                _mm512_storeu_ps(o.add(r * W + 16 * c), *v);
            }
        }
    }
}
