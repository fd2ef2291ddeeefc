//! The bf16 GEMM's microkernel on AVX2 + FMA (no AVX-512): 6 activation rows x 16 weight rows
//! (12 ymm accumulators, lanes = weight rows), one `vfmadd231ps` per step of K per 8 outputs.
//!
//! **The same bits as `reference::bf16`**: the operands are bf16 values held as f32 (exact),
//! packed with the two elements of every pair swapped (`gemm_bf16_avx2`'s packing), so the
//! sequential chain over K adds the odd element's product, then the even one's, each one fused
//! multiply-add rounded to nearest even. The flushes: no operand is subnormal (`round_bf16`
//! flushes them) and with MXCSR.FTZ (and DAZ) set for the length of the asm block a subnormal
//! result becomes a signed zero, as `reference::bf16::step` says. `semantics_hold` checks it on
//! underflowing lanes at run time (as `x86::gemm16_fma` does on AVX-512); MXCSR is saved and
//! restored inside the one asm block, so no compiled code runs with the changed mode.

use std::arch::asm;
use std::arch::x86_64::*;
use std::sync::OnceLock;

use crate::matmul::reference::bf16 as r;

/// Activation rows of one kernel call.
pub const MR: usize = 6;
/// Weight rows of one kernel call (two vectors of 8).
pub const NR: usize = 16;

/// `acc[2 r + h]` (lanes: weight rows 8h .. 8h + 8) += Σ_k `w[k · 16 + 8h + l]` · `x[r · xs + k]`
/// for k in 0..n, each step one FMA with FTZ/DAZ. `w`: n steps of 16 weights; `x`: 6 rows of
/// at least n values, `xs` f32 apart.
///
/// # Safety
/// AVX2 and FMA.
#[target_feature(enable = "avx2,fma")]
pub unsafe fn kernel(w: &[f32], x: &[f32], xs: usize, n: usize, acc: &mut [__m256; 12]) {
    assert!(n > 0 && w.len() >= n * NR && x.len() >= (MR - 1) * xs + n);
    let mut a = *acc;
    let mut csr = [0u32; 2];
    let (xp, wp, xsb) = (x.as_ptr(), w.as_ptr(), xs * 4);
    // SAFETY: reads w[..16 n] and the 6 rows x[r · xs .. r · xs + n] (asserted) as the loop
    // advances, writes the two-word `csr` buffer, and restores MXCSR before it ends.
    unsafe {
        asm!(
            "vstmxcsr [{csr}]",
            "mov {t:e}, [{csr}]",
            "or {t:e}, 0x8040",
            "mov [{csr} + 4], {t:e}",
            "vldmxcsr [{csr} + 4]",
            "lea {x3}, [{x} + {xs}*2]",
            "add {x3}, {xs}",
            "2:",
            "vmovups ymm12, [{w}]",
            "vmovups ymm13, [{w} + 32]",
            "vbroadcastss ymm14, dword ptr [{x}]",
            "vfmadd231ps ymm0, ymm12, ymm14",
            "vfmadd231ps ymm1, ymm13, ymm14",
            "vbroadcastss ymm15, dword ptr [{x} + {xs}]",
            "vfmadd231ps ymm2, ymm12, ymm15",
            "vfmadd231ps ymm3, ymm13, ymm15",
            "vbroadcastss ymm14, dword ptr [{x} + {xs}*2]",
            "vfmadd231ps ymm4, ymm12, ymm14",
            "vfmadd231ps ymm5, ymm13, ymm14",
            "vbroadcastss ymm15, dword ptr [{x3}]",
            "vfmadd231ps ymm6, ymm12, ymm15",
            "vfmadd231ps ymm7, ymm13, ymm15",
            "vbroadcastss ymm14, dword ptr [{x3} + {xs}]",
            "vfmadd231ps ymm8, ymm12, ymm14",
            "vfmadd231ps ymm9, ymm13, ymm14",
            "vbroadcastss ymm15, dword ptr [{x3} + {xs}*2]",
            "vfmadd231ps ymm10, ymm12, ymm15",
            "vfmadd231ps ymm11, ymm13, ymm15",
            "add {w}, 64",
            "add {x}, 4",
            "add {x3}, 4",
            "dec {n}",
            "jnz 2b",
            "vldmxcsr [{csr}]",
            csr = in(reg) csr.as_mut_ptr(),
            t = out(reg) _,
            x3 = out(reg) _,
            x = inout(reg) xp => _,
            w = inout(reg) wp => _,
            xs = in(reg) xsb,
            n = inout(reg) n => _,
            inout("ymm0") a[0], inout("ymm1") a[1], inout("ymm2") a[2], inout("ymm3") a[3],
            inout("ymm4") a[4], inout("ymm5") a[5], inout("ymm6") a[6], inout("ymm7") a[7],
            inout("ymm8") a[8], inout("ymm9") a[9], inout("ymm10") a[10], inout("ymm11") a[11],
            out("ymm12") _, out("ymm13") _, out("ymm14") _, out("ymm15") _,
            options(nostack),
        )
    };
    *acc = a;
}

/// True when `kernel` computes `reference::bf16`'s bits on this CPU (checked once on
/// subnormal-flushed, tiny and underflowing values; call only with AVX2 and FMA).
pub fn semantics_hold() -> bool {
    static OK: OnceLock<bool> = OnceLock::new();
    // SAFETY: the callers check AVX2 and FMA.
    *OK.get_or_init(|| unsafe { check_semantics() })
}

/// `kernel` against `reference::bf16::step` on random lanes; also used by the tests.
///
/// # Safety
/// AVX2 and FMA.
#[target_feature(enable = "avx2,fma")]
pub unsafe fn check_semantics() -> bool {
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
        match (r >> 40) % 6 {
            0 => f32::from_bits(bits & 0x807f_ffff),
            1 => f32::from_bits((bits & 0x80ff_ffff) | 0x0080_0000),
            2 => f32::from_bits((bits & 0x807f_ffff) | ((60 + (r >> 48) as u32 % 10) << 23)),
            _ => f32::from_bits((bits & 0x807f_ffff) | ((100 + (r >> 48) as u32 % 60) << 23)),
        }
    };
    let n = 24;
    for _ in 0..64 {
        // Pairs in reference order: element 2i, 2i + 1 (packed swapped for the kernel).
        let w: Vec<u16> = (0..NR * n).map(|_| r::round_bf16(val(rnd()))).collect();
        let x: Vec<u16> = (0..MR * n).map(|_| r::round_bf16(val(rnd()))).collect();
        let wk: Vec<f32> = (0..n * NR)
            .map(|i| r::bf16_value(w[(i % NR) * n + ((i / NR) ^ 1)]))
            .collect();
        let xk: Vec<f32> = (0..MR * n)
            .map(|i| r::bf16_value(x[(i / n) * n + ((i % n) ^ 1)]))
            .collect();
        let start: [[f32; 8]; 12] = std::array::from_fn(|_| {
            std::array::from_fn(|_| {
                let v = val(rnd());
                if v.is_subnormal() {
                    0.0f32.copysign(v)
                } else {
                    v
                }
            })
        });
        // SAFETY: [f32; 8] and __m256 have the same size, any bits valid.
        let mut acc: [__m256; 12] = unsafe { std::mem::transmute(start) };
        // SAFETY: the features (contract); 16 n weights, 6 rows of n.
        unsafe { kernel(&wk, &xk, n, n, &mut acc) };
        // SAFETY: as for the transmute above.
        let got: [[f32; 8]; 12] = unsafe { std::mem::transmute(acc) };
        for (j, lanes) in got.iter().enumerate() {
            let (row, h) = (j / 2, j % 2);
            for (l, &g) in lanes.iter().enumerate() {
                let wi = 8 * h + l;
                let mut e = start[j][l];
                for p in 0..n / 2 {
                    let wp = [w[wi * n + 2 * p], w[wi * n + 2 * p + 1]];
                    let xp = [x[row * n + 2 * p], x[row * n + 2 * p + 1]];
                    e = r::step(e, wp, xp);
                }
                if g.to_bits() != e.to_bits() && !(g.is_nan() && e.is_nan()) {
                    return false;
                }
            }
        }
    }
    true
}
