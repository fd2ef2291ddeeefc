//! The bf16 GEMM (`reference::bf16`'s numerics) on x86-64 with AVX2 + FMA and no AVX-512 BF16:
//! nf4, int8, fp8 and the grouped integers from `MIN_M` activation rows (K a multiple of 32).
//! The activations are rounded to bf16 once per call and packed per group of 16 rows as
//! `[K][16]` f32 (`pack_acts`); jobs of `PANEL` weight rows x one block of up to `BLOCK` rows
//! (parallel over both) take K chunk by chunk: each weight row's chunk decoded to its
//! dequantized f32 values, rounded to bf16 (`round8`, `reference::bf16::round_bf16`'s bits) into
//! an L2-resident buffer, then `kernel::kernel` (6 weight rows x 16 activation rows) over every
//! group of the block, the f32 chains kept in a per-thread buffer between chunks. Both operands
//! are stored with the elements of each pair swapped so that one sequential FMA chain adds the
//! odd element's product before the even one's, as `vdpbf16ps` does. Every output is that
//! reference's chain, however the jobs split: the results never depend on the thread count.

mod kernel;

use std::arch::x86_64::*;
use std::cell::{Cell, RefCell};

use super::{OutPtr, Plan};
use crate::formats::tensor::QuantizedView;
use crate::matmul::reference::{self as rf, bf16 as r};
use crate::qtype::QType;

#[cfg(test)]
pub use kernel::check_semantics;
use kernel::{MR, NR};

/// From this many activation rows on: at M = 16 the row kernels were faster for int8 and fp8
/// (46 / 59 ms against 60 / 74, one thread, 4096x14336), at 32 this path for every format
/// measured (nf4 106 against 135 ms, int8 93 / 96, fp8_e4m3 104 / 110; docs/cpu-gemm.md).
pub const MIN_M: usize = 32;
/// Columns of K per chunk (a multiple of every group length the path takes).
const KC: usize = 256;
/// Weight rows per job (a multiple of MR): its chunk, 72 KiB, beside the block's activations.
const PANEL: usize = 72;
/// Activation rows per block (a multiple of NR): the block's chunk, 256 KiB, in the 512 KiB L2.
const BLOCK: usize = 256;

thread_local! {
    /// Tests force the path on (or off) on this thread, whatever the CPU has beyond AVX2.
    pub static FORCE: Cell<Option<bool>> = const { Cell::new(None) };
    /// Each pool thread's decoded chunk (f32, PANEL rows of KC), chains, and int8 codes.
    static SCRATCH: RefCell<(Vec<f32>, Vec<__m256>, Vec<u8>)> = RefCell::new(Default::default());
}

fn forced() -> Option<bool> {
    #[cfg(test)]
    return FORCE.get();
    #[cfg(not(test))]
    None
}

/// The rows from which the path runs on this CPU, or 0 where it does not (AVX-512 BF16 CPUs
/// take `gemm_bf16.rs`; tests can force it from M = 1).
pub fn min_m() -> usize {
    let able = || crate::cpu::has_avx2() && crate::cpu::has_fma() && kernel::semantics_hold();
    match forced() {
        Some(false) => 0,
        Some(true) => able() as usize,
        None if !crate::cpu::has_avx512_bf16() && able() => MIN_M,
        None => 0,
    }
}

/// The path takes this call.
pub(super) fn takes(w: &QuantizedView<'_>, m: usize) -> bool {
    let t = min_m();
    t > 0
        && m >= t
        && w.cols.is_multiple_of(32)
        && match w.qtype {
            QType::NF4 | QType::Int8 | QType::Fp8E4M3 | QType::Fp8E5M2 => true,
            QType::GInt(g) => {
                !g.float_zero && (g.group == 0 || KC.is_multiple_of(g.group as usize))
            }
            _ => false,
        }
}

impl Plan<'_> {
    /// `out` (M x N) = x (M x K, f32) times the weights' transpose, on this path.
    pub(super) fn run_bf16_avx2(&self, x: &[f32], out: &mut [f32]) {
        let (m, n, k) = (self.m, self.w.rows, self.k);
        let groups = m.div_ceil(NR);
        let xp = pack_acts(x, m, k);
        let blocks = (groups * NR).div_ceil(BLOCK);
        // Blocks of equal size in whole groups.
        let per_block = groups.div_ceil(blocks);
        let panels = n.div_ceil(PANEL);
        let outp = OutPtr::new(out, n);
        let job = |t: usize| {
            let (pi, bi) = (t / blocks, t % blocks);
            let g0 = bi * per_block;
            let gs = g0..(g0 + per_block).min(groups);
            let n0 = pi * PANEL;
            self.job(&xp, gs, n0, PANEL.min(n - n0), &outp);
        };
        let jobs = panels * blocks;
        if crate::parallel::num_threads() == 1 || jobs == 1 {
            (0..jobs).for_each(job);
        } else {
            crate::parallel::for_each_index(jobs, job);
        }
    }

    fn job(&self, xp: &[f32], gs: std::ops::Range<usize>, n0: usize, rows: usize, out: &OutPtr) {
        let (m, k) = (self.m, self.k);
        let wgs = rows.div_ceil(MR);
        SCRATCH.with_borrow_mut(|(wc, acc, w8)| {
            wc.clear();
            wc.resize(wgs * MR * KC, 0.0);
            acc.clear();
            // SAFETY: __m256 is 8 f32 (any bits valid); a transmute, not an intrinsic outside
            // a target_feature fn (out of line, `tests/test_codegen.py`).
            let zero = unsafe { std::mem::transmute::<[f32; 8], __m256>([0.0; 8]) };
            acc.resize(gs.len() * wgs * 12, zero);
            let mut k0 = 0;
            while k0 < k {
                let kc = KC.min(k - k0);
                for i in 0..rows {
                    let dst = &mut wc[i * KC..i * KC + kc];
                    // SAFETY: AVX2 (the path's condition); kc is a multiple of 32.
                    unsafe { self.decode_avx2(n0 + i, k0, kc, w8, dst) };
                }
                for (gi, g) in gs.clone().enumerate() {
                    let xg = &xp[g * k * NR + k0 * NR..][..kc * NR];
                    for wg in 0..wgs {
                        let a: &mut [__m256; 12] =
                            (&mut acc[(gi * wgs + wg) * 12..][..12]).try_into().unwrap();
                        // SAFETY: AVX2 and FMA (the path's condition); xg has kc steps of 16,
                        // wc MR rows of KC from row wg · MR with kc decoded (rows past `rows`
                        // zero).
                        unsafe { kernel::kernel(xg, &wc[wg * MR * KC..], KC, kc, a) };
                    }
                }
                k0 += kc;
            }
            for (gi, g) in gs.enumerate() {
                for wg in 0..wgs {
                    let a = &acc[(gi * wgs + wg) * 12..][..12];
                    for (j, v) in a.iter().enumerate() {
                        let (row, h) = (wg * MR + j / 2, j % 2);
                        // SAFETY: __m256 is 8 f32.
                        let lanes: [f32; 8] = unsafe { std::mem::transmute(*v) };
                        for (l, &y) in lanes.iter().enumerate() {
                            let mi = g * NR + h * 8 + l;
                            if mi < m && row < rows {
                                out.set(mi, n0 + row, y);
                            }
                        }
                    }
                }
            }
        });
    }

    /// Columns `k0..k0 + kc` of weight row `n` as their bf16 values (f32), pairs swapped, into
    /// `dst`: `formats::dequantize`'s values (the code or integer times its scale, one f32
    /// multiply) rounded as `reference::bf16::round_bf16`.
    ///
    /// # Safety
    /// AVX2.
    #[target_feature(enable = "avx2,fma")]
    unsafe fn decode_avx2(
        &self,
        n: usize,
        k0: usize,
        kc: usize,
        w8: &mut Vec<u8>,
        dst: &mut [f32],
    ) {
        let rb = self.row_bytes;
        let row = &self.w.data[n * rb..(n + 1) * rb];
        let st = self.stats_of(n);
        let bl = self.block_len;
        // One scale per 32 columns at least: chunk j's is that of its first column.
        let at = |j: usize| st[(k0 + 32 * j) / bl];
        match self.w.qtype {
            QType::NF4 => {
                let code = &rf::NF4_CODE;
                for (j, d) in dst.chunks_exact_mut(32).enumerate() {
                    let s = _mm256_set1_ps(at(j));
                    // SAFETY: NF4_CODE has 16 f32.
                    let t = unsafe {
                        [
                            round8(_mm256_mul_ps(_mm256_loadu_ps(code.as_ptr()), s)),
                            round8(_mm256_mul_ps(_mm256_loadu_ps(code.as_ptr().add(8)), s)),
                        ]
                    };
                    let p = &row[k0 / 2 + 16 * j..][..16];
                    nibbles(p, true, t, d);
                }
            }
            QType::Int8 => {
                for (j, d) in dst.chunks_exact_mut(32).enumerate() {
                    i8_32(&row[k0 + 32 * j..][..32], 0, at(j), d);
                }
            }
            QType::Fp8E4M3 | QType::Fp8E5M2 => {
                let t = rf::fp8_table(self.w.qtype == QType::Fp8E5M2);
                for (j, d) in dst.chunks_exact_mut(32).enumerate() {
                    let s = _mm256_set1_ps(at(j));
                    let q = &row[k0 + 32 * j..][..32];
                    for (e, o) in d.chunks_exact_mut(8).enumerate() {
                        let v: [f32; 8] = std::array::from_fn(|l| t[q[8 * e + l] as usize]);
                        // SAFETY: 8 f32 read, 8 written.
                        unsafe {
                            let v = round8(_mm256_mul_ps(_mm256_loadu_ps(v.as_ptr()), s));
                            _mm256_storeu_ps(o.as_mut_ptr(), swap(v));
                        }
                    }
                }
            }
            QType::GInt(g) => {
                let mut scales = [0.0f32; KC / 32];
                let gl = crate::formats::gint::decode_chunk_i8(
                    g,
                    row,
                    st,
                    self.k,
                    (k0, kc),
                    w8,
                    &mut scales,
                );
                for (j, d) in dst.chunks_exact_mut(32).enumerate() {
                    i8_32(&w8[32 * j..][..32], 0, scales[32 * j / gl], d);
                }
            }
            _ => unreachable!("the AVX2 bf16 GEMM runs for nf4, int8, fp8 and grouped integers"),
        }
    }
}

/// The activations (M x K) rounded to bf16 (as f32), per group of 16 rows `[K][16]` with the
/// elements of each pair swapped; rows past M zero.
fn pack_acts(x: &[f32], m: usize, k: usize) -> Vec<f32> {
    let groups = m.div_ceil(NR);
    let mut xp = vec![0.0f32; groups * k * NR];
    let fill = |g: usize, dst: &mut [f32]| {
        for l in 0..NR.min(m - g * NR) {
            let xr = &x[(g * NR + l) * k..][..k];
            for (c, &v) in xr.iter().enumerate() {
                dst[(c ^ 1) * NR + l] = r::bf16_value(r::round_bf16(v));
            }
        }
    };
    let chunks: Vec<&mut [f32]> = xp.chunks_mut(k * NR).collect();
    if groups > 1 && crate::parallel::num_threads() > 1 {
        let cells: Vec<std::sync::Mutex<&mut [f32]>> =
            chunks.into_iter().map(std::sync::Mutex::new).collect();
        crate::parallel::for_each_index(groups, |g| fill(g, &mut cells[g].lock().unwrap()));
    } else {
        for (g, c) in chunks.into_iter().enumerate() {
            fill(g, c);
        }
    }
    xp
}

/// `reference::bf16::round_bf16` on 8 lanes, as the f32 value of the result (its bits << 16):
/// subnormals as signed zeros, round to nearest even, NaN kept with its quiet bit set.
#[target_feature(enable = "avx2,fma")]
#[inline]
pub fn round8(v: __m256) -> __m256 {
    let b = _mm256_castps_si256(v);
    let sign = _mm256_and_si256(b, _mm256_set1_epi32(i32::MIN));
    let exp = _mm256_and_si256(b, _mm256_set1_epi32(0x7f80_0000));
    let sub = _mm256_cmpeq_epi32(exp, _mm256_setzero_si256());
    let b = _mm256_blendv_epi8(b, sign, sub);
    let odd = _mm256_and_si256(_mm256_srli_epi32::<16>(b), _mm256_set1_epi32(1));
    let rounded = _mm256_add_epi32(b, _mm256_add_epi32(odd, _mm256_set1_epi32(0x7fff)));
    let hi = _mm256_set1_epi32(0xffff_0000u32 as i32);
    let rounded = _mm256_and_si256(rounded, hi);
    let nan = _mm256_castps_si256(_mm256_cmp_ps::<_CMP_UNORD_Q>(v, v));
    let quiet = _mm256_and_si256(_mm256_or_si256(b, _mm256_set1_epi32(0x0040_0000)), hi);
    _mm256_castsi256_ps(_mm256_blendv_epi8(rounded, quiet, nan))
}

/// Elements (2i, 2i + 1) exchanged.
#[target_feature(enable = "avx2,fma")]
#[inline]
fn swap(v: __m256) -> __m256 {
    _mm256_permute_ps::<0b1011_0001>(v)
}

/// 32 int8 codes (minus `z`, wrapping) times `s`, rounded, pairs swapped, into `d`.
#[target_feature(enable = "avx2,fma")]
#[inline]
fn i8_32(q: &[u8], z: u8, s: f32, d: &mut [f32]) {
    assert!(q.len() >= 32 && d.len() >= 32);
    let sv = _mm256_set1_ps(s);
    for e in 0..4 {
        // SAFETY: 8 bytes read from a checked 32, 8 f32 written into a checked 32.
        unsafe {
            let b = _mm_loadl_epi64(q.as_ptr().add(8 * e) as *const __m128i);
            let b = _mm_sub_epi8(b, _mm_set1_epi8(z as i8));
            let v = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(b));
            let v = round8(_mm256_mul_ps(v, sv));
            _mm256_storeu_ps(d.as_mut_ptr().add(8 * e), swap(v));
        }
    }
}

/// 16 bytes of nibble codes (element 2i in byte i's high nibble when `high_first`) looked up in
/// the 16 values `t` (already rounded), pairs swapped, into `d` (32 f32).
#[target_feature(enable = "avx2,fma")]
#[inline]
fn nibbles(p: &[u8], high_first: bool, t: [__m256; 2], d: &mut [f32]) {
    assert!(p.len() >= 16 && d.len() >= 32);
    // Lane 2i + 1 (element 2i after the swap) and lane 2i: bytes i of the 4, shifted.
    let sh = if high_first {
        _mm256_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28)
    } else {
        _mm256_setr_epi32(4, 0, 12, 8, 20, 16, 28, 24)
    };
    let f = _mm256_set1_epi32(15);
    for e in 0..4 {
        let word = u32::from_le_bytes(p[4 * e..4 * e + 4].try_into().unwrap());
        let idx = _mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32(word as i32), sh), f);
        let lo = _mm256_permutevar8x32_ps(t[0], idx);
        let hi = _mm256_permutevar8x32_ps(t[1], idx);
        let pick = _mm256_castsi256_ps(_mm256_slli_epi32::<28>(idx));
        // SAFETY: 8 f32 written into a checked 32.
        unsafe { _mm256_storeu_ps(d.as_mut_ptr().add(8 * e), _mm256_blendv_ps(lo, hi, pick)) };
    }
}
