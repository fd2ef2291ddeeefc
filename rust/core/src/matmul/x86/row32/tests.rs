//! `dot_row32` bit for bit against `reference::dot_block32` (q4_1 / q5_1:
//! `reference::dot_block32_min`) for every format it serves: block counts 1..=40
//! (partial groups of every length), long rows (K = 14336 and one past a group), with and
//! without the prefetch, random bytes (q8_0 weights include -128) and the extremes (all weights
//! at their largest level against ±127 activations).

use super::*;
use crate::matmul::reference as r;
use crate::matmul::tests::{blocks, Rng};

/// The f16 fields of a block (scale, and min where the format has one); the quants follow.
fn halves<W: Row32>() -> &'static [usize] {
    if W::HAS_MIN {
        &[0, 2]
    } else {
        &[0]
    }
}

/// The reference's bits of one weight row (`w`) against the activation row.
fn want<W: Row32>(w: &[W], xq: &[BlockQ8_0], xd: &[f32], xs: &[f32]) -> u32 {
    if W::HAS_MIN {
        r::dot_block32_min(w, xq, xd, xs).to_bits()
    } else {
        r::dot_block32(w, xq, xd).to_bits()
    }
}

fn check<W: Row32>(rng: &mut Rng, nb: usize, extreme: bool) {
    let size = std::mem::size_of::<W>();
    let hs = halves::<W>();
    let mut data = blocks(rng, nb, size, hs);
    if extreme {
        for b in 0..nb {
            data[b * size + 2 * hs.len()..(b + 1) * size].fill(if b % 2 == 0 {
                0xff
            } else {
                0x00
            });
        }
    }
    let w: &[W] = bytemuck::cast_slice(&data);
    let x = if extreme {
        (0..nb * 32)
            .map(|i| if i % 3 == 0 { -1.0 } else { 1.0 })
            .collect()
    } else {
        rng.normalish(nb * 32, 1.5)
    };
    let mut xq = vec![
        BlockQ8_0 {
            d: [0; 2],
            qs: [0; 32]
        };
        nb
    ];
    r::quantize_row_q8_0(&x, &mut xq);
    let xd: Vec<f32> = xq.iter().map(|b| f16_to_f32(b.d)).collect();
    let sums: Vec<i32> = xq
        .iter()
        .map(|b| b.qs.iter().map(|&q| q as i32).sum())
        .collect();
    let (xt, nbias) = interleave::<W>(&xq, &sums);
    // q8_1's s (any finite values: the kernel only multiplies them)
    let xs = rng.normalish(nb, 20.0);
    let row = RowQ8 {
        xt: &xt,
        d: &xd,
        nbias: &nbias,
        s: if W::HAS_MIN { &xs } else { &[] },
    };
    let want = want(w, &xq, &xd, &xs);
    // The same row followed by more bytes (as the next rows of a matrix): all ones, so the
    // scales the last group reads past the row are f16 NaN.
    let mut more = data.clone();
    more.extend(std::iter::repeat_n(0xffu8, 8 * size));
    let name = std::any::type_name::<W>();
    // SAFETY: cpu::has_vbmi_gfni() checked by the caller; x prepared by interleave for nb blocks.
    unsafe {
        let a = dot_row32::<W, false>(&data, nb, &row);
        assert_eq!(a.to_bits(), want, "{name} nb={nb} extreme={extreme}");
        let b = dot_row32::<W, true>(&data, nb, &row);
        assert_eq!(b.to_bits(), want, "{name} nb={nb} prefetch");
        let c = dot_row32::<W, false>(&more, nb, &row);
        assert_eq!(c.to_bits(), want, "{name} nb={nb} bytes after the row");
    }
}

/// Four rows at once (`dot_rows32`, R = 4: rows 0..3 read the bytes after them, row 3 has
/// none) give each row's reference bits.
fn check_rows<W: Row32>(rng: &mut Rng, nb: usize) {
    let size = std::mem::size_of::<W>();
    let data = blocks(rng, 4 * nb, size, halves::<W>());
    let w: &[W] = bytemuck::cast_slice(&data);
    let x = rng.normalish(nb * 32, 0.7);
    let mut xq = vec![
        BlockQ8_0 {
            d: [0; 2],
            qs: [0; 32]
        };
        nb
    ];
    r::quantize_row_q8_0(&x, &mut xq);
    let xd: Vec<f32> = xq.iter().map(|b| f16_to_f32(b.d)).collect();
    let sums: Vec<i32> = xq
        .iter()
        .map(|b| b.qs.iter().map(|&q| q as i32).sum())
        .collect();
    let (xt, nbias) = interleave::<W>(&xq, &sums);
    let xs = rng.normalish(nb, 20.0);
    let row = RowQ8 {
        xt: &xt,
        d: &xd,
        nbias: &nbias,
        s: if W::HAS_MIN { &xs } else { &[] },
    };
    let want: Vec<u32> = w
        .chunks_exact(nb)
        .map(|rw| want(rw, &xq, &xd, &xs))
        .collect();
    // SAFETY: cpu::has_vbmi_gfni() checked by the caller; x prepared by interleave for nb blocks.
    let (a, b) = unsafe {
        (
            dot_rows32::<W, false, 4>(&data, nb * size, nb, &row),
            dot_rows32::<W, true, 4>(&data, nb * size, nb, &row),
        )
    };
    let name = std::any::type_name::<W>();
    assert_eq!(a.map(f32::to_bits).to_vec(), want, "{name} nb={nb} 4 rows");
    assert_eq!(
        b.map(f32::to_bits).to_vec(),
        want,
        "{name} nb={nb} 4 rows prefetch"
    );
}

fn all<W: Row32>(rng: &mut Rng) {
    for nb in (1..=40).chain([448, 449]) {
        check::<W>(rng, nb, false);
        check_rows::<W>(rng, nb);
    }
    for nb in [1, 8, 13, 16] {
        check::<W>(rng, nb, true);
    }
}

#[test]
fn row32_equals_reference_for_every_format_and_length() {
    if !crate::cpu::has_vbmi_gfni() {
        eprintln!("row32: AVX-512 VBMI / GFNI absent, nothing to test");
        return;
    }
    let mut rng = Rng(0x0032_0032_0032_0032);
    all::<BlockQ4_0>(&mut rng);
    all::<BlockIQ4NL>(&mut rng);
    all::<BlockQ5_0>(&mut rng);
    all::<BlockQ8_0>(&mut rng);
    all::<BlockQ4_1>(&mut rng);
    all::<BlockQ5_1>(&mut rng);
}

/// Each activation dword lands in exactly one lane of one register per group.
#[test]
fn x_lanes_cover_every_quad_once() {
    fn cover<W: Row32>() {
        let mut seen = [[false; 8]; 8];
        for reg in 0..4 {
            for l in 0..16 {
                let (b, q) = W::x_lane(reg, l);
                assert!(
                    !seen[b][q],
                    "{} reg {reg} lane {l}",
                    std::any::type_name::<W>()
                );
                seen[b][q] = true;
            }
        }
    }
    cover::<BlockQ4_0>();
    cover::<BlockIQ4NL>();
    cover::<BlockQ5_0>();
    cover::<BlockQ8_0>();
    cover::<BlockQ4_1>();
    cover::<BlockQ5_1>();
}

/// Timing of the kernel alone (not a test): `cargo test --release row32_bench -- --ignored
/// --nocapture`; 256 rows of K = 4096 (in L2), ns per group of 8 blocks, min of 7 runs, beside
/// the AVX-512 VNNI kernel it replaces at M = 1 (`dot_block32_vnni`), alternating.
#[test]
#[ignore]
fn row32_bench() {
    fn bench<W: Row32>(rng: &mut Rng) {
        let (rows, nb) = (256, 128);
        let size = std::mem::size_of::<W>();
        let data = blocks(rng, rows * nb, size, &[0]);
        let w: &[W] = bytemuck::cast_slice(&data);
        let x = rng.normalish(nb * 32, 1.5);
        let mut xq = vec![
            BlockQ8_0 {
                d: [0; 2],
                qs: [0; 32]
            };
            nb
        ];
        r::quantize_row_q8_0(&x, &mut xq);
        let xd: Vec<f32> = xq.iter().map(|b| f16_to_f32(b.d)).collect();
        let sums: Vec<i32> = xq
            .iter()
            .map(|b| b.qs.iter().map(|&q| q as i32).sum())
            .collect();
        let (xt, nbias) = interleave::<W>(&xq, &sums);
        let row = RowQ8 {
            xt: &xt,
            d: &xd,
            nbias: &nbias,
            s: &[],
        };
        let (mut best, mut old) = (f64::MAX, f64::MAX);
        let mut sink = 0.0f32;
        let per = 20.0 * rows as f64 * (nb / 8) as f64;
        for _ in 0..7 {
            let t = std::time::Instant::now();
            for _ in 0..20 {
                for rw in w.chunks_exact(nb) {
                    // SAFETY: cpu::has_vbmi_gfni() checked; x prepared for nb blocks.
                    sink += unsafe { dot_row32::<W, false>(bytemuck::cast_slice(rw), nb, &row) };
                }
            }
            best = best.min(t.elapsed().as_secs_f64() / per);
            let t = std::time::Instant::now();
            for _ in 0..20 {
                for rw in w.chunks_exact(nb) {
                    // SAFETY: has_vnni (implied by cpu::has_vbmi_gfni()); one activation block per block.
                    sink += unsafe {
                        super::super::dot_block32_vnni(rw, [&xq], [&xd], [&sums], false)[0]
                    };
                }
            }
            old = old.min(t.elapsed().as_secs_f64() / per);
        }
        let gb = |t: f64| (8 * size) as f64 / t / 1e9;
        let name = std::any::type_name::<W>().rsplit("::").next().unwrap();
        eprintln!(
            "{name:11} row32 {:5.2} ns/group {:5.1} GB/s | block32_vnni {:5.2} ns/group {:5.1} GB/s ({sink})",
            best * 1e9,
            gb(best),
            old * 1e9,
            gb(old)
        );
    }
    if !crate::cpu::has_vbmi_gfni() {
        return;
    }
    let mut rng = Rng(7);
    bench::<BlockQ4_0>(&mut rng);
    bench::<BlockIQ4NL>(&mut rng);
    bench::<BlockQ5_0>(&mut rng);
    bench::<BlockQ8_0>(&mut rng);
}

/// From memory (not a test): `cargo test --release row32_mem_bench -- --ignored --nocapture`.
/// 14336 rows of K = 4096, 3 copies rotating (about 100 MB for q4_0, past the 32 MB L3), one
/// thread: row32 without and with the software prefetch, and a plain read of the same bytes
/// (wrapping sums of u64, as `bandwidth::stream_read` on one thread), alternating; GB/s of
/// weight bytes, best of 5.
#[test]
#[ignore]
fn row32_mem_bench() {
    fn read(b: &[u8]) -> u64 {
        let (_, words, _) = bytemuck::pod_align_to::<u8, u64>(b);
        let mut acc = [0u64; 8];
        for c in words.chunks_exact(8) {
            for (a, &v) in acc.iter_mut().zip(c) {
                *a = a.wrapping_add(v);
            }
        }
        acc.iter().fold(0, |a, &v| a.wrapping_add(v))
    }
    fn bench<W: Row32>(rng: &mut Rng) {
        let (rows, nb, copies) = (14336, 128, 3);
        let size = std::mem::size_of::<W>();
        let datas: Vec<Vec<u8>> = (0..copies)
            .map(|_| blocks(rng, rows * nb, size, &[0]))
            .collect();
        let x = rng.normalish(nb * 32, 1.5);
        let mut xq = vec![
            BlockQ8_0 {
                d: [0; 2],
                qs: [0; 32]
            };
            nb
        ];
        r::quantize_row_q8_0(&x, &mut xq);
        let xd: Vec<f32> = xq.iter().map(|b| f16_to_f32(b.d)).collect();
        let sums: Vec<i32> = xq
            .iter()
            .map(|b| b.qs.iter().map(|&q| q as i32).sum())
            .collect();
        let (xt, nbias) = interleave::<W>(&xq, &sums);
        let row = RowQ8 {
            xt: &xt,
            d: &xd,
            nbias: &nbias,
            s: &[],
        };
        let mut best = [f64::MAX; 3];
        let mut sink = 0.0f32;
        let bytes = (rows * nb * size) as f64;
        for _ in 0..5 {
            for (v, b) in best.iter_mut().enumerate() {
                let t = std::time::Instant::now();
                for d in &datas {
                    let w: &[W] = bytemuck::cast_slice(d);
                    for rw in w.chunks_exact(nb) {
                        // SAFETY: cpu::has_vbmi_gfni() checked; x prepared for nb blocks.
                        sink += unsafe {
                            match v {
                                0 => dot_row32::<W, false>(bytemuck::cast_slice(rw), nb, &row),
                                1 => dot_row32::<W, true>(bytemuck::cast_slice(rw), nb, &row),
                                _ => read(bytemuck::cast_slice(rw)) as f32,
                            }
                        };
                    }
                }
                *b = b.min(t.elapsed().as_secs_f64() / copies as f64);
            }
        }
        let name = std::any::type_name::<W>().rsplit("::").next().unwrap();
        let gb = |t: f64| bytes / t / 1e9;
        eprintln!(
            "{name:11} row32 {:5.1} GB/s, prefetch {:5.1} GB/s | read {:5.1} GB/s ({sink})",
            gb(best[0]),
            gb(best[1]),
            gb(best[2])
        );
    }
    if !crate::cpu::has_vbmi_gfni() {
        return;
    }
    let mut rng = Rng(9);
    bench::<BlockQ4_0>(&mut rng);
    bench::<BlockQ8_0>(&mut rng);
}

/// Through `qmatmul` at M = 1 (`Plan::fill`: four rows per call up to K = 2048, then the rows
/// left one by one; longer rows one by one; the last row without bytes after it): every output
/// is the reference's, for N = 1..=9 and rows of 18 (SmolLM2's 576), 65 and 64 blocks.
#[test]
fn qmatmul_m1_rows_equal_reference() {
    use crate::formats::tensor::QuantizedView;
    use crate::matmul::{qmatmul, QType};
    use bytemuck::Zeroable;
    fn run<W: Row32>(rng: &mut Rng, qtype: QType) {
        let size = std::mem::size_of::<W>();
        for nb in [18usize, 64, 65] {
            for n in 1..=9 {
                let data = blocks(rng, n * nb, size, halves::<W>());
                let k = nb * 32;
                let x = rng.normalish(k, 1.0);
                let view = QuantizedView {
                    qtype,
                    rows: n,
                    cols: k,
                    block_size: 32,
                    scale_mode: None,
                    data: &data,
                    stats: &[],
                    double_quant: None,
                };
                let mut y = vec![0.0f32; n];
                qmatmul(&x, 1, &view, &mut y).unwrap();
                // q4_1 / q5_1: ggml's q8_1 blocks (their d and quants are q8_0's, plus s)
                let (xq, xs): (Vec<BlockQ8_0>, Vec<f32>) = if W::HAS_MIN {
                    let mut x1 = vec![r::BlockQ8_1::zeroed(); nb];
                    r::quantize_row_q8_1(&x, &mut x1);
                    x1.iter()
                        .map(|b| (BlockQ8_0 { d: b.d, qs: b.qs }, f16_to_f32(b.s)))
                        .unzip()
                } else {
                    let mut xq = vec![BlockQ8_0::zeroed(); nb];
                    r::quantize_row_q8_0(&x, &mut xq);
                    (xq, Vec::new())
                };
                let xd: Vec<f32> = xq.iter().map(|b| f16_to_f32(b.d)).collect();
                let w: &[W] = bytemuck::cast_slice(&data);
                for (row, rw) in w.chunks_exact(nb).enumerate() {
                    assert_eq!(
                        y[row].to_bits(),
                        want(rw, &xq, &xd, &xs),
                        "{qtype:?} n={n} nb={nb} row {row}"
                    );
                }
            }
        }
    }
    let mut rng = Rng(0x0032_4444_0032_4444);
    run::<BlockQ4_0>(&mut rng, QType::Q4_0);
    run::<BlockIQ4NL>(&mut rng, QType::IQ4NL);
    run::<BlockQ5_0>(&mut rng, QType::Q5_0);
    run::<BlockQ8_0>(&mut rng, QType::Q8_0);
    run::<BlockQ4_1>(&mut rng, QType::Q4_1);
    run::<BlockQ5_1>(&mut rng, QType::Q5_1);
}
