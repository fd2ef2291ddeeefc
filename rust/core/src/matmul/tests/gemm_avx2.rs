//! The GEMM path of CPUs without AVX-512 (`gemm_avx2.rs`, `x86/gemm32_avx2.rs`), forced on
//! this thread whatever the CPU has beyond AVX2: every output has the reference's bits with
//! both integer products (AVX2 `vpmaddubsw` and, where the CPU has it, AVX-VNNI), on the pool
//! and on one thread, for N with a partial panel, K with a partial group, under one group and
//! over several chunks, M odd, below and above one block of activation rows.

use super::super::gemm_avx2::{Int8Dot, FORCE};
use super::gemm32_cases as cases;
use super::*;

fn products() -> Vec<Int8Dot> {
    let mut v = Vec::new();
    if crate::cpu::has_avx2() {
        v.push(Int8Dot::Maddubs);
    }
    if crate::cpu::has_avx_vnni() {
        v.push(Int8Dot::AvxVnni);
    }
    v
}

#[test]
fn avx2_gemm_equals_reference() {
    // (the int8 paths: on AMX the ggml formats take the bf16 tiles from `ggml_bf16_min_m`)
    let _int8 = crate::matmul::GgmlInt8::new();
    let mut rng = Rng(0xa2a2_6e33_a2a2_6e33);
    let dots = products();
    for qtype in [
        QType::Q4_0,
        QType::Q5_0,
        QType::Q8_0,
        QType::IQ4NL,
        QType::Q4_1,
        QType::Q5_1,
    ] {
        let info = qtype.info();
        for (n, nb, m) in [
            // one group, N one panel plus a partial one, M odd
            (7, 8, 5),
            // K under one group (only the scalar tail), 576 (2 groups + 2 blocks)
            (4, 3, 4),
            (9, 18, 16),
            // several chunks (17 groups: 8 + 8 + 1) plus a tail, N over a task
            (70, 139, 3),
            // M over one block of activation rows (64), N several panels
            (12, 16, 67),
            (5, 9, 2),
        ] {
            let k = nb * info.block_size;
            let (data, x) = cases::data(&mut rng, qtype, n, nb, m);
            let want = cases::reference_outputs(qtype, &data, n, &x, m);
            let w = view(qtype, n, k, &data);
            for &dot in &dots {
                FORCE.set(Some(dot));
                let p = plan(&x, m, &w, m * n).map(|p| p.gemm2);
                let mut y = vec![0.0f32; m * n];
                let pool = qmatmul(&x, m, &w, &mut y);
                let mut y1 = vec![0.0f32; m * n];
                crate::parallel::set_num_threads(1);
                let one = qmatmul(&x, m, &w, &mut y1);
                crate::parallel::set_num_threads(0);
                FORCE.set(None);
                assert_eq!(p.unwrap(), Some(dot), "{qtype:?}: the path did not run");
                pool.unwrap();
                one.unwrap();
                for (i, (&a, &b)) in want.iter().zip(&y).enumerate() {
                    assert_eq!(
                        a.to_bits(),
                        b.to_bits(),
                        "{qtype:?} {dot:?} pool n={n} nb={nb} m={m} out {i}: {b} vs {a}"
                    );
                }
                for (i, (&a, &b)) in want.iter().zip(&y1).enumerate() {
                    assert_eq!(
                        a.to_bits(),
                        b.to_bits(),
                        "{qtype:?} {dot:?} 1 thread n={n} nb={nb} m={m} out {i}: {b} vs {a}"
                    );
                }
            }
        }
    }
}

/// Without the forcing the path runs only where the CPU lacks AVX-512 VNNI, from
/// `GEMM2_MIN_M` rows.
#[test]
fn avx2_gemm_only_without_avx512_vnni() {
    use super::super::gemm_avx2::GEMM2_MIN_M;
    let mut rng = Rng(0x1234_5678_9abc_def1);
    let (n, k) = (8, 512);
    let data = blocks(&mut rng, n * k / 32, 18, &[0]);
    let w = view(QType::Q4_0, n, k, &data);
    for m in [1, 2, GEMM2_MIN_M - 1, GEMM2_MIN_M, 16] {
        let x = rng.normalish(m * k, 1.0);
        let p = plan(&x, m, &w, m * n).unwrap();
        let want = use_simd() && !use_vnni() && m >= GEMM2_MIN_M;
        assert_eq!(p.gemm2.is_some(), want, "m={m}");
    }
}
