//! bitsandbytes' 8-bit dynamic map and the blockwise 8-bit quantizer that double quantization
//! runs on the absmax, replicated from bitsandbytes 0.50.2 on the CPU:
//!
//! - [`dynamic_map`] is `bitsandbytes.functional.create_dynamic_map(signed=True)`: for each
//!   decade i = 0..7, the midpoints of `torch.linspace(0.1, 1, 2**i + 1)` (float32) times
//!   `10**(i - 6)` (as float32), both signs, plus 0 and 1, sorted. torch's CPU linspace computes
//!   `start + step * k` for the first half and `end - step * (steps - 1 - k)` for the second as
//!   fused multiply-adds, so [`torch_linspace`] does the same with `mul_add`.
//! - [`quantize_blockwise`] is libbitsandbytes_cpu's `quantize_cpu_impl<float>` (the kernel
//!   behind `torch.ops.bitsandbytes.quantize_blockwise` on CPU): per block, absmax = max |x|
//!   (all-zero block: absmax 0 and every index 0); otherwise `v = x * (1 / absmax)`, clamped to
//!   [-1, 1], is mapped to a 65536-entry table index `(int)fma((v + 1) * 0.5, 65535, 0.5)` (gcc
//!   contracts that expression into one FMA in the shipped binary), and the table, built once
//!   per code book by [`build_lut`], holds the nearest code index of the bin's left edge. This
//!   is not always the code nearest to `v`; it is what bitsandbytes stores.
//! - [`dequantize_blockwise`] is `code[q] * absmax[block]` in float32.
//! - [`torch_mean`] is `torch.mean` of a float32 vector as torch's CPU kernel computes it in one
//!   reduction chunk: the cascade sum of `SumKernel.cpp` over 8-lane vectors, then `/ n`. The
//!   8 lanes are what torch 2.15 uses on x86-64 (measured on an AVX-512 machine too); a torch
//!   build with another vector width (e.g. 4-lane NEON on aarch64) sums in another order.
//!   torch splits a reduction of 32768 or more elements over its threads (the per-thread
//!   partial sums then differ in order), so for such vectors the peer's mean matches this
//!   one exactly only with `torch.set_num_threads(1)`; with more threads it differs by an ulp
//!   or two in a minority of cases (see tests/test_bnb4.py).

/// Entries of the dynamic map.
pub const CODE_SIZE: usize = 256;
/// Block size bitsandbytes uses for the second level of double quantization.
pub const DQ_BLOCK_SIZE: usize = 256;
/// Bins of the quantization look-up table.
pub const LUT_SIZE: usize = 65536;

/// `torch.linspace(start, end, steps, dtype=torch.float32)` on the CPU.
pub fn torch_linspace(start: f32, end: f32, steps: usize) -> Vec<f32> {
    match steps {
        0 => Vec::new(),
        1 => vec![start],
        _ => {
            let step = (end - start) / (steps - 1) as f32;
            let half = steps / 2;
            (0..steps)
                .map(|k| {
                    if k < half {
                        step.mul_add(k as f32, start)
                    } else {
                        (-step).mul_add((steps - 1 - k) as f32, end)
                    }
                })
                .collect()
        }
    }
}

/// `create_dynamic_map(signed=True, max_exponent_bits=7, total_bits=8)`, sorted ascending.
pub fn dynamic_map() -> [f32; CODE_SIZE] {
    const MAX_EXPONENT_BITS: i32 = 7;
    let mut data: Vec<f32> = Vec::with_capacity(CODE_SIZE);
    for i in 0..MAX_EXPONENT_BITS {
        let boundaries = torch_linspace(0.1, 1.0, (1usize << i) + 1);
        // Python's `10 ** (i - 6)` is a double; torch multiplies a float32 tensor by it in
        // float32.
        let scale = 10f64.powi(i - (MAX_EXPONENT_BITS - 1)) as f32;
        for w in boundaries.windows(2) {
            let mean = (w[0] + w[1]) / 2.0;
            data.push(scale * mean);
            data.push(-scale * mean);
        }
    }
    data.push(0.0);
    data.push(1.0);
    debug_assert_eq!(data.len(), CODE_SIZE);
    data.sort_by(f32::total_cmp);
    let mut code = [0f32; CODE_SIZE];
    code.copy_from_slice(&data);
    code
}

/// libbitsandbytes' `build_quantize_lut`: bin i covers `-1 + 2i / 65535`; its entry is the
/// first code index whose upper midpoint is not below the bin value.
pub fn build_lut(code: &[f32; CODE_SIZE]) -> Vec<u8> {
    let mut mid = [0f32; CODE_SIZE - 1];
    for (i, m) in mid.iter_mut().enumerate() {
        *m = 0.5 * (code[i] + code[i + 1]);
    }
    let mut lut = vec![0u8; LUT_SIZE];
    let mut idx = 0usize;
    for (i, entry) in lut.iter_mut().enumerate() {
        let fi = i as f32;
        let val = (fi + fi) / (LUT_SIZE - 1) as f32 - 1.0;
        while idx < CODE_SIZE - 1 && mid[idx] < val {
            idx += 1;
        }
        *entry = idx as u8;
    }
    lut
}

/// The table index of a normalized value, as libbitsandbytes computes it.
#[inline]
fn lut_index(v: f32) -> usize {
    let v = v.clamp(-1.0, 1.0); // std::clamp(v, -1, 1)
    let t = ((v + 1.0) * 0.5).mul_add((LUT_SIZE - 1) as f32, 0.5);
    // cvttss2si to a 32-bit int, then the low 16 bits (static_cast<uint16_t>).
    (t as i32 as u16) as usize
}

/// libbitsandbytes' 8-bit blockwise quantization of `x` with `code` (a partial last block is
/// allowed): returns (indices, absmax per block).
pub fn quantize_blockwise(
    x: &[f32],
    code: &[f32; CODE_SIZE],
    block_size: usize,
) -> (Vec<u8>, Vec<f32>) {
    let lut = build_lut(code);
    let mut q = vec![0u8; x.len()];
    let mut absmax = Vec::with_capacity(x.len().div_ceil(block_size));
    for (xb, qb) in x.chunks(block_size).zip(q.chunks_mut(block_size)) {
        // std::max(acc, fabs(v)) from -inf, then max(0, acc)
        let mut m = f32::NEG_INFINITY;
        for &v in xb {
            if v.abs() > m {
                m = v.abs();
            }
        }
        let m = if 0.0 > m { 0.0 } else { m };
        absmax.push(m);
        if m == 0.0 {
            continue; // indices stay 0
        }
        let inv = 1.0 / m;
        for (o, &v) in qb.iter_mut().zip(xb) {
            *o = lut[lut_index(v * inv)];
        }
    }
    (q, absmax)
}

/// `code[q] * absmax[block]` (a partial last block is allowed). Lengths are the caller's to
/// check: `absmax.len() == q.len().div_ceil(block_size)`, `out.len() == q.len()`.
pub fn dequantize_blockwise(
    q: &[u8],
    absmax: &[f32],
    code: &[f32],
    block_size: usize,
    out: &mut [f32],
) {
    for ((qb, ob), &a) in q
        .chunks(block_size)
        .zip(out.chunks_mut(block_size))
        .zip(absmax)
    {
        for (o, &i) in ob.iter_mut().zip(qb) {
            *o = code[i as usize] * a;
        }
    }
}

/// Lanes of torch's `Vectorized<float>` in the sum kernel this torch build dispatches to.
const TORCH_SUM_LANES: usize = 8;

/// `multi_row_sum` of ATen's SumKernel.cpp: `rows` rows of `width` values (row i at
/// `x[i * width..]`), summed column-wise with the 4-level cascade.
fn multi_row_sum(x: &[f32], width: usize, rows: usize) -> Vec<f32> {
    const LEVELS: usize = 4;
    let ceil_log2 = if rows <= 2 {
        1
    } else {
        (usize::BITS - (rows - 1).leading_zeros()) as usize
    };
    let level_power = (ceil_log2 / LEVELS).max(4);
    let level_step = 1usize << level_power;
    let level_mask = level_step - 1;
    let mut acc = vec![vec![0f32; width]; LEVELS];
    let add_row = |acc: &mut Vec<f32>, i: usize| {
        for (a, &v) in acc.iter_mut().zip(&x[i * width..(i + 1) * width]) {
            *a += v;
        }
    };
    let mut i = 0;
    while i + level_step <= rows {
        for _ in 0..level_step {
            add_row(&mut acc[0], i);
            i += 1;
        }
        for j in 1..LEVELS {
            let (lo, hi) = acc.split_at_mut(j);
            for (h, l) in hi[0].iter_mut().zip(lo[j - 1].iter_mut()) {
                *h += *l;
                *l = 0.0;
            }
            if i & (level_mask << (j * level_power)) != 0 {
                break;
            }
        }
    }
    while i < rows {
        add_row(&mut acc[0], i);
        i += 1;
    }
    let (first, rest) = acc.split_at_mut(1);
    for level in rest.iter() {
        for (a, &v) in first[0].iter_mut().zip(level) {
            *a += v;
        }
    }
    acc.swap_remove(0)
}

/// ATen's `row_sum` with 4-way ILP over items of `width` lanes: returns the lane-wise sums.
fn row_sum(x: &[f32], width: usize, items: usize) -> Vec<f32> {
    const ILP: usize = 4;
    let rows = items / ILP;
    let partial = multi_row_sum(x, width * ILP, rows);
    let mut p: Vec<Vec<f32>> = partial.chunks(width).map(<[f32]>::to_vec).collect();
    for item in rows * ILP..items {
        for (a, &v) in p[0].iter_mut().zip(&x[item * width..(item + 1) * width]) {
            *a += v;
        }
    }
    let (first, rest) = p.split_at_mut(1);
    for k in rest.iter() {
        for (a, &v) in first[0].iter_mut().zip(k) {
            *a += v;
        }
    }
    p.swap_remove(0)
}

/// `x.sum()` of a contiguous float32 vector by torch's CPU cascade sum in one chunk.
pub fn torch_sum(x: &[f32]) -> f32 {
    let n = x.len();
    let total = if n < TORCH_SUM_LANES {
        // scalar path: row_sum over single values
        row_sum(x, 1, n)[0]
    } else {
        let vecs = n / TORCH_SUM_LANES;
        let lanes = row_sum(x, TORCH_SUM_LANES, vecs);
        let mut acc = 0f32;
        for &v in &x[vecs * TORCH_SUM_LANES..] {
            acc += v;
        }
        for v in lanes {
            acc += v;
        }
        acc
    };
    // The output starts at 0 and the result is accumulated into it.
    0.0 + total
}

/// `x.mean()` of a float32 vector: torch's CPU sum, then a float32 division by n.
pub fn torch_mean(x: &[f32]) -> f32 {
    torch_sum(x) / x.len() as f32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dynamic_map_shape() {
        let code = dynamic_map();
        assert!(code.windows(2).all(|w| w[0] <= w[1]));
        assert_eq!(code[CODE_SIZE - 1], 1.0);
        assert_eq!(code[127], 0.0);
        // The negative side mirrors the positive side without 1.0.
        for i in 0..127 {
            assert_eq!(code[i], -code[254 - i], "index {i}");
        }
        // The smallest magnitude is the first decade's single midpoint: 1e-6 * 0.55.
        assert_eq!(code[128], 1e-6f32 * 0.55f32);
        assert!((code[0] + 0.992_968_75).abs() < 1e-7);
    }

    #[test]
    fn linspace_ends_exact_and_fused() {
        for steps in [2usize, 3, 5, 9, 17, 33, 65] {
            let l = torch_linspace(0.1, 1.0, steps);
            assert_eq!(l[0], 0.1);
            assert_eq!(l[steps - 1], 1.0);
            assert!(l.windows(2).all(|w| w[0] < w[1]));
        }
    }

    #[test]
    fn lut_is_monotone_and_covers_the_ends() {
        let code = dynamic_map();
        let lut = build_lut(&code);
        assert!(lut.windows(2).all(|w| w[0] <= w[1]));
        assert_eq!(lut[0], 0);
        assert_eq!(lut[LUT_SIZE - 1], 255);
        // 0 falls in bin 32768, whose left edge is 1/65535: the table is too coarse for the
        // codes below ~1e-5, so 0 is stored as the code nearest that edge, not as 0.
        let zero = code[lut[lut_index(0.0)] as usize];
        assert!(zero > 0.0 && zero <= 2.0 / 65535.0, "{zero}");
    }

    #[test]
    fn blockwise_round_trip_and_zero_blocks() {
        let code = dynamic_map();
        let x: Vec<f32> = (0..600)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) * 0.01)
            .collect();
        let mut x = x;
        x[256..512].fill(0.0);
        let (q, absmax) = quantize_blockwise(&x, &code, 256);
        assert_eq!(absmax.len(), 3);
        assert_eq!(absmax[1], 0.0);
        assert!(q[256..512].iter().all(|&v| v == 0));
        let mut y = vec![0f32; x.len()];
        dequantize_blockwise(&q, &absmax, &code, 256, &mut y);
        // The dynamic map's largest gap is in (0.1, 1]: 0.9/64 wide, and the LUT bin adds at
        // most one bin (2/65535) of slack on top of half a gap.
        for (i, (&a, &b)) in x.iter().zip(&y).enumerate() {
            let m = absmax[i / 256];
            assert!(
                (a - b).abs() <= m * (0.9 / 128.0 + 2.0 / 65535.0) + 1e-7,
                "{i}: {a} {b}"
            );
        }
    }

    #[test]
    fn torch_sum_is_close_to_the_exact_sum() {
        for n in [1usize, 3, 7, 8, 9, 100, 1000, 4097, 70000] {
            let x: Vec<f32> = (0..n).map(|i| ((i * 7919) % 1000) as f32 * 1e-3).collect();
            let exact: f64 = x.iter().map(|&v| v as f64).sum();
            let s = torch_sum(&x) as f64;
            assert!((s - exact).abs() <= exact * 1e-5 + 1e-6, "{n}: {s} {exact}");
        }
        // Small vectors: ((x0 + x4) + x1) + x2) + x3, the 4-way ILP order.
        let x = [1.0f32, 1e8, -1e8, 3.0, 5.0];
        assert_eq!(torch_sum(&x), ((1.0f32 + 5.0 + 1e8) + -1e8) + 3.0);
    }
}
