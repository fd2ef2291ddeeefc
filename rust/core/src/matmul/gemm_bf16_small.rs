//! The bf16 GEMM for few activation rows (`x86::amx_bf16_small::use_small`: 8 to 16, where
//! AMX bf16 runs): jobs of `ROWS` weight rows over the whole of K (parallel over N only: one
//! activation vector), each decoding a chunk of `KCS` columns of its rows
//! (`Plan::decode_chunk`, the bf16 path's decoders) into a buffer that stays in L1, then the
//! chunk's tile steps (`amx_bf16_small::chunk`) into C tiles that stay in the tile registers
//! for the whole job; at the end the outputs go to `out` as on the other bf16 jobs.

use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T1};
use std::cell::RefCell;

use super::out16::Sink;
use super::x86::amx_bf16_small::{self as small, Tiles, KCS, ROWS, W_STRIDE};
use super::x86::gemm16::{Acts16, KC};
use super::{OutPtr, Plan};
use crate::qtype::QType;

thread_local! {
    /// Each pool thread's decoded chunk (ROWS rows, W_STRIDE apart) and int8 codes of one
    /// grouped row chunk.
    static SCRATCH: RefCell<(Vec<u16>, Vec<u8>)> = RefCell::new(Default::default());
}

impl Plan<'_> {
    /// The whole product into `out` (M x N, M <= 16) on `amx_bf16_small`.
    pub(super) fn run_bf16_small(&self, x: &Acts16, out: &mut [f32]) {
        debug_assert!(x.vectors == 1);
        let n = self.w.rows;
        let jobs = n.div_ceil(ROWS);
        let outp = OutPtr::new(out, n);
        let threads = crate::parallel::num_threads();
        let job = |t: usize| {
            let rows = ROWS.min(n - t * ROWS);
            self.job_small(x, t * ROWS, rows, (t + threads) * ROWS, &outp)
        };
        if threads == 1 || jobs == 1 {
            (0..jobs).for_each(job);
        } else {
            crate::parallel::for_each_index(jobs, job);
        }
    }

    /// Weight rows `n0..n0 + rows` against the activation vector, K chunk by chunk, while the
    /// weight rows and scales of the job from row `next` (the one this thread likely takes
    /// next: the team claims jobs in order) come into L2.
    fn job_small(&self, x: &Acts16, n0: usize, rows: usize, next: usize, out: &OutPtr) {
        let k = self.k;
        let rb = self.row_bytes;
        // The decoders take any multiple of 32 columns (the ggml formats' any whole blocks: KCS
        // is a multiple of QK_K) but the 2- and 3-bit grouped integers' (scratch for one KC):
        // those go KC columns a call. One call per chunk for the ggml formats (session 18):
        // q4_0 4096x14336 M = 8 6.63 ms against 7.15 with four, M = 16 6.93 against 7.42; q8_0
        // 7.67 / 7.96 against 7.90 / 8.17 (one thread, CPU time, in-process A/B, load 16).
        let whole = !matches!(self.w.qtype, QType::GInt(g) if g.bits != 4 && g.bits != 8);
        // The next job's bytes in storage order (its rows are contiguous) and its rows' scales,
        // a share at each (chunk, row) step of this job: one sequential stream at an even
        // pace. The 16 rows of this job read chunk by chunk are 16 streams a row apart, which
        // the hardware prefetchers followed poorly: fetching each row's next chunk instead
        // (session 16) left nf4 at M = 16, 4096x14336 at 7.4-8.4 ms against 5.5-5.9 (one
        // thread, CPU time, 2026-12-07, load 23; int8 9.6-10.8 against 7.4-8.0).
        let nn = self.w.rows;
        let (ahead, sahead): (&[u8], &[f32]) = if next < nn {
            let end = (next + ROWS).min(nn);
            let st = if self.w.stats.len() > 1 {
                let spr = self.stats_per_row;
                &self.w.stats[next * spr..end * spr]
            } else {
                &[][..]
            };
            (&self.w.data[next * rb..end * rb], st)
        } else {
            (&[], &[])
        };
        let steps = k.div_ceil(KCS) * rows;
        let piece = ahead.len().div_ceil(steps).next_multiple_of(64);
        let spiece = (4 * sahead.len()).div_ceil(steps).next_multiple_of(64);
        SCRATCH.with_borrow_mut(|(wc, w8)| {
            // (rows of the last panel past `rows` hold whatever the buffer held: their C rows
            // are never written out, and no sum crosses rows)
            wc.resize(ROWS * W_STRIDE, 0);
            // SAFETY: `use_small` checked `amx_bf16_usable`; released below on this thread.
            unsafe {
                crate::amx::tile_config(&small::CONFIG);
                small::zero();
            }
            let mut step = 0;
            let mut k0 = 0;
            while k0 < k {
                let kc = KCS.min(k - k0);
                for i in 0..rows {
                    prefetch_l2(ahead, step * piece, piece);
                    let sp = sahead.as_ptr() as *const i8;
                    for b in
                        (step * spiece..(4 * sahead.len()).min((step + 1) * spiece)).step_by(64)
                    {
                        // SAFETY: b < 4 · sahead.len(): inside the scales; a prefetch of a
                        // valid address has no side effects.
                        unsafe { _mm_prefetch::<_MM_HINT_T1>(sp.add(b)) };
                    }
                    step += 1;
                    let mut s = 0;
                    while s < kc {
                        let sc = if whole { kc - s } else { KC.min(kc - s) };
                        let at = i * W_STRIDE + s;
                        self.decode_chunk(n0 + i, k0 + s, sc, w8, &mut wc[at..at + sc]);
                        s += sc;
                    }
                }
                // SAFETY: tiles configured above; wc holds ROWS rows (whole panels) W_STRIDE apart; the
                // vector has K / 2 pairs, kc / 2 of them (a multiple of 16) from k0 / 2.
                unsafe { small::chunk(wc, W_STRIDE, &x.x[k0 / 2..], kc / 2, ROWS / 16) };
                k0 += kc;
            }
            // SAFETY: bf16 is set only with `cpu::has_avx512_bf16` (AVX-512 F included).
            let mut c = Tiles([unsafe { zero() }; 64]);
            // SAFETY: configured above on this thread.
            unsafe {
                small::store(ROWS / 16, &mut c);
                crate::amx::tile_release();
            }
            out.tiles(&c.0, rows, 1, 0, self.m, n0, |i, _| i);
        });
    }
}

/// Asks for the lines of `bytes[from..from + len]` (clamped) in L2 (a hint: no fault, no
/// effect on results).
#[inline(always)]
fn prefetch_l2(bytes: &[u8], from: usize, len: usize) {
    let end = bytes.len().min(from + len);
    for l in bytes[from.min(end)..end].chunks(64) {
        // SAFETY: a prefetch of a valid address has no side effects.
        unsafe { _mm_prefetch::<_MM_HINT_T1>(l.as_ptr() as *const i8) };
    }
}

/// A zero vector.
///
/// # Safety
/// AVX-512 F.
#[target_feature(enable = "avx512f")]
unsafe fn zero() -> std::arch::x86_64::__m512 {
    std::arch::x86_64::_mm512_setzero_ps()
}
