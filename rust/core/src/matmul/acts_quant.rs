//! The activations of a `qmatmul` call quantized once, for every task: q8_0 / q8_1 / q8_K
//! blocks (and their scales and sums), nf4 / int8's q16 rows, the GEMM's partial group.

use super::reference;
use super::*;
use bytemuck::Zeroable;

/// Each q8_0 block's scale as f32 and the sum of its quants (over the pool when `par`).
pub(super) fn scales_and_sums(blocks: &[BlockQ8_0], par: bool) -> (Vec<f32>, Vec<i32>) {
    let one = |b: &BlockQ8_0| (f16_to_f32(b.d), b.qs.iter().map(|&q| q as i32).sum::<i32>());
    if par {
        const PER_TASK: usize = 256;
        let mut d = vec![0.0f32; blocks.len()];
        let mut sums = vec![0i32; blocks.len()];
        parallel::for_each_chunk2_mut(&mut d, PER_TASK, &mut sums, PER_TASK, |t, d, sums| {
            let b = &blocks[t * PER_TASK..];
            for ((d, s), b) in d.iter_mut().zip(sums.iter_mut()).zip(b) {
                (*d, *s) = one(b);
            }
        });
        (d, sums)
    } else {
        blocks.iter().map(one).unzip()
    }
}

/// Each row of `x` (rows of `k`) quantized into its share of `blocks` by `quant`, on the pool
/// when `par` (rows are independent: the same blocks either way).
pub(super) fn quantize_rows<B: Send>(
    x: &[f32],
    k: usize,
    blocks: &mut [B],
    par: bool,
    quant: impl Fn(&[f32], &mut [B]) + Sync + Send,
) {
    let nb = blocks.len() / (x.len() / k).max(1);
    if nb == 0 {
        return;
    }
    if par {
        parallel::for_each_chunk_mut(blocks, nb, |r, b| quant(&x[r * k..(r + 1) * k], b));
    } else {
        blocks
            .chunks_mut(nb)
            .zip(x.chunks(k))
            .for_each(|(b, x)| quant(x, b));
    }
}

/// The activations of q4_1 / q5_1: `reference::quantize_row_q8_1`'s blocks (its d and quants,
/// which are q8_0's: the fast `quantize_row_q8_0_blocks`) and each block's `s` as f32, computed
/// as the reference does (`f16(Σq · d)`, d = amax / 127 in f32), on the pool when `par`. The
/// reference itself rounds one element at a time through libm's `roundf`: it took a tenth of a
/// q4_1 GEMM's CPU time at 4096x4096 (perf, M = 512, one thread).
pub(super) fn quantize_q8_1(
    x: &[f32],
    m: usize,
    k: usize,
    par: bool,
) -> (Vec<BlockQ8_0>, Vec<f32>) {
    let nb = k / QK8_0;
    let mut blocks = vec![BlockQ8_0::zeroed(); m * nb];
    let mut s = vec![0.0f32; m * nb];
    let one = |((b, s), x): ((&mut [BlockQ8_0], &mut [f32]), &[f32])| {
        crate::formats::quantize_row_q8_0_blocks(x, b);
        for ((s, b), x) in s.iter_mut().zip(b.iter()).zip(x.chunks_exact(QK8_0)) {
            // amax in 8 lanes (max is exact, so the order does not matter for finite x).
            let mut lanes = [0.0f32; 8];
            for c in x.chunks_exact(8) {
                for (l, v) in lanes.iter_mut().zip(c) {
                    *l = l.max(v.abs());
                }
            }
            let amax = lanes.iter().fold(0.0f32, |a, &v| a.max(v));
            let sum: i32 = b.qs.iter().map(|&q| q as i32).sum();
            *s = f16_to_f32(f16_from_f32(sum as f32 * (amax / 127.0)));
        }
    };
    if nb > 0 && par {
        parallel::for_each_chunk2_mut(&mut blocks, nb, &mut s, nb, |r, b, s| {
            one(((b, s), &x[r * k..(r + 1) * k]))
        });
    } else if nb > 0 {
        blocks
            .chunks_mut(nb)
            .zip(s.chunks_mut(nb))
            .zip(x.chunks(k))
            .for_each(one);
    }
    (blocks, s)
}

/// nf4 / int8 activations: each row to q16 (`reference::q16`), on 64-byte boundaries; with
/// `avx512` by `x86::q16::quantize_row_q16_avx512` (the same values), nf4's split into even
/// and odd elements per 64 as the AVX-512 nf4 kernel reads them.
pub(super) fn quantize_q16<'a>(
    x: &[f32],
    m: usize,
    k: usize,
    nf4: bool,
    avx512: bool,
    par: bool,
) -> Acts<'a> {
    use reference::q16::{q16_row_len, quantize_row_q16, NF4_ONE, Q16};
    let row = q16_row_len(k);
    let blocks = row / Q16;
    let mut q = vec![Line64([0; 64]); m * row * 2 / 64];
    let mut d = vec![0.0f32; m * blocks];
    let per = if nf4 { NF4_ONE } else { 1.0 };
    #[cfg(not(target_arch = "x86_64"))]
    let _ = avx512;
    let one = |((qr, dr), xr): ((&mut [i16], &mut [f32]), &[f32])| {
        #[cfg(target_arch = "x86_64")]
        if avx512 {
            // SAFETY: avx512 (for nf4 / int8) is set only with `crate::cpu::has_vnni_q16()`; qr
            // and dr are sized for xr (q16_row_len, one scale per 64).
            unsafe { x86::q16::quantize_row_q16_avx512(xr, per, nf4, qr, dr) };
            return;
        }
        quantize_row_q16(xr, per, qr, dr);
    };
    let qs: &mut [i16] = bytemuck::cast_slice_mut(&mut q);
    if row > 0 && par {
        parallel::for_each_chunk2_mut(qs, row, &mut d, blocks, |r, q, d| {
            one(((q, d), &x[r * k..(r + 1) * k]))
        });
    } else if row > 0 {
        qs.chunks_mut(row)
            .zip(d.chunks_mut(blocks))
            .zip(x.chunks(k))
            .for_each(one);
    }
    Acts::Q16 { q, d, row, blocks }
}

/// The last `nb % 8` blocks of every activation row (`nb` blocks each) in the narrow layout of
/// the GEMM's partial group (`x86::gemm32::interleave_tail`), row after row; empty when `nb`
/// is a multiple of 8 or the GEMM is not used. Once per call, for every task.
#[cfg(target_arch = "x86_64")]
pub(super) fn gemm_tail(gemm: bool, blocks: &[BlockQ8_0], nb: usize) -> Vec<u8> {
    use x86::gemm32::{interleave_tail, tail_bytes};
    let tail = nb % reference::LANES;
    if !gemm || tail == 0 {
        return Vec::new();
    }
    let tb = tail_bytes(tail);
    let mut out = vec![0u8; blocks.len() / nb * tb];
    for (row, o) in blocks.chunks_exact(nb).zip(out.chunks_exact_mut(tb)) {
        interleave_tail(&row[nb - tail..], o);
    }
    out
}
