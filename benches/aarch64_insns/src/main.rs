//! Instruction-count probe of the aarch64 kernels (run by `run.sh` under `qemu -singlestep`):
//! `aarch64-insns KERNEL VARIANT K ROWS REPS` runs one kernel REPS times over one weight row of
//! K weights and ROWS activation rows. VARIANT: `ref` (the scalar reference, once per row),
//! `mull` / `sdot` (the NEON integer kinds), `neon` (quantizers).
//! `aarch64-insns qmatmul FORMAT K M N REPS` runs `qmatmul` REPS times with N weight rows of
//! FORMAT (q4_0, q5_0, q8_0, iq4_nl, q4_1, q5_1) and M activation rows, whatever path the
//! CPU, FERROQUANT_MAX_ISA and FERROQUANT_NEON_GEMM choose (activation quantization included).
#[cfg(target_arch = "aarch64")]
fn main() {
    use ferroquant_core::formats::{blocks::*, ggml_quantize_row, legacy};
    use ferroquant_core::matmul::{neon, reference as r};
    use ferroquant_core::qtype::QType;
    use std::hint::black_box;

    let a: Vec<String> = std::env::args().collect();
    if a.len() == 7 && a[1] == "qmatmul" {
        return qmatmul_probe(&a[2], &a[3], &a[4], &a[5], &a[6]);
    }
    let usage = "usage: aarch64-insns KERNEL VARIANT K ROWS(1|4) REPS";
    assert!(a.len() == 6, "{usage}");
    let (kern, var) = (a[1].as_str(), a[2].as_str());
    let k: usize = a[3].parse().expect(usage);
    let rows: usize = a[4].parse().expect(usage);
    let reps: usize = a[5].parse().expect(usage);
    assert!(rows == 1 || rows == 4, "{usage}");
    if var == "sdot" {
        assert!(ferroquant_core::cpu::has_dotprod(), "this CPU has no dotprod");
    }
    let mut seed = 0x1234_5678u64;
    let mut bytes = |n: usize| -> Vec<u8> {
        (0..n)
            .map(|_| {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                seed as u8
            })
            .collect()
    };
    let x: Vec<Vec<f32>> = (0..4)
        .map(|_| bytes(k).iter().map(|&b| b as f32 / 128.0 - 1.0).collect())
        .collect();
    let scaled = |mut v: Vec<u8>, size: usize, halves: &[usize]| {
        for blk in v.chunks_exact_mut(size) {
            for &o in halves {
                blk[o..o + 2].copy_from_slice(&f16_from_f32(0.01));
            }
        }
        v
    };
    let mut acc = 0.0f32;
    macro_rules! block32 {
        ($t:ty, $size:expr) => {{
            let wb = scaled(bytes(k / 32 * $size), $size, &[0]);
            let w: &[$t] = bytemuck::cast_slice(&wb);
            let xq: Vec<Vec<BlockQ8_0>> = x
                .iter()
                .map(|x| {
                    let mut q = vec![bytemuck::Zeroable::zeroed(); k / 32];
                    r::quantize_row_q8_0(x, &mut q);
                    q
                })
                .collect();
            let xd: Vec<Vec<f32>> = xq
                .iter()
                .map(|q| q.iter().map(|b| f16_to_f32(b.d)).collect())
                .collect();
            let x4: [&[BlockQ8_0]; 4] = std::array::from_fn(|i| &xq[i][..]);
            let d4: [&[f32]; 4] = std::array::from_fn(|i| &xd[i][..]);
            for _ in 0..reps {
                // SAFETY: NEON is baseline on aarch64, dotprod asserted above for `sdot`; one
                // activation block and scale per weight block.
                acc += unsafe {
                    match (var, rows) {
                        ("ref", _) => (0..rows).map(|i| r::dot_block32(w, x4[i], d4[i])).sum(),
                        ("mull", 1) => neon::dot_block32_mull(w, [x4[0]], [d4[0]])[0],
                        ("mull", _) => neon::dot_block32_mull(w, x4, d4).iter().sum(),
                        (_, 1) => neon::dot_block32_sdot(w, [x4[0]], [d4[0]])[0],
                        _ => neon::dot_block32_sdot(w, x4, d4).iter().sum(),
                    }
                };
                black_box(&acc);
            }
        }};
    }
    macro_rules! block_k {
        ($t:ty, $size:expr, $halves:expr) => {{
            let wb = scaled(bytes(k / 256 * $size), $size, $halves);
            let w: &[$t] = bytemuck::cast_slice(&wb);
            let xq: Vec<Vec<r::BlockQ8K>> = x
                .iter()
                .map(|x| {
                    let mut q = vec![bytemuck::Zeroable::zeroed(); k / 256];
                    r::quantize_row_q8_k(x, &mut q);
                    q
                })
                .collect();
            let x4: [&[r::BlockQ8K]; 4] = std::array::from_fn(|i| &xq[i][..]);
            for _ in 0..reps {
                // SAFETY: as for block32.
                acc += unsafe {
                    match (var, rows) {
                        ("ref", _) => (0..rows).map(|i| r::dot_block_k(w, x4[i])).sum(),
                        ("mull", 1) => neon::dot_block_k_mull(w, [x4[0]])[0],
                        ("mull", _) => neon::dot_block_k_mull(w, x4).iter().sum(),
                        (_, 1) => neon::dot_block_k_sdot(w, [x4[0]])[0],
                        _ => neon::dot_block_k_sdot(w, x4).iter().sum(),
                    }
                };
                black_box(&acc);
            }
        }};
    }
    match kern {
        "q4_0" => block32!(BlockQ4_0, 18),
        "q5_0" => block32!(BlockQ5_0, 22),
        "q8_0" => block32!(BlockQ8_0, 34),
        "iq4_nl" => block32!(BlockIQ4NL, 18),
        "q4_k" => block_k!(BlockQ4K, 144, &[0, 2]),
        "q5_k" => block_k!(BlockQ5K, 176, &[0, 2]),
        "q6_k" => block_k!(BlockQ6K, 210, &[208]),
        "quantize_q8_0" | "quantize_q4_0" => {
            let (qt, size) = if kern == "quantize_q8_0" {
                (QType::Q8_0, 34)
            } else {
                (QType::Q4_0, 18)
            };
            let mut out = vec![0u8; k / 32 * size];
            for _ in 0..reps {
                match (var, qt) {
                    ("ref", QType::Q8_0) => {
                        legacy::quantize_row_q8_0_ref(black_box(&x[0]), &mut out)
                    }
                    ("ref", _) => legacy::quantize_row_q4_0_ref(black_box(&x[0]), &mut out),
                    _ => ggml_quantize_row(qt, black_box(&x[0]), &mut out, None),
                }
                black_box(&out);
            }
        }
        _ => panic!("unknown kernel {kern}"),
    }
    println!("{acc}");
}

/// `qmatmul` of N rows of `fmt` weights (random quants, scales 0.01) with M random rows.
#[cfg(target_arch = "aarch64")]
fn qmatmul_probe(fmt: &str, k: &str, m: &str, n: &str, reps: &str) {
    use ferroquant_core::formats::{blocks::f16_from_f32, tensor::QuantizedView};
    use ferroquant_core::matmul::qmatmul;
    use ferroquant_core::qtype::QType;
    let usage = "usage: aarch64-insns qmatmul FORMAT K M N REPS";
    let [k, m, n, reps]: [usize; 4] = [k, m, n, reps].map(|v| v.parse().expect(usage));
    let (qtype, halves): (QType, &[usize]) = match fmt {
        "q4_0" => (QType::Q4_0, &[0]),
        "q5_0" => (QType::Q5_0, &[0]),
        "q8_0" => (QType::Q8_0, &[0]),
        "iq4_nl" => (QType::IQ4NL, &[0]),
        "q4_1" => (QType::Q4_1, &[0, 2]),
        "q5_1" => (QType::Q5_1, &[0, 2]),
        "q4_k" => (QType::Q4K, &[0, 2]),
        "q5_k" => (QType::Q5K, &[0, 2]),
        "q6_k" => (QType::Q6K, &[208]),
        "q2_k" => (QType::Q2K, &[80, 82]),
        "q3_k" => (QType::Q3K, &[108]),
        "iq4_xs" => (QType::IQ4XS, &[0]),
        _ => panic!("{usage}"),
    };
    let (size, block) = (qtype.info().type_size, qtype.info().block_size);
    let mut seed = 0x9e37_79b9u64;
    let mut next = || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed as u8
    };
    let mut data: Vec<u8> = (0..n * k / block * size).map(|_| next()).collect();
    for blk in data.chunks_exact_mut(size) {
        for &o in halves {
            blk[o..o + 2].copy_from_slice(&f16_from_f32(0.01));
        }
    }
    let x: Vec<f32> = (0..m * k).map(|_| next() as f32 / 128.0 - 1.0).collect();
    let w = QuantizedView {
        qtype,
        rows: n,
        cols: k,
        block_size: block,
        scale_mode: None,
        data: &data,
        stats: &[],
        double_quant: None,
    };
    let mut y = vec![0.0f32; m * n];
    for _ in 0..reps {
        qmatmul(std::hint::black_box(&x), m, &w, &mut y).expect("qmatmul");
        std::hint::black_box(&y);
    }
    println!("{}", y.iter().sum::<f32>());
}

#[cfg(not(target_arch = "aarch64"))]
fn main() {
    eprintln!("build for aarch64-unknown-linux-gnu (see run.sh)");
    std::process::exit(2);
}
