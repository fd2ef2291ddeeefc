//! M = 1 with the K-quant row kernels: all of a task's weight rows in one kernel call
//! (`x86::dot_rows_k_vnni` with AVX-512 VNNI, else `x86::dot_rows_k_avx2`) instead of one trip
//! per row through `Plan::dots` (its matches, slice set-up and checks cost about a sixth of a
//! q2_K row of K = 4096). Same operations per output as `dots`.

use super::reference::BlockQ8K;
use super::x86::{self, LanesK};
use super::{Acts, Plan};
use crate::formats::blocks::*;
use crate::qtype::QType;

impl Plan<'_> {
    /// Weight rows `n..n + y.len()` with the one activation row by `x86::dot_rows_k_vnni`
    /// where the plan prepared its activations (AVX-512 VNNI; q2_K .. q6_K, iq4_xs), else by
    /// `x86::dot_rows_k_avx2` (q2_K, q3_K, q4_K, iq4_xs); returns the rows done (0: none,
    /// the caller's `dots` runs them).
    pub(super) fn rows_k(&self, n: usize, y: &mut [f32]) -> usize {
        let Acts::Q8K { blocks, xz, .. } = &self.acts else {
            return 0;
        };
        if !self.simd || self.m != 1 {
            return 0;
        }
        let xz: &[u8] = bytemuck::cast_slice(xz);
        // AVX2 only: q5_K / q6_K keep `dots` (`dot_block_k`): the group kernel was faster hot
        // but slower from memory on Zen 3 (session 21, docs/cpu-gemm.md)
        if xz.is_empty() && matches!(self.w.qtype, QType::Q5K | QType::Q6K) {
            return 0;
        }
        match self.w.qtype {
            QType::Q2K => self.rows_k_w::<BlockQ2K>(n, blocks, xz, y),
            QType::Q3K => self.rows_k_w::<BlockQ3K>(n, blocks, xz, y),
            QType::Q4K => self.rows_k_w::<BlockQ4K>(n, blocks, xz, y),
            QType::Q5K => self.rows_k_w::<BlockQ5K>(n, blocks, xz, y),
            QType::Q6K => self.rows_k_w::<BlockQ6K>(n, blocks, xz, y),
            QType::IQ4XS => self.rows_k_w::<BlockIQ4XS>(n, blocks, xz, y),
            _ => return 0,
        }
        y.len()
    }

    fn rows_k_w<W: LanesK>(&self, n: usize, x: &[BlockQ8K], xz: &[u8], y: &mut [f32]) {
        let nb = self.k / QK_K;
        let rows = &self.w.data[n * self.row_bytes..(n + y.len()) * self.row_bytes];
        let w: &[W] = bytemuck::cast_slice(rows);
        if xz.is_empty() {
            // SAFETY: `simd`: the plan saw AVX2 and F16C (plan.rs); lengths checked by the kernel.
            unsafe { x86::dot_rows_k_avx2(w, nb, x, self.long, y) };
            return;
        }
        // SAFETY: `xz` is non-empty only where the plan saw `cpu::has_vnni_bw()` (plan.rs);
        // the lengths are checked by the kernel.
        unsafe { x86::dot_rows_k_vnni(w, nb, x, xz, self.long, y) }
    }
}
