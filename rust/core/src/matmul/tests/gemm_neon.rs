//! The aarch64 GEMM path (`gemm_neon.rs`, `neon/gemm.rs`), forced on this thread with each
//! integer product the CPU has (`sdot` with dotprod, `smmla` with i8mm: qemu `-cpu max` has
//! both): every output has the reference's bits for every format at M in {2, 3, 4, 7, 16, 33}
//! (tiles of 4 and their remainders, odd rows paired with a copy under `smmla`) and 67 (two
//! blocks of activation rows), N with a partial panel, K = 32, 256 and 4096 (one block, one
//! lane group, several chunks of `KC`) and 1120 (a partial chunk and a partial lane group), on
//! the pool and on one thread.

use super::super::gemm_neon::{choose, FORCE};
use super::super::neon::gemm::NeonDot;
use super::gemm32_cases as cases;
use super::*;

const FORMATS: [QType; 6] = [
    QType::Q4_0,
    QType::Q5_0,
    QType::Q8_0,
    QType::IQ4NL,
    QType::Q4_1,
    QType::Q5_1,
];

/// The products this CPU has (both NEON GEMMs' tests run each).
pub(super) fn products() -> Vec<NeonDot> {
    let mut v = Vec::new();
    if crate::cpu::has_dotprod() {
        v.push(NeonDot::Sdot);
    }
    if crate::cpu::has_i8mm() {
        v.push(NeonDot::I8mm);
    }
    v
}

/// `qmatmul` with the path forced to `dot` (`None`: the row kernels), on the pool and on one
/// thread; checks that `plan` took it.
pub(super) fn run_forced(
    dot: Option<NeonDot>,
    w: &QuantizedView<'_>,
    x: &[f32],
    m: usize,
) -> [Vec<f32>; 2] {
    let n = w.rows;
    FORCE.set(Some(dot));
    let p = plan(x, m, w, m * n).map(|p| p.gemm_neon);
    let mut y = vec![0.0f32; m * n];
    let pool = qmatmul(x, m, w, &mut y);
    let mut y1 = vec![0.0f32; m * n];
    crate::parallel::set_num_threads(1);
    let one = qmatmul(x, m, w, &mut y1);
    crate::parallel::set_num_threads(0);
    FORCE.set(None);
    assert_eq!(p.unwrap(), dot, "{:?}: the path did not run", w.qtype);
    pool.unwrap();
    one.unwrap();
    [y, y1]
}

#[test]
fn neon_gemm_equals_reference() {
    let mut rng = Rng(0x4e30_6e33_a64a_9e77);
    let dots = products();
    for qtype in FORMATS {
        let info = qtype.info();
        for (n, nb, ms) in [
            (13, 1, &[2, 3, 4, 7, 16, 33][..]),
            (11, 8, &[2, 3, 4, 7, 16, 33, 67][..]),
            (9, 128, &[2, 3, 4, 7, 16, 33][..]),
            (21, 35, &[5, 8][..]),
        ] {
            for &m in ms {
                let k = nb * info.block_size;
                let (data, x) = cases::data(&mut rng, qtype, n, nb, m);
                let want = cases::reference_outputs(qtype, &data, n, &x, m);
                let w = view(qtype, n, k, &data);
                for &dot in &dots {
                    let [y, y1] = run_forced(Some(dot), &w, &x, m);
                    for (what, y) in [("pool", &y), ("1 thread", &y1)] {
                        let case = format!("{qtype:?} {dot:?} {what} n={n} k={k} m={m}");
                        assert_same_bits(&want, y, &case);
                    }
                }
            }
        }
    }
}

/// Without the forcing the path runs from `GEMM_NEON_MIN_M` rows with the best product the CPU
/// has (none without dotprod: the row kernels), and only for its formats.
#[test]
fn neon_gemm_chosen_by_detection() {
    use super::super::gemm_neon::GEMM_NEON_MIN_M;
    let best = NeonDot::detect();
    assert_eq!(best.is_some(), crate::cpu::has_dotprod());
    if crate::cpu::has_i8mm() {
        assert_eq!(best, Some(NeonDot::I8mm));
    }
    let mut rng = Rng(0x0123_4567_89ab_cdef);
    let (n, k) = (8, 512);
    for (qtype, size, halves) in [(QType::Q4_0, 18, &[0][..]), (QType::Q5_1, 24, &[0, 2][..])] {
        let data = blocks(&mut rng, n * k / 32, size, halves);
        let w = view(qtype, n, k, &data);
        for m in [1, 2, GEMM_NEON_MIN_M, 16] {
            let x = rng.normalish(m * k, 1.0);
            let p = plan(&x, m, &w, m * n).unwrap();
            let want = if m >= GEMM_NEON_MIN_M && m >= 2 && use_simd() {
                best
            } else {
                None
            };
            assert_eq!(p.gemm_neon, want, "{qtype:?} m={m}");
        }
    }
    assert_eq!(choose(QType::Q4K, 16), best);
    assert_eq!(choose(QType::TQ2_0, 16), None);
    assert_eq!(choose(QType::NF4, 16), None);
}

/// The GEMM and the row kernels give the same bits (both equal the reference; this checks the
/// switch between them at the threshold cannot change a result).
#[test]
fn neon_gemm_equals_row_kernels() {
    let mut rng = Rng(0x7777_1234_4321_7777);
    let dots = products();
    for qtype in FORMATS {
        let info = qtype.info();
        let (n, nb, m) = (19, 18, 6);
        let (data, x) = cases::data(&mut rng, qtype, n, nb, m);
        let w = view(qtype, n, nb * info.block_size, &data);
        let rows = run_forced(None, &w, &x, m);
        for &dot in &dots {
            let gemm = run_forced(Some(dot), &w, &x, m);
            for (a, b) in rows.iter().zip(&gemm) {
                assert_same_bits(a, b, &format!("{qtype:?} {dot:?}"));
            }
        }
    }
}

/// Every output of `got` has the bits of `want`'s (the first that differs named, with `case`).
pub(super) fn assert_same_bits(want: &[f32], got: &[f32], case: &str) {
    assert_eq!(want.len(), got.len(), "{case}: lengths");
    for (i, (&a, &b)) in want.iter().zip(got).enumerate() {
        assert_eq!(a.to_bits(), b.to_bits(), "{case} out {i}: {b} vs {a}");
    }
}
