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
}
