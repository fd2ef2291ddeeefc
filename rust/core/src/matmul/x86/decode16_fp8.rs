//! fp8 (e4m3fn, e5m2) chunks of one scale to bf16 through a table of that scale: the bf16 of
//! `value(code) · scale` depends on the code and the scale only, so the 128 magnitudes' results
//! are made once by `gemm16::decode_fp8` itself (the reference's bits by construction) and each
//! code then takes two `vpermt2w` lookups, a blend and its sign flipped in (a negated code's result is
//! the negated result for a finite non-zero scale: the value's sign flips, the product and both
//! roundings are symmetric, and a NaN keeps its sign through the multiply and the bf16
//! rounding; tested on every code. A zero or non-finite scale takes the widening decode).
//! About half the operations of the widening decode (two `vcvtph2ps`, two multiplies and a
//! `vcvtne2ps2bf16` per 32 codes), whose cost set fp8's speed at M = 64.
//!
//! A thread keeps the last table of each of `SLOTS` weight rows (keyed by the scale's bits and
//! the format), so a per-row or per-tensor scale builds its table once per job, not per chunk.
//!
//! Safety: callers check `cpu::has_avx512_bf16` (AVX-512 F/BW/VL and BF16).

use std::arch::x86_64::*;
use std::cell::RefCell;

use super::gemm16;

/// Rows whose tables a thread keeps (a job's rows, `gemm16::PANEL`, fit).
const SLOTS: usize = 256;

/// The bf16 results of codes 0..128 for one scale, 64-byte aligned (four vectors).
#[repr(C, align(64))]
#[derive(Clone, Copy)]
struct Table([u16; 128]);

/// A slot: the key it was built for (scale bits, format bit, built bit) and the table.
#[derive(Clone, Copy)]
struct Slot {
    key: u64,
    t: Table,
}

thread_local! {
    static TABLES: RefCell<Vec<Slot>> = const { RefCell::new(Vec::new()) };
}

/// fp8 codes `q` (a multiple of 32) of weight row `row`, all of scale `s`, to bf16 at `dst`:
/// the same bits as `gemm16::decode_fp8(q, e5m2, |_| s, dst)`.
///
/// # Safety
/// `cpu::has_avx512_bf16`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
pub unsafe fn decode(row: usize, q: &[u8], e5m2: bool, s: f32, dst: &mut [u16]) {
    assert!(q.len().is_multiple_of(32) && dst.len() >= q.len());
    if !s.is_finite() || s == 0.0 {
        // Not sign-symmetric there: ±inf · 0 and 0 · ±inf are the same default NaN (negative on
        // x86), and a NaN scale's sign wins. Such scales take the widening decode.
        // SAFETY: the features (caller's contract); the lengths asserted above.
        unsafe { gemm16::decode_fp8(q, e5m2, |_| s, dst) };
        return;
    }
    let key = (s.to_bits() as u64) << 2 | (e5m2 as u64) << 1 | 1;
    TABLES.with_borrow_mut(|slots| {
        if slots.is_empty() {
            slots.resize(
                SLOTS,
                Slot {
                    key: 0,
                    t: Table([0; 128]),
                },
            );
        }
        let slot = &mut slots[row % SLOTS];
        if slot.key != key {
            let codes: [u8; 128] = std::array::from_fn(|c| c as u8);
            // SAFETY: the features (caller's contract); 128 codes into 128 entries.
            unsafe { gemm16::decode_fp8(&codes, e5m2, |_| s, &mut slot.t.0) };
            slot.key = key;
        }
        // SAFETY: the features; the table is 64-byte aligned, 4 vectors.
        unsafe { lookup(&slot.t, q, dst) };
    });
}

/// `dst[i] = t[q[i] & 0x7f] ^ (q[i] & 0x80) << 8`.
///
/// # Safety
/// `cpu::has_avx512_bf16`; `q.len()` a multiple of 32, `dst` at least as long.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
unsafe fn lookup(t: &Table, q: &[u8], dst: &mut [u16]) {
    assert!(q.len().is_multiple_of(32) && dst.len() >= q.len());
    let p = t.0.as_ptr() as *const __m512i;
    // SAFETY: 4 aligned vectors inside the table.
    let tv = unsafe {
        [
            _mm512_load_si512(p),
            _mm512_load_si512(p.add(1)),
            _mm512_load_si512(p.add(2)),
            _mm512_load_si512(p.add(3)),
        ]
    };
    let bit6 = _mm512_set1_epi16(0x40);
    let sign = _mm512_set1_epi16(0x8000u16 as i16);
    for (qc, d) in q.chunks_exact(32).zip(dst.chunks_exact_mut(32)) {
        // SAFETY: 32 bytes of a checked chunk.
        let b = unsafe { _mm256_loadu_si256(qc.as_ptr() as *const __m256i) };
        let w = _mm512_cvtepu8_epi16(b);
        // Index bits 0..5 pick the entry of a 64-entry pair; bit 6 picks the pair.
        let lo = _mm512_permutex2var_epi16(tv[0], w, tv[1]);
        let hi = _mm512_permutex2var_epi16(tv[2], w, tv[3]);
        let v = _mm512_mask_blend_epi16(_mm512_test_epi16_mask(w, bit6), lo, hi);
        // v ^ (w << 8 & 0x8000): the code's sign flips the result's (XOR, not OR: with a
        // negative scale the positive codes' results are negative).
        let r = _mm512_ternarylogic_epi32::<0x78>(v, _mm512_slli_epi16::<8>(w), sign);
        // SAFETY: d has 32 entries (64 bytes).
        unsafe { _mm512_storeu_si512(d.as_mut_ptr() as *mut __m512i, r) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every code of both formats, in every position of a vector, for scales over the whole
    /// range (1, negative, tiny and subnormal, huge where 256 s overflows; ±0, ±inf and NaN,
    /// which take the widening decode): the table
    /// decode gives `gemm16::decode_fp8`'s bits, also when rows share a slot and scales change.
    #[test]
    fn table_decode_is_decode_fp8_on_every_code() {
        if !crate::cpu::has_avx512_bf16() {
            return; // no bf16 path here
        }
        let scales = [
            1.0f32,
            -1.0,
            0.013_671_875,
            -3.7e-3,
            1.0e-38,
            1.5e-45,
            -2.0e-40,
            3.0e38,
            -1.0e37,
            f32::MAX,
            0.0,
            -0.0,
            448.0,
            1.0 / 7.0,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::NAN,
            -f32::NAN,
        ];
        // Every code 4 times, shifted so that each code sits in several lanes.
        let q: Vec<u8> = (0..1024usize).map(|i| (i * 37 + i / 256) as u8).collect();
        for e5m2 in [false, true] {
            for (i, &s) in scales.iter().enumerate() {
                let mut want = vec![0u16; q.len()];
                let mut got = vec![0u16; q.len()];
                // SAFETY: AVX-512 BF16 checked; q has 1024 codes, both outputs 1024 entries.
                unsafe {
                    gemm16::decode_fp8(&q, e5m2, |_| s, &mut want);
                    // rows i and i + SLOTS share a slot: the second call rebuilds it
                    decode(i, &q, e5m2, s, &mut got);
                    assert_eq!(got, want, "e5m2 {e5m2} scale {s:e}");
                    decode(i + SLOTS, &q, !e5m2, s, &mut got);
                    gemm16::decode_fp8(&q, !e5m2, |_| s, &mut want);
                    assert_eq!(got, want, "e5m2 {} scale {s:e} (slot reused)", !e5m2);
                }
            }
        }
    }
}
