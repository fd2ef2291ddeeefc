//! The bf16 path's nibble decoders (nf4, 4-bit grouped integers) with AVX-512 VBMI: the same
//! outputs as `gemm16::decode_nf4` / `decode_gint4` (the same table of the 16 codes' f32
//! values rounded once to bf16, the same `vpermw`), with cheaper indices and fewer tables.
//! Per 32 elements the 16 bytes are widened a word to each 64-bit lane (`vpmovzxwq`) and one
//! `vpmultishiftqb` puts each element's nibble at the bottom of its word (the shift counts in
//! `HIGH_FIRST` / `LOW_FIRST`), where `gemm16::nibble_words` took a widening, two shifts and an
//! or; and where a scale covers 64 elements or more its table serves two steps of 32.

use std::arch::x86_64::*;

/// Bit offsets of each output byte inside its 64-bit lane (two source bytes, four elements:
/// the high nibble of byte 0 at 4, its low one at 0, byte 1's at 12 and 8), for bitsandbytes'
/// order (element 2i in the high nibble of byte i). Bit 4 of a word's low byte may be the
/// next nibble's lowest bit: the tables hold their 16 entries twice.
const HIGH_FIRST: i64 = 0x0808_0C0C_0000_0404;
/// The same for element 2i in the low nibble (the grouped integers).
const LOW_FIRST: i64 = 0x0C0C_0808_0404_0000;

/// `packed` (a multiple of 16 bytes, 32 elements each) to bf16 at `dst`: element e of step j
/// is `bf16((base[q] - sub(j)) · mul(j))`, q its nibble, `zs(j) = (sub, mul)`; `pair`: steps
/// 2i and 2i + 1 share one scale (their table is computed once).
///
/// # Safety
/// `cpu::has_avx512_bf16` and `cpu::has_vbmi_gfni` (AVX-512 VBMI).
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16,avx512vbmi")]
pub unsafe fn decode_nibbles(
    packed: &[u8],
    high_first: bool,
    pair: bool,
    base: __m512,
    zs: impl Fn(usize) -> (f32, f32),
    dst: &mut [u16],
) {
    assert!(packed.len().is_multiple_of(16) && dst.len() >= 2 * packed.len());
    let ctrl = _mm512_set1_epi64(if high_first { HIGH_FIRST } else { LOW_FIRST });
    let steps = packed.len() / 16;
    let (src, out) = (packed.as_ptr(), dst.as_mut_ptr());
    let one = |j: usize, t: __m512i| {
        // SAFETY: j < steps: 16 bytes at 16 j inside packed, 32 u16 at 32 j inside dst
        // (asserted lengths).
        unsafe {
            let q = _mm512_cvtepu16_epi64(_mm_loadu_si128(src.add(16 * j) as *const __m128i));
            let w = _mm512_permutexvar_epi16(_mm512_multishift_epi64_epi8(ctrl, q), t);
            _mm512_storeu_si512(out.add(32 * j) as *mut __m512i, w);
        }
    };
    let table = |j: usize| {
        let (sub, mul) = zs(j);
        let v = _mm512_mul_ps(
            _mm512_sub_ps(base, _mm512_set1_ps(sub)),
            _mm512_set1_ps(mul),
        );
        std::mem::transmute::<__m512bh, __m512i>(_mm512_cvtne2ps_pbh(v, v))
    };
    let mut j = 0;
    if pair {
        while j + 2 <= steps {
            let t = table(j);
            one(j, t);
            one(j + 1, t);
            j += 2;
        }
    }
    while j < steps {
        one(j, table(j));
        j += 1;
    }
}

/// nf4 nibbles (bitsandbytes' order) to bf16: `decode_nibbles` over the 16 codes' values,
/// element e of step j `bf16(code[q] · scale(j))`. The table is loaded here, under the
/// features: an intrinsic in the (featureless) caller is an out-of-line call per chunk.
///
/// # Safety
/// As `decode_nibbles`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16,avx512vbmi")]
pub unsafe fn decode_nf4(packed: &[u8], pair: bool, scale: impl Fn(usize) -> f32, dst: &mut [u16]) {
    let code = _mm512_loadu_ps(crate::matmul::reference::NF4_CODE.as_ptr());
    // SAFETY: the caller's contract.
    unsafe { decode_nibbles(packed, true, pair, code, |j| (0.0, scale(j)), dst) }
}

/// 4-bit grouped integers (element 2i in the low nibble) to bf16: element e of step j
/// `bf16((q - zero(j)) · scale(j))`, `zs(j) = (zero, scale)`. As `decode_nf4`, the iota
/// table is made under the features.
///
/// # Safety
/// As `decode_nibbles`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16,avx512vbmi")]
pub unsafe fn decode_int4(
    packed: &[u8],
    pair: bool,
    zs: impl Fn(usize) -> (f32, f32),
    dst: &mut [u16],
) {
    let iota = _mm512_setr_ps(
        0., 1., 2., 3., 4., 5., 6., 7., 8., 9., 10., 11., 12., 13., 14., 15.,
    );
    // SAFETY: the caller's contract.
    unsafe { decode_nibbles(packed, false, pair, iota, zs, dst) }
}

/// Whether `decode_int8_sym` gives `gemm16::decode_gint8`'s bits (zero 128) with scale `s`:
/// positive, 2^-100 <= s < 2^100 (`s / 256` normal, `2^15 · s` finite) and at most 15
/// significant bits (every fp16 scale the format stores), so that `c` below is exact.
#[inline]
pub fn int8_sym_scale_ok(s: f32) -> bool {
    let u = s.to_bits();
    u & 0x1FF == 0 && (0x0D80_0000..0x7180_0000).contains(&u)
}

/// Symmetric 8-bit grouped integers (code `b` stands for `(b - 128) · s`) to bf16 at `dst`, per
/// 32 codes (step j, scale `scale(j)`, each passing `int8_sym_scale_ok`) without an
/// int-to-float convert: one `vpermb` puts each byte at bits 8..16 of a dword holding
/// `0x4B00_0000`, the f32 `m = 2^23 + 256 b`, and `fma(m, s / 256, -(2^15 + 2^7) s)` is
/// `(b - 128) · s` exactly (m · s / 256 is exact inside the fma, `c = 257 · 2^7 · s` is exact for
/// 15-bit scales, and the difference, 8 + 11 significant bits at most, is an f32), so the
/// same f32 as `gemm16::decode_gint8` and the same `vcvtne2ps2bf16`: the same bits. Per 32
/// codes 2 `vpermb` + 2 `vfmadd` against 1 `vpxor`, 1 `vextracti128`, 2 `vpmovsxbd`, 2
/// `vcvtdq2ps` and 2 `vmulps`.
///
/// # Safety
/// `cpu::has_avx512_bf16` and `cpu::has_vbmi_gfni` (AVX-512 VBMI).
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16,avx512vbmi")]
pub unsafe fn decode_int8_sym(q: &[u8], pair: bool, scale: impl Fn(usize) -> f32, dst: &mut [u16]) {
    assert!(q.len().is_multiple_of(32) && dst.len() >= q.len());
    // Byte 1 of dword i: source byte i (low 16 codes) or 16 + i (high 16).
    let lo = _mm512_setr_epi32(
        0x000, 0x100, 0x200, 0x300, 0x400, 0x500, 0x600, 0x700, 0x800, 0x900, 0xA00, 0xB00, 0xC00,
        0xD00, 0xE00, 0xF00,
    );
    let c = Int8Sym {
        lo,
        hi: _mm512_add_epi32(lo, _mm512_set1_epi32(0x1000)),
        magic: _mm512_set1_epi32(0x4B00_0000),
    };
    let (inv, neg) = (_mm512_set1_ps(1.0 / 256.0), _mm512_set1_ps(-32896.0));
    let steps = q.len() / 32;
    let (src, out) = (q.as_ptr(), dst.as_mut_ptr());
    let mut j = 0;
    // Each `int8_sym_step` below: j < steps, so 32 bytes at 32 j inside q and 32 u16 at 32 j
    // inside dst (asserted lengths); the features.
    if pair {
        while j + 2 <= steps {
            let s = _mm512_set1_ps(scale(j));
            let (sp, sc) = (_mm512_mul_ps(s, inv), _mm512_mul_ps(s, neg));
            // SAFETY: as above (j + 1 < steps).
            unsafe {
                int8_sym_step(&c, src.add(32 * j), sp, sc, out.add(32 * j));
                int8_sym_step(&c, src.add(32 * j + 32), sp, sc, out.add(32 * j + 32));
            }
            j += 2;
        }
    }
    while j < steps {
        let s = _mm512_set1_ps(scale(j));
        let (sp, sc) = (_mm512_mul_ps(s, inv), _mm512_mul_ps(s, neg));
        // SAFETY: as above.
        unsafe { int8_sym_step(&c, src.add(32 * j), sp, sc, out.add(32 * j)) };
        j += 1;
    }
}

/// `decode_int8_sym`'s constants: the `vpermb` indices of the low and high 16 codes and the
/// exponent word.
struct Int8Sym {
    lo: __m512i,
    hi: __m512i,
    magic: __m512i,
}

/// 32 codes at `src` to bf16 at `dst` (`decode_int8_sym`; `sp = s / 256`, `sc = -(2^15 + 2^7)
/// s`). Inlined into its caller (the features: an intrinsic outside it is an out-of-line call).
///
/// # Safety
/// `decode_int8_sym`'s features; 32 bytes at `src`, 32 u16 at `dst`.
#[inline(always)]
unsafe fn int8_sym_step(c: &Int8Sym, src: *const u8, sp: __m512, sc: __m512, dst: *mut u16) {
    const BYTE1: __mmask64 = 0x2222_2222_2222_2222;
    // SAFETY: the caller's contract (the load's upper half is never indexed).
    unsafe {
        let b = _mm512_castsi256_si512(_mm256_loadu_si256(src as *const __m256i));
        let lo = _mm512_castsi512_ps(_mm512_mask_permutexvar_epi8(c.magic, BYTE1, c.lo, b));
        let hi = _mm512_castsi512_ps(_mm512_mask_permutexvar_epi8(c.magic, BYTE1, c.hi, b));
        let w = _mm512_cvtne2ps_pbh(_mm512_fmadd_ps(hi, sp, sc), _mm512_fmadd_ps(lo, sp, sc));
        _mm512_storeu_si512(
            dst as *mut __m512i,
            std::mem::transmute::<__m512bh, __m512i>(w),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::matmul::x86::gemm16;

    /// The same bits as `gemm16::decode_nf4` and `decode_gint4` on random bytes and scales
    /// (per step and shared by pairs of steps), where VBMI runs.
    #[test]
    fn same_bits_as_the_avx512_decoders() {
        if !(crate::cpu::has_avx512_bf16() && crate::cpu::has_vbmi_gfni()) {
            return; // not callable here
        }
        let mut s = 0x9e37_79b9_7f4a_7c15u64;
        let mut rnd = move || {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            s
        };
        let packed: Vec<u8> = (0..16 * 24).map(|_| rnd() as u8).collect();
        let scales: Vec<f32> = (0..24)
            .map(|_| f32::from_bits(rnd() as u32 & 0x3fff_ffff | 0x0080_0000) * 1e-6)
            .collect();
        let zeros: Vec<i32> = (0..24).map(|_| (rnd() % 16) as i32).collect();
        for pair in [false, true] {
            let sc = |j: usize| if pair { scales[j & !1] } else { scales[j] };
            let z = |j: usize| if pair { zeros[j & !1] } else { zeros[j] };
            let (mut want, mut got) = (vec![0u16; 32 * 24], vec![0u16; 32 * 24]);
            // SAFETY: the features (checked); dst has 2 · packed.len() entries.
            unsafe {
                gemm16::decode_nf4(&packed, sc, &mut want);
                let code = _mm512_loadu_ps(crate::matmul::reference::NF4_CODE.as_ptr());
                decode_nibbles(&packed, true, pair, code, |j| (0.0, sc(j)), &mut got);
            }
            assert_eq!(want, got, "nf4, pair {pair}");
            // SAFETY: as above.
            unsafe {
                gemm16::decode_gint4(&packed, |j| (z(j), sc(j)), &mut want);
                let iota = _mm512_setr_ps(
                    0., 1., 2., 3., 4., 5., 6., 7., 8., 9., 10., 11., 12., 13., 14., 15.,
                );
                decode_nibbles(
                    &packed,
                    false,
                    pair,
                    iota,
                    |j| (z(j) as f32, sc(j)),
                    &mut got,
                );
            }
            assert_eq!(want, got, "gint4, pair {pair}");
        }
    }

    /// `decode_int8_sym`'s arithmetic in scalar f32 (`mul_add`: one rounding, as `vfmadd`):
    /// for every byte and every positive finite fp16 scale, and 15-bit f32 scales at the ends
    /// of `int8_sym_scale_ok`'s range, the f32 of `(b - 128) · s` bit for bit; and the scales
    /// it refuses (a 16th significant bit changes the result for some byte).
    #[test]
    fn int8_sym_magic_fma_is_the_product() {
        let one = |b: u32, s: f32| {
            let m = f32::from_bits(0x4B00_0000 | (b << 8));
            m.mul_add(s / 256.0, -32896.0 * s)
        };
        let check = |s: f32| {
            assert!(int8_sym_scale_ok(s), "{s:e} refused");
            for b in 0..256u32 {
                let want = (b as f32 - 128.0) * s;
                assert_eq!(one(b, s).to_bits(), want.to_bits(), "b {b}, s {s:e}");
            }
        };
        for h in 1..0x7C00u16 {
            check(half::f16::from_bits(h).to_f32());
        }
        for e in [27u32, 28, 100, 126, 127, 200, 226] {
            for m in [0u32, 0x7F_FE00, 0x55_5400, 0x2A_AA00] {
                check(f32::from_bits(e << 23 | m));
            }
        }
        let refused = [
            0.0,
            -0.0,
            -1.0,
            f32::INFINITY,
            f32::NAN,
            f32::from_bits(26 << 23 | 0x7F_FE00),
            f32::from_bits(227 << 23),
            1.0 + f32::EPSILON * 256.0,
        ];
        for s in refused {
            assert!(!int8_sym_scale_ok(s), "{s:e} taken");
        }
        let s16 = f32::from_bits(0x3FFF_FF00); // 16 significant bits: 0xFFFF · 2^-15
        assert!((0..256).any(|b| one(b, s16).to_bits() != ((b as f32 - 128.0) * s16).to_bits()));
    }

    /// `decode_int8_sym` against `gemm16::decode_gint8` (zero 128) on every byte value and
    /// random fp16 scales (one per step, and shared by pairs of steps), where VBMI runs.
    #[test]
    fn int8_sym_same_bits_as_decode_gint8() {
        if !(crate::cpu::has_avx512_bf16() && crate::cpu::has_vbmi_gfni()) {
            return; // not callable here
        }
        let mut s = 0x2545_f491_4f6c_dd1du64;
        let mut rnd = move || {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            s
        };
        let steps = 40;
        let mut q: Vec<u8> = (0..32 * steps).map(|_| rnd() as u8).collect();
        for (i, b) in q[..256].iter_mut().enumerate() {
            *b = i as u8;
        }
        let mut scales: Vec<f32> = (0..steps)
            .map(|_| half::f16::from_bits((rnd() % 0x7BFF + 1) as u16).to_f32())
            .collect();
        (scales[0], scales[1], scales[2]) = (65504.0, f32::from_bits(0x3380_0000), 1.0);
        for pair in [false, true] {
            let sc = |j: usize| if pair { scales[j & !1] } else { scales[j] };
            let (mut want, mut got) = (vec![0u16; 32 * steps], vec![0u16; 32 * steps]);
            // SAFETY: the features (checked); dst has q.len() entries.
            unsafe {
                gemm16::decode_gint8(&q, |j| (128, sc(j)), &mut want);
                decode_int8_sym(&q, pair, sc, &mut got);
            }
            assert_eq!(want, got, "int8 sym, pair {pair}");
        }
    }
}
