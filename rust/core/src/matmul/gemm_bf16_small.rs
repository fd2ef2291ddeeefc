//! The bf16 GEMM for few activation rows (`x86::amx_bf16_small::use_small`: 8 to 16, where
//! AMX bf16 runs): jobs of `ROWS` weight rows over the whole of K (parallel over N only: one
//! activation vector), each decoding a chunk of `KCS` columns of its rows
//! (`Plan::decode_chunk`, the bf16 path's decoders) into a buffer that stays in L1, then the
//! chunk's tile steps (`amx_bf16_small::chunk`) into C tiles that stay in the tile registers
//! for the whole job; at the end the outputs go to `out` as on the other bf16 jobs.

use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0, _MM_HINT_T1};
use std::cell::RefCell;

use super::gemm_bf16::write_out;
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
        let job = |t: usize| self.job_small(x, t * ROWS, ROWS.min(n - t * ROWS), &outp);
        if crate::parallel::num_threads() == 1 || jobs == 1 {
            (0..jobs).for_each(job);
        } else {
            crate::parallel::for_each_index(jobs, job);
        }
    }

    /// Weight rows `n0..n0 + rows` against the activation vector, K chunk by chunk.
    fn job_small(&self, x: &Acts16, n0: usize, rows: usize, out: &OutPtr) {
        let k = self.k;
        let panels = rows.div_ceil(16);
        let rb = self.row_bytes;
        // Bytes of a chunk (the formats here have a whole number of bytes per KC columns).
        let bpc = self.w.qtype.row_bytes(KC, self.w.block_size.clamp(1, KC)) * (KCS / KC);
        // The decoders take any multiple of 32 columns but the ggml formats' and the 2- and
        // 3-bit grouped integers' (scratch for one KC): those go KC columns a call.
        let whole = !super::x86::decode16_ggml::takes(self.w.qtype)
            && !matches!(self.w.qtype, QType::GInt(g) if g.bits != 4 && g.bits != 8);
        let bl = self.block_len.max(1);
        SCRATCH.with_borrow_mut(|(wc, w8)| {
            // (rows of the last panel past `rows` hold whatever the buffer held: their C rows
            // are never written out, and no sum crosses rows)
            wc.resize(ROWS * W_STRIDE, 0);
            // SAFETY: `use_small` checked `amx_bf16_usable`; released below on this thread.
            unsafe {
                crate::amx::tile_config(&small::CONFIG);
                small::zero();
            }
            let mut k0 = 0;
            while k0 < k {
                let kc = KCS.min(k - k0);
                let ahead = (k0 / KCS + 1) * bpc;
                for i in 0..rows {
                    let n = n0 + i;
                    // The next chunk of this row into L2 (into L1 it pushed the decoded chunk
                    // out) and the line of its first scale into L1: 16 rows a stride apart
                    // are more streams than the hardware prefetchers follow. Hints only.
                    if ahead < rb {
                        let row = &self.w.data[n * rb..(n + 1) * rb];
                        for l in row[ahead..rb.min(ahead + bpc)].chunks(64) {
                            // SAFETY: a prefetch of a valid address has no side effects.
                            unsafe { _mm_prefetch::<_MM_HINT_T1>(l.as_ptr() as *const i8) };
                        }
                        let st = self.stats_of(n);
                        let si = (k0 + KCS) / bl;
                        for j in [si, k / bl + si] {
                            if j < st.len() {
                                let p = &st[j] as *const f32 as *const i8;
                                // SAFETY: a prefetch of a valid address has no side effects.
                                unsafe { _mm_prefetch::<_MM_HINT_T0>(p) };
                            }
                        }
                    }
                    let mut s = 0;
                    while s < kc {
                        let sc = if whole { kc - s } else { KC.min(kc - s) };
                        let at = i * W_STRIDE + s;
                        self.decode_chunk(n, k0 + s, sc, w8, &mut wc[at..at + sc]);
                        s += sc;
                    }
                }
                // SAFETY: tiles configured above; wc holds ROWS >= 16 · panels rows W_STRIDE
                // apart; the vector has K / 2 pairs, kc / 2 of them (a multiple of 16) from
                // k0 / 2.
                unsafe { small::chunk(wc, W_STRIDE, &x.x[k0 / 2..], kc / 2, panels) };
                k0 += kc;
            }
            // SAFETY: bf16 is set only with `cpu::has_avx512_bf16` (AVX-512 F included).
            let mut c = Tiles([unsafe { zero() }; 64]);
            // SAFETY: configured above on this thread.
            unsafe {
                small::store(panels, &mut c);
                crate::amx::tile_release();
            }
            write_out(&c.0, rows, 1, 0, self.m, n0, out, |i, _| i);
        });
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
