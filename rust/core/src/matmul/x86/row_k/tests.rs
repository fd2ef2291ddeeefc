//! The AVX-512 K-quant row kernel (`vnni.rs`) against `reference::dot_block_k`, bit for bit:
//! super-block counts 1..20 and longer rows (whole groups of 8 and tails), 1 and 4 activation
//! rows, with and without the weight prefetch; saturating quants and scales; and the
//! dispatch through `qmatmul` at M = 1 (short rows and rows above `LONG_K`).

use super::group::{dot_row_k_vnni, row_k_vnni};
use super::vnni::{interleave_k4, RowK, XZ_BLOCK};
use crate::formats::blocks::*;
use crate::matmul::reference::{self as r, BlockQ8K};
use crate::matmul::tests::{blocks, Rng};
use crate::matmul::{qmatmul, QuantizedView};
use crate::qtype::QType;
use bytemuck::Zeroable;

/// The f16 offsets of each format's block (d, dmin).
fn halves<W: RowK>() -> &'static [usize] {
    match std::mem::size_of::<W>() {
        210 => &[208],   // q6_K
        84 => &[80, 82], // q2_K
        110 => &[108],   // q3_K
        136 => &[0],     // iq4_xs
        _ => &[0, 2],    // q4_K, q5_K
    }
}

fn acts(rng: &mut Rng, nb: usize, scale: f32) -> Vec<BlockQ8K> {
    let mut q = vec![BlockQ8K::zeroed(); nb];
    r::quantize_row_q8_k(&rng.normalish(nb * QK_K, scale), &mut q);
    q
}

/// The activations by `interleave_k4` (what `qmatmul` prepares; here not 64-byte aligned).
fn interleaved<W: RowK>(x: &[BlockQ8K]) -> Vec<u8> {
    let mut v = vec![0u8; x.len() * XZ_BLOCK];
    interleave_k4(x, x.len(), W::ORDER, &mut v);
    v
}

fn check<W: RowK>(w: &[W], rows: &[Vec<BlockQ8K>; 4], what: &str) {
    let x: [&[BlockQ8K]; 4] = std::array::from_fn(|i| &rows[i][..]);
    let zs: Vec<Vec<u8>> = rows.iter().map(|r| interleaved::<W>(r)).collect();
    let xz: [&[u8]; 4] = std::array::from_fn(|i| &zs[i][..]);
    let want: [u32; 4] = std::array::from_fn(|i| r::dot_block_k(w, x[i]).to_bits());
    for long in [false, true] {
        // SAFETY: crate::cpu::has_vnni_bw() checked by the callers; one activation block per weight
        // block, 256 interleaved bytes per block.
        let got = unsafe { dot_row_k_vnni(w, x, xz, long) }.map(f32::to_bits);
        assert_eq!(got, want, "{what} R=4 long={long}");
        // SAFETY: as above.
        let one = unsafe { dot_row_k_vnni(w, [x[1]], [xz[1]], long) }[0].to_bits();
        assert_eq!(one, want[1], "{what} R=1 long={long}");
    }
    // the kernel without GFNI too (`dot_row_k_vnni` takes q2_K / q3_K's GFNI decode where
    // the CPU has it)
    // SAFETY: as above.
    let plain = unsafe { row_k_vnni::<W, 4, false>(w, x, xz) }.map(f32::to_bits);
    assert_eq!(plain, want, "{what} R=4 without GFNI");
}

fn random<W: RowK>(rng: &mut Rng) {
    let name = std::any::type_name::<W>();
    let size = std::mem::size_of::<W>();
    for nb in (1..=20).chain([31, 32, 33, 57, 64]) {
        let data = blocks(rng, nb, size, halves::<W>());
        let w: &[W] = bytemuck::cast_slice(&data);
        let rows = std::array::from_fn(|i| acts(rng, nb, 0.5 + i as f32));
        check(w, &rows, &format!("{name} nb={nb}"));
    }
}

#[test]
fn row_k_vnni_equals_reference_on_random_blocks() {
    if !crate::cpu::has_vnni_bw() {
        return;
    }
    let mut rng = Rng(0x0dd0_b10c_5eed_7777);
    random::<BlockQ4K>(&mut rng);
    random::<BlockQ5K>(&mut rng);
    random::<BlockQ6K>(&mut rng);
    random::<BlockQ2K>(&mut rng);
    random::<BlockQ3K>(&mut rng);
    random::<BlockIQ4XS>(&mut rng);
}

/// Every quant and scale at its largest (all bits set: q6_K scales -1, and 0x7f: 127; q4_K /
/// q5_K scales and mins 63) against activations of +-127 and of mixed signs: the largest
/// 4-product sums the packs see (4·63·127 for q6_K).
fn extremes<W: RowK>(rng: &mut Rng) {
    let name = std::any::type_name::<W>();
    let size = std::mem::size_of::<W>();
    let nb = 11;
    for fill in [0xffu8, 0x7f, 0x80, 0x00] {
        let mut data = vec![fill; nb * size];
        for b in 0..nb {
            for &o in halves::<W>() {
                data[b * size + o..b * size + o + 2].copy_from_slice(&f16_from_f32(0.75));
            }
        }
        let w: &[W] = bytemuck::cast_slice(&data);
        let k = nb * QK_K;
        let xs: [Vec<f32>; 4] = [
            vec![1.0; k],
            vec![-1.0; k],
            (0..k)
                .map(|i| if i % 3 == 0 { -1.0 } else { 1.0 })
                .collect(),
            rng.normalish(k, 1.0),
        ];
        let rows = std::array::from_fn(|i| {
            let mut q = vec![BlockQ8K::zeroed(); nb];
            r::quantize_row_q8_k(&xs[i], &mut q);
            q
        });
        check(w, &rows, &format!("{name} fill={fill:#x}"));
    }
}

#[test]
fn row_k_vnni_equals_reference_at_extreme_values() {
    if !crate::cpu::has_vnni_bw() {
        return;
    }
    let mut rng = Rng(0xfeed_beef_0123_4567);
    extremes::<BlockQ4K>(&mut rng);
    extremes::<BlockQ5K>(&mut rng);
    extremes::<BlockQ6K>(&mut rng);
    extremes::<BlockQ2K>(&mut rng);
    extremes::<BlockQ3K>(&mut rng);
    extremes::<BlockIQ4XS>(&mut rng);
}

/// `qmatmul` at M = 1 to 3 (the row kernels, up to 3 activation rows per decoded super-block;
/// rows above `LONG_K` and q4_k's with the prefetch) equals the reference row by row, on the
/// pool and on one thread, for odd N.
#[test]
fn qmatmul_m1_k_quants_equal_reference() {
    let mut rng = Rng(0x1357_9bdf_2468_ace0);
    for (qtype, size, h) in [
        (QType::Q4K, 144, &[0usize, 2][..]),
        (QType::Q5K, 176, &[0, 2]),
        (QType::Q6K, 210, &[208]),
        (QType::Q2K, 84, &[80, 82]),
        (QType::Q3K, 110, &[108]),
        (QType::IQ4XS, 136, &[0]),
    ] {
        for (nb, n, m) in [
            (3usize, 5, 1),
            (8, 37, 1),
            (16, 5, 3),
            (19, 7, 2),
            (33, 5, 1),
            (56, 3, 1),
        ] {
            let k = nb * QK_K;
            let data = blocks(&mut rng, n * nb, size, h);
            let x = rng.normalish(m * k, 1.0);
            let v = QuantizedView {
                qtype,
                rows: n,
                cols: k,
                block_size: QK_K,
                scale_mode: None,
                data: &data,
                stats: &[],
                double_quant: None,
            };
            let mut y = vec![0.0f32; m * n];
            qmatmul(&x, m, &v, &mut y).unwrap();
            let mut y1 = vec![0.0f32; m * n];
            crate::parallel::set_num_threads(1);
            let one = qmatmul(&x, m, &v, &mut y1);
            crate::parallel::set_num_threads(0);
            one.unwrap();
            let mut xq = vec![BlockQ8K::zeroed(); nb];
            for mi in 0..m {
                r::quantize_row_q8_k(&x[mi * k..(mi + 1) * k], &mut xq);
                for row in 0..n {
                    let wr = &data[row * nb * size..(row + 1) * nb * size];
                    let want = match qtype {
                        QType::Q4K => r::dot_block_k::<BlockQ4K>(bytemuck::cast_slice(wr), &xq),
                        QType::Q5K => r::dot_block_k::<BlockQ5K>(bytemuck::cast_slice(wr), &xq),
                        QType::Q6K => r::dot_block_k::<BlockQ6K>(bytemuck::cast_slice(wr), &xq),
                        QType::Q2K => r::dot_block_k::<BlockQ2K>(bytemuck::cast_slice(wr), &xq),
                        QType::Q3K => r::dot_block_k::<BlockQ3K>(bytemuck::cast_slice(wr), &xq),
                        _ => r::dot_block_k::<BlockIQ4XS>(bytemuck::cast_slice(wr), &xq),
                    };
                    for (got, what) in [(y[mi * n + row], "pool"), (y1[mi * n + row], "1 thread")] {
                        assert_eq!(
                            got.to_bits(),
                            want.to_bits(),
                            "{qtype:?} {what} nb={nb} n={n} m={m} row={row} act row {mi}"
                        );
                    }
                }
            }
        }
    }
}

/// Not a test: nanoseconds per super-block of the AVX-512 and AVX2 row kernels, weights in L2
/// (256 rows of K = 4096), alternating, min over repetitions.
/// `cargo test -p ferroquant-core --release bench_row_k -- --ignored --nocapture`
#[test]
#[ignore]
fn bench_row_k() {
    if !crate::cpu::has_vnni_bw() {
        return;
    }
    fn run<W: RowK>(rng: &mut Rng) {
        let (n, nb): (usize, usize) = std::env::var("BENCH_NB").map_or((256, 16), |v| {
            let nb: usize = v.parse().unwrap();
            let rows = std::env::var("BENCH_ROWS").map_or(4096 / nb, |r| r.parse().unwrap());
            (rows, nb)
        });
        let size = std::mem::size_of::<W>();
        let data = blocks(rng, n * nb, size, halves::<W>());
        let w: &[W] = bytemuck::cast_slice(&data);
        let x = acts(rng, nb, 1.0);
        // 64-byte aligned, as `qmatmul` allocates them (BENCH_ALIGN=n: n bytes past that)
        let mut buf = vec![0u8; nb * XZ_BLOCK + 128];
        let off = buf.as_ptr().align_offset(64)
            + std::env::var("BENCH_ALIGN").map_or(0, |v| v.parse::<usize>().unwrap());
        buf[off..off + nb * XZ_BLOCK].copy_from_slice(&interleaved::<W>(&x));
        let xz = &buf[off..off + nb * XZ_BLOCK];
        let mut best = [f64::MAX; 2];
        let mut sink = 0.0f32;
        for _ in 0..(400 * 256 / n).max(400) {
            for (v, b) in best.iter_mut().enumerate() {
                let t = std::time::Instant::now();
                for row in w.chunks_exact(nb) {
                    // SAFETY: AVX-512 VNNI detected (which implies AVX2); nb blocks each.
                    sink += unsafe {
                        if v == 0 {
                            dot_row_k_vnni(row, [&x[..]], [xz], false)[0]
                        } else {
                            super::super::dot_block_k(row, [&x[..]])[0]
                        }
                    };
                }
                *b = b.min(t.elapsed().as_secs_f64());
            }
        }
        let per = |t: f64| t * 1e9 / (n * nb) as f64;
        let gbs = |t: f64| (n * nb * size) as f64 / t / 1e9;
        eprintln!(
            "{}: avx512 {:.2} ns/sb ({:.1} GB/s), avx2 {:.2} ns/sb ({:.1} GB/s) [{sink}]",
            std::any::type_name::<W>(),
            per(best[0]),
            gbs(best[0]),
            per(best[1]),
            gbs(best[1])
        );
    }
    let mut rng = Rng(42);
    run::<BlockQ4K>(&mut rng);
    run::<BlockQ5K>(&mut rng);
    run::<BlockQ6K>(&mut rng);
    run::<BlockQ2K>(&mut rng);
    run::<BlockQ3K>(&mut rng);
    run::<BlockIQ4XS>(&mut rng);
}
