//! nf4 / fp4 in bitsandbytes' layout, bit-exact with bitsandbytes 0.50.2 on the CPU.
//!
//! What runs there (read from the installed sources): `quantize_4bit` has no CPU kernel, so
//! torch's `bitsandbytes::quantize_4bit` default implementation (backends/default/ops.py) runs:
//!
//! ```text
//! A = A.reshape(-1).float()                          # float16/bfloat16 -> float32, exact
//! absmax = A.view(-1, B).abs().max(-1)               # float32, exact
//! scaled = clamp(A * (1.0 / absmax.clamp(min=1e-38)), -1, 1)
//! q = torch.bucketize(scaled, bounds)                # bounds: midpoints of the sorted code
//! q = order[q]                                       # fp4 only: sorted position -> nibble
//! packed = q[0::2] << 4 | q[1::2]                    # element 2j in the high nibble
//! ```
//!
//! `1.0 / t` is `t.reciprocal() * 1.0`, an IEEE division. `bucketize(right=False)` returns the
//! number of bounds strictly below the value, so a value exactly on a midpoint takes the lower
//! code; clamping cannot change that count because every bound lies inside (-1, 1). An
//! all-zero block keeps absmax 0 and scales by 1/1e-38, so every value maps to the code 0.0
//! (nf4 nibble 7, fp4 nibble 0). For fp4 the two zero codes (nibbles 0 and 8) tie in the sort;
//! torch's argsort puts nibble 0 first, so a value in (-0.0026, 0] gets nibble 0 and one in
//! (0, 0.0026] gets nibble 8.
//!
//! `dequantize_4bit` (libbitsandbytes_cpu, or torch for block sizes >= 2048 on AVX-512
//! machines) is `code[nibble] * absmax` in float32. With `compress_statistics=True`,
//! `offset = absmax.mean()` and `(absmax - offset)` is quantized by the 8-bit blockwise
//! quantizer with the dynamic map, blocks of 256 (see `bnb_dynamic.rs`); the dequantized absmax
//! is `code[q] * absmax2 + offset`, two float32 roundings.
//!
//! The fast paths find the same count `bucketize` returns: a portable one compares each scaled
//! value with all 15 bounds, 16 values at a time; on AVX2 CPUs a 4-level branch-free binary
//! search does it (see `quantize_block_avx2`). Both are tested bit-exact against the scalar
//! reference `quantize_block_ref`. Rows are quantized in parallel, one block at a time, and the
//! double quantization runs once over the whole absmax vector, so no result depends on the
//! thread count.

use super::bnb_dynamic::{self, CODE_SIZE, DQ_BLOCK_SIZE};
use crate::error::{Error, Result};
use crate::formats::tensor::{DoubleQuant, Quantized, QuantizedView};
use crate::input::{map_rows, map_rows_out, Matrix};
use crate::qtype::QType;

/// bitsandbytes' NF4 code (`get_4bit_type("nf4")`), nibble order = sorted order.
#[allow(clippy::excessive_precision)]
pub const NF4_CODE: [f32; 16] = [
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
];

/// bitsandbytes' FP4 values before normalization (`get_4bit_type("fp4")`), nibble order.
const FP4_RAW: [f32; 16] = [
    0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0, 0.0, -0.0625, -8.0, -12.0, -4.0, -6.0, -2.0, -3.0,
];

/// The FP4 nibble at each sorted position (torch.argsort of the FP4 code).
pub const FP4_ORDER: [u8; 16] = [11, 10, 13, 12, 15, 14, 9, 0, 8, 1, 6, 7, 4, 5, 2, 3];

/// The FP4 code: `FP4_RAW / 12` in float32, nibble order.
pub fn fp4_code() -> [f32; 16] {
    FP4_RAW.map(|v| v / 12.0)
}

/// The 16 code values of `qtype` in nibble order.
pub fn code(qtype: QType) -> [f32; 16] {
    match qtype {
        QType::FP4 => fp4_code(),
        _ => NF4_CODE,
    }
}

/// The 15 bucket bounds (midpoints of the sorted code, float32) and the nibble of each bucket.
pub fn bounds(qtype: QType) -> ([f32; 15], [u8; 16]) {
    let c = code(qtype);
    let order: [u8; 16] = match qtype {
        QType::FP4 => FP4_ORDER,
        _ => std::array::from_fn(|i| i as u8),
    };
    let b = std::array::from_fn(|k| (c[order[k] as usize] + c[order[k + 1] as usize]) / 2.0);
    (b, order)
}

/// torch's `absmax.clamp(min=1e-38)` followed by `1.0 / _`.
#[inline]
fn reciprocal(absmax: f32) -> f32 {
    let floor = 1e-38f32;
    1.0 / if absmax < floor { floor } else { absmax }
}

/// The scalar reference for one block: writes `x.len() / 2` packed bytes, returns absmax.
pub fn quantize_block_ref(x: &[f32], bounds: &[f32; 15], order: &[u8; 16], out: &mut [u8]) -> f32 {
    let absmax = x.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    let r = reciprocal(absmax);
    let nibble = |v: f32| order[bounds.iter().filter(|&&b| b < v * r).count()];
    for (o, pair) in out.iter_mut().zip(x.chunks_exact(2)) {
        *o = (nibble(pair[0]) << 4) | nibble(pair[1]);
    }
    absmax
}

/// Fast path, same results as [`quantize_block_ref`]; `x.len()` is a multiple of 16.
#[inline(always)]
fn quantize_block_fast_body(
    x: &[f32],
    bounds: &[f32; 15],
    order: &[u8; 16],
    identity: bool,
    out: &mut [u8],
) -> f32 {
    let mut m = [0f32; 16];
    for c in x.chunks_exact(16) {
        for i in 0..16 {
            let a = c[i].abs();
            m[i] = if a > m[i] { a } else { m[i] };
        }
    }
    let absmax = m.iter().fold(0f32, |acc, &v| if v > acc { v } else { acc });
    let r = reciprocal(absmax);
    for (c, o) in x.chunks_exact(16).zip(out.chunks_exact_mut(8)) {
        let mut v = [0f32; 16];
        for i in 0..16 {
            v[i] = c[i] * r;
        }
        // 32-bit counters, as wide as the f32 lanes, so every comparison is one vector op
        let mut q = [0u32; 16];
        for b in bounds {
            for i in 0..16 {
                q[i] += (v[i] > *b) as u32;
            }
        }
        if !identity {
            for qi in q.iter_mut() {
                *qi = order[*qi as usize] as u32;
            }
        }
        for k in 0..8 {
            o[k] = ((q[2 * k] << 4) | q[2 * k + 1]) as u8;
        }
    }
    absmax
}

/// AVX2 version of [`quantize_block_fast_body`], written with intrinsics. The count of bounds
/// below v is found by a 4-level binary search instead of 15 comparisons: with the bounds
/// sorted, "b[k] < v" is monotone in k, so after each level the count is known to lie in
/// [c, c + 2^(4 - level)), and comparing v with the bound b[c + 2^(3 - level) - 1] halves the
/// range; the last level leaves count = c exactly. The level-2..4 bounds are picked per lane
/// with a blend and two `permutevar8x32` table look-ups. The counts are then packed to bytes,
/// mapped through `order` (fp4), and paired into nibbles.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn quantize_block_avx2(
    x: &[f32],
    bounds: &[f32; 15],
    order: &[u8; 16],
    identity: bool,
    out: &mut [u8],
) -> f32 {
    use std::arch::x86_64::*;
    let sign = _mm256_set1_ps(-0.0);
    let (mut m0, mut m1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
    for c in x.chunks_exact(16) {
        // SAFETY: `c` holds 16 f32, so both 8-lane unaligned loads stay inside it.
        let (a, b) = unsafe {
            (
                _mm256_loadu_ps(c.as_ptr()),
                _mm256_loadu_ps(c.as_ptr().add(8)),
            )
        };
        m0 = _mm256_max_ps(m0, _mm256_andnot_ps(sign, a));
        m1 = _mm256_max_ps(m1, _mm256_andnot_ps(sign, b));
    }
    let mut lanes = [0f32; 8];
    // SAFETY: `lanes` holds 8 f32.
    unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), _mm256_max_ps(m0, m1)) };
    // max is exact and the inputs are finite, so the order of the reduction does not matter
    let absmax = lanes
        .iter()
        .fold(0f32, |acc, &v| if v > acc { v } else { acc });
    let r = _mm256_set1_ps(reciprocal(absmax));
    let b7 = _mm256_set1_ps(bounds[7]);
    let (b3, b11) = (_mm256_set1_ps(bounds[3]), _mm256_set1_ps(bounds[11]));
    let t3 = _mm256_setr_ps(
        bounds[1], bounds[5], bounds[9], bounds[13], 0.0, 0.0, 0.0, 0.0,
    );
    let t4 = _mm256_setr_ps(
        bounds[0], bounds[2], bounds[4], bounds[6], bounds[8], bounds[10], bounds[12], bounds[14],
    );
    let (eight, four, two) = (
        _mm256_set1_epi32(8),
        _mm256_set1_epi32(4),
        _mm256_set1_epi32(2),
    );
    // the number of bounds below each lane of v
    let count = |v: __m256| -> __m256i {
        let m1 = _mm256_cmp_ps::<_CMP_GT_OQ>(v, b7);
        let c = _mm256_and_si256(_mm256_castps_si256(m1), eight);
        let m2 = _mm256_cmp_ps::<_CMP_GT_OQ>(v, _mm256_blendv_ps(b3, b11, m1));
        let c = _mm256_add_epi32(c, _mm256_and_si256(_mm256_castps_si256(m2), four));
        let m3 =
            _mm256_cmp_ps::<_CMP_GT_OQ>(v, _mm256_permutevar8x32_ps(t3, _mm256_srli_epi32::<2>(c)));
        let c = _mm256_add_epi32(c, _mm256_and_si256(_mm256_castps_si256(m3), two));
        let m4 =
            _mm256_cmp_ps::<_CMP_GT_OQ>(v, _mm256_permutevar8x32_ps(t4, _mm256_srli_epi32::<1>(c)));
        _mm256_sub_epi32(c, _mm256_castps_si256(m4))
    };
    // SAFETY: `order` holds 16 bytes.
    let order_v = unsafe { _mm_loadu_si128(order.as_ptr().cast()) };
    // bytes come out as [e0..3, e8..11, e4..7, e12..15]; this puts them back in order
    let unzip = _mm_setr_epi8(0, 1, 2, 3, 8, 9, 10, 11, 4, 5, 6, 7, 12, 13, 14, 15);
    let pair_weights = _mm_set1_epi16(0x0110); // bytes 16, 1: e[2k] * 16 + e[2k + 1]
    for (c, o) in x.chunks_exact(16).zip(out.chunks_exact_mut(8)) {
        // SAFETY: `c` holds 16 f32.
        let (a, b) = unsafe {
            (
                _mm256_loadu_ps(c.as_ptr()),
                _mm256_loadu_ps(c.as_ptr().add(8)),
            )
        };
        let q0 = count(_mm256_mul_ps(a, r));
        let q1 = count(_mm256_mul_ps(b, r));
        let p16 = _mm256_packs_epi32(q0, q1); // [q0 0..3, q1 0..3 | q0 4..7, q1 4..7]
        let lo = _mm256_castsi256_si128(p16);
        let hi = _mm256_extracti128_si256::<1>(p16);
        // [e0..3, e8..11, e4..7, e12..15] -> e0..e15
        let mut bytes = _mm_shuffle_epi8(_mm_packus_epi16(lo, hi), unzip);
        if !identity {
            bytes = _mm_shuffle_epi8(order_v, bytes);
        }
        let pairs = _mm_maddubs_epi16(bytes, pair_weights);
        let packed = _mm_packus_epi16(pairs, pairs);
        // SAFETY: `o` holds 8 bytes, exactly what the 64-bit store writes.
        unsafe { _mm_storel_epi64(o.as_mut_ptr().cast(), packed) };
    }
    absmax
}

fn quantize_block_portable(
    x: &[f32],
    bounds: &[f32; 15],
    order: &[u8; 16],
    identity: bool,
    out: &mut [u8],
) -> f32 {
    quantize_block_fast_body(x, bounds, order, identity, out)
}

/// A block quantizer: (values, bounds, order, order is the identity, out) -> absmax.
type BlockFn = fn(&[f32], &[f32; 15], &[u8; 16], bool, &mut [u8]) -> f32;

/// The fastest block quantizer this CPU runs.
fn fast_kernel() -> BlockFn {
    #[cfg(target_arch = "x86_64")]
    {
        // The AVX2 block quantizer gives the portable one's bytes; it does not follow
        // FERROQUANT_FORCE_SCALAR (never did), so it asks for the bare CPU feature.
        if crate::cpu::avx2_detected() {
            // SAFETY: the function only needs AVX2, which the CPU was just checked to have.
            return |x, b, o, id, out| unsafe { quantize_block_avx2(x, b, o, id, out) };
        }
    }
    quantize_block_portable
}

fn is_identity(order: &[u8; 16]) -> bool {
    order.iter().enumerate().all(|(i, &o)| o as usize == i)
}

/// The fast path for one block (dispatches on the CPU's features); `x.len()` is a multiple of
/// 16 and `out.len() == x.len() / 2`.
pub fn quantize_block_fast(x: &[f32], bounds: &[f32; 15], order: &[u8; 16], out: &mut [u8]) -> f32 {
    debug_assert!(x.len().is_multiple_of(16) && out.len() * 2 == x.len());
    fast_kernel()(x, bounds, order, is_identity(order), out)
}

/// Quantize the absmax vector as bitsandbytes' `compress_statistics=True` does.
pub fn double_quantize(absmax: &[f32]) -> DoubleQuant {
    let offset = bnb_dynamic::torch_mean(absmax);
    let centered: Vec<f32> = absmax.iter().map(|&a| a - offset).collect();
    let code = bnb_dynamic::dynamic_map();
    let (qabsmax, absmax2) = bnb_dynamic::quantize_blockwise(&centered, &code, DQ_BLOCK_SIZE);
    DoubleQuant {
        offset,
        qabsmax,
        absmax2,
        code: code.to_vec(),
        block_size: DQ_BLOCK_SIZE,
    }
}

/// nf4 / fp4 with bitsandbytes' layout; `block_size` already validated (a power of two from 32
/// to 4096 dividing the row length).
pub fn quantize(
    m: &Matrix<'_>,
    qtype: QType,
    block_size: usize,
    double_quant: bool,
) -> Result<Quantized> {
    let (b, order) = bounds(qtype);
    let (kernel, identity) = (fast_kernel(), is_identity(&order));
    let row_bytes = m.cols / 2;
    let row_blocks = m.cols / block_size;
    let mut data = vec![0u8; m.rows * row_bytes];
    let mut absmax = vec![0f32; m.rows * row_blocks];
    map_rows(
        m,
        &mut data,
        row_bytes,
        &mut absmax,
        row_blocks,
        |_, x, out, stats| {
            for ((xb, ob), s) in x
                .chunks_exact(block_size)
                .zip(out.chunks_exact_mut(block_size / 2))
                .zip(stats.iter_mut())
            {
                *s = kernel(xb, &b, &order, identity, ob);
            }
        },
    );
    let (stats, dq) = if double_quant {
        (Vec::new(), Some(double_quantize(&absmax)))
    } else {
        (absmax, None)
    };
    Ok(Quantized {
        qtype,
        rows: m.rows,
        cols: m.cols,
        block_size,
        scale_mode: None,
        data,
        stats,
        double_quant: dq,
    })
}

fn size_error(q: &QuantizedView<'_>, what: &'static str, got: usize, expected: usize) -> Error {
    Error::DataSize {
        what,
        qtype: q.qtype.name(),
        rows: q.rows,
        cols: q.cols,
        got,
        expected,
    }
}

/// The per-block absmax of a view: `stats`, or the dequantized double-quant state.
fn absmax_of(q: &QuantizedView<'_>, n_blocks: usize) -> Result<Vec<f32>> {
    match q.double_quant {
        None => {
            if q.stats.len() != n_blocks {
                return Err(size_error(q, "absmax", q.stats.len(), n_blocks));
            }
            Ok(q.stats.to_vec())
        }
        Some(dq) => {
            if !q.stats.is_empty() {
                return Err(Error::InvalidArgument(format!(
                    "{}: absmax given both plainly ({} values) and double-quantized",
                    q.qtype.name(),
                    q.stats.len()
                )));
            }
            if dq.block_size == 0 {
                return Err(Error::InvalidArgument(
                    "double_quant block_size must be positive".into(),
                ));
            }
            if dq.qabsmax.len() != n_blocks {
                return Err(size_error(q, "qabsmax", dq.qabsmax.len(), n_blocks));
            }
            let n2 = n_blocks.div_ceil(dq.block_size);
            if dq.absmax2.len() != n2 {
                return Err(size_error(q, "absmax2", dq.absmax2.len(), n2));
            }
            if dq.code.len() != CODE_SIZE {
                return Err(size_error(q, "code", dq.code.len(), CODE_SIZE));
            }
            let mut a = vec![0f32; n_blocks];
            bnb_dynamic::dequantize_blockwise(
                &dq.qabsmax,
                &dq.absmax2,
                &dq.code,
                dq.block_size,
                &mut a,
            );
            for v in a.iter_mut() {
                *v += dq.offset;
            }
            Ok(a)
        }
    }
}

/// `code[nibble] * absmax[block]`, as bitsandbytes' `dequantize_4bit` computes it.
pub fn dequantize(q: &QuantizedView<'_>, out: &mut [f32]) -> Result<()> {
    let bs = q.block_size;
    check_row_blocks(q)?;
    let row_blocks = q.cols / bs;
    let absmax = absmax_of(q, q.rows * row_blocks)?;
    let c = code(q.qtype);
    map_rows_out(
        q.data,
        q.cols / 2,
        &absmax,
        row_blocks,
        out,
        q.cols,
        |_, d, s, y| dequantize_row(&c, bs, d, s, y, |v| v),
    );
    Ok(())
}

/// nf4/fp4 need whole blocks of an even size in every row.
pub fn check_row_blocks(q: &QuantizedView<'_>) -> Result<()> {
    let bs = q.block_size;
    if bs < 2 || !bs.is_multiple_of(2) || !q.cols.is_multiple_of(bs) {
        return Err(Error::RowLength {
            qtype: q.qtype.name(),
            rows: q.rows,
            cols: q.cols,
            block_size: bs,
        });
    }
    Ok(())
}

/// One row (`d`: its bytes, `absmax`: its blocks' absmax) into `y`, each value
/// `conv(code[nibble] * absmax)`: a block's 16 possible values are computed once, then looked
/// up per nibble (the same float32 products as one multiplication per element).
pub fn dequantize_row<T: Copy>(
    c: &[f32; 16],
    bs: usize,
    d: &[u8],
    absmax: &[f32],
    y: &mut [T],
    conv: impl Fn(f32) -> T,
) {
    for ((db, yb), &a) in d
        .chunks_exact(bs / 2)
        .zip(y.chunks_exact_mut(bs))
        .zip(absmax)
    {
        let t: [T; 16] = std::array::from_fn(|j| conv(c[j] * a));
        for (pair, &byte) in yb.chunks_exact_mut(2).zip(db) {
            pair[0] = t[(byte >> 4) as usize];
            pair[1] = t[(byte & 15) as usize];
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lcg(seed: u64, n: usize) -> Vec<f32> {
        let mut s = seed;
        (0..n)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((s >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 4.0
            })
            .collect()
    }

    #[test]
    fn codes_and_bounds_are_sorted() {
        for qt in [QType::NF4, QType::FP4] {
            let (b, order) = bounds(qt);
            assert!(b.windows(2).all(|w| w[0] <= w[1]), "{qt:?}");
            let c = code(qt);
            let sorted: Vec<f32> = order.iter().map(|&o| c[o as usize]).collect();
            assert!(sorted.windows(2).all(|w| w[0] <= w[1]), "{qt:?}");
        }
        assert_eq!(fp4_code()[2], 8.0f32 / 12.0);
    }

    #[test]
    fn fast_path_matches_reference() {
        for qt in [QType::NF4, QType::FP4] {
            let (b, order) = bounds(qt);
            for bs in [32usize, 64, 256, 4096] {
                let mut x = lcg(bs as u64, bs * 3);
                x[bs..2 * bs].fill(0.0);
                x[2 * bs + 5] = 1e-30; // a tiny block value
                for xb in x.chunks_exact(bs) {
                    let mut o1 = vec![0u8; bs / 2];
                    let mut o2 = vec![0u8; bs / 2];
                    let a1 = quantize_block_ref(xb, &b, &order, &mut o1);
                    let a2 = quantize_block_fast(xb, &b, &order, &mut o2);
                    assert_eq!(a1.to_bits(), a2.to_bits());
                    assert_eq!(o1, o2, "{qt:?} bs {bs}");
                    let a3 = quantize_block_portable(xb, &b, &order, false, &mut o2);
                    assert_eq!(a1.to_bits(), a3.to_bits());
                    assert_eq!(o1, o2, "{qt:?} bs {bs} portable");
                }
            }
        }
    }

    #[test]
    fn fast_path_matches_reference_on_and_around_every_bound() {
        for qt in [QType::NF4, QType::FP4] {
            let (b, order) = bounds(qt);
            // absmax 1 makes the scaled value the value itself
            let mut x = vec![1.0f32];
            for &bk in &b {
                for v in [bk, bk.next_up(), bk.next_down()] {
                    x.extend([v, -v]);
                }
            }
            x.resize(128, 0.0);
            for bs in [32usize, 64, 128] {
                for xb in x.chunks_exact(bs) {
                    let mut o1 = vec![0u8; bs / 2];
                    let mut o2 = vec![0u8; bs / 2];
                    quantize_block_ref(xb, &b, &order, &mut o1);
                    quantize_block_fast(xb, &b, &order, &mut o2);
                    assert_eq!(o1, o2, "{qt:?} bs {bs}");
                }
            }
        }
    }

    #[test]
    fn extremes_zero_blocks_and_midpoints() {
        let (b, order) = bounds(QType::NF4);
        let mut x = vec![0f32; 32];
        let mut out = vec![0u8; 16];
        assert_eq!(quantize_block_ref(&x, &b, &order, &mut out), 0.0);
        assert!(out.iter().all(|&v| v == 0x77));
        x[0] = -2.0;
        x[1] = 2.0;
        // exactly on the midpoint between codes 8 and 9: the lower code wins
        x[2] = b[8] * 2.0;
        quantize_block_ref(&x, &b, &order, &mut out);
        assert_eq!(out[0], 0x0f);
        assert_eq!(out[1] >> 4, 8);
        let (b, order) = bounds(QType::FP4);
        let mut y = vec![0f32; 32];
        y[0] = 1.0;
        y[1] = 1e-4; // (0, 0.0026]: nibble 8
        y[2] = -1e-4; // (-0.0026, 0]: nibble 0
        quantize_block_ref(&y, &b, &order, &mut out);
        assert_eq!(out[0], 0x38);
        assert_eq!(out[1], 0x00);
    }

    #[test]
    fn round_trip_within_half_the_largest_gap() {
        let x = lcg(7, 64 * 8);
        let m = Matrix::from_f32(&x, 8, 64).unwrap();
        let q = quantize(&m, QType::NF4, 64, false).unwrap();
        let mut y = vec![0f32; x.len()];
        dequantize(&q.view(), &mut y).unwrap();
        let gap = NF4_CODE
            .windows(2)
            .map(|w| w[1] - w[0])
            .fold(0f32, f32::max);
        for (i, (&a, &b)) in x.iter().zip(&y).enumerate() {
            let amax = q.stats[i / 64];
            assert!((a - b).abs() <= amax * gap / 2.0 * (1.0 + 1e-6), "{i}");
        }
    }

    #[test]
    fn dequantize_rejects_bad_lengths() {
        let x = lcg(3, 128);
        let m = Matrix::from_f32(&x, 2, 64).unwrap();
        let q = quantize(&m, QType::NF4, 32, true).unwrap();
        let mut y = vec![0f32; 128];
        dequantize(&q.view(), &mut y).unwrap();
        let mut bad = q.clone();
        bad.double_quant.as_mut().unwrap().absmax2.clear();
        assert!(matches!(
            dequantize(&bad.view(), &mut y),
            Err(Error::DataSize { .. })
        ));
        let mut bad = q.clone();
        bad.double_quant.as_mut().unwrap().code.pop();
        assert!(matches!(
            dequantize(&bad.view(), &mut y),
            Err(Error::DataSize { .. })
        ));
        let mut bad = q.clone();
        bad.double_quant = None;
        assert!(matches!(
            dequantize(&bad.view(), &mut y),
            Err(Error::DataSize { .. })
        ));
    }
}
