//! The bf16 GEMM kernels (AVX-512 F/BW/VL + AVX-512 BF16) of nf4, int8, fp8 and the grouped
//! integers for many activation rows; the driver is `matmul/gemm_bf16.rs`, the arithmetic
//! `reference/bf16.rs` (bit-identical: the same roundings, the same order per output).
//!
//! **Layout.** Lanes are activation rows. The activations are converted once per call to bf16
//! pairs, 16 rows a vector: `Acts16::x[v · pairs + i]` holds, in lane l, elements 2i and
//! 2i + 1 of row 16v + l (rows past M are zero). A task's weight rows are decoded chunk by
//! chunk of K (`KC` columns) into a row-major bf16 buffer in L2 (`decode_*`: the format's f32
//! value, one multiply by its scale, then `vcvtne2ps2bf16`), so the decode needs no transpose;
//! the microkernel (`kernel`) broadcasts one weight pair (an embedded 32-bit broadcast) against
//! `MV` activation vectors, for `NR` weight rows at once (NR x MV accumulators, 24 of the 32
//! registers), and each accumulator is one output's f32 chain, paused in the caller's buffer
//! between chunks. The results are written per output at the end (lanes to columns).
//!
//! Safety: callers check `cpu::has_avx512_bf16` (AVX-512 F/BW/VL and BF16)
//! and pass slices of the lengths stated on each function.

use std::arch::x86_64::*;
use std::sync::OnceLock;

use crate::matmul::reference::bf16 as r;

/// Columns of K per decoded chunk: one group of activation vectors' chunk (4 x 128 pairs x 64
/// bytes = 32 KiB) stays in L1 while the job's decoded rows pass it from L2.
pub const KC: usize = 256;
/// Weight rows of one task (every kernel row count below divides it). Each group of activation
/// vectors is read from L3 or memory once per task and used by all its rows: at 48 rows (24
/// KiB of decoded chunk, in L1) that re-reading cost 10-25 % at M = 512, K = 14336 (a
/// stand-alone copy of the loop, one core, CPU time: 300 GFLOP/s at 48 rows, 374-383 at 192 to
/// 384, 490 with the activations in L2); 144 rows (a 72 KiB chunk, in L2) keep 28 tasks at
/// N = 4096 for two threads.
pub const PANEL: usize = 144;
/// Activation vectors (16 rows each) per kernel call.
pub const MV_MAX: usize = 4;

pub use super::acts16::{Acts16, Pairs16};

/// True when `vdpbf16ps` and `vcvtne2ps2bf16` compute what `reference::bf16` says on this CPU
/// (checked once on lanes that tell the orders and flushes apart). A CPU that differed would
/// not run the bf16 path at all.
pub fn semantics_hold() -> bool {
    static OK: OnceLock<bool> = OnceLock::new();
    // SAFETY: called only after AVX-512 F/BW/VL and BF16 were detected (`cpu::has_avx512_bf16`).
    *OK.get_or_init(|| unsafe { check_semantics() })
}

#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
unsafe fn check_semantics() -> bool {
    let mut s = 0x9e37_79b9_7f4a_7c15u64;
    let mut rnd = move || {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        s
    };
    // Values over the whole exponent range, tiny normals and subnormals included.
    let val = move |r: u64| -> f32 {
        let bits = r as u32;
        match (r >> 40) % 6 {
            0 => f32::from_bits(bits & 0x807f_ffff),
            1 => f32::from_bits((bits & 0x80ff_ffff) | 0x0080_0000),
            _ => f32::from_bits((bits & 0x807f_ffff) | ((100 + (r >> 48) as u32 % 60) << 23)),
        }
    };
    for _ in 0..256 {
        let acc: [f32; 16] = std::array::from_fn(|_| val(rnd()));
        let lo: [f32; 16] = std::array::from_fn(|_| val(rnd()));
        let hi: [f32; 16] = std::array::from_fn(|_| val(rnd()));
        let xs: [f32; 32] = std::array::from_fn(|_| val(rnd()));
        // SAFETY: the features (contract); loads and stores of 64-byte arrays.
        let (w, xv, y, y8) = unsafe {
            let w = _mm512_cvtne2ps_pbh(_mm512_loadu_ps(hi.as_ptr()), _mm512_loadu_ps(lo.as_ptr()));
            let xv = _mm512_cvtne2ps_pbh(
                _mm512_loadu_ps(xs.as_ptr().add(16)),
                _mm512_loadu_ps(xs.as_ptr()),
            );
            let y = _mm512_dpbf16_ps(_mm512_loadu_ps(acc.as_ptr()), w, xv);
            // the 256-bit form (`kernel8`) on the low halves must give the same low lanes
            let y8 = _mm256_dpbf16_ps(
                _mm256_loadu_ps(acc.as_ptr()),
                std::mem::transmute::<__m256i, __m256bh>(_mm512_castsi512_si256(
                    std::mem::transmute::<__m512bh, __m512i>(w),
                )),
                std::mem::transmute::<__m256i, __m256bh>(_mm512_castsi512_si256(
                    std::mem::transmute::<__m512bh, __m512i>(xv),
                )),
            );
            let mut y8b = [0f32; 8];
            _mm256_storeu_ps(y8b.as_mut_ptr(), y8);
            let mut wb = [0u16; 32];
            let mut xb = [0u16; 32];
            let mut yb = [0f32; 16];
            _mm512_storeu_si512(
                wb.as_mut_ptr() as *mut __m512i,
                std::mem::transmute::<__m512bh, __m512i>(w),
            );
            _mm512_storeu_si512(
                xb.as_mut_ptr() as *mut __m512i,
                std::mem::transmute::<__m512bh, __m512i>(xv),
            );
            _mm512_storeu_ps(yb.as_mut_ptr(), y);
            (wb, xb, yb, y8b)
        };
        for j in 0..16 {
            if w[j] != r::round_bf16(lo[j]) || w[16 + j] != r::round_bf16(hi[j]) {
                return false;
            }
            if xv[j] != r::round_bf16(xs[j]) || xv[16 + j] != r::round_bf16(xs[16 + j]) {
                return false;
            }
            let e = r::step(acc[j], [w[2 * j], w[2 * j + 1]], [xv[2 * j], xv[2 * j + 1]]);
            if e.to_bits() != y[j].to_bits() || (j < 8 && y8[j].to_bits() != y[j].to_bits()) {
                return false;
            }
        }
    }
    true
}

/// Asks for activation lines in L1, one `Pairs16` (one 64-byte line) each (a hint: no fault, no
/// effect on results).
#[inline(always)]
pub fn prefetch_pairs(lines: &[Pairs16]) {
    for line in lines {
        // SAFETY: SSE is part of x86-64; a prefetch of a valid address has no side effects.
        unsafe { _mm_prefetch::<_MM_HINT_T0>(line as *const Pairs16 as *const i8) };
    }
}

/// Asks for `bytes` in L1: every 64-byte line the span touches (a hint: no fault, no effect on
/// results). The lines are counted from the first one's start, not from `bytes`' own start:
/// steps of 64 from an unaligned start miss the last line whenever the span ends past the last
/// step's line (a q6_k block of 210 bytes: its scales and `d`, read first by the decode).
pub fn prefetch(bytes: &[u8]) {
    let Some(last) = bytes.len().checked_sub(1) else {
        return;
    };
    let p = bytes.as_ptr();
    let head = p as usize & 63;
    for line in (0..head + last + 1).step_by(64) {
        // SAFETY: SSE is part of x86-64; a prefetch never faults and has no side effects (the
        // address, line `line` of the span's lines, is formed with wrapping arithmetic, never
        // dereferenced).
        unsafe {
            _mm_prefetch::<_MM_HINT_T0>(p.wrapping_sub(head).wrapping_add(line) as *const i8)
        };
    }
}

/// Two f32 vectors (elements 0..16, 16..32) times `s`, as 32 bf16 at `dst`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
#[inline]
unsafe fn store32(lo: __m512, hi: __m512, s: f32, dst: &mut [u16]) {
    assert!(dst.len() >= 32);
    let sv = _mm512_set1_ps(s);
    let b = _mm512_cvtne2ps_pbh(_mm512_mul_ps(hi, sv), _mm512_mul_ps(lo, sv));
    // SAFETY: 64 bytes into a checked 32-element slice.
    unsafe {
        _mm512_storeu_si512(
            dst.as_mut_ptr() as *mut __m512i,
            std::mem::transmute::<__m512bh, __m512i>(b),
        )
    };
}

/// int8 codes `q` (a multiple of 32) to bf16 `q · scale(j)` at `dst`, `scale(j)` the scale of
/// elements 32j .. 32j + 32.
///
/// # Safety
/// `cpu::has_avx512_bf16`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
pub unsafe fn decode_i8(q: &[u8], scale: impl Fn(usize) -> f32, dst: &mut [u16]) {
    assert!(q.len().is_multiple_of(32) && dst.len() >= q.len());
    for (j, (qc, d)) in q.chunks_exact(32).zip(dst.chunks_exact_mut(32)).enumerate() {
        // SAFETY: 32 bytes loaded from a checked chunk.
        let v = unsafe { _mm256_loadu_si256(qc.as_ptr() as *const __m256i) };
        let lo = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_castsi256_si128(v)));
        let hi = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_extracti128_si256::<1>(v)));
        // SAFETY: the features; d has 32 elements.
        unsafe { store32(lo, hi, scale(j), d) };
    }
}

/// 8-bit grouped integers (one byte a code) to bf16 `(q - z(j)) · scale(j)` at `dst` (`zs(j)`:
/// the zero and scale of elements 32j .. 32j + 32), the code minus its zero taken as an i8 with
/// wrap-around as `formats::gint::decode_row_i8` does (so `decode_i8` of its codes, without
/// that scalar pass through a buffer).
///
/// # Safety
/// `cpu::has_avx512_bf16`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
pub unsafe fn decode_gint8(q: &[u8], zs: impl Fn(usize) -> (u8, f32), dst: &mut [u16]) {
    assert!(q.len().is_multiple_of(32) && dst.len() >= q.len());
    for (j, (qc, d)) in q.chunks_exact(32).zip(dst.chunks_exact_mut(32)).enumerate() {
        let (z, s) = zs(j);
        // SAFETY: 32 bytes loaded from a checked chunk.
        let b = unsafe { _mm256_loadu_si256(qc.as_ptr() as *const __m256i) };
        let v = _mm256_sub_epi8(b, _mm256_set1_epi8(z as i8));
        let lo = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_castsi256_si128(v)));
        let hi = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_extracti128_si256::<1>(v)));
        // SAFETY: the features; d has 32 elements.
        unsafe { store32(lo, hi, s, d) };
    }
}

/// 16 bytes of nibble codes as 32 `vpermw` indices: word e holds element e's nibble in its low
/// 4 bits (element 2i in byte i's high nibble when `high_first`, bitsandbytes' order, else in
/// its low one); bit 4 may hold garbage, so the tables looked up have their 16 entries twice.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
#[inline]
unsafe fn nibble_words(p: &[u8], high_first: bool) -> __m512i {
    assert!(p.len() >= 16);
    // SAFETY: 16 bytes loaded (asserted).
    let d = _mm512_cvtepu8_epi32(unsafe { _mm_loadu_si128(p.as_ptr() as *const __m128i) });
    let hi = _mm512_srli_epi32::<4>(d);
    if high_first {
        _mm512_or_si512(hi, _mm512_slli_epi32::<16>(d))
    } else {
        _mm512_or_si512(d, _mm512_slli_epi32::<16>(hi))
    }
}

/// The 16 values of a nibble code (one scale's worth) as bf16, twice over (`nibble_words`).
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
#[inline]
unsafe fn bf16_table(values: __m512) -> __m512i {
    std::mem::transmute::<__m512bh, __m512i>(_mm512_cvtne2ps_pbh(values, values))
}

/// nf4 (bitsandbytes packing: element 2i in the high nibble of byte i), `packed` holding a
/// multiple of 32 elements, to bf16 `NF4_CODE[q] · absmax(j)` at `dst`: per 32 elements the 16
/// products of the code book and the scale (the same f32 multiplies as per element) rounded
/// once to bf16, then one 16-bit table look-up (`vpermw`) of the 32 codes.
///
/// # Safety
/// `cpu::has_avx512_bf16`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
pub unsafe fn decode_nf4(packed: &[u8], absmax: impl Fn(usize) -> f32, dst: &mut [u16]) {
    assert!(packed.len().is_multiple_of(16) && dst.len() >= 2 * packed.len());
    use crate::matmul::reference::NF4_CODE;
    // SAFETY: NF4_CODE has 16 f32.
    let code = unsafe { _mm512_loadu_ps(NF4_CODE.as_ptr()) };
    for (j, (pc, d)) in packed
        .chunks_exact(16)
        .zip(dst.chunks_exact_mut(32))
        .enumerate()
    {
        let t = bf16_table(_mm512_mul_ps(code, _mm512_set1_ps(absmax(j))));
        let w = _mm512_permutexvar_epi16(nibble_words(pc, true), t);
        // SAFETY: 64 bytes into a 32-element chunk.
        unsafe { _mm512_storeu_si512(d.as_mut_ptr() as *mut __m512i, w) };
    }
}

/// 4-bit grouped integers (element 2i in the low nibble of byte i), `packed` holding a multiple
/// of 32 elements, to bf16 `(q - z(j)) · scale(j)` at `dst` (`zs(j)`: the zero and scale of
/// elements 32j .. 32j + 32): the values of `formats::gint::dequantize`, by a table of the 16
/// codes' values per 32 elements as in `decode_nf4`.
///
/// # Safety
/// `cpu::has_avx512_bf16`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
pub unsafe fn decode_gint4(packed: &[u8], zs: impl Fn(usize) -> (i32, f32), dst: &mut [u16]) {
    assert!(packed.len().is_multiple_of(16) && dst.len() >= 2 * packed.len());
    let iota = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    for (j, (pc, d)) in packed
        .chunks_exact(16)
        .zip(dst.chunks_exact_mut(32))
        .enumerate()
    {
        let (z, s) = zs(j);
        let q = _mm512_cvtepi32_ps(_mm512_sub_epi32(iota, _mm512_set1_epi32(z)));
        let t = bf16_table(_mm512_mul_ps(q, _mm512_set1_ps(s)));
        let w = _mm512_permutexvar_epi16(nibble_words(pc, false), t);
        // SAFETY: 64 bytes into a 32-element chunk.
        unsafe { _mm512_storeu_si512(d.as_mut_ptr() as *mut __m512i, w) };
    }
}

/// fp8 bytes (a multiple of 32; e4m3fn or e5m2) to bf16 `value · scale(j)` at `dst`: 32 bytes
/// at a time widened to the f16s with the same bits (e5m2 is f16's top byte; e4m3fn's
/// exponent and mantissa shifted in from the sign-extended byte, 2^-8 of its value, the 256
/// folded into the scale; its NaN codes set to the f16 NaN of their sign), then `vcvtph2ps`
/// per 16: the exact values of `reference::fp8_table`, NaN signs included, times the scale.
///
/// # Safety
/// `cpu::has_avx512_bf16`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
pub unsafe fn decode_fp8(q: &[u8], e5m2: bool, scale: impl Fn(usize) -> f32, dst: &mut [u16]) {
    assert!(q.len().is_multiple_of(32) && dst.len() >= q.len());
    let w16 = |v: u16| _mm512_set1_epi16(v as i16);
    for (j, (qc, d)) in q.chunks_exact(32).zip(dst.chunks_exact_mut(32)).enumerate() {
        // SAFETY: 32 bytes of a checked 32-byte chunk.
        let b = unsafe { _mm256_loadu_si256(qc.as_ptr() as *const __m256i) };
        let half = |h: __m512i| {
            (
                _mm512_cvtph_ps(_mm512_castsi512_si256(h)),
                _mm512_cvtph_ps(_mm512_extracti64x4_epi64::<1>(h)),
            )
        };
        let s = scale(j);
        let (lo, hi, s) = if e5m2 {
            let (lo, hi) = half(_mm512_slli_epi16::<8>(_mm512_cvtepu8_epi16(b)));
            (lo, hi, s)
        } else {
            // Sign-extended and shifted: the sign at bits 15 and 14, exponent and mantissa at
            // 13..7; bit 14 cleared makes the f16.
            let sx = _mm512_slli_epi16::<7>(_mm512_cvtepi8_epi16(b));
            let h = _mm512_and_si512(sx, w16(0xbfff));
            // Magnitude 0x7f: `(sx & 0x8000) | 0x7e00`, the f16 NaN of the code's sign.
            let nan = _mm256_cmpeq_epi8_mask(
                _mm256_and_si256(b, _mm256_set1_epi8(0x7f)),
                _mm256_set1_epi8(0x7f),
            );
            let nanv = _mm512_ternarylogic_epi32::<0xea>(sx, w16(0x8000), w16(0x7e00));
            let (lo, hi) = half(_mm512_mask_mov_epi16(h, nan, nanv));
            // (v / 256) · (256 s) is v · s rounded once, the same bits, where 256 s is finite
            // (a power of two times a finite f32: exact); else the exact v first.
            if (s * 256.0).is_finite() {
                (lo, hi, s * 256.0)
            } else {
                let k = _mm512_set1_ps(256.0);
                (_mm512_mul_ps(lo, k), _mm512_mul_ps(hi, k), s)
            }
        };
        // SAFETY: the features; d has 32 elements.
        unsafe { store32(lo, hi, s, d) };
    }
}

/// `acc[at + i · step + v] += Σ_p` weight row i's pair p times vector v's pair p, for `pairs`
/// pairs, as `vdpbf16ps` chains (one per output, pairs in order), the NR x MV accumulators in
/// registers for the whole call. `w`: row i of the decoded chunk at `w[i * stride..]`; `x[v]`:
/// vector v's pairs from this chunk on.
///
/// # Safety
/// `cpu::has_avx512_bf16`; every row of `w` holds `2 · pairs` bf16 and every `x[v]` `pairs` entries.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
#[allow(clippy::too_many_arguments)]
pub unsafe fn kernel<const NR: usize, const MV: usize>(
    w: &[u16],
    stride: usize,
    x: [&[Pairs16]; MV],
    pairs: usize,
    acc: &mut [__m512],
    at: usize,
    step: usize,
) {
    assert!(w.len() >= (NR - 1) * stride + 2 * pairs);
    assert!(at + (NR - 1) * step + MV <= acc.len());
    for xv in &x {
        assert!(xv.len() >= pairs);
    }
    let ap = acc.as_mut_ptr();
    // SAFETY: every index at + i · step + v < acc.len() (asserted).
    let mut a: [[__m512; MV]; NR] =
        std::array::from_fn(|i| std::array::from_fn(|v| unsafe { *ap.add(at + i * step + v) }));
    let wp = w.as_ptr() as *const u8;
    for p in 0..pairs {
        // SAFETY: entry p < pairs of each x[v] (asserted), 64-byte aligned.
        let xs: [__m512bh; MV] = std::array::from_fn(|v| unsafe {
            std::mem::transmute::<__m512i, __m512bh>(_mm512_load_si512(
                x[v].as_ptr().add(p) as *const __m512i
            ))
        });
        for (i, ai) in a.iter_mut().enumerate() {
            // SAFETY: bytes 4p..4p + 4 of row i, in bounds (asserted above).
            let pw = unsafe { (wp.add(2 * (i * stride) + 4 * p) as *const i32).read_unaligned() };
            let wb = std::mem::transmute::<__m512i, __m512bh>(_mm512_set1_epi32(pw));
            for (av, &xv) in ai.iter_mut().zip(&xs) {
                *av = _mm512_dpbf16_ps(*av, wb, xv);
            }
        }
    }
    for (i, ai) in a.iter().enumerate() {
        for (v, &av) in ai.iter().enumerate() {
            // SAFETY: as for the loads.
            unsafe { *ap.add(at + i * step + v) = av };
        }
    }
}

/// `kernel` for one activation vector whose lanes 8..16 are rows past M: its lanes 0..8 only
/// (256-bit `vdpbf16ps`, the same operation per lane), `acc` their accumulators.
///
/// # Safety
/// As `kernel`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
pub unsafe fn kernel8<const NR: usize>(
    w: &[u16],
    stride: usize,
    x: &[Pairs16],
    pairs: usize,
    acc: &mut [__m256; NR],
) {
    assert!(w.len() >= (NR - 1) * stride + 2 * pairs && x.len() >= pairs);
    let mut a = *acc;
    let wp = w.as_ptr() as *const u8;
    for p in 0..pairs {
        // SAFETY: entry p < pairs of x (asserted), 64-byte aligned: its first 32 bytes.
        let xv = unsafe {
            std::mem::transmute::<__m256i, __m256bh>(_mm256_load_si256(
                x.as_ptr().add(p) as *const __m256i
            ))
        };
        for (i, ai) in a.iter_mut().enumerate() {
            // SAFETY: bytes 4p..4p + 4 of row i, in bounds (asserted above).
            let pw = unsafe { (wp.add(2 * (i * stride) + 4 * p) as *const i32).read_unaligned() };
            // SAFETY: a 256-bit vector reinterpreted as 16 bf16.
            let wb = unsafe { std::mem::transmute::<__m256i, __m256bh>(_mm256_set1_epi32(pw)) };
            *ai = _mm256_dpbf16_ps(*ai, wb, xv);
        }
    }
    *acc = a;
}
