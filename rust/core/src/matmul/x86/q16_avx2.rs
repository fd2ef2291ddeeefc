//! AVX2 + FMA kernels of the q16 dot products (`reference::q16`: nf4 and int8 weights, 16-bit
//! activations), for CPUs without AVX-512. The reference's units, lanes and float order: a
//! unit's 16 lanes are two registers of 8 (lanes 0..8 and 8..16, one per half unit), each
//! half's integer sums are exact (`pmaddwd`: 16-bit products summed in pairs into i32, no
//! value is -32768), then one `fma(float(isum), s, acc)` per lane, two sets of accumulators
//! alternating by unit, and `hsum_q16`'s reduction at the end.
//!
//! nf4: a half unit is 64 elements (32 packed bytes); its 8 lanes hold 8 elements each. Per 16
//! bytes the bytes are spread to 16-bit words (`vpshufb`), the two nibbles of each word become
//! the bytes `[hi, lo]` (element order), two byte tables (`vpshufb`) give the low and high bytes
//! of the 16-bit codes and `vpunpckl/hbw` make the words: codes in element order, against the
//! activations as stored. `pmaddwd` sums pairs, two rounds of `vphaddd` sum eights; the lanes
//! then sit in the order `[0 2 4 6 1 3 5 7]` in both halves and both sets (undone once, before
//! the reduction).
//!
//! int8: a half unit is 16 elements (16 bytes), its 8 lanes 2 elements each: the bytes
//! sign-extended to words (`vpmovsxbw`) times the activations, `pmaddwd`: lanes in order.
//!
//! Tails (nf4: K % 128 in {32, 64, 96}; int8: K % 32 != 0) never read past the weights
//! (int8 copies the last bytes to a zeroed buffer) and leave the lanes with no element alone
//! (int8: a blend). Activations are read up to `q16_row_len(K)` (the zero padding).
//!
//! Safety of every function here: as `x86.rs` (AVX2 and FMA checked by the callers: `cpu::has_fma`),
//! lengths checked by the entry points.

use std::arch::x86_64::*;

use super::{lanes_of, prefetch_l2};
use crate::matmul::reference::{
    self as r,
    q16::{self, Q16, UNIT_INT8, UNIT_NF4},
};

/// Rows longer than this (at M = 1) get the L2 software prefetch of `x86::prefetch_ahead`'s
/// distance (the other kernels' `LONG_K`).
const LONG_K: usize = 8192;
/// Bytes ahead of the weights being read that the long rows prefetch into L2.
const PREFETCH_AHEAD: usize = 8192;

static NF4_LO: [u8; 16] = q16::NF4_CODE_BYTES[0];
static NF4_HI: [u8; 16] = q16::NF4_CODE_BYTES[1];

/// `vpshufb` control on 16 bytes in both 128-bit halves: words of the packed bytes 0..4, 8..12
/// (low half) and 4..8, 12..16 (high half), zero-extended (0x80 gives a zero byte).
static SPREAD: [u8; 32] = {
    let mut t = [0x80u8; 32];
    let order = [0u8, 1, 2, 3, 8, 9, 10, 11, 4, 5, 6, 7, 12, 13, 14, 15];
    let mut j = 0;
    while j < 16 {
        t[2 * j] = order[j];
        j += 1;
    }
    t
};

/// The nf4 decode's constants: the low- and high-byte code tables (in both halves) and `SPREAD`.
#[derive(Clone, Copy)]
struct Nf4Tables {
    lo: __m256i,
    hi: __m256i,
    spread: __m256i,
}

#[target_feature(enable = "avx2")]
#[inline]
fn nf4_tables() -> Nf4Tables {
    // SAFETY: 16- and 32-byte statics; unaligned loads.
    unsafe {
        Nf4Tables {
            lo: _mm256_broadcastsi128_si256(_mm_loadu_si128(NF4_LO.as_ptr() as *const __m128i)),
            hi: _mm256_broadcastsi128_si256(_mm_loadu_si128(NF4_HI.as_ptr() as *const __m128i)),
            spread: _mm256_loadu_si256(SPREAD.as_ptr() as *const __m256i),
        }
    }
}

/// The 16-bit codes of the 32 elements of 16 packed bytes at `w`, in element order: elements
/// 0..16 and 16..32.
///
/// # Safety
/// 16 bytes at `w`.
#[inline(always)]
unsafe fn nf4_codes(t: Nf4Tables, w: *const u8) -> [__m256i; 2] {
    // SAFETY: 16 bytes at `w` (caller); AVX2 (the callers').
    unsafe {
        let b = _mm256_broadcastsi128_si256(_mm_loadu_si128(w as *const __m128i));
        // word = 0x00XY (X: high nibble, element 2j; Y: low nibble, 2j + 1) -> 0x0Y0X, i.e.
        // the bytes [X, Y]: (w | w << 12) >> 4.
        let wd = _mm256_shuffle_epi8(b, t.spread);
        let idx = _mm256_srli_epi16(_mm256_or_si256(wd, _mm256_slli_epi16(wd, 12)), 4);
        // idx bytes: [e0..8, e16..24 | e8..16, e24..32]
        let lo = _mm256_shuffle_epi8(t.lo, idx);
        let hi = _mm256_shuffle_epi8(t.hi, idx);
        [_mm256_unpacklo_epi8(lo, hi), _mm256_unpackhi_epi8(lo, hi)]
    }
}

/// One nf4 half unit (64 elements: 32 bytes at `w`, or only its first 16 when `PART`: 32
/// elements, the row's tail; activations at `x[r]`, lane scales `s[r]`) into the accumulators
/// `acc[r][2 * S + H]` (set S, half H). `pmaddwd` sums pairs, two rounds of `vphaddd` sum
/// eights: the half's lanes (eight elements each) come out in the order `[0 2 4 6 1 3 5 7]`.
///
/// # Safety
/// 32 bytes (16 when `PART`) at `w`, 64 i16 at each `x[r]`.
#[inline(always)]
unsafe fn nf4_half<const R: usize, const S: usize, const H: usize, const PART: bool>(
    t: Nf4Tables,
    w: *const u8,
    x: [*const i16; R],
    s: [__m256; R],
    acc: &mut [[__m256; 4]; R],
) {
    // SAFETY: the caller's contract.
    unsafe {
        let [c0, c1] = nf4_codes(t, w);
        let [c2, c3] = if PART {
            [_mm256_setzero_si256(); 2]
        } else {
            nf4_codes(t, w.add(16))
        };
        for r in 0..R {
            // (a macro: a closure here may fall out of line without AVX2, as `unit` did)
            macro_rules! xv {
                ($i:literal) => {
                    _mm256_loadu_si256(x[r].add(16 * $i) as *const __m256i)
                };
            }
            let h01 =
                _mm256_hadd_epi32(_mm256_madd_epi16(c0, xv!(0)), _mm256_madd_epi16(c1, xv!(1)));
            let h23 = if PART {
                _mm256_setzero_si256()
            } else {
                _mm256_hadd_epi32(_mm256_madd_epi16(c2, xv!(2)), _mm256_madd_epi16(c3, xv!(3)))
            };
            let isum = _mm256_hadd_epi32(h01, h23);
            let a = &mut acc[r][2 * S + H];
            let f = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum), s[r], *a);
            // a tail half has lanes 0..4 only: positions 0, 1, 4, 5
            *a = if PART {
                _mm256_blend_ps::<0x33>(*a, f)
            } else {
                f
            };
        }
    }
}

/// The row's state for the nf4 loop.
struct Nf4Row<'a, const R: usize> {
    t: Nf4Tables,
    w: *const u8,
    absmax: &'a [f32],
    /// log2 of the block size.
    shift: u32,
    xq: [*const i16; R],
    xd: [&'a [f32]; R],
}

impl<const R: usize> Nf4Row<'_, R> {
    /// The lane scales of the half starting at element `e`: `absmax · xd` (the reference's f32
    /// product) in the half's lane order; blocks of 32 put lanes 0..4 (positions 0, 1, 4, 5)
    /// in block `e / 32` and the rest in the next.
    ///
    /// # Safety
    /// AVX2 (the callers').
    #[inline(always)]
    unsafe fn scales(&self, e: usize) -> [__m256; R] {
        let b = e >> self.shift;
        let a = if self.shift == 5 {
            let a1 = *self.absmax.get(b + 1).unwrap_or(&self.absmax[b]);
            let a0 = self.absmax[b];
            _mm256_setr_ps(a0, a0, a1, a1, a0, a0, a1, a1)
        } else {
            _mm256_set1_ps(self.absmax[b])
        };
        // A plain loop, not `array::map`: a closure over `__m256` values falls out of line,
        // compiled without AVX2 (each intrinsic a call).
        let mut s = [a; R];
        for (s, xd) in s.iter_mut().zip(&self.xd) {
            *s = _mm256_mul_ps(a, _mm256_set1_ps(xd[e / Q16]));
        }
        s
    }

    /// Half H of unit `u` into set S (`PART`: its first 32 elements only).
    ///
    /// # Safety
    /// AVX2 and FMA; the half is inside the row (weights) and the activation rows.
    #[inline(always)]
    unsafe fn half<const S: usize, const H: usize, const PART: bool>(
        &self,
        u: usize,
        acc: &mut [[__m256; 4]; R],
    ) {
        let e = u * UNIT_NF4 + 64 * H;
        // SAFETY: AVX2 (contract).
        let s = unsafe { self.scales(e) };
        // SAFETY: the caller's contract.
        unsafe {
            let mut x = self.xq;
            for p in x.iter_mut() {
                *p = p.add(e);
            }
            nf4_half::<R, S, H, PART>(self.t, self.w.add(e / 2), x, s, acc)
        }
    }
}

/// `hsum_q16` of one row's accumulators (`acc[2 * set + half]`), the lanes of each register at
/// the positions `order` gives (lane l at position `order[l]`).
#[target_feature(enable = "avx2")]
#[inline]
fn finish(acc: &[__m256; 4], order: __m256i) -> f32 {
    let t0 = _mm256_add_ps(acc[0], acc[2]);
    let t1 = _mm256_add_ps(acc[1], acc[3]);
    let v = _mm256_permutevar8x32_ps(_mm256_add_ps(t0, t1), order);
    r::hsum8(&lanes_of(v))
}

/// R activation rows as passes of two (and one), each row's result that of its pass (rows are
/// independent): the accumulators of three or four rows (12, 16 registers) do not fit AVX2's
/// 16 next to the decode, and the spills cost more than decoding the weights again. K = 4096 in
/// cache, one thread, weight bytes / time, one pass -> passes of two: int8 R = 3 8.9 -> 10.8
/// GB/s, R = 4 6.1 -> 8.3; nf4 R = 4 2.1 -> 2.9 (nf4 R = 3 stays one pass: 4.3, against 3.6).
#[inline(always)]
fn in_pairs<const R: usize>(
    xq: [&[i16]; R],
    xd: [&[f32]; R],
    mut two: impl FnMut([&[i16]; 2], [&[f32]; 2]) -> [f32; 2],
    mut one: impl FnMut([&[i16]; 1], [&[f32]; 1]) -> [f32; 1],
) -> [f32; R] {
    let mut y = [0.0f32; R];
    let mut i = 0;
    while i + 2 <= R {
        let p = two([xq[i], xq[i + 1]], [xd[i], xd[i + 1]]);
        y[i..i + 2].copy_from_slice(&p);
        i += 2;
    }
    if i < R {
        y[i] = one([xq[i]], [xd[i]])[0];
    }
    y
}

/// `reference::q16::dot_nf4_q16` for R activation rows at once (the codes decoded once per
/// half unit), bit for bit. Rows or block sizes the kernel does not take (K not a multiple of
/// 32, a block size not a power of two from 32 on) run the reference.
///
/// # Safety
/// AVX2 and FMA present (the caller checks `crate::cpu::has_avx2()` and
/// `crate::cpu::has_fma()`). Lengths are checked here (panics): one absmax per block, `xq[r]` at least
/// `q16_row_len(K)` values, `xd[r]` at least `q16_row_len(K) / 64`.
#[target_feature(enable = "avx2,fma")]
pub unsafe fn dot_nf4_q16_avx2<const R: usize>(
    packed: &[u8],
    absmax: &[f32],
    block_size: usize,
    xq: [&[i16]; R],
    xd: [&[f32]; R],
) -> [f32; R] {
    if R > 3 {
        return in_pairs(
            xq,
            xd,
            // SAFETY: AVX2 and FMA, the caller's contract; lengths are checked by the callee.
            |q, d| unsafe { dot_nf4_q16_avx2::<2>(packed, absmax, block_size, q, d) },
            // SAFETY: as above.
            |q, d| unsafe { dot_nf4_q16_avx2::<1>(packed, absmax, block_size, q, d) },
        );
    }
    let k = 2 * packed.len();
    if !k.is_multiple_of(32) || !block_size.is_power_of_two() || block_size < 32 {
        return std::array::from_fn(|r| q16::dot_nf4_q16(packed, absmax, block_size, xq[r], xd[r]));
    }
    assert!(absmax.len() >= k.div_ceil(block_size));
    assert!(xq.iter().all(|q| q.len() >= q16::q16_row_len(k)));
    assert!(xd.iter().all(|d| d.len() >= q16::q16_row_len(k) / Q16));
    let row = Nf4Row {
        t: nf4_tables(),
        w: packed.as_ptr(),
        absmax,
        shift: block_size.trailing_zeros(),
        xq: xq.map(|q| q.as_ptr()),
        xd,
    };
    // SAFETY: AVX2 and FMA (contract); lengths checked above.
    let acc = unsafe {
        if k > LONG_K {
            nf4_rows::<R, true>(&row, k)
        } else {
            nf4_rows::<R, false>(&row, k)
        }
    };
    let order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    acc.map(|a| finish(&a, order))
}

/// # Safety
/// As `dot_nf4_q16_avx2`, lengths checked.
#[inline(always)]
unsafe fn nf4_rows<const R: usize, const PF: bool>(
    row: &Nf4Row<'_, R>,
    k: usize,
) -> [[__m256; 4]; R] {
    let mut acc = [[_mm256_setzero_ps(); 4]; R];
    let units = k / UNIT_NF4;
    let mut u = 0;
    // SAFETY: every half read is inside the row and the activation rows (`dot_nf4_q16_avx2`
    // asserted the lengths); AVX2 and FMA (contract).
    unsafe {
        // A macro, not a closure: a closure over `__m256` values falls out of line, compiled
        // without AVX2 (each intrinsic a call; session 19 found it in the disassembly).
        macro_rules! unit {
            ($u:expr, $s:literal) => {{
                let u = $u;
                if PF {
                    // a unit: 64 bytes, one line
                    prefetch_l2(row.w.add(u * UNIT_NF4 / 2), 64, PREFETCH_AHEAD);
                }
                row.half::<$s, 0, false>(u, &mut acc);
                row.half::<$s, 1, false>(u, &mut acc);
            }};
        }
        while u + 2 <= units {
            unit!(u, 0);
            unit!(u + 1, 1);
            u += 2;
        }
        if u < units {
            unit!(u, 0);
            u += 1;
        }
        // The last unit's 32, 64 or 96 elements; its set is u % 2.
        let rest = k % UNIT_NF4;
        macro_rules! tail {
            ($s:literal) => {
                match rest {
                    32 => row.half::<$s, 0, true>(u, &mut acc),
                    64 => row.half::<$s, 0, false>(u, &mut acc),
                    96 => {
                        row.half::<$s, 0, false>(u, &mut acc);
                        row.half::<$s, 1, true>(u, &mut acc);
                    }
                    _ => {}
                }
            };
        }
        if u % 2 == 0 {
            tail!(0);
        } else {
            tail!(1);
        }
    }
    acc
}

// ---------------------------------------------------------------- int8

/// One int8 half unit (16 weights as words `w`, activations at `x[r]`, scales `s[r]`) into
/// `acc[r][2 * S + H]`, on the lanes of `mask` only (all when `MASK` is false).
///
/// # Safety
/// 16 i16 at each `x[r]`.
#[inline(always)]
unsafe fn int8_half<const R: usize, const S: usize, const H: usize, const MASK: bool>(
    w: __m256i,
    x: [*const i16; R],
    s: [__m256; R],
    mask: __m256,
    acc: &mut [[__m256; 4]; R],
) {
    for r in 0..R {
        // SAFETY: the caller's contract; AVX2 and FMA (the callers').
        unsafe {
            let isum = _mm256_madd_epi16(w, _mm256_loadu_si256(x[r] as *const __m256i));
            let a = &mut acc[r][2 * S + H];
            let v = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum), s[r], *a);
            *a = if MASK {
                _mm256_blendv_ps(*a, v, mask)
            } else {
                v
            };
        }
    }
}

/// The row's state for the int8 loop.
struct Int8Row<'a, const R: usize> {
    w: *const u8,
    scales: &'a [f32],
    /// log2 of the block length (63 for one scale a row).
    shift: u32,
    xq: [*const i16; R],
    xd: [&'a [f32]; R],
}

impl<const R: usize> Int8Row<'_, R> {
    /// Unit `u`'s lane scales (`scale · xd`, as `Nf4Row::scales`).
    ///
    /// # Safety
    /// AVX2 (the callers').
    #[inline(always)]
    unsafe fn scales(&self, u: usize) -> [__m256; R] {
        let e = u * UNIT_INT8;
        let mut s = [_mm256_setzero_ps(); R];
        // SAFETY: AVX2 (contract); indices checked.
        unsafe {
            let a = _mm256_broadcast_ss(&self.scales[e >> self.shift]);
            for (s, xd) in s.iter_mut().zip(&self.xd) {
                *s = _mm256_mul_ps(a, _mm256_broadcast_ss(&xd[e / Q16]));
            }
        }
        s
    }

    /// Unit `u` (32 bytes at `w`: the row's, or the tail's buffer) into set S; `lanes`: the
    /// lanes with an element in the row (16 but in the tail).
    ///
    /// # Safety
    /// AVX2 and FMA; 32 bytes at `w`; the unit is inside the activation rows.
    #[inline(always)]
    unsafe fn unit<const S: usize, const MASK: bool>(
        &self,
        u: usize,
        w: *const u8,
        lanes: usize,
        acc: &mut [[__m256; 4]; R],
    ) {
        // SAFETY: AVX2 (contract).
        let s = unsafe { self.scales(u) };
        let e = u * UNIT_INT8;
        // SAFETY: the caller's contract.
        unsafe {
            let w0 = _mm256_cvtepi8_epi16(_mm_loadu_si128(w as *const __m128i));
            let w1 = _mm256_cvtepi8_epi16(_mm_loadu_si128(w.add(16) as *const __m128i));
            let (mut x0, mut x1) = (self.xq, self.xq);
            for r in 0..R {
                x0[r] = x0[r].add(e);
                x1[r] = x1[r].add(e + 16);
            }
            if MASK {
                let ids = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
                let m0 = _mm256_castsi256_ps(_mm256_cmpgt_epi32(
                    _mm256_set1_epi32(lanes.min(8) as i32),
                    ids,
                ));
                int8_half::<R, S, 0, true>(w0, x0, s, m0, acc);
                if lanes > 8 {
                    let m1 = _mm256_castsi256_ps(_mm256_cmpgt_epi32(
                        _mm256_set1_epi32(lanes as i32 - 8),
                        ids,
                    ));
                    int8_half::<R, S, 1, true>(w1, x1, s, m1, acc);
                }
            } else {
                let m = _mm256_setzero_ps();
                int8_half::<R, S, 0, false>(w0, x0, s, m, acc);
                int8_half::<R, S, 1, false>(w1, x1, s, m, acc);
            }
        }
    }
}

/// `reference::q16::dot_int8_q16` for R activation rows at once (the weights widened once),
/// bit for bit. A block length the kernel does not take (shorter than the row and not a power
/// of two from 32 on) runs the reference.
///
/// # Safety
/// AVX2 and FMA present (the caller checks `crate::cpu::has_avx2()` and
/// `crate::cpu::has_fma()`). Lengths are checked here (panics): one scale per block, `xq[r]` at least
/// `q16_row_len(K)` values, `xd[r]` at least `q16_row_len(K) / 64`.
#[target_feature(enable = "avx2,fma")]
pub unsafe fn dot_int8_q16_avx2<const R: usize>(
    q: &[u8],
    scales: &[f32],
    block_len: usize,
    xq: [&[i16]; R],
    xd: [&[f32]; R],
) -> [f32; R] {
    if R > 2 {
        return in_pairs(
            xq,
            xd,
            // SAFETY: AVX2 and FMA, the caller's contract; lengths are checked by the callee.
            |x, d| unsafe { dot_int8_q16_avx2::<2>(q, scales, block_len, x, d) },
            // SAFETY: as above.
            |x, d| unsafe { dot_int8_q16_avx2::<1>(q, scales, block_len, x, d) },
        );
    }
    let k = q.len();
    let shift = if block_len >= k {
        63
    } else if block_len.is_power_of_two() && block_len >= UNIT_INT8 {
        block_len.trailing_zeros()
    } else {
        return std::array::from_fn(|r| q16::dot_int8_q16(q, scales, block_len, xq[r], xd[r]));
    };
    assert!(k == 0 || scales.len() >= k.div_ceil(block_len));
    assert!(xq.iter().all(|x| x.len() >= q16::q16_row_len(k)));
    assert!(xd.iter().all(|d| d.len() >= k.div_ceil(Q16)));
    let row = Int8Row {
        w: q.as_ptr(),
        scales,
        shift,
        xq: xq.map(|x| x.as_ptr()),
        xd,
    };
    // SAFETY: AVX2 and FMA (contract); lengths checked above.
    let acc = unsafe {
        if k > LONG_K {
            int8_rows::<R, true>(&row, q)
        } else {
            int8_rows::<R, false>(&row, q)
        }
    };
    let order = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    acc.map(|a| finish(&a, order))
}

/// # Safety
/// As `dot_int8_q16_avx2`, lengths checked.
#[inline(always)]
unsafe fn int8_rows<const R: usize, const PF: bool>(
    row: &Int8Row<'_, R>,
    q: &[u8],
) -> [[__m256; 4]; R] {
    let k = q.len();
    let mut acc = [[_mm256_setzero_ps(); 4]; R];
    let units = k / UNIT_INT8;
    let w = row.w;
    let mut u = 0;
    // SAFETY: every unit reads 32 bytes inside the row (or the buffer), activations inside
    // the padded rows (`dot_int8_q16_avx2` asserted the lengths); AVX2 and FMA (contract).
    unsafe {
        while u + 2 <= units {
            if PF {
                prefetch_l2(w.add(u * UNIT_INT8), 64, PREFETCH_AHEAD);
            }
            row.unit::<0, false>(u, w.add(u * UNIT_INT8), 16, &mut acc);
            row.unit::<1, false>(u + 1, w.add((u + 1) * UNIT_INT8), 16, &mut acc);
            u += 2;
        }
        if u < units {
            row.unit::<0, false>(u, w.add(u * UNIT_INT8), 16, &mut acc);
            u += 1;
        }
        let rest = k - u * UNIT_INT8;
        if rest > 0 {
            let mut buf = [0u8; UNIT_INT8];
            buf[..rest].copy_from_slice(&q[u * UNIT_INT8..]);
            let lanes = rest.div_ceil(UNIT_INT8 / 16);
            if u % 2 == 0 {
                row.unit::<0, true>(u, buf.as_ptr(), lanes, &mut acc);
            } else {
                row.unit::<1, true>(u, buf.as_ptr(), lanes, &mut acc);
            }
        }
    }
    acc
}

pub mod gint;
#[cfg(test)]
mod tests;
