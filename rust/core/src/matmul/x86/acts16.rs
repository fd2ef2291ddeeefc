//! The bf16 GEMM's activations (`Acts16`, 16 rows a vector of bf16 pairs) built from
//! the f32 rows in one pass that also checks them for infinities and NaNs, and the 16 x 16
//! dword transpose it shares with the output side (`matmul/gemm_bf16.rs`'s `Sink` for `OutPtr`).
//!
//! Per vector of 16 rows and block of 32 columns, each row's 32 values are rounded by one
//! `vcvtne2ps2bf16` (16 pairs), then the 16 rows' pairs are transposed in registers so that
//! every output line (one pair of 16 rows) is written once, whole. The previous build stored
//! each pair as a scalar into its line (16 stores a line) after zero-filling the buffer, and the
//! call read x a second time for its finite check: at M = 512, K = 14336 (one thread) those
//! were about 6 % and 3 % of an nf4 call.
//!
//! Safety: callers check `cpu::has_avx512_bf16` (AVX-512 F/BW/VL and BF16).

use std::arch::x86_64::*;
use std::mem::MaybeUninit;
use std::sync::Mutex;

/// 16 bf16 pairs (one activation vector at one pair of columns), on a 64-byte boundary.
#[repr(C, align(64))]
#[derive(Clone, Copy, Default)]
pub struct Pairs16(pub [u32; 16]);

/// The activations of one call as the kernel reads them (`gemm16`'s module comment).
pub struct Acts16 {
    pub x: Vec<Pairs16>,
    /// Pairs of columns a row: K / 2.
    pub pairs: usize,
    /// Entries between vectors: `pairs` and 16 more (zero), so that the vectors' lines are not
    /// a power of two apart (at K = 4096 they would be 128 KiB apart: one L2 set for the same
    /// column of 32 vectors, more than its 16 ways).
    pub stride: usize,
    /// Vectors of 16 rows: M rounded up.
    pub vectors: usize,
}

impl Drop for Acts16 {
    /// The buffer is kept for the next call (`give_back`: its pages stay mapped).
    fn drop(&mut self) {
        give_back(std::mem::take(&mut self.x));
    }
}

/// Activation rows `x` (M x K, K a multiple of 32) as `Acts16` (vectors in parallel when
/// `par`), or None when x holds an infinity or a NaN (the caller finds and names it). Every
/// entry is written: rows past M and the 16 entries after each vector are zero.
///
/// # Safety
/// `cpu::has_avx512_bf16` (AVX-512 F/BW/VL and BF16).
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
pub unsafe fn prepare(x: &[f32], m: usize, k: usize, par: bool) -> Option<Acts16> {
    assert!(k.is_multiple_of(32) && x.len() == m * k);
    let pairs = k / 2;
    let stride = pairs + 16;
    let vectors = m.div_ceil(16);
    let len = vectors * stride;
    // Not zero-filled first: every entry is written below (a 16 MB memset at M = 512, K =
    // 14336 was a visible share of the build); the last call's buffer when it is large enough.
    let mut out = spare(len);
    // SAFETY: MaybeUninit needs no initialization; the capacity is at least len.
    unsafe { out.set_len(len) };
    let bad = std::sync::atomic::AtomicBool::new(false);
    let one = |v: usize, o: &mut [MaybeUninit<Pairs16>]| {
        // SAFETY: the features (caller's contract); rows 16v.. of x, o one vector's `stride`.
        if unsafe { vector(x, m, k, v, o) } {
            bad.store(true, std::sync::atomic::Ordering::Relaxed);
        }
    };
    if par && vectors > 1 {
        // (the pool, or torch's OpenMP team inside `parallel::on_openmp`, as the other paths'
        // activations: one team for the whole call)
        crate::parallel::for_each_chunk_mut(&mut out, stride, one);
    } else {
        out.chunks_mut(stride)
            .enumerate()
            .for_each(|(v, o)| one(v, o));
    }
    if bad.into_inner() {
        return None;
    }
    // SAFETY: every entry was written (`vector` writes a vector's `stride` entries whole), and
    // MaybeUninit<T> has T's size and alignment, so the allocation is a Vec<Pairs16> of len.
    let x = unsafe {
        let mut out = std::mem::ManuallyDrop::new(out);
        Vec::from_raw_parts(out.as_mut_ptr() as *mut Pairs16, len, out.capacity())
    };
    Some(Acts16 {
        x,
        pairs,
        stride,
        vectors,
    })
}

/// Bytes of activations whose buffer is kept for the next call (`give_back`): M = 512 rows at
/// K = 14336 are 16 MiB, whose fresh pages (faulted in and cleared by the kernel on every call)
/// were 3-4 % of such an nf4 call's samples.
const SPARE_MAX_BYTES: usize = 32 << 20;

/// The process's one kept buffer (empty when none, or when a call holds it).
static SPARE: Mutex<Vec<Pairs16>> = Mutex::new(Vec::new());

/// An empty buffer with room for `len` entries: the kept one when it has the room.
pub(crate) fn spare(len: usize) -> Vec<MaybeUninit<Pairs16>> {
    let kept = SPARE
        .try_lock()
        .map(|mut s| std::mem::take(&mut *s))
        .unwrap_or_default();
    if kept.capacity() < len {
        return Vec::with_capacity(len);
    }
    let mut kept = std::mem::ManuallyDrop::new(kept);
    // SAFETY: the same allocation, as MaybeUninit<Pairs16> (T's size and alignment), length 0.
    unsafe {
        Vec::from_raw_parts(
            kept.as_mut_ptr() as *mut MaybeUninit<Pairs16>,
            0,
            kept.capacity(),
        )
    }
}

/// Keeps an `Acts16` buffer for the next call (`Acts16`'s drop) when it is not too large and no
/// larger one is kept; a hint: never blocks, never changes a result (`prepare` writes every entry).
pub fn give_back(x: Vec<Pairs16>) {
    if x.capacity() * std::mem::size_of::<Pairs16>() > SPARE_MAX_BYTES {
        return;
    }
    if let Ok(mut s) = SPARE.try_lock() {
        if s.capacity() < x.capacity() {
            *s = x;
        }
    }
}

/// Vector `v` (rows 16v.. of x, zero past M) into `o` (`stride` = K / 2 + 16 entries, all
/// written); true when one of its values is an infinity or a NaN.
///
/// # Safety
/// `cpu::has_avx512_bf16`; x is M x K, `o.len() == k / 2 + 16`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
unsafe fn vector(x: &[f32], m: usize, k: usize, v: usize, o: &mut [MaybeUninit<Pairs16>]) -> bool {
    assert!(o.len() == k / 2 + 16 && x.len() == m * k);
    let rows = m.saturating_sub(16 * v).min(16);
    let exp = _mm512_set1_epi32(0x7f80_0000);
    let mut bad: __mmask16 = 0;
    let zero = _mm512_setzero_ps();
    let base = x.as_ptr().wrapping_add(16 * v * k);
    let dst = o.as_mut_ptr() as *mut __m512;
    for c in 0..k / 32 {
        // (zero each block: rows past M stay zero, and the transpose below overwrites t)
        let mut t = [zero; 16];
        for (l, tl) in t.iter_mut().enumerate().take(rows) {
            // SAFETY: row 16v + l < M, columns 32c..32c + 32 < K: inside x.
            let (lo, hi) = unsafe {
                let p = base.add(l * k + 32 * c);
                (_mm512_loadu_ps(p), _mm512_loadu_ps(p.add(16)))
            };
            // An infinity or a NaN: every exponent bit set.
            let (elo, ehi) = (
                _mm512_and_si512(_mm512_castps_si512(lo), exp),
                _mm512_and_si512(_mm512_castps_si512(hi), exp),
            );
            bad |= _mm512_cmpeq_epi32_mask(elo, exp) | _mm512_cmpeq_epi32_mask(ehi, exp);
            // Pair i: element 2i in the low half (`vcvtne2ps2bf16`'s second operand).
            // SAFETY: __m512bh and __m512i are the same 64 bytes.
            *tl = _mm512_castsi512_ps(unsafe {
                std::mem::transmute::<__m512bh, __m512i>(_mm512_cvtne2ps_pbh(hi, lo))
            });
        }
        // t[l] lane i = pair 16c + i of row l; after the transpose t[i] lane l.
        // SAFETY: the features.
        unsafe { transpose16(&mut t) };
        for (i, ti) in t.iter().enumerate() {
            // SAFETY: entry 16c + i < K / 2 of o, 64-byte aligned (Pairs16).
            unsafe { _mm512_store_ps(dst.add(16 * c + i) as *mut f32, *ti) };
        }
    }
    for i in 0..16 {
        // SAFETY: the 16 entries after the vector's K / 2, inside o.
        unsafe { _mm512_store_ps(dst.add(k / 2 + i) as *mut f32, zero) };
    }
    bad != 0
}

/// `t[r]` lane `c` to `t[c]` lane `r` (a 16 x 16 dword transpose: 32-bit interleaves, 64-bit
/// pair shuffles, then two rounds of 128-bit lane shuffles; moves only, so any bits pass).
///
/// # Safety
/// AVX-512 F.
#[target_feature(enable = "avx512f")]
#[inline]
pub unsafe fn transpose16(t: &mut [__m512; 16]) {
    let mut u = [_mm512_setzero_ps(); 16];
    for i in 0..8 {
        u[2 * i] = _mm512_unpacklo_ps(t[2 * i], t[2 * i + 1]);
        u[2 * i + 1] = _mm512_unpackhi_ps(t[2 * i], t[2 * i + 1]);
    }
    for q in 0..4 {
        let b = 4 * q;
        t[b] = _mm512_shuffle_ps::<0x44>(u[b], u[b + 2]);
        t[b + 1] = _mm512_shuffle_ps::<0xEE>(u[b], u[b + 2]);
        t[b + 2] = _mm512_shuffle_ps::<0x44>(u[b + 1], u[b + 3]);
        t[b + 3] = _mm512_shuffle_ps::<0xEE>(u[b + 1], u[b + 3]);
    }
    for h in [0, 8] {
        for i in 0..4 {
            u[h + i] = _mm512_shuffle_f32x4::<0x88>(t[h + i], t[h + i + 4]);
            u[h + i + 4] = _mm512_shuffle_f32x4::<0xDD>(t[h + i], t[h + i + 4]);
        }
    }
    for i in 0..8 {
        t[i] = _mm512_shuffle_f32x4::<0x88>(u[i], u[i + 8]);
        t[i + 8] = _mm512_shuffle_f32x4::<0xDD>(u[i], u[i + 8]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::matmul::reference::bf16::round_bf16;

    fn lanes(v: __m512) -> [u32; 16] {
        // SAFETY: __m512 is 16 dwords, any bits valid.
        unsafe { std::mem::transmute::<__m512, [u32; 16]>(v) }
    }

    /// `transpose16` against the element-by-element transpose (where AVX-512 F runs), on bit
    /// patterns that are NaNs and subnormals as floats (moves must keep every bit).
    #[test]
    fn transpose16_is_the_transpose() {
        if !std::arch::is_x86_feature_detected!("avx512f") {
            return; // not callable here (the bf16 path needs AVX-512)
        }
        let v: Vec<[u32; 16]> = (0..16)
            .map(|r| std::array::from_fn(|c| 0x7fc0_0001 ^ ((r * 16 + c) as u32 * 0x0101_0101)))
            .collect();
        // SAFETY: [u32; 16] and __m512 have the same size, any bits valid; AVX-512 F detected.
        let mut t: [__m512; 16] = std::array::from_fn(|r| unsafe { std::mem::transmute(v[r]) });
        // SAFETY: AVX-512 F detected.
        unsafe { transpose16(&mut t) };
        for (c, row) in t.iter().enumerate() {
            for (r, y) in lanes(*row).into_iter().enumerate() {
                assert_eq!(y, v[r][c], "lane {r} of row {c}");
            }
        }
    }

    /// The layout, entry by entry, against `reference::bf16::round_bf16` of each element (rows
    /// past M and the 16 entries after each vector zero), for M not a multiple of 16, with and
    /// without the pool; values over the whole exponent range, subnormals and ±0 included.
    #[test]
    fn prepare_is_the_rounded_pairs() {
        if !crate::cpu::has_avx512_bf16() {
            return; // no bf16 path here
        }
        let mut s = 0x2545_f491_4f6c_dd1du64;
        let mut rnd = move || {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            s
        };
        for (m, k) in [(1usize, 32usize), (16, 64), (37, 96), (50, 4096)] {
            let x: Vec<f32> = (0..m * k)
                .map(|_| {
                    let r = rnd();
                    let bits = match r % 5 {
                        0 => (r >> 8) as u32 & 0x807f_ffff, // subnormal or ±0
                        1 => 0x3f80_0000 | (r >> 8) as u32 & 0x807f_ffff, // [1, 2)
                        _ => (r >> 8) as u32 & 0xbfff_ffff, // exponent below 255
                    };
                    f32::from_bits(bits)
                })
                .collect();
            for par in [false, true] {
                // SAFETY: AVX-512 BF16 checked above; x is m x k, k a multiple of 32.
                let a = unsafe { prepare(&x, m, k, par) }.expect("finite input");
                assert_eq!(
                    (a.pairs, a.stride, a.vectors),
                    (k / 2, k / 2 + 16, m.div_ceil(16))
                );
                assert_eq!(a.x.len(), a.vectors * a.stride);
                for v in 0..a.vectors {
                    for e in 0..a.stride {
                        for l in 0..16 {
                            let row = 16 * v + l;
                            let want = if row < m && e < k / 2 {
                                let x0 = round_bf16(x[row * k + 2 * e]) as u32;
                                x0 | (round_bf16(x[row * k + 2 * e + 1]) as u32) << 16
                            } else {
                                0
                            };
                            let got = a.x[v * a.stride + e].0[l];
                            assert_eq!(got, want, "m {m} k {k} par {par} row {row} pair {e}");
                        }
                    }
                }
            }
        }
    }

    /// A kept buffer (`give_back`) from a larger call with other values changes nothing: every
    /// entry is written again (the padding and rows past M zero).
    #[test]
    fn a_reused_buffer_gives_the_same_layout() {
        if !crate::cpu::has_avx512_bf16() {
            return; // no bf16 path here
        }
        let (m, k) = (21usize, 64usize);
        let x: Vec<f32> = (0..m * k).map(|i| (i % 13) as f32 * 0.37 - 2.0).collect();
        // SAFETY: AVX-512 BF16 checked above; x is m x k, k a multiple of 32.
        let fresh: Vec<[u32; 16]> = unsafe { prepare(&x, m, k, false) }
            .expect("finite")
            .x
            .iter()
            .map(|p| p.0)
            .collect();
        for _ in 0..3 {
            // a larger buffer full of ones, kept, then taken by the next call (if no test
            // beside this one took it first: either way the result must be the same)
            give_back(vec![Pairs16([u32::MAX; 16]); 4 * fresh.len()]);
            // SAFETY: as above.
            let again = unsafe { prepare(&x, m, k, false) }.expect("finite");
            let again: Vec<[u32; 16]> = again.x.iter().map(|p| p.0).collect();
            assert_eq!(again, fresh);
        }
    }

    /// An infinity or a NaN anywhere (first or last element, a row past the first vector, with
    /// and without the pool) gives None; the largest finite values do not.
    #[test]
    fn prepare_finds_non_finite_values() {
        if !crate::cpu::has_avx512_bf16() {
            return; // no bf16 path here
        }
        let (m, k) = (37usize, 64usize);
        let x: Vec<f32> = (0..m * k).map(|i| (i % 7) as f32 - 3.0).collect();
        for par in [false, true] {
            let mut big = x.clone();
            big[5] = f32::MAX;
            big[m * k - 1] = -f32::MAX;
            // SAFETY: AVX-512 BF16 checked above; x is m x k, k a multiple of 32.
            assert!(unsafe { prepare(&big, m, k, par) }.is_some());
            for at in [0, 31, 17 * k + 40, m * k - 1] {
                for bad in [f32::INFINITY, f32::NEG_INFINITY, f32::NAN, -f32::NAN] {
                    let mut y = x.clone();
                    y[at] = bad;
                    // SAFETY: as above.
                    let got = unsafe { prepare(&y, m, k, par) };
                    assert!(got.is_none(), "{bad} at {at} (par {par}) not found");
                }
            }
        }
    }
}
