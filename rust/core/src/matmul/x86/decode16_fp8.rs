//! fp8 (e4m3fn, e5m2) chunks of one scale to bf16 through a table of that scale: the bf16 of
//! `value(code) · scale` depends on the code and the scale only, so the 128 magnitudes' results
//! are made once by `gemm16::decode_fp8` itself (the reference's bits by construction) and each
//! code then takes its magnitude's entry with its sign flipped in (a negated code's result is
//! the negated result for a finite non-zero scale: the value's sign flips, the product and both
//! roundings are symmetric, and a NaN keeps its sign through the multiply and the bf16
//! rounding; tested on every code. A zero or non-finite scale takes the widening decode).
//!
//! With AVX-512 VBMI (`lookup_planes`, since session 18) the table is two byte planes (the
//! results' high and low bytes, 2 vectors each) and 64 codes take one `vpermq` (the order the
//! in-lane byte interleave wants), two `vpermt2b` (7 index bits: the magnitude), the sign XOR-ed
//! into the high bytes, and `vpunpck{l,h}bw`: about 10 uops per 64 codes where the word
//! lookup (`lookup_words`: two `vpermt2w` per 32 codes, 3 uops each on Intel, a blend on bit 6,
//! the sign) takes about 22 and the widening decode (two `vcvtph2ps`, two multiplies and a
//! `vcvtne2ps2bf16` per 32 codes) more.
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

/// The table of codes 0..128 for one scale, 64-byte aligned (four vectors): with VBMI the high
/// bytes of the 128 results then their low bytes, without the results as u16.
#[repr(C, align(64))]
#[derive(Clone, Copy)]
struct Table([u8; 256]);

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
    let vbmi = crate::cpu::has_vbmi_gfni();
    let key = (s.to_bits() as u64) << 2 | (e5m2 as u64) << 1 | 1;
    TABLES.with_borrow_mut(|slots| {
        if slots.is_empty() {
            slots.resize(
                SLOTS,
                Slot {
                    key: 0,
                    t: Table([0; 256]),
                },
            );
        }
        let slot = &mut slots[row % SLOTS];
        if slot.key != key {
            // SAFETY: the features (caller's contract).
            unsafe { build(e5m2, s, vbmi, &mut slot.t) };
            slot.key = key;
        }
        if vbmi {
            // SAFETY: the features and VBMI; the lengths asserted above.
            unsafe { lookup_planes(&slot.t, q, dst) };
        } else {
            // SAFETY: the features; the lengths asserted above.
            unsafe { lookup_words(&slot.t, q, dst) };
        }
    });
}

/// The table of scale `s` (`Table`'s layout for `vbmi`).
///
/// # Safety
/// `cpu::has_avx512_bf16`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
unsafe fn build(e5m2: bool, s: f32, vbmi: bool, t: &mut Table) {
    let codes: [u8; 128] = std::array::from_fn(|c| c as u8);
    let mut r = [0u16; 128];
    // SAFETY: the features (contract); 128 codes into 128 entries.
    unsafe { gemm16::decode_fp8(&codes, e5m2, |_| s, &mut r) };
    for (c, &v) in r.iter().enumerate() {
        if vbmi {
            t.0[c] = (v >> 8) as u8;
            t.0[128 + c] = v as u8;
        } else {
            t.0[2 * c..2 * c + 2].copy_from_slice(&v.to_le_bytes());
        }
    }
}

/// `dst[i] = t[q[i] & 0x7f] ^ (q[i] & 0x80) << 8` from the byte planes (`Table`, VBMI layout).
///
/// # Safety
/// `cpu::has_avx512_bf16` and `cpu::has_vbmi_gfni`; `q.len()` a multiple of 32, `dst` at least
/// as long.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16,avx512vbmi")]
unsafe fn lookup_planes(t: &Table, q: &[u8], dst: &mut [u16]) {
    assert!(q.len().is_multiple_of(32) && dst.len() >= q.len());
    let p = t.0.as_ptr() as *const __m512i;
    // SAFETY: 4 aligned vectors inside the table. (No closure: one over vectors is compiled
    // without this function's features and, left out of line, passes them through memory.)
    let tv: [__m512i; 4] = unsafe {
        [
            _mm512_load_si512(p),
            _mm512_load_si512(p.add(1)),
            _mm512_load_si512(p.add(2)),
            _mm512_load_si512(p.add(3)),
        ]
    };
    // `vpunpcklbw` / `vpunpckhbw` interleave bytes 0..8 / 8..16 of each 128-bit lane: qword
    // 2 L must hold codes 8 L.. (the first 32 codes), qword 2 L + 1 codes 32 + 8 L.. (the next 32).
    let order = _mm512_setr_epi64(0, 4, 1, 5, 2, 6, 3, 7);
    let sign = _mm512_set1_epi8(0x80u8 as i8);
    let one = |b: __m512i| {
        let b = _mm512_permutexvar_epi64(order, b);
        // Index bits 0..6: the magnitude (bit 7 is not read).
        let hi = _mm512_permutex2var_epi8(tv[0], b, tv[1]);
        let lo = _mm512_permutex2var_epi8(tv[2], b, tv[3]);
        // hi ^ (b & 0x80): the code's sign flips the result's (XOR, not OR: with a negative
        // scale the positive codes' results are negative).
        let hi = _mm512_ternarylogic_epi32::<0x78>(hi, b, sign);
        (_mm512_unpacklo_epi8(lo, hi), _mm512_unpackhi_epi8(lo, hi))
    };
    let n64 = q.len() / 64;
    let (src, out) = (q.as_ptr(), dst.as_mut_ptr());
    for i in 0..n64 {
        // SAFETY: bytes 64i..64i + 64 of q and entries 64i..64i + 64 of dst (asserted lengths).
        unsafe {
            let (a, b) = one(_mm512_loadu_si512(src.add(64 * i) as *const __m512i));
            _mm512_storeu_si512(out.add(64 * i) as *mut __m512i, a);
            _mm512_storeu_si512(out.add(64 * i + 32) as *mut __m512i, b);
        }
    }
    if !q.len().is_multiple_of(64) {
        // SAFETY: the last 32 codes and entries (a multiple of 32, asserted).
        unsafe {
            let b = _mm256_loadu_si256(src.add(64 * n64) as *const __m256i);
            let (a, _) = one(_mm512_zextsi256_si512(b));
            _mm512_storeu_si512(out.add(64 * n64) as *mut __m512i, a);
        }
    }
}

/// `dst[i] = t[q[i] & 0x7f] ^ (q[i] & 0x80) << 8` (`Table`'s layout without VBMI).
///
/// # Safety
/// `cpu::has_avx512_bf16`; `q.len()` a multiple of 32, `dst` at least as long.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
unsafe fn lookup_words(t: &Table, q: &[u8], dst: &mut [u16]) {
    assert!(q.len().is_multiple_of(32) && dst.len() >= q.len());
    let p = t.0.as_ptr() as *const __m512i;
    // SAFETY: 4 aligned vectors inside the table. (No closure: one over vectors is compiled
    // without this function's features and, left out of line, passes them through memory.)
    let tv: [__m512i; 4] = unsafe {
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
        // v ^ (w << 8 & 0x8000): the code's sign flips the result's.
        let r = _mm512_ternarylogic_epi32::<0x78>(v, _mm512_slli_epi16::<8>(w), sign);
        // SAFETY: d has 32 entries (64 bytes).
        unsafe { _mm512_storeu_si512(d.as_mut_ptr() as *mut __m512i, r) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Scales over the whole range: 1, negative, tiny and subnormal, huge where 256 s overflows;
    /// ±0, ±inf and NaN (which take the widening decode).
    const SCALES: [f32; 18] = [
        1.0,
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

    /// `gemm16::decode_fp8`'s bits.
    fn widening(q: &[u8], e5m2: bool, s: f32) -> Vec<u16> {
        let mut want = vec![0u16; q.len()];
        // SAFETY: AVX-512 BF16 checked by the callers; want has q.len() entries.
        unsafe { gemm16::decode_fp8(q, e5m2, |_| s, &mut want) };
        want
    }

    /// Every code of both formats, in every position of a vector, for scales over the whole
    /// range: the table decode gives `gemm16::decode_fp8`'s bits, also when rows share a slot
    /// and scales change, and for lengths of 64 k + 32 (the half-vector tail).
    #[test]
    fn table_decode_is_decode_fp8_on_every_code() {
        if !crate::cpu::has_avx512_bf16() {
            return; // no bf16 path here
        }
        // Every code 4 times, shifted so that each code sits in several lanes.
        let q: Vec<u8> = (0..1024usize).map(|i| (i * 37 + i / 256) as u8).collect();
        for e5m2 in [false, true] {
            for (i, &s) in SCALES.iter().enumerate() {
                for len in [1024, 992, 32] {
                    let q = &q[1024 - len..];
                    let mut got = vec![0u16; len];
                    // SAFETY: AVX-512 BF16 checked; got has q.len() entries.
                    unsafe { decode(i, q, e5m2, s, &mut got) };
                    assert_eq!(
                        got,
                        widening(q, e5m2, s),
                        "e5m2 {e5m2} scale {s:e} len {len}"
                    );
                    // rows i and i + SLOTS share a slot: the second call rebuilds it
                    // SAFETY: as above.
                    unsafe { decode(i + SLOTS, q, !e5m2, s, &mut got) };
                    let want = widening(q, !e5m2, s);
                    assert_eq!(got, want, "e5m2 {} scale {s:e} (slot reused)", !e5m2);
                }
            }
        }
    }

    /// Both lookups whatever the CPU takes (VBMI where it runs): the widening decode's bits on
    /// every code for the finite non-zero scales.
    #[test]
    fn both_lookups_are_decode_fp8_on_every_code() {
        if !crate::cpu::has_avx512_bf16() {
            return; // no bf16 path here
        }
        let q: Vec<u8> = (0..1024usize).map(|i| (i * 37 + i / 256) as u8).collect();
        for vbmi in [false, crate::cpu::has_vbmi_gfni()] {
            for e5m2 in [false, true] {
                for &s in SCALES.iter().filter(|s| s.is_finite() && **s != 0.0) {
                    let mut t = Table([0; 256]);
                    let mut got = vec![0u16; q.len()];
                    // SAFETY: AVX-512 BF16 checked, VBMI where `vbmi`; got has q.len() entries.
                    unsafe {
                        build(e5m2, s, vbmi, &mut t);
                        if vbmi {
                            lookup_planes(&t, &q, &mut got);
                        } else {
                            lookup_words(&t, &q, &mut got);
                        }
                    }
                    assert_eq!(
                        got,
                        widening(&q, e5m2, s),
                        "vbmi {vbmi} e5m2 {e5m2} scale {s:e}"
                    );
                }
            }
        }
    }
}
