//! The bf16 GEMM's microkernels on f32 FMAs, for CPUs where `vdpbf16ps` is slow: on the Intel
//! Xeon (AMX, AVX-512 BF16) this project also runs on, one core issued 1.7 G `vdpbf16ps` a second
//! against 7.1 G `vfmadd231ps` (2026-12-07), so 64 bf16 FLOP per instruction gave 110 GFLOP/s
//! where 32 f32 FLOP per FMA give 190-220. On AMD Zen 5 `vdpbf16ps` runs at the FMA's rate and
//! is the faster kernel; `use_fma` picks one per process (`faster`), and both compute the same
//! bits, so the choice never shows in the results.
//!
//! **The same bits as `gemm16::kernel`** (`reference/bf16.rs`): a bf16 value widened to f32 is
//! exact (its bits shifted up 16: the odd element of a pair is the pair `& 0xffff0000`, the even
//! one the pair `<< 16`), the product of two is exact in f32, so `vfmadd231ps` adds the odd
//! element's product, then the even one's, each with one rounding to nearest even, as
//! `vdpbf16ps` does. Its flushes: with MXCSR.FTZ and DAZ set for the length of the asm block a
//! subnormal result is a signed zero (no input is subnormal: bf16 values come from
//! `vcvtne2ps2bf16`, which flushes them, and the accumulators from these kernels or
//! `gemm16::kernel`). `semantics_hold` checks all of it on tricky lanes at run time, and the
//! kernels are used only where it holds. MXCSR is saved and restored inside the one asm block
//! that does the arithmetic, so no compiled code ever runs with the changed mode.
//!
//! Layout: the job's decoded chunk as f32 rows `KC` apart (`widen`), the activations as
//! `gemm16::Acts16` (bf16 pairs, lanes are activation rows).

use std::arch::asm;
use std::arch::x86_64::*;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::OnceLock;

use super::gemm16::{Pairs16, KC};
use crate::matmul::reference::bf16 as r;

// The asm addresses weight row i at byte `i · 1024`: rows of KC f32.
const _: () = assert!(KC * 4 == 1024);

/// 0: `faster` decides; 1: `vdpbf16ps` kernels; 2: these kernels (where `semantics_hold`).
static FORCE: AtomicU8 = AtomicU8::new(0);

/// Forces one kind of kernel (`Some(true)`: these) or gives the choice back to `faster`
/// (`None`). For tests and A/B timings; the results are the same bits either way.
pub fn force(fma: Option<bool>) {
    FORCE.store(
        match fma {
            None => 0,
            Some(false) => 1,
            Some(true) => 2,
        },
        Ordering::Relaxed,
    );
}

/// True when the bf16 GEMM should run these kernels (call only after `cpu::has_avx512_bf16`).
pub fn use_fma() -> bool {
    match FORCE.load(Ordering::Relaxed) {
        1 => false,
        2 => semantics_hold(),
        _ => faster(),
    }
}

/// True when these kernels compute `reference::bf16`'s bits on this CPU (checked once, every
/// shape, on subnormal, tiny and underflowing values).
pub fn semantics_hold() -> bool {
    static OK: OnceLock<bool> = OnceLock::new();
    // SAFETY: called only after `cpu::has_avx512_bf16` (the bf16 path's condition).
    *OK.get_or_init(|| unsafe { check_semantics() })
}

/// True when these kernels hold and beat `gemm16::kernel` on this CPU: both timed once per
/// process on data in L1 (about a millisecond), best of 5 rounds each.
fn faster() -> bool {
    static FAST: OnceLock<bool> = OnceLock::new();
    // SAFETY: as `semantics_hold`.
    *FAST.get_or_init(|| semantics_hold() && unsafe { time_kernels() })
}

#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
unsafe fn time_kernels() -> bool {
    let pairs = KC / 2;
    let x = vec![Pairs16([0x3f80_3f80; 16]); 4 * pairs];
    let w16 = vec![0x3f80u16; 6 * KC];
    let w32 = vec![1.0f32; 6 * KC];
    let mut acc = vec![_mm512_setzero_ps(); 24];
    let (mut dp, mut fma) = (u128::MAX, u128::MAX);
    for _ in 0..5 {
        let t = std::time::Instant::now();
        for _ in 0..32 {
            let xs = std::array::from_fn(|v| &x[v * pairs..(v + 1) * pairs]);
            // SAFETY: the features; 6 rows of KC, 4 vectors of `pairs`, 24 accumulators.
            unsafe { super::gemm16::kernel::<6, 4>(&w16, KC, xs, pairs, &mut acc, 0, 4) };
        }
        dp = dp.min(t.elapsed().as_nanos());
        let t = std::time::Instant::now();
        for _ in 0..32 {
            // SAFETY: as above.
            unsafe { kernel::<6, 4>(&w32, &x, pairs, pairs, &mut acc, 0, 4) };
        }
        fma = fma.min(t.elapsed().as_nanos());
    }
    std::hint::black_box(&acc);
    fma < dp
}

#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
unsafe fn check_semantics() -> bool {
    let mut s = 0x2545_f491_4f6c_dd1du64;
    let mut rnd = move || {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        s
    };
    // Subnormals, tiny normals, values whose products underflow, and ordinary ones.
    let val = move |r: u64| -> f32 {
        let bits = r as u32;
        let v = match (r >> 40) % 6 {
            0 => f32::from_bits(bits & 0x807f_ffff),
            1 => f32::from_bits((bits & 0x80ff_ffff) | 0x0080_0000),
            2 => f32::from_bits((bits & 0x807f_ffff) | ((60 + (r >> 48) as u32 % 10) << 23)),
            _ => f32::from_bits((bits & 0x807f_ffff) | ((100 + (r >> 48) as u32 % 60) << 23)),
        };
        if v.is_subnormal() {
            0.0f32.copysign(v)
        } else {
            v
        }
    };
    let pairs = 24;
    for round in 0..8 {
        let x: Vec<Pairs16> = (0..4 * pairs)
            .map(|_| {
                Pairs16(std::array::from_fn(|_| {
                    r::round_bf16(val(rnd())) as u32 | (r::round_bf16(val(rnd())) as u32) << 16
                }))
            })
            .collect();
        let w: Vec<u16> = (0..24 * KC).map(|_| r::round_bf16(val(rnd()))).collect();
        let mut w32 = vec![0f32; 24 * KC];
        // SAFETY: the features (contract).
        unsafe { widen(&w, &mut w32) };
        let start: Vec<[f32; 16]> = (0..24)
            .map(|_| std::array::from_fn(|_| val(rnd())))
            .collect();
        // SAFETY: [f32; 16] and __m512 have the same size, any bits valid.
        let mut acc: Vec<__m512> = start
            .iter()
            .map(|a| unsafe { std::mem::transmute(*a) })
            .collect();
        // Each shape twice: `acc[i · nv + v]`, vector v at `x[v · pairs..]`.
        let (rows, nv) = [(6, 4), (8, 3), (12, 2), (24, 1)][round % 4];
        // SAFETY: the features; 24 rows of KC, 4 vectors of `pairs`, 24 accumulators.
        unsafe {
            match nv {
                4 => kernel::<6, 4>(&w32, &x, pairs, pairs, &mut acc, 0, 4),
                3 => kernel::<8, 3>(&w32, &x, pairs, pairs, &mut acc, 0, 3),
                2 => kernel::<12, 2>(&w32, &x, pairs, pairs, &mut acc, 0, 2),
                _ => kernel::<24, 1>(&w32, &x, pairs, pairs, &mut acc, 0, 1),
            }
        }
        for i in 0..rows {
            for v in 0..nv {
                // SAFETY: as for the transmute above.
                let got: [f32; 16] = unsafe { std::mem::transmute(acc[i * nv + v]) };
                for l in 0..16 {
                    let mut e = start[i * nv + v][l];
                    for p in 0..pairs {
                        let xp = x[v * pairs + p].0[l];
                        let wp = [w[i * KC + 2 * p], w[i * KC + 2 * p + 1]];
                        e = r::step(e, wp, [xp as u16, (xp >> 16) as u16]);
                    }
                    let g = got[l];
                    if g.to_bits() != e.to_bits() && !(g.is_nan() && e.is_nan()) {
                        return false;
                    }
                }
            }
        }
    }
    true
}

/// bf16 values `src` (a multiple of 16 of them) as f32 (exact) at `dst`.
///
/// # Safety
/// `cpu::has_avx512_bf16`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
pub unsafe fn widen(src: &[u16], dst: &mut [f32]) {
    assert!(src.len().is_multiple_of(16) && dst.len() >= src.len());
    for (s, d) in src.chunks_exact(16).zip(dst.chunks_exact_mut(16)) {
        // SAFETY: 32 bytes from a 16-element chunk, 64 bytes into one.
        unsafe {
            let h = _mm512_cvtepu16_epi32(_mm256_loadu_si256(s.as_ptr() as *const __m256i));
            _mm512_storeu_si512(d.as_mut_ptr() as *mut __m512i, _mm512_slli_epi32::<16>(h));
        }
    }
}

/// The asm of one kernel: MXCSR's FTZ and DAZ set, the 24 accumulators `$a` in zmm0..zmm23
/// (accumulator i · MV + v: weight row i, vector v), the mask of a pair's odd element in zmm31,
/// then per pair the shape's `$lines` (vector v at `x + v · xs`, weight row i at `w + i · 1024`),
/// and MXCSR restored before the block ends.
macro_rules! fma_asm {
    ($a:ident, $csr:ident, $x:expr, $w:expr, $xs:expr, $n:expr, [$($line:literal),* $(,)?]) => {
        asm!(
            "vstmxcsr [{csr}]",
            "mov {t:e}, [{csr}]",
            "or {t:e}, 0x8040",
            "mov [{csr} + 4], {t:e}",
            "vldmxcsr [{csr} + 4]",
            "mov {t:e}, 0xffff0000",
            "vpbroadcastd zmm31, {t:e}",
            "lea {x3}, [{xs} + {xs}*2]",
            "2:",
            $($line,)*
            "add {x}, 64",
            "add {w}, 8",
            "dec {n}",
            "jnz 2b",
            "vldmxcsr [{csr}]",
            csr = in(reg) $csr.as_mut_ptr(),
            t = out(reg) _,
            x3 = out(reg) _,
            x = inout(reg) $x => _,
            w = inout(reg) $w => _,
            xs = in(reg) $xs,
            n = inout(reg) $n => _,
            inout("zmm0") $a[0], inout("zmm1") $a[1], inout("zmm2") $a[2], inout("zmm3") $a[3],
            inout("zmm4") $a[4], inout("zmm5") $a[5], inout("zmm6") $a[6], inout("zmm7") $a[7],
            inout("zmm8") $a[8], inout("zmm9") $a[9], inout("zmm10") $a[10],
            inout("zmm11") $a[11], inout("zmm12") $a[12], inout("zmm13") $a[13],
            inout("zmm14") $a[14], inout("zmm15") $a[15], inout("zmm16") $a[16],
            inout("zmm17") $a[17], inout("zmm18") $a[18], inout("zmm19") $a[19],
            inout("zmm20") $a[20], inout("zmm21") $a[21], inout("zmm22") $a[22],
            inout("zmm23") $a[23],
            out("zmm24") _, out("zmm25") _, out("zmm26") _, out("zmm27") _, out("zmm31") _,
            options(nostack),
        )
    };
}

/// `gemm16::kernel::<NR, MV>` (NR x MV = 24: 6 x 4, 8 x 3, 12 x 2, 24 x 1) on f32 weights:
/// `acc[at + i · step + v] +=` row i of `w` (rows KC apart) times vector v of `x` (vector v at
/// `x[v · xs..]`), over `pairs` pairs.
///
/// # Safety
/// `cpu::has_avx512_bf16`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
pub unsafe fn kernel<const NR: usize, const MV: usize>(
    w: &[f32],
    x: &[Pairs16],
    xs: usize,
    pairs: usize,
    acc: &mut [__m512],
    at: usize,
    step: usize,
) {
    assert!(NR * MV == 24 && pairs > 0 && 2 * pairs <= KC);
    assert!(w.len() >= (NR - 1) * KC + 2 * pairs && x.len() >= (MV - 1) * xs + pairs);
    assert!(at + (NR - 1) * step + MV <= acc.len());
    let idx = |j: usize| at + (j / MV) * step + j % MV;
    let mut a: [__m512; 24] = std::array::from_fn(|j| acc[idx(j)]);
    let mut csr = [0u32; 2];
    let (xp, wp, xs) = (x.as_ptr(), w.as_ptr(), xs * 64);
    // SAFETY: each block reads rows 0..NR of w (asserted: (NR - 1) · KC + 2 · pairs f32) and
    // vectors 0..MV of x (asserted: xs apart, `pairs` entries each) as the loop advances,
    // writes the two-word `csr` buffer, and restores MXCSR before it ends.
    unsafe {
        match (NR, MV) {
            (6, 4) => fma_asm!(
                a,
                csr,
                xp,
                wp,
                xs,
                pairs,
                [
                    // the odd elements of the pair
                    "vpandd zmm24, zmm31, [{x}]",
                    "vpandd zmm25, zmm31, [{x} + {xs}]",
                    "vpandd zmm26, zmm31, [{x} + {xs}*2]",
                    "vpandd zmm27, zmm31, [{x} + {x3}]",
                    "vfmadd231ps zmm0, zmm24, dword ptr [{w} + 4]{{1to16}}",
                    "vfmadd231ps zmm1, zmm25, dword ptr [{w} + 4]{{1to16}}",
                    "vfmadd231ps zmm2, zmm26, dword ptr [{w} + 4]{{1to16}}",
                    "vfmadd231ps zmm3, zmm27, dword ptr [{w} + 4]{{1to16}}",
                    "vfmadd231ps zmm4, zmm24, dword ptr [{w} + 1028]{{1to16}}",
                    "vfmadd231ps zmm5, zmm25, dword ptr [{w} + 1028]{{1to16}}",
                    "vfmadd231ps zmm6, zmm26, dword ptr [{w} + 1028]{{1to16}}",
                    "vfmadd231ps zmm7, zmm27, dword ptr [{w} + 1028]{{1to16}}",
                    "vfmadd231ps zmm8, zmm24, dword ptr [{w} + 2052]{{1to16}}",
                    "vfmadd231ps zmm9, zmm25, dword ptr [{w} + 2052]{{1to16}}",
                    "vfmadd231ps zmm10, zmm26, dword ptr [{w} + 2052]{{1to16}}",
                    "vfmadd231ps zmm11, zmm27, dword ptr [{w} + 2052]{{1to16}}",
                    "vfmadd231ps zmm12, zmm24, dword ptr [{w} + 3076]{{1to16}}",
                    "vfmadd231ps zmm13, zmm25, dword ptr [{w} + 3076]{{1to16}}",
                    "vfmadd231ps zmm14, zmm26, dword ptr [{w} + 3076]{{1to16}}",
                    "vfmadd231ps zmm15, zmm27, dword ptr [{w} + 3076]{{1to16}}",
                    "vfmadd231ps zmm16, zmm24, dword ptr [{w} + 4100]{{1to16}}",
                    "vfmadd231ps zmm17, zmm25, dword ptr [{w} + 4100]{{1to16}}",
                    "vfmadd231ps zmm18, zmm26, dword ptr [{w} + 4100]{{1to16}}",
                    "vfmadd231ps zmm19, zmm27, dword ptr [{w} + 4100]{{1to16}}",
                    "vfmadd231ps zmm20, zmm24, dword ptr [{w} + 5124]{{1to16}}",
                    "vfmadd231ps zmm21, zmm25, dword ptr [{w} + 5124]{{1to16}}",
                    "vfmadd231ps zmm22, zmm26, dword ptr [{w} + 5124]{{1to16}}",
                    "vfmadd231ps zmm23, zmm27, dword ptr [{w} + 5124]{{1to16}}",
                    // the even elements of the pair
                    "vpslld zmm24, [{x}], 16",
                    "vpslld zmm25, [{x} + {xs}], 16",
                    "vpslld zmm26, [{x} + {xs}*2], 16",
                    "vpslld zmm27, [{x} + {x3}], 16",
                    "vfmadd231ps zmm0, zmm24, dword ptr [{w} + 0]{{1to16}}",
                    "vfmadd231ps zmm1, zmm25, dword ptr [{w} + 0]{{1to16}}",
                    "vfmadd231ps zmm2, zmm26, dword ptr [{w} + 0]{{1to16}}",
                    "vfmadd231ps zmm3, zmm27, dword ptr [{w} + 0]{{1to16}}",
                    "vfmadd231ps zmm4, zmm24, dword ptr [{w} + 1024]{{1to16}}",
                    "vfmadd231ps zmm5, zmm25, dword ptr [{w} + 1024]{{1to16}}",
                    "vfmadd231ps zmm6, zmm26, dword ptr [{w} + 1024]{{1to16}}",
                    "vfmadd231ps zmm7, zmm27, dword ptr [{w} + 1024]{{1to16}}",
                    "vfmadd231ps zmm8, zmm24, dword ptr [{w} + 2048]{{1to16}}",
                    "vfmadd231ps zmm9, zmm25, dword ptr [{w} + 2048]{{1to16}}",
                    "vfmadd231ps zmm10, zmm26, dword ptr [{w} + 2048]{{1to16}}",
                    "vfmadd231ps zmm11, zmm27, dword ptr [{w} + 2048]{{1to16}}",
                    "vfmadd231ps zmm12, zmm24, dword ptr [{w} + 3072]{{1to16}}",
                    "vfmadd231ps zmm13, zmm25, dword ptr [{w} + 3072]{{1to16}}",
                    "vfmadd231ps zmm14, zmm26, dword ptr [{w} + 3072]{{1to16}}",
                    "vfmadd231ps zmm15, zmm27, dword ptr [{w} + 3072]{{1to16}}",
                    "vfmadd231ps zmm16, zmm24, dword ptr [{w} + 4096]{{1to16}}",
                    "vfmadd231ps zmm17, zmm25, dword ptr [{w} + 4096]{{1to16}}",
                    "vfmadd231ps zmm18, zmm26, dword ptr [{w} + 4096]{{1to16}}",
                    "vfmadd231ps zmm19, zmm27, dword ptr [{w} + 4096]{{1to16}}",
                    "vfmadd231ps zmm20, zmm24, dword ptr [{w} + 5120]{{1to16}}",
                    "vfmadd231ps zmm21, zmm25, dword ptr [{w} + 5120]{{1to16}}",
                    "vfmadd231ps zmm22, zmm26, dword ptr [{w} + 5120]{{1to16}}",
                    "vfmadd231ps zmm23, zmm27, dword ptr [{w} + 5120]{{1to16}}",
                ]
            ),
            (8, 3) => fma_asm!(
                a,
                csr,
                xp,
                wp,
                xs,
                pairs,
                [
                    // the odd elements of the pair
                    "vpandd zmm24, zmm31, [{x}]",
                    "vpandd zmm25, zmm31, [{x} + {xs}]",
                    "vpandd zmm26, zmm31, [{x} + {xs}*2]",
                    "vfmadd231ps zmm0, zmm24, dword ptr [{w} + 4]{{1to16}}",
                    "vfmadd231ps zmm1, zmm25, dword ptr [{w} + 4]{{1to16}}",
                    "vfmadd231ps zmm2, zmm26, dword ptr [{w} + 4]{{1to16}}",
                    "vfmadd231ps zmm3, zmm24, dword ptr [{w} + 1028]{{1to16}}",
                    "vfmadd231ps zmm4, zmm25, dword ptr [{w} + 1028]{{1to16}}",
                    "vfmadd231ps zmm5, zmm26, dword ptr [{w} + 1028]{{1to16}}",
                    "vfmadd231ps zmm6, zmm24, dword ptr [{w} + 2052]{{1to16}}",
                    "vfmadd231ps zmm7, zmm25, dword ptr [{w} + 2052]{{1to16}}",
                    "vfmadd231ps zmm8, zmm26, dword ptr [{w} + 2052]{{1to16}}",
                    "vfmadd231ps zmm9, zmm24, dword ptr [{w} + 3076]{{1to16}}",
                    "vfmadd231ps zmm10, zmm25, dword ptr [{w} + 3076]{{1to16}}",
                    "vfmadd231ps zmm11, zmm26, dword ptr [{w} + 3076]{{1to16}}",
                    "vfmadd231ps zmm12, zmm24, dword ptr [{w} + 4100]{{1to16}}",
                    "vfmadd231ps zmm13, zmm25, dword ptr [{w} + 4100]{{1to16}}",
                    "vfmadd231ps zmm14, zmm26, dword ptr [{w} + 4100]{{1to16}}",
                    "vfmadd231ps zmm15, zmm24, dword ptr [{w} + 5124]{{1to16}}",
                    "vfmadd231ps zmm16, zmm25, dword ptr [{w} + 5124]{{1to16}}",
                    "vfmadd231ps zmm17, zmm26, dword ptr [{w} + 5124]{{1to16}}",
                    "vfmadd231ps zmm18, zmm24, dword ptr [{w} + 6148]{{1to16}}",
                    "vfmadd231ps zmm19, zmm25, dword ptr [{w} + 6148]{{1to16}}",
                    "vfmadd231ps zmm20, zmm26, dword ptr [{w} + 6148]{{1to16}}",
                    "vfmadd231ps zmm21, zmm24, dword ptr [{w} + 7172]{{1to16}}",
                    "vfmadd231ps zmm22, zmm25, dword ptr [{w} + 7172]{{1to16}}",
                    "vfmadd231ps zmm23, zmm26, dword ptr [{w} + 7172]{{1to16}}",
                    // the even elements of the pair
                    "vpslld zmm24, [{x}], 16",
                    "vpslld zmm25, [{x} + {xs}], 16",
                    "vpslld zmm26, [{x} + {xs}*2], 16",
                    "vfmadd231ps zmm0, zmm24, dword ptr [{w} + 0]{{1to16}}",
                    "vfmadd231ps zmm1, zmm25, dword ptr [{w} + 0]{{1to16}}",
                    "vfmadd231ps zmm2, zmm26, dword ptr [{w} + 0]{{1to16}}",
                    "vfmadd231ps zmm3, zmm24, dword ptr [{w} + 1024]{{1to16}}",
                    "vfmadd231ps zmm4, zmm25, dword ptr [{w} + 1024]{{1to16}}",
                    "vfmadd231ps zmm5, zmm26, dword ptr [{w} + 1024]{{1to16}}",
                    "vfmadd231ps zmm6, zmm24, dword ptr [{w} + 2048]{{1to16}}",
                    "vfmadd231ps zmm7, zmm25, dword ptr [{w} + 2048]{{1to16}}",
                    "vfmadd231ps zmm8, zmm26, dword ptr [{w} + 2048]{{1to16}}",
                    "vfmadd231ps zmm9, zmm24, dword ptr [{w} + 3072]{{1to16}}",
                    "vfmadd231ps zmm10, zmm25, dword ptr [{w} + 3072]{{1to16}}",
                    "vfmadd231ps zmm11, zmm26, dword ptr [{w} + 3072]{{1to16}}",
                    "vfmadd231ps zmm12, zmm24, dword ptr [{w} + 4096]{{1to16}}",
                    "vfmadd231ps zmm13, zmm25, dword ptr [{w} + 4096]{{1to16}}",
                    "vfmadd231ps zmm14, zmm26, dword ptr [{w} + 4096]{{1to16}}",
                    "vfmadd231ps zmm15, zmm24, dword ptr [{w} + 5120]{{1to16}}",
                    "vfmadd231ps zmm16, zmm25, dword ptr [{w} + 5120]{{1to16}}",
                    "vfmadd231ps zmm17, zmm26, dword ptr [{w} + 5120]{{1to16}}",
                    "vfmadd231ps zmm18, zmm24, dword ptr [{w} + 6144]{{1to16}}",
                    "vfmadd231ps zmm19, zmm25, dword ptr [{w} + 6144]{{1to16}}",
                    "vfmadd231ps zmm20, zmm26, dword ptr [{w} + 6144]{{1to16}}",
                    "vfmadd231ps zmm21, zmm24, dword ptr [{w} + 7168]{{1to16}}",
                    "vfmadd231ps zmm22, zmm25, dword ptr [{w} + 7168]{{1to16}}",
                    "vfmadd231ps zmm23, zmm26, dword ptr [{w} + 7168]{{1to16}}",
                ]
            ),
            (12, 2) => fma_asm!(
                a,
                csr,
                xp,
                wp,
                xs,
                pairs,
                [
                    // the odd elements of the pair
                    "vpandd zmm24, zmm31, [{x}]",
                    "vpandd zmm25, zmm31, [{x} + {xs}]",
                    "vfmadd231ps zmm0, zmm24, dword ptr [{w} + 4]{{1to16}}",
                    "vfmadd231ps zmm1, zmm25, dword ptr [{w} + 4]{{1to16}}",
                    "vfmadd231ps zmm2, zmm24, dword ptr [{w} + 1028]{{1to16}}",
                    "vfmadd231ps zmm3, zmm25, dword ptr [{w} + 1028]{{1to16}}",
                    "vfmadd231ps zmm4, zmm24, dword ptr [{w} + 2052]{{1to16}}",
                    "vfmadd231ps zmm5, zmm25, dword ptr [{w} + 2052]{{1to16}}",
                    "vfmadd231ps zmm6, zmm24, dword ptr [{w} + 3076]{{1to16}}",
                    "vfmadd231ps zmm7, zmm25, dword ptr [{w} + 3076]{{1to16}}",
                    "vfmadd231ps zmm8, zmm24, dword ptr [{w} + 4100]{{1to16}}",
                    "vfmadd231ps zmm9, zmm25, dword ptr [{w} + 4100]{{1to16}}",
                    "vfmadd231ps zmm10, zmm24, dword ptr [{w} + 5124]{{1to16}}",
                    "vfmadd231ps zmm11, zmm25, dword ptr [{w} + 5124]{{1to16}}",
                    "vfmadd231ps zmm12, zmm24, dword ptr [{w} + 6148]{{1to16}}",
                    "vfmadd231ps zmm13, zmm25, dword ptr [{w} + 6148]{{1to16}}",
                    "vfmadd231ps zmm14, zmm24, dword ptr [{w} + 7172]{{1to16}}",
                    "vfmadd231ps zmm15, zmm25, dword ptr [{w} + 7172]{{1to16}}",
                    "vfmadd231ps zmm16, zmm24, dword ptr [{w} + 8196]{{1to16}}",
                    "vfmadd231ps zmm17, zmm25, dword ptr [{w} + 8196]{{1to16}}",
                    "vfmadd231ps zmm18, zmm24, dword ptr [{w} + 9220]{{1to16}}",
                    "vfmadd231ps zmm19, zmm25, dword ptr [{w} + 9220]{{1to16}}",
                    "vfmadd231ps zmm20, zmm24, dword ptr [{w} + 10244]{{1to16}}",
                    "vfmadd231ps zmm21, zmm25, dword ptr [{w} + 10244]{{1to16}}",
                    "vfmadd231ps zmm22, zmm24, dword ptr [{w} + 11268]{{1to16}}",
                    "vfmadd231ps zmm23, zmm25, dword ptr [{w} + 11268]{{1to16}}",
                    // the even elements of the pair
                    "vpslld zmm24, [{x}], 16",
                    "vpslld zmm25, [{x} + {xs}], 16",
                    "vfmadd231ps zmm0, zmm24, dword ptr [{w} + 0]{{1to16}}",
                    "vfmadd231ps zmm1, zmm25, dword ptr [{w} + 0]{{1to16}}",
                    "vfmadd231ps zmm2, zmm24, dword ptr [{w} + 1024]{{1to16}}",
                    "vfmadd231ps zmm3, zmm25, dword ptr [{w} + 1024]{{1to16}}",
                    "vfmadd231ps zmm4, zmm24, dword ptr [{w} + 2048]{{1to16}}",
                    "vfmadd231ps zmm5, zmm25, dword ptr [{w} + 2048]{{1to16}}",
                    "vfmadd231ps zmm6, zmm24, dword ptr [{w} + 3072]{{1to16}}",
                    "vfmadd231ps zmm7, zmm25, dword ptr [{w} + 3072]{{1to16}}",
                    "vfmadd231ps zmm8, zmm24, dword ptr [{w} + 4096]{{1to16}}",
                    "vfmadd231ps zmm9, zmm25, dword ptr [{w} + 4096]{{1to16}}",
                    "vfmadd231ps zmm10, zmm24, dword ptr [{w} + 5120]{{1to16}}",
                    "vfmadd231ps zmm11, zmm25, dword ptr [{w} + 5120]{{1to16}}",
                    "vfmadd231ps zmm12, zmm24, dword ptr [{w} + 6144]{{1to16}}",
                    "vfmadd231ps zmm13, zmm25, dword ptr [{w} + 6144]{{1to16}}",
                    "vfmadd231ps zmm14, zmm24, dword ptr [{w} + 7168]{{1to16}}",
                    "vfmadd231ps zmm15, zmm25, dword ptr [{w} + 7168]{{1to16}}",
                    "vfmadd231ps zmm16, zmm24, dword ptr [{w} + 8192]{{1to16}}",
                    "vfmadd231ps zmm17, zmm25, dword ptr [{w} + 8192]{{1to16}}",
                    "vfmadd231ps zmm18, zmm24, dword ptr [{w} + 9216]{{1to16}}",
                    "vfmadd231ps zmm19, zmm25, dword ptr [{w} + 9216]{{1to16}}",
                    "vfmadd231ps zmm20, zmm24, dword ptr [{w} + 10240]{{1to16}}",
                    "vfmadd231ps zmm21, zmm25, dword ptr [{w} + 10240]{{1to16}}",
                    "vfmadd231ps zmm22, zmm24, dword ptr [{w} + 11264]{{1to16}}",
                    "vfmadd231ps zmm23, zmm25, dword ptr [{w} + 11264]{{1to16}}",
                ]
            ),
            (24, 1) => fma_asm!(
                a,
                csr,
                xp,
                wp,
                xs,
                pairs,
                [
                    // the odd element of the pair
                    "vpandd zmm24, zmm31, [{x}]",
                    "vfmadd231ps zmm0, zmm24, dword ptr [{w} + 4]{{1to16}}",
                    "vfmadd231ps zmm1, zmm24, dword ptr [{w} + 1028]{{1to16}}",
                    "vfmadd231ps zmm2, zmm24, dword ptr [{w} + 2052]{{1to16}}",
                    "vfmadd231ps zmm3, zmm24, dword ptr [{w} + 3076]{{1to16}}",
                    "vfmadd231ps zmm4, zmm24, dword ptr [{w} + 4100]{{1to16}}",
                    "vfmadd231ps zmm5, zmm24, dword ptr [{w} + 5124]{{1to16}}",
                    "vfmadd231ps zmm6, zmm24, dword ptr [{w} + 6148]{{1to16}}",
                    "vfmadd231ps zmm7, zmm24, dword ptr [{w} + 7172]{{1to16}}",
                    "vfmadd231ps zmm8, zmm24, dword ptr [{w} + 8196]{{1to16}}",
                    "vfmadd231ps zmm9, zmm24, dword ptr [{w} + 9220]{{1to16}}",
                    "vfmadd231ps zmm10, zmm24, dword ptr [{w} + 10244]{{1to16}}",
                    "vfmadd231ps zmm11, zmm24, dword ptr [{w} + 11268]{{1to16}}",
                    "vfmadd231ps zmm12, zmm24, dword ptr [{w} + 12292]{{1to16}}",
                    "vfmadd231ps zmm13, zmm24, dword ptr [{w} + 13316]{{1to16}}",
                    "vfmadd231ps zmm14, zmm24, dword ptr [{w} + 14340]{{1to16}}",
                    "vfmadd231ps zmm15, zmm24, dword ptr [{w} + 15364]{{1to16}}",
                    "vfmadd231ps zmm16, zmm24, dword ptr [{w} + 16388]{{1to16}}",
                    "vfmadd231ps zmm17, zmm24, dword ptr [{w} + 17412]{{1to16}}",
                    "vfmadd231ps zmm18, zmm24, dword ptr [{w} + 18436]{{1to16}}",
                    "vfmadd231ps zmm19, zmm24, dword ptr [{w} + 19460]{{1to16}}",
                    "vfmadd231ps zmm20, zmm24, dword ptr [{w} + 20484]{{1to16}}",
                    "vfmadd231ps zmm21, zmm24, dword ptr [{w} + 21508]{{1to16}}",
                    "vfmadd231ps zmm22, zmm24, dword ptr [{w} + 22532]{{1to16}}",
                    "vfmadd231ps zmm23, zmm24, dword ptr [{w} + 23556]{{1to16}}",
                    // the even element of the pair
                    "vpslld zmm24, [{x}], 16",
                    "vfmadd231ps zmm0, zmm24, dword ptr [{w} + 0]{{1to16}}",
                    "vfmadd231ps zmm1, zmm24, dword ptr [{w} + 1024]{{1to16}}",
                    "vfmadd231ps zmm2, zmm24, dword ptr [{w} + 2048]{{1to16}}",
                    "vfmadd231ps zmm3, zmm24, dword ptr [{w} + 3072]{{1to16}}",
                    "vfmadd231ps zmm4, zmm24, dword ptr [{w} + 4096]{{1to16}}",
                    "vfmadd231ps zmm5, zmm24, dword ptr [{w} + 5120]{{1to16}}",
                    "vfmadd231ps zmm6, zmm24, dword ptr [{w} + 6144]{{1to16}}",
                    "vfmadd231ps zmm7, zmm24, dword ptr [{w} + 7168]{{1to16}}",
                    "vfmadd231ps zmm8, zmm24, dword ptr [{w} + 8192]{{1to16}}",
                    "vfmadd231ps zmm9, zmm24, dword ptr [{w} + 9216]{{1to16}}",
                    "vfmadd231ps zmm10, zmm24, dword ptr [{w} + 10240]{{1to16}}",
                    "vfmadd231ps zmm11, zmm24, dword ptr [{w} + 11264]{{1to16}}",
                    "vfmadd231ps zmm12, zmm24, dword ptr [{w} + 12288]{{1to16}}",
                    "vfmadd231ps zmm13, zmm24, dword ptr [{w} + 13312]{{1to16}}",
                    "vfmadd231ps zmm14, zmm24, dword ptr [{w} + 14336]{{1to16}}",
                    "vfmadd231ps zmm15, zmm24, dword ptr [{w} + 15360]{{1to16}}",
                    "vfmadd231ps zmm16, zmm24, dword ptr [{w} + 16384]{{1to16}}",
                    "vfmadd231ps zmm17, zmm24, dword ptr [{w} + 17408]{{1to16}}",
                    "vfmadd231ps zmm18, zmm24, dword ptr [{w} + 18432]{{1to16}}",
                    "vfmadd231ps zmm19, zmm24, dword ptr [{w} + 19456]{{1to16}}",
                    "vfmadd231ps zmm20, zmm24, dword ptr [{w} + 20480]{{1to16}}",
                    "vfmadd231ps zmm21, zmm24, dword ptr [{w} + 21504]{{1to16}}",
                    "vfmadd231ps zmm22, zmm24, dword ptr [{w} + 22528]{{1to16}}",
                    "vfmadd231ps zmm23, zmm24, dword ptr [{w} + 23552]{{1to16}}",
                ]
            ),
            _ => unreachable!("FMA kernels for 6 x 4, 8 x 3, 12 x 2 and 24 x 1"),
        }
    }
    for (j, &aj) in a.iter().enumerate() {
        acc[idx(j)] = aj;
    }
}
